//! The engine binary as a process: acknowledged events survive `kill -9`, exactly once, and
//! SIGTERM shuts it down gracefully.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use profiles_sync::identity::Rules;
use profiles_sync::store::{self, EventFilter, Feed, FeedRow};
use serde_json::json;
use support::engine::WRITE_KEY;

struct EngineProcess {
    child: Child,
    base: String,
}

fn spawn_engine(dir: &Path) -> EngineProcess {
    spawn_engine_with(dir, &[])
}

/// [`spawn_engine`] with more arguments.
fn spawn_engine_with(dir: &Path, args: &[&str]) -> EngineProcess {
    let sources = dir.join("sources.yaml");
    std::fs::write(
        &sources,
        format!("sources:\n  - {{id: src_test, name: Test, slug: test, writeKey: {WRITE_KEY}}}\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
        .args(["engine", "--listen", "127.0.0.1:0", "--sources"])
        .arg(&sources)
        .arg("--store")
        .arg(format!("sqlite://{}", dir.join("store.db").display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the engine");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("engine listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    EngineProcess {
        child,
        base: format!("http://{addr}"),
    }
}

/// Posts `n` events to the engine at `base`, answered 200.
fn post_ok(client: &reqwest::blocking::Client, base: &str, n: usize) {
    let r = client
        .post(format!("{base}/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&batch(0, n))
        .send()
        .unwrap();
    assert!(r.status().is_success());
}

/// Sends SIGTERM to `child`.
fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn batch(from: usize, n: usize) -> serde_json::Value {
    json!({"batch": (from..from + n).map(|i| json!({
        "type": "track", "messageId": format!("m{i}"), "userId": format!("u{}", i % 37), "event": "Order Completed",
        "properties": {"i": i}
    })).collect::<Vec<_>>()})
}

fn stored_ids(dir: &Path) -> Vec<String> {
    let mut s = store::open(
        &format!("sqlite://{}", dir.join("store.db").display()),
        Rules::default(),
    )
    .unwrap();
    s.read_feed(&Feed::Events(EventFilter::All), 0, 1_000_000)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            FeedRow::Event(e) => e.event.message_id,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn acknowledged_events_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = spawn_engine(dir.path());
    let client = reqwest::blocking::Client::new();
    // Acknowledged requests from four concurrent clients; the kill lands right after the last 200
    // while other requests are still in flight.
    let acked: Vec<usize> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (client, base) = (&client, &engine.base);
                scope.spawn(move || {
                    let mut acked = vec![];
                    for b in 0..25 {
                        let from = (t * 25 + b) * 40;
                        let r = client
                            .post(format!("{base}/v1/batch"))
                            .basic_auth(WRITE_KEY, Some(""))
                            .json(&batch(from, 40))
                            .send();
                        match r {
                            Ok(r) if r.status().is_success() => acked.extend(from..from + 40),
                            _ => break,
                        }
                    }
                    acked
                })
            })
            .collect();
        // Kill as soon as the first client has finished all its batches.
        let first = handles.into_iter().map(|h| (h, false)).collect::<Vec<_>>();
        let mut out = vec![];
        let mut killed = false;
        for (h, _) in first {
            let ids = h.join().unwrap();
            if !killed {
                engine.child.kill().unwrap();
                killed = true;
            }
            out.extend(ids);
        }
        out
    });
    engine.child.wait().unwrap();
    assert!(
        acked.len() >= 1000,
        "the first client's batches were acknowledged: {}",
        acked.len()
    );

    let ids = stored_ids(dir.path());
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an event was stored twice");
    for i in &acked {
        assert!(
            unique.contains(&format!("m{i}")),
            "acknowledged event m{i} was lost"
        );
    }

    // Restart on the same store; clients retry everything: still exactly once.
    let mut engine = spawn_engine(dir.path());
    for from in (0..4000).step_by(400) {
        let r = client
            .post(format!("{}/v1/batch", engine.base))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&batch(from, 400))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }
    let ids = stored_ids(dir.path());
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (4000, 4000));
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
}

