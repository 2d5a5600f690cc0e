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
//! Metadata: owner first (lchown), then mode (so setuid/setgid survive the
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
//! Paths: a leading `./` is dropped (`tar -C dir .` writes it); `.` or `./`
//! alone is the root, whose metadata the layer may set. A leading `/` is
//! refused, not stripped: OCI layer paths are relative, and no tool that
//! writes layers emits one, so it marks a hand-made or hostile archive.
//!
//! Must never happen: a write outside `root`. Every entry's path is cleaned
//! (no `..`, no absolute path, no NUL, no name over 255 bytes, no path over
//! 4095), every parent component is checked with `symlink_metadata` and a
//! symlink there is refused (including one this tar made earlier), files are
//! created with `O_CREAT | O_EXCL | O_NOFOLLOW`, and no call follows a
//! symlink in the last component. Hard-link targets and whiteouts get the same
//! checks. The checks guard against the archive, not against another process
//! racing on the tree: the caller owns the snapshot while it applies. The
//! tar crate's own `unpack` is never used.
//!
//! On error the work stops at once and the tree is left as it is: the caller
//! throws the whole snapshot away.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashSet},
    fs::{self, OpenOptions},
    io::{self, Cursor, Read, Seek, SeekFrom, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    fcntl::AT_FDCWD,
    sys::{
        stat::{Mode, SFlag, UtimensatFlags, futimens, makedev, mknod, utimensat},
        time::TimeSpec,
    },
    unistd::{Gid, Uid, fchown},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tar::EntryType;
use xattr::FileExt;

use crate::error::{Error, IoContext, Result, is_no_space};

/// The longest file name Linux takes (NAME_MAX).
const NAME_MAX: usize = 255;
/// The longest path Linux takes, without its NUL (PATH_MAX - 1).
const PATH_MAX: usize = 4095;
/// A tar block.
const BLOCK: u64 = 512;
/// Runs of zeros this long and aligned are left as holes, not written.
const HOLE_BLOCK: usize = 4096;

/// How to apply a layer.
#[derive(Default)]
pub struct ApplyOptions<'a> {
    /// `sha256:<hex>` the uncompressed stream must hash to (the image
    /// config's `rootfs.diff_ids` entry); checked after the whole stream is
    /// read.
    pub expected_diff_id: Option<String>,
    /// Called after each entry with the uncompressed bytes read so far, and
    /// once more at the end with the whole stream's length.
    pub progress: Option<&'a dyn Fn(u64)>,
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
    /// Tar entries applied, whiteouts included (PAX and GNU extension
    /// headers are not entries).
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
    /// Whiteouts applied (`.wh.NAME` and opaque markers).
    pub whiteouts: u64,
}

/// Applies the layer tar read from `input` (uncompressed, gzip or zstd) onto
/// the directory tree at `root`.
///
/// Preconditions: `root` is a directory the caller owns for the duration
/// (the mounted snapshot of the layer's parent); on error the caller discards
/// it.
///
/// Errors: [`Error::Hostile`] for an entry that breaks the rules above (it is
/// named), [`Error::Corrupt`] for a damaged or truncated stream,
/// [`Error::UnsupportedCompression`], [`Error::DiffIdMismatch`] (after the
/// whole stream is read and applied), [`Error::NoSpace`] when the filesystem
/// fills up, [`Error::Io`] for anything else.
pub fn apply_layer(root: &Path, input: impl Read, opts: &ApplyOptions) -> Result<ApplyReport> {
    let meta = fs::symlink_metadata(root).ctx("cannot stat the layer root", root)?;
    if !meta.is_dir() {
        return Err(Error::Io {
            context: "the layer root is not a directory",
            path: root.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotADirectory),
        });
    }
    let position = Cell::new(0u64);
    let reader = HashingReader::new(decompress(input)?, &position);
    let mut archive = tar::Archive::new(reader);
    let mut applier = Applier {
        root,
        added: HashSet::new(),
        dir_times: BTreeMap::new(),
        report: ApplyReport {
            diff_id: String::new(),
            entries: 0,
            bytes: 0,
            whiteouts: 0,
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
            progress(position.get());
        }
    }
    applier.finish_dir_times()?;

    // The end-of-archive marker is two zero blocks; the tar crate stops at
    // the first (or at a clean EOF, which is how a cut stream looks).
    let mut reader = archive.into_inner();
    let consumed = position.get();
    let mut trailer = Vec::new();
    reader
        .read_to_end(&mut trailer)
        .map_err(|source| Error::Corrupt {
            context: "reading the end of the archive".into(),
            source,
        })?;
    let zero_blocks_read = consumed.saturating_sub(last_end);
    let has_end_marker =
        zero_blocks_read == BLOCK && trailer.len() >= 512 && trailer[..512].iter().all(|b| *b == 0);
    if !has_end_marker {
        return Err(Error::Corrupt {
            context: format!("no end-of-archive marker after `{last_name}`"),
            source: io::Error::from(io::ErrorKind::UnexpectedEof),
        });
    }
    if let Some(progress) = opts.progress {
        progress(position.get());
    }
    applier.report.diff_id = reader.diff_id();
    if let Some(expected) = &opts.expected_diff_id {
        if !expected.eq_ignore_ascii_case(&applier.report.diff_id) {
            return Err(Error::DiffIdMismatch {
                expected: expected.clone(),
                actual: applier.report.diff_id,
            });
        }
    }
    tracing::debug!(root = %root.display(), diff_id = %applier.report.diff_id,
        entries = applier.report.entries, "layer applied");
    Ok(applier.report)
}

