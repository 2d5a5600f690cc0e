//! thinlayer's engine: a device-mapper thin-pool whose data and metadata
//! live in sparse loopback files, a formatted base thin device, and layers
//! that are thin snapshots of their parents (copy-on-write at the pool's
//! block size), with crash-safe records under a root directory.
//!
//! Data path: CLI -> [`Pool`] -> [`kernel`] (ioctls through the
//! `devicemapper` crate) + [`record`] -> result. Kernel step first, record
//! second; a failed record undoes the kernel step; an interrupted pair is
//! settled by [`Pool::recover`] from the pool's transaction id.
//!
//! Never: a dmsetup process, a mocked kernel in a test that claims dm-thin
//! behaviour, a thin id reused.

pub mod blockdev;
pub mod check;
pub mod cmd;
pub mod error;
pub mod fault;
mod frozen;
pub mod holders;
pub mod kernel;
mod layer;
pub mod lock;
pub mod loopback;
pub mod mounts;
pub mod names;
pub mod peek;
pub mod pool;
mod reclaim;
pub mod record;
pub mod socket;
pub mod space;
mod spare;
pub mod units;

pub use error::{Error, Result, exit};
pub use frozen::Frozen;
pub use kernel::PoolMode;
pub use layer::{LayerInfo, Removal};
pub use lock::LockMode;
pub use mounts::MountUse;
pub use pool::{
    Action, Backing, CreateOptions, DevicePair, FsType, LayerRecord, Owner, Pool, PoolRecord,
    PoolStatus, Spare, Trashed,
};
pub use reclaim::Reclaimed;
pub use spare::Provisioned;
pub use units::{BlockSize, Bytes, ThinId};
