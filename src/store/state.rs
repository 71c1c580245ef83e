//! The current-state tables (`user_identifiers`, `user_traits`, `profile_merges`) as the store
//! sees them now, derived from the persisted profile and identifier state.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::identity::{IdentifierState, ProfileState};

use super::{Store, StoreError};

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

    /// What a position in the table is made of (see `StateKey`).
    pub fn key_columns(self) -> &'static [&'static str] {
        match self {
            StateTable::UserIdentifiers => &["type", "value"],
            StateTable::UserTraits | StateTable::ProfileMerges => &["segment_id"],
        }
    }

    /// The columns of the table's rows, in their order.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            StateTable::UserIdentifiers => &["canonical_segment_id", "type", "value", "timestamp"],
            StateTable::UserTraits => &["canonical_segment_id", "name", "value"],
            StateTable::ProfileMerges => &["canonical_segment_id", "segment_id"],
        }
    }
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

/// A row of `user_identifiers`.
fn identifier_row(i: &IdentifierState, canonical: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("canonical_segment_id".into(), canonical.into());
    m.insert("type".into(), i.id_type.clone().into());
    m.insert("value".into(), i.value.clone().into());
    m.insert("timestamp".into(), i.first_seen.to_string().into());
    m
}

/// The rows of `user_traits` of a live profile.
fn trait_rows(p: &ProfileState) -> impl Iterator<Item = Map<String, Value>> + '_ {
    p.traits.iter().map(move |(name, value)| {
        let mut m = Map::new();
        m.insert("canonical_segment_id".into(), p.segment_id.clone().into());
        m.insert("name".into(), name.clone().into());
        m.insert("value".into(), value.clone());
        m
    })
}

/// The row of `profile_merges` of a merged-away profile.
fn merge_row(p: &ProfileState, canonical: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("canonical_segment_id".into(), canonical.into());
    m.insert("segment_id".into(), p.segment_id.clone().into());
    m
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
            .map(|i| identifier_row(i, canonical_of(&by_id, &i.segment_id)))
            .collect(),
        StateTable::UserTraits => profiles
            .iter()
            .filter(|p| p.canonical_segment_id == p.segment_id)
            .flat_map(trait_rows)
            .collect(),
        // One row per profile: a live one maps to itself.
        StateTable::ProfileMerges => profiles
            .iter()
            .map(|p| merge_row(p, canonical_of(&by_id, &p.segment_id)))
            .collect(),
    };
    rows.sort_by(|a, b| {
        let key = |m: &Map<String, Value>| serde_json::to_string(m).unwrap_or_default();
        key(a).cmp(&key(b))
    });
    rows
}

/// Where a page of a current-state table ends: the key of the last profile (`[segment_id]`) or
/// identifier (`[type, value]`) read, which the next page starts after.
pub type StateKey = Vec<String>;

/// One page of a current-state table read by key.
#[derive(Debug)]
pub struct StatePage {
    /// The rows, in key order (a profile's traits together).
    pub rows: Vec<Map<String, Value>>,
    /// The key to read the next page after (`after` again when nothing was read).
    pub next: Option<StateKey>,
    /// False once the read reached the end of the table.
    pub more: bool,
    /// Profiles or identifiers read (a profile without traits, or a live one read for
    /// `profile_merges`, gives no row).
    pub read: usize,
}

/// Reads the profiles `ids` point at and, through merges, their live profiles into `known`.
fn load_chains(
    store: &mut dyn Store,
    known: &mut HashMap<String, ProfileState>,
    ids: impl IntoIterator<Item = String>,
) -> Result<(), StoreError> {
    let mut missing: Vec<String> = ids
        .into_iter()
        .filter(|id| !known.contains_key(id))
        .collect();
    // Each round follows one more step of the merge chains; a chain is at most as long as the
    // profiles read, and a profile missing from the store ends its chain.
    while !missing.is_empty() {
        missing.sort();
        missing.dedup();
        let ids: Vec<&str> = missing.iter().map(String::as_str).collect();
        let found = store.profiles_by_id(&ids)?;
        let mut next = vec![];
        for p in found {
            if p.canonical_segment_id != p.segment_id
                && !known.contains_key(&p.canonical_segment_id)
                && !missing.contains(&p.canonical_segment_id)
            {
                next.push(p.canonical_segment_id.clone());
            }
            known.insert(p.segment_id.clone(), p);
        }
        missing = next;
    }
    Ok(())
}

/// The rows of the next `limit` profiles (or identifiers) of `table` after `after`, read by
/// key from the store: a page of `user_traits` may hold more rows than `limit` (a profile's
/// traits stay together) or fewer (profiles without traits, merged ones). Each page
/// reflects the store when it was read: a merge between two pages can move a profile's traits
/// to a key already passed; the change logs are the consistent record.
pub fn state_page(
    store: &mut dyn Store,
    table: StateTable,
    after: Option<&[String]>,
    limit: usize,
) -> Result<StatePage, StoreError> {
    let limit = limit.max(1);
    if after.is_some_and(|k| k.len() != table.key_columns().len()) {
        return Err(StoreError::BadKey(table));
    }
    let mut known: HashMap<String, ProfileState> = HashMap::new();
    match table {
        StateTable::UserIdentifiers => {
            let after = after.map(|k| (k[0].as_str(), k[1].as_str()));
            let ids = store.read_identifiers(after, limit)?;
            load_chains(store, &mut known, ids.iter().map(|i| i.segment_id.clone()))?;
            let by_id: HashMap<&str, &ProfileState> =
                known.iter().map(|(k, p)| (k.as_str(), p)).collect();
            Ok(StatePage {
                rows: ids
                    .iter()
                    .map(|i| identifier_row(i, canonical_of(&by_id, &i.segment_id)))
                    .collect(),
                more: ids.len() == limit,
                read: ids.len(),
                next: ids
                    .last()
                    .map(|i| vec![i.id_type.clone(), i.value.clone()])
                    .or_else(|| after.map(|(t, v)| vec![t.to_string(), v.to_string()])),
            })
        }
        StateTable::UserTraits | StateTable::ProfileMerges => {
            let after = after.map(|k| k[0].as_str());
            let profiles = store.read_profiles(after, limit)?;
            let rows = if table == StateTable::UserTraits {
                profiles
                    .iter()
                    .filter(|p| p.canonical_segment_id == p.segment_id)
                    .flat_map(trait_rows)
                    .collect()
            } else {
                let merged = || {
                    profiles
                        .iter()
                        .filter(|p| p.canonical_segment_id != p.segment_id)
                };
                let targets = merged().map(|p| p.canonical_segment_id.clone());
                load_chains(store, &mut known, targets)?;
                let mut by_id: HashMap<&str, &ProfileState> =
                    known.iter().map(|(k, p)| (k.as_str(), p)).collect();
                by_id.extend(profiles.iter().map(|p| (p.segment_id.as_str(), p)));
                // One row per profile: a live one maps to itself.
                profiles
                    .iter()
                    .map(|p| merge_row(p, canonical_of(&by_id, &p.segment_id)))
                    .collect()
            };
            Ok(StatePage {
                rows,
                more: profiles.len() == limit,
                read: profiles.len(),
                next: profiles
                    .last()
                    .map(|p| vec![p.segment_id.clone()])
                    .or_else(|| after.map(|a| vec![a.to_string()])),
            })
        }
    }
}
