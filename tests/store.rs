//! The store suite: every test runs against the embedded SQLite store and against a real
//! PostgreSQL server started by the test harness.

mod support;

use std::collections::HashSet;

use profiles_sync::event::{Event, ParseOptions, Timestamp};
use profiles_sync::identity::Rules;
use profiles_sync::store::{
    self, EventFilter, Feed, FeedRow, IngestSummary, StateTable, Store, StoreError,
};
use serde_json::{Value, json};

/// A fresh store of the given kind, and its URL (to open a second handle on it).
fn fresh(kind: &str) -> (Box<dyn Store>, String, Option<tempfile::TempDir>) {
    match kind {
        "sqlite" => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            (store::open(&url, Rules::default()).unwrap(), url, Some(dir))
        }
        _ => {
            let pg = support::pg::shared();
            let url = pg.url(&pg.create_database("store"));
            (store::open(&url, Rules::default()).unwrap(), url, None)
        }
    }
}

/// Runs `sql` on the store at `url` (of `kind`) outside the store's code: what an older
/// release, a DBA or a partial restore left.
fn execute_on_store(kind: &str, url: &str, sql: &str) {
    match kind {
        "sqlite" => rusqlite::Connection::open(url.trim_start_matches("sqlite://"))
            .unwrap()
            .execute_batch(sql)
            .unwrap(),
        _ => ::postgres::Client::connect(url, ::postgres::NoTls)
            .unwrap()
            .batch_execute(sql)
            .unwrap(),
    }
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_767_225_600 + secs).unwrap()
}

fn event(v: Value) -> Event {
    let opts = ParseOptions {
        now: at(0),
        source_id: "src_web".into(),
        trust_received_at: true,
    };
    Event::from_json(&v, None, &opts).unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn page(id: &str, anon: &str) -> Event {
    event(
        json!({"type": "page", "messageId": id, "anonymousId": anon, "name": "Home", "properties": {"path": "/"}}),
    )
}

fn identify(id: &str, anon: &str, email: &str) -> Event {
    event(
        json!({"type": "identify", "messageId": id, "anonymousId": anon, "traits": {"email": email, "plan": "pro"}}),
    )
}

fn track(id: &str, user: &str, name: &str) -> Event {
    event(
        json!({"type": "track", "messageId": id, "userId": user, "event": name, "properties": {"total": 12.5}}),
    )
}

fn all(store: &mut dyn Store, feed: &Feed) -> Vec<FeedRow> {
    store.read_feed(feed, 0, usize::MAX >> 1).unwrap()
}

fn seqs(rows: &[FeedRow]) -> Vec<i64> {
    rows.iter().map(FeedRow::seq).collect()
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[test] fn $name() { super::$name("sqlite"); } )* }
        mod postgres { $( #[test] fn $name() { super::$name("postgres"); } )* }
    };
}

both_stores!(
    segment_example_rows_land_in_seq_order,
    duplicate_message_ids_are_stored_and_resolved_once,
    feeds_page_without_gaps_or_repeats,
    a_reopened_store_resolves_against_its_history,
    events_read_back_exactly_as_ingested,
    track_event_names_and_filters,
    two_writers_on_one_store_stay_consistent,
    sources_are_recorded,
    replaying_a_stream_into_a_fresh_store_gives_the_same_logs,
    current_state_tables_page_by_key_to_the_whole_state,
    a_version_2_store_is_migrated_in_place,
    an_earlier_sighting_moves_an_identifier_s_first_seen_back,
    a_window_added_later_counts_identifiers_by_their_last_sighting,
    a_store_a_newer_release_wrote_is_refused,
    events_are_pruned_oldest_first_and_nothing_else_is,
    feed_consumers_are_recorded_replaced_and_removed,
    a_store_from_before_retention_gets_its_tables,
    a_store_url_read_from_a_secret_may_end_in_a_line_break,
    a_store_keeps_its_id_and_another_store_has_another,
);

/// A store's id is made with it and kept (reopened, by a second handle, after writes); another
/// store has another; a store an earlier release made (without the table) gets one when opened.
fn a_store_keeps_its_id_and_another_store_has_another(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    let id = s.store_id().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    s.ingest(vec![page("p1", "a1")]).unwrap();
    let mut second = store::open(&url, Rules::default()).unwrap();
    assert_eq!(second.store_id().unwrap(), id);
    drop((s, second));
    assert_eq!(
        store::open(&url, Rules::default())
            .unwrap()
            .store_id()
            .unwrap(),
        id
    );
    let (mut other, _other_url, _other_keep) = fresh(kind);
    assert_ne!(other.store_id().unwrap(), id);
    drop(other);
    let drop_id = "DROP TABLE store_identity";
    execute_on_store(kind, &url, drop_id);
    let mut older = store::open(&url, Rules::default()).unwrap();
    let made = older.store_id().unwrap();
    assert_ne!(made, id, "a new id for a store that had none");
    assert_eq!(event_ids(&mut *older), ["p1"], "its data kept");
    drop(older);
    // A table left without its row (a partial restore) gets one too.
    let empty_id = "DELETE FROM store_identity";
    execute_on_store(kind, &url, empty_id);
    let again = store::open(&url, Rules::default())
        .unwrap()
        .store_id()
        .unwrap();
    assert_ne!(again, made);
}

/// An event received at `at(secs)`.
fn received(id: &str, secs: i64, v: Value) -> Event {
    let mut v = v;
    v["messageId"] = json!(id);
    v["receivedAt"] = json!(at(secs).to_string());
    event(v)
}

fn event_ids(store: &mut dyn Store) -> Vec<String> {
    all(store, &Feed::Events(EventFilter::All))
        .iter()
        .filter_map(|r| match r {
            FeedRow::Event(e) => Some(e.event.message_id.clone()),
            _ => None,
        })
        .collect()
}

/// Retention deletes events from the oldest, in `seq` order, while each is within the cut (at
/// or below the consumers' `seq`, received before the window): it stops at the first event too
/// young, so an imported event with an old `receivedAt` waits for the horizon; the change logs
/// and the current state stay whole; a deleted event's messageId is new again, a kept one's
/// still a duplicate; a second handle sees the horizon.
fn events_are_pruned_oldest_first_and_nothing_else_is(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    let anon = json!({"type": "page", "anonymousId": "a1", "name": "Home"});
    s.ingest(vec![
        received("e1", 100, anon.clone()),
        received("e2", 200, anon.clone()),
        received(
            "e3",
            300,
            json!({"type": "identify", "anonymousId": "a1", "userId": "u1", "traits": {"plan": "pro"}}),
        ),
        received("e4", 400, anon.clone()),
        received("e5", 50, anon.clone()),
        received("e6", 500, anon.clone()),
    ])
    .unwrap();
    let logs = [
        Feed::IdGraphUpdates,
        Feed::ExternalIdMappingUpdates,
        Feed::ProfileTraitsUpdates,
    ];
    let logs_before: Vec<Vec<FeedRow>> = logs.iter().map(|f| all(&mut *s, f)).collect();
    let state_before = s.load_state().unwrap();
    let seq_of = |s: &mut dyn Store, id: &str| {
        all(s, &Feed::Events(EventFilter::All))
            .iter()
            .find_map(|r| match r {
                FeedRow::Event(e) if e.event.message_id == id => Some(e.seq),
                _ => None,
            })
            .unwrap()
    };
    let (e2, e3, e4) = (
        seq_of(&mut *s, "e2"),
        seq_of(&mut *s, "e3"),
        seq_of(&mut *s, "e4"),
    );
    let head = s.head_seq().unwrap();
    let before = |secs: i64| at(secs).as_microsecond();
    assert_eq!(s.pruned().unwrap(), store::Pruned::default());

    // No consumer, no window: events received before `now` go, up to the head.
    let keep = |now: i64| store::Keep {
        min_age_seconds: 0,
        now_us: now,
        head,
    };
    let step = s.prune_events(&keep(before(250)), 1).unwrap();
    assert_eq!(
        (step.deleted, step.done),
        (1, false),
        "a full step: more may follow"
    );
    let step = s.prune_events(&keep(before(250)), 10).unwrap();
    assert_eq!((step.deleted, step.done), (1, true), "e3 is too young");
    assert_eq!(step.blocked_by, Some((e3, before(300))), "e3 stopped it");
    let horizon = |p: &store::Pruned| (p.through_seq, p.max_received_at_us);
    assert_eq!(horizon(&step.pruned), (e2, Some(before(200))));
    assert_eq!(event_ids(&mut *s), ["e3", "e4", "e5", "e6"]);
    // Nothing more under the same cut.
    let again = s.prune_events(&keep(before(250)), 10).unwrap();
    assert_eq!(
        (again.deleted, horizon(&again.pruned)),
        (0, horizon(&step.pruned))
    );

    // Every event is old enough now, but a consumer has loaded only up to e4: the step takes
    // its record (and its one-second window) from inside its own transaction.
    s.set_consumer(&store::Consumer {
        name: "analytics/wh".into(),
        after_seq: e4,
        window_seconds: 1,
        updated_at: at(0),
    })
    .unwrap();
    let step = s.prune_events(&keep(before(10_000)), 10).unwrap();
    assert_eq!(step.cut, (e4, before(10_000) - 1_000_000));
    assert_eq!((step.deleted, step.done), (2, true));
    assert_eq!(event_ids(&mut *s), ["e5", "e6"], "e5 waits for the horizon");
    assert_eq!(s.event_count().unwrap(), 2);
    let logs_after: Vec<Vec<FeedRow>> = logs.iter().map(|f| all(&mut *s, f)).collect();
    assert_eq!(logs_after, logs_before, "the change logs are whole");
    assert_eq!(s.load_state().unwrap(), state_before);

    let other = store::open(&url, Rules::default())
        .unwrap()
        .pruned()
        .unwrap();
    assert_eq!(horizon(&other), (e4, Some(before(400))));
    // The newest deleted event of each type (and Track name: none were tracks).
    let names: Vec<(String, String, i64)> = other
        .by_name
        .into_iter()
        .map(|n| (n.event_type, n.event, n.max_received_at_us))
        .collect();
    assert_eq!(
        names,
        [
            ("identify".to_string(), String::new(), before(300)),
            ("page".to_string(), String::new(), before(400))
        ]
    );
    // A deleted event's messageId is new again; a kept one's is still a duplicate.
    let summary = s
        .ingest(vec![
            received("e1", 600, anon.clone()),
            received("e6", 600, anon),
        ])
        .unwrap();
    assert_eq!((summary.accepted, summary.duplicates), (1, 1));
    assert_eq!(event_ids(&mut *s), ["e5", "e6", "e1"]);
}

/// A consumer's progress is recorded, replaced by its next record, listed by name and removed.
fn feed_consumers_are_recorded_replaced_and_removed(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    let consumer = |name: &str, after_seq: i64, secs: i64| store::Consumer {
        name: name.into(),
        after_seq,
        window_seconds: 86_400,
        updated_at: at(secs),
    };
    assert_eq!(s.consumers().unwrap(), []);
    s.set_consumer(&consumer("team-b/wh", 40, 1)).unwrap();
    s.set_consumer(&consumer("team-a/wh", 7, 2)).unwrap();
    // A warehouse emptied and synced from scratch goes back: its record follows.
    s.set_consumer(&consumer("team-b/wh", 12, 3)).unwrap();
    let mut other = store::open(&url, Rules::default()).unwrap();
    assert_eq!(
        other.consumers().unwrap(),
        [consumer("team-a/wh", 7, 2), consumer("team-b/wh", 12, 3)]
    );
    assert!(other.remove_consumer("team-a/wh").unwrap());
    assert!(!s.remove_consumer("team-a/wh").unwrap());
    assert_eq!(s.consumers().unwrap(), [consumer("team-b/wh", 12, 3)]);
}

