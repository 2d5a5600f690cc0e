//! Samples, their medians and 95th percentiles, the terminal table with
//! its ratios, and the JSON file.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    Params,
    error::{IoContext, Result},
};

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// The backend (`thinlayer`, `floor`, `overlay-ext4`, ...).
    pub backend: String,
    /// The workload (`create`, `first-write`, ...).
    pub workload: String,
    /// Its parameter: population, file size, block size... (0 if none).
    pub param: u64,
    /// What was measured: `ms`, `bytes`, `MB/s`, ...
    pub metric: String,
    /// The value.
    pub value: f64,
}

/// Median and 95th percentile of the samples of one figure.
#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    /// The backend.
    pub backend: String,
    /// The workload.
    pub workload: String,
    /// Its parameter.
    pub param: u64,
    /// The metric.
    pub metric: String,
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Quick mode or full.
    pub quick: bool,
    /// Sizes and counts used.
    pub params: Params,
    /// The backends measured, in table order.
    pub backends: Vec<String>,
    /// The disk loop files were measured against (`--disk`), if any: its
    /// pair's samples are workload `loop-vs-disk`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Kernel release of the run.
    pub kernel: String,
    /// Every sample.
    pub samples: Vec<Sample>,
    /// Median and p95 per figure.
    pub stats: Vec<Stat>,
    /// Things the reader must know (skipped parts, what a figure means).
    pub notes: Vec<String>,
    /// Seconds each phase of the run took.
    pub phases: Vec<(String, f64)>,
    /// Wall time of the whole run, seconds.
    pub wall_seconds: f64,
}

/// Median and nearest-rank 95th percentile of `v` (empty: NaN).
pub fn median_p95(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    // Nearest rank: the smallest r with r >= 0.95 n, i.e. ceil(19 n / 20).
    let rank = (19 * n).div_ceil(20);
    (median, s[rank.clamp(1, n) - 1])
}

impl Report {
    /// Groups the samples into [`Stat`]s.
    pub fn compute_stats(&mut self) {
        let mut groups: BTreeMap<(String, String, u64, String), Vec<f64>> = BTreeMap::new();
        for s in &self.samples {
            groups
                .entry((
                    s.backend.clone(),
                    s.workload.clone(),
                    s.param,
                    s.metric.clone(),
                ))
                .or_default()
                .push(s.value);
        }
        self.stats = groups
            .into_iter()
            .map(|((backend, workload, param, metric), v)| {
                let (median, p95) = median_p95(&v);
                Stat {
                    backend,
                    workload,
                    param,
                    metric,
                    n: v.len(),
                    median,
                    p95,
                }
            })
            .collect();
    }

    /// The stat of one figure, if measured.
    pub fn stat(&self, backend: &str, workload: &str, param: u64, metric: &str) -> Option<&Stat> {
        self.stats.iter().find(|s| {
            s.backend == backend && s.workload == workload && s.param == param && s.metric == metric
        })
    }

    fn median(&self, backend: &str, workload: &str, param: u64, metric: &str) -> Option<f64> {
        self.stat(backend, workload, param, metric)
            .map(|s| s.median)
    }

