//! Snapshots provisioned ahead of demand ("spares").
//!
//! A container's start path is a snapshot of a committed layer, its
//! activation and a mount. The first two are kernel work: a pool message
//! with its metadata commit, then a table load (about 20 ms in the VM,
//! more than the mount). `layer provision P` does both while nobody waits:
//! it makes snapshots of P, activates them and lists them in the pool
//! record. `layer create X --parent P` then takes a spare and writes only
//! records; the mount finds its device ready.
//!
//! A spare is P as it was when provisioned, so any later write to P makes
//! it stale: P's spares are dropped (thin ids deleted) whenever P is
//! activated for writing or removed, and P is only provisioned while
//! nothing has it active.
//!
//! Transactions as for layers. Provision: intent -> `create_snap` ->
//! activation -> the pool record lists the spare (the commit point, the
//! same write that clears the intent); recovery rolls it back. Drop: the
//! list loses them with the intent -> devices removed, thin ids deleted ->
//! intent cleared; recovery finishes it.
//!
//! What must never happen: a spare handed out after its parent was
//! written; a spare's thin id in two places (the list and a layer record).

use serde::Serialize;

use crate::{
    error::{Error, Result},
    fault, kernel,
    names::Role,
    pool::{Pending, Pool, Spare},
};

/// What `layer provision` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Provisioned {
    /// Spares made now.
    pub made: usize,
    /// Spares that were there and are kept (activated again if needed).
    pub kept: usize,
    /// Spares dropped because fewer were asked for.
    pub dropped: usize,
}

impl Pool {
    /// The spares of `parent` (`None`: the base device), oldest first.
    pub fn spares_of(&self, parent: Option<&str>) -> Vec<u32> {
        self.record()
            .spares
            .iter()
            .filter(|s| s.parent.as_deref() == parent)
            .map(|s| s.thin_id)
            .collect()
    }

    /// Keeps `count` active spares of `parent` (`None`: the base device):
    /// makes the missing ones, activates kept ones the kernel lost (a pool
    /// deactivate tears them down), drops any beyond `count`.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::Busy`] (the parent is active, so
    /// it may be written), [`Error::NoSpace`], kernel errors.
    pub fn provision(&mut self, parent: Option<&str>, count: usize) -> Result<Provisioned> {
        let (origin, sectors) = match parent {
            Some(p) => {
                let l = self.layer(p)?;
                super::layer::refuse_removing(&l)?;
                (l.thin_id, l.size_in(self.record()).sectors())
            }
            None => (
                self.record().base_thin_id,
                self.record().base_size.sectors(),
            ),
        };
        let pool_dev = self.require_active()?;
        self.recover()?;
        let mut report = Provisioned::default();
        let have = self.spares_of(parent);
        if have.len() > count {
            report.dropped = have.len() - count;
            self.drop_spares(have[count..].to_vec())?;
        }
        let what = parent.map_or("the base device".to_owned(), |p| format!("layer `{p}`"));
        let origin_name = self.name(Role::Thin(origin));
        if have.len() < count && self.kernel()?.device(&origin_name)?.is_some() {
            return Err(Error::Busy {
                what,
                detail: "it is active, so it may be written, and a spare must stay what its \
                         parent is; unmount it (`thinlayer umount`) and provision again"
                    .into(),
            });
        }
        for &thin_id in have.iter().take(count) {
            self.activate_thin(pool_dev, thin_id, sectors).map(|_| ())?;
            report.kept += 1;
        }
        for _ in have.len().min(count)..count {
            self.check_space()?;
            let thin_id = self.record().next_thin_id;
            kernel::ThinId::new(thin_id)?;
            self.begin(Pending::ProvisionSpare {
                parent: parent.map(str::to_owned),
                thin_id,
            })?;
            fault::point("spare_provision.after_intent");
            let mut made = self.snapshot_thin(thin_id, origin);
            if made.is_ok() {
                fault::point("spare_provision.after_snapshot");
                made = match self.activate_thin(pool_dev, thin_id, sectors).map(|_| ()) {
                    Err(e) => Err(self.undo_thin(thin_id, e)),
                    ok => ok,
                };
            }
            if let Err(e) = made {
                // Nothing was listed: forget the intent (the id stays used).
                self.commit()?;
                return Err(e);
            }
            fault::point("spare_provision.after_activation");
            self.rec.spares.push(Spare {
                parent: parent.map(str::to_owned),
                thin_id,
            });
            self.commit()?;
            report.made += 1;
        }
        Ok(report)
    }

    /// Tears down every spare's device, keeping the spares listed (for a
    /// server that stops: `provision` activates them again). Returns how
    /// many devices it removed.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn rest_spares(&mut self) -> Result<usize> {
        let ids: Vec<u32> = self.record().spares.iter().map(|s| s.thin_id).collect();
        let mut n = 0;
        for thin_id in ids {
            let name = self.name(Role::Thin(thin_id));
            if self.kernel()?.remove_if_present(&name)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Takes the oldest spare of `parent` off the list (in memory; the
    /// caller's intent write makes it durable).
    pub(crate) fn take_spare(&mut self, parent: Option<&str>) -> Option<Spare> {
        let spares = &mut self.rec.spares;
        let at = spares.iter().position(|s| s.parent.as_deref() == parent)?;
        Some(spares.remove(at))
    }

    /// Drops every spare of layer `id`: it is about to be written or
    /// removed. A no-op (no I/O) when it has none.
    ///
    /// # Errors
    /// Record and kernel errors.
    pub(crate) fn drop_spares_of(&mut self, id: &str) -> Result<()> {
        let ids = self.spares_of(Some(id));
        self.drop_spares(ids)
    }

    /// Drops the spares `thin_ids`: off the list with the intent, then
    /// their devices and thin ids.
    fn drop_spares(&mut self, thin_ids: Vec<u32>) -> Result<()> {
        if thin_ids.is_empty() {
            return Ok(());
        }
        self.require_active()?;
        self.rec.spares.retain(|s| !thin_ids.contains(&s.thin_id));
        self.begin(Pending::DropSpares {
            thin_ids: thin_ids.clone(),
        })?;
        fault::point("spare_drop.after_intent");
        self.delete_thins(&thin_ids, false)?;
        fault::point("spare_drop.after_delete");
        self.commit()
    }
}
