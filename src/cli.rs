//! The command line's clap types: every verb, flag and help text of
//! `thinlayer`, and nothing else. Parsing only: no verb runs here, and a
//! flag's text or default never changes without the README and the host
//! tests (`tests/cli.rs`) changing with it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use thinlayer_pool::{BlockSize, Bytes, Error, FsType, space::SizeChange};

/// The README's exit-code table, for `--help` (`crate::exit` computes them).
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed (kernel, tool or I/O error)
  2  bad usage or input (flags, sizes, names)
  3  no such pool, layer, image, container, volume or snapshot
  4  conflict: exists, has children, mounted, busy, locked
  5  the host cannot: not root, no device-mapper, no dm-thin, missing tool
  6  out of space
  7  damaged records or pool metadata";

/// Block-level thin-provisioning snapshots for container storage.
#[derive(Parser, Debug)]
#[command(name = "thinlayer", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Directory holding the pool's files and records.
    #[arg(
        long,
        global = true,
        env = "THINLAYER_ROOT",
        default_value = "/var/lib/thinlayer"
    )]
    pub root: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Wait for another thinlayer command on this root instead of failing
    /// (without it, a root still busy after 2 s is refused).
    #[arg(long, global = true)]
    pub wait: bool,
    /// Log what is done (repeat for more); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
    Image(ImageCommand),
    /// Create, mount, diff, commit and remove containers.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Measure thinlayer against the raw dm floor, overlayfs, btrfs and full copies.
    Bench(BenchArgs),
    /// Create, clone, list, mount and remove thin volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Serve the pool to a container runtime (runs until SIGTERM).
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(subcommand)]
    pub to: ServeTo,
}

#[derive(Subcommand, Debug)]
pub enum ServeTo {
    /// containerd's snapshots API (a proxy snapshotter plugin) on a Unix socket.
    Containerd {
        /// The socket to listen on (a stale one is replaced; anything else there is kept and refused).
        #[arg(long, default_value = thinlayer_snapshotter::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        group: SocketGroup,
        /// What Mounts hands containerd: `bind`, a bind mount of the
        /// snapshot's filesystem, which the server mounts itself (runc);
        /// `device`, its thin device node (runtimes that pass devices into
        /// a VM: Kata, Firecracker). The snapshot label
        /// `thinlayer.io/mounts=device` (or `=bind`) chooses per snapshot.
        #[arg(long, value_enum, default_value_t = MountsArg::Bind)]
        mounts: MountsArg,
        /// The most spares (snapshots made ahead of a Prepare) kept over all
        /// parents; 0 makes none.
        #[arg(long, default_value_t = 8)]
        max_spares: usize,
        /// Seconds without a Prepare after which a parent keeps no spare.
        #[arg(long, default_value_t = 300)]
        spare_idle: u64,
    },
    /// Docker's plugin: graphdriver (`dockerd --experimental -s thinlayer`)
    /// and volume driver (`-d thinlayer`) on one Unix socket; start it before dockerd.
    Docker {
        /// The socket to listen on; its name is the driver's (a stale one is
        /// replaced; anything else there is kept and refused).
        #[arg(long, default_value = thinlayer_docker::plugin::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        group: SocketGroup,
    },
    /// Docker's volume plugin protocol alone (thin volumes) on a Unix socket.
    DockerVolume {
        /// The socket to listen on (a stale one is replaced; anything else there is kept and refused).
        #[arg(long, default_value = thinlayer_docker::volume::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(flatten)]
        group: SocketGroup,
    },
}

/// `serve containerd --mounts`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountsArg {
    /// A bind mount of the filesystem the server mounted.
    Bind,
    /// The thin device node.
    Device,
}

#[derive(Args, Debug)]
pub struct SocketGroup {
    /// Also let this group (a name or a gid) use the socket: it is then
    /// 0660 root:GROUP in a 0750 directory, instead of root's only (0600 in 0700).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
}

/// `thinlayer bench`'s arguments: passed unread to `thinlayer-bench`,
/// which parses them (`thinlayer bench --help` is its help).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// The benchmark's flags (see `thinlayer-bench --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
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
pub struct CreateArgs {
    /// Capacity of the sparse data file (K, M, G, T: powers of 1024) [default: 20G;
    /// on a data device: all of it].
    #[arg(long, value_parser = parse_bytes)]
    pub data_size: Option<Bytes>,
    /// Size of the metadata file [default: from data and block size; on a
    /// metadata device: all of it, up to the kernel's 16G limit].
    #[arg(long, value_parser = parse_bytes)]
    pub metadata_size: Option<Bytes>,
    /// A block device for the data (a disk, a partition, an LVM volume) instead of a file.
    #[arg(long, requires = "metadata_device")]
    pub data_device: Option<PathBuf>,
    /// A block device for the metadata; with --data-device.
    #[arg(long, requires = "data_device")]
    pub metadata_device: Option<PathBuf>,
    /// Take devices that hold a filesystem, partition table or other signature (it is lost).
    #[arg(long, requires = "data_device")]
    pub force: bool,
    /// Copy-on-write unit: a multiple of 64K from 64K to 1G.
    #[arg(long, default_value = "64K", value_parser = parse_block)]
    pub block_size: BlockSize,
    #[command(flatten)]
    pub base: BaseArgs,
}

#[derive(Args, Debug)]
pub struct AdoptArgs {
    /// The thin-pool's device-mapper name (for LVM: VG-POOL-tpool).
    #[arg(long)]
    pub pool_device: String,
    #[command(flatten)]
    pub base: BaseArgs,
}

