//! thinlayer's image and container store, over the pool engine: image
//! layers applied from OCI/Docker layer tars into thin snapshots,
//! containers as an init layer plus a read-write snapshot, and their
//! changes diffed, committed and exported back as layer tars.
//!
//! Data path: CLI -> [`Store`] -> [`thinlayer_pool::Pool`] (snapshots,
//! mounts) + `thinlayer_image` (tar apply, diff, export) + records.
//!
//! What must never happen: a layer that looks complete and is not (see
//! [`records`]); a refused or failed apply that leaves its snapshot or
//! records behind (every apply rolls back on error); an import that applies
//! a layer the pool already holds (layers are named by ChainID and reused).

mod docker;
pub mod error;
mod host_space;
pub mod records;
pub mod source;
mod txn;
pub mod volumes;

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use thinlayer_image::{apply, diff, export};
use thinlayer_pool::{Frozen, LockMode, MountUse, Pool, Record, record};

use error::IoContext;
pub use error::{Error, Result};
use records::{ContainerRecord, ImageRecord, LayerKind, LayerMeta};

/// What a long operation reports as it goes.
#[derive(Clone, Debug)]
pub enum Progress {
    /// Starting layer `index` of `count` (`bytes` of blob).
    Layer {
        /// 1-based.
        index: usize,
        /// Layers in all.
        count: usize,
        /// Its id.
        id: String,
        /// Blob size.
        bytes: u64,
        /// Whether the pool already holds it.
        reused: bool,
    },
    /// Bytes of the current layer's blob read so far.
    Bytes(u64),
}

/// The result of an import.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    /// The image's name.
    pub name: String,
    /// Layers applied now.
    pub applied: usize,
    /// Layers the pool already held.
    pub reused: usize,
    /// Pool layer ids bottom to top.
    pub layers: Vec<String>,
    /// Whether an identical image was already there.
    pub already_present: bool,
}

/// One changed path, for `container diff`.
pub use diff::Change;

/// The store: a pool opened under its lock, and the store's directories.
pub struct Store {
    pool: Pool,
    dir: PathBuf,
}

fn key(name: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(name.as_bytes())[..12])
}

/// Counts bytes read, reporting them.
struct Counting<'a, R> {
    inner: R,
    n: u64,
    progress: &'a dyn Fn(Progress),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        (self.progress)(Progress::Bytes(self.n));
        Ok(k)
    }
}

/// Counts the bytes read through it.
struct CountingBytes<'a, R> {
    inner: R,
    n: &'a std::cell::Cell<u64>,
}

impl<R: Read> Read for CountingBytes<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.set(self.n.get() + k as u64);
        Ok(k)
    }
}

impl Store {
    /// Opens the pool under `root` in `mode` and the store beside it.
    ///
    /// # Errors
    /// The pool's open errors.
    pub fn open(root: &Path, mode: LockMode, wait: bool) -> Result<Store> {
        let mut pool = Pool::open(root, mode, wait)?;
        let dir = root.join("store");
        if mode == LockMode::Exclusive {
            for sub in ["layers", "images", "containers", "volumes", "tmp", "mnt"] {
                record::create_dir(&dir.join(sub)).map_err(Error::Pool)?;
            }
            for sub in ["layers", "images", "containers", "volumes"] {
                record::sweep_temp(&dir.join(sub))?;
            }
            // What a crash left mounted under tmp (applies, read-only
            // views), and its frozen copies, go first.
            sweep_tmp_mounts(&mut pool, &dir.join("tmp"));
            pool.sweep_scratch()?;
            // Scratch a crash left (mounted scratch is left alone).
            thinlayer_pool::space::sweep_scratch(&dir.join("tmp"))?;
        }
        let mut store = Store { pool, dir };
        if mode == LockMode::Exclusive {
            // An operation a crash interrupted: finished or rolled back
            // before anything else (see `txn`).
            store.settle_intent()?;
        }
        Ok(store)
    }

