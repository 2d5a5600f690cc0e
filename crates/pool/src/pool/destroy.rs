//! `pool destroy`: the pool's devices, files and records removed; for a
//! pool on block devices, with `--wipe`, their labels and metadata zeroed;
//! for an adopted pool, thinlayer's own thin ids deleted from it.
//!
//! What must never happen: a pool with layers destroyed without `--force`;
//! a foreign thin id deleted; a device wiped that the records do not name.

use std::{fs, path::PathBuf};

use super::{Pool, lifecycle::clear_interrupted_create};
use crate::{
    blockdev::{self, DeviceRole},
    error::{Error, Result},
    mounts, names,
    records::{Backing, Pending, file},
};

impl Pool {
    /// Removes the pool: its devices, files and records. Refuses while
    /// layers exist unless `force`, which first unmounts every mount of the
    /// pool's devices.
    ///
    /// # Errors
    /// [`Error::PoolHasLayers`] (without `force`), [`Error::Busy`], kernel errors.
    pub fn destroy(self, force: bool) -> Result<()> {
        self.destroy_with(force, false).map(|_| ())
    }

    /// [`Pool::destroy`], and for a pool on block devices, with `wipe`,
    /// their labels and the metadata zeroed and the devices discarded;
    /// without it the devices are left as they are (the next `pool
    /// create` on them then needs `--force`). An adopted pool's own thin
    /// ids are deleted from it (the pool stays, its owner's; the foreign
    /// ids are not touched). Returns what was done beyond the records, in
    /// sentences.
    ///
    /// # Errors
    /// As [`Pool::destroy`]; [`Error::Foreign`] for `wipe` of an adopted
    /// pool, or when an adopted pool is not active;
    /// [`Error::DeviceMissing`] when `wipe` cannot find a device (nothing
    /// is changed then).
    pub fn destroy_with(mut self, force: bool, wipe: bool) -> Result<Vec<String>> {
        let mut said = Vec::new();
        if self.rec.pending == Some(Pending::CreatePool) {
            // Nothing an unfinished create made was ever handed out: its
            // leftovers go as `pool recover` clears them (a device pool's
            // labels and metadata superblock too, so the devices are free
            // again, `--wipe` or not).
            let (layout, rec) = (self.layout.clone(), self.rec.clone());
            for what in clear_interrupted_create(self.kernel()?, &layout, &rec)? {
                said.push(format!(
                    "removed {what}, left by an interrupted pool create"
                ));
            }
            let _ = fs::remove_file(layout.root.join("lock"));
            let _ = fs::remove_dir(&layout.root);
            return Ok(said);
        }
        if let Backing::Adopted { pool_name, .. } = self.rec.backing.clone() {
            if wipe {
                return Err(Error::Foreign {
                    what: "--wipe".into(),
                    pool: pool_name.clone(),
                    hint: "destroy without --wipe removes thinlayer's thin ids and records; \
                           remove the pool itself with its owner (`lvremove VG/POOL`)"
                        .into(),
                });
            }
            if self.pool_device()?.is_none() {
                return Err(Error::Foreign {
                    what: format!(
                        "{pool_name} is not active, so thinlayer cannot delete its own thin ids from it"
                    ),
                    pool: pool_name.clone(),
                    hint: "bring it up the way its owner does (`lvchange -ay VG/POOL`), then retry"
                        .into(),
                });
            }
        }
        // Found before anything changes: a missing device refuses the wipe.
        let to_wipe = match (&self.rec.backing, wipe) {
            (Backing::Devices { data, metadata }, true) => vec![
                blockdev::find(&self.rec.pool_id, DeviceRole::Data, data)?,
                blockdev::find(&self.rec.pool_id, DeviceRole::Metadata, metadata)?,
            ],
            _ => Vec::new(),
        };
        let layers = self.layer_records()?;
        if !layers.is_empty() && !force {
            return Err(Error::PoolHasLayers {
                root: self.layout.root.clone(),
                layers: layers.into_iter().map(|l| l.id).collect(),
            });
        }
        if force {
            self.unmount_everything()?;
        }
        if self.foreign_transactions() {
            self.recover()?;
        }
        self.deactivate()?;
        if let Backing::Adopted { pool_name, .. } = self.rec.backing.clone() {
            // Every thin id of thinlayer's in the pool: layers, spares,
            // trash, the base, and what a crash left.
            let ids = self.metadata_thin_ids()?;
            let mine: Vec<u32> = ids
                .into_iter()
                .filter(|t| !self.rec.backing.is_foreign(*t))
                .collect();
            let n = mine.len();
            self.delete_thins(&mine, false)?;
            said.push(format!(
                "deleted thinlayer's {n} thin id(s) from {pool_name}; its other thin ids and the pool itself are untouched"
            ));
        }
        for l in &layers {
            file::remove(&self.layout.layer_record(&l.id))?;
        }
        super::txn::sweep_taken(&self.layout, &Default::default())?;
        file::remove(&self.layout.pool_record())?;
        if self.rec.backing.is_files() {
            for f in [self.layout.data_file(), self.layout.metadata_file()] {
                file::remove(&f)?;
            }
        }
        let _ = fs::remove_dir(self.layout.layers_dir());
        let _ = fs::remove_dir(self.layout.spares_dir());
        let _ = fs::remove_file(self.layout.root.join("lock"));
        // Only succeeds when nothing else lives in the root.
        let _ = fs::remove_dir(&self.layout.root);
        if let Backing::Devices { data, metadata } = &self.rec.backing {
            if to_wipe.is_empty() {
                said.push(format!(
                    "left the data device {} and the metadata device {} as they are (pass --wipe to wipe them)",
                    data.describe(),
                    metadata.describe()
                ));
            }
        }
        for dev in &to_wipe {
            let discarded = blockdev::wipe(dev)?;
            said.push(format!(
                "wiped {} ({})",
                dev.node.display(),
                if discarded {
                    "label and metadata zeroed, all of it discarded"
                } else {
                    "label and metadata zeroed; it takes no discards"
                }
            ));
        }
        Ok(said)
    }

    fn unmount_everything(&mut self) -> Result<()> {
        let prefix = names::name_prefix(&self.rec.pool_id);
        let kernel = self.kernel()?;
        let mut devices = Vec::new();
        for name in kernel.names_with_prefix(&prefix)? {
            let n = devicemapper::DmNameBuf::new(name).expect("valid: listed by the kernel");
            if let Some(d) = kernel.device(&n)? {
                devices.push(d);
            }
        }
        let mut points: Vec<PathBuf> = mounts::all()?
            .into_iter()
            .filter(|m| devices.contains(&m.device))
            .map(|m| m.mountpoint)
            .collect();
        points.reverse();
        for p in points {
            mounts::umount(&p)?;
        }
        Ok(())
    }
}
