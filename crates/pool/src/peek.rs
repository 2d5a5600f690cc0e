//! Looks at a pool without taking its root's lock, for a server that must
//! answer reads (containerd's Usage and Mounts) while a long write holds
//! the lock exclusively (an `image import`, a Prepare, a Cleanup).
//!
//! Safe without the lock because it only reads: records are replaced
//! atomically (temp, fsync, rename: [`crate::record`]), so a reader sees a
//! record as it was before or after a write, never half of one; the kernel
//! is only asked for status. What it says may be out of date the moment it
//! is said, as any answer to a concurrent reader is. Anything that would
//! change the pool (activating a device) is left to the locked path.

use std::path::{Path, PathBuf};

use crate::{
    error::{Error, Result},
    kernel::{self, Kernel},
    names::{self, Role},
    records::{LayerRecord, Layout, PoolRecord, Record},
};

/// A pool's records, read once, and a kernel handle; no lock held.
pub struct Peek {
    layout: Layout,
    rec: PoolRecord,
    kernel: Kernel,
}

/// What the kernel says of a layer's thin device, if it is active.
#[derive(Clone, Debug)]
pub struct ActiveLayer {
    /// Its record.
    pub record: LayerRecord,
    /// The device node (`/dev/dm-N`).
    pub devnode: PathBuf,
    /// Bytes it maps (its own and those it shares with its parents).
    pub mapped_bytes: Option<u64>,
}

impl Peek {
    /// Reads the pool record under `root` and opens the kernel.
    ///
    /// # Errors
    /// [`Error::NotRoot`], [`Error::NoPool`], damaged records, environment
    /// errors.
    pub fn open(root: &Path) -> Result<Peek> {
        kernel::require_root()?;
        let layout = Layout {
            root: root.to_owned(),
        };
        let rec: PoolRecord = match PoolRecord::load(&layout.pool_record()) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoPool {
                    root: root.to_owned(),
                });
            }
            r => r?,
        };
        Ok(Peek {
            layout,
            rec,
            kernel: Kernel::open()?,
        })
    }

    /// The pool record as read.
    pub fn record(&self) -> &PoolRecord {
        &self.rec
    }

    /// Layer `id`'s thin device if it is active (`None` if it is not, or
    /// the layer is being removed).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], damaged records, kernel errors.
    pub fn active_layer(&self, id: &str) -> Result<Option<ActiveLayer>> {
        names::check_id("layer", id)?;
        let record: LayerRecord = match LayerRecord::load(&self.layout.layer_record(id)) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::UnknownLayer(id.to_owned()));
            }
            r => r?,
        };
        if record.removing {
            return Ok(None);
        }
        let name = names::dm_name(&self.rec.pool_id, Role::Thin(record.thin_id));
        let Some(dev) = self.kernel.device(&name)? else {
            return Ok(None);
        };
        let mapped_bytes = self.kernel.thin_mapped_bytes(&name)?;
        Ok(Some(ActiveLayer {
            record,
            devnode: kernel::devnode(dev),
            mapped_bytes,
        }))
    }
}
