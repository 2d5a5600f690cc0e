//! Layers: thin snapshots of a parent layer or of the pool's base device.
//!
//! A layer's thin device is in the kernel only while it is mounted (or
//! being snapshotted from a mounted state): `mount` activates it, `umount`
//! tears it down. So snapshotting an unmounted parent is one pool message,
//! with no suspend, and the kernel's device list holds only what is in use.

use std::{
    fs,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    error::{Error, IoContext, Result},
    fault, kernel,
    mounts::{self, MountUse},
    names::{self, Role},
    pool::{Action, FsType, LayerRecord, Owner, Pending, Pool, RECORD_LAYER, now_unix},
    record,
    units::Bytes,
};

/// A layer as `layer ls` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    /// The layer id.
    pub id: String,
    /// Its parent, if not the base device.
    pub parent: Option<String>,
    /// Its thin id in the pool.
    pub thin_id: u32,
    /// Its device node while active.
    pub devnode: Option<PathBuf>,
    /// Where it is mounted.
    pub mountpoints: Vec<PathBuf>,
    /// Bytes its thin device maps, own and shared (only while active).
    pub mapped_bytes: Option<u64>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Its removal was deferred until its device's holder lets go.
    pub removing: bool,
    /// Who it belongs to.
    pub owner: Owner,
}

/// A layer whose removal is deferred takes no new children or mounts.
pub(crate) fn refuse_removing(l: &LayerRecord) -> Result<()> {
    if l.removing {
        return Err(Error::Busy {
            what: format!("layer `{}`", l.id),
            detail: "its removal is deferred until its device's holder lets go; \
                     `thinlayer pool recover` finishes it"
                .into(),
        });
    }
    Ok(())
}

/// What `layer rm` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// The layer is gone.
    Removed,
    /// Its device is busy: the kernel removes the device when the holder
    /// closes it, then `pool recover` finishes the removal.
    Deferred {
        /// Who holds the device.
        holders: String,
    },
}

