//! Diff and ApplyDiff, streamed with no lock held: neither the plugin's
//! nor the pool root's.
//!
//! Docker commits a container by streaming its layer's `Diff` answer
//! straight into the new layer's `ApplyDiff` request (and calls `Create`
//! in between), so the plugin serves both at once. Each is done in three
//! steps:
//!
//! 1. **begin**, under the driver (the plugin's lock) and the pool root's
//!    lock: the request is checked, and what the stream needs is taken and
//!    recorded in the driver's in-flight table ([`Streams`]): for a Diff,
//!    a tree of the layer and one of its parent that nothing writes while
//!    the stream reads them (below); for an ApplyDiff, the layer itself
//!    mounted writable under `ROOT/graphdriver/stream/`.
//! 2. **run**, with no lock: the tar is written from, or applied to, those
//!    mounts only.
//! 3. **end**, under both locks again: the mounts go, the snapshots are
//!    removed, the in-flight entry is dropped; an apply that failed leaves
//!    the layer empty again, as Create made it.
//!
//! The trees a Diff reads, cheapest first:
//! - **the layer's own mount**, when Docker holds one reference to it and
//!   it is not an overlay: `docker commit` gets a stopped container's
//!   layer before its Diff, and nothing else holds it (a running
//!   container's layer has two references, its start's and the
//!   commit's). While the Diff reads it, a `put` keeps the mount (parked)
//!   and the settler leaves it. A `get` for a start of that container
//!   while its commit streams is the race Docker's own drivers have, which
//!   read the live tree every time: the walk then fails as changed, or
//!   reads files as they were being written;
//! - **the template's read-only mount**, for a parent that is an init
//!   layer sharing its template (see the parent module's notes);
//! - else **a private read-only snapshot**, mounted (`ro,nosuid,nodev`, no
//!   journal replay) under `ROOT/graphdriver/stream/`: a point in time of
//!   a layer something may write (a running container, paused by
//!   Docker's commit or not). A snapshot of an active layer flushes its
//!   filesystem and suspends its device, which is why it comes last.
//!
//! Whichever tree is read, the walk reads it from descriptors with
//! `O_NOFOLLOW` ([`thinlayer_image::export`]): a tree changed under it
//! fails the Diff, and never makes it read outside the tree.
//!
//! The snapshots are the driver's own layers (`docker-.stream-N`: no
//! Docker id starts with a dot) and the mounts live under the driver's own
//! directory, so nothing another process or request sweeps (the store's
//! scratch, frozen copies) is what a stream reads. A restarted plugin
//! removes what a crash left ([`ThinDriver::sweep_streams`]).
//!
//! What must never happen: a lock held while a body streams; a Diff
//! reading a layer something else may write while it reads (a second
//! reference, an overlay: then it reads a snapshot); a mount a Diff reads
//! unmounted under it; a Remove of a layer a stream reads or writes
//! (refused, saying so: the stream's snapshots are also its children); a
//! Get, a child, a Diff or a second ApplyDiff of a layer being applied
//! (refused: it is half-written).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use thinlayer_image::{Hashing, apply, export};
use thinlayer_pool::{MountUse, Owner, Trim};
use thinlayer_store::Store;

use super::{ID_PREFIX, TREE, ThinDriver, pool_id};
use crate::error::{Error, Result};

/// The Docker-id part of a stream snapshot's pool id: a dot first, which
/// no Docker layer id has.
const SNAPSHOT_PREFIX: &str = ".stream-";

/// The layers streams are using right now.
#[derive(Debug, Default)]
pub(super) struct Streams {
    /// Layers Diffs read (through their own snapshots), with how many.
    reading: BTreeMap<String, usize>,
    /// Layers ApplyDiffs write into.
    applying: BTreeSet<String>,
}

impl Streams {
    /// Refuses `action` on layer `id` while an ApplyDiff writes into it.
    pub(super) fn not_applying(&self, id: &str, action: &str) -> Result<()> {
        if self.applying.contains(id) {
            return Err(Error::Invalid(format!(
                "cannot {action} layer `{id}`: an ApplyDiff is streaming into it; retry when it \
                 has answered"
            )));
        }
        Ok(())
    }

