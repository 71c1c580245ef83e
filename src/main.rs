//! The `profiles-sync` binary: parses the command line and hands over to the chosen role.

use clap::Parser;

/// mimalloc instead of glibc's allocator: the ingest path allocates and frees millions of small
/// strings and maps a second, and glibc spent a third of the process's time consolidating them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    profiles_sync::cli::run(profiles_sync::cli::Cli::parse())
}
