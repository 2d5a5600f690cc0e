//! The pool: a dm thin-pool over two sparse files (data and metadata) on
//! loop devices, its base thin device, and its records under the root.
//!
//! ```text
//! ROOT/pool.rec          the pool record (sizes, ids, transaction id, pending op)
//! ROOT/layers/ID.rec     one record per layer
//! ROOT/data.img          sparse data file      -> loop -> linear tl1-P-data
//! ROOT/metadata.img      sparse metadata file  -> loop -> linear tl1-P-meta
//!                                                   thin-pool tl1-P-pool
//! ROOT/lock              flock(2) target
//! ```
//!
//! The root and every directory under it are 0700, every file 0600, all
//! root's (see [`record::secure_root`]): the pool holds every container's
//! and volume's bytes.
//!
//! Every change that touches both the kernel and the records is a small
//! transaction: the intent is recorded first (`pending`), then the kernel
//! steps run (the kernel commits its metadata before a pool message
//! returns), then the layer record is written or removed: that is the
//! commit point; last the intent is cleared. After a crash,
//! [`Pool::recover`] looks at the layer record the intent names: a create
//! whose record exists is kept, any other is rolled back (its thin id
//! deleted); a removal is always finished. No second pool message (and
//! metadata commit) is spent on moving the kernel's transaction id: it is
//! set once at `pool create`, and a record and a kernel that disagree on
//! it mean the metadata or the records were replaced.
//!
//! What must never happen: a thin id reused while the pool's metadata may
//! still hold it (ids come from a counter that only grows); a record saying
//! a layer exists whose thin id the kernel never created.

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    blockdev::{self, DeviceRef, DeviceRole},
    cmd::Tool,
    error::{Error, IoContext, Result},
    fault,
    kernel::{self, Kernel, PoolSpec},
    lock::{self, LockMode, RootLock},
    loopback, mounts,
    names::{self, PoolId, Role},
    record,
    units::{self, BlockSize, Bytes},
};

/// The filesystem on the base device, and so in every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4, made with lazy inode tables that dm-thin reads back as zeros.
    Ext4,
    /// XFS; snapshots mount with `nouuid`.
    Xfs,
}

impl FsType {
    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Mount options every thin device of this type gets.
    ///
    /// ext4: `noinit_itable` keeps the kernel from zeroing inode tables in
    /// each snapshot (they read back as zeros from unprovisioned blocks).
    /// XFS: `nouuid`, since a snapshot shares its origin's UUID.
    pub fn mount_options(self) -> &'static str {
        match self {
            FsType::Ext4 => "noinit_itable",
            FsType::Xfs => "nouuid",
        }
    }

    pub(crate) fn mkfs(self) -> Tool {
        match self {
            FsType::Ext4 => Tool::MkfsExt4,
            FsType::Xfs => Tool::MkfsXfs,
        }
    }

    /// The smallest base device the filesystem tools accept.
    pub(crate) fn min_size(self) -> Bytes {
        match self {
            FsType::Ext4 => Bytes(16 << 20),
            FsType::Xfs => Bytes(300 << 20),
        }
    }
}

impl std::str::FromStr for FsType {
    type Err = Error;
    fn from_str(s: &str) -> Result<FsType> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(Error::InvalidArgument(format!(
                "unknown filesystem `{other}`; use ext4 or xfs"
            ))),
        }
    }
}

/// What `pool create` was asked for.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Size of the sparse data file (the pool's capacity).
    pub data_size: Bytes,
    /// Size of the metadata file; defaulted from the data and block sizes.
    pub metadata_size: Option<Bytes>,
    /// The pool's block size: the copy-on-write unit.
    pub block_size: BlockSize,
    /// The filesystem of the base device.
    pub fs: FsType,
    /// Virtual size of the base device and so of every layer.
    pub base_size: Bytes,
    /// Percent of data or metadata used at which status warns.
    pub low_water_percent: u8,
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            data_size: Bytes(20 << 30),
            metadata_size: None,
            block_size: BlockSize::DEFAULT,
            fs: FsType::Ext4,
            base_size: Bytes(10 << 30),
            low_water_percent: 80,
        }
    }
}

/// Block devices for `pool create` in place of the sparse files.
#[derive(Clone, Debug)]
pub struct DevicePair {
    /// The data device (a disk, a partition, an LVM volume).
    pub data: PathBuf,
    /// The metadata device.
    pub metadata: PathBuf,
    /// How much of the data device to use; `None`: all of it (less the
    /// label region). [`CreateOptions::data_size`] is not used.
    pub data_size: Option<Bytes>,
    /// Take devices holding a signature (a filesystem, a partition
    /// table, LVM, old pool metadata), as `mkfs -f` does. Never a device
    /// in use.
    pub force: bool,
}

/// What the pool's data and metadata live on.
// One per pool record, never in a hot collection: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backing {
    /// Sparse files under the root on loop devices (`data.img`,
    /// `metadata.img`).
    #[default]
    Files,
    /// Two block devices, found by their labels (see [`crate::blockdev`]).
    Devices {
        /// The data device.
        data: DeviceRef,
        /// The metadata device.
        metadata: DeviceRef,
    },
    /// A thin-pool someone else made and runs (LVM, dmsetup): thinlayer
    /// makes its own thin ids in it and never touches any other.
    Adopted {
        /// The pool's dm name.
        pool_name: String,
        /// Its dm uuid when adopted (checked at activate).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool_uuid: Option<String>,
        /// The thin ids the pool held when adopted.
        foreign_thin_ids: Vec<u32>,
        /// thinlayer's thin ids start here; every id below is foreign,
        /// whether it existed at adoption or its owner made it later.
        first_thin_id: u32,
    },
}

impl Backing {
    /// Whether this is the default (for serde).
    pub fn is_files(&self) -> bool {
        *self == Backing::Files
    }

    /// Whether `thin_id` belongs to someone else (an adopted pool's).
    pub fn is_foreign(&self, thin_id: u32) -> bool {
        match self {
            Backing::Adopted {
                foreign_thin_ids,
                first_thin_id,
                ..
            } => thin_id < *first_thin_id || foreign_thin_ids.contains(&thin_id),
            _ => false,
        }
    }

    /// `files`, `devices` or `adopted`.
    pub fn kind(&self) -> &'static str {
        match self {
            Backing::Files => "files",
            Backing::Devices { .. } => "devices",
            Backing::Adopted { .. } => "adopted",
        }
    }
}

/// The pool record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PoolRecord {
    /// What the data and metadata live on; records from before devices
    /// were supported load as [`Backing::Files`].
    #[serde(default, skip_serializing_if = "Backing::is_files")]
    pub backing: Backing,
    /// The id in every dm name of this pool.
    pub pool_id: PoolId,
    /// Data file size.
    pub data_size: Bytes,
    /// Metadata file size.
    pub metadata_size: Bytes,
    /// Copy-on-write unit.
    pub block_size: BlockSize,
    /// Filesystem of the base device.
    pub fs: FsType,
    /// Virtual size of every thin device.
    pub base_size: Bytes,
    /// The base device's thin id.
    pub base_thin_id: u32,
    /// The next thin id to hand out; only grows.
    pub next_thin_id: u32,
    /// The kernel transaction id the records match.
    pub transaction_id: u64,
    /// Warn at this percent used.
    pub low_water_percent: u8,
    /// An operation begun and not yet committed.
    #[serde(default)]
    pub pending: Option<Pending>,
    /// Snapshots provisioned ahead of demand (`layer provision`), each
    /// waiting, active, to become a new layer of its parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spares: Vec<Spare>,
    /// Thin ids of layers removed with their kernel work left for later
    /// (`layer rm --later`): [`Pool::reclaim`] discards and deletes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trash: Vec<Trashed>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

/// An operation recorded as begun, for recovery after a crash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Pending {
    /// `pool create`, recorded before its first file or device: what a crash
    /// leaves under a record in this state is leftovers, which the next
    /// `pool create` (or `pool recover`, `pool destroy`) clears.
    CreatePool,
    /// `layer create` (and `volume create`).
    CreateLayer {
        /// The layer id.
        id: String,
        /// Its thin id.
        thin_id: u32,
        /// Its parent layer.
        parent: Option<String>,
        /// Its size when not the base size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<Bytes>,
        /// Its filesystem when not the pool's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fs: Option<FsType>,
    },
    /// `layer rm`.
    RemoveLayer {
        /// The layer id.
        id: String,
        /// Its thin id.
        thin_id: u32,
    },
    /// `layer provision`: a spare snapshot of `parent`.
    ProvisionSpare {
        /// The layer it is a snapshot of (`None`: the base device).
        parent: Option<String>,
        /// Its thin id.
        thin_id: u32,
    },
    /// Spares dropped (their parent is written, removed, or fewer were
    /// asked for); already gone from the record's list.
    DropSpares {
        /// Their thin ids.
        thin_ids: Vec<u32>,
    },
    /// `layer rm --later`: the record goes, the thin id to the trash.
    TrashLayer {
        /// The layer id.
        id: String,
        /// Its thin id.
        thin_id: u32,
        /// Its virtual size.
        size: Bytes,
    },
    /// [`Pool::reclaim`] of trashed thin ids, already off the trash list.
    Reclaim {
        /// What is being discarded and deleted.
        trash: Vec<Trashed>,
    },
}

/// A removed layer's thin id whose discard and delete wait in the trash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trashed {
    /// The thin id.
    pub thin_id: u32,
    /// Its virtual size (what to discard).
    pub size: Bytes,
}

