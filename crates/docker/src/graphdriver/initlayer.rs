//! An init layer that shares its image's init template, served through an
//! overlay, so that Docker's init code writes nothing to the pool.
//!
//! Every `docker create` makes the container's init layer on the image,
//! gets it, runs its init code (moby `daemon/initlayer`: it unlinks each of
//! its files and makes it again, and makes its directories if missing),
//! puts it, and makes the container's layer on it. The image's template
//! (see the parent module) already holds all of that, so writing it again
//! would only copy pool blocks and commit a journal; and even a device of
//! the init layer's own, a snapshot nothing writes, would cost an intent,
//! a spare, and a removal later. So such an init layer shares the
//! template:
//!
//! - its create writes one record (`ROOT/graphdriver/inits/ID`): the init
//!   layer and its image. No pool layer, no device. The record is written
//!   atomically but not durably (two fsyncs, 10-35 ms of a create in the
//!   TCG guest, saved): what it says is also in the pool record of the
//!   container's layer Docker makes on it next (durable, a child of the
//!   image's template), and Docker records the container only once that
//!   create has answered. So a host crash that loses or tears it loses
//!   nothing: the next start drops a torn one and writes again the record
//!   of each container layer's init layer that has none
//!   ([`ThinDriver::restore_shared_inits`]). An init layer whose container
//!   layer was never made is one Docker never recorded;
//! - its `get` mounts an overlay at the layer's mount point: the
//!   template, mounted read-only at its own mount point and kept for every
//!   init layer of the image, is the lower directory; the upper and work
//!   directories are on a private tmpfs (`ROOT/graphdriver/ovl`, 0700);
//! - its last `put` compares what Docker left in the upper directory with
//!   the template ([`upper_matches`]): names, types, permissions, owners,
//!   contents, link targets, device numbers and extended attributes, not
//!   times. When they are the same, the template already holds what
//!   Docker made: nothing is written, no journal is committed, no cache
//!   is flushed, and the overlay is left mounted for the settler to
//!   unmount once requests pause (an unmount waits for the kernel's RCU
//!   grace period); a `get` before that takes it again as it is, and its
//!   `put` compares again. Anything else (another dockerd's init
//!   code, a user namespace map) gives the layer a device of its own, a
//!   snapshot of the template ([`ThinDriver::own_device`]), into which it
//!   is written as Docker would have written it: the changes as a layer
//!   tar (`thinlayer_image::write_layer`) applied to its mount, then the
//!   usual unmount;
//! - the container's layer made on it is a snapshot of the template,
//!   recorded as the template's child, so the pool keeps the template
//!   while that stands on it; Docker's `Changes` and `Diff` of it against
//!   the init layer are against the template's tree;
//! - its remove drops the record (when requests pause, as removals do);
//! - anything else that needs a device of its own (a `Diff` or
//!   `ApplyDiff` of it, a child other than its container's layer) gives
//!   it one first.
//!
//! A crash between the pool layer [`ThinDriver::own_device`] makes and the
//! record's removal leaves both: the next start drops the record (the pool
//! layer is the truth).
//!
//! Times are the one thing kept from the template rather than from this
//! create: Docker's init files are empty placeholders, and it bind-mounts
//! `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` over them at start.
//!
//! What must never happen: an init layer whose tree lacks what Docker
//! wrote (a difference the comparison misses is a difference kept, so
//! anything it cannot read as the same counts as different); a template
//! removed while an init layer shares it; and a host path in the
//! overlay's options that the kernel would split (a path with `,`, `:`
//! or `\` is not overlaid: the layer gets a device of its own).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    io::{BufReader, BufWriter, ErrorKind, Write},
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use nix::mount::MsFlags;
use thinlayer_pool::{MountUse, Owner, Record, record};
use thinlayer_store::Store;

use super::{
    ID_PREFIX, INIT_SUFFIX, TEMPLATE_SUFFIX, TREE, ThinDriver, docker_id, has_template, pool_id,
    template_of,
};
use crate::error::{Error, Result};

/// An init layer that shares its image's template
/// (`ROOT/graphdriver/inits/ID`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SharedInit {
    /// Docker's id of the image (its top layer).
    image: String,
}

impl Record for SharedInit {
    const KIND: &'static str = "graphdriver-init";
}

