//! Scheduling over simulated time: a small world holds the connection's Jobs and status, the
//! planner runs at chosen instants, and the world applies the plan as the controller would.

use super::*;

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn hourly() -> Slots {
    Slots::parse("1h").unwrap()
}

/// The connection's observable state, advanced by applying plans.
struct World {
    slots: Slots,
    jobs: Vec<JobView>,
    folded: Vec<String>,
    last_sync_time: Option<Timestamp>,
    suspended: bool,
    verified: bool,
    selection_valid: bool,
    sync_now: Option<String>,
}

impl World {
    fn new(slots: Slots) -> World {
        World {
            slots,
            jobs: vec![],
            folded: vec![],
            last_sync_time: None,
            suspended: false,
            verified: true,
            selection_valid: true,
            sync_now: None,
        }
    }

    /// Plans at `now` and applies the plan (create, prune, acknowledge).
    fn step(&mut self, now: &str) -> Plan {
        let now = t(now);
        let plan = plan(&PlanInput {
            now,
            connection: "analytics",
            slots: &self.slots,
            suspended: self.suspended,
            verified: self.verified,
            selection_valid: self.selection_valid,
            jobs: &self.jobs,
            folded: &self.folded,
            ever_synced: !self.folded.is_empty() || self.last_sync_time.is_some(),
            last_sync_time: self.last_sync_time,
            sync_now: self.sync_now.as_deref(),
        });
        if let Some(new) = &plan.create {
            self.jobs.push(JobView {
                name: new.name.clone(),
                slot: Some(new.slot),
                phase: JobPhase::Active,
                sync_now: (new.trigger == Trigger::Manual)
                    .then(|| self.sync_now.clone())
                    .flatten(),
                created: Some(now),
            });
            self.last_sync_time = Some(now);
        }
        self.jobs.retain(|j| !plan.prune.contains(&j.name));
        if plan.ack_sync_now {
            self.sync_now = None;
        }
        plan
    }

    /// Finishes the running Job and folds it into the status.
    fn finish(&mut self, phase: JobPhase) -> String {
        let job = self
            .jobs
            .iter_mut()
            .find(|j| j.phase == JobPhase::Active)
            .expect("a running Job");
        job.phase = phase;
        self.folded.push(job.name.clone());
        job.name.clone()
    }

    fn created(plan: &Plan) -> Option<(String, Trigger)> {
        plan.create
            .as_ref()
            .map(|c| (c.slot.to_string(), c.trigger))
    }
}

#[test]
fn the_first_sync_starts_right_after_verification_then_one_per_slot() {
    let mut w = World::new(hourly());
    w.verified = false;
    let p = w.step("2025-03-01T10:17:30Z");
    assert_eq!(p.create, None);
    assert_eq!(p.blocked, Some(Blocked::ConnectionNotVerified));
    assert_eq!(p.next_sync, Some(t("2025-03-01T11:00:00Z")));

    w.verified = true;
    let p = w.step("2025-03-01T10:17:45Z");
    let first = p.create.clone().unwrap();
    assert_eq!(first.trigger, Trigger::First);
    assert_eq!(first.slot, t("2025-03-01T10:17:00Z"));
    assert_eq!(
        first.name,
        format!("analytics-{}", t("2025-03-01T10:17:00Z").as_second() / 60)
    );
    w.finish(JobPhase::Succeeded);

    // Nothing until the next hour, then exactly one Job for it.
    assert_eq!(w.step("2025-03-01T10:59:59Z").create, None);
    let p = w.step("2025-03-01T11:00:02Z");
    assert_eq!(
        World::created(&p),
        Some(("2025-03-01T11:00:00Z".into(), Trigger::Scheduled))
    );
    w.finish(JobPhase::Succeeded);
    assert_eq!(w.step("2025-03-01T11:30:00Z").create, None);
}

#[test]
fn slot_boundaries_are_aligned_to_the_epoch_and_requeue_lands_on_them() {
    let w = World::new(Slots::parse("15m").unwrap());
    let slots = &w.slots;
    assert_eq!(
        slots.last_at_or_before(t("2025-03-01T10:14:59Z")),
        Some(t("2025-03-01T10:00:00Z"))
    );
    assert_eq!(
        slots.last_at_or_before(t("2025-03-01T10:15:00Z")),
        Some(t("2025-03-01T10:15:00Z"))
    );
    assert_eq!(
        slots.next_after(t("2025-03-01T10:15:00Z")),
        Some(t("2025-03-01T10:30:00Z"))
    );
    let mut w = World::new(hourly());
    w.step("2025-03-01T09:10:00Z");
    w.finish(JobPhase::Succeeded);
    let p = w.step("2025-03-01T09:40:00Z");
    assert_eq!(
        p.requeue_after,
        Duration::from_secs(20 * 60 + 1),
        "wake just after 10:00"
    );
}

