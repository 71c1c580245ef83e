//! The controller against API failures, refusals and races: what a failed status write, a
//! refused Job, connections deleted together and a history outgrown by its Jobs leave behind
//! (each found by a review, failing before its fix).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube_fake_client::interceptor;

use super::api_lifecycle_tests::{finished_job, pod_with_report, running_job, tracks_sync};
use super::api_tests::{builder, finalized_connection, fixture, selective_sync};
use super::*;

/// Interceptors that fail the next status write of a `kind` object (an API timeout) whenever
/// `armed` is set, disarming it.
fn status_write_fails(kind: &'static str, armed: Arc<AtomicBool>) -> interceptor::Funcs {
    interceptor::Funcs::new().replace_status(move |cx| {
        if cx.object["kind"] == kind && armed.swap(false, Ordering::SeqCst) {
            return Err(kube_fake_client::Error::Internal(
                "etcdserver: request timed out".into(),
            ));
        }
        Ok(None)
    })
}

/// A SelectiveSync's status write fails once (an API timeout, a 500): the retry still gives the
/// sync to the SelectiveSync (its rows per table), the Events and the metrics. The connection's
/// status, which records the Jobs folded, used to be written first: the retry found the Job in
/// `status.syncs` and never read its report again, so the SelectiveSync kept the previous
/// sync's rows and no `SyncSucceeded` Event or `sync_runs_total` count ever came.
#[tokio::test]
async fn a_failed_selection_status_write_loses_nothing_of_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let (ok, ok_pod) = tracks_sync(&conn);
    let selection = selective_sync(
        "analytics",
        serde_json::json!({"connectionRef": {"name": "analytics"}}),
    );
    let funcs = status_write_fails("SelectiveSync", Arc::new(AtomicBool::new(true)));
    let client = builder()
        .with_object(conn)
        .with_object(ok)
        .with_object(ok_pod)
        .with_object(selection)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    // The first reconcile fails on the SelectiveSync's status; the runtime retries it.
    let _ = f.reconcile("analytics").await;
    f.reconcile("analytics").await.unwrap();

    let s = f.connection("analytics").await.status.unwrap();
    assert_eq!(s.syncs.len(), 1, "the sync is in the connection's history");
    let sel = f
        .api::<SelectiveSync>()
        .get("analytics")
        .await
        .unwrap()
        .status
        .unwrap();
    let rows: Vec<(String, i64)> = sel
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.rows))
        .collect();
    let events: Vec<String> = f
        .list::<K8sEvent>()
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    let metrics = f.ctx.metrics.render();
    assert!(
        rows == [("tracks".to_string(), 7)]
            && events.contains(&"SyncSucceeded".to_string())
            && metrics.contains("sync_runs_total{result=\"Success\"} 1"),
        "after one failed SelectiveSync status write, the sync is lost for the selection \
         (tables {rows:?}, want [(\"tracks\", 7)]), for the Events ({events:?}) and for the \
         metrics (sync_runs_total Success 1 missing)"
    );
}

/// A SelectiveSync not in effect (a second one for the connection) whose status cannot be
/// written (RBAC, an admission policy, its size) does not hold the connection up: the sync is
/// recorded, announced and given to the SelectiveSync in effect (review of the write order
/// above, which would otherwise have let it fail every reconcile).
#[tokio::test]
async fn a_selection_not_in_effect_that_cannot_be_written_holds_nothing_up() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let (ok, ok_pod) = tracks_sync(&conn);
    let created = |name: &str, at: &str| {
        let mut s = selective_sync(
            name,
            serde_json::json!({"connectionRef": {"name": "analytics"}}),
        );
        s.metadata.creation_timestamp = Some(Time(at.parse().unwrap()));
        s
    };
    let funcs = interceptor::Funcs::new().replace_status(move |cx| {
        if cx.object["kind"] == "SelectiveSync" && cx.object["metadata"]["name"] == "second" {
            return Err(kube_fake_client::Error::Internal(
                "admission webhook denied the request".into(),
            ));
        }
        Ok(None)
    });
    let client = builder()
        .with_object(conn)
        .with_object(ok)
        .with_object(ok_pod)
        .with_object(created("analytics", "2025-03-01T08:00:00Z"))
        .with_object(created("second", "2025-03-01T08:30:00Z"))
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    assert_eq!(s.syncs.len(), 1, "the sync is in the connection's history");
    let sel = f.api::<SelectiveSync>().get("analytics").await.unwrap();
    let rows: Vec<i64> = sel.status.unwrap().tables.iter().map(|t| t.rows).collect();
    assert_eq!(rows, [7]);
    let events: Vec<String> = f
        .list::<K8sEvent>()
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(events.contains(&"SyncSucceeded".to_string()), "{events:?}");
}