    /// Whether a Diff reads layer `id` (or a tree of it) now.
    pub(super) fn reads(&self, id: &str) -> bool {
        self.reading.contains_key(id)
    }

    /// Refuses `action` on layer `id` while any stream uses it.
    pub(super) fn unused(&self, id: &str, action: &str) -> Result<()> {
        self.not_applying(id, action)?;
        if let Some(n) = self.reading.get(id) {
            return Err(Error::Invalid(format!(
                "cannot {action} layer `{id}`: {n} Diff(s) of it are streaming; retry when they \
                 have ended"
            )));
        }
        Ok(())
    }
}

/// One mount a stream made: the directory, and the snapshot mounted there
/// (none for an ApplyDiff's own layer).
#[derive(Debug)]
struct StreamMount {
    dir: PathBuf,
    snapshot: Option<String>,
}

/// A Diff in flight: what [`ThinDriver::begin_diff`] took.
#[derive(Debug)]
#[must_use = "a Diff holds snapshots and mounts until ThinDriver::end_diff"]
pub struct DiffStream {
    id: String,
    /// The layers it reads, counted in [`Streams`]: the layer, its parent,
    /// a template read for the parent.
    reads: Vec<String>,
    lower: PathBuf,
    upper: PathBuf,
    /// The parent's (if any), then the layer's.
    mounts: Vec<StreamMount>,
    /// An empty directory standing for a missing parent.
    empty: Option<PathBuf>,
}

impl DiffStream {
    /// Writes the layer's changes against its parent as a layer tar to
    /// `out`, hashed into the report's diff_id or not (Docker hashes the
    /// stream it reads itself); needs no lock.
    ///
    /// # Errors
    /// Read errors of the trees; write errors (the reader went away).
    pub fn run(&self, out: &mut dyn Write, hashing: Hashing) -> Result<export::ExportReport> {
        export::write_layer_with(&self.lower, &self.upper, out, hashing)
            .map_err(|e| Error::Store(thinlayer_store::Error::Image(e)))
    }
}

/// An ApplyDiff in flight: what [`ThinDriver::begin_apply`] took.
#[derive(Debug)]
#[must_use = "an ApplyDiff holds a mount until ThinDriver::end_apply"]
pub struct ApplyStream {
    id: String,
    parent: Option<String>,
    mount: StreamMount,
    tree: PathBuf,
    free_before: u64,
}

impl ApplyStream {
    /// Applies the layer tar `body` into the layer; needs no lock. The
    /// stream is not hashed: Docker hashes what it sends itself, and
    /// ApplyDiff answers a size only.
    ///
    /// # Errors
    /// A hostile or broken tar, read errors of `body`, a full pool.
    pub fn run(&self, body: &mut dyn Read) -> Result<apply::ApplyReport, thinlayer_image::Error> {
        let opts = apply::ApplyOptions {
            hashing: Hashing::Skip,
            ..apply::ApplyOptions::default()
        };
        apply::apply_layer(&self.tree, body, &opts)
    }
}

impl ThinDriver {
    /// Where streams mount what they use.
    fn stream_dir(&self) -> PathBuf {
        self.root.join("graphdriver").join("stream")
    }

