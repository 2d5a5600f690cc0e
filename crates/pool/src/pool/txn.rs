//! The transaction protocol: how a change that touches both the kernel's
//! pool metadata and thinlayer's records stays whole across a crash.
//!
//! # The protocol
//!
//! Every such change (layer create and rm, spare provision and drop, layer
//! rm --later, reclaim) is one small transaction over the pool record's
//! `pending` field ([`Pending`]):
//!
//! 1. **Intent** (`Pool::begin`): the pool record is rewritten with the
//!    operation in `pending`, and, for an operation that makes a thin id,
//!    `next_thin_id` moved past it. From here on the thin id is used up,
//!    whatever happens: ids only grow, so one is never handed out twice.
//! 2. **Kernel steps** ([`super::thin`]): `create_snap` / `create_thin` /
//!    `delete` pool messages, device activations and removals, discards.
//!    The kernel commits its metadata before a pool message returns, so
//!    each step is durable once it returns.
//! 3. **Commit point**: the record that makes the change visible is
//!    written or removed: a layer record written (create), removed (rm),
//!    a spare listed or the trash extended in the pool record.
//! 4. **Done** (`Pool::commit`): `pending` cleared.
//!
//! A layer create and a layer rm --later skip the write of step 4
//! (`Pool::commit_lazily`): their commit point is the layer record
//! (written, removed), so the intent they leave in the pool record says
//! nothing a reader cannot tell from it. Every open settles such an intent
//! in memory, as recovery would (`settle_committed`): a `CreateLayer` whose
//! layer record names its thin id is done; a `TrashLayer` whose layer
//! record is gone is done once its thin id is in the trash list. The pool
//! record's next write keeps that. A create costs two durable writes (the
//! intent, the layer record), a trashing one and a removal.
//!
//! A failure that is not a crash (the kernel refuses a message) before the
//! commit point undoes the kernel step (`Pool::undo_thin`) and clears the
//! intent; the thin id stays used up.
//!
//! # After a crash
//!
//! The next change command (or `pool activate`, `pool recover`) calls
//! [`Pool::recover`], which reads `pending` and settles it:
//!
//! | crashed during | found | recovery |
//! |---|---|---|
//! | `CreateLayer` | layer record naming the thin id | kept: the intent is cleared at open |
//! | `CreateLayer` | no such record | rolled back: unmount a taken spare's mount, delete the thin id if the kernel made it |
//! | `RemoveLayer` | layer record | finished: discard, delete, remove the record |
//! | `RemoveLayer` | no record | finished: delete the thin id if still there |
//! | `ProvisionSpare` | (a listed spare was committed with its intent) | rolled back: unmount `ROOT/spares/ID` if mounted, delete the thin id |
//! | `DropSpares` | ids already off the list | finished: unmount them if mounted, delete them |
//! | `TrashLayer` | record gone | finished at open: id in the trash |
//! | `TrashLayer` | record there | finished: record removed, id in the trash |
//! | `Reclaim` | ids already off the trash | finished: discard and delete them |
//!
//! Every kernel step recovery repeats is idempotent: deleting an id that
//! is gone, or discarding one the pool no longer has, is nothing to do
//! (`settling`). A crash during recovery is recovered the same way.
//! Deleting or discarding a thin id first unmounts its spare directory
//! (`ROOT/spares/ID`) if something is mounted there, so each row above
//! holds for mounted spares too.
//!
//! Mounted spares (see `spare`) add steps no intent needs, because
//! mountinfo, not a record, says where a spare is mounted:
//!
//! | crashed | found | settled by |
//! |---|---|---|
//! | mounting a kept spare (`spare_mount.*`) | listed, flagged mounted, mounted or not | nothing: a listed spare not mounted is a plain spare; the next `provision --mounted` mounts it |
//! | taking one (`layer create`, then `mount`) | the layer's device mounted at `ROOT/spares/ID` | nothing: the next mount moves it (or, for other options, unmounts it and mounts as usual); `layer rm`, `umount`, `pool deactivate` unmount it |
//! | the move (`spare_take.after_move`) | the mount at the target, an empty `ROOT/spares/ID` | `pool recover` (or `pool deactivate`) removes the directory |
//! | anything else | a mount under `ROOT/spares` no list or record names | `pool recover`: unmounted, its thin id deleted |
//!
//! `pool create` has its own intent, [`Pending::CreatePool`]: what a crash
//! leaves under it is leftovers, cleared by the next create, recover or
//! destroy (see `lifecycle`).
//!
//! # The transaction id
//!
//! The kernel's transaction id is set once, at `pool create`, and never
//! moved again (moving it would cost a second pool message and metadata
//! commit per change). A record and a kernel that disagree on it mean the
//! metadata or the records were replaced by other copies: recovery refuses
//! and `pool check` says so. An adopted pool's id is its owner's (LVM
//! moves it) and is never compared.
//!
//! # What must never happen
//!
//! A thin id reused while the pool's metadata may still hold it; a record
//! saying a layer exists whose thin id the kernel never created; a thin id
//! that no record names (its blocks would stay allocated for good), except
//! for the one a `pending` intent names, which recovery settles.

