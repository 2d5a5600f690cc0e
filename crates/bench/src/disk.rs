//! Loop files against a disk: thinlayer on sparse files in a filesystem on
//! a disk, against thinlayer on that disk itself, in one guest: what the
//! loop layer costs.
//!
//! Protocol: the disk given (`thinlayer bench --disk DEV`, or
//! `THINLAYER_BENCH_DISK`) is cut with dm-linear, as LVM would cut it,
//! into three slices: the metadata and data devices of a pool on devices
//! (`Pool::create_on_devices`), and an ext4 filesystem (mounted with the
//! defaults, so no `discard`) holding the other pool's root: its
//! `data.img` and `metadata.img` behind loop devices, as `thinlayer pool
//! create --root` on a host filesystem on that disk makes them. Both
//! pools' roots (records) are on that ext4, and both reach the disk
//! through a slice of the same kind: the difference is ext4 and the loop
//! driver. What reaches the disk is read from the slices'
//! `/proc/diskstats` (the data and metadata slices, or the filesystem's).
//!
//! What must never happen: a disk that is mounted, held or open
//! exclusively taken (the engine's own device checks refuse it); a slice,
//! mount or pool left behind (teardown runs on error too). What the disk
//! held is lost.

use std::path::{Path, PathBuf};

use devicemapper::{DmNameBuf, DmUuidBuf, Sectors};
use thinlayer_pool::{blockdev, kernel::Kernel};

use crate::{
    error::{DmContext, Error, Result},
    sys,
};

/// The metadata slice: 128 MiB, room for the metadata of any data slice
/// the bench makes.
const META_SLICE: u64 = 128 << 20;

/// The disk, sliced; the ext4 slice mounted.
pub(crate) struct Slices {
    kernel: Kernel,
    /// The slices made, in order (removed in reverse).
    made: Vec<DmNameBuf>,
    /// The metadata and data slices' nodes (`/dev/dm-N`).
    pub(crate) meta: PathBuf,
    /// The data slice's node.
    pub(crate) data: PathBuf,
    /// The data and metadata slices' kernel names (`dm-N`), for
    /// `/proc/diskstats`.
    pub(crate) pool_names: [String; 2],
    /// The ext4 slice's kernel name.
    pub(crate) fs_name: String,
    /// Where the ext4 slice is mounted, while it is.
    fs_dir: Option<PathBuf>,
    /// Bytes in each of the data and ext4 slices.
    slice: u64,
}

impl Slices {
    /// Checks `disk` is free, cuts it into the three slices, makes ext4 on
    /// the last and mounts it at `dir`. Needs room for a data slice and a
    /// filesystem of at least `need` bytes each.
    ///
    /// # Errors
    /// A disk in use or too small, device-mapper, mkfs and mount errors
    /// (what was made is removed first).
    pub(crate) fn new(disk: &Path, dir: &Path, need: u64) -> Result<Slices> {
        let dev = blockdev::resolve(disk)?;
        // Forced: a signature on it is no refusal (what it holds is lost),
        // but a disk mounted, held or open exclusively is.
        blockdev::check_free(&dev, disk, true)?;
        let slice = (dev.size.0.saturating_sub(META_SLICE) / 2) & !((1 << 20) - 1);
        if slice < need {
            return Err(Error::Parse(format!(
                "{} holds {} MiB; the loop-files-against-a-disk pair needs at least {} MiB \
                 (two slices of {} MiB and {} MiB of metadata): give a larger disk",
                disk.display(),
                dev.size.0 >> 20,
                (META_SLICE + 2 * need) >> 20,
                need >> 20,
                META_SLICE >> 20
            )));
        }
        let mut s = Slices {
            kernel: Kernel::open()?,
            made: Vec::new(),
            meta: PathBuf::new(),
            data: PathBuf::new(),
            pool_names: Default::default(),
            fs_name: String::new(),
            fs_dir: None,
            slice,
        };
        match s.make(dev.device, dir) {
            Ok(()) => Ok(s),
            Err(e) => {
                let _ = s.teardown();
                Err(e)
            }
        }
    }

    fn make(&mut self, under: devicemapper::Device, dir: &Path) -> Result<()> {
        let mut nodes = Vec::new();
        for (role, offset, len) in [
            ("meta", 0, META_SLICE),
            ("data", META_SLICE, self.slice),
            ("fs", META_SLICE + self.slice, self.slice),
        ] {
            let name =
                DmNameBuf::new(format!("tlbench-disk-{role}")).dm(|| "name a disk slice".into())?;
            let uuid = DmUuidBuf::new(format!("TLBENCH-disk-{role}"))
                .dm(|| "uuid of a disk slice".into())?;
            let (offset, len) = (Sectors(offset / 512), Sectors(len / 512));
            let dev = self
                .kernel
                .create_linear(&name, &uuid, under, offset, len)?;
            self.made.push(name);
            nodes.push(blockdev::node_of(dev)?);
        }
        let name_of = |n: &Path| {
            n.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        self.pool_names = [name_of(&nodes[1]), name_of(&nodes[0])];
        self.fs_name = name_of(&nodes[2]);
        let fs_node = nodes.pop().expect("three slices");
        self.data = nodes.pop().expect("three slices");
        self.meta = nodes.pop().expect("three slices");
        sys::tool("mkfs.ext4", &["-q", "-F", &fs_node.to_string_lossy()])?;
        let dir = sys::mkdir(dir)?;
        sys::mount(&fs_node, &dir, "ext4", "")?;
        self.fs_dir = Some(dir);
        Ok(())
    }

    /// The mounted ext4 slice.
    pub(crate) fn fs_dir(&self) -> &Path {
        self.fs_dir
            .as_deref()
            .expect("mounted from new until teardown")
    }

    /// The pools' data size: `want` or less, so that a sparse `data.img`
    /// of it, its metadata file and ext4's own blocks fit in the ext4
    /// slice (three quarters of it), a multiple of `block`.
    pub(crate) fn data_size(&self, want: u64, block: u64) -> u64 {
        want.min(self.slice / 4 * 3) / block * block
    }

    /// Unmounts the filesystem and removes the slices (each step tried).
    ///
    /// # Errors
    /// The first failure.
    pub(crate) fn teardown(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(dir) = self.fs_dir.take() {
            result = sys::umount(&dir);
        }
        while let Some(name) = self.made.pop() {
            if let Err(e) = self.kernel.remove(&name) {
                result = result.and(Err(e.into()));
            }
        }
        result
    }
}
