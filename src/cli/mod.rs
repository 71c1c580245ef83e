//! The command line: one subcommand per role.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

/// Runs the chosen role and maps its outcome to the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Crdgen { out_dir: None } => crdgen(&mut std::io::stdout().lock()),
        Command::Crdgen { out_dir: Some(dir) } => crdgen_files(&dir),
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