/// Two connections of a namespace deleted together (`kubectl delete whc --all`, a namespace's
/// GitOps app removed) are cleaned up by two concurrent reconciles, whose first lists of the
/// namespace's connections meet (the interceptor makes them; the engine call of each, up to
/// 10 s, lies between its list and its finalizer patch): each sees the other still cleaning up
/// and keeps the engine token Secret for it. The last to drop its finalizer then deletes it; the
/// Secret, a live credential of the engine's feed API, used to stay behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_deleted_together_leave_no_engine_token_secret() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::sync::{Condvar, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let deleting = |name: &str| {
        let mut conn = finalized_connection(dir.path(), name);
        conn.metadata.deletion_timestamp = Some(Time("2025-03-01T10:00:00Z".parse().unwrap()));
        conn
    };
    // The namespace's connections are listed (no label selector) by each cleanup: the two
    // lists wait for each other (at most 3 s), as two reconciles running at once do.
    let meet = Arc::new((Mutex::new(0usize), Condvar::new()));
    let m = meet.clone();
    let funcs = interceptor::Funcs::new().list(move |cx| {
        if cx.params.label_selector.is_none() {
            let (count, cv) = &*m;
            let mut n = count.lock().unwrap();
            *n += 1;
            cv.notify_all();
            let _ = cv
                .wait_timeout_while(n, Duration::from_secs(3), |n| *n < 2)
                .unwrap();
        }
        Ok(None)
    });
    let client = builder()
        .with_object(deleting("a"))
        .with_object(deleting("b"))
        .with_object(build::engine_token_secret(super::api_tests::NS, "t0ken"))
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:00:05Z").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        f.ctx.client.clone(),
        super::api_tests::NS,
        &connection_resource(),
    );
    let (a, b) = (api.get("a").await.unwrap(), api.get("b").await.unwrap());
    let (ca, cb) = (f.ctx.clone(), f.ctx.clone());
    let ta = tokio::spawn(async move { reconcile::reconcile(Arc::new(a), ca).await });
    let tb = tokio::spawn(async move { reconcile::reconcile(Arc::new(b), cb).await });
    ta.await.unwrap().unwrap();
    tb.await.unwrap().unwrap();

    let left: Vec<String> = f
        .list::<WarehouseConnection>()
        .await
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert!(left.is_empty(), "both connections are gone: {left:?}");
    let secret = f
        .api::<Secret>()
        .get_opt(build::ENGINE_TOKEN_SECRET)
        .await
        .unwrap();
    assert!(
        secret.is_none(),
        "no connection is left in the namespace, yet the engine token Secret is"
    );
}

