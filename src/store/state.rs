//! The current-state tables (`user_identifiers`, `user_traits`, `profile_merges`) as the store
//! sees them now, derived from the persisted profile and identifier state.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::identity::{IdentifierState, ProfileState};

/// A current-state table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateTable {
    /// Every identifier of every live profile.
    UserIdentifiers,
    /// Every trait of every live profile.
    UserTraits,
    /// Every profile merged into a live one.
    ProfileMerges,
}

impl StateTable {
    /// The table for a name, if it is one.
    pub fn from_table(name: &str) -> Option<StateTable> {
        match name {
            "user_identifiers" => Some(StateTable::UserIdentifiers),
            "user_traits" => Some(StateTable::UserTraits),
            "profile_merges" => Some(StateTable::ProfileMerges),
            _ => None,
        }
    }

    /// Every current-state table name.
    pub const TABLES: [&'static str; 3] = ["user_identifiers", "user_traits", "profile_merges"];
}

/// Follows merges to the live profile.
fn canonical_of<'a>(by_id: &HashMap<&'a str, &'a ProfileState>, id: &'a str) -> &'a str {
    let mut current = id;
    // Bounded: a chain can't be longer than the number of profiles.
    for _ in 0..=by_id.len() {
        match by_id.get(current) {
            Some(p) if p.canonical_segment_id != current => current = &p.canonical_segment_id,
            _ => break,
        }
    }
    current
}

/// The rows of `table`, sorted for stable output.
pub fn state_rows(
    table: StateTable,
    profiles: &[ProfileState],
    identifiers: &[IdentifierState],
) -> Vec<Map<String, Value>> {
    let by_id: HashMap<&str, &ProfileState> = profiles
        .iter()
        .map(|p| (p.segment_id.as_str(), p))
        .collect();
    let mut rows: Vec<Map<String, Value>> = match table {
        StateTable::UserIdentifiers => identifiers
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert(
                    "canonical_segment_id".into(),
                    canonical_of(&by_id, &i.segment_id).into(),
                );
                m.insert("type".into(), i.id_type.clone().into());
                m.insert("value".into(), i.value.clone().into());
                m.insert("timestamp".into(), i.first_seen.to_string().into());
                m
            })
            .collect(),
        StateTable::UserTraits => profiles
            .iter()
            .filter(|p| p.canonical_segment_id == p.segment_id)
            .flat_map(|p| {
                p.traits.iter().map(move |(name, value)| {
                    let mut m = Map::new();
                    m.insert("canonical_segment_id".into(), p.segment_id.clone().into());
                    m.insert("name".into(), name.clone().into());
                    m.insert("value".into(), value.clone());
                    m
                })
            })
            .collect(),
        StateTable::ProfileMerges => profiles
            .iter()
            .filter(|p| p.canonical_segment_id != p.segment_id)
            .map(|p| {
                let mut m = Map::new();
                m.insert(
                    "canonical_segment_id".into(),
                    canonical_of(&by_id, &p.segment_id).into(),
                );
                m.insert("segment_id".into(), p.segment_id.clone().into());
                m
            })
            .collect(),
    };
    rows.sort_by(|a, b| {
        let key = |m: &Map<String, Value>| serde_json::to_string(m).unwrap_or_default();
        key(a).cmp(&key(b))
    });
    rows
}
