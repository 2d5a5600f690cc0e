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
//!   ([`Pool::reconcile_sizes`] adopts it).
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
//!   what the host holds; [`Pool::require_host_space`] lets a caller
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
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout},
    sys::{
        signal::{SigSet, Signal},
        signalfd::{SfdFlags, SignalFd},
    },
};
use serde::Serialize;

use crate::{
    blockdev::{self, DeviceRole},
    error::{Error, IoContext, Result},
    kernel::{self, Kernel},
    loopback,
    names::Role,
    pool::{Backing, Pool, pool_spec},
    units::{self, Bytes},
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
    fn apply(self, old: Bytes) -> Bytes {
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

fn refuse_shrink(what: &str, old: Bytes, new: Bytes) -> Result<()> {
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
fn grow_file(file: &Path, size: Bytes, allocate: bool) -> Result<Option<loopback::Loop>> {
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
/// [`Pool::require_host_space`]: room for records and temp files.
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
fn device_size(dev: devicemapper::Device) -> Result<Bytes> {
    let p = format!("/sys/dev/block/{}:{}/size", dev.major, dev.minor);
    let text = fs::read_to_string(&p).ctx(|| format!("read {p}"))?;
    let sectors: u64 = text.trim().parse().map_err(|_| {
        Error::Inconsistent(format!("{p} holds `{}`, not a sector count", text.trim()))
    })?;
    Ok(Bytes(sectors.saturating_mul(512)))
}

impl Pool {
    /// The host filesystem under the pool against what it may still write.
    ///
    /// # Errors
    /// I/O errors.
    pub fn host_space(&self) -> Result<HostSpace> {
        let r = self.record();
        if !r.backing.is_files() {
            // Nothing of the pool's lives on the host filesystem but records.
            return HostSpace::measure(&self.layout().root, Bytes(0), Bytes(0));
        }
        HostSpace::measure(&self.layout().root, r.data_size, r.metadata_size)
    }

    /// Refuses, before anything changes, work that needs `bytes` on the
    /// host filesystem holding the pool (scratch files, data the pool
    /// will write) when that and [`HOST_RESERVE`] are not free. `what`
    /// names the work in the error.
    ///
    /// # Errors
    /// [`Error::HostNoSpace`] (exit 6) with the bytes needed and free; I/O
    /// errors.
    pub fn require_host_space(&self, what: &str, bytes: Bytes) -> Result<()> {
        let root = &self.layout().root;
        let free = host_free(root)?;
        if free.0 < bytes.0.saturating_add(HOST_RESERVE.0) {
            return Err(Error::HostNoSpace {
                root: root.clone(),
                what: what.to_owned(),
                needed: bytes.0,
                reserve: HOST_RESERVE.0,
                free: free.0,
            });
        }
        Ok(())
    }

    /// The data and metadata sizes the pool has now: the live linear
    /// devices' when active, else the files' (rounded down to whole pool
    /// blocks and 4 KiB); never less than the record. A larger size than
    /// the record is an extend whose record was lost: it is adopted (the
    /// record rewritten) and said.
    ///
    /// # Errors
    /// Kernel, sysfs and record errors.
    fn adopt_live_sizes(&mut self) -> Result<()> {
        if self.pool_device()?.is_none() {
            self.reconcile_sizes()?;
            return Ok(());
        }
        let (data_name, meta_name) = (self.name(Role::Data), self.name(Role::Meta));
        let kernel = self.kernel()?;
        let size = |n: &devicemapper::DmName| -> Result<Bytes> {
            let dev = kernel.device(n)?.ok_or_else(|| {
                Error::Inconsistent(format!("the pool is active but {n} is gone"))
            })?;
            device_size(dev)
        };
        let (data, meta) = (size(&data_name)?, size(&meta_name)?);
        let r = self.record_mut_inner();
        let (old_data, old_meta) = (r.data_size, r.metadata_size);
        if data <= old_data && meta <= old_meta {
            return Ok(());
        }
        r.data_size = old_data.max(data);
        r.metadata_size = old_meta.max(meta);
        tracing::warn!(
            "the record said data {old_data}, metadata {old_meta}, but the live pool has data {data}, metadata {meta} \
             (an extend whose record was lost): adopted the live sizes"
        );
        self.write_record()
    }

    /// Discards all of thin device `thin_id` so its blocks go back to the
    /// pool and (by discard passdown) to the host: activates it if needed,
    /// `BLKDISCARD`s its whole length, removes the device. Idempotent: a
    /// thin id the pool no longer has is nothing to do. A device that
    /// takes no discards is logged and skipped (the `delete` that follows
    /// still frees the pool's blocks).
    ///
    /// # Errors
    /// [`Error::PoolInactive`], [`Error::Busy`], kernel errors.
    pub(crate) fn discard_thin(&mut self, thin_id: u32, len: crate::units::Bytes) -> Result<()> {
        let pool_dev = self.require_active()?;
        let name = self.name(Role::Thin(thin_id));
        let uuid = self.uuid(Role::Thin(thin_id));
        let kernel = self.kernel()?;
        let dev = match kernel.device(&name)? {
            Some(_) => {
                // Only our own device is discarded: a stale one under our
                // name is refused, not wiped.
                let id = kernel::ThinId::new(thin_id)?;
                let length = kernel::Sectors(len.sectors());
                let (dev, _) = kernel.setup_thin(&name, &uuid, pool_dev, id, length)?;
                let points = crate::mounts::mountpoints_of(dev)?;
                if !points.is_empty() {
                    return Err(Error::Mounted {
                        what: format!("thin device {thin_id}"),
                        mountpoints: points
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        hint: points[0].display().to_string(),
                    });
                }
                dev
            }
            None => match kernel.new_thin(
                &name,
                &uuid,
                pool_dev,
                kernel::ThinId::new(thin_id)?,
                kernel::Sectors(len.sectors()),
            ) {
                Ok(dev) => dev,
                Err(e) if e.dm_errno() == Some(Errno::ENODATA) => {
                    tracing::debug!(thin_id, "no such thin id: nothing to discard");
                    return Ok(());
                }
                Err(e) => return Err(e),
            },
        };
        let node = kernel::devnode(dev);
        let t0 = Instant::now();
        match discard_device(&node, len.0) {
            Ok(()) => tracing::info!(
                thin_id,
                bytes = len.0,
                ms = t0.elapsed().as_millis(),
                "discarded thin device"
            ),
            Err(e) => {
                tracing::warn!(thin_id, error = %e, "discard failed; the pool still frees the blocks, the host file keeps them")
            }
        }
        self.kernel()?.remove(&name)?;
        Ok(())
    }

    /// Grows the data and/or metadata of the pool, online when it is
    /// active (layers may stay mounted): file -> loop capacity -> linear
    /// device -> pool table -> record. Sizes round down to whole pool
    /// blocks (data) or 4 KiB (metadata). The current sizes are the live
    /// devices' (or, inactive, the files'), never the record's alone: a
    /// larger live size is adopted first, so a request below it is a
    /// shrink and refused. The metadata file is allocated on the host.
    ///
    /// # Errors
    /// [`Error::InvalidSize`] to shrink or past the kernel's metadata limit;
    /// [`Error::InvalidArgument`] when nothing was asked; I/O and kernel
    /// errors.
    pub fn extend(&mut self, req: &ExtendRequest) -> Result<ExtendReport> {
        if let Backing::Adopted { pool_name, .. } = &self.record().backing {
            return Err(Error::Foreign {
                what: "pool extend".into(),
                pool: pool_name.clone(),
                hint: "grow it with its owner (`lvextend -L +SIZE VG/POOL`, `lvextend --poolmetadatasize +SIZE VG/POOL`); \
                       thinlayer uses the new size at once"
                    .into(),
            });
        }
        let on_devices = matches!(self.record().backing, Backing::Devices { .. });
        let fill = on_devices && req.data.is_none() && req.metadata.is_none();
        if req.data.is_none() && req.metadata.is_none() && !on_devices {
            return Err(Error::InvalidArgument(
                "nothing to extend; give --data-size +SIZE and/or --metadata-size +SIZE".into(),
            ));
        }
        // Measure from what the kernel uses, never the record alone: a
        // record a crash or a restore left behind must not shrink a live
        // device.
        self.adopt_live_sizes()?;
        let rec = self.record().clone();
        let block = rec.block_size.bytes().0;
        // A pool on devices grows within them: into what the admin added
        // (a grown LV or disk); with no size given, to all of it.
        let devices = match &rec.backing {
            Backing::Devices { data, metadata } => Some((
                blockdev::find(&rec.pool_id, DeviceRole::Data, data)?,
                blockdev::find(&rec.pool_id, DeviceRole::Metadata, metadata)?,
            )),
            _ => None,
        };
        let (data_room, meta_room) = match &devices {
            Some((d, m)) => (
                Bytes(d.usable().0 / block * block),
                Bytes(m.usable().0.min(units::MAX_METADATA) / 4096 * 4096),
            ),
            None => (Bytes(u64::MAX), Bytes(u64::MAX)),
        };
        let new_data = match req.data {
            Some(c) => Bytes(c.apply(rec.data_size).0 / block * block),
            None if fill => data_room.max(rec.data_size),
            None => rec.data_size,
        };
        let new_meta = match req.metadata {
            Some(c) => Bytes(c.apply(rec.metadata_size).0 / 4096 * 4096),
            None if fill => meta_room.max(rec.metadata_size),
            None => rec.metadata_size,
        };
        if let Some((d, m)) = &devices {
            for (what, want, room, dev) in [
                ("data", new_data, data_room, d),
                ("metadata", new_meta, meta_room, m),
            ] {
                if want > room {
                    return Err(Error::InvalidSize {
                        input: want.to_string(),
                        reason: format!(
                            "the {what} device {} holds {room} for the pool; grow the device first \
                             (`lvextend`, or a larger disk), then run `thinlayer pool extend` (no size: all of it)",
                            dev.node.display()
                        ),
                    });
                }
            }
        }
        refuse_shrink("data size", rec.data_size, new_data)?;
        refuse_shrink("metadata size", rec.metadata_size, new_meta)?;
        if new_meta.0 > units::MAX_METADATA {
            return Err(Error::InvalidSize {
                input: new_meta.to_string(),
                reason: format!(
                    "the kernel uses at most {} of metadata",
                    Bytes(units::MAX_METADATA)
                ),
            });
        }
        let mut report = ExtendReport {
            old_data_size: rec.data_size,
            new_data_size: new_data,
            old_metadata_size: rec.metadata_size,
            new_metadata_size: new_meta,
            online: false,
        };
        if !report.changed() {
            return Ok(report);
        }
        self.recover()?;
        if let Some((d, m)) = devices {
            return self.extend_devices(&rec, &d, &m, report);
        }
        let layout = self.layout().clone();
        // Files first: a longer file than the record is harmless, and tells
        // a crash after the kernel step.
        let data_loop = grow_file(&layout.data_file(), new_data, false)?;
        let meta_loop = grow_file(&layout.metadata_file(), new_meta, true)?;
        if self.pool_device()?.is_some() {
            let (Some(data_loop), Some(meta_loop)) = (data_loop, meta_loop) else {
                return Err(Error::Inconsistent(
                    "the pool is active but its files have no loop devices".into(),
                ));
            };
            let data_name = self.name(Role::Data);
            let meta_name = self.name(Role::Meta);
            let pool_name = self.name(Role::Pool);
            let kernel = self.kernel()?;
            let (zero, meta_len, data_len) = (
                kernel::Sectors(0),
                kernel::Sectors(new_meta.sectors()),
                kernel::Sectors(new_data.sectors()),
            );
            kernel.resize_linear(&meta_name, meta_loop.device, zero, meta_len)?;
            kernel.resize_linear(&data_name, data_loop.device, zero, data_len)?;
            let dev = |n| {
                kernel
                    .device(n)?
                    .ok_or_else(|| Error::Inconsistent(format!("{n} vanished while extending")))
            };
            let (meta, data) = (dev(&meta_name)?, dev(&data_name)?);
            let mut grown = rec.clone();
            grown.data_size = new_data;
            grown.metadata_size = new_meta;
            kernel.reload_pool(&pool_name, &pool_spec(&grown, meta, data))?;
            report.online = true;
        }
        let r = self.record_mut_inner();
        r.data_size = new_data;
        r.metadata_size = new_meta;
        self.write_record()?;
        tracing::info!(
            data_from = %report.old_data_size, data_to = %report.new_data_size,
            metadata_from = %report.old_metadata_size, metadata_to = %report.new_metadata_size,
            online = report.online, "extended the pool"
        );
        Ok(report)
    }

    /// The device half of [`Pool::extend`]: record first (the devices
    /// already hold the new size, so a record ahead of the kernel only
    /// makes the next activation build the larger tables), then the
    /// linear devices and the pool table when active.
    fn extend_devices(
        &mut self,
        rec: &crate::pool::PoolRecord,
        d: &blockdev::BlockDev,
        m: &blockdev::BlockDev,
        mut report: ExtendReport,
    ) -> Result<ExtendReport> {
        let r = self.record_mut_inner();
        r.data_size = report.new_data_size;
        r.metadata_size = report.new_metadata_size;
        self.write_record()?;
        if self.pool_device()?.is_some() {
            let data_name = self.name(Role::Data);
            let meta_name = self.name(Role::Meta);
            let pool_name = self.name(Role::Pool);
            let kernel = self.kernel()?;
            let off = kernel::Sectors(blockdev::LABEL_SECTORS);
            kernel.resize_linear(
                &meta_name,
                m.device,
                off,
                kernel::Sectors(report.new_metadata_size.sectors()),
            )?;
            let data_len = kernel::Sectors(report.new_data_size.sectors());
            kernel.resize_linear(&data_name, d.device, off, data_len)?;
            let dev = |n| {
                kernel
                    .device(n)?
                    .ok_or_else(|| Error::Inconsistent(format!("{n} vanished while extending")))
            };
            let (meta, data) = (dev(&meta_name)?, dev(&data_name)?);
            let mut grown = rec.clone();
            grown.data_size = report.new_data_size;
            grown.metadata_size = report.new_metadata_size;
            kernel.reload_pool(&pool_name, &pool_spec(&grown, meta, data))?;
            report.online = true;
        }
        tracing::info!(
            data_from = %report.old_data_size, data_to = %report.new_data_size,
            metadata_from = %report.old_metadata_size, metadata_to = %report.new_metadata_size,
            online = report.online, "extended the pool onto its devices"
        );
        Ok(report)
    }

    /// Adopts data or metadata file lengths larger than the record: an
    /// extend that reached the files (and maybe the kernel) but not the
    /// record. Call before the pool's tables are built from the record.
    /// A pool on devices or adopted has no files: nothing to do.
    ///
    /// # Errors
    /// I/O and record errors.
    pub fn reconcile_sizes(&mut self) -> Result<bool> {
        if !self.record().backing.is_files() {
            return Ok(false);
        }
        let layout = self.layout().clone();
        let block = self.record().block_size.bytes().0;
        let len = |p: PathBuf| -> Result<u64> {
            Ok(std::fs::metadata(&p)
                .ctx(|| format!("stat {}", p.display()))?
                .len())
        };
        let data = Bytes(len(layout.data_file())? / block * block);
        let meta = Bytes(len(layout.metadata_file())? / 4096 * 4096);
        let r = self.record_mut_inner();
        let mut changed = false;
        if data > r.data_size {
            tracing::info!(from = %r.data_size, to = %data, "adopting the data file's length");
            r.data_size = data;
            changed = true;
        }
        if meta > r.metadata_size && meta.0 <= units::MAX_METADATA {
            tracing::info!(from = %r.metadata_size, to = %meta, "adopting the metadata file's length");
            r.metadata_size = meta;
            changed = true;
        }
        if changed {
            self.write_record()?;
        }
        Ok(changed)
    }
}

/// The sentence `pool status` and errors give for a full pool.
pub fn out_of_space_hint(what: &str) -> String {
    format!(
        "the pool is out of {what} space: writes to its layers fail and new layers are refused; \
         extend it with `thinlayer pool extend --{what}-size +SIZE`, or remove layers"
    )
}

/// The autoextend policy of `pool watch`.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Extend when data or metadata use reaches this percent.
    pub threshold_percent: u8,
    /// Grow by this percent of the current size each time.
    pub extend_percent: u16,
    /// Never grow the data past this size.
    pub max_data_size: Option<Bytes>,
    /// Check once and return.
    pub once: bool,
    /// Return after this long.
    pub timeout: Option<Duration>,
    /// Check at least this often even without a kernel event.
    pub fallback_interval: Duration,
}

impl Default for WatchOptions {
    fn default() -> WatchOptions {
        WatchOptions {
            threshold_percent: 70,
            extend_percent: 20,
            max_data_size: None,
            once: false,
            timeout: None,
            fallback_interval: Duration::from_secs(5),
        }
    }
}

/// Why [`watch`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEnd {
    /// `--once`: checked once.
    Once,
    /// The timeout passed.
    Timeout,
    /// SIGINT or SIGTERM.
    Signal,
}

/// How full a pool is, from the kernel.
#[derive(Clone, Copy, Debug)]
struct Usage {
    data: (u64, u64),
    meta: (u64, u64),
}

fn percent_of(used: u64, total: u64) -> u64 {
    used.saturating_mul(100).checked_div(total).unwrap_or(0)
}

fn usage(root: &Path, wait: bool) -> Result<Usage> {
    let mut pool = Pool::open(root, crate::LockMode::Shared, wait)?;
    let st = pool.status()?;
    let k = st.kernel.ok_or_else(|| Error::PoolInactive {
        root: root.to_owned(),
    })?;
    Ok(Usage {
        data: (k.data_used_blocks, k.data_total_blocks),
        meta: (k.metadata_used_blocks, k.metadata_total_blocks),
    })
}

/// The extension `opts` calls for at `u`, if any, for a pool at `data`
/// and `meta` bytes.
fn plan(opts: &WatchOptions, u: Usage, data: Bytes, meta: Bytes) -> ExtendRequest {
    let t = u64::from(opts.threshold_percent);
    let grow = |size: Bytes| Bytes(size.0 + size.0 * u64::from(opts.extend_percent) / 100);
    let mut req = ExtendRequest::default();
    if percent_of(u.data.0, u.data.1) >= t {
        let mut to = grow(data);
        if let Some(max) = opts.max_data_size {
            to = to.min(max);
        }
        if to > data {
            req.data = Some(SizeChange::To(to));
        }
    }
    if percent_of(u.meta.0, u.meta.1) >= t {
        let to = Bytes(grow(meta).0.min(units::MAX_METADATA));
        if to > meta {
            req.metadata = Some(SizeChange::To(to));
        }
    }
    req
}

/// Refuses growing the data file of the pool under `root` to `to` when
/// the host filesystem cannot hold the file at that size: what it lacks
/// of it, plus [`HOST_RESERVE`].
fn host_holds(root: &Path, to: Bytes) -> Result<()> {
    let free = host_free(root)?;
    let on_host = allocated(&root.join("data.img"))?;
    let growth = to.0.saturating_sub(on_host.0);
    if free.0 < growth.saturating_add(HOST_RESERVE.0) {
        return Err(Error::HostNoSpace {
            root: root.to_owned(),
            what: format!(
                "growing the data file to {to} (pool watch; {on_host} of it is on the host now)"
            ),
            needed: growth,
            reserve: HOST_RESERVE.0,
            free: free.0,
        });
    }
    Ok(())
}

/// Watches the pool under `root` and extends it by the policy in `opts`,
/// calling `extended` after each extension. Sleeps on the kernel's dm
/// events (armed with `DM_DEV_ARM_POLL` on the control fd; the pool raises
/// one at its low-water mark and when it runs out of space), waking at
/// least every `fallback_interval`. Takes the root's lock only to read
/// usage (shared) and to extend (exclusive), so other commands run
/// meanwhile. SIGINT and SIGTERM are blocked and read from a signalfd:
/// either ends the watch cleanly.
///
/// Never grows the data file past what the host filesystem holds: with
/// `once` that is [`Error::HostNoSpace`]; a long watch warns once and
/// leaves the data size alone.
///
/// # Errors
/// [`Error::InvalidArgument`] for a bad policy; environment, kernel and
/// extend errors. A pool at its maximum size is logged, not an error.
pub fn watch(
    root: &Path,
    opts: &WatchOptions,
    mut extended: impl FnMut(&ExtendReport),
) -> Result<WatchEnd> {
    if !(1..=99).contains(&opts.threshold_percent) {
        return Err(Error::InvalidArgument(format!(
            "threshold {}% is out of range; use 1 to 99",
            opts.threshold_percent
        )));
    }
    if opts.extend_percent == 0 {
        return Err(Error::InvalidArgument(
            "extend percent 0 would never grow the pool; use 1 or more".into(),
        ));
    }
    let kernel = Kernel::open()?;
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(std::io::Error::from)
        .ctx(|| "block SIGINT and SIGTERM".into())?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(std::io::Error::from)
        .ctx(|| "make a signalfd".into())?;
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    let mut capped_logged = false;
    let mut host_logged = false;
    loop {
        // Arm before reading usage, so an event raised in between wakes
        // the poll below at once.
        kernel.arm_events()?;
        let mut rounds = 0;
        loop {
            let u = usage(root, true)?;
            let (data, meta) = {
                let p = Pool::open(root, crate::LockMode::Shared, true)?;
                (p.record().data_size, p.record().metadata_size)
            };
            let mut req = plan(opts, u, data, meta);
            let mut host_refused = false;
            if let Some(SizeChange::To(to)) = req.data {
                if let Err(e) = host_holds(root, to) {
                    // --once reports it; a long watch says so once and
                    // keeps watching (the metadata may still grow, and the
                    // host may get space back).
                    if opts.once {
                        return Err(e);
                    }
                    if !host_logged {
                        tracing::warn!("{e}; pool watch leaves the data size as it is");
                        host_logged = true;
                    }
                    req.data = None;
                    host_refused = true;
                }
            }
            if req.data.is_none() && req.metadata.is_none() {
                if percent_of(u.data.0, u.data.1) >= u64::from(opts.threshold_percent)
                    && !capped_logged
                    && !host_refused
                {
                    tracing::warn!(
                        "data use is past the threshold but the pool is at --max-data-size; not extending"
                    );
                    capped_logged = true;
                }
                break;
            }
            let report = Pool::open(root, crate::LockMode::Exclusive, true)?.extend(&req)?;
            tracing::info!(
                data_used = u.data.0, data_total = u.data.1,
                meta_used = u.meta.0, meta_total = u.meta.1,
                data_to = %report.new_data_size, metadata_to = %report.new_metadata_size,
                "autoextended"
            );
            extended(&report);
            rounds += 1;
            // A small percent may need a few steps; never spin.
            if rounds >= 16 {
                break;
            }
        }
        if opts.once {
            return Ok(WatchEnd::Once);
        }
        let mut wait = opts.fallback_interval;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(WatchEnd::Timeout);
            }
            wait = wait.min(left);
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [
            PollFd::new(kernel.control_fd(), PollFlags::POLLIN),
            PollFd::new(std::os::fd::AsFd::as_fd(&sigfd), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                return Err(std::io::Error::from(e)).ctx(|| "wait for dm events".into());
            }
        }
        let signalled = fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if signalled {
            if let Ok(Some(si)) = sigfd.read_signal() {
                tracing::info!(signal = si.ssi_signo, "stopping the watch");
            }
            return Ok(WatchEnd::Signal);
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            tracing::debug!("dm event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_changes_parse_relative_and_absolute() {
        assert_eq!(
            "+256M".parse::<SizeChange>().unwrap(),
            SizeChange::Add(Bytes(256 << 20))
        );
        assert_eq!(
            "1G".parse::<SizeChange>().unwrap(),
            SizeChange::To(Bytes(1 << 30))
        );
        assert!("+x".parse::<SizeChange>().is_err());
        assert_eq!(
            SizeChange::Add(Bytes(1)).apply(Bytes(2)),
            Bytes(3),
            "grow by"
        );
    }

    #[test]
    fn shrinking_is_refused_with_a_way_out() {
        let e = refuse_shrink("data size", Bytes(2 << 30), Bytes(1 << 30)).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        assert!(e.to_string().contains("cannot shrink"), "{e}");
        assert!(refuse_shrink("data size", Bytes(1), Bytes(1)).is_ok());
    }

    #[test]
    fn the_policy_extends_past_the_threshold_and_stops_at_the_cap() {
        let opts = WatchOptions {
            threshold_percent: 50,
            extend_percent: 50,
            max_data_size: Some(Bytes(300)),
            ..WatchOptions::default()
        };
        let low = Usage {
            data: (10, 100),
            meta: (1, 100),
        };
        let r = plan(&opts, low, Bytes(200), Bytes(100));
        assert!(r.data.is_none() && r.metadata.is_none());
        let high = Usage {
            data: (60, 100),
            meta: (1, 100),
        };
        let r = plan(&opts, high, Bytes(200), Bytes(100));
        assert_eq!(r.data, Some(SizeChange::To(Bytes(300))));
        assert!(r.metadata.is_none());
        let r = plan(&opts, high, Bytes(300), Bytes(100));
        assert!(r.data.is_none(), "capped");
        let meta_high = Usage {
            data: (1, 100),
            meta: (90, 100),
        };
        let r = plan(&opts, meta_high, Bytes(200), Bytes(4096));
        assert_eq!(r.metadata, Some(SizeChange::To(Bytes(6144))));
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("thinlayer-space-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn allocate_file_holds_every_byte_on_the_host() {
        let d = tempdir("alloc");
        let p = d.join("metadata.img");
        let f = crate::record::open_private(&p, true).unwrap();
        allocate_file(&f, &p, Bytes(4 << 20)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 4 << 20);
        assert!(allocated(&p).unwrap().0 >= 4 << 20, "fully allocated");
        // Growing allocates the new end too; the old bytes stay.
        allocate_file(&f, &p, Bytes(6 << 20)).unwrap();
        assert!(allocated(&p).unwrap().0 >= 6 << 20);
        assert!(host_free(&d).unwrap().0 > 0);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn host_space_warns_when_the_host_cannot_hold_the_growth() {
        let d = tempdir("host");
        let f = crate::record::open_private(&d.join("data.img"), true).unwrap();
        f.set_len(1 << 20).unwrap();
        let m = crate::record::open_private(&d.join("metadata.img"), true).unwrap();
        allocate_file(&m, &d.join("metadata.img"), Bytes(1 << 20)).unwrap();
        let free = host_free(&d).unwrap().0;
        // A data file larger than the host could ever hold.
        let huge = HostSpace::measure(&d, Bytes(free + (1 << 40)), Bytes(1 << 20)).unwrap();
        assert!(!huge.holds_growth && huge.metadata_allocated, "{huge:?}");
        let w = huge.warnings(&d).join("\n");
        assert!(
            w.contains("free space on it") && w.contains("move the root"),
            "{w}"
        );
        let small = HostSpace::measure(&d, Bytes(1 << 20), Bytes(1 << 20)).unwrap();
        assert!(
            small.holds_growth && small.warnings(&d).is_empty(),
            "{small:?}"
        );
        // A sparse metadata file is said too.
        let sparse = HostSpace::measure(&d, Bytes(1 << 20), Bytes(2 << 20)).unwrap();
        assert!(sparse.warnings(&d).join(" ").contains("sparse"));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn sweep_scratch_removes_files_and_empty_dirs_and_follows_no_symlink() {
        let d = tempdir("sweep");
        let tmp = d.join("tmp");
        fs::create_dir_all(tmp.join("import-1/blobs/sha256")).unwrap();
        fs::write(tmp.join("import-1/blobs/sha256/abc"), b"blob").unwrap();
        fs::create_dir_all(tmp.join("apply-x-2")).unwrap();
        fs::create_dir_all(tmp.join("commit-3")).unwrap();
        fs::write(tmp.join("commit-3/layer.tar"), b"tar").unwrap();
        let keep = d.join("keep");
        fs::create_dir_all(&keep).unwrap();
        fs::write(keep.join("precious"), b"x").unwrap();
        std::os::unix::fs::symlink(&keep, tmp.join("link")).unwrap();
        assert_eq!(sweep_scratch(&tmp).unwrap(), 8);
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
        assert!(
            keep.join("precious").exists(),
            "a symlink is removed, not followed"
        );
        assert_eq!(sweep_scratch(&tmp).unwrap(), 0);
        assert_eq!(sweep_scratch(&d.join("missing")).unwrap(), 0);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_full_pool_hint_names_the_command() {
        assert!(out_of_space_hint("data").contains("thinlayer pool extend --data-size +SIZE"));
    }
}
