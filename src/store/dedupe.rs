//! SQLite's messageId dedupe.
//!
//! A unique index on the messageId text costs SQLite about one page write per event: the ids
//! Segment's SDKs send are random UUIDs, so the events of one commit land on as many leaf pages
//! of the index, and a WAL commit writes every page it touched whole (16 KiB). With such ids the
//! engine's SQLite ingest ran at ~50k events/s against ~130k with sequential ones. Instead:
//! - `message_ids` maps a keyed 64-bit hash of each messageId to its event's `seq`, for the
//!   events up to `message_id_index.indexed_through`. It is written in bulk, sorted, once enough
//!   events have come since the last merge ([`merge_at`]): a leaf page is then written once per
//!   merge, not once per event;
//! - the events after `indexed_through` are held in memory by hash ([`RecentIds`]), rebuilt from
//!   `events` when the store is opened, after a failed write, or when another writer moved the
//!   head;
//! - a lookup probes both by hash and then compares the candidates' stored text, so a collision
//!   can cost a read, never an event. The hash is SipHash-1-3 under a random key kept in the
//!   store: clients cannot choose ids that collide.
//!
//! The index and `indexed_through` move in the same transaction as the events, so a crash leaves
//! them consistent; the memory part is rebuilt from what was committed.

use std::collections::HashSet;

use foldhash::{HashMap, HashMapExt};

use rusqlite::{Transaction, params, params_from_iter};
use siphasher::sip::SipHasher13;

use super::StoreError;
use super::sqlite::in_chunks;

/// Fewest recent events to merge at once.
const MERGE_MIN: usize = 65_536;
/// Most recent events held in memory (~40 bytes each) before a merge.
const MERGE_MAX: usize = 1_048_576;

/// How many recent events trigger a merge into an index of `indexed` entries: an eighth of it
/// (within bounds), so a merge writes about as many leaf pages as it has entries / 8 at most,
/// whatever the size of the store.
pub(crate) fn merge_at(indexed: i64, min: usize) -> usize {
    usize::try_from(indexed / 8)
        .unwrap_or(usize::MAX)
        .clamp(min, MERGE_MAX.max(min))
}

/// Test settings of a store's dedupe; the defaults everywhere else.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// Fewest recent events to merge at once.
    pub merge_min: usize,
    /// Hashes cut to 4 bits, so that collisions happen all the time.
    #[cfg(test)]
    pub narrow: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            merge_min: MERGE_MIN,
            #[cfg(test)]
            narrow: false,
        }
    }
}

/// The messageIds of the events after the last merge, by hash, and what the store's index holds.
pub(crate) struct RecentIds {
    /// The head `seq` these reflect.
    pub head: i64,
    hasher: SipHasher13,
    /// The last `seq` the index covers.
    indexed_through: i64,
    /// Entries in the index.
    indexed: i64,
    /// Recent events: hash → seq.
    tail: HashMap<u64, i64>,
    /// Recent events whose hash was already in `tail` (a collision, or a stored duplicate).
    more: Vec<(u64, i64)>,
    tuning: Tuning,
}

