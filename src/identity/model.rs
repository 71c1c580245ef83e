//! What resolution returns (change-log rows) and what the graph persists (profile and
//! identifier state).

use jiff::Timestamp;
use serde_json::{Map, Value};

use super::Identifier;

/// What resolving one event did: the profile it belongs to and the change-log rows it produced,
/// in the order they happened.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Resolution {
    /// The canonical profile the event resolved to.
    pub segment_id: String,
    /// Whether the event created that profile.
    pub created: bool,
    /// The profiles merged away (into `segment_id`) by this event, oldest first.
    pub merged: Vec<String>,
    /// `id_graph_updates` rows: a creation row, then for every merged profile a row for it and
    /// one for each profile previously merged into it.
    pub id_graph_updates: Vec<IdGraphUpdate>,
    /// `external_id_mapping_updates` rows: one per identifier seen for the first time.
    pub external_id_mapping_updates: Vec<ExternalIdMappingUpdate>,
    /// `profile_traits_updates` rows: the surviving profile's full snapshot, when it changed.
    pub profile_traits_updates: Vec<ProfileTraitsUpdate>,
    /// Identifiers of the event that were not used, and why.
    pub dropped: Vec<(Identifier, DropReason)>,
    /// New traits of the identify its profile had no room for (`caps.max_traits_per_profile`);
    /// the event itself is stored with them.
    pub traits_dropped: usize,
}

/// One `id_graph_updates` row: `segment_id` now resolves to `canonical_segment_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdGraphUpdate {
    /// The profile whose resolution changed (or was created).
    pub segment_id: String,
    /// The profile it resolves to; equal to `segment_id` on a creation row.
    pub canonical_segment_id: String,
}

/// One `external_id_mapping_updates` row: an identifier first seen, and the profile it joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalIdMappingUpdate {
    /// A unique row id (random, KSUID-shaped).
    pub id: String,
    /// Lowercase hex SHA-1 of `external_id_type || external_id_value`.
    pub external_id_hash: String,
    /// The identifier type.
    pub external_id_type: String,
    /// The identifier value.
    pub external_id_value: String,
    /// The profile the identifier was first attached to (never rewritten by merges).
    pub segment_id: String,
}

/// One `profile_traits_updates` row: a profile's complete trait set after a change.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileTraitsUpdate {
    /// The profile (always a canonical one when the row is written).
    pub segment_id: String,
    /// Every trait of the profile (a full snapshot, not a diff).
    pub traits: Map<String, Value>,
}

/// Why an identifier of an event was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Its value is blocked by the rules.
    Blocked,
    /// Using it would have put a profile over a per-type limit (it was the event's
    /// lowest-priority identifier at that point).
    Limit,
    /// A profile is at its merge or identifier cap.
    ProfileIdentifierCap,
}

/// An event identity resolution refuses; the graph is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// An identify call with too many traits.
    #[error("identify carries {count} traits; fewer than {max} are accepted")]
    TooManyTraits {
        /// Traits on the call.
        count: usize,
        /// The configured limit (`caps.max_traits`).
        max: usize,
    },
    /// Every identifier of the event was blocked or dropped, so it can't be tied to a profile;
    /// such an event must not be stored as resolved.
    #[error("the event has no usable identifier (all were blocked or dropped)")]
    NoIdentifiers,
}

/// A profile as persisted: enough to rebuild the graph with [`IdentityGraph::restore`].
///
/// [`IdentityGraph::restore`]: super::IdentityGraph::restore
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileState {
    /// The profile's id.
    pub segment_id: String,
    /// The profile it resolves to (itself while it has not been merged away).
    pub canonical_segment_id: String,
    /// Creation order across the graph (lower is older; merges keep the oldest).
    pub created_rank: u64,
    /// How many profiles were merged into this one, directly or transitively.
    pub merges: u32,
    /// The profile's traits (empty once merged away: they moved to the survivor).
    pub traits: Map<String, Value>,
    /// When each trait was last set or removed: trait name → RFC 3339 timestamp string.
    /// Removed traits keep their entry so a merge knows the removal is newer.
    pub trait_times: Map<String, Value>,
}

/// An identifier as persisted.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentifierState {
    /// The identifier type.
    pub id_type: String,
    /// The identifier value.
    pub value: String,
    /// The profile it was first attached to; its canonical profile owns it.
    pub segment_id: String,
    /// The timestamp of the first event that carried it.
    pub first_seen: Timestamp,
    /// The timestamp of the latest event that carried it (limits with a window count by this).
    pub last_seen: Timestamp,
}

/// Profile and identifier state changed since the previous [`IdentityGraph::take_dirty`],
/// latest state of each once.
///
/// [`IdentityGraph::take_dirty`]: super::IdentityGraph::take_dirty
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDelta {
    /// Profiles to store by `segment_id`: the first [`StateDelta::new_profiles`] to insert, the
    /// rest to upsert.
    pub profiles: Vec<ProfileState>,
    /// Identifiers to store by `(id_type, value)`: the first [`StateDelta::new_identifiers`] to
    /// insert, the rest to upsert.
    pub identifiers: Vec<IdentifierState>,
    /// How many of `profiles`, at its start, the store holds no row of yet: it may insert them
    /// without looking for one (an upsert costs PostgreSQL a third more per row).
    pub new_profiles: usize,
    /// How many of `identifiers`, at its start, the store holds no row of yet.
    pub new_identifiers: usize,
}

impl StateDelta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty() && self.identifiers.is_empty()
    }
}
