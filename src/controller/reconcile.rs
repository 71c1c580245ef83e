//! One reconcile of a WarehouseConnection: dereference → validate → plan → build → apply →
//! update status (then Events and metrics). Only the first and the last steps talk to the API.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use super::apply::{
    Written, annotation, cleanup, delete_job, ensure_config_map, patch_metadata, publish,
    remove_annotations, start_job, write_connection_status, write_selection_statuses,
};
use super::build::{self, ANNOTATION_SYNC_NOW, ANNOTATION_TEST_CONNECTION};
use super::connection_test::{self, TestMemory, TestOutcome};
use super::events::Note;
use super::plan::{self, JobPhase, Slots};
use super::status::{self, ConnectionFacts, FinishedJob, JobProgress};
use super::{Context, Error, FINALIZER, METRICS_CONTROLLER, RunningJob, conditions, observe};
use crate::crd::{SyncRecord, SyncStatus, WarehouseConnection, WarehouseConnectionStatus};
use crate::sync::SyncReport;

/// A manual sync request counts as answered by a Job with its value created this recently.
const SYNC_NOW_MEMORY: jiff::SignedDuration = jiff::SignedDuration::from_mins(10);

/// The controller's reconcile function (the `DynamicObject` is decoded here, see `mod.rs`).
pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile",
        namespace = %obj.namespace().unwrap_or_default(),
        connection = %obj.name_any()
    );
    let timer = ctx
        .metrics
        .reconcile_seconds
        .with_label_values(&[METRICS_CONTROLLER])
        .start_timer();
    ctx.metrics
        .reconciles
        .with_label_values(&[METRICS_CONTROLLER])
        .inc();
    let result = reconcile_object(&obj, &ctx).instrument(span).await;
    timer.observe_duration();
    result
}

async fn reconcile_object(obj: &DynamicObject, ctx: &Context) -> Result<Action, Error> {
    let conn: WarehouseConnection = match observe::decode(obj) {
        Ok(c) => c,
        Err(e) => {
            // Retrying can't fix a malformed object; its next change brings it back.
            tracing::warn!(error = %e, "skipping a WarehouseConnection that cannot be decoded");
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[METRICS_CONTROLLER, "Malformed"])
                .inc();
            return Ok(Action::await_change());
        }
    };
    if conn.meta().deletion_timestamp.is_some() {
        return cleanup(&conn, ctx).await;
    }
    if !conn.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = conn.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        let fields = serde_json::Map::from_iter([("finalizers".into(), json!(finalizers))]);
        patch_metadata(ctx, &conn, fields).await?;
        // The patch is a change: the next reconcile continues from the updated object.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    apply(&conn, ctx).await
}

