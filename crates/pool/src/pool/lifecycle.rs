//! Bringing the pool up and down: loop, linear and thin-pool devices from
//! the record (`pool activate`, and the tail of `pool create`), torn down
//! in reverse (`pool deactivate`); the metadata checked with `thin_check`
//! before every activation; leftovers of an interrupted `pool create`.
//!
//! Activation is idempotent: leftovers of an activation that died half-way
//! are removed first, and any operation a crash interrupted is settled
//! ([`Pool::recover`]) once the pool is up.
//!
//! What must never happen: a pool activated on metadata `thin_check`
//! refuses; a device torn down while a layer of the pool is mounted; an
//! adopted pool started or stopped by thinlayer.

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
};

use super::{Action, Pool};
use crate::{
    blockdev::{self, DeviceRole},
    cmd::Tool,
    error::{Error, IoContext, Result},
    fault,
    kernel::{Kernel, PoolSpec, Sectors},
    loopback, mounts,
    names::{self, Role},
    records::{Backing, Layout, Pending, PoolRecord, Record, file},
};

/// The fault points [`Pool::start_pool`] passes, for create or activate.
pub(super) struct StartPoints {
    loops: &'static str,
    meta: &'static str,
    data: &'static str,
    pool: &'static str,
}

pub(super) const CREATE_POINTS: StartPoints = StartPoints {
    loops: "pool_create.after_loops",
    meta: "pool_create.after_meta_linear",
    data: "pool_create.after_data_linear",
    pool: "pool_create.after_pool",
};

const ACTIVATE_POINTS: StartPoints = StartPoints {
    loops: "pool_activate.after_loops",
    meta: "pool_activate.after_meta_linear",
    data: "pool_activate.after_data_linear",
    pool: "pool_activate.after_pool",
};

/// The record under `layout` if it is the intent of a `pool create` that
/// never finished; `None` for a finished pool or an unreadable record.
pub(crate) fn interrupted_create(layout: &Layout) -> Option<PoolRecord> {
    let rec: PoolRecord = PoolRecord::load(&layout.pool_record()).ok()?;
    (rec.pending == Some(Pending::CreatePool)).then_some(rec)
}

/// Removes what an interrupted `pool create` of `rec` left: every dm device
/// of its pool id (thins first), the two files, and last its record. Safe
/// only for a record in the [`Pending::CreatePool`] state: nothing under it
/// was ever handed to a user. Returns what it removed.
pub(crate) fn clear_interrupted_create(
    kernel: &Kernel,
    layout: &Layout,
    rec: &PoolRecord,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut present: Vec<String> = kernel
        .names_with_prefix(&names::name_prefix(&rec.pool_id))?
        .into_iter()
        .collect();
    // Thins before the pool, the pool before the linear devices under it.
    present.sort_by_key(|n| match names::parse_role(&rec.pool_id, n) {
        Some(Role::Thin(_)) | None => 0,
        Some(Role::Pool) => 1,
        Some(Role::Data) | Some(Role::Meta) => 2,
    });
    for name in present {
        let n = devicemapper::DmNameBuf::new(name.clone()).expect("valid: listed by the kernel");
        if kernel.remove_if_present(&n)? {
            removed.push(format!("device {name}"));
        }
    }
    match &rec.backing {
        Backing::Files => {
            for f in [layout.data_file(), layout.metadata_file()] {
                if f.exists() {
                    file::remove(&f)?;
                    removed.push(format!("file {}", f.display()));
                }
            }
        }
        Backing::Devices { data, metadata } => {
            // Labels written by the create: the devices go back to free.
            for (role, r) in [(DeviceRole::Data, data), (DeviceRole::Metadata, metadata)] {
                if let Ok(dev) = blockdev::find(&rec.pool_id, role, r) {
                    blockdev::clear_label(&dev.node)?;
                    removed.push(format!("the label on {}", dev.node.display()));
                }
            }
        }
        Backing::Adopted { pool_name, .. } => {
            // The base thin id, if the create got that far; never another.
            let pool = devicemapper::DmNameBuf::new(pool_name.clone())
                .map_err(|e| Error::Inconsistent(format!("adopted pool name {pool_name}: {e}")))?;
            if kernel.device(&pool)?.is_some()
                && kernel
                    .pool_message(&pool, &format!("delete {}", rec.base_thin_id))
                    .is_ok()
            {
                removed.push(format!(
                    "thin id {} in {pool_name} (the base device)",
                    rec.base_thin_id
                ));
            }
        }
    }
    let _ = fs::remove_dir(layout.layers_dir());
    file::remove(&layout.pool_record())?;
    removed.push(format!("record {}", layout.pool_record().display()));
    Ok(removed)
}

