//! changes, write_layer and manifest on plain temp directories (as root).

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use common::*;
use nix::sys::stat::SFlag;
use thinlayer_image::{
    ApplyOptions, Change, ChangeKind, Hashing, apply_layer, changes, differences, manifest,
    write_layer, write_layer_with,
};

/// The parent layer's tree.
fn build_lower(root: &Path) {
    mkdir(root, "etc", 0o755);
    write(root, "etc/passwd", b"root:x:0:0", 0o644);
    xattr::set(root.join("etc/passwd"), "user.a", b"1").unwrap();
    write(root, "etc/hosts", b"127.0.0.1 localhost", 0o644);
    write(root, "etc/gone", b"bye", 0o644);
    write(root, "etc/touched", b"t", 0o644);
    write(root, "etc/owned", b"o", 0o644);
    mkdir(root, "usr", 0o755);
    mkdir(root, "usr/bin", 0o755);
    write(root, "usr/bin/tool", b"tool", 0o755);
    write(root, "usr/bin/su", b"su", 0o4755);
    mkdir(root, "var", 0o755);
    mkdir(root, "var/cache", 0o755);
    mkdir(root, "var/cache/apt", 0o755);
    write(root, "var/cache/apt/pkgcache", b"cache", 0o644);
    mkdir(root, "opt", 0o755);
    mkdir(root, "opt/app", 0o755);
    write(root, "opt/app/old1", b"1", 0o644);
    write(root, "opt/app/old2", b"2", 0o644);
    mkdir(root, "opt/app/sub", 0o755);
    write(root, "opt/app/sub/x", b"x", 0o644);
    write(root, "tf", b"file that becomes a dir", 0o644);
    mkdir(root, "td", 0o755);
    write(root, "td/child", b"c", 0o644);
    link(root, "sym", "target1");
    mkdir(root, "dev", 0o755);
    node(root, "dev/null", SFlag::S_IFCHR, 1, 3, 0o666);
    write(root, "hl-base", b"base", 0o644);
    mkdir(root, "lost+found", 0o700);
    write(root, "lost+found/#123", b"fsck", 0o600);
}

