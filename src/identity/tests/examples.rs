//! Segment's worked examples, merge chains, alias and traits.

use serde_json::json;

use super::*;

/// Segment's Profiles Sync example: two anonymous visitors identify with the same email, so
/// profile_2 is merged into the older profile_1.
#[test]
fn segment_example_two_anonymous_profiles_merge_by_email() {
    let mut g = IdentityGraph::new(Rules::default());
    let mut graph_rows = Vec::new();
    let mut mapping_rows = Vec::new();
    let mut run = |g: &mut IdentityGraph, v| {
        let r = resolve(g, v);
        graph_rows.extend(r.id_graph_updates.clone());
        mapping_rows.extend(r.external_id_mapping_updates.clone());
        r
    };

    let r1 = run(&mut g, json!({"type": "page", "anonymousId": "a1"}));
    assert!(r1.created);
    let p1 = r1.segment_id.clone();
    let r2 = run(
        &mut g,
        json!({"type": "identify", "anonymousId": "a1", "traits": {"email": "jane@example.com"}}),
    );
    assert_eq!(r2.segment_id, p1);
    assert!(!r2.created);

    let r3 = run(&mut g, json!({"type": "page", "anonymousId": "a2"}));
    assert!(r3.created);
    let p2 = r3.segment_id.clone();
    assert_ne!(p1, p2);
    let r4 = run(
        &mut g,
        json!({"type": "identify", "anonymousId": "a2", "traits": {"email": "jane@example.com"}}),
    );
    assert_eq!(r4.segment_id, p1, "merged into the oldest profile");
    assert_eq!(r4.merged, vec![p2.clone()]);

    assert_eq!(
        graph_rows,
        vec![row(&p1, &p1), row(&p2, &p2), row(&p2, &p1)]
    );
    let mapping: Vec<_> = mapping_rows
        .iter()
        .map(|m| {
            (
                m.external_id_type.as_str(),
                m.external_id_value.as_str(),
                m.segment_id.as_str(),
                m.external_id_hash.as_str(),
            )
        })
        .collect();
    let hash_a1 = external_id_hash("anonymous_id", "a1");
    let hash_email = external_id_hash("email", "jane@example.com");
    let hash_a2 = external_id_hash("anonymous_id", "a2");
    assert_eq!(
        mapping,
        vec![
            ("anonymous_id", "a1", p1.as_str(), hash_a1.as_str()),
            (
                "email",
                "jane@example.com",
                p1.as_str(),
                hash_email.as_str()
            ),
            ("anonymous_id", "a2", p2.as_str(), hash_a2.as_str()),
        ]
    );
    assert_eq!(hash_a1.len(), 40);
    let row_ids: std::collections::HashSet<_> = mapping_rows.iter().map(|m| &m.id).collect();
    assert_eq!(row_ids.len(), 3, "row ids are unique");

    assert_eq!(g.profile_count(), 1);
    assert_eq!(g.canonical(&p2), Some(p1.as_str()));
    assert_eq!(g.lookup(&id("anonymous_id", "a2")), Some(p1.as_str()));
}

/// Segment's limit example: user_id is limited to 1, so an event with a second user_id and the
/// profile's email drops the email (lower priority) and creates a new profile.
#[test]
fn segment_example_user_id_limit_creates_a_new_profile() {
    let mut g = IdentityGraph::new(Rules::default());
    let r1 = resolve(
        &mut g,
        json!({"type": "identify", "userId": "abc123", "traits": {"email": "jane@example.com"}}),
    );
    let r2 = resolve(
        &mut g,
        json!({"type": "identify", "userId": "abc456", "traits": {"email": "jane@example.com"}}),
    );
    assert!(r2.created);
    assert_ne!(r2.segment_id, r1.segment_id);
    assert!(r2.merged.is_empty());
    assert_eq!(
        r2.dropped,
        vec![(id("email", "jane@example.com"), DropReason::Limit)]
    );
    let user_ids: Vec<_> = r2
        .external_id_mapping_updates
        .iter()
        .map(|m| (m.external_id_type.as_str(), m.external_id_value.as_str()))
        .collect();
    assert_eq!(user_ids, [("user_id", "abc456")]);
    assert_eq!(
        g.lookup(&id("email", "jane@example.com")),
        Some(r1.segment_id.as_str())
    );
    assert_eq!(
        g.lookup(&id("user_id", "abc456")),
        Some(r2.segment_id.as_str())
    );
    assert_eq!(g.profile_count(), 2);
}

