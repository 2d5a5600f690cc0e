//! The storage backends measured side by side: each makes read-only layers,
//! containers (a writable snapshot of a layer), mounts, commits and removes
//! them, and reports the space it uses.
//!
//! - [`ThinLayer`]: the engine in-process (the `Pool` API, records, checks,
//!   locks and all).
//! - [`Floor`]: the same kernel steps issued directly through the
//!   `devicemapper` crate on a pool of the same shape: `create_snap`,
//!   create -> load -> resume, mount; nothing else.
//! - [`Overlay`]: overlayfs with a lower directory per layer and upper+work
//!   per container, on ext4 or on XFS with `reflink=1`.
//! - [`Btrfs`]: subvolume snapshots (ioctls, no process per step).
//! - [`FullCopy`]: a full copy per layer and container (docker's vfs).
//!
//! Every backing file is sparse, on the guest's tmpfs, behind a loop device;
//! but for the pair on a disk (`--disk`, `src/disk.rs`): a [`ThinLayer`]
//! on sparse files in ext4 on the disk, and one on the disk itself.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use devicemapper::{
    DM, DevId, Device, DmFlags, DmName, DmNameBuf, DmOptions, Sectors, TargetTable, ThinDevId,
    ThinDevTargetTable, ThinPoolStatus, ThinTargetParams,
};
use thinlayer_pool::{BlockSize, Bytes, CreateOptions, DevicePair, FsType, LockMode, Pool, names};
use thinlayer_store::Store;

use crate::{
    btrfs,
    error::{DmContext, Error, IoContext, Result},
    sys,
};

/// Fills a writable layer directory.
pub type Fill<'a> = &'a mut dyn FnMut(&Path) -> Result<()>;

/// One storage backend under test.
pub trait Backend {
    /// Its short name in tables, JSON and plots.
    fn name(&self) -> &str;
    /// Makes read-only layer `id` on `parent` (or empty), its files written
    /// by `fill` into a writable directory, then flushed.
    ///
    /// # Errors
    /// Backend errors.
    fn make_layer(&mut self, id: &str, parent: Option<&str>, fill: Fill) -> Result<()>;
    /// The snapshot step of the start path: container `id` of layer
    /// `image`, not mounted.
    ///
    /// # Errors
    /// Backend errors.
    fn create(&mut self, id: &str, image: &str) -> Result<()>;
    /// Activates and mounts container `id`; returns its root directory.
    ///
    /// # Errors
    /// Backend errors.
    fn mount(&mut self, id: &str) -> Result<PathBuf>;
    /// Unmounts and deactivates container `id`.
    ///
    /// # Errors
    /// Backend errors.
    fn umount(&mut self, id: &str) -> Result<()>;
    /// Removes unmounted container `id` (its space returned).
    ///
    /// # Errors
    /// Backend errors.
    fn remove(&mut self, id: &str) -> Result<()>;
    /// Commits mounted container `id` as layer `as_id` (a snapshot).
    ///
    /// # Errors
    /// Backend errors.
    fn commit(&mut self, id: &str, as_id: &str) -> Result<()>;
    /// Removes layer `id` (no children, not mounted).
    ///
    /// # Errors
    /// Backend errors.
    fn remove_layer(&mut self, id: &str) -> Result<()>;
    /// Bytes allocated in the backend's own pool or filesystem (pool
    /// blocks for dm-thin, `statvfs` for the filesystems), after a flush.
    ///
    /// # Errors
    /// Backend errors.
    fn used_bytes(&mut self) -> Result<u64>;
    /// Bytes the sparse backing files hold on the host.
    ///
    /// # Errors
    /// I/O errors.
    fn backing_bytes(&self) -> Result<u64>;
    /// Bytes written so far to the backing loop device(s), from
    /// `/proc/diskstats`.
    ///
    /// # Errors
    /// I/O errors.
    fn device_bytes_written(&self) -> Result<u64>;
    /// Where container `id`'s upper (private) files live, if the backend
    /// keeps them apart (overlayfs).
    fn upper_dir(&self, _id: &str) -> Option<PathBuf> {
        None
    }
    /// What a long-lived server does between requests, off the request
    /// path (thinlayer-warm: reclaim removed layers, provision spares).
    /// The workloads call it between samples and time it on its own.
    ///
    /// # Errors
    /// Backend errors.
    fn idle(&mut self) -> Result<()> {
        Ok(())
    }
    /// Per-step times (name, ms) the backend took since the last call,
    /// where it can split a verb (the floor splits activate from mount).
    fn take_steps(&mut self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// Tears everything down and removes the backing files.
    ///
    /// # Errors
    /// Backend errors.
    fn teardown(&mut self) -> Result<()>;
}

/// Size and shape of the devices every backend gets.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Pool data / filesystem device size (sparse).
    pub device: u64,
    /// Virtual size of each thin device.
    pub thin: u64,
}

