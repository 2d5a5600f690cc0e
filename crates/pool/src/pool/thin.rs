//! Every operation on a thin id: a snapshot of an origin, a fresh
//! formatted device, activating an existing id, discarding one's blocks,
//! deleting ids, and undoing a make.
//!
//! These are the kernel steps of the transactions in [`super::txn`]; the
//! callers wrap them in an intent and a commit. Each step that recovery
//! repeats is idempotent with `settling` (an id already gone is fine).
//!
//! What must never happen: a foreign thin id (an adopted pool's owner's)
//! deleted, or any other changed; a thin id deleted while a mount uses its
//! device.

use std::{path::Path, time::Instant};

use nix::errno::Errno;

use super::Pool;
use crate::{
    error::{Error, Result},
    kernel::{self, Sectors, ThinId},
    names::Role,
    records::{FsType, Trashed},
    space::discard_device,
    units::Bytes,
};

/// Makes a filesystem of type `fs` on the thin device at `node`, without
/// discarding (a fresh thin device is all unprovisioned) and with the
/// layout of [`FsType::mkfs_layout`] (for ext4: lazy inode tables and
/// journal, which unprovisioned blocks read back as zeros, and small files
/// and directories kept inside their inodes).
///
/// # Errors
/// The mkfs tool's failure.
pub(crate) fn make_filesystem(fs: FsType, node: &Path) -> Result<()> {
    let common: &[&str] = match fs {
        FsType::Ext4 => &["-q", "-F", "-L", "thinlayer"],
        FsType::Xfs => &["-q", "-f", "-K", "-L", "thinlayer"],
    };
    let mut all: Vec<&std::ffi::OsStr> = common
        .iter()
        .chain(fs.mkfs_layout())
        .map(std::ffi::OsStr::new)
        .collect();
    all.push(node.as_os_str());
    fs.mkfs().run(&all).map(|_| ())
}

impl Pool {
    /// Makes `thin_id` a snapshot of `origin` (`create_snap`), suspending
    /// the origin's device around it when it is active.
    ///
    /// # Errors
    /// Kernel errors (nothing made then).
    pub(crate) fn snapshot_thin(&mut self, thin_id: u32, origin: u32) -> Result<()> {
        let pool = self.name(Role::Pool);
        let origin_name = self.name(Role::Thin(origin));
        let kernel = self.kernel()?;
        let origin_active = kernel.device(&origin_name)?.is_some();
        kernel.snapshot(
            &pool,
            ThinId::new(thin_id)?,
            ThinId::new(origin)?,
            origin_active.then_some(&*origin_name),
        )
    }

    /// Makes `thin_id` a fresh device (`create_thin`), then activates,
    /// formats (`fs`, default the pool's) and tears it down; on failure
    /// the thin id is deleted again.
    ///
    /// # Errors
    /// Kernel and mkfs errors.
    pub(crate) fn fresh_thin(
        &mut self,
        pool_dev: devicemapper::Device,
        thin_id: u32,
        size: Option<Bytes>,
        fs: Option<FsType>,
    ) -> Result<()> {
        let pool = self.name(Role::Pool);
        let name = self.name(Role::Thin(thin_id));
        let uuid = self.uuid(Role::Thin(thin_id));
        let size = size.unwrap_or(self.rec.base_size);
        let fs = fs.unwrap_or(self.rec.fs);
        let kernel = self.kernel()?;
        kernel.pool_message(&pool, &format!("create_thin {thin_id}"))?;
        let formatted = kernel
            .new_thin(
                &name,
                &uuid,
                pool_dev,
                ThinId::new(thin_id)?,
                Sectors(size.sectors()),
            )
            .and_then(|dev| make_filesystem(fs, &kernel::devnode(dev)))
            .and_then(|()| kernel.remove_if_present(&name).map(|_| ()));
        formatted.map_err(|e| self.undo_thin(thin_id, e))
    }

    /// The device of the existing thin id `thin_id` (`sectors` long),
    /// activated if the kernel does not have it (a live device of that
    /// name is taken only when its table is ours); says whether this call
    /// activated it. An idle device (left up under `teardown_later`) is
    /// taken back into use.
    ///
    /// # Errors
    /// [`Error::WrongTable`], kernel errors.
    pub(crate) fn activate_thin(
        &mut self,
        pool_dev: devicemapper::Device,
        thin_id: u32,
        sectors: u64,
    ) -> Result<(devicemapper::Device, bool)> {
        let name = self.name(Role::Thin(thin_id));
        let uuid = self.uuid(Role::Thin(thin_id));
        self.idle.remove(&thin_id);
        let kernel = self.kernel()?;
        kernel.setup_thin(
            &name,
            &uuid,
            pool_dev,
            ThinId::new(thin_id)?,
            Sectors(sectors),
        )
    }

