use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn ts(s: &str) -> Timestamp {
    s.parse().expect("test timestamp")
}

fn opts() -> ParseOptions {
    ParseOptions::new(ts("2024-05-01T12:00:00Z"), "src_1")
}

fn parse(v: Value) -> Result<Event, EventError> {
    Event::from_json(&v, None, &opts())
}

fn field_of(v: Value) -> String {
    parse(v).expect_err("message must be rejected").field
}

#[test]
fn event_type_names_and_tables() {
    let names: Vec<_> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(
        names,
        ["identify", "track", "page", "screen", "group", "alias"]
    );
    let tables: Vec<_> = EventType::ALL.iter().map(|t| t.table()).collect();
    assert_eq!(
        tables,
        [
            "identifies",
            "tracks",
            "pages",
            "screens",
            "groups",
            "aliases"
        ]
    );
    for t in EventType::ALL {
        assert_eq!(EventType::parse(t.as_str()), Some(t));
    }
    assert_eq!(EventType::parse("Track"), None);
    assert_eq!(
        serde_json::to_value(EventType::Screen).expect("serializes"),
        json!("screen")
    );
}

#[test]
fn parses_a_track_call() {
    let e = parse(json!({
        "type": "track", "messageId": "m1", "userId": "u1", "anonymousId": "a1",
        "event": "Order Completed", "properties": {"total": 12.5},
        "context": {"ip": "1.2.3.4"}, "integrations": {"All": true},
        "timestamp": "2024-05-01T11:00:00Z"
    }))
    .expect("valid track");
    assert_eq!(e.event_type, EventType::Track);
    assert_eq!(e.message_id, "m1");
    assert_eq!(e.user_id.as_deref(), Some("u1"));
    assert_eq!(e.anonymous_id.as_deref(), Some("a1"));
    assert_eq!(e.event.as_deref(), Some("Order Completed"));
    assert_eq!(e.properties["total"], json!(12.5));
    assert_eq!(e.context["ip"], json!("1.2.3.4"));
    assert_eq!(e.integrations["All"], json!(true));
    assert_eq!(e.source_id, "src_1");
    assert_eq!(e.received_at, ts("2024-05-01T12:00:00Z"));
    assert_eq!(e.timestamp, ts("2024-05-01T11:00:00Z"));
    assert_eq!(e.original_timestamp, Some(ts("2024-05-01T11:00:00Z")));
    assert!(e.extra.is_empty());
}

#[test]
fn default_type_applies_and_must_agree() {
    let body = json!({"userId": "u1", "event": "Clicked"});
    let e = Event::from_json(&body, Some(EventType::Track), &opts()).expect("typed by endpoint");
    assert_eq!(e.event_type, EventType::Track);

    let body = json!({"type": "page", "userId": "u1"});
    let err = Event::from_json(&body, Some(EventType::Track), &opts()).expect_err("mismatch");
    assert_eq!(err.field, "type");
}

#[test]
fn rejects_a_non_object() {
    assert_eq!(field_of(json!([1, 2])), "message");
    assert_eq!(field_of(json!("identify")), "message");
}

#[test]
fn type_is_required_and_must_be_known() {
    assert_eq!(field_of(json!({"userId": "u1"})), "type");
    assert_eq!(field_of(json!({"type": "click", "userId": "u1"})), "type");
    assert_eq!(field_of(json!({"type": 3, "userId": "u1"})), "type");
}

#[test]
fn user_id_or_anonymous_id_is_required() {
    assert_eq!(field_of(json!({"type": "page"})), "userId");
    assert_eq!(
        field_of(json!({"type": "page", "userId": "", "anonymousId": null})),
        "userId"
    );
    assert_eq!(field_of(json!({"type": "page", "userId": true})), "userId");
    assert_eq!(
        field_of(json!({"type": "page", "anonymousId": {"a": 1}})),
        "anonymousId"
    );
}

