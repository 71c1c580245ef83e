//! The sync: (a) rows/s loading 1M event rows into PostgreSQL, measured in the same run as
//! `psql \copy` of the same rows from CSV (the ceiling); (b) an idle sync (nothing new) with 10k
//! and with 1M rows of history — time and number of queries; (c) peak memory of backfills of
//! growing size (each in its own process). Not run by default: `--scenario read_stages`, what
//! reading the events feed costs stage by stage.
//!
//! `cargo bench --bench sync` (env `BENCH_ROWS`, default 1000000; `BENCH_ROUNDS`, default 3, the
//! load's sync / `psql \copy` pairs, reported with their medians; `BENCH_PAGE`, default 10000,
//! the sync's page size);
//! `cargo bench --bench sync -- --scenario read_stages`.

mod common;
// The throwaway PostgreSQL server of the tests; not every bench uses all of it.
#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use profiles_sync::crd::{SelectiveSyncSpec, WarehouseConnectionSpec};
use profiles_sync::event::{Event, ParseOptions};
use profiles_sync::identity::Rules;
use profiles_sync::store::{self, Feed, FeedRow, FlatEventRow, SourceInfo};
use profiles_sync::sync::{self, FeedSource, SourceError, StoreSource, SyncOptions};
use profiles_sync::warehouse::{
    self, Cell, Column, Credentials, Dialect, TableColumns, Warehouse, WarehouseError,
};
use serde_json::{Value, json};

