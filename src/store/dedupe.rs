//! The stores' messageId dedupe.
//!
//! A unique index on the messageId text costs a store about one random index page per event:
//! the ids Segment's SDKs send are random UUIDs, so the events of one commit land on as many
//! leaf pages of the index. SQLite's WAL then writes every page a commit touched whole (16 KiB):
//! with such ids the engine's SQLite ingest ran at 44k–52k events/s against ~120k with
//! sequential ones; PostgreSQL spent a third of its time on the index and its lookup. Instead:
//! - `message_id_entries` maps a keyed 64-bit hash of each messageId to its event's `seq`, for
//!   the events up to `message_id_index.indexed_through`. It is written in bulk, sorted, once
//!   enough events have come since the last merge ([`merge_at`]), so that a leaf page is written
//!   once per merge, not once per event. The entries are keyed by (run, hash, seq): a merge goes
//!   into the newest run until that holds [`Tuning::max_run`] entries, then starts a new one
//!   (`message_id_runs`). A merge into one index keyed by hash alone (store formats 2 and 3)
//!   landed on nearly every leaf page once the index held ~8M entries, rewriting all of it each
//!   time: the cost of a merge grew with the store. Now it grows with the newest run only, and a
//!   lookup probes every run instead of one, which the filter below makes rare;
//! - the events after `indexed_through` are held in memory by hash ([`RecentIds`]). They are
//!   read from `events` by a store's first write, caught up with the events another writer (an
//!   engine replica) committed since, and returned to their state before a write that was
//!   rolled back;
//! - a Bloom filter of the index's hashes sends only the ids whose hash may be there to the
//!   index (a probe per id cost PostgreSQL more than the rest of an event's ingest);
//! - a lookup probes both by hash and then compares the candidates' stored text, so a collision
//!   costs a read, never an event. The hash is SipHash-1-3 under a random key kept in the store:
//!   clients cannot choose ids that collide.
//!
//! The index and `indexed_through` move in the same transaction as the events, so a crash leaves
//! them consistent, and writers are serialized by the store's head lock; the memory part is
//! rebuilt from what was committed.

use std::collections::HashSet;

use foldhash::{HashMap, HashMapExt};
use siphasher::sip::SipHasher13;

use super::StoreError;

/// Fewest recent events to merge at once.
const MERGE_MIN: usize = 65_536;
/// Most recent events a PostgreSQL write merges ([`Tuning::merge_chunk`]), unless it wrote more
/// than half as many itself: ~30–40 ms on the bench's server, at most a few writes' worth
/// (the engine's writes of ~1,600 events waited ~120 ms behind a merge of 65k: the p99).
pub(crate) const PG_MERGE_CHUNK: usize = 16_384;
/// Most recent events held in memory (~40 bytes each) before a merge.
const MERGE_MAX: usize = 1_048_576;
/// Events indexed at a time by a migration (~16 bytes each in memory).
const MIGRATE_CHUNK: i64 = 1_000_000;
/// Entries of a run before merges start a new one: a merge rewrites at most the leaf pages of
/// this many (~100 MB of index on SQLite), and a lookup of an id the filter lets through
/// probes one run per this many events stored.
const MAX_RUN: i64 = 4_194_304;

/// How many recent events trigger a merge into an index of `indexed` entries: an eighth of it,
/// within bounds (the ids held in memory until then are capped at [`MERGE_MAX`]): a merge
/// writes each leaf page of the newest run it lands on for several new entries.
pub(crate) fn merge_at(indexed: i64, min: usize) -> usize {
    usize::try_from(indexed / 8)
        .unwrap_or(usize::MAX)
        .clamp(min, MERGE_MAX.max(min))
}

/// The index's row. The statements below serve both dialects: SQLite numbers `$n` parameters in
/// the order they first appear, so each names `$1` before `$2`.
pub(crate) const INDEX_ROW_SQL: &str =
    "SELECT key0, key1, indexed_through FROM message_id_index WHERE id = 1";
/// Creates the index's row with the key `$1`, `$2`, unless it exists.
pub(crate) const CREATE_INDEX_ROW_SQL: &str =
    "INSERT INTO message_id_index (id, key0, key1, indexed_through, entries)
     VALUES (1, $1, $2, 0, 0) ON CONFLICT (id) DO NOTHING";
/// Up to `$2` events after `$1`: their seq and messageId.
pub(crate) const EVENTS_AFTER_SQL: &str =
    "SELECT seq, message_id FROM events WHERE seq > $1 ORDER BY seq LIMIT $2";
/// Every hash in the index.
pub(crate) const INDEX_HASHES_SQL: &str = "SELECT hash FROM message_id_entries";
/// Up to `$4` entries of the index after the key (`$1`, `$2`, `$3`), in key order: (run, hash,
/// seq), a range of the primary key.
pub(crate) const ENTRIES_AFTER_SQL: &str = "SELECT run, hash, seq FROM message_id_entries
     WHERE (run, hash, seq) > ($1, $2, $3) ORDER BY run, hash, seq LIMIT $4";
/// Moves the index's extent: `indexed_through` to `$1`, `$2` more entries. The count is moved,
/// not set: a retention pass may have taken entries out since this writer read it.
const SET_EXTENT_SQL: &str =
    "UPDATE message_id_index SET indexed_through = $1, entries = entries + $2 WHERE id = 1";
/// The index's entries (the sum of its runs') and its oldest run (0 without one): a retention
/// pass that dropped runs (`store::retention`) changes both.
const EXTENT_SQL: &str =
    "SELECT CAST(coalesce(sum(entries), 0) AS BIGINT), coalesce(min(run), 0) FROM message_id_runs";
/// The index's runs, oldest first: (run, entries).
pub(crate) const RUNS_SQL: &str = "SELECT run, entries FROM message_id_runs ORDER BY run";
/// Records run `$1` of `$2` entries.
const ADD_RUN_SQL: &str = "INSERT INTO message_id_runs (run, entries) VALUES ($1, $2)";
/// Records `$1` more entries in run `$2`.
const GROW_RUN_SQL: &str = "UPDATE message_id_runs SET entries = entries + $1 WHERE run = $2";
/// Format 4: the index of a store of format 2 or 3 (`message_ids`, keyed by hash alone)
/// becomes run 0, and its table is dropped. An engine of an older format still writing to the
/// store (a rolling upgrade) then fails any write that needs the index, instead of missing
/// the entries of newer runs: its requests are answered with an error and retried by the
/// clients, on the newer engines.
pub(crate) const MOVE_LEGACY_INDEX_SQL: &str = "
INSERT INTO message_id_entries (run, hash, seq) SELECT 0, hash, seq FROM message_ids ORDER BY hash, seq;
INSERT INTO message_id_runs (run, entries) SELECT 0, count(*) FROM message_ids HAVING count(*) > 0;
DROP TABLE message_ids;
";

/// The entries of an index of these runs: the sum of theirs. A writer counts them so, not by
/// `message_id_index.entries`, which an engine older than retention's drops sets from its own
/// figure (during a rolling upgrade) and so would give back the entries dropped since; every
/// release moves a run's count by what it adds or deletes.
fn entries_of(runs: &[(i64, i64)]) -> i64 {
    runs.iter().map(|&(_, n)| n).sum()
}

/// What the dedupe needs of a store's open write transaction.
pub(crate) trait IndexTx {
    /// The index's hash key and `indexed_through`; `None` without its row. (Its count of
    /// entries is not read: writers sum the runs' counts, [`entries_of`].)
    fn index_row(&mut self) -> Result<Option<[i64; 3]>, StoreError>;
    /// Creates the index's row with this key, unless it exists.
    fn create_index_row(&mut self, key0: i64, key1: i64) -> Result<(), StoreError>;
    /// Calls `f(seq, messageId)` for up to `limit` events after `after`, in `seq` order.
    fn events_after(
        &mut self,
        after: i64,
        limit: i64,
        f: &mut dyn FnMut(i64, &str),
    ) -> Result<(), StoreError>;
    /// Calls `f` with every hash in the index.
    fn index_hashes(&mut self, f: &mut dyn FnMut(i64)) -> Result<(), StoreError>;
    /// Calls `f` with up to `limit` entries `[run, hash, seq]` after the key `after`, in key
    /// order ([`ENTRIES_AFTER_SQL`]).
    fn entries_after(
        &mut self,
        after: [i64; 3],
        limit: i64,
        f: &mut dyn FnMut([i64; 3]),
    ) -> Result<(), StoreError>;
    /// The index's runs, oldest first: (run, entries) ([`RUNS_SQL`]).
    fn runs(&mut self) -> Result<Vec<(i64, i64)>, StoreError>;
    /// Adds to `seqs` those the index holds under these hashes in these runs.
    fn probe(
        &mut self,
        hashes: &[i64],
        runs: &[i64],
        seqs: &mut Vec<i64>,
    ) -> Result<(), StoreError>;
    /// Calls `f` with the messageId of each event at these seqs.
    fn ids_at(&mut self, seqs: &[i64], f: &mut dyn FnMut(String)) -> Result<(), StoreError>;
    /// Adds entries `(hash, seq)`, sorted, to run `run`.
    fn add_entries(&mut self, run: i64, sorted: &[(i64, i64)]) -> Result<(), StoreError>;
    /// Runs one of the statements above with these parameters; the rows it changed.
    fn exec(&mut self, sql: &str, params: &[i64]) -> Result<u64, StoreError>;
    /// The rows of `sql` (two integer columns) with these parameters.
    fn pairs(&mut self, sql: &str, params: &[i64]) -> Result<Vec<(i64, i64)>, StoreError>;
}

/// The hashes in the index, as a Bloom filter: a lookup probes the index only for the ids whose
/// hash may be there: ~0.3 % of new ones at 16 bits an entry, the least it has until
/// [`BLOOM_MAX_BITS`] (built with 32 or more, rebuilt twice as large past 16); ~7 % at 5 bits an
/// entry, past 100M entries. A probe costs PostgreSQL about as much as all the rest of an
/// event's ingest.
struct Bloom {
    bits: Vec<u64>,
    /// Entries it was sized for; past them it is rebuilt twice as large.
    capacity: i64,
    /// Hashes put in it: past twice the index's entries (retention dropped runs whose hashes
    /// it still holds), it is rebuilt sized for the index.
    held: i64,
}

/// Most bits a Bloom filter gets (64 MiB).
const BLOOM_MAX_BITS: u64 = 1 << 29;
/// Fewest entries a Bloom filter is sized for (128 KiB).
const BLOOM_MIN_ENTRIES: i64 = 1 << 16;

/// Fewest index entries a write reads into a larger filter being filled ([`Filter::keep_up`]).
const GROW_STEP: i64 = 32_768;