/// C is merged into B, then B into A: the second merge writes rows for B and for C, so the
/// latest row of every profile points at A.
#[test]
fn recursive_merge_rows_cover_every_generation() {
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, json!({"type": "page", "anonymousId": "a"})).segment_id;
    let b = resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "b", "traits": {"email": "b@x"}}),
    )
    .segment_id;
    let c = resolve(&mut g, json!({"type": "page", "anonymousId": "c"})).segment_id;

    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "anonymousId": "c", "context": {"traits": {"email": "b@x"}}}),
    );
    assert_eq!(r.segment_id, b);
    assert_eq!(r.id_graph_updates, vec![row(&c, &b)]);

    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "anonymousId": "a", "context": {"traits": {"email": "b@x"}}}),
    );
    assert_eq!(r.segment_id, a);
    assert_eq!(r.merged, vec![b.clone()]);
    assert_eq!(r.id_graph_updates, vec![row(&b, &a), row(&c, &a)]);
    assert_eq!(g.canonical(&c), Some(a.as_str()));
    assert_eq!(g.canonical(&b), Some(a.as_str()));
    assert_eq!(g.lookup(&id("anonymous_id", "c")), Some(a.as_str()));
    assert_eq!(g.profile_count(), 1);

    let delta = g.take_dirty();
    let state = |s: &str| {
        delta
            .profiles
            .iter()
            .find(|p| p.segment_id == s)
            .expect("profile persisted")
            .clone()
    };
    assert_eq!(state(&a).merges, 2);
    assert_eq!(state(&c).canonical_segment_id, a);
}

#[test]
fn alias_merges_the_anonymous_profile_and_the_user_profile() {
    let mut g = IdentityGraph::new(Rules::default());
    let anon = resolve(&mut g, json!({"type": "page", "anonymousId": "a1"})).segment_id;
    let user = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "anonymousId": "a2"}),
    )
    .segment_id;
    let r = resolve(
        &mut g,
        json!({"type": "alias", "userId": "u1", "previousId": "a1"}),
    );
    assert_eq!(r.segment_id, anon, "the older profile survives");
    assert_eq!(r.merged, vec![user.clone()]);
    assert_eq!(r.id_graph_updates, vec![row(&user, &anon)]);
    assert_eq!(g.lookup(&id("user_id", "u1")), Some(anon.as_str()));
    assert_eq!(g.profile_count(), 1);
}

