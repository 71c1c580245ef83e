//! The change-feed API that sync Jobs read in the cluster:
//!
//! - `GET /v1/feeds` → the tables that can be read, the Track event tables seen, and the head `seq`;
//! - `GET /v1/feeds/{table}?after=N&limit=M` → newline-delimited JSON: a header line
//!   `{"table", "columns", "count", "next_after"}` then one row per line, in `seq` order.
//!
//! Both need `Authorization: Bearer <token>` with the token the engine was started with.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use crate::store::{EventFilter, Feed, FeedRow, Store, StoreError};
use crate::sync::naming::table_name;

/// Largest page a client may ask for.
pub const MAX_PAGE: usize = 50_000;
/// Page size when the client does not say.
pub const DEFAULT_PAGE: usize = 10_000;

/// A small pool of read-only store handles, so feed reads never wait for the writer.
pub struct ReaderPool {
    url: String,
    idle: Mutex<Vec<Box<dyn Store>>>,
}

impl ReaderPool {
    /// A pool opening handles on `url` as needed.
    pub fn new(url: String) -> Arc<ReaderPool> {
        Arc::new(ReaderPool {
            url,
            idle: Mutex::new(vec![]),
        })
    }

    /// Runs `f` with a handle; a handle that failed is dropped instead of returned to the pool.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut store = match pooled {
            Some(s) => s,
            None => crate::store::open(&self.url, crate::identity::Rules::default())?,
        };
        let result = f(&mut *store);
        if result.is_ok()
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < 8
        {
            idle.push(store);
        }
        result
    }
}

/// Constant-time comparison of a presented bearer token with the configured one.
pub fn token_matches(header: Option<&str>, expected: &str) -> bool {
    let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (presented.trim().as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The feed for a table name: a change log, an event-type table, or a Track event table.
pub fn feed_for(store: &mut dyn Store, table: &str) -> Result<Option<Feed>, StoreError> {
    if let Some(f) = Feed::from_table(table) {
        return Ok(Some(f));
    }
    let names: Vec<String> = store
        .track_event_names()?
        .into_iter()
        .filter(|n| table_name(n) == table)
        .collect();
    Ok((!names.is_empty()).then_some(Feed::Events(EventFilter::TrackNames(names))))
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
        "trackEvents": track,
        "sources": store.sources()?,
        "head": store.head_seq()?,
    });
    if let Some(at) = since {
        doc["seqSince"] = json!(store.event_seq_since(at)?);
    }
    Ok(doc)
}

/// One page of a feed as NDJSON: the header line, then the rows.
pub fn page(
    store: &mut dyn Store,
    table: &str,
    feed: &Feed,
    after: i64,
    limit: usize,
) -> Result<String, StoreError> {
    let rows: Vec<Map<String, Value>> = store
        .read_feed(feed, after, limit)?
        .iter()
        .map(FeedRow::to_json)
        .collect();
    let mut columns: Vec<String> = vec![];
    for r in &rows {
        for k in r.keys() {
            if !columns.iter().any(|c| c == k) {
                columns.push(k.clone());
            }
        }
    }
    let next_after = rows
        .last()
        .and_then(|r| r.get("seq"))
        .and_then(Value::as_i64)
        .unwrap_or(after);
    let mut out =
        json!({"table": table, "columns": columns, "count": rows.len(), "next_after": next_after})
            .to_string();
    out.push('\n');
    for r in rows {
        out.push_str(&Value::Object(r).to_string());
        out.push('\n');
    }
    Ok(out)
}
