//! Golden patches for several pods (`tests/golden/inject/<case>.pod.yaml` in,
//! `<case>.patch.json` out; `UPDATE_GOLDEN=1 cargo test` rewrites them after a deliberate
//! change), each also applied to its pod to check what the kubelet will run.

use super::*;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject")
}

fn template() -> Template {
    template_from("sidecar.yaml")
}

/// The chart's template with budgets shared through Redis (tests/chart/budgets-redis.yaml).
fn redis_template() -> Template {
    template_from("sidecar-redis.yaml")
}

fn template_from(file: &str) -> Template {
    let text = std::fs::read_to_string(golden_dir().join(file)).expect("template");
    Template::parse(&text).expect("the chart's template parses")
}

fn pod(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).expect("pod")
}

fn golden_pod(case: &str) -> (Pod, Value) {
    let text = std::fs::read_to_string(golden_dir().join(format!("{case}.pod.yaml"))).unwrap();
    (pod(&text), serde_yaml::from_str(&text).unwrap())
}

/// Runs one golden case and returns the patched pod.
fn golden_case(case: &str, scope: Scope) -> (Mode, Value) {
    golden_case_with(case, scope, &template())
}

fn golden_case_with(case: &str, scope: Scope, template: &Template) -> (Mode, Value) {
    let (pod, raw) = golden_pod(case);
    let namespace = pod.metadata.namespace.clone().unwrap();
    let Decision::Inject { mode, patch } = review(&pod, &namespace, scope, template) else {
        panic!("{case}: not injected");
    };
    let got = serde_json::to_string_pretty(&patch).unwrap() + "\n";
    let file = golden_dir().join(format!("{case}.patch.json"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&file, &got).unwrap();
    }
    let want = std::fs::read_to_string(&file)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", file.display()));
    assert_eq!(
        got,
        want,
        "{case}: the patch differs from {}",
        file.display()
    );
    (mode, apply(raw, &patch))
}

/// Applies add/replace operations (all the injector emits) the way the API server does.
fn apply(mut doc: Value, patch: &[PatchOp]) -> Value {
    for op in patch {
        let (parent, last) = op.path.rsplit_once('/').unwrap();
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{parent}"));
        match (op.op.as_str(), target) {
            ("add", Value::Array(list)) if last == "-" => list.push(op.value.clone()),
            ("add", Value::Array(list)) => list.insert(last.parse().unwrap(), op.value.clone()),
            ("replace", Value::Array(list)) => {
                list[last.parse::<usize>().unwrap()] = op.value.clone()
            }
            ("add" | "replace", Value::Object(map)) => {
                map.insert(last, op.value.clone());
            }
            (op, target) => panic!("cannot {op} at {parent}: {target}"),
        }
    }
    doc
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

fn template_container() -> Value {
    serde_json::to_value(&template().container).unwrap()
}

#[test]
fn a_plain_pod_in_a_labelled_namespace_gets_the_native_sidecar() {
    let (mode, pod) = golden_case("plain", Scope::Namespace);
    assert_eq!(mode, Mode::Native);
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    let mut want = template_container();
    want["restartPolicy"] = json!("Always");
    assert_eq!(
        init,
        &vec![want],
        "exactly the chart's container, as a native sidecar"
    );
    let app = &pod["spec"]["containers"][0];
    let env = env_of(app);
    assert_eq!(env[BASE_URL_ENV]["value"], "http://127.0.0.1:4000/v1");
    assert_eq!(env[API_KEY_ENV]["value"], API_KEY_PLACEHOLDER);
    assert_eq!(pod["metadata"]["annotations"][STATUS], "injected");
}

#[test]
fn a_labelled_pod_keeps_its_init_containers_and_key_and_loses_its_direct_base_url() {
    let (_, pod) = golden_case("labelled", Scope::Pod);
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["llm-sidecar", "migrate"], "the sidecar starts first");
    let worker = env_of(&pod["spec"]["containers"][0]);
    assert_eq!(worker[BASE_URL_ENV]["value"], "http://127.0.0.1:4000/v1");
    assert_eq!(worker.len(), 2, "{worker:?}");
    assert!(
        worker[API_KEY_ENV]["valueFrom"].is_object(),
        "the app's own key stays"
    );
    let summariser = env_of(&pod["spec"]["containers"][1]);
    assert_eq!(
        summariser[BASE_URL_ENV]["value"],
        "http://127.0.0.1:4000/v1"
    );
    assert!(
        !summariser.contains_key(API_KEY_ENV),
        "envFrom may hold the key"
    );
    assert_eq!(pod["metadata"]["annotations"]["team"], "search");
    assert_eq!(pod["metadata"]["annotations"][STATUS], "injected");
}