    /// Writes the whole report as JSON.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("plain data");
        std::fs::write(path, text).ctx(|| format!("write {}", path.display()))
    }

    /// The terminal summary: medians per backend, p95 for the start path,
    /// and the thinlayer/floor, thinlayer-warm/floor and
    /// thinlayer/overlay-ext4 ratios.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let w = 13;
        let _ = write!(t, "{:<26}", "figure (median)");
        for b in &self.backends {
            let _ = write!(t, "{b:>w$}");
        }
        let _ = writeln!(t, "{:>10}{:>10}{:>10}", "tl/floor", "warm/floor", "tl/ovl");
        let mut row = |label: &str, workload: &str, param: u64, metric: &str, unit: Unit| {
            let _ = write!(t, "{label:<26}");
            for b in &self.backends {
                let v = self.median(b, workload, param, metric);
                let _ = write!(t, "{:>w$}", v.map_or("-".into(), |v| unit.show(v)));
            }
            let ratio = |of: &str, to: &str| match (
                self.median(of, workload, param, metric),
                self.median(to, workload, param, metric),
            ) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let _ = writeln!(
                t,
                "{:>10}{:>10}{:>10}",
                ratio("thinlayer", "floor"),
                ratio("thinlayer-warm", "floor"),
                ratio("thinlayer", "overlay-ext4")
            );
        };
        row("create (snapshot) ms", "start", 0, "create-ms", Unit::Ms);
        row(
            "mount (activate+mount) ms",
            "start",
            0,
            "mount-ms",
            Unit::Ms,
        );
        row("start path ms", "start", 0, "start-ms", Unit::Ms);
        row("commit ms", "start", 0, "commit-ms", Unit::Ms);
        row("remove (umount+rm) ms", "start", 0, "remove-ms", Unit::Ms);
        row("rm alone ms", "start", 0, "rm-ms", Unit::Ms);
        row("idle work (warm) ms", "start", 0, "idle-ms", Unit::Ms);
        for &p in &self.params.populations {
            row(
                &format!("start @{p} snapshots ms"),
                "population",
                p as u64,
                "start-ms",
                Unit::Ms,
            );
            row(
                &format!("remove @{p} snapshots ms"),
                "population",
                p as u64,
                "remove-ms",
                Unit::Ms,
            );
        }
        for &s in &self.params.file_sizes {
            let mib = s >> 20;
            row(
                &format!("1st 4K write {mib}M: ms"),
                "first-write",
                s,
                "ms",
                Unit::Ms,
            );
            row(
                &format!("1st 4K write {mib}M: alloc"),
                "first-write",
                s,
                "alloc-bytes",
                Unit::Bytes,
            );
            row(
                &format!("1st 4K write {mib}M: dev"),
                "first-write",
                s,
                "device-bytes",
                Unit::Bytes,
            );
        }
        let big = self.params.file_sizes.last().copied().unwrap_or(0);
        row("random 4K writes ms", "random-write", big, "ms", Unit::Ms);
        row(
            "random 4K writes alloc",
            "random-write",
            big,
            "alloc-bytes",
            Unit::Bytes,
        );
        row("cold seq read MB/s", "seq-read", big, "MB/s", Unit::Plain);
        let m = self.params.meta_files as u64;
        row("metadata create ms", "metadata", m, "create-ms", Unit::Ms);
        row("metadata stat ms", "metadata", m, "stat-ms", Unit::Ms);
        row("metadata unlink ms", "metadata", m, "unlink-ms", Unit::Ms);
        row("image import ms", "import", 0, "ms", Unit::Ms);
        row(
            "image import alloc",
            "import",
            0,
            "alloc-bytes",
            Unit::Bytes,
        );
        let c = self.params.cache_containers as u64;
        row(
            &format!("page cache, {c} readers"),
            "page-cache",
            c,
            "cached-bytes",
            Unit::Bytes,
        );
        row(
            "space per trivial ctr",
            "trivial",
            0,
            "alloc-bytes",
            Unit::Bytes,
        );
        row(
            "host bytes per trivial ctr",
            "trivial",
            0,
            "backing-bytes",
            Unit::Bytes,
        );
        row(
            "space returned on rm",
            "trivial",
            0,
            "returned-bytes",
            Unit::Bytes,
        );
        row(
            "host bytes returned on rm",
            "trivial",
            0,
            "backing-returned-bytes",
            Unit::Bytes,
        );
        let _ = writeln!(t);
        let _ = writeln!(t, "start path p95 ms:");
        for b in &self.backends {
            if let Some(s) = self.stat(b, "start", 0, "start-ms") {
                let _ = writeln!(
                    t,
                    "  {b:<14} median {:>8.1}  p95 {:>8.1}  (n={})",
                    s.median, s.p95, s.n
                );
            }
        }
        let bs: Vec<&Stat> = self
            .stats
            .iter()
            .filter(|s| s.workload == "block-size")
            .collect();
        if !bs.is_empty() {
            let _ = writeln!(
                t,
                "\npool block size (thinlayer, {} MiB file):",
                self.params.block_file >> 20
            );
            for &b in &self.params.block_sizes {
                let get = |m: &str| {
                    self.stats
                        .iter()
                        .find(|s| s.workload == "block-size" && s.param == b && s.metric == m)
                        .map(|s| s.median)
                };
                let _ = writeln!(
                    t,
                    "  {:>5} KiB: first 4K write {} ms, allocates {}; trivial container {}",
                    b >> 10,
                    get("ms").map_or("-".into(), |v| format!("{v:.1}")),
                    get("alloc-bytes").map_or("-".into(), |v| Unit::Bytes.show(v)),
                    get("trivial-bytes").map_or("-".into(), |v| Unit::Bytes.show(v)),
                );
            }
        }
        self.loop_vs_disk(&mut t);
        crate::docker::table(self, &mut t);
        let ioctls: Vec<&Stat> = self.stats.iter().filter(|s| s.workload == "step").collect();
        if !ioctls.is_empty() {
            let _ = writeln!(t, "\nper-step costs (median ms):");
            for s in ioctls {
                let _ = writeln!(t, "  {:<10} {:<40} {:>8.2}", s.backend, s.metric, s.median);
            }
        }
        if self.params.populations.len() > 1 {
            let (lo, hi) = (
                self.params.populations[0] as u64,
                *self.params.populations.last().expect("len > 1") as u64,
            );
            let _ = writeln!(t, "\nflatness, start path @{hi} / @{lo} (target <= 1.2):");
            for b in &self.backends {
                if let (Some(a), Some(z)) = (
                    self.median(b, "population", lo, "start-ms"),
                    self.median(b, "population", hi, "start-ms"),
                ) {
                    let _ = writeln!(t, "  {b:<14} {:.2}", z / a);
                }
            }
        }
        let _ = writeln!(t, "\nphases (s):");
        for (name, secs) in &self.phases {
            let _ = writeln!(t, "  {secs:>6.1}  {name}");
        }
        for n in &self.notes {
            let _ = writeln!(t, "note: {n}");
        }
        let _ = writeln!(
            t,
            "kernel {}, {} mode, {:.0} s",
            self.kernel,
            if self.quick { "quick" } else { "full" },
            self.wall_seconds
        );
        t
    }
}

