//! `profiles-sync demo`: the whole pipeline on embedded defaults, in one process — the engine on
//! an SQLite store, realistic traffic sent through its real HTTP ingest, a sync through the
//! engine's feed API into an SQLite warehouse file with the example manifests of
//! `deploy/examples/sqlite.yaml`, then a tour of what landed.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use crate::crd::{SelectiveSync, SqliteSettings, WarehouseConnection};
use crate::engine::{self, EngineConfig, sources::Sources};
use crate::sample::SampleGenerator;
use crate::sync::{EngineSource, SyncOptions, SyncReport};
use crate::warehouse::{self, Credentials, Warehouse};

/// The example manifests the demo syncs with (the same file users `kubectl apply`).
const EXAMPLE: &str = include_str!("../../deploy/examples/sqlite.yaml");
const WRITE_KEY: &str = "demo-write-key";
const FEED_TOKEN: &str = "demo-feed-token";

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Directory for the store and the warehouse file (emptied of earlier demo files first).
    pub dir: PathBuf,
    /// How many people the sample traffic has.
    pub people: u64,
}

fn say(text: &str) {
    println!("{text}");
}

fn step(n: u32, text: &str) {
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m[{n}/4] {text}\x1b[0m");
    } else {
        println!("\n[{n}/4] {text}");
    }
}

/// Runs the demo and prints what it did.
pub fn run(opts: &DemoOptions) -> anyhow::Result<SyncReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.dir.display()))?;
    // A fresh run each time: remove what an earlier demo left (and nothing else).
    for f in [
        "store.db",
        "store.db-wal",
        "store.db-shm",
        "warehouse.db",
        "warehouse.db-wal",
        "warehouse.db-shm",
    ] {
        let p = opts.dir.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        }
    }
    let store_path = opts.dir.join("store.db");
    let warehouse_path = opts.dir.join("warehouse.db");
    let (mut connection, selection) = example_manifests(&warehouse_path)?;
    connection.metadata.namespace = Some("default".into());

    let runtime = tokio::runtime::Runtime::new()?;
    step(
        1,
        "Starting the engine (Segment Tracking API + identity resolution) on an embedded SQLite store",
    );
    let sources = Sources::from_yaml(&format!(
        "sources:\n  - {{id: src_demo_web, name: Demo Website, slug: demo-website, writeKey: {WRITE_KEY}}}\n"
    ))?;
    let engine = runtime.block_on(engine::start(EngineConfig {
        feed_token: Some(FEED_TOKEN.into()),
        ..EngineConfig::new(
            format!("sqlite://{}", store_path.display()),
            "127.0.0.1:0".parse()?,
            sources,
        )
    }))?;
    let base = format!("http://{}", engine.addr);
    say(&format!("  engine listening on {base}"));

    step(
        2,
        &format!(
            "Sending realistic traffic for {} people through POST /v1/batch",
            opts.people
        ),
    );
    let sent = runtime.block_on(send_sample(&base, opts.people))?;
    say(&format!(
        "  {sent} events accepted (each acknowledged only once committed to the store)"
    ));

    step(
        3,
        "Syncing into the SQLite warehouse with deploy/examples/sqlite.yaml (WarehouseConnection + SelectiveSync)",
    );
    let mut source = EngineSource::new(&base, FEED_TOKEN.into())?;
    let mut wh = warehouse::connect(
        &connection.spec.warehouse,
        &connection.spec.schema,
        &Credentials::default(),
    )?;
    // The demo's connection records its progress as the cluster's Jobs do.
    let consumer = format!(
        "{}/{}",
        connection
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default"),
        connection.metadata.name.as_deref().unwrap_or_default()
    );
    let report = crate::sync::run(
        &mut source,
        &mut *wh,
        &SyncOptions {
            id: "demo-1".into(),
            connection: &connection.spec,
            selection: selection.as_ref().map(|s| &s.spec),
            page_size: 10_000,
            consumer: Some(&consumer),
            now: jiff::Timestamp::now(),
        },
    );
    print_report(&connection, &report);

    step(4, "What landed: a few queries against the warehouse");
    tour(&mut *wh)?;
    runtime.block_on(engine.stop())?;

    say(&format!(
        "\nFiles (a fresh demo replaces them on every run):\n  store      {}\n  warehouse  {}\n\nQuery them yourself, e.g.:\n  sqlite3 {} \"SELECT type, count(*) FROM user_identifiers GROUP BY type\"\n  sqlite3 {} \"SELECT event_text, count(*) FROM tracks GROUP BY 1\"\n  cargo run --release -- export --store sqlite://{} --table id_graph_updates | head\n\nDone in {:.1} s.",
        store_path.display(),
        warehouse_path.display(),
        warehouse_path.display(),
        warehouse_path.display(),
        store_path.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(report)
}

fn example_manifests(
    warehouse: &Path,
) -> anyhow::Result<(WarehouseConnection, Option<SelectiveSync>)> {
    let mut connection = None;
    let mut selection = None;
    for doc in yaml_serde::Deserializer::from_str(EXAMPLE) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        match v["kind"].as_str() {
            Some("WarehouseConnection") => {
                connection = Some(serde_json::from_value::<WarehouseConnection>(v)?)
            }
            Some("SelectiveSync") => selection = Some(serde_json::from_value::<SelectiveSync>(v)?),
            _ => {}
        }
    }
    let mut connection =
        connection.ok_or_else(|| anyhow::anyhow!("the example has no WarehouseConnection"))?;
    connection.spec.warehouse.sqlite = Some(SqliteSettings {
        path: warehouse.display().to_string(),
    });
    Ok((connection, selection))
}

