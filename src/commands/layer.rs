//! `thinlayer layer ...`, `mount` and `umount`: the engine's layer verbs
//! (`thinlayer_pool::Pool`), and `layer apply`/`export`/`create
//! --from-tar` through the store (`thinlayer_store::Store`). Each returns
//! its crate's own error.

use std::{
    io::{self, Read, Write},
    path::Path,
};

use anyhow::Context;
use serde_json::json;
use thinlayer_pool::{Action, Bytes, Error, LockMode, Owner, Pool, Removal};
use thinlayer_store::Store;

use crate::render::{Output, said};

pub(crate) fn create(
    root: &Path,
    id: &str,
    parent: Option<&str>,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    // Ids of the forms other owners reserve (`vol-*`, `*-rw`, `sha256:*`,
    // ...) and other owners' layers are refused, naming the owner.
    thinlayer_pool::names::check_user_id("layer", id, Owner::User)?;
    let mut pool = Pool::open(root, LockMode::Exclusive, wait)?;
    if pool.layout().layer_record(id).exists() {
        pool.owned_layer(id, Owner::User, "`thinlayer layer create`", "take")?;
    }
    let layer = pool.create_layer(id, parent)?;
    Ok(Output {
        text: format!(
            "created layer {} (thin id {}) from {}\n",
            layer.id,
            layer.thin_id,
            layer.parent.as_deref().unwrap_or("the base device")
        ),
        json: serde_json::to_value(&layer).expect("plain data"),
    })
}

pub(crate) fn rm(
    root: &Path,
    id: &str,
    deferred: bool,
    later: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let mut pool = Pool::open(root, LockMode::Exclusive, wait)?;
    // Another owner's layer (an image's, a container's, a volume's, the
    // snapshotter's) is removed by that owner's own command.
    // (Anything else, an unknown id included, is the removal's to report:
    // it settles an interrupted operation first.)
    if let Err(e @ Error::NotOwner { .. }) =
        pool.owned_layer(id, Owner::User, "`thinlayer layer rm`", "remove")
    {
        return Err(e);
    }
    pool.set_teardown_later(later);
    match pool.remove_layer_or_defer(id, deferred)? {
        Removal::Removed => Ok(said(
            Action::Done,
            if later {
                format!("removed layer {id}; `thinlayer pool reclaim` gives its space back")
            } else {
                format!("removed layer {id}")
            },
            String::new(),
        )),
        Removal::Deferred { holders } => {
            let text = format!(
                "removal of layer {id} deferred: its device is {holders}; the kernel removes the \
                 device when that holder closes it, and `thinlayer pool recover` then finishes the removal"
            );
            Ok(Output {
                json: json!({"changed": true, "deferred": true, "message": text}),
                text: format!("{text}\n"),
            })
        }
    }
}

pub(crate) fn provision(
    root: &Path,
    id: Option<&str>,
    spares: usize,
    mounted: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let mut pool = Pool::open(root, LockMode::Exclusive, wait)?;
    let p = if mounted {
        pool.provision_mounted(id, spares)?
    } else {
        pool.provision(id, spares)?
    };
    let of = id.map_or("the base device".to_owned(), |i| format!("layer {i}"));
    let mut text = format!(
        "{spares} spare(s) of {of} ready: {} made, {} kept, {} dropped",
        p.made, p.kept, p.dropped
    );
    if p.mounted > 0 {
        text += &format!(", {} mounted", p.mounted);
    }
    text += "\n";
    Ok(Output {
        text,
        json: serde_json::to_value(&p).expect("plain data"),
    })
}

