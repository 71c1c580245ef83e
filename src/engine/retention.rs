//! Event retention in the engine (DESIGN §3, `store::retention`): the feed consumers' API and
//! the periodic deletion of events every consumer has loaded and no backfill window still
//! reaches.
//!
//! - `GET /v1/feed-consumers` → the consumers' progress, the retention and its horizon;
//! - `PUT /v1/feed-consumers/{namespace}/{name}` with `{"afterSeq": N, "backfillWindowSeconds": W}`
//!   → records a connection's progress (its sync Job, as its event load starts and after the run);
//! - `DELETE /v1/feed-consumers/{namespace}/{name}` → forgets it (the controller, when the
//!   connection is deleted, or when a record has outlived its connection by an hour); 204
//!   whether or not it was recorded;
//! - `POST /v1/retention` → runs a pass now and says what it deleted (409 when retention is off).
//!
//! All need the feed API's bearer token.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};

use super::http::{AppState, authorize, json_response, store_unavailable};
use crate::event::Timestamp;
use crate::store::{Consumer, Cut, Keep, Pruned, Store, StoreError};

/// Why a pass did not start.
const ALREADY_RUNNING: &str = "a retention pass is already running";

/// Seconds between two passes unless `--retention-interval-secs` says otherwise.
pub const DEFAULT_INTERVAL_SECS: u64 = 600;
/// Events deleted per transaction: each holds SQLite's write lock for tens of milliseconds.
const STEP: usize = 5_000;
/// messageId index entries deleted per transaction (24 bytes each, a few milliseconds).
const ID_STEP: usize = 50_000;
/// The longest backfill window a consumer may record (the CRD's: 5 digits of days).
const MAX_WINDOW_SECONDS: i64 = 99_999 * 86_400;

/// How the engine deletes events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events younger than this stay, whatever the consumers have loaded.
    pub min_age: Duration,
    /// Time between two passes.
    pub interval: Duration,
}

/// `d` in whole seconds, as the store counts windows.
fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// What a pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassOutcome {
    /// Events deleted.
    pub deleted: u64,
    /// Entries of the messageId index deleted (those of runs that indexed only deleted
    /// events).
    pub message_ids_deleted: u64,
    /// The horizon after it.
    pub pruned: Pruned,
    /// The cut as the consumers recorded now allow (each step took it anew).
    pub cut: Cut,
    /// The event its last step stopped at for its age: `seq` and `receivedAt` (microseconds).
    pub blocked_by: Option<(i64, i64)>,
    /// When the consumer that holds the cut lowest last recorded, if one does.
    pub held_since: Option<Timestamp>,
    /// Whether it stopped early (the engine is shutting down): before the cut, or before the
    /// messageId index's entries of deleted events were all dropped.
    pub interrupted: bool,
}

/// One pass: steps of 5,000 events until nothing more is within the cut, then steps of 50,000
/// messageId index entries of runs that only indexed deleted events (`Store::prune_message_ids`),
/// unless `go_on` says stop (it is called between steps, and may wait: the engine's lets its
/// writer go first). Each step takes the cut from the consumers as recorded inside its own
/// transaction (`Store::prune_events`), never past the head as of the pass's start.
pub fn pass(
    store: &mut dyn Store,
    min_age: Duration,
    now: Timestamp,
    go_on: &dyn Fn() -> bool,
) -> Result<PassOutcome, StoreError> {
    pass_counting(store, min_age, now, go_on, &|_, _| {})
}

