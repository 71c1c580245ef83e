//! The engine (`profiles-sync engine`): the Segment-compatible Tracking API, identity resolution
//! into the profile store, and the change-feed API that sync Jobs read.
//!
//! Requests are validated on the async side and queued to one writer thread that resolves and
//! commits them in groups; a request is answered 200 only once its events are committed.

pub mod feed;
pub mod http;
pub mod metrics;
pub mod reload;
pub mod request;
pub mod retention;
pub mod serve;
pub mod sources;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::identity::Rules;

/// The default of [`EngineConfig::stall_timeout`], in seconds: longer than the ~1 minute after
/// which PostgreSQL ends the transaction of a replica that vanished holding the head lock, so
/// that the replicas waiting on it are not restarted for that. The PostgreSQL store's send
/// timeout (`tcp_user_timeout`) is as long.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 120;

/// The default of [`EngineConfig::queue_capacity`].
pub const DEFAULT_QUEUE_CAPACITY: usize = 64;
/// The default of [`EngineConfig::queue_events`]: five of the writer's largest groups, ~1.5 s
/// of writes at the PostgreSQL store's rate, ~50–70 MB of prepared events.
pub const DEFAULT_QUEUE_EVENTS: usize = 100_000;
/// The default of [`EngineConfig::reading_capacity`].
pub const DEFAULT_READING_CAPACITY: usize = 64;
/// The default of [`EngineConfig::body_timeout`], in seconds.
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 30;
/// The default of [`EngineConfig::header_timeout`], in seconds.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 30;
/// The default of [`EngineConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default of [`EngineConfig::feed_readers`].
pub const DEFAULT_FEED_READERS: usize = 8;

/// How the engine runs (its `Debug` shows neither the store URL's credentials, nor the feed
/// token, nor a write key).
#[derive(Clone)]
pub struct EngineConfig {
    /// Store URL (`sqlite:///path`, `postgres://...`).
    pub store: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Sources and their write keys.
    pub sources: sources::Sources,
    /// Identity resolution rules.
    pub rules: Rules,
    /// Bearer token of the feed API (closed when unset).
    pub feed_token: Option<String>,
    /// The file `sources` was read from: read again when it changes ([`reload`]); `None` keeps
    /// `sources` as they are.
    pub sources_file: Option<std::path::PathBuf>,
    /// The file `feed_token` was read from: read again when it changes ([`reload`]).
    pub feed_token_file: Option<std::path::PathBuf>,
    /// Requests the writer queue holds before answering 503.
    pub queue_capacity: usize,
    /// Events the writer queue holds between its requests before answering 503 (a request is
    /// always taken into an empty queue).
    pub queue_events: usize,
    /// Requests whose bodies are read and parsed at once (each up to the 500 KB batch limit,
    /// plus its decompressed and parsed forms); one more is answered 503 before its body is
    /// read, so the memory held by requests in flight stays bounded.
    pub reading_capacity: usize,
    /// How long a request's body may take to arrive once its headers have: a client that
    /// stalls longer is answered 503 (to send it again), so stalled clients cannot hold the reading capacity (or
    /// a graceful shutdown) for ever.
    pub body_timeout: std::time::Duration,
    /// How long a client may take to send a request's headers (and an idle keep-alive
    /// connection may wait for its next request) before the connection is closed.
    pub header_timeout: std::time::Duration,
    /// Most client connections open at once; beyond them [`serve::OVERFLOW_CONNECTIONS`] more
    /// serve one request each (the probes and `/metrics`; anything else 503), then the backlog.
    pub max_connections: usize,
    /// Most store handles the feed API holds open at once (each a server connection on
    /// PostgreSQL); a feed read beyond them waits for one.
    pub feed_readers: usize,
    /// How long one write of the store writer may run before `/healthz` and `/readyz` answer
    /// 503 (so that the kubelet restarts the engine); zero turns the check off.
    pub stall_timeout: std::time::Duration,
    /// Event retention (`--event-retention`); `None` keeps every event.
    pub retention: Option<retention::Retention>,
    /// How long the engine goes on serving after a shutdown starts, `/readyz` answering 503
    /// "shutting down" meanwhile, before it stops accepting connections and drains: in
    /// Kubernetes the Service's endpoints, kube-proxy and ingress controllers take the pod out
    /// only a few seconds after its SIGTERM, and a connection refused then is a 502 at an
    /// ingress. Zero stops accepting at once.
    pub shutdown_delay: std::time::Duration,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The scheme only: a PostgreSQL URL may carry a password.
        let store = self.store.split("://").next().unwrap_or_default();
        f.debug_struct("EngineConfig")
            .field("store", &format!("{store}://(hidden)"))
            .field("listen", &self.listen)
            .field("sources", &self.sources)
            .field("rules", &self.rules)
            .field("feed_token", &self.feed_token.as_ref().map(|_| "(hidden)"))
            .field("sources_file", &self.sources_file)
            .field("feed_token_file", &self.feed_token_file)
            .field("queue_capacity", &self.queue_capacity)
            .field("queue_events", &self.queue_events)
            .field("reading_capacity", &self.reading_capacity)
            .field("body_timeout", &self.body_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("max_connections", &self.max_connections)
            .field("feed_readers", &self.feed_readers)
            .field("stall_timeout", &self.stall_timeout)
            .field("retention", &self.retention)
            .field("shutdown_delay", &self.shutdown_delay)
            .finish()
    }
}

