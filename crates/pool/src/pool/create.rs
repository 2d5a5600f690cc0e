//! `pool create`: the sparse files (or two labelled block devices), loop
//! and linear devices, the thin-pool, a formatted base device, and last
//! the pool record.
//!
//! The intent (a pool record in the [`Pending::CreatePool`] state) is
//! written before the first file or device, so whatever a crash leaves
//! sits under a record that says it is leftovers; the next `pool create`,
//! `pool recover` or `pool destroy` clears them
//! ([`super::clear_interrupted_create`]). A failure that is not a crash
//! undoes what this create made, in reverse ([`Undo`]).
//!
//! What must never happen: a file or device this create did not make
//! removed by its undo; a device in use, or holding data without
//! `--force`, taken.

use std::path::{Path, PathBuf};

use super::{
    Pool,
    lifecycle::{CREATE_POINTS, Undo, clear_interrupted_create, interrupted_create, start_pool},
    now_unix,
    thin::make_filesystem,
};
use crate::{
    blockdev::{self, DeviceRole},
    cmd::Tool,
    error::{Error, IoContext, Result},
    fault,
    kernel::{self, Kernel},
    lock::{self, LockMode},
    names::{self, PoolId, Role},
    records::{Backing, FsType, Layout, Pending, PoolRecord, Record, file},
    units::{self, BlockSize, Bytes},
};

/// What `pool create` was asked for.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Size of the sparse data file (the pool's capacity).
    pub data_size: Bytes,
    /// Size of the metadata file; defaulted from the data and block sizes.
    pub metadata_size: Option<Bytes>,
    /// The pool's block size: the copy-on-write unit.
    pub block_size: BlockSize,
    /// The filesystem of the base device.
    pub fs: FsType,
    /// Virtual size of the base device and so of every layer.
    pub base_size: Bytes,
    /// Percent of data or metadata used at which status warns.
    pub low_water_percent: u8,
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            data_size: Bytes(20 << 30),
            metadata_size: None,
            block_size: BlockSize::DEFAULT,
            fs: FsType::Ext4,
            base_size: Bytes(10 << 30),
            low_water_percent: 80,
        }
    }
}

/// Block devices for `pool create` in place of the sparse files.
#[derive(Clone, Debug)]
pub struct DevicePair {
    /// The data device (a disk, a partition, an LVM volume).
    pub data: PathBuf,
    /// The metadata device.
    pub metadata: PathBuf,
    /// How much of the data device to use; `None`: all of it (less the
    /// label region). [`CreateOptions::data_size`] is not used.
    pub data_size: Option<Bytes>,
    /// Take devices holding a signature (a filesystem, a partition
    /// table, LVM, old pool metadata), as `mkfs -f` does. Never a device
    /// in use.
    pub force: bool,
}

fn check_create_options(o: &CreateOptions) -> Result<Bytes> {
    let min_data = Bytes(o.block_size.bytes().0 * 16);
    if o.data_size < min_data {
        return Err(Error::InvalidSize {
            input: o.data_size.to_string(),
            reason: format!("the data size must hold at least 16 pool blocks ({min_data})"),
        });
    }
    if o.base_size < o.fs.min_size() {
        return Err(Error::InvalidSize {
            input: o.base_size.to_string(),
            reason: format!(
                "{} needs a base device of at least {}",
                o.fs.name(),
                o.fs.min_size()
            ),
        });
    }
    if !o.base_size.0.is_multiple_of(4096) {
        return Err(Error::InvalidSize {
            input: o.base_size.to_string(),
            reason: "the base size must be a multiple of 4K".into(),
        });
    }
    if !(1..=99).contains(&o.low_water_percent) {
        return Err(Error::InvalidArgument(format!(
            "low-water mark {}% is out of range; use 1 to 99",
            o.low_water_percent
        )));
    }
    let meta = o
        .metadata_size
        .unwrap_or_else(|| units::default_metadata_size(o.data_size, o.block_size, 100_000));
    if !(units::MIN_METADATA..=units::MAX_METADATA).contains(&meta.0)
        || !meta.0.is_multiple_of(4096)
    {
        return Err(Error::InvalidSize {
            input: meta.to_string(),
            reason: format!(
                "the metadata size must be a multiple of 4K from {} to {}",
                Bytes(units::MIN_METADATA),
                Bytes(units::MAX_METADATA)
            ),
        });
    }
    Ok(meta)
}

impl Pool {
    /// Creates a pool under `root`: the sparse files, loop devices,
    /// thin-pool and a formatted base device. Checks everything it can
    /// (sizes, root, device-mapper, dm-thin, mkfs) before it creates
    /// anything; a failure half-way removes what it made.
    ///
    /// The root is made 0700 (an existing one must be this user's, and is
    /// tightened if looser), its files 0600; the metadata file is fully
    /// allocated on the host.
    ///
    /// # Errors
    /// [`Error::PoolExists`], [`Error::RootOwner`], the environment errors,
    /// bad sizes, kernel and tool errors; ENOSPC (exit 6) when the host
    /// cannot hold the metadata file.
    pub fn create(root: &Path, opts: &CreateOptions, wait: bool) -> Result<Pool> {
        Self::create_inner(root, opts, None, wait)
    }

