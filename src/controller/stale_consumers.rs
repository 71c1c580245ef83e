//! Garbage collection of the engine's feed consumers whose connection is gone. A deleted
//! connection's finalizer releases its record (`feed_consumer.rs`), but a record can outlive it
//! all the same: the engine was unreachable then (the `RetentionHoldNotReleased` Event), or a
//! sync pod still running past the deletion's wait recorded its progress again after the
//! release. Such a record would hold the engine's events back for ever, so every [`PERIOD`]
//! (and [`FIRST_PASS_DELAY`] after start) the controller lists the engine's consumers and the
//! WarehouseConnections of every namespace and removes each consumer whose connection does not
//! exist and that was not updated for [`GRACE`].
//!
//! The grace keeps a pass from removing what it raced with: a record written a moment ago by
//! the Job of a connection that its list did not show. The consumers are listed before the
//! connections for the same reason: a Job records only for a connection that exists, so a
//! connection that still exists is in a list read after its record.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use tracing::Instrument;

use super::Context;
use super::feed_consumer::{self, ConsumerApiError, RecordedConsumer};
use crate::crd::WarehouseConnection;

/// Time between two passes.
pub const PERIOD: Duration = Duration::from_secs(10 * 60);
/// Time from the controller's start to its first pass.
pub const FIRST_PASS_DELAY: Duration = Duration::from_secs(60);
/// How long a consumer of no existing connection must have gone without an update before it is
/// removed.
pub const GRACE: SignedDuration = SignedDuration::from_hours(1);

/// A consumer to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleConsumer<'a> {
    /// The namespace of the connection it was recorded for.
    pub namespace: &'a str,
    /// The name of that connection.
    pub name: &'a str,
    /// When it last recorded its progress.
    pub updated_at: Timestamp,
}

/// The consumers to remove: recorded for a connection not in `existing` (`namespace/name`s),
/// and not updated for [`GRACE`] by `now`. A consumer whose update time is unknown or ahead of
/// `now` stays, and so does one whose name is not a `namespace/name` (no connection's).
pub fn stale<'a>(
    consumers: &'a [RecordedConsumer],
    existing: &HashSet<String>,
    now: Timestamp,
) -> Vec<StaleConsumer<'a>> {
    consumers
        .iter()
        .filter(|c| !existing.contains(&c.name))
        .filter_map(|c| {
            let (namespace, name) = c.name.split_once('/')?;
            if namespace.is_empty() || name.is_empty() {
                return None;
            }
            let updated_at = c.updated_at?;
            (now.duration_since(updated_at) >= GRACE).then_some(StaleConsumer {
                namespace,
                name,
                updated_at,
            })
        })
        .collect()
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// The consumers it removed (`namespace/name`).
    pub removed: Vec<String>,
    /// The stale consumers it could not remove (`namespace/name`, why); the next pass tries
    /// again.
    pub failed: Vec<(String, String)>,
}

/// Why a pass removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The engine's consumers could not be listed.
    #[error("listing the engine's feed consumers: {0}")]
    Engine(#[from] ConsumerApiError),
    /// The WarehouseConnections could not be listed.
    #[error("listing the WarehouseConnections: {0}")]
    Kube(#[from] kube::Error),
}

/// One pass: removes every [`stale`] consumer from the engine. A removal that fails is logged
/// and left to the next pass; the others go on.
pub async fn collect(ctx: &Context) -> Result<Collected, CollectError> {
    let consumers = feed_consumer::list(ctx).await?;
    let existing = existing_connections(&ctx.client).await?;
    let mut collected = Collected::default();
    for c in stale(&consumers, &existing, ctx.now()) {
        let consumer = format!("{}/{}", c.namespace, c.name);
        match feed_consumer::release(ctx, c.namespace, c.name).await {
            Ok(()) => {
                tracing::info!(%consumer, updated_at = %c.updated_at, "removed the feed consumer of a connection that no longer exists");
                collected.removed.push(consumer);
            }
            Err(e) => {
                tracing::warn!(%consumer, updated_at = %c.updated_at, error = %e, "the feed consumer of a connection that no longer exists could not be removed; the next pass tries again");
                collected.failed.push((consumer, e.to_string()));
            }
        }
    }
    Ok(collected)
}

/// `namespace/name` of every WarehouseConnection (metadata only: one that does not decode
/// still exists).
async fn existing_connections(client: &Client) -> Result<HashSet<String>, kube::Error> {
    let api: Api<WarehouseConnection> = Api::all(client.clone());
    let list = api.list_metadata(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .map(|c| format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()))
        .collect())
}

