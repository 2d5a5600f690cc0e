//! Space against the real kernel: removed layers give their blocks back to
//! the pool and to the host file, unmount trims, a full pool fails writes
//! and says how to extend, `pool extend` grows it online, `pool watch`
//! grows it by itself, a trivial container on a new pool copies few pool
//! blocks of its image's filesystem. Every test is named `vm_*`: the host run skips them,
//! `tools/test` runs them serially inside the VM, where none may skip.

mod common;

use common::{MIB, Pool, Scratch, pattern, swept, vm_test, write_file};

use std::{
    fs::{self, OpenOptions},
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Bytes the host filesystem holds for the pool's data file.
fn allocated(s: &Scratch) -> u64 {
    fs::metadata(s.root.join("data.img")).unwrap().blocks() * 512
}

fn kernel_field(s: &Scratch, field: &str) -> u64 {
    s.json(&["pool", "status"])["kernel"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("pool status has kernel.{field}"))
}

#[test]
fn vm_removing_a_layer_gives_its_blocks_back_to_the_pool_and_the_host() {
    vm_test("space-rm", Pool::Small, |s| {
        let (u0, a0) = (s.used_data_blocks(), allocated(s));
        s.ok(&["layer", "create", "big"]);
        let d = s.mount("big");
        write_file(&d.join("f"), &pattern(7, 64 * MIB));
        s.ok(&["umount", "big"]);
        let (u1, a1) = (s.used_data_blocks(), allocated(s));
        assert!(u1 >= u0 + 1024, "64 MiB of 64K blocks: {u0} -> {u1}");
        assert!(a1 >= a0 + (64 << 20), "host file grew: {a0} -> {a1}");
        s.ok(&["layer", "rm", "big"]);
        let (u2, a2) = (s.used_data_blocks(), allocated(s));
        println!(
            "layer rm: pool blocks {u0} -> {u1} -> {u2}; host bytes allocated {a0} -> {a1} -> {a2} \
             (returned {} of {} written)",
            a1 - a2,
            a1 - a0
        );
        assert!(
            u2 <= u0 + (u0 / 100).max(1),
            "pool blocks back within 1%: {u0} -> {u2}"
        );
        assert!(
            (a1 - a2) * 10 >= (a1 - a0) * 9,
            "host got back at least 90% of what the layer wrote: {a0} -> {a1} -> {a2}"
        );
    });
}

#[test]
fn vm_umount_trims_the_space_of_deleted_files() {
    vm_test("space-trim", Pool::Small, |s| {
        s.ok(&["layer", "create", "t"]);
        let d = s.mount("t");
        let (u0, a0) = (s.used_data_blocks(), allocated(s));
        write_file(&d.join("f"), &pattern(9, 32 * MIB));
        let (u1, a1) = (s.used_data_blocks(), allocated(s));
        fs::remove_file(d.join("f")).unwrap();
        s.ok(&["umount", "t"]);
        let (u2, a2) = (s.used_data_blocks(), allocated(s));
        println!("umount trim: pool blocks {u0} -> {u1} -> {u2}; host bytes {a0} -> {a1} -> {a2}");
        assert!(u1 >= u0 + 512, "32 MiB written: {u0} -> {u1}");
        assert!(
            u1.saturating_sub(u2) * 10 >= (u1 - u0) * 9,
            "trim gave back at least 90% of the deleted file's blocks: {u0} -> {u1} -> {u2}"
        );
        assert!(
            a1.saturating_sub(a2) * 10 >= (a1 - a0) * 9,
            "and the host its bytes: {a0} -> {a1} -> {a2}"
        );
    });
}

/// Writes `data`'s pattern in 1 MiB chunks, syncing every 4 MiB, until an
/// error; returns it.
fn write_until_error(path: &Path, limit: usize) -> std::io::Error {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let chunk = pattern(11, MIB);
    for i in 1..=limit {
        if let Err(e) = f.write_all(&chunk) {
            return e;
        }
        if i % 4 == 0 {
            if let Err(e) = f.sync_data() {
                return e;
            }
        }
    }
    match f.sync_all() {
        Err(e) => e,
        Ok(()) => panic!("wrote {limit} MiB into a pool smaller than that without an error"),
    }
}

/// A 128 MiB pool of 512 MiB layers: one file fills it.
fn small_pool(s: &Scratch) {
    s.ok(&[
        "pool",
        "create",
        "--data-size",
        "128M",
        "--base-size",
        "512M",
    ]);
}

#[test]
fn vm_a_full_pool_fails_writes_refuses_layers_and_recovers_after_extend() {
    vm_test("space-full", Pool::None, |s| {
        small_pool(s);
        s.ok(&["layer", "create", "keep"]);
        let k = s.mount("keep");
        let kept = pattern(5, 16 * MIB);
        write_file(&k.join("kept"), &kept);
        s.ok(&["umount", "keep"]);

        s.ok(&["layer", "create", "fill"]);
        let f = s.mount("fill");
        let t0 = Instant::now();
        let err = write_until_error(&f.join("fill"), 256);
        let errno = err.raw_os_error();
        println!(
            "fill: write failed after {:.1} s with {err} (errno {errno:?}); pool blocks used {} of {}",
            t0.elapsed().as_secs_f64(),
            kernel_field(s, "data_used_blocks"),
            kernel_field(s, "data_total_blocks")
        );
        assert!(
            errno == Some(nix::errno::Errno::ENOSPC as i32)
                || errno == Some(nix::errno::Errno::EIO as i32),
            "a full pool fails the write with ENOSPC or EIO, got {err}"
        );

        let st = s.json(&["pool", "status"]);
        assert_eq!(st["kernel"]["mode"], "out_of_data_space", "{st:#}");
        let warnings = st["warnings"].to_string();
        assert!(
            warnings.contains("out of data space")
                && warnings.contains("thinlayer pool extend --data-size +SIZE"),
            "{warnings}"
        );
        let text = s.ok(&["pool", "status"]);
        assert!(
            text.contains("thinlayer pool extend --data-size +SIZE"),
            "{text}"
        );
        s.fails(
            &["layer", "create", "refused"],
            6,
            "thinlayer pool extend --data-size +SIZE",
        );

        let out = s.ok(&["pool", "extend", "--data-size", "+256M"]);
        println!("{}", out.trim());
        assert!(out.contains("data 128M -> 384M"), "{out}");
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["kernel"]["mode"], "rw", "{st:#}");
        assert_eq!(
            st["kernel"]["data_total_blocks"], 6144,
            "384M of 64K blocks"
        );
        assert_eq!(st["data_size_bytes"], 384u64 << 20);

        // The filling layer's filesystem may have shut down: unmount and drop it.
        s.ok(&["umount", "fill"]);
        s.ok(&["layer", "rm", "fill"]);
        let k = s.mount("keep");
        assert!(
            fs::read(k.join("kept")).unwrap() == kept,
            "data synced before the fill is intact byte for byte"
        );
        let more = pattern(6, 8 * MIB);
        write_file(&k.join("more"), &more);
        assert!(fs::read(k.join("more")).unwrap() == more);
        s.ok(&["umount", "keep"]);
        s.ok(&["layer", "create", "after", "--parent", "keep"]);
        let a = s.mount("after");
        assert!(fs::read(a.join("kept")).unwrap() == kept);
        s.ok(&["umount", "after"]);
    });
}

