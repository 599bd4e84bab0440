//! Process settings read once at start from `LLM_SIDECAR_*` environment variables; every bad
//! variable is reported before the process exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use crate::env::{
    parse_duration, Env, ProcessEnv, ENV_POD_NAME, ENV_POD_NAMESPACE, MAX_DURATION,
};
pub use crate::telemetry::LogFormat;

pub const ENV_LISTEN: &str = "LLM_SIDECAR_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "LLM_SIDECAR_ADMIN_LISTEN";
pub const ENV_CONFIG: &str = "LLM_SIDECAR_CONFIG";
pub const ENV_CONFIG_POLL: &str = "LLM_SIDECAR_CONFIG_POLL";
pub const ENV_MAX_BODY_BYTES: &str = "LLM_SIDECAR_MAX_BODY_BYTES";
pub const ENV_MAX_CONCURRENCY: &str = "LLM_SIDECAR_MAX_CONCURRENCY";
pub const ENV_WORKERS: &str = "LLM_SIDECAR_WORKERS";
pub const ENV_HEADER_READ_TIMEOUT: &str = "LLM_SIDECAR_HEADER_READ_TIMEOUT";
pub const ENV_BODY_READ_TIMEOUT: &str = "LLM_SIDECAR_BODY_READ_TIMEOUT";
pub const ENV_CONNECT_TIMEOUT: &str = "LLM_SIDECAR_CONNECT_TIMEOUT";
pub const ENV_SHUTDOWN_GRACE: &str = "LLM_SIDECAR_SHUTDOWN_GRACE";
pub const ENV_LOG_FORMAT: &str = "LLM_SIDECAR_LOG_FORMAT";
pub const ENV_EXTRA_CA_FILE: &str = "LLM_SIDECAR_EXTRA_CA_FILE";
pub const ENV_CONFIGMAP: &str = "LLM_SIDECAR_CONFIGMAP";
pub const ENV_CONFIGMAP_STARTUP_TIMEOUT: &str = "LLM_SIDECAR_CONFIGMAP_STARTUP_TIMEOUT";
/// The ConfigMap's namespace when it is not the pod's own (one ConfigMap for a whole cluster,
/// in the chart's namespace).
pub const ENV_CONFIGMAP_NAMESPACE: &str = "LLM_SIDECAR_CONFIGMAP_NAMESPACE";
pub const ENV_KUBECONFIG: &str = "KUBECONFIG";
/// Present in every pod: the sign that the sidecar runs in a cluster.
pub const ENV_KUBERNETES_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
/// Redis shared by every sidecar, for budgets and the cache's shared tier: `redis://` or
/// `rediss://`, a password in the URL or in the file below. Unset: budgets and the cache are per
/// sidecar, in memory.
pub const ENV_REDIS_URL: &str = "LLM_SIDECAR_REDIS_URL";
/// A file (a mounted Secret) holding the Redis password; it wins over one in the URL.
pub const ENV_REDIS_PASSWORD_FILE: &str = "LLM_SIDECAR_REDIS_PASSWORD_FILE";
/// How long one Redis call may take before Redis counts as down (default 50ms).
pub const ENV_REDIS_TIMEOUT: &str = "LLM_SIDECAR_REDIS_TIMEOUT";
/// The ConfigMap watched in a pod when `LLM_SIDECAR_CONFIGMAP` is not set.
pub const DEFAULT_CONFIGMAP: &str = "llm-sidecar";

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub config_path: Option<PathBuf>,
    pub config_poll: Duration,
    pub max_body_bytes: usize,
    pub max_concurrency: usize,
    /// Threads serving the data port, each with its own single-threaded runtime.
    pub workers: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// The ConfigMap to watch, when there is one.
    pub kube: Option<KubeSettings>,
    /// `HOLY_SHEEP_ENABLED`: forces the routing flag over every config source.
    pub holy_sheep_enabled: Option<bool>,
    /// Trace export, from the standard `OTEL_*` variables; `None` when no endpoint is set.
    pub otel: Option<crate::telemetry::otel::OtelSettings>,
    /// PEM certificates trusted for provider TLS in addition to the bundled web roots.
    pub extra_ca_file: Option<PathBuf>,
    /// The budgets' shared store; `None`: budgets are per sidecar, in memory.
    pub redis: Option<crate::redis_link::RedisSettings>,
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
            workers: default_workers(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(25),
            log_format: LogFormat::Text,
            extra_ca_file: None,
            kube: None,
            holy_sheep_enabled: None,
            otel: None,
            redis: None,
        }
    }
}