/// A `sync-now` request whose Job the API refuses (a ResourceQuota, an admission webhook, the
/// engine token unreadable) keeps its annotation, and the retry starts the manual sync. The
/// annotation used to be removed by the reconcile that failed to start the Job, so that no
/// manual sync ever ran (the README says it is removed "when the Job exists").
#[tokio::test]
async fn a_sync_now_whose_job_is_refused_stays_until_it_runs() {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "analytics");
    conn.metadata.annotations =
        Some([(build::ANNOTATION_SYNC_NOW.to_string(), "req-1".to_string())].into());
    // It synced at 10:00 (its Jobs pruned since): nothing is due before 11:00.
    conn.status = Some(crate::crd::WarehouseConnectionStatus {
        last_sync_time: Some(Time("2025-03-01T10:00:05Z".parse().unwrap())),
        ..Default::default()
    });
    let refuse = Arc::new(AtomicBool::new(true));
    let r = refuse.clone();
    let funcs = interceptor::Funcs::new().create(move |cx| {
        if cx.object["kind"] == "Job" && r.load(Ordering::SeqCst) {
            return Err(kube_fake_client::Error::InvalidRequest(
                "exceeded quota: jobs, requested: count/jobs.batch=1".into(),
            ));
        }
        Ok(None)
    });
    let client = builder()
        .with_object(conn)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    assert!(
        f.reconcile("analytics").await.is_err(),
        "the Job is refused"
    );
    // The quota frees up; the runtime retries.
    refuse.store(false, Ordering::SeqCst);
    f.reconcile("analytics").await.unwrap();
    let manual: Vec<String> = f
        .list::<Job>()
        .await
        .into_iter()
        .filter(|j| {
            j.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(build::ANNOTATION_SYNC_NOW))
                .is_some_and(|v| v == "req-1")
        })
        .filter_map(|j| j.metadata.name)
        .collect();
    let annotation = f
        .connection("analytics")
        .await
        .metadata
        .annotations
        .and_then(|a| a.get(build::ANNOTATION_SYNC_NOW).cloned());
    assert_eq!(
        manual.len(),
        1,
        "the manual sync never runs once its first Job was refused (annotation now {annotation:?})"
    );
}

/// The newest failed Job is kept (history: 1 failed) while ten newer syncs push its record out
/// of the ten-record history; when the next sync fails, the older failed Job is beyond the limit
/// and is pruned. Pruning took only Jobs whose record is in `status.syncs`, so such a Job (its
/// pod, its ConfigMap) used to stay until the connection was deleted, one more per episode.
#[tokio::test]
async fn a_job_whose_record_left_the_history_is_pruned() {
    use crate::crd::{SyncRecord, SyncRows, SyncStatus, WarehouseConnectionStatus};
    use k8s_openapi::api::batch::v1::{Job, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "analytics");
    let at = |h: u32| -> Timestamp { format!("2025-03-01T{h:02}:00:00Z").parse().unwrap() };
    let name = |h: u32| plan::job_name("analytics", at(h), None);
    let record = |h: u32, status: SyncStatus| SyncRecord {
        id: name(h),
        status,
        start_time: Time(at(h)),
        duration_seconds: 10.0,
        rows: SyncRows::default(),
        tables: vec![],
        errors: vec![],
        job_name: Some(name(h)),
    };
    // 01:00 failed, then 02:00..10:00 succeeded: ten records, newest first. Of the Jobs, the
    // history limits kept the failed one and the three newest succeeded ones; 11:00 has
    // succeeded and is not folded yet; 12:00 is running.
    let mut syncs: Vec<SyncRecord> = (2..=10)
        .rev()
        .map(|h| record(h, SyncStatus::Success))
        .collect();
    syncs.push(record(1, SyncStatus::Failed));
    conn.status = Some(WarehouseConnectionStatus {
        last_sync_time: Some(Time(at(12))),
        syncs,
        ..Default::default()
    });
    let conn_for_jobs = conn.clone();
    let job = |h: u32, complete: bool| {
        finished_job(&conn_for_jobs, &name(h), &at(h).to_string(), complete)
    };
    let mut running = job(12, false);
    running.status = Some(JobStatus {
        active: Some(1),
        start_time: Some(Time(at(12))),
        ..JobStatus::default()
    });
    let client = builder()
        .with_object(conn)
        .with_object(job(1, false))
        .with_object(job(8, true))
        .with_object(job(9, true))
        .with_object(job(10, true))
        .with_object(job(11, true))
        .with_object(running)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T12:30:00Z").await;
    // 11:00 is folded: the 01:00 record leaves the ten-record history; its Job stays, being
    // the newest failed one.
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    assert!(!s.syncs.iter().any(|r| r.job_name == Some(name(1))));
    // 12:00 fails (no pod left: its record says so), and is folded.
    let jobs: Api<Job> = f.api();
    let failed = job(12, false);
    let mut current = jobs.get(&name(12)).await.unwrap();
    current.status = failed.status;
    jobs.replace_status(&name(12), &Default::default(), &current)
        .await
        .unwrap();
    f.reconcile("analytics").await.unwrap();
    f.reconcile("analytics").await.unwrap();
    f.reconcile("analytics").await.unwrap();
    let mut left: Vec<String> = f
        .list::<Job>()
        .await
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    left.sort();
    let mut want = vec![name(10), name(11), name(12), name(9)];
    want.sort();
    assert_eq!(
        left,
        want,
        "history limits: 3 succeeded and 1 failed Job (the 01:00 failure is left forever: {})",
        name(1)
    );
}

