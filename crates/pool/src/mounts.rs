//! Mounting thin devices, and finding where a device is mounted, by system
//! calls (no mount(8) processes). Mount state is never recorded: the
//! kernel's `/proc/self/mountinfo` is the truth, read when needed.

use std::path::{Path, PathBuf};

use devicemapper::Device;
use nix::mount::{MntFlags, MsFlags};

use crate::{
    error::{Error, IoContext, Result},
    fstype::FsType,
};

pub use crate::mountinfo::{MountEntry, all, parse_mountinfo};

/// Where `device` is mounted, innermost last.
///
/// # Errors
/// I/O errors reading mountinfo.
pub fn mountpoints_of(device: Device) -> Result<Vec<PathBuf>> {
    Ok(all()?
        .into_iter()
        .filter(|m| m.device == device)
        .map(|m| m.mountpoint)
        .collect())
}

/// The device of the filesystem mounted at `dir` when `dir` is a mount's
/// root (a bind's too), else `None` (also when `dir` is missing).
///
/// One `statx` (`STATX_ATTR_MOUNT_ROOT`, Linux 5.8): mountinfo grows with
/// every snapshot in use, and reading it is what made a start slower at
/// 1,000 snapshots than at 10. Older kernels get the mountinfo answer
/// (`dir` as mountinfo spells it, the top mount).
///
/// # Errors
/// I/O errors other than a missing `dir`.
pub fn mount_root(dir: &Path) -> Result<Option<Device>> {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags};
    let flags = AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT;
    let st = match rustix::fs::statx(CWD, dir, flags, StatxFlags::BASIC_STATS) {
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        r => r
            .map_err(std::io::Error::from)
            .ctx(|| format!("statx {}", dir.display()))?,
    };
    if !st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
        return Ok(all()?
            .into_iter()
            .rev()
            .find(|m| m.mountpoint == dir)
            .map(|m| m.device));
    }
    let root = st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
    Ok(root.then_some(Device {
        major: st.stx_dev_major,
        minor: st.stx_dev_minor,
    }))
}

/// Whether something is mounted at `dir` (see [`mount_root`]).
///
/// # Errors
/// As [`mount_root`].
pub fn is_mountpoint(dir: &Path) -> Result<bool> {
    Ok(mount_root(dir)?.is_some())
}

/// What a mount is for, which decides what it may do on the host.
///
/// Every mount thinlayer makes is `nodev`: device nodes in an image do not
/// open on the host (runtimes mount their own `/dev`). Only a container's
/// root (and a user's own mount) keeps setuid programs working (su, ping,
/// sudo need them inside the container, as on any root filesystem); it is
/// reachable only through the root's 0700 directory. Every mount the
/// engine makes for itself is also `nosuid`, and read-only when it only
/// reads, so a setuid binary or a file capability an image ships is never
/// root for anyone through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountUse {
    /// A container's root filesystem, a volume in it, or a user's mount
    /// (`thinlayer mount`): read-write, `nodev`.
    Container,
    /// A read-only mount a user asked for (`thinlayer mount --readonly`):
    /// `ro,nodev`.
    ReadOnly,
    /// The engine writes into it (a layer apply, an empty base):
    /// `nosuid,nodev`.
    Scratch,
    /// The engine reads it (diff, export, commit of a layer nothing else
    /// has active): `ro,nosuid,nodev`.
    ReadOnlyScratch,
    /// A frozen copy: a private snapshot of a live filesystem, read by the
    /// engine: `ro,nosuid,nodev`, and no journal replay (ext4 `noload`,
    /// XFS `norecovery`): the copy is read as the freeze left it and
    /// nothing is ever written to it.
    Frozen,
}

impl MountUse {
    /// Whether the mount is read-only.
    pub fn readonly(self) -> bool {
        matches!(
            self,
            MountUse::ReadOnly | MountUse::ReadOnlyScratch | MountUse::Frozen
        )
    }

    /// The mount flags.
    pub fn flags(self) -> MsFlags {
        let mut flags = MsFlags::MS_NODEV;
        if !matches!(self, MountUse::Container | MountUse::ReadOnly) {
            flags |= MsFlags::MS_NOSUID;
        }
        if self.readonly() {
            flags |= MsFlags::MS_RDONLY;
        }
        flags
    }

    /// The filesystem options for a device of `fs`: its own
    /// ([`FsType::mount_options`]), plus for a frozen copy the one that
    /// skips journal replay (ext4 `noload`, XFS `norecovery`; both need a
    /// read-only mount, which a frozen copy is).
    pub fn options(self, fs: FsType) -> String {
        let own = fs.mount_options();
        match (self, fs) {
            (MountUse::Frozen, FsType::Ext4) => format!("{own},noload"),
            (MountUse::Frozen, FsType::Xfs) => format!("{own},norecovery"),
            _ => own.to_owned(),
        }
    }
}