/// A store written before retention (format 5 without its tables) gets them when opened, its
/// events untouched.
fn a_store_from_before_retention_gets_its_tables(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    s.ingest(vec![page("p1", "a1")]).unwrap();
    drop(s);
    let drop_tables =
        "DROP TABLE feed_consumers; DROP TABLE event_retention; DROP TABLE pruned_events;";
    execute_on_store(kind, &url, drop_tables);
    let mut s = store::open(&url, Rules::default()).unwrap();
    assert_eq!(s.pruned().unwrap(), store::Pruned::default());
    assert_eq!(s.consumers().unwrap(), []);
    let head = s.head_seq().unwrap();
    let keep = store::Keep {
        min_age_seconds: 0,
        now_us: at(10_000).as_microsecond(),
        head,
    };
    let step = s.prune_events(&keep, 10).unwrap();
    assert_eq!(step.deleted, 1);
    assert_eq!(event_ids(&mut *s), Vec::<String>::new());
}

/// A store in a format newer than this binary knows (a downgrade) is refused with an error
/// that says so, and left as it is — an older binary writing it could break what the newer
/// format relies on.
fn a_store_a_newer_release_wrote_is_refused(kind: &str) {
    let (s, url, _dir) = fresh(kind);
    drop(s);
    let bump = "99";
    if kind == "sqlite" {
        let path = url.trim_start_matches("sqlite://");
        let c = rusqlite::Connection::open(path).unwrap();
        c.pragma_update(None, "user_version", bump).unwrap();
    } else {
        let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        c.batch_execute(&format!("INSERT INTO store_schema VALUES ({bump})"))
            .unwrap();
    }
    let err = store::open(&url, Rules::default())
        .err()
        .expect("a newer store is refused");
    assert!(
        matches!(err, StoreError::NewerFormat { found: 99, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("written by a newer release"),
        "{err}"
    );
}

/// An engine older than format 3, still running beside a newer one during a rolling upgrade,
/// writes state rows without stamping them (`updated_seq` 0 on an insert, unchanged on an
/// update). PostgreSQL stamps them past the head, so the newer writer's catch-up still reads
/// them: it resolves to the older writer's profile instead of creating another, and keeps the
/// traits the older writer set. (SQLite's one engine never runs beside another.)
#[test]
fn postgres_an_older_replica_s_rows_are_stamped_for_the_others() {
    let (mut a, url, _keep) = fresh("postgres");
    a.ingest(vec![page("a-0", "x1")]).unwrap();
    let x1 = match &all(&mut *a, &Feed::Events(EventFilter::All))[0] {
        FeedRow::Event(e) => e.segment_id.clone(),
        other => panic!("{other:?}"),
    };
    // What an older engine's write leaves: a new profile with an identifier, another profile
    // changed, the head moved.
    let older = format!(
        "INSERT INTO profiles (segment_id, canonical_segment_id, created_rank, merges, traits, trait_times)
           VALUES ('use_old', 'use_old', 1000, 0, '{{\"plan\":\"old\"}}', '{{}}');
         INSERT INTO identifiers (id_type, value, segment_id, first_seen_us, last_seen_us)
           VALUES ('anonymous_id', 'z9', 'use_old', 0, 0);
         UPDATE profiles SET traits = '{{\"tier\":\"gold\"}}' WHERE segment_id = '{x1}';
         UPDATE seq_counter SET head = head + 1 WHERE id = 1;"
    );
    ::postgres::Client::connect(&url, ::postgres::NoTls)
        .unwrap()
        .batch_execute(&older)
        .unwrap();
    let r = a
        .ingest(vec![
            page("a-1", "z9"),
            identify("a-2", "x1", "x@example.com"),
        ])
        .unwrap();
    assert_eq!(r.profiles_created, 0, "z9 got a profile of its own");
    let rows = all(&mut *a, &Feed::Events(EventFilter::All));
    assert!(
        rows.iter().any(
            |r| matches!(r, FeedRow::Event(e) if e.event.message_id == "a-1" && e.segment_id == "use_old")
        ),
        "a-1 resolved to the older writer's profile"
    );
    let (profiles, _) = a.load_state().unwrap();
    let traits = &profiles.iter().find(|p| p.segment_id == x1).unwrap().traits;
    assert_eq!(traits.get("tier"), Some(&json!("gold")), "{traits:?}");
    assert_eq!(traits.get("email"), Some(&json!("x@example.com")));
}

/// An event stamped before an identifier's first sighting (a late upload from a device)
/// moves its stored `first_seen` back (the warehouse's `user_identifiers.timestamp`): the
/// upsert used to keep the first value it stored.
fn an_earlier_sighting_moves_an_identifier_s_first_seen_back(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    let page_at = |id: &str, ts: &str| {
        event(json!({"type": "page", "messageId": id, "anonymousId": "late", "timestamp": ts}))
    };
    s.ingest(vec![page_at("p1", "2026-01-01T10:00:00Z")])
        .unwrap();
    s.ingest(vec![page_at("p2", "2025-12-31T08:00:00Z")])
        .unwrap();
    let (_, identifiers) = s.load_state().unwrap();
    let late = identifiers.iter().find(|i| i.value == "late").unwrap();
    assert_eq!(late.first_seen.to_string(), "2025-12-31T08:00:00Z");
}

/// A user_id seen every month is stored with its latest sighting (to the day) though its type
/// has no window: once the rules give the type a window and the store is reopened, the limit
/// counts it, and a second user_id does not join the profile. (It was stored as last seen at
/// its first sighting, outside the window, and u2 joined u1's profile.)
fn a_window_added_later_counts_identifiers_by_their_last_sighting(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    let seen = |id: &str, user: &str, ts: &str| {
        event(
            json!({"type": "track", "messageId": id, "userId": user, "anonymousId": "a1",
                     "event": "E", "timestamp": ts}),
        )
    };
    for (i, day) in ["2025-09-01", "2025-10-01", "2025-11-01", "2025-12-30"]
        .iter()
        .enumerate()
    {
        s.ingest(vec![seen(
            &format!("d{i}"),
            "u1",
            &format!("{day}T00:00:00Z"),
        )])
        .unwrap();
    }
    drop(s);
    let rules = Rules::from_yaml("limits: {user_id: {max: 1, window: 30d}}").unwrap();
    let mut s = store::open(&url, rules).unwrap();
    s.ingest(vec![seen("d9", "u2", "2025-12-31T00:00:00Z")])
        .unwrap();
    let (_, identifiers) = s.load_state().unwrap();
    let find = |v: &str| identifiers.iter().find(|i| i.value == v).unwrap();
    assert_eq!(find("u1").last_seen.to_string(), "2025-12-30T00:00:00Z");
    assert_ne!(find("u2").segment_id, find("u1").segment_id);
}

fn segment_example_rows_land_in_seq_order(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    let summary = s
        .ingest(vec![
            page("m1", "a1"),
            identify("m2", "a1", "jane@example.com"),
            page("m3", "a2"),
            identify("m4", "a2", "jane@example.com"),
        ])
        .unwrap();
    assert_eq!(summary.accepted, 4);
    assert_eq!(summary.profiles_created, 2);
    assert_eq!(summary.merges, 1);

    let graph = all(&mut *s, &Feed::IdGraphUpdates);
    let pairs: Vec<(String, String)> = graph
        .iter()
        .map(|r| match r {
            FeedRow::IdGraph(r) => (r.segment_id.clone(), r.canonical_segment_id.clone()),
            _ => unreachable!(),
        })
        .collect();
    // profile_1 and profile_2 created, then profile_2 merged into the older profile_1.
    assert_eq!(pairs.len(), 3, "{pairs:?}");
    let (p1, p2) = (pairs[0].0.clone(), pairs[1].0.clone());
    assert_eq!(pairs[0], (p1.clone(), p1.clone()));
    assert_eq!(pairs[1], (p2.clone(), p2.clone()));
    assert_eq!(pairs[2], (p2.clone(), p1.clone()));

    let mappings = all(&mut *s, &Feed::ExternalIdMappingUpdates);
    let ids: Vec<(String, String, String)> = mappings
        .iter()
        .map(|r| match r {
            FeedRow::Mapping(m) => (
                m.external_id_type.clone(),
                m.external_id_value.clone(),
                m.segment_id.clone(),
            ),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("anonymous_id".into(), "a1".into(), p1.clone()),
            ("email".into(), "jane@example.com".into(), p1.clone()),
            ("anonymous_id".into(), "a2".into(), p2.clone()),
        ]
    );

    // One store-wide seq: every row of every feed has a distinct seq, and head is the largest.
    let events = all(&mut *s, &Feed::Events(EventFilter::All));
    let traits = all(&mut *s, &Feed::ProfileTraitsUpdates);
    let mut every: Vec<i64> =
        [seqs(&graph), seqs(&mappings), seqs(&events), seqs(&traits)].concat();
    for feed_seqs in [seqs(&graph), seqs(&mappings), seqs(&events)] {
        assert!(feed_seqs.windows(2).all(|w| w[0] < w[1]), "{feed_seqs:?}");
    }
    every.sort();
    let n = every.len();
    every.dedup();
    assert_eq!(every.len(), n, "a seq was used twice");
    assert_eq!(s.head_seq().unwrap(), *every.last().unwrap());
    // The merge row comes after the rows that created both profiles.
    assert!(graph[2].seq() > graph[1].seq());
    // Each event carries the profile it resolved to: the last identify resolved to the survivor.
    match events.last() {
        Some(FeedRow::Event(e)) => assert_eq!(e.segment_id, p1),
        other => panic!("{other:?}"),
    }
}

fn duplicate_message_ids_are_stored_and_resolved_once(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    let first = s
        .ingest(vec![page("dup", "a1"), page("dup", "a1")])
        .unwrap();
    assert_eq!((first.accepted, first.duplicates), (1, 1));
    let again = s
        .ingest(vec![page("dup", "a1"), page("other", "a9")])
        .unwrap();
    assert_eq!((again.accepted, again.duplicates), (1, 1));
    assert_eq!(s.event_count().unwrap(), 2);
    let created = all(&mut *s, &Feed::IdGraphUpdates);
    assert_eq!(created.len(), 2, "a1 and a9 each created once");
    let a1 = all(&mut *s, &Feed::ExternalIdMappingUpdates)
        .into_iter()
        .filter(|r| matches!(r, FeedRow::Mapping(m) if m.external_id_value == "a1"))
        .count();
    assert_eq!(a1, 1);
    // Stored ids anywhere in a large batch (the lookups go 64 to a statement): 200 new, with
    // every 7th of 200 stored ones among them.
    let stored: Vec<Event> = (0..200).map(|i| page(&format!("s{i}"), "a1")).collect();
    s.ingest(stored).unwrap();
    let mixed: Vec<Event> = (0..200)
        .flat_map(|i| {
            let old = (i % 7 == 0).then(|| page(&format!("s{i}"), "a1"));
            std::iter::once(page(&format!("n{i}"), "a1")).chain(old)
        })
        .collect();
    let r = s.ingest(mixed).unwrap();
    assert_eq!((r.accepted, r.duplicates), (200, 29));
    assert_eq!(s.event_count().unwrap(), 402);
    // A refused event is not stored, so a later event of the batch with its messageId (the
    // client's corrected copy) is stored, not counted as a duplicate of it.
    // (Its only identifier is blocked: the default rules block "anonymous".)
    let refused = page("fixed", "anonymous");
    let r = s.ingest(vec![refused, page("fixed", "a1")]).unwrap();
    assert_eq!((r.accepted, r.duplicates, r.rejected.len()), (1, 0, 1));
    assert_eq!(s.event_count().unwrap(), 403);
}

fn feeds_page_without_gaps_or_repeats(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    // 150 events a batch: more than one multi-row INSERT's worth, and a remainder.
    for batch in 0..5 {
        let events = (0..150)
            .map(|i| {
                track(
                    &format!("t{batch}-{i}"),
                    &format!("u{}", i % 7),
                    "Order Completed",
                )
            })
            .collect();
        s.ingest(events).unwrap();
    }
    let everything = all(&mut *s, &Feed::Events(EventFilter::All));
    assert_eq!(everything.len(), 750);
    let ids: Vec<String> = everything
        .iter()
        .filter_map(|r| match r {
            FeedRow::Event(e) => Some(e.event.message_id.clone()),
            _ => None,
        })
        .collect();
    let sent: Vec<String> = (0..5)
        .flat_map(|b| (0..150).map(move |i| format!("t{b}-{i}")))
        .collect();
    assert_eq!(ids, sent, "events in the order they were ingested");
    for limit in [1, 7, 64, 500] {
        let mut cursor = 0;
        let mut got = vec![];
        loop {
            let page = s
                .read_feed(&Feed::Events(EventFilter::All), cursor, limit)
                .unwrap();
            assert!(page.len() <= limit);
            let Some(last) = page.last() else { break };
            cursor = last.seq();
            got.extend(page);
        }
        assert_eq!(seqs(&got), seqs(&everything), "limit {limit}");
    }
}

fn a_reopened_store_resolves_against_its_history(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    s.ingest(vec![identify("m1", "a1", "jane@example.com")])
        .unwrap();
    drop(s);
    let mut reopened = store::open(&url, Rules::default()).unwrap();
    let summary = reopened
        .ingest(vec![
            page("m2", "a1"),
            identify("m3", "a2", "jane@example.com"),
        ])
        .unwrap();
    assert_eq!(
        summary.profiles_created, 0,
        "known identifiers must find their profile after a restart"
    );
    let events = all(&mut *reopened, &Feed::Events(EventFilter::All));
    let profiles: HashSet<String> = events
        .iter()
        .map(|r| match r {
            FeedRow::Event(e) => e.segment_id.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(profiles.len(), 1, "{profiles:?}");
}

fn events_read_back_exactly_as_ingested(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    let original = event(json!({
        "type": "track", "messageId": "rt1", "userId": "u1", "event": "Order Completed",
        "timestamp": "2026-01-01T10:00:00.123Z", "sentAt": "2026-01-01T10:00:01Z",
        "properties": {"total": 99.5, "items": [{"sku": "a"}], "coupon": null},
        "context": {"ip": "203.0.113.9", "library": {"name": "analytics-python", "version": "2.3.3"}},
        "customTopLevel": {"kept": true}
    }));
    s.ingest(vec![original.clone()]).unwrap();
    match &all(&mut *s, &Feed::Events(EventFilter::All))[..] {
        [FeedRow::Event(e)] => assert_eq!(e.event, original),
        other => panic!("{other:?}"),
    }
}

fn track_event_names_and_filters(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    s.ingest(vec![
        track("t1", "u1", "Order Completed"),
        track("t2", "u1", "Signed Up"),
        page("p1", "a1"),
        track("t3", "u2", "Order Completed"),
    ])
    .unwrap();
    assert_eq!(
        s.track_event_names().unwrap(),
        ["Order Completed", "Signed Up"]
    );
    let orders = all(
        &mut *s,
        &Feed::Events(EventFilter::TrackNames(vec!["Order Completed".into()])),
    );
    assert_eq!(orders.len(), 2);
    let pages = all(&mut *s, &Feed::from_table("pages").unwrap());
    assert_eq!(pages.len(), 1);
    let none = all(&mut *s, &Feed::Events(EventFilter::TrackNames(vec![])));
    assert!(none.is_empty());
}

fn two_writers_on_one_store_stay_consistent(kind: &str) {
    // Two engine replicas on one store: each must see the other's profiles before resolving.
    let (mut a, url, _keep) = fresh(kind);
    let mut b = store::open(&url, Rules::default()).unwrap();
    a.ingest(vec![identify("m1", "a1", "jane@example.com")])
        .unwrap();
    let s = b.ingest(vec![page("m2", "a2")]).unwrap();
    assert_eq!(s.profiles_created, 1);
    let s = a
        .ingest(vec![identify("m3", "a2", "jane@example.com")])
        .unwrap();
    assert_eq!(
        (s.profiles_created, s.merges),
        (0, 1),
        "a must see b's profile and merge it"
    );
    let s = b.ingest(vec![page("m4", "a2")]).unwrap();
    assert_eq!(s.profiles_created, 0, "b must see a's merge");
    let events = all(&mut *a, &Feed::Events(EventFilter::All));
    let last = match events.last() {
        Some(FeedRow::Event(e)) => e.segment_id.clone(),
        other => panic!("{other:?}"),
    };
    let first = match events.first() {
        Some(FeedRow::Event(e)) => e.segment_id.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(last, first, "a2 resolves to the surviving (oldest) profile");
}

/// The store URL reaches the engine from a Secret (the chart's `secretKeyRef`), and a Secret
/// made from a file (`kubectl create secret --from-file`, a `stringData` block scalar) ends in
/// a line break: the URL opens the same store as without it. It named database `profiles\n`
/// (PostgreSQL: "does not exist"; with `?sslmode=require` at the end, "invalid value for
/// option `sslmode`"), and SQLite created a new, empty store file whose name ends in `\n`.
fn a_store_url_read_from_a_secret_may_end_in_a_line_break(kind: &str) {
    let (mut s, url, dir) = fresh(kind);
    let src = store::SourceInfo {
        id: "src_web".into(),
        name: "Web".into(),
        slug: "web".into(),
    };
    s.upsert_source(&src).unwrap();
    drop(s);
    for ending in ["\n", "\r\n"] {
        let mut again = store::open(&format!("{url}{ending}"), Rules::default())
            .unwrap_or_else(|e| panic!("{url:?} + {ending:?}: {e}"));
        assert_eq!(
            again.sources().unwrap(),
            std::slice::from_ref(&src),
            "{ending:?}"
        );
        drop(again);
        let existing = store::open_existing(&format!("{url}{ending}"), Rules::default())
            .unwrap_or_else(|e| panic!("{url:?} + {ending:?}: {e}"));
        drop(existing);
    }
    if let Some(dir) = dir {
        let files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(['\n', '\r']))
            .collect();
        assert!(files.is_empty(), "{files:?}");
    }
}

fn sources_are_recorded(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    let src = store::SourceInfo {
        id: "src_web".into(),
        name: "Web".into(),
        slug: "web".into(),
    };
    s.upsert_source(&src).unwrap();
    s.upsert_source(&store::SourceInfo {
        name: "Website".into(),
        ..src.clone()
    })
    .unwrap();
    assert_eq!(
        s.sources().unwrap(),
        [store::SourceInfo {
            name: "Website".into(),
            ..src
        }]
    );
}

/// Writer A takes seqs and holds its transaction open; writer B must queue behind it rather
/// than commit higher seqs first, so a reader that read past B could never skip A's rows. The
/// same on a database whose default isolation is `SERIALIZABLE` or `REPEATABLE READ` (B's lock
/// failed there with a serialization error: a writer sets `READ COMMITTED` itself).
#[test]
fn postgres_a_late_commit_is_never_skipped_by_a_reader() {
    for isolation in [None, Some("serializable"), Some("repeatable read")] {
        a_late_commit_is_never_skipped(isolation);
    }
}

fn a_late_commit_is_never_skipped(isolation: Option<&str>) {
    let pg = support::pg::shared();
    let db = pg.create_database("interleave");
    let url = pg.url(&db);
    if let Some(level) = isolation {
        pg.connect(&db)
            .batch_execute(&format!(
                "ALTER DATABASE {db} SET default_transaction_isolation = '{level}'"
            ))
            .unwrap();
    }
    let mut a = store::PostgresStore::connect(&url, Rules::default()).unwrap();
    let mut reader = store::open(&url, Rules::default()).unwrap();
    let feed = Feed::Events(EventFilter::All);

    let mut tx_a = a.begin_write().unwrap();
    let sa = tx_a
        .ingest(vec![page("a-1", "x1"), page("a-2", "x2")])
        .unwrap();

    let b_url = format!("{url}?application_name=writer_b");
    let writer_b = std::thread::spawn(move || {
        let mut b = store::open(&b_url, Rules::default()).unwrap();
        b.ingest(vec![page("b-1", "y1")]).unwrap()
    });
    // Wait (bounded) until B is blocked on A's lock: the exact interleaving under test.
    let mut watcher = pg.connect(&db);
    let mut blocked = false;
    for _ in 0..10_000 {
        let row = watcher
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE application_name = 'writer_b' AND wait_event_type = 'Lock'", &[])
            .unwrap();
        if row.is_some() {
            blocked = true;
            break;
        }
        std::thread::yield_now();
    }
    assert!(blocked, "writer B never waited for writer A's lock");
    assert!(
        reader.read_feed(&feed, 0, 100).unwrap().is_empty(),
        "uncommitted rows visible"
    );
    tx_a.commit().unwrap();
    let sb = writer_b.join().unwrap();
    assert!(sb.head > sa.head, "B's seqs come after A's");

    let rows = reader.read_feed(&feed, 0, 100).unwrap();
    let ids: Vec<String> = rows
        .iter()
        .map(|r| match r {
            FeedRow::Event(e) => e.event.message_id.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(ids, ["a-1", "a-2", "b-1"]);
    let cursor = rows.last().unwrap().seq();
    assert!(
        reader.read_feed(&feed, cursor, 100).unwrap().is_empty(),
        "a row was seen twice"
    );
}

#[test]
fn sqlite_a_second_writer_cannot_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let mut a = store::SqliteStore::open(&path, Rules::default()).unwrap();
    let b = store::SqliteStore::open(&path, Rules::default()).unwrap();
    b.set_busy_timeout(std::time::Duration::ZERO).unwrap();
    let mut b: Box<dyn Store> = Box::new(b);
    let mut tx_a = a.begin_write().unwrap();
    tx_a.ingest(vec![page("a-1", "x1")]).unwrap();
    let err = b.ingest(vec![page("b-1", "y1")]).unwrap_err();
    assert!(
        err.to_string().contains("locked") || err.to_string().contains("busy"),
        "{err}"
    );
    let mut reader =
        store::open(&format!("sqlite://{}", path.display()), Rules::default()).unwrap();
    assert!(
        reader
            .read_feed(&Feed::Events(EventFilter::All), 0, 10)
            .unwrap()
            .is_empty()
    );
    tx_a.commit().unwrap();
    b.ingest(vec![page("b-1", "y1")]).unwrap();
    let rows = reader
        .read_feed(&Feed::Events(EventFilter::All), 0, 10)
        .unwrap();
    assert_eq!(seqs(&rows).len(), 2);
    assert!(rows[0].seq() < rows[1].seq());
}

/// Every column of every change-log and event row, in `seq` order, with generated ids (profiles,
/// mapping rows) rewritten to their order of first appearance.
fn canonical_logs(store: &mut dyn Store) -> Vec<String> {
    let mut ids: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut rename = |id: &str| -> String {
        let n = ids.len();
        ids.entry(id.to_string())
            .or_insert_with(|| format!("p{n}"))
            .clone()
    };
    let mut out = vec![];
    let mut rows: Vec<FeedRow> = vec![];
    for feed in [
        Feed::IdGraphUpdates,
        Feed::ExternalIdMappingUpdates,
        Feed::ProfileTraitsUpdates,
        Feed::Events(EventFilter::All),
    ] {
        rows.extend(all(store, &feed));
    }
    rows.sort_by_key(FeedRow::seq);
    for row in rows {
        out.push(match row {
            FeedRow::IdGraph(r) => format!(
                "{} graph {} -> {} {:?}",
                r.seq,
                rename(&r.segment_id),
                rename(&r.canonical_segment_id),
                r.trigger
            ),
            FeedRow::Mapping(r) => format!(
                "{} map {}={} {} {} {:?}",
                r.seq,
                r.external_id_type,
                r.external_id_value,
                r.external_id_hash,
                rename(&r.segment_id),
                r.trigger
            ),
            FeedRow::Traits(r) => format!(
                "{} traits {} {} {:?}",
                r.seq,
                rename(&r.segment_id),
                serde_json::Value::Object(r.traits),
                r.trigger
            ),
            FeedRow::Event(r) => format!("{} event {} {:?}", r.seq, rename(&r.segment_id), r.event),
        });
    }
    out
}

/// The two stores write their rows differently (PostgreSQL's append-only rows by binary
/// `COPY`, SQLite's by statements): the same stream gives the same rows in both, every column
/// of every row (generated ids matched by order of appearance), through texts the encoding could get wrong (non-ASCII, empty, quotes and
/// backslashes, absent names, a timestamp apart from receivedAt) and batches whose COPY is
/// sent in several messages: the feeds' rows, and the event columns only the database holds.
#[test]
fn both_stores_write_the_same_rows() {
    let mut messages: Vec<Value> =
        profiles_sync::sample::SampleGenerator::new(5, 80, 1_767_225_600)
            .flatten()
            .collect();
    let long = "ü\\\"'\n".repeat(2_000);
    messages.extend([
        json!({"type": "track", "messageId": "e1", "userId": "Zoë ✓", "event": "Заказ 🎉 \"done\"",
               "properties": {"note": long, "empty": ""}, "timestamp": "2025-06-01T00:00:00Z",
               "sentAt": "2025-06-01T00:00:05Z"}),
        json!({"type": "page", "messageId": "e2", "anonymousId": "a-ß",
               "timestamp": "2025-12-31T10:00:00.123456Z"}),
        json!({"type": "screen", "messageId": "e3", "anonymousId": "a-ß", "name": ""}),
        json!({"type": "identify", "messageId": "e4", "anonymousId": "a-ß",
               "traits": {"email": "zoë@exämple.com", "名前": "ゾーイ", "blank": ""}}),
        json!({"type": "alias", "messageId": "e5", "userId": "Zoë ✓", "previousId": "a-ß"}),
        json!({"type": "group", "messageId": "e6", "userId": "Zoë ✓", "groupId": "g-1",
               "traits": {"name": "Ünïcørn Inc."}}),
    ]);
    for i in 0..40 {
        messages.push(
            json!({"type": "track", "messageId": format!("big-{i}"), "userId": format!("u-{i}"),
            "event": "Big", "properties": {"blob": "x".repeat(20_000)}}),
        );
    }
    let (mut lite, lite_url, _keep) = fresh("sqlite");
    let (mut pg, pg_url, _) = fresh("postgres");
    for chunk in messages.chunks(300) {
        let events: Vec<Event> = chunk.iter().map(|m| event(m.clone())).collect();
        lite.ingest(events.clone()).unwrap();
        pg.ingest(events).unwrap();
    }
    let (rows_lite, rows_pg) = (canonical_logs(&mut *lite), canonical_logs(&mut *pg));
    assert!(rows_lite.len() > messages.len(), "{}", rows_lite.len());
    assert!(rows_lite.iter().any(|r| r.contains("Заказ 🎉")));
    for (l, p) in rows_lite.iter().zip(&rows_pg) {
        assert_eq!(l, p);
    }
    assert_eq!(rows_lite.len(), rows_pg.len());
    // The event columns no feed reads back (the feeds read the payload).
    let (events_lite, events_pg) = (event_columns(&lite_url), event_columns(&pg_url));
    assert_eq!(events_lite.len(), messages.len());
    assert_eq!(events_lite, events_pg);
}

/// Every column of `events` but the generated `segment_id`, by `seq`, read straight from the
/// store's database.
fn event_columns(url: &str) -> Vec<String> {
    const SQL: &str = "SELECT seq, message_id, type, event, source_id, timestamp_us, received_at_us, payload FROM events ORDER BY seq";
    type Row = (
        i64,
        String,
        String,
        Option<String>,
        String,
        i64,
        i64,
        String,
    );
    let rows: Vec<Row> = match url.strip_prefix("sqlite://") {
        Some(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut stmt = conn.prepare(SQL).unwrap();
            stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        }
        None => ::postgres::Client::connect(url, ::postgres::NoTls)
            .unwrap()
            .query(SQL, &[])
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                    r.get(7),
                )
            })
            .collect(),
    };
    rows.iter().map(|r| format!("{r:?}")).collect()
}

fn replaying_a_stream_into_a_fresh_store_gives_the_same_logs(kind: &str) {
    let messages: Vec<Value> = profiles_sync::sample::SampleGenerator::new(11, 120, 1_767_225_600)
        .flatten()
        .collect();
    let (mut a, _, _ka) = fresh(kind);
    let (mut b, _, _kb) = fresh(kind);
    // The same stream, in different batch sizes: the logs may differ only in generated ids.
    for chunk in messages.chunks(7) {
        a.ingest(chunk.iter().map(|m| event(m.clone())).collect())
            .unwrap();
    }
    for chunk in messages.chunks(100) {
        b.ingest(chunk.iter().map(|m| event(m.clone())).collect())
            .unwrap();
    }
    let (la, lb) = (canonical_logs(&mut *a), canonical_logs(&mut *b));
    assert!(
        la.len() > messages.len(),
        "the stream produced change-log rows"
    );
    assert_eq!(la, lb);
}

#[test]
fn postgres_store_urls_with_sslmode_use_tls() {
    let tls = support::pg::PgServer::start_tls();
    let url = format!("{}?sslmode=require", tls.url(&tls.create_database("tls")));
    let mut s = store::open(&url, Rules::default()).expect("a TLS store URL connects");
    s.ingest(vec![page("t1", "a1")]).unwrap();
    assert_eq!(s.event_count().unwrap(), 1);
    let mut check = ::postgres::Client::connect(
        &url.replace("sslmode=require", "sslmode=disable"),
        ::postgres::NoTls,
    )
    .unwrap();
    let encrypted: i64 = check
        .query_one("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.datname = current_database()", &[])
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the store's connection is encrypted");
    // A server without TLS refuses sslmode=require instead of falling back to clear text.
    let plain = support::pg::shared();
    let url = format!(
        "{}?sslmode=require",
        plain.url(&plain.create_database("notls"))
    );
    assert!(store::open(&url, Rules::default()).is_err());
}

/// A store URL may ask to verify the server (`sslmode=verify-full` or `verify-ca`, which the
/// driver alone refused as unknown values), trusting the CAs of the file `sslrootcert` names:
/// verify-full checks the host name too. The settings mean what they mean to libpq (`require`
/// with a CA file verifies the chain; `verify-ca` needs a CA file). An unreadable CA file, or
/// one with no certificate, is an error naming it.
#[test]
fn postgres_store_urls_verify_the_server_certificate() {
    let tls = support::pg::PgServer::start_tls();
    let db = tls.create_database("verify");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, tls.ca_cert()).unwrap();
    let url = |host: &str, query: &str| {
        format!("{}?{query}", tls.url(&db)).replacen("127.0.0.1", host, 1)
    };
    let with_ca = |mode: &str| format!("sslmode={mode}&sslrootcert={}", ca.display());
    let open = |url: String| store::open(&url, Rules::default());
    // Trusted through the file, the name matching: stored, over TLS.
    let mut s = open(url("localhost", &with_ca("verify-full"))).expect("verify-full connects");
    s.ingest(vec![page("v1", "a1")]).unwrap();
    assert_eq!(s.event_count().unwrap(), 1);
    // The store's connection is the encrypted one (this check connects in clear).
    let encrypted: i64 = tls
        .connect(&db)
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.datname = current_database()",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap();
    assert!(encrypted >= 1, "the store's connection is encrypted");
    drop(s);
    // verify-ca checks the chain only: 127.0.0.1, which the certificate does not name, passes.
    open(url("127.0.0.1", &with_ca("verify-ca"))).expect("verify-ca to the address");
    let error = |url: String| match open(url) {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    // verify-full refuses the address the certificate does not name.
    let e = error(url("127.0.0.1", &with_ca("verify-full")));
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // Without the file, verify-full trusts the system's CAs, which do not know the test CA;
    // verify-ca is refused (against the system's CAs it would take any public certificate).
    let e = error(url("localhost", "sslmode=verify-full"));
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let e = error(url("localhost", "sslmode=verify-ca"));
    assert!(e.contains("verify-ca") && e.contains("sslrootcert"), "{e}");
    // As in libpq, `require` with a CA file verifies the chain: the test CA's passes, another
    // CA's fails.
    open(url("127.0.0.1", &with_ca("require"))).expect("require with the server's CA");
    let other = support::pg::make_ca(dir.path(), "other-ca");
    let e = error(url(
        "127.0.0.1",
        &format!("sslmode=require&sslrootcert={}", other.display()),
    ));
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // A CA file that is missing, or holds no certificate, is named, with what named it.
    let missing = dir.path().join("missing.crt");
    let e = error(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", missing.display()),
    ));
    assert!(e.contains("missing.crt (named by sslrootcert)"), "{e}");
    let junk = dir.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = error(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", junk.display()),
    ));
    assert!(e.contains("junk.crt (named by sslrootcert)"), "{e}");
    // sslrootcert=system takes verify-full only (libpq's rule).
    let e = error(url("localhost", "sslmode=require&sslrootcert=system"));
    assert!(
        e.contains("sslrootcert=system needs sslmode=verify-full"),
        "{e}"
    );
}

