//! The kernel side: every device-mapper call thinlayer makes goes through
//! this module and the `devicemapper` crate's ioctls (never dmsetup).
//!
//! Protocol for every device: create -> load table -> resume; a failed load
//! removes the half-made device. Thin devices are activated only when they
//! are used (mounted) and torn down after, so a snapshot of an inactive
//! parent needs no suspend, and a pool of thousands of layers keeps only
//! its mounted ones in the kernel's device list.
//!
//! What must never happen: a pool message (`create_snap`, `delete`) sent
//! while the origin is active and not suspended (the kernel would snapshot
//! an inconsistent device); an origin left suspended after a failed
//! message.

use std::{collections::HashSet, path::PathBuf, str::FromStr};

use devicemapper::{
    DM, DataBlocks, DevId, Device, DmFlags, DmName, DmOptions, DmUuid, LinearDevTargetParams,
    LinearDevTargetTable, LinearTargetParams, Sectors, TargetLine, TargetTable, ThinDevId,
    ThinDevTargetTable, ThinPoolDevTargetTable, ThinPoolStatus, ThinPoolTargetParams,
    ThinPoolWorkingStatus, ThinTargetParams,
};
use nix::errno::Errno;

use crate::error::{DmContext, Error, Result};

/// The kernel's thin-pool target name.
const THIN_POOL_TARGET: &str = "thin-pool";

/// An open device-mapper control handle, checked to have dm-thin.
pub struct Kernel {
    dm: DM,
}

/// Checks that the caller is root.
///
/// # Errors
/// [`Error::NotRoot`].
pub fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

impl Kernel {
    /// Opens `/dev/mapper/control` and checks for the thin-pool target.
    ///
    /// # Errors
    /// [`Error::NotRoot`], [`Error::NoDeviceMapper`], [`Error::NoThinPool`].
    pub fn open() -> Result<Kernel> {
        require_root()?;
        let control = std::path::Path::new("/dev/mapper/control");
        if !control.exists() {
            let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
            let detail = if misc.contains("device-mapper") {
                "/dev/mapper/control is missing, though /proc/misc lists device-mapper: create the node with `dmsetup mknodes`".to_owned()
            } else {
                "no /dev/mapper/control, and /proc/misc lists no device-mapper".to_owned()
            };
            return Err(Error::NoDeviceMapper { detail });
        }
        let dm = DM::new().map_err(|e| Error::NoDeviceMapper {
            detail: format!("opening /dev/mapper/control failed: {e}"),
        })?;
        let kernel = Kernel { dm };
        kernel.check_thin_pool()?;
        Ok(kernel)
    }

    /// The thin-pool target is loaded, or its module is there for the
    /// kernel to load on first use.
    fn check_thin_pool(&self) -> Result<()> {
        let targets = self
            .dm
            .list_versions()
            .dm_ctx(|| "list device-mapper targets".into())?;
        if targets.iter().any(|(name, ..)| name == THIN_POOL_TARGET) {
            return Ok(());
        }
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let modules = PathBuf::from("/lib/modules").join(release);
        let listed = |file: &str| {
            std::fs::read_to_string(modules.join(file))
                .map(|t| t.contains("dm-thin-pool.ko"))
                .unwrap_or(false)
        };
        if listed("modules.dep") || listed("modules.builtin") {
            Ok(())
        } else {
            Err(Error::NoThinPool)
        }
    }