    /// As [`Store::open`] (exclusive, waiting for the lock) for a server
    /// that opened the store once at its start and opens it again per
    /// request: an interrupted operation is still settled first, but what
    /// a crash left (temp files, mounts under `tmp`, frozen copies,
    /// scratch) is not looked for again; the listings that finds them grow
    /// with the pool and cost a request several milliseconds. The next
    /// command or start sweeps them.
    ///
    /// # Errors
    /// The pool's open errors; an interrupted operation that cannot be
    /// settled.
    pub fn open_again(root: &Path) -> Result<Store> {
        let mut store = Store {
            pool: Pool::open_again(root)?,
            dir: root.join("store"),
        };
        store.settle_intent()?;
        Ok(store)
    }

    /// The pool underneath.
    pub fn pool(&mut self) -> &mut Pool {
        &mut self.pool
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join("layers").join(format!("{}.rec", key(id)))
    }
    fn image_path(&self, name: &str) -> PathBuf {
        self.dir.join("images").join(format!("{}.rec", key(name)))
    }
    fn container_path(&self, name: &str) -> PathBuf {
        self.dir.join("containers").join(format!("{name}.rec"))
    }

    fn read_opt<T: Record>(path: &Path) -> Result<Option<T>> {
        match T::load(path) {
            Ok(v) => Ok(Some(v)),
            Err(thinlayer_pool::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn read_all<T: Record>(&self, sub: &str) -> Result<Vec<T>> {
        let dir = self.dir.join(sub);
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rec") {
                out.push(T::load(&p)?);
            }
        }
        Ok(out)
    }

    /// The store's facts about pool layer `id`, if any.
    ///
    /// # Errors
    /// Damaged records.
    pub fn layer_meta(&self, id: &str) -> Result<Option<LayerMeta>> {
        Self::read_opt(&self.meta_path(id))
    }

    /// A private directory (0700, under the root's 0700 `store/tmp`) for
    /// the engine's own files and mounts.
    fn scratch_dir(&self, purpose: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let d = self
            .dir
            .join("tmp")
            .join(format!("{purpose}-{}", std::process::id()));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .ctx(|| format!("create {}", d.display()))?;
        Ok(d)
    }

    /// Creates layer `id` on `parent` and applies the layer tar `input`
    /// into it. On any error the snapshot and its records are removed.
    ///
    /// # Errors
    /// Hostile or broken tar, diff_id mismatch, pool full (with the space
    /// the layer needs), pool errors.
    pub fn apply_new_layer(
        &mut self,
        id: &str,
        parent: Option<&str>,
        input: impl Read,
        expected_diff_id: Option<&str>,
        kind: LayerKind,
        size_hint: u64,
    ) -> Result<LayerMeta> {
        let mut meta = LayerMeta {
            id: id.to_owned(),
            kind,
            diff_id: None,
            complete: false,
        };
        if self.pool.layout().layer_record(id).exists() {
            return Err(thinlayer_pool::Error::LayerExists(id.to_owned()).into());
        }
        meta.save(&self.meta_path(id))?;
        thinlayer_pool::fault::point("layer_apply.after_meta");
        // Owned by who made it: an import, a container, or a user.
        if let Err(e) = self.pool.create_layer_for(txn::owner_of(kind), id, parent) {
            record::remove(&self.meta_path(id))?;
            return Err(e.into());
        }
        thinlayer_pool::fault::point("layer_apply.after_snapshot");
        let applied = self.apply_into(id, input, expected_diff_id, size_hint);
        match applied {
            Ok(diff_id) => {
                thinlayer_pool::fault::point("layer_apply.after_apply");
                meta.diff_id = Some(diff_id);
                meta.complete = true;
                meta.save(&self.meta_path(id))?;
                Ok(meta)
            }
            Err(e) => Err(self.roll_back_layer(id, e)),
        }
    }

    /// Applies the layer tar `input` into the existing, unmounted layer
    /// `id` (Docker's `ApplyDiff`: the layer was created empty first).
    /// Returns the tar's diff_id and its size in bytes.
    ///
    /// # Errors
    /// As [`Store::apply_new_layer`]; the layer is left as the partial
    /// apply made it (the caller removes it).
    pub fn apply_to_layer(&mut self, id: &str, input: impl Read) -> Result<(String, u64)> {
        let counted = std::cell::Cell::new(0u64);
        let diff_id = self.apply_into(
            id,
            CountingBytes {
                inner: input,
                n: &counted,
            },
            None,
            0,
        )?;
        let meta = LayerMeta {
            id: id.to_owned(),
            kind: LayerKind::Made,
            diff_id: Some(diff_id.clone()),
            complete: true,
        };
        meta.save(&self.meta_path(id))?;
        Ok((diff_id, counted.get()))
    }

    /// Mounts `id` at a scratch directory, applies, flushes, unmounts.
    ///
    /// A full thin pool shows only when the page cache is written back, as
    /// an I/O error at `syncfs`; so the pool's state, not the error's kind,
    /// decides whether this was a full pool.
    fn apply_into(
        &mut self,
        id: &str,
        input: impl Read,
        expected: Option<&str>,
        size_hint: u64,
    ) -> Result<String> {
        let free_before = self.free_data_bytes()?;
        let dir = self.scratch_dir(&format!("apply-{}", key(id)))?;
        self.pool.mount_layer(id, &dir, MountUse::Scratch)?;
        let opts = apply::ApplyOptions {
            expected_diff_id: expected.map(str::to_owned),
            ..Default::default()
        };
        let result = apply::apply_layer(&dir, input, &opts);
        let synced = syncfs(&dir);
        let full = self.pool_is_full()?;
        let unmounted = self.pool.umount(id);
        let _ = fs::remove_dir(&dir);
        if full {
            let written = match &result {
                Ok(r) => r.bytes,
                Err(thinlayer_image::Error::NoSpace {
                    needed_bytes_hint, ..
                }) => *needed_bytes_hint,
                Err(_) => 0,
            };
            return Err(Error::PoolFull {
                needed: written.max(size_hint).max(free_before + 1),
                free: free_before,
            });
        }
        let report = result?;
        synced?;
        unmounted?;
        Ok(report.diff_id)
    }

    fn pool_is_full(&mut self) -> Result<bool> {
        let st = self.pool.status()?;
        Ok(st.kernel.is_some_and(|k| {
            k.mode == thinlayer_pool::PoolMode::OutOfDataSpace
                || k.data_used_blocks >= k.data_total_blocks
        }))
    }

    fn free_data_bytes(&mut self) -> Result<u64> {
        let st = self.pool.status()?;
        Ok(st.kernel.map_or(0, |k| {
            (k.data_total_blocks - k.data_used_blocks) * st.block_size_bytes
        }))
    }

    /// Removes a half-made layer and its meta record; reports both errors
    /// if the removal fails too.
    fn roll_back_layer(&mut self, id: &str, error: Error) -> Error {
        let _ = self.pool.umount(id);
        let undo = self
            .pool
            .remove_layer(id)
            .map_err(Error::from)
            .and_then(|()| record::remove(&self.meta_path(id)).map_err(Error::from));
        match undo {
            Ok(()) => error,
            Err(u) => Error::Rollback {
                error: Box::new(error),
                undo: Box::new(u),
            },
        }
    }

    /// Imports the image at `path` (OCI layout directory or archive, or a
    /// `docker save` archive). Layers the pool already holds (same ChainID)
    /// are reused, so images sharing a base share its blocks.
    ///
    /// # Errors
    /// [`Error::Format`], [`Error::ImageExists`] (a different image of that
    /// name), apply errors (the failed layer is rolled back; layers applied
    /// before it stay, complete, for the next try to reuse).
    pub fn import(
        &mut self,
        path: &Path,
        name: Option<&str>,
        progress: &dyn Fn(Progress),
    ) -> Result<ImportReport> {
        let scratch = self.dir.join("tmp");
        self.require_import_space(path, None)?;
        let src = source::open(path, &scratch)?;
        self.require_import_space(path, Some(&src))?;
        let name = name
            .map(str::to_owned)
            .or_else(|| src.name.clone())
            .unwrap_or_else(|| src.config_digest.chars().take(19).collect());
        let diff_ids: Vec<String> = src.layers.iter().map(|l| l.diff_id.clone()).collect();
        let chain = source::chain_ids(&diff_ids);
        if let Some(old) = Self::read_opt::<ImageRecord>(&self.image_path(&name))? {
            if old.config_digest == src.config_digest && old.layers == chain {
                return Ok(ImportReport {
                    name,
                    applied: 0,
                    reused: chain.len(),
                    layers: chain,
                    already_present: true,
                });
            }
            return Err(Error::ImageExists(name));
        }
        // Before any change: a layer at one of the ChainIDs is reused (or,
        // half-applied by a crash, removed) only if it is an image layer.
        for id in &chain {
            match self.pool.layer(id) {
                Err(thinlayer_pool::Error::UnknownLayer(_)) => {}
                Err(e) => return Err(e.into()),
                Ok(l) if self.is_image_layer(&l)? => {}
                Ok(_) => {
                    self.pool.owned_layer(
                        id,
                        thinlayer_pool::Owner::Image,
                        "`thinlayer image import`",
                        "reuse",
                    )?;
                }
            }
        }
        let (mut applied, mut reused) = (0, 0);
        let mut fresh: Vec<String> = Vec::new();
        for (i, (blob, id)) in src.layers.iter().zip(&chain).enumerate() {
            let parent = i.checked_sub(1).map(|p| chain[p].as_str());
            let have = self.pool.layout().layer_record(id).exists();
            let complete = self.layer_meta(id)?.is_some_and(|m| m.complete);
            progress(Progress::Layer {
                index: i + 1,
                count: chain.len(),
                id: id.clone(),
                bytes: blob.size,
                reused: have && complete,
            });
            if have && complete {
                reused += 1;
                continue;
            }
            if have {
                // Left half-applied by a crash: remove, then apply again.
                let _ = self.pool.umount(id);
                self.pool.remove_layer(id)?;
            }
            let file =
                fs::File::open(&blob.path).ctx(|| format!("open {}", blob.path.display()))?;
            let input = Counting {
                inner: std::io::BufReader::new(file),
                n: 0,
                progress,
            };
            let made = self.apply_new_layer(
                id,
                parent,
                input,
                Some(&blob.diff_id),
                LayerKind::Image,
                blob.size,
            );
            if let Err(e) = made {
                // Leave the pool as the import found it: drop what it added.
                let mut error = e;
                for done in fresh.iter().rev() {
                    error = self.roll_back_layer(done, error);
                }
                return Err(error);
            }
            fresh.push(id.clone());
            applied += 1;
        }
        let rec = ImageRecord {
            name: name.clone(),
            config_digest: src.config_digest.clone(),
            layers: chain.clone(),
            diff_ids,
            volumes: src.volumes.clone(),
            created_unix: now_unix(),
        };
        rec.save(&self.image_path(&name))?;
        Ok(ImportReport {
            name,
            applied,
            reused,
            layers: chain,
            already_present: false,
        })
    }

    /// Every image, by name.
    ///
    /// # Errors
    /// Damaged records.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let mut v: Vec<ImageRecord> = self.read_all("images")?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The image named `name`.
    ///
    /// # Errors
    /// [`Error::UnknownImage`].
    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        Self::read_opt(&self.image_path(name))?.ok_or_else(|| Error::UnknownImage(name.to_owned()))
    }

