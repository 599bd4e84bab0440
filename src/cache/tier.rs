//! The cache's shared tier in Redis (with `LLM_SIDECAR_REDIS_URL`), behind each sidecar's own
//! cache, so replicas share hits: one GET on a local miss, one fire-and-forget SET per stored
//! answer (unless it is over the per-entry cap), each under the link's timeout. While the link
//! is down the tier is skipped without waiting: the sidecar serves from its own cache and the
//! providers.
//!
//! An entry is `llm-sidecar:cache:<hex key>`, expiring when the answer is `max_stale` old, and
//! holds one line of JSON (format version, wall-clock unix millis it was stored at, its cost,
//! the chat replay fields), a newline, then the plain answer's bytes as the provider sent them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::answer::{ChatAnswer, Stored};
use super::key::Key;
use super::store::{Entry, Policy};
use crate::redis_link::{RedisLink, Watcher};
use crate::telemetry::metrics::{Metrics, ReasonLabels};

/// Every key of the tier starts so.
pub const KEY_PREFIX: &str = "llm-sidecar:cache:";
/// The entry format this build writes and reads; others are ignored (a miss).
const VERSION: u32 = 1;

/// The JSON line before the answer's bytes.
#[derive(Serialize, Deserialize)]
struct Header {
    v: u32,
    stored_at_ms: u64,
    cost: Option<f64>,
    chat: Option<ChatAnswer>,
}

/// An answer another sidecar (or this one) stored, and how old it is by the wall clock.
#[derive(Debug, PartialEq)]
pub struct Found {
    pub answer: Stored,
    pub cost: Option<f64>,
    pub age: Duration,
}

pub struct SharedTier {
    link: Arc<RedisLink>,
    metrics: Arc<Metrics>,
}

impl SharedTier {
    /// The tier on the sidecar's link, watching it (register before the link starts).
    pub fn new(link: Arc<RedisLink>, metrics: Arc<Metrics>) -> Arc<SharedTier> {
        metrics.cache.shared_up.set(i64::from(link.is_up()));
        let tier = Arc::new(SharedTier { link, metrics });
        let watcher: Arc<dyn Watcher> = tier.clone();
        tier.link.watch(Arc::downgrade(&watcher));
        tier
    }

    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// `/config`: the tier's Redis, its state and its keys, without credentials.
    pub fn view(&self, max_entry_bytes: u64) -> serde_json::Value {
        let mut view = self.link.view();
        if let Some(map) = view.as_object_mut() {
            map.insert("key_prefix".into(), KEY_PREFIX.into());
            map.insert("max_entry_bytes".into(), max_entry_bytes.into());
        }
        view
    }

    /// The stored answer for `key`, if Redis has one this build can read. At once (`None`)
    /// while the link is down; at most the link's timeout otherwise.
    pub async fn get(self: &Arc<Self>, key: &Key) -> Option<Found> {
        let Some(mut conn) = self.link.conn() else {
            self.skipped("down");
            return None;
        };
        let mut get = redis::cmd("GET");
        get.arg(redis_key(key));
        let bytes = match self
            .link
            .call(get.query_async::<Option<Vec<u8>>>(&mut conn))
            .await
        {
            Ok(bytes) => bytes?,
            Err(failed) => {
                self.error(failed.as_str());
                return None;
            }
        };
        let found = decode(Bytes::from(bytes), SystemTime::now());
        if found.is_none() {
            self.error("malformed");
        }
        found
    }

    /// Sends `entry` to Redis in the background, kept until it is `max_stale` old, unless its
    /// encoding is over `max_entry_bytes` or the link is down (both counted as skipped).
    pub fn put(
        self: &Arc<Self>,
        key: Key,
        entry: Arc<Entry>,
        policy: &Policy,
        max_entry_bytes: u64,
    ) {
        if !self.link.is_up() {
            self.skipped("down");
            return;
        }
        if entry.answer.body.len() as u64 > max_entry_bytes {
            self.skipped("too_large");
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let age = entry.age(tokio::time::Instant::now());
        let keep = policy.max_stale.max(policy.ttl).saturating_sub(age);
        if keep.is_zero() {
            return;
        }
        let tier = self.clone();
        runtime.spawn(async move {
            let stored_at = SystemTime::now().checked_sub(age).unwrap_or(UNIX_EPOCH);
            let Some(encoded) = encode(&entry, stored_at) else {
                return;
            };
            if encoded.len() as u64 > max_entry_bytes {
                tier.skipped("too_large");
                return;
            }
            let Some(mut conn) = tier.link.conn() else {
                tier.skipped("down");
                return;
            };
            let mut set = redis::cmd("SET");
            set.arg(redis_key(&key))
                .arg(encoded)
                .arg("PX")
                .arg(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1));
            match tier.link.call(set.query_async::<()>(&mut conn)).await {
                Ok(()) => {
                    tier.metrics.cache.shared_stores.inc();
                }
                Err(failed) => tier.error(failed.as_str()),
            }
        });
    }

