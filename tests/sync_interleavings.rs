//! Incremental syncs interleaved with ingest, compared with one clean sync of the final store
//! (and the profile tables with the store's own current state): seeded random traffic at small
//! page sizes, a feed that gains events between reads and fails mid-run, a warehouse that fails
//! tables and connections, and two PostgreSQL-store writers at once. Each seed is a fixed
//! scenario; a failure names its seed.

mod support;

use std::collections::BTreeSet;

use profiles_sync::crd::ErrorClass;
use profiles_sync::store::{
    EventFilter, Feed, FeedRow, FlatEventRow, SourceInfo, StateTable, state_rows,
};
use profiles_sync::sync::{FeedSource, SourceError, StoreSource};
use profiles_sync::warehouse::{
    Cell, Column, ColumnLimits, Dialect, OnConflict, TableColumns, Warehouse, WarehouseError,
};
use serde_json::{Value, json};
use support::warehouse::{TestWarehouse, ingest, store};

/// A seeded generator (a 64-bit LCG): the same seed, the same scenario.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn now_iso(offset_secs: i64) -> String {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + offset_secs)
        .unwrap()
        .to_string()
}

fn random_message(r: &mut Rng, n: usize) -> Value {
    let anon = format!("a{}", r.below(12));
    let id = format!("m{n}");
    let mut m = match r.below(5) {
        0 | 1 => {
            let mut traits = serde_json::Map::new();
            if r.below(2) == 0 {
                traits.insert("email".into(), json!(format!("e{}@x.com", r.below(5))));
            }
            traits.insert(format!("t{}", r.below(4)), json!(r.below(3)));
            if r.below(4) == 0 {
                traits.insert(format!("t{}", r.below(4)), Value::Null);
            }
            let mut m =
                json!({"type": "identify", "messageId": id, "anonymousId": anon, "traits": traits});
            if r.below(3) == 0 {
                m["userId"] = json!(format!("u{}", r.below(6)));
            }
            m
        }
        2 => json!({"type": "track", "messageId": id, "anonymousId": anon,
                    "event": format!("Ev {}", r.below(3)), "properties": {"v": r.below(100)}}),
        3 => json!({"type": "page", "messageId": id, "anonymousId": anon, "name": "P"}),
        _ => {
            json!({"type": "alias", "messageId": id, "userId": format!("u{}", r.below(6)), "previousId": anon})
        }
    };
    m["receivedAt"] = json!(now_iso(-60));
    m
}

fn rows(wh: &TestWarehouse, table: &str, cols: &str) -> BTreeSet<Vec<String>> {
    wh.query(&format!("SELECT {cols} FROM {}", wh.table(table)))
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.unwrap_or_default()).collect())
        .collect()
}

/// Asserts that `wh` holds what one clean sync of the store at `url` lands (`what` names the
/// scenario in a failure).
fn assert_matches_a_clean_sync(wh: &TestWarehouse, kind: &str, url: &str, what: &str) {
    let clean = TestWarehouse::of(kind);
    clean.sync_with(url, None, &clean.spec, 500);
    let (a, b) = (wh.dump(), clean.dump());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (table, rows) in &b {
        assert_eq!(&a[table], rows, "{what}: {table}");
    }
}

