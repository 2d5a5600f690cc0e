//! Filesystem calls relative to a directory's file descriptor, never
//! following a symlink: the primitives apply, diff and export are built on.
//!
//! Every name passed here is one path component (no `/`). Directories are
//! opened `O_DIRECTORY | O_NOFOLLOW`, other objects `O_PATH | O_NOFOLLOW`, so
//! a symlink put anywhere in a path by a concurrent process makes the call
//! fail (`ELOOP`/`ENOTDIR`) instead of leading out of the tree. An object
//! held as an `O_PATH` descriptor is reached again, when a call needs a path,
//! through `/proc/self/fd/N`: the kernel resolves that to the very inode the
//! descriptor holds, not to whatever now has its name.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use nix::{
    dir::Dir,
    errno::Errno,
    fcntl::{AT_FDCWD, AtFlags, OFlag, open, openat},
    sys::stat::{FileStat, Mode, SFlag, fstat, fstatat},
    unistd::{UnlinkatFlags, unlinkat},
};

/// Opens the directory `name` in `dir` without following a symlink.
pub(crate) fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the directory at `path` (the caller's root, trusted) for fd-relative
/// work below it.
pub(crate) fn open_root(path: &Path) -> nix::Result<OwnedFd> {
    open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// An `O_PATH` handle on `name` in `dir`, not following a symlink: it opens
/// nothing (no device is touched, no FIFO blocks) and pins the inode.
pub(crate) fn open_path(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens for reading the inode an `O_PATH` handle holds (`/proc/self/fd/N`
/// resolves to that inode, whatever now has its name).
pub(crate) fn reopen_read(handle: BorrowedFd<'_>) -> nix::Result<File> {
    let fd = open(
        &proc_fd(handle),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// `/proc/self/fd/N` for a descriptor.
pub(crate) fn proc_fd(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `/proc/self/fd/N/NAME`: `name` in the directory `dir` holds, for the
/// `l*` calls (lsetxattr, llistxattr) that have no fd-relative form. Only
/// the last component is looked up by name, and the `l*` calls never follow
/// it.
pub(crate) fn proc_child(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    proc_fd(dir).join(name)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<FileStat> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// `fstat`.
pub(crate) fn stat_fd(fd: impl AsFd) -> nix::Result<FileStat> {
    fstat(fd)
}

/// The file-type bits of a `st_mode`.
pub(crate) fn file_type(st_mode: u32) -> SFlag {
    SFlag::from_bits_truncate(st_mode & SFlag::S_IFMT.bits())
}

/// Whether two stats name the same object: device, inode and file type.
pub(crate) fn same_object(a: &FileStat, b: &FileStat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino && file_type(a.st_mode) == file_type(b.st_mode)
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    // `.` relative to the descriptor is the directory itself: no name lookup.
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(out)
}

/// Removes `name` from `dir`: a whole tree for a directory, each level
/// opened `O_DIRECTORY | O_NOFOLLOW` relative to its parent. A symlink is
/// removed, never followed. Errors name `shown` (the path for messages).
pub(crate) fn remove_tree(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
) -> Result<(), (&'static str, PathBuf, Errno)> {
    let st = stat_at(dir, name).map_err(|e| ("cannot stat", shown.to_path_buf(), e))?;
    if file_type(st.st_mode) == SFlag::S_IFDIR {
        let sub =
            open_dir(dir, name).map_err(|e| ("cannot open directory", shown.to_path_buf(), e))?;
        for child in list(sub.as_fd()).map_err(|e| ("cannot list", shown.to_path_buf(), e))? {
            remove_tree(sub.as_fd(), &child, &shown.join(&child))?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)
            .map_err(|e| ("cannot remove", shown.to_path_buf(), e))
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| ("cannot remove", shown.to_path_buf(), e))
    }
}

/// `chmod` of the inode an `O_PATH` handle holds (Linux has no
/// `fchmodat(AT_SYMLINK_NOFOLLOW)` before 6.6; this is how libc emulates it).
pub(crate) fn chmod_handle(handle: BorrowedFd<'_>, mode: u32) -> nix::Result<()> {
    nix::sys::stat::fchmodat(
        AT_FDCWD,
        &proc_fd(handle),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
}
