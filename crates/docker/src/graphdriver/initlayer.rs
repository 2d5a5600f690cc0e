//! A container's init layer kept off its block device while Docker writes
//! it, and replayed where it is needed.
//!
//! Every `docker create` makes an init layer on the image (`ID-init`),
//! `get`s it, writes a dozen empty files and directories into it (Docker's
//! `initlayer.Setup`: `/.dockerenv`, `/etc/hosts`, `/dev/pts`, ...),
//! `put`s it, and makes the container's layer on it. Written on the thin
//! device, those few files cost a `put` that flushes a journal (pool blocks
//! copied, a pool metadata commit): most of a create's storage time. So:
//!
//! 1. **`get`** of an init layer nothing was replayed into mounts its
//!    device read-only with no journal replay (it is an unwritten snapshot
//!    of the image) at its usual mount point, and returns an overlay of it
//!    whose upper directory is on the driver's private tmpfs
//!    (`ROOT/graphdriver/init/ID/{upper,work,merged}`). Docker writes into
//!    the tmpfs; the device is never written.
//! 2. **`put`** unmounts the overlay, writes its upper directory as a layer
//!    tar (the *recipe*: whiteouts and opaque directories included, see
//!    [`thinlayer_image::write_upper`]) to `ROOT/graphdriver/recipes/ID.tar`
//!    durably, and unmounts the read-only mount: nothing to write back.
//! 3. **Replay**: every writable mount of a layer (`get`, the container
//!    layer's mount made ahead, an ApplyDiff) replays the recipes of the
//!    layer and its ancestors its filesystem has not had yet, oldest first,
//!    with the layer-tar apply, and appends each one's name to
//!    `.thinlayer-replayed` at the filesystem's root (outside the tree
//!    Docker sees). The container's layer, a snapshot of the unwritten init
//!    layer, gets the recipe when it is mounted ahead of its `get`, off the
//!    request path.
//! 4. **The init layer itself** gets its recipe only when something reads
//!    it: Diff, Changes and DiffSize (`docker diff`, `docker commit`) mount
//!    it writable once first (replaying), a later `get` mounts it as any
//!    layer. A `docker run --rm` never does, and its init layer goes
//!    without ever having been written.
//!
//! Both replays of one recipe set the same modes, owners and mtimes (to
//! the nanosecond), so Changes of a container against its init layer shows
//! only what the container did.
//!
//! Crash safety: the recipe is durable before `put` answers, so before any
//! layer is made on the init layer. The marker and the replayed entries
//! are in the same filesystem and written in that order: its journal
//! commits them in order, so a marker that survived a crash means its
//! replay did, and a replay lost with its marker is made again (applying a
//! recipe onto its own result changes nothing). A recipe is removed with
//! its layer; one a crash left behind is removed at the next start, or
//! when a new layer takes its id.
//!
//! What must never happen: a layer made on an init layer whose recipe is
//! not durable; a recipe replayed into a layer that is not its init
//! layer's descendant; a recipe lost while a layer that needs it exists.

