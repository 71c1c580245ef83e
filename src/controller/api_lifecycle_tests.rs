//! API effects over a connection's life against the in-memory API (see `api_tests.rs` for the
//! fixture): finished Jobs folded and pruned, a Job adopted after a restart, deletion.

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    Pod, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::DynamicObject;

use super::api_tests::{
    Fixture, NS, builder, cache, cache_selections, condition, connection, finalized_connection,
    fixture, selective_sync,
};
use super::*;
use crate::crd::{ErrorClass, SyncRows, SyncStatus, WarehouseConnectionStatus};
use crate::sync::SyncReport;

pub(super) fn finished_job(
    conn: &WarehouseConnection,
    name: &str,
    slot: &str,
    complete: bool,
) -> Job {
    let mut job = Job {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(build::labels(&conn.metadata.name.clone().unwrap())),
            annotations: Some([(build::ANNOTATION_SLOT.to_string(), slot.to_string())].into()),
            owner_references: build::owner(conn).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        ..Job::default()
    };
    let at = Time(slot.parse().unwrap());
    job.status = Some(JobStatus {
        start_time: Some(at.clone()),
        // A minute's run (a report's start is never after its Job's end).
        completion_time: complete.then(|| Time(at.0 + jiff::SignedDuration::from_secs(60))),
        succeeded: Some(i32::from(complete)),
        failed: Some(i32::from(!complete)),
        conditions: Some(vec![JobCondition {
            type_: if complete { "Complete" } else { "Failed" }.into(),
            status: "True".into(),
            ..JobCondition::default()
        }]),
        ..JobStatus::default()
    });
    job
}

/// A Job of `conn` for `slot`, started then, whose pod runs (`status.active` and `ready` 1, no
/// end).
pub(super) fn running_job(conn: &WarehouseConnection, name: &str, slot: &str) -> Job {
    let mut job = finished_job(conn, name, slot, true);
    job.status = Some(JobStatus {
        active: Some(1),
        ready: Some(1),
        start_time: Some(Time(slot.parse().unwrap())),
        ..JobStatus::default()
    });
    job
}

/// The Job of [`with_sync_job`].
pub(super) const SYNC_JOB: &str = "analytics-29013660";

/// A fixture (its clock at 10:05) of connection `analytics` with its sync Job [`SYNC_JOB`] of
/// the 10:00 slot, running as [`running_job`] makes it, then as `adjust` leaves it, and
/// `others` objects besides.
pub(super) async fn with_sync_job(adjust: impl FnOnce(&mut Job), others: Vec<Pod>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let mut job = running_job(&conn, SYNC_JOB, "2025-03-01T10:00:00Z");
    adjust(&mut job);
    let mut client = builder().with_object(conn).with_object(job);
    for pod in others {
        client = client.with_object(pod);
    }
    fixture(dir, client.build().await.unwrap(), "2025-03-01T10:05:00Z").await
}

/// Reconciles (the Job seen), deletes `job` as by hand, and reconciles again.
pub(super) async fn seen_then_deleted(f: &Fixture, job: &str) {
    f.reconcile("analytics").await.unwrap();
    f.api::<Job>()
        .delete(job, &Default::default())
        .await
        .unwrap();
    f.reconcile("analytics").await.unwrap();
}

pub(super) fn pod_with_report(job: &str, message: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{job}-x1")),
            namespace: Some(NS.into()),
            labels: Some([("job-name".to_string(), job.to_string())].into()),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "sync".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 0,
                        message: Some(message.into()),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    }
}

/// When the sync of [`tracks_sync`] started.
pub(super) const TRACKS_START: &str = "2025-03-01T09:00:02Z";

/// The sync of the 09:00 slot, done: its completed Job [`SYNC_JOB`] and the pod holding its
/// report ([`tracks_report`], started at [`TRACKS_START`]).
pub(super) fn tracks_sync(conn: &WarehouseConnection) -> (Job, Pod) {
    let report = tracks_report(TRACKS_START.parse().unwrap());
    (
        finished_job(conn, SYNC_JOB, "2025-03-01T09:00:00Z", true),
        pod_with_report(SYNC_JOB, &report.termination_message()),
    )
}

