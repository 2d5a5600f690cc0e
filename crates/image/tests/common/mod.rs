//! Fixtures for the image tests: temp directories, trees made in code, and
//! layer tars made with the tar crate's Builder (plus raw headers for the
//! hostile cases the Builder refuses to write).

#![allow(dead_code)]

use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    fcntl::AT_FDCWD,
    sys::{
        stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat},
        time::TimeSpec,
    },
};
use tar::{EntryType, Header};

/// A directory under the system temp dir, removed on drop unless
/// `NO_TEST_CLEAN_UP` is set.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "thinlayer-image-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A new subdirectory, mode 0755.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("NO_TEST_CLEAN_UP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A fixed time, so trees built twice are identical.
pub const T0: i64 = 1_600_000_000;

pub fn set_mtime(path: &Path, secs: i64, nsecs: i64) {
    let t = TimeSpec::new(secs, nsecs);
    utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

pub fn write(root: &Path, rel: &str, content: &[u8], mode: u32) -> PathBuf {
    let p = root.join(rel);
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(&p, T0, 0);
    p
}

pub fn mkdir(root: &Path, rel: &str, mode: u32) -> PathBuf {
    let p = root.join(rel);
    fs::create_dir(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

pub fn link(root: &Path, rel: &str, target: &str) -> PathBuf {
    let p = root.join(rel);
    symlink(target, &p).unwrap();
    set_mtime(&p, T0, 0);
    p
}

pub fn node(root: &Path, rel: &str, kind: SFlag, major: u64, minor: u64, mode: u32) -> PathBuf {
    let p = root.join(rel);
    mknod(
        &p,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(&p, T0, 0);
    p
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// A valid v2 `security.capability` value: cap_net_bind_service, effective.
pub const CAP_NET_BIND_SERVICE: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    0x00, 0x04, 0x00, 0x00, // permitted[0]: bit 10
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

/// A layer tar made in code.
pub struct Tar(tar::Builder<Vec<u8>>);

impl Default for Tar {
    fn default() -> Self {
        Tar::new()
    }
}

impl Tar {
    pub fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(T0 as u64);
        h.set_size(0);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Tar {
        let mut h = Self::header(EntryType::Directory, mode);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(self, path: &str, content: &[u8], mode: u32) -> Tar {
        self.file_with(path, content, |h| h.set_mode(mode))
    }

    pub fn file_with(mut self, path: &str, content: &[u8], f: impl FnOnce(&mut Header)) -> Tar {
        let mut h = Self::header(EntryType::Regular, 0o644);
        h.set_size(content.len() as u64);
        f(&mut h);
        self.0.append_data(&mut h, path, content).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Tar {
        let mut h = Self::header(EntryType::Symlink, 0o777);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Tar {
        let mut h = Self::header(EntryType::Link, 0o644);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(mut self, path: &str, kind: EntryType, major: u32, minor: u32, mode: u32) -> Tar {
        let mut h = Self::header(kind, mode);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Tar {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    /// An entry with the name (and link name) bytes as given, which the
    /// Builder would refuse (`..`, absolute paths).
    pub fn raw(mut self, name: &[u8], kind: EntryType, link: &[u8], content: &[u8]) -> Tar {
        let mut h = Self::header(kind, 0o644);
        h.set_size(content.len() as u64);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.0.append(&h, content).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Asserts two trees are identical, printing the first differences.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let ma = thinlayer_image::manifest(a).unwrap();
    let mb = thinlayer_image::manifest(b).unwrap();
    let diffs = thinlayer_image::differences(&ma, &mb, 20);
    assert!(
        diffs.is_empty(),
        "trees {} and {} differ:\n{}",
        a.display(),
        b.display(),
        diffs.join("\n")
    );
}
