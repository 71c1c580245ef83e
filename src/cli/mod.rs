//! The command line: one subcommand per role.

pub mod controller;
mod engine;
mod export;
mod import;
pub mod sync;
pub mod telemetry;

pub use export::{Format, export};
pub use import::{ImportSummary, LineError, import};

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::identity::Rules;

/// The refused lines `import` prints; the summary counts them all.
const MAX_ERRORS_SHOWN: usize = 100;

/// Identity-resolved customer profiles and their events, landed in your own warehouse.
#[derive(Debug, Parser)]
#[command(name = "profiles-sync", version, about, long_about = None)]
pub struct Cli {
    /// The role to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The roles of the binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions generated from the Rust types (as committed in crds/).
    Crdgen {
        /// Write one file per kind into this directory instead of printing to stdout.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Serve the Segment Tracking API and the change-feed API over a profile store.
    Engine(engine::EngineArgs),
    /// Run the whole pipeline locally on embedded defaults (no cluster, no server) and show what it did.
    Demo {
        /// Directory for the demo's store and warehouse files (earlier demo files there are replaced).
        #[arg(long, default_value = "profiles-sync-demo")]
        dir: std::path::PathBuf,
        /// How many people the sample traffic has.
        #[arg(long, default_value_t = 2000)]
        people: u64,
    },
    /// Run the Kubernetes operator: reconcile WarehouseConnections and SelectiveSyncs, schedule sync Jobs.
    Controller(controller::ControllerArgs),
    /// Run one sync of a WarehouseConnection: land the change feeds in its warehouse.
    Sync(sync::SyncArgs),
    /// Ingest Segment JSON (one message, or one {"batch": [...]}, per line) into a store.
    ///
    /// Exits 1 when any line or message was refused (the others are stored, the summary says
    /// how many of each), 0 when every one was stored or already there.
    Import {
        /// The store: sqlite:///path/file.db or postgres://user@host/db.
        #[arg(long, env = "PROFILES_SYNC_STORE", hide_env_values = true)]
        store: String,
        /// Identity resolution rules (YAML); Segment's defaults when unset.
        #[arg(long, env = "PROFILES_SYNC_RULES")]
        rules: Option<PathBuf>,
        /// Source id recorded as the events' event_source_id: `import` by default, or for
        /// the lines `export` wrote, the source each event came from.
        #[arg(long)]
        source_id: Option<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// The file to read, or - for standard input.
        input: PathBuf,
    },
    /// Print a change log, an event table or a current-state table of a store.
    Export {
        /// The store: sqlite:///path/file.db or postgres://user@host/db.
        #[arg(long, env = "PROFILES_SYNC_STORE", hide_env_values = true)]
        store: String,
        /// Table: id_graph_updates, external_id_mapping_updates, profile_traits_updates, events,
        /// identifies, tracks, pages, screens, groups, aliases, a Track event table, user_identifiers,
        /// user_traits or profile_merges.
        #[arg(long)]
        table: String,
        /// Only rows with a greater seq (change logs and event tables); 0 or more.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
        after_seq: i64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
    },
}

/// Runs the chosen role and maps its outcome to the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Crdgen { out_dir: None } => crdgen(&mut std::io::stdout().lock()),
        Command::Crdgen { out_dir: Some(dir) } => crdgen_files(&dir),
        Command::Engine(args) => engine::run(args),
        Command::Controller(args) => controller::run(args),
        Command::Demo { dir, people } => {
            crate::demo::run(&crate::demo::DemoOptions { dir, people }).and_then(|r| {
                anyhow::ensure!(
                    r.status != crate::crd::SyncStatus::Failed,
                    "the demo's sync failed"
                );
                Ok(())
            })
        }
        Command::Sync(args) => match sync::run(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Import {
            store,
            rules,
            source_id,
            json,
            input,
        } => match run_import(&store, rules.as_deref(), source_id.as_deref(), json, &input) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Export {
            store,
            table,
            after_seq,
            format,
        } => (|| {
            let mut store = crate::store::open_existing(&store, Rules::default())?;
            let exported = export(
                &mut *store,
                &table,
                after_seq,
                format,
                &mut std::io::stdout().lock(),
            );
            match exported {
                // The reader went away (`export … | head`): as for any Unix filter, not an error.
                Err(e) if broken_pipe(&e) => Ok(()),
                other => other.map(|_| ()),
            }
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every CRD as a multi-document YAML stream.
pub fn crdgen(out: &mut impl Write) -> anyhow::Result<()> {
    for (_, crd) in crate::crd::all_crds() {
        writeln!(out, "---")?;
        out.write_all(crate::crd::crd_yaml(&crd)?.as_bytes())?;
    }
    Ok(())
}

/// Writes each CRD to `dir/<plural>.yaml`, the layout committed under `crds/`.
pub fn crdgen_files(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (file, crd) in crate::crd::all_crds() {
        std::fs::write(dir.join(file), crate::crd::crd_yaml(&crd)?)?;
    }
    Ok(())
}

/// Loads identity rules from `path`, or Segment's defaults.
pub fn load_rules(path: Option<&std::path::Path>) -> anyhow::Result<Rules> {
    match path {
        None => Ok(Rules::default()),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Rules::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        }
    }
}

/// Whether `e` is (or was caused by) writing to a pipe whose reader has gone.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            // serde_json's `source()` skips its io::Error: ask for the kind.
            || cause
                .downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
            || cause
                .downcast_ref::<csv::Error>()
                .is_some_and(|c| matches!(c.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe))
    })
}

fn run_import(
    store: &str,
    rules: Option<&std::path::Path>,
    source_id: Option<&str>,
    json: bool,
    input: &PathBuf,
) -> anyhow::Result<bool> {
    let rules = load_rules(rules)?;
    let mut store = crate::store::open(store, rules.clone())?;
    let total = std::fs::metadata(input).map(|m| m.len()).unwrap_or(0);
    let bar = if std::io::stderr().is_terminal() && total > 0 {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut shown = 0usize;
    let summary = import(
        &mut *store,
        &rules,
        input,
        source_id,
        |e| {
            // The first errors are printed; all are counted in the summary.
            shown += 1;
            if shown <= MAX_ERRORS_SHOWN {
                bar.suspend(|| eprintln!("{e}"));
            }
        },
        |bytes| bar.set_position(bytes),
    )?;
    bar.finish_and_clear();
    if shown > MAX_ERRORS_SHOWN {
        eprintln!(
            "… and {} more (the summary counts them all)",
            shown - MAX_ERRORS_SHOWN
        );
    }
    // A summary that cannot be written (`> /dev/full`, a closed pipe) is an error, not a panic.
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(
            out,
            "lines: {}\naccepted: {}\nduplicates: {}\nrejected: {}\nprofiles created: {}\nmerges: {}\ntraits dropped: {}",
            summary.lines,
            summary.accepted,
            summary.duplicates,
            summary.rejected_total(),
            summary.profiles_created,
            summary.merges,
            summary.traits_dropped
        )?;
        for (reason, n) in &summary.rejected {
            writeln!(out, "  {n:>8}  {reason}")?;
        }
    }
    out.flush()?;
    let rejected = summary.rejected_total();
    if rejected > 0 {
        eprintln!(
            "{rejected} of the input's messages or lines were refused and not imported; the others were"
        );
    }
    Ok(rejected == 0)
}
