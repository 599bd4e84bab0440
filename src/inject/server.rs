//! `llm-sidecar inject`: the mutating admission webhook over HTTPS (rustls). The API server
//! POSTs an `AdmissionReview` to `/inject/namespace` or `/inject/pod` (the path names the webhook
//! that matched); the answer admits the pod, with a JSON patch when the sidecar is added, or
//! denies it with the reason. The certificate is re-read when its files change (cert-manager
//! renewals, a rotated Secret) without a restart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{review, Decision, Scope, Template};

/// Admission requests are bounded by the API server's object size limit (about 1.5 MiB);
/// anything larger is not one.
const MAX_REVIEW_BYTES: usize = 4 << 20;
/// A client that has not finished its TLS handshake or request in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving certificate, swapped in place when its files change.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The PEM text last loaded, to notice a change.
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertStore, String> {
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = certified_key(&cert_pem, &key_pem)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        Ok(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::from_pointee(key),
            loaded: std::sync::Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Re-reads the files; swaps the certificate when they changed and parse. Returns whether it
    /// swapped. A half-written or broken pair keeps the old certificate serving.
    pub fn reload(&self) -> Result<bool, String> {
        let (cert_pem, key_pem) = read_pair(&self.cert_path, &self.key_path)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = certified_key(&cert_pem, &key_pem)?;
        self.current.store(Arc::new(key));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// Polls the files every `every` until the process ends.
    pub fn watch(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let store = self.clone();
                match tokio::task::spawn_blocking(move || store.reload()).await {
                    Ok(Ok(true)) => tracing::info!("serving a renewed certificate"),
                    Ok(Ok(false)) => {}
                    Ok(Err(why)) => {
                        tracing::warn!(reason = %why, "cannot load the renewed certificate; the previous one keeps serving")
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    Ok((read(cert)?, read(key)?))
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the PEM file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e}"))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| format!("certificate and key: {e}"))
}

/// The TLS settings: HTTP/2 and HTTP/1.1 by ALPN, the certificate from the store.
pub fn tls_config(certs: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves admission reviews until `shutdown` flips, then lets open requests finish (up to 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    template: Arc<Template>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            (tcp, peer) = crate::proxy::server::accept(&listener) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let template = template.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let service = service_fn(move |req| handle(req, template.clone()));
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    if let Err(err) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %err, %peer, "connection ended with an error");
                    }
                });
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}

async fn handle(
    req: Request<Incoming>,
    template: Arc<Template>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let scope = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok\n")),
        (&Method::POST, "/inject/namespace") => Scope::Namespace,
        (&Method::POST, "/inject/pod" | "/inject") => Scope::Pod,
        (_, "/inject/namespace" | "/inject/pod" | "/inject" | "/healthz") => {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"))
        }
        _ => return Ok(text(StatusCode::NOT_FOUND, "not found\n")),
    };
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(err) => {
            return Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("cannot read the review: {err}\n"),
            ))
        }
    };
    let (status, answer) = admit(&body, scope, &template);
    Ok(Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(answer.to_string())))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n")))
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    kind: Option<Kind>,
    namespace: Option<String>,
    operation: Option<String>,
    object: Option<Value>,
}

#[derive(Deserialize)]
struct Kind {
    #[serde(default)]
    group: String,
    kind: String,
}

/// Answers one review: the HTTP status and the `AdmissionReview` body. A review that cannot be
/// read is a 400 and a pod that cannot be parsed a 500 (the API server then applies the
/// webhook's `failurePolicy`); every decision is logged.
pub fn admit(body: &[u8], scope: Scope, template: &Template) -> (StatusCode, Value) {
    let review_in: ReviewIn = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("not an AdmissionReview: {e}") }),
            )
        }
    };
    let Some(request) = review_in.request else {
        return (
            StatusCode::BAD_REQUEST,
            json!({ "error": "the AdmissionReview has no request" }),
        );
    };
    let api_version = review_in
        .api_version
        .unwrap_or_else(|| "admission.k8s.io/v1".into());
    let answer = |response: Value| json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response });
    let uid = request.uid.clone();
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    if !is_pod || request.operation.as_deref() != Some("CREATE") {
        return (
            StatusCode::OK,
            answer(json!({ "uid": uid, "allowed": true })),
        );
    }
    let pod: Pod = match request.object.map(serde_json::from_value).transpose() {
        Ok(Some(pod)) => pod,
        Ok(None) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": "the review carries no pod" }),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the pod in an admission review");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({ "error": format!("cannot read the pod: {e}") }),
            );
        }
    };
    let namespace = request
        .namespace
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default();
    let response = match review(&pod, &namespace, scope, template) {
        Decision::Skip(why) => {
            tracing::info!(%namespace, pod = %name, reason = %why, "not injected");
            json!({ "uid": uid, "allowed": true })
        }
        Decision::Deny(why) => {
            tracing::warn!(%namespace, pod = %name, reason = %why, "pod denied");
            json!({
                "uid": uid,
                "allowed": false,
                "status": { "code": 400, "message": format!("llm-sidecar injector: {why}") },
            })
        }
        Decision::Inject { mode, patch } => {
            let patch = serde_json::to_vec(&patch).unwrap_or_default();
            tracing::info!(%namespace, pod = %name, ?mode, "sidecar injected");
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            })
        }
    };
    (StatusCode::OK, answer(response))
}

/// What `llm-sidecar inject` is given on its command line.
#[derive(Clone, Debug)]
pub struct InjectArgs {
    pub listen: SocketAddr,
    pub template: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
}

/// Loads the template and certificate (any problem is returned before a socket is opened),
/// binds, and serves until `shutdown` flips.
pub async fn run(args: InjectArgs, shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.template)
        .map_err(|e| format!("{}: {e}", args.template.display()))?;
    let template =
        Arc::new(Template::parse(&text).map_err(|e| format!("{}: {e}", args.template.display()))?);
    let certs = Arc::new(CertStore::load(&args.tls_cert, &args.tls_key)?);
    let tls = tls_config(certs.clone())?;
    certs.watch(Duration::from_secs(10));
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        image = template.container.image.as_deref().unwrap_or(""),
        mode = ?template.mode,
        "injector serving"
    );
    serve(listener, tls, template, shutdown).await;
    Ok(())
}
