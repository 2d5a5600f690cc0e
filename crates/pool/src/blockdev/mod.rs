//! Real block devices as a pool's data and metadata: a whole disk, a
//! partition or a logical volume, in place of the sparse files.
//!
//! Each device starts with a reserved region of [`LABEL_BYTES`] (1 MiB,
//! like LVM's first physical extent); its first sector holds thinlayer's
//! label: a magic, a CRC and a small JSON body naming the pool id, the
//! device's role (data or metadata) and a uuid made at `pool create`. The
//! pool's linear devices map the rest. The label is what
//! [`find`] looks for after a reboot, when `/dev/vdb` may have become
//! `/dev/vdc`: the device's stable identity from sysfs (virtio or SCSI
//! serial, WWID, dm uuid for an LVM volume, partition number) is recorded
//! too, tried first and shown in errors, but the label decides. (The
//! guest of `tools/vm/run` has no udev, so no `/dev/disk/by-id` links:
//! nothing here depends on them; a `/dev/disk/by-id/...` path given to
//! `pool create` is resolved once, to its device.)
//!
//! Before `pool create` takes a device, [`check_free`] refuses one that is
//! mounted (itself or a partition), used as swap, held by another
//! device-mapper table or md array (sysfs `holders`, named), opened
//! exclusively by anyone (`O_EXCL` fails), carrying partitions, or
//! holding a known signature (filesystems, partition tables, LVM, LUKS,
//! swap, dm-thin metadata, another thinlayer label) unless forced, as
//! `mkfs` does. A refusal changes nothing on the device.
//!
//! What must never happen: a write to a device that failed those checks;
//! a device taken by its kernel name alone; a device wiped without
//! `--wipe`.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use devicemapper::Device;
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, IoContext, Result},
    holders, mounts,
    names::PoolId,
    units::Bytes,
};

/// A device as thinlayer records it: how to find it again, and what it
/// was when the pool was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRef {
    /// The path given to `pool create`.
    pub given: PathBuf,
    /// Its kernel name when last seen (`vdb`, `sdb1`, `dm-3`): a hint only.
    pub name: String,
    /// Its stable identity from sysfs.
    pub identity: Identity,
    /// The uuid in its label.
    pub label_uuid: String,
}

impl DeviceRef {
    /// The device in words, for messages: identity and last name.
    pub fn describe(&self) -> String {
        format!(
            "{} (last seen as /dev/{}, given as {})",
            self.identity.describe(),
            self.name,
            self.given.display()
        )
    }
}

/// A block device's stable identity as sysfs shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The disk's serial number (virtio `serial`, SCSI/NVMe `device/serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The disk's world-wide id (`wwid`, `device/wwid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wwid: Option<String>,
    /// A dm device's uuid (an LVM volume's is `LVM-<vg uuid><lv uuid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dm_uuid: Option<String>,
    /// A dm device's name (`vg-lv`), for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dm_name: Option<String>,
    /// For a partition: its number on the disk the other fields describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

impl Identity {
    /// Whether anything stable is known.
    pub fn is_known(&self) -> bool {
        self.serial.is_some() || self.wwid.is_some() || self.dm_uuid.is_some()
    }

