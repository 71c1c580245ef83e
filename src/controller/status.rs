//! Status folding, pure: finished Jobs' reports (their pods' termination messages) become
//! `status.syncs`, and the observed state becomes the conditions and the overview fields of the
//! WarehouseConnection and its SelectiveSync.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::conditions::{self, set};
use super::connection_test::TestOutcome;
use super::plan::{Blocked, JobPhase};
use crate::crd::{
    ErrorClass, FailedTable, SYNC_HISTORY_LEN, SelectiveSyncSpec, SelectiveSyncStatus, SyncError,
    SyncRecord, SyncRows, SyncStatus, TableSyncStatus, WarehouseConnectionStatus,
};
use crate::sync::SyncReport;

/// A Job that finished, with what its pod left behind.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedJob {
    /// The Job's name.
    pub name: String,
    /// Succeeded or Failed.
    pub phase: JobPhase,
    /// When it started (`status.startTime`, else its slot).
    pub started: Option<Timestamp>,
    /// When it finished.
    pub finished: Option<Timestamp>,
    /// The reason and message of the Job's `Failed` condition (e.g. DeadlineExceeded).
    pub failure: Option<String>,
    /// The pod's termination message; None when no pod was found or it wrote none.
    pub termination_message: Option<String>,
    /// How the newest pod's sync container ended (`OOMKilled, exit code 137`), if it did.
    pub container_end: Option<String>,
    /// Whether a pod of the Job was found.
    pub pod_found: bool,
    /// The Job was deleted before it was seen to end (`finished` is when that was noticed):
    /// whether a pod of it was seen running.
    pub deleted: Option<bool>,
}

impl FinishedJob {
    /// A Job seen active that is gone: deleted before the controller saw it end (by hand, or by
    /// a cleanup of Jobs), noticed at `now`; `ran` when a pod of it was seen running.
    pub fn deleted(
        name: &str,
        started: Option<Timestamp>,
        now: Timestamp,
        ran: bool,
    ) -> FinishedJob {
        FinishedJob {
            name: name.to_string(),
            phase: JobPhase::Failed,
            started,
            finished: Some(now),
            failure: None,
            termination_message: None,
            container_end: None,
            pod_found: false,
            deleted: Some(ran),
        }
    }
}

/// The record of one finished Job, and its report when it had a readable one.
pub fn record(job: &FinishedJob) -> (SyncRecord, Option<SyncReport>) {
    let parsed = job
        .termination_message
        .as_deref()
        .map(serde_json::from_str::<SyncReport>);
    if let Some(Ok(report)) = parsed {
        let start = report_start(&report, job);
        let failed_tables = report
            .tables
            .iter()
            .filter_map(|t| {
                t.error.as_ref().map(|e| FailedTable {
                    name: t.name.clone(),
                    class: e.class,
                    message: e.message.clone(),
                })
            })
            .collect();
        let rec = SyncRecord {
            id: report.id.clone(),
            status: report.status,
            start_time: Time(start),
            duration_seconds: report.duration_seconds.max(0.0),
            rows: report.rows.clone(),
            tables: failed_tables,
            errors: report.errors.clone(),
            job_name: Some(job.name.clone()),
        };
        return (rec, Some(report));
    }
    if let Some(ran) = job.deleted {
        return (deleted_record(job, ran), None);
    }
    let why = match parsed {
        Some(Err(e)) => format!("its report is malformed ({e})"),
        _ if !job.pod_found => "no pod of the Job was found".to_string(),
        _ => "its pod wrote no termination message".to_string(),
    };
    // A Job that completed exited 0: its sync was not `Failed`, but which tables loaded only
    // its report said.
    let (outcome, status) = match job.phase {
        JobPhase::Failed => ("failed", SyncStatus::Failed),
        _ => ("completed", SyncStatus::Unknown),
    };
    let mut message = format!(
        "the sync Job {} {outcome} without a readable report: {why}",
        job.name
    );
    // What killed it, when its pod says (a memory limit: OOMKilled; a signal).
    if let Some(end) = &job.container_end {
        message.push_str(&format!(" (container: {end})"));
        if end.starts_with("OOMKilled") {
            message.push_str("; the sync ran out of memory: raise spec.resources' memory limit");
        }
    }
    if let Some(f) = job.failure.as_ref().filter(|f| !f.is_empty()) {
        message.push_str(&format!(" (Job: {f})"));
    }
    (unreported(job, status, message), None)
}

