//! The Helm chart (charts/profiles-sync) as Helm v4's own engine renders and lints it
//! (tests/manifests/helm.rs): every documented combination of values renders and lints clean,
//! every object reads strictly with its type, wrong values are rejected, the CRDs are the
//! committed ones, the dashboard charts real metrics, and the rendered chart applies to the
//! emulated API server of tests/kmock. What each value does: tests/helm_values.rs.

mod manifests;

use std::collections::{BTreeMap, BTreeSet};

use manifests::helm::{answer, reject_cases, render_cases, rendered};
use manifests::kmock::ApiServer;
use manifests::{Object, assert_pod_is_restricted, chart_dir, find, kind_name, repo, yaml_docs};
use serde_json::{Value, json};

#[test]
fn the_chart_renders_and_lints_clean_with_every_documented_combination() {
    let answer = answer();
    for (case, ..) in render_cases() {
        let r = rendered(case);
        let helm = &answer.helm;
        assert!(
            r.lint.errors.is_empty(),
            "{case}: helm lint ({helm}): {:?}",
            r.lint.errors
        );
        let findings: Vec<_> = r
            .lint
            .messages
            .iter()
            .filter(|m| m.severity >= 2)
            .map(|m| format!("{}: {}", m.path, m.error))
            .collect();
        assert!(
            findings.is_empty(),
            "{case}: helm lint warnings: {findings:?}"
        );
        assert_eq!(
            r.schema_error, None,
            "{case}: values fail values.schema.json"
        );
        assert!(!r.docs().is_empty(), "{case}: nothing rendered");
    }
}

#[test]
fn every_rendered_object_deserializes_strictly() {
    for (case, _, _, namespace) in render_cases() {
        let r = rendered(case);
        let docs = r.docs();
        let mut seen = BTreeSet::new();
        for (doc, object) in docs.iter().zip(r.objects(case)) {
            assert!(
                seen.insert(kind_name(doc)),
                "{case}: {:?} twice",
                kind_name(doc)
            );
            let cluster_scoped = matches!(
                object,
                Object::Crd(_)
                    | Object::ClusterRole(_)
                    | Object::ClusterRoleBinding(_)
                    | Object::Namespace(_)
            );
            let ns = doc["metadata"]["namespace"].as_str();
            if cluster_scoped {
                assert_eq!(ns, None, "{case}: {:?} is cluster-scoped", kind_name(doc));
            } else if !(case == "dashboard" && doc["kind"] == "ConfigMap") {
                assert_eq!(ns, Some(namespace), "{case}: {:?}", kind_name(doc));
            }
            if let Some(template) = object.pod_template() {
                assert_pod_is_restricted(template, &format!("chart ({case}) {:?}", kind_name(doc)));
            }
        }
    }
}

#[test]
fn wrong_values_are_rejected_with_a_message_that_names_them() {
    let answer = answer();
    for case in reject_cases() {
        let got = &answer.rejected[case.name];
        let render_error = got
            .render_error
            .as_deref()
            .unwrap_or_else(|| panic!("{}: {} rendered", case.name, case.values));
        assert!(
            render_error.contains(case.message),
            "{}: the error does not name {:?}: {render_error}",
            case.name,
            case.message
        );
        if case.by_schema {
            let schema_error = got.schema_error.as_deref().unwrap_or_else(|| {
                panic!("{}: values.schema.json accepts {}", case.name, case.values)
            });
            assert!(
                schema_error.contains(case.message),
                "{}: {schema_error}",
                case.name
            );
            assert!(
                got.lint.errors.iter().any(|e| e.contains(case.message)),
                "{}: helm lint does not report it: {:?}",
                case.name,
                got.lint
            );
        } else {
            assert_eq!(
                got.schema_error, None,
                "{}: the schema can't express this",
                case.name
            );
        }
        if let Some(message) = case.template_message {
            let error = got
                .render_error_without_schema
                .as_deref()
                .unwrap_or_else(|| {
                    panic!(
                        "{}: without the schema, the templates accept {}",
                        case.name, case.values
                    )
                });
            assert!(error.contains(message), "{}: {error}", case.name);
        }
    }
}

#[test]
fn the_chart_installs_the_committed_crds() {
    let in_chart = chart_dir().join("files/crds");
    let names = |dir: &std::path::Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&in_chart),
        names(&repo().join("crds")),
        "charts/profiles-sync/files/crds/ holds other files than crds/: run `make crds`"
    );
    let mut committed = BTreeMap::new();
    for name in names(&repo().join("crds")) {
        let theirs = std::fs::read(repo().join("crds").join(&name)).unwrap();
        let ours = std::fs::read(in_chart.join(&name)).unwrap();
        assert!(
            theirs == ours,
            "charts/profiles-sync/files/crds/{name} differs from crds/{name}: run `make crds`"
        );
        let doc = yaml_docs(&String::from_utf8(theirs).unwrap(), &name).remove(0);
        committed.insert(doc["metadata"]["name"].as_str().unwrap().to_string(), doc);
    }
    // What Helm installs is the committed CRD plus the annotation that keeps it on uninstall.
    let docs = rendered("defaults").docs();
    let mut installed = BTreeMap::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        let mut doc = doc.clone();
        let annotations = doc["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        assert_eq!(
            annotations,
            Some(json!({"helm.sh/resource-policy": "keep"}))
        );
        installed.insert(doc["metadata"]["name"].as_str().unwrap().to_string(), doc);
    }
    assert_eq!(installed, committed);
}

/// Metric names a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"profiles_sync_[a-z_]+").unwrap();
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