#[test]
fn numeric_ids_become_strings() {
    let e = parse(json!({"type": "group", "userId": 42, "anonymousId": 1.5, "groupId": 7}))
        .expect("numbers accepted");
    assert_eq!(e.user_id.as_deref(), Some("42"));
    assert_eq!(e.anonymous_id.as_deref(), Some("1.5"));
    assert_eq!(e.group_id.as_deref(), Some("7"));
    // Integers of 64 bits are exact; a larger one was rounded through a float, and two
    // different ids could become one profile: refused, naming the field.
    let big = parse(json!({"type": "track", "event": "E", "userId": 18446744073709551615u64}))
        .expect("u64 accepted");
    assert_eq!(big.user_id.as_deref(), Some("18446744073709551615"));
    let e = parse(
        serde_json::from_str(
            r#"{"type": "track", "event": "E", "userId": 123456789012345678901234567890}"#,
        )
        .unwrap(),
    )
    .unwrap_err();
    assert_eq!(e.field, "userId");
    assert!(e.reason.contains("send it as a string"), "{e:?}");
}

#[test]
fn track_requires_an_event_name() {
    assert_eq!(field_of(json!({"type": "track", "userId": "u1"})), "event");
    assert_eq!(
        field_of(json!({"type": "track", "userId": "u1", "event": ""})),
        "event"
    );
    assert_eq!(
        field_of(json!({"type": "track", "userId": "u1", "event": 5})),
        "event"
    );
}

#[test]
fn group_requires_group_id() {
    assert_eq!(
        field_of(json!({"type": "group", "userId": "u1"})),
        "groupId"
    );
}

#[test]
fn alias_requires_previous_id_and_user_id() {
    assert_eq!(
        field_of(json!({"type": "alias", "userId": "u1"})),
        "previousId"
    );
    assert_eq!(
        field_of(json!({"type": "alias", "anonymousId": "a1", "previousId": "p"})),
        "userId"
    );
    let e = parse(json!({"type": "alias", "userId": "u1", "previousId": "a0"})).expect("alias");
    assert_eq!(e.previous_id.as_deref(), Some("a0"));
}

#[test]
fn object_fields_must_be_objects() {
    for key in ["traits", "properties", "context", "integrations"] {
        let mut msg = json!({"type": "identify", "userId": "u1"});
        msg[key] = json!([1]);
        let err = parse(msg).expect_err("non-object rejected");
        assert_eq!(err.field, key);
        assert_eq!(err.to_string(), format!("{key}: must be an object"));
    }
}

#[test]
fn timestamps_must_be_iso_8601() {
    for key in ["timestamp", "sentAt", "originalTimestamp"] {
        let mut msg = json!({"type": "page", "userId": "u1"});
        msg[key] = json!("yesterday");
        assert_eq!(parse(msg.clone()).expect_err("bad time").field, key);
        msg[key] = json!(1714560000);
        assert_eq!(parse(msg).expect_err("numeric time").field, key);
    }
    // Offsets are honoured; a date-time without one is read as UTC.
    let e =
        parse(json!({"type": "page", "userId": "u1", "timestamp": "2024-05-01T13:00:00+02:00"}))
            .expect("offset");
    assert_eq!(e.timestamp, ts("2024-05-01T11:00:00Z"));
    let e = parse(json!({"type": "page", "userId": "u1", "timestamp": "2024-05-01T11:00:00.250"}))
        .expect("no offset");
    assert_eq!(e.timestamp, ts("2024-05-01T11:00:00.25Z"));
}

/// An empty time counts as absent, as an empty id does: the message is dated by its receipt,
/// not refused (a refused batch is lost to the SDKs).
#[test]
fn an_empty_time_counts_as_absent() {
    for key in ["timestamp", "sentAt", "originalTimestamp"] {
        let mut msg = json!({"type": "page", "userId": "u1",
                             "timestamp": "2024-05-01T11:00:00Z", "sentAt": "2024-05-01T11:00:01Z"});
        msg[key] = json!("");
        let e = parse(msg).unwrap_or_else(|e| panic!("{key}: {e}"));
        match key {
            "sentAt" => assert_eq!(e.sent_at, None),
            "originalTimestamp" => {
                assert_eq!(e.original_timestamp, Some(ts("2024-05-01T11:00:00Z")))
            }
            _ => assert_eq!(e.original_timestamp, None),
        }
    }
}

#[test]
fn message_id_must_be_text_or_a_number_and_is_generated_when_absent() {
    assert_eq!(
        field_of(json!({"type": "page", "userId": "u1", "messageId": true})),
        "messageId"
    );
    let a = parse(json!({"type": "page", "userId": "u1"})).expect("generated id");
    let b = parse(json!({"type": "page", "userId": "u1"})).expect("generated id");
    assert_ne!(a.message_id, b.message_id);
    let re =
        regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .expect("regex");
    assert!(re.is_match(&a.message_id), "{}", a.message_id);
}