/// [`pass`], telling `counted` after each step that committed how many events and messageId
/// index entries it deleted: a pass that fails after earlier steps committed has deleted
/// those all the same, and the metrics must say so.
pub fn pass_counting(
    store: &mut dyn Store,
    min_age: Duration,
    now: Timestamp,
    go_on: &dyn Fn() -> bool,
    counted: &dyn Fn(u64, u64),
) -> Result<PassOutcome, StoreError> {
    let keep = Keep {
        min_age_seconds: seconds(min_age),
        now_us: now.as_microsecond(),
        head: store.head_seq()?,
    };
    let mut deleted = 0;
    let step = loop {
        let step = store.prune_events(&keep, STEP)?;
        deleted += step.deleted;
        counted(step.deleted, 0);
        if step.done || !go_on() {
            break step;
        }
    };
    let (message_ids_deleted, interrupted) = if step.done {
        drop_index_runs(store, go_on, counted)
    } else {
        (0, true)
    };
    let consumers = store.consumers()?;
    let cut = crate::store::cut(&consumers, keep.min_age_seconds, now, keep.head);
    let held_since = consumers
        .iter()
        .find(|c| cut.held_by.as_deref() == Some(c.name.as_str()))
        .map(|c| c.updated_at);
    Ok(PassOutcome {
        deleted,
        message_ids_deleted,
        pruned: store.pruned()?,
        cut,
        blocked_by: step.blocked_by,
        held_since,
        interrupted,
    })
}

/// A pass's second part: steps of 50,000 messageId index entries of runs that only indexed
/// deleted events, while `go_on` says so; the entries deleted, and whether it stopped early. A
/// failure is logged and ends it: the events' deletion stands, and the next pass takes the
/// index up again.
fn drop_index_runs(
    store: &mut dyn Store,
    go_on: &dyn Fn() -> bool,
    counted: &dyn Fn(u64, u64),
) -> (u64, bool) {
    let mut deleted = 0;
    loop {
        match store.prune_message_ids(ID_STEP) {
            Ok(step) => {
                deleted += step.deleted;
                counted(0, step.deleted);
                if step.done {
                    return (deleted, false);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping the messageId index's runs of deleted events failed; the next pass tries again");
                return (deleted, false);
            }
        }
        if !go_on() {
            return (deleted, true);
        }
    }
}

/// Runs a pass every `retention.interval` until the engine stops.
pub fn spawn(
    state: Arc<AppState>,
    retention: Retention,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        // The first pass one interval after the start, not at once: a restarting engine has
        // enough to do.
        let first = tokio::time::Instant::now() + retention.interval;
        let mut ticks = tokio::time::interval_at(first, retention.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // Failures are logged by `run_pass`; the next tick tries again.
            let _ = run_pass(&state, retention).await;
        }
    });
}

/// A pass on one of the feed API's store handles, logged and counted, on a task of its own:
/// a request that asked for it and went away (a client's timeout) neither ends the guard
/// against a second pass nor loses the count while the pass goes on.
async fn run_pass(state: &Arc<AppState>, retention: Retention) -> Result<PassOutcome, String> {
    let state = Arc::clone(state);
    tokio::spawn(async move { run_pass_owned(&state, retention).await })
        .await
        .map_err(|e| e.to_string())?
}

/// Longest a pass waits between two steps for the store writer to have nothing to do.
const MAX_YIELD: Duration = Duration::from_secs(1);

/// Between two steps: waits while the store writer has requests queued or a write under way
/// (at most [`MAX_YIELD`]), so that ingest goes first — on SQLite a step holds the one write
/// lock, and a writer retrying on its busy handler would rarely catch the moment between two
/// steps; then whether the pass may go on (not once shutdown has begun).
fn yield_to_writer(state: &AppState) -> bool {
    let until = std::time::Instant::now() + MAX_YIELD;
    while (state.writer.depth() > 0 || state.writer.write_running_for().is_some())
        && std::time::Instant::now() < until
        && state.ready.load(Ordering::Relaxed)
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    state.ready.load(Ordering::Relaxed)
}

/// Held back for longer than this by one consumer's old record, a pass says so.
const STALE_HOLD: Duration = Duration::from_secs(86_400);

