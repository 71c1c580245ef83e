//! Status folding over time: reports (good, partial, failed, missing, malformed) become sync
//! records and conditions.

use super::*;
use crate::controller::connection_test::Reason;
use crate::crd::SelectiveSyncSpec;
use crate::sync::report::TableReport;

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn report(id: &str, start: &str, tables: Vec<TableReport>, backfilling: &[&str]) -> SyncReport {
    let mut r = SyncReport::failed(id, t(start), ErrorClass::Internal, String::new());
    r.errors.clear();
    r.tables = tables;
    r.finish(t(start));
    r.start_time = start.into();
    r.duration_seconds = 12.5;
    r.backfilling = backfilling.iter().map(|s| s.to_string()).collect();
    r
}

fn table(name: &str, rows: u64, error: Option<ErrorClass>) -> TableReport {
    TableReport {
        name: name.into(),
        rows,
        discards: 0,
        backfilling: false,
        error: error.map(|class| SyncError {
            class,
            message: format!("{name} broke"),
            table: Some(name.into()),
        }),
    }
}

fn finished(name: &str, phase: JobPhase, message: Option<String>, pod_found: bool) -> FinishedJob {
    FinishedJob {
        name: name.into(),
        phase,
        started: Some(t("2025-03-01T10:00:05Z")),
        finished: Some(t("2025-03-01T10:01:05Z")),
        failure: (phase == JobPhase::Failed)
            .then(|| "BackoffLimitExceeded: Job has reached the specified backoff limit".into()),
        termination_message: message,
        container_end: None,
        pod_found,
        deleted: None,
    }
}

#[test]
fn a_report_becomes_a_record_with_its_failed_tables() {
    let r = report(
        "c-1",
        "2025-03-01T10:00:07Z",
        vec![
            table("id_graph_updates", 10, None),
            table("order_completed", 0, Some(ErrorClass::TypeConflict)),
            table("tracks", 5, None),
        ],
        &[],
    );
    let (rec, parsed) = record(&finished(
        "c-1",
        JobPhase::Succeeded,
        Some(r.termination_message()),
        true,
    ));
    assert_eq!(rec.status, SyncStatus::PartialSuccess);
    assert_eq!(rec.start_time.0, t("2025-03-01T10:00:07Z"));
    assert_eq!(rec.rows.total, 15);
    assert_eq!(rec.tables.len(), 1);
    assert_eq!(rec.tables[0].name, "order_completed");
    assert_eq!(rec.tables[0].class, ErrorClass::TypeConflict);
    assert_eq!(rec.job_name.as_deref(), Some("c-1"));
    assert_eq!(parsed.unwrap().tables.len(), 3);
}

#[test]
fn missing_or_malformed_reports_are_failed_syncs_with_a_reason() {
    let (rec, parsed) = record(&finished("c-2", JobPhase::Failed, None, false));
    assert!(parsed.is_none());
    assert_eq!(rec.status, SyncStatus::Failed);
    assert_eq!(rec.duration_seconds, 60.0);
    let msg = &rec.errors[0].message;
    assert!(
        msg.contains("no pod of the Job was found") && msg.contains("BackoffLimitExceeded"),
        "{msg}"
    );

    // A Job that completed exited 0: not a failed sync, but its outcome is not known either
    // (it was recorded Failed).
    let (rec, _) = record(&finished("c-3", JobPhase::Succeeded, None, true));
    assert_eq!(rec.status, SyncStatus::Unknown);
    assert!(
        rec.errors[0]
            .message
            .contains("wrote no termination message")
    );

    let (rec, _) = record(&finished(
        "c-4",
        JobPhase::Failed,
        Some("panicked at src/main.rs".into()),
        true,
    ));
    assert_eq!(rec.status, SyncStatus::Failed);
    assert!(
        rec.errors[0].message.contains("malformed"),
        "{}",
        rec.errors[0].message
    );
    assert_eq!(rec.errors[0].class, ErrorClass::Internal);
}

/// A Job that completed but whose pod is gone before the controller read its report is
/// `Unknown`, not `Failed` (it exited 0, so its sync was not `Failed`): the record says why, and
/// Ready stays True with its own reason. A Job that failed without a report is still `Failed`.
#[test]
fn a_completed_job_without_its_report_is_unknown_not_failed() {
    let (rec, parsed) = record(&finished("c-5", JobPhase::Succeeded, None, false));
    assert!(parsed.is_none());
    assert_eq!(rec.status, SyncStatus::Unknown);
    let msg = &rec.errors[0].message;
    assert!(
        msg.contains("completed") && msg.contains("no pod of the Job was found"),
        "{msg}"
    );
    let empty = WarehouseConnectionStatus::default();
    let ok = connected();
    let s = connection_status(&ConnectionFacts {
        test: Some(&ok),
        ..facts(&empty, vec![rec])
    });
    let ready = cond(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "SyncOutcomeUnknown")
    );
    assert!(ready.message.contains("no pod"), "{}", ready.message);
    assert_eq!(s.last_successful_sync_time, None);

    let (rec, _) = record(&finished("c-6", JobPhase::Failed, None, false));
    assert_eq!(rec.status, SyncStatus::Failed);
}

