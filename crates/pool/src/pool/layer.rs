//! Layers: thin snapshots of a parent layer or of the pool's base device
//! (or, for a volume, fresh devices), and their records.
//!
//! A layer's thin device is in the kernel only while it is mounted (or
//! being snapshotted from a mounted state): `mount` activates it, `umount`
//! tears it down (see `mount`). So snapshotting an unmounted parent is one
//! pool message, with no suspend, and the kernel's device list holds only
//! what is in use.
//!
//! Create and remove are transactions of [`super::txn`] over the kernel
//! steps of [`super::thin`]; the layer record is the commit point.
//!
//! What must never happen: a layer removed while it has children or is
//! mounted; a child made of a layer whose removal is deferred.

use std::{fmt, fs, path::PathBuf};

use serde::Serialize;

use super::{ChildIndex, Pool, now_unix};
use crate::{
    error::{Error, IoContext, Result},
    fault, holders, kernel, mounts,
    names::{self, Role},
    records::{FsType, LayerRecord, Owner, Pending, Record, Trashed, file},
    timing::ms_since,
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

/// Who holds a device whose removal was deferred, as found in `/proc`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders(pub Vec<holders::Holder>);

impl fmt::Display for Holders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("open (mounted, or held by a process)");
        }
        f.write_str("held by ")?;
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{h}")?;
        }
        Ok(())
    }
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
        holders: Holders,
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
                out.push(LayerRecord::load(&path)?);
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
        match LayerRecord::load(&path) {
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
            let up = present.contains(&self.name(Role::Thin(l.thin_id)).to_string());
            out.push(self.info_of(l, up, |dev| {
                Ok(all_mounts
                    .iter()
                    .filter(|m| m.device == dev)
                    .map(|m| m.mountpoint.clone())
                    .collect())
            })?);
        }
        Ok(out)
    }

    /// Layer `id` with its kernel state, as [`Pool::layers`] lists it, at
    /// the cost of that one layer (not of the pool's every layer).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], kernel and record errors.
    pub fn layer_info(&mut self, id: &str) -> Result<LayerInfo> {
        let l = self.layer(id)?;
        let up = self.pool_device()?.is_some();
        self.info_of(l, up, mounts::mountpoints_of)
    }

    /// Bytes layer `id`'s thin device maps (own and shared), while it is
    /// active: one record read and a few ioctls, whatever the pool holds.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], kernel and record errors.
    pub fn layer_mapped_bytes(&mut self, id: &str) -> Result<Option<u64>> {
        let l = self.layer(id)?;
        let up = self.pool_device()?.is_some();
        Ok(self.info_of(l, up, |_| Ok(Vec::new()))?.mapped_bytes)
    }

    /// `l` with its kernel state: its device asked for when `maybe_up`
    /// (the pool is active and may hold it), its mountpoints from
    /// `mountpoints_of` its device.
    fn info_of(
        &mut self,
        l: LayerRecord,
        maybe_up: bool,
        mountpoints_of: impl FnOnce(devicemapper::Device) -> Result<Vec<PathBuf>>,
    ) -> Result<LayerInfo> {
        let name = self.name(Role::Thin(l.thin_id));
        let (devnode, mountpoints, mapped_bytes) = if maybe_up {
            let kernel = self.kernel()?;
            match kernel.device(&name)? {
                Some(dev) => (
                    Some(kernel::devnode(dev)),
                    mountpoints_of(dev)?,
                    kernel.thin_mapped_bytes(&name)?,
                ),
                None => (None, Vec::new(), None),
            }
        } else {
            (None, Vec::new(), None)
        };
        Ok(LayerInfo {
            id: l.id,
            parent: l.parent,
            thin_id: l.thin_id,
            devnode,
            mountpoints,
            mapped_bytes,
            created_unix: l.created_unix,
            removing: l.removing,
            owner: l.owner,
        })
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

    /// As [`Pool::create_layer_for`], with the thin snapshot taken of
    /// layer `origin` instead of `parent`, which is still the recorded
    /// parent: for an `origin` that is `parent` plus changes every such
    /// layer starts with (a template), so each starts with them already
    /// written, in blocks it shares. The caller vouches for that: the pool
    /// cannot tell. A spare of `origin` is taken if there is one.
    ///
    /// # Errors
    /// As [`Pool::create_layer`], for `parent` and for `origin`.
    pub fn create_layer_derived(
        &mut self,
        owner: Owner,
        id: &str,
        parent: &str,
        origin: &str,
    ) -> Result<LayerRecord> {
        self.make_layer(id, Source::Derived { parent, origin }, owner)
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
    /// (the commit point), the intent cleared; for a spare taken, its layer
    /// record alone (see `txn`).
    fn make_layer(&mut self, id: &str, source: Source<'_>, owner: Owner) -> Result<LayerRecord> {
        names::check_id("layer", id)?;
        // Phase times for the debug log: where a create's time goes.
        let t0 = std::time::Instant::now();
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
            Source::Derived { parent, origin } => {
                let pr = self.layer(parent)?;
                refuse_removing(&pr)?;
                let or = self.layer(origin)?;
                refuse_removing(&or)?;
                (Some(or.thin_id), Some(parent.to_owned()), pr.size, pr.fs)
            }
            Source::Fresh { size, fs } => (None, None, Some(size), Some(fs)),
        };
        let read_at = ms_since(t0);
        // recover() ran above: the pool is settled.
        let pool_dev = self.require_active()?;
        let active_at = ms_since(t0);
        self.check_space()?;
        let space_at = ms_since(t0);

        // A spare provisioned ahead of demand is this very snapshot, made.
        let spare = match source {
            Source::Snapshot(p) => self.take_spare(p),
            Source::Derived { origin, .. } => self.take_spare(Some(origin)),
            Source::Fresh { .. } => None,
        };
        let thin_id = spare
            .as_ref()
            .map_or(self.record().next_thin_id, |s| s.thin_id);
        kernel::ThinId::new(thin_id)?;
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
        if let Some(spare) = spare {
            // The spare is this very snapshot, made: its record, with the
            // spare's marker, is the whole transaction (see `txn`).
            self.take(&layer, spare)?;
            self.index_added(id, layer.parent.as_deref());
            fault::point("layer_take.after_record");
            tracing::debug!(%id, spare = true, read_at, active_at, space_at, ms = ms_since(t0), "layer made");
            return Ok(layer);
        }
        self.begin(Pending::CreateLayer {
            id: id.to_owned(),
            thin_id,
            parent: layer.parent.clone(),
            size,
            fs,
        })?;
        fault::point("layer_create.after_intent");
        let intent_at = ms_since(t0);

        let made = match origin {
            Some(origin) => self.snapshot_thin(thin_id, origin),
            None => self.fresh_thin(pool_dev, thin_id, size, fs),
        };
        fault::point("layer_create.after_snapshot");
        let kernel_at = ms_since(t0);
        if let Err(e) = made {
            // The kernel refused: forget the intent. The thin id stays used
            // up; ids are never handed out twice.
            self.commit()?;
            return Err(e);
        }
        // The commit point: a layer record naming the thin id (the kernel
        // committed its metadata before the message returned).
        layer.save(&self.layout().layer_record(id))?;
        self.index_added(id, layer.parent.as_deref());
        fault::point("layer_create.after_record");
        let record_at = ms_since(t0);
        self.commit_lazily();
        tracing::debug!(
            %id,
            spare = false,
            read_at,
            active_at,
            space_at,
            intent_at,
            kernel_at,
            record_at,
            ms = ms_since(t0),
            "layer made"
        );
        Ok(layer)
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
                children,
            });
        }
        // recover() ran above: the pool is settled.
        self.require_active()?;
        let name = self.name(Role::Thin(layer.thin_id));
        let (dev, premount) = self.mounted_for_removal(&layer)?;
        if premount {
            self.release_spare_mount(layer.thin_id)?;
        }
        if self.teardown_later {
            return self.remove_later(&layer);
        }
        if let Some(dev) = dev {
            // Busy here (a process holds the device) fails before anything
            // is recorded, or with `defer` is handed to the kernel.
            match self.kernel()?.remove(&name) {
                Err(Error::Busy { .. }) if defer => {
                    self.kernel()?.remove_deferred(&name)?;
                    let marked = LayerRecord {
                        removing: true,
                        ..layer
                    };
                    marked.save(&self.layout().layer_record(id))?;
                    return Ok(Removal::Deferred {
                        holders: Holders(holders::of_device(dev)),
                    });
                }
                r => r?,
            }
        }
        fault::point("layer_rm.after_device_removal");
        self.drop_spares_of(id)?;
        self.begin(Pending::RemoveLayer {
            id: id.to_owned(),
            thin_id: layer.thin_id,
        })?;
        fault::point("layer_rm.after_intent");
        let size = layer.size_in(self.record());
        self.reclaim_items(
            &[Trashed {
                thin_id: layer.thin_id,
                size,
            }],
            false,
        )?;
        fault::point("layer_rm.after_delete");
        file::remove(&self.layout().layer_record(id))?;
        self.index_removed(id, layer.parent.as_deref());
        fault::point("layer_rm.after_record_removal");
        self.commit()?;
        Ok(Removal::Removed)
    }

    /// Refuses, as [`Error::Mounted`], while `layer`'s device is mounted
    /// anywhere but where the spare it took was (nobody's work): what a
    /// removal checks first, for a caller that removes later.
    ///
    /// # Errors
    /// [`Error::Mounted`], kernel errors.
    pub fn ensure_unmounted(&mut self, layer: &LayerRecord) -> Result<()> {
        self.mounted_for_removal(layer).map(|_| ())
    }

    /// `layer`'s device if it is up, and whether it is mounted where its
    /// spare was; [`Error::Mounted`] if mounted anywhere else.
    fn mounted_for_removal(
        &mut self,
        layer: &LayerRecord,
    ) -> Result<(Option<devicemapper::Device>, bool)> {
        let name = self.name(Role::Thin(layer.thin_id));
        let Some((dev, mut points)) = self.kernel()?.mounted(&name)? else {
            return Ok((None, false));
        };
        // A mount kept from the spare it took is nobody's work.
        let premount = if points.is_empty() {
            None
        } else {
            self.premount_of(layer.thin_id, dev)?
        };
        points.retain(|p| Some(p) != premount.as_ref());
        if !points.is_empty() {
            return Err(Error::Mounted {
                what: format!("layer `{}`", layer.id),
                mountpoints: points,
                hint: layer.id.clone(),
            });
        }
        Ok((Some(dev), premount.is_some()))
    }

    /// Removal under `teardown_later`: the record now, the kernel work at
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

    /// The layers whose parent is `id`, from an index of parents built
    /// from the records once per handle (the root's lock keeps it true:
    /// only this handle changes the records), so a removal does not read
    /// every record.
    ///
    /// # Errors
    /// Record errors while building the index.
    pub fn children_of(&mut self, id: &str) -> Result<Vec<String>> {
        self.take_cached_children();
        if self.children.is_none() {
            let mut index: ChildIndex = Default::default();
            for l in self.layer_records()? {
                if let Some(p) = l.parent {
                    index.entry(p).or_default().insert(l.id);
                }
            }
            self.children = Some(index);
        }
        Ok(self
            .children
            .as_ref()
            .and_then(|i| i.get(id))
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn index_added(&mut self, id: &str, parent: Option<&str>) {
        if let (Some(index), Some(p)) = (self.children.as_mut(), parent) {
            index.entry(p.to_owned()).or_default().insert(id.to_owned());
        }
    }

    fn index_removed(&mut self, id: &str, parent: Option<&str>) {
        if let Some(index) = self.children.as_mut() {
            index.remove(id);
            if let Some(c) = parent.and_then(|p| index.get_mut(p)) {
                c.remove(id);
            }
        }
    }
}

/// What a new thin device starts from.
enum Source<'a> {
    /// A snapshot of this layer, or of the base device.
    Snapshot(Option<&'a str>),
    /// A snapshot of layer `origin`, recorded as a child of `parent`.
    Derived {
        /// The recorded parent.
        parent: &'a str,
        /// The layer whose thin device is snapshotted.
        origin: &'a str,
    },
    /// A fresh device of this size with a new filesystem (a volume).
    Fresh {
        /// Its virtual size.
        size: Bytes,
        /// Its filesystem.
        fs: FsType,
    },
}
