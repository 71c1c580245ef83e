//! Scheduling as a pure function of what the controller observed and `now`: which sync Job to
//! start (if any), which finished Jobs to prune, when the next sync is due and when to look again.
//!
//! CronJob semantics, with the controller as the scheduler: one deterministic Job name per slot,
//! concurrency `Forbid`, at most one catch-up for slots missed while the controller (or a long
//! sync) was away, `suspend` stops new Jobs, history limits of 3 succeeded and 1 failed Job.

use std::time::Duration;

use chrono::{DateTime, Utc};
use jiff::Timestamp;

use crate::crd::Schedule;
use crate::sync::naming::floor_char_boundary;

/// Finished Jobs that succeeded which are kept (like a CronJob's `successfulJobsHistoryLimit`).
pub const SUCCEEDED_HISTORY: usize = 3;
/// Finished Jobs that failed which are kept (like a CronJob's `failedJobsHistoryLimit`).
pub const FAILED_HISTORY: usize = 1;
/// Longest a Kubernetes object name used as a label value (`job-name`) may be.
pub const MAX_NAME_LEN: usize = 63;
/// How long a deleted connection waits for its running sync before cancelling it.
pub const DELETION_GRACE: Duration = Duration::from_secs(10 * 60);
/// The longest the controller sleeps before looking at a connection again.
pub const MAX_REQUEUE: Duration = Duration::from_secs(30 * 60);

/// A schedule that can compute its slots.
#[derive(Clone, Debug)]
pub enum Slots {
    /// Every `Duration`, aligned to the Unix epoch.
    Interval(Duration),
    /// A cron expression in UTC.
    Cron(Box<croner::Cron>, String),
}

/// Why a schedule can't be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotsError {
    /// The spec's string is neither an interval nor a cron expression.
    #[error(transparent)]
    Schedule(#[from] crate::crd::ScheduleError),
    /// It looks like cron but does not parse as one.
    #[error("schedule {0:?} is not a valid cron expression: {1}")]
    Cron(String, String),
    /// A cron expression that fires twice within the minimum interval.
    #[error(
        "schedule {0:?} fires at {1} and again at {2}: syncs must be at least 15m apart, \
         as with an interval"
    )]
    CronTooFrequent(String, Timestamp, Timestamp),
    /// A cron expression that never fires (`0 0 30 2 *`, the 30th of February).
    #[error("schedule {0:?} never fires: no sync would ever run")]
    CronNeverFires(String),
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), 0).unwrap_or_default()
}

