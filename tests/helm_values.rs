//! What the Helm chart's values do (rendered by Helm's engine, tests/manifests/helm.rs): the
//! defaults install the documented objects, the PostgreSQL store runs a scalable engine, each
//! toggle adds its objects, every value reaches the object it configures, and the aggregated
//! roles grant what their names say.

mod manifests;

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use manifests::helm::rendered;
use manifests::{
    IMAGE, Object, arg_value, args, chart_dir, container, find, kind_name, kinds, secret_string,
    workload,
};
use profiles_sync::cli::{Cli, Command};
use profiles_sync::engine::sources::Sources;
use profiles_sync::identity::Rules;
use serde_json::Value;

#[test]
fn the_defaults_install_the_documented_objects() {
    let r = rendered("defaults");
    let docs = r.docs();
    let got: BTreeSet<_> = docs.iter().map(kind_name).collect();
    let want: BTreeSet<_> = [
        (
            "CustomResourceDefinition",
            "warehouseconnections.profilesync.dev",
        ),
        ("CustomResourceDefinition", "selectivesyncs.profilesync.dev"),
        ("ServiceAccount", "profiles-sync-controller"),
        ("ServiceAccount", "profiles-sync-engine"),
        ("ClusterRole", "profiles-sync-controller"),
        ("ClusterRole", "profilesync-viewer"),
        ("ClusterRole", "profilesync-editor"),
        ("ClusterRoleBinding", "profiles-sync-controller"),
        ("Deployment", "profiles-sync-controller"),
        ("StatefulSet", "profiles-sync-engine"),
        ("Service", "profiles-sync-controller"),
        ("Service", "profiles-sync-engine"),
        ("Secret", "profiles-sync-sources"),
        ("Secret", "profiles-sync-feed-token"),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(got, want);
    let objects = r.objects("defaults");

    // The controller: one replica, Recreate, pointed at the engine's Service by a name that
    // resolves from the sync Jobs' namespaces too.
    let controller: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(find(&docs, "Deployment", "profiles-sync-controller").clone())
            .unwrap();
    let spec = controller.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate")
    );
    let c = container(&spec.template, "controller");
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    assert_eq!(args(c)[0], "controller");
    assert_eq!(
        arg_value(c, "--engine-url"),
        Some("http://profiles-sync-engine.profiles-sync.svc:8080")
    );
    assert_eq!(arg_value(c, "--sync-image"), Some(IMAGE));
    assert_eq!(arg_value(c, "--listen"), Some("0.0.0.0:8080"));
    assert_token_file_is_mounted(
        c,
        &spec.template,
        "--engine-token-file",
        "profiles-sync-feed-token",
        "token",
    );
    assert_eq!(
        spec.template
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("profiles-sync-controller")
    );

    // The engine: a one-replica StatefulSet with the SQLite file on its claim.
    let engine: k8s_openapi::api::apps::v1::StatefulSet =
        serde_json::from_value(find(&docs, "StatefulSet", "profiles-sync-engine").clone()).unwrap();
    let spec = engine.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    let claim = &spec
        .volume_claim_templates
        .as_ref()
        .expect("volumeClaimTemplates")[0];
    assert_eq!(claim.metadata.name.as_deref(), Some("store"));
    let claim_spec = claim.spec.as_ref().unwrap();
    assert_eq!(
        claim_spec.access_modes,
        Some(vec!["ReadWriteOnce".to_string()])
    );
    assert_eq!(
        claim_spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.as_str()),
        Some("10Gi")
    );
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .unwrap();
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    let e = container(&spec.template, "engine");
    assert_eq!(e.image.as_deref(), Some(IMAGE));
    assert_eq!(args(e)[0], "engine");
    assert_eq!(
        arg_value(e, "--store"),
        Some("sqlite:///var/lib/profiles-sync/store.db")
    );
    assert!(
        e.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "store" && m.mount_path == "/var/lib/profiles-sync"),
        "the store's claim is mounted where --store points"
    );
    // Event retention is off unless asked for: the store keeps every event.
    for flag in ["--event-retention", "--retention-interval-secs"] {
        assert_eq!(arg_value(e, flag), None, "{flag}");
    }
    assert_eq!(engine_retention(e), (None, 600));
    assert_token_file_is_mounted(
        e,
        &spec.template,
        "--feed-token-file",
        "profiles-sync-feed-token",
        "token",
    );
    assert_token_file_is_mounted(
        e,
        &spec.template,
        "--sources",
        "profiles-sync-sources",
        "sources.yaml",
    );
    assert_eq!(
        spec.template
            .spec
            .as_ref()
            .unwrap()
            .automount_service_account_token,
        Some(false),
        "the engine never calls the API"
    );

    // The generated Secrets: a sources file the engine accepts, and a long random token.
    for o in &objects {
        if let Object::Secret(s) = o {
            match s.metadata.name.as_deref() {
                Some("profiles-sync-sources") => {
                    let text = secret_string(s, "sources.yaml");
                    let sources = Sources::from_yaml(&text)
                        .expect("the engine accepts the generated sources");
                    let key = text
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("writeKey: "))
                        .unwrap();
                    assert_eq!(key.len(), 32, "a generated write key");
                    assert_eq!(
                        sources.by_write_key(key).map(|s| s.id.as_str()),
                        Some("default")
                    );
                }
                Some("profiles-sync-feed-token") => {
                    let token = secret_string(s, "token");
                    assert!(token.len() >= 48 && token.chars().all(|c| c.is_ascii_alphanumeric()));
                }
                other => panic!("unexpected Secret {other:?}"),
            }
        }
    }

    // Services select the pods they front, on the container port they name.
    for (service, kind, workload_name, container_name) in [
        (
            "profiles-sync-engine",
            "StatefulSet",
            "profiles-sync-engine",
            "engine",
        ),
        (
            "profiles-sync-controller",
            "Deployment",
            "profiles-sync-controller",
            "controller",
        ),
    ] {
        assert_service_fronts(
            &docs,
            &objects,
            service,
            kind,
            workload_name,
            container_name,
        );
    }

    let notes = r.notes();
    for needle in [
        "deploy/examples/",
        "WarehouseConnection",
        "SelectiveSync",
        "kubectl get whc",
        "get secret profiles-sync-sources",
        "port-forward svc/profiles-sync-engine",
    ] {
        assert!(
            notes.contains(needle),
            "NOTES.txt does not mention {needle:?}:\n{notes}"
        );
    }
}

