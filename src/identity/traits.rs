//! Profile traits: the newest write wins per trait, `null` removes, and on a merge the newest
//! value of each trait wins. "Newest" is the identify's `timestamp` (removals count as writes);
//! of two writes with the same timestamp the later one to arrive wins. An identify that arrives
//! late with an older timestamp (a mobile SDK's queue flushed after a newer one) changes no
//! trait a newer write set — on one profile as across a merge, so that where an identify landed
//! does not decide the value.

use foldhash::HashMap;

use serde_json::{Map, Value};

use super::graph::{Profile, TraitTime};

/// Applies an identify call's traits at time `at` (its timestamp and write order), each unless
/// a newer write set (or removed) it; a profile holding `max` traits takes no new one (its own still change). Returns whether
/// the trait values changed (setting a trait to its current value changes only its time), and
/// how many new traits found no room.
pub(super) fn apply_identify(
    profile: &mut Profile,
    traits: &Map<String, Value>,
    at: TraitTime,
    max: usize,
) -> (bool, usize) {
    let mut changed = false;
    let mut no_room = 0;
    for (name, value) in traits {
        if profile
            .trait_times
            .get(name)
            .is_some_and(|&newer| at < newer)
        {
            continue;
        }
        if !value.is_null() && profile.traits.len() >= max && !profile.traits.contains_key(name) {
            no_room += 1;
            continue;
        }
        if value.is_null() {
            changed |= profile.traits.shift_remove(name).is_some();
        } else if profile.traits.get(name) != Some(value) {
            profile.traits.insert(name.clone(), value.clone());
            changed = true;
        }
        match profile.trait_times.get_mut(name) {
            Some(t) => *t = at,
            None => {
                profile.trait_times.insert(name.clone(), at);
            }
        }
    }
    forget_old_removals(profile, max);
    (changed, no_room)
}

/// Keeps the times of at most `max` traits the profile does not hold — removals, remembered
/// so that an older write arriving later does not set the trait again — forgetting the oldest
/// beyond (by time, then name: the same on every replica). Removals of ever new names (set
/// then removed, or removed without ever being set) would otherwise grow a profile without
/// bound, each one rewritten with it at every change. A forgotten removal's trait can be set
/// again by a write older than it that arrives later.
fn forget_old_removals(profile: &mut Profile, max: usize) {
    if profile.trait_times.len() <= max {
        return;
    }
    let mut removals: Vec<(TraitTime, &String)> = profile
        .trait_times
        .iter()
        .filter(|(name, _)| !profile.traits.contains_key(*name))
        .map(|(name, &at)| (at, name))
        .collect();
    if removals.len() <= max {
        return;
    }
    removals.sort_unstable();
    let forgotten: Vec<String> = removals[..removals.len() - max]
        .iter()
        .map(|(_, name)| (*name).clone())
        .collect();
    for name in forgotten {
        profile.trait_times.remove(&name);
    }
}

/// Folds a merged-away profile's traits into the survivor: per trait, the side that set (or
/// removed) it more recently wins — by timestamp, then by write order, as on one profile. A
/// trait without a recorded time counts as older than any recorded one (on a tie of two such,
/// the survivor keeps its own). No value is dropped, whatever `max` (a merge may take the
/// survivor past it: the README's choice); of the removals, at most `max` are kept
/// ([`forget_old_removals`]). Returns whether the values changed.
pub(super) fn merge(
    into: &mut Profile,
    from_traits: Map<String, Value>,
    mut from_times: HashMap<String, TraitTime>,
    max: usize,
) -> bool {
    let mut changed = false;
    for (name, value) in from_traits {
        let at = from_times.remove(&name).unwrap_or(TraitTime::MIN);
        if newer_than_survivor(into, &name, at) {
            if into.traits.get(&name) != Some(&value) {
                into.traits.insert(name.clone(), value);
                changed = true;
            }
            into.trait_times.insert(name, at);
        }
    }
    // What is left are removals (tombstones) on the merged-away side.
    for (name, at) in from_times {
        if newer_than_survivor(into, &name, at) {
            changed |= into.traits.shift_remove(&name).is_some();
            into.trait_times.insert(name, at);
        }
    }
    forget_old_removals(into, max);
    changed
}

fn newer_than_survivor(into: &Profile, name: &str, at: TraitTime) -> bool {
    match into.trait_times.get(name) {
        Some(&mine) => at > mine,
        None => !into.traits.contains_key(name) || at > TraitTime::MIN,
    }
}
