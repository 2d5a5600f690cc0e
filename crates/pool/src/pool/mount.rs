//! Mounting and unmounting layers: a layer's thin device is activated for
//! its first mount and torn down when nothing mounts it (or, under
//! `teardown_later`, left idle for [`Pool::reclaim`]).
//!
//! Mount points are made 0700; a caller that opened the directory itself
//! mounts through `/proc/self/fd/N` ([`Pool::mount_layer_at_fd`]).
//!
//! A layer that took a mounted spare (see `spare`) is already mounted at
//! `ROOT/spares/THIN_ID`: a mount for the spare's own options
//! ([`MountUse::Container`]) moves that mount to the target (`MS_MOVE`),
//! any other unmounts it first and mounts as usual.
//!
//! What must never happen: a layer half-removed by a crash, or whose
//! removal is deferred, mounted or activated; a device torn down while
//! something mounts it; a mount of something that is not this pool's
//! layer unmounted.

use std::{
    fs,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
};

use super::{Action, Pool, layer::refuse_removing, spare};
use crate::{
    error::{Error, IoContext, Result},
    fault, kernel,
    mounts::{self, MountUse},
    names::{self, Role},
};

impl Pool {
    /// Activates layer `id`'s thin device if needed and mounts it at `dir`
    /// (created 0700 if missing) for `how` (which decides `ro`, `nosuid`,
    /// `nodev`; see [`MountUse`]). A layer that took a mounted spare gets
    /// that mount moved to `dir` when `how` has the spare's options
    /// ([`MountUse::Container`]). Returns the device node.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::PoolInactive`], mount errors.
    pub fn mount_layer(
        &mut self,
        id: &str,
        dir: &Path,
        how: MountUse,
    ) -> Result<(PathBuf, Action)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("create mount point {}", dir.display()))?;
        let dir = fs::canonicalize(dir).ctx(|| format!("resolve {}", dir.display()))?;
        self.mount_layer_on(id, &dir, &dir, how)
    }

    /// As [`Pool::mount_layer`], onto the directory `dir` the caller opened
    /// (`O_PATH`, resolved without following symlinks): the mount goes
    /// through `/proc/self/fd/N`, so no rename or symlink swapped in after
    /// the open can move it elsewhere (runc's fix for CVE-2021-30465). It
    /// shows in mountinfo at the directory's real path, so `umount` and
    /// `layer ls` find it as any other.
    ///
    /// # Errors
    /// As [`Pool::mount_layer`].
    pub fn mount_layer_at_fd(
        &mut self,
        id: &str,
        dir: BorrowedFd<'_>,
        how: MountUse,
    ) -> Result<(PathBuf, Action)> {
        let via = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let real = fs::read_link(&via).ctx(|| format!("resolve {}", via.display()))?;
        self.mount_layer_on(id, &via, &real, how)
    }

    /// Mounts layer `id` at `target` (a path, or `/proc/self/fd/N`), whose
    /// real path, as mountinfo shows it, is `real`.
    fn mount_layer_on(
        &mut self,
        id: &str,
        target: &Path,
        real: &Path,
        how: MountUse,
    ) -> Result<(PathBuf, Action)> {
        self.layer(id)?;
        let pool_dev = self.require_active()?;
        // A layer half-removed by a crash must not be mounted.
        self.recover()?;
        let layer = self.layer(id)?;
        refuse_removing(&layer)?;
        if !how.readonly() {
            // Written from now on: its spares would not be its snapshots.
            self.drop_spares_of(id)?;
        }
        let name = self.name(Role::Thin(layer.thin_id));
        let fs_type = layer.fs_in(self.record());
        let (dev, activated) =
            self.activate_thin(pool_dev, layer.thin_id, layer.size_in(&self.rec).sectors())?;
        fault::point("mount.after_activation");
        let node = kernel::devnode(dev);
        let mut premount = None;
        if !activated {
            if mounts::mount_root(real)? == Some(dev) {
                return Ok((node, Action::AlreadyDone));
            }
            premount = self.premount_of(layer.thin_id, dev)?;
        }
        // Idle once a premount is given up: undone as if activated here.
        let mut activated = activated;
        if let Some(from) = premount {
            // The layer took a mounted spare: for the spare's own options,
            // its mount moves here (no mount(2), no journal replay).
            if spare::spare_use(how, fs_type) {
                match mounts::move_mount(&from, target) {
                    Ok(()) => {
                        fault::point("spare_take.after_move");
                        tracing::debug!(%id, from = %from.display(), "mounted by moving its spare's mount");
                        // Empty now; `pool recover` sweeps it if this fails.
                        let _ = fs::remove_dir(&from);
                        return Ok((node, Action::Done));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not move a spare's mount; mounting afresh");
                    }
                }
            }
            self.release_spare_mount(layer.thin_id)?;
            activated = true;
        }
        if let Err(e) = mounts::mount(&node, target, fs_type, how) {
            if activated {
                if let Err(undo) = self.kernel()?.remove(&name) {
                    return Err(Error::Rollback {
                        error: Box::new(e),
                        undo: Box::new(undo),
                    });
                }
            }
            return Err(e);
        }
        fault::point("mount.after_mount");
        Ok((node, Action::Done))
    }

    /// Activates layer `id`'s thin device without mounting it (for a
    /// caller that mounts it itself, e.g. containerd through the
    /// snapshotter); already active is fine. Returns the device node.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::PoolInactive`], kernel errors.
    pub fn activate_layer(&mut self, id: &str) -> Result<PathBuf> {
        self.layer(id)?;
        let pool_dev = self.require_active()?;
        // A layer half-removed by a crash must not be activated.
        self.recover()?;
        let layer = self.layer(id)?;
        // The caller may write it: its spares would not be its snapshots.
        self.drop_spares_of(id)?;
        // The caller mounts the device itself: a mount kept from the spare
        // it took (see `spare`) is given up.
        self.release_spare_mount(layer.thin_id)?;
        let (dev, _) =
            self.activate_thin(pool_dev, layer.thin_id, layer.size_in(&self.rec).sectors())?;
        Ok(kernel::devnode(dev))
    }

    /// What tearing layer `id` down takes, for a caller that runs it
    /// after giving up the root's lock ([`Teardown::run`]): `dirs`
    /// unmounted (no trim), then the layer's device removed if nothing
    /// else mounts it. A server does this so that the slow kernel work
    /// (a journal commit, `DM_DEV_REMOVE`) does not hold its requests up.
    /// The caller keeps the layer's other users out until it has run.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], record errors.
    pub fn teardown_of(&self, id: &str, dirs: Vec<PathBuf>) -> Result<Teardown> {
        let layer = self.layer(id)?;
        Ok(Teardown {
            device: self.name(Role::Thin(layer.thin_id)),
            dirs,
        })
    }

    /// Tears down layer `id`'s thin device if it is active and nothing
    /// mounts it; returns whether it removed it. A mounted device stays.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::Busy`] (held open), kernel errors.
    pub fn deactivate_layer(&mut self, id: &str) -> Result<bool> {
        let layer = self.layer(id)?;
        if self.pool_device()?.is_none() {
            return Ok(false);
        }
        let name = self.name(Role::Thin(layer.thin_id));
        let kernel = self.kernel()?;
        match kernel.mounted(&name)? {
            Some((_, points)) if points.is_empty() => {
                kernel.remove(&name)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The thin id and dm name of the device `dev` when it is one of this
    /// pool's thin devices.
    ///
    /// # Errors
    /// Kernel errors.
    fn thin_of_device(
        &mut self,
        dev: devicemapper::Device,
    ) -> Result<Option<(u32, devicemapper::DmNameBuf)>> {
        let Some(name) = self.kernel()?.name_of(dev)? else {
            return Ok(None);
        };
        Ok(
            match names::parse_role(&self.record().pool_id, &name.to_string()) {
                Some(Role::Thin(thin_id)) => Some((thin_id, name)),
                _ => None,
            },
        )
    }

    /// Unmounts a layer (every mount of it) given its id, or one mount
    /// given its directory, trimming each writable filesystem first (its
    /// freed blocks go back to the pool); the layer's device is torn down
    /// once nothing mounts it. Returns the directories unmounted.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`] when `target` is neither a layer nor a
    /// mount of this pool; [`Error::Busy`].
    pub fn umount(&mut self, target: &str) -> Result<Vec<PathBuf>> {
        self.umount_with(target, Trim::Before)
    }

    /// [`Pool::umount`], with the trim chosen by the caller. A caller whose
    /// layers are removed, not kept, skips it: a removal gives every block
    /// back anyway, and a trim walks the whole free space of the
    /// filesystem (about 0.4 s for a 512 MiB ext4 in the VM, most of a
    /// Docker `Put`).
    ///
    /// # Errors
    /// As [`Pool::umount`].
    pub fn umount_with(&mut self, target: &str, trim: Trim) -> Result<Vec<PathBuf>> {
        let by_id =
            names::check_id("layer", target).is_ok() && self.layout().layer_record(target).exists();
        // No listing of every device or mount: both grow with every
        // snapshot in use, and a container engine unmounts once per
        // container.
        let (selected, dirs): (Vec<_>, Vec<PathBuf>) = if by_id {
            let thin_id = self.layer(target)?.thin_id;
            let name = self.name(Role::Thin(thin_id));
            match self.kernel()?.mounted(&name)? {
                Some((_, points)) => (vec![(thin_id, name)], points),
                None => (Vec::new(), Vec::new()),
            }
        } else {
            let dir =
                fs::canonicalize(target).map_err(|_| Error::UnknownLayer(target.to_owned()))?;
            let Some(dev) = mounts::mount_root(&dir)? else {
                return Err(Error::InvalidArgument(format!(
                    "{} is not mounted; `thinlayer layer ls` shows the layers' mounts",
                    dir.display()
                )));
            };
            let Some(thin) = self.thin_of_device(dev)? else {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a layer of this pool; unmount it with umount(8)",
                    dir.display()
                )));
            };
            (vec![thin], vec![dir])
        };
        let spares = self.real_spares_dir()?;
        for d in dirs.iter().rev() {
            match trim {
                Trim::Before => {
                    crate::space::trim_before_umount(d);
                    mounts::umount(d)?;
                }
                Trim::Skip => mounts::umount(d)?,
                Trim::Discard => self.detached.extend(mounts::detach_discarding(d)?),
            }
            if d.parent() == Some(spares.as_path()) {
                // A taken spare's mount, never used: its directory goes.
                let _ = fs::remove_dir(d);
            }
        }
        fault::point("umount.after_umount");
        if !self.teardown_later {
            // The device goes now: its detached filesystems first.
            self.detached.clear();
        }
        for (thin_id, name) in selected {
            if self
                .kernel()?
                .mounted(&name)?
                .is_some_and(|(_, p)| !p.is_empty())
            {
                continue;
            }
            if self.teardown_later {
                self.idle.insert(thin_id);
            } else {
                self.kernel()?.remove(&name)?;
            }
        }
        Ok(dirs)
    }
}