#[test]
fn alias_previous_id_is_looked_up_as_a_user_id_first() {
    // With the default user_id limit of 1 an alias can't put two user ids on one profile: the
    // later identifier (previousId, now a user_id) is dropped and `new` gets its own profile.
    let mut g = IdentityGraph::new(Rules::default());
    let old = resolve(&mut g, json!({"type": "identify", "userId": "old"})).segment_id;
    let r = resolve(
        &mut g,
        json!({"type": "alias", "userId": "new", "previousId": "old"}),
    );
    assert!(r.created);
    assert_ne!(r.segment_id, old);
    assert_eq!(r.dropped, vec![(id("user_id", "old"), DropReason::Limit)]);
    assert_eq!(g.lookup(&id("user_id", "old")), Some(old.as_str()));
    assert_eq!(g.lookup(&id("anonymous_id", "old")), None);

    // With room for two user ids the alias links them.
    let rules = Rules::from_yaml("limits: {user_id: {max: 2}}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let old = resolve(&mut g, json!({"type": "identify", "userId": "old"})).segment_id;
    let r = resolve(
        &mut g,
        json!({"type": "alias", "userId": "new", "previousId": "old"}),
    );
    assert_eq!(r.segment_id, old);
    assert!(r.dropped.is_empty());
    assert_eq!(g.lookup(&id("user_id", "new")), Some(old.as_str()));
    assert_eq!(
        g.lookup(&id("anonymous_id", "old")),
        None,
        "not recorded as anonymous"
    );
}

#[test]
fn alias_with_unknown_previous_id_records_it_as_anonymous_id() {
    let mut g = IdentityGraph::new(Rules::default());
    let r = resolve(
        &mut g,
        json!({"type": "alias", "userId": "u9", "previousId": "x9"}),
    );
    assert!(r.created);
    assert_eq!(
        g.lookup(&id("anonymous_id", "x9")),
        Some(r.segment_id.as_str())
    );
    assert_eq!(g.lookup(&id("user_id", "x9")), None);
}

#[test]
fn traits_last_write_wins_null_removes_empty_string_sets() {
    let mut g = IdentityGraph::new(Rules::default());
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"plan": "pro", "name": "Jane"}}),
    );
    let p = r.segment_id.clone();
    assert_eq!(
        r.profile_traits_updates,
        vec![ProfileTraitsUpdate {
            segment_id: p.clone(),
            traits: json!({"plan": "pro", "name": "Jane"})
                .as_object()
                .cloned()
                .expect("object"),
        }]
    );

    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"plan": null, "name": ""}}),
    );
    assert_eq!(r.profile_traits_updates.len(), 1);
    assert_eq!(
        Value::Object(r.profile_traits_updates[0].traits.clone()),
        json!({"name": ""})
    );

    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"name": "J2"}}),
    );
    assert_eq!(
        g.traits(&p).map(|t| Value::Object(t.clone())),
        Some(json!({"name": "J2"}))
    );
    assert_eq!(r.profile_traits_updates.len(), 1);

    // Same value again, or a non-identify call: no traits row.
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"name": "J2"}}),
    );
    assert!(r.profile_traits_updates.is_empty());
    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "userId": "u1", "context": {"traits": {"name": "ctx"}}}),
    );
    assert!(r.profile_traits_updates.is_empty());
    assert_eq!(g.traits(&p).map(|t| t["name"].clone()), Some(json!("J2")));
}

/// A trait set by an event dated in the future (a client's clock, or a server SDK passing a
/// time without `sentAt`) is ordered as of its arrival: a later identify still changes it. It
/// used to win every write until that date.
#[test]
fn a_trait_set_in_the_future_is_ordered_by_its_arrival() {
    let mut g = IdentityGraph::new(Rules::default());
    let future = ev(
        json!({"type": "identify", "userId": "u1", "timestamp": "2099-01-01T00:00:00Z", "traits": {"plan": "a", "seat": 1}}),
    );
    assert_eq!(
        future.timestamp,
        at("2099-01-01T00:00:00Z"),
        "the event keeps its time"
    );
    let p = g.resolve(&future).expect("resolves").segment_id;
    let later = ev_at(
        json!({"type": "identify", "userId": "u1", "traits": {"plan": "b", "seat": null}}),
        "2024-05-01T13:00:00Z",
    );
    let r = g.resolve(&later).expect("resolves");
    assert_eq!(
        r.profile_traits_updates.len(),
        1,
        "the write changed the profile"
    );
    let traits = g.traits(&p).expect("the profile");
    assert_eq!(traits.get("plan"), Some(&json!("b")));
    assert_eq!(traits.get("seat"), None, "removed");
    // An event that arrived earlier but happened before still loses to it.
    let past = ev(
        json!({"type": "identify", "userId": "u1", "timestamp": "2024-04-01T00:00:00Z", "traits": {"plan": "c"}}),
    );
    g.resolve(&past).expect("resolves");
    assert_eq!(g.traits(&p).unwrap().get("plan"), Some(&json!("b")));
}

