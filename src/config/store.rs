//! The one `ArcSwap` holding the current snapshot; every config source goes through
//! [`ConfigStore::apply`], so validation, counting and the swap happen in one place.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::{compile, ConfigError, ConfigSource, Snapshot};
use crate::settings::Env;
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
    apply_lock: Mutex<Option<Rejection>>,
    env: Arc<dyn Env + Send + Sync>,
    metrics: Arc<Metrics>,
}

impl ConfigStore {
    /// Compiles the initial config; an invalid one is an error the caller reports before serving.
    pub fn new(
        text: &str,
        source: ConfigSource,
        env: Arc<dyn Env + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> Result<ConfigStore, ConfigError> {
        let snapshot = compile(text, source.clone(), 1, env.as_ref())?;
        metrics.config_generation.set(1);
        metrics.record_reload(source.kind());
        Ok(ConfigStore {
            current: ArcSwap::from_pointee(snapshot),
            apply_lock: Mutex::new(None),
            env,
            metrics,
        })
    }

    /// The snapshot a request uses from start to end.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Validates and swaps in a new config, or keeps the current one and records why not.
    pub fn apply(&self, text: &str, source: ConfigSource) -> Result<u64, ConfigError> {
        let mut last_rejection = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let generation = self.current.load().generation + 1;
        match compile(text, source.clone(), generation, self.env.as_ref()) {
            Ok(snapshot) => {
                self.current.store(Arc::new(snapshot));
                self.metrics.config_generation.set(generation as i64);
                self.metrics.record_reload(source.kind());
                tracing::info!(generation, %source, "routing config applied");
                Ok(generation)
            }
            Err(err) => {
                self.metrics.record_rejection(source.kind());
                tracing::warn!(%source, reason = %err, "routing config rejected; the previous config keeps serving");
                *last_rejection = Some(Rejection {
                    source: source.to_string(),
                    reason: err.to_string(),
                    at: SystemTime::now(),
                });
                Err(err)
            }
        }
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        self.apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
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
