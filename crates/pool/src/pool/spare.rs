//! Snapshots provisioned ahead of demand ("spares").
//!
//! A container's start path is a snapshot of a committed layer, its
//! activation and a mount. The first two are kernel work: a pool message
//! with its metadata commit, then a table load (about 20 ms in the VM,
//! more than the mount). `layer provision P` does both while nobody waits:
//! it makes snapshots of P, activates them and lists them in the pool
//! record. `layer create X --parent P` then takes a spare and writes only
//! records; the mount finds its device ready.
//!
//! A mounted spare (`layer provision P --mounted`) also has its filesystem
//! mounted, with the options of a container's root
//! ([`MountUse::Container`]), at `ROOT/spares/THIN_ID`. `ROOT/spares` is a
//! tmpfs only root can enter, made a private mount: the kernel moves
//! (`MS_MOVE`) only a mount whose parent is not shared. The layer that
//! takes such a spare is "premounted": its device is mounted at its spare
//! directory, which no record says. The kernel's mountinfo is the truth,
//! so nothing can disagree after a crash: [`Pool::mount_layer`] for the
//! same options moves that mount to the target (no mount(2), no journal
//! replay), for other options unmounts it and mounts as usual; every other
//! verb that needs the device unmounted (`umount`, `layer rm`, the device
//! for a caller that mounts it itself, `pool deactivate`) unmounts it
//! first. The `mounted` flag of a listed spare says what is wanted, not
//! what is: a pool deactivate unmounts every spare and the next provision
//! mounts them again.
//!
//! A spare is P as it was when provisioned, so any later write to P makes
//! it stale: P's spares are dropped (thin ids deleted) whenever P is
//! activated for writing or removed, and P is only provisioned while
//! nothing can write it: inactive, or held by nothing but a filesystem
//! mounted read-only (its superblock, not just one mount: a read-only
//! template other layers are made from, for one). The snapshot of an
//! active P suspends it for the moment of the `create_snap`.
//!
//! Transactions as for layers. Provision: intent -> `create_snap` ->
//! activation -> (mount) -> the pool record lists the spare (the commit
//! point, the same write that clears the intent); recovery rolls it back
//! (unmount, delete). Mounting a kept spare: the flag recorded -> mount;
//! a crash in between leaves a listed spare that is simply not mounted.
//! Drop: the list loses them with the intent -> unmounted -> devices
//! removed, thin ids deleted -> intent cleared; recovery finishes it.
//! Deleting a thin id always unmounts its spare directory first
//! ([`Pool::release_spare_mount`]), so every recovery that deletes one
//! unmounts it too; `pool recover` unmounts any spare mount that neither
//! the list nor a layer names, and deletes its thin id.
//!
//! What must never happen: a spare handed out after its parent was
//! written; a spare's thin id in two places (the list and a layer record);
//! a spare's mount reachable by anyone but root, or moved anywhere but a
//! mount of its own layer.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    error::{Error, IoContext, Result},
    fault, kernel,
    mounts::{self, MountEntry, MountUse},
    names::Role,
    pool::{Pending, Pool, Spare},
    records::FsType,
};

/// What `layer provision` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Provisioned {
    /// Spares made now.
    pub made: usize,
    /// Spares that were there and are kept (activated again if needed).
    pub kept: usize,
    /// Spares dropped because fewer were asked for.
    pub dropped: usize,
    /// Spares whose filesystem this call mounted (made or kept).
    pub mounted: usize,
}

/// A spare as `layer ls` and `pool status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct SpareInfo {
    /// The layer it is a snapshot of (`None`: the base device).
    pub parent: Option<String>,
    /// Its thin id.
    pub thin_id: u32,
    /// Whether it is to be kept mounted (`provision --mounted`).
    pub mounted: bool,
    /// Its device node while active.
    pub devnode: Option<PathBuf>,
    /// Where it is mounted (`ROOT/spares/THIN_ID`), if it is.
    pub mountpoint: Option<PathBuf>,
    /// Bytes its thin device maps, all shared with its parent until taken
    /// (only while active).
    pub mapped_bytes: Option<u64>,
}

/// A spare's mount, planned under the root's lock
/// ([`Pool::provision_one_mount_later`]) and made without it.
#[derive(Debug)]
pub struct SpareMount {
    thin_id: u32,
    devnode: PathBuf,
    dir: PathBuf,
    fs: FsType,
}