    /// Every container, by name.
    ///
    /// # Errors
    /// Damaged records.
    pub fn containers(&self) -> Result<Vec<ContainerRecord>> {
        let mut v: Vec<ContainerRecord> = self.read_all("containers")?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The container named `name`.
    ///
    /// # Errors
    /// [`Error::UnknownContainer`].
    pub fn container(&self, name: &str) -> Result<ContainerRecord> {
        thinlayer_pool::names::check_id("container", name)?;
        Self::read_opt(&self.container_path(name))?
            .ok_or_else(|| Error::UnknownContainer(name.to_owned()))
    }

    /// Removes image `name`, and its layers that no other image, container
    /// or layer uses and no other owner holds. Returns the layers removed.
    /// A transaction (see `txn`): a crash is finished at the next open.
    ///
    /// # Errors
    /// [`Error::UnknownImage`], [`Error::InUse`] (containers of it), a
    /// layer to remove is mounted (nothing removed).
    pub fn remove_image(&mut self, name: &str) -> Result<Vec<String>> {
        let img = self.image(name)?;
        let users: Vec<String> = self
            .containers()?
            .into_iter()
            .filter(|c| c.image == name)
            .map(|c| c.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::InUse {
                what: format!("image `{name}`"),
                users: format!("container(s) {}", users.join(", ")),
            });
        }
        let doomed = self.unused_image_layers(name, &img.layers)?;
        self.refuse_mounted(&doomed)?;
        self.begin_intent(&records::Intent::RemoveImage {
            name: name.to_owned(),
            layers: doomed.clone(),
        })?;
        thinlayer_pool::fault::point("image_rm.after_intent");
        record::remove(&self.image_path(name))?;
        thinlayer_pool::fault::point("image_rm.after_record");
        let removed = self.remove_image_layers(&doomed)?;
        self.finish_intent()?;
        Ok(removed)
    }

