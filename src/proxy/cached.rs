//! The cache's part of a model request: whether it may use the cache, an answer served from
//! it (fresh, or an identical request's), and the last resorts when every target failed: a
//! stale answer, then the route's static fallback. Every answer says where it came from. With
//! Redis, what this sidecar's cache lacks is looked up in the shared tier before a provider is
//! asked, and before the static fallback.

use super::*;
use crate::cache::{Cache, Entry, Joined, Key, Leader, Lookup, Policy, SharedTier, Stored};
use crate::outbound::number_header;
use crate::telemetry::cache::CacheStatus;

/// How the answer was found: `hit`, `miss`, `stale` or `bypass`.
pub const HEADER_CACHE: HeaderName = HeaderName::from_static("x-llm-sidecar-cache");

/// How a model request uses the cache, decided when its body is read.
pub(super) enum Use {
    /// The route does not cache, the request is not one it caches, or the client said no.
    Bypass,
    Cache {
        key: Key,
        policy: Policy,
        /// Look for an answer first; `false` when the client asked for a fresh one.
        read: bool,
    },
}

impl Use {
    pub(super) fn decide(
        route: &Route,
        path: &str,
        headers: &HeaderMap,
        parsed: &RequestBody<'_>,
    ) -> Use {
        let Some(policy) = route.cache else {
            return Use::Bypass;
        };
        let asked = headers
            .get(HEADER_CACHE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        let directives: Vec<String> = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        let no_store = directives.iter().any(|d| d == "no-store");
        if asked.as_deref() == Some("skip") || no_store || !policy.mode.admits(parsed) {
            return Use::Bypass;
        }
        let refresh =
            asked.as_deref() == Some("refresh") || directives.iter().any(|d| d == "no-cache");
        match Key::of(&route.name, path, parsed) {
            Some(key) => Use::Cache {
                key,
                policy,
                read: !refresh,
            },
            None => Use::Bypass,
        }
    }
}

/// What a model request's cache use needs, from its decision to its answer.
pub(super) struct Context {
    using: Use,
    store: Option<Arc<Cache>>,
    /// The shared tier and its per-entry cap, when this request is cached and there is one.
    shared: Option<(Arc<SharedTier>, u64)>,
    /// An answer from the shared tier went into this sidecar's cache for this request: what is
    /// served from it counts as a shared hit.
    from_shared: std::sync::atomic::AtomicBool,
    route: Arc<Route>,
    snapshot: Arc<Snapshot>,
    path: String,
    stream: bool,
    include_usage: bool,
}

/// What looking in the cache came to.
pub(super) enum Looked {
    Served(Box<Handled>),
    /// Ask the providers; the leader, if any, hands the answer to identical requests.
    Lead(Option<Leader>),
}

impl Context {
    pub(super) fn new(
        using: Use,
        exchange: &Exchange,
        shared: &crate::cache::Shared,
        max_bytes: u64,
        path: String,
    ) -> Context {
        let store = matches!(using, Use::Cache { .. }).then(|| shared.cache(max_bytes));
        let tier = store.as_ref().and(shared.tier()).map(|tier| {
            let cap = exchange.snapshot().cache_shared_max_entry_bytes;
            (tier.clone(), cap)
        });
        let route = exchange.route().clone();
        Context {
            using,
            store,
            shared: tier,
            from_shared: Default::default(),
            route,
            snapshot: exchange.snapshot().clone(),
            path,
            stream: exchange.streams(),
            include_usage: exchange.client_asked_usage(),
        }
    }

    pub(super) fn status(&self) -> CacheStatus {
        match self.using {
            Use::Bypass => CacheStatus::Bypass,
            Use::Cache { .. } => CacheStatus::Miss,
        }
    }

    /// Where the exchange stores its answer, when this request is cached.
    pub(super) fn capture(&self, leader: Option<Leader>) -> Option<execute::Capture> {
        match (&self.using, &self.store) {
            (Use::Cache { key, policy, .. }, Some(store)) => Some(execute::Capture {
                cache: store.clone(),
                key: *key,
                policy: *policy,
                leader,
                shared: self.shared.clone(),
            }),
            _ => None,
        }
    }

