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
    sys::stat::{self, Mode},
};
use serde::{Deserialize, Serialize};
use thinlayer_pool::{Bytes, FsType, MountUse, names, record};

use crate::{Error, Result, Store, error::IoContext, now_unix};

const RECORD_VOLUME: &str = "volume";

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
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

/// A volume mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume.
    pub volume: String,
    /// Absolute path inside the container.
    pub path: PathBuf,
}

impl VolumeMount {
    /// Parses `NAME:/path`.
    ///
    /// # Errors
    /// [`Error::Format`]-free: a bad spec is a usage error.
    pub fn parse(spec: &str) -> Result<VolumeMount> {
        let bad = |why: &str| {
            Error::Pool(thinlayer_pool::Error::InvalidArgument(format!(
                "bad volume spec `{spec}`: {why}; use NAME:/path/in/container"
            )))
        };
        let (name, path) = spec.split_once(':').ok_or_else(|| bad("no `:`"))?;
        names::check_id("volume", name)?;
        let path = PathBuf::from(path);
        if !path.is_absolute()
            || path.components().any(|c| matches!(c, Component::ParentDir))
            || path == Path::new("/")
        {
            return Err(bad("the path must be absolute, not `/`, without `..`"));
        }
        Ok(VolumeMount {
            volume: name.to_owned(),
            path,
        })
    }
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

fn layer_of(name: &str) -> String {
    format!("vol-{name}")
}

impl Store {
    fn volume_path(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{name}.rec"))
    }

    /// Creates volume `name`: a fresh thin device of `size` with a new
    /// `fs`, or (`from`) an instant snapshot clone of another volume.
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
        let (size, fs, made) = match from {
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
                (size, fs, self.pool.create_volume_layer(&layer, size, fs))
            }
        };
        made?;
        let rec = VolumeRecord {
            name: name.to_owned(),
            layer: layer.clone(),
            size,
            fs,
            from: from.map(str::to_owned),
            created_unix: now_unix(),
        };
        if let Err(e) = record::write(&self.volume_path(name), RECORD_VOLUME, &rec) {
            return Err(self.roll_back_layer(&layer, e.into()));
        }
        Ok(rec)
    }

    /// Every volume, by name.
    ///
    /// # Errors
    /// Damaged records.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut v: Vec<VolumeRecord> = self.read_all("volumes", RECORD_VOLUME)?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The volume named `name`.
    ///
    /// # Errors
    /// Unknown volume.
    pub fn volume(&self, name: &str) -> Result<VolumeRecord> {
        names::check_id("volume", name)?;
        Self::read_opt(&self.volume_path(name), RECORD_VOLUME)?.ok_or_else(|| {
            thinlayer_pool::Error::InvalidArgument(format!(
                "no volume `{name}`; `thinlayer volume ls` lists them"
            ))
            .into()
        })
    }

    /// Removes volume `name`; refused while a container uses it, it is
    /// mounted, or clones of it exist.
    ///
    /// # Errors
    /// [`Error::InUse`], mounted, unknown volume.
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        let v = self.volume(name)?;
        let users: Vec<String> = self
            .containers()?
            .into_iter()
            .filter(|c| c.volumes.iter().any(|m| m.volume == name))
            .map(|c| c.name)
            .collect();
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

    /// Mounts volume `name` at `dir` (a path the caller controls; into a
    /// container's root use [`open_mount_dir`] and
    /// [`Store::mount_volume_at`]).
    ///
    /// # Errors
    /// Unknown volume, mount errors.
    pub fn mount_volume(&mut self, name: &str, dir: &Path) -> Result<PathBuf> {
        let v = self.volume(name)?;
        self.pool.mount_layer(&v.layer, dir, MountUse::Container)?;
        Ok(dir.to_owned())
    }

    /// Mounts volume `name` onto the directory `dir` opened by
    /// [`open_mount_dir`] (through `/proc/self/fd/N`: the very directory
    /// opened, wherever a rename moved it since).
    ///
    /// # Errors
    /// Unknown volume, mount errors.
    pub fn mount_volume_at(&mut self, name: &str, dir: BorrowedFd<'_>) -> Result<()> {
        let v = self.volume(name)?;
        self.pool
            .mount_layer_at_fd(&v.layer, dir, MountUse::Container)?;
        Ok(())
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
        Ok(self
            .pool
            .layers()?
            .into_iter()
            .find(|l| l.id == v.layer)
            .map(|l| l.mountpoints)
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs_parse_and_refuse_escapes() {
        let m = VolumeMount::parse("data:/var/lib/data").unwrap();
        assert_eq!(
            (m.volume.as_str(), m.path.as_path()),
            ("data", Path::new("/var/lib/data"))
        );
        for bad in [
            "data",
            "data:rel/path",
            "data:/a/../b",
            "data:/",
            "../x:/a",
            ":/a",
        ] {
            assert!(VolumeMount::parse(bad).is_err(), "{bad}");
        }
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