/// Undo steps collected while creating a pool, run in reverse on failure.
pub(super) struct Undo<'a> {
    pub(super) kernel: &'a Kernel,
    pub(super) devices: Vec<devicemapper::DmNameBuf>,
    pub(super) files: Vec<PathBuf>,
    /// Block devices whose label this create wrote.
    pub(super) labels: Vec<PathBuf>,
}

impl Undo<'_> {
    pub(super) fn run(self, error: Error) -> Error {
        let mut failures = Vec::new();
        for name in self.devices.iter().rev() {
            if let Err(e) = self.kernel.remove_if_present(name) {
                failures.push(e.to_string());
            }
        }
        for node in self.labels.iter().rev() {
            if let Err(e) = blockdev::clear_label(node) {
                failures.push(e.to_string());
            }
        }
        for f in self.files.iter().rev() {
            if let Err(e) = fs::remove_file(f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    failures.push(format!("remove {}: {e}", f.display()));
                }
            }
        }
        if failures.is_empty() {
            error
        } else {
            Error::Rollback {
                error: Box::new(error),
                undo: Box::new(Error::Inconsistent(failures.join("; "))),
            }
        }
    }
}

/// Loop devices, linear devices and the thin-pool from the record.
/// `made` is told the name of each dm device as it is created.
pub(super) fn start_pool(
    kernel: &Kernel,
    layout: &Layout,
    rec: &PoolRecord,
    points: &StartPoints,
    mut made: impl FnMut(&devicemapper::DmName),
) -> Result<(devicemapper::Device, devicemapper::Device)> {
    let id = &rec.pool_id;
    let (meta_under, data_under, offset, loops) = match &rec.backing {
        Backing::Files => {
            let meta_loop = loopback::attach(&layout.metadata_file())?;
            let data_loop = loopback::attach(&layout.data_file())?;
            (
                meta_loop.device,
                data_loop.device,
                0,
                Some((meta_loop, data_loop)),
            )
        }
        Backing::Devices { data, metadata } => {
            let m = blockdev::find(id, DeviceRole::Metadata, metadata)?;
            let d = blockdev::find(id, DeviceRole::Data, data)?;
            for (dev, want, role) in [
                (&m, rec.metadata_size, "metadata"),
                (&d, rec.data_size, "data"),
            ] {
                if dev.usable() < want {
                    return Err(Error::Inconsistent(format!(
                        "the {role} device {} holds {} past its label but the pool uses {want}: \
                             it shrank; give it back its size (`lvextend`, or the disk image) and retry",
                        dev.node.display(),
                        dev.usable()
                    )));
                }
            }
            (m.device, d.device, blockdev::LABEL_SECTORS, None)
        }
        Backing::Adopted { pool_name, .. } => {
            return Err(Error::Inconsistent(format!(
                "the adopted pool {pool_name} is started by its owner, never by thinlayer"
            )));
        }
    };
    fault::point(points.loops);
    // The metadata's, then the data's linear device over what lies under it.
    let mut linear = |role: Role, under, size: crate::Bytes| -> Result<devicemapper::Device> {
        let name = names::dm_name(id, role);
        let dev = kernel.create_linear(
            &name,
            &names::dm_uuid(id, role),
            under,
            Sectors(offset),
            Sectors(size.sectors()),
        )?;
        made(&name);
        Ok(dev)
    };
    let meta = linear(Role::Meta, meta_under, rec.metadata_size)?;
    fault::point(points.meta);
    let data = linear(Role::Data, data_under, rec.data_size)?;
    fault::point(points.data);
    let pool_name = names::dm_name(id, Role::Pool);
    kernel.create_pool(
        &pool_name,
        &names::dm_uuid(id, Role::Pool),
        &pool_spec(rec, meta, data),
    )?;
    made(&pool_name);
    fault::point(points.pool);
    // The linear devices hold the loop devices open now; dropping our
    // handles leaves autoclear to detach them when the pool goes.
    drop(loops);
    Ok((meta, data))
}