/// A snapshot provisioned ahead of demand: made (and activated) while
/// nobody waits, so a later `layer create` of its parent only writes
/// records and the mount finds the device ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spare {
    /// The layer it is a snapshot of (`None`: the base device).
    pub parent: Option<String>,
    /// Its thin id.
    pub thin_id: u32,
}

impl Pending {
    /// The operation in words, for reports.
    pub fn describe(&self) -> String {
        match self {
            Pending::CreatePool => "pool create".into(),
            Pending::CreateLayer { id, thin_id, .. } => {
                format!("layer create of `{id}` (thin id {thin_id})")
            }
            Pending::RemoveLayer { id, thin_id } => {
                format!("layer rm of `{id}` (thin id {thin_id})")
            }
            Pending::ProvisionSpare { parent, thin_id } => format!(
                "layer provision of `{}` (thin id {thin_id})",
                parent.as_deref().unwrap_or("the base device")
            ),
            Pending::DropSpares { thin_ids } => format!("drop of spares {thin_ids:?}"),
            Pending::TrashLayer { id, thin_id, .. } => {
                format!("layer rm --later of `{id}` (thin id {thin_id})")
            }
            Pending::Reclaim { trash } => format!("reclaim of {} trashed thin id(s)", trash.len()),
        }
    }

    /// The thin ids the operation may or may not have reached.
    pub fn thin_ids(&self) -> Vec<u32> {
        match self {
            Pending::CreatePool => Vec::new(),
            Pending::CreateLayer { thin_id, .. }
            | Pending::RemoveLayer { thin_id, .. }
            | Pending::ProvisionSpare { thin_id, .. }
            | Pending::TrashLayer { thin_id, .. } => vec![*thin_id],
            Pending::DropSpares { thin_ids } => thin_ids.clone(),
            Pending::Reclaim { trash } => trash.iter().map(|t| t.thin_id).collect(),
        }
    }
}

/// The fault points [`Pool::start_pool`] passes, for create or activate.
struct StartPoints {
    loops: &'static str,
    meta: &'static str,
    data: &'static str,
    pool: &'static str,
}

const CREATE_POINTS: StartPoints = StartPoints {
    loops: "pool_create.after_loops",
    meta: "pool_create.after_meta_linear",
    data: "pool_create.after_data_linear",
    pool: "pool_create.after_pool",
};

const ACTIVATE_POINTS: StartPoints = StartPoints {
    loops: "pool_activate.after_loops",
    meta: "pool_activate.after_meta_linear",
    data: "pool_activate.after_data_linear",
    pool: "pool_activate.after_pool",
};

/// The record under `layout` if it is the intent of a `pool create` that
/// never finished; `None` for a finished pool or an unreadable record.
pub(crate) fn interrupted_create(layout: &Layout) -> Option<PoolRecord> {
    let rec: PoolRecord = record::read(&layout.pool_record(), RECORD_POOL).ok()?;
    (rec.pending == Some(Pending::CreatePool)).then_some(rec)
}

/// Removes what an interrupted `pool create` of `rec` left: every dm device
/// of its pool id (thins first), the two files, and last its record. Safe
/// only for a record in the [`Pending::CreatePool`] state: nothing under it
/// was ever handed to a user. Returns what it removed.
pub(crate) fn clear_interrupted_create(
    kernel: &Kernel,
    layout: &Layout,
    rec: &PoolRecord,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut present: Vec<String> = kernel
        .names_with_prefix(&names::name_prefix(&rec.pool_id))?
        .into_iter()
        .collect();
    // Thins before the pool, the pool before the linear devices under it.
    present.sort_by_key(|n| match names::parse_role(&rec.pool_id, n) {
        Some(Role::Thin(_)) | None => 0,
        Some(Role::Pool) => 1,
        Some(Role::Data) | Some(Role::Meta) => 2,
    });
    for name in present {
        let n = devicemapper::DmNameBuf::new(name.clone()).expect("valid: listed by the kernel");
        if kernel.remove_if_present(&n)? {
            removed.push(format!("device {name}"));
        }
    }
    match &rec.backing {
        Backing::Files => {
            for f in [layout.data_file(), layout.metadata_file()] {
                if f.exists() {
                    record::remove(&f)?;
                    removed.push(format!("file {}", f.display()));
                }
            }
        }
        Backing::Devices { data, metadata } => {
            // Labels written by the create: the devices go back to free.
            for (role, r) in [(DeviceRole::Data, data), (DeviceRole::Metadata, metadata)] {
                if let Ok(dev) = blockdev::find(&rec.pool_id, role, r) {
                    blockdev::clear_label(&dev.node)?;
                    removed.push(format!("the label on {}", dev.node.display()));
                }
            }
        }
        Backing::Adopted { pool_name, .. } => {
            // The base thin id, if the create got that far; never another.
            let pool = devicemapper::DmNameBuf::new(pool_name.clone())
                .map_err(|e| Error::Inconsistent(format!("adopted pool name {pool_name}: {e}")))?;
            if kernel.device(&pool)?.is_some()
                && kernel
                    .pool_message(&pool, &format!("delete {}", rec.base_thin_id))
                    .is_ok()
            {
                removed.push(format!(
                    "thin id {} in {pool_name} (the base device)",
                    rec.base_thin_id
                ));
            }
        }
    }
    let _ = fs::remove_dir(layout.layers_dir());
    record::remove(&layout.pool_record())?;
    removed.push(format!("record {}", layout.pool_record().display()));
    Ok(removed)
}

/// The first thin id thinlayer uses in an adopted pool (2^23), unless the
/// pool already holds a higher one: LVM numbers its thin volumes up from
/// its own highest id, so the two never meet.
pub const FIRST_ADOPTED_THIN_ID: u32 = 1 << 23;

/// The thin ids in the live pool `pool` (metadata device `meta`), read
/// from a metadata snapshot that is always released.
fn foreign_thin_ids(
    kernel: &Kernel,
    pool: &devicemapper::DmName,
    meta: &Path,
) -> Result<std::collections::BTreeSet<u32>> {
    if kernel.pool_status(pool)?.held_metadata_root.is_some() {
        return Err(Error::Busy {
            what: format!("the pool {pool}"),
            detail: "someone holds a metadata snapshot of it (`reserve_metadata_snap`); \
                     wait for them, or release it with `dmsetup message POOL 0 release_metadata_snap`"
                .into(),
        });
    }
    kernel.pool_message(pool, "reserve_metadata_snap")?;
    let dump = Tool::ThinDump.run(&[
        "--metadata-snap".as_ref(),
        "--skip-mappings".as_ref(),
        meta.as_os_str(),
    ]);
    kernel.pool_message(pool, "release_metadata_snap")?;
    Ok(crate::check::parse_thin_dump(&dump?)?.thin_ids)
}

/// A layer record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer id.
    pub id: String,
    /// Its thin device id in the pool.
    pub thin_id: u32,
    /// The layer it snapshots; `None` for a snapshot of the base device
    /// (or, for a volume, a fresh device).
    pub parent: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Its virtual size, when not the pool's base size (volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bytes>,
    /// Its filesystem, when not the pool's (volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsType>,
    /// `layer rm --deferred` found its device busy: the kernel removes the
    /// device when its holder closes it, then recovery finishes the removal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// Who made it and may reuse or remove it. Records written before
    /// owners were recorded load as [`Owner::User`].
    #[serde(default)]
    pub owner: Owner,
}

/// Who a layer belongs to, recorded when it is made: a front end reuses or
/// removes only its own layers, and a user verb refuses another owner's
/// (ownership is recorded, never inferred from a name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// Made by hand (`layer create`, `layer apply`, a commit).
    #[default]
    User,
    /// A layer of an imported image (named by its ChainID).
    Image,
    /// A container's init or read-write layer.
    Container,
    /// A volume's device.
    Volume,
    /// The containerd snapshotter's.
    Snapshotter,
    /// The Docker graphdriver's.
    Graphdriver,
    /// A private, short-lived snapshot the engine reads from (a frozen copy).
    Scratch,
}

impl Owner {
    /// The owner's name, as errors and `layer ls` show it.
    pub fn name(self) -> &'static str {
        match self {
            Owner::User => "user",
            Owner::Image => "image",
            Owner::Container => "container",
            Owner::Volume => "volume",
            Owner::Snapshotter => "containerd snapshotter",
            Owner::Graphdriver => "docker graphdriver",
            Owner::Scratch => "scratch",
        }
    }

    /// The command that removes a layer of this owner, for error hints.
    pub fn remove_hint(self) -> &'static str {
        match self {
            Owner::User => "thinlayer layer rm",
            Owner::Image => "thinlayer image rm",
            Owner::Container => "thinlayer container rm",
            Owner::Volume => "thinlayer volume rm",
            Owner::Snapshotter => "ctr snapshots rm (or ctr images rm)",
            Owner::Graphdriver => "docker rm / docker rmi",
            Owner::Scratch => "thinlayer pool recover",
        }
    }
}

impl LayerRecord {
    /// Its virtual size.
    pub fn size_in(&self, pool: &PoolRecord) -> Bytes {
        self.size.unwrap_or(pool.base_size)
    }

    /// Its filesystem.
    pub fn fs_in(&self, pool: &PoolRecord) -> FsType {
        self.fs.unwrap_or(pool.fs)
    }
}

/// What an idempotent verb did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It changed something.
    Done,
    /// It was already so; no action taken.
    AlreadyDone,
}

/// The paths under a root.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The root directory.
    pub root: PathBuf,
}

