//! Event retention (DESIGN §3) end to end: the sync records what its connection still needs,
//! the engine deletes only what every consumer has loaded and no window reaches, and a sync
//! that finds events gone before it loaded them says so. Real stores, real warehouses, an
//! engine in-process over HTTP.

mod support;

use profiles_sync::crd::{ErrorClass, SyncStatus};
use profiles_sync::engine::retention::{Retention, pass};
use profiles_sync::identity::Rules;
use profiles_sync::store::{self, Store};
use profiles_sync::store::{FeedRow, FlatEventRow, Pruned, SourceInfo};
use profiles_sync::sync::{EngineSource, FeedSource, SourceError, StoreSource};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::engine::FEED_TOKEN;
use support::warehouse::{TestWarehouse, ingest, store};

const CONSUMER: &str = "analytics/warehouse";

/// `days` days before now, as text.
fn days_ago(days: i64) -> String {
    jiff::Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(days * 24))
        .unwrap()
        .to_string()
}

/// Events received `days` ago (as `import` stores them), one per id.
fn received(days: i64, ids: &[&str]) -> Vec<Value> {
    ids.iter()
        .map(|id| {
            json!({"type": "track", "messageId": id, "anonymousId": "a1", "event": "Order Completed",
                   "properties": {"total": 1}, "receivedAt": days_ago(days), "timestamp": days_ago(days)})
        })
        .collect()
}

fn open(url: &str) -> Box<dyn Store> {
    store::open(url, Rules::default()).unwrap()
}

/// The message of a report's Retention error (there must be one).
fn retention_gap(r: &profiles_sync::sync::SyncReport) -> &str {
    &r.errors
        .iter()
        .find(|e| e.class == ErrorClass::Retention)
        .unwrap_or_else(|| panic!("no Retention error: {r:#?}"))
        .message
}

/// Records [`CONSUMER`]'s progress.
fn record(s: &mut dyn Store, after_seq: i64, window_seconds: i64) {
    s.set_consumer(&store::Consumer {
        name: CONSUMER.into(),
        after_seq,
        window_seconds,
        updated_at: jiff::Timestamp::now(),
    })
    .unwrap();
}

fn sync(wh: &TestWarehouse, url: &str, consumer: Option<&str>) -> profiles_sync::sync::SyncReport {
    let mut source = StoreSource(open(url));
    wh.sync_as(
        &mut source,
        None,
        &wh.spec,
        500,
        jiff::Timestamp::now(),
        consumer,
    )
}

/// A retention pass keeping events a day, as the engine runs it, at `now`.
fn prune_at(url: &str, now: jiff::Timestamp) -> profiles_sync::engine::retention::PassOutcome {
    pass(
        &mut *open(url),
        std::time::Duration::from_secs(86_400),
        now,
        &|| true,
    )
    .unwrap()
}

/// [`prune_at`] 200 days from now: every event stored now is older than any window then.
fn prune(url: &str) -> profiles_sync::engine::retention::PassOutcome {
    let later = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(200 * 24))
        .unwrap();
    prune_at(url, later)
}

macro_rules! both_warehouses {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[test] fn $name() { super::$name("sqlite"); } )* }
        mod postgres { $( #[test] fn $name() { super::$name("postgres"); } )* }
    };
}

both_warehouses!(
    a_sync_records_what_its_event_tables_still_need,
    retention_keeps_what_a_consumer_has_not_loaded,
    events_deleted_before_a_connection_loaded_them_are_reported,
);

/// After each run the connection's record is the lowest cursor of its event tables: under a
/// row limit the events not loaded yet, after a full run the head; with its backfill window.
/// A run without a consumer name records nothing.
fn a_sync_records_what_its_event_tables_still_need(kind: &str) {
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(0, &["e1", "e2", "e3", "e4", "e5", "e6"]));
    let wh = TestWarehouse::of(kind);
    assert_eq!(sync(&wh, &url, None).status, SyncStatus::Success);
    assert_eq!(s.consumers().unwrap(), []);

    let wh = TestWarehouse::of(kind);
    let mut limited = wh.spec.clone();
    limited.limits = Some(serde_json::from_value(json!({"maxRows": 4})).unwrap());
    let mut source = StoreSource(open(&url));
    let r = wh.sync_as(
        &mut source,
        None,
        &limited,
        1,
        jiff::Timestamp::now(),
        Some(CONSUMER),
    );
    assert!(r.limit_reached, "{r:#?}");
    let recorded = s.consumers().unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].name, CONSUMER);
    assert_eq!(recorded[0].window_seconds, 60 * 86_400);
    let head = s.head_seq().unwrap();
    let cursor: i64 = wh.query(&format!(
        "SELECT min(cursor_seq) FROM {} WHERE table_name IN ('tracks', 'order_completed')",
        wh.table("_profiles_sync_state")
    ))[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cursor < head, "the limit left events behind");
    assert_eq!(recorded[0].after_seq, cursor);

    assert_eq!(sync(&wh, &url, Some(CONSUMER)).status, SyncStatus::Success);
    assert_eq!(s.consumers().unwrap()[0].after_seq, head);
}