/// Mounts `devnode` (a filesystem of `fs`) at `dir` for `how`. `dir` may
/// be `/proc/self/fd/N` of a directory opened `O_PATH`: the mount then
/// lands on that very directory, wherever a rename moved it.
///
/// # Errors
/// [`Error::Io`] with the errno (`EBUSY`, `EINVAL` for a bad filesystem...).
pub fn mount(devnode: &Path, dir: &Path, fs: FsType, how: MountUse) -> Result<()> {
    let options = how.options(fs);
    let data = (!options.is_empty()).then_some(options.as_str());
    nix::mount::mount(Some(devnode), dir, Some(fs.name()), how.flags(), data)
        .map_err(std::io::Error::from)
        .ctx(|| {
            format!(
                "mount {} ({}, {:?}, {}) at {}",
                devnode.display(),
                fs.name(),
                how,
                if options.is_empty() {
                    "defaults"
                } else {
                    &options
                },
                dir.display()
            )
        })
}

/// Moves the mount at `from` (a real path) to `to` (a path, or
/// `/proc/self/fd/N`) with `MS_MOVE`: the filesystem stays mounted, only
/// where changes. The kernel refuses (`EINVAL`) when `from`'s parent
/// mount is shared, which is why spares live under a private mount.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn move_mount(from: &Path, to: &Path) -> Result<()> {
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(std::io::Error::from)
        .ctx(|| format!("move the mount at {} to {}", from.display(), to.display()))
}

/// Mounts a tmpfs only root can enter (`mode=0700`, `nosuid,nodev,noexec`)
/// at `dir` and makes it a private mount: mounts under it then propagate
/// nowhere and may be moved out of it (`MS_MOVE` refuses a mount whose
/// parent is shared, as `/` is under systemd).
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn mount_private_tmpfs(dir: &Path) -> Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some("mode=0700"))
        .and_then(|()| {
            nix::mount::mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )
        })
        .map_err(std::io::Error::from)
        .ctx(|| format!("mount a private tmpfs at {}", dir.display()))
}

/// Detaches the mount at `dir` (`MNT_DETACH`, `UMOUNT_NOFOLLOW`): gone
/// from the tree now, freed once nothing uses it. For thinlayer's own
/// directory mounts (the spares' tmpfs), never a layer's.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn detach(dir: &Path) -> Result<()> {
    nix::mount::umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
        .map_err(std::io::Error::from)
        .ctx(|| format!("detach {}", dir.display()))
}

/// Unmounts `dir` (a real path, as mountinfo shows it). `UMOUNT_NOFOLLOW`:
/// a symlink a container swapped in at the last component is not followed
/// to a mount elsewhere.
///
/// # Errors
/// [`Error::Busy`] when a process works inside it; other errors as I/O.
pub fn umount(dir: &Path) -> Result<()> {
    match nix::mount::umount2(dir, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(busy(dir)),
        Err(e) => Err(std::io::Error::from(e)).ctx(|| format!("unmount {}", dir.display())),
    }
}

/// The filesystem ioctl, wrapped by nix's macro.
#[allow(unsafe_code, missing_docs)]
mod ioctl {
    // EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32): XFS's XFS_IOC_GOINGDOWN,
    // which ext4 took over with the same number and flags.
    nix::ioctl_read!(shutdown, b'X', 125, u32);
}

/// `EXT4_GOING_FLAGS_NOLOGFLUSH` (XFS: `XFS_FSOP_GOING_FLAGS_NOLOGFLUSH`):
/// stop all writes now, without committing the journal first.
const SHUTDOWN_NOLOGFLUSH: u32 = 2;

/// A layer's filesystem taken out of the mount tree
/// ([`detach_discarding`]) and kept alive only by this handle. Dropping it
/// shuts the filesystem down (ext4 `EXT4_IOC_SHUTDOWN`, XFS
/// `XFS_IOC_GOINGDOWN`, both without a log flush) and closes the last
/// reference, so the kernel finishes the unmount writing neither dirty
/// data nor journal nor superblock, each of which would copy a pool block
/// shared with the parent only to be deleted. The kernel logs the
/// shutdown once per filesystem (ext4: "shut down requested (2)").
///
/// The drop is the slow half of the unmount (the shutdown records it in
/// the journal's superblock with a forced write, a pool commit), so a
/// daemon keeps these for its idle time; the device stays open until
/// then. A process that dies holding one leaves the kernel to finish the
/// unmount as a plain one (written back, then deleted with the layer).
#[derive(Debug)]
pub struct Detached {
    root: std::fs::File,
    dir: PathBuf,
}

impl Detached {
    /// The filesystem's root directory, open, for reading it before it
    /// goes (nothing may stay open once it is dropped: the device is
    /// removed next).
    pub fn root(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.root.as_fd()
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Err(e) = shutdown(&self.root) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "not shut down before unmount");
        }
        // `root` closes next: the last reference, so the kernel unmounts.
    }
}