impl Layout {
    /// `ROOT/pool.rec`.
    pub fn pool_record(&self) -> PathBuf {
        self.root.join("pool.rec")
    }
    /// `ROOT/layers`.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }
    /// `ROOT/layers/ID.rec`.
    pub fn layer_record(&self, id: &str) -> PathBuf {
        self.layers_dir().join(format!("{id}.rec"))
    }
    /// `ROOT/data.img`.
    pub fn data_file(&self) -> PathBuf {
        self.root.join("data.img")
    }
    /// `ROOT/metadata.img`.
    pub fn metadata_file(&self) -> PathBuf {
        self.root.join("metadata.img")
    }
}

/// An open pool: its record, loaded under the root's lock.
pub struct Pool {
    layout: Layout,
    rec: PoolRecord,
    kernel: Option<Kernel>,
    /// The pool device once seen active: under the exclusive lock only this
    /// process changes that, and the verbs that do reset it.
    active: Option<devicemapper::Device>,
    /// [`Pool::recover`] found nothing left to settle since the pool was
    /// last brought up or down.
    settled: bool,
    /// Unmounts leave devices up and removals go to the trash, for
    /// [`Pool::reclaim`] to finish off the request path.
    deferred_teardown: bool,
    /// Devices an unmount left up under `deferred_teardown`.
    idle: std::collections::BTreeSet<u32>,
    /// Parent -> children, built on first use (see [`Pool::children_of`]);
    /// dropped whenever recovery changes records.
    children: Option<ChildIndex>,
    _lock: RootLock,
}

/// Layer id -> the ids of its children.
pub(crate) type ChildIndex = std::collections::HashMap<String, std::collections::BTreeSet<String>>;

pub(crate) const RECORD_POOL: &str = "pool";
pub(crate) const RECORD_LAYER: &str = "layer";

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn check_create_options(o: &CreateOptions) -> Result<Bytes> {
    let min_data = Bytes(o.block_size.bytes().0 * 16);
    if o.data_size < min_data {
        return Err(Error::InvalidSize {
            input: o.data_size.to_string(),
            reason: format!("the data size must hold at least 16 pool blocks ({min_data})"),
        });
    }
    if o.base_size < o.fs.min_size() {
        return Err(Error::InvalidSize {
            input: o.base_size.to_string(),
            reason: format!(
                "{} needs a base device of at least {}",
                o.fs.name(),
                o.fs.min_size()
            ),
        });
    }
    if !o.base_size.0.is_multiple_of(4096) {
        return Err(Error::InvalidSize {
            input: o.base_size.to_string(),
            reason: "the base size must be a multiple of 4K".into(),
        });
    }
    if !(1..=99).contains(&o.low_water_percent) {
        return Err(Error::InvalidArgument(format!(
            "low-water mark {}% is out of range; use 1 to 99",
            o.low_water_percent
        )));
    }
    let meta = o
        .metadata_size
        .unwrap_or_else(|| units::default_metadata_size(o.data_size, o.block_size, 100_000));
    if !(units::MIN_METADATA..=units::MAX_METADATA).contains(&meta.0)
        || !meta.0.is_multiple_of(4096)
    {
        return Err(Error::InvalidSize {
            input: meta.to_string(),
            reason: format!(
                "the metadata size must be a multiple of 4K from {} to {}",
                Bytes(units::MIN_METADATA),
                Bytes(units::MAX_METADATA)
            ),
        });
    }
    Ok(meta)
}

/// Undo steps collected while creating a pool, run in reverse on failure.
struct Undo<'a> {
    kernel: &'a Kernel,
    devices: Vec<devicemapper::DmNameBuf>,
    files: Vec<PathBuf>,
    /// Block devices whose label this create wrote.
    labels: Vec<PathBuf>,
}

impl Undo<'_> {
    fn run(self, error: Error) -> Error {
        let mut failures = Vec::new();
        for name in self.devices.iter().rev() {
            if let Err(e) = self.kernel.remove_if_present(name) {
                failures.push(e.to_string());
            }
        }
        for node in self.labels.iter().rev() {
            if let Err(e) = blockdev::clear_label(node) {
                failures.push(e.to_string());
            }
        }
        for f in self.files.iter().rev() {
            if let Err(e) = fs::remove_file(f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    failures.push(format!("remove {}: {e}", f.display()));
                }
            }
        }
        if failures.is_empty() {
            error
        } else {
            Error::Rollback {
                error: Box::new(error),
                undo: Box::new(Error::Inconsistent(failures.join("; "))),
            }
        }
    }
}

impl Pool {
    /// Creates a pool under `root`: the sparse files, loop devices,
    /// thin-pool and a formatted base device. Checks everything it can
    /// (sizes, root, device-mapper, dm-thin, mkfs) before it creates
    /// anything; a failure half-way removes what it made.
    ///
    /// The root is made 0700 (an existing one must be this user's, and is
    /// tightened if looser), its files 0600; the metadata file is fully
    /// allocated on the host.
    ///
    /// # Errors
    /// [`Error::PoolExists`], [`Error::RootOwner`], the environment errors,
    /// bad sizes, kernel and tool errors; ENOSPC (exit 6) when the host
    /// cannot hold the metadata file.
    pub fn create(root: &Path, opts: &CreateOptions, wait: bool) -> Result<Pool> {
        Self::create_inner(root, opts, None, wait)
    }

    /// Creates a pool under `root` whose data and metadata are the block
    /// devices in `devices` (see [`crate::blockdev`]); everything else as
    /// [`Pool::create`]. The devices are checked before anything is
    /// written: a device mounted, held or open exclusively is refused, one
    /// holding a signature unless `devices.force`. Each gets thinlayer's
    /// label in its first MiB; the pool maps the rest.
    ///
    /// # Errors
    /// As [`Pool::create`]; [`Error::DeviceInUse`], [`Error::DeviceHasData`],
    /// [`Error::InvalidArgument`] (not a block device, the same device
    /// twice), [`Error::InvalidSize`] (a size past the device).
    pub fn create_on_devices(
        root: &Path,
        opts: &CreateOptions,
        devices: &DevicePair,
        wait: bool,
    ) -> Result<Pool> {
        Self::create_inner(root, opts, Some(devices), wait)
    }

