//! `profiles-sync sync`: one sync of one WarehouseConnection, as each scheduled Job runs it.

use std::path::{Path, PathBuf};

use crate::crd::{ErrorClass, SelectiveSync, SyncStatus, WarehouseConnection};
use crate::sync::{EngineSource, FeedSource, StoreSource, SyncOptions, SyncReport};
use crate::warehouse::{self, Credentials};

/// Flags of `profiles-sync sync`.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// YAML with the WarehouseConnection (and optionally its SelectiveSync); repeatable.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Read the change feeds from the engine's feed API at this URL (in a cluster).
    /// One of `--engine` and `--store` is needed; given both, the one on the command line wins
    /// over the one from the environment (both on the command line is a `Failed` report).
    #[arg(long, env = "PROFILES_SYNC_ENGINE_URL")]
    pub engine: Option<String>,
    /// File with the engine's feed API bearer token (a mounted Secret).
    #[arg(long, env = "PROFILES_SYNC_ENGINE_TOKEN_FILE")]
    pub engine_token_file: Option<PathBuf>,
    /// Read the change feeds straight from a store (local runs): sqlite:///path or postgres://...
    #[arg(long, env = "PROFILES_SYNC_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Directory with one file per credentials Secret key (the layout of a mounted Secret).
    #[arg(long, env = "PROFILES_SYNC_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// The sync's id, reported back (the controller passes the Job's slot).
    #[arg(long, env = "PROFILES_SYNC_SYNC_ID")]
    pub id: Option<String>,
    /// Also write the report here (Kubernetes' termination message); /dev/termination-log in a pod.
    #[arg(long, env = "PROFILES_SYNC_TERMINATION_LOG")]
    pub termination_log: Option<PathBuf>,
    /// Rows read per feed request and loaded per transaction at most.
    #[arg(long, default_value_t = 10_000)]
    pub page_size: usize,
}

/// The connection and selection found in the files.
pub struct Manifests {
    /// The connection.
    pub connection: WarehouseConnection,
    /// Its selection, when one was given.
    pub selection: Option<SelectiveSync>,
}

/// Reads the WarehouseConnection and SelectiveSync from YAML files (other kinds, such as the
/// example's Secret, are skipped: credentials never come from manifests here).
pub fn read_manifests(files: &[PathBuf]) -> anyhow::Result<Manifests> {
    let mut connection: Option<WarehouseConnection> = None;
    let mut selection: Option<SelectiveSync> = None;
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("WarehouseConnection") => {
                    anyhow::ensure!(
                        connection.is_none(),
                        "{}: more than one WarehouseConnection given",
                        file.display()
                    );
                    let c: WarehouseConnection = serde_json::from_value(value).map_err(|e| {
                        anyhow::anyhow!("{}: invalid WarehouseConnection: {e}", file.display())
                    })?;
                    c.validate_cel().map_err(|e| {
                        anyhow::anyhow!("{}: invalid WarehouseConnection: {e}", file.display())
                    })?;
                    connection = Some(c);
                }
                Some("SelectiveSync") => {
                    anyhow::ensure!(
                        selection.is_none(),
                        "{}: more than one SelectiveSync given",
                        file.display()
                    );
                    let s: SelectiveSync = serde_json::from_value(value).map_err(|e| {
                        anyhow::anyhow!("{}: invalid SelectiveSync: {e}", file.display())
                    })?;
                    s.spec.validate().map_err(|e| {
                        anyhow::anyhow!("{}: invalid SelectiveSync: {e}", file.display())
                    })?;
                    selection = Some(s);
                }
                _ => {}
            }
        }
    }
    let connection =
        connection.ok_or_else(|| anyhow::anyhow!("no WarehouseConnection in {files:?}"))?;
    if let Some(s) = &selection {
        let name = connection.metadata.name.as_deref().unwrap_or_default();
        anyhow::ensure!(
            s.spec.connection_ref.name == name,
            "the SelectiveSync refers to connection {:?}, not {name:?}",
            s.spec.connection_ref.name
        );
    }
    Ok(Manifests {
        connection,
        selection,
    })
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let t = t.trim().to_string();
    anyhow::ensure!(!t.is_empty(), "{}: the token is empty", path.display());
    Ok(t)
}

/// What a sync needs before it starts: the manifests, the credentials and the change feed.
struct Inputs {
    m: Manifests,
    credentials: Credentials,
    source: Box<dyn FeedSource>,
}