/// The child's tree: the parent's, then every kind of change.
fn build_upper(root: &Path) {
    build_lower(root);
    // Same size, same mtime, other content.
    write(root, "etc/hosts", b"127.0.0.1 otherhost", 0o644);
    xattr::set(root.join("etc/passwd"), "user.a", b"2").unwrap();
    let new = write(root, "etc/new", b"new file", 0o640);
    xattr::set(&new, "user.new", b"yes").unwrap();
    set_mtime(&new, T0 + 7, 123_456_789);
    fs::remove_file(root.join("etc/gone")).unwrap();
    set_mtime(&root.join("etc/touched"), T0 + 5, 0);
    chown(&root.join("etc/owned"), 1000, 1000);
    fs::set_permissions(root.join("usr/bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_dir_all(root.join("var/cache")).unwrap();
    // Opaque-like: the directory replaced by a new one of the same name.
    fs::remove_dir_all(root.join("opt/app")).unwrap();
    mkdir(root, "opt/app", 0o755);
    write(root, "opt/app/fresh", b"fresh", 0o644);
    mkdir(root, "opt/app/sub2", 0o755);
    write(root, "opt/app/sub2/y", b"y", 0o644);
    fs::remove_file(root.join("tf")).unwrap();
    mkdir(root, "tf", 0o755);
    write(root, "tf/child", b"c", 0o644);
    fs::remove_dir_all(root.join("td")).unwrap();
    write(root, "td", b"now a file", 0o644);
    fs::remove_file(root.join("sym")).unwrap();
    link(root, "sym", "target2");
    fs::remove_file(root.join("dev/null")).unwrap();
    node(root, "dev/null", SFlag::S_IFCHR, 1, 5, 0o666);
    node(root, "dev/fifo", SFlag::S_IFIFO, 0, 0, 0o620);
    node(root, "dev/loop0", SFlag::S_IFBLK, 7, 0, 0o660);
    fs::hard_link(root.join("hl-base"), root.join("hl-new")).unwrap();
    write(root, "pair1", b"pair", 0o644);
    fs::hard_link(root.join("pair1"), root.join("pair2")).unwrap();
    let cap = write(root, "usr/bin/ping", b"ping", 0o755);
    chown(&cap, 1000, 1000);
    xattr::set(&cap, "security.capability", &CAP_NET_BIND_SERVICE).unwrap();
    write(root, "lost+found/#456", b"fsck", 0o600);
}

fn change(path: &str, kind: ChangeKind) -> Change {
    Change {
        path: PathBuf::from(path),
        kind,
    }
}

#[test]
fn changes_find_every_kind_of_difference() {
    let t = TempDir::new("diff");
    let (lower, upper) = (t.sub("lower"), t.sub("upper"));
    build_lower(&lower);
    build_upper(&upper);
    use ChangeKind::*;
    let mut expected = vec![
        change("dev/fifo", Added),
        change("dev/loop0", Added),
        change("dev/null", Modified),
        change("etc/gone", Deleted),
        change("etc/hosts", Modified),
        change("etc/new", Added),
        change("etc/owned", Modified),
        change("etc/passwd", Modified),
        change("etc/touched", Modified),
        change("hl-base", Modified),
        change("hl-new", Added),
        change("opt/app/fresh", Added),
        change("opt/app/old1", Deleted),
        change("opt/app/old2", Deleted),
        change("opt/app/sub", Deleted),
        change("opt/app/sub2", Added),
        change("opt/app/sub2/y", Added),
        change("pair1", Added),
        change("pair2", Added),
        change("sym", Modified),
        change("td", Modified),
        change("tf", Modified),
        change("tf/child", Added),
        change("usr/bin/ping", Added),
        change("usr/bin/tool", Modified),
        change("var/cache", Deleted),
    ];
    expected.sort();
    let got = changes(&lower, &upper).unwrap();
    let show = |v: &[Change]| {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(show(&got), show(&expected));
    assert_eq!(
        changes(&lower, &lower).unwrap(),
        vec![],
        "a tree has no changes against itself"
    );
}

#[test]
fn export_then_apply_gives_the_upper_tree() {
    let t = TempDir::new("roundtrip");
    let (lower, upper, copy) = (t.sub("lower"), t.sub("upper"), t.sub("copy"));
    build_lower(&lower);
    build_upper(&upper);
    build_lower(&copy);
    let mut tar = Vec::new();
    let exported = write_layer(&lower, &upper, &mut tar).unwrap();
    let applied = apply_layer(&copy, &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(applied.diff_id, exported.diff_id);
    assert_eq!(applied.entries, exported.entries);
    assert_eq!(applied.bytes, exported.bytes);
    assert_same_tree(&copy, &upper);
    // Unhashed (Docker's Diff and ApplyDiff): the same bytes, an empty
    // diff_id on both sides, the same tree; a diff_id asked for is hashed.
    let mut unhashed = Vec::new();
    let quiet = write_layer_with(&lower, &upper, &mut unhashed, Hashing::Skip).unwrap();
    assert!(unhashed == tar && quiet.diff_id.is_empty() && quiet.entries == exported.entries);
    let skip = ApplyOptions {
        hashing: Hashing::Skip,
        ..Default::default()
    };
    let copy2 = t.sub("copy2");
    build_lower(&copy2);
    let applied = apply_layer(&copy2, &tar[..], &skip).unwrap();
    assert!(applied.diff_id.is_empty() && applied.bytes == exported.bytes);
    assert_same_tree(&copy2, &upper);
    let checked = ApplyOptions {
        expected_diff_id: Some(exported.diff_id.clone()),
        ..skip
    };
    let copy3 = t.sub("copy3");
    build_lower(&copy3);
    assert_eq!(
        apply_layer(&copy3, &tar[..], &checked).unwrap().diff_id,
        exported.diff_id
    );
    // The check itself can fail: lower is not upper.
    assert!(!differences(&manifest(&lower).unwrap(), &manifest(&upper).unwrap(), 5).is_empty());

    // Whiteouts: one per deleted path, one for a whole deleted directory.
    let mut archive = tar::Archive::new(&tar[..]);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| String::from_utf8(e.unwrap().path_bytes().into_owned()).unwrap())
        .collect();
    let whiteouts: Vec<&String> = names.iter().filter(|n| n.contains(".wh.")).collect();
    assert_eq!(
        whiteouts,
        [
            "etc/.wh.gone",
            "opt/app/.wh.old1",
            "opt/app/.wh.old2",
            "opt/app/.wh.sub",
            "var/.wh.cache"
        ]
    );
    assert!(!names.iter().any(|n| n.starts_with("var/cache")));
    assert!(!names.iter().any(|n| n.contains("lost+found")));
    assert!(
        names.iter().any(|n| n == "etc/" || n == "etc"),
        "parents are in the layer"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("usr/bin/su")),
        "unchanged files are not"
    );
    // Sorted, parents first.
    let mut sorted: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
    sorted.sort();
    assert_eq!(sorted, names.iter().map(PathBuf::from).collect::<Vec<_>>());
}

#[test]
fn exports_are_deterministic() {
    let t = TempDir::new("determinism");
    let (lower, upper) = (t.sub("lower"), t.sub("upper"));
    build_lower(&lower);
    build_upper(&upper);
    let mut first = Vec::new();
    let a = write_layer(&lower, &upper, &mut first).unwrap();
    let mut second = Vec::new();
    let b = write_layer(&lower, &upper, &mut second).unwrap();
    assert_eq!(a, b);
    assert_eq!(first, second);
    // The same trees built again elsewhere (other inode numbers, other
    // creation order) give the same layer, once directory mtimes (which the
    // layer carries) are the same too.
    let (lower2, upper2) = (t.sub("lower2"), t.sub("upper2"));
    build_lower(&lower2);
    build_upper(&upper2);
    for root in [&upper, &upper2] {
        for (rel, entry) in manifest(root).unwrap() {
            if entry.kind == thinlayer_image::Kind::Dir {
                set_mtime(&root.join(rel), T0, 0);
            }
        }
    }
    let mut first = Vec::new();
    let a = write_layer(&lower, &upper, &mut first).unwrap();
    let mut third = Vec::new();
    let c = write_layer(&lower2, &upper2, &mut third).unwrap();
    assert_eq!(a.diff_id, c.diff_id);
}

/// A change made to a tree.
type Edit = Box<dyn Fn(&Path)>;

#[test]
fn manifest_sees_every_attribute() {
    let t = TempDir::new("manifest");
    let (a, b) = (t.sub("a"), t.sub("b"));
    build_upper(&a);
    build_upper(&b);
    assert_same_tree(&a, &b);
    // One change of each kind is seen and named.
    let edits: Vec<(&str, Edit)> = vec![
        (
            "mode",
            Box::new(|r: &Path| {
                fs::set_permissions(r.join("etc/new"), fs::Permissions::from_mode(0o600)).unwrap()
            }),
        ),
        (
            "uid",
            Box::new(|r: &Path| chown(&r.join("etc/new"), 7, 1000)),
        ),
        (
            "xattrs",
            Box::new(|r: &Path| xattr::set(r.join("etc"), "user.z", b"1").unwrap()),
        ),
        (
            "mtime",
            Box::new(|r: &Path| set_mtime(&r.join("sym"), T0 + 1, 0)),
        ),
        (
            "sha256",
            Box::new(|r: &Path| {
                write(r, "pair1", b"PAIR", 0o644);
            }),
        ),
        (
            "hard_link_group",
            Box::new(|r: &Path| {
                fs::remove_file(r.join("pair2")).unwrap();
                write(r, "pair2", b"pair", 0o644);
            }),
        ),
    ];
    for (field, edit) in edits {
        let c = t.sub(&format!("c-{field}"));
        build_upper(&c);
        edit(&c);
        let diffs = differences(&manifest(&a).unwrap(), &manifest(&c).unwrap(), 10);
        assert!(
            diffs.iter().any(|d| d.contains(field)),
            "{field} not reported: {diffs:?}"
        );
    }
}

#[test]
fn root_metadata_travels_as_dot_slash() {
    let t = TempDir::new("rootmeta");
    let (lower, upper, copy) = (t.sub("lower"), t.sub("upper"), t.sub("copy"));
    write(&lower, "f", b"f", 0o644);
    write(&upper, "f", b"f", 0o644);
    write(&copy, "f", b"f", 0o644);
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o700)).unwrap();
    xattr::set(&upper, "user.root", b"r").unwrap();
    assert_eq!(
        changes(&lower, &upper).unwrap(),
        vec![change(".", ChangeKind::Modified)]
    );
    let mut tar = Vec::new();
    let report = write_layer(&lower, &upper, &mut tar).unwrap();
    assert_eq!(report.entries, 1);
    apply_layer(&copy, &tar[..], &ApplyOptions::default()).unwrap();
    assert_same_tree(&copy, &upper);
}
