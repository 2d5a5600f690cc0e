//! thinlayer for Docker: its storage driver and its volume driver.
//!
//! - [`graphdriver`]: a layer store shaped like Docker's graphdriver
//!   interface, over the pool (the engine behind the plugin);
//! - [`plugin`]: the Docker plugin (`thinlayer serve docker`): Docker's
//!   graphdriver and volume plugin protocols on one socket;
//! - [`volume`]: Docker's volume plugin protocol serving thin
//!   volumes (with instant snapshot clones), also served alone;
//! - [`protocol`]: both protocols' requests and answers as moby sends and
//!   reads them;
//! - [`http`]: the bounded HTTP server both run on.
//!
//! (containerd's snapshotter is `crates/snapshotter`.)

pub mod error;
pub mod graphdriver;
pub mod http;
pub mod plugin;
pub mod protocol;
pub mod volume;

pub use error::{Error, Result};
pub use graphdriver::{GraphDriver, ThinDriver};

pub(crate) use thinlayer_pool::timing::ms_since;
