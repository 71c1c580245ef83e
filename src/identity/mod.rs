//! Segment Unify identity resolution, in memory.
//!
//! [`extract_identifiers`] reads the identifiers an event carries; [`IdentityGraph::resolve`]
//! looks them up, creates, attaches or merges profiles under the [`Rules`] (blocked values,
//! per-type limits with priority, system caps), keeps per-profile traits, and returns the change
//! log rows the event produced ([`Resolution`]) for the store to append. The graph is rebuilt
//! from persisted state with [`IdentityGraph::restore`]; [`IdentityGraph::take_dirty`] yields
//! what to persist.

mod extract;
mod graph;
mod ids;
mod model;
mod resolve;
mod rules;
#[cfg(test)]
mod tests;
mod traits;

pub use extract::{extract_all, extract_identifiers};
pub use graph::IdentityGraph;
pub(crate) use ids::sha1_hex;
pub use ids::{external_id_hash, new_row_id, new_segment_id};
pub use model::{
    DropReason, ExternalIdMappingUpdate, IdGraphUpdate, IdentifierState, ProfileState,
    ProfileTraitsUpdate, Resolution, ResolveError, StateDelta,
};
pub use rules::{Limit, Rules, RulesError};

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::event::{Event, EventType};

/// What identity resolution reads of an event: its type and time, every identifier it carries
/// ([`extract_all`]: blocked values included, so their drops are reported), the alias fields and
/// an identify call's traits.
#[derive(Clone, Debug)]
pub struct Subject<'a> {
    /// The call's type.
    pub event_type: EventType,
    /// When the event happened, as resolution orders it (trait writes, identifiers' first and
    /// last sightings): its clock-skew corrected timestamp, but never later than its
    /// `receivedAt` ([`Subject::time_of`]).
    pub timestamp: jiff::Timestamp,
    /// [`extract_all`] of the event.
    pub identifiers: Cow<'a, [Identifier]>,
    /// `previousId` (alias calls).
    pub previous_id: Option<&'a str>,
    /// `anonymousId`.
    pub anonymous_id: Option<&'a str>,
    /// An identify call's traits (applied to its profile; their count is checked against the
    /// trait cap); `None` for other calls.
    pub identify_traits: Option<&'a Map<String, Value>>,
}

impl<'a> Subject<'a> {
    /// The time resolution orders an event by: its `timestamp`, or its `receivedAt` when the
    /// timestamp is later. No event happened after it arrived, and a time in the future (a
    /// client's clock, or a server SDK passing one without `sentAt` to correct it) would win
    /// every later write of the traits it sets — until that date, for good — and count its
    /// identifiers as seen until then under the rules' windows. The event keeps its timestamp.
    pub fn time_of(timestamp: jiff::Timestamp, received_at: jiff::Timestamp) -> jiff::Timestamp {
        timestamp.min(received_at)
    }

    /// What resolution reads of `event`.
    pub fn of(event: &'a Event) -> Subject<'a> {
        Subject {
            event_type: event.event_type,
            timestamp: Subject::time_of(event.timestamp, event.received_at),
            identifiers: Cow::Owned(extract_all(event)),
            previous_id: event.previous_id.as_deref(),
            anonymous_id: event.anonymous_id.as_deref(),
            identify_traits: (event.event_type == EventType::Identify).then_some(&event.traits),
        }
    }
}

/// One identifier: a type (`user_id`, `email`, `ios.idfa`, a custom `context.externalIds` type)
/// and its value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier {
    /// The identifier type, lowercase (`user_id`, `anonymous_id`, `email`, …).
    pub id_type: String,
    /// The value, as a string.
    pub value: String,
}

impl Identifier {
    /// An identifier of type `id_type` with `value`.
    pub fn new(id_type: impl Into<String>, value: impl Into<String>) -> Identifier {
        Identifier {
            id_type: id_type.into(),
            value: value.into(),
        }
    }
}

impl std::fmt::Display for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id_type, self.value)
    }
}
