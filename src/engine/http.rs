//! The HTTP surface: the Tracking API, the change-feed API, health and metrics.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use crate::event::{EventType, Timestamp};
use crate::identity::Rules;
use crate::store::{PreparedEvent, StateTable, StoreError};

use super::feed::{self, DEFAULT_PAGE, MAX_PAGE, ReaderPool};
use super::metrics::Metrics;
use super::reload::{self, Watched};
use super::request::{self, ApiError, Endpoint, MAX_BATCH_BYTES};
use super::retention;
use super::sources::Sources;
use super::writer::Writer;

/// What every handler shares.
pub struct AppState {
    /// Sources by write key, read again when their file changes.
    pub sources: Watched<Sources>,
    /// Held while the sources file is read again and its sources recorded (one at a time).
    pub reloading_sources: tokio::sync::Mutex<()>,
    /// Identity rules (for the blocked-identifier check before queueing).
    pub rules: Rules,
    /// The store writer's queue.
    pub writer: Writer,
    /// One permit per request whose body is being read and parsed.
    pub reading: tokio::sync::Semaphore,
    /// Read handles for the feed API.
    pub readers: Arc<ReaderPool>,
    /// The feed API's bearer token, read again when its file changes; the feed API is closed
    /// when unset.
    pub feed_token: Watched<Option<String>>,
    /// Held while the feed token file is read again (one at a time: two checks racing a change
    /// could otherwise put the older token in use last).
    pub reloading_token: std::sync::Mutex<()>,
    /// Metrics.
    pub metrics: Metrics,
    /// False once shutdown started.
    pub ready: AtomicBool,
    /// True once the writer has loaded the store (requests queue until then).
    pub loaded: tokio::sync::watch::Receiver<bool>,
    /// How long a request's body may take to arrive (503 with `Retry-After` past it).
    pub body_timeout: std::time::Duration,
    /// How long one write may run before `/healthz` reports the writer stalled (never when 0).
    pub stall_timeout: std::time::Duration,
    /// Event retention; `None` keeps every event.
    pub retention: Option<super::retention::Retention>,
    /// True while a retention pass runs (one at a time).
    pub retention_running: AtomicBool,
}

type Shared = Arc<AppState>;

/// The Tracking API's paths and what each takes; each is served with a trailing slash too
/// (analytics-java posts to `/v1/import/`).
const TRACKING_PATHS: [(&str, Endpoint); 15] = [
    ("/v1/identify", Endpoint::Single(EventType::Identify)),
    ("/v1/i", Endpoint::Single(EventType::Identify)),
    ("/v1/track", Endpoint::Single(EventType::Track)),
    ("/v1/t", Endpoint::Single(EventType::Track)),
    ("/v1/page", Endpoint::Single(EventType::Page)),
    ("/v1/p", Endpoint::Single(EventType::Page)),
    ("/v1/screen", Endpoint::Single(EventType::Screen)),
    ("/v1/s", Endpoint::Single(EventType::Screen)),
    ("/v1/group", Endpoint::Single(EventType::Group)),
    ("/v1/g", Endpoint::Single(EventType::Group)),
    ("/v1/alias", Endpoint::Single(EventType::Alias)),
    ("/v1/a", Endpoint::Single(EventType::Alias)),
    ("/v1/batch", Endpoint::Batch),
    ("/v1/b", Endpoint::Batch),
    ("/v1/import", Endpoint::Batch),
];