/// The report of sync `analytics-29013660`, started at `start`: 7 rows into `tracks`.
pub(super) fn tracks_report(start: Timestamp) -> SyncReport {
    let mut report = SyncReport::failed(
        "analytics-29013660",
        start,
        ErrorClass::Internal,
        String::new(),
    );
    report.errors.clear();
    report.tables = vec![crate::sync::TableReport {
        name: "tracks".into(),
        rows: 7,
        discards: 0,
        backfilling: false,
        error: None,
    }];
    report.finish(start);
    report.start_time = start.to_string();
    report
}

#[tokio::test]
async fn finished_jobs_are_folded_pruned_and_announced_and_the_selection_gets_rows() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let start: Timestamp = TRACKS_START.parse().unwrap();
    let (ok, ok_pod) = tracks_sync(&conn);
    let failed = finished_job(&conn, "analytics-29013600", "2025-03-01T08:00:00Z", false);
    let older_failed = finished_job(&conn, "analytics-29013540", "2025-03-01T07:00:00Z", false);
    let selection = selective_sync(
        "analytics",
        serde_json::json!({"connectionRef": {"name": "analytics"}}),
    );
    let client = builder()
        .with_object(conn)
        .with_object(ok)
        .with_object(failed)
        .with_object(older_failed)
        .with_object(ok_pod)
        .with_object(pod_with_report("analytics-29013600", "not json"))
        .with_object(selection)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    let s = c.status.clone().unwrap();
    let ids: Vec<(&str, SyncStatus)> = s.syncs.iter().map(|r| (r.id.as_str(), r.status)).collect();
    assert_eq!(
        ids,
        [
            ("analytics-29013660", SyncStatus::Success),
            ("analytics-29013600", SyncStatus::Failed),
            ("analytics-29013540", SyncStatus::Failed)
        ]
    );
    assert_eq!(
        s.syncs[0].rows,
        SyncRows {
            total: 7,
            identity_graph: 0,
            event_types: 7,
            events: 0
        }
    );
    assert!(s.syncs[1].errors[0].message.contains("malformed"));
    assert!(s.syncs[2].errors[0].message.contains("no pod"));
    assert_eq!(s.last_successful_sync_time.map(|t| t.0), Some(start));
    assert_eq!(condition(&c, "Ready"), ("True".into(), "Synced".into()));
    assert_eq!(
        condition(&c, "BackfillComplete"),
        ("True".into(), "CaughtUp".into())
    );
    let reasons = f.reasons().await;
    for r in ["SyncSucceeded", "SyncFailed", "BackfillComplete"] {
        assert!(
            reasons.contains(&r.to_string()),
            "{r} missing in {reasons:?}"
        );
    }
    let rows = f.ctx.metrics.render();
    assert!(
        rows.contains("profiles_sync_controller_sync_runs_total{result=\"Failed\"} 2"),
        "{rows}"
    );
    assert!(
        rows.contains(
            "last_successful_sync_timestamp_seconds{connection=\"analytics\",connection_namespace=\"team-a\"}"
        ),
        "{rows}"
    );

    let sel = f
        .api::<SelectiveSync>()
        .get("analytics")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(sel.tables.len(), 1);
    assert_eq!(
        (sel.tables[0].name.as_str(), sel.tables[0].rows),
        ("tracks", 7)
    );

    // Folded now, so the next reconcile prunes the older failed Job (history: 1 failed).
    f.reconcile("analytics").await.unwrap();
    let mut left: Vec<String> = f
        .list::<Job>()
        .await
        .into_iter()
        .map(|j| j.metadata.name.unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["analytics-29013600", "analytics-29013660"]);
}

