//! Property tests over random event streams drawn from small identifier pools, so lookups
//! collide, profiles merge and limits bite.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Map, json};

use super::*;

/// One generated message.
#[derive(Clone, Debug)]
struct Msg {
    kind: u8,
    user: Option<u8>,
    anon: Option<u8>,
    email: Option<u8>,
    phone: Option<u8>,
    previous: u8,
    traits: Vec<(u8, Option<u8>)>,
    /// Seconds after the previous message (received time).
    gap: u32,
    /// Seconds the client's timestamp lags the receive time (out-of-order events).
    lag: u32,
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        0u8..5,
        prop::option::of(0u8..5),
        prop::option::of(0u8..7),
        prop::option::of(0u8..4),
        prop::option::of(0u8..3),
        0u8..8,
        prop::collection::vec((0u8..4, prop::option::of(0u8..3)), 0..3),
        0u32..(20 * 86_400),
        prop_oneof![Just(0u32), 0u32..(40 * 86_400)],
    )
        .prop_map(
            |(kind, user, anon, email, phone, previous, traits, gap, lag)| Msg {
                kind,
                user,
                anon,
                email,
                phone,
                previous,
                traits,
                gap,
                lag,
            },
        )
}

/// `u4` and `a6` are blocked by the default rules ("null", "0").
fn user_value(n: u8) -> String {
    if n == 4 {
        "null".into()
    } else {
        format!("u{n}")
    }
}

fn anon_value(n: u8) -> String {
    if n == 6 { "0".into() } else { format!("a{n}") }
}

fn to_event(m: &Msg, received: Timestamp) -> Event {
    let kinds = ["identify", "track", "page", "alias", "group"];
    let kind = kinds[usize::from(m.kind) % kinds.len()];
    let mut v = json!({"type": kind, "event": "Clicked", "groupId": "g1"});
    let user = m.user.map(user_value);
    let anon = m.anon.map(anon_value);
    match (&user, &anon) {
        (None, None) => v["anonymousId"] = json!(anon_value(0)),
        _ => {
            if let Some(u) = &user {
                v["userId"] = json!(u);
            }
            if let Some(a) = &anon {
                v["anonymousId"] = json!(a);
            }
        }
    }
    if kind == "alias" {
        if user.is_none() {
            v["userId"] = json!(user_value(0));
        }
        let prev = m.previous;
        v["previousId"] = json!(if prev < 4 {
            user_value(prev)
        } else {
            anon_value(prev - 4)
        });
    }
    let mut traits: Map<String, Value> = m
        .traits
        .iter()
        .map(|(k, val)| (format!("t{k}"), val.map_or(Value::Null, |x| json!(x))))
        .collect();
    if let Some(e) = m.email {
        traits.insert("email".into(), json!(format!("e{e}@x")));
    }
    if kind == "identify" {
        v["traits"] = Value::Object(traits);
    } else {
        v["context"] = json!({"traits": traits});
    }
    if let Some(p) = m.phone {
        v["context"]["externalIds"] = json!([
            {"id": format!("p{p}"), "type": "phone", "collection": "users", "encoding": "none"}
        ]);
    }
    let ts = received
        .checked_sub(jiff::SignedDuration::from_secs(i64::from(m.lag)))
        .expect("in range");
    v["timestamp"] = json!(ts.to_string());
    Event::from_json(&v, None, &ParseOptions::new(received, "src")).expect("generated event")
}

fn events(msgs: &[Msg]) -> Vec<Event> {
    let mut t = at("2024-01-01T00:00:00Z");
    msgs.iter()
        .map(|m| {
            t = t
                .checked_add(jiff::SignedDuration::from_secs(i64::from(m.gap)))
                .expect("in range");
            to_event(m, t)
        })
        .collect()
}

/// Tight rules so windows, caps and limits all come into play.
fn tight_rules() -> Rules {
    Rules::from_yaml(
        "limits: {email: {max: 2, window: 30d}, anonymous_id: {max: 3}}\n\
         caps: {max_merges_per_profile: 3, max_identifiers_per_profile: 6}",
    )
    .expect("rules")
}