fn rec(id: &str, start: &str, status: SyncStatus) -> SyncRecord {
    SyncRecord {
        id: id.into(),
        status,
        start_time: Time(t(start)),
        duration_seconds: 1.0,
        rows: SyncRows {
            total: 3,
            identity_graph: 3,
            event_types: 0,
            events: 0,
        },
        tables: vec![],
        errors: vec![],
        job_name: Some(id.into()),
    }
}

#[test]
fn a_report_from_a_node_with_a_wrong_clock_is_dated_by_its_job() {
    let job = |start: &str| {
        let r = report("c-1", start, vec![table("tracks", 5, None)], &[]);
        finished(
            "c-1",
            JobPhase::Succeeded,
            Some(r.termination_message()),
            true,
        )
    };
    // A day ahead (it would hold lastSyncTime in the future), or a day behind.
    for wrong in ["2025-03-02T10:00:07Z", "2025-02-28T10:00:07Z"] {
        let (rec, parsed) = record(&job(wrong));
        assert_eq!(rec.start_time.0, t("2025-03-01T10:00:05Z"), "{wrong}");
        assert_eq!(rec.rows.total, 5, "the report is still read");
        assert!(parsed.is_some());
    }
    // Within the Job's run, or a few minutes before its start (a node behind), the sync's own
    // clock is kept…
    for right in ["2025-03-01T09:58:00Z", "2025-03-01T10:00:30Z"] {
        assert_eq!(record(&job(right)).0.start_time.0, t(right));
    }
    // …but never after the Job ended: a node minutes ahead put this sync before one that
    // started after it ended.
    assert_eq!(
        record(&job("2025-03-01T10:04:00Z")).0.start_time.0,
        t("2025-03-01T10:00:05Z")
    );
}

#[test]
fn folding_keeps_ten_records_newest_first_without_duplicates() {
    let mut syncs = vec![];
    for h in 0..12 {
        let new = vec![rec(
            &format!("s{h:02}"),
            &format!("2025-03-01T{h:02}:00:00Z"),
            SyncStatus::Success,
        )];
        let (next, added) = fold(&syncs, new.clone());
        assert_eq!(added, new);
        syncs = next;
    }
    assert_eq!(syncs.len(), SYNC_HISTORY_LEN);
    assert_eq!(syncs[0].id, "s11");
    assert_eq!(syncs[9].id, "s02");
    // Folding a Job again changes nothing; an old Job that fell off the list stays off.
    let (again, added) = fold(
        &syncs,
        vec![
            syncs[3].clone(),
            rec("s00", "2025-03-01T00:00:00Z", SyncStatus::Success),
        ],
    );
    assert_eq!(again, syncs);
    assert!(added.is_empty());
}

fn facts<'a>(
    previous: &'a WarehouseConnectionStatus,
    syncs: Vec<SyncRecord>,
) -> ConnectionFacts<'a> {
    ConnectionFacts {
        now: t("2025-03-01T10:05:00Z"),
        generation: 1,
        previous,
        syncs,
        newest_report: None,
        test: None,
        suspended: false,
        active_job: None,
        active_job_progress: Default::default(),
        last_started: None,
        schedule: Ok("every 1h".into()),
        selection_error: None,
        next_sync: Some(t("2025-03-01T11:00:00Z")),
        blocked: None,
        start_failed: None,
        egress_ips: &[],
        destination: "postgres db:5432/analytics, schema profiles_sync".into(),
    }
}

/// A connection test that passed.
fn connected() -> TestOutcome {
    TestOutcome {
        reason: Reason::Connected,
        message: "connected".into(),
    }
}

fn cond<'a>(s: &'a WarehouseConnectionStatus, type_: &str) -> &'a Condition {
    conditions::find(&s.conditions, type_)
        .unwrap_or_else(|| panic!("no {type_} in {:?}", s.conditions))
}