/// The record of a Job deleted before the controller saw it end: `Unknown` — it may have
/// ended, well or not, between two looks, or been stopped midway.
fn deleted_record(job: &FinishedJob, ran: bool) -> SyncRecord {
    let what = if ran {
        "its pod was seen running; its report went with it. What it loaded stays"
    } else {
        "its pod was not seen running: no sync ran, or one too brief to be seen"
    };
    let message = format!(
        "the sync Job {} was deleted before the controller saw it end (`kubectl delete job`, or \
         a cleanup of Jobs): {what}, and the next sync continues from the warehouse's cursors",
        job.name
    );
    unreported(job, SyncStatus::Unknown, message)
}

/// The record of a Job without a readable report: its times, `status`, and `message` as its
/// one error.
fn unreported(job: &FinishedJob, status: SyncStatus, message: String) -> SyncRecord {
    let start = job.started.unwrap_or(Timestamp::UNIX_EPOCH);
    let duration = match (job.started, job.finished) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.0),
        _ => 0.0,
    };
    SyncRecord {
        id: job.name.clone(),
        status,
        start_time: Time(start),
        duration_seconds: duration,
        rows: SyncRows::default(),
        tables: vec![],
        errors: vec![SyncError {
            class: ErrorClass::Internal,
            message,
            table: None,
        }],
        job_name: Some(job.name.clone()),
    }
}

/// How far before its Job's start a report's start may be (the pod's node clock behind the API
/// server's) before the Job's own start is taken instead.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// The precision of a Job's times.
const ONE_SECOND: std::time::Duration = std::time::Duration::from_secs(1);

/// When the sync of `job` started: its report's time (the sync's own clock, as the rows it
/// loaded have it), unless the Job's times show that clock wrong — a node days ahead would
/// otherwise hold `lastSyncTime` in the future and order the history by it. A start after the
/// Job ended is never right, however little: a node minutes ahead put a sync that had ended
/// before another began first in the history (a failed sync shown behind an older success,
/// `Ready=True`).
fn report_start(report: &SyncReport, job: &FinishedJob) -> Timestamp {
    let reported = report.start_time.parse::<Timestamp>().ok();
    let Some(started) = job.started else {
        return reported.unwrap_or(Timestamp::UNIX_EPOCH);
    };
    let earliest = started.checked_sub(CLOCK_SKEW).unwrap_or(started);
    // (A second more: the Job's times are kept to the second, the report's to the microsecond.)
    let latest = job.finished.unwrap_or(started).max(started);
    let latest = latest.checked_add(ONE_SECOND).unwrap_or(latest);
    match reported {
        Some(r) if (earliest..=latest).contains(&r) => r,
        _ => started,
    }
}

/// `status.syncs` after folding `new` records into `previous`: one record per Job, newest
/// first, at most 10. Returns the list and the records of `new` that made it into the list.
pub fn fold(previous: &[SyncRecord], new: Vec<SyncRecord>) -> (Vec<SyncRecord>, Vec<SyncRecord>) {
    let key = |r: &SyncRecord| r.job_name.clone().unwrap_or_else(|| r.id.clone());
    let mut all: Vec<SyncRecord> = previous.to_vec();
    let mut added = vec![];
    for r in new {
        if all.iter().any(|p| key(p) == key(&r)) {
            continue;
        }
        added.push(key(&r));
        all.push(r);
    }
    all.sort_by(|a, b| {
        b.start_time
            .0
            .cmp(&a.start_time.0)
            .then_with(|| b.id.cmp(&a.id))
    });
    all.truncate(SYNC_HISTORY_LEN);
    let kept = all
        .iter()
        .filter(|r| added.contains(&key(r)))
        .cloned()
        .collect();
    (all, kept)
}