/// Events older than the consumer's 60-day window that it has loaded go (the pass runs 200
/// days later); those after its record stay, and its next sync
/// loads them whole, with no report of a gap.
fn retention_keeps_what_a_consumer_has_not_loaded(kind: &str) {
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(0, &["a1", "a2", "a3"]));
    let wh = TestWarehouse::of(kind);
    assert_eq!(sync(&wh, &url, Some(CONSUMER)).status, SyncStatus::Success);
    ingest(&mut *s, &received(0, &["b1", "b2"]));
    let outcome = prune(&url);
    assert_eq!(outcome.deleted, 3, "{outcome:?}");
    assert_eq!(outcome.cut.held_by.as_deref(), Some(CONSUMER));
    assert_eq!(s.event_count().unwrap(), 2);
    let r = sync(&wh, &url, Some(CONSUMER));
    assert_eq!(r.status, SyncStatus::Success, "{r:#?}");
    assert_eq!((wh.count("tracks"), wh.count("order_completed")), (5, 5));
    // Loaded now: the next pass takes them.
    assert_eq!(prune(&url).deleted, 2);
    assert_eq!(s.event_count().unwrap(), 0);
}

/// A connection whose record was gone (deleted, or never recorded) finds the events it had
/// not loaded deleted: its next sync reports it (class Retention, a partial success, the
/// events after them loaded) and the one after is clean. A first sync whose backfill window
/// reaches further back than what retention left says so too.
fn events_deleted_before_a_connection_loaded_them_are_reported(kind: &str) {
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(0, &["a1", "a2"]));
    let wh = TestWarehouse::of(kind);
    assert_eq!(sync(&wh, &url, Some(CONSUMER)).status, SyncStatus::Success);
    ingest(&mut *s, &received(0, &["b1", "b2"]));
    assert!(s.remove_consumer(CONSUMER).unwrap());
    assert_eq!(prune(&url).deleted, 4);
    ingest(&mut *s, &received(0, &["c1"]));

    let r = sync(&wh, &url, Some(CONSUMER));
    assert_eq!(r.status, SyncStatus::PartialSuccess, "{r:#?}");
    let gaps: Vec<_> = r
        .errors
        .iter()
        .filter(|e| e.class == ErrorClass::Retention)
        .collect();
    assert_eq!(gaps.len(), 1, "{r:#?}");
    assert!(
        gaps[0].message.contains("deleted events up to seq")
            && gaps[0].message.contains("order_completed"),
        "{}",
        gaps[0].message
    );
    assert_eq!((wh.count("tracks"), wh.count("order_completed")), (3, 3));
    let r = sync(&wh, &url, Some(CONSUMER));
    assert_eq!(
        (r.status, r.errors.len()),
        (SyncStatus::Success, 0),
        "{r:#?}"
    );

    // A new connection whose window (120 days) reaches further back than the events the
    // store kept (those older than the first connection's 60 days went).
    let fresh = TestWarehouse::of(kind);
    let mut spec = fresh.spec.clone();
    spec.backfill.events = "120d".into();
    let mut source = StoreSource(open(&url));
    let r = fresh.sync_as(&mut source, None, &spec, 500, jiff::Timestamp::now(), None);
    let gap = retention_gap(&r);
    assert!(gap.contains("backfill window starts at"), "{gap}");
    assert_eq!(fresh.count("tracks"), 1);
}

