//! Kernel teardown off the request path.
//!
//! Tearing a thin device down costs more than anything else a container's
//! life asks of the kernel (a DM remove is 35-70 ms in the VM, against a
//! 3 ms pool message), and giving a removed layer's space back to the host
//! needs its device once more, for a discard. A long-lived caller (the
//! containerd snapshotter, the bench) turns on
//! [`Pool::set_teardown_later`]: an unmount then leaves the device up,
//! and a removal takes the layer's record away at once and puts its thin
//! id in the trash, listed in the pool record. [`Pool::reclaim`], called
//! when the caller is idle (containerd's `Cleanup`), or `pool reclaim`,
//! does the rest: idle devices down; trashed thin ids discarded (space
//! back to the host), their devices removed, the ids deleted.
//!
//! Transactions as for layers. Trash: intent -> record removed -> the trash
//! lists the thin id (the commit point, the write that clears the intent).
//! Reclaim: the trash loses the ids with the intent -> discard, remove,
//! delete -> intent cleared. Recovery finishes both.
//!
//! What must never happen: a trashed thin id forgotten (its blocks would
//! stay allocated with no record naming them); a device torn down while
//! mounted.

use serde::Serialize;

use super::Pool;
use crate::{
    error::Result,
    fault,
    names::Role,
    records::{Pending, Trashed, file},
};

/// What [`Pool::reclaim`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Reclaimed {
    /// Idle devices torn down.
    pub devices: usize,
    /// Trashed thin ids discarded and deleted.
    pub thin_ids: usize,
}

impl Pool {
    /// Moves layer `id` (checked by the caller: no children, not mounted)
    /// to the trash: its record goes now, its kernel work waits.
    pub(crate) fn trash_layer(&mut self, id: &str, thin_id: u32, size: crate::Bytes) -> Result<()> {
        self.begin(Pending::TrashLayer {
            id: id.to_owned(),
            thin_id,
            size,
        })?;
        fault::point("layer_trash.after_intent");
        file::remove(&self.layout().layer_record(id))?;
        fault::point("layer_trash.after_record_removal");
        self.idle.remove(&thin_id);
        self.rec.trash.push(Trashed { thin_id, size });
        self.commit_lazily();
        Ok(())
    }

    /// Does the kernel work `teardown_later` left: idle, unmounted devices
    /// down; trashed thin ids discarded, their devices removed, deleted.
    ///
    /// # Errors
    /// Record and kernel errors (what is left stays listed for next time).
    pub fn reclaim(&mut self) -> Result<Reclaimed> {
        self.reclaim_some(usize::MAX)
    }

    /// [`Pool::reclaim`], bounded: the idle devices, then at most `max`
    /// trashed thin ids (the oldest), so a server doing it between
    /// requests keeps each step short. The rest stays in the trash.
    ///
    /// # Errors
    /// As [`Pool::reclaim`].
    pub fn reclaim_some(&mut self, max: usize) -> Result<Reclaimed> {
        let mut done = Reclaimed::default();
        // Detached filesystems keep their devices open: finish them first.
        self.detached.clear();
        if self.pool_device()?.is_none() {
            return Ok(done);
        }
        self.recover()?;
        let idle = std::mem::take(&mut self.idle);
        for thin_id in idle {
            let name = self.name(Role::Thin(thin_id));
            let kernel = self.kernel()?;
            if let Some((_, points)) = kernel.mounted(&name)? {
                if points.is_empty() {
                    kernel.remove(&name)?;
                    done.devices += 1;
                }
            }
        }
        let n = max.min(self.rec.trash.len());
        if n == 0 {
            return Ok(done);
        }
        let trash: Vec<Trashed> = self.rec.trash.drain(..n).collect();
        if let Err(e) = self.begin(Pending::Reclaim {
            trash: trash.clone(),
        }) {
            self.rec.trash.splice(0..0, trash);
            return Err(e);
        }
        fault::point("reclaim.after_intent");
        self.reclaim_items(&trash, false)?;
        fault::point("reclaim.after_delete");
        self.commit()?;
        done.thin_ids = trash.len();
        Ok(done)
    }
}
