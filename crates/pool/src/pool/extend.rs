//! `pool extend`: growing the data and metadata online. File (`set_len`)
//! -> loop capacity -> linear device reload -> pool table reload ->
//! record. Kernel first, record second; the data file grows before
//! anything else, so a crash after the kernel step and before the record
//! is told by a data file longer than the record
//! ([`Pool::reconcile_sizes`] adopts it). A pool on devices writes its
//! record first (the devices already hold the new size).
//!
//! What must never happen: a live device shrunk (sizes are measured from
//! the kernel, never the record alone); an adopted pool extended by
//! thinlayer.

use std::path::PathBuf;

use super::{Pool, lifecycle::pool_spec};
use crate::{
    blockdev::{self, DeviceRole},
    error::{Error, IoContext, Result},
    kernel::Sectors,
    names::Role,
    records::{Backing, PoolRecord},
    space::{ExtendReport, ExtendRequest, device_size, grow_file, refuse_shrink},
    units::{self, Bytes},
};

impl Pool {
    /// The data and metadata sizes the pool has now: the live linear
    /// devices' when active, else the files' (rounded down to whole pool
    /// blocks and 4 KiB); never less than the record. A larger size than
    /// the record is an extend whose record was lost: it is adopted (the
    /// record rewritten) and said.
    ///
    /// # Errors
    /// Kernel, sysfs and record errors.
    fn adopt_live_sizes(&mut self) -> Result<()> {
        if self.pool_device()?.is_none() {
            self.reconcile_sizes()?;
            return Ok(());
        }
        let (data_name, meta_name) = (self.name(Role::Data), self.name(Role::Meta));
        let kernel = self.kernel()?;
        let size = |n: &devicemapper::DmName| -> Result<Bytes> {
            let dev = kernel.device(n)?.ok_or_else(|| {
                Error::Inconsistent(format!("the pool is active but {n} is gone"))
            })?;
            device_size(dev)
        };
        let (data, meta) = (size(&data_name)?, size(&meta_name)?);
        let r = &mut self.rec;
        let (old_data, old_meta) = (r.data_size, r.metadata_size);
        if data <= old_data && meta <= old_meta {
            return Ok(());
        }
        r.data_size = old_data.max(data);
        r.metadata_size = old_meta.max(meta);
        tracing::warn!(
            "the record said data {old_data}, metadata {old_meta}, but the live pool has data {data}, metadata {meta} \
             (an extend whose record was lost): adopted the live sizes"
        );
        self.write_record()
    }

