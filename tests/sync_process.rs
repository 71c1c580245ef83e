//! `profiles-sync sync` as the Job runs it: manifests from files, credentials from a mounted
//! Secret's layout, the feed from a store or the engine's API, the report on stdout and in the
//! termination log — and killed with SIGKILL at 20 points of a large load, it still ends with
//! exactly the tables of one clean run.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use profiles_sync::sample::SampleGenerator;
use profiles_sync::warehouse::Warehouse;
use serde_json::{Value, json};
use support::engine::{FEED_TOKEN, WRITE_KEY};
use support::warehouse::{TestWarehouse, ingest, store};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_profiles-sync"))
}

/// Writes the connection manifest (and a credentials dir) for a test warehouse.
fn manifests(dir: &Path, wh: &TestWarehouse, selection: Option<Value>) -> Vec<String> {
    let conn = json!({
        "apiVersion": "profilesync.dev/v1alpha1", "kind": "WarehouseConnection",
        "metadata": {"name": "wh"},
        "spec": serde_json::to_value(&wh.spec).unwrap(),
    });
    std::fs::write(
        dir.join("connection.yaml"),
        yaml_serde::to_string(&conn).unwrap(),
    )
    .unwrap();
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    if let Some(u) = &wh.credentials.username {
        std::fs::write(creds.join("username"), u).unwrap();
        std::fs::write(creds.join("password"), "unused-by-trust-auth").unwrap();
    }
    let mut args = vec![
        "-f".to_string(),
        dir.join("connection.yaml").display().to_string(),
    ];
    if let Some(sel) = selection {
        let s = json!({"apiVersion": "profilesync.dev/v1alpha1", "kind": "SelectiveSync", "metadata": {"name": "wh"}, "spec": sel});
        std::fs::write(
            dir.join("selection.yaml"),
            yaml_serde::to_string(&s).unwrap(),
        )
        .unwrap();
        args.extend([
            "-f".to_string(),
            dir.join("selection.yaml").display().to_string(),
        ]);
    }
    args.extend(["--credentials-dir".to_string(), creds.display().to_string()]);
    args
}

fn sample_store(people: u64) -> (String, tempfile::TempDir) {
    let (mut s, url, dir) = store();
    let now = jiff::Timestamp::now().as_second() - 86_400;
    let messages: Vec<Value> = SampleGenerator::new(42, people, now).flatten().collect();
    for chunk in messages.chunks(5000) {
        ingest(&mut *s, chunk);
    }
    (url, dir)
}

#[test]
fn the_job_command_reports_on_stdout_and_in_the_termination_log() {
    let (url, _d) = sample_store(50);
    let wh = TestWarehouse::postgres();
    let dir = tempfile::tempdir().unwrap();
    let args = manifests(
        dir.path(),
        &wh,
        Some(
            json!({"connectionRef": {"name": "wh"}, "tables": [{"name": "pages", "enabled": false}]}),
        ),
    );
    let log = dir.path().join("termination-log");
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--store", &url, "--id", "wh-123", "--termination-log"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "Success");
    assert_eq!(report["id"], "wh-123");
    assert!(report["rows"]["total"].as_i64().unwrap() > 100);
    let logged: Value = serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(logged["rows"], report["rows"]);
    assert!(std::fs::metadata(&log).unwrap().len() <= 4096);
    assert_eq!(wh.count("pages"), 0, "the SelectiveSync file applies");
    assert!(wh.count("tracks") > 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("unused-by-trust-auth"),
        "credentials must never be logged"
    );

    // A stdout that takes nothing (`> /dev/full`): the termination log is still written and
    // the outcome stands (the report's print panicked first, exit 101, no log).
    std::fs::remove_file(&log).unwrap();
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--store", &url, "--id", "wh-124", "--termination-log"])
        .arg(&log)
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logged: Value = serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(logged["status"], "Success");
}

#[test]
fn a_failed_sync_exits_non_zero_with_a_classified_error() {
    let (url, _d) = sample_store(5);
    let mut wh = TestWarehouse::postgres();
    // Nothing listens on port 1.
    wh.spec.warehouse.postgres.as_mut().unwrap().port = 1;
    let dir = tempfile::tempdir().unwrap();
    let args = manifests(dir.path(), &wh, None);
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--store", &url])
        .output()
        .unwrap();
    failed_report(&out, "Connection");
}

/// The message of a report's first error.
fn first_error(report: &Value) -> &str {
    report["errors"][0]["message"].as_str().unwrap_or_default()
}

/// Asserts a sync process failed with a `Failed` report on stdout whose first error is of
/// `class`; returns the report.
fn failed_report(out: &std::process::Output, class: &str) -> Value {
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "Failed");
    assert_eq!(report["errors"][0]["class"], class, "{report}");
    report
}

