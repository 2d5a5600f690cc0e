//! The snapshot operations over the pool, synchronous: the server runs
//! them one at a time (a mutex) on a blocking thread.
//!
//! Every request opens the pool anew (`Pool::open` with `wait`): the
//! root's flock then serialises the server with `thinlayer` commands on the
//! same root (`layer ls` works while the server runs), and an open costs a
//! stat, a flock and one small record read.
//!
//! An active or view snapshot is mounted by the snapshotter itself at its
//! holder directory `ROOT/snapshotter/mnt/<layer>` (0700 parents: only root
//! traverses them), and Mounts hands containerd a bind mount of it; with
//! `--mounts device` or the label `thinlayer.io/mounts=device` (runtimes
//! that pass block devices into a VM) it hands out the thin device node
//! instead, as records from before bind mounts say too.
//!
//! Only what the answer needs runs inside a request; the rest is a
//! [`Job`] the server's worker runs after it ([`SnapshotOps::work`]), under
//! the same mutex: after Commit the holder's unmount, the measure and the
//! device's teardown; after Remove the unmount and the layer's removal;
//! spares (as [`Demand`] says) and the reclaim of removed layers' space
//! when idle. A request on a layer with queued jobs runs them first.
//!
//! Order of steps, so a crash leaves nothing the next start cannot settle:
//! Prepare makes the layer, then its record (a crash in between leaves a
//! `ctrd-*` layer without a record, which the next start removes, its
//! holder unmounted first); Commit is one record rewrite (the key becomes
//! the name, the layer stays; a committed snapshot whose holder is still
//! mounted or whose device is up is settled at start and Cleanup); Remove
//! removes the record, then (queued) the layer: a layer without a record is
//! removed at start and Cleanup, and a record whose layer is gone is
//! dropped.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use containerd_snapshots::{Info, Usage, api::types::Mount};
use thinlayer_pool::{
    FsType, LockMode, MountUse, Owner, Pool, Teardown, Trim, mounts::is_mountpoint,
    timing::ms_since,
};

use crate::{
    error::{Error, Result},
    filter::Filters,
    jobs::{InFlight, Job, Queue},
    keys::{KeyStore, Kind, LAYER_PREFIX, Snapshot, Snapshots},
    spares::Demand,
};

/// containerd's label asking for a snapshot of at most this many bytes.
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

/// The label choosing a snapshot's mounts: `device` hands out the thin
/// device node (for runtimes that pass it into a VM) instead of a bind.
pub const MOUNTS_LABEL: &str = "thinlayer.io/mounts";

/// The label containerd's unpacker puts on the Prepare of a layer it is
/// about to apply (the chain id it commits as): an image pull, not a
/// container start, so no demand for spares.
pub const UNPACK_LABEL: &str = "containerd.io/snapshot.ref";

/// Whether a Prepare of `key` with `labels` applies an image layer
/// (containerd's unpack: keys `NS/N/extract-NANOS-RAND CHAINID`, or the
/// [`UNPACK_LABEL`]) rather than starting a container.
pub fn is_unpack(key: &str, labels: &HashMap<String, String>) -> bool {
    let last = key.rsplit('/').next().unwrap_or_default();
    last.starts_with("extract-") || labels.contains_key(UNPACK_LABEL)
}

/// After a request, the reclaim of removed layers' space waits this long
/// for quiet (it discards, and holds the mutex while it does).
const RECLAIM_QUIET: Duration = Duration::from_secs(1);

/// Queued jobs wait until requests pause this long (or a request needs
/// their layer, or [`JOBS_MAX_WAITING`] wait): a teardown never shares the
/// kernel with the next request of a burst.
const JOBS_QUIET: Duration = Duration::from_millis(250);

/// The most jobs left waiting for a pause; past it they run between
/// requests (each holds a mount and a device until it runs).
const JOBS_MAX_WAITING: usize = 16;

/// What Mounts hands containerd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MountMode {
    /// A bind mount of the snapshot's filesystem, mounted by the
    /// snapshotter (runc-based runtimes).
    #[default]
    Bind,
    /// The thin device node, for containerd (or a VM runtime) to mount.
    Device,
}

/// How the server hands out mounts and keeps spares (the flags of
/// `thinlayer serve containerd`).
#[derive(Clone, Debug)]
pub struct Config {
    /// Mounts of snapshots without the [`MOUNTS_LABEL`] label.
    pub mounts: MountMode,
    /// The most spares kept over all parents (0: none).
    pub max_spares: usize,
    /// A parent without a Prepare for this long keeps no spare.
    pub spare_idle: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mounts: MountMode::Bind,
            max_spares: 8,
            spare_idle: Duration::from_secs(300),
        }
    }
}

/// What one call of [`SnapshotOps::work`] did.
#[derive(Debug)]
pub enum Step {
    /// Some work: call again.
    Worked,
    /// A job whose kernel work the caller runs without the mutex
    /// ([`Tail::run`]), then hands back ([`SnapshotOps::tail_done`]).
    Tail(Tail),
    /// A spare step, which the caller runs without the mutex
    /// ([`SpareStep::run`]), then hands back ([`SnapshotOps::spare_done`]).
    Spare(SpareStep),
    /// Nothing to do until `until` (or a request), if ever.
    Idle {
        /// When something falls due without a request.
        until: Option<Instant>,
    },
}

/// A Settle's kernel work, run outside the server's mutex: committed
/// snapshot `key`'s holder unmounted, its layer's device measured and torn
/// down. Its layer is [`InFlight`] until it has run.
#[derive(Debug)]
pub struct Tail {
    key: String,
    layer: String,
    teardown: Teardown,
    holder: PathBuf,
    in_flight: Arc<InFlight>,
}

