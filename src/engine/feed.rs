//! The change-feed API that sync Jobs read in the cluster:
//!
//! - `GET /v1/feeds` → the tables that can be read, the Track event tables seen, the head `seq`
//!   and the store's id;
//! - `GET /v1/feeds/{table}?after=N&limit=M` → newline-delimited JSON: a header line
//!   `{"table", "columns", "count", "next_after", "more"}` then one row per line, in `seq` order;
//! - `GET /v1/feeds/{state_table}?after_key=K&limit=M` → the same for a current-state table
//!   (`user_identifiers`, `user_traits`, `profile_merges`), read by key: the header's
//!   `next_after_key` (a JSON array) is the `after_key` of the next page.
//!
//! Both need `Authorization: Bearer <token>` with the token the engine was started with.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::store::{EventFilter, Feed, StateTable, Store, StoreError, state_page};
use crate::sync::naming::table_name;

/// Largest page a client may ask for.
pub const MAX_PAGE: usize = 50_000;
/// Page size when the client does not say.
pub const DEFAULT_PAGE: usize = 10_000;

/// A small pool of read-only store handles, so feed reads never wait for the writer.
pub struct ReaderPool {
    url: String,
    /// The idle handles; `None` once [`ReaderPool::close`]d (a handle in use is then closed as
    /// its read ends).
    idle: Mutex<Option<Vec<Box<dyn Store>>>>,
    /// One permit per handle that may be open.
    open: Arc<tokio::sync::Semaphore>,
}

impl ReaderPool {
    /// A pool opening handles on `url` as needed, at most `max` at once (in use or idle): on
    /// PostgreSQL each is a server connection, and sync Jobs reading at once must not take the
    /// server's connections from the writer, the other replicas and the operators.
    pub fn new(url: String, max: usize) -> Arc<ReaderPool> {
        Arc::new(ReaderPool {
            url,
            idle: Mutex::new(Some(vec![])),
            open: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
        })
    }

    /// Runs `f` with a handle on a blocking thread, once one of the pool's handles is free (a
    /// read beyond them waits); a handle that failed is dropped instead of returned to the pool. The outer error is
    /// the blocking task's (it panicked or was cancelled).
    pub async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Result<T, StoreError>, String> {
        let permit = Arc::clone(&self.open)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pool.with(f)
        })
        .await
        .map_err(|e| e.to_string())
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .idle
            .lock()
            .ok()
            .and_then(|mut v| v.as_mut().and_then(Vec::pop));
        let mut store = match pooled {
            Some(s) => s,
            None => crate::store::open(&self.url, crate::identity::Rules::default())?,
        };
        let result = f(&mut *store);
        if result.is_ok()
            && let Ok(mut idle) = self.idle.lock()
            && let Some(idle) = idle.as_mut()
        {
            idle.push(store);
        }
        result
    }

    /// Closes the idle handles here and now (a blocking call: on SQLite the last close
    /// checkpoints the WAL into the file), and any handle in use as its read ends. The engine's
    /// stop calls it so that no handle of the store outlives the engine: dropped with the pool
    /// instead, they are closed on another thread, later.
    pub fn close(&self) {
        let idle = self.idle.lock().ok().and_then(|mut v| v.take());
        drop(idle);
    }
}

impl Drop for ReaderPool {
    /// The idle handles are closed on a thread of their own: the pool is dropped with the
    /// engine's state on an async worker, where closing a PostgreSQL handle (a blocking client
    /// with a runtime of its own) panics.
    fn drop(&mut self) {
        if let Ok(idle) = self.idle.get_mut()
            && let Some(idle) = idle.take()
            && !idle.is_empty()
        {
            crate::store::drop_later(idle);
        }
    }
}

/// The feed API's bearer token in the file at `path` (a mounted Secret), trimmed; the error is
/// the reason it can't be used, without the token: the file unreadable, empty, or holding a
/// space, a line break or a character an HTTP header cannot carry (every request with it
/// failed). The engine, the controller and the sync read it through here.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            "the token holds a space, a line break or a character an HTTP header cannot carry"
                .into(),
        );
    }
    Ok(token.to_string())
}

