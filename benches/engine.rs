//! The Tracking API under load: sustained events/s through `POST /v1/batch` and request
//! latency (p50/p99), with the SQLite and the PostgreSQL store, measured in the same run as the
//! same HTTP stack parsing and discarding the requests (the ceiling).
//!
//! `cargo bench --bench engine` (env `BENCH_EVENTS`, default 200000; `BENCH_CLIENTS`, default 32;
//! `BENCH_PG_DURABLE`, default 1: the PostgreSQL server commits durably; 0: the tests' server,
//! without fsync).
//!
//! `cargo bench --bench engine -- --scenario retention_sqlite` (env `BENCH_RETENTION_EVENTS`,
//! default 500000; part of the default run): the SQLite engine taking the same load while a
//! retention pass deletes that many old events, against the load alone just before — how much
//! ingest a pass costs (the pass yields to the writer between its steps).

mod common;
// The throwaway PostgreSQL server of the tests; not every bench uses all of it.
#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use profiles_sync::engine::request::{self, Endpoint};
use profiles_sync::engine::sources::Sources;
use profiles_sync::engine::{EngineConfig, start};
use profiles_sync::identity::Rules;
use profiles_sync::sample::SampleGenerator;
use serde_json::{Value, json};

const WRITE_KEY: &str = "bench-key";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sources() -> Sources {
    Sources::from_yaml(&format!(
        "sources:\n  - {{id: bench, name: Bench, slug: bench, writeKey: {WRITE_KEY}}}\n"
    ))
    .expect("sources")
}

/// Request bodies of 100 events each, prepared before the clock starts.
fn bodies(events: usize) -> Vec<Bytes> {
    let start = jiff::Timestamp::now().as_second() - 86_400;
    let mut all: Vec<Value> = vec![];
    let mut round = 0;
    while all.len() < events {
        all.extend(
            SampleGenerator::new(9, 20_000, start)
                .round(round)
                .flatten()
                .map(|mut m| {
                    if let Some(o) = m.as_object_mut() {
                        o.remove("receivedAt");
                    }
                    m
                }),
        );
        round += 1;
    }
    all.truncate(events);
    all.chunks(100)
        .map(|c| Bytes::from(json!({"batch": c}).to_string()))
        .collect()
}

/// Sends every body with `clients` concurrent connections; returns (seconds, latencies in ms,
/// requests turned away).
async fn load(base: &str, bodies: Arc<Vec<Bytes>>, clients: usize) -> (f64, Vec<f64>, usize) {
    let (secs, timed, turned_away) = load_timed(base, bodies, clients).await;
    (
        secs,
        timed.into_iter().map(|(_, l)| l).collect(),
        turned_away,
    )
}

