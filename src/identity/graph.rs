//! The in-memory identity graph: profiles and identifiers in vectors, indexed by hash maps,
//! and the persistence boundary (`take_dirty`, `restore`).

use std::sync::Arc;

// The graph's indexes are hashed on every event: foldhash (randomly seeded per map, as
// hashbrown's default) instead of SipHash.
use foldhash::HashMap;
use foldhash::HashMapExt;

use jiff::{SignedDuration, Timestamp};
use serde_json::{Map, Value};

use super::model::{IdentifierState, ProfileState, StateDelta};
use super::{Identifier, Rules};
use crate::event::Event;

/// Index of a profile in `IdentityGraph::profiles`.
pub(super) type ProfileIx = u32;
/// Index of an identifier in `IdentityGraph::idents`.
pub(super) type IdentIx = u32;
/// Index of an identifier type in `IdentityGraph::types`.
pub(super) type TypeIx = u32;

/// Resolves events to profiles under [`Rules`]; see the [module docs](super) for the flow.
///
/// Memory grows with profiles and identifiers, never with events.
#[derive(Debug)]
pub struct IdentityGraph {
    pub(super) rules: Rules,
    pub(super) types: Vec<TypeInfo>,
    type_index: HashMap<Arc<str>, TypeIx>,
    /// Per type: identifier value → identifier.
    by_value: Vec<HashMap<Arc<str>, IdentIx>>,
    pub(super) profiles: Vec<Profile>,
    by_segment_id: HashMap<Arc<str>, ProfileIx>,
    pub(super) idents: Vec<IdentEntry>,
    pub(super) next_rank: u64,
    /// The order the next identify's trait writes get ([`TraitTime::order`]): above every
    /// order the graph holds.
    pub(super) next_write: u64,
    live_profiles: usize,
    dirty_profiles: Vec<ProfileIx>,
    dirty_idents: Vec<IdentIx>,
}

/// An identifier type with its rule settings resolved once.
#[derive(Debug)]
pub(super) struct TypeInfo {
    pub(super) name: Arc<str>,
    pub(super) max: u32,
    pub(super) window: Option<SignedDuration>,
}

#[derive(Debug)]
pub(super) struct Profile {
    pub(super) segment_id: Arc<str>,
    /// Always fully resolved: a canonical profile points at itself.
    pub(super) canonical: ProfileIx,
    pub(super) created_rank: u64,
    pub(super) merges: u32,
    /// Profiles merged into this one, transitively, oldest first (canonical profiles only).
    pub(super) members: Vec<ProfileIx>,
    /// Identifiers this profile owns (canonical profiles only).
    pub(super) identifiers: Vec<IdentIx>,
    pub(super) traits: Map<String, Value>,
    /// When each trait was last set or removed (removals stay as tombstones).
    pub(super) trait_times: HashMap<String, TraitTime>,
    dirty: bool,
    /// Whether the store may hold a row of it: read from the store, made by `restore`'s repair,
    /// or reported by [`IdentityGraph::take_dirty`] since it was created. False only when it
    /// certainly holds none.
    stored: bool,
}

#[derive(Debug)]
pub(super) struct IdentEntry {
    pub(super) ty: TypeIx,
    pub(super) value: Arc<str>,
    /// The profile it was first attached to; `profiles[profile].canonical` owns it.
    pub(super) profile: ProfileIx,
    pub(super) first_seen: Timestamp,
    pub(super) last_seen: Timestamp,
    dirty: bool,
    /// Whether the store holds a row of it (as [`Profile`]'s).
    stored: bool,
}

/// When a trait was last set or removed: the identify's `timestamp`, then the order in which
/// the graph applied the identifies, so that of two writes with one timestamp the later to
/// arrive wins — on one profile as across a merge (where the two were applied to different
/// profiles). Stored as the timestamp with the order in an RFC 9557 annotation,
/// `2024-03-01T00:00:00Z[x-order=17]`, which an earlier release reads as the timestamp alone
/// (its parser ignores the annotation, and it writes the time back without it); a time stored
/// without one has order 0, before any write since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TraitTime {
    pub(super) at: Timestamp,
    pub(super) order: u64,
}

