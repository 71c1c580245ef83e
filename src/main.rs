//! The `profiles-sync` binary: parses the command line and hands over to the chosen role.

use clap::Parser;

fn main() -> std::process::ExitCode {
    profiles_sync::cli::run(profiles_sync::cli::Cli::parse())
}