/// Everything the WarehouseConnection's status is computed from.
#[derive(Clone, Debug)]
pub struct ConnectionFacts<'a> {
    /// Now.
    pub now: Timestamp,
    /// metadata.generation.
    pub generation: i64,
    /// The status as read.
    pub previous: &'a WarehouseConnectionStatus,
    /// `status.syncs` after folding.
    pub syncs: Vec<SyncRecord>,
    /// The newest report folded in this reconcile, if it is the newest sync.
    pub newest_report: Option<&'a SyncReport>,
    /// The result of a connection test run in this reconcile.
    pub test: Option<&'a TestOutcome>,
    /// `spec.suspend`.
    pub suspended: bool,
    /// The running Job.
    pub active_job: Option<&'a str>,
    /// How far the running Job has got ([`JobProgress::Running`] when there is none).
    pub active_job_progress: JobProgress,
    /// When the newest Job was created (a sync started).
    pub last_started: Option<Timestamp>,
    /// `Slots::frequency`, or the schedule's error.
    pub schedule: Result<String, String>,
    /// The SelectiveSync's problem, if any.
    pub selection_error: Option<String>,
    /// The next sync time.
    pub next_sync: Option<Timestamp>,
    /// Why a due sync did not start.
    pub blocked: Option<&'a Blocked>,
    /// The error of a sync Job this reconcile tried to start and could not (the API refused
    /// it: a quota, an admission webhook, a name taken; the engine token unreadable).
    pub start_failed: Option<&'a str>,
    /// The egress IPs to show.
    pub egress_ips: &'a [String],
    /// Where the syncs land now (`WarehouseConnectionSpec::destination`).
    pub destination: String,
}

/// How far a running sync Job has got, as its status and its newest pod tell: `Syncing` says
/// "running" only when a pod of it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JobProgress {
    /// A pod of it runs (or nothing read says otherwise).
    #[default]
    Running,
    /// `spec.suspend`: a queue such as Kueue holds it, so no pod of it runs.
    Suspended,
    /// Its pod is being created, scheduled or started: what it waits for.
    Starting(String),
    /// Its pod cannot start, and waits for something to be fixed: an image that cannot be
    /// pulled, a Secret or key it mounts missing, no node that fits it, or no pod at all a while
    /// after the Job was created (a quota or an admission policy refusing it).
    Stuck(String),
    /// Its pods could not be read: what the status said of it stands.
    Unread,
}

/// The `Syncing=True` condition among `conds` when it speaks of sync Job `job` (its messages
/// all name it: "sync Job {job} …").
pub fn syncing_of<'a>(conds: &'a [Condition], job: &str) -> Option<&'a Condition> {
    conditions::find(conds, conditions::SYNCING)
        .filter(|c| c.status == "True" && c.message.contains(&format!("Job {job} ")))
}

fn blocked_message(b: &Blocked) -> String {
    match b {
        Blocked::Suspended => "a sync is due but the connection is suspended".into(),
        Blocked::JobRunning(j) => {
            format!("a sync is due and waits for Job {j} to finish (concurrency Forbid)")
        }
        Blocked::ConnectionNotVerified => "a sync is due but the connection is not verified".into(),
        Blocked::SelectionInvalid => "a sync is due but the SelectiveSync is invalid".into(),
        Blocked::SlotTaken(j) => {
            format!("a manual sync waits for the next minute (Job {j} exists)")
        }
    }
}

