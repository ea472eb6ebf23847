//! `tidewire token`: prints an HS256 token for development, signed with
//! the secret `tidewire serve` verifies with (`--secret`, or
//! `token.hmac_secret` from the same configuration: `--config`,
//! `tidewire.toml`, `TIDEWIRE_TOKEN_HMAC_SECRET`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tidewire_hub::auth::{now_unix, sign_hs256, TokenClaims};
use tidewire_hub::Config;

use crate::server_args::duration;

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    user: String,
    /// The HS256 secret [default: token.hmac_secret of the configuration].
    #[arg(long)]
    secret: Option<String>,
    /// Configuration file [default: tidewire.toml in the current folder, if present].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Lifetime ("30m", "1h", "7d"; 0 = no expiry).
    #[arg(long, default_value = "1h", value_parser = duration)]
    ttl: Duration,
    /// Channels (or `ns:*`) the token grants in `token` namespaces; comma-separated.
    #[arg(long, value_delimiter = ',')]
    channels: Vec<String>,
    /// Make a subscription token for this channel instead of a connection token.
    #[arg(long)]
    channel: Option<String>,
    /// Connection info (JSON), shown to others in presence and publications.
    #[arg(long)]
    info: Option<String>,
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let secret = match args.secret {
        Some(secret) => secret,
        None => {
            let cwd = std::env::current_dir()?;
            let (config, _) = Config::load(args.config.as_deref(), &cwd, |name| {
                std::env::var(name).ok()
            })?;
            config.token.hmac_secret.context(
                "no HS256 secret: pass --secret, or set token.hmac_secret in tidewire.toml \
                 (or TIDEWIRE_TOKEN_HMAC_SECRET) for both `tidewire serve` and `tidewire token`",
            )?
        }
    };
    let info = args
        .info
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--info must be JSON")?;
    let claims = TokenClaims {
        sub: args.user,
        exp: (!args.ttl.is_zero()).then(|| now_unix() + args.ttl.as_secs().max(1)),
        channels: args.channels,
        channel: args.channel,
        info,
    };
    println!(
        "{}",
        sign_hs256(&secret, &claims).map_err(anyhow::Error::msg)?
    );
    Ok(())
}