    /// Takes over the existing, active thin-pool `pool_device` (its dm
    /// name, `/dev/mapper/NAME`; for LVM the `VG-POOL-tpool` device) made
    /// by LVM or by hand: reads its thin ids from a metadata snapshot
    /// (`reserve_metadata_snap`, `thin_dump`, release), records them as
    /// foreign, and makes thinlayer's base device in it under a thin id
    /// above every foreign one (from [`FIRST_ADOPTED_THIN_ID`], far above
    /// the ids LVM hands out, which count up from its own highest). The
    /// pool itself (its tables, transaction id, size) stays its owner's:
    /// thinlayer never starts, stops, extends or repairs it, and never
    /// deletes or changes a thin id that is not its own, in any recovery.
    /// `opts` gives the filesystem, base size and low-water mark; its
    /// sizes are the pool's.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `pool_device` is missing or not a
    /// thin-pool, or is thinlayer's own; [`Error::Busy`] when the pool is
    /// not writable; [`Error::PoolExists`]; tool and kernel errors.
    pub fn adopt(root: &Path, pool_device: &str, opts: &CreateOptions, wait: bool) -> Result<Pool> {
        let name = pool_device
            .strip_prefix("/dev/mapper/")
            .unwrap_or(pool_device)
            .to_owned();
        let dm_name = devicemapper::DmNameBuf::new(name.clone()).map_err(|e| {
            Error::InvalidArgument(format!("`{pool_device}` is not a device-mapper name: {e}"))
        })?;
        if opts.base_size < opts.fs.min_size() || !opts.base_size.0.is_multiple_of(4096) {
            return Err(Error::InvalidSize {
                input: opts.base_size.to_string(),
                reason: format!(
                    "the base size must be a multiple of 4K of at least {} for {}",
                    opts.fs.min_size(),
                    opts.fs.name()
                ),
            });
        }
        if !(1..=99).contains(&opts.low_water_percent) {
            return Err(Error::InvalidArgument(format!(
                "low-water mark {}% is out of range; use 1 to 99",
                opts.low_water_percent
            )));
        }
        let kernel = Kernel::open()?;
        opts.fs.mkfs().find()?;
        Tool::ThinCheck.find()?;
        Tool::ThinDump.find()?;
        if kernel.device(&dm_name)?.is_none() {
            return Err(Error::InvalidArgument(format!(
                "there is no device-mapper device `{name}`; `dmsetup ls --target thin-pool` lists the thin-pools \
                 (an LVM pool VG/POOL is `VG-POOL-tpool` while a thin volume of it is active)"
            )));
        }
        let uuid = kernel.uuid_of(&dm_name)?;
        if uuid.as_deref().is_some_and(|u| u.starts_with("THINLAYER-")) {
            return Err(Error::InvalidArgument(format!(
                "{name} is a thinlayer pool already; use its own --root"
            )));
        }
        let table = kernel.table(&dm_name)?;
        let (meta, _data, block_sectors, len) = crate::check::pool_table_devices(&name, &table)?;
        let block_size = BlockSize::new(Bytes(block_sectors * 512))?;
        let st = kernel.pool_status(&dm_name)?;
        if st.summary != devicemapper::ThinPoolStatusSummary::Good || st.needs_check {
            return Err(Error::Busy {
                what: format!("the pool {name}"),
                detail: format!(
                    "it is in {:?} mode{}; have its owner repair or extend it first",
                    st.summary,
                    if st.needs_check {
                        " and flagged needs_check"
                    } else {
                        ""
                    }
                ),
            });
        }
        let meta_node = blockdev::node_of(meta)?;
        let meta_name = meta_node
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let metadata_size = blockdev::size_of(&meta_name)?;
        let layout = Layout {
            root: root.to_owned(),
        };
        if layout.pool_record().exists() && interrupted_create(&layout).is_none() {
            return Err(Error::PoolExists {
                root: root.to_owned(),
            });
        }
        record::check_owner(root)?;
        record::create_dir(root)?;
        let lock = lock::lock(root, LockMode::Exclusive, wait)?;
        record::secure_root(root, true)?;
        record::sweep_temp(root)?;
        if let Some(old) = interrupted_create(&layout) {
            tracing::info!(pool_id = %old.pool_id, "clearing an interrupted pool create");
            clear_interrupted_create(&kernel, &layout, &old)?;
        } else if layout.pool_record().exists() {
            return Err(Error::PoolExists {
                root: root.to_owned(),
            });
        }
        let foreign = foreign_thin_ids(&kernel, &dm_name, &meta_node)?;
        let first = foreign.iter().max().map_or(FIRST_ADOPTED_THIN_ID, |m| {
            (m + 1).max(FIRST_ADOPTED_THIN_ID)
        });
        let rec = PoolRecord {
            backing: Backing::Adopted {
                pool_name: name.clone(),
                pool_uuid: uuid,
                foreign_thin_ids: foreign.into_iter().collect(),
                first_thin_id: first,
            },
            pool_id: PoolId::generate(&root.to_string_lossy()),
            data_size: Bytes(len * 512),
            metadata_size,
            block_size,
            fs: opts.fs,
            base_size: opts.base_size,
            base_thin_id: first,
            next_thin_id: first + 1,
            transaction_id: st.transaction_id,
            low_water_percent: opts.low_water_percent,
            pending: None,
            spares: Vec::new(),
            trash: Vec::new(),
            created_unix: now_unix(),
        };
        let intent = PoolRecord {
            pending: Some(Pending::CreatePool),
            ..rec.clone()
        };
        record::write(&layout.pool_record(), RECORD_POOL, &intent)?;
        let built = (|| {
            let pool_dev = kernel
                .device(&dm_name)?
                .ok_or_else(|| Error::Inconsistent(format!("{name} vanished while adopting it")))?;
            kernel.pool_message(&dm_name, &format!("create_thin {first}"))?;
            let base = names::dm_name(&rec.pool_id, Role::Thin(first));
            let dev = kernel.new_thin(
                &base,
                &names::dm_uuid(&rec.pool_id, Role::Thin(first)),
                pool_dev,
                kernel::ThinId::new(first)?,
                kernel::Sectors(rec.base_size.sectors()),
            )?;
            let made = make_filesystem(rec.fs, &kernel::devnode(dev));
            kernel.remove(&base)?;
            made?;
            record::create_dir(&layout.layers_dir())?;
            record::write(&layout.pool_record(), RECORD_POOL, &rec)
        })();
        if let Err(e) = built {
            // Ours only: the base device and its thin id, then the intent.
            return Err(match clear_interrupted_create(&kernel, &layout, &intent) {
                Ok(_) => e,
                Err(undo) => Error::Rollback {
                    error: Box::new(e),
                    undo: Box::new(undo),
                },
            });
        }
        tracing::info!(pool = %name, first_thin_id = first, "adopted the pool");
        Ok(Pool {
            layout,
            rec,
            kernel: Some(kernel),
            active: None,
            settled: false,
            children: None,
            deferred_teardown: false,
            idle: Default::default(),
            _lock: lock,
        })
    }

    /// Resolves and checks the two devices and sets the sizes in `opts`
    /// from them. Reads only.
    fn pick_devices(
        d: &DevicePair,
        opts: &mut CreateOptions,
    ) -> Result<(blockdev::BlockDev, blockdev::BlockDev)> {
        let data = blockdev::resolve(&d.data)?;
        let meta = blockdev::resolve(&d.metadata)?;
        let nested = |a: &blockdev::BlockDev, b: &blockdev::BlockDev| {
            a.device == b.device || blockdev::partitions_of(&a.name).contains(&b.name)
        };
        if nested(&data, &meta) || nested(&meta, &data) {
            return Err(Error::InvalidArgument(format!(
                "{} and {} overlap (/dev/{} and /dev/{}); give two devices, e.g. two partitions of one disk",
                d.data.display(),
                d.metadata.display(),
                data.name,
                meta.name
            )));
        }
        blockdev::check_free(&data, &d.data, d.force)?;
        blockdev::check_free(&meta, &d.metadata, d.force)?;
        let block = opts.block_size.bytes().0;
        let room = |dev: &blockdev::BlockDev, given: &Path, want: Bytes, what: &str| {
            if want > dev.usable() {
                return Err(Error::InvalidSize {
                    input: want.to_string(),
                    reason: format!(
                        "the {what} device {} holds {} after thinlayer's {} label region; \
                         give at most that, or leave the size out to use it all",
                        given.display(),
                        dev.usable(),
                        Bytes(blockdev::LABEL_BYTES)
                    ),
                });
            }
            Ok(want)
        };
        let whole_data = Bytes(data.usable().0 / block * block);
        opts.data_size = room(&data, &d.data, d.data_size.unwrap_or(whole_data), "data")?;
        let whole_meta = Bytes(meta.usable().0.min(units::MAX_METADATA) / 4096 * 4096);
        opts.metadata_size = Some(room(
            &meta,
            &d.metadata,
            opts.metadata_size.unwrap_or(whole_meta),
            "metadata",
        )?);
        Ok((data, meta))
    }

    fn create_inner(
        root: &Path,
        opts: &CreateOptions,
        devices: Option<&DevicePair>,
        wait: bool,
    ) -> Result<Pool> {
        let layout = Layout {
            root: root.to_owned(),
        };
        // A pool here is said before anything about the devices (which it
        // holds).
        let interrupted = interrupted_create(&layout).is_some();
        if layout.pool_record().exists() && !interrupted {
            return Err(Error::PoolExists {
                root: root.to_owned(),
            });
        }
        let mut opts = opts.clone();
        // The devices are checked before anything is written; but an
        // interrupted create's tables may hold them and its label and
        // metadata lie on them: then they are checked once its leftovers
        // are cleared, below.
        let mut picked = match devices {
            Some(d) if !interrupted => Some(Self::pick_devices(d, &mut opts)?),
            _ => None,
        };
        if devices.is_none() || !interrupted {
            check_create_options(&opts)?;
        }
        let kernel = Kernel::open()?;
        opts.fs.mkfs().find()?;
        Tool::ThinCheck.find()?;
        record::check_owner(root)?;
        record::create_dir(root)?;
        let lock = lock::lock(root, LockMode::Exclusive, wait)?;
        record::secure_root(root, true)?;
        record::sweep_temp(root)?;
        if layout.pool_record().exists() {
            match interrupted_create(&layout) {
                Some(old) => {
                    tracing::info!(pool_id = %old.pool_id, "clearing an interrupted pool create");
                    clear_interrupted_create(&kernel, &layout, &old)?;
                }
                None => {
                    return Err(Error::PoolExists {
                        root: root.to_owned(),
                    });
                }
            }
        }
        if let (Some(d), None) = (devices, &picked) {
            picked = Some(Self::pick_devices(d, &mut opts)?);
        }
        let opts = &opts;
        let metadata_size = check_create_options(opts)?;
        let data_size =
            Bytes(opts.data_size.blocks_of(opts.block_size) * opts.block_size.bytes().0);
        let pool_id = PoolId::generate(&root.to_string_lossy());
        let backing = match (devices, &picked) {
            (Some(d), Some((data, meta))) => Backing::Devices {
                data: blockdev::device_ref(data, &d.data, &blockdev::new_uuid(&data.name)),
                metadata: blockdev::device_ref(meta, &d.metadata, &blockdev::new_uuid(&meta.name)),
            },
            _ => Backing::Files,
        };
        let rec = PoolRecord {
            backing,
            pool_id,
            data_size,
            metadata_size,
            block_size: opts.block_size,
            fs: opts.fs,
            base_size: opts.base_size,
            base_thin_id: 0,
            next_thin_id: 1,
            transaction_id: 1,
            low_water_percent: opts.low_water_percent,
            pending: None,
            spares: Vec::new(),
            trash: Vec::new(),
            created_unix: now_unix(),
        };
        let mut undo = Undo {
            kernel: &kernel,
            devices: Vec::new(),
            files: Vec::new(),
            labels: Vec::new(),
        };
        // The intent first: leftovers of a crash from here on sit under a
        // record that says they are leftovers.
        let intent = PoolRecord {
            pending: Some(Pending::CreatePool),
            ..rec.clone()
        };
        undo.files.push(layout.pool_record());
        if let Err(e) = record::write(&layout.pool_record(), RECORD_POOL, &intent) {
            return Err(undo.run(e));
        }
        fault::point("pool_create.after_intent");
        match Self::build(&kernel, &layout, &rec, picked.as_ref(), &mut undo) {
            Ok(()) => {}
            Err(e) => return Err(undo.run(e)),
        }
        drop(undo);
        Ok(Pool {
            layout,
            rec,
            kernel: Some(kernel),
            active: None,
            settled: false,
            children: None,
            deferred_teardown: false,
            idle: Default::default(),
            _lock: lock,
        })
    }

