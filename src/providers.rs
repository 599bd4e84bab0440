//! Upstream providers: where they live, how their URLs are built, and their API keys, which are
//! held as redacted secrets and re-read from files when a mounted Secret rotates.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::{Deserialize, Serialize};

/// Whether a provider is the relay or an official API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Relay,
    Official,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Relay => "relay",
            ProviderKind::Official => "official",
        }
    }

    /// The other side: relay ↔ official.
    pub fn other(self) -> ProviderKind {
        match self {
            ProviderKind::Relay => ProviderKind::Official,
            ProviderKind::Official => ProviderKind::Relay,
        }
    }
}

/// A ready `Authorization` header value. Its Debug output never shows the key.
#[derive(Clone)]
pub struct Secret(HeaderValue);

impl Secret {
    /// Builds `Bearer <key>`; `None` when the key is empty or not a valid header value.
    pub fn bearer(key: &str) -> Option<Secret> {
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
        value.set_sensitive(true);
        Some(Secret(value))
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A key file (usually a mounted Kubernetes Secret) whose content is re-read when it changes.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
    current: ArcSwapOption<Secret>,
}

impl SecretFile {
    pub fn load(path: &Path) -> SecretFile {
        let file = SecretFile {
            path: path.to_path_buf(),
            current: ArcSwapOption::empty(),
        };
        file.refresh();
        file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file; a missing or unreadable file leaves the provider without a key, which
    /// requests report instead of sending unauthenticated calls.
    pub fn refresh(&self) {
        let next = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| Secret::bearer(&text));
        let changed = match (self.current.load().as_deref(), next.as_ref()) {
            (Some(old), Some(new)) => old.0 != new.0,
            (None, None) => false,
            _ => true,
        };
        if changed {
            tracing::info!(path = %self.path.display(), present = next.is_some(), "provider key file changed");
            self.current.store(next.map(Arc::new));
        }
    }