impl EngineConfig {
    /// The engine on `store`, listening on `listen`, for `sources`, with Segment's identity
    /// rules, the feed API closed, and the default capacities and timeouts.
    pub fn new(store: String, listen: SocketAddr, sources: sources::Sources) -> EngineConfig {
        EngineConfig {
            store,
            listen,
            sources,
            rules: Rules::default(),
            feed_token: None,
            sources_file: None,
            feed_token_file: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            queue_events: DEFAULT_QUEUE_EVENTS,
            reading_capacity: DEFAULT_READING_CAPACITY,
            body_timeout: std::time::Duration::from_secs(DEFAULT_BODY_TIMEOUT_SECS),
            header_timeout: std::time::Duration::from_secs(DEFAULT_HEADER_TIMEOUT_SECS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            feed_readers: DEFAULT_FEED_READERS,
            stall_timeout: std::time::Duration::from_secs(DEFAULT_STALL_TIMEOUT_SECS),
            retention: None,
            shutdown_delay: std::time::Duration::ZERO,
        }
    }
}

/// A started engine: its address, and a handle to stop it.
pub struct RunningEngine {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    writer: std::thread::JoinHandle<()>,
    loaded: tokio::sync::watch::Receiver<bool>,
    /// The feed API's store handles, closed once the server and the writer have stopped.
    readers: Arc<feed::ReaderPool>,
}

impl RunningEngine {
    /// Waits until the writer has loaded the store (`/readyz` answers 200 from then on); it
    /// serves meanwhile, queueing requests until the queue is full.
    pub async fn loaded(&self) {
        let mut loaded = self.loaded.clone();
        // An error means the writer ended: nothing more to wait for.
        let _ = loaded.wait_for(|done| *done).await;
    }

    /// Stops accepting, finishes in-flight requests, drains the writer, closes the store
    /// handles, and returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// A receiver that turns true when shutdown starts.
    pub fn shutdown_sender(&self) -> tokio::sync::watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped (after a shutdown signal) and the writer drained,
    /// then closes the feed API's idle store handles (one still reading, as a retention pass
    /// cut short by the shutdown, closes as its read ends): the store is closed when it returns,
    /// and a copy put in its place is not overwritten by a late close.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await?;
        let (writer, readers) = (self.writer, self.readers);
        tokio::task::spawn_blocking(move || {
            let joined = writer.join();
            readers.close();
            joined
        })
        .await?
        .map_err(|_| anyhow::anyhow!("the store writer panicked"))?;
        Ok(())
    }
}