/// The model takes an identify of any number of traits: Segment's limit of 300 is the identity
/// rules' (`caps.max_traits`), applied by the engine, which leaves such a message out of its
/// batch rather than refusing the batch (`engine::request::storable`).
#[test]
fn the_model_takes_an_identify_of_300_traits() {
    let traits: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("t{i}"), json!(i))).collect();
    let identify = json!({"type": "identify", "userId": "u1", "traits": traits});
    assert_eq!(
        parse(identify.clone()).expect("300 traits").traits.len(),
        300
    );
    let flat = FlatEvent::from_json_text(&identify.to_string(), &opts()).expect("flat read");
    assert_eq!(flat.leaves.of(Section::Traits).len(), 300);
}

#[test]
fn clock_skew_is_corrected() {
    // The client's clock is 10 minutes fast: it stamped the event at 12:09, sent at 12:10, and
    // the server received the message at 12:00:05.
    let o = ParseOptions::new(ts("2024-05-01T12:00:05Z"), "s");
    let msg = json!({"type": "page", "userId": "u1",
        "timestamp": "2024-05-01T12:09:00Z", "sentAt": "2024-05-01T12:10:00Z"});
    let e = Event::from_json(&msg, None, &o).expect("valid");
    assert_eq!(e.original_timestamp, Some(ts("2024-05-01T12:09:00Z")));
    assert_eq!(e.sent_at, Some(ts("2024-05-01T12:10:00Z")));
    assert_eq!(e.received_at, ts("2024-05-01T12:00:05Z"));
    assert_eq!(e.timestamp, ts("2024-05-01T11:59:05Z"));

    // originalTimestamp wins over timestamp when both are sent.
    let msg = json!({"type": "page", "userId": "u1", "originalTimestamp": "2024-05-01T12:08:00Z",
        "timestamp": "2024-05-01T00:00:00Z", "sentAt": "2024-05-01T12:10:00Z"});
    let e = Event::from_json(&msg, None, &o).expect("valid");
    assert_eq!(e.timestamp, ts("2024-05-01T11:58:05Z"));

    // Without sentAt the client's timestamp stands; without any, the receive time.
    let e = Event::from_json(
        &json!({"type": "page", "userId": "u1", "timestamp": "2024-04-01T00:00:00Z"}),
        None,
        &o,
    )
    .expect("valid");
    assert_eq!(e.timestamp, ts("2024-04-01T00:00:00Z"));
    let e = Event::from_json(&json!({"type": "page", "userId": "u1"}), None, &o).expect("valid");
    assert_eq!(e.timestamp, o.now);
    assert_eq!(e.original_timestamp, None);
}

#[test]
fn received_at_is_trusted_only_for_imports() {
    let msg = json!({"type": "page", "userId": "u1", "receivedAt": "2023-01-01T00:00:00Z"});
    let live = parse(msg.clone()).expect("valid");
    assert_eq!(live.received_at, opts().now);
    let import = ParseOptions {
        trust_received_at: true,
        ..opts()
    };
    let e = Event::from_json(&msg, None, &import).expect("valid");
    assert_eq!(e.received_at, ts("2023-01-01T00:00:00Z"));
    assert_eq!(e.timestamp, ts("2023-01-01T00:00:00Z"));
}

#[test]
fn unknown_fields_are_kept_and_round_trip() {
    let msg = json!({
        "type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m-1",
        "traits": {"email": "jane@example.com", "plan": null},
        "context": {"traits": {"name": "Jane"}}, "properties": {"p": 1},
        "timestamp": "2024-05-01T11:59:00.123456789Z", "sentAt": "2024-05-01T11:59:01Z",
        "version": 2, "user_id": "snake", "_metadata": {"bundled": ["x"]},
        "writeKey": "secret"
    });
    let e = parse(msg).expect("valid");
    assert_eq!(e.extra.len(), 2);
    assert_eq!(e.extra["version"], json!(2));
    assert_eq!(e.extra["user_id"], json!("snake"));
    assert!(
        !e.extra.contains_key("_metadata"),
        "the SDKs' delivery notes"
    );
    assert!(!e.extra.contains_key("writeKey"));

    let out = e.to_json();
    assert_eq!(out["type"], json!("identify"));
    assert_eq!(out["userId"], json!("u1"));
    assert_eq!(out["version"], json!(2));
    assert_eq!(out["receivedAt"], json!("2024-05-01T12:00:00Z"));
    assert_eq!(
        out["originalTimestamp"],
        json!("2024-05-01T11:59:00.123456789Z")
    );
    let trusted = ParseOptions {
        now: ts("2000-01-01T00:00:00Z"),
        source_id: "src_1".into(),
        trust_received_at: true,
    };
    assert_eq!(Event::from_json(&out, None, &trusted), Ok(e));
}

