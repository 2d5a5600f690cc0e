//! Space: giving blocks back, growing the pool online, growing it by
//! itself, and saying so when it is full.
//!
//! - **Back on remove.** Deleting a thin id frees its blocks in the pool's
//!   metadata, but the sparse data file keeps them allocated on the host.
//!   So before the `delete` message the layer's whole device is discarded
//!   (`BLKDISCARD`): dm-thin unmaps every block the layer alone holds and,
//!   with discard passdown (the pool's default), the loop device punches
//!   the same ranges out of `data.img`. Blocks still shared with a parent
//!   are unmapped for this device only and stay on the host.
//! - **Back on unmount.** `umount` runs `FITRIM` on the filesystem first, so
//!   the space of files deleted inside a layer goes back the same way, in
//!   one batch, rather than with the `discard` mount option, which issues a
//!   discard (and a dm-thin metadata update) for every freed extent on
//!   the write path.
//! - **Extend.** File (`set_len`) -> loop capacity -> linear device reload
//!   -> pool table reload -> record. Kernel first, record second; the data
//!   file grows before anything else, so a crash after the kernel step and
//!   before the record is told by a data file longer than the record
//!   ([`crate::Pool::reconcile_sizes`] adopts it).
//! - **Watch.** An autoextend policy like LVM's
//!   `thin_pool_autoextend_threshold`/`_percent`: it sleeps on the kernel's
//!   dm events (the pool raises one at its low-water mark and when it runs
//!   out of space), with a slow timer as a fallback, and holds the root's
//!   lock only while it reads usage or extends.
//! - **The host.** The data file is sparse: the host filesystem must still
//!   hold what the pool has not written yet. The metadata file is fully
//!   allocated (`fallocate`) at create and extend, so a full host never
//!   fails a metadata write (which would make the pool read-only or
//!   `needs_check`); a full host fails only data writes, with EIO in the
//!   layer. [`HostSpace`] (in `pool status` and `pool check`) compares the
//!   host's free space with the data file's remaining growth and warns
//!   when it cannot hold it; `pool watch` never grows the data file past
//!   what the host holds; [`crate::Pool::require_host_space`] lets a caller
//!   refuse work up front; [`sweep_scratch`] clears scratch a crash left.
//!   `pool extend` measures from the live devices, never the record alone,
//!   so an extend whose record was lost cannot shrink a device under the
//!   live pool.
//!
//! What must never happen: the pool shrunk (its metadata maps blocks up to
//! the old end); a record larger than the kernel's table for a live pool.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    str::FromStr,
};

use nix::errno::Errno;
use serde::Serialize;

use crate::{
    error::{Error, IoContext, Result},
    loopback,
    units::Bytes,
};

/// The two ioctls, wrapped by nix's macros.
#[allow(unsafe_code, missing_docs)]
mod ioctl {
    /// `struct fstrim_range` of `<linux/fs.h>`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct FstrimRange {
        pub start: u64,
        pub len: u64,
        pub minlen: u64,
    }
    // BLKDISCARD = _IO(0x12, 119), argument `uint64_t[2]` {start, length}
    // (`<linux/fs.h>`; "bad": the size is not encoded in the number).
    nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);
    // FITRIM = _IOWR('X', 121, struct fstrim_range).
    nix::ioctl_readwrite!(fitrim, b'X', 121, FstrimRange);
}

/// Discards bytes `[0, len)` of the block device at `node` (`BLKDISCARD`).
///
/// # Errors
/// I/O errors; `EOPNOTSUPP` when the device takes no discards.
pub fn discard_device(node: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(node)
        .ctx(|| format!("open {} to discard it", node.display()))?;
    let range = [0u64, len];
    // SAFETY: `f` is an open block device for the whole call, and `range`
    // is the `uint64_t[2]` BLKDISCARD reads; the kernel does not keep it.
    #[allow(unsafe_code)]
    let r = unsafe { ioctl::blk_discard(f.as_raw_fd(), &range) };
    r.map(|_| ())
        .map_err(std::io::Error::from)
        .ctx(|| format!("discard {} bytes of {}", len, node.display()))
}

