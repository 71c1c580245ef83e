//! The embedded store: one SQLite file in WAL mode.

use std::path::Path;

use rusqlite::types::ToSqlOutput::{self, Borrowed};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params, params_from_iter};

use super::codec::{
    self, IDENTIFIER_COLUMNS, PROFILE_COLUMNS, RawProfile, StateRead, json_text, micros,
    state_read_sql,
};
use super::dedupe::{self, Dedupe, RecentIds, Tuning, TxIds};
use super::ingest::{LoadedState, ResolvedBatch, ingest_in_tx};
use super::retention::{
    self, Consumer, IdPruneStep, Keep, OldEvent, PruneStep, Pruned, PrunedName,
};
use super::schema::{
    Dialect, IDENTITY_TABLE, RETENTION_TABLE, SCHEMA_VERSION, STORE_ID_SQL, TRIGGER_COLUMNS, ddl,
    events_ddl, identity_ddl, retention_ddl, state_seq_ddl,
};
use super::{
    EventFilter, Feed, FeedRow, FlatEventRow, IngestSummary, PreparedEvent, Resolver, SourceInfo,
    Store, StoreError, Trigger, WriteTx,
};
use crate::identity::{IdentifierState, ProfileState, Rules};

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    resolver: Resolver,
    dedupe: Dedupe,
}

impl SqliteStore {
    /// Opens (creating when missing) the store file at `path`.
    pub fn open(path: &Path, rules: Rules) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Sqlite(rusqlite::Error::InvalidPath(
                    format!("{}: {e}", dir.display()).into(),
                ))
            })?;
        }
        Self::init(Connection::open(path)?, rules)
    }

    /// A store that lives in memory only (tests, dry runs).
    pub fn open_in_memory(rules: Rules) -> Result<SqliteStore, StoreError> {
        Self::init(Connection::open_in_memory()?, rules)
    }

    fn init(conn: Connection, rules: Rules) -> Result<SqliteStore, StoreError> {
        // 16 KiB pages for a new file (an existing one keeps its own; the size can only be set
        // before the first table): event payloads fill 4 KiB pages after a few rows, and the
        // splits, the WAL frames and the checkpoints of small pages cost the engine's ingest
        // about a fifth of its rate (`cargo bench --bench engine`, README).
        conn.pragma_update(None, "page_size", 16_384)?;
        // WAL lets feed readers run beside the writer; synchronous=FULL makes a commit durable
        // before the engine acknowledges the events it holds.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // 64 MiB of page cache (the default is 2 MiB): the dedupe index and the state tables'
        // pages stay in memory instead of being read back from the OS on every batch.
        conn.pragma_update(None, "cache_size", -65_536)?;
        // Statements of the ingest path, with their 64-row and 1-row forms, outnumber the
        // default cache of 16.
        conn.set_prepared_statement_cache_capacity(32);
        // Only a new or older file takes the write lock for DDL, so opening a reader never waits
        // for the writer.
        let version = schema_version(&conn)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerFormat {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            create_or_migrate(&conn)?;
        } else if !has_table(&conn, RETENTION_TABLE)? {
            let tx = rusqlite::Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)?;
            tx.execute_batch(&retention_ddl(Dialect::Sqlite))?;
            tx.commit()?;
        }
        // (Its row is checked, not the table: a table left without it would fail every read
        // of the id.)
        let identified = has_table(&conn, IDENTITY_TABLE)?
            && conn.query_row(&format!("SELECT EXISTS ({STORE_ID_SQL})"), [], |r| {
                r.get::<_, bool>(0)
            })?;
        if !identified {
            let tx = rusqlite::Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)?;
            tx.execute_batch(&identity_ddl(&crate::event::random_uuid()))?;
            tx.commit()?;
        }
        Ok(SqliteStore {
            conn,
            resolver: Resolver::new(rules),
            dedupe: Dedupe::default(),
        })
    }

    /// Test settings of the messageId dedupe.
    #[cfg(test)]
    pub(crate) fn set_dedupe(&mut self, tuning: Tuning) {
        self.dedupe.set_tuning(tuning);
    }

    /// Tests: the messageId dedupe's state between writes.
    #[cfg(test)]
    pub(crate) fn dedupe(&self) -> &Dedupe {
        &self.dedupe
    }

    /// Sets how long a writer waits for another writer's lock before failing with "database is locked".
    pub fn set_busy_timeout(&self, timeout: std::time::Duration) -> Result<(), StoreError> {
        Ok(self.conn.busy_timeout(timeout)?)
    }

    /// Starts a write transaction that holds the store's write lock until it ends: ingest into
    /// it, then commit.
    pub fn begin_write(&mut self) -> Result<SqliteWrite<'_>, StoreError> {
        Ok(SqliteWrite {
            tx: LiteTx {
                tx: self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?,
                ids: TxIds::new(&mut self.dedupe.committed),
                tuning: self.dedupe.tuning,
            },
            resolver: &mut self.resolver,
            head: None,
            failed: false,
        })
    }
}