    /// The shared tier's answer for this request when it is newer than what this sidecar has
    /// (`local`) and within the route's `max_stale`, kept in this sidecar's cache too; with
    /// whether it is fresh. `None` at once without a tier or while it is down.
    async fn shared_answer(&self, local: &Lookup) -> Option<(Arc<Entry>, bool)> {
        let (Use::Cache { key, policy, .. }, Some(store), Some((tier, _))) =
            (&self.using, &self.store, &self.shared)
        else {
            return None;
        };
        let found = tier.get(key).await?;
        let now = tokio::time::Instant::now();
        if found.age > policy.max_stale.max(policy.ttl) {
            return None;
        }
        if let Lookup::Fresh(mine) | Lookup::Stale(mine) = local {
            if mine.age(now) <= found.age {
                return None;
            }
        }
        let stored_at = now.checked_sub(found.age)?;
        let entry = store.put(*key, found.answer, found.cost, policy, stored_at);
        self.from_shared
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Some((entry, found.age <= policy.ttl))
    }

    /// A stored answer for the client, plain or replayed as a stream; `None` when a
    /// streaming client asks for one that cannot be replayed (a tool call).
    fn respond(
        &self,
        answer: &Stored,
        status: CacheStatus,
        age: Option<Duration>,
    ) -> Option<Response<ProxyBody>> {
        let mut response = if self.stream {
            let frames = answer
                .replay(self.include_usage)?
                .into_iter()
                .map(|b| Ok::<_, crate::body::BoxError>(http_body::Frame::data(b)));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let mut response = Response::new(body.boxed_unsync());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        } else {
            let mut response = Response::new(full(answer.body.clone()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        };
        let headers = response.headers_mut();
        headers.insert(HEADER_CACHE, HeaderValue::from_static(status.as_str()));
        match age {
            Some(age) => {
                headers.insert(header::AGE, number_header(age.as_secs()));
                headers.insert(HEADER_PATH, HeaderValue::from_static("cache"));
            }
            None => {
                headers.insert(HEADER_PATH, HeaderValue::from_static("static"));
            }
        }
        if let Ok(value) = HeaderValue::from_str(&self.route.name) {
            headers.insert(HEADER_ROUTE, value);
        }
        headers.insert(execute::HEADER_COST, HeaderValue::from_static("0"));
        headers.insert(HEADER_GENERATION, self.snapshot.generation_header.clone());
        Some(response)
    }

    /// What a request answered without a provider is counted as.
    fn served(
        &self,
        status: CacheStatus,
        report: execute::Report,
        bought: Option<f64>,
        from: &'static str,
    ) -> Served {
        Served {
            route: Some(Arc::from(self.route.name.as_str())),
            provider: Some(Arc::from(from)),
            path: Some(from),
            report: Some(execute::Report {
                // Nothing was bought now: the answer costs 0 and saves what it cost before.
                usage: Some(crate::telemetry::cost::Usage::default()),
                bill: crate::telemetry::cost::Bill {
                    cost: Some(0.0),
                    official: bought,
                },
                complete: true,
                ..report
            }),
            cache: Some(status),
            static_answer: from == "static",
            ..Served::counted()
        }
    }
}

impl Proxy {
    /// A fresh answer from the cache, or an identical request's answer once it lands; else
    /// this request asks the providers (and leads, when others may wait for it).
    pub(super) async fn look_up(&self, ctx: &Context) -> Looked {
        let (Use::Cache { key, policy, read }, Some(store)) = (&ctx.using, &ctx.store) else {
            return Looked::Lead(None);
        };
        if !read {
            // `refresh`: the new answer replaces the stored one; nobody waits for it.
            return Looked::Lead(None);
        }
        let local = store.get(key, policy, tokio::time::Instant::now());
        if let Lookup::Fresh(entry) = &local {
            return match self.hit(ctx, entry, false) {
                Some(handled) => Looked::Served(Box::new(handled)),
                None => Looked::Lead(None),
            };
        }
        match self.core.cache.flights.join(*key) {
            // Only the leader asks the shared tier: identical requests wait for what it finds.
            Joined::Leader(leader) => match ctx.shared_answer(&local).await {
                Some((entry, true)) => {
                    leader.landed(entry.clone());
                    match self.hit(ctx, &entry, false) {
                        Some(handled) => {
                            self.metrics.cache.shared_hit(&ctx.route.name);
                            Looked::Served(Box::new(handled))
                        }
                        None => Looked::Lead(None),
                    }
                }
                // Nothing, or only a stale answer (now in this sidecar's cache, for when
                // every target fails).
                _ => Looked::Lead(Some(leader)),
            },
            Joined::Waiter(waiter) => match waiter.wait().await {
                Some(entry) => match self.hit(ctx, &entry, true) {
                    Some(handled) => Looked::Served(Box::new(handled)),
                    None => Looked::Lead(None),
                },
                // The identical request got no answer to share: this one tries on its own.
                None => Looked::Lead(None),
            },
        }
    }

    fn hit(&self, ctx: &Context, entry: &Entry, waited: bool) -> Option<Handled> {
        let age = entry.age(tokio::time::Instant::now());
        let response = ctx.respond(&entry.answer, CacheStatus::Hit, Some(age))?;
        let metrics = &self.metrics.cache;
        metrics.looked_up(&ctx.route.name, CacheStatus::Hit);
        if waited {
            metrics.waited(&ctx.route.name);
        }
        if let Some(cost) = entry.cost {
            metrics.saved(&ctx.route.name, cost);
        }
        let report = execute::Report {
            attempts: 0,
            ..Default::default()
        };
        let served = ctx.served(CacheStatus::Hit, report, entry.cost, "cache");
        Some((Ok(response), served))
    }

    /// A provider answered: counts the lookup.
    pub(super) fn answered(&self, ctx: &Context) {
        self.metrics.cache.looked_up(&ctx.route.name, ctx.status());
    }

    /// Every target failed: a stored answer (marked stale), else the route's static
    /// fallback, else the error. Only for failures on the providers' side (5xx, 429), not for
    /// a request a provider refused.
    /// The shared tier is asked when this sidecar's cache has nothing.
    pub(super) async fn last_resort(&self, ctx: &Context, gave_up: execute::GaveUp) -> Handled {
        let execute::GaveUp { error, report } = gave_up;
        let status = error.status();
        let provider_side = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
        let metrics = &self.metrics.cache;
        if provider_side {
            if let (Use::Cache { key, policy, .. }, Some(store)) = (&ctx.using, &ctx.store) {
                let entry = match store.get(key, policy, tokio::time::Instant::now()) {
                    Lookup::Fresh(entry) | Lookup::Stale(entry) => Some(entry),
                    Lookup::Miss => ctx
                        .shared_answer(&Lookup::Miss)
                        .await
                        .map(|(entry, _)| entry),
                };
                let now = tokio::time::Instant::now();
                let found = entry.and_then(|entry| {
                    let age = entry.age(now);
                    let response = ctx.respond(&entry.answer, CacheStatus::Stale, Some(age))?;
                    Some((entry, age, response))
                });
                if let Some((entry, age, response)) = found {
                    tracing::warn!(route = %ctx.route.name, age_s = age.as_secs(), replaced = %error, "every target failed: served a stale answer from the cache");
                    metrics.looked_up(&ctx.route.name, CacheStatus::Stale);
                    if ctx.from_shared.load(std::sync::atomic::Ordering::Relaxed) {
                        metrics.shared_hit(&ctx.route.name);
                    }
                    let served = ctx.served(CacheStatus::Stale, report, entry.cost, "cache");
                    return (Ok(response), served);
                }
            }
            let answer = ctx
                .route
                .static_fallback
                .as_deref()
                .and_then(|text| static_answer(&ctx.route, &ctx.path, text));
            if let Some(response) = answer.and_then(|a| ctx.respond(&a, ctx.status(), None)) {
                tracing::warn!(route = %ctx.route.name, replaced = %error, "every target failed: served the route's static fallback");
                metrics.looked_up(&ctx.route.name, ctx.status());
                metrics.static_fallback(&ctx.route.name);
                return (
                    Ok(response),
                    ctx.served(ctx.status(), report, None, "static"),
                );
            }
        }
        metrics.looked_up(&ctx.route.name, ctx.status());
        let served = Served {
            report: Some(report),
            cache: Some(ctx.status()),
            ..Served::counted()
        };
        (Err(error), served)
    }
}

/// The route's static fallback as a chat answer; `None` for endpoints other than chat.
fn static_answer(route: &Route, path: &str, text: &str) -> Option<Stored> {
    if path != "/v1/chat/completions" {
        return None;
    }
    let body = serde_json::json!({
        "id": "chatcmpl-static",
        "object": "chat.completion",
        "created": unix_seconds(std::time::SystemTime::now()),
        "model": route.name,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "finish_reason": "stop",
        }],
    });
    Stored::from_plain(Bytes::from(body.to_string()))
}
