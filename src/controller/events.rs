//! Kubernetes Events (events.k8s.io, through kube's `Recorder`) with PascalCase reasons.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};

use crate::crd::{ErrorClass, SyncRecord, SyncStatus};

/// What happened, as an Event reason and note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// The connection test passed.
    ConnectionVerified(String),
    /// The connection test failed: reason and message.
    ConnectionFailed(String, String),
    /// A sync Job was created: Job name and trigger.
    SyncStarted(String, String),
    /// A due sync's Job could not be created: Job name and why.
    SyncNotStarted(String, String),
    /// A sync loaded every table: its Job and the message.
    SyncSucceeded(String, String),
    /// A sync loaded some tables: its Job and the message.
    SyncPartiallySucceeded(String, String),
    /// A sync loaded nothing: its Job and the message.
    SyncFailed(String, String),
    /// A sync Job completed without a readable report: the Job and the message.
    SyncOutcomeUnknown(String, String),
    /// A `sync-now` value a finished Job already answered: the Job and the value.
    SyncNowAlreadyAnswered(String, String),
    /// The backfill caught up.
    BackfillComplete,
    /// The connection's SelectiveSync is invalid (published on the SelectiveSync).
    SelectiveSyncInvalid(String),
    /// A running or orphaned sync Job was adopted by this controller.
    JobAdopted(String),
    /// A sync Job's pod cannot start (an image, a Secret, no node fits, no pod created): the
    /// Job and why.
    SyncJobPending(String, String),
    /// A reconcile failed before its status said why: the error's kind (its metric label) and
    /// the error (retried).
    ReconcileFailed(String, String),
    /// A deleted connection's feed consumer could not be removed from the engine, whose event
    /// retention still keeps what it had not loaded: the consumer's URL and why.
    RetentionHoldNotReleased(String, String),
}