    /// In words.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s}"));
        }
        if let Some(w) = &self.wwid {
            parts.push(format!("wwid {w}"));
        }
        if let Some(u) = &self.dm_uuid {
            parts.push(format!("dm uuid {u}"));
        }
        if let Some(n) = &self.dm_name {
            parts.push(format!("dm name {n}"));
        }
        if let Some(p) = self.partition {
            parts.push(format!("partition {p}"));
        }
        if parts.is_empty() {
            "no stable identity in sysfs".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A block device found on this host now.
#[derive(Clone, Debug)]
pub struct BlockDev {
    /// Its kernel name (`vdb`, `vdb1`, `dm-3`).
    pub name: String,
    /// Its node, `/dev/NAME` (devtmpfs makes it with or without udev).
    pub node: PathBuf,
    /// Its number.
    pub device: Device,
    /// Its size.
    pub size: Bytes,
}

impl BlockDev {
    /// What the pool may use of it: its size less the label region.
    pub fn usable(&self) -> Bytes {
        Bytes(self.size.0.saturating_sub(LABEL_BYTES))
    }
}

fn sysfs(name: &str) -> PathBuf {
    PathBuf::from("/sys/class/block").join(name)
}

fn read_trim(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The size of block device `name` from sysfs.
///
/// # Errors
/// I/O errors reading sysfs.
pub fn size_of(name: &str) -> Result<Bytes> {
    let p = sysfs(name).join("size");
    let text = fs::read_to_string(&p).ctx(|| format!("read {}", p.display()))?;
    let sectors: u64 = text.trim().parse().map_err(|_| {
        Error::Inconsistent(format!(
            "{} holds `{}`, not a sector count",
            p.display(),
            text.trim()
        ))
    })?;
    Ok(Bytes(sectors.saturating_mul(512)))
}

fn device_of(name: &str) -> Option<Device> {
    let text = read_trim(&sysfs(name).join("dev"))?;
    let (ma, mi) = text.split_once(':')?;
    Some(Device {
        major: ma.parse().ok()?,
        minor: mi.parse().ok()?,
    })
}

fn describe_dev(name: &str) -> Result<BlockDev> {
    let device = device_of(name).ok_or_else(|| {
        Error::Inconsistent(format!(
            "sysfs has no device number for block device {name}"
        ))
    })?;
    Ok(BlockDev {
        name: name.to_owned(),
        node: PathBuf::from("/dev").join(name),
        device,
        size: size_of(name)?,
    })
}

/// The block device at `path` (a node, a `/dev/disk/by-id` link, a
/// `/dev/mapper` or `/dev/VG/LV` link).
///
/// # Errors
/// [`Error::InvalidArgument`] when `path` is missing or not a block device.
pub fn resolve(path: &Path) -> Result<BlockDev> {
    let m = fs::metadata(path).map_err(|e| {
        Error::InvalidArgument(format!(
            "{}: {e}; give a block device: a disk, a partition or an LVM volume (`lsblk` lists them)",
            path.display()
        ))
    })?;
    if !m.file_type().is_block_device() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a block device; give a disk, a partition or an LVM volume \
             (for a pool on sparse files, leave out --data-device and --metadata-device)",
            path.display()
        )));
    }
    let rdev = m.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let link = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let real = fs::canonicalize(&link).ctx(|| format!("resolve {}", link.display()))?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Inconsistent(format!("{} has no name", real.display())))?;
    describe_dev(&name)
}

/// The node (`/dev/NAME`) of the block device numbered `dev`.
///
/// # Errors
/// [`Error::Inconsistent`] when sysfs does not know it.
pub fn node_of(dev: Device) -> Result<PathBuf> {
    let link = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.major, dev.minor));
    let real = fs::canonicalize(&link).map_err(|e| {
        Error::Inconsistent(format!("no block device {}:{} ({e})", dev.major, dev.minor))
    })?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Inconsistent(format!("{} has no name", real.display())))?;
    Ok(PathBuf::from("/dev").join(name))
}

/// The stable identity of block device `name` from sysfs.
pub fn identity(name: &str) -> Identity {
    let dir = sysfs(name);
    let partition = read_trim(&dir.join("partition")).and_then(|p| p.parse().ok());
    // A partition's identity is its disk's, plus its number.
    let disk_dir = if partition.is_some() {
        fs::canonicalize(&dir)
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| dir.clone())
    } else {
        dir.clone()
    };
    let first = |names: &[&str]| names.iter().find_map(|n| read_trim(&disk_dir.join(n)));
    Identity {
        serial: first(&["serial", "device/serial"]),
        wwid: first(&["wwid", "device/wwid"]),
        dm_uuid: read_trim(&disk_dir.join("dm/uuid")),
        dm_name: read_trim(&disk_dir.join("dm/name")),
        partition,
    }
}

/// Names of the devices holding `name` (dm tables, md arrays), with their
/// dm names where they have one: `dm-3 (vg-lv)`.
pub fn holders_of(name: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(sysfs(name).join("holders"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let h = e.file_name().to_string_lossy().into_owned();
            match read_trim(&sysfs(&h).join("dm/name")) {
                Some(dm) => format!("{h} ({dm})"),
                None => h,
            }
        })
        .collect();
    out.sort();
    out
}

/// The partitions of disk `name` (`vdb1`, ...).
pub fn partitions_of(name: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(sysfs(name))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(name) && sysfs(n).join("partition").exists())
        .collect();
    out.sort();
    out
}

/// Reads up to `len` bytes from the start of `node`.
pub(super) fn read_head(node: &Path, len: usize) -> Result<Vec<u8>> {
    let f = File::open(node).ctx(|| format!("open {}", node.display()))?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64)
        .read_to_end(&mut buf)
        .ctx(|| format!("read {}", node.display()))?;
    Ok(buf)
}