fn interleaved(kind: &str, seed: u64, page: usize) {
    let (mut s, url, _d) = store();
    let wh = TestWarehouse::of(kind);
    let mut r = Rng(seed);
    // Re-sends drawn apart, so that the scenario of each seed stays what it was without them.
    let mut resend = Rng(seed ^ 0x5eed);
    let mut sent: Vec<Value> = vec![];
    let mut n = 0;
    for _round in 0..12 {
        let mut batch: Vec<Value> = (0..(1 + r.below(15)))
            .map(|_| {
                n += 1;
                random_message(&mut r, n)
            })
            .collect();
        sent.extend(batch.iter().cloned());
        // A client's retry: a message already sent (and perhaps synced), sent again.
        for _ in 0..resend.below(3) {
            let again = sent[resend.below(sent.len() as u64) as usize].clone();
            batch.push(again);
        }
        ingest(&mut *s, &batch);
        let rep = wh.sync_with(&url, None, &wh.spec, page);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    }
    assert_matches_a_clean_sync(&wh, kind, &url, &format!("seed {seed} page {page}"));
    // Each message landed once, its re-sends never.
    let mut landed = 0;
    for table in ["identifies", "tracks", "pages", "aliases"] {
        if wh.count(table) == 0 {
            continue;
        }
        let ids = wh.query(&format!(
            "SELECT count(*), count(DISTINCT id) FROM {}",
            wh.table(table)
        ));
        assert_eq!(
            ids[0][0], ids[0][1],
            "seed {seed}: {table} holds a message twice"
        );
        landed += ids[0][0]
            .as_deref()
            .unwrap_or("0")
            .parse::<usize>()
            .unwrap();
    }
    assert_eq!(landed, n, "seed {seed}: every message once");
    // And the materialized tables equal the store's state.
    let (profiles, identifiers) = s.load_state().unwrap();
    let expect = |t: StateTable, keys: &[&str]| -> BTreeSet<Vec<String>> {
        state_rows(t, &profiles, &identifiers)
            .iter()
            .map(|row| {
                keys.iter()
                    .map(|k| match &row[*k] {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        v => v.to_string(),
                    })
                    .collect()
            })
            .collect()
    };
    assert_eq!(
        rows(&wh, "user_identifiers", "canonical_segment_id, type, value"),
        expect(
            StateTable::UserIdentifiers,
            &["canonical_segment_id", "type", "value"]
        ),
        "seed {seed}: user_identifiers"
    );
    assert_eq!(
        rows(&wh, "profile_merges", "canonical_segment_id, segment_id"),
        expect(
            StateTable::ProfileMerges,
            &["canonical_segment_id", "segment_id"]
        ),
        "seed {seed}: profile_merges"
    );
    assert_eq!(
        rows(&wh, "user_traits", "canonical_segment_id, name, value"),
        expect(
            StateTable::UserTraits,
            &["canonical_segment_id", "name", "value"]
        ),
        "seed {seed}: user_traits"
    );
}

#[test]
fn sqlite_random_interleavings_match_a_clean_sync() {
    for seed in 1..13 {
        for page in [1, 2, 3, 7] {
            interleaved("sqlite", seed, page);
        }
    }
}

#[test]
fn postgres_random_interleavings_match_a_clean_sync() {
    for seed in 1..4 {
        for page in [1, 3] {
            interleaved("postgres", seed, page);
        }
    }
}

/// Minimal: P3 merged into P2, then P2 into P1 (whose recursive row moves P3 to P1 too). A
/// window that holds P3→P2 and P2→P1 but ends before the recursive P3→P1 row leaves P3's
/// identifiers on P2, a merged-away profile, for good.
fn a_merge_chain_split_by_a_window(kind: &str) {
    let (mut s, url, _d) = store();
    let wh = TestWarehouse::of(kind);
    let m = |v: Value| {
        let mut v = v;
        v["receivedAt"] = json!(now_iso(-60));
        v
    };
    ingest(
        &mut *s,
        &[
            m(
                json!({"type": "identify", "messageId": "m1", "anonymousId": "a1", "traits": {"email": "e1@x.com"}}),
            ),
            m(
                json!({"type": "identify", "messageId": "m2", "anonymousId": "a2", "traits": {"email": "e2@x.com"}}),
            ),
            m(json!({"type": "identify", "messageId": "m3", "anonymousId": "a3"})),
        ],
    );
    assert!(wh.sync_with(&url, None, &wh.spec, 2).errors.is_empty());
    ingest(
        &mut *s,
        &[
            // a3 (P3) meets e2 (P2): P3 merges into P2.
            m(
                json!({"type": "identify", "messageId": "m4", "anonymousId": "a3", "traits": {"email": "e2@x.com"}}),
            ),
            // a2 (P2) meets e1 (P1): P2 merges into P1, and P3 (merged into P2) with it.
            m(
                json!({"type": "identify", "messageId": "m5", "anonymousId": "a2", "traits": {"email": "e1@x.com"}}),
            ),
        ],
    );
    let rep = wh.sync_with(&url, None, &wh.spec, 2);
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    let clean = TestWarehouse::of(kind);
    clean.sync_with(&url, None, &clean.spec, 500);
    let q = "canonical_segment_id, type, value";
    let owners = |w: &TestWarehouse| -> BTreeSet<String> {
        rows(w, "user_identifiers", q)
            .into_iter()
            .map(|r| r[0].clone())
            .collect()
    };
    assert_eq!(
        owners(&clean).len(),
        1,
        "one live profile holds every identifier"
    );
    assert_eq!(
        rows(&wh, "user_identifiers", q),
        rows(&clean, "user_identifiers", q),
        "incremental (page 2) vs clean user_identifiers"
    );
}

