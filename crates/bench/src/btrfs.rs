//! The three btrfs ioctls the btrfs backend needs (subvolume create,
//! snapshot, destroy), so that no step pays for a `btrfs` process: the
//! comparison with in-process device-mapper calls stays fair.
//!
//! Structures mirror `include/uapi/linux/btrfs.h`.
#![allow(unsafe_code)]

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::error::{Error, IoContext, Result};

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
/// `BTRFS_PATH_NAME_MAX` + 1 (btrfs.h: `struct btrfs_ioctl_vol_args`).
const VOL_NAME: usize = 4088;
/// `BTRFS_SUBVOL_NAME_MAX` + 1 (btrfs.h: `struct btrfs_ioctl_vol_args_v2`).
const SUBVOL_NAME: usize = 4040;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; VOL_NAME],
}

/// `struct btrfs_ioctl_vol_args_v2`.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME],
}

const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);

nix::ioctl_write_ptr!(subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_write_ptr!(snap_create_v2, BTRFS_IOCTL_MAGIC, 23, VolArgsV2);

fn split(path: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let parent = path
        .parent()
        .ok_or_else(|| Error::Parse(format!("{} has no parent", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Parse(format!("{} has no name", path.display())))?;
    let bytes = name.as_encoded_bytes().to_vec();
    if bytes.len() >= SUBVOL_NAME {
        return Err(Error::Parse(format!("{} is too long", path.display())));
    }
    Ok((parent.to_path_buf(), bytes))
}

fn errno(r: nix::Result<i32>, what: impl FnOnce() -> String) -> Result<()> {
    r.map(|_| ()).map_err(std::io::Error::from).ctx(what)
}

/// The open parent directory of `path` and the ioctl arguments naming
/// `path`'s last component in it.
fn vol_args(path: &Path) -> Result<(fs::File, VolArgs)> {
    let (parent, name) = split(path)?;
    let dir = fs::File::open(&parent).ctx(|| format!("open {}", parent.display()))?;
    let mut args = VolArgs {
        fd: 0,
        name: [0; VOL_NAME],
    };
    args.name[..name.len()].copy_from_slice(&name);
    Ok((dir, args))
}

/// Creates an empty subvolume at `path`.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn create_subvolume(path: &Path) -> Result<()> {
    let (dir, args) = vol_args(path)?;
    // SAFETY: `args` is a live, fully initialised `btrfs_ioctl_vol_args` and
    // `dir` an open directory fd; the kernel only reads the struct.
    let r = unsafe { subvol_create(dir.as_raw_fd(), &args) };
    errno(r, || format!("create subvolume {}", path.display()))
}

/// Snapshots subvolume `from` (writable) at `to`.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn snapshot(from: &Path, to: &Path) -> Result<()> {
    let (parent, name) = split(to)?;
    let dir = fs::File::open(&parent).ctx(|| format!("open {}", parent.display()))?;
    let src = fs::File::open(from).ctx(|| format!("open {}", from.display()))?;
    let mut args = VolArgsV2 {
        fd: i64::from(src.as_raw_fd()),
        transid: 0,
        flags: 0,
        unused: [0; 4],
        name: [0; SUBVOL_NAME],
    };
    args.name[..name.len()].copy_from_slice(&name);
    // SAFETY: as above; `args.fd` is `src`, open for the whole call.
    let r = unsafe { snap_create_v2(dir.as_raw_fd(), &args) };
    errno(r, || {
        format!("snapshot {} at {}", from.display(), to.display())
    })
}

/// Deletes subvolume (or snapshot) `path` with its files.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn destroy(path: &Path) -> Result<()> {
    let (dir, args) = vol_args(path)?;
    // SAFETY: as in `create_subvolume`.
    let r = unsafe { snap_destroy(dir.as_raw_fd(), &args) };
    errno(r, || format!("delete subvolume {}", path.display()))
}