#[test]
fn cron_schedules_run_in_utc() {
    let slots = Slots::parse("30 */2 * * *").unwrap();
    assert_eq!(
        slots.next_after(t("2025-03-01T10:31:00Z")),
        Some(t("2025-03-01T12:30:00Z"))
    );
    assert_eq!(
        slots.last_at_or_before(t("2025-03-01T12:30:00Z")),
        Some(t("2025-03-01T12:30:00Z"))
    );
    assert_eq!(
        slots.period(t("2025-03-01T10:31:00Z")),
        Duration::from_secs(7200)
    );
    assert_eq!(slots.frequency(), "cron 30 */2 * * * (UTC)");
    // Uneven slots: each sync gets its own slot's length, never past the slot after next.
    let uneven = Slots::parse("0,15 * * * *").unwrap();
    let minutes = |at: &str| uneven.period(t(at)).as_secs() / 60;
    assert_eq!(minutes("2025-03-01T10:15:00Z"), 45);
    assert_eq!(minutes("2025-03-01T11:00:00Z"), 15);
    // A manual sync at 10:50: the slot after next is 11:15.
    assert_eq!(minutes("2025-03-01T10:50:00Z"), 25);
    let twice = Slots::parse("30 9,10 * * *").unwrap();
    assert_eq!(twice.period(t("2025-03-01T10:30:00Z")).as_secs(), 23 * 3600);
    assert_eq!(twice.period(t("2025-03-01T09:30:00Z")).as_secs(), 3600);
    let daily = Slots::parse("@daily").unwrap();
    assert_eq!(
        daily.next_after(t("2025-03-01T10:31:00Z")),
        Some(t("2025-03-02T00:00:00Z"))
    );
    assert!(matches!(
        Slots::parse("a b c d e"),
        Err(SlotsError::Cron(..))
    ));
    assert!(matches!(Slots::parse("5m"), Err(SlotsError::Schedule(_))));
}