/// A reconcile handed a copy of the connection older than the controller's own last status
/// write (the watch cache behind it, as after the Job deletions of a prune) announces and counts
/// nothing that write had already announced.
#[tokio::test]
async fn a_reconcile_of_a_stale_copy_announces_and_counts_a_sync_once() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let (ok, ok_pod) = tracks_sync(&conn);
    let client = builder()
        .with_object(conn)
        .with_object(ok)
        .with_object(ok_pod)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    let stale: DynamicObject =
        Api::namespaced_with(f.ctx.client.clone(), NS, &super::connection_resource())
            .get("analytics")
            .await
            .unwrap();
    f.reconcile("analytics").await.unwrap();
    reconcile::reconcile(std::sync::Arc::new(stale), f.ctx.clone())
        .await
        .unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    assert_eq!(s.syncs.len(), 1);
    let announced: i32 = f
        .list::<K8sEvent>()
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some("SyncSucceeded"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum();
    assert_eq!(announced, 1, "SyncSucceeded announced {announced} times");
    let backfilled = f
        .list::<K8sEvent>()
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some("BackfillComplete"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum::<i32>();
    assert_eq!(backfilled, 1);
    let m = f.ctx.metrics.render();
    assert!(
        m.contains("profiles_sync_controller_sync_runs_total{result=\"Success\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("rows_synced_total{group=\"event_types\"} 7"),
        "{m}"
    );
}

/// A sync Job whose pod cannot start (here an image that cannot be pulled) is said so, once by
/// a Warning Event, and looked at again within a minute: `Syncing` said "running" until the Job
/// failed at its deadline, hours later. Once its pod runs, "running".
#[tokio::test]
async fn a_sync_job_whose_pod_cannot_start_is_said_so_until_it_runs() {
    let name = SYNC_JOB;
    let mut pod = pod_with_report(name, "");
    pod.status = Some(PodStatus {
        phase: Some("Pending".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "sync".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("Back-off pulling image \"profiles-sync:tset\"".into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
    let f = with_sync_job(
        |job| job.status.as_mut().unwrap().ready = Some(0),
        vec![pod],
    )
    .await;
    let action = f.reconcile("analytics").await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let syncing = |c: &WarehouseConnection| {
        let s = c.status.as_ref().unwrap();
        conditions::find(&s.conditions, conditions::SYNCING)
            .cloned()
            .unwrap()
    };
    let c = syncing(&f.connection("analytics").await);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "JobPending")
    );
    assert!(
        c.message.contains("ImagePullBackOff") && c.message.contains("profiles-sync:tset"),
        "{}",
        c.message
    );
    let pending = |reasons: Vec<String>| reasons.iter().filter(|r| *r == "SyncJobPending").count();
    assert_eq!(pending(f.reasons().await), 1);
    f.reconcile("analytics").await.unwrap();
    assert_eq!(pending(f.reasons().await), 1, "announced once");
    assert_eq!(f.list::<Job>().await.len(), 1, "the next slot waits for it");

    // Its pod runs: the Job's `ready` count says so.
    let jobs: Api<Job> = f.api();
    let mut current = jobs.get(name).await.unwrap();
    current.status.as_mut().unwrap().ready = Some(1);
    jobs.replace_status(name, &Default::default(), &current)
        .await
        .unwrap();
    let action = f.reconcile("analytics").await.unwrap();
    let c = syncing(&f.connection("analytics").await);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "JobRunning")
    );
    assert_ne!(action, Action::requeue(Duration::from_secs(30)));
}

/// A running sync Job deleted by hand is recorded in the history, `Unknown` (it may have been
/// stopped midway, or ended between two looks), with why and an Event: it vanished, no record
/// and no Event, as if it had never run. A Job seen to end, then deleted, adds nothing.
#[tokio::test]
async fn a_running_sync_job_deleted_by_hand_is_recorded_as_such() {
    let name = SYNC_JOB;
    let f = with_sync_job(|_| {}, vec![]).await;
    let conn = f.connection("analytics").await;
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    assert!(s.syncs.is_empty(), "{:?}", s.syncs);

    f.api::<Job>()
        .delete(name, &Default::default())
        .await
        .unwrap();
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    assert_eq!(s.syncs.len(), 1, "{:?}", s.syncs);
    let record = &s.syncs[0];
    assert_eq!(record.job_name.as_deref(), Some(name));
    assert_eq!(record.status, SyncStatus::Unknown);
    assert_eq!(record.start_time.0, "2025-03-01T10:00:00Z".parse().unwrap());
    let message = &record.errors[0].message;
    assert!(
        message.contains("deleted before the controller saw it end")
            && message.contains("its pod was seen running"),
        "{message}"
    );
    assert_eq!(
        condition(&f.connection("analytics").await, "Ready").1,
        "SyncOutcomeUnknown"
    );
    let unknown = |reasons: Vec<String>| {
        reasons
            .iter()
            .filter(|r| *r == "SyncOutcomeUnknown")
            .count()
    };
    assert_eq!(unknown(f.reasons().await), 1);
    // Recorded once.
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    assert_eq!(s.syncs.len(), 1);
    assert_eq!(unknown(f.reasons().await), 1);

    // The next one is seen running, then seen to end (folded), then deleted: one record, its own.
    let next = "analytics-29013720";
    let jobs = f.api::<Job>();
    jobs.create(
        &Default::default(),
        &running_job(&conn, next, "2025-03-01T11:00:00Z"),
    )
    .await
    .unwrap();
    f.reconcile("analytics").await.unwrap();
    let mut ended = jobs.get(next).await.unwrap();
    ended.status = finished_job(&conn, next, "2025-03-01T11:00:00Z", true).status;
    jobs.replace_status(next, &Default::default(), &ended)
        .await
        .unwrap();
    f.reconcile("analytics").await.unwrap();
    jobs.delete(next, &Default::default()).await.unwrap();
    f.reconcile("analytics").await.unwrap();
    let s = f.connection("analytics").await.status.unwrap();
    let ids: Vec<&str> = s.syncs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [next, name], "{:?}", s.syncs);
    assert!(!s.syncs[0].errors[0].message.contains("deleted"));
}

/// A sync Job deleted before its pod was seen running (stuck on an image, held by a queue) is
/// recorded as such: no sync is said to have loaded anything.
#[tokio::test]
async fn a_sync_job_deleted_before_its_pod_ran_says_so() {
    let name = SYNC_JOB;
    let f = with_sync_job(
        |job| job.spec.get_or_insert_default().suspend = Some(true),
        vec![],
    )
    .await;
    seen_then_deleted(&f, name).await;
    let s = f.connection("analytics").await.status.unwrap();
    assert_eq!(s.syncs[0].status, SyncStatus::Unknown);
    let message = &s.syncs[0].errors[0].message;
    assert!(
        message.contains("its pod was not seen running"),
        "{message}"
    );
}

/// A SelectiveSync deleted and created again (`kubectl replace --force`, a GitOps replace) is
/// at generation 1 again: a sync that applied the old object's generation 1 did not apply the
/// new one (it said `Applied`, "the last sync applied this selection").
#[tokio::test]
async fn a_selection_created_again_is_not_applied_by_a_sync_of_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let mut selection = selective_sync(
        "analytics",
        serde_json::json!({"connectionRef": {"name": "analytics"}}),
    );
    selection.metadata.uid = Some("uid-new".into());
    let of_selection = |mut job: Job, uid: &str| {
        let annotations = job.metadata.annotations.as_mut().unwrap();
        annotations.insert(build::ANNOTATION_SELECTION_GENERATION.into(), "1".into());
        annotations.insert(build::ANNOTATION_SELECTION_UID.into(), uid.into());
        job
    };
    let (old, old_pod) = tracks_sync(&conn);
    let client = builder()
        .with_object(conn.clone())
        .with_object(of_selection(old, "uid-old"))
        .with_object(old_pod)
        .with_object(selection)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    f.reconcile("analytics").await.unwrap();
    let ready = |s: &SelectiveSync| {
        let c = conditions::find(&s.status.as_ref().unwrap().conditions, conditions::READY)
            .unwrap()
            .clone();
        (c.status, c.reason)
    };
    let api = f.api::<SelectiveSync>();
    assert_eq!(
        ready(&api.get("analytics").await.unwrap()),
        ("False".into(), "Pending".into())
    );
    // A sync of this object applies it.
    f.api::<Job>()
        .create(
            &Default::default(),
            &of_selection(
                finished_job(&conn, "analytics-29013720", "2025-03-01T10:00:00Z", true),
                "uid-new",
            ),
        )
        .await
        .unwrap();
    let mut later = tracks_report("2025-03-01T10:00:02Z".parse().unwrap());
    later.id = "analytics-29013720".into();
    f.api::<Pod>()
        .create(
            &Default::default(),
            &pod_with_report("analytics-29013720", &later.termination_message()),
        )
        .await
        .unwrap();
    f.reconcile("analytics").await.unwrap();
    assert_eq!(
        ready(&api.get("analytics").await.unwrap()),
        ("True".into(), "Applied".into())
    );
}

