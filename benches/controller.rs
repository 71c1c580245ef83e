//! Reconciles 1,000 WarehouseConnections against the in-memory API (`kube-fake-client`) and
//! prints the time taken and the process's peak memory (target: < 10 s, < 100 MiB).
//!
//! `cargo bench --bench controller` (release build). Each connection is an SQLite warehouse in a
//! temporary directory, so the first pass runs 1,000 real connection tests, creates 1,000 Jobs,
//! ConfigMaps and Events and writes 1,000 statuses; the second pass is the steady state (nothing
//! due: reads, planning and no writes). Reconciles run 16 at a time, as the controller runs them
//! concurrently. The in-memory API has no watches, so the controller's Job and SelectiveSync
//! caches are fed here the way its watches would feed them: empty at the start, then the Jobs
//! the first pass created. The peak memory is the whole process's, so it includes the in-memory
//! API server's own store (about 4,000 objects kept as JSON values), which in a cluster is the
//! API server's, not the controller's.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::ApiResource;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube_fake_client::ClientBuilder;
use profiles_sync::controller::{
    self, Caches, Context, Settings, build::JobSettings, metrics::Metrics,
};
use profiles_sync::crd::{SelectiveSync, WarehouseConnection, WarehouseConnectionSpec};

const CONNECTIONS: usize = 1000;
const CONCURRENCY: usize = 16;
const NAMESPACE: &str = "bench";

fn connection(dir: &std::path::Path, i: usize) -> WarehouseConnection {
    let spec: WarehouseConnectionSpec = serde_json::from_value(serde_json::json!({
        "warehouse": {"type": "sqlite", "sqlite": {"path": dir.join(format!("wh-{i}.db")).display().to_string()}},
        "schedule": "1h"
    }))
    .expect("spec");
    let mut c = WarehouseConnection::new(&format!("conn-{i:04}"), spec);
    c.metadata.namespace = Some(NAMESPACE.into());
    c.metadata.uid = Some(format!("uid-{i}"));
    c.metadata.generation = Some(1);
    c.metadata.finalizers = Some(vec![controller::FINALIZER.into()]);
    c.status = Some(Default::default());
    c
}

async fn connections(api: &Api<DynamicObject>) -> Vec<DynamicObject> {
    let mut out = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        out.push(api.get(&format!("conn-{i:04}")).await.expect("connection"));
    }
    out
}

async fn pass(ctx: &Arc<Context>, objects: Vec<DynamicObject>) -> (Duration, usize) {
    let start = Instant::now();
    let errors = futures::stream::iter(objects)
        .map(|o| {
            let ctx = ctx.clone();
            async move {
                controller::reconcile::reconcile(Arc::new(o), ctx)
                    .await
                    .is_err()
            }
        })
        .buffer_unordered(CONCURRENCY)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    (start.elapsed(), errors)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "bench-token").expect("token");
    let mut builder = ClientBuilder::new()
        .with_resource::<WarehouseConnection>()
        .with_resource::<SelectiveSync>();
    for i in 0..CONNECTIONS {
        builder = builder.with_object(connection(dir.path(), i));
    }
    let client = builder.build().await.expect("fake client");
    let settings = Settings {
        job: JobSettings {
            image: "profiles-sync:bench".into(),
            engine_url: "http://127.0.0.1:1".into(),
            default_cpu: None,
            default_memory: None,
        },
        engine_token_file: token,
        egress_ips: vec![],
        test_timeout: Duration::from_secs(30),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        controller::system_clock(),
        Metrics::new().expect("metrics"),
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &controller::connection_resource(),
    );

    // The controller's watch caches, fed as its watches would feed them.
    let (jobs_cache, mut jobs_writer) = reflector::store::<Job>();
    let mut selections_writer: Writer<DynamicObject> =
        Writer::new(ApiResource::erase::<SelectiveSync>(&()));
    let selections_cache = selections_writer.as_reader();
    jobs_writer.apply_watcher_event(&watcher::Event::Init);
    jobs_writer.apply_watcher_event(&watcher::Event::InitDone);
    selections_writer.apply_watcher_event(&watcher::Event::Init);
    selections_writer.apply_watcher_event(&watcher::Event::InitDone);
    let _ = ctx.caches.set(Caches {
        jobs: jobs_cache,
        selections: selections_cache,
    });

    // Objects are read one by one, as watch events deliver them (a list of everything would
    // measure the in-memory API's copying rather than the controller).
    let before = common::peak_rss_mib();
    let (first, first_errors) = pass(&ctx, connections(&api).await).await;
    let after_first = common::peak_rss_mib();
    // What the Job watch delivers after the first pass.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
    let names = ctx.with_memory(|m| m.jobs.clone());
    for key in &names {
        let name = key.rsplit('/').next().unwrap_or_default();
        let mut job = jobs.get(name).await.expect("job");
        controller::slim_job(&mut job);
        jobs_writer.apply_watcher_event(&watcher::Event::Apply(job));
    }
    let created = names.len();
    let after_feed = common::peak_rss_mib();
    let (second, second_errors) = pass(&ctx, connections(&api).await).await;
    let peak = common::peak_rss_mib();

    println!(
        "controller reconcile benchmark: {CONNECTIONS} WarehouseConnections, {CONCURRENCY} concurrent reconciles, in-memory API"
    );
    println!(
        "  first pass  (test connection, create Job + ConfigMap + Event, write status): {:>7.3} s  ({} errors)",
        first.as_secs_f64(),
        first_errors
    );
    println!(
        "  second pass (steady state, nothing due):                                    {:>7.3} s  ({} errors)",
        second.as_secs_f64(),
        second_errors
    );
    println!(
        "  total:                                                                      {:>7.3} s",
        (first + second).as_secs_f64()
    );
    println!("  Jobs created: {created}");
    println!(
        "  peak memory (VmHWM): {peak:.1} MiB (before the passes: {before:.1} MiB, after the first: {after_first:.1} MiB, after feeding the cache: {after_feed:.1} MiB)"
    );
    let ok = (first + second) < Duration::from_secs(10) && peak < 100.0 && created == CONNECTIONS;
    println!(
        "  target (< 10 s, < 100 MiB, one Job each): {}",
        if ok { "met" } else { "MISSED" }
    );
}
