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
//! A layer create that takes a spare has no intent at all (see "Taking a
//! spare" below). A layer create and a layer rm --later skip the write of step 4
//! (`Pool::commit_lazily`): their commit point is the layer record
//! (written, removed), so the intent they leave in the pool record says
//! nothing a reader cannot tell from it. Every open settles such an intent
//! in memory, as recovery would (`settle_committed`): a `CreateLayer` whose
//! layer record names its thin id is done; a `TrashLayer` whose layer
//! record is gone is done once its thin id is in the trash list. The pool
//! record's next write keeps that. A create costs two durable writes (the
//! intent, the layer record), a trashing one and a removal.
//!
//! # Taking a spare
//!
//! A create that takes a listed spare (`spare`) has no kernel step: the
//! spare is the snapshot, made. Its whole transaction is one durable
//! write, `Pool::take`: the layer record, with a second name, the spare's
//! marker `ROOT/layers/THIN_ID.taken` (a hard link made just before the
//! record takes its place, in the same directory, so one fsync of it makes
//! both names durable, the marker first). The pool record is not written:
//! it still lists the spare, and every open reads the marker as the take
//! (`settle_taken`): a listed spare whose marker is the record of a layer
//! whose record, in its place, names the spare's thin id is unlisted in
//! memory, and the layers' generation moved past it, as the take moved it.
//! That costs one `stat` per listed spare. The next write of the pool
//! record (the settler's next provision, any intent) writes it without the
//! spare, and then the marker goes; an exclusive open (every command)
//! removes the markers of spares the record no longer lists. So a create
//! on a spare costs one durable write, not two (the intent and the record),
//! and no write of the pool record.
//!
//! | crashed | found | settled |
//! |---|---|---|
//! | before the link (`layer_take`) | the spare listed, no marker | nothing: still a spare |
//! | after the link (`layer_take.after_link`) | the spare listed, a marker, no layer record | nothing: still a spare (the next take replaces the marker) |
//! | after the record (`layer_take.after_record`) | the spare listed, its marker and the layer record | at every open: the spare unlisted |
//!
//! What must never happen, and why it does not: a spare listed while a
//! layer uses its thin id (it would be handed out again, or dropped and
//! its data deleted). The record in its place implies the marker, and a
//! spare with a marker is not handed out; the marker goes only once a
//! durable pool record without the spare is written.
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
//! | `CreateLayer` | no such record | rolled back: delete the thin id if the kernel made it |
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

use std::collections::BTreeSet;

use super::Pool;
use crate::{
    error::{Error, IoContext, Result},
    names::Role,
    records::{LayerRecord, Layout, Pending, PoolRecord, Record, Spare, Trashed, file},
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

    /// A layer create that takes listed spare `spare` (see the module
    /// notes): `layer`'s record written, with the spare's marker as its
    /// second name; the pool record is not written. On an error the spare
    /// is listed again.
    ///
    /// # Errors
    /// Record write errors (nothing changed on disk then).
    pub(crate) fn take(&mut self, layer: &LayerRecord, spare: Spare) -> Result<()> {
        // The index follows this change, as in `begin`.
        self.take_cached_children();
        self.rec.layers_gen += 1;
        let marker = self.layout.taken_marker(spare.thin_id);
        let path = self.layout.layer_record(&layer.id);
        if let Err(e) = file::write_linked(&path, LayerRecord::KIND, layer, &marker) {
            // As an open would read it: the spare listed, no marker.
            self.rec.layers_gen -= 1;
            self.rec.spares.push(spare);
            return Err(e);
        }
        self.taken.insert(spare.thin_id);
        Ok(())
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

/// Settles, in `rec` as loaded, the spares layer creates took since it was
/// last written (see the module notes): each listed spare whose marker is
/// a record of a layer whose record, in its place, names its thin id is
/// unlisted, and the layers' generation moved past each such create (as
/// [`Pool::take`] moved it: a handle's generation is always the one an
/// open would read from the records). Returns their thin ids.
pub(super) fn settle_taken(layout: &Layout, rec: &mut PoolRecord) -> BTreeSet<u32> {
    let mut taken = BTreeSet::new();
    rec.spares.retain(|s| {
        let marker = layout.taken_marker(s.thin_id);
        // A marker whose record is not in place is a take that never got
        // there: the spare is still one (the next take replaces it).
        let took = marker.exists()
            && LayerRecord::load(&marker).is_ok_and(|l| {
                l.thin_id == s.thin_id && created(layout, &l.id, s.thin_id).unwrap_or(false)
            });
        if took {
            taken.insert(s.thin_id);
        }
        !took
    });
    rec.layers_gen += taken.len() as u64;
    taken
}

/// Removes the markers of spares the pool record no longer lists (all but
/// `taken`): a crash after the record's write left them.
///
/// # Errors
/// I/O errors listing the directory or removing a marker.
pub(super) fn sweep_taken(layout: &Layout, taken: &BTreeSet<u32>) -> Result<()> {
    let dir = layout.layers_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("list {}", dir.display())),
    };
    for entry in entries {
        let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
        let stale = path.extension().is_some_and(|e| e == "taken")
            && path
                .file_stem()
                .and_then(|s| s.to_str()?.parse::<u32>().ok())
                .is_none_or(|id| !taken.contains(&id));
        if stale {
            file::remove(&path)?;
        }
    }
    Ok(())
}

