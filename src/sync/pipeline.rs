//! The events sync's pipeline: the feed is read and parsed one page ahead on one thread, rows
//! are routed and typed on the caller's thread, and typed chunks are written to the warehouse on
//! a third — so the warehouse works on one chunk while the next is being prepared.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::Scope;

use super::load::{self, ChunkResult, Prepared, Schema};
use super::source::{FeedSource, SourceError};
use super::state::TableState;
use crate::crd::ErrorClass;
use crate::store::FlatEventRow;
use crate::warehouse::{Warehouse, WarehouseError};

/// Where the events sync's pages come from.
pub(super) enum Pages<'s> {
    /// Read on this thread, each page sized by the budget left.
    Direct(&'s mut dyn FeedSource),
    /// Read ahead on a second thread.
    Ahead(PageReader),
}

/// The event feed read on a second thread, one page ahead.
pub(super) struct PageReader {
    /// The pages, in order; the reader stops after an empty page or an error.
    pub(super) pages: std::sync::mpsc::Receiver<Result<Vec<FlatEventRow>, SourceError>>,
    /// Pages done with go back to the reader to be freed there: it allocated them, and freeing
    /// them on the loading thread took a tenth of that thread's time.
    pub(super) spent: std::sync::mpsc::Sender<Vec<FlatEventRow>>,
}

/// Reads the event feed from `start` on a scoped thread, one page ahead of the caller; stops
/// after an empty page, an error, or when the caller drops the receiver.
pub(super) fn read_pages<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    source: &'scope mut dyn FeedSource,
    start: i64,
    page_size: usize,
) -> PageReader {
    let (tx, pages) = std::sync::mpsc::sync_channel(1);
    let (spent, spent_rx) = std::sync::mpsc::channel::<Vec<FlatEventRow>>();
    scope.spawn(move || {
        let mut pos = start;
        loop {
            while let Ok(page) = spent_rx.try_recv() {
                drop(page);
            }
            let page = source.read_events(pos, page_size);
            let end = page
                .as_ref()
                .ok()
                .and_then(|rows| rows.last().map(|r| r.seq));
            if tx.send(page).is_err() {
                return;
            }
            match end {
                Some(e) => pos = e,
                None => return,
            }
        }
    });
    PageReader { pages, spent }
}

/// What became of one chunk sent to the [`ChunkWriter`].
pub(super) enum Outcome {
    /// Committed.
    Written(ChunkResult),
    /// Rolled back with this error.
    Failed(WarehouseError),
    /// Not tried: an earlier chunk of its table failed, or the connection broke.
    Skipped,
}

/// A chunk's table, the state it moves the table to, and what became of it.
pub(super) type Written = (String, TableState, Outcome);

/// Writes prepared chunks to the warehouse on a scoped thread, in the order they are sent, one
/// transaction each ([`load::write_prepared`]). After a chunk of a table fails, the table's later
/// chunks are skipped (their rows would follow a gap); after a connection error, all are.
pub(super) struct ChunkWriter {
    chunks: Option<SyncSender<Prepared>>,
    results: Receiver<Written>,
    in_flight: usize,
}