#[cfg(test)]
thread_local! {
    /// Tests: how many times this thread read a whole index (or the rest of it) at once into
    /// a filter.
    pub(crate) static FILTER_BUILDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: how many times this thread's filters were replaced by a larger one filled a step
    /// at a time.
    pub(crate) static FILTER_GROWTHS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Tests: how many times a larger filter was started (a growth, or a growth begun again).
    pub(crate) static FILTER_STARTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Bloom {
    /// An empty filter for `entries` entries, or `min` if more.
    fn new(entries: i64, min: i64) -> Bloom {
        let want = u64::try_from(entries.max(min))
            .unwrap_or(u64::MAX)
            .saturating_mul(16)
            .checked_next_power_of_two()
            .unwrap_or(BLOOM_MAX_BITS)
            .min(BLOOM_MAX_BITS);
        Bloom {
            bits: vec![0; usize::try_from(want / 64).unwrap_or(1 << 23)],
            // At its largest it takes every entry, ever less precisely.
            capacity: if want == BLOOM_MAX_BITS {
                i64::MAX
            } else {
                i64::try_from(want / 16).unwrap_or(i64::MAX)
            },
            held: 0,
        }
    }

    /// The 4 bit positions of `hash` (double hashing on its two halves).
    fn positions(&self, hash: u64) -> [usize; 4] {
        let mask = (self.bits.len() as u64 * 64) - 1;
        let (h1, h2) = (hash, hash.rotate_left(32) | 1);
        [0_u64, 1, 2, 3].map(|i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
    }

    /// The filter of the index's `entries` hashes, with room for twice as many.
    fn of_index(tx: &mut dyn IndexTx, entries: i64, tuning: Tuning) -> Result<Bloom, StoreError> {
        #[cfg(test)]
        FILTER_BUILDS.with(|n| n.set(n.get() + 1));
        let mut bloom = Bloom::new(entries.saturating_mul(2), tuning.bloom_min());
        tx.index_hashes(&mut |h| bloom.insert(h as u64))?;
        Ok(bloom)
    }

    fn insert(&mut self, hash: u64) {
        for p in self.positions(hash) {
            self.bits[p / 64] |= 1 << (p % 64);
        }
        self.held = self.held.saturating_add(1);
    }

    fn may_contain(&self, hash: u64) -> bool {
        self.positions(hash)
            .iter()
            .all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0)
    }
}

/// The filter of the index's hashes, kept ahead of the index without reading the index whole
/// inside a write. Once the index holds more than half the entries the filter has room for, a
/// filter twice as large is started: every hash added from then on goes into both, and each
/// write reads the next entries of the index into the larger one, in key order (at least
/// [`Tuning::grow_step`], and twice the `seq`s committed since the previous write's step).
/// Once it has read to the end of the index, it replaces the smaller one. Entries another
/// writer adds behind the point reached reach it as every hash does: through the catch-up with
/// that writer's events. Only an index that reaches twice the filter's room first (a filter at
/// 8 bits an entry) has the rest read at once; into a filter sized for it, begun again, when
/// the growth under way was sized for an index smaller than half of it.
///
/// Rebuilt whole inside the write that outgrew it instead, as it was before, the filter made
/// that write take 5 s near 17M entries on SQLite, and on PostgreSQL each engine replica had
/// such a write in turn, each holding the head lock.
struct Filter {
    bloom: Bloom,
    growing: Option<Growing>,
    /// The head at the previous step.
    stepped_at: i64,
}

/// A larger filter being filled from the index.
struct Growing {
    next: Bloom,
    /// The key of the last entry read into it: `[run, hash, seq]`.
    after: [i64; 3],
}

impl Filter {
    /// The filter of the index's `entries` hashes, read whole, at head `head`.
    fn of_index(
        tx: &mut dyn IndexTx,
        entries: i64,
        head: i64,
        tuning: Tuning,
    ) -> Result<Filter, StoreError> {
        Ok(Filter {
            bloom: Bloom::of_index(tx, entries, tuning)?,
            growing: None,
            stepped_at: head,
        })
    }

    fn insert(&mut self, hash: u64) {
        self.bloom.insert(hash);
        if let Some(g) = &mut self.growing {
            g.next.insert(hash);
        }
    }

    fn may_contain(&self, hash: u64) -> bool {
        self.bloom.may_contain(hash)
    }

    /// Whether an index of `indexed` entries is past twice this filter's room (8 bits an
    /// entry): [`Filter::keep_up`] then reads the rest of the index at once.
    fn outgrown(&self, indexed: i64) -> bool {
        indexed > self.bloom.capacity.saturating_mul(2)
    }

    /// A write's step, the index now of `indexed` entries and the head `head`: starts a larger
    /// filter when the index fills half this one's room, reads the next entries into it, and
    /// makes it the filter once it has them all.
    fn keep_up(
        &mut self,
        tx: &mut dyn IndexTx,
        indexed: i64,
        head: i64,
        tuning: Tuning,
    ) -> Result<(), StoreError> {
        let room = self.bloom.capacity;
        let outgrown = self.outgrown(indexed);
        let since = head.saturating_sub(self.stepped_at);
        self.stepped_at = head;
        let start = |entries: i64| {
            #[cfg(test)]
            FILTER_STARTS.with(|n| n.set(n.get() + 1));
            Growing {
                next: Bloom::new(entries, tuning.bloom_min()),
                after: [i64::MIN; 3],
            }
        };
        let larger = room.max(indexed).saturating_mul(2);
        let growing = match &mut self.growing {
            // Begun for an index since outgrown (a writer catching up after another merged
            // much): the larger filter would be too small for the index once filled, and
            // another growth would follow at once, a second pass over the index. The index is
            // read whole now anyway: into a filter sized for it.
            Some(g) if outgrown && indexed > g.next.capacity / 2 => {
                *g = start(larger);
                g
            }
            Some(g) => g,
            None if indexed > room / 2 => self.growing.insert(start(larger)),
            // Holding more than twice the index: retention dropped runs whose hashes it still
            // holds, which send ids to the index for nothing (and, the filter at its largest,
            // ever more of them). A filter sized for the index as it is, filled the same way.
            None if self.bloom.held > indexed.max(tuning.bloom_min()).saturating_mul(2) => {
                self.growing.insert(start(indexed.saturating_mul(2)))
            }
            None => return Ok(()),
        };
        let limit = if outgrown {
            #[cfg(test)]
            FILTER_BUILDS.with(|n| n.set(n.get() + 1));
            i64::MAX
        } else {
            tuning.grow_step.max(since.saturating_mul(2))
        };
        let (next, after) = (&mut growing.next, &mut growing.after);
        let mut read = 0_i64;
        // Entry by entry, so that what was read and the key it reached agree even when the
        // read fails part way.
        tx.entries_after(*after, limit, &mut |key| {
            next.insert(key[1] as u64);
            *after = key;
            read += 1;
        })?;
        if read < limit
            && let Some(done) = self.growing.take()
        {
            #[cfg(test)]
            FILTER_GROWTHS.with(|n| n.set(n.get() + 1));
            self.bloom = done.next;
        }
        Ok(())
    }
}

/// Test settings of a store's dedupe; the defaults everywhere else.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// Fewest recent events to merge at once.
    pub merge_min: usize,
    /// Most recent events a write merges (more only to keep at most [`MERGE_MAX`] in memory,
    /// or twice the write's own events, so that writes larger than a chunk keep the index up
    /// with them): PostgreSQL's merge costs per entry (~2.5 µs each on the bench server, a
    /// million in one write held every writer ~3 s), so it merges a part at a time, one per
    /// write; SQLite's costs per page of the run it lands on, so it merges everything at once.
    pub merge_chunk: usize,
    /// Entries of a run before merges start a new one.
    pub max_run: i64,
    /// Fewest index entries a write reads into a larger filter being filled.
    pub grow_step: i64,
    /// Hashes cut to 4 bits, so that collisions happen all the time.
    #[cfg(test)]
    pub narrow: bool,
    /// Filters sized for 32 entries or more, so that they fill and grow every few merges.
    #[cfg(test)]
    pub small_filters: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            merge_min: MERGE_MIN,
            merge_chunk: usize::MAX,
            max_run: MAX_RUN,
            grow_step: GROW_STEP,
            #[cfg(test)]
            narrow: false,
            #[cfg(test)]
            small_filters: false,
        }
    }
}

impl Tuning {
    /// Fewest entries a filter is sized for.
    fn bloom_min(&self) -> i64 {
        #[cfg(test)]
        if self.small_filters {
            return 32;
        }
        BLOOM_MIN_ENTRIES
    }
}

/// A store's dedupe state between its write transactions.
#[derive(Default)]
pub(crate) struct Dedupe {
    /// The messageIds since the index's last merge, as of the last commit (or of before a
    /// rolled-back write); `None` when they must be read (first write, a failed read).
    pub committed: Option<RecentIds>,
    pub tuning: Tuning,
    /// What retention's steps on this handle know of the index's oldest run
    /// (`store::retention::prune_ids_in`).
    pub oldest_run_top: super::retention::RunTop,
}

impl Dedupe {
    /// Test settings.
    #[cfg(test)]
    pub fn set_tuning(&mut self, tuning: Tuning) {
        self.tuning = tuning;
        self.committed = None;
    }

    /// Tests: the hashes the filter holds and the index's entries, as of the last write.
    #[cfg(test)]
    pub fn filter_held(&self) -> Option<(i64, i64)> {
        self.committed
            .as_ref()
            .map(|r| (r.filter.bloom.held, r.indexed))
    }
}

/// The messageIds of the events after the last merge, by hash, and what the store's index holds.
pub(crate) struct RecentIds {
    /// The head `seq` these reflect.
    pub head: i64,
    /// Keyed with the index's key.
    hasher: SipHasher13,
    /// The last `seq` the index covers.
    indexed_through: i64,
    /// Entries in the index.
    indexed: i64,
    /// The index's runs, oldest first: (run, entries).
    runs: Vec<(i64, i64)>,
    /// Recent events: hash → seq.
    tail: HashMap<u64, i64>,
    /// Recent events whose hash was already in `tail` (a collision).
    more: Vec<(u64, i64)>,
    /// The index's hashes.
    filter: Filter,
    tuning: Tuning,
    /// `head`, `indexed_through`, `indexed` and the runs when the current write transaction
    /// took these: what a rollback returns to ([`RecentIds::rolled_back`]).
    at_start: (i64, i64, i64, Vec<(i64, i64)>),
    /// Whether the current write transaction began a merge (which takes the recent events out
    /// of memory).
    merging: bool,
}

fn missing_row() -> StoreError {
    StoreError::Corrupt {
        table: "message_id_index",
        reason: "its row is missing".into(),
    }
}