/// The router with every route.
pub fn router(state: Shared) -> Router {
    let mut r = Router::new();
    for (path, endpoint) in TRACKING_PATHS {
        // Historical events were not sent from where the importer is: `/v1/import` fills in
        // no `context.ip`.
        let live = path != "/v1/import";
        for p in [path.to_string(), format!("{path}/")] {
            r = r.route(
                &p,
                post(
                    move |s: State<Shared>,
                          peer: Option<Extension<ConnectInfo<SocketAddr>>>,
                          h: HeaderMap,
                          b: Body| {
                        let peer = peer.map(|Extension(ConnectInfo(a))| a.ip());
                        ingest(s, h, peer.filter(|_| live), b, endpoint, endpoint.label())
                    },
                ),
            );
        }
    }
    // Browsers (analytics.js) post from the site's origin: without these headers a 200 reads
    // as a failure there, and the library sends the events again and again.
    let r = r.layer(tracking_cors());
    let feeds = Router::new()
        .route("/v1/feeds", get(feed_catalog))
        .route("/v1/feeds/{table}", get(feed_page))
        .route("/v1/feed-consumers", get(retention::list))
        .route(
            "/v1/feed-consumers/{namespace}/{name}",
            put(retention::record).delete(retention::remove),
        )
        .route("/v1/retention", post(retention::run_now))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_feed_request,
        ));
    r.merge(feeds)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `app` as served on the connections [`super::serve`] accepts beyond its limit: only the
/// probes and the scrape are served on those (`overflow_guard`).
pub fn overflow_router(app: Router, state: Shared) -> Router {
    app.layer(axum::middleware::from_fn_with_state(state, overflow_guard))
}

/// Lets the probes and the metrics through and answers anything else 503 with `Retry-After`,
/// as the engine answers when its queue is full — counted in the requests metric under its
/// endpoint, as that answer is (it counted nowhere, and the metric showed no 503s while clients
/// got them).
async fn overflow_guard(
    State(state): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return next.run(request).await;
    }
    let label = endpoint_label(path);
    let response = retry_later(
        request::error_body(
            "overloaded",
            "the engine has as many connections open as it allows; retry after the delay in Retry-After",
        ),
        "1",
    );
    match label {
        Some(label) => counted(&state, label, response),
        None => response,
    }
}

/// The requests metric's `endpoint` label of a path the Tracking API or the feed API serves;
/// `None` for any other path (not counted, as a 404 is not).
fn endpoint_label(path: &str) -> Option<&'static str> {
    feed_label(path).or_else(|| {
        let path = path.strip_suffix('/').unwrap_or(path);
        TRACKING_PATHS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, endpoint)| endpoint.label())
    })
}

/// The feed API's label of `path`: `feeds` (the catalog), `feed_page`, `feed_consumers` or
/// `retention`; `None` for a path the feed API does not serve.
fn feed_label(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "feeds"] => Some("feeds"),
        ["v1", "feeds", table] if !table.is_empty() => Some("feed_page"),
        ["v1", "feed-consumers"] => Some("feed_consumers"),
        ["v1", "feed-consumers", ns, name] if !ns.is_empty() && !name.is_empty() => {
            Some("feed_consumers")
        }
        ["v1", "retention"] => Some("retention"),
        _ => None,
    }
}

/// CORS for the Tracking API, as Segment's own API answers: any origin may post (the write
/// key, not the origin, is the credential; no cookies are read), with any header the browser
/// asks for (analytics.js lets a site add its own: `deliveryStrategy.config.headers`, and a
/// fixed list refused the preflight, so no event was ever sent); preflights are answered for a
/// day. The feed API gets none: it is no browser's.
fn tracking_cors() -> tower_http::cors::CorsLayer {
    use axum::http::Method;
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
        .max_age(std::time::Duration::from_secs(86_400))
}

pub(super) fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn api_error(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        e.body(),
    )
}

async fn read_body(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let gzip = gzipped(headers)?;
    let raw = match Limited::new(body, MAX_BATCH_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::new(
                413,
                format!(
                    "request body exceeds the {} KB batch limit",
                    MAX_BATCH_BYTES / 1024
                ),
            ));
        }
        // A framing error (a bad chunk size, a connection cut mid-body): not a size problem.
        Err(e) => {
            return Err(ApiError::new(
                400,
                format!("the request body could not be read: {e}"),
            ));
        }
    };
    if gzip {
        request::gunzip(&raw, MAX_BATCH_BYTES)
    } else {
        Ok(raw.to_vec())
    }
}