/// A pool whose data and metadata both have room to grow.
const SMALL_METADATA: Pool =
    Pool::Create(&["--data-size=256M", "--metadata-size=8M", "--base-size=512M"]);

#[test]
fn vm_extend_data_and_metadata_online_with_a_layer_mounted() {
    vm_test("space-extend", SMALL_METADATA, |s| {
        s.ok(&["layer", "create", "a"]);
        let d = s.mount("a");
        let first = pattern(1, 4 * MIB);
        write_file(&d.join("first"), &first);
        assert_eq!(kernel_field(s, "data_total_blocks"), 4096);
        let m0 = kernel_field(s, "metadata_total_blocks");

        let out = s.ok(&["pool", "extend", "--data-size", "+128M"]);
        assert!(out.contains("data 256M -> 384M"), "{out}");
        assert_eq!(kernel_field(s, "data_total_blocks"), 6144);
        assert_eq!(
            fs::metadata(s.root.join("data.img")).unwrap().len(),
            384 << 20
        );
        s.ok(&["pool", "extend", "--data-size", "512M"]);
        assert_eq!(kernel_field(s, "data_total_blocks"), 8192);
        let unchanged = s.ok(&["pool", "extend", "--data-size", "512M"]);
        assert!(unchanged.contains("no action taken"), "{unchanged}");
        s.fails(
            &["pool", "extend", "--data-size", "128M"],
            2,
            "cannot shrink",
        );
        s.fails(&["pool", "extend"], 2, "nothing to extend");

        let out = s.ok(&["pool", "extend", "--metadata-size", "+8M"]);
        assert!(out.contains("metadata 8M -> 16M"), "{out}");
        let m1 = kernel_field(s, "metadata_total_blocks");
        println!("extend: data blocks 4096 -> 8192, metadata blocks {m0} -> {m1}");
        assert_eq!(m1, m0 + 2048, "8M more of 4K metadata blocks");

        // The mounted layer kept working across the reloads.
        let second = pattern(2, 4 * MIB);
        write_file(&d.join("second"), &second);
        assert!(fs::read(d.join("first")).unwrap() == first);
        s.ok(&["umount", "a"]);
        // The new sizes are in the records: they survive a restart.
        s.ok(&["pool", "deactivate"]);
        s.ok(&["pool", "activate"]);
        assert_eq!(kernel_field(s, "data_total_blocks"), 8192);
        assert_eq!(kernel_field(s, "metadata_total_blocks"), m1);
        let d = s.mount("a");
        assert!(fs::read(d.join("second")).unwrap() == second);
        s.ok(&["umount", "a"]);
    });
}

