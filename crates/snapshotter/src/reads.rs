//! The reads containerd makes most, answered without waiting for a write
//! in progress: a Prepare, Commit, Remove or Cleanup runs on the engine
//! (one at a time, under the pool root's exclusive lock, which an
//! `image import` may also hold for minutes), and must not stall them.
//!
//! - Stat and List read the key store's published index
//!   ([`Snapshots`]): each write updates its record on disk first, then the
//!   index, so a reader sees the state before or after a write, never half.
//! - Usage of a committed snapshot is in its record (once measured); of an
//!   active or view snapshot whose device is up, it is the kernel's thin
//!   status.
//! - Mounts of an active or view snapshot is a bind of its holder when the
//!   holder is mounted, or its device node when its device is up.
//!
//! The last two read the pool's records and the kernel without the root's
//! lock ([`thinlayer_pool::peek`]); when the device is down (activating it
//! is a change) or the look fails, the caller goes the locked way through
//! the engine.

use std::path::{Path, PathBuf};

use containerd_snapshots::{Info, Usage, api::types::Mount};
use thinlayer_pool::{mounts::is_mountpoint, peek::Peek};

use crate::{
    error::{Error, Result},
    keys::{Kind, Snapshot, Snapshots},
    ops::{bind_mounts, info_of, list_of, mounts_for},
};

/// Reads over a pool's snapshots that never take the engine or the lock.
#[derive(Clone, Debug)]
pub struct Reads {
    root: PathBuf,
    holders: PathBuf,
    snapshots: Snapshots,
}

impl Reads {
    /// Reads of the pool under `root`, whose holders are under `holders`,
    /// through the engine's published view.
    pub fn new(root: &Path, holders: &Path, snapshots: Snapshots) -> Reads {
        Reads {
            root: root.to_owned(),
            holders: holders.to_owned(),
            snapshots,
        }
    }

    /// The info of snapshot `key`.
    ///
    /// # Errors
    /// NotFound.
    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(info_of(&self.snapshots.get(key)?))
    }

    /// Every snapshot passing `filters`, ordered by key.
    ///
    /// # Errors
    /// InvalidArgument (bad filters).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        list_of(self.snapshots.current().values(), filters)
    }

    /// Snapshot `key`'s usage if it can be told without the lock; `None`
    /// when only the engine can (its device is down).
    ///
    /// # Errors
    /// NotFound.
    pub fn usage(&self, key: &str) -> Result<Option<Usage>> {
        let s = self.snapshots.get(key)?;
        match (s.kind, s.own_bytes) {
            (Kind::Committed, Some(own)) => return Ok(Some(usage_of(own))),
            // Measured by its queued settle: the engine runs it first.
            (Kind::Committed, None) => return Ok(None),
            _ => {}
        }
        Ok(self.peek(&s, |_, mapped, _| {
            mapped.map(|m| usage_of(m.saturating_sub(s.mapped_at_create.unwrap_or_default())))
        }))
    }

    /// Snapshot `key`'s mounts if its holder is mounted (a bind snapshot)
    /// or its device is up; `None` when only the engine can tell (it must
    /// mount or activate).
    ///
    /// # Errors
    /// NotFound, FailedPrecondition (committed).
    pub fn mounts(&self, key: &str) -> Result<Option<Vec<Mount>>> {
        let s = self.snapshots.get(key)?;
        if s.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot `{key}` is committed: only active and view snapshots have mounts"
            )));
        }
        if s.bind {
            let dir = self.holders.join(&s.layer);
            return Ok(is_mountpoint(&dir)
                .unwrap_or(false)
                .then(|| bind_mounts(&dir, s.kind)));
        }
        Ok(self.peek(&s, |node, _, fs| Some(mounts_for(node, fs, s.kind))))
    }

    /// Runs `f` on `s`'s active device (node, mapped bytes, filesystem);
    /// `None` when it is down or cannot be looked at without the lock.
    fn peek<T>(
        &self,
        s: &Snapshot,
        f: impl FnOnce(&Path, Option<u64>, thinlayer_pool::FsType) -> Option<T>,
    ) -> Option<T> {
        let looked = Peek::open(&self.root).and_then(|p| {
            let fs = p.record().fs;
            Ok(p.active_layer(&s.layer)?.map(|a| (a, fs)))
        });
        match looked {
            Ok(Some((a, fs))) => f(&a.devnode, a.mapped_bytes, fs),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(key = %s.key, layer = %s.layer, error = %e, "no lock-free answer; asking the engine");
                None
            }
        }
    }
}

fn usage_of(own: u64) -> Usage {
    Usage {
        inodes: 0,
        size: i64::try_from(own).unwrap_or(i64::MAX),
    }
}
