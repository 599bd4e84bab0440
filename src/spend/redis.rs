//! The budgets' shared counters in Redis: one hash per budget per local day
//! (`llm-sidecar:budget:<name>:<YYYY-MM-DD>`, fields `spent` and `reserved` in nano-USD, kept
//! two days), changed only by two Lua scripts, each one atomic step on the server. The
//! connection, its timeout and its up/down state are the sidecar's [`RedisLink`] (shared with
//! the cache's shared tier); while it is down no request calls Redis, and settles that could not
//! be sent wait for it to be back: they are sent before the link counts as up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::ledger::{Counts, Nanos};
pub use crate::redis_link::{redacted_url, RedisSettings, RETRY_EVERY};
use crate::redis_link::{RedisLink, Watcher};
use crate::telemetry::metrics::{Metrics, ReasonLabels, StateLabels};

/// How long a budget-day key outlives its day: long enough for the day's last settles.
pub const KEY_TTL_SECONDS: u64 = 2 * 86_400;
/// Settles kept for a store that is down; past this they are dropped and counted.
const MAX_PENDING: usize = 100_000;

/// Checks every key's `spent + reserved + amount <= cap`; only when all pass, adds `amount`
/// to each key's `reserved`. Returns `{ok, spent1, reserved1, spent2, reserved2, ...}` with
/// the counts after (when ok) or as they refused.
const RESERVE: &str = r"
local amount = tonumber(ARGV[1])
local out = {1}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'spent', 'reserved')
  local spent = tonumber(v[1]) or 0
  local reserved = tonumber(v[2]) or 0
  if spent + reserved + amount > tonumber(ARGV[2 + i]) then out[1] = 0 end
  out[2 * i] = spent
  out[2 * i + 1] = reserved
end
if out[1] == 1 then
  for i, key in ipairs(KEYS) do
    out[2 * i + 1] = redis.call('HINCRBY', key, 'reserved', ARGV[1])
    redis.call('EXPIRE', key, ARGV[2])
  end
end
return out
";

/// Adds `ARGV[1]` (the release, 0 or negative) to each key's `reserved` (never below 0) and
/// `ARGV[2]` to its `spent`. Returns `{spent1, reserved1, ...}` after. Amounts go to HINCRBY
/// as the strings Rust wrote: a Lua number would be written `-0` or `1e+15`, which it refuses.
const SETTLE: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local reserved = redis.call('HINCRBY', key, 'reserved', ARGV[1])
  if reserved < 0 then
    redis.call('HSET', key, 'reserved', 0)
    reserved = 0
  end
  out[2 * i - 1] = redis.call('HINCRBY', key, 'spent', ARGV[2])
  out[2 * i] = reserved
  redis.call('EXPIRE', key, ARGV[3])
end
return out
";

/// A settle that could not reach the store, sent once it is back.
#[derive(Clone, Debug)]
pub struct Pending {
    pub keys: Vec<String>,
    pub reserved: Nanos,
    pub actual: Nanos,
}

pub struct RedisStore {
    link: Arc<RedisLink>,
    pending: Arc<Mutex<Vec<Pending>>>,
    reserve: Script,
    settle: Script,
    metrics: Arc<Metrics>,
}

impl RedisStore {
    /// A store on its own link: checks the URL; connecting happens in [`RedisStore::start`].
    /// The error names no secret.
    pub fn new(settings: &RedisSettings, metrics: Arc<Metrics>) -> Result<Arc<RedisStore>, String> {
        Ok(RedisStore::on(Arc::new(RedisLink::new(settings)?), metrics))
    }

    /// A store on the sidecar's link, watching it (register before the link starts).
    pub fn on(link: Arc<RedisLink>, metrics: Arc<Metrics>) -> Arc<RedisStore> {
        metrics.budgets.store_up.set(i64::from(link.is_up()));
        let store = Arc::new(RedisStore {
            link,
            pending: Default::default(),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            metrics,
        });
        let watcher: Arc<dyn Watcher> = store.clone();
        store.link.watch(Arc::downgrade(&watcher));
        store
    }

    /// Connects the link (see [`RedisLink::start`]).
    pub async fn start(self: &Arc<Self>) {
        self.link.start().await;
    }

    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    pub fn timeout(&self) -> Duration {
        self.link.timeout()
    }

    /// Reserves `amount` on every key at once, or on none; `None` when the store is down.
    pub async fn reserve(
        self: &Arc<Self>,
        keys: &[String],
        caps: &[Nanos],
        amount: Nanos,
    ) -> Option<(bool, Vec<Counts>)> {
        let mut invocation = self.reserve.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(amount).arg(KEY_TTL_SECONDS);
        for cap in caps {
            invocation.arg(*cap);
        }
        let values: Vec<i64> = self
            .call(invocation.invoke_async(&mut self.conn()?))
            .await?;
        let ok = values.first() == Some(&1);
        Some((ok, pairs(values.get(1..).unwrap_or_default())))
    }