/// The thin-pool table parameters for a record and its linear devices.
pub(crate) fn pool_spec(
    rec: &PoolRecord,
    meta: devicemapper::Device,
    data: devicemapper::Device,
) -> PoolSpec {
    let total = rec.data_size.blocks_of(rec.block_size);
    PoolSpec {
        meta,
        data,
        data_sectors: Sectors(total * rec.block_size.sectors()),
        block_sectors: Sectors(rec.block_size.sectors()),
        low_water_blocks: total * (100 - u64::from(rec.low_water_percent)) / 100,
        // A full pool fails writes at once instead of queueing them (the
        // anchors' hung containers); the engine then says how to extend.
        features: vec!["error_if_no_space".into()],
    }
}

/// Runs `thin_check` on a metadata file through a read-only loop device
/// (the tools open with `O_DIRECT`, which a tmpfs file refuses).
///
/// # Errors
/// [`Error::MetadataDamaged`] with thin_check's words.
pub fn check_metadata(file: &Path) -> Result<()> {
    let lp = loopback::attach_readonly(file)?;
    check_loop(&lp, file)
}

/// Runs `thin_check` on the metadata behind the loop device `lp`, naming
/// it `file` in the error.
pub(crate) fn check_loop(lp: &loopback::Loop, file: &Path) -> Result<()> {
    match Tool::ThinCheck.run(&["-q".as_ref(), lp.path.as_os_str()]) {
        Ok(_) => Ok(()),
        Err(Error::Tool { stderr, status, .. }) => Err(Error::MetadataDamaged {
            path: file.to_owned(),
            detail: if stderr.is_empty() { status } else { stderr },
        }),
        Err(e) => Err(e),
    }
}

impl Pool {
    /// Allocates a metadata file an older version left sparse, so a full
    /// host cannot fail a metadata write. Best effort: a host too full for
    /// it is warned about (`pool status` says so too), never fatal here.
    fn allocate_metadata(&self) {
        let file = self.layout.metadata_file();
        let r = OpenOptions::new()
            .write(true)
            .open(&file)
            .ctx(|| format!("open {}", file.display()))
            .and_then(|f| crate::space::allocate_file(&f, &file, self.rec.metadata_size));
        if let Err(e) = r {
            tracing::warn!("could not allocate the metadata file on the host: {e}");
        }
    }

    /// A read-only loop device over the pool's metadata (the file, or the
    /// metadata device past its label), for the tools, and the path that
    /// names the metadata in messages.
    ///
    /// # Errors
    /// [`Error::DeviceMissing`]; [`Error::Foreign`] for an adopted pool
    /// (its metadata is read through the live pool only); loop errors.
    pub(crate) fn metadata_loop(&self) -> Result<(loopback::Loop, PathBuf)> {
        match &self.rec.backing {
            Backing::Files => {
                let f = self.layout.metadata_file();
                Ok((loopback::attach_readonly(&f)?, f))
            }
            Backing::Devices { metadata, .. } => {
                let dev = blockdev::find(&self.rec.pool_id, DeviceRole::Metadata, metadata)?;
                let lp = loopback::attach_readonly_at(
                    &dev.node,
                    blockdev::LABEL_BYTES,
                    self.rec.metadata_size.0,
                )?;
                Ok((lp, dev.node))
            }
            Backing::Adopted { pool_name, .. } => Err(Error::Foreign {
                what: "its metadata can only be read while it is active".into(),
                pool: pool_name.clone(),
                hint: "bring it up the way its owner does (`lvchange -ay VG/POOL`), then retry"
                    .into(),
            }),
        }
    }

