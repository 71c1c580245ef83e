//! Dereference: the reads of one reconcile — the connection's Jobs and their pods, its
//! SelectiveSync, its credentials Secret and the engine's table catalog — turned into the plain
//! values the pure steps take.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams};
use kube::{Resource, ResourceExt};

use super::build::{ANNOTATION_SLOT, ANNOTATION_SYNC_NOW, LABEL_CONNECTION};
use super::plan::{JobPhase, JobView};
use super::status::{FinishedJob, JobProgress};
use super::{Context, Error};
use crate::crd::{SelectiveSync, WarehouseConnection};

/// How long the engine's table catalog is reused.
const CATALOG_TTL: Duration = Duration::from_secs(60);

/// Decodes a watched object into its typed form; a malformed object is reported, not fatal.
pub fn decode<K: serde::de::DeserializeOwned>(obj: &DynamicObject) -> Result<K, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// A Job's phase from its terminal conditions (falling back to the pod counts).
pub fn phase(job: &Job) -> JobPhase {
    let status = job.status.as_ref();
    let has = |t: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    if has("Complete") {
        JobPhase::Succeeded
    } else if has("Failed") {
        JobPhase::Failed
    } else if status.and_then(|s| s.succeeded).unwrap_or(0) > 0
        && status.and_then(|s| s.active).unwrap_or(0) == 0
        && status.and_then(|s| s.completion_time.as_ref()).is_some()
    {
        JobPhase::Succeeded
    } else {
        JobPhase::Active
    }
}

/// The planner's view of a Job.
pub fn job_view(job: &Job) -> JobView {
    let annotations = job.metadata.annotations.as_ref();
    JobView {
        name: job.name_any(),
        slot: annotations
            .and_then(|a| a.get(ANNOTATION_SLOT))
            .and_then(|s| s.parse::<Timestamp>().ok())
            .or_else(|| job.metadata.creation_timestamp.as_ref().map(|t| t.0)),
        phase: phase(job),
        sync_now: annotations
            .and_then(|a| a.get(ANNOTATION_SYNC_NOW))
            .cloned(),
        created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
    }
}

/// How long a Job may have no pod before it counts as stuck: the Job controller creates its pod
/// within seconds unless the API refuses it (a `ResourceQuota`, a `LimitRange`, an admission
/// policy), which only the Job's Events say.
const NO_POD_GRACE: Duration = Duration::from_secs(60);

/// How long a pod may be unschedulable before it counts as stuck: a cluster autoscaler
/// (Karpenter, Cluster Autoscaler) adds a node for it within minutes.
const UNSCHEDULABLE_GRACE: Duration = Duration::from_secs(5 * 60);

/// Waiting reasons of a container on its normal way to running.
const STARTING_REASONS: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// The longest cause quoted from a pod (an image pull's message can run long).
const CAUSE_MAX: usize = 300;

/// How far an active Job has got when its status tells (suspended, or a pod of it ready);
/// `None` when its pods must be read.
fn settled(job: &Job) -> Option<JobProgress> {
    if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        Some(JobProgress::Suspended)
    } else if job.status.as_ref().and_then(|s| s.ready).unwrap_or(0) > 0 {
        Some(JobProgress::Running)
    } else {
        None
    }
}

/// How far an active Job has got, from its status and its `pods` (newest last), at `now`.
pub fn progress(job: &Job, pods: &[Pod], now: Timestamp) -> JobProgress {
    settled(job).unwrap_or_else(|| by_pods(job, pods, now))
}

/// How far an active Job whose status does not tell ([`settled`]) has got, from its `pods`.
fn by_pods(job: &Job, pods: &[Pod], now: Timestamp) -> JobProgress {
    let Some(pod) = pods.last() else {
        // From its start, which the Job controller sets again when a queue lets a suspended
        // Job go (its pod is created then), else from its creation.
        let since = job
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .or(job.metadata.creation_timestamp.as_ref());
        return if age(since.map(|t| t.0), now) >= NO_POD_GRACE {
            JobProgress::Stuck(format!(
                "no pod of it exists a minute after it started: `kubectl describe job {}` shows \
                 why (a ResourceQuota, a LimitRange or an admission policy refusing the pod)",
                job.name_any()
            ))
        } else {
            JobProgress::Starting("its pod is being created".into())
        };
    };
    pod_progress(pod, now)
}