#[test]
fn bad_manifests_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: profilesync.dev/v1alpha1\nkind: WarehouseConnection\nmetadata: {name: x}\nspec:\n  warehouse: {type: postgres}\n  schema: Bad-Name\n").unwrap();
    let out = bin()
        .args(["sync", "-f"])
        .arg(&bad)
        .args(["--store", "sqlite::memory:"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid WarehouseConnection")
            && err.contains("warehouse.postgres must be set"),
        "{err}"
    );
    // A sync that cannot start still reports why (stdout, and the termination log in a pod).
    let report = failed_report(&out, "Internal");
    assert!(
        first_error(&report).contains("warehouse.postgres must be set"),
        "{report}"
    );
}

#[test]
fn a_feed_that_cannot_be_opened_is_reported_without_its_url() {
    let wh = TestWarehouse::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let args = manifests(dir.path(), &wh, None);
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--store", "mysql://admin:hunter2@db.internal/x"])
        .arg("--termination-log")
        .arg(&log)
        .output()
        .unwrap();
    let report = failed_report(&out, "Connection");
    let message = first_error(&report);
    assert!(message.contains("unsupported store URL"), "{message}");
    let written = std::fs::read_to_string(&log).unwrap();
    for text in [
        message,
        written.as_str(),
        &String::from_utf8_lossy(&out.stderr),
    ] {
        assert!(
            !text.contains("hunter2"),
            "the URL's password leaked: {text}"
        );
    }
}

#[tokio::test]
async fn the_sync_reads_the_feeds_through_the_engine_api() {
    let t = support::engine::start(8).await;
    let client = reqwest::Client::new();
    let batch: Vec<Value> = SampleGenerator::new(3, 30, jiff::Timestamp::now().as_second() - 3600)
        .flatten()
        .collect();
    for chunk in batch.chunks(100) {
        let mut items: Vec<Value> = chunk.to_vec();
        for m in &mut items {
            m.as_object_mut().unwrap().remove("receivedAt");
        }
        let r = client
            .post(format!("{}/v1/batch", t.base))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"batch": items}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let via_engine = TestWarehouse::sqlite();
    let via_store = TestWarehouse::sqlite();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), FEED_TOKEN).unwrap();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let a = manifests(&a_dir, &via_engine, None);
    let b = manifests(&b_dir, &via_store, None);
    let token = dir.path().join("token");
    let base = t.base.clone();
    let store_url = t.store_url.clone();
    let (ra, rb) = tokio::task::spawn_blocking(move || {
        let ra = bin()
            .arg("sync")
            .args(&a)
            .args(["--engine", &base, "--engine-token-file"])
            .arg(&token)
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        let rb = bin()
            .arg("sync")
            .args(&b)
            .args(["--store", &store_url])
            .output()
            .unwrap();
        (ra, rb)
    })
    .await
    .unwrap();
    assert!(
        ra.status.success(),
        "{}",
        String::from_utf8_lossy(&ra.stderr)
    );
    assert!(
        rb.status.success(),
        "{}",
        String::from_utf8_lossy(&rb.stderr)
    );
    let (da, db) = (via_engine.dump(), via_store.dump());
    assert!(da.get("tracks").is_some_and(|r| !r.is_empty()));
    assert_eq!(
        da, db,
        "the engine's feed API and the store give the same warehouse"
    );
    t.engine.stop().await.unwrap();
}

/// The sum of every table's cursor: grows with every committed chunk.
fn progress(wh: &TestWarehouse) -> i64 {
    progress_on(&mut *wh.connect(), wh)
}

/// [`progress`] on a connection kept open (a poll then costs one query, not a connection):
/// 0 while it cannot be read — before the state table exists, or while the sync's first run
/// creates it. (A reading that never comes shows as runs not killed.)
fn progress_on(c: &mut dyn Warehouse, wh: &TestWarehouse) -> i64 {
    let t = c
        .dialect()
        .qualified(&wh.spec.schema, "_profiles_sync_state");
    c.query(&format!("SELECT coalesce(sum(cursor_seq), 0) FROM {t}"))
        .ok()
        .and_then(|rows| rows.first()?.first()?.clone())
        .map_or(0, |v| v.parse().unwrap())
}

