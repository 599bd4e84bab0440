//! The sidecar injector's decision: given a pod the API server is about to create, whether to
//! add the sidecar and the JSON patch that does it. A pure function of the pod, its namespace,
//! the webhook it came through and the template the Helm chart rendered — the chart's sidecar
//! partial is the one source of the container (and of the volumes it mounts); the injector only
//! copies them, applies the pod's override annotations and points the app at it.

pub mod server;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, ResourceRequirements, Volume};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Label or annotation: `"true"` opts a pod in, `"false"` opts it out. On a namespace the label
/// `enabled` (or `true`) opts every pod in.
pub const INJECT: &str = "llm-sidecar.io/inject";
/// Set on an injected pod; its presence makes a second pass a no-op.
pub const STATUS: &str = "llm-sidecar.io/status";
/// Per-pod overrides.
pub const IMAGE: &str = "llm-sidecar.io/image";
pub const RESOURCES: &str = "llm-sidecar.io/resources";
pub const CONFIGMAP: &str = "llm-sidecar.io/configmap";
pub const MODE: &str = "llm-sidecar.io/mode";

/// Namespaces never injected, whatever their labels say.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The app's OpenAI SDK reads these.
pub const BASE_URL_ENV: &str = "OPENAI_BASE_URL";
pub const API_KEY_ENV: &str = "OPENAI_API_KEY";
/// The SDK refuses to start without a key; the sidecar drops it and adds the provider's.
pub const API_KEY_PLACEHOLDER: &str = "sk-llm-sidecar-injects-the-provider-key";

/// How the sidecar runs in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// An init container with `restartPolicy: Always` (Kubernetes ≥ 1.29): started before the
    /// app, stopped after it, and a Job still completes when its app exits.
    Native,
    /// A regular container next to the app (older clusters).
    Container,
}

/// What the chart renders into the injector's ConfigMap (`sidecar.yaml`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub mode: Mode,
    /// The sidecar's data port on 127.0.0.1: the app's `OPENAI_BASE_URL`.
    pub port: u16,
    pub container: Container,
    /// Pod volumes the container mounts (the Redis password Secret of shared budgets), added to
    /// the pod with it. Absent in the template when there are none.
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