/// `LLM_SIDECAR_REDIS_*`; the password file is read now. No error shows the URL's password.
fn redis_settings(
    env: &dyn Env,
    errors: &mut Vec<String>,
) -> Option<crate::redis_link::RedisSettings> {
    let mut timeout = Duration::from_millis(50);
    read(env, ENV_REDIS_TIMEOUT, errors, parse_duration, &mut timeout);
    if timeout.is_zero() || timeout > Duration::from_secs(5) {
        errors.push(format!(
            "{ENV_REDIS_TIMEOUT}: must be more than 0 and at most 5s (a request may wait this long)"
        ));
    }
    let url = env.get(ENV_REDIS_URL).map(|u| u.trim().to_string());
    let file = env
        .get(ENV_REDIS_PASSWORD_FILE)
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty());
    let url = match url.filter(|u| !u.is_empty()) {
        Some(url) => url,
        None => {
            if file.is_some() {
                errors.push(format!(
                    "{ENV_REDIS_PASSWORD_FILE} is set but {ENV_REDIS_URL} is not"
                ));
            }
            return None;
        }
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        errors.push(format!(
            "{ENV_REDIS_URL}={:?}: must start with redis:// or rediss://",
            crate::redis_link::redacted_url(&url)
        ));
        return None;
    }
    let password = match file {
        None => None,
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => Some(text.trim_end_matches(['\r', '\n']).to_string()),
            Err(err) => {
                errors.push(format!(
                    "{ENV_REDIS_PASSWORD_FILE}={path:?}: cannot read: {err}"
                ));
                None
            }
        },
    };
    Some(crate::redis_link::RedisSettings {
        url,
        password,
        timeout,
    })
}

/// Where the routing ConfigMap is and how to reach the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSettings {
    pub configmap: String,
    /// From `LLM_SIDECAR_CONFIGMAP_NAMESPACE`, else `POD_NAMESPACE`; otherwise the
    /// service-account namespace file or the kubeconfig context decides.
    pub namespace: Option<String>,
    /// From `KUBECONFIG` (local development); otherwise in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// How long `/ready` waits for the first ConfigMap snapshot before the file or embedded
    /// config serves instead.
    pub startup_timeout: Duration,
    /// This sidecar's name in Events: the pod name, else the host name.
    pub instance: String,
}

