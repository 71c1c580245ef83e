//! `profiles-sync engine`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::engine::{EngineConfig, sources::Sources};

/// Flags of `profiles-sync engine`; each can also come from the environment.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// The store: sqlite:///path/file.db or postgres://user@host/db.
    #[arg(long, env = "PROFILES_SYNC_STORE", hide_env_values = true)]
    pub store: String,
    /// Address to listen on.
    #[arg(long, env = "PROFILES_SYNC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// YAML file of sources and their write keys (in a cluster, a mounted Secret); read again
    /// when it changes.
    #[arg(long, env = "PROFILES_SYNC_SOURCES")]
    pub sources: PathBuf,
    /// Identity resolution rules (YAML); Segment's defaults when unset.
    #[arg(long, env = "PROFILES_SYNC_RULES")]
    pub rules: Option<PathBuf>,
    /// File holding the bearer token of the change-feed API (a mounted Secret), read again when
    /// it changes; the API is closed without it.
    #[arg(long, env = "PROFILES_SYNC_FEED_TOKEN_FILE")]
    pub feed_token_file: Option<PathBuf>,
    /// Requests the writer queue holds before the engine answers 503 with Retry-After.
    #[arg(long, env = "PROFILES_SYNC_QUEUE_CAPACITY", default_value_t = crate::engine::DEFAULT_QUEUE_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub queue_capacity: usize,
    /// Events the writer queue holds between its requests before the engine answers 503 with
    /// Retry-After (a request is always taken into an empty queue).
    #[arg(long, env = "PROFILES_SYNC_QUEUE_EVENTS", default_value_t = crate::engine::DEFAULT_QUEUE_EVENTS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub queue_events: usize,
    /// Requests read and parsed at once (bodies in memory); one more is answered 503 with Retry-After.
    #[arg(long, env = "PROFILES_SYNC_READING_CAPACITY", default_value_t = crate::engine::DEFAULT_READING_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    pub reading_capacity: usize,
    /// Seconds a request's body may take to arrive after its headers; a slower client is answered 503 with Retry-After, to send it again.
    #[arg(long, env = "PROFILES_SYNC_BODY_TIMEOUT_SECS", default_value_t = crate::engine::DEFAULT_BODY_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub body_timeout_secs: u64,
    /// Seconds a client may take to send a request's headers, and an idle keep-alive
    /// connection may wait for its next request, before the connection is closed.
    #[arg(long, env = "PROFILES_SYNC_HEADER_TIMEOUT_SECS", default_value_t = crate::engine::DEFAULT_HEADER_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub header_timeout_secs: u64,
    /// Client connections open at once; beyond them 64 more serve one request each (the probes
    /// and /metrics as usual, anything else 503 with Retry-After), then the listen backlog.
    #[arg(long, env = "PROFILES_SYNC_MAX_CONNECTIONS", default_value_t = crate::engine::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_connections: usize,
    /// Store handles the change-feed API holds open at once (PostgreSQL connections); more
    /// feed reads wait for one.
    #[arg(long, env = "PROFILES_SYNC_FEED_READERS", default_value_t = crate::engine::DEFAULT_FEED_READERS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_024))]
    pub feed_readers: usize,
    /// Seconds one store write may run before /healthz and /readyz answer 503 (the store does
    /// not answer: the kubelet then restarts the engine); 0 turns the check off.
    #[arg(
        long,
        env = "PROFILES_SYNC_STALL_TIMEOUT_SECS",
        default_value_t = crate::engine::DEFAULT_STALL_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(0..=86_400)
    )]
    pub stall_timeout_secs: u64,
    /// Seconds the engine goes on serving after SIGTERM, `/readyz` answering 503 "shutting
    /// down", before it stops accepting connections and finishes the requests in flight: the
    /// time Kubernetes' endpoints, kube-proxy and ingress controllers take to stop sending it
    /// new connections. 0 stops accepting at once.
    #[arg(
        long,
        env = "PROFILES_SYNC_SHUTDOWN_DELAY_SECS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=300)
    )]
    pub shutdown_delay_secs: u64,
    /// Delete events older than this (days `60d` or hours `36h`, 1 to 5 digits, not 0) once
    /// every connection that has recorded its progress (each sync does) has loaded them; a
    /// connection's longer backfill window keeps them longer, and one not yet synced under this
    /// release holds nothing back beyond the windows. Unset, the store keeps every event.
    #[arg(long, env = "PROFILES_SYNC_EVENT_RETENTION", value_parser = retention_window)]
    pub event_retention: Option<std::time::Duration>,
    /// Seconds between two retention passes.
    #[arg(
        long,
        env = "PROFILES_SYNC_RETENTION_INTERVAL_SECS",
        default_value_t = crate::engine::retention::DEFAULT_INTERVAL_SECS,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub retention_interval_secs: u64,
}

