//! Process settings read once at start from `LLM_SIDECAR_*` environment variables; every bad
//! variable is reported before the process exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub const ENV_LISTEN: &str = "LLM_SIDECAR_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "LLM_SIDECAR_ADMIN_LISTEN";
pub const ENV_CONFIG: &str = "LLM_SIDECAR_CONFIG";
pub const ENV_CONFIG_POLL: &str = "LLM_SIDECAR_CONFIG_POLL";
pub const ENV_MAX_BODY_BYTES: &str = "LLM_SIDECAR_MAX_BODY_BYTES";
pub const ENV_MAX_CONCURRENCY: &str = "LLM_SIDECAR_MAX_CONCURRENCY";
pub const ENV_HEADER_READ_TIMEOUT: &str = "LLM_SIDECAR_HEADER_READ_TIMEOUT";
pub const ENV_BODY_READ_TIMEOUT: &str = "LLM_SIDECAR_BODY_READ_TIMEOUT";
pub const ENV_CONNECT_TIMEOUT: &str = "LLM_SIDECAR_CONNECT_TIMEOUT";
pub const ENV_SHUTDOWN_GRACE: &str = "LLM_SIDECAR_SHUTDOWN_GRACE";
pub const ENV_LOG_FORMAT: &str = "LLM_SIDECAR_LOG_FORMAT";
pub const ENV_EXTRA_CA_FILE: &str = "LLM_SIDECAR_EXTRA_CA_FILE";

/// Where settings come from: the process environment, or a map in tests.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub config_path: Option<PathBuf>,
    pub config_poll: Duration,
    pub max_body_bytes: usize,
    pub max_concurrency: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// PEM certificates trusted for provider TLS in addition to the bundled web roots.
    pub extra_ca_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 4001)),
            config_path: None,
            config_poll: Duration::from_millis(250),
            max_body_bytes: 10 * 1024 * 1024,
            max_concurrency: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(25),
            log_format: LogFormat::Text,
            extra_ca_file: None,
        }
    }
}

impl Settings {
    /// Reads every setting; returns all problems at once so an operator fixes them in one go.
    pub fn from_env(env: &dyn Env) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let mut s = Settings::default();
        read(env, ENV_LISTEN, &mut errors, parse_from_str, &mut s.listen);
        read(
            env,
            ENV_ADMIN_LISTEN,
            &mut errors,
            parse_from_str,
            &mut s.admin_listen,
        );
        if let Some(path) = env.get(ENV_CONFIG).filter(|p| !p.trim().is_empty()) {
            s.config_path = Some(PathBuf::from(path));
        }
        read(
            env,
            ENV_CONFIG_POLL,
            &mut errors,
            parse_duration,
            &mut s.config_poll,
        );
        read(
            env,
            ENV_MAX_BODY_BYTES,
            &mut errors,
            parse_positive,
            &mut s.max_body_bytes,
        );
        read(
            env,
            ENV_MAX_CONCURRENCY,
            &mut errors,
            parse_positive,
            &mut s.max_concurrency,
        );
        read(
            env,
            ENV_HEADER_READ_TIMEOUT,
            &mut errors,
            parse_duration,
            &mut s.header_read_timeout,
        );
        read(
            env,
            ENV_BODY_READ_TIMEOUT,
            &mut errors,
            parse_duration,
            &mut s.body_read_timeout,
        );
        read(
            env,
            ENV_CONNECT_TIMEOUT,
            &mut errors,
            parse_duration,
            &mut s.connect_timeout,
        );
        read(
            env,
            ENV_SHUTDOWN_GRACE,
            &mut errors,
            parse_duration,
            &mut s.shutdown_grace,
        );
        read(
            env,
            ENV_LOG_FORMAT,
            &mut errors,
            parse_log_format,
            &mut s.log_format,
        );
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            errors.push(format!(
                "{ENV_LISTEN} and {ENV_ADMIN_LISTEN} are both {}: they must differ",
                s.listen
            ));
        }
        if errors.is_empty() {
            Ok(s)
        } else {
            Err(errors)
        }
    }
}

fn read<T>(
    env: &dyn Env,
    key: &str,
    errors: &mut Vec<String>,
    parse: fn(&str) -> Result<T, String>,
    slot: &mut T,
) {
    let Some(raw) = env.get(key) else { return };
    match parse(raw.trim()) {
        Ok(value) => *slot = value,
        Err(why) => errors.push(format!("{key}={raw:?}: {why}")),
    }
}

fn parse_from_str<T: FromStr>(raw: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    raw.parse::<T>().map_err(|e| e.to_string())
}

fn parse_positive(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    match raw.to_ascii_lowercase().as_str() {
        "text" | "" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `text` or `json`".into()),
    }
}

/// Durations are written with a unit: `250ms`, `15s`, `2m`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "missing unit (use ms, s or m, e.g. `15s`)".to_string())?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a whole number followed by ms, s or m".to_string())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("unknown unit `{unit}` (use ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_bind_loopback() {
        let s = Settings::from_env(&env(&[])).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:4001");
        assert_eq!(s.shutdown_grace, Duration::from_secs(25));
    }

    #[test]
    fn every_bad_variable_is_reported() {
        let errors = Settings::from_env(&env(&[
            (ENV_LISTEN, "nope"),
            (ENV_SHUTDOWN_GRACE, "25"),
            (ENV_MAX_BODY_BYTES, "0"),
            (ENV_LOG_FORMAT, "xml"),
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with(ENV_LISTEN));
        assert!(errors.iter().any(|e| e.contains("missing unit")));
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }
}
