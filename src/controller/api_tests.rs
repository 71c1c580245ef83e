//! API effects against the in-memory API server of `kube-fake-client`: the real reconcile, the
//! real warehouse code (an SQLite warehouse in a temporary directory), a real Recorder.
//!
//! The fake API has no watches, so each test calls `reconcile` itself, as the runtime would after
//! a watch event; it deletes objects at once (finalizers are honoured only for objects created
//! already terminating), which is how the deletion test sets its scene.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, PostParams};
use kube_fake_client::{ClientBuilder, interceptor};

use super::*;
use crate::crd::{SelectiveSyncSpec, WarehouseConnectionSpec};

pub(super) const NS: &str = "team-a";

pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) ctx: Arc<Context>,
}

pub(super) fn connection(dir: &Path, name: &str) -> WarehouseConnection {
    let spec: WarehouseConnectionSpec = serde_json::from_value(serde_json::json!({
        "warehouse": {"type": "sqlite", "sqlite": {"path": dir.join(format!("{name}.db")).display().to_string()}},
        "schedule": "1h"
    }))
    .unwrap();
    let mut c = WarehouseConnection::new(name, spec);
    c.metadata.namespace = Some(NS.into());
    c.metadata.uid = Some(format!("uid-{name}"));
    c.metadata.generation = Some(1);
    // An object added with a status registers the status subresource for its kind.
    c.status = Some(Default::default());
    c
}

/// [`connection`] with the controller's finalizer already on it: a connection the controller
/// has reconciled before.
pub(super) fn finalized_connection(dir: &Path, name: &str) -> WarehouseConnection {
    let mut c = connection(dir, name);
    c.metadata.finalizers = Some(vec![FINALIZER.into()]);
    c
}

/// A SelectiveSync `name` in the test namespace with `spec` (JSON), at generation 1, with an
/// empty status (which registers the status subresource for its kind).
pub(super) fn selective_sync(name: &str, spec: serde_json::Value) -> SelectiveSync {
    let spec: SelectiveSyncSpec = serde_json::from_value(spec).unwrap();
    let mut s = SelectiveSync::new(name, spec);
    s.metadata.namespace = Some(NS.into());
    s.metadata.generation = Some(1);
    s.status = Some(Default::default());
    s
}

pub(super) fn settings(dir: &Path) -> Settings {
    let token = dir.join("token");
    std::fs::write(&token, "feed-token\n").unwrap();
    Settings {
        job: JobSettings {
            image: "profiles-sync:test".into(),
            engine_url: "http://127.0.0.1:1".into(),
            default_cpu: None,
            default_memory: Some("256Mi".into()),
        },
        engine_token_file: token,
        egress_ips: vec!["203.0.113.7".into()],
        test_timeout: Duration::from_secs(30),
    }
}

pub(super) fn builder() -> ClientBuilder {
    ClientBuilder::new()
        .with_resource::<WarehouseConnection>()
        .with_resource::<SelectiveSync>()
        .with_status_subresource::<Job>()
}

pub(super) fn fixed_clock(t: &str) -> Clock {
    let t: Timestamp = t.parse().unwrap();
    Arc::new(move || t)
}

pub(super) async fn fixture(dir: tempfile::TempDir, client: kube::Client, now: &str) -> Fixture {
    fixture_with(dir, client, now, |_| {}).await
}

/// [`fixture`] with its [`settings`] changed by `adjust`.
pub(super) async fn fixture_with(
    dir: tempfile::TempDir,
    client: kube::Client,
    now: &str,
    adjust: impl FnOnce(&mut Settings),
) -> Fixture {
    let mut settings = settings(dir.path());
    adjust(&mut settings);
    let ctx = Context::new(
        client,
        settings,
        fixed_clock(now),
        metrics::Metrics::new().unwrap(),
    );
    Fixture {
        _dir: dir,
        ctx: Arc::new(ctx),
    }
}

impl Fixture {
    pub(super) async fn reconcile(&self, name: &str) -> Result<Action, Error> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), NS, &connection_resource());
        let obj = api.get(name).await?;
        reconcile::reconcile(Arc::new(obj), self.ctx.clone()).await
    }

    pub(super) fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.ctx.client.clone(), NS)
    }

    /// Every object of kind `K` in the namespace.
    pub(super) async fn list<K>(&self) -> Vec<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        self.api::<K>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }

    pub(super) async fn connection(&self, name: &str) -> WarehouseConnection {
        self.api::<WarehouseConnection>().get(name).await.unwrap()
    }

    pub(super) async fn reasons(&self) -> Vec<String> {
        let events: Vec<K8sEvent> = self.list::<K8sEvent>().await;
        events.into_iter().filter_map(|e| e.reason).collect()
    }
}

