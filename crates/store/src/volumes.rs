//! Thin volumes: data volumes that are thin devices with a filesystem of
//! their own, outliving the containers that use them. A volume can be an
//! instant snapshot clone of another (`--from`), sharing its blocks.
//!
//! A container mounts volumes inside its root filesystem; several
//! containers may share one (the same block device mounted at several
//! places shares one filesystem instance). The mount path inside a root
//! filesystem is checked component by component: a symlink there (an image
//! could plant `/data -> /etc`) would otherwise redirect the mount onto the
//! host, so it is refused.

use std::{
    fs,
    path::{Component, Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thinlayer_pool::{Bytes, FsType, names, record};

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

/// `rootfs` joined with the absolute `inside`, created as directories,
/// refusing any component that is a symlink or not a directory.
///
/// # Errors
/// A symlink or non-directory on the way.
pub fn safe_mount_dir(rootfs: &Path, inside: &Path) -> Result<PathBuf> {
    let mut at = rootfs.to_path_buf();
    for c in inside.components() {
        let Component::Normal(part) = c else { continue };
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(thinlayer_pool::Error::InvalidArgument(format!(
                    "{} is a symlink inside the container; a volume is never mounted through one",
                    at.display()
                ))
                .into());
            }
            Ok(m) if !m.is_dir() => {
                return Err(thinlayer_pool::Error::InvalidArgument(format!(
                    "{} is not a directory; cannot mount a volume there",
                    at.display()
                ))
                .into());
            }
            Ok(_) => {}
            Err(_) => fs::create_dir(&at).ctx(|| format!("create {}", at.display()))?,
        }
    }
    Ok(at)
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
        let (size, fs, made) = match from {
            Some(src) => {
                let s = self.volume(src)?;
                if size.is_some_and(|z| z != s.size) || fs.is_some_and(|f| f != s.fs) {
                    return Err(thinlayer_pool::Error::InvalidArgument(
                        "a clone has its source's size and filesystem; drop --size/--fs".into(),
                    )
                    .into());
                }
                (s.size, s.fs, self.pool.create_layer(&layer, Some(&s.layer)))
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

    /// Mounts volume `name` at `dir`.
    ///
    /// # Errors
    /// Unknown volume, mount errors.
    pub fn mount_volume(&mut self, name: &str, dir: &Path) -> Result<PathBuf> {
        let v = self.volume(name)?;
        self.pool.mount_layer(&v.layer, dir, false)?;
        Ok(dir.to_owned())
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
        let root = std::env::temp_dir().join(format!("tl-vol-{}", std::process::id()));
        let outside = root.with_extension("outside");
        fs::create_dir_all(root.join("ok")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        assert_eq!(
            safe_mount_dir(&root, Path::new("/ok/new/deeper")).unwrap(),
            root.join("ok/new/deeper")
        );
        assert!(safe_mount_dir(&root, Path::new("/evil/x")).is_err());
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "nothing created through the symlink"
        );
        assert!(safe_mount_dir(&root, Path::new("/file/x")).is_err());
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }
}