/// The total content size (sum of regular files' sizes) of a layer tar,
/// uncompressed, gzip or zstd: how much the filesystem needs at least to
/// apply it. Reads the whole stream.
///
/// Errors: [`Error::Corrupt`], [`Error::UnsupportedCompression`].
pub fn tar_content_size(input: impl Read) -> Result<u64> {
    let mut archive = tar::Archive::new(decompress(input)?);
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

/// Hashes and counts what passes through.
struct HashingReader<'a, R> {
    inner: R,
    hasher: Sha256,
    position: &'a Cell<u64>,
}

impl<'a, R> HashingReader<'a, R> {
    fn new(inner: R, position: &'a Cell<u64>) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            position,
        }
    }

    fn diff_id(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.position.set(self.position.get() + n as u64);
        Ok(n)
    }
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
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Applier<'r> {
    root: &'r Path,
    /// Paths this tar created or replaced (and parents it made): an opaque
    /// marker keeps them.
    added: HashSet<PathBuf>,
    /// Directory mtimes, set once every entry is in.
    dir_times: BTreeMap<PathBuf, TimeSpec>,
    report: ApplyReport,
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
        self.make_parents(&raw, &rel)?;
        let path = self.root.join(&rel);

        match kind {
            EntryType::Regular | EntryType::Continuous => {
                self.file(&raw, &rel, &path, entry, &meta)?
            }
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove(&path)?;
                        self.mkdir(&raw, &path)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => self.mkdir(&raw, &path)?,
                    Err(e) => return Err(e).ctx("cannot stat", &path),
                }
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .ctx("cannot chown", &path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode))
                    .ctx("cannot chmod", &path)?;
                self.set_xattrs_path(&raw, &path, &meta.xattrs)?;
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
                self.replace(&path)?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .map_err(|e| self.io("cannot create symlink", &raw, &path, e, 0))?;
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .ctx("cannot chown", &path)?;
                self.set_xattrs_path(&raw, &path, &meta.xattrs)?;
                set_times_nofollow(&path, meta.mtime)?;
            }
            EntryType::Link => self.hard_link(&raw, &rel, &path, entry)?,
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
                self.replace(&path)?;
                mknod(&path, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| self.io("cannot create node", &raw, &path, e.into(), 0))?;
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .ctx("cannot chown", &path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode))
                    .ctx("cannot chmod", &path)?;
                self.set_xattrs_path(&raw, &path, &meta.xattrs)?;
                set_times_nofollow(&path, meta.mtime)?;
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

    fn entry_meta<R: Read>(&self, raw: &[u8], entry: &mut tar::Entry<'_, R>) -> Result<EntryMeta> {
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
                    xattrs.push((
                        String::from_utf8_lossy(name).into_owned(),
                        ext.value_bytes().to_vec(),
                    ));
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

    /// Checks every parent of `rel` is a real directory (creating missing
    /// ones, 0755 root-owned, as other runtimes do); refuses symlinks.
    fn make_parents(&mut self, raw: &[u8], rel: &Path) -> Result<()> {
        self.walk_parents(raw, rel, true).map(|_| ())
    }

    /// Whether every parent of `rel` is a real directory; `false` if one is
    /// missing; refuses symlinks and non-directories.
    fn parents_exist(&mut self, raw: &[u8], rel: &Path) -> Result<bool> {
        self.walk_parents(raw, rel, false)
    }

    /// Walks the parents of `rel` under the root, refusing any symlink. A
    /// missing parent is made when `create` (else the answer is `false`);
    /// a parent that is not a directory is hostile when `create` (else
    /// `false`).
    fn walk_parents(&mut self, raw: &[u8], rel: &Path, create: bool) -> Result<bool> {
        let mut prefix = PathBuf::new();
        let parts: Vec<_> = rel.components().collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            prefix.push(part);
            let path = self.root.join(&prefix);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(Error::hostile(
                        raw,
                        format!(
                            "its parent `{}` is a symlink; going through it could leave the root",
                            prefix.display()
                        ),
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) if create => {
                    return Err(Error::hostile(
                        raw,
                        format!("its parent `{}` is not a directory", prefix.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    self.mkdir(raw, &path)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .ctx("cannot chmod", &path)?;
                    self.added.insert(prefix.clone());
                }
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e).ctx("cannot stat", &path),
            }
        }
        Ok(true)
    }

    fn whiteout(&mut self, raw: &[u8], rel: &Path, name: &[u8]) -> Result<()> {
        if name == b".wh..opq" {
            let dir = rel.parent().expect("a whiteout has a parent (maybe empty)");
            // The directory itself must be a real one: check it as a parent.
            self.make_parents(raw, rel)?;
            self.clear_opaque(dir)?;
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
        let target = rel
            .parent()
            .expect("a whiteout has a parent (maybe empty)")
            .join(std::ffi::OsStr::from_bytes(name));
        if self.parents_exist(raw, &target)? {
            let path = self.root.join(&target);
            match fs::symlink_metadata(&path) {
                Ok(_) => self.remove(&path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("cannot stat", &path),
            }
        }
        self.added.remove(&target);
        self.report.whiteouts += 1;
        Ok(())
    }

    /// Removes from `dir` everything this tar did not add.
    fn clear_opaque(&self, dir: &Path) -> Result<()> {
        let path = self.root.join(dir);
        for child in fs::read_dir(&path).ctx("cannot list", &path)? {
            let child = child.ctx("cannot list", &path)?;
            let rel = dir.join(child.file_name());
            let child_path = child.path();
            if !self.added.contains(&rel) {
                self.remove(&child_path)?;
            } else if fs::symlink_metadata(&child_path)
                .ctx("cannot stat", &child_path)?
                .is_dir()
            {
                self.clear_opaque(&rel)?;
            }
        }
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        raw: &[u8],
        rel: &Path,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
        meta: &EntryMeta,
    ) -> Result<()> {
        self.replace(path)?;
        let size = entry.size();
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(path)
            .map_err(|e| self.io("cannot create", raw, path, e, size))?;
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
        fchown(
            &file,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .ctx("cannot chown", path)?;
        file.set_permissions(fs::Permissions::from_mode(meta.mode))
            .ctx("cannot chmod", path)?;
        for (name, value) in &meta.xattrs {
            file.set_xattr(name, value)
                .map_err(|e| self.io("cannot set xattr on", raw, path, e, 0))?;
        }
        futimens(&file, &meta.mtime, &meta.mtime).ctx("cannot set times of", path)?;
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        raw: &[u8],
        rel: &Path,
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
        if !self.parents_exist(raw, &target)? {
            return Err(Error::hostile(raw, "its link target does not exist"));
        }
        let target_path = self.root.join(&target);
        match fs::symlink_metadata(&target_path) {
            Ok(m) if m.is_dir() => {
                return Err(Error::hostile(raw, "its link target is a directory"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::hostile(raw, "its link target does not exist"));
            }
            Err(e) => return Err(e).ctx("cannot stat", &target_path),
        }
        self.replace(path)?;
        // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(&target_path, path).map_err(|e| self.io("cannot link", raw, path, e, 0))?;
        Ok(())
    }

    /// Removes whatever is at `path` so something new can be made there.
    fn replace(&self, path: &Path) -> Result<()> {
        match fs::symlink_metadata(path) {
            Ok(_) => self.remove(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("cannot stat", path),
        }
    }

    /// Removes `path`: a whole tree for a directory, never following a symlink.
    fn remove(&self, path: &Path) -> Result<()> {
        let meta = fs::symlink_metadata(path).ctx("cannot stat", path)?;
        if meta.is_dir() {
            // std's remove_dir_all does not follow symlinks inside the tree.
            fs::remove_dir_all(path).ctx("cannot remove", path)
        } else {
            fs::remove_file(path).ctx("cannot remove", path)
        }
    }

    fn mkdir(&self, raw: &[u8], path: &Path) -> Result<()> {
        fs::create_dir(path).map_err(|e| self.io("cannot create directory", raw, path, e, 0))
    }

    fn set_xattrs_path(&self, raw: &[u8], path: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<()> {
        for (name, value) in xattrs {
            // xattr::set does not follow a symlink (lsetxattr).
            xattr::set(path, name, value)
                .map_err(|e| self.io("cannot set xattr on", raw, path, e, 0))?;
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
    /// entry removed or replaced (and anything now under a symlink).
    fn finish_dir_times(&mut self) -> Result<()> {
        let times = std::mem::take(&mut self.dir_times);
        for (rel, mtime) in times.iter().rev() {
            if !self.parents_exist(rel.as_os_str().as_bytes(), rel)? {
                continue;
            }
            let path = self.root.join(rel);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => set_times_nofollow(&path, *mtime)?,
                _ => {}
            }
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

fn set_times_nofollow(path: &Path, mtime: TimeSpec) -> Result<()> {
    utimensat(
        AT_FDCWD,
        path,
        &mtime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .ctx("cannot set times of", path)
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
