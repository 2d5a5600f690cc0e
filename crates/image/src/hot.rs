//! What a container read, and reading it in again ahead of the next one.
//!
//! Every container layer of a block-level store is a filesystem of its
//! own, with a page cache of its own: the image's files a container reads
//! (its program, the libraries, `/etc/passwd`) come through the snapshot
//! device, cold, in every container, where overlayfs shares one page
//! cache for all containers of an image. A [`HotSet`] is what was in a
//! container layer's page cache when it was removed (learned with
//! `mincore`, reading nothing); [`HotSet::warm`] reads just that into a
//! snapshot made ahead of demand, before a container starts in it.
//!
//! Both walk relative to a directory's descriptor, each level opened
//! `O_DIRECTORY | O_NOFOLLOW` and each file `O_NOFOLLOW | O_NONBLOCK`
//! (a FIFO never blocks) with `O_NOATIME` (reading ahead changes no
//! inode, so writes nothing to the snapshot): a path an image or a
//! container made into a symlink ends the walk there, never leads out of
//! the tree. Both are best effort: an entry that cannot be opened or
//! read is skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs::File,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::FileExt,
    },
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    fcntl::{OFlag, openat},
    sys::stat::{Mode, SFlag},
};

use crate::at;

/// How much a walk may learn: it stops at the first limit reached and
/// keeps what it found.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Entries (of any type) looked at.
    pub entries: usize,
    /// Bytes of file content the set may hold.
    pub bytes: u64,
    /// Time the walk may take.
    pub time: Duration,
    /// Files whose status changed after this Unix time are left out: a
    /// container's own writes, which the next container's tree lacks.
    pub changed_after: Option<i64>,
}

impl Default for Limits {
    /// 100,000 entries, 64 MiB, 500 ms: a large image's tree, far more
    /// than a container's start reads, and one settler step at most.
    fn default() -> Limits {
        Limits {
            entries: 100_000,
            bytes: 64 << 20,
            time: Duration::from_millis(500),
            changed_after: None,
        }
    }
}

/// What one [`HotSet::learn`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// Entries looked at.
    pub entries: usize,
    /// Files with pages in the page cache.
    pub files: usize,
    /// Their bytes in the page cache.
    pub bytes: u64,
    /// Whether a [`Limits`] stopped the walk before its end.
    pub cut: bool,
}

/// What one [`HotSet::warm`] read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Files read.
    pub files: usize,
    /// Bytes read.
    pub bytes: u64,
}

/// Byte ranges of files below a root, by path relative to it: page runs
/// that were in the page cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HotSet {
    files: BTreeMap<PathBuf, Vec<(u64, u64)>>,
    bytes: u64,
}

