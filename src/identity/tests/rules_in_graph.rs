//! Blocked values, limits with windows, caps and the traits limit, applied by the graph.

use serde_json::json;

use super::*;

#[test]
fn default_blocked_values_are_dropped() {
    let mut g = IdentityGraph::new(Rules::default());
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "-1", "anonymousId": "a1",
               "traits": {"email": "anonymous"},
               "context": {"externalIds": [{"id": "0-0", "type": "phone", "collection": "users", "encoding": "none"}]}}),
    );
    assert_eq!(
        r.dropped,
        vec![
            (id("user_id", "-1"), DropReason::Blocked),
            (id("email", "anonymous"), DropReason::Blocked),
            (id("phone", "0-0"), DropReason::Blocked),
        ]
    );
    assert_eq!(r.external_id_mapping_updates.len(), 1);
    assert_eq!(g.lookup(&id("user_id", "-1")), None);
    assert_eq!(
        g.lookup(&id("anonymous_id", "a1")),
        Some(r.segment_id.as_str())
    );
}

#[test]
fn custom_blocked_regex_applies_to_every_type() {
    let rules = Rules::from_yaml(r"blocked: {exact: [], regex: ['^test[-_]', '@example\.org$']}")
        .expect("rules");
    let mut g = IdentityGraph::new(rules);
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "test-1", "anonymousId": "0",
               "traits": {"email": "qa@example.org"}}),
    );
    assert_eq!(
        r.dropped,
        vec![
            (id("user_id", "test-1"), DropReason::Blocked),
            (id("email", "qa@example.org"), DropReason::Blocked),
        ]
    );
    // "0" is no longer blocked: the default regex was replaced.
    assert_eq!(
        g.lookup(&id("anonymous_id", "0")),
        Some(r.segment_id.as_str())
    );
}

#[test]
fn all_identifiers_blocked_is_an_error_and_changes_nothing() {
    let mut g = IdentityGraph::new(Rules::default());
    resolve(&mut g, json!({"type": "page", "anonymousId": "a1"}));
    g.take_dirty();
    let err = g
        .resolve(&ev(
            json!({"type": "identify", "userId": "null", "anonymousId": "000",
                            "traits": {"email": "-1", "plan": "x"}}),
        ))
        .expect_err("nothing usable");
    assert_eq!(err, ResolveError::NoIdentifiers);
    assert_eq!(g.profile_count(), 1);
    assert!(g.take_dirty().is_empty());
}

#[test]
fn identify_with_too_many_traits_is_rejected() {
    let mut g = IdentityGraph::new(Rules::default());
    let mut event = ev(json!({"type": "identify", "userId": "u1"}));
    for i in 0..300 {
        event.traits.insert(format!("t{i}"), json!(i));
    }
    assert_eq!(
        g.resolve(&event),
        Err(ResolveError::TooManyTraits {
            count: 300,
            max: 300
        })
    );
    event.traits.shift_remove("t0");
    assert!(g.resolve(&event).is_ok(), "299 traits are accepted");

    let rules = Rules::from_yaml("caps: {max_traits: 2}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let err = g
        .resolve(&ev(
            json!({"type": "identify", "userId": "u1", "traits": {"a": 1, "b": 2}}),
        ))
        .expect_err("over the configured limit");
    assert_eq!(err, ResolveError::TooManyTraits { count: 2, max: 2 });
    assert_eq!(g.profile_count(), 0);
    assert!(g.take_dirty().is_empty());
}

#[test]
fn limit_drops_the_lowest_priority_identifier_of_the_event() {
    // Two profiles, one user id each; an event carrying both user ids and an anonymous id of
    // the first drops the anonymous id, then the later user id, and attaches to the first.
    let mut g = IdentityGraph::new(Rules::default());
    let p1 = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
    )
    .segment_id;
    resolve(&mut g, json!({"type": "identify", "userId": "u2"}));
    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "userId": "u1", "anonymousId": "a1",
               "context": {"externalIds": [{"id": "u2", "type": "user_id", "collection": "users", "encoding": "none"}]}}),
    );
    assert_eq!(r.segment_id, p1);
    assert_eq!(
        r.dropped,
        vec![
            (id("anonymous_id", "a1"), DropReason::Limit),
            (id("user_id", "u2"), DropReason::Limit),
        ]
    );
    assert!(r.merged.is_empty());
    assert_eq!(g.profile_count(), 2);
}