/// Cron schedules are held to the interval's 15-minute floor: every fire, on every day of the
/// year, at least 15 minutes after the last (only eight days were looked at: `*/5 * 15 * *`
/// ran a sync every 5 minutes on the 15th); a schedule that never fires is refused, and
/// `@midnight`, which the CRD accepts, works.
#[test]
fn cron_schedules_that_fire_within_15_minutes_are_refused() {
    for ok in [
        "*/15 * * * *",
        "0,15,30,45 * * * *",
        "0 9 * * 1-5",
        "@hourly",
        "@midnight",
        "50 23 * * *",
        // Late and early on the 15th only: the next fire after 23:50 is a month later.
        "0,50 0,23 15 * *",
        "0 0 29 2 *",
    ] {
        assert!(
            Slots::parse(ok).is_ok(),
            "{ok}: {:?}",
            Slots::parse(ok).err()
        );
    }
    let midnight = Slots::parse("@midnight").unwrap();
    assert_eq!(
        midnight.next_after(t("2025-03-01T10:00:00Z")),
        Some(t("2025-03-02T00:00:00Z"))
    );
    for (bad, first, second) in [
        ("* * * * *", "2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"),
        (
            "*/5 * * * *",
            "2024-01-01T00:00:00Z",
            "2024-01-01T00:05:00Z",
        ),
        // Only in one hour of one weekday.
        (
            "0,10 9 * * 3",
            "2024-01-03T09:00:00Z",
            "2024-01-03T09:10:00Z",
        ),
        // Only on one day of the month, or of a leap year.
        (
            "*/5 * 15 * *",
            "2024-01-15T00:00:00Z",
            "2024-01-15T00:05:00Z",
        ),
        (
            "*/5 * 29 2 *",
            "2024-02-29T00:00:00Z",
            "2024-02-29T00:05:00Z",
        ),
        // Across midnight.
        (
            "0,55 0,23 * * *",
            "2024-01-01T23:55:00Z",
            "2024-01-02T00:00:00Z",
        ),
    ] {
        match Slots::parse(bad) {
            Err(SlotsError::CronTooFrequent(expr, a, b)) => {
                assert_eq!((expr.as_str(), a, b), (bad, t(first), t(second)));
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    let why = Slots::parse("*/5 * * * *").unwrap_err().to_string();
    assert!(why.contains("at least 15m apart"), "{why}");
    assert_eq!(
        Slots::parse("0 0 30 2 *").err(),
        Some(SlotsError::CronNeverFires("0 0 30 2 *".into()))
    );
}

#[test]
fn after_downtime_only_the_latest_missed_slot_runs_once() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T08:05:00Z");
    w.finish(JobPhase::Succeeded);
    // The controller was down from 08:10 to 12:20: slots 09, 10, 11 and 12 were missed.
    let p = w.step("2025-03-01T12:20:00Z");
    assert_eq!(
        World::created(&p),
        Some(("2025-03-01T12:00:00Z".into(), Trigger::CatchUp))
    );
    w.finish(JobPhase::Succeeded);
    for now in [
        "2025-03-01T12:21:00Z",
        "2025-03-01T12:40:00Z",
        "2025-03-01T12:59:00Z",
    ] {
        assert_eq!(
            w.step(now).create,
            None,
            "no replay of the other missed slots at {now}"
        );
    }
    assert_eq!(w.jobs.len(), 2);
}

#[test]
fn a_running_job_forbids_a_second_and_the_missed_slot_runs_once_after_it() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T08:05:00Z");
    let p = w.step("2025-03-01T09:00:01Z");
    assert_eq!(p.create, None);
    assert!(matches!(p.blocked, Some(Blocked::JobRunning(_))));
    let p = w.step("2025-03-01T10:00:01Z");
    assert_eq!(p.create, None, "still running at the next slot");
    w.finish(JobPhase::Succeeded);
    let p = w.step("2025-03-01T10:20:00Z");
    assert_eq!(
        World::created(&p),
        Some(("2025-03-01T10:00:00Z".into(), Trigger::CatchUp))
    );
    w.finish(JobPhase::Succeeded);
    assert_eq!(w.step("2025-03-01T10:30:00Z").create, None);
}

#[test]
fn suspend_stops_new_jobs_and_resume_runs_the_current_slot_once() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T08:05:00Z");
    w.suspended = true;
    // A running sync is left alone while suspended.
    let p = w.step("2025-03-01T08:06:00Z");
    assert_eq!((p.create.clone(), p.prune.clone()), (None, vec![]));
    assert_eq!(p.next_sync, None, "no next sync while suspended");
    w.finish(JobPhase::Succeeded);
    for now in [
        "2025-03-01T09:00:01Z",
        "2025-03-01T10:00:01Z",
        "2025-03-01T11:00:01Z",
    ] {
        let p = w.step(now);
        assert_eq!(p.create, None);
        assert_eq!(p.blocked, Some(Blocked::Suspended));
    }
    w.suspended = false;
    let p = w.step("2025-03-01T11:10:00Z");
    assert_eq!(
        World::created(&p),
        Some(("2025-03-01T11:00:00Z".into(), Trigger::CatchUp))
    );
    assert_eq!(p.next_sync, Some(t("2025-03-01T12:00:00Z")));
}

#[test]
fn history_keeps_three_succeeded_and_one_failed_job_once_folded() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T00:05:00Z");
    w.finish(JobPhase::Failed);
    for h in 1..=5 {
        w.step(&format!("2025-03-01T{h:02}:00:01Z"));
        w.finish(if h == 3 {
            JobPhase::Failed
        } else {
            JobPhase::Succeeded
        });
    }
    w.step("2025-03-01T05:30:00Z");
    let minutes = |h: &str| format!("analytics-{}", t(h).as_second() / 60);
    let mut names: Vec<String> = w.jobs.iter().map(|j| j.name.clone()).collect();
    names.sort();
    let mut want: Vec<String> = ["02", "03", "04", "05"]
        .iter()
        .map(|h| minutes(&format!("2025-03-01T{h}:00:00Z")))
        .collect();
    want.sort();
    assert_eq!(names, want);
    let failed: Vec<_> = w
        .jobs
        .iter()
        .filter(|j| j.phase == JobPhase::Failed)
        .collect();
    let succeeded: Vec<_> = w
        .jobs
        .iter()
        .filter(|j| j.phase == JobPhase::Succeeded)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].name,
        minutes("2025-03-01T03:00:00Z"),
        "the newest failure is kept"
    );
    assert_eq!(succeeded.len(), 3);

    // A finished Job not yet folded into the status is never pruned.
    let jobs: Vec<JobView> = (0..6)
        .map(|i| JobView {
            name: format!("j{i}"),
            slot: Some(t("2025-03-01T00:00:00Z") + jiff::SignedDuration::from_hours(i)),
            phase: JobPhase::Succeeded,
            sync_now: None,
            created: None,
        })
        .collect();
    assert_eq!(prune(&jobs, &["j0".into()]), vec!["j0".to_string()]);
    assert_eq!(prune(&jobs, &[]), Vec::<String>::new());
}

