//! Images and containers against the real kernel: OCI/Docker layer tars
//! applied into thin snapshots, checked against an independent extraction
//! with GNU tar plus whiteout processing; sharing, isolation, commit/export
//! round trips, and hostile input rolled back.
//!
//! Fixtures come from `tests/fixtures/make-images` (tools/test runs it on
//! the host before booting the VM; the guest has no Python).

mod common;

use common::{Pool, Scratch, sh, vm_test};

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use thinlayer_image::tree;

/// Extracts layer tars in order into `dest` with GNU tar, applying the
/// OCI whiteout rules by hand: an independent reference for the engine.
fn gnu_tar_reference(layers: &[PathBuf], dest: &Path) {
    let _ = fs::remove_dir_all(dest);
    fs::create_dir_all(dest).unwrap();
    for layer in layers {
        let list = sh("tar", &["-tf", layer.to_str().unwrap()]);
        for name in list.lines() {
            let p = Path::new(name.trim_end_matches('/'));
            let Some(base) = p.file_name().and_then(|b| b.to_str()) else {
                continue;
            };
            let dir = dest.join(p.parent().unwrap_or(Path::new("")));
            if base == ".wh..wh..opq" {
                for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    remove_any(&e.path());
                }
            } else if let Some(victim) = base.strip_prefix(".wh.") {
                remove_any(&dir.join(victim));
            }
        }
        sh(
            "tar",
            &[
                "-xpf",
                layer.to_str().unwrap(),
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "--same-owner",
                "--exclude=.wh.*",
                "-C",
                dest.to_str().unwrap(),
            ],
        );
    }
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
        Ok(_) => fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// A tree's manifest without the filesystem's own artefacts.
fn manifest(root: &Path, skip: &[&str]) -> tree::Manifest {
    let mut m = tree::manifest(root).unwrap();
    m.retain(|k, _| {
        let s = k.to_string_lossy();
        !(s.is_empty()
            || s == "."
            || s == "lost+found"
            || s.starts_with("lost+found/")
            || skip.contains(&s.as_ref()))
    });
    m
}

fn assert_same_tree(a: &Path, b: &Path, skip: &[&str]) {
    let (ma, mb) = (manifest(a, skip), manifest(b, skip));
    let diffs = tree::differences(&ma, &mb, 20);
    assert!(
        diffs.is_empty(),
        "{} and {} differ:\n{}",
        a.display(),
        b.display(),
        diffs.join("\n")
    );
    assert!(
        ma.len() > 10,
        "suspiciously small tree: {} entries",
        ma.len()
    );
}

fn layers(f: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| f.join("layers").join(format!("{n}.tar")))
        .collect()
}

