//! Applies an OCI layer tar onto a directory tree (the mounted snapshot of
//! the layer's parent).
//!
//! The stream may be uncompressed, gzip or zstd, told apart by its magic
//! bytes. Whiteouts follow the OCI image spec: `.wh.NAME` deletes NAME in
//! that directory; `.wh..wh..opq` makes its directory opaque, removing
//! everything in it that came from lower layers but nothing this same tar
//! adds, wherever the marker stands among the entries; other `.wh..wh.*`
//! names (aufs bookkeeping) are ignored.
//!
//! Metadata: owner first (chown), then mode (so setuid/setgid survive the
//! chown), then xattrs (so `security.capability` survives the chown and the
//! content write), then mtime. Directory mtimes are set at the end, after
//! their children are in place; symlink mtimes with `AT_SYMLINK_NOFOLLOW`.
//! An entry whose path exists replaces it: a directory over a directory keeps
//! it and updates its metadata; anything else removes what was there (a
//! whole tree for a directory) first. Existing files are unlinked, never
//! truncated, so a hard link in a lower layer never sees the new content.
//! Aligned 4 KiB runs of zeros in file content are left as holes, so a thin
//! pool never provisions blocks for them.
//!
//! Extended attributes: only `user.*` and `security.capability` are applied.
//! Everything else a layer carries (`trusted.*`, which overlayfs and other
//! kernel users trust; `security.selinux`, `security.ima`, `security.evm`,
//! `security.apparmor`, POSIX ACLs...) is dropped, counted and named in the
//! [`ApplyReport`] and logged once per name.
//!
//! Paths: a leading `./` is dropped (`tar -C dir .` writes it); `.` or `./`
//! alone is the root, whose metadata the layer may set. A leading `/` is
//! refused, not stripped: OCI layer paths are relative, and no tool that
//! writes layers emits one, so it marks a hand-made or hostile archive.
//!
//! Must never happen: a write outside `root`, for any archive, even while
//! another process renames things inside the tree. Every entry's path is
//! cleaned (no `..`, no absolute path, no NUL, no name over 255 bytes, no
//! path over 4095); it is then reached one component at a time from a
//! descriptor of the root, each directory opened `O_DIRECTORY | O_NOFOLLOW`
//! relative to its parent's descriptor, so a symlink anywhere (one this tar
//! made, or one a racing process swapped in) fails the open instead of
//! being followed. Every object is made relative to its parent's descriptor
//! (`openat(O_CREAT | O_EXCL | O_NOFOLLOW)`, `mkdirat`, `mknodat`,
//! `symlinkat`, `linkat` without `AT_SYMLINK_FOLLOW`) and its metadata set
//! on its own descriptor or with `AT_SYMLINK_NOFOLLOW`. Hard-link targets and
//! whiteouts get the same treatment. A racing process can make the apply
//! fail; it cannot redirect a write out of the root. The tar crate's own
//! `unpack` is never used.
//!
//! Bounded input: memory does not grow with the archive. GNU long names and
//! link names are capped at [`MAX_LONG_NAME`] bytes, a PAX header at
//! [`MAX_PAX_HEADER`], all extension headers of one entry together at
//! [`MAX_EXTENSIONS_PER_ENTRY`] (checked on the raw stream, before the tar
//! crate reads them into memory); GNU sparse entries are refused before their
//! chain of extension blocks is read; what follows the end-of-archive marker
//! is read in fixed chunks, hashed (the diff_id covers the whole stream) and
//! refused past [`MAX_TRAILER`]; the whole uncompressed stream is refused past
//! [`ApplyOptions::max_bytes`], which catches decompression bombs.
//!
//! On error the work stops at once and the tree is left as it is: the caller
//! throws the whole snapshot away.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::OsStr,
    fs::File,
    io::{self, Cursor, Read, Seek, SeekFrom, Write},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag, openat},
    sys::{
        stat::{
            Mode, SFlag, UtimensatFlags, fchmod, futimens, makedev, mkdirat, mknodat, utimensat,
        },
        time::TimeSpec,
    },
    unistd::{Gid, Uid, fchown, fchownat, linkat, symlinkat},
};
use serde::{Deserialize, Serialize};
use tar::{EntryType, Header};
use xattr::FileExt;

use crate::{
    Hashing, StreamHash, at,
    error::{Error, IoContext, Result, human, is_no_space},
};

/// The longest file name Linux takes (NAME_MAX).
const NAME_MAX: usize = 255;
/// The longest path Linux takes, without its NUL (PATH_MAX - 1).
const PATH_MAX: usize = 4095;
/// A tar block.
const BLOCK: u64 = 512;
/// Runs of zeros this long and aligned are left as holes, not written.
const HOLE_BLOCK: usize = 4096;

/// The default of [`ApplyOptions::max_bytes`]: 64 GiB uncompressed.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;
/// The largest GNU long name or long link name header accepted. Paths over
/// 4095 bytes are refused anyway; this bounds what is read to find out.
pub const MAX_LONG_NAME: u64 = 64 << 10;
/// The largest PAX extended header accepted: room for several xattrs of
/// Linux's 64 KiB value limit.
pub const MAX_PAX_HEADER: u64 = 256 << 10;
/// The most extension-header bytes (long name, long link, PAX) one entry may
/// have in all.
pub const MAX_EXTENSIONS_PER_ENTRY: u64 = 320 << 10;
/// The most bytes accepted after the end-of-archive marker (tar pads to its
/// record size, 10 KiB by default; `tar -b 2048` makes 1 MiB records).
pub const MAX_TRAILER: u64 = 4 << 20;
/// How many distinct dropped xattr names an [`ApplyReport`] lists.
const MAX_DROPPED_NAMES: usize = 64;

/// Whether an xattr from a layer is applied: `user.*` and
/// `security.capability` only (file capabilities are part of what an image
/// means; the mounts that run containers are `nosuid` where it matters).
pub fn xattr_allowed(name: &str) -> bool {
    name.starts_with("user.") || name == "security.capability"
}