/// Commits the filesystem mounted at `dir` (`syncfs`: extents freed in an
/// open journal transaction are not free to trim yet), then runs `FITRIM`
/// on it; returns the bytes the filesystem reports trimmed.
///
/// # Errors
/// I/O errors (`EROFS` on a read-only mount, `EOPNOTSUPP` without discard).
pub fn fitrim(dir: &Path) -> Result<u64> {
    let f = std::fs::File::open(dir).ctx(|| format!("open {}", dir.display()))?;
    nix::unistd::syncfs(&f)
        .map_err(std::io::Error::from)
        .ctx(|| format!("sync the filesystem at {}", dir.display()))?;
    let mut range = ioctl::FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: `f` is open for the whole call and `range` is a live
    // `struct fstrim_range` the kernel reads and writes back.
    #[allow(unsafe_code)]
    let r = unsafe { ioctl::fitrim(f.as_raw_fd(), &mut range) };
    r.map_err(std::io::Error::from)
        .ctx(|| format!("trim the filesystem at {}", dir.display()))?;
    Ok(range.len)
}

/// Trims the filesystem at `dir` before it is unmounted. Best effort: a
/// read-only or damaged filesystem is logged and skipped, never blocks the
/// unmount.
pub(crate) fn trim_before_umount(dir: &Path) {
    match fitrim(dir) {
        Ok(bytes) => tracing::info!(dir = %dir.display(), bytes, "trimmed before unmount"),
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(Errno::EROFS as i32) => {
            tracing::debug!(dir = %dir.display(), "read-only: no trim before unmount");
        }
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "no trim before unmount"),
    }
}

/// A requested size: `+N` grows by N, `N` grows to N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeChange {
    /// Grow by this much.
    Add(Bytes),
    /// Grow to this size.
    To(Bytes),
}

impl SizeChange {
    pub(crate) fn apply(self, old: Bytes) -> Bytes {
        match self {
            SizeChange::Add(n) => Bytes(old.0.saturating_add(n.0)),
            SizeChange::To(n) => n,
        }
    }
}

impl FromStr for SizeChange {
    type Err = Error;
    fn from_str(s: &str) -> Result<SizeChange> {
        match s.strip_prefix('+') {
            Some(rest) => rest.parse().map(SizeChange::Add),
            None => s.parse().map(SizeChange::To),
        }
    }
}

/// What `pool extend` was asked for; at least one is set.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtendRequest {
    /// The data file's new size.
    pub data: Option<SizeChange>,
    /// The metadata file's new size.
    pub metadata: Option<SizeChange>,
}

/// What `pool extend` did: old and new sizes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ExtendReport {
    /// Data size before.
    pub old_data_size: Bytes,
    /// Data size after.
    pub new_data_size: Bytes,
    /// Metadata size before.
    pub old_metadata_size: Bytes,
    /// Metadata size after.
    pub new_metadata_size: Bytes,
    /// Whether the pool was active (extended online).
    pub online: bool,
}

impl ExtendReport {
    /// Whether anything grew.
    pub fn changed(&self) -> bool {
        self.old_data_size != self.new_data_size || self.old_metadata_size != self.new_metadata_size
    }
}

pub(crate) fn refuse_shrink(what: &str, old: Bytes, new: Bytes) -> Result<()> {
    if new < old {
        return Err(Error::InvalidSize {
            input: new.to_string(),
            reason: format!(
                "the {what} is {old} and a pool cannot shrink; give a larger size, or `+SIZE` to grow by SIZE"
            ),
        });
    }
    Ok(())
}

/// Grows `file` to `size` (allocating the new bytes on the host with
/// `allocate`), then its loop device (if attached) to match.
pub(crate) fn grow_file(
    file: &Path,
    size: Bytes,
    allocate: bool,
) -> Result<Option<loopback::Loop>> {
    let f = OpenOptions::new()
        .write(true)
        .open(file)
        .ctx(|| format!("open {}", file.display()))?;
    let len = f
        .metadata()
        .ctx(|| format!("stat {}", file.display()))?
        .len();
    if allocate {
        // The whole file, not only the new end: a metadata file an older
        // version left sparse is allocated by its first extend.
        allocate_file(&f, file, Bytes(len.max(size.0)))?;
    } else if len < size.0 {
        f.set_len(size.0)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("grow {} to {size}", file.display()))?;
    }
    let lp = loopback::find(file)?;
    if let Some(lp) = &lp {
        loopback::refresh_capacity(lp)?;
    }
    Ok(lp)
}