/// `store.postgres.caCertSecret` mounts its CA bundle read-only and names it to the engine with
/// `PGSSLROOTCERT` (which the store's `sslmode=verify-full` reads); without it nothing is mounted.
#[test]
fn a_store_ca_secret_is_mounted_and_named_by_pgsslrootcert() {
    let objects = rendered("postgres-store-ca").objects("postgres-store-ca");
    let template = workload(&objects, "Deployment", "profiles-sync-engine");
    let e = container(template, "engine");
    let path = e
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "PGSSLROOTCERT")
        .and_then(|v| v.value.as_deref())
        .expect("PGSSLROOTCERT");
    assert_file_is_mounted(e, template, path, "PGSSLROOTCERT", "store-ca", "bundle.pem");
    let objects = rendered("postgres").objects("postgres");
    let template = workload(&objects, "Deployment", "profiles-sync-engine");
    let e = container(template, "engine");
    assert!(
        !e.env.iter().flatten().any(|v| v.name == "PGSSLROOTCERT"),
        "no CA named without caCertSecret"
    );
    assert!(
        !e.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "store-ca"),
        "no CA mounted without caCertSecret"
    );
}

/// A retention the engine takes, written with a leading zero (`07d`), passes the chart's
/// schema too and reaches the engine as meant (the schema refused it while the engine took it).
#[test]
fn an_event_retention_with_a_leading_zero_reaches_the_engine() {
    let r = rendered("event-retention-leading-zero");
    let objects = r.objects("event-retention-leading-zero");
    let e = container(
        workload(&objects, "StatefulSet", "profiles-sync-engine"),
        "engine",
    );
    assert_eq!(arg_value(e, "--event-retention"), Some("07d"));
    assert_eq!(
        engine_retention(e),
        (Some(Duration::from_secs(7 * 86400)), 600)
    );
}

