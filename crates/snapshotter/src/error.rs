//! The snapshotter's one error type, and the gRPC status each error becomes.
//!
//! containerd maps gRPC codes back to its errdefs: `NotFound` and
//! `AlreadyExists` steer its logic (an unpack skips a layer whose committed
//! snapshot already exists), `FailedPrecondition` says "not in this state"
//! (a parent with children, committing a view), `InvalidArgument` a bad
//! request, `ResourceExhausted` a full pool (or a full filesystem under
//! it): containerd reports it as such rather than as a bug. Everything else
//! is `Internal`, with the engine's sentence.

use std::{io, path::PathBuf};

use nix::errno::Errno;

use containerd_snapshots::tonic::Status;

/// The snapshotter's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the snapshotter can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot under this key.
    #[error("snapshot `{0}` does not exist")]
    NotFound(String),

    /// A snapshot under this key exists already.
    #[error("snapshot `{0}` already exists")]
    AlreadyExists(String),

    /// The snapshot is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),

    /// From the pool engine.
    #[error(transparent)]
    Pool(#[from] thinlayer_pool::Error),

    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, on which path.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// Another snapshotter serves this pool.
    #[error(
        "another `thinlayer serve containerd` serves the pool under {root} (lock {lock}); stop it first"
    )]
    AlreadyServing {
        /// The pool root.
        root: PathBuf,
        /// The snapshotter's lock file.
        lock: PathBuf,
    },

    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        use thinlayer_pool::Error as E;
        let msg = e.to_string();
        match &e {
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::Pool(inner) => {
                let inner = match inner {
                    E::Rollback { error, .. } => error,
                    other => other,
                };
                match inner {
                    E::UnknownLayer(_) => Status::not_found(msg),
                    E::LayerExists(_) => Status::already_exists(msg),
                    E::HasChildren { .. } | E::Mounted { .. } | E::Busy { .. } => {
                        Status::failed_precondition(msg)
                    }
                    E::InvalidName { .. } | E::InvalidArgument(_) | E::InvalidSize { .. } => {
                        Status::invalid_argument(msg)
                    }
                    E::NoSpace { .. } | E::HostNoSpace { .. } => Status::resource_exhausted(msg),
                    E::Io { source, .. } if is_enospc(source) => Status::resource_exhausted(msg),
                    _ => Status::internal(msg),
                }
            }
            Error::Io { source, .. } if is_enospc(source) => Status::resource_exhausted(msg),
            Error::Io { .. } | Error::AlreadyServing { .. } | Error::Transport(_) => {
                Status::internal(msg)
            }
        }
    }
}

fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::ENOSPC as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_snapshots::tonic::Code;

    #[test]
    fn status_codes() {
        let code = |e: Error| Status::from(e).code();
        assert_eq!(code(Error::NotFound("k".into())), Code::NotFound);
        assert_eq!(code(Error::AlreadyExists("k".into())), Code::AlreadyExists);
        assert_eq!(
            code(Error::FailedPrecondition("x".into())),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(Error::InvalidArgument("x".into())),
            Code::InvalidArgument
        );
        use thinlayer_pool::Error as E;
        assert_eq!(
            code(Error::Pool(E::UnknownLayer("l".into()))),
            Code::NotFound
        );
        assert_eq!(
            code(Error::Pool(E::LayerExists("l".into()))),
            Code::AlreadyExists
        );
        assert_eq!(
            code(Error::Pool(E::HasChildren {
                id: "l".into(),
                children: vec!["c".into()]
            })),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(Error::Pool(E::Mounted {
                what: "l".into(),
                mountpoints: vec!["/m".into()],
                hint: "l".into()
            })),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(Error::Pool(E::Rollback {
                error: Box::new(E::LayerExists("l".into())),
                undo: Box::new(E::Inconsistent("x".into())),
            })),
            Code::AlreadyExists
        );
        assert_eq!(
            code(Error::Pool(E::Inconsistent("x".into()))),
            Code::Internal
        );
        assert_eq!(
            code(Error::io("read", io::Error::other("x"))),
            Code::Internal
        );
        // A full pool, or a full filesystem under it: not an internal bug.
        assert_eq!(
            code(Error::Pool(E::NoSpace {
                what: "data".into(),
                detail: "100%".into()
            })),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(Error::Pool(E::Rollback {
                error: Box::new(E::NoSpace {
                    what: "metadata".into(),
                    detail: "x".into()
                }),
                undo: Box::new(E::Inconsistent("x".into())),
            })),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(Error::io("write", io::Error::from_raw_os_error(28))),
            Code::ResourceExhausted
        );
    }
}
