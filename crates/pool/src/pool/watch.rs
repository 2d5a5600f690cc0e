//! `pool watch`: an autoextend policy like LVM's
//! `thin_pool_autoextend_threshold`/`_percent`. It sleeps on the kernel's
//! dm events (the pool raises one at its low-water mark and when it runs
//! out of space), with a slow timer as a fallback, and holds the root's
//! lock only while it reads usage or extends.
//!
//! What must never happen: the data file grown past what the host
//! filesystem holds; the root's lock held while sleeping.

use std::{
    path::Path,
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

use super::Pool;
use crate::{
    error::{Error, IoContext, Result},
    kernel::Kernel,
    space::{ExtendReport, ExtendRequest, HOST_RESERVE, SizeChange, allocated, host_free},
    units::{self, Bytes},
};

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
}
