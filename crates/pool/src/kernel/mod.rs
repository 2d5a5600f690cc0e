//! The kernel side: every device-mapper call thinlayer makes goes through
//! this module and the `devicemapper` crate's ioctls (never dmsetup).
//!
//! Protocol for every device: create -> load table -> resume; a failed load
//! removes the half-made device. Thin devices are activated only when they
//! are used (mounted) and torn down after, so a snapshot of an inactive
//! parent needs no suspend, and a pool of thousands of layers keeps only
//! its mounted ones in the kernel's device list.
//!
//! Vocabulary (the `devicemapper` crate's `ThinDev`): [`Kernel::new_thin`]
//! creates (an error if the name is taken), [`Kernel::setup_thin`] adopts a
//! live device only when its table is the one we would load, else activates
//! it, [`Kernel::snapshot`] snapshots (suspending an active origin),
//! [`Kernel::teardown`] removes the device and keeps the data,
//! [`Kernel::destroy_thin`] also deletes the thin id. Thin ids are
//! [`ThinId`]s and lengths [`Sectors`] here, never bare integers.
//!
//! Why not `ThinDev`/`ThinPoolDev` themselves: `ThinDev::snapshot` needs the
//! origin active and always suspends it, while thinlayer keeps layers
//! inactive and snapshots them with a bare `create_snap` message (no
//! suspend is needed when nothing has the origin open); and the crate's
//! types hold a device for their lifetime, where the engine holds names and
//! activates a device only while it is used. So this module drives the
//! crate's `DM` ioctls with the crate's table, status and id types, and
//! does the adopt-with-table-check that `ThinDev::setup` does.
//!
//! What must never happen: a pool message (`create_snap`, `delete`) sent
//! while the origin is active and not suspended (the kernel would snapshot
//! an inconsistent device); an origin left suspended after a failed
//! message; a live device adopted by name whose table is not ours (a stale
//! or foreign device would be handed out, mounted or snapshotted as a
//! layer).

use std::{collections::HashSet, path::PathBuf};

pub use devicemapper::Sectors;
use devicemapper::{
    DM, DataBlocks, DevId, Device, DmFlags, DmName, DmOptions, DmUuid, LinearDevTargetParams,
    LinearDevTargetTable, LinearTargetParams, TargetLine, TargetTable, ThinDevTargetTable,
    ThinPoolDevTargetTable, ThinPoolStatusSummary, ThinPoolTargetParams, ThinTargetParams,
};
use nix::errno::Errno;

use crate::error::{DmContext, Error, Result};
pub use crate::units::ThinId;

mod status;

/// The mode a working thin-pool is in, from its status line (the crate's
/// `ThinPoolStatusSummary`).
pub type PoolMode = ThinPoolStatusSummary;