/// `--event-retention`'s value.
fn retention_window(text: &str) -> Result<std::time::Duration, String> {
    let digits = text.as_bytes().split_last().map_or(&[][..], |(_, d)| d);
    let plain = (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit);
    match crate::crd::parse_window(text) {
        Some(w) if plain && !w.is_zero() => Ok(w),
        _ => Err(format!(
            "{text:?}: days (60d) or hours (36h), 1 to 5 digits, not 0"
        )),
    }
}

fn read(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

impl EngineArgs {
    /// The engine configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        let token = self
            .feed_token_file
            .as_deref()
            .map(crate::engine::reload::load_feed_token)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(EngineConfig {
            store: self.store.clone(),
            listen: self.listen,
            sources: Sources::from_yaml(&read(&self.sources)?)?,
            rules: super::load_rules(self.rules.as_deref())?,
            feed_token: token,
            // Both read again when they change (a mounted Secret's update).
            sources_file: Some(self.sources.clone()),
            feed_token_file: self.feed_token_file.clone(),
            // The flags' ranges keep each of these at 1 or more.
            queue_capacity: self.queue_capacity,
            queue_events: self.queue_events,
            reading_capacity: self.reading_capacity,
            body_timeout: std::time::Duration::from_secs(self.body_timeout_secs),
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
            max_connections: self.max_connections,
            feed_readers: self.feed_readers,
            stall_timeout: std::time::Duration::from_secs(self.stall_timeout_secs),
            shutdown_delay: std::time::Duration::from_secs(self.shutdown_delay_secs),
            retention: self
                .event_retention
                .map(|min_age| crate::engine::retention::Retention {
                    min_age,
                    interval: std::time::Duration::from_secs(self.retention_interval_secs),
                }),
        })
    }
}

/// Runs the engine until SIGTERM or Ctrl-C, then shuts down gracefully.
pub fn run(args: EngineArgs) -> anyhow::Result<()> {
    super::telemetry::init();
    let config = args.config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let engine = crate::engine::start(config).await?;
        // A closed stdout (a pipe whose reader went away) must not stop the engine.
        let _ = writeln!(std::io::stdout(), "engine listening on {}", engine.addr);
        let stop = engine.shutdown_sender();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stop.send(true);
        });
        engine.wait().await
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::reload::load_feed_token as feed_token;

    #[test]
    fn the_feed_token_is_neither_empty_nor_the_published_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret-7f2a\n").unwrap();
        assert_eq!(feed_token(&path).unwrap(), "s3cret-7f2a");
        std::fs::write(&path, "CHANGE-ME-feed-token\n").unwrap();
        let why = feed_token(&path).unwrap_err().to_string();
        assert!(why.contains("placeholder"), "{why}");
        std::fs::write(&path, " \n").unwrap();
        assert!(feed_token(&path).unwrap_err().to_string().contains("empty"));
        std::fs::write(&path, "s3cret\nsecond line\n").unwrap();
        let why = feed_token(&path).unwrap_err().to_string();
        assert!(why.contains("HTTP header"), "{why}");
    }

    /// `--event-retention` takes 1 to 5 digits and `d` or `h`, not 0 (no record would then keep
    /// anything), no sign, no other unit; a multi-byte last character is refused, not a panic.
    #[test]
    fn the_retention_window_is_days_or_hours_and_not_zero() {
        assert_eq!(
            retention_window("60d"),
            Ok(std::time::Duration::from_secs(60 * 86_400))
        );
        assert_eq!(
            retention_window("36h"),
            Ok(std::time::Duration::from_secs(36 * 3_600))
        );
        for bad in [
            "0d", "0h", "+1d", "100000d", "60", "d", "", "5日", "1.5d", "60 days",
        ] {
            assert!(retention_window(bad).is_err(), "{bad}");
        }
    }

    /// Capacities and timeouts out of range are a usage error naming the flag (a huge reading
    /// capacity panicked the engine at start, a huge header timeout on every connection).
    #[test]
    fn capacities_and_timeouts_out_of_range_are_usage_errors() {
        use clap::Parser;
        for (flag, value) in [
            ("--reading-capacity", "18446744073709551615"),
            ("--queue-capacity", "0"),
            ("--queue-events", "0"),
            ("--feed-readers", "100000"),
            ("--max-connections", "18446744073709551615"),
            ("--header-timeout-secs", "18446744073709551615"),
            ("--body-timeout-secs", "0"),
        ] {
            let e = crate::cli::Cli::try_parse_from([
                "profiles-sync",
                "engine",
                "--store",
                "sqlite:///tmp/s.db",
                "--sources",
                "s.yaml",
                flag,
                value,
            ])
            .err()
            .unwrap_or_else(|| panic!("{flag} {value} was accepted"))
            .to_string();
            assert!(e.contains(flag) && e.contains("is not in"), "{e}");
        }
    }
}