fn from_chrono(t: DateTime<Utc>) -> Timestamp {
    Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Cron expressions already checked, with the outcome: the check walks a year of fires, and
/// runs at every reconcile of a connection.
static CHECKED: std::sync::Mutex<
    Option<std::collections::HashMap<String, Result<(), SlotsError>>>,
> = std::sync::Mutex::new(None);

impl Slots {
    /// Parses the spec's `schedule` string.
    pub fn parse(spec: &str) -> Result<Slots, SlotsError> {
        match spec.parse::<Schedule>()? {
            Schedule::Interval(d) => Ok(Slots::Interval(d)),
            Schedule::Cron(expr) => {
                // croner knows no `@midnight` (the CRD accepts it, as cron does): `@daily`.
                let pattern = if expr == "@midnight" { "@daily" } else { &expr };
                let cron: croner::Cron =
                    pattern.parse().map_err(|e: croner::errors::CronError| {
                        SlotsError::Cron(expr.clone(), e.to_string())
                    })?;
                let slots = Slots::Cron(Box::new(cron), expr.clone());
                let known = CHECKED
                    .lock()
                    .ok()
                    .and_then(|m| m.as_ref().and_then(|m| m.get(&expr).cloned()));
                let checked = match known {
                    Some(outcome) => outcome,
                    None => {
                        let outcome = slots.check_fires(&expr);
                        if let Ok(mut m) = CHECKED.lock() {
                            let m = m.get_or_insert_with(Default::default);
                            if m.len() >= 4096 {
                                m.clear();
                            }
                            m.insert(expr.clone(), outcome.clone());
                        }
                        outcome
                    }
                };
                checked.map(|()| slots)
            }
        }
    }

    /// Refuses a cron schedule that never fires, or fires twice within
    /// [`crate::crd::MIN_INTERVAL`]. Every day it fires, it fires at the same times of day (the
    /// minute and hour fields do not depend on the day), so the times of one firing day give
    /// the gaps within a day; the gap across midnight is checked for every firing day of a leap
    /// year (every month, day of the month and weekday — the 29th of February included).
    fn check_fires(&self, expr: &str) -> Result<(), SlotsError> {
        const FROM: i64 = 1_704_067_200; // 2024-01-01T00:00:00Z, a leap year's first day
        const DAY: i64 = 86_400;
        let min = i64::try_from(crate::crd::MIN_INTERVAL.as_secs()).unwrap_or(900);
        let at = |s: i64| Timestamp::from_second(s).ok();
        let never = || SlotsError::CronNeverFires(expr.to_string());
        let too_close = |a: Timestamp, b: Timestamp| {
            (b.as_second() - a.as_second() < min)
                .then(|| SlotsError::CronTooFrequent(expr.to_string(), a, b))
        };
        // Over four years: a schedule of the 29th of February fires only in leap years.
        let first = at(FROM - 1)
            .and_then(|t| self.next_after(t))
            .filter(|f| f.as_second() < FROM + 4 * 366 * DAY)
            .ok_or_else(never)?;
        // Within a day: the fires of the first firing day.
        let day_end = first.as_second().div_euclid(DAY) * DAY + DAY;
        let mut last = first;
        while let Some(next) = self.next_after(last).filter(|n| n.as_second() < day_end) {
            if let Some(e) = too_close(last, next) {
                return Err(e);
            }
            last = next;
        }
        // Across midnight: each firing day's last fire and the next fire after it.
        let mut from = at(FROM - 1);
        while let Some(fire) = from.and_then(|t| self.next_after(t)) {
            if fire.as_second() >= FROM + 366 * DAY {
                break;
            }
            let end = fire.as_second().div_euclid(DAY) * DAY + DAY;
            let Some(last) = at(end - 1).and_then(|t| self.last_at_or_before(t)) else {
                break;
            };
            if let Some(next) = self.next_after(last)
                && let Some(e) = too_close(last, next)
            {
                return Err(e);
            }
            from = at(end - 1);
        }
        Ok(())
    }

    /// The schedule in words, as `status.frequency` shows it.
    pub fn frequency(&self) -> String {
        match self {
            Slots::Interval(d) => format!("every {}", Schedule::Interval(*d)),
            Slots::Cron(_, expr) => format!("cron {expr} (UTC)"),
        }
    }

    /// The latest slot at or before `now`.
    pub fn last_at_or_before(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            Slots::Interval(d) => {
                let step = i64::try_from(d.as_secs()).ok()?.max(1);
                Timestamp::from_second(now.as_second().div_euclid(step) * step).ok()
            }
            Slots::Cron(cron, _) => cron
                .find_previous_occurrence(&to_chrono(now), true)
                .ok()
                .map(from_chrono),
        }
    }

    /// The first slot strictly after `now`.
    pub fn next_after(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            Slots::Interval(d) => {
                let step = i64::try_from(d.as_secs()).ok()?.max(1);
                Timestamp::from_second((now.as_second().div_euclid(step) + 1) * step).ok()
            }
            Slots::Cron(cron, _) => cron
                .find_next_occurrence(&to_chrono(now), false)
                .ok()
                .map(from_chrono),
        }
    }

    /// How long the slot of `now` lasts (from the slot at or before it to the next), for the
    /// Job's `activeDeadlineSeconds`, and never past the slot after next: a sync never blocks
    /// that one. A cron schedule's slots may be uneven (`0,15 * * * *`: the :15 sync has 45
    /// minutes, the :00 one 15): the gap after the *next* slot gave the :15 sync 15 minutes,
    /// and syncs on time failed at their deadline.
    pub fn period(&self, now: Timestamp) -> Duration {
        match self {
            Slots::Interval(d) => *d,
            Slots::Cron(..) => {
                let secs = |from: Timestamp, to: Timestamp| {
                    Duration::from_secs(
                        u64::try_from(to.duration_since(from).as_secs()).unwrap_or(0),
                    )
                };
                let next = self.next_after(now);
                let after = next.and_then(|n| self.next_after(n));
                let slot = next.and_then(|n| self.last_at_or_before(now).map(|l| secs(l, n)));
                match (slot, after) {
                    (Some(slot), Some(after)) => slot.min(secs(now, after)),
                    _ => Duration::from_secs(3600),
                }
            }
        }
    }
}

