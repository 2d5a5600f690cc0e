//! `thinlayer-bench`: the benchmark as its own program, so the `thinlayer`
//! binary links no plotting (`thinlayer bench ...` execs this one, found
//! next to `thinlayer` or on PATH, with the same arguments).
//!
//! It parses its flags, runs [`thinlayer_bench::run`] once and prints the
//! table (or JSON with `--json`). Exit codes: 0 success, 1 the run failed,
//! 2 bad usage; what must never happen is a device or mount left behind,
//! which the library's teardown guarantees on error too.

use std::{
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::Parser;
use serde_json::json;
use tracing_subscriber::EnvFilter;

/// Measure thinlayer against the raw dm floor, overlayfs, btrfs and full copies.
#[derive(Parser, Debug)]
#[command(name = "thinlayer-bench", bin_name = "thinlayer bench", version)]
struct BenchArgs {
    /// Directory for bench.json (every sample), the PNG plots and, with
    /// --docker or --containerd, the daemons' logs (logs/).
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Fewer samples, smaller files and populations (about 2 minutes in the VM).
    #[arg(long)]
    quick: bool,
    /// Scratch directory for the backends' sparse backing files (use tmpfs).
    #[arg(long, default_value = "/tmp/thinlayer-bench")]
    work: PathBuf,
    /// Built image fixtures (tests/fixtures/make-images), for the import workload.
    #[arg(long, default_value = "target/fixtures/images")]
    fixtures: PathBuf,
    /// Also measure thinlayer on loop files in ext4 on this disk against
    /// thinlayer on the disk itself (the loop layer's cost). WHAT THE DISK
    /// HOLDS IS LOST; a disk mounted or in use is refused.
    #[arg(long, value_name = "DEV", env = "THINLAYER_BENCH_DISK")]
    disk: Option<PathBuf>,
    /// Also measure a real dockerd with Docker's overlay2, vfs and devicemapper
    /// drivers and thinlayer's plugin, one after another (needs dockerd and the
    /// docker CLI: THINLAYER_VM_EXTRAS=docker in the VM).
    #[arg(long, group = "section")]
    docker: bool,
    /// Only the ext4 layout workload: the pool blocks a trivial container
    /// copies for each mkfs candidate, as a table.
    #[arg(long)]
    layout: bool,
    /// Also measure one containerd with its overlayfs, native and devmapper
    /// snapshotters (devmapper on a thin-pool the bench makes) and thinlayer
    /// as a proxy plugin, all through containerd's Snapshots service, and
    /// `ctr run --rm` on each (needs containerd, ctr, runc, dmsetup and
    /// dm-thin: THINLAYER_VM_EXTRAS=docker in the VM).
    #[arg(long, group = "section")]
    containerd: bool,
    /// Skip the engine workloads (thinlayer against the floor, overlayfs,
    /// btrfs and full copies): only the --docker and --containerd sections.
    #[arg(long, requires = "section")]
    skip_common: bool,
    /// Snapshot populations instead of the mode's, comma-separated (e.g.
    /// `3` for a fast check): the start-path workload's and containerd's.
    #[arg(long, value_delimiter = ',', value_name = "N,...", value_parser = clap::value_parser!(usize))]
    populations: Option<Vec<usize>>,
    /// Samples per figure instead of the mode's, for every workload (e.g.
    /// `3` for a fast check; medians of few samples are rough).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    samples: Option<u32>,
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
    /// Log what is done (repeat for more); RUST_LOG also works.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let a = BenchArgs::parse();
    init_logging(a.verbose);
    let opts = thinlayer_bench::Options {
        out: a.out.clone(),
        quick: a.quick,
        work: a.work.clone(),
        fixtures: a.fixtures.clone(),
        disk: a.disk.clone(),
        docker: a.docker,
        layout: a.layout,
        containerd: a.containerd,
        skip_common: a.skip_common,
        populations: a.populations.clone(),
        samples: a.samples.map(|n| n as usize),
    };
    match thinlayer_bench::run(&opts) {
        Ok(report) => {
            let printed = if a.json {
                let v = json!({"out": a.out, "stats": report.stats});
                writeln!(io::stdout(), "{v:#}")
            } else {
                writeln!(
                    io::stdout(),
                    "{}every sample: {}; plots: {}/*.png",
                    report.table(),
                    a.out.join("bench.json").display(),
                    a.out.display()
                )
            };
            match printed {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            if a.json {
                let _ = writeln!(
                    io::stderr(),
                    "{}",
                    json!({"error": e.to_string(), "exit_code": 1})
                );
            } else {
                let _ = writeln!(io::stderr(), "thinlayer bench: error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `-v` (info) or `-vv` (debug), else warnings; RUST_LOG wins.
fn init_logging(verbose: u8) {
    let level = ["warn", "info", "debug"][usize::from(verbose.min(2))];
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let log = tracing_subscriber::fmt().with_env_filter(filter);
    log.with_writer(io::stderr)
        .with_ansi(ansi)
        .without_time()
        .init();
}
