//! How busy the machine's CPUs are, from `/proc/stat` and
//! `/proc/self/stat` (through `procfs`): for work that can wait for a
//! quieter machine (a server's preparatory steps), and for the bench's
//! quiet gate.
//!
//! A figure is a share of all CPUs' time between two readings (0 to 1).
//! I/O waits count as busy: work in flight.

use procfs::CurrentSI as _;

/// CPU time so far, in clock ticks, summed over the machine's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// The machine's time on anything but idling.
    pub busy: u64,
    /// All of the machine's time.
    pub all: u64,
    /// This process's (user and system, every thread).
    pub own: u64,
}

impl CpuTicks {
    /// The ticks now; `None` when `/proc` cannot be read.
    #[must_use]
    pub fn now() -> Option<CpuTicks> {
        let t = procfs::KernelStats::current().ok()?.total;
        let all = t.user
            + t.nice
            + t.system
            + t.idle
            + t.iowait.unwrap_or(0)
            + t.irq.unwrap_or(0)
            + t.softirq.unwrap_or(0)
            + t.steal.unwrap_or(0);
        let own = procfs::process::Process::myself()
            .and_then(|p| p.stat())
            .map_or(0, |s| s.utime + s.stime);
        Some(CpuTicks {
            busy: all - t.idle,
            all,
            own,
        })
    }

    /// The share of all CPUs' time from `self` to `later` spent on
    /// anything; 0 when no tick passed.
    #[must_use]
    pub fn busy_until(&self, later: &CpuTicks) -> f64 {
        share(later.busy.saturating_sub(self.busy), self, later)
    }

    /// As [`CpuTicks::busy_until`], without this process's own time: how
    /// busy everything else kept the machine.
    #[must_use]
    pub fn others_busy_until(&self, later: &CpuTicks) -> f64 {
        let busy = later.busy.saturating_sub(self.busy);
        share(
            busy.saturating_sub(later.own.saturating_sub(self.own)),
            self,
            later,
        )
    }
}

fn share(ticks: u64, from: &CpuTicks, to: &CpuTicks) -> f64 {
    let all = to.all.saturating_sub(from.all);
    if all == 0 {
        0.0
    } else {
        (ticks as f64 / all as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(busy: u64, all: u64, own: u64) -> CpuTicks {
        CpuTicks { busy, all, own }
    }

    #[test]
    fn shares_of_the_time_between_two_readings() {
        let (a, b) = (at(100, 1000, 10), at(160, 1200, 40));
        assert!((a.busy_until(&b) - 0.3).abs() < 1e-9);
        assert!((a.others_busy_until(&b) - 0.15).abs() < 1e-9);
    }

    #[test]
    fn no_tick_passed_is_idle() {
        let a = at(100, 1000, 10);
        assert!(a.busy_until(&a).abs() < f64::EPSILON);
        assert!(a.others_busy_until(&a).abs() < f64::EPSILON);
    }

    /// Counters read out of order (or own time counted late) never give
    /// a share below 0 or above 1.
    #[test]
    fn shares_stay_between_0_and_1() {
        let (a, b) = (at(100, 1000, 10), at(90, 1010, 500));
        assert!(a.busy_until(&b).abs() < f64::EPSILON);
        assert!(a.others_busy_until(&b).abs() < f64::EPSILON);
        assert!(at(0, 0, 0).busy_until(&at(50, 10, 0)) <= 1.0);
    }

    #[test]
    fn this_machine_reads() {
        let a = CpuTicks::now().expect("/proc/stat is readable");
        let b = CpuTicks::now().expect("/proc/stat is readable");
        assert!(b.all >= a.all && a.busy <= a.all);
        assert!((0.0..=1.0).contains(&a.others_busy_until(&b)));
    }
}
