//! dm-thin behaviour against the real kernel. Every test here is named
//! `vm_*`: the host run skips them, `tools/test` runs them serially inside
//! the VM (`tools/vm/run`), where none may skip.

mod common;

use common::{
    MIB, Pool, Scratch, dm_devices, loop_backing_files, pattern, sh, swept, vm_test, write_file,
};

use std::{
    fs::{self, OpenOptions},
    io::{Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
};

/// Everything a failed command must leave as it was.
fn state(s: &Scratch) -> String {
    let mut st = s.json(&["pool", "status"]);
    st["warnings"] = serde_json::Value::Null;
    let layers = s.json(&["layer", "ls"]);
    let mut files: Vec<String> = walk(&s.root);
    files.sort();
    format!("{st}\n{layers}\n{files:?}\n{:?}", dm_devices())
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p.ends_with("lock") {
            let m = e.metadata().unwrap();
            out.push(format!(
                "{} {}",
                p.display(),
                if p.extension().is_some_and(|x| x == "rec") {
                    m.len()
                } else {
                    0
                }
            ));
        }
    }
    out
}

#[test]
fn vm_pool_create_formats_the_base_and_reports_kernel_status() {
    vm_test("create", Pool::None, |s| {
        let out = s.ok(&["pool", "create", "--data-size", "1G", "--base-size", "256M"]);
        assert!(out.contains("created pool"), "{out}");
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["active"], true);
        assert_eq!(st["block_size_bytes"], 65536);
        assert_eq!(st["kernel"]["data_total_blocks"], 16384, "1G of 64K blocks");
        assert_eq!(st["kernel"]["error_if_no_space"], true);
        assert_eq!(st["kernel"]["transaction_id"], st["transaction_id"]);
        assert_eq!(
            st["kernel"]["active_thin_devices"], 0,
            "the base is torn down after mkfs"
        );
        let used = st["kernel"]["data_used_blocks"].as_u64().unwrap();
        assert!(
            used > 0 && used < 200,
            "mkfs of a lazy ext4 wrote {used} blocks"
        );
        // Data and metadata files are sparse.
        let data = fs::metadata(s.root.join("data.img")).unwrap();
        assert_eq!(data.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(data.blocks() * 512 < 64 << 20, "data file is sparse");

        // A layer of the base sees a formatted ext4 filesystem.
        s.ok(&["layer", "create", "l1"]);
        let d = s.mount("l1");
        assert!(d.join("lost+found").is_dir(), "base device holds ext4");
        let ls = s.json(&["layer", "ls"]);
        let dev = ls[0]["devnode"].as_str().unwrap().to_owned();
        let mut sb = [0u8; 2];
        fs::File::open(&dev)
            .unwrap()
            .read_exact_at(&mut sb, 1024 + 56)
            .unwrap();
        assert_eq!(
            u16::from_le_bytes(sb),
            0xEF53,
            "ext4 superblock magic on {dev}"
        );
        assert_eq!(ls[0]["mountpoints"][0], d.to_str().unwrap());
        s.ok(&["umount", "l1"]);
        assert_eq!(
            s.json(&["layer", "ls"])[0]["devnode"],
            serde_json::Value::Null
        );
    });
}