/// Whether the body is gzipped (`Content-Encoding: gzip`, or `x-gzip`, alone or with
/// `identity`s); any other content coding is refused 415 before the body is read, rather than
/// read as plain JSON or misreported as malformed.
fn gzipped(headers: &HeaderMap) -> Result<bool, ApiError> {
    let mut gzip = 0;
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let value = value.to_str().unwrap_or("\u{fffd}");
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip += 1;
            } else if !coding.eq_ignore_ascii_case("identity") {
                return Err(ApiError::new(
                    415,
                    format!(
                        "Content-Encoding {coding:?} is not supported: send gzip or no encoding"
                    ),
                ));
            }
        }
    }
    if gzip > 1 {
        return Err(ApiError::new(
            415,
            "Content-Encoding: a body gzipped more than once is not supported",
        ));
    }
    Ok(gzip == 1)
}

async fn ingest(
    State(state): State<Shared>,
    headers: HeaderMap,
    // The connection's address; `None` on `/v1/import`, which fills in no `context.ip` (and
    // when the socket could not tell it: a connection reset as it was accepted).
    peer: Option<IpAddr>,
    body: Body,
    endpoint: Endpoint,
    label: &'static str,
) -> Response {
    // A client that hangs up before the answer drops this future: its request is still
    // counted (under 499, nginx's "client closed request"), its events perhaps committed.
    let mut unanswered = Unanswered {
        state: Some(Arc::clone(&state)),
        label,
    };
    let response = ingest_inner(&state, &headers, peer, body, endpoint).await;
    unanswered.state = None;
    counted(&state, label, response)
}

/// Counts a request whose answer was never sent (the client went away) when dropped armed.
struct Unanswered {
    state: Option<Shared>,
    label: &'static str,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            state
                .metrics
                .requests
                .with_label_values(&[self.label, "499"])
                .inc();
        }
    }
}