/// The metric families of a text exposition (a histogram's as its three series).
fn families(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for rest in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = rest.split_once(' ').unwrap();
        out.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
    }
    out
}

#[test]
fn the_dashboard_charts_metrics_the_binaries_export() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/profiles-sync.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    // What the engine exports: every family, with a sample in each labelled one.
    let metrics = profiles_sync::engine::metrics::Metrics::new().unwrap();
    metrics.requests.with_label_values(&["track", "200"]).inc();
    metrics
        .events_rejected
        .with_label_values(&["invalid"])
        .inc();
    let mut exported = families(&metrics.render());
    // What the controller exports, likewise.
    let controller = profiles_sync::controller::metrics::Metrics::new().unwrap();
    controller.reconciles.with_label_values(&["c"]).inc();
    controller
        .reconcile_errors
        .with_label_values(&["c", "e"])
        .inc();
    controller
        .reconcile_seconds
        .with_label_values(&["c"])
        .observe(0.1);
    controller.sync_runs.with_label_values(&["Success"]).inc();
    controller.rows_synced.with_label_values(&["events"]).inc();
    controller
        .connection_tests
        .with_label_values(&["Connected"])
        .inc();
    controller
        .last_successful_sync
        .with_label_values(&["ns", "c"])
        .set(1.0);
    let controller = families(&controller.render());
    // The ones the dashboard must chart (the controller issue's contract), each exported.
    let contract: BTreeSet<String> = [
        "reconciles_total",
        "reconcile_errors_total",
        "reconcile_duration_seconds_bucket",
        "sync_runs_total",
        "rows_synced_total",
        "last_successful_sync_timestamp_seconds",
    ]
    .iter()
    .map(|m| format!("profiles_sync_controller_{m}"))
    .collect();
    assert!(
        contract.is_subset(&controller),
        "not exported by the controller: {:?}",
        contract.difference(&controller)
    );
    exported.extend(controller);
    let mut charted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no queries", panel["title"]));
        assert!(!targets.is_empty(), "{}: no queries", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{}: {expr}", panel["title"]);
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{}: {name} is not exported by the engine nor the controller ({exported:?})",
                    panel["title"]
                );
                charted.insert(name);
            }
        }
    }
    assert!(
        charted
            .iter()
            .any(|n| n.starts_with("profiles_sync_engine_"))
    );
    assert!(
        contract.is_subset(&charted),
        "uncharted controller metrics: {:?}",
        contract.difference(&charted)
    );
}

#[test]
fn the_rendered_chart_applies_to_an_emulated_api_server() {
    let prometheus_crds = repo().join("tests/manifests/prometheus-operator-crds");
    for (case, _, _, namespace) in render_cases()
        .into_iter()
        .filter(|(case, ..)| ["defaults", "postgres", "everything", "other-release"].contains(case))
    {
        let server = ApiServer::start(&[&prometheus_crds]);
        // What `helm install --create-namespace` does first.
        server.apply(
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"),
            &[],
        );
        let r = rendered(case);
        let stream = r.stream();
        let objects = r.docs().len();
        for dry_run in ["--dry-run=client", "--dry-run=server"] {
            let out = server.apply(&stream, &[dry_run]);
            assert_eq!(out.lines().count(), objects, "{case} {dry_run}:\n{out}");
        }
        let out = server.apply(&stream, &[]);
        assert_eq!(
            out.lines().filter(|l| l.ends_with(" created")).count(),
            objects,
            "{case}:\n{out}"
        );
        // The CRDs it applied are served, and the workloads are there.
        server.kubectl_ok(&["get", "whc,ssync", "-A"]);
        let listed = server.kubectl_ok(&[
            "get",
            "deployments,statefulsets",
            "-n",
            namespace,
            "-o",
            "name",
        ]);
        for doc in r
            .docs()
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        {
            let (kind, name) = kind_name(doc);
            let want = format!("{}.apps/{name}", kind.to_lowercase());
            assert!(
                listed.lines().any(|l| l == want),
                "{case}: {want} not in\n{listed}"
            );
        }
    }
}

#[test]
fn the_aggregated_roles_grant_what_their_names_say() {
    let docs = rendered("defaults").docs();
    let rules = |name: &str| {
        find(&docs, "ClusterRole", name)["rules"]
            .as_array()
            .unwrap()
            .clone()
    };
    let all = |rules: &[Value], field: &str| -> BTreeSet<String> {
        rules
            .iter()
            .flat_map(|r| {
                r[field]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
            })
            .collect()
    };
    let viewer = rules("profilesync-viewer");
    assert_eq!(
        all(&viewer, "apiGroups"),
        BTreeSet::from(["profilesync.dev".to_string()]),
        "no Secrets"
    );
    assert_eq!(
        all(&viewer, "verbs"),
        ["get", "list", "watch"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    assert!(
        all(&viewer, "resources").contains("warehouseconnections/status"),
        "sync history is status"
    );
    let editor = rules("profilesync-editor");
    assert_eq!(
        all(&editor, "apiGroups"),
        BTreeSet::from(["profilesync.dev".to_string()]),
        "no Secrets"
    );
    for rule in &editor {
        let status = rule["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().ends_with("/status"));
        let writes = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| !["get", "list", "watch"].contains(&v.as_str().unwrap()));
        assert!(
            !(status && writes),
            "status is the controller's alone: {rule}"
        );
    }
    assert!(
        all(&editor, "verbs").is_superset(
            &["create", "update", "patch", "delete"]
                .map(String::from)
                .into_iter()
                .collect()
        )
    );
}