/// How to apply a layer.
pub struct ApplyOptions<'a> {
    /// `sha256:<hex>` the uncompressed stream must hash to (the image
    /// config's `rootfs.diff_ids` entry); checked after the whole stream is
    /// read.
    pub expected_diff_id: Option<String>,
    /// Called after each entry with the uncompressed bytes read so far, and
    /// once more at the end with the whole stream's length.
    pub progress: Option<&'a dyn Fn(u64)>,
    /// The most uncompressed bytes the layer may expand to (the whole tar
    /// stream); more is [`Error::TooLarge`]. Default [`DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
    /// Whether the stream is hashed into the report's diff_id (always, if
    /// `expected_diff_id` is set). Default [`Hashing::Sha256`].
    pub hashing: Hashing,
}

impl Default for ApplyOptions<'_> {
    fn default() -> Self {
        ApplyOptions {
            expected_diff_id: None,
            progress: None,
            max_bytes: DEFAULT_MAX_BYTES,
            hashing: Hashing::Sha256,
        }
    }
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// `sha256:<hex>` of the uncompressed tar stream; empty when it was not
    /// hashed ([`Hashing::Skip`]).
    pub diff_id: String,
    /// Tar entries applied, whiteouts included (PAX and GNU extension
    /// headers are not entries).
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
    /// Whiteouts applied (`.wh.NAME` and opaque markers).
    pub whiteouts: u64,
    /// Extended attributes the layer carried that were not applied (see
    /// [`xattr_allowed`]), counted per entry.
    #[serde(default)]
    pub dropped_xattrs: u64,
    /// The distinct names of those xattrs, sorted (at most 64).
    #[serde(default)]
    pub dropped_xattr_names: Vec<String>,
}

/// Applies the layer tar read from `input` (uncompressed, gzip or zstd) onto
/// the directory tree at `root`.
///
/// Preconditions: `root` is a directory the caller owns for the duration
/// (the mounted snapshot of the layer's parent); on error the caller discards
/// it. Other processes may write in the tree meanwhile: they can make the
/// apply fail, never make it write outside `root`.
///
/// Errors: [`Error::Hostile`] for an entry that breaks the rules above (it is
/// named; oversized long names and PAX headers included),
/// [`Error::Corrupt`] for a damaged or truncated stream,
/// [`Error::UnsupportedCompression`], [`Error::TooLarge`] past
/// `opts.max_bytes`, [`Error::TrailingData`] past [`MAX_TRAILER`] after the
/// end marker, [`Error::DiffIdMismatch`] (after the whole stream is read and
/// applied), [`Error::NoSpace`] when the filesystem fills up, [`Error::Io`]
/// for anything else.
pub fn apply_layer(root: &Path, input: impl Read, opts: &ApplyOptions) -> Result<ApplyReport> {
    let root_fd = match at::open_root(root) {
        Ok(fd) => fd,
        Err(Errno::ENOTDIR) => {
            return Err(Error::Io {
                context: "the layer root is not a directory",
                path: root.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotADirectory),
            });
        }
        Err(e) => return Err(e).ctx("cannot open the layer root", root),
    };
    let state = RefCell::new(GuardState::default());
    let result = apply_stream(root, root_fd, input, opts, &state);
    // A limit the guard enforced shows up to the tar crate as an I/O error;
    // report the limit, not the tar crate's view of it.
    match (result, state.borrow_mut().violation.take()) {
        (Err(_), Some(violation)) => Err(violation),
        (result, _) => result,
    }
}

fn apply_stream(
    root: &Path,
    root_fd: OwnedFd,
    input: impl Read,
    opts: &ApplyOptions,
    state: &RefCell<GuardState>,
) -> Result<ApplyReport> {
    let hashing = if opts.expected_diff_id.is_some() {
        Hashing::Sha256
    } else {
        opts.hashing
    };
    let reader = Guard::new(decompress(input)?, state, opts.max_bytes, hashing);
    let mut archive = tar::Archive::new(reader);
    let mut applier = Applier {
        root,
        root_fd,
        added: HashSet::new(),
        dir_times: BTreeMap::new(),
        dropped: BTreeSet::new(),
        report: ApplyReport {
            diff_id: String::new(),
            entries: 0,
            bytes: 0,
            whiteouts: 0,
            dropped_xattrs: 0,
            dropped_xattr_names: Vec::new(),
        },
    };
    let mut last_end = 0u64;
    let mut last_name = String::from("(start of the archive)");
    let entries = archive.entries().map_err(|source| Error::Corrupt {
        context: "reading the first header".into(),
        source,
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| Error::Corrupt {
            context: format!("reading the header after `{last_name}`"),
            source,
        })?;
        last_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        last_end = entry.raw_file_position() + entry.size().div_ceil(BLOCK) * BLOCK;
        applier.entry(&mut entry)?;
        if let Some(progress) = opts.progress {
            progress(state.borrow().position);
        }
    }
    applier.finish_dir_times()?;

    // The end-of-archive marker is two zero blocks; the tar crate stops at
    // the first (or at a clean EOF, which is how a cut stream looks). What
    // follows is read in fixed chunks, only to hash it, and only so far.
    let mut reader = archive.into_inner();
    let zero_blocks_read = state.borrow().position.saturating_sub(last_end);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut trailer = 0u64;
    let mut second_block_zero = true;
    loop {
        let n = read_full(&mut reader, &mut chunk).map_err(|source| Error::Corrupt {
            context: "reading the end of the archive".into(),
            source,
        })?;
        if n == 0 {
            break;
        }
        // The first 512 bytes after the first zero block: the second one.
        if let Some(first) = usize::try_from(BLOCK.saturating_sub(trailer))
            .ok()
            .filter(|k| *k > 0)
        {
            second_block_zero &= chunk[..n.min(first)].iter().all(|b| *b == 0);
        }
        trailer += n as u64;
        if trailer > MAX_TRAILER {
            return Err(Error::TrailingData { limit: MAX_TRAILER });
        }
    }
    let has_end_marker = zero_blocks_read == BLOCK && trailer >= BLOCK && second_block_zero;
    if !has_end_marker {
        return Err(Error::Corrupt {
            context: format!("no end-of-archive marker after `{last_name}`"),
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        });
    }
    if let Some(progress) = opts.progress {
        progress(state.borrow().position);
    }
    applier.report.diff_id = reader.diff_id();
    applier.report.dropped_xattr_names = applier.dropped.iter().cloned().collect();
    if let Some(expected) = &opts.expected_diff_id {
        if !expected.eq_ignore_ascii_case(&applier.report.diff_id) {
            return Err(Error::DiffIdMismatch {
                expected: expected.clone(),
                actual: applier.report.diff_id,
            });
        }
    }
    if applier.report.dropped_xattrs > 0 {
        tracing::warn!(root = %root.display(), count = applier.report.dropped_xattrs,
            names = ?applier.report.dropped_xattr_names,
            "extended attributes in the layer were not applied (only user.* and security.capability are)");
    }
    tracing::debug!(root = %root.display(), diff_id = %applier.report.diff_id,
        entries = applier.report.entries, "layer applied");
    Ok(applier.report)
}

