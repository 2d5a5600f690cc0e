//! Pools on real block devices, and an adopted LVM thin-pool (issue 16).
//!
//! The guest's virtio disks come from `THINLAYER_VM_DISKS` (tools/test
//! attaches them: tl-data, tl-meta, tl-lvm, tl-rdata, tl-rmeta, tl-state);
//! they are found by their virtio serial in sysfs (no udev in the guest,
//! so no /dev/disk/by-id).
//!
//! `vm_blockdev_reboot` runs in two boots: the first (no
//! `THINLAYER_BLOCKDEV_PHASE`) builds a pool on `tl-rdata`/`tl-rmeta`
//! with its root on an ext4 `tl-state` disk and deactivates it; tools/test
//! then grows `tl-rdata` and boots again with the disks in the other order
//! and `THINLAYER_BLOCKDEV_PHASE=2`: the pool must come back by its labels,
//! whole, and extend onto the grown disk.

mod common;

use common::{Pool, Scratch, sh, swept, virtio_disk as disk, vm_test, zap_disk as zap};

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The disk image behind serial `serial` on the host, seen through the share.
fn image(serial: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/vm/disks/{serial}.img"))
}

fn head(dev: &Path, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(dev).unwrap().read_exact(&mut buf).unwrap();
    buf
}

/// `--data-device D --metadata-device M` plus `extra`.
fn create_args<'a>(d: &'a Path, m: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "pool",
        "create",
        "--data-device",
        p(d),
        "--metadata-device",
        p(m),
        "--base-size",
        "256M",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn vm_blockdev_refusals_change_nothing() {
    vm_test("bd-refuse", Pool::None, |s| {
        let (d, m) = (disk("tl-data"), disk("tl-meta"));
        zap(&d);
        zap(&m);
        let no_pool = |s: &Scratch| assert!(!s.root.join("pool.rec").exists());

        // The same device twice; a file; a partition of itself.
        s.fails(&create_args(&d, &d, &[]), 2, "overlap");
        let f = std::env::temp_dir().join("bd-not-a-device");
        fs::write(&f, b"x").unwrap();
        s.fails(&create_args(&f, &m, &[]), 2, "not a block device");
        no_pool(s);

        // A filesystem: refused without --force, and left as it was.
        sh("mkfs.ext4", &["-q", p(&d)]);
        let before = head(&d, 1 << 20);
        s.fails(
            &create_args(&d, &m, &[]),
            4,
            "holds an ext2/3/4 filesystem; pass --force",
        );
        assert!(head(&d, 1 << 20) == before, "a refusal wrote to the device");
        no_pool(s);

        // Mounted: refused even with --force, the mount point named.
        let mnt = s.dir("mounted");
        fs::create_dir_all(&mnt).unwrap();
        sh("mount", &[p(&d), p(&mnt)]);
        let e = s.fails(&create_args(&d, &m, &["--force"]), 4, "is mounted at");
        assert!(e.contains(p(&mnt)), "{e}");
        sh("umount", &[p(&mnt)]);
        // (The mount itself wrote to the superblock: compare from here on.)
        let before = head(&d, 1 << 20);
        let meta_before = head(&m, 1 << 20);

        // Held by another dm table: refused, the holder named.
        let sectors = fs::read_to_string(format!(
            "/sys/class/block/{}/size",
            m.file_name().unwrap().to_str().unwrap()
        ))
        .unwrap();
        let table = format!("0 {} linear {} 0", sectors.trim(), p(&m));
        sh("dmsetup", &["create", "bd-holder", "--table", &table]);
        let e = s.fails(&create_args(&d, &m, &["--force"]), 4, "is held by");
        sh("dmsetup", &["remove", "bd-holder"]);
        assert!(e.contains("bd-holder"), "{e}");
        no_pool(s);
        assert!(head(&d, 1 << 20) == before && head(&m, 1 << 20) == meta_before);

        // Too large a data size for the device.
        s.fails(
            &create_args(&d, &m, &["--force", "--data-size", "2G"]),
            2,
            "label region",
        );
        no_pool(s);

        // --force takes the ext4 disk; a second pool on the same disks is
        // then refused: they are held by the first.
        s.ok(&create_args(&d, &m, &["--force"]));
        let s2 = Scratch::new("bd-refuse-2");
        let e = s2.fails(&create_args(&d, &m, &["--force"]), 4, "is held by");
        assert!(e.contains("-data)"), "{e}");
        drop(s2);

        // Destroy without --wipe keeps the label: a new create must be forced.
        s.ok(&["pool", "destroy"]);
        s.fails(&create_args(&d, &m, &[]), 4, "thinlayer label");
        s.ok(&create_args(&d, &m, &["--force"]));
        let out = s.ok(&["pool", "destroy", "--wipe"]);
        assert!(out.contains("wiped"), "{out}");
        assert!(
            head(&d, 4096).iter().all(|b| *b == 0),
            "the label survived --wipe"
        );
        // Wiped: free again without --force.
        s.ok(&create_args(&d, &m, &[]));
        s.ok(&["pool", "destroy", "--wipe"]);
    });
}