/// The connection's status write fails (an API timeout) in the reconcile that created a sync
/// Job: the retry finds the Job running and still announces it (`SyncStarted`). The Event was
/// published only by the reconcile that created the Job, after its status write, so a failed
/// write lost it for good — `kubectl describe` showed no start for a sync that ran.
#[tokio::test]
async fn a_sync_started_by_a_reconcile_that_failed_afterwards_is_still_announced() {
    let f = super::api_tests::analytics_with(status_write_fails(
        "WarehouseConnection",
        Arc::new(AtomicBool::new(true)),
    ))
    .await;
    assert!(
        f.reconcile("analytics").await.is_err(),
        "the status write fails once"
    );
    assert_eq!(f.list::<Job>().await.len(), 1, "the Job was created");
    f.reconcile("analytics").await.unwrap();
    assert_eq!(f.list::<Job>().await.len(), 1, "and not created again");
    let c = f.connection("analytics").await;
    assert_eq!(
        super::api_tests::condition(&c, "Syncing"),
        ("True".into(), "JobStarting".into())
    );
    let reasons = f.reasons().await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "SyncStarted").count(),
        1,
        "one SyncStarted for the running sync: {reasons:?}"
    );
    // Announced once: later reconciles say nothing more.
    f.reconcile("analytics").await.unwrap();
    let reasons = f.reasons().await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "SyncStarted").count(),
        1,
        "{reasons:?}"
    );
}

/// The same for a running Job adopted after a restart: a failed status write in the reconcile
/// that adopted it lost its `JobAdopted` Event (the retry knew the Job already).
#[tokio::test]
async fn a_job_adopted_by_a_reconcile_that_failed_afterwards_is_still_announced() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let running = running_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z");
    let funcs = status_write_fails("WarehouseConnection", Arc::new(AtomicBool::new(true)));
    let client = builder()
        .with_object(conn)
        .with_object(running)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:00:30Z").await;
    assert!(f.reconcile("analytics").await.is_err());
    f.reconcile("analytics").await.unwrap();
    let reasons = f.reasons().await;
    assert!(
        reasons.contains(&"JobAdopted".to_string()),
        "the adoption is announced: {reasons:?}"
    );
}

/// A sync pod killed for its memory limit (OOMKilled, exit code 137) writes no report: the
/// status and the `SyncFailed` Event said only "its pod wrote no termination message", hiding
/// the cause the pod's status gives (and the fix: more memory in `spec.resources`).
#[tokio::test]
async fn a_sync_pod_killed_for_memory_is_said_to_be() {
    use k8s_openapi::api::core::v1::ContainerStateTerminated;
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let failed = finished_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z", false);
    let mut pod = pod_with_report("analytics-29013660", "");
    let state = pod
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0]
        .state
        .as_mut()
        .unwrap();
    state.terminated = Some(ContainerStateTerminated {
        exit_code: 137,
        reason: Some("OOMKilled".into()),
        message: None,
        ..ContainerStateTerminated::default()
    });
    let client = builder()
        .with_object(conn)
        .with_object(failed)
        .with_object(pod)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    let message = &s.syncs[0].errors[0].message;
    assert!(
        message.contains("OOMKilled") && message.contains("137"),
        "the record names the cause: {message}"
    );
    let notes: Vec<String> = f
        .list::<K8sEvent>()
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("SyncFailed"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("OOMKilled")),
        "and so does the Event: {notes:?}"
    );
}

