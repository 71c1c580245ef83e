//! The sync (`profiles-sync sync`): reads the store's change feeds after each table's cursor and
//! lands Profiles Sync's tables (README, "The sync") in a warehouse with its guarantees — each chunk of rows commits in
//! the same transaction as its table's cursor, so a sync killed at any instant and run again
//! leaves every table exactly as one clean run would.

pub mod columns;
pub mod events;
pub mod load;
pub mod materialize;
pub mod naming;
mod pipeline;
pub mod report;
pub mod source;
pub mod state;
pub mod tables;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use jiff::Timestamp;
use serde_json::Value;

pub use report::{SyncReport, TableReport};
pub use source::{EngineSource, FeedSource, SourceError, StoreSource};

use crate::crd::{ColumnFilter, ErrorClass, SelectiveSyncSpec, SyncError, WarehouseConnectionSpec};
use crate::event::EventType;
use crate::store::{Feed, FeedRow, Pruned, SourceInfo};
use crate::warehouse::{Warehouse, WarehouseError};
use load::{Chunk, ChunkResult, PendingRow, Schema};
use pipeline::{ChunkWriter, Outcome, Pages, Written, read_pages};
use state::TableState;
use tables::{
    EVENTS_WATERMARK, MATERIALIZED, MATERIALIZED_CURSOR, PROFILE_TRAITS_UPDATES, RAW,
    TRAITS_RESERVED,
};

/// Why a sync step failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The change feed could not be read.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// The warehouse refused something that is not specific to one table.
    #[error("{0}")]
    Warehouse(#[from] WarehouseError),
}

/// Rows routed to one event table in one page: its event type, the rows, new column names.
type TableBuffer = (EventType, Vec<PendingRow>, Vec<(String, String)>);

/// What to sync, and how.
pub struct SyncOptions<'a> {
    /// The sync's id (reported back; the Job's slot).
    pub id: String,
    /// The WarehouseConnection's spec.
    pub connection: &'a WarehouseConnectionSpec,
    /// The SelectiveSync's spec, when one applies.
    pub selection: Option<&'a SelectiveSyncSpec>,
    /// Rows read from a feed per request (and loaded per transaction at most).
    pub page_size: usize,
    /// The connection as a feed consumer (`namespace/name`): after a run, the events it still
    /// needs are recorded under this name, so that the engine's retention keeps them. `None`
    /// records nothing (a dry run, a one-off sync).
    pub consumer: Option<&'a str>,
    /// The time the run is judged at (backfill windows, `enabled_since`).
    pub now: Timestamp,
}

/// Runs one sync and reports what it did; never panics on warehouse or store errors.
pub fn run(
    source: &mut dyn FeedSource,
    wh: &mut dyn Warehouse,
    opts: &SyncOptions<'_>,
) -> SyncReport {
    let start = Timestamp::now();
    let _span = tracing::info_span!("sync", id = %opts.id, schema = %wh.schema()).entered();
    if let Some(sel) = opts.selection
        && let Err(e) = sel.validate()
    {
        return SyncReport::failed(
            &opts.id,
            start,
            ErrorClass::Schema,
            format!("invalid SelectiveSync: {e}"),
        );
    }
    if let Err(e) = wh.test_connection() {
        return SyncReport::failed(
            &opts.id,
            start,
            e.class,
            format!("connection test failed: {}", e.message),
        );
    }
    // A selection may name a Track event table as `availableTables` lists it (its whole name);
    // where the warehouse shortens that name, the entry applies to the shortened table.
    // Without the names, such an entry's table would load as if the selection did not name it
    // (its excluded columns too): the run fails instead, before it loads anything.
    let max_len = wh.dialect().max_identifier_len();
    let renamed = match opts.selection {
        Some(sel) if sel.tables.iter().any(|t| t.name.len() > max_len) => {
            match source.track_event_names() {
                Ok(events) => events::with_warehouse_names(sel, &events, max_len),
                Err(e) => {
                    return SyncReport::failed(
                        &opts.id,
                        start,
                        ErrorClass::Connection,
                        format!(
                            "the Track event names, needed for the SelectiveSync's tables \
                             longer than the warehouse's {max_len}-byte names, could not be \
                             read: {e}"
                        ),
                    );
                }
            }
        }
        _ => None,
    };
    let renamed_opts;
    let opts = match &renamed {
        Some(sel) => {
            renamed_opts = SyncOptions {
                id: opts.id.clone(),
                selection: Some(sel),
                ..*opts
            };
            &renamed_opts
        }
        None => opts,
    };
    let mut run = Run::new(opts, start);
    match run.execute(source, wh) {
        Ok(()) => {
            if let Some(after) = run.events_needed_after() {
                run.record_progress(source, after);
            }
        }
        Err(e) => {
            let class = match &e {
                RunError::Source(_) => ErrorClass::Connection,
                RunError::Warehouse(w) => w.class,
            };
            run.report.errors.push(SyncError {
                class,
                message: e.to_string(),
                table: None,
            });
            // What committed before the stop is reported (and, rows loaded, makes the run a
            // partial success rather than a failure). Tables that had not caught up before it
            // are still backfilling (a first sync stopped midway is not complete).
            run.close_report();
        }
    }
    run.report.finish(start);
    tracing::info!(status = ?run.report.status, rows = run.report.rows.total, "sync finished");
    run.report
}

struct Run<'a> {
    opts: &'a SyncOptions<'a>,
    report: SyncReport,
    uuid: Timestamp,
    head: i64,
    states: BTreeMap<String, TableState>,
    failed: BTreeSet<String>,
    table_reports: BTreeMap<String, TableReport>,
    rows_left: Option<u64>,
    bytes_left: Option<u64>,
    /// Rows and bytes spent so far (of `limits`).
    spent: (u64, u64),
    /// Tables whose feed came back empty this run: they have everything the store has.
    caught_up: BTreeSet<String>,
    /// The change the schema recorded at its newest cursor, once checked against the store.
    anchor: Option<state::Anchor>,
}

fn micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