/// How long ago `since` was at `now` (none for a time ahead of the controller's clock).
fn age(since: Option<Timestamp>, now: Timestamp) -> Duration {
    since
        .map(|t| now.duration_since(t))
        .filter(|d| d.is_positive())
        .map(|d| d.unsigned_abs())
        .unwrap_or_default()
}

/// How far a Job's newest pod has got at `now`.
fn pod_progress(pod: &Pod, now: Timestamp) -> JobProgress {
    let name = pod.name_any();
    let quote = |reason: Option<&str>, message: Option<&str>| {
        let mut cause = [reason, message]
            .into_iter()
            .flatten()
            .filter(|s| !s.trim().is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        crate::sync::naming::truncate_at_char(&mut cause, CAUSE_MAX);
        cause
    };
    let status = pod.status.as_ref();
    let containers = status.into_iter().flat_map(|s| {
        s.init_container_statuses
            .iter()
            .flatten()
            .chain(s.container_statuses.iter().flatten())
    });
    let mut creating = None;
    for c in containers {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if STARTING_REASONS.contains(&reason) || reason.is_empty() {
            creating.get_or_insert(reason);
            continue;
        }
        // ErrImagePull, ImagePullBackOff, InvalidImageName, CreateContainerConfigError (a
        // Secret or key missing), CreateContainerError, RunContainerError…
        return JobProgress::Stuck(format!(
            "pod {name}: container {} {}",
            c.name,
            quote(Some(reason), waiting.message.as_deref())
        ));
    }
    let unscheduled = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    });
    if let Some(c) = unscheduled {
        let cause = quote(c.reason.as_deref(), c.message.as_deref());
        // "Unschedulable" waits for a change (a node, a quota freed) — which a cluster
        // autoscaler brings within minutes: stuck only once that has not come.
        let since = c
            .last_transition_time
            .as_ref()
            .or(pod.metadata.creation_timestamp.as_ref());
        let waited = age(since.map(|t| t.0), now);
        return match c.reason.as_deref() {
            Some("Unschedulable") if waited >= UNSCHEDULABLE_GRACE => JobProgress::Stuck(format!(
                "pod {name} has not been scheduled for {} minutes: {cause}",
                UNSCHEDULABLE_GRACE.as_secs() / 60
            )),
            Some("Unschedulable") => {
                JobProgress::Starting(format!("pod {name} waits for a node ({cause})"))
            }
            _ => JobProgress::Starting(format!("pod {name} is not scheduled yet ({cause})")),
        };
    }
    match status.and_then(|s| s.phase.as_deref()) {
        // Running, or just ended (the Job records its end in a moment), or its node stopped
        // reporting (`Unknown`: it may run still).
        Some("Running" | "Succeeded" | "Failed" | "Unknown") => JobProgress::Running,
        _ => JobProgress::Starting(match creating {
            Some(reason) if !reason.is_empty() => format!("pod {name} is {reason}"),
            _ => format!("pod {name} is pending"),
        }),
    }
}

/// How far an active Job has got ([`progress`]), its pods read only when its status does not
/// tell.
pub async fn job_progress(ctx: &Context, job: &Job, now: Timestamp) -> Result<JobProgress, Error> {
    match settled(job) {
        Some(p) => Ok(p),
        None => Ok(by_pods(job, &job_pods(ctx, job).await?, now)),
    }
}

/// The pods of `job`, oldest first.
pub async fn job_pods(ctx: &Context, job: &Job) -> Result<Vec<Pod>, Error> {
    let ns = job.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut list = pods
        .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
        .await?
        .items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    Ok(list)
}