/// The base device's flags, shared by `pool create` and `pool adopt`.
#[derive(Args, Debug)]
pub struct BaseArgs {
    /// Filesystem of the base device and so of every layer.
    #[arg(long, default_value = "ext4", value_parser = parse_fs)]
    pub fs: FsType,
    /// Virtual size of the base device and of every layer.
    #[arg(long, default_value = "10G", value_parser = parse_bytes)]
    pub base_size: Bytes,
    /// Warn in `pool status` at this percent of data or metadata used.
    #[arg(long, default_value_t = 80)]
    pub low_water: u8,
}

#[derive(Args, Debug)]
pub struct ExtendArgs {
    /// New data size: +SIZE grows by SIZE, SIZE grows to SIZE (never shrinks).
    #[arg(long, allow_hyphen_values = true, value_parser = parse_change)]
    pub data_size: Option<SizeChange>,
    /// New metadata size: +SIZE or SIZE, as for --data-size.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_change)]
    pub metadata_size: Option<SizeChange>,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Extend when data or metadata use reaches this percent.
    #[arg(long, default_value_t = 70)]
    pub threshold: u8,
    /// Grow by this percent of the current size each time.
    #[arg(long, default_value_t = 20)]
    pub extend_percent: u16,
    /// Never grow the data past this size.
    #[arg(long, value_parser = parse_bytes)]
    pub max_data_size: Option<Bytes>,
    /// Check (and extend) once, then exit.
    #[arg(long)]
    pub once: bool,
    /// Exit after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum LayerCommand {
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
    Tar(LayerTarCommand),
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
        #[arg(long, alias = "count", default_value_t = 1)]
        spares: usize,
        /// Keep them mounted too (under ROOT/spares, only root can enter):
        /// a `thinlayer mount` of a layer made from one then moves that
        /// mount instead of mounting.
        #[arg(long)]
        mounted: bool,
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

/// `thinlayer image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout (directory or archive) or a `docker save` archive.
    Import {
        /// The directory or archive.
        path: PathBuf,
        /// Name it (default: its tag or ref name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    Ls,
    /// Remove an image and the layers nothing else uses.
    Rm {
        /// The image.
        name: String,
    },
}

/// `thinlayer container ...`.
#[derive(Subcommand, Debug)]
pub enum ContainerCommand {
    /// Create a container: an init layer and a read-write snapshot of IMAGE.
    Create {
        /// Its name.
        name: String,
        /// The image.
        #[arg(long)]
        image: String,
        /// Hostname written into its init layer [default: its name].
        #[arg(long)]
        hostname: Option<String>,
        /// Mount at /path inside it (repeatable): NAME:/path a named volume (shared with
        /// other containers), /path an anonymous volume made for it and filled with the
        /// image's content there, /host/path:/path a host directory or file; `:ro` for
        /// read-only. The image's config Volumes become anonymous volumes too.
        #[arg(long = "volume", value_name = "SPEC")]
        volumes: Vec<String>,
        /// Mount every volume and bind of container OTHER at the same paths (repeatable;
        /// OTHER:ro for read-only).
        #[arg(long = "volumes-from", value_name = "OTHER[:ro]")]
        volumes_from: Vec<String>,
    },
    /// Show a container: its image, layers and mounts (as Docker's inspect `Mounts`).
    Inspect {
        /// The container.
        name: String,
    },
    /// Mount its root filesystem (at DIR, or its own mount point) and print where.
    Mount {
        /// The container.
        name: String,
        /// Where.
        dir: Option<PathBuf>,
    },
    /// Unmount its root filesystem.
    Umount {
        /// The container.
        name: String,
    },
    /// List containers.
    Ls,
    /// Remove a container and its layers (its volumes stay).
    Rm {
        /// The container.
        name: String,
        /// Also remove its anonymous volumes (named ones stay, and ones another container mounts).
        #[arg(long)]
        volumes: bool,
    },
    /// Paths the container added (A), changed (C) or deleted (D) against its image.
    Diff {
        /// The container.
        name: String,
    },
    /// Commit the container's changes as a new layer on its image.
    Commit {
        /// The container.
        name: String,
        /// The new layer's id.
        #[arg(long = "as")]
        as_layer: String,
    },
}

/// `thinlayer volume ...`.
#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume: a thin device with its own filesystem, or an instant clone (--from).
    Create {
        /// Its name.
        name: String,
        /// Its size [default: the pool's base size].
        #[arg(long, value_parser = parse_bytes)]
        size: Option<Bytes>,
        /// Its filesystem, ext4 or xfs [default: the pool's].
        #[arg(long, value_parser = parse_fs)]
        fs: Option<FsType>,
        /// Clone this volume (a snapshot: instant, sharing its blocks).
        #[arg(long)]
        from: Option<String>,
    },
    /// List volumes.
    Ls,
    /// Remove a volume no container uses.
    Rm {
        /// The volume.
        name: String,
    },
    /// Mount a volume at DIR.
    Mount {
        /// The volume.
        name: String,
        /// Where.
        dir: PathBuf,
    },
    /// Unmount a volume everywhere.
    Umount {
        /// The volume.
        name: String,
    },
}

/// `thinlayer layer apply` and `layer export`.
#[derive(Subcommand, Debug)]
pub enum LayerTarCommand {
    /// Create layer ID from PARENT (or the base) plus a layer tar (plain, gzip, zstd; `-` reads stdin).
    Apply {
        /// The new layer.
        id: String,
        /// The layer tar, or `-`.
        tar: String,
        /// The layer to build on.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Write a layer's changes against its parent as an OCI layer tar.
    Export {
        /// The layer.
        id: String,
        /// Where (`-`: stdout).
        #[arg(short, long)]
        output: String,
    },
}