impl RecentIds {
    /// Reads the index's key and extent and the events after it, as of `head`.
    pub fn load(tx: &Transaction<'_>, head: i64, tuning: Tuning) -> Result<Self, StoreError> {
        let (hasher, indexed_through, indexed) = index_row(tx)?;
        let mut ids = RecentIds {
            head,
            hasher,
            indexed_through,
            indexed,
            tail: HashMap::new(),
            more: vec![],
            tuning,
        };
        let mut stmt = tx.prepare("SELECT seq, message_id FROM events WHERE seq > ?1")?;
        let mut rows = stmt.query([indexed_through])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let h = ids.hash(id_text(r)?);
            ids.remember(h, seq);
        }
        Ok(ids)
    }

    fn hash(&self, id: &[u8]) -> u64 {
        let h = self.hasher.hash(id);
        #[cfg(test)]
        if self.tuning.narrow {
            // Tests: 16 hash values, so collisions happen all the time.
            return h & 0xf;
        }
        h
    }

    fn remember(&mut self, hash: u64, seq: i64) {
        if let Some(&taken) = self.tail.get(&hash)
            && taken != seq
        {
            self.more.push((hash, seq));
        } else {
            self.tail.insert(hash, seq);
        }
    }

    fn recent(&self) -> usize {
        self.tail.len() + self.more.len()
    }

    /// Which of `ids` are stored (committed, or written earlier in `tx`).
    pub fn existing(
        &self,
        tx: &Transaction<'_>,
        ids: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        let mut candidates: Vec<i64> = vec![];
        let hashes: Vec<i64> = ids
            .iter()
            .map(|id| {
                let h = self.hash(id.as_bytes());
                candidates.extend(self.tail.get(&h));
                if !self.more.is_empty() {
                    candidates.extend(self.more.iter().filter(|(m, _)| *m == h).map(|(_, s)| *s));
                }
                h as i64
            })
            .collect();
        if self.indexed > 0 {
            in_chunks(tx, &hashes, probe_sql, |stmt, chunk| {
                let mut rows = stmt.query(params_from_iter(chunk))?;
                while let Some(r) = rows.next()? {
                    candidates.push(r.get(0)?);
                }
                Ok(())
            })?;
        }
        let mut found = HashSet::new();
        if candidates.is_empty() {
            return Ok(found);
        }
        // The candidates' text: a hash can be shared by another id.
        let wanted: HashSet<&str> = ids.iter().copied().collect();
        in_chunks(tx, &candidates, text_sql, |stmt, chunk| {
            let mut rows = stmt.query(params_from_iter(chunk))?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                if wanted.contains(id.as_str()) {
                    found.insert(id);
                }
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Records events just written in `tx` (`(messageId, seq)`), the head now `head`; merges
    /// the recent events into the index, in `tx`, when there are enough of them.
    pub fn written<'i>(
        &mut self,
        tx: &Transaction<'_>,
        events: impl Iterator<Item = (&'i str, i64)>,
        head: i64,
    ) -> Result<(), StoreError> {
        for (id, seq) in events {
            self.remember(self.hash(id.as_bytes()), seq);
        }
        self.head = head;
        if self.recent() >= merge_at(self.indexed, self.tuning.merge_min) {
            self.merge(tx)?;
        }
        Ok(())
    }

    /// Writes every recent event into the index, sorted so that each leaf page is visited once.
    fn merge(&mut self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let mut all: Vec<(i64, i64)> = self
            .tail
            .drain()
            .chain(self.more.drain(..))
            .map(|(h, s)| (h as i64, s))
            .collect();
        all.sort_unstable();
        insert_entries(tx, &all)?;
        let added = i64::try_from(all.len()).unwrap_or(i64::MAX);
        tx.execute(
            "UPDATE message_id_index SET indexed_through = ?1, entries = entries + ?2 WHERE id = 1",
            params![self.head, added],
        )?;
        self.indexed_through = self.head;
        self.indexed += added;
        Ok(())
    }
}

/// The index's hash key, last indexed `seq` and number of entries.
fn index_row(tx: &Transaction<'_>) -> Result<(SipHasher13, i64, i64), StoreError> {
    tx.query_row(
        "SELECT key0, key1, indexed_through, entries FROM message_id_index WHERE id = 1",
        [],
        |r| {
            Ok((
                SipHasher13::new_with_keys(r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64),
                r.get(2)?,
                r.get(3)?,
            ))
        },
    )
    .map_err(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => StoreError::Corrupt {
            table: "message_id_index",
            reason: "its row is missing".into(),
        },
        e => e.into(),
    })
}

/// Inserts index entries, sorted by hash.
fn insert_entries(tx: &Transaction<'_>, sorted: &[(i64, i64)]) -> Result<(), StoreError> {
    Ok(in_chunks(tx, sorted, insert_sql, |stmt, chunk| {
        stmt.execute(params_from_iter(chunk.iter().flat_map(|(h, s)| [h, s])))
            .map(|_| ())
    })?)
}

/// The messageId (column 1) of a row of `events`.
fn id_text<'r>(r: &'r rusqlite::Row<'_>) -> Result<&'r [u8], StoreError> {
    match r.get_ref(1)? {
        rusqlite::types::ValueRef::Text(t) => Ok(t),
        other => Err(StoreError::Corrupt {
            table: "events",
            reason: format!("a message_id of type {}", other.data_type()),
        }),
    }
}

/// Events indexed at a time by a migration (~16 bytes each in memory).
const MIGRATE_CHUNK: i64 = 1_000_000;

/// Creates the index's row with a fresh random key, unless it exists. `index_stored`: the head
/// of a store migrated from a unique messageId index, whose stored events are indexed here.
pub(crate) fn create(tx: &Transaction<'_>, index_stored: Option<i64>) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO message_id_index (id, key0, key1, indexed_through, entries) VALUES (1, ?1, ?2, 0, 0)
         ON CONFLICT (id) DO NOTHING",
        params![rand::random::<i64>(), rand::random::<i64>()],
    )?;
    let Some(head) = index_stored else {
        return Ok(());
    };
    let (hasher, _, _) = index_row(tx)?;
    let mut stmt =
        tx.prepare("SELECT seq, message_id FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let (mut after, mut entries) = (0_i64, 0_i64);
    loop {
        let mut chunk: Vec<(i64, i64)> = vec![];
        let mut rows = stmt.query([after, MIGRATE_CHUNK])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            chunk.push((hasher.hash(id_text(r)?) as i64, seq));
            after = seq;
        }
        if chunk.is_empty() {
            break;
        }
        chunk.sort_unstable();
        insert_entries(tx, &chunk)?;
        entries += i64::try_from(chunk.len()).unwrap_or(i64::MAX);
    }
    tx.execute(
        "UPDATE message_id_index SET indexed_through = ?1, entries = ?2 WHERE id = 1",
        params![head, entries],
    )?;
    Ok(())
}