/// What the engine's own command line makes of container `c`'s arguments: its event retention
/// and the seconds between two retention passes.
fn engine_retention(c: &Container) -> (Option<Duration>, u64) {
    let argv = std::iter::once("profiles-sync").chain(args(c));
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Engine(a),
        }) => (a.event_retention, a.retention_interval_secs),
        Ok(other) => panic!("not the engine: {other:?}"),
        Err(e) => panic!(
            "the engine refuses the chart's arguments {:?}: {e}",
            args(c)
        ),
    }
}

/// `flag` names a file inside a volume mounted from `secret`'s `key`.
fn assert_token_file_is_mounted(
    c: &Container,
    template: &PodTemplateSpec,
    flag: &str,
    secret: &str,
    key: &str,
) {
    let path = arg_value(c, flag).unwrap_or_else(|| panic!("{} has no {flag}", c.name));
    assert_file_is_mounted(c, template, path, flag, secret, key);
}

/// `path` (what `flag` — an argument or a variable — names) is a file inside a read-only
/// volume mounted from `secret`'s `key`.
fn assert_file_is_mounted(
    c: &Container,
    template: &PodTemplateSpec,
    path: &str,
    flag: &str,
    secret: &str,
    key: &str,
) {
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {dir} for {flag}", c.name));
    assert_eq!(
        mount.read_only,
        Some(true),
        "{}: {dir} is read-only",
        c.name
    );
    let volume = template
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == mount.name))
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let source = volume
        .secret
        .as_ref()
        .unwrap_or_else(|| panic!("{} is not a Secret volume", mount.name));
    assert_eq!(source.secret_name.as_deref(), Some(secret), "{flag}");
    let items = source.items.as_ref().expect("items");
    assert!(
        items.iter().any(|i| i.key == key && i.path == file),
        "{flag}: the Secret's key {key} is not mounted as {file}: {items:?}"
    );
}

fn assert_service_fronts(
    docs: &[Value],
    objects: &[Object],
    service: &str,
    kind: &str,
    workload_name: &str,
    container_name: &str,
) {
    let svc: k8s_openapi::api::core::v1::Service =
        serde_json::from_value(find(docs, "Service", service).clone()).unwrap();
    let spec = svc.spec.unwrap();
    let template = workload(objects, kind, workload_name);
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.as_ref().expect("selector") {
        assert_eq!(labels.get(k), Some(v), "Service {service} selects {k}={v}");
    }
    let c = container(template, container_name);
    for port in spec.ports.iter().flatten() {
        let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) =
            &port.target_port
        else {
            panic!("Service {service}: target ports are named");
        };
        assert!(
            c.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some(name.as_str())),
            "Service {service}: no container port {name}"
        );
    }
}

#[test]
fn an_external_postgres_store_runs_a_scalable_engine_with_the_url_from_a_secret() {
    let r = rendered("postgres");
    let docs = r.docs();
    let objects = r.objects("postgres");
    assert!(
        !objects.iter().any(|o| matches!(o, Object::StatefulSet(_))),
        "no StatefulSet with PostgreSQL: {:?}",
        kinds(&docs)
    );
    let engine: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(find(&docs, "Deployment", "profiles-sync-engine").clone()).unwrap();
    let spec = engine.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    let e = container(&spec.template, "engine");
    assert_eq!(
        arg_value(e, "--store"),
        None,
        "the URL never is an argument"
    );
    let store = e
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "PROFILES_SYNC_STORE")
        .expect("PROFILES_SYNC_STORE");
    assert_eq!(store.value, None);
    let key_ref = store
        .value_from
        .as_ref()
        .and_then(|f| f.secret_key_ref.as_ref())
        .expect("secretKeyRef");
    assert_eq!(
        (key_ref.name.as_str(), key_ref.key.as_str()),
        ("profiles-sync-store", "database-url")
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert!(
        !pod.volumes.iter().flatten().any(|v| v.name == "store"),
        "no store volume"
    );
    assert_eq!(
        pod.topology_spread_constraints.as_ref().map(Vec::len),
        Some(1)
    );
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        serde_json::from_value(find(&docs, "PodDisruptionBudget", "profiles-sync-engine").clone())
            .unwrap();
    let pdb_spec = pdb.spec.unwrap();
    assert_eq!(
        pdb_spec.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        pdb_spec.selector.and_then(|s| s.match_labels),
        spec.selector.match_labels.clone()
    );
    // The controller reaches the same Service whichever kind runs the engine.
    let controller = workload(&objects, "Deployment", "profiles-sync-controller");
    assert_eq!(
        arg_value(container(controller, "controller"), "--engine-url"),
        Some("http://profiles-sync-engine.profiles-sync.svc:8080")
    );
}