#[test]
fn vm_layer_chain_of_three_shares_parent_files_and_cow_keeps_parents() {
    vm_test("chain", Pool::Small, |s| {
        s.ok(&["layer", "create", "l1"]);
        let d1 = s.mount("l1");
        let big = pattern(1, 8 * MIB);
        write_file(&d1.join("big"), &big);
        write_file(&d1.join("small"), b"from l1");
        s.ok(&["umount", "l1"]);
        s.ok(&["layer", "create", "l2", "--parent", "l1"]);
        let d2 = s.mount("l2");
        write_file(&d2.join("small"), b"from l2");
        write_file(&d2.join("only-l2"), b"l2 file");
        s.ok(&["umount", d2.to_str().unwrap()]);
        s.ok(&["layer", "create", "l3", "--parent", "l2"]);
        let d3 = s.mount("l3");
        assert_eq!(fs::read(d3.join("big")).unwrap(), big, "l3 sees l1's file");
        assert_eq!(
            fs::read(d3.join("small")).unwrap(),
            b"from l2",
            "l3 sees l2's change"
        );
        assert_eq!(fs::read(d3.join("only-l2")).unwrap(), b"l2 file");
        // Write into the child: overwrite 4K in the middle of the big file.
        let f = OpenOptions::new().write(true).open(d3.join("big")).unwrap();
        f.write_all_at(&[0xAB; 4096], 4 * MIB as u64).unwrap();
        f.sync_all().unwrap();
        drop(f);
        write_file(&d3.join("small"), b"from l3");
        s.ok(&["umount", "l3"]);

        // The parents' bytes are unchanged, read back from their devices.
        let r1 = s.dir("l1-ro");
        s.ok(&["mount", "l1", r1.to_str().unwrap(), "--readonly"]);
        assert_eq!(
            fs::read(r1.join("big")).unwrap(),
            big,
            "l1 unchanged by l3's write"
        );
        assert_eq!(fs::read(r1.join("small")).unwrap(), b"from l1");
        assert!(!r1.join("only-l2").exists());
        s.ok(&["umount", "l1"]);
        let d2 = s.mount("l2");
        assert_eq!(
            fs::read(d2.join("big")).unwrap(),
            big,
            "l2 unchanged by l3's write"
        );
        assert_eq!(fs::read(d2.join("small")).unwrap(), b"from l2");
        s.ok(&["umount", "l2"]);
        let d3 = s.mount("l3");
        let mut changed = big.clone();
        changed[4 * MIB..4 * MIB + 4096].fill(0xAB);
        assert_eq!(
            fs::read(d3.join("big")).unwrap(),
            changed,
            "l3 keeps its write"
        );
        assert_eq!(fs::read(d3.join("small")).unwrap(), b"from l3");
        s.ok(&["umount", "l3"]);
    });
}

/// The physical byte offset of `file`'s block `n` on its ext4 device.
fn ext4_offset(dev: &str, file: &str, n: u64) -> u64 {
    let out = sh("debugfs", &["-R", &format!("bmap /{file} {n}"), dev]);
    let block: u64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("debugfs bmap said {out:?}"));
    assert!(block > 0, "block {n} of {file} is mapped");
    block * 4096
}

