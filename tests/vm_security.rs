//! Security against the real kernel: what another local user can reach of
//! a pool, and what a root-run thinlayer refuses. Every test is named
//! `vm_*`: the host run skips them, `tools/test` runs them serially inside
//! the VM, where none may skip.
//!
//! "Another user" is uid/gid 65534 (nobody): the test spawns `cat` and
//! `ls` with `CommandExt::uid`/`gid`, which also drops the supplementary
//! groups, so a group bit would show.

mod common;

use common::{NOBODY, Pool, Scratch, mode, vm_test};

use std::{
    fs,
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
};

// --- modes and host space

/// Runs `program arg` as nobody; returns whether it succeeded and stderr.
fn as_nobody(program: &str, arg: &Path) -> (bool, String) {
    let out = Command::new(program)
        .arg(arg)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("run {program} as uid {NOBODY}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `program path` as nobody fails with EACCES.
fn assert_denied(program: &str, path: &Path) {
    let (ok, err) = as_nobody(program, path);
    assert!(
        !ok && err.contains("Permission denied"),
        "uid {NOBODY}: `{program} {}` should fail with EACCES; ok={ok}, stderr: {err}",
        path.display()
    );
}

/// Every directory under `root` (itself included) is 0700 and every file
/// 0600; mounts under it are not entered. Returns how many were checked.
fn assert_private_tree(root: &Path) -> usize {
    let dev = fs::metadata(root).unwrap().dev();
    assert_eq!(mode(root), 0o700, "{}", root.display());
    let mut n = 1;
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.dev() != dev {
                continue; // a mounted layer: its own filesystem's modes
            }
            if m.is_dir() {
                assert_eq!(mode(&p), 0o700, "directory {}", p.display());
                todo.push(p);
            } else {
                assert_eq!(mode(&p), 0o600, "file {}", p.display());
            }
            n += 1;
        }
    }
    n
}

#[test]
fn vm_another_user_reaches_nothing_under_the_root() {
    vm_test("sec-modes", Pool::Small, |s| {
        s.ok(&["layer", "create", "l"]);
        // A mount dir under the root, as the store's mounts are.
        let m = s.root.join("mnt").join("l");
        s.ok(&["mount", "l", m.to_str().unwrap()]);
        fs::write(m.join("secret"), "container bytes\n").unwrap();
        // The control: nobody reads a world-readable file outside the root,
        // so each refusal below is the root's modes, not the harness.
        let open = s.mnt.join("open.txt");
        fs::write(&open, "anyone\n").unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&s.mnt, fs::Permissions::from_mode(0o755)).unwrap();
        let (ok, err) = as_nobody("cat", &open);
        assert!(ok, "uid {NOBODY} reads a 0644 file: {err}");

        for f in [
            s.root.join("data.img"),
            s.root.join("metadata.img"),
            s.root.join("pool.rec"),
            s.root.join("layers").join("l.rec"),
            s.root.join("lock"),
            m.join("secret"),
        ] {
            assert!(f.exists(), "{}", f.display());
            assert_denied("cat", &f);
        }
        for d in [&s.root, &m] {
            assert_denied("ls", d);
        }
        let n = assert_private_tree(&s.root);
        println!("uid {NOBODY} reaches nothing under the root; {n} entries are 0700/0600");
        assert!(
            n >= 7,
            "root, layers/, mnt/, pool.rec, lock, two .img, a record"
        );
        s.ok(&["umount", "l"]);
    });
}

