//! Shared by tests/helm_chart.rs and tests/deploy_manifests.rs: reading Kubernetes manifests
//! strictly (a field no type knows is an error), rendering deploy/ with `kubectl kustomize`, and
//! the emulated API server (tests/kmock) to apply them to.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod helm;
pub mod kmock;

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodTemplateSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use profiles_sync::crd::{SelectiveSync, WarehouseConnection};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The image both installs run by default (the chart's appVersion).
pub const IMAGE: &str = "ghcr.io/profiles-sync/profiles-sync:0.1.0";

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo().join("charts/profiles-sync")
}

/// The documents of a YAML stream, without the empty ones.
pub fn yaml_docs(text: &str, origin: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: not YAML: {e}\n{text}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every leaf of `written` must appear, equal, in `parsed`: a field the types do not know (a typo,
/// a field at the wrong level) is dropped by deserialization and shows up here.
pub fn assert_no_unknown_fields(written: &Value, parsed: &Value, path: &str) {
    match (written, parsed) {
        (Value::Object(w), Value::Object(p)) => {
            for (k, v) in w {
                let sub = format!("{path}.{k}");
                let Some(pv) = p.get(k) else {
                    panic!("{sub} is not a field of the type");
                };
                assert_no_unknown_fields(v, pv, &sub);
            }
        }
        (Value::Array(w), Value::Array(p)) => {
            assert_eq!(w.len(), p.len(), "{path}");
            for (i, (wv, pv)) in w.iter().zip(p).enumerate() {
                assert_no_unknown_fields(wv, pv, &format!("{path}[{i}]"));
            }
        }
        // k8s-openapi holds some numbers as f64 (JSONSchemaProps.maximum): 5000 reads back 5000.0.
        (Value::Number(w), Value::Number(p)) => {
            assert!(w == p || w.as_f64() == p.as_f64(), "{path}: {w} != {p}")
        }
        (w, p) => assert_eq!(w, p, "{path}"),
    }
}

/// Deserializes `doc` as a `T` and fails on any field `T` does not have.
pub fn strict<T: serde::de::DeserializeOwned + Serialize>(doc: &Value, origin: &str) -> T {
    let parsed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let reserialized = serde_json::to_value(&parsed).expect("serializable");
    assert_no_unknown_fields(doc, &reserialized, origin);
    parsed
}

/// A Prometheus Operator ServiceMonitor, as far as the chart writes one; unknown fields are errors.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

/// `ServiceMonitor.spec`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorSpec {
    pub selector: LabelSelector,
    pub namespace_selector: ServiceMonitorNamespaceSelector,
    pub endpoints: Vec<ServiceMonitorEndpoint>,
}

/// `ServiceMonitor.spec.namespaceSelector`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorNamespaceSelector {
    pub match_names: Vec<String>,
}

/// `ServiceMonitor.spec.endpoints[]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorEndpoint {
    pub port: String,
    pub path: String,
    pub interval: String,
    pub scrape_timeout: String,
}

/// One object of a manifest, read with its type.
// Test values, made and dropped one at a time: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Object {
    Namespace(Namespace),
    Crd(CustomResourceDefinition),
    ServiceAccount(ServiceAccount),
    Secret(Secret),
    ConfigMap(ConfigMap),
    Service(Service),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    NetworkPolicy(NetworkPolicy),
    PodDisruptionBudget(PodDisruptionBudget),
    ServiceMonitor(ServiceMonitor),
    WarehouseConnection(WarehouseConnection),
    SelectiveSync(SelectiveSync),
}

impl Object {
    /// The pod template of a workload.
    pub fn pod_template(&self) -> Option<&PodTemplateSpec> {
        match self {
            Object::Deployment(d) => d.spec.as_ref().map(|s| &s.template),
            Object::StatefulSet(s) => s.spec.as_ref().map(|s| &s.template),
            _ => None,
        }
    }
}

/// Reads one manifest document strictly with the type its apiVersion and kind name; a kind
/// the installs are not expected to contain is an error too.
pub fn parse_strictly(doc: &Value, origin: &str) -> Object {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let at = format!("{origin}: {kind} {name}");
    match (api_version, kind) {
        ("v1", "Namespace") => Object::Namespace(strict(doc, &at)),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => Object::Crd(strict(doc, &at)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(doc, &at)),
        ("v1", "Secret") => {
            // kustomize wraps long base64 values over lines; the API server's decoder skips
            // the line breaks, as this does.
            let mut doc = doc.clone();
            let data = doc.get_mut("data").and_then(Value::as_object_mut);
            for v in data.into_iter().flat_map(|d| d.values_mut()) {
                if let Value::String(s) = v {
                    s.retain(|c| c != '\n');
                }
            }
            Object::Secret(strict(&doc, &at))
        }
        ("v1", "ConfigMap") => Object::ConfigMap(strict(doc, &at)),
        ("v1", "Service") => Object::Service(strict(doc, &at)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(strict(doc, &at)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(strict(doc, &at))
        }
        ("apps/v1", "Deployment") => Object::Deployment(strict(doc, &at)),
        ("apps/v1", "StatefulSet") => Object::StatefulSet(strict(doc, &at)),
        ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(strict(doc, &at)),
        ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(strict(doc, &at)),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => Object::ServiceMonitor(strict(doc, &at)),
        ("profilesync.dev/v1alpha1", "WarehouseConnection") => {
            Object::WarehouseConnection(strict(doc, &at))
        }
        ("profilesync.dev/v1alpha1", "SelectiveSync") => Object::SelectiveSync(strict(doc, &at)),
        _ => panic!("{at}: unexpected apiVersion {api_version:?} / kind {kind:?}"),
    }
}

/// `(kind, name)` of a manifest document.
pub fn kind_name(doc: &Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_string(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// The first document of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind_name(d) == (kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", kinds(docs)))
}

/// `kind/name` of every document, for messages.
pub fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            let (k, n) = kind_name(d);
            format!("{k}/{n}")
        })
        .collect()
}

