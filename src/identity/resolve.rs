//! `IdentityGraph::resolve`: plan (read-only: lookups, limits, caps), then apply.
//!
//! Planning never touches profiles or identifiers, so an event that fails leaves the graph as
//! it was; only the table of identifier type names may grow (it is not state).

use std::sync::Arc;

use jiff::Timestamp;
use serde_json::{Map, Value};

use super::graph::{IdentIx, IdentityGraph, ProfileIx, TraitTime, TypeIx};
use super::ids::{external_id_hash, new_row_id, new_segment_id};
use super::model::{
    DropReason, ExternalIdMappingUpdate, IdGraphUpdate, ProfileTraitsUpdate, Resolution,
    ResolveError,
};
use super::{Identifier, Subject, traits};
use crate::event::EventType;

/// One identifier of the event under consideration.
struct Candidate<'i> {
    id: &'i Identifier,
    ty: TypeIx,
    /// The identifier, when the graph already knows it.
    existing: Option<IdentIx>,
    /// Still used (not dropped by a limit or cap).
    active: bool,
}

/// What applying the event will do.
struct Plan {
    /// The oldest matched profile; `None` creates a profile.
    survivor: Option<ProfileIx>,
    /// Profiles to merge into the survivor, oldest first.
    merge: Vec<ProfileIx>,
}

pub(super) fn resolve(
    g: &mut IdentityGraph,
    event: Subject<'_>,
) -> Result<Resolution, ResolveError> {
    if let Some(traits) = event.identify_traits {
        let count = traits.len();
        if count >= g.rules.max_traits {
            return Err(ResolveError::TooManyTraits {
                count,
                max: g.rules.max_traits,
            });
        }
    }
    let mut ids = event.identifiers;
    if event.event_type == EventType::Alias {
        retype_previous_id(g, event.previous_id, event.anonymous_id, ids.to_mut());
    }
    let mut dropped = Vec::new();
    let mut candidates = Vec::with_capacity(ids.len());
    for id in ids.iter() {
        if g.rules.is_blocked(&id.value) {
            dropped.push((id.clone(), DropReason::Blocked));
            continue;
        }
        let ty = g.intern(&id.id_type);
        let existing = g.find_ix(ty, &id.value);
        candidates.push(Candidate {
            id,
            ty,
            existing,
            active: true,
        });
    }
    let plan = plan(g, &mut candidates, event.timestamp, &mut dropped)?;
    Ok(apply(
        g,
        event.timestamp,
        event.identify_traits,
        &candidates,
        plan,
        dropped,
    ))
}

/// An alias call's `previousId` was extracted as an `anonymous_id`. When the graph knows it as
/// a `user_id`, use it as one (too), so the alias links the profile that holds it; keep the
/// `anonymous_id` only when the graph knows that too or it is also the call's `anonymousId`.
fn retype_previous_id(
    g: &IdentityGraph,
    previous_id: Option<&str>,
    anonymous_id: Option<&str>,
    ids: &mut Vec<Identifier>,
) {
    let Some(prev) = previous_id else {
        return;
    };
    if g.find("user_id", prev).is_none() {
        return;
    }
    let Some(pos) = ids
        .iter()
        .position(|i| i.id_type == "anonymous_id" && i.value == prev)
    else {
        return;
    };
    let keep_anonymous = g.find("anonymous_id", prev).is_some() || anonymous_id == Some(prev);
    let already_user = ids
        .iter()
        .any(|i| i.id_type == "user_id" && i.value == prev);
    match (keep_anonymous, already_user) {
        (true, true) => {}
        (true, false) => ids.insert(pos + 1, Identifier::new("user_id", prev)),
        (false, true) => {
            ids.remove(pos);
        }
        (false, false) => ids[pos].id_type = "user_id".to_string(),
    }
}

fn plan(
    g: &IdentityGraph,
    candidates: &mut [Candidate<'_>],
    at: Timestamp,
    dropped: &mut Vec<(Identifier, DropReason)>,
) -> Result<Plan, ResolveError> {
    let mut matched: Vec<ProfileIx> = Vec::with_capacity(2);
    loop {
        if !candidates.iter().any(|c| c.active) {
            return Err(ResolveError::NoIdentifiers);
        }
        matched.clear();
        for c in candidates.iter().filter(|c| c.active) {
            if let Some(i) = c.existing {
                let owner = g.owner(i);
                if !matched.contains(&owner) {
                    matched.push(owner);
                }
            }
        }
        matched.sort_unstable_by_key(|&p| (g.profiles[p as usize].created_rank, p));
        if !exceeds_limit(g, candidates, &matched, at) {
            break;
        }
        // Segment: drop the event's lowest-priority identifier and look up again.
        let worst = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.active)
            .max_by(|(ia, a), (ib, b)| {
                g.rules
                    .priority_cmp(&a.id.id_type, &b.id.id_type)
                    .then(ia.cmp(ib))
            })
            .map(|(i, _)| i)
            .ok_or(ResolveError::NoIdentifiers)?;
        candidates[worst].active = false;
        dropped.push((candidates[worst].id.clone(), DropReason::Limit));
    }
    Ok(apply_caps(g, candidates, &matched, dropped))
}