    /// Creates container `name` of `image`: an init layer holding
    /// `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` (kept out of
    /// commits), and a read-write snapshot on top, both owned by the
    /// container; and its mounts (`mounts`, and the image's `Volumes`,
    /// see [`volumes::MountRequest`]): anonymous volumes made now and
    /// filled with the image's content at their paths. A transaction (see
    /// `txn`): a crash before the container record is rolled back at the
    /// next open, its anonymous volumes too.
    ///
    /// # Errors
    /// [`Error::ContainerExists`], [`Error::UnknownImage`], a name whose
    /// layer ids another owner reserves or holds, bad mounts (nothing
    /// made), pool errors (all rolled back).
    pub fn create_container(
        &mut self,
        name: &str,
        image: &str,
        hostname: Option<&str>,
        mounts: &volumes::MountRequest,
    ) -> Result<ContainerRecord> {
        use thinlayer_pool::{Owner, names};
        names::check_id("container", name)?;
        if self.container_path(name).exists() {
            return Err(Error::ContainerExists(name.to_owned()));
        }
        let init_id = format!("{name}-init");
        let layer_id = format!("{name}-rw");
        for id in [&init_id, &layer_id] {
            // `vol-x` would make `vol-x-rw`, a volume's id.
            names::check_user_id("container layer", id, Owner::Container)?;
            self.check_new_layer(id, Owner::Container, "`thinlayer container create`")?;
        }
        let img = self.image(image)?;
        let top = img
            .layers
            .last()
            .cloned()
            .ok_or_else(|| Error::UnknownImage(format!("{image} (it has no layers)")))?;
        let hostname = hostname.unwrap_or(name).to_owned();
        names::check_id("hostname", &hostname)?;
        let plan = self.plan_mounts(name, &img, &top, mounts)?;
        let anonymous: Vec<String> = plan.anonymous.iter().map(|a| a.0.clone()).collect();
        let init_tar = init_layer_tar(&hostname);
        let size = init_tar.len() as u64;
        self.begin_intent(&records::Intent::CreateContainer {
            name: name.to_owned(),
            init_layer: init_id.clone(),
            layer: layer_id.clone(),
            volumes: anonymous.clone(),
        })?;
        thinlayer_pool::fault::point("container_create.after_intent");
        let init = self.apply_new_layer(
            &init_id,
            Some(&top),
            &init_tar[..],
            None,
            LayerKind::Init,
            size,
        );
        if let Err(e) = init {
            return Err(self.undo_container(&init_id, &layer_id, &anonymous, e));
        }
        thinlayer_pool::fault::point("container_create.after_init_layer");
        let made = self
            .pool
            .create_layer_for(Owner::Container, &layer_id, Some(&init_id));
        if let Err(e) = made {
            return Err(self.undo_container(&init_id, &layer_id, &anonymous, e.into()));
        }
        thinlayer_pool::fault::point("container_create.after_rw_layer");
        if let Err(e) = self.make_anonymous(name, &init_id, &plan.anonymous) {
            return Err(self.undo_container(&init_id, &layer_id, &anonymous, e));
        }
        thinlayer_pool::fault::point("container_create.after_volumes");
        let meta = LayerMeta {
            id: layer_id.clone(),
            kind: LayerKind::Container,
            diff_id: None,
            complete: true,
        };
        let rec = ContainerRecord {
            name: name.to_owned(),
            image: image.to_owned(),
            image_top: top,
            init_layer: init_id.clone(),
            layer: layer_id.clone(),
            hostname,
            mountpoint: self.dir.join("mnt").join(name),
            volumes: plan.volumes,
            binds: plan.binds,
            created_unix: now_unix(),
        };
        // The commit point: the container record.
        let written = meta
            .save(&self.meta_path(&layer_id))
            .and_then(|()| rec.save(&self.container_path(name)));
        if let Err(e) = written {
            return Err(self.undo_container(&init_id, &layer_id, &anonymous, e.into()));
        }
        thinlayer_pool::fault::point("container_create.after_record");
        self.finish_intent()?;
        Ok(rec)
    }

