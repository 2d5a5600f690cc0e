//! Thin volumes: data volumes that are thin devices with a filesystem of
//! their own, outliving the containers that use them. A volume can be an
//! instant snapshot clone of another (`--from`), sharing its blocks.
//!
//! A container mounts volumes inside its root filesystem; several
//! containers may share one (the same block device mounted at several
//! places shares one filesystem instance). The mount path inside a root
//! filesystem is opened component by component relative to its parent's fd,
//! following no symlink, and the volume is mounted onto the opened
//! directory itself (`/proc/self/fd/N`): a symlink there (an image could
//! plant `/data -> /etc`, a running container could swap one in at any
//! moment) would otherwise redirect the mount onto the host, so it is
//! refused, and nothing can move the target after it was opened.

use std::{
    ffi::OsStr,
    os::fd::{BorrowedFd, OwnedFd},
    path::{Component, Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{self, OFlag},
    mount::{self, MsFlags},
    sys::stat::{self, Mode},
};
use serde::{Deserialize, Serialize};
use thinlayer_pool::{Bytes, FsType, MountUse, Record, names, record};

use crate::{Error, Result, Store, error::IoContext, now_unix};

/// Where a volume's content lives on its filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// The filesystem's root, `lost+found` and all: volumes made before
    /// `data/` was (they keep working as they were).
    #[default]
    Root,
    /// [`DATA_DIR`] at the filesystem's root, made with the filesystem:
    /// what a container (and Docker, through the plugin) sees is an empty
    /// directory, so Docker copies the image's content into a new volume
    /// as it does into its own. `lost+found` stays where e2fsck wants it.
    DataDir,
}

/// The directory holding a [`Layout::DataDir`] volume's content.
pub const DATA_DIR: &str = "data";

impl Layout {
    /// The content's directory below the filesystem root mounted at `root`.
    pub fn content(self, root: &Path) -> PathBuf {
        match self {
            Layout::Root => root.to_path_buf(),
            Layout::DataDir => root.join(DATA_DIR),
        }
    }
}

/// A volume record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Its name.
    pub name: String,
    /// The pool layer holding it.
    pub layer: String,
    /// Its size.
    pub size: Bytes,
    /// Its filesystem.
    pub fs: FsType,
    /// The volume it was cloned from, if any.
    #[serde(default)]
    pub from: Option<String>,
    /// Where its content lives on its filesystem.
    #[serde(default)]
    pub layout: Layout,
    /// The container it was made for (an anonymous volume), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_for: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

impl Record for VolumeRecord {
    const KIND: &'static str = "volume";
}

pub use crate::records::{BindMount, VolumeMount};

/// One `container create --volume` spec, Docker's `-v` forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountSpec {
    /// `NAME:/path[:ro]`: a named volume.
    Named {
        /// The volume.
        name: String,
        /// Where inside.
        path: PathBuf,
        /// `:ro`.
        readonly: bool,
    },
    /// `/path[:ro]`: a volume made for this container, filled with the
    /// image's content at `path`.
    Anonymous {
        /// Where inside.
        path: PathBuf,
        /// `:ro`.
        readonly: bool,
    },
    /// `/host/path:/path[:ro]`: a host directory or file.
    Bind {
        /// The host path.
        source: PathBuf,
        /// Where inside.
        path: PathBuf,
        /// `:ro`.
        readonly: bool,
    },
}

fn usage(spec: &str, why: &str) -> Error {
    thinlayer_pool::Error::InvalidArgument(format!(
        "bad volume spec `{spec}`: {why}; use NAME:/path (a named volume), /path (an anonymous \
         one) or /host/path:/path (a bind mount), each with an optional :ro"
    ))
    .into()
}

/// `path` as a mount target inside a container: absolute, not `/`, no
/// `..`; returned without `.` components or a trailing `/`.
///
/// # Errors
/// A sentence naming `what` and the rule.
pub fn container_path(what: &str, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(thinlayer_pool::Error::InvalidArgument(format!(
            "{what}: `{path}` is not an absolute path without `..`; mount targets are \
             absolute paths inside the container, such as /var/lib/data"
        ))
        .into());
    }
    let clean: PathBuf = p.components().collect();
    if clean == Path::new("/") {
        return Err(thinlayer_pool::Error::InvalidArgument(format!(
            "{what}: nothing can be mounted over the container's root `/`; pick a directory in it"
        ))
        .into());
    }
    Ok(clean)
}

fn mode(spec: &str, m: &str) -> Result<bool> {
    match m {
        "ro" => Ok(true),
        "rw" => Ok(false),
        other => Err(usage(spec, &format!("unknown mode `{other}` (ro or rw)"))),
    }
}

impl MountSpec {
    /// Parses `NAME:/path[:ro]`, `/path[:ro]` or `/host/path:/path[:ro]`.
    ///
    /// # Errors
    /// A usage error saying which forms there are.
    pub fn parse(spec: &str) -> Result<MountSpec> {
        let parts: Vec<&str> = spec.split(':').collect();
        let target = |p: &str| container_path(&format!("volume spec `{spec}`"), p);
        let (source, path, readonly) = match parts[..] {
            [path] => (None, path, false),
            [path, m @ ("ro" | "rw")] if path.starts_with('/') => (None, path, mode(spec, m)?),
            [source, path] => (Some(source), path, false),
            [source, path, m] => (Some(source), path, mode(spec, m)?),
            _ => return Err(usage(spec, "too many `:`")),
        };
        let path = target(path)?;
        Ok(match source {
            None => MountSpec::Anonymous { path, readonly },
            Some(src) if src.starts_with('/') => MountSpec::Bind {
                source: PathBuf::from(src),
                path,
                readonly,
            },
            Some(src) if src.is_empty() || src.starts_with('.') || src.contains('/') => {
                return Err(usage(
                    spec,
                    "a bind mount's host path must be absolute (a volume name has no `/`)",
                ));
            }
            Some(name) => {
                names::check_id("volume", name)?;
                MountSpec::Named {
                    name: name.to_owned(),
                    path,
                    readonly,
                }
            }
        })
    }

