//! Busy devices name who holds them: a process with the device open, a
//! process working inside a mount, and a mount namespace that still mounts
//! the device after the host unmounted it (the leak behind the anchors'
//! "device or resource busy").

mod common;

use common::{Pool, Scratch, vm_test};

use std::{
    fs,
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

fn devnode(s: &Scratch, id: &str) -> String {
    let ls = s.json(&["layer", "ls"]);
    ls.as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == id)
        .and_then(|l| l["devnode"].as_str())
        .unwrap_or_else(|| panic!("{id} is not active: {ls}"))
        .to_owned()
}

/// Unmounts layer `id` (mounted at `dir`) behind thinlayer's back, so its
/// device stays active, and starts a process that holds the device open.
fn hold_open(s: &Scratch, id: &str, dir: &std::path::Path) -> std::process::Child {
    let node = devnode(s, id);
    common::sh("umount", &[dir.to_str().unwrap()]);
    let holder = Command::new("sleep")
        .arg("120")
        .stdin(fs::File::open(&node).unwrap())
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(200));
    holder
}

#[test]
fn vm_removing_a_layer_a_process_holds_open_names_that_process() {
    vm_test("busy-open", Pool::Small, |s| {
        s.ok(&["layer", "create", "held"]);
        let d = s.mount("held");
        let mut holder = hold_open(s, "held", &d);
        let err = s.fails(&["layer", "rm", "held"], 4, "is busy");
        println!("{err}");
        assert!(
            err.contains(&format!("pid {} (sleep)", holder.id())),
            "{err}"
        );
        assert_eq!(
            s.json(&["layer", "ls"]).as_array().unwrap().len(),
            1,
            "nothing removed"
        );
        holder.kill().unwrap();
        holder.wait().unwrap();
        s.ok(&["layer", "rm", "held"]);
    });
}

#[test]
fn vm_unmounting_under_a_working_process_names_it() {
    vm_test("busy-cwd", Pool::Small, |s| {
        s.ok(&["layer", "create", "l"]);
        let d = s.mount("l");
        let mut holder = Command::new("sleep")
            .arg("120")
            .current_dir(&d)
            .spawn()
            .unwrap();
        sleep(Duration::from_millis(200));
        let err = s.fails(&["umount", "l"], 4, "is busy");
        println!("{err}");
        assert!(
            err.contains(&format!("pid {} (sleep)", holder.id())),
            "{err}"
        );
        assert!(err.contains("working directory"), "{err}");
        holder.kill().unwrap();
        holder.wait().unwrap();
        s.ok(&["umount", "l"]);
    });
}

#[test]
fn vm_a_mount_namespace_that_still_mounts_a_layer_is_named() {
    vm_test("busy-ns", Pool::Small, |s| {
        s.ok(&["layer", "create", "l"]);
        s.mount("l");
        // A process in a private copy of our mount namespace keeps the mount.
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sleep", "120"])
            .stdout(Stdio::null())
            .spawn()
            .expect("unshare (busybox or util-linux) in the VM");
        sleep(Duration::from_millis(500));
        let err = s.fails(&["umount", "l"], 4, "is busy");
        println!("{err}");
        assert!(err.contains("mount namespace"), "{err}");
        assert!(err.contains(&format!("pid {}", holder.id())), "{err}");
        let err = s.fails(&["layer", "rm", "l"], 4, "mount namespace");
        assert!(err.contains(&format!("pid {}", holder.id())), "{err}");
        holder.kill().unwrap();
        holder.wait().unwrap();
        s.ok(&["layer", "rm", "l"]);
    });
}

#[test]
fn vm_a_deferred_removal_finishes_when_the_holder_lets_go() {
    vm_test("busy-deferred", Pool::Small, |s| {
        s.ok(&["layer", "create", "held"]);
        let d = s.mount("held");
        fs::write(d.join("data"), vec![3u8; 8 << 20]).unwrap();
        let mut holder = hold_open(s, "held", &d);
        let out = s.ok(&["layer", "rm", "held", "--deferred"]);
        println!("{out}");
        assert!(
            out.contains("deferred") && out.contains(&format!("pid {} (sleep)", holder.id())),
            "{out}"
        );
        let ls = s.json(&["layer", "ls"]);
        assert_eq!(ls[0]["removing"], true, "{ls}");
        s.fails(
            &["mount", "held", s.dir("again").to_str().unwrap()],
            4,
            "deferred",
        );
        s.fails(
            &["layer", "create", "child", "--parent", "held"],
            4,
            "deferred",
        );
        // Still busy: recovery reports it and keeps the layer.
        let report = s.ok(&["pool", "recover"]);
        assert!(report.contains("still deferred"), "{report}");
        holder.kill().unwrap();
        holder.wait().unwrap();
        sleep(Duration::from_millis(200));
        // The kernel removed the device when the holder closed it; recovery
        // finishes the removal and gives the blocks back.
        let before = s.used_data_blocks();
        let report = s.ok(&["pool", "recover"]);
        assert!(
            report.contains("finished the deferred removal of layer held"),
            "{report}"
        );
        assert_eq!(s.json(&["layer", "ls"]), serde_json::json!([]));
        assert!(
            s.used_data_blocks() + 100 < before,
            "the layer's 8 MiB went back to the pool"
        );
        s.ok(&["pool", "check"]);
    });
}