/// An open write transaction on an SQLite store.
pub struct SqliteWrite<'a> {
    tx: LiteTx<'a>,
    resolver: &'a mut Resolver,
    head: Option<i64>,
    /// Whether an ingest failed: the transaction can then only be rolled back.
    failed: bool,
}

struct LiteTx<'a> {
    tx: rusqlite::Transaction<'a>,
    /// The recent messageIds as of this transaction's writes; the store's again when it ends.
    ids: TxIds<'a>,
    tuning: Tuning,
}

/// The dedupe index's statements (`store::dedupe`).
impl dedupe::IndexTx for rusqlite::Transaction<'_> {
    fn index_row(&mut self) -> Result<Option<[i64; 3]>, StoreError> {
        Ok(self
            .query_row(dedupe::INDEX_ROW_SQL, [], |r| {
                Ok([r.get(0)?, r.get(1)?, r.get(2)?])
            })
            .optional()?)
    }

    fn create_index_row(&mut self, key0: i64, key1: i64) -> Result<(), StoreError> {
        self.execute(dedupe::CREATE_INDEX_ROW_SQL, params![key0, key1])?;
        Ok(())
    }

    fn events_after(
        &mut self,
        after: i64,
        limit: i64,
        f: &mut dyn FnMut(i64, &str),
    ) -> Result<(), StoreError> {
        let mut stmt = self.prepare_cached(dedupe::EVENTS_AFTER_SQL)?;
        let mut rows = stmt.query([after, limit])?;
        while let Some(r) = rows.next()? {
            f(
                r.get(0)?,
                r.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?,
            );
        }
        Ok(())
    }

    fn index_hashes(&mut self, f: &mut dyn FnMut(i64)) -> Result<(), StoreError> {
        let mut stmt = self.prepare(dedupe::INDEX_HASHES_SQL)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            f(r.get(0)?);
        }
        Ok(())
    }

    fn entries_after(
        &mut self,
        after: [i64; 3],
        limit: i64,
        f: &mut dyn FnMut([i64; 3]),
    ) -> Result<(), StoreError> {
        let mut stmt = self.prepare_cached(dedupe::ENTRIES_AFTER_SQL)?;
        let [run, hash, seq] = after;
        let mut rows = stmt.query([run, hash, seq, limit])?;
        while let Some(r) = rows.next()? {
            f([r.get(0)?, r.get(1)?, r.get(2)?]);
        }
        Ok(())
    }

    fn runs(&mut self) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut stmt = self.prepare_cached(dedupe::RUNS_SQL)?;
        let runs = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(runs.collect::<rusqlite::Result<_>>()?)
    }

    fn probe(
        &mut self,
        hashes: &[i64],
        runs: &[i64],
        seqs: &mut Vec<i64>,
    ) -> Result<(), StoreError> {
        // Run by run: each is a range of the index's key.
        for run in runs {
            in_chunks(self, hashes, probe_sql, |stmt, chunk| {
                let mut rows = stmt.query(params_from_iter(std::iter::once(run).chain(chunk)))?;
                while let Some(r) = rows.next()? {
                    seqs.push(r.get(0)?);
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn ids_at(&mut self, seqs: &[i64], f: &mut dyn FnMut(String)) -> Result<(), StoreError> {
        Ok(in_chunks(self, seqs, ids_at_sql, |stmt, chunk| {
            let mut rows = stmt.query(params_from_iter(chunk))?;
            while let Some(r) = rows.next()? {
                f(r.get(0)?);
            }
            Ok(())
        })?)
    }

    fn add_entries(&mut self, run: i64, sorted: &[(i64, i64)]) -> Result<(), StoreError> {
        Ok(in_chunks(self, sorted, add_entries_sql, |stmt, chunk| {
            let values = chunk.iter().flat_map(|&(h, s)| [run, h, s]);
            stmt.execute(params_from_iter(values)).map(|_| ())
        })?)
    }

    fn exec(&mut self, sql: &str, params: &[i64]) -> Result<u64, StoreError> {
        // Once a merge: not worth a place in the statement cache of the ingest path.
        let rows = rusqlite::Connection::execute(self, sql, params_from_iter(params))?;
        Ok(u64::try_from(rows).unwrap_or(u64::MAX))
    }

    fn pairs(&mut self, sql: &str, params: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        Ok(self
            .prepare_cached(sql)?
            .query_map(params_from_iter(params), |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?)
    }
}

impl retention::PruneTx for rusqlite::Transaction<'_> {
    fn oldest(
        &mut self,
        after: i64,
        through: i64,
        limit: i64,
    ) -> Result<Vec<OldEvent>, StoreError> {
        Ok(self
            .prepare_cached(retention::OLDEST_EVENTS_SQL)?
            .query_map([after, through, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn note_pruned(
        &mut self,
        event_type: &str,
        event: &str,
        received_us: i64,
    ) -> Result<(), StoreError> {
        self.prepare_cached(retention::NOTE_PRUNED_NAME_SQL)?
            .execute(params![event_type, event, received_us])?;
        Ok(())
    }
}

/// The index probe of `n` hashes in one run (`?1`).
fn probe_sql(n: usize) -> String {
    format!(
        "SELECT seq FROM message_id_entries WHERE run = ?1 AND hash IN ({})",
        marks(n, 2)
    )
}

/// The messageIds of `n` events by seq.
fn ids_at_sql(n: usize) -> String {
    format!(
        "SELECT message_id FROM events WHERE seq IN ({})",
        marks(n, 1)
    )
}

/// The insert of `n` index entries.
fn add_entries_sql(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| format!("({})", marks(3, 3 * i + 1)))
        .collect();
    format!(
        "INSERT INTO message_id_entries (run, hash, seq) VALUES {}",
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

impl SqliteWrite<'_> {
    /// Resolves and writes `events` (see [`Store::ingest`]) without committing.
    pub fn ingest<E: Into<PreparedEvent>>(
        &mut self,
        events: Vec<E>,
    ) -> Result<IngestSummary, StoreError> {
        super::with_prepared(events, |events| self.ingest_prepared(events))
    }

    /// [`SqliteWrite::ingest`] of prepared events.
    pub fn ingest_prepared(
        &mut self,
        events: &[PreparedEvent],
    ) -> Result<IngestSummary, StoreError> {
        let result = ingest_in_tx(&mut self.tx, self.resolver, events, |t, since| {
            load_state(&t.tx, since)
        });
        let summary = result.inspect_err(|_| self.failed = true)?;
        self.head = Some(summary.head);
        Ok(summary)
    }

    /// Commits what was ingested; after a failed ingest, rolls back instead and says so
    /// ([`StoreError::FailedWrite`]): part of that ingest may have been written.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if self.failed {
            // Dropping the transaction rolls it back (and its messageIds with it).
            return Err(StoreError::FailedWrite);
        }
        // A failed commit rolls back: the ids go back to the store as they were before it.
        self.tx.tx.commit()?;
        if let Some(head) = self.head {
            self.resolver.committed(head);
        }
        self.tx.ids.committed();
        Ok(())
    }
}

/// A stored profile from a row of [`PROFILE_COLUMNS`].
fn raw_profile(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawProfile> {
    Ok(RawProfile {
        segment_id: r.get(0)?,
        canonical_segment_id: r.get(1)?,
        created_rank: r.get(2)?,
        merges: r.get(3)?,
        traits: r.get(4)?,
        trait_times: r.get(5)?,
    })
}

/// The state a resolver is built from: every profile and identifier, or (`since`) those a
/// write after that head changed; every Track event name.
fn load_state(conn: &Connection, since: Option<i64>) -> Result<LoadedState, StoreError> {
    // A full load reads the tables in their own order, not through the `updated_seq` index
    // (which takes twice as long).
    let (changed, after) = match since {
        Some(since) => ("WHERE updated_seq > ?1", since),
        None => ("WHERE ?1 IS NOT NULL", 0),
    };
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {PROFILE_COLUMNS} FROM profiles {changed}"))?;
    let raw = stmt
        .query_map([after], raw_profile)?
        .collect::<Result<Vec<_>, _>>()?;
    let profiles = raw
        .into_iter()
        .map(RawProfile::decode)
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {IDENTIFIER_COLUMNS} FROM identifiers {changed}"
    ))?;
    let raw = stmt
        .query_map([after], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<Vec<(String, String, String, i64, i64)>, _>>()?;
    let identifiers = raw
        .into_iter()
        .map(|(t, v, s, f, l)| codec::identifier(t, v, s, f, l))
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare_cached("SELECT name FROM track_events ORDER BY name")?;
    let names = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok((profiles, identifiers, names))
}

/// Whether the file has a table `name`.
fn has_table(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )?)
}

/// The version of the tables in the file (`PRAGMA user_version`; 0 for a new file).
fn schema_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// Creates the tables of a new file, or brings an older file's up to
/// [`SCHEMA_VERSION`], in one transaction: a crash leaves the file as it was.
///
/// Version 1 kept messageIds unique with an index on `events`; version 2 rebuilds `events`
/// without it and indexes the stored events in `message_ids` instead (`store::dedupe`), which
/// version 4 moves into the first run of `message_id_entries`.
fn create_or_migrate(conn: &Connection) -> Result<(), StoreError> {
    let mut tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    // Another process may have done it while this one waited for the lock.
    if schema_version(&tx)? >= SCHEMA_VERSION {
        return Ok(());
    }
    let unique_ids: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_index_list('events') WHERE \"unique\" = 1 AND origin = 'u')",
        [],
        |r| r.get(0),
    )?;
    if unique_ids {
        tx.execute_batch(&format!(
            "{}
             INSERT INTO events_v2 SELECT seq, message_id, type, event, segment_id, source_id, timestamp_us, received_at_us, payload FROM events;
             DROP TABLE events;
             ALTER TABLE events_v2 RENAME TO events;",
            events_ddl(Dialect::Sqlite, "events_v2")
        ))?;
    }
    tx.execute_batch(&ddl(Dialect::Sqlite))?;
    let seq_ddl = state_seq_ddl(Dialect::Sqlite, |table| {
        let present: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = 'updated_seq')",
            [table],
            |r| r.get(0),
        )?;
        Ok(!present)
    })?;
    tx.execute_batch(&seq_ddl)?;
    let legacy_index: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'message_ids')",
        [],
        |r| r.get(0),
    )?;
    if legacy_index {
        tx.execute_batch(dedupe::MOVE_LEGACY_INDEX_SQL)?;
    }
    let head: i64 = tx.query_row("SELECT head FROM seq_counter WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    if !dedupe::exists(&mut tx)? {
        dedupe::create(&mut tx, head)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// The trigger columns' values, borrowed (binding copies them into the statement).
fn trigger_params(t: &Trigger) -> [ToSqlOutput<'_>; 6] {
    [
        Borrowed(ValueRef::Text(t.event_type.as_str().as_bytes())),
        Borrowed(ValueRef::Text(t.event_id.as_bytes())),
        t.event_name
            .as_deref()
            .map_or(Borrowed(ValueRef::Null), |n| {
                Borrowed(ValueRef::Text(n.as_bytes()))
            }),
        Borrowed(ValueRef::Text(t.source_id.as_bytes())),
        Borrowed(ValueRef::Integer(micros(t.timestamp))),
        Borrowed(ValueRef::Integer(micros(t.received_at))),
    ]
}

impl WriteTx for LiteTx<'_> {
    fn lock_head(&mut self) -> Result<i64, StoreError> {
        // The IMMEDIATE transaction already holds the write lock.
        Ok(self
            .tx
            .query_row("SELECT head FROM seq_counter WHERE id = 1", [], |r| {
                r.get(0)
            })?)
    }

    fn dedupe(
        &mut self,
        head: i64,
    ) -> Result<(&mut RecentIds, &mut dyn dedupe::IndexTx), StoreError> {
        let recent = self.ids.at(&mut self.tx, head, self.tuning)?;
        Ok((recent, &mut self.tx))
    }

    fn write(&mut self, b: &ResolvedBatch, head: i64) -> Result<(), StoreError> {
        write_rows(&self.tx, b, head)
    }
}