/// A raw table as the `DM` ioctls speak it: (start, length, target,
/// parameters) per line.
pub type RawTable = Vec<(u64, u64, String, String)>;

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
        Ok(self.device_open(name)?.map(|(dev, _)| dev))
    }

    /// `name`'s device number and where it is mounted, if the kernel has
    /// it. A device nothing holds open is mounted nowhere: that answer
    /// needs no mountinfo read (mountinfo grows with every snapshot in
    /// use).
    ///
    /// # Errors
    /// device-mapper errors; I/O errors reading mountinfo.
    pub fn mounted(&self, name: &DmName) -> Result<Option<(Device, Vec<std::path::PathBuf>)>> {
        let Some((dev, open)) = self.device_open(name)? else {
            return Ok(None);
        };
        let points = if open == 0 {
            Vec::new()
        } else {
            crate::mounts::mountpoints_of(dev)?
        };
        Ok(Some((dev, points)))
    }

    /// Whether `name` is active and held open only by a filesystem that is
    /// read-only itself (its superblock, so each of its mounts): nothing
    /// writes it then but a remount, which only root can make.
    ///
    /// # Errors
    /// device-mapper errors; I/O errors reading mountinfo.
    pub fn held_read_only(&self, name: &DmName) -> Result<bool> {
        let Some((dev, 1)) = self.device_open(name)? else {
            return Ok(false);
        };
        let mut on = crate::mounts::all()?
            .into_iter()
            .filter(|m| m.device == dev)
            .peekable();
        Ok(on.peek().is_some() && on.all(|m| m.read_only))
    }

    /// The device number of `name` and how many hold it open (a mount is
    /// one), if the kernel has it.
    ///
    /// # Errors
    /// device-mapper errors other than "no such device".
    fn device_open(&self, name: &DmName) -> Result<Option<(Device, u32)>> {
        match self.dm.device_info(&DevId::Name(name)) {
            Ok(info) => Ok(Some((
                info.device(),
                u32::try_from(info.open_count()).unwrap_or(u32::MAX),
            ))),
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

    /// The dm name of device `dev`, `None` when it is no dm device: one
    /// sysfs read (`/sys/dev/block/MAJ:MIN/dm/name`), the kernel's list of
    /// every device only where sysfs cannot tell.
    ///
    /// # Errors
    /// device-mapper errors listing the devices.
    pub fn name_of(&self, dev: Device) -> Result<Option<devicemapper::DmNameBuf>> {
        let sys = format!("/sys/dev/block/{}:{}", dev.major, dev.minor);
        match std::fs::read_to_string(format!("{sys}/dm/name")) {
            Ok(name) => return Ok(devicemapper::DmNameBuf::new(name.trim_end().to_owned()).ok()),
            // A block device without a dm directory is not dm's.
            Err(_) if std::path::Path::new(&sys).exists() => return Ok(None),
            Err(_) => {}
        }
        Ok(self
            .dm
            .list_devices()
            .dm_ctx(|| "list dm devices".into())?
            .into_iter()
            .find(|(_, d, _)| *d == dev)
            .map(|(name, ..)| name))
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
        offset: Sectors,
        length: Sectors,
    ) -> Result<Device> {
        let table = LinearDevTargetTable::new(vec![TargetLine::new(
            Sectors(0),
            length,
            LinearDevTargetParams::Linear(LinearTargetParams::new(under, offset)),
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
        offset: Sectors,
        length: Sectors,
    ) -> Result<()> {
        let table = LinearDevTargetTable::new(vec![TargetLine::new(
            Sectors(0),
            length,
            LinearDevTargetParams::Linear(LinearTargetParams::new(under, offset)),
        )]);
        self.reload(name, &table.to_raw_table())
    }

    /// The live table of `name`: (start, length, target, parameters) per
    /// line, for a device thinlayer did not make (an adopted pool).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn table(&self, name: &DmName) -> Result<RawTable> {
        self.table_status(name, DmFlags::DM_STATUS_TABLE, "table")
    }

    /// The `DM_TABLE_STATUS` lines of `name`: its table with
    /// `DM_STATUS_TABLE` in `flags`, else its status; `what` names which in
    /// an error.
    fn table_status(&self, name: &DmName, flags: DmFlags, what: &str) -> Result<RawTable> {
        let (_, lines) = self
            .dm
            .table_status(&DevId::Name(name), DmOptions::default().set_flags(flags))
            .dm_ctx(|| format!("read the {what} of {name}"))?;
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
    pub fn pool_table(spec: &PoolSpec) -> RawTable {
        ThinPoolDevTargetTable::new(
            Sectors(0),
            spec.data_sectors,
            ThinPoolTargetParams::new(
                spec.meta,
                spec.data,
                spec.block_sectors,
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

    /// The table of thin device `id` of the pool at `pool`, `length` long.
    fn thin_table(pool: Device, id: ThinId, length: Sectors) -> ThinDevTargetTable {
        ThinDevTargetTable::new(
            Sectors(0),
            length,
            ThinTargetParams::new(pool, id.into(), None),
        )
    }

    /// Creates thin device `id` of the pool at `pool` as `name`
    /// (`ThinDev::new`'s create -> load -> resume).
    ///
    /// # Errors
    /// device-mapper errors: `EBUSY` when `name` is taken, `ENODATA` when
    /// the pool has no such thin id.
    pub fn new_thin(
        &self,
        name: &DmName,
        uuid: &DmUuid,
        pool: Device,
        id: ThinId,
        length: Sectors,
    ) -> Result<Device> {
        self.create(
            name,
            uuid,
            &Self::thin_table(pool, id, length).to_raw_table(),
        )
    }

    /// Thin device `id` of the pool at `pool` as `name`: the live device
    /// when the kernel has one whose table is the one we would load (pool
    /// device and thin id; the length may differ, an extend grows it),
    /// else a new one. Says whether this call activated it.
    ///
    /// # Errors
    /// [`Error::WrongTable`] when a device named `name` is live with another
    /// table (it is left as it is); device-mapper errors as
    /// [`Kernel::new_thin`].
    pub fn setup_thin(
        &self,
        name: &DmName,
        uuid: &DmUuid,
        pool: Device,
        id: ThinId,
        length: Sectors,
    ) -> Result<(Device, bool)> {
        let Some(dev) = self.device(name)? else {
            return Ok((self.new_thin(name, uuid, pool, id, length)?, true));
        };
        let raw = self.table(name)?;
        let ours = ThinDevTargetTable::from_raw_table(&raw)
            .ok()
            .is_some_and(|t| t.table.params.pool == pool && t.table.params.thin_id == id.into());
        if ours {
            Ok((dev, false))
        } else {
            Err(Error::WrongTable {
                name: name.to_string(),
                found: describe_table(&raw),
                expected: describe_table(&Self::thin_table(pool, id, length).to_raw_table()),
            })
        }
    }

    /// Checks that the live pool device `name` has the table our record
    /// gives it before it is adopted: a thin-pool over the live devices
    /// named `meta` and `data`, with blocks of `block` (length and
    /// low-water mark may differ: an extend changes them).
    ///
    /// # Errors
    /// [`Error::WrongTable`] when it does not (the device is left as it
    /// is); device-mapper errors.
    pub fn check_pool(
        &self,
        name: &DmName,
        meta: &DmName,
        data: &DmName,
        block: Sectors,
    ) -> Result<()> {
        let raw = self.table(name)?;
        let (meta_dev, data_dev) = (self.device(meta)?, self.device(data)?);
        let ours = ThinPoolDevTargetTable::from_raw_table(&raw)
            .ok()
            .is_some_and(|t| {
                let p = &t.table.params;
                Some(p.metadata_dev) == meta_dev
                    && Some(p.data_dev) == data_dev
                    && p.data_block_size == block
            });
        if ours {
            return Ok(());
        }
        let dev_of = |d: Option<Device>, n: &DmName| match d {
            Some(d) => d.to_string(),
            None => format!("{n} (not active)"),
        };
        Err(Error::WrongTable {
            name: name.to_string(),
            found: describe_table(&raw),
            expected: format!(
                "thin-pool over metadata {} and data {}, blocks of {} sectors",
                dev_of(meta_dev, meta),
                dev_of(data_dev, data),
                block
            ),
        })
    }

    /// Removes a dm device and keeps its data (`ThinDev::teardown`).
    /// `EBUSY` becomes [`Error::Busy`].
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn teardown(&self, name: &DmName) -> Result<()> {
        self.remove(name)
    }

    /// Tears down thin device `name` if live, then deletes thin id `id`
    /// from `pool` (`ThinDev::destroy`).
    ///
    /// # Errors
    /// [`Error::Busy`]; device-mapper errors (`ENODATA` when the pool has
    /// no such thin id).
    pub fn destroy_thin(&self, pool: &DmName, name: &DmName, id: ThinId) -> Result<()> {
        self.remove_if_present(name)?;
        self.pool_message(pool, &format!("delete {id}"))
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

    /// Creates thin id `new_id`, a snapshot of `origin_id`. When the origin
    /// is active (`origin` given) it is suspended around the message, as
    /// the kernel requires, and resumed even if the message fails; an
    /// inactive origin is snapshotted without (the raw message the crate's
    /// `ThinDev::snapshot` cannot send).
    ///
    /// # Errors
    /// device-mapper errors.
    pub fn snapshot(
        &self,
        pool: &DmName,
        new_id: ThinId,
        origin_id: ThinId,
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
}

/// The parts of a thin-pool table.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// The metadata device (the linear device over the metadata loop).
    pub meta: Device,
    /// The data device.
    pub data: Device,
    /// Length of the data device.
    pub data_sectors: Sectors,
    /// The pool's block size.
    pub block_sectors: Sectors,
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

/// A raw table in one line per target, for error messages.
fn describe_table(raw: &[(u64, u64, String, String)]) -> String {
    if raw.is_empty() {
        return "no table".into();
    }
    raw.iter()
        .map(|(start, len, target, params)| format!("{start} {len} {target} {params}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