/// A trait time an earlier release stored in the future (it ordered writes by the event's
/// timestamp as it was) reads as the time the graph was loaded, so that the writes after it
/// still change the trait; sightings in the future read as then too.
#[test]
fn a_trait_time_stored_in_the_future_reads_as_the_load_time() {
    let mut old = IdentityGraph::new(Rules::default());
    let future = ev_at(
        json!({"type": "identify", "userId": "u1", "traits": {"plan": "a"}}),
        "2099-01-01T00:00:00Z",
    );
    let p = old.resolve(&future).expect("resolves").segment_id;
    let delta = old.take_dirty();
    assert!(
        delta.profiles[0].trait_times["plan"]
            .as_str()
            .unwrap()
            .starts_with("2099"),
        "{:?}",
        delta.profiles[0].trait_times
    );
    let mut g = IdentityGraph::new(Rules::default());
    g.restore(delta.profiles, delta.identifiers);
    let later = (Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    let r = g
        .resolve(&ev_at(
            json!({"type": "identify", "userId": "u1", "traits": {"plan": "b"}}),
            &later,
        ))
        .expect("resolves");
    assert_eq!(r.segment_id, p);
    assert_eq!(g.traits(&p).unwrap().get("plan"), Some(&json!("b")));
    let seen = g.take_dirty().identifiers;
    assert!(seen.iter().all(|i| i.last_seen <= at(&later)), "{seen:?}");
}

#[test]
fn merge_keeps_the_newest_value_of_each_trait() {
    let mut g = IdentityGraph::new(Rules::default());
    let id_msg = |anon: &str, ts: &str, traits: Value| json!({"type": "identify", "anonymousId": anon, "timestamp": ts, "traits": traits});
    // A (older profile) sets plan and title early and color late; B sets plan and color in
    // between and removes title after A set it.
    let a = resolve(
        &mut g,
        id_msg(
            "a",
            "2024-01-01T00:00:00Z",
            json!({"plan": "free", "title": "CEO"}),
        ),
    )
    .segment_id;
    let b = resolve(
        &mut g,
        id_msg(
            "b",
            "2024-02-01T00:00:00Z",
            json!({"plan": "pro", "color": "blue", "title": null, "only_b": 1}),
        ),
    )
    .segment_id;
    resolve(
        &mut g,
        id_msg("a", "2024-03-01T00:00:00Z", json!({"color": "red"})),
    );

    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "anonymousId": "b",
               "context": {"externalIds": [{"id": "a", "type": "anonymous_id", "collection": "users", "encoding": "none"}]}}),
    );
    // The externalIds entry duplicates the anonymousId type; both anonymous ids fit the limit.
    assert_eq!(r.segment_id, a);
    assert_eq!(r.merged, vec![b]);
    assert_eq!(
        r.profile_traits_updates.len(),
        1,
        "only the survivor gets a row"
    );
    let snapshot = &r.profile_traits_updates[0];
    assert_eq!(snapshot.segment_id, a);
    assert_eq!(snapshot.traits["plan"], json!("pro"), "B's plan is newer");
    assert_eq!(snapshot.traits["color"], json!("red"), "A's color is newer");
    assert_eq!(snapshot.traits["only_b"], json!(1));
    assert!(
        !snapshot.traits.contains_key("title"),
        "B's removal is newer"
    );
}

#[test]
fn take_dirty_reports_each_change_once_and_restore_rebuilds() {
    let mut g = IdentityGraph::new(Rules::default());
    let p = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"k": "v"}}),
    )
    .segment_id;
    let delta = g.take_dirty();
    assert_eq!(delta.profiles.len(), 1);
    assert_eq!(delta.identifiers.len(), 2);
    assert_eq!(delta.profiles[0].traits["k"], json!("v"));
    assert!(delta.profiles[0].trait_times.contains_key("k"));
    assert!(g.take_dirty().is_empty());

    let mut h = IdentityGraph::new(Rules::default());
    h.restore(delta.profiles, delta.identifiers);
    assert!(h.take_dirty().is_empty());
    assert_eq!(h.profile_count(), 1);
    assert_eq!(h.lookup(&id("anonymous_id", "a1")), Some(p.as_str()));
    assert_eq!(h.traits(&p).map(|t| t["k"].clone()), Some(json!("v")));
    let r = resolve(&mut h, json!({"type": "page", "userId": "u1"}));
    assert_eq!(r.segment_id, p);
    assert!(!r.created);
}