/// Takes `dir`'s filesystem, which is deleted next, out of the mount tree
/// at once (`MNT_DETACH`) and returns the [`Detached`] handle whose drop
/// finishes the unmount without writing anything back. A filesystem this
/// namespace also mounts elsewhere (a bind of it) is not shut down: only
/// this mount goes, unmounted as usual, and `None` is returned.
///
/// # Errors
/// [`Error::Busy`] when a process works inside it, found before anything
/// is detached; other errors as I/O.
pub fn detach_discarding(dir: &Path) -> Result<Option<Detached>> {
    use nix::fcntl::OFlag;
    use std::os::unix::fs::OpenOptionsExt;
    // `MNT_EXPIRE` asks whether anything but the mount tree holds the
    // mount: `EAGAIN` (and an expiry mark a plain unmount ignores) when
    // nothing does, `EBUSY` when a process does.
    match nix::mount::umount2(dir, MntFlags::MNT_EXPIRE | MntFlags::UMOUNT_NOFOLLOW) {
        Err(nix::errno::Errno::EAGAIN) => {}
        Ok(()) => return Ok(None),
        Err(nix::errno::Errno::EBUSY) => return Err(busy(dir)),
        Err(e) => {
            return Err(std::io::Error::from(e)).ctx(|| format!("unmount {}", dir.display()));
        }
    }
    let Some(dev) = mount_root(dir)? else {
        return Ok(None);
    };
    // The filesystem mounted elsewhere too: only this mount goes, and the
    // filesystem stays whole for the others.
    if mountpoints_of(dev)?.iter().any(|p| p != dir) {
        umount(dir)?;
        return Ok(None);
    }
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(dir)
        .ctx(|| format!("open {}", dir.display()))?;
    let seen = rustix::fs::statx(
        &root,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::BASIC_STATS,
    )
    .map_err(std::io::Error::from)
    .ctx(|| format!("statx {}", dir.display()))?;
    let own = Device {
        major: seen.stx_dev_major,
        minor: seen.stx_dev_minor,
    };
    if own != dev {
        // Not the mount's own root (nothing should swap it): unmount as
        // usual rather than hold something else.
        drop(root);
        umount(dir)?;
        return Ok(None);
    }
    nix::mount::umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
        .map_err(std::io::Error::from)
        .ctx(|| format!("detach {}", dir.display()))?;
    Ok(Some(Detached {
        root,
        dir: dir.to_path_buf(),
    }))
}

/// Shuts the filesystem `root` is open on down without a log flush.
fn shutdown(root: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut flags = SHUTDOWN_NOLOGFLUSH;
    // SAFETY: `root` is open for the whole call and `flags` is the `__u32`
    // the kernel reads; it keeps no pointer.
    #[allow(unsafe_code)]
    let r = unsafe { ioctl::shutdown(root.as_raw_fd(), &mut flags) };
    r.map(|_| ()).map_err(std::io::Error::from)
}

fn busy(dir: &Path) -> Error {
    Error::Busy {
        what: dir.display().to_string(),
        detail: crate::holders::describe(
            &crate::holders::under_mount(dir),
            "a process has a file or its working directory under it; \
             `fuser -vm DIR` names it; stop it and retry",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_container_mounts_keep_setuid_and_only_readers_are_read_only() {
        let (ro, nosuid, nodev) = (MsFlags::MS_RDONLY, MsFlags::MS_NOSUID, MsFlags::MS_NODEV);
        assert_eq!(MountUse::Container.flags(), nodev);
        assert_eq!(MountUse::ReadOnly.flags(), ro | nodev);
        assert_eq!(MountUse::Scratch.flags(), nosuid | nodev);
        assert_eq!(MountUse::ReadOnlyScratch.flags(), ro | nosuid | nodev);
        assert_eq!(MountUse::Frozen.flags(), ro | nosuid | nodev);
        assert_eq!(
            MountUse::Frozen.options(FsType::Ext4),
            "noinit_itable,noload"
        );
        assert_eq!(MountUse::Frozen.options(FsType::Xfs), "nouuid,norecovery");
        assert_eq!(MountUse::ReadOnlyScratch.options(FsType::Xfs), "nouuid");
    }

    #[test]
    fn reads_this_hosts_mounts() {
        let all = all().unwrap();
        assert!(all.iter().any(|m| m.mountpoint == Path::new("/")));
    }

    #[test]
    fn mount_roots_agree_with_mountinfo() {
        // /proc is its own filesystem on every Linux host: statx names the
        // device mountinfo names for its top mount. A fresh directory is
        // no mount's root; a path that is not there neither.
        let top = |p: &str| {
            all()
                .unwrap()
                .into_iter()
                .rev()
                .find(|m| m.mountpoint == Path::new(p))
                .map(|m| m.device)
        };
        for p in ["/", "/proc"] {
            assert_eq!(mount_root(Path::new(p)).unwrap(), top(p), "{p}");
            assert!(is_mountpoint(Path::new(p)).unwrap(), "{p}");
        }
        let tmp = std::env::temp_dir().join(format!("tl-mr-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        assert_eq!(mount_root(&tmp).unwrap(), None);
        assert_eq!(mount_root(&tmp.join("absent")).unwrap(), None);
        std::fs::remove_dir(&tmp).unwrap();
    }
}