impl RecentIds {
    /// The recent messageIds as of `head`, the head `tx` locked: `known` when it is there
    /// already, `known` caught up with the events committed since (by another writer) when it
    /// is behind, else read afresh.
    pub fn at_head(
        known: Option<RecentIds>,
        tx: &mut dyn IndexTx,
        head: i64,
        tuning: Tuning,
    ) -> Result<RecentIds, StoreError> {
        let known = match known {
            Some(r) if r.head == head => return Ok(r),
            other => other,
        };
        let [key0, key1, indexed_through] = tx.index_row()?.ok_or_else(missing_row)?;
        let runs = tx.runs()?;
        let indexed = entries_of(&runs);
        let mut ids = match known {
            Some(mut r)
                if r.head < head
                    && r.hasher.keys() == (key0 as u64, key1 as u64)
                    && indexed_through >= r.indexed_through =>
            {
                if indexed_through > r.indexed_through {
                    // Another writer merged: what it indexed leaves memory for the filter.
                    r.indexed_up_to(indexed_through);
                }
                r.indexed_through = indexed_through;
                r.indexed = indexed;
                r.runs = runs;
                let after = r.head;
                r.read_events(tx, after)?;
                // Far behind (another writer merged a lot since): the larger filter now,
                // before this write's lookups, rather than a probe for nearly every id.
                if r.filter.outgrown(r.indexed) {
                    r.filter.keep_up(tx, r.indexed, head, tuning)?;
                }
                r
            }
            _ => {
                let mut r = RecentIds {
                    head,
                    hasher: SipHasher13::new_with_keys(key0 as u64, key1 as u64),
                    indexed_through,
                    indexed,
                    runs,
                    tail: HashMap::new(),
                    more: vec![],
                    filter: Filter::of_index(tx, indexed, head, tuning)?,
                    tuning,
                    at_start: (head, indexed_through, indexed, vec![]),
                    merging: false,
                };
                r.read_events(tx, indexed_through)?;
                r
            }
        };
        ids.head = head;
        Ok(ids)
    }

    /// Follows the index's entries and runs when a retention pass (on another handle or
    /// replica, which moves no head) dropped runs since this writer read them: read once per
    /// transaction, so that the filter is rebuilt smaller once it holds mostly dropped hashes,
    /// and runs dropped before the write began are not probed (one dropped during it may be:
    /// it finds no event either way).
    pub fn follow_extent(&mut self, tx: &mut dyn IndexTx) -> Result<(), StoreError> {
        let (entries, oldest) = tx
            .pairs(EXTENT_SQL, &[])?
            .first()
            .copied()
            .ok_or_else(missing_row)?;
        if entries != self.indexed || self.runs.first().map_or(0, |&(run, _)| run) != oldest {
            self.indexed = entries;
            self.runs = tx.runs()?;
        }
        Ok(())
    }

    /// Marks the start of a write transaction.
    fn began(&mut self) {
        self.at_start = (
            self.head,
            self.indexed_through,
            self.indexed,
            self.runs.clone(),
        );
        self.merging = false;
    }

    /// These ids as they were when the write transaction that took them began, for one that was
    /// rolled back: its own events leave memory, and after a merge (the recent events left
    /// memory for the index) they are all read again from `events`, as a writer catches up
    /// with another's. The filter keeps what the transaction added: it may only ever send an
    /// id to the index for nothing. A store's next write then need not rebuild it from the
    /// whole index. Also right when the transaction did land after all (a commit whose outcome
    /// was unknown): its events are read back as another writer's would be.
    pub fn rolled_back(mut self) -> RecentIds {
        let (head, indexed_through, indexed, runs) = std::mem::take(&mut self.at_start);
        if self.merging {
            self.tail.clear();
            self.more.clear();
            self.head = indexed_through;
        } else {
            self.tail.retain(|_, seq| *seq <= head);
            self.more.retain(|(_, seq)| *seq <= head);
            self.head = head;
        }
        self.indexed_through = indexed_through;
        self.indexed = indexed;
        self.runs = runs;
        self.merging = false;
        self
    }

    /// Remembers the events after `after`: in memory those after `indexed_through`, in the
    /// filter those another writer merged already.
    fn read_events(&mut self, tx: &mut dyn IndexTx, after: i64) -> Result<(), StoreError> {
        // Streamed: a writer catching up after a long idle time keeps in memory only what is
        // not indexed yet, at most a merge's worth.
        tx.events_after(after, i64::MAX, &mut |seq, id| {
            let h = self.hash(id.as_bytes());
            if seq > self.indexed_through {
                self.remember(h, seq);
            } else {
                self.filter.insert(h);
            }
        })
    }

    /// Moves the recent events the index now holds (up to `through`) from memory to the filter.
    fn indexed_up_to(&mut self, through: i64) {
        let filter = &mut self.filter;
        let mut keep = |h: u64, seq: i64| {
            if seq > through {
                return true;
            }
            filter.insert(h);
            false
        };
        self.tail.retain(|h, seq| keep(*h, *seq));
        self.more.retain(|(h, seq)| keep(*h, *seq));
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
        match self.tail.get(&hash) {
            Some(&taken) if taken != seq => self.more.push((hash, seq)),
            _ => {
                self.tail.insert(hash, seq);
            }
        }
    }

    fn recent(&self) -> usize {
        self.tail.len() + self.more.len()
    }

    /// Which of `ids` are stored (committed, or written earlier in `tx`).
    pub fn existing(
        &self,
        tx: &mut dyn IndexTx,
        ids: &[&str],
    ) -> Result<HashSet<String>, StoreError> {
        // Tests: every lookup first checks that the filter holds every hash of the index that
        // names a stored event (a hash missing from it would let a duplicate be stored). Those
        // of events retention deleted may be missing: a writer that catches up reads the
        // events, and finds none of them; their lookups would find no event anyway.
        #[cfg(test)]
        {
            let index = "SELECT hash, seq FROM message_id_entries WHERE seq > coalesce(
                (SELECT pruned_through FROM event_retention WHERE id = 1), 0)";
            let missing: Vec<(i64, i64)> = tx
                .pairs(index, &[])?
                .into_iter()
                .filter(|&(h, _)| !self.filter.may_contain(h as u64))
                .collect();
            assert!(missing.is_empty(), "the filter misses {missing:?}");
        }
        let mut candidates: Vec<i64> = vec![];
        let mut probes: Vec<i64> = vec![];
        for id in ids {
            let h = self.hash(id.as_bytes());
            candidates.extend(self.tail.get(&h));
            if !self.more.is_empty() {
                candidates.extend(self.more.iter().filter(|(m, _)| *m == h).map(|(_, s)| *s));
            }
            if self.filter.may_contain(h) {
                probes.push(h as i64);
            }
        }
        if !probes.is_empty() && !self.runs.is_empty() {
            let runs: Vec<i64> = self.runs.iter().map(|&(run, _)| run).collect();
            tx.probe(&probes, &runs, &mut candidates)?;
        }
        let mut found = HashSet::new();
        if candidates.is_empty() {
            return Ok(found);
        }
        // The candidates' text: a hash can be shared by another id.
        let wanted: HashSet<&str> = ids.iter().copied().collect();
        tx.ids_at(&candidates, &mut |id| {
            if wanted.contains(id.as_str()) {
                found.insert(id);
            }
        })?;
        Ok(found)
    }

    /// Records events just written in `tx` (`(messageId, seq)`), the head now `head`; merges
    /// the recent events into the index, in `tx`, when there are enough of them.
    pub fn written<'i>(
        &mut self,
        tx: &mut dyn IndexTx,
        events: impl Iterator<Item = (&'i str, i64)>,
        head: i64,
    ) -> Result<(), StoreError> {
        let mut written = 0;
        for (id, seq) in events {
            self.remember(self.hash(id.as_bytes()), seq);
            written += 1;
        }
        self.head = head;
        // Only with events: a merge must move the head, which other writers go by.
        if written > 0 && self.recent() >= merge_at(self.indexed, self.tuning.merge_min) {
            self.merge(tx, written)?;
        }
        self.filter.keep_up(tx, self.indexed, head, self.tuning)
    }

    /// Writes the recent events into the index, sorted so that each leaf page is visited once:
    /// all of them, or the oldest [`Tuning::merge_chunk`] (or twice the `written` events of
    /// this write, and enough more to leave at most [`MERGE_MAX`] in memory), the index then
    /// covering the events up to the last of those.
    fn merge(&mut self, tx: &mut dyn IndexTx, written: usize) -> Result<(), StoreError> {
        self.merging = true;
        // (seq, hash): a part is cut by seq.
        let mut all: Vec<(i64, i64)> = self
            .tail
            .iter()
            .map(|(&h, &s)| (s, h as i64))
            .chain(self.more.iter().map(|&(h, s)| (s, h as i64)))
            .collect();
        let take = self
            .tuning
            .merge_chunk
            .max(written.saturating_mul(2))
            .max(all.len().saturating_sub(MERGE_MAX));
        let through = if take < all.len() {
            // The `take`-th smallest seq; the ones before it are the smaller ones.
            let (_, &mut (through, _), _) = all.select_nth_unstable(take - 1);
            all.truncate(take);
            self.tail.retain(|_, s| *s > through);
            self.more.retain(|&(_, s)| s > through);
            through
        } else {
            self.tail.clear();
            self.more.clear();
            self.head
        };
        let mut all: Vec<(i64, i64)> = all.into_iter().map(|(s, h)| (h, s)).collect();
        all.sort_unstable();
        let added = i64::try_from(all.len()).unwrap_or(i64::MAX);
        add_to_runs(tx, &mut self.runs, &all, self.tuning.max_run)?;
        if tx.exec(SET_EXTENT_SQL, &[through, added])? != 1 {
            return Err(missing_row());
        }
        self.indexed_through = through;
        self.indexed += added;
        for (h, _) in &all {
            self.filter.insert(*h as u64);
        }
        Ok(())
    }
}

/// Adds `sorted` entries to the index: to its newest run while that holds fewer than `max_run`
/// entries, else as a new run after `runs` (the index's, oldest first); `runs` follows.
fn add_to_runs(
    tx: &mut dyn IndexTx,
    runs: &mut Vec<(i64, i64)>,
    sorted: &[(i64, i64)],
    max_run: i64,
) -> Result<(), StoreError> {
    if sorted.is_empty() {
        return Ok(());
    }
    let entries = i64::try_from(sorted.len()).unwrap_or(i64::MAX);
    match runs.last_mut() {
        Some((run, held)) if *held < max_run => {
            tx.add_entries(*run, sorted)?;
            // A run the store does not record would never be probed by the other writers:
            // refuse the write rather than hide its entries.
            if tx.exec(GROW_RUN_SQL, &[entries, *run])? != 1 {
                return Err(StoreError::Corrupt {
                    table: "message_id_runs",
                    reason: format!("run {run} is not recorded"),
                });
            }
            *held += entries;
        }
        last => {
            let run = last.map_or(1, |&mut (run, _)| run + 1);
            tx.add_entries(run, sorted)?;
            tx.exec(ADD_RUN_SQL, &[run, entries])?;
            runs.push((run, entries));
        }
    }
    Ok(())
}

