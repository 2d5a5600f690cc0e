//! The image, container and layer-tar verbs: thin wrappers over
//! `thinlayer_store::Store`, one short function each.

use std::{
    io::{self, IsTerminal, Read, Write},
    path::{Path, PathBuf},
};

use clap::Subcommand;
use serde_json::json;
use thinlayer_pool::LockMode;
use thinlayer_store::{Progress, Store};

use crate::Output;

/// `thinlayer image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout (directory or archive) or a `docker save` archive.
    Import {
        /// The directory or archive.
        path: PathBuf,
        /// Name it (default: its tag or ref name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    Ls,
    /// Remove an image and the layers nothing else uses.
    Rm {
        /// The image.
        name: String,
    },
}

/// `thinlayer container ...`.
#[derive(Subcommand, Debug)]
pub enum ContainerCommand {
    /// Create a container: an init layer and a read-write snapshot of IMAGE.
    Create {
        /// Its name.
        name: String,
        /// The image.
        #[arg(long)]
        image: String,
        /// Hostname written into its init layer [default: its name].
        #[arg(long)]
        hostname: Option<String>,
        /// Mount at /path inside it (repeatable): NAME:/path a named volume (shared with
        /// other containers), /path an anonymous volume made for it and filled with the
        /// image's content there, /host/path:/path a host directory or file; `:ro` for
        /// read-only. The image's config Volumes become anonymous volumes too.
        #[arg(long = "volume", value_name = "SPEC")]
        volumes: Vec<String>,
        /// Mount every volume and bind of container OTHER at the same paths (repeatable;
        /// OTHER:ro for read-only).
        #[arg(long = "volumes-from", value_name = "OTHER[:ro]")]
        volumes_from: Vec<String>,
    },
    /// Show a container: its image, layers and mounts (as Docker's inspect `Mounts`).
    Inspect {
        /// The container.
        name: String,
    },
    /// Mount its root filesystem (at DIR, or its own mount point) and print where.
    Mount {
        /// The container.
        name: String,
        /// Where.
        dir: Option<PathBuf>,
    },
    /// Unmount its root filesystem.
    Umount {
        /// The container.
        name: String,
    },
    /// List containers.
    Ls,
    /// Remove a container and its layers (its volumes stay).
    Rm {
        /// The container.
        name: String,
        /// Also remove its anonymous volumes (named ones stay, and ones another container mounts).
        #[arg(long)]
        volumes: bool,
    },
    /// Paths the container added (A), changed (C) or deleted (D) against its image.
    Diff {
        /// The container.
        name: String,
    },
    /// Commit the container's changes as a new layer on its image.
    Commit {
        /// The container.
        name: String,
        /// The new layer's id.
        #[arg(long = "as")]
        as_layer: String,
    },
}

/// `thinlayer volume ...`.
#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume: a thin device with its own filesystem, or an instant clone (--from).
    Create {
        /// Its name.
        name: String,
        /// Its size [default: the pool's base size].
        #[arg(long, value_parser = |s: &str| s.parse::<thinlayer_pool::Bytes>().map_err(|e| e.to_string()))]
        size: Option<thinlayer_pool::Bytes>,
        /// Its filesystem, ext4 or xfs [default: the pool's].
        #[arg(long, value_parser = |s: &str| s.parse::<thinlayer_pool::FsType>().map_err(|e| e.to_string()))]
        fs: Option<thinlayer_pool::FsType>,
        /// Clone this volume (a snapshot: instant, sharing its blocks).
        #[arg(long)]
        from: Option<String>,
    },
    /// List volumes.
    Ls,
    /// Remove a volume no container uses.
    Rm {
        /// The volume.
        name: String,
    },
    /// Mount a volume at DIR.
    Mount {
        /// The volume.
        name: String,
        /// Where.
        dir: PathBuf,
    },
    /// Unmount a volume everywhere.
    Umount {
        /// The volume.
        name: String,
    },
}