    /// Where it mounts.
    pub fn path(&self) -> &Path {
        match self {
            MountSpec::Named { path, .. }
            | MountSpec::Anonymous { path, .. }
            | MountSpec::Bind { path, .. } => path,
        }
    }
}

/// `--volumes-from OTHER[:ro|:rw]`: the container and whether every mount
/// taken from it is read-only.
///
/// # Errors
/// A usage error.
pub fn parse_volumes_from(spec: &str) -> Result<(String, bool)> {
    let (name, ro) = match spec.split_once(':') {
        None => (spec, false),
        Some((n, m)) => (
            n,
            mode(spec, m).map_err(|_| {
                Error::from(thinlayer_pool::Error::InvalidArgument(format!(
                    "bad --volumes-from `{spec}`: use CONTAINER or CONTAINER:ro"
                )))
            })?,
        ),
    };
    names::check_id("container", name)?;
    Ok((name.to_owned(), ro))
}

/// What [`Store::create_container`] mounts besides the image's `Volumes`.
#[derive(Clone, Debug, Default)]
pub struct MountRequest {
    /// `--volume` specs.
    pub specs: Vec<MountSpec>,
    /// `--volumes-from` containers, each with its `:ro`.
    pub volumes_from: Vec<(String, bool)>,
}

/// A mount of a container as `container inspect` shows it, Docker's
/// `Mounts` entry.
#[derive(Clone, Debug, Serialize)]
pub struct MountView {
    /// `volume` or `bind`.
    #[serde(rename = "Type")]
    pub kind: &'static str,
    /// The volume (none for a bind).
    #[serde(rename = "Name", skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The host path: the bind's source, or where the volume's content
    /// shows on the host now, in the container's mounted root ("" while
    /// the container is not mounted).
    #[serde(rename = "Source")]
    pub source: PathBuf,
    /// The path inside the container.
    #[serde(rename = "Destination")]
    pub destination: PathBuf,
    /// The volume driver (`thinlayer`; none for a bind, as Docker shows).
    #[serde(rename = "Driver", skip_serializing_if = "Option::is_none")]
    pub driver: Option<&'static str>,
    /// `ro` or `rw`.
    #[serde(rename = "Mode")]
    pub mode: &'static str,
    /// Writable.
    #[serde(rename = "RW")]
    pub rw: bool,
    /// Mount propagation (`rprivate`, as Docker's default).
    #[serde(rename = "Propagation")]
    pub propagation: &'static str,
    /// Made for this container (removed by `container rm --volumes`).
    #[serde(rename = "Anonymous")]
    pub anonymous: bool,
}

/// Opens the directory at the absolute `inside` beneath the root
/// filesystem mounted at `rootfs`, creating missing components (0755, as a
/// runtime does), and returns it opened `O_PATH`, to mount onto with
/// [`thinlayer_pool::Pool::mount_layer_at_fd`].
///
/// Each component is opened by the kernel relative to its parent's fd
/// without following any symlink (`openat2` with `RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS`; `openat` with `O_NOFOLLOW` on a kernel older than
/// 5.6): a process in the container that swaps a component for a symlink
/// (`/data -> /etc`) at any moment gets a refusal, never a mount outside
/// the root. There is no check-then-use window: what is mounted onto is
/// the directory that was opened, wherever it is renamed to afterwards.
///
/// # Errors
/// A symlink or non-directory on the way (the refusal names it), I/O.
pub fn open_mount_dir(rootfs: &Path, inside: &Path) -> Result<OwnedFd> {
    let mut at = fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .ctx(|| format!("open {}", rootfs.display()))?;
    let mut shown = rootfs.to_path_buf();
    for c in inside.components() {
        let Component::Normal(part) = c else { continue };
        shown.push(part);
        at = open_or_make_beneath(&at, part, &shown)?;
    }
    Ok(at)
}

/// The directory `part` of `parent`, made first if missing.
fn open_or_make_beneath(parent: &OwnedFd, part: &OsStr, shown: &Path) -> Result<OwnedFd> {
    // A component another process removes or makes between our mkdirat
    // and openat is tried again, a few times.
    for _ in 0..4 {
        match open_beneath(parent, part) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {
                match stat::mkdirat(parent, part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(std::io::Error::from(e))
                            .ctx(|| format!("create {}", shown.display()));
                    }
                }
            }
            Err(Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => {
                // A directory again by now (swapped back): try again.
                if let Some(refusal) = not_a_plain_dir(parent, part, shown) {
                    return Err(refusal);
                }
            }
            Err(e) => {
                return Err(std::io::Error::from(e)).ctx(|| format!("open {}", shown.display()));
            }
        }
    }
    Err(thinlayer_pool::Error::InvalidArgument(format!(
        "{} kept changing while the volume mount opened it (a process in the container \
         renames it); stop that process and mount again",
        shown.display()
    ))
    .into())
}

/// Opens directory `part` of `parent` `O_PATH`, following no symlink.
fn open_beneath(parent: &OwnedFd, part: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = fcntl::OpenHow::new()
        .flags(flags)
        .resolve(fcntl::ResolveFlag::RESOLVE_BENEATH | fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS);
    match fcntl::openat2(parent, part, how) {
        // No openat2 (before Linux 5.6): one component with O_NOFOLLOW is
        // the same resolution.
        Err(Errno::ENOSYS) => fcntl::openat(parent, part, flags, Mode::empty()),
        r => r,
    }
}

/// The refusal for a component that is not a plain directory; `None` if it
/// is one now or is gone (changed since the open failed).
fn not_a_plain_dir(parent: &OwnedFd, part: &OsStr, shown: &Path) -> Option<Error> {
    let kind = stat::fstatat(parent, part, fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| stat::SFlag::from_bits_truncate(st.st_mode) & stat::SFlag::S_IFMT);
    let symlink = match kind {
        // Changed again since the open failed: the caller tries again.
        Ok(k) if k == stat::SFlag::S_IFDIR => return None,
        Err(_) => return None,
        Ok(k) => k == stat::SFlag::S_IFLNK,
    };
    Some(
        thinlayer_pool::Error::InvalidArgument(if symlink {
            format!(
                "{} is a symlink inside the container; a volume is never mounted through one: \
                 make it a directory in the image, or mount the volume elsewhere",
                shown.display()
            )
        } else {
            format!(
                "{} is not a directory; cannot mount a volume there: pick another path",
                shown.display()
            )
        })
        .into(),
    )
}