#[test]
fn vm_watch_autoextends_when_a_write_crosses_the_threshold() {
    vm_test(
        "space-watch",
        // The kernel raises its low-water event at 50%, the watch's threshold.
        Pool::Create(&["--data-size=128M", "--base-size=512M", "--low-water=50"]),
        |s| {
            s.ok(&["layer", "create", "w"]);
            let d = s.mount("w");
            let once = s.ok(&["pool", "watch", "--threshold", "50", "--once"]);
            assert!(
                once.contains("0 extension(s)"),
                "below the threshold: {once}"
            );

            let mut watcher = Command::new(common::bin())
                .arg("--root")
                .arg(&s.root)
                .args([
                    "pool",
                    "watch",
                    "--threshold",
                    "50",
                    "--extend-percent",
                    "100",
                    "--max-data-size",
                    "1G",
                    "--timeout",
                    "300",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            // Let it arm and read usage once.
            std::thread::sleep(Duration::from_secs(2));
            let total0 = kernel_field(s, "data_total_blocks");
            write_file(&d.join("f"), &pattern(4, 80 * MIB));
            let crossed = Instant::now();
            let mut total = total0;
            while total == total0 && crossed.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(200));
                total = kernel_field(s, "data_total_blocks");
            }
            let took = crossed.elapsed();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(watcher.id()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let status = watcher.wait().unwrap();
            let lines: Vec<String> = BufReader::new(watcher.stdout.take().unwrap())
                .lines()
                .map(Result::unwrap)
                .collect();
            println!(
                "watch: data blocks {total0} -> {total} within {:.1} s of the write; watcher said {lines:?}",
                took.as_secs_f64()
            );
            assert_eq!(total, 2 * total0, "extended by 100% once");
            assert!(status.success(), "SIGTERM ends the watch cleanly: {status}");
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("autoextended: data 128M -> 256M")),
                "{lines:?}"
            );
            assert!(
                lines.last().is_some_and(|l| l.contains("Signal")),
                "{lines:?}"
            );
            assert_eq!(s.json(&["pool", "status"])["data_size_bytes"], 256u64 << 20);
            s.ok(&["umount", "w"]);
        },
    );
}