/// One step towards `n` spares of committed layer `parent`, run outside
/// the server's mutex: requests that need no pool (Commit, Remove, Mounts
/// of a mounted holder, the reads) go on meanwhile, and one that needs
/// the pool waits for its lock as it would for the mutex.
#[derive(Debug)]
pub struct SpareStep {
    root: PathBuf,
    parent: String,
    n: usize,
    /// Mounted when Mounts hands out binds: taking one is then a move.
    mounted: bool,
    held: Arc<InFlight>,
}

/// What a [`SpareStep`] did, for [`SnapshotOps::spare_done`].
#[derive(Debug)]
pub struct SpareDone {
    parent: String,
    n: usize,
    /// How many spares the parent has now.
    kept: thinlayer_pool::Result<usize>,
    /// Of `ms`, the part under the pool's lock.
    locked_ms: f64,
    ms: f64,
}

impl SpareStep {
    /// Drops down to `n` spares at once, or makes one more under the
    /// pool's lock and mounts it after (held meanwhile, so no Prepare
    /// takes it half-mounted). Needs no mutex.
    pub fn run(self) -> SpareDone {
        let t = Instant::now();
        let parent = self.parent.as_str();
        let made = open_pool(&self.root, &self.held).and_then(|mut pool| {
            let has = pool.spares_of(Some(parent)).len();
            if has >= self.n {
                keep_spares(&mut pool, parent, self.n, self.mounted)?;
                return Ok((self.n, None));
            }
            if self.mounted {
                let mount = pool.provision_one_mount_later(parent)?;
                // Before the pool's lock goes: no Prepare may take it yet.
                self.held.begin(&mount.thin_id().to_string());
                return Ok((has + 1, Some(mount)));
            }
            keep_spares(&mut pool, parent, has + 1, false)?;
            Ok((has + 1, None))
        });
        let locked_ms = ms_since(t);
        let kept = made.map(|(step, mount)| {
            if let Some(mount) = mount {
                let thin_id = mount.thin_id();
                if let Err(e) = mount.run() {
                    tracing::debug!(job = "spares", %parent, thin_id, error = %e, "spare left unmounted (a Prepare that takes it mounts it)");
                }
                self.held.end(&thin_id.to_string());
            }
            step
        });
        SpareDone {
            parent: self.parent,
            n: self.n,
            kept,
            locked_ms,
            ms: ms_since(t),
        }
    }
}

/// What a [`Tail`] did, for [`SnapshotOps::tail_done`].
#[derive(Debug)]
pub struct TailDone {
    key: String,
    layer: String,
    mapped: thinlayer_pool::Result<Option<u64>>,
    ms: f64,
}

impl Tail {
    /// Runs the kernel work, then lets requests waiting for the layer go
    /// on. Needs no lock: nothing but the kernel is asked.
    pub fn run(self) -> TailDone {
        let t = Instant::now();
        let mapped = self.teardown.run();
        remove_holder_dir(&self.holder);
        self.in_flight.end(&self.layer);
        TailDone {
            key: self.key,
            layer: self.layer,
            mapped,
            ms: ms_since(t),
        }
    }
}

/// The snapshotter's state: the pool root, the key store and the server's
/// own lock on `ROOT/snapshotter/lock`.
#[derive(Debug)]
pub struct SnapshotOps {
    root: PathBuf,
    store: KeyStore,
    _lock: thinlayer_pool::lock::FileLock,
    /// The records directory was missing at open: layers without records
    /// are then kept (they may be snapshots whose records were lost).
    records_missing: bool,
    config: Config,
    /// `ROOT/snapshotter/mnt`, resolved: the holders' parent.
    holders: PathBuf,
    queue: Queue,
    demand: Demand,
    /// A removal put a thin id in the pool's trash since the last reclaim.
    reclaim_due: bool,
    last_request: Instant,
    /// Layers whose Settle's kernel work runs outside the mutex.
    in_flight: Arc<InFlight>,
    /// Spares being mounted outside the mutex, by thin id.
    held: Arc<InFlight>,
}

impl SnapshotOps {
    /// Opens the pool under `root` (which must be active), takes the
    /// snapshotter's lock (one server per pool), loads the key store and
    /// settles what a crash left: records whose layer is gone are dropped,
    /// `ctrd-*` layers without a record are removed.
    ///
    /// # Errors
    /// [`Error::AlreadyServing`], pool errors (no pool, inactive, not
    /// root), damaged records.
    pub fn open(root: &Path, config: Config) -> Result<SnapshotOps> {
        let mut pool = Pool::open(root, LockMode::Exclusive, true)?;
        pool.require_active()?;
        let dir = KeyStore::base_dir(root);
        // Without its records directory nothing says which layers are
        // orphans: then none is removed (see `reconcile`).
        let records_missing = !dir.exists();
        thinlayer_pool::record::create_dir(&dir)?;
        let lock_path = dir.join("lock");
        // 0600, never through a symlink: only root can hold it.
        let lock = thinlayer_pool::lock::lock_file(&lock_path, LockMode::Exclusive, false)?
            .ok_or_else(|| Error::AlreadyServing {
                root: root.to_owned(),
                lock: lock_path,
            })?;
        let holders = holders_dir(root)?;
        let now = Instant::now();
        let mut ops = SnapshotOps {
            root: root.to_owned(),
            store: KeyStore::load(root)?,
            _lock: lock,
            records_missing: false,
            // Mounted spares mount outside the lock, after the worker's
            // step: one more per busy parent, so a Prepare takes one
            // mounted earlier while the next one mounts.
            demand: Demand::new(
                config.max_spares,
                config.spare_idle,
                usize::from(config.mounts == MountMode::Bind),
            ),
            config,
            holders,
            queue: Queue::default(),
            reclaim_due: false,
            last_request: now,
            in_flight: Arc::default(),
            held: Arc::default(),
        };
        ops.records_missing = records_missing;
        ops.reconcile(&mut pool)?;
        // Spares a previous server left: kept one idle window.
        let ours: Vec<String> = ops.committed_layers();
        for p in &ours {
            ops.demand.adopt(p, pool.spares_of(Some(p)).len(), now);
        }
        Ok(ops)
    }