fn loop_bytes(files: &[PathBuf]) -> Result<u64> {
    let mut n = 0;
    for f in files {
        n += sys::sectors_written(&sys::loop_of(f)?)? * 512;
    }
    Ok(n)
}

fn pool_used_bytes(dm: &DM, pool: &DmName, block: u64) -> Result<u64> {
    let (_, lines) = dm
        .table_status(&DevId::Name(pool), DmOptions::default())
        .dm(|| format!("status of {pool}"))?;
    let line = lines
        .into_iter()
        .next()
        .map(|l| l.3)
        .ok_or_else(|| Error::Parse(format!("{pool} has no table")))?;
    match line
        .parse::<ThinPoolStatus>()
        .dm(|| format!("parse the status of {pool}"))?
    {
        ThinPoolStatus::Working(w) => Ok(w.usage.used_data.0 * block),
        _ => Err(Error::Parse(format!("{pool} has failed"))),
    }
}

fn flush_loops() {
    nix::unistd::sync();
}

// ---------------------------------------------------------------------------

/// thinlayer's engine, in-process: one open store (and so one pool lock)
/// for the whole run, as a long-lived daemon would hold it.
///
/// Warm (`thinlayer-warm`) is the same engine run as the containerd
/// snapshotter runs it: kernel teardown left for later (unmount and removal leave the
/// kernel work to [`Backend::idle`]) and one spare (a snapshot provisioned
/// ahead of demand) of every layer containers were made of.
pub struct ThinLayer {
    name: String,
    root: PathBuf,
    mnt: PathBuf,
    store: Option<Store>,
    dm: DM,
    block: u64,
    /// Warm: the layers to keep a spare of.
    warm: Option<Vec<String>>,
    /// On a disk: the kernel names of the disk slices under the pool (its
    /// data and metadata devices, or the filesystem holding its files),
    /// whose `/proc/diskstats` count what reached the disk.
    slices: Vec<String>,
    /// The pool is on block devices: no backing files.
    on_devices: bool,
}

impl ThinLayer {
    /// Creates a pool under `dir` of `sizes` with `block` bytes per block.
    ///
    /// # Errors
    /// Pool create errors.
    pub fn new(name: &str, dir: &Path, sizes: &Sizes, block: u64) -> Result<ThinLayer> {
        Self::build(name, dir, sizes, block, None, &[])
    }

    /// A pool of sparse files under `dir`, a filesystem on the disk slice
    /// `slice` (kernel name): what reaches the disk is counted there.
    ///
    /// # Errors
    /// Pool create errors.
    pub fn on_filesystem(
        name: &str,
        dir: &Path,
        sizes: &Sizes,
        block: u64,
        slice: &str,
    ) -> Result<ThinLayer> {
        Self::build(name, dir, sizes, block, None, &[slice])
    }

    /// A pool on the block devices `devices` (its root under `dir`); what
    /// reaches the disk is counted on `slices` (the devices' kernel names).
    ///
    /// # Errors
    /// Pool create errors (a device in use, one too small).
    pub fn on_devices(
        name: &str,
        dir: &Path,
        sizes: &Sizes,
        block: u64,
        devices: &DevicePair,
        slices: &[&str],
    ) -> Result<ThinLayer> {
        Self::build(name, dir, sizes, block, Some(devices), slices)
    }

    fn build(
        name: &str,
        dir: &Path,
        sizes: &Sizes,
        block: u64,
        devices: Option<&DevicePair>,
        slices: &[&str],
    ) -> Result<ThinLayer> {
        let root = dir.join("root");
        let opts = CreateOptions {
            data_size: Bytes(sizes.device),
            metadata_size: None,
            block_size: BlockSize::new(Bytes(block))?,
            fs: FsType::Ext4,
            base_size: Bytes(sizes.thin),
            low_water_percent: 95,
        };
        drop(match devices {
            Some(d) => Pool::create_on_devices(&root, &opts, d, false)?,
            None => Pool::create(&root, &opts, false)?,
        });
        let store = Store::open(&root, LockMode::Exclusive, false)?;
        Ok(ThinLayer {
            name: name.to_owned(),
            mnt: sys::mkdir(&dir.join("mnt"))?,
            root,
            store: Some(store),
            dm: DM::new().dm(|| "open /dev/mapper/control".into())?,
            block,
            warm: None,
            slices: slices.iter().map(|s| (*s).to_owned()).collect(),
            on_devices: devices.is_some(),
        })
    }