/// What starts the write order's annotation in a stored trait time.
const ORDER_MARK: &str = "[x-order=";

impl TraitTime {
    /// Older than any recorded time (a trait with none).
    pub(super) const MIN: TraitTime = TraitTime {
        at: Timestamp::MIN,
        order: 0,
    };

    /// A stored time: `<timestamp>[x-order=<order>]`, or a timestamp alone (order 0).
    fn parse(v: &Value) -> Option<TraitTime> {
        let s = v.as_str()?;
        // A malformed order reads as none, as an earlier release reads it.
        let (at, order) = s
            .strip_suffix(']')
            .and_then(|rest| rest.rsplit_once(ORDER_MARK))
            .and_then(|(at, order)| Some((at, order.parse().ok()?)))
            .unwrap_or((s, 0));
        Some(TraitTime {
            at: crate::event::parse_timestamp(at)?,
            order,
        })
    }

    fn to_json(self) -> Value {
        Value::String(if self.order == 0 {
            self.at.to_string()
        } else {
            format!("{}{ORDER_MARK}{}]", self.at, self.order)
        })
    }
}

impl Profile {
    /// A profile from its persisted state, canonical pointer unset, and the name of the
    /// profile its state says it resolves to. A trait time later than `now` (an earlier
    /// release ordered writes by an event's timestamp even when it was in the future) reads
    /// as `now`, so that such a trait takes the writes after it ([`Subject::time_of`]).
    ///
    /// [`Subject::time_of`]: super::Subject::time_of
    fn of(state: ProfileState, now: Timestamp) -> (Profile, String) {
        let trait_times = state
            .trait_times
            .iter()
            .filter_map(|(k, v)| {
                let t = TraitTime::parse(v)?;
                Some((
                    k.clone(),
                    TraitTime {
                        at: t.at.min(now),
                        order: t.order,
                    },
                ))
            })
            .collect();
        let profile = Profile {
            segment_id: Arc::from(state.segment_id.as_str()),
            canonical: 0,
            created_rank: state.created_rank,
            merges: state.merges,
            members: Vec::new(),
            identifiers: Vec::new(),
            traits: state.traits,
            trait_times,
            dirty: false,
            stored: true,
        };
        (profile, state.canonical_segment_id)
    }

    /// One more than the highest write order of its traits.
    fn next_write(&self) -> u64 {
        self.trait_times
            .values()
            .map(|t| t.order.saturating_add(1))
            .max()
            .unwrap_or(1)
    }
}

/// `t` to the microsecond, as the store keeps identifiers' sightings: so that a graph that
/// kept running and one restored from the store (a restarted engine, another replica) compare
/// the same times against a limit's window.
pub(super) fn to_micros(t: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
}

fn ix(n: usize) -> u32 {
    u32::try_from(n).expect("identity graph holds fewer than 2^32 profiles and identifiers")
}

impl IdentityGraph {
    /// An empty graph applying `rules`.
    pub fn new(rules: Rules) -> Self {
        IdentityGraph {
            rules,
            types: Vec::new(),
            type_index: HashMap::new(),
            by_value: Vec::new(),
            profiles: Vec::new(),
            by_segment_id: HashMap::new(),
            idents: Vec::new(),
            next_rank: 0,
            next_write: 1,
            live_profiles: 0,
            dirty_profiles: Vec::new(),
            dirty_idents: Vec::new(),
        }
    }

    /// The rules the graph applies.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Resolves one event (see [`Resolution`](super::Resolution)). On `Err` nothing in the
    /// graph changes; an event refused with
    /// [`NoIdentifiers`](super::ResolveError::NoIdentifiers) has no profile and must not be
    /// stored as resolved.
    pub fn resolve(&mut self, event: &Event) -> Result<super::Resolution, super::ResolveError> {
        super::resolve::resolve(self, super::Subject::of(event))
    }