    /// The layers of committed snapshots.
    fn committed_layers(&self) -> Vec<String> {
        self.store
            .all()
            .filter(|s| s.kind == Kind::Committed)
            .map(|s| s.layer.clone())
            .collect()
    }

    /// `layer`'s holder directory.
    pub fn holder(&self, layer: &str) -> PathBuf {
        self.holders.join(layer)
    }

    /// `ROOT/snapshotter/mnt`, resolved.
    pub fn holders(&self) -> &Path {
        &self.holders
    }

    fn binds(&self, labels: &HashMap<String, String>) -> bool {
        binds(labels, self.config.mounts)
    }

    /// A request arrived: the idle work (reclaim) waits for quiet.
    pub fn note_request(&mut self) {
        self.last_request = Instant::now();
    }

    /// Unmounts `layer`'s holder if it is mounted (no trim: the caller
    /// removes or freezes the layer) and removes the directory; returns
    /// whether it was mounted.
    fn release_holder(&self, pool: &mut Pool, layer: &str) -> Result<bool> {
        let dir = self.holder(layer);
        let mounted = is_mountpoint(&dir)?;
        if mounted {
            pool.umount_with(&dir.to_string_lossy(), Trim::Skip)?;
        }
        remove_holder_dir(&dir);
        Ok(mounted)
    }

    fn pool(&self) -> Result<Pool> {
        Ok(open_pool(&self.root, &self.held)?)
    }

    /// Drops records without layers; removes our layers without records.
    fn reconcile(&mut self, pool: &mut Pool) -> Result<()> {
        let layers = pool.layer_records()?;
        let known: std::collections::HashSet<&str> = layers.iter().map(|l| l.id.as_str()).collect();
        let lost: Vec<String> = self
            .store
            .all()
            .filter(|s| !known.contains(s.layer.as_str()))
            .map(|s| s.key.clone())
            .collect();
        for key in lost {
            tracing::warn!(%key, "snapshot's layer is gone (interrupted remove): dropping its record");
            self.store.remove(&key)?;
        }
        let recorded: std::collections::HashSet<String> =
            self.store.all().map(|s| s.layer.clone()).collect();
        // Newest first: a child before its parent.
        for l in layers.iter().rev() {
            if l.id.starts_with(LAYER_PREFIX) {
                // Never hand out a number a layer of that name holds.
                self.store.saw_layer(&l.id);
            }
            // Only layers this snapshotter made (recorded, not guessed from
            // the name) are ever removed here.
            if l.owner != Owner::Snapshotter {
                continue;
            }
            if !recorded.contains(&l.id) && self.records_missing {
                tracing::warn!(layer = %l.id, "snapshotter layer without a record, and the records directory was missing: keeping it; restore the records directory, or list it with `thinlayer layer ls`");
            } else if !recorded.contains(&l.id) {
                tracing::warn!(layer = %l.id, "layer without a snapshot record (interrupted prepare or remove): removing it");
                let removed = self
                    .release_holder(pool, &l.id)
                    .and_then(|_| Ok(pool.remove_layer(&l.id)?));
                if let Err(e) = removed {
                    tracing::warn!(layer = %l.id, error = %e, "layer without a record stays; the next start or Cleanup tries again");
                }
            }
        }
        // Committed snapshots are never mounted: a holder or device left
        // by an interrupted settle goes.
        for layer in self.committed_layers() {
            let settled = self
                .release_holder(pool, &layer)
                .and_then(|_| Ok(pool.deactivate_layer(&layer)?));
            match settled {
                Ok(true) => tracing::info!(%layer, "committed snapshot's device torn down"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%layer, error = %e, "committed snapshot's device stays"),
            }
        }
        self.sweep_holders();
        Ok(())
    }