/// `spec.warehouse` moved to another database: BackfillComplete turns Unknown until a sync of
/// the new one reports — a caught-up report of a Job started for the old one, folded after the
/// change, says nothing of it (it said "caught up" for a warehouse no sync had loaded yet).
#[tokio::test]
async fn backfill_complete_waits_for_a_sync_of_the_warehouse_the_connection_names_now() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let old = conn.spec.destination();
    let mut moved = conn.clone();
    moved.spec.warehouse.sqlite.as_mut().unwrap().path =
        dir.path().join("new.db").display().to_string();
    moved.metadata.generation = Some(2);
    moved.status = Some(WarehouseConnectionStatus {
        destination: Some(old.clone()),
        conditions: vec![Condition {
            type_: conditions::BACKFILL_COMPLETE.into(),
            status: "True".into(),
            reason: "CaughtUp".into(),
            message: "every table has caught up with the profile store".into(),
            observed_generation: Some(1),
            last_transition_time: Time("2025-03-01T08:00:00Z".parse().unwrap()),
        }],
        ..WarehouseConnectionStatus::default()
    });
    let (mut job, pod) = tracks_sync(&conn);
    job.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(build::ANNOTATION_DESTINATION.into(), old.clone());
    let client = builder()
        .with_object(moved)
        .with_object(job)
        .with_object(pod)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    let s = c.status.clone().unwrap();
    assert_eq!(
        s.syncs[0].status,
        SyncStatus::Success,
        "the sync is recorded"
    );
    assert_eq!(
        condition(&c, "BackfillComplete"),
        ("Unknown".into(), "WarehouseChanged".into())
    );
    assert!(s.destination.as_deref().unwrap().ends_with("new.db"));
    assert_ne!(s.destination, Some(old));
}