    /// Mounts container `name`'s root filesystem at `dir` (default: its
    /// own mount point under the root), then its volumes and bind mounts,
    /// outer paths first, and returns where. Each target is opened beneath
    /// the root following no symlink and mounted onto as opened (see
    /// [`volumes::open_mount_dir`]); read-only ones are remounted so, and
    /// bind mounts `nosuid,nodev`. What is mounted already is left as it is.
    ///
    /// # Errors
    /// [`Error::UnknownContainer`], mount errors (what was mounted is
    /// unmounted again).
    pub fn mount_container(&mut self, name: &str, dir: Option<&Path>) -> Result<PathBuf> {
        let c = self.container(name)?;
        let dir = dir.map_or_else(|| c.mountpoint.clone(), Path::to_path_buf);
        self.pool.mount_layer(&c.layer, &dir, MountUse::Container)?;
        if let Err(e) = self.mount_container_mounts(&dir, &c) {
            let _ = self.umount_container(name);
            return Err(e);
        }
        Ok(dir)
    }

    /// Unmounts container `name` everywhere: first whatever is mounted at
    /// or below its volumes' and binds' paths, newest first (volumes
    /// through the pool, binds plainly; other containers sharing a volume
    /// keep theirs), then its root.
    ///
    /// # Errors
    /// [`Error::UnknownContainer`], busy mounts.
    pub fn umount_container(&mut self, name: &str) -> Result<Vec<PathBuf>> {
        let c = self.container(name)?;
        let mut done = Vec::new();
        let layers = self.pool.layers()?;
        let roots = layers
            .iter()
            .find(|l| l.id == c.layer)
            .map(|l| l.mountpoints.clone())
            .unwrap_or_default();
        let of_pool: std::collections::BTreeSet<PathBuf> =
            layers.into_iter().flat_map(|l| l.mountpoints).collect();
        let paths: Vec<&Path> = c
            .volumes
            .iter()
            .map(|v| v.path.as_path())
            .chain(c.binds.iter().map(|b| b.path.as_path()))
            .collect();
        for root in &roots {
            let targets: Vec<PathBuf> = paths
                .iter()
                .map(|p| root.join(p.strip_prefix("/").unwrap_or(p)))
                .collect();
            let inside: Vec<PathBuf> = thinlayer_pool::mounts::all()?
                .into_iter()
                .map(|m| m.mountpoint)
                .filter(|m| targets.iter().any(|t| m.starts_with(t)))
                .collect();
            for at in inside.iter().rev() {
                if of_pool.contains(at) {
                    done.extend(self.pool.umount(&at.to_string_lossy())?);
                } else {
                    thinlayer_pool::mounts::umount(at)?;
                    done.push(at.clone());
                }
            }
        }
        done.extend(self.pool.umount(&c.layer)?);
        Ok(done)
    }

