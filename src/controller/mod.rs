//! The operator: reconciles WarehouseConnections (and their SelectiveSyncs), tests connections,
//! schedules and owns the sync Jobs, and writes status, Events and metrics.
//!
//! One reconcile is a pipeline (see `reconcile.rs`): *dereference* (`observe.rs`) → *validate*
//! and *plan* (`plan.rs`, pure) → *build* (`build.rs`, pure) → *apply* → *update status*
//! (`status.rs`, pure folding; written through the status subresource by `apply.rs`). Time comes from an
//! injected clock so the pure steps are tested over simulated hours. A connection's deletion
//! (its finalizer) also removes its feed consumer from the engine (`feed_consumer.rs`), so that
//! the engine's event retention no longer keeps events for it; a periodic pass
//! (`stale_consumers.rs`) removes the feed consumers that outlive their connection all the same.
//!
//! Watches: WarehouseConnections and SelectiveSyncs are watched as `DynamicObject`s and decoded
//! per object, so one malformed object (an older CRD version, a hand-edited field) is reported
//! and skipped instead of breaking the list/watch for every other object. Owned Jobs are watched
//! by metadata; Secrets by metadata too, mapped to the connections that name them.

mod apply;
pub mod build;
pub mod conditions;
pub mod connection_test;
pub mod events;
pub mod feed_consumer;
pub mod metrics;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod stale_consumers;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::crd::{SelectiveSync, WarehouseConnection};
use build::JobSettings;
use connection_test::TestMemory;
use events::Note;

/// The finalizer that lets the controller clean up a connection's Jobs before it goes.
pub const FINALIZER: &str = "profilesync.dev/cleanup";
/// The name the controller reports Events under.
pub const CONTROLLER_NAME: &str = "profiles-sync-controller";
/// The `controller` label value of the reconcile metrics.
pub const METRICS_CONTROLLER: &str = "warehouseconnection";

/// Every Kubernetes API call the controller makes, as (API group, resource, verb): what its
/// ClusterRole must allow (checked against the chart's rules in `tests/controller_rbac.rs`).
pub const API_CALLS: &[(&str, &str, &str)] = &[
    // Watched (list + watch) and read again on a status conflict; listed in every namespace by
    // the collection of stale feed consumers.
    ("profilesync.dev", "warehouseconnections", "list"),
    ("profilesync.dev", "warehouseconnections", "watch"),
    ("profilesync.dev", "warehouseconnections", "get"),
    // Finalizer and annotation acknowledgements (merge patches).
    ("profilesync.dev", "warehouseconnections", "patch"),
    ("profilesync.dev", "warehouseconnections/status", "update"),
    // blockOwnerDeletion on the Jobs it owns.
    (
        "profilesync.dev",
        "warehouseconnections/finalizers",
        "update",
    ),
    ("profilesync.dev", "selectivesyncs", "list"),
    ("profilesync.dev", "selectivesyncs", "watch"),
    ("profilesync.dev", "selectivesyncs", "get"),
    ("profilesync.dev", "selectivesyncs/status", "update"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "create"),
    ("batch", "jobs", "delete"),
    // Adoption of an orphaned Job (owner reference).
    ("batch", "jobs", "patch"),
    ("", "configmaps", "get"),
    ("", "configmaps", "list"),
    ("", "configmaps", "create"),
    ("", "configmaps", "delete"),
    // The credentials Secret (connection test) and the engine token Secret it maintains.
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "secrets", "create"),
    ("", "secrets", "update"),
    // The engine token Secret, with the namespace's last connection.
    ("", "secrets", "delete"),
    ("", "pods", "list"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

/// A source of the current time (tests inject a fixed or stepped one).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(Timestamp::now)
}

/// What the controller was started with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image, engine URL and resource defaults of the sync Jobs.
    pub job: JobSettings,
    /// The file with the engine's feed API token (copied into each namespace's token Secret).
    pub engine_token_file: PathBuf,
    /// Egress IPs to show in each connection's status.
    pub egress_ips: Vec<String>,
    /// How long one connection test may take.
    pub test_timeout: Duration,
}