#[test]
fn vm_blockdev_pool_on_two_disks() {
    vm_test("bd-pool", Pool::None, |s| {
        let (d, m) = (disk("tl-data"), disk("tl-meta"));
        zap(&d);
        zap(&m);
        // Half the data disk now; extend onto the rest below.
        let rec = s.json(&create_args(&d, &m, &["--data-size", "512M"]));
        assert_eq!(rec["backing"]["kind"], "devices");
        assert_eq!(rec["backing"]["data"]["identity"]["serial"], "tl-data");
        assert_eq!(rec["data_size"], 512u64 << 20);
        assert!(!s.root.join("data.img").exists());
        assert!(
            common::loop_backing_files().is_empty(),
            "a pool on disks uses no loop device"
        );

        // Layers, an image, a container.
        s.ok(&["layer", "create", "l1"]);
        let l1 = s.mount("l1");
        fs::write(l1.join("kept"), b"on a disk\n").unwrap();
        s.ok(&["umount", "l1"]);
        s.ok(&["image", "import", p(&common::fixtures().join("demo-oci"))]);
        s.ok(&["container", "create", "c1", "--image", "demo:1"]);
        let c = PathBuf::from(s.ok(&["container", "mount", "c1"]).trim());
        fs::write(c.join("written-in-c1"), b"c1\n").unwrap();
        s.ok(&["container", "umount", "c1"]);

        // Down and up again: found by label, contents whole.
        s.ok(&["pool", "deactivate"]);
        assert!(!common::dm_devices().iter().any(|n| n.starts_with("tl1-")));
        s.ok(&["pool", "activate"]);
        let l1 = s.mount("l1");
        assert_eq!(fs::read(l1.join("kept")).unwrap(), b"on a disk\n");
        s.ok(&["umount", "l1"]);
        let c = PathBuf::from(s.ok(&["container", "mount", "c1"]).trim());
        assert_eq!(fs::read(c.join("written-in-c1")).unwrap(), b"c1\n");
        s.ok(&["container", "umount", "c1"]);
        s.ok(&["pool", "check"]);

        // Extend onto the rest of the device, online, no size given.
        let r = s.json(&["pool", "extend"]);
        assert_eq!(r["extend"]["online"], true);
        let grown = r["extend"]["new_data_size"].as_u64().unwrap();
        assert!(grown > 1000 << 20, "{r}");
        s.fails(
            &["pool", "extend", "--data-size", "4G"],
            2,
            "grow the device first",
        );
        let st = s.json(&["pool", "status"]);
        assert_eq!(
            st["kernel"]["data_total_blocks"].as_u64().unwrap() * 65536,
            grown
        );
        assert_eq!(st["kernel"]["discard_passdown"], true);

        // Discard passes down to the disk image on the host.
        s.ok(&["layer", "create", "big"]);
        let big = s.mount("big");
        let mut f = fs::File::create(big.join("blob")).unwrap();
        f.write_all(&common::pattern(7, 96 << 20)).unwrap();
        f.sync_all().unwrap();
        drop(f);
        s.ok(&["umount", "big"]);
        let held = || fs::metadata(image("tl-data")).unwrap().blocks() * 512;
        let full = held();
        s.ok(&["layer", "rm", "big"]);
        let after = held();
        assert!(
            full - after >= 80 << 20,
            "layer rm gave back only {} bytes of the disk image ({full} -> {after})",
            full - after
        );
        s.ok(&["pool", "check"]);
        s.ok(&["pool", "destroy", "--force", "--wipe"]);
    });
}

