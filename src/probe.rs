//! `llm-sidecar probe`: the kubelet's exec probes and the Helm test. The sidecar's ports are
//! bound to 127.0.0.1, which the kubelet cannot reach with an `httpGet` probe, so the probe runs
//! inside the container: one blocking HTTP/1.0 GET on loopback, exit 0 on success.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::settings::{Env, Settings};

/// What to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The admin port's `/live`.
    Live,
    /// The admin port's `/ready`: a config snapshot is loaded.
    Ready,
    /// `GET $OPENAI_BASE_URL/models` answers with at least one model: what an injected app sees.
    Models,
}

impl std::str::FromStr for Check {
    type Err = String;
    fn from_str(s: &str) -> Result<Check, String> {
        match s {
            "live" => Ok(Check::Live),
            "ready" => Ok(Check::Ready),
            "models" => Ok(Check::Models),
            other => Err(format!(
                "unknown probe `{other}` (expected live, ready or models)"
            )),
        }
    }
}

/// Runs one check; `Ok` holds a one-line summary, `Err` the reason it failed.
pub fn run(check: &Check, env: &dyn Env, timeout: Duration) -> Result<String, String> {
    let settings = Settings::from_env(env).map_err(|errors| errors.join("; "))?;
    match check {
        Check::Live | Check::Ready => {
            let path = if *check == Check::Live {
                "/live"
            } else {
                "/ready"
            };
            let addr = loopback(settings.admin_listen);
            let (status, body) = get(addr, &addr.to_string(), path, timeout)?;
            if status == 200 {
                Ok(format!("{path}: {}", body.trim()))
            } else {
                Err(format!("{path} answered {status}: {}", body.trim()))
            }
        }
        Check::Models => {
            let base = env
                .get("OPENAI_BASE_URL")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| format!("http://{}/v1", loopback(settings.listen)));
            let (addr, host, path) = split_url(base.trim())?;
            let path = format!("{}/models", path.trim_end_matches('/'));
            let (status, body) = get(addr, &host, &path, timeout)?;
            if status != 200 {
                return Err(format!(
                    "GET {base}/models answered {status}: {}",
                    body.trim()
                ));
            }
            let list: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| format!("GET {base}/models: not JSON: {e}"))?;
            let ids: Vec<&str> = list["data"]
                .as_array()
                .map(|models| models.iter().filter_map(|m| m["id"].as_str()).collect())
                .unwrap_or_default();
            if ids.is_empty() {
                return Err(format!("GET {base}/models: no models in the answer"));
            }
            Ok(format!("{base}/models: {}", ids.join(", ")))
        }
    }
}

/// A listener on every interface is probed on loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// `http://host:port/path` with a literal IP (the probe never resolves names: it only ever
/// talks to its own pod).
fn split_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// on an IP address is probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let with_port = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .replace("localhost", "127.0.0.1")
        .parse::<SocketAddr>()
        .map_err(|_| format!("{url}: the host must be an IP address or localhost"))?;
    Ok((addr, authority.to_string(), path.to_string()))
}

fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let fail = |e: std::io::Error| format!("GET http://{host}{path}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: llm-sidecar-probe\r\n\r\n"
    )
    .map_err(fail)?;
    let mut raw = Vec::new();
    // A probe reads at most 1 MiB: enough for any model list, bounded against a runaway peer.
    stream.take(1 << 20).read_to_end(&mut raw).map_err(fail)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET http://{host}{path}: no complete HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("GET http://{host}{path}: no status line"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_into_address_host_and_path() {
        let (addr, host, path) = split_url("http://127.0.0.1:4000/v1").unwrap();
        assert_eq!(addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!((host.as_str(), path.as_str()), ("127.0.0.1:4000", "/v1"));
        let (addr, _, _) = split_url("http://localhost:4100/v1/").unwrap();
        assert_eq!(addr, "127.0.0.1:4100".parse().unwrap());
        assert!(split_url("https://127.0.0.1:4000/v1").is_err());
        assert!(split_url("http://sidecar.local:4000/v1").is_err());
    }

    #[test]
    fn listeners_on_every_interface_are_probed_on_loopback() {
        assert_eq!(
            loopback("0.0.0.0:4001".parse().unwrap()),
            "127.0.0.1:4001".parse().unwrap()
        );
        assert_eq!(
            loopback("10.1.2.3:4001".parse().unwrap()),
            "10.1.2.3:4001".parse().unwrap()
        );
    }
}
