//! The controller's Prometheus metrics. Label values are bounded: controller and result names
//! are fixed sets, and the per-connection gauge has one series per WarehouseConnection (removed
//! when the connection is deleted).

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::crd::{SyncRecord, SyncStatus};

/// Every metric the controller exports on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    /// The registry rendered on `/metrics`.
    pub registry: Registry,
    /// Reconciles by controller.
    pub reconciles: IntCounterVec,
    /// Failed reconciles by controller and error kind.
    pub reconcile_errors: IntCounterVec,
    /// Reconcile durations by controller.
    pub reconcile_seconds: HistogramVec,
    /// Finished syncs by result (Success, PartialSuccess, Failed, Unknown).
    pub sync_runs: IntCounterVec,
    /// Rows loaded by syncs, by table group.
    pub rows_synced: IntCounterVec,
    /// Connection tests by reason.
    pub connection_tests: IntCounterVec,
    /// Start of the last successful sync per connection, in Unix seconds.
    pub last_successful_sync: GaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("profiles_sync_controller".into()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciles, by controller"),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Reconciles that failed, by controller and error kind",
            ),
            &["controller", "error"],
        )?;
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Time one reconcile took, by controller",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
            &["controller"],
        )?;
        let sync_runs = IntCounterVec::new(
            Opts::new(
                "sync_runs_total",
                "Finished syncs, by result (Success, PartialSuccess, Failed, Unknown)",
            ),
            &["result"],
        )?;
        let rows_synced = IntCounterVec::new(
            Opts::new(
                "rows_synced_total",
                "Rows loaded into warehouses, by table group",
            ),
            &["group"],
        )?;
        let connection_tests = IntCounterVec::new(
            Opts::new(
                "connection_tests_total",
                "Connection tests, by ConnectionVerified reason",
            ),
            &["reason"],
        )?;
        let last_successful_sync = GaugeVec::new(
            Opts::new(
                "last_successful_sync_timestamp_seconds",
                "Start of the last successful sync of each connection (Unix seconds)",
            ),
            // Not `namespace`: Prometheus gives that label the scraped pod's namespace (the
            // controller's), renaming ours, and same-named connections of two namespaces then
            // read as one.
            &["connection_namespace", "connection"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_seconds.clone()))?;
        registry.register(Box::new(sync_runs.clone()))?;
        registry.register(Box::new(rows_synced.clone()))?;
        registry.register(Box::new(connection_tests.clone()))?;
        registry.register(Box::new(last_successful_sync.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            sync_runs,
            rows_synced,
            connection_tests,
            last_successful_sync,
        })
    }

    /// Counts one folded sync.
    pub fn observe_sync(&self, r: &SyncRecord) {
        let result = match r.status {
            SyncStatus::Success => "Success",
            SyncStatus::PartialSuccess => "PartialSuccess",
            SyncStatus::Failed => "Failed",
            SyncStatus::Unknown => "Unknown",
        };
        self.sync_runs.with_label_values(&[result]).inc();
        for (group, n) in [
            ("identity_graph", r.rows.identity_graph),
            ("event_types", r.rows.event_types),
            ("events", r.rows.events),
        ] {
            if let Ok(n) = u64::try_from(n) {
                self.rows_synced.with_label_values(&[group]).inc_by(n);
            }
        }
    }

    /// Forgets a deleted connection's series.
    pub fn forget(&self, namespace: &str, connection: &str) {
        let _ = self
            .last_successful_sync
            .remove_label_values(&[namespace, connection]);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