#[test]
fn sync_now_runs_one_sync_and_is_acknowledged() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T08:05:00Z");
    w.finish(JobPhase::Succeeded);
    w.sync_now = Some("2025-03-01T08:20".into());
    let p = w.step("2025-03-01T08:20:10Z");
    assert_eq!(
        World::created(&p),
        Some(("2025-03-01T08:20:00Z".into(), Trigger::Manual))
    );
    assert!(p.ack_sync_now);
    assert_eq!(w.sync_now, None);
    w.finish(JobPhase::Succeeded);
    assert_eq!(w.step("2025-03-01T08:30:00Z").create, None, "no loop");
    // The scheduled slot still runs.
    assert!(w.step("2025-03-01T09:00:01Z").create.is_some());
}

#[test]
fn sync_now_waits_for_a_running_job_and_for_resume() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T08:05:00Z");
    w.sync_now = Some("1".into());
    let p = w.step("2025-03-01T08:06:00Z");
    assert!(matches!(p.blocked, Some(Blocked::JobRunning(_))));
    assert!(!p.ack_sync_now, "kept until it can run");
    w.finish(JobPhase::Succeeded);
    w.suspended = true;
    assert_eq!(
        w.step("2025-03-01T08:07:00Z").blocked,
        Some(Blocked::Suspended)
    );
    w.suspended = false;
    let p = w.step("2025-03-01T08:08:30Z");
    assert_eq!(p.create.as_ref().map(|c| c.trigger), Some(Trigger::Manual));
    // A Job already answered the value (the controller stopped before removing the annotation).
    w.finish(JobPhase::Succeeded);
    w.sync_now = Some("1".into());
    let p = w.step("2025-03-01T08:09:00Z");
    assert_eq!(p.create, None);
    assert!(p.ack_sync_now);
}

#[test]
fn manual_syncs_never_collide_with_the_schedule_or_each_other() {
    let mut w = World::new(hourly());
    w.step("2025-03-01T08:05:00Z");
    w.finish(JobPhase::Succeeded);
    w.sync_now = Some("x".into());
    let p = w.step("2025-03-01T08:05:20Z");
    assert_eq!(
        p.create.as_ref().map(|c| c.trigger),
        Some(Trigger::Manual),
        "same minute as the first sync"
    );
    w.finish(JobPhase::Succeeded);
    w.sync_now = Some("y".into());
    let p = w.step("2025-03-01T08:05:40Z");
    assert_eq!(
        p.create.as_ref().map(|c| c.trigger),
        Some(Trigger::Manual),
        "a second request, same minute"
    );
    assert_eq!(w.jobs.len(), 3);
}

#[test]
fn an_invalid_selection_blocks_syncs() {
    let mut w = World::new(hourly());
    w.selection_valid = false;
    let p = w.step("2025-03-01T08:05:00Z");
    assert_eq!(
        (p.create, p.blocked),
        (None, Some(Blocked::SelectionInvalid))
    );
}