#[test]
fn sigterm_stops_the_engine_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = spawn_engine(dir.path());
    let client = reqwest::blocking::Client::new();
    post_ok(&client, &engine.base, 10);
    sigterm(&engine.child);
    let exit = engine.child.wait().unwrap();
    assert!(
        exit.success(),
        "the engine must exit 0 on SIGTERM, got {exit:?}"
    );
    assert_eq!(stored_ids(dir.path()).len(), 10);
}

/// After SIGTERM the engine goes on accepting connections for `--shutdown-delay-secs`, `/readyz`
/// answering 503 "shutting down" (Kubernetes' endpoints and ingresses take a pod out only after
/// its SIGTERM; a refused connection then is a 502 at an ingress), then stops by itself with
/// status 0. It used to close its listener at once, so that nobody could see it "shutting
/// down" (review).
#[test]
fn after_sigterm_the_engine_answers_not_ready_before_it_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = spawn_engine_with(dir.path(), &["--shutdown-delay-secs", "3"]);
    let client = reqwest::blocking::Client::new();
    post_ok(&client, &engine.base, 5);
    sigterm(&engine.child);
    // Until the signal is handled /readyz answers 200; then 503 on a new connection, which
    // the engine still accepts.
    let answer = loop {
        let r = client
            .get(format!("{}/readyz", engine.base))
            .send()
            .expect("a new connection during the shutdown delay is accepted");
        if r.status() != reqwest::StatusCode::OK {
            break (r.status(), r.text().unwrap());
        }
        std::thread::yield_now();
    };
    assert_eq!(
        answer.0,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "{answer:?}"
    );
    assert!(answer.1.contains("shutting down"), "{answer:?}");
    let exit = engine.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(stored_ids(dir.path()).len(), 5);
}

/// An engine whose stdout and stderr are pipes nobody reads any more (`engine … 2>&1 | head`,
/// a supervisor gone) serves, logs nowhere, and stops on SIGTERM with status 0. Its address
/// line panicked the main thread when stdout was closed first; a log line to a closed stderr
/// panicked whichever thread logged — the signal handler's one meant no SIGTERM ever stopped it.
#[test]
fn an_engine_with_its_output_pipes_closed_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sources = dir.path().join("sources.yaml");
    std::fs::write(
        &sources,
        format!("sources:\n  - {{id: src_test, name: Test, slug: test, writeKey: {WRITE_KEY}}}\n"),
    )
    .unwrap();
    // A free port: the address line cannot be read from a closed stdout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
        .args([
            "engine",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--sources",
        ])
        .arg(&sources)
        .arg("--store")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("store.db").display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the engine");
    drop(child.stdout.take());
    drop(child.stderr.take());
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    // Ready once /readyz answers 200; an engine that died answers nothing, and its exit ends
    // the wait, as does a minute (an engine that never turns ready).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("the engine exited with {exit:?}");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the engine did not turn ready within a minute");
        }
        if client
            .get(format!("{base}/readyz"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        std::thread::yield_now();
    }
    post_ok(&client, &base, 5);
    sigterm(&child);
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit on SIGTERM: {exit:?}");
    assert_eq!(stored_ids(dir.path()).len(), 5);
}