use std::{
    fs,
    io::{BufReader, BufWriter, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use thinlayer_pool::{MountUse, Trim, error::IoContext, mounts, record};
use thinlayer_store::Store;

use super::{ID_PREFIX, INIT_SUFFIX, TREE, ThinDriver, pool_id};
use crate::error::{Error, Result};

/// The file at a layer filesystem's root naming the recipes replayed into
/// it, one per line.
const REPLAYED: &str = ".thinlayer-replayed";

impl ThinDriver {
    /// The private tmpfs the init layers' overlays live on.
    fn overlays_dir(&self) -> PathBuf {
        self.root.join("graphdriver").join("init")
    }

    /// Layer `id`'s overlay directories (`upper`, `work`, `merged`).
    fn overlay_dir(&self, id: &str) -> PathBuf {
        self.overlays_dir().join(id)
    }

    /// Where layer `id`'s overlay is mounted while Docker has it.
    pub(super) fn overlay_merged(&self, id: &str) -> PathBuf {
        self.overlay_dir(id).join("merged")
    }

    fn recipes_dir(&self) -> PathBuf {
        self.root.join("graphdriver").join("recipes")
    }

    /// Layer `id`'s recipe: what Docker wrote through its overlay.
    fn recipe_path(&self, id: &str) -> PathBuf {
        self.recipes_dir().join(format!("{id}.tar"))
    }

    /// Whether layer `id` is mounted as an overlay (a `get` of an init
    /// layer not `put` yet).
    pub(super) fn has_overlay(&self, id: &str) -> Result<bool> {
        Ok(mounts::is_mountpoint(&self.overlay_merged(id))?)
    }

    /// The recipes layer `id`'s filesystem needs, oldest first: its own
    /// and its ancestors'.
    fn recipes_for(&self, store: &mut Store, id: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut cur = Some(pool_id(id));
        while let Some(p) = cur {
            let Some(did) = p.strip_prefix(ID_PREFIX) else {
                break;
            };
            if self.recipe_path(did).exists() {
                out.push(did.to_owned());
            }
            cur = store.pool().layer(&p)?.parent;
        }
        out.reverse();
        Ok(out)
    }

    /// Replays into layer `id`'s filesystem, mounted writable at `fs_root`,
    /// the recipes it needs and has not had (see the module notes).
    pub(super) fn replay(&self, store: &mut Store, id: &str, fs_root: &Path) -> Result<()> {
        let want = self.recipes_for(store, id)?;
        if want.is_empty() {
            return Ok(());
        }
        let marker = fs_root.join(REPLAYED);
        let done = match fs::read_to_string(&marker) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            r => r.ctx(|| format!("read {}", marker.display()))?,
        };
        for r in want
            .iter()
            .filter(|r| !done.lines().any(|l| l == r.as_str()))
        {
            let t = std::time::Instant::now();
            let path = self.recipe_path(r);
            let f = fs::File::open(&path).ctx(|| format!("open {}", path.display()))?;
            let opts = thinlayer_image::ApplyOptions::default();
            thinlayer_image::apply_layer(&fs_root.join(TREE), BufReader::new(f), &opts)
                .map_err(thinlayer_store::Error::from)?;
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(record::FILE_MODE)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&marker)
                .and_then(|mut m| m.write_all(format!("{r}\n").as_bytes()))
                .ctx(|| format!("write {}", marker.display()))?;
            tracing::debug!(%id, recipe = %r, ms = t.elapsed().as_secs_f64() * 1000.0, "replayed an init layer's recipe");
        }
        Ok(())
    }

    /// Gives layer `id` the recipes it needs before something reads it
    /// unmounted (a Diff's snapshot, Changes): mounts it writable once,
    /// which replays them, and lets it go. A mounted layer had them at its
    /// mount.
    pub(super) fn materialize(&mut self, store: &mut Store, id: &str) -> Result<()> {
        if self.refs.contains_key(id)
            || self.parked.contains_key(id)
            || self.materialized.contains(id)
            || self.recipes_for(store, id)?.is_empty()
        {
            return Ok(());
        }
        let t = std::time::Instant::now();
        self.mount_tree_in(store, id)?;
        self.let_go(store, id)?;
        self.materialized.insert(id.to_owned());
        tracing::debug!(%id, ms = t.elapsed().as_secs_f64() * 1000.0, "replayed recipes before a read");
        Ok(())
    }

    /// The first `get` of init layer `id` (see the module notes): its
    /// overlay's merged directory, or `None` when the layer is not one
    /// for an overlay (recipes to replay, already mounted, a root path
    /// overlayfs options cannot name); then the caller mounts it as usual.
    ///
    /// # Errors
    /// Mount errors (nothing is left mounted).
    pub(super) fn get_overlay(&mut self, id: &str) -> Result<Option<PathBuf>> {
        if !id.ends_with(INIT_SUFFIX) || self.parked.contains_key(id) {
            return Ok(None);
        }
        let dir = self.mountpoint(id);
        let ovl = self.overlay_dir(id);
        let (lower, upper, work, merged) = (
            dir.join(TREE),
            ovl.join("upper"),
            ovl.join("work"),
            ovl.join("merged"),
        );
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        // overlayfs separates options with `,` and lower layers with `:`.
        if [&lower, &upper, &work]
            .iter()
            .any(|p| p.to_string_lossy().contains([',', ':', '\\']))
        {
            return Ok(None);
        }
        self.streams.not_applying(id, "mount")?;
        let mut store = self.store()?;
        Self::own(&mut store, id, "mount")?;
        if !self.recipes_for(&mut store, id)?.is_empty() || mounts::is_mountpoint(&dir)? {
            return Ok(None);
        }
        self.overlays_ready()?;
        let _ = fs::remove_dir_all(&ovl);
        for d in [&ovl, &upper, &work, &merged] {
            record::create_dir(d)?;
        }
        store
            .pool()
            .mount_layer(&pool_id(id), &dir, MountUse::Frozen)?;
        let mounted = (|| {
            // The merged root is the upper directory: give it the layer
            // root's mode and owner.
            let root = fs::metadata(&lower).ctx(|| format!("inspect {}", lower.display()))?;
            fs::set_permissions(&upper, fs::Permissions::from_mode(root.mode() & 0o7777))
                .ctx(|| format!("chmod {}", upper.display()))?;
            std::os::unix::fs::lchown(&upper, Some(root.uid()), Some(root.gid()))
                .ctx(|| format!("chown {}", upper.display()))?;
            nix::mount::mount(
                Some("overlay"),
                &merged,
                Some("overlay"),
                nix::mount::MsFlags::MS_NODEV,
                Some(opts.as_str()),
            )
            .map_err(std::io::Error::from)
            .ctx(|| format!("mount an overlay at {}", merged.display()))
        })();
        if let Err(e) = mounted {
            let _ = store.pool().umount_with(&dir.to_string_lossy(), Trim::Skip);
            let _ = fs::remove_dir_all(&ovl);
            return Err(e.into());
        }
        Ok(Some(merged))
    }

    /// The last `put` of init layer `id` got as an overlay: the overlay
    /// goes, its upper becomes the layer's recipe (durably), the
    /// read-only mount goes and the device is left to the settler.
    ///
    /// # Errors
    /// [`thinlayer_pool::Error::Busy`] while a process works in the
    /// overlay (nothing changed); recipe write errors (the overlay's upper
    /// is kept, so a retried `put` or the next start writes it).
    pub(super) fn put_overlay(&mut self, store: &mut Store, id: &str) -> Result<()> {
        let ovl = self.overlay_dir(id);
        let merged = ovl.join("merged");
        if mounts::is_mountpoint(&merged)? {
            mounts::umount(&merged)?;
        }
        self.save_recipe(id, &ovl.join("upper"))?;
        let _ = fs::remove_dir_all(&ovl);
        self.let_go(store, id)
    }

    /// Writes `upper` as layer `id`'s recipe: temp file, fsync, rename,
    /// fsync of the directory.
    fn save_recipe(&self, id: &str, upper: &Path) -> Result<()> {
        let t = std::time::Instant::now();
        let path = self.recipe_path(id);
        let tmp = path.with_extension("tar.tmp");
        let mut w = BufWriter::new(record::open_private(&tmp, false)?);
        let written = thinlayer_image::write_upper(upper, &mut w)
            .map_err(thinlayer_store::Error::from)
            .map_err(Error::from)
            .and_then(|report| {
                let f = w.into_inner().map_err(std::io::IntoInnerError::into_error);
                f.and_then(|f| f.sync_all())
                    .ctx(|| format!("write {}", tmp.display()))?;
                Ok(report)
            });
        let report = match written {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &path).ctx(|| format!("rename {} into place", tmp.display()))?;
        let dir = self.recipes_dir();
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("fsync {}", dir.display()))?;
        tracing::debug!(%id, entries = report.entries, ms = t.elapsed().as_secs_f64() * 1000.0, "init layer's recipe written");
        Ok(())
    }

    /// Forgets layer `id`'s recipe and overlay (its layer is gone, or a new
    /// one takes its id).
    pub(super) fn drop_recipe(&mut self, id: &str) -> Result<()> {
        self.materialized.remove(id);
        let path = self.recipe_path(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).ctx(|| format!("remove {}", path.display()))?;
            }
            _ => {}
        }
        let ovl = self.overlay_dir(id);
        if ovl.exists() {
            let merged = ovl.join("merged");
            if mounts::is_mountpoint(&merged)? {
                mounts::umount(&merged)?;
            }
            let _ = fs::remove_dir_all(&ovl);
        }
        Ok(())
    }

    /// Makes `ROOT/graphdriver/init` a private tmpfs if it is not one.
    fn overlays_ready(&self) -> Result<()> {
        let dir = self.overlays_dir();
        if !mounts::is_mountpoint(&dir)? {
            record::create_dir(&dir)?;
            mounts::mount_private_tmpfs(&dir)?;
        }
        Ok(())
    }

    /// At start (`all` unset) and at Docker's shutdown (`all` set):
    /// overlays no `get` holds (or all) are put, their recipes written;
    /// recipes whose layer is gone are removed.
    ///
    /// # Errors
    /// Pool errors listing the layers; recipe write errors.
    pub(super) fn settle_overlays(&mut self, store: &mut Store, all: bool) -> Result<()> {
        record::create_dir(&self.recipes_dir())?;
        if let Ok(entries) = fs::read_dir(self.overlays_dir()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if all || !self.refs.contains_key(&id) {
                    tracing::info!(%id, "an init layer's overlay no get holds: writing its recipe");
                    self.put_overlay(store, &id)?;
                }
            }
        }
        if all {
            // Docker stops: the tmpfs goes too (made again by the next
            // init layer's `get`).
            let dir = self.overlays_dir();
            if mounts::is_mountpoint(&dir)? {
                mounts::detach(&dir)?;
            }
        }
        for e in fs::read_dir(self.recipes_dir())
            .ctx(|| format!("list {}", self.recipes_dir().display()))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".tar").unwrap_or(&name);
            if name.ends_with(".tmp") || !store.pool().layout().layer_record(&pool_id(id)).exists()
            {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }
}