    /// [`IdentityGraph::resolve`] of what resolution reads of an event, taken from it earlier
    /// (the engine does so on its HTTP threads, so the single writer never holds whole events).
    pub fn resolve_subject(
        &mut self,
        subject: super::Subject<'_>,
    ) -> Result<super::Resolution, super::ResolveError> {
        super::resolve::resolve(self, subject)
    }

    /// Profile and identifier state changed since the last call, each once in its latest
    /// state, for the store to persist in the same transaction as the change logs; those the
    /// store holds no row of yet (created by resolution since the graph was restored, or since
    /// they were last taken) first ([`StateDelta::new_profiles`]). A graph whose delta was not
    /// stored must be restored from the store before its next delta is.
    pub fn take_dirty(&mut self) -> StateDelta {
        let (dirty, new_profiles) = new_first(std::mem::take(&mut self.dirty_profiles), |p| {
            self.profiles[p as usize].stored
        });
        let profiles = dirty
            .into_iter()
            .map(|p| {
                let prof = &mut self.profiles[p as usize];
                prof.dirty = false;
                prof.stored = true;
                self.profile_state(p)
            })
            .collect();
        let (dirty, new_identifiers) = new_first(std::mem::take(&mut self.dirty_idents), |i| {
            self.idents[i as usize].stored
        });
        let identifiers = dirty
            .into_iter()
            .map(|i| {
                let e = &mut self.idents[i as usize];
                e.dirty = false;
                e.stored = true;
                IdentifierState {
                    id_type: self.types[e.ty as usize].name.to_string(),
                    value: e.value.to_string(),
                    segment_id: self.profiles[e.profile as usize].segment_id.to_string(),
                    first_seen: e.first_seen,
                    last_seen: e.last_seen,
                }
            })
            .collect();
        StateDelta {
            profiles,
            identifiers,
            new_profiles,
            new_identifiers,
        }
    }

    fn profile_state(&self, p: ProfileIx) -> ProfileState {
        let prof = &self.profiles[p as usize];
        ProfileState {
            segment_id: prof.segment_id.to_string(),
            canonical_segment_id: self.profiles[prof.canonical as usize]
                .segment_id
                .to_string(),
            created_rank: prof.created_rank,
            merges: prof.merges,
            traits: prof.traits.clone(),
            trait_times: prof
                .trait_times
                .iter()
                .map(|(k, t)| (k.clone(), t.to_json()))
                .collect(),
        }
    }

    /// Replaces the graph's contents with persisted state: every profile (merged-away ones
    /// included) and every identifier. Later entries win over earlier ones with the same key,
    /// so concatenated [`take_dirty`](Self::take_dirty) deltas can be passed as they are.
    /// Inconsistent state is repaired rather than rejected: an unknown or cyclic canonical
    /// makes a profile canonical, and an identifier of an unknown profile gets a new profile
    /// (reported by the next `take_dirty`).
    pub fn restore(&mut self, profiles: Vec<ProfileState>, identifiers: Vec<IdentifierState>) {
        let now = to_micros(Timestamp::now());
        let rules = std::mem::take(&mut self.rules);
        *self = IdentityGraph::new(rules);

        let mut canonical_names = Vec::with_capacity(profiles.len());
        for state in profiles {
            let (profile, canonical_name) = Profile::of(state, now);
            match self.by_segment_id.get(&*profile.segment_id) {
                Some(&p) => {
                    self.profiles[p as usize] = profile;
                    canonical_names[p as usize] = canonical_name;
                }
                None => {
                    let p = ix(self.profiles.len());
                    self.by_segment_id.insert(profile.segment_id.clone(), p);
                    self.profiles.push(profile);
                    canonical_names.push(canonical_name);
                }
            }
        }
        let direct: Vec<ProfileIx> = canonical_names
            .iter()
            .enumerate()
            .map(|(p, name)| {
                self.by_segment_id
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(ix(p))
            })
            .collect();
        for p in 0..self.profiles.len() {
            self.profiles[p].canonical = follow_to_root(&direct, ix(p));
        }
        for p in 0..self.profiles.len() {
            let c = self.profiles[p].canonical as usize;
            if c != p {
                self.profiles[c].members.push(ix(p));
            }
        }
        self.next_rank = self
            .profiles
            .iter()
            .map(|p| p.created_rank.saturating_add(1))
            .max()
            .unwrap_or(0);
        self.next_write = self.profiles.iter().fold(1, |n, p| n.max(p.next_write()));
        for p in 0..self.profiles.len() {
            let mut members = std::mem::take(&mut self.profiles[p].members);
            members.sort_unstable_by_key(|&m| (self.profiles[m as usize].created_rank, m));
            self.profiles[p].members = members;
        }
        self.live_profiles = self
            .profiles
            .iter()
            .enumerate()
            .filter(|(p, prof)| prof.canonical as usize == *p)
            .count();

        self.put_identifiers(identifiers, now);
    }

