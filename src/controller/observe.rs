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
use super::status::FinishedJob;
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

/// The connection's sync Jobs: those it controls, and labelled ones with no controller (to adopt).
pub async fn jobs(ctx: &Context, conn: &WarehouseConnection) -> Result<Vec<Job>, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let label = super::plan::connection_label(&conn.name_any());
    let uid = conn.uid();
    let listed: Vec<Job> = match ctx.caches.get().filter(|c| super::cache_ready(&c.jobs)) {
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
    let ns = job.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut list = pods
        .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
        .await?
        .items;
    // The newest pod holds the final report.
    list.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
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
    })
}

/// The SelectiveSyncs that name this connection: the one that applies (the oldest valid one)
/// and the others, each with why it does not apply.
pub struct Selections {
    /// The selection the sync uses.
    pub active: Option<SelectiveSync>,
    /// Why the active selection can't be used (invalid): syncs wait until it is fixed.
    pub active_problem: Option<String>,
    /// Other selections naming the connection, with their problem.
    pub others: Vec<(SelectiveSync, String)>,
}

/// Lists the namespace's SelectiveSyncs (tolerating malformed ones) and picks this connection's.
pub async fn selections(ctx: &Context, conn: &WarehouseConnection) -> Result<Selections, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let name = conn.name_any();
    let objects: Vec<DynamicObject> = match ctx
        .caches
        .get()
        .filter(|c| super::cache_ready(&c.selections))
    {
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
                tracing::warn!(selection = %obj.name_any(), error = %e, "skipping a SelectiveSync that cannot be decoded")
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
        (None, None)
    } else {
        let (s, problem) = checked.remove(chosen);
        (Some(s), problem)
    };
    let first_name = active.as_ref().map(|s| s.name_any()).unwrap_or_default();
    let others = checked
        .into_iter()
        .map(|(s, problem)| {
            let why = match problem {
                Some(e) if active_problem.is_none() => format!(
                    "{e}; SelectiveSync {first_name:?} applies to connection {name:?} meanwhile"
                ),
                _ => format!(
                    "SelectiveSync {first_name:?} already selects the tables of connection {name:?}; only one SelectiveSync per connection applies"
                ),
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
