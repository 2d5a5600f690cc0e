//! `thinlayer bench`: thinlayer's dm-thin snapshots measured side by side
//! with the raw device-mapper floor, overlayfs (on ext4, and on XFS with
//! reflink), btrfs snapshots and a full copy per container, in one run on
//! one kernel.
//!
//! Protocol: every backend gets a device of the same size (a sparse file on
//! tmpfs behind a loop device); workloads run with the backends
//! interleaved, sample by sample, so drift in the guest hits all alike;
//! write phases end with fsync; cold figures drop the page cache first;
//! space is read from the backend's own accounting (pool blocks, `statvfs`)
//! next to the bytes the backing loop device was sent (`/proc/diskstats`).
//!
//! Given a disk (`--disk DEV`), also thinlayer on loop files in ext4 on
//! that disk against thinlayer on the disk itself (`src/disk.rs`): the loop
//! layer's cost, in its own section of the table.
//!
//! With `--docker`, also a real dockerd with Docker's overlay2, vfs and
//! devicemapper drivers and thinlayer's plugin, one after another, on the
//! same image and operations (`src/docker.rs`), in its own section.
//!
//! With `--containerd`, also one containerd with its own `overlayfs`,
//! `native` and `devmapper` snapshotters and thinlayer as a proxy plugin,
//! all four driven through containerd's Snapshots service by one client
//! (`src/containerd.rs`), in its own section.
//!
//! Output: a table with medians and the thinlayer/floor and
//! thinlayer/overlayfs ratios, `bench.json` with every sample, PNG plots.
//!
//! What must never happen: a kernel step mocked, a `dmsetup` process, a
//! device or mount left behind after the run (teardown runs on error too).

pub mod backend;
mod btrfs;
mod containerd;
mod disk;
mod docker;
pub mod error;
mod plot;
pub mod report;
pub mod sys;
mod table;
mod workloads;

use std::path::PathBuf;

pub use docker::{dockerd_command, dockerd_host};
pub use error::{Error, Result};
pub use report::{Report, Sample, Stat};

/// What to run, and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory for `bench.json` and the plots (created).
    pub out: PathBuf,
    /// Quick mode: fewer samples, smaller files and populations (CI).
    pub quick: bool,
    /// Scratch directory for the backing files (tmpfs in the VM).
    pub work: PathBuf,
    /// Directory of the built image fixtures (`tests/fixtures/make-images`),
    /// for the import workload; skipped (and said so) when missing.
    pub fixtures: PathBuf,
    /// A disk to measure loop files against (`src/disk.rs`); what it holds
    /// is lost. `None`: that pair is not run.
    pub disk: Option<PathBuf>,
    /// Also the docker workload (`src/docker.rs`): needs dockerd, the
    /// docker CLI and the `other-docker.tar` fixture.
    pub docker: bool,
    /// Only the ext4 layout workload: pool blocks per trivial container
    /// for each mkfs candidate (`bench.json` and the table; no plots).
    pub layout: bool,
    /// Also the containerd workload (`src/containerd.rs`): needs
    /// containerd, ctr, runc, dmsetup, the dm thin-pool target and the
    /// `other-docker.tar` fixture.
    pub containerd: bool,
    /// Skip the engine workloads (`--skip-common`): the report holds only
    /// the docker and containerd sections.
    pub skip_common: bool,
    /// Populations to use instead of the mode's (`--populations`), for the
    /// start-path workload and the containerd workload alike.
    pub populations: Option<Vec<usize>>,
    /// Samples per figure instead of the mode's (`--samples`), for every
    /// workload: the engine's, docker's, containerd's and `ctr run`'s.
    pub samples: Option<usize>,
}