/// Whether an unmount trims the filesystem first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trim {
    /// FITRIM before unmounting: blocks the filesystem freed go back to
    /// the pool (and the host) now.
    Before,
    /// No trim: for layers whose blocks a removal gives back.
    Skip,
    /// The layer is removed next: nothing is written back at all. The
    /// filesystem leaves the mount tree at once ([`mounts::detach_discarding`];
    /// of several mounts, only at the last); under `teardown_later` the
    /// rest of the unmount waits in [`Pool::take_detached`] for the
    /// caller's idle time, else it is done before the call returns.
    Discard,
}

/// A layer's unmounts and device removal, planned under the root's lock
/// ([`Pool::teardown_of`]) and run without it: only the kernel is asked,
/// no record changes, so a crash half-way leaves what a recovery or the
/// next teardown finishes.
#[derive(Debug)]
pub struct Teardown {
    device: devicemapper::DmNameBuf,
    dirs: Vec<PathBuf>,
}

impl Teardown {
    /// Unmounts the directories that are mounted, measures what the device
    /// maps (own and shared bytes, after the unmounts' last writes), and
    /// removes the device unless something still mounts it. Returns the
    /// measure (`None`: the device was not active).
    ///
    /// # Errors
    /// [`Error::Busy`] (a process under a directory, or holding the
    /// device), kernel errors: what was done stays done.
    pub fn run(&self) -> Result<Option<u64>> {
        for d in &self.dirs {
            if mounts::is_mountpoint(d)? {
                mounts::umount(d)?;
            }
        }
        let kernel = kernel::Kernel::open()?;
        let Some((_, points)) = kernel.mounted(&self.device)? else {
            return Ok(None);
        };
        let mapped = kernel.thin_mapped_bytes(&self.device)?;
        if points.is_empty() {
            kernel.remove(&self.device)?;
        }
        Ok(mapped)
    }
}