    /// The warm variant (see the type's notes).
    ///
    /// # Errors
    /// As [`ThinLayer::new`].
    pub fn warm(name: &str, dir: &Path, sizes: &Sizes, block: u64) -> Result<ThinLayer> {
        let mut t = ThinLayer::new(name, dir, sizes, block)?;
        t.pool().set_teardown_later(true);
        t.warm = Some(Vec::new());
        Ok(t)
    }

    /// Bytes discarded on its disk slices so far (0 when not on a disk).
    ///
    /// # Errors
    /// I/O errors.
    pub fn disk_bytes_discarded(&self) -> Result<u64> {
        let mut n = 0;
        for s in &self.slices {
            n += sys::sectors_discarded(s)? * 512;
        }
        Ok(n)
    }

    /// The store, for the image import workload.
    pub fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("open until teardown")
    }

    fn pool(&mut self) -> &mut Pool {
        self.store().pool()
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.mnt.join(id)
    }
}

impl Backend for ThinLayer {
    fn name(&self) -> &str {
        &self.name
    }

    fn make_layer(&mut self, id: &str, parent: Option<&str>, fill: Fill) -> Result<()> {
        self.pool().create_layer(id, parent)?;
        let dir = self.dir(id);
        self.pool()
            .mount_layer(id, &dir, thinlayer_pool::MountUse::Container)?;
        let filled = fill(&dir).and_then(|()| sys::syncfs(&dir));
        self.pool().umount(id)?;
        filled
    }

    fn create(&mut self, id: &str, image: &str) -> Result<()> {
        self.pool().create_layer(id, Some(image))?;
        if let Some(w) = self.warm.as_mut().filter(|w| !w.iter().any(|l| l == image)) {
            w.push(image.to_owned());
        }
        Ok(())
    }

    fn mount(&mut self, id: &str) -> Result<PathBuf> {
        let dir = self.dir(id);
        self.pool()
            .mount_layer(id, &dir, thinlayer_pool::MountUse::Container)?;
        Ok(dir)
    }