#[test]
fn sqlite_a_merge_chain_split_by_a_window() {
    a_merge_chain_split_by_a_window("sqlite");
}

#[test]
fn postgres_a_merge_chain_split_by_a_window() {
    a_merge_chain_split_by_a_window("postgres");
}

/// A store read through, that commits new events between the sync's reads and fails a read
/// now and then: the engine under load, and going away.
struct Chaos {
    inner: StoreSource,
    writer: Box<dyn profiles_sync::store::Store>,
    rng: Rng,
    n: usize,
    fail_at: u64,
    reads: u64,
}

impl Chaos {
    /// The store at `url`, gaining random events (numbered from `n`) between reads, and
    /// failing its `fail_at`-th read.
    fn new(url: &str, rng: Rng, n: usize, fail_at: u64) -> Chaos {
        Chaos {
            inner: StoreSource(profiles_sync::store::open(url, Default::default()).unwrap()),
            writer: profiles_sync::store::open(url, Default::default()).unwrap(),
            rng,
            n,
            fail_at,
            reads: 0,
        }
    }

    fn between(&mut self) -> Result<(), SourceError> {
        self.reads += 1;
        if self.reads == self.fail_at {
            return Err(SourceError("engine went away".into()));
        }
        if self.rng.below(3) == 0 {
            let batch: Vec<Value> = (0..(1 + self.rng.below(4)))
                .map(|_| {
                    self.n += 1;
                    random_message(&mut self.rng, self.n)
                })
                .collect();
            ingest(&mut *self.writer, &batch);
        }
        Ok(())
    }
}

impl FeedSource for Chaos {
    fn read(&mut self, feed: &Feed, after: i64, limit: usize) -> Result<Vec<FeedRow>, SourceError> {
        self.between()?;
        self.inner.read(feed, after, limit)
    }
    fn read_events(&mut self, after: i64, limit: usize) -> Result<Vec<FlatEventRow>, SourceError> {
        self.between()?;
        self.inner.read_events(after, limit)
    }
    fn head(&mut self) -> Result<i64, SourceError> {
        self.inner.head()
    }
    fn store_id(&mut self) -> Result<Option<String>, SourceError> {
        self.inner.store_id()
    }
    fn track_event_names(&mut self) -> Result<Vec<String>, SourceError> {
        self.inner.track_event_names()
    }
    fn sources(&mut self) -> Result<Vec<SourceInfo>, SourceError> {
        self.inner.sources()
    }
    fn event_seq_since(&mut self, at: jiff::Timestamp) -> Result<Option<i64>, SourceError> {
        self.inner.event_seq_since(at)
    }
    fn pruned(&mut self) -> Result<profiles_sync::store::Pruned, SourceError> {
        self.inner.pruned()
    }
    fn record_progress(&mut self, c: &str, after: i64, window: i64) -> Result<(), SourceError> {
        self.inner.record_progress(c, after, window)
    }
}

fn chaos(kind: &str, seed: u64) {
    let (s, url, _d) = store();
    drop(s);
    let wh = TestWarehouse::of(kind);
    let mut r = Rng(seed * 7919);
    let mut n = 100_000 * seed as usize;
    for _round in 0..8 {
        let mut spec = wh.spec.clone();
        if r.below(2) == 0 {
            spec.limits =
                Some(serde_json::from_value(json!({"maxRows": 1 + r.below(20)})).unwrap());
        }
        let page = [1usize, 2, 3, 5, 8][r.below(5) as usize];
        let fail_at = if r.below(2) == 0 {
            1 + r.below(30)
        } else {
            u64::MAX
        };
        let mut src = Chaos::new(&url, Rng(r.next()), n, fail_at);
        wh.sync_source(&mut src, None, &spec, page);
        n = src.n + 1000;
    }
    // Drain: plain syncs until nothing is left.
    for _ in 0..3 {
        wh.sync_with(&url, None, &wh.spec, 7);
    }
    assert_matches_a_clean_sync(&wh, kind, &url, &format!("seed {seed}"));
}

#[test]
fn sqlite_chaos_matches_a_clean_sync() {
    for seed in 1..25 {
        chaos("sqlite", seed);
    }
}