    /// Applies persisted state that changed since the graph was restored or last applied to —
    /// what another writer stored (several engine replicas on one store) — instead of
    /// restoring everything again. The graph is then as [`restore`](Self::restore) of the
    /// whole state would leave it, for any state this module's resolution writes: profiles
    /// merge whole, into a profile that stays canonical. Returns false, with the graph half
    /// updated, on a change it cannot apply that way (a profile leaving the profile it was
    /// merged into, an identifier of an unknown profile): the caller must then restore the
    /// whole state. Call it with nothing dirty
    /// (after [`take_dirty`](Self::take_dirty)).
    pub fn apply(
        &mut self,
        profiles: Vec<ProfileState>,
        identifiers: Vec<IdentifierState>,
    ) -> bool {
        let now = to_micros(Timestamp::now());
        let mut repointed = Vec::with_capacity(profiles.len());
        for state in profiles {
            let (profile, canonical_name) = Profile::of(state, now);
            self.next_rank = self.next_rank.max(profile.created_rank.saturating_add(1));
            self.next_write = self.next_write.max(profile.next_write());
            let p = match self.by_segment_id.get(&*profile.segment_id) {
                Some(&p) => {
                    let old = &mut self.profiles[p as usize];
                    old.created_rank = profile.created_rank;
                    old.merges = profile.merges;
                    old.traits = profile.traits;
                    old.trait_times = profile.trait_times;
                    old.stored = true;
                    p
                }
                None => {
                    let p = ix(self.profiles.len());
                    self.by_segment_id.insert(profile.segment_id.clone(), p);
                    self.profiles.push(Profile {
                        canonical: p,
                        ..profile
                    });
                    self.live_profiles += 1;
                    p
                }
            };
            repointed.push((p, canonical_name));
        }
        // Each changed profile and the one its row says it resolves to (itself when unknown),
        // once every changed profile is in the graph.
        let targets: Vec<(ProfileIx, ProfileIx)> = repointed
            .into_iter()
            .map(|(p, name)| {
                (
                    p,
                    self.by_segment_id.get(name.as_str()).copied().unwrap_or(p),
                )
            })
            .collect();
        // Profiles that were canonical and now point elsewhere take everything merged into them
        // along; then every profile must resolve as its row says.
        for &(p, target) in &targets {
            let root = self.profiles[target as usize].canonical;
            if self.profiles[p as usize].canonical == p && root != p {
                self.absorb(root, p);
            }
        }
        for (p, target) in targets {
            // A row naming the profile itself says it is canonical.
            let root = if target == p {
                p
            } else {
                self.profiles[target as usize].canonical
            };
            if self.profiles[p as usize].canonical != root {
                return false;
            }
        }
        // An identifier of a profile neither known nor among the changes: the changes are not
        // all there, and restore's repair (a new empty profile of that name) would overwrite
        // the real one at the next write.
        if identifiers
            .iter()
            .any(|i| !self.by_segment_id.contains_key(i.segment_id.as_str()))
        {
            return false;
        }
        self.put_identifiers(identifiers, now);
        true
    }

