//! An init layer made from its image's init template, served through an
//! overlay, so that Docker's init code writes nothing to the pool.
//!
//! Every `docker create` makes the container's init layer on the image,
//! gets it, runs its init code (moby `daemon/initlayer`: it unlinks each of
//! its files and makes it again, and makes its directories if missing),
//! puts it, and makes the container's layer on it. An init layer made from
//! the image's template (see the parent module) already holds all of that,
//! so writing it again only copies pool blocks and commits a journal:
//!
//! - its first `get` mounts an overlay at the layer's mount point: the
//!   template, mounted read-only at its own mount point and kept for every
//!   init layer of the image, is the lower directory; the upper and work
//!   directories are on a private tmpfs (`ROOT/graphdriver/ovl`, 0700).
//!   The layer's own device, a snapshot of the template, is not touched;
//! - its last `put` compares what Docker left in the upper directory with
//!   the template ([`upper_matches`]): names, types, permissions, owners,
//!   contents, link targets, device numbers and extended attributes, not
//!   times. When they are the same, the overlay goes and the layer's
//!   device already holds what Docker made: nothing is written, no journal
//!   is committed, no cache is flushed. Anything else (another dockerd's
//!   init code, a user namespace map) is written into the layer's device
//!   as Docker would have written it: the changes as a layer tar
//!   (`thinlayer_image::write_layer`) applied to its mount, then the usual
//!   unmount.
//!
//! Times are the one thing kept from the template rather than from this
//! create: Docker's init files are empty placeholders, and it bind-mounts
//! `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` over them at start.
//!
//! What must never happen: an init layer whose device lacks what Docker
//! wrote (a difference the comparison misses is a difference kept, so
//! anything it cannot read as the same counts as different), and a host
//! path in the overlay's options that the kernel would split (a path with
//! `,`, `:` or `\` is not overlaid: the layer is mounted as any other).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    io::{BufReader, BufWriter, ErrorKind, Write},
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use nix::mount::MsFlags;
use thinlayer_pool::MountUse;
use thinlayer_store::Store;

use super::{ID_PREFIX, INIT_SUFFIX, TREE, ThinDriver, pool_id, template_of};
use crate::error::{Error, Result};

/// The largest file compared by content; a larger one in the upper
/// directory counts as a change (Docker's init files are empty).
const COMPARE_MAX: u64 = 1 << 20;