/// Kept free on the host beyond what a step asks for in
/// [`crate::Pool::require_host_space`]: room for records and temp files.
pub const HOST_RESERVE: Bytes = Bytes(8 << 20);

/// What `container commit` wants free on the host before it starts: its
/// size is known only once the changes are written (a scratch tar, then
/// the new layer's blocks), so a fixed floor refuses a hopeless one early.
pub const COMMIT_MARGIN: Bytes = Bytes(64 << 20);

/// Bytes of the filesystem holding `path` that a writer can still use
/// (`statvfs`: available blocks times fragment size, as `df` shows them;
/// blocks reserved for root are not counted, so this errs low).
///
/// # Errors
/// I/O errors.
pub fn host_free(path: &Path) -> Result<Bytes> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(std::io::Error::from)
        .ctx(|| format!("statvfs {}", path.display()))?;
    Ok(Bytes(
        st.blocks_available().saturating_mul(st.fragment_size()),
    ))
}

/// Bytes the host filesystem holds for `file` (`st_blocks` * 512).
///
/// # Errors
/// I/O errors.
pub fn allocated(file: &Path) -> Result<Bytes> {
    let m = fs::metadata(file).ctx(|| format!("stat {}", file.display()))?;
    Ok(Bytes(m.blocks().saturating_mul(512)))
}

/// Allocates bytes `[0, len)` of `f` (at `path`) on the host
/// (`fallocate`), growing it to `len` if shorter, and syncs it. Where the
/// filesystem has no `fallocate`, writes zeros past the current end
/// instead (only ever for a file whose new part must read as zeros).
///
/// # Errors
/// I/O errors; ENOSPC (exit 6) when the host cannot hold it.
pub fn allocate_file(f: &File, path: &Path, len: Bytes) -> Result<()> {
    let want = i64::try_from(len.0).map_err(|_| Error::InvalidSize {
        input: len.to_string(),
        reason: "larger than a file offset".into(),
    })?;
    match nix::fcntl::fallocate(f, nix::fcntl::FallocateFlags::empty(), 0, want) {
        Ok(()) => {}
        Err(Errno::EOPNOTSUPP) => {
            let mut w = f;
            let mut at = f
                .metadata()
                .ctx(|| format!("stat {}", path.display()))?
                .len();
            let zeros = vec![0u8; 1 << 20];
            while at < len.0 {
                let n = usize::try_from((len.0 - at).min(1 << 20)).expect("at most 1 MiB");
                std::io::Seek::seek(&mut w, std::io::SeekFrom::Start(at))
                    .and_then(|_| w.write_all(&zeros[..n]))
                    .ctx(|| format!("write zeros into {}", path.display()))?;
                at += n as u64;
            }
        }
        Err(e) => {
            return Err(std::io::Error::from(e))
                .ctx(|| format!("allocate {len} for {} on the host", path.display()));
        }
    }
    f.sync_all().ctx(|| format!("sync {}", path.display()))
}

/// The host filesystem under a pool against what the pool may still
/// write there (`pool status`, `pool check`).
#[derive(Clone, Debug, Serialize)]
pub struct HostSpace {
    /// Bytes a writer can still use on the filesystem holding the root.
    pub filesystem_free_bytes: u64,
    /// That filesystem's size.
    pub filesystem_size_bytes: u64,
    /// Bytes of the data file the host holds now.
    pub data_allocated_bytes: u64,
    /// What the data file can still grow on the host: its size minus what
    /// the host holds of it.
    pub data_growth_bytes: u64,
    /// Bytes of the metadata file the host holds.
    pub metadata_allocated_bytes: u64,
    /// Whether the metadata file is fully allocated (a full host cannot
    /// fail a metadata write).
    pub metadata_allocated: bool,
    /// Whether the free space holds the data file's remaining growth.
    pub holds_growth: bool,
}