/// A delta lists first what the store holds no row of (created since the graph was restored or
/// since its last delta), and counts them; a store inserts those without looking for a row.
#[test]
fn take_dirty_puts_first_the_rows_the_store_lacks() {
    let mut g = IdentityGraph::new(Rules::default());
    let p1 = resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "a1", "traits": {"k": "v"}}),
    )
    .segment_id;
    let first = g.take_dirty();
    assert_eq!((first.new_profiles, first.new_identifiers), (1, 1));
    // A day later: a1's profile changes (a trait, a new identifier); a2 makes a new profile.
    let later = "2024-05-02T12:00:00Z";
    g.resolve(&ev_at(
        json!({"type": "identify", "anonymousId": "a1", "userId": "u1", "traits": {"k": "w"}}),
        later,
    ))
    .unwrap();
    let p2 = g
        .resolve(&ev_at(json!({"type": "page", "anonymousId": "a2"}), later))
        .unwrap()
        .segment_id;
    let delta = g.take_dirty();
    let names = |d: &StateDelta| -> (Vec<String>, Vec<String>) {
        (
            d.profiles.iter().map(|p| p.segment_id.clone()).collect(),
            d.identifiers.iter().map(|i| i.value.clone()).collect(),
        )
    };
    let (profiles, identifiers) = names(&delta);
    assert_eq!(profiles, [p2.clone(), p1.clone()], "the new profile first");
    assert_eq!(delta.new_profiles, 1);
    assert_eq!(identifiers.len(), 3);
    assert_eq!(delta.new_identifiers, 2);
    let mut created = identifiers[..2].to_vec();
    created.sort();
    assert_eq!(created, ["a2", "u1"]);
    assert_eq!(
        identifiers[2], "a1",
        "a1's row is there: its last sighting changes"
    );

    // Restored from those rows, nothing is new; what is created after is.
    let mut h = IdentityGraph::new(Rules::default());
    let mut profiles = first.profiles;
    profiles.extend(delta.profiles);
    let mut identifiers = first.identifiers;
    identifiers.extend(delta.identifiers);
    h.restore(profiles, identifiers);
    h.resolve(&ev_at(
        json!({"type": "identify", "anonymousId": "a2", "traits": {"k": "x"}}),
        "2024-05-03T12:00:00Z",
    ))
    .unwrap();
    h.resolve(&ev_at(json!({"type": "page", "anonymousId": "a3"}), NOW))
        .unwrap();
    let d = h.take_dirty();
    assert_eq!((d.new_profiles, d.new_identifiers), (1, 1));
    assert_eq!(d.profiles.len(), 2);
    assert_eq!(d.identifiers[0].value, "a3");
    assert_eq!(d.profiles[1].segment_id, p2);

    // Rows another writer stored (`apply`) are not new either.
    let mut k = IdentityGraph::new(Rules::default());
    assert!(k.apply(d.profiles, d.identifiers));
    k.resolve(&ev_at(
        json!({"type": "identify", "anonymousId": "a3", "traits": {"k": "y"}}),
        "2024-05-04T12:00:00Z",
    ))
    .unwrap();
    let d = k.take_dirty();
    assert_eq!((d.new_profiles, d.new_identifiers), (0, 0));
    assert_eq!(d.profiles.len(), 1);
}