/// An SDK's payload in an `import` file (trusted, with no `receivedAt`) keeps its own time: the
/// clock-skew correction counted from the import's time, and re-dated a 2023 event to the
/// import minus its 5 s of sending (review). It is received at the import's time, and the
/// store's row of it (read back trusted) keeps both.
#[test]
fn a_trusted_payload_without_its_receipt_keeps_its_time_through_the_store() {
    let trusted = ParseOptions {
        now: ts("2026-12-01T09:00:00Z"),
        source_id: "src_1".into(),
        trust_received_at: true,
    };
    let m = json!({"type": "track", "userId": "u", "event": "E",
        "timestamp": "2023-01-01T00:00:00Z", "sentAt": "2023-01-01T00:00:05Z"});
    let e = Event::from_json(&m, None, &trusted).expect("valid");
    assert_eq!(e.timestamp, ts("2023-01-01T00:00:00Z"));
    assert_eq!(e.received_at, ts("2026-12-01T09:00:00Z"));
    assert_eq!(e.sent_at, Some(ts("2023-01-01T00:00:05Z")));
    // Read back later (the store keeps `to_json`), the same event.
    let later = ParseOptions {
        now: ts("2027-01-01T00:00:00Z"),
        ..trusted.clone()
    };
    assert_eq!(Event::from_json(&e.to_json(), None, &later), Ok(e));
    // Without a time of its own, it is dated by its receipt, the import, and read back so.
    let timeless = json!({"type": "track", "userId": "u", "event": "E",
        "sentAt": "2023-01-01T00:00:05Z"});
    let e = Event::from_json(&timeless, None, &trusted).expect("valid");
    assert_eq!(e.timestamp, ts("2026-12-01T09:00:00Z"));
    assert_eq!(Event::from_json(&e.to_json(), None, &later), Ok(e));
    // With its receipt, the correction counts from it, as the engine's did.
    let mut received = m.clone();
    received["receivedAt"] = json!("2023-01-01T00:00:10Z");
    let e = Event::from_json(&received, None, &trusted).expect("valid");
    assert_eq!(e.timestamp, ts("2023-01-01T00:00:05Z"));
    assert_eq!(e.received_at, ts("2023-01-01T00:00:10Z"));
    assert_eq!(Event::from_json(&e.to_json(), None, &later), Ok(e));
    // A receiver's record (`timestamp` beside `originalTimestamp`, as Segment exports) keeps
    // the time that receiver corrected.
    let exported = json!({"type": "track", "userId": "u", "event": "E",
        "originalTimestamp": "2023-01-01T00:00:00Z", "sentAt": "2023-01-01T00:00:05Z",
        "receivedAt": "2023-01-01T00:00:10Z", "timestamp": "2023-01-01T00:00:05.001Z"});
    let e = Event::from_json(&exported, None, &trusted).expect("valid");
    assert_eq!(e.timestamp, ts("2023-01-01T00:00:05.001Z"));
    assert_eq!(e.original_timestamp, Some(ts("2023-01-01T00:00:00Z")));
    // Untrusted (the Tracking API), it counts from now.
    let live = ParseOptions {
        trust_received_at: false,
        ..trusted
    };
    let e = Event::from_json(&m, None, &live).expect("valid");
    assert_eq!(e.timestamp, ts("2026-12-01T08:59:55Z"));
}

#[test]
fn event_without_client_time_round_trips() {
    let e = parse(json!({"type": "alias", "userId": "u1", "previousId": "a1"})).expect("valid");
    let out = e.to_json();
    assert!(out.get("timestamp").is_none());
    let trusted = ParseOptions {
        trust_received_at: true,
        ..opts()
    };
    assert_eq!(Event::from_json(&out, None, &trusted), Ok(e));
}