#[test]
fn conditions_follow_the_connection_test_and_the_last_sync() {
    let empty = WarehouseConnectionStatus::default();
    let ok = connected();
    let s = connection_status(&ConnectionFacts {
        test: Some(&ok),
        ..facts(&empty, vec![])
    });
    assert_eq!(cond(&s, "ConnectionVerified").status, "True");
    assert_eq!(
        (
            cond(&s, "Ready").status.as_str(),
            cond(&s, "Ready").reason.as_str()
        ),
        ("True", "Verified")
    );
    assert_eq!(cond(&s, "BackfillComplete").status, "Unknown");
    assert_eq!(cond(&s, "Suspended").status, "False");
    assert_eq!(cond(&s, "Syncing").status, "False");
    assert_eq!(s.conditions[0].type_, "Ready");
    assert_eq!(s.frequency.as_deref(), Some("every 1h"));
    assert_eq!(
        s.next_sync_time.as_ref().map(|t| t.0),
        Some(t("2025-03-01T11:00:00Z"))
    );
    assert_eq!(s.observed_generation, Some(1));

    // A sync starts, then finishes backfilling some tables.
    let s = connection_status(&ConnectionFacts {
        active_job: Some("c-1"),
        last_started: Some(t("2025-03-01T10:05:00Z")),
        ..facts(&s, vec![])
    });
    assert_eq!(
        (
            cond(&s, "Syncing").status.as_str(),
            cond(&s, "Syncing").reason.as_str()
        ),
        ("True", "JobRunning")
    );
    assert_eq!(
        s.last_sync_time.as_ref().map(|t| t.0),
        Some(t("2025-03-01T10:05:00Z"))
    );
    // Held by a queue (Kueue suspends the Job until it admits it), no pod of it runs: said so.
    let held = connection_status(&ConnectionFacts {
        active_job: Some("c-1"),
        active_job_progress: JobProgress::Suspended,
        last_started: Some(t("2025-03-01T10:05:00Z")),
        ..facts(&s, vec![])
    });
    let syncing = cond(&held, "Syncing");
    assert_eq!(
        (syncing.status.as_str(), syncing.reason.as_str()),
        ("True", "JobSuspended")
    );
    assert!(syncing.message.contains("suspended"), "{}", syncing.message);
    // Its pod on its way, or waiting for a fix: said so, with the cause.
    for (progress, reason, cause) in [
        (
            JobProgress::Starting("pod c-1-x is ContainerCreating".into()),
            "JobStarting",
            "ContainerCreating",
        ),
        (
            JobProgress::Stuck("pod c-1-x: container sync ErrImagePull".into()),
            "JobPending",
            "ErrImagePull",
        ),
    ] {
        let s = connection_status(&ConnectionFacts {
            active_job: Some("c-1"),
            active_job_progress: progress,
            ..facts(&s, vec![])
        });
        let syncing = cond(&s, "Syncing");
        assert_eq!(
            (syncing.status.as_str(), syncing.reason.as_str()),
            ("True", reason)
        );
        assert!(
            syncing.message.contains(cause) && syncing.message.contains("c-1"),
            "{}",
            syncing.message
        );
    }
    let r = report(
        "c-1",
        "2025-03-01T10:05:03Z",
        vec![table("tracks", 4, None)],
        &["tracks"],
    );
    let syncs = vec![rec("c-1", "2025-03-01T10:05:03Z", SyncStatus::Success)];
    let s = connection_status(&ConnectionFacts {
        newest_report: Some(&r),
        ..facts(&s, syncs.clone())
    });
    assert_eq!(cond(&s, "BackfillComplete").status, "False");
    assert!(cond(&s, "BackfillComplete").message.contains("tracks"));
    assert_eq!(
        s.last_successful_sync_time.as_ref().map(|t| t.0),
        Some(t("2025-03-01T10:05:03Z"))
    );
    assert_eq!(cond(&s, "Ready").reason, "Synced");

    // The next one catches up; then one fails: Ready goes False, lastSuccessfulSyncTime stays.
    let r = report(
        "c-2",
        "2025-03-01T11:00:03Z",
        vec![table("tracks", 1, None)],
        &[],
    );
    let mut syncs2 = vec![rec("c-2", "2025-03-01T11:00:03Z", SyncStatus::Success)];
    syncs2.extend(syncs);
    let s = connection_status(&ConnectionFacts {
        newest_report: Some(&r),
        ..facts(&s, syncs2.clone())
    });
    assert_eq!(cond(&s, "BackfillComplete").status, "True");
    let mut failed = rec("c-3", "2025-03-01T12:00:03Z", SyncStatus::Failed);
    failed.errors.push(SyncError {
        class: ErrorClass::Connection,
        message: "refused".into(),
        table: None,
    });
    let mut syncs3 = vec![failed];
    syncs3.extend(syncs2);
    let s = connection_status(&facts(&s, syncs3));
    assert_eq!(
        (
            cond(&s, "Ready").status.as_str(),
            cond(&s, "Ready").reason.as_str()
        ),
        ("False", "SyncFailed")
    );
    assert!(cond(&s, "Ready").message.contains("refused"));
    assert_eq!(
        cond(&s, "BackfillComplete").status,
        "True",
        "a failure does not undo the backfill"
    );
    assert_eq!(
        s.last_successful_sync_time.as_ref().map(|t| t.0),
        Some(t("2025-03-01T11:00:03Z"))
    );
}