impl Note {
    /// The Event's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Note::ConnectionVerified(_) => "ConnectionVerified",
            Note::ConnectionFailed(..) => "ConnectionFailed",
            Note::SyncStarted(..) => "SyncStarted",
            Note::SyncNotStarted(..) => "SyncNotStarted",
            Note::SyncSucceeded(..) => "SyncSucceeded",
            Note::SyncPartiallySucceeded(..) => "SyncPartiallySucceeded",
            Note::SyncFailed(..) => "SyncFailed",
            Note::SyncOutcomeUnknown(..) => "SyncOutcomeUnknown",
            Note::SyncNowAlreadyAnswered(..) => "SyncNowAlreadyAnswered",
            Note::BackfillComplete => "BackfillComplete",
            Note::SelectiveSyncInvalid(_) => "SelectiveSyncInvalid",
            Note::JobAdopted(_) => "JobAdopted",
            Note::SyncJobPending(..) => "SyncJobPending",
            Note::ReconcileFailed(..) => "ReconcileFailed",
            Note::RetentionHoldNotReleased(..) => "RetentionHoldNotReleased",
        }
    }

    /// The Event to publish.
    pub fn event(&self) -> Event {
        let (type_, action, note) = match self {
            Note::ConnectionVerified(m) => (EventType::Normal, "TestConnection", m.clone()),
            // The cause in the action too: the Recorder folds an Event into an earlier one of
            // the same type, reason and action (within minutes), keeping the earlier message,
            // so a connection whose Secret was fixed but whose host is unreachable showed the
            // Secret's message (`kubectl describe` shows the reason and message, not the action).
            Note::ConnectionFailed(r, m) => (
                EventType::Warning,
                &*format!("TestConnection:{r}"),
                format!("{r}: {m}"),
            ),
            Note::SyncStarted(job, trigger) => (
                EventType::Normal,
                "CreateJob",
                format!("created sync Job {job} ({trigger})"),
            ),
            Note::SyncNotStarted(job, why) => (
                EventType::Warning,
                "CreateJob",
                format!("could not create sync Job {job}: {why}"),
            ),
            Note::SyncSucceeded(_, m) => (EventType::Normal, "Sync", m.clone()),
            Note::SyncPartiallySucceeded(_, m) => (EventType::Warning, "Sync", m.clone()),
            Note::SyncFailed(_, m) | Note::SyncOutcomeUnknown(_, m) => {
                (EventType::Warning, "Sync", m.clone())
            }
            Note::SyncNowAlreadyAnswered(job, value) => (
                EventType::Warning,
                "Sync",
                format!(
                    "sync-now value {value:?} was answered by sync Job {job} already: no sync started; \
                     give each request a new value (profilesync.dev/sync-now=\"$(date +%s)\")"
                ),
            ),
            Note::BackfillComplete => (
                EventType::Normal,
                "Sync",
                "every table has caught up with the profile store".into(),
            ),
            Note::SelectiveSyncInvalid(m) => (EventType::Warning, "Validate", m.clone()),
            Note::JobAdopted(job) => (
                EventType::Normal,
                "AdoptJob",
                format!("adopted sync Job {job}"),
            ),
            // The kind in the action, as for ConnectionFailed: the recorder keeps one message
            // per action.
            Note::ReconcileFailed(kind, e) => (
                EventType::Warning,
                &*format!("Reconcile:{kind}"),
                format!("the controller could not reconcile this connection, and retries: {e}"),
            ),
            Note::SyncJobPending(job, why) => (
                EventType::Warning,
                "StartJob",
                format!("sync Job {job} cannot start: {why}"),
            ),
            Note::RetentionHoldNotReleased(url, why) => {
                // The cause is cut so that the command to run by hand always fits the note.
                let mut why = why.clone();
                crate::sync::naming::truncate_at_char(&mut why, 400);
                (
                    EventType::Warning,
                    "ReleaseRetentionHold",
                    format!(
                        "the engine still keeps the events this connection had not loaded \
                         (its feed consumer could not be removed: {why}); the connection is deleted all the same. \
                         Release them by hand: curl -X DELETE -H \"Authorization: Bearer $TOKEN\" \
                         {url} ($TOKEN: the engine's feed API token)"
                    ),
                )
            }
        };
        let mut note = note;
        crate::sync::naming::truncate_at_char(&mut note, 1000);
        Event {
            type_,
            reason: self.reason().into(),
            note: Some(note),
            action: action.into(),
            // The Job as the related object: each Job's Events are its own (the Recorder folded
            // the next Job's into the first's, message and all).
            secondary: self.job().map(|name| ObjectReference {
                api_version: Some("batch/v1".into()),
                kind: Some("Job".into()),
                name: Some(name.to_string()),
                ..ObjectReference::default()
            }),
        }
    }

    /// The sync Job the note is about, if any.
    fn job(&self) -> Option<&str> {
        match self {
            Note::SyncStarted(job, _)
            | Note::SyncNotStarted(job, _)
            | Note::JobAdopted(job)
            | Note::SyncJobPending(job, _)
            | Note::SyncSucceeded(job, _)
            | Note::SyncPartiallySucceeded(job, _)
            | Note::SyncFailed(job, _)
            | Note::SyncOutcomeUnknown(job, _)
            | Note::SyncNowAlreadyAnswered(job, _) => Some(job),
            _ => None,
        }
    }

    /// The Event for a sync folded into the status.
    pub fn for_sync(r: &SyncRecord) -> Note {
        let job = r.job_name.as_deref().unwrap_or(&r.id);
        match r.status {
            SyncStatus::Success => Note::SyncSucceeded(
                job.to_string(),
                format!(
                    "sync {job} loaded {} rows in {:.1}s",
                    r.rows.total, r.duration_seconds
                ),
            ),
            SyncStatus::PartialSuccess => {
                let tables: Vec<&str> = r.tables.iter().map(|t| t.name.as_str()).collect();
                let mut message = format!("sync {job} loaded {} rows", r.rows.total);
                // The errors of no table first (the note is cut at 1 kB, a long table list
                // last): a run stopped midway (the next sync continues), or events retention
                // deleted before they loaded (never loaded).
                for e in r.errors.iter().filter(|e| e.table.is_none()) {
                    let then = if e.class == ErrorClass::Retention {
                        "not retried"
                    } else {
                        "the next sync continues"
                    };
                    message.push_str(&format!("; {:?} ({then}): {}", e.class, e.message));
                }
                if !tables.is_empty() {
                    message.push_str(&format!(
                        "; failed tables (retried next sync): {}",
                        tables.join(", ")
                    ));
                }
                Note::SyncPartiallySucceeded(job.to_string(), message)
            }
            SyncStatus::Failed => {
                let why = r
                    .errors
                    .first()
                    .map(|e| format!("{:?}: {}", e.class, e.message))
                    .unwrap_or_default();
                Note::SyncFailed(job.to_string(), format!("sync {job} failed: {why}"))
            }
            SyncStatus::Unknown => Note::SyncOutcomeUnknown(
                job.to_string(),
                r.errors
                    .first()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| format!("sync {job} completed without a readable report")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ErrorClass, FailedTable, SyncError, SyncRows};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn record(status: SyncStatus) -> SyncRecord {
        SyncRecord {
            id: "c-1".into(),
            status,
            start_time: Time("2025-03-01T10:00:00Z".parse().unwrap()),
            duration_seconds: 2.0,
            rows: SyncRows {
                total: 9,
                identity_graph: 9,
                event_types: 0,
                events: 0,
            },
            tables: vec![FailedTable {
                name: "order_completed".into(),
                class: ErrorClass::TypeConflict,
                message: "x".into(),
            }],
            errors: vec![SyncError {
                class: ErrorClass::Permission,
                message: "permission denied for schema".into(),
                table: None,
            }],
            job_name: Some("c-1".into()),
        }
    }

    #[test]
    fn each_sync_outcome_has_its_reason_and_severity() {
        let cases = [
            (
                SyncStatus::Success,
                "SyncSucceeded",
                EventType::Normal,
                "9 rows",
            ),
            (
                SyncStatus::PartialSuccess,
                "SyncPartiallySucceeded",
                EventType::Warning,
                "order_completed",
            ),
            (
                SyncStatus::Failed,
                "SyncFailed",
                EventType::Warning,
                "Permission: permission denied",
            ),
            (
                SyncStatus::Unknown,
                "SyncOutcomeUnknown",
                EventType::Warning,
                "permission denied for schema",
            ),
        ];
        for (status, reason, type_, text) in cases {
            let e = Note::for_sync(&record(status)).event();
            assert_eq!((e.reason.as_str(), e.type_), (reason, type_));
            assert!(
                e.note.as_deref().unwrap_or_default().contains(text),
                "{:?}",
                e.note
            );
        }
        let long = Note::ConnectionFailed("Unreachable".into(), "é".repeat(800)).event();
        assert!(
            long.note.unwrap().len() <= 1000,
            "notes are cut to the API's 1 kB"
        );
        assert_eq!(Note::JobAdopted("j".into()).event().reason, "JobAdopted");
    }

    /// A partial success's Event names the errors of no table too (it said "failed tables:"
    /// and nothing more for a run stopped midway, or a retention gap, which is never retried).
    #[test]
    fn a_partial_success_names_the_errors_of_no_table() {
        let mut r = record(SyncStatus::PartialSuccess);
        r.errors = vec![
            SyncError {
                class: ErrorClass::Retention,
                message: "events up to seq 40 were deleted".into(),
                table: None,
            },
            SyncError {
                class: ErrorClass::Connection,
                message: "the engine closed the feed".into(),
                table: None,
            },
        ];
        let note = Note::for_sync(&r).event().note.unwrap_or_default();
        assert_eq!(
            note,
            "sync c-1 loaded 9 rows; Retention (not retried): events up to seq 40 were deleted; \
             Connection (the next sync continues): the engine closed the feed; failed tables \
             (retried next sync): order_completed"
        );
    }

    /// A sync's Events name its Job as the related object, so that the Recorder keeps each
    /// Job's apart (it folded a later Job's Event, message and all, into the first's); a failed
    /// connection test's action carries its cause, for the same reason.
    #[test]
    fn events_of_different_jobs_and_causes_are_kept_apart() {
        let related = |job: &str| {
            let mut r = record(SyncStatus::Success);
            r.job_name = Some(job.into());
            Note::for_sync(&r).event().secondary.and_then(|s| s.name)
        };
        assert_eq!(related("c-1"), Some("c-1".to_string()));
        assert_eq!(related("c-2"), Some("c-2".to_string()));
        let action = |cause: &str| {
            Note::ConnectionFailed(cause.into(), "x".into())
                .event()
                .action
        };
        assert_ne!(action("SecretNotFound"), action("Unreachable"));
        assert_eq!(Note::BackfillComplete.event().secondary, None);
    }

    /// However long the cause, the note ends with the whole command that releases the hold.
    #[test]
    fn a_hold_not_released_says_how_to_release_it_by_hand() {
        let url =
            "http://profiles-sync-engine.profiles-sync.svc:8080/v1/feed-consumers/team-a/analytics";
        for why in [
            "the engine is unreachable: connection refused".to_string(),
            "x".repeat(5000),
        ] {
            let e = Note::RetentionHoldNotReleased(url.into(), why.clone()).event();
            assert_eq!(
                (e.reason.as_str(), e.type_),
                ("RetentionHoldNotReleased", EventType::Warning)
            );
            let note = e.note.unwrap_or_default();
            assert!(note.len() <= 1000, "{note}");
            assert!(
                note.ends_with(&format!(
                    "curl -X DELETE -H \"Authorization: Bearer $TOKEN\" {url} ($TOKEN: the engine's feed API token)"
                )),
                "{note}"
            );
            assert!(note.contains(&why[..40]), "{note}");
        }
    }
}
