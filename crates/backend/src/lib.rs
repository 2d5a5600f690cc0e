//! thinlayer as a storage backend for container engines:
//!
//! - [`graphdriver`]: a layer store shaped like Docker's graphdriver
//!   interface, for library users, over the pool;
//! - [`docker_volume`]: Docker's volume plugin protocol serving thin
//!   volumes (with instant snapshot clones);
//!
//! (containerd's snapshotter is `crates/snapshotter`.)

pub mod docker_volume;
pub mod error;
pub mod graphdriver;
pub mod http;

pub use error::{Error, Result};
pub use graphdriver::{GraphDriver, ThinDriver};
