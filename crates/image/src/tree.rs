//! A comparable description of a directory tree, so tests (host and VM) can
//! assert that two trees are identical, and print where they are not; and
//! the walker that diff and export read trees with.
//!
//! The walk never follows a symlink and never leaves the root, even while
//! another process changes the tree: every entry is reached from the root's
//! descriptor one component at a time, each directory opened
//! `O_DIRECTORY | O_NOFOLLOW` relative to its parent's descriptor, each
//! file opened `O_PATH | O_NOFOLLOW` (nothing is opened for reading before
//! it is known to be the regular file the listing saw), and every object
//! opened is checked against the listing (`fstat` device, inode and type
//! against `fstatat(AT_SYMLINK_NOFOLLOW)`): a mismatch is
//! [`crate::Error::Changed`]. Symlinks are read with `readlinkat`, never
//! followed. `lost+found` at the root is skipped: it is an artefact of mkfs,
//! not of any layer.
//!
//! Directory mtimes are not compared: they move whenever a child changes,
//! which says nothing about the directory itself. Access and change times
//! are never compared (the kernel sets them; nobody can restore them).

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fs::{File, Metadata},
    io::Read,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::FileTypeExt,
    },
    path::{Path, PathBuf},
};

use nix::{errno::Errno, sys::stat::SFlag};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xattr::FileExt;

use crate::{
    at,
    error::{Error, IoContext, Result},
};

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

    /// The kind a `st_mode` describes.
    pub(crate) fn of_mode(st_mode: u32) -> Kind {
        match at::file_type(st_mode) {
            SFlag::S_IFLNK => Kind::Symlink,
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFCHR => Kind::CharDevice,
            SFlag::S_IFBLK => Kind::BlockDevice,
            SFlag::S_IFIFO => Kind::Fifo,
            SFlag::S_IFSOCK => Kind::Socket,
            _ => Kind::File,
        }
    }
}

/// What the walk saw of one entry: `fstatat(AT_SYMLINK_NOFOLLOW)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat(nix::sys::stat::FileStat);