#[test]
fn a_failed_test_suspension_and_a_bad_schedule_show_in_the_conditions() {
    let empty = WarehouseConnectionStatus::default();
    let bad = TestOutcome {
        reason: Reason::AuthenticationFailed,
        message: "password authentication failed".into(),
    };
    let ips = vec!["203.0.113.7".to_string()];
    let s = connection_status(&ConnectionFacts {
        test: Some(&bad),
        suspended: true,
        next_sync: None,
        blocked: Some(&Blocked::Suspended),
        egress_ips: &ips,
        ..facts(&empty, vec![])
    });
    assert_eq!(
        (
            cond(&s, "ConnectionVerified").status.as_str(),
            cond(&s, "ConnectionVerified").reason.as_str()
        ),
        ("False", "AuthenticationFailed")
    );
    assert_eq!(
        (
            cond(&s, "Ready").status.as_str(),
            cond(&s, "Ready").reason.as_str()
        ),
        ("False", "ConnectionNotVerified")
    );
    assert_eq!(cond(&s, "Suspended").status, "True");
    assert!(cond(&s, "Syncing").message.contains("suspended"));
    assert_eq!(s.next_sync_time, None);
    assert_eq!(s.egress_ips, ips);
    let s = connection_status(&ConnectionFacts {
        schedule: Err("schedule \"5m\" is too short".into()),
        ..facts(&s, vec![])
    });
    assert_eq!(cond(&s, "Ready").reason, "InvalidSchedule");
    assert_eq!(s.frequency, None);
}

/// A warehouse type without a loader never syncs: its status shows no next sync time (kubectl's
/// `Next Sync` column showed one every hour that never came), until a test that connects.
#[test]
fn a_warehouse_type_without_a_loader_shows_no_next_sync() {
    let empty = WarehouseConnectionStatus::default();
    let unsupported = TestOutcome {
        reason: Reason::NotSupported,
        message: "warehouse type snowflake has no loader".into(),
    };
    let s = connection_status(&ConnectionFacts {
        test: Some(&unsupported),
        ..facts(&empty, vec![])
    });
    assert_eq!(cond(&s, "ConnectionVerified").reason, "NotSupported");
    assert_eq!(s.next_sync_time, None);
    // The next reconcile (no new test) keeps it so.
    let s = connection_status(&facts(&s, vec![]));
    assert_eq!(s.next_sync_time, None);
    // Once a test connects, the schedule's next time shows again.
    let ok = connected();
    let s = connection_status(&ConnectionFacts {
        test: Some(&ok),
        ..facts(&s, vec![])
    });
    assert_eq!(
        s.next_sync_time.as_ref().map(|t| t.0),
        Some(t("2025-03-01T11:00:00Z"))
    );
}

#[test]
fn an_unchanged_state_folds_to_an_identical_status() {
    let empty = WarehouseConnectionStatus::default();
    let ok = connected();
    let a = connection_status(&ConnectionFacts {
        test: Some(&ok),
        ..facts(&empty, vec![])
    });
    let later = ConnectionFacts {
        now: t("2025-03-01T10:20:00Z"),
        ..facts(&a, vec![])
    };
    assert_eq!(
        connection_status(&later),
        a,
        "no status write (and no watch event) when nothing changed"
    );
}

