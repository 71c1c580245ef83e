//! The engine's Prometheus metrics.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Every metric the engine exports on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    /// The registry rendered on `/metrics`.
    pub registry: Registry,
    /// HTTP requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// Events committed.
    pub events_accepted: IntCounter,
    /// Events skipped as duplicates (messageId already stored).
    pub events_duplicate: IntCounter,
    /// Events refused, by reason.
    pub events_rejected: IntCounterVec,
    /// Seconds to validate and resolve-check a request.
    pub parse_seconds: Histogram,
    /// Seconds to resolve the identities of one group of requests.
    pub resolve_seconds: Histogram,
    /// Seconds to write and commit one group of requests (after resolution), or to fail.
    pub commit_seconds: Histogram,
    /// Requests waiting for the writer.
    pub queue_depth: IntGauge,
    /// Seconds the write under way has been running (0 between writes).
    pub write_running_seconds: Gauge,
    /// Profiles created.
    pub profiles_created: IntCounter,
    /// Live (not merged-away) profiles in the store.
    pub profiles: IntGauge,
    /// Profiles merged away.
    pub merges: IntCounter,
    /// Loads of the store (its identity graph and messageIds) that failed and are tried again.
    pub load_failures: IntCounter,
    /// Events deleted by retention.
    pub events_pruned: IntCounter,
    /// The `seq` at or below which retention has deleted every event.
    pub events_pruned_through: IntGauge,
    /// messageId index entries deleted by retention.
    pub message_ids_pruned: IntCounter,
    /// Watched files read again after a change, by file (`sources`, `feed_token`) and outcome
    /// (`applied`, `refused`).
    pub reloads: IntCounterVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("profiles_sync_engine".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by endpoint and status code",
            ),
            &["endpoint", "status"],
        )?;
        let events_accepted =
            IntCounter::new("events_accepted_total", "Events committed to the store")?;
        let events_duplicate = IntCounter::new(
            "events_duplicate_total",
            "Events skipped because their messageId was stored",
        )?;
        let events_rejected = IntCounterVec::new(
            Opts::new("events_rejected_total", "Events refused, by reason"),
            &["reason"],
        )?;
        let buckets = prometheus::exponential_buckets(0.0001, 2.0, 18)?;
        let parse_seconds = Histogram::with_opts(
            HistogramOpts::new("request_parse_seconds", "Time to validate a request")
                .buckets(buckets.clone()),
        )?;
        let resolve_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "resolve_seconds",
                "Time to resolve the identities of one group of requests",
            )
            .buckets(buckets.clone()),
        )?;
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "commit_seconds",
                "Time to write and commit one group of requests once resolved (or to fail)",
            )
            .buckets(buckets),
        )?;
        let queue_depth = IntGauge::new("queue_depth", "Requests waiting for the store writer")?;
        let write_running_seconds = Gauge::new(
            "write_running_seconds",
            "Seconds the store writer's current write has been running (0 between writes)",
        )?;
        let profiles_created = IntCounter::new(
            "profiles_created_total",
            "Profiles created by identity resolution",
        )?;
        let profiles = IntGauge::new("profiles", "Live (not merged-away) profiles in the store")?;
        let merges = IntCounter::new("profile_merges_total", "Profiles merged into another")?;
        let load_failures = IntCounter::new(
            "store_load_failures_total",
            "Loads of the store's identity graph and messageIds that failed (each is tried again)",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(events_accepted.clone()))?;
        registry.register(Box::new(events_duplicate.clone()))?;
        registry.register(Box::new(events_rejected.clone()))?;
        registry.register(Box::new(parse_seconds.clone()))?;
        registry.register(Box::new(resolve_seconds.clone()))?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(write_running_seconds.clone()))?;
        registry.register(Box::new(profiles_created.clone()))?;
        registry.register(Box::new(profiles.clone()))?;
        registry.register(Box::new(merges.clone()))?;
        let events_pruned = IntCounter::new(
            "events_pruned_total",
            "Events deleted by retention (every consumer had loaded them, no backfill window reached them)",
        )?;
        let events_pruned_through = IntGauge::new(
            "events_pruned_through_seq",
            "The seq at or below which retention has deleted every event (0 while none was ever deleted)",
        )?;
        registry.register(Box::new(load_failures.clone()))?;
        registry.register(Box::new(events_pruned.clone()))?;
        let message_ids_pruned = IntCounter::new(
            "message_ids_pruned_total",
            "messageId index entries deleted by retention (runs that indexed only deleted events)",
        )?;
        registry.register(Box::new(events_pruned_through.clone()))?;
        registry.register(Box::new(message_ids_pruned.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "file_reloads_total",
                "Watched files (the sources, the feed token) read again after a change, by file and outcome (applied, refused)",
            ),
            &["file", "outcome"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            events_accepted,
            events_duplicate,
            events_rejected,
            parse_seconds,
            resolve_seconds,
            commit_seconds,
            queue_depth,
            write_running_seconds,
            profiles_created,
            profiles,
            merges,
            load_failures,
            events_pruned,
            events_pruned_through,
            message_ids_pruned,
            reloads,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}