/// A mount target opened beneath a container's root: its parent
/// directory, its name there, and the target itself (`O_PATH`), each
/// resolved without following a symlink.
pub(crate) struct Target {
    parent: OwnedFd,
    name: std::ffi::OsString,
    fd: OwnedFd,
    shown: PathBuf,
}

/// Opens (making it if missing: a directory, or for a file bind an empty
/// file) the mount target at the absolute `inside` beneath `rootfs`, as
/// [`open_mount_dir`] does.
pub(crate) fn open_mount_target(rootfs: &Path, inside: &Path, file: bool) -> Result<Target> {
    let parent_inside = inside.parent().unwrap_or(Path::new("/"));
    let name = inside
        .file_name()
        .expect("mount targets are checked not to be `/` and to have no `..`")
        .to_owned();
    let parent = open_mount_dir(rootfs, parent_inside)?;
    let mut shown = rootfs.to_path_buf();
    shown.extend(
        inside
            .components()
            .filter(|c| matches!(c, Component::Normal(_))),
    );
    let fd = if file {
        open_or_make_file_beneath(&parent, &name, &shown)?
    } else {
        open_or_make_beneath(&parent, &name, &shown)?
    };
    Ok(Target {
        parent,
        name,
        fd,
        shown,
    })
}

/// The file `part` of `parent` (`O_PATH`), made empty (0644) if missing;
/// a symlink or a directory there is refused.
fn open_or_make_file_beneath(parent: &OwnedFd, part: &OsStr, shown: &Path) -> Result<OwnedFd> {
    match stat::fstatat(parent, part, fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => {
            // O_EXCL|O_NOFOLLOW: never through a symlink planted meanwhile.
            match fcntl::openat(
                parent,
                part,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            ) {
                Ok(_) | Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(std::io::Error::from(e))
                        .ctx(|| format!("create {}", shown.display()));
                }
            }
        }
        Err(e) => {
            return Err(std::io::Error::from(e)).ctx(|| format!("look at {}", shown.display()));
        }
        Ok(_) => {}
    }
    let fd = reopen(parent, part)
        .map_err(std::io::Error::from)
        .ctx(|| format!("open {}", shown.display()))?;
    let kind = stat::SFlag::from_bits_truncate(
        stat::fstat(&fd)
            .map_err(std::io::Error::from)
            .ctx(|| format!("look at {}", shown.display()))?
            .st_mode,
    ) & stat::SFlag::S_IFMT;
    if kind == stat::SFlag::S_IFDIR {
        return Err(thinlayer_pool::Error::InvalidArgument(format!(
            "{} is a directory; a file is bind-mounted only onto a file: pick another path",
            shown.display()
        ))
        .into());
    }
    Ok(fd)
}

/// `part` of `parent`, `O_PATH`, any type, following no symlink (the
/// last component crosses into what is mounted there).
fn reopen(parent: &OwnedFd, part: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = fcntl::OpenHow::new()
        .flags(flags)
        .resolve(fcntl::ResolveFlag::RESOLVE_BENEATH | fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS);
    match fcntl::openat2(parent, part, how) {
        Err(Errno::ENOSYS) => fcntl::openat(parent, part, flags, Mode::empty()),
        r => r,
    }
}

fn proc_fd(fd: BorrowedFd<'_>) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn identity(fd: BorrowedFd<'_>, shown: &Path) -> Result<(u64, u64)> {
    let st = stat::fstat(fd)
        .map_err(std::io::Error::from)
        .ctx(|| format!("look at {}", shown.display()))?;
    Ok((st.st_dev, st.st_ino))
}