fn top_layer(s: &Scratch, image: &str) -> String {
    let images = s.json(&["image", "ls"]);
    let img = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == image)
        .unwrap();
    img["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

const INIT_FILES: [&str; 3] = ["etc/hostname", "etc/hosts", "etc/resolv.conf"];

#[test]
fn vm_a_three_layer_image_imports_and_a_container_sees_exactly_the_applied_tree() {
    vm_test("img-import", Pool::Small, |s| {
        let f = common::fixtures();
        let r = s.json(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        assert_eq!(r["name"], "demo:1");
        assert_eq!(r["applied"], 3);
        // The reference goes on an ext4 layer of its own (an empty snapshot of
        // the base): the guest's tmpfs keeps no user.* xattrs.
        s.ok(&["layer", "create", "reference"]);
        let expected = s.mount("reference");
        gnu_tar_reference(&layers(&f, &["base", "mid", "top"]), &expected.join("tree"));
        let expected = expected.join("tree");

        // The image's top layer is exactly the reference tree.
        let top = top_layer(s, "demo:1");
        let d = s.dir("top");
        s.ok(&["mount", &top, d.to_str().unwrap(), "--readonly"]);
        assert_same_tree(&expected, &d, &[]);
        s.ok(&["umount", &top]);

        // A container sees the same tree plus its init files.
        s.ok(&[
            "container",
            "create",
            "c1",
            "--image",
            "demo:1",
            "--hostname",
            "box1",
        ]);
        let m = PathBuf::from(s.ok(&["container", "mount", "c1"]).trim());
        assert_same_tree(&expected, &m, &INIT_FILES);
        assert_eq!(
            fs::read_to_string(m.join("etc/hostname")).unwrap(),
            "box1\n"
        );
        // Whiteouts, opaque directories and replacements took effect.
        assert!(!m.join("opt/old").exists());
        assert!(!m.join("var/cache/x").exists() && m.join("var/cache/new").exists());
        assert!(m.join("srv/replace/inside").is_file());
        assert!(!m.join("usr/share/data.bin").exists() && m.join("usr/share/keep.txt").exists());
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(
            fs::metadata(m.join("usr/bin/suid-tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o4755
        );
        assert_eq!(fs::metadata(m.join("home/user")).unwrap().uid(), 1000);
        // The root filesystem is usable: busybox runs from it.
        let out = Command::new("chroot")
            .arg(&m)
            .args(["/bin/sh", "-c", "cat /etc/os-release; echo ran"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("VERSION_ID=2\nran"),
            "{out:?}"
        );
        s.ok(&["container", "umount", "c1"]);

        // The same image again: nothing applied. The archive forms import too.
        let again = s.json(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        assert_eq!(again["already_present"], true);
        let docker = s.json(&[
            "image",
            "import",
            f.join("demo-docker.tar").to_str().unwrap(),
        ]);
        assert_eq!(
            (
                docker["name"].as_str(),
                docker["applied"].as_u64(),
                docker["reused"].as_u64()
            ),
            (Some("demo:docker"), Some(0), Some(3))
        );
        let archive = s.json(&[
            "image",
            "import",
            f.join("demo-oci.tar").to_str().unwrap(),
            "--name",
            "demo:archive",
        ]);
        assert_eq!(archive["reused"], 3);
        s.ok(&["container", "rm", "c1"]);
    });
}

#[test]
fn vm_two_containers_of_one_image_each_see_their_own_writes() {
    vm_test("img-two", Pool::Small, |s| {
        let f = common::fixtures();
        s.ok(&[
            "image",
            "import",
            f.join("demo-docker.tar").to_str().unwrap(),
        ]);
        s.ok(&["container", "create", "a", "--image", "demo:docker"]);
        s.ok(&["container", "create", "b", "--image", "demo:docker"]);
        let ma = PathBuf::from(s.ok(&["container", "mount", "a"]).trim());
        let mb = PathBuf::from(s.ok(&["container", "mount", "b"]).trim());
        fs::write(ma.join("etc/motd"), "written by a\n").unwrap();
        fs::write(mb.join("etc/motd"), "written by b\n").unwrap();
        sh("sync", &[]);
        assert_eq!(
            fs::read_to_string(ma.join("etc/motd")).unwrap(),
            "written by a\n"
        );
        assert_eq!(
            fs::read_to_string(mb.join("etc/motd")).unwrap(),
            "written by b\n"
        );
        assert_eq!(fs::read_to_string(ma.join("etc/hostname")).unwrap(), "a\n");
        s.ok(&["container", "umount", "a"]);
        s.ok(&["container", "umount", "b"]);
        let ma = PathBuf::from(s.ok(&["container", "mount", "a"]).trim());
        assert_eq!(
            fs::read_to_string(ma.join("etc/motd")).unwrap(),
            "written by a\n"
        );
        s.ok(&["container", "rm", "a"]);
        s.ok(&["container", "rm", "b"]);
        s.fails(&["container", "rm", "a"], 3, "no container");
    });
}

#[test]
fn vm_a_second_image_sharing_the_base_adds_no_blocks_for_the_base() {
    vm_test("img-share", Pool::Small, |s| {
        let f = common::fixtures();
        let before = s.used_data_blocks();
        s.ok(&[
            "image",
            "import",
            f.join("demo-docker.tar").to_str().unwrap(),
        ]);
        let one = s.used_data_blocks();
        let r = s.json(&[
            "image",
            "import",
            f.join("other-docker.tar").to_str().unwrap(),
        ]);
        let two = s.used_data_blocks();
        println!(
            "blocks: empty pool {before}, first image {one} (+{}), second image {two} (+{})",
            one - before,
            two - one
        );
        assert_eq!(
            (r["reused"].as_u64(), r["applied"].as_u64()),
            (Some(1), Some(1))
        );
        let base_blocks = (6 << 20) / 65536;
        assert!(
            two - one < base_blocks / 4,
            "second image added {} blocks; the base alone is ~{base_blocks}",
            two - one
        );
        // Removing the first image keeps the shared base for the second.
        let rm = s.json(&["image", "rm", "demo:docker"]);
        assert_eq!(rm["removed_layers"].as_array().unwrap().len(), 2, "{rm}");
        s.ok(&["container", "create", "o", "--image", "other:1"]);
        let m = PathBuf::from(s.ok(&["container", "mount", "o"]).trim());
        assert!(m.join("bin/busybox").is_file() && m.join("etc/other").is_file());
        s.ok(&["container", "rm", "o"]);
        s.fails(&["image", "rm", "nope"], 3, "no image");
    });
}

#[test]
fn vm_commit_export_and_reimport_round_trip_is_identical() {
    vm_test("img-commit", Pool::Small, |s| {
        let f = common::fixtures();
        s.ok(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        s.ok(&["container", "create", "c", "--image", "demo:1"]);
        let m = PathBuf::from(s.ok(&["container", "mount", "c"]).trim());
        fs::write(m.join("etc/added"), "new file\n").unwrap();
        fs::write(m.join("etc/os-release"), "changed\n").unwrap();
        fs::remove_file(m.join("usr/share/keep.txt")).unwrap();
        fs::remove_dir_all(m.join("srv/replace")).unwrap();
        fs::create_dir_all(m.join("data/deep")).unwrap();
        fs::write(m.join("data/deep/f"), vec![7u8; 200_000]).unwrap();
        sh("chmod", &["4711", m.join("data/deep/f").to_str().unwrap()]);
        sh(
            "chown",
            &["1000:1000", m.join("data/deep").to_str().unwrap()],
        );
        std::os::unix::fs::symlink("../etc/added", m.join("data/link")).unwrap();
        fs::hard_link(m.join("data/deep/f"), m.join("data/f-again")).unwrap();
        sh("mknod", &[m.join("data/fifo").to_str().unwrap(), "p"]);
        sh("sync", &[]);

        let diff = s.ok(&["container", "diff", "c"]);
        println!("{diff}");
        for want in [
            "A /etc/added",
            "C /etc/os-release",
            "D /usr/share/keep.txt",
            "D /srv/replace",
            "A /data/deep/f",
        ] {
            assert!(
                diff.lines().any(|l| l.trim() == want),
                "diff lacks `{want}`:\n{diff}"
            );
        }
        assert!(
            !diff.contains("hostname"),
            "init files are not the container's changes:\n{diff}"
        );

        s.ok(&["container", "commit", "c", "--as", "committed"]);
        let tarball = s.mnt.join("committed.tar");
        s.ok(&[
            "layer",
            "export",
            "committed",
            "-o",
            tarball.to_str().unwrap(),
        ]);
        let listing = sh("tar", &["-tvf", tarball.to_str().unwrap()]);
        assert!(
            listing.contains(".wh.keep.txt") && listing.contains(".wh.replace"),
            "{listing}"
        );
        assert!(
            !listing.contains("etc/hostname"),
            "init files leaked into the commit:\n{listing}"
        );

        // Re-import on a fresh pool on top of the same parent.
        let t = Scratch::new("img-commit-2");
        t.create_pool(&[]);
        t.ok(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        let top = top_layer(&t, "demo:1");
        t.ok(&[
            "layer",
            "apply",
            "again",
            tarball.to_str().unwrap(),
            "--parent",
            &top,
        ]);
        let (a, b) = (s.dir("committed"), t.dir("again"));
        s.ok(&["mount", "committed", a.to_str().unwrap(), "--readonly"]);
        t.ok(&["mount", "again", b.to_str().unwrap(), "--readonly"]);
        assert_same_tree(&a, &b, &[]);
        // And both equal the container minus its init files.
        assert_same_tree(&m, &a, &INIT_FILES);
        s.ok(&["umount", "committed"]);
        t.ok(&["umount", "again"]);
        s.ok(&["container", "rm", "c"]);
    });
}

/// What a rejected layer must leave as it was.
fn pool_state(s: &Scratch) -> (u64, String, String) {
    let mut ls = s.json(&["layer", "ls"]);
    for l in ls.as_array_mut().unwrap() {
        l["created_unix"] = serde_json::Value::Null;
    }
    let images = s.json(&["image", "ls"]).to_string();
    (s.used_data_blocks(), ls.to_string(), images)
}

#[test]
fn vm_hostile_and_broken_layers_are_refused_and_rolled_back() {
    vm_test("img-hostile", Pool::Small, |s| {
        let f = common::fixtures();
        s.ok(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        let top = top_layer(s, "demo:1");
        let before = pool_state(s);
        let cases = [
            ("dotdot.tar", ".."),
            ("absolute.tar", "absolute"),
            ("symlink-escape.tar", "symlink"),
            ("symlink-parent-escape.tar", "symlink"),
            ("hardlink-escape.tar", "link"),
            ("whiteout-escape.tar", ".."),
            ("truncated.tar", ""),
            ("corrupt-gzip.tar.gz", ""),
        ];
        for (file, needle) in cases {
            let path = f.join("hostile").join(file);
            let out = s.run(&[
                "layer",
                "apply",
                "evil",
                path.to_str().unwrap(),
                "--parent",
                &top,
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            println!("{file}: exit {:?}: {}", out.status.code(), err.trim());
            assert!(!out.status.success(), "{file} was accepted");
            assert!(
                err.contains(needle),
                "{file}: error lacks `{needle}`: {err}"
            );
            assert_eq!(pool_state(s), before, "{file} left something behind");
        }
        for escaped in ["/escaped", "/escaped-abs", "/tmp/escaped-through-symlink"] {
            assert!(!Path::new(escaped).exists(), "{escaped} was written");
        }
        // A config whose diff_id does not match the layer: refused, rolled back.
        let out = s.run(&["image", "import", f.join("baddiff-oci").to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("diff_id"), "{err}");
        assert_eq!(
            pool_state(s),
            before,
            "a failed import left something behind"
        );
    });
}

#[test]
fn vm_a_layer_larger_than_the_pool_is_refused_with_the_space_it_needs() {
    vm_test(
        "img-full",
        Pool::Create(&["--data-size=64M", "--base-size=512M"]),
        |s| {
            s.ok(&["layer", "create", "small"]);
            let d = s.mount("small");
            fs::write(d.join("kept"), "data before the fill\n").unwrap();
            s.ok(&["umount", "small"]);
            let before = pool_state(s);
            // A 96 MiB layer tar of incompressible data into a 64 MiB pool.
            let big = s.mnt.join("big.tar");
            let src = s.mnt.join("bigsrc");
            fs::create_dir_all(&src).unwrap();
            fs::write(src.join("blob"), common::pattern(9, 96 << 20)).unwrap();
            sh(
                "tar",
                &[
                    "-cf",
                    big.to_str().unwrap(),
                    "-C",
                    src.to_str().unwrap(),
                    "blob",
                ],
            );
            fs::remove_dir_all(&src).unwrap();
            let out = s.run(&[
                "layer",
                "apply",
                "huge",
                big.to_str().unwrap(),
                "--parent",
                "small",
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            println!("{err}");
            assert_eq!(out.status.code(), Some(6), "pool full: {err}");
            assert!(err.contains("pool extend"), "{err}");
            assert!(err.contains("96"), "says how much space is needed: {err}");
            let after = pool_state(s);
            assert_eq!(
                (after.1, after.2),
                (before.1.clone(), before.2.clone()),
                "layers and images back"
            );
            assert!(
                after.0 <= before.0 + 2,
                "blocks back: {} -> {}",
                before.0,
                after.0
            );
            let d = s.mount("small");
            assert_eq!(
                fs::read_to_string(d.join("kept")).unwrap(),
                "data before the fill\n"
            );
            s.ok(&["umount", "small"]);
        },
    );
}