    /// Removes container `name`: unmounts it, removes its layers and
    /// record, and with `volumes` its anonymous volumes that no other
    /// container mounts (named volumes stay, as in Docker's `rm -v`). A
    /// transaction (see `txn`): a crash is finished at the next open, and
    /// a container whose layers are already (partly) gone is removed too.
    ///
    /// # Errors
    /// [`Error::UnknownContainer`], busy mounts or devices, a layer made
    /// from one of its layers (nothing removed).
    pub fn remove_container(
        &mut self,
        name: &str,
        volumes: bool,
    ) -> Result<volumes::RemovedVolumes> {
        let c = self.container(name)?;
        if self.pool.layout().layer_record(&c.layer).exists() {
            self.umount_container(name)?;
        }
        let gone = if volumes {
            self.anonymous_to_remove(&c)?
        } else {
            volumes::RemovedVolumes::default()
        };
        // Refuse before any change what would stop the removal half way.
        for (id, allowed) in [(&c.layer, None), (&c.init_layer, Some(&c.layer))] {
            let children: Vec<String> = match self.pool.children_of(id) {
                Ok(v) => v.into_iter().filter(|k| Some(k) != allowed).collect(),
                Err(e) => return Err(e.into()),
            };
            if !children.is_empty() {
                return Err(thinlayer_pool::Error::HasChildren {
                    id: id.clone(),
                    children,
                }
                .into());
            }
        }
        self.begin_intent(&records::Intent::RemoveContainer {
            name: name.to_owned(),
            init_layer: c.init_layer.clone(),
            layer: c.layer.clone(),
            mountpoint: c.mountpoint.clone(),
            volumes: gone.removed.clone(),
        })?;
        thinlayer_pool::fault::point("container_rm.after_intent");
        let removed = self.remove_container_parts(
            name,
            &c.init_layer,
            &c.layer,
            &c.mountpoint,
            &gone.removed,
        );
        match removed {
            Ok(()) => self.finish_intent().map(|()| gone),
            Err(e) => {
                // Nothing removed yet (the pool refused the first layer, a
                // device held open): no intent to keep. Otherwise the next
                // open finishes it.
                if self.pool.layout().layer_record(&c.layer).exists() {
                    self.finish_intent()?;
                }
                Err(e)
            }
        }
    }