/// Gives `f`'s context the caches a running controller keeps: a SelectiveSync cache that has
/// had its first complete list, holding `selections`, and a Job cache.
pub(super) fn cache_selections(f: &Fixture, selections: &[&SelectiveSync]) {
    cache(f, selections, None);
}

/// The running controller's watch caches: complete, holding `selections`, and `jobs` when it is
/// `Some` (a Job cache that never listed, so reconciles list Jobs through the API, when `None`).
pub(super) fn cache(f: &Fixture, selections: &[&SelectiveSync], jobs: Option<&[Job]>) {
    use kube::runtime::watcher::Event;
    let mut cache =
        kube::runtime::reflector::store::Writer::new(ApiResource::erase::<SelectiveSync>(&()));
    cache.apply_watcher_event(&Event::Init);
    for s in selections {
        let obj: DynamicObject = serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap();
        cache.apply_watcher_event(&Event::InitApply(obj));
    }
    cache.apply_watcher_event(&Event::InitDone);
    let (jobs_reader, mut jobs_cache) = kube::runtime::reflector::store::<Job>();
    if let Some(jobs) = jobs {
        jobs_cache.apply_watcher_event(&Event::Init);
        for j in jobs {
            jobs_cache.apply_watcher_event(&Event::InitApply(j.clone()));
        }
        jobs_cache.apply_watcher_event(&Event::InitDone);
    }
    let _ = f.ctx.caches.set(Caches {
        jobs: jobs_reader,
        selections: cache.as_reader(),
    });
}

pub(super) fn condition(c: &WarehouseConnection, type_: &str) -> (String, String) {
    let c = condition_said(c, type_);
    (c.status, c.reason)
}

/// The whole condition `type_` of `c`'s status (its message too).
pub(super) fn condition_said(
    c: &WarehouseConnection,
    type_: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let s = c.status.as_ref().expect("a status");
    conditions::find(&s.conditions, type_)
        .unwrap_or_else(|| panic!("no {type_}"))
        .clone()
}

#[tokio::test]
async fn a_new_connection_gets_a_finalizer_a_verified_test_a_job_with_its_config_map_and_a_status()
{
    let dir = tempfile::tempdir().unwrap();
    let conn = connection(dir.path(), "analytics");
    let status_writes = Arc::new(AtomicUsize::new(0));
    let main_writes = Arc::new(AtomicUsize::new(0));
    let (sw, mw) = (status_writes.clone(), main_writes.clone());
    let funcs = interceptor::Funcs::new()
        .replace_status(move |_| {
            sw.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        })
        .replace(move |_| {
            mw.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        });
    let client = builder()
        .with_object(conn)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;

    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    assert_eq!(
        c.metadata.finalizers.as_deref(),
        Some(&[FINALIZER.to_string()][..])
    );
    assert_eq!(
        c.status,
        Some(Default::default()),
        "the finalizer comes first"
    );

    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    assert_eq!(
        condition(&c, "ConnectionVerified"),
        ("True".into(), "Connected".into())
    );
    assert_eq!(
        condition(&c, "Syncing"),
        ("True".into(), "JobStarting".into())
    );
    let status = c.status.clone().unwrap();
    assert_eq!(status.egress_ips, ["203.0.113.7"]);
    assert_eq!(
        status.next_sync_time.map(|t| t.0.to_string()).as_deref(),
        Some("2025-03-01T11:00:00Z")
    );
    // (The fake API bumps generation on metadata patches too, a real one doesn't.)
    assert_eq!(status.observed_generation, c.metadata.generation);

    let jobs = f
        .api::<Job>()
        .list(&ListParams::default().labels("profilesync.dev/connection=analytics"))
        .await
        .unwrap()
        .items;
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    let name = plan::job_name("analytics", "2025-03-01T10:17:00Z".parse().unwrap(), None);
    assert_eq!(job.metadata.name.as_deref(), Some(name.as_str()));
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("WarehouseConnection", "uid-analytics", Some(true))
    );
    let cm = f.api::<ConfigMap>().get(&name).await.unwrap();
    assert_eq!(
        cm.metadata.owner_references.as_ref().unwrap()[0].uid,
        job.metadata.uid.clone().unwrap()
    );
    assert!(cm.data.unwrap()["connection.yaml"].contains("kind: WarehouseConnection"));
    let token = f
        .api::<Secret>()
        .get(build::ENGINE_TOKEN_SECRET)
        .await
        .unwrap();
    assert_eq!(
        token.data.unwrap()[build::ENGINE_TOKEN_KEY].0,
        b"feed-token"
    );

    assert!(
        status_writes.load(Ordering::SeqCst) >= 1,
        "status goes through /status"
    );
    assert_eq!(
        main_writes.load(Ordering::SeqCst),
        0,
        "never a PUT of the whole object"
    );
    let reasons = f.reasons().await;
    assert!(
        reasons.contains(&"ConnectionVerified".to_string()),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"SyncStarted".to_string()), "{reasons:?}");

    // Idempotent: the same instant creates nothing more and rewrites no status.
    let before = status_writes.load(Ordering::SeqCst);
    f.reconcile("analytics").await.unwrap();
    assert_eq!(f.list::<Job>().await.len(), 1);
    assert_eq!(status_writes.load(Ordering::SeqCst), before);
}

