//! The pool: a dm thin-pool over two sparse files (data and metadata) on
//! loop devices (or two block devices, or a pool someone else runs), its
//! base thin device, and its records under the root.
//!
//! ```text
//! ROOT/pool.rec          the pool record (sizes, ids, transaction id, pending op)
//! ROOT/layers/ID.rec     one record per layer
//! ROOT/data.img          sparse data file      -> loop -> linear tl1-P-data
//! ROOT/metadata.img      sparse metadata file  -> loop -> linear tl1-P-meta
//!                                                   thin-pool tl1-P-pool
//! ROOT/lock              flock(2) target
//! ROOT/spares/THIN_ID    mounted spares, on a private tmpfs (see `spare`)
//! ```
//!
//! The root and every directory under it are 0700, every file 0600, all
//! root's (see [`file::secure_root`]): the pool holds every container's
//! and volume's bytes.
//!
//! This module owns [`Pool`]'s state; its child modules each do one job
//! with it:
//!
//! - [`txn`]: the intent / commit / recover protocol (read its doc for the
//!   crash story);
//! - [`thin`]: every operation on a thin id (snapshot, fresh, activate,
//!   discard, delete, undo);
//! - `create`, `adopt`, `lifecycle`, `destroy`: the pool's life;
//! - `status`, `layer`, `mount`, `spare`, `reclaim`, `extend`, `check`,
//!   `recover`, `repair`: the verbs, using `txn` and `thin`.
//!
//! What must never happen: a thin id reused while the pool's metadata may
//! still hold it (ids come from a counter that only grows); a record saying
//! a layer exists whose thin id the kernel never created.

mod adopt;
mod check;
mod create;
mod destroy;
mod extend;
mod frozen;
mod layer;
mod lifecycle;
mod mount;
mod reclaim;
mod recover;
mod repair;
mod space;
mod spare;
mod status;
pub mod thin;
pub mod txn;
pub mod watch;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

pub use crate::action::Action;
pub use crate::records::{
    Backing, FsType, LayerRecord, Layout, Owner, Pending, PoolRecord, Spare, Trashed,
};
use crate::{
    error::{Error, Result},
    kernel::{self, Kernel},
    lock::{self, LockMode, RootLock},
    names::{self, Role},
    records::{Record, file},
};
pub use adopt::FIRST_ADOPTED_THIN_ID;
pub use create::{CreateOptions, DevicePair};
pub use frozen::Frozen;
pub use layer::{Holders, LayerInfo, Removal};
pub use lifecycle::check_metadata;
pub use mount::{Teardown, Trim};
pub use reclaim::Reclaimed;
pub use spare::SpareMount;
pub use spare::{Provisioned, SpareInfo};
pub use status::{KernelStatus, PoolMode, PoolStatus, SpareCost};

/// An open pool: its record, loaded under the root's lock.
pub struct Pool {
    layout: Layout,
    rec: PoolRecord,
    kernel: Option<Kernel>,
    /// The pool device once seen active: under the exclusive lock only this
    /// process changes that, and the verbs that do reset it.
    active: Option<devicemapper::Device>,
    /// [`Pool::recover`] found nothing left to settle since the pool was
    /// last brought up or down.
    settled: bool,
    /// Unmounts leave devices up and removals go to the trash, for
    /// [`Pool::reclaim`] to finish off the request path.
    teardown_later: bool,
    /// Devices an unmount left up under `teardown_later`.
    idle: BTreeSet<u32>,
    /// Filesystems a [`Trim::Discard`] unmount detached under
    /// `teardown_later`, for the caller to finish ([`Pool::take_detached`]);
    /// finished when the handle drops if not taken.
    detached: Vec<crate::mounts::Detached>,
    /// Parent -> children, built on first use (see [`Pool::children_of`]);
    /// dropped whenever recovery changes records.
    children: Option<ChildIndex>,
    /// Spares a caller is mounting without the lock
    /// ([`Pool::provision_one_mount_later`]): not handed out by this handle.
    held: BTreeSet<u32>,
    /// Spares taken by a layer create that the pool record on disk still
    /// lists (their markers say so; see [`txn`]): unlisted in `rec`, their
    /// markers removed once `rec` is written.
    taken: BTreeSet<u32>,
    _lock: RootLock,
}

/// Layer id -> the ids of its children.
type ChildIndex = HashMap<String, BTreeSet<String>>;

/// The child index the last handle of this process left, for the next
/// handle on the same pool: a server opens the pool per request, and
/// building the index reads every layer record. Valid while the record's
/// [`PoolRecord::layers_gen`](crate::records::PoolRecord) is the one it was
/// left at: another process's layer change bumps it, and a recovery that
/// settles an interrupted change drops the cache.
static CHILDREN: Mutex<Option<CachedChildren>> = Mutex::new(None);