/// The index probe of `n` hashes.
fn probe_sql(n: usize) -> String {
    format!(
        "SELECT seq FROM message_ids WHERE hash IN ({})",
        marks(n, 1)
    )
}

/// The messageIds of `n` events by seq.
fn text_sql(n: usize) -> String {
    format!(
        "SELECT message_id FROM events WHERE seq IN ({})",
        marks(n, 1)
    )
}

/// The insert of `n` index entries.
fn insert_sql(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| format!("({})", marks(2, 2 * i + 1)))
        .collect();
    format!(
        "INSERT INTO message_ids (hash, seq) VALUES {}",
        rows.join(", ")
    )
}

/// `n` numbered parameters from `?first`.
fn marks(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Tuning;
    use crate::event::{Event, ParseOptions};
    use crate::identity::Rules;
    use crate::store::{SqliteStore, Store};

    fn page(id: &str) -> Event {
        let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
        let v = json!({"type": "page", "messageId": id, "anonymousId": "a1", "name": "Home"});
        Event::from_json(&v, None, &opts).expect("valid test event")
    }

    fn pages(ids: impl IntoIterator<Item = String>) -> Vec<Event> {
        ids.into_iter().map(|id| page(&id)).collect()
    }

    /// A store whose hashes take 16 values and whose index merges every 40 events or more.
    fn narrow(path: &std::path::Path) -> SqliteStore {
        let mut s = SqliteStore::open(path, Rules::default()).unwrap();
        s.set_dedupe(Tuning {
            merge_min: 40,
            narrow: true,
        });
        s
    }

    fn indexed(path: &std::path::Path) -> (i64, i64) {
        let conn = rusqlite::Connection::open(path).unwrap();
        let through = conn
            .query_row("SELECT indexed_through FROM message_id_index", [], |r| {
                r.get(0)
            })
            .unwrap();
        let rows = conn
            .query_row("SELECT count(*) FROM message_ids", [], |r| r.get(0))
            .unwrap();
        (through, rows)
    }

    #[test]
    fn duplicates_are_found_in_memory_and_in_the_index_through_collisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut s = narrow(&path);
        // 100 ids in batches of 25: merges after the 2nd and 4th batch (40 or more recent).
        for b in 0..4 {
            let r = s
                .ingest(pages((0..25).map(|i| format!("id-{b}-{i}"))))
                .unwrap();
            assert_eq!((r.accepted, r.duplicates), (25, 0), "batch {b}");
        }
        let (through, rows) = indexed(&path);
        assert_eq!(rows, 100, "every event merged into the index");
        assert_eq!(through, s.head_seq().unwrap());
        // Stored ids (all in the index, sharing 16 hashes with 100 others) among new ones.
        let r = s
            .ingest(pages((0..30).flat_map(|i| {
                [format!("id-{}-{}", i % 4, i % 25), format!("new-{i}")]
            })))
            .unwrap();
        assert_eq!((r.accepted, r.duplicates), (30, 30));
        // The 30 new ones are in memory only: found there, and again after a reopen.
        let r = s
            .ingest(pages((0..30).map(|i| format!("new-{i}"))))
            .unwrap();
        assert_eq!((r.accepted, r.duplicates), (0, 30));
        drop(s);
        let mut s = narrow(&path);
        let r = s
            .ingest(pages(
                (0..30).map(|i| format!("new-{i}")).chain(["last".into()]),
            ))
            .unwrap();
        assert_eq!((r.accepted, r.duplicates), (1, 30));
        assert_eq!(s.event_count().unwrap(), 131);
    }

    #[test]
    fn a_write_that_is_not_committed_leaves_its_ids_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut s = narrow(&path);
        s.ingest(pages((0..10).map(|i| format!("kept-{i}"))))
            .unwrap();
        // 50 events: enough to merge, inside a transaction that is dropped.
        {
            let mut w = s.begin_write().unwrap();
            let r = w
                .ingest(pages((0..50).map(|i| format!("lost-{i}"))))
                .unwrap();
            assert_eq!(r.accepted, 50);
        }
        assert_eq!(indexed(&path), (0, 0), "the merge was rolled back");
        let r = s
            .ingest(pages(
                (0..50)
                    .map(|i| format!("lost-{i}"))
                    .chain((0..10).map(|i| format!("kept-{i}"))),
            ))
            .unwrap();
        assert_eq!((r.accepted, r.duplicates), (50, 10));
        assert_eq!(s.event_count().unwrap(), 60);
    }

    #[test]
    fn two_batches_in_one_transaction_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = narrow(&dir.path().join("s.db"));
        let mut w = s.begin_write().unwrap();
        let first = w.ingest(pages((0..45).map(|i| format!("a-{i}")))).unwrap();
        let second = w.ingest(pages((40..90).map(|i| format!("a-{i}")))).unwrap();
        w.commit().unwrap();
        assert_eq!(
            (first.accepted, second.accepted, second.duplicates),
            (45, 45, 5)
        );
        let r = s.ingest(pages((0..90).map(|i| format!("a-{i}")))).unwrap();
        assert_eq!((r.accepted, r.duplicates), (0, 90));
    }

    #[test]
    fn another_writer_s_events_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut a, mut b) = (narrow(&path), narrow(&path));
        a.ingest(pages((0..30).map(|i| format!("a-{i}")))).unwrap();
        b.ingest(pages((0..30).map(|i| format!("b-{i}")))).unwrap();
        let r = a
            .ingest(pages((0..30).map(|i| format!("b-{i}")).chain(["c".into()])))
            .unwrap();
        assert_eq!((r.accepted, r.duplicates), (1, 30));
        let r = b.ingest(pages((0..30).map(|i| format!("a-{i}")))).unwrap();
        assert_eq!((r.accepted, r.duplicates), (0, 30));
    }

    #[test]
    fn merges_grow_with_the_index() {
        assert_eq!(super::merge_at(0, 65_536), 65_536);
        assert_eq!(super::merge_at(8_000_000, 65_536), 1_000_000);
        assert_eq!(super::merge_at(1 << 40, 65_536), super::MERGE_MAX);
        assert_eq!(super::merge_at(0, 40), 40);
    }
}