impl SpareMount {
    /// The spare's thin id.
    pub fn thin_id(&self) -> u32 {
        self.thin_id
    }

    /// Mounts the spare at `ROOT/spares/THIN_ID` (a directory only root
    /// can enter, in the private tmpfs the plan made ready), with a
    /// container root's options.
    ///
    /// # Errors
    /// Mount and I/O errors: the spare stays listed, unmounted (a taker
    /// mounts it as usual).
    pub fn run(&self) -> Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).ctx(|| format!("create {}", self.dir.display()));
            }
            _ => {}
        }
        check_private_dir(&self.dir)?;
        // A crash here or before leaves the states `keep_spares`' mounted
        // path has at `spare_mount.*` (listed, flagged, mounted or not),
        // which the crash walk covers: no points of its own.
        mounts::mount(&self.devnode, &self.dir, self.fs, MountUse::Container)?;
        Ok(())
    }
}

/// Which spares a provision mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mounting {
    /// None it was not asked to keep mounted before.
    None,
    /// Every spare of the parent, new ones as they are made.
    Now,
    /// New ones are listed to be mounted; the caller mounts them.
    Later,
}

/// Whether a mount for `how` of a filesystem `fs` has exactly a spare's
/// flags and options, so a spare's mount can simply be moved there.
pub(crate) fn spare_use(how: MountUse, fs: FsType) -> bool {
    let spare = MountUse::Container;
    how.flags() == spare.flags() && how.options(fs) == spare.options(fs)
}

impl Pool {
    /// The spares of `parent` (`None`: the base device), oldest first.
    pub fn spares_of(&self, parent: Option<&str>) -> Vec<u32> {
        self.record()
            .spares
            .iter()
            .filter(|s| s.parent.as_deref() == parent)
            .map(|s| s.thin_id)
            .collect()
    }

    /// The spares of `parent` kept mounted (`mounted`) or not, oldest
    /// first.
    pub fn spares_kept(&self, parent: Option<&str>, mounted: bool) -> Vec<u32> {
        self.record()
            .spares
            .iter()
            .filter(|s| s.parent.as_deref() == parent && s.mounted == mounted)
            .map(|s| s.thin_id)
            .collect()
    }

    /// Keeps `count` active spares of `parent` (`None`: the base device):
    /// makes the missing ones, activates kept ones the kernel lost (a pool
    /// deactivate tears them down), drops any beyond `count`. Kept spares
    /// that were provisioned mounted are mounted again if they are not.
    ///
    /// # Errors
    /// [`Error::UnknownLayer`], [`Error::Busy`] (the parent is active and
    /// not just mounted read-only, so it may be written), [`Error::NoSpace`],
    /// kernel errors.
    pub fn provision(&mut self, parent: Option<&str>, count: usize) -> Result<Provisioned> {
        self.keep_spares(parent, count, Mounting::None)
    }

    /// As [`Pool::provision`], with every spare of `parent` mounted at
    /// `ROOT/spares/THIN_ID` (as [`MountUse::Container`] mounts): new
    /// ones are made mounted, kept unmounted ones get mounted. A layer
    /// made from one then mounts by a move of that mount.
    ///
    /// # Errors
    /// As [`Pool::provision`]; mount errors (a spare whose mount fails is
    /// not listed).
    pub fn provision_mounted(&mut self, parent: Option<&str>, count: usize) -> Result<Provisioned> {
        self.keep_spares(parent, count, Mounting::Now)
    }