#[test]
fn selection_status_counts_tables_and_reports_rows_and_validity() {
    let spec: SelectiveSyncSpec = serde_json::from_value(serde_json::json!({
        "connectionRef": {"name": "c"}, "default": "none",
        "tables": [{"name": "tracks"}, {"name": "order_completed"}, {"name": "pages", "enabled": false}]
    })).unwrap();
    let r = report(
        "c-1",
        "2025-03-01T10:00:03Z",
        vec![table("tracks", 4, None), table("order_completed", 2, None)],
        &[],
    );
    let previous = SelectiveSyncStatus::default();
    let s = selection_status(&SelectionFacts {
        now: t("2025-03-01T10:01:00Z"),
        generation: 2,
        spec: &spec,
        previous: &previous,
        problem: None,
        superseded: None,
        available: Some(vec!["order_completed".into(), "signed_up".into()]),
        report: Some((&r, Some(2))),
    });
    assert_eq!(s.enabled_tables, Some(2));
    assert_eq!(s.available_tables, ["order_completed", "signed_up"]);
    assert_eq!(
        s.tables,
        vec![
            TableSyncStatus {
                name: "tracks".into(),
                rows: 4
            },
            TableSyncStatus {
                name: "order_completed".into(),
                rows: 2
            }
        ]
    );
    assert_eq!(
        conditions::find(&s.conditions, "Ready").map(|c| c.reason.as_str()),
        Some("Applied")
    );
    assert_eq!(s.observed_generation, Some(2));

    // A new generation is pending until a sync applies it; an unreachable engine keeps the list.
    let s2 = selection_status(&SelectionFacts {
        now: t("2025-03-01T10:02:00Z"),
        generation: 3,
        spec: &spec,
        previous: &s,
        problem: None,
        superseded: None,
        available: None,
        report: None,
    });
    assert_eq!(
        conditions::find(&s2.conditions, "Ready").map(|c| c.reason.as_str()),
        Some("Pending")
    );
    assert_eq!(s2.available_tables, s.available_tables);
    assert_eq!(s2.tables, s.tables);

    let s3 = selection_status(&SelectionFacts {
        now: t("2025-03-01T10:03:00Z"),
        generation: 4,
        spec: &spec,
        previous: &s2,
        problem: Some("table \"pages\" is listed more than once".into()),
        superseded: None,
        available: None,
        report: None,
    });
    let valid = conditions::find(&s3.conditions, "Valid").unwrap();
    assert_eq!(
        (
            valid.status.as_str(),
            valid.message.contains("more than once")
        ),
        ("False", true)
    );
    let all: SelectiveSyncSpec =
        serde_json::from_value(serde_json::json!({"connectionRef": {"name": "c"}})).unwrap();
    assert_eq!(
        enabled_tables(&all, &["order_completed".into()]),
        crate::sync::tables::known_tables().len() as i64 + 1
    );
}

/// A sync of more tables than its pod's 4 KiB report holds: the selection lists the failed
/// tables and the largest, and says how many more there were (it listed none before).
#[test]
fn a_selection_says_how_many_tables_a_large_report_left_out() {
    let spec: SelectiveSyncSpec =
        serde_json::from_value(serde_json::json!({"connectionRef": {"name": "c"}})).unwrap();
    let tables: Vec<TableReport> = (0..120)
        .map(|i| table(&format!("event_number_{i}"), 10 + i, None))
        .collect();
    let r = report("c-1", "2025-03-01T10:00:03Z", tables, &[]);
    let job = finished(
        "c-1",
        JobPhase::Succeeded,
        Some(r.termination_message()),
        true,
    );
    let (record, parsed) = record(&job);
    assert_eq!(record.rows.total, (10..130).sum::<u64>() as i64);
    let parsed = parsed.expect("the report parses");
    let s = selection_status(&SelectionFacts {
        now: t("2025-03-01T10:01:00Z"),
        generation: 1,
        spec: &spec,
        previous: &SelectiveSyncStatus::default(),
        problem: None,
        superseded: None,
        available: None,
        report: Some((&parsed, Some(1))),
    });
    let listed = s.tables.len();
    assert!(listed > 40, "{listed} tables listed");
    assert_eq!(s.tables_omitted, Some(120 - listed as i64));
    assert_eq!(s.tables[0].name, "event_number_119", "the largest first");
    // The next sync lists them all again: no omission left over.
    let small = report(
        "c-2",
        "2025-03-01T11:00:03Z",
        vec![table("tracks", 1, None)],
        &[],
    );
    let s2 = selection_status(&SelectionFacts {
        now: t("2025-03-01T11:01:00Z"),
        generation: 1,
        spec: &spec,
        previous: &s,
        problem: None,
        superseded: None,
        available: None,
        report: Some((&small, Some(1))),
    });
    assert_eq!((s2.tables.len(), s2.tables_omitted), (1, None));
    // Without a new report, both are kept.
    let s3 = selection_status(&SelectionFacts {
        now: t("2025-03-01T11:02:00Z"),
        generation: 1,
        spec: &spec,
        previous: &s,
        problem: None,
        superseded: None,
        available: None,
        report: None,
    });
    assert_eq!(
        (s3.tables.len(), s3.tables_omitted),
        (listed, s.tables_omitted)
    );
}

/// A reconcile with nothing new about the backfill keeps `BackfillComplete` as it was, observed
/// at the current generation like every other condition (it kept the generation of its last
/// change: `kubectl get -o yaml` showed it stale after a `suspend` patch).
#[test]
fn backfill_complete_is_observed_at_the_current_generation() {
    let empty = WarehouseConnectionStatus::default();
    let first = connection_status(&facts(&empty, vec![]));
    let before = cond(&first, "BackfillComplete").clone();
    assert_eq!(before.observed_generation, Some(1));
    let later = connection_status(&ConnectionFacts {
        generation: 2,
        now: t("2025-03-01T11:05:00Z"),
        ..facts(&first, vec![])
    });
    let after = cond(&later, "BackfillComplete");
    assert_eq!(after.observed_generation, Some(2));
    assert_eq!(
        (&after.status, &after.reason, &after.last_transition_time),
        (&before.status, &before.reason, &before.last_transition_time)
    );
}

