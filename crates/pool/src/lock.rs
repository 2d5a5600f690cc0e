//! Serialises thinlayer processes on one root with `flock(2)` on
//! `ROOT/lock`: commands that change things take it exclusively, readers
//! share it. Without `wait`, a held lock fails at once with who to wait
//! for; with it, the command queues. The kernel drops the lock when the
//! process dies, so a crash never leaves the root locked.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};

/// Exclusive for changes, shared for reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Commands that change the pool, its layers or the records.
    Exclusive,
    /// Commands that only read.
    Shared,
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct RootLock {
    _flock: Flock<std::fs::File>,
}

/// Takes the lock on `root` (which must exist).
///
/// # Errors
/// [`Error::Locked`] when held and `wait` is false; I/O errors.
pub fn lock(root: &Path, mode: LockMode, wait: bool) -> Result<RootLock> {
    let path: PathBuf = root.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .ctx(|| format!("open lock file {}", path.display()))?;
    let arg = match (mode, wait) {
        (LockMode::Exclusive, true) => FlockArg::LockExclusive,
        (LockMode::Exclusive, false) => FlockArg::LockExclusiveNonblock,
        (LockMode::Shared, true) => FlockArg::LockShared,
        (LockMode::Shared, false) => FlockArg::LockSharedNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(flock) => Ok(RootLock { _flock: flock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Locked {
            root: root.to_owned(),
            lock: path,
        }),
        Err((_, e)) => Err(std::io::Error::from(e)).ctx(|| format!("lock {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let d = std::env::temp_dir().join(format!("thinlayer-lock-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let a = lock(&d, LockMode::Shared, false).unwrap();
        let b = lock(&d, LockMode::Shared, false).unwrap();
        let e = lock(&d, LockMode::Exclusive, false).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        assert!(e.to_string().contains("--wait"));
        drop((a, b));
        let x = lock(&d, LockMode::Exclusive, false).unwrap();
        assert!(lock(&d, LockMode::Shared, false).is_err());
        drop(x);
        std::fs::remove_dir_all(d).unwrap();
    }
}
