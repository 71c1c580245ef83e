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

pub use extract::extract_identifiers;
pub use graph::IdentityGraph;
pub use ids::{external_id_hash, new_row_id, new_segment_id};
pub use model::{
    DropReason, ExternalIdMappingUpdate, IdGraphUpdate, IdentifierState, ProfileState,
    ProfileTraitsUpdate, Resolution, ResolveError, StateDelta,
};
pub use rules::{Limit, Rules, RulesError};

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