#[test]
fn restore_repairs_inconsistent_state() {
    let mut g = IdentityGraph::new(Rules::default());
    let profile = |s: &str, c: &str, rank| ProfileState {
        segment_id: s.into(),
        canonical_segment_id: c.into(),
        created_rank: rank,
        merges: 0,
        traits: Default::default(),
        trait_times: Default::default(),
    };
    g.restore(
        vec![
            profile("use_x", "use_y", 0),
            profile("use_y", "use_x", 1),
            profile("use_z", "use_missing", 2),
        ],
        vec![
            anonymous_state("a1", "use_x"),
            anonymous_state("a2", "use_unknown"),
        ],
    );
    assert_eq!(g.canonical("use_x"), Some("use_x"));
    assert_eq!(g.canonical("use_z"), Some("use_z"));
    assert_eq!(g.lookup(&id("anonymous_id", "a2")), Some("use_unknown"));
    let delta = g.take_dirty();
    assert_eq!(
        delta.profiles.len(),
        1,
        "the placeholder profile is reported"
    );
    assert_eq!(delta.profiles[0].segment_id, "use_unknown");
    assert_eq!(
        delta.new_profiles, 0,
        "upserted: another writer that loaded the same state may have stored its own repair"
    );
    // A new profile ranks after every restored one.
    assert!(delta.profiles[0].created_rank > 2);
}

#[test]
fn apply_refuses_an_identifier_of_an_unknown_profile() {
    // Changes that name a profile neither known nor among them are incomplete: apply says so
    // (the caller restores everything) rather than inventing an empty profile of that name.
    let mut g = IdentityGraph::new(Rules::default());
    g.resolve(&ev(json!({"type": "page", "anonymousId": "a1"})))
        .unwrap();
    let _ = g.take_dirty();
    let orphan = IdentifierState {
        id_type: "anonymous_id".into(),
        value: "z9".into(),
        segment_id: "use_unknown".into(),
        first_seen: at(NOW),
        last_seen: at(NOW),
    };
    assert!(!g.apply(vec![], vec![orphan]));
    assert!(g.take_dirty().is_empty());
    assert_eq!(g.canonical("use_unknown"), None);
}

fn anonymous_ext(v: &str) -> Value {
    json!({"id": v, "type": "anonymous_id", "collection": "users", "encoding": "none"})
}

/// The stored state of anonymous id `value`, of profile `segment_id`.
fn anonymous_state(value: &str, segment_id: &str) -> IdentifierState {
    IdentifierState {
        id_type: "anonymous_id".into(),
        value: value.into(),
        segment_id: segment_id.into(),
        first_seen: at(NOW),
        last_seen: at(NOW),
    }
}

fn identify_at(anonymous_id: &str, ts: &str, plan: &str) -> Value {
    json!({"type": "identify", "anonymousId": anonymous_id, "timestamp": ts, "traits": {"plan": plan}})
}

/// An identify arriving late with an older timestamp (a mobile SDK's queue flushed after a
/// newer one) does not overwrite a trait a newer write set: on one profile as across a merge
/// of the same writes (it did on one profile — the later arrival won there, the newer
/// timestamp across a merge — and the late write moved the trait's time back, so that a merge
/// afterwards kept a value that was neither the last one received nor the newest).
#[test]
fn a_late_identify_with_an_older_timestamp_does_not_overwrite_a_newer_trait() {
    let plan = |g: &IdentityGraph, p: &str| g.traits(p).expect("profile")["plan"].clone();
    // One profile: "pro" (March), then, late, "free" (January).
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", "2024-03-01T00:00:00Z", "pro")).segment_id;
    let late = resolve(&mut g, identify_at("a", "2024-01-01T00:00:00Z", "free"));
    assert_eq!(plan(&g, &a), json!("pro"));
    assert!(late.profile_traits_updates.is_empty(), "{late:?}");
    // A write with the same timestamp as the newest is applied (the later arrival wins).
    resolve(&mut g, identify_at("a", "2024-03-01T00:00:00Z", "team"));
    assert_eq!(plan(&g, &a), json!("team"));

    // The same writes on two profiles, merged afterwards: the same value.
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", "2024-03-01T00:00:00Z", "pro")).segment_id;
    resolve(&mut g, identify_at("b", "2024-01-01T00:00:00Z", "free"));
    let merge = json!({"type": "page", "anonymousId": "a", "timestamp": "2024-04-01T00:00:00Z",
                       "context": {"externalIds": [anonymous_ext("b")]}});
    assert_eq!(resolve(&mut g, merge.clone()).segment_id, a);
    assert_eq!(plan(&g, &a), json!("pro"));

    // Three writes: "pro" (March) and, late, "free" (January) on A; "basic" (February) on B.
    // The merge keeps the newest, "pro" (it kept "basic").
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", "2024-03-01T00:00:00Z", "pro")).segment_id;
    resolve(&mut g, identify_at("b", "2024-02-01T00:00:00Z", "basic"));
    resolve(&mut g, identify_at("a", "2024-01-01T00:00:00Z", "free"));
    assert_eq!(resolve(&mut g, merge).segment_id, a);
    assert_eq!(plan(&g, &a), json!("pro"));
}