/// Structural invariants of the graph after any event.
fn check_invariants(g: &IdentityGraph, check_limits: bool) -> Result<(), TestCaseError> {
    let mut owners = vec![0usize; g.idents.len()];
    for (p, prof) in g.profiles.iter().enumerate() {
        let canonical = prof.canonical as usize;
        prop_assert_eq!(
            g.profiles[canonical].canonical as usize,
            canonical,
            "canonical pointers are fully resolved"
        );
        if canonical != p {
            prop_assert!(prof.identifiers.is_empty() && prof.members.is_empty());
            continue;
        }
        for &i in &prof.identifiers {
            owners[i as usize] += 1;
            prop_assert_eq!(g.owner(i) as usize, p);
        }
        prop_assert!(prof.merges <= g.rules.max_merges_per_profile);
        prop_assert!(prof.identifiers.len() <= g.rules.max_identifiers_per_profile as usize);
        if check_limits {
            let mut per_type: HashMap<u32, u32> = HashMap::new();
            for &i in &prof.identifiers {
                *per_type.entry(g.idents[i as usize].ty).or_default() += 1;
            }
            for (ty, n) in per_type {
                let info = &g.types[ty as usize];
                if info.window.is_none() {
                    prop_assert!(n <= info.max, "{} has {} > {}", info.name, n, info.max);
                }
            }
        }
    }
    prop_assert!(
        owners.iter().all(|&n| n == 1),
        "each identifier has one owner"
    );
    for e in &g.idents {
        let c = g
            .lookup(&Identifier::new(&*g.types[e.ty as usize].name, &*e.value))
            .expect("identifier resolves");
        prop_assert_eq!(g.canonical(c), Some(c));
    }
    Ok(())
}

/// A resolution with generated ids replaced through `names` (ids of the other graph → ids of
/// this one, learnt from creation rows) and row ids blanked.
fn normalized(
    r: &Resolution,
    names: &mut HashMap<String, String>,
    reference: &Resolution,
) -> Resolution {
    if r.created {
        names.insert(r.segment_id.clone(), reference.segment_id.clone());
    }
    let name = |s: &String| names.get(s).cloned().unwrap_or_else(|| s.clone());
    Resolution {
        segment_id: name(&r.segment_id),
        created: r.created,
        merged: r.merged.iter().map(name).collect(),
        id_graph_updates: r
            .id_graph_updates
            .iter()
            .map(|u| row(&name(&u.segment_id), &name(&u.canonical_segment_id)))
            .collect(),
        external_id_mapping_updates: r
            .external_id_mapping_updates
            .iter()
            .map(|m| ExternalIdMappingUpdate {
                id: String::new(),
                segment_id: name(&m.segment_id),
                ..m.clone()
            })
            .collect(),
        profile_traits_updates: r
            .profile_traits_updates
            .iter()
            .map(|t| ProfileTraitsUpdate {
                segment_id: name(&t.segment_id),
                traits: t.traits.clone(),
            })
            .collect(),
        dropped: r.dropped.clone(),
        traits_dropped: r.traits_dropped,
    }
}

fn blank_row_ids(r: &Resolution) -> Resolution {
    let mut r = r.clone();
    for m in &mut r.external_id_mapping_updates {
        m.id.clear();
    }
    r
}