/// Opens the store, records the sources, and starts serving.
pub async fn start(config: EngineConfig) -> anyhow::Result<RunningEngine> {
    if crate::store::store_url(&config.store) == crate::store::MEMORY_URL {
        // The writer, the feed readers and a reopen after an error each open the store's URL:
        // each would get a database of its own, the feeds would be empty, and a reopen would
        // forget every event (and messageId) stored before it.
        anyhow::bail!(
            "--store {}: an engine needs a store its feed readers can open too; \
             an in-memory SQLite database lives in one connection. \
             Use a file (sqlite:///path/store.db) or PostgreSQL",
            crate::store::MEMORY_URL
        );
    }
    let metrics = metrics::Metrics::new()?;
    let sources = reload::Watched::new(config.sources, config.sources_file, reload::load_sources);
    let (url, rules, infos) = (
        config.store.clone(),
        config.rules.clone(),
        sources.get().infos(),
    );
    let (store, pruned) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut store = crate::store::open(&url, rules)?;
        for s in &infos {
            store.upsert_source(s)?;
        }
        let pruned = store.pruned()?.through_seq;
        Ok((store, pruned))
    })
    .await??;
    // The horizon as of the start, not 0 until the first pass.
    metrics.events_pruned_through.set(pruned);
    match config.retention {
        Some(r) => tracing::info!(
            min_age_seconds = r.min_age.as_secs(),
            interval_seconds = r.interval.as_secs(),
            pruned_through = pruned,
            "event retention on"
        ),
        None => tracing::info!("event retention off: the store keeps every event"),
    }
    let (loaded_tx, loaded) = tokio::sync::watch::channel(false);
    let (writer, writer_thread) = writer::Writer::spawn(
        store,
        config.store.clone(),
        config.rules.clone(),
        (config.queue_capacity, config.queue_events),
        metrics.clone(),
        loaded_tx,
    );
    let readers = feed::ReaderPool::new(config.store, config.feed_readers);
    let state = Arc::new(http::AppState {
        sources,
        reloading_sources: tokio::sync::Mutex::new(()),
        rules: config.rules,
        writer,
        reading: tokio::sync::Semaphore::new(config.reading_capacity.max(1)),
        readers: Arc::clone(&readers),
        feed_token: reload::Watched::new(config.feed_token, config.feed_token_file, |path| {
            reload::load_feed_token(path).map(Some)
        }),
        reloading_token: std::sync::Mutex::new(()),
        metrics,
        ready: AtomicBool::new(true),
        loaded: loaded.clone(),
        body_timeout: config.body_timeout,
        stall_timeout: config.stall_timeout,
        retention: config.retention,
        retention_running: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let app = http::router(state.clone());
    let overflow_app = http::overflow_router(app.clone(), state.clone());
    if let Some(r) = config.retention {
        retention::spawn(state.clone(), r, rx.clone());
    }
    reload::spawn(state.clone(), rx.clone());
    // A shutdown turns `/readyz` to 503 at once; the server stops accepting connections (and
    // drains) only after `shutdown_delay`, while load balancers take the engine out.
    let (stop_serving, serving) = tokio::sync::watch::channel(false);
    let mut stopping = rx.clone();
    let delay = config.shutdown_delay;
    tokio::spawn(async move {
        let _ = stopping.wait_for(|stop| *stop).await;
        state.ready.store(false, Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(
                seconds = delay.as_secs_f64(),
                "shutting down: not ready, still serving while load balancers take the engine out"
            );
            tokio::time::sleep(delay).await;
        }
        let _ = stop_serving.send(true);
    });
    let limits = serve::Limits {
        header_timeout: config.header_timeout,
        max_connections: config.max_connections,
    };
    let server = tokio::spawn(serve::serve(listener, app, overflow_app, limits, serving));
    tracing::info!(%addr, "engine listening");
    Ok(RunningEngine {
        addr,
        shutdown,
        server,
        writer: writer_thread,
        loaded,
        readers,
    })
}
