//! Writes the difference between two trees as an uncompressed OCI layer tar.
//!
//! Added and modified entries carry their full metadata (mode incl.
//! setuid/setgid/sticky, uid/gid, mtime with nanoseconds in PAX `mtime` when
//! it has any, xattrs as PAX `SCHILY.xattr.*`, device numbers, symlink
//! targets). Every parent directory of a changed entry is written too (with
//! its upper metadata), so the layer stands alone. A deleted path is one
//! `.wh.NAME` whiteout (a deleted directory is one whiteout, not one per
//! child). Paths that name the same inode in upper are written as one file
//! and hard links to it; if only some names of such an inode changed, the
//! whole group is written, so the links survive the round trip.
//!
//! The order is sorted by path (a directory right before its children) and
//! nothing depends on the clock or the walk order, so the same two trees give
//! the same bytes and the same diff_id. Applying the result onto a copy of
//! `lower` yields a tree whose [`crate::manifest`] equals upper's.
//!
//! Must never: follow a symlink while reading upper, read anything outside
//! it, or write a path with `..` or a leading `/`. Upper is read with the
//! walker of [`crate::tree`] (every entry reached from the root's descriptor
//! with `O_NOFOLLOW`, checked to be what the listing saw; a tree changed
//! under the walk is [`crate::Error::Changed`]), so a directory swapped for
//! a symlink to `/etc` is written as the symlink it is, or fails the export. Sockets cannot be in a tar and are skipped with a
//! warning.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tar::{EntryType, Header};

use crate::{
    Hashing, StreamHash,
    diff::{ChangeKind, Trees, changes_of},
    error::{Error, IoContext, Result},
    tree::{Kind, split_dev},
};

/// What [`write_layer`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    /// `sha256:<hex>` of the tar stream written; empty when it was not
    /// hashed ([`Hashing::Skip`]).
    pub diff_id: String,
    /// Tar entries written (files, directories, links, whiteouts...), not
    /// counting PAX extension headers.
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
}

/// Bytes read from a file per system call while it is written out.
const COPY_PIECE: usize = 256 << 10;

enum Item {
    /// An entry of upper, by its relative path.
    Entry(PathBuf),
    /// A whiteout for a deleted path.
    Whiteout,
}

/// Writes upper's changes against lower to `out` as an uncompressed layer
/// tar and returns its diff_id.
///
/// Errors: [`Error::Changed`] when a tree changes while it is read (an
/// entry is not what its listing showed), a tree that cannot be walked or
/// read, a write to `out` that fails, a file that changes size while it is
/// being written.
pub fn write_layer(lower: &Path, upper: &Path, out: impl Write) -> Result<ExportReport> {
    write_layer_with(lower, upper, out, Hashing::Sha256)
}

/// [`write_layer`], the stream hashed into the report's diff_id or not.
///
/// Errors: as [`write_layer`].
pub fn write_layer_with(
    lower: &Path,
    upper: &Path,
    out: impl Write,
    hashing: Hashing,
) -> Result<ExportReport> {
    let trees = Trees::walk(lower, upper)?;
    let changes = changes_of(&trees)?;

    // Changed entries, then every name of a changed multi-linked file.
    let mut emit: BTreeSet<PathBuf> = BTreeSet::new();
    let mut whiteouts: BTreeSet<PathBuf> = BTreeSet::new();
    for change in &changes {
        match change.kind {
            ChangeKind::Deleted => {
                whiteouts.insert(change.path.clone());
            }
            ChangeKind::Added | ChangeKind::Modified => {
                emit.insert(change.path.clone());
            }
        }
    }
    for rel in emit.clone() {
        let meta = &trees.upper.entries[&rel];
        if let Some(group) = trees.upper_groups.get(&(meta.dev(), meta.ino())) {
            emit.extend(group.iter().cloned());
        }
    }
    // Parents, so the layer stands alone (the root only if it changed).
    let mut items: BTreeMap<PathBuf, Item> = BTreeMap::new();
    for rel in &emit {
        for ancestor in rel.ancestors() {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            items
                .entry(ancestor.to_path_buf())
                .or_insert_with(|| Item::Entry(ancestor.to_path_buf()));
        }
    }
    for rel in &whiteouts {
        let name = rel
            .file_name()
            .expect("a deleted path has a name: the root is never deleted");
        let mut wh = OsString::from(".wh.");
        wh.push(name);
        let key = match rel.parent() {
            Some(p) => p.join(wh),
            None => PathBuf::from(wh),
        };
        for ancestor in rel.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            items
                .entry(ancestor.to_path_buf())
                .or_insert_with(|| Item::Entry(ancestor.to_path_buf()));
        }
        items.insert(key, Item::Whiteout);
    }

    let mut builder = tar::Builder::new(HashingWriter::new(out, hashing));
    builder.mode(tar::HeaderMode::Complete);
    let mut report = ExportReport {
        diff_id: String::new(),
        entries: 0,
        bytes: 0,
    };
    // First name written of each multi-linked inode.
    let mut written_inodes: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    for (key, item) in &items {
        match item {
            Item::Whiteout => {
                let mut header = Header::new_gnu();
                header.set_entry_type(EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                header.set_mtime(0);
                builder
                    .append_data(&mut header, key, io::empty())
                    .ctx("cannot write whiteout", key)?;
            }
            Item::Entry(rel) => {
                let written = write_entry(&mut builder, rel, &trees, &mut written_inodes)?;
                match written {
                    None => continue,
                    Some(bytes) => report.bytes += bytes,
                }
            }
        }
        report.entries += 1;
    }
    builder.finish().ctx("cannot finish the layer tar", upper)?;
    let hashing = builder
        .into_inner()
        .ctx("cannot finish the layer tar", upper)?;
    report.diff_id = hashing.diff_id();
    Ok(report)
}