/// A fixture at 10:17:30 with one connection, `analytics` (its finalizer set), on an API whose
/// calls go through `funcs`.
pub(super) async fn analytics_with(funcs: interceptor::Funcs) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let client = builder()
        .with_object(conn)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    fixture(dir, client, "2025-03-01T10:17:30Z").await
}

#[tokio::test]
async fn a_status_write_conflict_is_retried_with_a_fresh_read() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let funcs = interceptor::Funcs::new().replace_status(move |_| {
        if a.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(kube_fake_client::Error::Conflict(
                "the object has been modified".into(),
            ));
        }
        Ok(None)
    });
    let f = analytics_with(funcs).await;
    f.reconcile("analytics").await.unwrap();
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "one conflict, one retry"
    );
    assert_eq!(
        condition(&f.connection("analytics").await, "Ready").0,
        "True"
    );
}

/// Asserts that the status of `analytics` says its sync could not start
/// (`Syncing=False StartFailed`), in a message holding each of `said`.
async fn assert_start_failed(f: &Fixture, said: &[&str]) {
    let c = f.connection("analytics").await;
    assert_eq!(
        condition(&c, "Syncing"),
        ("False".into(), "StartFailed".into())
    );
    let why = &condition_said(&c, "Syncing").message;
    assert!(said.iter().all(|s| why.contains(s)), "{why}");
}