    /// [`Pool::provision`], [`Pool::provision_mounted`] and
    /// [`Pool::provision_one_mount_later`]: `mounting` says which spares
    /// of `parent` are mounted, and when.
    fn keep_spares(
        &mut self,
        parent: Option<&str>,
        count: usize,
        mounting: Mounting,
    ) -> Result<Provisioned> {
        let mount = mounting == Mounting::Now;
        let (origin, sectors, fs) = match parent {
            Some(p) => {
                let l = self.layer(p)?;
                super::layer::refuse_removing(&l)?;
                (
                    l.thin_id,
                    l.size_in(self.record()).sectors(),
                    l.fs_in(self.record()),
                )
            }
            None => (
                self.record().base_thin_id,
                self.record().base_size.sectors(),
                self.record().fs,
            ),
        };
        let pool_dev = self.require_active()?;
        self.recover()?;
        let mut report = Provisioned::default();
        let have = self.spares_of(parent);
        if have.len() > count {
            report.dropped = have.len() - count;
            self.drop_spares(have[count..].to_vec())?;
        }
        let what = parent.map_or("the base device".to_owned(), |p| format!("layer `{p}`"));
        let origin_name = self.name(Role::Thin(origin));
        if have.len() < count && parent.is_some() && self.release_spare_mount(origin)? {
            // The parent took a mounted spare and was never mounted since:
            // that mount is nobody's work, and its device goes with it.
            self.kernel()?.remove_if_present(&origin_name)?;
        }
        if have.len() < count && self.kernel()?.device(&origin_name)?.is_some() {
            // Mounted read-only and held by nothing else: nothing writes it.
            if !self.kernel()?.held_read_only(&origin_name)? {
                return Err(Error::Busy {
                    what,
                    detail: "it is active and not just mounted read-only, so it may be written, \
                             and a spare must stay what its parent is; unmount it (`thinlayer \
                             umount`) and provision again"
                        .into(),
                });
            }
        }
        let kept: Vec<u32> = have.iter().take(count).copied().collect();
        let flagged = |rec: &super::PoolRecord, t: u32| {
            rec.spares.iter().any(|s| s.thin_id == t && s.mounted)
        };
        if mount && kept.iter().any(|&t| !flagged(&self.rec, t)) {
            // The wish first: a crash before the mount leaves a listed
            // spare that is not mounted, which is just a spare.
            for s in self
                .rec
                .spares
                .iter_mut()
                .filter(|s| kept.contains(&s.thin_id))
            {
                s.mounted = true;
            }
            self.write_record()?;
            fault::point("spare_mount.after_record");
        }
        let wants_mounts = count > 0 && (mount || kept.iter().any(|&t| flagged(&self.rec, t)));
        let at = if wants_mounts {
            self.spares_dir_ready()?
        } else {
            PathBuf::new()
        };
        for &thin_id in &kept {
            let (dev, _) = self.activate_thin(pool_dev, thin_id, sectors)?;
            if flagged(&self.rec, thin_id) && self.mount_spare(thin_id, dev, fs, &at)? {
                fault::point("spare_mount.after_mount");
                report.mounted += 1;
            }
            report.kept += 1;
        }
        for _ in have.len().min(count)..count {
            self.check_space()?;
            let thin_id = self.record().next_thin_id;
            kernel::ThinId::new(thin_id)?;
            self.begin(Pending::ProvisionSpare {
                parent: parent.map(str::to_owned),
                thin_id,
            })?;
            fault::point("spare_provision.after_intent");
            let fs = mount.then_some((fs, at.as_path()));
            if let Err(e) = self.make_spare(pool_dev, thin_id, origin, sectors, fs) {
                // Nothing was listed: forget the intent (the id stays used).
                self.commit()?;
                return Err(e);
            }
            self.rec.spares.push(Spare {
                parent: parent.map(str::to_owned),
                thin_id,
                // Later: listed as to be mounted, so a crash before the
                // caller's mount leaves a spare the next provision mounts.
                mounted: mounting != Mounting::None,
            });
            self.commit()?;
            report.made += 1;
            report.mounted += usize::from(mount);
        }
        Ok(report)
    }

    /// The kernel steps of one new spare: the snapshot, its activation
    /// and, given `fs`, its mount; a failed step deletes the thin id again.
    fn make_spare(
        &mut self,
        pool_dev: devicemapper::Device,
        thin_id: u32,
        origin: u32,
        sectors: u64,
        mount: Option<(FsType, &Path)>,
    ) -> Result<()> {
        self.snapshot_thin(thin_id, origin)?;
        fault::point("spare_provision.after_snapshot");
        let dev = match self.activate_thin(pool_dev, thin_id, sectors) {
            Ok((dev, _)) => dev,
            Err(e) => return Err(self.undo_thin(thin_id, e)),
        };
        fault::point("spare_provision.after_activation");
        if let Some((fs, at)) = mount {
            if let Err(e) = self.mount_spare(thin_id, dev, fs, at) {
                return Err(self.undo_thin(thin_id, e));
            }
            fault::point("spare_provision.after_mount");
        }
        Ok(())
    }