/// The total content size (sum of regular files' sizes) of a layer tar,
/// uncompressed, gzip or zstd: how much the filesystem needs at least to
/// apply it. Reads the whole stream, with the bounds [`apply_layer`] has and
/// the default [`ApplyOptions::max_bytes`].
///
/// Errors: [`Error::Corrupt`], [`Error::UnsupportedCompression`],
/// [`Error::Hostile`] (oversized extension headers), [`Error::TooLarge`].
pub fn tar_content_size(input: impl Read) -> Result<u64> {
    tar_content_size_max(input, DEFAULT_MAX_BYTES)
}

/// [`tar_content_size`] with the caller's limit on the uncompressed size
/// (the same as its [`ApplyOptions::max_bytes`]).
///
/// Errors: as [`tar_content_size`].
pub fn tar_content_size_max(input: impl Read, max_bytes: u64) -> Result<u64> {
    let state = RefCell::new(GuardState::default());
    let result = (|| {
        let guard = Guard::new(decompress(input)?, &state, max_bytes, Hashing::Skip);
        let mut archive = tar::Archive::new(guard);
        let mut total = 0u64;
        let entries = archive.entries().map_err(|source| Error::Corrupt {
            context: "reading the first header".into(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| Error::Corrupt {
                context: "reading a header".into(),
                source,
            })?;
            if matches!(
                entry.header().entry_type(),
                EntryType::Regular | EntryType::Continuous
            ) {
                total += entry.size();
            }
        }
        Ok(total)
    })();
    match (result, state.borrow_mut().violation.take()) {
        (Err(_), Some(violation)) => Err(violation),
        (result, _) => result,
    }
}

/// Wraps `input` in the decoder its magic bytes call for.
fn decompress<'a>(mut input: impl Read + 'a) -> Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        match input.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Corrupt {
                    context: "reading the first bytes".into(),
                    source,
                });
            }
        }
    }
    let head = &magic[..n];
    let stream = Cursor::new(head.to_vec()).chain(input);
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(stream)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder =
            zstd::stream::read::Decoder::new(stream).map_err(|source| Error::Corrupt {
                context: "starting the zstd decoder".into(),
                source,
            })?;
        Ok(Box::new(decoder))
    } else if head.starts_with(b"BZh") {
        Err(Error::UnsupportedCompression("bzip2"))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(Error::UnsupportedCompression("xz"))
    } else {
        Ok(Box::new(stream))
    }
}

/// What the [`Guard`] shares with its caller: how far the stream got, and
/// the limit it broke, if any.
#[derive(Default)]
struct GuardState {
    /// Uncompressed bytes read so far.
    position: u64,
    /// The error a limit raised; the tar crate only sees an I/O error.
    violation: Option<Error>,
}

/// Sits between the decompressor and the tar crate: hashes and counts what
/// passes, enforces the size limit, and watches the tar headers go by so
/// that oversized extension headers are refused before the tar crate reads
/// them into memory.
struct Guard<'a, R> {
    inner: R,
    hasher: StreamHash,
    state: &'a RefCell<GuardState>,
    max_bytes: u64,
    sniffer: Sniffer,
}

impl<'a, R> Guard<'a, R> {
    fn new(inner: R, state: &'a RefCell<GuardState>, max_bytes: u64, hashing: Hashing) -> Self {
        Guard {
            inner,
            hasher: StreamHash::new(hashing),
            state,
            max_bytes,
            sniffer: Sniffer::default(),
        }
    }

    fn diff_id(self) -> String {
        self.hasher.diff_id()
    }

    fn refuse(&self, error: Error) -> io::Error {
        let message = error.to_string();
        self.state.borrow_mut().violation = Some(error);
        io::Error::other(message)
    }
}

impl<R: Read> Read for Guard<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(v) = &self.state.borrow().violation {
            return Err(io::Error::other(v.to_string()));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        let position = self.state.borrow().position + n as u64;
        self.state.borrow_mut().position = position;
        if position > self.max_bytes {
            return Err(self.refuse(Error::TooLarge {
                limit: self.max_bytes,
            }));
        }
        let seen = if n == 0 {
            self.sniffer.end()
        } else {
            self.sniffer.feed(&buf[..n])
        };
        if let Err(e) = seen {
            return Err(self.refuse(e));
        }
        Ok(n)
    }
}

/// An extension header whose content is being collected or refused.
struct Extension {
    /// `L` (long name), `K` (long link) or `x` (PAX).
    kind: u8,
    /// Its content size.
    size: u64,
    /// The content so far: all of it for `L` and `x` (bounded by the caps
    /// before collection starts), the first [`NAME_PEEK`] bytes when refused.
    content: Vec<u8>,
    /// Set when the header is over its cap: the reason, raised once the
    /// first bytes (which name the entry) are in.
    refuse: Option<String>,
    /// The header's own name field, and the entry before it, for messages.
    header_name: String,
}

