//! The Tracking API and the feed API over real HTTP: every error path, and what gets stored.

mod support;

use std::io::Write;

use profiles_sync::identity::Rules;
use profiles_sync::store::{self, EventFilter, Feed, FeedRow};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::engine::{
    BROWSER_WRITE_KEY, FEED_TOKEN, Options, SOURCE_ID, TestEngine, WRITE_KEY, metrics, start,
    start_options, start_with,
};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// A GET's status and text.
async fn get(base: &str, path: &str) -> (StatusCode, String) {
    let r = client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.text().await.unwrap_or_default())
}

/// Sends a track call on a task of its own (its answer may wait on the store); the task yields
/// the status and body.
fn track_in_background(base: &str, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let base = base.to_string();
    tokio::spawn(async move { post(&base, "/v1/track", &body).await })
}

async fn post(base: &str, path: &str, body: &Value) -> (StatusCode, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(body)
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Asserts that the store holds exactly the events with these messageIds.
fn assert_stored_exactly(url: &str, mut acknowledged: Vec<String>) {
    acknowledged.sort();
    let mut stored: Vec<String> = stored(url)
        .into_iter()
        .map(|r| r.event.message_id)
        .collect();
    stored.sort();
    assert_eq!(
        stored, acknowledged,
        "exactly the acknowledged requests are stored"
    );
}

fn stored(url: &str) -> Vec<profiles_sync::store::EventRow> {
    let mut s = store::open(url, Rules::default()).unwrap();
    s.read_feed(&Feed::Events(EventFilter::All), 0, 100_000)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            FeedRow::Event(e) => e,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn every_call_type_is_accepted_and_stored_with_its_source() {
    let t = start(8).await;
    let calls = [
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"email": "a@example.com"}}),
        ),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "Order Completed", "properties": {"total": 3}}),
        ),
        ("/v1/page", json!({"anonymousId": "a1", "name": "Home"})),
        ("/v1/screen", json!({"userId": "u1", "name": "Settings"})),
        (
            "/v1/group",
            json!({"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}}),
        ),
        ("/v1/alias", json!({"userId": "u1", "previousId": "a1"})),
        ("/v1/t", json!({"userId": "u1", "event": "Short Path"})),
    ];
    for (path, body) in &calls {
        let (status, reply) = post(&t.base, path, body).await;
        assert_eq!(status, StatusCode::OK, "{path}: {reply}");
        assert_eq!(reply, json!({"success": true}));
    }
    let events = stored(&t.store_url);
    assert_eq!(events.len(), calls.len());
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "identify", "track", "page", "screen", "group", "alias", "track"
        ]
    );
    assert!(events.iter().all(|e| e.event.source_id == SOURCE_ID));
    assert!(events.iter().all(|e| e.segment_id.starts_with("use_")));
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn write_key_in_the_body_and_batches_work() {
    let t = start(8).await;
    let body = json!({
        "writeKey": WRITE_KEY,
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "messageId": "b1"},
            {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}, "messageId": "b2"}
        ],
        "context": {"library": {"name": "test"}}
    });
    let r = client()
        .post(format!("{}/v1/batch", t.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let events = stored(&t.store_url);
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0].event.context["library"]["name"], "test",
        "batch context applies to each message"
    );
    assert!(
        !events[0].event.to_json().to_string().contains(WRITE_KEY),
        "the write key must not be stored"
    );
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn missing_or_unknown_write_keys_get_401_and_store_nothing() {
    let t = start(8).await;
    let r = client()
        .post(format!("{}/v1/track", t.base))
        .json(&json!({"userId": "u1", "event": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing write key")),
        "{reply}"
    );
    let r = client()
        .post(format!("{}/v1/track", t.base))
        .basic_auth("wrong", Some(""))
        .json(&json!({"userId": "u1", "event": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(stored(&t.store_url).is_empty());
    t.engine.stop().await.unwrap();
}

/// A message of a batch that the identity rules refuse (its only identifier blocked) is left
/// out and the batch's others are stored: the 200 lists it under `skipped`, and
/// `events_rejected_total{reason="identity_rules"}` counts it.
#[tokio::test]
async fn a_batch_stores_its_messages_but_those_the_identity_rules_refuse() {
    let t = start(8).await;
    let (status, reply) = post(
        &t.base,
        "/v1/batch",
        &json!({"batch": [
            {"type": "track", "userId": "u1", "event": "A"},
            {"type": "page", "anonymousId": "anonymous"},
            {"type": "track", "userId": "u2", "event": "B"}
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(
        (
            reply["skipped"][0]["index"].clone(),
            reply["skipped"][0]["field"].clone()
        ),
        (json!(1), json!("anonymousId")),
        "{reply}"
    );
    assert_eq!(
        reply["skipped"].as_array().map(Vec::len),
        Some(1),
        "{reply}"
    );
    assert_eq!(reply["skippedCount"], 1, "{reply}");
    let users: Vec<Option<String>> = stored(&t.store_url)
        .into_iter()
        .map(|e| e.event.user_id)
        .collect();
    assert_eq!(users, [Some("u1".to_string()), Some("u2".to_string())]);
    let text = metrics(&t.base).await.unwrap();
    assert!(
        text.lines().any(
            |l| l == r#"profiles_sync_engine_events_rejected_total{reason="identity_rules"} 1"#
        ),
        "{text}"
    );
    // A clean batch's answer is as before.
    let (status, reply) = post(
        &t.base,
        "/v1/batch",
        &json!({"batch": [{"type": "track", "userId": "u3", "event": "C"}]}),
    )
    .await;
    assert_eq!((status, reply), (StatusCode::OK, json!({"success": true})));
    // Alone, such a message is refused (nothing of the request stored), and counted the same.
    let (status, reply) = post(&t.base, "/v1/page", &json!({"anonymousId": "anonymous"})).await;
    assert_eq!(
        (status, reply["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("anonymousId"))
    );
    let text = metrics(&t.base).await.unwrap();
    assert!(
        text.lines().any(
            |l| l == r#"profiles_sync_engine_events_rejected_total{reason="identity_rules"} 2"#
        ),
        "{text}"
    );
    assert_eq!(stored(&t.store_url).len(), 3);
    // Many left out: the first 100 are listed, all counted.
    let mut batch: Vec<Value> = (0..150)
        .map(|_| json!({"type": "page", "anonymousId": "anonymous"}))
        .collect();
    batch.push(json!({"type": "page", "anonymousId": "a-150"}));
    let (status, reply) = post(&t.base, "/v1/batch", &json!({ "batch": batch })).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["skippedCount"], 150);
    assert_eq!(reply["skipped"].as_array().map(Vec::len), Some(100));
    assert_eq!(reply["skipped"][99]["index"], 99);
    assert_eq!(stored(&t.store_url).len(), 4);
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_400_naming_the_field_and_stores_nothing() {
    let t = start(8).await;
    let cases = [
        ("/v1/track", json!({"event": "A"}), "userId"),
        ("/v1/track", json!({"userId": "u1"}), "event"),
        ("/v1/group", json!({"userId": "u1"}), "groupId"),
        ("/v1/alias", json!({"userId": "u1"}), "previousId"),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "A", "properties": 5}),
            "properties",
        ),
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": "x"}),
            "traits",
        ),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "A", "timestamp": "yesterday"}),
            "timestamp",
        ),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "A", "sentAt": 12}),
            "sentAt",
        ),
        (
            "/v1/page",
            json!({"anonymousId": "anonymous"}),
            "anonymousId",
        ),
    ];
    for (path, body, field) in cases {
        let (status, reply) = post(&t.base, path, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        assert_eq!(reply["field"], field, "{body}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().starts_with(field),
            "{reply}"
        );
        // Segment's `code` and `message`, which its SDKs read (review: the Python SDK up to
        // 2.3 resent a refused batch ten times without them).
        assert_eq!(reply["code"], "invalid_field", "{reply}");
        assert_eq!(reply["message"], reply["error"], "{reply}");
    }
    let r = post_malformed(&t.base).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("malformed JSON"));

    // One bad message fails the whole batch, and the error names its index.
    let (status, reply) = post(
        &t.base,
        "/v1/batch",
        &json!({"batch": [
            {"type": "track", "userId": "u1", "event": "A"},
            {"type": "track", "userId": "u1", "event": "B"},
            {"type": "track", "userId": "u1"}
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        (reply["index"].clone(), reply["field"].clone()),
        (json!(2), json!("event"))
    );
    let (status, reply) = post(
        &t.base,
        "/v1/batch",
        &json!({"batch": [{"type": "nope", "userId": "u"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reply["field"], "type");
    let (status, reply) = post(&t.base, "/v1/batch", &json!({"messages": []})).await;
    assert_eq!(
        (status, reply["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("batch"))
    );
    assert!(
        stored(&t.store_url).is_empty(),
        "nothing from a rejected request may be stored"
    );
    t.engine.stop().await.unwrap();
}

/// Half of an emoji (a lone surrogate escape, as `JSON.stringify` writes a JavaScript string cut
/// between the two halves) is valid JSON: the event is stored with U+FFFD in its place, and the
/// rest of the batch with it. It used to refuse the whole batch as malformed JSON, which
/// analytics.js does not retry (review).
#[tokio::test]
async fn a_lone_surrogate_escape_is_read_as_the_replacement_character() {
    let t = start(8).await;
    let body = format!(
        r#"{{"writeKey":"{WRITE_KEY}","batch":[
            {{"type":"page","anonymousId":"a1","messageId":"m1","name":"Home"}},
            {{"type":"track","anonymousId":"a1","messageId":"m2","event":"Search","properties":{{"query":"caf\u00e9 \ud83d","emoji":"\ud83d\ude00"}}}}
        ]}}"#
    );
    let r = client()
        .post(format!("{}/v1/b", t.base))
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let reply = r.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_stored_exactly(&t.store_url, vec!["m1".into(), "m2".into()]);
    let stored = stored(&t.store_url);
    assert_eq!(stored[1].event.properties["query"], "café \u{fffd}");
    assert_eq!(stored[1].event.properties["emoji"], "\u{1f600}");
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn size_limits_name_the_limit() {
    let t = start(8).await;
    let big = "x".repeat(33 * 1024);
    let (status, reply) = post(
        &t.base,
        "/v1/track",
        &json!({"userId": "u1", "event": "A", "properties": {"blob": big}}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        reply["error"].as_str().unwrap().contains("32 KB"),
        "{reply}"
    );
    assert_eq!(
        (&reply["code"], &reply["message"]),
        (&json!("too_large"), &reply["error"])
    );
    let (status, reply) = post(
        &t.base,
        "/v1/batch",
        &json!({"batch": [{"type": "track", "userId": "u1", "event": "A"}, {"type": "track", "userId": "u1", "event": "A", "properties": {"blob": big}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reply["index"], 1);
    assert!(reply["error"].as_str().unwrap().contains("32 KB"));
    let many: Vec<Value> = (0..20)
        .map(|i| json!({"type": "track", "userId": "u1", "event": "A", "properties": {"blob": "y".repeat(30 * 1024), "i": i}}))
        .collect();
    let r = client()
        .post(format!("{}/v1/batch", t.base))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"batch": many}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The rest of the body is left unread, so the connection is closed, and the answer says so.
    assert_eq!(
        r.headers().get("connection").and_then(|v| v.to_str().ok()),
        Some("close")
    );
    let reply: Value = r.json().await.unwrap();
    assert!(
        reply["error"].as_str().unwrap().contains("500 KB"),
        "{reply}"
    );
    assert!(stored(&t.store_url).is_empty());
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn gzip_bodies_are_accepted_and_bombs_refused() {
    let t = start(8).await;
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let body = json!({"batch": [{"type": "track", "userId": "u1", "event": "Zipped"}]}).to_string();
    let r = client()
        .post(format!("{}/v1/batch", t.base))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gz(body.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // 10 MB of zeros compresses to ~10 KB; inflating it must stop at the batch limit.
    let bomb = gz(&vec![b' '; 10 * 1024 * 1024]);
    let r = client()
        .post(format!("{}/v1/batch", t.base))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(stored(&t.store_url).len(), 1);
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn server_time_clock_skew_and_duplicates() {
    let t = start(8).await;
    let before = jiff::Timestamp::now();
    // The client's clock is 10 minutes fast: it stamped the event 2 s before sending it.
    let body = json!({"userId": "u1", "event": "A", "messageId": "same",
        "timestamp": "2030-01-01T00:09:58Z", "sentAt": "2030-01-01T00:10:00Z",
        "receivedAt": "1999-01-01T00:00:00Z"});
    assert_eq!(post(&t.base, "/v1/track", &body).await.0, StatusCode::OK);
    assert_eq!(
        post(&t.base, "/v1/track", &body).await.0,
        StatusCode::OK,
        "a retry is acknowledged"
    );
    let after = jiff::Timestamp::now();
    let events = stored(&t.store_url);
    assert_eq!(events.len(), 1, "the same messageId is stored once");
    let e = &events[0].event;
    assert!(
        e.received_at >= before && e.received_at <= after,
        "receivedAt is set by the server"
    );
    let skew = e.received_at.as_millisecond() - e.timestamp.as_millisecond();
    assert_eq!(
        skew, 2000,
        "timestamp = receivedAt - (sentAt - originalTimestamp)"
    );
    // A message without messageId gets one.
    assert_eq!(
        post(&t.base, "/v1/track", &json!({"userId": "u1", "event": "B"}))
            .await
            .0,
        StatusCode::OK
    );
    let events = stored(&t.store_url);
    assert!(!events[1].event.message_id.is_empty());
    t.engine.stop().await.unwrap();
}

/// A client-side source (`fillContextIp`) gets `context.ip` filled in from the request, as
/// Segment does for analytics.js and the mobile SDKs: from `X-Forwarded-For` behind a proxy,
/// else from the connection. An address the message or its batch carries is kept; a
/// server-side source's messages, a client a proxy hid, and `/v1/import` get none.
#[tokio::test]
async fn a_client_side_source_s_messages_get_the_sender_s_address() {
    let t = start(8).await;
    let send = |key: &'static str, forwarded_for: Option<&'static str>, path, body: Value| {
        let url = format!("{}{path}", t.base);
        async move {
            let mut r = client().post(url).basic_auth(key, Some("")).json(&body);
            if let Some(f) = forwarded_for {
                r = r.header("X-Forwarded-For", f);
            }
            let r = r.send().await.expect("request");
            assert_eq!(r.status(), StatusCode::OK, "{body}");
        }
    };
    let track = |id: &str, context: Value| json!({"userId": "u1", "event": "A", "messageId": id, "context": context});
    send(
        BROWSER_WRITE_KEY,
        None,
        "/v1/track",
        track("direct", json!({})),
    )
    .await;
    // The header's leftmost address: the client, as the proxies in front report it.
    let forwarded = Some("2001:db8::7, 10.0.0.1");
    send(
        BROWSER_WRITE_KEY,
        forwarded,
        "/v1/track",
        track("proxied", json!({})),
    )
    .await;
    let own = json!({"ip": "198.51.100.7", "locale": "nl-NL"});
    send(BROWSER_WRITE_KEY, forwarded, "/v1/track", track("own", own)).await;
    let null_ip = track("null", json!({"ip": null}));
    send(BROWSER_WRITE_KEY, None, "/v1/track", null_ip).await;
    let batch = json!({"context": {"ip": "192.0.2.1"}, "batch": [
        {"type": "track", "userId": "u1", "event": "A", "messageId": "batch-shared"},
        {"type": "track", "userId": "u1", "event": "A", "messageId": "batch-own",
         "context": {"ip": "192.0.2.2"}},
    ]});
    send(BROWSER_WRITE_KEY, forwarded, "/v1/batch", batch).await;
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "a1", "messageId": "batch-none"},
    ]});
    send(BROWSER_WRITE_KEY, Some("203.0.113.5"), "/v1/batch", batch).await;
    send(
        WRITE_KEY,
        forwarded,
        "/v1/track",
        track("server", json!({})),
    )
    .await;
    // A proxy that hid the client: neither it nor the peer is the client.
    let hidden = Some("unknown, 10.0.0.1");
    send(
        BROWSER_WRITE_KEY,
        hidden,
        "/v1/track",
        track("hidden", json!({})),
    )
    .await;
    // Historical events were not sent from where the importer is.
    let import = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "A", "messageId": "imported",
         "timestamp": "2024-01-01T00:00:00Z"},
    ]});
    send(BROWSER_WRITE_KEY, forwarded, "/v1/import", import).await;

    let ips: std::collections::BTreeMap<String, Option<Value>> = stored(&t.store_url)
        .into_iter()
        .map(|r| (r.event.message_id, r.event.context.get("ip").cloned()))
        .collect();
    let expected: std::collections::BTreeMap<String, Option<Value>> = [
        ("direct", Some(json!("127.0.0.1"))),
        ("proxied", Some(json!("2001:db8::7"))),
        ("own", Some(json!("198.51.100.7"))),
        ("null", Some(json!("127.0.0.1"))),
        ("batch-shared", Some(json!("192.0.2.1"))),
        ("batch-own", Some(json!("192.0.2.2"))),
        ("batch-none", Some(json!("203.0.113.5"))),
        ("server", None),
        ("hidden", None),
        ("imported", None),
    ]
    .into_iter()
    .map(|(id, ip)| (id.to_string(), ip))
    .collect();
    assert_eq!(ips, expected);
    t.engine.stop().await.unwrap();
}

/// The status of a feed request sent without the token.
async fn feed_without_token(base: &str) -> StatusCode {
    client()
        .get(format!("{base}/v1/feeds/tracks"))
        .send()
        .await
        .unwrap()
        .status()
}

async fn post_ok(base: &str, path: &str, body: &Value) {
    let (status, answer) = post(base, path, body).await;
    assert_eq!(status, StatusCode::OK, "{path}: {answer}");
}

/// One page of a feed: its header line and its rows.
async fn feed_page(base: &str, table: &str, after: i64, limit: usize) -> (Value, Vec<Value>) {
    let text = client()
        .get(format!(
            "{base}/v1/feeds/{table}?after={after}&limit={limit}"
        ))
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    (
        header,
        lines.map(|l| serde_json::from_str(l).unwrap()).collect(),
    )
}

/// The feed catalog (`GET /v1/feeds`).
async fn catalog(base: &str) -> Value {
    client()
        .get(format!("{base}/v1/feeds"))
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_feed_api_needs_the_token_and_pages_in_order() {
    let t = start(8).await;
    for i in 0..5 {
        post(&t.base, "/v1/track", &json!({"userId": format!("u{i}"), "event": "Order Completed", "messageId": format!("m{i}")})).await;
    }
    assert_eq!(feed_without_token(&t.base).await, StatusCode::UNAUTHORIZED);
    let r = client()
        .get(format!("{}/v1/feeds/tracks", t.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A query string that does not parse: 401 without the token, then a JSON 400 naming it.
    for (path, token) in [
        ("/v1/feeds/tracks?after=abc", None),
        ("/v1/feeds/tracks?after=abc", Some(FEED_TOKEN)),
        ("/v1/feeds/tracks?limit=-1", Some(FEED_TOKEN)),
        ("/v1/feeds?since=1", Some(FEED_TOKEN)),
    ] {
        let mut req = client().get(format!("{}{path}", t.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        if token.is_none() {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            continue;
        }
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path}: not JSON: {e}"));
        assert!(body["error"].as_str().is_some(), "{path}: {body}");
    }

    let catalog = catalog(&t.base).await;
    assert_eq!(
        catalog["trackEvents"],
        json!([{"event": "Order Completed", "table": "order_completed"}])
    );
    // The store's id, which the sync records in the warehouse.
    let id = store::open(&t.store_url, Rules::default())
        .unwrap()
        .store_id()
        .unwrap();
    assert_eq!(catalog["storeId"], json!(id));

    let mut after = 0;
    let mut ids = vec![];
    loop {
        let (header, rows) = feed_page(&t.base, "order_completed", after, 2).await;
        assert!(header["count"].as_u64().unwrap() <= 2);
        if header["count"] == 0 {
            break;
        }
        assert!(
            header["columns"]
                .as_array()
                .unwrap()
                .contains(&json!("segment_id"))
        );
        for row in rows {
            ids.push(row["messageId"].as_str().unwrap().to_string());
        }
        after = header["next_after"].as_i64().unwrap();
    }
    assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4"]);
    let r = client()
        .get(format!("{}/v1/feeds/no_such_table", t.base))
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    t.engine.stop().await.unwrap();
}

/// A current-state table is served by key: pages of any size, followed by `next_after_key`,
/// give every row once; a seq cursor on it, a key cursor on a change log, or a key of the wrong
/// shape is a 400 that says what to send.
#[tokio::test]
async fn current_state_tables_are_served_by_key() {
    let t = start(8).await;
    // Three profiles, then one email on each: two merges into the oldest.
    for anon in ["a1", "a2", "a3"] {
        post(
            &t.base,
            "/v1/page",
            &json!({"anonymousId": anon, "messageId": format!("p{anon}")}),
        )
        .await;
    }
    for (i, anon) in ["a1", "a2", "a3"].iter().enumerate() {
        post(
            &t.base,
            "/v1/identify",
            &json!({"anonymousId": anon, "messageId": format!("i{i}"),
             "traits": {"email": "same@example.com", "n": i}}),
        )
        .await;
    }
    let catalog = catalog(&t.base).await;
    assert_eq!(
        catalog["stateTables"],
        json!(["user_identifiers", "user_traits", "profile_merges"])
    );
    let get = |query: String| {
        let base = t.base.clone();
        async move {
            let r = client()
                .get(format!("{base}/v1/feeds/{query}"))
                .bearer_auth(FEED_TOKEN)
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let mut seen = std::collections::BTreeMap::new();
    for table in ["user_identifiers", "user_traits", "profile_merges"] {
        let mut rows = vec![];
        let mut query = format!("{table}?limit=1");
        loop {
            let (status, text) = get(query.clone()).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            let mut lines = text.lines();
            let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
            assert_eq!(header["table"], table);
            let columns: Vec<String> = serde_json::from_value(header["columns"].clone()).unwrap();
            for line in lines {
                let row: Value = serde_json::from_str(line).unwrap();
                let keys: Vec<&String> = row.as_object().unwrap().keys().collect();
                assert!(keys.iter().all(|k| columns.contains(k)), "{table}: {row}");
                rows.push(row);
            }
            if header["more"] == false {
                break;
            }
            let key = header["next_after_key"].to_string();
            query = format!("{table}?limit=1&after_key={}", urlencode(&key));
            assert!(rows.len() < 50, "{table} never ends");
        }
        seen.insert(table, rows);
    }
    // Three anonymous ids, one email: one live profile, two merged into it.
    let live: std::collections::HashSet<&str> = seen["user_identifiers"]
        .iter()
        .map(|r| r["canonical_segment_id"].as_str().unwrap())
        .collect();
    assert_eq!(live.len(), 1, "{:?}", seen["user_identifiers"]);
    assert_eq!(
        seen["user_identifiers"].len(),
        4,
        "a1, a2, a3 and the email"
    );
    // One row per profile: the live one maps to itself, the two merged ones to it.
    assert_eq!(seen["profile_merges"].len(), 3);
    assert!(
        seen["profile_merges"]
            .iter()
            .all(|r| live.contains(r["canonical_segment_id"].as_str().unwrap())),
        "{:?}",
        seen["profile_merges"]
    );
    let traits: Vec<(&str, &Value)> = seen["user_traits"]
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), &r["value"]))
        .collect();
    assert_eq!(
        traits,
        [("email", &json!("same@example.com")), ("n", &json!(2))]
    );

    for (query, says) in [
        ("user_traits?after=3", "read by after_key"),
        (
            "tracks?after_key=%5B%22x%22%5D",
            "after_key is for the current-state tables",
        ),
        ("user_traits?after_key=nope", "JSON array of strings"),
        ("user_identifiers?after_key=%5B%22x%22%5D", "[type, value]"),
    ] {
        let (status, text) = get(query.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {text}");
        assert!(text.contains(says), "{query}: {text}");
    }
    t.engine.stop().await.unwrap();
}

/// Percent-encodes a query value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Top-level keys named like the feed row's own fields (`seq`, `segment_id`,
/// `event_source_id`) are the client's data, not the row's: they never move a reader's cursor
/// nor re-attribute the event.
#[tokio::test]
async fn event_keys_named_like_feed_fields_cannot_rewrite_feed_rows() {
    let t = start(8).await;
    for (i, seq) in [json!(0), json!(i64::MAX), json!("x")]
        .into_iter()
        .enumerate()
    {
        post_ok(
            &t.base,
            "/v1/track",
            &json!({"userId": "u1", "event": "B", "messageId": format!("m{i}"), "seq": seq,
                    "segment_id": "use_spoofed", "event_source_id": "other"}),
        )
        .await;
    }
    let stored = stored(&t.store_url);
    let (header, rows) = feed_page(&t.base, "events", 0, 10).await;
    assert_eq!(rows.len(), 3);
    for (row, s) in rows.iter().zip(&stored) {
        assert_eq!(row["seq"], json!(s.seq), "{row}");
        assert_eq!(row["segment_id"], json!(s.segment_id), "{row}");
        assert_eq!(row["event_source_id"], json!(s.event.source_id), "{row}");
        assert_ne!(row["segment_id"], json!("use_spoofed"));
    }
    assert_eq!(header["next_after"], json!(stored[2].seq));
    t.engine.stop().await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let t = start(8).await;
    assert_eq!(
        client()
            .get(format!("{}/healthz", t.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        client()
            .get(format!("{}/readyz", t.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    post(&t.base, "/v1/track", &json!({"userId": "u1", "event": "A"})).await;
    post(&t.base, "/v1/track", &json!({"event": "A"})).await;
    // A refused batch counts each of its events.
    let (status, _) = post(
        &t.base,
        "/v1/batch",
        &json!({"batch": [{"type": "track", "userId": "u1", "event": "A"},
                          {"type": "track", "event": "A"},
                          {"type": "track", "userId": "u2", "event": "A"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Feed API requests count too: one without the token, one with it.
    assert_eq!(feed_without_token(&t.base).await, StatusCode::UNAUTHORIZED);
    catalog(&t.base).await;
    let text = metrics(&t.base).await.unwrap();
    assert!(
        text.contains(
            "profiles_sync_engine_http_requests_total{endpoint=\"track\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "profiles_sync_engine_http_requests_total{endpoint=\"track\",status=\"400\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("profiles_sync_engine_events_accepted_total 1"),
        "{text}"
    );
    assert!(
        text.contains("profiles_sync_engine_events_rejected_total{reason=\"invalid_field\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("profiles_sync_engine_profiles_created_total 1"),
        "{text}"
    );
    for counted in [
        "http_requests_total{endpoint=\"feed_page\",status=\"401\"} 1",
        "http_requests_total{endpoint=\"feeds\",status=\"200\"} 1",
        // Resolution and commit each have their histogram, one observation per committed group.
        "resolve_seconds_count 1",
        "commit_seconds_count 1",
    ] {
        assert!(
            text.contains(&format!("profiles_sync_engine_{counted}")),
            "{counted}: {text}"
        );
    }
    t.engine.stop().await.unwrap();
}

/// A track call whose body is not JSON.
async fn post_malformed(base: &str) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap()
}

/// Takes the store's write lock from outside (until the connection rolls back or drops), so the
/// engine's writer blocks and its queue fills.
fn lock_store(path: &std::path::Path) -> rusqlite::Connection {
    let blocker = rusqlite::Connection::open(path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    blocker
}

/// Sends `n` track calls at once (messageIds `{prefix}0`, `{prefix}1`, …); each task yields its
/// index, status and Retry-After.
fn send_tracks(
    base: &str,
    prefix: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(usize, StatusCode, Option<reqwest::header::HeaderValue>)>> {
    (0..n)
        .map(|i| {
            let (url, id) = (format!("{base}/v1/track"), format!("{prefix}{i}"));
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({"userId": "u1", "event": "A", "messageId": id}))
                    .send()
                    .await
                    .unwrap();
                (i, r.status(), r.headers().get("retry-after").cloned())
            })
        })
        .collect()
}

/// Yields until at least `n` of `tasks` have finished; fails with `what` if that never happens
/// (a bounded number of turns, not a timer).
async fn until_finished<'a, T: 'a>(
    tasks: impl Iterator<Item = &'a tokio::task::JoinHandle<T>> + Clone,
    n: usize,
    what: &str,
) {
    let mut spins = 0u64;
    while tasks.clone().filter(|t| t.is_finished()).count() < n {
        spins += 1;
        assert!(spins < 50_000_000, "{what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn overload_answers_503_with_retry_after_and_loses_nothing_acknowledged() {
    let t = start(1).await;
    // Hold the store's write lock from outside so the writer blocks and the queue fills.
    let blocker = lock_store(&t.store_path);
    let tasks = send_tracks(&t.base, "o", 6);
    // The writer holds at most one request and the queue one more: at least four of the six
    // must be answered while the store stays locked. Wait for exactly that (bounded).
    until_finished(
        tasks.iter(),
        4,
        "requests were neither queued nor turned away",
    )
    .await;
    let mut rejected = vec![];
    let mut pending = vec![];
    for task in tasks {
        if task.is_finished() {
            let (i, status, retry) = task.await.unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "request {i}");
            assert_eq!(
                retry.as_ref().and_then(|v| v.to_str().ok()),
                Some("1"),
                "503 without Retry-After"
            );
            rejected.push(i);
        } else {
            pending.push(task);
        }
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    let mut ok = vec![];
    for task in pending {
        let (i, status, _) = task.await.unwrap();
        if status == StatusCode::OK {
            ok.push(i);
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            rejected.push(i);
        }
    }
    assert!(
        rejected.len() >= 4,
        "nothing was turned away under overload"
    );
    assert!(!ok.is_empty(), "the queued request was lost");
    assert!(
        ok.len() <= 2,
        "more requests were accepted than the writer and queue hold: {ok:?}"
    );
    let stored_ids: Vec<String> = stored(&t.store_url)
        .into_iter()
        .map(|e| e.event.message_id)
        .collect();
    let mut expected: Vec<String> = ok.iter().map(|i| format!("o{i}")).collect();
    expected.sort();
    let mut got = stored_ids.clone();
    got.sort();
    assert_eq!(
        got, expected,
        "exactly the acknowledged requests are stored"
    );
    t.engine.stop().await.unwrap();
}

/// The writer's queue holds a bounded number of events, not only of requests: with room for 150
/// events, a second batch of 100 is queued behind the one being written and a third is turned
/// away with Retry-After, though the queue has room for many more requests. Every acknowledged
/// batch is stored, and only those.
#[tokio::test]
async fn the_queue_turns_batches_away_past_its_events_not_only_its_requests() {
    let t = start_options(Options {
        capacity: 64,
        queue_events: 150,
        ..Options::default()
    })
    .await;
    let blocker = lock_store(&t.store_path);
    let batch = |b: usize| {
        let url = format!("{}/v1/batch", t.base);
        let messages: Vec<Value> = (0..100)
            .map(|i| json!({"type": "track", "userId": "u1", "event": "A", "messageId": format!("q{b}-{i}")}))
            .collect();
        tokio::spawn(async move {
            let r = client()
                .post(url)
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!({"batch": messages}))
                .send()
                .await
                .unwrap();
            (b, r.status(), r.headers().get("retry-after").cloned())
        })
    };
    // The first is taken by the writer (blocked on the lock), the second queued.
    let first = batch(0);
    support::eventually(
        "the writer to take the first batch",
        std::time::Duration::from_secs(30),
        async || {
            let running = write_running(&t.base).await;
            (running > 0.0).then_some(()).ok_or(running.to_string())
        },
    )
    .await;
    let second = batch(1);
    queue_depth_reaches(&t.base, 1).await;
    // Answered while the store stays locked (10 s only bounds how long a queue that took it
    // makes this test wait).
    let (_, status, retry) = tokio::time::timeout(std::time::Duration::from_secs(10), batch(2))
        .await
        .expect("the third batch was queued, not turned away")
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.as_ref().and_then(|v| v.to_str().ok()), Some("1"));
    blocker.execute_batch("ROLLBACK").unwrap();
    for task in [first, second] {
        let (b, status, _) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "batch {b}");
    }
    let expected: Vec<String> = (0..2)
        .flat_map(|b| (0..100).map(move |i| format!("q{b}-{i}")))
        .collect();
    assert_stored_exactly(&t.store_url, expected);
    t.engine.stop().await.unwrap();
}

/// A write that does not end (the store locked from outside, as a database server that stopped
/// answering would hold it up) turns `/healthz` and `/readyz` to 503 once it has run past the
/// stall timeout, saying why, so that the kubelet restarts the engine; `/metrics` shows how long
/// it has run. Once the write ends both are 200 again and the request is stored.
#[tokio::test]
async fn a_write_past_the_stall_timeout_turns_healthz_to_503() {
    let t = start_options(Options {
        stall_timeout: std::time::Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    assert_eq!(get(&t.base, "/healthz").await.0, StatusCode::OK);
    let blocker = lock_store(&t.store_path);
    let pending = track_in_background(
        &t.base,
        json!({"userId": "u1", "event": "A", "messageId": "stalled"}),
    );
    // The condition is the passing of the stall timeout itself: poll for it, within a bound
    // well under the store's 30 s busy timeout (which would end the write).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let body = loop {
        let (status, body) = get(&t.base, "/healthz").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break body;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz never reported the stalled write"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(body.contains("stall timeout of 1 s"), "{body}");
    let (status, body) = get(&t.base, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("one write"), "{body}");
    let running = write_running(&t.base).await;
    assert!(running >= 1.0, "write_running_seconds {running}");
    assert!(
        !pending.is_finished(),
        "the write ended while the store was locked"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(pending.await.unwrap().0, StatusCode::OK);
    assert_eq!(get(&t.base, "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(&t.base, "/readyz").await.0, StatusCode::OK);
    assert!(
        metrics(&t.base)
            .await
            .unwrap()
            .contains("profiles_sync_engine_write_running_seconds 0\n")
    );
    assert_stored_exactly(&t.store_url, vec!["stalled".into()]);
    t.engine.stop().await.unwrap();
}

/// The engine's `profiles_sync_engine_write_running_seconds`.
async fn write_running(base: &str) -> f64 {
    let text = metrics(base).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("profiles_sync_engine_write_running_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no write_running_seconds: {text}"))
}

/// A stall timeout of 0 turns the check off: a write blocked for longer than a second (as the
/// write-running gauge shows) leaves `/healthz` and `/readyz` at 200.
#[tokio::test]
async fn a_stall_timeout_of_zero_never_fails_healthz() {
    let t = start_options(Options {
        stall_timeout: std::time::Duration::ZERO,
        ..Options::default()
    })
    .await;
    let blocker = lock_store(&t.store_path);
    let pending = track_in_background(
        &t.base,
        json!({"userId": "u1", "event": "A", "messageId": "blocked"}),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if write_running(&t.base).await >= 1.5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write never ran for 1.5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for path in ["/healthz", "/readyz"] {
        let (status, body) = get(&t.base, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    assert!(!pending.is_finished());
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(pending.await.unwrap().0, StatusCode::OK);
    assert_stored_exactly(&t.store_url, vec!["blocked".into()]);
    t.engine.stop().await.unwrap();
}

/// Once the queue is full (the writer blocked on a locked store), a request is turned away
/// before its body is parsed: even a malformed one gets 503 with Retry-After, not a 400.
#[tokio::test]
async fn a_full_queue_turns_requests_away_before_parsing_them() {
    let t = start(1).await;
    let blocker = lock_store(&t.store_path);
    // (messageId, task) of every track call sent.
    let named = |prefix: &str, tasks: Vec<_>| -> Vec<_> {
        tasks
            .into_iter()
            .enumerate()
            .map(|(i, task)| (format!("{prefix}{i}"), task))
            .collect::<Vec<_>>()
    };
    let mut tasks = named("f", send_tracks(&t.base, "f", 3));
    // Nothing can commit while the store is locked, so the first answer is a 503: the queue was
    // full then.
    until_finished(
        tasks.iter().map(|(_, h)| h),
        1,
        "no request was turned away",
    )
    .await;
    // The queue stays full once the writer holds a request (blocked on the lock) and the queue
    // another; until the writer has taken its one, a malformed request may find room and get
    // its 400 (storing nothing) — then one more track call refills the queue. Only the check
    // before parsing can answer a malformed request 503.
    let mut refills = 0;
    loop {
        let r = post_malformed(&t.base).await;
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
                Some("1")
            );
            break;
        }
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "room in the queue: parsed"
        );
        refills += 1;
        assert!(refills < 50, "the queue never stayed full");
        let prefix = format!("g{refills}-");
        tasks.extend(named(&prefix, send_tracks(&t.base, &prefix, 1)));
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    let mut acknowledged = vec![];
    for (id, task) in tasks {
        let status = task.await.unwrap().1;
        assert!(
            [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
            "{id}: {status}"
        );
        if status == StatusCode::OK {
            acknowledged.push(id);
        }
    }
    // Every held request commits once the lock goes: one or two (the writer's and the queue's),
    // and exactly the acknowledged ones are stored.
    assert!(
        (1..=2).contains(&acknowledged.len()),
        "the held requests commit once the lock goes: {acknowledged:?}"
    );
    assert_stored_exactly(&t.store_url, acknowledged);
    t.engine.stop().await.unwrap();
}

/// Sends the headers and half the body of a one-event batch (messageId `slow-1`), then stalls:
/// returns the connection and the rest of the body.
async fn stall_a_batch(base: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let body = json!({"writeKey": WRITE_KEY, "batch": [{"type": "track", "userId": "slow", "event": "Slow", "messageId": "slow-1"}]}).to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let addr = base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        format!(
            "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    (slow, tail.to_string())
}

/// Sends track calls until the engine turns one away (a stalled request holds its only reading
/// permit); returns the messageIds it accepted and the refusal's `Retry-After`.
async fn track_until_turned_away(base: &str) -> (Vec<String>, Option<String>) {
    let mut acknowledged = vec![];
    loop {
        let id = format!("fast-{}", acknowledged.len());
        let r = client()
            .post(format!("{base}/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u1", "event": "Fast", "messageId": id}))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            let retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            return (acknowledged, retry_after);
        }
        assert_eq!(r.status(), StatusCode::OK);
        acknowledged.push(id);
        assert!(
            acknowledged.len() < 200,
            "a stalled request never held the only reading permit"
        );
    }
}

/// Sends the rest of a stalled request's body; returns the status line of its answer.
async fn finish_stalled(slow: &mut tokio::net::TcpStream, tail: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    slow.write_all(tail.as_bytes()).await.unwrap();
    let mut status_line = String::new();
    tokio::io::BufReader::new(slow)
        .read_line(&mut status_line)
        .await
        .unwrap();
    status_line
}

/// When `stop` returns, every store handle the engine opened is closed — the feed API's idle
/// ones too, which used to close later on another thread: a store file restored in place
/// right after the stop could then be overwritten by their last close, which checkpoints the
/// WAL into the file. On SQLite the last close removes the `-wal` file, so its absence shows
/// that no handle is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_returns_with_every_store_handle_closed() {
    let t = start(8).await;
    post_ok(&t.base, "/v1/track", &json!({"userId": "u1", "event": "A"})).await;
    // A feed read leaves a handle idle in the feed API's pool.
    let (_, rows) = feed_page(&t.base, "events", 0, 10).await;
    assert_eq!(rows.len(), 1);
    let wal = t.store_path.with_extension("db-wal");
    assert!(wal.exists(), "the open store has its WAL");
    t.engine.stop().await.unwrap();
    assert!(!wal.exists(), "a store handle is still open after stop");
}

/// Shutdown finishes a request already in flight: the stalled request is known to be in the
/// handler (it holds the only reading permit, so others are turned away), shutdown starts (the
/// listener closes: new connections are refused), then its body completes — it is answered
/// 200 and stored, and the engine's stop completes after it. Fails if shutdown refused or
/// dropped work it had taken up (a 503, a closed connection, or a lost event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_shutdown_starts_is_finished_and_stored() {
    let t = start_with(8, 1).await;
    let (mut slow, tail) = stall_a_batch(&t.base).await;
    let (mut acknowledged, _) = track_until_turned_away(&t.base).await;
    t.engine.shutdown_sender().send(true).unwrap();
    let addr = t.base.trim_start_matches("http://").to_string();
    let mut tries = 0;
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        tries += 1;
        assert!(
            tries < 100_000,
            "the engine kept accepting connections after shutdown"
        );
        tokio::task::yield_now().await;
    }
    let status_line = finish_stalled(&mut slow, &tail).await;
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    drop(slow);
    t.engine.wait().await.unwrap();
    acknowledged.push("slow-1".into());
    assert_stored_exactly(&t.store_url, acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_reading_capacity_are_turned_away_unparsed() {
    let t = start_with(8, 1).await;
    // A client sends its headers and half of its body, then stalls: its request holds the one
    // reading permit while the engine waits for the rest.
    let (mut slow, tail) = stall_a_batch(&t.base).await;
    // Until the engine has taken up that request, others still get in; once it has, the next
    // one is turned away without its body being parsed.
    let (mut acknowledged, retry_after) = track_until_turned_away(&t.base).await;
    assert_eq!(retry_after.as_deref(), Some("1"));
    // The stalled request completes and releases its permit: the next request gets in.
    let status_line = finish_stalled(&mut slow, &tail).await;
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    acknowledged.push("slow-1".into());
    post_ok(
        &t.base,
        "/v1/track",
        &json!({"userId": "u1", "event": "Fast", "messageId": "after"}),
    )
    .await;
    acknowledged.push("after".into());
    assert_stored_exactly(&t.store_url, acknowledged);
    t.engine.stop().await.unwrap();
}

/// A batch turned away under overload gets its 503 (with `Retry-After`) on a connection that
/// stays usable: the engine takes in and discards the body it will not read before answering.
/// It used to answer while the body was still arriving and then close the connection, without
/// saying so: a client that sent its next request on it (SDKs keep connections alive) got a
/// broken connection instead of an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_turned_away_gets_its_503_on_a_connection_that_stays_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = start_with(8, 1).await;
    let (mut slow, tail) = stall_a_batch(&t.base).await;
    let (mut acknowledged, _) = track_until_turned_away(&t.base).await;
    let addr = t.base.trim_start_matches("http://").to_string();
    let request = |body: &str| {
        format!(
            "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let big: Vec<Value> = (0..1000)
        .map(|i| json!({"type": "track", "userId": "u1", "event": "Big", "messageId": format!("big-{i}"), "properties": {"pad": "x".repeat(200)}}))
        .collect();
    let big = request(&json!({"writeKey": WRITE_KEY, "batch": big}).to_string());
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // The first request arrives in two parts, the second right after it on the same connection.
    let (first, rest) = big.split_at(big.len() / 2);
    conn.write_all(first.as_bytes()).await.unwrap();
    conn.write_all(rest.as_bytes()).await.unwrap();
    let second = request(
        &json!({"writeKey": WRITE_KEY, "batch": [{"type": "track", "userId": "u1", "event": "Small", "messageId": "small-1"}]}).to_string(),
    );
    // A closed connection may refuse this write; the read below says what happened either way.
    let _ = conn.write_all(second.as_bytes()).await;
    // Both are answered 503, in order; a connection closed after the first ends the read early.
    let mut answers = String::new();
    let mut buf = [0u8; 4096];
    while answers.matches("HTTP/1.1 ").count() < 2 || !answers.ends_with('}') {
        match tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answers.push_str(&String::from_utf8_lossy(&buf[..n])),
            other => panic!("the connection ended after {answers:?}: {other:?}"),
        }
    }
    assert_eq!(answers.matches("HTTP/1.1 503").count(), 2, "{answers}");
    assert_eq!(answers.matches("retry-after: 1").count(), 2, "{answers}");
    assert!(!answers.contains("connection: close"), "{answers}");
    let status_line = finish_stalled(&mut slow, &tail).await;
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    acknowledged.push("slow-1".into());
    // Nothing of the refused batches was stored.
    assert_stored_exactly(&t.store_url, acknowledged);
    t.engine.stop().await.unwrap();
}

/// Holds `profiles` locked (`ACCESS EXCLUSIVE`) on a thread and connection of its own, after
/// running `first` on that connection; returns once the lock is held, with the sender that
/// tells the thread to let go and the thread to join.
fn hold_profiles_locked(
    url: &str,
    first: impl FnOnce(&mut ::postgres::Client) + Send + 'static,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let url = url.to_string();
    let blocker = std::thread::spawn(move || {
        let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        first(&mut c);
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("LOCK TABLE profiles IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        locked_tx.send(()).unwrap();
        // Let go when told, or when the test ends without telling.
        let _ = released.recv();
        tx.commit().unwrap();
    });
    locked.recv().unwrap();
    (release, blocker)
}

/// Once the engine waits on the lock on `profiles` (a condition, polled), it must hold no head
/// lock: the other replicas go on writing while it loads.
fn assert_loading_without_the_head_lock(url: &str) {
    let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    let waiting = |c: &mut ::postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let mut tries = 0;
    while waiting(&mut c) == 0 {
        tries += 1;
        assert!(
            tries < 1000,
            "the engine never waited for the lock on profiles"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut tx = c.transaction().unwrap();
    tx.query_one(
        "SELECT head FROM seq_counter WHERE id = 1 FOR UPDATE NOWAIT",
        &[],
    )
    .expect("the engine loads while holding the head lock");
    tx.rollback().unwrap();
}

/// An engine started on a new store whose `profiles` a session holds locked, so that its load
/// waits: the engine, the store's URL, and the lock's release and holder.
async fn start_with_profiles_locked(
    db: &str,
) -> (
    profiles_sync::engine::RunningEngine,
    String,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let url = tokio::task::block_in_place(|| pg.url(&pg.create_database(db)));
    tokio::task::block_in_place(|| drop(store::open(&url, Rules::default()).unwrap()));
    let (release, blocker) = tokio::task::block_in_place(|| hold_profiles_locked(&url, |_| ()));
    let engine = profiles_sync::engine::start(Options::default().config(url.clone()))
        .await
        .unwrap();
    (engine, url, release, blocker)
}

/// While the engine loads its store at start it serves: `/healthz` answers, `/readyz` answers
/// 503 until the load is done (so a long load never outlasts a startup probe, and no traffic is
/// routed to the pod meanwhile), and a request sent meanwhile waits in the queue and is stored
/// once the load is done. The load is held up by a lock on `profiles`, as a long one would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_loading_until_the_store_is_loaded() {
    let (engine, url, release, blocker) = start_with_profiles_locked("loading").await;
    let base = format!("http://{}", engine.addr);
    assert_eq!(get(&base, "/healthz").await.0, StatusCode::OK);
    let (status, body) = get(&base, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("loading"), "{body}");
    let pending = track_in_background(
        &base,
        json!({"userId": "u1", "event": "Early", "messageId": "early"}),
    );
    release.send(()).unwrap();
    tokio::task::block_in_place(|| blocker.join().unwrap());
    engine.loaded().await;
    assert_eq!(get(&base, "/readyz").await.0, StatusCode::OK);
    assert_eq!(pending.await.unwrap().0, StatusCode::OK);
    tokio::task::block_in_place(|| assert_stored_exactly(&url, vec!["early".into()]));
    engine.stop().await.unwrap();
}

/// Waits until one session of `client`'s database waits on a lock (the engine's writer, on a
/// lock the test holds).
async fn writer_waits_on_a_lock(client: &mut ::postgres::Client) {
    support::eventually(
        "the writer to wait for the head",
        std::time::Duration::from_secs(30),
        async || {
            let waiting: i64 = tokio::task::block_in_place(|| {
                client.query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
            })
            .map_err(|e| e.to_string())?
            .get(0);
            (waiting == 1).then_some(()).ok_or(format!("{waiting} waiting"))
        },
    )
    .await;
}

/// Waits until the engine at `base` holds `depth` requests in its queue.
async fn queue_depth_reaches(base: &str, depth: usize) {
    support::eventually(
        "requests to be queued",
        std::time::Duration::from_secs(30),
        async || {
            let text = metrics(base).await.map_err(|e| e.to_string())?;
            text.contains(&format!("profiles_sync_engine_queue_depth {depth}\n"))
                .then_some(())
                .ok_or(text)
        },
    )
    .await
}

/// An engine on a store whose load fails: its role (named after the store's database) may use
/// every table of the store but read `profiles`. Returns the engine and the database's name.
/// (No superuser connection is kept across an `await`: dropped while a test panics, its
/// runtime would abort every test of this binary.)
async fn start_unloadable(db: &str) -> (profiles_sync::engine::RunningEngine, String) {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let db = tokio::task::block_in_place(|| pg.create_database(db));
    tokio::task::block_in_place(|| {
        // The store's tables, created by the superuser.
        drop(store::open(&pg.url(&db), Rules::default()).unwrap());
        pg.connect(&db)
            .batch_execute(&format!(
                "CREATE ROLE {db} LOGIN;
                 GRANT ALL ON ALL TABLES IN SCHEMA public TO {db};
                 REVOKE SELECT ON profiles FROM {db};"
            ))
            .unwrap();
    });
    let url = format!("postgres://{db}@127.0.0.1:{}/{db}", pg.port());
    let engine = profiles_sync::engine::start(Options::default().config(url))
        .await
        .unwrap();
    (engine, db)
}

/// Waits until the engine at `base` has failed to load its store `n` times.
async fn load_failures_reach(base: &str, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = metrics(base).await.unwrap();
        let failures: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("profiles_sync_engine_store_load_failures_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no store_load_failures_total: {text}"));
        if failures >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{failures} failed loads, not {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A load of the store that fails is tried again while the engine stays unready, requests
/// meanwhile answered 503 at once; once a load succeeds the engine turns ready and stores.
/// Before, the engine turned ready with nothing loaded, and each write loaded the graph under
/// the head lock (and here failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_is_tried_again_before_the_engine_turns_ready() {
    let (engine, db) = start_unloadable("load_retry").await;
    let base = format!("http://{}", engine.addr);
    let track = |id: &str| json!({"userId": "u1", "event": "Seen", "messageId": id});
    // Two failed loads: the second is a retry, after which the engine is still unready. (The
    // pauses between tries are the writer's unit test's, not timed here.)
    load_failures_reach(&base, 2).await;
    let (status, body) = get(&base, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("loading"), "{body}");
    // Answered at once, not held until a load succeeds (10 s only bounds a broken engine).
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        post(&base, "/v1/track", &track("refused")),
    )
    .await
    .expect("a request was held while the store could not be loaded");
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE);
    let pg = tokio::task::block_in_place(support::pg::shared);
    tokio::task::block_in_place(|| {
        pg.connect(&db)
            .batch_execute(&format!("GRANT SELECT ON profiles TO {db}"))
            .unwrap()
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), engine.loaded())
        .await
        .expect("the load was never tried again after the grant");
    assert_eq!(get(&base, "/readyz").await.0, StatusCode::OK);
    assert_eq!(
        post(&base, "/v1/track", &track("stored")).await.0,
        StatusCode::OK
    );
    tokio::task::block_in_place(|| assert_stored_exactly(&pg.url(&db), vec!["stored".into()]));
    engine.stop().await.unwrap();
}

/// An engine whose store cannot be loaded still stops when told to: its writer leaves the
/// retries once the server has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_cannot_load_its_store_still_stops() {
    let (engine, _) = start_unloadable("load_stop").await;
    let base = format!("http://{}", engine.addr);
    load_failures_reach(&base, 1).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), engine.stop())
        .await
        .expect("the engine did not stop")
        .unwrap();
}

/// When its store connection breaks, the engine answers the request that found it broken with
/// a 503 at once, reconnects, and loads the identity graph again before its next write, as at
/// start: `/readyz` says "loading" meanwhile (so traffic goes to the other replicas), and a
/// request sent meanwhile waits in the queue and is stored once the load is done. The load is
/// held up by a lock on `profiles`; before, the reconnected engine stayed ready and loaded the
/// graph inside its next write, holding the head lock every replica writes under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_store_is_loaded_again_before_its_next_write() {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let url = tokio::task::block_in_place(|| pg.url(&pg.create_database("reconnect")));
    let engine = profiles_sync::engine::start(Options::default().config(url.clone()))
        .await
        .unwrap();
    engine.loaded().await;
    let base = format!("http://{}", engine.addr);
    let readyz = || get(&base, "/readyz");
    let track = |id: &str| json!({"userId": "u1", "event": "Seen", "messageId": id});
    assert_eq!(
        post(&base, "/v1/track", &track("before")).await.0,
        StatusCode::OK
    );
    // The engine's connections are ended, then `profiles` held locked.
    let (release, blocker) = tokio::task::block_in_place(|| {
        hold_profiles_locked(&url, |c| {
            let ended = c
                .query(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .unwrap();
            assert!(!ended.is_empty(), "the engine had no connection");
        })
    });
    // The write finds the connection gone: answered at once, not after the reconnection,
    // which waits for the lock (10 s only bounds how long a broken engine makes this test wait).
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        post(&base, "/v1/track", &track("broken")),
    )
    .await;
    let Ok((status, _)) = answer else {
        panic!("the request that found the store broken waited for the reconnection")
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = readyz().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("loading"), "{body}");
    // Sent while the graph loads: it waits in the queue.
    let pending = track_in_background(&base, track("after"));
    tokio::task::block_in_place(|| assert_loading_without_the_head_lock(&url));
    let (status, body) = readyz().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    release.send(()).unwrap();
    tokio::task::block_in_place(|| blocker.join().unwrap());
    assert_eq!(pending.await.unwrap().0, StatusCode::OK);
    assert_eq!(readyz().await.0, StatusCode::OK);
    tokio::task::block_in_place(|| {
        assert_stored_exactly(&url, vec!["before".into(), "after".into()])
    });
    engine.stop().await.unwrap();
}

/// An in-memory store is refused with a reason: the feed readers would each open an empty
/// database of their own, and a reopen after an error would forget every stored event.
#[tokio::test]
async fn an_in_memory_store_is_refused_with_a_reason() {
    let result =
        profiles_sync::engine::start(Options::default().config("sqlite::memory:".into())).await;
    let Err(e) = result else {
        panic!("an engine started on sqlite::memory:")
    };
    let e = e.to_string();
    assert!(
        e.contains("sqlite::memory:") && e.contains("sqlite:///path/store.db"),
        "{e}"
    );
}

/// A client whose body stalls is answered 503 with Retry-After once the body timeout passes
/// (a 408 made the SDKs drop the batch: they give up on any 4xx but 429), which frees its
/// reading permit: stalled clients cannot hold the engine's capacity (or its shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_503_to_send_again_and_frees_its_permit() {
    let t = support::engine::start_configured(8, 1, std::time::Duration::from_millis(300)).await;
    let (mut slow, _) = stall_a_batch(&t.base).await;
    // The engine answers on its own, the rest of the body never sent.
    let answer = support::engine::answer_without_the_body(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nretry-after: 1\r\n"),
        "{answer}"
    );
    assert!(answer.contains("did not arrive within 0.3 s"), "{answer}");
    assert!(answer.contains("\"code\":\"timeout\""), "{answer}");
    // Its permit is free again: the next request (the only reading slot) gets in.
    post_ok(
        &t.base,
        "/v1/track",
        &json!({"userId": "u1", "event": "Fast", "messageId": "after"}),
    )
    .await;
    assert_stored_exactly(&t.store_url, vec!["after".into()]);
    t.engine.stop().await.unwrap();
}

/// A Track event whose table name is one of profiles-sync's own (`Pages`), or a feed of the
/// API (`Events`: its table was `events`, and `/v1/feeds/events` served every event instead of
/// its rows), is served under the name the warehouse gives it (`_pages`, `_events`), and the
/// feeds keep their own names.
#[tokio::test]
async fn a_track_event_named_like_a_feed_is_served_under_its_warehouse_name() {
    let t = start(8).await;
    for (event, id) in [("Pages", "t1"), ("Events", "t2")] {
        post(
            &t.base,
            "/v1/track",
            &json!({"userId": "u1", "event": event, "messageId": id}),
        )
        .await;
    }
    post(
        &t.base,
        "/v1/page",
        &json!({"userId": "u1", "name": "Home", "messageId": "p1"}),
    )
    .await;
    let catalog = catalog(&t.base).await;
    assert_eq!(
        catalog["trackEvents"],
        json!([{"event": "Events", "table": "_events"}, {"event": "Pages", "table": "_pages"}])
    );
    let ids = |rows: Vec<Value>| -> Vec<String> {
        rows.iter()
            .map(|r| r["messageId"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(ids(feed_page(&t.base, "_pages", 0, 10).await.1), ["t1"]);
    assert_eq!(ids(feed_page(&t.base, "_events", 0, 10).await.1), ["t2"]);
    assert_eq!(ids(feed_page(&t.base, "pages", 0, 10).await.1), ["p1"]);
    assert_eq!(
        ids(feed_page(&t.base, "events", 0, 10).await.1),
        ["t1", "t2", "p1"]
    );
    t.engine.stop().await.unwrap();
}

/// A batch's `sentAt` applies to a message whose own is null, as to one that has none: the
/// clock-skew correction is made (the client's skewed timestamp was kept).
#[tokio::test]
async fn a_batch_sent_at_applies_to_a_message_whose_own_is_null() {
    let t = start(8).await;
    let body = json!({"sentAt": "2030-01-01T00:10:00Z", "batch": [
        {"type": "track", "userId": "u1", "event": "A", "messageId": "absent",
         "timestamp": "2030-01-01T00:09:58Z"},
        {"type": "track", "userId": "u1", "event": "A", "messageId": "null",
         "timestamp": "2030-01-01T00:09:58Z", "sentAt": null}]});
    post_ok(&t.base, "/v1/batch", &body).await;
    let events = stored(&t.store_url);
    assert_eq!(events.len(), 2);
    for e in &events {
        let skew = e.event.received_at.as_millisecond() - e.event.timestamp.as_millisecond();
        assert_eq!(skew, 2000, "{}", e.event.message_id);
    }
    t.engine.stop().await.unwrap();
}

/// An SDK whose endpoint setting ends in `/` (analytics-go joins `Endpoint + "/v1/batch"`)
/// posts to `//v1/batch`: served as `/v1/batch` (it was a 404, and the batch was dropped).
#[tokio::test]
async fn a_path_with_doubled_slashes_reaches_its_endpoint() {
    let t = start(8).await;
    let (status, reply) = post(
        &t.base,
        "//v1//batch",
        &json!({"batch": [{"type": "track", "userId": "u1", "event": "A"}]}),
    )
    .await;
    assert_eq!((status, reply), (StatusCode::OK, json!({"success": true})));
    assert_eq!(stored(&t.store_url).len(), 1);
    t.engine.stop().await.unwrap();
}

/// A browser's analytics.js posts from the site's origin: the Tracking API answers with CORS
/// headers (a 200 without them reads as a failure there, and the events are sent again), and
/// answers a preflight; the feed API does not.
#[tokio::test]
async fn the_tracking_api_answers_browsers_and_the_feed_api_does_not() {
    let t = start(8).await;
    let origin = "https://shop.example.com";
    let r = client()
        .post(format!("{}/v1/t", t.base))
        .header("origin", origin)
        .header("content-type", "text/plain")
        .body(
            json!({"writeKey": WRITE_KEY, "type": "track", "userId": "u1", "event": "A"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let preflight = client()
        .request(reqwest::Method::OPTIONS, format!("{}/v1/batch", t.base))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization,x-site-tag",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    // Any header the page asks for (analytics.js takes a site's own headers).
    let headers = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in ["content-type", "authorization", "x-site-tag"] {
        assert!(headers.contains(h), "{h}: {headers}");
    }
    let allowed = preflight.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_ascii_uppercase();
    assert!(allowed.contains("POST"), "{allowed}");
    assert_eq!(stored(&t.store_url).len(), 1, "a preflight stores nothing");
    let feed = client()
        .get(format!("{}/v1/feeds", t.base))
        .header("origin", origin)
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(feed.headers().get("access-control-allow-origin").is_none());
    t.engine.stop().await.unwrap();
}

/// The remaining error paths each answer with their status and an error naming the cause, and
/// store nothing; every short path the SDKs use is served.
#[tokio::test]
async fn every_error_path_names_its_cause_and_every_short_path_is_served() {
    let t = start(8).await;
    let send = |path: &str, body: Vec<u8>, gzip: bool| {
        let mut r = client()
            .post(format!("{}{path}", t.base))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-type", "application/json")
            .body(body);
        if gzip {
            r = r.header("content-encoding", "gzip");
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let bad = br#"{"userId": "u1", "event": "A", "messageId": "never"}"#.to_vec();
    let (status, body) = send("/v1/track", bad, true).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap_or_default().contains("gzip"),
        "{body}"
    );
    let (status, body) = send("/v1/track", b"[1, 2]".to_vec(), false).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("must be an object"),
        "{body}"
    );
    let typed = json!({"userId": true, "event": "A", "messageId": "never-2"});
    let (status, body) = send("/v1/track", typed.to_string().into_bytes(), false).await;
    assert_eq!(
        (status, &body["field"]),
        (StatusCode::BAD_REQUEST, &json!("userId")),
        "{body}"
    );

    let r = client()
        .get(format!("{}/v1/feeds?since=yesterday", t.base))
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("since:"),
        "{body}"
    );

    let mut served = vec![];
    for (path, message) in [
        ("/v1/i", json!({"userId": "u1", "traits": {"plan": "pro"}})),
        ("/v1/p", json!({"userId": "u1", "name": "Home"})),
        ("/v1/s", json!({"userId": "u1", "name": "Home"})),
        ("/v1/g", json!({"userId": "u1", "groupId": "g1"})),
        ("/v1/a", json!({"userId": "u1", "previousId": "a1"})),
        (
            "/v1/b",
            json!({"batch": [{"type": "track", "userId": "u1", "event": "A"}]}),
        ),
        (
            "/v1/import",
            json!({"batch": [{"type": "track", "userId": "u1", "event": "B"}]}),
        ),
    ] {
        let id = format!("short{}", path.replace('/', "-"));
        let mut message = message;
        match message.get_mut("batch").and_then(Value::as_array_mut) {
            Some(items) => items[0]["messageId"] = json!(id),
            None => message["messageId"] = json!(id),
        }
        let (status, body) = send(path, message.to_string().into_bytes(), false).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        served.push(id);
    }
    assert_stored_exactly(&t.store_url, served);
    t.engine.stop().await.unwrap();
}

/// An engine started without a feed token keeps the feed API closed: 403 saying how to open it,
/// while ingest works.
#[tokio::test]
async fn without_a_feed_token_the_feed_api_answers_403() {
    let t = start_options(Options {
        feed_token: None,
        ..Options::default()
    })
    .await;
    post_ok(&t.base, "/v1/track", &json!({"userId": "u1", "event": "A"})).await;
    for path in ["/v1/feeds", "/v1/feeds/tracks", "/v1/feeds/user_traits"] {
        let r = client()
            .get(format!("{}{path}", t.base))
            .bearer_auth(FEED_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains("--feed-token-file"), "{path}: {text}");
    }
    t.engine.stop().await.unwrap();
}

/// An engine on a fresh PostgreSQL database `name` whose `events` table then gets a CHECK
/// constraint, as a DBA might add, refusing the messageId `poison`: the server, the database,
/// its URL and the engine.
async fn engine_refusing_poison(
    name: &str,
) -> (&'static support::pg::PgServer, String, String, TestEngine) {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let db = tokio::task::block_in_place(|| pg.create_database(name));
    let url = pg.url(&db);
    let t = start_options(Options {
        store_url: Some(url.clone()),
        ..Options::default()
    })
    .await;
    tokio::task::block_in_place(|| {
        pg.connect(&db)
            .batch_execute(
                "ALTER TABLE events ADD CONSTRAINT no_poison CHECK (message_id <> 'poison')",
            )
            .unwrap()
    });
    (pg, db, url, t)
}

/// A commit the store refuses (here a PostgreSQL constraint a DBA added) answers the request
/// 503 with `Retry-After`, stores nothing of it, and the next request commits.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_commit_the_store_refuses_answers_503_and_stores_nothing() {
    let (_, _, url, t) = engine_refusing_poison("refuse").await;
    post_ok(
        &t.base,
        "/v1/track",
        &json!({"userId": "u1", "event": "A", "messageId": "ok1"}),
    )
    .await;
    let r = client()
        .post(format!("{}/v1/batch", t.base))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"batch": [
            {"type": "identify", "userId": "u2", "messageId": "fine", "traits": {"plan": "pro"}},
            {"type": "track", "userId": "u2", "event": "B", "messageId": "poison"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let (status, _) = post(
        &t.base,
        "/v1/track",
        &json!({"userId": "u3", "event": "C", "messageId": "ok2"}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the writer recovers for the next group"
    );
    t.engine.stop().await.unwrap();
    let ids: Vec<String> = tokio::task::block_in_place(|| stored(&url))
        .into_iter()
        .map(|e| e.event.message_id)
        .collect();
    assert_eq!(
        ids,
        ["ok1", "ok2"],
        "nothing of the refused group was stored"
    );
}

/// After a write the store refused, the engine loads its graph again (the refused write's
/// changes forgotten) before its next write, outside the head lock and with `/readyz` saying
/// "loading"; a request sent meanwhile is stored once the load is done. Before, the next write
/// loaded the whole graph under the head lock every replica writes under (and, on a large
/// store, long enough for the stall check to take it for a stalled write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_write_the_graph_is_reloaded_outside_the_head_lock() {
    let (_, _, url, t) = engine_refusing_poison("refused_reload").await;
    let track = |id: &str| json!({"userId": "u1", "event": "A", "messageId": id});
    post_ok(&t.base, "/v1/track", &track("ok1")).await;
    // A known user and event name: the refused write touches neither `profiles` nor the
    // other state tables, which the reload reads and the test holds locked.
    let (release, blocker) = tokio::task::block_in_place(|| hold_profiles_locked(&url, |_| ()));
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        post(&t.base, "/v1/track", &track("poison")),
    )
    .await;
    let Ok((status, _)) = answer else {
        panic!("the refused write waited for the lock on profiles")
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = get(&t.base, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("loading"), "{body}");
    let pending = track_in_background(&t.base, track("after"));
    tokio::task::block_in_place(|| assert_loading_without_the_head_lock(&url));
    release.send(()).unwrap();
    tokio::task::block_in_place(|| blocker.join().unwrap());
    assert_eq!(pending.await.unwrap().0, StatusCode::OK);
    assert_eq!(get(&t.base, "/readyz").await.0, StatusCode::OK);
    t.engine.stop().await.unwrap();
    tokio::task::block_in_place(|| assert_stored_exactly(&url, vec!["ok1".into(), "after".into()]));
}

/// A request the store refuses fails alone: the requests committed in the same group are
/// committed again one by one, so a client whose data breaks a constraint a DBA added does not
/// take every other client down with it (they would all get 503 for as long as it retries).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_refused_request_fails_alone_and_its_group_commits() {
    let (pg, db, url, t) = engine_refusing_poison("isolate").await;
    let mut dba = tokio::task::block_in_place(|| pg.connect(&db));
    tokio::task::block_in_place(|| {
        dba.batch_execute("BEGIN; SELECT head FROM seq_counter WHERE id = 1 FOR UPDATE;")
            .unwrap()
    });
    // While the DBA's transaction holds the head, the writer blocks on the first request...
    let send = |id: &'static str| {
        let base = t.base.clone();
        tokio::spawn(async move {
            post(
                &base,
                "/v1/track",
                &json!({"userId": id, "event": "E", "messageId": id}),
            )
            .await
            .0
        })
    };
    let first = send("first");
    let mut watch = tokio::task::block_in_place(|| pg.connect(&db));
    writer_waits_on_a_lock(&mut watch).await;
    // ...so the next two queue up, the poisoned one first, and are committed as one group.
    let queued = |depth: usize| queue_depth_reaches(&t.base, depth);
    let poison = send("poison");
    queued(1).await;
    let good = send("good");
    queued(2).await;
    tokio::task::block_in_place(move || {
        dba.batch_execute("COMMIT").unwrap();
        // The synchronous clients close on a thread that may block.
        drop((dba, watch));
    });
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    assert_eq!(
        good.await.unwrap(),
        StatusCode::OK,
        "refused with the poison"
    );
    assert_eq!(poison.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    t.engine.stop().await.unwrap();
    let ids: Vec<String> = tokio::task::block_in_place(|| stored(&url))
        .into_iter()
        .map(|e| e.event.message_id)
        .collect();
    assert_eq!(ids, ["first", "good"]);
}

/// An engine on a role that may do everything, with a poison constraint; `first` blocked on the
/// head (a DBA holds it), then `poison` and `good` queued as one group; SELECT on profiles is
/// revoked, then the head let go: the group is refused, split, and the load before the split
/// (on the kept connection) fails — and keeps failing.
async fn split_group_with_failing_load(
    name: &str,
) -> (
    profiles_sync::engine::RunningEngine,
    String,
    tokio::task::JoinHandle<(StatusCode, Value)>,
    tokio::task::JoinHandle<(StatusCode, Value)>,
    String,
) {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let db = tokio::task::block_in_place(|| pg.create_database(name));
    let mut admin = tokio::task::block_in_place(|| {
        drop(store::open(&pg.url(&db), Rules::default()).unwrap());
        let mut admin = pg.connect(&db);
        admin
            .batch_execute(&format!(
                "CREATE ROLE {db} LOGIN;
                 GRANT ALL ON ALL TABLES IN SCHEMA public TO {db};
                 GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {db};
                 ALTER TABLE events ADD CONSTRAINT no_poison CHECK (message_id <> 'poison');"
            ))
            .unwrap();
        admin
    });
    let url = format!("postgres://{db}@127.0.0.1:{}/{db}", pg.port());
    let engine = profiles_sync::engine::start(Options::default().config(url))
        .await
        .unwrap();
    engine.loaded().await;
    let base = format!("http://{}", engine.addr);
    let track = |id: &str| json!({"userId": "u1", "event": "A", "messageId": id});
    assert_eq!(
        post(&base, "/v1/track", &track("ok1")).await.0,
        StatusCode::OK
    );
    let mut dba = tokio::task::block_in_place(|| pg.connect(&db));
    tokio::task::block_in_place(|| {
        dba.batch_execute("BEGIN; SELECT head FROM seq_counter WHERE id = 1 FOR UPDATE;")
            .unwrap()
    });
    let first = track_in_background(&base, track("first"));
    writer_waits_on_a_lock(&mut admin).await;
    let queued = |depth: usize| queue_depth_reaches(&base, depth);
    let poison = track_in_background(&base, track("poison"));
    queued(1).await;
    let good = track_in_background(&base, track("good"));
    queued(2).await;
    tokio::task::block_in_place(|| {
        admin
            .batch_execute(&format!("REVOKE SELECT ON profiles FROM {db}"))
            .unwrap();
        dba.batch_execute("COMMIT").unwrap();
        drop(dba);
        drop(admin);
    });
    assert_eq!(first.await.unwrap().0, StatusCode::OK, "first");
    // The load after the refused group fails, and is retried.
    load_failures_reach(&base, 2).await;
    (engine, base, poison, good, db)
}

/// When the load after a refused group fails, the group's own requests are answered (503, not
/// stored) while it keeps failing, like requests queued meanwhile — not held until a load
/// succeeds, which would also hold a graceful shutdown: the engine still stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_groups_requests_are_answered_while_its_load_fails() {
    let (engine, base, poison, good, db) = split_group_with_failing_load("split_load_fails").await;
    let later = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        post(
            &base,
            "/v1/track",
            &json!({"userId": "u1", "event": "A", "messageId": "later"}),
        ),
    )
    .await
    .expect("a request queued during the retries was held");
    assert_eq!(later.0, StatusCode::SERVICE_UNAVAILABLE);
    let answered = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        (poison.await.unwrap().0, good.await.unwrap().0)
    })
    .await;
    let url = tokio::task::block_in_place(|| support::pg::shared().url(&db));
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), engine.stop()).await;
    assert_eq!(
        answered.expect("the refused group's requests were held while its load kept failing"),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE
        )
    );
    stopped.expect("the engine did not stop").unwrap();
    tokio::task::block_in_place(|| assert_stored_exactly(&url, vec!["ok1".into(), "first".into()]));
}

/// A load that fails because its connection broke (ended while it waited on a lock) is tried
/// again on a new connection, and the engine then stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_whose_connection_broke_is_tried_again_on_a_new_one() {
    let (engine, url, release, blocker) = start_with_profiles_locked("load_broke").await;
    let base = format!("http://{}", engine.addr);
    tokio::task::block_in_place(|| {
        let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        for _ in 0..1000 {
            let n = c.query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'", &[]).unwrap().len();
            if n > 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the engine never waited on the lock");
    });
    release.send(()).unwrap();
    tokio::task::block_in_place(|| blocker.join().unwrap());
    load_failures_reach(&base, 1).await;
    tokio::time::timeout(std::time::Duration::from_secs(15), engine.loaded())
        .await
        .expect("never loaded after the connection broke");
    assert_eq!(
        post(
            &base,
            "/v1/track",
            &json!({"userId": "u1", "event": "E", "messageId": "m"})
        )
        .await
        .0,
        StatusCode::OK
    );
    engine.stop().await.unwrap();
}

/// A raw HTTP/1.1 exchange: sends `request` on a new connection and reads what comes back
/// until the engine closes it (or 10 s pass, which fails the test).
async fn raw_exchange(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    c.write_all(request).await.unwrap();
    let mut answer = vec![];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.read_to_end(&mut answer),
    )
    .await
    .expect("the engine closed the connection")
    .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A client that never finishes its request's headers is disconnected after the header
/// timeout, and does not hold a graceful shutdown (there was no header timeout: one such
/// connection kept a SIGTERM'd engine alive until the kubelet's SIGKILL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_its_headers_is_disconnected_and_holds_no_shutdown() {
    use tokio::io::AsyncWriteExt;
    let t = start_options(Options {
        header_timeout: std::time::Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let answer = raw_exchange(&t.base, b"POST /v1/track HTTP/1.1\r\nHost: x\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    let mut stalled = tokio::net::TcpStream::connect(t.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), t.engine.stop())
        .await
        .expect("the engine stopped")
        .unwrap();
}

/// A request head over 64 KB is refused 431 (hyper's default let each connection buffer
/// ~400 KB of headers, without a deadline).
#[tokio::test]
async fn a_request_head_over_64_kb_is_refused_431() {
    let t = start(8).await;
    let mut request = b"POST /v1/track HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..20 {
        request.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "a".repeat(4000)).as_bytes());
    }
    request.extend_from_slice(b"Content-Length: 2\r\n\r\n{}");
    let answer = raw_exchange(&t.base, &request).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    t.engine.stop().await.unwrap();
}

/// A write key in the `Authorization` header that no source has is answered 401 at once,
/// before the body is read: clients with a wrong key that send slowly hold no reading permit,
/// and real clients keep being served (two such clients took both permits of a reading
/// capacity of 2 for the body timeout, and real clients got 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_write_key_is_refused_before_the_body_and_holds_no_reading_permit() {
    use base64::Engine as _;
    let t = start_with(8, 2).await;
    let bad = base64::engine::general_purpose::STANDARD.encode("not-a-write-key:");
    for _ in 0..3 {
        // Headers, then nothing of the 100 KB body they announce.
        let answer = raw_exchange(
            &t.base,
            format!(
                "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {bad}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("unknown write key"), "{answer}");
    }
    // Refused before its body was read, a request counts no event (it counted one, where the
    // same batch with the key in its body counts each of its events).
    let text = metrics(&t.base).await.unwrap();
    assert!(
        !text.lines().any(
            |l| l.starts_with("profiles_sync_engine_events_rejected_total")
                && l.contains("unauthorized")
        ),
        "{text}"
    );
    let (status, _) = post(
        &t.base,
        "/v1/track",
        &json!({"userId": "u1", "event": "Real", "messageId": "real-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    t.engine.stop().await.unwrap();
}

/// Content codings: gzip and x-gzip (alone or with identity) are decoded; any other is refused
/// 415 (`br` was read as plain JSON, `deflate` misreported as malformed JSON), storing nothing.
#[tokio::test]
async fn content_codings_other_than_gzip_are_refused_415() {
    let t = start(8).await;
    let body = json!({"userId": "u1", "event": "E", "messageId": "coded"}).to_string();
    let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let send = |coding: &'static str, bytes: Vec<u8>| {
        client()
            .post(format!("{}/v1/track", t.base))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(bytes)
            .send()
    };
    for (coding, bytes) in [("br", body.clone().into_bytes()), ("deflate", gz.clone())] {
        let r = send(coding, bytes).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{coding}");
        let err: Value = r.json().await.unwrap();
        assert!(err["error"].as_str().unwrap().contains(coding), "{err}");
    }
    assert!(stored(&t.store_url).is_empty());
    for coding in ["x-gzip", "gzip, identity"] {
        let r = send(coding, gz.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{coding}");
    }
    assert_eq!(stored(&t.store_url).len(), 1, "one event, deduplicated");
    t.engine.stop().await.unwrap();
}

/// A body whose HTTP framing is broken (a chunk size that is not hex) is a 400, not "413:
/// request body exceeds the 500 KB batch limit" for a 2-byte body.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_not_too_large() {
    use base64::Engine as _;
    let t = start(8).await;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));
    let answer = raw_exchange(
        &t.base,
        format!(
            "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\
             Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("could not be read"), "{answer}");
    t.engine.stop().await.unwrap();
}

/// Feed reads share a bounded set of store handles: on PostgreSQL, with 2 feed readers and a
/// role allowed 4 connections, 30 concurrent feed reads (held up by a lock, so that they
/// overlap) are all served. Each read opened a connection of its own: the role's limit (in
/// production, the server's `max_connections`) refused the rest, and the writer, the other
/// replicas and the operators with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_feed_reads_hold_a_bounded_number_of_connections() {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let (url, db) = tokio::task::block_in_place(|| {
        let db = pg.create_database("feed_readers");
        pg.connect(&db)
            .batch_execute(
                "DO $$ BEGIN CREATE ROLE feed_engine LOGIN CONNECTION LIMIT 4; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
            )
            .unwrap();
        pg.connect(&db)
            .batch_execute(&format!("ALTER DATABASE {db} OWNER TO feed_engine"))
            .unwrap();
        let url = pg.url(&db).replacen("postgres@", "feed_engine@", 1);
        (url, db)
    });
    assert!(url.contains("feed_engine@"), "{url}");
    let t = start_options(Options {
        store_url: Some(url),
        feed_readers: 2,
        ..Options::default()
    })
    .await;
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        let mut c = pg.connect(&db);
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .unwrap();
        locked_tx.send(()).unwrap();
        // Released once both feed readers wait on the lock.
        let mut watcher = pg.connect(&db);
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'feed_engine' AND wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting >= 2 {
                break;
            }
            std::thread::yield_now();
        }
        tx.commit().unwrap();
        let _ = released.recv();
    });
    tokio::task::block_in_place(|| locked.recv().unwrap());
    let reads: Vec<_> = (0..30)
        .map(|_| {
            let base = t.base.clone();
            tokio::spawn(async move {
                client()
                    .get(format!("{base}/v1/feeds/tracks"))
                    .bearer_auth(FEED_TOKEN)
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    let mut statuses = vec![];
    for r in reads {
        statuses.push(r.await.unwrap().unwrap());
    }
    release.send(()).unwrap();
    tokio::task::block_in_place(|| blocker.join().unwrap());
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::NOT_FOUND),
        "{statuses:?}"
    );
    t.engine.stop().await.unwrap();
}

/// An engine on PostgreSQL that served feed reads stops cleanly: its idle feed readers were
/// dropped on an async worker, where closing a blocking PostgreSQL client panics ("Cannot
/// start a runtime from within a runtime"; the process aborted with two or more readers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_engine_stops_cleanly_after_serving_feed_reads() {
    let pg = tokio::task::block_in_place(support::pg::shared);
    let db = tokio::task::block_in_place(|| pg.create_database("feed_stop"));
    let t = start_options(Options {
        store_url: Some(pg.url(&db)),
        ..Options::default()
    })
    .await;
    let reads: Vec<_> = (0..3)
        .map(|_| {
            client()
                .get(format!("{}/v1/feeds", t.base))
                .bearer_auth(FEED_TOKEN)
                .send()
        })
        .collect();
    for r in futures_join(reads).await {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    t.engine.stop().await.unwrap();
}

/// Runs `futures` concurrently and returns their outputs in order.
async fn futures_join<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = vec![];
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// `n` keep-alive connections to the engine at `base`, each idle after one answered request.
async fn hold_connections(base: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut idle = vec![];
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        idle.push(s);
    }
    idle
}

/// An engine that allows 2 connections (its feed API open), both held by idle keep-alive
/// clients; and a client that gives up after 10 s (a request that waits for a connection
/// fails the test rather than hanging it).
async fn every_connection_taken() -> (TestEngine, Vec<tokio::net::TcpStream>, reqwest::Client) {
    let t = start_options(Options {
        max_connections: 2,
        feed_token: Some(FEED_TOKEN),
        ..Options::default()
    })
    .await;
    let idle = hold_connections(&t.base, 2).await;
    let bounded = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    (t, idle, bounded)
}

/// With every allowed connection held by idle keep-alive clients, the probes and the scrape
/// still answer (they waited in the listen backlog, and the kubelet restarted an engine that
/// was only busy), and a Tracking API request gets 503 with `Retry-After` rather than a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_and_clients_get_503_when_every_connection_is_taken() {
    let (t, idle, bounded) = every_connection_taken().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = bounded
            .get(format!("{}{path}", t.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = bounded
        .post(format!("{}/v1/track", t.base))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "u1", "event": "E"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "1");
    drop(idle);
    t.engine.stop().await.unwrap();
}

/// A Tracking API or feed API request turned away because every allowed connection is taken
/// counts in the requests metric under its endpoint and 503, as one turned away by a full
/// queue does: it counted nowhere, and the metric showed no 503s while clients got them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_turned_away_for_want_of_a_connection_are_counted() {
    let (t, idle, bounded) = every_connection_taken().await;
    for path in ["/v1/track", "/v1/batch/"] {
        let r = bounded
            .post(format!("{}{path}", t.base))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u1", "event": "E"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
    }
    let r = bounded
        .get(format!("{}/v1/feeds", t.base))
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = metrics(&t.base).await.unwrap();
    for endpoint in ["track", "batch", "feeds"] {
        let line = format!(
            "profiles_sync_engine_http_requests_total{{endpoint=\"{endpoint}\",status=\"503\"}} 1"
        );
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    drop(idle);
    t.engine.stop().await.unwrap();
}

/// Polls `/metrics` until `ready` holds; fails after 30 s (the behaviour is broken, not slow).
async fn wait_for_metrics(base: &str, what: &str, ready: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if ready(&metrics(base).await.unwrap()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never saw {what}");
        tokio::task::yield_now().await;
    }
}

/// A request whose client hangs up before the answer is still counted (under 499): its
/// events are committed all the same, and it appeared nowhere in the requests metric — in
/// exactly the incident (a slow store, clients timing out) that metric is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_hung_up_is_counted() {
    use tokio::io::AsyncWriteExt;
    let t = start(8).await;
    // The store's write lock, held: the request waits for its commit.
    let lock = rusqlite::Connection::open(&t.store_path).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = json!({"userId": "u1", "event": "E", "messageId": "hung-up"}).to_string();
    {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));
        let mut c = tokio::net::TcpStream::connect(t.base.trim_start_matches("http://"))
            .await
            .unwrap();
        c.write_all(
            format!(
                "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // The request reached the writer (its write waiting on the lock) before the client goes.
        wait_for_metrics(&t.base, "a write under way", |text| {
            text.lines().any(|l| {
                l.strip_prefix("profiles_sync_engine_write_running_seconds ")
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
            })
        })
        .await;
    }
    let counted = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("profiles_sync_engine_http_requests_total")
                && l.contains("endpoint=\"track\"")
                && l.contains("status=\"499\"")
                && l.ends_with(" 1")
        })
    };
    wait_for_metrics(&t.base, "the request counted under 499", counted).await;
    lock.execute_batch("ROLLBACK").unwrap();
    t.engine.stop().await.unwrap();
    assert_eq!(stored(&t.store_url).len(), 1, "its events are committed");
}

/// analytics-java (3.x) posts every batch to `{endpoint}/v1/import/` — `Analytics.Builder`'s
/// `DEFAULT_PATH` ends with a slash — and gives a batch up on any 4xx but 429: a 404 there loses
/// every event the SDK sends. Each Tracking API path is served with a trailing slash too.
#[tokio::test]
async fn tracking_paths_with_a_trailing_slash_are_served() {
    let t = start(8).await;
    let java = json!({
        "batch": [{"type": "track", "userId": "u1", "event": "Java", "messageId": "java-1",
                   "timestamp": "2024-05-01T12:00:00.123Z"}],
        "sentAt": "2024-05-01T12:00:01.000Z",
        "context": {"library": {"name": "analytics-java", "version": "3.5.1"}},
        "sequence": 1,
        "writeKey": WRITE_KEY,
    });
    let (status, reply) = post(&t.base, "/v1/import/", &java).await;
    assert_eq!(status, StatusCode::OK, "/v1/import/: {reply}");
    let (status, reply) = post(
        &t.base,
        "/v1/track/",
        &json!({"userId": "u1", "event": "A", "messageId": "slash-track"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "/v1/track/: {reply}");
    assert_stored_exactly(
        &t.store_url,
        vec!["java-1".to_string(), "slash-track".to_string()],
    );
    t.engine.stop().await.unwrap();
}

/// Through the feed API too, a schema synced from one engine's store is refused by another's
/// whose store has gone past its cursors (the catalog's `storeId` tells them apart), and
/// nothing is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_through_the_feed_api_tells_another_store_by_its_id() {
    let (a, b) = (start(8).await, start(8).await);
    for i in 0..2 {
        post(
            &a.base,
            "/v1/track",
            &json!({"userId": "u1", "event": "Seen", "messageId": format!("a{i}")}),
        )
        .await;
    }
    for i in 0..6 {
        post(
            &b.base,
            "/v1/track",
            &json!({"userId": format!("u{i}"), "event": "Seen", "messageId": format!("b{i}")}),
        )
        .await;
    }
    let (wh, first) =
        sync_through_feed_api(&a.base, support::warehouse::TestWarehouse::sqlite()).await;
    assert_eq!(
        first.status,
        profiles_sync::crd::SyncStatus::Success,
        "{first:#?}"
    );
    let before = wh.dump();
    let (wh, other) = sync_through_feed_api(&b.base, wh).await;
    assert_eq!(
        other.status,
        profiles_sync::crd::SyncStatus::Failed,
        "{other:#?}"
    );
    let ids: Vec<String> = [&a, &b]
        .iter()
        .map(|t| {
            store::open(&t.store_url, Rules::default())
                .unwrap()
                .store_id()
                .unwrap()
        })
        .collect();
    let message = &other.errors[0].message;
    assert!(
        message.contains(&ids[0]) && message.contains(&ids[1]),
        "{message}"
    );
    assert_eq!(wh.dump(), before, "nothing loaded");
    a.engine.stop().await.unwrap();
    b.engine.stop().await.unwrap();
}

/// Syncs `wh` through the feed API of the engine at `base` (on a blocking thread); returns it
/// with the run's report.
async fn sync_through_feed_api(
    base: &str,
    wh: support::warehouse::TestWarehouse,
) -> (
    support::warehouse::TestWarehouse,
    profiles_sync::sync::SyncReport,
) {
    let base = base.to_string();
    tokio::task::spawn_blocking(move || {
        let mut source = profiles_sync::sync::EngineSource::new(&base, FEED_TOKEN.into())
            .expect("engine source");
        let spec = wh.spec.clone();
        let r = wh.sync_source(&mut source, None, &spec, 500);
        (wh, r)
    })
    .await
    .expect("the sync's thread")
}

/// A sync through the feed API tells a store restored from a backup older than its last sync
/// (same id, new changes under `seq`s it loaded) once the store has gone past its cursors: the
/// change at the schema's newest cursor is another one, and nothing is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_through_the_feed_api_tells_a_store_restored_from_an_older_backup() {
    let track = |prefix: &str, i: usize| {
        json!({"userId": format!("{prefix}-user{i}"), "event": "Seen",
            "messageId": format!("{prefix}{i}")})
    };
    let t = start(8).await;
    for i in 0..2 {
        post(&t.base, "/v1/track", &track("kept", i)).await;
    }
    let backup = t.store_path.with_extension("backup");
    let path = backup.to_str().expect("a UTF-8 path").to_string();
    let store_path = t.store_path.clone();
    tokio::task::spawn_blocking(move || {
        rusqlite::Connection::open(store_path)
            .and_then(|c| c.execute("VACUUM INTO ?1", [path]))
            .expect("back the store up")
    })
    .await
    .unwrap();
    for i in 0..2 {
        post(&t.base, "/v1/track", &track("lost", i)).await;
    }
    let (wh, first) =
        sync_through_feed_api(&t.base, support::warehouse::TestWarehouse::sqlite()).await;
    assert_eq!(
        first.status,
        profiles_sync::crd::SyncStatus::Success,
        "{first:#?}"
    );
    let before = wh.dump();
    t.engine.stop().await.unwrap();
    // Restored onto a new volume (a file of its own: the stopped engine's handles may still be
    // closing the old one, and a last close checkpoints its WAL into it).
    let restored_path = t.store_path.with_file_name("restored.db");
    std::fs::copy(&backup, &restored_path).expect("restore the backup");

    let restored = start_options(Options {
        store_url: Some(format!("sqlite://{}", restored_path.display())),
        ..Options::default()
    })
    .await;
    for i in 0..6 {
        post(&restored.base, "/v1/track", &track("new", i)).await;
    }
    let (wh, after) = sync_through_feed_api(&restored.base, wh).await;
    assert_eq!(
        after.status,
        profiles_sync::crd::SyncStatus::Failed,
        "{after:#?}"
    );
    let message = &after.errors[0].message;
    assert!(message.contains("change at that seq"), "{message}");
    assert_eq!(wh.dump(), before, "nothing loaded");
    restored.engine.stop().await.unwrap();
}