#[tokio::test]
async fn a_running_job_found_after_a_restart_is_adopted_and_blocks_a_second_one() {
    let dir = tempfile::tempdir().unwrap();
    let conn = finalized_connection(dir.path(), "analytics");
    let mut running = running_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z");
    running.metadata.owner_references = None; // orphaned, e.g. by `kubectl delete --cascade=orphan`
    let client = builder()
        .with_object(conn)
        .with_object(running)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:00:30Z").await;
    f.reconcile("analytics").await.unwrap();
    let jobs = f.list::<Job>().await;
    assert_eq!(jobs.len(), 1, "concurrency Forbid: the 10:00 slot waits");
    assert_eq!(
        jobs[0].metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-analytics"
    );
    assert!(f.reasons().await.contains(&"JobAdopted".to_string()));
    assert!(
        f.api::<ConfigMap>().get("analytics-29013660").await.is_ok(),
        "its ConfigMap is ensured"
    );
    assert_eq!(
        condition(&f.connection("analytics").await, "Syncing").0,
        "True"
    );
}

/// A sync Job the watch cache has not seen yet (the reconcile before made it) is running: no
/// other starts beside it, neither the next slot's nor a manual one, whose request waits.
/// Before, the cache's listing alone decided, and the two ran at once against one warehouse.
#[tokio::test]
async fn a_running_job_the_cache_has_not_seen_yet_blocks_a_second_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "analytics");
    conn.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(build::ANNOTATION_SYNC_NOW.into(), "please".into());
    let running = running_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z");
    let client = builder()
        .with_object(conn)
        .with_object(running)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:00:30Z").await;
    // The running controller's caches, complete but from before the Job was made.
    cache(&f, &[], Some(&[]));
    assert!(cache_ready(&f.ctx.caches.get().unwrap().jobs));
    f.reconcile("analytics").await.unwrap();
    let jobs = f.list::<Job>().await;
    assert_eq!(
        jobs.iter().map(|j| j.name_any()).collect::<Vec<_>>(),
        ["analytics-29013660"],
        "concurrency Forbid: neither the 10:00 slot nor the manual sync starts"
    );
    let annotations = f.connection("analytics").await.metadata.annotations;
    assert_eq!(
        annotations
            .as_ref()
            .and_then(|a| a.get(build::ANNOTATION_SYNC_NOW))
            .map(String::as_str),
        Some("please"),
        "the manual sync is still asked for"
    );
    assert_eq!(
        condition(&f.connection("analytics").await, "Syncing").0,
        "True",
        "the status says a sync runs"
    );
}