/// A Secret `name` of the test namespace holding `value` under `key` (and no label).
fn secret(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some(std::collections::BTreeMap::from([(
            key.to_string(),
            k8s_openapi::ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// A PostgreSQL connection named `pg` (host 127.0.0.1, port 1) whose credentials are in
/// Secret `secret`, alone in the fake API.
async fn unreachable_postgres(secret: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let spec: WarehouseConnectionSpec = serde_json::from_value(serde_json::json!({
        "warehouse": {"type": "postgres", "postgres": {"host": "127.0.0.1", "port": 1, "database": "d"},
                      "credentialsSecretRef": {"name": secret}}
    }))
    .unwrap();
    let mut conn = WarehouseConnection::new("pg", spec);
    conn.metadata.namespace = Some(NS.into());
    conn.metadata.uid = Some("uid-pg".into());
    conn.metadata.generation = Some(1);
    conn.metadata.finalizers = Some(vec![FINALIZER.into()]);
    conn.status = Some(Default::default());
    let client = builder().with_object(conn).build().await.unwrap();
    fixture(dir, client, "2025-03-01T10:00:05Z").await
}

#[tokio::test]
async fn a_missing_secret_is_reported_and_no_job_starts() {
    let f = unreachable_postgres("missing").await;
    f.reconcile("pg").await.unwrap();
    let c = f.connection("pg").await;
    assert_eq!(
        condition(&c, "ConnectionVerified"),
        ("False".into(), "SecretNotFound".into())
    );
    assert_eq!(
        condition(&c, "Ready"),
        ("False".into(), "ConnectionNotVerified".into())
    );
    assert!(f.list::<Job>().await.is_empty());
    assert!(f.reasons().await.contains(&"ConnectionFailed".to_string()));
}

#[tokio::test]
async fn a_malformed_connection_is_skipped_without_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let client = builder().build().await.unwrap();
    let f = fixture(dir, client, "2025-03-01T10:00:05Z").await;
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "profilesync.dev/v1alpha1", "kind": "WarehouseConnection",
        "metadata": {"name": "broken", "namespace": NS},
        "spec": {"warehouse": {"type": "oracle"}}
    }))
    .unwrap();
    let action = reconcile::reconcile(Arc::new(obj), f.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert!(f.ctx.metrics.render().contains("error=\"Malformed\""));
}

#[tokio::test]
async fn an_invalid_selection_blocks_syncs_and_is_reported_on_the_selection() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    // Listed twice: the API server's list-map would refuse it, an older CRD might not.
    let sel = selective_sync(
        "analytics",
        serde_json::json!({
            "connectionRef": {"name": "analytics"},
            "tables": [{"name": "pages"}, {"name": "pages", "enabled": false}]
        }),
    );
    let client = builder()
        .with_object(conn)
        .with_object(sel)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile("analytics").await.unwrap();
    assert!(
        f.list::<Job>().await.is_empty(),
        "no sync with an invalid selection"
    );
    assert_eq!(
        condition(&f.connection("analytics").await, "Ready"),
        ("False".into(), "SelectiveSyncInvalid".into())
    );
    let status = f
        .api::<SelectiveSync>()
        .get("analytics")
        .await
        .unwrap()
        .status
        .unwrap();
    let valid = conditions::find(&status.conditions, "Valid").unwrap();
    assert_eq!(valid.status, "False");
    assert!(
        valid.message.contains("more than once"),
        "{}",
        valid.message
    );
    assert!(
        f.reasons()
            .await
            .contains(&"SelectiveSyncInvalid".to_string())
    );
}

/// A SelectiveSync applied with its connection (`kubectl apply -f` of one file) reaches the API
/// before the controller's cache: the first sync Job takes it from the API, rather than loading
/// the tables and columns it excludes (which turning them off later would not delete).
#[tokio::test]
async fn the_first_job_takes_a_selection_the_cache_has_not_seen_yet() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let mut sel = selective_sync(
        "analytics",
        serde_json::json!({
            "connectionRef": {"name": "analytics"},
            "tables": [{"name": "pages", "enabled": false}]
        }),
    );
    sel.metadata.uid = Some("uid-selection".into());
    let client = builder()
        .with_object(conn)
        .with_object(sel)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    // The running controller's caches, complete but from before the SelectiveSync came.
    cache_selections(&f, &[]);
    assert!(cache_ready(&f.ctx.caches.get().unwrap().selections));

    f.reconcile("analytics").await.unwrap();
    let jobs = f.list::<Job>().await;
    assert_eq!(jobs.len(), 1, "the first sync starts");
    let job = &jobs[0];
    assert_eq!(
        job.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(build::ANNOTATION_SELECTION_UID))
            .map(String::as_str),
        Some("uid-selection")
    );
    let cm = f.api::<ConfigMap>().get(&job.name_any()).await.unwrap();
    let data = cm.data.unwrap();
    let selection = data.get("selection.yaml").expect("the Job's selection");
    assert!(selection.contains("pages"), "{selection}");
}

/// A SelectiveSync naming the connection that cannot be read as one (a CRD of another release)
/// holds the syncs back and says why, rather than the connection syncing every table and
/// column as though it had no selection.
#[tokio::test]
async fn an_unreadable_selection_holds_the_syncs_back() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let client = builder().with_object(conn).build().await.unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    let unreadable: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "profilesync.dev/v1alpha1", "kind": "SelectiveSync",
        "metadata": {"name": "analytics", "namespace": NS},
        "spec": {"connectionRef": {"name": "analytics"}, "default": "listed"}
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(
        f.ctx.client.clone(),
        NS,
        &ApiResource::erase::<SelectiveSync>(&()),
    )
    .create(&PostParams::default(), &unreadable)
    .await
    .unwrap();
    f.reconcile("analytics").await.unwrap();
    assert!(
        f.list::<Job>().await.is_empty(),
        "no sync while its selection cannot be read"
    );
    let ready = condition_said(&f.connection("analytics").await, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SelectiveSyncInvalid")
    );
    assert!(
        ready.message.contains("cannot be read") && ready.message.contains("listed"),
        "{}",
        ready.message
    );
}