    fn build(
        kernel: &Kernel,
        layout: &Layout,
        rec: &PoolRecord,
        picked: Option<&(blockdev::BlockDev, blockdev::BlockDev)>,
        undo: &mut Undo<'_>,
    ) -> Result<()> {
        if let (Backing::Devices { data, metadata }, Some((data_dev, meta_dev))) =
            (&rec.backing, picked)
        {
            for (role, r, dev) in [
                (DeviceRole::Data, data, data_dev),
                (DeviceRole::Metadata, metadata, meta_dev),
            ] {
                let label = blockdev::Label {
                    pool_id: rec.pool_id.clone(),
                    role,
                    uuid: r.label_uuid.clone(),
                };
                undo.labels.push(dev.node.clone());
                blockdev::write_label(&dev.node, &label)?;
            }
        }
        let files: Vec<(PathBuf, Bytes)> = match rec.backing {
            Backing::Files => vec![
                (layout.data_file(), rec.data_size),
                (layout.metadata_file(), rec.metadata_size),
            ],
            _ => Vec::new(),
        };
        for (file, size) in files {
            // create_new: never overwrite a file we did not make. A new file
            // is all zeros, so the kernel formats fresh metadata (it keeps
            // old metadata when the superblock is not zero).
            let f = record::open_private(&file, true)?;
            undo.files.push(file.clone());
            if file == layout.metadata_file() {
                // Allocated on the host now: a full host filesystem later
                // fails data writes, never a metadata write.
                crate::space::allocate_file(&f, &file, size)?;
            } else {
                f.set_len(size.0)
                    .and_then(|()| f.sync_all())
                    .ctx(|| format!("size {} to {size}", file.display()))?;
            }
        }
        fault::point("pool_create.after_files");
        let (meta_dev, data_dev) = Self::start_pool(kernel, layout, rec, &CREATE_POINTS, |name| {
            undo.devices.push(name.to_owned());
        })?;
        let _ = (meta_dev, data_dev);
        let pool = names::dm_name(&rec.pool_id, Role::Pool);
        let pool_dev = kernel
            .device(&pool)?
            .ok_or_else(|| Error::Inconsistent(format!("{pool:?} vanished after creation")))?;
        kernel.pool_message(&pool, &format!("create_thin {}", rec.base_thin_id))?;
        fault::point("pool_create.after_base_thin");
        let base = names::dm_name(&rec.pool_id, Role::Thin(rec.base_thin_id));
        undo.devices.push(base.clone());
        let dev = kernel.new_thin(
            &base,
            &names::dm_uuid(&rec.pool_id, Role::Thin(rec.base_thin_id)),
            pool_dev,
            kernel::ThinId::new(rec.base_thin_id)?,
            kernel::Sectors(rec.base_size.sectors()),
        )?;
        fault::point("pool_create.after_base_activation");
        make_filesystem(rec.fs, &kernel::devnode(dev))?;
        fault::point("pool_create.after_mkfs");
        kernel.remove(&base)?;
        fault::point("pool_create.after_base_teardown");
        kernel.set_transaction_id(&pool, 0, rec.transaction_id)?;
        fault::point("pool_create.after_set_transaction_id");
        record::create_dir(&layout.layers_dir())?;
        record::write(&layout.pool_record(), RECORD_POOL, rec)?;
        fault::point("pool_create.after_record");
        Ok(())
    }

    /// Loop devices, linear devices and the thin-pool from the record.
    /// `made` is told the name of each dm device as it is created.
    fn start_pool(
        kernel: &Kernel,
        layout: &Layout,
        rec: &PoolRecord,
        points: &StartPoints,
        mut made: impl FnMut(&devicemapper::DmName),
    ) -> Result<(devicemapper::Device, devicemapper::Device)> {
        let id = &rec.pool_id;
        let (meta_under, data_under, offset, loops) = match &rec.backing {
            Backing::Files => {
                let meta_loop = loopback::attach(&layout.metadata_file())?;
                let data_loop = loopback::attach(&layout.data_file())?;
                (
                    meta_loop.device,
                    data_loop.device,
                    0,
                    Some((meta_loop, data_loop)),
                )
            }
            Backing::Devices { data, metadata } => {
                let m = blockdev::find(id, DeviceRole::Metadata, metadata)?;
                let d = blockdev::find(id, DeviceRole::Data, data)?;
                for (dev, want, role) in [
                    (&m, rec.metadata_size, "metadata"),
                    (&d, rec.data_size, "data"),
                ] {
                    if dev.usable() < want {
                        return Err(Error::Inconsistent(format!(
                            "the {role} device {} holds {} past its label but the pool uses {want}: \
                             it shrank; give it back its size (`lvextend`, or the disk image) and retry",
                            dev.node.display(),
                            dev.usable()
                        )));
                    }
                }
                (m.device, d.device, blockdev::LABEL_SECTORS, None)
            }
            Backing::Adopted { pool_name, .. } => {
                return Err(Error::Inconsistent(format!(
                    "the adopted pool {pool_name} is started by its owner, never by thinlayer"
                )));
            }
        };
        fault::point(points.loops);
        let meta_name = names::dm_name(id, Role::Meta);
        let meta = kernel.create_linear(
            &meta_name,
            &names::dm_uuid(id, Role::Meta),
            meta_under,
            kernel::Sectors(offset),
            kernel::Sectors(rec.metadata_size.sectors()),
        )?;
        made(&meta_name);
        fault::point(points.meta);
        let data_name = names::dm_name(id, Role::Data);
        let data = kernel.create_linear(
            &data_name,
            &names::dm_uuid(id, Role::Data),
            data_under,
            kernel::Sectors(offset),
            kernel::Sectors(rec.data_size.sectors()),
        )?;
        made(&data_name);
        fault::point(points.data);
        let pool_name = names::dm_name(id, Role::Pool);
        kernel.create_pool(
            &pool_name,
            &names::dm_uuid(id, Role::Pool),
            &pool_spec(rec, meta, data),
        )?;
        made(&pool_name);
        fault::point(points.pool);
        // The linear devices hold the loop devices open now; dropping our
        // handles leaves autoclear to detach them when the pool goes.
        drop(loops);
        Ok((meta, data))
    }

