//! `pool adopt`: thinlayer inside a thin-pool someone else made and runs
//! (LVM, dmsetup). thinlayer makes its own thin ids in it, above every id
//! the pool held when adopted, and never touches any other.
//!
//! What must never happen: a foreign thin id deleted or changed, in any
//! verb or recovery; the adopted pool's tables, size or transaction id
//! changed by thinlayer.

use std::path::Path;

use super::{
    CreateOptions, Pool,
    lifecycle::{clear_interrupted_create, interrupted_create},
    now_unix,
    thin::make_filesystem,
};
use crate::{
    blockdev,
    cmd::Tool,
    error::{Error, Result},
    kernel::{self, Kernel},
    lock::{self, LockMode},
    names::{self, PoolId, Role},
    records::{Backing, Layout, Pending, PoolRecord, Record, file},
    units::{BlockSize, Bytes},
};

/// The first thin id thinlayer uses in an adopted pool (2^23), unless the
/// pool already holds a higher one: LVM numbers its thin volumes up from
/// its own highest id, so the two never meet.
pub const FIRST_ADOPTED_THIN_ID: u32 = 1 << 23;

/// The thin ids in the live pool `pool` (metadata device `meta`), read
/// from a metadata snapshot that is always released.
fn foreign_thin_ids(
    kernel: &Kernel,
    pool: &devicemapper::DmName,
    meta: &Path,
) -> Result<std::collections::BTreeSet<u32>> {
    if kernel.pool_status(pool)?.held_metadata_root.is_some() {
        return Err(Error::Busy {
            what: format!("the pool {pool}"),
            detail: "someone holds a metadata snapshot of it (`reserve_metadata_snap`); \
                     wait for them, or release it with `dmsetup message POOL 0 release_metadata_snap`"
                .into(),
        });
    }
    kernel.pool_message(pool, "reserve_metadata_snap")?;
    let dump = Tool::ThinDump.run(&[
        "--metadata-snap".as_ref(),
        "--skip-mappings".as_ref(),
        meta.as_os_str(),
    ]);
    kernel.pool_message(pool, "release_metadata_snap")?;
    Ok(crate::check::parse_thin_dump(&dump?)?.thin_ids)
}