/// The connection's sync Jobs: those it controls, and labelled ones with no controller (to adopt).
pub async fn jobs(
    ctx: &Context,
    conn: &WarehouseConnection,
    listing: Listing,
) -> Result<Vec<Job>, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let label = super::plan::connection_label(&conn.name_any());
    let uid = conn.uid();
    let cache = match listing {
        Listing::Cached => ctx.caches.get().filter(|c| super::cache_ready(&c.jobs)),
        Listing::Api => None,
    };
    let listed: Vec<Job> = match cache {
        Some(c) => c
            .jobs
            .state()
            .iter()
            .filter(|j| j.metadata.namespace.as_deref() == Some(ns.as_str()))
            .filter(|j| j.labels().get(LABEL_CONNECTION) == Some(&label))
            .map(|j| Job::clone(j))
            .collect(),
        None => {
            let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
            let lp = ListParams::default().labels(&super::build::selector(&conn.name_any()));
            api.list(&lp).await?.items
        }
    };
    Ok(listed
        .into_iter()
        .filter(|j| {
            match j
                .metadata
                .owner_references
                .as_ref()
                .and_then(|o| o.iter().find(|o| o.controller == Some(true)))
            {
                Some(owner) => Some(&owner.uid) == uid.as_ref(),
                None => true,
            }
        })
        .collect())
}

/// Whether the connection already controls `job`.
pub fn owned_by(job: &Job, conn: &WarehouseConnection) -> bool {
    let uid = conn.meta().uid.as_ref();
    job.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|o| Some(&o.uid) == uid && o.controller == Some(true))
    })
}

/// The terminated state of a pod's sync container.
fn terminated(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let status = statuses
        .iter()
        .find(|c| c.name == "sync")
        .or(statuses.first())?;
    status.state.as_ref()?.terminated.as_ref()
}

fn termination_message(pod: &Pod) -> Option<String> {
    let message = terminated(pod)?.message.clone()?;
    (!message.trim().is_empty()).then_some(message)
}

/// How a pod's sync container ended (`OOMKilled, exit code 137`), when it did.
fn container_end(pod: &Pod) -> Option<String> {
    let t = terminated(pod)?;
    Some(match t.reason.as_deref().filter(|r| !r.is_empty()) {
        Some(reason) => format!("{reason}, exit code {}", t.exit_code),
        None => format!("exit code {}", t.exit_code),
    })
}

/// A finished Job with its pod's termination message.
pub async fn finished(ctx: &Context, job: &Job) -> Result<FinishedJob, Error> {
    // The newest pod holds the final report.
    let list = job_pods(ctx, job).await?;
    let message = list.iter().rev().find_map(termination_message);
    let container_end = list.iter().rev().find_map(container_end);
    let status = job.status.as_ref();
    let failed = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
    });
    let view = job_view(job);
    Ok(FinishedJob {
        name: job.name_any(),
        phase: view.phase,
        started: status
            .and_then(|s| s.start_time.as_ref().map(|t| t.0))
            .or(view.slot),
        finished: status
            .and_then(|s| s.completion_time.as_ref().map(|t| t.0))
            .or_else(|| failed.and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))),
        failure: failed.map(|c| {
            let reason = c.reason.clone().unwrap_or_default();
            match &c.message {
                Some(m) if !m.is_empty() => format!("{reason}: {m}"),
                _ => reason,
            }
        }),
        termination_message: message,
        container_end,
        pod_found: !list.is_empty(),
        deleted: None,
    })
}

/// The SelectiveSyncs that name this connection: the one that applies (the oldest valid one)
/// and the others, each with why it does not apply.
pub struct Selections {
    /// The selection the sync uses.
    pub active: Option<SelectiveSync>,
    /// Why the active selection can't be used (invalid): syncs wait until it is fixed.
    pub active_problem: Option<String>,
    /// Other selections naming the connection, each with why it does not apply: invalid
    /// itself, or valid and superseded by the one that applies.
    pub others: Vec<(SelectiveSync, NotInEffect)>,
}

impl Selections {
    /// What a sync Job takes from the selections: the applying one's uid and version, and its
    /// problem.
    pub fn identity(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        let meta = self.active.as_ref().map(|s| &s.metadata);
        (
            meta.and_then(|m| m.uid.as_deref()),
            meta.and_then(|m| m.resource_version.as_deref()),
            self.active_problem.as_deref(),
        )
    }
}

