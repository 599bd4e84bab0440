//! The one way a request to a provider is made, for pass-through calls, attempts and shadows:
//! the provider's URI for the client's path, the provider's `Host` and key, the body's length,
//! and the `traceparent` of the attempt's span. What the sidecar's own config cannot build
//! is a [`Misconfigured`] error, and nothing is sent.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
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

/// Builds the request for `provider`: `forwarded` are the app's headers, already stripped of
/// what must not be forwarded; `path_and_query` is the client's (normalised) path and query.
pub fn request(
    provider: &Provider,
    method: Method,
    path_and_query: &str,
    forwarded: &HeaderMap,
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
    // A map built with room for what is added (a clone of the app's would have none: every
    // insert past its length regrows it, here and again as hyper reuses it for the answer).
    let mut headers = HeaderMap::with_capacity(forwarded.len() + ADDED_HEADERS);
    for (name, value) in forwarded {
        headers.append(name.clone(), value.clone());
    }
    provider
        .authorize(&mut headers)
        .map_err(|hint| misconfigured("provider_key_missing", hint))?;
    if body.is_empty() {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{KeySource, ProviderKind, Secret};
    use std::sync::Arc;

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
        let key = KeySource::Env {
            var: "K".into(),
            value: Secret::bearer("sk-provider").map(Arc::new),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let request = request(
            &provider(key),
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
}