/// Interceptors refusing to create `kind` objects with `message` (a quota) while the switch
/// they come with is on (it starts on).
fn creation_refused(
    kind: &'static str,
    message: &'static str,
) -> (Arc<std::sync::atomic::AtomicBool>, interceptor::Funcs) {
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let on = refuse.clone();
    let funcs = interceptor::Funcs::new().create(move |cx| {
        if cx.object["kind"] == kind && on.load(Ordering::SeqCst) {
            return Err(kube_fake_client::Error::InvalidRequest(message.into()));
        }
        Ok(None)
    });
    (refuse, funcs)
}

#[tokio::test]
async fn a_job_the_api_refuses_is_reported_in_the_status_and_an_event_then_retried() {
    let (refuse, funcs) =
        creation_refused("Job", "exceeded quota: jobs, requested: count/jobs.batch=1");
    let f = analytics_with(funcs).await;
    let failed = f.reconcile("analytics").await;
    assert!(
        matches!(failed, Err(Error::Announced(_))),
        "the reconcile fails, so that it is retried with backoff, its error said already: {failed:?}"
    );
    assert_eq!(super::failure_note(&failed.unwrap_err()), None);
    let c = f.connection("analytics").await;
    // The connection test of the same reconcile is in the status too.
    assert_eq!(condition(&c, "ConnectionVerified").0, "True");
    assert_eq!(
        condition(&c, "Syncing"),
        ("False".into(), "StartFailed".into())
    );
    assert_eq!(
        condition(&c, "Ready"),
        ("False".into(), "SyncNotStarted".into())
    );
    let said = condition_said(&c, "Ready").message;
    assert!(said.contains("exceeded quota"), "{said}");
    assert!(f.list::<Job>().await.is_empty());
    let events = f.list::<K8sEvent>().await;
    let warning = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("SyncNotStarted"))
        .expect("a SyncNotStarted Event");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(
        warning
            .note
            .as_deref()
            .unwrap_or("")
            .contains("exceeded quota")
    );

    // Once the API takes it, the next try starts the sync and the status says so.
    refuse.store(false, Ordering::SeqCst);
    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    assert_eq!(
        condition(&c, "Syncing"),
        ("True".into(), "JobStarting".into())
    );
    assert_eq!(condition(&c, "Ready").0, "True");
    assert_eq!(f.list::<Job>().await.len(), 1);
}

/// The Job created but its ConfigMap refused (a quota on ConfigMaps): the Job goes, so that
/// the status saying it could not be created is true (its pod waited in ContainerCreating until
/// the deadline, and the next reconciles, trying to adopt it, failed before writing any status).
/// The retry creates both.
#[tokio::test]
async fn a_job_whose_config_map_is_refused_is_not_left_behind() {
    let (refuse, funcs) = creation_refused(
        "ConfigMap",
        "exceeded quota: configmaps, requested: count/configmaps=1",
    );
    let f = analytics_with(funcs).await;
    assert!(f.reconcile("analytics").await.is_err());
    let c = f.connection("analytics").await;
    assert_eq!(
        condition(&c, "Syncing"),
        ("False".into(), "StartFailed".into())
    );
    assert!(
        f.list::<Job>().await.is_empty(),
        "no Job without its ConfigMap"
    );

    refuse.store(false, Ordering::SeqCst);
    f.reconcile("analytics").await.unwrap();
    let jobs = f.list::<Job>().await;
    assert_eq!(jobs.len(), 1);
    assert!(
        f.api::<ConfigMap>()
            .get_opt(&jobs[0].name_any())
            .await
            .unwrap()
            .is_some()
    );
}

