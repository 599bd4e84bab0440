//! The budgets' shared counters in Redis: one hash per budget per local day
//! (`llm-sidecar:budget:<name>:<YYYY-MM-DD>`, fields `spent` and `reserved` in nano-USD, kept
//! two days), changed only by two Lua scripts, each one atomic step on the server. Every call
//! has a short timeout; after a failure the store is down: no request calls it until a
//! background loop has reached it again, and settles that could not be sent wait for that.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::ledger::{Counts, Nanos};
use crate::telemetry::metrics::{Metrics, ReasonLabels, StateLabels};

/// How long a budget-day key outlives its day: long enough for the day's last settles.
pub const KEY_TTL_SECONDS: u64 = 2 * 86_400;
/// How long the store stays down after a failure before the next try.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
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

/// How to reach Redis (`LLM_SIDECAR_REDIS_*`).
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://`, possibly with a password: never logged or shown.
    pub url: String,
    /// From `LLM_SIDECAR_REDIS_PASSWORD_FILE`; overrides one in the URL.
    pub password: Option<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redacted_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The URL without its user information: `redis://host:port/db`.
pub fn redacted_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{rest}")
        }
        None => "<not a redis:// URL>".to_string(),
    }
}

/// A settle that could not reach the store, sent once it is back.
#[derive(Clone, Debug)]
pub struct Pending {
    pub keys: Vec<String>,
    pub reserved: Nanos,
    pub actual: Nanos,
}

pub struct RedisStore {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    timeout: Duration,
    url: String,
    secret: Option<String>,
    up: AtomicBool,
    reconnecting: AtomicBool,
    changed_at: Mutex<SystemTime>,
    last_error: Mutex<Option<String>>,
    failures: AtomicU64,
    pending: Mutex<Vec<Pending>>,
    reserve: Script,
    settle: Script,
    metrics: Arc<Metrics>,
}

impl RedisStore {
    /// Checks the URL; connecting happens in [`RedisStore::start`]. The error names no secret.
    pub fn new(settings: &RedisSettings, metrics: Arc<Metrics>) -> Result<RedisStore, String> {
        let shown = redacted_url(&settings.url);
        if !(settings.url.starts_with("redis://") || settings.url.starts_with("rediss://")) {
            return Err(format!("{shown}: must start with redis:// or rediss://"));
        }
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(|e| format!("{shown}: {}", kind_of(&e)))?;
        if let Some(password) = &settings.password {
            info.redis.password = Some(password.clone());
        }
        let secret = info.redis.password.clone().filter(|p| !p.is_empty());
        let client = redis::Client::open(info).map_err(|e| format!("{shown}: {}", kind_of(&e)))?;
        metrics.budgets.store_up.set(0);
        Ok(RedisStore {
            client,
            conn: ArcSwapOption::empty(),
            timeout: settings.timeout,
            url: shown,
            secret,
            up: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            changed_at: Mutex::new(SystemTime::now()),
            last_error: Mutex::new(Some("not connected yet".into())),
            failures: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            metrics,
        })
    }

    /// Tries to connect once (within the timeout and a second), then keeps trying in the
    /// background until it works.
    pub async fn start(self: &Arc<Self>) {
        let bound = self.timeout.max(Duration::from_secs(1));
        if tokio::time::timeout(bound, self.try_connect())
            .await
            .is_ok_and(|ok| ok)
        {
            return;
        }
        self.spawn_reconnect();
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
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
        serde_json::json!({
            "kind": "redis",
            "url": self.url,
            "state": if self.is_up() { "up" } else { "down" },
            "since_unix": crate::config::unix_seconds(*self.changed_at.lock().unwrap_or_else(|p| p.into_inner())),
            "timeout_ms": self.timeout.as_millis() as u64,
            "failures": self.failures.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().ok().and_then(|e| e.clone()),
            "pending_settles": self.pending(),
        })
    }

    fn conn(&self) -> Option<ConnectionManager> {
        if !self.is_up() {
            return None;
        }
        self.conn.load().as_deref().cloned()
    }