    fn idle(&mut self) -> Result<()> {
        let Some(layers) = self.warm.clone() else {
            return Ok(());
        };
        self.pool().reclaim()?;
        let mut keep = Vec::new();
        for l in layers {
            // A layer gone or written since is no longer a parent to keep.
            match self.pool().provision(Some(&l), 1) {
                Ok(_) => keep.push(l),
                Err(
                    thinlayer_pool::Error::UnknownLayer(_) | thinlayer_pool::Error::Busy { .. },
                ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.warm = Some(keep);
        Ok(())
    }

    fn umount(&mut self, id: &str) -> Result<()> {
        self.pool().umount(id)?;
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        self.pool().remove_layer(id)?;
        let _ = fs::remove_dir(self.dir(id));
        Ok(())
    }

    fn commit(&mut self, id: &str, as_id: &str) -> Result<()> {
        self.pool().create_layer(as_id, Some(id))?;
        Ok(())
    }

    fn remove_layer(&mut self, id: &str) -> Result<()> {
        self.remove(id)
    }

    fn used_bytes(&mut self) -> Result<u64> {
        flush_loops();
        if self.warm.is_some() {
            // As a server would have by then: removed layers reclaimed.
            self.pool().reclaim()?;
        }
        let pool = names::dm_name(&self.pool().record().pool_id.clone(), names::Role::Pool);
        pool_used_bytes(&self.dm, &pool, self.block)
    }

    fn backing_bytes(&self) -> Result<u64> {
        if self.on_devices {
            return Err(Error::Parse(format!(
                "{}: a pool on block devices has no backing file",
                self.name
            )));
        }
        sys::allocated(&self.root.join("data.img"))
    }

    fn device_bytes_written(&self) -> Result<u64> {
        if self.slices.is_empty() {
            return loop_bytes(&[self.root.join("data.img")]);
        }
        let mut n = 0;
        for s in &self.slices {
            n += sys::sectors_written(s)? * 512;
        }
        Ok(n)
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(store) = self.store.take() {
            drop(store);
            Pool::open(&self.root, LockMode::Exclusive, false)?.destroy(true)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

/// The in-process floor: the kernel steps alone, on a pool of the same
/// shape (made by the engine, then driven directly). Thin devices are
/// named `tlbench-floor-ID`, outside the engine's names.
pub struct Floor {
    root: PathBuf,
    mnt: PathBuf,
    dm: DM,
    pool: DmNameBuf,
    pool_dev: Device,
    block: u64,
    thin_sectors: u64,
    base_id: u32,
    next_id: u32,
    ids: HashMap<String, u32>,
    active: HashMap<String, DmNameBuf>,
    steps: Vec<(&'static str, f64)>,
}

impl Floor {
    /// Creates the pool under `dir` (through the engine, untimed).
    ///
    /// # Errors
    /// Pool create and device-mapper errors.
    pub fn new(dir: &Path, sizes: &Sizes, block: u64) -> Result<Floor> {
        let root = dir.join("root");
        let opts = CreateOptions {
            data_size: Bytes(sizes.device),
            metadata_size: None,
            block_size: BlockSize::new(Bytes(block))?,
            fs: FsType::Ext4,
            base_size: Bytes(sizes.thin),
            low_water_percent: 95,
        };
        let mut pool = Pool::create(&root, &opts, false)?;
        let pool_dev = pool.require_active()?;
        let rec = pool.record().clone();
        drop(pool);
        Ok(Floor {
            mnt: sys::mkdir(&dir.join("mnt"))?,
            root,
            dm: DM::new().dm(|| "open /dev/mapper/control".into())?,
            pool: names::dm_name(&rec.pool_id, names::Role::Pool),
            pool_dev,
            block,
            thin_sectors: rec.base_size.sectors(),
            base_id: rec.base_thin_id,
            next_id: 1_000_000,
            ids: HashMap::new(),
            active: HashMap::new(),
            steps: Vec::new(),
        })
    }

    /// The pool's block size, bytes.
    pub fn block_bytes(&self) -> u64 {
        self.block
    }

    /// The thin id of the pool's formatted base device.
    pub fn base_thin_id(&self) -> u32 {
        self.base_id
    }

    /// The device-mapper handle and pool name, for the ioctl costs.
    pub fn dm(&self) -> (&DM, &DmName) {
        (&self.dm, &self.pool)
    }

    fn msg(&self, m: &str) -> Result<()> {
        self.dm
            .target_msg(&DevId::Name(&self.pool), None, m)
            .map(|_| ())
            .dm(|| format!("send `{m}` to {}", &*self.pool))
    }

    fn thin_of(&self, id: &str) -> Result<u32> {
        self.ids
            .get(id)
            .copied()
            .ok_or_else(|| Error::Parse(format!("floor: no thin device {id}")))
    }

    fn snap(&mut self, id: &str, origin: u32, origin_active: Option<&DmName>) -> Result<()> {
        let new = self.next_id;
        self.next_id += 1;
        let m = format!("create_snap {new} {origin}");
        match origin_active {
            None => {
                let t = Instant::now();
                self.msg(&m)?;
                self.steps
                    .push(("DM_TARGET_MSG create_snap", sys::ms_since(t)));
            }
            Some(o) => {
                let dev = DevId::Name(o);
                self.dm
                    .device_suspend(&dev, DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
                    .dm(|| format!("suspend {o}"))?;
                let sent = self.msg(&m);
                self.dm
                    .device_suspend(&dev, DmOptions::default())
                    .dm(|| format!("resume {o}"))?;
                sent?;
            }
        }
        self.ids.insert(id.to_owned(), new);
        Ok(())
    }

    fn activate(&mut self, id: &str) -> Result<PathBuf> {
        let thin = self.thin_of(id)?;
        let name =
            DmNameBuf::new(format!("tlbench-floor-{thin}")).dm(|| "name a floor device".into())?;
        let table = ThinDevTargetTable::new(
            Sectors(0),
            Sectors(self.thin_sectors),
            ThinTargetParams::new(
                self.pool_dev,
                ThinDevId::new_u64(u64::from(thin)).dm(|| "thin id".into())?,
                None,
            ),
        );
        let dev = DevId::Name(&name);
        let t = Instant::now();
        self.dm
            .device_create(&name, None, DmOptions::private())
            .dm(|| format!("create {}", &*name))?;
        let t1 = Instant::now();
        self.dm
            .table_load(&dev, &table.to_raw_table(), DmOptions::private())
            .dm(|| format!("load {}", &*name))?;
        let t2 = Instant::now();
        let info = self
            .dm
            .device_suspend(&dev, DmOptions::private())
            .dm(|| format!("resume {}", &*name))?;
        let t3 = Instant::now();
        let node = PathBuf::from(format!("/dev/dm-{}", info.device().minor));
        let dir = sys::mkdir(&self.mnt.join(id))?;
        sys::mount(&node, &dir, "ext4", FsType::Ext4.mount_options())?;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        self.steps.extend([
            ("DM_DEV_CREATE", ms(t, t1)),
            ("DM_TABLE_LOAD (thin)", ms(t1, t2)),
            ("DM_DEV_SUSPEND (resume)", ms(t2, t3)),
            ("mount(2) ext4", sys::ms_since(t3)),
        ]);
        self.active.insert(id.to_owned(), name);
        Ok(dir)
    }

    /// Makes `id` a fresh thin device formatted by `mkfs.ext4` with the
    /// options `mkfs` (the layout workload's candidates), then takes its
    /// device down; snapshots of it are made with [`Backend::make_layer`].
    ///
    /// # Errors
    /// Device-mapper and mkfs errors.
    pub fn format_fresh(&mut self, id: &str, mkfs: &[&str]) -> Result<()> {
        let new = self.next_id;
        self.next_id += 1;
        self.msg(&format!("create_thin {new}"))?;
        self.ids.insert(id.to_owned(), new);
        let name =
            DmNameBuf::new(format!("tlbench-floor-{new}")).dm(|| "name a floor device".into())?;
        let table = ThinDevTargetTable::new(
            Sectors(0),
            Sectors(self.thin_sectors),
            ThinTargetParams::new(
                self.pool_dev,
                ThinDevId::new_u64(u64::from(new)).dm(|| "thin id".into())?,
                None,
            ),
        );
        let dev = DevId::Name(&name);
        self.dm
            .device_create(&name, None, DmOptions::private())
            .dm(|| format!("create {}", &*name))?;
        let up = self
            .dm
            .table_load(&dev, &table.to_raw_table(), DmOptions::private())
            .and_then(|_| self.dm.device_suspend(&dev, DmOptions::private()))
            .dm(|| format!("load and resume {}", &*name));
        let made = up.and_then(|info| {
            let node = format!("/dev/dm-{}", info.device().minor);
            let mut args = vec!["-q", "-F"];
            args.extend_from_slice(mkfs);
            args.push(&node);
            sys::tool("mkfs.ext4", &args)
        });
        let removed = self
            .dm
            .device_remove(&dev, DmOptions::private())
            .dm(|| format!("remove {}", &*name));
        made.and(removed.map(|_| ()))
    }

    fn deactivate(&mut self, id: &str) -> Result<()> {
        if let Some(name) = self.active.remove(id) {
            sys::umount(&self.mnt.join(id))?;
            self.dm
                .device_remove(&DevId::Name(&name), DmOptions::private())
                .dm(|| format!("remove {}", &*name))?;
        }
        Ok(())
    }
}

impl Backend for Floor {
    fn name(&self) -> &str {
        "floor"
    }

    fn make_layer(&mut self, id: &str, parent: Option<&str>, fill: Fill) -> Result<()> {
        let origin = match parent {
            Some(p) => self.thin_of(p)?,
            None => self.base_id,
        };
        self.snap(id, origin, None)?;
        let dir = self.activate(id)?;
        let filled = fill(&dir).and_then(|()| sys::syncfs(&dir));
        self.deactivate(id)?;
        filled
    }

    fn create(&mut self, id: &str, image: &str) -> Result<()> {
        let origin = self.thin_of(image)?;
        self.snap(id, origin, None)
    }

    fn mount(&mut self, id: &str) -> Result<PathBuf> {
        self.activate(id)
    }

    fn umount(&mut self, id: &str) -> Result<()> {
        self.deactivate(id)
    }

    fn take_steps(&mut self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut self.steps)
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        let thin = self.thin_of(id)?;
        self.msg(&format!("delete {thin}"))?;
        self.ids.remove(id);
        let _ = fs::remove_dir(self.mnt.join(id));
        Ok(())
    }

    fn commit(&mut self, id: &str, as_id: &str) -> Result<()> {
        let origin = self.thin_of(id)?;
        let active = self.active.get(id).cloned();
        self.snap(as_id, origin, active.as_deref())
    }

    fn remove_layer(&mut self, id: &str) -> Result<()> {
        self.remove(id)
    }

    fn used_bytes(&mut self) -> Result<u64> {
        flush_loops();
        pool_used_bytes(&self.dm, &self.pool, self.block)
    }

    fn backing_bytes(&self) -> Result<u64> {
        sys::allocated(&self.root.join("data.img"))
    }

    fn device_bytes_written(&self) -> Result<u64> {
        loop_bytes(&[self.root.join("data.img")])
    }

    fn teardown(&mut self) -> Result<()> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            self.deactivate(&id)?;
        }
        if self.root.join("pool.rec").exists() {
            Pool::open(&self.root, LockMode::Exclusive, false)?.destroy(true)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

/// A filesystem on a loop device over a sparse file on tmpfs.
struct LoopFs {
    img: PathBuf,
    fs: PathBuf,
}

impl LoopFs {
    fn new(dir: &Path, size: u64, fstype: &str, mkfs: &[&str]) -> Result<LoopFs> {
        let img = dir.join("fs.img");
        sys::sparse_file(&img, size)?;
        let mut args = mkfs.to_vec();
        let img_s = img.to_string_lossy().into_owned();
        args.push(&img_s);
        sys::tool(args[0], &args[1..])?;
        let lp = thinlayer_pool::loopback::attach(&img)?;
        let fs = sys::mkdir(&dir.join("fs"))?;
        sys::mount(&lp.path, &fs, fstype, "")?;
        // The mount holds the loop device now; autoclear detaches it at umount.
        drop(lp);
        sys::mkdir(&fs.join("l"))?;
        sys::mkdir(&fs.join("c"))?;
        Ok(LoopFs { img, fs })
    }

    /// A layer's directory (`l/ID`) on the filesystem.
    fn layer_dir(&self, id: &str) -> PathBuf {
        self.fs.join("l").join(id)
    }

    /// A container's directory (`c/ID`) on the filesystem.
    fn cdir(&self, id: &str) -> PathBuf {
        self.fs.join("c").join(id)
    }

    fn used(&self) -> Result<u64> {
        sys::syncfs(&self.fs)?;
        sys::fs_used(&self.fs)
    }

    fn teardown(&self) -> Result<()> {
        if self.fs.exists() {
            let _ = sys::umount(&self.fs);
        }
        let _ = fs::remove_file(&self.img);
        Ok(())
    }
}

/// overlayfs: a lower directory per layer (its diff), upper + work per
/// container; containers' lower stacks list the image's layers top first.
pub struct Overlay {
    name: String,
    lfs: LoopFs,
    chains: HashMap<String, Vec<PathBuf>>,
    containers: HashMap<String, String>,
}

impl Overlay {
    /// overlayfs on ext4 (`xfs == false`) or on XFS with `reflink=1`.
    ///
    /// # Errors
    /// mkfs, loop and mount errors.
    pub fn new(dir: &Path, sizes: &Sizes, xfs: bool) -> Result<Overlay> {
        let (name, lfs) = if xfs {
            (
                "overlay-xfs",
                LoopFs::new(
                    dir,
                    sizes.device,
                    "xfs",
                    &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
                )?,
            )
        } else {
            (
                "overlay-ext4",
                LoopFs::new(dir, sizes.device, "ext4", &["mkfs.ext4", "-q", "-F"])?,
            )
        };
        Ok(Overlay {
            name: name.to_owned(),
            lfs,
            chains: HashMap::new(),
            containers: HashMap::new(),
        })
    }

    fn chain(&self, id: &str) -> Result<Vec<PathBuf>> {
        self.chains
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Parse(format!("{}: no layer {id}", self.name)))
    }

    fn mount_at(lower: &[PathBuf], upper: &Path, work: &Path, merged: &Path) -> Result<()> {
        let lowers = lower
            .iter()
            .map(|p| p.join("diff").to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let opts = format!(
            "lowerdir={lowers},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        sys::mount(Path::new("overlay"), merged, "overlay", &opts)
    }

    /// Imports layer tars into lower directories, each applied through an
    /// overlay mount of the layers below it (so hard links and whiteouts
    /// into lower layers resolve, and the kernel writes overlay's own
    /// whiteouts); returns the layers' ids.
    ///
    /// # Errors
    /// Apply errors.
    pub fn import(&mut self, prefix: &str, blobs: &[PathBuf]) -> Result<Vec<String>> {
        let mut ids: Vec<String> = Vec::new();
        for (i, blob) in blobs.iter().enumerate() {
            let id = format!("{prefix}{i}");
            let parent = ids.last().cloned();
            self.make_layer(&id, parent.as_deref(), &mut |dir: &Path| {
                let f = fs::File::open(blob).ctx(|| format!("open {}", blob.display()))?;
                thinlayer_image::apply_layer(
                    dir,
                    std::io::BufReader::new(f),
                    &thinlayer_image::ApplyOptions::default(),
                )?;
                Ok(())
            })?;
            ids.push(id);
        }
        Ok(ids)
    }
}

impl Backend for Overlay {
    fn name(&self) -> &str {
        &self.name
    }

    fn make_layer(&mut self, id: &str, parent: Option<&str>, fill: Fill) -> Result<()> {
        let dir = self.lfs.layer_dir(id);
        let diff = sys::mkdir(&dir.join("diff"))?;
        let mut chain = match parent {
            Some(p) => self.chain(p)?,
            None => Vec::new(),
        };
        if chain.is_empty() {
            fill(&diff)?;
        } else {
            let work = sys::mkdir(&dir.join("work"))?;
            let merged = sys::mkdir(&dir.join("merged"))?;
            Self::mount_at(&chain, &diff, &work, &merged)?;
            let filled = fill(&merged).and_then(|()| sys::syncfs(&merged));
            sys::umount(&merged)?;
            filled?;
            fs::remove_dir_all(&work).ctx(|| format!("remove {}", work.display()))?;
            let _ = fs::remove_dir(&merged);
        }
        sys::syncfs(&self.lfs.fs)?;
        chain.insert(0, dir);
        self.chains.insert(id.to_owned(), chain);
        Ok(())
    }

    fn create(&mut self, id: &str, image: &str) -> Result<()> {
        self.chain(image)?;
        let c = self.lfs.cdir(id);
        for sub in ["upper", "work", "merged"] {
            fs::create_dir_all(c.join(sub)).ctx(|| format!("create {}", c.display()))?;
        }
        self.containers.insert(id.to_owned(), image.to_owned());
        Ok(())
    }

    fn mount(&mut self, id: &str) -> Result<PathBuf> {
        let image = self
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Parse(format!("{}: no container {id}", self.name)))?;
        let chain = self.chain(&image)?;
        let c = self.lfs.cdir(id);
        let merged = c.join("merged");
        Self::mount_at(&chain, &c.join("upper"), &c.join("work"), &merged)?;
        Ok(merged)
    }

    fn umount(&mut self, id: &str) -> Result<()> {
        sys::umount(&self.lfs.cdir(id).join("merged"))
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        let c = self.lfs.cdir(id);
        fs::remove_dir_all(&c).ctx(|| format!("remove {}", c.display()))?;
        self.containers.remove(id);
        Ok(())
    }

    fn commit(&mut self, id: &str, as_id: &str) -> Result<()> {
        let image = self
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::Parse(format!("{}: no container {id}", self.name)))?;
        let dir = self.lfs.layer_dir(as_id);
        sys::copy_tree(&self.lfs.cdir(id).join("upper"), &dir.join("diff"))?;
        sys::syncfs(&self.lfs.fs)?;
        let mut chain = self.chain(&image)?;
        chain.insert(0, dir);
        self.chains.insert(as_id.to_owned(), chain);
        Ok(())
    }

    fn remove_layer(&mut self, id: &str) -> Result<()> {
        let d = self.lfs.layer_dir(id);
        fs::remove_dir_all(&d).ctx(|| format!("remove {}", d.display()))?;
        self.chains.remove(id);
        Ok(())
    }

    fn used_bytes(&mut self) -> Result<u64> {
        self.lfs.used()
    }

    fn backing_bytes(&self) -> Result<u64> {
        sys::allocated(&self.lfs.img)
    }

    fn device_bytes_written(&self) -> Result<u64> {
        loop_bytes(std::slice::from_ref(&self.lfs.img))
    }

    fn upper_dir(&self, id: &str) -> Option<PathBuf> {
        Some(self.lfs.cdir(id).join("upper"))
    }

    fn teardown(&mut self) -> Result<()> {
        let ids: Vec<String> = self.containers.keys().cloned().collect();
        for id in ids {
            let _ = sys::umount(&self.lfs.cdir(&id).join("merged"));
        }
        self.lfs.teardown()
    }
}

// ---------------------------------------------------------------------------

/// btrfs: a subvolume per layer, a snapshot (writable) per container and
/// per commit, through the btrfs ioctls; no mount per container.
pub struct Btrfs {
    lfs: LoopFs,
}

impl Btrfs {
    /// Loads the module (about a second under TCG, untimed), makes and
    /// mounts the filesystem.
    ///
    /// # Errors
    /// modprobe, mkfs, loop and mount errors.
    pub fn new(dir: &Path, sizes: &Sizes) -> Result<Btrfs> {
        if !fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("btrfs")
        {
            sys::tool("modprobe", &["btrfs"])?;
        }
        let lfs = LoopFs::new(dir, sizes.device, "btrfs", &["mkfs.btrfs", "-q", "-f"])?;
        Ok(Btrfs { lfs })
    }
}

impl Backend for Btrfs {
    fn name(&self) -> &str {
        "btrfs"
    }

    fn make_layer(&mut self, id: &str, parent: Option<&str>, fill: Fill) -> Result<()> {
        let dir = self.lfs.layer_dir(id);
        match parent {
            Some(p) => btrfs::snapshot(&self.lfs.layer_dir(p), &dir)?,
            None => btrfs::create_subvolume(&dir)?,
        }
        fill(&dir)?;
        sys::syncfs(&self.lfs.fs)
    }

    fn create(&mut self, id: &str, image: &str) -> Result<()> {
        btrfs::snapshot(&self.lfs.layer_dir(image), &self.lfs.cdir(id))
    }

    fn mount(&mut self, id: &str) -> Result<PathBuf> {
        Ok(self.lfs.cdir(id))
    }

    fn umount(&mut self, _id: &str) -> Result<()> {
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        btrfs::destroy(&self.lfs.cdir(id))
    }

    fn commit(&mut self, id: &str, as_id: &str) -> Result<()> {
        btrfs::snapshot(&self.lfs.cdir(id), &self.lfs.layer_dir(as_id))
    }

    fn remove_layer(&mut self, id: &str) -> Result<()> {
        btrfs::destroy(&self.lfs.layer_dir(id))
    }

    fn used_bytes(&mut self) -> Result<u64> {
        self.lfs.used()
    }

    fn backing_bytes(&self) -> Result<u64> {
        sys::allocated(&self.lfs.img)
    }

    fn device_bytes_written(&self) -> Result<u64> {
        loop_bytes(std::slice::from_ref(&self.lfs.img))
    }

    fn teardown(&mut self) -> Result<()> {
        self.lfs.teardown()
    }
}

// ---------------------------------------------------------------------------

/// A full copy per layer and per container, on ext4 (docker's vfs).
pub struct FullCopy {
    lfs: LoopFs,
}

impl FullCopy {
    /// Makes and mounts the ext4 filesystem.
    ///
    /// # Errors
    /// mkfs, loop and mount errors.
    pub fn new(dir: &Path, sizes: &Sizes) -> Result<FullCopy> {
        let lfs = LoopFs::new(dir, sizes.device, "ext4", &["mkfs.ext4", "-q", "-F"])?;
        Ok(FullCopy { lfs })
    }
}

impl Backend for FullCopy {
    fn name(&self) -> &str {
        "vfs-copy"
    }

    fn make_layer(&mut self, id: &str, parent: Option<&str>, fill: Fill) -> Result<()> {
        let dir = self.lfs.layer_dir(id);
        match parent {
            Some(p) => sys::copy_tree(&self.lfs.layer_dir(p), &dir)?,
            None => {
                sys::mkdir(&dir)?;
            }
        }
        fill(&dir)?;
        sys::syncfs(&self.lfs.fs)
    }

    fn create(&mut self, id: &str, image: &str) -> Result<()> {
        sys::copy_tree(&self.lfs.layer_dir(image), &self.lfs.cdir(id))?;
        sys::syncfs(&self.lfs.fs)
    }

    fn mount(&mut self, id: &str) -> Result<PathBuf> {
        Ok(self.lfs.cdir(id))
    }

    fn umount(&mut self, _id: &str) -> Result<()> {
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        let c = self.lfs.cdir(id);
        fs::remove_dir_all(&c).ctx(|| format!("remove {}", c.display()))
    }

    fn commit(&mut self, id: &str, as_id: &str) -> Result<()> {
        sys::copy_tree(&self.lfs.cdir(id), &self.lfs.layer_dir(as_id))?;
        sys::syncfs(&self.lfs.fs)
    }

    fn remove_layer(&mut self, id: &str) -> Result<()> {
        let d = self.lfs.layer_dir(id);
        fs::remove_dir_all(&d).ctx(|| format!("remove {}", d.display()))
    }

    fn used_bytes(&mut self) -> Result<u64> {
        self.lfs.used()
    }

    fn backing_bytes(&self) -> Result<u64> {
        sys::allocated(&self.lfs.img)
    }

    fn device_bytes_written(&self) -> Result<u64> {
        loop_bytes(std::slice::from_ref(&self.lfs.img))
    }

    fn teardown(&mut self) -> Result<()> {
        self.lfs.teardown()
    }
}
