//! `thinlayer`: the command line over the engine in `crates/pool`.
//!
//! Each verb is one short function: parse flags into the engine's options,
//! call the engine once, print the result (text, or JSON with `--json`),
//! and map errors to the exit codes documented in README.md. Broken pipes
//! exit 0.

mod store_cli;

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use thinlayer_pool::{
    Action, Backing, BlockSize, Bytes, CreateOptions, DevicePair, Error, FsType, LockMode, Owner,
    Pool, PoolStatus, Removal, WatchOptions, exit,
    space::{self, ExtendReport, ExtendRequest, SizeChange},
};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed (kernel, tool or I/O error)
  2  bad usage or input (flags, sizes, names)
  3  no such pool or layer
  4  conflict: exists, has children, mounted, busy, locked
  5  the host cannot: not root, no device-mapper, no dm-thin, missing tool
  6  out of space
  7  damaged records or pool metadata";

/// Block-level thin-provisioning snapshots for container storage.
#[derive(Parser, Debug)]
#[command(name = "thinlayer", version, after_help = EXIT_CODES)]
struct Cli {
    /// Directory holding the pool's files and records.
    #[arg(
        long,
        global = true,
        env = "THINLAYER_ROOT",
        default_value = "/var/lib/thinlayer"
    )]
    root: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Wait for another thinlayer command on this root instead of failing.
    #[arg(long, global = true)]
    wait: bool,
    /// Log what is done (repeat for more); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, inspect, activate and remove the pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Create, list and remove layers (thin snapshots).
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Mount a layer's filesystem at DIR (created if missing).
    Mount {
        /// The layer.
        id: String,
        /// Where to mount it.
        dir: PathBuf,
        /// Mount read-only.
        #[arg(long)]
        readonly: bool,
    },
    /// Unmount a layer (by id: every mount of it) or one mount (by DIR).
    Umount {
        /// A layer id or a mount directory.
        target: String,
    },
    /// Import, list and remove images.
    #[command(subcommand)]
    Image(store_cli::ImageCommand),
    /// Create, mount, diff, commit and remove containers.
    #[command(subcommand)]
    Container(store_cli::ContainerCommand),
    /// Measure thinlayer against the raw dm floor, overlayfs, btrfs and full copies.
    Bench(BenchArgs),
    /// Create, clone, list, mount and remove thin volumes.
    #[command(subcommand)]
    Volume(store_cli::VolumeCommand),
    /// Serve the pool to a container runtime (runs until SIGTERM).
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(subcommand)]
    to: ServeTo,
}

#[derive(Subcommand, Debug)]
enum ServeTo {
    /// containerd's snapshots API (a proxy snapshotter plugin) on a Unix socket.
    Containerd {
        /// The socket to listen on (a stale one is replaced; anything else there is kept and refused).
        #[arg(long, default_value = thinlayer_snapshotter::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        group: SocketGroup,
    },
    /// Docker's plugin: graphdriver (`dockerd --experimental -s thinlayer`)
    /// and volume driver (`-d thinlayer`) on one Unix socket; start it before dockerd.
    Docker {
        /// The socket to listen on; its name is the driver's (a stale one is
        /// replaced; anything else there is kept and refused).
        #[arg(long, default_value = thinlayer_backend::docker::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        group: SocketGroup,
    },
    /// Docker's volume plugin protocol alone (thin volumes) on a Unix socket.
    DockerVolume {
        /// The socket to listen on (a stale one is replaced; anything else there is kept and refused).
        #[arg(long, default_value = thinlayer_backend::docker_volume::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        group: SocketGroup,
    },
}

#[derive(Args, Debug)]
struct SocketGroup {
    /// Also let this group (a name or a gid) use the socket: it is then
    /// 0660 root:GROUP in a 0750 directory, instead of root's only (0600 in 0700).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Directory for bench.json (every sample) and the PNG plots.
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
    #[arg(long)]
    docker: bool,
}

