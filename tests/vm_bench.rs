//! `thinlayer bench --quick` in the VM: it finishes, and its JSON holds
//! every backend and every workload, with figures that make sense on their
//! face (no timing is asserted: TCG times are only comparable within a run).

mod common;

use common::swept;

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use serde_json::Value;

const BACKENDS: [&str; 7] = [
    "thinlayer",
    "thinlayer-warm",
    "floor",
    "overlay-ext4",
    "overlay-xfs",
    "btrfs",
    "vfs-copy",
];

/// Workloads every backend runs.
const COMMON: [&str; 8] = [
    "start",
    "population",
    "first-write",
    "seq-read",
    "random-write",
    "metadata",
    "page-cache",
    "trivial",
];

fn stat(report: &Value, backend: &str, workload: &str, param: u64, metric: &str) -> f64 {
    report["stats"]
        .as_array()
        .expect("stats")
        .iter()
        .find(|s| {
            s["backend"] == backend
                && s["workload"] == workload
                && s["param"] == param
                && s["metric"] == metric
        })
        .unwrap_or_else(|| panic!("no {backend} {workload} {param} {metric} in bench.json"))
        ["median"]
        .as_f64()
        .expect("a number")
}

#[test]
fn vm_bench_quick_writes_every_backend_and_workload() {
    // Not vm_test: the bench makes and removes its own pools (and raw dm
    // stacks) under its own scratch; the sweeps still guard it.
    swept(|| {
        let base = std::env::temp_dir().join(format!("tl-bench-{}", std::process::id()));
        let out = base.join("out");
        // One small population and three samples per figure: the
        // workload's shape is checked, not its growth (the full bench
        // measures 10 / 100 / 1,000) or its spread.
        let stdout = bench(&base, &["--populations", "5", "--samples", "3"]);
        for ratio in ["tl/floor", "tl/ovl", "create", "mount", "commit", "remove"] {
            assert!(
                stdout.contains(ratio),
                "the table lacks `{ratio}`:\n{stdout}"
            );
        }

        let report: Value =
            serde_json::from_str(&fs::read_to_string(out.join("bench.json")).expect("bench.json"))
                .expect("bench.json is JSON");
        let samples = report["samples"].as_array().expect("samples");
        assert_eq!(report["params"]["samples"], 3, "--samples 3 is not used");
        assert_eq!(
            samples
                .iter()
                .filter(|s| s["backend"] == "thinlayer"
                    && s["workload"] == "start"
                    && s["param"] == 0
                    && s["metric"] == "create-ms")
                .count(),
            3,
            "thinlayer's create was not sampled 3 times"
        );
        let seen: BTreeSet<(String, String)> = samples
            .iter()
            .map(|s| {
                (
                    s["backend"].as_str().unwrap().to_owned(),
                    s["workload"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for b in BACKENDS {
            for w in COMMON {
                assert!(
                    seen.contains(&(b.to_owned(), w.to_owned())),
                    "no {w} samples for {b}"
                );
            }
        }
        for (b, w) in [
            ("thinlayer", "import"),
            ("overlay-ext4", "import"),
            ("overlay-xfs", "import"),
            ("thinlayer", "block-size"),
            ("thinlayer", "step"),
            ("floor", "step"),
        ] {
            assert!(
                seen.contains(&(b.to_owned(), w.to_owned())),
                "no {w} samples for {b} (notes: {})",
                report["notes"]
            );
        }
        // The warm engine's between-requests work is timed on its own.
        assert!(stat(&report, "thinlayer-warm", "start", 0, "idle-ms") >= 0.0);
        let sizes: Vec<u64> = report["params"]["file_sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let largest = *sizes.last().unwrap();

        // Block CoW: the first 4 KiB write into the largest file allocates a
        // few pool blocks (the data block, plus inode and journal blocks), far
        // below the file's size; overlayfs on ext4 copies the whole file up.
        let thin = stat(&report, "thinlayer", "first-write", largest, "alloc-bytes");
        assert!(
            thin < (1 << 20) as f64,
            "thinlayer's first write allocated {thin} bytes"
        );
        let upper = stat(
            &report,
            "overlay-ext4",
            "first-write",
            largest,
            "upper-bytes",
        );
        assert!(
            upper >= largest as f64,
            "overlay-ext4's upper dir holds {upper} bytes after a write into a {largest}-byte file"
        );

        for png in [
            "start-vs-population.png",
            "first-write-bytes.png",
            "start-distribution.png",
        ] {
            let bytes = fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
            assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
        }
        let _ = fs::remove_dir_all(&base);
    });
}

/// containerd's snapshotters and thinlayer's proxy through containerd's
/// Snapshots service (`--containerd`), on a tiny population: every
/// snapshotter has every step of the cycle, its deferred garbage
/// collection and `ctr run --rm`, in the table and in bench.json, and the
/// run leaves no dm device of its own behind. Needs containerd, ctr and
/// runc in the guest (THINLAYER_VM_EXTRAS=docker).
#[test]
fn vm_bench_containerd_measures_every_snapshotter() {
    const SNAPSHOTTERS: [&str; 4] = ["overlayfs", "native", "devmapper", "thinlayer"];
    const STEPS: [&str; 8] = [
        "prepare-ms",
        "mounts-ms",
        "mount-ms",
        "umount-ms",
        "start-ms",
        "commit-ms",
        "remove-ms",
        "gc-ms",
    ];
    swept(|| {
        let base = std::env::temp_dir().join(format!("tl-bench-ctrd-{}", std::process::id()));
        let out = base.join("out");
        let stdout = bench(
            &base,
            &[
                "--containerd",
                "--skip-common",
                "--populations",
                "3",
                "--samples",
                "2",
            ],
        );
        let section = stdout
            .split_once("\ncontainerd, one client")
            .unwrap_or_else(|| panic!("no containerd section in the table:\n{stdout}"))
            .1;
        for w in SNAPSHOTTERS.iter().chain(&[
            "tl/ovl",
            "tl/dm",
            "at 3 snapshots",
            "start path ms",
            "ctr run --rm",
        ]) {
            assert!(
                section.contains(w),
                "the containerd table lacks `{w}`:\n{section}"
            );
        }

        let report: Value =
            serde_json::from_str(&fs::read_to_string(out.join("bench.json")).expect("bench.json"))
                .expect("bench.json is JSON");
        let notes = report["notes"].to_string();
        assert!(
            !notes.contains("not measured past this error"),
            "a snapshotter failed: {notes}"
        );
        let ctrd = |sn: &str, param: u64, metric: &str| -> f64 {
            report["stats"]
                .as_array()
                .expect("stats")
                .iter()
                .find(|s| {
                    s["backend"] == sn
                        && s["workload"] == "containerd"
                        && s["param"] == param
                        && s["metric"] == metric
                })
                .unwrap_or_else(|| panic!("no containerd {sn} {param} {metric} in bench.json"))
                ["median"]
                .as_f64()
                .expect("a number")
        };
        for sn in SNAPSHOTTERS {
            for m in STEPS {
                let v = ctrd(sn, 3, m);
                assert!(v >= 0.0, "{sn} {m}: {v}");
            }
            assert!(ctrd(sn, 0, "run-rm-ms") > 0.0, "{sn}: ctr run --rm");
            let runs = report["samples"]
                .as_array()
                .expect("samples")
                .iter()
                .filter(|s| s["backend"] == sn && s["metric"] == "run-rm-ms")
                .count();
            assert_eq!(
                runs, 2,
                "{sn}: `ctr run --rm` ran {runs} times, not --samples 2"
            );
            assert!(ctrd(sn, 0, "run-rm-gc-ms") >= 0.0, "{sn}: its gc");
        }
        for png in [
            "containerd-start-path.png",
            "containerd-commit-remove.png",
            "containerd-ctr-run.png",
            "containerd-vs-population.png",
        ] {
            let bytes = fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
            assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
        }
        let left: Vec<String> = common::dm_devices()
            .into_iter()
            .filter(|n| n.starts_with("tlbench-ctrd"))
            .collect();
        assert!(
            left.is_empty(),
            "the devmapper pool's devices are left: {left:?}"
        );
        assert!(!Path::new("/dev/mapper/tlbench-ctrd-pool").exists());
        let _ = fs::remove_dir_all(&base);
    });
}

/// Runs `thinlayer bench --quick EXTRA...` with its output and work under
/// `base` (made afresh) and the built fixtures; asserts it succeeds and
/// returns (and prints) what it printed.
fn bench(base: &Path, extra: &[&str]) -> String {
    let _ = fs::remove_dir_all(base);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/images");
    let run = Command::new(common::bin())
        .args(["bench", "--quick"])
        .args(extra)
        .arg("--out")
        .arg(base.join("out"))
        .arg("--work")
        .arg(base.join("work"))
        .arg("--fixtures")
        .arg(&fixtures)
        .output()
        .expect("run thinlayer bench");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "thinlayer bench {extra:?} failed ({}):\n{stdout}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{stdout}");
    stdout
}