/// A new connection's first sync reports deleted events only of the tables it backfills: none
/// when the deletions inside its window were all of a table it turned off; the table when one
/// it syncs lost events inside its window.
#[test]
fn a_first_sync_reports_only_deletions_of_the_tables_it_syncs() {
    let (mut s, url, _d) = store();
    let page = |id: &str, days: i64| {
        json!({"type": "page", "messageId": id, "anonymousId": "a1", "name": "Home",
               "receivedAt": days_ago(days), "timestamp": days_ago(days)})
    };
    ingest(&mut *s, &received(90, &["t-old"]));
    ingest(&mut *s, &[page("p1", 30), page("p2", 30)]);
    ingest(&mut *s, &received(0, &["t-now"]));
    // A connection with a one-day window has loaded everything: the pass deletes the first
    // three (the track outside every 60-day window, the pages inside one).
    let head = s.head_seq().unwrap();
    record(&mut *s, head, 86_400);
    let outcome = prune_at(&url, jiff::Timestamp::now());
    assert_eq!(outcome.deleted, 3);

    let pages_off: profiles_sync::crd::SelectiveSyncSpec = serde_json::from_value(
        json!({"connectionRef": {"name": "wh"}, "tables": [{"name": "pages", "enabled": false}]}),
    )
    .unwrap();
    let first_sync = |selection: Option<&profiles_sync::crd::SelectiveSyncSpec>| {
        let wh = TestWarehouse::sqlite();
        let mut source = StoreSource(open(&url));
        let r = wh.sync_as(
            &mut source,
            selection,
            &wh.spec,
            500,
            jiff::Timestamp::now(),
            None,
        );
        (r, wh.count("tracks"))
    };
    let (r, tracks) = first_sync(Some(&pages_off));
    assert_eq!(
        (r.status, r.errors.len(), tracks),
        (SyncStatus::Success, 0, 1),
        "{r:#?}"
    );
    let (r, _) = first_sync(None);
    let gap = retention_gap(&r);
    assert!(gap.contains("1 table(s) (pages)"), "{gap}");
}

/// A consumer that lowers its record while a pass waits to delete (another PostgreSQL replica's
/// step holds the horizon) is either held by the pass, or, when the pass deleted first, reads a
/// horizon that shows it: no deletion lands after its record returned. (A pass that took its
/// cut before the record deleted what it held, and the sync read the horizon from before.) The
/// same on a database whose default isolation is `REPEATABLE READ` (the step read the consumers
/// from a snapshot taken before its wait).
#[test]
fn postgres_a_record_lowered_while_a_pass_waits_is_held_or_sees_the_deletion() {
    for isolation in [None, Some("repeatable read")] {
        a_record_lowered_while_a_pass_waits(isolation);
    }
}

/// A fresh database of the test server, its default isolation set when given; its name and URL.
fn database(prefix: &str, isolation: Option<&str>) -> (String, String) {
    let pg = support::pg::shared();
    let db = pg.create_database(prefix);
    if let Some(level) = isolation {
        pg.connect(&db)
            .batch_execute(&format!(
                "ALTER DATABASE \"{db}\" SET default_transaction_isolation = '{level}'"
            ))
            .unwrap();
    }
    let url = pg.url(&db);
    (db, url)
}

fn a_record_lowered_while_a_pass_waits(isolation: Option<&str>) {
    let pg = support::pg::shared();
    let (db, url) = database("race", isolation);
    let mut s = open(&url);
    ingest(&mut *s, &received(0, &["e1", "e2", "e3", "e4", "e5"]));
    let head = s.head_seq().unwrap();
    record(&mut *s, head, 60);
    let mut side = pg.connect(&db);
    side.batch_execute("BEGIN; SELECT * FROM event_retention WHERE id = 1 FOR UPDATE")
        .unwrap();
    let waiting = |pg_probe: &mut ::postgres::Client| -> i64 {
        pg_probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut probe = pg.connect(&db);
    let wait_for = |probe: &mut ::postgres::Client, n: i64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while waiting(probe) < n {
            assert!(std::time::Instant::now() < deadline, "no lock wait");
            std::thread::yield_now();
        }
    };
    let pass_url = url.clone();
    let pass_thread = std::thread::spawn(move || prune(&pass_url));
    wait_for(&mut probe, 1);
    // The warehouse went back (restored): the consumer records that it needs everything.
    let record_url = url.clone();
    let record = std::thread::spawn(move || {
        record(&mut *open(&record_url), 0, 60);
        // What the sync reads next.
        open(&record_url).pruned().unwrap().through_seq
    });
    // The record waits for the horizon too (or, were it not to, returns at once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !record.is_finished() && waiting(&mut probe) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the record neither waits nor returns"
        );
        std::thread::yield_now();
    }
    side.batch_execute("COMMIT").unwrap();
    let seen = record.join().unwrap();
    let outcome = pass_thread.join().unwrap();
    let after = s.pruned().unwrap().through_seq;
    assert_eq!(
        seen, after,
        "a deletion landed after the record returned: {outcome:?}"
    );
    assert!(after == 0 || after >= head, "all or nothing: {after}");
}

