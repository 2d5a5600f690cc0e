//! The graphdriver-shaped library API against the real kernel: a chain of
//! layers with files, read/write, reference-counted mounts, remove rules,
//! exists, status, and diff / changes / apply-diff / diff-size round trips.

mod common;

use common::{Pool, dm_devices, vm_test};

use std::{fs, os::fd::AsFd, path::Path};

use thinlayer_docker::{GraphDriver, ThinDriver, graphdriver::QUIET_WAIT, http::Left};
use thinlayer_image::{ChangeKind, Hashing, tree};

/// Whether the layer whose tree `get` returned (`MNT/ID/rootfs`) is
/// mounted (at `MNT/ID`).
fn is_mount(tree: &Path) -> bool {
    let dir = tree.parent().unwrap();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

/// What Docker 20.10's init code (moby `daemon/initlayer`) does to a
/// container's init layer at `tree`: for each of its paths, unlink every
/// prefix (a file or symlink there goes; a directory stays), then make
/// what is missing (parents 0755, then an empty directory, an empty file
/// or the `/etc/mtab` symlink).
fn docker_init(tree: &Path) {
    for (path, kind) in [
        ("dev/pts", "dir"),
        ("dev/shm", "dir"),
        ("proc", "dir"),
        ("sys", "dir"),
        (".dockerenv", "file"),
        ("etc/resolv.conf", "file"),
        ("etc/hosts", "file"),
        ("etc/hostname", "file"),
        ("dev/console", "file"),
        ("etc/mtab", "/proc/mounts"),
    ] {
        let mut prefix = tree.to_path_buf();
        for part in Path::new(path).components() {
            prefix.push(part);
            let _ = fs::remove_file(&prefix);
        }
        let at = tree.join(path);
        if fs::metadata(&at).is_ok() {
            continue;
        }
        fs::create_dir_all(at.parent().unwrap()).unwrap();
        match kind {
            "dir" => fs::create_dir_all(&at).unwrap(),
            "file" => drop(fs::File::create(&at).unwrap()),
            target => std::os::unix::fs::symlink(target, &at).unwrap(),
        }
    }
}

/// Layer changes as `KIND PATH` lines, sorted.
fn summary(changes: &[thinlayer_docker::graphdriver::Change]) -> Vec<String> {
    let mut out: Vec<String> = changes
        .iter()
        .map(|c| format!("{:?} {}", c.kind, c.path.display()))
        .collect();
    out.sort();
    out
}

#[test]
fn vm_graphdriver_conformance() {
    vm_test("graphdriver", Pool::Small, |s| {
        let mut d = ThinDriver::new(&s.root).unwrap();
        assert_eq!(d.name(), "thinlayer");

        // A chain: base <- app (read-only layers) <- ctr (read-write).
        d.create("base", None).unwrap();
        let dir = d.get("base").unwrap();
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/os"), "base\n").unwrap();
        fs::write(dir.join("etc/gone"), "to be deleted\n").unwrap();
        fs::write(dir.join("big"), vec![1u8; 300_000]).unwrap();
        d.put("base").unwrap();
        assert!(is_mount(&dir), "the last put parks the mount");
        assert_eq!(
            d.get("base").unwrap(),
            dir,
            "a get takes a parked mount back"
        );
        assert!(d.put("base").is_ok() && d.put("base").is_err());

        // A child of a parked (mounted, written) layer holds what was
        // written: the snapshot freezes the filesystem first.
        d.create("app", Some("base")).unwrap();
        d.create_read_write("ctr", Some("app")).unwrap();
        let a = d.get("ctr").unwrap();
        let again = d.get("ctr").unwrap();
        assert_eq!(a, again, "two gets share one mount");
        assert_eq!(
            fs::read_to_string(a.join("etc/os")).unwrap(),
            "base\n",
            "sees its grandparent's files"
        );
        fs::write(a.join("etc/os"), "changed in ctr\n").unwrap();
        fs::remove_file(a.join("etc/gone")).unwrap();
        fs::write(a.join("added"), vec![2u8; 5000]).unwrap();
        d.put("ctr").unwrap();
        assert!(is_mount(&a), "one reference left: still mounted");
        d.put("ctr").unwrap();
        assert!(is_mount(&a), "parked");
        assert!(d.put("ctr").is_err(), "put without get is refused");
        // The settler unmounts a mount parked too long.
        d.keep_parked_for(std::time::Duration::ZERO);
        while d.settle_step() {}
        assert!(!is_mount(&a) && !is_mount(&dir), "parked mounts expire");
        d.keep_parked_for(thinlayer_docker::graphdriver::PARK_IDLE);

        // Docker's create: an init layer on the image, written and put
        // (unmounted: never mounted again), the container's layer on it,
        // mounted at once for the get that follows (and kept parked by
        // its put for the start's get).
        let before = s.used_data_blocks();
        d.create_read_write("c1-init", Some("app")).unwrap();
        let init = d.get("c1-init").unwrap();
        docker_init(&init);
        d.put("c1-init").unwrap();
        let plain = s.used_data_blocks() - before;
        println!("c1-init: {plain} pool blocks");
        assert!(!is_mount(&init), "an init layer's last put unmounts");
        d.create_read_write("c1", Some("c1-init")).unwrap();
        assert!(
            d.has_urgent(),
            "the container layer is to be mounted at once"
        );
        d.urgent_step();
        let c1 = d.mountpoint("c1").join("rootfs");
        assert!(is_mount(&c1), "mounted before its get");
        assert_eq!(d.get("c1").unwrap(), c1);
        assert!(c1.join(".dockerenv").exists() && c1.join("etc/os").exists());
        d.put("c1").unwrap();
        assert!(is_mount(&c1), "parked for the start");
        // The settler makes `app`'s init template from `c1-init`: Docker
        // had finished it, since a container layer was made on it. That
        // never waits for a quieter machine (a `docker run --rm` removes
        // the init layer as soon as its container exits); the rest
        // (tearing down the device `put` left up, the template's spares)
        // waits while other processes keep the machine busy, `QUIET_WAIT`
        // at most before each step.
        assert_eq!(d.settle_step_when(true), Left::More);
        assert!(
            d.exists("app-init-template").unwrap(),
            "the template is made on a busy machine"
        );
        let spares = s.json(&["pool", "status"])["spares"].clone();
        assert_eq!(
            d.settle_step_when(true),
            Left::WhenQuiet,
            "tidying waits on a busy machine"
        );
        assert_eq!(d.settle_step_when(true), Left::WhenQuiet);
        assert_eq!(s.json(&["pool", "status"])["spares"], spares);
        std::thread::sleep(QUIET_WAIT);
        assert_eq!(
            d.settle_step_when(true),
            Left::More,
            "one step once it waited long enough"
        );
        assert_eq!(d.settle_step_when(true), Left::WhenQuiet, "the next waits");
        while d.settle_step() {}
        assert!(d.exists("app-init-template").unwrap() && is_mount(&c1));
        // A restarted driver unmounts what a previous run parked.
        drop(d);
        let mut d = ThinDriver::new(&s.root).unwrap();
        assert!(!is_mount(&c1), "a new driver unmounts parked mounts");
        let _ = d.get("c1").unwrap();
        d.put("c1").unwrap();
        // The remove of a parked layer a process still works in is refused
        // before its filesystem is shut down: it stays whole and writable.
        let held = fs::File::open(c1.join("etc/os")).unwrap();
        let busy = d.remove("c1").unwrap_err().to_string();
        assert!(busy.contains("fuser"), "{busy}");
        fs::write(c1.join("after-busy"), "kept\n").unwrap();
        assert!(d.exists("c1").unwrap() && is_mount(&c1));
        drop(held);
        // A bind of it elsewhere keeps the filesystem whole: the remove
        // unmounts the driver's mount only, and refuses.
        let bind = s.root.join("bind-c1");
        fs::create_dir(&bind).unwrap();
        let bound = std::process::Command::new("mount")
            .arg("--bind")
            .args([&c1, &bind])
            .status()
            .unwrap();
        assert!(bound.success());
        assert!(
            d.remove("c1").is_err(),
            "a mount elsewhere refuses the remove"
        );
        fs::write(bind.join("after-bind"), "kept\n").unwrap();
        assert_eq!(
            fs::read_to_string(bind.join("after-busy")).unwrap(),
            "kept\n"
        );
        let unbound = std::process::Command::new("umount")
            .arg(&bind)
            .status()
            .unwrap();
        assert!(unbound.success() && d.exists("c1").unwrap());
        let _ = d.get("c1").unwrap();
        // 8 MiB the kernel has not written back yet (delayed allocation:
        // no pool block is allocated for them until it does).
        fs::write(c1.join("dirty"), vec![3u8; 8 << 20]).unwrap();
        d.put("c1").unwrap();
        let thin = d
            .metadata("c1")
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == "ThinId")
            .unwrap()
            .1;
        let device = dm_devices()
            .into_iter()
            .find(|n| n.ends_with(&format!("-thin-{thin}")))
            .expect("a parked layer's device is up");
        // What its container read (see the template's spare below).
        assert_eq!(fs::read(c1.join("etc/os")).unwrap(), b"base\n");
        let before = s.used_data_blocks();
        // A remove takes a parked layer's filesystem out of the tree at
        // once; the settler's first step finishes the unmount, shut down
        // first: nothing is written back (the shutdown itself copies the
        // journal's superblock block), and the layers it was made from
        // are untouched.
        d.remove("c1").unwrap();
        assert!(!is_mount(&c1) && !d.exists("c1").unwrap());
        assert!(
            dm_devices().contains(&device),
            "the detached filesystem holds its device until the settler runs"
        );
        assert!(d.settle_step(), "the trashed thin id is still to reclaim");
        let after = s.used_data_blocks();
        assert!(
            after <= before + 2,
            "the unmount wrote the removed layer back: {before} -> {after} pool blocks"
        );
        while d.settle_step() {}
        assert!(
            !dm_devices().contains(&device),
            "the settler tears the removed layer's device down"
        );
        // The init layers of the next containers on `app` start with
        // what Docker wrote in `c1-init`: Docker still unlinks its files
        // and makes them again, but finds its directories there.
        let learnt = summary(&d.changes("c1-init", Some("app")).unwrap());
        assert!(
            learnt.contains(&"Added .dockerenv".to_owned()),
            "{learnt:?}"
        );
        d.remove("c1-init").unwrap();
        let status = d.status().unwrap();
        let layers = status.iter().find(|(k, _)| k == "Docker Layers");
        assert_eq!(
            layers.map(|(_, v)| v.as_str()),
            Some("3"),
            "the template is not Docker's: {status:?}"
        );
        // The settler made the template one spare, kept mounted (for a
        // container's layer: init layers share the template).
        let spares = |s: &common::Scratch| s.json(&["pool", "status"])["spares"].clone();
        let kept = spares(s);
        assert_eq!(kept.as_array().map(Vec::len), Some(1), "{kept}");
        assert_eq!(s.spare_mounts().len(), 1, "{kept}");
        // What c1's container read was learned as c1 went, and the spare
        // mounted for the next container's layer has read it ahead: it is
        // in the spare's page cache; `big`, which no container read, is
        // not.
        let mut cached = thinlayer_image::HotSet::default();
        {
            // Closed at once: the spare becomes a container's layer next.
            let spare = fs::File::open(&s.spare_mounts()[0]).unwrap();
            cached
                .learn(spare.as_fd(), thinlayer_image::Limits::default())
                .unwrap();
        }
        let cached: Vec<&Path> = cached.paths().collect();
        assert!(cached.contains(&Path::new("rootfs/etc/os")), "{cached:?}");
        assert!(!cached.contains(&Path::new("rootfs/big")), "{cached:?}");
        for init in ["c2-init", "c3-init"] {
            let before = s.used_data_blocks();
            // It shares the template (a record: no pool layer, no spare
            // taken), got through an overlay on it: Docker's init code
            // finds its files there and writes into a private upper
            // directory.
            let had = spares(s);
            d.create_read_write(init, Some("app")).unwrap();
            assert_eq!(spares(s), had, "{init} took no spare");
            let layers: Vec<String> = s.layer_ids();
            assert!(!layers.contains(&format!("docker-{init}")), "{layers:?}");
            assert!(
                d.metadata(init)
                    .unwrap()
                    .contains(&("SharesTemplate".to_owned(), "true".to_owned()))
            );
            let tree = d.get(init).unwrap();
            assert!(is_mount(&tree));
            let found = fs::symlink_metadata(tree.join(".dockerenv")).unwrap();
            assert!(found.is_file() && found.len() == 0, "the template's file");
            docker_init(&tree);
            if init == "c3-init" {
                // A restarted driver keeps an overlay a reference holds,
                // and the init layers that share the template.
                drop(d);
                d = ThinDriver::new(&s.root).unwrap();
                assert!(is_mount(&tree), "an overlay in use survives a restart");
                assert!(d.exists("c2-init").unwrap() && d.exists("c3-init").unwrap());
            }
            d.put(init).unwrap();
            assert!(
                is_mount(&tree),
                "{init}: its put leaves the unmount to the settler"
            );
            if init == "c2-init" {
                // A get before the settler has run takes it again as it
                // is; the next put compares again.
                assert_eq!(d.get(init).unwrap(), tree);
                docker_init(&tree);
                d.put(init).unwrap();
            }
            // The settler's first step unmounts it.
            d.settle_step();
            assert!(!is_mount(&tree), "{init}: the settler unmounts its overlay");
            let copied = s.used_data_blocks() - before;
            println!("{init}: {copied} pool blocks");
            // What Docker wrote is the template's: the put compares and
            // writes nothing.
            assert_eq!(
                copied, 0,
                "{init} took {copied} pool blocks, the first init layer {plain}"
            );
            assert_eq!(
                summary(&d.changes(init, Some("app")).unwrap()),
                learnt,
                "{init} against its image, as the first init layer"
            );
        }
        // The container's layer on an init layer that shares the template
        // is a snapshot of the template, the same tree: it takes the spare
        // the template keeps mounted, so its mount is a move, and the
        // settler makes the next spare.
        d.create_read_write("c3", Some("c3-init")).unwrap();
        d.urgent_step();
        assert!(
            s.spare_mounts().is_empty(),
            "c3 took the template's spare: its mount moved"
        );
        let c3 = d.get("c3").unwrap();
        assert!(c3.join(".dockerenv").exists() && c3.join("etc/os").exists());
        assert!(
            d.changes("c3", Some("c3-init")).unwrap().is_empty(),
            "c3 is its init layer's tree"
        );
        fs::write(c3.join("own"), "c3's\n").unwrap();
        d.put("c3").unwrap();
        while d.settle_step() {}
        let kept = spares(s);
        assert_eq!(kept.as_array().map(Vec::len), Some(1), "{kept}");
        assert_eq!(s.spare_mounts().len(), 1, "the template's next spare");
        // `docker commit` of a stopped container: one get, then the Diff.
        // It reads c3's own mount and the template's (c3-init shares it):
        // no snapshot. While it streams, a put parks the mount and the
        // settler leaves it, and the layer and its template stay.
        assert_eq!(d.get("c3").unwrap(), c3);
        let diff = d.begin_diff("c3", Some("c3-init")).unwrap();
        assert!(
            !d.exists(".stream-0").unwrap(),
            "a Diff of a layer with one reference takes no snapshot"
        );
        d.put("c3").unwrap();
        d.keep_parked_for(std::time::Duration::ZERO);
        while d.settle_step() {}
        assert!(is_mount(&c3), "a mount a Diff reads is not unmounted");
        for id in ["c3", "app"] {
            let refused = d.remove(id).unwrap_err().to_string();
            assert!(refused.contains("Diff"), "{id}: {refused}");
        }
        assert_eq!(d.forget_templates().unwrap(), 0, "a template read is kept");
        let mut held = Vec::new();
        let diff_id = diff.run(&mut held, Hashing::Sha256).unwrap().diff_id;
        assert!(diff_id.starts_with("sha256:"), "{diff_id}");
        d.end_diff(diff);
        while d.settle_step() {}
        assert!(!is_mount(&c3), "parked again, then unmounted");
        d.keep_parked_for(thinlayer_docker::graphdriver::PARK_IDLE);
        // The same Diff from a snapshot of c3 (two references: a running
        // container's) gives the same bytes (unhashed, as the plugin sends
        // them: Docker hashes). c3-init, got and put again with nothing
        // written, still shares the template.
        let _ = d.get("c3").unwrap();
        let _ = d.get("c3").unwrap();
        let _ = d.get("c3-init").unwrap();
        d.put("c3-init").unwrap();
        let diff = d.begin_diff("c3", Some("c3-init")).unwrap();
        assert!(d.exists(".stream-0").unwrap() && !d.exists(".stream-1").unwrap());
        let mut snapped = Vec::new();
        assert_eq!(diff.run(&mut snapped, Hashing::Skip).unwrap().diff_id, "");
        d.end_diff(diff);
        assert!(held == snapped, "the two Diffs differ");
        d.put("c3").unwrap();
        d.put("c3").unwrap();
        // An init code that writes something else (another dockerd): the
        // put gives the layer a device of its own and writes the
        // difference into it.
        d.create_read_write("c4-init", Some("app")).unwrap();
        let tree = d.get("c4-init").unwrap();
        docker_init(&tree);
        fs::write(tree.join("etc/extra"), "not the template's\n").unwrap();
        fs::remove_file(tree.join("etc/os")).unwrap();
        d.put("c4-init").unwrap();
        assert!(!is_mount(&tree));
        let layers: Vec<String> = s.layer_ids();
        assert!(layers.contains(&"docker-c4-init".to_owned()), "{layers:?}");
        let other = summary(&d.changes("c4-init", Some("app")).unwrap());
        for want in learnt
            .iter()
            .map(String::as_str)
            .chain(["Added etc/extra", "Deleted etc/os"])
        {
            assert!(
                other.iter().any(|c| c == want),
                "{want} missing from {other:?}"
            );
        }
        d.create_read_write("c4", Some("c4-init")).unwrap();
        let c4 = d.get("c4").unwrap();
        assert_eq!(
            fs::read_to_string(c4.join("etc/extra")).unwrap(),
            "not the template's\n"
        );
        assert!(!c4.join("etc/os").exists() && c4.join(".dockerenv").exists());
        d.put("c4").unwrap();
        // A dockerd start forgets the templates, but not one an overlay
        // still stands on (the create of a dockerd that crashed), init
        // layers share or containers' layers were made from.
        d.create_read_write("c5-init", Some("app")).unwrap();
        let c5 = d.get("c5-init").unwrap();
        assert_eq!(d.forget_templates().unwrap(), 0);
        assert!(d.exists("app-init-template").unwrap() && is_mount(&c5));
        d.put("c5-init").unwrap();
        assert_eq!(d.forget_templates().unwrap(), 0);
        assert!(d.exists("app-init-template").unwrap());
        d.create_read_write("c2", Some("c2-init")).unwrap();
        let c2 = d.get("c2").unwrap();
        assert!(c2.join(".dockerenv").exists() && c2.join("etc/os").exists());
        d.put("c2").unwrap();
        // A shared init layer's record is not written durably: a host
        // crash may lose it (c3-init) or tear it (c2-init). The next start
        // writes both again from their containers' layers; c5-init, whose
        // container's layer was never made, keeps its record.
        drop(d);
        let inits = s.root.join("graphdriver/inits");
        fs::remove_file(inits.join("c3-init")).unwrap();
        fs::write(
            inits.join("c2-init"),
            "thinlayer-record 1 graphdriver-init len=40",
        )
        .unwrap();
        d = ThinDriver::new(&s.root).unwrap();
        for init in ["c2-init", "c3-init", "c5-init"] {
            assert!(d.exists(init).unwrap(), "{init} after a host crash");
            assert!(
                d.metadata(init)
                    .unwrap()
                    .contains(&("SharesTemplate".to_owned(), "true".to_owned())),
                "{init} shares the template again"
            );
        }
        assert_eq!(
            d.changes("c3", Some("c3-init")).unwrap().len(),
            1,
            "c3 against its restored init layer: its own file"
        );
        let refused = d.remove("app").unwrap_err().to_string();
        assert!(
            refused.contains("c2-init, c3-init, c4-init") && !refused.contains("template"),
            "the children named are Docker's: {refused}"
        );
        let refused = d.remove("c2-init").unwrap_err().to_string();
        assert!(refused.contains("(c2)"), "{refused}");
        for id in ["c2", "c2-init", "c3", "c3-init", "c4", "c4-init", "c5-init"] {
            d.remove(id).unwrap();
        }
        while d.settle_step() {}
        assert_eq!(d.forget_templates().unwrap(), 1, "nothing uses it now");
        assert!(!d.exists("app-init-template").unwrap() && !d.exists("c5-init").unwrap());
        let app = d.get("app").unwrap();
        assert_eq!(fs::read_to_string(app.join("etc/os")).unwrap(), "base\n");
        d.put("app").unwrap();

        // exists / remove rules.
        assert!(d.exists("ctr").unwrap() && !d.exists("nope").unwrap());
        assert!(
            d.remove("base").is_err(),
            "a layer with children is not removed"
        );
        let _ = d.get("app").unwrap();
        assert!(
            d.remove("app").is_err(),
            "a referenced layer is not removed"
        );
        d.put("app").unwrap();

        // changes / diff-size / diff.
        let changes = d.changes("ctr", Some("app")).unwrap();
        let listed = summary(&changes);
        println!("changes: {listed:?}");
        for (kind, path) in [
            (ChangeKind::Modified, "etc/os"),
            (ChangeKind::Deleted, "etc/gone"),
            (ChangeKind::Added, "added"),
        ] {
            assert!(
                changes
                    .iter()
                    .any(|c| c.kind == kind && c.path == Path::new(path)),
                "{kind:?} {path} missing from {listed:?}"
            );
        }
        assert!(
            !changes.iter().any(|c| c.path == Path::new("big")),
            "untouched file reported"
        );
        let size = d.diff_size("ctr", Some("app")).unwrap();
        assert_eq!(
            size,
            5000 + "changed in ctr\n".len() as u64,
            "diff size counts the changed content"
        );
        assert!(
            d.changes("ctr", Some("base")).is_err(),
            "wrong parent refused"
        );
        let mut tarball = Vec::new();
        let diff_id = d.diff("ctr", Some("app"), &mut tarball).unwrap();
        assert!(diff_id.starts_with("sha256:") && !tarball.is_empty());

        // apply-diff into a fresh layer on the same parent gives the same tree.
        d.create("copy", Some("app")).unwrap();
        let applied = d
            .apply_diff("copy", Some("app"), &mut &tarball[..])
            .unwrap();
        assert_eq!(
            applied,
            5000 + "changed in ctr\n".len() as u64,
            "apply_diff reports the file content it wrote"
        );
        let (x, y) = (d.get("ctr").unwrap(), d.get("copy").unwrap());
        let (mx, my) = (tree::manifest(&x).unwrap(), tree::manifest(&y).unwrap());
        let mut diffs = tree::differences(&mx, &my, 10);
        diffs.retain(|l| !l.starts_with(". ") && !l.starts_with(".:"));
        assert!(diffs.is_empty(), "apply_diff(diff) differs: {diffs:?}");
        let mut second = Vec::new();
        assert_eq!(
            d.diff("copy", Some("app"), &mut second).unwrap(),
            diff_id,
            "same changes, same diff_id"
        );

        // status, cleanup.
        let status = d.status().unwrap();
        assert!(
            status.iter().any(|(k, _)| k == "Data Space Used"),
            "{status:?}"
        );
        d.cleanup().unwrap();
        assert!(
            !is_mount(&x) && !is_mount(&y),
            "cleanup unmounts everything"
        );
        // A remove is answered before its records leave the pool (the
        // settler's first step takes them out); a driver stopped before
        // that finishes the removal at its next start.
        let in_pool = |id: &str| {
            s.json(&["layer", "ls"])
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["id"] == format!("docker-{id}"))
        };
        d.remove("copy").unwrap();
        assert!(in_pool("copy"), "the answer waits for no record write");
        assert!(
            d.remove("copy")
                .unwrap_err()
                .to_string()
                .contains("removed already"),
            "removed once"
        );
        drop(d);
        let mut d = ThinDriver::new(&s.root).unwrap();
        assert!(!in_pool("copy"), "a restarted driver finishes the removal");
        for id in ["ctr", "app", "base"] {
            d.remove(id).unwrap();
            assert!(!d.exists(id).unwrap());
        }
        assert!(
            !d.exists("app-init-template").unwrap(),
            "an image layer's removal takes its template with it"
        );
    });
}