/// The ConfigMap watch is on in a pod (`KUBERNETES_SERVICE_HOST` is set) or when
/// `LLM_SIDECAR_CONFIGMAP` names a ConfigMap; `LLM_SIDECAR_CONFIGMAP=off` turns it off.
fn kube_settings(env: &dyn Env, errors: &mut Vec<String>) -> Option<KubeSettings> {
    let named = env.get(ENV_CONFIGMAP).map(|v| v.trim().to_string());
    let configmap = match named.as_deref() {
        Some("off") | Some("") => return None,
        Some(name) => {
            let valid = name.len() <= 253
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid {
                errors.push(format!(
                    "{ENV_CONFIGMAP}={name:?}: not a ConfigMap name (lowercase letters, digits, '-' and '.'), or `off`"
                ));
                return None;
            }
            name.to_string()
        }
        None if env.get(ENV_KUBERNETES_SERVICE_HOST).is_some() => DEFAULT_CONFIGMAP.to_string(),
        None => return None,
    };
    let mut startup_timeout = Duration::from_secs(10);
    read(
        env,
        ENV_CONFIGMAP_STARTUP_TIMEOUT,
        errors,
        parse_duration,
        &mut startup_timeout,
    );
    let nonempty = |key: &str| {
        env.get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    Some(KubeSettings {
        configmap,
        namespace: nonempty(ENV_CONFIGMAP_NAMESPACE).or_else(|| nonempty(ENV_POD_NAMESPACE)),
        kubeconfig: nonempty(ENV_KUBECONFIG).map(PathBuf::from),
        startup_timeout,
        instance: nonempty(ENV_POD_NAME)
            .or_else(|| nonempty("HOSTNAME"))
            .unwrap_or_else(|| "llm-sidecar".to_string()),
    })
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
        read(env, ENV_WORKERS, &mut errors, parse_workers, &mut s.workers);
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
        s.kube = kube_settings(env, &mut errors);
        s.otel = crate::telemetry::otel::from_env(env, &mut errors);
        s.redis = redis_settings(env, &mut errors);
        match crate::config::layers::env_override(env) {
            Ok(v) => s.holy_sheep_enabled = v,
            Err(why) => errors.push(why),
        }
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

/// One data-port worker per CPU the process may use (the cgroup quota counts).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_workers(raw: &str) -> Result<usize, String> {
    match parse_positive(raw)? {
        n if n > MAX_WORKERS => Err(format!("must be at most {MAX_WORKERS}")),
        n => Ok(n),
    }
}

const MAX_WORKERS: usize = 256;

fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    match raw.to_ascii_lowercase().as_str() {
        "text" | "" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `text` or `json`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::env_of as env;

    #[test]
    fn defaults_bind_loopback() {
        let s = Settings::from_env(&env(&[])).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:4001");
        assert_eq!(s.shutdown_grace, Duration::from_secs(25));
        assert!(s.workers >= 1);
        let two = Settings::from_env(&env(&[(ENV_WORKERS, "2")])).unwrap();
        assert_eq!(two.workers, 2);
    }

    #[test]
    fn every_bad_variable_is_reported() {
        let errors = Settings::from_env(&env(&[
            (ENV_LISTEN, "nope"),
            (ENV_SHUTDOWN_GRACE, "25"),
            (ENV_MAX_BODY_BYTES, "0"),
            (ENV_LOG_FORMAT, "xml"),
            (ENV_WORKERS, "100000"),
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("at most 256")));
        assert!(errors[0].starts_with(ENV_LISTEN));
        assert!(errors.iter().any(|e| e.contains("missing unit")));
    }

    #[test]
    fn configmap_watch_is_on_in_a_pod_or_when_named_and_off_on_request() {
        assert_eq!(Settings::from_env(&env(&[])).unwrap().kube, None);
        let in_pod = Settings::from_env(&env(&[
            (ENV_KUBERNETES_SERVICE_HOST, "10.0.0.1"),
            (ENV_POD_NAMESPACE, "apps"),
            (ENV_POD_NAME, "app-1"),
        ]))
        .unwrap()
        .kube
        .unwrap();
        assert_eq!(in_pod.configmap, DEFAULT_CONFIGMAP);
        assert_eq!(in_pod.namespace.as_deref(), Some("apps"));
        assert_eq!(in_pod.instance, "app-1");
        assert_eq!(in_pod.kubeconfig, None);
        assert_eq!(in_pod.startup_timeout, Duration::from_secs(10));

        let named = Settings::from_env(&env(&[
            (ENV_CONFIGMAP, "routing"),
            (ENV_KUBECONFIG, "dev.kubeconfig"),
            (ENV_CONFIGMAP_STARTUP_TIMEOUT, "2s"),
        ]))
        .unwrap()
        .kube
        .unwrap();
        assert_eq!(named.configmap, "routing");
        assert_eq!(named.namespace, None, "left to the kubeconfig context");
        assert_eq!(named.startup_timeout, Duration::from_secs(2));

        let off = Settings::from_env(&env(&[
            (ENV_KUBERNETES_SERVICE_HOST, "10.0.0.1"),
            (ENV_CONFIGMAP, "off"),
        ]))
        .unwrap();
        assert_eq!(off.kube, None);

        let central = Settings::from_env(&env(&[
            (ENV_KUBERNETES_SERVICE_HOST, "10.0.0.1"),
            (ENV_POD_NAMESPACE, "apps"),
            (ENV_CONFIGMAP_NAMESPACE, "llm-sidecar"),
        ]))
        .unwrap()
        .kube
        .unwrap();
        assert_eq!(central.namespace.as_deref(), Some("llm-sidecar"));
    }

    #[test]
    fn bad_configmap_name_and_bad_override_stop_the_start() {
        let errors = Settings::from_env(&env(&[
            (ENV_CONFIGMAP, "Routing_Config"),
            ("HOLY_SHEEP_ENABLED", "perhaps"),
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with(ENV_CONFIGMAP)));
        assert!(errors.iter().any(|e| e.starts_with("HOLY_SHEEP_ENABLED")));
        let forced = Settings::from_env(&env(&[("HOLY_SHEEP_ENABLED", "false")])).unwrap();
        assert_eq!(forced.holy_sheep_enabled, Some(false));
    }

    #[test]
    fn redis_settings_read_the_password_file_and_never_show_the_password() {
        assert!(Settings::from_env(&env(&[])).unwrap().redis.is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from-file-s3cret\n").unwrap();
        let path = file.to_string_lossy().to_string();
        let s = Settings::from_env(&env(&[
            (ENV_REDIS_URL, "rediss://:url-s3cret@redis.example:6380/1"),
            (ENV_REDIS_PASSWORD_FILE, &path),
            (ENV_REDIS_TIMEOUT, "20ms"),
        ]))
        .unwrap();
        let redis = s.redis.clone().unwrap();
        assert_eq!(redis.password.as_deref(), Some("from-file-s3cret"));
        assert_eq!(redis.timeout, Duration::from_millis(20));
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            Settings::from_env(&env(&[(ENV_REDIS_URL, "redis://127.0.0.1:6379")]))
                .unwrap()
                .redis
                .unwrap()
                .timeout,
            Duration::from_millis(50)
        );
        let errors = Settings::from_env(&env(&[
            (ENV_REDIS_URL, "http://:url-s3cret@redis:6379"),
            (ENV_REDIS_TIMEOUT, "0ms"),
        ]))
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(!errors.join(" ").contains("s3cret"), "{errors:?}");
        let errors = Settings::from_env(&env(&[
            (ENV_REDIS_URL, "redis://h:1"),
            (ENV_REDIS_PASSWORD_FILE, "/nonexistent/password"),
        ]))
        .unwrap_err();
        assert!(errors[0].starts_with(ENV_REDIS_PASSWORD_FILE), "{errors:?}");
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
        // Up to a year; past it (and past u64 minutes) an error, not an overflow.
        assert_eq!(parse_duration("525600m"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        for long in [
            "525601m",
            "8761h",
            "307445734561825861m",
            "18446744073709551615s",
            "18446744073709551615h",
        ] {
            let err = parse_duration(long).unwrap_err();
            assert!(err.contains("at most 365 days"), "{long}: {err}");
        }
    }
}