/// The connection's new status.
pub fn connection_status(f: &ConnectionFacts<'_>) -> WarehouseConnectionStatus {
    let mut conds: Vec<Condition> = f.previous.conditions.clone();
    let (now, generation) = (f.now, f.generation);
    if let Some(t) = f.test {
        let status = if t.ok() { "True" } else { "False" };
        set(
            &mut conds,
            conditions::CONNECTION_VERIFIED,
            status,
            t.reason.as_str(),
            &t.message,
            generation,
            now,
        );
    }
    let verified = conditions::find(&conds, conditions::CONNECTION_VERIFIED).cloned();
    if f.suspended {
        set(
            &mut conds,
            conditions::SUSPENDED,
            "True",
            "Suspended",
            "new syncs are stopped; a running sync finishes",
            generation,
            now,
        );
    } else {
        set(
            &mut conds,
            conditions::SUSPENDED,
            "False",
            "Active",
            "syncs run on schedule",
            generation,
            now,
        );
    }
    match f.active_job {
        Some(j) => {
            // What the status said of this Job's pod, for a look that could not read its pods
            // (its status tells it is neither held by a queue nor running).
            let said = syncing_of(&conds, j)
                .filter(|c| c.reason == "JobStarting" || c.reason == "JobPending")
                .map(|c| (c.reason.clone(), c.message.clone()));
            let (reason, message) = match (&f.active_job_progress, said) {
                (JobProgress::Unread, Some((reason, message))) => (reason, message),
                (JobProgress::Running | JobProgress::Unread, _) => {
                    ("JobRunning".into(), format!("sync Job {j} is running"))
                }
                (JobProgress::Suspended, _) => (
                    "JobSuspended".into(),
                    format!(
                        "sync Job {j} is suspended (a queue such as Kueue holds it): no pod of \
                         it runs yet, and the next syncs wait for it"
                    ),
                ),
                (JobProgress::Starting(what), _) => (
                    "JobStarting".into(),
                    format!("sync Job {j} is starting: {what}"),
                ),
                (JobProgress::Stuck(why), _) => (
                    "JobPending".into(),
                    format!(
                        "sync Job {j} cannot start: {why}; the next syncs wait for it, and it \
                         fails at its deadline unless this is fixed"
                    ),
                ),
            };
            set(
                &mut conds,
                conditions::SYNCING,
                "True",
                &reason,
                &message,
                generation,
                now,
            )
        }
        None => {
            let (reason, msg) = match f.start_failed {
                Some(why) => ("StartFailed", why.to_string()),
                None => (
                    "Idle",
                    f.blocked
                        .map(blocked_message)
                        .unwrap_or_else(|| "no sync is running".into()),
                ),
            };
            set(
                &mut conds,
                conditions::SYNCING,
                "False",
                reason,
                &msg,
                generation,
                now,
            )
        }
    }
    // A sync stopped midway did not reach every table, so it cannot tell that they all
    // caught up (a retention gap stops nothing: its `Retention` error says what is missing).
    let stopped = SyncReport::stopped;
    let changed_from = f
        .previous
        .destination
        .as_deref()
        .filter(|d| *d != f.destination);
    match f.newest_report {
        Some(r) if r.status != SyncStatus::Failed && r.backfilling.is_empty() && !stopped(r) => {
            set(
                &mut conds,
                conditions::BACKFILL_COMPLETE,
                "True",
                "CaughtUp",
                "every table has caught up with the profile store",
                generation,
                now,
            )
        }
        Some(r) if r.status != SyncStatus::Failed && !r.backfilling.is_empty() => {
            let mut names = r.backfilling.clone();
            names.truncate(5);
            set(
                &mut conds,
                conditions::BACKFILL_COMPLETE,
                "False",
                "Backfilling",
                &format!(
                    "{} table(s) still backfilling: {}",
                    (r.backfilling.len() as u64).saturating_add(r.backfilling_omitted),
                    names.join(", ")
                ),
                generation,
                now,
            )
        }
        // Another server or database than the one the condition was about: whether its
        // tables have caught up, only the next sync tells (the cursors are in the warehouse).
        _ if changed_from.is_some() => set(
            &mut conds,
            conditions::BACKFILL_COMPLETE,
            "Unknown",
            "WarehouseChanged",
            &format!(
                "the warehouse changed from {} to {}; the next sync tells whether its tables \
                 have caught up (a new one is backfilled)",
                changed_from.unwrap_or_default(),
                f.destination
            ),
            generation,
            now,
        ),
        _ if conditions::find(&conds, conditions::BACKFILL_COMPLETE).is_none() => set(
            &mut conds,
            conditions::BACKFILL_COMPLETE,
            "Unknown",
            "NoSyncYet",
            "no sync has loaded data yet",
            generation,
            now,
        ),
        // Nothing new about the backfill: the condition stands, observed at this generation
        // (it kept the generation of its last change while every other condition moved on).
        _ => {
            if let Some(c) = conditions::find(&conds, conditions::BACKFILL_COMPLETE).cloned() {
                set(
                    &mut conds,
                    conditions::BACKFILL_COMPLETE,
                    &c.status,
                    &c.reason,
                    &c.message,
                    generation,
                    now,
                );
            }
        }
    }
    let (ready, reason, message) = if let Err(e) = &f.schedule {
        ("False", "InvalidSchedule", e.clone())
    } else if verified.as_ref().map(|c| c.status.as_str()) != Some("True") {
        let why = verified
            .as_ref()
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "the connection has not been tested yet".into());
        ("False", "ConnectionNotVerified", why)
    } else if let Some(e) = &f.selection_error {
        ("False", "SelectiveSyncInvalid", e.clone())
    } else if let Some(why) = f.start_failed {
        ("False", "SyncNotStarted", why.to_string())
    } else {
        match f.syncs.first() {
            None => (
                "True",
                "Verified",
                "the connection is verified; waiting for the first sync".to_string(),
            ),
            Some(s) if s.status == SyncStatus::Failed => {
                let why = s
                    .errors
                    .first()
                    .map(|e| e.message.clone())
                    .unwrap_or_default();
                (
                    "False",
                    "SyncFailed",
                    format!("sync {} failed: {why}", s.id),
                )
            }
            // Its Job completed (a `Failed` sync exits non-zero), so the connection works — or
            // it was deleted before it was seen to end, which says nothing against it.
            Some(s) if s.status == SyncStatus::Unknown => (
                "True",
                "SyncOutcomeUnknown",
                s.errors
                    .first()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| {
                        format!("sync {} completed without a readable report", s.id)
                    }),
            ),
            Some(s) => (
                "True",
                "Synced",
                format!(
                    "sync {} ended {:?} with {} rows",
                    s.id, s.status, s.rows.total
                ),
            ),
        }
    };
    set(
        &mut conds,
        conditions::READY,
        ready,
        reason,
        &message,
        generation,
        now,
    );
    conditions::sort(&mut conds);

    let newest_start = f.syncs.first().map(|s| s.start_time.0);
    let last_sync = [
        newest_start,
        f.last_started,
        f.previous.last_sync_time.as_ref().map(|t| t.0),
    ]
    .into_iter()
    .flatten()
    .max();
    let last_success = f
        .syncs
        .iter()
        .find(|s| s.status == SyncStatus::Success)
        .map(|s| s.start_time.0)
        .into_iter()
        .chain(f.previous.last_successful_sync_time.as_ref().map(|t| t.0))
        .max();
    WarehouseConnectionStatus {
        observed_generation: Some(generation),
        conditions: conds,
        last_sync_time: last_sync.map(Time),
        last_successful_sync_time: last_success.map(Time),
        // No sync runs at the next slot while the connection is not verified (a warehouse type
        // without a loader never is) or its SelectiveSync is invalid: no time to show.
        next_sync_time: f
            .next_sync
            .filter(|_| {
                verified.as_ref().is_some_and(|c| c.status == "True") && f.selection_error.is_none()
            })
            .map(Time),
        frequency: f.schedule.as_ref().ok().cloned(),
        syncs: f.syncs.clone(),
        egress_ips: f.egress_ips.to_vec(),
        destination: Some(f.destination.clone()),
    }
}

