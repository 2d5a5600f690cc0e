//! A comparable description of a directory tree, so tests (host and VM) can
//! assert that two trees are identical, and print where they are not.
//!
//! The walk never follows a symlink and never leaves the root. `lost+found`
//! at the root is skipped: it is an artefact of mkfs, not of any layer.
//! Directory mtimes are not compared: they move whenever a child changes,
//! which says nothing about the directory itself. Access and change times
//! are never compared (the kernel sets them; nobody can restore them).

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, Metadata},
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

/// What kind of filesystem object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket (never in a layer: tar cannot hold one).
    Socket,
}

impl Kind {
    /// The kind of the object `meta` describes.
    pub fn of(meta: &Metadata) -> Kind {
        let t = meta.file_type();
        if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_char_device() {
            Kind::CharDevice
        } else if t.is_block_device() {
            Kind::BlockDevice
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        }
    }
}

/// Everything about one entry that a layer carries, in comparable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryDigest {
    /// File, directory, symlink, device...
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Content length for regular files, 0 otherwise.
    pub size: u64,
    /// `sha256:<hex>` of a regular file's content.
    pub sha256: Option<String>,
    /// A symlink's target, as stored (never followed).
    pub link_target: Option<PathBuf>,
    /// `(major, minor)` of a device.
    pub rdev: Option<(u64, u64)>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// For an object with several names in the tree: the first of them
    /// (sorted), the same for every member of the group.
    pub hard_link_group: Option<PathBuf>,
    /// `(seconds, nanoseconds)` modification time; `None` for directories.
    pub mtime: Option<(i64, i64)>,
}

/// A tree's description: relative path (`.` is the root itself) to digest.
pub type Manifest = BTreeMap<PathBuf, EntryDigest>;

/// Walks `root` (without following symlinks) and returns every entry's
/// metadata, sorted so that a directory comes right before its children.
/// `lost+found` at the root is skipped.
pub(crate) fn walk(root: &Path) -> Result<BTreeMap<PathBuf, Metadata>> {
    let mut out = BTreeMap::new();
    let meta = fs::symlink_metadata(root).ctx("cannot stat", root)?;
    out.insert(PathBuf::from("."), meta);
    walk_dir(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk_dir(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Metadata>) -> Result<()> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).ctx("cannot list", &dir)? {
        let entry = entry.ctx("cannot list", &dir)?;
        let child = rel.join(entry.file_name());
        if child == Path::new("lost+found") {
            continue;
        }
        let meta = fs::symlink_metadata(entry.path()).ctx("cannot stat", entry.path())?;
        let is_dir = meta.is_dir();
        out.insert(child.clone(), meta);
        if is_dir {
            walk_dir(root, &child, out)?;
        }
    }
    Ok(())
}

/// The path on disk of a walk key.
pub(crate) fn on_disk(root: &Path, rel: &Path) -> PathBuf {
    if rel == Path::new(".") {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

/// Sorted extended attributes of `path`, not following a symlink.
pub(crate) fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path).ctx("cannot list xattrs of", path)? {
        if let Some(value) = xattr::get(path, &name).ctx("cannot read xattr of", path)? {
            out.push((name.to_string_lossy().into_owned(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// `(major, minor)` of a device number.
pub(crate) fn split_dev(rdev: u64) -> (u64, u64) {
    (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// `sha256:<hex>` of a file's content.
pub(crate) fn file_sha256(path: &Path) -> Result<String> {
    let mut file = File::open(path).ctx("cannot open", path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).ctx("cannot read", path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Groups of paths naming the same inode (only objects with more than one
/// name in the tree), each sorted; keyed by `(dev, ino)`.
pub(crate) fn hard_link_groups(
    entries: &BTreeMap<PathBuf, Metadata>,
) -> HashMap<(u64, u64), Vec<PathBuf>> {
    let mut groups: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for (rel, meta) in entries {
        if !meta.is_dir() && meta.nlink() > 1 {
            groups
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(rel.clone());
        }
    }
    groups.retain(|_, paths| paths.len() > 1);
    // BTreeMap iteration is sorted, so each group already is.
    groups
}

/// Describes every entry under `root` (the root itself is `.`), reading and
/// hashing every regular file.
///
/// Errors: any entry that cannot be listed, stat'ed or read.
pub fn manifest(root: &Path) -> Result<Manifest> {
    let entries = walk(root)?;
    let groups = hard_link_groups(&entries);
    let mut out = Manifest::new();
    for (rel, meta) in &entries {
        let path = on_disk(root, rel);
        let kind = Kind::of(meta);
        let digest = EntryDigest {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: if kind == Kind::File { meta.size() } else { 0 },
            sha256: if kind == Kind::File {
                Some(file_sha256(&path)?)
            } else {
                None
            },
            link_target: if kind == Kind::Symlink {
                Some(fs::read_link(&path).ctx("cannot read symlink", &path)?)
            } else {
                None
            },
            rdev: matches!(kind, Kind::CharDevice | Kind::BlockDevice)
                .then(|| split_dev(meta.rdev())),
            xattrs: xattrs(&path)?,
            hard_link_group: groups.get(&(meta.dev(), meta.ino())).map(|g| g[0].clone()),
            mtime: (kind != Kind::Dir).then(|| (meta.mtime(), meta.mtime_nsec())),
        };
        out.insert(rel.clone(), digest);
    }
    Ok(out)
}

/// The first `limit` differences between two manifests, one line each
/// (`only in a: PATH`, `PATH: mode 0o755 != 0o700`, ...); empty when they
/// are equal.
pub fn differences(a: &Manifest, b: &Manifest, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut keys: Vec<&PathBuf> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        if out.len() >= limit {
            break;
        }
        let shown = key.display();
        match (a.get(key), b.get(key)) {
            (Some(_), None) => out.push(format!("only in a: {shown}")),
            (None, Some(_)) => out.push(format!("only in b: {shown}")),
            (Some(x), Some(y)) if x != y => {
                let mut fields = Vec::new();
                macro_rules! field {
                    ($name:ident) => {
                        if x.$name != y.$name {
                            fields.push(format!(
                                "{} {:?} != {:?}",
                                stringify!($name),
                                x.$name,
                                y.$name
                            ));
                        }
                    };
                }
                field!(kind);
                if x.mode != y.mode {
                    fields.push(format!("mode {:#o} != {:#o}", x.mode, y.mode));
                }
                field!(uid);
                field!(gid);
                field!(size);
                field!(sha256);
                field!(link_target);
                field!(rdev);
                field!(xattrs);
                field!(hard_link_group);
                field!(mtime);
                out.push(format!("{shown}: {}", fields.join(", ")));
            }
            _ => {}
        }
    }
    out
}