#[test]
fn optional_objects_follow_their_values() {
    let count = |case: &str, kind: &str| {
        rendered(case)
            .docs()
            .iter()
            .filter(|d| d["kind"] == kind)
            .count()
    };
    for kind in [
        "ServiceMonitor",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ConfigMap",
    ] {
        assert_eq!(count("defaults", kind), 0, "defaults render no {kind}");
    }

    // ServiceMonitors: one per component, selecting its Service, with the user's labels.
    let docs = rendered("service-monitor").docs();
    for component in ["engine", "controller"] {
        let name = format!("profiles-sync-{component}");
        let sm = find(&docs, "ServiceMonitor", &name);
        assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
        let service = find(&docs, "Service", &name);
        for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&service["metadata"]["labels"][k], v, "{name}: selects {k}");
        }
        assert_eq!(
            sm["spec"]["endpoints"][0]["port"],
            service["spec"]["ports"][0]["name"]
        );
        assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    }

    // NetworkPolicies: the engine admits the controller, the sync Jobs and the configured peers
    // on its port.
    let docs = rendered("network-policy").docs();
    let engine_np = find(&docs, "NetworkPolicy", "profiles-sync-engine");
    assert_eq!(
        engine_np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "engine"
    );
    let from = engine_np["spec"]["ingress"][0]["from"]
        .as_array()
        .expect("from");
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "controller"
    );
    // The sync Jobs, from every namespace, with the labels the controller gives them.
    assert_eq!(from[1]["namespaceSelector"], serde_json::json!({}));
    assert_eq!(
        from[1]["podSelector"]["matchLabels"],
        serde_json::json!({"app.kubernetes.io/name": "profiles-sync", "app.kubernetes.io/component": "sync"})
    );
    assert_eq!(
        from[2]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "ingress-nginx"
    );
    assert_eq!(engine_np["spec"]["ingress"][0]["ports"][0]["port"], "http");
    let controller_np = find(&docs, "NetworkPolicy", "profiles-sync-controller");
    assert_eq!(
        controller_np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let docs = rendered("network-policy-open").docs();
    for name in ["profiles-sync-engine", "profiles-sync-controller"] {
        let np = find(&docs, "NetworkPolicy", name);
        assert!(
            np["spec"]["ingress"][0].get("from").is_none(),
            "{name}: open on its port"
        );
        assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "http");
    }

    let docs = rendered("pdb").docs();
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "profiles-sync-engine")["spec"]["maxUnavailable"],
        "50%"
    );

    // The dashboard ConfigMap carries the dashboard file unchanged.
    let docs = rendered("dashboard").docs();
    let cm = find(&docs, "ConfigMap", "profiles-sync-dashboard");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"],
        "profiles-sync"
    );
    let shipped: Value =
        serde_json::from_str(cm["data"]["profiles-sync.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/profiles-sync.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shipped, file);

    // Existing Secrets: none generated, theirs mounted by key.
    let r = rendered("existing-secrets");
    assert_eq!(count("existing-secrets", "Secret"), 0);
    let objects = r.objects("existing-secrets");
    let engine = workload(&objects, "StatefulSet", "profiles-sync-engine");
    let e = container(engine, "engine");
    assert_token_file_is_mounted(e, engine, "--sources", "my-sources", "sources");
    assert_token_file_is_mounted(e, engine, "--feed-token-file", "my-feed-token", "feed");
    let controller = workload(&objects, "Deployment", "profiles-sync-controller");
    assert_token_file_is_mounted(
        container(controller, "controller"),
        controller,
        "--engine-token-file",
        "my-feed-token",
        "feed",
    );

    // No persistence: an emptyDir, and NOTES.txt says what that costs.
    let r = rendered("ephemeral-store");
    let sts = find(&r.docs(), "StatefulSet", "profiles-sync-engine").clone();
    assert!(sts["spec"].get("volumeClaimTemplates").is_none());
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "store" && v.get("emptyDir").is_some())
    );
    assert!(r.notes().contains("WARNING"), "{}", r.notes());
    // ... and names no claim that does not exist (it named store-…-0).
    assert!(
        !r.notes().contains("PersistentVolumeClaim"),
        "{}",
        r.notes()
    );

    // CRDs not kept: the store's claim still is (its retention policy keeps it), and NOTES.txt
    // says so (the sentence went with the CRDs').
    let notes = rendered("crds-not-kept").notes();
    assert!(
        notes.contains("PersistentVolumeClaim store-profiles-sync-engine-0")
            && !notes.contains("keeps the CRDs"),
        "{notes}"
    );

    let docs = rendered("no-crds-no-roles").docs();
    assert!(!docs.iter().any(|d| d["kind"] == "CustomResourceDefinition"));
    assert!(!docs.iter().any(|d| {
        d["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("profilesync-")
    }));

    // Another release name and namespace: every reference follows.
    let docs = rendered("other-release").docs();
    let objects = rendered("other-release").objects("other-release");
    let controller = workload(&objects, "Deployment", "analytics-profiles-sync-controller");
    assert_eq!(
        arg_value(container(controller, "controller"), "--engine-url"),
        Some("http://analytics-profiles-sync-engine.data.svc:8080")
    );
    let binding = find(
        &docs,
        "ClusterRoleBinding",
        "analytics-profiles-sync-controller",
    );
    assert_eq!(
        binding["roleRef"]["name"],
        "analytics-profiles-sync-controller"
    );
    assert_eq!(binding["subjects"][0]["namespace"], "data");
    assert_eq!(
        binding["subjects"][0]["name"],
        "analytics-profiles-sync-controller"
    );
}

