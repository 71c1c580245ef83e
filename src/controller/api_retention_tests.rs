//! A deleted connection releases its hold on the engine's events (its feed consumer), against
//! the in-memory API (see `api_tests.rs` for the fixture) and a real engine in-process: the
//! record is gone, and the deletion goes on, with a Warning Event saying how to release the
//! hold by hand, whenever the engine can't be told.

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::api_tests::{Fixture, NS, builder, connection, fixture_with};
use super::*;
use crate::store::Store;

/// The token of the fixture's token file.
const TOKEN: &str = "feed-token";
/// The engine's answer to a wrong token.
const UNAUTHORIZED: &str = r#"{"error":"missing or wrong bearer token"}"#;

/// A real engine on a fresh SQLite store, its feed API taking `token`, with the connection
/// `analytics` recorded as a feed consumer; its URL and store URL.
struct Engine {
    running: crate::engine::RunningEngine,
    url: String,
    store_url: String,
    _dir: tempfile::TempDir,
}

impl Engine {
    async fn start(token: &str) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let store_url = format!("sqlite://{}", dir.path().join("store.db").display());
        let sources = crate::engine::sources::Sources::from_yaml(
            "sources:\n  - {id: src, name: Site, slug: site, writeKey: wk_test}\n",
        )
        .unwrap();
        let config = crate::engine::EngineConfig {
            feed_token: Some(token.into()),
            ..crate::engine::EngineConfig::new(
                store_url.clone(),
                "127.0.0.1:0".parse().unwrap(),
                sources,
            )
        };
        let running = crate::engine::start(config).await.unwrap();
        running.loaded().await;
        let url = format!("http://{}", running.addr);
        let engine = Engine {
            running,
            url,
            store_url,
            _dir: dir,
        };
        engine
            .store()
            .set_consumer(&crate::store::Consumer {
                name: format!("{NS}/analytics"),
                after_seq: 0,
                window_seconds: 60,
                updated_at: jiff::Timestamp::now(),
            })
            .unwrap();
        engine
    }

    fn store(&self) -> Box<dyn Store> {
        crate::store::open(&self.store_url, crate::identity::Rules::default()).unwrap()
    }

    /// The names of the consumers the engine's store records.
    fn consumers(&self) -> Vec<String> {
        self.store()
            .consumers()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }
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
    let engine = Engine::start(TOKEN).await;
    assert_eq!(engine.consumers(), [format!("{NS}/analytics")]);
    let f = deleting(&engine.url).await;
    f.reconcile("analytics").await.unwrap();
    assert_eq!(
        engine.consumers(),
        Vec::<String>::new(),
        "the record is gone"
    );
    assert!(deleted(&f).await, "finalizer removed");
    assert_eq!(hold_warnings(&f).await, vec![], "nothing to warn about");
    engine.running.stop().await.unwrap();
}

/// Whatever keeps the engine from being told — no engine (as at uninstall), an error answer (an
/// engine with another token), no token — the connection goes all the same, and a Warning on it
/// says why and how to release the hold by hand; the token is in none of it.
#[tokio::test]
async fn a_hold_the_engine_was_not_told_to_release_is_warned_about_and_the_deletion_goes_on() {
    let refusing = Engine::start("another-token").await;
    let refused = format!("the engine answered 401 Unauthorized: {UNAUTHORIZED}");
    let cases: [(&str, &str, bool, &str); 3] = [
        (
            "unreachable",
            "http://127.0.0.1:1",
            false,
            "the engine is unreachable",
        ),
        ("refused", &refusing.url, false, &refused),
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
    assert_eq!(
        refusing.consumers(),
        [format!("{NS}/analytics")],
        "a refused request changed nothing"
    );
    refusing.running.stop().await.unwrap();
}
