//! `pool recover`: settles whatever a crash left, beyond the pending
//! intent [`Pool::recover`] settles: an interrupted `pool create`, idle
//! devices, an interrupted (de)activation, deferred removals; with
//! `--force`, devices and thin ids no record knows.
//!
//! What must never happen: a device or thin id the records do not know
//! removed without `--force`; a foreign thin id deleted even with it; a
//! mounted device torn down.

use std::collections::BTreeSet;

use super::{Pool, lifecycle::clear_interrupted_create};
use crate::{
    check::RecoverReport,
    error::{Error, Result},
    mounts,
    names::{self, Role},
    records::Pending,
};

impl Pool {
    /// Settles whatever a crash left: clears an interrupted `pool create`;
    /// on a live pool, settles a pending layer operation and tears down
    /// idle devices (a layer's device active but not mounted, the base
    /// device); on an inactive pool, finishes an interrupted deactivation.
    /// With `force`, also removes thin devices and thin ids no record
    /// knows. Ends with a `pool check`; its findings are returned.
    ///
    /// # Errors
    /// Environment and kernel errors.
    pub fn recover_all(&mut self, force: bool) -> Result<RecoverReport> {
        self.forget_pool_device();
        let mut actions = Vec::new();
        let rec = self.record().clone();
        if rec.pending == Some(Pending::CreatePool) {
            let layout = self.layout().clone();
            let kernel = self.kernel()?;
            for what in clear_interrupted_create(kernel, &layout, &rec)? {
                actions.push(format!(
                    "removed {what}, left by an interrupted pool create"
                ));
            }
            actions.push("create the pool again with `thinlayer pool create`".into());
            return Ok(RecoverReport {
                actions,
                findings: Vec::new(),
            });
        }
        let prefix = names::name_prefix(&rec.pool_id);
        if self.pool_device()?.is_some() {
            actions.extend(self.recover()?);
            // Trashed ids' devices are torn down like idle layer devices.
            let layer_ids: BTreeSet<u32> = self
                .layer_records()?
                .iter()
                .map(|l| l.thin_id)
                .chain(self.record().trash.iter().map(|t| t.thin_id))
                .collect();
            let spare_ids: BTreeSet<u32> = self.record().spares.iter().map(|s| s.thin_id).collect();
            // Before the idle devices: an orphan spare's device is mounted.
            actions.extend(self.sweep_spare_mounts(&layer_ids)?);
            let kernel = self.kernel()?;
            let mut present: Vec<String> = kernel.names_with_prefix(&prefix)?.into_iter().collect();
            present.sort();
            for name in present {
                let n = devicemapper::DmNameBuf::new(name.clone())
                    .expect("valid: listed by the kernel");
                let role = names::parse_role(&rec.pool_id, &name);
                let known = match role {
                    // Spares are active and unmounted by design: kept.
                    Some(Role::Thin(t)) if spare_ids.contains(&t) => continue,
                    Some(Role::Thin(t)) => layer_ids.contains(&t) || t == rec.base_thin_id,
                    Some(_) => continue,
                    None => false,
                };
                if !known && !force {
                    continue;
                }
                let Some(dev) = kernel.device(&n)? else {
                    continue;
                };
                if !mounts::mountpoints_of(dev)?.is_empty() {
                    continue;
                }
                match kernel.remove_if_present(&n) {
                    Ok(true) if known => {
                        actions.push(format!("tore down {name}: active but not mounted"));
                    }
                    Ok(true) => actions.push(format!("removed {name}, which no record knows")),
                    Ok(false) => {}
                    Err(Error::Busy { .. }) => {
                        actions.push(format!("left {name}: it is open (busy)"));
                    }
                    Err(e) => return Err(e),
                }
            }
            actions.extend(self.finish_deferred_removals()?);
            if force {
                let md = self.read_metadata(true)?;
                let mut recorded: BTreeSet<u32> = layer_ids.union(&spare_ids).copied().collect();
                recorded.insert(rec.base_thin_id);
                if let Some(view) = md.view {
                    for &t in view.thin_ids.difference(&recorded) {
                        if rec.backing.is_foreign(t) {
                            // Never: another owner's thin id, even with --force.
                            continue;
                        }
                        let dev = names::dm_name(&rec.pool_id, Role::Thin(t));
                        if self.kernel()?.device(&dev)?.is_some() {
                            continue;
                        }
                        self.delete_thins(&[t], false)?;
                        actions.push(format!("deleted thin id {t}, which no record knows"));
                    }
                }
            }
        } else {
            // Spares' mounts first: their devices go below.
            self.unmount_spares_dir(&mounts::all()?)?;
            let kernel = self.kernel()?;
            let mut present: Vec<String> = kernel.names_with_prefix(&prefix)?.into_iter().collect();
            present.sort_by_key(|n| match names::parse_role(&rec.pool_id, n) {
                Some(Role::Thin(_)) | None => 0,
                Some(Role::Pool) => 1,
                Some(Role::Data) | Some(Role::Meta) => 2,
            });
            for name in present {
                let n = devicemapper::DmNameBuf::new(name.clone())
                    .expect("valid: listed by the kernel");
                if kernel.remove_if_present(&n)? {
                    actions.push(format!(
                        "removed {name}, left by an interrupted activation or deactivation"
                    ));
                }
            }
            if let Some(p) = &rec.pending {
                actions.push(format!(
                    "an interrupted {} waits for the pool: `thinlayer pool activate` settles it",
                    p.describe()
                ));
            }
        }
        let findings = self.check()?.findings;
        Ok(RecoverReport { actions, findings })
    }
}