/// Where a sync Job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    /// Created and not finished.
    Active,
    /// Finished with the `Complete` condition.
    Succeeded,
    /// Finished with the `Failed` condition.
    Failed,
}

/// What the planner needs to know about one sync Job of the connection.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    /// The Job's name.
    pub name: String,
    /// The slot it was created for (its `profilesync.dev/slot` annotation).
    pub slot: Option<Timestamp>,
    /// Its phase.
    pub phase: JobPhase,
    /// The `profilesync.dev/sync-now` value it answered, for a manual sync.
    pub sync_now: Option<String>,
    /// When it was created (`metadata.creationTimestamp`): manual syncs share their minute's
    /// slot, and their names end in a hash, so this orders them.
    pub created: Option<Timestamp>,
}

/// Why a Job was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The first sync, right after the connection verified.
    First,
    /// A schedule slot, on time.
    Scheduled,
    /// A schedule slot that was missed (controller down or a sync running) and is run late, once.
    CatchUp,
    /// The `profilesync.dev/sync-now` annotation.
    Manual,
}

impl Trigger {
    /// The value of the Job's `profilesync.dev/trigger` annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::First => "First",
            Trigger::Scheduled => "Scheduled",
            Trigger::CatchUp => "CatchUp",
            Trigger::Manual => "Manual",
        }
    }
}

/// A sync Job to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewSync {
    /// The slot (a schedule slot, or the minute of a first or manual sync).
    pub slot: Timestamp,
    /// The Job's deterministic name.
    pub name: String,
    /// Why.
    pub trigger: Trigger,
}

/// Why a sync that is due was not started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// `spec.suspend` is true.
    Suspended,
    /// A sync Job is still running (concurrency `Forbid`).
    JobRunning(String),
    /// The connection test has not passed.
    ConnectionNotVerified,
    /// The SelectiveSync for the connection is invalid.
    SelectionInvalid,
    /// A Job for this minute exists already (a manual sync waits for the next minute).
    SlotTaken(String),
}

/// The planner's input: the connection as observed, and `now`.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    /// The injected clock's reading.
    pub now: Timestamp,
    /// The connection's name (Jobs are named after it).
    pub connection: &'a str,
    /// Its parsed schedule.
    pub slots: &'a Slots,
    /// `spec.suspend`.
    pub suspended: bool,
    /// Whether `ConnectionVerified` is True for the current generation.
    pub verified: bool,
    /// Whether the SelectiveSync (if any) is valid.
    pub selection_valid: bool,
    /// The connection's sync Jobs.
    pub jobs: &'a [JobView],
    /// Names of the finished Jobs whose result the status needs no more: folded into
    /// `status.syncs` (persisted), or left out of it as older than every record it keeps.
    pub folded: &'a [String],
    /// Whether any sync was ever recorded (`status.syncs` non-empty or `lastSyncTime` set).
    pub ever_synced: bool,
    /// `status.lastSyncTime`.
    pub last_sync_time: Option<Timestamp>,
    /// The `profilesync.dev/sync-now` annotation's value.
    pub sync_now: Option<&'a str>,
}

