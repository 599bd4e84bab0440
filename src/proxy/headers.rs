//! Headers on the way through: what never reaches a provider (the app's credentials, hop-by-hop
//! headers, the sidecar's own controls), the headers every answer gets, and the side a request
//! starts on from its rollout key.

use super::*;

/// The headers every answer from a provider gets: the route, provider, upstream model and path
/// of the target that answered, why its side was chosen, the rollout bucket when the rollout
/// decided, and the config generation that served it.
pub(crate) fn add_route_headers(
    headers: &mut HeaderMap,
    target: &crate::config::Target,
    reason: &'static str,
    bucket: Option<u16>,
    snapshot: &Snapshot,
) {
    for (name, value) in &target.tags.headers {
        headers.insert(name.clone(), value.clone());
    }
    headers.insert(HEADER_REASON, HeaderValue::from_static(reason));
    if let Some(bucket) = bucket {
        headers.insert(HEADER_ROLLOUT_BUCKET, HeaderValue::from(bucket));
    }
    headers.insert(HEADER_GENERATION, snapshot.generation_header.clone());
}

/// Removes the headers that belong to one hop only.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |name| is_hop_by_hop(name.as_str()));
}

/// Removes every header whose name `doomed` picks. A message has a few headers: finding each
/// one to drop by a scan is cheaper than a lookup for every name that might be there.
fn remove_where(headers: &mut HeaderMap, mut doomed: impl FnMut(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|name| doomed(name)).cloned() {
        headers.remove(&name);
    }
}

/// Headers that belong to one hop only.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The app's rollout key header: the same key always lands on the same side.
pub const HEADER_ROLLOUT_KEY: HeaderName = HeaderName::from_static("x-llm-sidecar-rollout-key");
/// The request's rollout bucket (0..10000), when the rollout decided its side.
pub const HEADER_ROLLOUT_BUCKET: HeaderName =
    HeaderName::from_static("x-llm-sidecar-rollout-bucket");

/// The side a request starts on. The rollout key is `x-llm-sidecar-rollout-key`, else the
/// body's OpenAI `user` field; without either the bucket is random.
pub(crate) fn decide_side(
    snapshot: &Snapshot,
    guard_tripped: bool,
    headers: &HeaderMap,
    parsed: Option<&RequestBody<'_>>,
) -> Decision {
    rollout::decide(&snapshot.flags, guard_tripped, || {
        if let Some(key) = headers
            .get(HEADER_ROLLOUT_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|k| !k.is_empty())
        {
            return rollout::bucket_for_key(key);
        }
        parsed
            .and_then(|p| p.field("user"))
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
            .filter(|k| !k.is_empty())
            .map_or_else(rollout::random_bucket, |k| rollout::bucket_for_key(&k))
    })
}

/// Removes, in place, what must not reach the provider: the app's credentials, hop-by-hop
/// headers (including those the `Connection` header names) and the sidecar's own controls.
pub(crate) fn strip_request_headers(headers: &mut HeaderMap) {
    // Every `Connection` header's list counts (empty, and not allocated, without one).
    let listed: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    let doomed = |name: &HeaderName| {
        let name = name.as_str();
        is_hop_by_hop(name)
            // The app's own credentials, and what is recomputed for the upstream.
            || matches!(
                name,
                "authorization"
                    | "api-key"
                    | "x-api-key"
                    | "openai-organization"
                    | "openai-project"
                    | "proxy-authorization"
                    | "host"
                    | "content-length"
            )
            || name.starts_with(OWN_HEADER_PREFIX)
            || listed.iter().any(|value| connection_lists(value, name))
    };
    remove_where(headers, doomed);
}

/// Whether a `Connection` header value names the header `name` (lower case).
fn connection_lists(value: &HeaderValue, name: &str) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|listed| listed.trim().eq_ignore_ascii_case(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_credentials_and_hop_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-app"),
            ("x-api-key", "sk-app"),
            ("openai-organization", "org-app"),
            ("openai-project", "proj-app"),
            ("api-key", "sk-app"),
            ("proxy-authorization", "Basic app"),
            ("host", "127.0.0.1:4000"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("connection", "keep-alive, X-Hop"),
            ("connection", "x-hop-two"),
            ("x-hop", "1"),
            ("x-hop-two", "1"),
            ("x-llm-sidecar-prefer", "a"),
            ("content-type", "application/json"),
            ("traceparent", "00-abc-def-01"),
        ] {
            from.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_request_headers(&mut from);
        let mut names: Vec<&str> = from.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "traceparent"]);
    }
}