    /// `ROOT/spares` as mountinfo shows it (the root's real path).
    ///
    /// # Errors
    /// I/O errors resolving the root.
    pub(crate) fn real_spares_dir(&self) -> Result<PathBuf> {
        let root = &self.layout().root;
        let real = fs::canonicalize(root).ctx(|| format!("resolve {}", root.display()))?;
        Ok(real.join("spares"))
    }

    /// Makes `ROOT/spares` ready for mounts: a directory (0700, root's,
    /// never a symlink) with a private tmpfs on it (see
    /// [`mounts::mount_private_tmpfs`]). Returns its real path.
    fn spares_dir_ready(&self) -> Result<PathBuf> {
        let dir = self.real_spares_dir()?;
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).ctx(|| format!("create {}", dir.display()));
            }
            _ => {}
        }
        check_private_dir(&dir)?;
        if !mounts::is_mountpoint(&dir)? {
            mounts::mount_private_tmpfs(&dir)?;
            check_private_dir(&dir)?;
        }
        Ok(dir)
    }

    /// Mounts spare `thin_id` (device `dev`, a filesystem of `fs`) at
    /// `ROOT/spares/THIN_ID` unless it is mounted there already; says
    /// whether it mounted it.
    fn mount_spare(
        &mut self,
        thin_id: u32,
        dev: devicemapper::Device,
        fs: FsType,
        spares: &Path,
    ) -> Result<bool> {
        let dir = spares.join(thin_id.to_string());
        if mounts::mount_root(&dir)? == Some(dev) {
            return Ok(false);
        }
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).ctx(|| format!("create {}", dir.display()));
            }
            _ => {}
        }
        check_private_dir(&dir)?;
        mounts::mount(&kernel::devnode(dev), &dir, fs, MountUse::Container)?;
        Ok(true)
    }

    /// Thin id `thin_id`'s spare directory when device `dev` is mounted
    /// there: the mount a spare kept and a layer that took it may move.
    ///
    /// # Errors
    /// I/O errors resolving the root or inspecting the directory.
    pub(crate) fn premount_of(
        &self,
        thin_id: u32,
        dev: devicemapper::Device,
    ) -> Result<Option<PathBuf>> {
        let want = self.real_spares_dir()?.join(thin_id.to_string());
        Ok((mounts::mount_root(&want)? == Some(dev)).then_some(want))
    }

    /// Unmounts thin id `thin_id`'s spare directory if something is
    /// mounted there, and removes the directory; says whether it
    /// unmounted. One `stat` when there is none: every deletion of a thin
    /// id calls it.
    ///
    /// # Errors
    /// [`Error::Busy`] (a process works inside it), I/O errors.
    pub(crate) fn release_spare_mount(&mut self, thin_id: u32) -> Result<bool> {
        let dir = self.layout().spare_mount(thin_id);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            r => r.ctx(|| format!("inspect {}", dir.display()))?,
        };
        let real = self.real_spares_dir()?.join(thin_id.to_string());
        let mut unmounted = false;
        while mounts::is_mountpoint(&real)? {
            mounts::umount(&real)?;
            unmounted = true;
        }
        match fs::remove_dir(&real) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %real.display(), error = %e, "could not remove a spare's directory");
            }
            _ => {}
        }
        Ok(unmounted)
    }

    /// Unmounts everything under `ROOT/spares` (spares and the mounts of
    /// layers that took one and were not mounted since) and then its
    /// tmpfs, for `pool deactivate`: none of them holds a user's work.
    /// `all` is mountinfo. Returns how many spare mounts it unmounted.
    ///
    /// # Errors
    /// [`Error::Busy`] when a process works inside a spare (only root
    /// can), I/O errors.
    pub(crate) fn unmount_spares_dir(&self, all: &[MountEntry]) -> Result<usize> {
        if !self.layout().spares_dir().exists() {
            return Ok(0);
        }
        let dir = self.real_spares_dir()?;
        let mut n = 0;
        for m in all.iter().rev() {
            if m.mountpoint.parent() == Some(dir.as_path()) {
                mounts::umount(&m.mountpoint)?;
                n += 1;
            }
        }
        for m in all.iter().rev().filter(|m| m.mountpoint == dir) {
            mounts::detach(&m.mountpoint)?;
        }
        Ok(n)
    }

    /// Unmounts the spare mounts under `ROOT/spares` that neither a listed
    /// spare nor a record in `known` (layer and trashed thin ids) names,
    /// deleting their thin ids (only a spare is ever mounted there), and
    /// removes the empty directories. For `pool recover`: says what it
    /// did.
    ///
    /// # Errors
    /// Kernel and I/O errors.
    pub(crate) fn sweep_spare_mounts(&mut self, known: &BTreeSet<u32>) -> Result<Vec<String>> {
        let mut said = Vec::new();
        if !self.layout().spares_dir().exists() {
            return Ok(said);
        }
        let dir = self.real_spares_dir()?;
        let listed: BTreeSet<u32> = self.record().spares.iter().map(|s| s.thin_id).collect();
        let all = mounts::all()?;
        let mut orphans = BTreeSet::new();
        for m in all
            .iter()
            .filter(|m| m.mountpoint.parent() == Some(dir.as_path()))
        {
            let id = m
                .mountpoint
                .file_name()
                .and_then(|n| n.to_str()?.parse::<u32>().ok());
            match id {
                Some(t) if listed.contains(&t) || known.contains(&t) => {}
                Some(t) if !self.record().backing.is_foreign(t) => {
                    orphans.insert(t);
                }
                _ => {
                    mounts::umount(&m.mountpoint)?;
                    said.push(format!(
                        "unmounted {}, which is no spare",
                        m.mountpoint.display()
                    ));
                }
            }
        }
        for t in orphans {
            self.release_spare_mount(t)?;
            self.delete_thins(&[t], true)?;
            said.push(format!(
                "unmounted and deleted spare thin id {t}, which no record lists"
            ));
        }
        let entries = fs::read_dir(&dir).ctx(|| format!("list {}", dir.display()))?;
        for e in entries.flatten() {
            // Left empty by a move, or by a crash: rmdir refuses a mount
            // point, and a listed spare's directory is made again.
            let _ = fs::remove_dir(e.path());
        }
        Ok(said)
    }

    /// Every listed spare with its kernel state (device, mount, mapped
    /// bytes), oldest first.
    ///
    /// # Errors
    /// Kernel and I/O errors.
    pub fn spare_infos(&mut self) -> Result<Vec<SpareInfo>> {
        let spares = self.record().spares.clone();
        let mut out = Vec::with_capacity(spares.len());
        if spares.is_empty() {
            return Ok(out);
        }
        let active = self.pool_device()?.is_some();
        let all = if active { mounts::all()? } else { Vec::new() };
        let dir = self.real_spares_dir()?;
        for s in spares {
            let mut info = SpareInfo {
                parent: s.parent,
                thin_id: s.thin_id,
                mounted: s.mounted,
                devnode: None,
                mountpoint: None,
                mapped_bytes: None,
            };
            if active {
                let name = self.name(Role::Thin(s.thin_id));
                let kernel = self.kernel()?;
                if let Some(dev) = kernel.device(&name)? {
                    info.devnode = Some(kernel::devnode(dev));
                    let at = dir.join(s.thin_id.to_string());
                    info.mountpoint = all
                        .iter()
                        .find(|m| m.device == dev && m.mountpoint == at)
                        .map(|m| m.mountpoint.clone());
                    info.mapped_bytes = kernel.thin_mapped_bytes(&name)?;
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Tears down every spare's device (unmounting mounted ones), keeping
    /// the spares listed (for a server that stops: `provision` activates
    /// and mounts them again). Returns how many devices it removed.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn rest_spares(&mut self) -> Result<usize> {
        let ids: Vec<u32> = self.record().spares.iter().map(|s| s.thin_id).collect();
        let mut n = 0;
        for thin_id in ids {
            self.release_spare_mount(thin_id)?;
            let name = self.name(Role::Thin(thin_id));
            if self.kernel()?.remove_if_present(&name)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Takes the oldest spare of `parent` off the list (in memory; the
    /// caller's intent write makes it durable).
    pub(crate) fn take_spare(&mut self, parent: Option<&str>) -> Option<Spare> {
        let held = &self.held;
        let spares = &mut self.rec.spares;
        let at = spares
            .iter()
            .position(|s| s.parent.as_deref() == parent && !held.contains(&s.thin_id))?;
        Some(spares.remove(at))
    }

    /// Keeps spares `thin_ids` from being handed out by this handle: a
    /// caller mounts them without the lock ([`SpareMount::run`]).
    pub fn hold_spares(&mut self, thin_ids: impl IntoIterator<Item = u32>) {
        self.held.extend(thin_ids);
    }

    /// One more spare of layer `parent` (as [`Pool::provision`] makes it:
    /// snapshot, activation, listed) and flagged to be mounted, its mount
    /// left to the caller ([`SpareMount::run`], without the lock: a mount
    /// costs a journal replay's reads, the slowest step of a spare). Until
    /// it has run the caller holds the spare ([`Pool::hold_spares`] on
    /// every handle it opens); a crash before the mount leaves a listed
    /// spare that is simply not mounted.
    ///
    /// # Errors
    /// As [`Pool::provision`].
    pub fn provision_one_mount_later(&mut self, parent: &str) -> Result<SpareMount> {
        let had = self.spares_of(Some(parent));
        self.keep_spares(Some(parent), had.len() + 1, Mounting::Later)?;
        let thin_id = self
            .spares_of(Some(parent))
            .into_iter()
            .find(|t| !had.contains(t))
            .ok_or_else(|| {
                Error::Inconsistent(format!("no new spare of layer `{parent}` is listed"))
            })?;
        let fs = self.layer(parent)?.fs_in(self.record());
        let spares = self.spares_dir_ready()?;
        let name = self.name(Role::Thin(thin_id));
        let dev = self.kernel()?.device(&name)?.ok_or_else(|| {
            Error::Inconsistent(format!("spare {thin_id}'s device {} is not active", &*name))
        })?;
        Ok(SpareMount {
            thin_id,
            devnode: kernel::devnode(dev),
            dir: spares.join(thin_id.to_string()),
            fs,
        })
    }

    /// Drops every spare of layer `id`: it is about to be written or
    /// removed. A no-op (no I/O) when it has none.
    ///
    /// # Errors
    /// Record and kernel errors.
    pub(crate) fn drop_spares_of(&mut self, id: &str) -> Result<()> {
        let ids = self.spares_of(Some(id));
        self.drop_spares(ids)
    }

    /// Drops the spares `thin_ids`: off the list with the intent, then
    /// their mounts, devices and thin ids.
    fn drop_spares(&mut self, thin_ids: Vec<u32>) -> Result<()> {
        if thin_ids.is_empty() {
            return Ok(());
        }
        self.require_active()?;
        self.rec.spares.retain(|s| !thin_ids.contains(&s.thin_id));
        self.begin(Pending::DropSpares {
            thin_ids: thin_ids.clone(),
        })?;
        fault::point("spare_drop.after_intent");
        for &t in &thin_ids {
            self.release_spare_mount(t)?;
        }
        fault::point("spare_drop.after_umount");
        self.delete_thins(&thin_ids, false)?;
        fault::point("spare_drop.after_delete");
        self.commit()
    }
}

/// Refuses `dir` unless it is a real directory (not a symlink), this
/// process's user's, with no group or other bits: the spares' mounts hold
/// every image's files.
fn check_private_dir(dir: &Path) -> Result<()> {
    let m = fs::symlink_metadata(dir).ctx(|| format!("inspect {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !m.file_type().is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
        return Err(Error::Inconsistent(format!(
            "{} must be a directory only root can enter (mode 0700, not a symlink); \
             remove it and provision again",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_recorded_before_mounted_spares_loads_unmounted() {
        let old: Spare = serde_json::from_str(r#"{"parent":"a","thin_id":7}"#).unwrap();
        assert_eq!(
            old,
            Spare {
                parent: Some("a".into()),
                thin_id: 7,
                mounted: false
            }
        );
        let new: Spare =
            serde_json::from_str(r#"{"parent":null,"thin_id":8,"mounted":true}"#).unwrap();
        assert!(new.mounted && new.parent.is_none());
        let back = serde_json::to_value(&new).unwrap();
        assert_eq!(back["mounted"], true);
    }

    #[test]
    fn only_a_container_mount_moves_a_spare() {
        for fs in [FsType::Ext4, FsType::Xfs] {
            assert!(spare_use(MountUse::Container, fs));
            for other in [
                MountUse::ReadOnly,
                MountUse::Scratch,
                MountUse::ReadOnlyScratch,
                MountUse::Frozen,
            ] {
                assert!(!spare_use(other, fs), "{other:?} {fs:?}");
            }
        }
    }
}