impl HotSet {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Files it holds.
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// Their paths, relative to the root they were learned below.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(PathBuf::as_path)
    }

    /// Adds what of the regular files below `root` is in the page cache
    /// now (merged with what the set holds), reading none of it. A file
    /// with several names (hard links) is taken once, by the first name
    /// found.
    ///
    /// # Errors
    /// Only when `root` itself cannot be listed.
    pub fn learn(&mut self, root: BorrowedFd<'_>, limits: Limits) -> std::io::Result<Learned> {
        let names = at::list(root).map_err(std::io::Error::from)?;
        let mut walk = Walk {
            limits,
            started: Instant::now(),
            page: page_size(),
            out: Learned::default(),
            seen: BTreeSet::new(),
        };
        self.learn_in(&mut walk, root, names, &PathBuf::new(), 0);
        Ok(walk.out)
    }

    /// [`HotSet::learn`] of directory `dir` (holding `names`, at `path`),
    /// depth first so that only one directory per level is open; false
    /// once a limit is reached.
    fn learn_in(
        &mut self,
        walk: &mut Walk,
        dir: BorrowedFd<'_>,
        names: Vec<OsString>,
        path: &Path,
        depth: usize,
    ) -> bool {
        for name in names {
            if walk.out.entries >= walk.limits.entries
                || self.bytes >= walk.limits.bytes
                || walk.started.elapsed() >= walk.limits.time
            {
                walk.out.cut = true;
                return false;
            }
            walk.out.entries += 1;
            let Ok(st) = at::stat_at(dir, &name) else {
                continue;
            };
            match at::file_type(st.st_mode) {
                SFlag::S_IFDIR if depth < MAX_DEPTH => {
                    let Ok(sub) = at::open_dir(dir, &name) else {
                        continue;
                    };
                    let Ok(inner) = at::list(sub.as_fd()) else {
                        continue;
                    };
                    if !self.learn_in(walk, sub.as_fd(), inner, &path.join(&name), depth + 1) {
                        return false;
                    }
                }
                SFlag::S_IFREG
                    if st.st_size > 0
                        && walk.limits.changed_after.is_none_or(|t| st.st_ctime <= t)
                        && walk.seen.insert(st.st_ino) =>
                {
                    let Ok(f) = open_file(dir, &name) else {
                        continue;
                    };
                    let runs = resident(&f, walk.page);
                    let bytes: u64 = runs.iter().map(|(_, len)| len).sum();
                    if bytes > 0 {
                        tracing::trace!(path = %path.join(&name).display(), bytes, "in the page cache");
                        walk.out.files += 1;
                        walk.out.bytes += bytes;
                        self.add(path.join(&name), runs);
                    }
                }
                _ => {}
            }
        }
        true
    }

    /// Reads what the set holds from the files below `root` (one read of
    /// each range into a scratch buffer): afterwards it is in `root`'s
    /// page cache.
    ///
    /// # Errors
    /// Only when `root` cannot be opened.
    pub fn warm(&self, root: &Path) -> std::io::Result<Warmed> {
        let top = at::open_root(root).map_err(std::io::Error::from)?;
        let mut buf = vec![0u8; 256 << 10];
        let mut out = Warmed::default();
        for (path, runs) in &self.files {
            let Some(f) = open_below(top.as_fd(), path) else {
                continue;
            };
            out.files += 1;
            for &(start, len) in runs {
                let mut at = start;
                while at < start + len {
                    let want =
                        usize::try_from(start + len - at).map_or(buf.len(), |w| w.min(buf.len()));
                    match f.read_at(&mut buf[..want], at) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            at += n as u64;
                            out.bytes += n as u64;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Merges `runs` into `path`'s.
    fn add(&mut self, path: PathBuf, runs: Vec<(u64, u64)>) {
        let have = self.files.entry(path).or_default();
        let before: u64 = have.iter().map(|(_, len)| len).sum();
        have.extend(runs);
        have.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(have.len());
        for &(start, len) in have.iter() {
            match merged.last_mut() {
                Some((s, l)) if start <= *s + *l => *l = (*l).max(start + len - *s),
                _ => merged.push((start, len)),
            }
        }
        let after: u64 = merged.iter().map(|(_, len)| len).sum();
        *have = merged;
        self.bytes = self.bytes - before + after;
    }
}

/// Directory levels a walk goes down (a hostile tree may be deeper than
/// the stack allows).
const MAX_DEPTH: usize = 64;

/// One [`HotSet::learn`] under way.
struct Walk {
    limits: Limits,
    started: Instant,
    page: u64,
    out: Learned,
    /// Inodes taken (one filesystem).
    seen: BTreeSet<u64>,
}

/// The page size.
fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096)
}

/// Opens regular file `name` in `dir` for reading: not through a symlink,
/// never blocking on a FIFO, without touching its access time.
fn open_file(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> nix::Result<File> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    // `O_NOATIME` needs the file's owner or CAP_FOWNER (the plugin has it).
    let fd = match openat(dir, name, flags | OFlag::O_NOATIME, Mode::empty()) {
        Err(nix::errno::Errno::EPERM) => openat(dir, name, flags, Mode::empty())?,
        r => r?,
    };
    let f = File::from(fd);
    let st = at::stat_fd(&f)?;
    if at::file_type(st.st_mode) == SFlag::S_IFREG {
        Ok(f)
    } else {
        Err(nix::errno::Errno::EINVAL)
    }
}

/// Opens the regular file at relative `path` below `top`, each directory
/// on the way opened without following a symlink.
fn open_below(top: BorrowedFd<'_>, path: &Path) -> Option<File> {
    let names: Vec<OsString> = path
        .components()
        .map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (file, dirs) = names.split_last()?;
    let mut held: Option<OwnedFd> = None;
    for d in dirs {
        let next = at::open_dir(held.as_ref().map_or(top, |h| h.as_fd()), d).ok()?;
        held = Some(next);
    }
    open_file(held.as_ref().map_or(top, |h| h.as_fd()), file).ok()
}

/// How much of one file [`resident`] looks at: a large (or sparse) file's
/// first GiB (a map of 256 Ki pages).
const LOOKED_AT: u64 = 1 << 30;

/// The runs of `f`'s pages in the page cache, as byte ranges (the last
/// one cut at the file's end), within its first [`LOOKED_AT`] bytes.
fn resident(f: &File, page: u64) -> Vec<(u64, u64)> {
    let Ok(meta) = f.metadata() else {
        return Vec::new();
    };
    let size = meta.len().min(LOOKED_AT);
    let Some(map) = Mapping::new(f, size) else {
        return Vec::new();
    };
    let Some(pages) = map.resident(page) else {
        return Vec::new();
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        if p & 1 == 0 {
            continue;
        }
        let start = i as u64 * page;
        let len = page.min(size - start);
        match runs.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => runs.push((start, len)),
        }
    }
    runs
}