/// The sizes and counts of one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Params {
    /// Samples per latency figure.
    pub samples: usize,
    /// Snapshot populations the start path is measured at.
    pub populations: Vec<usize>,
    /// File sizes of the first-write workload, bytes.
    pub file_sizes: Vec<u64>,
    /// Samples per first-write size.
    pub write_samples: usize,
    /// Random 4 KiB overwrites in the largest file.
    pub random_writes: usize,
    /// Files created, stated and unlinked by the metadata workload.
    pub meta_files: usize,
    /// Pool block sizes compared, bytes.
    pub block_sizes: Vec<u64>,
    /// File size of the block-size workload, bytes.
    pub block_file: u64,
    /// Containers reading one image in the page-cache workload.
    pub cache_containers: usize,
    /// Bytes of files each of them reads.
    pub cache_bytes: u64,
    /// Containers of the trivial-space and removal workload.
    pub trivial_containers: usize,
    /// Backing device size per backend, bytes (sparse).
    pub device_size: u64,
    /// Virtual size of each thin device, bytes.
    pub thin_size: u64,
    /// Samples per figure of the docker workload (`--docker`): a multiple
    /// of its four drivers, so that its interleaved order is balanced.
    pub docker_samples: usize,
    /// Snapshot populations of the containerd workload (`--containerd`).
    pub containerd_populations: Vec<usize>,
    /// Containers (Prepare ... Remove cycles) per population there.
    pub containerd_samples: usize,
    /// `ctr run --rm` samples per snapshotter.
    pub ctr_run_samples: usize,
}

impl Params {
    /// The figures for quick (CI) or full mode.
    pub fn new(quick: bool) -> Params {
        const MIB: u64 = 1 << 20;
        if quick {
            Params {
                samples: 7,
                // Quick mode stops at 50: removing a thin snapshot costs a
                // device activation and a discard, which dominates the run.
                populations: vec![10, 50],
                file_sizes: vec![4 * MIB, 16 * MIB, 32 * MIB],
                write_samples: 3,
                random_writes: 128,
                meta_files: 200,
                block_sizes: vec![64 << 10, 512 << 10, MIB],
                block_file: 8 * MIB,
                cache_containers: 10,
                cache_bytes: 4 * MIB,
                trivial_containers: 10,
                device_size: 4 << 30,
                thin_size: 2 << 30,
                docker_samples: 8,
                containerd_populations: vec![10, 100],
                containerd_samples: 10,
                ctr_run_samples: 5,
            }
        } else {
            Params {
                samples: 21,
                populations: vec![10, 100, 1000],
                file_sizes: vec![16 * MIB, 256 * MIB, 1 << 30],
                write_samples: 5,
                random_writes: 1024,
                meta_files: 2000,
                block_sizes: vec![64 << 10, 512 << 10, MIB],
                block_file: 256 * MIB,
                cache_containers: 10,
                cache_bytes: 64 * MIB,
                trivial_containers: 20,
                device_size: 16 << 30,
                thin_size: 4 << 30,
                docker_samples: 16,
                containerd_populations: vec![10, 100, 1000],
                containerd_samples: 30,
                ctr_run_samples: 5,
            }
        }
    }
}

/// Runs the benchmark: builds the backends, runs every workload, writes
/// `bench.json` and the plots under `opts.out`, and returns the report
/// (whose [`Report::table`] is the terminal summary).
///
/// # Errors
/// Any backend or workload error (the backends are torn down first), and
/// output write errors.
pub fn run(opts: &Options) -> Result<Report> {
    let mut params = Params::new(opts.quick);
    if let Some(pops) = &opts.populations {
        params.populations.clone_from(pops);
        params.containerd_populations.clone_from(pops);
    }
    if let Some(n) = opts.samples {
        params.samples = n;
        params.write_samples = n;
        params.docker_samples = n;
        params.containerd_samples = n;
        params.ctr_run_samples = n;
    }
    if opts.layout {
        let report = workloads::run_layout(opts, &params)?;
        sys::mkdir(&opts.out)?;
        report.write_json(&opts.out.join("bench.json"))?;
        return Ok(report);
    }
    if opts.docker {
        docker::preflight(opts)?;
    }
    if opts.containerd {
        containerd::preflight(opts)?;
    }
    let mut report = if opts.skip_common {
        workloads::empty_report(opts, &params)
    } else {
        workloads::run_all(opts, &params)?
    };
    if opts.docker {
        docker::run(&mut report, opts, &params)?;
    }
    if opts.containerd {
        containerd::run(&mut report, opts, &params)?;
    }
    sys::mkdir(&opts.out)?;
    report.write_json(&opts.out.join("bench.json"))?;
    plot::all(&report, &opts.out)?;
    Ok(report)
}
