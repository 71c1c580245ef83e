//! The sync report: what one run did, as JSON on stdout, in the pod's termination message, and
//! folded by the controller into the WarehouseConnection's status.

use serde::{Deserialize, Serialize};

use super::naming::truncate_at_char;
use super::tables::{TableGroup, group};
use crate::crd::{ErrorClass, SyncError, SyncRows, SyncStatus};

/// What happened to one table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableReport {
    /// Warehouse table.
    pub name: String,
    /// Rows written by this run.
    pub rows: u64,
    /// Values sent to `discards`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub discards: u64,
    /// Whether the table has not caught up with the store yet (first sync or a `limits` split).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backfilling: bool,
    /// The error that stopped the table in this run (retried by the next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SyncError>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What one sync did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncReport {
    /// The sync's id (the Job's slot).
    pub id: String,
    /// Success, PartialSuccess or Failed.
    pub status: SyncStatus,
    /// When it started (RFC 3339).
    pub start_time: String,
    /// How long it ran.
    pub duration_seconds: f64,
    /// Rows written, in total and per group.
    pub rows: SyncRows,
    /// Every table this run touched or tried.
    pub tables: Vec<TableReport>,
    /// Classified errors.
    pub errors: Vec<SyncError>,
    /// Tables still backfilling after this run.
    #[serde(default)]
    pub backfilling: Vec<String>,
    /// Track event tables that start at the head instead of being backfilled (over `backfill.maxEventTables`).
    #[serde(default)]
    pub not_backfilled: Vec<String>,
    /// Whether `limits` stopped this run before the backlog was loaded (the next run continues).
    #[serde(default)]
    pub limit_reached: bool,
    /// The store's head `seq` when the run started.
    pub head_seq: i64,
    /// How many tables `tables` leaves out: a pod's termination message holds 4,096 bytes, so
    /// a report of many tables there keeps the failed ones and those with the most rows.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tables_omitted: u64,
    /// How many names of tables still backfilling `backfilling` leaves out (a report cut for
    /// the termination message keeps 20 of them): the condition counts them too.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backfilling_omitted: u64,
}

impl SyncReport {
    /// A report of a sync that failed before loading anything.
    pub fn failed(
        id: &str,
        start: jiff::Timestamp,
        class: ErrorClass,
        message: String,
    ) -> SyncReport {
        SyncReport {
            id: id.to_string(),
            status: SyncStatus::Failed,
            start_time: start.to_string(),
            duration_seconds: (jiff::Timestamp::now() - start)
                .total(jiff::Unit::Second)
                .unwrap_or(0.0),
            rows: SyncRows::default(),
            tables: vec![],
            errors: vec![SyncError {
                class,
                message,
                table: None,
            }],
            backfilling: vec![],
            not_backfilled: vec![],
            limit_reached: false,
            head_seq: 0,
            tables_omitted: 0,
            backfilling_omitted: 0,
        }
    }

    /// Whether the run stopped midway, not reaching every table: an error of no table (the feed
    /// or the connection lost mid-run). Events that retention deleted before they loaded stop
    /// nothing (the tables still catch up with what the store holds).
    pub fn stopped(&self) -> bool {
        self.errors
            .iter()
            .any(|e| e.table.is_none() && e.class != ErrorClass::Retention)
    }

    /// Fills `rows`, `errors` and `status` from the per-table reports.
    pub fn finish(&mut self, start: jiff::Timestamp) {
        let mut rows = SyncRows::default();
        for t in &self.tables {
            let n = i64::try_from(t.rows).unwrap_or(i64::MAX);
            match group(&t.name) {
                TableGroup::IdentityGraph => rows.identity_graph += n,
                TableGroup::EventTypes => rows.event_types += n,
                TableGroup::Events => rows.events += n,
                TableGroup::Other => {}
            }
        }
        rows.total = rows.identity_graph + rows.event_types + rows.events;
        self.rows = rows;
        let stopped = self.stopped();
        self.errors
            .extend(self.tables.iter().filter_map(|t| t.error.clone()));
        let failed = self.tables.iter().filter(|t| t.error.is_some()).count();
        // Rows committed count, even those of a table that failed after them.
        let loaded = self.tables.iter().any(|t| t.rows > 0);
        // Failed means nothing loaded; with rows loaded, or other tables in step (their
        // "nothing new" is a success), it is a partial success.
        self.status = if self.errors.is_empty() {
            SyncStatus::Success
        } else if loaded || (!stopped && failed < self.tables.len()) {
            SyncStatus::PartialSuccess
        } else {
            SyncStatus::Failed
        };
        self.duration_seconds = (jiff::Timestamp::now() - start)
            .total(jiff::Unit::Second)
            .unwrap_or(0.0);
    }

