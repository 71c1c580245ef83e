//! Segment's official Python SDK, pointed at the engine, works unmodified: every call type lands
//! in the store with the profile it resolved to.

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use profiles_sync::identity::Rules;
use profiles_sync::store::{self, EventFilter, Feed, FeedRow};
use support::engine::{SOURCE_ID, WRITE_KEY, start};

/// The virtualenv `make test` creates with segment-analytics-python in it.
fn sdk_python() -> PathBuf {
    if let Ok(p) = std::env::var("PROFILES_SYNC_SDK_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-segment/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `make test` (it creates the virtualenv with segment-analytics-python)",
        p.display()
    );
    p
}

async fn send_with_sdk(base: &str, gzip: bool) {
    run_sdk_script(
        "send_events.py",
        &[base, WRITE_KEY, if gzip { "1" } else { "0" }],
    )
    .await;
}

/// Runs `tests/sdk/<script>` with the SDK's Python and `args`; fails the test when it fails
/// (the scripts exit non-zero when the SDK reports an error).
async fn run_sdk_script(script: &str, args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::process::Command::new(sdk_python())
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("run the SDK script");
    assert!(
        out.status.success(),
        "SDK script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_store(url: &str) {
    let mut s = store::open(url, Rules::default()).unwrap();
    let events: Vec<_> = s
        .read_feed(&Feed::Events(EventFilter::All), 0, 1000)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            FeedRow::Event(e) => e,
            other => panic!("{other:?}"),
        })
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "page", "identify", "track", "screen", "group", "page", "alias"
        ]
    );
    assert!(events.iter().all(|e| e.event.source_id == SOURCE_ID));
    let lib = &events[0].event.context["library"]["name"];
    assert_eq!(lib, "analytics-python", "the SDK's context.library is kept");

    let track = &events[2].event;
    assert_eq!(track.event.as_deref(), Some("Order Completed"));
    assert_eq!(track.properties["total"], 42.5);
    assert_eq!(
        track.original_timestamp.map(|t| t.to_string()).as_deref(),
        Some("2026-01-02T03:04:05Z")
    );
    assert_eq!(events[4].event.group_id.as_deref(), Some("group-1"));
    assert_eq!(events[6].event.previous_id.as_deref(), Some("anon-2"));

    // Everything resolves to one person: the anonymous visit, the identified user, and the
    // second device linked by alias.
    let profiles: HashSet<&str> = events.iter().map(|e| e.segment_id.as_str()).collect();
    let survivors: HashSet<String> = {
        let (all, _) = s.load_state().unwrap();
        all.into_iter()
            .filter(|p| p.segment_id == p.canonical_segment_id)
            .map(|p| p.segment_id)
            .collect()
    };
    assert_eq!(
        survivors.len(),
        1,
        "one live profile: {survivors:?} (events resolved to {profiles:?})"
    );
    let identifiers = store::state_rows(
        store::StateTable::UserIdentifiers,
        &s.load_state().unwrap().0,
        &s.load_state().unwrap().1,
    );
    let values: HashSet<String> = identifiers
        .iter()
        .map(|r| {
            format!(
                "{}={}",
                r["type"].as_str().unwrap(),
                r["value"].as_str().unwrap()
            )
        })
        .collect();
    for expected in [
        "anonymous_id=anon-1",
        "anonymous_id=anon-2",
        "user_id=user-1",
        "email=ada@example.com",
        "group_id=group-1",
    ] {
        assert!(
            values.contains(expected),
            "{expected} missing from {values:?}"
        );
    }
    let traits = store::state_rows(
        store::StateTable::UserTraits,
        &s.load_state().unwrap().0,
        &s.load_state().unwrap().1,
    );
    let names: HashSet<&str> = traits.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, HashSet::from(["email", "name", "plan"]));
    check_change_logs(&mut *s, &events);
}