    /// Runs `f` with `upper` and its parent (or an empty tree) as
    /// read-only trees, never a live one: a layer whose device is active (a
    /// running container's, written while `f` reads) through a frozen copy
    /// (a private thin snapshot, [`Pool::freeze_layer`]); any other layer
    /// mounted read-only by itself. Both are `nosuid,nodev` at private 0700
    /// directories under `store/tmp`, and released on every path. A live
    /// tree would let a process in the container swap a directory for a
    /// symlink to the host under the walk.
    fn with_pair<T>(
        &mut self,
        lower: Option<&str>,
        upper: &str,
        f: impl FnOnce(&Path, &Path) -> Result<T>,
    ) -> Result<T> {
        let lower_dir = self.scratch_dir("lower")?;
        let upper_dir = match self.scratch_dir("upper") {
            Ok(d) => d,
            Err(e) => {
                let _ = fs::remove_dir(&lower_dir);
                return Err(e);
            }
        };
        let mut held = Vec::new();
        let mut result = (|| {
            if let Some(id) = lower {
                held.push(self.read_only_view(id, &lower_dir)?);
            }
            held.push(self.read_only_view(upper, &upper_dir)?);
            f(&lower_dir, &upper_dir)
        })();
        for view in held.into_iter().rev() {
            let released = match view {
                View::Frozen(copy) => self.pool.release_frozen(copy),
                View::Mounted(dir) => self.pool.umount(&dir.to_string_lossy()).map(|_| ()),
            };
            if let Err(e) = released {
                tracing::warn!(error = %e, "releasing a read-only view failed");
                if result.is_ok() {
                    result = Err(e.into());
                }
            }
        }
        let _ = fs::remove_dir(&lower_dir);
        let _ = fs::remove_dir(&upper_dir);
        result
    }

    /// Layer `id` as a read-only tree at `dir`: a frozen copy if its
    /// device is active, else the layer itself mounted read-only.
    fn read_only_view(&mut self, id: &str, dir: &Path) -> Result<View> {
        if self.pool.layer_is_active(id)? {
            return Ok(View::Frozen(self.pool.freeze_layer(id, dir)?));
        }
        self.pool.mount_layer(id, dir, MountUse::ReadOnlyScratch)?;
        Ok(View::Mounted(dir.to_path_buf()))
    }

    /// What container `name` changed against its image (init files aside).
    ///
    /// # Errors
    /// [`Error::UnknownContainer`], mount and read errors.
    pub fn container_diff(&mut self, name: &str) -> Result<Vec<Change>> {
        let c = self.container(name)?;
        self.with_pair(Some(&c.init_layer), &c.layer, |l, u| {
            Ok(diff::changes(l, u)?)
        })
    }

    /// What layer `id` changed against its parent.
    ///
    /// # Errors
    /// Unknown layer, mount and read errors.
    pub fn layer_changes(&mut self, id: &str) -> Result<Vec<Change>> {
        let layer = self.pool.layer(id)?;
        self.with_pair(layer.parent.as_deref(), id, |l, u| Ok(diff::changes(l, u)?))
    }

