//! The Job and ConfigMap builders: shape, security, no secrets, and a ConfigMap the sync reads.

use super::*;
use crate::controller::plan::Trigger;
use crate::crd::SelectiveSyncSpec;

fn conn(resources: Option<serde_json::Value>) -> WarehouseConnection {
    let mut spec = serde_json::json!({
        "warehouse": {"type": "postgres", "postgres": {"host": "db", "database": "analytics"},
                      "credentialsSecretRef": {"name": "wh-creds"}},
        "schedule": "1h"
    });
    if let Some(r) = resources {
        spec["resources"] = r;
    }
    let mut c = WarehouseConnection::new("analytics", serde_json::from_value(spec).unwrap());
    c.metadata.namespace = Some("team-a".into());
    c.metadata.uid = Some("uid-1".into());
    c
}

fn selection() -> SelectiveSync {
    let spec: SelectiveSyncSpec = serde_json::from_value(serde_json::json!({
        "connectionRef": {"name": "analytics"}, "tables": [{"name": "pages", "enabled": false}]
    }))
    .unwrap();
    let mut s = SelectiveSync::new("analytics", spec);
    s.metadata.namespace = Some("team-a".into());
    s.metadata.generation = Some(3);
    s.metadata.uid = Some("uid-sel".into());
    s
}

fn settings() -> JobSettings {
    JobSettings {
        image: "ghcr.io/profiles-sync/profiles-sync:0.1.0".into(),
        engine_url: "http://engine.profiles-sync.svc:8080".into(),
        default_cpu: Some("250m".into()),
        default_memory: Some("512Mi".into()),
    }
}

fn new_sync() -> NewSync {
    NewSync {
        slot: "2025-03-01T10:00:00Z".parse().unwrap(),
        name: "analytics-29013720".into(),
        trigger: Trigger::Manual,
    }
}

#[test]
fn the_job_is_owned_labelled_restricted_and_bounded() {
    let sel = selection();
    let job = sync_job(
        &conn(None),
        Some(&sel),
        &new_sync(),
        Some("now-1"),
        &settings(),
        Duration::from_secs(3600),
    );
    let meta = &job.metadata;
    assert_eq!(meta.name.as_deref(), Some("analytics-29013720"));
    assert_eq!(meta.labels.as_ref().unwrap()[LABEL_CONNECTION], "analytics");
    let owner = &meta.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.uid.as_str(),
            owner.controller,
            owner.block_owner_deletion
        ),
        ("WarehouseConnection", "uid-1", Some(true), Some(true))
    );
    let ann = meta.annotations.as_ref().unwrap();
    assert_eq!(ann[ANNOTATION_SLOT], "2025-03-01T10:00:00Z");
    assert_eq!(ann[ANNOTATION_TRIGGER], "Manual");
    assert_eq!(ann[ANNOTATION_SYNC_NOW], "now-1");
    assert_eq!(ann[ANNOTATION_SELECTION_GENERATION], "3");
    assert_eq!(ann[ANNOTATION_SELECTION_UID], "uid-sel");
    assert_eq!(
        ann[ANNOTATION_DESTINATION],
        "postgres db:5432/analytics, schema profiles_sync"
    );

    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.active_deadline_seconds, Some(3600));
    assert_eq!(
        spec.ttl_seconds_after_finished, None,
        "history limits prune, not a TTL"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(
        (
            psc.run_as_non_root,
            psc.seccomp_profile.as_ref().map(|p| p.type_.as_str())
        ),
        (Some(true), Some("RuntimeDefault"))
    );
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(c.termination_message_policy.as_deref(), Some("File"));
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "250m");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "512Mi");

    let cmd = c.command.as_ref().unwrap().join(" ");
    assert_eq!(
        cmd,
        "profiles-sync sync -f /etc/profiles-sync/connection.yaml -f /etc/profiles-sync/selection.yaml \
         --engine http://engine.profiles-sync.svc:8080 --engine-token-file /var/run/secrets/profiles-sync/engine/token \
         --credentials-dir /var/run/secrets/profiles-sync/warehouse --id analytics-29013720 --termination-log /dev/termination-log --record-progress"
    );
    assert!(
        c.env.is_none(),
        "no environment: nothing secret can leak through it"
    );
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert!(mounts.contains(&("warehouse-credentials", CREDENTIALS_DIR)));
    assert!(mounts.contains(&("engine-token", ENGINE_TOKEN_DIR)));
    assert!(mounts.contains(&("config", CONFIG_DIR)));
    let vols = pod.volumes.as_ref().unwrap();
    let secret_of = |name: &str| {
        vols.iter()
            .find(|v| v.name == name)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
    };
    assert_eq!(
        secret_of("warehouse-credentials").as_deref(),
        Some("wh-creds")
    );
    assert_eq!(
        secret_of("engine-token").as_deref(),
        Some(ENGINE_TOKEN_SECRET)
    );
}

#[test]
fn the_connections_resources_win_over_the_defaults_and_long_syncs_are_capped() {
    let c = conn(Some(serde_json::json!({"requests": {"cpu": "2"}})));
    let job = sync_job(
        &c,
        None,
        &new_sync(),
        None,
        &settings(),
        Duration::from_secs(86_400),
    );
    let spec = job.spec.unwrap();
    assert_eq!(
        spec.active_deadline_seconds,
        Some(MAX_DEADLINE.as_secs() as i64)
    );
    let container = &spec.template.spec.unwrap().containers[0];
    assert_eq!(
        container
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["cpu"]
            .0,
        "2"
    );
    assert!(container.resources.as_ref().unwrap().limits.is_none());
    assert!(
        !container
            .command
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.contains("selection.yaml"))
    );
    assert!(
        !job.metadata
            .annotations
            .unwrap()
            .contains_key(ANNOTATION_SYNC_NOW)
    );
}

#[test]
fn the_config_map_holds_the_specs_the_sync_reads_and_no_secret() {
    let c = conn(None);
    let sel = selection();
    let data = manifests(&c, Some(&sel)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![];
    for (name, text) in &data {
        assert!(!text.contains("status"), "{text}");
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let m = crate::cli::sync::read_manifests(&files).unwrap();
    assert_eq!(m.connection.spec, c.spec);
    assert_eq!(m.connection.metadata.name.as_deref(), Some("analytics"));
    assert_eq!(m.selection.map(|s| s.spec), Some(sel.spec.clone()));

    let mut job = sync_job(
        &c,
        Some(&sel),
        &new_sync(),
        None,
        &settings(),
        Duration::from_secs(60),
    );
    job.metadata.uid = Some("job-uid".into());
    let cm = sync_config_map(&job, "analytics", data);
    let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Job", "job-uid")
    );
    assert_eq!(cm.metadata.name, job.metadata.name);
    assert_eq!(
        cm.metadata.labels.as_ref().unwrap()[LABEL_CONNECTION],
        "analytics"
    );
}

#[test]
fn the_engine_token_secret_has_the_token_under_its_key() {
    let s = engine_token_secret("team-a", "t0k");
    assert_eq!(s.metadata.name.as_deref(), Some(ENGINE_TOKEN_SECRET));
    assert_eq!(s.data.unwrap()[ENGINE_TOKEN_KEY].0, b"t0k");
}