/// `thinlayer layer apply` and `layer export`.
#[derive(Subcommand, Debug)]
pub enum LayerTarCommand {
    /// Create layer ID from PARENT (or the base) plus a layer tar (plain, gzip, zstd; `-` reads stdin).
    Apply {
        /// The new layer.
        id: String,
        /// The layer tar, or `-`.
        tar: String,
        /// The layer to build on.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Write a layer's changes against its parent as an OCI layer tar.
    Export {
        /// The layer.
        id: String,
        /// Where (`-`: stdout).
        #[arg(short, long)]
        output: String,
    },
}

type R = thinlayer_store::Result<Output>;

fn store(root: &Path, mode: LockMode, wait: bool) -> thinlayer_store::Result<Store> {
    Store::open(root, mode, wait)
}

/// Creates layer `id` from `parent` plus the tar at `tar` (`-`: stdin).
pub fn apply(root: &Path, id: &str, tar: &str, parent: Option<&str>, wait: bool) -> R {
    let mut s = store(root, LockMode::Exclusive, wait)?;
    let input: Box<dyn Read> = if tar == "-" {
        Box::new(io::stdin().lock())
    } else {
        Box::new(io::BufReader::new(std::fs::File::open(tar).map_err(
            |e| thinlayer_store::Error::Format {
                path: tar.into(),
                reason: e.to_string(),
            },
        )?))
    };
    let size = if tar == "-" {
        0
    } else {
        std::fs::metadata(tar).map(|m| m.len()).unwrap_or(0)
    };
    // A user layer: reserved ids refused, one transaction.
    let meta = s.apply_layer(id, parent, input, None, size)?;
    Ok(Output {
        text: format!(
            "created layer {id} from {} ({})\n",
            if tar == "-" { "stdin" } else { tar },
            meta.diff_id.as_deref().unwrap_or("-")
        ),
        json: serde_json::to_value(&meta).expect("plain data"),
    })
}

/// Writes layer `id`'s changes as a tar to `output` (`-`: stdout).
pub fn export(root: &Path, id: &str, output: &str, wait: bool) -> R {
    let mut s = store(root, LockMode::Exclusive, wait)?;
    let report = if output == "-" {
        let mut out = io::stdout().lock();
        s.export_layer(id, &mut out)?
    } else {
        let f = std::fs::File::create(output).map_err(|e| thinlayer_store::Error::Format {
            path: output.into(),
            reason: e.to_string(),
        })?;
        let mut w = io::BufWriter::new(f);
        let r = s.export_layer(id, &mut w)?;
        w.flush().map_err(|e| thinlayer_store::Error::Format {
            path: output.into(),
            reason: e.to_string(),
        })?;
        r
    };
    let text = if output == "-" {
        String::new()
    } else {
        format!(
            "exported layer {id} to {output}: {} entries, {}\n",
            report.entries, report.diff_id
        )
    };
    Ok(Output {
        text,
        json: json!({"layer": id, "output": output, "diff_id": report.diff_id, "entries": report.entries}),
    })
}

/// `image ...`.
pub fn image(root: &Path, cmd: ImageCommand, json_out: bool, wait: bool) -> R {
    match cmd {
        ImageCommand::Import { path, name } => {
            let mut s = store(root, LockMode::Exclusive, wait)?;
            let bar = progress_bar(json_out);
            let report = s.import(&path, name.as_deref(), &|p| match (&bar, p) {
                (
                    Some(b),
                    Progress::Layer {
                        index,
                        count,
                        id,
                        bytes,
                        reused,
                    },
                ) => {
                    b.set_length(bytes);
                    b.set_position(0);
                    let short: String = id.chars().take(19).collect();
                    b.set_message(format!(
                        "layer {index}/{count} {short}{}",
                        if reused { " (already in the pool)" } else { "" }
                    ));
                }
                (Some(b), Progress::Bytes(n)) => b.set_position(n),
                (None, _) => {}
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let text = if report.already_present {
                format!(
                    "image {} is already imported; no action taken\n",
                    report.name
                )
            } else {
                format!(
                    "imported image {}: {} layer(s) applied, {} already in the pool\n",
                    report.name, report.applied, report.reused
                )
            };
            Ok(Output {
                text,
                json: serde_json::to_value(&report).expect("plain data"),
            })
        }
        ImageCommand::Ls => {
            let s = store(root, LockMode::Shared, wait)?;
            let images = s.images()?;
            let mut text = format!("{:<32} {:>6}  {}\n", "NAME", "LAYERS", "TOP LAYER");
            for i in &images {
                text += &format!(
                    "{:<32} {:>6}  {}\n",
                    i.name,
                    i.layers.len(),
                    i.layers.last().map_or("-", String::as_str)
                );
            }
            Ok(Output {
                text,
                json: serde_json::to_value(&images).expect("plain data"),
            })
        }
        ImageCommand::Rm { name } => {
            let removed = store(root, LockMode::Exclusive, wait)?.remove_image(&name)?;
            Ok(Output {
                text: format!(
                    "removed image {name} and {} layer(s) nothing else used\n",
                    removed.len()
                ),
                json: json!({"image": name, "removed_layers": removed}),
            })
        }
    }
}

/// `container ...`.
pub fn container(root: &Path, cmd: ContainerCommand, wait: bool) -> R {
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
            let c = store(root, LockMode::Exclusive, wait)?.create_container(
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
            let mut s = store(root, LockMode::Exclusive, wait)?;
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
            let at =
                store(root, LockMode::Exclusive, wait)?.mount_container(&name, dir.as_deref())?;
            Ok(Output {
                text: format!("{}\n", at.display()),
                json: json!({"container": name, "mountpoint": at}),
            })
        }
        ContainerCommand::Umount { name } => {
            let dirs = store(root, LockMode::Exclusive, wait)?.umount_container(&name)?;
            Ok(Output {
                text: format!("unmounted container {name} ({} mount(s))\n", dirs.len()),
                json: json!({"container": name, "unmounted": dirs}),
            })
        }
        ContainerCommand::Ls => {
            let cs = store(root, LockMode::Shared, wait)?.containers()?;
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
            let gone = store(root, LockMode::Exclusive, wait)?.remove_container(&name, volumes)?;
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
            let changes = store(root, LockMode::Exclusive, wait)?.container_diff(&name)?;
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
            let meta = store(root, LockMode::Exclusive, wait)?.commit(&name, &as_layer)?;
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

/// `volume ...`.
pub fn volume(root: &Path, cmd: VolumeCommand, wait: bool) -> R {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            fs,
            from,
        } => {
            let v = store(root, LockMode::Exclusive, wait)?.create_volume(
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
            let vs = store(root, LockMode::Shared, wait)?.volumes()?;
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
            store(root, LockMode::Exclusive, wait)?.remove_volume(&name)?;
            Ok(Output {
                text: format!("removed volume {name}\n"),
                json: json!({"volume": name, "removed": true}),
            })
        }
        VolumeCommand::Mount { name, dir } => {
            let at = store(root, LockMode::Exclusive, wait)?.mount_volume(&name, &dir)?;
            Ok(Output {
                text: format!("mounted volume {name} at {}\n", at.display()),
                json: json!({"volume": name, "mountpoint": at}),
            })
        }
        VolumeCommand::Umount { name } => {
            let dirs = store(root, LockMode::Exclusive, wait)?.umount_volume(&name)?;
            Ok(Output {
                text: format!("unmounted volume {name} ({} mount(s))\n", dirs.len()),
                json: json!({"volume": name, "unmounted": dirs}),
            })
        }
    }
}

/// A byte progress bar on a terminal; none with `--json` or without a TTY.
fn progress_bar(json_out: bool) -> Option<indicatif::ProgressBar> {
    if json_out || !io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(b)
}
