//! One error type for image layers. A hostile or damaged layer names the
//! entry at fault; running out of space is its own variant so the caller can
//! say how much is needed; I/O errors keep their errno matchable.

use std::{io, path::PathBuf};

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An entry of the layer tries to do something a layer may not: escape
    /// the root, write through a symlink, use a bad name or type.
    #[error(
        "refusing layer entry `{entry}`: {reason}; the layer is malformed or hostile, \
         get it again from a trusted registry"
    )]
    Hostile {
        /// The entry's path as the tar gives it.
        entry: String,
        /// The rule it broke.
        reason: String,
    },

    /// The stream is not a readable tar (or its compression is damaged).
    #[error("the layer is damaged or truncated ({context}): {source}; download it again")]
    Corrupt {
        /// Where in the stream, or which entry.
        context: String,
        /// The reader's error.
        #[source]
        source: io::Error,
    },

    /// The stream is compressed with something this crate does not read.
    #[error(
        "the layer is compressed with {0}, which thinlayer does not read; use gzip, zstd or no compression"
    )]
    UnsupportedCompression(&'static str),

    /// The uncompressed stream does not hash to the expected diff_id.
    #[error(
        "the layer's diff_id is {actual}, the image says {expected}; the layer is damaged or not \
         the one the image names, download it again"
    )]
    DiffIdMismatch {
        /// What the image config says.
        expected: String,
        /// What the stream hashed to.
        actual: String,
    },

    /// The filesystem under the root ran out of space or quota.
    #[error(
        "out of space writing `{entry}`: at least {needed_bytes_hint} bytes of layer content are needed \
         ({written_bytes} written so far); make the snapshot's filesystem or the pool bigger"
    )]
    NoSpace {
        /// The entry being written.
        entry: String,
        /// Content bytes written so far plus this entry's size: a lower bound.
        /// [`crate::tar_content_size`] gives the layer's whole content size.
        needed_bytes_hint: u64,
        /// Content bytes written before the failure.
        written_bytes: u64,
        /// ENOSPC or EDQUOT.
        #[source]
        source: io::Error,
    },

    /// The uncompressed layer is larger than the caller's limit
    /// (`ApplyOptions::max_bytes`): a decompression bomb, or a genuinely
    /// huge layer.
    #[error(
        "the layer expands to more than {limit} bytes ({}) uncompressed; if it is genuine, \
         raise --max-layer-size",
        crate::error::human(*limit)
    )]
    TooLarge {
        /// The limit, in uncompressed bytes.
        limit: u64,
    },

    /// More than the allowed amount of data follows the tar's end marker.
    #[error(
        "the layer has more than {limit} bytes after its end-of-archive marker; the layer is \
         malformed or hostile, get it again from a trusted registry"
    )]
    TrailingData {
        /// How much trailing data is accepted.
        limit: u64,
    },

    /// A tree being walked (diff, export, manifest) changed between its
    /// listing and its reading: what was opened is not what was listed.
    #[error(
        "`{}` changed while being read (it is not the object the directory listing showed); \
         stop whatever writes to the tree, or read a frozen snapshot of it, and retry",
        path.display()
    )]
    Changed {
        /// The path, under the walked root.
        path: PathBuf,
    },

    /// An I/O error, with what was being done on which path.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno behind this error, if it is an I/O error with one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::NoSpace { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn hostile(entry: impl AsRef<[u8]>, reason: impl Into<String>) -> Self {
        Error::Hostile {
            entry: String::from_utf8_lossy(entry.as_ref()).into_owned(),
            reason: reason.into(),
        }
    }
}

/// `1.5 GiB`-style rendering of a byte count, for messages.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    let tenths = (bytes % scale) * 10 / scale;
    if tenths == 0 {
        format!("{whole} {}", UNITS[unit])
    } else {
        format!("{whole}.{tenths} {}", UNITS[unit])
    }
}

/// True when the error means the filesystem is full or the quota is used up.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32
    )
}

/// Adds a path and what was being done to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Wraps the error as [`Error::Io`].
    fn ctx(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            context,
            path: path.into(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::Io {
            context,
            path: path.into(),
            source: io::Error::from(e),
        })
    }
}
