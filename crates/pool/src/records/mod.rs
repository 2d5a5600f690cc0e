//! The records: what thinlayer keeps on disk about a pool and its layers,
//! as serde structs, each file type tied to its kind by [`Record`].
//!
//! ```text
//! ROOT/pool.rec          PoolRecord (kind `pool`): sizes, ids, transaction id,
//!                        the pending intent, spares, trash
//! ROOT/layers/ID.rec     LayerRecord (kind `layer`), one per layer
//! ```
//!
//! Every file is written through [`file`](mod@file) (temp, fsync, rename, fsync the
//! directory; a CRC over the payload). New fields are `Option` or
//! `#[serde(default)]`, so records an older version wrote still load.
//!
//! What must never happen: a field renamed or a file moved (the format is
//! on disk, and the records of every existing pool must keep loading); a
//! record read under another kind than the one it was written with.

pub mod file;

pub use crate::{fstype::FsType, owner::Owner};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    blockdev::DeviceRef,
    error::Result,
    names::PoolId,
    units::{BlockSize, Bytes},
};

/// A record type stored in a file of its own, and the kind string that
/// file carries (checked on every read).
pub trait Record: Serialize + DeserializeOwned {
    /// The kind written in the record's header.
    const KIND: &'static str;

    /// Reads the record at `path`.
    ///
    /// # Errors
    /// I/O errors (`NotFound` matchable through [`crate::Error::Io`]), damaged or
    /// mis-kinded records.
    fn load(path: &Path) -> Result<Self> {
        file::read(path, Self::KIND)
    }

    /// Writes the record to `path` crash-safely.
    ///
    /// # Errors
    /// I/O errors.
    fn save(&self, path: &Path) -> Result<()> {
        file::write(path, Self::KIND, self)
    }

    /// Reads the record at `path`, or the default value when there is none.
    ///
    /// # Errors
    /// I/O errors other than a missing file, damaged or mis-kinded records.
    fn load_or_default(path: &Path) -> Result<Self>
    where
        Self: Default,
    {
        match Self::load(path) {
            Err(crate::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Self::default())
            }
            other => other,
        }
    }
}

impl Record for PoolRecord {
    const KIND: &'static str = "pool";
}

impl Record for LayerRecord {
    const KIND: &'static str = "layer";
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
    /// (`layer rm --later`): [`crate::Pool::reclaim`] discards and deletes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trash: Vec<Trashed>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Bumped by every operation that adds or removes a layer record, so
    /// a process may keep its parent -> children index from one handle to
    /// the next while no other process changed the layers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub layers_gen: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// [`crate::Pool::reclaim`] of trashed thin ids, already off the trash list.
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
    /// Kept with its filesystem mounted at `ROOT/spares/THIN_ID`
    /// (`layer provision --mounted`), so taking it costs a move mount.
    /// What the flag asks for, not what is: mountinfo says whether the
    /// mount is there (a pool deactivate unmounts it; the next provision
    /// mounts it again). Records from before mounted spares load `false`.
    #[serde(default)]
    pub mounted: bool,
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
    /// `ROOT/layers/THIN_ID.taken`: the second name of the record of the
    /// layer that took spare `thin_id`, until the pool record no longer
    /// lists the spare (see `pool::txn`).
    pub fn taken_marker(&self, thin_id: u32) -> PathBuf {
        self.layers_dir().join(format!("{thin_id}.taken"))
    }
    /// `ROOT/spares`: the mounts of mounted spares (a private tmpfs,
    /// 0700, root's; see `pool::spare`).
    pub fn spares_dir(&self) -> PathBuf {
        self.root.join("spares")
    }
    /// `ROOT/spares/THIN_ID`: where spare `thin_id` is mounted.
    pub fn spare_mount(&self, thin_id: u32) -> PathBuf {
        self.spares_dir().join(thin_id.to_string())
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
