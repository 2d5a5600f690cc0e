//! `thinlayer container ...`: containers through `thinlayer_store::Store`;
//! the store's own error comes back unchanged.

use std::path::Path;

use serde_json::json;
use thinlayer_pool::LockMode;
use thinlayer_store::Store;

use crate::{cli::ContainerCommand, render::Output};

/// `container ...`.
pub(crate) fn run(
    root: &Path,
    cmd: ContainerCommand,
    wait: bool,
) -> thinlayer_store::Result<Output> {
    match cmd {
        ContainerCommand::Create {
            name,
            image,
            hostname,
            volumes,
            volumes_from,
        } => {
            use thinlayer_store::volumes::{MountRequest, MountSpec, parse_volumes_from};
            let request = MountRequest {
                specs: volumes
                    .iter()
                    .map(|v| MountSpec::parse(v))
                    .collect::<thinlayer_store::Result<Vec<_>>>()?,
                volumes_from: volumes_from
                    .iter()
                    .map(|v| parse_volumes_from(v))
                    .collect::<thinlayer_store::Result<Vec<_>>>()?,
            };
            let c = Store::open(root, LockMode::Exclusive, wait)?.create_container(
                &name,
                &image,
                hostname.as_deref(),
                &request,
            )?;
            let mut text = format!(
                "created container {} of image {} (layer {})\n",
                c.name, c.image, c.layer
            );
            for v in c.volumes.iter().filter(|v| v.anonymous) {
                text += &format!("  anonymous volume {} at {}\n", v.volume, v.path.display());
            }
            Ok(Output {
                text,
                json: serde_json::to_value(&c).expect("plain data"),
            })
        }
        ContainerCommand::Inspect { name } => {
            let mut s = Store::open(root, LockMode::Exclusive, wait)?;
            let c = s.container(&name)?;
            let mounts = s.container_mounts(&name)?;
            let mut text = format!(
                "container {}\n  image     {}\n  layer     {} (init {})\n  hostname  {}\n  mountpoint {}\n  mounts:\n",
                c.name,
                c.image,
                c.layer,
                c.init_layer,
                c.hostname,
                c.mountpoint.display()
            );
            if mounts.is_empty() {
                text += "    (none)\n";
            }
            for m in &mounts {
                text += &format!(
                    "    {:<6} {:<24} -> {} ({}{}{})\n",
                    m.kind,
                    m.name
                        .clone()
                        .unwrap_or_else(|| m.source.display().to_string()),
                    m.destination.display(),
                    m.mode,
                    if m.anonymous { ", anonymous" } else { "" },
                    if m.kind == "volume" && !m.source.as_os_str().is_empty() {
                        format!(", at {}", m.source.display())
                    } else {
                        String::new()
                    }
                );
            }
            Ok(Output {
                text,
                json: json!({
                    "Name": c.name,
                    "Image": c.image,
                    "Layer": c.layer,
                    "InitLayer": c.init_layer,
                    "Hostname": c.hostname,
                    "Mountpoint": c.mountpoint,
                    "Created": c.created_unix,
                    "Mounts": mounts,
                }),
            })
        }
        ContainerCommand::Mount { name, dir } => {
            let at = Store::open(root, LockMode::Exclusive, wait)?
                .mount_container(&name, dir.as_deref())?;
            Ok(Output {
                text: format!("{}\n", at.display()),
                json: json!({"container": name, "mountpoint": at}),
            })
        }
        ContainerCommand::Umount { name } => {
            let dirs = Store::open(root, LockMode::Exclusive, wait)?.umount_container(&name)?;
            Ok(Output {
                text: format!("unmounted container {name} ({} mount(s))\n", dirs.len()),
                json: json!({"container": name, "unmounted": dirs}),
            })
        }
        ContainerCommand::Ls => {
            let cs = Store::open(root, LockMode::Shared, wait)?.containers()?;
            let mut text = format!("{:<24} {:<32} {}\n", "NAME", "IMAGE", "LAYER");
            for c in &cs {
                text += &format!("{:<24} {:<32} {}\n", c.name, c.image, c.layer);
            }
            Ok(Output {
                text,
                json: serde_json::to_value(&cs).expect("plain data"),
            })
        }
        ContainerCommand::Rm { name, volumes } => {
            let gone =
                Store::open(root, LockMode::Exclusive, wait)?.remove_container(&name, volumes)?;
            let mut text = format!("removed container {name}\n");
            for v in &gone.removed {
                text += &format!("removed its anonymous volume {v}\n");
            }
            for (v, why) in &gone.kept {
                text += &format!("kept its anonymous volume {v}: {why}\n");
            }
            Ok(Output {
                text,
                json: json!({"container": name, "removed": true, "volumes_removed": gone.removed, "volumes_kept": gone.kept}),
            })
        }
        ContainerCommand::Diff { name } => {
            let changes = Store::open(root, LockMode::Exclusive, wait)?.container_diff(&name)?;
            let mut text = String::new();
            for c in &changes {
                let letter = match c.kind {
                    thinlayer_image::ChangeKind::Added => 'A',
                    thinlayer_image::ChangeKind::Modified => 'C',
                    thinlayer_image::ChangeKind::Deleted => 'D',
                };
                text += &format!("{letter} /{}\n", c.path.display());
            }
            Ok(Output {
                text,
                json: serde_json::to_value(&changes).expect("plain data"),
            })
        }
        ContainerCommand::Commit { name, as_layer } => {
            let meta = Store::open(root, LockMode::Exclusive, wait)?.commit(&name, &as_layer)?;
            Ok(Output {
                text: format!(
                    "committed container {name} as layer {as_layer} ({})\n",
                    meta.diff_id.as_deref().unwrap_or("-")
                ),
                json: serde_json::to_value(&meta).expect("plain data"),
            })
        }
    }
}
