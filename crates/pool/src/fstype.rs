//! The filesystem on a pool's base device and so in every layer (or a
//! volume's own): its kernel name, mount options and mkfs tool.
//!
//! What must never happen: a snapshot mounted without the options its
//! filesystem needs to share its origin's blocks (`nouuid` for XFS).

use serde::{Deserialize, Serialize};

use crate::{
    cmd::Tool,
    error::{Error, Result},
    units::Bytes,
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

    /// The mkfs options that lay out a new filesystem of this type (on a
    /// pool's base device, a fresh layer, a volume); existing filesystems
    /// keep the layout they were made with and mount with the same
    /// [`FsType::mount_options`].
    ///
    /// ext4: 4 KiB blocks; no discard at mkfs (a fresh thin device is all
    /// unprovisioned); lazy inode tables and journal, which unprovisioned
    /// blocks read back as zeros; `inline_data`: a file or directory small
    /// enough lives inside its inode, so a container's first small files
    /// and directories copy no data or directory block of the image; and
    /// flex groups of 4 (`-G 4`): a flex group's 4 block bitmaps, 4 inode
    /// bitmaps and the first 8 blocks of its first inode table share one
    /// 64 KiB pool block, where with 16 groups each of the three filled a
    /// pool block of its own. A trivial container (three 100-byte files
    /// and a directory) copies 5-7 pool blocks instead of 7-14, by image
    /// (README, Space; `thinlayer bench --layout` measures the
    /// candidates). The journal stays: a container root must survive a
    /// host crash without an fsck.
    pub fn mkfs_layout(self) -> &'static [&'static str] {
        match self {
            FsType::Ext4 => &[
                "-b",
                "4096",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                "-O",
                "inline_data",
                "-G",
                "4",
            ],
            FsType::Xfs => &[],
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