/// Writes the rows of a resolved batch and moves the head to `head`.
fn write_rows(
    tx: &rusqlite::Transaction<'_>,
    b: &ResolvedBatch,
    head: i64,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO id_graph_updates (seq, segment_id, canonical_segment_id, {TRIGGER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))?;
    for r in &b.id_graph {
        let head = [
            Borrowed(ValueRef::Integer(r.seq)),
            Borrowed(ValueRef::Text(r.segment_id.as_bytes())),
            Borrowed(ValueRef::Text(r.canonical_segment_id.as_bytes())),
        ];
        stmt.execute(params_from_iter(
            head.into_iter().chain(trigger_params(&r.trigger)),
        ))?;
    }
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO external_id_mapping_updates (seq, id, external_id_hash, external_id_type, external_id_value, segment_id, {TRIGGER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    ))?;
    for r in &b.mappings {
        let head = [
            Borrowed(ValueRef::Integer(r.seq)),
            Borrowed(ValueRef::Text(r.id.as_bytes())),
            Borrowed(ValueRef::Text(r.external_id_hash.as_bytes())),
            Borrowed(ValueRef::Text(r.external_id_type.as_bytes())),
            Borrowed(ValueRef::Text(r.external_id_value.as_bytes())),
            Borrowed(ValueRef::Text(r.segment_id.as_bytes())),
        ];
        stmt.execute(params_from_iter(
            head.into_iter().chain(trigger_params(&r.trigger)),
        ))?;
    }
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO profile_traits_updates (seq, segment_id, traits, {TRIGGER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))?;
    for r in &b.traits {
        let head = [
            Borrowed(ValueRef::Integer(r.seq)),
            Borrowed(ValueRef::Text(r.segment_id.as_bytes())),
            Borrowed(ValueRef::Text(r.traits.as_bytes())),
        ];
        stmt.execute(params_from_iter(
            head.into_iter().chain(trigger_params(&r.trigger)),
        ))?;
    }
    in_chunks(tx, &b.events, insert_events_sql, |stmt, chunk| {
        let values = chunk.iter().flat_map(|r| {
            let t = &r.event.trigger;
            [
                ToSqlOutput::Owned(rusqlite::types::Value::Integer(r.seq)),
                Borrowed(ValueRef::Text(t.event_id.as_bytes())),
                Borrowed(ValueRef::Text(t.event_type.as_str().as_bytes())),
                r.event
                    .event
                    .as_deref()
                    .map_or(Borrowed(ValueRef::Null), |n| {
                        Borrowed(ValueRef::Text(n.as_bytes()))
                    }),
                Borrowed(ValueRef::Text(r.segment_id.as_bytes())),
                Borrowed(ValueRef::Text(t.source_id.as_bytes())),
                Borrowed(ValueRef::Integer(micros(t.timestamp))),
                Borrowed(ValueRef::Integer(micros(t.received_at))),
                Borrowed(ValueRef::Text(r.event.payload.as_bytes())),
            ]
        });
        stmt.execute(params_from_iter(values)).map(|_| ())
    })?;
    // Each changed row is stamped with the write's head (`updated_seq`), for other writers.
    let mut stmt = tx.prepare_cached(
        "INSERT INTO profiles (segment_id, canonical_segment_id, created_rank, merges, traits, trait_times, updated_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (segment_id) DO UPDATE SET canonical_segment_id = excluded.canonical_segment_id, created_rank = excluded.created_rank,
           merges = excluded.merges, traits = excluded.traits, trait_times = excluded.trait_times, updated_seq = excluded.updated_seq",
    )?;
    for p in &b.state.profiles {
        stmt.execute(params![
            p.segment_id,
            p.canonical_segment_id,
            i64::try_from(p.created_rank).unwrap_or(i64::MAX),
            i64::from(p.merges),
            json_text(&p.traits),
            json_text(&p.trait_times),
            head,
        ])?;
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO identifiers (id_type, value, segment_id, first_seen_us, last_seen_us, updated_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id_type, value) DO UPDATE SET segment_id = excluded.segment_id, first_seen_us = excluded.first_seen_us,
           last_seen_us = excluded.last_seen_us, updated_seq = excluded.updated_seq",
    )?;
    for i in &b.state.identifiers {
        stmt.execute(params![
            i.id_type,
            i.value,
            i.segment_id,
            micros(i.first_seen),
            micros(i.last_seen),
            head,
        ])?;
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO track_events (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
    )?;
    for name in &b.new_track_names {
        stmt.execute([name])?;
    }
    tx.execute("UPDATE seq_counter SET head = ?1 WHERE id = 1", [head])?;
    Ok(())
}

impl SqliteStore {
    /// The events of `filter` after `after`, each decoded by `decode`.
    fn read_events<T>(
        &self,
        filter: &EventFilter,
        after: i64,
        limit: usize,
        decode: impl Fn(codec::StoredEvent<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let base =
            "SELECT seq, segment_id, source_id, received_at_us, payload FROM events WHERE seq > ?1";
        let (sql, mut args): (String, Vec<rusqlite::types::Value>) = match filter {
            EventFilter::All => (format!("{base} ORDER BY seq LIMIT ?2"), vec![]),
            EventFilter::Type(t) => (
                format!("{base} AND type = ?3 ORDER BY seq LIMIT ?2"),
                vec![t.as_str().to_string().into()],
            ),
            EventFilter::TrackNames(names) => {
                let marks: Vec<String> = (0..names.len()).map(|i| format!("?{}", i + 3)).collect();
                (
                    format!(
                        "{base} AND type = 'track' AND event IN ({}) ORDER BY seq LIMIT ?2",
                        if marks.is_empty() {
                            "NULL".into()
                        } else {
                            marks.join(", ")
                        }
                    ),
                    names.iter().map(|n| n.clone().into()).collect(),
                )
            }
        };
        args.insert(0, limit.into());
        args.insert(0, after.into());
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params_from_iter(args))?;
        // Decoded straight from the statement, into a vector sized for a full page (growing it
        // would copy every event decoded so far).
        let mut out = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(PAGE_HINT));
        while let Some(r) = rows.next()? {
            let payload = r.get_ref(4)?.as_str().map_err(rusqlite::Error::from)?;
            out.push(decode(codec::StoredEvent {
                seq: r.get(0)?,
                segment_id: r.get(1)?,
                source_id: r.get(2)?,
                received_at_us: r.get(3)?,
                payload,
            })?);
        }
        Ok(out)
    }
}