/// Where the records of shared init layers live.
fn inits_dir(root: &Path) -> PathBuf {
    root.join("graphdriver").join("inits")
}

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
    /// Reads the shared init layers' records (at start). A record whose
    /// layer has a pool layer of its own (a crash in
    /// [`ThinDriver::own_device`]) is removed.
    ///
    /// # Errors
    /// A directory or record that cannot be read.
    pub(super) fn load_shared_inits(&mut self, store: &mut Store) -> Result<()> {
        let dir = inits_dir(&self.root);
        record::create_dir(&dir)?;
        record::sweep_temp(&dir)?;
        let entries = fs::read_dir(&dir).map_err(|e| io_error(&dir, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&dir, &e))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if store.pool().layout().layer_record(&pool_id(&id)).exists() {
                record::remove(&entry.path())?;
                continue;
            }
            let SharedInit { image } = match record::read(&entry.path(), SharedInit::KIND) {
                Ok(r) => r,
                // Torn by a host crash (it is not written durably):
                // written again below if its container's layer is there.
                Err(e @ thinlayer_pool::Error::Record { .. }) => {
                    tracing::warn!(%id, error = %e, "a shared init layer's damaged record is dropped");
                    record::remove(&entry.path())?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if !has_template(store, &image) {
                tracing::warn!(%id, %image, "an init layer shares a template that is gone: its Get fails; remove its container");
            }
            self.shared_inits.insert(id, image);
        }
        Ok(())
    }

    /// Makes init layer `id` on `image` (the caller saw its template)
    /// one that shares the template: its record, written atomically, not
    /// durably (see the module's notes).
    ///
    /// # Errors
    /// A bad id; record write errors (nothing kept).
    pub(super) fn share_template(&mut self, id: &str, image: &str) -> Result<()> {
        thinlayer_pool::names::check_id("layer", &pool_id(id))?;
        self.save_shared(id, image, false)
    }

    fn save_shared(&mut self, id: &str, image: &str, durable: bool) -> Result<()> {
        let path = inits_dir(&self.root).join(id);
        let rec = SharedInit {
            image: image.to_owned(),
        };
        if durable {
            record::write(&path, SharedInit::KIND, &rec)?;
        } else {
            record::write_volatile(&path, SharedInit::KIND, &rec)?;
        }
        self.shared_inits.insert(id.to_owned(), image.to_owned());
        Ok(())
    }

    /// Writes again, durably, the record of each container layer's init
    /// layer that shares its template and has none (a host crash lost it:
    /// it is not written durably). The container's layer is a child of
    /// the template, which names the image; its init layer is Docker's
    /// `ID-init`, which cannot be removed while that layer stands. Run at
    /// start, after the removals a previous run left are finished.
    ///
    /// `layers` are the pool's layer records.
    ///
    /// # Errors
    /// Record write errors.
    pub(super) fn restore_shared_inits(
        &mut self,
        layers: &[thinlayer_pool::LayerRecord],
    ) -> Result<()> {
        for l in layers {
            let Some(template) = l.parent.as_deref().map(docker_id) else {
                continue;
            };
            let Some(image) = template.strip_suffix(TEMPLATE_SUFFIX) else {
                continue;
            };
            // A layer being taken out of the pool may have outlived its
            // init layer's removal.
            if l.owner != Owner::Graphdriver || l.removing {
                continue;
            }
            let init = format!("{}{INIT_SUFFIX}", docker_id(&l.id));
            let own = pool_id(&init);
            if self.shared_inits.contains_key(&init) || layers.iter().any(|o| o.id == own) {
                continue;
            }
            tracing::warn!(%init, %image, "a shared init layer's record lost in a host crash is written again from its container's layer");
            self.save_shared(&init, image, true)?;
        }
        Ok(())
    }

    /// Gives shared init layer `id` a device of its own: a pool layer on
    /// its image, a snapshot of the template (a spare of it if there is
    /// one), then drops its record. A no-op for any other layer.
    ///
    /// # Errors
    /// Pool errors (it still shares the template then).
    pub(super) fn own_device(&mut self, id: &str) -> Result<()> {
        let Some(image) = self.shared_inits.get(id).cloned() else {
            return Ok(());
        };
        self.streams.unused(id, "give a device of its own to")?;
        // Its own device is mounted where a `put` may have left the
        // overlay.
        if self.spent.contains(id) {
            self.drop_overlay(id)?;
        }
        let mut store = self.store()?;
        store.pool().create_layer_derived(
            Owner::Graphdriver,
            &pool_id(id),
            &pool_id(&image),
            &pool_id(&template_of(&image)),
        )?;
        tracing::debug!(%id, %image, "an init layer no longer shares its template");
        self.unshare_logged(id);
        Ok(())
    }

    /// Drops shared init layer `id`'s record; a failure is logged (the
    /// next start drops a record whose layer has a pool layer, and
    /// `Remove` is asked again for one Docker still knows).
    pub(super) fn unshare_logged(&mut self, id: &str) {
        self.shared_inits.remove(id);
        if let Err(e) = record::remove(&inits_dir(&self.root).join(id)) {
            tracing::warn!(%id, error = %e, "a shared init layer's record is not removed");
        }
    }

    /// Removes shared init layer `id` (its children checked): its overlay
    /// goes now, unless a process works in it (refused), its record when
    /// requests pause.
    ///
    /// # Errors
    /// An overlay still in use.
    pub(super) fn remove_shared(&mut self, id: &str) -> Result<()> {
        self.drop_overlay(id)?;
        self.parked.remove(id);
        if self.refs.remove(id).is_some() {
            self.save_refs()?;
        }
        self.removing.push(id.to_owned());
        self.save_removing();
        Ok(())
    }

    /// Docker's children of layer `id` (Docker's ids, sorted), removals
    /// not finished left out: the pool's but its template, and the init
    /// layers that share that; for a shared init layer, its container's
    /// layer (in the pool a child of the template).
    pub(super) fn docker_children(&self, store: &mut Store, id: &str) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .shared_inits
            .iter()
            .filter(|(init, image)| *image == id && !self.is_removing(init))
            .map(|(init, _)| init.clone())
            .collect();
        if self.shared_inits.contains_key(id) {
            if let Some(ctr) = id.strip_suffix(INIT_SUFFIX) {
                if store.pool().layout().layer_record(&pool_id(ctr)).exists()
                    && !self.is_removing(ctr)
                {
                    out.push(ctr.to_owned());
                }
            }
        } else {
            let template = pool_id(&template_of(id));
            for c in store.pool().children_of(&pool_id(id))? {
                if c != template && !self.is_removing(&c) {
                    out.push(docker_id(&c).to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The pool layer that holds layer `id`'s tree: a shared init
    /// layer's template, else its own.
    pub(super) fn pool_view(&self, id: &str) -> String {
        match self.shared_inits.get(id) {
            Some(image) => pool_id(&template_of(image)),
            None => pool_id(id),
        }
    }

    /// The template overlaid init layer `id` is compared with: its
    /// image's (a record read only for one with a device of its own).
    fn template_for(&self, id: &str) -> Result<String> {
        Ok(match self.shared_inits.get(id) {
            Some(image) => template_of(image),
            None => template_above(&Self::own(&mut self.store()?, id, "put")?),
        })
    }

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

    /// For an init layer `id` that shares its template, the template's
    /// id and its tree, read-only at its mount point (mounted if it is
    /// not); `None` for any other layer.
    pub(super) fn template_tree(
        &self,
        store: &mut Store,
        id: &str,
    ) -> Result<Option<(String, PathBuf)>> {
        let Some(image) = self.shared_inits.get(id) else {
            return Ok(None);
        };
        let tid = template_of(image);
        let dir = self.mount_template(store, &tid)?;
        let tree = dir.join(TREE);
        Ok(fs::symlink_metadata(&tree)
            .is_ok_and(|m| m.file_type().is_dir())
            .then_some((tid, tree)))
    }

    /// Init layer `id`'s tree through an overlay on its image's template
    /// (see the module's notes); `None` when it cannot be had (logged: the
    /// caller gives it a device of its own, which holds the same tree).
    pub(super) fn get_overlay(&mut self, id: &str) -> Option<PathBuf> {
        let t = std::time::Instant::now();
        // Still mounted since its last `put`: what it holds was compared
        // with the template then, and is again at the next one.
        if self.spent.remove(id) && self.overlaid(id).unwrap_or(false) {
            return Some(self.mountpoint(id).join(TREE));
        }
        match self.mount_overlay(id) {
            Ok(tree) => {
                tracing::debug!(%id, ms = crate::ms_since(t), "an init layer overlaid on its template");
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
        let tid = self.template_for(id)?;
        let mut lower = self.mountpoint(&tid);
        // Kept mounted: the pool is opened only to mount it again.
        if !thinlayer_pool::mounts::is_mountpoint(&lower)? {
            lower = self.mount_template(&mut self.store()?, &tid)?;
        }
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
        let tid = self.template_for(id)?;
        let lower = self.mountpoint(&tid);
        let same = upper_matches(&own.join("upper"), &lower).unwrap_or_else(|e| {
            tracing::debug!(%id, error = %e, "cannot compare an init layer with its template");
            false
        });
        if same {
            // Nothing to write, and nothing to wait for: the settler
            // unmounts it once requests pause (a `get` before that takes
            // it again as it is).
            self.spent.insert(id.to_owned());
            // A device of its own (a start found one) is up if it took a
            // spare the template kept: the settler takes it down.
            if !self.shared_inits.contains_key(id) {
                self.idle.insert(id.to_owned());
            }
            tracing::debug!(%id, ms = crate::ms_since(t), "an init layer as its template: nothing written");
            return Ok(true);
        }
        tracing::info!(%id, template = %tid, "an init layer differs from its template; writing the difference");
        let changes = own.join("changes.tar");
        let written = write_changes(&lower.join(TREE), &dir.join(TREE), &changes);
        thinlayer_pool::mounts::umount(&dir)?;
        let applied = written.and_then(|()| {
            self.own_device(id)?;
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
        self.spent.remove(id);
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