/// Errors of one reconcile; each becomes a retry (`error_policy`) and a metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The engine token file could not be read.
    #[error("engine token file {path}: {reason}")]
    EngineToken {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The Job's ConfigMap could not be rendered.
    #[error(transparent)]
    Render(#[from] build::RenderError),
    /// The status kept conflicting with concurrent writers.
    #[error("the status of {0} kept conflicting with other writers")]
    StatusConflict(String),
    /// A sync Job's name is taken by a Job this connection does not control.
    #[error(
        "a Job named {0} already exists and is not this connection's: delete or rename it \
         (the controller names each sync Job after its connection and time slot)"
    )]
    JobNameTaken(String),
    /// The engine token Secret's name is taken by a Secret the controller did not make
    /// (`namespace/name`).
    #[error(
        "a Secret named {0} already exists and was not made by profiles-sync (it has no \
         app.kubernetes.io/managed-by=profiles-sync-controller label): the sync Jobs mount the engine's \
         token from a Secret of that name, so recreate that Secret under another name (it is left \
         untouched)"
    )]
    SecretNameTaken(String),
    /// An error the status and an Event have said already (a sync Job that could not be
    /// started): retried, not announced again.
    #[error(transparent)]
    Announced(Box<Error>),
}

impl Error {
    /// The error itself, whether said already or not.
    pub fn root(&self) -> &Error {
        match self {
            Error::Announced(e) => e.root(),
            e => e,
        }
    }

    /// A bounded label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.is_conflict() => "Conflict",
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ApiUnreachable",
            Error::EngineToken { .. } => "EngineToken",
            Error::Render(_) => "Render",
            Error::StatusConflict(_) => "StatusConflict",
            Error::JobNameTaken(_) => "JobNameTaken",
            Error::SecretNameTaken(_) => "SecretNameTaken",
            Error::Announced(e) => e.metric_label(),
        }
    }

    /// Whether the API refused the request itself (a quota, an admission policy, an invalid
    /// object: 4xx other than a conflict or a missing object), or the object could not be made
    /// at all: a retry alone does not help, and the status says so. Timeouts, unreachable
    /// servers and 5xx are not.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(s)) => {
                (400..500).contains(&s.code) && !s.is_conflict() && !s.is_not_found()
            }
            Error::Render(_) => true,
            Error::Announced(e) => e.is_refusal(),
            _ => false,
        }
    }
}

/// What the controller remembers between reconciles (lost on restart, by design: a restarted
/// controller re-tests each connection once and announces the running Jobs it adopts).
#[derive(Default)]
pub struct Memory {
    /// The last connection test per connection uid.
    pub tests: HashMap<String, TestMemory>,
    /// Jobs this process created or adopted (`namespace/name`).
    pub jobs: HashSet<String>,
    /// Jobs this process created or adopted whose Event (`SyncStarted`, `JobAdopted`) has not
    /// been published yet (`namespace/name`): a reconcile that fails after creating or adopting
    /// its Job (a status write refused) leaves the announcement to its retry.
    pub unannounced: HashMap<String, events::Note>,
    /// Sync Jobs this process has seen active (`namespace/name`: running, starting, held by a
    /// queue), with their connection and start: one gone from the listing before it was seen
    /// to end was deleted meanwhile, and is recorded as such (it vanished from the history).
    pub running: HashMap<String, RunningJob>,
    /// Sync Jobs this process deleted right after creating them (their ConfigMap refused), by
    /// `namespace/name`, with their connection's uid: a listing still showing one (the watch
    /// cache behind) does not make it a Job seen active, whose going would be recorded.
    pub cleaned: HashMap<String, String>,
}

/// A sync Job seen active ([`Memory::running`]).
#[derive(Clone, Debug)]
pub struct RunningJob {
    /// The uid of its connection.
    pub connection: String,
    /// The name of its connection.
    pub connection_name: String,
    /// When it started (`status.startTime`, else its creation).
    pub started: Option<jiff::Timestamp>,
    /// A pod of it was seen running.
    pub ran: bool,
}

/// Watch caches of what a reconcile reads (filled by [`run`]'s watches). Without them — the
/// in-memory API of the tests has no watches — reconciles list through the API instead. A stale
/// cache is safe: Job names are deterministic, so creating a Job the cache doesn't show yet
/// answers `AlreadyExists` and the existing Job is used.
pub struct Caches {
    /// The controller's sync Jobs (label `app.kubernetes.io/managed-by`).
    pub jobs: Store<Job>,
    /// Every SelectiveSync, undecoded.
    pub selections: Store<DynamicObject>,
}

/// What the Job cache keeps of a Job: everything but its pod template and managed fields, which
/// no reconcile reads (a third of the memory of a cached Job).
pub fn slim_job(job: &mut Job) {
    job.metadata.managed_fields = None;
    if let Some(spec) = job.spec.as_mut() {
        spec.template.spec = None;
    }
}

/// Whether a cache has received its first complete list.
pub fn cache_ready<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

