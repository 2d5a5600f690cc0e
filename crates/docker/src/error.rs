//! Errors of the Docker plugins; engine and store errors pass through.

/// The Docker plugins' result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the Docker plugins can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the store (and through it the pool and layer-tar code).
    #[error(transparent)]
    Store(#[from] thinlayer_store::Error),
    /// A request that does not fit the state.
    #[error("{0}")]
    Invalid(String),
}

impl From<thinlayer_pool::Error> for Error {
    fn from(e: thinlayer_pool::Error) -> Error {
        Error::Store(e.into())
    }
}
