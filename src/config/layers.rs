//! The layers an effective config is built from, highest precedence first:
//!
//! 1. the emergency env override `HOLY_SHEEP_ENABLED` (forces the routing flag),
//! 2. the watched ConfigMap: flat flag keys, then the routing YAML under `config.yaml`,
//! 3. the config file (`--config` / `LLM_SIDECAR_CONFIG`),
//! 4. the embedded default.
//!
//! A ConfigMap without `config.yaml` only overrides flags on top of the file or embedded
//! routing; flag keys override the same flags inside whichever YAML is used.

use std::collections::BTreeMap;

use super::schema::FlagValue;
use super::{
    compile_raw, parse, parse_bool_flag, parse_percent_flag, ConfigError, ConfigSource, FieldError,
    Snapshot,
};
use crate::env::Env;

/// The ConfigMap key holding the routing YAML.
pub const ROUTING_KEY: &str = "config.yaml";

/// The flag keys a ConfigMap may set, as an operator flips them with `kubectl patch`.
pub const FLAG_KEYS: [&str; 4] = [
    "holy_sheep_routing_enabled",
    "holy_sheep_fallback_only",
    "rollout_percent",
    "shadow_percent",
];

/// The env variable of the migration playbook's emergency rollback
/// (`kubectl set env deployment/ai-service HOLY_SHEEP_ENABLED="false"`).
pub const ENV_OVERRIDE: &str = "HOLY_SHEEP_ENABLED";

/// Where each flag's effective value came from, for `/config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlagOrigins {
    pub holy_sheep_routing_enabled: &'static str,
    pub holy_sheep_fallback_only: &'static str,
    pub rollout_percent: &'static str,
    pub shadow_percent: &'static str,
}

impl FlagOrigins {
    pub fn all(origin: &'static str) -> FlagOrigins {
        FlagOrigins {
            holy_sheep_routing_enabled: origin,
            holy_sheep_fallback_only: origin,
            rollout_percent: origin,
            shadow_percent: origin,
        }
    }

    fn set(&mut self, key: &str, origin: &'static str) {
        match key {
            "holy_sheep_routing_enabled" => self.holy_sheep_routing_enabled = origin,
            "holy_sheep_fallback_only" => self.holy_sheep_fallback_only = origin,
            "rollout_percent" => self.rollout_percent = origin,
            "shadow_percent" => self.shadow_percent = origin,
            _ => {}
        }
    }
}

/// The validated content of a ConfigMap: its routing YAML (if any) and its flag keys, each
/// flag already checked (forgiving booleans, strict percentages).
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigMapLayer {
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub routing: Option<String>,
    pub flags: BTreeMap<&'static str, FlagSetting>,
}

/// One flag key's value, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagSetting {
    Bool(bool),
    Percent(u8),
}

impl FlagSetting {
    fn to_raw(self) -> FlagValue {
        match self {
            FlagSetting::Bool(b) => FlagValue::Bool(b),
            FlagSetting::Percent(p) => FlagValue::Int(i64::from(p)),
        }
    }
}

impl ConfigMapLayer {
    /// Checks a ConfigMap's `data`: every key must be a flag or `config.yaml`, every flag value
    /// valid. All problems are reported at once, each at `data.<key>`.
    pub fn from_data(
        namespace: &str,
        name: &str,
        resource_version: Option<String>,
        data: &BTreeMap<String, String>,
    ) -> Result<ConfigMapLayer, ConfigError> {
        let mut errors = Vec::new();
        let mut flags = BTreeMap::new();
        let mut routing = None;
        for (key, value) in data {
            let path = format!("data.{key}");
            if key == ROUTING_KEY {
                if value.trim().is_empty() {
                    errors.push(FieldError {
                        path,
                        message: "is empty: remove the key to use the file or embedded routing"
                            .into(),
                    });
                } else {
                    routing = Some(value.clone());
                }
                continue;
            }
            let Some(flag) = FLAG_KEYS.iter().find(|k| **k == key.as_str()) else {
                errors.push(FieldError {
                    path,
                    message: format!(
                        "unknown key (expected one of {}, {ROUTING_KEY})",
                        FLAG_KEYS.join(", ")
                    ),
                });
                continue;
            };
            let text = FlagValue::Text(value.clone());
            let parsed = if flag.ends_with("_percent") {
                parse_percent_flag(&text).map(FlagSetting::Percent)
            } else {
                parse_bool_flag(&text).map(FlagSetting::Bool)
            };
            match parsed {
                Ok(setting) => {
                    flags.insert(*flag, setting);
                }
                Err(message) => errors.push(FieldError { path, message }),
            }
        }
        if errors.is_empty() {
            Ok(ConfigMapLayer {
                namespace: namespace.to_string(),
                name: name.to_string(),
                resource_version,
                routing,
                flags,
            })
        } else {
            Err(ConfigError(errors))
        }
    }

