//! The one way a request to a provider is made, for pass-through calls, attempts and shadows:
//! the app's headers less what must not reach a provider, the provider's URI for the client's
//! path, the provider's `Host` and key, the body's length, and the `traceparent` of the
//! attempt's span. What the sidecar's own config cannot build is a [`Misconfigured`] error,
//! and nothing is sent.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::Full;

use crate::providers::Provider;

/// Why the sidecar could not build a request for a provider: its own config is at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Misconfigured {
    /// `provider_key_missing` or `bad_upstream_uri`.
    pub code: &'static str,
    pub provider: String,
    /// What is missing or wrong (never a key).
    pub detail: String,
}

impl std::fmt::Display for Misconfigured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            "provider_key_missing" => write!(f, "no API key for provider `{}`: ", self.provider)?,
            _ => write!(
                f,
                "cannot build a request for provider `{}`: ",
                self.provider
            )?,
        }
        f.write_str(&self.detail)
    }
}

/// The headers [`request`] adds to the app's: `Host`, the key, `Content-Length` and
/// `traceparent`.
const ADDED_HEADERS: usize = 4;

/// The prefix of the sidecar's own headers: the app's controls on a request, never forwarded.
const OWN_HEADER_PREFIX: &str = "x-llm-sidecar-";

/// Builds the request for `provider`: `app` are the headers the app sent (what must not reach
/// a provider is left out, [`forwardable`]); `path_and_query` is the client's (normalised) path
/// and query.
pub fn request(
    provider: &Provider,
    method: Method,
    path_and_query: &str,
    app: &HeaderMap,
    body: Bytes,
    traceparent: Option<HeaderValue>,
) -> Result<Request<Full<Bytes>>, Misconfigured> {
    let misconfigured = |code, detail| Misconfigured {
        code,
        provider: provider.name.clone(),
        detail,
    };
    let uri = provider
        .upstream_uri_from(path_and_query)
        .map_err(|why| misconfigured("bad_upstream_uri", format!("{path_and_query}: {why}")))?;
    // Every `Connection` header's list counts (none, and nothing allocated, without one).
    let listed: Vec<&HeaderValue> = app.get_all(header::CONNECTION).iter().collect();
    let forwarded = || app.iter().filter(|(name, _)| forwardable(name, &listed));
    // A map built with room for exactly what goes in: a clone of the app's would have no room
    // for what is added, and room for the app's credentials would be wasted (a map's entries
    // past 1 KiB take the allocator's slow path).
    let mut headers = HeaderMap::with_capacity(forwarded().count() + ADDED_HEADERS);
    for (name, value) in forwarded() {
        headers.append(name.clone(), value.clone());
    }
    provider
        .authorize(&mut headers)
        .map_err(|hint| misconfigured("provider_key_missing", hint))?;
    if !body.is_empty() {
        headers.insert(header::CONTENT_LENGTH, number_header(body.len() as u64));
    }
    if let Some(traceparent) = traceparent {
        // The app's `tracestate` goes on unchanged: the trace is still the app's.
        headers.insert(crate::telemetry::otel::TRACEPARENT, traceparent);
    }
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// `n` as a header value, in one allocation. `HeaderValue::from` an integer takes two: it
/// writes the digits into a buffer with room to spare, and `Bytes` puts a shared header on
/// a buffer whose length is not its capacity.
pub fn number_header(n: u64) -> HeaderValue {
    HeaderValue::from_str(itoa::Buffer::new().format(n)).expect("digits are a header value")
}

/// Whether an app's header goes on to the provider: not the app's credentials, not what is
/// recomputed for the provider (`Host`, `Content-Length`), not hop-by-hop headers (including
/// those a `Connection` header in `listed` names), not the sidecar's own controls.
fn forwardable(name: &HeaderName, listed: &[&HeaderValue]) -> bool {
    let name = name.as_str();
    let dropped = is_hop_by_hop(name)
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
        || listed.iter().any(|value| connection_lists(value, name));
    !dropped
}

/// Headers that belong to one hop only.
pub fn is_hop_by_hop(name: &str) -> bool {
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
    use crate::providers::{KeySource, ProviderKind, Secret};
    use std::sync::Arc;

    /// A provider with a key.
    fn keyed() -> Provider {
        provider(KeySource::Env {
            var: "K".into(),
            value: Secret::bearer("sk-provider").map(Arc::new),
        })
    }

    fn provider(key: KeySource) -> Provider {
        Provider::new(
            "deep".into(),
            ProviderKind::Official,
            "https://api.example.com/v1",
            key,
        )
        .unwrap()
    }

    #[test]
    fn a_request_carries_the_providers_uri_host_key_and_length() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let request = request(
            &keyed(),
            Method::POST,
            "/v1/chat/completions?x=1",
            &headers,
            Bytes::from_static(b"{}"),
            None,
        )
        .unwrap();
        assert_eq!(
            request.uri(),
            "https://api.example.com/v1/chat/completions?x=1"
        );
        let h = request.headers();
        assert_eq!(h[header::HOST], "api.example.com");
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-provider");
        assert_eq!(h[header::CONTENT_LENGTH], "2");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert!(
            h.get("traceparent").is_none(),
            "no trace context without a span"
        );
    }

    #[test]
    fn a_missing_key_is_the_sidecars_misconfiguration_and_names_the_provider() {
        let key = KeySource::Env {
            var: "DEEP_KEY".into(),
            value: None,
        };
        let err = request(
            &provider(key),
            Method::GET,
            "/v1/models",
            &HeaderMap::new(),
            Bytes::new(),
            None,
        )
        .unwrap_err();
        assert_eq!(err.code, "provider_key_missing");
        let message = err.to_string();
        assert!(
            message.contains("`deep`") && message.contains("DEEP_KEY"),
            "{message}"
        );
    }

    #[test]
    fn the_apps_credentials_hop_headers_and_controls_are_not_forwarded() {
        let mut app = HeaderMap::new();
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
            app.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let request = request(
            &keyed(),
            Method::POST,
            "/v1/chat/completions",
            &app,
            Bytes::from_static(b"{}"),
            None,
        )
        .unwrap();
        let h = request.headers();
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "authorization",
                "content-length",
                "content-type",
                "host",
                "traceparent"
            ]
        );
        // Only the provider's values, each once.
        assert_eq!(h.get_all(header::AUTHORIZATION).iter().count(), 1);
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-provider");
        assert_eq!(h[header::HOST], "api.example.com");
        assert_eq!(h[header::CONTENT_LENGTH], "2");
    }

    #[test]
    fn a_bodiless_request_has_no_length() {
        let mut app = HeaderMap::new();
        app.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let request = request(
            &provider(KeySource::None),
            Method::GET,
            "/v1/models",
            &app,
            Bytes::new(),
            None,
        )
        .unwrap();
        assert!(request.headers().get(header::CONTENT_LENGTH).is_none());
        assert!(request.headers().get(header::AUTHORIZATION).is_none());
    }

    #[test]
    fn numbers_are_header_values() {
        for n in [0, 7, 1234, u64::MAX] {
            assert_eq!(number_header(n), n.to_string().as_str());
        }
    }
}