/// A pass that waits for a consumer's record to commit (it holds the horizon) reads that
/// record once it has the horizon: it deletes nothing the record holds — also on a database
/// whose default isolation is `REPEATABLE READ`, where the step's snapshot was taken before
/// its wait. The record is played by a transaction of the store's own statements.
#[test]
fn postgres_a_pass_that_waited_for_a_record_reads_it() {
    for isolation in [None, Some("repeatable read")] {
        let pg = support::pg::shared();
        let (db, url) = database("wait", isolation);
        let mut s = open(&url);
        ingest(&mut *s, &received(0, &["e1", "e2", "e3"]));
        let head = s.head_seq().unwrap();
        record(&mut *s, head, 60);
        let mut recording = pg.connect(&db);
        recording
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; \
                 UPDATE event_retention SET pruned_through = pruned_through WHERE id = 1; \
                 UPDATE feed_consumers SET after_seq = 0 WHERE consumer = '{CONSUMER}'"
            ))
            .unwrap();
        let pass_url = url.clone();
        let pass_thread = std::thread::spawn(move || {
            pass(
                &mut *open(&pass_url),
                std::time::Duration::from_secs(86_400),
                jiff::Timestamp::now()
                    .checked_add(jiff::SignedDuration::from_hours(200 * 24))
                    .unwrap(),
                &|| true,
            )
        });
        let mut probe = pg.connect(&db);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting > 0 || pass_thread.is_finished() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the pass neither waits nor ends"
            );
            std::thread::yield_now();
        }
        recording.batch_execute("COMMIT").unwrap();
        let outcome = pass_thread.join().unwrap();
        // Deleting nothing, or failing (a serialization error: the next pass tries again),
        // both hold the record; deleting the events does not.
        if let Ok(o) = &outcome {
            assert_eq!(o.deleted, 0, "{isolation:?}: {o:?}");
        }
        assert_eq!(s.event_count().unwrap(), 3, "{isolation:?}: {outcome:?}");
    }
}

/// A consumer that records while a deletion step is under way (it has read the consumers
/// already) waits for the step to commit, so the horizon it reads next shows what the step
/// deleted. Here the step is played by a transaction of the store's own statements. The same
/// under a `REPEATABLE READ` default.
#[test]
fn postgres_a_record_made_during_a_step_waits_for_it() {
    for isolation in [None, Some("repeatable read")] {
        a_record_made_during_a_step(isolation);
    }
}

fn a_record_made_during_a_step(isolation: Option<&str>) {
    let pg = support::pg::shared();
    let (db, url) = database("step", isolation);
    let mut s = open(&url);
    ingest(&mut *s, &received(0, &["e1", "e2", "e3"]));
    let head = s.head_seq().unwrap();
    let mut step = pg.connect(&db);
    step.batch_execute("BEGIN; SELECT * FROM event_retention WHERE id = 1 FOR UPDATE; SELECT * FROM feed_consumers")
        .unwrap();
    let record_url = url.clone();
    let record = std::thread::spawn(move || {
        record(&mut *open(&record_url), 0, 60);
        open(&record_url).pruned().unwrap().through_seq
    });
    let mut probe = pg.connect(&db);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .get(0);
        if record.is_finished() || waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the record neither waits nor returns"
        );
        std::thread::yield_now();
    }
    step.batch_execute(&format!(
        "DELETE FROM events WHERE seq <= {head}; \
         UPDATE event_retention SET pruned_through = {head}, pruned_max_received_us = 1 WHERE id = 1; COMMIT"
    ))
    .unwrap();
    assert_eq!(
        record.join().unwrap(),
        head,
        "the record returned before the step committed"
    );
}