/// How many bytes of an oversized extension header are read to name the
/// entry it describes.
const NAME_PEEK: usize = 4096;

/// Follows the tar stream's headers the way the tar crate does (header,
/// content rounded to blocks, PAX `size` overriding the header's, GNU and
/// PAX extension headers describing the next entry) and stops at the first
/// zero block, where the tar crate stops.
#[derive(Default)]
struct Sniffer {
    /// Bytes seen.
    offset: u64,
    /// Where the next header starts.
    next_header: u64,
    /// The header being assembled.
    header: Vec<u8>,
    /// The extension header whose content is passing, if any.
    extension: Option<Extension>,
    /// PAX records for the next entry.
    pax: Option<Vec<u8>>,
    /// GNU long name for the next entry.
    long_name: Option<Vec<u8>>,
    /// Extension bytes for the next entry.
    extension_bytes: u64,
    /// The last entry's name, for messages.
    last: String,
    /// Past the end marker (or past something the tar crate will refuse).
    done: bool,
}

impl Sniffer {
    fn feed(&mut self, data: &[u8]) -> Result<()> {
        let mut i = 0;
        while i < data.len() && !self.done {
            let pos = self.offset + i as u64;
            let left = data.len() - i;
            if pos < self.next_header {
                let take = usize::try_from(self.next_header - pos).map_or(left, |g| g.min(left));
                if let Some(ext) = &mut self.extension {
                    let cap = if ext.refuse.is_some() || ext.kind == b'K' {
                        NAME_PEEK
                    } else {
                        usize::MAX
                    };
                    let want = usize::try_from(ext.size).unwrap_or(usize::MAX).min(cap);
                    if ext.content.len() < want {
                        let more = (want - ext.content.len()).min(take);
                        ext.content.extend_from_slice(&data[i..i + more]);
                    }
                }
                i += take;
                self.extension_progress(self.offset + i as u64)?;
                continue;
            }
            let take = (512 - self.header.len()).min(left);
            self.header.extend_from_slice(&data[i..i + take]);
            i += take;
            if self.header.len() == 512 {
                let header = std::mem::take(&mut self.header);
                self.on_header(&header, self.offset + i as u64)?;
                self.extension_progress(self.offset + i as u64)?;
            }
        }
        self.offset += data.len() as u64;
        Ok(())
    }

    /// The stream ended: a refusal still waiting for its name is raised now.
    fn end(&mut self) -> Result<()> {
        match self.extension.as_ref().and_then(|e| e.refuse.clone()) {
            Some(reason) => Err(self.refusal(reason)),
            None => Ok(()),
        }
    }

    /// After bytes up to `at` passed: refuses an oversized extension header
    /// once enough of it is in to name its entry, or hands a complete one
    /// to the entry it describes.
    fn extension_progress(&mut self, at: u64) -> Result<()> {
        let Some(ext) = &self.extension else {
            return Ok(());
        };
        if let Some(reason) = ext.refuse.clone() {
            let peeked = ext.content.len() >= NAME_PEEK || ext.content.len() as u64 >= ext.size;
            if peeked || at >= self.next_header {
                return Err(self.refusal(reason));
            }
            return Ok(());
        }
        if at < self.next_header {
            return Ok(());
        }
        let ext = self.extension.take().expect("checked above");
        match ext.kind {
            b'L' => self.long_name = Some(ext.content),
            b'x' => self.pax = Some(ext.content),
            _ => {}
        }
        Ok(())
    }

    /// The error for an oversized extension header, naming the entry as well
    /// as can be known: the long name's first bytes, the PAX `path` record,
    /// or the header's own name.
    fn refusal(&mut self, reason: String) -> Error {
        self.done = true;
        let ext = self.extension.take().expect("a refusal has its extension");
        let pending = self.long_name.as_deref().map(until_nul);
        let entry = match ext.kind {
            b'L' => {
                let mut name = until_nul(&ext.content);
                if ext.size > ext.content.len() as u64 && !ext.content.contains(&0) {
                    name.push_str("...");
                }
                Some(name)
            }
            b'x' => pax_value(&ext.content, "path").or(pending),
            _ => pending,
        };
        let entry =
            entry
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| match ext.header_name.as_str() {
                    "" => format!("(the entry after `{}`)", self.last),
                    other => other.to_string(),
                });
        Error::hostile(entry, reason)
    }

    fn on_header(&mut self, block: &[u8], end: u64) -> Result<()> {
        if block.iter().all(|b| *b == 0) {
            self.done = true;
            return Ok(());
        }
        let header = Header::from_byte_slice(block);
        let kind = header.entry_type();
        let Ok(mut size) = header.entry_size() else {
            // The tar crate refuses this header itself.
            self.done = true;
            return Ok(());
        };
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
        let collected = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        if collected {
            let (what, limit) = if kind.is_pax_local_extensions() {
                ("PAX extended header", MAX_PAX_HEADER)
            } else if kind.is_gnu_longname() {
                ("GNU long name", MAX_LONG_NAME)
            } else {
                ("GNU long link name", MAX_LONG_NAME)
            };
            self.extension_bytes = self.extension_bytes.saturating_add(size);
            let after = if self.last.is_empty() {
                "at the start of the archive".to_string()
            } else {
                format!("after `{}`", self.last)
            };
            let refuse = if size > limit {
                Some(format!(
                    "its {what} ({after}) is {size} bytes ({}), over the limit of {}",
                    human(size),
                    human(limit)
                ))
            } else if self.extension_bytes > MAX_EXTENSIONS_PER_ENTRY {
                Some(format!(
                    "its extension headers ({after}) are {} bytes in all, over the limit of {}",
                    self.extension_bytes,
                    human(MAX_EXTENSIONS_PER_ENTRY)
                ))
            } else {
                None
            };
            self.extension = Some(Extension {
                kind: kind.as_byte(),
                size,
                content: Vec::new(),
                refuse,
                header_name: name,
            });
        } else {
            let entry_name = self
                .long_name
                .as_deref()
                .map(until_nul)
                .or_else(|| self.pax.as_deref().and_then(|p| pax_value(p, "path")))
                .unwrap_or(name);
            if kind.is_gnu_sparse() {
                self.done = true;
                return Err(Error::hostile(
                    entry_name,
                    "it is a GNU sparse file, which a layer cannot hold",
                ));
            }
            let is_extension = kind.is_gnu_longname()
                || kind.is_gnu_longlink()
                || kind.is_pax_local_extensions()
                || kind.is_pax_global_extensions();
            if !is_extension {
                if let Some(pax_size) = self
                    .pax
                    .as_deref()
                    .and_then(|p| pax_value(p, "size"))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    size = pax_size;
                }
            }
            self.pax = None;
            self.long_name = None;
            self.extension_bytes = 0;
            self.last = entry_name;
        }
        match size
            .checked_add(BLOCK - 1)
            .and_then(|s| end.checked_add(s & !(BLOCK - 1)))
        {
            Some(next) => self.next_header = next,
            // The tar crate refuses the size itself.
            None => self.done = true,
        }
        Ok(())
    }
}