    /// Makes canonical profile `b`, and every profile merged into it, resolve to canonical
    /// profile `a`, with its identifiers: what a merge of `b` into `a` does to the graph's
    /// structure (resolution adds the rows, the traits and the merge count).
    pub(super) fn absorb(&mut self, a: ProfileIx, b: ProfileIx) {
        let members = std::mem::take(&mut self.profiles[b as usize].members);
        let identifiers = std::mem::take(&mut self.profiles[b as usize].identifiers);
        for &m in std::iter::once(&b).chain(members.iter()) {
            self.profiles[m as usize].canonical = a;
        }
        self.live_profiles -= 1;
        let mut a_members = std::mem::take(&mut self.profiles[a as usize].members);
        a_members.push(b);
        a_members.extend(members);
        a_members.sort_unstable_by_key(|&m| (self.profiles[m as usize].created_rank, m));
        self.profiles[a as usize].members = a_members;
        self.profiles[a as usize].identifiers.extend(identifiers);
    }

    /// Restores or updates identifiers from persisted state; one of an unknown profile gets a
    /// new profile (reported by the next `take_dirty`).
    /// Identifiers as persisted; a sighting later than `now` (stored by an earlier release,
    /// which took an event's timestamp in the future as it was) reads as now, so that it
    /// does not count under a limit's window until that date.
    fn put_identifiers(&mut self, identifiers: Vec<IdentifierState>, now: Timestamp) {
        for mut state in identifiers {
            state.first_seen = state.first_seen.min(now);
            state.last_seen = state.last_seen.min(now);
            let ty = self.intern(&state.id_type);
            let profile = match self.by_segment_id.get(state.segment_id.as_str()) {
                Some(&p) => p,
                None => {
                    let p = self.push_profile(Arc::from(state.segment_id.as_str()));
                    // Not new to the store for sure: every writer that loads this state makes
                    // the same repair, and one may have stored it in a write that accepted no
                    // event — which moves no head, so the others catch up with nothing. Upserted.
                    self.profiles[p as usize].stored = true;
                    self.mark_profile(p);
                    p
                }
            };
            if let Some(&i) = self.by_value[ty as usize].get(state.value.as_str()) {
                let old_owner = self.owner(i);
                let c = self.profiles[profile as usize].canonical;
                if old_owner != c {
                    self.profiles[old_owner as usize]
                        .identifiers
                        .retain(|&x| x != i);
                    self.profiles[c as usize].identifiers.push(i);
                }
                let e = &mut self.idents[i as usize];
                e.profile = profile;
                e.first_seen = state.first_seen;
                e.last_seen = state.last_seen;
                e.stored = true;
            } else {
                let i = self.push_ident(ty, &state.value, profile, state.first_seen);
                let e = &mut self.idents[i as usize];
                e.last_seen = state.last_seen;
                e.stored = true;
            }
        }
    }

    /// How many live (canonical, not merged-away) profiles the graph holds.
    pub fn profile_count(&self) -> usize {
        self.live_profiles
    }

    /// The canonical profile `segment_id` resolves to (itself when not merged away).
    pub fn canonical(&self, segment_id: &str) -> Option<&str> {
        let &p = self.by_segment_id.get(segment_id)?;
        let c = self.profiles[p as usize].canonical;
        Some(&self.profiles[c as usize].segment_id)
    }

    /// The canonical profile owning identifier `id`.
    pub fn lookup(&self, id: &Identifier) -> Option<&str> {
        let i = self.find(&id.id_type, &id.value)?;
        Some(&self.profiles[self.owner(i) as usize].segment_id)
    }

    /// The traits of the canonical profile `segment_id` resolves to.
    pub fn traits(&self, segment_id: &str) -> Option<&Map<String, Value>> {
        let &p = self.by_segment_id.get(segment_id)?;
        let c = self.profiles[p as usize].canonical;
        Some(&self.profiles[c as usize].traits)
    }

    // ---- internals shared with resolve.rs ----

    pub(super) fn type_ix(&self, name: &str) -> Option<TypeIx> {
        self.type_index.get(name).copied()
    }