fn run_stream(
    rules: Rules,
    msgs: &[Msg],
    split: usize,
    check_limits: bool,
) -> Result<(), TestCaseError> {
    let evs = events(msgs);
    let split = split % (evs.len() + 1);
    let mut g = IdentityGraph::new(rules.clone());
    let mut results = Vec::new();
    let mut latest: HashMap<String, String> = HashMap::new();
    let (mut saved_profiles, mut saved_idents) = (Vec::new(), Vec::new());
    for (n, e) in evs.iter().enumerate() {
        let r = g.resolve(e);
        let delta = g.take_dirty();
        match &r {
            Ok(res) => {
                for u in &res.id_graph_updates {
                    latest.insert(u.segment_id.clone(), u.canonical_segment_id.clone());
                }
                prop_assert!(latest.contains_key(&res.segment_id));
            }
            Err(_) => prop_assert!(delta.is_empty(), "a failed event changes nothing"),
        }
        if n < split {
            saved_profiles.extend(delta.profiles);
            saved_idents.extend(delta.identifiers);
        }
        check_invariants(&g, check_limits)?;
        results.push(r);
    }

    // The latest row of every profile ends at a profile that was never merged away.
    for (s, c) in &latest {
        prop_assert_eq!(latest.get(c), Some(c), "{} → {} is not final", s, c);
        prop_assert_eq!(g.canonical(s), Some(c.as_str()));
    }
    prop_assert_eq!(
        latest.iter().filter(|(s, c)| s == c).count(),
        g.profile_count()
    );

    // Restoring from the persisted deltas and continuing gives the same resolutions.
    let mut h = IdentityGraph::new(rules);
    h.restore(saved_profiles, saved_idents);
    prop_assert!(h.take_dirty().is_empty());
    let mut names = HashMap::new();
    for (e, expected) in evs.iter().zip(&results).skip(split) {
        let got = h.resolve(e);
        match (got, expected) {
            (Ok(got), Ok(expected)) => {
                prop_assert_eq!(
                    normalized(&got, &mut names, expected),
                    blank_row_ids(expected)
                );
            }
            (got, expected) => prop_assert_eq!(got.err(), expected.clone().err()),
        }
        check_invariants(&h, check_limits)?;
    }
    prop_assert_eq!(h.profile_count(), g.profile_count());
    Ok(())
}

/// Everything a graph holds, by name: each profile's fields, canonical profile, members and
/// identifiers; each identifier's fields; the live count and the next creation rank.
fn snapshot(g: &IdentityGraph) -> String {
    let name = |p: u32| g.profiles[p as usize].segment_id.to_string();
    let ident = |i: u32| {
        let e = &g.idents[i as usize];
        format!("{}:{}", g.types[e.ty as usize].name, e.value)
    };
    let mut profiles: Vec<String> = g
        .profiles
        .iter()
        .map(|p| {
            let mut members: Vec<String> = p.members.iter().map(|&m| name(m)).collect();
            members.sort();
            let mut ids: Vec<String> = p.identifiers.iter().map(|&i| ident(i)).collect();
            ids.sort();
            // Timestamps only: write orders are relative (a restored graph numbers its next
            // writes from the highest order it holds, one that kept running from its counter).
            let mut times: Vec<String> = p
                .trait_times
                .iter()
                .map(|(k, t)| format!("{k}@{}", t.at))
                .collect();
            times.sort();
            format!(
                "{} -> {} rank {} merges {} traits {} times {times:?} members {members:?} ids {ids:?}",
                p.segment_id,
                name(p.canonical),
                p.created_rank,
                p.merges,
                serde_json::Value::Object(p.traits.clone()),
            )
        })
        .collect();
    profiles.sort();
    let mut idents: Vec<String> = (0..g.idents.len())
        .map(|i| {
            let e = &g.idents[i];
            format!(
                "{} of {} seen {}..{}",
                ident(i as u32),
                name(e.profile),
                e.first_seen,
                e.last_seen
            )
        })
        .collect();
    idents.sort();
    format!(
        "{}\n{}\nlive {} next rank {}",
        profiles.join("\n"),
        idents.join("\n"),
        g.profile_count(),
        g.next_rank
    )
}

