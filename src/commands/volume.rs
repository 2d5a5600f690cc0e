//! `thinlayer volume ...`: thin volumes through `thinlayer_store::Store`;
//! the store's own error comes back unchanged.

use std::path::Path;

use serde_json::json;
use thinlayer_pool::LockMode;
use thinlayer_store::Store;

use crate::{cli::VolumeCommand, render::Output};

/// `volume ...`.
pub(crate) fn run(root: &Path, cmd: VolumeCommand, wait: bool) -> thinlayer_store::Result<Output> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            fs,
            from,
        } => {
            let v = Store::open(root, LockMode::Exclusive, wait)?.create_volume(
                &name,
                size,
                fs,
                from.as_deref(),
            )?;
            Ok(Output {
                text: match &v.from {
                    Some(src) => format!(
                        "created volume {} as a clone of {src} ({}, {})\n",
                        v.name,
                        v.size,
                        v.fs.name()
                    ),
                    None => format!("created volume {} ({}, {})\n", v.name, v.size, v.fs.name()),
                },
                json: serde_json::to_value(&v).expect("plain data"),
            })
        }
        VolumeCommand::Ls => {
            let vs = Store::open(root, LockMode::Shared, wait)?.volumes()?;
            let mut text = format!(
                "{:<24} {:>8} {:<5} {:<16} {}\n",
                "NAME", "SIZE", "FS", "FROM", "ANONYMOUS FOR"
            );
            for v in &vs {
                text += &format!(
                    "{:<24} {:>8} {:<5} {:<16} {}\n",
                    v.name,
                    v.size.to_string(),
                    v.fs.name(),
                    v.from.as_deref().unwrap_or("-"),
                    v.anonymous_for.as_deref().unwrap_or("-")
                );
            }
            Ok(Output {
                text,
                json: serde_json::to_value(&vs).expect("plain data"),
            })
        }
        VolumeCommand::Rm { name } => {
            Store::open(root, LockMode::Exclusive, wait)?.remove_volume(&name)?;
            Ok(Output {
                text: format!("removed volume {name}\n"),
                json: json!({"volume": name, "removed": true}),
            })
        }
        VolumeCommand::Mount { name, dir } => {
            let at = Store::open(root, LockMode::Exclusive, wait)?.mount_volume(&name, &dir)?;
            Ok(Output {
                text: format!("mounted volume {name} at {}\n", at.display()),
                json: json!({"volume": name, "mountpoint": at}),
            })
        }
        VolumeCommand::Umount { name } => {
            let dirs = Store::open(root, LockMode::Exclusive, wait)?.umount_volume(&name)?;
            Ok(Output {
                text: format!("unmounted volume {name} ({} mount(s))\n", dirs.len()),
                json: json!({"volume": name, "unmounted": dirs}),
            })
        }
    }
}