#[test]
fn identity_traits_by_type() {
    let identify = parse(json!({"type": "identify", "userId": "u1",
        "traits": {"email": "a@x"}, "context": {"traits": {"email": "b@x"}}}))
    .expect("valid");
    assert_eq!(identify.identity_traits()["email"], json!("a@x"));
    let track = parse(json!({"type": "track", "userId": "u1", "event": "E",
        "traits": {"email": "a@x"}, "context": {"traits": {"email": "b@x"}}}))
    .expect("valid");
    assert_eq!(track.identity_traits()["email"], json!("b@x"));
    let page =
        parse(json!({"type": "page", "userId": "u1", "context": {"traits": 3}})).expect("valid");
    assert!(page.identity_traits().is_empty());
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z0-9:TZ.+-]{0,24}".prop_map(Value::from),
        prop_oneof![
            Just("identify"),
            Just("track"),
            Just("alias"),
            Just("group"),
            Just("2024-05-01T12:00:00Z"),
            Just("9999-12-31T23:59:59Z"),
            Just("-009999-01-01T00:00:00Z"),
        ]
        .prop_map(Value::from),
    ];
    let key = prop_oneof![
        Just("type".to_string()),
        Just("userId".to_string()),
        Just("anonymousId".to_string()),
        Just("event".to_string()),
        Just("groupId".to_string()),
        Just("previousId".to_string()),
        Just("timestamp".to_string()),
        Just("sentAt".to_string()),
        Just("originalTimestamp".to_string()),
        Just("receivedAt".to_string()),
        Just("traits".to_string()),
        Just("context".to_string()),
        Just("messageId".to_string()),
        Just("writeKey".to_string()),
        Just("properties".to_string()),
        Just("a.b".to_string()),
        "[a-zA-Z_]{1,8}",
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..10)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn from_json_never_panics(v in arb_json(), trust in any::<bool>(), typed in any::<bool>()) {
        let o = ParseOptions { trust_received_at: trust, ..opts() };
        let default_type = typed.then_some(EventType::Track);
        if let Ok(e) = Event::from_json(&v, default_type, &o) {
            // Whatever parses must round-trip through its canonical JSON.
            let trusted = ParseOptions { trust_received_at: true, ..opts() };
            // The text the store keeps is exactly the canonical JSON, written without a Value.
            prop_assert_eq!(e.to_json_string(), e.to_json().to_string());
            prop_assert_eq!(Event::from_json(&e.to_json(), None, &trusted), Ok(e));
        }
    }

    #[test]
    fn parsing_the_text_equals_parsing_the_value(v in arb_json(), trust in any::<bool>(), typed in any::<bool>()) {
        let o = ParseOptions { trust_received_at: trust, ..opts() };
        let default_type = typed.then_some(EventType::Track);
        let from_value = Event::from_json(&v, default_type, &o);
        let from_text = Event::from_json_text(&v.to_string(), default_type, &o);
        match (from_value, from_text) {
            (Ok(a), Ok(mut b)) => {
                // A message without a messageId gets a random one on each parse.
                if !matches!(v.get("messageId"), Some(Value::String(s)) if !s.is_empty()) {
                    b.message_id = a.message_id.clone();
                }
                prop_assert_eq!(a, b);
            }
            (Err(a), Err(b)) if v.is_object() => prop_assert_eq!(a, b),
            (Err(_), Err(b)) => prop_assert_eq!(b.field, "message"),
            (a, b) => prop_assert!(false, "value: {:?}, text: {:?}", a, b),
        }
    }
}

/// A valid message of any type with arbitrary objects and extra keys.
fn arb_message() -> impl Strategy<Value = Value> {
    let object = || {
        arb_json().prop_map(|v| match v {
            Value::Object(m) => Value::Object(m),
            other => json!({"k": other, "a.b": {"c": other}}),
        })
    };
    (
        prop_oneof![Just("identify"), Just("track"), Just("page"), Just("group")],
        object(),
        object(),
        object(),
        object(),
    )
        .prop_flat_map(|(t, context, traits, properties, extra)| {
            let mut m = json!({"type": t, "userId": "u", "event": "E", "groupId": "g",
                               "context": context, "traits": traits, "properties": properties});
            if let (Some(m), Value::Object(extra)) = (m.as_object_mut(), extra) {
                for (k, v) in extra {
                    m.entry(k).or_insert(v);
                }
            }
            // The keys in any order (objects and unknown keys interleaved).
            let entries: Vec<(String, Value)> = m
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect();
            Just(entries)
                .prop_shuffle()
                .prop_map(|e| Value::Object(e.into_iter().collect()))
        })
}