/// Writes one entry of upper; `None` when it was skipped (a socket).
fn write_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    rel: &Path,
    trees: &Trees,
    written_inodes: &mut BTreeMap<(u64, u64), PathBuf>,
) -> Result<Option<u64>> {
    let meta = &trees.upper.entries[rel];
    let path = trees.upper.path(rel);
    let kind = meta.kind();
    if kind == Kind::Socket {
        tracing::warn!(path = %path.display(), "skipping a socket: tar cannot hold one");
        return Ok(None);
    }

    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in trees.upper.xattrs(rel)? {
        pax.push((format!("SCHILY.xattr.{name}"), value));
    }
    let (secs, nsecs) = (meta.mtime(), meta.mtime_nsec());
    if nsecs != 0 || secs < 0 {
        pax.push(("mtime".into(), format_pax_time(secs, nsecs).into_bytes()));
    }

    let mut header = Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(meta.uid().into());
    header.set_gid(meta.gid().into());
    header.set_mtime(u64::try_from(secs).unwrap_or(0));
    header.set_size(0);

    let inode = (meta.dev(), meta.ino());
    let first_name = if kind != Kind::Dir && trees.upper_groups.contains_key(&inode) {
        written_inodes.get(&inode).cloned()
    } else {
        None
    };
    if !pax.is_empty() && first_name.is_none() {
        builder
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .ctx("cannot write", rel)?;
    }
    let tar_path = if rel == Path::new(".") {
        PathBuf::from("./")
    } else {
        rel.to_path_buf()
    };
    if let Some(target) = first_name {
        header.set_entry_type(EntryType::Link);
        builder
            .append_link(&mut header, &tar_path, &target)
            .ctx("cannot write", rel)?;
        return Ok(Some(0));
    }
    if trees.upper_groups.contains_key(&inode) {
        written_inodes.insert(inode, rel.to_path_buf());
    }

    let mut bytes = 0;
    match kind {
        Kind::Dir => {
            header.set_entry_type(EntryType::Directory);
            builder
                .append_data(&mut header, &tar_path, io::empty())
                .ctx("cannot write", rel)?;
        }
        Kind::File => {
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.size());
            let file = trees.upper.open_file(rel)?;
            // Read in large pieces (the copy's own buffer is 8 KiB): one
            // system call per piece.
            let mut counted = io::BufReader::with_capacity(
                COPY_PIECE,
                CountingReader {
                    inner: file.take(meta.size()),
                    count: 0,
                },
            );
            builder
                .append_data(&mut header, &tar_path, &mut counted)
                .ctx("cannot write", rel)?;
            if counted.get_ref().count != meta.size() {
                return Err(Error::Io {
                    context: "file changed size while being exported",
                    path,
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
            bytes = meta.size();
        }
        Kind::Symlink => {
            header.set_entry_type(EntryType::Symlink);
            let target = trees.upper.read_link(rel)?;
            builder
                .append_link(&mut header, &tar_path, &target)
                .ctx("cannot write", rel)?;
        }
        Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
            header.set_entry_type(match kind {
                Kind::CharDevice => EntryType::Char,
                Kind::BlockDevice => EntryType::Block,
                _ => EntryType::Fifo,
            });
            if kind != Kind::Fifo {
                let (major, minor) = split_dev(meta.rdev());
                let too_big = |_| Error::Io {
                    context: "device number does not fit a tar header",
                    path: path.clone(),
                    source: io::Error::from(io::ErrorKind::InvalidData),
                };
                header
                    .set_device_major(u32::try_from(major).map_err(too_big)?)
                    .ctx("cannot write", rel)?;
                header
                    .set_device_minor(u32::try_from(minor).map_err(too_big)?)
                    .ctx("cannot write", rel)?;
            }
            builder
                .append_data(&mut header, &tar_path, io::empty())
                .ctx("cannot write", rel)?;
        }
        Kind::Socket => unreachable!("sockets are skipped above"),
    }
    Ok(Some(bytes))
}

/// PAX time: `[-]SECONDS.NANOSECONDS`.
fn format_pax_time(secs: i64, nsecs: i64) -> String {
    if nsecs == 0 {
        format!("{secs}")
    } else {
        format!("{secs}.{nsecs:09}")
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Passes writes through and hashes them (unless told to skip).
struct HashingWriter<W> {
    inner: W,
    hasher: StreamHash,
}

impl<W> HashingWriter<W> {
    fn new(inner: W, hashing: Hashing) -> Self {
        HashingWriter {
            inner,
            hasher: StreamHash::new(hashing),
        }
    }

    fn diff_id(self) -> String {
        self.hasher.diff_id()
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
