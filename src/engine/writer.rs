//! The single writer: a thread that owns the store's write side and commits queued requests in
//! groups, answering each request only after its events are committed (and so durable).
//!
//! The queue is bounded: when it is full the HTTP layer answers 503 with `Retry-After` instead
//! of buffering, so memory stays bounded under overload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::identity::Rules;
use crate::store::{self, IngestSummary, PreparedEvent, Store, StoreError};

use super::metrics::Metrics;

/// Most events committed in one transaction (several requests are grouped up to this).
const MAX_GROUP_EVENTS: usize = 20_000;

/// The pause before a failed load of the store is tried again; it doubles after each failure
/// up to [`LOAD_RETRY_MAX`].
const LOAD_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between two tries of a failed load.
const LOAD_RETRY_MAX: Duration = Duration::from_secs(30);

/// The pause after a failed load that followed a pause of `pause`: twice as long, at most
/// [`LOAD_RETRY_MAX`].
fn next_load_pause(pause: Duration) -> Duration {
    (pause * 2).min(LOAD_RETRY_MAX)
}

/// A request's events waiting to be committed.
struct Job {
    events: Vec<PreparedEvent>,
    reply: oneshot::Sender<Result<IngestSummary, String>>,
    /// Its share of the queue's event budget, given back once the writer has taken the events
    /// into a group (or the job is dropped unwritten).
    _queued: Queued,
}

/// Events counted against the queue's budget ([`Writer::try_submit`]) until dropped.
struct Queued {
    events: usize,
    counter: Arc<AtomicUsize>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.events, Ordering::Relaxed);
    }
}

/// The queue was full.
#[derive(Debug)]
pub struct Overloaded;

/// The sending side of the writer's queue.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    /// Events in the queue (taken by [`Queued`]s), and the most it may hold.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    clock: WriteClock,
}

/// When the writer's current write began, shared with `/healthz`. A write that never ends (a
/// database server that stopped answering without closing its connections, a lock never let
/// go) is otherwise invisible: the process is up and answers 503s. Loads of the store (at start
/// and after a reconnect) are not writes: `/readyz` reports those.
#[derive(Clone)]
struct WriteClock {
    origin: Instant,
    /// Microseconds from `origin` to the start of the write under way, plus one; 0 when idle.
    started: Arc<AtomicU64>,
}

impl WriteClock {
    fn new() -> WriteClock {
        WriteClock {
            origin: Instant::now(),
            started: Arc::new(AtomicU64::new(0)),
        }
    }

    fn begin(&self) {
        let now = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.started.store(now + 1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    fn running_for(&self) -> Option<Duration> {
        match self.started.load(Ordering::Relaxed) {
            0 => None,
            began => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_micros(began - 1)),
            ),
        }
    }
}

impl Writer {
    /// Starts the writer thread on `store` (reopened from `url` after an error) with a queue of
    /// `capacity` requests holding at most `max_queued` events between them. The thread ends
    /// once every [`Writer`] is dropped and the queue drained.
    pub fn spawn(
        mut store: Box<dyn Store>,
        url: String,
        rules: Rules,
        (capacity, max_queued): (usize, usize),
        metrics: Metrics,
        loaded: tokio::sync::watch::Sender<bool>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel(capacity);
        let clock = WriteClock::new();
        let writing = clock.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let reopen = Reopen { url, rules, loaded };
                if reopen.load(&mut store, false, &metrics, &mut rx, &mut Held::new()) {
                    run(store, reopen, rx, &Context { metrics, writing })
                }
            })
            .unwrap_or_else(|e| panic!("cannot start the store writer thread: {e}"));
        (
            Writer {
                tx,
                capacity,
                queued: Arc::new(AtomicUsize::new(0)),
                max_queued: max_queued.max(1),
                clock,
            },
            handle,
        )
    }

    /// Queues events; the receiver resolves once they are committed. Fails at once when full:
    /// its requests all taken, or its events with these would be more than it may hold (a
    /// request is always taken into an empty queue, whatever its size). The requests' count
    /// alone left memory to the batches' sizes: a 500 KB batch of tiny messages is ~19,000
    /// events, ~10 MB once prepared.
    pub fn try_submit(
        &self,
        events: Vec<PreparedEvent>,
    ) -> Result<oneshot::Receiver<Result<IngestSummary, String>>, Overloaded> {
        let n = events.len();
        self.queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                (q == 0 || q + n <= self.max_queued).then_some(q + n)
            })
            .map_err(|_| Overloaded)?;
        let queued = Queued {
            events: n,
            counter: self.queued.clone(),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Job {
                events,
                reply,
                _queued: queued,
            })
            .map_err(|_| Overloaded)?;
        Ok(rx)
    }

    /// Whether the queue is full (a request now would be turned away): every request's place
    /// taken, or every event's.
    pub fn is_full(&self) -> bool {
        self.tx.capacity() == 0 || self.queued.load(Ordering::Relaxed) >= self.max_queued
    }

    /// Requests waiting in the queue.
    pub fn depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Whether the writer thread has ended (it only does on a panic while the engine runs).
    pub fn has_ended(&self) -> bool {
        self.tx.is_closed()
    }

    /// How long the write under way has been running (`None` between writes).
    pub fn write_running_for(&self) -> Option<Duration> {
        self.clock.running_for()
    }
}