/// How many tables a selection enables among the known ones, the available Track event tables
/// and the ones it lists.
pub fn enabled_tables(spec: &SelectiveSyncSpec, available: &[String]) -> i64 {
    let mut names: Vec<&str> = crate::sync::tables::known_tables();
    names.extend(available.iter().map(String::as_str));
    names.extend(spec.tables.iter().map(|t| t.name.as_str()));
    names.sort_unstable();
    names.dedup();
    names.iter().filter(|n| spec.table_enabled(n)).count() as i64
}

/// Most Track event tables `SelectiveSync.status.availableTables` lists; the engine's catalog
/// can hold any number.
pub const MAX_AVAILABLE_TABLES: usize = 5_000;

/// Most bytes of names `availableTables` holds (of the object's 1.5 MiB the API server
/// stores): it lists whole table names ([`crate::sync::naming::table_name`], not cut to a
/// warehouse's 63 bytes), and a Track event name may be 1,024 bytes — 5,000 of them were
/// megabytes. 5,000 names of 63 bytes fit.
pub const MAX_AVAILABLE_TABLES_BYTES: usize = 384 << 10;

/// How many of `all` (in order) `availableTables` lists: at most [`MAX_AVAILABLE_TABLES`]
/// names of at most [`MAX_AVAILABLE_TABLES_BYTES`] in all (each with its quotes and comma).
fn listed_available(all: &[String]) -> usize {
    let mut bytes = 0;
    all.iter()
        .take(MAX_AVAILABLE_TABLES)
        .take_while(|n| {
            bytes += n.len() + 3;
            bytes <= MAX_AVAILABLE_TABLES_BYTES
        })
        .count()
}

/// Everything a SelectiveSync's status is computed from.
#[derive(Clone, Debug)]
pub struct SelectionFacts<'a> {
    /// Now.
    pub now: Timestamp,
    /// Its metadata.generation.
    pub generation: i64,
    /// Its spec.
    pub spec: &'a SelectiveSyncSpec,
    /// The status as read.
    pub previous: &'a SelectiveSyncStatus,
    /// Why it is not usable (invalid), if so.
    pub problem: Option<String>,
    /// Why it does not apply though valid (another selection of its connection does), if so.
    pub superseded: Option<String>,
    /// The engine's Track event tables; None keeps the previous list (engine unreachable).
    pub available: Option<Vec<String>>,
    /// The newest report folded in this reconcile and the selection generation its Job used.
    pub report: Option<(&'a SyncReport, Option<i64>)>,
}