#[derive(Subcommand, Debug)]
enum PoolCommand {
    /// Create the pool: sparse files (or two block devices), thin-pool, base filesystem.
    Create(CreateArgs),
    /// Take over an existing thin-pool (LVM's or hand-made): its thin ids stay untouched.
    Adopt(AdoptArgs),
    /// Show capacity, usage and state, read from the kernel.
    Status,
    /// Bring the pool's devices back from the records (after a reboot).
    Activate,
    /// Tear down the pool's devices, keeping all data.
    Deactivate,
    /// Grow the data and/or metadata online (layers may stay mounted).
    Extend(ExtendArgs),
    /// Extend the pool by itself when its use crosses a threshold.
    Watch(WatchArgs),
    /// Remove the pool, its files and records (block devices are left as they are).
    Destroy {
        /// Also remove its layers, unmounting them first.
        #[arg(long)]
        force: bool,
        /// For a pool on block devices: wipe them (labels and metadata zeroed, discarded).
        #[arg(long)]
        wipe: bool,
    },
    /// Check records against the kernel and the pool metadata (exit 7 on findings).
    Check,
    /// Settle what a crash left; --force also removes devices and thin ids no record knows.
    Recover {
        /// Also remove thin devices and thin ids that no record knows.
        #[arg(long)]
        force: bool,
    },
    /// Rebuild damaged metadata of an inactive pool with thin_repair (the damaged copy is kept).
    Repair,
    /// Finish what `layer rm --later` left: discard (space back to the host) and delete trashed thin ids.
    Reclaim,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Capacity of the sparse data file (K, M, G, T: powers of 1024) [default: 20G;
    /// on a data device: all of it].
    #[arg(long, value_parser = parse_bytes)]
    data_size: Option<Bytes>,
    /// Size of the metadata file [default: from data and block size; on a
    /// metadata device: all of it, up to the kernel's 16G limit].
    #[arg(long, value_parser = parse_bytes)]
    metadata_size: Option<Bytes>,
    /// A block device for the data (a disk, a partition, an LVM volume) instead of a file.
    #[arg(long, requires = "metadata_device")]
    data_device: Option<PathBuf>,
    /// A block device for the metadata; with --data-device.
    #[arg(long, requires = "data_device")]
    metadata_device: Option<PathBuf>,
    /// Take devices that hold a filesystem, partition table or other signature (it is lost).
    #[arg(long, requires = "data_device")]
    force: bool,
    /// Copy-on-write unit: a multiple of 64K from 64K to 1G.
    #[arg(long, default_value = "64K", value_parser = parse_block)]
    block_size: BlockSize,
    /// Filesystem of the base device and so of every layer.
    #[arg(long, default_value = "ext4", value_parser = parse_fs)]
    fs: FsType,
    /// Virtual size of the base device and of every layer.
    #[arg(long, default_value = "10G", value_parser = parse_bytes)]
    base_size: Bytes,
    /// Warn in `pool status` at this percent of data or metadata used.
    #[arg(long, default_value_t = 80)]
    low_water: u8,
}

#[derive(Args, Debug)]
struct AdoptArgs {
    /// The thin-pool's device-mapper name (for LVM: VG-POOL-tpool).
    #[arg(long)]
    pool_device: String,
    /// Filesystem of the base device and so of every layer.
    #[arg(long, default_value = "ext4", value_parser = parse_fs)]
    fs: FsType,
    /// Virtual size of the base device and of every layer.
    #[arg(long, default_value = "10G", value_parser = parse_bytes)]
    base_size: Bytes,
    /// Warn in `pool status` at this percent of data or metadata used.
    #[arg(long, default_value_t = 80)]
    low_water: u8,
}

#[derive(Args, Debug)]
struct ExtendArgs {
    /// New data size: +SIZE grows by SIZE, SIZE grows to SIZE (never shrinks).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_change)]
    data_size: Option<SizeChange>,
    /// New metadata size: +SIZE or SIZE, as for --data-size.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_change)]
    metadata_size: Option<SizeChange>,
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// Extend when data or metadata use reaches this percent.
    #[arg(long, default_value_t = 70)]
    threshold: u8,
    /// Grow by this percent of the current size each time.
    #[arg(long, default_value_t = 20)]
    extend_percent: u16,
    /// Never grow the data past this size.
    #[arg(long, value_parser = parse_bytes)]
    max_data_size: Option<Bytes>,
    /// Check (and extend) once, then exit.
    #[arg(long)]
    once: bool,
    /// Exit after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum LayerCommand {
    /// Create a layer: a thin snapshot of PARENT, or of the base device.
    Create {
        /// The new layer's id.
        id: String,
        /// The layer to snapshot.
        #[arg(long)]
        parent: Option<String>,
        /// Apply this layer tar (plain, gzip or zstd; `-` for stdin) into it.
        #[arg(long)]
        from_tar: Option<String>,
    },
    #[command(flatten)]
    Tar(store_cli::LayerTarCommand),
    /// Remove a layer that has no children and is not mounted.
    Rm {
        /// The layer.
        id: String,
        /// If a process holds its device open, let the kernel remove the
        /// device when it lets go; `pool recover` then finishes the removal.
        #[arg(long, conflicts_with = "later")]
        deferred: bool,
        /// Return once the record is gone; the kernel work (discard, so the
        /// host gets the space back, and delete) waits for `pool reclaim`.
        #[arg(long)]
        later: bool,
    },
    /// List layers with their devices and mounts.
    Ls,
    /// Provision snapshots of a layer ahead of demand: made and activated
    /// now, so a later `layer create --parent` of it only writes records
    /// and its mount finds the device ready. Mounting the layer read-write
    /// or removing it drops its spares.
    Provision {
        /// The layer (omit with --base).
        #[arg(required_unless_present = "base", conflicts_with = "base")]
        id: Option<String>,
        /// Provision snapshots of the base device instead.
        #[arg(long)]
        base: bool,
        /// How many spares to keep ready (0 drops them).
        #[arg(long, default_value_t = 1)]
        spares: usize,
    },
}

fn parse_bytes(s: &str) -> Result<Bytes, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_change(s: &str) -> Result<SizeChange, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_block(s: &str) -> Result<BlockSize, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_fs(s: &str) -> Result<FsType, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// What a verb prints: text for people, a JSON value for programs.
pub(crate) struct Output {
    pub(crate) text: String,
    pub(crate) json: serde_json::Value,
}

fn main() -> ExitCode {
    // First: nothing this process makes is readable by other users, even
    // where a path forgets its explicit mode.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if thinlayer_pool::fault::list_requested() {
        for p in thinlayer_pool::fault::ALL {
            println!("{p}");
        }
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let json = cli.json;
    let result = run(cli);
    let code = match result {
        Ok(out) => {
            let printed = if json {
                writeln!(io::stdout(), "{:#}", out.json)
            } else if out.text.is_empty() {
                Ok(())
            } else {
                write!(io::stdout(), "{}", out.text)
            };
            match printed {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => exit::FAILED,
                _ => exit::OK,
            }
        }
        Err(e) => {
            let code = e.exit_code();
            if json {
                let _ = writeln!(
                    io::stderr(),
                    "{}",
                    json!({"error": e.to_string(), "exit_code": code})
                );
            } else {
                let _ = writeln!(io::stderr(), "thinlayer: error: {e}");
            }
            code
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&io::stderr()))
        .without_time()
        .init();
}

fn run(cli: Cli) -> thinlayer_store::Result<Output> {
    let root = cli.root.as_path();
    let (json, wait) = (cli.json, cli.wait);
    match cli.command {
        Command::Image(c) => return store_cli::image(root, c, json, wait),
        Command::Container(c) => return store_cli::container(root, c, wait),
        Command::Bench(a) => return bench(&a),
        Command::Volume(c) => return store_cli::volume(root, c, wait),
        Command::Serve(ServeArgs {
            to: ServeTo::Docker { socket, group },
        }) => {
            let access = thinlayer_pool::socket::Access::new(group.socket_group.as_deref())?;
            let served = thinlayer_backend::docker::serve(root, &socket, &access);
            served.map_err(|e| match e {
                thinlayer_backend::Error::Store(s) => s,
                other => thinlayer_pool::Error::InvalidArgument(other.to_string()).into(),
            })?;
            return Ok(Output {
                text: String::new(),
                json: json!({"stopped": true}),
            });
        }
        Command::Serve(ServeArgs {
            to: ServeTo::DockerVolume { socket, group },
        }) => {
            let access = thinlayer_pool::socket::Access::new(group.socket_group.as_deref())?;
            let served = thinlayer_backend::docker_volume::serve(root, &socket, &access);
            served.map_err(|e| match e {
                thinlayer_backend::Error::Store(s) => s,
                other => thinlayer_pool::Error::InvalidArgument(other.to_string()).into(),
            })?;
            return Ok(Output {
                text: String::new(),
                json: json!({"stopped": true}),
            });
        }
        Command::Serve(ServeArgs {
            to: ServeTo::Containerd { socket, group },
        }) => {
            let access = thinlayer_pool::socket::Access::new(group.socket_group.as_deref())?;
            thinlayer_snapshotter::serve(root, &socket, &access)
                .map_err(thinlayer_pool::Error::from)?;
            return Ok(Output {
                text: String::new(),
                json: json!({"stopped": true}),
            });
        }
        Command::Layer(LayerCommand::Tar(store_cli::LayerTarCommand::Apply {
            id,
            tar,
            parent,
        })) => {
            return store_cli::apply(root, &id, &tar, parent.as_deref(), wait);
        }
        Command::Layer(LayerCommand::Create {
            id,
            parent,
            from_tar: Some(tar),
        }) => return store_cli::apply(root, &id, &tar, parent.as_deref(), wait),
        Command::Layer(LayerCommand::Tar(store_cli::LayerTarCommand::Export { id, output })) => {
            return store_cli::export(root, &id, &output, wait);
        }
        _ => {}
    }
    Ok(run_pool(cli)?)
}

fn run_pool(cli: Cli) -> thinlayer_pool::Result<Output> {
    let root = cli.root.as_path();
    match cli.command {
        Command::Pool(PoolCommand::Create(a)) => pool_create(root, &a, cli.wait),
        Command::Pool(PoolCommand::Adopt(a)) => pool_adopt(root, &a, cli.wait),
        Command::Pool(PoolCommand::Status) => pool_status(root, cli.wait),
        Command::Pool(PoolCommand::Activate) => pool_activate(root, cli.wait),
        Command::Pool(PoolCommand::Deactivate) => pool_deactivate(root, cli.wait),
        Command::Pool(PoolCommand::Extend(a)) => pool_extend(root, &a, cli.wait),
        Command::Pool(PoolCommand::Watch(a)) => pool_watch(root, &a, cli.json),
        Command::Pool(PoolCommand::Destroy { force, wipe }) => {
            pool_destroy(root, force, wipe, cli.wait)
        }
        Command::Pool(PoolCommand::Check) => pool_check(root, cli.json, cli.wait),
        Command::Pool(PoolCommand::Recover { force }) => {
            pool_recover(root, force, cli.json, cli.wait)
        }
        Command::Pool(PoolCommand::Repair) => pool_repair(root, cli.wait),
        Command::Pool(PoolCommand::Reclaim) => pool_reclaim(root, cli.wait),
        Command::Layer(LayerCommand::Create { id, parent, .. }) => {
            layer_create(root, &id, parent.as_deref(), cli.wait)
        }
        Command::Layer(LayerCommand::Rm {
            id,
            deferred,
            later,
        }) => layer_rm(root, &id, deferred, later, cli.wait),
        Command::Layer(LayerCommand::Ls) => layer_ls(root, cli.wait),
        Command::Layer(LayerCommand::Provision { id, spares, .. }) => {
            layer_provision(root, id.as_deref(), spares, cli.wait)
        }
        Command::Mount { id, dir, readonly } => mount(root, &id, &dir, readonly, cli.wait),
        Command::Umount { target } => umount(root, &target, cli.wait),
        Command::Image(_)
        | Command::Container(_)
        | Command::Bench(_)
        | Command::Serve(_)
        | Command::Volume(_)
        | Command::Layer(LayerCommand::Tar(_)) => {
            unreachable!("dispatched to the store and the servers above")
        }
    }
}

fn said(action: Action, done: String, already: String) -> Output {
    let (text, did) = match action {
        Action::Done => (done, true),
        Action::AlreadyDone => (already, false),
    };
    Output {
        json: json!({"changed": did, "message": text}),
        text: format!("{text}\n"),
    }
}

fn pool_create(root: &Path, a: &CreateArgs, wait: bool) -> thinlayer_pool::Result<Output> {
    let opts = CreateOptions {
        data_size: a.data_size.unwrap_or(Bytes(20 << 30)),
        metadata_size: a.metadata_size,
        block_size: a.block_size,
        fs: a.fs,
        base_size: a.base_size,
        low_water_percent: a.low_water,
    };
    let pool = match (&a.data_device, &a.metadata_device) {
        (Some(data), Some(metadata)) => {
            let devices = DevicePair {
                data: data.clone(),
                metadata: metadata.clone(),
                data_size: a.data_size,
                force: a.force,
            };
            Pool::create_on_devices(root, &opts, &devices, wait)?
        }
        _ => Pool::create(root, &opts, wait)?,
    };
    let r = pool.record();
    Ok(Output {
        text: format!(
            "created pool {} under {}: data {}, metadata {}, block size {}, base {} {}{}\n",
            r.pool_id,
            root.display(),
            r.data_size,
            r.metadata_size,
            r.block_size,
            r.fs.name(),
            r.base_size,
            backing_text(&r.backing)
        ),
        json: serde_json::to_value(r).expect("plain data"),
    })
}

/// ` on DATA and META` for a pool on devices, ` in POOL` for an adopted one.
fn backing_text(b: &Backing) -> String {
    match b {
        Backing::Files => String::new(),
        Backing::Devices { data, metadata } => format!(
            "; data on {}, metadata on {}",
            data.describe(),
            metadata.describe()
        ),
        Backing::Adopted {
            pool_name,
            foreign_thin_ids,
            first_thin_id,
            ..
        } => format!(
            "; adopted pool {pool_name}: {} foreign thin id(s) {:?} left alone, thinlayer's ids from {first_thin_id}",
            foreign_thin_ids.len(),
            foreign_thin_ids
        ),
    }
}

fn pool_adopt(root: &Path, a: &AdoptArgs, wait: bool) -> thinlayer_pool::Result<Output> {
    let opts = CreateOptions {
        fs: a.fs,
        base_size: a.base_size,
        low_water_percent: a.low_water,
        ..CreateOptions::default()
    };
    let pool = Pool::adopt(root, &a.pool_device, &opts, wait)?;
    let r = pool.record();
    Ok(Output {
        text: format!(
            "adopted {} under {} as pool {}: data {}, block size {}, base {} {}{}\n",
            a.pool_device,
            root.display(),
            r.pool_id,
            r.data_size,
            r.block_size,
            r.fs.name(),
            r.base_size,
            backing_text(&r.backing)
        ),
        json: serde_json::to_value(r).expect("plain data"),
    })
}

fn pool_status(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let st = Pool::open(root, LockMode::Shared, wait)?.status()?;
    Ok(Output {
        text: status_text(&st),
        json: serde_json::to_value(&st).expect("plain data"),
    })
}

fn percent(used: u64, total: u64) -> String {
    if total == 0 {
        return "-".into();
    }
    format!("{}.{}%", used * 100 / total, (used * 1000 / total) % 10)
}

fn status_text(st: &PoolStatus) -> String {
    let what = match st.backing {
        Backing::Files => "file",
        Backing::Devices { .. } => "device",
        Backing::Adopted { .. } => "(adopted pool's)",
    };
    let mut s = format!(
        "pool {} under {}: {}\n  filesystem {}, block size {}, base size {}\n  data {what} {}, metadata {what} {}\n  layers {}, records at transaction {}\n",
        st.pool_id,
        st.root.display(),
        if st.active { "active" } else { "inactive" },
        st.fs.name(),
        Bytes(st.block_size_bytes),
        Bytes(st.base_size_bytes),
        Bytes(st.data_size_bytes),
        Bytes(st.metadata_size_bytes),
        st.layers,
        st.transaction_id,
    );
    let on = backing_text(&st.backing);
    if let Some(on) = on.strip_prefix("; ") {
        s += &format!("  {on}\n");
    }
    if let Some(k) = &st.kernel {
        s += &format!(
            "  data used     {} of {} blocks ({})\n  metadata used {} of {} blocks ({})\n  kernel transaction {}, mode {}, thin devices active {}\n  discard passdown {}, full pool {}, low-water mark {}%\n",
            k.data_used_blocks,
            k.data_total_blocks,
            percent(k.data_used_blocks, k.data_total_blocks),
            k.metadata_used_blocks,
            k.metadata_total_blocks,
            percent(k.metadata_used_blocks, k.metadata_total_blocks),
            k.transaction_id,
            k.mode,
            k.active_thin_devices,
            if k.discard_passdown { "on" } else { "off" },
            if k.error_if_no_space {
                "fails writes"
            } else {
                "queues writes"
            },
            st.low_water_percent,
        );
    } else {
        s += "  (activate the pool to see usage: thinlayer pool activate)\n";
    }
    if st.backing.is_files() {
        s += &host_text(&st.host);
    }
    if !st.spares.is_empty() {
        let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
        for sp in &st.spares {
            *by.entry(sp.parent.as_deref().unwrap_or("(base)"))
                .or_default() += 1;
        }
        let list: Vec<String> = by.iter().map(|(p, n)| format!("{p} x{n}")).collect();
        s += &format!("  spares (provisioned snapshots): {}\n", list.join(", "));
    }
    if !st.trash.is_empty() {
        s += &format!(
            "  trash: {} removed layer(s) whose space `thinlayer pool reclaim` gives back\n",
            st.trash.len()
        );
    }
    if let Some(p) = &st.pending {
        s += &format!("  interrupted operation: {p:?}\n");
    }
    for w in &st.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}

fn host_text(h: &space::HostSpace) -> String {
    format!(
        "  host filesystem: {} free of {}; the data file holds {} of it and can still grow by {}{}\n",
        Bytes(h.filesystem_free_bytes),
        Bytes(h.filesystem_size_bytes),
        Bytes(h.data_allocated_bytes),
        Bytes(h.data_growth_bytes),
        if h.holds_growth {
            ""
        } else {
            " (more than is free)"
        }
    )
}

fn pool_activate(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let action = Pool::open(root, LockMode::Exclusive, wait)?.activate()?;
    Ok(said(
        action,
        format!("activated the pool under {}", root.display()),
        format!(
            "the pool under {} is already active; no action taken",
            root.display()
        ),
    ))
}

fn pool_deactivate(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let action = Pool::open(root, LockMode::Exclusive, wait)?.deactivate()?;
    Ok(said(
        action,
        format!("deactivated the pool under {} (data kept)", root.display()),
        format!(
            "the pool under {} is not active; no action taken",
            root.display()
        ),
    ))
}

fn extend_text(r: &ExtendReport) -> String {
    format!(
        "data {} -> {}, metadata {} -> {}",
        r.old_data_size, r.new_data_size, r.old_metadata_size, r.new_metadata_size
    )
}

fn pool_extend(root: &Path, a: &ExtendArgs, wait: bool) -> thinlayer_pool::Result<Output> {
    let req = ExtendRequest {
        data: a.data_size,
        metadata: a.metadata_size,
    };
    let r = Pool::open(root, LockMode::Exclusive, wait)?.extend(&req)?;
    let mut out = said(
        if r.changed() {
            Action::Done
        } else {
            Action::AlreadyDone
        },
        format!(
            "extended the pool under {}: {}",
            root.display(),
            extend_text(&r)
        ),
        format!(
            "the pool is already that size ({}); no action taken",
            extend_text(&r)
        ),
    );
    out.json["extend"] = serde_json::to_value(r).expect("plain data");
    Ok(out)
}

fn pool_watch(root: &Path, a: &WatchArgs, json: bool) -> thinlayer_pool::Result<Output> {
    let opts = WatchOptions {
        threshold_percent: a.threshold,
        extend_percent: a.extend_percent,
        max_data_size: a.max_data_size,
        once: a.once,
        timeout: a.timeout.map(std::time::Duration::from_secs),
        ..WatchOptions::default()
    };
    let mut n = 0u32;
    let end = thinlayer_pool::watch(root, &opts, |r| {
        n += 1;
        // Each extension is printed as it happens, not at exit.
        let line = if json {
            json!({"extended": r}).to_string()
        } else {
            format!("autoextended: {}", extend_text(r))
        };
        let _ = writeln!(io::stdout(), "{line}");
        let _ = io::stdout().flush();
    })?;
    Ok(Output {
        text: format!("watch ended ({end:?}) after {n} extension(s)\n"),
        json: json!({"ended": end, "extensions": n}),
    })
}

fn pool_destroy(
    root: &Path,
    force: bool,
    wipe: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let done = Pool::open(root, LockMode::Exclusive, wait)?.destroy_with(force, wipe)?;
    let mut text = format!("destroyed the pool under {}", root.display());
    for d in &done {
        text += &format!("; {d}");
    }
    let mut out = said(Action::Done, text, String::new());
    out.json["devices"] = json!(done);
    Ok(out)
}

fn findings_text(findings: &[thinlayer_pool::check::Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s += &format!("problem [{}]: {}\n  fix: {}\n", f.kind, f.detail, f.fix);
    }
    s
}

/// Prints a report that has findings (stdout), then fails with exit 7.
fn with_findings(out: Output, count: usize, json: bool) -> thinlayer_pool::Result<Output> {
    if count == 0 {
        return Ok(out);
    }
    if json {
        let _ = writeln!(io::stdout(), "{:#}", out.json);
    } else {
        let _ = write!(io::stdout(), "{}", out.text);
    }
    Err(Error::CheckFailed { count })
}

fn pool_check(root: &Path, json: bool, wait: bool) -> thinlayer_pool::Result<Output> {
    // Exclusive: the check takes a metadata snapshot, and no change may
    // run between its reads of records, kernel and metadata.
    let r = Pool::open(root, LockMode::Exclusive, wait)?.check()?;
    let mut text = format!(
        "pool {} under {}: {}, {} layer(s), records at transaction {}, kernel at {}\n",
        r.pool_id,
        root.display(),
        if r.active { "active" } else { "inactive" },
        r.layers,
        r.transaction_id,
        r.kernel_transaction_id
            .map_or("-".into(), |t| t.to_string()),
    );
    if r.is_clean() {
        text += "clean: records, kernel devices and pool metadata agree; thin_check passes\n";
    }
    text += &findings_text(&r.findings);
    if let Some(h) = &r.host {
        text += &host_text(h);
    }
    for w in &r.warnings {
        text += &format!("warning: {w}\n");
    }
    let count = r.findings.len();
    let out = Output {
        text,
        json: serde_json::to_value(&r).expect("plain data"),
    };
    with_findings(out, count, json)
}

fn pool_recover(
    root: &Path,
    force: bool,
    json: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let r = Pool::open(root, LockMode::Exclusive, wait)?.recover_all(force)?;
    let mut text = String::new();
    if r.actions.is_empty() {
        text += "nothing to recover; no action taken\n";
    }
    for a in &r.actions {
        text += &format!("{a}\n");
    }
    if r.findings.is_empty() {
        text += "pool check: clean\n";
    }
    text += &findings_text(&r.findings);
    let count = r.findings.len();
    let out = Output {
        text,
        json: serde_json::to_value(&r).expect("plain data"),
    };
    with_findings(out, count, json)
}

fn pool_repair(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let r = Pool::open(root, LockMode::Exclusive, wait)?.repair()?;
    Ok(Output {
        text: format!("{}\n", r.message),
        json: serde_json::to_value(&r).expect("plain data"),
    })
}

fn pool_reclaim(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let r = Pool::open(root, LockMode::Exclusive, wait)?.reclaim()?;
    Ok(Output {
        text: format!(
            "reclaimed {} trashed thin id(s); {} idle device(s) torn down\n",
            r.thin_ids, r.devices
        ),
        json: serde_json::to_value(&r).expect("plain data"),
    })
}

fn layer_create(
    root: &Path,
    id: &str,
    parent: Option<&str>,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    // Ids of the forms other owners reserve (`vol-*`, `*-rw`, `sha256:*`,
    // ...) and other owners' layers are refused, naming the owner.
    thinlayer_pool::names::check_user_id("layer", id, Owner::User)?;
    let mut pool = Pool::open(root, LockMode::Exclusive, wait)?;
    if pool.layout().layer_record(id).exists() {
        pool.owned_layer(id, Owner::User, "`thinlayer layer create`", "take")?;
    }
    let layer = pool.create_layer(id, parent)?;
    Ok(Output {
        text: format!(
            "created layer {} (thin id {}) from {}\n",
            layer.id,
            layer.thin_id,
            layer.parent.as_deref().unwrap_or("the base device")
        ),
        json: serde_json::to_value(&layer).expect("plain data"),
    })
}

fn layer_rm(
    root: &Path,
    id: &str,
    deferred: bool,
    later: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let mut pool = Pool::open(root, LockMode::Exclusive, wait)?;
    // Another owner's layer (an image's, a container's, a volume's, the
    // snapshotter's) is removed by that owner's own command.
    // (Anything else, an unknown id included, is the removal's to report:
    // it settles an interrupted operation first.)
    if let Err(e @ Error::NotOwner { .. }) =
        pool.owned_layer(id, Owner::User, "`thinlayer layer rm`", "remove")
    {
        return Err(e);
    }
    pool.set_deferred_teardown(later);
    match pool.remove_layer_or_defer(id, deferred)? {
        Removal::Removed => Ok(said(
            Action::Done,
            if later {
                format!("removed layer {id}; `thinlayer pool reclaim` gives its space back")
            } else {
                format!("removed layer {id}")
            },
            String::new(),
        )),
        Removal::Deferred { holders } => {
            let text = format!(
                "removal of layer {id} deferred: its device is {holders}; the kernel removes the \
                 device when that holder closes it, and `thinlayer pool recover` then finishes the removal"
            );
            Ok(Output {
                json: json!({"changed": true, "deferred": true, "message": text}),
                text: format!("{text}\n"),
            })
        }
    }
}

fn layer_provision(
    root: &Path,
    id: Option<&str>,
    spares: usize,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let p = Pool::open(root, LockMode::Exclusive, wait)?.provision(id, spares)?;
    let of = id.map_or("the base device".to_owned(), |i| format!("layer {i}"));
    let text = format!(
        "{spares} spare(s) of {of} ready: {} made, {} kept, {} dropped\n",
        p.made, p.kept, p.dropped
    );
    Ok(Output {
        text,
        json: serde_json::to_value(&p).expect("plain data"),
    })
}

fn layer_ls(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    // Shared lock: listing must not wait behind, or block, another reader.
    let layers = Pool::open(root, LockMode::Shared, wait)?.layers()?;
    let mut text = format!(
        "{:<24} {:<24} {:<11} {:>7}  {:<12} {:>10}  MOUNTED AT\n",
        "ID", "PARENT", "OWNER", "THIN-ID", "DEVICE", "MAPPED"
    );
    for l in &layers {
        text += &format!(
            "{:<24} {:<24} {:<11} {:>7}  {:<12} {:>10}  {}\n",
            l.id,
            l.parent.as_deref().unwrap_or("-"),
            l.owner.name().split(' ').next_back().unwrap_or("-"),
            l.thin_id,
            l.devnode
                .as_ref()
                .map_or("-".into(), |d| d.display().to_string()),
            l.mapped_bytes.map_or("-".into(), |b| Bytes(b).to_string()),
            l.mountpoints
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    Ok(Output {
        text,
        json: serde_json::to_value(&layers).expect("plain data"),
    })
}

fn mount(
    root: &Path,
    id: &str,
    dir: &Path,
    readonly: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let (node, action) = Pool::open(root, LockMode::Exclusive, wait)?.mount_layer(
        id,
        dir,
        if readonly {
            thinlayer_pool::MountUse::ReadOnly
        } else {
            thinlayer_pool::MountUse::Container
        },
    )?;
    let mut out = said(
        action,
        format!(
            "mounted layer {id} ({}) at {}",
            node.display(),
            dir.display()
        ),
        format!(
            "layer {id} is already mounted at {}; no action taken",
            dir.display()
        ),
    );
    out.json["device"] = json!(node);
    Ok(out)
}

fn umount(root: &Path, target: &str, wait: bool) -> thinlayer_pool::Result<Output> {
    let dirs = Pool::open(root, LockMode::Exclusive, wait)?.umount(target)?;
    let action = if dirs.is_empty() {
        Action::AlreadyDone
    } else {
        Action::Done
    };
    let list = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Ok(said(
        action,
        format!("unmounted {list}"),
        format!("{target} is not mounted; no action taken"),
    ))
}

fn bench(a: &BenchArgs) -> thinlayer_store::Result<Output> {
    let opts = thinlayer_bench::Options {
        out: a.out.clone(),
        quick: a.quick,
        work: a.work.clone(),
        fixtures: a.fixtures.clone(),
        disk: a.disk.clone(),
        docker: a.docker,
    };
    let report = thinlayer_bench::run(&opts).map_err(|e| match e {
        thinlayer_bench::Error::Pool(e) => e.into(),
        thinlayer_bench::Error::Store(e) => e,
        e => thinlayer_store::Error::Io {
            context: "thinlayer bench".into(),
            source: io::Error::other(e.to_string()),
        },
    })?;
    Ok(Output {
        text: format!(
            "{}every sample: {}; plots: {}/*.png\n",
            report.table(),
            a.out.join("bench.json").display(),
            a.out.display()
        ),
        json: json!({"out": a.out, "stats": report.stats}),
    })
}