#[test]
fn available_tables_beyond_the_status_limit_are_counted_not_listed() {
    // An event name per product is a common tracking plan's mistake: the store then sees tens of
    // thousands of Track event tables, and a status listing them all would pass the API
    // server's object size limit (the write refused at every reconcile, the status stale).
    let all_on: SelectiveSyncSpec = serde_json::from_value(serde_json::json!({
        "connectionRef": {"name": "c"}, "default": "all",
        "tables": [{"name": "viewed_product_00007", "enabled": false}]
    }))
    .unwrap();
    let seen: Vec<String> = (0..MAX_AVAILABLE_TABLES + 3)
        .map(|i| format!("viewed_product_{i:05}"))
        .collect();
    let known = crate::sync::tables::known_tables().len() as i64;
    let previous = SelectiveSyncStatus::default();
    let facts = SelectionFacts {
        now: t("2025-03-01T10:01:00Z"),
        generation: 2,
        spec: &all_on,
        previous: &previous,
        problem: None,
        superseded: None,
        available: Some(seen.clone()),
        report: None,
    };
    let s = selection_status(&facts);
    assert_eq!(s.available_tables, seen[..MAX_AVAILABLE_TABLES]);
    assert_eq!(s.available_tables_omitted, Some(3));
    // Every table the store has seen counts, listed or not.
    assert_eq!(s.enabled_tables, Some(known + seen.len() as i64 - 1));
    let size = serde_json::to_vec(&s).unwrap().len();
    assert!(size < 512 << 10, "status of {size} bytes");

    // The engine unreachable: the list and its count stand while the spec does...
    let s2 = selection_status(&SelectionFacts {
        previous: &s,
        available: None,
        ..facts.clone()
    });
    assert_eq!(
        (
            s2.available_tables.len(),
            s2.available_tables_omitted,
            s2.enabled_tables
        ),
        (MAX_AVAILABLE_TABLES, Some(3), s.enabled_tables)
    );
    // ... and the next catalog that fits the list clears the count.
    let s3 = selection_status(&SelectionFacts {
        previous: &s2,
        available: Some(seen[..10].to_vec()),
        ..facts.clone()
    });
    assert_eq!(
        (s3.available_tables.len(), s3.available_tables_omitted),
        (10, None)
    );
    assert_eq!(s3.enabled_tables, Some(known + 9));
}

/// `availableTables` lists whole table names (`naming::table_name`, not cut to the warehouse's
/// 63 bytes): a Track event name may be 1,024 bytes, its table name longer still. 5,000 such
/// names are megabytes, past the API server's object size limit, and every status write failed
/// again: the list is held to a size too, the rest counted.
#[test]
fn available_tables_of_long_names_stay_within_the_status_limit() {
    let spec: SelectiveSyncSpec = serde_json::from_value(serde_json::json!({
        "connectionRef": {"name": "c"}, "default": "all"
    }))
    .unwrap();
    let mut seen: Vec<String> = (0..MAX_AVAILABLE_TABLES + 3)
        .map(|i| {
            crate::sync::naming::table_name(&format!(
                "{} {i:05}",
                "Viewed Product Page ".repeat(50)
            ))
        })
        .collect();
    seen.sort();
    assert!(seen[0].len() > 1000, "{}", seen[0].len());
    let previous = SelectiveSyncStatus::default();
    let s = selection_status(&SelectionFacts {
        now: t("2025-03-01T10:01:00Z"),
        generation: 2,
        spec: &spec,
        previous: &previous,
        problem: None,
        superseded: None,
        available: Some(seen.clone()),
        report: None,
    });
    let size = serde_json::to_vec(&s).unwrap().len();
    assert!(size < 512 << 10, "status of {size} bytes");
    let listed = s.available_tables.len();
    assert!(listed > 0);
    assert_eq!(s.available_tables, seen[..listed]);
    assert_eq!(
        s.available_tables_omitted,
        Some((seen.len() - listed) as i64)
    );
}