#[test]
fn every_base_url_entry_is_replaced_as_the_kubelet_uses_the_last() {
    // Replacing only the first left the app on the provider's URL.
    let text = r#"
metadata: {labels: {llm-sidecar.io/inject: "true"}}
spec:
  containers:
    - name: app
      image: app
      env:
        - {name: OPENAI_BASE_URL, value: "http://127.0.0.1:4000/v1"}
        - {name: OPENAI_BASE_URL, value: https://api.deepseek.com/v1}
"#;
    let Decision::Inject { patch, .. } = review(&pod(text), "apps", Scope::Pod, &template()) else {
        panic!("not injected");
    };
    let patched = apply(serde_yaml::from_str(text).unwrap(), &patch);
    let env = patched["spec"]["containers"][0]["env"].as_array().unwrap();
    assert_eq!(env.len(), 3, "{env:?}");
    for var in &env[..2] {
        assert_eq!(var["value"], "http://127.0.0.1:4000/v1", "{env:?}");
    }
    assert_eq!(
        env_of(&patched["spec"]["containers"][0])[BASE_URL_ENV]["value"],
        "http://127.0.0.1:4000/v1"
    );
}

#[test]
fn annotations_override_mode_image_resources_and_configmap() {
    let (mode, pod) = golden_case("overrides", Scope::Pod);
    assert_eq!(mode, Mode::Container);
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    let sidecar = &containers[1];
    assert_eq!(sidecar["name"], "llm-sidecar");
    assert!(sidecar.get("restartPolicy").is_none());
    assert_eq!(
        sidecar["image"],
        "registry.example/llm-sidecar:0.1.0-patched"
    );
    assert_eq!(sidecar["resources"]["requests"]["cpu"], "100m");
    assert_eq!(sidecar["resources"]["limits"]["memory"], "256Mi");
    assert_eq!(
        env_of(sidecar)["LLM_SIDECAR_CONFIGMAP"]["value"],
        "llm-sidecar-canary"
    );
    // Everything not overridden is the chart's.
    let mut rest = sidecar.clone();
    let mut want = template_container();
    for key in ["image", "resources", "env"] {
        rest.as_object_mut().unwrap().remove(key);
        want.as_object_mut().unwrap().remove(key);
    }
    assert_eq!(rest, want);
    assert!(pod["spec"].get("initContainers").is_none());
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "legacy"
    );
    assert_eq!(env_of(&containers[0])["LOG_LEVEL"]["value"], "info");
}

#[test]
fn with_redis_the_sidecar_brings_its_password_volume_after_the_pods_own() {
    let t = redis_template();
    assert_eq!(t.volumes.len(), 1);
    let (mode, pod) = golden_case_with("redis", Scope::Namespace, &t);
    assert_eq!(mode, Mode::Native);
    let mut want = serde_json::to_value(&t.container).unwrap();
    want["restartPolicy"] = json!("Always");
    assert_eq!(pod["spec"]["initContainers"], json!([want]));
    let sidecar = &pod["spec"]["initContainers"][0];
    let env = env_of(sidecar);
    assert_eq!(
        env["LLM_SIDECAR_REDIS_URL"]["valueFrom"]["secretKeyRef"],
        json!({"name": "llm-sidecar-redis", "key": "url"})
    );
    assert_eq!(
        env["LLM_SIDECAR_REDIS_PASSWORD_FILE"]["value"],
        "/etc/llm-sidecar/redis/password"
    );
    assert_eq!(
        sidecar["volumeMounts"],
        json!([{"name": "llm-sidecar-redis-password", "mountPath": "/etc/llm-sidecar/redis", "readOnly": true}])
    );
    // The pod's own volume stays first, the Secret's follows.
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let names: Vec<&str> = volumes
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cache", "llm-sidecar-redis-password"]);
    assert_eq!(
        volumes[1]["secret"],
        json!({"secretName": "llm-sidecar-redis-auth", "items": [{"key": "password", "path": "password"}]})
    );
    // The app is untouched but for OPENAI_BASE_URL (its envFrom may hold a key).
    let app = &pod["spec"]["containers"][0];
    assert_eq!(
        env_of(app).keys().collect::<Vec<_>>(),
        [BASE_URL_ENV],
        "{app}"
    );
    assert_eq!(app["volumeMounts"][0]["name"], "cache");

    // A pod without volumes gets the list; the default template adds none.
    let plain = pod_without_volumes();
    let Decision::Inject { patch, .. } = review(&plain, "apps", Scope::Namespace, &t) else {
        panic!("not injected");
    };
    let volume_ops: Vec<&PatchOp> = patch
        .iter()
        .filter(|op| op.path.starts_with("/spec/volumes"))
        .collect();
    assert_eq!(volume_ops.len(), 1, "{patch:?}");
    assert_eq!(volume_ops[0].path, "/spec/volumes");
    assert_eq!(
        volume_ops[0].value,
        serde_json::to_value(&t.volumes).unwrap()
    );
    let Decision::Inject { patch, .. } = review(&plain, "apps", Scope::Namespace, &template())
    else {
        panic!("not injected");
    };
    assert!(
        patch.iter().all(|op| !op.path.starts_with("/spec/volumes")),
        "{patch:?}"
    );
}

fn pod_without_volumes() -> Pod {
    pod("spec: {containers: [{name: app, image: app}]}")
}