    /// Settles on every key; `None` when the store is down (the settle is then queued).
    pub async fn settle(self: &Arc<Self>, pending: Pending) -> Option<Vec<Counts>> {
        let result = match self.conn() {
            Some(mut conn) => {
                let mut invocation = self.settle.prepare_invoke();
                for key in &pending.keys {
                    invocation.key(key);
                }
                invocation
                    .arg(-pending.reserved)
                    .arg(pending.actual)
                    .arg(KEY_TTL_SECONDS);
                let fut = invocation.invoke_async::<Vec<i64>>(&mut conn);
                self.call(fut).await
            }
            None => None,
        };
        match result {
            Some(values) => Some(pairs(&values)),
            None => {
                self.queue(pending);
                None
            }
        }
    }

    /// Claims an alert level of a budget-day for this sidecar: true for the first sidecar of
    /// the deployment (and when the store cannot say, so an alert is never lost).
    pub async fn claim_alert(self: &Arc<Self>, key: &str, level: f64) -> bool {
        let Some(mut conn) = self.conn() else {
            return true;
        };
        let field = format!("alert:{level}");
        let fut = conn.hset_nx::<_, _, _, i64>(key, field, 1);
        self.call(fut).await.is_none_or(|set| set == 1)
    }

    pub fn queue(&self, pending: Pending) {
        let mut queue = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() < MAX_PENDING {
            queue.push(pending);
        } else {
            self.metrics.budgets.settles_dropped.inc();
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.lock().map_or(0, |q| q.len())
    }

    /// `/config`: where the store is and whether it answers, without credentials.
    pub fn view(&self) -> serde_json::Value {
        let mut view = self.link.view();
        if let Some(map) = view.as_object_mut() {
            map.insert("pending_settles".into(), self.pending().into());
        }
        view
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.link.conn()
    }

    /// One call under the link's timeout; a failure is counted (and marks the link down).
    async fn call<T>(
        self: &Arc<Self>,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match self.link.call(fut).await {
            Ok(value) => Some(value),
            Err(failed) => {
                self.metrics
                    .budgets
                    .store_errors
                    .get_or_create(&ReasonLabels {
                        reason: failed.as_str(),
                    })
                    .inc();
                None
            }
        }
    }

    /// Sends the settles queued while the link was down; `false` when one did not go through
    /// (it and the rest stay queued).
    async fn send_queued(&self, conn: &mut ConnectionManager) -> bool {
        let queued = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (i, p) in queued.iter().enumerate() {
            let mut invocation = self.settle.prepare_invoke();
            for key in &p.keys {
                invocation.key(key);
            }
            invocation
                .arg(-p.reserved)
                .arg(p.actual)
                .arg(KEY_TTL_SECONDS);
            let sent = tokio::time::timeout(
                self.link.timeout(),
                invocation.invoke_async::<Vec<i64>>(conn),
            )
            .await;
            if !matches!(sent, Ok(Ok(_))) {
                let mut queue = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                queue.extend(queued[i..].iter().cloned());
                return false;
            }
        }
        if !queued.is_empty() {
            tracing::info!(
                settled = queued.len(),
                "budget store (Redis): the settles made while it was down are counted there"
            );
        }
        true
    }
}

impl Watcher for RedisStore {
    fn before_up<'a>(&'a self, conn: &'a mut ConnectionManager) -> BoxFuture<'a, bool> {
        Box::pin(self.send_queued(conn))
    }

    fn changed(&self, up: bool, first: bool, why: &str) {
        let url = self.link.url();
        self.metrics.budgets.store_up.set(i64::from(up));
        if up && first {
            tracing::info!(%url, "budget store (Redis) connected: budgets are shared by every sidecar using it");
            return;
        }
        if up {
            tracing::info!(%url, "budget store (Redis) is back: budgets are shared again");
        } else {
            tracing::warn!(%url, error = %why, timeout = ?self.link.timeout(), "budget store (Redis) is down: budgets follow budget_store_down until it is back");
        }
        self.metrics
            .budgets
            .store_transitions
            .get_or_create(&StateLabels {
                state: if up { "up" } else { "down" },
            })
            .inc();
    }
}

fn pairs(values: &[i64]) -> Vec<Counts> {
    values
        .chunks_exact(2)
        .map(|c| Counts {
            spent: c[0],
            reserved: c[1],
        })
        .collect()
}