/// Runs a pass [`FIRST_PASS_DELAY`] after it is called and then every [`PERIOD`], for ever (the
/// caller stops it with the controller). A failed pass is logged and the next one tries again.
pub async fn run(ctx: Arc<Context>) {
    let start = tokio::time::Instant::now() + FIRST_PASS_DELAY;
    let mut ticks = tokio::time::interval_at(start, PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let pass = collect(&ctx).instrument(tracing::info_span!("stale_feed_consumers"));
        match pass.await {
            Ok(c) => tracing::debug!(
                removed = c.removed.len(),
                failed = c.failed.len(),
                "stale feed consumers collected"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "collecting stale feed consumers failed; the next pass tries again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2025-03-01T12:00:00Z";

    fn consumer(name: &str, updated_at: Option<&str>) -> RecordedConsumer {
        RecordedConsumer {
            name: name.into(),
            updated_at: updated_at.map(|t| t.parse().unwrap()),
        }
    }

    fn stale_names(consumers: &[RecordedConsumer], existing: &[&str]) -> Vec<String> {
        let existing = existing.iter().map(|s| s.to_string()).collect();
        stale(consumers, &existing, NOW.parse().unwrap())
            .into_iter()
            .map(|c| format!("{}/{}", c.namespace, c.name))
            .collect()
    }

    #[test]
    fn a_consumer_of_no_connection_is_stale_once_not_updated_for_the_grace() {
        let consumers = [
            consumer("team-a/gone", Some("2025-03-01T10:00:00Z")),
            consumer("team-a/at-the-grace", Some("2025-03-01T11:00:00Z")),
            consumer("team-a/within-the-grace", Some("2025-03-01T11:00:01Z")),
            consumer("team-a/ahead-of-the-clock", Some("2025-03-01T12:30:00Z")),
        ];
        assert_eq!(
            stale_names(&consumers, &[]),
            ["team-a/gone", "team-a/at-the-grace"]
        );
    }

    #[test]
    fn a_consumer_of_an_existing_connection_is_never_stale() {
        let consumers = [
            consumer("team-a/analytics", Some("2024-01-01T00:00:00Z")),
            consumer("team-b/analytics", Some("2024-01-01T00:00:00Z")),
        ];
        assert_eq!(
            stale_names(&consumers, &["team-a/analytics"]),
            ["team-b/analytics"],
            "a connection of the same name in another namespace is another connection"
        );
        assert_eq!(
            stale_names(&consumers, &["team-a/analytics", "team-b/analytics"]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_consumer_that_cannot_be_judged_stays() {
        let consumers = [
            consumer("team-a/unknown-time", None),
            consumer("no-namespace", Some("2024-01-01T00:00:00Z")),
            consumer("/no-namespace", Some("2024-01-01T00:00:00Z")),
            consumer("team-a/", Some("2024-01-01T00:00:00Z")),
        ];
        assert_eq!(stale_names(&consumers, &[]), Vec::<String>::new());
    }

    #[test]
    fn a_stale_consumer_keeps_its_names_and_update_time() {
        let consumers = [consumer("team-a/gone", Some("2025-03-01T10:00:00Z"))];
        assert_eq!(
            stale(&consumers, &HashSet::new(), NOW.parse().unwrap()),
            [StaleConsumer {
                namespace: "team-a",
                name: "gone",
                updated_at: "2025-03-01T10:00:00Z".parse().unwrap(),
            }]
        );
    }
}