impl ChunkWriter {
    /// Starts the writing thread; `schema` is the warehouse's committed schema, kept current
    /// there.
    pub(super) fn spawn<'scope>(
        scope: &'scope Scope<'scope, '_>,
        wh: &'scope mut dyn Warehouse,
        schema: &'scope mut Schema,
    ) -> ChunkWriter {
        // One chunk queued while one is written bounds what waits in memory.
        let (chunks, queued) = sync_channel::<Prepared>(1);
        let (done, results): (Sender<Written>, _) = channel();
        scope.spawn(move || {
            let mut failed: HashSet<String> = HashSet::new();
            let mut broken = false;
            for p in queued {
                let outcome = if broken || failed.contains(&p.table) {
                    Outcome::Skipped
                } else {
                    match load::write_prepared(wh, schema, &p) {
                        Ok(r) => Outcome::Written(r),
                        Err(e) => {
                            broken = e.class == ErrorClass::Connection;
                            failed.insert(p.table.clone());
                            Outcome::Failed(e)
                        }
                    }
                };
                if done.send((p.table, p.state, outcome)).is_err() {
                    return;
                }
            }
        });
        ChunkWriter {
            chunks: Some(chunks),
            results,
            in_flight: 0,
        }
    }

    /// Queues a chunk; waits while another is already queued.
    pub(super) fn send(&mut self, p: Prepared) -> Result<(), SourceError> {
        let stopped = || SourceError("the warehouse writer stopped".into());
        self.chunks
            .as_ref()
            .ok_or_else(stopped)?
            .send(p)
            .map_err(|_| stopped())?;
        self.in_flight += 1;
        Ok(())
    }

    /// The outcomes available now, without waiting.
    pub(super) fn ready(&mut self) -> Vec<Written> {
        let out: Vec<Written> = self.results.try_iter().collect();
        self.in_flight -= out.len();
        out
    }

    /// Waits for every chunk sent so far and returns their outcomes.
    pub(super) fn wait(&mut self) -> Vec<Written> {
        let mut out = Vec::with_capacity(self.in_flight);
        while self.in_flight > 0 {
            match self.results.recv() {
                Ok(w) => out.push(w),
                // The thread is gone (it panicked; the scope re-raises that).
                Err(_) => break,
            }
            self.in_flight -= 1;
        }
        out
    }

    /// Stops the thread once the chunks sent are written, and returns their outcomes.
    pub(super) fn finish(mut self) -> Vec<Written> {
        self.chunks = None;
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::load::{Chunk, PendingRow};
    use crate::sync::state;
    use crate::warehouse::sqlite::SqliteWarehouse;
    use crate::warehouse::{Cell, Column, ColumnType, Dialect, TableColumns};
    use std::collections::BTreeMap;

    /// A real SQLite warehouse whose statements naming `table` fail with `class`: a refused
    /// table, or (with `Connection`) the connection dropping when that table is written.
    struct FailingOn {
        inner: SqliteWarehouse,
        table: &'static str,
        class: ErrorClass,
    }

    impl Warehouse for FailingOn {
        fn dialect(&self) -> &dyn Dialect {
            self.inner.dialect()
        }
        fn schema(&self) -> &str {
            self.inner.schema()
        }
        fn test_connection(&mut self) -> Result<(), WarehouseError> {
            self.inner.test_connection()
        }
        fn describe(&mut self) -> Result<BTreeMap<String, TableColumns>, WarehouseError> {
            self.inner.describe()
        }
        fn column_limits(&self) -> BTreeMap<String, crate::warehouse::ColumnLimits> {
            self.inner.column_limits()
        }
        fn dropped_columns(&self) -> BTreeMap<String, usize> {
            self.inner.dropped_columns()
        }
        fn merge_stage(
            &self,
            table: &str,
            stage: &str,
            columns: &[&str],
            key: &[&str],
            on_conflict: crate::warehouse::OnConflict,
        ) -> String {
            self.inner
                .merge_stage(table, stage, columns, key, on_conflict)
        }
        fn begin(&mut self) -> Result<(), WarehouseError> {
            self.inner.begin()
        }
        fn commit(&mut self) -> Result<(), WarehouseError> {
            self.inner.commit()
        }
        fn rollback(&mut self) -> Result<(), WarehouseError> {
            self.inner.rollback()
        }
        fn execute(&mut self, sql: &str) -> Result<u64, WarehouseError> {
            if sql.contains(&format!("\"{}\"", self.table)) {
                return Err(WarehouseError::new(self.class, "injected failure"));
            }
            self.inner.execute(sql)
        }
        fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, WarehouseError> {
            self.inner.query(sql)
        }
        fn stage(
            &mut self,
            stage: &str,
            columns: &[Column],
            rows: &[Vec<Cell>],
        ) -> Result<(), WarehouseError> {
            self.inner.stage(stage, columns, rows)
        }
        fn append(
            &mut self,
            table: &str,
            columns: &[Column],
            rows: &[Vec<Cell>],
        ) -> Result<bool, WarehouseError> {
            self.inner.append(table, columns, rows)
        }
    }

    /// A one-row chunk for `table`, moving its cursor to `seq`.
    fn chunk(table: &str, seq: i64) -> Prepared {
        let fixed = [Column::new("id", ColumnType::Varchar)];
        let row = PendingRow {
            row_id: seq.to_string(),
            received_at: Cell::Null,
            values: vec![(
                load::ColumnName::Fixed("id"),
                serde_json::Value::String(seq.to_string()).into(),
            )],
            refused: vec![],
        };
        load::prepare(
            &Schema::default(),
            Chunk {
                table,
                key: &["id"],
                fixed: &fixed,
                filter: None,
                rows: vec![row],
                new_names: vec![],
                state: TableState {
                    cursor: seq,
                    enabled: true,
                    enabled_since_us: 0,
                    min_received_at_us: None,
                    backfilled: false,
                },
                anchor: None,
                uuid_ts: jiff::Timestamp::UNIX_EPOCH,
            },
        )
    }

    /// Writes chunks of `a`, `b`, `a`, `b` through a writer whose warehouse fails on `a` with
    /// `class`; returns each chunk's table and outcome ("a failed", "b written", "a skipped")
    /// and the rows of `b` that landed.
    fn run(class: ErrorClass) -> (Vec<String>, usize) {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner = SqliteWarehouse::open(&dir.path().join("wh.db"), "main").expect("warehouse");
        let mut wh = FailingOn {
            inner,
            table: "a",
            class,
        };
        state::ensure(&mut wh).expect("state tables");
        let mut schema = Schema::of(&mut wh).expect("describe");
        let written = std::thread::scope(|scope| {
            let mut writer = ChunkWriter::spawn(scope, &mut wh, &mut schema);
            for (table, seq) in [("a", 1), ("b", 2), ("a", 3), ("b", 4)] {
                writer.send(chunk(table, seq)).expect("send");
            }
            writer.finish()
        });
        let outcomes = written
            .into_iter()
            .map(|(table, _, o)| {
                let what = match o {
                    Outcome::Written(_) => "written",
                    Outcome::Failed(_) => "failed",
                    Outcome::Skipped => "skipped",
                };
                format!("{table} {what}")
            })
            .collect();
        let b_rows = wh
            .query("SELECT id FROM \"b\"")
            .map(|rows| rows.len())
            .unwrap_or(0);
        (outcomes, b_rows)
    }

    /// A table's failure skips its later chunks (their rows would follow a gap under its
    /// cursor) and leaves the other tables loading.
    #[test]
    fn a_failed_table_skips_only_its_own_later_chunks() {
        let (outcomes, b_rows) = run(ErrorClass::Schema);
        assert_eq!(
            outcomes,
            ["a failed", "b written", "a skipped", "b written"]
        );
        assert_eq!(b_rows, 2);
    }

    /// A connection error skips every chunk after it, whatever its table.
    #[test]
    fn a_connection_error_skips_every_later_chunk() {
        let (outcomes, b_rows) = run(ErrorClass::Connection);
        assert_eq!(
            outcomes,
            ["a failed", "b skipped", "a skipped", "b skipped"]
        );
        assert_eq!(b_rows, 0, "nothing written after the connection broke");
    }
}