/// Another writer's view: a graph restored from the state persisted up to `split` follows the
/// rest by applying what each later batch of `batch` events persisted — each row once, in its
/// latest state, in no particular order, as a store returns the rows changed since a `seq` —
/// and ends as a graph restored from the whole state.
fn follow_stream(
    rules: Rules,
    msgs: &[Msg],
    split: usize,
    batch: usize,
) -> Result<(), TestCaseError> {
    let evs = events(msgs);
    let split = split % (evs.len() + 1);
    let mut g = IdentityGraph::new(rules.clone());
    let (mut all_profiles, mut all_idents) = (Vec::new(), Vec::new());
    let mut follower = IdentityGraph::new(rules.clone());
    let (mut profiles, mut idents) = (HashMap::new(), HashMap::new());
    for (n, e) in evs.iter().enumerate() {
        let _ = g.resolve(e);
        let delta = g.take_dirty();
        all_profiles.extend(delta.profiles.clone());
        all_idents.extend(delta.identifiers.clone());
        for p in delta.profiles {
            profiles.insert(p.segment_id.clone(), p);
        }
        for i in delta.identifiers {
            idents.insert((i.id_type.clone(), i.value.clone()), i);
        }
        if n + 1 == split {
            follower.restore(
                std::mem::take(&mut profiles).into_values().collect(),
                std::mem::take(&mut idents).into_values().collect(),
            );
        } else if n + 1 > split && ((n + 1 - split).is_multiple_of(batch) || n + 1 == evs.len()) {
            prop_assert!(follower.apply(
                std::mem::take(&mut profiles).into_values().collect(),
                std::mem::take(&mut idents).into_values().collect(),
            ));
            prop_assert!(follower.take_dirty().is_empty());
            check_invariants(&follower, false)?;
        }
    }
    if split == 0 {
        // Nothing restored: the follower applied every batch to an empty graph.
        prop_assert!(evs.is_empty() || follower.profile_count() == g.profile_count());
    }
    let mut whole = IdentityGraph::new(rules);
    whole.restore(all_profiles, all_idents);
    prop_assert_eq!(snapshot(&follower), snapshot(&whole));
    Ok(())
}

