//! The sidecar's response cache: complete answers by key, bounded by their size in bytes
//! (moka evicts the least useful entries past the bound), each kept for its route's
//! `max_stale` and fresh for its `ttl`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::notification::RemovalCause;
use tokio::time::Instant;

use super::answer::Stored;
use super::key::{Key, Mode};

/// How a route caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Fresh for this long: served instead of calling a provider.
    pub ttl: Duration,
    /// Kept this long after it was stored, and served, marked stale, when every target failed.
    pub max_stale: Duration,
    pub mode: Mode,
}

/// One stored answer and when it was stored (on the runtime's clock, so tests can pause it).
#[derive(Debug)]
pub struct Entry {
    pub answer: Stored,
    pub stored_at: Instant,
    /// What the answer cost when it was bought: a hit saves this much.
    pub cost: Option<f64>,
    /// How long the cache keeps it: its route's `max_stale` when it was stored.
    keep: Duration,
}

impl Entry {
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }
}

/// What the cache holds for a request.
#[derive(Clone, Debug)]
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Past its `ttl` but within `max_stale`: for when every target failed.
    Stale(Arc<Entry>),
    Miss,
}

pub struct Cache {
    entries: moka::sync::Cache<Key, Arc<Entry>>,
    evictions: Arc<AtomicU64>,
}

struct KeepFor;

impl moka::Expiry<Key, Arc<Entry>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &Key,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.keep)
    }
}

impl Cache {
    /// A cache of at most `max_bytes` of answers; `evicted` runs for each one dropped for room
    /// or for age.
    pub fn new(max_bytes: u64, evicted: impl Fn() + Send + Sync + 'static) -> Cache {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &Key, entry: &Arc<Entry>| {
                u32::try_from(entry.answer.weight() + 128).unwrap_or(u32::MAX)
            })
            .expire_after(KeepFor)
            .eviction_listener(move |_key, _entry, cause| {
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    counted.fetch_add(1, Ordering::Relaxed);
                    evicted();
                }
            })
            .build();
        Cache { entries, evictions }
    }

    /// Bytes and entries held, as last counted (without waiting for pending upkeep).
    pub fn size(&self) -> (u64, u64) {
        (self.entries.weighted_size(), self.entries.entry_count())
    }

    /// The entry for `key` as `policy` sees it now: fresh, stale, or nothing usable.
    pub fn get(&self, key: &Key, policy: &Policy, now: Instant) -> Lookup {
        let Some(entry) = self.entries.get(key) else {
            return Lookup::Miss;
        };
        let age = entry.age(now);
        if age <= policy.ttl {
            Lookup::Fresh(entry)
        } else if age <= policy.max_stale {
            Lookup::Stale(entry)
        } else {
            Lookup::Miss
        }
    }

    /// Keeps a complete answer until it is `policy.max_stale` old; `stored_at` is now for a
    /// new answer, earlier for one another sidecar stored.
    pub fn put(
        &self,
        key: Key,
        answer: Stored,
        cost: Option<f64>,
        policy: &Policy,
        stored_at: Instant,
    ) -> Arc<Entry> {
        let age = Instant::now().saturating_duration_since(stored_at);
        let entry = Arc::new(Entry {
            answer,
            stored_at,
            cost,
            keep: policy.max_stale.max(policy.ttl).saturating_sub(age),
        });
        self.entries.insert(key, entry.clone());
        entry
    }

    /// Forgets `key` (a client's `refresh` replaces it with the new answer anyway).
    pub fn remove(&self, key: &Key) {
        self.entries.invalidate(key);
    }

    /// Bytes held, after pending maintenance.
    pub fn bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries dropped for room or for age, since start.
    pub fn evictions(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(text: &str) -> Stored {
        let body = format!(
            r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}]}}"#
        );
        Stored::from_plain(Bytes::from(body)).expect("storable")
    }

    fn key(n: u32) -> Key {
        let body = format!(r#"{{"model":"m","messages":[{n}]}}"#);
        let parsed = crate::openai::RequestBody::parse(body.as_bytes()).unwrap();
        Key::of("m", "/v1/chat/completions", &parsed).unwrap()
    }

    const POLICY: Policy = Policy {
        ttl: Duration::from_secs(600),
        max_stale: Duration::from_secs(24 * 3600),
        mode: Mode::Deterministic,
    };

    #[tokio::test(start_paused = true)]
    async fn fresh_for_the_ttl_then_stale_until_max_stale_then_gone() {
        let cache = Cache::new(1 << 20, || {});
        let start = Instant::now();
        cache.put(key(1), answer("hi"), Some(0.002), &POLICY, start);
        assert!(matches!(
            cache.get(&key(1), &POLICY, Instant::now()),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            cache.get(&key(2), &POLICY, Instant::now()),
            Lookup::Miss
        ));
        tokio::time::advance(POLICY.ttl).await;
        assert!(matches!(
            cache.get(&key(1), &POLICY, Instant::now()),
            Lookup::Fresh(_)
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        match cache.get(&key(1), &POLICY, Instant::now()) {
            Lookup::Stale(entry) => {
                assert_eq!(
                    entry.age(Instant::now()),
                    POLICY.ttl + Duration::from_secs(1)
                );
                assert_eq!(entry.cost, Some(0.002));
            }
            other => panic!("expected stale, got {other:?}"),
        }
        tokio::time::advance(POLICY.max_stale - POLICY.ttl).await;
        assert!(matches!(
            cache.get(&key(1), &POLICY, Instant::now()),
            Lookup::Miss
        ));
    }

    #[test]
    fn bytes_bound_evicts() {
        let one = answer(&"x".repeat(1000));
        let weight = one.weight() as u64 + 128;
        let cache = Cache::new(weight * 10, || {});
        let now = Instant::now();
        for n in 0..100 {
            cache.put(key(n), answer(&"x".repeat(1000)), None, &POLICY, now);
        }
        assert!(cache.bytes() <= weight * 10, "held {} bytes", cache.bytes());
        assert!(cache.len() <= 10, "{} entries", cache.len());
        assert!(cache.evictions() >= 90, "{} evictions", cache.evictions());
    }
}
