//! thinlayer's label on a pool's block device: the first sector of a
//! reserved region of [`LABEL_BYTES`] at the start of the device, holding
//! a magic, a CRC and a small JSON body (pool id, role, a uuid made at
//! `pool create`). [`super::find`] looks for it after a reboot.
//!
//! What must never happen: a label written to a device that failed the
//! checks of [`super::check_free`]; a label taken whose CRC does not match.

use std::{
    fs::{File, OpenOptions},
    io::{Seek, SeekFrom, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{BlockDev, read_head};
use crate::{
    error::{IoContext, Result},
    names::PoolId,
};

/// Bytes reserved at the start of each device for the label; the pool's
/// linear device maps from here on.
pub const LABEL_BYTES: u64 = 1 << 20;

/// [`LABEL_BYTES`] in 512-byte sectors: the linear target's offset.
pub const LABEL_SECTORS: u64 = LABEL_BYTES / 512;

/// The label's first 16 bytes.
const MAGIC: &[u8; 16] = b"THINLAYER-LABEL1";

/// The label sector's size: magic, length, CRC, JSON body.
pub(super) const LABEL_SECTOR: usize = 512;

/// What a device is to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRole {
    /// The pool's data.
    Data,
    /// The pool's metadata.
    Metadata,
}

impl DeviceRole {
    /// Its name in messages and flags.
    pub fn name(self) -> &'static str {
        match self {
            DeviceRole::Data => "data",
            DeviceRole::Metadata => "metadata",
        }
    }
}

/// The label in a device's first sector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// The pool the device belongs to.
    pub pool_id: PoolId,
    /// What the device is to it.
    pub role: DeviceRole,
    /// Made at `pool create`: tells this device from a copy of another.
    pub uuid: String,
}

impl Label {
    /// The label sector: magic, body length (u32 LE), CRC32 of the body
    /// (u32 LE), the JSON body, zeros.
    pub fn encode(&self) -> [u8; LABEL_SECTOR] {
        let body = serde_json::to_vec(self).expect("plain data: serialisable");
        assert!(
            body.len() <= LABEL_SECTOR - 24,
            "a label body is a pool id, a role and a uuid: well under 488 bytes"
        );
        let mut out = [0u8; LABEL_SECTOR];
        out[..16].copy_from_slice(MAGIC);
        let len = u32::try_from(body.len()).expect("under 488 bytes");
        out[16..20].copy_from_slice(&len.to_le_bytes());
        out[20..24].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out[24..24 + body.len()].copy_from_slice(&body);
        out
    }

    /// The label in `sector`, if it holds a valid one.
    pub fn decode(sector: &[u8]) -> Option<Label> {
        if sector.len() < 24 || &sector[..16] != MAGIC {
            return None;
        }
        let len = usize::try_from(u32::from_le_bytes(sector[16..20].try_into().ok()?)).ok()?;
        let crc = u32::from_le_bytes(sector[20..24].try_into().ok()?);
        let body = sector.get(24..24 + len)?;
        if crc32fast::hash(body) != crc {
            return None;
        }
        serde_json::from_slice(body).ok()
    }
}

/// A fresh device uuid: 32 hex digits from the clock, the pid and `seed`.
pub fn new_uuid(seed: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut out = String::new();
    for salt in 0u32..4 {
        let mut h = crc32fast::Hasher::new();
        h.update(&now.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(&salt.to_le_bytes());
        h.update(seed.as_bytes());
        out.push_str(&format!("{:08x}", h.finalize()));
    }
    out
}

fn open_rw(node: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(node)
        .ctx(|| format!("open {} for writing", node.display()))
}

/// Writes `bytes` at `offset` of `node` and syncs.
pub(super) fn write_at(node: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut f = open_rw(node)?;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .ctx(|| {
            format!(
                "write {} bytes at {offset} of {}",
                bytes.len(),
                node.display()
            )
        })
}

/// Writes `label` into the first sector of `node`, and zeros the rest of
/// the label region (old signatures there) and, for the
/// metadata device, the first 4 KiB after the region, so the kernel
/// formats fresh pool metadata (it keeps a superblock that is not zero).
///
/// # Errors
/// I/O errors.
pub fn write_label(node: &Path, label: &Label) -> Result<()> {
    let mut head = vec![0u8; 1 << 20];
    head[..LABEL_SECTOR].copy_from_slice(&label.encode());
    if label.role == DeviceRole::Metadata {
        write_at(node, LABEL_BYTES, &[0u8; 4096])?;
    }
    write_at(node, 0, &head)
}

/// The label of `node`, if it has a valid one.
pub fn read_label(node: &Path) -> Option<Label> {
    read_head(node, LABEL_SECTOR)
        .ok()
        .and_then(|h| Label::decode(&h))
}

/// Clears the label sector of `node` (undo of a failed or interrupted
/// create); under a metadata label, also the first 4 KiB after the label
/// region, where that create's kernel formatted its metadata (zero when
/// the label was written): the device is then as free as before, and a
/// second `pool create` takes it without `--force`.
///
/// # Errors
/// I/O errors.
pub fn clear_label(node: &Path) -> Result<()> {
    if read_label(node).is_some_and(|l| l.role == DeviceRole::Metadata) {
        write_at(node, LABEL_BYTES, &[0u8; 4096])?;
    }
    write_at(node, 0, &[0u8; LABEL_SECTOR])
}

/// `pool destroy --wipe`: zeros the label region and the first MiB after
/// it (the metadata superblock), then discards the whole device where it
/// takes discards (a thin LV or a disk with `discard=unmap` gives the
/// space back). Returns whether the discard was taken.
///
/// # Errors
/// I/O errors of the zeroing (a refused discard is not one).
pub fn wipe(dev: &BlockDev) -> Result<bool> {
    let zeros = vec![0u8; 1 << 20];
    write_at(&dev.node, 0, &zeros)?;
    if dev.size.0 >= 2 * LABEL_BYTES {
        write_at(&dev.node, LABEL_BYTES, &zeros)?;
    }
    match crate::space::discard_device(&dev.node, dev.size.0) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::info!(device = %dev.node.display(), error = %e, "no discard on wipe");
            Ok(false)
        }
    }
}
