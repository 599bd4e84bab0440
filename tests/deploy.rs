//! The manifests in `deploy/`: the Role grants exactly what the sidecar needs, and the example
//! ConfigMap is one the sidecar accepts (checked by `llm-sidecar check-config`, as an operator
//! would before `kubectl apply`).

mod support;

use std::path::Path;

use support::check_config;

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("manifest readable");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .collect()
}

fn strings(value: &serde_yaml::Value) -> Vec<&str> {
    value
        .as_sequence()
        .map(|s| s.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn role_grants_read_and_watch_on_one_configmap_and_event_creation_only() {
    let docs = documents("rbac.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Role", "RoleBinding"]);
    let role = &docs[1];
    let rules = role["rules"].as_sequence().expect("rules");
    assert_eq!(rules.len(), 2, "{rules:?}");

    let configmaps = &rules[0];
    assert_eq!(strings(&configmaps["apiGroups"]), [""]);
    assert_eq!(strings(&configmaps["resources"]), ["configmaps"]);
    assert_eq!(strings(&configmaps["resourceNames"]), ["llm-sidecar"]);
    assert_eq!(strings(&configmaps["verbs"]), ["get", "list", "watch"]);

    let events = &rules[1];
    assert_eq!(strings(&events["resources"]), ["events"]);
    assert_eq!(strings(&events["verbs"]), ["create"]);

    // The binding gives that Role, and only it, to the app's service account.
    let binding = &docs[2];
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], docs[0]["metadata"]["name"]);
    for doc in &docs {
        assert_eq!(doc["metadata"]["namespace"], "apps");
    }
}

#[test]
fn example_configmap_passes_check_config_and_a_bad_one_names_its_keys() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/configmap.yaml");
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid ConfigMap"));

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace("rollout_percent: \"100\"", "rollout_percent: \"150\"")
        .replace("shadow_percent: \"0\"", "shadow_percent: 0");
    std::fs::write(&bad, text).expect("write");
    let out = check_config(&bad);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data.shadow_percent: ConfigMap values must be strings"),
        "{stderr}"
    );
    assert!(
        stderr.contains("data.rollout_percent: 150 is out of range"),
        "{stderr}"
    );
}

/// The Jaeger manifest and the sidecar's env patch fit together: the sidecar accepts the patch's
/// variables and exports over gRPC to a Service port that reaches Jaeger's OTLP gRPC receiver.
#[test]
fn jaeger_receives_what_the_env_patch_makes_the_sidecar_send() {
    use llm_sidecar::settings::Settings;
    use llm_sidecar::telemetry::otel::Protocol;
    use std::collections::HashMap;

    let patch = &documents("jaeger/sidecar-otel-env.yaml")[0];
    let container = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "llm-sidecar");
    let mut env: HashMap<String, String> = HashMap::new();
    let mut downward: HashMap<String, String> = HashMap::new();
    for var in container["env"].as_sequence().expect("env") {
        let name = var["name"].as_str().expect("name").to_string();
        match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(value), None) => {
                env.insert(name, value.to_string());
            }
            (None, Some(path)) => {
                // What the kubelet would put there.
                env.insert(name.clone(), format!("from-{path}"));
                downward.insert(name, path.to_string());
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(downward["POD_NAME"], "metadata.name");
    assert_eq!(downward["POD_NAMESPACE"], "metadata.namespace");
    assert_eq!(downward["NODE_NAME"], "spec.nodeName");

    let settings = Settings::from_env(&env).expect("the sidecar accepts the patch");
    let otel = settings.otel.expect("tracing is on");
    assert_eq!(otel.protocol, Protocol::Grpc);
    assert_eq!(otel.k8s_attributes.len(), 3, "{:?}", otel.k8s_attributes);
    let uri: http::Uri = otel.endpoint.parse().expect("endpoint URL");
    let host = uri.host().expect("host");
    let port = uri.port_u16().expect("port");

    let jaeger = documents("jaeger/jaeger.yaml");
    let service = jaeger
        .iter()
        .find(|d| {
            d["kind"] == "Service"
                && format!(
                    "{}.{}.svc",
                    d["metadata"]["name"].as_str().unwrap_or(""),
                    d["metadata"]["namespace"].as_str().unwrap_or("")
                ) == host
        })
        .unwrap_or_else(|| panic!("no Service answers {host}"));
    let service_port = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(port)))
        .unwrap_or_else(|| panic!("the Service has no port {port}"));
    let target = service_port["targetPort"]
        .as_str()
        .expect("named target port");

    let deployment = jaeger
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"]
    );
    let ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_sequence()
        .expect("container ports");
    let container_port = ports
        .iter()
        .find(|p| p["name"].as_str() == Some(target))
        .unwrap_or_else(|| panic!("no container port named {target}"));
    assert_eq!(
        container_port["containerPort"].as_u64(),
        Some(4317),
        "OTLP gRPC"
    );
}
