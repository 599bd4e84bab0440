//! The routing config as written in YAML (file, ConfigMap or the embedded default), before
//! validation. Unknown fields are errors so a typo never silently does nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::providers::ProviderKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub holy_sheep_routing_enabled: Option<FlagValue>,
    #[serde(default)]
    pub holy_sheep_fallback_only: Option<FlagValue>,
    #[serde(default)]
    pub rollout_percent: Option<FlagValue>,
    #[serde(default)]
    pub shadow_percent: Option<FlagValue>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub default_route: Option<String>,
    pub providers: BTreeMap<String, RawProvider>,
    pub routes: BTreeMap<String, RawRoute>,
}

/// A flag as an operator may write it: `true`, `"True"`, `1`, `"25"`. How forgiving each flag is
/// is decided when it is compiled.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum FlagValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// How long to wait for an upstream's response headers, e.g. `15s`.
    #[serde(default)]
    pub response_headers: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: ProviderKind,
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<RawKeySource>,
}

/// `{ env: NAME }` or `{ file: PATH }`; exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeySource {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub context_window: Option<u64>,
    #[serde(default)]
    pub relay: Option<RawTarget>,
    #[serde(default)]
    pub official: Option<RawTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub provider: String,
    pub model: String,
}
