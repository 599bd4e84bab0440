//! The third link: complete answers kept by request, served fresh while their route's `ttl`
//! lasts, served stale (and marked so) when every target failed, and one upstream call for
//! identical concurrent requests. No answer is ever made up: only complete successes are kept.
//! With Redis, a shared tier behind each sidecar's cache lets replicas share hits (`tier.rs`).

pub mod answer;
pub mod flight;
pub mod key;
pub mod store;
pub mod tier;

pub use answer::{Assembler, Stored};
pub use flight::{Flights, Joined, Landed, Leader, Waiter};
pub use key::{Key, Mode};
pub use store::{Cache, Entry, Lookup, Policy};
pub use tier::SharedTier;

use std::sync::Arc;

/// The process's cache and its flights, kept across config reloads; the cache is built anew
/// (empty) only when the config's size bound changes. The shared tier, when there is one, is
/// the process's too.
pub struct Shared {
    cache: arc_swap::ArcSwap<(u64, Arc<Cache>)>,
    pub flights: Arc<Flights>,
    evicted: Arc<dyn Fn() + Send + Sync>,
    tier: Option<Arc<SharedTier>>,
}

impl Shared {
    /// `evicted` runs for each answer dropped for room or for age; `tier` is the shared tier
    /// in Redis, `None` without `LLM_SIDECAR_REDIS_URL`.
    pub fn new(
        max_bytes: u64,
        evicted: Arc<dyn Fn() + Send + Sync>,
        tier: Option<Arc<SharedTier>>,
    ) -> Shared {
        let cache = Self::build(&evicted, max_bytes);
        Shared {
            cache: arc_swap::ArcSwap::from_pointee((max_bytes, cache)),
            flights: Default::default(),
            evicted,
            tier,
        }
    }

    pub fn tier(&self) -> Option<&Arc<SharedTier>> {
        self.tier.as_ref()
    }

    /// The shared tier's state: `up`, `down`, or `off` without Redis.
    pub fn tier_state(&self) -> &'static str {
        match &self.tier {
            None => "off",
            Some(tier) if tier.is_up() => "up",
            Some(_) => "down",
        }
    }

    fn build(evicted: &Arc<dyn Fn() + Send + Sync>, max_bytes: u64) -> Arc<Cache> {
        let evicted = evicted.clone();
        Arc::new(Cache::new(max_bytes, move || evicted()))
    }

    /// Bytes and entries the current cache holds, after its pending upkeep (evictions are
    /// counted then).
    pub fn size(&self) -> (u64, u64) {
        let cache = self.cache.load();
        (cache.1.bytes(), cache.1.len())
    }

    /// The cache for a config whose bound is `max_bytes`.
    pub fn cache(&self, max_bytes: u64) -> Arc<Cache> {
        let current = self.cache.load();
        if current.0 == max_bytes {
            return current.1.clone();
        }
        let cache = Self::build(&self.evicted, max_bytes);
        self.cache.store(Arc::new((max_bytes, cache.clone())));
        tracing::info!(
            max_bytes,
            "the response cache's size bound changed: it starts empty"
        );
        cache
    }
}