struct CachedChildren {
    root: PathBuf,
    pool_id: names::PoolId,
    layers_gen: u64,
    index: ChildIndex,
}

fn cached_children() -> std::sync::MutexGuard<'static, Option<CachedChildren>> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Still under the root's lock (fields drop after this).
        if let Some(index) = self.children.take() {
            *cached_children() = Some(CachedChildren {
                root: self.layout.root.clone(),
                pool_id: self.rec.pool_id.clone(),
                layers_gen: self.rec.layers_gen,
                index,
            });
        }
    }
}

impl Pool {
    /// Takes the child index an earlier handle of this process left, if
    /// it is still this pool's as the records stand; one that is not is
    /// dropped (a generation this handle moves to next may have been
    /// another state's: a write that failed after moving it).
    pub(crate) fn take_cached_children(&mut self) {
        if self.children.is_some() {
            return;
        }
        let cached = cached_children().take();
        self.children = cached
            .filter(|c| {
                c.layers_gen == self.rec.layers_gen
                    && c.pool_id == self.rec.pool_id
                    && c.root == self.layout.root
            })
            .map(|c| c.index);
    }

    /// Drops this process's cached child index (recovery changed records).
    pub(crate) fn forget_cached_children(&mut self) {
        self.children = None;
        *cached_children() = None;
    }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Pool {
    /// A handle on a pool just made or adopted under `lock`.
    fn new(layout: Layout, rec: PoolRecord, kernel: Option<Kernel>, lock: RootLock) -> Pool {
        Pool {
            layout,
            rec,
            kernel,
            active: None,
            settled: false,
            teardown_later: false,
            idle: BTreeSet::new(),
            detached: Vec::new(),
            children: None,
            held: BTreeSet::new(),
            taken: BTreeSet::new(),
            _lock: lock,
        }
    }

    /// Opens the pool under `root`, taking the root's lock in `mode`. A root
    /// another user owns is refused; an exclusive open tightens a root
    /// others can read (see [`file::secure_root`]).
    ///
    /// # Errors
    /// [`Error::NotRoot`], [`Error::RootOwner`], [`Error::NoPool`],
    /// [`Error::Locked`], damaged records.
    pub fn open(root: &Path, mode: LockMode, wait: bool) -> Result<Pool> {
        Pool::open_swept(root, mode, wait, true)
    }

    /// As [`Pool::open`] (exclusive, waiting for the lock), without the
    /// sweep of the temp files a crash left: for a server that opened the
    /// pool once at its start (which swept them) and opens it again per
    /// request. The sweep lists the directory of every layer record, so
    /// it grows with the pool; a temp file is harmless until the next
    /// command or start sweeps it.
    ///
    /// # Errors
    /// As [`Pool::open`].
    pub fn open_again(root: &Path) -> Result<Pool> {
        Pool::open_swept(root, LockMode::Exclusive, true, false)
    }

    fn open_swept(root: &Path, mode: LockMode, wait: bool, sweep: bool) -> Result<Pool> {
        let layout = Layout {
            root: root.to_owned(),
        };
        kernel::require_root()?;
        file::check_owner(root)?;
        if !layout.pool_record().exists() {
            return Err(Error::NoPool {
                root: root.to_owned(),
            });
        }
        let lock = lock::lock(root, mode, wait)?;
        // Under the lock: one command tightens and says so.
        file::secure_root(root, mode == LockMode::Exclusive)?;
        let mut rec: PoolRecord = match PoolRecord::load(&layout.pool_record()) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // Destroyed while we waited for the lock.
                return Err(Error::NoPool {
                    root: root.to_owned(),
                });
            }
            r => r?,
        };
        txn::settle_committed(&layout, &mut rec);
        let taken = txn::settle_taken(&layout, &mut rec);
        if mode == LockMode::Exclusive && sweep {
            file::sweep_temp(root)?;
            file::sweep_temp(&layout.layers_dir())?;
            txn::sweep_taken(&layout, &taken)?;
        }
        let mut pool = Pool::new(layout, rec, None, lock);
        pool.taken = taken;
        Ok(pool)
    }

    /// The pool record as loaded.
    pub fn record(&self) -> &PoolRecord {
        &self.rec
    }

    /// The root's paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn kernel(&mut self) -> Result<&Kernel> {
        if self.kernel.is_none() {
            self.kernel = Some(Kernel::open()?);
        }
        Ok(self.kernel.as_ref().expect("set just above"))
    }

    /// The dm name of `role`: thinlayer's own, but for the pool device of
    /// an adopted pool, which has its owner's name.
    pub(crate) fn name(&self, role: Role) -> devicemapper::DmNameBuf {
        match (&self.rec.backing, role) {
            (Backing::Adopted { pool_name, .. }, Role::Pool) => {
                devicemapper::DmNameBuf::new(pool_name.clone())
                    .expect("checked to be a dm name when adopted")
            }
            _ => names::dm_name(&self.rec.pool_id, role),
        }
    }

    /// Refuses to touch `thin_id` when it is someone else's (an adopted
    /// pool's foreign ids, and every id below thinlayer's first).
    ///
    /// # Errors
    /// [`Error::Foreign`].
    pub(crate) fn refuse_foreign(&self, thin_id: u32) -> Result<()> {
        match &self.rec.backing {
            Backing::Adopted { pool_name, .. } if self.rec.backing.is_foreign(thin_id) => {
                Err(Error::Foreign {
                    what: format!("thin id {thin_id} is not thinlayer's"),
                    pool: pool_name.clone(),
                    hint: "thinlayer never deletes or changes it; its owner does".into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether the kernel's transaction id is the pool's owner's (an
    /// adopted pool: LVM moves it), so records are never compared to it.
    pub(crate) fn foreign_transactions(&self) -> bool {
        matches!(self.rec.backing, Backing::Adopted { .. })
    }

    pub(crate) fn uuid(&self, role: Role) -> devicemapper::DmUuidBuf {
        names::dm_uuid(&self.rec.pool_id, role)
    }

    pub(crate) fn write_record(&mut self) -> Result<()> {
        self.rec.save(&self.layout.pool_record())?;
        // The record just written lists none of the spares taken.
        for thin_id in std::mem::take(&mut self.taken) {
            let _ = std::fs::remove_file(self.layout.taken_marker(thin_id));
        }
        Ok(())
    }

    /// The pool device's number if it is active.
    ///
    /// # Errors
    /// Environment and kernel errors.
    pub fn pool_device(&mut self) -> Result<Option<devicemapper::Device>> {
        if self.active.is_some() {
            return Ok(self.active);
        }
        let name = self.name(Role::Pool);
        self.active = self.kernel()?.device(&name)?;
        if self.active.is_some() && !matches!(self.rec.backing, Backing::Adopted { .. }) {
            let (meta, data) = (self.name(Role::Meta), self.name(Role::Data));
            let block = kernel::Sectors(self.rec.block_size.sectors());
            let kernel = self.kernel.as_ref().expect("opened above");
            if let Err(e) = kernel.check_pool(&name, &meta, &data, block) {
                self.active = None;
                return Err(e);
            }
        }
        if let (Some(_), Backing::Adopted { pool_uuid, .. }) = (self.active, &self.rec.backing) {
            let live = self.kernel.as_ref().expect("opened above").uuid_of(&name)?;
            if live != *pool_uuid {
                self.active = None;
                return Err(Error::Inconsistent(format!(
                    "{} is not the pool this root adopted (its dm uuid is {}, the record says {}); \
                     bring the adopted pool back up under that name, or point --root elsewhere",
                    &*name,
                    live.as_deref().unwrap_or("none"),
                    pool_uuid.as_deref().unwrap_or("none")
                )));
            }
        }
        Ok(self.active)
    }

    /// Forgets the cached pool device, for verbs that bring it up or down.
    pub(crate) fn forget_pool_device(&mut self) {
        self.active = None;
        self.settled = false;
    }

    /// The pool device's number; an error that says how to activate when it
    /// is not active.
    ///
    /// # Errors
    /// [`Error::PoolInactive`], [`Error::InterruptedCreate`], environment
    /// and kernel errors.
    pub fn require_active(&mut self) -> Result<devicemapper::Device> {
        if self.rec.pending == Some(Pending::CreatePool) {
            return Err(self.interrupted_create_error());
        }
        self.pool_device()?.ok_or_else(|| Error::PoolInactive {
            root: self.layout.root.clone(),
        })
    }

    /// With `on`, unmounts leave layer devices up and removals put thin ids
    /// in the trash; [`Pool::reclaim`] does that kernel work later. For a
    /// long-lived caller (a daemon) that can reclaim while idle.
    pub fn set_teardown_later(&mut self, on: bool) {
        self.teardown_later = on;
    }

    /// The filesystems [`Trim::Discard`] unmounts detached under
    /// `teardown_later`: each one's drop finishes its unmount (see
    /// [`crate::mounts::Detached`]). Drop them before their layers'
    /// thin ids are reclaimed: until then their devices stay open.
    pub fn take_detached(&mut self) -> Vec<crate::mounts::Detached> {
        std::mem::take(&mut self.detached)
    }

    pub(crate) fn interrupted_create_error(&self) -> Error {
        Error::InterruptedCreate {
            root: self.layout.root.clone(),
        }
    }
}
