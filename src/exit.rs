//! Exit codes: the one place that turns the error a verb returned into
//! the code the process exits with. The table (README.md, `--help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the operation failed: a kernel, tool or I/O error |
//! | 2 | bad usage or input: flags, sizes, names |
//! | 3 | no such pool, layer, image, container, volume or snapshot |
//! | 4 | conflict: already exists, has children, mounted, busy, locked by another command |
//! | 5 | the host cannot: not root, no device-mapper, no dm-thin target, a tool missing |
//! | 6 | out of space |
//! | 7 | damaged records or pool metadata |
//!
//! [`code`] walks the error's chain (the contexts the binary added, then
//! the library's error and its sources) and takes the class of the first
//! typed error it knows. The libraries know nothing of exit codes; what
//! must never happen is an error converted into another crate's type on
//! its way here, which would lose its class.

use std::io;

use nix::errno::Errno;

/// Success.
pub const OK: u8 = 0;
/// The operation failed: a kernel, tool or I/O error.
pub const FAILED: u8 = 1;
/// Bad usage or input: flags, sizes, names.
pub const USAGE: u8 = 2;
/// No such pool, layer, image, container or snapshot.
pub const NOT_FOUND: u8 = 3;
/// Conflict: exists already, has children, mounted, busy, locked.
pub const CONFLICT: u8 = 4;
/// The host cannot do it: not root, no device-mapper, no dm-thin, no tool.
pub const ENVIRONMENT: u8 = 5;
/// The pool (or the filesystem under it) is out of space.
pub const NO_SPACE: u8 = 6;
/// The records or the pool metadata are damaged.
pub const DAMAGED: u8 = 7;

/// The exit code for `err`: the class of the first error in its chain
/// that one of the crates' types (or `io`, or clap) names; [`FAILED`] if
/// none does.
pub fn code(err: &anyhow::Error) -> u8 {
    err.chain().find_map(class).unwrap_or(FAILED)
}