/// Whether using every active candidate (attaching the new ones, merging every matched profile
/// into the oldest) would give the result more identifiers of some type than its limit allows.
/// Only types that gain identifiers are checked: an identifier already on the oldest profile
/// never counts as new. Identifiers last seen outside a type's window don't count, unless the
/// event carries them (it refreshes them).
fn exceeds_limit(
    g: &IdentityGraph,
    candidates: &[Candidate<'_>],
    matched: &[ProfileIx],
    at: Timestamp,
) -> bool {
    // (type, on the survivor, added by the event or the other profiles)
    let mut tally: Vec<(TypeIx, u32, u32)> = Vec::new();
    for c in candidates
        .iter()
        .filter(|c| c.active && c.existing.is_none())
    {
        match tally.iter_mut().find(|t| t.0 == c.ty) {
            Some(t) => t.2 += 1,
            None => tally.push((c.ty, 0, 1)),
        }
    }
    if matched.len() <= 1 && tally.is_empty() {
        return false;
    }
    let counts = |i: IdentIx| {
        let e = &g.idents[i as usize];
        let in_window = match g.types[e.ty as usize].window {
            None => true,
            // A window reaching before the representable range covers everything.
            Some(w) => at
                .checked_sub(w)
                .map_or(true, |cutoff| e.last_seen >= cutoff),
        };
        in_window || candidates.iter().any(|c| c.active && c.existing == Some(i))
    };
    if let Some(others) = matched.get(1..) {
        for &p in others {
            for &i in &g.profiles[p as usize].identifiers {
                if counts(i) {
                    let ty = g.idents[i as usize].ty;
                    match tally.iter_mut().find(|t| t.0 == ty) {
                        Some(t) => t.2 += 1,
                        None => tally.push((ty, 0, 1)),
                    }
                }
            }
        }
    }
    if let Some(&survivor) = matched.first() {
        for &i in &g.profiles[survivor as usize].identifiers {
            let ty = g.idents[i as usize].ty;
            if let Some(t) = tally.iter_mut().find(|t| t.0 == ty)
                && counts(i)
            {
                t.1 += 1;
            }
        }
    }
    tally
        .iter()
        .any(|&(ty, base, added)| added > 0 && base + added > g.types[ty as usize].max)
}

/// System caps: a merge that would take the survivor past `max_merges_per_profile` merges or
/// `max_identifiers_per_profile` identifiers does not happen, and new identifiers beyond the
/// identifier cap are not attached (lowest priority first); the event's identifiers left out
/// are dropped with [`DropReason::ProfileIdentifierCap`].
fn apply_caps(
    g: &IdentityGraph,
    candidates: &mut [Candidate<'_>],
    matched: &[ProfileIx],
    dropped: &mut Vec<(Identifier, DropReason)>,
) -> Plan {
    let max_merges = u64::from(g.rules.max_merges_per_profile);
    let max_ids = g.rules.max_identifiers_per_profile as usize;
    let survivor = matched.first().copied();
    let (mut merges, mut n_ids) = survivor.map_or((0, 0), |s| {
        let p = &g.profiles[s as usize];
        (u64::from(p.merges), p.identifiers.len())
    });
    let mut merge = Vec::new();
    for &p in matched.iter().skip(1) {
        let prof = &g.profiles[p as usize];
        let merges_after = merges + 1 + u64::from(prof.merges);
        let ids_after = n_ids + prof.identifiers.len();
        if merges_after <= max_merges && ids_after <= max_ids {
            merge.push(p);
            merges = merges_after;
            n_ids = ids_after;
            continue;
        }
        for c in candidates.iter_mut().filter(|c| c.active) {
            if c.existing.is_some_and(|i| g.owner(i) == p) {
                c.active = false;
                dropped.push((c.id.clone(), DropReason::ProfileIdentifierCap));
            }
        }
    }
    let mut new: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].active && candidates[i].existing.is_none())
        .collect();
    let room = max_ids.saturating_sub(n_ids);
    if new.len() > room {
        new.sort_by(|&a, &b| {
            g.rules
                .priority_cmp(&candidates[a].id.id_type, &candidates[b].id.id_type)
                .then(a.cmp(&b))
        });
        for &i in &new[room..] {
            candidates[i].active = false;
            dropped.push((candidates[i].id.clone(), DropReason::ProfileIdentifierCap));
        }
    }
    Plan { survivor, merge }
}

