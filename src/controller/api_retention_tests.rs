//! A deleted connection releases its hold on the engine's events (its feed consumer), against
//! the in-memory API (see `api_tests.rs` for the fixture) and a real engine in-process: the
//! record is gone, and the deletion goes on, with a Warning Event saying how to release the
//! hold by hand, whenever the engine can't be told. A record that outlives its connection all
//! the same is removed by the periodic pass of `stale_consumers.rs` once past its grace.

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::api_tests::{Fixture, NS, builder, connection, finalized_connection, fixture_with};
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

    /// Records `name` (`namespace/name`) as a feed consumer last updated at `updated_at`.
    fn record(&self, name: &str, updated_at: Timestamp) {
        self.store()
            .set_consumer(&crate::store::Consumer {
                name: name.into(),
                after_seq: 0,
                window_seconds: 60,
                updated_at,
            })
            .unwrap();
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
    let mut conn = finalized_connection(dir.path(), "analytics");
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

/// Connections `team-a/analytics` and `team-b/marketing`, the engine at `engine_url`, the clock
/// at `now`; `funcs` intercept the in-memory API.
async fn two_connections(
    engine_url: &str,
    now: Timestamp,
    funcs: kube_fake_client::interceptor::Funcs,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let analytics = connection(dir.path(), "analytics");
    let mut marketing = connection(dir.path(), "marketing");
    marketing.metadata.namespace = Some("team-b".into());
    let client = builder()
        .with_object(analytics)
        .with_object(marketing)
        .with_interceptor_funcs(funcs)
        .build()
        .await
        .unwrap();
    let url = engine_url.to_string();
    fixture_with(dir, client, &now.to_string(), |s| s.job.engine_url = url).await
}

/// An engine older than retention answers 404 on the consumers' routes (played by a real
/// engine under a path it does not serve, which answers as an older one does): it holds no
/// record, so a deletion releases nothing and warns about nothing, and the periodic pass finds
/// nothing to remove, without an error.
#[tokio::test]
async fn an_engine_older_than_retention_holds_nothing_and_is_not_warned_about() {
    let engine = Engine::start(TOKEN).await;
    let older = format!("{}/older-release", engine.url);
    let f = deleting(&older).await;
    f.reconcile("analytics").await.unwrap();
    assert!(deleted(&f).await);
    assert_eq!(hold_warnings(&f).await, vec![]);
    let f = two_connections(&older, Timestamp::now(), Default::default()).await;
    assert_eq!(
        stale_consumers::collect(&f.ctx).await.unwrap(),
        Default::default()
    );
    engine.running.stop().await.unwrap();
}

/// `now` less `minutes`.
fn ago(now: Timestamp, minutes: i64) -> Timestamp {
    now - jiff::SignedDuration::from_mins(minutes)
}

#[tokio::test]
async fn a_pass_removes_the_consumers_of_connections_gone_for_longer_than_the_grace() {
    let engine = Engine::start(TOKEN).await;
    let now = Timestamp::now();
    let grace = stale_consumers::GRACE.as_secs() / 60;
    engine.record("team-a/analytics", ago(now, 2 * grace));
    engine.record("team-b/marketing", ago(now, 2 * grace));
    engine.record("team-a/gone", ago(now, 2 * grace));
    engine.record("team-b/analytics", ago(now, grace + 1));
    engine.record("team-a/just-written", ago(now, 5));
    let f = two_connections(&engine.url, now, Default::default()).await;

    let collected = stale_consumers::collect(&f.ctx).await.unwrap();
    assert_eq!(
        collected,
        stale_consumers::Collected {
            removed: vec!["team-a/gone".into(), "team-b/analytics".into()],
            failed: vec![],
        }
    );
    assert_eq!(
        engine.consumers(),
        [
            "team-a/analytics",
            "team-a/just-written",
            "team-b/marketing"
        ],
        "the records of existing connections (in any namespace) and a record within its grace stay"
    );
    assert_eq!(
        stale_consumers::collect(&f.ctx).await.unwrap(),
        Default::default(),
        "the next pass has nothing left to remove"
    );
    engine.running.stop().await.unwrap();
}

/// A stale record the engine won't delete (a name its API refuses, as an older engine may have
/// stored) is reported, and the pass goes on with the others.
#[tokio::test]
async fn a_stale_consumer_the_engine_refuses_to_remove_is_reported_and_the_others_go() {
    let engine = Engine::start(TOKEN).await;
    let now = Timestamp::now();
    engine.record("team-a/Not_A_Name", ago(now, 120));
    engine.record("team-a/gone", ago(now, 120));
    let f = two_connections(&engine.url, now, Default::default()).await;

    let collected = stale_consumers::collect(&f.ctx).await.unwrap();
    assert_eq!(collected.removed, ["team-a/gone"]);
    let [(name, why)] = collected.failed.as_slice() else {
        panic!("one failure, not {:?}", collected.failed);
    };
    assert_eq!(name, "team-a/Not_A_Name");
    assert!(
        why.starts_with("the engine answered 400 Bad Request"),
        "{why}"
    );
    assert_eq!(
        engine.consumers(),
        ["team-a/Not_A_Name", "team-a/analytics"]
    );
    engine.running.stop().await.unwrap();
}

/// Whatever keeps a pass from listing — no engine, an engine with another token, no token, a
/// failing Kubernetes API — it fails with an error that says which list failed and removes
/// nothing; the token is in none of it.
#[tokio::test]
async fn a_pass_that_cannot_list_fails_cleanly_and_removes_nothing() {
    let engine = Engine::start(TOKEN).await;
    let refusing = Engine::start("another-token").await;
    let now = Timestamp::now();
    for e in [&engine, &refusing] {
        e.record("team-a/gone", ago(now, 120));
    }
    let failing_list = || {
        kube_fake_client::interceptor::Funcs::new().list(|_| {
            Err(kube_fake_client::Error::Internal(
                "etcdserver: request timed out".into(),
            ))
        })
    };
    let refused = format!("the engine answered 401 Unauthorized: {UNAUTHORIZED}");
    let cases = [
        (
            "unreachable",
            "http://127.0.0.1:1",
            Default::default(),
            false,
            "listing the engine's feed consumers: the engine is unreachable",
        ),
        (
            "refused",
            refusing.url.as_str(),
            Default::default(),
            false,
            refused.as_str(),
        ),
        (
            "no token",
            engine.url.as_str(),
            Default::default(),
            true,
            "listing the engine's feed consumers: engine token file",
        ),
        (
            "no connections list",
            engine.url.as_str(),
            failing_list(),
            false,
            "listing the WarehouseConnections: ",
        ),
    ];
    for (case, url, funcs, remove_token, why) in cases {
        let f = two_connections(url, now, funcs).await;
        if remove_token {
            std::fs::remove_file(&f.ctx.settings.engine_token_file).unwrap();
        }
        let error = match stale_consumers::collect(&f.ctx).await {
            Ok(c) => panic!("{case}: the pass went on: {c:?}"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(why), "{case}: {error}");
        assert!(!error.contains(TOKEN), "{case}: the token leaked: {error}");
    }
    for e in [&engine, &refusing] {
        assert_eq!(
            e.consumers(),
            ["team-a/analytics", "team-a/gone"],
            "nothing removed"
        );
    }
    engine.running.stop().await.unwrap();
    refusing.running.stop().await.unwrap();
}