#[test]
fn vm_a_pool_short_of_space_reclaims_its_trash_before_refusing() {
    vm_test("space-trash", Pool::None, |s| {
        small_pool(s);
        s.ok(&["layer", "create", "fill"]);
        let f = s.mount("fill");
        let _ = write_until_error(&f.join("fill"), 256);
        s.ok(&["umount", "fill"]);
        s.ok(&["layer", "rm", "fill", "--later"]);
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["kernel"]["mode"], "out_of_data_space", "{st:#}");
        assert_eq!(st["trash"].as_array().map(Vec::len), Some(1), "{st:#}");
        // The create finds the pool full, takes the trash's blocks back, and
        // goes ahead.
        s.ok(&["layer", "create", "next"]);
        let st = s.json(&["pool", "status"]);
        assert_eq!(st["trash"], serde_json::json!([]), "{st:#}");
        assert_eq!(st["kernel"]["mode"], "rw", "{st:#}");
        let n = s.mount("next");
        write_file(&n.join("x"), &pattern(7, 4 * MIB));
        s.ok(&["umount", "next"]);
        s.ok(&["pool", "check"]);
    });
}

/// A small tmpfs for a pool root: the host filesystem that fills up.
/// Declared before the [`Scratch`] on it, so it is unmounted after the
/// pool is destroyed.
struct SmallHost {
    /// Holds `host/` (the tmpfs) and `mnt/` (mount points, off it).
    base: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl SmallHost {
    fn new(name: &str, size: &str) -> SmallHost {
        let base = std::env::temp_dir().join(format!("tl-{name}-{}", std::process::id()));
        let dir = base.join("host");
        let _ = nix::mount::umount(&dir);
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(base.join("mnt")).unwrap();
        common::sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        SmallHost { base, dir }
    }

    /// A scratch pool whose root is on this filesystem (mount points off it).
    fn scratch(&self) -> Scratch {
        Scratch {
            root: self.dir.join("root"),
            mnt: self.base.join("mnt"),
        }
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.dir).unwrap();
        st.blocks_available() * st.fragment_size()
    }

    /// Writes a filler file until the filesystem is full (ENOSPC), leaving
    /// `leave` bytes free; returns how much it wrote.
    fn fill(&self, name: &str, leave: u64) -> u64 {
        let mut f = fs::File::create(self.dir.join(name)).unwrap();
        let chunk = vec![0x5au8; 256 << 10];
        let mut n = 0u64;
        loop {
            let want = self.free().saturating_sub(leave).min(chunk.len() as u64);
            if want == 0 {
                break;
            }
            let k = usize::try_from(want).unwrap();
            match f.write_all(&chunk[..k]) {
                Ok(()) => n += want,
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) => break,
                Err(e) => panic!("fill {name}: {e}"),
            }
        }
        n
    }
}