    /// Removes holder directories no bind snapshot needs and nothing
    /// mounts (left by a crash).
    fn sweep_holders(&self) {
        let Ok(dir) = std::fs::read_dir(&self.holders) else {
            return;
        };
        let live: std::collections::HashSet<String> = self
            .store
            .all()
            .filter(|s| s.kind != Kind::Committed)
            .map(|s| s.layer.clone())
            .collect();
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) && !is_mountpoint(&e.path()).unwrap_or(true) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }

    /// Prepare (`kind` Active) or View (`kind` View): a new thin snapshot
    /// of the parent's layer (or of the base device), active, with the
    /// mounts that give its filesystem.
    ///
    /// # Errors
    /// AlreadyExists, NotFound (parent), InvalidArgument (parent not
    /// committed, max-size above the pool's size), pool errors.
    pub fn create(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "a snapshot key must not be empty".into(),
            ));
        }
        if self.store.contains(key) {
            return Err(Error::AlreadyExists(key.to_owned()));
        }
        let parent_layer = if parent.is_empty() {
            None
        } else {
            let p = self.store.get(parent)?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent `{parent}` is a {} snapshot, not a committed one",
                    p.kind.name()
                )));
            }
            Some(p.layer.clone())
        };
        if let Some(pl) = &parent_layer {
            // Its filesystem unmounted and its device down first.
            self.settle_layer(pl);
        }
        let bind = self.binds(&labels);
        let unpack = is_unpack(key, &labels);
        // Phase times for the log line: where a Prepare's time goes.
        let t0 = Instant::now();
        let mut pool = self.pool()?;
        check_max_size(&labels, pool.record().base_size.0)?;
        let layer = self.store.new_layer_id(key);
        pool.create_layer_for(Owner::Snapshotter, &layer, parent_layer.as_deref())?;
        let layer_ms = ms_since(t0);
        // A crash here leaves our layer without a snapshot record: the next
        // start removes it (`reconcile`).
        thinlayer_pool::fault::point("snapshotter_prepare.after_layer");
        let mut expose_ms = 0.0;
        let made = self
            .expose(&mut pool, &layer, kind, bind, parent_layer.is_none())
            .and_then(|m| {
                expose_ms = ms_since(t0) - layer_ms;
                let now = SystemTime::now();
                let s = Snapshot {
                    key: key.to_owned(),
                    layer: layer.clone(),
                    kind,
                    parent: (!parent.is_empty()).then(|| parent.to_owned()),
                    labels: labels.into_iter().collect(),
                    created: now,
                    updated: now,
                    mapped_at_create: mapped_bytes(&mut pool, &layer).ok().flatten(),
                    own_bytes: None,
                    bind,
                };
                self.store.put(s, None)?;
                Ok(m)
            });
        if made.is_err() {
            let undone = self
                .release_holder(&mut pool, &layer)
                .and_then(|_| Ok(pool.remove_layer(&layer)?));
            if let Err(undo) = undone {
                tracing::error!(%layer, error = %undo, "undoing a failed prepare failed");
            }
        }
        let m = made?;
        if let Some(pl) = parent_layer.filter(|_| !unpack) {
            let ready = pool.spares_of(Some(&pl)).len();
            let live = self
                .store
                .children(parent)
                .iter()
                .filter(|c| self.store.get(c).is_ok_and(|c| c.kind != Kind::Committed))
                .count();
            self.demand.prepared(&pl, live, ready, Instant::now());
        }
        let ms = ms_since(t0);
        tracing::info!(%key, %layer, parent = %parent, kind = kind.name(), bind, layer_ms, expose_ms, record_ms = ms - layer_ms - expose_ms, "snapshot created");
        Ok(m)
    }

    /// Makes new layer `layer` usable as a `kind` snapshot and returns its
    /// mounts: mounted at its holder (`bind`) or its device up; a snapshot
    /// of the base device (`empty`) loses `lost+found` first.
    fn expose(
        &self,
        pool: &mut Pool,
        layer: &str,
        kind: Kind,
        bind: bool,
        empty: bool,
    ) -> Result<Vec<Mount>> {
        if !bind {
            if empty {
                self.empty_base(pool, layer)?;
            }
            return mounts_of(pool, layer, kind);
        }
        let dir = self.holder(layer);
        if empty && kind == Kind::Active {
            // The holder mount is the one the emptying needs.
            pool.mount_layer(layer, &dir, mount_use(kind))?;
            remove_lost_found(&dir)?;
        } else {
            if empty {
                self.empty_base(pool, layer)?;
            }
            pool.mount_layer(layer, &dir, mount_use(kind))?;
        }
        Ok(bind_mounts(&dir, kind))
    }

    /// containerd's snapshots without a parent start as an empty
    /// directory; the pool's base filesystem has ext4's `lost+found`, so it
    /// goes (e2fsck makes it again when it needs it).
    fn empty_base(&self, pool: &mut Pool, layer: &str) -> Result<()> {
        let dir = self.holder(layer);
        pool.mount_layer(layer, &dir, MountUse::Scratch)?;
        let removed = remove_lost_found(&dir);
        let unmounted = pool.umount(&dir.to_string_lossy());
        let _ = std::fs::remove_dir(&dir);
        removed?;
        unmounted?;
        Ok(())
    }

    /// The mounts of an active or view snapshot (its device activated).
    ///
    /// # Errors
    /// NotFound, FailedPrecondition (committed), pool errors.
    pub fn mounts(&mut self, key: &str) -> Result<Vec<Mount>> {
        let s = self.store.get(key)?.clone();
        if s.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot `{key}` is committed: only active and view snapshots have mounts"
            )));
        }
        let mut pool = self.pool()?;
        if s.bind {
            let dir = self.holder(&s.layer);
            pool.mount_layer(&s.layer, &dir, mount_use(s.kind))?;
            return Ok(bind_mounts(&dir, s.kind));
        }
        mounts_of(&mut pool, &s.layer, s.kind)
    }

    /// Commits active snapshot `key` as `name`: the same layer, now
    /// immutable. A device snapshot's own bytes are measured now; the
    /// holder's unmount (and a bind snapshot's measure) and the device's
    /// teardown are queued ([`Job::Settle`]).
    ///
    /// # Errors
    /// NotFound, AlreadyExists (name), FailedPrecondition (not active).
    pub fn commit(&mut self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<()> {
        let s = self.store.get(key)?.clone();
        if s.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot `{key}` is a {} snapshot: only active ones can be committed",
                s.kind.name()
            )));
        }
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "a snapshot name must not be empty".into(),
            ));
        }
        if self.store.contains(name) {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        // A bind snapshot's writes may still be in the page cache: it is
        // measured once its holder is unmounted.
        let own = if s.bind {
            None
        } else {
            let mut pool = self.pool()?;
            pool.activate_layer(&s.layer)?;
            let mapped = mapped_bytes(&mut pool, &s.layer)?.unwrap_or_default();
            Some(mapped.saturating_sub(s.mapped_at_create.unwrap_or_default()))
        };
        let now = SystemTime::now();
        let layer = s.layer.clone();
        let committed = Snapshot {
            key: name.to_owned(),
            kind: Kind::Committed,
            labels: labels.into_iter().collect(),
            created: now,
            updated: now,
            own_bytes: own,
            ..s
        };
        self.store.put(committed, Some(key))?;
        self.queue.push(Job::Settle {
            key: name.to_owned(),
            layer: layer.clone(),
        });
        tracing::info!(%key, %name, %layer, own_bytes = ?own, "snapshot committed");
        Ok(())
    }

    /// Removes snapshot `key`: its record now, its layer after the answer
    /// ([`Job::Remove`]).
    ///
    /// # Errors
    /// NotFound, FailedPrecondition (children).
    pub fn remove(&mut self, key: &str) -> Result<()> {
        let s = self.store.get(key)?.clone();
        let children = self.store.children(key);
        if !children.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "snapshot `{key}` has children ({}); remove them first",
                children.join(", ")
            )));
        }
        // The record goes now; a crash before the job leaves a layer
        // without a record, which the next start removes.
        self.store.remove(key)?;
        thinlayer_pool::fault::point("snapshotter_remove.after_record");
        if s.kind == Kind::Committed {
            self.demand.forget(&s.layer);
        }
        self.queue.push(Job::Remove {
            layer: s.layer.clone(),
        });
        tracing::info!(%key, layer = %s.layer, "snapshot removed");
        Ok(())
    }

    /// The info of snapshot `key`.
    ///
    /// # Errors
    /// NotFound.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(info_of(self.store.get(key)?))
    }

    /// Updates the labels of snapshot `info.name`: all of them when no
    /// field paths are given or `labels` is, else each `labels.KEY`
    /// (set, or deleted when `info` lacks it).
    ///
    /// # Errors
    /// NotFound, InvalidArgument (other field paths).
    pub fn update(&mut self, info: Info, paths: Option<Vec<String>>) -> Result<Info> {
        let mut s = self.store.get(&info.name)?.clone();
        let paths = paths.unwrap_or_default();
        if paths.is_empty() {
            s.labels = info.labels.into_iter().collect();
        } else {
            let mut labels = s.labels.clone();
            for p in &paths {
                if p == "labels" {
                    labels = info.labels.clone().into_iter().collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => labels.insert(k.to_owned(), v.clone()),
                        None => labels.remove(k),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update field `{p}` of snapshot `{}`: only labels are mutable",
                        s.key
                    )));
                }
            }
            s.labels = labels;
        }
        s.updated = SystemTime::now();
        let out = info_of(&s);
        self.store.put(s, None)?;
        Ok(out)
    }

    /// The snapshot's own bytes: for a committed snapshot, measured at
    /// commit; for an active or view one, now. Both are the thin device's
    /// mapped bytes from the kernel (thin status) less what it mapped when
    /// it was made (its parent's blocks); see README.
    ///
    /// # Errors
    /// NotFound, pool errors.
    pub fn usage(&mut self, key: &str) -> Result<Usage> {
        let layer = self.store.get(key)?.layer.clone();
        // A committed snapshot's measure may be queued.
        self.settle_layer(&layer);
        let s = self.store.get(key)?.clone();
        let own = match (s.kind, s.own_bytes) {
            (Kind::Committed, Some(b)) => b,
            _ => {
                let mut pool = self.pool()?;
                let was_active = mapped_bytes(&mut pool, &s.layer)?;
                let mapped = match was_active {
                    Some(m) => m,
                    None => {
                        pool.activate_layer(&s.layer)?;
                        let m = mapped_bytes(&mut pool, &s.layer)?.unwrap_or_default();
                        pool.deactivate_layer(&s.layer)?;
                        m
                    }
                };
                mapped.saturating_sub(s.mapped_at_create.unwrap_or_default())
            }
        };
        Ok(Usage {
            inodes: 0,
            size: i64::try_from(own).unwrap_or(i64::MAX),
        })
    }

    /// Every snapshot passing `filters`, ordered by key.
    ///
    /// # Errors
    /// InvalidArgument (bad filters).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        list_of(self.store.all(), filters)
    }

    /// The pool root these operations serve.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The readers' view of the snapshots: Stat and List answer from it
    /// without waiting for the engine (see [`crate::reads`]).
    pub fn snapshots(&self) -> Snapshots {
        self.store.snapshots()
    }

    /// Cleanup: runs every queued job, removes `ctrd-*` layers no record
    /// knows, settles committed snapshots still mounted or up, and gives
    /// removed snapshots' space back.
    ///
    /// # Errors
    /// Pool errors.
    pub fn cleanup(&mut self) -> Result<()> {
        self.in_flight.wait(None);
        self.held.wait(None);
        while let Some(job) = self.queue.pop() {
            self.run_job(job);
        }
        let mut pool = self.pool()?;
        self.reconcile(&mut pool)?;
        let r = pool.reclaim()?;
        self.reclaim_due = false;
        tracing::info!(thin_ids = r.thin_ids, "removed snapshots' space given back");
        Ok(())
    }

    /// Runs the queued jobs `layer` needs done before it is used (see
    /// [`Queue::take_through`]).
    fn settle_layer(&mut self, layer: &str) {
        // Its queued jobs run after a tail of its own: wait for that first.
        self.in_flight.wait(Some(layer));
        for job in self.queue.take_through(layer) {
            self.run_job(job);
        }
    }

    /// Whether jobs are queued (the worker's state, for tests and logs).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// One piece of the work left for after the answers: a queued job,
    /// oldest first, once requests have paused for [`JOBS_QUIET`] (or
    /// [`JOBS_MAX_WAITING`] wait); else a parent's spares as the demand
    /// says: at once for a parent with none left (a burst's next Prepare
    /// needs one), in a pause otherwise; else, once requests have paused
    /// for [`RECLAIM_QUIET`], the reclaim of removed layers' space. While
    /// `draining` (shutdown) only jobs run, at once.
    pub fn work(&mut self, now: Instant, draining: bool) -> Step {
        let jobs_at = self.last_request + JOBS_QUIET;
        let jobs_due = draining || now >= jobs_at || self.queue.len() >= JOBS_MAX_WAITING;
        if let Some(job) = jobs_due.then(|| self.queue.pop()).flatten() {
            if let Job::Settle { key, layer } = &job {
                match self.settle_tail(key, layer) {
                    Ok(t) => return Step::Tail(t),
                    Err(e) => {
                        tracing::warn!(job = "settle", %layer, error = %e, "job failed; the next start or Cleanup settles it")
                    }
                }
                return Step::Worked;
            }
            self.run_job(job);
            return Step::Worked;
        }
        if draining {
            return Step::Idle { until: None };
        }
        // A parent with no spare left gets one now (its next Prepare would
        // make a snapshot itself); topping up or dropping waits for a pause,
        // like the jobs.
        let spares = self.demand.due(now);
        let next = spares
            .iter()
            .find(|(p, n)| jobs_due || self.demand.urgent(p, *n));
        if let Some((parent, n)) = next {
            return self
                .spare_step(parent, *n)
                .map_or(Step::Worked, Step::Spare);
        }
        let quiet_at = self.last_request + RECLAIM_QUIET;
        if self.reclaim_due && now >= quiet_at {
            self.reclaim_due = false;
            let t = Instant::now();
            match self.pool().and_then(|mut p| Ok(p.reclaim()?)) {
                Ok(r) => tracing::debug!(
                    job = "reclaim",
                    thin_ids = r.thin_ids,
                    devices = r.devices,
                    ms = ms_since(t),
                    "job done"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "reclaim failed; Cleanup or `thinlayer pool reclaim` finishes it")
                }
            }
            return Step::Worked;
        }
        let reclaim_at = self.reclaim_due.then_some(quiet_at);
        let jobs_at = (!self.queue.is_empty() || !spares.is_empty()).then_some(jobs_at);
        let until = [self.demand.next_change(), reclaim_at, jobs_at]
            .into_iter()
            .flatten()
            .min();
        Step::Idle { until }
    }

    /// The next step towards `n` spares of committed layer `parent`, for
    /// the caller to run outside the mutex (one more spare per step: a
    /// request waits for at most one spare's making); `None` for a parent
    /// no longer committed, which is forgotten.
    fn spare_step(&mut self, parent: &str, n: usize) -> Option<SpareStep> {
        let committed = self
            .store
            .all()
            .any(|s| s.layer == parent && s.kind == Kind::Committed);
        if !committed {
            self.demand.forget(parent);
            return None;
        }
        Some(SpareStep {
            root: self.root.clone(),
            parent: parent.to_owned(),
            n,
            mounted: self.config.mounts == MountMode::Bind,
            held: self.held.clone(),
        })
    }

    /// Takes back what a [`SpareStep`] did: the parent's demand told how
    /// many spares it has, the outcome logged.
    pub fn spare_done(&mut self, done: SpareDone) {
        let SpareDone {
            parent,
            n,
            kept,
            locked_ms,
            ms,
        } = done;
        match kept {
            Ok(step) => {
                tracing::debug!(job = "spares", %parent, n, step, locked_ms, ms, "job done (outside the mutex)");
                self.demand.kept(&parent, step);
            }
            Err(e) => {
                tracing::debug!(job = "spares", %parent, n, ms, error = %e, "spares not kept");
                // A parent that cannot have spares now (active) is tried
                // again at its next Prepare, not in a loop.
                self.demand.kept(&parent, n);
            }
        }
    }

    /// Runs `job`, logging it with its duration; a failure is logged and
    /// left to the next start or Cleanup (which settle what a job would).
    fn run_job(&mut self, job: Job) {
        let t = Instant::now();
        let done = match &job {
            Job::Settle { key, layer } => self.settle(key, layer),
            Job::Remove { layer } => self.remove_layer(layer),
        };
        let ms = ms_since(t);
        match done {
            Ok(()) => tracing::debug!(job = job.name(), layer = job.layer(), ms, "job done"),
            Err(e) => {
                tracing::warn!(job = job.name(), layer = job.layer(), ms, error = %e, "job failed; the next start or Cleanup settles it")
            }
        }
    }

    /// A Settle's kernel work planned under the mutex, `layer` marked in
    /// flight until it has run.
    fn settle_tail(&mut self, key: &str, layer: &str) -> Result<Tail> {
        let pool = self.pool()?;
        let holder = self.holder(layer);
        let teardown = pool.teardown_of(layer, vec![holder.clone()])?;
        self.in_flight.begin(layer);
        Ok(Tail {
            key: key.to_owned(),
            layer: layer.to_owned(),
            teardown,
            holder,
            in_flight: self.in_flight.clone(),
        })
    }

    /// Takes back what a [`Tail`] did: the committed snapshot's own bytes
    /// recorded (if it still exists and had none), the outcome logged.
    pub fn tail_done(&mut self, done: TailDone) {
        let TailDone {
            key,
            layer,
            mapped,
            ms,
        } = done;
        let recorded = mapped
            .map_err(Error::from)
            .and_then(|mapped| self.record_own_bytes(&key, &layer, mapped));
        match recorded {
            Ok(()) => tracing::debug!(job = "settle", %layer, ms, "job done (outside the lock)"),
            Err(e) => {
                tracing::warn!(job = "settle", %layer, ms, error = %e, "job failed; the next start or Cleanup settles it")
            }
        }
    }

    /// After Commit: committed snapshot `key`'s holder unmounted, its own
    /// bytes measured if they are not yet, its device torn down (the
    /// path of a request that needs it now; the worker's is [`Tail`]).
    fn settle(&mut self, key: &str, layer: &str) -> Result<()> {
        let mut pool = self.pool()?;
        // The device stays up through the unmount for the measure.
        pool.set_teardown_later(true);
        self.release_holder(&mut pool, layer)?;
        if self.needs_own_bytes(key, layer) {
            let mapped = mapped_bytes(&mut pool, layer)?;
            self.record_own_bytes(key, layer, mapped)?;
        }
        pool.deactivate_layer(layer)?;
        Ok(())
    }

    /// Whether committed snapshot `key` (still on `layer`) has no measure
    /// of its own bytes yet.
    fn needs_own_bytes(&self, key: &str, layer: &str) -> bool {
        self.store
            .get(key)
            .is_ok_and(|s| s.layer == layer && s.own_bytes.is_none())
    }

    /// Records committed snapshot `key`'s own bytes from what its device
    /// maps now (`None`: not active, nothing to record), unless it has them
    /// or is gone.
    fn record_own_bytes(&mut self, key: &str, layer: &str, mapped: Option<u64>) -> Result<()> {
        let Some(mapped) = mapped.filter(|_| self.needs_own_bytes(key, layer)) else {
            return Ok(());
        };
        let mut s = self.store.get(key)?.clone();
        s.own_bytes = Some(mapped.saturating_sub(s.mapped_at_create.unwrap_or_default()));
        self.store.put(s, None)
    }

    /// After Remove: `layer`'s holder unmounted and the layer removed (to
    /// the pool's trash: the reclaim gives its space back).
    fn remove_layer(&mut self, layer: &str) -> Result<()> {
        let mut pool = self.pool()?;
        pool.set_teardown_later(true);
        self.release_holder(&mut pool, layer)?;
        match pool.remove_layer(layer) {
            Ok(()) | Err(thinlayer_pool::Error::UnknownLayer(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.reclaim_due = true;
        Ok(())
    }

    /// At shutdown: runs what is still queued (the worker has drained it
    /// unless it died), then tears down every snapshot's device that
    /// nothing mounts (Mounts activates again after a restart); holders of
    /// active and view snapshots stay mounted for their containers.
    pub fn shutdown(&mut self) {
        while let Some(job) = self.queue.pop() {
            self.run_job(job);
        }
        let mut pool = match self.pool() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the pool to tear down devices");
                return;
            }
        };
        for s in self.store.all() {
            match pool.deactivate_layer(&s.layer) {
                Ok(true) => tracing::debug!(layer = %s.layer, "device torn down"),
                Ok(false) => {}
                Err(e) => tracing::warn!(layer = %s.layer, error = %e, "device stays"),
            }
        }
        // Removed snapshots' space back now; spares stay listed, their
        // devices down (the next Prepare on their parent activates one).
        if let Err(e) = pool.reclaim().and_then(|_| pool.rest_spares()) {
            tracing::warn!(error = %e, "reclaim at shutdown failed; `thinlayer pool reclaim` finishes it");
        }
    }
}