/// What to do for one connection now.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    /// The Job to start.
    pub create: Option<NewSync>,
    /// Why a due sync was not started.
    pub blocked: Option<Blocked>,
    /// Finished Jobs beyond the history limits, to delete (background propagation).
    pub prune: Vec<String>,
    /// Whether the sync-now annotation has been answered (by `create` or an earlier Job) and can be removed.
    pub ack_sync_now: bool,
    /// When the next scheduled sync is due (None while suspended).
    pub next_sync: Option<Timestamp>,
    /// When to reconcile again at the latest.
    pub requeue_after: Duration,
}

/// The deterministic Job name for a slot: `<connection>-<unix-minutes>`; a manual sync appends
/// `-now-<hash of the sync-now value>` (one name per request, never the schedule's name).
/// A connection name with a dot (not allowed in a Job name) has its dots turned into dashes and
/// a hash of the full name added, so that `web.prod` and `web-prod` never share a Job name; so
/// has one too long for 63 characters, shortened.
pub fn job_name(connection: &str, slot: Timestamp, request: Option<&str>) -> String {
    let mut minutes = slot.as_second().div_euclid(60).to_string();
    if let Some(value) = request {
        minutes.push_str(&format!("-now-{:08x}", fnv1a(value.as_bytes())));
    }
    let full = format!("{connection}-{minutes}");
    if full.len() <= MAX_NAME_LEN && !connection.contains('.') {
        return full;
    }
    let hash = fnv1a(connection.as_bytes());
    before_suffix(
        &connection.replace('.', "-"),
        &format!("-{hash:08x}-{minutes}"),
    )
}

/// The value of a connection's label ([`crate::controller::build::LABEL_CONNECTION`]): its name,
/// or, when that is longer than a label value may be (63 characters; a connection's name may
/// have 253), its first characters and a hash of the whole name.
pub fn connection_label(connection: &str) -> String {
    if connection.len() <= MAX_NAME_LEN {
        return connection.to_string();
    }
    before_suffix(
        connection,
        &format!("-{:08x}", fnv1a(connection.as_bytes())),
    )
}

/// `base` cut to leave room for `suffix` within [`MAX_NAME_LEN`], without the dashes or dots
/// the cut leaves at its end (a name or label value ends in a letter or digit), then `suffix`.
fn before_suffix(base: &str, suffix: &str) -> String {
    let keep = MAX_NAME_LEN - suffix.len();
    let prefix = base[..floor_char_boundary(base, keep)].trim_end_matches(['-', '.']);
    format!("{prefix}{suffix}")
}

/// 32-bit FNV-1a: stable across Rust releases (unlike `DefaultHasher`), so names stay put.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The minute `t` falls in (first and manual syncs are named after it).
pub fn minute_of(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second().div_euclid(60) * 60).unwrap_or(t)
}

fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::from_secs(u64::try_from(t.duration_since(now).as_secs()).unwrap_or(0))
}