#[test]
fn sigkill_at_twenty_points_then_rerun_equals_one_clean_run() {
    let (url, _d) = sample_store(1500);
    let dir = tempfile::tempdir().unwrap();
    let clean = TestWarehouse::postgres();
    let killed = TestWarehouse::postgres();
    let clean_args = manifests(&dir.path().join("clean").tap_mkdir(), &clean, None);
    let killed_args = manifests(&dir.path().join("killed").tap_mkdir(), &killed, None);
    let run = |args: &[String]| {
        bin()
            .arg("sync")
            .args(args)
            .args(["--store", &url, "--page-size", "150"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(run(&clean_args).success());
    let total = progress(&clean);
    assert!(total > 0);

    // Polled on one connection: a connection per poll left the load time to finish between
    // two polls (a run not killed mid-load, now and then, on a busy machine).
    let mut poll = killed.connect();
    let mut kills = 0;
    for k in 1..=20 {
        let threshold = total * k / 21;
        let mut child = bin()
            .arg("sync")
            .args(&killed_args)
            .args(["--store", &url, "--page-size", "150"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill as soon as the load has passed this point (bounded polling, no sleeps).
        let mut polls = 0;
        loop {
            polls += 1;
            assert!(polls < 1_000_000, "no progress");
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if progress_on(&mut *poll, &killed) >= threshold {
                child.kill().unwrap();
                kills += 1;
                break;
            }
        }
        child.wait().unwrap();
    }
    assert!(kills >= 20, "only {kills} runs were killed mid-load");
    assert!(run(&killed_args).success());
    let (a, b) = (clean.dump(), killed.dump());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same tables"
    );
    for (table, rows) in &a {
        assert_eq!(rows.len(), b[table].len(), "{table}: row count");
        assert!(rows == &b[table], "{table}: contents differ");
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// `--help` never prints the store URL the environment holds (the chart passes it, password
/// included, as `PROFILES_SYNC_STORE`; clap showed env values in help).
#[test]
fn help_never_prints_the_store_url_of_the_environment() {
    for cmd in ["engine", "sync", "import", "export"] {
        let out = bin()
            .args([cmd, "--help"])
            .env(
                "PROFILES_SYNC_STORE",
                "postgres://loader:S3cretPw@db.internal/profiles",
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--store"), "{cmd}: {text}");
        assert!(
            !text.contains("S3cretPw"),
            "{cmd} --help prints the password:\n{text}"
        );
    }
}

/// A feed flag on the command line wins over the other one from the environment (a
/// `PROFILES_SYNC_STORE` exported for import/export made every `sync --engine …` a usage
/// error, with no report); both on the command line is a `Failed` report that says so.
#[test]
fn a_feed_flag_on_the_command_line_wins_over_the_environment() {
    let wh = TestWarehouse::sqlite();
    let (url, _d) = sample_store(5);
    let dir = tempfile::tempdir().unwrap();
    let args = manifests(dir.path(), &wh, None);
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    // --engine given, the store from the environment: the engine (unreachable) is used.
    let log = dir.path().join("log");
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--engine", "http://127.0.0.1:1", "--engine-token-file"])
        .arg(&token)
        .arg("--termination-log")
        .arg(&log)
        .env("PROFILES_SYNC_STORE", &url)
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(2),
        "a usage error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    failed_report(&out, "Connection");
    assert!(log.exists(), "the termination log is written");
    // --store given, the engine from the environment: the store is used, and the sync runs.
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--store", &url])
        .env("PROFILES_SYNC_ENGINE_URL", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wh.count("identifies") > 0);
    // Both on the command line.
    let out = bin()
        .arg("sync")
        .args(&args)
        .args(["--store", &url, "--engine", "http://127.0.0.1:1"])
        .env_remove("PROFILES_SYNC_STORE")
        .env_remove("PROFILES_SYNC_ENGINE_URL")
        .output()
        .unwrap();
    let report = failed_report(&out, "Connection");
    assert!(first_error(&report).contains("not both"), "{report}");
}

/// A connection whose credentials are in a Secret, run without `--credentials-dir` (or with
/// one that does not exist), fails saying so — it read as a Secret without keys and failed
/// with "no username key".
#[test]
fn missing_credentials_are_named_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let conn = dir.path().join("conn.yaml");
    std::fs::write(
        &conn,
        "apiVersion: profilesync.dev/v1alpha1
kind: WarehouseConnection
metadata: {name: wh}
spec:
  warehouse:
    type: postgres
    postgres: {host: 127.0.0.1, port: 1, database: d}
    credentialsSecretRef: {name: creds}
",
    )
    .unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    for (extra, expected) in [
        (vec![], "give --credentials-dir"),
        (
            vec![
                "--credentials-dir".to_string(),
                dir.path().join("nope").display().to_string(),
            ],
            "does not exist",
        ),
    ] {
        let out = bin()
            .args(["sync", "-f"])
            .arg(&conn)
            .args(["--store", &store])
            .args(&extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let message = report["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{message}");
    }
}