async fn run_pass_owned(
    state: &Arc<AppState>,
    retention: Retention,
) -> Result<PassOutcome, String> {
    // One pass at a time per engine: a pass ties up a feed reader (and, on SQLite, the write
    // lock a step at a time), and a second one would only wait on the first's horizon.
    if state
        .retention_running
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(ALREADY_RUNNING.to_string());
    }
    struct Running<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _running = Running(&state.retention_running);
    let shared = Arc::clone(state);
    // Counted step by step: a pass that fails midway keeps the count of what it deleted.
    let (events_pruned, message_ids_pruned) = (
        state.metrics.events_pruned.clone(),
        state.metrics.message_ids_pruned.clone(),
    );
    let outcome = state
        .readers
        .read(move |s| {
            pass_counting(
                s,
                retention.min_age,
                Timestamp::now(),
                &|| yield_to_writer(&shared),
                &|events, ids| {
                    events_pruned.inc_by(events);
                    message_ids_pruned.inc_by(ids);
                },
            )
        })
        .await;
    match outcome {
        Ok(Ok(o)) => {
            state
                .metrics
                .events_pruned_through
                .set(o.pruned.through_seq);
            if let Some((seq, at)) = o.blocked_by
                && at > Timestamp::now().as_microsecond()
            {
                tracing::warn!(
                    seq,
                    received_at = %timestamp_text(at),
                    "an event received in the future (an import's receivedAt) holds every later event back from retention until then"
                );
            }
            if let (Some(holder), Some(since)) = (&o.cut.held_by, o.held_since)
                && Timestamp::now().duration_since(since).as_secs() > STALE_HOLD.as_secs() as i64
            {
                tracing::warn!(
                    consumer = %holder,
                    last_recorded = %since,
                    held_through_seq = o.cut.through_seq,
                    "retention is held back by a connection that has not synced for over a day (suspended, failing before its event load, or deleted while the engine was unreachable): every event after its cursor is kept"
                );
            }
            if o.deleted > 0 || o.message_ids_deleted > 0 {
                tracing::info!(
                    deleted = o.deleted,
                    message_ids_deleted = o.message_ids_deleted,
                    pruned_through = o.pruned.through_seq,
                    held_by = o.cut.held_by.as_deref().unwrap_or("-"),
                    "events past retention deleted"
                );
            }
            Ok(o)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "event retention pass failed");
            Err(e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "event retention pass failed");
            Err(e)
        }
    }
}

/// The URL of the record of consumer `namespace`/`name` on the engine at `base` (a base path
/// is kept; each name is its own percent-encoded path segment, so none reaches another path);
/// `None` for a base that is no URL or takes no path. What the sync and the controller call.
pub fn consumer_url(base: &str, namespace: &str, name: &str) -> Option<reqwest::Url> {
    api_url(base, &["v1", "feed-consumers", namespace, name])
}

/// `base` with `segments` appended to its path, each percent-encoded; `None` for a base that
/// is no URL or takes no path.
pub fn api_url(base: &str, segments: &[&str]) -> Option<reqwest::Url> {
    let mut url = reqwest::Url::parse(base).ok()?;
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(segments);
    Some(url)
}

fn consumer_json(c: &Consumer) -> Value {
    json!({
        "name": c.name,
        "afterSeq": c.after_seq,
        "backfillWindowSeconds": c.window_seconds,
        "updatedAt": c.updated_at.to_string(),
    })
}

/// A time in microseconds as RFC 3339 text (the number itself when out of range).
pub(crate) fn timestamp_text(us: i64) -> String {
    Timestamp::from_microsecond(us).map_or_else(|_| us.to_string(), |t| t.to_string())
}

/// The horizon as the feed catalog and the consumers' list show it.
pub fn pruned_json(p: &Pruned) -> Value {
    json!({
        "throughSeq": p.through_seq,
        "maxReceivedAt": p.max_received_at_us.map(timestamp_text),
        "events": p.by_name.iter().map(|n| json!({
            "type": n.event_type,
            "event": n.event,
            "maxReceivedAt": timestamp_text(n.max_received_at_us),
        })).collect::<Vec<_>>(),
    })
}