proptest! {
    /// The sync's flat read of a stored text is the flattening of the parsed event, errors
    /// included.
    #[test]
    fn the_flat_read_of_a_text_equals_the_parsed_event_flattened(
        v in prop_oneof![arb_json(), arb_message()],
        trust in any::<bool>(),
    ) {
        let o = ParseOptions { trust_received_at: trust, ..opts() };
        let parsed = Event::from_json(&v, None, &o).map(FlatEvent::from_event);
        let flat = FlatEvent::from_json_text(&v.to_string(), &o);
        match (parsed, flat) {
            (Ok(a), Ok(mut b)) => {
                if !matches!(v.get("messageId"), Some(Value::String(s)) if !s.is_empty()) {
                    b.event.message_id = a.event.message_id.clone();
                }
                prop_assert_eq!(a, b);
            }
            (Err(a), Err(b)) if v.is_object() => prop_assert_eq!(a, b),
            (Err(_), Err(b)) => prop_assert_eq!(b.field, "message"),
            (a, b) => prop_assert!(false, "parsed: {:?}, flat: {:?}", a, b),
        }
    }
}

proptest! {
    /// A row of the engine's events feed reads into the same seq, profile and flattened event
    /// as the row read into a `FeedRow` (the map path).
    #[test]
    fn a_feed_row_read_flat_equals_the_feed_row_flattened(v in arb_message(), seq in 1i64..i64::MAX) {
        let o = ParseOptions { trust_received_at: true, ..opts() };
        let Ok(event) = Event::from_json(&v, None, &o) else { return Ok(()) };
        let row = crate::store::FeedRow::Event(crate::store::EventRow {
            seq,
            segment_id: "use_1".into(),
            event,
        });
        let text = Value::Object(row.to_json()).to_string();
        let via_map = crate::store::FeedRow::from_json(
            &crate::store::Feed::Events(crate::store::EventFilter::All),
            serde_json::from_str(&text).unwrap(),
        )
        .unwrap();
        let crate::store::FeedRow::Event(via_map) = via_map else { panic!("an event row") };
        let (s, segment_id, flat) = FlatEvent::from_feed_row_text(&text).unwrap();
        prop_assert_eq!((s, segment_id, flat), (via_map.seq, via_map.segment_id, FlatEvent::from_event(via_map.event)));
    }
}

#[test]
fn a_feed_rows_own_keys_are_never_the_events() {
    let o = ParseOptions {
        trust_received_at: true,
        ..opts()
    };
    let msg = json!({"type": "track", "event": "E", "userId": "u", "seq": 0,
                     "segment_id": "someone_else", "event_source_id": "elsewhere", "kept": 1});
    let event = Event::from_json(&msg, None, &o).unwrap();
    let row = crate::store::FeedRow::Event(crate::store::EventRow {
        seq: 42,
        segment_id: "use_1".into(),
        event,
    });
    let text = Value::Object(row.to_json()).to_string();
    let (seq, segment_id, flat) = FlatEvent::from_feed_row_text(&text).unwrap();
    assert_eq!((seq, segment_id.as_str()), (42, "use_1"));
    assert_eq!(flat.event.source_id, o.source_id);
    assert_eq!(flat.leaves.of(Section::Extra), [("kept".into(), json!(1))]);
    for broken in [
        r#"{"segment_id":"s","event_source_id":"e","type":"track","event":"E","userId":"u","receivedAt":"2026-01-01T00:00:00Z"}"#,
        r#"{"seq":1,"event_source_id":"e","type":"track","event":"E","userId":"u","receivedAt":"2026-01-01T00:00:00Z"}"#,
        r#"{"seq":1,"segment_id":"s","event_source_id":"e","type":"track","event":"E","userId":"u"}"#,
    ] {
        assert!(FlatEvent::from_feed_row_text(broken).is_err(), "{broken}");
    }
}

