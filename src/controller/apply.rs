//! Apply and update status: the API writes of a reconcile (Jobs, ConfigMaps, the engine token
//! Secret, annotations, finalizers, Events) and the status writes with their conflict retries,
//! plus the deletion path.

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::build;
use super::events::Note;
use super::feed_consumer;
use super::plan::{self, Deletion};
use super::status::{self, SelectionFacts};
use super::{Context, Error, FINALIZER, conditions, observe};
use crate::crd::{
    SelectiveSync, SelectiveSyncStatus, WarehouseConnection, WarehouseConnectionStatus,
};
use crate::sync::SyncReport;

/// How many times a status write is retried after a resourceVersion conflict.
const STATUS_ATTEMPTS: u32 = 5;

pub(super) fn connections(ctx: &Context, conn: &WarehouseConnection) -> Api<WarehouseConnection> {
    Api::namespaced(ctx.client.clone(), &conn.namespace().unwrap_or_default())
}

/// Merge-patches the connection's `metadata` with `fields`, conditional on the resourceVersion
/// this reconcile read (a change made meanwhile answers 409).
pub(super) async fn patch_metadata(
    ctx: &Context,
    conn: &WarehouseConnection,
    mut fields: serde_json::Map<String, serde_json::Value>,
) -> Result<WarehouseConnection, kube::Error> {
    fields.insert("resourceVersion".into(), json!(conn.resource_version()));
    connections(ctx, conn)
        .patch(
            &conn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": fields })),
        )
        .await
}

pub(super) fn annotation<'a>(conn: &'a WarehouseConnection, key: &str) -> Option<&'a str> {
    conn.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Removes an annotation from the version of the object this reconcile read: the patch carries
/// that resourceVersion, so if the user changed the annotation meanwhile (a new request) the
/// API answers 409 and the request survives for the next reconcile.
pub(super) async fn remove_annotations(
    ctx: &Context,
    conn: &WarehouseConnection,
    keys: &[&str],
) -> Result<Option<WarehouseConnection>, Error> {
    if keys.is_empty() {
        return Ok(None);
    }
    let nulls: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| (k.to_string(), serde_json::Value::Null))
        .collect();
    let fields = serde_json::Map::from_iter([("annotations".into(), json!(nulls))]);
    match patch_metadata(ctx, conn, fields).await {
        Ok(updated) => Ok(Some(updated)),
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    note: &Note,
) {
    let mut event = note.event();
    // A related Job lives in the connection's namespace.
    if let Some(job) = event.secondary.as_mut() {
        job.namespace.clone_from(&reference.namespace);
    }
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(reason = note.reason(), error = %e, "cannot publish an Event");
    }
}

pub(super) async fn delete_job(ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Copies the controller's engine token into the namespace's token Secret (create or update).
/// A Secret of that name the controller did not make (no managed-by label) is someone else's:
/// it is left as it is ([`Error::SecretNameTaken`]) — replacing it would destroy its data and
/// put the engine's token where its owner's workloads read it.
pub(super) async fn ensure_token_secret(ctx: &Context, ns: &str) -> Result<(), Error> {
    let token = super::read_token(&ctx.settings.engine_token_file)?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let want = build::engine_token_secret(ns, &token);
    let taken = || Error::SecretNameTaken(format!("{ns}/{}", build::ENGINE_TOKEN_SECRET));
    match api.get_opt(build::ENGINE_TOKEN_SECRET).await? {
        None => match api.create(&PostParams::default(), &want).await {
            Ok(_) => Ok(()),
            // Made since the read: by another reconcile of the namespace, or by someone else.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let have = api.get(build::ENGINE_TOKEN_SECRET).await?;
                if build::made_by_controller(&have.metadata) {
                    Ok(())
                } else {
                    Err(taken())
                }
            }
            Err(e) => Err(e.into()),
        },
        Some(have) if !build::made_by_controller(&have.metadata) => Err(taken()),
        Some(have) if have.data == want.data => Ok(()),
        Some(have) => {
            let mut updated = want;
            updated.metadata.resource_version = have.metadata.resource_version;
            api.replace(build::ENGINE_TOKEN_SECRET, &PostParams::default(), &updated)
                .await?;
            Ok(())
        }
    }
}