/// The change logs the SDK's calls produced: a new identifier each time one is first seen,
/// attributed to the call that carried it; a creation row per profile and the alias's merge in
/// the identity graph; the identify's traits snapshot.
fn check_change_logs(s: &mut dyn store::Store, events: &[store::EventRow]) {
    let log =
        |s: &mut dyn store::Store, feed: Feed| -> Vec<serde_json::Map<String, serde_json::Value>> {
            s.read_feed(&feed, 0, 1000)
                .unwrap()
                .iter()
                .map(FeedRow::to_json)
                .collect()
        };
    let id_of = |i: usize| events[i].event.message_id.clone();
    let mappings: HashSet<(String, String, String)> = log(s, Feed::ExternalIdMappingUpdates)
        .into_iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap().to_string();
            (
                text("external_id_type"),
                text("external_id_value"),
                text("triggering_event_id"),
            )
        })
        .collect();
    for (ty, value, by) in [
        ("anonymous_id", "anon-1", 0),
        ("user_id", "user-1", 1),
        ("email", "ada@example.com", 1),
        ("group_id", "group-1", 4),
        ("anonymous_id", "anon-2", 5),
    ] {
        let want = (ty.to_string(), value.to_string(), id_of(by));
        assert!(
            mappings.contains(&want),
            "{want:?} missing from {mappings:?}"
        );
    }
    assert_eq!(mappings.len(), 5, "one row per identifier: {mappings:?}");

    let graph = log(s, Feed::IdGraphUpdates);
    let pair = |r: &serde_json::Map<String, serde_json::Value>| {
        (
            r["segment_id"].as_str().unwrap().to_string(),
            r["canonical_segment_id"].as_str().unwrap().to_string(),
            r["triggering_event_type"].as_str().unwrap().to_string(),
        )
    };
    let rows: Vec<(String, String, String)> = graph.iter().map(pair).collect();
    let (first, second) = (&events[0].segment_id, &events[5].segment_id);
    assert_ne!(first, second, "the second device starts its own profile");
    assert!(
        rows.contains(&(first.clone(), first.clone(), "page".into())),
        "{rows:?}"
    );
    assert!(
        rows.contains(&(second.clone(), second.clone(), "page".into())),
        "{rows:?}"
    );
    // The alias merges the younger profile into the older.
    assert!(
        rows.contains(&(second.clone(), first.clone(), "alias".into())),
        "{rows:?}"
    );

    let traits = log(s, Feed::ProfileTraitsUpdates);
    let identify = traits
        .iter()
        .find(|r| r["triggering_event_id"] == serde_json::json!(id_of(1)))
        .unwrap_or_else(|| panic!("no traits row for the identify: {traits:?}"));
    assert_eq!(
        identify["traits"],
        serde_json::json!({"email": "ada@example.com", "name": "Ada", "plan": "pro"})
    );
}

/// A TCP relay to `target` (`http://host:port`) that keeps a copy of every byte its clients
/// send: what the SDK put on the wire. Returns its own `http://` address and that copy.
async fn recording_relay(target: &str) -> (String, Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = target.trim_start_matches("http://").to_string();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let copy = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let copy = copy.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                    copy.lock().unwrap().extend_from_slice(&buf[..n]);
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = server_write.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    (format!("http://{addr}"), sent)
}

/// Whether the bytes a client sent hold a `Content-Encoding: gzip` header.
fn sent_gzip(sent: &Mutex<Vec<u8>>) -> bool {
    sent.lock()
        .unwrap()
        .to_ascii_lowercase()
        .windows(b"content-encoding: gzip".len())
        .any(|w| w == b"content-encoding: gzip")
}

#[tokio::test]
async fn the_python_sdk_sends_every_call_type() {
    let t = start(8).await;
    let (relay, sent) = recording_relay(&t.base).await;
    send_with_sdk(&relay, false).await;
    check_store(&t.store_url);
    assert!(!sent_gzip(&sent), "plain JSON bodies");
    t.engine.stop().await.unwrap();
}

/// The same calls with the SDK's gzip on: its bodies reach the engine compressed (seen on the
/// wire), and land as the plain ones do.
#[tokio::test]
async fn the_python_sdk_with_gzip() {
    let t = start(8).await;
    let (relay, sent) = recording_relay(&t.base).await;
    send_with_sdk(&relay, true).await;
    check_store(&t.store_url);
    assert!(sent_gzip(&sent), "the SDK sent no gzip body");
    t.engine.stop().await.unwrap();
}

/// A batch holding a call from a user whose only identifier the identity rules block (`userId`
/// "null") is stored without that call, and answered 200: the SDK does not send a refused
/// batch again, so a 400 lost the batch's other calls.
#[tokio::test]
async fn a_blocked_user_in_an_sdk_batch_leaves_the_others_stored() {
    let t = start(8).await;
    run_sdk_script("send_with_blocked.py", &[&t.base, WRITE_KEY]).await;
    let mut s = store::open(&t.store_url, Rules::default()).unwrap();
    let users: Vec<(String, Option<String>)> = s
        .read_feed(&Feed::Events(EventFilter::All), 0, 100)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            FeedRow::Event(e) => (e.event.event_type.as_str().to_string(), e.event.user_id),
            other => panic!("{other:?}"),
        })
        .collect();
    let some = |t: &str, u: &str| (t.to_string(), Some(u.to_string()));
    assert_eq!(
        users,
        [
            some("track", "user-a"),
            some("track", "user-b"),
            some("identify", "user-c")
        ]
    );
    let metrics = support::engine::metrics(&t.base).await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "profiles_sync_engine_events_rejected_total{reason=\"identity_rules\"} 1"),
        "{metrics}"
    );
    t.engine.stop().await.unwrap();
}