/// Whether each entry of overlay upper directory `upper` is what `lower`
/// already holds at the same path (see the module's notes), so that the
/// merged tree is `lower` but for times. A whiteout, an opaque, redirected
/// or metacopy entry, or a file over [`COMPARE_MAX`] counts as a change.
///
/// # Errors
/// A directory or entry that cannot be read (the caller treats it as a
/// change).
fn upper_matches(upper: &Path, lower: &Path) -> std::io::Result<bool> {
    for entry in fs::read_dir(upper)? {
        let name = entry?.file_name();
        let (u, l) = (upper.join(&name), lower.join(&name));
        let um = fs::symlink_metadata(&u)?;
        let lm = match fs::symlink_metadata(&l) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if !same_entry(&u, &um, &l, &lm)? || (um.is_dir() && !upper_matches(&u, &l)?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether upper entry `u` is lower entry `l`, but for times.
fn same_entry(u: &Path, um: &fs::Metadata, l: &Path, lm: &fs::Metadata) -> std::io::Result<bool> {
    let ft = um.file_type();
    let whiteout = ft.is_char_device() && um.rdev() == 0;
    // The mode holds the type bits too.
    if whiteout || (um.mode(), um.uid(), um.gid()) != (lm.mode(), lm.uid(), lm.gid()) {
        return Ok(false);
    }
    let same = if ft.is_file() {
        um.len() == lm.len() && um.len() <= COMPARE_MAX && fs::read(u)? == fs::read(l)?
    } else if ft.is_symlink() {
        fs::read_link(u)? == fs::read_link(l)?
    } else if ft.is_char_device() || ft.is_block_device() {
        um.rdev() == lm.rdev()
    } else {
        true
    };
    Ok(same && matches!((xattrs(u, true)?, xattrs(l, false)?), (Some(a), Some(b)) if a == b))
}

/// The extended attributes of `path` (not followed), without overlayfs's
/// own bookkeeping (`trusted.overlay.*`: origin, impure, nlink, ...).
/// `None` when `upper` and one of them says the entry is not a plain copy
/// of the lower one (opaque, redirect, metacopy).
fn xattrs(path: &Path, upper: bool) -> std::io::Result<Option<BTreeMap<OsString, Vec<u8>>>> {
    let mut out = BTreeMap::new();
    for name in xattr::list(path)? {
        if let Some(own) = name
            .to_str()
            .and_then(|n| n.strip_prefix("trusted.overlay."))
        {
            if upper && matches!(own, "opaque" | "redirect" | "metacopy") {
                return Ok(None);
            }
            continue;
        }
        let value = xattr::get(path, &name)?.unwrap_or_default();
        out.insert(name, value);
    }
    Ok(Some(out))
}

/// Whether `dir` is the root of an overlay mount.
fn is_overlay(dir: &Path) -> Result<bool> {
    if !thinlayer_pool::mounts::is_mountpoint(dir)? {
        return Ok(false);
    }
    let st = nix::sys::statfs::statfs(dir).map_err(|e| {
        Error::Invalid(format!(
            "cannot read the filesystem of {}: {e}",
            dir.display()
        ))
    })?;
    Ok(st.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
}

/// Makes `dir` (and its parents) 0700 if missing.
fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Invalid(format!("cannot make {}: {e}", dir.display())))
}

/// The template init layer `layer` was made from: its image's.
fn template_above(layer: &thinlayer_pool::LayerRecord) -> String {
    let image = layer.parent.as_deref().unwrap_or_default();
    template_of(image.strip_prefix(ID_PREFIX).unwrap_or(image))
}

impl ThinDriver {
    /// Whether layer `id` is an init layer served through an overlay (only
    /// an init layer can be: other layers' `put` and `remove` skip the
    /// `statfs`).
    pub(super) fn overlaid(&self, id: &str) -> Result<bool> {
        Ok(id.ends_with(INIT_SUFFIX) && is_overlay(&self.mountpoint(id))?)
    }

    /// Where the overlays' upper and work directories live: a private
    /// tmpfs.
    fn overlay_root(&self) -> PathBuf {
        self.root.join("graphdriver").join("ovl")
    }

    /// Mounts the private tmpfs of the overlays, unless it is.
    fn overlays_ready(&self) -> Result<PathBuf> {
        let dir = self.overlay_root();
        if !thinlayer_pool::mounts::is_mountpoint(&dir)? {
            private_dir(&dir)?;
            thinlayer_pool::mounts::mount_private_tmpfs(&dir)?;
        }
        Ok(dir)
    }

    /// Mounts template `tid` read-only at its mount point, unless it is:
    /// the lower directory of its image's overlaid init layers.
    pub(super) fn mount_template(&self, store: &mut Store, tid: &str) -> Result<PathBuf> {
        let dir = self.mountpoint(tid);
        if !thinlayer_pool::mounts::is_mountpoint(&dir)? {
            store
                .pool()
                .mount_layer(&pool_id(tid), &dir, MountUse::ReadOnlyScratch)?;
        }
        Ok(dir)
    }

    /// For a plain init layer `id` (its device holds its template's tree
    /// and nothing else), the template's id and its tree, read-only at
    /// its mount point (mounted if it is not); `None` for any other layer
    /// or a template gone.
    pub(super) fn template_tree(
        &self,
        store: &mut Store,
        id: &str,
    ) -> Result<Option<(String, PathBuf)>> {
        if !self.plain_inits.contains(id) {
            return Ok(None);
        }
        let tid = template_above(&Self::own(store, id, "diff against")?);
        if !store.pool().layout().layer_record(&pool_id(&tid)).exists() {
            return Ok(None);
        }
        let dir = self.mount_template(store, &tid)?;
        let tree = dir.join(TREE);
        Ok(fs::symlink_metadata(&tree)
            .is_ok_and(|m| m.file_type().is_dir())
            .then_some((tid, tree)))
    }

    /// Init layer `id`'s tree through an overlay on its image's template
    /// (see the module's notes); `None` when it cannot be had (logged: the
    /// caller mounts the layer as any other, which holds the same tree).
    pub(super) fn get_overlay(&mut self, id: &str) -> Option<PathBuf> {
        let t = std::time::Instant::now();
        match self.mount_overlay(id) {
            Ok(tree) => {
                tracing::debug!(%id, ms = t.elapsed().as_secs_f64() * 1000.0, "an init layer overlaid on its template");
                Some(tree)
            }
            Err(e) => {
                tracing::debug!(%id, error = %e, "no overlay on the template; mounting the init layer");
                let _ = fs::remove_dir_all(self.overlay_root().join(id));
                None
            }
        }
    }

    fn mount_overlay(&mut self, id: &str) -> Result<PathBuf> {
        let lower = {
            let mut store = self.store()?;
            let tid = template_above(&Self::own(&mut store, id, "mount")?);
            self.mount_template(&mut store, &tid)?
        };
        let own = self.overlays_ready()?.join(id);
        let (upper, work) = (own.join("upper"), own.join("work"));
        let _ = fs::remove_dir_all(&own);
        private_dir(&upper)?;
        private_dir(&work)?;
        let dir = self.mountpoint(id);
        private_dir(&dir)?;
        let [lower, upper, work] = [lower, upper, work].map(|p| fs::canonicalize(&p).unwrap_or(p));
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        if [&lower, &upper, &work]
            .iter()
            .any(|p| p.to_string_lossy().contains([',', ':', '\\']))
        {
            return Err(Error::Invalid(format!(
                "the overlay options would split a path: {options}"
            )));
        }
        nix::mount::mount(
            Some("overlay"),
            &dir,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| {
            Error::Invalid(format!("cannot mount an overlay at {}: {e}", dir.display()))
        })?;
        Ok(dir.join(TREE))
    }

    /// The last `put` of layer `id` if it is an overlay (see the module's
    /// notes); `false` when it is not one.
    ///
    /// # Errors
    /// Pool and apply errors writing a difference into the layer (the
    /// overlay is gone by then; Docker's create fails and removes it).
    pub(super) fn put_overlay(&mut self, id: &str) -> Result<bool> {
        let dir = self.mountpoint(id);
        if !self.overlaid(id)? {
            return Ok(false);
        }
        let t = std::time::Instant::now();
        let own = self.overlay_root().join(id);
        let tid = template_above(&Self::own(&mut self.store()?, id, "put")?);
        let lower = self.mountpoint(&tid);
        let same = upper_matches(&own.join("upper"), &lower).unwrap_or_else(|e| {
            tracing::debug!(%id, error = %e, "cannot compare an init layer with its template");
            false
        });
        if same {
            thinlayer_pool::mounts::umount(&dir)?;
            let _ = fs::remove_dir_all(&own);
            // Its device is up if it took a spare the template kept: the
            // settler takes it down.
            self.idle.insert(id.to_owned());
            self.plain_inits.insert(id.to_owned());
            tracing::debug!(%id, ms = t.elapsed().as_secs_f64() * 1000.0, "an init layer as its template: nothing written");
            return Ok(true);
        }
        tracing::info!(%id, template = %tid, "an init layer differs from its template; writing the difference");
        let changes = own.join("changes.tar");
        let written = write_changes(&lower.join(TREE), &dir.join(TREE), &changes);
        thinlayer_pool::mounts::umount(&dir)?;
        let applied = written.and_then(|()| {
            let tree = self.mount_tree(id)?;
            let input = fs::File::open(&changes).map_err(|e| io_error(&changes, &e))?;
            thinlayer_image::apply_layer(&tree, BufReader::new(input), &Default::default())
                .map_err(thinlayer_store::Error::from)?;
            Ok(())
        });
        let _ = fs::remove_dir_all(&own);
        applied?;
        self.let_go(&mut self.store()?, id)?;
        Ok(true)
    }

    /// Unmounts layer `id`'s overlay if it has one (`false` if not).
    pub(super) fn drop_overlay(&mut self, id: &str) -> Result<bool> {
        if !self.overlaid(id)? {
            return Ok(false);
        }
        thinlayer_pool::mounts::umount(&self.mountpoint(id))?;
        let _ = fs::remove_dir_all(self.overlay_root().join(id));
        Ok(true)
    }

    /// Unmounts the overlays' tmpfs (Docker's shutdown: no overlay is
    /// left).
    pub(super) fn drop_overlay_root(&self) -> thinlayer_pool::Result<()> {
        let dir = self.overlay_root();
        if thinlayer_pool::mounts::is_mountpoint(&dir)? {
            thinlayer_pool::mounts::umount(&dir)?;
        }
        Ok(())
    }

    /// At start: the overlays no reference holds are unmounted, and the
    /// upper directories no overlay uses are removed.
    pub(super) fn sweep_overlays(&mut self, mounted: &[PathBuf]) -> Result<()> {
        for dir in mounted {
            let id = dir.file_name().unwrap_or_default().to_string_lossy();
            if !self.refs.contains_key(id.as_ref()) && is_overlay(dir)? {
                thinlayer_pool::mounts::umount(dir)?;
            }
        }
        if let Ok(entries) = fs::read_dir(self.overlay_root()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !is_overlay(&self.mountpoint(&id))? {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}

/// Writes `merged`'s changes against `lower` as a layer tar to file `to`.
fn write_changes(lower: &Path, merged: &Path, to: &Path) -> Result<()> {
    let mut out = BufWriter::new(fs::File::create(to).map_err(|e| io_error(to, &e))?);
    thinlayer_image::write_layer(lower, merged, &mut out).map_err(thinlayer_store::Error::from)?;
    out.flush().map_err(|e| io_error(to, &e))
}

fn io_error(path: &Path, e: &std::io::Error) -> Error {
    Error::Invalid(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::upper_matches;
    use std::{fs, os::unix::fs::PermissionsExt, path::PathBuf};

    /// A lower tree as a template holds Docker's init files, and an
    /// upper directory holding the same entries made again.
    fn trees(name: &str) -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("tl-upper-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        for side in ["lower", "upper"] {
            let t = base.join(side).join("rootfs");
            fs::create_dir_all(t.join("etc")).unwrap();
            fs::write(t.join("etc/hosts"), "").unwrap();
            fs::write(t.join(".dockerenv"), "").unwrap();
            std::os::unix::fs::symlink("/proc/mounts", t.join("etc/mtab")).unwrap();
        }
        fs::write(base.join("lower/rootfs/etc/os"), "only below\n").unwrap();
        (base.join("upper"), base.join("lower"))
    }

    #[test]
    fn the_same_entries_made_again_match() {
        let (upper, lower) = trees("same");
        assert!(upper_matches(&upper, &lower).unwrap());
        // Times are not compared.
        let f = fs::File::options()
            .write(true)
            .open(upper.join("rootfs/.dockerenv"))
            .unwrap();
        f.set_modified(std::time::UNIX_EPOCH).unwrap();
        assert!(upper_matches(&upper, &lower).unwrap());
        let _ = fs::remove_dir_all(upper.parent().unwrap());
    }

    #[test]
    fn any_other_content_type_mode_or_target_does_not() {
        type Change = fn(&std::path::Path);
        let cases: [(&str, Change); 5] = [
            ("added", |t| fs::write(t.join("etc/new"), "").unwrap()),
            ("content", |t| fs::write(t.join("etc/hosts"), "x").unwrap()),
            ("mode", |t| {
                fs::set_permissions(t.join(".dockerenv"), fs::Permissions::from_mode(0o600))
                    .unwrap()
            }),
            ("target", |t| {
                fs::remove_file(t.join("etc/mtab")).unwrap();
                std::os::unix::fs::symlink("/proc/self/mounts", t.join("etc/mtab")).unwrap();
            }),
            ("type", |t| {
                fs::remove_file(t.join("etc/hosts")).unwrap();
                fs::create_dir(t.join("etc/hosts")).unwrap();
            }),
        ];
        for (name, change) in cases {
            let (upper, lower) = trees(name);
            change(&upper.join("rootfs"));
            assert!(
                !upper_matches(&upper, &lower).unwrap(),
                "{name}: a change is read as the template"
            );
            let _ = fs::remove_dir_all(upper.parent().unwrap());
        }
    }
}