/// Event rows per `INSERT` statement (9 values each, under SQLite's 32,766 variables), and
/// hashes or seqs per dedupe `SELECT`: one statement start and cursor open per this many rows.
const ROWS_PER_STATEMENT: usize = 64;

/// Runs `run` over `items` [`ROWS_PER_STATEMENT`] at a time with the statement `sql(64)`, then
/// over the rest one at a time with `sql(1)`: only two statements of each kind are prepared
/// (and kept in the connection's small statement cache), whatever the batch size.
pub(super) fn in_chunks<T>(
    conn: &Connection,
    items: &[T],
    sql: fn(usize) -> String,
    mut run: impl FnMut(&mut rusqlite::Statement<'_>, &[T]) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let (full, rest) = items.split_at(items.len() - items.len() % ROWS_PER_STATEMENT);
    for (rows, part) in [(ROWS_PER_STATEMENT, full), (1, rest)] {
        if part.is_empty() {
            continue;
        }
        let mut stmt = conn.prepare_cached(&sql(rows))?;
        for chunk in part.chunks_exact(rows) {
            run(&mut stmt, chunk)?;
        }
    }
    Ok(())
}

/// The `INSERT` of `n` event rows.
fn insert_events_sql(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let marks: Vec<String> = (1..=9).map(|c| format!("?{}", i * 9 + c)).collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO events (seq, message_id, type, event, segment_id, source_id, timestamp_us, received_at_us, payload) VALUES {}",
        rows.join(", ")
    )
}