    /// A fresh private directory for a stream's mount (0700 under 0700).
    fn new_stream_dir(&mut self, what: &str) -> Result<PathBuf> {
        let base = self.stream_dir();
        loop {
            self.stream_seq += 1;
            let dir = base.join(format!("{what}-{}", self.stream_seq));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(thinlayer_pool::Error::Io {
                        context: format!("create {}", dir.display()),
                        source: e,
                    }
                    .into());
                }
            }
        }
    }

    /// Takes a private read-only snapshot of layer `id`, mounted at a
    /// fresh directory.
    fn snapshot_mount(&mut self, store: &mut Store, id: &str) -> Result<StreamMount> {
        let snapshot = (0u64..)
            .map(|n| pool_id(&format!("{SNAPSHOT_PREFIX}{n}")))
            .find(|s| !store.pool().layout().layer_record(s).exists())
            .expect("some snapshot id is free: ids are unbounded");
        let dir = self.new_stream_dir("diff")?;
        let made = store
            .pool()
            .create_layer_for(Owner::Graphdriver, &snapshot, Some(&pool_id(id)));
        if let Err(e) = made {
            let _ = fs::remove_dir(&dir);
            return Err(e.into());
        }
        if let Err(e) = store.pool().mount_layer(&snapshot, &dir, MountUse::Frozen) {
            let _ = fs::remove_dir(&dir);
            return Err(match store.pool().remove_layer(&snapshot) {
                Ok(()) => e.into(),
                Err(undo) => thinlayer_pool::Error::Rollback {
                    error: Box::new(e),
                    undo: Box::new(undo),
                }
                .into(),
            });
        }
        Ok(StreamMount {
            dir,
            snapshot: Some(snapshot),
        })
    }

    /// Unmounts `m` and removes its snapshot and directory.
    fn release(store: &mut Store, m: &StreamMount) -> Result<()> {
        let target = m
            .snapshot
            .clone()
            .unwrap_or_else(|| m.dir.to_string_lossy().into_owned());
        store.pool().umount_with(&target, Trim::Skip)?;
        if let Some(s) = &m.snapshot {
            store.pool().remove_layer(s)?;
        }
        let _ = fs::remove_dir(&m.dir);
        Ok(())
    }

    /// Starts a Diff of layer `id` against `parent`: checks them and takes
    /// private snapshots of both (under the pool's lock, which is released
    /// again before this returns).
    ///
    /// # Errors
    /// An unknown or foreign layer, a wrong parent, a layer being applied;
    /// pool errors (nothing is left behind).
    pub fn begin_diff(&mut self, id: &str, parent: Option<&str>) -> Result<DiffStream> {
        self.finish_removals()?;
        self.streams.not_applying(id, "diff")?;
        if let Some(p) = parent {
            self.streams.not_applying(p, "diff against")?;
        }
        // A shared init layer's own Diff reads a device of its own.
        self.own_device(id)?;
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        let mut s = DiffStream {
            id: id.to_owned(),
            reads: std::iter::once(id)
                .chain(parent)
                .map(str::to_owned)
                .collect(),
            lower: PathBuf::new(),
            upper: PathBuf::new(),
            mounts: Vec::new(),
            empty: None,
        };
        let taken = (|| {
            s.lower = match parent {
                Some(p) => match self.template_tree(&mut store, p)? {
                    Some((tid, tree)) => {
                        s.reads.push(tid);
                        tree
                    }
                    None => self.snapshot_tree(&mut store, p, &mut s.mounts)?,
                },
                None => {
                    let d = self.new_stream_dir("empty")?;
                    s.empty = Some(d.clone());
                    d
                }
            };
            s.upper = match self.held_tree(id)? {
                Some(tree) => tree,
                None => self.snapshot_tree(&mut store, id, &mut s.mounts)?,
            };
            Ok(())
        })();
        if let Err(e) = taken {
            Self::release_diff(&mut store, &s);
            return Err(e);
        }
        for l in &s.reads {
            *self.streams.reading.entry(l.clone()).or_insert(0) += 1;
        }
        tracing::debug!(%id, lower = %s.lower.display(), upper = %s.upper.display(), "a Diff reads");
        Ok(s)
    }

    /// A private read-only snapshot of layer `id`, mounted (kept in
    /// `mounts` for the release); returns its tree.
    fn snapshot_tree(
        &mut self,
        store: &mut Store,
        id: &str,
        mounts: &mut Vec<StreamMount>,
    ) -> Result<PathBuf> {
        let m = self.snapshot_mount(store, id)?;
        let tree = tree_in(&m.dir, id);
        mounts.push(m);
        tree
    }

    /// Layer `id`'s tree at its own mount, when Docker holds exactly one
    /// reference to it and it is not an overlay (see the module's notes);
    /// `None` otherwise.
    fn held_tree(&self, id: &str) -> Result<Option<PathBuf>> {
        if self.refs.get(id) != Some(&1) || self.overlaid(id)? {
            return Ok(None);
        }
        let dir = self.mountpoint(id);
        if !thinlayer_pool::mounts::is_mountpoint(&dir)? {
            return Ok(None);
        }
        tree_in(&dir, id).map(Some)
    }

    /// Ends a Diff: its mounts go, its snapshots to the pool's trash (a
    /// failure is logged and left for the next start of the plugin). Their
    /// devices and thin ids go in the settler's pauses: a `docker commit`
    /// sends its Create right after the Diff, and tearing two snapshots
    /// down here made it wait about 300 ms for the lock in the VM.
    pub fn end_diff(&mut self, s: DiffStream) {
        for l in &s.reads {
            if let Some(n) = self.streams.reading.get_mut(l) {
                *n -= 1;
                if *n == 0 {
                    self.streams.reading.remove(l);
                }
            }
        }
        match self.store() {
            Ok(mut store) => {
                store.pool().set_teardown_later(true);
                Self::release_diff(&mut store, &s);
            }
            Err(e) => tracing::warn!(id = %s.id, error = %e,
                "cannot release a Diff's snapshots; the plugin's next start removes them"),
        }
    }

    fn release_diff(store: &mut Store, s: &DiffStream) {
        for m in s.mounts.iter().rev() {
            if let Err(e) = Self::release(store, m) {
                tracing::warn!(id = %s.id, dir = %m.dir.display(), error = %e,
                    "cannot release a Diff's snapshot; the plugin's next start removes it");
            }
        }
        if let Some(d) = &s.empty {
            let _ = fs::remove_dir(d);
        }
    }

    /// Starts an ApplyDiff into the (empty) layer `id` on `parent`: checks
    /// them and mounts the layer writable (under the pool's lock, released
    /// again before this returns).
    ///
    /// # Errors
    /// An unknown or foreign layer, a wrong parent, a layer mounted or used
    /// by a stream; pool errors (nothing is left behind).
    pub fn begin_apply(&mut self, id: &str, parent: Option<&str>) -> Result<ApplyStream> {
        self.finish_removals()?;
        self.streams.unused(id, "apply into")?;
        if let Some(p) = parent {
            self.streams.not_applying(p, "apply on")?;
        }
        self.own_device(id)?;
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        if self.refs.contains_key(id) {
            return Err(Error::Invalid(format!(
                "layer `{id}` is mounted (Get without Put): a layer is applied before anything uses it"
            )));
        }
        self.unpark(&mut store, id)?;
        let free_before = free_data_bytes(&mut store)?;
        let dir = self.new_stream_dir("apply")?;
        if let Err(e) = store
            .pool()
            .mount_layer(&pool_id(id), &dir, MountUse::Scratch)
        {
            let _ = fs::remove_dir(&dir);
            return Err(e.into());
        }
        let mount = StreamMount {
            dir,
            snapshot: None,
        };
        let tree = match tree_in(&mount.dir, id) {
            Ok(t) => t,
            Err(e) => {
                if let Err(undo) = Self::release(&mut store, &mount) {
                    tracing::warn!(%id, error = %undo, "cannot unmount a refused ApplyDiff's layer");
                }
                return Err(e);
            }
        };
        self.streams.applying.insert(id.to_owned());
        Ok(ApplyStream {
            id: id.to_owned(),
            parent: parent.map(str::to_owned),
            mount,
            tree,
            free_before,
        })
    }

    /// Ends an ApplyDiff whose stream gave `applied`: flushes and unmounts
    /// the layer; returns the bytes of file content it holds. A failed
    /// apply (or flush) makes the layer empty again, as Create left it.
    ///
    /// # Errors
    /// The apply's error (a full pool as [`thinlayer_store::Error::PoolFull`]),
    /// flush and unmount errors.
    pub fn end_apply(
        &mut self,
        a: ApplyStream,
        applied: Result<apply::ApplyReport, thinlayer_image::Error>,
    ) -> Result<u64> {
        self.streams.applying.remove(&a.id);
        let mut store = self.store()?;
        // The layer's device goes in the settler's pauses (see `put`).
        store.pool().set_teardown_later(true);
        self.idle.insert(a.id.clone());
        let synced = syncfs(&a.mount.dir);
        let full = pool_is_full(&mut store);
        let unmounted = Self::release(&mut store, &a.mount);
        let result: Result<u64> = if full.unwrap_or(false) {
            let written = match &applied {
                Ok(r) => r.bytes,
                Err(thinlayer_image::Error::NoSpace {
                    needed_bytes_hint, ..
                }) => *needed_bytes_hint,
                Err(_) => 0,
            };
            Err(thinlayer_store::Error::PoolFull {
                needed: written.max(a.free_before + 1),
                free: a.free_before,
            }
            .into())
        } else {
            applied
                .map(|r| r.bytes)
                .map_err(|e| thinlayer_store::Error::Image(e).into())
                .and_then(|bytes| synced.map(|()| bytes))
                .and_then(|bytes| unmounted.map(|()| bytes))
        };
        let Err(e) = result else {
            return result;
        };
        // No half-applied layer: it is made empty again, as Create left it.
        match self.remake_empty(&mut store, &a.id, a.parent.as_deref()) {
            Ok(()) => Err(e),
            Err(undo) => Err(Error::Invalid(format!(
                "{e}; making the layer empty again also failed: {undo}; let Docker remove \
                 it (it does after a failed ApplyDiff), or `thinlayer pool check` lists it"
            ))),
        }
    }

    /// Removes what streams a crash (of the plugin) left: the mounts under
    /// `ROOT/graphdriver/stream/` and the Diff snapshots. Run at start,
    /// before any stream exists.
    ///
    /// # Errors
    /// Pool errors listing the layers; mounts that cannot go are logged.
    pub(super) fn sweep_streams(&mut self, store: &mut Store) -> Result<()> {
        let base = self.stream_dir();
        record_dir(&base)?;
        let base_real = fs::canonicalize(&base).unwrap_or_else(|_| base.clone());
        for m in thinlayer_pool::mounts::all()? {
            if m.mountpoint.starts_with(&base_real) {
                if let Err(e) = store.pool().umount(&m.mountpoint.to_string_lossy()) {
                    tracing::warn!(dir = %m.mountpoint.display(), error = %e,
                        "a stream's mount a crash left could not be unmounted");
                }
            }
        }
        let left: Vec<String> = store
            .pool()
            .layer_records()?
            .into_iter()
            .filter(|l| l.owner == Owner::Graphdriver && is_stream_snapshot(&l.id))
            .map(|l| l.id)
            .collect();
        for s in left {
            store.pool().umount(&s)?;
            store.pool().remove_layer(&s)?;
            tracing::info!(layer = %s, "removed a Diff's snapshot a crash left");
        }
        if let Ok(entries) = fs::read_dir(&base) {
            for e in entries.flatten() {
                let _ = fs::remove_dir(e.path());
            }
        }
        Ok(())
    }
}