#[test]
fn vm_a_4k_write_into_a_child_allocates_one_pool_block_not_the_file() {
    vm_test("cow", Pool::Small, |s| {
        s.ok(&["layer", "create", "l1"]);
        let d1 = s.mount("l1");
        let before_file = s.used_data_blocks();
        write_file(&d1.join("big"), &pattern(7, 64 * MIB));
        let dev1 = s.json(&["layer", "ls"])[0]["devnode"]
            .as_str()
            .unwrap()
            .to_owned();
        s.ok(&["umount", "l1"]);
        let file_blocks = s.used_data_blocks() - before_file;
        assert!(
            file_blocks >= 1024,
            "64 MiB took {file_blocks} blocks of 64K"
        );

        s.ok(&["layer", "create", "l2", "--parent", "l1"]);
        // Find where block 300 of the file lives (same offset in the snapshot).
        let d2 = s.mount("l2");
        let dev2 = s.json(&["layer", "ls"])[1]["devnode"]
            .as_str()
            .unwrap()
            .to_owned();
        let offset = ext4_offset(&dev2, "big", 300);
        let _ = dev1;
        // Leave the device active but unmounted, then write 4 KiB straight to it.
        sh("umount", &[d2.to_str().unwrap()]);
        let before = s.used_data_blocks();
        let f = OpenOptions::new().write(true).open(&dev2).unwrap();
        f.write_all_at(&[0x5A; 4096], offset).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let after = s.used_data_blocks();
        println!(
            "raw 4 KiB write into the child: {} pool block(s) (the file holds {file_blocks})",
            after - before
        );
        assert_eq!(
            after - before,
            1,
            "a 4 KiB write breaks sharing of exactly one 64K block"
        );
        s.ok(&["umount", "l2"]);

        // Through the filesystem, journal and inode updates add a few blocks;
        // still nowhere near a copy of the file.
        let d2 = s.mount("l2");
        let before = s.used_data_blocks();
        let mut f = OpenOptions::new().write(true).open(d2.join("big")).unwrap();
        f.seek(SeekFrom::Start(40 * MIB as u64)).unwrap();
        f.write_all(&[0x77; 4096]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        s.ok(&["umount", "l2"]);
        let through_fs = s.used_data_blocks() - before;
        println!("4 KiB write through ext4 into the child: {through_fs} pool block(s)");
        assert!(
            (1..=16).contains(&through_fs),
            "{through_fs} blocks for a 4 KiB write"
        );

        // The parent still reads its original bytes at both places.
        let d1 = s.mount("l1");
        let mut got = vec![0u8; 4096];
        let f = fs::File::open(d1.join("big")).unwrap();
        let want = pattern(7, 64 * MIB);
        f.read_exact_at(&mut got, 300 * 4096).unwrap();
        assert_eq!(got, want[300 * 4096..301 * 4096]);
        f.read_exact_at(&mut got, 40 * MIB as u64).unwrap();
        assert_eq!(got, want[40 * MIB..40 * MIB + 4096]);
        drop(f);
        s.ok(&["umount", "l1"]);
    });
}

#[test]
fn vm_deactivate_then_activate_restores_every_layer_and_metadata_checks_clean() {
    vm_test("reboot", Pool::Small, |s| {
        let mut want = Vec::new();
        let mut parent: Option<String> = None;
        for i in 0..3u64 {
            let id = format!("l{i}");
            let mut args = vec!["layer", "create", id.as_str()];
            if let Some(p) = &parent {
                args.extend(["--parent", p.as_str()]);
            }
            s.ok(&args);
            let d = s.mount(&id);
            let data = pattern(100 + i, MIB + 123);
            write_file(&d.join(format!("f{i}")), &data);
            want.push((format!("f{i}"), data));
            s.ok(&["umount", &id]);
            parent = Some(id);
        }
        let used = s.used_data_blocks();
        let t = s.json(&["pool", "status"])["transaction_id"].clone();

        // Mounted layers stop a deactivate, and nothing changes.
        s.mount("l1");
        s.fails(&["pool", "deactivate"], 4, "unmount it first");
        s.ok(&["umount", "l1"]);

        s.ok(&["pool", "deactivate"]);
        assert!(pool_devices_gone(s), "dm devices left: {:?}", dm_devices());
        let files = loop_backing_files();
        assert!(
            !files.iter().any(|f| f.starts_with(&s.root)),
            "loop devices left on the pool files: {files:?}"
        );
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["active"], false);
        let again = s.ok(&["pool", "deactivate"]);
        assert!(again.contains("no action taken"), "{again}");

        // thin_check on the metadata, through a read-only loop device.
        let meta = s.root.join("metadata.img");
        let lp = sh(
            "/usr/sbin/losetup",
            &["-f", "--show", "-r", meta.to_str().unwrap()],
        );
        let lp = lp.trim();
        let check = Command::new("thin_check").arg(lp).output().unwrap();
        sh("/usr/sbin/losetup", &["-d", lp]);
        assert!(
            check.status.success(),
            "thin_check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        s.ok(&["pool", "activate"]);
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["transaction_id"], t);
        assert_eq!(st["kernel"]["transaction_id"], t);
        assert_eq!(s.used_data_blocks(), used);
        let d = s.mount("l2");
        for (name, data) in &want {
            assert_eq!(
                &fs::read(d.join(name)).unwrap(),
                data,
                "{name} after reactivation"
            );
        }
        s.ok(&["umount", "l2"]);
        let again = s.ok(&["pool", "activate"]);
        assert!(again.contains("no action taken"), "{again}");
    });
}

fn pool_devices_gone(s: &Scratch) -> bool {
    let rec = fs::read_to_string(s.root.join("pool.rec")).unwrap();
    let id = rec.split("\"pool_id\": \"").nth(1).unwrap()[..8].to_owned();
    !dm_devices().iter().any(|n| n.contains(&id))
}

