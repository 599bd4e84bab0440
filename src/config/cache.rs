//! The response cache's config: the sidecar-wide size bound and each route's policy, validated
//! at their field paths.

use super::compile::Errors;
use super::schema::{FlagValue, RawCache, RawRouteCache};
use crate::cache::{Mode, Policy};
use crate::env::parse_duration;

/// The cache's size when the config sets none.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The largest entry the shared tier takes when the config sets none: most chat answers fit.
pub const DEFAULT_SHARED_MAX_ENTRY_BYTES: u64 = 256 * 1024;
/// A static fallback is a short message, not a document.
const MAX_STATIC_FALLBACK: usize = 64 * 1024;

/// `64MiB`, `512KiB`, `1GiB`, `100MB`, `1000`: bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (use e.g. `64MiB`)"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB, GiB, kB, MB or GB)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

pub(super) fn compile_max_bytes(raw: &RawCache, errors: &mut Errors) -> u64 {
    compile_size(
        "cache.max_bytes",
        raw.max_bytes.as_ref(),
        DEFAULT_MAX_BYTES,
        errors,
    )
}

pub(super) fn compile_shared_max_entry_bytes(raw: &RawCache, errors: &mut Errors) -> u64 {
    compile_size(
        "cache.shared_max_entry_bytes",
        raw.shared_max_entry_bytes.as_ref(),
        DEFAULT_SHARED_MAX_ENTRY_BYTES,
        errors,
    )
}

/// A size above 0 at `path`, else `default` (and the error).
fn compile_size(path: &str, raw: Option<&FlagValue>, default: u64, errors: &mut Errors) -> u64 {
    let parsed = match raw {
        None => return default,
        Some(FlagValue::Int(n)) if *n > 0 => Ok(*n as u64),
        Some(FlagValue::Text(text)) => parse_bytes(text),
        Some(_) => Err("must be a size such as `64MiB`".to_string()),
    };
    match parsed {
        Ok(0) => {
            errors.push(path, "must be greater than 0");
            default
        }
        Ok(bytes) => bytes,
        Err(why) => {
            errors.push(path, why);
            default
        }
    }
}

pub(super) fn compile_route(
    path: &str,
    raw: Option<RawRouteCache>,
    errors: &mut Errors,
) -> Option<Policy> {
    let raw = raw?;
    let mut duration = |field: &str, text: &str| match parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => {
            errors.push(format!("{path}.cache.{field}"), "must be greater than 0");
            None
        }
        Ok(d) => Some(d),
        Err(why) => {
            errors.push(format!("{path}.cache.{field}"), why);
            None
        }
    };
    let ttl = duration("ttl", &raw.ttl);
    let max_stale = match &raw.max_stale {
        Some(text) => duration("max_stale", text),
        None => ttl,
    };
    let mode = match raw.mode.as_deref().map(str::trim) {
        None | Some("deterministic") => Some(Mode::Deterministic),
        Some("always") => Some(Mode::Always),
        Some(other) => {
            errors.push(
                format!("{path}.cache.mode"),
                format!("`{other}` is not a cache mode (use `deterministic` or `always`)"),
            );
            None
        }
    };
    let (ttl, max_stale, mode) = (ttl?, max_stale?, mode?);
    if max_stale < ttl {
        errors.push(
            format!("{path}.cache.max_stale"),
            "must be at least the ttl (an entry is kept until it is max_stale old)",
        );
        return None;
    }
    Some(Policy {
        ttl,
        max_stale,
        mode,
    })
}