/// A pinned digest reaches the sync Jobs: the chart's own through a mirror repository, or
/// `controller.syncImage.digest` over its tag.
#[test]
fn the_sync_jobs_image_keeps_a_pinned_digest() {
    for (case, expected) in [
        (
            "sync-image-mirror",
            format!("mirror.example/profiles-sync@sha256:{}", "cd".repeat(32)),
        ),
        (
            "sync-image-digest",
            format!(
                "ghcr.io/profiles-sync/profiles-sync@sha256:{}",
                "ef".repeat(32)
            ),
        ),
    ] {
        let objects = rendered(case).objects(case);
        let controller = workload(&objects, "Deployment", "profiles-sync-controller");
        let c = container(controller, "controller");
        assert_eq!(
            arg_value(c, "--sync-image"),
            Some(expected.as_str()),
            "{case}"
        );
    }
}

/// The sync Jobs' default resources reach the controller's command line (the chart's
/// defaults, another value, or none).
#[test]
fn the_sync_jobs_default_resources_reach_the_controller() {
    for (case, cpu, memory) in [
        ("defaults", Some("250m"), Some("512Mi")),
        ("everything", Some("1"), Some("2Gi")),
        ("no-sync-resources", None, None),
        ("sync-resources-absent", None, None),
    ] {
        let objects = rendered(case).objects(case);
        let controller = workload(&objects, "Deployment", "profiles-sync-controller");
        let c = container(controller, "controller");
        assert_eq!(arg_value(c, "--default-sync-cpu"), cpu, "{case}");
        assert_eq!(arg_value(c, "--default-sync-memory"), memory, "{case}");
    }
}