    /// The report for a pod's termination message: at most 4,096 bytes (Kubernetes' limit).
    /// A larger one keeps its totals and lists first the failed tables, then those with the
    /// most rows, as many as fit ([`SyncReport::tables_omitted`] counts the others), with the
    /// first errors, each cut to 300 bytes, and the first 20 backfilling (the others counted
    /// in [`SyncReport::backfilling_omitted`]) and not backfilled tables.
    pub fn termination_message(&self) -> String {
        const LIMIT: usize = 4096;
        let full = serde_json::to_string(self).unwrap_or_default();
        if full.len() <= LIMIT {
            return full;
        }
        let mut small = self.clone();
        small
            .tables
            .sort_by_key(|t| std::cmp::Reverse((t.error.is_some(), t.rows)));
        small.backfilling_omitted += small.backfilling.len().saturating_sub(20) as u64;
        small.backfilling.truncate(20);
        small.not_backfilled.truncate(20);
        for e in &mut small.errors {
            truncate_at_char(&mut e.message, 300);
        }
        let mut text = serde_json::to_string(&small).unwrap_or_default();
        while text.len() > LIMIT && (!small.tables.is_empty() || small.errors.len() > 1) {
            // A table's entry is 30 bytes or more: half the excess in entries at a time.
            let step = ((text.len() - LIMIT) / 64).max(1);
            let keep = small.tables.len().saturating_sub(step);
            small.tables_omitted += (small.tables.len() - keep) as u64;
            small.tables.truncate(keep);
            small
                .errors
                .truncate(small.errors.len().saturating_sub(step).max(1));
            text = serde_json::to_string(&small).unwrap_or_default();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, rows: u64, error: bool) -> TableReport {
        TableReport {
            name: name.into(),
            rows,
            discards: 0,
            backfilling: false,
            error: error.then(|| SyncError {
                class: ErrorClass::TypeConflict,
                message: "x".into(),
                table: Some(name.into()),
            }),
        }
    }

    fn report(tables: Vec<TableReport>) -> SyncReport {
        let start = jiff::Timestamp::now();
        let mut r = SyncReport::failed("s", start, ErrorClass::Internal, String::new());
        r.errors.clear();
        r.tables = tables;
        r.finish(start);
        r
    }

    #[test]
    fn status_and_groups() {
        let r = report(vec![
            table("id_graph_updates", 3, false),
            table("tracks", 2, false),
            table("order_completed", 1, false),
        ]);
        assert_eq!(r.status, SyncStatus::Success);
        assert_eq!(
            r.rows,
            SyncRows {
                total: 6,
                identity_graph: 3,
                event_types: 2,
                events: 1
            }
        );
        let r = report(vec![
            table("tracks", 0, false),
            table("order_completed", 0, true),
        ]);
        assert_eq!(r.status, SyncStatus::PartialSuccess);
        assert_eq!(r.errors.len(), 1);
        let r = report(vec![table("order_completed", 0, true)]);
        assert_eq!(r.status, SyncStatus::Failed);
        // A table that committed rows, then failed: something loaded, so not Failed.
        let r = report(vec![table("order_completed", 4, true)]);
        assert_eq!((r.status, r.rows.total), (SyncStatus::PartialSuccess, 4));
        let r = report(vec![]);
        assert_eq!(r.status, SyncStatus::Success, "nothing new is a success");
    }

    /// A run stopped by an error of no table (the feed or the connection lost) is Failed only
    /// when nothing loaded before it; otherwise what loaded is reported, as a partial success.
    #[test]
    fn a_stopped_run_reports_what_it_loaded() {
        let stopped = |tables: Vec<TableReport>| {
            let start = jiff::Timestamp::now();
            let mut r = SyncReport::failed("s", start, ErrorClass::Connection, "lost".into());
            r.tables = tables;
            r.finish(start);
            r
        };
        let r = stopped(vec![table("tracks", 5, false), table("pages", 0, false)]);
        assert_eq!(r.status, SyncStatus::PartialSuccess);
        assert_eq!((r.rows.total, r.errors.len()), (5, 1));
        assert_eq!(
            stopped(vec![table("tracks", 0, false)]).status,
            SyncStatus::Failed
        );
        assert_eq!(stopped(vec![]).status, SyncStatus::Failed);
    }

    #[test]
    fn termination_messages_fit_in_4096_bytes() {
        let many: Vec<TableReport> = (0..2000)
            .map(|i| table(&format!("t{i}"), 1, i % 10 == 0))
            .collect();
        let r = report(many);
        let msg = r.termination_message();
        assert!(msg.len() <= 4096, "{}", msg.len());
        let back: SyncReport = serde_json::from_str(&msg).unwrap();
        assert_eq!(back.status, r.status);
        assert_eq!(back.rows, r.rows);
    }

    /// A report too large for a termination message keeps the tables that matter most and
    /// says how many it leaves out.
    #[test]
    fn a_large_report_lists_failed_tables_then_the_largest_and_counts_the_rest() {
        let tables: Vec<TableReport> = (0..120)
            .map(|i| table(&format!("event_number_{i}"), i, i == 3 || i == 7))
            .collect();
        let r = report(tables);
        let msg = r.termination_message();
        assert!(msg.len() <= 4096, "{}", msg.len());
        let back: SyncReport = serde_json::from_str(&msg).unwrap();
        let listed = back.tables.len() as u64;
        assert!(listed > 40 && listed < 120, "{listed} listed");
        assert_eq!(back.tables_omitted + listed, 120);
        assert_eq!(back.rows, r.rows, "the totals count every table");
        let names: Vec<&str> = back.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names[..3],
            ["event_number_7", "event_number_3", "event_number_119"]
        );
        let smallest_listed = back.tables.last().unwrap().rows;
        assert_eq!(smallest_listed, 120 - (listed - 2), "the largest, in order");
        // A small report lists everything and says nothing of omissions.
        let small = report(vec![table("tracks", 1, false)]).termination_message();
        assert!(!small.contains("tablesOmitted"), "{small}");
    }

    /// Error messages are cut at a character boundary (a localized server's message).
    #[test]
    fn a_large_report_cuts_non_ascii_errors_without_panicking() {
        let tables: Vec<TableReport> = (0..200)
            .map(|i| table(&format!("order_completed_{i}"), 1, false))
            .collect();
        let mut r = report(tables);
        r.errors.push(SyncError {
            class: ErrorClass::Connection,
            message: format!("{}é la connexion a été perdue", "x".repeat(299)),
            table: None,
        });
        let msg = r.termination_message();
        assert!(msg.len() <= 4096, "{}", msg.len());
        let back: SyncReport = serde_json::from_str(&msg).unwrap();
        assert_eq!(back.errors[0].message, "x".repeat(299));
    }
}