/// `kubectl` (`$KUBECTL`, else the `PATH`'s: under `make test`, the pinned one
/// `tests/kubectl/install.sh` installs). `kustomize` needs no server.
pub fn kubectl() -> Command {
    Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()))
}

/// `kubectl kustomize DIR`, offline.
pub fn kustomize(dir: &Path) -> String {
    let out = kubectl()
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl kustomize: {e} (is kubectl installed?)"));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The controller's ClusterRole rules exactly as the controller needs them (the controller issue's
/// contract). Both installs must grant these and nothing else.
pub fn expected_controller_rules() -> Value {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| serde_json::json!({"apiGroups": groups, "resources": resources, "verbs": verbs});
    let mut token_update = rule(&[""], &["secrets"], &["update", "delete"]);
    token_update["resourceNames"] = serde_json::json!(["profiles-sync-engine-token"]);
    Value::Array(vec![
        rule(
            &["profilesync.dev"],
            &["warehouseconnections"],
            &["get", "list", "watch", "patch"],
        ),
        rule(
            &["profilesync.dev"],
            &["selectivesyncs"],
            &["get", "list", "watch"],
        ),
        rule(
            &["profilesync.dev"],
            &["warehouseconnections/status", "selectivesyncs/status"],
            &["update"],
        ),
        rule(
            &["profilesync.dev"],
            &["warehouseconnections/finalizers"],
            &["update"],
        ),
        rule(
            &["batch"],
            &["jobs"],
            &["get", "list", "watch", "create", "delete", "patch"],
        ),
        rule(&[""], &["configmaps"], &["get", "list", "create", "delete"]),
        rule(&[""], &["secrets"], &["get", "list", "watch", "create"]),
        token_update,
        rule(&[""], &["pods"], &["list"]),
        rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
    ])
}

/// Environment variables the installs may set to a literal value.
const PLAIN_ENV: &[&str] = &["RUST_LOG", "PGSSLROOTCERT"];

/// Checks what every pod of both installs must be: the restricted Pod Security Standard,
/// resource requests, and no secret material in arguments or environment values.
pub fn assert_pod_is_restricted(template: &PodTemplateSpec, origin: &str) {
    let spec = template.spec.as_ref().expect("pod spec");
    let pod_sc = spec
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{origin}: no pod securityContext"));
    assert_eq!(pod_sc.run_as_non_root, Some(true), "{origin}: runAsNonRoot");
    assert_eq!(
        pod_sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault"),
        "{origin}: pod seccompProfile"
    );
    assert!(
        spec.host_network.is_none() && spec.host_pid.is_none() && spec.host_ipc.is_none(),
        "{origin}: host namespaces"
    );
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let at = format!("{origin}: container {}", c.name);
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no securityContext"));
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{at}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{at}");
        assert_eq!(sc.run_as_non_root, Some(true), "{at}");
        assert_ne!(sc.privileged, Some(true), "{at}");
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()]),
            "{at}: capabilities.drop"
        );
        assert!(
            sc.capabilities
                .as_ref()
                .and_then(|c| c.add.as_ref())
                .is_none(),
            "{at}: capabilities.add"
        );
        let requests = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .unwrap_or_else(|| panic!("{at}: no resource requests"));
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{at}: requests {requests:?}"
        );
        for arg in c.args.iter().flatten().chain(c.command.iter().flatten()) {
            let userinfo = arg
                .split_once("://")
                .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or_default().contains('@'));
            assert!(
                !arg.contains("postgres://") && !userinfo,
                "{at}: credentials in the arguments: {arg}"
            );
        }
        // Plain environment values are settings; anything else comes from a secretKeyRef.
        for env in c.env.iter().flatten() {
            assert!(
                env.value.is_none() || PLAIN_ENV.contains(&env.name.as_str()),
                "{at}: env {} has a literal value; secrets come from a secretKeyRef",
                env.name
            );
        }
    }
}

/// The container `name` of a pod template.
pub fn container<'a>(template: &'a PodTemplateSpec, name: &str) -> &'a Container {
    template
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A container's arguments.
pub fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

/// The value of `--flag=value` among a container's arguments.
pub fn arg_value<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    c.args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

/// The pod template of the Deployment or StatefulSet `name`.
pub fn workload<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a PodTemplateSpec {
    objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d)
                if kind == "Deployment" && d.metadata.name.as_deref() == Some(name) =>
            {
                o.pod_template()
            }
            Object::StatefulSet(s)
                if kind == "StatefulSet" && s.metadata.name.as_deref() == Some(name) =>
            {
                o.pod_template()
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A Secret's value as text.
pub fn secret_string(secret: &Secret, key: &str) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("Secret has no key {key}"));
    String::from_utf8(bytes.0.clone()).expect("UTF-8")
}