impl Report {
    /// The `--disk` section: each figure for the pool on loop files and
    /// the pool on the disk, and their ratio.
    fn loop_vs_disk(&self, t: &mut String) {
        use crate::workloads::{ON_DISK, ON_FILES, PAIR};
        let Some(disk) = &self.disk else { return };
        let _ = writeln!(
            t,
            "\nloop files against the disk {disk} (median):\n  {:<28}{:>12}{:>12}{:>11}",
            "figure", "loop files", "disk", "loop/disk"
        );
        for (label, metric, unit) in [
            ("start path ms", "start-ms", Unit::Ms),
            ("remove (umount+rm) ms", "remove-ms", Unit::Ms),
            ("1st 4K write ms", "first-write-ms", Unit::Ms),
            (
                "1st 4K write: to disk",
                "first-write-disk-bytes",
                Unit::Bytes,
            ),
            ("cold seq read MB/s", "seq-read-MB/s", Unit::Plain),
            ("random 4K writes ms", "random-write-ms", Unit::Ms),
            ("seq write MB/s", "seq-write-MB/s", Unit::Plain),
            ("rm after the write ms", "rm-ms", Unit::Ms),
            ("rm: discarded on disk", "rm-discard-bytes", Unit::Bytes),
        ] {
            let (a, b) = (
                self.median(ON_FILES, PAIR, 0, metric),
                self.median(ON_DISK, PAIR, 0, metric),
            );
            let show = |v: Option<f64>| v.map_or("-".into(), |v| unit.show(v));
            let ratio = match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let _ = writeln!(t, "  {label:<28}{:>12}{:>12}{ratio:>11}", show(a), show(b));
        }
    }
}

#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Bytes,
    Plain,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Ms => format!("{v:.1}"),
            Unit::Plain => format!("{v:.0}"),
            Unit::Bytes => {
                let a = v.abs();
                if a >= (1u64 << 30) as f64 {
                    format!("{:.2}G", v / (1u64 << 30) as f64)
                } else if a >= (1u64 << 20) as f64 {
                    format!("{:.1}M", v / (1u64 << 20) as f64)
                } else if a >= 1024.0 {
                    format!("{:.0}K", v / 1024.0)
                } else {
                    format!("{v:.0}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::median_p95;

    #[test]
    fn median_and_p95_by_nearest_rank() {
        let (m, p) = median_p95(&[5.0, 1.0, 3.0]);
        assert_eq!((m, p), (3.0, 5.0));
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let (m, p) = median_p95(&v);
        assert_eq!((m, p), (10.5, 19.0));
        assert!(median_p95(&[]).0.is_nan());
    }
}