    /// One call under the timeout; a failure marks the store down.
    async fn call<T>(
        self: &Arc<Self>,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                self.metrics
                    .budgets
                    .store_errors
                    .get_or_create(&ReasonLabels { reason: "error" })
                    .inc();
                self.down(self.scrub(&err.to_string()));
                None
            }
            Err(_) => {
                self.metrics
                    .budgets
                    .store_errors
                    .get_or_create(&ReasonLabels { reason: "timeout" })
                    .inc();
                self.down(format!("no answer within {:?}", self.timeout));
                None
            }
        }
    }

    /// An error's text with the password taken out, in case a server or library echoes it.
    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) => text.replace(secret.as_str(), "<redacted>"),
            None => text.to_string(),
        }
    }

    fn down(self: &Arc<Self>, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(why.clone());
        }
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(url = %self.url, error = %why, timeout = ?self.timeout, "budget store (Redis) is down: budgets follow budget_store_down until it is back");
            self.set_changed();
            self.metrics.budgets.store_up.set(0);
            self.metrics
                .budgets
                .store_transitions
                .get_or_create(&StateLabels { state: "down" })
                .inc();
        }
        self.spawn_reconnect();
    }

    fn set_changed(&self) {
        if let Ok(mut at) = self.changed_at.lock() {
            *at = SystemTime::now();
        }
    }

    fn spawn_reconnect(self: &Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reconnecting.store(false, Ordering::Release);
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                let bound = store.timeout.max(Duration::from_secs(1));
                if tokio::time::timeout(bound, store.try_connect())
                    .await
                    .is_ok_and(|ok| ok)
                {
                    break;
                }
            }
            store.reconnecting.store(false, Ordering::Release);
        });
    }

    /// Connects (once) and pings; sends the queued settles; then the store is up.
    async fn try_connect(self: &Arc<Self>) -> bool {
        let mut conn = match self.conn.load_full() {
            Some(conn) => ConnectionManager::clone(&conn),
            None => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout.max(Duration::from_millis(500)))
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                match ConnectionManager::new_with_config(self.client.clone(), config).await {
                    Ok(conn) => {
                        self.conn.store(Some(Arc::new(conn.clone())));
                        conn
                    }
                    Err(err) => {
                        self.note_error(&err);
                        return false;
                    }
                }
            }
        };
        let ping = tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match ping {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                self.note_error(&err);
                return false;
            }
            Err(_) => return false,
        }
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
            let sent =
                tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut conn))
                    .await;
            if !matches!(sent, Ok(Ok(_))) {
                let mut queue = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                queue.extend(queued[i..].iter().cloned());
                return false;
            }
        }
        if !self.up.swap(true, Ordering::AcqRel) {
            let was_down = self
                .last_error
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .is_some_and(|e| e != "not connected yet");
            self.set_changed();
            self.metrics.budgets.store_up.set(1);
            if was_down {
                tracing::info!(url = %self.url, settled = queued.len(), "budget store (Redis) is back: budgets are shared again");
                self.metrics
                    .budgets
                    .store_transitions
                    .get_or_create(&StateLabels { state: "up" })
                    .inc();
            } else {
                tracing::info!(url = %self.url, "budget store (Redis) connected: budgets are shared by every sidecar using it");
            }
        }
        true
    }

    fn note_error(&self, err: &redis::RedisError) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(self.scrub(&err.to_string()));
        }
    }
}

/// A URL error without the URL (which may hold the password).
fn kind_of(err: &redis::RedisError) -> String {
    format!("not a usable Redis URL ({:?})", err.kind())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            redacted_url("rediss://user:s3cret@redis.example:6380/2"),
            "rediss://redis.example:6380/2"
        );
        assert_eq!(
            redacted_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let settings = RedisSettings {
            url: "redis://:s3cret@h:1".into(),
            password: Some("other-s3cret".into()),
            timeout: Duration::from_millis(50),
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