/// Whether pool layer `id` is a Diff's private snapshot, not a Docker
/// layer.
pub fn is_stream_snapshot(pool_layer: &str) -> bool {
    pool_layer
        .strip_prefix(ID_PREFIX)
        .is_some_and(|rest| rest.starts_with(SNAPSHOT_PREFIX))
}

fn record_dir(dir: &Path) -> Result<()> {
    Ok(thinlayer_pool::record::create_dir(dir)?)
}

/// `root/rootfs`, checked to be a real directory (never a symlink).
fn tree_in(root: &Path, id: &str) -> Result<PathBuf> {
    let dir = root.join(TREE);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.file_type().is_dir() => Ok(dir),
        _ => Err(Error::Invalid(format!(
            "layer `{id}` has no `{TREE}` directory: its filesystem was changed outside the \
             driver; remove it (docker rmi / docker rm) and pull or create it again"
        ))),
    }
}

/// Flushes the filesystem holding `dir` (`syncfs(2)`).
fn syncfs(dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| -> Error {
        thinlayer_pool::Error::Io {
            context: format!("flush the filesystem at {}", dir.display()),
            source: e,
        }
        .into()
    };
    let f = fs::File::open(dir).map_err(io)?;
    nix::unistd::syncfs(&f).map_err(|e| io(e.into()))
}

fn pool_is_full(store: &mut Store) -> Result<bool> {
    let st = store.pool().status()?;
    Ok(st
        .kernel
        .is_some_and(|k| k.data_used_blocks >= k.data_total_blocks))
}

fn free_data_bytes(store: &mut Store) -> Result<u64> {
    let st = store.pool().status()?;
    Ok(st.kernel.map_or(0, |k| {
        (k.data_total_blocks - k.data_used_blocks) * st.block_size_bytes
    }))
}