#[test]
fn limits_count_only_identifiers_seen_within_the_window() {
    let rules = Rules::from_yaml("limits: {email: {max: 1, window: 30d}}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let email_at = |email: &str, ts: &str| json!({"type": "identify", "userId": "u1", "timestamp": ts, "traits": {"email": email}});
    let p = resolve(&mut g, email_at("old@x", "2024-01-01T00:00:00Z")).segment_id;

    // Ten days later the old email is inside the window: a second one exceeds the limit, and
    // email ranks below user_id, so the email is dropped.
    let r = resolve(&mut g, email_at("new@x", "2024-01-11T00:00:00Z"));
    assert_eq!(r.segment_id, p);
    assert_eq!(r.dropped, vec![(id("email", "new@x"), DropReason::Limit)]);
    assert_eq!(g.lookup(&id("email", "new@x")), None);

    // Sixty days later the old email no longer counts.
    let r = resolve(&mut g, email_at("new@x", "2024-03-01T00:00:00Z"));
    assert_eq!(r.segment_id, p);
    assert!(r.dropped.is_empty());
    assert_eq!(g.lookup(&id("email", "new@x")), Some(p.as_str()));

    // The old email is already on the profile, so seeing it again never counts as new.
    let r = resolve(&mut g, email_at("old@x", "2024-03-02T00:00:00Z"));
    assert!(r.dropped.is_empty());
}

#[test]
fn merge_cap_stops_further_merges() {
    let rules = Rules::from_yaml("caps: {max_merges_per_profile: 1}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let a = resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "a", "traits": {"email": "e@x"}}),
    )
    .segment_id;
    let b = resolve(&mut g, json!({"type": "page", "anonymousId": "b"})).segment_id;
    let c = resolve(&mut g, json!({"type": "page", "anonymousId": "c"})).segment_id;

    let r = resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "b", "traits": {"email": "e@x"}}),
    );
    assert_eq!(r.merged, vec![b]);
    let r = resolve(
        &mut g,
        json!({"type": "identify", "anonymousId": "c", "traits": {"email": "e@x", "k": 1}}),
    );
    assert_eq!(r.segment_id, a, "resolves to the oldest matched profile");
    assert!(r.merged.is_empty());
    assert_eq!(
        r.dropped,
        vec![(id("anonymous_id", "c"), DropReason::ProfileIdentifierCap)]
    );
    assert_eq!(g.canonical(&c), Some(c.as_str()));
    assert_eq!(g.profile_count(), 2);
    assert_eq!(g.traits(&a).map(|t| t["k"].clone()), Some(json!(1)));
}

#[test]
fn identifier_cap_stops_new_identifiers_and_merges() {
    let rules = Rules::from_yaml("caps: {max_identifiers_per_profile: 3}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let a = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u", "anonymousId": "a", "traits": {"email": "e@x"}}),
    )
    .segment_id;
    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "userId": "u", "context": {"externalIds": [
            {"id": "p1", "type": "phone", "collection": "users", "encoding": "none"}]}}),
    );
    assert_eq!(r.segment_id, a);
    assert_eq!(
        r.dropped,
        vec![(id("phone", "p1"), DropReason::ProfileIdentifierCap)]
    );
    assert!(r.external_id_mapping_updates.is_empty());
    assert_eq!(g.lookup(&id("phone", "p1")), None);

    let b = resolve(&mut g, json!({"type": "page", "anonymousId": "b"})).segment_id;
    let r = resolve(
        &mut g,
        json!({"type": "track", "event": "E", "userId": "u", "anonymousId": "b"}),
    );
    assert_eq!(r.segment_id, a);
    assert!(r.merged.is_empty(), "a merge would exceed 3 identifiers");
    assert_eq!(
        r.dropped,
        vec![(id("anonymous_id", "b"), DropReason::ProfileIdentifierCap)]
    );
    assert_eq!(g.canonical(&b), Some(b.as_str()));

    // A new profile is capped too, keeping its highest-priority identifiers.
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "v", "anonymousId": "z", "traits": {"email": "v@x"},
               "context": {"externalIds": [{"id": "p2", "type": "phone", "collection": "users", "encoding": "none"}]}}),
    );
    assert!(r.created);
    assert_eq!(
        r.dropped,
        vec![(id("phone", "p2"), DropReason::ProfileIdentifierCap)]
    );
    assert_eq!(r.external_id_mapping_updates.len(), 3);
}

