//! The one `ArcSwap` holding the current snapshot; every config source goes through
//! [`ConfigStore::apply`], so validation, counting and the swap happen in one place. The
//! sources live here too: the file poll (`reload`) and the ConfigMap watch (`configmap`).

pub mod configmap;
pub mod reload;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::layers::{ConfigMapLayer, Layers};
use crate::config::{ConfigError, ConfigSource, Snapshot};
use crate::env::Env;
use crate::telemetry::metrics::Metrics;

/// The last rejected update, for `/config`.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub source: String,
    pub reason: String,
    pub at: SystemTime,
}

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    // Serialises updates so generations are handed out in order and never skipped.
    state: Mutex<State>,
    env: Arc<dyn Env + Send + Sync>,
    metrics: Arc<Metrics>,
}

struct State {
    layers: Layers,
    last_rejection: Option<Rejection>,
}

/// What an accepted update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A new snapshot with this generation is serving.
    Swapped(u64),
    /// The update had the same content as the current layer: nothing changed.
    Unchanged,
}

impl ConfigStore {
    /// Compiles the initial config; an invalid one is an error the caller reports before serving.
    pub fn new(
        text: &str,
        source: ConfigSource,
        env: Arc<dyn Env + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> Result<ConfigStore, ConfigError> {
        Self::with_override(text, source, None, env, metrics)
    }

    /// Like [`ConfigStore::new`], with the `HOLY_SHEEP_ENABLED` override applied to every
    /// snapshot, whatever the file or ConfigMap say.
    pub fn with_override(
        text: &str,
        source: ConfigSource,
        env_override: Option<bool>,
        env: Arc<dyn Env + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> Result<ConfigStore, ConfigError> {
        let layers = Layers {
            base_text: text.to_string(),
            base_source: source.clone(),
            configmap: None,
            env_override,
        };
        let snapshot = layers.compile(1, env.as_ref())?;
        metrics.config_generation.set(1);
        metrics.record_reload(source.kind());
        if env_override.is_some() {
            tracing::warn!(
                holy_sheep_routing_enabled = env_override,
                "HOLY_SHEEP_ENABLED is set: it overrides the routing flag of every config source"
            );
        }
        Ok(ConfigStore {
            current: ArcSwap::from_pointee(snapshot),
            state: Mutex::new(State {
                layers,
                last_rejection: None,
            }),
            env,
            metrics,
        })
    }

    /// The snapshot a request uses from start to end.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new file (or embedded) text: validated and swapped in, or rejected with the previous
    /// config still serving. While a ConfigMap supplies the routing YAML the file only matters
    /// if that key is removed, but it is still validated now.
    pub fn apply(&self, text: &str, source: ConfigSource) -> Result<u64, ConfigError> {
        let mut state = self.locked();
        let mut layers = state.layers.clone();
        layers.base_text = text.to_string();
        layers.base_source = source.clone();
        let shadowed = layers
            .configmap
            .as_ref()
            .is_some_and(|cm| cm.routing.is_some());
        let checked = if shadowed {
            crate::config::compile(text, source.clone(), 0, self.env.as_ref()).map(|_| ())
        } else {
            Ok(())
        };
        let result = checked.and_then(|()| self.swap(&mut state, layers, &source));
        result.map(|applied| match applied {
            Applied::Swapped(generation) => generation,
            Applied::Unchanged => self.current.load().generation,
        })
    }

    /// A new ConfigMap content, already read from the API. Identical content (a relist, a
    /// metadata-only change) is acknowledged without a new generation.
    pub fn apply_configmap(&self, layer: ConfigMapLayer) -> Result<Applied, ConfigError> {
        let mut state = self.locked();
        if let Some(current) = state.layers.configmap.as_mut() {
            if current.same_content(&layer) {
                current.resource_version = layer.resource_version;
                return Ok(Applied::Unchanged);
            }
        }
        let source = layer.source();
        let mut layers = state.layers.clone();
        layers.configmap = Some(layer);
        self.swap(&mut state, layers, &source)
    }

    /// Records a rejection that happened before the store saw the update (a ConfigMap whose
    /// keys are invalid), so it is counted and shown like any other.
    pub fn reject(&self, source: &ConfigSource, err: &ConfigError) {
        let mut state = self.locked();
        self.record_rejection(&mut state, source, err);
    }

    fn swap(
        &self,
        state: &mut State,
        layers: Layers,
        source: &ConfigSource,
    ) -> Result<Applied, ConfigError> {
        let generation = self.current.load().generation + 1;
        match layers.compile(generation, self.env.as_ref()) {
            Ok(snapshot) => {
                state.layers = layers;
                self.current.store(Arc::new(snapshot));
                self.metrics.config_generation.set(generation as i64);
                self.metrics.record_reload(source.kind());
                tracing::info!(generation, %source, "routing config applied");
                Ok(Applied::Swapped(generation))
            }
            Err(err) => {
                self.record_rejection(state, source, &err);
                Err(err)
            }
        }
    }

    fn record_rejection(&self, state: &mut State, source: &ConfigSource, err: &ConfigError) {
        self.metrics.record_rejection(source.kind());
        tracing::warn!(%source, reason = %err, "routing config rejected; the previous config keeps serving");
        state.last_rejection = Some(Rejection {
            source: source.to_string(),
            reason: err.to_string(),
            at: SystemTime::now(),
        });
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        self.locked().last_rejection.clone()
    }

    /// The ConfigMap layer in effect (the last good one), if any.
    pub fn configmap_layer(&self) -> Option<ConfigMapLayer> {
        self.locked().layers.configmap.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EMBEDDED_DEFAULT;
    use prometheus_client::registry::Registry;
    use std::collections::HashMap;

    fn store() -> ConfigStore {
        let metrics = Arc::new(Metrics::register(&mut Registry::default()));
        ConfigStore::new(
            EMBEDDED_DEFAULT,
            ConfigSource::Embedded,
            Arc::new(HashMap::<String, String>::new()),
            metrics,
        )
        .unwrap()
    }

    #[test]
    fn valid_update_bumps_generation_and_invalid_keeps_last_good() {
        let store = store();
        let held = store.load();
        let flipped = EMBEDDED_DEFAULT.replace(
            "holy_sheep_routing_enabled: true",
            "holy_sheep_routing_enabled: false",
        );
        assert_eq!(store.apply(&flipped, ConfigSource::Embedded), Ok(2));
        assert!(!store.load().flags.holy_sheep_routing_enabled);
        // A request that loaded the old snapshot keeps it, whole.
        assert!(held.flags.holy_sheep_routing_enabled);
        assert_eq!(held.generation, 1);

        let broken = flipped.replace("rollout_percent: 100", "rollout_percent: 150");
        let err = store.apply(&broken, ConfigSource::Embedded).unwrap_err();
        assert_eq!(err.0[0].path, "rollout_percent");
        assert_eq!(store.load().generation, 2);
        assert!(!store.load().flags.holy_sheep_routing_enabled);
        let rejection = store.last_rejection().unwrap();
        assert!(
            rejection.reason.contains("out of range"),
            "{}",
            rejection.reason
        );
        assert_eq!(store.metrics.config_generation.get(), 2);
    }
}