#[tokio::test]
async fn deletion_removes_jobs_and_config_maps_then_the_finalizer() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "analytics");
    conn.metadata.deletion_timestamp = Some(Time("2025-03-01T10:00:00Z".parse().unwrap()));
    let job = finished_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z", true);
    let cm = build::sync_config_map(
        &job,
        "analytics",
        [("connection.yaml".to_string(), String::new())].into(),
    );
    let warehouse_file = dir.path().join("analytics.db");
    std::fs::write(&warehouse_file, b"data").unwrap();
    let client = builder()
        .with_object(conn)
        .with_object(job)
        .with_object(cm)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:00:05Z").await;
    f.reconcile("analytics").await.unwrap();
    assert!(f.list::<Job>().await.is_empty());
    assert!(f.list::<ConfigMap>().await.is_empty());
    assert!(
        f.api::<WarehouseConnection>()
            .get_opt("analytics")
            .await
            .unwrap()
            .is_none(),
        "finalizer removed"
    );
    assert_eq!(
        std::fs::read(&warehouse_file).unwrap(),
        b"data",
        "warehouse data untouched"
    );
}

/// The engine token Secret goes with the namespace's last connection (not before: another
/// connection, or one still cleaning up, keeps it), and a Secret of that name the controller
/// did not make is never deleted.
#[tokio::test]
async fn the_last_connection_of_a_namespace_takes_the_token_secret_with_it() {
    fn deleting(dir: &std::path::Path, name: &str) -> WarehouseConnection {
        let mut conn = connection(dir, name);
        conn.metadata.uid = Some(format!("uid-{name}"));
        conn.metadata.finalizers = Some(vec![FINALIZER.into()]);
        conn.metadata.deletion_timestamp = Some(Time("2025-03-01T10:00:00Z".parse().unwrap()));
        conn
    }
    let token = || build::engine_token_secret(NS, "t0ken");
    // Connection `a` being deleted, with what `more` adds.
    type Objects = kube_fake_client::ClientBuilder;
    let scenario = async |more: &dyn Fn(&std::path::Path, Objects) -> Objects| {
        let dir = tempfile::tempdir().unwrap();
        let objects = builder().with_object(deleting(dir.path(), "a"));
        let client = more(dir.path(), objects).build().await.unwrap();
        fixture(dir, client, "2025-03-01T10:00:05Z").await
    };
    let secret_left = async |f: &Fixture| {
        f.api::<Secret>()
            .get_opt(build::ENGINE_TOKEN_SECRET)
            .await
            .unwrap()
            .is_some()
    };

    // Two connections being deleted: the first cleaned up keeps the Secret for the other.
    let f = scenario(&|dir, b| b.with_object(deleting(dir, "b")).with_object(token())).await;
    f.reconcile("a").await.unwrap();
    assert!(secret_left(&f).await, "connection b still uses it");
    f.reconcile("b").await.unwrap();
    assert!(!secret_left(&f).await, "deleted with the last connection");

    // A connection that stays keeps it.
    let f = scenario(&|dir, b| {
        let mut staying = connection(dir, "staying");
        staying.metadata.uid = Some("uid-staying".into());
        b.with_object(staying).with_object(token())
    })
    .await;
    f.reconcile("a").await.unwrap();
    assert!(secret_left(&f).await);

    // So does one that does not decode (a type this version does not know).
    let f = scenario(&|_, b| b.with_object(token())).await;
    let resource = kube::discovery::ApiResource::erase::<WarehouseConnection>(&());
    let broken: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "profilesync.dev/v1alpha1", "kind": "WarehouseConnection",
        "metadata": {"name": "broken", "namespace": NS, "uid": "uid-broken"},
        "spec": {"warehouse": {"type": "oracle"}}
    }))
    .unwrap();
    Api::<DynamicObject>::namespaced_with(f.ctx.client.clone(), NS, &resource)
        .create(&Default::default(), &broken)
        .await
        .unwrap();
    f.reconcile("a").await.unwrap();
    assert!(secret_left(&f).await);

    // A user's Secret of that name is not the controller's to delete.
    let f = scenario(&|_, b| {
        let mut users = token();
        users.metadata.labels = None;
        b.with_object(users)
    })
    .await;
    f.reconcile("a").await.unwrap();
    assert!(secret_left(&f).await);
}