#[test]
fn vm_blockdev_adopts_an_lvm_pool() {
    // Not vm_test: the pool is LVM's, adopted from a disk, not created.
    swept(|| {
        let dev = disk("tl-lvm");
        zap(&dev);
        let conf = std::env::temp_dir().join("bd-lvm-conf");
        fs::create_dir_all(&conf).unwrap();
        // No udev in the guest.
        fs::write(
            conf.join("lvm.conf"),
            "devices { obtain_device_list_from_udev = 0 }\n\
             activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n\
             global { use_lvmpolld = 0 }\n",
        )
        .unwrap();
        let lvm = |args: &[&str]| -> String {
            let out = Command::new("lvm")
                .args(args)
                .env("LVM_SYSTEM_DIR", &conf)
                .output()
                .expect("run lvm");
            assert!(
                out.status.success(),
                "lvm {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        lvm(&["pvcreate", "-q", p(&dev)]);
        lvm(&["vgcreate", "-q", "bdvg", p(&dev)]);
        lvm(&[
            "lvcreate",
            "-q",
            "--type",
            "thin-pool",
            "-L",
            "256M",
            "-n",
            "tpool",
            "bdvg",
        ]);
        lvm(&[
            "lvcreate",
            "-q",
            "-V",
            "64M",
            "-T",
            "bdvg/tpool",
            "-n",
            "foreign1",
        ]);
        let f1 = PathBuf::from("/dev/mapper/bdvg-foreign1");
        let payload = common::pattern(3, 8 << 20);
        {
            let mut f = fs::OpenOptions::new().write(true).open(&f1).unwrap();
            f.write_all(&payload).unwrap();
            f.sync_all().unwrap();
        }
        let ids = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|l| !l.is_empty())
                .collect()
        };
        let lvs = || {
            ids(&lvm(&[
                "lvs",
                "--noheadings",
                "-o",
                "lv_name,thin_id",
                "bdvg",
            ]))
        };

        let s = Scratch::new("bd-adopt");
        // Not a thin-pool: refused with the LVM hint.
        s.fails(
            &["pool", "adopt", "--pool-device", "bdvg-foreign1"],
            2,
            "not a thin-pool",
        );
        s.fails(
            &["pool", "adopt", "--pool-device", "no-such-pool"],
            2,
            "dmsetup ls",
        );
        assert!(!s.root.join("pool.rec").exists());

        let rec = s.json(&[
            "pool",
            "adopt",
            "--pool-device",
            "bdvg-tpool-tpool",
            "--base-size",
            "64M",
        ]);
        assert_eq!(rec["backing"]["kind"], "adopted");
        assert_eq!(rec["backing"]["foreign_thin_ids"], serde_json::json!([1]));
        let first = rec["backing"]["first_thin_id"].as_u64().unwrap();
        assert!(first >= 1 << 23, "{rec}");

        // The engine works in it as in its own pool.
        s.ok(&["layer", "create", "a"]);
        let a = s.mount("a");
        fs::write(a.join("f"), b"in an LVM pool\n").unwrap();
        s.ok(&["umount", "a"]);
        s.ok(&["layer", "create", "b", "--parent", "a"]);
        s.ok(&["pool", "check"]);

        // LVM goes on making its own volumes; an unknown id of thinlayer's
        // own range appears (a crash leftover).
        lvm(&[
            "lvcreate",
            "-q",
            "-V",
            "64M",
            "-T",
            "bdvg/tpool",
            "-n",
            "foreign2",
        ]);
        let stray = first + 1000;
        sh(
            "dmsetup",
            &[
                "message",
                "bdvg-tpool-tpool",
                "0",
                &format!("create_thin {stray}"),
            ],
        );
        let out = s.run(&["pool", "check"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(7), "{text}");
        assert!(text.contains(&format!("thin id {stray}")), "{text}");
        assert!(
            !text.contains("thin id 1,") && !text.contains("thin id 2,"),
            "{text}"
        );

        // recover --force deletes the stray id and nothing of LVM's.
        let out = s.ok(&["pool", "recover", "--force"]);
        assert!(out.contains(&format!("deleted thin id {stray}")), "{out}");
        assert!(!out.contains("deleted thin id 1\n") && !out.contains("deleted thin id 2\n"));
        assert_eq!(lvs(), vec!["foreign1 1", "foreign2 2", "tpool"]);
        let mut back = vec![0u8; payload.len()];
        let mut f = fs::File::open(&f1).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut back).unwrap();
        drop(f);
        assert!(back == payload, "foreign1's data changed");

        // The owner's verbs are refused, each saying whose they are.
        s.fails(&["pool", "extend", "--data-size", "+64M"], 4, "lvextend");
        s.fails(
            &["pool", "destroy", "--force", "--wipe"],
            4,
            "belongs to its owner",
        );
        // LVM still trusts its pool (transaction id untouched).
        lvm(&[
            "lvcreate",
            "-q",
            "-V",
            "16M",
            "-T",
            "bdvg/tpool",
            "-n",
            "foreign3",
        ]);

        // Destroy takes thinlayer's ids only.
        let out = s.ok(&["pool", "destroy", "--force"]);
        assert!(out.contains("untouched"), "{out}");
        assert_eq!(
            lvs(),
            vec!["foreign1 1", "foreign2 2", "foreign3 3", "tpool"]
        );
        lvm(&["vgremove", "-q", "-y", "-f", "bdvg"]);
        lvm(&["pvremove", "-q", p(&dev)]);
    });
}