/// A sync Job found without its ConfigMap (a controller restarted after creating it), while no
/// ConfigMap can be made: said in the status and a `SyncNotStarted` Event, not adopted (the
/// reconcile failed before writing any status).
#[tokio::test]
async fn a_job_found_without_its_config_map_that_cannot_be_made_is_said_so() {
    let (_refuse, funcs) = creation_refused(
        "ConfigMap",
        "exceeded quota: configmaps, requested: count/configmaps=1",
    );
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let job = super::api_lifecycle_tests::running_job(
        &conn,
        "analytics-29013697",
        "2025-03-01T10:17:00Z",
    );
    let client = builder()
        .with_object(conn)
        .with_object(job)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    assert!(f.reconcile("analytics").await.is_err());
    let c = f.connection("analytics").await;
    let ready = condition_said(&c, "Ready");
    assert_eq!(ready.reason, "SyncNotStarted");
    assert!(
        ready.message.contains("its ConfigMap could not be created"),
        "{}",
        ready.message
    );
    let reasons = f.reasons().await;
    assert!(
        reasons.contains(&"SyncNotStarted".to_string()),
        "{reasons:?}"
    );
    assert!(!reasons.contains(&"JobAdopted".to_string()), "{reasons:?}");
}

/// A Job the controller deleted itself (its ConfigMap refused), which a listing behind the
/// deletion still shows, is not taken for a sync deleted before it ended.
#[tokio::test]
async fn a_job_the_controller_deleted_itself_is_no_sync_deleted_by_hand() {
    use super::api_lifecycle_tests::{SYNC_JOB as name, with_sync_job};
    let f = with_sync_job(|_| {}, vec![]).await;
    f.ctx.with_memory(|m| {
        m.cleaned
            .insert(format!("{NS}/{name}"), "uid-analytics".into())
    });
    super::api_lifecycle_tests::seen_then_deleted(&f, name).await;
    let syncs = f.connection("analytics").await.status.unwrap().syncs;
    assert!(syncs.is_empty(), "{syncs:?}");
    assert!(
        f.ctx.with_memory(|m| m.cleaned.is_empty()),
        "forgotten once gone"
    );
    assert!(
        !f.reasons().await.contains(&"JobAdopted".to_string()),
        "nor adopted"
    );
}

#[tokio::test]
async fn dotted_and_dashed_connection_names_get_jobs_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut dotted = connection(dir.path(), "web.prod");
    dotted.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let mut dashed = connection(dir.path(), "web-prod");
    dashed.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let client = builder()
        .with_object(dotted)
        .with_object(dashed)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile("web.prod").await.unwrap();
    f.reconcile("web-prod").await.unwrap();
    let jobs: Api<Job> = f.api();
    for name in ["web.prod", "web-prod"] {
        let owned = jobs
            .list(&ListParams::default().labels(&build::selector(name)))
            .await
            .unwrap()
            .items;
        assert_eq!(owned.len(), 1, "{name} has a Job of its own");
        assert_eq!(
            owned[0].metadata.owner_references.as_ref().unwrap()[0].uid,
            format!("uid-{name}")
        );
        assert_eq!(
            condition(&f.connection(name).await, "Syncing"),
            ("True".into(), "JobStarting".into())
        );
    }
}