    /// active (layers may stay mounted): file -> loop capacity -> linear
    /// device -> pool table -> record. Sizes round down to whole pool
    /// blocks (data) or 4 KiB (metadata). The current sizes are the live
    /// devices' (or, inactive, the files'), never the record's alone: a
    /// larger live size is adopted first, so a request below it is a
    /// shrink and refused. The metadata file is allocated on the host.
    ///
    /// # Errors
    /// [`Error::InvalidSize`] to shrink or past the kernel's metadata limit;
    /// [`Error::InvalidArgument`] when nothing was asked; I/O and kernel
    /// errors.
    pub fn extend(&mut self, req: &ExtendRequest) -> Result<ExtendReport> {
        if let Backing::Adopted { pool_name, .. } = &self.record().backing {
            return Err(Error::Foreign {
                what: "pool extend".into(),
                pool: pool_name.clone(),
                hint: "grow it with its owner (`lvextend -L +SIZE VG/POOL`, `lvextend --poolmetadatasize +SIZE VG/POOL`); \
                       thinlayer uses the new size at once"
                    .into(),
            });
        }
        let on_devices = matches!(self.record().backing, Backing::Devices { .. });
        let fill = on_devices && req.data.is_none() && req.metadata.is_none();
        if req.data.is_none() && req.metadata.is_none() && !on_devices {
            return Err(Error::InvalidArgument(
                "nothing to extend; give --data-size +SIZE and/or --metadata-size +SIZE".into(),
            ));
        }
        // Measure from what the kernel uses, never the record alone: a
        // record a crash or a restore left behind must not shrink a live
        // device.
        self.adopt_live_sizes()?;
        let rec = self.record().clone();
        let block = rec.block_size.bytes().0;
        // A pool on devices grows within them: into what the admin added
        // (a grown LV or disk); with no size given, to all of it.
        let devices = match &rec.backing {
            Backing::Devices { data, metadata } => Some((
                blockdev::find(&rec.pool_id, DeviceRole::Data, data)?,
                blockdev::find(&rec.pool_id, DeviceRole::Metadata, metadata)?,
            )),
            _ => None,
        };
        let (data_room, meta_room) = match &devices {
            Some((d, m)) => (
                Bytes(d.usable().0 / block * block),
                Bytes(m.usable().0.min(units::MAX_METADATA) / 4096 * 4096),
            ),
            None => (Bytes(u64::MAX), Bytes(u64::MAX)),
        };
        let new_data = match req.data {
            Some(c) => Bytes(c.apply(rec.data_size).0 / block * block),
            None if fill => data_room.max(rec.data_size),
            None => rec.data_size,
        };
        let new_meta = match req.metadata {
            Some(c) => Bytes(c.apply(rec.metadata_size).0 / 4096 * 4096),
            None if fill => meta_room.max(rec.metadata_size),
            None => rec.metadata_size,
        };
        if let Some((d, m)) = &devices {
            for (what, want, room, dev) in [
                ("data", new_data, data_room, d),
                ("metadata", new_meta, meta_room, m),
            ] {
                if want > room {
                    return Err(Error::InvalidSize {
                        input: want.to_string(),
                        reason: format!(
                            "the {what} device {} holds {room} for the pool; grow the device first \
                             (`lvextend`, or a larger disk), then run `thinlayer pool extend` (no size: all of it)",
                            dev.node.display()
                        ),
                    });
                }
            }
        }
        refuse_shrink("data size", rec.data_size, new_data)?;
        refuse_shrink("metadata size", rec.metadata_size, new_meta)?;
        if new_meta.0 > units::MAX_METADATA {
            return Err(Error::InvalidSize {
                input: new_meta.to_string(),
                reason: format!(
                    "the kernel uses at most {} of metadata",
                    Bytes(units::MAX_METADATA)
                ),
            });
        }
        let mut report = ExtendReport {
            old_data_size: rec.data_size,
            new_data_size: new_data,
            old_metadata_size: rec.metadata_size,
            new_metadata_size: new_meta,
            online: false,
        };
        if !report.changed() {
            return Ok(report);
        }
        self.recover()?;
        if let Some((d, m)) = devices {
            return self.extend_devices(&rec, &d, &m, report);
        }
        let layout = self.layout().clone();
        // Files first: a longer file than the record is harmless, and tells
        // a crash after the kernel step.
        let data_loop = grow_file(&layout.data_file(), new_data, false)?;
        let meta_loop = grow_file(&layout.metadata_file(), new_meta, true)?;
        if self.pool_device()?.is_some() {
            let (Some(data_loop), Some(meta_loop)) = (data_loop, meta_loop) else {
                return Err(Error::Inconsistent(
                    "the pool is active but its files have no loop devices".into(),
                ));
            };
            let data_name = self.name(Role::Data);
            let meta_name = self.name(Role::Meta);
            let pool_name = self.name(Role::Pool);
            let kernel = self.kernel()?;
            let (zero, meta_len, data_len) = (
                Sectors(0),
                Sectors(new_meta.sectors()),
                Sectors(new_data.sectors()),
            );
            kernel.resize_linear(&meta_name, meta_loop.device, zero, meta_len)?;
            kernel.resize_linear(&data_name, data_loop.device, zero, data_len)?;
            let dev = |n| {
                kernel
                    .device(n)?
                    .ok_or_else(|| Error::Inconsistent(format!("{n} vanished while extending")))
            };
            let (meta, data) = (dev(&meta_name)?, dev(&data_name)?);
            let mut grown = rec.clone();
            grown.data_size = new_data;
            grown.metadata_size = new_meta;
            kernel.reload_pool(&pool_name, &pool_spec(&grown, meta, data))?;
            report.online = true;
        }
        let r = &mut self.rec;
        r.data_size = new_data;
        r.metadata_size = new_meta;
        self.write_record()?;
        tracing::info!(
            data_from = %report.old_data_size, data_to = %report.new_data_size,
            metadata_from = %report.old_metadata_size, metadata_to = %report.new_metadata_size,
            online = report.online, "extended the pool"
        );
        Ok(report)
    }