    pub(super) fn intern(&mut self, name: &str) -> TypeIx {
        if let Some(t) = self.type_ix(name) {
            return t;
        }
        let limit = self.rules.limit(name);
        let window = limit.window.and_then(|w| SignedDuration::try_from(w).ok());
        let t = ix(self.types.len());
        let name: Arc<str> = Arc::from(name);
        self.types.push(TypeInfo {
            name: name.clone(),
            max: limit.max,
            window,
        });
        self.type_index.insert(name, t);
        self.by_value.push(HashMap::new());
        t
    }

    pub(super) fn find(&self, id_type: &str, value: &str) -> Option<IdentIx> {
        let t = self.type_ix(id_type)?;
        self.find_ix(t, value)
    }

    pub(super) fn find_ix(&self, ty: TypeIx, value: &str) -> Option<IdentIx> {
        self.by_value[ty as usize].get(value).copied()
    }

    /// The canonical profile owning identifier `i`.
    pub(super) fn owner(&self, i: IdentIx) -> ProfileIx {
        self.profiles[self.idents[i as usize].profile as usize].canonical
    }

    /// Adds a new canonical profile with the next creation rank.
    pub(super) fn push_profile(&mut self, segment_id: Arc<str>) -> ProfileIx {
        let p = ix(self.profiles.len());
        self.profiles.push(Profile {
            segment_id: segment_id.clone(),
            canonical: p,
            created_rank: self.next_rank,
            merges: 0,
            members: Vec::new(),
            identifiers: Vec::new(),
            traits: Map::new(),
            trait_times: HashMap::new(),
            dirty: false,
            stored: false,
        });
        self.next_rank += 1;
        self.live_profiles += 1;
        self.by_segment_id.insert(segment_id, p);
        p
    }

    pub(super) fn segment_id_taken(&self, segment_id: &str) -> bool {
        self.by_segment_id.contains_key(segment_id)
    }

    /// Adds identifier `(ty, value)` to `profile`, first seen at `seen` (not marked dirty).
    pub(super) fn push_ident(
        &mut self,
        ty: TypeIx,
        value: &str,
        profile: ProfileIx,
        seen: Timestamp,
    ) -> IdentIx {
        let seen = to_micros(seen);
        let i = ix(self.idents.len());
        let value: Arc<str> = Arc::from(value);
        self.idents.push(IdentEntry {
            ty,
            value: value.clone(),
            profile,
            first_seen: seen,
            last_seen: seen,
            dirty: false,
            stored: false,
        });
        self.by_value[ty as usize].insert(value, i);
        let c = self.profiles[profile as usize].canonical;
        self.profiles[c as usize].identifiers.push(i);
        i
    }

    pub(super) fn mark_profile(&mut self, p: ProfileIx) {
        let prof = &mut self.profiles[p as usize];
        if !prof.dirty {
            prof.dirty = true;
            self.dirty_profiles.push(p);
        }
    }

    pub(super) fn mark_ident(&mut self, i: IdentIx) {
        let e = &mut self.idents[i as usize];
        if !e.dirty {
            e.dirty = true;
            self.dirty_idents.push(i);
        }
    }
}

/// `dirty` with the entries the store holds no row of (`stored` false) first, each part in the
/// order it was marked, and how many those are.
fn new_first(dirty: Vec<u32>, stored: impl Fn(u32) -> bool) -> (Vec<u32>, usize) {
    let (mut new, known): (Vec<u32>, Vec<u32>) = dirty.into_iter().partition(|&x| !stored(x));
    let count = new.len();
    new.extend(known);
    (new, count)
}

/// The root of `p`'s canonical chain; a chain that loops makes `p` its own root.
fn follow_to_root(direct: &[ProfileIx], p: ProfileIx) -> ProfileIx {
    let mut cur = p;
    for _ in 0..=direct.len() {
        let next = direct[cur as usize];
        if next == cur {
            return cur;
        }
        cur = next;
    }
    p
}