/// [`pruned_json`] read back (what the sync reads from the catalog); an engine older than
/// retention has none: nothing deleted.
pub fn pruned_from_json(v: &Value) -> Pruned {
    let micros = |v: &Value| {
        v.as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(|t| t.as_microsecond())
    };
    Pruned {
        through_seq: v["throughSeq"].as_i64().unwrap_or(0),
        max_received_at_us: micros(&v["maxReceivedAt"]),
        by_name: v["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| {
                        Some(crate::store::PrunedName {
                            event_type: n["type"].as_str()?.to_string(),
                            event: n["event"].as_str()?.to_string(),
                            max_received_at_us: micros(&n["maxReceivedAt"])?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn cut_json(c: &Cut) -> Value {
    json!({
        "throughSeq": c.through_seq,
        "receivedBefore": Timestamp::from_microsecond(c.received_before_us)
            .ok()
            .map(|t| t.to_string()),
        "heldBy": c.held_by,
        "windowSeconds": c.window_seconds,
    })
}

fn bad_request(message: String) -> Response {
    json_response(StatusCode::BAD_REQUEST, json!({"error": message}))
}

/// `GET /v1/feed-consumers`.
pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = authorize(&state, &headers) {
        return denied;
    }
    let retention = state.retention;
    let read = state
        .readers
        .read(move |s| {
            let consumers = s.consumers()?;
            let pruned = s.pruned()?;
            let cut = match retention {
                Some(r) => Some(crate::store::cut(
                    &consumers,
                    seconds(r.min_age),
                    Timestamp::now(),
                    s.head_seq()?,
                )),
                None => None,
            };
            Ok((consumers, pruned, cut))
        })
        .await;
    match read {
        Ok(Ok((consumers, pruned, cut))) => json_response(
            StatusCode::OK,
            json!({
                "consumers": consumers.iter().map(consumer_json).collect::<Vec<_>>(),
                "retention": {
                    "enabled": retention.is_some(),
                    "minAgeSeconds": retention.map(|r| r.min_age.as_secs()),
                    "pruned": pruned_json(&pruned),
                    "cut": cut.as_ref().map(cut_json),
                },
            }),
        ),
        Ok(Err(e)) => store_unavailable(&e.to_string()),
        Err(e) => store_unavailable(&e),
    }
}

/// A consumer's name from the path: a Kubernetes namespace and object name (lower-case
/// letters, digits, `-` and `.`), so that no two connections share one.
fn consumer_name(namespace: &str, name: &str) -> Result<String, String> {
    // A DNS label: lower-case letters, digits and '-', a letter or digit at each end.
    let label = |v: &str| {
        !v.is_empty()
            && v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !v.starts_with('-')
            && !v.ends_with('-')
    };
    if !label(namespace) {
        return Err(format!(
            "namespace {namespace:?}: a Kubernetes namespace (lower-case letters, digits and '-', a letter or digit at each end, at most 63)"
        ));
    }
    if name.len() > 253 || !name.split('.').all(label) {
        return Err(format!(
            "name {name:?}: a Kubernetes object name (labels of lower-case letters, digits and '-' joined by '.', at most 253)"
        ));
    }
    Ok(format!("{namespace}/{name}"))
}

/// The consumer a request names, once its token is checked; the refusal otherwise.
fn authorized_name(
    state: &AppState,
    headers: &HeaderMap,
    namespace: &str,
    name: &str,
) -> Result<String, Box<Response>> {
    if let Some(denied) = authorize(state, headers) {
        return Err(Box::new(denied));
    }
    consumer_name(namespace, name).map_err(|why| Box::new(bad_request(why)))
}

/// The body of a consumer's record.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Progress {
    /// Events after this `seq` are still needed.
    after_seq: i64,
    /// The connection's backfill window.
    backfill_window_seconds: i64,
}

/// Most bytes a consumer's record may take: two numbers in JSON need a few dozen.
const MAX_RECORD_BYTES: usize = 1024;

/// The body of a consumer's record, read once the token is checked: at most
/// [`MAX_RECORD_BYTES`], within the engine's body timeout (as the Tracking API's), so that a
/// client without the token can neither make the engine buffer a large body nor hold a
/// connection by sending it slowly.
async fn record_body(state: &AppState, body: Body) -> Result<Bytes, Response> {
    let read = Limited::new(body, MAX_RECORD_BYTES).collect();
    match tokio::time::timeout(state.body_timeout, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("body: over the {MAX_RECORD_BYTES} bytes a consumer's record may take")}),
        )),
        Ok(Err(e)) => Err(bad_request(format!(
            "the request body could not be read: {e}"
        ))),
        Err(_) => Err(json_response(
            StatusCode::REQUEST_TIMEOUT,
            json!({"error": format!(
                "the request body did not arrive within {} s",
                state.body_timeout.as_secs_f64()
            )}),
        )),
    }
}