/// A late removal (`null`) older than the trait's last set leaves it; a newer one removes it.
#[test]
fn a_late_trait_removal_older_than_the_last_set_leaves_the_trait() {
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", "2024-03-01T00:00:00Z", "pro")).segment_id;
    resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "a", "timestamp": "2024-02-01T00:00:00Z", "traits": {"plan": null}}),
    );
    assert_eq!(g.traits(&a).expect("profile")["plan"], json!("pro"));
    resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "a", "timestamp": "2024-04-01T00:00:00Z", "traits": {"plan": null}}),
    );
    assert!(!g.traits(&a).expect("profile").contains_key("plan"));
}

/// Writes with equal timestamps: the later arrival wins, on one profile as across a merge of the
/// profiles they landed on (the survivor used to keep its own value: where an identify landed
/// decided it — review). Each write carries the order the graph applied it in.
#[test]
fn equal_timestamps_the_later_arrival_wins_across_a_merge_too() {
    let plan = |g: &IdentityGraph, p: &str| g.traits(p).expect("profile").get("plan").cloned();
    let ts = "2024-03-01T00:00:00Z";
    // One profile: "free", then "pro" with the same timestamp: "pro".
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", ts, "free")).segment_id;
    resolve(&mut g, identify_at("a", ts, "pro"));
    assert_eq!(plan(&g, &a), Some(json!("pro")));

    // The same two writes on A (older) and B, then a page linking them: A survives.
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", ts, "free")).segment_id;
    resolve(&mut g, identify_at("b", ts, "pro"));
    let merge = json!({"type": "page", "anonymousId": "a", "timestamp": "2024-04-01T00:00:00Z",
                       "context": {"externalIds": [anonymous_ext("b")]}});
    let r = resolve(&mut g, merge.clone());
    assert_eq!(r.segment_id, a);
    assert_eq!(
        plan(&g, &a),
        Some(json!("pro")),
        "the later arrival of two equal timestamps; profile_traits_updates: {:?}",
        r.profile_traits_updates
    );

    // A removal tied with a set, on the merged-away profile: the later removal wins.
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", ts, "free")).segment_id;
    resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "b", "timestamp": ts, "traits": {"plan": null}}),
    );
    resolve(&mut g, merge);
    assert_eq!(plan(&g, &a), None, "the later removal");
}

