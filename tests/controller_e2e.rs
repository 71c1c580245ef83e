//! End to end over HTTP: the real `profiles-sync controller` binary against the emulated API
//! server (`tests/kmock/apiserver.py`), driven with `kubectl` the way users drive a cluster.
//!
//! Real parts: the controller binary, kubectl, the PostgreSQL test server as the warehouse, an
//! engine (in this process, on a random port) serving the change feeds and the feed consumers
//! (whose records a deleted connection releases), and the sync binary itself. The test harness
//! stands in for the kubelet and the Job controller, which kmock does not run: it executes each
//! new Job's command on this machine with the Job's ConfigMap and Secrets written to directories
//! at the mount paths' places, then writes a Pod with the termination message and the Job's
//! completion back through the API (`support/kube.rs`).
//!
//! kmock's limits, and how this test stays clear of them: merge patches are naive (the
//! controller's patches are plain merge patches carrying a resourceVersion); server-side apply
//! never conflicts and doesn't create as a real server does (the controller doesn't use it);
//! a stale resourceVersion is only refused on PUT and on patches that carry it (the 409 path is
//! covered against the in-memory API in `src/controller/api_tests.rs` instead); no validation of
//! enums or CEL rules (so a malformed object can be stored here, which the test uses on purpose);
//! timestamps are to the second; no garbage collector runs except the owner-reference cascade on
//! delete. Waiting is by bounded polling, never by sleeping for a fixed time.

#[path = "support/kube.rs"]
mod kube_harness;
mod support;

use std::time::Duration;

use kube_harness::{ApiServer, ControllerProcess, Kubectl, Kubelet};
use serde_json::json;
use support::engine::{FEED_TOKEN, WRITE_KEY};
use support::eventually;

const WAIT: Duration = Duration::from_secs(60);

