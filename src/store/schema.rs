//! The store's tables; the same DDL runs on SQLite and PostgreSQL. Timestamps are microseconds
//! since the Unix epoch (`*_us`), JSON documents are text.

/// The version of the tables below: 2 since `events.message_id` lost its unique index to the
/// bulk-merged hash index of [`DEDUPE_DDL`] (`store::dedupe`); 3 since `profiles` and
/// `identifiers` carry `updated_seq` ([`state_seq_ddl`]); 4 since that index is kept in runs
/// (`message_id_entries`, `message_id_runs`) instead of one table keyed by hash
/// (`message_ids`); 5 since the text keys of the state tables and `track_events` compare byte
/// by byte on PostgreSQL too ([`key_text`]; nothing changes on SQLite). A store at an older
/// version is migrated when opened.
pub(crate) const SCHEMA_VERSION: i64 = 5;

/// The tables whose rows carry `updated_seq`: the head `seq` of the write that last changed the
/// row, indexed, so that a writer can read what another writer (an engine replica) changed
/// since it last wrote instead of reloading every profile and identifier.
const STATE_SEQ_TABLES: [&str; 2] = ["profiles", "identifiers"];

/// PostgreSQL: stamps a row that a write did not stamp — one from an engine older than
/// version 3 still running beside newer ones during a rolling upgrade (the chart's Deployment
/// starts the new pod before it stops the old) — with the head after the current one, so that
/// other writers still read it when they catch up. Rows a version-3 write stamped are left
/// alone (the `WHEN`). Writes stamp every row with their head; one that accepts no event moves
/// no head, so its new rows keep a stamp other writers have read past (an updated row whose
/// stamp was already that head is stamped one higher by the update trigger). The only state
/// such a write changes is `restore`'s repair of a profile missing from the store, which every
/// writer that loads the store makes alike (and upserts). `DROP` then
/// `CREATE`: `CREATE OR REPLACE TRIGGER` needs version 14. SQLite has none: its one engine
/// never runs beside another (a StatefulSet of one, replaced rather than rolled), and the
/// triggers cost its ingest a fifth even when their `WHEN` is false.
const POSTGRES_STAMP_TRIGGERS: &str = "
CREATE OR REPLACE FUNCTION profiles_sync_stamp() RETURNS trigger LANGUAGE plpgsql AS
  'BEGIN NEW.updated_seq := (SELECT head FROM seq_counter WHERE id = 1) + 1; RETURN NEW; END';
DROP TRIGGER IF EXISTS {table}_stamp_insert ON {table};
CREATE TRIGGER {table}_stamp_insert BEFORE INSERT ON {table} FOR EACH ROW
  WHEN (NEW.updated_seq = 0) EXECUTE FUNCTION profiles_sync_stamp();
DROP TRIGGER IF EXISTS {table}_stamp_update ON {table};
CREATE TRIGGER {table}_stamp_update BEFORE UPDATE ON {table} FOR EACH ROW
  WHEN (NEW.updated_seq = OLD.updated_seq) EXECUTE FUNCTION profiles_sync_stamp();
";

/// Adds `updated_seq` (0 for the rows already there), its index and (PostgreSQL) the triggers
/// that stamp rows a write left unstamped to the state tables; `missing(table)` says whether a
/// table lacks the column.
pub(crate) fn state_seq_ddl(
    dialect: Dialect,
    mut missing: impl FnMut(&str) -> Result<bool, super::StoreError>,
) -> Result<String, super::StoreError> {
    let mut ddl = String::new();
    for table in STATE_SEQ_TABLES {
        if dialect == Dialect::Postgres || missing(table)? {
            // SQLite has no ADD COLUMN IF NOT EXISTS; PostgreSQL adds it without a rewrite.
            let if_missing = match dialect {
                Dialect::Sqlite => "",
                Dialect::Postgres => "IF NOT EXISTS ",
            };
            ddl.push_str(&format!(
                "ALTER TABLE {table} ADD COLUMN {if_missing}updated_seq BIGINT NOT NULL DEFAULT 0;\n"
            ));
        }
        ddl.push_str(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_updated_seq ON {table} (updated_seq);\n"
        ));
        if dialect == Dialect::Postgres {
            ddl.push_str(&POSTGRES_STAMP_TRIGGERS.replace("{table}", table));
        }
    }
    Ok(ddl)
}

/// The dialect a DDL is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// Creates every table when missing.
pub(crate) fn ddl(dialect: Dialect) -> String {
    let without_rowid = match dialect {
        Dialect::Sqlite => " WITHOUT ROWID",
        Dialect::Postgres => "",
    };
    format!(
        "{}{}{}{}",
        DDL.replace("{seq_key}", seq_key(dialect))
            .replace("{key_text}", key_text(dialect)),
        events_ddl(dialect, "events"),
        DEDUPE_DDL.replace("{without_rowid}", without_rowid),
        retention_ddl(dialect)
    )
}

/// The retention tables (`store::retention`). They came after format 5 without changing it
/// (an older engine reading the store never touches them): a store without them gets them when
/// first opened ([`RETENTION_TABLE`] tells).
pub(crate) fn retention_ddl(dialect: Dialect) -> String {
    super::retention::RETENTION_DDL.replace("{key_text}", key_text(dialect))
}