    /// Creates a pool under `root` whose data and metadata are the block
    /// devices in `devices` (see [`crate::blockdev`]); everything else as
    /// [`Pool::create`]. The devices are checked before anything is
    /// written: a device mounted, held or open exclusively is refused, one
    /// holding a signature unless `devices.force`. Each gets thinlayer's
    /// label in its first MiB; the pool maps the rest.
    ///
    /// # Errors
    /// As [`Pool::create`]; [`Error::DeviceInUse`], [`Error::DeviceHasData`],
    /// [`Error::InvalidArgument`] (not a block device, the same device
    /// twice), [`Error::InvalidSize`] (a size past the device).
    pub fn create_on_devices(
        root: &Path,
        opts: &CreateOptions,
        devices: &DevicePair,
        wait: bool,
    ) -> Result<Pool> {
        Self::create_inner(root, opts, Some(devices), wait)
    }

    /// Resolves and checks the two devices and sets the sizes in `opts`
    /// from them. Reads only.
    fn pick_devices(
        d: &DevicePair,
        opts: &mut CreateOptions,
    ) -> Result<(blockdev::BlockDev, blockdev::BlockDev)> {
        let data = blockdev::resolve(&d.data)?;
        let meta = blockdev::resolve(&d.metadata)?;
        let nested = |a: &blockdev::BlockDev, b: &blockdev::BlockDev| {
            a.device == b.device || blockdev::partitions_of(&a.name).contains(&b.name)
        };
        if nested(&data, &meta) || nested(&meta, &data) {
            return Err(Error::InvalidArgument(format!(
                "{} and {} overlap (/dev/{} and /dev/{}); give two devices, e.g. two partitions of one disk",
                d.data.display(),
                d.metadata.display(),
                data.name,
                meta.name
            )));
        }
        blockdev::check_free(&data, &d.data, d.force)?;
        blockdev::check_free(&meta, &d.metadata, d.force)?;
        let block = opts.block_size.bytes().0;
        let room = |dev: &blockdev::BlockDev, given: &Path, want: Bytes, what: &str| {
            if want > dev.usable() {
                return Err(Error::InvalidSize {
                    input: want.to_string(),
                    reason: format!(
                        "the {what} device {} holds {} after thinlayer's {} label region; \
                         give at most that, or leave the size out to use it all",
                        given.display(),
                        dev.usable(),
                        Bytes(blockdev::LABEL_BYTES)
                    ),
                });
            }
            Ok(want)
        };
        let whole_data = Bytes(data.usable().0 / block * block);
        opts.data_size = room(&data, &d.data, d.data_size.unwrap_or(whole_data), "data")?;
        let whole_meta = Bytes(meta.usable().0.min(units::MAX_METADATA) / 4096 * 4096);
        opts.metadata_size = Some(room(
            &meta,
            &d.metadata,
            opts.metadata_size.unwrap_or(whole_meta),
            "metadata",
        )?);
        Ok((data, meta))
    }

    fn create_inner(
        root: &Path,
        opts: &CreateOptions,
        devices: Option<&DevicePair>,
        wait: bool,
    ) -> Result<Pool> {
        let layout = Layout {
            root: root.to_owned(),
        };
        // A pool here is said before anything about the devices (which it
        // holds).
        let interrupted = interrupted_create(&layout).is_some();
        if layout.pool_record().exists() && !interrupted {
            return Err(Error::PoolExists {
                root: root.to_owned(),
            });
        }
        let mut opts = opts.clone();
        // The devices are checked before anything is written; but an
        // interrupted create's tables may hold them and its label and
        // metadata lie on them: then they are checked once its leftovers
        // are cleared, below.
        let mut picked = match devices {
            Some(d) if !interrupted => Some(Self::pick_devices(d, &mut opts)?),
            _ => None,
        };
        if devices.is_none() || !interrupted {
            check_create_options(&opts)?;
        }
        let kernel = Kernel::open()?;
        opts.fs.mkfs().find()?;
        Tool::ThinCheck.find()?;
        file::check_owner(root)?;
        file::create_dir(root)?;
        let lock = lock::lock(root, LockMode::Exclusive, wait)?;
        file::secure_root(root, true)?;
        file::sweep_temp(root)?;
        if layout.pool_record().exists() {
            match interrupted_create(&layout) {
                Some(old) => {
                    tracing::info!(pool_id = %old.pool_id, "clearing an interrupted pool create");
                    clear_interrupted_create(&kernel, &layout, &old)?;
                }
                None => {
                    return Err(Error::PoolExists {
                        root: root.to_owned(),
                    });
                }
            }
        }
        if let (Some(d), None) = (devices, &picked) {
            picked = Some(Self::pick_devices(d, &mut opts)?);
        }
        let opts = &opts;
        let metadata_size = check_create_options(opts)?;
        let data_size =
            Bytes(opts.data_size.blocks_of(opts.block_size) * opts.block_size.bytes().0);
        let pool_id = PoolId::generate(&root.to_string_lossy());
        let backing = match (devices, &picked) {
            (Some(d), Some((data, meta))) => Backing::Devices {
                data: blockdev::device_ref(data, &d.data, &blockdev::new_uuid(&data.name)),
                metadata: blockdev::device_ref(meta, &d.metadata, &blockdev::new_uuid(&meta.name)),
            },
            _ => Backing::Files,
        };
        let rec = PoolRecord {
            backing,
            pool_id,
            data_size,
            metadata_size,
            block_size: opts.block_size,
            fs: opts.fs,
            base_size: opts.base_size,
            base_thin_id: 0,
            next_thin_id: 1,
            transaction_id: 1,
            low_water_percent: opts.low_water_percent,
            pending: None,
            spares: Vec::new(),
            trash: Vec::new(),
            created_unix: now_unix(),
            layers_gen: 0,
        };
        let mut undo = Undo {
            kernel: &kernel,
            devices: Vec::new(),
            files: Vec::new(),
            labels: Vec::new(),
        };
        // The intent first: leftovers of a crash from here on sit under a
        // record that says they are leftovers.
        let intent = PoolRecord {
            pending: Some(Pending::CreatePool),
            ..rec.clone()
        };
        undo.files.push(layout.pool_record());
        if let Err(e) = intent.save(&layout.pool_record()) {
            return Err(undo.run(e));
        }
        fault::point("pool_create.after_intent");
        match Self::build(&kernel, &layout, &rec, picked.as_ref(), &mut undo) {
            Ok(()) => {}
            Err(e) => return Err(undo.run(e)),
        }
        drop(undo);
        Ok(Pool::new(layout, rec, Some(kernel), lock))
    }