#[test]
fn every_value_reaches_the_objects_it_configures() {
    let r = rendered("everything");
    let docs = r.docs();
    let objects = r.objects("everything");
    let digest = format!(
        "ghcr.io/profiles-sync/profiles-sync@sha256:{}",
        "ab".repeat(32)
    );
    let engine = workload(&objects, "StatefulSet", "profiles-sync-engine");
    let e = container(engine, "engine");
    assert_eq!(e.image.as_deref(), Some(digest.as_str()));
    assert_eq!(arg_value(e, "--queue-capacity"), Some("128"));
    assert_eq!(arg_value(e, "--queue-events"), Some("50000"));
    assert_eq!(arg_value(e, "--stall-timeout-secs"), Some("90"));
    for (flag, value) in [
        ("--feed-readers", "3"),
        ("--max-connections", "500"),
        ("--header-timeout-secs", "10"),
        ("--body-timeout-secs", "20"),
        ("--event-retention", "60d"),
        ("--retention-interval-secs", "300"),
    ] {
        assert_eq!(arg_value(e, flag), Some(value), "{flag}");
    }
    // The engine's own command line takes them as meant.
    assert_eq!(
        engine_retention(e),
        (Some(Duration::from_secs(60 * 86400)), 300)
    );
    let pod = engine.spec.as_ref().unwrap();
    assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|n| n.get("pool"))
            .map(String::as_str),
        Some("data")
    );
    assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
    assert!(
        pod.affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .is_some()
    );
    assert_eq!(
        pod.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()),
        Some("registry")
    );
    let meta = engine.metadata.as_ref().unwrap();
    assert_eq!(
        meta.labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("ingest")
    );
    assert_eq!(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("x"))
            .map(String::as_str),
        Some("y")
    );
    let sts = find(&docs, "StatefulSet", "profiles-sync-engine");
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "50Gi");
    assert_eq!(claim["metadata"]["annotations"]["backup"], "daily");
    let svc = find(&docs, "Service", "profiles-sync-engine");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["metadata"]["annotations"]["a"], "b");
    for d in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        assert_eq!(
            d["metadata"]["labels"]["team"],
            "data",
            "commonLabels on {:?}",
            kind_name(d)
        );
    }

    // Identity rules: a ConfigMap the engine accepts, mounted where --rules points.
    let rules_cm = find(&docs, "ConfigMap", "profiles-sync-identity-rules");
    let rules = Rules::from_yaml(rules_cm["data"]["rules.yaml"].as_str().unwrap())
        .expect("the engine accepts the rules");
    assert_eq!(rules.limits["email"].max, 3);
    assert_eq!(
        rules.limits["email"].window,
        Some(Duration::from_secs(30 * 86400))
    );
    assert_eq!(rules.max_traits, 200);
    assert_eq!(rules.max_traits_per_profile, 1500);
    assert_eq!(
        arg_value(e, "--rules"),
        Some("/etc/profiles-sync/rules/rules.yaml")
    );
    assert!(
        e.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/etc/profiles-sync/rules")
    );

    // Sources: a given write key is kept, a missing one generated; a client-side source
    // fills in `context.ip`, the others do not.
    let sources = objects
        .iter()
        .find_map(|o| match o {
            Object::Secret(s) if s.metadata.name.as_deref() == Some("profiles-sync-sources") => {
                Some(s)
            }
            _ => None,
        })
        .expect("sources Secret");
    let text = secret_string(sources, "sources.yaml");
    assert_eq!(
        text.matches("fillContextIp").count(),
        1,
        "only the source that asks for it: {text}"
    );
    let sources = Sources::from_yaml(&text).unwrap();
    assert_eq!(
        sources.by_write_key("wk_web").map(|s| s.slug.as_str()),
        Some("website")
    );
    assert_eq!(sources.infos().len(), 2);
    let web = sources.by_write_key("wk_web").expect("web");
    assert!(web.fill_context_ip);

    let controller = workload(&objects, "Deployment", "profiles-sync-controller");
    let c = container(controller, "controller");
    assert_eq!(c.image.as_deref(), Some(digest.as_str()));
    assert_eq!(
        arg_value(c, "--sync-image"),
        Some("registry.example/profiles-sync-sync:0.1.0-debug")
    );
    assert_eq!(
        arg_value(c, "--egress-ips"),
        Some("203.0.113.7,2001:db8::7")
    );
    assert!(
        c.env
            .iter()
            .flatten()
            .any(|v| v.name == "RUST_LOG" && v.value.as_deref() == Some("debug"))
    );
    let sa = find(&docs, "ServiceAccount", "profiles-sync-controller");
    assert_eq!(sa["metadata"]["annotations"]["iam"], "role");
    assert!(r.notes().contains("203.0.113.7, 2001:db8::7"));
}
