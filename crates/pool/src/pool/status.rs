//! `pool status`: the record's figures, and the kernel's when the pool is
//! active, with warnings that say what to do.
//!
//! What must never happen: a status that changes anything.

use std::path::PathBuf;

use serde::Serialize;

use super::Pool;
use crate::{
    error::Result,
    names::{self, Role},
    records::{Backing, FsType, Pending, Spare, Trashed},
};

/// The kernel's mode of a thin-pool (the status line's `rw`, `ro` or
/// `out_of_data_space`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// Read-write: all is well.
    #[serde(rename = "rw")]
    ReadWrite,
    /// Read-only: the kernel met a metadata error, or ran out of metadata.
    #[serde(rename = "ro")]
    ReadOnly,
    /// Out of data space: writes that need a new block fail.
    OutOfDataSpace,
}

impl PoolMode {
    /// The kernel's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::ReadWrite => "rw",
            PoolMode::ReadOnly => "ro",
            PoolMode::OutOfDataSpace => "out_of_data_space",
        }
    }
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<devicemapper::ThinPoolStatusSummary> for PoolMode {
    fn from(s: devicemapper::ThinPoolStatusSummary) -> PoolMode {
        match s {
            devicemapper::ThinPoolStatusSummary::Good => PoolMode::ReadWrite,
            devicemapper::ThinPoolStatusSummary::ReadOnly => PoolMode::ReadOnly,
            devicemapper::ThinPoolStatusSummary::OutOfSpace => PoolMode::OutOfDataSpace,
        }
    }
}

/// `pool status`.
#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    /// What the data and metadata live on.
    pub backing: Backing,
    /// The root directory.
    pub root: PathBuf,
    /// The pool id in the dm names.
    pub pool_id: String,
    /// Whether the pool's devices are up.
    pub active: bool,
    /// The filesystem of every layer.
    pub fs: FsType,
    /// The copy-on-write unit.
    pub block_size_bytes: u64,
    /// Data capacity.
    pub data_size_bytes: u64,
    /// Metadata capacity.
    pub metadata_size_bytes: u64,
    /// Virtual size of each thin device.
    pub base_size_bytes: u64,
    /// How many layers the records hold.
    pub layers: usize,
    /// Snapshots provisioned ahead of demand.
    pub spares: Vec<Spare>,
    /// What the spares hold of the kernel now.
    pub spare_cost: SpareCost,
    /// Removed layers' thin ids waiting for `pool reclaim`.
    pub trash: Vec<Trashed>,
    /// The records' transaction id.
    pub transaction_id: u64,
    /// Warn at this percent used.
    pub low_water_percent: u8,
    /// An interrupted operation, if any.
    pub pending: Option<Pending>,
    /// What the kernel reports, when active.
    pub kernel: Option<KernelStatus>,
    /// The host filesystem under the root against what the pool may
    /// still write there.
    pub host: crate::space::HostSpace,
    /// Low water, needs_check, read-only, host space...
    pub warnings: Vec<String>,
}

/// What the listed spares cost now: active devices, mounts and the bytes
/// their devices map (shared with their parents until taken).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpareCost {
    /// Spares listed.
    pub count: usize,
    /// Of those, with an active device.
    pub devices: usize,
    /// Of those, mounted at `ROOT/spares/ID`.
    pub mounts: usize,
    /// Bytes their devices map, summed.
    pub mapped_bytes: u64,
}

/// The kernel's view of an active pool.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStatus {
    /// The pool metadata's transaction id.
    pub transaction_id: u64,
    /// Data blocks in use.
    pub data_used_blocks: u64,
    /// Data blocks in all.
    pub data_total_blocks: u64,
    /// Metadata blocks (4 KiB) in use.
    pub metadata_used_blocks: u64,
    /// Metadata blocks in all.
    pub metadata_total_blocks: u64,
    /// `rw`, `ro` or `out_of_data_space`.
    pub mode: PoolMode,
    /// The metadata's needs_check flag.
    pub needs_check: bool,
    /// Whether discards reach the data file.
    pub discard_passdown: bool,
    /// Whether a full pool fails writes (rather than queueing them).
    pub error_if_no_space: bool,
    /// Thin devices now in the kernel.
    pub active_thin_devices: usize,
}