/// Bind-mounts `source` (`MS_REC` when `recursive`) onto `target`, then
/// sets the new mount's own flags (`MS_REMOUNT | MS_BIND`: `flags` such as
/// `MS_RDONLY | MS_NOSUID | MS_NODEV`; none: kept as the source's) on the
/// mount found at the target again, checked to be the one just made.
pub(crate) fn bind_onto(
    source: BorrowedFd<'_>,
    target: &Target,
    recursive: bool,
    flags: MsFlags,
) -> Result<()> {
    use std::os::fd::AsFd;
    let how = if recursive {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount::mount(
        Some(&proc_fd(source)),
        &proc_fd(target.fd.as_fd()),
        None::<&str>,
        how,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
    .ctx(|| format!("bind-mount onto {}", target.shown.display()))?;
    if flags.is_empty() {
        return Ok(());
    }
    let mounted = reopen(&target.parent, &target.name)
        .map_err(std::io::Error::from)
        .ctx(|| format!("open {}", target.shown.display()))?;
    if identity(mounted.as_fd(), &target.shown)? != identity(source, &target.shown)? {
        return Err(thinlayer_pool::Error::InvalidArgument(format!(
            "{} changed while it was mounted (a process in the container renamed it); \
             stop that process, unmount the container and mount it again",
            target.shown.display()
        ))
        .into());
    }
    mount::mount(
        None::<&str>,
        &proc_fd(mounted.as_fd()),
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
    .ctx(|| format!("remount {} ({flags:?})", target.shown.display()))
}

/// Bind-mounts the host path of `b` (a directory, recursively, or a
/// file) at its path beneath `rootfs`, then remounts it `nosuid,nodev`
/// (and read-only with `:ro`). The host path is the administrator's and
/// resolved as given; the target beneath the root follows no symlink.
pub(crate) fn bind_host_path(rootfs: &Path, b: &BindMount) -> Result<()> {
    use std::os::fd::AsFd;
    let src =
        fcntl::open(&b.source, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| {
            Error::from(thinlayer_pool::Error::InvalidArgument(format!(
                "bind source {} cannot be opened ({e}); create it again, or remove the container",
                b.source.display()
            )))
        })?;
    let st = stat::fstat(&src)
        .map_err(std::io::Error::from)
        .ctx(|| format!("look at {}", b.source.display()))?;
    let dir =
        stat::SFlag::from_bits_truncate(st.st_mode) & stat::SFlag::S_IFMT == stat::SFlag::S_IFDIR;
    let target = open_mount_target(rootfs, &b.path, !dir)?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if b.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    bind_onto(src.as_fd(), &target, true, flags)
}

/// What an image holds at a mount path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Nothing: the path is made at mount time.
    Missing,
    /// A directory, and whether it is empty.
    Dir {
        /// No entries.
        empty: bool,
    },
    /// A file (or another non-directory).
    File,
}

/// What the read-only tree at `root` holds at the absolute `inside`,
/// resolved without following symlinks: a symlink on the way (or at the
/// end), or a non-directory before the end, is refused, naming the path
/// inside the container.
pub(crate) fn probe(root: &Path, inside: &Path) -> Result<Probe> {
    let mut at = fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .ctx(|| format!("open {}", root.display()))?;
    let parts: Vec<&OsStr> = inside
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    let mut shown = PathBuf::from("/");
    for (i, part) in parts.iter().enumerate() {
        shown.push(part);
        let st = match stat::fstatat(&at, *part, fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => return Ok(Probe::Missing),
            r => r
                .map_err(std::io::Error::from)
                .ctx(|| format!("look at {} in the image", shown.display()))?,
        };
        let kind = stat::SFlag::from_bits_truncate(st.st_mode) & stat::SFlag::S_IFMT;
        let last = i + 1 == parts.len();
        if kind == stat::SFlag::S_IFLNK {
            return Err(thinlayer_pool::Error::InvalidArgument(format!(
                "{} is a symlink in the image; a volume is never mounted through one: \
                 mount it at the path the link points to, or elsewhere",
                shown.display()
            ))
            .into());
        }
        if kind != stat::SFlag::S_IFDIR {
            if last {
                return Ok(Probe::File);
            }
            return Err(thinlayer_pool::Error::InvalidArgument(format!(
                "{} is not a directory in the image; nothing can be mounted below it: \
                 pick another path",
                shown.display()
            ))
            .into());
        }
        at = open_beneath(&at, part)
            .map_err(std::io::Error::from)
            .ctx(|| format!("open {} in the image", shown.display()))?;
    }
    let dir = root.join(inside.strip_prefix("/").unwrap_or(inside));
    let empty = std::fs::read_dir(&dir)
        .ctx(|| format!("list {}", dir.display()))?
        .next()
        .is_none();
    Ok(Probe::Dir { empty })
}

/// Copies the tree at `from` (read-only, not changing) into the directory
/// `to`, with owners, modes, xattrs, links and devices, through the
/// image crate's layer export and apply (`empty`: an empty directory, the
/// export's lower tree): Docker's copy of an image's content into a new
/// volume.
pub(crate) fn copy_tree(from: &Path, empty: &Path, to: &Path) -> Result<()> {
    let (r, w) = std::io::pipe().ctx(|| "make a pipe".to_owned())?;
    let (lower, upper) = (empty.to_path_buf(), from.to_path_buf());
    let writer = std::thread::spawn(move || {
        thinlayer_image::export::write_layer(&lower, &upper, std::io::BufWriter::new(w))
    });
    let applied = thinlayer_image::apply::apply_layer(
        to,
        std::io::BufReader::new(r),
        &thinlayer_image::apply::ApplyOptions::default(),
    );
    let written = writer.join().expect("the export thread does not panic");
    match (applied, written) {
        (Ok(_), Ok(_)) => Ok(()),
        // The export's error is the cause unless it only saw the apply
        // stop reading (a broken pipe).
        (Err(e), Err(w)) if w.raw_os_error() == Some(libc_epipe()) => Err(e.into()),
        (_, Err(w)) => Err(w.into()),
        (Err(e), Ok(_)) => Err(e.into()),
    }
}

fn libc_epipe() -> i32 {
    Errno::EPIPE as i32
}

fn layer_of(name: &str) -> String {
    format!("vol-{name}")
}

impl Store {
    fn volume_path(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{name}.rec"))
    }

    /// Creates volume `name`: a fresh thin device of `size` with a new
    /// `fs` and an empty [`DATA_DIR`] for its content, or (`from`) an
    /// instant snapshot clone of another volume (its layout too).
    ///
    /// # Errors
    /// Name taken, unknown source, pool errors (rolled back).
    pub fn create_volume(
        &mut self,
        name: &str,
        size: Option<Bytes>,
        fs: Option<FsType>,
        from: Option<&str>,
    ) -> Result<VolumeRecord> {
        self.create_volume_for(name, size, fs, from, None)
    }

    /// [`Store::create_volume`], recording the container an anonymous
    /// volume is made for.
    pub(crate) fn create_volume_for(
        &mut self,
        name: &str,
        size: Option<Bytes>,
        fs: Option<FsType>,
        from: Option<&str>,
        anonymous_for: Option<&str>,
    ) -> Result<VolumeRecord> {
        names::check_id("volume", name)?;
        if self.volume_path(name).exists() {
            return Err(thinlayer_pool::Error::InvalidArgument(format!(
                "a volume named `{name}` exists; pick another name or remove it with `thinlayer volume rm {name}`"
            ))
            .into());
        }
        let layer = layer_of(name);
        // Never another owner's layer of that id (an old user layer).
        self.check_new_layer(
            &layer,
            thinlayer_pool::Owner::Volume,
            "`thinlayer volume create`",
        )?;
        let (size, fs, layout, made) = match from {
            Some(src) => {
                let s = self.volume(src)?;
                if size.is_some_and(|z| z != s.size) || fs.is_some_and(|f| f != s.fs) {
                    return Err(thinlayer_pool::Error::InvalidArgument(
                        "a clone has its source's size and filesystem; drop --size/--fs".into(),
                    )
                    .into());
                }
                (
                    s.size,
                    s.fs,
                    s.layout,
                    self.pool.create_layer_for(
                        thinlayer_pool::Owner::Volume,
                        &layer,
                        Some(&s.layer),
                    ),
                )
            }
            None => {
                let size = size.unwrap_or(self.pool.record().base_size);
                let fs = fs.unwrap_or(self.pool.record().fs);
                (
                    size,
                    fs,
                    Layout::DataDir,
                    self.pool.create_volume_layer(&layer, size, fs),
                )
            }
        };
        made?;
        if from.is_none()
            && let Err(e) = self.make_data_dir(&layer)
        {
            return Err(self.roll_back_layer(&layer, e));
        }
        let rec = VolumeRecord {
            name: name.to_owned(),
            layer: layer.clone(),
            size,
            fs,
            from: from.map(str::to_owned),
            layout,
            anonymous_for: anonymous_for.map(str::to_owned),
            created_unix: now_unix(),
        };
        if let Err(e) = rec.save(&self.volume_path(name)) {
            return Err(self.roll_back_layer(&layer, e.into()));
        }
        Ok(rec)
    }

    /// Makes [`DATA_DIR`] (0755, root's) on the fresh filesystem of `layer`.
    fn make_data_dir(&mut self, layer: &str) -> Result<()> {
        let dir = self.scratch_dir(&format!("volume-{layer}"))?;
        self.pool.mount_layer(layer, &dir, MountUse::Scratch)?;
        let data = dir.join(DATA_DIR);
        let made = std::fs::create_dir(&data)
            .and_then(|()| {
                std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            })
            .ctx(|| format!("create {}", data.display()));
        let unmounted = self.pool.umount(&dir.to_string_lossy());
        let _ = std::fs::remove_dir(&dir);
        made?;
        unmounted?;
        Ok(())
    }

    /// Every volume, by name.
    ///
    /// # Errors
    /// Damaged records.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut v: Vec<VolumeRecord> = self.read_all("volumes")?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The volume named `name`.
    ///
    /// # Errors
    /// Unknown volume.
    pub fn volume(&self, name: &str) -> Result<VolumeRecord> {
        names::check_id("volume", name)?;
        Self::read_opt(&self.volume_path(name))?.ok_or_else(|| {
            thinlayer_pool::Error::InvalidArgument(format!(
                "no volume `{name}`; `thinlayer volume ls` lists them, `thinlayer volume create {name}` makes it"
            ))
            .into()
        })
    }

    /// The containers that mount volume `name`.
    fn volume_users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .containers()?
            .into_iter()
            .filter(|c| c.volumes.iter().any(|m| m.volume == name))
            .map(|c| c.name)
            .collect())
    }

    /// Removes volume `name`; refused while a container uses it, it is
    /// mounted, or clones of it exist.
    ///
    /// # Errors
    /// [`Error::InUse`], mounted, unknown volume.
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        let v = self.volume(name)?;
        let users = self.volume_users(name)?;
        if !users.is_empty() {
            return Err(Error::InUse {
                what: format!("volume `{name}`"),
                users: format!("container(s) {}", users.join(", ")),
            });
        }
        self.pool.remove_layer(&v.layer)?;
        record::remove(&self.volume_path(name))?;
        Ok(())
    }

    /// Removes volume `name` as a store transaction's step: its layer (a
    /// volume's only) and record, whichever exist; `false` if neither did.
    pub(crate) fn remove_volume_parts(&mut self, name: &str) -> Result<bool> {
        let had_record = self.volume_path(name).exists();
        let had_layer = self.remove_owned_layer(&layer_of(name), thinlayer_pool::Owner::Volume)?;
        record::remove(&self.volume_path(name))?;
        Ok(had_record || had_layer)
    }

    /// Mounts volume `name`'s content at `dir` (created if missing): the
    /// filesystem root at its private place, its content directory bound
    /// at `dir`. Into a container's root, see [`Store::mount_container`].
    ///
    /// # Errors
    /// Unknown volume, mount errors.
    pub fn mount_volume(&mut self, name: &str, dir: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("create mount point {}", dir.display()))?;
        let real = std::fs::canonicalize(dir).ctx(|| format!("resolve {}", dir.display()))?;
        let (Some(parent), Some(last)) = (real.parent(), real.file_name()) else {
            return Err(thinlayer_pool::Error::InvalidArgument(
                "a volume is not mounted over `/`; pick a directory".into(),
            )
            .into());
        };
        if self.volume_mountpoints(name)?.contains(&real) {
            return Ok(real);
        }
        let target = open_mount_target(parent, &Path::new("/").join(last), false)?;
        self.mount_volume_into(name, &target, false)?;
        Ok(real)
    }

    /// Mounts volume `name`'s filesystem root at `dir` (the Docker
    /// plugin's own place for it; already mounted there: nothing done) and
    /// returns where its content is there.
    ///
    /// # Errors
    /// Unknown volume, mount errors.
    pub fn mount_volume_root(&mut self, name: &str, dir: &Path) -> Result<PathBuf> {
        let v = self.volume(name)?;
        self.pool.mount_layer(&v.layer, dir, MountUse::Container)?;
        let real = std::fs::canonicalize(dir).ctx(|| format!("resolve {}", dir.display()))?;
        Ok(v.layout.content(&real))
    }

    /// Binds volume `name`'s content onto the opened `target` (read-only
    /// with `readonly`): its filesystem root is mounted at a private
    /// scratch place (0700, under `store/tmp`, which every exclusive open
    /// sweeps; `nosuid,nodev`), its content directory bound onto the
    /// target and remounted with a container volume's flags (`nodev`, and
    /// `ro` with `readonly`), and the scratch mount dropped again, so the
    /// target is the volume's only new mount.
    pub(crate) fn mount_volume_into(
        &mut self,
        name: &str,
        target: &Target,
        readonly: bool,
    ) -> Result<()> {
        use std::os::fd::AsFd;
        let v = self.volume(name)?;
        let root = self.scratch_dir(&format!("volume-{name}"))?;
        // nosuid,nodev as every engine mount under store/tmp; the bind
        // gets the container's own flags below.
        if let Err(e) = self.pool.mount_layer(&v.layer, &root, MountUse::Scratch) {
            let _ = std::fs::remove_dir(&root);
            return Err(e.into());
        }
        let bound = (|| {
            let root_fd = fcntl::open(
                &root,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(std::io::Error::from)
            .ctx(|| format!("open {}", root.display()))?;
            let content = match v.layout {
                Layout::Root => root_fd,
                Layout::DataDir => open_beneath(&root_fd, OsStr::new(DATA_DIR)).map_err(|e| {
                    Error::from(thinlayer_pool::Error::InvalidArgument(format!(
                        "volume `{name}` has no {DATA_DIR}/ directory for its content ({e}); \
                             mount its filesystem with `thinlayer mount {} DIR` and make it",
                        v.layer
                    )))
                })?,
            };
            // A container's volume as its root: nodev, setuid kept.
            let flags = if readonly {
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV
            } else {
                MsFlags::MS_NODEV
            };
            bind_onto(content.as_fd(), target, false, flags)
        })();
        // With the bind in place the device stays in use: a plain
        // unmount. Without it, through the pool, which tears the device
        // down when nothing else mounts it.
        let unmounted = match bound {
            Ok(()) => thinlayer_pool::mounts::umount(&root).map_err(Error::from),
            Err(_) => self
                .pool
                .umount(&root.to_string_lossy())
                .map(|_| ())
                .map_err(Error::from),
        };
        let _ = std::fs::remove_dir(&root);
        bound?;
        unmounted
    }

    /// Unmounts volume `name` everywhere it is mounted.
    ///
    /// # Errors
    /// Unknown volume, busy.
    pub fn umount_volume(&mut self, name: &str) -> Result<Vec<PathBuf>> {
        let v = self.volume(name)?;
        Ok(self.pool.umount(&v.layer)?)
    }

    /// Where volume `name` is mounted now.
    ///
    /// # Errors
    /// Unknown volume, kernel errors.
    pub fn volume_mountpoints(&mut self, name: &str) -> Result<Vec<PathBuf>> {
        let v = self.volume(name)?;
        self.layer_mountpoints(&v.layer)
    }

    /// Bytes of pool data volume `name`'s thin device maps (own and shared
    /// with its clones), while its device is active.
    ///
    /// # Errors
    /// Unknown volume, kernel errors.
    pub fn volume_usage(&mut self, name: &str) -> Result<Option<u64>> {
        let v = self.volume(name)?;
        match self.pool.layer_mapped_bytes(&v.layer) {
            Err(thinlayer_pool::Error::UnknownLayer(_)) => Ok(None),
            r => Ok(r?),
        }
    }

    /// Where `layer` is mounted; nowhere when it has no record.
    fn layer_mountpoints(&mut self, layer: &str) -> Result<Vec<PathBuf>> {
        match self.pool.layer_info(layer) {
            Err(thinlayer_pool::Error::UnknownLayer(_)) => Ok(Vec::new()),
            r => Ok(r?.mountpoints),
        }
    }

    /// Container `name`'s mounts as Docker's `inspect` shows them, in
    /// mount order.
    ///
    /// # Errors
    /// [`Error::UnknownContainer`], kernel errors.
    pub fn container_mounts(&mut self, name: &str) -> Result<Vec<MountView>> {
        let c = self.container(name)?;
        let roots = self.layer_mountpoints(&c.layer)?;
        let mut out = Vec::new();
        for v in &c.volumes {
            out.push(MountView {
                kind: "volume",
                name: Some(v.volume.clone()),
                source: roots.first().map_or_else(PathBuf::new, |r| {
                    r.join(v.path.strip_prefix("/").unwrap_or(&v.path))
                }),
                destination: v.path.clone(),
                driver: Some("thinlayer"),
                mode: if v.readonly { "ro" } else { "rw" },
                rw: !v.readonly,
                propagation: "",
                anonymous: v.anonymous,
            });
        }
        for b in &c.binds {
            out.push(MountView {
                kind: "bind",
                name: None,
                source: b.source.clone(),
                destination: b.path.clone(),
                driver: None,
                mode: if b.readonly { "ro" } else { "rw" },
                rw: !b.readonly,
                propagation: "rprivate",
                anonymous: false,
            });
        }
        out.sort_by_key(|m| m.destination.components().count());
        Ok(out)
    }
}