    fn skipped(&self, reason: &'static str) {
        self.metrics
            .cache
            .shared_skipped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn error(&self, reason: &'static str) {
        self.metrics
            .cache
            .shared_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

impl Watcher for SharedTier {
    fn changed(&self, up: bool, first: bool, why: &str) {
        let url = self.link.url();
        self.metrics.cache.shared_up.set(i64::from(up));
        match (up, first) {
            (true, true) => {
                tracing::info!(%url, "the cache's shared tier (Redis) is on: replicas share cached answers")
            }
            (true, false) => {
                tracing::info!(%url, "the cache's shared tier (Redis) is back: replicas share cached answers again")
            }
            (false, _) => {
                tracing::warn!(%url, error = %why, "the cache's shared tier (Redis) is down: answers are cached per sidecar until it is back")
            }
        }
    }
}

fn redis_key(key: &Key) -> String {
    format!("{KEY_PREFIX}{}", key.hex())
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The entry as Redis keeps it: the header line, `\n`, the plain answer.
fn encode(entry: &Entry, stored_at: SystemTime) -> Option<Vec<u8>> {
    let header = Header {
        v: VERSION,
        stored_at_ms: unix_millis(stored_at),
        cost: entry.cost,
        chat: entry.answer.chat.clone(),
    };
    // serde_json writes no raw newline (one in a string is `\n`): the first one ends the header.
    let mut out = serde_json::to_vec(&header).ok()?;
    out.reserve(1 + entry.answer.body.len());
    out.push(b'\n');
    out.extend_from_slice(&entry.answer.body);
    Some(out)
}

/// What [`encode`] wrote, aged as of `now` (a clock behind the writer's counts as age 0).
fn decode(bytes: Bytes, now: SystemTime) -> Option<Found> {
    let split = memchr::memchr(b'\n', &bytes)?;
    let header: Header = serde_json::from_slice(&bytes[..split]).ok()?;
    if header.v != VERSION {
        return None;
    }
    let stored_at = UNIX_EPOCH + Duration::from_millis(header.stored_at_ms);
    Some(Found {
        answer: Stored {
            body: bytes.slice(split + 1..),
            chat: header.chat,
        },
        cost: header.cost.filter(|c| c.is_finite()),
        age: now.duration_since(stored_at).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::Cache;
    use crate::cache::Mode;

    const PLAIN: &str = "{\"id\":\"c\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"m\",\n \"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"two\\nlines\"},\"finish_reason\":\"stop\"}]}";

    #[tokio::test]
    async fn an_entry_reads_back_byte_for_byte_with_its_cost_chat_fields_and_age() {
        let stored = Stored::from_plain(Bytes::from(PLAIN)).unwrap();
        assert!(stored.chat.is_some());
        let policy = Policy {
            ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(600),
            mode: Mode::Always,
        };
        let cache = Cache::new(1 << 20, || {});
        let parsed = crate::openai::RequestBody::parse(br#"{"model":"m"}"#).unwrap();
        let key = Key::of("m", "/v1/chat/completions", &parsed).unwrap();
        let entry = cache.put(
            key,
            stored.clone(),
            Some(0.25),
            &policy,
            tokio::time::Instant::now(),
        );
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let encoded = encode(&entry, at).unwrap();
        let found = decode(Bytes::from(encoded.clone()), at + Duration::from_secs(90)).unwrap();
        assert_eq!(found.answer, stored, "the body and the replay fields");
        assert_eq!(found.cost, Some(0.25));
        assert_eq!(found.age, Duration::from_secs(90));
        let behind = decode(Bytes::from(encoded.clone()), at - Duration::from_secs(5)).unwrap();
        assert_eq!(behind.age, Duration::ZERO, "a reader whose clock is behind");

        let other_version = String::from_utf8(encoded)
            .unwrap()
            .replacen("\"v\":1", "\"v\":2", 1);
        assert_eq!(decode(Bytes::from(other_version), at), None);
        assert_eq!(decode(Bytes::from_static(b"garbage"), at), None);
        assert_eq!(decode(Bytes::from_static(b"{}\n{}"), at), None);
        assert_eq!(
            redis_key(&key),
            format!("llm-sidecar:cache:{}", key.hex()),
            "the key names the request's digest"
        );
    }
}