#[test]
fn flat_events_keep_each_leaf_at_its_dotted_path() {
    let text = r#"{"type":"identify","userId":"u1","messageId":"m1",
        "context":{"ip":"1.2.3.4","library":{"name":"x","version":null},"empty":{}},
        "traits":{"plan":"pro","address":{"city":"Paris","geo":{"lat":1.5}},"tags":["a",{"b":1}],"gone":null},
        "properties":{"ignored.by.identify":true},
        "integrations":{"All":false},
        "custom":{"k":2},"top":"v","writeKey":"secret","_metadata":{"bundled":["x"]}}"#;
    let f = FlatEvent::from_json_text(text, &opts()).unwrap();
    let of = |s: Section| f.leaves.of(s);
    assert_eq!(
        of(Section::Context),
        [
            ("context.ip".into(), json!("1.2.3.4")),
            ("context.library.name".into(), json!("x"))
        ]
    );
    assert_eq!(
        of(Section::Traits),
        [
            ("plan".into(), json!("pro")),
            ("address.city".into(), json!("Paris")),
            ("address.geo.lat".into(), json!(1.5)),
            ("tags".into(), json!(["a", {"b": 1}])),
        ]
    );
    assert_eq!(
        of(Section::Properties),
        [("ignored.by.identify".into(), json!(true))]
    );
    assert_eq!(
        of(Section::Extra),
        [("custom.k".into(), json!(2)), ("top".into(), json!("v"))]
    );
    assert!(f.leaves.has_dotted_key(Section::Properties));
    assert!(
        !f.leaves.has_dotted_key(Section::Traits) && !f.leaves.has_dotted_key(Section::Context)
    );
    assert!(f.event.traits.is_empty() && f.event.context.is_empty() && f.event.extra.is_empty());
    assert_eq!(f.event.user_id.as_deref(), Some("u1"));
    // A dotted key deep inside an object counts; one inside an array does not.
    let deep =
        r#"{"type":"track","event":"E","userId":"u","properties":{"a":{"b.c":1},"l":[{"d.e":2}]}}"#;
    let f = FlatEvent::from_json_text(deep, &opts()).unwrap();
    assert!(f.leaves.has_dotted_key(Section::Properties));
    let f = FlatEvent::from_json_text(
        r#"{"type":"track","event":"E","userId":"u","properties":{"l":[{"d.e":2}]}}"#,
        &opts(),
    )
    .unwrap();
    assert!(!f.leaves.has_dotted_key(Section::Properties));
}

/// Each key is kept once: a message's leaves take memory in proportion to its text, however
/// long the keys above them.
#[test]
fn flat_leaves_keep_each_key_once() {
    let long = "k".repeat(16_000);
    let inner: serde_json::Map<String, Value> =
        (0..1_800).map(|i| (format!("{i:x}"), json!(1))).collect();
    let msg =
        json!({"type": "track", "event": "E", "userId": "u", "properties": {long.clone(): inner}});
    let text = msg.to_string();
    assert!(text.len() <= 32 * 1024);
    let f = FlatEvent::from_json_text(&text, &opts()).unwrap();
    assert!(
        f.leaves.key_bytes() <= text.len(),
        "{} bytes of keys for a {}-byte message",
        f.leaves.key_bytes(),
        text.len()
    );
    let props = f.leaves.of(Section::Properties);
    assert_eq!(props.len(), 1_800);
    assert_eq!(props[5].0, format!("{long}.5"));
}