#[tokio::test]
async fn a_job_name_taken_by_another_object_is_not_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    // A Job of someone else's with the name the first sync would get (named after its minute).
    let taken = plan::job_name(
        "analytics",
        plan::minute_of("2025-03-01T10:17:30Z".parse().unwrap()),
        None,
    );
    let stranger = Job {
        metadata: kube::api::ObjectMeta {
            name: Some(taken.clone()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        ..Job::default()
    };
    let client = builder()
        .with_object(conn)
        .with_object(stranger)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    assert!(f.reconcile("analytics").await.is_err());
    assert_start_failed(&f, &[&taken, "not this connection's"]).await;
    let job: Job = f.api().get(&taken).await.unwrap();
    assert!(
        job.metadata.owner_references.is_none(),
        "the stranger's Job is left alone"
    );
}

/// A Secret of the engine token Secret's name that the controller did not make is someone
/// else's: it is not replaced (its data lost, the engine's token put where its owner's
/// workloads read it), no Job starts, and the status names the Secret.
#[tokio::test]
async fn a_user_secret_with_the_token_secret_s_name_is_left_untouched() {
    a_user_secret_with_the_token_secret_s_name_is_left_untouched_when(false).await;
}

/// The same when the Secret is made between the controller's read and its create (the create
/// answers 409; that was taken for the controller's own Secret).
#[tokio::test]
async fn a_user_secret_made_after_the_controller_s_read_is_left_untouched() {
    a_user_secret_with_the_token_secret_s_name_is_left_untouched_when(true).await;
}

async fn a_user_secret_with_the_token_secret_s_name_is_left_untouched_when(hide_first_read: bool) {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let theirs = secret(build::ENGINE_TOKEN_SECRET, "password", "theirs");
    // Hidden from the controller's first read: the Secret was made between its read and its
    // create (which then answers 409).
    let hidden = Arc::new(std::sync::atomic::AtomicBool::new(hide_first_read));
    let funcs = interceptor::Funcs::new().get(move |cx| {
        if cx.name == build::ENGINE_TOKEN_SECRET && hidden.swap(false, Ordering::SeqCst) {
            return Err(kube_fake_client::Error::NotFound {
                kind: "secrets".into(),
                name: cx.name.into(),
                namespace: cx.namespace.into(),
            });
        }
        Ok(None)
    });
    let client = builder()
        .with_object(conn)
        .with_object(theirs.clone())
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    let e = f.reconcile("analytics").await.unwrap_err();
    assert_eq!(e.root().metric_label(), "SecretNameTaken", "{e}");
    let kept: Secret = f.api().get(build::ENGINE_TOKEN_SECRET).await.unwrap();
    assert_eq!(kept.data, theirs.data, "their Secret keeps its data");
    assert!(!build::made_by_controller(&kept.metadata));
    assert!(f.list::<Job>().await.is_empty(), "no Job without the token");
    let name = format!("{NS}/{}", build::ENGINE_TOKEN_SECRET);
    assert_start_failed(&f, &[&name, "not made by profiles-sync"]).await;
}

#[tokio::test]
async fn a_connection_with_a_long_name_gets_its_job_labelled_within_63_characters() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}.{}", "a".repeat(40), "b".repeat(40));
    let conn = finalized_connection(dir.path(), &name);
    let client = builder().with_object(conn).build().await.unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile(&name).await.unwrap();
    let jobs: Vec<Job> = f.list().await;
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert!(job.metadata.name.as_ref().unwrap().len() <= 63);
    let pod_labels = job
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap();
    let config_maps: Vec<ConfigMap> = f.list().await;
    assert_eq!(config_maps.len(), 1);
    for labels in [
        job.metadata.labels.clone().unwrap(),
        pod_labels,
        config_maps[0].metadata.labels.clone().unwrap(),
    ] {
        for (k, v) in &labels {
            assert!(v.len() <= 63, "{k}={v}: longer than a label value may be");
        }
        assert_eq!(
            labels[build::LABEL_CONNECTION],
            plan::connection_label(&name)
        );
    }
    // Found again by its label: the next reconcile sees the running Job and starts none.
    f.reconcile(&name).await.unwrap();
    assert_eq!(f.list::<Job>().await.len(), 1);
    assert_eq!(
        condition(&f.connection(&name).await, "Syncing"),
        ("True".into(), "JobStarting".into())
    );
}

/// A sync Job a queue holds (Kueue suspends a Job until it admits it) runs no pod: the Syncing
/// condition says so (it said "running"), and the next reconcile starts no other Job.
#[tokio::test]
async fn a_sync_job_held_suspended_by_a_queue_is_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let client = builder()
        .with_object(finalized_connection(dir.path(), "analytics"))
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile("analytics").await.unwrap();
    let jobs = f.list::<Job>().await;
    assert_eq!(jobs.len(), 1);
    let mut job = jobs[0].clone();
    job.spec.as_mut().unwrap().suspend = Some(true);
    f.api::<Job>()
        .replace(&job.name_any(), &PostParams::default(), &job)
        .await
        .unwrap();
    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    assert_eq!(
        condition(&c, "Syncing"),
        ("True".into(), "JobSuspended".into())
    );
    assert_eq!(f.list::<Job>().await.len(), 1);
}

/// A connection whose test fails again for another cause shows that cause in its Events too:
/// kube's Recorder folds an Event into an earlier one of the same reason and action (for
/// minutes), keeping the earlier message, so `kubectl describe` said "Secret not found" while
/// the status said the Secret lacked a key.
#[tokio::test]
async fn a_connection_failing_for_another_cause_shows_it_in_its_events() {
    let f = unreachable_postgres("creds").await;
    f.reconcile("pg").await.unwrap();
    assert_eq!(
        condition(&f.connection("pg").await, "ConnectionVerified").1,
        "SecretNotFound"
    );
    f.api::<Secret>()
        .create(
            &kube::api::PostParams::default(),
            &secret("creds", "user", "x"),
        )
        .await
        .unwrap();
    f.reconcile("pg").await.unwrap();
    assert_eq!(
        condition(&f.connection("pg").await, "ConnectionVerified").1,
        "SecretKeyMissing"
    );
    let notes: Vec<String> = f
        .list::<K8sEvent>()
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ConnectionFailed"))
        .filter_map(|e| e.note.clone())
        .collect();
    for cause in ["SecretNotFound", "SecretKeyMissing"] {
        assert!(
            notes.iter().any(|n| n.starts_with(cause)),
            "{cause}: {notes:?}"
        );
    }
}