    /// Commits container `name`'s changes as new layer `as_id` on its
    /// image's top layer (the init layer's files are left out).
    ///
    /// # Errors
    /// [`Error::UnknownContainer`], layer exists, apply errors (rolled back).
    pub fn commit(&mut self, name: &str, as_id: &str) -> Result<LayerMeta> {
        self.pool.require_host_space(
            "a commit (its changes go to a scratch tar, then into the pool)",
            thinlayer_pool::space::COMMIT_MARGIN,
        )?;
        let c = self.container(name)?;
        self.check_user_layer(as_id, "`thinlayer container commit`")?;
        let tmp = self.scratch_dir("commit")?.join("layer.tar");
        // Read from a frozen copy of the running container (see with_pair).
        let report = match self.with_pair(Some(&c.init_layer), &c.layer, |l, u| {
            let f = fs::File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let r = export::write_layer(l, u, &mut w)?;
            w.flush().ctx(|| format!("write {}", tmp.display()))?;
            Ok(r)
        }) {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                let _ = tmp.parent().map(fs::remove_dir);
                return Err(e);
            }
        };
        let f = fs::File::open(&tmp).ctx(|| format!("open {}", tmp.display()))?;
        let size = report.bytes;
        // One transaction with its intent (see `txn`), as `layer apply`.
        let made = self.apply_layer(
            as_id,
            Some(&c.image_top),
            std::io::BufReader::new(f),
            Some(&report.diff_id),
            size,
        );
        let _ = fs::remove_file(&tmp);
        let _ = tmp.parent().map(fs::remove_dir);
        made
    }

    /// Writes layer `id`'s changes against its parent as an OCI layer tar.
    ///
    /// # Errors
    /// Unknown layer, mount and write errors.
    pub fn export_layer(&mut self, id: &str, out: &mut dyn Write) -> Result<export::ExportReport> {
        let layer = self.pool.layer(id)?;
        self.with_pair(layer.parent.as_deref(), id, |l, u| {
            Ok(export::write_layer(l, u, out)?)
        })
    }
}

/// Unmounts what a crashed command left mounted under `tmp`: only the
/// store mounts there (applies, read-only views, frozen copies), and under
/// the exclusive lock no other command is using them. What cannot be
/// unmounted now is logged and tried again at the next exclusive open.
fn sweep_tmp_mounts(pool: &mut Pool, tmp: &Path) {
    let Ok(tmp) = fs::canonicalize(tmp) else {
        return;
    };
    let mut left: Vec<PathBuf> = match thinlayer_pool::mounts::all() {
        Ok(all) => all
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|p| p.starts_with(&tmp) && *p != tmp)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list mounts to sweep {}", tmp.display());
            return;
        }
    };
    left.sort();
    left.dedup();
    for dir in left.iter().rev() {
        match pool.umount(&dir.to_string_lossy()) {
            Ok(_) => tracing::info!(dir = %dir.display(), "unmounted what a crash left"),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "a mount a crash left could not be unmounted yet"
            ),
        }
    }
}

/// A read-only tree [`Store::with_pair`] holds until `f` returns.
enum View {
    /// A frozen copy of a live layer.
    Frozen(Frozen),
    /// The layer itself, mounted read-only at this directory.
    Mounted(PathBuf),
}

/// The init layer's tar: the files a container engine writes per container.
fn init_layer_tar(hostname: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let files = [
        ("etc/hostname", format!("{hostname}\n")),
        (
            "etc/hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
            ),
        ),
        (
            "etc/resolv.conf",
            "nameserver 127.0.0.53\noptions edns0\n".to_owned(),
        ),
    ];
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_size(0);
    dir.set_mtime(0);
    b.append_data(&mut dir, "etc/", std::io::empty())
        .expect("in-memory tar");
    for (path, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(body.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, path, body.as_bytes())
            .expect("in-memory tar");
    }
    b.into_inner().expect("in-memory tar")
}

/// Flushes the filesystem holding `dir` (`syncfs(2)`).
fn syncfs(dir: &Path) -> Result<()> {
    let f = fs::File::open(dir).ctx(|| format!("open {}", dir.display()))?;
    nix::unistd::syncfs(&f)
        .map_err(std::io::Error::from)
        .ctx(|| format!("flush the filesystem at {}", dir.display()))
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