/// A write transaction's recent messageIds as of `head`, the head it locked: its own (`own`),
/// else the store's (`committed`), taken by the transaction's first ingest (which marks where
/// a rollback returns them to), and moved on to `head`.
pub(crate) fn in_tx<'r>(
    own: &'r mut Option<RecentIds>,
    committed: &mut Option<RecentIds>,
    tx: &mut dyn IndexTx,
    head: i64,
    tuning: Tuning,
) -> Result<&'r mut RecentIds, StoreError> {
    let starting = own.is_none();
    let known = own.take().or_else(|| committed.take());
    // Taken as they are (no other writer since): only then can a retention pass, which moves
    // no head, have changed the runs unseen; catching up or reading afresh reads them anyway.
    let current = known.as_ref().is_some_and(|r| r.head == head);
    let mut recent = RecentIds::at_head(known, tx, head, tuning)?;
    if starting {
        recent.began();
    }
    let recent = own.insert(recent);
    if starting && current {
        // Held by the transaction meanwhile: if this read fails, the ids go back to the store
        // as they were (`TxIds`' drop), not read whole again by its next write.
        recent.follow_extent(tx)?;
    }
    Ok(recent)
}

/// A write transaction's recent messageIds: the store's as of its last commit, taken by its
/// first ingest ([`TxIds::at`]); given back moved on by its commit ([`TxIds::committed`]), or
/// as they were when it began when it is dropped uncommitted ([`RecentIds::rolled_back`]).
pub(crate) struct TxIds<'a> {
    store: &'a mut Option<RecentIds>,
    own: Option<RecentIds>,
}

impl<'a> TxIds<'a> {
    /// The ids of a transaction on the store whose ids are `store`.
    pub fn new(store: &'a mut Option<RecentIds>) -> TxIds<'a> {
        TxIds { store, own: None }
    }

    /// The ids as of `head`, the head the transaction locked ([`in_tx`]).
    pub fn at(
        &mut self,
        tx: &mut dyn IndexTx,
        head: i64,
        tuning: Tuning,
    ) -> Result<&mut RecentIds, StoreError> {
        in_tx(&mut self.own, self.store, tx, head, tuning)
    }

    /// The transaction committed: its ids become the store's.
    pub fn committed(&mut self) {
        if let Some(own) = self.own.take() {
            *self.store = Some(own);
        }
    }
}

impl Drop for TxIds<'_> {
    fn drop(&mut self) {
        if let Some(own) = self.own.take() {
            *self.store = Some(own.rolled_back());
        }
    }
}

/// Whether the store has the index (format 2 or later).
pub(crate) fn exists(tx: &mut dyn IndexTx) -> Result<bool, StoreError> {
    Ok(tx.index_row()?.is_some())
}

