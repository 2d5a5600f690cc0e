//! Layers whose tree lives in a subdirectory of their filesystem, as the
//! Docker graphdriver keeps them (`crates/docker`): each layer's
//! filesystem holds the tree under one directory (`rootfs`), so what a
//! container sees has no `lost+found` (Docker's own devicemapper driver
//! does the same). The changes, the export and the apply of such a layer
//! work on that directory of the layer and of its parent; a layer without a
//! parent is compared with an empty tree.
//!
//! The reading side goes through [`Store::with_pair`]'s read-only views
//! (a frozen copy of a live layer), the writing side through a private
//! scratch mount, as the store's own layers do.

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use thinlayer_image::{apply, diff, export};
use thinlayer_pool::MountUse;

use crate::{Change, Error, Result, Store, error::IoContext, key, syncfs};

/// Checks `sub` is one plain path component.
fn check_sub(sub: &str) -> Result<()> {
    if sub.is_empty() || sub == "." || sub == ".." || sub.contains('/') || sub.contains('\0') {
        return Err(thinlayer_pool::Error::InvalidArgument(format!(
            "`{sub}` is not a directory name: give one path component"
        ))
        .into());
    }
    Ok(())
}

/// `root/sub`, checked to be a real directory (never a symlink).
fn tree_in(root: &Path, sub: &str, id: &str) -> Result<PathBuf> {
    let dir = root.join(sub);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.file_type().is_dir() => Ok(dir),
        _ => Err(thinlayer_pool::Error::InvalidArgument(format!(
            "layer `{id}` has no `{sub}` directory at its root: it was not made by the \
             Docker graphdriver; remove it with the command that made it"
        ))
        .into()),
    }
}

impl Store {
    /// Makes directory `sub` (0755) at the root of layer `id`'s filesystem
    /// if it is missing: the tree a graphdriver layer without a parent
    /// starts with (its children inherit it as snapshots).
    ///
    /// # Errors
    /// Unknown layer, mount and I/O errors; `sub` not one component.
    pub fn make_subtree(&mut self, id: &str, sub: &str) -> Result<()> {
        check_sub(sub)?;
        let dir = self.scratch_dir(&format!("subtree-{}", key(id)))?;
        let mounted = self.pool.mount_layer(id, &dir, MountUse::Scratch);
        if let Err(e) = mounted {
            let _ = fs::remove_dir(&dir);
            return Err(e.into());
        }
        let target = dir.join(sub);
        let made = match fs::DirBuilder::new().mode(0o755).create(&target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tree_in(&dir, sub, id).map(|_| ())
            }
            Err(e) => Err(e).ctx(|| format!("create {}", target.display())),
        };
        let synced = syncfs(&dir);
        let unmounted = self.pool.umount(&dir.to_string_lossy());
        let _ = fs::remove_dir(&dir);
        made?;
        synced?;
        unmounted?;
        Ok(())
    }

    /// What layer `id` changed under `sub` against its parent's `sub`
    /// (against an empty tree without a parent).
    ///
    /// # Errors
    /// Unknown layer, a layer without `sub`, mount and read errors.
    pub fn subtree_changes(&mut self, id: &str, sub: &str) -> Result<Vec<Change>> {
        self.with_subtrees(id, sub, |l, u| Ok(diff::changes(l, u)?))
    }

    /// Writes layer `id`'s changes under `sub` against its parent's as a
    /// layer tar to `out` (streamed, never held whole).
    ///
    /// # Errors
    /// As [`Store::subtree_changes`]; write errors (the caller's reader
    /// went away).
    pub fn export_subtree(
        &mut self,
        id: &str,
        sub: &str,
        out: &mut dyn Write,
    ) -> Result<export::ExportReport> {
        self.with_subtrees(id, sub, |l, u| Ok(export::write_layer(l, u, out)?))
    }

    /// Runs `f` on the read-only trees of `id`'s parent and of `id`, each
    /// at `sub` (the parent's an empty directory when there is none).
    fn with_subtrees<T>(
        &mut self,
        id: &str,
        sub: &str,
        f: impl FnOnce(&Path, &Path) -> Result<T>,
    ) -> Result<T> {
        check_sub(sub)?;
        let layer = self.pool.layer(id)?;
        let parent = layer.parent.as_deref();
        self.with_pair(parent, id, |l, u| {
            let lower = match parent {
                Some(p) => tree_in(l, sub, p)?,
                None => l.to_path_buf(),
            };
            f(&lower, &tree_in(u, sub, id)?)
        })
    }

    /// Applies the layer tar `input` under `sub` of the existing layer
    /// `id`, which nothing else writes meanwhile (Docker's `ApplyDiff`: the
    /// layer was created empty first). Streamed: the tar is never held
    /// whole. Returns the apply's report (its `bytes` are the file content
    /// written, what Docker records as the layer's size).
    ///
    /// # Errors
    /// A hostile or broken tar, the pool full ([`Error::PoolFull`]), mount
    /// and I/O errors. The layer is left as the partial apply made it: the
    /// caller discards or remakes it.
    pub fn apply_to_subtree(
        &mut self,
        id: &str,
        sub: &str,
        input: impl Read,
    ) -> Result<apply::ApplyReport> {
        check_sub(sub)?;
        let free_before = self.free_data_bytes()?;
        let dir = self.scratch_dir(&format!("apply-{}", key(id)))?;
        if let Err(e) = self.pool.mount_layer(id, &dir, MountUse::Scratch) {
            let _ = fs::remove_dir(&dir);
            return Err(e.into());
        }
        let result = tree_in(&dir, sub, id).and_then(|tree| {
            Ok(apply::apply_layer(
                &tree,
                input,
                &apply::ApplyOptions::default(),
            )?)
        });
        let synced = syncfs(&dir);
        let full = self.pool_is_full();
        let unmounted = self.pool.umount(&dir.to_string_lossy());
        let _ = fs::remove_dir(&dir);
        if full? {
            let written = match &result {
                Ok(r) => r.bytes,
                Err(Error::Image(thinlayer_image::Error::NoSpace {
                    needed_bytes_hint, ..
                })) => *needed_bytes_hint,
                Err(_) => 0,
            };
            return Err(Error::PoolFull {
                needed: written.max(free_before + 1),
                free: free_before,
            });
        }
        let report = result?;
        synced?;
        unmounted?;
        Ok(report)
    }
}
