//! `thinlayer serve ...`: the long-running front ends (containerd's
//! snapshotter, Docker's plugins) on a Unix socket until SIGTERM. Each
//! server's own error comes back unchanged, so a taken socket exits 4 and
//! a pool that is missing 3, as their types say (`crate::exit`).

use std::path::Path;

use serde_json::json;
use thinlayer_pool::socket::Access;

use crate::{
    cli::{MountsArg, ServeArgs, ServeTo},
    render::Output,
};

/// Serves until a signal stops the server.
///
/// # Errors
/// The server's own error: `thinlayer_snapshotter::Error` or
/// `thinlayer_docker::Error`; a bad `--socket-group` as the engine's.
pub(crate) fn run(root: &Path, args: ServeArgs) -> anyhow::Result<Output> {
    match args.to {
        ServeTo::Containerd {
            socket,
            group,
            mounts,
            max_spares,
            spare_idle,
        } => {
            let access = Access::new(group.socket_group.as_deref())?;
            let config = thinlayer_snapshotter::Config {
                mounts: match mounts {
                    MountsArg::Bind => thinlayer_snapshotter::MountMode::Bind,
                    MountsArg::Device => thinlayer_snapshotter::MountMode::Device,
                },
                max_spares,
                spare_idle: std::time::Duration::from_secs(spare_idle),
            };
            thinlayer_snapshotter::serve(root, &socket, &access, &config)?;
        }
        ServeTo::Docker { socket, group } => {
            let access = Access::new(group.socket_group.as_deref())?;
            thinlayer_docker::plugin::serve(root, &socket, &access)?;
        }
        ServeTo::DockerVolume { socket, group } => {
            let access = Access::new(group.socket_group.as_deref())?;
            thinlayer_docker::volume::serve(root, &socket, &access)?;
        }
    }
    Ok(Output {
        text: String::new(),
        json: json!({"stopped": true}),
    })
}