/// Creates the index's row with a fresh random key and indexes the events already stored (a
/// store migrated from a unique messageId index), a million at a time; `head` is the store's.
/// Runs in the transaction that creates the tables, before any index exists.
pub(crate) fn create(tx: &mut dyn IndexTx, head: i64) -> Result<(), StoreError> {
    tx.create_index_row(rand::random(), rand::random())?;
    let [key0, key1, _] = tx.index_row()?.ok_or_else(missing_row)?;
    let mut added = 0_i64;
    let hasher = SipHasher13::new_with_keys(key0 as u64, key1 as u64);
    let mut runs = tx.runs()?;
    let mut after = 0_i64;
    loop {
        let mut chunk: Vec<(i64, i64)> = vec![];
        tx.events_after(after, MIGRATE_CHUNK, &mut |seq, id| {
            chunk.push((hasher.hash(id.as_bytes()) as i64, seq));
            after = seq;
        })?;
        if chunk.is_empty() {
            break;
        }
        chunk.sort_unstable();
        added += i64::try_from(chunk.len()).unwrap_or(i64::MAX);
        add_to_runs(tx, &mut runs, &chunk, MAX_RUN)?;
    }
    tx.exec(SET_EXTENT_SQL, &[head, added]).map(drop)
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::Tuning;
    use crate::event::{Event, ParseOptions};
    use crate::identity::Rules;
    use crate::store::{PostgresStore, SqliteStore, Store};

    use crate::test_pg as pg;

    fn page(id: &str) -> Event {
        let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
        let v = json!({"type": "page", "messageId": id, "anonymousId": "a1", "name": "Home"});
        Event::from_json(&v, None, &opts).expect("valid test event")
    }

    fn pages(ids: impl IntoIterator<Item = String>) -> Vec<Event> {
        ids.into_iter().map(|id| page(&id)).collect()
    }

    /// Where a test's store lives: an SQLite file or a PostgreSQL database.
    pub(crate) enum Place {
        Lite(tempfile::TempDir),
        Pg(String),
    }

    impl Place {
        pub(crate) fn new(kind: &str) -> Place {
            match kind {
                "sqlite" => Place::Lite(tempfile::tempdir().unwrap()),
                _ => {
                    let server = pg::shared();
                    Place::Pg(server.url(&server.create_database("dedupe")))
                }
            }
        }

        /// A store whose hashes take 16 values and whose index merges every 40 events or more.
        fn open(&self) -> Opened {
            self.open_with(true)
        }

        /// A store whose index merges every 40 events or more, its hashes `narrow` or not.
        pub(crate) fn open_with(&self, narrow: bool) -> Opened {
            self.open_tuned(Tuning {
                merge_min: 40,
                merge_chunk: usize::MAX,
                max_run: 200,
                grow_step: 8,
                narrow,
                small_filters: false,
            })
        }

        fn open_tuned(&self, tuning: Tuning) -> Opened {
            match self {
                Place::Lite(dir) => {
                    let mut s =
                        SqliteStore::open(&dir.path().join("s.db"), Rules::default()).unwrap();
                    s.set_dedupe(tuning);
                    Opened::Lite(s)
                }
                Place::Pg(url) => {
                    let mut s = PostgresStore::connect(url, Rules::default()).unwrap();
                    s.set_dedupe(tuning);
                    Opened::Pg(s)
                }
            }
        }

        /// Makes the store refuse a Track event named "poison", as a DBA's constraint would.
        pub(crate) fn refuse_poison(&self) {
            match self {
                Place::Lite(dir) => rusqlite::Connection::open(dir.path().join("s.db"))
                    .unwrap()
                    .execute_batch(
                        "CREATE TRIGGER no_poison BEFORE INSERT ON events WHEN NEW.event = 'poison'
                         BEGIN SELECT RAISE(ABORT, 'poison refused'); END;",
                    )
                    .unwrap(),
                Place::Pg(url) => ::postgres::Client::connect(url, ::postgres::NoTls)
                    .unwrap()
                    .batch_execute(
                        "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (event IS DISTINCT FROM 'poison')",
                    )
                    .unwrap(),
            }
        }

        /// Runs `sql` (statements without results) on a connection of its own.
        pub(crate) fn raw(&self, sql: &str) {
            match self {
                Place::Lite(dir) => rusqlite::Connection::open(dir.path().join("s.db"))
                    .unwrap()
                    .execute_batch(sql)
                    .unwrap(),
                Place::Pg(url) => ::postgres::Client::connect(url, ::postgres::NoTls)
                    .unwrap()
                    .batch_execute(sql)
                    .unwrap(),
            }
        }

        /// Rows of two integers.
        fn pairs(&self, sql: &str) -> Vec<(i64, i64)> {
            match self {
                Place::Lite(dir) => {
                    let conn = rusqlite::Connection::open(dir.path().join("s.db")).unwrap();
                    let mut stmt = conn.prepare(sql).unwrap();
                    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect()
                }
                Place::Pg(url) => ::postgres::Client::connect(url, ::postgres::NoTls)
                    .unwrap()
                    .query(sql, &[])
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect(),
            }
        }

        /// Rows of one text column.
        fn strings(&self, sql: &str) -> Vec<String> {
            match self {
                Place::Lite(dir) => {
                    let conn = rusqlite::Connection::open(dir.path().join("s.db")).unwrap();
                    let mut stmt = conn.prepare(sql).unwrap();
                    stmt.query_map([], |r| r.get(0))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect()
                }
                Place::Pg(url) => ::postgres::Client::connect(url, ::postgres::NoTls)
                    .unwrap()
                    .query(sql, &[])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            }
        }

        /// The runs as recorded, and as counted in the index's rows: (run, entries), oldest first.
        fn runs(&self) -> (Runs, Runs) {
            (
                self.pairs(super::RUNS_SQL),
                self.pairs(
                    "SELECT run, count(*) FROM message_id_entries GROUP BY run ORDER BY run",
                ),
            )
        }

        /// Deletes the events up to the `n`th stored, as retention's steps do, then the index's
        /// runs that indexed only deleted events, `max` entries a step, through `s`: the entries
        /// deleted.
        fn retire(&self, s: &mut Opened, n: usize, max: usize) -> u64 {
            self.retire_events(s, n);
            let mut deleted = 0;
            // A run of n entries goes in n / max steps or one more.
            for _ in 0..100_000 {
                let step = s.store().prune_message_ids(max).unwrap();
                deleted += step.deleted;
                if step.done {
                    return deleted;
                }
            }
            panic!("the index's runs were never all dropped");
        }

        /// Deletes the events up to the `n`th stored, as retention's steps do, through `s`; the
        /// cut it took.
        fn retire_events(&self, s: &mut Opened, n: usize) -> crate::store::Keep {
            let nth = format!(
                "SELECT seq, CAST(0 AS BIGINT) FROM events ORDER BY seq LIMIT 1 OFFSET {}",
                n - 1
            );
            let keep = crate::store::Keep {
                min_age_seconds: 0,
                now_us: 1 << 50,
                head: self.pairs(&nth)[0].0,
            };
            while !s.store().prune_events(&keep, 1_000).unwrap().done {}
            keep
        }

        /// The index's `indexed_through` and its number of rows.
        fn indexed(&self) -> (i64, i64) {
            self.pairs(
                "SELECT (SELECT indexed_through FROM message_id_index),
                        (SELECT count(*) FROM message_id_entries)",
            )[0]
        }

        /// The index's number of rows, asserting it is exact after `batch`: every event at or
        /// before `indexed_through` has its entry, none after does.
        fn indexed_exactly(&self, batch: i64) -> i64 {
            let (through, entries) = self.indexed();
            let count = |sql: String| self.pairs(&sql)[0].0;
            let at_or_before = "SELECT count(*), 0 * count(*) FROM events WHERE seq <= ";
            assert_eq!(
                entries,
                count(format!("{at_or_before}{through}")),
                "batch {batch}"
            );
            let after = "SELECT count(*), 0 * count(*) FROM message_id_entries WHERE seq > ";
            assert_eq!(count(format!("{after}{through}")), 0, "batch {batch}");
            entries
        }
    }

    /// An index's runs: (run, entries), oldest first.
    type Runs = Vec<(i64, i64)>;

    /// The value of one of the test-only counters (`FILTER_BUILDS`, the resolvers' `RESTORES`
    /// and `CATCH_UPS`) on this thread.
    pub(crate) fn count(counter: &'static std::thread::LocalKey<std::cell::Cell<usize>>) -> usize {
        counter.with(std::cell::Cell::get)
    }

    #[allow(clippy::large_enum_variant)] // a test's one or two stores
    pub(crate) enum Opened {
        Lite(SqliteStore),
        Pg(PostgresStore),
    }

    impl Opened {
        pub(crate) fn store(&mut self) -> &mut dyn Store {
            match self {
                Opened::Lite(s) => s,
                Opened::Pg(s) => s,
            }
        }

        /// The hashes its filter holds and the index's entries, as of its last write.
        fn filter_held(&self) -> (i64, i64) {
            match self {
                Opened::Lite(s) => s.dedupe().filter_held(),
                Opened::Pg(s) => s.dedupe().filter_held(),
            }
            .expect("a store that wrote")
        }

        /// (accepted, duplicates) of one ingest.
        pub(crate) fn ingest(&mut self, events: Vec<Event>) -> (usize, usize) {
            let r = self.store().ingest(events).unwrap();
            (r.accepted, r.duplicates)
        }

        /// Ingests `events` in a transaction that is dropped without a commit; what it accepted.
        fn ingest_uncommitted(&mut self, events: Vec<Event>) -> usize {
            match self {
                Opened::Lite(s) => s.begin_write().unwrap().ingest(events).unwrap().accepted,
                Opened::Pg(s) => s.begin_write().unwrap().ingest(events).unwrap().accepted,
            }
        }

        /// Ingests `good` then `bad` in one transaction and commits it: the second ingest's
        /// error and the commit's outcome.
        fn commit_after_failure(
            &mut self,
            good: Vec<Event>,
            bad: Vec<Event>,
        ) -> (String, Result<(), crate::store::StoreError>) {
            match self {
                Opened::Lite(s) => {
                    let mut w = s.begin_write().unwrap();
                    w.ingest(good).unwrap();
                    let e = format!("{:?}", w.ingest(bad).unwrap_err());
                    (e, w.commit())
                }
                Opened::Pg(s) => {
                    let mut w = s.begin_write().unwrap();
                    w.ingest(good).unwrap();
                    let e = format!("{:?}", w.ingest(bad).unwrap_err());
                    (e, w.commit())
                }
            }
        }

        /// Two ingests in one transaction, committed.
        fn ingest_twice(&mut self, a: Vec<Event>, b: Vec<Event>) -> [(usize, usize); 2] {
            let pair = |r: crate::store::IngestSummary| (r.accepted, r.duplicates);
            match self {
                Opened::Lite(s) => {
                    let mut w = s.begin_write().unwrap();
                    let out = [pair(w.ingest(a).unwrap()), pair(w.ingest(b).unwrap())];
                    w.commit().unwrap();
                    out
                }
                Opened::Pg(s) => {
                    let mut w = s.begin_write().unwrap();
                    let out = [pair(w.ingest(a).unwrap()), pair(w.ingest(b).unwrap())];
                    w.commit().unwrap();
                    out
                }
            }
        }
    }

    /// Runs each named test function on an SQLite and on a PostgreSQL store.
    macro_rules! both {
        ($($name:ident),* $(,)?) => {
            mod sqlite { $( #[test] fn $name() { super::$name("sqlite"); } )* }
            mod postgres { $( #[test] fn $name() { super::$name("postgres"); } )* }
        };
    }
    pub(crate) use both;

    both!(
        duplicates_are_found_in_memory_and_in_the_index_through_collisions,
        a_write_that_is_not_committed_leaves_its_ids_free,
        two_batches_in_one_transaction_see_each_other,
        another_writer_s_events_and_merges_are_seen,
        another_writer_s_merges_reach_the_filter,
        a_write_whose_ingest_failed_is_rolled_back_by_its_commit,
        a_rolled_back_write_keeps_the_filter,
        filters_grow_with_the_index_and_miss_nothing,
        a_growth_outgrown_during_a_catch_up_starts_again_sized_for_the_index,
        three_writers_at_random_agree_with_a_model,
        merges_fill_runs_and_every_run_is_probed,
        a_version_3_index_becomes_the_first_run,
        a_rolled_back_merge_that_started_a_run_leaves_no_trace,
        merges_in_parts_keep_the_index_exact,
        writes_larger_than_a_chunk_keep_the_index_up,
        retention_drops_the_runs_of_deleted_events_and_the_filter_follows,
        a_failed_step_of_retention_leaves_no_entry_behind,
        writers_and_retention_at_random_agree_with_a_model,
        the_newest_run_stays_whoever_it_indexes,
        a_step_of_usize_max_entries_drops_a_run,
        a_count_an_older_engine_set_is_not_believed,
        a_run_half_dropped_is_taken_up_in_steps_of_max,
        a_write_whose_count_could_not_be_read_keeps_the_filter,
        steps_of_zero_entries_end,
    );

    /// Retention deleted the events up to the 1,800th of 2,000: the index's runs that indexed
    /// only those go (at most one run's worth of their entries stays, in the run that also
    /// indexes kept events), its count follows, kept ids are still duplicates and deleted ones
    /// new again. The writer's filter, which still holds the dropped hashes, is rebuilt sized
    /// for what is left; a fresh writer agrees.
    fn retention_drops_the_runs_of_deleted_events_and_the_filter_follows(kind: &str) {
        // A filter's growth reads the whole index in the write it begins in.
        let tuning = Tuning {
            grow_step: 1 << 20,
            ..growing_tuning()
        };
        let place = Place::new(kind);
        let mut s = place.open_tuned(tuning);
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        for i in (0..2_000).step_by(50) {
            assert_eq!(s.ingest(ids(i, i + 50)), (50, 0));
        }
        let entries = |place: &Place| {
            place.pairs("SELECT entries, CAST(0 AS BIGINT) FROM message_id_index")[0].0
        };
        let (before, runs_before) = (entries(&place), place.runs().0.len());
        assert!(runs_before >= 8, "{runs_before} runs");
        let deleted = place.retire(&mut s, 1_800, 64);
        let horizon = s.store().pruned().unwrap().through_seq;
        let (recorded, counted) = place.runs();
        assert_eq!(recorded, counted, "the runs as recorded and as stored");
        assert!(recorded.len() < runs_before - 5, "{recorded:?}");
        let oldest_top = place.pairs(&format!(
            "SELECT max(seq), CAST(0 AS BIGINT) FROM message_id_entries WHERE run = {}",
            recorded[0].0
        ))[0]
            .0;
        assert!(
            oldest_top > horizon,
            "run {} indexes only deleted events",
            recorded[0].0
        );
        let dead = place.pairs(&format!(
            "SELECT count(*), CAST(0 AS BIGINT) FROM message_id_entries WHERE seq <= {horizon}"
        ))[0]
            .0;
        assert!(dead < 200, "{dead} entries of deleted events left");
        assert_eq!(
            entries(&place),
            place.indexed().1,
            "the count follows the rows"
        );
        assert_eq!(entries(&place) + i64::try_from(deleted).unwrap(), before);
        let (held, _) = s.filter_held();
        assert!(held >= 1_800, "the filter held {held} hashes");
        let started = count(&super::FILTER_STARTS);
        assert_eq!(
            s.ingest(ids(1_900, 1_950)),
            (0, 50),
            "kept ids are duplicates"
        );
        assert_eq!(s.ingest(ids(0, 50)), (50, 0), "deleted ids are new again");
        // The filter is rebuilt from what the index holds now.
        assert!(count(&super::FILTER_STARTS) > started, "no smaller filter");
        let (held, indexed) = (s.filter_held().0, entries(&place));
        assert!(
            held <= 2 * indexed,
            "the filter holds {held} hashes for {indexed}"
        );
        assert_eq!(s.ingest(ids(1_800, 1_850)), (0, 50));
        let mut fresh = place.open_tuned(tuning);
        assert_eq!(fresh.ingest(ids(1_950, 2_000)), (0, 50));
        assert_eq!(fresh.ingest(ids(50, 60)), (10, 0));
        assert_eq!(place.runs().0, place.runs().1);
    }

    /// A step that fails (here the index's count refused, as a full disk or a lost connection
    /// would fail it) deleted nothing, and the next steps start where the last committed one
    /// ended: every entry of the dropped runs goes, none is left in a run no longer recorded.
    fn a_failed_step_of_retention_leaves_no_entry_behind(kind: &str) {
        let (place, mut s) = retired_900_of_1000(kind);
        let step = s.store().prune_message_ids(30).unwrap();
        assert!(step.deleted > 0 && !step.done, "{step:?}");
        match &place {
            Place::Lite(_) => place.raw(
                "CREATE TRIGGER refuse BEFORE UPDATE ON message_id_index
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            ),
            Place::Pg(_) => place.raw(
                "ALTER TABLE message_id_index ADD CONSTRAINT refuse CHECK (entries > 1000000) NOT VALID",
            ),
        }
        assert!(s.store().prune_message_ids(30).is_err());
        match &place {
            Place::Lite(_) => place.raw("DROP TRIGGER refuse"),
            Place::Pg(_) => place.raw("ALTER TABLE message_id_index DROP CONSTRAINT refuse"),
        }
        while !s.store().prune_message_ids(30).unwrap().done {}
        let (recorded, counted) = place.runs();
        assert_eq!(recorded, counted, "entries left in runs no longer recorded");
        let entries = place.pairs("SELECT entries, CAST(0 AS BIGINT) FROM message_id_index")[0].0;
        assert_eq!(entries, place.indexed().1);
        assert!(recorded.len() <= 2, "{recorded:?}");
    }

    /// PostgreSQL: a writer that read the index's count as its write began, and merges after
    /// another handle's retention dropped a run meanwhile, adds to the count as it is then:
    /// set from the writer's own figure, the count would take the dropped entries back.
    #[test]
    fn postgres_a_run_dropped_during_a_write_leaves_the_count_right() {
        let place = Place::new("postgres");
        let (mut a, mut b) = (place.open_with(false), place.open_with(false));
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        for i in (0..1_000).step_by(100) {
            assert_eq!(a.ingest(ids(i, i + 100)), (100, 0));
        }
        let keep = place.retire_events(&mut b, 900);
        let Opened::Pg(a) = &mut a else {
            unreachable!()
        };
        let mut w = a.begin_write().unwrap();
        // Only duplicates: the write takes the head and reads the count, and merges nothing.
        assert_eq!(w.ingest(ids(950, 960)).unwrap().duplicates, 10);
        let mut dropped = 0;
        loop {
            let step = b.store().prune_message_ids(1_000).unwrap();
            dropped += step.deleted;
            if step.done {
                break;
            }
        }
        assert!(dropped > 0);
        // Enough to merge.
        assert_eq!(w.ingest(ids(1_000, 1_300)).unwrap().accepted, 300);
        w.commit().unwrap();
        let (through, rows) = place.indexed();
        assert!(through > keep.head, "no merge");
        let entries = place.pairs("SELECT entries, CAST(0 AS BIGINT) FROM message_id_index")[0].0;
        assert_eq!(entries, rows);
    }

    /// 1,000 events in runs of 200, the first 900 deleted by retention.
    fn retired_900_of_1000(kind: &str) -> (Place, Opened) {
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        for i in (0..1_000).step_by(100) {
            assert_eq!(s.ingest(ids(i, i + 100)), (100, 0));
        }
        place.retire_events(&mut s, 900);
        (place, s)
    }

    /// A step asked for as many entries as there may be (`usize::MAX`) deletes the oldest run
    /// whole (the hash-range width `2^64 * max / entries` must not overflow).
    fn a_step_of_usize_max_entries_drops_a_run(kind: &str) {
        let (place, mut s) = retired_900_of_1000(kind);
        let runs = place.runs().0.len();
        let step = s.store().prune_message_ids(usize::MAX).unwrap();
        assert!(step.dropped_run && step.deleted > 0, "{step:?}");
        assert_eq!(place.runs().0.len(), runs - 1);
    }

    /// During a rolling upgrade an engine older than retention's drops sets the index's count
    /// from its own figure at each merge, giving back the entries dropped since: writers count
    /// the runs' entries instead, which every release moves by what it adds or deletes.
    fn a_count_an_older_engine_set_is_not_believed(kind: &str) {
        let (place, mut s) = retired_900_of_1000(kind);
        while !s.store().prune_message_ids(1_000).unwrap().done {}
        place.raw("UPDATE message_id_index SET entries = entries + 800");
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        assert_eq!(s.ingest(ids(2_000, 2_010)), (10, 0));
        assert_eq!(s.filter_held().1, place.indexed().1, "the writer's count");
        let mut fresh = place.open_with(false);
        assert_eq!(fresh.ingest(ids(3_000, 3_001)), (1, 0));
        assert_eq!(
            fresh.filter_held().1,
            place.indexed().1,
            "a new writer's count"
        );
    }

    /// A run half dropped through one handle is taken up by another (a replica, or the engine
    /// after a restart) in steps of about `max` too: steps share the hashes left, not the whole
    /// range of them (a step then deleted twice `max` or more, holding SQLite's lock as long).
    fn a_run_half_dropped_is_taken_up_in_steps_of_max(kind: &str) {
        let place = Place::new(kind);
        let tuning = Tuning {
            max_run: 2_000,
            ..growing_tuning()
        };
        let (mut a, mut b) = (place.open_tuned(tuning), place.open_tuned(tuning));
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        for i in (0..5_000).step_by(500) {
            assert_eq!(a.ingest(ids(i, i + 500)), (500, 0));
        }
        place.retire_events(&mut a, 4_500);
        for _ in 0..5 {
            assert!(!a.store().prune_message_ids(200).unwrap().done);
        }
        let mut steps = vec![place.indexed().1];
        while !b.store().prune_message_ids(200).unwrap().done {
            steps.push(place.indexed().1);
            assert!(steps.len() < 100, "{steps:?}");
        }
        let deleted: Vec<i64> = steps.windows(2).map(|w| w[0] - w[1]).collect();
        assert!(
            deleted.iter().all(|&n| n <= 300),
            "entries deleted a step: {deleted:?}"
        );
        assert_eq!(place.runs().0, place.runs().1);
    }

    /// A write that fails as it reads the index's count (once per write) gives the writer's
    /// ids back as they were: its next write does not read the whole index into a new filter.
    fn a_write_whose_count_could_not_be_read_keeps_the_filter(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        for i in (0..300).step_by(100) {
            assert_eq!(s.ingest(ids(i, i + 100)), (100, 0));
        }
        let built = count(&super::FILTER_BUILDS);
        place.raw("ALTER TABLE message_id_runs RENAME TO runs_away");
        assert!(s.store().ingest(ids(300, 310)).is_err());
        place.raw("ALTER TABLE runs_away RENAME TO message_id_runs");
        assert_eq!(s.ingest(ids(300, 310)), (10, 0));
        assert_eq!(s.ingest(ids(0, 10)), (0, 10));
        assert_eq!(
            count(&super::FILTER_BUILDS),
            built,
            "the filter was read again"
        );
    }

    /// Steps of `max` 0 end (a step of 0 works as one of 1; a range one hash wide would take
    /// a run 2^64 steps).
    fn steps_of_zero_entries_end(kind: &str) {
        let (place, mut s) = retired_900_of_1000(kind);
        for _ in 0..10_000 {
            if s.store().prune_message_ids(0).unwrap().done {
                let (recorded, counted) = place.runs();
                assert_eq!(recorded, counted);
                return;
            }
        }
        panic!(
            "10,000 steps of max 0 and the runs are still not dropped: {:?}",
            place.runs()
        );
    }

    /// Every event deleted: the newest run stays (merges still land there), with its entries,
    /// which now name no event: their ids are new again.
    fn the_newest_run_stays_whoever_it_indexes(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        for i in (0..1_000).step_by(100) {
            assert_eq!(s.ingest(ids(i, i + 100)), (100, 0));
        }
        let newest = *place.runs().0.last().unwrap();
        place.retire(&mut s, 1_000, 1_000);
        assert_eq!(place.runs().0, vec![newest]);
        assert_eq!(place.runs().1, vec![newest]);
        assert_eq!(s.ingest(ids(990, 1_000)), (10, 0));
    }

    /// Stores that merge once 40 recent ids wait, at most 16 at a time (unless a write wrote
    /// more than 8).
    fn in_parts_of_16() -> Tuning {
        Tuning {
            merge_min: 40,
            merge_chunk: 16,
            max_run: 200,
            grow_step: 8,
            narrow: false,
            small_filters: false,
        }
    }

    /// Merges of at most 16 ids (PostgreSQL's take at most 16,384, or twice a write's events):
    /// once 40 recent ids wait, each write merges the 16 oldest, and the index then covers
    /// exactly the events up to the last one merged: each event at or before `indexed_through`
    /// has its entry, none after does. Every id is found again, by the writer and by a fresh
    /// one.
    fn merges_in_parts_keep_the_index_exact(kind: &str) {
        let place = Place::new(kind);
        let tuning = in_parts_of_16();
        let mut s = place.open_tuned(tuning);
        let (mut parts, mut before) = (0, 0);
        for batch in 0..30 {
            let ids = (0..7).map(|i| format!("id-{batch}-{i}"));
            assert_eq!(s.ingest(pages(ids)), (7, 0));
            let entries = place.indexed_exactly(batch);
            assert!(
                entries - before <= 16,
                "batch {batch} merged {}",
                entries - before
            );
            parts += usize::from(entries - before == 16);
            before = entries;
        }
        assert!(parts >= 8, "{parts} merges of 16");
        let again = || pages((0..30).flat_map(|b| (0..7).map(move |i| format!("id-{b}-{i}"))));
        assert_eq!(s.ingest(again()), (0, 210));
        assert_eq!(place.open_tuned(tuning).ingest(again()), (0, 210));
    }

    /// Writes of more events than half a merge chunk merge twice their own events when a merge
    /// is due, so the events not yet indexed stay within the merge threshold and a write,
    /// instead of growing by the difference at every write until [`MERGE_MAX`] are in memory.
    fn writes_larger_than_a_chunk_keep_the_index_up(kind: &str) {
        let place = Place::new(kind);
        let tuning = in_parts_of_16();
        let mut s = place.open_tuned(tuning);
        for batch in 0..30 {
            let ids = (0..20).map(|i| format!("id-{batch}-{i}"));
            assert_eq!(s.ingest(pages(ids)), (20, 0));
            // Parts of twice the write cut the index exactly too.
            let entries = place.indexed_exactly(batch);
            let unindexed = (batch + 1) * 20 - entries;
            let threshold = i64::try_from(super::merge_at(entries, 40)).unwrap();
            assert!(
                unindexed < threshold + 20,
                "batch {batch}: {unindexed} events not indexed"
            );
        }
        let again = || pages((0..30).flat_map(|b| (0..20).map(move |i| format!("id-{b}-{i}"))));
        assert_eq!(s.ingest(again()), (0, 600));
        assert_eq!(place.open_tuned(tuning).ingest(again()), (0, 600));
    }

    /// A dropped write whose merge started a new run: the run leaves memory with it, so the
    /// next merge starts that run again for real, recorded, and every writer probes it.
    /// (Found by a review: a run kept in memory but never recorded was probed only by the
    /// writer that made it, and its ids were stored again by any other.)
    fn a_rolled_back_merge_that_started_a_run_leaves_no_trace(kind: &str) {
        let ids = |p: &str, n: usize| pages((0..n).map(|i| format!("{p}-{i}")));
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        for b in 0..5 {
            s.ingest(ids(&format!("kept{b}"), 41));
        }
        assert_eq!(place.runs().0, vec![(1, 205)]);
        // Its merge starts run 2, and the write is dropped.
        assert_eq!(s.ingest_uncommitted(ids("lost", 41)), 41);
        assert_eq!(place.runs().0, vec![(1, 205)]);
        s.ingest(ids("next", 41));
        let (recorded, counted) = place.runs();
        assert_eq!(recorded, vec![(1, 205), (2, 41)]);
        assert_eq!(recorded, counted);
        assert_eq!(place.open_with(false).ingest(ids("next", 41)), (0, 41));
    }

    /// Merges fill the newest run until it holds `max_run` entries (200 here), then start
    /// another. Every run is probed: each stored id is found again, whichever run holds it.
    fn merges_fill_runs_and_every_run_is_probed(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        for batch in 0..24 {
            let ids = (0..41).map(|i| format!("id-{batch}-{i}"));
            assert_eq!(s.ingest(pages(ids)), (41, 0));
            let (recorded, counted) = place.runs();
            assert_eq!(recorded, counted, "after batch {batch}");
            // Every run but the newest is full: it took merges until it held 200 or more.
            if let Some((_, full)) = recorded.split_last() {
                assert!(full.iter().all(|&(_, n)| n >= 200), "{recorded:?}");
            }
            let total: i64 = recorded.iter().map(|&(_, n)| n).sum();
            assert_eq!(place.indexed().1, total);
        }
        let (runs, _) = place.runs();
        assert!(runs.len() >= 3, "{runs:?}");
        // A fresh writer (its filter read from the index) finds every id, in whichever run.
        let mut fresh = place.open_with(false);
        let again = (0..24).flat_map(|b| (0..41).map(move |i| format!("id-{b}-{i}")));
        assert_eq!(
            fresh.ingest(pages(again.chain(["new".into()]))),
            (1, 24 * 41)
        );
    }

    /// A store of version 2 or 3 keeps its messageId index in `message_ids`, keyed by hash:
    /// opened, its entries become run 0 and the table is gone (so that an older engine still
    /// running fails the writes that need the index rather than miss newer runs); its ids are
    /// still found, and merges go on into run 0.
    fn a_version_3_index_becomes_the_first_run(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        assert_eq!(
            s.ingest(pages((0..45).map(|i| format!("old-{i}")))),
            (45, 0)
        );
        drop(s);
        assert_eq!(place.indexed().1, 45);
        let (without_rowid, version) = match kind {
            "sqlite" => (" WITHOUT ROWID", "PRAGMA user_version = 3;"),
            _ => (
                "",
                "DELETE FROM store_schema; INSERT INTO store_schema VALUES (3);",
            ),
        };
        place.raw(&format!(
            "CREATE TABLE message_ids (hash BIGINT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (hash, seq)){without_rowid};
             INSERT INTO message_ids SELECT hash, seq FROM message_id_entries;
             DROP TABLE message_id_entries; DROP TABLE message_id_runs; {version}"
        ));
        let mut s = place.open_with(false);
        assert_eq!(place.runs(), (vec![(0, 45)], vec![(0, 45)]));
        let legacy = match kind {
            "sqlite" => "SELECT count(*), 0 FROM sqlite_master WHERE name = 'message_ids'",
            _ => "SELECT count(*), 0::bigint FROM pg_class WHERE relname = 'message_ids'",
        };
        assert_eq!(place.pairs(legacy), vec![(0, 0)]);
        let again = (0..45).map(|i| format!("old-{i}"));
        let new = (0..41).map(|i| format!("new-{i}"));
        assert_eq!(s.ingest(pages(again.chain(new))), (41, 45));
        // The 41 new ones merged into run 0, which held fewer than 200.
        assert_eq!(place.runs().0, vec![(0, 86)]);
    }

    /// Small filters that grow a step of 8 entries at a time, merges of 40 and more.
    fn growing_tuning() -> Tuning {
        Tuning {
            merge_min: 40,
            merge_chunk: usize::MAX,
            max_run: 200,
            grow_step: 8,
            narrow: false,
            small_filters: true,
        }
    }

    /// Filters sized for 32 entries fill after a merge or two. A writer's grows a step at a
    /// time: once the index fills half its room, each write reads 8 more entries into a filter
    /// twice as large, which replaces it once it has them all; no write reads the whole index.
    /// A writer that catches up with an index past twice its filter's room reads the rest at
    /// once. Neither misses a stored id after.
    fn filters_grow_with_the_index_and_miss_nothing(kind: &str) {
        let builds = || count(&super::FILTER_BUILDS);
        let growths = || count(&super::FILTER_GROWTHS);
        let tuning = growing_tuning();
        let place = Place::new(kind);
        let (mut a, mut b) = (place.open_tuned(tuning), place.open_tuned(tuning));
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        b.ingest(ids(0, 1));
        // a's first write reads the index (empty yet) into its filter.
        a.ingest(ids(1, 2));
        let (before, grown) = (builds(), growths());
        for i in 2..400 {
            assert_eq!(a.ingest(ids(i, i + 1)), (1, 0), "event {i}");
        }
        let (through, entries) = place.indexed();
        assert!(entries >= 320, "{entries} indexed");
        assert_eq!(builds(), before, "a write read the whole index");
        assert!(
            growths() - grown >= 3,
            "a's filter grew {} times",
            growths() - grown
        );
        assert_eq!(a.ingest(ids(0, 400)), (0, 400));
        // b catches up past twice its filter's room: it reads the rest at once.
        let before = builds();
        assert_eq!(b.ingest(ids(0, 400)), (0, 400));
        assert!(builds() > before, "b kept a filter too small for the index");
        assert_eq!(b.ingest(ids(0, 400)), (0, 400));
        assert_eq!(place.indexed(), (through, entries));
    }

    /// A writer whose filter is growing a step at a time, catching up after another writer
    /// merged past twice its room, begins the growth again sized for the index and reads the
    /// index once, in that write. Before, it filled the larger filter sized when its growth
    /// began, too small for the index, and read the whole index a second time into another.
    fn a_growth_outgrown_during_a_catch_up_starts_again_sized_for_the_index(kind: &str) {
        let (builds, growths, starts) = (
            || count(&super::FILTER_BUILDS),
            || count(&super::FILTER_GROWTHS),
            || count(&super::FILTER_STARTS),
        );
        let tuning = growing_tuning();
        let place = Place::new(kind);
        let (mut a, mut b) = (place.open_tuned(tuning), place.open_tuned(tuning));
        let ids = |from: usize, to: usize| pages((from..to).map(|i| format!("id-{i}")));
        a.ingest(ids(0, 1));
        // b alone, an event a write, until its filter starts growing; its steps of 8 then
        // take several writes.
        let (mut next, before) = (1, starts());
        while starts() == before {
            assert!(next < 1_000, "b's filter never started growing");
            assert_eq!(b.ingest(ids(next, next + 1)), (1, 0));
            next += 1;
        }
        assert!(b.ingest(ids(next, next + 1)) == (1, 0) && starts() == before + 1);
        next += 1;
        // a merges far past b's room.
        assert_eq!(a.ingest(ids(next, next + 600)), (600, 0));
        next += 600;
        let (built, grown) = (builds(), growths());
        assert_eq!(b.ingest(ids(next, next + 1)), (1, 0));
        next += 1;
        assert_eq!(
            (builds() - built, growths() - grown),
            (1, 1),
            "b's catch-up read the index whole other than once into one larger filter"
        );
        let begun = starts();
        for i in 0..3 {
            assert_eq!(b.ingest(ids(next + i, next + i + 1)), (1, 0));
        }
        assert_eq!(starts(), begun, "b's filter began growing again at once");
        next += 3;
        assert_eq!(b.ingest(ids(0, next)), (0, next));
        assert_eq!(a.ingest(ids(0, next)), (0, next));
    }

    pub(crate) fn poison() -> Event {
        let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
        let v = json!({"type": "track", "messageId": "p", "userId": "u1", "event": "poison"});
        Event::from_json(&v, None, &opts).unwrap()
    }

    /// A write that fails or is dropped gives the store its messageIds back as they were, so
    /// the next write does not read the whole index again to rebuild the filter, and finds
    /// exactly the committed ids, those in memory included: after rollbacks with a merge in
    /// them and without.
    fn a_rolled_back_write_keeps_the_filter(kind: &str) {
        let builds = || count(&super::FILTER_BUILDS);
        let ids = |prefix: &str, n: usize| pages((0..n).map(|i| format!("{prefix}-{i}")));
        let place = Place::new(kind);
        let mut s = place.open_with(false);
        s.ingest(ids("kept", 50));
        assert_eq!(place.indexed().1, 50, "merged");
        // In memory only, until a merge.
        s.ingest(ids("recent", 5));
        place.refuse_poison();
        let before = builds();
        // With the 5 recent ones, 40 events merge before the poison fails the write; 10 do not.
        for n in [40, 10] {
            let (_, commit) = s.commit_after_failure(ids("lost", n), vec![poison()]);
            assert!(commit.is_err());
            assert_eq!(s.ingest_uncommitted(ids("dropped", n)), n);
            assert_eq!(place.indexed().1, 50, "{n}: nothing merged");
        }
        s.ingest(ids("new", 5));
        assert_eq!(builds(), before, "the filter was rebuilt from the index");
        let mut again = ids("kept", 50);
        again.extend(ids("recent", 5));
        again.extend(ids("lost", 40));
        again.extend(ids("dropped", 40));
        again.extend(ids("new", 5));
        assert_eq!(s.ingest(again), (80, 60));
        assert_eq!(s.store().event_count().unwrap(), 140);
        // That write merged: one entry per event, none left over from the rolled-back writes.
        let head = s.store().head_seq().unwrap();
        assert_eq!(place.indexed(), (head, 140));
        assert_eq!(builds(), before);
        // Nor in the runs: what the rolled-back merges added to run 1 went with them.
        let (recorded, counted) = place.runs();
        assert_eq!(recorded, counted);
        assert_eq!(recorded.iter().map(|&(_, n)| n).sum::<i64>(), 140);
    }

    /// Three writers on one store take random steps — batches mixing new ids, stored ids and
    /// repeats; writes dropped without a commit; reopens — with narrow and with real hashes,
    /// with small filters, merging every 40 events: each batch's counts and the stored total
    /// must match a model.
    /// Two writers and a separate retention handle (as the engine's reader pool has) at random:
    /// partial event steps, partial index steps, rolled-back writes, reopened handles, random
    /// tuning. Each write's counts match a model of the events kept (a deleted id is new again,
    /// a kept one a duplicate), the runs and the index count match the rows, and after a full
    /// index prune the entries of deleted events fit in two runs (review).
    fn writers_and_retention_at_random_agree_with_a_model(kind: &str) {
        use rand::{Rng, SeedableRng};
        let seeds = if kind == "postgres" { 0..1 } else { 0..12 };
        for seed in seeds {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let tuning = Tuning {
                merge_min: rng.random_range(5..50),
                merge_chunk: [usize::MAX, 7, 16][rng.random_range(0..3)],
                max_run: rng.random_range(10..80),
                grow_step: rng.random_range(1..10),
                narrow: rng.random_bool(0.3),
                small_filters: rng.random_bool(0.7),
            };
            let place = Place::new(kind);
            let mut writers: Vec<Opened> = (0..2).map(|_| place.open_tuned(tuning)).collect();
            let mut pruner = place.open_tuned(tuning);
            let mut next = 0;
            let mut all_ids: Vec<String> = vec![];
            for step in 0..300 {
                let w = rng.random_range(0..writers.len());
                let action = rng.random_range(0..20);
                if action == 0 {
                    writers[w] = place.open_tuned(tuning);
                    continue;
                }
                if action == 1 {
                    pruner = place.open_tuned(tuning);
                    continue;
                }
                if (2..5).contains(&action) {
                    // Retention: the events up to a stored one, in partial steps.
                    let n = place.pairs("SELECT count(*), CAST(0 AS BIGINT) FROM events")[0].0;
                    if n > 0 {
                        let k = rng.random_range(0..n);
                        let head = place.pairs(&format!(
                            "SELECT seq, CAST(0 AS BIGINT) FROM events ORDER BY seq LIMIT 1 OFFSET {k}"
                        ))[0]
                            .0;
                        let keep = crate::store::Keep {
                            min_age_seconds: 0,
                            now_us: 1 << 50,
                            head,
                        };
                        for _ in 0..rng.random_range(1..4) {
                            let max = rng.random_range(1..30);
                            if pruner.store().prune_events(&keep, max).unwrap().done {
                                break;
                            }
                        }
                    }
                    for _ in 0..rng.random_range(0..6) {
                        let max = rng.random_range(1..40);
                        if pruner.store().prune_message_ids(max).unwrap().done {
                            break;
                        }
                    }
                    continue;
                }
                let stored: std::collections::HashSet<String> = place
                    .strings("SELECT message_id FROM events")
                    .into_iter()
                    .collect();
                let mut ids: Vec<String> = vec![];
                for _ in 0..rng.random_range(1..30) {
                    let pick = rng.random_range(0..10);
                    if pick < 5 || all_ids.is_empty() {
                        next += 1;
                        ids.push(format!("id-{seed}-{next}"));
                        all_ids.push(format!("id-{seed}-{next}"));
                    } else if pick < 9 {
                        ids.push(all_ids[rng.random_range(0..all_ids.len())].clone());
                    } else if let Some(last) = ids.last().cloned() {
                        ids.push(last);
                    }
                }
                if action == 5 {
                    writers[w].ingest_uncommitted(pages(ids));
                    continue;
                }
                let mut fresh: Vec<&String> = vec![];
                for id in &ids {
                    if !stored.contains(id) && !fresh.contains(&id) {
                        fresh.push(id);
                    }
                }
                let expected = (fresh.len(), ids.len() - fresh.len());
                assert_eq!(
                    writers[w].ingest(pages(ids.clone())),
                    expected,
                    "seed {seed}, step {step}, writer {w}, tuning {tuning:?}"
                );
                let (mut recorded, counted) = place.runs();
                // A run its partial steps emptied keeps its row until the next step.
                recorded.retain(|&(_, n)| n != 0);
                assert_eq!(recorded, counted, "seed {seed}, step {step}: runs");
                let entries =
                    place.pairs("SELECT entries, CAST(0 AS BIGINT) FROM message_id_index")[0].0;
                assert_eq!(
                    entries,
                    place.indexed().1,
                    "seed {seed}, step {step}: count"
                );
            }
            while !pruner.store().prune_message_ids(1000).unwrap().done {}
            let (recorded, _) = place.runs();
            let horizon = pruner.store().pruned().unwrap().through_seq;
            let dead = place.pairs(&format!(
                "SELECT count(*), CAST(0 AS BIGINT) FROM message_id_entries WHERE seq <= {horizon}"
            ))[0]
                .0;
            let two_runs: i64 = recorded.iter().rev().take(2).map(|&(_, n)| n).sum();
            assert!(
                dead <= two_runs,
                "seed {seed}: {dead} dead entries, runs {recorded:?}"
            );
        }
    }

    fn three_writers_at_random_agree_with_a_model(kind: &str) {
        use rand::{Rng, SeedableRng};
        // The third with filters that fill and grow every few merges.
        // The fourth merging 7 ids at a time, or twice a write's own if more (most writes).
        for (seed, narrow, small_filters, merge_chunk) in [
            (1_u64, true, false, usize::MAX),
            (2, false, false, usize::MAX),
            (3, false, true, usize::MAX),
            (4, true, true, 7),
        ] {
            let tuning = Tuning {
                merge_min: 40,
                merge_chunk,
                max_run: 200,
                grow_step: 8,
                narrow,
                small_filters,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let place = Place::new(kind);
            let mut writers: Vec<Opened> = (0..3).map(|_| place.open_tuned(tuning)).collect();
            let mut stored: Vec<String> = vec![];
            let mut next = 0;
            for step in 0..120 {
                let w = rng.random_range(0..writers.len());
                let action = rng.random_range(0..10);
                if action == 0 {
                    writers[w] = place.open_tuned(tuning);
                    continue;
                }
                let mut ids: Vec<String> = vec![];
                for _ in 0..rng.random_range(1..40) {
                    let pick = rng.random_range(0..10);
                    if pick < 6 || stored.is_empty() {
                        next += 1;
                        ids.push(format!("id-{seed}-{next}"));
                    } else if pick < 9 {
                        ids.push(stored[rng.random_range(0..stored.len())].clone());
                    } else if let Some(last) = ids.last().cloned() {
                        ids.push(last);
                    }
                }
                if action == 1 {
                    writers[w].ingest_uncommitted(pages(ids));
                    continue;
                }
                // Retention, through one of the writers' handles: the model keeps what is left.
                if action == 2 && !stored.is_empty() {
                    let n = rng.random_range(1..=stored.len());
                    place.retire(&mut writers[w], n, rng.random_range(1..100));
                    // `stored` is in the order the events were stored in, their `seq`s'.
                    stored.drain(..n);
                    continue;
                }
                let known: std::collections::HashSet<&String> = stored.iter().collect();
                let mut fresh: Vec<String> = vec![];
                for id in &ids {
                    if !known.contains(id) && !fresh.contains(id) {
                        fresh.push(id.clone());
                    }
                }
                let expected = (fresh.len(), ids.len() - fresh.len());
                assert_eq!(
                    writers[w].ingest(pages(ids)),
                    expected,
                    "seed {seed}, step {step}, writer {w}"
                );
                stored.extend(fresh);
            }
            let count = writers[0].store().event_count().unwrap();
            assert_eq!(count, i64::try_from(stored.len()).unwrap(), "seed {seed}");
            let entries = place.pairs("SELECT entries, CAST(0 AS BIGINT) FROM message_id_index");
            assert_eq!(
                entries[0].0,
                place.indexed().1,
                "seed {seed}: the index's count"
            );
            let (recorded, counted) = place.runs();
            assert_eq!(
                recorded, counted,
                "seed {seed}: the runs as recorded and as stored"
            );
        }
    }

    fn a_write_whose_ingest_failed_is_rolled_back_by_its_commit(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open();
        s.ingest(pages((0..30).map(|i| format!("kept-{i}"))));
        place.refuse_poison();
        let poison = {
            let opts = ParseOptions::new(jiff::Timestamp::UNIX_EPOCH, "src");
            let v = json!({"type": "track", "messageId": "p", "userId": "u1", "event": "poison"});
            Event::from_json(&v, None, &opts).unwrap()
        };
        // 15 more would merge the 45 recent ids; the poison fails the second ingest.
        let (error, commit) =
            s.commit_after_failure(pages((0..15).map(|i| format!("more-{i}"))), vec![poison]);
        assert!(error.contains("poison"), "{error}");
        assert!(
            matches!(commit, Err(crate::store::StoreError::FailedWrite)),
            "{commit:?}"
        );
        assert_eq!(s.store().event_count().unwrap(), 30, "nothing of it stored");
        assert_eq!(place.indexed(), (0, 0));
        let again = (0..15)
            .map(|i| format!("more-{i}"))
            .chain((0..30).map(|i| format!("kept-{i}")));
        assert_eq!(s.ingest(pages(again)), (15, 30));
    }

    fn duplicates_are_found_in_memory_and_in_the_index_through_collisions(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open();
        // 100 ids in batches of 25: merges after the 2nd and 4th batch (40 or more recent).
        for b in 0..4 {
            let r = s.ingest(pages((0..25).map(|i| format!("id-{b}-{i}"))));
            assert_eq!(r, (25, 0), "batch {b}");
        }
        let (through, rows) = place.indexed();
        assert_eq!(rows, 100, "every event merged into the index");
        assert_eq!(through, s.store().head_seq().unwrap());
        // Stored ids (all in the index, sharing 16 hashes with 100 others) among new ones.
        let mixed = (0..30).flat_map(|i| [format!("id-{}-{}", i % 4, i % 25), format!("new-{i}")]);
        assert_eq!(s.ingest(pages(mixed)), (30, 30));
        // The 30 new ones are in memory only: found there, and again after a reopen.
        assert_eq!(
            s.ingest(pages((0..30).map(|i| format!("new-{i}")))),
            (0, 30)
        );
        drop(s);
        let mut s = place.open();
        let again = (0..30).map(|i| format!("new-{i}")).chain(["last".into()]);
        assert_eq!(s.ingest(pages(again)), (1, 30));
        assert_eq!(s.store().event_count().unwrap(), 131);
    }

    fn a_write_that_is_not_committed_leaves_its_ids_free(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open();
        s.ingest(pages((0..10).map(|i| format!("kept-{i}"))));
        // 50 events: enough to merge, inside a transaction that is dropped.
        let lost = || pages((0..50).map(|i| format!("lost-{i}")));
        assert_eq!(s.ingest_uncommitted(lost()), 50);
        assert_eq!(place.indexed(), (0, 0), "the merge was rolled back");
        let mut again = lost();
        again.extend(pages((0..10).map(|i| format!("kept-{i}"))));
        assert_eq!(s.ingest(again), (50, 10));
        assert_eq!(s.store().event_count().unwrap(), 60);
    }

    fn two_batches_in_one_transaction_see_each_other(kind: &str) {
        let place = Place::new(kind);
        let mut s = place.open();
        let [first, second] = s.ingest_twice(
            pages((0..45).map(|i| format!("a-{i}"))),
            pages((40..90).map(|i| format!("a-{i}"))),
        );
        assert_eq!((first, second), ((45, 0), (45, 5)));
        assert_eq!(s.ingest(pages((0..90).map(|i| format!("a-{i}")))), (0, 90));
    }

    fn another_writer_s_events_and_merges_are_seen(kind: &str) {
        two_writers(kind, true);
    }

    /// With real hashes, the filter in front of the index must learn what the other writer
    /// merged, or a's lookups would skip the index.
    fn another_writer_s_merges_reach_the_filter(kind: &str) {
        two_writers(kind, false);
    }

    fn two_writers(kind: &str, narrow: bool) {
        // Two engine replicas on one store, each catching up with what the other committed.
        let place = Place::new(kind);
        let (mut a, mut b) = (place.open_with(narrow), place.open_with(narrow));
        a.ingest(pages((0..30).map(|i| format!("a-{i}"))));
        // b catches up with a's 30 and merges the 60.
        b.ingest(pages((0..30).map(|i| format!("b-{i}"))));
        assert_eq!(place.indexed().1, 60);
        let bs = (0..30).map(|i| format!("b-{i}")).chain(["c".into()]);
        assert_eq!(a.ingest(pages(bs)), (1, 30), "a sees b's merge");
        assert_eq!(b.ingest(pages((0..30).map(|i| format!("a-{i}")))), (0, 30));
        // a's "c" is recent (not merged): b learns it by catching up; then a learns b's "d".
        assert_eq!(b.ingest(pages(["c".into(), "d".into()])), (1, 1));
        assert_eq!(
            a.ingest(pages(["c".into(), "d".into(), "e".into()])),
            (1, 2)
        );
        // a merges: everything once, nothing b merged twice.
        assert_eq!(a.ingest(pages((0..40).map(|i| format!("f-{i}")))), (40, 0));
        assert_eq!(place.indexed(), (a.store().head_seq().unwrap(), 103));
        assert_eq!(
            b.ingest(pages(["f-7".into(), "a-7".into(), "c".into()])),
            (0, 3)
        );
    }

    #[test]
    fn merges_grow_with_the_index() {
        assert_eq!(super::merge_at(0, 65_536), 65_536);
        assert_eq!(super::merge_at(8_000_000, 65_536), 1_000_000);
        assert_eq!(super::merge_at(1 << 40, 65_536), super::MERGE_MAX);
        assert_eq!(super::merge_at(0, 40), 40);
    }
}