/// Deletes the namespace's engine token Secret when `conn` is its last connection: a live
/// credential of the engine is not left behind at uninstall. A connection that is not being
/// deleted, or is still being cleaned up (its sync may still run), keeps it; one created later
/// gets it again before its first Job. Only a Secret the controller made is deleted.
async fn remove_token_secret_after_last(
    ctx: &Context,
    conn: &WarehouseConnection,
    ns: &str,
) -> Result<(), Error> {
    // Metadata only: a connection of the namespace that does not decode still counts.
    let others = connections(ctx, conn)
        .list_metadata(&ListParams::default())
        .await?;
    let in_use = others.items.iter().any(|c| {
        c.uid() != conn.uid()
            && (c.meta().deletion_timestamp.is_none()
                || c.finalizers().iter().any(|f| f == FINALIZER))
    });
    if in_use {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = api.get_opt(build::ENGINE_TOKEN_SECRET).await? else {
        return Ok(());
    };
    if !build::made_by_controller(&secret.metadata) {
        return Ok(());
    }
    match api
        .delete(build::ENGINE_TOKEN_SECRET, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Starts a sync: the namespace's engine token Secret, the Job, then its ConfigMap. A Job of
/// that name already there (a create that reached the server before a retry) is this sync's
/// only when the connection controls it; otherwise the name is taken
/// ([`Error::JobNameTaken`]) and nothing is started.
pub(super) async fn start_job(
    ctx: &Context,
    conn: &WarehouseConnection,
    job: &Job,
    selection: Option<&SelectiveSync>,
) -> Result<Job, Error> {
    let ns = job.namespace().unwrap_or_default();
    ensure_token_secret(ctx, &ns).await?;
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let (created, new) = match api.create(&PostParams::default(), job).await {
        Ok(j) => (j, true),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(&job.name_any()).await?;
            if !observe::owned_by(&existing, conn) {
                return Err(Error::JobNameTaken(job.name_any()));
            }
            (existing, false)
        }
        Err(e) => return Err(e.into()),
    };
    if let Err(e) = ensure_config_map(ctx, &created, conn, selection).await {
        // (The ConfigMap is owned by the Job, so it comes second.) A Job without it waits in
        // ContainerCreating until its deadline while the status says it could not be created:
        // a Job this call created goes, and the retry creates both. One found already (it may
        // be running) stays.
        if new {
            tracing::warn!(job = %created.name_any(), error = %e, "the sync Job's ConfigMap could not be created; deleting the Job");
            let deleted = api
                .delete(&created.name_any(), &DeleteParams::background())
                .await;
            match deleted {
                Ok(_) => {
                    let key = format!("{ns}/{}", created.name_any());
                    let owner = conn.uid().unwrap_or_default();
                    ctx.with_memory(|m| m.cleaned.insert(key, owner));
                }
                // Found by the next reconciles without its ConfigMap, which they make, or
                // report as this one does.
                Err(d) => {
                    tracing::warn!(job = %created.name_any(), error = %d, "could not delete the sync Job left without its ConfigMap");
                }
            }
        }
        return Err(e);
    }
    Ok(created)
}

/// Creates a Job's ConfigMap (owned by the Job) unless it exists.
pub(super) async fn ensure_config_map(
    ctx: &Context,
    job: &Job,
    conn: &WarehouseConnection,
    selection: Option<&SelectiveSync>,
) -> Result<(), Error> {
    let ns = job.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    if api.get_opt(&job.name_any()).await?.is_some() {
        return Ok(());
    }
    let cm = build::sync_config_map(job, &conn.name_any(), build::manifests(conn, selection)?);
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A status written, and the one on the server it was computed from and replaced: when the
/// reconcile started from a stale copy of the connection (the watch cache behind its own last
/// write), `previous` is the fresh one, and what the stale copy lacked was already there.
pub(super) struct Written {
    /// The status now on the server.
    pub new: WarehouseConnectionStatus,
    /// The status it replaced.
    pub previous: WarehouseConnectionStatus,
}

/// Writes the connection's status through the status subresource (`PUT .../status` with the
/// resourceVersion read, so a concurrent writer causes a 409); on a conflict the object is read
/// again and the status recomputed from it. Returns the status written (or already there) and
/// the one it replaced.
pub(super) async fn write_connection_status(
    ctx: &Context,
    conn: &WarehouseConnection,
    compute: impl Fn(&WarehouseConnectionStatus) -> WarehouseConnectionStatus,
) -> Result<Written, Error> {
    let api = connections(ctx, conn);
    let mut current = conn.clone();
    for _ in 0..STATUS_ATTEMPTS {
        let previous = current.status.clone().unwrap_or_default();
        let new = compute(&previous);
        if current.status.as_ref() == Some(&new) {
            return Ok(Written { new, previous });
        }
        let mut obj = current.clone();
        obj.status = Some(new.clone());
        match api
            .replace_status(&conn.name_any(), &PostParams::default(), &obj)
            .await
        {
            Ok(_) => return Ok(Written { new, previous }),
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                tracing::debug!("status conflict; reading the connection again");
                current = api.get(&conn.name_any()).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::StatusConflict(conn.name_any()))
}

pub(super) async fn write_selection_statuses(
    ctx: &Context,
    conn: &WarehouseConnection,
    selections: &observe::Selections,
    report: Option<(&SyncReport, Option<i64>)>,
    now: Timestamp,
    notes: &mut Vec<Note>,
) -> Result<(), Error> {
    // Each with its problem, and why it does not apply though valid.
    let mut targets: Vec<(&SelectiveSync, Option<String>, Option<String>)> = vec![];
    if let Some(s) = &selections.active {
        targets.push((s, selections.active_problem.clone(), None));
    }
    for (s, why) in &selections.others {
        targets.push(match why {
            observe::NotInEffect::Invalid(p) => (s, Some(p.clone()), None),
            observe::NotInEffect::Superseded(w) => (s, None, Some(w.clone())),
        });
    }
    if targets.is_empty() {
        return Ok(());
    }
    let available = observe::available_tables(ctx).await;
    for (sel, problem, superseded) in targets {
        let active = selections
            .active
            .as_ref()
            .is_some_and(|a| std::ptr::eq(a, sel));
        let api: Api<SelectiveSync> =
            Api::namespaced(ctx.client.clone(), &sel.namespace().unwrap_or_default());
        let generation = sel.metadata.generation.unwrap_or(0);
        // The spec this reconcile validated, with its generation: a write retried after a
        // conflict with a newer spec (which triggers a reconcile of its own) wrote its tables
        // under the older `observedGeneration`.
        let replaced = update_selection_status(&api, sel.clone(), |current| {
            let previous = current.status.clone().unwrap_or_default();
            status::selection_status(&SelectionFacts {
                now,
                generation,
                spec: &sel.spec,
                previous: &previous,
                problem: problem.clone(),
                superseded: superseded.clone(),
                available: available.clone(),
                report: if active { report } else { None },
            })
        })
        .await;
        // The active selection's status carries the sync's report, and is written before the
        // connection's: its failure fails the reconcile, to be retried with the same report.
        // Another one's (marked not in effect) is only logged: it must not hold up the
        // connection's status, Events and Job pruning.
        let replaced = match replaced {
            Ok(replaced) => replaced,
            Err(e) if !active => {
                tracing::warn!(selective_sync = %sel.name_any(), error = %e, "could not write the status of a SelectiveSync not in effect");
                continue;
            }
            Err(e) => return Err(e),
        };
        if let (Some(previous), Some(p)) = (replaced, &problem) {
            let was_valid = conditions::find(&previous.conditions, conditions::VALID);
            if was_valid.map(|c| c.status.as_str()) != Some("False") {
                let note =
                    Note::SelectiveSyncInvalid(format!("{p} (connection {})", conn.name_any()));
                publish(ctx, &sel.object_ref(&()), &note).await;
                notes.push(note);
            }
        }
    }
    Ok(())
}

/// Replaces `current`'s status with `next(current)` unless that is what it already holds,
/// re-reading (and recomputing) after a resourceVersion conflict. Returns the status it replaced
/// when it wrote one; `None` when nothing changed or the object is gone.
async fn update_selection_status(
    api: &Api<SelectiveSync>,
    mut current: SelectiveSync,
    next: impl Fn(&SelectiveSync) -> SelectiveSyncStatus,
) -> Result<Option<SelectiveSyncStatus>, Error> {
    for _ in 0..STATUS_ATTEMPTS {
        let new = next(&current);
        if current.status.as_ref() == Some(&new) {
            return Ok(None);
        }
        let previous = current.status.clone().unwrap_or_default();
        let mut obj = current.clone();
        obj.status = Some(new);
        match api
            .replace_status(&current.name_any(), &PostParams::default(), &obj)
            .await
        {
            Ok(_) => return Ok(Some(previous)),
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                current = api.get(&current.name_any()).await?
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::StatusConflict(current.name_any()))
}

/// A reconcile found no WarehouseConnection `connection` in `namespace` (it was deleted — its
/// finalizer perhaps removed by hand, so that no cleanup ran — or a SelectiveSync names one that
/// never existed). Once the API confirms it (the controller's cache may lag: a connection created
/// a moment ago is not missing), its per-connection metrics are dropped (its last-sync gauge
/// stayed, frozen, for as long as the controller ran) and the SelectiveSyncs that name it say so.
pub(super) async fn connection_missing(
    ctx: &Context,
    namespace: &str,
    connection: &str,
) -> Result<(), Error> {
    let conns: Api<kube::api::DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &super::connection_resource());
    match conns.get(connection).await {
        Ok(_) => return Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.forget(namespace, connection);
    let jobs = format!("{namespace}/");
    ctx.with_memory(|m| {
        m.running
            .retain(|key, r| !(key.starts_with(&jobs) && r.connection_name == connection))
    });
    mark_orphaned_selections(ctx, namespace, connection).await
}

/// Marks every SelectiveSync in `namespace` whose `connectionRef` is `connection` (which does
/// not exist) as pointing at a connection that does not exist.
async fn mark_orphaned_selections(
    ctx: &Context,
    namespace: &str,
    connection: &str,
) -> Result<(), Error> {
    let Some(caches) = ctx.caches.get() else {
        return Ok(());
    };
    let orphans: Vec<String> = caches
        .selections
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(namespace))
        .filter(|s| {
            s.data
                .pointer("/spec/connectionRef/name")
                .and_then(|v| v.as_str())
                == Some(connection)
        })
        .map(|s| s.name_any())
        .collect();
    let api: Api<SelectiveSync> = Api::namespaced(ctx.client.clone(), namespace);
    for name in orphans {
        // Read afresh: the cache may predate this function's own last write.
        let current = match api.get(&name).await {
            Ok(s) => s,
            Err(kube::Error::Api(s)) if s.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        update_selection_status(&api, current, |current| {
            status::orphan_selection_status(
                &current.status.clone().unwrap_or_default(),
                current.metadata.generation.unwrap_or(0),
                connection,
                Timestamp::now(),
            )
        })
        .await?;
    }
    Ok(())
}

/// The deletion path: wait for a running sync (bounded), delete the Jobs and ConfigMaps,
/// release the connection's hold on the engine's events, drop the finalizer. Warehouse data is
/// never touched.
pub(super) async fn cleanup(conn: &WarehouseConnection, ctx: &Context) -> Result<Action, Error> {
    if !conn.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    let ns = conn.namespace().unwrap_or_default();
    let jobs = observe::jobs(ctx, conn, observe::Listing::Cached).await?;
    let views: Vec<plan::JobView> = jobs.iter().map(observe::job_view).collect();
    let deleted_at = conn
        .meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    match plan::plan_deletion(now, deleted_at, &views) {
        Deletion::WaitForJob { job, requeue_after } => {
            tracing::info!(%job, "deletion waits for the running sync");
            Ok(Action::requeue(requeue_after))
        }
        Deletion::Cleanup { delete } => {
            for job in &delete {
                delete_job(ctx, &ns, job).await?;
            }
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            for cm in cms
                .list(&ListParams::default().labels(&build::selector(&conn.name_any())))
                .await?
                .items
            {
                match cms
                    .delete(&cm.name_any(), &DeleteParams::background())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            remove_token_secret_after_last(ctx, conn, &ns).await?;
            release_retention_hold(ctx, conn, &ns).await;
            let others: Vec<&String> = conn
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .collect();
            let finalizers = if others.is_empty() {
                serde_json::Value::Null
            } else {
                json!(others)
            };
            let fields = serde_json::Map::from_iter([("finalizers".into(), finalizers)]);
            match patch_metadata(ctx, conn, fields).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            // Looked at again now that this connection's finalizer is gone: connections deleted
            // together each saw the others still cleaning up above, and kept the Secret. Of
            // them, the last to drop its finalizer sees none left here. Nothing retries this
            // (the connection is gone), so a failure is logged.
            if let Err(e) = remove_token_secret_after_last(ctx, conn, &ns).await {
                tracing::warn!(error = %e, secret = build::ENGINE_TOKEN_SECRET, "could not delete the namespace's engine token Secret after its last connection");
            }
            ctx.metrics.forget(&ns, &conn.name_any());
            let uid = conn.uid().unwrap_or_default();
            ctx.with_memory(|m| {
                m.tests.remove(&uid);
                m.jobs
                    .retain(|k| !delete.iter().any(|j| *k == format!("{ns}/{j}")));
                m.unannounced
                    .retain(|k, _| !delete.iter().any(|j| *k == format!("{ns}/{j}")));
                m.running.retain(|_, r| r.connection != uid);
                m.cleaned.retain(|_, owner| *owner != uid);
            });
            tracing::info!(
                jobs = delete.len(),
                "connection cleaned up; warehouse data is left in place"
            );
            Ok(Action::await_change())
        }
    }
}

/// Removes the connection's feed consumer from the engine, so that its event retention no longer
/// keeps what the connection had not loaded. Best effort: a failure (no token, no engine — as at
/// uninstall —, an error answer) is logged and said in a Warning Event with the command that
/// releases it by hand, and the deletion goes on.
async fn release_retention_hold(ctx: &Context, conn: &WarehouseConnection, ns: &str) {
    let name = conn.name_any();
    let Err(e) = feed_consumer::release(ctx, ns, &name).await else {
        tracing::info!("the engine's feed consumer of this connection is removed");
        return;
    };
    let url = feed_consumer::consumer_url(&ctx.settings.job.engine_url, ns, &name)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| {
            format!(
                "{}/v1/feed-consumers/{ns}/{name}",
                ctx.settings.job.engine_url.trim_end_matches('/')
            )
        });
    tracing::warn!(error = %e, %url, "the engine's feed consumer of this connection could not be removed; the deletion goes on");
    publish(
        ctx,
        &conn.object_ref(&()),
        &Note::RetentionHoldNotReleased(url, e.to_string()),
    )
    .await;
}