/// The class of one link of an error chain, if its type is known.
fn class(e: &(dyn std::error::Error + 'static)) -> Option<u8> {
    if let Some(e) = e.downcast_ref::<thinlayer_pool::Error>() {
        return Some(pool(e));
    }
    if let Some(e) = e.downcast_ref::<thinlayer_store::Error>() {
        return Some(store(e));
    }
    if let Some(e) = e.downcast_ref::<thinlayer_image::Error>() {
        return Some(image(e));
    }
    if let Some(e) = e.downcast_ref::<thinlayer_docker::Error>() {
        return Some(match e {
            thinlayer_docker::Error::Store(e) => store(e),
            thinlayer_docker::Error::Invalid(_) => CONFLICT,
        });
    }
    if let Some(e) = e.downcast_ref::<thinlayer_snapshotter::Error>() {
        return Some(snapshotter(e));
    }
    if e.is::<crate::commands::BenchMissing>() {
        return Some(ENVIRONMENT);
    }
    if let Some(e) = e.downcast_ref::<clap::Error>() {
        return Some(if e.use_stderr() { USAGE } else { OK });
    }
    e.downcast_ref::<io::Error>().map(io)
}

fn io(e: &io::Error) -> u8 {
    if e.raw_os_error() == Some(Errno::ENOSPC as i32) {
        NO_SPACE
    } else {
        FAILED
    }
}

fn pool(e: &thinlayer_pool::Error) -> u8 {
    use thinlayer_pool::Error as E;
    match e {
        E::NotRoot
        | E::NoDeviceMapper { .. }
        | E::NoThinPool
        | E::ToolMissing { .. }
        | E::RootOwner { .. } => ENVIRONMENT,
        E::InvalidSize { .. } | E::InvalidName { .. } | E::InvalidArgument(..) => USAGE,
        E::NoPool { .. } | E::UnknownLayer(..) | E::DeviceMissing { .. } => NOT_FOUND,
        E::PoolExists { .. }
        | E::PoolInactive { .. }
        | E::LayerExists(..)
        | E::NotOwner { .. }
        | E::HasChildren { .. }
        | E::PoolHasLayers { .. }
        | E::Mounted { .. }
        | E::Busy { .. }
        | E::DeviceInUse { .. }
        | E::DeviceHasData { .. }
        | E::WrongTable { .. }
        | E::Foreign { .. }
        | E::Locked { .. } => CONFLICT,
        E::NoSpace { .. } | E::HostNoSpace { .. } => NO_SPACE,
        E::Record { .. }
        | E::MetadataDamaged { .. }
        | E::Inconsistent(..)
        | E::InterruptedCreate { .. }
        | E::RepairFailed { .. }
        | E::CheckFailed { .. } => DAMAGED,
        E::Io { source, .. } => io(source),
        E::Rollback { error, .. } => pool(error),
        E::Tool { .. } | E::Dm { .. } => FAILED,
    }
}

fn image(e: &thinlayer_image::Error) -> u8 {
    match e {
        thinlayer_image::Error::NoSpace { .. } => NO_SPACE,
        thinlayer_image::Error::Io { .. } => FAILED,
        // A hostile, damaged or mismatched layer is bad input.
        _ => USAGE,
    }
}

fn store(e: &thinlayer_store::Error) -> u8 {
    use thinlayer_store::Error as E;
    match e {
        E::Pool(e) => pool(e),
        E::Image(e) => image(e),
        E::PoolFull { .. } => NO_SPACE,
        E::Format { .. } => USAGE,
        E::UnknownImage(..) | E::UnknownContainer(..) => NOT_FOUND,
        E::ImageExists(..) | E::ContainerExists(..) | E::InUse { .. } => CONFLICT,
        E::Io { .. } => FAILED,
        E::Rollback { error, .. } | E::Unsettled { error, .. } => store(error),
    }
}

fn snapshotter(e: &thinlayer_snapshotter::Error) -> u8 {
    use thinlayer_snapshotter::Error as E;
    match e {
        E::NotFound(..) => NOT_FOUND,
        E::AlreadyExists(..) | E::FailedPrecondition(..) | E::AlreadyServing { .. } => CONFLICT,
        E::InvalidArgument(..) => USAGE,
        E::Pool(e) => pool(e),
        E::Io { source, .. } => io(source),
        E::Transport(..) => FAILED,
    }
}

/// The sentence printed for `err`: the contexts the binary added, then the
/// first typed error's own sentence (which already names its causes, so
/// the chain stops there).
pub fn message(err: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for e in err.chain() {
        parts.push(e.to_string());
        if class(e).is_some() {
            break;
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn of(e: impl std::error::Error + Send + Sync + 'static) -> u8 {
        code(&anyhow::Error::new(e))
    }

    #[test]
    fn every_class_of_every_crate() {
        use thinlayer_pool::Error as P;
        use thinlayer_snapshotter::Error as S;
        use thinlayer_store::Error as St;
        assert_eq!(of(P::InvalidArgument("x".into())), USAGE);
        assert_eq!(of(P::UnknownLayer("x".into())), NOT_FOUND);
        assert_eq!(of(P::LayerExists("x".into())), CONFLICT);
        assert_eq!(of(P::NotRoot), ENVIRONMENT);
        assert_eq!(of(P::NoThinPool), ENVIRONMENT);
        let no_space = || P::NoSpace {
            what: "data".into(),
            detail: String::new(),
        };
        assert_eq!(of(no_space()), NO_SPACE);
        assert_eq!(of(P::Inconsistent("x".into())), DAMAGED);
        assert_eq!(of(P::CheckFailed { count: 1 }), DAMAGED);
        let enospc = || io::Error::from_raw_os_error(Errno::ENOSPC as i32);
        assert_eq!(
            of(P::Io {
                context: "write".into(),
                source: enospc()
            }),
            NO_SPACE
        );
        assert_eq!(
            of(P::Io {
                context: "read".into(),
                source: io::Error::other("x")
            }),
            FAILED
        );
        assert_eq!(
            of(P::Rollback {
                error: Box::new(no_space()),
                undo: Box::new(P::Inconsistent("x".into())),
            }),
            NO_SPACE
        );
        // The store: its own classes, and the pool's through it.
        assert_eq!(of(St::UnknownImage("i".into())), NOT_FOUND);
        assert_eq!(of(St::ContainerExists("c".into())), CONFLICT);
        assert_eq!(of(St::PoolFull { needed: 2, free: 1 }), NO_SPACE);
        assert_eq!(of(St::Pool(P::NotRoot)), ENVIRONMENT);
        assert_eq!(
            of(St::Unsettled {
                what: "import".into(),
                error: Box::new(St::Pool(P::Inconsistent("x".into()))),
            }),
            DAMAGED
        );
        // The Docker plugin.
        assert_eq!(of(thinlayer_docker::Error::Invalid("x".into())), CONFLICT);
        assert_eq!(
            of(thinlayer_docker::Error::Store(St::Pool(P::NoPool {
                root: "/r".into()
            }))),
            NOT_FOUND
        );
        // The snapshotter: an unknown snapshot is "no such", a taken
        // socket or pool a conflict (neither is bad usage).
        assert_eq!(of(S::NotFound("k".into())), NOT_FOUND);
        assert_eq!(of(S::AlreadyExists("k".into())), CONFLICT);
        assert_eq!(
            of(S::AlreadyServing {
                root: "/r".into(),
                lock: "/r/l".into()
            }),
            CONFLICT
        );
        assert_eq!(
            of(S::Pool(P::Busy {
                what: "socket".into(),
                detail: "live".into()
            })),
            CONFLICT
        );
        assert_eq!(of(S::InvalidArgument("x".into())), USAGE);
        assert_eq!(of(S::io("write", enospc())), NO_SPACE);
        // The binary's own and the others.
        assert_eq!(of(crate::commands::BenchMissing::for_test()), ENVIRONMENT);
        assert_eq!(of(io::Error::other("x")), FAILED);
        assert_eq!(code(&anyhow::anyhow!("untyped")), FAILED);
    }

    #[test]
    fn the_first_typed_error_in_the_chain_decides_and_speaks() {
        let r: Result<(), _> = Err(thinlayer_snapshotter::Error::NotFound("k".into()));
        let e = r.context("serve containerd").unwrap_err();
        assert_eq!(code(&e), NOT_FOUND);
        assert_eq!(message(&e), "serve containerd: snapshot `k` does not exist");
        // Without context the message is the error's own sentence, and
        // its sources (already in that sentence) are not repeated.
        let e = anyhow::Error::new(thinlayer_pool::Error::Io {
            context: "read x".into(),
            source: io::Error::other("boom"),
        });
        assert_eq!(message(&e), "read x: boom");
    }

    #[test]
    fn clap_errors_are_usage_and_help_is_success() {
        use clap::Parser;
        let e = crate::cli::Cli::try_parse_from(["thinlayer", "--bogus"]).unwrap_err();
        assert_eq!(code(&e.into()), USAGE);
        let e = crate::cli::Cli::try_parse_from(["thinlayer", "--help"]).unwrap_err();
        assert_eq!(code(&e.into()), OK);
    }
}