pub(crate) fn ls(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    // Shared lock: listing must not wait behind, or block, another reader.
    let mut pool = Pool::open(root, LockMode::Shared, wait)?;
    let layers = pool.layers()?;
    let spares = pool.spare_infos()?;
    let mut text = format!(
        "{:<24} {:<24} {:<11} {:>7}  {:<12} {:>10}  MOUNTED AT\n",
        "ID", "PARENT", "OWNER", "THIN-ID", "DEVICE", "MAPPED"
    );
    for l in &layers {
        text += &format!(
            "{:<24} {:<24} {:<11} {:>7}  {:<12} {:>10}  {}\n",
            l.id,
            l.parent.as_deref().unwrap_or("-"),
            l.owner.name().split(' ').next_back().unwrap_or("-"),
            l.thin_id,
            l.devnode
                .as_ref()
                .map_or("-".into(), |d| d.display().to_string()),
            l.mapped_bytes.map_or("-".into(), |b| Bytes(b).to_string()),
            l.mountpoints
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    if !spares.is_empty() {
        // The spares, below the layers: the JSON form stays the list of
        // layers (`pool status --json` lists the spares).
        text += &format!(
            "\n{:<24} {:<8} {:>7}  {:<12} {:>10}  MOUNTED AT\n",
            "SPARE OF", "MOUNTED", "THIN-ID", "DEVICE", "MAPPED"
        );
        for sp in &spares {
            text += &format!(
                "{:<24} {:<8} {:>7}  {:<12} {:>10}  {}\n",
                sp.parent.as_deref().unwrap_or("(base)"),
                if sp.mountpoint.is_some() {
                    "yes"
                } else if sp.mounted {
                    "not now"
                } else {
                    "no"
                },
                sp.thin_id,
                sp.devnode
                    .as_ref()
                    .map_or("-".into(), |d| d.display().to_string()),
                sp.mapped_bytes.map_or("-".into(), |b| Bytes(b).to_string()),
                sp.mountpoint
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
            );
        }
    }
    Ok(Output {
        text,
        json: serde_json::to_value(&layers).expect("plain data"),
    })
}

pub(crate) fn mount(
    root: &Path,
    id: &str,
    dir: &Path,
    readonly: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let (node, action) = Pool::open(root, LockMode::Exclusive, wait)?.mount_layer(
        id,
        dir,
        if readonly {
            thinlayer_pool::MountUse::ReadOnly
        } else {
            thinlayer_pool::MountUse::Container
        },
    )?;
    let mut out = said(
        action,
        format!(
            "mounted layer {id} ({}) at {}",
            node.display(),
            dir.display()
        ),
        format!(
            "layer {id} is already mounted at {}; no action taken",
            dir.display()
        ),
    );
    out.json["device"] = json!(node);
    Ok(out)
}

pub(crate) fn umount(root: &Path, target: &str, wait: bool) -> thinlayer_pool::Result<Output> {
    let dirs = Pool::open(root, LockMode::Exclusive, wait)?.umount(target)?;
    let action = if dirs.is_empty() {
        Action::AlreadyDone
    } else {
        Action::Done
    };
    let list = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Ok(said(
        action,
        format!("unmounted {list}"),
        format!("{target} is not mounted; no action taken"),
    ))
}

/// Creates layer `id` from `parent` plus the tar at `tar` (`-`: stdin).
pub(crate) fn apply(
    root: &Path,
    id: &str,
    tar: &str,
    parent: Option<&str>,
    wait: bool,
) -> thinlayer_store::Result<Output> {
    let mut s = Store::open(root, LockMode::Exclusive, wait)?;
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
///
/// # Errors
/// The store's; creating or flushing `output` as an I/O error with its
/// path as context (so a full filesystem exits 6, not "bad input").
pub(crate) fn export(root: &Path, id: &str, output: &str, wait: bool) -> anyhow::Result<Output> {
    let mut s = Store::open(root, LockMode::Exclusive, wait)?;
    let report = if output == "-" {
        let mut out = io::stdout().lock();
        s.export_layer(id, &mut out)?
    } else {
        let f = std::fs::File::create(output).with_context(|| output.to_owned())?;
        let mut w = io::BufWriter::new(f);
        let r = s.export_layer(id, &mut w)?;
        w.flush().with_context(|| output.to_owned())?;
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