/// `PUT /v1/feed-consumers/{namespace}/{name}`.
pub async fn record(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Body,
) -> Response {
    let name = match authorized_name(&state, &headers, &namespace, &name) {
        Ok(n) => n,
        Err(refused) => return *refused,
    };
    let body = match record_body(&state, body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let p: Progress = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return bad_request(format!(
                "body: {e}; expected {{\"afterSeq\": N, \"backfillWindowSeconds\": W}}"
            ));
        }
    };
    if p.after_seq < 0 {
        return bad_request(format!("afterSeq {}: a seq, 0 or more", p.after_seq));
    }
    if !(0..=MAX_WINDOW_SECONDS).contains(&p.backfill_window_seconds) {
        return bad_request(format!(
            "backfillWindowSeconds {}: 0 to {MAX_WINDOW_SECONDS}",
            p.backfill_window_seconds
        ));
    }
    let consumer = Consumer {
        name,
        after_seq: p.after_seq,
        window_seconds: p.backfill_window_seconds,
        updated_at: Timestamp::now(),
    };
    no_content(state.readers.read(move |s| s.set_consumer(&consumer)).await)
}

/// 204 for a store write that went through, 503 otherwise.
fn no_content<T>(written: Result<Result<T, StoreError>, String>) -> Response {
    let failed = match written {
        Ok(Ok(_)) => return StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e,
    };
    tracing::error!(error = %failed, "a feed consumer's record could not be written");
    super::http::retry_later(
        json!({"error": "the store could not be written; retry"}),
        "5",
    )
}

/// `DELETE /v1/feed-consumers/{namespace}/{name}`.
pub async fn remove(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let name = match authorized_name(&state, &headers, &namespace, &name) {
        Ok(n) => n,
        Err(refused) => return *refused,
    };
    no_content(state.readers.read(move |s| s.remove_consumer(&name)).await)
}