#[tokio::test]
async fn deletion_waits_for_a_running_sync_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "analytics");
    conn.metadata.deletion_timestamp = Some(Time("2025-03-01T10:00:00Z".parse().unwrap()));
    let running = running_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z");
    let client = builder()
        .with_object(conn)
        .with_object(running)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:01:00Z").await;
    let action = f.reconcile("analytics").await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    assert_eq!(f.list::<Job>().await.len(), 1);
    assert!(
        f.api::<WarehouseConnection>()
            .get_opt("analytics")
            .await
            .unwrap()
            .is_some()
    );
}

async fn unmarked(api: &Api<SelectiveSync>, name: &str) -> bool {
    let s = api.get(name).await.unwrap();
    s.status.unwrap_or_default().conditions.is_empty()
}

/// A SelectiveSync whose connection does not exist says so in its status; one pointing at
/// another connection is left alone, and marking again writes nothing new.
#[tokio::test]
async fn a_selection_of_a_missing_connection_is_marked_connection_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let selection = |name: &str, connection: &str| {
        let mut sel = selective_sync(
            name,
            serde_json::json!({"connectionRef": {"name": connection}}),
        );
        sel.metadata.generation = Some(2);
        sel
    };
    let (orphan, other) = (
        selection("orphan", "analytcs"),
        selection("fine", "analytics"),
    );
    let client = builder()
        .with_object(orphan.clone())
        .with_object(other.clone())
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T10:17:30Z").await;
    // The caches the running controller keeps, holding both selections.
    cache_selections(&f, &[&orphan, &other]);

    // A gauge of the missing connection (deleted with its finalizer removed by hand: no
    // cleanup ran), and one of another.
    for name in ["analytcs", "fine"] {
        f.ctx
            .metrics
            .last_successful_sync
            .with_label_values(&[NS, name])
            .set(1.0);
        f.ctx.with_memory(|m| {
            m.running.insert(
                format!("{NS}/{name}-29013660"),
                RunningJob {
                    connection: format!("uid-{name}"),
                    connection_name: name.into(),
                    started: None,
                    ran: true,
                },
            )
        });
    }
    apply::connection_missing(&f.ctx, NS, "analytcs")
        .await
        .unwrap();
    let remembered: Vec<String> = f.ctx.with_memory(|m| m.running.keys().cloned().collect());
    assert_eq!(remembered, [format!("{NS}/fine-29013660")]);
    let gauges = f.ctx.metrics.render();
    assert!(!gauges.contains("connection=\"analytcs\""), "{gauges}");
    assert!(gauges.contains("connection=\"fine\""), "{gauges}");
    let api = f.api::<SelectiveSync>();
    let marked = api.get("orphan").await.unwrap().status.unwrap();
    for type_ in [conditions::VALID, conditions::READY] {
        let c = conditions::find(&marked.conditions, type_).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ConnectionNotFound")
        );
        assert!(
            c.message.contains("\"analytcs\" does not exist"),
            "{}",
            c.message
        );
        assert_eq!(c.observed_generation, Some(2));
    }
    assert!(
        unmarked(&api, "fine").await,
        "a selection of another connection is not touched"
    );
    // A connection that exists in the API (the controller's cache may lag) is never "missing".
    f.api::<WarehouseConnection>()
        .create(
            &Default::default(),
            &connection(
                f.ctx.settings.engine_token_file.parent().unwrap(),
                "analytics",
            ),
        )
        .await
        .unwrap();
    f.ctx
        .metrics
        .last_successful_sync
        .with_label_values(&[NS, "analytics"])
        .set(1.0);
    apply::connection_missing(&f.ctx, NS, "analytics")
        .await
        .unwrap();
    assert!(
        unmarked(&api, "fine").await,
        "the selection of an existing connection is not marked"
    );
    assert!(
        f.ctx.metrics.render().contains("connection=\"analytics\""),
        "nor its gauge dropped"
    );
    let version = api.get("orphan").await.unwrap().metadata.resource_version;
    apply::connection_missing(&f.ctx, NS, "analytcs")
        .await
        .unwrap();
    assert_eq!(
        api.get("orphan").await.unwrap().metadata.resource_version,
        version,
        "marking again changes nothing"
    );
}

