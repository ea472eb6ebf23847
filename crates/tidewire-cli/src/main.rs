//! `tidewire`: the command-line front of the toolkit.
//!
//! - `tidewire echo`: an echo server (the classic tutorial server with
//!   `--welcome` and `--prefix`), which also serves the tutorial's browser
//!   page at `/`.
//! - `tidewire connect`: an interactive client, like wscat.

use clap::{Parser, Subcommand};

mod bench;
mod connect;
mod echo;
mod server_args;

#[derive(Parser)]
#[command(
    name = "tidewire",
    version,
    about = "WebSocket toolkit: echo server, interactive client, load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an echo server: every message comes back with its own type.
    Echo(echo::EchoArgs),
    /// Connect to a WebSocket server: stdin lines are sent, messages printed.
    Connect(connect::ConnectArgs),
    /// Load-test a WebSocket echo server (echo mode) or hold idle connections.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match cli.command {
        // The generator builds its own runtime (its thread count is a flag).
        Command::Bench(args) => return bench::run(args),
        other => other,
    };
    // One worker per CPU this process may run on (taskset and cgroup
    // limits count); on one CPU, the current-thread scheduler, which wakes
    // tasks without the work-stealing machinery.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    match args {
        Command::Bench(_) => unreachable!("handled above"),
        Command::Echo(args) => runtime.block_on(echo::run(args)),
        Command::Connect(args) => {
            let code = runtime.block_on(connect::run(args))?;
            // Don't wait for the blocking stdin reader thread.
            runtime.shutdown_background();
            std::process::exit(code);
        }
    }
}