/// A store's feed whose first `fail_records` records fail (an engine restarting) and that runs
/// `during` once, as the sync reads its first page of events.
struct Interrupted {
    inner: StoreSource,
    fail_records: usize,
    during: Option<Box<dyn FnOnce() + Send>>,
}

impl FeedSource for Interrupted {
    fn read(
        &mut self,
        feed: &store::Feed,
        after: i64,
        limit: usize,
    ) -> Result<Vec<FeedRow>, SourceError> {
        self.inner.read(feed, after, limit)
    }
    fn read_events(&mut self, after: i64, limit: usize) -> Result<Vec<FlatEventRow>, SourceError> {
        if let Some(during) = self.during.take() {
            during();
        }
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
    fn pruned(&mut self) -> Result<Pruned, SourceError> {
        self.inner.pruned()
    }
    fn record_progress(&mut self, c: &str, after: i64, window: i64) -> Result<(), SourceError> {
        if self.fail_records > 0 {
            self.fail_records -= 1;
            return Err(SourceError("PUT: 503 Service Unavailable".into()));
        }
        self.inner.record_progress(c, after, window)
    }
}

/// A connection whose record did not hold while it loaded — it could not be written as the
/// event load started (a first sync with a window longer than any recorded: the pass deletes
/// inside it), or it was removed meanwhile — reports that events it had not read yet may be
/// gone, in that run; with its record in place, the same pass deletes nothing it needs.
#[test]
fn a_record_that_did_not_hold_during_a_run_is_reported() {
    // A first sync, 120-day window; another connection (one day) has loaded everything.
    for fail_records in [0, 1] {
        let (mut s, url, _d) = store();
        ingest(&mut *s, &received(90, &["a1", "a2", "a3"]));
        ingest(&mut *s, &received(0, &["now"]));
        let head = s.head_seq().unwrap();
        s.set_consumer(&store::Consumer {
            name: "other/wh".into(),
            after_seq: head,
            window_seconds: 86_400,
            updated_at: jiff::Timestamp::now(),
        })
        .unwrap();
        let wh = TestWarehouse::sqlite();
        let mut spec = wh.spec.clone();
        spec.backfill.events = "120d".into();
        let during_url = url.clone();
        let mut source = Interrupted {
            inner: StoreSource(open(&url)),
            fail_records,
            during: Some(Box::new(move || {
                prune_at(&during_url, jiff::Timestamp::now());
            })),
        };
        let r = wh.sync_as(
            &mut source,
            None,
            &spec,
            500,
            jiff::Timestamp::now(),
            Some(CONSUMER),
        );
        if fail_records == 0 {
            assert_eq!(
                (r.status, wh.count("tracks")),
                (SyncStatus::Success, 4),
                "{r:#?}"
            );
        } else {
            assert!(
                retention_gap(&r).contains("its record did not hold"),
                "{r:#?}"
            );
        }
    }

    // A record removed while its connection loads.
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(3, &["a1", "a2"]));
    let wh = TestWarehouse::sqlite();
    assert_eq!(sync(&wh, &url, Some(CONSUMER)).status, SyncStatus::Success);
    ingest(&mut *s, &received(3, &["b1", "b2", "b3"]));
    ingest(&mut *s, &received(0, &["fresh"]));
    let during_url = url.clone();
    let mut source = Interrupted {
        inner: StoreSource(open(&url)),
        fail_records: 0,
        during: Some(Box::new(move || {
            assert!(open(&during_url).remove_consumer(CONSUMER).unwrap());
            prune_at(&during_url, jiff::Timestamp::now());
        })),
    };
    let r = wh.sync_as(
        &mut source,
        None,
        &wh.spec,
        500,
        jiff::Timestamp::now(),
        Some(CONSUMER),
    );
    assert!(
        retention_gap(&r).contains("its record did not hold"),
        "{r:#?}"
    );
}