/// The table whose absence means a store predates retention.
pub(crate) const RETENTION_TABLE: &str = "event_retention";

/// The table of the store's id: a random UUID made when the store is created (or first opened
/// by a release that has it). The sync keeps it in the warehouse, to tell a store that
/// replaced the one a schema was synced from (a lost volume, an `export | import`): its `seq`s
/// number other changes. A restore from a backup keeps the id. It came after format 5 without
/// changing it (an older engine never reads it), as the retention tables did.
pub(crate) const IDENTITY_TABLE: &str = "store_identity";

/// Creates [`IDENTITY_TABLE`] with `id` in it, unless it is there.
pub(crate) fn identity_ddl(id: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {IDENTITY_TABLE} (
           id INTEGER PRIMARY KEY CHECK (id = 1),
           store_id TEXT NOT NULL
         );
         INSERT INTO {IDENTITY_TABLE} (id, store_id) VALUES (1, '{id}') ON CONFLICT (id) DO NOTHING;"
    )
}

/// Reads the store's id.
pub(crate) const STORE_ID_SQL: &str = "SELECT store_id FROM store_identity WHERE id = 1";

/// The `events` table, named `name` (SQLite's migration builds it under another name first).
pub(crate) fn events_ddl(dialect: Dialect, name: &str) -> String {
    EVENTS_DDL
        .replace("{name}", name)
        .replace("{seq_key}", seq_key(dialect))
}

/// The type of the text keys of the current-state tables and `track_events`: compared
/// byte by byte in both stores. SQLite's default collation does; PostgreSQL's is the
/// database's, and under a linguistic one (`en_US.UTF-8`, the default of most managed
/// servers) every comparison in their B-trees calls the locale's, several times slower than
/// `memcmp`; their order then also differs from SQLite's.
fn key_text(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "TEXT",
        Dialect::Postgres => "TEXT COLLATE \"C\"",
    }
}

/// The type of every `seq` primary key.
fn seq_key(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => SQLITE_SEQ_KEY,
        Dialect::Postgres => POSTGRES_SEQ_KEY,
    }
}

/// SQLite: `INTEGER PRIMARY KEY` makes `seq` the rowid, so a change log is one b-tree ordered by
/// `seq` (a `BIGINT PRIMARY KEY` would add a second index every insert writes and every feed
/// read goes through).
const SQLITE_SEQ_KEY: &str = "INTEGER PRIMARY KEY";
/// PostgreSQL: a 64-bit key with its unique index.
const POSTGRES_SEQ_KEY: &str = "BIGINT PRIMARY KEY";

/// The events. No secondary index: every feed reads them by `seq` (the primary key), each extra
/// index would cost every ingest, and messageIds are deduplicated through [`DEDUPE_DDL`].
const EVENTS_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS {name} (
    seq {seq_key},
    message_id TEXT NOT NULL,
    type TEXT NOT NULL,
    event TEXT,
    segment_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    timestamp_us BIGINT NOT NULL,
    received_at_us BIGINT NOT NULL,
    payload TEXT NOT NULL
);
"#;

/// The messageId index (`store::dedupe`): a keyed 64-bit hash of each messageId and the `seq`
/// of its event, by run, for the events up to `indexed_through`; the runs and their sizes; the
/// hash key; how many entries.
const DEDUPE_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS message_id_entries (
    run BIGINT NOT NULL,
    hash BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (run, hash, seq)
){without_rowid};
CREATE TABLE IF NOT EXISTS message_id_runs (
    run BIGINT PRIMARY KEY,
    entries BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS message_id_index (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key0 BIGINT NOT NULL,
    key1 BIGINT NOT NULL,
    indexed_through BIGINT NOT NULL,
    entries BIGINT NOT NULL
);
"#;

/// The other tables.
const DDL: &str = r#"
CREATE TABLE IF NOT EXISTS seq_counter (id INTEGER PRIMARY KEY, head BIGINT NOT NULL);
INSERT INTO seq_counter (id, head) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
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
    segment_id {key_text} PRIMARY KEY,
    canonical_segment_id TEXT NOT NULL,
    created_rank BIGINT NOT NULL,
    merges BIGINT NOT NULL,
    traits TEXT NOT NULL,
    trait_times TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identifiers (
    id_type {key_text} NOT NULL,
    value {key_text} NOT NULL,
    segment_id TEXT NOT NULL,
    first_seen_us BIGINT NOT NULL,
    last_seen_us BIGINT NOT NULL,
    PRIMARY KEY (id_type, value)
);
CREATE TABLE IF NOT EXISTS track_events (name {key_text} PRIMARY KEY);
CREATE TABLE IF NOT EXISTS sources (id TEXT PRIMARY KEY, name TEXT NOT NULL, slug TEXT NOT NULL);

"#;

/// The trigger columns, in the order the change-log tables declare them.
pub(crate) const TRIGGER_COLUMNS: &str = "triggering_event_type, triggering_event_id, triggering_event_name, triggering_event_source_id, timestamp_us, received_at_us";
