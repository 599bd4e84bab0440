//! Providers over real TLS on loopback: a private CA trusted through
//! `LLM_SIDECAR_EXTRA_CA_FILE`, HTTP/2 when the provider offers it through ALPN, HTTP/1.1
//! otherwise, connections reused, and an untrusted certificate refused.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use tokio::net::TcpListener;

struct TlsProvider {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    ca_pem: String,
}

/// An OpenAI-ish provider behind TLS with a certificate for 127.0.0.1 from its own CA. It answers
/// every request with the HTTP version and Authorization header it saw.
async fn tls_provider(alpn: &[&[u8]]) -> TlsProvider {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
        .expect("ca cert");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf cert");

    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "path": req.uri().path(),
                        "authorization": req.headers().get("authorization").and_then(|v| v.to_str().ok()),
                    });
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                        body.to_string(),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsProvider {
        addr,
        connections,
        ca_pem: ca.pem(),
    }
}

fn tls_config(provider: &TlsProvider) -> String {
    format!(
        "providers:
  secure:
    kind: relay
    base_url: https://{}/v1
    api_key: {{ env: TEST_RELAY_KEY }}
routes:
  chat:
    relay: {{ provider: secure, model: m }}
",
        provider.addr
    )
}

async fn sidecar_trusting(provider: &TlsProvider, dir: &tempfile::TempDir) -> llm_sidecar::Sidecar {
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &provider.ca_pem).expect("write ca");
    let mut settings = test_settings();
    settings.extra_ca_file = Some(ca_path);
    sidecar_with(settings, &tls_config(provider)).await
}

async fn three_calls(sidecar: &llm_sidecar::Sidecar) -> Vec<serde_json::Value> {
    let client = client();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (status, _, body) = call_json(
            &client,
            post(
                sidecar.data_addr,
                "/v1/chat/completions",
                chat_body("chat", false),
            ),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        seen.push(body);
    }
    seen
}

#[tokio::test]
async fn a_provider_offering_h2_is_called_over_one_multiplexed_tls_connection() {
    let provider = tls_provider(&[b"h2", b"http/1.1"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = sidecar_trusting(&provider, &dir).await;
    for seen in three_calls(&sidecar).await {
        assert_eq!(seen["version"], "HTTP/2.0");
        assert_eq!(seen["path"], "/v1/chat/completions");
        assert_eq!(seen["authorization"], format!("Bearer {RELAY_KEY}"));
    }
    assert_eq!(provider.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_provider_without_h2_is_called_over_reused_http1_tls_connections() {
    let provider = tls_provider(&[b"http/1.1"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sidecar = sidecar_trusting(&provider, &dir).await;
    for seen in three_calls(&sidecar).await {
        assert_eq!(seen["version"], "HTTP/1.1");
    }
    assert_eq!(provider.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_with_a_502() {
    let provider = tls_provider(&[b"h2", b"http/1.1"]).await;
    let sidecar = sidecar(&tls_config(&provider)).await;
    let (status, headers, body) = ask_json(&sidecar, "chat", false).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "all_targets_failed"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(
        provider.connections.load(Ordering::SeqCst),
        2,
        "one retry, then give up"
    );
}

#[tokio::test]
async fn an_unreadable_extra_ca_file_stops_the_start() {
    let mut settings = test_settings();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-a-cert.pem");
    std::fs::write(&path, "hello").expect("write");
    settings.extra_ca_file = Some(path);
    let fake = fake().await;
    let err = llm_sidecar::Sidecar::start(
        &settings,
        &config(&fake, true),
        llm_sidecar::config::ConfigSource::Embedded,
        key_env(),
    )
    .await
    .err()
    .expect("start fails");
    assert!(
        err.to_string().contains("no PEM certificate found"),
        "{err}"
    );
}