    pub fn get(&self) -> Option<Arc<Secret>> {
        self.current.load_full()
    }
}

/// Where a provider's key comes from.
#[derive(Debug)]
pub enum KeySource {
    /// No Authorization header is sent (for example an in-cluster relay without auth).
    None,
    /// Read once from an environment variable of the sidecar container.
    Env {
        var: String,
        value: Option<Arc<Secret>>,
    },
    /// Read from a file and re-read when it changes.
    File(Arc<SecretFile>),
}

impl KeySource {
    pub fn describe(&self) -> serde_json::Value {
        match self {
            KeySource::None => serde_json::Value::Null,
            KeySource::Env { var, value } => {
                serde_json::json!({ "env": var, "present": value.is_some() })
            }
            KeySource::File(file) => serde_json::json!({
                "file": file.path().display().to_string(),
                "present": file.get().is_some(),
            }),
        }
    }
}

/// A compiled provider.
#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash, e.g. `/v1` or `/v1beta/openai`.
    path_prefix: String,
    /// The `Host` header for requests to this provider.
    pub host_header: HeaderValue,
    pub key: KeySource,
    /// The upstream URIs of the model endpoints, built once: most requests use one of them.
    model_endpoints: Vec<(&'static str, Uri)>,
    /// What a background probe `GET`s while a breaker of this provider is open.
    pub probe_uri: Uri,
}

/// The default probe: listing models is free, and every OpenAI-compatible API answers it.
pub const DEFAULT_PROBE_PATH: &str = "/models";

/// The client paths whose upstream URI a provider keeps ready.
const MODEL_ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// What a request needs for its Authorization header.
pub enum Auth {
    None,
    Bearer(Arc<Secret>),
    Missing(String),
}

impl Provider {
    pub fn new(
        name: String,
        kind: ProviderKind,
        base_url: &str,
        key: KeySource,
    ) -> Result<Provider, String> {
        if !base_url.contains("://") {
            return Err(format!(
                "`{base_url}` has no scheme (use https:// or http://)"
            ));
        }
        let uri: Uri = base_url
            .parse()
            .map_err(|e| format!("`{base_url}` is not a valid URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("`{base_url}` has no scheme (use https:// or http://)"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!(
                "`{base_url}` has scheme `{scheme}`: only http and https are supported"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{base_url}` has no host"))?;
        if uri.query().is_some() {
            return Err(format!("`{base_url}` must not have a query string"));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("`{base_url}` has a host that is not a valid header value"))?;
        let mut provider = Provider {
            host_header,
            name,
            kind,
            base_url: base_url.to_string(),
            scheme,
            authority,
            path_prefix,
            key,
            model_endpoints: Vec::new(),
            probe_uri: Uri::default(),
        };
        provider.model_endpoints = MODEL_ENDPOINTS
            .iter()
            .map(|path| Ok((*path, provider.build_uri(path, None)?)))
            .collect::<Result<_, String>>()?;
        provider.set_probe_path(DEFAULT_PROBE_PATH)?;
        Ok(provider)
    }

    /// Points the background probe at `path` under the base URL (`/models`, `/health`).
    pub fn set_probe_path(&mut self, path: &str) -> Result<(), String> {
        let normalized = match crate::path::normalize(&format!("/v1{path}")) {
            Ok(crate::path::Normalized::Api(p)) if path.starts_with('/') => p.into_owned(),
            _ => {
                return Err(format!(
                    "`{path}` must be a path under the base URL, starting with `/`, without dot segments"
                ))
            }
        };
        self.probe_uri = self.build_uri(&normalized, None)?;
        Ok(())
    }

    /// Maps the client's `/v1/<rest>` path onto this provider's base URL.
    pub fn upstream_uri(&self, client_path: &str, query: Option<&str>) -> Result<Uri, String> {
        if query.is_none() {
            if let Some((_, uri)) = self.model_endpoints.iter().find(|(p, _)| *p == client_path) {
                return Ok(uri.clone());
            }
        }
        self.build_uri(client_path, query)
    }

    fn build_uri(&self, client_path: &str, query: Option<&str>) -> Result<Uri, String> {
        let rest = client_path.strip_prefix("/v1").unwrap_or(client_path);
        let mut path_and_query = String::with_capacity(self.path_prefix.len() + rest.len() + 16);
        path_and_query.push_str(&self.path_prefix);
        path_and_query.push_str(rest);
        if let Some(q) = query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| e.to_string())
    }

    /// Like [`Provider::upstream_uri`], from the client's path and query as one string.
    pub fn upstream_uri_from(&self, path_and_query: &str) -> Result<Uri, String> {
        match path_and_query.split_once('?') {
            Some((path, query)) => self.upstream_uri(path, Some(query)),
            None => self.upstream_uri(path_and_query, None),
        }
    }

    pub fn host(&self) -> &str {
        self.authority.host()
    }

    /// The port requests go to: the base URL's, else the scheme's default.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            })
    }

    /// Sets the headers that make a request this provider's: `Host` and the provider's key (no
    /// `Authorization` at all for a provider without one). `Err` carries a hint when the key is
    /// missing; the request must not be sent then.
    pub fn authorize(&self, headers: &mut http::HeaderMap) -> Result<(), String> {
        headers.insert(http::header::HOST, self.host_header.clone());
        match self.auth() {
            Auth::Bearer(secret) => {
                headers.insert(http::header::AUTHORIZATION, secret.header_value().clone());
                Ok(())
            }
            Auth::None => {
                headers.remove(http::header::AUTHORIZATION);
                Ok(())
            }
            Auth::Missing(hint) => Err(hint),
        }
    }

    pub fn auth(&self) -> Auth {
        match &self.key {
            KeySource::None => Auth::None,
            KeySource::Env { var, value } => match value {
                Some(secret) => Auth::Bearer(secret.clone()),
                None => Auth::Missing(format!(
                    "the environment variable {var} is not set in the sidecar"
                )),
            },
            KeySource::File(file) => match file.get() {
                Some(secret) => Auth::Bearer(secret),
                None => Auth::Missing(format!(
                    "the key file {} is missing or empty",
                    file.path().display()
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(base: &str) -> Provider {
        Provider::new("p".into(), ProviderKind::Official, base, KeySource::None).unwrap()
    }

    #[test]
    fn client_paths_map_onto_the_base_url() {
        let gemini = provider("https://generativelanguage.googleapis.com/v1beta/openai/");
        assert_eq!(
            gemini
                .upstream_uri("/v1/chat/completions", None)
                .unwrap()
                .to_string(),
            "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
        );
        let local = provider("http://127.0.0.1:9000/deepseek/v1");
        assert_eq!(
            local
                .upstream_uri("/v1/files", Some("purpose=batch"))
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9000/deepseek/v1/files?purpose=batch"
        );
    }

    #[test]
    fn bad_base_urls_are_explained() {
        for (base, needle) in [
            ("api.deepseek.com/v1", "no scheme"),
            ("ftp://x/v1", "only http and https"),
            ("https://x/v1?a=b", "query"),
        ] {
            let err =
                Provider::new("p".into(), ProviderKind::Relay, base, KeySource::None).unwrap_err();
            assert!(err.contains(needle), "{base}: {err}");
        }
    }

    #[test]
    fn authorizing_sets_host_and_key_and_leaves_no_authorization_for_a_keyless_provider() {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static(""));
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static(""),
        );
        let keyless = provider("http://127.0.0.1:9000/v1");
        keyless.authorize(&mut headers).unwrap();
        assert_eq!(headers[http::header::HOST], "127.0.0.1:9000");
        assert!(headers.get(http::header::AUTHORIZATION).is_none());
        let keyed = Provider::new(
            "k".into(),
            ProviderKind::Relay,
            "https://relay.example/v1",
            KeySource::Env {
                var: "K".into(),
                value: Some(Arc::new(Secret::bearer("sk-relay").unwrap())),
            },
        )
        .unwrap();
        keyed.authorize(&mut headers).unwrap();
        assert_eq!(headers[http::header::HOST], "relay.example");
        assert_eq!(headers[http::header::AUTHORIZATION], "Bearer sk-relay");
        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::bearer("sk-very-secret").unwrap();
        assert!(!format!("{secret:?}").contains("sk-very"));
        let source = KeySource::Env {
            var: "K".into(),
            value: Some(Arc::new(secret)),
        };
        assert!(!format!("{source:?}").contains("sk-very"));
        assert!(!source.describe().to_string().contains("sk-very"));
    }

    #[test]
    fn key_files_are_reread_when_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "first\n").unwrap();
        let file = SecretFile::load(&path);
        assert_eq!(file.get().unwrap().header_value(), "Bearer first");
        std::fs::write(&path, "second").unwrap();
        file.refresh();
        assert_eq!(file.get().unwrap().header_value(), "Bearer second");
        std::fs::remove_file(&path).unwrap();
        file.refresh();
        assert!(file.get().is_none());
    }
}