/// Plans one reconcile of a live (not deleting) connection.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let now = input.now;
    let mut plan = Plan {
        prune: prune(input.jobs, input.folded),
        next_sync: (!input.suspended)
            .then(|| input.slots.next_after(now))
            .flatten(),
        ..Plan::default()
    };
    let active = input.jobs.iter().find(|j| j.phase == JobPhase::Active);
    // A sync-now request is answered once a Job carries its value (even a finished one).
    let pending_manual = input
        .sync_now
        .filter(|v| !input.jobs.iter().any(|j| j.sync_now.as_deref() == Some(*v)));
    plan.ack_sync_now = input.sync_now.is_some() && pending_manual.is_none();

    let last_run = input
        .jobs
        .iter()
        .filter_map(|j| j.slot)
        .chain(input.last_sync_time)
        .max();
    let due_slot = input.slots.last_at_or_before(now);
    let candidate = if pending_manual.is_some() {
        Some((minute_of(now), Trigger::Manual))
    } else if !input.ever_synced && input.jobs.is_empty() {
        Some((minute_of(now), Trigger::First))
    } else {
        match (due_slot, last_run) {
            (Some(due), Some(last)) if due > last => {
                let late = now.duration_since(due) > jiff::SignedDuration::from_secs(60)
                    || active.is_some();
                Some((
                    due,
                    if late {
                        Trigger::CatchUp
                    } else {
                        Trigger::Scheduled
                    },
                ))
            }
            (Some(due), None) => Some((due, Trigger::Scheduled)),
            _ => None,
        }
    };

    let mut requeue = plan
        .next_sync
        .map(|n| until(now, n) + Duration::from_secs(1))
        .unwrap_or(MAX_REQUEUE);
    if let Some((slot, trigger)) = candidate {
        let name = job_name(
            input.connection,
            slot,
            pending_manual.filter(|_| trigger == Trigger::Manual),
        );
        plan.blocked = if input.suspended {
            Some(Blocked::Suspended)
        } else if let Some(job) = active {
            Some(Blocked::JobRunning(job.name.clone()))
        } else if !input.verified {
            Some(Blocked::ConnectionNotVerified)
        } else if !input.selection_valid {
            Some(Blocked::SelectionInvalid)
        } else if input.jobs.iter().any(|j| j.name == name) {
            // A request whose value a Job older than the request memory answered, in this very
            // minute: it waits for the next minute.
            let next_minute = minute_of(now) + jiff::SignedDuration::from_secs(60);
            requeue = requeue.min(until(now, next_minute) + Duration::from_secs(1));
            Some(Blocked::SlotTaken(name.clone()))
        } else {
            None
        };
        if plan.blocked.is_none() {
            plan.create = Some(NewSync {
                slot,
                name,
                trigger,
            });
            plan.ack_sync_now = input.sync_now.is_some();
        }
    }
    plan.requeue_after = requeue.clamp(Duration::from_secs(1), MAX_REQUEUE);
    plan
}

/// Finished Jobs beyond the history limits (3 succeeded, 1 failed), newest kept. Only Jobs whose
/// result the status is done with (`folded`: in the persisted `status.syncs`, or too old for
/// it) are pruned, so no report is lost.
pub fn prune(jobs: &[JobView], folded: &[String]) -> Vec<String> {
    let mut out = vec![];
    for (phase, keep) in [
        (JobPhase::Succeeded, SUCCEEDED_HISTORY),
        (JobPhase::Failed, FAILED_HISTORY),
    ] {
        let mut finished: Vec<&JobView> = jobs.iter().filter(|j| j.phase == phase).collect();
        // Newest first: by slot, then by creation (manual syncs of one minute share its slot,
        // and their names end in a hash), then by name.
        finished.sort_by(|a, b| {
            b.slot
                .cmp(&a.slot)
                .then_with(|| b.created.cmp(&a.created))
                .then_with(|| b.name.cmp(&a.name))
        });
        out.extend(
            finished
                .into_iter()
                .skip(keep)
                .filter(|j| folded.contains(&j.name))
                .map(|j| j.name.clone()),
        );
    }
    out
}

/// What deleting a connection does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// A sync is still running and the grace period has not passed: look again after this long.
    WaitForJob {
        /// The running Job.
        job: String,
        /// When to look again.
        requeue_after: Duration,
    },
    /// Delete these Jobs (running ones are cancelled), their ConfigMaps, then drop the finalizer.
    Cleanup {
        /// Every Job of the connection.
        delete: Vec<String>,
    },
}

/// Plans the cleanup of a connection being deleted since `deleted_at`.
pub fn plan_deletion(now: Timestamp, deleted_at: Timestamp, jobs: &[JobView]) -> Deletion {
    let deadline = deleted_at + jiff::SignedDuration::from_secs(DELETION_GRACE.as_secs() as i64);
    match jobs.iter().find(|j| j.phase == JobPhase::Active) {
        Some(job) if now < deadline => Deletion::WaitForJob {
            job: job.name.clone(),
            requeue_after: until(now, deadline)
                .clamp(Duration::from_secs(1), Duration::from_secs(15)),
        },
        _ => Deletion::Cleanup {
            delete: jobs.iter().map(|j| j.name.clone()).collect(),
        },
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