/// The first value of `key` in PAX records, as the tar crate reads it.
fn pax_value(records: &[u8], key: &str) -> Option<String> {
    for ext in tar::PaxExtensions::new(records) {
        let ext = ext.ok()?;
        if ext.key() == Ok(key) {
            return ext.value().ok().map(str::to_owned);
        }
    }
    None
}

/// The bytes before the first NUL, as text.
fn until_nul(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A clean relative path: no empty, `.` or `..` components; empty is the root.
fn clean(raw: &[u8]) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::hostile(raw, "the path is empty"));
    }
    if raw.contains(&0) {
        return Err(Error::hostile(raw, "the path contains a NUL byte"));
    }
    if raw[0] == b'/' {
        return Err(Error::hostile(
            raw,
            "the path is absolute; layer paths are relative to the root",
        ));
    }
    let mut out = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(Error::hostile(raw, "the path has a `..` component")),
            name if name.len() > NAME_MAX => {
                return Err(Error::hostile(
                    raw,
                    format!(
                        "a name is {} bytes, over the limit of {NAME_MAX}",
                        name.len()
                    ),
                ));
            }
            name => out.push(std::ffi::OsStr::from_bytes(name)),
        }
    }
    if out.as_os_str().len() > PATH_MAX {
        return Err(Error::hostile(
            raw,
            format!("the path is over the limit of {PATH_MAX} bytes"),
        ));
    }
    Ok(out)
}

/// Metadata an entry sets, read from its header and PAX records.
struct EntryMeta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    /// The xattrs to apply (already filtered).
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Applier<'r> {
    /// The root, for messages: nothing is reached through this path.
    root: &'r Path,
    /// The root's descriptor: every path is resolved from it.
    root_fd: OwnedFd,
    /// Paths this tar created or replaced (and parents it made): an opaque
    /// marker keeps them.
    added: HashSet<PathBuf>,
    /// Directory mtimes, set once every entry is in.
    dir_times: BTreeMap<PathBuf, TimeSpec>,
    /// Names of the xattrs dropped so far.
    dropped: BTreeSet<String>,
    report: ApplyReport,
}

/// What a walk through an entry's parents does where a parent is missing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parents {
    /// Make it (0755, root-owned); a parent that is not a directory is
    /// hostile.
    Create,
    /// Answer `None`; also for a parent that is not a directory.
    Existing,
}

