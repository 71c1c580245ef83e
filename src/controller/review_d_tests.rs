//! Review D: failing tests for the controller (each names the bug it demonstrates).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube_fake_client::interceptor;

use super::api_lifecycle_tests::{finished_job, pod_with_report, tracks_report};
use super::api_tests::{builder, connection, fixture, selective_sync};
use super::*;

/// A sync's report is folded into the connection's status, then the SelectiveSync's status
/// write fails once (an API timeout, a 500, the controller restarting between the two writes).
/// The retry finds the Job already in `status.syncs` and never reads its report again: the
/// SelectiveSync keeps showing the previous sync's rows per table (and `Ready=False Pending`
/// after a selection change) until the next sync, and the sync's Event and metrics
/// (`SyncSucceeded`, `sync_runs_total`, `rows_synced_total`) are never emitted at all.
#[tokio::test]
async fn review_d_a_failed_selection_status_write_loses_the_sync_for_the_selection_and_its_event()
{
    let dir = tempfile::tempdir().unwrap();
    let mut conn = connection(dir.path(), "analytics");
    conn.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let start: Timestamp = "2025-03-01T09:00:02Z".parse().unwrap();
    let report = tracks_report(start);
    let ok = finished_job(&conn, "analytics-29013660", "2025-03-01T09:00:00Z", true);
    let selection = selective_sync(
        "analytics",
        serde_json::json!({"connectionRef": {"name": "analytics"}}),
    );
    let fail_once = Arc::new(AtomicBool::new(true));
    let fo = fail_once.clone();
    let funcs = interceptor::Funcs::new().replace_status(move |cx| {
        if cx.object["kind"] == "SelectiveSync" && fo.swap(false, Ordering::SeqCst) {
            return Err(kube_fake_client::Error::Internal(
                "etcdserver: request timed out".into(),
            ));
        }
        Ok(None)
    });
    let client = builder()
        .with_object(conn)
        .with_object(ok)
        .with_object(pod_with_report(
            "analytics-29013660",
            &report.termination_message(),
        ))
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
    let rows: Vec<(String, i64)> = sel.tables.iter().map(|t| (t.name.clone(), t.rows)).collect();
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