use super::Pool;
use crate::{
    error::{Error, Result},
    names::Role,
    records::{LayerRecord, Layout, Pending, PoolRecord, Record, Trashed, file},
};

impl Pool {
    /// Step 1: records `op` as begun, and uses up the thin id it makes.
    ///
    /// # Errors
    /// Record write errors (nothing changed on disk then).
    pub(crate) fn begin(&mut self, op: Pending) -> Result<()> {
        if matches!(
            op,
            Pending::CreateLayer { .. } | Pending::RemoveLayer { .. } | Pending::TrashLayer { .. }
        ) {
            // The index follows this change; other processes' copies are
            // stale from now on.
            self.take_cached_children();
            self.rec.layers_gen += 1;
        }
        let rec = &mut self.rec;
        if let Pending::CreateLayer { thin_id, .. } | Pending::ProvisionSpare { thin_id, .. } = op {
            rec.next_thin_id = rec.next_thin_id.max(thin_id + 1);
        }
        rec.pending = Some(op);
        self.write_record()
    }

    /// Step 4: records the pool with nothing pending.
    ///
    /// # Errors
    /// Record write errors (recovery settles the intent left then).
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.rec.pending = None;
        self.write_record()
    }

    /// Step 4 of a layer create or trashing, once its layer record (its
    /// commit point) is written or removed: `pending` cleared in memory
    /// only (see the module notes).
    pub(crate) fn commit_lazily(&mut self) {
        debug_assert!(matches!(
            self.rec.pending,
            Some(Pending::CreateLayer { .. } | Pending::TrashLayer { .. })
        ));
        self.rec.pending = None;
    }

    /// Finishes or undoes an operation a crash interrupted (see the module
    /// notes); checks that the kernel's transaction id and the record's
    /// agree. Needs the pool active; a no-op when it is not. Returns what
    /// it did, in sentences (empty when nothing was interrupted).
    ///
    /// Once settled, a handle does not look again: it holds the root's
    /// lock, so no other thinlayer process changes the pool under it.
    ///
    /// # Errors
    /// [`Error::Inconsistent`] when the ids disagree; [`Error::InterruptedCreate`];
    /// kernel errors.
    pub fn recover(&mut self) -> Result<Vec<String>> {
        if self.rec.pending == Some(Pending::CreatePool) {
            return Err(self.interrupted_create_error());
        }
        if self.settled && self.rec.pending.is_none() {
            return Ok(Vec::new());
        }
        if self.pool_device()?.is_none() {
            return Ok(Vec::new());
        }
        let pool = self.name(Role::Pool);
        let t = self.rec.transaction_id;
        let kt = if self.foreign_transactions() {
            // The owner's counter (LVM moves it): never compared.
            t
        } else {
            self.kernel()?.pool_status(&pool)?.transaction_id
        };
        let before = self.rec.pending.clone();
        if before.is_some() {
            self.forget_cached_children();
        }
        let outcome = self.settle(t, kt)?;
        self.settled = true;
        Ok(match before {
            None => Vec::new(),
            Some(p) => vec![format!(
                "settled an interrupted {}: {outcome}",
                p.describe()
            )],
        })
    }

    fn settle(&mut self, t: u64, kt: u64) -> Result<&'static str> {
        match self.rec.pending.clone() {
            None if kt == t => Ok("nothing to do"),
            None => Err(Error::Inconsistent(format!(
                "the pool's kernel transaction id is {kt} but the records are at {t}: \
                 the metadata or the records were replaced; run `thinlayer pool check`"
            ))),
            Some(Pending::CreateLayer { id, thin_id, .. }) if kt == t => {
                if created(&self.layout, &id, thin_id)? {
                    tracing::info!(%id, thin_id, "recovery: layer create had committed");
                    return self.commit().map(|()| "kept (its record was written)");
                }
                tracing::info!(%id, thin_id, "recovery: rolling layer create back");
                // The thin id may or may not have been made before the crash.
                self.delete_thins(&[thin_id], true)?;
                self.commit().map(|()| "rolled back")
            }
            Some(Pending::RemoveLayer { id, thin_id }) if kt == t => {
                tracing::info!(%id, thin_id, "recovery: finishing layer removal");
                let path = self.layout.layer_record(&id);
                if path.exists() {
                    // Give the layer's space back to the host before the
                    // delete, as `layer rm` does (a no-op once deleted).
                    let size = LayerRecord::load(&path)
                        .map_or(self.rec.base_size, |l| l.size_in(&self.rec));
                    self.reclaim_items(&[Trashed { thin_id, size }], true)?;
                    file::remove(&path)?;
                } else {
                    self.delete_thins(&[thin_id], true)?;
                }
                self.commit().map(|()| "finished")
            }
            Some(Pending::ProvisionSpare { thin_id, .. }) if kt == t => {
                // Listed spares were committed with their intent cleared.
                tracing::info!(thin_id, "recovery: rolling a spare's provision back");
                self.delete_thins(&[thin_id], true)?;
                self.commit().map(|()| "rolled back")
            }
            Some(Pending::TrashLayer { id, thin_id, size }) if kt == t => {
                // Finish it: the record goes, the thin id to the trash.
                tracing::info!(%id, thin_id, "recovery: finishing layer rm --later");
                file::remove(&self.layout.layer_record(&id))?;
                trash_once(&mut self.rec, Trashed { thin_id, size });
                self.commit()
                    .map(|()| "finished (its space comes back at the next reclaim)")
            }
            Some(Pending::Reclaim { trash }) if kt == t => {
                tracing::info!(n = trash.len(), "recovery: finishing a reclaim");
                self.reclaim_items(&trash, true)?;
                self.commit().map(|()| "finished")
            }
            Some(Pending::DropSpares { thin_ids }) if kt == t => {
                tracing::info!(?thin_ids, "recovery: finishing a drop of spares");
                self.delete_thins(&thin_ids, true)?;
                self.commit().map(|()| "finished")
            }
            Some(p) => Err(Error::Inconsistent(format!(
                "an interrupted {p:?} left the kernel at transaction {kt} and the records at {t}; \
                 run `thinlayer pool check`"
            ))),
        }
    }
}