/// A first sync of a store with hundreds of Track event tables: its report is cut to fit the
/// pod's 4 KiB termination message, which keeps 20 of the names still backfilling. The
/// condition counts them all (it said "20 table(s) still backfilling" of 300).
#[test]
fn the_backfilling_count_survives_a_report_cut_for_the_termination_message() {
    let names: Vec<String> = (0..300)
        .map(|i| format!("order_step_{i:03}_done"))
        .collect();
    let tables = names
        .iter()
        .map(|n| TableReport {
            backfilling: true,
            ..table(n, 10, None)
        })
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let full = report("c-1", "2025-03-01T10:00:07Z", tables, &refs);
    let message = full.termination_message();
    assert!(message.len() <= 4096);
    let (_, cut) = record(&finished("c-1", JobPhase::Succeeded, Some(message), true));
    let cut = cut.expect("the cut report parses");
    let empty = WarehouseConnectionStatus::default();
    let s = connection_status(&ConnectionFacts {
        newest_report: Some(&cut),
        ..facts(
            &empty,
            vec![rec("c-1", "2025-03-01T10:00:07Z", SyncStatus::Success)],
        )
    });
    let c = cond(&s, "BackfillComplete");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Backfilling")
    );
    assert!(
        c.message.starts_with("300 table(s) still backfilling"),
        "{}",
        c.message
    );
}

/// A sync that failed (nothing loaded: the warehouse unreachable, say) did not apply a
/// changed selection: it stays `Pending`, rather than `Ready=True` "the last sync applied this
/// selection" next to its connection's `Ready=False` `SyncFailed`.
#[test]
fn a_failed_sync_does_not_apply_a_selection() {
    let spec: SelectiveSyncSpec =
        serde_json::from_value(serde_json::json!({"connectionRef": {"name": "c"}})).unwrap();
    let pending = selection_status(&SelectionFacts {
        now: t("2025-03-01T10:01:00Z"),
        generation: 2,
        spec: &spec,
        previous: &SelectiveSyncStatus::default(),
        problem: None,
        superseded: None,
        available: None,
        report: None,
    });
    let ready = |s: &SelectiveSyncStatus| {
        conditions::find(&s.conditions, "Ready")
            .map(|c| (c.status.clone(), c.reason.clone()))
            .unwrap()
    };
    assert_eq!(ready(&pending), ("False".into(), "Pending".into()));
    let failed = SyncReport::failed(
        "c-2",
        t("2025-03-01T11:00:03Z"),
        ErrorClass::Connection,
        "connection refused".into(),
    );
    let s = selection_status(&SelectionFacts {
        now: t("2025-03-01T11:01:00Z"),
        generation: 2,
        spec: &spec,
        previous: &pending,
        problem: None,
        superseded: None,
        available: None,
        report: Some((&failed, Some(2))),
    });
    assert_eq!(ready(&s), ("False".into(), "Pending".into()));
    // The next sync that loads applies it.
    let ok = report(
        "c-3",
        "2025-03-01T12:00:03Z",
        vec![table("tracks", 1, None)],
        &[],
    );
    let s = selection_status(&SelectionFacts {
        now: t("2025-03-01T12:01:00Z"),
        generation: 2,
        spec: &spec,
        previous: &s,
        problem: None,
        superseded: None,
        available: None,
        report: Some((&ok, Some(2))),
    });
    assert_eq!(ready(&s), ("True".into(), "Applied".into()));
}

/// BackfillComplete is about one warehouse: `spec.warehouse` naming another server or database
/// turns it Unknown until the next sync's report (it said "caught up" for an empty warehouse
/// until then). A report folded meanwhile, or settings that name the same database, keep it.
#[test]
fn backfill_complete_turns_unknown_when_the_warehouse_changes() {
    let empty = WarehouseConnectionStatus::default();
    let r = report(
        "c-1",
        "2025-03-01T10:05:03Z",
        vec![table("tracks", 4, None)],
        &[],
    );
    let syncs = vec![rec("c-1", "2025-03-01T10:05:03Z", SyncStatus::Success)];
    let caught_up = connection_status(&ConnectionFacts {
        newest_report: Some(&r),
        ..facts(&empty, syncs.clone())
    });
    assert_eq!(cond(&caught_up, "BackfillComplete").status, "True");
    assert_eq!(
        caught_up.destination.as_deref(),
        Some("postgres db:5432/analytics, schema profiles_sync")
    );
    let same = connection_status(&facts(&caught_up, syncs.clone()));
    assert_eq!(cond(&same, "BackfillComplete").status, "True");
    // A status of a release before `destination`: nothing to compare, nothing changed.
    let upgraded = WarehouseConnectionStatus {
        destination: None,
        ..caught_up.clone()
    };
    let s = connection_status(&facts(&upgraded, syncs.clone()));
    assert_eq!(cond(&s, "BackfillComplete").reason, "CaughtUp");
    assert!(s.destination.is_some());

    let moved = |previous| ConnectionFacts {
        destination: "postgres db2:5432/analytics, schema profiles_sync".into(),
        ..facts(previous, syncs.clone())
    };
    let s = connection_status(&moved(&caught_up));
    let c = cond(&s, "BackfillComplete");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("Unknown", "WarehouseChanged")
    );
    assert!(
        c.message.contains("from postgres db:5432/analytics")
            && c.message.contains("to postgres db2:5432"),
        "{}",
        c.message
    );
    assert_eq!(
        s.destination.as_deref(),
        Some("postgres db2:5432/analytics, schema profiles_sync")
    );
    // It stands until a report says otherwise.
    let later = connection_status(&moved(&s));
    assert_eq!(cond(&later, "BackfillComplete").reason, "WarehouseChanged");
    let reported = connection_status(&ConnectionFacts {
        newest_report: Some(&r),
        ..moved(&later)
    });
    assert_eq!(cond(&reported, "BackfillComplete").reason, "CaughtUp");
    // A report of the new warehouse, folded in the reconcile that sees the change, speaks for
    // itself (the reconcile leaves out those of Jobs started for another warehouse).
    let both = connection_status(&ConnectionFacts {
        newest_report: Some(&r),
        ..moved(&caught_up)
    });
    assert_eq!(cond(&both, "BackfillComplete").reason, "CaughtUp");
}