/// A new SQLite store uses 16 KiB pages; a file made with SQLite's default 4 KiB pages (an
/// older store) keeps them and stays fully usable.
#[test]
fn sqlite_new_stores_use_16k_pages_and_older_files_keep_theirs() {
    let page_size = |path: &std::path::Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("new.db");
    let mut s = store::open(&format!("sqlite://{}", new.display()), Rules::default()).unwrap();
    s.ingest(vec![page("m1", "a1")]).unwrap();
    drop(s);
    assert_eq!(page_size(&new), 16_384);

    let old = dir.path().join("old.db");
    rusqlite::Connection::open(&old)
        .unwrap()
        .execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE t (x);")
        .unwrap();
    let url = format!("sqlite://{}", old.display());
    let mut s = store::open(&url, Rules::default()).unwrap();
    s.ingest(vec![
        page("m1", "a1"),
        identify("m2", "a1", "jane@example.com"),
    ])
    .unwrap();
    drop(s);
    assert_eq!(page_size(&old), 4096);
    let mut s = store::open(&url, Rules::default()).unwrap();
    assert_eq!(
        seqs(&all(&mut *s, &Feed::Events(EventFilter::All))).len(),
        2
    );
}

/// Turns a store's tables into those of version 2: the messageId index in one table keyed by
/// hash (as in version 3), no `updated_seq` on the state tables.
const SQLITE_TO_VERSION_2: &str = "BEGIN;
    CREATE TABLE message_ids (hash BIGINT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (hash, seq)) WITHOUT ROWID;
    INSERT INTO message_ids SELECT hash, seq FROM message_id_entries;
    DROP TABLE message_id_entries; DROP TABLE message_id_runs;
    DROP INDEX profiles_updated_seq; ALTER TABLE profiles DROP COLUMN updated_seq;
    DROP INDEX identifiers_updated_seq; ALTER TABLE identifiers DROP COLUMN updated_seq;
    PRAGMA user_version = 2;
    COMMIT;";