/// Puts `item` in `rec`'s trash unless it is there already.
fn trash_once(rec: &mut PoolRecord, item: Trashed) {
    if !rec.trash.contains(&item) {
        rec.trash.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        names::PoolId,
        records::{FsType, Owner},
        units::{BlockSize, Bytes},
    };

    fn layout(tag: &str) -> Layout {
        let root = std::env::temp_dir().join(format!("thinlayer-txn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let layout = Layout { root };
        file::create_dir(&layout.layers_dir()).unwrap();
        layout
    }

    fn pool(spares: &[u32]) -> PoolRecord {
        PoolRecord {
            backing: Default::default(),
            pool_id: PoolId::new("0123abcd").unwrap(),
            data_size: Bytes(1 << 30),
            metadata_size: Bytes(1 << 22),
            block_size: BlockSize::DEFAULT,
            fs: FsType::Ext4,
            base_size: Bytes(1 << 28),
            base_thin_id: 0,
            next_thin_id: 10,
            transaction_id: 1,
            low_water_percent: 10,
            pending: None,
            spares: spares
                .iter()
                .map(|&thin_id| Spare {
                    parent: Some("b".into()),
                    thin_id,
                    mounted: true,
                })
                .collect(),
            trash: Vec::new(),
            created_unix: 0,
            layers_gen: 5,
        }
    }

    fn layer(id: &str, thin_id: u32) -> LayerRecord {
        LayerRecord {
            id: id.into(),
            thin_id,
            parent: Some("b".into()),
            created_unix: 0,
            size: None,
            fs: None,
            removing: false,
            owner: Owner::default(),
        }
    }

    /// Takes spare `thin_id` for layer `id` as `Pool::take` writes it.
    fn take(l: &Layout, id: &str, thin_id: u32) {
        let path = l.layer_record(id);
        file::write_linked(
            &path,
            LayerRecord::KIND,
            &layer(id, thin_id),
            &l.taken_marker(thin_id),
        )
        .unwrap();
    }

    #[test]
    fn a_spare_whose_marker_is_its_takers_record_is_unlisted_at_open() {
        let l = layout("taken");
        take(&l, "c1", 3);
        let mut rec = pool(&[3, 4]);
        let taken = settle_taken(&l, &mut rec);
        assert_eq!(taken, BTreeSet::from([3]));
        assert_eq!(
            rec.spares.iter().map(|s| s.thin_id).collect::<Vec<_>>(),
            [4]
        );
        assert_eq!(rec.layers_gen, 6, "moved past the take");
        // The layer's record is listed once; the marker is no record.
        assert_eq!(
            std::fs::read_dir(l.layers_dir())
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "rec"))
                .count(),
            1
        );
        std::fs::remove_dir_all(&l.root).unwrap();
    }

    #[test]
    fn a_marker_without_its_record_in_place_takes_nothing() {
        let l = layout("torn");
        // The crash after the link: the marker, and no record in place.
        take(&l, "c1", 3);
        std::fs::remove_file(l.layer_record("c1")).unwrap();
        // Or a record in place that names another thin id.
        take(&l, "c2", 4);
        file::write(&l.layer_record("c2"), LayerRecord::KIND, &layer("c2", 9)).unwrap();
        let mut rec = pool(&[3, 4]);
        assert!(settle_taken(&l, &mut rec).is_empty());
        assert_eq!(rec.spares.len(), 2, "both still spares");
        assert_eq!(rec.layers_gen, 5);
        // Taking it again replaces the stale marker.
        take(&l, "c3", 3);
        assert_eq!(settle_taken(&l, &mut rec), BTreeSet::from([3]));
        std::fs::remove_dir_all(&l.root).unwrap();
    }

    #[test]
    fn the_sweep_keeps_only_the_markers_of_spares_still_listed() {
        let l = layout("sweep");
        take(&l, "c1", 3);
        take(&l, "c2", 4);
        sweep_taken(&l, &BTreeSet::from([4])).unwrap();
        assert!(!l.taken_marker(3).exists());
        assert!(l.taken_marker(4).exists());
        assert!(l.layer_record("c1").exists(), "records untouched");
        std::fs::remove_dir_all(&l.root).unwrap();
    }
}