    /// Same routing and flags (the resource version aside): applying it again changes nothing.
    pub fn same_content(&self, other: &ConfigMapLayer) -> bool {
        self.routing == other.routing && self.flags == other.flags
    }

    pub fn source(&self) -> ConfigSource {
        ConfigSource::ConfigMap {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// Everything the effective config is built from.
#[derive(Clone, Debug)]
pub struct Layers {
    pub base_text: String,
    pub base_source: ConfigSource,
    pub configmap: Option<ConfigMapLayer>,
    pub env_override: Option<bool>,
}

impl Layers {
    /// Compiles the layers into one snapshot, or says why they do not make a valid config.
    pub fn compile(&self, generation: u64, env: &dyn Env) -> Result<Snapshot, ConfigError> {
        let (text, source) = match self.configmap.as_ref() {
            Some(cm) => match &cm.routing {
                Some(routing) => (routing.as_str(), cm.source()),
                None => (self.base_text.as_str(), self.base_source.clone()),
            },
            None => (self.base_text.as_str(), self.base_source.clone()),
        };
        let mut origins = FlagOrigins::all(source.kind());
        let mut raw = parse(text).map_err(|e| prefix_routing_errors(e, self.configmap.as_ref()))?;
        if let Some(cm) = &self.configmap {
            for (key, setting) in &cm.flags {
                let value = Some(setting.to_raw());
                match *key {
                    "holy_sheep_routing_enabled" => raw.holy_sheep_routing_enabled = value,
                    "holy_sheep_fallback_only" => raw.holy_sheep_fallback_only = value,
                    "rollout_percent" => raw.rollout_percent = value,
                    "shadow_percent" => raw.shadow_percent = value,
                    _ => continue,
                }
                origins.set(key, "configmap");
            }
        }
        let mut snapshot = compile_raw(raw, source, generation, env)
            .map_err(|e| prefix_routing_errors(e, self.configmap.as_ref()))?;
        if let Some(enabled) = self.env_override {
            snapshot.flags.holy_sheep_routing_enabled = enabled;
            origins.holy_sheep_routing_enabled = "env";
        }
        snapshot.flag_origins = origins;
        Ok(snapshot)
    }
}

/// Errors in a ConfigMap's routing YAML are reported under its key, e.g.
/// `data.config.yaml: routes.chat.relay: ...`.
fn prefix_routing_errors(err: ConfigError, configmap: Option<&ConfigMapLayer>) -> ConfigError {
    match configmap {
        Some(cm) if cm.routing.is_some() => ConfigError(
            err.0
                .into_iter()
                .map(|e| FieldError {
                    path: if e.path.is_empty() {
                        format!("data.{ROUTING_KEY}")
                    } else {
                        format!("data.{ROUTING_KEY}: {}", e.path)
                    },
                    message: e.message,
                })
                .collect(),
        ),
        _ => err,
    }
}

/// What `check-config` validates: a routing config, or a ConfigMap manifest (`kind: ConfigMap`)
/// whose keys and routing YAML are checked as the sidecar would apply them (a flags-only
/// ConfigMap on top of the embedded default).
pub fn check(text: &str, source: ConfigSource, env: &dyn Env) -> Result<Snapshot, ConfigError> {
    let manifest: Option<serde_yaml::Value> = serde_yaml::from_str(text).ok();
    let is_configmap = manifest
        .as_ref()
        .and_then(|m| m.get("kind"))
        .and_then(|k| k.as_str())
        == Some("ConfigMap");
    let Some(manifest) = manifest.filter(|_| is_configmap) else {
        return super::compile(text, source, 1, env);
    };
    let meta = |field: &str| {
        manifest
            .get("metadata")
            .and_then(|m| m.get(field))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let mut data = BTreeMap::new();
    let mut errors = Vec::new();
    if let Some(map) = manifest.get("data").and_then(|d| d.as_mapping()) {
        for (key, value) in map {
            // A key YAML reads as a number or boolean (`0:`, `true:`) is named by its value.
            let key = match key {
                serde_yaml::Value::String(key) => key.clone(),
                other => serde_yaml::to_string(other)
                    .map(|text| text.trim_end().to_string())
                    .unwrap_or_default(),
            };
            match value.as_str() {
                Some(v) => {
                    data.insert(key, v.to_string());
                }
                None => errors.push(FieldError {
                    path: format!("data.{key}"),
                    message: "ConfigMap values must be strings: quote it".into(),
                }),
            }
        }
    }
    let layer = ConfigMapLayer::from_data(&meta("namespace"), &meta("name"), None, &data);
    match layer {
        Err(ConfigError(mut more)) => {
            errors.append(&mut more);
            Err(ConfigError(errors))
        }
        Ok(_) if !errors.is_empty() => Err(ConfigError(errors)),
        Ok(layer) => Layers {
            base_text: super::EMBEDDED_DEFAULT.to_string(),
            base_source: ConfigSource::Embedded,
            configmap: Some(layer),
            env_override: None,
        }
        .compile(1, env),
    }
}

/// Reads `HOLY_SHEEP_ENABLED`; unset or empty means no override.
pub fn env_override(env: &dyn Env) -> Result<Option<bool>, String> {
    match env.get(ENV_OVERRIDE) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => parse_bool_flag(&FlagValue::Text(v.clone()))
            .map(Some)
            .map_err(|why| format!("{ENV_OVERRIDE}={v:?}: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EMBEDDED_DEFAULT;
    use std::collections::HashMap;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn layers(cm: Option<ConfigMapLayer>, env_override: Option<bool>) -> Layers {
        Layers {
            base_text: EMBEDDED_DEFAULT.to_string(),
            base_source: ConfigSource::Embedded,
            configmap: cm,
            env_override,
        }
    }

    #[test]
    fn flag_keys_are_forgiving_for_booleans_and_strict_for_percentages() {
        for yes in ["true", "True", "1", " TRUE "] {
            let cm = ConfigMapLayer::from_data(
                "ns",
                "cm",
                None,
                &data(&[("holy_sheep_routing_enabled", yes)]),
            )
            .unwrap();
            assert_eq!(
                cm.flags["holy_sheep_routing_enabled"],
                FlagSetting::Bool(true)
            );
        }
        let err = ConfigMapLayer::from_data(
            "ns",
            "cm",
            None,
            &data(&[
                ("rollout_percent", "150"),
                ("shadow_percent", "ten"),
                ("holy_sheep_routing_enable", "false"),
                ("holy_sheep_fallback_only", "maybe"),
            ]),
        )
        .unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "data.holy_sheep_fallback_only",
                "data.holy_sheep_routing_enable",
                "data.rollout_percent",
                "data.shadow_percent"
            ]
        );
        assert!(err.to_string().contains("150 is out of range"), "{err}");
    }

    #[test]
    fn precedence_is_env_then_configmap_keys_then_configmap_yaml_then_base() {
        let env = HashMap::<String, String>::new();
        // Flags only: the embedded routing with the ConfigMap's flag on top.
        let flags_only = ConfigMapLayer::from_data(
            "ns",
            "cm",
            None,
            &data(&[("holy_sheep_routing_enabled", "false")]),
        )
        .unwrap();
        let snap = layers(Some(flags_only.clone()), None)
            .compile(2, &env)
            .unwrap();
        assert!(!snap.flags.holy_sheep_routing_enabled);
        assert_eq!(snap.source, ConfigSource::Embedded);
        assert_eq!(snap.flag_origins.holy_sheep_routing_enabled, "configmap");
        assert_eq!(snap.flag_origins.rollout_percent, "embedded");

        // A key beats the same flag inside the ConfigMap's own YAML.
        let yaml = EMBEDDED_DEFAULT.replace("rollout_percent: 100", "rollout_percent: 40");
        let both = ConfigMapLayer::from_data(
            "ns",
            "cm",
            None,
            &data(&[("config.yaml", &yaml), ("rollout_percent", "25")]),
        )
        .unwrap();
        let snap = layers(Some(both), None).compile(3, &env).unwrap();
        assert_eq!(snap.flags.rollout_percent, 25);
        assert_eq!(
            snap.source,
            ConfigSource::ConfigMap {
                namespace: "ns".into(),
                name: "cm".into()
            }
        );

        // The env override beats everything.
        let enabled = ConfigMapLayer::from_data(
            "ns",
            "cm",
            None,
            &data(&[("holy_sheep_routing_enabled", "true")]),
        )
        .unwrap();
        let snap = layers(Some(enabled), Some(false)).compile(4, &env).unwrap();
        assert!(!snap.flags.holy_sheep_routing_enabled);
        assert_eq!(snap.flag_origins.holy_sheep_routing_enabled, "env");
    }

    #[test]
    fn errors_in_configmap_yaml_name_the_key() {
        let yaml = EMBEDDED_DEFAULT.replace("provider: deepseek", "provider: nosuch");
        let cm =
            ConfigMapLayer::from_data("ns", "cm", None, &data(&[("config.yaml", &yaml)])).unwrap();
        let err = layers(Some(cm), None)
            .compile(2, &HashMap::<String, String>::new())
            .unwrap_err();
        assert!(
            err.0[0].path.starts_with("data.config.yaml: routes."),
            "{err}"
        );
    }

    #[test]
    fn check_validates_configmap_manifests_as_the_watch_would() {
        let env = HashMap::<String, String>::new();
        let good = "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: llm-sidecar, namespace: apps }\ndata:\n  holy_sheep_routing_enabled: \"false\"\n";
        let snap = check(good, ConfigSource::Embedded, &env).unwrap();
        assert!(!snap.flags.holy_sheep_routing_enabled);
        let bad = "kind: ConfigMap\nmetadata: { name: x }\ndata:\n  rollout_percent: 25\n  shadow_percent: \"150\"\n";
        let err = check(bad, ConfigSource::Embedded, &env).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.0[0].message.contains("must be strings"), "{err}");
        assert!(err.0[1].message.contains("out of range"), "{err}");
        // A key that YAML reads as a number is named by its value.
        let numbered = "kind: ConfigMap\ndata:\n  0: null\n";
        let err = check(numbered, ConfigSource::Embedded, &env).unwrap_err();
        assert_eq!(err.0[0].path, "data.0", "{err}");
        // Anything else is a routing config.
        assert!(check(EMBEDDED_DEFAULT, ConfigSource::Embedded, &env).is_ok());
    }

    #[test]
    fn env_override_parses_like_a_flag() {
        let mut env = HashMap::new();
        assert_eq!(env_override(&env), Ok(None));
        env.insert(ENV_OVERRIDE.to_string(), "false".to_string());
        assert_eq!(env_override(&env), Ok(Some(false)));
        env.insert(ENV_OVERRIDE.to_string(), "nope".to_string());
        assert!(env_override(&env)
            .unwrap_err()
            .contains("HOLY_SHEEP_ENABLED"));
    }
}