const POSTGRES_TO_VERSION_2: &str = "
    CREATE TABLE message_ids (hash BIGINT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (hash, seq));
    INSERT INTO message_ids SELECT hash, seq FROM message_id_entries;
    DROP TABLE message_id_entries; DROP TABLE message_id_runs;
    ALTER TABLE profiles DROP COLUMN updated_seq CASCADE;
    ALTER TABLE identifiers DROP COLUMN updated_seq CASCADE;
    DROP FUNCTION profiles_sync_stamp();
    DELETE FROM store_schema; INSERT INTO store_schema VALUES (2);";

/// A version-2 store gains `updated_seq` in place: its rows at 0, its messageId index kept as
/// it was (not built again), and writers after it catch up with each other from there.
fn a_version_2_store_is_migrated_in_place(kind: &str) {
    let (mut s, url, _keep) = fresh(kind);
    let (before, head) = before_migration(&mut *s);
    drop(s);
    let count = |sql: &str| -> i64 {
        match kind {
            "sqlite" => {
                let path = url.trim_start_matches("sqlite://");
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.query_row(sql, [], |r| r.get(0)).unwrap()
            }
            _ => ::postgres::Client::connect(&url, ::postgres::NoTls)
                .unwrap()
                .query_one(sql, &[])
                .unwrap()
                .get(0),
        }
    };
    let index = |count: &dyn Fn(&str) -> i64| {
        (
            count("SELECT count(*) FROM message_id_entries"),
            count("SELECT indexed_through FROM message_id_index"),
        )
    };
    let indexed = index(&count);
    match kind {
        "sqlite" => rusqlite::Connection::open(url.trim_start_matches("sqlite://"))
            .unwrap()
            .execute_batch(SQLITE_TO_VERSION_2)
            .unwrap(),
        _ => ::postgres::Client::connect(&url, ::postgres::NoTls)
            .unwrap()
            .batch_execute(POSTGRES_TO_VERSION_2)
            .unwrap(),
    }
    let mut a = store::open(&url, Rules::default()).unwrap();
    let mut b = store::open(&url, Rules::default()).unwrap();
    assert_eq!(all(&mut *a, &Feed::Events(EventFilter::All)), before);
    assert_eq!(index(&count), indexed, "the messageId index is as it was");
    // Recorded runs for exactly the runs there are (none when the index was empty).
    assert_eq!(
        count("SELECT count(*) FROM message_id_runs"),
        count("SELECT count(DISTINCT run) FROM message_id_entries")
    );
    assert_eq!(a.head_seq().unwrap(), head);
    assert_eq!(
        count("SELECT count(*) FROM identifiers WHERE updated_seq = 0"),
        count("SELECT count(*) FROM identifiers")
    );
    migrated_ids_are_still_duplicates(&mut *a);
    // Two writers after the migration: b sees what a changed since its own write.
    b.ingest(vec![page("b-0", "a1")]).unwrap();
    a.ingest(vec![identify("a-0", "a1", "new@example.com")])
        .unwrap();
    b.ingest(vec![page("b-1", "a1")]).unwrap();
    let rows = all(&mut *b, &Feed::Events(EventFilter::All));
    let segment = |id: &str| {
        rows.iter()
            .find_map(|r| match r {
                FeedRow::Event(e) if e.event.message_id == id => Some(e.segment_id.clone()),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(segment("b-1"), segment("a-0"));
}

/// A PostgreSQL store migrated while an older engine is in the middle of a write (a rolling
/// upgrade): the migration waits for that write and both succeed. It used to alter the state
/// tables one by one, taking `profiles` while waiting for `identifiers`, which the writer had
/// read and the writer's next upsert of `profiles` then waited for: a deadlock, which
/// PostgreSQL broke by failing one side.
#[test]
fn postgres_a_migration_waits_for_an_older_writer_in_flight() {
    let (mut s, url, _keep) = fresh("postgres");
    s.ingest(vec![page("p-0", "a1")]).unwrap();
    drop(s);
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    c.batch_execute(POSTGRES_TO_VERSION_2).unwrap();
    // A version-2 writer: the head locked, the identifiers read (as its graph load does).
    let mut writer = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let mut w = writer.transaction().unwrap();
    w.query_one("SELECT head FROM seq_counter WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    w.query_one("SELECT count(*) FROM identifiers", &[])
        .unwrap();
    let opening = std::thread::spawn({
        let url = url.clone();
        move || store::open(&url, Rules::default()).map(|_| ())
    });
    // Until the migration waits on a lock (or has finished: then the assertions below fail).
    let mut tries = 0;
    while c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
        == 0
        && !opening.is_finished()
    {
        tries += 1;
        assert!(tries < 1_000_000, "the migration never waited");
        std::thread::yield_now();
    }
    // The writer goes on to the state tables and commits.
    w.batch_execute(
        "INSERT INTO profiles (segment_id, canonical_segment_id, created_rank, merges, traits, trait_times)
           VALUES ('use_w', 'use_w', 99, 0, '{}', '{}');
         UPDATE seq_counter SET head = head + 1 WHERE id = 1;",
    )
    .unwrap();
    w.commit().unwrap();
    opening.join().unwrap().unwrap();
    let version: i64 = c
        .query_one("SELECT max(version) FROM store_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 5);
}

/// How many of the PostgreSQL store's text keys (`profiles.segment_id`, `identifiers.id_type`
/// and `.value`, `track_events.name`) have the "C" collation.
const BYTEWISE_KEY_COLUMNS: &str = "SELECT count(*) FROM pg_attribute a
    JOIN pg_collation k ON k.oid = a.attcollation
   WHERE k.collname = 'C'
     AND (a.attrelid::regclass::text, a.attname::text) IN
         (('profiles', 'segment_id'), ('identifiers', 'id_type'), ('identifiers', 'value'),
          ('track_events', 'name'))";

/// A PostgreSQL store's text keys compare byte by byte, as SQLite's do, whatever the database's
/// collation: a new store's are created so, and a version-4 store's, in a linguistic collation
/// (ICU's here, as `en_US.UTF-8` would be), are given the "C" collation when it is opened. Its
/// rows, history and messageIds are as they were, its keys then ordered by bytes.
#[test]
fn postgres_text_keys_compare_bytewise_and_a_version_4_store_is_migrated() {
    let (mut s, url, _keep) = fresh("postgres");
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let one =
        |c: &mut ::postgres::Client, sql: &str| -> i64 { c.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(one(&mut c, BYTEWISE_KEY_COLUMNS), 4, "a new store's keys");
    let (before, head) = before_migration(&mut *s);
    // Identifiers whose linguistic and byte orders differ.
    s.ingest(vec![
        identify("case-0", "Zed", "b@example.com"),
        identify("case-1", "alpha", "B@example.com"),
    ])
    .unwrap();
    s.ingest(vec![
        track("case-2", "u-case", "Zoo"),
        track("case-3", "u-case", "apple"),
    ])
    .unwrap();
    let before_all = all(&mut *s, &Feed::Events(EventFilter::All));
    let (profiles, identifiers) = (
        one(&mut c, "SELECT count(*) FROM profiles"),
        one(&mut c, "SELECT count(*) FROM identifiers"),
    );
    drop(s);
    c.batch_execute(
        r#"ALTER TABLE profiles ALTER COLUMN segment_id TYPE text COLLATE "und-x-icu";
           ALTER TABLE identifiers ALTER COLUMN id_type TYPE text COLLATE "und-x-icu",
                                   ALTER COLUMN value TYPE text COLLATE "und-x-icu";
           ALTER TABLE track_events ALTER COLUMN name TYPE text COLLATE "und-x-icu";
           DELETE FROM store_schema; INSERT INTO store_schema VALUES (4);"#,
    )
    .unwrap();
    assert_eq!(one(&mut c, BYTEWISE_KEY_COLUMNS), 0);

    let mut s = store::open(&url, Rules::default()).unwrap();
    assert_eq!(
        one(&mut c, BYTEWISE_KEY_COLUMNS),
        4,
        "the migrated store's keys"
    );
    assert_eq!(one(&mut c, "SELECT max(version) FROM store_schema"), 5);
    assert_eq!(all(&mut *s, &Feed::Events(EventFilter::All)), before_all);
    assert_eq!(before_all[..before.len()], before[..]);
    assert!(s.head_seq().unwrap() > head);
    assert_eq!(
        (
            one(&mut c, "SELECT count(*) FROM profiles"),
            one(&mut c, "SELECT count(*) FROM identifiers")
        ),
        (profiles, identifiers)
    );
    let ordered = |c: &mut ::postgres::Client, sql: &str| -> Vec<String> {
        c.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    for sql in [
        "SELECT value FROM identifiers WHERE id_type = 'anonymous_id' ORDER BY value",
        "SELECT value FROM identifiers WHERE id_type = 'email' ORDER BY value",
        "SELECT name FROM track_events ORDER BY name",
        "SELECT segment_id FROM profiles ORDER BY segment_id",
    ] {
        let got = ordered(&mut c, sql);
        let mut bytewise = got.clone();
        bytewise.sort();
        assert_eq!(got, bytewise, "{sql}");
    }
    // The graph resolves against the migrated rows: an old identifier finds its profile.
    let r = s
        .ingest(vec![page("after-0", "Zed"), page("after-1", "a1")])
        .unwrap();
    assert_eq!((r.accepted, r.profiles_created), (2, 0));
    let again: Vec<Event> = (0..150)
        .map(|i| page(&format!("old-{i}"), "a1"))
        .chain((0..2).map(|i| page(&format!("case-{i}"), "a1")))
        .collect();
    let r = s.ingest(again).unwrap();
    assert_eq!((r.accepted, r.duplicates), (0, 152));
}

/// In a database whose collation is `C` (the tests' cluster), a version-4 store's keys in the
/// default collation compare byte by byte already: opening it moves it to version 5 without
/// rebuilding their indexes.
#[test]
fn postgres_a_version_4_store_in_a_c_database_keeps_its_key_indexes() {
    let (mut s, url, _keep) = fresh("postgres");
    s.ingest(vec![identify("c-0", "a1", "jane@example.com")])
        .unwrap();
    drop(s);
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    c.batch_execute(
        r#"ALTER TABLE profiles ALTER COLUMN segment_id TYPE text COLLATE "default";
           ALTER TABLE identifiers ALTER COLUMN id_type TYPE text COLLATE "default",
                                   ALTER COLUMN value TYPE text COLLATE "default";
           ALTER TABLE track_events ALTER COLUMN name TYPE text COLLATE "default";
           DELETE FROM store_schema; INSERT INTO store_schema VALUES (4);"#,
    )
    .unwrap();
    let files = |c: &mut ::postgres::Client| -> Vec<i64> {
        c.query(
            "SELECT pg_relation_filenode(i.indexrelid)::bigint FROM pg_index i
              WHERE i.indisprimary
                AND i.indrelid IN ('profiles'::regclass, 'identifiers'::regclass,
                                   'track_events'::regclass)
              ORDER BY i.indrelid",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let before = files(&mut c);
    assert_eq!(before.len(), 3);
    let mut s = store::open(&url, Rules::default()).unwrap();
    let version: i64 = c
        .query_one("SELECT max(version) FROM store_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 5);
    assert_eq!(files(&mut c), before, "a key index was rebuilt");
    let r = s.ingest(vec![page("c-1", "a1")]).unwrap();
    assert_eq!((r.accepted, r.profiles_created), (1, 0));
}

/// 150 events for a store about to be turned into a version-1 one: its events and head.
fn before_migration(s: &mut dyn Store) -> (Vec<FeedRow>, i64) {
    let first: Vec<Event> = (0..150)
        .map(|i| {
            identify(
                &format!("old-{i}"),
                &format!("a{}", i % 9),
                "jane@example.com",
            )
        })
        .collect();
    s.ingest(first).unwrap();
    let before = all(s, &Feed::Events(EventFilter::All));
    (before, s.head_seq().unwrap())
}

/// After a migration, the stored ids are still duplicates; new ones are not.
fn migrated_ids_are_still_duplicates(s: &mut dyn Store) {
    let again: Vec<Event> = (0..150)
        .map(|i| page(&format!("old-{i}"), "a1"))
        .chain((0..5).map(|i| page(&format!("new-{i}"), "a1")))
        .collect();
    let r = s.ingest(again).unwrap();
    assert_eq!((r.accepted, r.duplicates), (5, 150));
    assert_eq!(s.event_count().unwrap(), 155);
}

#[test]
fn sqlite_a_version_1_store_is_migrated_to_the_hash_index_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let url = format!("sqlite://{}", path.display());
    let mut s = store::open(&url, Rules::default()).unwrap();
    let (before, head) = before_migration(&mut *s);
    drop(s);
    // The layout version 1 wrote: a unique index on events.message_id, no hash index.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(SQLITE_TO_VERSION_2).unwrap();
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE events_v1 (seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
           event TEXT, segment_id TEXT NOT NULL, source_id TEXT NOT NULL, timestamp_us BIGINT NOT NULL,
           received_at_us BIGINT NOT NULL, payload TEXT NOT NULL);
         INSERT INTO events_v1 SELECT * FROM events;
         DROP TABLE events; ALTER TABLE events_v1 RENAME TO events;
         DROP TABLE message_ids; DROP TABLE message_id_index;
         PRAGMA user_version = 1;
         COMMIT;",
    )
    .unwrap();
    drop(conn);

    let mut s = store::open(&url, Rules::default()).unwrap();
    assert_eq!(all(&mut *s, &Feed::Events(EventFilter::All)), before);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let one = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(one("PRAGMA user_version"), 5);
    assert_eq!(
        one("SELECT count(*) FROM pragma_table_info('profiles') WHERE name = 'updated_seq'"),
        1
    );
    assert_eq!(
        one("SELECT count(*) FROM pragma_index_list('events') WHERE \"unique\" = 1"),
        0,
        "the unique messageId index is gone"
    );
    assert_eq!(one("SELECT count(*) FROM message_id_entries"), 150);
    assert_eq!(
        one("SELECT CAST(sum(entries) AS BIGINT) FROM message_id_runs"),
        150,
        "the runs record every entry"
    );
    assert_eq!(one("SELECT indexed_through FROM message_id_index"), head);
    migrated_ids_are_still_duplicates(&mut *s);
}

#[test]
fn postgres_a_version_1_store_is_migrated_to_the_hash_index_in_place() {
    let (mut s, url, _keep) = fresh("postgres");
    let (before, head) = before_migration(&mut *s);
    drop(s);
    // The layout version 1 wrote: a unique constraint on events.message_id, no hash index.
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    c.batch_execute(POSTGRES_TO_VERSION_2).unwrap();
    c.batch_execute(
        "ALTER TABLE events ADD CONSTRAINT events_message_id_key UNIQUE (message_id);
         DROP TABLE message_ids; DROP TABLE message_id_index;
         DELETE FROM store_schema; INSERT INTO store_schema VALUES (1);",
    )
    .unwrap();

    let mut s = store::open(&url, Rules::default()).unwrap();
    assert_eq!(all(&mut *s, &Feed::Events(EventFilter::All)), before);
    let mut one = |sql: &str| -> i64 { c.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(one("SELECT max(version) FROM store_schema"), 5);
    assert_eq!(
        one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'identifiers' AND column_name = 'updated_seq'"
        ),
        1
    );
    assert_eq!(
        one(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'events'::regclass AND contype = 'u'"
        ),
        0,
        "the unique messageId constraint is gone"
    );
    assert_eq!(one("SELECT count(*) FROM message_id_entries"), 150);
    assert_eq!(
        one("SELECT CAST(sum(entries) AS BIGINT) FROM message_id_runs"),
        150,
        "the runs record every entry"
    );
    assert_eq!(one("SELECT indexed_through FROM message_id_index"), head);
    migrated_ids_are_still_duplicates(&mut *s);
}

/// A TCP proxy to a PostgreSQL server that, once armed, cuts its client off at the client's
/// next `COMMIT` — after passing it on to the server (`forward`) or before. Armed to hold, it
/// then keeps the connections opened after the cut waiting until [`CommitCutter::release`]:
/// the test decides what another replica does before the cut-off store looks at the server.
struct CommitCutter {
    port: u16,
    state: std::sync::Arc<(std::sync::Mutex<CutState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct CutState {
    /// The next cut: whether to forward the COMMIT, whether to hold new connections after it.
    armed: Option<(bool, bool)>,
    /// New connections wait while set.
    holding: bool,
    /// Cut silently: the server's side of the connection is kept open (a network that drops
    /// packets), so that the server keeps the session, not knowing its client is gone.
    silent: bool,
    /// The server sides kept open by silent cuts.
    kept: Vec<std::net::TcpStream>,
}

impl CommitCutter {
    fn start(server_port: u16) -> CommitCutter {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new((
            std::sync::Mutex::new(CutState::default()),
            std::sync::Condvar::new(),
        ));
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                {
                    let (lock, changed) = &*shared;
                    let mut st = lock.lock().unwrap();
                    while st.holding {
                        st = changed.wait(st).unwrap();
                    }
                }
                let server = std::net::TcpStream::connect(("127.0.0.1", server_port)).unwrap();
                let (mut from_server, mut to_client) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let cut_seen = cut.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = from_server.read(&mut buf) {
                        if cut_seen.load(std::sync::atomic::Ordering::SeqCst)
                            || to_client.write_all(&buf[..n]).is_err()
                        {
                            return;
                        }
                    }
                    // The server went away (a crash): so does the client's connection, rather
                    // than the client waiting for an answer that cannot come.
                    let _ = to_client.shutdown(std::net::Shutdown::Both);
                });
                let (mut from_client, mut to_server) = (client, server);
                let state = shared.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = from_client.read(&mut buf) {
                        let chunk = &buf[..n];
                        // The statement `COMMIT` itself (a simple query ends with NUL), not a
                        // `BEGIN ISOLATION LEVEL READ COMMITTED`.
                        let is_commit = chunk.windows(7).any(|w| w == b"COMMIT\0");
                        let (lock, changed) = &*state;
                        let plan = if is_commit {
                            lock.lock().unwrap().armed
                        } else {
                            None
                        };
                        if let Some((forward, hold)) = plan {
                            // New connections are held before the client can see the cut and
                            // reconnect: its next connection waits for the test, not the cut.
                            lock.lock().unwrap().holding = hold;
                            // The client never hears back: cut it off before the server answers,
                            // then the server's side too, as a broken network would.
                            cut.store(true, std::sync::atomic::Ordering::SeqCst);
                            let _ = from_client.shutdown(std::net::Shutdown::Both);
                            if forward {
                                let _ = to_server.write_all(chunk);
                            }
                            let mut st = lock.lock().unwrap();
                            if st.silent {
                                st.kept.push(to_server);
                            } else {
                                let _ = to_server.shutdown(std::net::Shutdown::Write);
                            }
                            st.armed = None;
                            changed.notify_all();
                            return;
                        }
                        if to_server.write_all(chunk).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        CommitCutter { port, state }
    }

    /// Cuts the next COMMIT, passing it on to the server first when `forward`.
    fn arm(&self, forward: bool) {
        self.state.0.lock().unwrap().armed = Some((forward, false));
    }

    /// Cuts the next COMMIT without passing it on, and keeps the server's side open: the server
    /// keeps the session, idle in its transaction.
    fn arm_silent(&self) {
        let mut st = self.state.0.lock().unwrap();
        st.armed = Some((false, false));
        st.silent = true;
    }

    /// Cuts the next COMMIT without passing it on, then holds new connections until
    /// [`CommitCutter::release`].
    fn arm_and_hold(&self) {
        self.state.0.lock().unwrap().armed = Some((false, true));
    }

    /// [`CommitCutter::arm_silent`], then holds new connections until
    /// [`CommitCutter::release`].
    fn arm_silent_and_hold(&self) {
        let mut st = self.state.0.lock().unwrap();
        st.armed = Some((false, true));
        st.silent = true;
    }

    /// Waits until the armed cut happened.
    fn wait_for_cut(&self) {
        let (lock, changed) = &*self.state;
        let mut st = lock.lock().unwrap();
        while st.armed.is_some() {
            st = changed.wait(st).unwrap();
        }
    }

    /// Lets the held connections through.
    fn release(&self) {
        let (lock, changed) = &*self.state;
        lock.lock().unwrap().holding = false;
        changed.notify_all();
    }

    /// A URL of `db` on `pg` through the cutter.
    fn url(&self, pg: &support::pg::PgServer, db: &str) -> String {
        pg.url(db)
            .replace(&format!(":{}/", pg.port()), &format!(":{}/", self.port))
    }
}

fn without_message_id(user: &str) -> Event {
    event(json!({"type": "track", "userId": user, "event": "Order Completed"}))
}

/// (seq, messageId, segment_id) of every stored event, in `seq` order.
fn stored_events(client: &mut ::postgres::Client) -> Vec<(i64, String, String)> {
    client
        .query(
            "SELECT seq, message_id, segment_id FROM events ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Two replicas of database `db` (one event stored first): A ingests `a_events`, whose COMMIT
/// is cut before it reaches the server; B, which waits for the head until the server has rolled
/// A back, then ingests `b_events`; only then can A look at the server. A and its answer.
fn cut_while_another_replica_writes(
    db: &str,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
) -> (Box<dyn Store>, Result<IngestSummary, StoreError>) {
    let pg = support::pg::shared();
    let cutter = CommitCutter::start(pg.port());
    let mut a = store::open(&cutter.url(pg, db), Rules::default()).unwrap();
    let mut b = store::open(&pg.url(db), Rules::default()).unwrap();
    a.ingest(vec![page("init", "a0")]).unwrap();
    b.warm_up().unwrap();
    cutter.arm_and_hold();
    let replica_a = std::thread::spawn(move || {
        let r = a.ingest(a_events);
        (a, r)
    });
    cutter.wait_for_cut();
    b.ingest(b_events).unwrap();
    cutter.release();
    replica_a.join().unwrap()
}

/// Replica A's COMMIT never reaches the server, which rolls A back and frees the head lock.
/// Replica B, waiting on that lock, commits a group of its own — another client's page and the
/// retry of A's second request (balanced to B) — which puts that messageId at the very `seq` A
/// had given it. A must not take that for its own commit: it used to (it looked for its last
/// event's messageId at its `seq`), and answered 200 for its whole group, r1 included, which
/// nobody stored (review). It asks the server about its transaction instead.
#[test]
fn postgres_an_unknown_commit_is_not_taken_for_another_replica_s_at_the_same_seqs() {
    let pg = support::pg::shared();
    let db = pg.create_database("cut_reused_seq");
    let (mut a, result) = cut_while_another_replica_writes(
        &db,
        vec![page("r1", "a1"), page("m", "a2")],
        vec![page("x", "b1"), page("m", "a2")],
    );
    let ids = |client: &mut ::postgres::Client| -> Vec<String> {
        stored_events(client)
            .into_iter()
            .map(|(_, m, _)| m)
            .collect()
    };
    let mut direct = pg.connect(&db);
    assert_eq!(ids(&mut direct), ["init", "x", "m"]);
    assert!(
        result.is_err(),
        "A's group was not stored, yet answered as committed: {result:?}"
    );
    // A goes on, its graph in step with the store: r1's retry is stored, a2's next event
    // lands on the profile B stored a2 under.
    a.ingest(vec![page("r1", "a1"), page("m2", "a2")]).unwrap();
    let events = stored_events(&mut direct);
    assert_eq!(ids(&mut direct), ["init", "x", "m", "r1", "m2"]);
    let segment = |id: &str| events.iter().find(|e| e.1 == id).unwrap().2.clone();
    assert_eq!(segment("m"), segment("m2"), "{events:?}");
}

/// The server crashes while A's COMMIT, cut on the way, never reached it. A's transaction id
/// was only in the WAL buffers the crash lost, so the restarted server gives the same id to
/// the next transaction, which commits. A asks the server whether "its" transaction committed:
/// it used to be told yes and answer 200 for events nobody stored (review). The server's start
/// time, read with the id, tells A the server is not the one that ran its transaction.
#[test]
fn postgres_a_commit_cut_by_a_server_crash_is_not_taken_for_the_next_transaction_with_its_id() {
    let pg = support::pg::PgServer::start();
    let db = pg.create_database("cut_crash");
    // The WAL reaches the OS at each commit (what committed survives the crash) and otherwise
    // every 10 s: A's uncommitted records stay in the server's buffers until the crash.
    let mut admin = pg.connect("postgres");
    admin
        .batch_execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET synchronous_commit = on"
        ))
        .unwrap();
    let cutter = CommitCutter::start(pg.port());
    let mut a = store::open(&cutter.url(&pg, &db), Rules::default()).unwrap();
    a.ingest(vec![page("init", "a0")]).unwrap();
    cutter.arm_silent_and_hold();
    let replica_a = std::thread::spawn(move || {
        let r = a.ingest(vec![page("lost", "a1")]);
        (a, r)
    });
    cutter.wait_for_cut();
    // A's session waits, idle in its transaction, for a COMMIT that never comes.
    let xid: i64 = pg
        .connect(&db)
        .query_one(
            "SELECT backend_xid::text::bigint FROM pg_stat_activity \
             WHERE datname = $1 AND state = 'idle in transaction'",
            &[&db],
        )
        .unwrap()
        .get(0);
    pg.crash_and_restart();
    let mut other = pg.connect(&db);
    let first: i64 = other
        .query_one("SELECT txid_current()", &[])
        .unwrap()
        .get(0);
    assert!(
        first <= xid,
        "the test's premise: the crash lost A's transaction id ({xid}), the server gave {first}"
    );
    let mut given = first;
    while given < xid {
        given = other
            .query_one("SELECT txid_current()", &[])
            .unwrap()
            .get(0);
    }
    let status: String = other
        .query_one("SELECT txid_status($1)", &[&xid])
        .unwrap()
        .get(0);
    assert_eq!(
        status, "committed",
        "another transaction committed under A's id"
    );
    cutter.release();
    let (mut a, result) = replica_a.join().unwrap();
    let ids = |client: &mut ::postgres::Client| -> Vec<String> {
        stored_events(client)
            .into_iter()
            .map(|(_, m, _)| m)
            .collect()
    };
    assert_eq!(ids(&mut other), ["init"]);
    assert!(
        result.is_err(),
        "A's event was not stored, yet answered as committed: {result:?}"
    );
    // The client's retry stores it, once.
    a.ingest(vec![page("lost", "a1")]).unwrap();
    assert_eq!(ids(&mut other), ["init", "lost"]);
}

/// The same with one request retried whole on B (same messageId, same `seq`): A's answer may
/// be either (the event is stored once, by B), but its graph must follow the store: it used to
/// take B's commit for its own and keep a2 on its own profile, which the store does not have,
/// so that a2's next event landed on a second profile (review).
#[test]
fn postgres_a_graph_follows_the_store_when_another_replica_committed_at_its_seqs() {
    let pg = support::pg::shared();
    let db = pg.create_database("cut_diverge");
    let (mut a, _answer) =
        cut_while_another_replica_writes(&db, vec![page("m", "a2")], vec![page("m", "a2")]);
    a.ingest(vec![page("m2", "a2")]).unwrap();
    let events = stored_events(&mut pg.connect(&db));
    let segment = |id: &str| events.iter().find(|e| e.1 == id).unwrap().2.clone();
    assert_eq!(segment("m"), segment("m2"), "a2 on one profile: {events:?}");
}

/// A write whose events were all duplicates has its COMMIT cut: nothing new is stored either
/// way, so it succeeds — and the store goes on on a new connection (it kept the broken one, so
/// that its next write failed, and in the engine the next group's requests with it), having
/// ended the old session (reviews).
#[test]
fn postgres_a_cut_commit_of_duplicates_leaves_a_working_connection() {
    let pg = support::pg::shared();
    let db = pg.create_database("cut_duplicates");
    let cutter = CommitCutter::start(pg.port());
    let mut a = store::open(&cutter.url(pg, &db), Rules::default()).unwrap();
    a.ingest(vec![page("m", "a1")]).unwrap();
    // The COMMIT is lost on the way and the server never hears of it: its session, holding the
    // head's lock, is ended (else every writer would wait until the server gives up on it).
    cutter.arm_silent();
    let summary = a.ingest(vec![page("m", "a1")]).unwrap();
    assert_eq!((summary.accepted, summary.duplicates), (0, 1));
    let idle: i64 = pg
        .connect(&db)
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(idle, 0, "the cut session is left holding the head");
    let next = a.ingest(vec![page("n", "a1")]);
    assert!(next.is_ok(), "the write after it: {next:?}");
    let ids: Vec<String> = stored_events(&mut pg.connect(&db))
        .into_iter()
        .map(|(_, m, _)| m)
        .collect();
    assert_eq!(ids, ["m", "n"]);
}

#[test]
fn postgres_a_connection_lost_during_commit_reports_what_the_server_did() {
    let pg = support::pg::shared();
    let db = pg.create_database("cut");
    let cutter = CommitCutter::start(pg.port());
    let through_cutter = cutter.url(pg, &db);
    let mut s = store::open(&through_cutter, Rules::default()).unwrap();
    let mut direct = store::open(&pg.url(&db), Rules::default()).unwrap();

    // The server applied the COMMIT but its answer never arrived: the events are stored, so the
    // ingest must say so — a "nothing stored" would make the client's retry store them again
    // (their messageIds are the engine's own, generated afresh on the retry).
    cutter.arm(true);
    let summary = s
        .ingest(vec![without_message_id("u1"), without_message_id("u2")])
        .expect("the commit landed, so the ingest succeeded");
    assert_eq!(summary.accepted, 2);
    assert_eq!(direct.event_count().unwrap(), 2);

    // The COMMIT never reached the server: nothing is stored and the ingest fails.
    cutter.arm(false);
    assert!(s.ingest(vec![without_message_id("u3")]).is_err());
    assert_eq!(direct.event_count().unwrap(), 2);

    // The store keeps working on its new connection, its graph in step with the server.
    let summary = s
        .ingest(vec![without_message_id("u1"), without_message_id("u4")])
        .unwrap();
    assert_eq!(summary.accepted, 2);
    assert_eq!(
        summary.profiles_created, 1,
        "u1's profile is known, u4's is new"
    );
    assert_eq!(direct.event_count().unwrap(), 4);

    // The same through an explicit write transaction: its commit looks too.
    let mut pg_store = store::PostgresStore::connect(&through_cutter, Rules::default()).unwrap();
    let mut write = pg_store.begin_write().unwrap();
    write.ingest(vec![without_message_id("u5")]).unwrap();
    cutter.arm(true);
    write.commit().expect("the commit landed");
    assert_eq!(direct.event_count().unwrap(), 5);
    let mut write = pg_store.begin_write().unwrap();
    write.ingest(vec![without_message_id("u6")]).unwrap();
    cutter.arm(false);
    assert!(
        write.commit().is_err(),
        "the commit never reached the server"
    );
    assert_eq!(direct.event_count().unwrap(), 5);
}

#[test]
fn postgres_a_write_dropped_without_commit_stores_nothing() {
    let pg = support::pg::shared();
    let db = pg.create_database("dropped");
    let mut s = store::PostgresStore::connect(&pg.url(&db), Rules::default()).unwrap();
    let mut direct = store::open(&pg.url(&db), Rules::default()).unwrap();
    let mut write = s.begin_write().unwrap();
    write.ingest(vec![without_message_id("u1")]).unwrap();
    drop(write);
    assert_eq!(direct.event_count().unwrap(), 0);
    // The transaction is over: the next one stores only its own events.
    let mut write = s.begin_write().unwrap();
    write.ingest(vec![without_message_id("u2")]).unwrap();
    write.commit().unwrap();
    assert_eq!(direct.event_count().unwrap(), 1);
    // The dropped write's profile never landed: u1 is new again.
    let summary = s.ingest(vec![without_message_id("u1")]).unwrap();
    assert_eq!(summary.profiles_created, 1);
}

/// A value the server refuses in a `COPY` sent in several messages (events past 256 KiB) is a
/// refusal of the data, told apart from a broken connection as an `INSERT`'s is: nothing of the
/// write is stored, and the same connection goes on.
#[test]
fn postgres_a_value_refused_inside_a_large_copy_is_a_data_refusal() {
    let pg = support::pg::shared();
    let db = pg.create_database("refused_copy");
    let mut s = store::open(&pg.url(&db), Rules::default()).unwrap();
    let mut admin = ::postgres::Client::connect(&pg.url(&db), ::postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (event IS DISTINCT FROM 'poison')",
        )
        .unwrap();
    let big = |i: usize, name: &str| {
        event(
            json!({"type": "track", "messageId": format!("{name}-{i}"), "userId": format!("u-{i}"),
            "event": name, "properties": {"blob": "x".repeat(20_000)}}),
        )
    };
    for poison_at in [0, 39] {
        let mut batch: Vec<Event> = (0..40).map(|i| big(i, "Big")).collect();
        batch[poison_at] = big(poison_at, "poison");
        let err = s.ingest(batch).expect_err("the poison is refused");
        assert!(err.is_data_refusal(), "{err}");
        assert!(matches!(err, StoreError::Postgres(_)), "{err:?}");
        assert_eq!(s.event_count().unwrap(), 0);
    }
    let summary = s.ingest((0..40).map(|i| big(i, "Big")).collect()).unwrap();
    assert_eq!(summary.accepted, 40);
    assert_eq!(s.event_count().unwrap(), 40);
}

/// Text no compression shrinks: `n` bytes of hex from a hash chain.
fn incompressible(n: usize, seed: &str) -> String {
    use sha1::{Digest, Sha1};
    let mut out = String::new();
    let mut block = Sha1::digest(seed.as_bytes());
    while out.len() < n {
        out.push_str(&format!("{block:x}"));
        block = Sha1::digest(block);
    }
    out.truncate(n);
    out
}

/// The engine's limit on indexed values (ids, identifiers, Track event names) is one
/// PostgreSQL's indexes hold: a message at the limit commits; past what they hold, the commit
/// fails — which is why the engine refuses such a message alone instead of failing its group.
#[test]
fn postgres_indexes_hold_values_at_the_engines_limit() {
    use profiles_sync::engine::request::MAX_ID_BYTES;
    let pg = support::pg::shared();
    let db = pg.create_database("longids");
    let mut s = store::open(&pg.url(&db), Rules::default()).unwrap();
    let at = |seed: &str| incompressible(MAX_ID_BYTES, seed);
    let summary = s
        .ingest(vec![
            event(json!({"type": "identify", "userId": at("u"), "messageId": at("m1"),
                         "anonymousId": at("a"), "traits": {"email": at("e")}})),
            event(json!({"type": "track", "userId": at("u"), "messageId": at("m2"), "event": at("n")})),
        ])
        .unwrap();
    assert_eq!(summary.accepted, 2);
    let past = incompressible(3 * 1024, "u2");
    assert!(
        s.ingest(vec![event(
            json!({"type": "track", "userId": past, "event": "A"})
        )])
        .is_err(),
        "PostgreSQL's index took a 3 KB key: the limit could be raised"
    );
}

/// Read page by page through `state_page` (the feed API's current-state tables), every
/// current-state table gives exactly the rows derived from the whole state at once, whatever the
/// page size: merge chains (a profile merged into one that is merged in turn) resolve to the live
/// profile, and identifier values that sort differently by bytes and by collation page without
/// gaps or repeats.
fn current_state_tables_page_by_key_to_the_whole_state(kind: &str) {
    let (mut s, _, _keep) = fresh(kind);
    let mut events = vec![];
    for (i, anon) in ["a1", "a2", "a3", "Zed", "äpfel", "a b", "A1"]
        .iter()
        .enumerate()
    {
        events.push(page(&format!("p{i}"), anon));
    }
    // a3's profile merges into a2's (the older), then a2's into a1's: a chain of two.
    events.push(identify("i1", "a3", "x@example.com"));
    events.push(identify("i2", "a2", "x@example.com"));
    events.push(identify("i3", "a1", "y@example.com"));
    events.push(event(
        json!({"type": "identify", "messageId": "i4", "anonymousId": "a1", "userId": "u1",
               "traits": {"email": "x@example.com", "name": "Ann", "Größe": 3}}),
    ));
    events.push(identify("i5", "Zed", "z@example.com"));
    let summary = s.ingest(events).unwrap();
    assert!(summary.merges >= 2, "{summary:?}");
    let (profiles, identifiers) = s.load_state().unwrap();
    let key = |m: &serde_json::Map<String, Value>| serde_json::to_string(m).unwrap();
    for table in [
        StateTable::UserIdentifiers,
        StateTable::UserTraits,
        StateTable::ProfileMerges,
    ] {
        let mut want = store::state_rows(table, &profiles, &identifiers);
        want.sort_by_key(key);
        assert!(!want.is_empty(), "{table:?}");
        for limit in [1, 2, 3, 1000] {
            let (mut got, mut after, mut pages) = (vec![], None::<Vec<String>>, 0);
            loop {
                let p = store::state_page(&mut *s, table, after.as_deref(), limit).unwrap();
                got.extend(p.rows);
                after = p.next;
                pages += 1;
                if !p.more {
                    break;
                }
                assert!(pages < 100, "{table:?} never ends");
            }
            got.sort_by_key(key);
            assert_eq!(got, want, "{table:?}, pages of {limit}");
            // Past the end: no rows, the same key, nothing more.
            let end = store::state_page(&mut *s, table, after.as_deref(), limit).unwrap();
            assert!(
                end.rows.is_empty() && !end.more && end.next == after,
                "{table:?}"
            );
        }
        for col in table.columns() {
            assert!(
                want.iter().all(|r| r.contains_key(*col)),
                "{table:?}: {col}"
            );
        }
    }
    // One row per profile: the merged ones point at one survivor, the live ones at themselves.
    let merges = store::state_rows(StateTable::ProfileMerges, &profiles, &identifiers);
    assert_eq!(merges.len(), profiles.len());
    let merged: Vec<&serde_json::Map<String, Value>> = merges
        .iter()
        .filter(|r| r["canonical_segment_id"] != r["segment_id"])
        .collect();
    let survivors: HashSet<&str> = merged
        .iter()
        .map(|r| r["canonical_segment_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        (merged.len(), survivors.len()),
        (2, 1),
        "both merged profiles point at the survivor: {merges:?}"
    );
    let survivor = survivors.into_iter().next().unwrap();
    assert!(
        merges
            .iter()
            .any(|r| r["segment_id"] == survivor && r["canonical_segment_id"] == survivor),
        "the survivor maps to itself: {merges:?}"
    );
    let wrong = store::state_page(&mut *s, StateTable::UserIdentifiers, Some(&["a".into()]), 5);
    assert!(matches!(wrong, Err(StoreError::BadKey(_))), "{wrong:?}");
}

/// Imports `lines` into `s`; the summary (or the error that stopped the import), the events
/// stored, and the errors reported.
fn import_lines(
    s: &mut dyn Store,
    lines: &[&str],
) -> (
    anyhow::Result<profiles_sync::cli::ImportSummary>,
    i64,
    Vec<String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let mut errors = vec![];
    let result = profiles_sync::cli::import(
        s,
        &Rules::default(),
        &input,
        Some("src_web"),
        |e| errors.push(e.to_string()),
        |_| {},
    );
    let stored = s.event_count().unwrap();
    (result, stored, errors)
}

/// The import's summary counts the new traits a full profile had no room for (their events
/// are stored with them): it said "accepted" and nothing else.
#[test]
fn an_import_counts_the_traits_a_full_profile_had_no_room_for() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let rules = Rules::from_yaml("caps: {max_traits_per_profile: 2}").unwrap();
    let mut s = store::open(&url, rules).unwrap();
    let line = json!({"type": "identify", "messageId": "m1", "userId": "u1",
                      "traits": {"a": 1, "b": 2, "c": 3}})
    .to_string();
    let (summary, stored, errors) = import_lines(&mut *s, &[&line]);
    let summary = summary.unwrap();
    assert_eq!(
        (summary.accepted, summary.traits_dropped),
        (1, 1),
        "{errors:?}"
    );
    assert_eq!(stored, 1);
}

/// A line the engine would refuse (a NUL in an id: PostgreSQL's text refuses it), one identity
/// resolution refuses (every identifier blocked) and one the store refuses (a DBA's CHECK) are
/// each reported with their line and left out, and the good lines around them are stored, on
/// both stores: the first ended the import on PostgreSQL with nothing of its group stored, and
/// the second was counted but never reported.
#[test]
fn import_reports_every_refused_line_and_stores_the_good_ones_around_it() {
    for kind in ["sqlite", "postgres"] {
        let (mut s, url, _keep) = fresh(kind);
        if kind == "postgres" {
            let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            admin
                .batch_execute("ALTER TABLE events ADD CONSTRAINT no_m4 CHECK (message_id <> 'm4')")
                .unwrap();
        }
        let (result, stored, errors) = import_lines(
            &mut *s,
            &[
                r#"{"type":"page","messageId":"m1","anonymousId":"a1","name":"Home"}"#,
                r#"{"type":"track","messageId":"m2","userId":"u\u0000x","event":"Bad"}"#,
                r#"{"type":"track","messageId":"m3","userId":"null","event":"Blocked"}"#,
                r#"{"type":"page","messageId":"m4","anonymousId":"a4","name":"Home"}"#,
                r#"{"type":"page","messageId":"m5","anonymousId":"a5","name":"Home"}"#,
            ],
        );
        let summary = result.unwrap_or_else(|e| panic!("{kind}: the import stopped: {e:#}"));
        let expected_stored = if kind == "postgres" { 2 } else { 3 };
        assert_eq!(stored, expected_stored, "{kind}: {errors:?}");
        assert_eq!(summary.accepted as i64, expected_stored, "{kind}");
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        let expected: &[&str] = if kind == "postgres" {
            &["line 2", "line 3", "line 4"]
        } else {
            &["line 2", "line 3"]
        };
        assert_eq!(lines, expected, "{kind}: {errors:?}");
        assert!(errors[0].contains("NUL"), "{errors:?}");
        assert!(errors[1].contains("blocked"), "{errors:?}");
        assert_eq!(
            summary.rejected_total(),
            expected.len(),
            "{kind}: {summary:?}"
        );
        if kind == "postgres" {
            assert!(errors[2].contains("no_m4"), "{errors:?}");
        }
    }
}

/// The store keeps an identifier's sightings to the microsecond; the graph kept the event's
/// nanoseconds (a `receivedAt`-based timestamp has them), so that a windowed limit, which compares
/// the last sighting with `timestamp - window`, could decide the other way in an engine
/// restarted between two events than in the one that kept running (review). The graph now keeps
/// sightings to the microsecond too. (Received after they happened: an event is ordered by
/// its timestamp only up to its `receivedAt`.)
#[test]
fn a_restart_does_not_change_a_windowed_limit_s_decision() {
    let rules = || Rules::from_yaml("limits: {email: {max: 1, window: 1s}}").unwrap();
    let first = event(
        json!({"type": "identify", "messageId": "m1", "anonymousId": "a1",
        "traits": {"email": "one@example.com"}, "timestamp": "2026-01-01T00:00:00.000000500Z",
        "receivedAt": "2026-01-01T00:00:05Z"}),
    );
    let second = || {
        event(
            json!({"type": "track", "messageId": "m2", "anonymousId": "a1", "event": "E",
            "context": {"traits": {"email": "two@example.com"}},
            "timestamp": "2026-01-01T00:00:01.000000200Z", "receivedAt": "2026-01-01T00:00:05Z"}),
        )
    };
    let segment_of = |s: &mut dyn Store, id: &str| {
        all(s, &Feed::Events(EventFilter::All))
            .into_iter()
            .find_map(|r| match r {
                FeedRow::Event(e) if e.event.message_id == id => Some(e.segment_id),
                _ => None,
            })
            .unwrap()
    };
    // Kept running: one@ was seen 0.9999997 s before, inside the window, so two@ would be a
    // second email: the anonymous id is dropped and two@ gets a profile of its own.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("a.db").display());
    let mut running = store::open(&url, rules()).unwrap();
    running.ingest(vec![first.clone()]).unwrap();
    running.ingest(vec![second()]).unwrap();
    let kept = segment_of(&mut *running, "m1") == segment_of(&mut *running, "m2");
    // Restarted between the two events: the same decision.
    let url = format!("sqlite://{}", dir.path().join("b.db").display());
    let mut s = store::open(&url, rules()).unwrap();
    s.ingest(vec![first]).unwrap();
    drop(s);
    let mut restarted = store::open(&url, rules()).unwrap();
    restarted.ingest(vec![second()]).unwrap();
    let after_restart = segment_of(&mut *restarted, "m1") == segment_of(&mut *restarted, "m2");
    // `one@`, last seen at .000000 (to the microsecond), is outside the window of an event at
    // 00:00:01.000000200 in both: the two events share a profile.
    assert_eq!(
        (kept, after_restart),
        (true, true),
        "(same profile kept running, same profile after a restart)"
    );
}

/// The reconnect after a cut COMMIT of duplicates ends the old session when it can, and takes
/// the new connection when it cannot — here the store's role may not call
/// `pg_terminate_backend(integer, bigint)` (PostgreSQL 13 and older have no such function). It
/// used to keep the broken connection then, so that the next write failed on it (review).
#[test]
fn postgres_a_cut_commit_of_duplicates_reconnects_when_the_old_session_cannot_be_ended() {
    let pg = support::pg::shared();
    let db = pg.create_database("cut_dup_role");
    let role = format!("r_{db}");
    pg.connect(&db)
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN;
             ALTER DATABASE \"{db}\" OWNER TO \"{role}\";
             ALTER SCHEMA public OWNER TO \"{role}\";
             REVOKE EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) FROM PUBLIC;"
        ))
        .unwrap();
    let cutter = CommitCutter::start(pg.port());
    let url = cutter
        .url(pg, &db)
        .replace("postgres@", &format!("{role}@"));
    let mut a = store::open(&url, Rules::default()).unwrap();
    a.ingest(vec![page("m", "a1")]).unwrap();
    // An ordinary cut: the server sees the connection close and ends the session itself.
    cutter.arm(false);
    let summary = a.ingest(vec![page("m", "a1")]).unwrap();
    assert_eq!((summary.accepted, summary.duplicates), (0, 1));
    let next = a.ingest(vec![page("n", "a1")]);
    assert!(next.is_ok(), "the write after it: {next:?}");
}