#[test]
fn job_names_are_deterministic_and_fit_63_characters() {
    let slot = t("2025-03-01T10:00:00Z");
    assert_eq!(job_name("analytics", slot, None), "analytics-29013720");
    let long = "a".repeat(70);
    let name = job_name(&long, slot, None);
    assert!(name.len() <= MAX_NAME_LEN, "{name}");
    assert_eq!(name, job_name(&long, slot, None), "same input, same name");
    assert!(name.ends_with("-29013720"));
    let other = job_name(&format!("{}b", "a".repeat(69)), slot, None);
    assert_ne!(name, other, "the hash tells long names apart");
    // A dot is not allowed in a Job name: `web.prod` and `web-prod` must still differ.
    let dotted = job_name("web.prod", slot, None);
    assert!(
        dotted.starts_with("web-prod-") && dotted.ends_with("-29013720"),
        "{dotted}"
    );
    assert_ne!(dotted, job_name("web-prod", slot, None));
    assert!(!dotted.contains('.'));
    let manual = job_name("analytics", slot, Some("1"));
    assert!(
        manual.starts_with("analytics-29013720-now-")
            && manual.len() == "analytics-29013720-now-".len() + 8,
        "{manual}"
    );
    assert_ne!(
        manual,
        job_name("analytics", slot, Some("2")),
        "one name per request"
    );
    let manual = job_name(&long, slot, Some("1"));
    assert!(
        manual.len() <= MAX_NAME_LEN && manual.contains("-29013720-now-"),
        "{manual}"
    );
}

#[test]
fn deletion_waits_for_a_running_job_up_to_the_grace_period_then_cancels_it() {
    let deleted = t("2025-03-01T10:00:00Z");
    let running = vec![
        JobView {
            name: "a".into(),
            slot: None,
            phase: JobPhase::Active,
            sync_now: None,
            created: None,
        },
        JobView {
            name: "b".into(),
            slot: None,
            phase: JobPhase::Succeeded,
            sync_now: None,
            created: None,
        },
    ];
    assert!(matches!(
        plan_deletion(t("2025-03-01T10:05:00Z"), deleted, &running),
        Deletion::WaitForJob { ref job, .. } if job == "a"
    ));
    assert_eq!(
        plan_deletion(t("2025-03-01T10:10:00Z"), deleted, &running),
        Deletion::Cleanup {
            delete: vec!["a".into(), "b".into()]
        }
    );
    assert_eq!(
        plan_deletion(deleted, deleted, &running[1..]),
        Deletion::Cleanup {
            delete: vec!["b".into()]
        },
        "nothing running: clean up at once"
    );
}

#[test]
fn connection_labels_are_valid_label_values_and_tell_long_names_apart() {
    assert_eq!(connection_label("analytics"), "analytics");
    assert_eq!(connection_label("web.prod"), "web.prod");
    let at_limit = "a".repeat(MAX_NAME_LEN);
    assert_eq!(connection_label(&at_limit), at_limit);
    // Names may have 253 characters; a label value 63, alphanumeric at both ends.
    let long = format!("{}.{}", "a".repeat(60), "b".repeat(100));
    let label = connection_label(&long);
    assert!(label.len() <= MAX_NAME_LEN, "{label}");
    assert!(label.starts_with(&"a".repeat(54)), "{label}");
    assert!(
        label
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric()),
        "{label}"
    );
    // Cut right after a dot: the dot goes, a label value may not have it before the hash.
    let dotted = format!("{}.{}", "a".repeat(53), "b".repeat(20));
    let cut = connection_label(&dotted);
    assert!(cut.starts_with(&format!("{}-", "a".repeat(53))), "{cut}");
    assert_eq!(cut.len(), 53 + 9, "{cut}");
    assert_eq!(label, connection_label(&long), "same name, same label");
    assert_ne!(label, connection_label(&format!("{long}c")));
}

/// Manual syncs of one minute share its slot and their names end in a hash: pruning keeps the
/// newest three by creation (it went by name, and kept older Jobs than it deleted).
#[test]
fn pruning_keeps_the_newest_manual_jobs_of_one_minute() {
    let slot = t("2025-03-01T10:07:00Z");
    // Names in an order unrelated to their creation, as hashes are.
    let names = [
        "c-29-9f", "c-29-1a", "c-29-e3", "c-29-07", "c-29-b2", "c-29-55",
    ];
    let jobs: Vec<JobView> = names
        .iter()
        .enumerate()
        .map(|(i, name)| JobView {
            name: (*name).into(),
            slot: Some(slot),
            phase: JobPhase::Succeeded,
            sync_now: Some(format!("w{i}")),
            created: Some(slot + jiff::SignedDuration::from_secs(i as i64 * 5)),
        })
        .collect();
    let folded: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut pruned = prune(&jobs, &folded);
    pruned.sort();
    let mut oldest: Vec<String> = names[..3].iter().map(|n| n.to_string()).collect();
    oldest.sort();
    assert_eq!(pruned, oldest);
}