async fn send_sample(base: &str, people: u64) -> anyhow::Result<usize> {
    let client = reqwest::Client::new();
    let start = jiff::Timestamp::now().as_second() - 3 * 86_400;
    let messages: Vec<Value> = SampleGenerator::new(2026, people, start)
        .flatten()
        .map(|mut m| {
            // The engine stamps receivedAt itself; the sample's own is for historical imports.
            if let Some(o) = m.as_object_mut() {
                o.remove("receivedAt");
            }
            m
        })
        .collect();
    let total = messages.len();
    let bar = if std::io::stdout().is_terminal() {
        let b = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("  {bar:40} {pos}/{len} events {per_sec}")
        {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut inflight = tokio::task::JoinSet::new();
    for chunk in messages.chunks(200) {
        let body = json!({"batch": chunk});
        let (client, url, n) = (client.clone(), format!("{base}/v1/batch"), chunk.len());
        inflight.spawn(async move {
            let r = client
                .post(url)
                .basic_auth(WRITE_KEY, Some(""))
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(
                r.status().is_success(),
                "ingest answered {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
            Ok(n)
        });
        while inflight.len() >= 4 {
            if let Some(done) = inflight.join_next().await {
                bar.inc(done?? as u64);
            }
        }
    }
    while let Some(done) = inflight.join_next().await {
        bar.inc(done?? as u64);
    }
    bar.finish_and_clear();
    Ok(total)
}

fn print_report(connection: &WarehouseConnection, r: &SyncReport) {
    let name = connection.metadata.name.as_deref().unwrap_or("demo");
    say(&format!(
        "  sync {} finished: {:?} in {:.2} s\n",
        r.id, r.status, r.duration_seconds
    ));
    say("  $ kubectl get whc   (as the controller would show it)");
    let rows = [
        vec![
            "NAME",
            "TYPE",
            "SCHEMA",
            "SUSPENDED",
            "READY",
            "LAST SYNC",
            "STATUS",
            "ROWS",
            "NEXT SYNC",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>(),
        vec![
            name.to_string(),
            connection.spec.warehouse.r#type.to_string(),
            connection.spec.schema.clone(),
            connection.spec.suspend.to_string(),
            (r.status != crate::crd::SyncStatus::Failed)
                .to_string()
                .replace("true", "True")
                .replace("false", "False"),
            "0s".into(),
            format!("{:?}", r.status),
            r.rows.total.to_string(),
            // As `status.nextSyncTime` holds it (UTC), the schedule's next slot.
            crate::controller::plan::Slots::parse(&connection.spec.schedule)
                .ok()
                .and_then(|s| s.next_after(jiff::Timestamp::now()))
                .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| connection.spec.schedule.clone()),
        ],
    ];
    print_table(&rows, "  ");
    say(&format!(
        "\n  rows by group: identity graph {}, event types {}, events {}",
        r.rows.identity_graph, r.rows.event_types, r.rows.events
    ));
    let mut tables: Vec<Vec<String>> = vec![vec!["TABLE".into(), "ROWS".into()]];
    tables.extend(
        r.tables
            .iter()
            .filter(|t| t.rows > 0)
            .map(|t| vec![t.name.clone(), t.rows.to_string()]),
    );
    print_table(&tables, "    ");
    for e in &r.errors {
        say(&format!("  error ({:?}): {}", e.class, e.message));
    }
}

fn print_table(rows: &[Vec<String>], indent: &str) {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{indent}{}", line.join("   ").trim_end());
    }
}

fn query_table(
    wh: &mut dyn Warehouse,
    title: &str,
    sql: &str,
    header: &[&str],
) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let rows = wh.query(sql)?;
    say(&format!(
        "\n  {title}\n  > {}",
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    ));
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    table.extend(rows.iter().map(|r| {
        r.iter()
            .map(|c| c.clone().unwrap_or_else(|| "NULL".into()))
            .collect()
    }));
    print_table(&table, "    ");
    Ok(rows)
}

/// The tour's queries, each over the tables it needs: a small sample (`--people 3`) may have
/// no screens or orders, and its queries are skipped with a word rather than failing the demo.
fn tour(wh: &mut dyn Warehouse) -> anyhow::Result<()> {
    let tables = wh.describe()?;
    let have = |t: &str| tables.contains_key(t);
    if !have("user_identifiers") {
        say("  (the warehouse has no profiles)");
        return Ok(());
    }
    let top = wh.query(
        "SELECT canonical_segment_id FROM user_identifiers GROUP BY canonical_segment_id ORDER BY count(*) DESC, canonical_segment_id LIMIT 1",
    )?;
    let Some(Some(profile)) = top.first().and_then(|r| r.first().cloned()) else {
        say("  (the warehouse has no profiles)");
        return Ok(());
    };
    let quoted = profile.replace('\'', "''");
    query_table(
        wh,
        "One profile's identifiers (the one with the most):",
        &format!(
            "SELECT type, value FROM user_identifiers WHERE canonical_segment_id = '{quoted}' ORDER BY type, value"
        ),
        &["TYPE", "VALUE"],
    )?;
    if have("user_traits") {
        query_table(
            wh,
            "Its traits (newest value wins across merged profiles):",
            &format!(
                "SELECT name, value FROM user_traits WHERE canonical_segment_id = '{quoted}' ORDER BY name"
            ),
            &["NAME", "VALUE"],
        )?;
    }
    if have("profile_merges") {
        query_table(
            wh,
            "Merges: anonymous profiles folded into known ones:",
            "SELECT count(*) AS merged_profiles, count(DISTINCT canonical_segment_id) AS into_profiles FROM profile_merges WHERE segment_id <> canonical_segment_id",
            &["MERGED PROFILES", "INTO PROFILES"],
        )?;
    }
    let kinds: Vec<&str> = ["identifies", "tracks", "screens"]
        .into_iter()
        .filter(|t| have(t))
        .collect();
    if !kinds.is_empty() {
        let union = kinds
            .iter()
            .map(|t| format!("SELECT segment_id FROM {t}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        query_table(
            wh,
            &format!("Events per profile ({}), top 5:", kinds.join(" + ")),
            &format!(
                "SELECT segment_id, count(*) AS events FROM ({union}) GROUP BY segment_id ORDER BY events DESC, segment_id LIMIT 5"
            ),
            &["SEGMENT_ID", "EVENTS"],
        )?;
    }
    if have("order_completed") {
        query_table(
            wh,
            "Revenue from the order_completed table (one table per Track event):",
            "SELECT currency, count(*) AS orders, round(sum(total), 2) AS revenue FROM order_completed GROUP BY currency",
            &["CURRENCY", "ORDERS", "REVENUE"],
        )?;
    } else {
        say("\n  (no order was placed in this sample: no order_completed table)");
    }
    Ok(())
}