/// A warehouse whose writes fail now and then: a table's error (`Quota`) or, rarely, the
/// connection (`Connection`, after which every statement fails, as a dropped session would).
struct Flaky {
    inner: Box<dyn Warehouse>,
    rng: Rng,
    per_mille: u64,
    gone: bool,
    /// The commit (counted from 1) refused as SQLite refuses one it cannot take its lock for
    /// (`SQLITE_BUSY`): the transaction is left open.
    refuse_commit: u64,
    commits: u64,
}

impl Flaky {
    fn maybe(&mut self) -> Result<(), WarehouseError> {
        if self.gone {
            return Err(WarehouseError::new(ErrorClass::Connection, "gone"));
        }
        let x = self.rng.below(1000);
        if x < self.per_mille / 10 {
            self.gone = true;
            let _ = self.inner.rollback();
            return Err(WarehouseError::new(ErrorClass::Connection, "gone"));
        }
        if x < self.per_mille {
            return Err(WarehouseError::new(ErrorClass::Quota, "injected"));
        }
        Ok(())
    }
}

impl Warehouse for Flaky {
    fn dialect(&self) -> &dyn Dialect {
        self.inner.dialect()
    }
    fn schema(&self) -> &str {
        self.inner.schema()
    }
    fn test_connection(&mut self) -> Result<(), WarehouseError> {
        self.inner.test_connection()
    }
    fn describe(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, TableColumns>, WarehouseError> {
        self.inner.describe()
    }
    fn column_limits(&self) -> std::collections::BTreeMap<String, ColumnLimits> {
        self.inner.column_limits()
    }
    fn dropped_columns(&self) -> std::collections::BTreeMap<String, usize> {
        self.inner.dropped_columns()
    }
    fn begin(&mut self) -> Result<(), WarehouseError> {
        if self.gone {
            return Err(WarehouseError::new(ErrorClass::Connection, "gone"));
        }
        self.inner.begin()
    }
    fn commit(&mut self) -> Result<(), WarehouseError> {
        self.commits += 1;
        if self.commits == self.refuse_commit {
            return Err(WarehouseError::new(ErrorClass::Quota, "database is locked"));
        }
        self.maybe()?;
        self.inner.commit()
    }
    fn rollback(&mut self) -> Result<(), WarehouseError> {
        if self.gone {
            return Ok(());
        }
        self.inner.rollback()
    }
    fn execute(&mut self, sql: &str) -> Result<u64, WarehouseError> {
        self.maybe()?;
        self.inner.execute(sql)
    }
    fn merge_stage(
        &self,
        table: &str,
        stage: &str,
        columns: &[&str],
        key: &[&str],
        on_conflict: OnConflict,
    ) -> String {
        self.inner
            .merge_stage(table, stage, columns, key, on_conflict)
    }
    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WarehouseError> {
        if self.gone {
            return Err(WarehouseError::new(ErrorClass::Connection, "gone"));
        }
        self.inner.query(sql)
    }
    fn stage(
        &mut self,
        stage: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<(), WarehouseError> {
        self.maybe()?;
        self.inner.stage(stage, columns, rows)
    }
    fn append(
        &mut self,
        table: &str,
        columns: &[Column],
        rows: &[Vec<Cell>],
    ) -> Result<bool, WarehouseError> {
        self.maybe()?;
        self.inner.append(table, columns, rows)
    }
}

fn flaky(kind: &str, seed: u64) {
    let (s, url, _d) = store();
    drop(s);
    let wh = TestWarehouse::of(kind);
    let mut r = Rng(seed * 104_729);
    let mut n = 100_000 * seed as usize;
    for _round in 0..8 {
        let mut spec = wh.spec.clone();
        if r.below(3) == 0 {
            spec.limits =
                Some(serde_json::from_value(json!({"maxRows": 1 + r.below(20)})).unwrap());
        }
        let page = [1usize, 2, 3, 5, 8][r.below(5) as usize];
        let mut src = Chaos::new(&url, Rng(r.next()), n, u64::MAX);
        let mut w = Flaky {
            inner: wh.connect(),
            rng: Rng(r.next()),
            per_mille: 40,
            gone: false,
            refuse_commit: 0,
            commits: 0,
        };
        let opts = profiles_sync::sync::SyncOptions {
            id: "t".into(),
            connection: &spec,
            selection: None,
            page_size: page,
            consumer: None,
            now: jiff::Timestamp::now(),
        };
        profiles_sync::sync::run(&mut src, &mut w, &opts);
        n = src.n + 1000;
    }
    for _ in 0..3 {
        wh.sync_with(&url, None, &wh.spec, 7);
    }
    assert_matches_a_clean_sync(&wh, kind, &url, &format!("seed {seed}"));
}

#[test]
fn sqlite_flaky_warehouse_matches_a_clean_sync() {
    for seed in 1..30 {
        flaky("sqlite", seed);
    }
}

/// Two engine replicas (PostgreSQL store) writing at once, with overlapping messageIds, while
/// syncs run: the warehouse ends equal to a clean sync, and no event is stored twice.
fn concurrent_replicas(wh_kind: &str, seed: u64) {
    let pg = support::pg::shared();
    let db = pg.create_database("replicas");
    let url = pg.url(&db);
    drop(profiles_sync::store::open(&url, Default::default()).unwrap());
    let wh = TestWarehouse::of(wh_kind);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let url = url.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = profiles_sync::store::open(&url, Default::default()).unwrap();
                let mut r = Rng(seed * 31 + w);
                let mut batches = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && batches < 60 {
                    // Both writers draw from the same id space: duplicates across replicas.
                    let batch: Vec<Value> = (0..(1 + r.below(6)))
                        .map(|_| {
                            let n = r.below(400) as usize;
                            let mut m = random_message(&mut Rng(seed * 1_000_003 + n as u64), n);
                            m["messageId"] = json!(format!("m{n}"));
                            m
                        })
                        .collect();
                    ingest(&mut *s, &batch);
                    batches += 1;
                }
            })
        })
        .collect();
    let mut r = Rng(seed);
    for _ in 0..10 {
        let page = [1usize, 2, 3, 7][r.below(4) as usize];
        let rep = wh.sync_with(&url, None, &wh.spec, page);
        assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    wh.sync_with(&url, None, &wh.spec, 7);
    assert_matches_a_clean_sync(&wh, wh_kind, &url, &format!("seed {seed}"));
    let mut s = profiles_sync::store::open(&url, Default::default()).unwrap();
    let events = s
        .read_feed(&Feed::Events(EventFilter::All), 0, 1 << 30)
        .unwrap();
    let ids: BTreeSet<String> = events
        .iter()
        .map(|e| match e {
            FeedRow::Event(e) => e.event.message_id.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        ids.len(),
        events.len(),
        "seed {seed}: a messageId stored twice"
    );
}

#[test]
fn postgres_store_concurrent_replicas_match_a_clean_sync() {
    for seed in 1..4 {
        concurrent_replicas("sqlite", seed);
    }
}

/// A commit the warehouse refuses and leaves open (SQLite's `SQLITE_BUSY`) fails its table
/// alone: the session is rolled back, so the tables after it begin and load as usual, and the
/// next run loads what the refused one held.
#[test]
fn sqlite_a_refused_commit_fails_its_table_alone() {
    let (mut s, url, _d) = store();
    let mut r = Rng(7);
    let batch: Vec<Value> = (1..40).map(|n| random_message(&mut r, n)).collect();
    ingest(&mut *s, &batch);
    let wh = TestWarehouse::of("sqlite");
    // Commits 1 and 2 are the state tables' setup; 3 the first chunk of the first table.
    let mut w = Flaky {
        inner: wh.connect(),
        rng: Rng(1),
        per_mille: 0,
        gone: false,
        refuse_commit: 3,
        commits: 0,
    };
    let opts = profiles_sync::sync::SyncOptions {
        id: "t".into(),
        connection: &wh.spec,
        selection: None,
        page_size: 500,
        consumer: None,
        now: jiff::Timestamp::now(),
    };
    let report = profiles_sync::sync::run(
        &mut StoreSource(profiles_sync::store::open(&url, Default::default()).unwrap()),
        &mut w,
        &opts,
    );
    let failed: Vec<&str> = report
        .tables
        .iter()
        .filter(|t| t.error.is_some())
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(failed.len(), 1, "{report:#?}");
    assert!(
        report.errors.iter().all(|e| e.table.is_some()),
        "no run-level error: {report:#?}"
    );
    assert!(report.rows.total > 0, "{report:#?}");
    wh.sync_with(&url, None, &wh.spec, 500);
    assert_matches_a_clean_sync(&wh, "sqlite", &url, "after the refused commit");
}
