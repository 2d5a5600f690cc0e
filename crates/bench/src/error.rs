//! The benchmark's one error type.

/// What can go wrong in a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine failed (pool create, layer, mount...).
    #[error(transparent)]
    Pool(#[from] thinlayer_pool::Error),

    /// The image store failed (import).
    #[error(transparent)]
    Store(#[from] thinlayer_store::Error),

    /// Applying a layer tar (overlay import) failed.
    #[error(transparent)]
    Image(#[from] thinlayer_image::Error),

    /// A device-mapper ioctl of the raw floor failed.
    #[error("{context}: {source}")]
    Dm {
        /// What was being done.
        context: String,
        /// The crate's error.
        #[source]
        source: devicemapper::DmError,
    },

    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error (errno kept).
        #[source]
        source: std::io::Error,
    },

    /// A tool (mkfs, modprobe) failed or is missing.
    #[error("`{command}` failed: {detail}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status and stderr, or why it could not start.
        detail: String,
    },

    /// A kernel file (`/proc/...`) did not read as expected.
    #[error("unexpected kernel figures: {0}")]
    Parse(String),

    /// Drawing a plot failed.
    #[error("plot {file}: {detail}")]
    Plot {
        /// The PNG being drawn.
        file: String,
        /// What plotters said.
        detail: String,
    },
}

/// The benchmark's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

/// Adds context to device-mapper results.
pub(crate) trait DmContext<T> {
    fn dm(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DmContext<T> for devicemapper::DmResult<T> {
    fn dm(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Dm {
            context: what(),
            source,
        })
    }
}
