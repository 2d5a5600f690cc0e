//! Errors of the image and container store. Pool and layer-format errors
//! pass through with their own sentences and exit codes.

use std::path::PathBuf;

/// The store's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the pool engine.
    #[error(transparent)]
    Pool(#[from] thinlayer_pool::Error),

    /// From the layer tar code (apply, diff, export).
    #[error(transparent)]
    Image(#[from] thinlayer_image::Error),

    /// An image archive or layout that cannot be read.
    #[error("{path}: {reason}")]
    Format {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// No such image.
    #[error("no image `{0}`; `thinlayer image ls` lists them")]
    UnknownImage(String),

    /// An image name is taken.
    #[error(
        "an image named `{0}` exists; pick another --name or remove it with `thinlayer image rm {0}`"
    )]
    ImageExists(String),

    /// No such container.
    #[error("no container `{0}`; `thinlayer container ls` lists them")]
    UnknownContainer(String),

    /// A container name is taken.
    #[error(
        "a container named `{0}` exists; pick another name or remove it with `thinlayer container rm {0}`"
    )]
    ContainerExists(String),

    /// Something still uses the thing to remove.
    #[error("{what} is used by {users}; remove them first")]
    InUse {
        /// The thing.
        what: String,
        /// Its users.
        users: String,
    },

    /// The pool ran out of data space while a layer was written.
    #[error(
        "the pool is out of data space: this layer needs at least {} and the pool had {} free; \
         nothing was kept; grow the pool with `thinlayer pool extend --data-size +SIZE` and try again",
        thinlayer_pool::Bytes(*needed),
        thinlayer_pool::Bytes(*free)
    )]
    PoolFull {
        /// Bytes the layer needs (a lower bound).
        needed: u64,
        /// Bytes the pool had free before.
        free: u64,
    },

    /// An I/O error outside the pool, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },

    /// An operation a crash interrupted could not be settled at open.
    #[error(
        "an interrupted {what} could not be settled: {error}; fix that, then run any image, \
         container or volume command again (each settles it first)"
    )]
    Unsettled {
        /// The interrupted operation.
        what: String,
        /// What stopped it.
        error: Box<Error>,
    },

    /// A step failed and its rollback failed too.
    #[error("{error}; rolling back also failed: {undo}")]
    Rollback {
        /// The first error.
        error: Box<Error>,
        /// The rollback's error.
        undo: Box<Error>,
    },
}

/// Adds context to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