/// What a device's first bytes say it holds, if anything thinlayer knows
/// (`blkid -p` knows more; these are the ones a pool device meets).
pub fn signature(head: &[u8]) -> Option<String> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if let Some(l) = head.get(..LABEL_SECTOR).and_then(Label::decode) {
        return Some(format!(
            "a thinlayer label ({} device of pool {})",
            l.role.name(),
            l.pool_id
        ));
    }
    const THIN_MAGIC: u64 = 27_022_010;
    let checks: &[(usize, &[u8], &str)] = &[
        (0, b"XFSB", "an XFS filesystem"),
        (1080, &[0x53, 0xef], "an ext2/3/4 filesystem"),
        (65_600, b"_BHRfS_M", "a btrfs filesystem"),
        (1024, &[0x10, 0x20, 0xf5, 0xf2], "an f2fs filesystem"),
        (0, b"LUKS\xba\xbe", "a LUKS header"),
        (4086, b"SWAPSPACE2", "swap space"),
        (4086, b"SWAP-SPACE", "swap space"),
        (0, b"hsqs", "a squashfs filesystem"),
        (32_769, b"CD001", "an ISO 9660 filesystem"),
        (512, b"EFI PART", "a GPT partition table"),
    ];
    for (off, magic, what) in checks {
        if at(*off, magic) {
            return Some((*what).to_owned());
        }
    }
    for sector in 0..4 {
        if at(sector * 512, b"LABELONE") {
            return Some("an LVM physical volume label".into());
        }
    }
    if head
        .get(32..40)
        .is_some_and(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) == THIN_MAGIC)
    {
        return Some("dm-thin pool metadata".into());
    }
    if at(510, &[0x55, 0xaa]) {
        return Some("a DOS partition table or boot sector".into());
    }
    None
}

/// The thin-pool metadata superblock magic at byte 32 of `head`.
pub fn has_thin_superblock(head: &[u8]) -> bool {
    head.get(32..40)
        .is_some_and(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) == 27_022_010)
}

/// Refuses a device `pool create` must not take: mounted (itself or a
/// partition), swap, held by a dm table or md array, open exclusively,
/// partitioned, or (unless `force`) holding a signature. Reads only.
/// (An interrupted create's leftovers are cleared before its devices are
/// checked again: [`clear_label`].)
///
/// # Errors
/// [`Error::DeviceInUse`] naming the user; [`Error::DeviceHasData`]
/// naming what is there and how to go on.
pub fn check_free(dev: &BlockDev, given: &Path, force: bool) -> Result<()> {
    let in_use = |detail: String| Error::DeviceInUse {
        device: given.to_owned(),
        detail,
    };
    let parts = partitions_of(&dev.name);
    let mut all: Vec<String> = vec![dev.name.clone()];
    all.extend(parts.iter().cloned());
    let mounted = mounts::all()?;
    for n in &all {
        let Some(d) = device_of(n) else { continue };
        let at: Vec<String> = mounted
            .iter()
            .filter(|m| m.device == d)
            .map(|m| m.mountpoint.display().to_string())
            .collect();
        if !at.is_empty() {
            return Err(in_use(format!(
                "/dev/{n} is mounted at {}; unmount it first, or pick another device",
                at.join(", ")
            )));
        }
    }
    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(p) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(m) = fs::metadata(p) {
                let d = Device {
                    major: nix::sys::stat::major(m.rdev()).try_into().unwrap_or(0),
                    minor: nix::sys::stat::minor(m.rdev()).try_into().unwrap_or(0),
                };
                if all.iter().any(|n| device_of(n) == Some(d)) {
                    return Err(in_use(format!(
                        "{p} is in use as swap; `swapoff {p}` first, or pick another device"
                    )));
                }
            }
        }
    }
    for n in &all {
        let h = holders_of(n);
        if !h.is_empty() {
            return Err(in_use(format!(
                "/dev/{n} is held by {}; remove that device first (`dmsetup remove`, `lvchange -an`, \
                 `mdadm --stop`), or pick another device",
                h.join(", ")
            )));
        }
    }
    // Nobody else may hold it exclusively (a mount, a dm table or md array
    // we could not see, a program with O_EXCL): the kernel says so.
    match OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(&dev.node)
    {
        Ok(f) => drop(f),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
            let procs = holders::of_device(dev.device);
            return Err(in_use(format!(
                "{} is open exclusively by someone else; {}",
                dev.node.display(),
                holders::describe(
                    &procs,
                    "no process shows it open: a kernel user (a mount in another namespace, a dm or md device) has it"
                )
            )));
        }
        Err(e) => return Err(e).ctx(|| format!("open {}", dev.node.display())),
    }
    if !parts.is_empty() {
        let list: Vec<String> = parts.iter().map(|p| format!("/dev/{p}")).collect();
        if !force {
            return Err(Error::DeviceHasData {
                device: given.to_owned(),
                what: format!("a partition table with {}", list.join(", ")),
                hint: "give one of the partitions instead, or pass --force to use the whole disk (the partitions are lost)".into(),
            });
        }
    }
    if dev.size.0 <= LABEL_BYTES {
        return Err(Error::InvalidSize {
            input: dev.size.to_string(),
            reason: format!(
                "{} is too small for a pool device (thinlayer keeps its first {} for its label)",
                given.display(),
                Bytes(LABEL_BYTES)
            ),
        });
    }
    let head = read_head(&dev.node, 68 << 10)?;
    let mut found = signature(&head);
    if found.is_none() {
        // Old pool metadata after the label region (a pool destroyed
        // without --wipe whose label was cleared by hand).
        let mut meta = [0u8; 64];
        let mut f = File::open(&dev.node).ctx(|| format!("open {}", dev.node.display()))?;
        if f.seek(SeekFrom::Start(LABEL_BYTES))
            .and_then(|_| f.read_exact(&mut meta))
            .is_ok()
            && has_thin_superblock(&meta)
        {
            found = Some("dm-thin pool metadata (of an earlier thinlayer pool)".into());
        }
    }
    if let Some(what) = found {
        if !force {
            return Err(Error::DeviceHasData {
                device: given.to_owned(),
                what,
                hint:
                    "pass --force to overwrite it (what is there is lost), or pick another device"
                        .into(),
            });
        }
        tracing::warn!(device = %given.display(), %what, "--force: overwriting");
    }
    Ok(())
}