/// Constant-time comparison of a presented bearer token with the configured one. Their SHA-1
/// digests are compared, so that neither the first differing byte nor the token's length shows
/// in the time the answer takes.
pub fn token_matches(header: Option<&str>, expected: &str) -> bool {
    use sha1::{Digest, Sha1};
    let Some(presented) = super::request::auth_credentials(header, "Bearer") else {
        return false;
    };
    let (a, b) = (Sha1::digest(presented), Sha1::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The feed for a table name: a change log, an event-type table, or a Track event table; for a
/// Track event table, also the head its names were read at, which its reads must end at (see
/// [`seq_page`]; `profiles-sync export` reads through it too).
pub(crate) fn feed_for(
    store: &mut dyn Store,
    table: &str,
) -> Result<Option<(Feed, Option<i64>)>, StoreError> {
    if let Some(f) = Feed::from_table(table) {
        return Ok(Some((f, None)));
    }
    // The head first: an event's name is committed with it, so every event at or below this
    // head has its name among those read next.
    let head = store.head_seq()?;
    let names: Vec<String> = store
        .track_event_names()?
        .into_iter()
        .filter(|n| table_name(n) == table)
        .collect();
    Ok((!names.is_empty()).then_some((Feed::Events(EventFilter::TrackNames(names)), Some(head))))
}

/// One page of the feed of `table` after `after` ([`page`]), `None` for a table no feed has. A
/// Track event table's page ends at the head its event names were read at: the event names
/// that table gathers can grow meanwhile (`Order Completed`, then `order_completed`), and an
/// event of a name first committed after that read would otherwise be passed over by the
/// page's later events, and skipped for good.
pub fn seq_page(
    store: &mut dyn Store,
    table: &str,
    after: i64,
    limit: usize,
    max_bytes: usize,
) -> Result<Option<String>, StoreError> {
    let Some((feed, through)) = feed_for(store, table)? else {
        return Ok(None);
    };
    page(store, table, &feed, after, limit, max_bytes, through).map(Some)
}

/// The `GET /v1/feeds` document; with `since`, also the first event `seq` received at or after it.
pub fn catalog(
    store: &mut dyn Store,
    since: Option<crate::event::Timestamp>,
) -> Result<Value, StoreError> {
    let mut track: Vec<Value> = store
        .track_event_names()?
        .into_iter()
        .map(|n| json!({"event": n, "table": table_name(&n)}))
        .collect();
    track.sort_by(|a, b| a["table"].as_str().cmp(&b["table"].as_str()));
    let mut doc = json!({
        "tables": Feed::TABLES,
        "stateTables": StateTable::TABLES,
        "trackEvents": track,
        "sources": store.sources()?,
        "head": store.head_seq()?,
        "storeId": store.store_id()?,
        "pruned": super::retention::pruned_json(&store.pruned()?),
    });
    if let Some(at) = since {
        doc["seqSince"] = json!(store.event_seq_since(at)?);
    }
    Ok(doc)
}

/// Most bytes of rows a page carries (at least one row): with events of up to 32 KB, a page
/// of 50,000 could otherwise hold 1.6 GB in the engine's memory.
pub const MAX_PAGE_BYTES: usize = 16 << 20;

/// Most rows read from the store at a time while a page is assembled.
const READ_PIECE: usize = 1_000;

/// Rows read first, before the page knows how large its rows are.
const FIRST_PIECE: usize = 8;

/// How many rows (or profiles) to read next, `read` of them holding `bytes` so far: a few
/// first, then as many as the bytes left would hold at their average size (at most
/// [`READ_PIECE`]) — so that rows far larger than usual (an imported event of megabytes, a
/// profile of many traits) put about one row more than `max_bytes` in memory, not a thousand.
fn next_piece(read: usize, bytes: usize, max_bytes: usize) -> usize {
    if read == 0 {
        return FIRST_PIECE;
    }
    let average = (bytes / read).max(1);
    (max_bytes.saturating_sub(bytes) / average + 1).clamp(1, READ_PIECE)
}

/// One page of a feed as NDJSON: the header line, then the rows — up to `limit` rows, cut short
/// once the rows hold `max_bytes`, or at the first row past `through`. The header's `more` is
/// false only when the page reached the end of the feed as of the read; a reader must not take
/// a short page for the end.
pub fn page(
    store: &mut dyn Store,
    table: &str,
    feed: &Feed,
    after: i64,
    limit: usize,
    max_bytes: usize,
    through: Option<i64>,
) -> Result<String, StoreError> {
    // The feed's declared columns, then any unknown top-level key an event of the page carries.
    let mut columns: Vec<String> = feed.columns().iter().map(|c| c.to_string()).collect();
    // Looked up by hash: an event may carry thousands of keys of its own, and a page thousands
    // of events (a scan of the list per key made a page of such events take hours).
    let mut listed: HashSet<String> = columns.iter().cloned().collect();
    let mut body = String::new();
    let (mut count, mut next_after, mut more) = (0usize, after, true);
    'read: while count < limit {
        let want = (limit - count).min(next_piece(count, body.len(), max_bytes));
        let piece = store.read_feed(feed, next_after, want)?;
        let ended = piece.len() < want;
        for row in &piece {
            if (count > 0 && body.len() >= max_bytes) || through.is_some_and(|t| row.seq() > t) {
                break 'read;
            }
            let r = row.to_json();
            for k in r.keys() {
                if !listed.contains(k) {
                    listed.insert(k.clone());
                    columns.push(k.clone());
                }
            }
            body.push_str(&Value::Object(r).to_string());
            body.push('\n');
            count += 1;
            next_after = row.seq();
        }
        if ended {
            more = false;
            break;
        }
    }
    Ok(ndjson(
        json!({"table": table, "columns": columns, "count": count, "next_after": next_after, "more": more}),
        &body,
    ))
}

/// A page as sent: its header line, then the rows' lines.
fn ndjson(header: Value, rows: &str) -> String {
    let mut out = header.to_string();
    out.push('\n');
    out.push_str(rows);
    out
}

/// One page of a current-state table as NDJSON: the header line (with `next_after_key`), then
/// the rows of at most `limit` profiles or identifiers — stopping once `limit` rows are out or
/// they hold `max_bytes` (a profile's traits stay together). Bounded by what is read, not by
/// the rows found, a page may be short, even empty, with more after it; `more` is false only
/// when the read reached the end of the table.
pub fn state_table_page(
    store: &mut dyn Store,
    table: StateTable,
    name: &str,
    after: Option<Vec<String>>,
    limit: usize,
    max_bytes: usize,
) -> Result<String, StoreError> {
    let mut body = String::new();
    let (mut count, mut read, mut after, mut more) = (0usize, 0usize, after, true);
    while count < limit && read < limit && body.len() < max_bytes {
        let want = (limit - read).min(next_piece(read, body.len(), max_bytes));
        let page = state_page(store, table, after.as_deref(), want)?;
        read += page.read;
        for row in &page.rows {
            body.push_str(&serde_json::to_string(row).unwrap_or_default());
            body.push('\n');
            count += 1;
        }
        after = page.next;
        if !page.more {
            more = false;
            break;
        }
    }
    Ok(ndjson(
        json!({"table": name, "columns": table.columns(), "count": count,
               "next_after_key": after, "more": more}),
        &body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, ParseOptions};

    /// A page reads a few rows first, then as many as its bytes left hold at their average
    /// size: rows of a megabyte are read about one at a time past the budget, small ones a
    /// thousand at a time.
    #[test]
    fn a_page_reads_its_rows_in_pieces_sized_by_what_they_weigh() {
        let mb = 1 << 20;
        assert_eq!(next_piece(0, 0, 16 * mb), FIRST_PIECE);
        assert_eq!(next_piece(8, 8 * mb, 16 * mb), 9);
        assert_eq!(next_piece(16, 16 * mb, 16 * mb), 1);
        assert_eq!(next_piece(8, 800, 16 * mb), READ_PIECE);
        // Rows of a megabyte read with a 16 MB budget: never more than a row past it.
        let (mut read, mut bytes) = (0, 0);
        while bytes < 16 * mb {
            let piece = next_piece(read, bytes, 16 * mb);
            read += piece;
            bytes += piece * mb;
        }
        assert!(bytes <= 17 * mb, "{bytes}");
    }

    #[test]
    fn the_bearer_token_must_match_and_its_scheme_compares_without_case() {
        assert!(token_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(token_matches(Some("bearer s3cret"), "s3cret"));
        assert!(token_matches(Some("BEARER  s3cret "), "s3cret"));
        for wrong in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer",
        ] {
            assert!(!token_matches(Some(wrong), "s3cret"), "{wrong}");
        }
        assert!(!token_matches(None, "s3cret"));
    }

    fn page_rows(text: &str) -> (Value, Vec<Value>) {
        let mut lines = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap());
        let header = lines.next().unwrap();
        (header, lines.collect())
    }

    /// An in-memory store holding `messages`.
    fn store_with(messages: &[Value]) -> crate::store::SqliteStore {
        let mut store =
            crate::store::SqliteStore::open_in_memory(crate::identity::Rules::default()).unwrap();
        ingest_into(&mut store, messages);
        store
    }

    /// Ingests `messages` (in one write).
    fn ingest_into(store: &mut crate::store::SqliteStore, messages: &[Value]) {
        let opts = ParseOptions {
            now: jiff::Timestamp::from_second(1_767_225_600).unwrap(),
            source_id: "src".into(),
            trust_received_at: true,
        };
        let events: Vec<Event> = messages
            .iter()
            .map(|m| Event::from_json(m, None, &opts).unwrap())
            .collect();
        store.ingest(events).unwrap();
    }

    /// A Track event table's feed reads its event names, then its rows: an event of a name new
    /// to the table (`order_completed` after `Order Completed`) committed between the two, then
    /// more events of the old name, is served by the next page — not passed over by the page's
    /// cursor (review). The page ends at the head the names were read at.
    #[test]
    fn a_track_feed_never_skips_an_event_of_a_name_first_committed_during_a_page() {
        let track = |id: &str, name: &str| json!({"type": "track", "messageId": id, "userId": "u1", "event": name});
        let mut store = store_with(&[track("m1", "Order Completed")]);
        let ids = |text: &str| -> (Value, Vec<String>) {
            let (header, rows) = page_rows(text);
            let ids = rows
                .iter()
                .map(|r| r["messageId"].as_str().unwrap().to_string())
                .collect();
            (header, ids)
        };
        // As `seq_page` does, with writes between the names' read and the rows' read.
        let (feed, through) = feed_for(&mut store, "order_completed").unwrap().unwrap();
        assert_eq!(through, Some(store.head_seq().unwrap()));
        ingest_into(&mut store, &[track("m2", "order_completed")]);
        ingest_into(&mut store, &[track("m3", "Order Completed")]);
        let text = page(
            &mut store,
            "order_completed",
            &feed,
            0,
            100,
            usize::MAX,
            through,
        );
        let (header, mut seen) = ids(&text.unwrap());
        assert_eq!(
            seen,
            ["m1"],
            "the page ends at the head its names were read at"
        );
        assert_eq!(header["more"], true, "and says there is more");
        let after = header["next_after"].as_i64().unwrap();
        let text = seq_page(&mut store, "order_completed", after, 100, usize::MAX).unwrap();
        let (header, rest) = ids(&text.unwrap());
        seen.extend(rest);
        assert_eq!(
            seen,
            ["m1", "m2", "m3"],
            "every event of the table, once, in order"
        );
        assert_eq!(header["more"], false);
        assert!(
            seq_page(&mut store, "no_such_event", 0, 100, usize::MAX)
                .unwrap()
                .is_none()
        );
    }

    /// Events with thousands of top-level keys of their own (anyone with a write key can send
    /// them): the header lists each key once, in the order the rows first carry it. (The list
    /// was searched from the start for every key of every row: a page of such events took hours,
    /// past the sync's timeout, on every run.)
    #[test]
    fn keys_events_carry_by_the_thousand_are_listed_once_in_first_seen_order() {
        let messages: Vec<Value> = (0..40)
            .map(|i| {
                let mut m = json!({"type": "track", "messageId": format!("m{i}"), "userId": "u", "event": "E"});
                for k in 0..1_000 {
                    // Half the keys repeat an earlier event's, half are new.
                    m[format!("k{}", i * 500 + k)] = json!(k);
                }
                m
            })
            .collect();
        let mut store = store_with(&messages);
        let feed = Feed::from_table("tracks").unwrap();
        let (header, rows) =
            page_rows(&page(&mut store, "tracks", &feed, 0, 100, usize::MAX, None).unwrap());
        assert_eq!(rows.len(), 40);
        let listed: Vec<String> = serde_json::from_value(header["columns"].clone()).unwrap();
        let declared = feed.columns().len();
        let (mut expected, mut seen) = (vec![], HashSet::new());
        for row in &rows {
            for k in row.as_object().unwrap().keys() {
                if k.starts_with('k') && seen.insert(k.clone()) {
                    expected.push(k.clone());
                }
            }
        }
        assert_eq!(expected.len(), 40 * 500 + 500, "every key, once");
        assert_eq!(listed[declared..], expected[..]);
    }

    /// A page's header lists the table's columns, even when the page is empty; a change log's
    /// rows have exactly those keys, an event feed's rows some of them plus the unknown
    /// top-level keys their events carried (listed too).
    #[test]
    fn a_page_header_lists_the_tables_columns() {
        let mut store = store_with(&[
            json!({"type": "identify", "messageId": "m1", "userId": "u1", "anonymousId": "a1",
                   "traits": {"email": "u1@example.com", "plan": "pro"}}),
            json!({"type": "track", "messageId": "m2", "userId": "u1", "event": "Bought",
                   "properties": {"total": 5}, "custom_top": 1}),
        ]);
        let head = store.head_seq().unwrap();
        for table in Feed::TABLES {
            let feed = Feed::from_table(table).unwrap();
            let declared: Vec<String> = feed.columns().iter().map(|c| c.to_string()).collect();
            let (header, rows) =
                page_rows(&page(&mut store, table, &feed, 0, 100, usize::MAX, None).unwrap());
            let listed: Vec<String> = serde_json::from_value(header["columns"].clone()).unwrap();
            assert_eq!(listed[..declared.len()], declared[..], "{table}");
            for row in &rows {
                let keys: Vec<String> = row.as_object().unwrap().keys().cloned().collect();
                if matches!(feed, Feed::Events(_)) {
                    assert!(keys.iter().all(|k| listed.contains(k)), "{table}: {keys:?}");
                } else {
                    assert_eq!(keys, declared, "{table}");
                }
            }
            if table == "events" {
                assert!(listed.contains(&"custom_top".to_string()), "{listed:?}");
            }
            if ["id_graph_updates", "profile_traits_updates", "events"].contains(&table) {
                assert!(!rows.is_empty(), "{table} has rows to check");
            }
            let (empty, _) =
                page_rows(&page(&mut store, table, &feed, head, 100, usize::MAX, None).unwrap());
            assert_eq!(empty["count"], 0);
            assert_eq!(empty["columns"], json!(declared), "{table}: an empty page");
        }
    }

    /// A current-state page reads at most `limit` profiles however few rows they give, so a
    /// table of mostly traitless profiles never makes one request read the whole store.
    #[test]
    fn a_state_page_is_bounded_by_the_profiles_it_reads() {
        let mut messages: Vec<Value> = (0..10)
            .map(|i| json!({"type": "page", "messageId": format!("p{i}"), "anonymousId": format!("a{i}")}))
            .collect();
        messages.push(
            json!({"type": "identify", "messageId": "i1", "userId": "u1",
                             "traits": {"plan": "pro"}}),
        );
        let mut store = store_with(&messages);
        let (mut after, mut rows, mut pages) = (None::<Vec<String>>, vec![], 0);
        loop {
            let text = state_table_page(
                &mut store,
                StateTable::UserTraits,
                "user_traits",
                after,
                2,
                usize::MAX,
            )
            .unwrap();
            let (header, page) = page_rows(&text);
            pages += 1;
            rows.extend(page);
            after = serde_json::from_value(header["next_after_key"].clone()).unwrap();
            if header["more"] == false {
                break;
            }
        }
        assert_eq!(
            pages, 6,
            "11 profiles, 2 a page: 6 pages, most of them empty"
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["name"], "plan");
    }

    #[test]
    fn pages_are_cut_by_size_and_say_whether_more_may_follow() {
        let messages: Vec<Value> = (0..10)
            .map(|i| {
                json!({"type": "track", "messageId": format!("m{i}"), "userId": "u1",
                    "event": "Big", "properties": {"blob": "x".repeat(1000)}})
            })
            .collect();
        let mut store = store_with(&messages);
        let feed = Feed::Events(EventFilter::All);
        // A budget of about three rows: pages of three, each saying more may follow, until the
        // last, which reaches the end.
        let (mut after, mut seen, mut pages) = (0, vec![], 0);
        loop {
            let (header, rows) =
                page_rows(&page(&mut store, "events", &feed, after, 10, 2_500, None).unwrap());
            pages += 1;
            assert!(rows.len() <= 3, "{} rows past the byte budget", rows.len());
            assert_eq!(header["count"], rows.len());
            seen.extend(
                rows.iter()
                    .map(|r| r["messageId"].as_str().unwrap().to_string()),
            );
            after = header["next_after"].as_i64().unwrap();
            if header["more"] == false {
                break;
            }
            assert!(
                !rows.is_empty(),
                "a page that says more follows carries rows"
            );
            assert!(pages < 20);
        }
        let expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        assert_eq!(seen, expected, "every row once, in order");
        // One row is served whatever its size; a page of exactly `limit` rows may have more after it.
        let (header, rows) = page_rows(&page(&mut store, "events", &feed, 0, 10, 1, None).unwrap());
        assert_eq!((rows.len(), &header["more"]), (1, &json!(true)));
        let (header, rows) =
            page_rows(&page(&mut store, "events", &feed, 0, 4, usize::MAX, None).unwrap());
        assert_eq!((rows.len(), &header["more"]), (4, &json!(true)));
        let (first8, _) =
            page_rows(&page(&mut store, "events", &feed, 0, 8, usize::MAX, None).unwrap());
        let after8 = first8["next_after"].as_i64().unwrap();
        let (header, rows) =
            page_rows(&page(&mut store, "events", &feed, after8, 4, usize::MAX, None).unwrap());
        assert_eq!((rows.len(), &header["more"]), (2, &json!(false)));
    }
}