    /// Opens the pool under `root`, taking the root's lock in `mode`. A root
    /// another user owns is refused; an exclusive open tightens a root
    /// others can read (see [`record::secure_root`]).
    ///
    /// # Errors
    /// [`Error::NotRoot`], [`Error::RootOwner`], [`Error::NoPool`],
    /// [`Error::Locked`], damaged records.
    pub fn open(root: &Path, mode: LockMode, wait: bool) -> Result<Pool> {
        let layout = Layout {
            root: root.to_owned(),
        };
        kernel::require_root()?;
        record::check_owner(root)?;
        if !layout.pool_record().exists() {
            return Err(Error::NoPool {
                root: root.to_owned(),
            });
        }
        let lock = lock::lock(root, mode, wait)?;
        // Under the lock: one command tightens and says so.
        record::secure_root(root, mode == LockMode::Exclusive)?;
        let rec: PoolRecord = match record::read(&layout.pool_record(), RECORD_POOL) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // Destroyed while we waited for the lock.
                return Err(Error::NoPool {
                    root: root.to_owned(),
                });
            }
            r => r?,
        };
        if mode == LockMode::Exclusive {
            record::sweep_temp(root)?;
            record::sweep_temp(&layout.layers_dir())?;
        }
        Ok(Pool {
            layout,
            rec,
            kernel: None,
            active: None,
            settled: false,
            children: None,
            deferred_teardown: false,
            idle: Default::default(),
            _lock: lock,
        })
    }

    /// Allocates a metadata file an older version left sparse, so a full
    /// host cannot fail a metadata write. Best effort: a host too full for
    /// it is warned about (`pool status` says so too), never fatal here.
    fn allocate_metadata(&self) {
        let file = self.layout.metadata_file();
        let r = OpenOptions::new()
            .write(true)
            .open(&file)
            .ctx(|| format!("open {}", file.display()))
            .and_then(|f| crate::space::allocate_file(&f, &file, self.rec.metadata_size));
        if let Err(e) = r {
            tracing::warn!("could not allocate the metadata file on the host: {e}");
        }
    }

    /// A read-only loop device over the pool's metadata (the file, or the
    /// metadata device past its label), for the tools, and the path that
    /// names the metadata in messages.
    ///
    /// # Errors
    /// [`Error::DeviceMissing`]; [`Error::Foreign`] for an adopted pool
    /// (its metadata is read through the live pool only); loop errors.
    pub(crate) fn metadata_loop(&self) -> Result<(loopback::Loop, PathBuf)> {
        match &self.rec.backing {
            Backing::Files => {
                let f = self.layout.metadata_file();
                Ok((loopback::attach_readonly(&f)?, f))
            }
            Backing::Devices { metadata, .. } => {
                let dev = blockdev::find(&self.rec.pool_id, DeviceRole::Metadata, metadata)?;
                let lp = loopback::attach_readonly_at(
                    &dev.node,
                    blockdev::LABEL_BYTES,
                    self.rec.metadata_size.0,
                )?;
                Ok((lp, dev.node))
            }
            Backing::Adopted { pool_name, .. } => Err(Error::Foreign {
                what: "its metadata can only be read while it is active".into(),
                pool: pool_name.clone(),
                hint: "bring it up the way its owner does (`lvchange -ay VG/POOL`), then retry"
                    .into(),
            }),
        }
    }

    /// The pool record as loaded.
    pub fn record(&self) -> &PoolRecord {
        &self.rec
    }

    /// The root's paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn kernel(&mut self) -> Result<&Kernel> {
        if self.kernel.is_none() {
            self.kernel = Some(Kernel::open()?);
        }
        Ok(self.kernel.as_ref().expect("set just above"))
    }

    /// The dm name of `role`: thinlayer's own, but for the pool device of
    /// an adopted pool, which has its owner's name.
    pub(crate) fn name(&self, role: Role) -> devicemapper::DmNameBuf {
        match (&self.rec.backing, role) {
            (Backing::Adopted { pool_name, .. }, Role::Pool) => {
                devicemapper::DmNameBuf::new(pool_name.clone())
                    .expect("checked to be a dm name when adopted")
            }
            _ => names::dm_name(&self.rec.pool_id, role),
        }
    }

    /// Refuses to touch `thin_id` when it is someone else's (an adopted
    /// pool's foreign ids, and every id below thinlayer's first).
    ///
    /// # Errors
    /// [`Error::Foreign`].
    pub(crate) fn refuse_foreign(&self, thin_id: u32) -> Result<()> {
        match &self.rec.backing {
            Backing::Adopted { pool_name, .. } if self.rec.backing.is_foreign(thin_id) => {
                Err(Error::Foreign {
                    what: format!("thin id {thin_id} is not thinlayer's"),
                    pool: pool_name.clone(),
                    hint: "thinlayer never deletes or changes it; its owner does".into(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether the kernel's transaction id is the pool's owner's (an
    /// adopted pool: LVM moves it), so records are never compared to it.
    pub(crate) fn foreign_transactions(&self) -> bool {
        matches!(self.rec.backing, Backing::Adopted { .. })
    }

    pub(crate) fn uuid(&self, role: Role) -> devicemapper::DmUuidBuf {
        names::dm_uuid(&self.rec.pool_id, role)
    }

    pub(crate) fn write_record(&self) -> Result<()> {
        record::write(&self.layout.pool_record(), RECORD_POOL, &self.rec)
    }

    /// The pool device's number if it is active.
    ///
    /// # Errors
    /// Environment and kernel errors.
    pub fn pool_device(&mut self) -> Result<Option<devicemapper::Device>> {
        if self.active.is_some() {
            return Ok(self.active);
        }
        let name = self.name(Role::Pool);
        self.active = self.kernel()?.device(&name)?;
        if self.active.is_some() && !matches!(self.rec.backing, Backing::Adopted { .. }) {
            let (meta, data) = (self.name(Role::Meta), self.name(Role::Data));
            let block = kernel::Sectors(self.rec.block_size.sectors());
            let kernel = self.kernel.as_ref().expect("opened above");
            if let Err(e) = kernel.check_pool(&name, &meta, &data, block) {
                self.active = None;
                return Err(e);
            }
        }
        if let (Some(_), Backing::Adopted { pool_uuid, .. }) = (self.active, &self.rec.backing) {
            let live = self.kernel.as_ref().expect("opened above").uuid_of(&name)?;
            if live != *pool_uuid {
                self.active = None;
                return Err(Error::Inconsistent(format!(
                    "{} is not the pool this root adopted (its dm uuid is {}, the record says {}); \
                     bring the adopted pool back up under that name, or point --root elsewhere",
                    &*name,
                    live.as_deref().unwrap_or("none"),
                    pool_uuid.as_deref().unwrap_or("none")
                )));
            }
        }
        Ok(self.active)
    }

    /// Forgets the cached pool device, for verbs that bring it up or down.
    pub(crate) fn forget_pool_device(&mut self) {
        self.active = None;
        self.settled = false;
    }

    /// The pool device's number; an error that says how to activate when it
    /// is not active.
    ///
    /// # Errors
    /// [`Error::PoolInactive`], [`Error::InterruptedCreate`], environment
    /// and kernel errors.
    pub fn require_active(&mut self) -> Result<devicemapper::Device> {
        if self.rec.pending == Some(Pending::CreatePool) {
            return Err(self.interrupted_create_error());
        }
        self.pool_device()?.ok_or_else(|| Error::PoolInactive {
            root: self.layout.root.clone(),
        })
    }

    /// Brings the pool's loop and dm devices back from the records, after
    /// `thin_check` passes on the metadata; then finishes any operation a
    /// crash interrupted.
    ///
    /// # Errors
    /// [`Error::MetadataDamaged`], environment and kernel errors.
    pub fn activate(&mut self) -> Result<Action> {
        self.forget_pool_device();
        if self.rec.pending == Some(Pending::CreatePool) {
            return Err(self.interrupted_create_error());
        }
        if self.pool_device()?.is_some() {
            self.recover()?;
            return Ok(Action::AlreadyDone);
        }
        if let Backing::Adopted { pool_name, .. } = &self.rec.backing {
            return Err(Error::Foreign {
                what: format!("{pool_name} is not active"),
                pool: pool_name.clone(),
                hint: "bring it up the way its owner does (`lvchange -ay VG/POOL` for LVM), \
                       then run `thinlayer pool activate` again"
                    .into(),
            });
        }
        // Leftovers of an activation that died half-way.
        let pool_id = self.rec.pool_id.clone();
        let kernel = self.kernel()?;
        for role in [Role::Data, Role::Meta] {
            kernel.remove_if_present(&names::dm_name(&pool_id, role))?;
        }
        fault::point("pool_activate.after_leftovers");
        if self.rec.backing.is_files() {
            check_metadata(&self.layout.metadata_file())?;
            self.allocate_metadata();
            // An extend that grew the files (and maybe the kernel's
            // metadata) but died before its record: build the tables from
            // the files.
            if self.reconcile_sizes()? {
                tracing::info!("adopted the data/metadata sizes an interrupted extend left");
            }
        } else {
            // (A device pool's extend writes its record first: the record
            // is never behind the kernel.)
            let (lp, node) = self.metadata_loop()?;
            check_loop(&lp, &node)?;
        }
        let kernel = self.kernel.as_ref().expect("opened above");
        let mut made = Vec::new();
        let started = Self::start_pool(kernel, &self.layout, &self.rec, &ACTIVATE_POINTS, |n| {
            made.push(n.to_owned())
        });
        if let Err(e) = started {
            let undo = Undo {
                kernel,
                devices: made,
                files: Vec::new(),
                labels: Vec::new(),
            };
            return Err(undo.run(e));
        }
        self.recover()?;
        Ok(Action::Done)
    }

    /// Tears down every dm device of the pool and (by autoclear) its loop
    /// devices, keeping all data. Refuses while any layer is mounted.
    ///
    /// # Errors
    /// [`Error::Mounted`], [`Error::Busy`], kernel errors.
    pub fn deactivate(&mut self) -> Result<Action> {
        self.forget_pool_device();
        let prefix = names::name_prefix(&self.rec.pool_id);
        let pool_id = self.rec.pool_id.clone();
        let kernel = self.kernel()?;
        let present = kernel.names_with_prefix(&prefix)?;
        if present.is_empty() {
            return Ok(Action::AlreadyDone);
        }
        let mut thins: Vec<(String, devicemapper::Device)> = Vec::new();
        for name in &present {
            if let Some(Role::Thin(_)) = names::parse_role(&pool_id, name) {
                let dm_name = devicemapper::DmNameBuf::new(name.clone())
                    .expect("listed by the kernel: a valid name");
                if let Some(dev) = kernel.device(&dm_name)? {
                    thins.push((name.clone(), dev));
                }
            }
        }
        let all = mounts::all()?;
        let mounted: Vec<String> = all
            .iter()
            .filter(|m| thins.iter().any(|(_, d)| *d == m.device))
            .map(|m| m.mountpoint.display().to_string())
            .collect();
        if !mounted.is_empty() {
            return Err(Error::Mounted {
                what: "a layer of this pool".into(),
                mountpoints: mounted.join(", "),
                hint: mounted[0].clone(),
            });
        }
        for (name, _) in &thins {
            let n =
                devicemapper::DmNameBuf::new(name.clone()).expect("valid: listed by the kernel");
            kernel.remove_if_present(&n)?;
            fault::point("pool_deactivate.after_thin_removal");
        }
        for role in [Role::Pool, Role::Data, Role::Meta] {
            kernel.remove_if_present(&names::dm_name(&pool_id, role))?;
            fault::point(match role {
                Role::Pool => "pool_deactivate.after_pool_removal",
                Role::Data => "pool_deactivate.after_data_removal",
                _ => "pool_deactivate.after_meta_removal",
            });
        }
        Ok(Action::Done)
    }

    /// Removes the pool: its devices, files and records. Refuses while
    /// layers exist unless `force`, which first unmounts every mount of the
    /// pool's devices.
    ///
    /// # Errors
    /// [`Error::HasChildren`] (layers remain), [`Error::Busy`], kernel errors.
    pub fn destroy(self, force: bool) -> Result<()> {
        self.destroy_with(force, false).map(|_| ())
    }

    /// [`Pool::destroy`], and for a pool on block devices, with `wipe`,
    /// their labels and the metadata zeroed and the devices discarded;
    /// without it the devices are left as they are (the next `pool
    /// create` on them then needs `--force`). An adopted pool's own thin
    /// ids are deleted from it (the pool stays, its owner's; the foreign
    /// ids are not touched). Returns what was done beyond the records, in
    /// sentences.
    ///
    /// # Errors
    /// As [`Pool::destroy`]; [`Error::Foreign`] for `wipe` of an adopted
    /// pool, or when an adopted pool is not active;
    /// [`Error::DeviceMissing`] when `wipe` cannot find a device (nothing
    /// is changed then).
    pub fn destroy_with(mut self, force: bool, wipe: bool) -> Result<Vec<String>> {
        let mut said = Vec::new();
        if self.rec.pending == Some(Pending::CreatePool) {
            // Nothing an unfinished create made was ever handed out: its
            // leftovers go as `pool recover` clears them (a device pool's
            // labels and metadata superblock too, so the devices are free
            // again, `--wipe` or not).
            let (layout, rec) = (self.layout.clone(), self.rec.clone());
            for what in clear_interrupted_create(self.kernel()?, &layout, &rec)? {
                said.push(format!(
                    "removed {what}, left by an interrupted pool create"
                ));
            }
            let _ = fs::remove_file(layout.root.join("lock"));
            let _ = fs::remove_dir(&layout.root);
            return Ok(said);
        }
        if let Backing::Adopted { pool_name, .. } = self.rec.backing.clone() {
            if wipe {
                return Err(Error::Foreign {
                    what: "--wipe".into(),
                    pool: pool_name.clone(),
                    hint: "destroy without --wipe removes thinlayer's thin ids and records; \
                           remove the pool itself with its owner (`lvremove VG/POOL`)"
                        .into(),
                });
            }
            if self.pool_device()?.is_none() {
                return Err(Error::Foreign {
                    what: format!(
                        "{pool_name} is not active, so thinlayer cannot delete its own thin ids from it"
                    ),
                    pool: pool_name.clone(),
                    hint: "bring it up the way its owner does (`lvchange -ay VG/POOL`), then retry"
                        .into(),
                });
            }
        }
        // Found before anything changes: a missing device refuses the wipe.
        let to_wipe = match (&self.rec.backing, wipe) {
            (Backing::Devices { data, metadata }, true) => vec![
                blockdev::find(&self.rec.pool_id, DeviceRole::Data, data)?,
                blockdev::find(&self.rec.pool_id, DeviceRole::Metadata, metadata)?,
            ],
            _ => Vec::new(),
        };
        let layers = self.layer_records()?;
        if !layers.is_empty() && !force {
            let ids: Vec<&str> = layers.iter().map(|l| l.id.as_str()).collect();
            return Err(Error::HasChildren {
                id: format!("the pool under {}", self.layout.root.display()),
                children: format!(
                    "{} layer(s): {}; remove them or pass --force",
                    ids.len(),
                    ids.join(", ")
                ),
            });
        }
        if force {
            self.unmount_everything()?;
        }
        if self.foreign_transactions() {
            self.recover()?;
        }
        self.deactivate()?;
        if let Backing::Adopted { pool_name, .. } = self.rec.backing.clone() {
            // Every thin id of thinlayer's in the pool: layers, spares,
            // trash, the base, and what a crash left.
            let ids = self.metadata_thin_ids()?;
            let pool = self.name(Role::Pool);
            let mine: Vec<u32> = ids
                .into_iter()
                .filter(|t| !self.rec.backing.is_foreign(*t))
                .collect();
            let n = mine.len();
            for t in mine {
                self.kernel()?.pool_message(&pool, &format!("delete {t}"))?;
            }
            said.push(format!(
                "deleted thinlayer's {n} thin id(s) from {pool_name}; its other thin ids and the pool itself are untouched"
            ));
        }
        for l in &layers {
            record::remove(&self.layout.layer_record(&l.id))?;
        }
        record::remove(&self.layout.pool_record())?;
        if self.rec.backing.is_files() {
            for f in [self.layout.data_file(), self.layout.metadata_file()] {
                record::remove(&f)?;
            }
        }
        let _ = fs::remove_dir(self.layout.layers_dir());
        let _ = fs::remove_file(self.layout.root.join("lock"));
        // Only succeeds when nothing else lives in the root.
        let _ = fs::remove_dir(&self.layout.root);
        if let Backing::Devices { data, metadata } = &self.rec.backing {
            if to_wipe.is_empty() {
                said.push(format!(
                    "left the data device {} and the metadata device {} as they are (pass --wipe to wipe them)",
                    data.describe(),
                    metadata.describe()
                ));
            }
        }
        for dev in &to_wipe {
            let discarded = blockdev::wipe(dev)?;
            said.push(format!(
                "wiped {} ({})",
                dev.node.display(),
                if discarded {
                    "label and metadata zeroed, all of it discarded"
                } else {
                    "label and metadata zeroed; it takes no discards"
                }
            ));
        }
        Ok(said)
    }

    fn unmount_everything(&mut self) -> Result<()> {
        let prefix = names::name_prefix(&self.rec.pool_id);
        let kernel = self.kernel()?;
        let mut devices = Vec::new();
        for name in kernel.names_with_prefix(&prefix)? {
            let n = devicemapper::DmNameBuf::new(name).expect("valid: listed by the kernel");
            if let Some(d) = kernel.device(&n)? {
                devices.push(d);
            }
        }
        let mut points: Vec<PathBuf> = mounts::all()?
            .into_iter()
            .filter(|m| devices.contains(&m.device))
            .map(|m| m.mountpoint)
            .collect();
        points.reverse();
        for p in points {
            mounts::umount(&p)?;
        }
        Ok(())
    }

    /// Finishes or undoes an operation a crash interrupted (see the module
    /// notes); checks that the kernel's transaction id and the record's
    /// agree. Needs the pool active; a no-op when it is not. Returns what
    /// it did, in sentences (empty when nothing was interrupted).
    ///
    /// Once settled, a handle does not look again: it holds the root's
    /// lock, so no other thinlayer process changes the pool under it.
    ///
    /// # Errors
    /// [`Error::Inconsistent`] when the ids disagree; [`Error::InterruptedCreate`];
    /// kernel errors.
    pub fn recover(&mut self) -> Result<Vec<String>> {
        if self.rec.pending == Some(Pending::CreatePool) {
            return Err(self.interrupted_create_error());
        }
        if self.settled && self.rec.pending.is_none() {
            return Ok(Vec::new());
        }
        if self.pool_device()?.is_none() {
            return Ok(Vec::new());
        }
        let pool = self.name(Role::Pool);
        let t = self.rec.transaction_id;
        let kt = if self.foreign_transactions() {
            // The owner's counter (LVM moves it): never compared.
            t
        } else {
            self.kernel()?.pool_status(&pool)?.transaction_id
        };
        let before = self.rec.pending.clone();
        if before.is_some() {
            self.children = None;
        }
        let outcome = self.settle(t, kt)?;
        self.settled = true;
        Ok(match before {
            None => Vec::new(),
            Some(p) => vec![format!(
                "settled an interrupted {}: {outcome}",
                p.describe()
            )],
        })
    }

    fn settle(&mut self, t: u64, kt: u64) -> Result<&'static str> {
        match self.rec.pending.clone() {
            None if kt == t => Ok("nothing to do"),
            None => Err(Error::Inconsistent(format!(
                "the pool's kernel transaction id is {kt} but the records are at {t}: \
                 the metadata or the records were replaced; run `thinlayer pool check`"
            ))),
            Some(Pending::CreateLayer { id, thin_id, .. }) if kt == t => {
                let path = self.layout.layer_record(&id);
                let kept = path.exists()
                    && record::read::<LayerRecord>(&path, RECORD_LAYER)?.thin_id == thin_id;
                if kept {
                    tracing::info!(%id, thin_id, "recovery: layer create had committed");
                    return self.commit(t).map(|()| "kept (its record was written)");
                }
                tracing::info!(%id, thin_id, "recovery: rolling layer create back");
                // The thin id may or may not have been made before the crash.
                self.delete_thins(&[thin_id], true)?;
                self.commit(t).map(|()| "rolled back")
            }
            Some(Pending::RemoveLayer { id, thin_id }) if kt == t => {
                tracing::info!(%id, thin_id, "recovery: finishing layer removal");
                let path = self.layout.layer_record(&id);
                if path.exists() {
                    // Give the layer's space back to the host before the
                    // delete, as `layer rm` does (a no-op once deleted).
                    let size = record::read::<LayerRecord>(&path, RECORD_LAYER)
                        .map_or(self.rec.base_size, |l| l.size_in(&self.rec));
                    self.reclaim_items(&[Trashed { thin_id, size }], true)?;
                    record::remove(&path)?;
                } else {
                    self.delete_thins(&[thin_id], true)?;
                }
                self.commit(t).map(|()| "finished")
            }
            Some(Pending::ProvisionSpare { thin_id, .. }) if kt == t => {
                // Listed spares were committed with their intent cleared.
                tracing::info!(thin_id, "recovery: rolling a spare's provision back");
                self.delete_thins(&[thin_id], true)?;
                self.commit(t).map(|()| "rolled back")
            }
            Some(Pending::TrashLayer { id, thin_id, size }) if kt == t => {
                // Finish it: the record goes, the thin id to the trash.
                tracing::info!(%id, thin_id, "recovery: finishing layer rm --later");
                record::remove(&self.layout.layer_record(&id))?;
                let item = Trashed { thin_id, size };
                if !self.rec.trash.contains(&item) {
                    self.rec.trash.push(item);
                }
                self.commit(t)
                    .map(|()| "finished (its space comes back at the next reclaim)")
            }
            Some(Pending::Reclaim { trash }) if kt == t => {
                tracing::info!(n = trash.len(), "recovery: finishing a reclaim");
                self.reclaim_items(&trash, true)?;
                self.commit(t).map(|()| "finished")
            }
            Some(Pending::DropSpares { thin_ids }) if kt == t => {
                tracing::info!(?thin_ids, "recovery: finishing a drop of spares");
                self.delete_thins(&thin_ids, true)?;
                self.commit(t).map(|()| "finished")
            }
            Some(p) => Err(Error::Inconsistent(format!(
                "an interrupted {p:?} left the kernel at transaction {kt} and the records at {t}; \
                 run `thinlayer pool check`"
            ))),
        }
    }

    pub(crate) fn interrupted_create_error(&self) -> Error {
        Error::InterruptedCreate {
            root: self.layout.root.clone(),
        }
    }

    /// Records the pool at transaction `t` with nothing pending.
    pub(crate) fn commit(&mut self, t: u64) -> Result<()> {
        self.rec.transaction_id = t;
        self.rec.pending = None;
        self.write_record()
    }

    /// The pool's state: the record's figures, and the kernel's when active.
    ///
    /// # Errors
    /// Environment and kernel errors.
    pub fn status(&mut self) -> Result<PoolStatus> {
        let layers = self.layer_records()?.len();
        let active = self.pool_device()?.is_some();
        let mut warnings = Vec::new();
        let kernel_status = if active {
            let pool = self.name(Role::Pool);
            let prefix = names::name_prefix(&self.rec.pool_id);
            let kernel = self.kernel()?;
            let w = kernel.pool_status(&pool)?;
            let active_thins = kernel
                .names_with_prefix(&prefix)?
                .iter()
                .filter(|n| matches!(names::parse_role(&self.rec.pool_id, n), Some(Role::Thin(_))))
                .count();
            let k = KernelStatus {
                transaction_id: w.transaction_id,
                data_used_blocks: w.usage.used_data.0,
                data_total_blocks: w.usage.total_data.0,
                metadata_used_blocks: w.usage.used_meta.0,
                metadata_total_blocks: w.usage.total_meta.0,
                mode: match w.summary {
                    devicemapper::ThinPoolStatusSummary::Good => "rw",
                    devicemapper::ThinPoolStatusSummary::ReadOnly => "ro",
                    devicemapper::ThinPoolStatusSummary::OutOfSpace => "out_of_data_space",
                }
                .into(),
                needs_check: w.needs_check,
                discard_passdown: w.discard_passdown,
                error_if_no_space: w.no_space_policy == devicemapper::ThinPoolNoSpacePolicy::Error,
                active_thin_devices: active_thins,
            };
            let pct = u64::from(self.rec.low_water_percent);
            for (what, used, total) in [
                ("data", k.data_used_blocks, k.data_total_blocks),
                ("metadata", k.metadata_used_blocks, k.metadata_total_blocks),
            ] {
                if total > 0 && used * 100 >= total * pct {
                    warnings.push(format!(
                        "{what} is {}% full (low-water mark {pct}%): extend it with `thinlayer pool extend --{what}-size +SIZE`, or remove layers",
                        used * 100 / total
                    ));
                }
            }
            if k.needs_check {
                warnings.push("the kernel flagged the metadata as needing a check: deactivate and run `thinlayer pool check`".into());
            }
            if k.mode == "out_of_data_space" || k.data_used_blocks >= k.data_total_blocks {
                warnings.push(crate::space::out_of_space_hint("data"));
            } else if k.mode != "rw" {
                warnings.push(format!("the pool is in {} mode", k.mode));
            }
            if k.transaction_id != self.rec.transaction_id && !self.foreign_transactions() {
                warnings.push(format!(
                    "kernel transaction id {} differs from the records' {}: an operation was interrupted; any change command recovers it",
                    k.transaction_id, self.rec.transaction_id
                ));
            }
            Some(k)
        } else {
            None
        };
        let host = self.host_space()?;
        warnings.extend(host.warnings(&self.layout.root));
        Ok(PoolStatus {
            backing: self.rec.backing.clone(),
            root: self.layout.root.clone(),
            pool_id: self.rec.pool_id.to_string(),
            active,
            fs: self.rec.fs,
            block_size_bytes: self.rec.block_size.bytes().0,
            data_size_bytes: self.rec.data_size.0,
            metadata_size_bytes: self.rec.metadata_size.0,
            base_size_bytes: self.rec.base_size.0,
            layers,
            transaction_id: self.rec.transaction_id,
            low_water_percent: self.rec.low_water_percent,
            pending: self.rec.pending.clone(),
            spares: self.rec.spares.clone(),
            trash: self.rec.trash.clone(),
            kernel: kernel_status,
            host,
            warnings,
        })
    }
}

/// Makes a filesystem of type `fs` on the thin device at `node`, without
/// discarding (a fresh thin device is all unprovisioned) and, for ext4,
/// with lazy inode tables and journal: unprovisioned blocks read as zeros,
/// so nothing is written that a snapshot would then share for nothing.
///
/// # Errors
/// The mkfs tool's failure.
pub(crate) fn make_filesystem(fs: FsType, node: &Path) -> Result<()> {
    let args: &[&str] = match fs {
        FsType::Ext4 => &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            "-L",
            "thinlayer",
        ],
        FsType::Xfs => &["-q", "-f", "-K", "-L", "thinlayer"],
    };
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.push(node.as_os_str());
    fs.mkfs().run(&all).map(|_| ())
}

/// The thin-pool table parameters for a record and its linear devices.
pub(crate) fn pool_spec(
    rec: &PoolRecord,
    meta: devicemapper::Device,
    data: devicemapper::Device,
) -> PoolSpec {
    let total = rec.data_size.blocks_of(rec.block_size);
    PoolSpec {
        meta,
        data,
        data_sectors: kernel::Sectors(total * rec.block_size.sectors()),
        block_sectors: kernel::Sectors(rec.block_size.sectors()),
        low_water_blocks: total * (100 - u64::from(rec.low_water_percent)) / 100,
        // A full pool fails writes at once instead of queueing them (the
        // anchors' hung containers); the engine then says how to extend.
        features: vec!["error_if_no_space".into()],
    }
}

/// Runs `thin_check` on a metadata file through a read-only loop device
/// (the tools open with `O_DIRECT`, which a tmpfs file refuses).
///
/// # Errors
/// [`Error::MetadataDamaged`] with thin_check's words.
pub fn check_metadata(file: &Path) -> Result<()> {
    let lp = loopback::attach_readonly(file)?;
    check_loop(&lp, file)
}

/// Runs `thin_check` on the metadata behind the loop device `lp`, naming
/// it `file` in the error.
pub(crate) fn check_loop(lp: &loopback::Loop, file: &Path) -> Result<()> {
    match Tool::ThinCheck.run(&["-q".as_ref(), lp.path.as_os_str()]) {
        Ok(_) => Ok(()),
        Err(Error::Tool { stderr, status, .. }) => Err(Error::MetadataDamaged {
            path: file.to_owned(),
            detail: if stderr.is_empty() { status } else { stderr },
        }),
        Err(e) => Err(e),
    }
}

/// `pool status`.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    /// What the data and metadata live on.
    pub backing: Backing,
    /// The root directory.
    pub root: PathBuf,
    /// The pool id in the dm names.
    pub pool_id: String,
    /// Whether the pool's devices are up.
    pub active: bool,
    /// The filesystem of every layer.
    pub fs: FsType,
    /// The copy-on-write unit.
    pub block_size_bytes: u64,
    /// Data capacity.
    pub data_size_bytes: u64,
    /// Metadata capacity.
    pub metadata_size_bytes: u64,
    /// Virtual size of each thin device.
    pub base_size_bytes: u64,
    /// How many layers the records hold.
    pub layers: usize,
    /// Snapshots provisioned ahead of demand.
    pub spares: Vec<Spare>,
    /// Removed layers' thin ids waiting for `pool reclaim`.
    pub trash: Vec<Trashed>,
    /// The records' transaction id.
    pub transaction_id: u64,
    /// Warn at this percent used.
    pub low_water_percent: u8,
    /// An interrupted operation, if any.
    pub pending: Option<Pending>,
    /// What the kernel reports, when active.
    pub kernel: Option<KernelStatus>,
    /// The host filesystem under the root against what the pool may
    /// still write there.
    pub host: crate::space::HostSpace,
    /// Low water, needs_check, read-only, host space...
    pub warnings: Vec<String>,
}

/// The kernel's view of an active pool.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStatus {
    /// The pool metadata's transaction id.
    pub transaction_id: u64,
    /// Data blocks in use.
    pub data_used_blocks: u64,
    /// Data blocks in all.
    pub data_total_blocks: u64,
    /// Metadata blocks (4 KiB) in use.
    pub metadata_used_blocks: u64,
    /// Metadata blocks in all.
    pub metadata_total_blocks: u64,
    /// `rw`, `ro` or `out_of_data_space`.
    pub mode: String,
    /// The metadata's needs_check flag.
    pub needs_check: bool,
    /// Whether discards reach the data file.
    pub discard_passdown: bool,
    /// Whether a full pool fails writes (rather than queueing them).
    pub error_if_no_space: bool,
    /// Thin devices now in the kernel.
    pub active_thin_devices: usize,
}

impl Pool {
    pub(crate) fn teardown_state(&mut self) -> (bool, &mut std::collections::BTreeSet<u32>) {
        (self.deferred_teardown, &mut self.idle)
    }

    /// With `on`, unmounts leave layer devices up and removals put thin ids
    /// in the trash; [`Pool::reclaim`] does that kernel work later. For a
    /// long-lived caller (a daemon) that can reclaim while idle.
    pub fn set_deferred_teardown(&mut self, on: bool) {
        self.deferred_teardown = on;
    }

    pub(crate) fn children_index(&mut self) -> &mut Option<ChildIndex> {
        &mut self.children
    }

    pub(crate) fn record_mut_inner(&mut self) -> &mut PoolRecord {
        &mut self.rec
    }
}
