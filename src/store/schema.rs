//! The store's tables; the same DDL runs on SQLite and PostgreSQL. Timestamps are microseconds
//! since the Unix epoch (`*_us`), JSON documents are text.

/// The version of the tables below; a store at an older version gets the DDL run again.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// Creates every table when missing, with `seq_key` as the type of every `seq` primary key (see
/// [`SQLITE_SEQ_KEY`], [`POSTGRES_SEQ_KEY`]).
pub(crate) fn ddl(seq_key: &str) -> String {
    DDL.replace("{seq_key}", seq_key)
}

/// SQLite: `INTEGER PRIMARY KEY` makes `seq` the rowid, so a change log is one b-tree ordered by
/// `seq` (a `BIGINT PRIMARY KEY` would add a second index every insert writes and every feed
/// read goes through).
pub(crate) const SQLITE_SEQ_KEY: &str = "INTEGER PRIMARY KEY";
/// PostgreSQL: a 64-bit key with its unique index.
pub(crate) const POSTGRES_SEQ_KEY: &str = "BIGINT PRIMARY KEY";

/// The tables. `events` has no secondary index beyond `message_id`: every feed reads it by `seq`
/// (its primary key), and each extra index would cost every ingest.
const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS seq_counter (id INTEGER PRIMARY KEY, head BIGINT NOT NULL);
INSERT INTO seq_counter (id, head) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS events (
    seq {seq_key},
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    event TEXT,
    segment_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    timestamp_us BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS id_graph_updates (
    seq {seq_key},
    segment_id TEXT NOT NULL,
    canonical_segment_id TEXT NOT NULL,
    triggering_event_type TEXT NOT NULL,
    triggering_event_id TEXT NOT NULL,
    triggering_event_name TEXT,
    triggering_event_source_id TEXT NOT NULL,
    timestamp_us BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS external_id_mapping_updates (
    seq {seq_key},
    id TEXT NOT NULL,
    external_id_hash TEXT NOT NULL,
    external_id_type TEXT NOT NULL,
    external_id_value TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    triggering_event_type TEXT NOT NULL,
    triggering_event_id TEXT NOT NULL,
    triggering_event_name TEXT,
    triggering_event_source_id TEXT NOT NULL,
    timestamp_us BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS profile_traits_updates (
    seq {seq_key},
    segment_id TEXT NOT NULL,
    traits TEXT NOT NULL,
    triggering_event_type TEXT NOT NULL,
    triggering_event_id TEXT NOT NULL,
    triggering_event_name TEXT,
    triggering_event_source_id TEXT NOT NULL,
    timestamp_us BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS profiles (
    segment_id TEXT PRIMARY KEY,
    canonical_segment_id TEXT NOT NULL,
    created_rank BIGINT NOT NULL,
    merges BIGINT NOT NULL,
    traits TEXT NOT NULL,
    trait_times TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identifiers (
    id_type TEXT NOT NULL,
    value TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    first_seen_us BIGINT NOT NULL,
    last_seen_us BIGINT NOT NULL,
    PRIMARY KEY (id_type, value)
);
CREATE TABLE IF NOT EXISTS track_events (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS sources (id TEXT PRIMARY KEY, name TEXT NOT NULL, slug TEXT NOT NULL);

"#;

/// The trigger columns, in the order the change-log tables declare them.
pub(crate) const TRIGGER_COLUMNS: &str = "triggering_event_type, triggering_event_id, triggering_event_name, triggering_event_source_id, timestamp_us, received_at_us";