/// A sync that loaded every table up to the head, with a `Retention` error (events deleted
/// before it loaded them), caught up all the same: that error stops no run. A run stopped by an
/// error of no table (the engine lost) did not reach every table.
#[test]
fn a_retention_gap_does_not_hide_that_the_tables_caught_up() {
    let empty = WarehouseConnectionStatus::default();
    let syncs = vec![rec(
        "c-1",
        "2025-03-01T10:05:03Z",
        SyncStatus::PartialSuccess,
    )];
    for (class, expected) in [
        (ErrorClass::Retention, ("True", "CaughtUp")),
        (ErrorClass::Connection, ("Unknown", "NoSyncYet")),
    ] {
        let mut r = report(
            "c-1",
            "2025-03-01T10:05:03Z",
            vec![table("tracks", 4, None)],
            &[],
        );
        r.errors.push(SyncError {
            class,
            message: "events before seq 10 were deleted".into(),
            table: None,
        });
        let s = connection_status(&ConnectionFacts {
            newest_report: Some(&r),
            ..facts(&empty, syncs.clone())
        });
        let c = cond(&s, "BackfillComplete");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            expected,
            "{class:?}"
        );
    }
}

/// A look that could not read the Job's pods keeps what the status said of that Job (it said
/// "running", then "cannot start" again at the next look, announcing it anew).
#[test]
fn a_job_whose_pods_could_not_be_read_keeps_what_was_said_of_it() {
    let empty = WarehouseConnectionStatus::default();
    let stuck = connection_status(&ConnectionFacts {
        active_job: Some("c-1"),
        active_job_progress: JobProgress::Stuck("pod c-1-x: container sync ErrImagePull".into()),
        ..facts(&empty, vec![])
    });
    let unread = |previous: &WarehouseConnectionStatus, job: &str| {
        let s = connection_status(&ConnectionFacts {
            active_job: Some(job),
            active_job_progress: JobProgress::Unread,
            ..facts(previous, vec![])
        });
        let c = cond(&s, "Syncing");
        (c.reason.clone(), c.message.clone())
    };
    let said = cond(&stuck, "Syncing");
    assert_eq!(
        unread(&stuck, "c-1"),
        (said.reason.clone(), said.message.clone())
    );
    // Nothing said of this Job (another one's words), or said of it held by a queue (its
    // status now tells otherwise): running, as before.
    assert_eq!(unread(&stuck, "c-2").0, "JobRunning");
    assert_eq!(unread(&empty, "c-1").0, "JobRunning");
    let held = connection_status(&ConnectionFacts {
        active_job: Some("c-1"),
        active_job_progress: JobProgress::Suspended,
        ..facts(&empty, vec![])
    });
    assert_eq!(unread(&held, "c-1").0, "JobRunning");
}

/// No sync runs at the next slot while the connection is not verified or its SelectiveSync is
/// invalid: `NEXT SYNC` shows no time then (it showed the schedule's, and nothing ran).
#[test]
fn no_next_sync_is_shown_while_no_sync_would_run() {
    let empty = WarehouseConnectionStatus::default();
    let failing = TestOutcome {
        reason: Reason::Unreachable,
        message: "connection refused".into(),
    };
    let s = connection_status(&ConnectionFacts {
        test: Some(&failing),
        ..facts(&empty, vec![])
    });
    assert_eq!(s.next_sync_time, None);
    let ok = connected();
    let verified = connection_status(&ConnectionFacts {
        test: Some(&ok),
        ..facts(&s, vec![])
    });
    assert_eq!(
        verified.next_sync_time.as_ref().map(|t| t.0),
        Some(t("2025-03-01T11:00:00Z"))
    );
    let s = connection_status(&ConnectionFacts {
        selection_error: Some("table \"pages\" is listed more than once".into()),
        ..facts(&verified, vec![])
    });
    assert_eq!(s.next_sync_time, None);
}
