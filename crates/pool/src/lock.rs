//! Serialises thinlayer processes on one root with `flock(2)` on
//! `ROOT/lock`: commands that change things take it exclusively, readers
//! share it. Without `wait`, a held lock fails at once with who to wait
//! for; with it, the command queues. The kernel drops the lock when the
//! process dies, so a crash never leaves the root locked.
//!
//! Every flock thinlayer takes goes through [`lock_file`]: the root's
//! ([`lock`]) and a server's own (`ROOT/snapshotter/lock`, one containerd
//! server per pool).
//!
//! Only root can reach a lock file: it is [`record::FILE_MODE`] under a
//! [`record::DIR_MODE`] root, so no other user can `flock` it forever and
//! hang every command (and the servers) behind it.

use std::{
    fs::{File, OpenOptions, Permissions},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    error::{Error, IoContext, Result},
    record,
};

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

/// A held flock on any lock file; released on drop.
pub type FileLock = RootLock;

/// Opens (creating if missing) the lock file at `path` for `flock`: mode
/// [`record::FILE_MODE`], never through a symlink; one an older version
/// left readable by others is made [`record::FILE_MODE`]. For every lock
/// thinlayer takes (`ROOT/lock`, `ROOT/snapshotter/lock`).
///
/// # Errors
/// I/O errors.
pub fn open_lock_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(record::FILE_MODE)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
        .ctx(|| format!("open lock file {}", path.display()))?;
    let mode = file
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .mode()
        & 0o7777;
    if mode != record::FILE_MODE {
        file.set_permissions(Permissions::from_mode(record::FILE_MODE))
            .ctx(|| format!("chmod {}", path.display()))?;
        // Quietly: `record::secure_root` says once what it tightened.
        tracing::debug!(
            "tightened {} from {mode:04o} to {:04o}: other users could lock it",
            path.display(),
            record::FILE_MODE
        );
    }
    Ok(file)
}

/// How long a caller that does not queue (`wait` false) still tries for
/// the root's lock: the servers hold it for one request or one step of
/// their idle work at a time (tens of milliseconds), and a `layer ls`
/// beside a busy dockerd should not fail for that.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the lock on `root` (which must exist); without `wait`, tries for
/// [`GRACE`] before giving up.
///
/// # Errors
/// [`Error::Locked`] when held all that time and `wait` is false; I/O
/// errors.
pub fn lock(root: &Path, mode: LockMode, wait: bool) -> Result<RootLock> {
    let path: PathBuf = root.join("lock");
    let deadline = std::time::Instant::now() + GRACE;
    loop {
        if let Some(l) = lock_file(&path, mode, wait)? {
            return Ok(l);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Locked {
                root: root.to_owned(),
                lock: path,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Takes a `flock` on the lock file at `path` ([`open_lock_file`]'s
/// rules): `None` when another holds it and `wait` is false (the caller
/// says who to wait for); with `wait`, queues until it is free.
///
/// # Errors
/// I/O errors.
pub fn lock_file(path: &Path, mode: LockMode, wait: bool) -> Result<Option<FileLock>> {
    let file = open_lock_file(path)?;
    let arg = match (mode, wait) {
        (LockMode::Exclusive, true) => FlockArg::LockExclusive,
        (LockMode::Exclusive, false) => FlockArg::LockExclusiveNonblock,
        (LockMode::Shared, true) => FlockArg::LockShared,
        (LockMode::Shared, false) => FlockArg::LockSharedNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(flock) => Ok(Some(RootLock { _flock: flock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
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
        // Any lock file: held is `None` without waiting.
        let p = d.join("other.lock");
        let held = lock_file(&p, LockMode::Exclusive, false).unwrap();
        assert!(held.is_some());
        assert!(lock_file(&p, LockMode::Shared, false).unwrap().is_none());
        drop(held);
        assert!(lock_file(&p, LockMode::Shared, false).unwrap().is_some());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn lock_files_are_owner_only_and_loose_ones_are_tightened() {
        let d = std::env::temp_dir().join(format!("thinlayer-lockmode-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("lock");
        drop(open_lock_file(&p).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&p), 0o600);
        std::fs::set_permissions(&p, Permissions::from_mode(0o666)).unwrap();
        drop(lock(&d, LockMode::Shared, false).unwrap());
        assert_eq!(mode(&p), 0o600, "an older version's 0666 lock is tightened");
        // Never through a symlink.
        let q = d.join("elsewhere");
        std::fs::write(&q, b"").unwrap();
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&q, &p).unwrap();
        assert!(
            open_lock_file(&p).is_err(),
            "a symlinked lock file is refused"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
