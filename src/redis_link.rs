//! The sidecar's one connection to Redis (`LLM_SIDECAR_REDIS_URL`), shared by the budgets'
//! counters and the cache's shared tier: one reconnecting connection manager, a timeout on
//! every call, and an up/down state. After a failure the link is down: nobody calls Redis until
//! a background loop has reached it again (every second). Its users watch the state changes
//! (their own logs and gauges) and may finish work before the link counts as up again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;

/// How long the link stays down after a failure before the next try.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

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

/// Why a call failed; either way the link is down now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// Redis answered with an error, or the connection broke.
    Error,
    /// No answer within the timeout.
    Timeout,
}

impl Failed {
    /// The `reason` label of the users' error counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Failed::Error => "error",
            Failed::Timeout => "timeout",
        }
    }
}

/// One user of the link: told about state changes, and asked before the link is up again.
pub trait Watcher: Send + Sync {
    /// Runs on a fresh connection before the link counts as up (to send what waited while it
    /// was down); `false` keeps it down for another try.
    fn before_up<'a>(&'a self, _conn: &'a mut ConnectionManager) -> BoxFuture<'a, bool> {
        Box::pin(async { true })
    }

    /// The link went up (`first`: the first connection since start) or down (`why`).
    fn changed(&self, up: bool, first: bool, why: &str);
}

pub struct RedisLink {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    timeout: Duration,
    url: String,
    secret: Option<String>,
    up: AtomicBool,
    /// True once the link has been up once: a later `up` is a return, not the first connection.
    ever_up: AtomicBool,
    reconnecting: AtomicBool,
    changed_at: Mutex<SystemTime>,
    last_error: Mutex<Option<String>>,
    failures: AtomicU64,
    watchers: Mutex<Vec<Weak<dyn Watcher>>>,
}

impl RedisLink {
    /// Checks the URL; connecting happens in [`RedisLink::start`]. The error names no secret.
    pub fn new(settings: &RedisSettings) -> Result<RedisLink, String> {
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
        Ok(RedisLink {
            client,
            conn: ArcSwapOption::empty(),
            timeout: settings.timeout,
            url: shown,
            secret,
            up: AtomicBool::new(false),
            ever_up: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            changed_at: Mutex::new(SystemTime::now()),
            last_error: Mutex::new(Some("not connected yet".into())),
            failures: AtomicU64::new(0),
            watchers: Mutex::new(Vec::new()),
        })
    }

    /// Adds a user; it hears of the changes from now on (register before [`RedisLink::start`]
    /// to hear of the first connection). Held weakly: a user dropped is forgotten.
    pub fn watch(&self, watcher: Weak<dyn Watcher>) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
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

    /// The connection, while the link is up; `None` (at once) while it is down.
    pub fn conn(&self) -> Option<ConnectionManager> {
        if !self.is_up() {
            return None;
        }
        self.conn.load().as_deref().cloned()
    }

    /// One call under the timeout; a failure marks the link down.
    pub async fn call<T>(
        self: &Arc<Self>,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Failed> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                self.down(self.scrub(&err.to_string()));
                Err(Failed::Error)
            }
            Err(_) => {
                self.down(format!("no answer within {:?}", self.timeout));
                Err(Failed::Timeout)
            }
        }
    }

    /// `/config`: where Redis is and whether it answers, without credentials.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "redis",
            "url": self.url,
            "state": if self.is_up() { "up" } else { "down" },
            "since_unix": crate::config::unix_seconds(*self.changed_at.lock().unwrap_or_else(|p| p.into_inner())),
            "timeout_ms": self.timeout.as_millis() as u64,
            "failures": self.failures.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// The URL as shown: without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An error's text with the password taken out, in case a server or library echoes it.
    fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) => text.replace(secret.as_str(), "<redacted>"),
            None => text.to_string(),
        }
    }

    fn watchers(&self) -> Vec<Arc<dyn Watcher>> {
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        watchers.retain(|w| w.strong_count() > 0);
        watchers.iter().filter_map(Weak::upgrade).collect()
    }

    fn down(self: &Arc<Self>, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(why.clone());
        }
        if self.up.swap(false, Ordering::AcqRel) {
            self.set_changed();
            for watcher in self.watchers() {
                watcher.changed(false, false, &why);
            }
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
        // Weak, so a link nobody uses any more stops trying.
        let link = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(RETRY_EVERY).await;
                let Some(link) = link.upgrade() else {
                    return;
                };
                let bound = link.timeout.max(Duration::from_secs(1));
                if tokio::time::timeout(bound, link.try_connect())
                    .await
                    .is_ok_and(|ok| ok)
                {
                    link.reconnecting.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }

    /// Connects (once) and pings; lets every user finish what waited; then the link is up.
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
        let watchers = self.watchers();
        for watcher in &watchers {
            if !watcher.before_up(&mut conn).await {
                return false;
            }
        }
        if !self.up.swap(true, Ordering::AcqRel) {
            if let Ok(mut last) = self.last_error.lock() {
                *last = None;
            }
            let first = !self.ever_up.swap(true, Ordering::AcqRel);
            self.set_changed();
            for watcher in &watchers {
                watcher.changed(true, first, "");
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
