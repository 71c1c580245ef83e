//! Rendering charts/profiles-sync with Helm v4's own engine: the PyPI package helm-python-sdk,
//! driven by tests/helm/render.py with `.venv-helm` (made by `make deps`). Every documented
//! combination of values is rendered and linted once per test binary, and every wrong value
//! of [`reject_cases`] is tried.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Object, chart_dir, parse_strictly, repo, yaml_docs};

/// The documented combinations of values: (case, values, release, namespace).
pub fn render_cases() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    let ns_peer = |ns: &str| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}});
    vec![
        ("defaults", json!({}), "profiles-sync", "profiles-sync"),
        (
            "postgres",
            json!({
                "store": {"type": "postgres", "postgres": {"existingSecret": "profiles-sync-store", "key": "database-url"}},
                "engine": {"replicas": 3, "topologySpreadConstraints": [{
                    "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "engine"}}}]},
                "podDisruptionBudget": {"enabled": true},
            }),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "service-monitor",
            json!({"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "network-policy",
            json!({"networkPolicy": {"enabled": true,
                "engine": {"from": [ns_peer("ingress-nginx")]},
                "controller": {"from": [ns_peer("monitoring")]}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "network-policy-open",
            json!({"networkPolicy": {"enabled": true}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "pdb",
            json!({"podDisruptionBudget": {"enabled": true, "maxUnavailable": "50%"}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "dashboard",
            json!({"grafanaDashboard": {"enabled": true, "namespace": "monitoring",
                "annotations": {"grafana_folder": "profiles-sync"}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "existing-secrets",
            json!({"sources": {"existingSecret": "my-sources", "key": "sources"},
                   "feedToken": {"existingSecret": "my-feed-token", "key": "feed"}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "ephemeral-store",
            json!({"store": {"sqlite": {"persistence": {"enabled": false}}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "no-crds-no-roles",
            json!({"crds": {"install": false}, "rbac": {"aggregatedRoles": false}}),
            "profiles-sync",
            "profiles-sync",
        ),
        ("other-release", json!({}), "analytics", "data"),
        (
            "crds-not-kept",
            json!({"crds": {"keep": false}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "sync-image-mirror",
            json!({"image": {"digest": format!("sha256:{}", "cd".repeat(32))},
                   "controller": {"syncImage": {"repository": "mirror.example/profiles-sync"}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "sync-image-digest",
            json!({"image": {"tag": "0.1.0"},
                   "controller": {"syncImage": {"tag": "ignored", "digest": format!("sha256:{}", "ef".repeat(32))}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "postgres-store-ca",
            json!({"store": {"type": "postgres", "postgres": {"existingSecret": "profiles-sync-store",
                "caCertSecret": "store-ca", "caCertKey": "bundle.pem"}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "no-sync-resources",
            json!({"controller": {"syncResources": {"cpu": "", "memory": ""}}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            // As an upgrade with --reuse-values from a release without the value renders.
            "sync-resources-absent",
            json!({"controller": {"syncResources": null}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "event-retention-leading-zero",
            json!({"engine": {"eventRetention": "07d"}}),
            "profiles-sync",
            "profiles-sync",
        ),
        (
            "everything",
            json!({
                "image": {"digest": format!("sha256:{}", "ab".repeat(32))},
                "imagePullSecrets": [{"name": "registry"}],
                "commonLabels": {"team": "data"},
                "store": {"sqlite": {"persistence": {"size": "50Gi", "storageClassName": "fast",
                    "annotations": {"backup": "daily"}}}},
                "sources": {"list": [
                    {"id": "web", "name": "Website", "slug": "website", "writeKey": "wk_web",
                     "fillContextIp": true},
                    {"id": "ios", "name": "iOS", "slug": "ios"}]},
                "identityRules": {"limits": {"email": {"max": 3, "window": "30d"}},
                                  "priority": ["user_id", "email"],
                                  "caps": {"max_traits": 200, "max_traits_per_profile": 1500}},
                "engine": {"queueCapacity": 128, "queueEvents": 50000, "stallTimeoutSeconds": 90, "logLevel": "debug",
                    "feedReaders": 3, "maxConnections": 500, "headerTimeoutSeconds": 10,
                    "bodyTimeoutSeconds": 20, "eventRetention": "60d", "retentionIntervalSeconds": 300,
                    "service": {"type": "LoadBalancer", "port": 80, "annotations": {"a": "b"}},
                    "nodeSelector": {"pool": "data"},
                    "tolerations": [{"key": "pool", "operator": "Equal", "value": "data", "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "pool", "operator": "In", "values": ["data"]}]}]}}},
                    "podAnnotations": {"x": "y"}, "podLabels": {"tier": "ingest"},
                    "priorityClassName": "high"},
                "controller": {"syncImage": {"repository": "registry.example/profiles-sync-sync", "tag": "0.1.0-debug"},
                    "egressIPs": ["203.0.113.7", "2001:db8::7"], "logLevel": "debug",
                    "syncResources": {"cpu": "1", "memory": "2Gi"},
                    "serviceAccount": {"annotations": {"iam": "role"}}},
                "serviceMonitor": {"enabled": true},
                "networkPolicy": {"enabled": true, "engine": {"from": [ns_peer("ingress-nginx")]}},
                "podDisruptionBudget": {"enabled": true},
                "grafanaDashboard": {"enabled": true},
            }),
            "profiles-sync",
            "profiles-sync",
        ),
    ]
}

/// A wrong value, and what must happen to it.
pub struct Reject {
    pub name: &'static str,
    pub values: Value,
    /// Text the error must contain (the offending key, or the template's message).
    pub message: &'static str,
    /// Caught by values.schema.json (else only by the templates' own guards).
    pub by_schema: bool,
    /// The templates' own guard, checked with the schema removed.
    pub template_message: Option<&'static str>,
}

/// The wrong values the chart must refuse, each with the text its error must contain.
pub fn reject_cases() -> Vec<Reject> {
    let reject = |name, values, message| Reject {
        name,
        values,
        message,
        by_schema: true,
        template_message: None,
    };
    let source = |id: &str, key: &str| json!({"id": id, "name": id, "slug": id, "writeKey": key});
    vec![
        // A budget of 0 on the one-replica engine would block every eviction (node drains,
        // cluster upgrades, the autoscaler) for good (review).
        reject(
            "pdb-zero",
            json!({"podDisruptionBudget": {"enabled": true, "maxUnavailable": 0}}),
            "/podDisruptionBudget/maxUnavailable",
        ),
        reject(
            "pdb-zero-percent",
            json!({"podDisruptionBudget": {"enabled": true, "maxUnavailable": "0%"}}),
            "/podDisruptionBudget/maxUnavailable",
        ),
        // A label that repeats one the chart sets renders twice; the API server refuses the
        // manifest with no hint of the value behind it (review).
        reject(
            "pod-labels-selector",
            json!({"engine": {"podLabels": {"app.kubernetes.io/instance": "other"}}}),
            "/engine/podLabels",
        ),
        reject(
            "controller-pod-labels-selector",
            json!({"controller": {"podLabels": {"app.kubernetes.io/component": "x"}}}),
            "/controller/podLabels",
        ),
        reject(
            "common-labels-chart",
            json!({"commonLabels": {"helm.sh/chart": "x"}}),
            "/commonLabels",
        ),
        reject(
            "unknown-top-level-key",
            json!({"replicas": 2}),
            "'replicas' not allowed",
        ),
        reject(
            "unknown-nested-key",
            json!({"engine": {"replicaz": 2}}),
            "'replicaz' not allowed",
        ),
        reject(
            "wrong-type",
            json!({"engine": {"replicas": "2"}}),
            "/engine/replicas",
        ),
        reject(
            "unknown-store",
            json!({"store": {"type": "mysql"}}),
            "/store/type",
        ),
        reject(
            "digest",
            json!({"image": {"digest": "latest"}}),
            "/image/digest",
        ),
        reject(
            "sync-digest",
            json!({"controller": {"syncImage": {"digest": "sha256:short"}}}),
            "/controller/syncImage/digest",
        ),
        reject(
            "sync-memory",
            json!({"controller": {"syncResources": {"memory": "lots"}}}),
            "/controller/syncResources/memory",
        ),
        reject(
            "pull-policy",
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        reject(
            "interval",
            json!({"serviceMonitor": {"interval": "30 seconds"}}),
            "/serviceMonitor/interval",
        ),
        reject(
            "no-sources",
            json!({"sources": {"list": []}}),
            "/sources/list",
        ),
        reject(
            "rules-typo",
            json!({"identityRules": {"limit": {}}}),
            "'limit' not allowed",
        ),
        reject(
            "rules-window",
            json!({"identityRules": {"limits": {"email": {"max": 2, "window": "a month"}}}}),
            "/identityRules/limits/email/window",
        ),
        // Values the engine refuses at start (it crash-looped on them): refused here first.
        reject(
            "rules-zero-window",
            json!({"identityRules": {"limits": {"email": {"max": 2, "window": "0d"}}}}),
            "/identityRules/limits/email/window",
        ),
        reject(
            "rules-type-case",
            json!({"identityRules": {"limits": {"Email": {"max": 2}}}}),
            "invalid propertyName 'Email'",
        ),
        reject(
            "rules-priority-twice",
            json!({"identityRules": {"priority": ["email", "email"]}}),
            "/identityRules/priority",
        ),
        reject(
            "rules-max-traits",
            json!({"identityRules": {"caps": {"max_traits": 500}}}),
            "/identityRules/caps/max_traits",
        ),
        reject(
            "profile-traits",
            json!({"identityRules": {"caps": {"max_traits_per_profile": 20000}}}),
            "/identityRules/caps/max_traits_per_profile",
        ),
        reject(
            "queue-capacity",
            json!({"engine": {"queueCapacity": 100000}}),
            "/engine/queueCapacity",
        ),
        reject(
            "queue-events",
            json!({"engine": {"queueEvents": 0}}),
            "/engine/queueEvents",
        ),
        reject(
            "reading-capacity",
            json!({"engine": {"readingCapacity": 100000}}),
            "/engine/readingCapacity",
        ),
        reject(
            "stall-timeout",
            json!({"engine": {"stallTimeoutSeconds": 100000}}),
            "/engine/stallTimeoutSeconds",
        ),
        reject(
            "event-retention",
            json!({"engine": {"eventRetention": "60 days"}}),
            "/engine/eventRetention",
        ),
        // The engine's own limit: at most 5 digits.
        reject(
            "event-retention-digits",
            json!({"engine": {"eventRetention": "100000d"}}),
            "/engine/eventRetention",
        ),
        // 0 would delete every event a recorded connection has loaded, and all of them with none.
        reject(
            "event-retention-zero",
            json!({"engine": {"eventRetention": "0d"}}),
            "/engine/eventRetention",
        ),
        // Kubernetes refuses such Secret keys: `..data` is the mount's own directory.
        reject(
            "secret-key-dot-dot",
            json!({"sources": {"key": "..data"}}),
            "/sources/key",
        ),
        reject(
            "event-retention-zeros",
            json!({"engine": {"eventRetention": "000h"}}),
            "/engine/eventRetention",
        ),
        reject(
            "retention-interval",
            json!({"engine": {"eventRetention": "60d", "retentionIntervalSeconds": 0}}),
            "/engine/retentionIntervalSeconds",
        ),
        reject(
            "pdb",
            json!({"podDisruptionBudget": {"maxUnavailable": "half"}}),
            "/podDisruptionBudget/maxUnavailable",
        ),
        reject(
            "root",
            json!({"podSecurityContext": {"runAsUser": 0}}),
            "/podSecurityContext/runAsUser",
        ),
        reject(
            "egress-ip",
            json!({"controller": {"egressIPs": ["not an ip"]}}),
            "/controller/egressIPs/0",
        ),
        reject(
            "service-type",
            json!({"engine": {"service": {"type": "ExternalName"}}}),
            "/engine/service/type",
        ),
        reject(
            "secret-name",
            json!({"feedToken": {"existingSecret": "Not_A_Name"}}),
            "/feedToken/existingSecret",
        ),
        Reject {
            template_message: Some("engine.replicas must be 1 with store.type sqlite"),
            ..reject(
                "sqlite-scaled",
                json!({"engine": {"replicas": 2}}),
                "/engine/replicas",
            )
        },
        Reject {
            template_message: Some("store.postgres.existingSecret is required"),
            ..reject(
                "postgres-without-secret",
                json!({"store": {"type": "postgres"}}),
                "/store/postgres/existingSecret",
            )
        },
        Reject {
            by_schema: false,
            template_message: Some("the id \"a\" is used twice"),
            ..reject(
                "duplicate-source-id",
                json!({"sources": {"list": [source("a", "k1"), source("a", "k2")]}}),
                "the id \"a\" is used twice",
            )
        },
        Reject {
            by_schema: false,
            template_message: Some("the same writeKey"),
            ..reject(
                "duplicate-write-key",
                json!({"sources": {"list": [source("a", "k1"), source("b", "k1")]}}),
                "the same writeKey",
            )
        },
    ]
}

/// What tests/helm/render.py answers.
#[derive(Debug, Deserialize)]
pub struct Answer {
    pub helm: Value,
    pub rendered: BTreeMap<String, Rendered>,
    pub rejected: BTreeMap<String, Rejected>,
}

/// One rendered combination: the manifests by template path, its lint report, and whether
/// the values failed values.schema.json.
#[derive(Debug, Deserialize)]
pub struct Rendered {
    pub manifests: BTreeMap<String, String>,
    pub lint: Lint,
    pub schema_error: Option<String>,
}

impl Rendered {
    /// Every object, in template order (NOTES.txt is not a manifest).
    pub fn docs(&self) -> Vec<Value> {
        self.manifests
            .iter()
            .filter(|(path, _)| !path.ends_with("NOTES.txt"))
            .flat_map(|(path, text)| yaml_docs(text, path))
            .collect()
    }

    /// The manifests as one YAML stream, as `helm template` prints them.
    pub fn stream(&self) -> String {
        self.docs()
            .iter()
            .map(|d| format!("---\n{}", yaml_serde::to_string(d).expect("YAML")))
            .collect()
    }

    pub fn notes(&self) -> &str {
        self.manifests
            .iter()
            .find(|(path, _)| path.ends_with("NOTES.txt"))
            .map(|(_, text)| text.as_str())
            .expect("NOTES.txt is rendered")
    }

    pub fn objects(&self, case: &str) -> Vec<Object> {
        self.docs()
            .iter()
            .map(|d| parse_strictly(d, &format!("chart ({case})")))
            .collect()
    }
}

/// A `helm lint --strict` report.
#[derive(Debug, Deserialize)]
pub struct Lint {
    pub messages: Vec<LintMessage>,
    pub errors: Vec<String>,
}

/// One lint finding; severity 1 is info, 2 warning, 3 error.
#[derive(Debug, Deserialize)]
pub struct LintMessage {
    pub severity: u8,
    pub path: String,
    pub error: String,
}

/// What became of one wrong value.
#[derive(Debug, Deserialize)]
pub struct Rejected {
    pub render_error: Option<String>,
    pub schema_error: Option<String>,
    pub lint: Lint,
    pub render_error_without_schema: Option<String>,
}

/// Renders every case once per test binary with Helm's engine.
pub fn answer() -> &'static Answer {
    static ANSWER: OnceLock<Answer> = OnceLock::new();
    ANSWER.get_or_init(|| {
        let python = repo().join(".venv-helm/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `make deps` (it installs helm-python-sdk from tests/helm/requirements.txt)",
            python.display()
        );
        let request = json!({
            "chart": chart_dir(),
            "render": render_cases().into_iter().map(|(name, values, release, namespace)| json!({
                "name": name, "values": values, "release": release, "namespace": namespace,
            })).collect::<Vec<_>>(),
            "reject": reject_cases().into_iter().map(|r| json!({"name": r.name, "values": r.values}))
                .collect::<Vec<_>>(),
        });
        let mut child = Command::new(python)
            .arg(repo().join("tests/helm/render.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tests/helm/render.py");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(request.to_string().as_bytes())
            .expect("send the request");
        let out = child.wait_with_output().expect("render.py output");
        assert!(
            out.status.success(),
            "tests/helm/render.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("render.py answers JSON")
    })
}

/// The rendered combination `case` of [`render_cases`].
pub fn rendered(case: &str) -> &'static Rendered {
    answer()
        .rendered
        .get(case)
        .unwrap_or_else(|| panic!("no rendered case {case}"))
}