fn rows() -> usize {
    std::env::var("BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// A store holding `n` Order Completed events (50k customers), built once per size and reused.
fn build_store(n: usize) -> String {
    let path = std::env::temp_dir().join(format!("profiles-sync-bench-store-{n}.db"));
    let url = format!("sqlite://{}", path.display());
    let mut s = store::open(&url, Rules::default()).expect("store");
    if s.event_count().expect("count") as usize >= n {
        return url;
    }
    let opts = ParseOptions {
        now: jiff::Timestamp::now(),
        source_id: "bench".into(),
        trust_received_at: true,
    };
    let now = jiff::Timestamp::now().as_second() - 86_400;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let m = json!({"type": "track", "messageId": format!("bench-{i}"), "userId": format!("customer-{}", i % 50_000),
            "event": "Order Completed", "receivedAt": jiff::Timestamp::from_second(now + (i as i64 % 86_000)).expect("ts").to_string(),
            "properties": {"order_id": format!("ord-{i}"), "total": (i % 997) as f64 + 0.99, "currency": "EUR", "items": (i % 5) + 1, "coupon": if i % 7 == 0 { json!("SPRING") } else { Value::Null }},
            "context": {"ip": "203.0.113.7", "library": {"name": "analytics.js", "version": "5.2.0"}, "page": {"path": "/checkout"}}});
        batch.push(Event::from_json(&m, None, &opts).expect("event"));
        if batch.len() == 10_000 {
            s.ingest(std::mem::take(&mut batch)).expect("ingest");
        }
    }
    if !batch.is_empty() {
        s.ingest(batch).expect("ingest");
    }
    url
}

fn pg_spec(server: &pg::PgServer, db: &str) -> WarehouseConnectionSpec {
    serde_json::from_value(json!({"warehouse": {"type": "postgres", "postgres": {"host": "127.0.0.1", "port": server.port(), "database": db, "sslMode": "disable"}, "credentialsSecretRef": {"name": "x"}}})).expect("spec")
}

fn only_orders() -> SelectiveSyncSpec {
    serde_json::from_value(json!({"connectionRef": {"name": "bench"}, "default": "none", "tables": [{"name": "order_completed"}]})).expect("selection")
}

fn creds() -> Credentials {
    Credentials {
        username: Some("postgres".into()),
        ..Default::default()
    }
}

fn sync_once(
    url: &str,
    spec: &WarehouseConnectionSpec,
    sel: &SelectiveSyncSpec,
) -> (f64, sync::SyncReport, usize) {
    let mut source = Counting {
        inner: StoreSource(store::open(url, Rules::default()).expect("store")),
        calls: 0,
    };
    let mut inner = warehouse::connect(&spec.warehouse, &spec.schema, &creds()).expect("connect");
    let mut wh = CountingWarehouse {
        inner: &mut *inner,
        calls: 0,
    };
    let t = Instant::now();
    let report = sync::run(
        &mut source,
        &mut wh,
        &SyncOptions {
            id: "bench".into(),
            connection: spec,
            selection: Some(sel),
            page_size: std::env::var("BENCH_PAGE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10_000),
            consumer: None,
            now: jiff::Timestamp::now(),
        },
    );
    (t.elapsed().as_secs_f64(), report, wh.calls + source.calls)
}

/// How many sync / `psql \copy` pairs the load scenario runs (env `BENCH_ROUNDS`, default 3).
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(3)
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rounds of: a first sync of the rows into a fresh database, then `psql \copy` of the same
/// rows from CSV into an identical empty table of it (the ceiling). Each round's ratio pairs two
/// runs made back to back, so the median ratio says more than any one run on a noisy machine.
fn load_vs_copy() -> Value {
    let n = rows();
    let url = build_store(n);
    let server = pg::PgServer::start();
    let csv = std::env::temp_dir().join("profiles-sync-bench-orders.csv");
    let psql = |db: &str, sql: &str| {
        let out = Command::new(server.program("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port().to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut out = vec![];
    for round in 0..rounds() {
        let db = server.create_database("bench");
        let spec = pg_spec(&server, &db);
        let (cpu, machine) = (common::cpu_seconds(), common::machine_cpu_seconds());
        let (secs, report, _) = sync_once(&url, &spec, &only_orders());
        let cpu = common::cpu_seconds() - cpu;
        let machine = common::machine_cpu_seconds() - machine;
        assert_eq!(report.rows.total as usize, n, "{report:?}");
        if round == 0 {
            psql(
                &db,
                &format!(
                    "\\copy (SELECT * FROM profiles_sync.order_completed) TO '{}' CSV",
                    csv.display()
                ),
            );
        }
        psql(
            &db,
            "CREATE TABLE profiles_sync.copy_target (LIKE profiles_sync.order_completed INCLUDING ALL)",
        );
        let (t, copy_machine) = (Instant::now(), common::machine_cpu_seconds());
        psql(
            &db,
            &format!(
                "\\copy profiles_sync.copy_target FROM '{}' CSV",
                csv.display()
            ),
        );
        let copy_secs = t.elapsed().as_secs_f64();
        let copy_machine = common::machine_cpu_seconds() - copy_machine;
        // Each round's database goes once measured (a million rows twice over is disk).
        server
            .connect("postgres")
            .batch_execute(&format!("DROP DATABASE \"{db}\" WITH (FORCE)"))
            .expect("drop the round's database");
        out.push(
            json!({"sync_seconds": secs, "sync_cpu_seconds": cpu, "sync_machine_cpu_seconds": machine,
                   "copy_seconds": copy_secs, "copy_machine_cpu_seconds": copy_machine, "ratio": copy_secs / secs}),
        );
    }
    let _ = std::fs::remove_file(&csv);
    let pick = |key: &str| -> Vec<f64> { out.iter().filter_map(|r| r[key].as_f64()).collect() };
    let (sync_secs, copy_secs) = (
        median(&mut pick("sync_seconds")),
        median(&mut pick("copy_seconds")),
    );
    json!({"scenario": "load", "rows": n, "rounds": out,
           "sync_rows_per_sec": n as f64 / sync_secs,
           "sync_cpu_seconds": median(&mut pick("sync_cpu_seconds")), "copy_rows_per_sec": n as f64 / copy_secs,
           "sync_machine_cpu_seconds": median(&mut pick("sync_machine_cpu_seconds")),
           "copy_machine_cpu_seconds": median(&mut pick("copy_machine_cpu_seconds")),
           "ratio": median(&mut pick("ratio"))})
}

fn idle() -> Value {
    let mut out = vec![];
    for n in [10_000, rows()] {
        let url = build_store(n);
        let server = pg::PgServer::start();
        let db = server.create_database("idle");
        let spec = pg_spec(&server, &db);
        let sel: SelectiveSyncSpec =
            serde_json::from_value(json!({"connectionRef": {"name": "bench"}})).expect("sel");
        sync_once(&url, &spec, &sel);
        let (secs, report, queries) = sync_once(&url, &spec, &sel);
        assert_eq!(report.rows.total, 0);
        out.push(json!({"history": n, "seconds": secs, "queries": queries}));
    }
    json!({"scenario": "idle", "runs": out})
}

fn backfill(n: usize) -> Value {
    let url = build_store(n);
    let server = pg::PgServer::start();
    let db = server.create_database("backfill");
    let spec = pg_spec(&server, &db);
    let before = common::peak_rss_mib();
    let (secs, report, _) = sync_once(&url, &spec, &only_orders());
    json!({"scenario": "backfill", "rows": report.rows.total, "seconds": secs, "peak_rss_mib": common::peak_rss_mib(), "rss_before_mib": before})
}

fn main() {
    if let Some((name, args)) = common::scenario() {
        let r = match name.as_str() {
            "load" => load_vs_copy(),
            "idle" => idle(),
            "read_stages" => read_stages(),
            _ => backfill(args.first().and_then(|a| a.parse().ok()).unwrap_or(100_000)),
        };
        println!("{r}");
        return;
    }
    let r = common::run_child("load", &[]);
    println!(
        "(a) {} rows, medians of {} rounds: sync {:.0} rows/s ({:.2} s of the sync process's CPU, {:.2} s of the machine's), psql \\copy {:.0} rows/s ({:.2} s of the machine's CPU), ratio {:.2}",
        r["rows"],
        r["rounds"].as_array().map_or(0, Vec::len),
        r["sync_rows_per_sec"].as_f64().unwrap_or(0.0),
        r["sync_cpu_seconds"].as_f64().unwrap_or(0.0),
        r["sync_machine_cpu_seconds"].as_f64().unwrap_or(0.0),
        r["copy_rows_per_sec"].as_f64().unwrap_or(0.0),
        r["copy_machine_cpu_seconds"].as_f64().unwrap_or(0.0),
        r["ratio"].as_f64().unwrap_or(0.0)
    );
    println!("  {r}");
    let r = common::run_child("idle", &[]);
    println!("(b) idle sync: {r}");
    let mut sizes = BTreeMap::new();
    for n in [rows() / 4, rows()] {
        let r = common::run_child("backfill", &[&n.to_string()]);
        sizes.insert(n, r["peak_rss_mib"].as_f64().unwrap_or(0.0));
        println!("(c) backfill of {n} rows: {r}");
    }
    println!("(c) peak RSS by backfill size (MiB): {sizes:?}");
}

/// Counts feed requests.
struct Counting<S> {
    inner: S,
    calls: usize,
}

impl<S: FeedSource> FeedSource for Counting<S> {
    fn read(&mut self, feed: &Feed, after: i64, limit: usize) -> Result<Vec<FeedRow>, SourceError> {
        self.calls += 1;
        self.inner.read(feed, after, limit)
    }
    // Forwarded, or the events would be read through `read` and flattened from parsed maps
    // instead of straight from the stored text.
    fn read_events(&mut self, after: i64, limit: usize) -> Result<Vec<FlatEventRow>, SourceError> {
        self.calls += 1;
        self.inner.read_events(after, limit)
    }
    fn head(&mut self) -> Result<i64, SourceError> {
        self.calls += 1;
        self.inner.head()
    }
    fn store_id(&mut self) -> Result<Option<String>, SourceError> {
        self.calls += 1;
        self.inner.store_id()
    }
    fn track_event_names(&mut self) -> Result<Vec<String>, SourceError> {
        self.calls += 1;
        self.inner.track_event_names()
    }
    fn sources(&mut self) -> Result<Vec<SourceInfo>, SourceError> {
        self.calls += 1;
        self.inner.sources()
    }
    fn event_seq_since(&mut self, at: jiff::Timestamp) -> Result<Option<i64>, SourceError> {
        self.calls += 1;
        self.inner.event_seq_since(at)
    }
    fn pruned(&mut self) -> Result<profiles_sync::store::Pruned, SourceError> {
        self.calls += 1;
        self.inner.pruned()
    }
    fn record_progress(&mut self, c: &str, after: i64, window: i64) -> Result<(), SourceError> {
        self.calls += 1;
        self.inner.record_progress(c, after, window)
    }
}

/// Counts warehouse round trips.
struct CountingWarehouse<'a> {
    inner: &'a mut dyn Warehouse,
    calls: usize,
}

impl Warehouse for CountingWarehouse<'_> {
    fn dialect(&self) -> &dyn Dialect {
        self.inner.dialect()
    }
    fn schema(&self) -> &str {
        self.inner.schema()
    }
    fn test_connection(&mut self) -> Result<(), WarehouseError> {
        self.calls += 1;
        self.inner.test_connection()
    }
    fn describe(&mut self) -> Result<BTreeMap<String, TableColumns>, WarehouseError> {
        self.calls += 1;
        self.inner.describe()
    }
    fn column_limits(&self) -> BTreeMap<String, profiles_sync::warehouse::ColumnLimits> {
        self.inner.column_limits()
    }
    fn begin(&mut self) -> Result<(), WarehouseError> {
        self.calls += 1;
        self.inner.begin()
    }
    fn commit(&mut self) -> Result<(), WarehouseError> {
        self.calls += 1;
        self.inner.commit()
    }
    fn rollback(&mut self) -> Result<(), WarehouseError> {
        self.calls += 1;
        self.inner.rollback()
    }
    fn execute(&mut self, sql: &str) -> Result<u64, WarehouseError> {
        self.calls += 1;
        self.inner.execute(sql)
    }
    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WarehouseError> {
        self.calls += 1;
        self.inner.query(sql)
    }
    fn stage(
        &mut self,
        stage: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<(), WarehouseError> {
        self.calls += 1;
        self.inner.stage(stage, columns, rows)
    }
    // Forwarded, or every chunk would take the staging path instead of the direct COPY the
    // PostgreSQL warehouse uses (the default `append` declines).
    fn append(
        &mut self,
        table: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<bool, WarehouseError> {
        self.calls += 1;
        self.inner.append(table, columns, rows)
    }
}

/// What reading the events feed costs, stage by stage, on the load scenario's store (seconds per
/// `BENCH_ROWS` events, one thread): the payloads out of SQLite only; their JSON scanned without
/// building anything; parsed into `serde_json` maps; read as the feed's `Event`s; read as the
/// sync reads them, flattened (`FlatEvent`).
fn read_stages() -> Value {
    let n = rows();
    let url = build_store(n);
    let path = url.trim_start_matches("sqlite://").to_string();
    let conn = rusqlite::Connection::open(&path).expect("open the store file");
    let mut out = serde_json::Map::new();
    for stage in [
        "payloads",
        "json_scan",
        "json_maps",
        "events",
        "flat_events",
    ] {
        let t = Instant::now();
        let mut count = 0usize;
        if stage == "events" || stage == "flat_events" {
            let mut s = store::open(&url, Rules::default()).expect("store");
            let mut pos = 0;
            loop {
                let last = if stage == "events" {
                    let page = s
                        .read_feed(&Feed::Events(store::EventFilter::All), pos, 10_000)
                        .expect("read");
                    count += page.len();
                    page.last().map(FeedRow::seq)
                } else {
                    let page = s
                        .read_flat_events(&store::EventFilter::All, pos, 10_000)
                        .expect("read");
                    count += page.len();
                    page.last().map(|r| r.seq)
                };
                let Some(last) = last else { break };
                pos = last;
            }
        } else {
            let mut stmt = conn
                .prepare("SELECT payload FROM events ORDER BY seq")
                .expect("prepare");
            let mut rows = stmt.query([]).expect("query");
            while let Some(r) = rows.next().expect("row") {
                let p = r.get_ref(0).expect("payload").as_str().expect("text");
                match stage {
                    "payloads" => {}
                    "json_scan" => {
                        let _: serde::de::IgnoredAny = serde_json::from_str(p).expect("json");
                    }
                    _ => {
                        let _: Value = serde_json::from_str(p).expect("json");
                    }
                }
                count += 1;
            }
        }
        assert_eq!(count, n, "{stage}");
        out.insert(stage.into(), json!(t.elapsed().as_secs_f64()));
    }
    json!({"scenario": "read_stages", "events": n, "seconds": out})
}