/// [`load`], each latency with when its request was sent (seconds after the load started).
async fn load_timed(
    base: &str,
    bodies: Arc<Vec<Bytes>>,
    clients: usize,
) -> (f64, Vec<(f64, f64)>, usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let turned_away = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Built before the clock starts: a client loads its TLS roots when built.
    let built: Vec<reqwest::Client> = (0..clients).map(|_| reqwest::Client::new()).collect();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in built {
        let (bodies, next, url) = (bodies.clone(), next.clone(), format!("{base}/v1/batch"));
        let turned_away = turned_away.clone();
        tasks.spawn(async move {
            let mut lat = vec![];
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                loop {
                    let s = Instant::now();
                    let r = client
                        .post(&url)
                        .basic_auth(WRITE_KEY, Some(""))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("send");
                    let status = r.status();
                    let _ = r.bytes().await;
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        turned_away.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // Backpressure: retry, as SDKs do (the retry counts in the latency).
                        tokio::task::yield_now().await;
                        continue;
                    }
                    assert!(status.is_success(), "{status}");
                    lat.push(((s - t).as_secs_f64(), s.elapsed().as_secs_f64() * 1000.0));
                    break;
                }
            }
            lat
        });
    }
    let mut lat = vec![];
    while let Some(l) = tasks.join_next().await {
        lat.extend(l.expect("client task"));
    }
    let turned_away = turned_away.load(std::sync::atomic::Ordering::Relaxed);
    (t.elapsed().as_secs_f64(), lat, turned_away)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn scenario(kind: &str) -> Value {
    let events = env("BENCH_EVENTS", 200_000);
    let clients = env("BENCH_CLIENTS", 32);
    let bodies = Arc::new(bodies(events));
    let dir = tempfile::tempdir().expect("temp dir");
    let server;
    let base;
    let mut engine = None;
    if kind == "ceiling" {
        let sources = Arc::new(sources());
        let rules = Arc::new(Rules::default());
        let app = axum::Router::new().route(
            "/v1/batch",
            post(move |headers: HeaderMap, body: Bytes| {
                let (sources, rules) = (sources.clone(), rules.clone());
                async move {
                    let auth = headers
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    match request::parse(
                        Endpoint::Batch,
                        &body,
                        auth,
                        &sources,
                        &rules,
                        jiff::Timestamp::now(),
                    ) {
                        Ok(a) => {
                            drop(a);
                            (StatusCode::OK, "{\"success\":true}")
                        }
                        Err(_) => (StatusCode::BAD_REQUEST, "{}"),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        base = format!("http://{}", listener.local_addr().expect("addr"));
        // The engine's own server (its limits included), so that only the handler differs.
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let limits = profiles_sync::engine::serve::Limits {
            header_timeout: std::time::Duration::from_secs(
                profiles_sync::engine::DEFAULT_HEADER_TIMEOUT_SECS,
            ),
            max_connections: profiles_sync::engine::DEFAULT_MAX_CONNECTIONS,
        };
        tokio::spawn(async move {
            let _stop = _stop;
            // Its 32 clients stay within the connection limit: no overflow connection is used.
            let overflow = app.clone();
            profiles_sync::engine::serve::serve(listener, app, overflow, limits, stop_rx).await
        });
    } else {
        let url = if kind == "sqlite" {
            format!("sqlite://{}", dir.path().join("store.db").display())
        } else {
            // The test harness's client is synchronous: keep it off the async workers. Durable
            // commits, as in production and as SQLite's (`BENCH_PG_DURABLE=0`: the tests' server,
            // without fsync, for comparison with figures from before).
            server = tokio::task::block_in_place(if env("BENCH_PG_DURABLE", 1) == 0 {
                pg::PgServer::start
            } else {
                pg::PgServer::start_durable
            });
            tokio::task::block_in_place(|| server.url(&server.create_database("bench")))
        };
        let e = start(EngineConfig::new(
            url,
            "127.0.0.1:0".parse().expect("addr"),
            sources(),
        ))
        .await
        .expect("engine");
        e.loaded().await;
        base = format!("http://{}", e.addr);
        engine = Some(e);
    }
    let (secs, mut lat, turned_away) = load(&base, bodies, clients).await;
    lat.sort_by(|a, b| a.total_cmp(b));
    if let Some(e) = engine {
        e.stop().await.expect("stop");
    }
    json!({"scenario": kind, "events": events, "seconds": secs, "events_per_sec": events as f64 / secs,
           "p50_ms": pct(&lat, 0.5), "p99_ms": pct(&lat, 0.99), "clients": clients, "turned_away": turned_away, "peak_rss_mib": common::peak_rss_mib()})
}

/// Latency figures of `lat` (ms) over `secs`: requests/s, p50, p99, max.
fn phase(lat: &mut [f64], secs: f64) -> Value {
    lat.sort_by(|a, b| a.total_cmp(b));
    json!({"requests_per_sec": lat.len() as f64 / secs, "p50_ms": pct(lat, 0.5),
           "p99_ms": pct(lat, 0.99), "max_ms": lat.last().copied().unwrap_or(0.0)})
}

/// The SQLite engine's load alone, then the same load while a retention pass deletes
/// `BENCH_RETENTION_EVENTS` old events (stored before the clock starts).
async fn retention_sqlite() -> Value {
    let old = env("BENCH_RETENTION_EVENTS", 500_000);
    let clients = env("BENCH_CLIENTS", 32);
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let received = jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(10 * 24))
        .expect("time")
        .to_string();
    tokio::task::block_in_place(|| {
        let mut store = profiles_sync::store::open(&url, Rules::default()).expect("store");
        let opts = profiles_sync::event::ParseOptions {
            now: jiff::Timestamp::now(),
            source_id: "bench".into(),
            trust_received_at: true,
        };
        let mut n = 0;
        while n < old {
            let batch: Vec<profiles_sync::event::Event> = (n..(n + 5_000).min(old))
                .map(|i| {
                    let m = json!({"type": "track", "messageId": format!("old-{i}"),
                        "anonymousId": format!("a{}", i % 5_000), "event": "Order Completed",
                        "properties": {"total": i % 100, "currency": "EUR"},
                        "receivedAt": received, "timestamp": received});
                    profiles_sync::event::Event::from_json(&m, None, &opts).expect("event")
                })
                .collect();
            n += batch.len();
            store.ingest(batch).expect("ingest");
        }
    });
    let token = "bench-feed-token";
    let config = EngineConfig {
        feed_token: Some(token.into()),
        retention: Some(profiles_sync::engine::retention::Retention {
            min_age: std::time::Duration::from_secs(86_400),
            interval: std::time::Duration::from_secs(86_400),
        }),
        ..EngineConfig::new(url, "127.0.0.1:0".parse().expect("addr"), sources())
    };
    let e = start(config).await.expect("engine");
    e.loaded().await;
    let base = format!("http://{}", e.addr);
    // One load of 400k events (~4 s); a pass asked for 1.5 s in, once the load is steady.
    let each = env("BENCH_EVENTS", 400_000);
    let pass_url = format!("{base}/v1/retention");
    let t = Instant::now();
    let pass = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        let from = t.elapsed().as_secs_f64();
        let r = reqwest::Client::new()
            .post(pass_url)
            .bearer_auth(token)
            .send()
            .await
            .expect("pass");
        let doc: Value = r.json().await.expect("pass answer");
        (from, t.elapsed().as_secs_f64(), doc)
    });
    let (_, timed, _) = load_timed(&base, Arc::new(bodies(each)), clients).await;
    let (from, to, doc) = pass.await.expect("pass task");
    // Requests completed in a window (their latencies), the window before the pass as long as
    // the pass (at most the time since 0.5 s into the load).
    let window = |a: f64, b: f64| -> Vec<f64> {
        timed
            .iter()
            .filter(|(sent, l)| {
                let done = sent + l / 1000.0;
                done >= a && done < b
            })
            .map(|(_, l)| *l)
            .collect()
    };
    let before_from = (from - (to - from)).max(0.5);
    let alone = phase(&mut window(before_from, from), from - before_from);
    let during = phase(&mut window(from, to), to - from);
    let pass_secs = to - from;
    e.stop().await.expect("stop");
    json!({"scenario": "retention_sqlite", "old_events": old, "deleted": doc["deleted"],
           "pass_seconds": pass_secs, "deleted_per_sec": doc["deleted"].as_f64().unwrap_or(0.0) / pass_secs,
           "alone": alone, "during_pass": during, "clients": clients,
           "note": "100-event batches; requests completed per second in the pass's time, and in as long a time just before it"})
}

fn main() {
    if let Some((name, _)) = common::scenario() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        if name == "retention_sqlite" {
            println!("{}", rt.block_on(retention_sqlite()));
        } else {
            println!("{}", rt.block_on(scenario(&name)));
        }
        return;
    }
    let mut ceiling = 0.0;
    for s in ["ceiling", "sqlite", "postgres"] {
        let r = common::run_child(s, &[]);
        let eps = r["events_per_sec"].as_f64().unwrap_or(0.0);
        if s == "ceiling" {
            ceiling = eps;
        }
        println!(
            "{:<8} {:>8.0} events/s  p50 {:>6.1} ms  p99 {:>6.1} ms  ({:.2}x the ceiling)",
            s,
            eps,
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            if ceiling > 0.0 { eps / ceiling } else { 0.0 }
        );
        println!("  {r}");
    }
    let r = common::run_child("retention_sqlite", &[]);
    println!(
        "retention pass on SQLite: {} old events deleted in {:.2} s; ingest alone {:.0} requests/s (p99 {:.1} ms), during the pass {:.0} requests/s (p99 {:.1} ms, max {:.1} ms)",
        r["deleted"],
        r["pass_seconds"].as_f64().unwrap_or(0.0),
        r["alone"]["requests_per_sec"].as_f64().unwrap_or(0.0),
        r["alone"]["p99_ms"].as_f64().unwrap_or(0.0),
        r["during_pass"]["requests_per_sec"].as_f64().unwrap_or(0.0),
        r["during_pass"]["p99_ms"].as_f64().unwrap_or(0.0),
        r["during_pass"]["max_ms"].as_f64().unwrap_or(0.0),
    );
    println!("  {r}");
}