    fn build(
        kernel: &Kernel,
        layout: &Layout,
        rec: &PoolRecord,
        picked: Option<&(blockdev::BlockDev, blockdev::BlockDev)>,
        undo: &mut Undo<'_>,
    ) -> Result<()> {
        if let (Backing::Devices { data, metadata }, Some((data_dev, meta_dev))) =
            (&rec.backing, picked)
        {
            for (role, r, dev) in [
                (DeviceRole::Data, data, data_dev),
                (DeviceRole::Metadata, metadata, meta_dev),
            ] {
                let label = blockdev::Label {
                    pool_id: rec.pool_id.clone(),
                    role,
                    uuid: r.label_uuid.clone(),
                };
                undo.labels.push(dev.node.clone());
                blockdev::write_label(&dev.node, &label)?;
            }
        }
        let files: Vec<(PathBuf, Bytes)> = match rec.backing {
            Backing::Files => vec![
                (layout.data_file(), rec.data_size),
                (layout.metadata_file(), rec.metadata_size),
            ],
            _ => Vec::new(),
        };
        for (file, size) in files {
            // create_new: never overwrite a file we did not make. A new file
            // is all zeros, so the kernel formats fresh metadata (it keeps
            // old metadata when the superblock is not zero).
            let f = file::open_private(&file, true)?;
            undo.files.push(file.clone());
            if file == layout.metadata_file() {
                // Allocated on the host now: a full host filesystem later
                // fails data writes, never a metadata write.
                crate::space::allocate_file(&f, &file, size)?;
            } else {
                f.set_len(size.0)
                    .and_then(|()| f.sync_all())
                    .ctx(|| format!("size {} to {size}", file.display()))?;
            }
        }
        fault::point("pool_create.after_files");
        let (meta_dev, data_dev) = start_pool(kernel, layout, rec, &CREATE_POINTS, |name| {
            undo.devices.push(name.to_owned());
        })?;
        let _ = (meta_dev, data_dev);
        let pool = names::dm_name(&rec.pool_id, Role::Pool);
        let pool_dev = kernel
            .device(&pool)?
            .ok_or_else(|| Error::Inconsistent(format!("{pool:?} vanished after creation")))?;
        kernel.pool_message(&pool, &format!("create_thin {}", rec.base_thin_id))?;
        fault::point("pool_create.after_base_thin");
        let base = names::dm_name(&rec.pool_id, Role::Thin(rec.base_thin_id));
        undo.devices.push(base.clone());
        let dev = kernel.new_thin(
            &base,
            &names::dm_uuid(&rec.pool_id, Role::Thin(rec.base_thin_id)),
            pool_dev,
            kernel::ThinId::new(rec.base_thin_id)?,
            kernel::Sectors(rec.base_size.sectors()),
        )?;
        fault::point("pool_create.after_base_activation");
        make_filesystem(rec.fs, &kernel::devnode(dev))?;
        fault::point("pool_create.after_mkfs");
        kernel.remove(&base)?;
        fault::point("pool_create.after_base_teardown");
        kernel.set_transaction_id(&pool, 0, rec.transaction_id)?;
        fault::point("pool_create.after_set_transaction_id");
        file::create_dir(&layout.layers_dir())?;
        rec.save(&layout.pool_record())?;
        fault::point("pool_create.after_record");
        Ok(())
    }
}
