//! The engine's HTTP/1.1 server: axum's router over hyper, with the limits `axum::serve` does
//! not set — a deadline on each request's headers, a cap on their size and on open
//! connections — and a graceful shutdown with a deadline.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Largest request head (the request line and its headers) a client may send: beyond it the
/// engine answers 431 and closes the connection. Segment's SDKs send well under 2 KB.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Connections accepted beyond [`Limits::max_connections`]: each serves one request — the
/// kubelet's probes and Prometheus' scrape as usual, anything else a 503 with `Retry-After` —
/// and closes. Without them, clients holding every connection (idle keep-alives, for up to the
/// header timeout) left the probes waiting in the listen backlog, and the kubelet restarted an
/// engine that was only busy.
pub const OVERFLOW_CONNECTIONS: usize = 64;

/// How long an overflow connection may take to send its one request's headers.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a graceful shutdown waits for the connections still open (requests in flight, a
/// client slow to send its headers) before it closes them: under the 30 s Kubernetes gives a
/// pod between SIGTERM and SIGKILL. Requests whose events were queued are committed by the
/// writer all the same (it drains its queue); their clients, unanswered, retry, and the
/// messageId keeps the retry from being stored twice.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(25);

/// The limits of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection stays open waiting for its next request.
    pub header_timeout: Duration,
    /// Most connections open at once; the next waits in the listen backlog until one closes.
    pub max_connections: usize,
}

/// Serves `app` on `listener` (and `overflow_app` on the few connections accepted beyond
/// `limits.max_connections`, see [`super::http::overflow_router`]) until `stop` turns true, then stops accepting, lets open
/// connections finish their requests (idle ones close at once) for up to
/// [`SHUTDOWN_DEADLINE`], and closes the rest.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    overflow_app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    let mut overflow_http = http.clone();
    overflow_http
        .keep_alive(false)
        .header_read_timeout(limits.header_timeout.min(OVERFLOW_HEADER_TIMEOUT));
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(&listener, &open, &overflow) => accepted,
        };
        let Some((stream, permit, overflowed)) = accepted else {
            continue;
        };
        let (builder, app) = if overflowed {
            (&overflow_http, &overflow_app)
        } else {
            (&http, &app)
        };
        // The peer's address rides on each request (`ConnectInfo`, as `axum::serve` gives
        // it): a source that fills in `context.ip` falls back on it.
        let peer = stream.peer_addr().ok();
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::http::Request<_>| {
                if let Some(peer) = peer {
                    request.extensions_mut().insert(ConnectInfo(peer));
                }
                collapse_slashes(request)
            },
        ));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let mut stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut connection = pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open {} s after shutdown began were closed",
            SHUTDOWN_DEADLINE.as_secs()
        );
        connections.shutdown().await;
    }
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The next connection, with its permit: one of the open-connection permits, else (all taken)
/// one of the overflow permits (`true`), else it waits for an open-connection permit. `None`
/// when the accept failed (a client that reset, too many open files): logged, and after a
/// pause so that a persistent failure does not spin.
async fn accept(
    listener: &TcpListener,
    open: &Arc<Semaphore>,
    overflow: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    tokio::sync::OwnedSemaphorePermit,
    bool,
)> {
    let (permit, overflowed) = match Arc::clone(open).try_acquire_owned() {
        Ok(p) => (p, false),
        Err(_) => match Arc::clone(overflow).try_acquire_owned() {
            Ok(p) => (p, true),
            Err(_) => (Arc::clone(open).acquire_owned().await.ok()?, false),
        },
    };
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, permit, overflowed))
        }
        Err(e) => {
            tracing::warn!(error = %e, "accepting a connection failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// `request` with the runs of `/` in its path made one (`//v1/batch` → `/v1/batch`): an SDK
/// configured with an endpoint ending in `/` (analytics-go joins `Endpoint + "/v1/batch"`)
/// posts to such a path, which no route matched (a 404, and the SDK dropped the batch).
fn collapse_slashes<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    let uri = request.uri();
    if !uri.path().contains("//") {
        return request;
    }
    let mut path = String::with_capacity(uri.path().len());
    for c in uri.path().chars() {
        if !(c == '/' && path.ends_with('/')) {
            path.push(c);
        }
    }
    if let Some(query) = uri.query() {
        path.push('?');
        path.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = path.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(collapsed) = axum::http::Uri::from_parts(parts) {
            *request.uri_mut() = collapsed;
        }
    }
    request
}

#[cfg(test)]
mod tests {
    /// Runs of `/` are one; the query stays; a path without them is left as it is.
    #[test]
    fn runs_of_slashes_in_a_path_are_one() {
        let path = |uri: &str| {
            let r = axum::http::Request::builder().uri(uri).body(()).unwrap();
            super::collapse_slashes(r).uri().to_string()
        };
        assert_eq!(path("//v1/batch"), "/v1/batch");
        assert_eq!(path("/v1///t?x=a//b"), "/v1/t?x=a//b");
        assert_eq!(path("http://h:1//v1/batch"), "http://h:1/v1/batch");
        assert_eq!(path("/v1/batch"), "/v1/batch");
    }
}
