//! apply_layer on plain temp directories (as root: chown, mknod, xattrs).

mod common;

use std::{
    cell::Cell,
    fs,
    io::Write,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::Path,
};

use common::*;
use sha2::{Digest, Sha256};
use tar::EntryType;
use thinlayer_image::{ApplyOptions, Error, apply_layer, tar_content_size};

fn apply(root: &Path, tar: &[u8]) -> thinlayer_image::Result<thinlayer_image::ApplyReport> {
    apply_layer(root, tar, &ApplyOptions::default())
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[test]
fn every_entry_type_with_its_metadata() {
    let t = TempDir::new("types");
    let root = t.sub("root");
    let tar = Tar::new()
        .dir("bin/", 0o755)
        .file_with("bin/su", b"#!suid", |h| {
            h.set_mode(0o4755);
            h.set_uid(0);
            h.set_gid(0);
        })
        .file_with("bin/wall", b"sgid", |h| {
            h.set_mode(0o2755);
            h.set_uid(1000);
            h.set_gid(5);
        })
        .dir("tmp/", 0o1777)
        .dir("dev/", 0o755)
        .device("dev/null", EntryType::Char, 1, 3, 0o666)
        .device("dev/loop0", EntryType::Block, 7, 0, 0o660)
        .device("dev/fifo", EntryType::Fifo, 0, 0, 0o600)
        .symlink("bin/sh", "/bin/dash")
        .hardlink("bin/su2", "bin/su")
        .pax(&[("mtime", b"1600000123.25")])
        .file("nsec", b"x", 0o644)
        .finish();
    let report = apply(&root, &tar).unwrap();
    assert_eq!(report.diff_id, sha(&tar));
    assert_eq!(report.entries, 11);
    assert_eq!(report.bytes, 11);
    assert_eq!(report.whiteouts, 0);

    let su = fs::symlink_metadata(root.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(fs::read(root.join("bin/su")).unwrap(), b"#!suid");
    let wall = fs::symlink_metadata(root.join("bin/wall")).unwrap();
    assert_eq!(
        (wall.mode() & 0o7777, wall.uid(), wall.gid()),
        (0o2755, 1000, 5)
    );
    assert_eq!(wall.mtime(), T0);
    let tmp = fs::symlink_metadata(root.join("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let loop0 = fs::symlink_metadata(root.join("dev/loop0")).unwrap();
    assert!(loop0.file_type().is_block_device());
    assert_eq!(loop0.rdev(), nix::sys::stat::makedev(7, 0));
    assert!(
        fs::symlink_metadata(root.join("dev/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/bin/dash")
    );
    assert_eq!(
        fs::symlink_metadata(root.join("bin/sh")).unwrap().mtime(),
        T0
    );
    let su2 = fs::symlink_metadata(root.join("bin/su2")).unwrap();
    assert_eq!(su2.ino(), su.ino(), "hard link shares the inode");
    let nsec = fs::symlink_metadata(root.join("nsec")).unwrap();
    assert_eq!(
        (nsec.mtime(), nsec.mtime_nsec()),
        (1_600_000_123, 250_000_000)
    );
    // Directory mtimes are set after their children went in.
    for dir in ["bin", "dev", "tmp"] {
        assert_eq!(
            fs::symlink_metadata(root.join(dir)).unwrap().mtime(),
            T0,
            "{dir}"
        );
    }
}

#[test]
fn xattrs_user_and_capability_survive_chown() {
    let t = TempDir::new("xattr");
    let root = t.sub("root");
    let tar = Tar::new()
        .pax(&[("SCHILY.xattr.user.note", b"dir")])
        .dir("etc/", 0o755)
        .pax(&[
            (
                "SCHILY.xattr.security.capability",
                &CAP_NET_BIND_SERVICE[..],
            ),
            ("SCHILY.xattr.user.k", b"v"),
        ])
        .file_with("ping", b"elf", |h| {
            h.set_mode(0o755);
            h.set_uid(1000);
            h.set_gid(1000);
        })
        .finish();
    apply(&root, &tar).unwrap();
    let ping = root.join("ping");
    assert_eq!(
        xattr::get(&ping, "security.capability").unwrap().unwrap(),
        CAP_NET_BIND_SERVICE
    );
    assert_eq!(xattr::get(&ping, "user.k").unwrap().unwrap(), b"v");
    assert_eq!(fs::metadata(&ping).unwrap().uid(), 1000);
    assert_eq!(
        xattr::get(root.join("etc"), "user.note").unwrap().unwrap(),
        b"dir"
    );
}

fn lower_for_whiteouts(root: &Path) {
    write(root, "gone", b"old", 0o644);
    mkdir(root, "tree", 0o755);
    write(root, "tree/a", b"a", 0o644);
    mkdir(root, "tree/sub", 0o755);
    write(root, "tree/sub/b", b"b", 0o644);
    mkdir(root, "opq", 0o755);
    write(root, "opq/lower1", b"1", 0o644);
    mkdir(root, "opq/lowerdir", 0o755);
    write(root, "opq/lowerdir/x", b"x", 0o644);
    mkdir(root, "opq/keepdir", 0o755);
    write(root, "opq/keepdir/lowerchild", b"c", 0o644);
    write(root, "kept", b"kept", 0o644);
}

#[test]
fn whiteouts_delete_files_and_trees() {
    let t = TempDir::new("wh");
    let root = t.sub("root");
    lower_for_whiteouts(&root);
    let tar = Tar::new()
        .file(".wh.gone", b"", 0o644)
        .file(".wh.tree", b"", 0o644)
        .file(".wh.never-existed", b"", 0o644)
        .file(".wh..wh.plnk", b"", 0o644)
        .finish();
    let report = apply(&root, &tar).unwrap();
    assert_eq!(report.whiteouts, 3);
    assert!(!root.join("gone").exists());
    assert!(!root.join("tree").exists());
    assert!(
        !root.join(".wh.gone").exists(),
        "the marker itself is not written"
    );
    assert!(!root.join(".wh..wh.plnk").exists());
    assert!(root.join("kept").exists());
}

/// The opaque marker hides lower entries, whether this tar's own entries
/// come before or after it.
#[test]
fn opaque_directory_keeps_this_layers_entries_in_any_order() {
    for marker_first in [true, false] {
        let t = TempDir::new("opq");
        let root = t.sub("root");
        lower_for_whiteouts(&root);
        let mut tar = Tar::new().dir("opq/", 0o750);
        if marker_first {
            tar = tar.file("opq/.wh..wh..opq", b"", 0o644);
        }
        tar = tar
            .file("opq/before", b"new", 0o644)
            .dir("opq/keepdir/", 0o755)
            .file("opq/keepdir/new", b"n", 0o644);
        if !marker_first {
            tar = tar.file("opq/.wh..wh..opq", b"", 0o644);
        }
        let tar = tar.file("opq/after", b"after", 0o644).finish();
        apply(&root, &tar).unwrap();
        let mut names: Vec<_> = fs::read_dir(root.join("opq"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["after", "before", "keepdir"],
            "marker first: {marker_first}"
        );
        let mut kept: Vec<_> = fs::read_dir(root.join("opq/keepdir"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            ["new"],
            "lower children of a re-added dir are hidden too"
        );
        assert_eq!(fs::read(root.join("opq/before")).unwrap(), b"new");
        assert_eq!(
            fs::symlink_metadata(root.join("opq")).unwrap().mode() & 0o7777,
            0o750
        );
        assert!(
            root.join("kept").exists(),
            "outside the opaque dir nothing changes"
        );
    }
}

#[test]
fn replacing_entries() {
    let t = TempDir::new("replace");
    let root = t.sub("root");
    mkdir(&root, "was-dir", 0o755);
    write(&root, "was-dir/child", b"c", 0o644);
    write(&root, "was-file", b"f", 0o644);
    mkdir(&root, "dir", 0o700);
    write(&root, "dir/lower", b"l", 0o644);
    write(&root, "shared", b"lower content", 0o644);
    fs::hard_link(root.join("shared"), root.join("shared-link")).unwrap();
    link(&root, "was-link", "/etc");
    let tar = Tar::new()
        .file("was-dir", b"now a file", 0o644)
        .dir("was-file/", 0o755)
        .file("was-file/inner", b"i", 0o644)
        .dir("dir/", 0o755)
        .file("shared", b"new", 0o644)
        .file("was-link", b"plain", 0o644)
        .finish();
    apply(&root, &tar).unwrap();
    assert_eq!(fs::read(root.join("was-dir")).unwrap(), b"now a file");
    assert_eq!(fs::read(root.join("was-file/inner")).unwrap(), b"i");
    let dir = fs::symlink_metadata(root.join("dir")).unwrap();
    assert_eq!(
        dir.mode() & 0o7777,
        0o755,
        "a dir over a dir updates metadata"
    );
    assert!(
        root.join("dir/lower").exists(),
        "and keeps the dir's children"
    );
    assert_eq!(fs::read(root.join("shared")).unwrap(), b"new");
    assert_eq!(
        fs::read(root.join("shared-link")).unwrap(),
        b"lower content",
        "a lower hard link never sees the new content"
    );
    assert!(
        fs::symlink_metadata(root.join("was-link"))
            .unwrap()
            .is_file()
    );
}

#[test]
fn missing_parents_are_made_and_hard_links_reach_lower_files() {
    let t = TempDir::new("parents");
    let root = t.sub("root");
    write(&root, "lowerfile", b"l", 0o644);
    let tar = Tar::new()
        .file("a/b/c", b"deep", 0o644)
        .hardlink("a/l", "lowerfile")
        .finish();
    apply(&root, &tar).unwrap();
    assert_eq!(fs::read(root.join("a/b/c")).unwrap(), b"deep");
    assert_eq!(
        fs::metadata(root.join("a/b")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::metadata(root.join("a/l")).unwrap().ino(),
        fs::metadata(root.join("lowerfile")).unwrap().ino()
    );
}

#[test]
fn leading_dot_slash_and_root_entry() {
    let t = TempDir::new("dot");
    let root = t.sub("root");
    let tar = Tar::new()
        .raw(b"./", EntryType::Directory, b"", b"")
        .raw(b"./x", EntryType::Regular, b"", b"x")
        .finish();
    apply(&root, &tar).unwrap();
    assert_eq!(fs::read(root.join("x")).unwrap(), b"x");
    assert_eq!(fs::metadata(&root).unwrap().mode() & 0o7777, 0o644 & 0o7777);
}

#[test]
fn gzip_and_zstd_give_the_uncompressed_diff_id() {
    let tar = Tar::new()
        .dir("d/", 0o755)
        .file("d/f", b"hello", 0o644)
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (name, blob) in [("plain", &tar), ("gzip", &gz), ("zstd", &zst)] {
        let t = TempDir::new("compress");
        let root = t.sub("root");
        let report = apply(&root, blob).unwrap();
        assert_eq!(report.diff_id, sha(&tar), "{name}");
        assert_eq!(fs::read(root.join("d/f")).unwrap(), b"hello", "{name}");
        assert_eq!(tar_content_size(&blob[..]).unwrap(), 5, "{name}");
    }
}

#[test]
fn diff_id_is_checked_after_the_whole_stream() {
    let t = TempDir::new("diffid");
    let root = t.sub("root");
    let tar = Tar::new().file("f", b"x", 0o644).finish();
    let seen = Cell::new(0u64);
    let progress = |n: u64| seen.set(n);
    let good = ApplyOptions {
        expected_diff_id: Some(sha(&tar)),
        progress: Some(&progress),
        ..Default::default()
    };
    apply_layer(&root, &tar[..], &good).unwrap();
    assert_eq!(
        seen.get(),
        tar.len() as u64,
        "the last progress call is the whole stream"
    );
    let bad = ApplyOptions {
        expected_diff_id: Some(format!("sha256:{}", "0".repeat(64))),
        progress: None,
        ..Default::default()
    };
    let err = apply_layer(&t.sub("root2"), &tar[..], &bad).unwrap_err();
    assert!(
        matches!(err, Error::DiffIdMismatch { ref actual, .. } if *actual == sha(&tar)),
        "{err}"
    );
    assert!(err.to_string().contains("download it again"));
}

#[test]
fn damaged_streams_are_refused() {
    let tar = Tar::new()
        .file("a", &[7u8; 3000], 0o644)
        .file("b", b"b", 0o644)
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let mut bad_gz = gz.clone();
    let mid = bad_gz.len() / 2;
    bad_gz[mid] ^= 0xff;
    let mut bad_crc = gz.clone();
    let n = bad_crc.len();
    bad_crc[n - 6] ^= 0xff;
    let mut bad_zst = zstd::encode_all(&tar[..], 3).unwrap();
    bad_zst.truncate(bad_zst.len() / 2);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("cut in a file's content", tar[..1024].to_vec()),
        ("cut in a header", tar[..512 + 3072 + 100].to_vec()),
        (
            "cut at a block boundary, no end marker",
            tar[..512 + 3072].to_vec(),
        ),
        ("bad header checksum", {
            let mut t = tar.clone();
            t[10] ^= 1;
            t
        }),
        ("corrupt gzip", bad_gz),
        ("gzip crc", bad_crc),
        ("truncated zstd", bad_zst),
        ("gzip cut", gz[..gz.len() - 20].to_vec()),
    ];
    for (name, blob) in cases {
        let t = TempDir::new("corrupt");
        let root = t.sub("root");
        let err = apply(&root, &blob).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{name}: {err}");
        assert!(err.to_string().contains("damaged"), "{name}: {err}");
    }
    let t = TempDir::new("xz");
    let err = apply(&t.sub("root"), &[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2]).unwrap_err();
    assert!(matches!(err, Error::UnsupportedCompression("xz")), "{err}");
}

/// Base layout for the hostile cases: `base/root` is the tree, `base/sentinel`
/// a file beside it, `base/escape` an empty directory; `root/evil` is a
/// symlink to `base`, `root/evil-abs` one to `base/escape` (absolute).
struct Hostile {
    _t: TempDir,
    base: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl Hostile {
    fn new() -> Hostile {
        let t = TempDir::new("hostile");
        let base = t.path().to_path_buf();
        let root = t.sub("root");
        t.sub("escape");
        fs::write(base.join("sentinel"), b"keep").unwrap();
        std::os::unix::fs::symlink("..", root.join("evil")).unwrap();
        std::os::unix::fs::symlink(base.join("escape"), root.join("evil-abs")).unwrap();
        Hostile { _t: t, base, root }
    }

    fn assert_untouched(&self, name: &str) {
        assert_eq!(
            fs::read(self.base.join("sentinel")).unwrap(),
            b"keep",
            "{name}: sentinel changed"
        );
        assert_eq!(
            fs::read_dir(self.base.join("escape")).unwrap().count(),
            0,
            "{name}: something was written outside the root"
        );
        let mut names: Vec<_> = fs::read_dir(&self.base)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["escape", "root", "sentinel"], "{name}");
        assert_eq!(
            fs::metadata(self.base.join("sentinel")).unwrap().nlink(),
            1,
            "{name}: sentinel was hard-linked"
        );
    }
}

#[test]
fn hostile_entries_are_refused_and_nothing_escapes() {
    use EntryType::{Link, Regular};
    let long = "x".repeat(300);
    // Entries the builder would refuse, so written as raw headers:
    // (case, path, type, link target, data). The error names the path.
    let raw = [
        ("absolute path", "/abs", Regular, "", "x"),
        ("dot-dot", "../sentinel", Regular, "", "x"),
        ("inner dot-dot", "a/../../escape/f", Regular, "", "x"),
        (
            "hard link out with dot-dot",
            "stolen",
            Link,
            "../sentinel",
            "",
        ),
        ("hard link absolute", "stolen", Link, "/etc/passwd", ""),
        ("whiteout with dot-dot", "../.wh.sentinel", Regular, "", ""),
        ("volume label type", "label", EntryType::new(b'V'), "", ""),
        ("unknown entry type", "odd", EntryType::new(b'Q'), "", ""),
        ("root as a file", "./", Regular, "", ""),
    ];
    // Plain files whose path leads through a symlink: (case, path, data).
    let through = [
        ("through a lower symlink", "evil/escape/f", "x"),
        ("through an absolute symlink", "evil-abs/f", "x"),
        ("whiteout through a symlink", "evil/.wh.sentinel", ""),
        ("opaque through a symlink", "evil/.wh..wh..opq", ""),
    ];
    let mut cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "dir through a symlink",
            "evil-abs/d",
            Tar::new().dir("evil-abs/d/", 0o755).finish(),
        ),
        (
            "device through a symlink",
            "evil-abs/null",
            Tar::new()
                .device("evil-abs/null", EntryType::Char, 1, 3, 0o666)
                .finish(),
        ),
        (
            "symlink through a symlink",
            "evil-abs/l",
            Tar::new().symlink("evil-abs/l", "/etc").finish(),
        ),
        (
            "through a symlink this tar made",
            "mine/f",
            Tar::new()
                .symlink("mine", "../escape")
                .file("mine/f", b"x", 0o644)
                .finish(),
        ),
        (
            "hard link through a symlink",
            "stolen",
            Tar::new().hardlink("stolen", "evil/sentinel").finish(),
        ),
        (
            "hard link to a missing file",
            "stolen",
            Tar::new().hardlink("stolen", "nothing").finish(),
        ),
        (
            "whiteout named dot-dot",
            ".wh..",
            Tar::new()
                .raw(b"escape/.wh...", EntryType::Regular, b"", b"")
                .finish(),
        ),
        (
            "NUL in a PAX path",
            "a",
            Tar::new()
                .pax(&[("path", b"a\0/../../sentinel")])
                .file("placeholder", b"x", 0o644)
                .finish(),
        ),
        (
            "name too long",
            "xxxx",
            Tar::new().file(&long, b"x", 0o644).finish(),
        ),
        ("device without numbers", "dev0", {
            let mut h = tar::Header::new_old();
            h.set_path("dev0").unwrap();
            h.set_entry_type(EntryType::Char);
            h.set_size(0);
            h.set_cksum();
            let mut b = tar::Builder::new(Vec::new());
            b.append(&h, std::io::empty()).unwrap();
            b.into_inner().unwrap()
        }),
    ];
    cases.extend(raw.map(|(name, path, kind, link, data)| {
        let tar = Tar::new().raw(path.as_bytes(), kind, link.as_bytes(), data.as_bytes());
        (name, path, tar.finish())
    }));
    cases.extend(through.map(|(name, path, data)| {
        let tar = Tar::new().file(path, data.as_bytes(), 0o644);
        (name, path, tar.finish())
    }));
    for (name, entry, tar) in cases {
        let h = Hostile::new();
        let err = apply(&h.root, &tar).unwrap_err();
        assert!(matches!(err, Error::Hostile { .. }), "{name}: {err}");
        assert!(
            err.to_string().contains(entry),
            "{name}: error does not name the entry: {err}"
        );
        h.assert_untouched(name);
        assert!(h.root.join("evil").is_symlink(), "{name}");
    }
}

#[test]
fn out_of_space_is_its_own_error() {
    let t = TempDir::new("enospc");
    let root = t.sub("small");
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .expect("mounting a 64 KiB tmpfs (tests run as root)");
    let big = vec![1u8; 256 * 1024];
    let tar = Tar::new()
        .file("small", b"s", 0o644)
        .file("big", &big, 0o644)
        .finish();
    let result = apply(&root, &tar);
    nix::mount::umount(&root).unwrap();
    let err = result.unwrap_err();
    match &err {
        Error::NoSpace {
            entry,
            needed_bytes_hint,
            ..
        } => {
            assert_eq!(entry, "big");
            assert_eq!(*needed_bytes_hint, 1 + 256 * 1024);
        }
        other => panic!("expected NoSpace, got {other}"),
    }
    assert!(err.to_string().contains("bigger"), "{err}");
    assert_eq!(tar_content_size(&tar[..]).unwrap(), 1 + 256 * 1024);
}

#[test]
fn permissions_of_created_parents() {
    let t = TempDir::new("perm");
    let root = t.sub("root");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    apply(&root, &Tar::new().file("x/y", b"", 0o600).finish()).unwrap();
    assert_eq!(
        fs::metadata(root.join("x/y")).unwrap().mode() & 0o7777,
        0o600
    );
}

#[test]
fn empty_layer_and_empty_stream() {
    let t = TempDir::new("empty");
    let root = t.sub("root");
    let empty = Tar::new().finish();
    assert_eq!(empty.len(), 1024);
    let report = apply(&root, &empty).unwrap();
    assert_eq!((report.entries, report.bytes), (0, 0));
    assert_eq!(report.diff_id, sha(&empty));
    assert!(matches!(
        apply(&root, b"").unwrap_err(),
        Error::Corrupt { .. }
    ));
}

#[test]
fn zero_runs_become_holes() {
    let t = TempDir::new("holes");
    let root = t.sub("root");
    let mut content = vec![0u8; 4 * 1024 * 1024];
    content[5000] = 1;
    content[3 * 1024 * 1024 + 17] = 2;
    let tail_zeros = vec![0u8; 1024 * 1024];
    let tar = Tar::new()
        .file("sparse", &content, 0o644)
        .file("zeros", &tail_zeros, 0o644)
        .finish();
    let report = apply(&root, &tar).unwrap();
    assert_eq!(report.bytes, (content.len() + tail_zeros.len()) as u64);
    assert_eq!(fs::read(root.join("sparse")).unwrap(), content);
    assert_eq!(fs::read(root.join("zeros")).unwrap(), tail_zeros);
    let blocks = |p: &str| fs::metadata(root.join(p)).unwrap().blocks() * 512;
    assert!(
        blocks("sparse") <= 64 * 1024,
        "{} bytes allocated",
        blocks("sparse")
    );
    assert_eq!(fs::metadata(root.join("zeros")).unwrap().len(), 1024 * 1024);
    assert!(
        blocks("zeros") <= 4096,
        "{} bytes allocated",
        blocks("zeros")
    );
}