/// Settles, in `rec` as loaded, an intent whose commit point is behind it
/// (see the module notes): a `CreateLayer` whose layer record names its
/// thin id, a `TrashLayer` whose layer record is gone (its thin id put in
/// the trash). Anything else stays for [`Pool::recover`].
pub(super) fn settle_committed(layout: &Layout, rec: &mut PoolRecord) {
    match rec.pending.clone() {
        // A damaged record is recovery's to report.
        Some(Pending::CreateLayer { id, thin_id, .. })
            if created(layout, &id, thin_id).unwrap_or(false) =>
        {
            rec.pending = None;
        }
        Some(Pending::TrashLayer { id, thin_id, size }) if !layout.layer_record(&id).exists() => {
            trash_once(rec, Trashed { thin_id, size });
            rec.pending = None;
        }
        _ => {}
    }
}

/// Whether layer `id`'s record names `thin_id`: its create passed its
/// commit point.
///
/// # Errors
/// A damaged record.
fn created(layout: &Layout, id: &str, thin_id: u32) -> Result<bool> {
    match LayerRecord::load(&layout.layer_record(id)) {
        Ok(l) => Ok(l.thin_id == thin_id),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Puts `item` in `rec`'s trash unless it is there already.
fn trash_once(rec: &mut PoolRecord, item: Trashed) {
    if !rec.trash.contains(&item) {
        rec.trash.push(item);
    }
}