    /// The device number of `name` if the kernel has it.
    ///
    /// # Errors
    /// device-mapper errors other than "no such device".
    pub fn device(&self, name: &DmName) -> Result<Option<Device>> {
        match self.dm.device_info(&DevId::Name(name)) {
            Ok(info) => Ok(Some(info.device())),
            Err(e) => {
                let err = Error::Dm {
                    context: format!("look up {name}"),
                    source: e,
                };
                if err.dm_errno() == Some(Errno::ENXIO) {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// The names of all dm devices whose name starts with `prefix`.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn names_with_prefix(&self, prefix: &str) -> Result<HashSet<String>> {
        Ok(self
            .dm
            .list_devices()
            .dm_ctx(|| "list dm devices".into())?
            .into_iter()
            .map(|(name, ..)| name.to_string())
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    /// create -> load -> resume; a failed load or resume removes the device.
    fn create(
        &self,
        name: &DmName,
        uuid: &DmUuid,
        table: &[(u64, u64, String, String)],
    ) -> Result<Device> {
        let id = DevId::Name(name);
        self.dm
            .device_create(name, Some(uuid), DmOptions::private())
            .dm_ctx(|| format!("create {name}"))?;
        let loaded = self
            .dm
            .table_load(&id, table, DmOptions::private())
            .dm_ctx(|| format!("load the table of {name}"))
            .and_then(|_| {
                self.dm
                    .device_suspend(&id, DmOptions::private())
                    .dm_ctx(|| format!("resume {name}"))
            });
        match loaded {
            Ok(info) => Ok(info.device()),
            Err(e) => match self.remove(name) {
                Ok(()) => Err(e),
                Err(undo) => Err(Error::Rollback {
                    error: Box::new(e),
                    undo: Box::new(undo),
                }),
            },
        }
    }

    /// Creates a linear device of `length` sectors over `under`, from its
    /// sector `offset` (0 for a loop device; past the label region for a
    /// block device, see [`crate::blockdev`]).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn create_linear(
        &self,
        name: &DmName,
        uuid: &DmUuid,
        under: Device,
        offset: u64,
        length: u64,
    ) -> Result<Device> {
        let table = LinearDevTargetTable::new(vec![TargetLine::new(
            Sectors(0),
            Sectors(length),
            LinearDevTargetParams::Linear(LinearTargetParams::new(under, Sectors(offset))),
        )]);
        self.create(name, uuid, &table.to_raw_table())
    }

    /// Reloads a linear device with a new length (online grow).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn resize_linear(
        &self,
        name: &DmName,
        under: Device,
        offset: u64,
        length: u64,
    ) -> Result<()> {
        let table = LinearDevTargetTable::new(vec![TargetLine::new(
            Sectors(0),
            Sectors(length),
            LinearDevTargetParams::Linear(LinearTargetParams::new(under, Sectors(offset))),
        )]);
        self.reload(name, &table.to_raw_table())
    }

    /// The live table of `name`: (start, length, target, parameters) per
    /// line, for a device thinlayer did not make (an adopted pool).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn table(&self, name: &DmName) -> Result<Vec<(u64, u64, String, String)>> {
        let (_, lines) = self
            .dm
            .table_status(
                &DevId::Name(name),
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .dm_ctx(|| format!("read the table of {name}"))?;
        Ok(lines)
    }

    /// The dm uuid of `name`, if it has one.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn uuid_of(&self, name: &DmName) -> Result<Option<String>> {
        let info = self
            .dm
            .device_info(&DevId::Name(name))
            .dm_ctx(|| format!("look up {name}"))?;
        Ok(info.uuid().map(|u| u.to_string()))
    }

    /// Loads `table` into the inactive slot of `name` and swaps it in
    /// (suspend -> resume).
    fn reload(&self, name: &DmName, table: &[(u64, u64, String, String)]) -> Result<()> {
        let id = DevId::Name(name);
        self.dm
            .table_load(&id, table, DmOptions::private())
            .dm_ctx(|| format!("load a new table into {name}"))?;
        self.dm
            .device_suspend(&id, DmOptions::private().set_flags(DmFlags::DM_SUSPEND))
            .dm_ctx(|| format!("suspend {name}"))?;
        self.dm
            .device_suspend(&id, DmOptions::private())
            .dm_ctx(|| format!("resume {name}"))?;
        Ok(())
    }

    /// The thin-pool table for the given devices.
    pub fn pool_table(spec: &PoolSpec) -> Vec<(u64, u64, String, String)> {
        ThinPoolDevTargetTable::new(
            Sectors(0),
            Sectors(spec.data_sectors),
            ThinPoolTargetParams::new(
                spec.meta,
                spec.data,
                Sectors(spec.block_sectors),
                DataBlocks(spec.low_water_blocks),
                spec.features.clone(),
            ),
        )
        .to_raw_table()
    }

    /// Creates the thin-pool device.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn create_pool(&self, name: &DmName, uuid: &DmUuid, spec: &PoolSpec) -> Result<Device> {
        self.create(name, uuid, &Self::pool_table(spec))
    }

    /// Reloads the thin-pool with a new table (online extend).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn reload_pool(&self, name: &DmName, spec: &PoolSpec) -> Result<()> {
        self.reload(name, &Self::pool_table(spec))
    }