impl Template {
    /// Parses and checks a template. Every key of the container must be one Kubernetes knows:
    /// a typo would otherwise be dropped without a word.
    pub fn parse(yaml: &str) -> Result<Template, String> {
        let raw: Value = serde_yaml::from_str(yaml).map_err(|e| format!("not YAML: {e}"))?;
        let template: Template =
            serde_json::from_value(raw.clone()).map_err(|e| format!("invalid template: {e}"))?;
        let parsed = serde_json::to_value(&template.container).map_err(|e| e.to_string())?;
        if let Some(field) = first_unknown(&raw["container"], &parsed, "container") {
            return Err(format!("invalid template: unknown field `{field}`"));
        }
        let parsed = serde_json::to_value(&template.volumes).map_err(|e| e.to_string())?;
        if let Some(field) = first_unknown(&raw["volumes"], &parsed, "volumes") {
            return Err(format!("invalid template: unknown field `{field}`"));
        }
        if template.container.name.is_empty() {
            return Err("invalid template: container.name is empty".into());
        }
        if template.container.image.as_deref().unwrap_or("").is_empty() {
            return Err("invalid template: container.image is empty".into());
        }
        if template.port == 0 {
            return Err("invalid template: port is 0".into());
        }
        let mounts = template
            .container
            .volume_mounts
            .as_deref()
            .unwrap_or_default();
        for (i, volume) in template.volumes.iter().enumerate() {
            if volume.name.is_empty() {
                return Err(format!("invalid template: volumes[{i}].name is empty"));
            }
            if template.volumes[..i].iter().any(|v| v.name == volume.name) {
                return Err(format!(
                    "invalid template: volume {:?} is listed twice",
                    volume.name
                ));
            }
            if !mounts.iter().any(|m| m.name == volume.name) {
                return Err(format!(
                    "invalid template: volume {:?} is not mounted by the container",
                    volume.name
                ));
            }
        }
        Ok(template)
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

/// The first path in `raw` that did not survive parsing into the Kubernetes type.
fn first_unknown(raw: &Value, parsed: &Value, path: &str) -> Option<String> {
    match (raw, parsed) {
        (Value::Object(raw), Value::Object(parsed)) => raw.iter().find_map(|(k, v)| {
            let here = format!("{path}.{k}");
            match parsed.get(k) {
                None if !v.is_null() => Some(here),
                None => None,
                Some(p) => first_unknown(v, p, &here),
            }
        }),
        (Value::Array(raw), Value::Array(parsed)) => raw
            .iter()
            .zip(parsed)
            .enumerate()
            .find_map(|(i, (r, p))| first_unknown(r, p, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Which webhook the pod came through: its path says why the API server sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The namespace is labelled: every pod is injected unless it opts out.
    Namespace,
    /// Only pods that opt in themselves, by label or annotation.
    Pod,
}

/// One JSON patch operation (RFC 6902); the injector only ever adds and replaces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchOp {
    pub op: String,
    pub path: String,
    pub value: Value,
}

impl PatchOp {
    fn add(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: "add".into(),
            path: path.into(),
            value,
        }
    }
    fn replace(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: "replace".into(),
            path: path.into(),
            value,
        }
    }
}

/// What the injector does with a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admit it unchanged, and why.
    Skip(String),
    /// Admit it with the sidecar added.
    Inject { mode: Mode, patch: Vec<PatchOp> },
    /// Refuse it: an opt-in or override annotation is wrong, and a pod without the sidecar it
    /// asked for would be worse than a clear error in its ReplicaSet's events.
    Deny(String),
}

/// Decides for one pod. `namespace` is the request's (a pod made from a template has none of its
/// own yet).
pub fn review(pod: &Pod, namespace: &str, scope: Scope, template: &Template) -> Decision {
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Decision::Skip(format!("namespace {namespace} is never injected"));
    }
    let labels = pod.metadata.labels.as_ref();
    let annotations = pod.metadata.annotations.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);

    if label("app.kubernetes.io/name") == Some("llm-sidecar")
        && label("app.kubernetes.io/component") == Some("injector")
    {
        return Decision::Skip("the injector's own pod".into());
    }
    // A label beats an annotation: it is what the webhook's selector matched.
    let opt = match label(INJECT).or_else(|| annotation(INJECT)) {
        None => None,
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => return Decision::Deny(format!("{INJECT}={v:?}: expected \"true\" or \"false\"")),
        },
    };
    match (opt, scope) {
        (Some(false), _) => return Decision::Skip(format!("opted out with {INJECT}=false")),
        (None, Scope::Pod) => return Decision::Skip("not opted in".into()),
        _ => {}
    }
    let spec = match &pod.spec {
        Some(spec) => spec,
        None => return Decision::Skip("the pod has no spec".into()),
    };
    let name = template.container.name.as_str();
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == name);
    if has_sidecar || annotation(STATUS).is_some() {
        return Decision::Skip(format!("already has the {name} container"));
    }

    let mode = match annotation(MODE).map(str::trim) {
        None => template.mode,
        Some("native") => Mode::Native,
        Some("container") => Mode::Container,
        Some(other) => {
            return Decision::Deny(format!(
                "{MODE}={other:?}: expected \"native\" or \"container\""
            ))
        }
    };
    let pod_volumes = spec.volumes.as_deref().unwrap_or_default();
    if let Some(clash) = template
        .volumes
        .iter()
        .find(|v| pod_volumes.iter().any(|p| p.name == v.name))
    {
        return Decision::Deny(format!(
            "the pod already has a volume named {:?}, which the sidecar brings itself",
            clash.name
        ));
    }
    let sidecar = match sidecar_container(template, mode, annotation) {
        Ok(c) => c,
        Err(why) => return Decision::Deny(why),
    };
    let sidecar = match serde_json::to_value(&sidecar) {
        Ok(v) => v,
        Err(e) => return Decision::Deny(format!("cannot render the sidecar: {e}")),
    };

    let mut patch = Vec::new();
    let base_url = template.base_url();
    for (i, app) in spec.containers.iter().enumerate() {
        patch.extend(app_env(i, app, &base_url));
    }
    match mode {
        Mode::Native => match &spec.init_containers {
            // First, so the app's own init containers can reach the sidecar too.
            Some(list) if !list.is_empty() => {
                patch.push(PatchOp::add("/spec/initContainers/0", sidecar))
            }
            _ => patch.push(PatchOp::add("/spec/initContainers", json!([sidecar]))),
        },
        Mode::Container => patch.push(PatchOp::add("/spec/containers/-", sidecar)),
    }
    if !template.volumes.is_empty() {
        let volumes = match serde_json::to_value(&template.volumes) {
            Ok(Value::Array(list)) => list,
            Ok(other) => return Decision::Deny(format!("cannot render the volumes: {other}")),
            Err(e) => return Decision::Deny(format!("cannot render the volumes: {e}")),
        };
        if pod_volumes.is_empty() {
            patch.push(PatchOp::add("/spec/volumes", Value::Array(volumes)));
        } else {
            for volume in volumes {
                patch.push(PatchOp::add("/spec/volumes/-", volume));
            }
        }
    }

    let mut new_annotations = vec![(STATUS, "injected".to_string())];
    let default_container = "kubectl.kubernetes.io/default-container";
    if mode == Mode::Container && annotation(default_container).is_none() {
        if let Some(app) = spec.containers.first() {
            // `kubectl logs` and `exec` keep landing in the app, not in the appended sidecar.
            new_annotations.push((default_container, app.name.clone()));
        }
    }
    if annotations.is_none() {
        let map: BTreeMap<&str, String> = new_annotations.into_iter().collect();
        patch.push(PatchOp::add("/metadata/annotations", json!(map)));
    } else {
        for (key, value) in new_annotations {
            patch.push(PatchOp::add(
                format!("/metadata/annotations/{}", pointer_escape(key)),
                json!(value),
            ));
        }
    }
    Decision::Inject { mode, patch }
}