/// The most rows a feed read reserves room for up front.
const PAGE_HINT: usize = 10_000;

impl Store for SqliteStore {
    fn ingest_prepared(&mut self, events: &[PreparedEvent]) -> Result<IngestSummary, StoreError> {
        let mut write = self.begin_write()?;
        let summary = write.ingest_prepared(events)?;
        write.commit()?;
        Ok(summary)
    }

    fn read_feed(
        &mut self,
        feed: &Feed,
        after: i64,
        limit: usize,
    ) -> Result<Vec<FeedRow>, StoreError> {
        if let Feed::Events(filter) = feed {
            return self.read_events(filter, after, limit, |e| e.feed_row());
        }
        let sql = codec::change_log_sql(feed)
            .ok_or_else(|| StoreError::UnknownTable(format!("{feed:?}")))?;
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params![after, i64::try_from(limit).unwrap_or(i64::MAX)])?;
        let mut out = vec![];
        while let Some(r) = rows.next()? {
            out.push(codec::change_log_row(feed, r)?);
        }
        Ok(out)
    }

    fn read_flat_events(
        &mut self,
        filter: &EventFilter,
        after: i64,
        limit: usize,
    ) -> Result<Vec<FlatEventRow>, StoreError> {
        self.read_events(filter, after, limit, |e| e.flat_row())
    }

    fn store_id(&mut self) -> Result<String, StoreError> {
        Ok(self.conn.query_row(STORE_ID_SQL, [], |r| r.get(0))?)
    }

    fn head_seq(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT head FROM seq_counter WHERE id = 1", [], |r| {
                r.get(0)
            })?)
    }

    fn track_event_names(&mut self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM track_events ORDER BY name")?;
        Ok(stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?)
    }

    fn load_state(&mut self) -> Result<(Vec<ProfileState>, Vec<IdentifierState>), StoreError> {
        // One snapshot for both tables (WAL), as PostgreSQL's one transaction: a write
        // committed between the two reads would give profiles and identifiers that disagree.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let (p, i, _) = load_state(&tx, None)?;
        tx.commit()?;
        Ok((p, i))
    }

    fn read_profiles(
        &mut self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ProfileState>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = state_read_sql(StateRead::Profiles, after.is_some(), "?");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let raw = match after {
            Some(after) => stmt.query_map(params![after, limit], raw_profile)?,
            None => stmt.query_map(params![limit], raw_profile)?,
        }
        .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(RawProfile::decode).collect()
    }

    fn profiles_by_id(&mut self, ids: &[&str]) -> Result<Vec<ProfileState>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {PROFILE_COLUMNS} FROM profiles WHERE segment_id = ?1"
        ))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(raw) = stmt.query_row([id], raw_profile).optional()? {
                out.push(raw.decode()?);
            }
        }
        Ok(out)
    }

    fn read_identifiers(
        &mut self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<IdentifierState>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = state_read_sql(StateRead::Identifiers, after.is_some(), "?");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, String, String, i64, i64)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        };
        let raw = match after {
            Some((t, v)) => stmt.query_map(params![t, v, limit], row)?,
            None => stmt.query_map(params![limit], row)?,
        }
        .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter()
            .map(|(t, v, s, f, l)| codec::identifier(t, v, s, f, l))
            .collect()
    }

    fn upsert_source(&mut self, s: &SourceInfo) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO sources (id, name, slug) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO UPDATE SET name = excluded.name, slug = excluded.slug",
            params![s.id, s.name, s.slug],
        )?;
        Ok(())
    }

    fn sources(&mut self) -> Result<Vec<SourceInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, name, slug FROM sources ORDER BY id")?;
        Ok(stmt
            .query_map([], |r| {
                Ok(SourceInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    slug: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?)
    }

    fn warm_up(&mut self) -> Result<(), StoreError> {
        let tuning = self.dedupe.tuning;
        // A deferred transaction reads one snapshot (WAL) and takes no write lock.
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let head: i64 = tx.query_row("SELECT head FROM seq_counter WHERE id = 1", [], |r| {
            r.get(0)
        })?;
        let (profiles, identifiers, names) = load_state(&tx, None)?;
        // After a failed write the ids are as before it: caught up, not read again.
        let mut recent = RecentIds::at_head(self.dedupe.committed.take(), &mut tx, head, tuning)?;
        recent.follow_extent(&mut tx)?;
        tx.commit()?;
        self.resolver.restore(profiles, identifiers, names, head);
        self.dedupe.committed = Some(recent);
        Ok(())
    }

    fn live_profiles(&self) -> usize {
        self.resolver.graph().profile_count()
    }

    fn event_count(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))?)
    }

    fn event_seq_since(
        &mut self,
        received_at: crate::event::Timestamp,
    ) -> Result<Option<i64>, StoreError> {
        Ok(self.conn.query_row(
            "SELECT min(seq) FROM events WHERE received_at_us >= ?1",
            [micros(received_at)],
            |r| r.get(0),
        )?)
    }

    fn set_consumer(&mut self, c: &Consumer) -> Result<(), StoreError> {
        self.conn.execute(
            retention::SET_CONSUMER_SQL,
            params![c.name, c.after_seq, c.window_seconds, micros(c.updated_at)],
        )?;
        Ok(())
    }

    fn remove_consumer(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute(retention::REMOVE_CONSUMER_SQL, [name])? > 0)
    }

    fn consumers(&mut self) -> Result<Vec<Consumer>, StoreError> {
        let mut stmt = self.conn.prepare_cached(retention::CONSUMERS_SQL)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(name, after_seq, window_seconds, at)| {
                Ok(Consumer {
                    name,
                    after_seq,
                    window_seconds,
                    updated_at: codec::timestamp("feed_consumers", at)?,
                })
            })
            .collect()
    }

    fn pruned(&mut self) -> Result<Pruned, StoreError> {
        let mut pruned = self.conn.query_row(retention::PRUNED_SQL, [], |r| {
            Ok(Pruned::from_row(r.get(0)?, r.get(1)?))
        })?;
        pruned.by_name = self
            .conn
            .prepare_cached(retention::PRUNED_NAMES_SQL)?
            .query_map([], |r| {
                Ok(PrunedName {
                    event_type: r.get(0)?,
                    event: r.get(1)?,
                    max_received_at_us: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pruned)
    }

    fn prune_events(&mut self, keep: &Keep, max: usize) -> Result<PruneStep, StoreError> {
        let mut tx =
            rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let step = retention::prune_in(&mut tx, "", keep, max)?;
        tx.commit()?;
        Ok(step)
    }

    fn prune_message_ids(&mut self, max: usize) -> Result<IdPruneStep, StoreError> {
        // The oldest run's scan in a read: no write lock held for it.
        let mut read = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        retention::oldest_run_top(&mut read, &mut self.dedupe.oldest_run_top)?;
        read.commit()?;
        let mut tx =
            rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let (step, known) = retention::prune_ids_in(&mut tx, self.dedupe.oldest_run_top, max)?;
        tx.commit()?;
        self.dedupe.oldest_run_top = known;
        Ok(step)
    }
}