    /// Activates thin device `thin_id` of the pool at `pool` as `name`.
    ///
    /// # Errors
    /// device-mapper errors (`ENODATA` when the pool has no such thin id).
    pub fn activate_thin(
        &self,
        name: &DmName,
        uuid: &DmUuid,
        pool: Device,
        thin_id: u32,
        sectors: u64,
    ) -> Result<Device> {
        let table = ThinDevTargetTable::new(
            Sectors(0),
            Sectors(sectors),
            ThinTargetParams::new(pool, thin_id_of(thin_id)?, None),
        );
        self.create(name, uuid, &table.to_raw_table())
    }

    /// Removes a dm device. `EBUSY` becomes [`Error::Busy`].
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn remove(&self, name: &DmName) -> Result<()> {
        self.dm
            .device_remove(&DevId::Name(name), DmOptions::private())
            .map(|_| ())
            .dm_ctx(|| format!("remove {name}"))
            .map_err(|e| match e.dm_errno() {
                Some(Errno::EBUSY) => {
                    let holders = match self.device(name) {
                        Ok(Some(dev)) => crate::holders::of_device(dev),
                        _ => Vec::new(),
                    };
                    Error::Busy {
                        what: format!("device {name}"),
                        detail: crate::holders::describe(
                            &holders,
                            "it is open (mounted, or held by a process); unmount it or stop the holder and retry",
                        ),
                    }
                }
                _ => e,
            })
    }

