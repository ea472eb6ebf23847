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
mod listener;
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
        after_help = "Configuration: embedded defaults < tidewire.toml (or --config) < \
        TIDEWIRE_* variables < flags given. The [default] values shown are the embedded \
        defaults; a flag applies only when given, over the file and the variables. \
        Every key, its variable and its flag: docs/configuration.md."
    )]
    Serve(serve::ServeArgs),
    /// Print a development token (HS256) for the hub.
    Token(token::TokenArgs),
    /// Run an echo server: every message comes back with its own type.
    #[command(
        after_help = "The address and server flags are those of serve, with the echo \
        server's defaults: --listen HOST:PORT, or --host and --port. What each limit \
        protects against: docs/security.md."
    )]
    Echo(echo::EchoArgs),
    /// Connect to a WebSocket server: stdin lines are sent, messages printed.
    Connect(connect::ConnectArgs),
    /// Load-test a WebSocket echo server (echo mode) or hold idle connections.
    Bench(bench::BenchArgs),
}

/// The command line, each command with its own defaults: the server flags
/// shared by `echo` and `serve` declare `echo`'s, `serve` gets its
/// configuration's.
fn cli_command() -> clap::Command {
    Cli::command().mut_subcommand("serve", serve::with_hub_defaults)
}

fn main() -> anyhow::Result<()> {
    // The matches tell `serve` which flags were given (they override its
    // configuration file; their defaults do not), and `echo` whether
    // `--listen` or `--host`/`--port` was.
    let matches = cli_command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let serve_matches = matches.subcommand_matches("serve").cloned();
    let echo_matches = matches.subcommand_matches("echo").cloned();
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
        Command::Echo(args) => runtime.block_on(echo::run(args, echo_matches)),
        Command::Connect(args) => {
            let code = runtime.block_on(connect::run(args))?;
            // Don't wait for the blocking stdin reader thread.
            runtime.shutdown_background();
            std::process::exit(code);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The help tells the truth: the defaults each command shows are those
    //! it applies, and every flag of `serve` sets the configuration keys it
    //! names.

    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::time::Duration;

    use super::*;
    use crate::server_args::{join_address, split_address};

    /// `tidewire COMMAND --help`, as the binary prints it.
    fn help(command: &str) -> String {
        let err = cli_command()
            .try_get_matches_from(["tidewire", command, "--help"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        err.render().to_string()
    }

    /// Each `--flag` of a help text with the `[default: X]` it shows.
    fn shown_defaults(help: &str) -> BTreeMap<String, String> {
        let mut defaults = BTreeMap::new();
        let mut flag = None;
        for line in help.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('-') {
                flag = trimmed
                    .split([' ', ','])
                    .find(|word| word.starts_with("--"))
                    .map(String::from);
            }
            if let (Some(flag), Some(rest)) = (&flag, line.split("[default: ").nth(1)) {
                let shown = rest.split(']').next().unwrap();
                let shown = if shown == "\"\"" { "" } else { shown };
                defaults.insert(flag.clone(), shown.to_owned());
            }
        }
        defaults
    }

    fn parse(command: &str, args: &[&str]) -> anyhow::Result<(Cli, clap::ArgMatches)> {
        let argv = ["tidewire", command]
            .into_iter()
            .chain(args.iter().copied());
        let matches = cli_command().try_get_matches_from(argv)?;
        Ok((Cli::from_arg_matches(&matches)?, matches))
    }

    /// `serve`'s configuration after these flags, key by key.
    fn serve_keys(args: &[&str]) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
        let (cli, matches) = parse("serve", args)?;
        let Command::Serve(serve_args) = cli.command else {
            unreachable!()
        };
        let config = serve::configuration(&serve_args, matches.subcommand_matches("serve"))?;
        Ok(config.keys())
    }

    /// Everything `echo` would run with after these flags.
    fn echo_settings(args: &[&str]) -> anyhow::Result<String> {
        let (cli, matches) = parse("echo", args)?;
        let Command::Echo(echo_args) = cli.command else {
            unreachable!()
        };
        Ok(format!(
            "{:?}",
            echo_args.settings(matches.subcommand_matches("echo"))
        ))
    }

    /// What a command runs with after these flags, or why it refuses them.
    fn effective(command: &str, args: &[&str]) -> String {
        let result = match command {
            "serve" => serve_keys(args).map(|keys| format!("{keys:?}")),
            _ => echo_settings(args),
        };
        result.unwrap_or_else(|e| format!("refused: {e}"))
    }

    /// A value of `flag` other than its default `shown`.
    fn another_value(flag: &str, shown: &str) -> String {
        match flag {
            "--slow-consumer" if shown == "drop" => return "close".into(),
            "--slow-consumer" => return "drop".into(),
            "--prefix" => return format!("{shown}x"),
            "--engine" if shown == "memory" => return "redis".into(),
            "--engine" => return "memory".into(),
            "--redis-url" | "--nats-url" => return format!("{shown}/1"),
            "--broker" if shown == "redis" => return "nats".into(),
            _ => {}
        }
        if let Ok(n) = shown.parse::<u64>() {
            return (n + 1).to_string();
        }
        if let Ok((host, port)) = split_address(shown) {
            return join_address(&host, port.wrapping_add(1));
        }
        if let Ok(ip) = shown.parse::<IpAddr>() {
            let other = if ip.to_string() == "127.0.0.2" {
                "127.0.0.3"
            } else {
                "127.0.0.2"
            };
            return other.into();
        }
        if let Ok(d) = tidewire_hub::config::parse_duration(shown) {
            return humantime::format_duration(d + Duration::from_secs(1)).to_string();
        }
        panic!("no other value known for {flag} (default {shown})")
    }

    #[test]
    fn each_command_shows_the_defaults_it_applies() {
        for command in ["serve", "echo"] {
            let shown = shown_defaults(&help(command));
            assert!(shown.len() > 10, "{command}: {shown:?}");
            let base = effective(command, &[]);
            assert!(!base.starts_with("refused"), "{command}: {base}");
            for (flag, default) in &shown {
                if flag == "--log-format" {
                    continue; // global, not a server setting (tests/cli.rs)
                }
                assert_eq!(
                    effective(command, &[flag, default]),
                    base,
                    "`tidewire {command} --help` shows {flag} [default: {default}], \
                     but that is not what applies without the flag"
                );
                let other = another_value(flag, default);
                assert_ne!(
                    effective(command, &[flag, &other]),
                    base,
                    "`tidewire {command} {flag} {other}` changes nothing"
                );
            }
        }
        // The flags whose defaults differ between the commands.
        let (serve, echo) = (
            shown_defaults(&help("serve")),
            shown_defaults(&help("echo")),
        );
        for (flag, hub, plain) in [
            ("--listen", "127.0.0.1:8080", "127.0.0.1:9001"),
            ("--port", "8080", "9001"),
            ("--slow-consumer", "close", "wait"),
            ("--max-message-size", "65536", "67108864"),
            ("--max-connections", "20000", "10000"),
            ("--send-queue-bytes", "1048576", "4194304"),
        ] {
            assert_eq!(
                (serve[flag].as_str(), echo[flag].as_str()),
                (hub, plain),
                "{flag}"
            );
        }
    }

    /// The code spans (`like this`) of a Markdown table cell.
    fn code_spans(cell: &str) -> BTreeSet<&str> {
        cell.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn docs_configuration_names_the_flag_of_every_key() {
        let doc = include_str!("../../../docs/configuration.md");
        let command = cli_command();
        let serve = command.find_subcommand("serve").unwrap();
        let long = |id: &str| {
            let arg = serve.get_arguments().find(|a| a.get_id() == id).unwrap();
            format!("--{}", arg.get_long().unwrap())
        };
        let mut rows = 0;
        for line in doc.lines() {
            let cells: Vec<&str> = line
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            let [key] = code_spans(cells[0]).into_iter().collect::<Vec<_>>()[..] else {
                continue;
            };
            if key.starts_with('-') || cells.len() != 6 {
                continue;
            }
            rows += 1;
            let expected: BTreeSet<String> = serve::FLAG_KEYS
                .iter()
                .filter(|(_, k)| *k == key)
                .map(|(id, _)| long(id))
                .collect();
            let documented: BTreeSet<String> =
                code_spans(cells[4]).into_iter().map(String::from).collect();
            assert_eq!(
                documented, expected,
                "docs/configuration.md: the flags of {key}"
            );
        }
        assert!(rows > 40, "{rows} keys found in docs/configuration.md");
        // The flags that set no key have their own table.
        for flag in [
            "--config FILE",
            "--tls-self-signed",
            "--log-format text\\|json",
        ] {
            assert!(doc.contains(&format!("| `{flag}` |")), "{flag}");
        }
    }

    #[test]
    fn every_serve_flag_sets_exactly_its_configuration_keys() {
        let dir = std::env::temp_dir().join(format!("tidewire-cli-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let deflate_on = dir.join("deflate.toml");
        std::fs::write(&deflate_on, "[server]\ndeflate = true\n").unwrap();
        let deflate_on = deflate_on.to_str().unwrap();
        // Flags that set no key of the configuration file.
        let not_keys = ["help", "log_format", "config", "tls_self_signed"];
        let command = cli_command();
        let serve = command.find_subcommand("serve").unwrap();
        let defaults = shown_defaults(&help("serve"));
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if not_keys.contains(&id) {
                continue;
            }
            let long = format!("--{}", arg.get_long().unwrap());
            let (base, args): (Vec<&str>, Vec<String>) = match id {
                "tls_cert" | "tls_key" => (
                    vec![],
                    ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
                        .map(String::from)
                        .into(),
                ),
                "no_deflate" => (vec!["--config", deflate_on], vec![long.clone()]),
                "broker" => (vec!["--engine", "redis"], vec![long.clone(), "nats".into()]),
                "api_key" | "token_secret" | "admin_secret" => {
                    (vec![], vec![long.clone(), "s3cret".into()])
                }
                "allow_origins" => (vec![], vec![long.clone(), "https://a.example".into()]),
                _ if !arg.get_action().takes_values() => (vec![], vec![long.clone()]),
                _ => {
                    let default = defaults
                        .get(&long)
                        .unwrap_or_else(|| panic!("{long}: no default"));
                    (vec![], vec![long.clone(), another_value(&long, default)])
                }
            };
            let ids: Vec<&str> = match id {
                "tls_cert" | "tls_key" => vec!["tls_cert", "tls_key"],
                _ => vec![id],
            };
            let expected: BTreeSet<&str> = serve::FLAG_KEYS
                .iter()
                .filter(|(flag, _)| ids.contains(flag))
                .map(|&(_, key)| key)
                .collect();
            assert!(!expected.is_empty(), "{long} is not in serve::FLAG_KEYS");
            let before = serve_keys(&base).unwrap();
            let all: Vec<&str> = base
                .iter()
                .copied()
                .chain(args.iter().map(String::as_str))
                .collect();
            let after = serve_keys(&all).unwrap_or_else(|e| panic!("{all:?}: {e}"));
            let changed: BTreeSet<&str> = after
                .keys()
                .filter(|k| after[*k] != before[*k])
                .map(String::as_str)
                .collect();
            assert_eq!(changed, expected, "serve {all:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
