//! The manifests in `deploy/`: the Role grants exactly what the sidecar needs, the example
//! ConfigMap is one the sidecar accepts (checked by `llm-sidecar check-config`, as an operator
//! would before `kubectl apply`), and the commented-out Redis settings of the sidecar Deployment
//! are the chart's and ones the sidecar accepts.

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

/// deploy/sidecar-deployment.yaml with its commented-out blocks between `---- optional: <what>`
/// and `---- end of` uncommented, the way the file tells a user to.
fn uncommented(file: &str, what: &str) -> (usize, serde_yaml::Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("manifest readable");
    let (mut inside, mut blocks, mut out) = (false, 0, String::new());
    for line in text.lines() {
        let body = line.trim_start();
        if body.starts_with(&format!("# ---- optional: {what}")) {
            (inside, blocks) = (true, blocks + 1);
        } else if body.starts_with("# ---- end of") {
            inside = false;
        } else if inside {
            let indent = &line[..line.len() - body.len()];
            let code = body.strip_prefix("# ").expect("a commented line");
            out.push_str(&format!("{indent}{code}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(!inside, "an unterminated block");
    (
        blocks,
        serde_yaml::from_str(&out).expect("valid YAML once uncommented"),
    )
}

/// The Redis settings in the plain Deployment, once uncommented, are the chart's (the
/// `budgets-redis` golden template: URL from a Secret, the password Secret mounted read-only) and
/// ones the sidecar accepts.
#[test]
fn the_commented_redis_settings_are_the_charts_and_the_sidecar_takes_them() {
    use llm_sidecar::settings::Settings;
    use std::collections::HashMap;

    let (blocks, deployment) =
        uncommented("sidecar-deployment.yaml", "budgets shared through Redis");
    assert_eq!(blocks, 3, "env, volumeMounts and volumes");
    // As shipped, the sidecar has no Redis setting: budgets stay in memory.
    let shipped = &documents("sidecar-deployment.yaml")[0]["spec"]["template"]["spec"];
    let shipped_env = shipped["initContainers"][0]["env"].as_sequence().unwrap();
    assert!(shipped_env.iter().all(|e| !e["name"]
        .as_str()
        .unwrap()
        .starts_with("LLM_SIDECAR_REDIS_")));
    assert!(shipped.get("volumes").is_none());

    let spec = &deployment["spec"]["template"]["spec"];
    let sidecar = &spec["initContainers"][0];
    assert_eq!(sidecar["name"], "llm-sidecar");
    let env: Vec<&serde_yaml::Value> = sidecar["env"].as_sequence().unwrap().iter().collect();
    let named = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .copied()
            .unwrap_or_else(|| panic!("no {name}"))
    };

    let golden: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject/sidecar-redis.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let chart = &golden["container"];
    let chart_env = |name: &str| {
        chart["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap()
    };
    for name in ["LLM_SIDECAR_REDIS_URL", "LLM_SIDECAR_REDIS_PASSWORD_FILE"] {
        assert_eq!(named(name), &chart_env(name), "{name}");
    }
    assert_eq!(sidecar["volumeMounts"], chart["volumeMounts"]);
    assert_eq!(spec["volumes"], golden["volumes"]);

    // The password file is on the read-only mount of that volume.
    let mount = &sidecar["volumeMounts"][0];
    assert_eq!(mount["readOnly"], true);
    assert_eq!(mount["name"], spec["volumes"][0]["name"]);
    let file = named("LLM_SIDECAR_REDIS_PASSWORD_FILE")["value"]
        .as_str()
        .unwrap();
    let item = spec["volumes"][0]["secret"]["items"][0]["path"]
        .as_str()
        .unwrap();
    assert_eq!(
        file,
        format!("{}/{item}", mount["mountPath"].as_str().unwrap())
    );

    // What the kubelet would hand the sidecar: the URL from its Secret, the mounted file.
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join(item);
    std::fs::write(&password, "s3cret\n").unwrap();
    let mut vars: HashMap<String, String> = HashMap::new();
    for var in &env {
        let name = var["name"].as_str().unwrap();
        if !name.starts_with("LLM_SIDECAR_REDIS_") {
            continue;
        }
        let value = match name {
            "LLM_SIDECAR_REDIS_URL" => "rediss://redis.platform.svc:6380/0".to_string(),
            "LLM_SIDECAR_REDIS_PASSWORD_FILE" => password.display().to_string(),
            _ => var["value"].as_str().expect("a plain value").to_string(),
        };
        vars.insert(name.to_string(), value);
    }
    assert_eq!(vars.len(), 3, "{vars:?}");
    let redis = Settings::from_env(&vars)
        .expect("the sidecar accepts the Redis settings")
        .redis
        .expect("budgets go to Redis");
    assert_eq!(redis.password.as_deref(), Some("s3cret"));
    assert_eq!(redis.timeout, std::time::Duration::from_millis(50));
}
