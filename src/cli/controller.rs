//! `profiles-sync controller`: the Kubernetes operator, with `/metrics`, `/healthz` and `/readyz`
//! on `--listen`. It uses the in-cluster configuration or `KUBECONFIG`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::controller::{self, Context, Settings, build::JobSettings, metrics::Metrics};

/// Flags of `profiles-sync controller` (the Helm chart and `deploy/` pass them as arguments;
/// most can also come from the environment).
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// The engine's URL, as sync Jobs reach it (its feed API).
    #[arg(long, env = "PROFILES_SYNC_ENGINE_URL")]
    pub engine_url: String,
    /// File with the engine's feed API token (a mounted Secret); copied into the Secret
    /// `profiles-sync-engine-token` of each namespace with WarehouseConnections.
    #[arg(long, env = "PROFILES_SYNC_ENGINE_TOKEN_FILE")]
    pub engine_token_file: PathBuf,
    /// The image sync Jobs run (it has the `profiles-sync` binary).
    #[arg(long, env = "PROFILES_SYNC_SYNC_IMAGE")]
    pub sync_image: String,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(
        long,
        env = "PROFILES_SYNC_CONTROLLER_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,
    /// Source IPs of sync traffic, shown in each connection's status for warehouse allowlists.
    #[arg(long, env = "PROFILES_SYNC_EGRESS_IPS", value_delimiter = ',')]
    pub egress_ips: Vec<String>,
    /// CPU request of sync Jobs whose connection sets no resources (e.g. 250m).
    #[arg(long)]
    pub default_sync_cpu: Option<String>,
    /// Memory request and limit of sync Jobs whose connection sets no resources (e.g. 512Mi).
    #[arg(long)]
    pub default_sync_memory: Option<String>,
}

#[derive(Clone)]
struct Http {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn render_metrics(State(s): State<Http>) -> String {
    s.metrics.render()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<Http>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first list of WarehouseConnections",
        )
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The User-Agent of the controller's Kubernetes API calls: `profiles-sync-controller/<version>`.
pub const USER_AGENT: &str = concat!("profiles-sync-controller/", env!("CARGO_PKG_VERSION"));

/// Runs the controller until SIGTERM or Ctrl-C; reconciles in flight finish first.
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    super::telemetry::init();
    // kube's and reqwest's rustls: one provider for the process (the tests' build enables two).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Fail at start, not at the first sync, when the token is missing.
    controller::read_token(&args.engine_token_file)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let mut config = kube::Config::infer().await?;
        // Named in the API server's audit log (kube-rs sends no User-Agent of its own).
        config.headers.push((
            axum::http::header::USER_AGENT,
            axum::http::HeaderValue::from_static(USER_AGENT),
        ));
        let client = kube::Client::try_from(config)?;
        let metrics = Metrics::new()?;
        let settings = Settings {
            job: JobSettings {
                image: args.sync_image,
                engine_url: {
                    crate::sync::source::check_engine_url(&args.engine_url)
                        .map_err(|e| anyhow::anyhow!("--engine-url: {}", e.0))?;
                    args.engine_url
                },
                default_cpu: args.default_sync_cpu,
                default_memory: args.default_sync_memory,
            },
            engine_token_file: args.engine_token_file,
            egress_ips: args.egress_ips.into_iter().filter(|ip| !ip.trim().is_empty()).collect(),
            test_timeout: controller::connection_test::TEST_TIMEOUT,
        };
        let ctx = Arc::new(Context::new(client, settings, controller::system_clock(), metrics.clone()));
        let ready = Arc::new(AtomicBool::new(false));
        let app = Router::new()
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Http {
                metrics,
                ready: ready.clone(),
            });
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        tracing::info!(listen = %listener.local_addr()?, "controller serving /metrics, /healthz, /readyz");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let on_signal = stop_tx.clone();
        let mut http_stop = stop_rx.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .await
        });
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: letting reconciles in flight finish");
            let _ = on_signal.send(true);
        });
        let mut controller_stop = stop_rx;
        controller::run(ctx, ready, async move {
            let _ = controller_stop.wait_for(|s| *s).await;
        })
        .await;
        let _ = stop_tx.send(true);
        server.await??;
        tracing::info!("controller stopped");
        Ok(())
    })
}
