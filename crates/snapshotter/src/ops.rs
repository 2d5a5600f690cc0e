//! The snapshot operations over the pool, synchronous: the server runs
//! them one at a time (a mutex) on a blocking thread.
//!
//! Every request opens the pool anew (`Pool::open` with `wait`): the
//! root's flock then serialises the server with `thinlayer` commands on the
//! same root (`layer ls` works while the server runs), and an open costs a
//! stat, a flock and one small record read.
//!
//! Order of steps, so a crash leaves nothing the next start cannot settle:
//! Prepare makes the layer, then its record (a crash in between leaves a
//! `ctrd-*` layer without a record, which the next start removes); Commit
//! is one record rewrite (the key becomes the name, the layer stays);
//! Remove removes the layer, then the record (a record whose layer is gone
//! is dropped at start).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use containerd_snapshots::{Info, Usage, api::types::Mount};
use thinlayer_pool::{FsType, LockMode, Owner, Pool};

use crate::{
    error::{Error, Result},
    filter::Filters,
    keys::{KeyStore, Kind, LAYER_PREFIX, Snapshot, Snapshots},
};

/// containerd's label asking for a snapshot of at most this many bytes.
pub const MAX_SIZE_LABEL: &str = "containerd.io/snapshot/max-size";

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
    pub fn open(root: &Path) -> Result<SnapshotOps> {
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
        let mut ops = SnapshotOps {
            root: root.to_owned(),
            store: KeyStore::load(root)?,
            _lock: lock,
            records_missing: false,
        };
        ops.records_missing = records_missing;
        ops.reconcile(&mut pool)?;
        Ok(ops)
    }

    fn pool(&self) -> Result<Pool> {
        let t = std::time::Instant::now();
        let pool = Pool::open(&self.root, LockMode::Exclusive, true)?;
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1000.0, "pool opened");
        Ok(pool)
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
                tracing::warn!(layer = %l.id, "layer without a snapshot record (interrupted prepare): removing it");
                pool.remove_layer(&l.id)?;
            }
        }
        Ok(())
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
        let mut pool = self.pool()?;
        check_max_size(&labels, pool.record().base_size.0)?;
        let layer = self.store.new_layer_id(key);
        pool.create_layer_for(Owner::Snapshotter, &layer, parent_layer.as_deref())?;
        // A crash here leaves our layer without a snapshot record: the next
        // start removes it (`reconcile`).
        thinlayer_pool::fault::point("snapshotter_prepare.after_layer");
        let emptied = if parent_layer.is_none() {
            self.empty_base(&mut pool, &layer)
        } else {
            Ok(())
        };
        let made = emptied
            .and_then(|()| mounts_of(&mut pool, &layer, kind))
            .and_then(|m| {
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
                };
                self.store.put(s, None)?;
                Ok(m)
            });
        if made.is_err() {
            if let Err(undo) = pool.remove_layer(&layer) {
                tracing::error!(%layer, error = %undo, "undoing a failed prepare failed");
            }
        }
        let m = made?;
        tracing::info!(%key, %layer, parent = %parent, kind = kind.name(), "snapshot created");
        Ok(m)
    }

    /// containerd's snapshots without a parent start as an empty
    /// directory; the pool's base filesystem has ext4's `lost+found`, so it
    /// goes (e2fsck makes it again when it needs it).
    fn empty_base(&self, pool: &mut Pool, layer: &str) -> Result<()> {
        let dir = KeyStore::base_dir(&self.root).join("mnt").join(layer);
        pool.mount_layer(layer, &dir, thinlayer_pool::MountUse::Scratch)?;
        let lf = dir.join("lost+found");
        let removed = match std::fs::remove_dir(&lf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", lf.display()), e)),
        };
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
        mounts_of(&mut self.pool()?, &s.layer, s.kind)
    }

    /// Commits active snapshot `key` as `name`: the same layer, now
    /// immutable; its own bytes are measured and its device torn down.
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
        let mut pool = self.pool()?;
        pool.activate_layer(&s.layer)?;
        let mapped = mapped_bytes(&mut pool, &s.layer)?.unwrap_or_default();
        let own = mapped.saturating_sub(s.mapped_at_create.unwrap_or_default());
        if let Err(e) = pool.deactivate_layer(&s.layer) {
            tracing::warn!(layer = %s.layer, error = %e, "could not tear down a committed snapshot's device");
        }
        let now = SystemTime::now();
        let layer = s.layer.clone();
        let committed = Snapshot {
            key: name.to_owned(),
            kind: Kind::Committed,
            labels: labels.into_iter().collect(),
            created: now,
            updated: now,
            own_bytes: Some(own),
            ..s
        };
        self.store.put(committed, Some(key))?;
        tracing::info!(%key, %name, %layer, own_bytes = own, "snapshot committed");
        Ok(())
    }

    /// Removes snapshot `key` and its layer.
    ///
    /// # Errors
    /// NotFound, FailedPrecondition (children; mounted or busy device).
    pub fn remove(&mut self, key: &str) -> Result<()> {
        let s = self.store.get(key)?.clone();
        let children = self.store.children(key);
        if !children.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "snapshot `{key}` has children ({}); remove them first",
                children.join(", ")
            )));
        }
        // The record goes now; the discard and delete wait for Cleanup
        // (containerd's garbage collector calls it), off the request path.
        let mut pool = self.pool()?;
        pool.set_teardown_later(true);
        match pool.remove_layer(&s.layer) {
            Ok(()) | Err(thinlayer_pool::Error::UnknownLayer(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.remove(key)?;
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

    /// Cleanup: removes `ctrd-*` layers no record knows and tears down the
    /// devices of committed snapshots that nothing mounts.
    ///
    /// # Errors
    /// Pool errors.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut pool = self.pool()?;
        self.reconcile(&mut pool)?;
        for s in self.store.all().filter(|s| s.kind == Kind::Committed) {
            pool.deactivate_layer(&s.layer)?;
        }
        let r = pool.reclaim()?;
        tracing::info!(thin_ids = r.thin_ids, "removed snapshots' space given back");
        Ok(())
    }

    /// Keeps one spare (a snapshot provisioned ahead of demand) of
    /// committed snapshot `parent` once it is the parent of two snapshots
    /// (an image's top layer, not a layer being unpacked, which has one
    /// child), so the next Prepare on it writes only records and its device
    /// is up. Run after a Prepare; a parent that is gone or active (so may
    /// change) is skipped.
    pub fn provision_spare(&mut self, parent: &str) {
        let Ok(p) = self.store.get(parent).cloned() else {
            return;
        };
        if p.kind != Kind::Committed || self.store.children(parent).len() < 2 {
            return;
        }
        let t = std::time::Instant::now();
        match self
            .pool()
            .and_then(|mut pool| Ok(pool.provision(Some(&p.layer), 1)?))
        {
            Ok(r) => tracing::debug!(
                %parent,
                made = r.made,
                ms = t.elapsed().as_secs_f64() * 1000.0,
                "spare provisioned"
            ),
            Err(e) => tracing::debug!(%parent, error = %e, "no spare provisioned"),
        }
    }

    /// At shutdown: tears down every snapshot's device that nothing mounts
    /// (Mounts activates again after a restart).
    pub fn shutdown(&mut self) {
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
    Ok(pool
        .layers()?
        .into_iter()
        .find(|l| l.id == layer)
        .and_then(|l| l.mapped_bytes))
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