/// Counts `response` in the request metric under `label` and its status.
fn counted(state: &AppState, label: &str, response: Response) -> Response {
    state
        .metrics
        .requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

/// Counts a feed API request under `feeds` (the catalog), `feed_consumers`, `retention` or
/// `feed_page`, and its status.
async fn count_feed_request(
    State(state): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let label = feed_label(request.uri().path()).unwrap_or("feed_page");
    counted(&state, label, next.run(request).await)
}

async fn ingest_inner(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // A write key in the header that no source has is refused before the body is read: such
    // a client never holds a reading permit (sending its body slowly, it would keep real
    // clients out for the body timeout). The header's key wins over a body's writeKey.
    if let Some(key) = request::basic_auth_user(auth)
        && state.sources.get().by_write_key(&key).is_none()
        && {
            // A key of a source just added to the file is not refused: the file is read again.
            reload::reload_sources(state, true).await;
            state.sources.get().by_write_key(&key).is_none()
        }
    {
        // Turned away before its body is read: it counts no event, as the README says of
        // requests refused before parsing (the requests metric has it, under 401).
        return closing(api_error(&ApiError::new(401, request::UNKNOWN_WRITE_KEY)));
    }
    // Under overload a request is turned away without its body being kept or parsed, so
    // rejected requests cost next to nothing while the writer catches up.
    if state.writer.is_full() {
        return turned_away(state, body).await;
    }
    // So are requests beyond the reading capacity: bodies in memory stay bounded however many
    // clients send at once (held until the events are queued, then released).
    let Ok(reading) = state.reading.try_acquire() else {
        return turned_away(state, body).await;
    };
    let read = tokio::time::timeout(state.body_timeout, read_body(headers, body)).await;
    let Ok(read) = read else {
        // A 503, not a 408: the SDKs give a batch up on any 4xx but 429 (analytics-python,
        // the mobile SDKs), and a client on a slow link would lose its events; on a 503 they
        // send them again. The events are counted rejected as `timeout`.
        state
            .metrics
            .events_rejected
            .with_label_values(&["timeout"])
            .inc();
        let why = format!(
            "the request body did not arrive within {} s; send it again",
            state.body_timeout.as_secs_f64()
        );
        return closing(retry_later(request::error_body("timeout", &why), "1"));
    };
    // Validation from here: the body's upload is the client's time, not the engine's.
    let started = Instant::now();
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            state
                .metrics
                .events_rejected
                .with_label_values(&[e.metric_reason()])
                .inc_by(e.events as u64);
            // Too large or too slow: the rest of the body may be unread, so the connection
            // cannot carry another request.
            return closing(api_error(&e));
        }
    };
    let parse = |sources: &Sources| {
        request::parse(
            endpoint,
            &bytes,
            auth,
            sources,
            &state.rules,
            Timestamp::now(),
        )
    };
    let sources = state.sources.get();
    let mut parsed = parse(&sources);
    if parsed
        .as_ref()
        .is_err_and(|e| e.message == request::UNKNOWN_WRITE_KEY)
    {
        // The body's writeKey may be a source's just added to the file.
        reload::reload_sources(state, true).await;
        let now = state.sources.get();
        if !Arc::ptr_eq(&now, &sources) {
            parsed = parse(&now);
        }
    }
    let mut accepted = match parsed {
        Ok(a) => a,
        Err(e) => {
            state
                .metrics
                .events_rejected
                .with_label_values(&[e.metric_reason()])
                .inc_by(e.events as u64);
            return api_error(&e);
        }
    };
    state
        .metrics
        .parse_seconds
        .observe(started.elapsed().as_secs_f64());
    if accepted.source.fill_context_ip
        && let Some(peer) = peer
    {
        let forwarded_for = headers.get("x-forwarded-for").map(HeaderValue::as_bytes);
        if let Some(ip) = request::client_ip(forwarded_for, peer) {
            request::fill_context_ip(&mut accepted.events, ip);
        }
    }
    let count = accepted.events.len();
    let skipped = accepted.skipped;
    if !skipped.is_empty() {
        state
            .metrics
            .events_rejected
            .with_label_values(&["identity_rules"])
            .inc_by(skipped.len() as u64);
    }
    // Serialized here, on the HTTP threads, rather than by the single writer.
    let events = accepted
        .events
        .into_iter()
        .zip(accepted.identifiers)
        .map(|(event, ids)| PreparedEvent::with_identifiers(event, ids))
        .collect();
    let submitted = state.writer.try_submit(events);
    drop(reading);
    let Ok(done) = submitted else {
        return overloaded(state, count);
    };
    state.metrics.queue_depth.set(state.writer.depth() as i64);
    match done.await {
        Ok(Ok(_)) if skipped.is_empty() => json_response(StatusCode::OK, json!({"success": true})),
        // The batch's other messages are stored; the client learns which were left out.
        Ok(Ok(_)) => json_response(StatusCode::OK, skipped_body(&skipped)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "request failed to commit");
            retry_later(
                request::error_body(
                    "unavailable",
                    "the store could not commit the events; nothing was stored, retry",
                ),
                "5",
            )
        }
        Err(_) => retry_later(
            request::error_body("unavailable", "the engine is shutting down; retry"),
            "5",
        ),
    }
}

/// Most messages a 200 lists under `skipped` (a batch of small messages the rules refuse would
/// otherwise be answered with a megabyte): `skippedCount` counts them all.
const MAX_SKIPPED_LISTED: usize = 100;

/// The 200 of a batch whose `skipped` messages the identity rules left out.
fn skipped_body(skipped: &[request::Skipped]) -> serde_json::Value {
    json!({
        "success": true,
        "skipped": &skipped[..skipped.len().min(MAX_SKIPPED_LISTED)],
        "skippedCount": skipped.len(),
    })
}

