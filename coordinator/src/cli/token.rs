//! `corralctl token create`: a single-use join token for enrolling an agent.

use super::connection::Api;
use super::output::{parse_duration, print_json};
use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use corral_proto::pb::{self};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub(super) enum TokenCmd {
    /// Print a single-use join token (it also pins this coordinator's CA).
    Create {
        /// Lifetime, e.g. 30m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

pub(super) async fn run(api: &mut Api, cmd: TokenCmd, json: bool) -> Result<()> {
    match cmd {
        TokenCmd::Create { ttl } => {
            let secs = u32::try_from(ttl.as_secs()).map_err(|_| anyhow!("--ttl is too long"))?;
            if secs == 0 {
                bail!("--ttl must be at least 1s");
            }
            let t = api
                .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: secs })
                .await?
                .into_inner();
            if json {
                print_json(&t)?;
            } else {
                println!("{}", t.token);
            }
        }
    }
    Ok(())
}