/// Why a SelectiveSync naming a connection does not apply to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotInEffect {
    /// Its spec is invalid: why.
    Invalid(String),
    /// It is valid, and another one applies: which.
    Superseded(String),
}

/// Where [`selections`] and [`jobs`] list from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// The watch cache when it is ready (the API otherwise): every reconcile.
    Cached,
    /// The API server: right before a sync Job is made, so that a SelectiveSync the cache has
    /// not seen yet (applied with the connection, a moment after it) is not left out of the
    /// Job's selection — its excluded tables and columns loaded, and never deleted — and that
    /// a sync Job the cache has not seen yet (made by the reconcile before) is not run beside.
    Api,
}

/// Lists the namespace's SelectiveSyncs (tolerating malformed ones) and picks this connection's.
pub async fn selections(
    ctx: &Context,
    conn: &WarehouseConnection,
    listing: Listing,
) -> Result<Selections, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let name = conn.name_any();
    let cache = match listing {
        Listing::Cached => ctx
            .caches
            .get()
            .filter(|c| super::cache_ready(&c.selections)),
        Listing::Api => None,
    };
    let objects: Vec<DynamicObject> = match cache {
        Some(c) => c
            .selections
            .state()
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()))
            .filter(|s| {
                s.data
                    .pointer("/spec/connectionRef/name")
                    .and_then(|v| v.as_str())
                    == Some(name.as_str())
            })
            .map(|s| DynamicObject::clone(s))
            .collect(),
        None => {
            let ar = kube::api::ApiResource::erase::<SelectiveSync>(&());
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
            api.list(&ListParams::default()).await?.items
        }
    };
    let mut mine: Vec<SelectiveSync> = vec![];
    // Those naming the connection that cannot be read as a SelectiveSync (a CRD of another
    // release, a hand-edited object): name and why.
    let mut unreadable: Vec<(String, String)> = vec![];
    for obj in objects {
        let refers = obj
            .data
            .pointer("/spec/connectionRef/name")
            .and_then(|v| v.as_str())
            == Some(name.as_str());
        if !refers {
            continue;
        }
        match decode::<SelectiveSync>(&obj) {
            Ok(s) => mine.push(s),
            Err(e) => {
                tracing::warn!(selection = %obj.name_any(), error = %e, "a SelectiveSync that cannot be decoded");
                unreadable.push((obj.name_any(), e.to_string()));
            }
        }
    }
    mine.sort_by(|a, b| {
        let key = |s: &SelectiveSync| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                s.name_any(),
            )
        };
        key(a).cmp(&key(b))
    });
    // Each validated once: its problem, if any.
    let mut checked: Vec<(SelectiveSync, Option<String>)> = mine
        .into_iter()
        .map(|s| {
            let problem = s.spec.validate().err().map(|e| e.to_string());
            (s, problem)
        })
        .collect();
    // The oldest valid one applies (an invalid older one held back a valid newer one, and no
    // sync ran); when none is valid, the oldest, whose problem stops the syncs.
    let chosen = checked.iter().position(|(_, p)| p.is_none()).unwrap_or(0);
    let (active, active_problem) = if checked.is_empty() {
        // Only unreadable ones: they hold the syncs back (fail closed), rather than the
        // connection syncing every table and column as though it had no selection.
        let problem = unreadable.first().map(|(n, e)| {
            format!("SelectiveSync {n:?} naming this connection cannot be read ({e}); syncs wait until it is fixed or deleted")
        });
        (None, problem)
    } else {
        let (s, problem) = checked.remove(chosen);
        (Some(s), problem)
    };
    let first_name = active.as_ref().map(|s| s.name_any()).unwrap_or_default();
    let others = checked
        .into_iter()
        .map(|(s, problem)| {
            let why = match problem {
                Some(e) if active_problem.is_none() => NotInEffect::Invalid(format!(
                    "{e}; SelectiveSync {first_name:?} applies to connection {name:?} meanwhile"
                )),
                Some(e) => NotInEffect::Invalid(e),
                None => NotInEffect::Superseded(format!(
                    "SelectiveSync {first_name:?} already selects the tables of connection {name:?}; only one SelectiveSync per connection applies (the oldest valid one)"
                )),
            };
            (s, why)
        })
        .collect();
    Ok(Selections {
        active,
        active_problem,
        others,
    })
}