/// A trait time stored by an earlier release (a bare timestamp, no write order) counts as
/// written before any write since: a new write with the same timestamp wins, on the profile
/// and across a merge; times are stored with their order in an annotation an earlier release
/// reads past, and a restored graph orders its next writes after every stored one.
#[test]
fn trait_times_of_an_earlier_release_are_older_than_any_write_since() {
    let ts = "2024-03-01T00:00:00Z";
    let profile = |s: &str, rank, plan: &str| ProfileState {
        segment_id: s.into(),
        canonical_segment_id: s.into(),
        created_rank: rank,
        merges: 0,
        traits: json!({"plan": plan}).as_object().unwrap().clone(),
        trait_times: json!({"plan": ts}).as_object().unwrap().clone(),
    };
    let plan = |g: &IdentityGraph, p: &str| g.traits(p).expect("profile").get("plan").cloned();
    let mut g = IdentityGraph::new(Rules::default());
    g.restore(
        vec![profile("use_a", 0, "free"), profile("use_b", 1, "basic")],
        vec![anonymous_state("a", "use_a"), anonymous_state("b", "use_b")],
    );
    resolve(&mut g, identify_at("a", ts, "pro"));
    assert_eq!(
        plan(&g, "use_a"),
        Some(json!("pro")),
        "a write since wins the tie"
    );
    // use_b's bare time ties use_a's new write: the new write stays across the merge.
    let merge = json!({"type": "page", "anonymousId": "a", "timestamp": "2024-04-01T00:00:00Z",
                       "context": {"externalIds": [anonymous_ext("b")]}});
    assert_eq!(resolve(&mut g, merge).segment_id, "use_a");
    assert_eq!(plan(&g, "use_a"), Some(json!("pro")));
    let delta = g.take_dirty();
    let stored = delta
        .profiles
        .iter()
        .find(|p| p.segment_id == "use_a")
        .expect("use_a written");
    let time = stored.trait_times["plan"].as_str().expect("a string");
    let order = time
        .strip_prefix(&format!("{ts}[x-order="))
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        order.is_some_and(|n| n > 0),
        "stored as <timestamp>[x-order=n]: {time}"
    );
    // An earlier release's parser reads the timestamp (ignoring the annotation).
    assert_eq!(
        crate::event::parse_timestamp(time),
        crate::event::parse_timestamp(ts)
    );
    // Restored from what was stored, a graph orders its next write after it.
    let mut restored = IdentityGraph::new(Rules::default());
    restored.restore(
        delta.profiles,
        vec![anonymous_state("a", "use_a"), anonymous_state("b", "use_a")],
    );
    resolve(&mut restored, identify_at("b", ts, "team"));
    assert_eq!(plan(&restored, "use_a"), Some(json!("team")));
}

/// During a rolling upgrade an older replica reads the stored trait times (its parser reads the
/// timestamp past the write order's annotation) and writes back the ones it holds, without the
/// annotation: only the order is lost, so a late identify with an older timestamp still does not
/// overwrite the trait after the rollout. (Stored as `[timestamp, order]`, the times were
/// dropped by the older replica's read, and lost for good — review.)
#[test]
fn a_time_an_older_replica_rewrote_keeps_its_timestamp() {
    let plan = |g: &IdentityGraph, p: &str| g.traits(p).expect("profile").get("plan").cloned();
    let mut g = IdentityGraph::new(Rules::default());
    let a = resolve(&mut g, identify_at("a", "2024-03-02T00:00:00Z", "pro")).segment_id;
    let delta = g.take_dirty();
    // The older replica's read (a time its parser reads) then its write (that time, as it
    // prints it), with a trait of its own added.
    let rewritten: Vec<ProfileState> = delta
        .profiles
        .into_iter()
        .map(|mut p| {
            p.trait_times = p
                .trait_times
                .iter()
                .filter_map(|(k, v)| {
                    let t = v.as_str().and_then(crate::event::parse_timestamp)?;
                    Some((k.clone(), json!(t.to_string())))
                })
                .collect();
            p.traits.insert("seats".into(), json!(3));
            p.trait_times
                .insert("seats".into(), json!("2024-03-02T00:00:01Z"));
            p
        })
        .collect();
    assert_eq!(
        rewritten[0].trait_times["plan"],
        json!("2024-03-02T00:00:00Z")
    );
    let mut after = IdentityGraph::new(Rules::default());
    after.restore(rewritten, delta.identifiers);
    resolve(&mut after, identify_at("a", "2024-03-01T00:00:00Z", "free"));
    assert_eq!(plan(&after, &a), Some(json!("pro")), "an older write lost");
}