/// Of two SelectiveSyncs for one connection, the oldest *valid* one applies, as documented:
/// an invalid older one held back a valid newer one, and no sync ran at all. The invalid one
/// says why, and which applies meanwhile.
#[tokio::test]
async fn a_valid_selection_applies_when_an_older_one_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let with_created = |mut s: SelectiveSync, at: &str| {
        s.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            at.parse().unwrap(),
        ));
        s
    };
    let broken = with_created(
        selective_sync(
            "older",
            serde_json::json!({
                "connectionRef": {"name": "analytics"},
                "tables": [{"name": "pages"}, {"name": "pages", "enabled": false}]
            }),
        ),
        "2025-03-01T08:00:00Z",
    );
    let good = with_created(
        selective_sync(
            "newer",
            serde_json::json!({"connectionRef": {"name": "analytics"}, "default": "none"}),
        ),
        "2025-03-01T09:00:00Z",
    );
    let client = builder()
        .with_object(conn)
        .with_object(broken)
        .with_object(good)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile("analytics").await.unwrap();
    assert_eq!(f.list::<Job>().await.len(), 1, "the sync runs");
    let valid = |name: &'static str| {
        let api = f.api::<SelectiveSync>();
        async move {
            let status = api.get(name).await.unwrap().status.unwrap();
            let c = conditions::find(&status.conditions, "Valid")
                .unwrap()
                .clone();
            (c.status, c.message)
        }
    };
    assert_eq!(valid("newer").await.0, "True");
    let (status, message) = valid("older").await;
    assert_eq!(status, "False");
    assert!(
        message.contains("more than once") && message.contains("\"newer\" applies"),
        "{message}"
    );
}

/// Of two valid SelectiveSyncs for one connection, the newer one is valid and not in effect,
/// and says which applies (it said `Valid=False Invalid`, with a `SelectiveSyncInvalid` Event,
/// though nothing in it was wrong).
#[tokio::test]
async fn a_valid_selection_superseded_by_an_older_one_is_valid_and_not_in_effect() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let created = |name: &str, at: &str| {
        let mut s = selective_sync(
            name,
            serde_json::json!({"connectionRef": {"name": "analytics"}}),
        );
        s.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            at.parse().unwrap(),
        ));
        s
    };
    let client = builder()
        .with_object(conn)
        .with_object(created("older", "2025-03-01T08:00:00Z"))
        .with_object(created("newer", "2025-03-01T09:00:00Z"))
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile("analytics").await.unwrap();
    let api = f.api::<SelectiveSync>();
    let newer = api.get("newer").await.unwrap().status.unwrap();
    let cond = |type_: &str| conditions::find(&newer.conditions, type_).unwrap().clone();
    assert_eq!(cond("Valid").status, "True");
    let ready = cond("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NotInEffect")
    );
    assert!(ready.message.contains("\"older\""), "{}", ready.message);
    assert!(
        !f.reasons()
            .await
            .contains(&"SelectiveSyncInvalid".to_string())
    );
}

/// A warehouse type without a loader says so first: its missing Secret said `SecretNotFound`
/// ("create it"), and once it was created, `NotSupported`.
#[tokio::test]
async fn a_warehouse_type_without_a_loader_is_said_so_before_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "snow");
    conn.spec.warehouse = serde_json::from_value(serde_json::json!({
        "type": "snowflake",
        "snowflake": {"account": "org-acct", "warehouse": "LOAD_WH", "database": "ANALYTICS"},
        "credentialsSecretRef": {"name": "missing"}
    }))
    .unwrap();
    let client = builder().with_object(conn).build().await.unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    f.reconcile("snow").await.unwrap();
    assert_eq!(
        condition(&f.connection("snow").await, "ConnectionVerified"),
        ("False".into(), "NotSupported".into())
    );
    assert!(f.list::<Job>().await.is_empty(), "no sync runs");
}