/// The pool under `root`, opened again for one request or step, with the
/// spares being mounted outside the mutex (`held`) out of its reach.
fn open_pool(root: &Path, held: &InFlight) -> thinlayer_pool::Result<Pool> {
    let t = std::time::Instant::now();
    let mut pool = Pool::open_again(root)?;
    pool.hold_spares(held.held().iter().filter_map(|t| t.parse().ok()));
    tracing::debug!(ms = ms_since(t), "pool opened");
    Ok(pool)
}

/// Keeps `n` spares of `parent_layer`, `mounted` (their filesystems
/// mounted, for a server handing out binds: a Prepare that takes one has
/// its holder by a move of that mount) or not: the one call the worker
/// makes for spares.
///
/// # Errors
/// As `Pool::provision`.
pub fn keep_spares(
    pool: &mut Pool,
    parent_layer: &str,
    n: usize,
    mounted: bool,
) -> thinlayer_pool::Result<()> {
    let r = if mounted {
        pool.provision_mounted(Some(parent_layer), n)?
    } else {
        pool.provision(Some(parent_layer), n)?
    };
    tracing::debug!(
        parent = parent_layer,
        made = r.made,
        kept = r.kept,
        dropped = r.dropped,
        "spares"
    );
    Ok(())
}

/// Whether a snapshot with `labels` on a server handing out `mode` mounts
/// is mounted at its holder (Mounts returns a bind) or hands out its
/// device: the [`MOUNTS_LABEL`] label decides, else `mode`.
pub fn binds(labels: &HashMap<String, String>, mode: MountMode) -> bool {
    match labels.get(MOUNTS_LABEL).map(String::as_str) {
        Some("device") => false,
        Some("bind") => true,
        _ => mode == MountMode::Bind,
    }
}

