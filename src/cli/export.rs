//! `profiles-sync export`: print a change log, an event table or a current-state table.

use std::io::Write;

use serde_json::{Map, Value};

use crate::store::{Feed, StateTable, Store, state_rows};
use crate::sync::naming::table_name;

/// Output format of `export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header; nested values as JSON text.
    Csv,
}

/// Rows read from the store per page.
const PAGE: usize = 10_000;

/// Fixed CSV columns of the events feed (the full event is in the `json` column).
const EVENT_CSV_COLUMNS: [&str; 11] = [
    "seq",
    "segment_id",
    "event_source_id",
    "type",
    "messageId",
    "anonymousId",
    "userId",
    "event",
    "timestamp",
    "receivedAt",
    "json",
];

/// Which rows a table name denotes.
enum Source {
    /// A feed; for a Track event table, up to the head its event names were read at.
    Feed(Feed, Option<i64>),
    State(StateTable),
}

fn resolve_table(store: &mut dyn Store, table: &str) -> anyhow::Result<Source> {
    if let Some(state) = StateTable::from_table(table) {
        return Ok(Source::State(state));
    }
    // A Track event table's export ends at the head its event names were read at: an event of
    // a name new to the table committed later would be passed over (and skipped by a resumed
    // export).
    if let Some((feed, through)) = crate::engine::feed::feed_for(store, table)? {
        return Ok(Source::Feed(feed, through));
    }
    let names = store.track_event_names()?;
    let mut known: Vec<String> = Feed::TABLES
        .iter()
        .chain(StateTable::TABLES.iter())
        .map(|s| s.to_string())
        .collect();
    known.extend(names.iter().map(|n| table_name(n)));
    known.dedup();
    anyhow::bail!(
        "unknown table {table:?}; the store has: {}",
        known.join(", ")
    )
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Writes the rows of `table` with `seq > after` (feeds) or all rows (current-state tables).
/// Returns how many rows were written.
pub fn export(
    store: &mut dyn Store,
    table: &str,
    after: i64,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<usize> {
    let source = resolve_table(store, table)?;
    let mut paging = Paging {
        page: PAGE,
        warnings: &mut std::io::stderr(),
        hook: &mut |_| {},
    };
    export_source(store, table, source, after, format, out, &mut paging)
}

/// How [`export_source`] reads a feed: its page size, where it says what it could not
/// export, and (for tests) what runs at each [`Step`] of a page.
struct Paging<'a> {
    page: usize,
    warnings: &'a mut dyn Write,
    hook: &'a mut dyn FnMut(Step),
}

/// Where [`Paging::hook`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Before the page's horizon check and read.
    BeforePage,
    /// After its read, before the horizon is read again.
    AfterRead,
}

/// [`export`] of the rows `source` denotes.
fn export_source(
    store: &mut dyn Store,
    table: &str,
    source: Source,
    after: i64,
    format: Format,
    out: &mut dyn Write,
    paging: &mut Paging<'_>,
) -> anyhow::Result<usize> {
    // A current-state table has no seq: it is exported whole (the option was ignored).
    anyhow::ensure!(
        after == 0 || !matches!(source, Source::State(_)),
        "--after-seq applies to the change logs and event tables; {table} is a current-state table, exported whole"
    );
    let mut sink = match format {
        Format::Jsonl => Sink::Jsonl(out),
        Format::Csv => Sink::Csv {
            out: Box::new(csv::Writer::from_writer(out)),
            header: None,
            // The header of a CSV with no rows: the columns its rows would have.
            empty_header: match &source {
                Source::State(t) => t.columns().iter().map(|c| c.to_string()).collect(),
                Source::Feed(Feed::Events(_), _) => {
                    EVENT_CSV_COLUMNS.iter().map(|c| c.to_string()).collect()
                }
                Source::Feed(feed, _) => feed.columns().iter().map(|c| c.to_string()).collect(),
            },
        },
    };
    let mut count = 0;
    match source {
        Source::State(t) => {
            let (profiles, identifiers) = store.load_state()?;
            for row in state_rows(t, &profiles, &identifiers) {
                sink.emit(row, false)?;
                count += 1;
            }
        }
        Source::Feed(feed, through) => {
            let is_event = matches!(feed, Feed::Events(_));
            // Retention deletes events only, the oldest first, up to its horizon: a gap in them
            // is said, not left to be found. `gone`: the horizon said so far.
            let mut gone = 0;
            let mut cursor = after;
            'pages: loop {
                (paging.hook)(Step::BeforePage);
                // Deleted before the page is read: none of those is in the export.
                if is_event && let Some((from, to)) = newly_pruned(store, &mut gone, cursor)? {
                    writeln!(
                        paging.warnings,
                        "warning: event retention deleted the events up to seq {to}: the export \
                         holds none of those after seq {from} up to it"
                    )?;
                }
                let page = store.read_feed(&feed, cursor, paging.page)?;
                (paging.hook)(Step::AfterRead);
                // A pass that ran while the page was read may have deleted some of its events
                // first, or come after: read after the page, the horizon says which may be
                // missing.
                if is_event && let Some((from, to)) = newly_pruned(store, &mut gone, cursor)? {
                    writeln!(
                        paging.warnings,
                        "warning: event retention deleted the events up to seq {to} while the \
                         export ran: those after seq {from} up to it may be missing from it"
                    )?;
                }
                let Some(last) = page.last() else { break };
                cursor = last.seq();
                for row in page {
                    if through.is_some_and(|t| row.seq() > t) {
                        break 'pages;
                    }
                    sink.emit(row.to_json(), is_event)?;
                    count += 1;
                }
            }
        }
    }
    sink.finish()?;
    Ok(count)
}

