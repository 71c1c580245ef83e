//! Identity resolution and the profile store: events/s and peak memory resolving a synthetic
//! stream (`SampleGenerator`: browsing, sign-ups, several devices, shared emails, aliases) in
//! memory, persisted to SQLite, and persisted to PostgreSQL. Each scenario runs in its own
//! process so its peak memory is its own.
//!
//! `cargo bench --bench identity` (env `BENCH_PEOPLE`, default 50000: ~330k events a round,
//! three rounds — the same people coming back — so ~1M events). The `replicas` scenario has two
//! writers on one PostgreSQL store take turns, as engine replicas do.
//!
//! `cargo bench --bench identity -- --scenario retention_sqlite` (or `retention_postgres`; part
//! of the default run): event retention's deletion against the ingest of the same events — one
//! round stored, then deleted by the engine's retention steps (5,000 events a transaction),
//! the slowest step (how long SQLite's write lock is held at once), and the store's size after a
//! second round stored into the space the first one freed.
//!
//! `cargo bench --bench identity -- --scenario retention_ids_sqlite` (or
//! `retention_ids_postgres`; env `BENCH_RETENTION_IDS_EVENTS`, default 10M; not part of the
//! default run): the messageId index's runs of deleted events dropped by retention — 10M page
//! events stored, all but the last 2M deleted, then their index entries in steps of 50,000
//! (rate and slowest step), and the ingest of 2M events before and after
//! (`BENCH_SKIP_ID_PRUNE=1`: the same without the drop, the baseline).
//!
//! `cargo bench --bench identity -- --scenario dedupe_sqlite` (or `dedupe_postgres`; env
//! `BENCH_DEDUPE_EVENTS`, default 16M; not part of the default run, it takes minutes): how the
//! messageId dedupe index's upkeep grows with the number of events stored. Page events of 1,000
//! visitors with random UUID messageIds, in batches of 20,000; the ingest rate of each slice of
//! 2M events and its slowest batch.

mod common;
// The throwaway PostgreSQL server of the tests; not every bench uses all of it.
#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;

use std::time::Instant;

use profiles_sync::identity::{IdentityGraph, Rules};
use profiles_sync::store;
use serde_json::json;

const ROUNDS: u64 = 3;