impl Drop for SmallHost {
    fn drop(&mut self) {
        if std::env::var_os("NO_TEST_CLEAN_UP").is_some() {
            return;
        }
        let _ = nix::mount::umount(&self.dir);
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn image_fixtures() -> std::path::PathBuf {
    let d = std::env::var_os("THINLAYER_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/images"),
        std::path::PathBuf::from,
    );
    assert!(
        d.join(".stamp").exists(),
        "fixtures missing at {}: run `tests/fixtures/make-images {}` first (tools/test does)",
        d.display(),
        d.display()
    );
    d
}

#[test]
fn vm_a_full_host_keeps_the_pool_rw_warns_and_refuses_an_import_up_front() {
    // Not vm_test: the root lies on a small tmpfs made first.
    swept(|| {
        let host = SmallHost::new("space-host", "96M");
        let s = host.scratch();
        // A data file more than twice what the host can ever hold.
        s.ok(&[
            "pool",
            "create",
            "--data-size",
            "256M",
            "--base-size",
            "512M",
        ]);
        let st = s.json(&["pool", "status"]);
        let meta_size = st["metadata_size_bytes"].as_u64().unwrap();
        let meta_on_host = fs::metadata(s.root.join("metadata.img")).unwrap().blocks() * 512;
        assert!(
            meta_on_host >= meta_size,
            "the metadata file is fully allocated: {meta_on_host} of {meta_size}"
        );
        assert_eq!(st["host"]["metadata_allocated"], true, "{st:#}");
        assert_eq!(st["host"]["holds_growth"], false, "{st:#}");
        let free = st["host"]["filesystem_free_bytes"].as_u64().unwrap();
        let growth = st["host"]["data_growth_bytes"].as_u64().unwrap();
        assert!(free < growth && growth > 200 << 20, "{st:#}");
        assert!(
            st["warnings"].to_string().contains("move the root"),
            "{st:#}"
        );

        // Fill the host with a layer's writes until it refuses them.
        s.ok(&["layer", "create", "w"]);
        let w = s.mount("w");
        let filler = host.fill("filler", 24 << 20);
        let err = write_until_error(&w.join("fill"), 256);
        let leftover = host.fill("filler2", 0);
        println!(
            "host: filler {filler} bytes, the layer's write failed with {err}, then {leftover} more; {} free",
            host.free()
        );
        let st = s.json(&["pool", "status"]);
        println!(
            "after the host filled: mode {}, needs_check {}, host {}",
            st["kernel"]["mode"], st["kernel"]["needs_check"], st["host"]
        );
        assert_eq!(st["kernel"]["mode"], "rw", "{st:#}");
        assert_eq!(st["kernel"]["needs_check"], false, "{st:#}");
        let text = s.ok(&["pool", "status"]);
        assert!(
            text.contains("host filesystem:") && text.contains("warning: the filesystem holding"),
            "{text}"
        );
        let check = s.json(&["pool", "check"]);
        assert!(
            check["host"]["filesystem_free_bytes"].as_u64().unwrap() < 16 << 20,
            "{check:#}"
        );
        assert!(
            check["warnings"].to_string().contains("free space on it"),
            "{check:#}"
        );
        s.ok(&["umount", "w"]);

        // An import that cannot fit is refused before it changes anything.
        let before = (
            s.used_data_blocks(),
            s.json(&["layer", "ls"]).to_string(),
            s.json(&["image", "ls"]).to_string(),
        );
        let f = image_fixtures();
        let err = s.fails(
            &["image", "import", f.join("demo-oci").to_str().unwrap()],
            6,
            "lower bound",
        );
        println!("{}", err.trim());
        assert!(
            err.contains("needs at least") && err.contains("free space on that filesystem"),
            "{err}"
        );
        let err = s.fails(
            &["image", "import", f.join("demo-oci.tar").to_str().unwrap()],
            6,
            "unpacking the image archive",
        );
        assert!(err.contains("needs at least"), "{err}");
        let after = (
            s.used_data_blocks(),
            s.json(&["layer", "ls"]).to_string(),
            s.json(&["image", "ls"]).to_string(),
        );
        assert_eq!(before, after, "a refused import changed nothing");
        assert_eq!(
            fs::read_dir(s.root.join("store/tmp")).unwrap().count(),
            0,
            "no scratch left"
        );

        // The watch does not grow the data file into a host that cannot hold it.
        let data0 = s.json(&["pool", "status"])["data_size_bytes"].clone();
        s.fails(
            &["pool", "watch", "--threshold", "1", "--once"],
            6,
            "pool watch",
        );
        assert_eq!(s.json(&["pool", "status"])["data_size_bytes"], data0);

        // Freed host space: the pool takes writes again.
        fs::remove_file(host.dir.join("filler")).unwrap();
        fs::remove_file(host.dir.join("filler2")).unwrap();
        s.ok(&["layer", "create", "after"]);
        let a = s.mount("after");
        write_file(&a.join("x"), &pattern(3, 4 * MIB));
        assert!(fs::read(a.join("x")).unwrap() == pattern(3, 4 * MIB));
        s.ok(&["umount", "after"]);
        s.ok(&["pool", "check"]);
    });
}

/// Bytes of the dm device `name` (from sysfs).
fn dm_size(name: &str) -> u64 {
    for e in fs::read_dir("/sys/block").unwrap().flatten() {
        if fs::read_to_string(e.path().join("dm/name")).is_ok_and(|n| n.trim() == name) {
            let sectors: u64 = fs::read_to_string(e.path().join("size"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            return sectors * 512;
        }
    }
    panic!("no dm device {name}");
}

#[test]
fn vm_an_extend_whose_record_was_lost_never_shrinks_the_live_device() {
    vm_test("space-lost", SMALL_METADATA, |s| {
        let id = s.json(&["pool", "status"])["pool_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let data_dev = common::dm_devices()
            .into_iter()
            .find(|n| n.contains(&id) && n.ends_with("-data"))
            .expect("the pool's data linear device");
        s.ok(&["layer", "create", "a"]);
        let d = s.mount("a");
        let kept = pattern(8, 4 * MIB);
        write_file(&d.join("kept"), &kept);

        // The record from before the extend: a valid record (same CRC), the
        // one a lost write or a restore from backup leaves.
        let old = fs::read(s.root.join("pool.rec")).unwrap();
        s.ok(&["pool", "extend", "--data-size", "512M"]);
        assert_eq!(dm_size(&data_dev), 512 << 20);
        fs::write(s.root.join("pool.rec"), &old).unwrap();
        assert_eq!(s.json(&["pool", "status"])["data_size_bytes"], 256u64 << 20);

        // Smaller than the live device, larger than the stale record.
        let out = s.run(&["pool", "extend", "--data-size", "384M"]);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{}", err.trim());
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("cannot shrink") && err.contains("512M"),
            "{err}"
        );
        assert!(err.contains("adopted the live sizes"), "{err}");
        assert_eq!(
            dm_size(&data_dev),
            512 << 20,
            "the live device kept its size"
        );
        assert_eq!(kernel_field(s, "data_total_blocks"), 8192);
        assert_eq!(s.json(&["pool", "status"])["data_size_bytes"], 512u64 << 20);

        // Relative growth counts from the live size.
        let out = s.ok(&["pool", "extend", "--data-size", "+64M"]);
        assert!(out.contains("data 512M -> 576M"), "{out}");
        assert_eq!(dm_size(&data_dev), 576 << 20);
        assert!(fs::read(d.join("kept")).unwrap() == kept);
        s.ok(&["umount", "a"]);
        s.ok(&["pool", "check"]);
    });
}

/// The pool blocks a trivial container may take on a new pool (64 KiB
/// each). Measured with this test's image: 13-14 with the layout before
/// `inline_data` and `-G 4`, 6-7 with it (the superblock's block, the
/// journal's head, and for each of the two image directories written its
/// flex group's bitmaps and first inode table blocks, and its directory
/// block). One block of margin: ext4 places top-level directories by a
/// hash seeded per filesystem, so the groups touched vary between pools.
/// The target of 2 is not reached (README, Space).
const TRIVIAL_CONTAINER_BLOCKS: u64 = 8;

#[test]
fn vm_a_trivial_container_on_a_new_pool_copies_few_pool_blocks() {
    // The pool's default base size: the layout depends on it.
    vm_test("space-trivial", Pool::Create(&["--data-size", "4G"]), |s| {
        s.ok(&["layer", "create", "image"]);
        let d = s.mount("image");
        for dir in ["etc", "run", "usr/bin", "usr/lib", "var/lib"] {
            fs::create_dir_all(d.join(dir)).unwrap();
            for i in 0..24usize {
                write_file(
                    &d.join(dir).join(format!("f{i}")),
                    &pattern(i as u64, 100 + 997 * i),
                );
            }
        }
        write_file(&d.join("usr/lib/big.so"), &pattern(3, 3 * MIB));
        s.ok(&["umount", "image"]);
        let mut worst = 0;
        for c in ["c1", "c2", "c3"] {
            let before = s.used_data_blocks();
            s.ok(&["layer", "create", c, "--parent", "image"]);
            let r = s.mount(c);
            for f in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
                write_file(&r.join(f), &pattern(9, 100));
            }
            fs::create_dir(r.join("run/app")).unwrap();
            s.ok(&["umount", c]);
            let took = s.used_data_blocks() - before;
            println!("trivial container {c}: {took} pool blocks of 64 KiB");
            worst = worst.max(took);
        }
        assert!(
            worst <= TRIVIAL_CONTAINER_BLOCKS,
            "a trivial container took {worst} pool blocks (at most {TRIVIAL_CONTAINER_BLOCKS})"
        );
    });
}