/// A sync that records no progress (a local `sync` without `--record-progress`) holds nothing
/// back: events retention deletes during its run, after where its load started, are reported
/// as possibly missing. It used to report `Success` without them (review).
#[test]
fn a_run_without_a_record_reports_events_deleted_during_it() {
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(3, &["a1", "a2"]));
    let wh = TestWarehouse::sqlite();
    assert_eq!(sync(&wh, &url, None).status, SyncStatus::Success);
    ingest(&mut *s, &received(3, &["b1", "b2", "b3"]));
    ingest(&mut *s, &received(0, &["fresh"]));
    let during_url = url.clone();
    let mut source = Interrupted {
        inner: StoreSource(open(&url)),
        fail_records: 0,
        during: Some(Box::new(move || {
            assert!(prune_at(&during_url, jiff::Timestamp::now()).deleted > 0);
        })),
    };
    let r = wh.sync_as(
        &mut source,
        None,
        &wh.spec,
        500,
        jiff::Timestamp::now(),
        None,
    );
    assert_eq!(
        wh.count("tracks"),
        3,
        "b1..b3 were deleted before they were read"
    );
    let said = retention_gap(&r);
    assert!(said.contains("records no progress"), "{r:#?}");
    // A run that holds nothing back and loses nothing says nothing.
    ingest(&mut *s, &received(0, &["later"]));
    let r = sync(&wh, &url, None);
    assert_eq!(
        (r.status, wh.count("tracks")),
        (SyncStatus::Success, 4),
        "{r:#?}"
    );
}

/// A one-day window keeps nothing older than a day with no consumer recorded, and nothing
/// younger whatever the consumers have loaded.
#[test]
fn young_events_stay_whatever_the_consumers_loaded() {
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(3, &["old"]));
    ingest(&mut *s, &received(0, &["young"]));
    let head = s.head_seq().unwrap();
    record(&mut *s, head, 3600);
    let outcome = prune_at(&url, jiff::Timestamp::now());
    assert_eq!(outcome.deleted, 1);
    assert_eq!(
        outcome.cut.window_seconds, 86_400,
        "the longer of the two windows"
    );
    assert_eq!(s.event_count().unwrap(), 1);
}