/// How a `kind` snapshot is mounted at its holder.
fn mount_use(kind: Kind) -> MountUse {
    if kind == Kind::View {
        MountUse::ReadOnly
    } else {
        MountUse::Container
    }
}

/// The mounts of a snapshot mounted at holder `dir`: a recursive bind,
/// read-only for a view.
pub fn bind_mounts(dir: &Path, kind: Kind) -> Vec<Mount> {
    let rw = if kind == Kind::View { "ro" } else { "rw" };
    vec![Mount {
        r#type: "bind".to_owned(),
        source: dir.to_string_lossy().into_owned(),
        target: String::new(),
        options: vec!["rbind".to_owned(), rw.to_owned()],
    }]
}

/// `ROOT/snapshotter/mnt`, made 0700 (only root traverses it), resolved.
///
/// # Errors
/// I/O errors.
pub fn holders_dir(root: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = KeyStore::base_dir(root).join("mnt");
    thinlayer_pool::record::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("make {} root's only", dir.display()), e))?;
    std::fs::canonicalize(&dir).map_err(|e| Error::io(format!("resolve {}", dir.display()), e))
}

/// Removes holder directory `dir` once unmounted; one that will not go
/// is logged and left (the next start's sweep removes it).
fn remove_holder_dir(dir: &Path) {
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "holder directory stays"),
    }
}