/// `kubectl annotate … sync-now=go` run again after the sync it started finished: the value
/// was answered already, so the annotation goes without a sync — and an Event says so (it
/// went silently, and the user waited for a sync that never came).
#[tokio::test]
async fn a_sync_now_value_already_answered_is_removed_with_an_event_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = finalized_connection(dir.path(), "analytics");
    conn.metadata.annotations =
        Some([(build::ANNOTATION_SYNC_NOW.to_string(), "go".to_string())].into());
    let mut done = finished_job(&conn, "analytics-29013688", "2025-03-01T09:28:00Z", true);
    done.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(build::ANNOTATION_SYNC_NOW.to_string(), "go".to_string());
    let client = builder()
        .with_object(conn)
        .with_object(done)
        .build()
        .await
        .unwrap();
    let f = fixture(dir, client, "2025-03-01T09:30:00Z").await;
    f.reconcile("analytics").await.unwrap();
    let c = f.connection("analytics").await;
    assert!(
        apply::annotation(&c, build::ANNOTATION_SYNC_NOW).is_none(),
        "{:?}",
        c.metadata.annotations
    );
    let jobs: Vec<Job> = f.list::<Job>().await;
    assert_eq!(jobs.len(), 1, "no new Job");
    let events: Vec<K8sEvent> = f.list::<K8sEvent>().await;
    let said = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("SyncNowAlreadyAnswered"))
        .and_then(|e| e.note.clone())
        .unwrap_or_default();
    assert!(
        said.contains("analytics-29013688") && said.contains("\"go\""),
        "{said}"
    );
}