    /// Discards all of thin device `thin_id` so its blocks go back to the
    /// pool and (by discard passdown) to the host: activates it if needed,
    /// `BLKDISCARD`s its whole length, removes the device. Idempotent: a
    /// thin id the pool no longer has is nothing to do. A device that
    /// takes no discards is logged and skipped (the `delete` that follows
    /// still frees the pool's blocks).
    ///
    /// # Errors
    /// [`Error::PoolInactive`], [`Error::Busy`], kernel errors.
    pub(crate) fn discard_thin(&mut self, thin_id: u32, len: Bytes) -> Result<()> {
        let pool_dev = self.require_active()?;
        // A spare's mount (see `spare`) goes with it.
        self.release_spare_mount(thin_id)?;
        let name = self.name(Role::Thin(thin_id));
        let uuid = self.uuid(Role::Thin(thin_id));
        let kernel = self.kernel()?;
        let dev = match kernel.device(&name)? {
            Some(_) => {
                // Only our own device is discarded: a stale one under our
                // name is refused, not wiped.
                let id = ThinId::new(thin_id)?;
                let length = Sectors(len.sectors());
                let (dev, _) = kernel.setup_thin(&name, &uuid, pool_dev, id, length)?;
                let points = kernel.mounted(&name)?.map(|(_, p)| p).unwrap_or_default();
                if !points.is_empty() {
                    return Err(Error::Mounted {
                        what: format!("thin device {thin_id}"),
                        hint: points[0].display().to_string(),
                        mountpoints: points,
                    });
                }
                dev
            }
            None => match kernel.new_thin(
                &name,
                &uuid,
                pool_dev,
                ThinId::new(thin_id)?,
                Sectors(len.sectors()),
            ) {
                Ok(dev) => dev,
                Err(e) if e.dm_errno() == Some(Errno::ENODATA) => {
                    tracing::debug!(thin_id, "no such thin id: nothing to discard");
                    return Ok(());
                }
                Err(e) => return Err(e),
            },
        };
        let node = kernel::devnode(dev);
        let t0 = Instant::now();
        match discard_device(&node, len.0) {
            Ok(()) => tracing::info!(
                thin_id,
                bytes = len.0,
                ms = t0.elapsed().as_millis(),
                "discarded thin device"
            ),
            Err(e) => {
                tracing::warn!(thin_id, error = %e, "discard failed; the pool still frees the blocks, the host file keeps them")
            }
        }
        self.kernel()?.remove(&name)?;
        Ok(())
    }

    /// Unmounts the spare directories of `thin_ids` (if mounted), removes
    /// their devices if active and deletes the ids; with `settling`, ids
    /// already gone are fine.
    pub(crate) fn delete_thins(&mut self, thin_ids: &[u32], settling: bool) -> Result<()> {
        let pool = self.name(Role::Pool);
        for &thin_id in thin_ids {
            self.refuse_foreign(thin_id)?;
            // A spare's mount (see `spare`) goes with it.
            self.release_spare_mount(thin_id)?;
            let name = self.name(Role::Thin(thin_id));
            let kernel = self.kernel()?;
            kernel.remove_if_present(&name)?;
            match kernel.pool_message(&pool, &format!("delete {thin_id}")) {
                Err(e) if settling => {
                    tracing::debug!(thin_id, error = %e, "thin id was already gone");
                }
                r => r?,
            }
        }
        Ok(())
    }

    /// Deletes thin id `thin_id` after `error`; both errors when that fails.
    pub(crate) fn undo_thin(&mut self, thin_id: u32, error: Error) -> Error {
        match self.delete_thins(&[thin_id], false) {
            Ok(()) => error,
            Err(undo) => Error::Rollback {
                error: Box::new(error),
                undo: Box::new(undo),
            },
        }
    }

    /// Discards (space back to the host), removes and deletes `trash`;
    /// with `settling`, ids already gone are fine.
    pub(crate) fn reclaim_items(&mut self, trash: &[Trashed], settling: bool) -> Result<()> {
        for item in trash {
            if let Err(e) = self.discard_thin(item.thin_id, item.size) {
                if !settling {
                    return Err(e);
                }
                tracing::warn!(thin_id = item.thin_id, error = %e, "discard failed; the pool still frees the blocks");
            }
            self.delete_thins(&[item.thin_id], settling)?;
        }
        Ok(())
    }
}