/// Replaces `path` with `text` as the kubelet updates a mounted Secret: the new content is a
/// new file, swapped in at once (a reader never sees half of it).
fn swap_in(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// The value of the counter `line` (a metric and its labels) on the engine's `/metrics`.
fn counter(client: &reqwest::blocking::Client, base: &str, line: &str) -> u64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The sources file and the feed token file are read again when they change, as a mounted
/// Secret does in a cluster: a new source's write key (as the basic-auth user or in the body)
/// is taken at once, its source recorded in the store; a rotated token works at once and the
/// old one no longer does; a removed key is refused after the next check; a file that does not
/// parse is refused and the engine keeps what it had. Before, each was read at start only: a
/// new source's events got 401 (the SDKs drop them) until the engine restarted.
#[test]
fn a_new_source_and_a_rotated_feed_token_are_taken_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "token-one\n").unwrap();
    let mut engine = spawn_engine_with(dir.path(), &["--feed-token-file", token.to_str().unwrap()]);
    let (client, base) = (reqwest::blocking::Client::new(), engine.base.clone());
    let sources = dir.path().join("sources.yaml");
    let track = |key: Option<&str>, body_key: Option<&str>, id: &str| {
        let mut body = json!({"userId": "u", "event": "Seen", "messageId": id});
        if let Some(k) = body_key {
            body["writeKey"] = json!(k);
        }
        let mut r = client.post(format!("{base}/v1/track")).json(&body);
        if let Some(k) = key {
            r = r.basic_auth(k, Some(""));
        }
        r.send().unwrap().status()
    };
    let catalog = |t: &str| {
        client
            .get(format!("{base}/v1/feeds"))
            .bearer_auth(t)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(track(Some("wk_new"), None, "refused"), 401);
    assert_eq!(catalog("token-one"), 200);

    swap_in(
        &sources,
        &format!(
            "sources:\n  - {{id: src_test, name: Test, slug: test, writeKey: {WRITE_KEY}}}\n  \
             - {{id: src_new, name: New, slug: new, writeKey: wk_new}}\n  \
             - {{id: src_body, name: Body, slug: body, writeKey: wk_body}}\n"
        ),
    );
    assert_eq!(track(Some("wk_new"), None, "by-header"), 200);
    assert_eq!(track(None, Some("wk_body"), "by-body"), 200);
    assert_eq!(track(Some(WRITE_KEY), None, "old-key"), 200);

    swap_in(&token, "token-two\n");
    assert_eq!(catalog("token-two"), 200, "the new token at once");
    assert_eq!(catalog("token-one"), 401, "the old token no longer");

    // A file that does not parse: refused (once), the keys in use stay.
    let refused = "profiles_sync_engine_file_reloads_total{file=\"sources\",outcome=\"refused\"}";
    swap_in(&sources, "sources: [{id: broken");
    assert_eq!(track(Some("wk_unknown"), None, "unknown"), 401);
    assert_eq!(counter(&client, &base, refused), 1);
    assert_eq!(track(Some("wk_new"), None, "after-broken"), 200);

    // A removed key: refused once the engine has looked (every 5 s; a known key does not make
    // it look).
    let applied = "profiles_sync_engine_file_reloads_total{file=\"sources\",outcome=\"applied\"}";
    let before = counter(&client, &base, applied);
    swap_in(
        &sources,
        "sources:\n  - {id: src_new, name: New, slug: new, writeKey: wk_new}\n",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while counter(&client, &base, applied) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the changed sources file was not read again within a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(track(Some(WRITE_KEY), None, "removed-key"), 401);
    assert_eq!(track(Some("wk_new"), None, "still-new"), 200);
    assert_eq!(
        counter(&client, &base, refused),
        1,
        "the broken file refused once"
    );

    sigterm(&engine.child);
    assert!(engine.child.wait().unwrap().success());
    let mut stored = stored_ids(dir.path());
    stored.sort();
    assert_eq!(
        stored,
        [
            "after-broken",
            "by-body",
            "by-header",
            "old-key",
            "still-new"
        ]
    );
    let mut s = store::open(
        &format!("sqlite://{}", dir.path().join("store.db").display()),
        Rules::default(),
    )
    .unwrap();
    let ids: Vec<String> = s.sources().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["src_body", "src_new", "src_test"]);
    let by_source: Vec<(String, String)> = s
        .read_feed(&Feed::Events(EventFilter::All), 0, 100)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            FeedRow::Event(e) => (e.event.message_id, e.event.source_id),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        by_source.contains(&("by-body".into(), "src_body".into())),
        "{by_source:?}"
    );
    assert!(
        by_source.contains(&("by-header".into(), "src_new".into())),
        "{by_source:?}"
    );
}
