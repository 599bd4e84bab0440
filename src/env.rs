//! Where process settings and provider keys come from: the environment (or a map in tests),
//! the names the Downward API sets, and the one duration syntax of settings and config.

use std::collections::HashMap;
use std::time::Duration;

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

/// Set by the Downward API (`fieldRef: metadata.namespace`).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Set by the Downward API (`fieldRef: metadata.name`); names this sidecar in Events.
pub const ENV_POD_NAME: &str = "POD_NAME";
/// The longest duration a setting or config field may hold. Deadlines and cooldowns are added
/// to clock readings on the request path, where a longer one would overflow (and panic).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Durations are written with a unit: `250ms`, `15s`, `2m`, `24h`; at most [`MAX_DURATION`].
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "missing unit (use ms, s, m or h, e.g. `15s`)".to_string())?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a whole number followed by ms, s, m or h".to_string())?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if duration > MAX_DURATION {
        return Err("must be at most 365 days (8760h)".into());
    }
    Ok(duration)
}

/// An environment made of `pairs`, for the settings tests here and in other modules.
#[cfg(test)]
pub(crate) fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