impl HostSpace {
    /// Measures the host under `root` for a pool of `data_size` and
    /// `metadata_size`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn measure(root: &Path, data_size: Bytes, metadata_size: Bytes) -> Result<HostSpace> {
        let st = nix::sys::statvfs::statvfs(root)
            .map_err(std::io::Error::from)
            .ctx(|| format!("statvfs {}", root.display()))?;
        let free = host_free(root)?.0;
        let size = st.blocks().saturating_mul(st.fragment_size());
        // A file an interrupted `pool create` never made holds nothing.
        let held = |name: &str| match allocated(&root.join(name)) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(0),
            r => r.map(|b| b.0),
        };
        let (data, meta) = (held("data.img")?, held("metadata.img")?);
        let growth = data_size.0.saturating_sub(data);
        Ok(HostSpace {
            filesystem_free_bytes: free,
            filesystem_size_bytes: size,
            data_allocated_bytes: data,
            data_growth_bytes: growth,
            metadata_allocated_bytes: meta,
            metadata_allocated: meta >= metadata_size.0,
            holds_growth: free >= growth,
        })
    }

    /// What `pool status` and `pool check` warn about, each with what to do.
    pub fn warnings(&self, root: &Path) -> Vec<String> {
        let mut w = Vec::new();
        if !self.holds_growth {
            w.push(format!(
                "the filesystem holding {} has {} free but the pool's data file can still grow by {} ({} of it on the host now): \
                 once that filesystem is full, writes into layers fail with I/O errors; \
                 free space on it, remove layers (their space goes back to it), or move the root to a larger filesystem \
                 (`thinlayer pool deactivate`, move {}, `thinlayer pool activate`); `pool extend` of the data only widens the gap",
                root.display(),
                Bytes(self.filesystem_free_bytes),
                Bytes(self.data_growth_bytes),
                Bytes(self.data_allocated_bytes),
                root.display()
            ));
        }
        if !self.metadata_allocated {
            w.push(
                "the metadata file is sparse (made by an older thinlayer): a full host filesystem could fail a metadata write; \
                 `thinlayer pool deactivate` and `thinlayer pool activate` allocate it"
                    .into(),
            );
        }
        w
    }
}

/// Removes what a crash left in the scratch directory `dir`
/// (`ROOT/store/tmp`): files, and directories once empty. Unmounts
/// nothing: a directory that is (or holds) a mount point is left as it
/// is, as is anything on another filesystem; symlinks are removed, never
/// followed. Call only under the root's exclusive lock, when no other
/// thinlayer process can be using its scratch. Returns how many entries
/// it removed.
///
/// # Errors
/// I/O errors other than a missing directory.
pub fn sweep_scratch(dir: &Path) -> Result<usize> {
    let dir = match fs::canonicalize(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).ctx(|| format!("resolve {}", dir.display())),
    };
    let dev = fs::metadata(&dir)
        .ctx(|| format!("stat {}", dir.display()))?
        .dev();
    let mounts: Vec<PathBuf> = crate::mounts::all()?
        .into_iter()
        .map(|m| m.mountpoint)
        .collect();
    let n = sweep_below(&dir, dev, &mounts)?;
    if n > 0 {
        tracing::info!(dir = %dir.display(), entries = n, "swept scratch a crash left");
    }
    Ok(n)
}

fn sweep_below(dir: &Path, dev: u64, mounts: &[PathBuf]) -> Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
        let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
        let Ok(m) = fs::symlink_metadata(&path) else {
            continue;
        };
        if m.is_dir() {
            if m.dev() != dev || mounts.iter().any(|p| p.starts_with(&path)) {
                tracing::info!(dir = %path.display(), "scratch left alone: a mount is on it");
                continue;
            }
            n += sweep_below(&path, dev, mounts)?;
            if fs::remove_dir(&path).is_ok() {
                n += 1;
            }
        } else {
            fs::remove_file(&path).ctx(|| format!("remove stale {}", path.display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The size in bytes of the block device `dev` (sysfs: its table length
/// for a dm device, its capacity for a loop device).
pub(crate) fn device_size(dev: devicemapper::Device) -> Result<Bytes> {
    let p = format!("/sys/dev/block/{}:{}/size", dev.major, dev.minor);
    let text = fs::read_to_string(&p).ctx(|| format!("read {p}"))?;
    let sectors: u64 = text.trim().parse().map_err(|_| {
        Error::Inconsistent(format!("{p} holds `{}`, not a sector count", text.trim()))
    })?;
    Ok(Bytes(sectors.saturating_mul(512)))
}

/// The sentence `pool status` and errors give for a full pool.
pub fn out_of_space_hint(what: &str) -> String {
    format!(
        "the pool is out of {what} space: writes to its layers fail and new layers are refused; \
         extend it with `thinlayer pool extend --{what}-size +SIZE`, or remove layers"
    )
}

#[cfg(test)]
mod tests;