    /// Asks the kernel to remove `name` as soon as its last opener closes
    /// it (`DM_DEFERRED_REMOVE`); returns at once.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn remove_deferred(&self, name: &DmName) -> Result<()> {
        self.dm
            .device_remove(
                &DevId::Name(name),
                DmOptions::private().set_flags(DmFlags::DM_DEFERRED_REMOVE),
            )
            .map(|_| ())
            .dm_ctx(|| format!("schedule the removal of {name}"))
    }

    /// Removes `name` if the kernel has it; true if it did.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn remove_if_present(&self, name: &DmName) -> Result<bool> {
        match self.remove(name) {
            Ok(()) => Ok(true),
            Err(e) if e.dm_errno() == Some(Errno::ENXIO) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sends `message` to the pool device `pool`.
    ///
    /// # Errors
    /// device-mapper errors (the kernel's errno kept).
    pub fn pool_message(&self, pool: &DmName, message: &str) -> Result<()> {
        self.dm
            .target_msg(&DevId::Name(pool), None, message)
            .map(|_| ())
            .dm_ctx(|| format!("send `{message}` to {pool}"))
    }

    /// Creates a snapshot `new_id` of `origin_id`. When the origin is
    /// active (`origin` given) it is suspended around the message, as the
    /// kernel requires, and resumed even if the message fails.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn create_snap(
        &self,
        pool: &DmName,
        new_id: u32,
        origin_id: u32,
        origin: Option<&DmName>,
    ) -> Result<()> {
        let message = format!("create_snap {new_id} {origin_id}");
        let Some(origin) = origin else {
            return self.pool_message(pool, &message);
        };
        let id = DevId::Name(origin);
        self.dm
            .device_suspend(&id, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .dm_ctx(|| format!("suspend {origin}"))?;
        let sent = self.pool_message(pool, &message);
        let resumed = self
            .dm
            .device_suspend(&id, DmOptions::default())
            .map(|_| ())
            .dm_ctx(|| format!("resume {origin}"));
        match (sent, resumed) {
            (Ok(()), r) => r,
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(undo)) => Err(Error::Rollback {
                error: Box::new(e),
                undo: Box::new(undo),
            }),
        }
    }

    /// Moves the pool's transaction id from `old` to `new`.
    ///
    /// # Errors
    /// device-mapper errors (`EINVAL` when the pool's id is not `old`).
    pub fn set_transaction_id(&self, pool: &DmName, old: u64, new: u64) -> Result<()> {
        self.pool_message(pool, &format!("set_transaction_id {old} {new}"))
    }

    /// The pool's status, read from the kernel.
    ///
    /// # Errors
    /// device-mapper errors; [`Error::Inconsistent`] for a failed pool.
    pub fn pool_status(&self, pool: &DmName) -> Result<ThinPoolWorkingStatus> {
        let line = self.status_line(pool)?;
        match ThinPoolStatus::from_str(&line).dm_ctx(|| format!("parse the status of {pool}"))? {
            ThinPoolStatus::Working(w) => Ok(*w),
            ThinPoolStatus::Error => Err(Error::Inconsistent(format!(
                "the kernel could not report the status of {pool}"
            ))),
            ThinPoolStatus::Fail => Err(Error::Inconsistent(format!(
                "the pool {pool} has failed (metadata I/O error?); deactivate it and run `thinlayer pool check`"
            ))),
        }
    }

    /// The number of sectors a thin device has mapped (its own plus shared).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn thin_mapped_sectors(&self, thin: &DmName) -> Result<Option<u64>> {
        let line = self.status_line(thin)?;
        if line.starts_with("Fail") || line.starts_with("Error") {
            return Ok(None);
        }
        Ok(line.split(' ').next().and_then(|v| v.parse().ok()))
    }

    fn status_line(&self, name: &DmName) -> Result<String> {
        let (_, lines) = self
            .dm
            // DM_NOFLUSH: without it a thin-pool commits its metadata on
            // every status read (1.5 ms against 0.2 ms measured in the VM);
            // the figures come from the in-core space maps either way.
            .table_status(
                &DevId::Name(name),
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
            )
            .dm_ctx(|| format!("read the status of {name}"))?;
        lines
            .into_iter()
            .next()
            .map(|(_, _, _, params)| params)
            .ok_or_else(|| Error::Inconsistent(format!("{name} has no table")))
    }

    /// Blocks until the kernel raises an event on `name` past `event_nr`
    /// (the pool raises one when it crosses its low-water mark or fills).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn wait_event(&self, name: &DmName, event_nr: u32) -> Result<u32> {
        let (info, _) = self
            .dm
            .device_wait(
                &DevId::Name(name),
                DmOptions::default().set_flags(DmFlags::empty()),
            )
            .dm_ctx(|| format!("wait for an event on {name}"))?;
        let _ = event_nr;
        Ok(info.event_nr())
    }

    /// Arms the control fd for events (`DM_DEV_ARM_POLL`): from now on,
    /// any dm device's event makes [`Kernel::control_fd`] poll readable.
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn arm_events(&self) -> Result<()> {
        self.dm
            .arm_poll()
            .map(|_| ())
            .dm_ctx(|| "arm /dev/mapper/control for events".into())
    }

    /// The control fd, to poll for `POLLIN` after [`Kernel::arm_events`].
    pub fn control_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.dm.file())
    }
}

/// The parts of a thin-pool table.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// The metadata device (the linear device over the metadata loop).
    pub meta: Device,
    /// The data device.
    pub data: Device,
    /// Length of the data device in sectors.
    pub data_sectors: u64,
    /// The pool's block size in sectors.
    pub block_sectors: u64,
    /// Free blocks below which the kernel raises an event.
    pub low_water_blocks: u64,
    /// Feature arguments (`error_if_no_space`, ...).
    pub features: Vec<String>,
}

/// The device node of a dm device: `/dev/dm-<minor>` (devtmpfs makes it
/// with or without udev; `/dev/mapper` links need udev).
pub fn devnode(device: Device) -> PathBuf {
    PathBuf::from(format!("/dev/dm-{}", device.minor))
}

/// A thin id checked to fit in the kernel's 24 bits.
///
/// # Errors
/// [`Error::InvalidArgument`] past 2^24 - 1.
pub fn thin_id_of(id: u32) -> Result<ThinDevId> {
    ThinDevId::new_u64(u64::from(id))
        .map_err(|e| Error::InvalidArgument(format!("thin id {id} is out of range: {e}")))
}