/// Removes `dir/lost+found` if it is there.
fn remove_lost_found(dir: &Path) -> Result<()> {
    let lf = dir.join("lost+found");
    match std::fs::remove_dir(&lf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", lf.display()), e)),
    }
}

/// The mounts containerd gets for `layer`: its thin device node with the
/// pool's filesystem and options, read-only for a view.
fn mounts_of(pool: &mut Pool, layer: &str, kind: Kind) -> Result<Vec<Mount>> {
    let node = pool.activate_layer(layer)?;
    Ok(mounts_for(&node, pool.record().fs, kind))
}

/// The mounts of thin device `node` holding a `fs` filesystem.
pub fn mounts_for(node: &Path, fs: FsType, kind: Kind) -> Vec<Mount> {
    let mut options = vec![fs.mount_options().to_owned()];
    if kind == Kind::View {
        options.push("ro".into());
    }
    vec![Mount {
        r#type: fs.name().to_owned(),
        source: node.to_string_lossy().into_owned(),
        target: String::new(),
        options,
    }]
}

/// Every snapshot of `all` passing `filters`, ordered by key.
///
/// # Errors
/// InvalidArgument (bad filters).
pub fn list_of<'a>(
    all: impl Iterator<Item = &'a Snapshot>,
    filters: &[String],
) -> Result<Vec<Info>> {
    let f = Filters::parse(filters)?;
    let mut out: Vec<&Snapshot> = all.filter(|s| f.matches(s)).collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out.into_iter().map(info_of).collect())
}