/// `POST /v1/retention`.
pub async fn run_now(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = authorize(&state, &headers) {
        return denied;
    }
    let Some(retention) = state.retention else {
        return json_response(
            StatusCode::CONFLICT,
            json!({"error": "event retention is off: start the engine with --event-retention"}),
        );
    };
    match run_pass(&state, retention).await {
        Err(e) if e == ALREADY_RUNNING => {
            json_response(StatusCode::CONFLICT, json!({"error": ALREADY_RUNNING}))
        }
        Ok(o) => json_response(
            StatusCode::OK,
            json!({
                "deleted": o.deleted,
                "messageIdsDeleted": o.message_ids_deleted,
                "pruned": pruned_json(&o.pruned),
                "cut": cut_json(&o.cut),
                "blockedBy": o.blocked_by.map(|(seq, at)| json!({"seq": seq, "receivedAt": timestamp_text(at)})),
                "interrupted": o.interrupted,
            }),
        ),
        Err(e) => store_unavailable(&e),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::event::{Event, ParseOptions};
    use crate::identity::Rules;
    use crate::store::{SqliteStore, Tuning};

    /// A store whose messageId index starts a run every 200 entries, holding 1,000 page
    /// events received in 1970.
    fn store_of_old_events(dir: &tempfile::TempDir) -> SqliteStore {
        let mut store = SqliteStore::open(&dir.path().join("s.db"), Rules::default()).unwrap();
        store.set_dedupe(Tuning {
            merge_min: 40,
            merge_chunk: usize::MAX,
            max_run: 200,
            grow_step: 8,
            narrow: false,
            small_filters: false,
        });
        let opts = ParseOptions::new(Timestamp::UNIX_EPOCH, "src");
        for batch in 0..10 {
            let events = (0..100)
                .map(|i| {
                    let v = json!({"type": "page", "messageId": format!("m-{batch}-{i}"), "anonymousId": "a1"});
                    Event::from_json(&v, None, &opts).unwrap()
                })
                .collect();
            store.ingest(events).unwrap();
        }
        store
    }

    /// A pass deletes the events past retention, then the index entries of the runs that
    /// indexed only them, a run a step; told to stop between steps, it stops there.
    #[test]
    fn a_pass_drops_the_index_runs_of_the_events_it_deleted() {
        let week = Duration::from_secs(7 * 86_400);
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of_old_events(&dir);
        let o = pass(&mut store, week, Timestamp::now(), &|| true).unwrap();
        assert_eq!((o.deleted, o.interrupted), (1_000, false));
        // Every run but the newest, which merges still fill.
        assert!(o.message_ids_deleted >= 600, "{o:?}");
        let again = pass(&mut store, week, Timestamp::now(), &|| true).unwrap();
        assert_eq!((again.deleted, again.message_ids_deleted), (0, 0));

        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of_old_events(&dir);
        let asked = Cell::new(0);
        let o = pass(&mut store, week, Timestamp::now(), &|| {
            asked.set(asked.get() + 1);
            false
        })
        .unwrap();
        assert_eq!((o.deleted, o.message_ids_deleted), (1_000, 200));
        assert!(o.interrupted && asked.get() == 1, "{o:?}");
    }

    /// A step of the messageId index that fails (here its count refused, as a full
    /// disk, a lock timeout or a lost connection would) after the pass deleted its events:
    /// the pass still reports the events it deleted (the metrics, `POST /v1/retention`).
    #[test]
    fn a_failed_index_step_keeps_the_events_deleted() {
        let week = Duration::from_secs(7 * 86_400);
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_of_old_events(&dir);
        rusqlite::Connection::open(dir.path().join("s.db"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE UPDATE ON message_id_index
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let o = pass(&mut store, week, Timestamp::now(), &|| true);
        assert_eq!(store.event_count().unwrap(), 0, "the events were deleted");
        let o = o.expect("the pass's outcome");
        assert_eq!((o.deleted, o.message_ids_deleted), (1_000, 0));
    }

    /// An event step that fails after earlier steps of the pass committed (a lock timeout, a
    /// full disk, a lost connection): the pass fails, and what the steps before deleted is
    /// counted all the same (the metrics lost it — review).
    #[test]
    fn a_failed_event_step_keeps_the_count_of_the_steps_before() {
        let week = Duration::from_secs(7 * 86_400);
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("s.db"), Rules::default()).unwrap();
        let opts = ParseOptions::new(Timestamp::UNIX_EPOCH, "src");
        for batch in 0..6 {
            let events = (0..1_000)
                .map(|i| {
                    let v = json!({"type": "page", "messageId": format!("m-{batch}-{i}"), "anonymousId": "a1"});
                    Event::from_json(&v, None, &opts).unwrap()
                })
                .collect();
            store.ingest(events).unwrap();
        }
        let conn = rusqlite::Connection::open(dir.path().join("s.db")).unwrap();
        let last_of_first_step: i64 = conn
            .query_row(
                &format!(
                    "SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET {}",
                    STEP - 1
                ),
                [],
                |r| r.get(0),
            )
            .unwrap();
        conn.execute_batch(&format!(
            "CREATE TRIGGER refuse BEFORE DELETE ON events WHEN OLD.seq > {last_of_first_step}
             BEGIN SELECT RAISE(ABORT, 'refused'); END;"
        ))
        .unwrap();
        let counted = Cell::new((0, 0));
        let o = pass_counting(&mut store, week, Timestamp::now(), &|| true, &|e, i| {
            let (events, ids) = counted.get();
            counted.set((events + e, ids + i));
        });
        assert!(o.is_err(), "{o:?}");
        assert_eq!(store.event_count().unwrap(), 6_000 - STEP as i64);
        assert_eq!(counted.get(), (STEP as u64, 0));
    }
}