/// The live path: test, fold, plan, apply, write status.
async fn apply(conn: &WarehouseConnection, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.now();
    let ns = conn.namespace().unwrap_or_default();
    let name = conn.name_any();
    let uid = conn.uid().unwrap_or_default();
    let generation = conn.metadata.generation.unwrap_or(0);
    let reference = conn.object_ref(&());
    let previous = conn.status.clone().unwrap_or_default();

    // Dereference.
    let jobs = observe::jobs(ctx, conn, observe::Listing::Cached).await?;
    // Jobs this process deleted itself (their ConfigMap refused) are gone, though a listing
    // behind the deletion (the watch cache) may show them a moment longer; once none does,
    // they are done with.
    // (Each Job by its key in the controller's memory, `namespace/name`.)
    let listed: Vec<String> = jobs
        .iter()
        .map(|j| format!("{ns}/{}", j.name_any()))
        .collect();
    let jobs: Vec<Job> = ctx.with_memory(|m| {
        m.cleaned
            .retain(|key, owner| *owner != uid || listed.contains(key));
        jobs.into_iter()
            .zip(&listed)
            .filter(|(_, key)| !m.cleaned.contains_key(*key))
            .map(|(j, _)| j)
            .collect()
    });
    let mut selections = observe::selections(ctx, conn, observe::Listing::Cached).await?;
    let secret = observe::secret(ctx, conn).await?;

    // Validate.
    let slots = Slots::parse(&conn.spec.schedule);

    // Connection test.
    let test_requested = annotation(conn, ANNOTATION_TEST_CONNECTION).map(String::from);
    let memory = ctx.with_memory(|m| m.tests.get(&uid).cloned());
    let newest_failed = previous
        .syncs
        .first()
        .filter(|s| s.status == SyncStatus::Failed)
        .map(|s| s.id.clone());
    let secret_version = secret
        .as_ref()
        .and_then(|s| s.metadata.resource_version.clone());
    let due = connection_test::test_due(&connection_test::TestInput {
        now,
        generation,
        condition: conditions::find(&previous.conditions, conditions::CONNECTION_VERIFIED),
        memory: memory.as_ref(),
        secret_version: secret_version.as_deref(),
        requested: test_requested.is_some(),
        failed_sync: newest_failed.as_deref(),
    });
    let mut tested: Option<TestOutcome> = None;
    if let Some(trigger) = due {
        // A type without a loader says so before its Secret's problems: fixing them would not
        // make it sync.
        let outcome = match connection_test::unsupported(&conn.spec) {
            Some(outcome) => outcome,
            None => match connection_test::credentials(&conn.spec, secret.as_ref()) {
                Ok(creds) => {
                    connection_test::run(&conn.spec, creds, ctx.settings.test_timeout).await
                }
                Err(outcome) => outcome,
            },
        };
        tracing::info!(?trigger, reason = outcome.reason.as_str(), detail = %outcome.message, "connection tested");
        ctx.metrics
            .connection_tests
            .with_label_values(&[outcome.reason.as_str()])
            .inc();
        ctx.with_memory(|m| {
            m.tests.insert(
                uid.clone(),
                TestMemory {
                    at: now,
                    generation,
                    secret_version: secret_version.clone(),
                    outcome: outcome.clone(),
                    failed_sync: newest_failed.clone(),
                },
            )
        });
        tested = Some(outcome);
    } else if let Some(mem) = &memory {
        // The last test's result is not in the status (the reconcile that ran it failed to
        // write it): it is written now, rather than the status contradicting it until the
        // next test — a passing one kept the syncs held back for 30 minutes.
        let shown = conditions::find(&previous.conditions, conditions::CONNECTION_VERIFIED)
            .map(|c| (c.status.as_str(), c.reason.as_str()));
        let status = if mem.outcome.ok() { "True" } else { "False" };
        if shown != Some((status, mem.outcome.reason.as_str())) {
            tested = Some(mem.outcome.clone());
        }
    }
    let verified = match &tested {
        Some(t) => t.ok(),
        None => conditions::find(&previous.conditions, conditions::CONNECTION_VERIFIED)
            .is_some_and(|c| c.status == "True" && c.observed_generation == Some(generation)),
    };

    // Fold finished Jobs that are not in the status yet.
    let recorded: Vec<String> = previous
        .syncs
        .iter()
        .filter_map(|s| s.job_name.clone())
        .collect();
    let mut new_records: Vec<(SyncRecord, Option<SyncReport>, Option<i64>)> = vec![];
    for job in jobs
        .iter()
        .filter(|j| observe::phase(j) != JobPhase::Active)
    {
        if recorded.contains(&job.name_any()) {
            continue;
        }
        let finished = observe::finished(ctx, job).await?;
        let (record, report) = status::record(&finished);
        // The generation of the selection its sync used — of this very object: one deleted and
        // created again (`kubectl replace --force`) starts at generation 1 again. (A Job of a
        // release before the uid was recorded is taken as it was.)
        let active_uid = selections
            .active
            .as_ref()
            .and_then(|s| s.metadata.uid.as_deref());
        let selection_generation = job
            .annotations()
            .get(build::ANNOTATION_SELECTION_GENERATION)
            .and_then(|g| g.parse().ok())
            .filter(|_| {
                job.annotations()
                    .get(build::ANNOTATION_SELECTION_UID)
                    .is_none_or(|uid| Some(uid.as_str()) == active_uid)
            });
        new_records.push((record, report, selection_generation));
    }
    // Jobs seen running that are gone, unrecorded: deleted before this process saw them end
    // (their history record was never written, and their sync vanished). Forgotten once the
    // status holds them.
    let vanished: Vec<(String, String, RunningJob)> = ctx.with_memory(|m| {
        m.running
            .iter()
            .filter(|(key, r)| r.connection == uid && !listed.contains(key))
            .filter_map(|(key, r)| {
                let job = key.strip_prefix(&format!("{ns}/"))?;
                (!recorded.iter().any(|d| d == job))
                    .then(|| (key.clone(), job.to_string(), r.clone()))
            })
            .collect()
    });
    for (_, job, seen) in &vanished {
        tracing::warn!(
            job,
            ran = seen.ran,
            "a sync Job was deleted before it was seen to end"
        );
        let (record, _) = status::record(&FinishedJob::deleted(job, seen.started, now, seen.ran));
        new_records.push((record, None, None));
    }
    let (syncs, added) = status::fold(
        &previous.syncs,
        new_records.iter().map(|r| r.0.clone()).collect(),
    );
    let newest = syncs
        .first()
        .filter(|s| added.iter().any(|a| a.job_name == s.job_name));
    let newest_report = newest
        .and_then(|s| new_records.iter().find(|r| r.0.job_name == s.job_name))
        .and_then(|r| r.1.as_ref().map(|rep| (rep, r.2)));
    // Whether the newest sync loaded another warehouse than the one the connection names now
    // (a Job started before `spec.warehouse` changed): its report says nothing of this one's
    // backfill.
    let destination = conn.spec.destination();
    let newest_elsewhere = newest
        .and_then(|s| s.job_name.as_deref())
        .and_then(|name| jobs.iter().find(|j| j.name_any() == name))
        .and_then(|j| j.annotations().get(build::ANNOTATION_DESTINATION))
        .is_some_and(|d| *d != destination);
    // Jobs the history is done with: those it records, and those whose record it left out, as
    // older than the ten it keeps (a record pushed out by newer ones leaves its Job unrecorded;
    // read again here, it is left out again). The history limits may prune either.
    let done: Vec<String> = recorded
        .iter()
        .cloned()
        .chain(
            new_records
                .iter()
                .filter(|r| !added.iter().any(|a| a.job_name == r.0.job_name))
                .filter_map(|r| r.0.job_name.clone()),
        )
        .collect();

    // Plan.
    let views: Vec<plan::JobView> = jobs
        .iter()
        .map(observe::job_view)
        .map(|mut v| {
            // An old Job's sync-now value no longer answers a new request with the same value.
            if v.phase != JobPhase::Active
                && v.slot
                    .is_some_and(|s| now.duration_since(s) > SYNC_NOW_MEMORY)
            {
                v.sync_now = None;
            }
            v
        })
        .collect();
    let sync_now = annotation(conn, ANNOTATION_SYNC_NOW);
    let plan_with = |selection_valid: bool| match &slots {
        Ok(slots) => Some(plan::plan(&plan::PlanInput {
            now,
            connection: &name,
            slots,
            suspended: conn.spec.suspend,
            verified,
            selection_valid,
            jobs: &views,
            folded: &done,
            ever_synced: !syncs.is_empty() || previous.last_sync_time.is_some(),
            last_sync_time: previous.last_sync_time.as_ref().map(|t| t.0),
            sync_now,
        })),
        Err(_) => None,
    };
    let mut the_plan = plan_with(selections.active_problem.is_none());
    if the_plan.as_ref().is_some_and(|p| p.create.is_some()) {
        // A Job takes the selection the API holds now, not the cache's: a SelectiveSync
        // applied with its connection may not have reached the cache yet.
        let fresh = observe::selections(ctx, conn, observe::Listing::Api).await?;
        if fresh.identity() != selections.identity() {
            tracing::info!("the SelectiveSyncs changed since the cache was read; planning again");
            selections = fresh;
            the_plan = plan_with(selections.active_problem.is_none());
        }
    }
    // A running sync Job the cache has not seen yet: the one the syncs wait for.
    let mut unseen_running: Option<String> = None;
    if the_plan.as_ref().is_some_and(|p| p.create.is_some())
        && ctx
            .caches
            .get()
            .is_some_and(|c| super::cache_ready(&c.jobs))
    {
        // Concurrency `Forbid` against the API too: the Job the reconcile before made may not
        // have reached the cache, and a manual sync (or the next slot's, under another name)
        // would run beside it. Only the connection's own Jobs, which the cache watches: its
        // catching up reconciles again.
        let listed = observe::jobs(ctx, conn, observe::Listing::Api).await?;
        let unseen = listed.iter().find(|j| {
            let key = format!("{ns}/{}", j.name_any());
            observe::phase(j) == JobPhase::Active
                && build::made_by_controller(&j.metadata)
                && observe::owned_by(j, conn)
                && j.metadata.deletion_timestamp.is_none()
                && !jobs.iter().any(|c| c.name_any() == j.name_any())
                && !ctx.with_memory(|m| m.cleaned.contains_key(&key))
        });
        if let Some(running) = unseen {
            tracing::info!(job = %running.name_any(), "a sync Job the cache has not seen yet is running; no other starts beside it");
            if let Some(p) = the_plan.as_mut() {
                // A manual sync waits: its annotation stays until a Job of it is made.
                if p.create
                    .take()
                    .is_some_and(|c| c.trigger == plan::Trigger::Manual)
                {
                    p.ack_sync_now = false;
                }
                p.blocked = Some(plan::Blocked::JobRunning(running.name_any()));
            }
            unseen_running = Some(running.name_any());
        }
    }

    // Build and apply.
    let mut notes: Vec<Note> = vec![];
    let mut active_job = views
        .iter()
        .find(|v| v.phase == JobPhase::Active)
        .map(|v| v.name.clone())
        .or(unseen_running);
    let mut last_started = jobs
        .iter()
        .filter_map(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .max();
    // A sync that could not be started, or a Job found without its ConfigMap, which the API
    // refused to make: said in the status and an Event, then returned, so that the reconcile
    // is retried (every 15 s). The status's words, and the error.
    let mut start_failure: Option<(String, Error)> = None;
    let mut adopt_failure: Option<(String, Error)> = None;
    for job in &jobs {
        let key = format!("{ns}/{}", job.name_any());
        // Active ones remembered (their going unseen is a deletion), finished ones forgotten.
        if observe::phase(job) == JobPhase::Active {
            let started = job
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .or(job.metadata.creation_timestamp.as_ref())
                .map(|t| t.0);
            ctx.with_memory(|m| {
                let seen = m.running.entry(key.clone()).or_insert_with(|| RunningJob {
                    connection: uid.clone(),
                    connection_name: name.clone(),
                    started,
                    ran: false,
                });
                seen.started = started;
            });
        } else {
            ctx.with_memory(|m| m.running.remove(&key));
        }
        let known = ctx.with_memory(|m| m.jobs.contains(&key));
        let orphan = !observe::owned_by(job, conn);
        if orphan {
            let mut owners = job.metadata.owner_references.clone().unwrap_or_default();
            owners.extend(build::owner(conn));
            let patch = json!({"metadata": {"ownerReferences": owners, "resourceVersion": job.resource_version()}});
            Api::<Job>::namespaced(ctx.client.clone(), &ns)
                .patch(
                    &job.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
        // Created or adopted by a reconcile of this process that failed before announcing it.
        if let Some(note) = ctx.with_memory(|m| m.unannounced.get(&key).cloned()) {
            notes.push(note);
        }
        if (orphan || !known) && observe::phase(job) == JobPhase::Active {
            // A Job running across a controller restart (or left without owner): it keeps
            // running, counts for concurrency, and is folded when it finishes. Without its
            // ConfigMap, and none can be made, its pod cannot start: said, not adopted yet.
            match ensure_config_map(ctx, job, conn, selections.active.as_ref()).await {
                Ok(()) => {}
                Err(e) if e.is_refusal() => {
                    let why = format!("its ConfigMap could not be created: {e}");
                    tracing::warn!(job = %job.name_any(), error = %e, "a sync Job's ConfigMap could not be created");
                    notes.push(Note::SyncNotStarted(job.name_any(), why.clone()));
                    adopt_failure = Some((format!("sync Job {}: {why}", job.name_any()), e));
                    continue;
                }
                Err(e) => return Err(e),
            }
            let note = Note::JobAdopted(job.name_any());
            ctx.with_memory(|m| m.unannounced.insert(key.clone(), note.clone()));
            notes.push(note);
        }
        ctx.with_memory(|m| m.jobs.insert(key));
    }
    if let (Some(p), Ok(slots)) = (&the_plan, &slots) {
        if let Some(new) = &p.create {
            let job = build::sync_job(
                conn,
                selections.active.as_ref(),
                new,
                sync_now.filter(|_| new.trigger == plan::Trigger::Manual),
                &ctx.settings.job,
                slots.period(now),
            );
            match start_job(ctx, conn, &job, selections.active.as_ref()).await {
                Ok(created) => {
                    let note = Note::SyncStarted(new.name.clone(), new.trigger.as_str().into());
                    ctx.with_memory(|m| {
                        let key = format!("{ns}/{}", new.name);
                        m.jobs.insert(key.clone());
                        // (Made again under the name of one it deleted: this one counts.)
                        m.cleaned.remove(&key);
                        m.unannounced.insert(key, note.clone());
                    });
                    tracing::info!(job = %new.name, trigger = new.trigger.as_str(), "sync Job created");
                    notes.push(note);
                    active_job = Some(new.name.clone());
                    // The server's creation time (to the second), as later reconciles will read it.
                    let created_at = created
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0)
                        .unwrap_or(now);
                    last_started = last_started.max(Some(created_at));
                }
                Err(e) => {
                    tracing::warn!(job = %new.name, error = %e, "the sync Job could not be started");
                    notes.push(Note::SyncNotStarted(new.name.clone(), e.to_string()));
                    let said = format!("sync Job {} could not be created: {e}", new.name);
                    start_failure = Some((said, e));
                }
            }
        }
        for job in &p.prune {
            delete_job(ctx, &ns, job).await?;
            ctx.with_memory(|m| m.unannounced.remove(&format!("{ns}/{job}")));
        }
    }
    // One patch for both annotations: the first removal changes the resourceVersion. A request
    // whose Job could not be created stays, for the retry to start it.
    let ack_sync_now = the_plan.as_ref().is_some_and(|p| p.ack_sync_now)
        && sync_now.is_some()
        && start_failure.is_none();
    let mut answered: Vec<&str> = vec![];
    if ack_sync_now {
        answered.push(ANNOTATION_SYNC_NOW);
        // A value a finished Job already answered (the same `kubectl annotate` run twice): the
        // annotation goes and no sync runs; say so, rather than nothing at all.
        let started_now = the_plan.as_ref().is_some_and(|p| p.create.is_some());
        if let Some(job) = views
            .iter()
            .find(|j| j.sync_now.as_deref() == sync_now && j.phase != JobPhase::Active)
            .filter(|_| !started_now)
        {
            notes.push(Note::SyncNowAlreadyAnswered(
                job.name.clone(),
                sync_now.unwrap_or_default().to_string(),
            ));
        }
    }
    if test_requested.is_some() {
        answered.push(ANNOTATION_TEST_CONNECTION);
    }
    let latest = remove_annotations(ctx, conn, &answered).await?;

    // Update status.
    let blocked = the_plan.as_ref().and_then(|p| p.blocked.clone());
    let schedule = slots
        .as_ref()
        .map(Slots::frequency)
        .map_err(|e| e.to_string());
    let next_sync = the_plan.as_ref().and_then(|p| p.next_sync);
    // A Job created by this reconcile is not in `jobs`: its pod is still to come.
    let active = active_job.as_deref().map(|name| {
        jobs.iter()
            .find(|j| j.metadata.name.as_deref() == Some(name))
    });
    let progress = match active {
        None => JobProgress::Running,
        Some(None) => JobProgress::Starting("its pod is being created".into()),
        Some(Some(job)) => match observe::job_progress(ctx, job, now).await {
            Ok(p) => {
                if p == JobProgress::Running {
                    let key = format!("{ns}/{}", job.name_any());
                    ctx.with_memory(|m| m.running.get_mut(&key).map(|r| r.ran = true));
                }
                p
            }
            // Not a reason to leave the rest of the status unwritten: what it said stands.
            Err(e) => {
                tracing::warn!(job = %job.name_any(), error = %e, "the sync Job's pods could not be read");
                JobProgress::Unread
            }
        },
    };
    let start_failed = start_failure
        .as_ref()
        .or(adopt_failure.as_ref())
        .map(|(said, _)| said.clone());
    // The SelectiveSyncs first: the connection's status records the Jobs folded, which no
    // later reconcile reads again — were its write first and theirs to fail, the sync would be
    // lost to them (and to the Events and metrics below, which a failed reconcile never
    // reaches). Written again with the same report by the retry, they end the same.
    write_selection_statuses(ctx, conn, &selections, newest_report, now, &mut notes).await?;
    let written = write_connection_status(ctx, latest.as_ref().unwrap_or(conn), |prev| {
        let (syncs, _) = status::fold(&prev.syncs, added.clone());
        status::connection_status(&ConnectionFacts {
            now,
            generation,
            previous: prev,
            syncs,
            newest_report: newest_report.map(|r| r.0).filter(|_| !newest_elsewhere),
            test: tested.as_ref(),
            suspended: conn.spec.suspend,
            active_job: active_job.as_deref(),
            active_job_progress: progress.clone(),
            last_started,
            schedule: schedule.clone(),
            selection_error: selections.active_problem.clone(),
            next_sync,
            blocked: blocked.as_ref(),
            start_failed: start_failed.as_deref(),
            egress_ips: &ctx.settings.egress_ips,
            destination: destination.clone(),
        })
    })
    .await?;

    ctx.with_memory(|m| {
        for (key, ..) in &vanished {
            m.running.remove(key);
        }
    });

    // Events and metrics, once the status holds what they announce, and only for what the
    // status on the server did not hold already (this reconcile may have started from a copy
    // older than the controller's own last write).
    let Written {
        new: written,
        previous: replaced,
    } = written;
    if let Some(t) = &tested {
        let before = conditions::find(&replaced.conditions, conditions::CONNECTION_VERIFIED);
        let changed = before.map(|c| (c.status.as_str(), c.reason.as_str()))
            != Some((if t.ok() { "True" } else { "False" }, t.reason.as_str()));
        if changed || test_requested.is_some() {
            notes.push(if t.ok() {
                Note::ConnectionVerified(t.message.clone())
            } else {
                Note::ConnectionFailed(t.reason.as_str().into(), t.message.clone())
            });
        }
    }
    for r in added
        .iter()
        .filter(|r| !replaced.syncs.iter().any(|s| s.job_name == r.job_name))
    {
        ctx.metrics.observe_sync(r);
        notes.push(Note::for_sync(r));
    }
    // A Job that cannot start, announced once (its cause may change, ErrImagePull to
    // ImagePullBackOff, while it waits).
    if let (Some(job), JobProgress::Stuck(why)) = (active_job.as_deref(), &progress) {
        let said =
            status::syncing_of(&replaced.conditions, job).is_some_and(|c| c.reason == "JobPending");
        if !said {
            tracing::warn!(job, why = %why, "the sync Job cannot start");
            notes.push(Note::SyncJobPending(job.to_string(), why.clone()));
        }
    }
    let backfilled = |s: &WarehouseConnectionStatus| {
        conditions::find(&s.conditions, conditions::BACKFILL_COMPLETE)
            .is_some_and(|c| c.status == "True")
    };
    if backfilled(&written) && !backfilled(&replaced) {
        notes.push(Note::BackfillComplete);
    }
    if let Some(t) = &written.last_successful_sync_time {
        ctx.metrics
            .last_successful_sync
            .with_label_values(&[&ns, &name])
            .set(t.0.as_second() as f64);
    }
    for note in &notes {
        match note {
            Note::SelectiveSyncInvalid(_) => {}
            _ => publish(ctx, &reference, note).await,
        }
        if let Note::SyncStarted(job, _) | Note::JobAdopted(job) = note {
            ctx.with_memory(|m| m.unannounced.remove(&format!("{ns}/{job}")));
        }
    }

    // Look again when the next thing is due.
    let mut requeue = the_plan
        .as_ref()
        .map(|p| p.requeue_after)
        .unwrap_or(plan::MAX_REQUEUE);
    if let Some(mem) = ctx.with_memory(|m| m.tests.get(&uid).cloned()) {
        let until = connection_test::next_test(&mem)
            .duration_since(now)
            .as_secs()
            .max(1);
        requeue = requeue.min(Duration::from_secs(until as u64));
    }
    if active_job.is_some() {
        // A Job's pod changing state changes nothing the controller watches (until it runs,
        // when the Job's `ready` count does): a starting or stuck one is looked at again soon.
        let again = match progress {
            JobProgress::Starting(_) | JobProgress::Stuck(_) | JobProgress::Unread => 30,
            JobProgress::Running | JobProgress::Suspended => 5 * 60,
        };
        requeue = requeue.min(Duration::from_secs(again));
    }
    if let Some((_, e)) = start_failure.or(adopt_failure) {
        // Retried every 15 s (`error_policy`); the status and an Event say why meanwhile.
        return Err(Error::Announced(Box::new(e)));
    }
    Ok(Action::requeue(requeue))
}
