//! Headers on the way back and the side a request starts on: hop-by-hop headers off an answer,
//! the headers every answer gets, and the side from the rollout key. What never reaches a
//! provider is left out where the provider's request is built ([`crate::outbound`]).

use super::*;
use crate::outbound::{is_hop_by_hop, number_header};

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
        headers.insert(HEADER_ROLLOUT_BUCKET, number_header(bucket.into()));
    }
    headers.insert(HEADER_GENERATION, snapshot.generation_header.clone());
}

/// Removes the headers that belong to one hop only. An answer has a few headers: finding each
/// one to drop by a scan is cheaper than a lookup for every hop-by-hop name.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    while let Some(name) = headers
        .keys()
        .find(|name| is_hop_by_hop(name.as_str()))
        .cloned()
    {
        headers.remove(&name);
    }
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
