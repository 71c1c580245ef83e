//! The profile store: events, the identity graph's change logs and the current profile state,
//! ordered by one store-wide `seq`.
//!
//! Two implementations behind one trait: [`SqliteStore`] (the embedded default: one file, WAL)
//! and [`PostgresStore`]. Both keep the same tables and pass the same test suite.
//!
//! **Ordering.** Every row gets a `seq` from a single counter row that a writing transaction
//! locks until it commits, so rows become visible in `seq` order: a reader that has seen `seq` N
//! can never later find a committed row below N. Concurrent writers queue on that lock (SQLite
//! has one writer anyway); resolution is sequential by nature, so nothing is lost by it.

mod codec;
mod copy;
mod dedupe;
mod ingest;
mod postgres;
mod retention;
mod rows;
mod schema;
mod sqlite;
mod state;

#[cfg(test)]
pub(crate) use dedupe::Tuning;
pub use ingest::{IngestSummary, Resolver};
pub use postgres::PostgresStore;
pub use retention::{Consumer, Cut, IdPruneStep, Keep, PruneStep, Pruned, PrunedName, cut};
pub use rows::*;
pub use sqlite::SqliteStore;
pub use state::{StatePage, StateTable, state_page, state_rows};

use crate::event::{Event, EventType};
use crate::identity::{IdentifierState, ProfileState, Rules};

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL is not `sqlite:///path` or `postgres://...` (only its scheme is kept: the
    /// rest may hold a password).
    #[error(
        "unsupported store URL (scheme {0:?}): expected sqlite:///path/to/file.db or postgres://user@host/db"
    )]
    BadUrl(String),
    /// An SQLite store URL without a file (`sqlite://`, `sqlite://:memory:`): its data would
    /// live only as long as the process.
    #[error(
        "the store URL {0:?} names no file: give one (sqlite:///path/to/store.db); a store in memory loses everything at exit"
    )]
    NoFile(String),
    /// A store a command only reads does not exist (a mistyped path must not create one).
    #[error("no store at {0}: the file does not exist")]
    Missing(String),
    /// An SQLite error.
    #[error("sqlite store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL error: the server's own message when it is the server's (the driver's
    /// Display alone says only "db error").
    #[error("postgres store: {}", postgres_message(.0))]
    Postgres(#[from] ::postgres::Error),
    /// A stored value could not be decoded (the store was written by a newer version, or edited).
    /// The store was written by a newer release than this binary.
    #[error(
        "the store is in format {found}, written by a newer release; this binary knows formats up to {supported}: run the newer release (or restore a backup taken before the upgrade)"
    )]
    NewerFormat {
        /// The store's format.
        found: i64,
        /// The newest format this binary reads and writes.
        supported: i64,
    },
    #[error("corrupt row in {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A current-state key of the wrong shape for its table.
    #[error("a key of this table is [{}]", .0.key_columns().join(", "))]
    BadKey(StateTable),
    /// An unknown table name was asked for.
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    /// A write transaction was committed after one of its ingests failed; it was rolled back.
    #[error(
        "a write whose ingest failed cannot be committed: it was rolled back, nothing of it is stored"
    )]
    FailedWrite,
    /// The TLS settings of a PostgreSQL store URL cannot be used (a CA file that cannot be
    /// read, or holds no certificate; `sslrootcert` without a verify mode).
    #[error("postgres store: TLS: {0}")]
    Tls(String),
    /// A `COPY` of rows to a PostgreSQL store failed outside the server (the connection, or a
    /// value too large for the format); the transaction is rolled back.
    #[error("postgres store: the COPY stream failed: {0}")]
    CopyStream(std::io::Error),
}

/// The server's message of a driver error (`permission denied for table profiles`, a refused
/// constraint), or the driver's own words and their causes when the server said nothing (a
/// closed connection; a TLS handshake and why it failed: `invalid peer certificate:
/// NotValidForName`).
fn postgres_message(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let top = e.to_string();
    // A URL's parse error quotes the URL's text (a malformed password's pieces): not shown.
    if matches!(
        top.as_str(),
        "invalid connection string" | "invalid configuration"
    ) {
        return top;
    }
    crate::warehouse::error::error_chain(e)
}

/// A source of events (from the engine's sources file), as shown in the warehouse's
/// `triggering_event_source_name` / `_slug` columns.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceInfo {
    /// Stable id of the source.
    pub id: String,
    /// Display name.
    pub name: String,
    /// URL-safe slug.
    pub slug: String,
}