impl Pool {
    /// Every layer record, ordered by thin id (creation order).
    ///
    /// # Errors
    /// I/O and damaged-record errors.
    pub fn layer_records(&self) -> Result<Vec<LayerRecord>> {
        let dir = self.layout().layers_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).ctx(|| format!("list {}", dir.display())),
        };
        for entry in entries {
            let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
            if path.extension().is_some_and(|e| e == "rec") {
                out.push(record::read::<LayerRecord>(&path, RECORD_LAYER)?);
            }
        }
        out.sort_by_key(|l| l.thin_id);
        Ok(out)
    }

    /// The record of layer `id`.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::InvalidName`], damaged records.
    pub fn layer(&self, id: &str) -> Result<LayerRecord> {
        names::check_id("layer", id)?;
        let path = self.layout().layer_record(id);
        match record::read(&path, RECORD_LAYER) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::UnknownLayer(id.to_owned()))
            }
            r => r,
        }
    }

    /// Layers with their kernel state (active device, mounts, mapped bytes).
    ///
    /// # Errors
    /// Environment, kernel and record errors.
    pub fn layers(&mut self) -> Result<Vec<LayerInfo>> {
        let records = self.layer_records()?;
        let active = self.pool_device()?.is_some();
        let prefix = names::name_prefix(&self.record().pool_id);
        let present = if active {
            self.kernel()?.names_with_prefix(&prefix)?
        } else {
            Default::default()
        };
        let all_mounts = if present.is_empty() {
            Vec::new()
        } else {
            mounts::all()?
        };
        let mut out = Vec::with_capacity(records.len());
        for l in records {
            let name = self.name(Role::Thin(l.thin_id));
            let (devnode, mountpoints, mapped_bytes) = if present.contains(&name.to_string()) {
                let kernel = self.kernel()?;
                match kernel.device(&name)? {
                    Some(dev) => (
                        Some(kernel::devnode(dev)),
                        all_mounts
                            .iter()
                            .filter(|m| m.device == dev)
                            .map(|m| m.mountpoint.clone())
                            .collect(),
                        kernel
                            .thin_mapped_sectors(&name)?
                            .map(|s| s.0 * crate::units::SECTOR),
                    ),
                    None => (None, Vec::new(), None),
                }
            } else {
                (None, Vec::new(), None)
            };
            out.push(LayerInfo {
                id: l.id,
                parent: l.parent,
                thin_id: l.thin_id,
                devnode,
                mountpoints,
                mapped_bytes,
                created_unix: l.created_unix,
                removing: l.removing,
                owner: l.owner,
            });
        }
        Ok(out)
    }

    /// Refuses when the pool cannot take a new thin device: out of data
    /// space, metadata nearly full, or read-only.
    pub(crate) fn check_space(&mut self) -> Result<()> {
        match self.space_left() {
            // Space removed layers still hold (`layer rm --later`): take
            // it back before refusing.
            Err(Error::NoSpace { .. }) if !self.record().trash.is_empty() => {
                let r = self.reclaim()?;
                tracing::info!(
                    thin_ids = r.thin_ids,
                    "pool short of space: reclaimed the trash"
                );
                self.space_left()
            }
            r => r,
        }
    }

    fn space_left(&mut self) -> Result<()> {
        let pool = self.name(Role::Pool);
        let w = self.kernel()?.pool_status(&pool)?;
        let (used_d, total_d) = (w.usage.used_data.0, w.usage.total_data.0);
        let (used_m, total_m) = (w.usage.used_meta.0, w.usage.total_meta.0);
        if w.summary != devicemapper::ThinPoolStatusSummary::Good || used_d >= total_d {
            return Err(Error::NoSpace {
                what: "data".into(),
                detail: format!("{used_d} of {total_d} blocks used, mode {:?}", w.summary),
            });
        }
        // A snapshot needs a few metadata blocks; keep 1% spare for the kernel.
        if (used_m + 8) * 100 >= total_m * 99 {
            return Err(Error::NoSpace {
                what: "metadata".into(),
                detail: format!("{used_m} of {total_m} blocks used"),
            });
        }
        Ok(())
    }

    /// Creates layer `id` as a thin snapshot of `parent` (or of the base
    /// device): copy-on-write at the pool's block size. A snapshot has its
    /// parent's size and filesystem.
    ///
    /// # Errors
    /// [`Error::LayerExists`], [`Error::UnknownLayer`] (parent),
    /// [`Error::NoSpace`], [`Error::PoolInactive`], kernel errors.
    pub fn create_layer(&mut self, id: &str, parent: Option<&str>) -> Result<LayerRecord> {
        self.make_layer(id, Source::Snapshot(parent), Owner::User)
    }

    /// As [`Pool::create_layer`], recording `owner` as the layer's owner.
    ///
    /// # Errors
    /// As [`Pool::create_layer`].
    pub fn create_layer_for(
        &mut self,
        owner: Owner,
        id: &str,
        parent: Option<&str>,
    ) -> Result<LayerRecord> {
        self.make_layer(id, Source::Snapshot(parent), owner)
    }

    /// Layer `id`'s record, checked to belong to `owner`: `asker` and
    /// `action` word the refusal ("the image import", "reuse").
    ///
    /// # Errors
    /// [`Error::UnknownLayer`]; [`Error::NotOwner`] naming the owner and
    /// its own command.
    pub fn owned_layer(
        &self,
        id: &str,
        owner: Owner,
        asker: &'static str,
        action: &'static str,
    ) -> Result<LayerRecord> {
        let layer = self.layer(id)?;
        if layer.owner == owner {
            Ok(layer)
        } else {
            Err(Error::NotOwner {
                id: id.to_owned(),
                owner: layer.owner.name(),
                asker,
                action,
                hint: layer.owner.remove_hint(),
            })
        }
    }

    /// Creates `id` as a fresh thin device of `size` holding a new `fs`
    /// filesystem (a volume): no parent, nothing shared.
    ///
    /// # Errors
    /// As [`Pool::create_layer`]; bad sizes; mkfs errors (nothing kept).
    pub fn create_volume_layer(
        &mut self,
        id: &str,
        size: Bytes,
        fs: FsType,
    ) -> Result<LayerRecord> {
        if size < fs.min_size() || !size.0.is_multiple_of(4096) {
            return Err(Error::InvalidSize {
                input: size.to_string(),
                reason: format!(
                    "a {} volume must be a multiple of 4K and at least {}",
                    fs.name(),
                    fs.min_size()
                ),
            });
        }
        fs.mkfs().find()?;
        self.make_layer(id, Source::Fresh { size, fs }, Owner::Volume)
    }

    /// The one path that makes a thin device and its record, as a
    /// transaction: intent, kernel steps (for a fresh device the filesystem
    /// too, so a recorded device is always formatted), the layer record
    /// (the commit point), the intent cleared.
    fn make_layer(&mut self, id: &str, source: Source<'_>, owner: Owner) -> Result<LayerRecord> {
        names::check_id("layer", id)?;
        // Settle an interrupted operation first: it may be this very layer.
        if self.pool_device()?.is_some() {
            self.recover()?;
        }
        if self.layout().layer_record(id).exists() {
            return Err(Error::LayerExists(id.to_owned()));
        }
        let (origin, parent, size, fs) = match source {
            Source::Snapshot(Some(p)) => {
                let pr = self.layer(p)?;
                refuse_removing(&pr)?;
                (Some(pr.thin_id), Some(p.to_owned()), pr.size, pr.fs)
            }
            Source::Snapshot(None) => (Some(self.record().base_thin_id), None, None, None),
            Source::Fresh { size, fs } => (None, None, Some(size), Some(fs)),
        };
        // recover() ran above: the pool is settled.
        let pool_dev = self.require_active()?;
        self.check_space()?;

        let t = self.record().transaction_id;
        // A spare provisioned ahead of demand is this very snapshot, made.
        let spare = match source {
            Source::Snapshot(p) => self.take_spare(p),
            Source::Fresh { .. } => None,
        };
        let thin_id = spare
            .as_ref()
            .map_or(self.record().next_thin_id, |s| s.thin_id);
        kernel::ThinId::new(thin_id)?;
        let pool = self.name(Role::Pool);
        let begun = self.begin(Pending::CreateLayer {
            id: id.to_owned(),
            thin_id,
            parent: parent.clone(),
            size,
            fs,
        });
        if let Err(e) = begun {
            self.record_mut().spares.extend(spare);
            return Err(e);
        }
        fault::point("layer_create.after_intent");

        let made = match origin {
            _ if spare.is_some() => Ok(()),
            Some(origin) => {
                let origin_name = self.name(Role::Thin(origin));
                let kernel = self.kernel()?;
                let origin_active = kernel.device(&origin_name)?.is_some();
                kernel.snapshot(
                    &pool,
                    kernel::ThinId::new(thin_id)?,
                    kernel::ThinId::new(origin)?,
                    origin_active.then_some(&*origin_name),
                )
            }
            None => self.make_fresh(pool_dev, thin_id, size, fs),
        };
        fault::point("layer_create.after_snapshot");
        if let Err(e) = made {
            // The kernel refused: forget the intent. The thin id stays used
            // up; ids are never handed out twice.
            self.commit(t)?;
            return Err(e);
        }
        let layer = LayerRecord {
            id: id.to_owned(),
            thin_id,
            parent,
            created_unix: now_unix(),
            size,
            fs,
            removing: false,
            owner,
        };
        // The commit point: a layer record naming the thin id (the kernel
        // committed its metadata before the message returned).
        record::write(&self.layout().layer_record(id), RECORD_LAYER, &layer)?;
        self.index_added(id, layer.parent.as_deref());
        fault::point("layer_create.after_record");
        self.commit(t)?;
        Ok(layer)
    }

    /// `create_thin`, then activate, format and tear down the new device;
    /// on failure the thin id is deleted again.
    fn make_fresh(
        &mut self,
        pool_dev: devicemapper::Device,
        thin_id: u32,
        size: Option<Bytes>,
        fs: Option<FsType>,
    ) -> Result<()> {
        let pool = self.name(Role::Pool);
        let name = self.name(Role::Thin(thin_id));
        let uuid = self.uuid(Role::Thin(thin_id));
        let size = size.unwrap_or(self.record().base_size);
        let fs = fs.unwrap_or(self.record().fs);
        let kernel = self.kernel()?;
        kernel.pool_message(&pool, &format!("create_thin {thin_id}"))?;
        let formatted = kernel
            .new_thin(
                &name,
                &uuid,
                pool_dev,
                kernel::ThinId::new(thin_id)?,
                kernel::Sectors(size.sectors()),
            )
            .and_then(|dev| crate::pool::make_filesystem(fs, &kernel::devnode(dev)))
            .and_then(|()| kernel.remove_if_present(&name).map(|_| ()));
        formatted.map_err(|e| self.undo_thin(thin_id, e))
    }

    /// Records `op` as begun and uses up a thin id if it makes one.
    pub(crate) fn begin(&mut self, op: Pending) -> Result<()> {
        let rec = self.record_mut();
        if let Pending::CreateLayer { thin_id, .. } | Pending::ProvisionSpare { thin_id, .. } = op {
            rec.next_thin_id = rec.next_thin_id.max(thin_id + 1);
        }
        rec.pending = Some(op);
        self.write_record()
    }

    /// Removes layer `id`: its device, its thin id (the pool's blocks it
    /// alone held go free), its record.
    ///
    /// # Errors
    /// [`Error::HasChildren`], [`Error::Mounted`], [`Error::Busy`],
    /// [`Error::UnknownLayer`], kernel errors.
    pub fn remove_layer(&mut self, id: &str) -> Result<()> {
        match self.remove_layer_or_defer(id, false)? {
            Removal::Removed => Ok(()),
            Removal::Deferred { .. } => unreachable!("not asked to defer"),
        }
    }

    /// Removes layer `id` like [`Pool::remove_layer`]; when its device is
    /// held open by a process (not mounted) and `defer` is set, asks the
    /// kernel to remove the device when the holder closes it, marks the
    /// layer as removing, and says who holds it. [`Pool::finish_deferred_removals`]
    /// (run by `pool recover`) completes the removal once the device is gone:
    /// the removal is never lost.
    ///
    /// # Errors
    /// As [`Pool::remove_layer`].
    pub fn remove_layer_or_defer(&mut self, id: &str, defer: bool) -> Result<Removal> {
        // Settle an interrupted operation first: it may be this very layer.
        names::check_id("layer", id)?;
        if self.pool_device()?.is_some() {
            self.recover()?;
        }
        let layer = self.layer(id)?;
        let children = self.children_of(id)?;
        if !children.is_empty() {
            return Err(Error::HasChildren {
                id: id.to_owned(),
                children: children.join(", "),
            });
        }
        // recover() ran above: the pool is settled.
        self.require_active()?;
        let name = self.name(Role::Thin(layer.thin_id));
        let dev = self.kernel()?.device(&name)?;
        if let Some(dev) = dev {
            let points = mounts::mountpoints_of(dev)?;
            if !points.is_empty() {
                return Err(Error::Mounted {
                    what: format!("layer `{id}`"),
                    mountpoints: display_paths(&points),
                    hint: id.to_owned(),
                });
            }
        }
        if self.teardown_state().0 {
            return self.remove_later(&layer);
        }
        if dev.is_some() {
            // Busy here (a process holds the device) fails before anything
            // is recorded, or with `defer` is handed to the kernel.
            match self.kernel()?.remove(&name) {
                Err(Error::Busy { detail, .. }) if defer => {
                    self.kernel()?.remove_deferred(&name)?;
                    let marked = LayerRecord {
                        removing: true,
                        ..layer
                    };
                    record::write(&self.layout().layer_record(id), RECORD_LAYER, &marked)?;
                    let holders = detail
                        .trim_end_matches("; stop those processes and retry")
                        .to_owned();
                    return Ok(Removal::Deferred { holders });
                }
                r => r?,
            }
        }
        fault::point("layer_rm.after_device_removal");
        self.drop_spares_of(id)?;
        let t = self.record().transaction_id;
        self.begin(Pending::RemoveLayer {
            id: id.to_owned(),
            thin_id: layer.thin_id,
        })?;
        fault::point("layer_rm.after_intent");
        let size = layer.size_in(self.record());
        self.reclaim_items(
            &[crate::pool::Trashed {
                thin_id: layer.thin_id,
                size,
            }],
            false,
        )?;
        fault::point("layer_rm.after_delete");
        record::remove(&self.layout().layer_record(id))?;
        self.index_removed(id, layer.parent.as_deref());
        fault::point("layer_rm.after_record_removal");
        self.commit(t)?;
        Ok(Removal::Removed)
    }

    /// Removal under deferred teardown: the record now, the kernel work at
    /// the next [`Pool::reclaim`].
    fn remove_later(&mut self, layer: &LayerRecord) -> Result<Removal> {
        self.drop_spares_of(&layer.id)?;
        let size = layer.size_in(self.record());
        self.trash_layer(&layer.id, layer.thin_id, size)?;
        self.index_removed(&layer.id, layer.parent.as_deref());
        Ok(Removal::Removed)
    }

    /// Finishes the removals `layer rm --deferred` left to the kernel whose
    /// devices are gone now; says what it did and what still waits.
    ///
    /// # Errors
    /// Record and kernel errors.
    pub fn finish_deferred_removals(&mut self) -> Result<Vec<String>> {
        let mut said = Vec::new();
        for l in self.layer_records()?.into_iter().filter(|l| l.removing) {
            let name = self.name(Role::Thin(l.thin_id));
            if self.kernel()?.device(&name)?.is_some() {
                said.push(format!(
                    "layer {}: removal still deferred, its device is busy",
                    l.id
                ));
                continue;
            }
            self.remove_layer(&l.id)?;
            said.push(format!("finished the deferred removal of layer {}", l.id));
        }
        Ok(said)
    }

    /// Activates layer `id`'s thin device if needed and mounts it at `dir`
    /// (created 0700 if missing) for `how` (which decides `ro`, `nosuid`,
    /// `nodev`; see [`MountUse`]). Returns the device node.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::PoolInactive`], mount errors.
    pub fn mount_layer(
        &mut self,
        id: &str,
        dir: &Path,
        how: MountUse,
    ) -> Result<(PathBuf, Action)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("create mount point {}", dir.display()))?;
        let dir = fs::canonicalize(dir).ctx(|| format!("resolve {}", dir.display()))?;
        self.mount_layer_on(id, &dir, &dir, how)
    }

    /// As [`Pool::mount_layer`], onto the directory `dir` the caller opened
    /// (`O_PATH`, resolved without following symlinks): the mount goes
    /// through `/proc/self/fd/N`, so no rename or symlink swapped in after
    /// the open can move it elsewhere (runc's fix for CVE-2021-30465). It
    /// shows in mountinfo at the directory's real path, so `umount` and
    /// `layer ls` find it as any other.
    ///
    /// # Errors
    /// As [`Pool::mount_layer`].
    pub fn mount_layer_at_fd(
        &mut self,
        id: &str,
        dir: BorrowedFd<'_>,
        how: MountUse,
    ) -> Result<(PathBuf, Action)> {
        let via = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let real = fs::read_link(&via).ctx(|| format!("resolve {}", via.display()))?;
        self.mount_layer_on(id, &via, &real, how)
    }

    /// Mounts layer `id` at `target` (a path, or `/proc/self/fd/N`), whose
    /// real path, as mountinfo shows it, is `real`.
    fn mount_layer_on(
        &mut self,
        id: &str,
        target: &Path,
        real: &Path,
        how: MountUse,
    ) -> Result<(PathBuf, Action)> {
        self.layer(id)?;
        let pool_dev = self.require_active()?;
        // A layer half-removed by a crash must not be mounted.
        self.recover()?;
        let layer = self.layer(id)?;
        refuse_removing(&layer)?;
        if !how.readonly() {
            // Written from now on: its spares would not be its snapshots.
            self.drop_spares_of(id)?;
        }
        let name = self.name(Role::Thin(layer.thin_id));
        let fs_type = layer.fs_in(self.record());
        let (dev, activated) = self.activate_thin_of(pool_dev, &layer)?;
        fault::point("mount.after_activation");
        let node = kernel::devnode(dev);
        if !activated && mounts::mountpoints_of(dev)?.iter().any(|m| m == real) {
            return Ok((node, Action::AlreadyDone));
        }
        if let Err(e) = mounts::mount(&node, target, fs_type, how) {
            if activated {
                if let Err(undo) = self.kernel()?.remove(&name) {
                    return Err(Error::Rollback {
                        error: Box::new(e),
                        undo: Box::new(undo),
                    });
                }
            }
            return Err(e);
        }
        fault::point("mount.after_mount");
        Ok((node, Action::Done))
    }

    /// Activates layer `id`'s thin device without mounting it (for a
    /// caller that mounts it itself, e.g. containerd through the
    /// snapshotter); already active is fine. Returns the device node.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::PoolInactive`], kernel errors.
    pub fn activate_layer(&mut self, id: &str) -> Result<PathBuf> {
        self.layer(id)?;
        let pool_dev = self.require_active()?;
        // A layer half-removed by a crash must not be activated.
        self.recover()?;
        let layer = self.layer(id)?;
        // The caller may write it: its spares would not be its snapshots.
        self.drop_spares_of(id)?;
        let (dev, _) = self.activate_thin_of(pool_dev, &layer)?;
        Ok(kernel::devnode(dev))
    }

    /// Tears down layer `id`'s thin device if it is active and nothing
    /// mounts it; returns whether it removed it. A mounted device stays.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::Busy`] (held open), kernel errors.
    pub fn deactivate_layer(&mut self, id: &str) -> Result<bool> {
        let layer = self.layer(id)?;
        if self.pool_device()?.is_none() {
            return Ok(false);
        }
        let name = self.name(Role::Thin(layer.thin_id));
        let kernel = self.kernel()?;
        match kernel.device(&name)? {
            Some(dev) if mounts::mountpoints_of(dev)?.is_empty() => {
                kernel.remove(&name)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The thin device `thin_id` in the kernel, activated if needed; says
    /// whether this call activated it.
    fn activate_thin_of(
        &mut self,
        pool_dev: devicemapper::Device,
        layer: &LayerRecord,
    ) -> Result<(devicemapper::Device, bool)> {
        let thin_id = layer.thin_id;
        let name = self.name(Role::Thin(thin_id));
        let uuid = self.uuid(Role::Thin(thin_id));
        let sectors = layer.size_in(self.record()).sectors();
        self.teardown_state().1.remove(&thin_id);
        let kernel = self.kernel()?;
        kernel.setup_thin(
            &name,
            &uuid,
            pool_dev,
            kernel::ThinId::new(thin_id)?,
            kernel::Sectors(sectors),
        )
    }

    /// Unmounts a layer (every mount of it) given its id, or one mount
    /// given its directory; the layer's device is torn down once nothing
    /// mounts it. Returns the directories unmounted.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`] when `target` is neither a layer nor a
    /// mount of this pool; [`Error::Busy`].
    pub fn umount(&mut self, target: &str) -> Result<Vec<PathBuf>> {
        let by_id =
            names::check_id("layer", target).is_ok() && self.layout().layer_record(target).exists();
        let prefix = names::name_prefix(&self.record().pool_id);
        let pool_id = self.record().pool_id.clone();
        let kernel = self.kernel()?;
        let mut ours = Vec::new();
        for name in kernel.names_with_prefix(&prefix)? {
            if let Some(Role::Thin(thin_id)) = names::parse_role(&pool_id, &name) {
                let n = devicemapper::DmNameBuf::new(name).expect("valid: listed by the kernel");
                if let Some(dev) = kernel.device(&n)? {
                    ours.push((thin_id, n, dev));
                }
            }
        }
        let all = mounts::all()?;
        let (selected, dirs): (Vec<_>, Vec<PathBuf>) = if by_id {
            let thin_id = self.layer(target)?.thin_id;
            let sel: Vec<_> = ours.into_iter().filter(|(t, ..)| *t == thin_id).collect();
            let dirs = all
                .iter()
                .filter(|m| sel.iter().any(|(_, _, d)| *d == m.device))
                .map(|m| m.mountpoint.clone())
                .collect();
            (sel, dirs)
        } else {
            let dir =
                fs::canonicalize(target).map_err(|_| Error::UnknownLayer(target.to_owned()))?;
            let Some(entry) = all.iter().rev().find(|m| m.mountpoint == dir) else {
                return Err(Error::InvalidArgument(format!(
                    "{} is not mounted; `thinlayer layer ls` shows the layers' mounts",
                    dir.display()
                )));
            };
            let sel: Vec<_> = ours
                .into_iter()
                .filter(|(.., d)| *d == entry.device)
                .collect();
            if sel.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a layer of this pool; unmount it with umount(8)",
                    dir.display()
                )));
            }
            (sel, vec![dir])
        };
        for d in dirs.iter().rev() {
            crate::space::trim_before_umount(d);
            mounts::umount(d)?;
        }
        fault::point("umount.after_umount");
        for (thin_id, name, dev) in selected {
            if !mounts::mountpoints_of(dev)?.is_empty() {
                continue;
            }
            match self.teardown_state() {
                (true, idle) => {
                    idle.insert(thin_id);
                }
                (false, _) => self.kernel()?.remove(&name)?,
            }
        }
        Ok(dirs)
    }

    /// The layers whose parent is `id`, from an index of parents built
    /// from the records once per handle (the root's lock keeps it true:
    /// only this handle changes the records), so a removal does not read
    /// every record.
    ///
    /// # Errors
    /// Record errors while building the index.
    pub fn children_of(&mut self, id: &str) -> Result<Vec<String>> {
        if self.children_index().is_none() {
            let mut index: crate::pool::ChildIndex = Default::default();
            for l in self.layer_records()? {
                if let Some(p) = l.parent {
                    index.entry(p).or_default().insert(l.id);
                }
            }
            *self.children_index() = Some(index);
        }
        Ok(self
            .children_index()
            .as_ref()
            .and_then(|i| i.get(id))
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn index_added(&mut self, id: &str, parent: Option<&str>) {
        if let (Some(index), Some(p)) = (self.children_index().as_mut(), parent) {
            index.entry(p.to_owned()).or_default().insert(id.to_owned());
        }
    }

    fn index_removed(&mut self, id: &str, parent: Option<&str>) {
        if let Some(index) = self.children_index().as_mut() {
            index.remove(id);
            if let Some(c) = parent.and_then(|p| index.get_mut(p)) {
                c.remove(id);
            }
        }
    }

    fn record_mut(&mut self) -> &mut crate::pool::PoolRecord {
        self.record_mut_inner()
    }
}

fn display_paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a new thin device starts from.
enum Source<'a> {
    /// A snapshot of this layer, or of the base device.
    Snapshot(Option<&'a str>),
    /// A fresh device of this size with a new filesystem (a volume).
    Fresh {
        /// Its virtual size.
        size: Bytes,
        /// Its filesystem.
        fs: FsType,
    },
}