pub(super) fn compile_static_fallback(
    path: &str,
    raw: Option<String>,
    errors: &mut Errors,
) -> Option<String> {
    let text = raw?;
    if text.trim().is_empty() {
        errors.push(
            format!("{path}.static_fallback"),
            "must be a message, or left out",
        );
        return None;
    }
    if text.len() > MAX_STATIC_FALLBACK {
        errors.push(format!("{path}.static_fallback"), "must be at most 64 KiB");
        return None;
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource};
    use std::collections::HashMap;
    use std::time::Duration;

    fn config(cache: &str, route: &str) -> String {
        format!(
            "{cache}
providers:
  sheep: {{ kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }}
routes:
  chat:
    relay: {{ provider: sheep, model: m }}
{route}
"
        )
    }

    #[test]
    fn a_route_cache_compiles_with_its_defaults() {
        let text = config(
            "cache: { max_bytes: 8MiB, shared_max_entry_bytes: 64KiB }",
            "    cache: { ttl: 10m, max_stale: 24h, mode: always }\n    static_fallback: 'Try again later.'",
        );
        let snapshot = compile(&text, ConfigSource::Embedded, 1, &HashMap::new()).unwrap();
        assert_eq!(snapshot.cache_max_bytes, 8 << 20);
        assert_eq!(snapshot.cache_shared_max_entry_bytes, 64 << 10);
        let route = snapshot.route("chat").unwrap();
        assert_eq!(
            route.cache,
            Some(Policy {
                ttl: Duration::from_secs(600),
                max_stale: Duration::from_secs(86_400),
                mode: Mode::Always,
            })
        );
        assert_eq!(route.static_fallback.as_deref(), Some("Try again later."));
        assert_eq!(
            snapshot.redacted_view()["routes"]["chat"]["cache"]["mode"],
            "always"
        );

        let text = config("", "    cache: { ttl: 30s }");
        let snapshot = compile(&text, ConfigSource::Embedded, 1, &HashMap::new()).unwrap();
        assert_eq!(snapshot.cache_max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(
            snapshot.cache_shared_max_entry_bytes,
            DEFAULT_SHARED_MAX_ENTRY_BYTES
        );
        let policy = snapshot.route("chat").unwrap().cache.unwrap();
        assert_eq!(
            policy.max_stale, policy.ttl,
            "max_stale defaults to the ttl"
        );
        assert_eq!(policy.mode, Mode::Deterministic);
        assert_eq!(
            snapshot.route("chat").unwrap().static_fallback,
            None,
            "off by default"
        );
    }

    #[test]
    fn bad_cache_settings_name_their_field() {
        for (cache, route, field) in [
            ("cache: { max_bytes: lots }", "", "cache.max_bytes"),
            ("cache: { max_bytes: 0 }", "", "cache.max_bytes"),
            ("cache: { max_bytes: -5 }", "", "cache.max_bytes"),
            (
                "cache: { shared_max_entry_bytes: 0 }",
                "",
                "cache.shared_max_entry_bytes",
            ),
            (
                "cache: { shared_max_entry_bytes: big }",
                "",
                "cache.shared_max_entry_bytes",
            ),
            ("", "    cache: { ttl: 0s }", "routes.chat.cache.ttl"),
            ("", "    cache: { ttl: soon }", "routes.chat.cache.ttl"),
            (
                "",
                "    cache: { ttl: 10m, max_stale: 1m }",
                "routes.chat.cache.max_stale",
            ),
            (
                "",
                "    cache: { ttl: 10m, mode: sometimes }",
                "routes.chat.cache.mode",
            ),
            (
                "",
                "    static_fallback: '  '",
                "routes.chat.static_fallback",
            ),
        ] {
            let text = config(cache, route);
            let err = compile(&text, ConfigSource::Embedded, 1, &HashMap::new()).unwrap_err();
            assert_eq!(err.0.len(), 1, "{text}: {err}");
            assert_eq!(err.0[0].path, field, "{text}: {err}");
        }
    }

    #[test]
    fn sizes_read_as_operators_write_them() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes(" 512KiB "), Ok(512 << 10));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("100MB"), Ok(100_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("64 mb").unwrap_err().contains("unit"));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("-1MiB").is_err());
        assert!(parse_bytes("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }
}