#[test]
fn vm_bad_inputs_get_their_error_and_change_nothing() {
    vm_test("bad", Pool::Small, |s| {
        s.ok(&["layer", "create", "parent"]);
        s.ok(&["layer", "create", "child", "--parent", "parent"]);
        let m = s.mount("child");
        let before = state(s);

        s.fails(&["pool", "create"], 4, "already exists");
        s.fails(&["layer", "create", "../evil"], 2, "layer id");
        s.fails(&["layer", "create", "bad name"], 2, "layer id");
        s.fails(&["layer", "create", "parent"], 4, "already exists");
        s.fails(
            &["layer", "create", "x", "--parent", "nope"],
            3,
            "no layer `nope`",
        );
        s.fails(&["layer", "rm", "nope"], 3, "no layer `nope`");
        s.fails(&["layer", "rm", "parent"], 4, "has children (child)");
        s.fails(&["layer", "rm", "child"], 4, "is mounted at");
        s.fails(
            &["mount", "nope", s.dir("n").to_str().unwrap()],
            3,
            "no layer",
        );
        s.fails(&["umount", "/"], 2, "not a layer of this pool");
        assert_eq!(state(s), before, "a refused command changed something");

        // Not root: refused before anything, with exit code 5.
        use std::os::unix::process::CommandExt;
        let out = Command::new(common::bin())
            .uid(65534)
            .gid(65534)
            .arg("--root")
            .arg(&s.root)
            .args(["layer", "create", "x"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "not root: {err}");
        assert!(err.contains("must run as root"), "{err}");
        assert_eq!(state(s), before);

        // A second pool create on a fresh root with bad sizes creates nothing.
        let other = Scratch::new("bad-other");
        other.fails(&["pool", "create", "--data-size", "10Q"], 2, "unknown unit");
        assert!(!other.root.exists());
        drop(other);

        s.ok(&["umount", m.to_str().unwrap()]);
        s.ok(&["layer", "rm", "child"]);
        s.ok(&["layer", "rm", "parent"]);
        assert_eq!(s.json(&["layer", "ls"]), serde_json::json!([]));
    });
}

#[test]
fn vm_removing_layers_returns_their_blocks_and_ids_are_not_reused() {
    vm_test("rm", Pool::Small, |s| {
        let base = s.used_data_blocks();
        s.ok(&["layer", "create", "a"]);
        let d = s.mount("a");
        write_file(&d.join("f"), &pattern(3, 16 * MIB));
        s.ok(&["umount", "a"]);
        assert!(s.used_data_blocks() >= base + 256);
        let a_id = s.json(&["layer", "ls"])[0]["thin_id"].as_u64().unwrap();
        s.ok(&["layer", "rm", "a"]);
        let after = s.used_data_blocks();
        assert!(
            after <= base + 2,
            "blocks back to the pool: {base} -> {after}"
        );
        s.ok(&["layer", "create", "b"]);
        let b_id = s.json(&["layer", "ls"])[0]["thin_id"].as_u64().unwrap();
        assert!(b_id > a_id, "thin id {a_id} reused as {b_id}");

        // For later: the record goes at once (the name is free again), the
        // blocks stay until `pool reclaim`, which gives them back to the pool
        // and the host.
        use std::os::unix::fs::MetadataExt;
        let host = || fs::metadata(s.root.join("data.img")).unwrap().blocks() * 512;
        let d = s.mount("b");
        write_file(&d.join("f"), &pattern(4, 16 * MIB));
        s.ok(&["umount", "b"]);
        let (full, full_host) = (s.used_data_blocks(), host());
        let out = s.ok(&["layer", "rm", "b", "--later"]);
        assert!(out.contains("pool reclaim"), "{out}");
        assert_eq!(s.json(&["layer", "ls"]), serde_json::json!([]));
        assert_eq!(
            s.json(&["pool", "status"])["trash"][0]["thin_id"].as_u64(),
            Some(b_id)
        );
        assert_eq!(s.used_data_blocks(), full, "nothing freed yet");
        s.ok(&["pool", "check"]);
        s.ok(&["layer", "create", "b"]);
        let r = s.json(&["pool", "reclaim"]);
        assert_eq!(r["thin_ids"], 1, "{r}");
        let after = s.used_data_blocks();
        assert!(
            after + 256 <= full,
            "blocks back to the pool: {full} -> {after}"
        );
        assert!(
            host() + (16 << 20) <= full_host,
            "space back to the host: {full_host} -> {}",
            host()
        );
        assert_eq!(s.json(&["pool", "status"])["trash"], serde_json::json!([]));
        s.ok(&["pool", "check"]);
    });
}

#[test]
fn vm_xfs_pool_mounts_two_snapshots_of_one_origin_at_once() {
    vm_test("xfs", Pool::With(&["--fs", "xfs"]), |s| {
        s.ok(&["layer", "create", "img"]);
        let d = s.mount("img");
        write_file(&d.join("shared"), b"image content");
        s.ok(&["umount", "img"]);
        s.ok(&["layer", "create", "c1", "--parent", "img"]);
        s.ok(&["layer", "create", "c2", "--parent", "img"]);
        let (a, b) = (s.mount("c1"), s.mount("c2"));
        write_file(&a.join("shared"), b"c1 wrote");
        write_file(&b.join("shared"), b"c2 wrote");
        assert_eq!(fs::read(a.join("shared")).unwrap(), b"c1 wrote");
        assert_eq!(fs::read(b.join("shared")).unwrap(), b"c2 wrote");
        let fstypes = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            fstypes.contains(&format!("{} xfs", a.display())),
            "{fstypes}"
        );
        s.ok(&["umount", "c1"]);
        s.ok(&["umount", "c2"]);
    });
}

