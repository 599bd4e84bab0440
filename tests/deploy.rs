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