impl Pool {
    /// Takes over the existing, active thin-pool `pool_device` (its dm
    /// name, `/dev/mapper/NAME`; for LVM the `VG-POOL-tpool` device) made
    /// by LVM or by hand: reads its thin ids from a metadata snapshot
    /// (`reserve_metadata_snap`, `thin_dump`, release), records them as
    /// foreign, and makes thinlayer's base device in it under a thin id
    /// above every foreign one (from [`FIRST_ADOPTED_THIN_ID`], far above
    /// the ids LVM hands out, which count up from its own highest). The
    /// pool itself (its tables, transaction id, size) stays its owner's:
    /// thinlayer never starts, stops, extends or repairs it, and never
    /// deletes or changes a thin id that is not its own, in any recovery.
    /// `opts` gives the filesystem, base size and low-water mark; its
    /// sizes are the pool's.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `pool_device` is missing or not a
    /// thin-pool, or is thinlayer's own; [`Error::Busy`] when the pool is
    /// not writable; [`Error::PoolExists`]; tool and kernel errors.
    pub fn adopt(root: &Path, pool_device: &str, opts: &CreateOptions, wait: bool) -> Result<Pool> {
        let name = pool_device
            .strip_prefix("/dev/mapper/")
            .unwrap_or(pool_device)
            .to_owned();
        let dm_name = devicemapper::DmNameBuf::new(name.clone()).map_err(|e| {
            Error::InvalidArgument(format!("`{pool_device}` is not a device-mapper name: {e}"))
        })?;
        if opts.base_size < opts.fs.min_size() || !opts.base_size.0.is_multiple_of(4096) {
            return Err(Error::InvalidSize {
                input: opts.base_size.to_string(),
                reason: format!(
                    "the base size must be a multiple of 4K of at least {} for {}",
                    opts.fs.min_size(),
                    opts.fs.name()
                ),
            });
        }
        if !(1..=99).contains(&opts.low_water_percent) {
            return Err(Error::InvalidArgument(format!(
                "low-water mark {}% is out of range; use 1 to 99",
                opts.low_water_percent
            )));
        }
        let kernel = Kernel::open()?;
        opts.fs.mkfs().find()?;
        Tool::ThinCheck.find()?;
        Tool::ThinDump.find()?;
        if kernel.device(&dm_name)?.is_none() {
            return Err(Error::InvalidArgument(format!(
                "there is no device-mapper device `{name}`; `dmsetup ls --target thin-pool` lists the thin-pools \
                 (an LVM pool VG/POOL is `VG-POOL-tpool` while a thin volume of it is active)"
            )));
        }
        let uuid = kernel.uuid_of(&dm_name)?;
        if uuid.as_deref().is_some_and(|u| u.starts_with("THINLAYER-")) {
            return Err(Error::InvalidArgument(format!(
                "{name} is a thinlayer pool already; use its own --root"
            )));
        }
        let table = kernel.table(&dm_name)?;
        let (meta, _data, block_sectors, len) = crate::check::pool_table_devices(&name, &table)?;
        let block_size = BlockSize::new(Bytes(block_sectors * 512))?;
        let st = kernel.pool_status(&dm_name)?;
        if st.summary != devicemapper::ThinPoolStatusSummary::Good || st.needs_check {
            return Err(Error::Busy {
                what: format!("the pool {name}"),
                detail: format!(
                    "it is in {:?} mode{}; have its owner repair or extend it first",
                    st.summary,
                    if st.needs_check {
                        " and flagged needs_check"
                    } else {
                        ""
                    }
                ),
            });
        }
        let meta_node = blockdev::node_of(meta)?;
        let meta_name = meta_node
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let metadata_size = blockdev::size_of(&meta_name)?;
        let layout = Layout {
            root: root.to_owned(),
        };
        if layout.pool_record().exists() && interrupted_create(&layout).is_none() {
            return Err(Error::PoolExists {
                root: root.to_owned(),
            });
        }
        file::check_owner(root)?;
        file::create_dir(root)?;
        let lock = lock::lock(root, LockMode::Exclusive, wait)?;
        file::secure_root(root, true)?;
        file::sweep_temp(root)?;
        if let Some(old) = interrupted_create(&layout) {
            tracing::info!(pool_id = %old.pool_id, "clearing an interrupted pool create");
            clear_interrupted_create(&kernel, &layout, &old)?;
        } else if layout.pool_record().exists() {
            return Err(Error::PoolExists {
                root: root.to_owned(),
            });
        }
        let foreign = foreign_thin_ids(&kernel, &dm_name, &meta_node)?;
        let first = foreign.iter().max().map_or(FIRST_ADOPTED_THIN_ID, |m| {
            (m + 1).max(FIRST_ADOPTED_THIN_ID)
        });
        let rec = PoolRecord {
            backing: Backing::Adopted {
                pool_name: name.clone(),
                pool_uuid: uuid,
                foreign_thin_ids: foreign.into_iter().collect(),
                first_thin_id: first,
            },
            pool_id: PoolId::generate(&root.to_string_lossy()),
            data_size: Bytes(len * 512),
            metadata_size,
            block_size,
            fs: opts.fs,
            base_size: opts.base_size,
            base_thin_id: first,
            next_thin_id: first + 1,
            transaction_id: st.transaction_id,
            low_water_percent: opts.low_water_percent,
            pending: None,
            spares: Vec::new(),
            trash: Vec::new(),
            created_unix: now_unix(),
            layers_gen: 0,
        };
        let intent = PoolRecord {
            pending: Some(Pending::CreatePool),
            ..rec.clone()
        };
        intent.save(&layout.pool_record())?;
        let built = (|| {
            let pool_dev = kernel
                .device(&dm_name)?
                .ok_or_else(|| Error::Inconsistent(format!("{name} vanished while adopting it")))?;
            kernel.pool_message(&dm_name, &format!("create_thin {first}"))?;
            let base = names::dm_name(&rec.pool_id, Role::Thin(first));
            let dev = kernel.new_thin(
                &base,
                &names::dm_uuid(&rec.pool_id, Role::Thin(first)),
                pool_dev,
                kernel::ThinId::new(first)?,
                kernel::Sectors(rec.base_size.sectors()),
            )?;
            let made = make_filesystem(rec.fs, &kernel::devnode(dev));
            kernel.remove(&base)?;
            made?;
            file::create_dir(&layout.layers_dir())?;
            rec.save(&layout.pool_record())
        })();
        if let Err(e) = built {
            // Ours only: the base device and its thin id, then the intent.
            return Err(match clear_interrupted_create(&kernel, &layout, &intent) {
                Ok(_) => e,
                Err(undo) => Error::Rollback {
                    error: Box::new(e),
                    undo: Box::new(undo),
                },
            });
        }
        tracing::info!(pool = %name, first_thin_id = first, "adopted the pool");
        Ok(Pool::new(layout, rec, Some(kernel), lock))
    }
}
