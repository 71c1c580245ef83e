//! A deleted connection releases its hold on the engine's events (its feed consumer), against
//! the in-memory API (see `api_tests.rs` for the fixture) and a one-request stand-in for the
//! engine: the request it makes, and a deletion that goes on, with a Warning Event saying how to
//! release the hold by hand, whenever the engine can't be told.

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::api_tests::{Fixture, NS, builder, connection, fixture_with};
use super::*;

/// The token of the fixture's token file.
const TOKEN: &str = "feed-token";
/// The engine's answer to a wrong token.
const UNAUTHORIZED: &str = r#"{"error":"missing or wrong bearer token"}"#;

/// An engine that answers one request with `status` (and, for an error, [`UNAUTHORIZED`]'s
/// body); the task returns the request's head (request line and headers).
async fn one_answer_engine(status: u16) -> (String, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request ended before its headers");
            head.extend_from_slice(&buf[..n]);
        }
        let body = if status >= 400 { UNAUTHORIZED } else { "" };
        let answer = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(answer.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    (url, served)
}

/// The head of the request the engine of [`one_answer_engine`] was sent (the reconcile that
/// sends it has returned; the bound only keeps a missing request from hanging the test).
async fn request_head(served: tokio::task::JoinHandle<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the engine was sent no request")
        .unwrap()
}

/// A fixture with connection `analytics` being deleted, the engine at `engine_url`.
async fn deleting(engine_url: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = connection(dir.path(), "analytics");
    conn.metadata.finalizers = Some(vec![FINALIZER.into()]);
    conn.metadata.deletion_timestamp = Some(Time("2025-03-01T10:00:00Z".parse().unwrap()));
    let client = builder().with_object(conn).build().await.unwrap();
    let url = engine_url.to_string();
    fixture_with(dir, client, "2025-03-01T10:00:05Z", |s| {
        s.job.engine_url = url
    })
    .await
}

async fn deleted(f: &Fixture) -> bool {
    f.api::<WarehouseConnection>()
        .get_opt("analytics")
        .await
        .unwrap()
        .is_none()
}

/// The RetentionHoldNotReleased Events: (type, note, regarding object's name).
async fn hold_warnings(f: &Fixture) -> Vec<(String, String, String)> {
    f.list::<K8sEvent>()
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("RetentionHoldNotReleased"))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.regarding.and_then(|r| r.name).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn deletion_removes_the_connections_feed_consumer_from_the_engine() {
    let (engine, served) = one_answer_engine(204).await;
    let f = deleting(&engine).await;
    f.reconcile("analytics").await.unwrap();
    let head = request_head(served).await;
    let mut lines = head.lines();
    assert_eq!(
        lines.next(),
        Some(format!("DELETE /v1/feed-consumers/{NS}/analytics HTTP/1.1").as_str()),
        "{head}"
    );
    assert!(
        lines.any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}"))),
        "the feed API token: {head}"
    );
    assert!(deleted(&f).await, "finalizer removed");
    assert_eq!(hold_warnings(&f).await, vec![], "nothing to warn about");
}

/// Whatever keeps the engine from being told — no engine (as at uninstall), an error answer, no
/// token — the connection goes all the same, and a Warning on it says why and how to release
/// the hold by hand; the token is in none of it.
#[tokio::test]
async fn a_hold_the_engine_was_not_told_to_release_is_warned_about_and_the_deletion_goes_on() {
    let (refusing, served) = one_answer_engine(401).await;
    let cases: [(&str, &str, bool, &str); 3] = [
        (
            "unreachable",
            "http://127.0.0.1:1",
            false,
            "the engine is unreachable",
        ),
        (
            "refused",
            &refusing,
            false,
            "the engine answered 401 Unauthorized: {\"error\":\"missing or wrong bearer token\"}",
        ),
        ("no token", "http://127.0.0.1:1", true, "engine token file"),
    ];
    for (case, engine, remove_token, why) in cases {
        let f = deleting(engine).await;
        if remove_token {
            std::fs::remove_file(&f.ctx.settings.engine_token_file).unwrap();
        }
        f.reconcile("analytics").await.unwrap();
        assert!(deleted(&f).await, "{case}: finalizer removed");
        let warnings = hold_warnings(&f).await;
        let [(type_, note, regarding)] = warnings.as_slice() else {
            panic!("{case}: one RetentionHoldNotReleased Event, not {warnings:?}");
        };
        assert_eq!(
            (type_.as_str(), regarding.as_str()),
            ("Warning", "analytics"),
            "{case}"
        );
        assert!(note.contains(why), "{case}: {note}");
        assert!(
            note.contains(&format!(
                "curl -X DELETE -H \"Authorization: Bearer $TOKEN\" {}/v1/feed-consumers/{NS}/analytics",
                engine
            )),
            "{case}: {note}"
        );
        assert!(!note.contains(TOKEN), "{case}: the token leaked: {note}");
    }
    assert!(request_head(served).await.starts_with("DELETE "));
}
