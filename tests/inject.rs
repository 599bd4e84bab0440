//! The injector's HTTPS webhook over a real TLS socket, the way the API server calls it: an
//! `AdmissionReview` POSTed to `/inject/namespace` or `/inject/pod`, answered with a base64
//! JSON patch (the golden one), a denial with its reason, or a plain admit; a renewed certificate
//! is served without a restart.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use llm_sidecar::inject::server::{serve, tls_config, CertStore};
use llm_sidecar::inject::Template;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn golden(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/inject")
            .join(name),
    )
    .expect("golden file")
}

/// A CA and a leaf for `localhost` / 127.0.0.1 signed by it, as PEM.
fn ca_and_leaf() -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&key, &ca)
        .expect("leaf");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

struct Injector {
    addr: std::net::SocketAddr,
    certs: Arc<CertStore>,
    dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

async fn injector(cert_pem: &str, key_pem: &str) -> Injector {
    injector_with(cert_pem, key_pem, "sidecar.yaml").await
}

/// An injector serving one of the chart's golden templates.
async fn injector_with(cert_pem: &str, key_pem: &str, template: &str) -> Injector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tls.crt"), cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), key_pem).unwrap();
    let certs = Arc::new(
        CertStore::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).expect("certs"),
    );
    let template = Arc::new(Template::parse(&golden(template)).expect("template"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        tls_config(certs.clone()).unwrap(),
        template,
        stopped,
    ));
    Injector {
        addr,
        certs,
        dir,
        _stop: stop,
    }
}

/// One HTTPS request trusting only `ca_pem`; `Err` when the TLS handshake fails.
async fn call(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, bytes.to_vec()))
}

fn review(uid: &str, namespace: &str, kind: &str, object: Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": kind },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": object,
            "dryRun": false,
        }
    })
    .to_string()
    .into_bytes()
}

fn golden_pod(case: &str) -> Value {
    serde_yaml::from_str(&golden(&format!("{case}.pod.yaml"))).unwrap()
}

#[tokio::test]
async fn a_pod_in_a_labelled_namespace_is_answered_with_the_golden_patch_over_tls() {
    let (ca, cert, key) = ca_and_leaf();
    let inj = injector(&cert, &key).await;
    let (status, body) = call(
        inj.addr,
        &ca,
        "POST",
        "/inject/namespace",
        review("7f1c", "apps", "Pod", golden_pod("plain")),
    )
    .await
    .expect("call");
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(
        response["uid"], "7f1c",
        "the API server matches answers by uid"
    );
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    let want: Value = serde_json::from_str(&golden("plain.patch.json")).unwrap();
    assert_eq!(patch, want);

    // The same pod through the pod-scoped webhook did not opt in: admitted untouched.
    let (_, body) = call(
        inj.addr,
        &ca,
        "POST",
        "/inject/pod",
        review("7f1d", "apps", "Pod", golden_pod("plain")),
    )
    .await
    .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
}

fn patch_of(answer: &Value) -> Value {
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    serde_json::from_slice(&patch).unwrap()
}

#[tokio::test]
async fn with_the_charts_redis_template_the_patch_adds_the_password_volume() {
    let (ca, cert, key) = ca_and_leaf();
    let inj = injector_with(&cert, &key, "sidecar-redis.yaml").await;
    let (status, body) = call(
        inj.addr,
        &ca,
        "POST",
        "/inject/namespace",
        review("r1", "apps", "Pod", golden_pod("redis")),
    )
    .await
    .expect("call");
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let want: Value = serde_json::from_str(&golden("redis.patch.json")).unwrap();
    assert_eq!(patch_of(&answer), want);

    // A pod whose own volume has the sidecar's volume name is refused, with the name.
    let mut clash = golden_pod("redis");
    clash["spec"]["volumes"][0]["name"] = json!("llm-sidecar-redis-password");
    let (_, body) = call(
        inj.addr,
        &ca,
        "POST",
        "/inject/namespace",
        review("r2", "apps", "Pod", clash),
    )
    .await
    .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("llm-sidecar-redis-password"), "{message}");
}

#[tokio::test]
async fn bad_annotations_are_denied_and_other_objects_and_garbage_are_not_patched() {
    let (ca, cert, key) = ca_and_leaf();
    let inj = injector(&cert, &key).await;
    let mut pod = golden_pod("overrides");
    pod["metadata"]["annotations"]["llm-sidecar.io/resources"] = json!("lots");
    let (status, body) = call(
        inj.addr,
        &ca,
        "POST",
        "/inject/pod",
        review("a1", "legacy", "Pod", pod),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("llm-sidecar injector") && message.contains("llm-sidecar.io/resources"),
        "{message}"
    );

    let (_, body) = call(
        inj.addr,
        &ca,
        "POST",
        "/inject/namespace",
        review(
            "a2",
            "apps",
            "Service",
            json!({"metadata": {"name": "svc"}}),
        ),
    )
    .await
    .unwrap();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());

    let (status, _) = call(inj.addr, &ca, "POST", "/inject/pod", b"{not json".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 400);
    let (status, body) = call(inj.addr, &ca, "GET", "/healthz", Vec::new())
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
    let (status, _) = call(inj.addr, &ca, "GET", "/inject/pod", Vec::new())
        .await
        .unwrap();
    assert_eq!(status, 405);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let (old_ca, cert, key) = ca_and_leaf();
    let inj = injector(&cert, &key).await;
    assert!(call(inj.addr, &old_ca, "GET", "/healthz", Vec::new())
        .await
        .is_ok());

    // A half-written renewal keeps the old certificate.
    std::fs::write(
        inj.dir.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(inj.certs.reload().is_err());
    assert!(call(inj.addr, &old_ca, "GET", "/healthz", Vec::new())
        .await
        .is_ok());

    let (new_ca, cert, key) = ca_and_leaf();
    std::fs::write(inj.dir.path().join("tls.crt"), &cert).unwrap();
    std::fs::write(inj.dir.path().join("tls.key"), &key).unwrap();
    assert_eq!(inj.certs.reload(), Ok(true));
    assert_eq!(
        inj.certs.reload(),
        Ok(false),
        "unchanged files are not reloaded"
    );
    assert!(call(inj.addr, &new_ca, "GET", "/healthz", Vec::new())
        .await
        .is_ok());
    let refused = call(inj.addr, &old_ca, "GET", "/healthz", Vec::new()).await;
    assert!(refused.unwrap_err().contains("handshake"));
}
