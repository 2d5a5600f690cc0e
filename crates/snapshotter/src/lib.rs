//! containerd snapshotter over thinlayer's dm-thin pool: containerd's
//! snapshots gRPC service (a proxy plugin) on a Unix socket.
//!
//! containerd keys map to thinlayer layers through a key store of our own
//! under `ROOT/snapshotter/` ([`store`]). An active or view snapshot is a
//! new thin snapshot of its parent's layer (or of the base device); a
//! commit renames the key and leaves the layer immutable (no copy); Mounts
//! returns a bind mount of the layer's filesystem, which the snapshotter
//! mounts itself at a holder directory only root traverses, or (with
//! `--mounts device` or the label `thinlayer.io/mounts=device`) the thin
//! device node (`/dev/dm-N`, activated, not mounted) for containerd or a
//! VM runtime to mount. What an answer does not need (a committed
//! snapshot's teardown, a removed one's unmount and removal, spares,
//! reclaim) runs after it, on the server's worker ([`jobs`], [`spares`]).
//!
//! Data path: containerd -> gRPC ([`server`]) -> one request at a time
//! ([`ops::SnapshotOps`] under a mutex, on a blocking thread) -> the pool
//! engine (`thinlayer_pool::Pool`, opened per request under the root's
//! flock) + the key store. Reads (Stat, List, and Usage and Mounts of a
//! snapshot whose device is up) skip the queue and the lock ([`reads`]).
//! Every connection reaches gRPC through [`authority::FixAuthority`], so a
//! client sending its socket path as `:authority` is answered, not reset.

pub mod authority;
pub mod error;
pub mod filter;
pub mod jobs;
pub mod keys;
pub mod ops;
pub mod reads;
pub mod server;
pub mod spares;

pub use error::{Error, Result};
pub use ops::{Config, MountMode};
pub use server::{DEFAULT_SOCKET, Thinlayer, serve};