#[test]
fn vm_a_root_an_older_version_left_open_is_tightened_once() {
    vm_test("sec-tighten", Pool::Small, |s| {
        s.ok(&["layer", "create", "l"]);
        // What an older thinlayer left: 0755 directories, 0644 files.
        for (p, m) in [
            (s.root.clone(), 0o755),
            (s.root.join("layers"), 0o755),
            (s.root.join("pool.rec"), 0o644),
            (s.root.join("layers").join("l.rec"), 0o644),
            (s.root.join("data.img"), 0o644),
            (s.root.join("lock"), 0o666),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
        }
        let (ok, err) = as_nobody("cat", &s.root.join("pool.rec"));
        assert!(ok, "the loose root really is readable by others: {err}");

        // A reading command changes nothing and says what will.
        let out = s.run(&["layer", "ls"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("mode 0755"), "{err}");
        assert_eq!(mode(&s.root), 0o755);

        let out = s.run(&["layer", "create", "m"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        println!("{}", err.trim());
        assert!(out.status.success(), "{err}");
        assert_eq!(err.matches("tightened").count(), 1, "said once: {err}");
        assert!(
            err.contains(&format!("tightened {} from 0755 to 0700", s.root.display()))
                && err.contains("other users could read it"),
            "{err}"
        );
        assert_private_tree(&s.root);
        assert_denied("cat", &s.root.join("pool.rec"));
        // Once: the next command finds nothing to say.
        let out = s.run(&["layer", "create", "n"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("tightened"), "{err}");
    });
}

#[test]
fn vm_a_root_another_user_owns_is_refused_with_the_chown_that_fixes_it() {
    vm_test("sec-owner", Pool::Small, |s| {
        nix::unistd::chown(
            &s.root,
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .unwrap();
        let err = s.fails(&["pool", "status"], 5, "belongs to uid 65534");
        assert!(
            err.contains(&format!("chown -R root: {}", s.root.display())),
            "{err}"
        );
        s.fails(&["layer", "create", "x"], 5, "chown -R root:");
        let other = PathBuf::from(format!("{}-new", s.root.display()));
        fs::create_dir_all(&other).unwrap();
        nix::unistd::chown(&other, Some(nix::unistd::Uid::from_raw(NOBODY)), None).unwrap();
        let out = Command::new(common::bin())
            .arg("--root")
            .arg(&other)
            .args([
                "pool",
                "create",
                "--data-size",
                "256M",
                "--base-size",
                "512M",
            ])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(5),
            "pool create refuses a root another user owns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!other.join("pool.rec").exists() && !other.join("lock").exists());
        fs::remove_dir_all(&other).unwrap();
        nix::unistd::chown(
            &s.root,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
        )
        .unwrap();
        s.ok(&["pool", "status"]);
    });
}

// --- layer identity

fn ident_copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            ident_copy_dir(&e.path(), &dst);
        } else {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// A copy of the OCI layout `src` at `dst`, named `name`, whose config's
/// first diff_id is `first`: config, manifest and index rewritten with
/// their digests and sizes recomputed, so the diff_id is all that is
/// hostile.
fn ident_hostile_image(src: &Path, dst: &Path, first: &str, name: &str) {
    use serde_json::Value;
    let _ = fs::remove_dir_all(dst);
    ident_copy_dir(src, dst);
    let blob = |d: &str| {
        dst.join("blobs/sha256").join(
            d.strip_prefix("sha256:")
                .expect("fixture digests are sha256"),
        )
    };
    let read = |p: &Path| -> Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let put = |v: &Value| -> (String, usize) {
        let bytes = serde_json::to_vec(v).unwrap();
        let d = common::sha256_digest(&bytes);
        fs::write(blob(&d), &bytes).unwrap();
        (d, bytes.len())
    };
    let mut index = read(&dst.join("index.json"));
    let mut manifest = read(&blob(index["manifests"][0]["digest"].as_str().unwrap()));
    let mut config = read(&blob(manifest["config"]["digest"].as_str().unwrap()));
    config["rootfs"]["diff_ids"][0] = first.into();
    let (d, n) = put(&config);
    manifest["config"]["digest"] = d.into();
    manifest["config"]["size"] = n.into();
    let (d, n) = put(&manifest);
    index["manifests"][0]["digest"] = d.into();
    index["manifests"][0]["size"] = n.into();
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = name.into();
    fs::write(dst.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// What a refused import must leave as it was.
#[derive(Debug, PartialEq)]
struct IdentState {
    /// Every layer's id, parent, thin id and owner.
    layers: Vec<String>,
    /// Images, containers and volumes, as listed.
    records: String,
    /// The pool's used data blocks.
    used_blocks: u64,
    /// Every file of every layer (mounted read-only): kind, mode, owner,
    /// size, content checksum.
    trees: std::collections::BTreeMap<String, thinlayer_image::tree::Manifest>,
}

fn ident_state(s: &Scratch) -> IdentState {
    let ls = s.json(&["layer", "ls"]);
    let layers: Vec<String> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            format!(
                "{} parent={} thin={} owner={}",
                l["id"], l["parent"], l["thin_id"], l["owner"]
            )
        })
        .collect();
    let records = ["image", "container", "volume"]
        .iter()
        .map(|k| s.json(&[k, "ls"]).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let used_blocks = s.used_data_blocks();
    let mut trees = std::collections::BTreeMap::new();
    for l in ls.as_array().unwrap() {
        let id = l["id"].as_str().unwrap();
        let d = s.dir("ident-ro");
        fs::create_dir_all(&d).unwrap();
        s.ok(&["mount", id, d.to_str().unwrap(), "--readonly"]);
        let m = thinlayer_image::tree::manifest(&d);
        s.ok(&["umount", id]);
        trees.insert(id.to_owned(), m.unwrap());
    }
    IdentState {
        layers,
        records,
        used_blocks,
        trees,
    }
}

fn ident_assert_same(before: &IdentState, after: &IdentState, why: &str) {
    for (id, m) in &before.trees {
        let diffs = after.trees.get(id).map_or_else(
            || vec!["the layer is gone".to_owned()],
            |a| thinlayer_image::tree::differences(m, a, 10),
        );
        assert!(diffs.is_empty(), "{why}: layer {id} changed: {diffs:?}");
    }
    assert_eq!(before.layers, after.layers, "{why}: layer ls changed");
    assert_eq!(before.records, after.records, "{why}: records changed");
    assert_eq!(
        before.used_blocks, after.used_blocks,
        "{why}: the pool's used blocks changed"
    );
    assert_eq!(before, after, "{why}: state changed");
}

/// Sets the owner in layer `id`'s pool record, as another owner (or an
/// older thinlayer, which recorded none) would have left it.
fn ident_set_owner(s: &Scratch, id: &str, owner: thinlayer_pool::Owner) {
    let path = s.root.join("layers").join(format!("{id}.rec"));
    let mut rec: thinlayer_pool::LayerRecord =
        thinlayer_pool::record::read(&path, "layer").unwrap();
    rec.owner = owner;
    thinlayer_pool::record::write(&path, "layer", &rec).unwrap();
}

/// Makes layer `id` through the library, as its owner (or, `User`, an
/// older thinlayer that reserved no names) would have.
fn ident_make_layer(s: &Scratch, id: &str, owner: thinlayer_pool::Owner) {
    let mut pool =
        thinlayer_pool::Pool::open(&s.root, thinlayer_pool::LockMode::Exclusive, false).unwrap();
    pool.create_layer_for(owner, id, None).unwrap();
}

#[test]
fn vm_hostile_diff_ids_are_refused_before_any_change() {
    vm_test("ident-hostile", Pool::Small, |s| {
        let f = common::fixtures();
        s.ok(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        s.ok(&["container", "create", "web", "--image", "demo:1"]);
        s.ok(&["volume", "create", "data"]);
        let d = s.dir("data");
        fs::create_dir_all(&d).unwrap();
        s.ok(&["volume", "mount", "data", d.to_str().unwrap()]);
        fs::write(d.join("precious"), common::pattern(7, 1 << 20)).unwrap();
        s.ok(&["volume", "umount", "data"]);
        s.ok(&["layer", "create", "mine"]);
        let d = s.mount("mine");
        fs::write(d.join("mine.bin"), common::pattern(8, 1 << 20)).unwrap();
        s.ok(&["umount", "mine"]);
        // A user layer named like an image layer, as an older thinlayer let
        // one be made.
        let squatter = format!("sha256:{}", "5".repeat(64));
        ident_make_layer(s, &squatter, thinlayer_pool::Owner::User);
        let before = ident_state(s);
        assert!(
            before.trees["vol-data"].contains_key(Path::new("data/precious")),
            "the state covers the volume's files"
        );

        let not_hex = format!("sha256:{}", "z".repeat(64));
        let upper_hex = format!("sha256:{}", "A".repeat(64));
        let cases: [(&str, i32, &str); 9] = [
            ("vol-data", 2, "rootfs.diff_ids[0]"),
            ("web-rw", 2, "rootfs.diff_ids[0]"),
            ("web-init", 2, "rootfs.diff_ids[0]"),
            ("mine", 2, "rootfs.diff_ids[0]"),
            ("../../x", 2, "rootfs.diff_ids[0]"),
            ("/etc", 2, "rootfs.diff_ids[0]"),
            (&not_hex, 2, "rootfs.diff_ids[0]"),
            (&upper_hex, 2, "rootfs.diff_ids[0]"),
            (&squatter, 4, "belongs to the user"),
        ];
        for (i, (first, code, needle)) in cases.into_iter().enumerate() {
            let img = s.dir(&format!("evil-{i}"));
            ident_hostile_image(&f.join("demo-oci"), &img, first, &format!("evil:{i}"));
            let err = s.fails(&["image", "import", img.to_str().unwrap()], code, needle);
            println!("diff_id {first:?}: {}", err.trim());
            ident_assert_same(&before, &ident_state(s), &format!("diff_id {first:?}"));
        }
        // The helper's images are valid but for the diff_id: with the real
        // one the same rewrite imports (every layer reused).
        let demo = f.join("demo-oci");
        let real: serde_json::Value = {
            let index: serde_json::Value =
                serde_json::from_slice(&fs::read(demo.join("index.json")).unwrap()).unwrap();
            let blob = |d: &serde_json::Value| {
                demo.join("blobs/sha256")
                    .join(d.as_str().unwrap().strip_prefix("sha256:").unwrap())
            };
            let manifest: serde_json::Value =
                serde_json::from_slice(&fs::read(blob(&index["manifests"][0]["digest"])).unwrap())
                    .unwrap();
            serde_json::from_slice(&fs::read(blob(&manifest["config"]["digest"])).unwrap()).unwrap()
        };
        let img = s.dir("same");
        let first = real["rootfs"]["diff_ids"][0].as_str().unwrap();
        ident_hostile_image(&demo, &img, first, "same:1");
        let r = s.json(&["image", "import", img.to_str().unwrap()]);
        assert_eq!(
            (r["applied"].as_u64(), r["reused"].as_u64()),
            (Some(0), Some(3)),
            "{r}"
        );
    });
}

#[test]
fn vm_image_rm_never_removes_a_layer_another_owner_holds() {
    vm_test("ident-image-rm", Pool::Small, |s| {
        use thinlayer_pool::Owner;
        let f = common::fixtures();
        let demo = f.join("demo-oci");
        let layers = s.json(&["image", "import", demo.to_str().unwrap()])["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect::<Vec<_>>();
        s.ok(&[
            "image",
            "import",
            f.join("other-docker.tar").to_str().unwrap(),
        ]);
        let ids = |s: &Scratch| -> Vec<String> {
            s.json(&["layer", "ls"])
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["id"].as_str().unwrap().to_owned())
                .collect()
        };
        for l in s.json(&["layer", "ls"]).as_array().unwrap() {
            assert_eq!(l["owner"], "image", "import records its owner: {l}");
        }
        // Another owner holds demo's top layer: image rm removes the image and
        // none of the layers (the others are under that one).
        let top = layers.last().unwrap();
        ident_set_owner(s, top, Owner::Volume);
        let r = s.json(&["image", "rm", "demo:1"]);
        assert_eq!(r["removed_layers"], serde_json::json!([]), "{r}");
        let now = ids(s);
        for l in &layers {
            assert!(now.contains(l), "image rm removed {l}, held by a volume");
        }
        // An import does not adopt it either, and changes nothing.
        s.fails(
            &["image", "import", demo.to_str().unwrap()],
            4,
            "belongs to the volume",
        );
        assert_eq!(ids(s), now, "a refused import changed the layers");
        assert!(
            !s.ok(&["image", "ls"]).contains("demo:1"),
            "a refused import left an image"
        );
        // A record from before owners were recorded (owner `user`) whose store
        // meta says image layer is still the image's: reused, then removed.
        ident_set_owner(s, top, Owner::User);
        let r = s.json(&["image", "import", demo.to_str().unwrap()]);
        assert_eq!(r["reused"], 3, "{r}");
        let r = s.json(&["image", "rm", "demo:1"]);
        assert_eq!(
            r["removed_layers"].as_array().unwrap().len(),
            2,
            "top and mid go, the base other:1 shares stays: {r}"
        );
        let now = ids(s);
        assert!(!now.contains(top) && !now.contains(&layers[1]), "{now:?}");
        assert!(now.contains(&layers[0]), "the shared base is kept: {now:?}");
    });
}

#[test]
fn vm_user_verbs_refuse_reserved_names_naming_the_owner() {
    vm_test("ident-names", Pool::Small, |s| {
        use thinlayer_pool::Owner;
        let f = common::fixtures();
        s.ok(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        s.ok(&["container", "create", "web", "--image", "demo:1"]);
        s.ok(&["volume", "create", "data"]);
        let tar = f.join("layers/base.tar");
        let tar = tar.to_str().unwrap();
        let ls = |s: &Scratch| s.json(&["layer", "ls"]).to_string();
        let before = ls(s);
        let image_id = format!("sha256:{}", "1".repeat(64));
        for (id, owner) in [
            ("vol-x", "volume"),
            ("x-rw", "container"),
            ("x-init", "container"),
            ("ctrd-7", "containerd snapshotter"),
            ("scratch-1", "scratch"),
            (image_id.as_str(), "image"),
        ] {
            let err = s.fails(&["layer", "create", id], 2, owner);
            assert!(err.contains("pick another name"), "{err}");
            s.fails(&["layer", "apply", id, tar], 2, owner);
            s.fails(&["container", "commit", "web", "--as", id], 2, owner);
        }
        s.fails(
            &["container", "create", "vol-x", "--image", "demo:1"],
            2,
            "volume",
        );
        s.fails(
            &["container", "create", "ctrd-1", "--image", "demo:1"],
            2,
            "containerd snapshotter",
        );
        assert_eq!(ls(s), before, "a refused verb made a layer");

        // Another owner's layer in a form no rule reserves, and a user layer
        // at a volume's id (an older thinlayer's): refused, naming the owner.
        ident_make_layer(s, "snap1", Owner::Snapshotter);
        ident_make_layer(s, "vol-old", Owner::User);
        let before = ls(s);
        let held = "belongs to the containerd snapshotter";
        s.fails(&["layer", "create", "snap1"], 4, held);
        s.fails(&["layer", "apply", "snap1", tar], 4, held);
        s.fails(&["container", "commit", "web", "--as", "snap1"], 4, held);
        s.fails(&["layer", "rm", "snap1"], 4, held);
        s.fails(&["volume", "create", "old"], 4, "belongs to the user");
        assert_eq!(ls(s), before, "a refused verb changed the layers");

        // Ordinary names work, and each layer records its owner.
        s.ok(&["layer", "create", "mine"]);
        s.ok(&["layer", "apply", "mine2", tar, "--parent", "mine"]);
        s.ok(&["container", "commit", "web", "--as", "snapshot1"]);
        s.ok(&["volume", "create", "data2", "--from", "data"]);
        let owners: std::collections::BTreeMap<String, String> = s
            .json(&["layer", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["id"].as_str().unwrap().to_owned(),
                    l["owner"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for (id, owner) in [
            ("mine", "user"),
            ("mine2", "user"),
            ("snapshot1", "user"),
            ("web-init", "container"),
            ("web-rw", "container"),
            ("vol-data", "volume"),
            ("vol-data2", "volume"),
            ("snap1", "snapshotter"),
            ("vol-old", "user"),
        ] {
            assert_eq!(owners[id], owner, "owner of {id}: {owners:?}");
        }
        assert_eq!(
            owners.values().filter(|o| *o == "image").count(),
            3,
            "{owners:?}"
        );
    });
}
// --- mounts and frozen copies
//
// Container roots and volumes sit under the root's 0700 directories; the
// engine's own mounts (apply, diff, export, commit) are nosuid,nodev and
// read-only where they read; a running container is read through a frozen
// copy (a private thin snapshot), never its live tree; a volume is mounted
// onto a directory opened without following symlinks.

/// One mount as `/proc/self/mountinfo` shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MntEntry {
    mountpoint: PathBuf,
    devno: String,
    options: String,
}

impl MntEntry {
    fn has(&self, opt: &str) -> bool {
        self.options.split(',').any(|o| o == opt)
    }
}

fn mnt_unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn mnt_all() -> Vec<MntEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(MntEntry {
                devno: f.get(2)?.to_string(),
                mountpoint: PathBuf::from(mnt_unescape(f.get(4)?)),
                options: f.get(5)?.to_string(),
            })
        })
        .collect()
}

fn mnt_at(dir: &Path) -> MntEntry {
    mnt_all()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {}", dir.display()))
}

/// Records every mount seen under `under` while it runs (polling
/// mountinfo), for mounts that live only inside one command.
struct MntWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<std::collections::BTreeSet<MntEntry>>,
}

impl MntWatch {
    fn start(under: PathBuf) -> MntWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                seen.extend(
                    mnt_all()
                        .into_iter()
                        .filter(|m| m.mountpoint.starts_with(&under)),
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            seen
        });
        MntWatch { stop, thread }
    }

    fn finish(self) -> std::collections::BTreeSet<MntEntry> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn mnt_fixtures() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/images");
    assert!(
        d.join(".stamp").exists(),
        "run tests/fixtures/make-images {} first (tools/test does)",
        d.display()
    );
    d
}

/// Layer ids and owners, from `layer ls`.
fn mnt_layers(s: &Scratch) -> Vec<(String, String)> {
    s.json(&["layer", "ls"])
        .as_array()
        .expect("layer ls --json is an array")
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["owner"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn mnt_no_scratch_layers(s: &Scratch, when: &str) {
    let left: Vec<_> = mnt_layers(s)
        .into_iter()
        .filter(|(id, owner)| owner == "scratch" || id.starts_with("scratch-"))
        .collect();
    assert!(left.is_empty(), "scratch layers left {when}: {left:?}");
}

/// A pool with the demo image and container `name` of it, mounted; returns
/// the container's root.
fn mnt_container(s: &Scratch, name: &str, extra: &[&str]) -> PathBuf {
    s.ok(&[
        "image",
        "import",
        mnt_fixtures().join("demo-docker.tar").to_str().unwrap(),
    ]);
    let mut a = vec!["container", "create", name, "--image", "demo:docker"];
    a.extend_from_slice(extra);
    s.ok(&a);
    PathBuf::from(s.ok(&["container", "mount", name]).trim())
}

#[test]
fn vm_mounts_are_private_and_the_engines_own_are_nosuid() {
    vm_test("sec-mounts", Pool::Small, |s| {
        let tmp = s.root.join("store").join("tmp");
        let watch = MntWatch::start(tmp.clone());
        s.ok(&["volume", "create", "data", "--size", "64M"]);
        let p = mnt_container(s, "c", &["--volume", "data:/var/data"]);
        fs::write(p.join("var/data/v"), "volume bytes\n").unwrap();
        // Enough to read that the commit's mounts are seen by the watcher.
        fs::write(p.join("big"), common::pattern(7, 24 << 20)).unwrap();
        common::sh("sync", &[]);

        // Nobody else reaches the container's root or its volume.
        let (ok, err) = as_nobody("ls", Path::new("/"));
        assert!(ok, "uid {NOBODY} lists /: {err}");
        assert!(p.starts_with(&s.root), "{}", p.display());
        assert_denied("ls", &p);
        assert_denied("ls", &p.join("var/data"));
        let d = s.dir("vol");
        s.ok(&["volume", "mount", "data", d.to_str().unwrap()]);
        // (A volume mounted where a user asked is that user's business; the
        // store's own are under the root.)
        s.ok(&["volume", "umount", "data"]);
        s.ok(&["container", "mount", "c"]);
        assert_denied("ls", &p.join("var/data"));

        // The container's root keeps setuid (the runtime needs it), not devices.
        let root = mnt_at(&p);
        assert!(
            root.has("rw") && root.has("nodev") && !root.has("nosuid"),
            "{root:?}"
        );
        let vol = mnt_at(&p.join("var/data"));
        assert!(vol.has("nodev"), "{vol:?}");

        s.ok(&["container", "commit", "c", "--as", "c1"]);
        let tarball = s.mnt.join("c-rw.tar");
        s.ok(&["layer", "export", "c-rw", "-o", tarball.to_str().unwrap()]);
        let seen = watch.finish();
        for m in &seen {
            println!("seen under store/tmp: {m:?}");
        }
        // Every engine mount: nosuid, nodev; the reads read-only.
        for m in &seen {
            assert!(m.has("nosuid") && m.has("nodev"), "{m:?}");
        }
        assert!(
            seen.iter().any(|m| m.has("rw")),
            "the watcher saw no apply mount (imports and commits apply): {seen:?}"
        );
        let name = |m: &MntEntry| {
            m.mountpoint
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        let reads: Vec<_> = seen
            .iter()
            .filter(|m| name(m).starts_with("upper-") || name(m).starts_with("lower-"))
            .collect();
        assert!(
            reads.iter().any(|m| name(m).starts_with("upper-")),
            "a commit of a running container reads a frozen copy mounted under store/tmp: {seen:?}"
        );
        for m in &reads {
            assert!(
                m.has("ro"),
                "diff/export/commit mounts are read-only: {m:?}"
            );
            assert_ne!(
                m.devno, root.devno,
                "the running container's own device is never read: {m:?}"
            );
        }
        mnt_no_scratch_layers(s, "after a commit and an export");
        s.ok(&["container", "umount", "c"]);
        s.ok(&["container", "rm", "c"]);
    });
}

#[test]
fn vm_a_frozen_copy_a_crash_left_is_swept_at_the_next_exclusive_open() {
    vm_test("sec-frozen-crash", Pool::Small, |s| {
        let p = mnt_container(s, "c", &[]);
        fs::write(p.join("big"), common::pattern(9, 96 << 20)).unwrap();
        common::sh("sync", &[]);
        let tmp = s.root.join("store").join("tmp");
        let mut child = Command::new(common::bin())
            .arg("--root")
            .arg(&s.root)
            .args(["container", "commit", "c", "--as", "c1"])
            .spawn()
            .unwrap();
        // Kill it (as a crash would) while it reads its frozen copy.
        let t = std::time::Instant::now();
        let seen = loop {
            let m = mnt_all().into_iter().find(|m| {
                m.mountpoint.starts_with(&tmp)
                    && m.mountpoint
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("upper-"))
            });
            if m.is_some() || t.elapsed() > std::time::Duration::from_secs(120) {
                break m;
            }
            if child.try_wait().unwrap().is_some() {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let seen = seen.expect("the commit mounted a frozen copy under store/tmp");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed mid-read: {status}");
        let left: Vec<_> = mnt_layers(s)
            .into_iter()
            .filter(|(_, o)| o == "scratch")
            .collect();
        assert_eq!(left.len(), 1, "the crash left one scratch layer: {left:?}");
        assert!(
            mnt_all().iter().any(|m| m.mountpoint == seen.mountpoint),
            "and its mount"
        );
        // The next exclusive open sweeps both; the container is intact.
        let diff = s.ok(&["container", "diff", "c"]);
        assert!(diff.lines().any(|l| l.trim() == "A /big"), "{diff}");
        mnt_no_scratch_layers(s, "after the next exclusive open");
        assert!(
            !mnt_all().iter().any(|m| m.mountpoint.starts_with(&tmp)),
            "no mount left under store/tmp"
        );
        assert!(
            !mnt_layers(s).iter().any(|(id, _)| id == "c1"),
            "the killed commit made no layer"
        );
        s.ok(&["container", "commit", "c", "--as", "c1"]);
        s.ok(&["container", "umount", "c"]);
    });
}

/// Flips pairs of entries in a directory with `renameat2(RENAME_EXCHANGE)`
/// until stopped; `pause` waits until no flip is under way and none starts.
struct MntFlipper {
    go: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    busy: std::sync::Arc<std::sync::Mutex<()>>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl MntFlipper {
    fn start(dir: PathBuf, pairs: &[(&str, &str)]) -> MntFlipper {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicBool, Ordering},
        };
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        let go = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(Mutex::new(()));
        let (g, st, b) = (go.clone(), stop.clone(), busy.clone());
        let thread = std::thread::spawn(move || {
            let mut flips = 0u64;
            while !st.load(Ordering::SeqCst) {
                {
                    let _held = b.lock().unwrap();
                    if g.load(Ordering::SeqCst) {
                        for (a, bb) in &pairs {
                            if nix::fcntl::renameat2(
                                nix::fcntl::AT_FDCWD,
                                &dir.join(a),
                                nix::fcntl::AT_FDCWD,
                                &dir.join(bb),
                                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                            )
                            .is_ok()
                            {
                                flips += 1;
                            }
                        }
                    }
                }
                std::thread::yield_now();
            }
            flips
        });
        MntFlipper {
            go,
            stop,
            busy,
            thread: Some(thread),
        }
    }

    fn pause(&self) {
        self.go.store(false, std::sync::atomic::Ordering::SeqCst);
        drop(self.busy.lock().unwrap());
    }

    fn resume(&self) {
        self.go.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for MntFlipper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Secret bytes no container holds: found anywhere, they came from the host.
fn mnt_secret(tag: &str) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("HOST-CANARY-{tag}-{}-{nanos}\n", std::process::id())
        .repeat(64)
        .into_bytes()
}

fn mnt_contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The entries of a layer tar, by `tar -tf`.
fn mnt_tar_entries(tar: &Path) -> Vec<String> {
    common::sh("tar", &["-tf", tar.to_str().unwrap()])
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_owned())
        .collect()
}

/// A layer tar of the racing container holds nothing of the host and, if
/// `whole`, all of the container's own files (under either name a flip
/// left them at).
fn mnt_check_tar(tar: &Path, secret: &[u8], whole: bool) {
    let bytes = fs::read(tar).unwrap();
    let tag = &secret[..24];
    assert!(
        !mnt_contains(&bytes, tag),
        "{} holds bytes of a host file",
        tar.display()
    );
    let entries = mnt_tar_entries(tar);
    for e in &entries {
        for dir in ["etcdir/", "etcdir.alt/"] {
            if let Some(rest) = e.strip_prefix(dir) {
                assert_eq!(rest, "marker", "{}: host /etc leaked: {e}", tar.display());
            }
        }
        for dir in ["data/", "data.alt/"] {
            if let Some(rest) = e.strip_prefix(dir) {
                assert_eq!(rest, "inner", "{}: host dir leaked: {e}", tar.display());
            }
        }
    }
    if !whole {
        return;
    }
    let read = |names: [&str; 2]| -> String {
        let found: Vec<&str> = names
            .into_iter()
            .filter(|n| entries.iter().any(|e| e == n))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: one of {names:?} in {entries:?}",
            tar.display()
        );
        common::sh("tar", &["-xOf", tar.to_str().unwrap(), found[0]])
    };
    assert_eq!(read(["data/inner", "data.alt/inner"]), "container data\n");
    assert_eq!(read(["etcdir/marker", "etcdir.alt/marker"]), "marker\n");
    // Both names are there, one a symlink (which `tar -xO` prints as
    // nothing), one the container's file.
    assert_eq!(
        common::sh("tar", &["-xOf", tar.to_str().unwrap(), "file", "file.alt"]),
        "container file\n"
    );
}

#[test]
fn vm_commits_and_exports_of_a_racing_container_never_hold_host_files() {
    vm_test("sec-race", Pool::Small, |s| {
        let p = mnt_container(s, "r", &[]);
        let secret = mnt_secret("race");
        let canary = s.mnt.join("canary");
        fs::create_dir_all(&canary).unwrap();
        fs::write(canary.join("inner"), &secret).unwrap();
        fs::write(canary.join("secret-file"), &secret).unwrap();
        // The container's own: a directory, a directory where /etc will be
        // swapped in, a file; and the symlinks it flips them with.
        fs::create_dir(p.join("data")).unwrap();
        fs::write(p.join("data/inner"), "container data\n").unwrap();
        fs::create_dir(p.join("etcdir")).unwrap();
        fs::write(p.join("etcdir/marker"), "marker\n").unwrap();
        fs::write(p.join("file"), "container file\n").unwrap();
        std::os::unix::fs::symlink(&canary, p.join("data.alt")).unwrap();
        std::os::unix::fs::symlink("/etc", p.join("etcdir.alt")).unwrap();
        std::os::unix::fs::symlink(canary.join("secret-file"), p.join("file.alt")).unwrap();
        common::sh("sync", &[]);

        // Fits TCG time: 40 exports of the live layer, 10 commits each
        // exported again (50 exports), 5 diffs; the issue asks for 50 of each.
        const COMMITS: usize = 10;
        const EXPORTS: usize = 40;
        let flipper = MntFlipper::start(
            p.clone(),
            &[
                ("data", "data.alt"),
                ("etcdir", "etcdir.alt"),
                ("file", "file.alt"),
            ],
        );
        let (mut committed, mut refused) = (0, 0);
        for i in 0..EXPORTS {
            let t = s.mnt.join(format!("live-{i}.tar"));
            s.ok(&["layer", "export", "r-rw", "-o", t.to_str().unwrap()]);
            mnt_check_tar(&t, &secret, true);
            fs::remove_file(&t).unwrap();
            if i % 8 == 0 {
                let diff = s.ok(&["container", "diff", "r"]);
                assert!(
                    !diff.contains("etcdir/passwd") && !diff.contains("secret-file/"),
                    "{diff}"
                );
            }
            if i % (EXPORTS / COMMITS) == 0 {
                let id = format!("k{i}");
                let out = s.run(&["container", "commit", "r", "--as", &id]);
                if out.status.success() {
                    committed += 1;
                    let t = s.mnt.join(format!("{id}.tar"));
                    s.ok(&["layer", "export", &id, "-o", t.to_str().unwrap()]);
                    mnt_check_tar(&t, &secret, true);
                    fs::remove_file(&t).unwrap();
                } else {
                    refused += 1;
                    println!(
                        "commit {id} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert!(
                        !mnt_layers(s).iter().any(|(l, _)| *l == id),
                        "a failed commit leaves no layer {id}"
                    );
                }
            }
        }
        let flips = flipper.finish();
        println!(
            "{flips} flips; {committed} commits held the container's content, {refused} failed cleanly"
        );
        assert!(flips > 100, "the flipper ran: {flips} flips");
        assert_eq!(committed + refused, COMMITS);
        assert!(committed > 0, "commits of a running container succeed");
        mnt_no_scratch_layers(s, "after the race");
        assert_eq!(fs::read(canary.join("inner")).unwrap(), secret);
        s.ok(&["container", "umount", "r"]);
    });
}

#[test]
fn vm_a_renamer_in_the_container_never_moves_a_volume_mount_outside_it() {
    vm_test("sec-volrace", Pool::Small, |s| {
        s.ok(&["volume", "create", "vd", "--size", "64M"]);
        let p = mnt_container(s, "v", &["--volume", "vd:/vol/data"]);
        fs::write(p.join("vol/data/x"), "volume\n").unwrap();
        s.ok(&["volume", "umount", "vd"]);
        // Outside the root: a directory shaped like the mount path.
        let secret = mnt_secret("vol");
        let canary = s.mnt.join("canary");
        fs::create_dir_all(canary.join("data")).unwrap();
        fs::write(canary.join("data/keep"), &secret).unwrap();
        std::os::unix::fs::symlink(&canary, p.join("vol.alt")).unwrap();
        let listing = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // The directory back where it belongs if the flipper left the
        // symlink in its place.
        let put_back = || {
            if fs::symlink_metadata(p.join("vol")).is_ok_and(|m| m.file_type().is_symlink()) {
                nix::fcntl::renameat2(
                    nix::fcntl::AT_FDCWD,
                    &p.join("vol"),
                    nix::fcntl::AT_FDCWD,
                    &p.join("vol.alt"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
            }
        };
        let flipper = MntFlipper::start(p.clone(), &[("vol", "vol.alt")]);
        let (mut mounted, mut refused) = (0, 0);
        const ROUNDS: usize = 30;
        for i in 0..ROUNDS {
            flipper.resume();
            let out = s.run(&["container", "mount", "v"]);
            flipper.pause();
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                mounted += 1;
            } else {
                assert!(
                    err.contains("symlink") || err.contains("kept changing"),
                    "round {i}: an unexpected failure: {err}"
                );
                refused += 1;
            }
            let all = mnt_all();
            assert!(
                !all.iter().any(|m| m.mountpoint.starts_with(&canary)),
                "round {i}: a mount outside the root: {all:?}"
            );
            let vol_points: Vec<PathBuf> = s
                .json(&["layer", "ls"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["id"] == "vol-vd")
                .flat_map(|l| l["mountpoints"].as_array().cloned().unwrap_or_default())
                .map(|m| PathBuf::from(m.as_str().unwrap()))
                .collect();
            for m in &vol_points {
                assert!(
                    m.starts_with(&p),
                    "round {i}: volume mounted at {}",
                    m.display()
                );
            }
            if out.status.success() {
                assert_eq!(vol_points.len(), 1, "round {i}: {vol_points:?}");
            }
            // Put the directory back where it belongs, then unmount the volume.
            put_back();
            s.ok(&["volume", "umount", "vd"]);
        }
        // A refused round unmounts the root, which may keep `vol` as the
        // flipper left it (a symlink) out of sight: flip on until a mount
        // lands, then put the directory back.
        let landed = (0..50).any(|_| {
            flipper.resume();
            let ok = s.run(&["container", "mount", "v"]).status.success();
            flipper.pause();
            ok
        });
        assert!(landed, "no mount landed in 50 tries");
        put_back();
        let flips = flipper.finish();
        println!("{flips} flips; {mounted} mounts landed inside the root, {refused} were refused");
        assert!(flips > 0, "the flipper ran");
        assert!(mounted > 0, "some mounts succeed");
        assert_eq!(listing(&canary), ["data"]);
        assert_eq!(listing(&canary.join("data")), ["keep"]);
        assert_eq!(fs::read(canary.join("data/keep")).unwrap(), secret);
        assert_eq!(
            fs::read_to_string(p.join("vol/data/x")).unwrap(),
            "volume\n"
        );
        s.ok(&["container", "umount", "v"]);
    });
}

#[test]
fn vm_a_running_xfs_container_commits_from_a_frozen_copy() {
    vm_test("sec-xfs", Pool::With(&["--fs", "xfs"]), |s| {
        let p = mnt_container(s, "x", &[]);
        fs::write(p.join("added"), "from the running container\n").unwrap();
        fs::remove_file(p.join("etc/motd")).unwrap();
        // Written but not synced: the freeze flushes it into the copy.
        s.ok(&["container", "commit", "x", "--as", "kx"]);
        let t = s.mnt.join("kx.tar");
        s.ok(&["layer", "export", "kx", "-o", t.to_str().unwrap()]);
        assert_eq!(
            common::sh("tar", &["-xOf", t.to_str().unwrap(), "added"]),
            "from the running container\n"
        );
        let diff = s.ok(&["container", "diff", "x"]);
        assert!(diff.lines().any(|l| l.trim() == "A /added"), "{diff}");
        assert!(diff.lines().any(|l| l.trim() == "D /etc/motd"), "{diff}");
        // Still running and writable after its copies came and went.
        fs::write(p.join("after"), "still writable\n").unwrap();
        mnt_no_scratch_layers(s, "after an XFS commit");
        s.ok(&["container", "umount", "x"]);
    });
}
