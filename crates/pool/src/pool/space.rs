//! Space checks before a change: the pool's own (data and metadata left
//! for a new thin device, the trash reclaimed before refusing) and the
//! host's (a file-backed pool's sparse files may still grow).
//!
//! What must never happen: a new thin device made in a pool that is out
//! of space or read-only.

use super::Pool;
use crate::{
    error::{Error, Result},
    names::Role,
    space::{HOST_RESERVE, HostSpace, host_free},
    units::Bytes,
};

impl Pool {
    /// The host filesystem under the pool against what it may still write.
    ///
    /// # Errors
    /// I/O errors.
    pub fn host_space(&self) -> Result<HostSpace> {
        let r = self.record();
        if !r.backing.is_files() {
            // Nothing of the pool's lives on the host filesystem but records.
            return HostSpace::measure(&self.layout().root, Bytes(0), Bytes(0));
        }
        HostSpace::measure(&self.layout().root, r.data_size, r.metadata_size)
    }

    /// Refuses, before anything changes, work that needs `bytes` on the
    /// host filesystem holding the pool (scratch files, data the pool
    /// will write) when that and [`HOST_RESERVE`] are not free. `what`
    /// names the work in the error.
    ///
    /// # Errors
    /// [`Error::HostNoSpace`] (exit 6) with the bytes needed and free; I/O
    /// errors.
    pub fn require_host_space(&self, what: &str, bytes: Bytes) -> Result<()> {
        let root = &self.layout().root;
        let free = host_free(root)?;
        if free.0 < bytes.0.saturating_add(HOST_RESERVE.0) {
            return Err(Error::HostNoSpace {
                root: root.clone(),
                what: what.to_owned(),
                needed: bytes.0,
                reserve: HOST_RESERVE.0,
                free: free.0,
            });
        }
        Ok(())
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
}