impl Stat {
    pub(crate) fn kind(&self) -> Kind {
        Kind::of_mode(self.0.st_mode)
    }
    pub(crate) fn is_dir(&self) -> bool {
        self.kind() == Kind::Dir
    }
    pub(crate) fn mode(&self) -> u32 {
        self.0.st_mode
    }
    pub(crate) fn uid(&self) -> u32 {
        self.0.st_uid
    }
    pub(crate) fn gid(&self) -> u32 {
        self.0.st_gid
    }
    pub(crate) fn size(&self) -> u64 {
        u64::try_from(self.0.st_size).unwrap_or(0)
    }
    pub(crate) fn dev(&self) -> u64 {
        self.0.st_dev
    }
    pub(crate) fn ino(&self) -> u64 {
        self.0.st_ino
    }
    pub(crate) fn nlink(&self) -> u64 {
        self.0.st_nlink
    }
    pub(crate) fn rdev(&self) -> u64 {
        self.0.st_rdev
    }
    pub(crate) fn mtime(&self) -> i64 {
        self.0.st_mtime
    }
    pub(crate) fn mtime_nsec(&self) -> i64 {
        self.0.st_mtime_nsec
    }
    pub(crate) fn ctime(&self) -> i64 {
        self.0.st_ctime
    }
    pub(crate) fn ctime_nsec(&self) -> i64 {
        self.0.st_ctime_nsec
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

/// A tree as the walk listed it, with the root's descriptor: every later
/// read goes through [`Tree::open_dir`], [`Tree::open_file`],
/// [`Tree::read_link`] or [`Tree::xattrs`], which reach the entry from the
/// root again without following a symlink and check it is what was listed.
pub(crate) struct Tree {
    /// The root, for messages only.
    root: PathBuf,
    /// The root's descriptor.
    fd: OwnedFd,
    /// Relative path (`.` is the root) to what the listing saw, sorted so
    /// that a directory comes right before its children.
    pub(crate) entries: BTreeMap<PathBuf, Stat>,
}

/// Test builds: a hook given each walked root.
#[cfg(test)]
pub(crate) type ListingHook = Box<dyn FnMut(&Path)>;

#[cfg(test)]
thread_local! {
    /// Test builds: called when a walk has listed its tree, before anything
    /// is read, so a test can change the tree at exactly that point.
    pub(crate) static AFTER_LISTING: std::cell::RefCell<Option<ListingHook>> =
        const { std::cell::RefCell::new(None) };
}

impl Tree {
    /// Lists `root` (without following symlinks; `lost+found` at the root
    /// skipped).
    ///
    /// Errors: [`Error::Changed`] when a directory opened is not the one
    /// listed (the tree is changing); [`Error::Io`].
    pub(crate) fn walk(root: &Path) -> Result<Tree> {
        let fd = at::open_root(root).ctx("cannot open", root)?;
        let mut entries = BTreeMap::new();
        entries.insert(
            PathBuf::from("."),
            Stat(at::stat_fd(&fd).ctx("cannot stat", root)?),
        );
        let tree_root = root.to_path_buf();
        walk_dir(&tree_root, fd.as_fd(), Path::new(""), &mut entries)?;
        #[cfg(test)]
        AFTER_LISTING.with(|hook| {
            if let Some(hook) = hook.borrow_mut().as_mut() {
                hook(root);
            }
        });
        Ok(Tree {
            root: tree_root,
            fd,
            entries,
        })
    }

    /// The path on disk of a walk key, for messages.
    pub(crate) fn path(&self, rel: &Path) -> PathBuf {
        on_disk(&self.root, rel)
    }

    /// What the listing saw at `rel`; [`Error::Changed`] if nothing.
    fn listed(&self, rel: &Path) -> Result<&Stat> {
        self.entries.get(rel).ok_or_else(|| Error::Changed {
            path: self.path(rel),
        })
    }

    /// Checks that `fd` (opened for `rel`) is the object the listing saw.
    fn check(&self, rel: &Path, fd: impl AsFd) -> Result<()> {
        let listed = self.listed(rel)?;
        let opened = at::stat_fd(fd).ctx("cannot stat", self.path(rel))?;
        if at::same_object(&listed.0, &opened) {
            Ok(())
        } else {
            Err(Error::Changed {
                path: self.path(rel),
            })
        }
    }

    /// Opens the directory `rel` (`.` is the root), each component relative
    /// to its parent, `O_DIRECTORY | O_NOFOLLOW`, each checked against the
    /// listing.
    pub(crate) fn open_dir(&self, rel: &Path) -> Result<OwnedFd> {
        let mut dir = self.fd.try_clone().ctx("cannot duplicate", &self.root)?;
        let mut prefix = PathBuf::new();
        for part in components(rel) {
            prefix.push(part);
            dir = at::open_dir(dir.as_fd(), part).map_err(|e| self.open_error(&prefix, e))?;
            self.check(&prefix, &dir)?;
        }
        Ok(dir)
    }

    /// The checked parent directory of `rel` and `rel`'s name in it.
    fn open_parent<'p>(&self, rel: &'p Path) -> Result<(OwnedFd, &'p OsStr)> {
        let name = rel.file_name().ok_or_else(|| Error::Changed {
            path: self.path(rel),
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir(parent)?, name))
    }

    /// An `O_PATH | O_NOFOLLOW` handle on `rel`, checked against the listing.
    fn open_handle(&self, rel: &Path) -> Result<(OwnedFd, OwnedFd)> {
        let (parent, name) = self.open_parent(rel)?;
        let handle = at::open_path(parent.as_fd(), name).map_err(|e| self.open_error(rel, e))?;
        self.check(rel, &handle)?;
        Ok((parent, handle))
    }

    /// Opens the regular file `rel` for reading: an `O_PATH | O_NOFOLLOW`
    /// handle first, checked against the listing, then that very inode is
    /// opened through `/proc/self/fd` (so no FIFO, device or other file is
    /// ever opened in its place).
    pub(crate) fn open_file(&self, rel: &Path) -> Result<File> {
        if self.listed(rel)?.kind() != Kind::File {
            return Err(Error::Changed {
                path: self.path(rel),
            });
        }
        let (_parent, handle) = self.open_handle(rel)?;
        at::reopen_read(handle.as_fd()).ctx("cannot open", self.path(rel))
    }

    /// The target of the symlink `rel`, read with `readlinkat` on a checked
    /// `O_PATH` handle (never followed).
    pub(crate) fn read_link(&self, rel: &Path) -> Result<PathBuf> {
        let (_parent, handle) = self.open_handle(rel)?;
        let target = nix::fcntl::readlinkat(handle.as_fd(), "")
            .ctx("cannot read symlink", self.path(rel))?;
        Ok(PathBuf::from(target))
    }

    /// Sorted extended attributes of `rel`, never following a symlink: on
    /// the checked descriptor of a file or directory; for other objects on
    /// a checked handle, read by name in the checked parent with the `l*`
    /// calls.
    pub(crate) fn xattrs(&self, rel: &Path) -> Result<Vec<(String, Vec<u8>)>> {
        let shown = self.path(rel);
        let mut out = Vec::new();
        match self.listed(rel)?.kind() {
            Kind::Dir | Kind::File => {
                let file = if self.listed(rel)?.is_dir() {
                    File::from(self.open_dir(rel)?)
                } else {
                    self.open_file(rel)?
                };
                for name in file.list_xattr().ctx("cannot list xattrs of", &shown)? {
                    if let Some(value) =
                        file.get_xattr(&name).ctx("cannot read xattr of", &shown)?
                    {
                        out.push((name.to_string_lossy().into_owned(), value));
                    }
                }
            }
            _ => {
                let (parent, _handle) = self.open_handle(rel)?;
                let name = rel.file_name().expect("a checked handle has a name");
                let by_name = at::proc_child(parent.as_fd(), name);
                for xname in xattr::list(&by_name).ctx("cannot list xattrs of", &shown)? {
                    if let Some(value) =
                        xattr::get(&by_name, &xname).ctx("cannot read xattr of", &shown)?
                    {
                        out.push((xname.to_string_lossy().into_owned(), value));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// `sha256:<hex>` of a regular file's content.
    pub(crate) fn file_sha256(&self, rel: &Path) -> Result<String> {
        let shown = self.path(rel);
        let mut file = self.open_file(rel)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).ctx("cannot read", &shown)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// The error for an entry that could not be opened: one that vanished
    /// or became a symlink or something else was changed under the walk.
    fn open_error(&self, rel: &Path, e: Errno) -> Error {
        match e {
            Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP => Error::Changed {
                path: self.path(rel),
            },
            e => Error::Io {
                context: "cannot open",
                path: self.path(rel),
                source: e.into(),
            },
        }
    }
}

/// The components of a walk key (`.` has none).
fn components(rel: &Path) -> impl Iterator<Item = &OsStr> {
    rel.iter().filter(|c| *c != OsStr::new("."))
}

fn walk_dir(
    root: &Path,
    dir: BorrowedFd<'_>,
    rel: &Path,
    out: &mut BTreeMap<PathBuf, Stat>,
) -> Result<()> {
    let shown = on_disk(
        root,
        if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        },
    );
    let mut names = at::list(dir).ctx("cannot list", &shown)?;
    names.sort();
    for name in names {
        let child = rel.join(&name);
        if child == Path::new("lost+found") {
            continue;
        }
        let st = match at::stat_at(dir, &name) {
            Ok(st) => Stat(st),
            // Listed, then gone: the tree is changing.
            Err(Errno::ENOENT) => {
                return Err(Error::Changed {
                    path: root.join(&child),
                });
            }
            Err(e) => return Err(e).ctx("cannot stat", root.join(&child)),
        };
        out.insert(child.clone(), st);
        if st.is_dir() {
            let sub = at::open_dir(dir, &name).map_err(|e| match e {
                Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP => Error::Changed {
                    path: root.join(&child),
                },
                e => Error::Io {
                    context: "cannot open",
                    path: root.join(&child),
                    source: e.into(),
                },
            })?;
            let opened = at::stat_fd(&sub).ctx("cannot stat", root.join(&child))?;
            if !at::same_object(&st.0, &opened) {
                return Err(Error::Changed {
                    path: root.join(&child),
                });
            }
            walk_dir(root, sub.as_fd(), &child, out)?;
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

/// `(major, minor)` of a device number.
pub(crate) fn split_dev(rdev: u64) -> (u64, u64) {
    (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// Groups of paths naming the same inode (only objects with more than one
/// name in the tree), each sorted; keyed by `(dev, ino)`.
pub(crate) fn hard_link_groups(
    entries: &BTreeMap<PathBuf, Stat>,
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
/// Errors: [`Error::Changed`] when the tree changes while it is read; any
/// entry that cannot be listed, stat'ed or read.
pub fn manifest(root: &Path) -> Result<Manifest> {
    let tree = Tree::walk(root)?;
    let groups = hard_link_groups(&tree.entries);
    let mut out = Manifest::new();
    for (rel, meta) in &tree.entries {
        let kind = meta.kind();
        let digest = EntryDigest {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: if kind == Kind::File { meta.size() } else { 0 },
            sha256: if kind == Kind::File {
                Some(tree.file_sha256(rel)?)
            } else {
                None
            },
            link_target: if kind == Kind::Symlink {
                Some(tree.read_link(rel)?)
            } else {
                None
            },
            rdev: matches!(kind, Kind::CharDevice | Kind::BlockDevice)
                .then(|| split_dev(meta.rdev())),
            xattrs: tree.xattrs(rel)?,
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

#[cfg(test)]
pub(crate) mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    /// A fresh directory under the temp dir, removed on drop.
    pub(crate) struct Scratch(pub(crate) PathBuf);

    impl Scratch {
        pub(crate) fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!(
                "thinlayer-image-unit-{name}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Lower empty; upper with `etc/shadow`; outside with a canary
    /// `shadow`. The hook swaps upper's `etc` for a symlink to outside
    /// right after the listing, before any read.
    fn swapped_after_listing(name: &str, read: impl FnOnce(&Path, &Path) -> Result<()>) {
        let s = Scratch::new(name);
        let (lower, upper, outside) = (s.0.join("lower"), s.0.join("upper"), s.0.join("outside"));
        for d in [&lower, &upper, &outside] {
            fs::create_dir(d).unwrap();
        }
        fs::create_dir(upper.join("etc")).unwrap();
        fs::write(upper.join("etc/shadow"), b"inside").unwrap();
        fs::write(outside.join("shadow"), b"CANARY host secret").unwrap();
        let (hook_upper, hook_outside) = (upper.clone(), outside.clone());
        AFTER_LISTING.with(|hook| {
            *hook.borrow_mut() = Some(Box::new(move |root: &Path| {
                if root == hook_upper && hook_upper.join("etc").is_dir() {
                    fs::rename(hook_upper.join("etc"), hook_upper.join("etc.real")).unwrap();
                    symlink(&hook_outside, hook_upper.join("etc")).unwrap();
                }
            }));
        });
        let result = read(&lower, &upper);
        AFTER_LISTING.with(|hook| *hook.borrow_mut() = None);
        match result {
            Err(Error::Changed { path }) => {
                assert!(path.starts_with(upper.join("etc")), "{}", path.display());
                let message = Error::Changed { path }.to_string();
                assert!(message.contains("changed while being read"), "{message}");
            }
            other => panic!("expected a `changed while being read` error, got {other:?}"),
        }
        assert_eq!(
            fs::read(outside.join("shadow")).unwrap(),
            b"CANARY host secret"
        );
    }

    #[test]
    fn export_refuses_a_directory_swapped_after_listing() {
        swapped_after_listing("export", |lower, upper| {
            let mut out = Vec::new();
            let result = crate::write_layer(lower, upper, &mut out).map(|_| ());
            assert!(
                !out.windows(6).any(|w| w == b"CANARY"),
                "host bytes reached the layer"
            );
            result
        });
    }

    #[test]
    fn manifest_refuses_a_directory_swapped_after_listing() {
        swapped_after_listing("manifest", |_, upper| manifest(upper).map(|_| ()));
    }

    #[test]
    fn diff_refuses_a_directory_swapped_after_listing() {
        // Lower holds the same file, so the diff reads both to compare.
        swapped_after_listing("diff", |lower, upper| {
            fs::create_dir(lower.join("etc")).unwrap();
            fs::write(lower.join("etc/shadow"), b"insidf").unwrap();
            crate::changes(lower, upper).map(|_| ())
        });
    }
}