#[test]
fn flat_reads_refuse_what_the_model_refuses() {
    let identify = json!({"type": "identify", "userId": "u", "traits": {"a": 1}, "sentAt": 5});
    let err = FlatEvent::from_json_text(&identify.to_string(), &opts()).unwrap_err();
    assert_eq!(err, Event::from_json(&identify, None, &opts()).unwrap_err());
    assert_eq!(err.field, "sentAt");
    // With another fault too, the same one is reported first.
    let mut both = identify.clone();
    both["timestamp"] = json!("yesterday");
    assert_eq!(
        FlatEvent::from_json_text(&both.to_string(), &opts()).unwrap_err(),
        Event::from_json(&both, None, &opts()).unwrap_err()
    );
    for bad in [
        r#"{"type":"track","event":"E","userId":"u","context":"x"}"#,
        r#"{"type":"track","event":"E","userId":"u","integrations":[1]}"#,
        r#"{"type":"track","userId":"u"}"#,
    ] {
        let v: Value = serde_json::from_str(bad).unwrap();
        assert_eq!(
            FlatEvent::from_json_text(bad, &opts()).unwrap_err(),
            Event::from_json(&v, None, &opts()).unwrap_err(),
            "{bad}"
        );
    }
    assert_eq!(
        FlatEvent::from_json_text("[1]", &opts()).unwrap_err().field,
        "message"
    );
    assert!(
        FlatEvent::from_json_text(r#"{"type":"track","event":"E","userId":"u"} x"#, &opts())
            .is_err()
    );
}

#[test]
fn flat_reads_of_sample_traffic_equal_the_flattened_events() {
    let o = ParseOptions {
        trust_received_at: true,
        ..opts()
    };
    for m in crate::sample::SampleGenerator::new(5, 40, 1_767_225_600).flatten() {
        let e = Event::from_json(&m, None, &o).unwrap();
        let flat = FlatEvent::from_json_text(&e.to_json_string(), &o).unwrap();
        assert_eq!(flat, FlatEvent::from_event(e));
    }
}

#[test]
fn parsing_the_text_reads_escaped_keys_drops_the_write_key_and_keeps_the_last_duplicate() {
    let text = r#"{"type":"track","\u0075serId":"u1","event":"A","event":"B","writeKey":"secret","x\"y":1,"z":{"k":2}}"#;
    let e = Event::from_json_text(text, None, &opts()).unwrap();
    assert_eq!(e.user_id.as_deref(), Some("u1"));
    assert_eq!(e.event.as_deref(), Some("B"));
    assert_eq!(
        Value::Object(e.extra.clone()),
        json!({"x\"y": 1, "z": {"k": 2}})
    );
    let v: Value = serde_json::from_str(text).unwrap();
    let mut from_value = Event::from_json(&v, None, &opts()).unwrap();
    from_value.message_id = e.message_id.clone();
    assert_eq!(from_value, e);
    let err = Event::from_json_text("[1]", None, &opts()).unwrap_err();
    assert_eq!(err.field, "message");
    assert!(Event::from_json_text("{\"type\": \"track\"} x", None, &opts()).is_err());
}

#[test]
fn canonical_text_equals_the_canonical_value_for_sample_traffic() {
    let o = ParseOptions {
        trust_received_at: true,
        ..opts()
    };
    let mut extra = serde_json::Map::new();
    extra.insert("userId".into(), serde_json::json!("shadowed"));
    for m in crate::sample::SampleGenerator::new(5, 40, 1_767_225_600).flatten() {
        let mut e = Event::from_json(&m, None, &o).unwrap();
        assert_eq!(e.to_json_string(), e.to_json().to_string());
        // A hand-built event whose extra repeats a spec key keeps the typed field.
        e.extra = extra.clone();
        assert_eq!(e.to_json_string(), e.to_json().to_string());
    }
}

/// `[]` reads as an empty object for `context`, `integrations`, `traits` and `properties` (PHP's
/// `json_encode` writes an empty array so: analytics-php sends a user's `'integrations' => []`
/// as it is), in the model and in a flat read alike; any other array is still refused.
#[test]
fn an_empty_array_is_an_empty_object() {
    let text = r#"{"type":"track","event":"E","userId":"u","context":[],"integrations":[],"properties":[]}"#;
    let v: Value = serde_json::from_str(text).unwrap();
    let e = parse(v).expect("empty arrays accepted");
    assert!(e.context.is_empty() && e.integrations.is_empty() && e.properties.is_empty());
    let flat = FlatEvent::from_json_text(text, &opts()).expect("flat read");
    assert!(flat.leaves.of(Section::Properties).is_empty());
    let identify = json!({"type": "identify", "userId": "u", "traits": []});
    assert!(parse(identify).expect("traits []").traits.is_empty());
    for (field, bad) in [
        (
            "integrations",
            json!({"type": "track", "event": "E", "userId": "u", "integrations": [1]}),
        ),
        (
            "properties",
            json!({"type": "track", "event": "E", "userId": "u", "properties": [{}]}),
        ),
    ] {
        assert_eq!(field_of(bad), field);
    }
}

/// A number where Segment's API takes text — `messageId` (a hand-written client's counter), a
/// page's `name` or `category` (`404`) — is its decimal text, as the ids are; a value of
/// another type is still refused.
#[test]
fn numbers_are_taken_as_text_for_message_ids_and_page_names() {
    let e = parse(
        json!({"type": "page", "userId": "u", "messageId": 12345, "name": 404, "category": 7.5}),
    )
    .expect("numbers accepted");
    assert_eq!(
        (
            e.message_id.as_str(),
            e.name.as_deref(),
            e.category.as_deref()
        ),
        ("12345", Some("404"), Some("7.5"))
    );
    for field in ["messageId", "name", "category"] {
        let mut bad = json!({"type": "page", "userId": "u"});
        bad[field] = json!({"x": 1});
        assert_eq!(field_of(bad), field);
    }
}
