//! `tidewire`: the command-line front of the toolkit.
//!
//! - `tidewire serve`: the real-time hub (channels, presence, history,
//!   recovery, HTTP API), embedded defaults on 127.0.0.1:8080.
//! - `tidewire token`: a development token for the hub.
//! - `tidewire echo`: an echo server (the classic tutorial server with
//!   `--welcome` and `--prefix`), which also serves the tutorial's browser
//!   page at `/`.
//! - `tidewire connect`: an interactive client, like wscat.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// mimalloc rather than the system allocator: a server that holds many
/// connections allocates short-lived blocks of several KiB for each one
/// (the HTTP connection and its buffers, until the WebSocket upgrade)
/// among its small long-lived state. glibc's heap lets the small blocks
/// settle in the holes the large ones leave and keeps growing: 19,000 idle
/// hub subscribers cost 5.1 KiB of server memory each with glibc, 2.6 KiB
/// with mimalloc (size classes kept apart). The fan-out's per-subscriber
/// queues are cheaper too (delivery latency p50 65 -> 48 ms at 1 M
/// deliveries/s, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod connect;
mod echo;
mod serve;
mod server_args;
mod token;

#[derive(Parser)]
#[command(
    name = "tidewire",
    version,
    about = "WebSocket toolkit: real-time hub, echo server, interactive client, load generator"
)]
struct Cli {
    /// Log format on stderr: text for people, json for log shippers (one
    /// object per line). RUST_LOG sets the level (default info).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TIDEWIRE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the real-time hub: channels, presence, history, HTTP API.
    #[command(
        after_help = "Server flags (from --host on) apply only when given: their [default] \
        values are those of `tidewire echo`. Without them, serve uses its configuration: \
        defaults < tidewire.toml (or --config) < TIDEWIRE_* variables < flags. \
        See README.md and docs/protocol.md."
    )]
    Serve(serve::ServeArgs),
    /// Print a development token (HS256) for the hub.
    Token(token::TokenArgs),
    /// Run an echo server: every message comes back with its own type.
    Echo(echo::EchoArgs),
    /// Connect to a WebSocket server: stdin lines are sent, messages printed.
    Connect(connect::ConnectArgs),
    /// Load-test a WebSocket echo server (echo mode) or hold idle connections.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    // The matches tell `serve` which flags were given (they override its
    // configuration file; their defaults do not).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let serve_matches = matches.subcommand_matches("serve").cloned();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let args = match cli.command {
        // The generator builds its own runtime (its thread count is a flag).
        Command::Bench(args) => return bench::run(args),
        Command::Token(args) => return token::run(args),
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
        Command::Bench(_) | Command::Token(_) => unreachable!("handled above"),
        Command::Serve(args) => runtime.block_on(serve::run(args, serve_matches)),
        Command::Echo(args) => runtime.block_on(echo::run(args)),
        Command::Connect(args) => {
            let code = runtime.block_on(connect::run(args))?;
            // Don't wait for the blocking stdin reader thread.
            runtime.shutdown_background();
            std::process::exit(code);
        }
    }
}