/// What the writer thread records into: the metrics and the clock of the write under way.
struct Context {
    metrics: Metrics,
    writing: WriteClock,
}

type Reply = oneshot::Sender<Result<IngestSummary, String>>;

/// Requests taken from the queue and not yet answered (a refused group being split), each with
/// the range of its events in the group.
type Held = std::collections::VecDeque<(Reply, std::ops::Range<usize>)>;

fn run(mut store: Box<dyn Store>, reopen: Reopen, mut rx: mpsc::Receiver<Job>, cx: &Context) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut count = jobs[0].events.len();
        while count < MAX_GROUP_EVENTS {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // One vector for the group; each request keeps the range of its events in it.
        let mut events = Vec::with_capacity(count);
        let mut requests: Vec<(Reply, std::ops::Range<usize>)> = Vec::with_capacity(jobs.len());
        for job in jobs {
            let start = events.len();
            events.extend(job.events);
            requests.push((job.reply, start..events.len()));
        }
        match ingest(&mut *store, &events, cx) {
            Ok(summary) => {
                for (reply, _) in requests {
                    let _ = reply.send(Ok(summary.clone()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = requests.len(), "store commit failed; the group was not stored");
                if e.is_data_refusal() && requests.len() > 1 {
                    // The store refused the data (a constraint, a value), which may be one
                    // request's alone: commit the group's requests one by one, so the others
                    // still succeed. A failure of the store itself on the way fails the rest
                    // without trying them.
                    let (mut broken, mut reopening): (Option<String>, bool) = (None, false);
                    let mut pending: Held = requests.into();
                    if !reopen.load(&mut store, false, &cx.metrics, &mut rx, &mut pending) {
                        return;
                    }
                    while let Some((reply, range)) = pending.pop_front() {
                        if let Some(error) = &broken {
                            let _ = reply.send(Err(error.clone()));
                            continue;
                        }
                        let result = ingest(&mut *store, &events[range], cx);
                        let mut refused = false;
                        if let Err(e) = &result {
                            tracing::warn!(error = %e, "a request failed to commit on its own; it was not stored");
                            if e.is_data_refusal() {
                                refused = true;
                            } else {
                                reopening = reopen.due(e);
                                broken = Some(e.to_string());
                            }
                        }
                        // Answered before the graph is loaded again.
                        let _ = reply.send(result.map_err(|e| e.to_string()));
                        if refused
                            && !reopen.load(&mut store, false, &cx.metrics, &mut rx, &mut pending)
                        {
                            return;
                        }
                    }
                    if broken.is_some()
                        && !reopen.load(
                            &mut store,
                            reopening,
                            &cx.metrics,
                            &mut rx,
                            &mut Held::new(),
                        )
                    {
                        return;
                    }
                } else {
                    // Answered before the store is reopened: the clients need not wait for
                    // that to retry.
                    let due = reopen.due(&e);
                    for (reply, _) in requests {
                        let _ = reply.send(Err(e.to_string()));
                    }
                    if !reopen.load(&mut store, due, &cx.metrics, &mut rx, &mut Held::new()) {
                        return;
                    }
                }
            }
        }
        store::drop_later(events);
    }
}

/// Loads the identity graph and the messageIds before the first write
/// ([`Store::warm_up`](crate::store::Store::warm_up)), logging how long it took.
fn warm_up(store: &mut dyn Store, metrics: &Metrics) -> Result<(), StoreError> {
    let started = Instant::now();
    store.warm_up()?;
    record_profiles(store, metrics);
    tracing::info!(
        profiles = store.live_profiles(),
        seconds = started.elapsed().as_secs_f64(),
        "identity graph and messageId filter loaded"
    );
    Ok(())
}

/// Sets the live-profiles gauge from the store's graph.
fn record_profiles(store: &dyn Store, metrics: &Metrics) {
    metrics
        .profiles
        .set(i64::try_from(store.live_profiles()).unwrap_or(i64::MAX));
}

/// Ingests `events` in one transaction, recording latency and outcome metrics.
fn ingest(
    store: &mut dyn Store,
    events: &[PreparedEvent],
    cx: &Context,
) -> Result<IngestSummary, StoreError> {
    let metrics = &cx.metrics;
    let started = Instant::now();
    cx.writing.begin();
    let result = store.ingest_prepared(events);
    cx.writing.end();
    let took = started.elapsed();
    // A failed ingest has no resolution time to report; all of it counts as the commit.
    let resolving = result.as_ref().map(|s| s.resolve_time).unwrap_or_default();
    if result.is_ok() {
        metrics.resolve_seconds.observe(resolving.as_secs_f64());
    }
    metrics
        .commit_seconds
        .observe(took.saturating_sub(resolving).as_secs_f64());
    if let Ok(summary) = &result {
        metrics.events_accepted.inc_by(summary.accepted as u64);
        metrics.events_duplicate.inc_by(summary.duplicates as u64);
        metrics
            .profiles_created
            .inc_by(summary.profiles_created as u64);
        metrics.merges.inc_by(summary.merges as u64);
        record_profiles(store, metrics);
        if summary.traits_dropped > 0 {
            tracing::warn!(
                traits = summary.traits_dropped,
                "new traits not added to profiles that hold caps.max_traits_per_profile already (the events are stored with them)"
            );
        }
        for (index, reason) in &summary.rejected {
            tracing::warn!(index, reason, "event refused by identity resolution");
            metrics
                .events_rejected
                .with_label_values(&["resolution"])
                .inc();
        }
    }
    result
}

/// What the writer reopens its store with after a database error.
struct Reopen {
    url: String,
    rules: Rules,
    /// `/readyz`'s "loaded": false while a reopened store loads.
    loaded: tokio::sync::watch::Sender<bool>,
}

impl Reopen {
    /// Whether `e` calls for a new connection: a database error other than a refusal of the
    /// data (a broken connection would fail every later group). If so `/readyz` says "loading"
    /// from now until [`Reopen::load`] has loaded the new one.
    fn due(&self, e: &StoreError) -> bool {
        let due = !e.is_data_refusal()
            && matches!(
                e,
                StoreError::Postgres(_) | StoreError::Sqlite(_) | StoreError::CopyStream(_)
            );
        if due {
            self.loaded.send_replace(false);
        }
        due
    }

    /// Loads the graph and the messageIds of `store` before its next write, as at start — on a
    /// new connection first when `reconnect` ([`Reopen::due`] after a database error), else on
    /// the one kept (after a refused write, whose events its graph had resolved). Without the
    /// write lock, so that the other replicas of a PostgreSQL store go on writing meanwhile,
    /// untimed by the stall check, and with `/readyz` saying "loading", so that traffic goes to
    /// them; requests wait in the queue. While it fails (the database unreachable, a query
    /// refused) it is tried again, on a new connection, after a pause that doubles from
    /// [`LOAD_RETRY_FIRST`] to [`LOAD_RETRY_MAX`], still "loading", and the requests that queue
    /// meanwhile are answered 503 with the reason, as are the `held` ones (whose handlers a
    /// graceful shutdown would wait for): an engine never turns ready with its graph unloaded
    /// (it used to, its next write then loading the graph under the head lock). False when the
    /// engine stopped (its queue closed) before the store could be loaded.
    fn load(
        &self,
        store: &mut Box<dyn Store>,
        mut reconnect: bool,
        metrics: &Metrics,
        rx: &mut mpsc::Receiver<Job>,
        held: &mut Held,
    ) -> bool {
        self.loaded.send_replace(false);
        let mut pause = LOAD_RETRY_FIRST;
        loop {
            let opened = if reconnect {
                store::open(&self.url, self.rules.clone()).map(|s| {
                    *store = s;
                    reconnect = false;
                })
            } else {
                Ok(())
            };
            let failure = match opened.and_then(|()| warm_up(&mut **store, metrics)) {
                Ok(()) => {
                    self.loaded.send_replace(true);
                    return true;
                }
                Err(e) => e,
            };
            metrics.load_failures.inc();
            tracing::error!(
                error = %failure,
                retry_in_seconds = pause.as_secs(),
                "loading the store failed; the engine stays unready and tries again"
            );
            // The connection may be what failed: the next try opens a new one.
            reconnect = true;
            // Until then, requests are answered at once (their clients retry), not held: a
            // graceful shutdown waits for them.
            let why = format!("the store could not be loaded: {failure}");
            for (reply, _) in held.drain(..) {
                let _ = reply.send(Err(why.clone()));
            }
            let until = Instant::now() + pause;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                while let Ok(job) = rx.try_recv() {
                    let _ = job.reply.send(Err(why.clone()));
                }
                if rx.is_closed() {
                    return false;
                }
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
            pause = next_load_pause(pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that cannot be loaded is tried again after 1 s, then 2, 4, … up to 30 s: never
    /// in a loop that spins against the database, never more than 30 s after it is back.
    #[test]
    fn failed_loads_are_retried_after_pauses_doubling_to_thirty_seconds() {
        let mut pause = LOAD_RETRY_FIRST;
        let mut seen = vec![];
        for _ in 0..8 {
            seen.push(pause.as_secs());
            pause = next_load_pause(pause);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
