//! What changed between two trees: the parent layer's mount (`lower`) and the
//! child's (`upper`), as `docker diff` reports it (A/C/D).
//!
//! An entry is *Modified* when its type, permission bits, owner, group,
//! extended attributes or hard-link group differ, or (for non-directories)
//! its mtime, size, symlink target, device number or content. A directory
//! whose children changed but whose own metadata did not is not reported. A
//! deleted directory is one *Deleted* entry, not one per child; an added
//! directory is reported with every child.
//!
//! Content: two regular files of equal size and mtime are compared byte by
//! byte, unless both are the same inode number with the same ctime. That is
//! the case in a thin snapshot for every file the child never touched (the
//! block-level copy keeps inode numbers and ctimes, and the kernel moves ctime
//! on every write or metadata change; userspace cannot set it back), so the
//! common case costs no reads, and nothing else is trusted: a same-size
//! rewrite with a restored mtime (`touch -r`, tar extraction) is still found.
//! The same holds for what only a read shows of any entry, its extended
//! attributes and a symlink's target (setting an attribute moves ctime; a
//! target is fixed at the link's creation): an entry untouched in that sense
//! is compared by its `stat` alone, so the walk of an unchanged tree reads
//! nothing but directories and `stat`s.
//!
//! Both trees are read with the walker of [`crate::tree`]: every entry is
//! reached from its root's descriptor without following a symlink and
//! checked to be what the listing saw, so a tree changed under the walk
//! (a directory swapped for a symlink to `/etc`) is [`crate::Error::Changed`],
//! never a read of something outside it. `lost+found` at the root is skipped.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{IoContext, Result},
    tree::{self, Kind, Stat, Tree},
};

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    /// Only in upper (`A`).
    Added,
    /// In both, different (`C`).
    Modified,
    /// Only in lower (`D`).
    Deleted,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Change {
    /// Relative to the roots; `.` is the root itself.
    pub path: PathBuf,
    /// Added, modified or deleted.
    pub kind: ChangeKind,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let letter = match self.kind {
            ChangeKind::Added => 'A',
            ChangeKind::Modified => 'C',
            ChangeKind::Deleted => 'D',
        };
        write!(f, "{letter} {}", self.path.display())
    }
}

/// Both trees, walked, with their hard-link groups: what `changes` and the
/// exporter work from.
pub(crate) struct Trees {
    pub lower: Tree,
    pub upper: Tree,
    pub lower_groups: HashMap<(u64, u64), Vec<PathBuf>>,
    pub upper_groups: HashMap<(u64, u64), Vec<PathBuf>>,
}

impl Trees {
    pub(crate) fn walk(lower: &Path, upper: &Path) -> Result<Trees> {
        let lower = Tree::walk(lower)?;
        let upper = Tree::walk(upper)?;
        let lower_groups = tree::hard_link_groups(&lower.entries);
        let upper_groups = tree::hard_link_groups(&upper.entries);
        Ok(Trees {
            lower,
            upper,
            lower_groups,
            upper_groups,
        })
    }
}

/// The changes from `lower` to `upper`, sorted by path (a directory before
/// its children).
///
/// Errors: [`crate::Error::Changed`] when either tree changes while it is
/// read; an entry of either tree that cannot be listed, stat'ed or read.
pub fn changes(lower: &Path, upper: &Path) -> Result<Vec<Change>> {
    let trees = Trees::walk(lower, upper)?;
    changes_of(&trees)
}

pub(crate) fn changes_of(t: &Trees) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    for (rel, umeta) in &t.upper.entries {
        match t.lower.entries.get(rel) {
            None => out.push(Change {
                path: rel.clone(),
                kind: ChangeKind::Added,
            }),
            Some(lmeta) => {
                if differs(rel, lmeta, umeta, t)? {
                    out.push(Change {
                        path: rel.clone(),
                        kind: ChangeKind::Modified,
                    });
                }
            }
        }
    }
    for rel in t.lower.entries.keys() {
        if t.upper.entries.contains_key(rel) {
            continue;
        }
        // Only the top of a deleted subtree, and only where the parent is
        // still a directory (a directory replaced by a file takes its
        // children with it).
        let parent = match rel.parent() {
            Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
            Some(p) => p.to_path_buf(),
            None => continue,
        };
        if t.upper.entries.get(&parent).is_some_and(|m| m.is_dir()) {
            out.push(Change {
                path: rel.clone(),
                kind: ChangeKind::Deleted,
            });
        }
    }
    out.sort();
    Ok(out)
}

fn group_of<'a>(
    groups: &'a HashMap<(u64, u64), Vec<PathBuf>>,
    meta: &Stat,
) -> Option<&'a Vec<PathBuf>> {
    groups.get(&(meta.dev(), meta.ino()))
}

fn differs(rel: &Path, l: &Stat, u: &Stat, t: &Trees) -> Result<bool> {
    let kind = u.kind();
    if l.kind() != kind
        || l.mode() & 0o7777 != u.mode() & 0o7777
        || l.uid() != u.uid()
        || l.gid() != u.gid()
    {
        return Ok(true);
    }
    if kind != Kind::Dir {
        if (l.mtime(), l.mtime_nsec()) != (u.mtime(), u.mtime_nsec()) {
            return Ok(true);
        }
        if group_of(&t.lower_groups, l) != group_of(&t.upper_groups, u) {
            return Ok(true);
        }
    }
    match kind {
        Kind::File if l.size() != u.size() => return Ok(true),
        Kind::CharDevice | Kind::BlockDevice if l.rdev() != u.rdev() => return Ok(true),
        _ => {}
    }
    // The same inode, never changed since the snapshot: nothing to read.
    if l.ino() == u.ino() && (l.ctime(), l.ctime_nsec()) == (u.ctime(), u.ctime_nsec()) {
        return Ok(false);
    }
    if kind == Kind::Symlink && t.lower.read_link(rel)? != t.upper.read_link(rel)? {
        return Ok(true);
    }
    if t.lower.xattrs(rel)? != t.upper.xattrs(rel)? {
        return Ok(true);
    }
    Ok(kind == Kind::File && !same_content(t, rel)?)
}

/// Byte-by-byte comparison of `rel` in both trees (equal size), stopping at
/// the first difference.
fn same_content(t: &Trees, rel: &Path) -> Result<bool> {
    let (a, b) = (t.lower.path(rel), t.upper.path(rel));
    let mut fa = t.lower.open_file(rel)?;
    let mut fb = t.upper.open_file(rel)?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(&mut fa, &mut ba).ctx("cannot read", &a)?;
        let m = read_full(&mut fb, &mut bb).ctx("cannot read", &b)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = f.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
