//! Identity resolution scenarios (Segment's documented examples and the rules around them) and
//! property tests over random event streams.

mod examples;
mod props;
mod rules_in_graph;

use serde_json::Value;

use super::*;
use crate::event::{Event, ParseOptions, Timestamp};

/// The receive time of every test event unless it says otherwise.
const NOW: &str = "2024-05-01T12:00:00Z";

fn at(s: &str) -> Timestamp {
    s.parse().expect("test timestamp")
}

/// Parses a test message received at [`NOW`].
fn ev(v: Value) -> Event {
    ev_at(v, NOW)
}

/// Parses a test message received at `now` (its `timestamp`, when absent, is `now`).
fn ev_at(v: Value, now: &str) -> Event {
    Event::from_json(&v, None, &ParseOptions::new(at(now), "src_1")).expect("valid test event")
}

fn id(t: &str, v: &str) -> Identifier {
    Identifier::new(t, v)
}

fn row(segment_id: &str, canonical: &str) -> IdGraphUpdate {
    IdGraphUpdate {
        segment_id: segment_id.to_string(),
        canonical_segment_id: canonical.to_string(),
    }
}

fn resolve(g: &mut IdentityGraph, v: Value) -> Resolution {
    g.resolve(&ev(v)).expect("event resolves")
}