/// `export` of events says so when retention deleted some of those it was asked for: it
/// printed the rows left and exited 0 as if none were missing.
#[test]
fn an_export_of_events_retention_deleted_warns() {
    let (mut s, url, _d) = store();
    ingest(&mut *s, &received(3, &["old1", "old2"]));
    ingest(&mut *s, &received(0, &["young"]));
    let head = s.head_seq().unwrap();
    record(&mut *s, head, 3600);
    assert_eq!(prune_at(&url, jiff::Timestamp::now()).deleted, 2);
    let gone = s.pruned().unwrap().through_seq;
    let export = |after: i64| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
            .args([
                "export",
                "--store",
                &url,
                "--table",
                "events",
                "--after-seq",
            ])
            .arg(after.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).lines().count(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (rows, err) = export(0);
    assert_eq!(rows, 1, "the young event");
    assert!(
        err.contains(&format!("retention deleted the events up to seq {gone}")),
        "{err}"
    );
    let (rows, err) = export(gone);
    assert_eq!(rows, 1);
    assert!(!err.contains("retention"), "{err}");
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = client().request(method, url).bearer_auth(FEED_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A consumer's record is read only once its token is checked, and only up to 1 KB: a client
/// without the token that announces a large body is refused without the engine waiting for (or
/// buffering) it, and an authorized body over the limit gets a 413 that names it.
#[tokio::test]
async fn a_consumer_record_is_refused_before_its_body_is_read_and_its_size_is_bounded() {
    use tokio::io::AsyncWriteExt;
    let engine = support::engine::start(8).await;
    let addr = engine.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(
        format!(
            "PUT /v1/feed-consumers/team-a/wh HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{{\"afterSeq\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The rest of the body is never sent.
    let answer = support::engine::answer_without_the_body(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    let url = format!("{}/v1/feed-consumers/team-a/wh", engine.base);
    let padded = json!({"afterSeq": 1, "backfillWindowSeconds": 60, "pad": "x".repeat(2000)});
    let (status, err) = call(reqwest::Method::PUT, url.clone(), Some(padded)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("1024 bytes"),
        "{err}"
    );
    let (status, list) = call(
        reqwest::Method::GET,
        format!("{}/v1/feed-consumers", engine.base),
        None,
    )
    .await;
    assert_eq!(
        (status, list["consumers"].clone()),
        (StatusCode::OK, json!([])),
        "nothing recorded"
    );
    let (status, _) = call(
        reqwest::Method::PUT,
        url,
        Some(json!({"afterSeq": 1, "backfillWindowSeconds": 60})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    engine.engine.stop().await.unwrap();
}

/// The consumers' API: recorded, listed, removed; every refusal names what is wrong and
/// changes nothing; the token is required; a pass asked for with retention off is refused.
#[tokio::test]
async fn the_feed_consumers_api_records_lists_removes_and_refuses_bad_input() {
    let engine = support::engine::start(8).await;
    let base = &engine.base;
    let consumers = format!("{base}/v1/feed-consumers");
    let put = |path: &str, body: Value| {
        call(
            reqwest::Method::PUT,
            format!("{consumers}/{path}"),
            Some(body),
        )
    };
    for (path, body, names) in [
        (
            "Team_A/wh",
            json!({"afterSeq": 1, "backfillWindowSeconds": 60}),
            "namespace",
        ),
        (
            "-team/wh",
            json!({"afterSeq": 1, "backfillWindowSeconds": 60}),
            "namespace",
        ),
        (
            "team-a/wh..x",
            json!({"afterSeq": 1, "backfillWindowSeconds": 60}),
            "name",
        ),
        (
            "team-a/WH",
            json!({"afterSeq": 1, "backfillWindowSeconds": 60}),
            "name",
        ),
        (
            "team-a/wh",
            json!({"afterSeq": -1, "backfillWindowSeconds": 60}),
            "afterSeq",
        ),
        (
            "team-a/wh",
            json!({"afterSeq": 1, "backfillWindowSeconds": -5}),
            "backfillWindowSeconds",
        ),
        ("team-a/wh", json!({"afterSeq": 1}), "backfillWindowSeconds"),
        (
            "team-a/wh",
            json!({"afterSeq": 1, "backfillWindowSeconds": 60, "extra": 1}),
            "extra",
        ),
        (
            "team-a/wh",
            json!({"afterSeq": "1", "backfillWindowSeconds": 60}),
            "body",
        ),
    ] {
        let (status, err) = put(path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert!(
            err["error"].as_str().unwrap().contains(names),
            "{path} {body}: {err}"
        );
    }
    let (status, list) = call(reqwest::Method::GET, consumers.clone(), None).await;
    assert_eq!(
        (status, list["consumers"].clone()),
        (StatusCode::OK, json!([]))
    );

    let (status, _) = put(
        "team-a/wh",
        json!({"afterSeq": 7, "backfillWindowSeconds": 3600}),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = call(reqwest::Method::GET, consumers.clone(), None).await;
    assert_eq!(list["consumers"][0]["name"], "team-a/wh");
    assert_eq!(list["consumers"][0]["afterSeq"], 7);
    assert_eq!(list["consumers"][0]["backfillWindowSeconds"], 3600);
    assert_eq!(list["retention"]["enabled"], false);
    assert_eq!(list["retention"]["cut"], Value::Null);

    // Without the token: refused, nothing changes.
    let r = client()
        .delete(format!("{consumers}/team-a/wh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client().get(consumers.clone()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (_, list) = call(reqwest::Method::GET, consumers.clone(), None).await;
    assert_eq!(list["consumers"].as_array().unwrap().len(), 1);

    for _ in 0..2 {
        let (status, _) = call(
            reqwest::Method::DELETE,
            format!("{consumers}/team-a/wh"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (_, list) = call(reqwest::Method::GET, consumers.clone(), None).await;
    assert_eq!(list["consumers"], json!([]));
    // A sync's record to an engine older than retention (its 404, played by a path this one
    // does not serve) is no error: that engine deletes nothing.
    let older = format!("{base}/older-release");
    let recorded = tokio::task::spawn_blocking(move || {
        EngineSource::new(&older, FEED_TOKEN.into())
            .unwrap()
            .record_progress(CONSUMER, 1, 60)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    assert_eq!(recorded, Ok(()));
    let (status, err) = call(reqwest::Method::POST, format!("{base}/v1/retention"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(err["error"].as_str().unwrap().contains("--event-retention"));
    engine.engine.stop().await.unwrap();
}

/// One retention pass at a time: while one waits for the store (another connection holds
/// SQLite's write lock), a second asked for is refused with a 409 at once; the first completes
/// once the lock is let go.
#[tokio::test]
async fn one_pass_at_a_time() {
    let engine = support::engine::start_options(support::engine::Options {
        retention: Some(Retention {
            min_age: std::time::Duration::from_secs(86_400),
            interval: std::time::Duration::from_secs(86_400),
        }),
        ..Default::default()
    })
    .await;
    let lock = rusqlite::Connection::open(&engine.store_path).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let url = format!("{}/v1/retention", engine.base);
    let mut a = tokio::spawn(call(reqwest::Method::POST, url.clone(), None));
    let mut b = tokio::spawn(call(reqwest::Method::POST, url, None));
    let (first, other) = tokio::select! {
        r = &mut a => (r.unwrap(), b),
        r = &mut b => (r.unwrap(), a),
    };
    assert_eq!(first.0, StatusCode::CONFLICT, "{}", first.1);
    assert!(
        first.1["error"]
            .as_str()
            .unwrap()
            .contains("already running")
    );
    lock.execute_batch("COMMIT").unwrap();
    let (status, done) = other.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{done}");
    engine.engine.stop().await.unwrap();
}

/// A sync of `wh` as [`CONSUMER`] through the engine's feed API at `base` (on a blocking
/// thread: the source's client is blocking).
async fn sync_through(
    base: String,
    wh: TestWarehouse,
) -> (TestWarehouse, profiles_sync::sync::SyncReport) {
    tokio::task::spawn_blocking(move || {
        let mut source = EngineSource::new(&base, FEED_TOKEN.into()).unwrap();
        let spec = wh.spec.clone();
        let r = wh.sync_as(
            &mut source,
            None,
            &spec,
            500,
            jiff::Timestamp::now(),
            Some(CONSUMER),
        );
        (wh, r)
    })
    .await
    .unwrap()
}

/// An engine with retention: a sync through its feed API records the connection; a pass
/// deletes the events it loaded (not the ones after), the catalog shows the horizon, the
/// metrics count them; the connection's next sync loads the rest.
#[tokio::test]
async fn an_engine_deletes_what_its_consumers_loaded_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    ingest(&mut *open(&url), &received(90, &["a1", "a2", "a3"]));
    let engine = support::engine::start_options(support::engine::Options {
        store_url: Some(url.clone()),
        retention: Some(Retention {
            min_age: std::time::Duration::from_secs(86_400),
            interval: std::time::Duration::from_secs(86_400),
        }),
        ..Default::default()
    })
    .await;
    let base = engine.base.clone();
    // A 30-day window: the first sync loads none of the 90-day-old events, and the pass may
    // delete them (older than every window, loaded as far as the connection goes).
    let mut wh = TestWarehouse::sqlite();
    wh.spec.backfill.events = "30d".into();
    let (wh, r) = sync_through(base, wh).await;
    assert_eq!(r.status, SyncStatus::Success, "{r:#?}");
    ingest(&mut *open(&url), &received(90, &["b1"]));

    let (status, list) = call(
        reqwest::Method::GET,
        format!("{}/v1/feed-consumers", engine.base),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["consumers"][0]["name"], CONSUMER);
    assert_eq!(list["retention"]["cut"]["heldBy"], CONSUMER);

    let (status, done) = call(
        reqwest::Method::POST,
        format!("{}/v1/retention", engine.base),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["deleted"], 3, "{done}");
    // Three events fill no run of the messageId index but its newest, which stays.
    assert_eq!(done["messageIdsDeleted"], 0, "{done}");
    let (_, catalog) = call(
        reqwest::Method::GET,
        format!("{}/v1/feeds", engine.base),
        None,
    )
    .await;
    assert_eq!(catalog["pruned"], done["pruned"]);
    assert!(catalog["pruned"]["throughSeq"].as_i64().unwrap() > 0);
    let metrics = support::engine::metrics(&engine.base).await.unwrap();
    assert!(
        metrics.contains("profiles_sync_engine_events_pruned_total 3")
            && metrics.contains("profiles_sync_engine_message_ids_pruned_total 0"),
        "{metrics}"
    );

    let (wh, r) = sync_through(engine.base.clone(), wh).await;
    let r = (r, wh.count("order_completed"));
    // b1, imported after the first sync, loads whatever its receivedAt.
    assert_eq!(
        (r.0.status, r.0.errors.len(), r.1),
        (SyncStatus::Success, 0, 1),
        "{:#?}",
        r.0
    );
    engine.engine.stop().await.unwrap();
}