async fn query_count(db: String, sql: String) -> Result<i64, String> {
    tokio::task::spawn_blocking(move || {
        let mut c = support::pg::shared().connect(&db);
        c.query_one(&sql, &[])
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn admin(sql: String) {
    tokio::task::spawn_blocking(move || {
        support::pg::shared()
            .connect("postgres")
            .batch_execute(&sql)
            .expect("admin SQL")
    })
    .await
    .expect("admin task");
}

async fn send_events(base: &str) {
    let http = reqwest::Client::new();
    let calls = [
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"email": "a@example.com", "plan": "pro"}}),
        ),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "Order Completed", "properties": {"total": 42}}),
        ),
        (
            "/v1/track",
            json!({"anonymousId": "a9", "event": "Order Completed", "properties": {"total": 7}}),
        ),
        ("/v1/page", json!({"userId": "u1", "name": "Home"})),
    ];
    for (path, body) in calls {
        let r = http
            .post(format!("{base}{path}"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&body)
            .send()
            .await
            .expect("ingest");
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
}

/// The names of the engine's feed consumers (`GET /v1/feed-consumers`).
async fn feed_consumers(base: &str) -> Vec<String> {
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/feed-consumers"))
        .bearer_auth(FEED_TOKEN)
        .send()
        .await
        .expect("list feed consumers");
    assert_eq!(r.status(), 200, "GET /v1/feed-consumers");
    let doc: serde_json::Value = r.json().await.expect("feed consumers JSON");
    doc["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .map(|c| c["name"].as_str().expect("a consumer's name").to_string())
        .collect()
}

fn manifests(port: u16, database: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: analytics-warehouse
stringData:
  username: postgres
  password: s3cret-not-checked-by-trust-auth
---
apiVersion: profilesync.dev/v1alpha1
kind: WarehouseConnection
metadata:
  name: analytics
spec:
  warehouse:
    type: postgres
    postgres:
      host: 127.0.0.1
      port: {port}
      database: {database}
      sslMode: disable
    credentialsSecretRef:
      name: analytics-warehouse
  # Yearly, so no scheduled slot falls inside the test and every Job is one the test asked for.
  schedule: "0 0 1 1 *"
---
apiVersion: profilesync.dev/v1alpha1
kind: SelectiveSync
metadata:
  name: analytics
spec:
  connectionRef:
    name: analytics
  tables:
    - name: pages
      enabled: false
"#
    )
}

fn syncs(k: &Kubectl) -> Vec<String> {
    k.jsonpath(&["whc", "analytics"], "{.status.syncs[*].status}")
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn condition(k: &Kubectl, type_: &str, field: &str) -> String {
    k.jsonpath(
        &["whc", "analytics"],
        &format!("{{.status.conditions[?(@.type==\"{type_}\")].{field}}}"),
    )
}

async fn wait_syncs(k: &Kubectl, n: usize, what: &str) -> Vec<String> {
    eventually(what, WAIT, async || {
        let s = syncs(k);
        if s.len() >= n {
            Ok(s)
        } else {
            Err(format!("syncs {s:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_binary_schedules_syncs_and_writes_status_over_http() {
    let utc_year = || {
        jiff::Timestamp::now()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .year()
    };
    // (The year the test starts in, and the one it checks the schedule in: a run across New
    // Year's midnight sees either next slot.)
    let first_year = utc_year();
    let dir = tempfile::tempdir().expect("temp dir");
    let pg_port = support::pg::shared().port();
    let database = tokio::task::spawn_blocking(|| support::pg::shared().create_database("e2e"))
        .await
        .expect("create db");
    let engine = support::engine::start(64).await;
    send_events(&engine.base).await;
    let token_file = dir.path().join("engine-token");
    std::fs::write(&token_file, format!("{FEED_TOKEN}\n")).expect("token file");

    let api = ApiServer::start(dir.path());
    let k = api.kubectl();
    let mut controller = ControllerProcess::start(
        dir.path(),
        &api.kubeconfig,
        &engine.base,
        &token_file,
        &["--egress-ips", "203.0.113.7,203.0.113.8"],
    );
    let kubelet = Kubelet::start(k.client().await, dir.path().to_path_buf());

    // /healthz at once, /readyz once the first list of connections arrived.
    eventually("/readyz", WAIT, async || {
        match controller.get("/readyz").await {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(controller.get("/healthz").await.map(|r| r.0), Ok(200));

    // --- kubectl apply: the first sync runs right after the connection verifies.
    k.apply(&manifests(pg_port, &database));
    let first = wait_syncs(&k, 1, "the first sync").await;
    assert_eq!(first, ["Success"], "controller log:\n{}", controller.log());
    let table = k.run(&["get", "whc", "analytics"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["analytics", "postgres", "profiles_sync", "false", "True"],
        "{table}"
    );
    assert_eq!(row[6], "Success", "{table}");
    let rows: i64 = row[7].parse().expect("rows column");
    assert!(rows > 0, "{table}");
    assert_eq!(condition(&k, "ConnectionVerified", "reason"), "Connected");
    let next: jiff::Timestamp = k
        .jsonpath(&["whc", "analytics"], "{.status.nextSyncTime}")
        .parse()
        .expect("nextSyncTime");
    let slots: Vec<String> = [first_year, utc_year()]
        .iter()
        .map(|year| format!("{}-01-01T00:00:00Z", year + 1))
        .collect();
    assert!(
        slots.contains(&next.to_string()),
        "the next slot of the cron schedule: {next}, not one of {slots:?}"
    );
    assert_eq!(
        k.jsonpath(&["whc", "analytics"], "{.status.frequency}"),
        "cron 0 0 1 1 * (UTC)"
    );
    assert_eq!(
        k.jsonpath(&["whc", "analytics"], "{.status.egressIps[*]}"),
        "203.0.113.7 203.0.113.8"
    );
    assert_eq!(
        k.jsonpath(&["whc", "analytics"], "{.status.syncs[0].jobName}"),
        k.jsonpath(
            &["jobs", "-l", "profilesync.dev/connection=analytics"],
            "{.items[0].metadata.name}"
        )
    );

    // The rows are in the warehouse; the disabled table is not.
    let tracks = query_count(
        database.clone(),
        "SELECT count(*) FROM profiles_sync.order_completed".into(),
    )
    .await;
    assert_eq!(tracks, Ok(2));
    let pages = query_count(
        database.clone(),
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'profiles_sync' AND tablename = 'pages'"
            .into(),
    )
    .await;
    assert_eq!(pages, Ok(0), "pages is disabled by the SelectiveSync");

    // The SelectiveSync's status: valid, applied, rows per table, the engine's Track tables.
    assert_eq!(
        k.jsonpath(&["ssync", "analytics"], "{.status.availableTables[*]}"),
        "order_completed"
    );
    assert_eq!(
        k.jsonpath(
            &["ssync", "analytics"],
            "{.status.conditions[?(@.type==\"Ready\")].reason}"
        ),
        "Applied"
    );
    assert_eq!(
        k.jsonpath(
            &["ssync", "analytics"],
            "{.status.tables[?(@.name==\"order_completed\")].rows}"
        ),
        "2"
    );

    // Events, metrics, and no secret anywhere the controller writes.
    let reasons = k.jsonpath(&["events"], "{.items[*].reason}");
    for r in ["ConnectionVerified", "SyncStarted", "SyncSucceeded"] {
        assert!(reasons.contains(r), "{r} not in {reasons}");
    }
    let (_, metrics) = controller.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("profiles_sync_controller_sync_runs_total{result=\"Success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "profiles_sync_controller_reconciles_total{controller=\"warehouseconnection\"}"
        ),
        "{metrics}"
    );
    for dump in [
        k.run(&["get", "jobs,configmaps,whc,events", "-o", "yaml"]),
        controller.log(),
    ] {
        assert!(!dump.contains("s3cret-not-checked"), "a credential leaked");
    }

    // --- sync-now: one more sync, and the annotation is acknowledged (removed).
    k.run(&[
        "annotate",
        "whc",
        "analytics",
        "profilesync.dev/sync-now=first",
    ]);
    wait_syncs(&k, 2, "the manual sync").await;
    eventually("sync-now acknowledged", WAIT, async || {
        let a = k.jsonpath(
            &["whc", "analytics"],
            "{.metadata.annotations.profilesync\\.dev/sync-now}",
        );
        if a.is_empty() { Ok(()) } else { Err(a) }
    })
    .await;
    assert_eq!(kubelet.count(), 2);
    // BackfillComplete mirrors the newest report's `backfilling` list: every table read its
    // feed to the end, so the backfill is complete.
    assert_eq!(
        (
            condition(&k, "BackfillComplete", "status"),
            condition(&k, "BackfillComplete", "reason"),
        ),
        ("True".into(), "CaughtUp".into())
    );

    // --- a SelectiveSync whose connectionRef names no connection says so in its status.
    k.apply("apiVersion: profilesync.dev/v1alpha1\nkind: SelectiveSync\nmetadata:\n  name: typo\nspec:\n  connectionRef:\n    name: analytcs\n");
    eventually(
        "ConnectionNotFound on the orphan SelectiveSync",
        WAIT,
        async || {
            let reason = k.jsonpath(
                &["ssync", "typo"],
                "{.status.conditions[?(@.type==\"Valid\")].reason}",
            );
            if reason == "ConnectionNotFound" {
                Ok(())
            } else {
                Err(format!("Valid reason {reason:?}"))
            }
        },
    )
    .await;

    // --- a malformed connection (kmock stores what a real API server's schema would refuse)
    // must not stop the controller from serving the others.
    k.apply("apiVersion: profilesync.dev/v1alpha1\nkind: WarehouseConnection\nmetadata:\n  name: broken\nspec:\n  warehouse:\n    type: oracle\n");

    // --- suspend: no new Jobs (a sync-now waits), no next sync; resume runs the pending request.
    k.run(&[
        "patch",
        "whc",
        "analytics",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    k.run(&[
        "annotate",
        "whc",
        "analytics",
        "profilesync.dev/sync-now=while-suspended",
    ]);
    eventually("Suspended", WAIT, async || {
        let (s, msg) = (
            condition(&k, "Suspended", "status"),
            condition(&k, "Syncing", "message"),
        );
        if s == "True" && msg.contains("suspended") {
            Ok(())
        } else {
            Err(format!("{s} {msg}"))
        }
    })
    .await;
    assert_eq!(
        k.jsonpath(&["whc", "analytics"], "{.status.nextSyncTime}"),
        ""
    );
    assert_eq!(kubelet.count(), 2, "no Job while suspended");
    assert_eq!(
        k.jsonpath(
            &["whc", "analytics"],
            "{.metadata.annotations.profilesync\\.dev/sync-now}"
        ),
        "while-suspended"
    );
    k.run(&[
        "patch",
        "whc",
        "analytics",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    wait_syncs(&k, 3, "the sync requested while suspended").await;
    assert_eq!(condition(&k, "Suspended", "status"), "False");
    assert!(
        controller.log().contains("cannot be decoded"),
        "the malformed object was reported"
    );
    assert_eq!(
        k.jsonpath(&["whc", "broken"], "{.status}"),
        "",
        "no status for an object that can't be read"
    );

    // --- a failing warehouse: the database disappears; the next sync fails, the connection is
    // re-tested and shows why; Ready goes False.
    let moved = format!("{database}_moved");
    admin(format!(
        "ALTER DATABASE \"{database}\" RENAME TO \"{moved}\""
    ))
    .await;
    k.run(&[
        "annotate",
        "whc",
        "analytics",
        "profilesync.dev/sync-now=after-break",
    ]);
    eventually(
        "a Failed sync and ConnectionVerified False",
        WAIT,
        async || {
            let (s, v) = (syncs(&k), condition(&k, "ConnectionVerified", "status"));
            if s.first().map(String::as_str) == Some("Failed") && v == "False" {
                Ok(())
            } else {
                Err(format!("{s:?} {v}"))
            }
        },
    )
    .await;
    assert_eq!(condition(&k, "ConnectionVerified", "reason"), "Unreachable");
    assert!(condition(&k, "ConnectionVerified", "message").contains("does not exist"));
    assert_eq!(condition(&k, "Ready", "status"), "False");
    assert!(
        k.jsonpath(&["events"], "{.items[*].reason}")
            .contains("SyncFailed")
    );

    // --- the database is back; the test-connection annotation re-tests at once.
    admin(format!(
        "ALTER DATABASE \"{moved}\" RENAME TO \"{database}\""
    ))
    .await;
    k.run(&[
        "annotate",
        "whc",
        "analytics",
        "profilesync.dev/test-connection=now",
    ]);
    eventually("ConnectionVerified True again", WAIT, async || {
        let (v, a) = (
            condition(&k, "ConnectionVerified", "status"),
            k.jsonpath(
                &["whc", "analytics"],
                "{.metadata.annotations.profilesync\\.dev/test-connection}",
            ),
        );
        if v == "True" && a.is_empty() {
            Ok(())
        } else {
            Err(format!("{v} annotation={a:?}"))
        }
    })
    .await;

    // --- new credentials in the Secret: the Secret watch re-tests the connection at once.
    k.apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: analytics-warehouse\nstringData:\n  username: nobody_here\n");
    eventually(
        "AuthenticationFailed after the Secret changed",
        WAIT,
        async || {
            let r = condition(&k, "ConnectionVerified", "reason");
            if r == "AuthenticationFailed" {
                Ok(())
            } else {
                Err(r)
            }
        },
    )
    .await;
    k.apply("apiVersion: v1\nkind: Secret\nmetadata:\n  name: analytics-warehouse\nstringData:\n  username: postgres\n");
    eventually("Connected after the Secret was fixed", WAIT, async || {
        let r = condition(&k, "ConnectionVerified", "reason");
        if r == "Connected" { Ok(()) } else { Err(r) }
    })
    .await;

    // --- deletion: Jobs and ConfigMaps go, the engine lets go of the events the connection had
    // not loaded (its feed consumer, recorded here as a sync Job records it, is removed before
    // the finalizer goes, so by the time `kubectl delete` returns), the finalizer goes, the
    // warehouse data stays.
    let recorded = reqwest::Client::new()
        .put(format!(
            "{}/v1/feed-consumers/default/analytics",
            engine.base
        ))
        .bearer_auth(FEED_TOKEN)
        .json(&json!({"afterSeq": 1, "backfillWindowSeconds": 0}))
        .send()
        .await
        .expect("record the connection's feed consumer");
    assert_eq!(recorded.status(), 204, "PUT /v1/feed-consumers");
    assert_eq!(feed_consumers(&engine.base).await, ["default/analytics"]);
    let (ok, out, err) = k.try_run(&["delete", "whc", "analytics", "--timeout=60s"], None);
    assert!(ok, "{out}{err}\n{}", controller.log());
    assert_eq!(
        feed_consumers(&engine.base).await,
        Vec::<String>::new(),
        "the deleted connection's hold is released; controller log:\n{}",
        controller.log()
    );
    let reasons = k.jsonpath(&["events"], "{.items[*].reason}");
    assert!(!reasons.contains("RetentionHoldNotReleased"), "{reasons}");
    assert!(
        !controller.log().contains(FEED_TOKEN),
        "the engine token leaked into the log"
    );
    eventually("owned objects removed", WAIT, async || {
        let left = k.run(&[
            "get",
            "jobs,configmaps",
            "-l",
            "profilesync.dev/connection=analytics",
            "-o",
            "name",
        ]);
        if left.trim().is_empty() {
            Ok(())
        } else {
            Err(left)
        }
    })
    .await;
    assert_eq!(k.jsonpath(&["whc", "analytics"], "{.metadata.name}"), "");
    let kept = query_count(
        database.clone(),
        "SELECT count(*) FROM profiles_sync.order_completed".into(),
    )
    .await;
    assert_eq!(kept, Ok(2), "deletion never touches warehouse data");

    // --- graceful shutdown on SIGTERM.
    assert!(
        controller.terminate(Duration::from_secs(20)),
        "the controller exits cleanly on SIGTERM:\n{}",
        controller.log()
    );
    drop(kubelet);
    engine.engine.stop().await.expect("engine stops");

    // --- every API call the controller made in all of the above is one its ClusterRole
    // allows: `API_CALLS`, which `controller_rbac` checks against the role's rules, holds it.
    let log = std::fs::read_to_string(dir.path().join("apiserver.log")).expect("apiserver log");
    let ua = format!("ua={}", json!(profiles_sync::cli::controller::USER_AGENT));
    let calls: std::collections::BTreeSet<(String, String, String)> = log
        .lines()
        .filter(|l| l.ends_with(&ua))
        .filter_map(api_call)
        .collect();
    assert!(
        calls.contains(&("batch".into(), "jobs".into(), "create".into())),
        "the controller's calls are told apart by its User-Agent: {calls:?}"
    );
    let unlisted: Vec<_> = calls
        .iter()
        .filter(|(g, r, v)| {
            !profiles_sync::controller::API_CALLS
                .iter()
                .any(|c| (c.0, c.1, c.2) == (g.as_str(), r.as_str(), v.as_str()))
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "calls the controller made that API_CALLS (and so its ClusterRole) leaves out: {unlisted:?}"
    );
}

/// The RBAC `(apiGroup, resource[/subresource], verb)` of a request line of the API server's
/// log (`HH:MM:SS.mmm METHOD PATH STATUS …`); `None` for discovery and other non-resource
/// URLs, which every authenticated client may read.
fn api_call(line: &str) -> Option<(String, String, String)> {
    let mut words = line.split(' ').skip(1);
    let method = words.next()?;
    let target = words.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, name, sub) = match rest {
        [] => return None,
        [r] => (*r, None, None),
        [r, n] => (*r, Some(*n), None),
        [r, n, s, ..] => (*r, Some(*n), Some(*s)),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    let resource = match sub {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    Some((group.to_string(), resource, verb.to_string()))
}