/// Bytes `layer`'s thin device maps, if it is active.
fn mapped_bytes(pool: &mut Pool, layer: &str) -> Result<Option<u64>> {
    Ok(pool.layer_mapped_bytes(layer)?)
}

/// Refuses a max-size above what every thin device of the pool has.
fn check_max_size(labels: &HashMap<String, String>, base_size: u64) -> Result<()> {
    let Some(v) = labels.get(MAX_SIZE_LABEL) else {
        return Ok(());
    };
    let want: u64 = v.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!("label {MAX_SIZE_LABEL}={v}: not a number of bytes"))
    })?;
    if want > base_size {
        return Err(Error::InvalidArgument(format!(
            "label {MAX_SIZE_LABEL}={want}: this pool's snapshots are all {base_size} bytes \
             (`thinlayer pool create --base-size`); a larger one cannot be made"
        )));
    }
    Ok(())
}

/// containerd's view of a record.
pub fn info_of(s: &Snapshot) -> Info {
    Info {
        kind: match s.kind {
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: s.key.clone(),
        parent: s.parent.clone().unwrap_or_default(),
        labels: s.labels.clone().into_iter().collect(),
        created_at: s.created,
        updated_at: s.updated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mounts_label_overrides_the_servers_choice() {
        let l = |v: &str| HashMap::from([(MOUNTS_LABEL.to_owned(), v.to_owned())]);
        assert!(binds(&HashMap::new(), MountMode::Bind));
        assert!(!binds(&HashMap::new(), MountMode::Device));
        assert!(!binds(&l("device"), MountMode::Bind));
        assert!(binds(&l("bind"), MountMode::Device));
        assert!(binds(&l("other"), MountMode::Bind));
    }

    #[test]
    fn unpacks_are_told_from_container_starts() {
        let none = HashMap::new();
        assert!(is_unpack(
            "default/3/extract-114670870-R1IG sha256:af90",
            &none
        ));
        assert!(!is_unpack("default/7/k0", &none));
        assert!(!is_unpack("default/7/my-extract-x", &none));
        let l = HashMap::from([(UNPACK_LABEL.to_owned(), "sha256:af90".to_owned())]);
        assert!(is_unpack("k/1/x", &l));
    }

    #[test]
    fn bind_mounts_are_read_only_for_views() {
        let dir = Path::new("/r/snapshotter/mnt/ctrd-1-k");
        let m = bind_mounts(dir, Kind::Active);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshotter/mnt/ctrd-1-k");
        assert_eq!(m[0].options, ["rbind", "rw"]);
        assert_eq!(bind_mounts(dir, Kind::View)[0].options, ["rbind", "ro"]);
    }

    #[test]
    fn max_size_label() {
        let l = |v: &str| HashMap::from([(MAX_SIZE_LABEL.to_owned(), v.to_owned())]);
        check_max_size(&HashMap::new(), 1 << 20).unwrap();
        check_max_size(&l("1048576"), 1 << 20).unwrap();
        check_max_size(&l("4096"), 1 << 20).unwrap();
        assert!(matches!(
            check_max_size(&l("1048577"), 1 << 20),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            check_max_size(&l("10G"), 1 << 20),
            Err(Error::InvalidArgument(_))
        ));
    }
}