/// The credentials Secret, when the connection names one.
pub async fn secret(ctx: &Context, conn: &WarehouseConnection) -> Result<Option<Secret>, Error> {
    let Some(r) = &conn.spec.warehouse.credentials_secret_ref else {
        return Ok(None);
    };
    let api: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default());
    Ok(api.get_opt(&r.name).await?)
}

/// The engine's Track event tables (`GET /v1/feeds`), cached for a minute (a failure too); None
/// when the engine can't be asked (the previous list is kept then).
pub async fn available_tables(ctx: &Context) -> Option<Vec<String>> {
    let mut cache = ctx.catalog.lock().await;
    if let Some((at, tables)) = cache.as_ref()
        && at.elapsed() < CATALOG_TTL
    {
        return tables.clone();
    }
    let tables = fetch_catalog(ctx).await;
    *cache = Some((Instant::now(), tables.clone()));
    tables
}

async fn fetch_catalog(ctx: &Context) -> Option<Vec<String>> {
    let token = match super::read_token(&ctx.settings.engine_token_file) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the engine token; availableTables is not refreshed");
            return None;
        }
    };
    let url = format!(
        "{}/v1/feeds",
        ctx.settings.job.engine_url.trim_end_matches('/')
    );
    let response = ctx.http.get(&url).bearer_auth(token).send().await;
    let doc: serde_json::Value = match response {
        Ok(r) if r.status().is_success() => r.json().await.ok()?,
        Ok(r) => {
            tracing::warn!(status = %r.status(), %url, "the engine refused the catalog request");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, %url, "the engine's catalog is unreachable");
            return None;
        }
    };
    let mut tables: Vec<String> = doc
        .get("trackEvents")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| e.get("table").and_then(|t| t.as_str()).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    tables.sort();
    tables.dedup();
    Some(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2025-03-01T10:05:00Z";

    /// An active Job created at `created`, with `ready` pods as its status says.
    fn job(created: &str, ready: Option<i32>) -> Job {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c-1", "creationTimestamp": created},
            "status": {"active": 1, "ready": ready},
        }))
        .unwrap()
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "c-1-x"}, "status": status}))
            .unwrap()
    }

    fn waiting(reason: &str, message: &str) -> Pod {
        pod(serde_json::json!({
            "phase": "Pending",
            "containerStatuses": [{"name": "sync", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}],
        }))
    }

    fn at(job: &Job, pods: &[Pod]) -> JobProgress {
        progress(job, pods, NOW.parse().unwrap())
    }

    fn stuck(p: JobProgress) -> String {
        match p {
            JobProgress::Stuck(why) => why,
            other => panic!("not stuck: {other:?}"),
        }
    }

    #[test]
    fn a_job_runs_when_its_status_counts_a_ready_pod_or_its_pod_runs() {
        assert_eq!(at(&job(NOW, Some(1)), &[]), JobProgress::Running);
        // A server without `status.ready` (before Kubernetes 1.24): the pod tells.
        let running = pod(serde_json::json!({"phase": "Running"}));
        assert_eq!(at(&job(NOW, None), &[running]), JobProgress::Running);
        let mut held = job(NOW, None);
        held.spec = Some(
            serde_json::from_value(serde_json::json!({"suspend": true, "template": {}})).unwrap(),
        );
        assert_eq!(at(&held, &[]), JobProgress::Suspended);
    }

    #[test]
    fn a_job_without_a_pod_is_starting_for_a_minute_then_stuck() {
        assert_eq!(
            at(&job("2025-03-01T10:04:30Z", Some(0)), &[]),
            JobProgress::Starting("its pod is being created".into())
        );
        let why = stuck(at(&job("2025-03-01T10:03:00Z", Some(0)), &[]));
        assert!(
            why.contains("a minute") && why.contains("kubectl describe job c-1"),
            "{why}"
        );
        // The same words a minute later: the status is not rewritten at every look.
        assert_eq!(stuck(at(&job("2025-03-01T10:02:00Z", Some(0)), &[])), why);
        // Held by a queue for ten minutes, then let go: it started now, its pod is to come.
        let mut resumed = job("2025-03-01T09:55:00Z", Some(0));
        resumed.status.as_mut().unwrap().start_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-03-01T10:04:50Z".parse().unwrap(),
            ));
        assert_eq!(
            at(&resumed, &[]),
            JobProgress::Starting("its pod is being created".into())
        );
        // A creation time ahead of the controller's clock is no age.
        assert!(matches!(
            at(&job("2025-03-01T11:00:00Z", Some(0)), &[]),
            JobProgress::Starting(_)
        ));
    }

    #[test]
    fn a_pod_waiting_on_an_error_is_stuck_with_its_cause_and_one_on_its_way_is_starting() {
        let young = job(NOW, Some(0));
        let why = stuck(at(
            &young,
            &[waiting(
                "CreateContainerConfigError",
                "secret \"creds\" not found",
            )],
        ));
        assert_eq!(
            why,
            "pod c-1-x: container sync CreateContainerConfigError: secret \"creds\" not found"
        );
        // The newest pod counts (the list is oldest first).
        let why = stuck(at(
            &young,
            &[
                waiting("ContainerCreating", ""),
                waiting("ErrImagePull", &"x".repeat(1000)),
            ],
        ));
        assert!(
            why.starts_with("pod c-1-x: container sync ErrImagePull: x"),
            "{why}"
        );
        assert!(why.len() < 400, "the cause is cut: {} bytes", why.len());
        assert_eq!(
            at(&young, &[waiting("ContainerCreating", "")]),
            JobProgress::Starting("pod c-1-x is ContainerCreating".into())
        );
        // Ended, the Job about to say so (a failed pod is the Job's end: no retries).
        for phase in ["Succeeded", "Failed"] {
            let ended = pod(serde_json::json!({"phase": phase}));
            assert_eq!(at(&young, &[ended]), JobProgress::Running, "{phase}");
        }
        // Its node stopped reporting: it may run still.
        let lost = pod(serde_json::json!({"phase": "Unknown"}));
        assert_eq!(at(&young, &[lost]), JobProgress::Running);
    }

    #[test]
    fn a_pod_unschedulable_for_minutes_is_stuck_and_one_waiting_for_a_node_is_starting() {
        let scheduled = |reason: &str, since: &str| {
            pod(serde_json::json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": reason,
                    "lastTransitionTime": since,
                    "message": "0/3 nodes are available: 3 Insufficient memory."}],
            }))
        };
        let why = stuck(at(
            &job(NOW, Some(0)),
            &[scheduled("Unschedulable", "2025-03-01T09:59:00Z")],
        ));
        assert!(
            why.contains("not been scheduled for 5 minutes") && why.contains("Insufficient memory"),
            "{why}"
        );
        // A cluster autoscaler adds a node within minutes: not stuck yet; nor a pod its
        // scheduling gates hold (a queue's).
        for (reason, since, words) in [
            ("Unschedulable", "2025-03-01T10:02:00Z", "waits for a node"),
            (
                "SchedulingGated",
                "2025-03-01T09:00:00Z",
                "is not scheduled yet",
            ),
        ] {
            assert!(
                matches!(
                    at(&job(NOW, Some(0)), &[scheduled(reason, since)]),
                    JobProgress::Starting(m) if m.contains(words)
                ),
                "{reason}"
            );
        }
        // A condition without its time: counted from the pod's creation.
        let mut old = pod(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        }));
        old.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-03-01T09:00:00Z".parse().unwrap(),
            ));
        assert!(matches!(
            at(&job(NOW, Some(0)), &[old]),
            JobProgress::Stuck(_)
        ));
    }
}