#[test]
fn a_pod_that_already_has_the_sidecars_volume_name_is_denied() {
    let clash = pod(r#"
spec:
  containers: [{name: app, image: app}]
  volumes: [{name: llm-sidecar-redis-password, emptyDir: {}}]
"#);
    match review(&clash, "apps", Scope::Namespace, &redis_template()) {
        Decision::Deny(why) => assert!(
            why.contains("\"llm-sidecar-redis-password\"") && why.contains("volume"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    // Without Redis the template brings no volume and the same pod is injected.
    assert!(matches!(
        review(&clash, "apps", Scope::Namespace, &template()),
        Decision::Inject { .. }
    ));
}

#[test]
fn an_injected_pod_is_left_alone_on_a_second_pass() {
    let (_, patched) = golden_case("plain", Scope::Namespace);
    let again: Pod = serde_json::from_value(patched).unwrap();
    let decision = review(&again, "apps", Scope::Namespace, &template());
    assert!(
        matches!(decision, Decision::Skip(ref why) if why.contains("already")),
        "{decision:?}"
    );
    // A pod written with the sidecar by hand (deploy/sidecar-deployment.yaml) too.
    let by_hand = pod(r#"
metadata: {labels: {llm-sidecar.io/inject: "true"}}
spec:
  initContainers: [{name: llm-sidecar, image: x, restartPolicy: Always}]
  containers: [{name: app, image: app}]
"#);
    assert!(matches!(
        review(&by_hand, "apps", Scope::Pod, &template()),
        Decision::Skip(_)
    ));
}

#[test]
fn system_namespaces_the_injector_itself_and_opted_out_pods_are_skipped() {
    let t = template();
    let plain = pod("spec: {containers: [{name: app, image: app}]}");
    for ns in SYSTEM_NAMESPACES {
        assert!(matches!(
            review(&plain, ns, Scope::Namespace, &t),
            Decision::Skip(_)
        ));
    }
    let injector = pod(r#"
metadata:
  labels: {app.kubernetes.io/name: llm-sidecar, app.kubernetes.io/component: injector}
spec: {containers: [{name: inject, image: x}]}
"#);
    assert!(matches!(
        review(&injector, "llm-sidecar", Scope::Namespace, &t),
        Decision::Skip(_)
    ));
    let opted_out = pod(r#"
metadata: {annotations: {llm-sidecar.io/inject: "false"}}
spec: {containers: [{name: app, image: app}]}
"#);
    assert!(matches!(
        review(&opted_out, "apps", Scope::Namespace, &t),
        Decision::Skip(_)
    ));
    // Through the pod webhook, a pod that did not opt in is not touched.
    assert!(matches!(
        review(&plain, "apps", Scope::Pod, &t),
        Decision::Skip(_)
    ));
    assert!(matches!(
        review(&plain, "apps", Scope::Namespace, &t),
        Decision::Inject { .. }
    ));
}

#[test]
fn wrong_annotations_deny_the_pod_with_the_reason() {
    let t = template();
    for (key, value, words) in [
        (INJECT, "yes", "expected \"true\" or \"false\""),
        (MODE, "sidecar", "expected \"native\" or \"container\""),
        (RESOURCES, "{cpu: 1}", "llm-sidecar.io/resources"),
        (CONFIGMAP, "Not_A_Name", "not a ConfigMap name"),
        (IMAGE, "two words", "not an image reference"),
    ] {
        let mut p = pod("spec: {containers: [{name: app, image: app}]}");
        p.metadata.annotations = Some(
            [(key.to_string(), value.to_string())]
                .into_iter()
                .chain((key != INJECT).then(|| (INJECT.to_string(), "true".to_string())))
                .collect(),
        );
        match review(&p, "apps", Scope::Pod, &t) {
            Decision::Deny(why) => assert!(why.contains(words), "{key}: {why}"),
            other => panic!("{key}={value}: {other:?}"),
        }
    }
}

#[test]
fn templates_with_unknown_fields_are_refused() {
    let good = std::fs::read_to_string(golden_dir().join("sidecar.yaml")).unwrap();
    let typo = good.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let err = Template::parse(&typo).unwrap_err();
    assert!(
        err.contains("container.securityContext.readOnlyRootFileSystem"),
        "{err}"
    );
    let err = Template::parse(&good.replace("mode: native", "mode: hybrid")).unwrap_err();
    assert!(err.contains("hybrid"), "{err}");
    assert!(Template::parse("mode: native\nport: 4000\n").is_err());

    // The volumes are checked the same way, and each must be one the container mounts.
    let redis = std::fs::read_to_string(golden_dir().join("sidecar-redis.yaml")).unwrap();
    let err = Template::parse(&redis.replace("secretName:", "secretname:")).unwrap_err();
    assert!(err.contains("volumes[0].secret.secretname"), "{err}");
    let err = Template::parse(&redis.replace(
        "  volumeMounts:\n    - name: llm-sidecar-redis-password\n",
        "  volumeMounts:\n    - name: something-else\n",
    ))
    .unwrap_err();
    assert!(err.contains("not mounted by the container"), "{err}");
}