#[test]
fn vm_concurrent_layer_creates_all_succeed_with_distinct_thin_ids() {
    vm_test("concurrent", Pool::Small, |s| {
        let children: Vec<_> = (0..8)
            .map(|i| {
                Command::new(common::bin())
                    .arg("--root")
                    .arg(&s.root)
                    .args(["--wait", "layer", "create", &format!("c{i}")])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let ls = s.json(&["layer", "ls"]);
        let mut ids: Vec<u64> = ls
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["thin_id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 8);
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["kernel"]["transaction_id"], st["transaction_id"]);
        assert_eq!(st["layers"], 8);
        // Without --wait a lock held past the grace period is refused, not queued.
        let _lock = nix::fcntl::Flock::lock(
            fs::File::open(s.root.join("lock")).unwrap(),
            nix::fcntl::FlockArg::LockExclusive,
        )
        .unwrap();
        s.fails(&["layer", "create", "late"], 4, "--wait");
    });
}

/// The pool's spares as (parent, thin id), from `pool status`.
fn spares(s: &Scratch) -> Vec<(String, u64)> {
    s.json(&["pool", "status"])["spares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["parent"].as_str().unwrap_or("(base)").to_owned(),
                v["thin_id"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn thin_device_count(s: &Scratch) -> usize {
    let id = s.json(&["pool", "status"])["pool_id"]
        .as_str()
        .unwrap()
        .to_owned();
    dm_devices()
        .iter()
        .filter(|d| d.starts_with(&format!("tl1-{id}-thin-")))
        .count()
}

#[test]
fn vm_pool_spares_are_the_parent_as_it_is_and_cost_no_kernel_step_to_take() {
    vm_test("spares", Pool::Small, |s| {
        s.ok(&["layer", "create", "a"]);
        let d = s.mount("a");
        write_file(&d.join("v.txt"), b"one");
        s.ok(&["umount", "a"]);

        // Two spares: made, active, known to check.
        let out = s.ok(&["layer", "provision", "a", "--spares", "2"]);
        assert!(out.contains("2 made"), "{out}");
        let sp = spares(s);
        assert_eq!(sp.len(), 2, "{sp:?}");
        assert_eq!(thin_device_count(s), 2, "spares are active");
        s.ok(&["pool", "check"]);
        // Asking again changes nothing; asking for one drops one.
        assert!(
            s.ok(&["layer", "provision", "a", "--spares", "2"])
                .contains("2 kept")
        );

        // Taking one: the layer gets the oldest spare's thin id, and its
        // device is the one already active.
        let c1 = s.json(&["layer", "create", "c1", "--parent", "a"]);
        assert_eq!(c1["thin_id"].as_u64(), Some(sp[0].1), "took the spare");
        assert_eq!(spares(s), sp[1..].to_vec());
        let d1 = s.mount("c1");
        assert_eq!(fs::read(d1.join("v.txt")).unwrap(), b"one");
        write_file(&d1.join("own.txt"), b"c1's");
        s.ok(&["umount", "c1"]);
        s.ok(&["pool", "check"]);

        // A read-only mount of the parent keeps its spares, and more can be
        // made while it stands (nothing writes the parent); a read-write
        // one drops them (device and thin id), so a write is never missed,
        // and refuses more while it stands.
        let ro = s.dir("a-ro");
        s.ok(&["mount", "a", ro.to_str().unwrap(), "--readonly"]);
        s.ok(&["layer", "provision", "a", "--spares", "2"]);
        s.ok(&["umount", "a"]);
        assert_eq!(spares(s).len(), 2);
        // One made under the read-only mount is `a` as it is.
        s.ok(&["layer", "create", "c-ro", "--parent", "a"]);
        let dro = s.mount("c-ro");
        assert_eq!(fs::read(dro.join("v.txt")).unwrap(), b"one");
        s.ok(&["umount", "c-ro"]);
        s.ok(&["layer", "rm", "c-ro"]);
        assert_eq!(spares(s).len(), 1);
        let d = s.mount("a");
        assert!(spares(s).is_empty(), "a read-write mount drops the spares");
        s.fails(&["layer", "provision", "a", "--spares", "1"], 4, "umount");
        write_file(&d.join("v.txt"), b"two");
        s.ok(&["umount", "a"]);
        assert_eq!(thin_device_count(s), 0, "no device left behind");
        s.ok(&["pool", "check"]);
        s.ok(&["layer", "provision", "a"]);
        s.ok(&["layer", "create", "c2", "--parent", "a"]);
        let d2 = s.mount("c2");
        assert_eq!(
            fs::read(d2.join("v.txt")).unwrap(),
            b"two",
            "the new parent"
        );
        s.ok(&["umount", "c2"]);

        // Spares survive a deactivate (their devices do not) and come back
        // active when provisioned again; a spare of the base device too.
        s.ok(&["layer", "provision", "a"]);
        s.ok(&["layer", "provision", "--base", "--spares", "1"]);
        s.ok(&["pool", "deactivate"]);
        s.ok(&["pool", "activate"]);
        assert_eq!(spares(s).len(), 2);
        assert_eq!(thin_device_count(s), 0);
        s.ok(&["pool", "check"]);
        let out = s.ok(&["layer", "provision", "a"]);
        assert!(out.contains("1 kept"), "{out}");
        assert_eq!(thin_device_count(s), 1);
        let b = s.json(&["layer", "create", "b0"]);
        assert_eq!(b["parent"], serde_json::Value::Null);
        let db = s.mount("b0");
        assert!(
            db.join("lost+found").is_dir(),
            "the base spare holds the base fs"
        );
        s.ok(&["umount", "b0"]);

        // Removing the parent drops its spares; check stays clean.
        s.ok(&["layer", "rm", "c1"]);
        s.ok(&["layer", "rm", "c2"]);
        s.ok(&["layer", "rm", "a"]);
        assert!(spares(s).is_empty(), "{:?}", spares(s));
        assert_eq!(thin_device_count(s), 0);
        s.ok(&["pool", "check"]);
        s.fails(&["layer", "provision", "a"], 3, "a");
    });
}

/// Where `layer ls --json` says layer `id` is mounted.
fn mountpoints(s: &Scratch, id: &str) -> Vec<PathBuf> {
    s.json(&["layer", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == id)
        .unwrap_or_else(|| panic!("no layer {id}"))["mountpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect()
}

/// The id of the mount at `at` (the newest there), from mountinfo: a
/// moved mount keeps its id.
fn mount_id(at: &Path) -> Option<u64> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (Path::new(f[4]) == at).then(|| f[0].parse().unwrap())
        })
        .next_back()
}

#[test]
fn vm_pool_mounted_spares_are_taken_by_a_move() {
    vm_test("mounted-spares", Pool::Small, |s| {
        // Under a shared mount, as `/` is under systemd: the kernel moves
        // no mount whose parent is shared, which the spares' own private
        // tmpfs avoids.
        use nix::mount::{MntFlags, MsFlags, mount, umount2};
        let base = s.root.parent().unwrap().to_owned();
        mount(
            Some(&base),
            &base,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        mount(
            None::<&str>,
            &base,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap();

        s.ok(&["layer", "create", "a"]);
        let d = s.mount("a");
        write_file(&d.join("v.txt"), b"one");
        s.ok(&["umount", "a"]);

        // Two spares, made and mounted under ROOT/spares, only root's.
        let out = s.ok(&["layer", "provision", "a", "--count", "2", "--mounted"]);
        assert!(out.contains("2 made") && out.contains("2 mounted"), "{out}");
        let sp = spares(s);
        assert_eq!(sp.len(), 2, "{sp:?}");
        let dir = fs::canonicalize(&s.root).unwrap().join("spares");
        let want: Vec<PathBuf> = sp.iter().map(|(_, t)| dir.join(t.to_string())).collect();
        assert_eq!(s.spare_mounts(), want);
        assert_eq!(common::mode(&dir) & 0o777, 0o700, "only root enters");
        assert_eq!(fs::read(want[0].join("v.txt")).unwrap(), b"one");
        let ls = s.ok(&["layer", "ls"]);
        for w in &want {
            let w = w.display().to_string();
            assert!(
                ls.lines().any(|l| l.contains(" yes ") && l.ends_with(&w)),
                "layer ls shows {w} mounted: {ls}"
            );
        }
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["spare_cost"]["devices"], 2, "{st:#}");
        assert_eq!(st["spare_cost"]["mounts"], 2, "{st:#}");
        assert!(st["spare_cost"]["mapped_bytes"].as_u64().unwrap() > 0);
        assert!(
            st["spares"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["mounted"] == true)
        );
        assert!(s.ok(&["pool", "status"]).contains("2 mounted"));
        s.ok(&["pool", "check"]);
        let out = s.ok(&["layer", "provision", "a", "--spares", "2", "--mounted"]);
        assert!(out.contains("2 kept") && !out.contains("mounted"), "{out}");

        // Taking one: records only; the mount moves to the target.
        let c1 = s.json(&["layer", "create", "c1", "--parent", "a"]);
        assert_eq!(c1["thin_id"].as_u64(), Some(sp[0].1), "took the spare");
        assert_eq!(spares(s), sp[1..].to_vec());
        let spare_mount = mount_id(&want[0]).expect("the spare is mounted");
        let d1 = s.mount("c1");
        assert_eq!(s.spare_mounts(), want[1..].to_vec(), "its mount moved");
        assert_eq!(
            mount_id(&fs::canonicalize(&d1).unwrap()),
            Some(spare_mount),
            "the spare's very mount is at the target"
        );
        assert!(!want[0].exists(), "its directory is gone");
        assert_eq!(
            mountpoints(s, "c1"),
            vec![fs::canonicalize(&d1).unwrap()],
            "mounted once, at the target"
        );
        assert_eq!(fs::read(d1.join("v.txt")).unwrap(), b"one");
        write_file(&d1.join("own.txt"), b"c1's");
        s.ok(&["umount", "c1"]);
        assert_eq!(
            thin_device_count(s),
            1,
            "c1's device is down, one spare's up"
        );
        let ro = s.dir("a-ro");
        s.ok(&["mount", "a", ro.to_str().unwrap(), "--readonly"]);
        assert_eq!(fs::read(ro.join("v.txt")).unwrap(), b"one");
        assert!(!ro.join("own.txt").exists(), "the parent is unchanged");
        s.ok(&["umount", "a"]);
        let d1 = s.mount("c1");
        assert_eq!(fs::read(d1.join("own.txt")).unwrap(), b"c1's");
        s.ok(&["umount", "c1"]);

        // Other options: the spare's mount goes, the layer mounts as usual.
        s.ok(&["layer", "create", "c2", "--parent", "a"]);
        assert_eq!(s.spare_mounts(), want[1..].to_vec(), "c2's, from its spare");
        let ro2 = s.dir("c2-ro");
        s.ok(&["mount", "c2", ro2.to_str().unwrap(), "--readonly"]);
        assert!(s.spare_mounts().is_empty(), "{:?}", s.spare_mounts());
        assert_eq!(mountpoints(s, "c2"), vec![fs::canonicalize(&ro2).unwrap()]);
        assert_eq!(fs::read(ro2.join("v.txt")).unwrap(), b"one");
        s.ok(&["umount", "c2"]);

        // Taken, never mounted, removed: rm unmounts it.
        s.ok(&["layer", "provision", "a", "--mounted"]);
        s.ok(&["layer", "create", "c3", "--parent", "a"]);
        assert_eq!(s.spare_mounts().len(), 1, "c3's mount from its spare");
        s.ok(&["layer", "rm", "c3"]);
        assert!(s.spare_mounts().is_empty());
        assert_eq!(thin_device_count(s), 0);
        s.ok(&["pool", "check"]);

        // Deactivate unmounts spares (and a taken one) and keeps them
        // listed; provision mounts them again.
        s.ok(&["layer", "provision", "a", "--spares", "2", "--mounted"]);
        s.ok(&["layer", "create", "c4", "--parent", "a"]);
        s.ok(&["pool", "deactivate"]);
        assert!(s.spare_mounts().is_empty());
        assert!(
            !thinlayer_pool::mounts::all()
                .unwrap()
                .iter()
                .any(|m| m.mountpoint.starts_with(&dir)),
            "the spares' tmpfs is gone"
        );
        s.ok(&["pool", "activate"]);
        assert_eq!(spares(s).len(), 1);
        assert!(s.spare_mounts().is_empty());
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["spares"][0]["mounted"], true);
        assert_eq!(st["spare_cost"]["mounts"], 0);
        s.ok(&["pool", "check"]);
        let out = s.ok(&["layer", "provision", "a", "--mounted"]);
        assert!(out.contains("1 kept") && out.contains("1 mounted"), "{out}");
        assert_eq!(s.spare_mounts().len(), 1);
        let d4 = s.mount("c4");
        assert_eq!(fs::read(d4.join("v.txt")).unwrap(), b"one");
        s.ok(&["umount", "c4"]);

        // A write to the parent drops the rest, mounts and all.
        let d = s.mount("a");
        assert!(spares(s).is_empty(), "{:?}", spares(s));
        assert!(s.spare_mounts().is_empty());
        write_file(&d.join("v.txt"), b"two");
        s.ok(&["umount", "a"]);
        assert_eq!(thin_device_count(s), 0);
        s.ok(&["pool", "check"]);

        // Removing a parent drops its mounted spares.
        s.ok(&["layer", "create", "p2"]);
        s.ok(&["layer", "provision", "p2", "--spares", "2", "--mounted"]);
        assert_eq!(s.spare_mounts().len(), 2);
        s.ok(&["layer", "rm", "p2"]);
        assert!(s.spare_mounts().is_empty());
        assert!(spares(s).is_empty());
        assert_eq!(thin_device_count(s), 0);
        s.ok(&["pool", "check"]);

        // Destroy takes a mounted spare and the spares' tmpfs down too.
        s.ok(&["layer", "provision", "a", "--mounted"]);
        assert_eq!(s.spare_mounts().len(), 1);
        s.ok(&["pool", "destroy", "--force"]);
        let canon_base = fs::canonicalize(&base).unwrap();
        let under: Vec<PathBuf> = thinlayer_pool::mounts::all()
            .unwrap()
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|p| p.starts_with(&canon_base) && *p != canon_base)
            .collect();
        assert!(under.is_empty(), "destroy left mounts: {under:?}");
        umount2(&base, MntFlags::MNT_DETACH).unwrap();
    });
}

/// The harness's sweep (tests/common/vm.rs) removes what a test leaks,
/// without the CLI: a pool left active with a layer mounted.
#[test]
fn vm_a_process_kept_child_index_never_hides_another_process_layer() {
    // A server opens the pool per request and keeps the parent -> children
    // index from one handle to the next; a layer another process adds or
    // removes in between must show, or a parent with a child could go.
    use thinlayer_pool::{Error, LockMode};
    vm_test("kids", Pool::Small, |s| {
        let open = || thinlayer_pool::Pool::open(&s.root, LockMode::Exclusive, true).unwrap();
        s.ok(&["layer", "create", "p"]);
        assert!(open().children_of("p").unwrap().is_empty(), "index built");
        s.ok(&["layer", "create", "c", "--parent", "p"]);
        {
            let mut pool = open();
            assert_eq!(
                pool.children_of("p").unwrap(),
                ["c"],
                "another process's child"
            );
            assert!(matches!(
                pool.remove_layer("p"),
                Err(Error::HasChildren { .. })
            ));
            pool.create_layer("d", Some("p")).unwrap();
        }
        assert_eq!(
            open().children_of("p").unwrap(),
            ["c", "d"],
            "this process's child"
        );
        s.ok(&["layer", "rm", "d"]);
        assert_eq!(open().children_of("p").unwrap(), ["c"]);
        s.ok(&["layer", "rm", "c"]);
        open().remove_layer("p").unwrap();
        assert_eq!(s.json(&["layer", "ls"]), serde_json::json!([]));
        s.ok(&["pool", "check"]);
    });
}

#[test]
fn vm_the_harness_sweep_removes_a_leaked_pool_without_the_cli() {
    swept(|| {
        let s = Scratch::new("leak");
        s.create_pool(&[]);
        s.ok(&["layer", "create", "a"]);
        let d = s.mount("a");
        let removed = common::vm::sweep();
        println!("swept: {removed:#?}");
        let mount = format!("mount {} ", d.display());
        assert!(removed.iter().any(|r| r.starts_with(&mount)), "{removed:?}");
        assert!(removed.iter().any(|r| r.contains("-thin-")), "{removed:?}");
        for role in ["-pool", "-meta", "-data"] {
            assert!(
                removed.iter().any(|r| r.ends_with(role)),
                "{role}: {removed:?}"
            );
        }
        let left: Vec<String> = dm_devices()
            .into_iter()
            .filter(|n| common::vm::is_thinlayer_dm_name(n))
            .collect();
        assert!(left.is_empty(), "left: {left:?}");
        let base = s.root.parent().unwrap().to_owned();
        let loops: Vec<_> = loop_backing_files()
            .into_iter()
            .filter(|f| f.starts_with(&base))
            .collect();
        assert!(loops.is_empty(), "loop devices left: {loops:?}");
        assert!(!common::vm::sweep().iter().any(|r| r.starts_with("dm ")));
        // The records stay; without them the scratch's drop has no pool to
        // destroy through the CLI.
        fs::remove_dir_all(&s.root).unwrap();
    });
}
