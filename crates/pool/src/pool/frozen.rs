//! Frozen copies: what the engine reads of a layer that may be written
//! while it reads.
//!
//! A commit, diff or export of a running container must not walk its live
//! tree: a process in the container can swap a directory for a symlink to
//! the host between two steps of the walk. So the engine reads a private
//! thin snapshot instead: `create_snap` suspends the active origin, and a
//! device-mapper suspend freezes the filesystem on it first (the kernel
//! flushes its journal: ext4 clears `needs_recovery`, XFS quiesces its
//! log), so the snapshot holds a clean filesystem as of that instant, for
//! the cost of one pool message. Nothing in the container can reach it.
//!
//! Protocol: the snapshot is made through the pool's own create
//! transaction and recorded as a layer owned by [`Owner::Scratch`] under a
//! reserved id (`scratch-PID-N`); it is mounted read-only, `nosuid,nodev`,
//! without journal replay ([`MountUse::Frozen`]) at a directory the caller
//! keeps private (0700); [`Pool::release_frozen`] unmounts and removes it.
//! Mount options measured in the VM (Debian's 6.1 kernel): ext4
//! `ro,noload` and XFS `ro,nouuid,norecovery` (`nouuid`: the copy shares
//! its mounted origin's UUID) mount a copy of a running container's
//! filesystem (tests/vm_security.rs).
//! A crash between the two leaves a recorded scratch layer:
//! [`Pool::sweep_scratch`], run by the store's next exclusive open,
//! removes it.
//!
//! What must never happen: a frozen copy mounted writable, with setuid or
//! device nodes honoured, or outliving the next exclusive open.

use std::path::{Path, PathBuf};

use super::{Owner, Pool};
use crate::{
    error::{Error, Result},
    mounts::MountUse,
    names::Role,
};

/// A frozen copy of a layer, mounted; give it back with
/// [`Pool::release_frozen`].
#[derive(Debug)]
#[must_use = "a frozen copy holds a thin device and a mount until released"]
pub struct Frozen {
    layer: String,
    dir: PathBuf,
}

impl Frozen {
    /// Where the copy is mounted (read-only).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The scratch layer holding the copy.
    pub fn layer(&self) -> &str {
        &self.layer
    }
}

impl Pool {
    /// Whether layer `id`'s thin device is active, so it may be written
    /// right now (mounted by a container, or handed to a runtime).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], kernel errors.
    pub fn layer_is_active(&mut self, id: &str) -> Result<bool> {
        let layer = self.layer(id)?;
        if self.pool_device()?.is_none() {
            return Ok(false);
        }
        let name = self.name(Role::Thin(layer.thin_id));
        Ok(self.kernel()?.device(&name)?.is_some())
    }

    /// Makes a frozen copy of layer `id`: a thin snapshot (its filesystem
    /// frozen by the origin's suspend when it is active), recorded as an
    /// [`Owner::Scratch`] layer and mounted read-only, `nosuid,nodev`,
    /// without journal replay, at `dir` (created 0700 if missing; the
    /// caller keeps it where only root can reach it).
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::NoSpace`] (a snapshot needs
    /// metadata space), kernel and mount errors; a failed mount removes the
    /// snapshot again.
    pub fn freeze_layer(&mut self, id: &str, dir: &Path) -> Result<Frozen> {
        self.layer(id)?;
        let pid = std::process::id();
        let scratch = (0u32..)
            .map(|n| format!("scratch-{pid}-{n}"))
            .find(|s| !self.layout().layer_record(s).exists())
            .expect("some scratch id is free: ids are unbounded");
        self.create_layer_for(Owner::Scratch, &scratch, Some(id))?;
        if let Err(e) = self.mount_layer(&scratch, dir, MountUse::Frozen) {
            return Err(match self.remove_layer(&scratch) {
                Ok(()) => e,
                Err(undo) => Error::Rollback {
                    error: Box::new(e),
                    undo: Box::new(undo),
                },
            });
        }
        Ok(Frozen {
            layer: scratch,
            dir: dir.to_path_buf(),
        })
    }

    /// Unmounts and removes frozen copy `f`.
    ///
    /// # Errors
    /// [`Error::Busy`] (a process works under its mount), kernel and
    /// record errors; what is left is a scratch layer the next
    /// [`Pool::sweep_scratch`] removes.
    pub fn release_frozen(&mut self, f: Frozen) -> Result<()> {
        self.umount(&f.layer)?;
        self.remove_layer(&f.layer)
    }

    /// Removes every scratch layer (frozen copies a crash left behind),
    /// unmounting it first; returns their ids. Only for a handle that
    /// holds the root's exclusive lock and has no frozen copy of its own
    /// out. A scratch layer that cannot be removed now is logged and left
    /// for the next sweep.
    ///
    /// # Errors
    /// Record and kernel errors listing the layers.
    pub fn sweep_scratch(&mut self) -> Result<Vec<String>> {
        let leftovers: Vec<String> = self
            .layer_records()?
            .into_iter()
            .filter(|l| l.owner == Owner::Scratch)
            .map(|l| l.id)
            .collect();
        if leftovers.is_empty() || self.pool_device()?.is_none() {
            return Ok(Vec::new());
        }
        let mut swept = Vec::new();
        for id in leftovers {
            match self.umount(&id).and_then(|_| self.remove_layer(&id)) {
                Ok(()) => {
                    tracing::info!(layer = %id, "removed a frozen copy a crash left behind");
                    swept.push(id);
                }
                Err(e) => tracing::warn!(
                    layer = %id,
                    error = %e,
                    "a frozen copy a crash left behind could not be removed yet; \
                     the next exclusive open tries again"
                ),
            }
        }
        Ok(swept)
    }
}