/// The SelectiveSync's new status.
pub fn selection_status(f: &SelectionFacts<'_>) -> SelectiveSyncStatus {
    let mut conds = f.previous.conditions.clone();
    let (enabled, available, available_omitted) = match &f.available {
        Some(all) => {
            let listed = listed_available(all);
            let omitted = all.len() - listed;
            (
                enabled_tables(f.spec, all),
                all[..listed].to_vec(),
                (omitted > 0).then(|| i64::try_from(omitted).unwrap_or(i64::MAX)),
            )
        }
        None => {
            let previous = &f.previous.available_tables;
            // The previous list may be cut: its count stands while the spec it was computed
            // for does.
            let enabled = match f.previous.enabled_tables {
                Some(n)
                    if f.previous.available_tables_omitted.is_some()
                        && f.previous.observed_generation == Some(f.generation) =>
                {
                    n
                }
                _ => enabled_tables(f.spec, previous),
            };
            (
                enabled,
                previous.clone(),
                f.previous.available_tables_omitted,
            )
        }
    };
    match &f.problem {
        Some(p) => {
            set(
                &mut conds,
                conditions::VALID,
                "False",
                "Invalid",
                p,
                f.generation,
                f.now,
            );
            set(
                &mut conds,
                conditions::READY,
                "False",
                "Invalid",
                p,
                f.generation,
                f.now,
            );
        }
        None => {
            set(
                &mut conds,
                conditions::VALID,
                "True",
                "Valid",
                "the selection is valid",
                f.generation,
                f.now,
            );
            if let Some(why) = &f.superseded {
                set(
                    &mut conds,
                    conditions::READY,
                    "False",
                    "NotInEffect",
                    why,
                    f.generation,
                    f.now,
                );
            } else {
                // A sync that failed loaded nothing: it applied no selection.
                let applied_now = f
                    .report
                    .filter(|(r, _)| r.status != SyncStatus::Failed)
                    .and_then(|(_, g)| g)
                    == Some(f.generation);
                let was_applied = conditions::find(&conds, conditions::READY).is_some_and(|c| {
                    c.status == "True" && c.observed_generation == Some(f.generation)
                });
                if applied_now || was_applied {
                    set(
                        &mut conds,
                        conditions::READY,
                        "True",
                        "Applied",
                        "the last sync applied this selection",
                        f.generation,
                        f.now,
                    );
                } else {
                    set(
                        &mut conds,
                        conditions::READY,
                        "False",
                        "Pending",
                        "the next sync applies this selection",
                        f.generation,
                        f.now,
                    );
                }
            }
        }
    }
    conditions::sort(&mut conds);
    let (tables, tables_omitted) = match f.report {
        Some((r, _)) => (
            r.tables
                .iter()
                .map(|t| TableSyncStatus {
                    name: t.name.clone(),
                    rows: i64::try_from(t.rows).unwrap_or(i64::MAX),
                })
                .collect(),
            (r.tables_omitted > 0).then(|| i64::try_from(r.tables_omitted).unwrap_or(i64::MAX)),
        ),
        None => (f.previous.tables.clone(), f.previous.tables_omitted),
    };
    SelectiveSyncStatus {
        observed_generation: Some(f.generation),
        conditions: conds,
        enabled_tables: Some(enabled),
        available_tables: available,
        available_tables_omitted: available_omitted,
        tables,
        tables_omitted,
    }
}

/// The status of a SelectiveSync whose `connectionRef` names no WarehouseConnection (never
/// created, misspelled, or deleted): not valid and not ready, with what to do; everything else
/// as it was.
pub fn orphan_selection_status(
    previous: &SelectiveSyncStatus,
    generation: i64,
    connection: &str,
    now: Timestamp,
) -> SelectiveSyncStatus {
    let message = format!(
        "WarehouseConnection {connection:?} does not exist in this namespace; create it, or point \
         connectionRef at an existing one (connectionRef is immutable: recreate this SelectiveSync)"
    );
    let mut conds = previous.conditions.clone();
    for type_ in [conditions::VALID, conditions::READY] {
        set(
            &mut conds,
            type_,
            "False",
            "ConnectionNotFound",
            &message,
            generation,
            now,
        );
    }
    conditions::sort(&mut conds);
    SelectiveSyncStatus {
        observed_generation: Some(generation),
        conditions: conds,
        ..previous.clone()
    }
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