/// A profile remembers at most `caps.max_traits_per_profile` removals of traits it does not
/// hold (so that an older write arriving later does not set them), forgetting the oldest:
/// removals of ever new names — never set, or set and removed again — grew its stored trait
/// times without bound.
#[test]
fn removals_of_traits_not_held_are_bounded_and_the_newest_kept() {
    let rules = Rules::from_yaml("caps: {max_traits_per_profile: 3}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let mut p = String::new();
    for round in 0..5 {
        let names: Vec<String> = (0..4).map(|i| format!("x{round}_{i}")).collect();
        let mut set = json!({"type": "identify", "userId": "u1", "traits": {}});
        let mut removed =
            json!({"type": "identify", "userId": "u1", "traits": {"never_held": null}});
        for n in &names[..2] {
            set["traits"][n] = json!(1);
            removed["traits"][n] = Value::Null;
        }
        removed["traits"][format!("never_{round}")] = Value::Null;
        resolve(&mut g, set);
        p = resolve(&mut g, removed).segment_id;
    }
    let times = g.profiles.iter().map(|p| p.trait_times.len()).max();
    assert_eq!(times, Some(3), "three removals remembered");
    // The newest are kept (of one write's, the last names): a late write older than the last
    // round's removal does not set it again; one of a forgotten removal does.
    let older = ev_at(
        json!({"type": "identify", "userId": "u1", "timestamp": "2024-04-01T00:00:00Z",
               "traits": {"x4_1": "late", "x0_1": "late"}}),
        "2024-05-01T13:00:00Z",
    );
    g.resolve(&older).expect("resolves");
    let traits = g.traits(&p).unwrap();
    assert!(!traits.contains_key("x4_1"), "{traits:?}");
    assert_eq!(traits.get("x0_1"), Some(&json!("late")), "{traits:?}");
}

/// A profile holding `caps.max_traits_per_profile` traits takes no new one, while its own
/// traits still change and a removal makes room; the cap is checked when the rules are read.
#[test]
fn a_full_profile_takes_no_new_trait() {
    let rules = Rules::from_yaml("caps: {max_traits_per_profile: 3}").expect("rules");
    let mut g = IdentityGraph::new(rules);
    let snapshot = |r: &Resolution| {
        r.profile_traits_updates
            .last()
            .map(|u| u.traits.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"a": 1, "b": 2}}),
    );
    assert_eq!(r.traits_dropped, 0);
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"c": 3, "d": 4, "a": 10}}),
    );
    assert_eq!(r.traits_dropped, 1, "d finds no room");
    assert_eq!(snapshot(&r), ["a", "b", "c"]);
    assert_eq!(
        r.profile_traits_updates[0].traits["a"],
        json!(10),
        "its own still change"
    );
    let r = resolve(
        &mut g,
        json!({"type": "identify", "userId": "u1", "traits": {"b": null, "d": 4}}),
    );
    assert_eq!(
        (r.traits_dropped, snapshot(&r)),
        (0, vec!["a".to_string(), "c".into(), "d".into()])
    );

    for bad in ["0", "10001"] {
        let err = Rules::from_yaml(&format!("caps: {{max_traits_per_profile: {bad}}}"))
            .expect_err("out of range");
        assert!(
            err.to_string().contains("caps.max_traits_per_profile"),
            "{err}"
        );
    }
}
