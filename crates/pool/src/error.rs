//! One error type for the engine. Every variant a user can cause carries a
//! sentence saying what to do; the binary maps each variant to a documented
//! exit code. Kernel errors keep their errno matchable.

use std::{io, path::PathBuf};

/// The engine's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller is not root.
    #[error(
        "thinlayer must run as root to manage device-mapper and loop devices; run it with sudo"
    )]
    NotRoot,

    /// The kernel has no device-mapper at all.
    #[error(
        "this kernel has no device-mapper ({detail}); load it with `modprobe dm-thin-pool`, \
         or on a host without it run thinlayer inside the project's VM: `tools/vm/run thinlayer ...`"
    )]
    NoDeviceMapper {
        /// What was tried and how it failed.
        detail: String,
    },

    /// device-mapper is there, the thin-pool target is not.
    #[error(
        "this kernel's device-mapper has no thin-pool target; load it with `modprobe dm-thin-pool`, \
         or run thinlayer inside the project's VM: `tools/vm/run thinlayer ...`"
    )]
    NoThinPool,

    /// A program thinlayer runs is not installed.
    #[error("`{tool}` is not installed or not on PATH; install {package} (tools/setup does)")]
    ToolMissing {
        /// The program.
        tool: String,
        /// The Debian package that has it.
        package: String,
    },

    /// A program thinlayer ran failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of what it printed.
        stderr: String,
    },

    /// A size flag is malformed or out of range.
    #[error("bad size `{input}`: {reason}")]
    InvalidSize {
        /// What the user gave.
        input: String,
        /// The rule it broke.
        reason: String,
    },

    /// A name or id is malformed.
    #[error("bad name `{name}`: {reason}")]
    InvalidName {
        /// What the user gave.
        name: String,
        /// The rule it broke.
        reason: String,
    },

    /// Any other bad argument.
    #[error("{0}")]
    InvalidArgument(String),

    /// `pool create` on a root that already has a pool.
    #[error(
        "a pool already exists under {root}; use it, or remove it first with `thinlayer --root {root} pool destroy`"
    )]
    PoolExists {
        /// The root directory.
        root: PathBuf,
    },

    /// No pool under the root.
    #[error("no pool under {root}; create one with `thinlayer --root {root} pool create`")]
    NoPool {
        /// The root directory.
        root: PathBuf,
    },

    /// The pool exists but its devices are not active.
    #[error(
        "the pool under {root} is not active; bring it up with `thinlayer --root {root} pool activate`"
    )]
    PoolInactive {
        /// The root directory.
        root: PathBuf,
    },

    /// A layer id is taken.
    #[error(
        "layer `{0}` already exists; pick another id or remove it with `thinlayer layer rm {0}`"
    )]
    LayerExists(String),

    /// No such layer.
    #[error("no layer `{0}`; `thinlayer layer ls` lists them")]
    UnknownLayer(String),

    /// The layer belongs to another owner than the one asking.
    #[error(
        "layer `{id}` belongs to the {owner} and is not the {asker}'s to {action}; use `{hint}` instead"
    )]
    NotOwner {
        /// The layer.
        id: String,
        /// Its recorded owner's name.
        owner: &'static str,
        /// Who asked.
        asker: &'static str,
        /// What was asked (reuse, remove, mount, …).
        action: &'static str,
        /// The owner's own command.
        hint: &'static str,
    },

    /// The layer has children.
    #[error("layer `{id}` has children ({}); remove them first", .children.join(", "))]
    HasChildren {
        /// The layer.
        id: String,
        /// Its children's ids.
        children: Vec<String>,
    },

    /// `pool destroy` without `--force` of a pool that still holds layers.
    #[error(
        "the pool under {} still holds {} layer(s): {}; remove them or pass --force",
        .root.display(), .layers.len(), .layers.join(", ")
    )]
    PoolHasLayers {
        /// The pool's root.
        root: PathBuf,
        /// The layers' ids.
        layers: Vec<String>,
    },

    /// The layer (or pool) is mounted.
    #[error(
        "{what} is mounted at {}; unmount it first with `thinlayer umount {hint}`",
        display_paths(.mountpoints)
    )]
    Mounted {
        /// What is mounted.
        what: String,
        /// Where.
        mountpoints: Vec<PathBuf>,
        /// What to pass to `thinlayer umount`.
        hint: String,
    },

    /// A device is open or in use by someone.
    #[error("{what} is busy: {detail}")]
    Busy {
        /// The device.
        what: String,
        /// Who holds it, as far as can be told, and what to do.
        detail: String,
    },

    /// Another thinlayer process holds the root's lock.
    #[error(
        "another thinlayer command is working on {root} (lock {lock}); wait for it, or pass --wait to queue"
    )]
    Locked {
        /// The root.
        root: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },

    /// The root directory belongs to another user, who could swap the
    /// pool's files under a root-run thinlayer.
    #[error(
        "{root} belongs to uid {uid}, not to the user thinlayer runs as: that user could read or replace the pool's files; \
         give it to root with `{fix}` (and check who else could write there), or pick another --root"
    )]
    RootOwner {
        /// The root directory.
        root: PathBuf,
        /// Its owner.
        uid: u32,
        /// The command that fixes it.
        fix: String,
    },

    /// The filesystem holding the root has too little free space for
    /// what was asked; nothing was changed.
    #[error(
        "the filesystem holding {root} has {} free, and {what} needs at least {} plus {} kept free for the pool's records; \
         nothing was changed; free space on that filesystem, or move the root to a larger one",
        crate::Bytes(*free),
        crate::Bytes(*needed),
        crate::Bytes(*reserve)
    )]
    HostNoSpace {
        /// The root directory.
        root: PathBuf,
        /// What needs the space.
        what: String,
        /// Bytes needed (a lower bound), reserve not included.
        needed: u64,
        /// The reserve kept free for records and metadata.
        reserve: u64,
        /// Bytes free (available to writers) on the filesystem.
        free: u64,
    },

    /// The pool is out of data or metadata space.
    #[error(
        "the pool is out of {what} space ({detail}); grow it with `thinlayer pool extend --{what}-size +SIZE`, or remove layers"
    )]
    NoSpace {
        /// `data` or `metadata`.
        what: String,
        /// Used/total figures.
        detail: String,
    },

    /// A record failed to load: checksum, version or parse.
    #[error("record {path} is damaged: {reason}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// `thin_check` found the pool metadata damaged.
    #[error(
        "the pool metadata {path} failed thin_check: {detail}; repair it with `thinlayer pool repair` (the damaged copy is kept)"
    )]
    MetadataDamaged {
        /// The metadata file.
        path: PathBuf,
        /// thin_check's words.
        detail: String,
    },

    /// A `pool create` was interrupted (a crash): its record is only an intent.
    #[error(
        "the pool under {root} was never finished: a crash interrupted `pool create`; \
         run `thinlayer --root {root} pool create ...` again (it clears the leftovers first), \
         or `thinlayer --root {root} pool recover` to clear them"
    )]
    InterruptedCreate {
        /// The root directory.
        root: PathBuf,
    },

    /// `thin_repair` could not rebuild the metadata.
    #[error(
        "thin_repair could not rebuild the pool metadata {path} ({detail}); nothing was changed; \
         restore the metadata file from a backup, or keep the layers' data with `thin_dump --repair`"
    )]
    RepairFailed {
        /// The metadata file, untouched.
        path: PathBuf,
        /// What thin_repair said.
        detail: String,
    },

    /// A device `pool create` was given is in use.
    #[error("{device} is in use: {detail}")]
    DeviceInUse {
        /// The device as given.
        device: PathBuf,
        /// Who uses it and what to do.
        detail: String,
    },

    /// A live dm device has thinlayer's name but not the table thinlayer
    /// would load: it is not adopted, and left as it is.
    #[error(
        "the live dm device {name} has another table than thinlayer would load \
         (found `{found}`, expected `{expected}`), so it is not used; it is stale \
         or someone else's: if nothing uses it, remove it with `dmsetup remove {name}` and retry"
    )]
    WrongTable {
        /// The dm name.
        name: String,
        /// Its live table.
        found: String,
        /// The table thinlayer would load.
        expected: String,
    },

    /// A device `pool create` was given holds data (a signature).
    #[error("{device} holds {what}; {hint}")]
    DeviceHasData {
        /// The device as given.
        device: PathBuf,
        /// What it holds.
        what: String,
        /// What to do.
        hint: String,
    },

    /// A pool device is not attached (or its label is gone).
    #[error(
        "no block device carries the label of this pool's {role} device, recorded as {device}; \
         attach that disk (or activate its volume group: `vgchange -ay`) and retry"
    )]
    DeviceMissing {
        /// `data` or `metadata`.
        role: String,
        /// The recorded identity, in words.
        device: String,
    },

    /// The pool belongs to someone else (adopted): the verb is theirs.
    #[error("{what}: the pool {pool} was adopted and belongs to its owner; {hint}")]
    Foreign {
        /// What was refused.
        what: String,
        /// The adopted pool's dm name.
        pool: String,
        /// What to do instead.
        hint: String,
    },

    /// `pool check` found problems; the report lists them.
    #[error(
        "pool check found {count} problem(s), listed in its report; \
         `thinlayer pool recover` settles interrupted operations, each finding says what else to do"
    )]
    CheckFailed {
        /// How many findings.
        count: usize,
    },

    /// The records and the kernel disagree in a way the engine will not guess about.
    #[error("records and kernel disagree: {0}")]
    Inconsistent(String),

    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, on which path.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// A device-mapper call failed.
    #[error("device-mapper: {context}: {source}")]
    Dm {
        /// What was being done.
        context: String,
        /// The crate's error.
        #[source]
        source: devicemapper::DmError,
    },

    /// A step failed and undoing it failed too: both are reported.
    #[error("{error}; undoing it also failed: {undo}")]
    Rollback {
        /// The first error.
        error: Box<Error>,
        /// The undo's error.
        undo: Box<Error>,
    },
}

impl Error {
    /// The errno of a failed device-mapper ioctl, if that is what this is.
    pub fn dm_errno(&self) -> Option<nix::errno::Errno> {
        match self {
            Error::Dm {
                source: devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, e)),
                ..
            } => Some(**e),
            _ => None,
        }
    }
}

/// `a, b, c` for a list of paths.
fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Adds context to an `io::Result`.
pub trait IoContext<T> {
    /// Wraps the error with `context()`'s text.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

/// Adds context to a `DmResult`.
pub trait DmContext<T> {
    /// Wraps the error with `context()`'s text.
    fn dm_ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DmContext<T> for devicemapper::DmResult<T> {
    fn dm_ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Dm {
            context: context(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_errors_say_how_to_get_dm() {
        let e = Error::NoDeviceMapper {
            detail: "no /dev/mapper/control".into(),
        };
        assert!(e.to_string().contains("tools/vm/run"));
        assert!(
            Error::NoThinPool
                .to_string()
                .contains("modprobe dm-thin-pool")
        );
    }
}