/// The mounts a new container gets, checked and named (see
/// [`Store::plan_mounts`]).
pub(crate) struct Plan {
    /// Its volumes, anonymous ones with their new names.
    pub volumes: Vec<VolumeMount>,
    /// Its bind mounts.
    pub binds: Vec<BindMount>,
    /// The anonymous volumes to make: name, path, whether the image has
    /// content there to copy into it.
    pub anonymous: Vec<(String, PathBuf, bool)>,
}

/// What [`Store::remove_container`] did with the container's anonymous
/// volumes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RemovedVolumes {
    /// Removed with it.
    pub removed: Vec<String>,
    /// Kept, each with why: another container mounts it
    /// (`--volumes-from`), it has clones, or it is mounted elsewhere.
    pub kept: Vec<(String, String)>,
}

enum Planned {
    Named(String, bool),
    Anonymous(bool),
    Bind(PathBuf, bool, bool),
}

impl Store {
    /// Checks and names what container `name` of `img` (top layer `top`)
    /// mounts: `--volume` specs first, then `--volumes-from` (the same
    /// volumes and binds at the same paths), then the image's `Volumes`
    /// as anonymous volumes where nothing else is. Refused, before any
    /// change: two mounts at one path, an unknown volume or container, a
    /// bind source that does not exist, a mount path that is a symlink
    /// (or passes through one, or a file) in the image.
    pub(crate) fn plan_mounts(
        &mut self,
        name: &str,
        img: &crate::records::ImageRecord,
        top: &str,
        req: &MountRequest,
    ) -> Result<Plan> {
        let conflict = |path: &Path| {
            Error::from(thinlayer_pool::Error::InvalidArgument(format!(
                "two mounts at {}; give each path one --volume (and one --volumes-from container)",
                path.display()
            )))
        };
        let mut wanted: Vec<(PathBuf, Planned)> = Vec::new();
        for spec in &req.specs {
            if wanted.iter().any(|(p, _)| p == spec.path()) {
                return Err(conflict(spec.path()));
            }
            let planned = match spec {
                MountSpec::Named { name, readonly, .. } => {
                    self.volume(name)?;
                    Planned::Named(name.clone(), *readonly)
                }
                MountSpec::Anonymous { readonly, .. } => Planned::Anonymous(*readonly),
                MountSpec::Bind {
                    source, readonly, ..
                } => {
                    let meta = std::fs::metadata(source).map_err(|e| {
                        Error::from(thinlayer_pool::Error::InvalidArgument(format!(
                            "bind source {} cannot be used ({e}); create it first, or fix the path",
                            source.display()
                        )))
                    })?;
                    Planned::Bind(source.clone(), *readonly, !meta.is_dir())
                }
            };
            wanted.push((spec.path().to_path_buf(), planned));
        }
        let explicit = wanted.len();
        for (other, ro) in &req.volumes_from {
            let c = self.container(other).map_err(|_| {
                Error::from(thinlayer_pool::Error::InvalidArgument(format!(
                    "--volumes-from {other}: no container `{other}`; `thinlayer container ls` lists them"
                )))
            })?;
            let theirs = c
                .volumes
                .iter()
                .map(|v| {
                    (
                        v.path.clone(),
                        Planned::Named(v.volume.clone(), *ro || v.readonly),
                    )
                })
                .chain(c.binds.iter().map(|b| {
                    let file = std::fs::metadata(&b.source).is_ok_and(|m| !m.is_dir());
                    (
                        b.path.clone(),
                        Planned::Bind(b.source.clone(), *ro || b.readonly, file),
                    )
                }));
            for (path, planned) in theirs {
                match wanted.iter().position(|(p, _)| *p == path) {
                    // A --volume at that path wins, as in Docker.
                    Some(i) if i < explicit => {}
                    Some(_) => return Err(conflict(&path)),
                    None => wanted.push((path, planned)),
                }
            }
        }
        for v in &img.volumes {
            let path = container_path(&format!("image {}'s config Volumes", img.name), v)?;
            if !wanted.iter().any(|(p, _)| *p == path) {
                wanted.push((path, Planned::Anonymous(false)));
            }
        }
        // The image's tree at each path, read from a read-only view.
        let probes = if wanted.is_empty() {
            Vec::new()
        } else {
            let (view, root) = self.open_view(top, "probe")?;
            let probes: Result<Vec<Probe>> = wanted.iter().map(|(p, _)| probe(&root, p)).collect();
            let closed = self.close_view(view, &root);
            let probes = probes?;
            closed?;
            probes
        };
        let mut plan = Plan {
            volumes: Vec::new(),
            binds: Vec::new(),
            anonymous: Vec::new(),
        };
        let mut n = 0;
        for ((path, planned), found) in wanted.into_iter().zip(probes) {
            let file = matches!(planned, Planned::Bind(_, _, true));
            match found {
                Probe::Dir { .. } if file => {
                    return Err(thinlayer_pool::Error::InvalidArgument(format!(
                        "{} is a directory in the image; a file is bind-mounted only onto a file: \
                         pick another path",
                        path.display()
                    ))
                    .into());
                }
                Probe::File if !file => {
                    return Err(thinlayer_pool::Error::InvalidArgument(format!(
                        "{} is a file in the image; a volume or a directory is mounted only onto \
                         a directory: pick another path",
                        path.display()
                    ))
                    .into());
                }
                _ => {}
            }
            match planned {
                Planned::Named(volume, readonly) => plan.volumes.push(VolumeMount {
                    volume,
                    path,
                    readonly,
                    anonymous: false,
                }),
                Planned::Bind(source, readonly, _) => plan.binds.push(BindMount {
                    source,
                    path,
                    readonly,
                }),
                Planned::Anonymous(readonly) => {
                    let volume = loop {
                        let v = format!("anon-{name}-{n}");
                        n += 1;
                        names::check_id("volume", &v)?;
                        if !self.volume_path(&v).exists()
                            && !self.pool.layout().layer_record(&layer_of(&v)).exists()
                        {
                            break v;
                        }
                    };
                    let fill = found == Probe::Dir { empty: false };
                    plan.anonymous.push((volume.clone(), path.clone(), fill));
                    plan.volumes.push(VolumeMount {
                        volume,
                        path,
                        readonly,
                        anonymous: true,
                    });
                }
            }
        }
        Ok(plan)
    }