/// Every block device on this host with a nonzero size, by kernel name.
fn all_devices() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir("/sys/class/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| size_of(n).is_ok_and(|s| s.0 > LABEL_BYTES))
        .collect();
    out.sort();
    out
}

/// Finds the device `r` names for `role` of `pool`: the one whose label
/// matches (pool id, role, uuid). Devices whose sysfs identity matches
/// the record are read first; then every other block device.
///
/// # Errors
/// [`Error::DeviceMissing`] when none carries the label (with the
/// recorded identity); [`Error::DeviceInUse`] when two do and neither
/// sits on the other.
pub fn find(pool: &PoolId, role: DeviceRole, r: &DeviceRef) -> Result<BlockDev> {
    let mut names = all_devices();
    // Identity matches first, then the last-seen name, then the rest.
    names.sort_by_key(|n| {
        let id = identity(n);
        let same = r.identity.is_known()
            && id.serial == r.identity.serial
            && id.wwid == r.identity.wwid
            && id.dm_uuid == r.identity.dm_uuid
            && id.partition == r.identity.partition;
        (!same, *n != r.name)
    });
    let want = |l: &Label| l.pool_id == *pool && l.role == role && l.uuid == r.label_uuid;
    let mut hits: Vec<String> = Vec::new();
    for n in names {
        // Our own linear devices over it would not carry the label at 0.
        if read_label(&PathBuf::from("/dev").join(&n)).is_some_and(|l| want(&l)) {
            hits.push(n);
        }
    }
    if hits.len() > 1 {
        // A path under a multipath or dm device: the device on top wins.
        let top: Vec<String> = hits
            .iter()
            .filter(|n| holders_of(n).is_empty())
            .cloned()
            .collect();
        if top.len() == 1 {
            hits = top;
        }
    }
    match hits.as_slice() {
        [one] => {
            let dev = describe_dev(one)?;
            if *one != r.name {
                tracing::info!(role = role.name(), from = %r.name, to = %one, "pool device renamed since last seen");
            }
            Ok(dev)
        }
        [] => Err(Error::DeviceMissing {
            role: role.name().to_owned(),
            device: r.describe(),
        }),
        many => Err(Error::DeviceInUse {
            device: r.given.clone(),
            detail: format!(
                "{} devices carry the label of this pool's {} device: {}; detach the copies (a cloned disk?) and retry",
                many.len(),
                role.name(),
                many.iter()
                    .map(|n| format!("/dev/{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The recorded form of `dev`, given as `given`, with label uuid `uuid`.
pub fn device_ref(dev: &BlockDev, given: &Path, uuid: &str) -> DeviceRef {
    DeviceRef {
        given: given.to_owned(),
        name: dev.name.clone(),
        identity: identity(&dev.name),
        label_uuid: uuid.to_owned(),
    }
}

mod label;
pub use label::*;

#[cfg(test)]
mod tests;
