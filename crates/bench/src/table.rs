//! The terminal table of a run: medians per backend, the ratios against
//! the floor and overlayfs, flatness, the `--disk` pair and the docker
//! section. Kept apart from the report's data so the data does not depend
//! on the workloads that fill it.

use std::fmt::Write as _;

use crate::report::{Report, Stat};

impl Report {
    /// The terminal summary: medians per backend, p95 for the start path,
    /// and the thinlayer/floor, thinlayer-warm/floor and
    /// thinlayer/overlay-ext4 ratios.
    pub fn table(&self) -> String {
        let mut t = String::new();
        if self.backends.is_empty() {
            // `--layout` alone, or `--skip-common`.
            self.layout(&mut t);
            crate::docker::table(self, &mut t);
            crate::containerd::table(self, &mut t);
            for n in &self.notes {
                let _ = writeln!(t, "note: {n}");
            }
            let _ = writeln!(t, "kernel {}, {:.0} s", self.kernel, self.wall_seconds);
            return t;
        }
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
        crate::containerd::table(self, &mut t);
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
    /// The `--layout` section: pool blocks and bytes per trivial container
    /// for each ext4 layout candidate, in the order measured.
    fn layout(&self, t: &mut String) {
        let mut rows: Vec<&Stat> = self
            .stats
            .iter()
            .filter(|s| s.workload == "layout" && s.metric == "trivial-blocks")
            .collect();
        if rows.is_empty() {
            return;
        }
        rows.sort_by_key(|s| s.param);
        let _ = writeln!(
            t,
            "ext4 layout: space per trivial container (3 files of 100 bytes + 1 mkdir, 64 KiB pool blocks)"
        );
        let _ = writeln!(t, "  {:<32}{:>8}{:>10}", "candidate", "blocks", "KiB");
        for s in rows {
            let _ = writeln!(
                t,
                "  {:<32}{:>8.1}{:>10.0}",
                s.backend,
                s.median,
                s.median * 64.0
            );
        }
    }

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