impl<'a> Run<'a> {
    fn new(opts: &'a SyncOptions<'a>, start: Timestamp) -> Run<'a> {
        let limits = opts.connection.limits.as_ref();
        Run {
            opts,
            report: SyncReport {
                id: opts.id.clone(),
                status: crate::crd::SyncStatus::Success,
                start_time: start.to_string(),
                duration_seconds: 0.0,
                rows: Default::default(),
                tables: vec![],
                errors: vec![],
                backfilling: vec![],
                not_backfilled: vec![],
                limit_reached: false,
                head_seq: 0,
                tables_omitted: 0,
                backfilling_omitted: 0,
            },
            uuid: start,
            head: 0,
            states: BTreeMap::new(),
            failed: BTreeSet::new(),
            table_reports: BTreeMap::new(),
            rows_left: limits.and_then(|l| l.max_rows).map(|n| n.max(0) as u64),
            bytes_left: limits.and_then(|l| l.max_bytes).map(|n| n.max(0) as u64),
            spent: (0, 0),
            caught_up: BTreeSet::new(),
            anchor: None,
        }
    }

    fn enabled(&self, table: &str) -> bool {
        self.opts.selection.is_none_or(|s| s.table_enabled(table))
    }

    /// The state a table runs with: its stored state with selection changes applied, or a new
    /// state starting at `cursor` (with `min_received_at`).
    fn resolve(&mut self, table: &str, cursor: i64, min_received_at: Option<i64>) -> TableState {
        let on = self.enabled(table);
        let now = micros(self.opts.now);
        let st = match self.states.get(table) {
            Some(s) if s.enabled == on => s.clone(),
            // Turned back on: new data only, from the current head (no backfill of the gap) —
            // except a materialized table, which holds current state, not a ledger: resumed
            // at the head it would keep what changed while it was off (a merge's moved rows, a
            // changed trait) wrong for good. It catches up from its own cursor, where it
            // stopped (the identity logs are complete); one that was never loaded (turned off
            // before its first sync, or midway through its backfill, or off under an earlier
            // release's shared cursor: `migrate_shared_profile_cursor`) loads from the start,
            // reported as backfilling until it is done.
            Some(s) if on && MATERIALIZED.contains(&table) => TableState {
                cursor: if s.backfilled { s.cursor } else { 0 },
                enabled: true,
                enabled_since_us: now,
                ..s.clone()
            },
            // (From the head, no backfill window applies: events that reach the store later
            // load whatever their receivedAt, as after a caught-up backfill.)
            Some(s) if on => TableState {
                cursor: self.head.max(s.cursor),
                enabled: true,
                enabled_since_us: now,
                min_received_at_us: None,
                ..s.clone()
            },
            Some(s) => TableState {
                enabled: false,
                ..s.clone()
            },
            None => TableState {
                cursor: if on { cursor } else { self.head },
                enabled: on,
                enabled_since_us: now,
                min_received_at_us: min_received_at.filter(|_| on),
                backfilled: false,
            },
        };
        self.states.insert(table.to_string(), st.clone());
        st
    }

    /// Records, for the engine's retention, that this connection still needs the events after
    /// `after`: at the start of its event load (a warehouse restored from a backup may be
    /// behind its last record), then after the run ([`Run::events_needed_after`]). A failure is
    /// logged only: the consumer's older record (or, without one, the retention window) still
    /// holds.
    fn record_progress(&self, source: &mut dyn FeedSource, after: i64) {
        let Some(consumer) = self.opts.consumer else {
            return;
        };
        let window = self
            .opts
            .connection
            .backfill
            .events_window()
            .unwrap_or_default()
            .as_secs();
        let window = i64::try_from(window).unwrap_or(i64::MAX);
        if let Err(e) = source.record_progress(consumer, after, window) {
            tracing::warn!(error = %e, consumer, "could not record this connection's progress for the engine's event retention");
        }
    }

    /// The `seq` after which the event tables still need events: the lowest cursor of those
    /// that are on (a table turned on later starts at the head) and of the watermark new
    /// tables start from; `None` before the first event load.
    fn events_needed_after(&self) -> Option<i64> {
        let watermark = self.states.get(EVENTS_WATERMARK)?.cursor;
        Some(
            self.states
                .iter()
                .filter(|(t, s)| s.enabled && is_event_table(t))
                .map(|(_, s)| s.cursor)
                .fold(watermark, i64::min),
        )
    }

    /// Reports the events the store's retention deleted before this connection loaded them:
    /// those after an event table's cursor up to the horizon or, on a first sync, those
    /// received since the start of the backfill window.
    fn note_retention_gap(
        &mut self,
        pruned: &Pruned,
        start: i64,
        first_window: Option<i64>,
        head_only: &BTreeSet<String>,
        max_len: usize,
    ) {
        let message = if start < pruned.through_seq {
            let behind: Vec<&str> = self
                .states
                .iter()
                .filter(|(t, s)| s.enabled && is_event_table(t) && s.cursor < pruned.through_seq)
                .map(|(t, _)| t.as_str())
                .collect();
            // Behind the horizon with no table: the watermark new Track tables start from.
            let which = if behind.is_empty() {
                "the event tables that appear from now on miss".to_string()
            } else {
                format!("{} miss", some_tables(&behind, "event table(s)"))
            };
            format!(
                "the engine's event retention deleted events up to seq {} before this connection loaded them: {which} the events from their cursor (the lowest at seq {start}) to it; keep the connection syncing, or lengthen the engine's --event-retention",
                pruned.through_seq,
            )
        } else if let Some(from) = first_window {
            // A first sync: the deleted events of the tables it backfills, received inside
            // its window (each type and Track name's newest deleted receivedAt).
            let mut hit: BTreeSet<String> = BTreeSet::new();
            let mut newest = i64::MIN;
            for n in pruned
                .by_name
                .iter()
                .filter(|n| n.max_received_at_us >= from)
            {
                let Some(t) = EventType::parse(&n.event_type) else {
                    continue;
                };
                let mut tables = vec![t.table().to_string()];
                if t == EventType::Track && !n.event.is_empty() {
                    tables.push(events::track_table(&n.event, max_len));
                }
                for table in tables {
                    if self.enabled(&table) && !head_only.contains(&table) {
                        newest = newest.max(n.max_received_at_us);
                        hit.insert(table);
                    }
                }
            }
            if hit.is_empty() {
                return;
            }
            let at = crate::engine::retention::timestamp_text;
            let hit: Vec<&str> = hit.iter().map(String::as_str).collect();
            format!(
                "the backfill window starts at {}, but the engine's event retention had deleted events of {} received after it (up to {}): they are not loaded; lengthen the engine's --event-retention to at least the longest backfill window",
                at(from),
                some_tables(&hit, "table(s)"),
                at(newest)
            )
        } else {
            return;
        };
        self.retention_error(message);
    }

    /// Reports events retention deleted before the run loaded them (logged too).
    fn retention_error(&mut self, message: String) {
        tracing::warn!("{message}");
        self.report.errors.push(SyncError {
            class: ErrorClass::Retention,
            message,
            table: None,
        });
    }

    /// With this connection recorded as a consumer from the start of its event load, the
    /// horizon cannot pass that start during the run; when it has, the record did not hold (it
    /// could not be written, or was removed meanwhile) and events the run had not read yet may
    /// have been deleted: reported, unless a gap was already. A run that records no progress
    /// holds nothing back: the horizon passing its start is reported alike.
    fn note_deleted_during_run(
        &mut self,
        source: &mut dyn FeedSource,
        start: i64,
    ) -> Result<(), RunError> {
        if self
            .report
            .errors
            .iter()
            .any(|e| e.class == ErrorClass::Retention)
        {
            return Ok(());
        }
        let through = source.pruned()?.through_seq;
        if through > start {
            let why = if self.opts.consumer.is_some() {
                "its record did not hold (it could not be written, or was removed meanwhile), so \
                 events between may be missing from its event tables; keep the connection's \
                 record in place (GET /v1/feed-consumers)"
            } else {
                "this run records no progress (`--record-progress`), so nothing held them back \
                 and those it had not read yet are missing from its event tables"
            };
            let message = format!(
                "during this run the engine's event retention deleted events up to seq {through}, past where this connection's event load started (seq {start}): {why}"
            );
            self.retention_error(message);
        }
        Ok(())
    }

    fn table_report(&mut self, table: &str) -> &mut TableReport {
        self.table_reports
            .entry(table.to_string())
            .or_insert_with(|| TableReport {
                name: table.to_string(),
                rows: 0,
                discards: 0,
                backfilling: false,
                error: None,
            })
    }

    fn fail_table(&mut self, table: &str, e: WarehouseError) {
        tracing::warn!(table, error = %e.message, class = ?e.class, "table failed; it is retried by the next sync");
        self.failed.insert(table.to_string());
        self.table_report(table).error = Some(SyncError {
            class: e.class,
            message: e.message,
            table: Some(table.to_string()),
        });
    }

    fn budget_left(&self) -> bool {
        self.rows_left != Some(0) && self.bytes_left != Some(0)
    }

    /// The lowest cursor of the enabled event tables that have not failed in this run: every
    /// table that needs an event before it has failed, so reading those events again (under a
    /// row limit, spending the budget on rows no table takes) is skipped. `None` when no such
    /// table is left.
    fn healthy_event_floor(&self) -> Option<i64> {
        self.states
            .iter()
            .filter(|(t, st)| st.enabled && is_event_table(t) && !self.failed.contains(*t))
            .map(|(_, st)| st.cursor)
            .min()
    }

    fn spend(&mut self, rows: u64, bytes: u64) {
        self.spent.0 += rows;
        self.spent.1 += bytes;
        if let Some(r) = self.rows_left.as_mut() {
            *r = r.saturating_sub(rows);
        }
        if let Some(b) = self.bytes_left.as_mut() {
            *b = b.saturating_sub(bytes);
        }
    }

    fn page(&self) -> usize {
        // The engine's feed API serves at most MAX_PAGE rows a page; asking for more would make
        // a full page look like the end of a log.
        let p = self.opts.page_size.clamp(1, crate::engine::feed::MAX_PAGE);
        match self.rows_left {
            Some(r) => p.min(usize::try_from(r).unwrap_or(usize::MAX)).max(1),
            None => p,
        }
    }

    fn execute(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
    ) -> Result<(), RunError> {
        state::ensure(wh)?;
        self.states = state::read(wh)?;
        let mut names = state::read_names(wh)?;
        let mut schema = Schema::of(wh)?;
        state::migrate_store(wh, &schema.tables)?;
        self.migrate_events_watermark(wh, &schema)?;
        self.migrate_shared_profile_cursor(wh)?;
        self.migrate_sqlite_prefixed(wh, &mut schema, &mut names)?;
        self.head = source.head()?;
        self.report.head_seq = self.head;
        self.check_same_store()?;
        self.check_store_id(source, wh)?;
        self.check_anchor(source, wh)?;
        let sources: HashMap<String, SourceInfo> = source
            .sources()?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let first_sync = !self.states.contains_key(EVENTS_WATERMARK);

        // Under a row or byte limit each part of the run (each identity log, the profile
        // tables, the events) first gets an equal share of what is left, so that a busy part
        // never starves the ones after it; what the events leave goes back to the others.
        let limited = self.rows_left.is_some() || self.bytes_left.is_some();
        let parts = RAW.len() as u64 + 2;
        let mut raw_names: Vec<columns::ColumnMap> = RAW
            .iter()
            .map(|table| {
                let mut map = columns::ColumnMap::with_reserved(TRAITS_RESERVED);
                for (s, c) in names.remove(*table).unwrap_or_default() {
                    map.restore(s, c);
                }
                map
            })
            .collect();
        for (i, (table, map)) in RAW.into_iter().zip(&mut raw_names).enumerate() {
            let share = parts - i as u64;
            self.with_share(limited.then_some(share), |run| {
                run.load_raw(source, wh, &mut schema, table, &sources, map)
            })?;
        }
        self.with_share(limited.then_some(2), |run| {
            run.load_materialized(source, wh, &mut schema)
        })?;
        self.report.limit_reached = false;
        self.load_events(source, wh, &mut schema, first_sync, names)?;
        if limited {
            for (table, map) in RAW.into_iter().zip(&mut raw_names) {
                self.load_raw(source, wh, &mut schema, table, &sources, map)?;
            }
            self.load_materialized(source, wh, &mut schema)?;
        }
        self.finish_states(source, wh)?;
        Ok(())
    }

    /// Refuses to sync a warehouse that has loaded past the store's head: every `seq` it holds
    /// came from a store with more changes than this one, so the store was replaced (a lost
    /// volume, a restore from a backup, an `export | import` into another store, which numbers
    /// the changes anew). Reading "after" its cursors would skip this store's changes up to them
    /// and report success with nothing loaded — for the profile tables for good.
    fn check_same_store(&self) -> Result<(), RunError> {
        let Some((table, ahead)) = self
            .states
            .iter()
            .filter(|(_, st)| st.cursor > self.head)
            .max_by_key(|(_, st)| st.cursor)
        else {
            return Ok(());
        };
        Err(RunError::Warehouse(WarehouseError::new(
            ErrorClass::Internal,
            format!(
                "this warehouse has loaded changes up to seq {} (its table {table}), but the \
                 store's head is {}: the store is not the one the schema was synced from (replaced, \
                 restored from a backup, or imported anew). Nothing was loaded. Sync into a new \
                 schema, or drop this schema's tables (with {}) so that the next sync loads the \
                 store from the start",
                ahead.cursor,
                self.head,
                tables::STATE
            ),
        )))
    }

    /// Refuses to sync a schema synced from another store — one that replaced it (a lost
    /// volume, an `export | import` into a new store, which numbers the changes anew) and has
    /// gone past the schema's cursors, which [`Self::check_same_store`] cannot see: reading
    /// after them would skip the changes up to them for good. A schema with no cursor past 0
    /// (its first sync, its state dropped to load the store from the start, or only syncs of an
    /// empty store), or synced by a release that kept no id, records the store's id; a source
    /// that cannot tell it (an older engine) is not checked. A restore from a backup keeps the
    /// id (and is caught only behind the cursors).
    fn check_store_id(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
    ) -> Result<(), RunError> {
        let Some(id) = source.store_id()? else {
            return Ok(());
        };
        let record = state::read_store(wh)?;
        match record.store_id {
            Some(synced) if synced == id => {
                self.anchor = record.anchor;
                Ok(())
            }
            Some(synced) if self.states.values().any(|s| s.cursor > 0) => {
                Err(RunError::Warehouse(WarehouseError::new(
                    ErrorClass::Internal,
                    format!(
                        "this schema was synced from the store with id {synced}, but the \
                         engine's store has id {id}: it replaced that store (a new volume, or \
                         an export imported anew) and numbers its changes differently, so \
                         reading after this schema's cursors would skip some for good. Nothing \
                         was loaded. Sync into a new schema, or drop this schema's tables (with \
                         {}) so that the next sync loads this store from the start",
                        tables::STATE
                    ),
                )))
            }
            _ => Ok(state::write_store(wh, &id)?),
        }
    }

    /// Refuses to sync a schema whose store was restored from a backup older than the schema's
    /// last sync and has since gone past its cursors: the store keeps its id, and numbers its
    /// new changes with `seq`s the schema has already loaded, so reading after the cursors would
    /// skip them for good. The change the schema recorded at its newest cursor (its
    /// [`state::Anchor`]) is then another one, or gone; a change retention deleted is not
    /// checked.
    fn check_anchor(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
    ) -> Result<(), RunError> {
        // Kept only once checked: the run records a new one otherwise.
        let Some(anchor) = self.anchor.take() else {
            return Ok(());
        };
        // Past the newest cursor, the schema no longer holds what it names: its state was
        // dropped, to load the store anew. It is forgotten at once, so that a run that fails
        // before recording another does not leave it to refuse the next one. (Past the head,
        // the cursors are too: `check_same_store` said so.)
        if anchor.seq > self.newest_cursor() {
            state::clear_anchor(wh)?;
            return Ok(());
        }
        if anchor.seq > self.head {
            return Ok(());
        }
        let now = match change_at(source, anchor.seq)? {
            Some((found, _)) if found == anchor => {
                self.anchor = Some(anchor);
                return Ok(());
            }
            Some((_, mut id)) => {
                // (A client's id, up to a message's size: the remedy must stay readable.)
                let whole = id.len();
                naming::truncate_at_char(&mut id, 64);
                let more = if id.len() < whole { "…" } else { "" };
                format!("that of the event with messageId {id:?}{more}")
            }
            None if source.pruned()?.through_seq >= anchor.seq => return Ok(()),
            None => "missing".to_string(),
        };
        Err(RunError::Warehouse(WarehouseError::new(
            ErrorClass::Internal,
            format!(
                "this schema has loaded the store's changes up to seq {}, but the store's \
                 change at that seq is now {now}, not the one loaded: the store was restored \
                 from a backup older than the schema's last sync (or rolled back) and has \
                 numbered new changes with seqs the schema has already loaded, so reading after \
                 its cursors would skip them for good. Nothing was loaded. Sync into a new \
                 schema, or drop this schema's tables (with {}) so that the next sync loads the \
                 store from the start",
                anchor.seq,
                tables::STATE
            ),
        )))
    }

    /// The highest cursor of any table (0 without one).
    fn newest_cursor(&self) -> i64 {
        self.states.values().map(|s| s.cursor).max().unwrap_or(0)
    }

    /// The anchor to record at the end of a run: the change at the newest cursor (which may
    /// have moved without rows), unless it is the anchor checked at the start. Best effort: a
    /// failed read leaves the anchors the chunks recorded, and does not fail the run.
    fn next_anchor(&self, source: &mut dyn FeedSource) -> Option<state::Anchor> {
        let seq = self.newest_cursor();
        if seq <= 0 || self.anchor.is_some_and(|a| a.seq == seq) {
            return None;
        }
        match change_at(source, seq) {
            Ok(found) => found.map(|(anchor, _)| anchor),
            Err(e) => {
                tracing::warn!(seq, error = %e, "could not read the change at the newest cursor: the schema's anchor stays where its chunks left it");
                None
            }
        }
    }

    /// Runs `part` with `1/share` of the rows and bytes left (all of them without a share),
    /// then takes what it spent from the run's budget.
    fn with_share<T>(
        &mut self,
        share: Option<u64>,
        part: impl FnOnce(&mut Self) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        let Some(share) = share else {
            return part(self);
        };
        let (rows, bytes) = (self.rows_left, self.bytes_left);
        self.rows_left = rows.map(|r| r.div_ceil(share));
        self.bytes_left = bytes.map(|b| b.div_ceil(share));
        let before = self.spent;
        let out = part(self);
        let (spent_rows, spent_bytes) = (self.spent.0 - before.0, self.spent.1 - before.1);
        self.rows_left = rows.map(|r| r.saturating_sub(spent_rows));
        self.bytes_left = bytes.map(|b| b.saturating_sub(spent_bytes));
        out
    }

    fn load_raw(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
        schema: &mut Schema,
        table: &'static str,
        sources: &HashMap<String, SourceInfo>,
        names: &mut columns::ColumnMap,
    ) -> Result<(), RunError> {
        let mut st = self.resolve(table, 0, None);
        // A table is read until it fails or catches up; a second call (under a limit, with
        // what the events left) goes on from its cursor.
        if !st.enabled || self.failed.contains(table) || self.caught_up.contains(table) {
            return Ok(());
        }
        self.table_report(table);
        let feed = match table {
            tables::ID_GRAPH_UPDATES => Feed::IdGraphUpdates,
            tables::EXTERNAL_ID_MAPPING_UPDATES => Feed::ExternalIdMappingUpdates,
            _ => Feed::ProfileTraitsUpdates,
        };
        let def = tables::fixed(table)
            .ok_or_else(|| WarehouseError::internal(format!("no definition of {table}")))?;
        let max_len = wh.dialect().max_identifier_len();
        let filter = self.opts.selection.map(|s| s.column_filter(table));
        while self.budget_left() {
            let rows = source.read(&feed, st.cursor, self.page())?;
            let Some(last) = rows.last().map(FeedRow::seq) else {
                self.caught_up.insert(table.to_string());
                break;
            };
            let mut pending = Vec::with_capacity(rows.len());
            let mut bytes = 0u64;
            for row in &rows {
                let p = raw_row(row, sources, names, max_len, filter.as_ref(), table);
                if self.bytes_left.is_some() {
                    bytes += row_bytes(&p);
                }
                pending.push(p);
            }
            let mut next = st.clone();
            next.cursor = last;
            let chunk = Chunk {
                table,
                key: def.key,
                fixed: &def.columns,
                filter: filter.as_ref(),
                rows: pending,
                new_names: names.take_new(),
                state: next.clone(),
                anchor: rows.last().map(state::Anchor::of_row),
                uuid_ts: self.uuid,
            };
            match load::commit(wh, schema, chunk) {
                Ok(r) => {
                    st = next;
                    self.committed(table, st.clone(), &r);
                    self.spend(rows.len() as u64, bytes);
                }
                Err(e) if e.class == ErrorClass::Connection => return Err(e.into()),
                Err(e) => {
                    self.fail_table(table, e);
                    break;
                }
            }
        }
        if !self.budget_left() && st.cursor < self.head {
            self.report.limit_reached = true;
        }
        Ok(())
    }

    /// Keeps the profile tables current. Each has its own cursor and transactions, so one the
    /// warehouse refuses never holds the others back; a window of the identity logs is read once
    /// for every table whose cursor is at its start (all of them, normally).
    fn load_materialized(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
        schema: &mut Schema,
    ) -> Result<(), RunError> {
        let mut active: Vec<(&'static str, TableState)> = vec![];
        for t in MATERIALIZED {
            // A first sync loads the profile tables from the beginning.
            let cursor = self.resolve(t, 0, None);
            if cursor.enabled && !self.failed.contains(t) && !self.caught_up.contains(t) {
                self.table_report(t);
                active.push((t, cursor));
            }
        }
        while self.budget_left() {
            let Some(after) = active.iter().map(|(_, c)| c.cursor).min() else {
                break;
            };
            // A window reads a page of each of the three identity logs: under a row limit, a
            // third of the rows left each.
            let page = match self.rows_left {
                Some(_) => self.page().div_ceil(3),
                None => self.page(),
            };
            let Some(window) = materialize::read_window(source, after, self.head, page)? else {
                // Nothing new after the lowest cursor: every table has read its logs to the end.
                for (t, _) in &active {
                    self.caught_up.insert(t.to_string());
                }
                active.clear();
                break;
            };
            let mut failed = vec![];
            let mut bytes = 0;
            for (t, cursor) in active.iter_mut().filter(|(_, c)| c.cursor == after) {
                match materialize::apply_window(wh, schema, t, cursor, &window, self.uuid) {
                    Ok(applied) => {
                        bytes += applied.bytes;
                        let r = ChunkResult {
                            rows: applied.rows,
                            discards: applied.discards,
                        };
                        self.committed(t, cursor.clone(), &r);
                    }
                    Err(e) if e.class == ErrorClass::Connection => {
                        return Err(RunError::Warehouse(e));
                    }
                    Err(e) => {
                        self.fail_table(t, e);
                        failed.push(*t);
                    }
                }
            }
            active.retain(|(t, _)| !failed.contains(t));
            self.spend(window.read, bytes);
        }
        // Stopped by the budget: the tables it left behind wait for the next run.
        for (t, cursor) in &active {
            if cursor.cursor < self.head {
                self.report.limit_reached = true;
            } else {
                self.caught_up.insert(t.to_string());
            }
        }
        Ok(())
    }

    /// Moves an older warehouse's events watermark ([`tables::LEGACY_EVENTS_WATERMARK`]) to
    /// its own row. Its old row stays as the state of a `_events` table when the warehouse has
    /// one (the two shared it), and is deleted otherwise.
    fn migrate_events_watermark(
        &mut self,
        wh: &mut dyn Warehouse,
        schema: &Schema,
    ) -> Result<(), RunError> {
        if self.states.contains_key(EVENTS_WATERMARK) {
            return Ok(());
        }
        let Some(legacy) = self.states.get(tables::LEGACY_EVENTS_WATERMARK).cloned() else {
            return Ok(());
        };
        let table_exists = schema.tables.contains_key(tables::LEGACY_EVENTS_WATERMARK);
        crate::warehouse::in_transaction(wh, |wh| {
            state::write(wh, &[(EVENTS_WATERMARK, &legacy)])?;
            if table_exists {
                Ok(())
            } else {
                state::remove(wh, tables::LEGACY_EVENTS_WATERMARK)
            }
        })?;
        self.states.insert(EVENTS_WATERMARK.to_string(), legacy);
        if !table_exists {
            self.states.remove(tables::LEGACY_EVENTS_WATERMARK);
        }
        Ok(())
    }

    /// Retires the cursor the profile tables shared under an earlier release
    /// ([`MATERIALIZED_CURSOR`]), once: that release moved every profile table's cursor along
    /// with it, those turned off included, though nothing loaded into them — so the cursor of a
    /// table that is off now cannot be trusted, and it is marked not loaded (turned back on, it
    /// loads from the start, reported as backfilling). The row goes in the same transaction.
    fn migrate_shared_profile_cursor(&mut self, wh: &mut dyn Warehouse) -> Result<(), RunError> {
        if !self.states.contains_key(MATERIALIZED_CURSOR) {
            return Ok(());
        }
        let off: Vec<(&'static str, TableState)> = MATERIALIZED
            .iter()
            .filter_map(|t| {
                let s = self.states.get(*t).filter(|s| !s.enabled && s.backfilled)?;
                Some((
                    *t,
                    TableState {
                        backfilled: false,
                        ..s.clone()
                    },
                ))
            })
            .collect();
        crate::warehouse::in_transaction(wh, |wh| {
            let rows: Vec<(&str, &TableState)> = off.iter().map(|(t, s)| (*t, s)).collect();
            state::write(wh, &rows)?;
            state::remove(wh, MATERIALIZED_CURSOR)
        })?;
        for (t, s) in off {
            self.states.insert(t.to_string(), s);
        }
        self.states.remove(MATERIALIZED_CURSOR);
        Ok(())
    }

    /// Moves the Track tables an older release named `sqlite_…` to their `_sqlite_…` names
    /// (SQLite refuses to create `sqlite_…` tables; every warehouse prefixes them since): the
    /// table where the warehouse has it (PostgreSQL), its column names and its state, with the
    /// cursor — on SQLite the events the refused table held back then load into the new one.
    fn migrate_sqlite_prefixed(
        &mut self,
        wh: &mut dyn Warehouse,
        schema: &mut Schema,
        names: &mut HashMap<String, Vec<(String, String)>>,
    ) -> Result<(), RunError> {
        let max_len = wh.dialect().max_identifier_len();
        let legacy: Vec<(String, String, TableState)> = self
            .states
            .iter()
            .filter(|(t, _)| t.starts_with("sqlite_"))
            .map(|(t, st)| (t.clone(), format!("_{t}"), st.clone()))
            .filter(|(_, new, _)| new.len() <= max_len && !self.states.contains_key(new))
            .collect();
        for (old, new, st) in legacy {
            let exists = schema.tables.contains_key(&old);
            crate::warehouse::in_transaction(wh, |wh| {
                if exists {
                    let d = wh.dialect();
                    let sql = format!(
                        "ALTER TABLE {} RENAME TO {}",
                        d.qualified(wh.schema(), &old),
                        d.quote(&new)
                    );
                    wh.execute(&sql)?;
                }
                state::rename_names(wh, &old, &new)?;
                state::write(wh, &[(new.as_str(), &st)])?;
                state::remove(wh, &old)
            })?;
            self.states.remove(&old);
            self.states.insert(new.clone(), st);
            if let Some(columns) = schema.tables.remove(&old) {
                schema.tables.insert(new.clone(), columns);
            }
            if let Some(dropped) = schema.dropped.remove(&old) {
                schema.dropped.insert(new.clone(), dropped);
            }
            if let Some(limits) = schema.limits.remove(&old) {
                schema.limits.insert(new.clone(), limits);
            }
            if let Some(n) = names.remove(&old) {
                names.insert(new, n);
            }
        }
        Ok(())
    }

    fn load_events(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
        schema: &mut Schema,
        first_sync: bool,
        names: HashMap<String, Vec<(String, String)>>,
    ) -> Result<(), RunError> {
        let max_len = wh.dialect().max_identifier_len();
        let (default_cursor, default_min) = match self.states.get(EVENTS_WATERMARK) {
            Some(w) if !first_sync => (w.cursor, None),
            _ => {
                let window = self
                    .opts
                    .connection
                    .backfill
                    .events_window()
                    .unwrap_or_default();
                let cutoff = self
                    .opts
                    .now
                    .checked_sub(jiff::SignedDuration::try_from(window).unwrap_or_default())
                    .unwrap_or(self.opts.now);
                let since = source.event_seq_since(cutoff)?;
                (
                    since.map(|s| s - 1).unwrap_or(self.head),
                    Some(micros(cutoff)),
                )
            }
        };
        // The first sync backfills at most maxEventTables Track event tables; the rest start at the head.
        // A Track table the selection names only by its whole name (the run's renaming did not
        // know its event: it first came after the run read the names) is left to the next run,
        // which renames it ([`events::unrenamed`]): resolved under this run's selection it
        // would be turned off (and, turned on by the next run, start at its head: its first
        // events lost) or load the columns the entry excludes.
        let mut track_tables: Vec<String> = source
            .track_event_names()?
            .iter()
            .map(|n| (n, events::track_table(n, max_len)))
            .filter(|(n, t)| !events::unrenamed(self.opts.selection, n, t))
            .map(|(_, t)| t)
            .collect();
        track_tables.sort();
        track_tables.dedup();
        let max_tables = self.opts.connection.backfill.max_event_tables as usize;
        let mut head_only: BTreeSet<String> = BTreeSet::new();
        if first_sync {
            for t in track_tables
                .iter()
                .filter(|t| self.enabled(t))
                .skip(max_tables)
            {
                head_only.insert(t.clone());
            }
        }
        self.report.not_backfilled = head_only.iter().cloned().collect();
        let mut start = default_cursor;
        let type_tables: Vec<String> = EventType::ALL
            .iter()
            .map(|t| t.table().to_string())
            .collect();
        for t in type_tables.iter().chain(track_tables.iter()) {
            let (c, m) = if head_only.contains(t) {
                (self.head, None)
            } else {
                (default_cursor, default_min)
            };
            let st = self.resolve(t, c, m);
            if st.enabled {
                start = start.min(st.cursor);
                self.table_report(t);
            }
        }
        // Recorded before the horizon is read: a retention pass that starts after the record
        // keeps everything this run reads.
        self.record_progress(source, start);
        let pruned = source.pruned()?;
        self.note_retention_gap(&pruned, start, default_min, &head_only, max_len);
        if first_sync {
            // Each event table's starting point (the backfill window's, or the head for tables
            // over maxEventTables) is kept before any row loads: a first sync stopped part-way
            // and rerun later resumes from the same points instead of a window computed anew.
            let tables: BTreeSet<&str> = type_tables
                .iter()
                .chain(track_tables.iter())
                .map(String::as_str)
                .collect();
            self.save_states(wh, |t| tables.contains(t), None)?;
        }

        let mut router = events::Router::new(self.opts.selection, max_len, names);
        let mut pos = start;
        // Without row limits every page is full-size, so a thread reads (and parses) the next
        // page while this one loads; with limits each page's size depends on the previous one.
        let read_ahead = self.rows_left.is_none();
        let page_size = self.page();
        // Chunks are typed against the schema as it will be once the chunks before them commit.
        let mut planned = schema.clone();
        std::thread::scope(|scope| -> Result<(), RunError> {
            let mut pages = if read_ahead {
                Pages::Ahead(read_pages(scope, source, start, page_size))
            } else {
                Pages::Direct(source)
            };
            let mut writer = ChunkWriter::spawn(scope, wh, schema);
            let result = (|| -> Result<(), RunError> {
                while self.budget_left() {
                    // Under a row limit, reading spends the budget: events no table still needs
                    // are skipped. A table failing on every run (its cursor the lowest) had
                    // each run spend its budget reading again what the others had loaded, and
                    // their cursors never moved again: once it has failed, reading goes on from
                    // the lowest cursor of the tables that have not — from the head when none
                    // is left. (Without a limit the reader runs ahead, and reading costs none.)
                    if let Pages::Direct(_) = pages {
                        let floor = self.healthy_event_floor().unwrap_or(self.head);
                        if floor > pos {
                            pos = floor;
                        }
                    }
                    let mut rows = match &mut pages {
                        Pages::Direct(source) => source.read_events(pos, self.page())?,
                        Pages::Ahead(reader) => reader
                            .pages
                            .recv()
                            .map_err(|_| SourceError("the feed reader stopped".into()))??,
                    };
                    let Some(mut page_end) = rows.last().map(|r| r.seq) else {
                        let done: Vec<String> = self
                            .states
                            .keys()
                            .filter(|t| {
                                matches!(
                                    tables::group(t),
                                    tables::TableGroup::EventTypes | tables::TableGroup::Events
                                )
                            })
                            .cloned()
                            .collect();
                        self.caught_up.extend(done);
                        break;
                    };
                    // (Taken before routing, which moves the rows' values.)
                    let page_anchor = rows.last().map(|r| {
                        state::Anchor::of_event(r.seq, &r.event.event.message_id, &r.segment_id)
                    });
                    let mut buffers: BTreeMap<Arc<str>, TableBuffer> = BTreeMap::new();
                    let mut bytes = 0u64;
                    let (mut targets, mut candidates) = (Vec::with_capacity(2), vec![]);
                    // The run stops before the first event of a table it cannot rename.
                    let mut stopped = false;
                    for e in rows.iter_mut() {
                        let received = micros(e.event.event.received_at);
                        targets.clear();
                        router.targets(&e.event.event, &mut candidates);
                        for target in candidates.drain(..) {
                            if self.failed.contains(&*target) {
                                continue;
                            }
                            let st = match self.states.get(&*target) {
                                Some(s) => s.clone(),
                                // (Only Track tables are resolved here: the type tables were.)
                                None if e.event.event.event.as_deref().is_some_and(|name| {
                                    events::unrenamed(self.opts.selection, name, &target)
                                }) =>
                                {
                                    stopped = true;
                                    break;
                                }
                                None => {
                                    let (c, m) = if head_only.contains(&*target) {
                                        (self.head, None)
                                    } else {
                                        (default_cursor, default_min)
                                    };
                                    let st = self.resolve(&target, c, m);
                                    if st.enabled {
                                        self.table_report(&target);
                                    }
                                    st
                                }
                            };
                            if st.enabled
                                && e.seq > st.cursor
                                && st.min_received_at_us.is_none_or(|m| received >= m)
                            {
                                targets.push(target);
                            }
                        }
                        if stopped {
                            page_end = e.seq - 1;
                            break;
                        }
                        let event_type = e.event.event.event_type;
                        let last = targets.len();
                        for (i, target) in targets.drain(..).enumerate() {
                            // The event's last table takes its values instead of copying them.
                            let (pending, new) = router.row(&target, e, i + 1 == last);
                            if self.bytes_left.is_some() {
                                bytes += row_bytes(&pending);
                            }
                            let buf = buffers
                                .entry(target)
                                .or_insert_with(|| (event_type, vec![], vec![]));
                            buf.1.push(pending);
                            buf.2.extend(new);
                        }
                    }
                    for (table, (event_type, pending, new_names)) in buffers {
                        let Some(mut next) = self.states.get(&*table).cloned() else {
                            continue;
                        };
                        next.cursor = page_end;
                        let fixed = events::fixed_columns(event_type);
                        let filter = self.opts.selection.map(|s| s.column_filter(&table));
                        let chunk = Chunk {
                            table: &table,
                            key: &["id"],
                            fixed: &fixed,
                            filter: filter.as_ref(),
                            rows: pending,
                            new_names,
                            state: next,
                            // (Cut short, the page holds no change at its end.)
                            anchor: (!stopped).then_some(page_anchor).flatten(),
                            uuid_ts: self.uuid,
                        };
                        let prepared = load::prepare(&planned, chunk);
                        load::plan(&mut planned, &prepared);
                        writer.send(prepared)?;
                    }
                    // With a row limit, the next page's size depends on what this one loaded: wait
                    // for it. Otherwise collect what is done and go on preparing while it writes
                    // (`loaded` is then partial, and only the byte budget counts).
                    let written = if read_ahead {
                        writer.ready()
                    } else {
                        writer.wait()
                    };
                    let loaded = self.record(written)?;
                    self.spend(loaded.max(rows.len() as u64), bytes);
                    pos = page_end;
                    if stopped {
                        tracing::info!(
                            through_seq = pos,
                            "a Track event the selection names by its whole name first came during this run: the next run renames its table and goes on from here"
                        );
                        break;
                    }
                    if let Pages::Ahead(reader) = &pages {
                        // Fails only when the reader has stopped; the page is then freed here.
                        let _ = reader.spent.send(rows);
                    }
                }
                Ok(())
            })();
            // Whatever ended the loop, the chunks already sent are written: record them.
            let recorded = self.record(writer.finish());
            result.and(recorded.map(|_| ()))
        })?;
        if !self.budget_left() && pos < self.head {
            self.report.limit_reached = true;
        }
        self.note_deleted_during_run(source, start)?;
        // Every enabled, healthy event table has seen every event up to `pos`.
        let tables: Vec<String> = self
            .states
            .keys()
            .filter(|t| is_event_table(t))
            .cloned()
            .collect();
        for t in tables {
            if self.failed.contains(&t) {
                continue;
            }
            if let Some(s) = self.states.get_mut(&t)
                && s.enabled
                && s.cursor < pos
            {
                s.cursor = pos;
            }
        }
        let watermark = self
            .states
            .get(EVENTS_WATERMARK)
            .map(|w| w.cursor)
            .unwrap_or(default_cursor)
            .max(pos);
        let now = micros(self.opts.now);
        self.states.insert(
            EVENTS_WATERMARK.to_string(),
            TableState {
                cursor: watermark,
                enabled: true,
                enabled_since_us: now,
                min_received_at_us: None,
                backfilled: true,
            },
        );
        Ok(())
    }

    /// Records a committed chunk of `table`: its new state, and its rows and discards in the
    /// report.
    fn committed(&mut self, table: &str, state: TableState, r: &ChunkResult) {
        self.states.insert(table.to_string(), state);
        let rep = self.table_report(table);
        rep.rows += r.rows;
        rep.discards += r.discards;
    }

    /// Takes in the outcomes of written chunks: a committed chunk moves its table's state and
    /// counts its rows; a failed one fails its table. Returns the rows loaded; a connection
    /// error ends the run.
    fn record(&mut self, written: Vec<Written>) -> Result<u64, RunError> {
        let mut loaded = 0;
        let mut broken = None;
        for (table, state, outcome) in written {
            match outcome {
                Outcome::Written(r) => {
                    self.committed(&table, state, &r);
                    loaded += r.rows;
                }
                Outcome::Failed(e) if e.class == ErrorClass::Connection => {
                    broken.get_or_insert(e);
                }
                Outcome::Failed(e) => self.fail_table(&table, e),
                Outcome::Skipped => {}
            }
        }
        match broken {
            Some(e) => Err(e.into()),
            None => Ok(loaded),
        }
    }

    /// Writes the states of the tables `which` picks, and `anchor` when given, in one
    /// transaction.
    fn save_states(
        &self,
        wh: &mut dyn Warehouse,
        which: impl Fn(&str) -> bool,
        anchor: Option<state::Anchor>,
    ) -> Result<(), RunError> {
        let states: Vec<(&str, &TableState)> = self
            .states
            .iter()
            .filter(|(k, _)| which(k))
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        crate::warehouse::in_transaction(wh, |wh| {
            state::write(wh, &states)?;
            anchor.map_or(Ok(()), |a| state::advance_anchor(wh, a))
        })?;
        Ok(())
    }

    /// Records cursors moved without rows, selection changes and backfill progress, in one transaction.
    fn finish_states(
        &mut self,
        source: &mut dyn FeedSource,
        wh: &mut dyn Warehouse,
    ) -> Result<(), RunError> {
        let head = self.head;
        for (name, s) in self.states.iter_mut() {
            if s.enabled
                && !self.failed.contains(name)
                && (s.cursor >= head || self.caught_up.contains(name))
            {
                s.backfilled = true;
                // The backfill window bounds the history the first sync found, no more: events
                // that reach the store later load whatever their receivedAt (an import keeps
                // its events' own).
                s.min_received_at_us = None;
            }
        }
        let anchor = self.next_anchor(source);
        self.save_states(wh, |_| true, anchor)?;
        self.close_report();
        Ok(())
    }

    /// Moves the table reports into the report, each marked as backfilling when its table is
    /// on and has not caught up yet, and lists every such table in `report.backfilling`.
    fn close_report(&mut self) {
        let pending = |name: &str, s: &TableState| {
            s.enabled && !s.backfilled && name != EVENTS_WATERMARK && name != MATERIALIZED_CURSOR
        };
        let mut tables: Vec<TableReport> = std::mem::take(&mut self.table_reports)
            .into_values()
            .collect();
        for t in &mut tables {
            t.backfilling = self
                .states
                .get(&t.name)
                .is_some_and(|s| pending(&t.name, s));
        }
        self.report.backfilling = self
            .states
            .iter()
            .filter(|(name, s)| pending(name, s))
            .map(|(name, _)| name.clone())
            .collect();
        self.report.tables = tables;
    }
}

/// The anchor of the change at `seq`, and the messageId of its event (or of the event that
/// caused it): every `seq` up to the head names one row of one feed, unless retention deleted
/// its event.
fn change_at(
    source: &mut dyn FeedSource,
    seq: i64,
) -> Result<Option<(state::Anchor, String)>, SourceError> {
    let feeds = [
        Feed::Events(crate::store::EventFilter::All),
        Feed::IdGraphUpdates,
        Feed::ExternalIdMappingUpdates,
        Feed::ProfileTraitsUpdates,
    ];
    for feed in &feeds {
        if let Some(row) = source.read(feed, seq - 1, 1)?.into_iter().next()
            && row.seq() == seq
        {
            return Ok(Some((
                state::Anchor::of_row(&row),
                row.message_id().to_string(),
            )));
        }
    }
    Ok(None)
}

/// `N <noun> (a, b, c, d, e, …)`: how many tables, and the first five.
fn some_tables(tables: &[&str], noun: &str) -> String {
    let more = if tables.len() > 5 { ", …" } else { "" };
    let shown: Vec<&str> = tables.iter().take(5).copied().collect();
    format!("{} {noun} ({}{more})", tables.len(), shown.join(", "))
}

/// Whether a state row is an event table's (not the events watermark's or the materialized
/// cursor's).
fn is_event_table(t: &str) -> bool {
    matches!(
        tables::group(t),
        tables::TableGroup::EventTypes | tables::TableGroup::Events
    ) && t != EVENTS_WATERMARK
        && t != MATERIALIZED_CURSOR
}

/// The size of a row as sent to the warehouse, for `limits.maxBytes` (measured only when set:
/// serializing every value costs a tenth of a load).
fn row_bytes(row: &PendingRow) -> u64 {
    row.values.iter().map(|(_, v)| v.json_len() as u64).sum()
}

/// The row of a change-log feed row for its raw table.
fn raw_row(
    row: &FeedRow,
    sources: &HashMap<String, SourceInfo>,
    names: &mut columns::ColumnMap,
    max_len: usize,
    filter: Option<&ColumnFilter<'_>>,
    table: &str,
) -> PendingRow {
    let mut values: BTreeMap<String, Value> = BTreeMap::new();
    let m = row.to_json();
    for (k, v) in &m {
        if k != "traits" {
            values.insert(k.clone(), v.clone());
        }
    }
    if let Some(Value::String(src)) = m.get("triggering_event_source_id") {
        let info = sources.get(src);
        values.insert(
            "triggering_event_source_name".into(),
            info.map(|s| Value::String(s.name.clone()))
                .unwrap_or(Value::Null),
        );
        values.insert(
            "triggering_event_source_slug".into(),
            info.map(|s| Value::String(s.slug.clone()))
                .unwrap_or(Value::Null),
        );
    }
    let mut refused = vec![];
    if let FeedRow::Traits(t) = row {
        let mut pairs = vec![];
        columns::flatten("", &t.traits, &mut pairs);
        for (path, v) in pairs {
            if v.is_null() || table != PROFILE_TRAITS_UPDATES {
                continue;
            }
            if let Some(col) = names.column(&path, max_len)
                && filter.is_none_or(|f| events::property_enabled(f, &col, &path, max_len))
            {
                // A literal dotted trait name can flatten to a nested one's path: the first
                // keeps the column, the others go to discards.
                match values.entry(col) {
                    std::collections::btree_map::Entry::Occupied(taken) => {
                        let col = taken.key().clone();
                        let reason = columns::same_name_reason(&col);
                        refused.push((col, columns::Field::Json(v), reason));
                    }
                    std::collections::btree_map::Entry::Vacant(free) => {
                        free.insert(v);
                    }
                }
            }
        }
    }
    let row_id = row.seq().to_string();
    let received_at = m
        .get("received_at")
        .and_then(|v| columns::cast(v, crate::warehouse::ColumnType::Timestamp).ok())
        .unwrap_or(crate::warehouse::Cell::Null);
    PendingRow {
        row_id,
        received_at,
        values: values
            .into_iter()
            .map(|(k, v)| (load::ColumnName::from(k), columns::Field::Json(v)))
            .collect(),
        refused,
    }
}
