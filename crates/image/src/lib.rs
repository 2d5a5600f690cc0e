//! OCI image layers on plain directory trees: the userspace half of putting
//! images into thin snapshots.
//!
//! - [`apply_layer`] unpacks a layer tar (uncompressed, gzip or zstd) onto
//!   the mounted snapshot of its parent, whiteouts and all, refusing hostile
//!   archives.
//! - [`changes`] compares a parent's tree with a child's (`docker diff`).
//! - [`write_layer`] writes that difference as a layer tar, deterministically.
//! - [`manifest`] describes a tree so two trees can be compared.
//!
//! What must never happen: a write outside the root the caller names, for any
//! archive; a symlink followed while reading or writing a tree. The crate
//! knows nothing of device-mapper: the caller makes, mounts and (on error)
//! discards the snapshot.

pub mod apply;
mod at;
pub mod diff;
mod error;
pub mod export;
pub mod hot;
pub mod tree;

use sha2::{Digest, Sha256};

/// Whether a layer's tar stream is hashed into its diff_id as it passes.
///
/// A caller that records or checks the diff_id hashes; one that only moves
/// the stream (Docker's graphdriver `Diff` and `ApplyDiff`: dockerd hashes
/// the stream itself) skips it, which saves a SHA-256 pass over every byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hashing {
    /// SHA-256 over the whole stream.
    #[default]
    Sha256,
    /// No hash: the report's `diff_id` is empty.
    Skip,
}

/// The running hash of a stream as [`Hashing`] asks: what the export's
/// writer and the apply's reader both keep.
pub(crate) struct StreamHash(Option<Sha256>);

impl StreamHash {
    pub(crate) fn new(hashing: Hashing) -> StreamHash {
        StreamHash((hashing == Hashing::Sha256).then(Sha256::new))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.0 {
            h.update(bytes);
        }
    }

    /// `sha256:<hex>`, or empty if not hashed.
    pub(crate) fn diff_id(self) -> String {
        self.0
            .map(|h| format!("sha256:{}", hex::encode(h.finalize())))
            .unwrap_or_default()
    }
}

pub use apply::{
    ApplyOptions, ApplyReport, DEFAULT_MAX_BYTES, apply_layer, tar_content_size,
    tar_content_size_max, xattr_allowed,
};
pub use diff::{Change, ChangeKind, changes};
pub use error::{Error, Result};
pub use export::{ExportReport, write_layer, write_layer_with};
pub use hot::{HotSet, Learned, Limits, Warmed};
pub use tree::{EntryDigest, Kind, Manifest, differences, manifest};