/// The template's container with the pod's overrides applied.
fn sidecar_container<'a>(
    template: &Template,
    mode: Mode,
    annotation: impl Fn(&str) -> Option<&'a str>,
) -> Result<Container, String> {
    let mut c = template.container.clone();
    if let Some(image) = annotation(IMAGE).map(str::trim) {
        if image.is_empty() || image.contains(char::is_whitespace) {
            return Err(format!("{IMAGE}={image:?}: not an image reference"));
        }
        c.image = Some(image.to_string());
    }
    if let Some(raw) = annotation(RESOURCES) {
        let resources: ResourceRequirements = serde_json::from_str(raw).map_err(|e| {
            format!(
                "{RESOURCES}: {e} (expected JSON such as {{\"requests\":{{\"cpu\":\"50m\"}},\"limits\":{{\"memory\":\"128Mi\"}}}})"
            )
        })?;
        c.resources = Some(resources);
    }
    if let Some(name) = annotation(CONFIGMAP).map(str::trim) {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(format!("{CONFIGMAP}={name:?}: not a ConfigMap name"));
        }
        set_env(
            c.env.get_or_insert_with(Vec::new),
            crate::settings::ENV_CONFIGMAP,
            name,
        );
    }
    c.restart_policy = match mode {
        Mode::Native => Some("Always".into()),
        Mode::Container => None,
    };
    Ok(c)
}

fn set_env(env: &mut Vec<EnvVar>, name: &str, value: &str) {
    let var = EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    match env.iter_mut().find(|e| e.name == name) {
        Some(slot) => *slot = var,
        None => env.push(var),
    }
}

/// Points one app container at the sidecar: `OPENAI_BASE_URL` set (existing values are
/// replaced: the pod asked for the sidecar; every entry of that name, as the kubelet uses the
/// last), and a placeholder key when the container has neither an `OPENAI_API_KEY` nor an
/// `envFrom` that might hold one.
fn app_env(index: usize, app: &Container, base_url: &str) -> Vec<PatchOp> {
    let env = app.env.as_deref().unwrap_or_default();
    let mut ops = Vec::new();
    let mut added = Vec::new();
    let base = json!({ "name": BASE_URL_ENV, "value": base_url });
    let mut has_base = false;
    for (j, var) in env.iter().enumerate() {
        if var.name != BASE_URL_ENV {
            continue;
        }
        has_base = true;
        if var.value.as_deref() != Some(base_url) || var.value_from.is_some() {
            ops.push(PatchOp::replace(
                format!("/spec/containers/{index}/env/{j}"),
                base.clone(),
            ));
        }
    }
    if !has_base {
        added.push(base);
    }
    let has_key = env.iter().any(|e| e.name == API_KEY_ENV);
    let has_env_from = app.env_from.as_ref().is_some_and(|f| !f.is_empty());
    if !has_key && !has_env_from {
        added.push(json!({ "name": API_KEY_ENV, "value": API_KEY_PLACEHOLDER }));
    }
    if app.env.is_none() {
        if !added.is_empty() {
            ops.push(PatchOp::add(
                format!("/spec/containers/{index}/env"),
                Value::Array(added),
            ));
        }
    } else {
        for var in added {
            ops.push(PatchOp::add(format!("/spec/containers/{index}/env/-"), var));
        }
    }
    ops
}

/// JSON pointer escaping (RFC 6901) for a map key.
fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
