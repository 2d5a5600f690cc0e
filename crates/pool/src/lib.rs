//! thinlayer's engine: a device-mapper thin-pool whose data and metadata
//! live in sparse loopback files, a formatted base thin device, and layers
//! that are thin snapshots of their parents (copy-on-write at the pool's
//! block size), with crash-safe records under a root directory.
//!
//! Data path: CLI -> [`Pool`] -> [`kernel`] (ioctls through the
//! `devicemapper` crate) + [`records`] -> result. Kernel step first, record
//! second; a failed record undoes the kernel step; an interrupted pair is
//! settled by [`Pool::recover`] from the intent in the pool record. The
//! whole protocol, and what recovery does after a crash at each point, is
//! in [`pool::txn`].
//!
//! Never: a dmsetup process, a mocked kernel in a test that claims dm-thin
//! behaviour, a thin id reused.

mod action;
pub mod blockdev;
pub mod check;
pub mod cmd;
pub mod error;
pub mod fault;
mod fstype;
pub mod holders;
pub mod kernel;
pub mod load;
pub mod lock;
pub mod loopback;
pub mod mountinfo;
pub mod mounts;
pub mod names;
mod owner;
pub mod peek;
pub mod pool;
pub mod records;
pub mod socket;
pub mod space;
pub mod timing;
pub mod units;

pub use action::Action;
pub use error::{Error, Result};
pub use lock::LockMode;
pub use mounts::MountUse;
pub use pool::watch::{WatchEnd, WatchOptions, watch};
pub use pool::{
    CreateOptions, DevicePair, Frozen, Holders, KernelStatus, LayerInfo, Pool, PoolMode,
    PoolStatus, Provisioned, Reclaimed, Removal, SpareCost, SpareInfo, SpareMount, Teardown, Trim,
};
pub use records::{
    Backing, FsType, LayerRecord, Layout, Owner, Pending, PoolRecord, Record, Spare, Trashed,
    file as record,
};
pub use units::{BlockSize, Bytes, ThinId};