/// The events retention deleted past both `gone` (the horizon said so far, moved to the new
/// one) and `cursor`, as the seqs the gap runs after and up to; `None` when it deleted none.
fn newly_pruned(
    store: &mut dyn Store,
    gone: &mut i64,
    cursor: i64,
) -> anyhow::Result<Option<(i64, i64)>> {
    let horizon = store.pruned()?.through_seq;
    let from = (*gone).max(cursor);
    if horizon <= from {
        return Ok(None);
    }
    *gone = horizon;
    Ok(Some((from, horizon)))
}

/// Where rows go, in the chosen format.
enum Sink<'a> {
    Jsonl(&'a mut dyn Write),
    Csv {
        out: Box<csv::Writer<&'a mut dyn Write>>,
        header: Option<Vec<String>>,
        /// Written when no row came (a CSV reader still gets the columns).
        empty_header: Vec<String>,
    },
}

impl Sink<'_> {
    fn emit(&mut self, row: Map<String, Value>, is_event: bool) -> anyhow::Result<()> {
        match self {
            Sink::Jsonl(w) => {
                serde_json::to_writer(&mut **w, &row)?;
                w.write_all(b"\n")?;
            }
            Sink::Csv { out, header, .. } => {
                if header.is_none() {
                    let cols: Vec<String> = if is_event {
                        EVENT_CSV_COLUMNS.iter().map(|s| s.to_string()).collect()
                    } else {
                        row.keys().cloned().collect()
                    };
                    out.write_record(&cols)?;
                    *header = Some(cols);
                }
                let cols = header.as_deref().unwrap_or_default();
                // The events' `json` column holds the whole row; other tables have no such column.
                let json = is_event.then(|| Value::Object(row.clone()).to_string());
                out.write_record(cols.iter().map(|c| match &json {
                    Some(j) if c == "json" => j.clone(),
                    // An event sent without a time has its receipt's (as the store and the
                    // warehouse have it); its JSON leaves `timestamp` out, as it came.
                    Some(_) if c == "timestamp" && row.get(c).is_none() => {
                        cell(row.get("receivedAt"))
                    }
                    _ => cell(row.get(c)),
                }))?;
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        if let Sink::Csv {
            mut out,
            header,
            empty_header,
        } = self
        {
            if header.is_none() {
                out.write_record(&empty_header)?;
            }
            out.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, ParseOptions};
    use crate::store::{Consumer, EventFilter, SqliteStore};
    use jiff::Timestamp;
    use serde_json::json;

    fn ingest(store: &mut crate::store::SqliteStore, id: &str, name: &str) {
        ingest_at(
            store,
            id,
            name,
            jiff::Timestamp::from_second(1_767_225_600).unwrap(),
        );
    }

    fn ingest_at(store: &mut crate::store::SqliteStore, id: &str, name: &str, at: Timestamp) {
        let opts = ParseOptions {
            now: at,
            source_id: "src".into(),
            trust_received_at: true,
        };
        let m = json!({"type": "track", "messageId": id, "userId": "u1", "event": name});
        store
            .ingest(vec![Event::from_json(&m, None, &opts).unwrap()])
            .unwrap();
    }

    fn ids(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["messageId"].to_string())
            .collect()
    }

    /// A Track event table's export ends at the head its event names were read at: an event of
    /// a name new to the table (`order_completed` after `Order Completed`) committed meanwhile,
    /// then more of the old name, is exported by an export resumed after its last row, not
    /// skipped (review, as for the feed API).
    #[test]
    fn a_track_table_export_skips_no_event_of_a_name_first_seen_during_it() {
        let mut store =
            crate::store::SqliteStore::open_in_memory(crate::identity::Rules::default()).unwrap();
        ingest(&mut store, "m1", "Order Completed");
        let source = resolve_table(&mut store, "order_completed").unwrap();
        ingest(&mut store, "m2", "order_completed");
        ingest(&mut store, "m3", "Order Completed");
        let mut out = vec![];
        let mut warnings = vec![];
        let n = export_source(
            &mut store,
            "order_completed",
            source,
            0,
            Format::Jsonl,
            &mut out,
            &mut Paging {
                page: PAGE,
                warnings: &mut warnings,
                hook: &mut |_| {},
            },
        );
        assert_eq!(n.unwrap(), 1);
        assert_eq!(ids(&out), ["\"m1\""]);
        let after = store
            .read_feed(&Feed::Events(EventFilter::All), 0, 10)
            .unwrap()[0]
            .seq();
        let mut rest = vec![];
        export(
            &mut store,
            "order_completed",
            after,
            Format::Jsonl,
            &mut rest,
        )
        .unwrap();
        assert_eq!(ids(&rest), ["\"m2\"", "\"m3\""]);
    }

    /// The events a retention pass deletes while an export reads them are said: as deleted when
    /// the pass ran between two pages (the horizon read before the second is past its cursor),
    /// as maybe missing when it ran as a page was read (here: after the first page's read,
    /// deleting an event the second page would have held). Without a pass, every event is
    /// exported and nothing said.
    #[test]
    fn an_export_says_when_retention_ran_while_it_read_events() {
        let rules = crate::identity::Rules::default;
        let now = Timestamp::now();
        // A store of three events older than a day and two young ones, which a consumer has
        // loaded, and the old events' seqs.
        let store = || {
            let dir = tempfile::tempdir().unwrap();
            let mut store = SqliteStore::open(&dir.path().join("store.db"), rules()).unwrap();
            let old = now
                .checked_sub(jiff::SignedDuration::from_hours(72))
                .unwrap();
            let mut seqs = vec![];
            for id in ["old1", "old2", "old3"] {
                ingest_at(&mut store, id, "A", old);
                seqs.push(store.head_seq().unwrap());
            }
            for id in ["young1", "young2"] {
                ingest_at(&mut store, id, "A", now);
            }
            let head = store.head_seq().unwrap();
            store
                .set_consumer(&Consumer {
                    name: "default/wh".into(),
                    after_seq: head,
                    window_seconds: 0,
                    updated_at: now,
                })
                .unwrap();
            (dir, seqs)
        };
        // The export, with a pass run at `prune_at` (the step, and the page: 0 the first); and
        // the old events' seqs.
        let run = |prune_at: Option<(Step, usize)>| {
            let (dir, seqs) = store();
            let path = dir.path().join("store.db");
            let mut store = SqliteStore::open(&path, rules()).unwrap();
            let (mut out, mut warnings) = (vec![], vec![]);
            let mut pages = 0;
            let mut hook = |step: Step| {
                if step == Step::BeforePage {
                    pages += 1;
                }
                if prune_at == Some((step, pages - 1)) {
                    let mut pruner = SqliteStore::open(&path, rules()).unwrap();
                    let day = std::time::Duration::from_secs(86_400);
                    let pass = crate::engine::retention::pass(&mut pruner, day, now, &|| true);
                    assert_eq!(pass.unwrap().deleted, 3);
                }
            };
            let source = resolve_table(&mut store, "events").unwrap();
            let mut paging = Paging {
                page: 2,
                warnings: &mut warnings,
                hook: &mut hook,
            };
            export_source(
                &mut store,
                "events",
                source,
                0,
                Format::Jsonl,
                &mut out,
                &mut paging,
            )
            .unwrap();
            (ids(&out), String::from_utf8(warnings).unwrap(), seqs)
        };
        let (all, said, _) = run(None);
        let every = ["old1", "old2", "old3", "young1", "young2"].map(|id| format!("\"{id}\""));
        assert_eq!(all, every);
        assert_eq!(said, "");
        let without_old3 = ["old1", "old2", "young1", "young2"].map(|id| format!("\"{id}\""));
        let (rows, said, seqs) = run(Some((Step::AfterRead, 0)));
        assert_eq!(rows, without_old3);
        assert_eq!(
            said,
            format!(
                "warning: event retention deleted the events up to seq {} while the export \
                 ran: those after seq 0 up to it may be missing from it\n",
                seqs[2]
            )
        );
        // (The second page starts after old2.)
        let (rows, said, seqs) = run(Some((Step::BeforePage, 1)));
        assert_eq!(rows, without_old3);
        assert_eq!(
            said,
            format!(
                "warning: event retention deleted the events up to seq {}: the export holds \
                 none of those after seq {} up to it\n",
                seqs[2], seqs[1]
            )
        );
    }
}
