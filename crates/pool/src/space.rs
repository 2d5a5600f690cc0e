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
//!
//! What must never happen: the pool shrunk (its metadata maps blocks up to
//! the old end); a record larger than the kernel's table for a live pool.

use std::{
    fs::OpenOptions,
    os::fd::AsRawFd,
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
    error::{Error, IoContext, Result},
    kernel::{self, Kernel},
    loopback,
    names::Role,
    pool::{Pool, pool_spec},
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

/// Grows `file` to `size`, then its loop device (if attached) to match.
fn grow_file(file: &Path, size: Bytes) -> Result<Option<loopback::Loop>> {
    let f = OpenOptions::new()
        .write(true)
        .open(file)
        .ctx(|| format!("open {}", file.display()))?;
    if f.metadata()
        .ctx(|| format!("stat {}", file.display()))?
        .len()
        < size.0
    {
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

impl Pool {
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
            Some(dev) => {
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
            None => match kernel.activate_thin(&name, &uuid, pool_dev, thin_id, len.sectors()) {
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
    /// blocks (data) or 4 KiB (metadata).
    ///
    /// # Errors
    /// [`Error::InvalidSize`] to shrink or past the kernel's metadata limit;
    /// [`Error::InvalidArgument`] when nothing was asked; I/O and kernel
    /// errors.
    pub fn extend(&mut self, req: &ExtendRequest) -> Result<ExtendReport> {
        if req.data.is_none() && req.metadata.is_none() {
            return Err(Error::InvalidArgument(
                "nothing to extend; give --data-size +SIZE and/or --metadata-size +SIZE".into(),
            ));
        }
        let rec = self.record().clone();
        let block = rec.block_size.bytes().0;
        let new_data = req.data.map_or(rec.data_size, |c| {
            Bytes(c.apply(rec.data_size).0 / block * block)
        });
        let new_meta = req.metadata.map_or(rec.metadata_size, |c| {
            Bytes(c.apply(rec.metadata_size).0 / 4096 * 4096)
        });
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
        let layout = self.layout().clone();
        // Files first: a longer file than the record is harmless, and tells
        // a crash after the kernel step.
        let data_loop = grow_file(&layout.data_file(), new_data)?;
        let meta_loop = grow_file(&layout.metadata_file(), new_meta)?;
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
            kernel.resize_linear(&meta_name, meta_loop.device, new_meta.sectors())?;
            kernel.resize_linear(&data_name, data_loop.device, new_data.sectors())?;
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

    /// Adopts data or metadata file lengths larger than the record: an
    /// extend that reached the files (and maybe the kernel) but not the
    /// record. Call before the pool's tables are built from the record.
    ///
    /// # Errors
    /// I/O and record errors.
    pub fn reconcile_sizes(&mut self) -> Result<bool> {
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

/// Watches the pool under `root` and extends it by the policy in `opts`,
/// calling `extended` after each extension. Sleeps on the kernel's dm
/// events (armed with `DM_DEV_ARM_POLL` on the control fd; the pool raises
/// one at its low-water mark and when it runs out of space), waking at
/// least every `fallback_interval`. Takes the root's lock only to read
/// usage (shared) and to extend (exclusive), so other commands run
/// meanwhile. SIGINT and SIGTERM are blocked and read from a signalfd:
/// either ends the watch cleanly.
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
            let req = plan(opts, u, data, meta);
            if req.data.is_none() && req.metadata.is_none() {
                if percent_of(u.data.0, u.data.1) >= u64::from(opts.threshold_percent)
                    && !capped_logged
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

    #[test]
    fn the_full_pool_hint_names_the_command() {
        assert!(out_of_space_hint("data").contains("thinlayer pool extend --data-size +SIZE"));
    }
}