    /// Brings the pool's loop and dm devices back from the records, after
    /// `thin_check` passes on the metadata; then finishes any operation a
    /// crash interrupted.
    ///
    /// # Errors
    /// [`Error::MetadataDamaged`], environment and kernel errors.
    pub fn activate(&mut self) -> Result<Action> {
        self.forget_pool_device();
        if self.rec.pending == Some(Pending::CreatePool) {
            return Err(self.interrupted_create_error());
        }
        if self.pool_device()?.is_some() {
            self.recover()?;
            return Ok(Action::AlreadyDone);
        }
        if let Backing::Adopted { pool_name, .. } = &self.rec.backing {
            return Err(Error::Foreign {
                what: format!("{pool_name} is not active"),
                pool: pool_name.clone(),
                hint: "bring it up the way its owner does (`lvchange -ay VG/POOL` for LVM), \
                       then run `thinlayer pool activate` again"
                    .into(),
            });
        }
        // Leftovers of an activation that died half-way.
        let pool_id = self.rec.pool_id.clone();
        let kernel = self.kernel()?;
        for role in [Role::Data, Role::Meta] {
            kernel.remove_if_present(&names::dm_name(&pool_id, role))?;
        }
        fault::point("pool_activate.after_leftovers");
        if self.rec.backing.is_files() {
            check_metadata(&self.layout.metadata_file())?;
            self.allocate_metadata();
            // An extend that grew the files (and maybe the kernel's
            // metadata) but died before its record: build the tables from
            // the files.
            if self.reconcile_sizes()? {
                tracing::info!("adopted the data/metadata sizes an interrupted extend left");
            }
        } else {
            // (A device pool's extend writes its record first: the record
            // is never behind the kernel.)
            let (lp, node) = self.metadata_loop()?;
            check_loop(&lp, &node)?;
        }
        let kernel = self.kernel.as_ref().expect("opened above");
        let mut made = Vec::new();
        let started = start_pool(kernel, &self.layout, &self.rec, &ACTIVATE_POINTS, |n| {
            made.push(n.to_owned())
        });
        if let Err(e) = started {
            let undo = Undo {
                kernel,
                devices: made,
                files: Vec::new(),
                labels: Vec::new(),
            };
            return Err(undo.run(e));
        }
        self.recover()?;
        Ok(Action::Done)
    }

    /// Tears down every dm device of the pool and (by autoclear) its loop
    /// devices, keeping all data. Refuses while any layer is mounted; the
    /// mounts under `ROOT/spares` (mounted spares, and layers that took
    /// one and were not mounted since) are nobody's work: they are
    /// unmounted, the spares stay listed.
    ///
    /// # Errors
    /// [`Error::Mounted`], [`Error::Busy`], kernel errors.
    pub fn deactivate(&mut self) -> Result<Action> {
        self.forget_pool_device();
        let prefix = names::name_prefix(&self.rec.pool_id);
        let pool_id = self.rec.pool_id.clone();
        let present = self.kernel()?.names_with_prefix(&prefix)?;
        if present.is_empty() {
            // A crash may have left the spares' tmpfs.
            self.unmount_spares_dir(&mounts::all()?)?;
            return Ok(Action::AlreadyDone);
        }
        let spares = self.real_spares_dir()?;
        let kernel = self.kernel.as_ref().expect("opened above");
        let mut thins: Vec<(String, devicemapper::Device)> = Vec::new();
        for name in &present {
            if let Some(Role::Thin(_)) = names::parse_role(&pool_id, name) {
                let dm_name = devicemapper::DmNameBuf::new(name.clone())
                    .expect("listed by the kernel: a valid name");
                if let Some(dev) = kernel.device(&dm_name)? {
                    thins.push((name.clone(), dev));
                }
            }
        }
        let all = mounts::all()?;
        let mounted: Vec<PathBuf> = all
            .iter()
            .filter(|m| thins.iter().any(|(_, d)| *d == m.device))
            .filter(|m| m.mountpoint.parent() != Some(spares.as_path()))
            .map(|m| m.mountpoint.clone())
            .collect();
        if let Some(first) = mounted.first() {
            return Err(Error::Mounted {
                what: "a layer of this pool".into(),
                hint: first.display().to_string(),
                mountpoints: mounted,
            });
        }
        self.unmount_spares_dir(&all)?;
        for (name, _) in &thins {
            let n =
                devicemapper::DmNameBuf::new(name.clone()).expect("valid: listed by the kernel");
            kernel.remove_if_present(&n)?;
            fault::point("pool_deactivate.after_thin_removal");
        }
        for role in [Role::Pool, Role::Data, Role::Meta] {
            kernel.remove_if_present(&names::dm_name(&pool_id, role))?;
            fault::point(match role {
                Role::Pool => "pool_deactivate.after_pool_removal",
                Role::Data => "pool_deactivate.after_data_removal",
                _ => "pool_deactivate.after_meta_removal",
            });
        }
        Ok(Action::Done)
    }
}