/// A re-test passes (the warehouse reachable again) but the status write that would say so
/// fails once: the retry kept `ConnectionVerified=False` and `Ready=False` — and held every sync
/// back — until the next periodic test 30 minutes later, the passing result living only in the
/// controller's memory, which had marked the connection tested.
#[tokio::test]
async fn a_test_result_whose_status_write_failed_is_not_lost() {
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    // A directory where the SQLite warehouse file should be: it cannot be opened.
    let blocker = dir.path().join("analytics.db");
    std::fs::create_dir(&blocker).unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let armed = Arc::new(AtomicBool::new(false));
    let funcs = status_write_fails("WarehouseConnection", armed.clone());
    let client = builder()
        .with_object(conn)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let t0: Timestamp = "2025-03-01T10:17:30Z".parse().unwrap();
    let now = Arc::new(Mutex::new(t0));
    let n = now.clone();
    let ctx = Arc::new(Context::new(
        client,
        super::api_tests::settings(dir.path()),
        Arc::new(move || *n.lock().unwrap()),
        metrics::Metrics::new().unwrap(),
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        super::api_tests::NS,
        &connection_resource(),
    );
    let conns: Api<WarehouseConnection> = Api::namespaced(ctx.client.clone(), super::api_tests::NS);
    let reconcile = || async {
        let obj = api.get("analytics").await.unwrap();
        reconcile::reconcile(Arc::new(obj), ctx.clone()).await
    };
    reconcile().await.unwrap();
    let c = conns.get("analytics").await.unwrap();
    assert_eq!(
        super::api_tests::condition(&c, "ConnectionVerified").0,
        "False",
        "the warehouse file cannot be opened"
    );
    // Fixed; the periodic re-test passes, and the status write fails once.
    std::fs::remove_dir(&blocker).unwrap();
    *now.lock().unwrap() = t0 + jiff::SignedDuration::from_mins(6);
    armed.store(true, Ordering::SeqCst);
    assert!(reconcile().await.is_err());
    *now.lock().unwrap() = t0 + jiff::SignedDuration::from_secs(6 * 60 + 15);
    reconcile().await.unwrap();
    let c = conns.get("analytics").await.unwrap();
    assert_eq!(
        super::api_tests::condition(&c, "ConnectionVerified"),
        ("True".into(), "Connected".into()),
        "the passing test is in the status"
    );
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), super::api_tests::NS);
    assert_eq!(
        jobs.list(&Default::default()).await.unwrap().items.len(),
        1,
        "and the first sync runs"
    );
}

/// A SelectiveSync edited while its status is written: the write, retried after the conflict,
/// describes the spec the reconcile read, under that spec's generation. It described the new
/// spec under the old generation, so `kubectl get` took the new spec as not yet observed while
/// the status already showed it (and a client waiting for the generation was misled).
#[tokio::test]
async fn a_selection_status_written_after_a_conflict_describes_the_generation_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let read = selective_sync(
        "analytics",
        serde_json::json!({"connectionRef": {"name": "analytics"}}),
    );
    let client = builder()
        .with_object(conn.clone())
        .with_object(read.clone())
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    let api = f.api::<SelectiveSync>();
    let mut stale = api.get("analytics").await.unwrap();
    // Edited after the reconcile read it: one table fewer, generation 2.
    let mut edited = stale.clone();
    edited.spec = serde_json::from_value(serde_json::json!({
        "connectionRef": {"name": "analytics"}, "tables": [{"name": "pages", "enabled": false}]
    }))
    .unwrap();
    edited.metadata.generation = Some(2);
    api.replace("analytics", &Default::default(), &edited)
        .await
        .unwrap();
    stale.metadata.generation = Some(1);
    let selections = observe::Selections {
        active: Some(stale.clone()),
        active_problem: None,
        others: vec![],
    };
    let now: Timestamp = "2025-03-01T09:30:00Z".parse().unwrap();
    apply::write_selection_statuses(&f.ctx, &conn, &selections, None, now, &mut vec![])
        .await
        .unwrap();
    let written = api.get("analytics").await.unwrap().status.unwrap();
    assert_eq!(written.observed_generation, Some(1));
    assert_eq!(
        written.enabled_tables,
        Some(status::enabled_tables(&stale.spec, &[])),
        "the tables of the spec of generation 1"
    );
    assert_ne!(
        status::enabled_tables(&stale.spec, &[]),
        status::enabled_tables(&edited.spec, &[])
    );
}