/// A 503 with `body` and `Retry-After: seconds`.
pub(super) fn retry_later(body: serde_json::Value, seconds: &'static str) -> Response {
    let mut r = json_response(StatusCode::SERVICE_UNAVAILABLE, body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    r
}

/// [`overloaded`] for a request turned away before its body was read. The body is taken in
/// and discarded first (up to the batch limit, within the body timeout), which keeps the
/// connection usable: answering with the body unread makes the server close the connection
/// after the answer, and a client that reuses it (every SDK keeps connections alive) then
/// sees a broken connection instead of a 503. A body past those bounds is answered with
/// `Connection: close`.
async fn turned_away(state: &AppState, body: Body) -> Response {
    let drained = tokio::time::timeout(state.body_timeout, discard(body, MAX_BATCH_BYTES)).await;
    let response = overloaded(state, 0);
    if drained == Ok(true) {
        response
    } else {
        closing(response)
    }
}

/// Reads `body` to its end without keeping it; false if it failed or passed `limit` bytes.
async fn discard(mut body: Body, limit: usize) -> bool {
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > limit {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// `response` with `Connection: close`: for answers sent while part of the request body is
/// still unread, so that the client does not send another request on the connection.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// 503 with `Retry-After` for a request the queue has no room for (`events` of it counted as
/// rejected; 0 when it was turned away before parsing).
fn overloaded(state: &AppState, events: usize) -> Response {
    state
        .metrics
        .events_rejected
        .with_label_values(&["overloaded"])
        .inc_by(events as u64);
    retry_later(
        request::error_body(
            "overloaded",
            "the engine is at capacity; retry after the delay in Retry-After",
        ),
        "1",
    )
}

pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let matches = |token: &Option<String>| {
        token
            .as_deref()
            .is_some_and(|t| feed::token_matches(auth, t))
    };
    let mut token = state.feed_token.get();
    let mut ok = matches(&token);
    // A token other than the one in use may be the file's new one: it is read again.
    if !ok && reload::reload_feed_token(state) {
        token = state.feed_token.get();
        ok = matches(&token);
    }
    if token.is_none() {
        return Some(json_response(
            StatusCode::FORBIDDEN,
            json!({"error": "the feed API is disabled: start the engine with --feed-token-file"}),
        ));
    }
    (!ok).then(|| {
        json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong bearer token"}),
        )
    })
}

/// Query parameters of the feed catalog.
#[derive(serde::Deserialize)]
struct CatalogQuery {
    since: Option<String>,
}

/// A feed query string that does not parse (`after=abc`, `limit=-1`): 400 with a JSON error,
/// as every other refusal of the API, after the token is checked.
fn bad_query(e: &QueryRejection) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": format!("bad query string: {}", e.body_text())}),
    )
}

async fn feed_catalog(
    State(state): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<CatalogQuery>, QueryRejection>,
) -> Response {
    if let Some(denied) = authorize(&state, &headers) {
        return denied;
    }
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return bad_query(&e),
    };
    let since = match q.since.as_deref().map(str::parse::<Timestamp>) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("since: {e}")}),
            );
        }
    };
    match state.readers.read(move |s| feed::catalog(s, since)).await {
        Ok(Ok(doc)) => json_response(StatusCode::OK, doc),
        Ok(Err(e)) => store_unavailable(&e.to_string()),
        Err(e) => store_unavailable(&e),
    }
}

pub(super) fn store_unavailable(e: &str) -> Response {
    tracing::error!(error = e, "feed read failed");
    retry_later(json!({"error": "the store could not be read; retry"}), "5")
}

/// Query parameters of a feed page.
#[derive(serde::Deserialize)]
struct PageQuery {
    after: Option<i64>,
    after_key: Option<String>,
    limit: Option<usize>,
}

