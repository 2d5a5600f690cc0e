//! Loop devices over the pool's sparse files, through `loopdev-3`.
//!
//! Every loop device is attached with autoclear: it detaches by itself when
//! its last user (the dm linear device over it) goes away, so neither a
//! teardown nor a crash can leak one. Attaching is idempotent: a file that
//! already has a loop device gets that one back.

use std::{
    fs,
    path::{Path, PathBuf},
};

use devicemapper::Device;
use loopdev::{LoopControl, LoopDevice};

use crate::error::{IoContext, Result};

/// A loop device attached to a backing file. Holding it holds the device
/// open: an autoclear loop detaches on its last close, so keep this alive
/// until a dm device has opened the loop device.
#[derive(Debug)]
pub struct Loop {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// Its device number.
    pub device: Device,
    handle: LoopDevice,
}

/// Returns the loop device backing `file`, attaching a new one (autoclear)
/// if it has none.
///
/// # Errors
/// I/O errors from the loop driver.
pub fn attach(file: &Path) -> Result<Loop> {
    match find(file)? {
        Some(found) => Ok(found),
        None => attach_new(file, false),
    }
}

/// Attaches `file` read-only to a loop device of its own, for the tools
/// that open with `O_DIRECT` (which tmpfs files refuse). The device goes
/// away when the returned handle is dropped.
///
/// # Errors
/// I/O errors from the loop driver.
pub fn attach_readonly(file: &Path) -> Result<Loop> {
    attach_new(file, true)
}

/// Attaches bytes `[offset, offset + len)` of `file` (a block device:
/// the metadata of a pool on devices, past its label) read-only to a loop
/// device of its own, for the thin-provisioning tools, which take no
/// offset. The device goes away when the returned handle is dropped.
///
/// # Errors
/// I/O errors from the loop driver.
pub fn attach_readonly_at(file: &Path, offset: u64, len: u64) -> Result<Loop> {
    attach_range(file, true, offset, len)
}

/// A new autoclear loop device over `file`.
fn attach_new(file: &Path, read_only: bool) -> Result<Loop> {
    attach_range(file, read_only, 0, 0)
}

/// A new autoclear loop device over `[offset, offset + len)` of `file`
/// (`len` 0: to its end).
fn attach_range(file: &Path, read_only: bool, offset: u64, len: u64) -> Result<Loop> {
    let control = LoopControl::open().ctx(|| "open /dev/loop-control".into())?;
    let ld = control
        .next_free()
        .ctx(|| "find a free loop device".into())?;
    ld.with()
        .autoclear(true)
        .read_only(read_only)
        .offset(offset)
        .size_limit(len)
        .attach(file)
        .ctx(|| {
            let how = if read_only { " read-only" } else { "" };
            format!("attach {}{how} to a loop device", file.display())
        })?;
    describe(ld)
}

/// The loop device whose backing file is `file`, if any.
///
/// # Errors
/// I/O errors reading sysfs.
pub fn find(file: &Path) -> Result<Option<Loop>> {
    let want = fs::canonicalize(file).ctx(|| format!("resolve {}", file.display()))?;
    let entries = match fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(_) => return Ok(None),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end()) == want {
            let ld =
                LoopDevice::open(format!("/dev/{name}")).ctx(|| format!("open /dev/{name}"))?;
            return describe(ld).map(Some);
        }
    }
    Ok(None)
}

fn describe(ld: LoopDevice) -> Result<Loop> {
    let path = ld.path().unwrap_or_default();
    let major = ld.major().ctx(|| format!("stat {}", path.display()))?;
    let minor = ld.minor().ctx(|| format!("stat {}", path.display()))?;
    Ok(Loop {
        path,
        device: Device { major, minor },
        handle: ld,
    })
}

/// Tells the loop driver that `file` grew, so its loop device shows the new
/// size (`LOOP_SET_CAPACITY`).
///
/// # Errors
/// I/O errors.
pub fn refresh_capacity(lp: &Loop) -> Result<()> {
    lp.handle
        .set_capacity()
        .ctx(|| format!("refresh the capacity of {}", lp.path.display()))
}