#[test]
fn vm_blockdev_reboot() {
    // Not vm_test: the root lives on a disk that outlives the boot.
    swept(|| {
        let phase2 = std::env::var("THINLAYER_BLOCKDEV_PHASE").is_ok_and(|v| v == "2");
        let (d, m, state) = (disk("tl-rdata"), disk("tl-rmeta"), disk("tl-state"));
        let st = std::env::temp_dir().join("bd-state");
        fs::create_dir_all(&st).unwrap();
        let root = st.join("root");
        let run = |args: &[&str]| -> String {
            let out = Command::new(common::bin())
                .arg("--root")
                .arg(&root)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "thinlayer {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let mnt = std::env::temp_dir().join("bd-mnt");
        fs::create_dir_all(&mnt).unwrap();
        if !phase2 {
            zap(&d);
            zap(&m);
            sh("mkfs.ext4", &["-q", "-F", p(&state)]);
            sh("mount", &[p(&state), p(&st)]);
            run(&create_args(&d, &m, &[]));
            run(&["layer", "create", "kept"]);
            run(&["mount", "kept", p(&mnt)]);
            fs::write(mnt.join("f"), common::pattern(11, 1 << 20)).unwrap();
            run(&["umount", "kept"]);
            run(&["image", "import", p(&common::fixtures().join("demo-oci"))]);
            run(&["container", "create", "c1", "--image", "demo:1"]);
            let c = PathBuf::from(run(&["container", "mount", "c1"]).trim());
            fs::write(c.join("c1-file"), b"c1\n").unwrap();
            run(&["container", "umount", "c1"]);
            run(&["pool", "deactivate"]);
            sh("umount", &[p(&st)]);
            // Left for the second boot (tools/test); nothing else to see here.
            return;
        }
        // Second boot: the disks came back in another order, the data disk grown.
        sh("mount", &[p(&state), p(&st)]);
        let rec = fs::read_to_string(root.join("pool.rec")).unwrap();
        let last = |role: &str| -> String {
            let v: serde_json::Value =
                serde_json::from_str(rec.split_once('\n').unwrap().1).unwrap();
            v["backing"][role]["name"].as_str().unwrap().to_owned()
        };
        assert_ne!(
            format!("/dev/{}", last("data")),
            p(&d),
            "the disks were not reordered: boot with THINLAYER_VM_DISKS=tl-state,tl-rmeta,tl-rdata"
        );
        run(&["pool", "activate"]);
        run(&["mount", "kept", p(&mnt)]);
        assert!(fs::read(mnt.join("f")).unwrap() == common::pattern(11, 1 << 20));
        run(&["umount", "kept"]);
        let c = PathBuf::from(run(&["container", "mount", "c1"]).trim());
        assert_eq!(fs::read(c.join("c1-file")).unwrap(), b"c1\n");
        run(&["container", "umount", "c1"]);
        // The data disk grew between the boots: extend onto it.
        let before: serde_json::Value =
            serde_json::from_str(&run(&["--json", "pool", "status"])).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&run(&["--json", "pool", "extend"])).unwrap();
        let (old, new) = (
            r["extend"]["old_data_size"].as_u64().unwrap(),
            r["extend"]["new_data_size"].as_u64().unwrap(),
        );
        assert_eq!(old, before["data_size_bytes"].as_u64().unwrap());
        assert!(new > old + (256 << 20), "the grown disk was not used: {r}");
        run(&["pool", "check"]);
        run(&["pool", "destroy", "--force", "--wipe"]);
        sh("umount", &[p(&st)]);
    });
}