/// Two writers (engine replicas) take turns on one simulated store: before its turn, a writer
/// whose graph is behind applies the rows the other stamped since its own last write (or
/// restores everything on its first turn, or when they cannot be applied). Every event must
/// resolve exactly as one writer that saw the whole stream resolves it.
fn two_writers(rules: Rules, msgs: &[Msg], turns: &[bool]) -> Result<(), TestCaseError> {
    let evs = events(msgs);
    let mut reference = IdentityGraph::new(rules.clone());
    let mut writers = [
        IdentityGraph::new(rules.clone()),
        IdentityGraph::new(rules.clone()),
    ];
    let mut known: [Option<i64>; 2] = [None, None];
    let mut head = 0_i64;
    // The store: each row's latest state and the head of the write that stored it.
    let mut profiles: HashMap<String, (ProfileState, i64)> = HashMap::new();
    let mut idents: HashMap<(String, String), (IdentifierState, i64)> = HashMap::new();
    let mut names = HashMap::new();
    for (n, e) in evs.iter().enumerate() {
        let k = usize::from(turns.get(n).copied().unwrap_or(false));
        if known[k] != Some(head) {
            let caught_up = match known[k] {
                Some(since) => writers[k].apply(
                    profiles
                        .values()
                        .filter(|(_, s)| *s > since)
                        .map(|(p, _)| p.clone())
                        .collect(),
                    idents
                        .values()
                        .filter(|(_, s)| *s > since)
                        .map(|(i, _)| i.clone())
                        .collect(),
                ),
                None => false,
            };
            if !caught_up {
                writers[k] = IdentityGraph::new(rules.clone());
                writers[k].restore(
                    profiles.values().map(|(p, _)| p.clone()).collect(),
                    idents.values().map(|(i, _)| i.clone()).collect(),
                );
            }
        }
        let expected = reference.resolve(e);
        reference.take_dirty();
        let got = writers[k].resolve(e);
        let delta = writers[k].take_dirty();
        match (&got, &expected) {
            (Ok(got), Ok(expected)) => {
                prop_assert_eq!(
                    normalized(got, &mut names, expected),
                    blank_row_ids(expected)
                );
                head += 1;
            }
            (got, expected) => prop_assert_eq!(got.clone().err(), expected.clone().err()),
        }
        // The rows flagged new are exactly those the store lacks (a new one there would fail
        // PostgreSQL's COPY; a known one absent would only cost an upsert).
        for (n, p) in delta.profiles.iter().enumerate() {
            prop_assert_eq!(
                n < delta.new_profiles,
                !profiles.contains_key(&p.segment_id),
                "profile {} flagged wrongly",
                p.segment_id
            );
        }
        for (n, i) in delta.identifiers.iter().enumerate() {
            prop_assert_eq!(
                n < delta.new_identifiers,
                !idents.contains_key(&(i.id_type.clone(), i.value.clone())),
                "identifier {}:{} flagged wrongly",
                i.id_type,
                i.value
            );
        }
        for p in delta.profiles {
            profiles.insert(p.segment_id.clone(), (p, head));
        }
        for i in delta.identifiers {
            idents.insert((i.id_type.clone(), i.value.clone()), (i, head));
        }
        known[k] = Some(head);
        check_invariants(&writers[k], false)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_keep_the_graph_consistent_default_rules(
        msgs in prop::collection::vec(msg(), 1..40),
        split in any::<usize>(),
    ) {
        run_stream(Rules::default(), &msgs, split, true)?;
    }

    #[test]
    fn a_follower_applying_another_writer_s_changes_ends_as_a_restore(
        msgs in prop::collection::vec(msg(), 1..40),
        split in any::<usize>(),
        batch in 1usize..6,
        tight in any::<bool>(),
    ) {
        let rules = if tight { tight_rules() } else { Rules::default() };
        follow_stream(rules, &msgs, split, batch)?;
    }

    #[test]
    fn two_writers_taking_turns_resolve_as_one(
        msgs in prop::collection::vec(msg(), 1..40),
        turns in prop::collection::vec(any::<bool>(), 40),
        tight in any::<bool>(),
    ) {
        let rules = if tight { tight_rules() } else { Rules::default() };
        two_writers(rules, &msgs, &turns)?;
    }

    #[test]
    fn random_streams_keep_the_graph_consistent_tight_rules(
        msgs in prop::collection::vec(msg(), 1..40),
        split in any::<usize>(),
    ) {
        run_stream(tight_rules(), &msgs, split, true)?;
    }
}

/// An oracle for traits: a live profile's traits are, per trait, the newest write (by the
/// identify's timestamp; of equal timestamps the later arrival) among every identify resolved
/// to it or to a profile merged into it, `null` removing the trait; and its latest
/// `profile_traits_updates` row is that snapshot (review).
fn traits_follow_the_newest_write(rules: Rules, msgs: &[Msg]) -> Result<(), TestCaseError> {
    let evs = events(msgs);
    let mut g = IdentityGraph::new(rules);
    // (segment_id resolved to, timestamp, arrival, traits)
    let mut writes: Vec<(String, Timestamp, usize, Map<String, Value>)> = Vec::new();
    let mut latest_row: HashMap<String, Map<String, Value>> = HashMap::new();
    for (n, e) in evs.iter().enumerate() {
        let Ok(r) = g.resolve(e) else { continue };
        g.take_dirty();
        if e.event_type == crate::event::EventType::Identify {
            writes.push((r.segment_id.clone(), e.timestamp, n, e.traits.clone()));
        }
        for row in &r.profile_traits_updates {
            latest_row.insert(row.segment_id.clone(), row.traits.clone());
        }
    }
    let mut expected: HashMap<String, HashMap<String, (Timestamp, usize, Value)>> = HashMap::new();
    for (segment_id, ts, n, traits) in &writes {
        let live = g.canonical(segment_id).expect("known profile").to_string();
        let per = expected.entry(live).or_default();
        for (k, v) in traits {
            match per.get(k) {
                Some((t, m, _)) if (t, m) > (ts, n) => {}
                _ => {
                    per.insert(k.clone(), (*ts, *n, v.clone()));
                }
            }
        }
    }
    for (live, per) in expected {
        let mut want: Map<String, Value> = per
            .into_iter()
            .filter(|(_, (_, _, v))| !v.is_null())
            .map(|(k, (_, _, v))| (k, v))
            .collect();
        want.sort_keys();
        let mut got = g.traits(&live).expect("live profile").clone();
        got.sort_keys();
        prop_assert_eq!(&got, &want, "traits of {}", live);
        let mut row = latest_row.get(&live).cloned().unwrap_or_default();
        row.sort_keys();
        prop_assert_eq!(&row, &want, "latest profile_traits_updates row of {}", live);
    }
    Ok(())
}

/// `msgs` with timestamps `spread` apart at most, so that writes tie.
fn close(msgs: &[Msg], spread: u32) -> Vec<Msg> {
    msgs.iter()
        .map(|m| Msg {
            gap: m.gap % spread,
            lag: m.lag % spread,
            ..m.clone()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn traits_are_the_newest_write_of_every_identify_resolved_to_the_profile(
        msgs in prop::collection::vec(msg(), 1..40),
        tight in any::<bool>(),
    ) {
        let rules = if tight { tight_rules() } else { Rules::default() };
        traits_follow_the_newest_write(rules.clone(), &msgs)?;
        traits_follow_the_newest_write(rules, &close(&msgs, 2))?;
    }
}

/// Every identifier an event used (not dropped) belongs to the profile it resolved to, right
/// after it; every identifier of the graph has exactly one
/// `external_id_mapping_updates` row, whose profile resolves (by the latest `id_graph_updates`
/// row) to the identifier's owner.
fn used_identifiers_and_mappings(rules: Rules, msgs: &[Msg]) -> Result<(), TestCaseError> {
    let evs = events(msgs);
    let mut g = IdentityGraph::new(rules);
    let mut latest: HashMap<String, String> = HashMap::new();
    let mut mappings: HashMap<(String, String), Vec<String>> = HashMap::new();
    for e in &evs {
        let Ok(r) = g.resolve(e) else { continue };
        g.take_dirty();
        for u in &r.id_graph_updates {
            latest.insert(u.segment_id.clone(), u.canonical_segment_id.clone());
        }
        for m in &r.external_id_mapping_updates {
            mappings
                .entry((m.external_id_type.clone(), m.external_id_value.clone()))
                .or_default()
                .push(m.segment_id.clone());
        }
        for i in extract_all(e) {
            let retyped = Identifier::new("user_id", i.value.clone());
            if r.dropped.iter().any(|(d, _)| *d == i)
                || (e.event_type == crate::event::EventType::Alias
                    && r.dropped.iter().any(|(d, _)| *d == retyped))
            {
                continue;
            }
            let owner = g.lookup(&i).map(str::to_string);
            let owner = match (owner, e.event_type) {
                (None, crate::event::EventType::Alias) => g
                    .lookup(&Identifier::new("user_id", i.value.clone()))
                    .map(str::to_string),
                (o, _) => o,
            };
            prop_assert_eq!(
                owner.as_deref(),
                Some(r.segment_id.as_str()),
                "{} of {:?}",
                i,
                e
            );
        }
    }
    for e in &g.idents {
        let key = (g.types[e.ty as usize].name.to_string(), e.value.to_string());
        let rows = mappings.remove(&key).unwrap_or_default();
        prop_assert_eq!(rows.len(), 1, "mapping rows of {:?}", key);
        let owner = g
            .lookup(&Identifier::new(key.0.clone(), key.1.clone()))
            .unwrap();
        prop_assert_eq!(latest.get(&rows[0]).map(String::as_str), Some(owner));
    }
    prop_assert!(
        mappings.is_empty(),
        "rows of identifiers the graph lacks: {:?}",
        mappings
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn every_used_identifier_is_its_profile_s_and_mapped_once(
        msgs in prop::collection::vec(msg(), 1..40),
        tight in any::<bool>(),
    ) {
        let rules = if tight { tight_rules() } else { Rules::default() };
        used_identifiers_and_mappings(rules, &msgs)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// The restore and two-writer properties with close timestamps (ties) and caps.
    #[test]
    fn restore_and_two_writers_hold_with_close_timestamps(
        msgs in prop::collection::vec(msg(), 1..40),
        split in any::<usize>(),
        turns in prop::collection::vec(any::<bool>(), 40),
        tight in any::<bool>(),
    ) {
        let rules = if tight { tight_rules() } else { Rules::default() };
        let close = close(&msgs, 3);
        run_stream(rules.clone(), &close, split, true)?;
        two_writers(rules.clone(), &close, &turns)?;
        follow_stream(rules, &close, split, 1 + split % 4)?;
    }
}