/// A read-only shared mapping of a whole file, only ever asked which of
/// its pages are resident (never read through, so a file shrinking under
/// it cannot fault).
struct Mapping {
    addr: *mut nix::libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(f: &File, size: u64) -> Option<Mapping> {
        let len = usize::try_from(size).ok().filter(|l| *l > 0)?;
        // SAFETY: a new mapping at an address the kernel picks, of a file
        // descriptor that is open for reading; nothing else refers to it,
        // and `Drop` unmaps it.
        #[allow(unsafe_code)]
        let addr = unsafe {
            nix::libc::mmap(
                std::ptr::null_mut(),
                len,
                nix::libc::PROT_READ,
                nix::libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        (addr != nix::libc::MAP_FAILED).then_some(Mapping { addr, len })
    }

    /// One byte per page of the mapping, bit 0 set when resident.
    fn resident(&self, page: u64) -> Option<Vec<u8>> {
        let pages = (self.len as u64).div_ceil(page);
        let mut vec = vec![0u8; usize::try_from(pages).ok()?];
        // SAFETY: `addr`/`len` are this live mapping; `vec` has one byte
        // for each of its pages, as mincore(2) writes.
        #[allow(unsafe_code)]
        let r = unsafe { nix::libc::mincore(self.addr, self.len, vec.as_mut_ptr()) };
        (r == 0).then_some(vec)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::munmap(self.addr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::tests::Scratch;
    use std::os::unix::fs::symlink;

    /// `bin/prog` (three pages and a bit), `etc` (6 bytes), `empty`.
    fn tree(name: &str) -> Scratch {
        let t = Scratch::new(&format!("hot-{name}"));
        std::fs::create_dir_all(t.0.join("bin")).unwrap();
        std::fs::write(t.0.join("bin/prog"), vec![7u8; 3 * 4096 + 100]).unwrap();
        std::fs::write(t.0.join("etc"), b"config").unwrap();
        std::fs::write(t.0.join("empty"), b"").unwrap();
        t
    }

    #[test]
    fn learns_what_was_written_and_warms_it_elsewhere() {
        // Just written, so in the page cache (tmpfs or a disk alike).
        let t = tree("learned");
        let root = at::open_root(&t.0).unwrap();
        let mut set = HotSet::default();
        let got = set.learn(root.as_fd(), Limits::default()).unwrap();
        assert_eq!(got.files, 2, "{got:?}");
        assert_eq!(got.bytes, 3 * 4096 + 100 + 6);
        assert_eq!(set.bytes(), got.bytes);
        assert!(!got.cut);
        // Learned twice: merged, not counted twice.
        set.learn(root.as_fd(), Limits::default()).unwrap();
        assert_eq!(set.bytes(), 3 * 4096 + 106);
        // Read from a copy of the tree (another snapshot, in the store).
        let copy = tree("copy");
        let w = set.warm(&copy.0).unwrap();
        assert_eq!(
            w,
            Warmed {
                files: 2,
                bytes: 3 * 4096 + 106
            }
        );
    }

    #[test]
    fn warming_never_follows_a_symlink_out_of_the_tree() {
        let t = tree("source");
        let root = at::open_root(&t.0).unwrap();
        let mut set = HotSet::default();
        set.learn(root.as_fd(), Limits::default()).unwrap();
        // Elsewhere, `bin` is a symlink to a tree with the same file.
        let outside = tree("outside");
        let hostile = Scratch::new("hot-hostile");
        symlink(outside.0.join("bin"), hostile.0.join("bin")).unwrap();
        symlink(outside.0.join("etc"), hostile.0.join("etc")).unwrap();
        let w = set.warm(&hostile.0).unwrap();
        assert_eq!(w, Warmed::default());
    }

    #[test]
    fn a_file_is_taken_once_and_what_changed_late_not_at_all() {
        let t = tree("links");
        std::fs::hard_link(t.0.join("bin/prog"), t.0.join("bin/alias")).unwrap();
        let root = at::open_root(&t.0).unwrap();
        let mut set = HotSet::default();
        set.learn(root.as_fd(), Limits::default()).unwrap();
        assert_eq!(set.files(), 2, "{set:?}");
        assert_eq!(set.bytes(), 3 * 4096 + 106);
        // Everything here changed in the last hour: nothing is taken.
        let hour_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 3600;
        let limits = Limits {
            changed_after: Some(hour_ago),
            ..Limits::default()
        };
        let mut set = HotSet::default();
        let got = set.learn(root.as_fd(), limits).unwrap();
        assert!(set.is_empty() && got.files == 0, "{got:?}");
    }

    #[test]
    fn a_limit_cuts_the_walk_and_keeps_what_it_found() {
        let t = tree("cut");
        let root = at::open_root(&t.0).unwrap();
        let mut set = HotSet::default();
        let limits = Limits {
            entries: 1,
            ..Limits::default()
        };
        let got = set.learn(root.as_fd(), limits).unwrap();
        assert!(got.cut);
        assert_eq!(got.entries, 1);
    }

    #[test]
    fn merging_runs_joins_overlaps_and_keeps_gaps() {
        let mut set = HotSet::default();
        set.add("f".into(), vec![(0, 4096), (8192, 4096)]);
        set.add("f".into(), vec![(4096, 4096), (16384, 100)]);
        assert_eq!(set.files[Path::new("f")], vec![(0, 12288), (16384, 100)]);
        assert_eq!(set.bytes(), 12288 + 100);
    }
}