/// Which change feed to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feed {
    /// `id_graph_updates`.
    IdGraphUpdates,
    /// `external_id_mapping_updates`.
    ExternalIdMappingUpdates,
    /// `profile_traits_updates`.
    ProfileTraitsUpdates,
    /// Events, optionally only some.
    Events(EventFilter),
}

/// A subset of the events feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventFilter {
    /// Every event.
    All,
    /// Events of one type (the `identifies`, `tracks`, ... tables).
    Type(EventType),
    /// Track events with one of these names (the per-event tables).
    TrackNames(Vec<String>),
}

impl Feed {
    /// The feed for a change-log name (`id_graph_updates`, `events`, `tracks`, ...); `None` for
    /// other names (current-state and per-event tables are resolved elsewhere).
    pub fn from_table(name: &str) -> Option<Feed> {
        match name {
            "id_graph_updates" => Some(Feed::IdGraphUpdates),
            "external_id_mapping_updates" => Some(Feed::ExternalIdMappingUpdates),
            "profile_traits_updates" => Some(Feed::ProfileTraitsUpdates),
            "events" => Some(Feed::Events(EventFilter::All)),
            other => EventType::ALL
                .into_iter()
                .find(|t| t.table() == other)
                .map(|t| Feed::Events(EventFilter::Type(t))),
        }
    }

    /// The columns of the feed's rows, in their order: every key a row of a change log has, and
    /// the keys an event feed's rows may have (each row only those its event carries, plus
    /// any unknown top-level keys the event was sent with).
    pub fn columns(&self) -> Vec<&'static str> {
        let (lead, tail): (&[&str], &[&str]) = match self {
            Feed::IdGraphUpdates => (&["seq", "segment_id", "canonical_segment_id"], &[]),
            Feed::ExternalIdMappingUpdates => (
                &[
                    "seq",
                    "id",
                    "external_id_hash",
                    "external_id_type",
                    "external_id_value",
                    "segment_id",
                ],
                &[],
            ),
            Feed::ProfileTraitsUpdates => (&["seq", "segment_id"], &["traits"]),
            Feed::Events(_) => {
                return vec![
                    "seq",
                    "segment_id",
                    "event_source_id",
                    "type",
                    "messageId",
                    "userId",
                    "anonymousId",
                    "timestamp",
                    "receivedAt",
                    "sentAt",
                    "originalTimestamp",
                    "event",
                    "name",
                    "category",
                    "groupId",
                    "previousId",
                    "context",
                    "integrations",
                    "traits",
                    "properties",
                ];
            }
        };
        [lead, &rows::TRIGGER_KEYS, tail].concat()
    }

    /// Every name `from_table` accepts.
    pub const TABLES: [&'static str; 10] = [
        "id_graph_updates",
        "external_id_mapping_updates",
        "profile_traits_updates",
        "events",
        "identifies",
        "tracks",
        "pages",
        "screens",
        "groups",
        "aliases",
    ];
}

/// The operations every store implementation provides.
pub trait Store: Send {
    /// Resolves and stores a batch of parsed events in one transaction: events whose messageId
    /// is already stored (or repeated in the batch) are skipped, the rest are resolved in order
    /// and written with their change-log rows. On error nothing is stored.
    fn ingest(&mut self, events: Vec<Event>) -> Result<IngestSummary, StoreError> {
        with_prepared(events, |events| self.ingest_prepared(events))
    }

    /// [`Store::ingest`] of prepared events (the engine prepares them on its HTTP threads). The
    /// events stay the caller's, so after an error it can send them again, in other groups.
    fn ingest_prepared(&mut self, events: &[PreparedEvent]) -> Result<IngestSummary, StoreError>;

