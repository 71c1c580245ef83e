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