    /// Mounts container `c`'s volumes and binds beneath its root mounted
    /// at `dir`, outer paths first; a path something is mounted at already
    /// is skipped.
    pub(crate) fn mount_container_mounts(
        &mut self,
        dir: &Path,
        c: &crate::records::ContainerRecord,
    ) -> Result<()> {
        enum One<'a> {
            Volume(&'a VolumeMount),
            Bind(&'a BindMount),
        }
        let mut order: Vec<(&Path, One<'_>)> = c
            .volumes
            .iter()
            .map(|v| (v.path.as_path(), One::Volume(v)))
            .chain(c.binds.iter().map(|b| (b.path.as_path(), One::Bind(b))))
            .collect();
        order.sort_by_key(|(p, _)| p.components().count());
        // Mounted already (the container mounted again): left as it is.
        let real = std::fs::canonicalize(dir).ctx(|| format!("resolve {}", dir.display()))?;
        let mounted: std::collections::BTreeSet<PathBuf> = thinlayer_pool::mounts::all()?
            .into_iter()
            .map(|m| m.mountpoint)
            .collect();
        for (path, one) in order {
            if mounted.contains(&real.join(path.strip_prefix("/").unwrap_or(path))) {
                continue;
            }
            match one {
                One::Volume(v) => {
                    let target = open_mount_target(dir, path, false)?;
                    self.mount_volume_into(&v.volume, &target, v.readonly)?;
                }
                One::Bind(b) => bind_host_path(dir, b)?,
            }
        }
        Ok(())
    }

    /// Which of container `c`'s own anonymous volumes `container rm
    /// --volumes` removes: those nothing else uses (checked after the
    /// container is unmounted, before any change), so that the removal,
    /// a transaction, is never stopped half way by one of them.
    pub(crate) fn anonymous_to_remove(
        &mut self,
        c: &crate::records::ContainerRecord,
    ) -> Result<RemovedVolumes> {
        let mut gone = RemovedVolumes::default();
        for v in c.volumes.iter().filter(|v| v.anonymous) {
            if !self.volume_path(&v.volume).exists() {
                continue;
            }
            let users: Vec<String> = self
                .volume_users(&v.volume)?
                .into_iter()
                .filter(|u| *u != c.name)
                .collect();
            let clones = self.pool.children_of(&layer_of(&v.volume))?;
            let mounted = self.volume_mountpoints(&v.volume)?;
            let why = if !users.is_empty() {
                format!("container(s) {} mount it", users.join(", "))
            } else if !clones.is_empty() {
                format!("it has clone(s) {}", clones.join(", "))
            } else if !mounted.is_empty() {
                format!(
                    "it is mounted at {}",
                    mounted
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                gone.removed.push(v.volume.clone());
                continue;
            };
            gone.kept.push((v.volume.clone(), why));
        }
        Ok(gone)
    }

    /// Makes the anonymous volumes of container `name`, each filled with
    /// what its init layer (the image and the container's own files) holds
    /// at its path, read from a read-only view.
    pub(crate) fn make_anonymous(
        &mut self,
        name: &str,
        init_layer: &str,
        anonymous: &[(String, PathBuf, bool)],
    ) -> Result<()> {
        for (volume, _, _) in anonymous {
            self.create_volume_for(volume, None, None, None, Some(name))?;
        }
        let fills: Vec<&(String, PathBuf, bool)> = anonymous.iter().filter(|a| a.2).collect();
        if fills.is_empty() {
            return Ok(());
        }
        let empty = self.scratch_dir("fill-lower")?;
        let result = match self.open_view(init_layer, "fill") {
            Err(e) => Err(e),
            Ok((view, root)) => {
                let mut filled = Ok(());
                for (volume, path, _) in fills {
                    filled = self.fill_volume(volume, &root, path, &empty);
                    if filled.is_err() {
                        break;
                    }
                }
                let closed = self.close_view(view, &root);
                filled.and(closed)
            }
        };
        let _ = std::fs::remove_dir(&empty);
        result
    }

    /// Layer `id` as a read-only tree at a private scratch directory named
    /// for `purpose` (see [`Store::read_only_view`]); close it with
    /// [`Store::close_view`].
    fn open_view(&mut self, id: &str, purpose: &str) -> Result<(crate::View, PathBuf)> {
        let dir = self.scratch_dir(&format!("{purpose}-view"))?;
        match self.read_only_view(id, &dir) {
            Ok(view) => Ok((view, dir)),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Releases a view [`Store::open_view`] made.
    fn close_view(&mut self, view: crate::View, dir: &Path) -> Result<()> {
        let released = match view {
            crate::View::Frozen(copy) => self.pool.release_frozen(copy),
            crate::View::Mounted(at) => self.pool.umount(&at.to_string_lossy()).map(|_| ()),
        };
        let _ = std::fs::remove_dir(dir);
        Ok(released?)
    }

    /// Copies what the tree at `root` holds at `path` into volume `volume`.
    fn fill_volume(&mut self, volume: &str, root: &Path, path: &Path, empty: &Path) -> Result<()> {
        let v = self.volume(volume)?;
        let dir = self.scratch_dir(&format!("fill-{volume}"))?;
        self.pool.mount_layer(&v.layer, &dir, MountUse::Scratch)?;
        let from = root.join(path.strip_prefix("/").unwrap_or(path));
        let copied =
            copy_tree(&from, empty, &v.layout.content(&dir)).and_then(|()| crate::syncfs(&dir));
        let unmounted = self.pool.umount(&dir.to_string_lossy());
        let _ = std::fs::remove_dir(&dir);
        copied?;
        unmounted?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs_parse_and_refuse_escapes() {
        let p = |s: &str| MountSpec::parse(s).unwrap();
        assert_eq!(
            p("data:/var/lib/data/"),
            MountSpec::Named {
                name: "data".into(),
                path: "/var/lib/data".into(),
                readonly: false
            }
        );
        assert_eq!(
            p("data:/x:ro"),
            MountSpec::Named {
                name: "data".into(),
                path: "/x".into(),
                readonly: true
            }
        );
        assert_eq!(
            p("/srv/./cache"),
            MountSpec::Anonymous {
                path: "/srv/cache".into(),
                readonly: false
            }
        );
        assert_eq!(
            p("/srv:ro"),
            MountSpec::Anonymous {
                path: "/srv".into(),
                readonly: true
            }
        );
        assert_eq!(
            p("/etc/hosts:/etc/hosts:ro"),
            MountSpec::Bind {
                source: "/etc/hosts".into(),
                path: "/etc/hosts".into(),
                readonly: true
            }
        );
        for bad in [
            "data",
            "data:rel/path",
            "data:/a/../b",
            "data:/",
            "../x:/a",
            "./x:/a",
            "a/b:/a",
            ":/a",
            "data:/a:rx",
            "/a:/b:ro:x",
            "/",
            "/a/../b",
        ] {
            assert!(MountSpec::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_volumes_from("db:ro").unwrap(), ("db".into(), true));
        assert_eq!(parse_volumes_from("db").unwrap(), ("db".into(), false));
        assert!(parse_volumes_from("db:x").is_err());
        assert!(parse_volumes_from("../db").is_err());
    }

    #[test]
    fn mount_dirs_never_pass_through_symlinks() {
        use std::fs;
        let root = std::env::temp_dir().join(format!("tl-vol-{}", std::process::id()));
        let outside = root.with_extension("outside");
        fs::create_dir_all(root.join("ok")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("ok/late")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        let real = |fd: &OwnedFd| {
            use std::os::fd::AsRawFd;
            fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
        };
        let fd = open_mount_dir(&root, Path::new("/ok/new/deeper")).unwrap();
        assert_eq!(real(&fd), root.join("ok/new/deeper"));
        let err = |inside: &str| {
            open_mount_dir(&root, Path::new(inside))
                .expect_err(inside)
                .to_string()
        };
        assert!(
            err("/evil/x").contains("is a symlink"),
            "{}",
            err("/evil/x")
        );
        assert!(
            err("/ok/late").contains("is a symlink"),
            "a symlink as the last component"
        );
        assert!(
            err("/file/x").contains("not a directory"),
            "{}",
            err("/file/x")
        );
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "nothing created through the symlink"
        );
        // The opened directory stays the target after a rename and a
        // symlink put in its place.
        fs::rename(root.join("ok/new"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("ok/new")).unwrap();
        assert_eq!(real(&fd), root.join("moved/deeper"));
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }
}