impl Pool {
    /// The pool's state: the record's figures, and the kernel's when active.
    ///
    /// # Errors
    /// Environment and kernel errors.
    pub fn status(&mut self) -> Result<PoolStatus> {
        let layers = self.layer_records()?.len();
        let active = self.pool_device()?.is_some();
        let mut warnings = Vec::new();
        let kernel_status = if active {
            let pool = self.name(Role::Pool);
            let prefix = names::name_prefix(&self.rec.pool_id);
            let kernel = self.kernel()?;
            let w = kernel.pool_status(&pool)?;
            let active_thins = kernel
                .names_with_prefix(&prefix)?
                .iter()
                .filter(|n| matches!(names::parse_role(&self.rec.pool_id, n), Some(Role::Thin(_))))
                .count();
            let k = KernelStatus {
                transaction_id: w.transaction_id,
                data_used_blocks: w.usage.used_data.0,
                data_total_blocks: w.usage.total_data.0,
                metadata_used_blocks: w.usage.used_meta.0,
                metadata_total_blocks: w.usage.total_meta.0,
                mode: w.summary.into(),
                needs_check: w.needs_check,
                discard_passdown: w.discard_passdown,
                error_if_no_space: w.no_space_policy == devicemapper::ThinPoolNoSpacePolicy::Error,
                active_thin_devices: active_thins,
            };
            let pct = u64::from(self.rec.low_water_percent);
            for (what, used, total) in [
                ("data", k.data_used_blocks, k.data_total_blocks),
                ("metadata", k.metadata_used_blocks, k.metadata_total_blocks),
            ] {
                if total > 0 && used * 100 >= total * pct {
                    warnings.push(format!(
                        "{what} is {}% full (low-water mark {pct}%): extend it with `thinlayer pool extend --{what}-size +SIZE`, or remove layers",
                        used * 100 / total
                    ));
                }
            }
            if k.needs_check {
                warnings.push("the kernel flagged the metadata as needing a check: deactivate and run `thinlayer pool check`".into());
            }
            if k.mode == PoolMode::OutOfDataSpace || k.data_used_blocks >= k.data_total_blocks {
                warnings.push(crate::space::out_of_space_hint("data"));
            } else if k.mode != PoolMode::ReadWrite {
                warnings.push(format!("the pool is in {} mode", k.mode));
            }
            if k.transaction_id != self.rec.transaction_id && !self.foreign_transactions() {
                warnings.push(format!(
                    "kernel transaction id {} differs from the records' {}: an operation was interrupted; any change command recovers it",
                    k.transaction_id, self.rec.transaction_id
                ));
            }
            Some(k)
        } else {
            None
        };
        let mut spare_cost = SpareCost::default();
        for i in self.spare_infos()? {
            spare_cost.count += 1;
            spare_cost.devices += usize::from(i.devnode.is_some());
            spare_cost.mounts += usize::from(i.mountpoint.is_some());
            spare_cost.mapped_bytes += i.mapped_bytes.unwrap_or(0);
        }
        let host = self.host_space()?;
        warnings.extend(host.warnings(&self.layout.root));
        Ok(PoolStatus {
            backing: self.rec.backing.clone(),
            root: self.layout.root.clone(),
            pool_id: self.rec.pool_id.to_string(),
            active,
            fs: self.rec.fs,
            block_size_bytes: self.rec.block_size.bytes().0,
            data_size_bytes: self.rec.data_size.0,
            metadata_size_bytes: self.rec.metadata_size.0,
            base_size_bytes: self.rec.base_size.0,
            layers,
            transaction_id: self.rec.transaction_id,
            low_water_percent: self.rec.low_water_percent,
            pending: self.rec.pending.clone(),
            spares: self.rec.spares.clone(),
            spare_cost,
            trash: self.rec.trash.clone(),
            kernel: kernel_status,
            host,
            warnings,
        })
    }
}