fn people() -> u64 {
    std::env::var("BENCH_PEOPLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

/// Resolution alone: parse outside the clock, resolve (and take the dirty state, as the store
/// does per batch) inside it.
fn resolve() -> serde_json::Value {
    let mut graph = IdentityGraph::new(Rules::default());
    let (mut events, mut secs, mut per_round) = (0u64, 0.0, vec![]);
    for r in 0..ROUNDS {
        let mut in_batch = 0;
        for batch in common::rounds(people(), r) {
            let t = Instant::now();
            for e in &batch {
                let _ = graph.resolve(e);
            }
            in_batch += batch.len();
            if in_batch >= 1000 {
                let _ = graph.take_dirty();
                in_batch = 0;
            }
            secs += t.elapsed().as_secs_f64();
            events += batch.len() as u64;
        }
        per_round.push(json!({"events": events, "profiles": graph.profile_count(), "peak_rss_mib": common::peak_rss_mib()}));
    }
    json!({"scenario": "resolve", "events": events, "seconds": secs, "events_per_sec": events as f64 / secs, "rounds": per_round})
}

/// A store for a scenario: an SQLite file in a temporary directory, or a database on a
/// throwaway PostgreSQL server; both last as long as the directory and server returned.
fn open_store(
    sqlite: bool,
) -> (
    Box<dyn store::Store>,
    tempfile::TempDir,
    Option<pg::PgServer>,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, server) = if sqlite {
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        (url, None)
    } else {
        let server = pg::PgServer::start();
        (server.url(&server.create_database("bench")), Some(server))
    };
    let s = store::open(&url, Rules::default()).expect("open store");
    (s, dir, server)
}

fn persist(kind: &str) -> serde_json::Value {
    let (mut s, _dir, _server) = open_store(kind == "sqlite");
    let (mut events, mut per_round, mut secs) = (0u64, vec![], 0.0);
    // Only the store's ingest (resolution + commit) is timed, not generating and parsing.
    let mut ingest = |pending: Vec<profiles_sync::event::Event>| {
        let t = Instant::now();
        s.ingest(pending).expect("ingest");
        secs += t.elapsed().as_secs_f64();
    };
    for r in 0..ROUNDS {
        let mut pending = Vec::with_capacity(5000);
        for batch in common::rounds(people(), r) {
            events += batch.len() as u64;
            pending.extend(batch);
            if pending.len() >= 5000 {
                ingest(std::mem::take(&mut pending));
            }
        }
        if !pending.is_empty() {
            ingest(pending);
        }
        per_round.push(json!({"events": events, "peak_rss_mib": common::peak_rss_mib()}));
    }
    let stored = s.event_count().expect("count");
    json!({"scenario": kind, "events": events, "stored": stored, "seconds": secs, "events_per_sec": events as f64 / secs, "rounds": per_round, "note": "ingest only: resolution and commits, batches of 5000"})
}

/// Two engine replicas on one PostgreSQL store: after a round through one writer, the next
/// round's events in batches of 100, first all through that writer, then alternately through
/// two (each write follows one by the other). Every write of the second half must first catch
/// up with what the other writer changed.
fn replicas() -> serde_json::Value {
    let server = pg::PgServer::start();
    let url = server.url(&server.create_database("bench"));
    let mut a = store::open(&url, Rules::default()).expect("open store");
    let mut b = store::open(&url, Rules::default()).expect("open store");
    let mut pending = Vec::with_capacity(5000);
    for batch in common::rounds(people(), 0) {
        pending.extend(batch);
        if pending.len() >= 5000 {
            a.ingest(std::mem::take(&mut pending)).expect("ingest");
        }
    }
    a.ingest(pending).expect("ingest");
    let batches: Vec<Vec<profiles_sync::event::Event>> = common::rounds(people(), 1)
        .flatten()
        .take(40_000)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(<[_]>::to_vec)
        .collect();
    let (one, two) = batches.split_at(batches.len() / 2);
    // b's first write loads the whole graph: not part of either timing.
    b.ingest(vec![]).expect("ingest");
    let t = Instant::now();
    for batch in one {
        a.ingest(batch.clone()).expect("ingest");
    }
    let single = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (i, batch) in two.iter().enumerate() {
        let writer = if i % 2 == 0 { &mut a } else { &mut b };
        writer.ingest(batch.clone()).expect("ingest");
    }
    let alternating = t.elapsed().as_secs_f64();
    let events = (one.len() * 100) as f64;
    json!({"scenario": "replicas", "profiles": a.live_profiles(),
           "one_writer_events_per_sec": events / single,
           "two_writers_events_per_sec": (two.len() * 100) as f64 / alternating,
           "note": "batches of 100 after one round; two writers alternate, each catching up with the other"})
}

/// The dedupe index as it grows: page events with random UUID messageIds (what the SDKs send),
/// 1,000 visitors so that resolution stays small, in batches of 20,000. Only the ingest is
/// timed; each slice of 2M events reports its rate and its slowest batch (a batch that merges
/// the recent messageIds into the index commits late).
fn dedupe(kind: &str) -> serde_json::Value {
    let total: u64 = std::env::var("BENCH_DEDUPE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16_000_000);
    let (mut s, _dir, _server) = open_store(kind == "dedupe_sqlite");
    let opts = profiles_sync::event::ParseOptions {
        now: jiff::Timestamp::now(),
        source_id: "bench".into(),
        trust_received_at: true,
    };
    let mut rng = rand::rng();
    const SLICE: u64 = 2_000_000;
    let (mut done, mut slices) = (0u64, vec![]);
    let (mut slice_secs, mut slowest) = (0.0_f64, 0.0_f64);
    while done < total {
        let batch = uuid_pages(&mut rng, &opts, done, DEDUPE_BATCH.min(total - done));
        let n = batch.len() as u64;
        let t = Instant::now();
        s.ingest_prepared(&batch).expect("ingest");
        let secs = t.elapsed().as_secs_f64();
        slice_secs += secs;
        slowest = slowest.max(secs);
        done += n;
        if done % SLICE == 0 || done == total {
            let events = done - slices.len() as u64 * SLICE;
            slices.push(
                json!({"through": done, "events_per_sec": (events as f64 / slice_secs).round(),
                               "slowest_batch_s": (slowest * 1000.0).round() / 1000.0}),
            );
            eprintln!("{}", slices[slices.len() - 1]);
            (slice_secs, slowest) = (0.0, 0.0);
        }
    }
    json!({"scenario": kind, "events": done, "slices": slices, "peak_rss_mib": common::peak_rss_mib(),
           "note": "ingest only; page events of 1,000 visitors, random UUID messageIds, batches of 20,000"})
}

/// A retention pass's cut that deletes every event up to `head`: each is past the window 200
/// days from now, and no consumer holds any back.
fn keep_all_through(head: i64) -> store::Keep {
    let later = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(200 * 24))
        .expect("time");
    store::Keep {
        min_age_seconds: 86_400,
        now_us: later.as_microsecond(),
        head,
    }
}

/// Events a batch of the dedupe scenarios.
const DEDUPE_BATCH: u64 = 20_000;

/// `n` page events of 1,000 visitors with random UUID messageIds, the first numbered `from`.
fn uuid_pages(
    rng: &mut impl rand::Rng,
    opts: &profiles_sync::event::ParseOptions,
    from: u64,
    n: u64,
) -> Vec<profiles_sync::store::PreparedEvent> {
    (0..n)
        .map(|i| {
            let m = json!({"type": "page", "messageId": profiles_sync::sample::uuid_v4(rng),
                           "anonymousId": format!("visitor-{}", (from + i) % 1000), "name": "Home"});
            let e = profiles_sync::event::Event::from_json(&m, None, opts).expect("event");
            profiles_sync::store::PreparedEvent::new(e)
        })
        .collect()
}

/// Retention and the messageId index: `BENCH_RETENTION_IDS_EVENTS` (default 10M) page events
/// with random UUID messageIds stored as in the dedupe scenario, all but the last 2M then
/// deleted by retention's event steps, then the index's runs of deleted events dropped in
/// retention's steps of 50,000 entries (timed, with the slowest step: how long SQLite's write
/// lock is held at once), then 2M more events stored (the writer's filter rebuilt meanwhile).
fn retention_ids(kind: &str) -> serde_json::Value {
    let total: u64 = std::env::var("BENCH_RETENTION_IDS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    const KEPT: u64 = 2_000_000;
    let sqlite = kind == "retention_ids_sqlite";
    let (mut s, dir, _server) = open_store(sqlite);
    let file = dir.path().join("store.db");
    let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    let opts = profiles_sync::event::ParseOptions {
        now: jiff::Timestamp::now(),
        source_id: "bench".into(),
        trust_received_at: true,
    };
    let mut rng = rand::rng();
    let mut stored = 0u64;
    // The rate of ingesting `n` more events.
    let mut ingest = |s: &mut Box<dyn store::Store>, n: u64| {
        let (mut secs, end) = (0.0, stored + n);
        while stored < end {
            let batch = uuid_pages(&mut rng, &opts, stored, DEDUPE_BATCH.min(end - stored));
            let t = Instant::now();
            s.ingest_prepared(&batch).expect("ingest");
            secs += t.elapsed().as_secs_f64();
            stored += batch.len() as u64;
        }
        n as f64 / secs
    };
    ingest(&mut s, total.saturating_sub(KEPT));
    let head = s.head_seq().expect("head");
    let before = ingest(&mut s, KEPT);
    let size_stored = size();
    let keep = keep_all_through(head);
    let t = Instant::now();
    let mut deleted = 0u64;
    loop {
        let step = s.prune_events(&keep, 5_000).expect("prune");
        deleted += step.deleted;
        if step.done {
            break;
        }
    }
    let events_secs = t.elapsed().as_secs_f64();
    let (mut entries, mut runs, mut steps, mut slowest) = (0u64, 0u64, 0u64, 0.0f64);
    let mut first = 0.0f64;
    let t = Instant::now();
    // The baseline: the same without the index's runs dropped.
    let skip = std::env::var("BENCH_SKIP_ID_PRUNE").is_ok_and(|v| v == "1");
    let mut go_on = !skip;
    while go_on {
        let step_start = Instant::now();
        let step = s.prune_message_ids(50_000).expect("prune ids");
        let took = step_start.elapsed().as_secs_f64();
        // The first step also scans the oldest run for its newest seq (outside SQLite's write
        // lock): reported apart.
        if steps == 0 {
            first = took;
        } else {
            slowest = slowest.max(took);
        }
        entries += step.deleted;
        runs += u64::from(step.dropped_run);
        steps += 1;
        go_on = !step.done;
    }
    let ids_secs = t.elapsed().as_secs_f64();
    let size_pruned = size();
    let after = ingest(&mut s, KEPT);
    json!({"scenario": kind, "stored": total, "events_deleted": deleted,
           "events_deleted_per_sec": deleted as f64 / events_secs,
           "index_entries_deleted": entries, "runs_dropped": runs, "id_prune_skipped": skip, "steps": steps,
           "index_entries_deleted_per_sec": entries as f64 / ids_secs, "first_step_ms": first * 1000.0,
           "slowest_later_step_ms": slowest * 1000.0, "ingest_events_per_sec_before": before, "ingest_events_per_sec_after": after,
           "sqlite_file_mib": sqlite.then(|| json!({"stored": size_stored, "after_prune": size_pruned, "after_2m_more": size()})),
           "note": "2M events kept; index entries deleted in steps of 50,000; ingest rates of the 2M events before the deletion and of 2M after"})
}

/// Retention: one round ingested (timed), every event deleted as the engine's pass does, step
/// by step (timed), then a second round ingested into the freed space.
fn retention(kind: &str) -> serde_json::Value {
    let (mut s, dir, _server) = open_store(kind == "retention_sqlite");
    let file = dir.path().join("store.db");
    let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    let ingest = |s: &mut Box<dyn store::Store>, round: u64| {
        let (mut events, mut secs) = (0u64, 0.0);
        let mut pending = Vec::with_capacity(5000);
        for batch in common::rounds(people(), round) {
            pending.extend(batch);
            if pending.len() >= 5000 {
                events += pending.len() as u64;
                let t = Instant::now();
                s.ingest(std::mem::take(&mut pending)).expect("ingest");
                secs += t.elapsed().as_secs_f64();
            }
        }
        events += pending.len() as u64;
        let t = Instant::now();
        s.ingest(pending).expect("ingest");
        (events, secs + t.elapsed().as_secs_f64())
    };
    let (stored, ingest_secs) = ingest(&mut s, 0);
    let size_stored = size();
    let keep = keep_all_through(s.head_seq().expect("head"));
    let (mut deleted, mut steps, mut slowest) = (0u64, 0u64, 0.0f64);
    let t = Instant::now();
    loop {
        let step_start = Instant::now();
        let step = s.prune_events(&keep, 5_000).expect("prune");
        slowest = slowest.max(step_start.elapsed().as_secs_f64());
        deleted += step.deleted;
        steps += 1;
        if step.done {
            break;
        }
    }
    let prune_secs = t.elapsed().as_secs_f64();
    let size_pruned = size();
    let (again, _) = ingest(&mut s, 1);
    json!({"scenario": kind, "stored": stored, "ingest_events_per_sec": stored as f64 / ingest_secs,
           "deleted": deleted, "steps": steps, "prune_seconds": prune_secs,
           "prune_events_per_sec": deleted as f64 / prune_secs, "slowest_step_ms": slowest * 1000.0,
           "sqlite_file_mib": (kind == "retention_sqlite").then(|| json!({"stored": size_stored, "after_prune": size_pruned, "after_second_round": size(), "second_round_events": again})),
           "note": "deletion in steps of 5,000 events, each a transaction; ingest in batches of 5,000"})
}

fn main() {
    if let Some((name, _)) = common::scenario() {
        let result = match name.as_str() {
            "resolve" => resolve(),
            "replicas" => replicas(),
            "dedupe_sqlite" | "dedupe_postgres" => dedupe(&name),
            "retention_sqlite" | "retention_postgres" => retention(&name),
            "retention_ids_sqlite" | "retention_ids_postgres" => retention_ids(&name),
            other => persist(other),
        };
        println!("{result}");
        return;
    }
    println!("identity bench: {} people x {ROUNDS} rounds", people());
    for s in ["resolve", "sqlite", "postgres"] {
        let r = common::run_child(s, &[]);
        println!(
            "{:<9} {:>9} events  {:>8.0} events/s  peak RSS by round (MiB): {}",
            s,
            r["events"],
            r["events_per_sec"].as_f64().unwrap_or(0.0),
            r["rounds"]
                .as_array()
                .map(|a| a
                    .iter()
                    .map(|x| format!("{:.0}", x["peak_rss_mib"].as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(" / "))
                .unwrap_or_default()
        );
        println!("  {r}");
    }
    let r = common::run_child("replicas", &[]);
    println!(
        "replicas  one writer {:>8.0} events/s, two writers taking turns {:>8.0} events/s ({} profiles)",
        r["one_writer_events_per_sec"].as_f64().unwrap_or(0.0),
        r["two_writers_events_per_sec"].as_f64().unwrap_or(0.0),
        r["profiles"]
    );
    println!("  {r}");
    for s in ["retention_sqlite", "retention_postgres"] {
        let r = common::run_child(s, &[]);
        println!(
            "{s:<18} ingest {:>8.0} events/s, retention deletes {:>8.0} events/s (slowest step {:.0} ms)",
            r["ingest_events_per_sec"].as_f64().unwrap_or(0.0),
            r["prune_events_per_sec"].as_f64().unwrap_or(0.0),
            r["slowest_step_ms"].as_f64().unwrap_or(0.0),
        );
        println!("  {r}");
    }
}