/// Reads the sync's inputs; an error is classified for the report (a sync that cannot start
/// still reports why, on stdout and in the termination log).
fn inputs(args: &SyncArgs) -> Result<Inputs, (Option<String>, ErrorClass, String)> {
    let m = read_manifests(&args.files).map_err(|e| {
        (
            None,
            ErrorClass::Internal,
            format!("cannot read the manifests: {e:#}"),
        )
    })?;
    let name = m.connection.metadata.name.clone();
    let spec = &m.connection.spec;
    let credentials = match (
        &spec.warehouse.credentials_secret_ref,
        &args.credentials_dir,
    ) {
        (Some(secret), Some(dir)) => Credentials::from_dir(dir, secret).map_err(|e| {
            (
                name.clone(),
                ErrorClass::Permission,
                format!("cannot read the credentials: {e:#}"),
            )
        })?,
        _ => Credentials::default(),
    };
    let feed_error = |e: anyhow::Error| {
        (
            name.clone(),
            ErrorClass::Connection,
            format!("cannot open the change feed: {e:#}"),
        )
    };
    // The environment's value of a flag, as clap took it when the command line had none.
    let from_env = |var: &str, value: &Option<String>| {
        value.is_some() && std::env::var(var).ok().as_ref() == value.as_ref()
    };
    let (engine, store) = match (&args.engine, &args.store) {
        (Some(_), Some(_)) => {
            match (
                from_env("PROFILES_SYNC_ENGINE_URL", &args.engine),
                from_env("PROFILES_SYNC_STORE", &args.store),
            ) {
                (false, true) => (&args.engine, &None),
                (true, false) => (&None, &args.store),
                _ => {
                    return Err(feed_error(anyhow::anyhow!(
                        "give --engine or --store, not both"
                    )));
                }
            }
        }
        _ => (&args.engine, &args.store),
    };
    let source: Box<dyn FeedSource> = match (engine, store) {
        (Some(url), _) => {
            let token_file = args.engine_token_file.as_deref().ok_or_else(|| {
                feed_error(anyhow::anyhow!(
                    "--engine needs --engine-token-file (the feed API token)"
                ))
            })?;
            let token = read_token(token_file).map_err(feed_error)?;
            Box::new(EngineSource::new(url, token).map_err(|e| feed_error(e.into()))?)
        }
        (None, Some(url)) => Box::new(StoreSource(
            crate::store::open_existing(url, crate::identity::Rules::default())
                .map_err(|e| feed_error(e.into()))?,
        )),
        (None, None) => return Err(feed_error(anyhow::anyhow!("give --engine or --store"))),
    };
    Ok(Inputs {
        m,
        credentials,
        source,
    })
}

/// Runs the sync; the report goes to stdout (and the termination log). Returns whether the
/// sync counts as successful (Success or PartialSuccess).
pub fn run(args: SyncArgs) -> anyhow::Result<bool> {
    super::telemetry::init();
    let start = jiff::Timestamp::now();
    let id = |name: Option<&str>| {
        args.id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", name.unwrap_or("sync"), start.as_second() / 60))
    };
    let report = match inputs(&args) {
        Err((name, class, message)) => {
            tracing::error!(%message, "the sync cannot start");
            SyncReport::failed(&id(name.as_deref()), start, class, message)
        }
        Ok(Inputs {
            m,
            credentials,
            mut source,
        }) => {
            let spec = &m.connection.spec;
            let id = id(m.connection.metadata.name.as_deref());
            match warehouse::connect(&spec.warehouse, &spec.schema, &credentials) {
                Ok(mut wh) => {
                    let opts = SyncOptions {
                        id,
                        connection: spec,
                        selection: m.selection.as_ref().map(|s| &s.spec),
                        page_size: args.page_size,
                        now: start,
                    };
                    crate::sync::run(&mut *source, &mut *wh, &opts)
                }
                Err(e) => SyncReport::failed(
                    &id,
                    start,
                    e.class,
                    format!("cannot connect to the warehouse: {}", e.message),
                ),
            }
        }
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    let log = args.termination_log.clone().or_else(|| {
        let default = PathBuf::from("/dev/termination-log");
        (std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && default.exists())
            .then_some(default)
    });
    if let Some(path) = log {
        std::fs::write(&path, report.termination_message())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(report.status != SyncStatus::Failed)
}