/// The page a request asks for: a change log's by `seq`, or a current-state table's by key.
enum PageStart {
    Seq(i64),
    Key(StateTable, Option<Vec<String>>),
}

/// Reads `after` / `after_key` for `table`; `Err` is the 400 to answer.
fn page_start(table: &str, q: &PageQuery) -> Result<PageStart, String> {
    match (StateTable::from_table(table), &q.after_key) {
        (Some(_), Some(_)) | (Some(_), None) if q.after.is_some() => Err(format!(
            "{table} is a current-state table, read by after_key (the previous page's next_after_key), not after"
        )),
        (Some(t), None) => Ok(PageStart::Key(t, None)),
        (Some(t), Some(key)) => match serde_json::from_str::<Vec<String>>(key) {
            Ok(key) if key.len() == t.key_columns().len() => Ok(PageStart::Key(t, Some(key))),
            Ok(_) => Err(format!(
                "after_key: a key of {table} is [{}]",
                t.key_columns().join(", ")
            )),
            Err(e) => Err(format!(
                "after_key must be the JSON array of strings a page's next_after_key gave: {e}"
            )),
        },
        (None, Some(_)) => Err(
            "after_key is for the current-state tables (user_identifiers, user_traits, profile_merges); other feeds are read by after (a seq)"
                .to_string(),
        ),
        (None, None) => Ok(PageStart::Seq(q.after.unwrap_or(0))),
    }
}

async fn feed_page(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(table): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    if let Some(denied) = authorize(&state, &headers) {
        return denied;
    }
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return bad_query(&e),
    };
    let start = match page_start(&table, &q) {
        Ok(start) => start,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let result = state
        .readers
        .read(move |store| match start {
            PageStart::Key(t, after) => {
                feed::state_table_page(store, t, &table, after, limit, feed::MAX_PAGE_BYTES)
                    .map(Some)
            }
            PageStart::Seq(after) => {
                feed::seq_page(store, &table, after, limit, feed::MAX_PAGE_BYTES)
            }
        })
        .await;
    match result {
        Ok(Ok(Some(body))) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Bytes::from(body),
        )
            .into_response(),
        Ok(Ok(None)) => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "unknown table; GET /v1/feeds lists them"}),
        ),
        Ok(Err(e @ StoreError::BadKey(_))) => json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("after_key: {e}")}),
        ),
        Ok(Err(e)) => store_unavailable(&e.to_string()),
        Err(e) => store_unavailable(&e),
    }
}

/// Why the engine cannot write any more, if it cannot: its writer thread ended, or one write has
/// run past the stall timeout (a database server that stopped answering, a lock never let go).
fn writer_failure(state: &AppState) -> Option<String> {
    if state.writer.has_ended() {
        return Some("the store writer has ended".into());
    }
    let running = state.writer.write_running_for()?;
    (!state.stall_timeout.is_zero() && running > state.stall_timeout).then(|| {
        format!(
            "the store writer has been in one write for {:.0} s, past the stall timeout of {} s: \
             the store does not answer",
            running.as_secs_f64(),
            state.stall_timeout.as_secs()
        )
    })
}

/// Liveness: 503 once the engine cannot write any more ([`writer_failure`]), so that the
/// kubelet restarts it; a restart opens new connections, which also ends a transaction it held.
async fn healthz(State(state): State<Shared>) -> Response {
    match writer_failure(&state) {
        Some(why) => {
            tracing::error!(reason = %why, "unhealthy");
            (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
        }
        None => (StatusCode::OK, "ok").into_response(),
    }
}

async fn readyz(State(state): State<Shared>) -> Response {
    if let Some(why) = writer_failure(&state) {
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    } else if !*state.loaded.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "loading the identity graph",
        )
            .into_response()
    } else if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    state.metrics.queue_depth.set(state.writer.depth() as i64);
    state.metrics.write_running_seconds.set(
        state
            .writer
            .write_running_for()
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