/// Shared state of every reconcile.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Flags.
    pub settings: Settings,
    /// The clock.
    pub clock: Clock,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// In-memory state.
    pub memory: std::sync::Mutex<Memory>,
    /// The engine's table catalog and when it was fetched.
    pub catalog: tokio::sync::Mutex<Option<(Instant, Option<Vec<String>>)>>,
    /// HTTP client for the engine.
    pub http: reqwest::Client,
    /// Watch caches, once [`run`] (or a benchmark) provides them.
    pub caches: std::sync::OnceLock<Caches>,
}

impl Context {
    /// A context for `client`.
    pub fn new(
        client: Client,
        settings: Settings,
        clock: Clock,
        metrics: metrics::Metrics,
    ) -> Context {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            clock,
            metrics,
            memory: std::sync::Mutex::new(Memory::default()),
            catalog: tokio::sync::Mutex::new(None),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            caches: std::sync::OnceLock::new(),
        }
    }

    /// Now, by the injected clock.
    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// Runs `f` on the in-memory state.
    pub fn with_memory<T>(&self, f: impl FnOnce(&mut Memory) -> T) -> T {
        match self.memory.lock() {
            Ok(mut m) => f(&mut m),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

/// Reads the engine token file (a mounted Secret; re-read each time so rotation is picked up).
pub fn read_token(path: &Path) -> Result<String, Error> {
    crate::engine::feed::read_token_file(path).map_err(|reason| Error::EngineToken {
        path: path.display().to_string(),
        reason,
    })
}

/// The API resource of WarehouseConnections, watched as `DynamicObject`s.
pub fn connection_resource() -> ApiResource {
    ApiResource::erase::<WarehouseConnection>(&())
}

fn error_policy(obj: Arc<DynamicObject>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(connection = %obj.name_any(), namespace = ?obj.namespace(), %error, "reconcile failed; retrying");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[METRICS_CONTROLLER, error.metric_label()])
        .inc();
    let delay = match error.root() {
        Error::Kube(kube::Error::Api(s)) if s.is_conflict() => Duration::from_secs(1),
        _ => Duration::from_secs(15),
    };
    if let Some(note) = failure_note(error) {
        let reference = obj.object_ref(&connection_resource());
        tokio::spawn(async move { apply::publish(&ctx, &reference, &note).await });
    }
    Action::requeue(delay)
}

/// The `ReconcileFailed` Event for a failed reconcile: one failing before its status write (a
/// Job it cannot delete, an owner it cannot set, a permission missing) left the status as it
/// was, and only the controller's log and metrics told. None for an error said already, a
/// conflict (retried at once), or an API that cannot be reached (nor could the Event reach it).
fn failure_note(error: &Error) -> Option<Note> {
    match error {
        Error::Announced(_) => None,
        Error::Kube(kube::Error::Api(s)) if s.is_conflict() => None,
        Error::Kube(e) if !matches!(e, kube::Error::Api(_)) => None,
        e => Some(Note::ReconcileFailed(
            e.metric_label().to_string(),
            e.to_string(),
        )),
    }
}

/// The connections (in `store`) whose credentials Secret is `secret`.
fn connections_using(
    store: &kube::runtime::reflector::Store<DynamicObject>,
    ar: &ApiResource,
    namespace: Option<&str>,
    secret: &str,
) -> Vec<ObjectRef<DynamicObject>> {
    store
        .state()
        .iter()
        .filter(|c| c.namespace().as_deref() == namespace)
        .filter(|c| {
            c.data
                .pointer("/spec/warehouse/credentialsSecretRef/name")
                .and_then(|v| v.as_str())
                == Some(secret)
        })
        .map(|c| {
            let r = ObjectRef::new_with(&c.name_any(), ar.clone());
            match &namespace {
                Some(ns) => r.within(ns),
                None => r,
            }
        })
        .collect()
}

/// Runs the controller until `shutdown` resolves (reconciles in flight finish first), and with
/// it the periodic collection of stale feed consumers. `ready` is set once the connection cache
/// holds its first complete list.
pub async fn run(
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ar = connection_resource();
    let connections: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let selections_ar = ApiResource::erase::<SelectiveSync>(&());
    let selections: Api<DynamicObject> = Api::all_with(client.clone(), &selections_ar);
    let jobs: Api<Job> = Api::all(client.clone());
    let secrets: Api<PartialObjectMeta<Secret>> = Api::all(client.clone());

    // Jobs and SelectiveSyncs are cached from the same watches that trigger reconciles.
    let (jobs_cache, jobs_writer) = reflector::store::<Job>();
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        build::LABEL_MANAGED_BY,
        build::MANAGED_BY
    ));
    let job_events = watcher(jobs, managed)
        .default_backoff()
        .modify(slim_job)
        .reflect(jobs_writer)
        .touched_objects();
    let selections_writer = reflector::store::Writer::new(selections_ar.clone());
    let selections_cache = selections_writer.as_reader();
    let selection_events = watcher(selections, watcher::Config::default())
        .default_backoff()
        .reflect(selections_writer)
        .touched_objects();
    let _ = ctx.caches.set(Caches {
        jobs: jobs_cache,
        selections: selections_cache,
    });

    let controller = Controller::new_with(connections, watcher::Config::default(), ar.clone());
    let store = controller.store();
    let selection_ar = ar.clone();
    let secret_ar = ar.clone();
    let secret_store = store.clone();
    let ready_store = store.clone();
    tokio::spawn(async move {
        // The store's readiness signal wakes only its latest waiter (the controller's own), so
        // this one asks again now and then instead of waiting once.
        loop {
            match tokio::time::timeout(Duration::from_millis(250), ready_store.wait_until_ready())
                .await
            {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::SeqCst);
                    break;
                }
                Ok(Err(_)) => break,
                Err(_) => continue,
            }
        }
    });
    // Stopped with the controller below; a pass cut short is redone by the next start's.
    let collector = tokio::spawn(stale_consumers::run(ctx.clone()));
    controller
        .owns_stream(job_events)
        .watches_stream_with(
            selection_events,
            move |s: DynamicObject| {
                s.data
                    .pointer("/spec/connectionRef/name")
                    .and_then(|v| v.as_str())
                    .map(|name| {
                        let r = ObjectRef::new_with(name, selection_ar.clone());
                        match s.namespace() {
                            Some(ns) => r.within(&ns),
                            None => r,
                        }
                    })
            },
            selections_ar,
        )
        .watches_with(
            secrets,
            (),
            watcher::Config::default(),
            move |s: PartialObjectMeta<Secret>| {
                connections_using(
                    &secret_store,
                    &secret_ar,
                    s.namespace().as_deref(),
                    &s.name_any(),
                )
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            let ctx = ctx.clone();
            async move {
                match result {
                    // A deletion, a SelectiveSync or a requeue named a connection that does
                    // not exist: its metrics go, and the SelectiveSyncs that point at it say so.
                    Err(kube::runtime::controller::Error::ObjectNotFound(r)) => {
                        tokio::spawn(async move {
                            let namespace = r.namespace.clone().unwrap_or_default();
                            if let Err(e) =
                                apply::connection_missing(&ctx, &namespace, &r.name).await
                            {
                                tracing::warn!(error = %e, connection = %r.name, "handling a missing connection failed");
                            }
                        });
                    }
                    Err(e) => tracing::debug!(error = %e, "controller event"),
                    Ok(_) => {}
                }
            }
        })
        .await;
    collector.abort();
}

