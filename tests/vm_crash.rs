//! Crash consistency against the real kernel: every fault point of every
//! mutating command (`THINLAYER_FAULT=<point>` aborts the process there, as
//! `kill -9` would), then recovery the way a user would do it, then proof:
//! `pool check` clean, no dm device, loop device or thin id leaked, every
//! layer committed before the abort byte-identical. Plus damaged metadata
//! repaired, and a thin device made behind thinlayer's back found and
//! removed. Every test here is `vm_*`: run in the VM (`tools/vm/run`).

mod common;

use common::{
    Pool, Scratch, dm_devices, loop_backing_files, pattern, sh, swept, vm_test, write_file,
};

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    os::unix::{fs::FileExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use serde_json::Value;

/// The points of one command, from the engine's list.
fn points(prefix: &str) -> Vec<&'static str> {
    thinlayer_pool::fault::ALL
        .iter()
        .copied()
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// Runs `thinlayer ARGS` with the fault point armed; asserts it aborted
/// there (SIGABRT, the point named on stderr).
fn crash(s: &Scratch, point: &str, args: &[&str]) {
    let out = Command::new(common::bin())
        .arg("--root")
        .arg(&s.root)
        .args(args)
        .env("THINLAYER_FAULT", point)
        .output()
        .expect("run thinlayer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(nix::sys::signal::Signal::SIGABRT as i32),
        "{point}: `thinlayer {args:?}` should abort there, got {}: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(point),
        "{point}: stderr does not name it: {stderr}"
    );
}

/// Exit code of `thinlayer ARGS`, asserting it is one of `allowed`.
fn code_in(s: &Scratch, args: &[&str], allowed: &[i32], why: &str) -> Output {
    let out = s.run(args);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        allowed.contains(&code),
        "{why}: `thinlayer {args:?}` exited {code}, want one of {allowed:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The committed layers and the one file each holds.
type Contents = BTreeMap<String, (String, Vec<u8>)>;

/// Creates layer `id` (of `parent`) and writes `file` into it.
fn layer_with(s: &Scratch, id: &str, parent: Option<&str>, seed: u64, want: &mut Contents) {
    match parent {
        Some(p) => s.ok(&["layer", "create", id, "--parent", p]),
        None => s.ok(&["layer", "create", id]),
    };
    let d = s.mount(id);
    let name = format!("{id}.bin");
    let data = pattern(seed, 192 << 10);
    write_file(&d.join(&name), &data);
    s.ok(&["umount", id]);
    want.insert(id.to_owned(), (name, data));
}

/// Every committed layer reads back byte-identical (mounted read-only).
fn verify(s: &Scratch, want: &Contents, why: &str) {
    for (id, (name, data)) in want {
        let d = s.dir(&format!("ro-{id}"));
        s.ok(&["mount", id, d.to_str().unwrap(), "--readonly"]);
        let got = fs::read(d.join(name)).unwrap_or_else(|e| panic!("{why}: read {id}/{name}: {e}"));
        assert!(
            got == *data,
            "{why}: layer {id} file {name} differs after recovery"
        );
        s.ok(&["umount", id]);
    }
}

fn spares_listed(s: &Scratch) -> usize {
    s.json(&["pool", "status"])["spares"]
        .as_array()
        .unwrap()
        .len()
}

fn pool_id(s: &Scratch) -> String {
    s.json(&["pool", "status"])["pool_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What the walked pool lives on: the same walk runs on each.
enum On {
    /// Sparse files under the root on loop devices (`pool create`'s default).
    Files,
    /// Two virtio disks (`--data-device`, `--metadata-device`).
    Disks {
        /// The data disk.
        data: PathBuf,
        /// The metadata disk.
        metadata: PathBuf,
    },
}

impl On {
    /// The two disks the device walk takes (tools/test attaches them);
    /// zeroed first, whatever an earlier run left.
    fn disks() -> On {
        let (data, metadata) = (
            common::virtio_disk("tl-cdata"),
            common::virtio_disk("tl-cmeta"),
        );
        common::zap_disk(&data);
        common::zap_disk(&metadata);
        On::Disks { data, metadata }
    }

    /// A short name, for scratch roots and messages.
    fn tag(&self) -> &'static str {
        match self {
            On::Files => "files",
            On::Disks { .. } => "disks",
        }
    }

    /// `pool create` for it (no `--force`: every retry after a crash must
    /// find its devices free again).
    fn create(&self) -> Vec<String> {
        let mut a: Vec<String> = ["pool", "create", "--base-size", "64M"]
            .map(String::from)
            .to_vec();
        match self {
            On::Files => a.extend(["--data-size".into(), "1G".into()]),
            On::Disks { data, metadata } => a.extend([
                "--data-device".into(),
                data.display().to_string(),
                "--metadata-device".into(),
                metadata.display().to_string(),
            ]),
        }
        a
    }

    /// `pool destroy --force`, leaving the storage reusable (disks wiped).
    fn destroy(&self) -> &'static [&'static str] {
        match self {
            On::Files => &["pool", "destroy", "--force"],
            On::Disks { .. } => &["pool", "destroy", "--force", "--wipe"],
        }
    }

    /// The loop devices' backing files an active pool under `root` holds.
    fn loops(&self, root: &Path) -> Vec<PathBuf> {
        match self {
            On::Files => vec![root.join("data.img"), root.join("metadata.img")],
            On::Disks { .. } => Vec::new(),
        }
    }
}

/// What the kernel and the loop driver hold for this scratch root and for
/// any thinlayer pool.
fn kernel_state(s: &Scratch) -> (Vec<String>, Vec<PathBuf>) {
    let base = s.root.parent().unwrap().to_owned();
    let dms = dm_devices()
        .into_iter()
        .filter(|n| n.starts_with("tl1-"))
        .collect();
    let mut loops: Vec<PathBuf> = loop_backing_files()
        .into_iter()
        .filter(|f| f.starts_with(&base))
        .collect();
    loops.sort();
    (dms, loops)
}

/// Nothing pending, no spare, no marker of a taken spare left, and
/// nothing in the trash.
fn assert_settled(s: &Scratch, why: &str) {
    let st = s.json(&["pool", "status"]);
    assert_eq!(st["spares"], serde_json::json!([]), "{why}: spares left");
    assert_eq!(
        s.spare_mounts(),
        Vec::<PathBuf>::new(),
        "{why}: spare mounts left"
    );
    let dir = s.root.join("spares");
    if dir.exists() {
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{why}: spare directories left: {left:?}");
    }
    assert_eq!(st["trash"], serde_json::json!([]), "{why}: trash left");
    assert_eq!(st["pending"], Value::Null, "{why}: still pending");
    let markers: Vec<_> = fs::read_dir(s.root.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "taken"))
        .collect();
    assert!(markers.is_empty(), "{why}: markers left: {markers:?}");
}

fn assert_consistent(s: &Scratch, active: bool, why: &str) {
    assert_consistent_on(s, &On::Files, active, why);
}

/// [`assert_consistent`] for a pool on `on`.
fn assert_consistent_on(s: &Scratch, on: &On, active: bool, why: &str) {
    let out = s.run(&["--json", "pool", "check"]);
    assert!(
        out.status.success(),
        "{why}: pool check is not clean: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["active"], active, "{why}: pool activity");
    assert_eq!(
        r["metadata_thin_ids"], r["recorded_thin_ids"],
        "{why}: thin ids in the metadata and the records differ"
    );
    let mut layer_ids: Vec<u64> = s
        .json(&["layer", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["thin_id"].as_u64().unwrap())
        .collect();
    layer_ids.insert(0, 0);
    let recorded: Vec<u64> = r["recorded_thin_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(recorded, layer_ids, "{why}: layer ls and check disagree");
    let id = r["pool_id"].as_str().unwrap();
    let (dms, loops) = kernel_state(s);
    if active {
        let mut want: Vec<String> = ["data", "meta", "pool"]
            .iter()
            .map(|r| format!("tl1-{id}-{r}"))
            .collect();
        want.sort();
        assert_eq!(dms, want, "{why}: dm devices leaked or missing");
        assert_eq!(
            loops,
            on.loops(&s.root),
            "{why}: loop devices leaked or missing"
        );
    } else {
        assert!(dms.is_empty(), "{why}: dm devices leaked: {dms:?}");
        assert!(loops.is_empty(), "{why}: loop devices leaked: {loops:?}");
    }
}

#[test]
fn vm_crash_every_fault_point_recovers() {
    // Not vm_test: the walk makes a fresh root for each fault point.
    swept(|| {
        require_fault_points();
        walk_pool_verbs(&On::Files);
    });
}

/// The walk of the verbs whose steps differ on a pool on two virtio disks
/// (`tl-cdata`, `tl-cmeta`): create, deactivate, activate
/// (`pool_create.after_files` falls after the labels are written,
/// `*.after_loops` after the devices are found by them). Layer, spare and
/// mount points run the same thin-pool code on either backing.
#[test]
fn vm_crash_every_fault_point_recovers_on_disks() {
    // Not vm_test: the walk makes a fresh root for each fault point.
    swept(|| {
        require_fault_points();
        walk_pool_verbs(&On::disks());
    });
}

/// Every fault point of the pool's verbs, on a pool on `on`: abort there,
/// recover as a user would, prove the pool whole and nothing leaked.
fn walk_pool_verbs(on: &On) {
    let started = Instant::now();
    let mut walked = 0;
    let create = on.create();
    let create: Vec<&str> = create.iter().map(String::as_str).collect();

    // --- pool create: a fresh root each time ---
    let s = Scratch::new(&format!("crash-create-{}", on.tag()));
    for (i, p) in points("pool_create.").into_iter().enumerate() {
        let t = Instant::now();
        crash(&s, p, &create);
        walked += 1;
        let committed = p == "pool_create.after_record";
        match i % 3 {
            // The explicit way: recover clears the leftovers.
            1 => {
                code_in(&s, &["pool", "recover"], &[0], p);
            }
            // Other commands refuse the half-made pool and say what to do;
            // destroy clears it.
            2 if !committed => {
                s.fails(&["pool", "activate"], 7, "pool create");
                s.fails(&["layer", "create", "x"], 7, "pool create");
                s.ok(&["pool", "destroy"]);
                let (dms, loops) = kernel_state(&s);
                assert!(
                    dms.is_empty() && loops.is_empty(),
                    "{p}: destroy left {dms:?} {loops:?}"
                );
            }
            // Or simply create again: it clears them first.
            _ => {}
        }
        if committed {
            // The pool was committed: it exists, and it is whole.
            s.fails(&create, 4, "already exists");
        } else {
            s.ok(&create);
        }
        assert_consistent_on(&s, on, true, p);
        s.ok(&["layer", "create", "l"]);
        let d = s.mount("l");
        assert!(d.join("lost+found").is_dir(), "{p}: the base holds ext4");
        s.ok(&["umount", "l"]);
        s.ok(on.destroy());
        let (dms, loops) = kernel_state(&s);
        assert!(
            dms.is_empty() && loops.is_empty(),
            "{p}: destroy left {dms:?} {loops:?}"
        );
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }
    drop(s);

    // --- one pool with committed layers for everything else ---
    let s = Scratch::new(&format!("crash-walk-{}", on.tag()));
    s.ok(&create);
    let mut want = Contents::new();
    layer_with(&s, "a", None, 1, &mut want);
    layer_with(&s, "b", Some("a"), 2, &mut want);
    assert_consistent_on(&s, on, true, "set-up");

    // Layer, spare and mount points: the same thin-pool code whatever
    // holds the pool, so they are walked on files only; the disks walk
    // the verbs whose steps differ there (create, deactivate, activate).
    if matches!(on, On::Files) {
        walked += walk_layer_verbs(&s, on, &want);
    }

    for (i, p) in points("pool_deactivate.").into_iter().enumerate() {
        let t = Instant::now();
        // An active, unmounted layer device, so every removal step runs.
        let d = s.mount("a");
        sh("umount", &[d.to_str().unwrap()]);
        crash(&s, p, &["pool", "deactivate"]);
        walked += 1;
        if i % 2 == 0 {
            // Activate finishes the half deactivation first.
            s.ok(&["pool", "activate"]);
        } else {
            s.ok(&["pool", "deactivate"]);
            assert_consistent_on(&s, on, false, p);
            s.ok(&["pool", "activate"]);
        }
        // A layer device left active is torn down by recover.
        code_in(&s, &["pool", "recover"], &[0], p);
        assert_consistent_on(&s, on, true, p);
        verify(&s, &want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    for (i, p) in points("pool_activate.").into_iter().enumerate() {
        let t = Instant::now();
        s.ok(&["pool", "deactivate"]);
        crash(&s, p, &["pool", "activate"]);
        walked += 1;
        if i % 2 == 1 {
            // Deactivate finishes the half activation (tears it down).
            s.ok(&["pool", "deactivate"]);
            assert_consistent_on(&s, on, false, p);
        }
        s.ok(&["pool", "activate"]);
        assert_consistent_on(&s, on, true, p);
        verify(&s, &want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    s.ok(on.destroy());
    let expected: Vec<&str> = pool_points()
        .into_iter()
        .filter(|p| matches!(on, On::Files) || DISK_VERBS.iter().any(|v| p.starts_with(v)))
        .collect();
    assert_eq!(
        walked,
        expected.len(),
        "every fault point of the pool's verbs walked ({})",
        on.tag()
    );
    eprintln!(
        "walked {walked} abort points of {} on {} in {:.1} s",
        pool_points().len(),
        on.tag(),
        started.elapsed().as_secs_f64()
    );
}

/// The verbs the walk on disks covers: those whose steps differ there.
const DISK_VERBS: [&str; 3] = ["pool_create.", "pool_deactivate.", "pool_activate."];

/// The layer, spare, mount and reclaim points on pool `s` (holding `a`
/// and `b` as `want` says); returns how many it walked.
fn walk_layer_verbs(s: &Scratch, on: &On, want: &Contents) -> usize {
    let mut walked = 0;
    for (i, p) in points("layer_create.").into_iter().enumerate() {
        let t = Instant::now();
        let id = format!("c{i}");
        crash(s, p, &["layer", "create", &id, "--parent", "b"]);
        walked += 1;
        // The user runs it again: made now, or already made by recovery.
        code_in(s, &["layer", "create", &id, "--parent", "b"], &[0, 4], p);
        assert_consistent_on(s, on, true, p);
        // The new layer is a snapshot of b.
        let d = s.dir(&format!("ro-{id}"));
        s.ok(&["mount", &id, d.to_str().unwrap(), "--readonly"]);
        assert!(
            fs::read(d.join("b.bin")).unwrap() == want["b"].1,
            "{p}: {id} is not b's snapshot"
        );
        s.ok(&["umount", &id]);
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    for p in points("layer_rm.") {
        let t = Instant::now();
        s.ok(&["layer", "create", "victim", "--parent", "b"]);
        crash(s, p, &["layer", "rm", "victim"]);
        walked += 1;
        // Again: removed now, or already removed by recovery.
        code_in(s, &["layer", "rm", "victim"], &[0, 3], p);
        s.fails(&["layer", "rm", "victim"], 3, "no layer");
        assert_consistent_on(s, on, true, p);
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    // A removal for later finishes (the record goes, the id to the trash);
    // so does a reclaim. Then the trash is empty and nothing leaks.
    for p in points("layer_trash.") {
        let t = Instant::now();
        s.ok(&["layer", "create", "victim", "--parent", "b"]);
        crash(s, p, &["layer", "rm", "victim", "--later"]);
        walked += 1;
        code_in(s, &["layer", "rm", "victim", "--later"], &[0, 3], p);
        s.fails(&["layer", "rm", "victim"], 3, "no layer");
        s.ok(&["pool", "reclaim"]);
        assert_settled(s, p);
        assert_consistent_on(s, on, true, p);
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }
    for p in points("reclaim.") {
        let t = Instant::now();
        s.ok(&["layer", "create", "victim", "--parent", "b"]);
        s.ok(&["layer", "rm", "victim", "--later"]);
        crash(s, p, &["pool", "reclaim"]);
        walked += 1;
        code_in(s, &["pool", "recover"], &[0], p);
        s.ok(&["pool", "reclaim"]);
        assert_settled(s, p);
        assert_consistent_on(s, on, true, p);
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    // A provision rolls back; a drop finishes. Either way no spare is
    // left listed, active or mounted, and nothing leaks. Each point is
    // walked for a plain and a mounted spare (`--mounted` reaches every
    // point, `spare_provision.after_mount` only it).
    for p in points("spare_provision.") {
        let t = Instant::now();
        for mounted in [false, true] {
            if !mounted && p.ends_with("after_mount") {
                continue;
            }
            let mut args = vec!["layer", "provision", "b", "--spares", "1"];
            if mounted {
                args.push("--mounted");
            }
            crash(s, p, &args);
            code_in(s, &["pool", "recover"], &[0], p);
            assert_settled(s, p);
            assert_consistent_on(s, on, true, p);
        }
        walked += 1;
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }
    // Mounting kept spares: a crash leaves them listed, mounted or not;
    // the next provision mounts them, a drop takes them away whole.
    for p in points("spare_mount.") {
        let t = Instant::now();
        s.ok(&["layer", "provision", "b", "--spares", "2"]);
        crash(
            s,
            p,
            &["layer", "provision", "b", "--spares", "2", "--mounted"],
        );
        walked += 1;
        code_in(s, &["pool", "recover"], &[0], p);
        // Recorded, then the first mounted: the mounts made are kept.
        let made = usize::from(p.ends_with("after_mount"));
        assert_eq!(s.spare_mounts().len(), made, "{p}");
        assert_eq!(spares_listed(s), 2, "{p}: both still listed");
        s.ok(&["layer", "provision", "b", "--spares", "2", "--mounted"]);
        assert_eq!(s.spare_mounts().len(), 2, "{p}: provision mounts them");
        for m in s.spare_mounts() {
            assert!(
                fs::read(m.join("b.bin")).unwrap() == want["b"].1,
                "{p}: a spare of b"
            );
        }
        s.ok(&["layer", "provision", "b", "--spares", "0"]);
        assert_settled(s, p);
        assert_consistent_on(s, on, true, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }
    for p in points("spare_drop.") {
        let t = Instant::now();
        for mounted in [false, true] {
            let mut args = vec!["layer", "provision", "b", "--spares", "1"];
            if mounted {
                args.push("--mounted");
            }
            s.ok(&args);
            crash(s, p, &["layer", "provision", "b", "--spares", "0"]);
            code_in(s, &["pool", "recover"], &[0], p);
            assert_settled(s, p);
            assert_consistent_on(s, on, true, p);
        }
        walked += 1;
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }
    // Taking a mounted spare: a create that aborts and a mount whose move
    // aborts. The user's retry gets b's snapshot.
    for (i, p) in points("layer_take.").into_iter().enumerate() {
        let t = Instant::now();
        let id = format!("t{i}");
        s.ok(&["layer", "provision", "b", "--mounted"]);
        crash(s, p, &["layer", "create", &id, "--parent", "b"]);
        walked += 1;
        // The pool record still lists the spare: taken once the layer's
        // record is in place (its marker says so), else still a spare.
        let taken = s.root.join("layers").join(format!("{id}.rec")).exists();
        assert_eq!(spares_listed(s), usize::from(!taken), "{p}: taken {taken}");
        code_in(s, &["layer", "create", &id, "--parent", "b"], &[0, 4], p);
        code_in(s, &["pool", "recover"], &[0], p);
        let d = s.dir(&id);
        s.ok(&["mount", &id, d.to_str().unwrap()]);
        assert!(
            fs::read(d.join("b.bin")).unwrap() == want["b"].1,
            "{p}: {id} is not b's snapshot"
        );
        s.ok(&["umount", &id]);
        s.ok(&["layer", "rm", &id]);
        assert_settled(s, p);
        assert_consistent_on(s, on, true, p);
        eprintln!(
            "walked {p} with a mounted spare in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    for p in points("spare_take.") {
        let t = Instant::now();
        s.ok(&["layer", "provision", "b", "--mounted"]);
        s.ok(&["layer", "create", "taker", "--parent", "b"]);
        let d = s.dir("taker");
        crash(s, p, &["mount", "taker", d.to_str().unwrap()]);
        walked += 1;
        // The move happened: mounting again is nothing to do.
        code_in(s, &["mount", "taker", d.to_str().unwrap()], &[0], p);
        assert!(
            fs::read(d.join("b.bin")).unwrap() == want["b"].1,
            "{p}: taker is b's snapshot"
        );
        write_file(&d.join("own.bin"), b"taker's");
        s.ok(&["umount", "taker"]);
        code_in(s, &["pool", "recover"], &[0], p);
        s.ok(&["layer", "rm", "taker"]);
        assert_settled(s, p);
        assert_consistent_on(s, on, true, p);
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    for p in points("mount.") {
        let t = Instant::now();
        let d = s.dir("m");
        crash(s, p, &["mount", "a", d.to_str().unwrap()]);
        walked += 1;
        s.ok(&["mount", "a", d.to_str().unwrap()]);
        assert!(
            fs::read(d.join("a.bin")).unwrap() == want["a"].1,
            "{p}: a's data"
        );
        s.ok(&["umount", "a"]);
        assert_consistent_on(s, on, true, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }

    for p in points("umount.") {
        let t = Instant::now();
        s.mount("a");
        crash(s, p, &["umount", "a"]);
        walked += 1;
        s.ok(&["umount", "a"]);
        assert_consistent_on(s, on, true, p);
        verify(s, want, p);
        eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
    }
    walked
}

#[test]
fn vm_crash_damaged_metadata_is_refused_then_repaired() {
    vm_test(
        "crash-repair",
        Pool::Create(&["--data-size=1G", "--base-size=64M"]),
        |s| {
            let mut want = Contents::new();
            layer_with(s, "a", None, 11, &mut want);
            layer_with(s, "b", Some("a"), 12, &mut want);
            s.ok(&["pool", "deactivate"]);
            s.ok(&["pool", "check"]);
            let out = s.ok(&["pool", "repair"]);
            assert!(
                out.contains("no action taken"),
                "repair of clean metadata is a no-op: {out}"
            );

            // Garbage over btree blocks: the roots of the data space map's index
            // and the metadata space map's index, found through the superblock
            // (struct thin_disk_superblock: data_space_map_root at byte 64 and
            // metadata_space_map_root at 192, each nr_blocks, nr_allocated,
            // bitmap_root, ...). thin_check fails; thin_repair rebuilds both maps
            // from the mapping trees, which are intact.
            let meta = s.root.join("metadata.img");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&meta)
                .unwrap();
            let mut sb = [0u8; 512];
            f.read_exact_at(&mut sb, 0).unwrap();
            for (i, at) in [80usize, 208].into_iter().enumerate() {
                let block = u64::from_le_bytes(sb[at..at + 8].try_into().unwrap());
                assert!(block > 0, "space map root at byte {at} of the superblock");
                f.write_all_at(&pattern(99 + i as u64, 4096), block * 4096)
                    .unwrap();
            }
            f.sync_all().unwrap();
            drop(f);

            s.fails(&["pool", "activate"], 7, "thinlayer pool repair");
            let (dms, loops) = kernel_state(s);
            assert!(
                dms.is_empty() && loops.is_empty(),
                "a refused activate left {dms:?} {loops:?}"
            );
            s.fails(&["pool", "check"], 7, "pool check found");
            let out = s.ok(&["pool", "repair"]);
            assert!(out.contains("damaged copy is kept"), "{out}");
            let kept: Vec<_> = fs::read_dir(&s.root)
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("metadata.img.damaged-")
                })
                .collect();
            assert_eq!(kept.len(), 1, "the damaged copy is kept");
            s.ok(&["pool", "activate"]);
            assert_consistent(s, true, "after repair");
            verify(s, &want, "after repair");
        },
    );
}

#[test]
fn vm_crash_unknown_thin_device_is_found_and_removed_by_force() {
    vm_test(
        "crash-unknown",
        Pool::Create(&["--data-size=1G", "--base-size=64M"]),
        |s| {
            let mut want = Contents::new();
            layer_with(s, "a", None, 21, &mut want);
            assert_consistent(s, true, "set-up");
            let id = pool_id(s);

            // Behind thinlayer's back: a thin id in the pool metadata, and a
            // device of the pool's name pattern for it.
            use thinlayer_pool::{
                kernel::Kernel,
                names::{PoolId, Role, dm_name, dm_uuid},
            };
            let pid = PoolId::new(&id).unwrap();
            let kernel = Kernel::open().unwrap();
            let pool = dm_name(&pid, Role::Pool);
            kernel.pool_message(&pool, "create_thin 77").unwrap();
            kernel.pool_message(&pool, "create_thin 78").unwrap();
            let pool_dev = kernel.device(&pool).unwrap().unwrap();
            kernel
                .new_thin(
                    &dm_name(&pid, Role::Thin(77)),
                    &dm_uuid(&pid, Role::Thin(77)),
                    pool_dev,
                    thinlayer_pool::ThinId::new(77).unwrap(),
                    thinlayer_pool::kernel::Sectors(1 << 17),
                )
                .unwrap();

            let out = s.run(&["--json", "pool", "check"]);
            assert_eq!(
                out.status.code(),
                Some(7),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let r: Value = serde_json::from_slice(&out.stdout).unwrap();
            let kinds: Vec<&str> = r["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["kind"].as_str().unwrap())
                .collect();
            assert!(kinds.contains(&"unknown_device"), "{r:#}");
            assert_eq!(
                kinds.iter().filter(|k| **k == "unknown_thin_id").count(),
                2,
                "{r:#}"
            );
            s.fails(&["pool", "check"], 7, "pool check found");

            // Without --force nothing of it is touched.
            s.fails(&["pool", "recover"], 7, "pool check found");
            assert!(
                dm_devices().contains(&format!("tl1-{id}-thin-77")),
                "recover without --force removed it"
            );

            let out = s.ok(&["pool", "recover", "--force"]);
            assert!(
                out.contains("thin-77") && out.contains("thin id 78"),
                "{out}"
            );
            assert_consistent(s, true, "after recover --force");
            verify(s, &want, "after recover --force");
        },
    );
}

// --- the store's verbs: layer apply and commit, container create and rm,
// image rm (their intents under ROOT/store, settled at the next exclusive
// open of the store)

/// The store's fault points, by verb; `vm_crash_every_fault_point_recovers`
/// walks the others.
const STORE_VERBS: [&str; 4] = [
    "layer_apply.",
    "container_create.",
    "container_rm.",
    "image_rm.",
];

/// The pool's own fault points.
fn pool_points() -> Vec<&'static str> {
    thinlayer_pool::fault::ALL
        .iter()
        .copied()
        .filter(|p| !STORE_VERBS.iter().any(|v| p.starts_with(v)))
        .filter(|p| !p.starts_with(SNAPSHOTTER_POINTS))
        .collect()
}

/// The containerd snapshotter's points, walked in `vm_servers`.
const SNAPSHOTTER_POINTS: &str = "snapshotter_";

/// The walk means nothing in a build without fault points.
fn require_fault_points() {
    assert!(
        !thinlayer_pool::fault::ALL.is_empty(),
        "this test build has no fault points: build it with `--features thinlayer/fault-injection` (tools/test does)"
    );
}

/// No store intent left, exactly the layers `want`, the pool settled and
/// consistent with the kernel.
fn assert_store_settled(s: &Scratch, want: &std::collections::BTreeSet<String>, why: &str) {
    assert!(
        !s.root.join("store/intent.rec").exists(),
        "{why}: a store intent is left"
    );
    assert_eq!(
        &s.layer_ids::<std::collections::BTreeSet<_>>(),
        want,
        "{why}: layers leaked or lost"
    );
    assert_settled(s, why);
    assert_consistent(s, true, why);
}

#[test]
fn vm_crash_store_verbs_recover_at_every_point() {
    vm_test("crash-store", Pool::Small, |s| {
        require_fault_points();
        let started = Instant::now();
        let f = common::fixtures();
        let image = s.json(&["image", "import", f.join("demo-oci").to_str().unwrap()]);
        let chain: Vec<String> = image["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect();
        s.ok(&["container", "create", "web", "--image", "demo:1"]);
        let at = s.ok(&["container", "mount", "web"]);
        let web_data = pattern(31, 256 << 10);
        write_file(&Path::new(at.trim()).join("web.bin"), &web_data);
        s.ok(&["container", "umount", "web"]);
        let base: std::collections::BTreeSet<String> = s.layer_ids();
        assert_store_settled(s, &base, "set-up");
        let other_tar = f.join("layers/other.tar");
        let mut walked = 0;

        // layer apply and container commit: rolled back before the layer is
        // complete, kept after; the user's second try makes it or finds it.
        for (i, p) in points("layer_apply.").into_iter().enumerate() {
            let t = Instant::now();
            for verb in ["apply", "commit"] {
                let id = format!("{verb}{i}");
                let args: Vec<&str> = if verb == "apply" {
                    vec![
                        "layer",
                        "apply",
                        &id,
                        other_tar.to_str().unwrap(),
                        "--parent",
                        &chain[0],
                    ]
                } else {
                    vec!["container", "commit", "web", "--as", &id]
                };
                crash(s, p, &args);
                code_in(s, &args, &[0, 4], p);
                let mut want = base.clone();
                want.insert(id.clone());
                assert_store_settled(s, &want, &format!("{p} ({verb})"));
                let d = s.dir(&format!("ro-{id}"));
                s.ok(&["mount", &id, d.to_str().unwrap(), "--readonly"]);
                if verb == "commit" {
                    assert!(
                        fs::read(d.join("web.bin")).unwrap() == web_data,
                        "{p}: the commit holds the container's file"
                    );
                } else {
                    assert!(
                        fs::read_dir(&d).unwrap().count() > 3,
                        "{p}: the applied layer holds the tar's tree"
                    );
                }
                s.ok(&["umount", &id]);
                s.ok(&["layer", "rm", &id]);
            }
            walked += 1;
            eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
        }

        // container create (with an anonymous volume filled from the image):
        // rolled back before its record, the volume too; kept after.
        for (i, p) in points("container_create.").into_iter().enumerate() {
            let t = Instant::now();
            let name = format!("c{i}");
            let args = [
                "container",
                "create",
                &name,
                "--image",
                "demo:1",
                "--volume",
                "/srv",
            ];
            crash(s, p, &args);
            code_in(s, &args, &[0, 4], p);
            let mut want = base.clone();
            want.extend([
                format!("{name}-init"),
                format!("{name}-rw"),
                format!("vol-anon-{name}-0"),
            ]);
            assert_store_settled(s, &want, p);
            let at = s.ok(&["container", "mount", &name]);
            assert_eq!(
                fs::read_to_string(Path::new(at.trim()).join("etc/hostname")).unwrap(),
                format!("{name}\n"),
                "{p}: the init layer is whole"
            );
            assert_eq!(
                fs::read_to_string(Path::new(at.trim()).join("srv/replace/inside")).unwrap(),
                "now a directory\n",
                "{p}: the anonymous volume holds the image's /srv"
            );
            s.ok(&["container", "umount", &name]);
            s.ok(&["container", "rm", &name, "--volumes"]);
            assert_store_settled(s, &base, p);
            assert!(
                !s.ok(&["volume", "ls"]).contains("anon-"),
                "{p}: an anonymous volume is left"
            );
            walked += 1;
            eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
        }

        // container rm: always finished, by the next store command whichever
        // it is (today's bug: a half-removed container could never be removed).
        // With --volumes, its anonymous volume goes too.
        for (i, p) in points("container_rm.").into_iter().enumerate() {
            let t = Instant::now();
            s.ok(&[
                "container",
                "create",
                "victim",
                "--image",
                "demo:1",
                "--volume",
                "/srv",
            ]);
            if i % 2 == 0 {
                // Mounted: the removal unmounts it first.
                s.ok(&["container", "mount", "victim"]);
            }
            let rm = ["container", "rm", "victim", "--volumes"];
            crash(s, p, &rm);
            if i % 2 == 0 {
                code_in(s, &rm, &[0, 3], p);
            } else {
                let v = format!("v{i}");
                s.ok(&["volume", "create", &v, "--size", "32M"]);
                s.fails(&rm, 3, "no container");
                s.ok(&["volume", "rm", &v]);
            }
            assert!(
                !s.ok(&["container", "ls"]).contains("victim"),
                "{p}: the container is still listed"
            );
            assert!(
                !s.ok(&["volume", "ls"]).contains("anon-victim"),
                "{p}: its anonymous volume is left"
            );
            assert_store_settled(s, &base, p);
            walked += 1;
            eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
        }

        // image rm: always finished; the base other:1 shares with demo:1 stays.
        for p in points("image_rm.") {
            let t = Instant::now();
            let other = s.json(&[
                "image",
                "import",
                f.join("other-docker.tar").to_str().unwrap(),
                "--name",
                "other",
            ]);
            assert_eq!(other["applied"], 1, "{p}: other's own top layer");
            crash(s, p, &["image", "rm", "other"]);
            code_in(s, &["image", "rm", "other"], &[0, 3], p);
            assert!(
                !s.ok(&["image", "ls"]).contains("other"),
                "{p}: the image is still listed"
            );
            assert_store_settled(s, &base, p);
            walked += 1;
            eprintln!("walked {p} in {:.1} s", t.elapsed().as_secs_f64());
        }

        let store_points = thinlayer_pool::fault::ALL
            .iter()
            .filter(|p| STORE_VERBS.iter().any(|v| p.starts_with(v)))
            .count();
        assert_eq!(walked, store_points, "every store fault point walked");
        // The container made before every abort is whole.
        let at = s.ok(&["container", "mount", "web"]);
        assert!(
            fs::read(Path::new(at.trim()).join("web.bin")).unwrap() == web_data,
            "web's data after the walk"
        );
        s.ok(&["container", "umount", "web"]);
        eprintln!(
            "walked {walked} store abort points in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    });
}