    /// Up to `limit` rows of `feed` with `seq > after_seq`, in `seq` order.
    fn read_feed(
        &mut self,
        feed: &Feed,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<FeedRow>, StoreError>;

    /// [`Store::read_feed`] of `Feed::Events(filter)`, each event flattened: what a sync loads,
    /// parsed from the stored text without building the events' JSON maps.
    fn read_flat_events(
        &mut self,
        filter: &EventFilter,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<FlatEventRow>, StoreError>;

    /// The highest committed `seq` (0 for an empty store).
    fn head_seq(&mut self) -> Result<i64, StoreError>;

    /// The store's id, a UUID made when it was created: another store (a replacement, an
    /// import) has another, a restore from a backup the same.
    fn store_id(&mut self) -> Result<String, StoreError>;

    /// Every distinct Track event name stored so far.
    fn track_event_names(&mut self) -> Result<Vec<String>, StoreError>;

    /// Every profile ever created (merged-away ones too) and every identifier.
    fn load_state(&mut self) -> Result<(Vec<ProfileState>, Vec<IdentifierState>), StoreError>;

    /// Up to `limit` profiles (merged-away ones too) whose `segment_id` sorts after `after`
    /// (from the first without it), in that order: a current-state table read by key.
    fn read_profiles(
        &mut self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProfileState>, StoreError>;

    /// The stored profiles among `ids`, in any order.
    fn profiles_by_id(&mut self, ids: &[&str]) -> Result<Vec<ProfileState>, StoreError>;

    /// Up to `limit` identifiers whose `(id_type, value)` sorts after `after` (from the first
    /// without it), in that order.
    fn read_identifiers(
        &mut self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<IdentifierState>, StoreError>;

    /// Records (or renames) a source.
    fn upsert_source(&mut self, source: &SourceInfo) -> Result<(), StoreError>;

    /// Every recorded source.
    fn sources(&mut self) -> Result<Vec<SourceInfo>, StoreError>;

    /// How many events are stored.
    fn event_count(&mut self) -> Result<i64, StoreError>;

    /// Live (not merged-away) profiles as of this handle's last ingest or
    /// [`warm_up`](Store::warm_up); 0 before either.
    fn live_profiles(&self) -> usize;

    /// Loads what writes resolve against — the identity graph and the recent messageIds with
    /// their filter — from one consistent read of the store, without the write lock, so that
    /// the first write only catches up with what was committed since instead of loading
    /// everything while it holds the lock. The engine calls it before it serves, and after a
    /// failed write (whose changes its graph must forget). Recent messageIds it has already
    /// are caught up rather than read again.
    fn warm_up(&mut self) -> Result<(), StoreError>;

    /// The lowest `seq` of an event received at or after `received_at` (where a backfill window starts).
    fn event_seq_since(
        &mut self,
        received_at: crate::event::Timestamp,
    ) -> Result<Option<i64>, StoreError>;

    /// Records a feed consumer's progress (`store::retention`), replacing what it recorded
    /// before.
    fn set_consumer(&mut self, consumer: &Consumer) -> Result<(), StoreError>;

    /// Forgets a consumer; whether it was recorded.
    fn remove_consumer(&mut self, name: &str) -> Result<bool, StoreError>;

    /// Every recorded consumer, by name.
    fn consumers(&mut self) -> Result<Vec<Consumer>, StoreError>;

    /// How far events have been deleted, with the newest deleted event of each type and Track
    /// name.
    fn pruned(&mut self) -> Result<Pruned, StoreError>;

    /// Deletes, in one transaction, up to `max` of the oldest events left, in `seq` order,
    /// while each is within the cut that `keep` and the consumers recorded then allow (at or
    /// below every consumer's `after_seq` and the head, received before the longest window),
    /// and moves the horizon past them.
    fn prune_events(&mut self, keep: &Keep, max: usize) -> Result<PruneStep, StoreError>;

    /// Deletes, in one transaction, about `max` entries of the messageId index that name
    /// only deleted events: those of its oldest run once retention's horizon has passed every
    /// event that run indexes, then the run itself (`store::retention`). Never the newest run.
    fn prune_message_ids(&mut self, max: usize) -> Result<IdPruneStep, StoreError>;
}

/// The URL of a store in memory, private to the connection that opens it (tests, dry runs).
pub const MEMORY_URL: &str = "sqlite::memory:";

/// Opens the store at `url` (`sqlite:///path/file.db`, `sqlite::memory:`, `postgres://...`),
/// creating its tables when missing, with the identity `rules` used for ingest. White space
/// around the URL is no part of it (see [`store_url`]).
pub fn open(url: &str, rules: Rules) -> Result<Box<dyn Store>, StoreError> {
    let url = store_url(url);
    if let Some(path) = sqlite_path(url)? {
        return Ok(Box::new(SqliteStore::open(path, rules)?));
    }
    if url == MEMORY_URL {
        return Ok(Box::new(SqliteStore::open_in_memory(rules)?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Box::new(PostgresStore::connect(url, rules)?));
    }
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    Err(StoreError::BadUrl(scheme.to_string()))
}

/// [`open`] for a command that adds no events or profiles to a store (`export`, a local `sync`):
/// an SQLite file that does not exist is an error rather than a new, empty store. An older file
/// is still migrated, as [`open`] does.
pub fn open_existing(url: &str, rules: Rules) -> Result<Box<dyn Store>, StoreError> {
    let url = store_url(url);
    if let Some(path) = sqlite_path(url)?
        && !path.exists()
    {
        return Err(StoreError::Missing(path.display().to_string()));
    }
    open(url, rules)
}

/// `url` without the white space around it: the URL comes from a Secret (the chart's
/// `secretKeyRef`), and a Secret made from a file (`kubectl create secret --from-file`, a
/// `stringData` block scalar) ends in a line break, which named another database
/// (`profiles\n`), or made `?sslmode=require` invalid, or created another SQLite file. A URL
/// has no white space of its own (a password's is percent-encoded).
pub fn store_url(url: &str) -> &str {
    url.trim()
}

/// The file of an `sqlite://` URL (`None` for other URLs); a URL naming no file is refused.
fn sqlite_path(url: &str) -> Result<Option<&std::path::Path>, StoreError> {
    let Some(path) = url.strip_prefix("sqlite://") else {
        return Ok(None);
    };
    if crate::warehouse::sqlite::names_no_file(path) {
        return Err(StoreError::NoFile(url.to_string()));
    }
    Ok(Some(std::path::Path::new(path)))
}

impl StoreError {
    /// Whether the store refused the data rather than failed: a constraint or a value it does
    /// not take (PostgreSQL SQLSTATE classes 22 and 23; SQLite's constraint, too-big and
    /// type-mismatch errors). The connection is still good, and other data may commit.
    pub fn is_data_refusal(&self) -> bool {
        match self {
            StoreError::Postgres(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::ConstraintViolation
                        | rusqlite::ErrorCode::TooBig
                        | rusqlite::ErrorCode::TypeMismatch
                )
            ),
            _ => false,
        }
    }
}

/// Prepares `events` ([`PreparedEvent::new`]), hands them to `ingest`, then frees them on the
/// `store-free` thread.
pub(crate) fn with_prepared<E: Into<PreparedEvent>, T>(
    events: Vec<E>,
    ingest: impl FnOnce(&[PreparedEvent]) -> T,
) -> T {
    let events: Vec<PreparedEvent> = events.into_iter().map(Into::into).collect();
    let out = ingest(&events);
    drop_later(events);
    out
}

/// Drops `value` on a background thread (`store-free`), so a writer holding the write lock does
/// not spend its time freeing what it has written. At most a few values wait; beyond that the
/// caller blocks until the thread catches up, so memory stays bounded. Without the thread (it
/// could not be started) the value is dropped here.
pub(crate) fn drop_later<T: Send + 'static>(value: T) {
    type Garbage = Box<dyn Send>;
    static FREE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Garbage>>> =
        std::sync::OnceLock::new();
    let free = FREE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Garbage>(2);
        std::thread::Builder::new()
            .name("store-free".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = free {
        // A send fails only when the thread is gone; the value comes back and drops here.
        let _ = tx.send(Box::new(value));
    }
}

/// What a write transaction must offer the shared ingest logic.
pub(crate) trait WriteTx {
    /// The committed head `seq`, locking the counter until commit so seqs become visible in order.
    fn lock_head(&mut self) -> Result<i64, StoreError>;
    /// The recent messageIds as of `head`, the head this transaction locked or wrote up to
    /// ([`dedupe::in_tx`]), and the transaction to reach the dedupe index through.
    fn dedupe(
        &mut self,
        head: i64,
    ) -> Result<(&mut dedupe::RecentIds, &mut dyn dedupe::IndexTx), StoreError>;
    /// Writes the rows of a resolved batch and moves the head to `head`.
    fn write(&mut self, batch: &ingest::ResolvedBatch, head: i64) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::{Rules, StoreError};

    #[test]
    fn a_refusal_of_the_data_is_told_from_a_failure_of_the_store() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (v TEXT CHECK (v <> 'poison'))")
            .unwrap();
        let refused = conn
            .execute("INSERT INTO t VALUES ('poison')", [])
            .unwrap_err();
        assert!(StoreError::Sqlite(refused).is_data_refusal());
        let failed = conn
            .execute("INSERT INTO missing VALUES (1)", [])
            .unwrap_err();
        assert!(!StoreError::Sqlite(failed).is_data_refusal());
        assert!(!StoreError::BadUrl("x".into()).is_data_refusal());
    }

    /// An SQLite URL that names no file is refused (its data would vanish with the process:
    /// `import` reported every event accepted), and a read-only open of a missing file fails
    /// without creating it.
    #[test]
    fn sqlite_urls_without_a_file_are_refused_and_reads_create_nothing() {
        for url in ["sqlite://", "sqlite://:memory:", "sqlite://file::memory:"] {
            let e = super::open(url, Rules::default())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("names no file"), "{url}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("s.db");
        let url = format!("sqlite://{}", path.display());
        let e = super::open_existing(&url, Rules::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(!dir.path().join("missing").exists());
        super::open(&url, Rules::default()).unwrap();
        super::open_existing(&url, Rules::default()).unwrap();
    }
}