impl Applier<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let rel = clean(&raw)?;
        self.report.entries += 1;

        let name = rel.file_name().map(|n| n.as_bytes().to_vec());
        if let Some(wh) = name.as_deref().and_then(|n| n.strip_prefix(b".wh.")) {
            return self.whiteout(&raw, &rel, wh);
        }
        if rel.as_os_str().is_empty() && kind != EntryType::Directory {
            return Err(Error::hostile(&raw, "the root can only be a directory"));
        }
        let meta = self.entry_meta(&raw, entry)?;
        let path = self.root.join(&rel);
        if rel.as_os_str().is_empty() {
            // The root directory's own metadata.
            let root = self.root_fd.try_clone().ctx("cannot duplicate", &path)?;
            self.set_meta(&raw, &File::from(root), &path, &meta)?;
            self.dir_times.insert(rel, meta.mtime);
            return Ok(());
        }
        let parent = self.make_parents(&raw, &rel)?;
        let parent = parent.as_fd();
        let name = rel.file_name().expect("a non-root path has a name");

        match kind {
            EntryType::Regular | EntryType::Continuous => {
                self.file(&raw, &rel, parent, name, &path, entry, &meta)?
            }
            EntryType::Directory => {
                match at::stat_at(parent, name) {
                    Ok(st) if at::file_type(st.st_mode) == SFlag::S_IFDIR => {}
                    Ok(_) => {
                        self.remove(parent, name, &path)?;
                        self.mkdir(&raw, parent, name, &path)?;
                    }
                    Err(Errno::ENOENT) => self.mkdir(&raw, parent, name, &path)?,
                    Err(e) => return Err(e).ctx("cannot stat", &path),
                }
                let dir = at::open_dir(parent, name).ctx("cannot open directory", &path)?;
                self.set_meta(&raw, &File::from(dir), &path, &meta)?;
                self.dir_times.insert(rel.clone(), meta.mtime);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_empty() || target.contains(&0) {
                    return Err(Error::hostile(
                        &raw,
                        "the symlink target is empty or has a NUL",
                    ));
                }
                self.replace(parent, name, &path)?;
                symlinkat(OsStr::from_bytes(&target), parent, name)
                    .map_err(|e| self.io("cannot create symlink", &raw, &path, e.into(), 0))?;
                self.chown_at(parent, name, &path, &meta)?;
                // No fd-relative lsetxattr: the parent's /proc path, the
                // last component never followed.
                self.set_xattrs_path(&raw, &at::proc_child(parent, name), &path, &meta.xattrs)?;
                utimensat(
                    parent,
                    name,
                    &meta.mtime,
                    &meta.mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .ctx("cannot set times of", &path)?;
            }
            EntryType::Link => self.hard_link(&raw, &rel, parent, name, &path, entry)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (sflag, dev) = if kind == EntryType::Fifo {
                    (SFlag::S_IFIFO, 0)
                } else {
                    let major = entry.header().device_major();
                    let minor = entry.header().device_minor();
                    let (Ok(Some(major)), Ok(Some(minor))) = (major, minor) else {
                        return Err(Error::hostile(
                            &raw,
                            "the device entry has no valid device numbers",
                        ));
                    };
                    let sflag = if kind == EntryType::Char {
                        SFlag::S_IFCHR
                    } else {
                        SFlag::S_IFBLK
                    };
                    (sflag, makedev(major.into(), minor.into()))
                };
                self.replace(parent, name, &path)?;
                mknodat(parent, name, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| self.io("cannot create node", &raw, &path, e.into(), 0))?;
                // A node is never opened (a device would be touched, a FIFO
                // would block): an O_PATH handle pins it for chmod and xattrs.
                let handle = at::open_path(parent, name).ctx("cannot open", &path)?;
                let st = at::stat_fd(&handle).ctx("cannot stat", &path)?;
                if at::file_type(st.st_mode) != sflag {
                    return Err(Error::Changed { path });
                }
                self.chown_at(parent, name, &path, &meta)?;
                at::chmod_handle(handle.as_fd(), meta.mode).ctx("cannot chmod", &path)?;
                for (xname, value) in &meta.xattrs {
                    xattr::set_deref(at::proc_fd(handle.as_fd()), xname, value)
                        .map_err(|e| self.io("cannot set xattr on", &raw, &path, e, 0))?;
                }
                utimensat(
                    parent,
                    name,
                    &meta.mtime,
                    &meta.mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .ctx("cannot set times of", &path)?;
            }
            other => {
                return Err(Error::hostile(
                    &raw,
                    format!(
                        "entry type {:?} cannot be in a layer",
                        other.as_byte() as char
                    ),
                ));
            }
        }
        self.added.insert(rel);
        Ok(())
    }

    fn entry_meta<R: Read>(
        &mut self,
        raw: &[u8],
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<EntryMeta> {
        let header = entry.header();
        let id = |v: io::Result<u64>, what: &str| -> Result<u32> {
            v.ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| Error::hostile(raw, format!("the {what} is not a valid 32-bit id")))
        };
        let uid = id(header.uid(), "uid")?;
        let gid = id(header.gid(), "gid")?;
        let mode = header
            .mode()
            .map_err(|_| Error::hostile(raw, "the mode is not a number"))?
            & 0o7777;
        let secs = header
            .mtime()
            .map_err(|_| Error::hostile(raw, "the mtime is not a number"))?;
        let mut mtime = TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0);
        let mut xattrs = Vec::new();
        let pax = entry.pax_extensions().map_err(|source| Error::Corrupt {
            context: format!(
                "reading the PAX records of `{}`",
                String::from_utf8_lossy(raw)
            ),
            source,
        })?;
        if let Some(pax) = pax {
            for ext in pax {
                let ext = ext.map_err(|source| Error::Corrupt {
                    context: format!(
                        "reading the PAX records of `{}`",
                        String::from_utf8_lossy(raw)
                    ),
                    source,
                })?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    if name.is_empty() || name.contains(&0) {
                        return Err(Error::hostile(raw, "an xattr name is empty or has a NUL"));
                    }
                    let name = String::from_utf8_lossy(name).into_owned();
                    if xattr_allowed(&name) {
                        xattrs.push((name, ext.value_bytes().to_vec()));
                    } else {
                        self.report.dropped_xattrs += 1;
                        if !self.dropped.contains(&name) && self.dropped.len() < MAX_DROPPED_NAMES {
                            tracing::warn!(entry = %String::from_utf8_lossy(raw), xattr = %name,
                                "not applying an extended attribute from the layer \
                                 (only user.* and security.capability are applied)");
                            self.dropped.insert(name);
                        }
                    }
                } else if key == b"mtime" {
                    mtime = parse_pax_time(ext.value_bytes())
                        .ok_or_else(|| Error::hostile(raw, "the PAX mtime is not a time"))?;
                }
            }
        }
        Ok(EntryMeta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }

    /// The descriptor of `rel`'s parent directory, every parent checked to
    /// be a real directory (missing ones made, 0755 root-owned, as other
    /// runtimes do); a symlink on the way is refused.
    fn make_parents(&mut self, raw: &[u8], rel: &Path) -> Result<OwnedFd> {
        Ok(self
            .walk_parents(raw, rel, Parents::Create)?
            .expect("missing parents are made"))
    }

    /// The descriptor of `rel`'s parent directory; `None` if a parent is
    /// missing or not a directory; a symlink on the way is refused.
    fn parents_exist(&mut self, raw: &[u8], rel: &Path) -> Result<Option<OwnedFd>> {
        self.walk_parents(raw, rel, Parents::Existing)
    }

    /// Walks the parents of `rel` from the root's descriptor, one
    /// `openat(O_DIRECTORY | O_NOFOLLOW)` each: a symlink (put there by this
    /// tar or by anyone else, at any time) fails the open and is refused.
    fn walk_parents(
        &mut self,
        raw: &[u8],
        rel: &Path,
        missing: Parents,
    ) -> Result<Option<OwnedFd>> {
        let mut dir = self
            .root_fd
            .try_clone()
            .ctx("cannot duplicate", self.root)?;
        let mut prefix = PathBuf::new();
        let parts: Vec<&OsStr> = rel.iter().collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            prefix.push(part);
            let path = self.root.join(&prefix);
            match at::open_dir(dir.as_fd(), part) {
                Ok(next) => dir = next,
                Err(Errno::ENOENT) if missing == Parents::Create => {
                    match mkdirat(dir.as_fd(), *part, Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(self.io(
                                "cannot create directory",
                                raw,
                                &path,
                                e.into(),
                                0,
                            ));
                        }
                    }
                    let next = at::open_dir(dir.as_fd(), part)
                        .map_err(|e| self.parent_error(raw, dir.as_fd(), part, &prefix, e))?;
                    fchmod(&next, Mode::from_bits_truncate(0o755)).ctx("cannot chmod", &path)?;
                    self.added.insert(prefix.clone());
                    dir = next;
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                    let not_dir = matches!(at::stat_at(dir.as_fd(), part),
                        Ok(st) if at::file_type(st.st_mode) != SFlag::S_IFDIR
                            && at::file_type(st.st_mode) != SFlag::S_IFLNK);
                    if not_dir && missing == Parents::Existing {
                        return Ok(None);
                    }
                    return Err(self.parent_error(raw, dir.as_fd(), part, &prefix, e));
                }
                Err(e) => return Err(e).ctx("cannot open directory", &path),
            }
        }
        Ok(Some(dir))
    }

    /// The error for a parent that could not be opened as a directory.
    fn parent_error(
        &self,
        raw: &[u8],
        dir: BorrowedFd<'_>,
        part: &OsStr,
        prefix: &Path,
        e: Errno,
    ) -> Error {
        match at::stat_at(dir, part) {
            Ok(st) if at::file_type(st.st_mode) == SFlag::S_IFLNK => Error::hostile(
                raw,
                format!(
                    "its parent `{}` is a symlink; going through it could leave the root",
                    prefix.display()
                ),
            ),
            Ok(st) if at::file_type(st.st_mode) != SFlag::S_IFDIR => Error::hostile(
                raw,
                format!("its parent `{}` is not a directory", prefix.display()),
            ),
            _ => Error::Io {
                context: "cannot open directory",
                path: self.root.join(prefix),
                source: e.into(),
            },
        }
    }

    fn whiteout(&mut self, raw: &[u8], rel: &Path, name: &[u8]) -> Result<()> {
        if name == b".wh..opq" {
            let dir = rel.parent().expect("a whiteout has a parent (maybe empty)");
            // The directory itself must be a real one: check it as a parent.
            let dir_fd = self.make_parents(raw, rel)?;
            self.clear_opaque(dir_fd.as_fd(), dir)?;
            self.report.whiteouts += 1;
            return Ok(());
        }
        if name.starts_with(b".wh.") {
            tracing::debug!(entry = %String::from_utf8_lossy(raw), "ignoring aufs metadata");
            return Ok(());
        }
        if name.is_empty() || name == b"." || name == b".." {
            return Err(Error::hostile(raw, "the whiteout names no file"));
        }
        let name = OsStr::from_bytes(name);
        let target = rel
            .parent()
            .expect("a whiteout has a parent (maybe empty)")
            .join(name);
        if let Some(parent) = self.parents_exist(raw, &target)? {
            let path = self.root.join(&target);
            match at::stat_at(parent.as_fd(), name) {
                Ok(_) => self.remove(parent.as_fd(), name, &path)?,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e).ctx("cannot stat", &path),
            }
        }
        self.added.remove(&target);
        self.report.whiteouts += 1;
        Ok(())
    }

    /// Removes from the directory `dir_fd` (at `dir`) everything this tar
    /// did not add.
    fn clear_opaque(&self, dir_fd: BorrowedFd<'_>, dir: &Path) -> Result<()> {
        let shown = self.root.join(dir);
        for child in at::list(dir_fd).ctx("cannot list", &shown)? {
            let rel = dir.join(&child);
            let child_path = self.root.join(&rel);
            if !self.added.contains(&rel) {
                self.remove(dir_fd, &child, &child_path)?;
            } else if at::file_type(
                at::stat_at(dir_fd, &child)
                    .ctx("cannot stat", &child_path)?
                    .st_mode,
            ) == SFlag::S_IFDIR
            {
                let sub = at::open_dir(dir_fd, &child).ctx("cannot open directory", &child_path)?;
                self.clear_opaque(sub.as_fd(), &rel)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn file<R: Read>(
        &mut self,
        raw: &[u8],
        rel: &Path,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
        meta: &EntryMeta,
    ) -> Result<()> {
        self.replace(parent, name, path)?;
        let size = entry.size();
        let fd = openat(
            parent,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.io("cannot create", raw, path, e.into(), size))?;
        let mut file = File::from(fd);
        // Whole zero 4 KiB blocks become holes: on a thin pool a block never
        // written is never provisioned.
        let mut buf = vec![0u8; 128 * 1024];
        let mut written = 0u64;
        let mut at_hole = false;
        loop {
            let n = read_full(entry, &mut buf).map_err(|source| Error::Corrupt {
                context: format!("reading the content of `{}`", rel.display()),
                source,
            })?;
            if n == 0 {
                break;
            }
            for piece in buf[..n].chunks(HOLE_BLOCK) {
                if piece.len() == HOLE_BLOCK && piece.iter().all(|b| *b == 0) {
                    at_hole = true;
                } else {
                    if at_hole {
                        file.seek(SeekFrom::Start(written))
                            .ctx("cannot seek in", path)?;
                        at_hole = false;
                    }
                    file.write_all(piece)
                        .map_err(|e| self.io("cannot write", raw, path, e, size))?;
                }
                written += piece.len() as u64;
            }
        }
        if at_hole {
            file.set_len(written)
                .map_err(|e| self.io("cannot write", raw, path, e, size))?;
        }
        if written != size {
            return Err(Error::Corrupt {
                context: format!("`{}` has {written} of its {size} bytes", rel.display()),
                source: io::Error::from(io::ErrorKind::UnexpectedEof),
            });
        }
        self.report.bytes += written;
        self.set_meta(raw, &file, path, meta)?;
        futimens(&file, &meta.mtime, &meta.mtime).ctx("cannot set times of", path)?;
        Ok(())
    }

    /// Owner, mode and xattrs of a directory or regular file, on its own
    /// descriptor (so no path is followed again).
    fn set_meta(&self, raw: &[u8], f: &File, path: &Path, meta: &EntryMeta) -> Result<()> {
        fchown(
            f,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .ctx("cannot chown", path)?;
        f.set_permissions(std::fs::Permissions::from_mode(meta.mode))
            .ctx("cannot chmod", path)?;
        for (name, value) in &meta.xattrs {
            f.set_xattr(name, value)
                .map_err(|e| self.io("cannot set xattr on", raw, path, e, 0))?;
        }
        Ok(())
    }

    /// `fchownat(AT_SYMLINK_NOFOLLOW)` of `name` in `parent`.
    fn chown_at(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        meta: &EntryMeta,
    ) -> Result<()> {
        fchownat(
            parent,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .ctx("cannot chown", path)
    }

    fn hard_link<R: Read>(
        &mut self,
        raw: &[u8],
        rel: &Path,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<()> {
        let target_raw = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        let target = clean(&target_raw).map_err(|e| match e {
            Error::Hostile { reason, .. } => {
                Error::hostile(raw, format!("its link target: {reason}"))
            }
            other => other,
        })?;
        if target.as_os_str().is_empty() {
            return Err(Error::hostile(raw, "it links to the root"));
        }
        if target == rel {
            return Err(Error::hostile(raw, "it links to itself"));
        }
        let Some(target_parent) = self.parents_exist(raw, &target)? else {
            return Err(Error::hostile(raw, "its link target does not exist"));
        };
        let target_name = target.file_name().expect("a non-root path has a name");
        let target_path = self.root.join(&target);
        match at::stat_at(target_parent.as_fd(), target_name) {
            Ok(st) if at::file_type(st.st_mode) == SFlag::S_IFDIR => {
                return Err(Error::hostile(raw, "its link target is a directory"));
            }
            Ok(_) => {}
            Err(Errno::ENOENT) => {
                return Err(Error::hostile(raw, "its link target does not exist"));
            }
            Err(e) => return Err(e).ctx("cannot stat", &target_path),
        }
        self.replace(parent, name, path)?;
        // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        linkat(
            target_parent.as_fd(),
            target_name,
            parent,
            name,
            AtFlags::empty(),
        )
        .map_err(|e| self.io("cannot link", raw, path, e.into(), 0))?;
        Ok(())
    }

    /// Removes whatever is at `name` in `parent` so something new can be
    /// made there.
    fn replace(&self, parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
        match at::stat_at(parent, name) {
            Ok(_) => self.remove(parent, name, path),
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e).ctx("cannot stat", path),
        }
    }

    /// Removes `name` in `parent`: a whole tree for a directory, never
    /// following a symlink.
    fn remove(&self, parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
        at::remove_tree(parent, name, path).map_err(|(context, path, e)| Error::Io {
            context,
            path,
            source: e.into(),
        })
    }

    fn mkdir(&self, raw: &[u8], parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<()> {
        mkdirat(parent, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| self.io("cannot create directory", raw, path, e.into(), 0))
    }

    /// Sets xattrs through `at` (a `/proc/self/fd/N/NAME` path) with
    /// lsetxattr, which never follows the last component; `shown` is the
    /// path for messages.
    fn set_xattrs_path(
        &self,
        raw: &[u8],
        at: &Path,
        shown: &Path,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<()> {
        for (name, value) in xattrs {
            xattr::set(at, name, value)
                .map_err(|e| self.io("cannot set xattr on", raw, shown, e, 0))?;
        }
        Ok(())
    }

    /// An I/O error, or [`Error::NoSpace`] when that is what it is.
    fn io(&self, context: &'static str, raw: &[u8], path: &Path, e: io::Error, size: u64) -> Error {
        if is_no_space(&e) {
            Error::NoSpace {
                entry: String::from_utf8_lossy(raw).into_owned(),
                needed_bytes_hint: self.report.bytes + size,
                written_bytes: self.report.bytes,
                source: e,
            }
        } else {
            Error::Io {
                context,
                path: path.to_path_buf(),
                source: e,
            }
        }
    }

    /// Sets directory mtimes, children first, skipping any directory a later
    /// entry removed or replaced (and anything now under a symlink), each
    /// reached again from the root without following a symlink.
    fn finish_dir_times(&mut self) -> Result<()> {
        let times = std::mem::take(&mut self.dir_times);
        'dirs: for (rel, mtime) in times.iter().rev() {
            let path = self.root.join(rel);
            let mut dir = self
                .root_fd
                .try_clone()
                .ctx("cannot duplicate", self.root)?;
            for part in rel.iter() {
                match at::open_dir(dir.as_fd(), part) {
                    Ok(next) => dir = next,
                    Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue 'dirs,
                    Err(e) => return Err(e).ctx("cannot open directory", &path),
                }
            }
            futimens(&dir, mtime, mtime).ctx("cannot set times of", &path)?;
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// PAX time: `[-]SECONDS[.FRACTION]`.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        let place = 10i64.pow(8 - u32::try_from(i).ok()?);
        nanos += i64::from(digit - b'0') * place;
    }
    if negative {
        // -1.5 is 1.5 s before the epoch: -2 s + 0.5 s.
        if nanos == 0 {
            Some(TimeSpec::new(-secs, 0))
        } else {
            Some(TimeSpec::new(-secs - 1, 1_000_000_000 - nanos))
        }
    } else {
        Some(TimeSpec::new(secs, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean(b"./a/b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean(b"./").unwrap(), PathBuf::new());
        assert!(matches!(clean(b"/etc/passwd"), Err(Error::Hostile { .. })));
        assert!(matches!(clean(b"a/../../b"), Err(Error::Hostile { .. })));
        assert!(matches!(clean(b"a/\0b"), Err(Error::Hostile { .. })));
        assert!(matches!(clean(&[b'x'; 256]), Err(Error::Hostile { .. })));
        assert!(clean(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn pax_times() {
        let t = parse_pax_time(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_000, 500_000_000));
        let t = parse_pax_time(b"12").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (12, 0));
        let t = parse_pax_time(b"-1.25").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 750_000_000));
        assert!(parse_pax_time(b"x").is_none());
        assert!(parse_pax_time(b"1.2.3").is_none());
    }
}
