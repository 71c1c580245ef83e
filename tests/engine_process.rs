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
    // the wait.
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("the engine exited with {exit:?}");
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