    /// The device half of [`Pool::extend`]: record first (the devices
    /// already hold the new size, so a record ahead of the kernel only
    /// makes the next activation build the larger tables), then the
    /// linear devices and the pool table when active.
    fn extend_devices(
        &mut self,
        rec: &PoolRecord,
        d: &blockdev::BlockDev,
        m: &blockdev::BlockDev,
        mut report: ExtendReport,
    ) -> Result<ExtendReport> {
        let r = &mut self.rec;
        r.data_size = report.new_data_size;
        r.metadata_size = report.new_metadata_size;
        self.write_record()?;
        if self.pool_device()?.is_some() {
            let data_name = self.name(Role::Data);
            let meta_name = self.name(Role::Meta);
            let pool_name = self.name(Role::Pool);
            let kernel = self.kernel()?;
            let off = Sectors(blockdev::LABEL_SECTORS);
            kernel.resize_linear(
                &meta_name,
                m.device,
                off,
                Sectors(report.new_metadata_size.sectors()),
            )?;
            let data_len = Sectors(report.new_data_size.sectors());
            kernel.resize_linear(&data_name, d.device, off, data_len)?;
            let dev = |n| {
                kernel
                    .device(n)?
                    .ok_or_else(|| Error::Inconsistent(format!("{n} vanished while extending")))
            };
            let (meta, data) = (dev(&meta_name)?, dev(&data_name)?);
            let mut grown = rec.clone();
            grown.data_size = report.new_data_size;
            grown.metadata_size = report.new_metadata_size;
            kernel.reload_pool(&pool_name, &pool_spec(&grown, meta, data))?;
            report.online = true;
        }
        tracing::info!(
            data_from = %report.old_data_size, data_to = %report.new_data_size,
            metadata_from = %report.old_metadata_size, metadata_to = %report.new_metadata_size,
            online = report.online, "extended the pool onto its devices"
        );
        Ok(report)
    }

    /// Adopts data or metadata file lengths larger than the record: an
    /// extend that reached the files (and maybe the kernel) but not the
    /// record. Call before the pool's tables are built from the record.
    /// A pool on devices or adopted has no files: nothing to do.
    ///
    /// # Errors
    /// I/O and record errors.
    pub fn reconcile_sizes(&mut self) -> Result<bool> {
        if !self.record().backing.is_files() {
            return Ok(false);
        }
        let layout = self.layout().clone();
        let block = self.record().block_size.bytes().0;
        let len = |p: PathBuf| -> Result<u64> {
            Ok(std::fs::metadata(&p)
                .ctx(|| format!("stat {}", p.display()))?
                .len())
        };
        let data = Bytes(len(layout.data_file())? / block * block);
        let meta = Bytes(len(layout.metadata_file())? / 4096 * 4096);
        let r = &mut self.rec;
        let mut changed = false;
        if data > r.data_size {
            tracing::info!(from = %r.data_size, to = %data, "adopting the data file's length");
            r.data_size = data;
            changed = true;
        }
        if meta > r.metadata_size && meta.0 <= units::MAX_METADATA {
            tracing::info!(from = %r.metadata_size, to = %meta, "adopting the metadata file's length");
            r.metadata_size = meta;
            changed = true;
        }
        if changed {
            self.write_record()?;
        }
        Ok(changed)
    }
}