#[cfg(test)]
mod api_failure_tests;
#[cfg(test)]
mod api_lifecycle_tests;
#[cfg(test)]
mod api_retention_tests;
#[cfg(test)]
mod api_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn a_conflict() -> Error {
        Error::Kube(kube::Error::Api(Box::new(
            kube::core::Status::failure("the object has been modified", "Conflict").with_code(409),
        )))
    }

    /// A failed reconcile is announced by a `ReconcileFailed` Event, unless its error was said
    /// already (a sync Job not started) or is a conflict, retried at once.
    #[test]
    fn a_failed_reconcile_is_announced_unless_said_already_or_a_conflict() {
        let stuck = Error::StatusConflict("analytics".into());
        let note = failure_note(&stuck).expect("announced");
        assert_eq!(note.reason(), "ReconcileFailed");
        let event = note.event();
        // Its kind in the action: the recorder keeps one message per action (another error
        // showed the first's).
        assert_eq!(event.action, "Reconcile:StatusConflict");
        assert_eq!(event.type_, kube::runtime::events::EventType::Warning);
        assert!(
            event.note.unwrap_or_default().contains("kept conflicting"),
            "the error is in the note"
        );
        assert_eq!(failure_note(&Error::Announced(Box::new(stuck))), None);
        let conflict = a_conflict();
        assert_eq!(failure_note(&conflict), None);
        // An API that cannot be reached could not take the Event either.
        let unreachable = Error::Kube(kube::Error::Service("connection refused".into()));
        assert_eq!(failure_note(&unreachable), None);
        // A refusal: announced, under its own action.
        let forbidden = Error::Kube(kube::Error::Api(Box::new(
            kube::core::Status::failure("jobs.batch is forbidden", "Forbidden").with_code(403),
        )));
        let event = failure_note(&forbidden).expect("announced").event();
        assert_eq!(event.action, "Reconcile:ApiError");
        assert_eq!(
            Error::Announced(Box::new(a_conflict()))
                .root()
                .metric_label(),
            "Conflict"
        );
    }
}
