//! `profiles-sync sync`: one sync of one WarehouseConnection, as each scheduled Job runs it.

use std::io::Write;
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
    /// As the event load starts and after the run, record the events this connection still
    /// needs under its `namespace/name` (the engine's event retention keeps them); the
    /// controller's Jobs do.
    /// A one-off local run should not: its record would hold events for a connection that
    /// never comes back (or overwrite the real connection's of the same name).
    #[arg(long, env = "PROFILES_SYNC_RECORD_PROGRESS")]
    pub record_progress: bool,
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
            let text_of = |key: &str| {
                value
                    .get(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let (kind, api_version) = (text_of("kind"), text_of("apiVersion"));
            let (kind, api_version) = (kind.as_str(), api_version.as_str());
            let ours = matches!(kind, "WarehouseConnection" | "SelectiveSync");
            // Other objects (a Secret, a Namespace) may share the file; an object of this API
            // group that is neither kind, or one of them of another version, is a mistake.
            if !ours && !api_version.starts_with(API_GROUP_PREFIX) {
                continue;
            }
            let invalid = |e: &dyn std::fmt::Display| {
                anyhow::anyhow!("{}: invalid {kind}: {e}", file.display())
            };
            anyhow::ensure!(
                ours,
                "{}: unknown kind {kind:?} of {api_version}: expected WarehouseConnection or SelectiveSync",
                file.display()
            );
            anyhow::ensure!(
                api_version == API_VERSION,
                "{}: {kind} of apiVersion {api_version:?}: expected {API_VERSION}",
                file.display()
            );
            if kind == "WarehouseConnection" {
                anyhow::ensure!(
                    connection.is_none(),
                    "{}: more than one WarehouseConnection given",
                    file.display()
                );
                let c: WarehouseConnection = strict(value).map_err(|e| invalid(&e))?;
                c.validate_cel().map_err(|e| invalid(&e))?;
                c.spec.validate_fields().map_err(|e| invalid(&e))?;
                connection = Some(c);
            } else {
                anyhow::ensure!(
                    selection.is_none(),
                    "{}: more than one SelectiveSync given",
                    file.display()
                );
                let s: SelectiveSync = strict(value).map_err(|e| invalid(&e))?;
                s.spec.validate().map_err(|e| invalid(&e))?;
                selection = Some(s);
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

/// The API version of the two kinds, and its group's prefix.
const API_VERSION: &str = "profilesync.dev/v1alpha1";
const API_GROUP_PREFIX: &str = "profilesync.dev/";

/// `value` as a `T`, refusing a field `T` does not have: a typo (`exlude`, `enabeld`,
/// `suspnd`) was dropped, and the sync ran as if the setting were not there. `apiVersion` and
/// `kind` are checked by the caller, `metadata` and `status` left to the API server's rules.
fn strict<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> anyhow::Result<T> {
    let mut unknown = vec![];
    let t: T = serde_ignored::deserialize(value, |path| {
        // `?` marks where an optional field held a value: not part of the name.
        let path = path.to_string().replace(".?", "");
        let api_servers = ["apiVersion", "kind", "metadata", "status"];
        if !api_servers
            .iter()
            .any(|top| path.split('.').next() == Some(top))
        {
            unknown.push(path);
        }
    })?;
    anyhow::ensure!(
        unknown.is_empty(),
        "unknown field {} (a typo?)",
        unknown.join(", ")
    );
    Ok(t)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    crate::engine::feed::read_token_file(path)
        .map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))
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
        (Some(secret), None) => {
            return Err((
                name.clone(),
                ErrorClass::Permission,
                format!(
                    "the connection's credentials are in Secret {:?}: give --credentials-dir (a directory with a file per key, as a mounted Secret)",
                    secret.name
                ),
            ));
        }
        (None, _) => Credentials::default(),
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
            tracing::error!(reason = %message, "the sync cannot start");
            SyncReport::failed(&id(name.as_deref()), start, class, message)
        }
        Ok(Inputs {
            m,
            credentials,
            mut source,
        }) => {
            let spec = &m.connection.spec;
            let id = id(m.connection.metadata.name.as_deref());
            let consumer = args.record_progress.then(|| {
                format!(
                    "{}/{}",
                    m.connection
                        .metadata
                        .namespace
                        .as_deref()
                        .unwrap_or("default"),
                    m.connection.metadata.name.as_deref().unwrap_or_default()
                )
            });
            match warehouse::connect(&spec.warehouse, &spec.schema, &credentials) {
                Ok(mut wh) => {
                    let opts = SyncOptions {
                        id,
                        connection: spec,
                        selection: m.selection.as_ref().map(|s| &s.spec),
                        page_size: args.page_size,
                        consumer: consumer.as_deref(),
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
    // The termination log first: it is what the controller reads, and stdout may be gone.
    let log = args.termination_log.clone().or_else(|| {
        let default = PathBuf::from("/dev/termination-log");
        (std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && default.exists())
            .then_some(default)
    });
    if let Some(path) = log {
        std::fs::write(&path, report.termination_message())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    // A report stdout cannot take (`> /dev/full`, a closed pipe) changes no outcome: the sync
    // is done and its log written.
    let mut out = std::io::stdout().lock();
    let printed = serde_json::to_string_pretty(&report)
        .map_err(std::io::Error::from)
        .and_then(|text| writeln!(out, "{text}"))
        .and_then(|()| out.flush());
    if let Err(e) = printed {
        tracing::warn!(error = %e, "the sync report could not be written to stdout");
    }
    Ok(report.status != SyncStatus::Failed)
}

#[cfg(test)]
mod tests {
    use super::read_manifests;

    const CONNECTION: &str = "apiVersion: profilesync.dev/v1alpha1
kind: WarehouseConnection
metadata: {name: wh}
spec:
  warehouse: {type: sqlite, sqlite: {path: /tmp/w.db}}
";

    fn read(yaml: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.yaml");
        std::fs::write(&path, yaml).unwrap();
        read_manifests(&[path])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// What the API server would refuse is refused by a local `sync -f` too, naming the field:
    /// a typo was dropped (a column the user excluded got synced), a backfill window that does
    /// not parse loaded no events for good, a limit of 0 loaded nothing, an odd schema name was
    /// created as such; an object of another kind or version of the API group is a mistake.
    /// Objects of other APIs in the same file are left alone.
    #[test]
    fn local_manifests_are_held_to_the_crd_rules() {
        assert_eq!(read(CONNECTION), Ok(()));
        let with_secret =
            format!("{CONNECTION}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\n");
        assert_eq!(read(&with_secret), Ok(()));
        let selection = |spec: &str| {
            format!(
                "{CONNECTION}---\napiVersion: profilesync.dev/v1alpha1\nkind: SelectiveSync\nmetadata: {{name: s}}\nspec: {spec}\n"
            )
        };
        assert_eq!(read(&selection("{connectionRef: {name: wh}}")), Ok(()));
        for (yaml, expected) in [
            (
                selection(
                    "{connectionRef: {name: wh}, tables: [{name: tracks, columns: {exlude: [total]}}]}",
                ),
                "unknown field spec.tables.0.columns.exlude",
            ),
            (
                selection("{connectionRef: {name: wh}, tables: [{name: tracks, enabeld: false}]}"),
                "enabeld",
            ),
            (
                CONNECTION.replace("spec:\n", "spec:\n  suspnd: true\n"),
                "suspnd",
            ),
            (
                CONNECTION.replace("spec:\n", "spec:\n  backfill: {events: 2w}\n"),
                "spec.backfill.events \"2w\"",
            ),
            (
                CONNECTION.replace("spec:\n", "spec:\n  schema: Profiles\n"),
                "spec.schema \"Profiles\"",
            ),
            (
                CONNECTION.replace("spec:\n", "spec:\n  limits: {maxRows: 0}\n"),
                "spec.limits.maxRows 0",
            ),
            (
                CONNECTION.replace("v1alpha1", "v9"),
                "expected profilesync.dev/v1alpha1",
            ),
            (
                format!(
                    "{CONNECTION}---\napiVersion: profilesync.dev/v1alpha1\nkind: SelectiveSyncs\nmetadata: {{name: s}}\n"
                ),
                "unknown kind \"SelectiveSyncs\"",
            ),
        ] {
            let e = read(&yaml).unwrap_err();
            assert!(e.contains(expected), "{expected}: {e}");
        }
    }

    /// A local selection is held to the CRD's table name pattern too: a table named as the
    /// event is (`Order Completed`), or in capitals, matched no table, so the table it turned
    /// off went on loading (and one it turned on under `default: none` never did), silently.
    #[test]
    fn a_local_selection_of_a_table_the_sync_never_names_is_refused() {
        let selection = |name: &str| {
            format!(
                "{CONNECTION}---\napiVersion: profilesync.dev/v1alpha1\nkind: SelectiveSync\nmetadata: {{name: s}}\nspec: {{connectionRef: {{name: wh}}, tables: [{{name: {name:?}, enabled: false}}]}}\n"
            )
        };
        assert_eq!(read(&selection("order_completed")), Ok(()));
        assert_eq!(read(&selection("größe_geändert")), Ok(()));
        for bad in [
            "Order Completed",
            "Tracks",
            "order-completed",
            "1st_order",
            "",
        ] {
            let e = read(&selection(bad)).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
    }

    /// A token file with a second line or a control character is refused naming the file (every
    /// feed request failed with "builder error").
    #[test]
    fn a_token_a_header_cannot_carry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        assert_eq!(super::read_token(&path).unwrap(), "s3cret");
        for bad in ["s3cret\nsecond", "s3\u{7}cret", "s3 cret"] {
            std::fs::write(&path, bad).unwrap();
            let e = super::read_token(&path).unwrap_err().to_string();
            assert!(e.contains("HTTP header"), "{bad:?}: {e}");
            assert!(!e.contains(bad), "{e}");
        }
    }
}