/// Applies `plan` for an event of time `at`; `identify_traits` are an identify call's traits.
fn apply(
    g: &mut IdentityGraph,
    at: Timestamp,
    identify_traits: Option<&Map<String, Value>>,
    candidates: &[Candidate<'_>],
    plan: Plan,
    dropped: Vec<(Identifier, DropReason)>,
) -> Resolution {
    let mut res = Resolution {
        dropped,
        ..Resolution::default()
    };
    let survivor = match plan.survivor {
        Some(s) => s,
        None => {
            let segment_id = fresh_segment_id(g);
            let p = g.push_profile(segment_id.clone());
            g.mark_profile(p);
            res.created = true;
            res.id_graph_updates.push(IdGraphUpdate {
                segment_id: segment_id.to_string(),
                canonical_segment_id: segment_id.to_string(),
            });
            p
        }
    };
    let survivor_id = g.profiles[survivor as usize].segment_id.clone();

    let mut traits_changed = false;
    for b in plan.merge {
        traits_changed |= merge_into(g, survivor, b, &mut res);
    }

    for c in candidates.iter().filter(|c| c.active) {
        match c.existing {
            Some(i) => touch(g, i, at),
            None => {
                let i = g.push_ident(c.ty, &c.id.value, survivor, at);
                g.mark_ident(i);
                res.external_id_mapping_updates
                    .push(ExternalIdMappingUpdate {
                        id: new_row_id(),
                        external_id_hash: external_id_hash(&c.id.id_type, &c.id.value),
                        external_id_type: c.id.id_type.clone(),
                        external_id_value: c.id.value.clone(),
                        segment_id: survivor_id.to_string(),
                    });
            }
        }
    }

    if let Some(identify) = identify_traits.filter(|t| !t.is_empty()) {
        let max = g.rules.max_traits_per_profile;
        let written = TraitTime {
            at,
            order: g.next_write,
        };
        g.next_write = g.next_write.saturating_add(1);
        let (changed, no_room) =
            traits::apply_identify(&mut g.profiles[survivor as usize], identify, written, max);
        traits_changed |= changed;
        res.traits_dropped = no_room;
        g.mark_profile(survivor);
    }
    if traits_changed {
        g.mark_profile(survivor);
        res.profile_traits_updates.push(ProfileTraitsUpdate {
            segment_id: survivor_id.to_string(),
            traits: g.profiles[survivor as usize].traits.clone(),
        });
    }
    res.segment_id = survivor_id.to_string();
    res
}

/// Merges profile `b` (canonical) into `a`: `b` and every profile merged into it now resolve
/// to `a`, with one `id_graph_updates` row each. Returns whether `a`'s traits changed.
fn merge_into(g: &mut IdentityGraph, a: ProfileIx, b: ProfileIx, res: &mut Resolution) -> bool {
    let a_id = g.profiles[a as usize].segment_id.to_string();
    let prof_b = &mut g.profiles[b as usize];
    let b_traits = std::mem::take(&mut prof_b.traits);
    let b_times = std::mem::take(&mut prof_b.trait_times);
    let b_merges = prof_b.merges;
    res.merged.push(prof_b.segment_id.to_string());
    let moved: Vec<ProfileIx> = std::iter::once(b)
        .chain(prof_b.members.iter().copied())
        .collect();

    g.absorb(a, b);
    for m in moved {
        g.mark_profile(m);
        res.id_graph_updates.push(IdGraphUpdate {
            segment_id: g.profiles[m as usize].segment_id.to_string(),
            canonical_segment_id: a_id.clone(),
        });
    }

    let max = g.rules.max_traits_per_profile;
    let prof_a = &mut g.profiles[a as usize];
    prof_a.merges = prof_a.merges.saturating_add(b_merges.saturating_add(1));
    let changed = traits::merge(prof_a, b_traits, b_times, max);
    g.mark_profile(a);
    changed
}

/// Records that the event carried identifier `i`.
///
/// `last_seen` only matters to limits with a time window: for such types every newer sighting
/// is persisted; for the others the first one of each UTC day, sparing the store an identifier
/// upsert per event while keeping the stored `last_seen` within a day of the truth — so that a
/// window the rules add later counts an identifier by when it was really last seen, not by its
/// first sighting.
fn touch(g: &mut IdentityGraph, i: IdentIx, at: Timestamp) {
    const DAY: i64 = 86_400;
    let at = super::graph::to_micros(at);
    let windowed = g.types[g.idents[i as usize].ty as usize].window.is_some();
    let e = &mut g.idents[i as usize];
    let mut changed = false;
    if at > e.last_seen {
        let new_day = at.as_second().div_euclid(DAY) != e.last_seen.as_second().div_euclid(DAY);
        e.last_seen = at;
        changed = windowed || new_day;
    }
    if at < e.first_seen {
        e.first_seen = at;
        changed = true;
    }
    if changed {
        g.mark_ident(i);
    }
}

fn fresh_segment_id(g: &IdentityGraph) -> Arc<str> {
    loop {
        let id = new_segment_id();
        if !g.segment_id_taken(&id) {
            return Arc::from(id);
        }
    }
}
