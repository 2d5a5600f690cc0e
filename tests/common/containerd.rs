//! What the containerd suites share (`vm_containerd`, `vm_cri`): finding
//! the guest's programs, running them with a deadline, waiting, and the
//! snapshotter's layers and thin devices a test must not leak.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use super::{Scratch, dm_devices};

/// A program on PATH, or a failure saying how to get it into the guest.
pub fn program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not in this guest: boot it with THINLAYER_VM_EXTRAS=containerd (or docker) \
                 (tools/vm/run), after tools/setup installed containerd and runc"
            )
        })
}

/// Runs `cmd`, killing it after `secs`.
pub fn run_timeout(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Polls `f` every 200 ms until it holds, failing after `secs`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(200));
    }
}

/// Layer ids of the pool the snapshotter made.
pub fn ctrd_layers(s: &Scratch) -> Vec<String> {
    // --wait: the server holds the root's lock during each request.
    s.json(&["--wait", "layer", "ls"])
        .as_array()
        .expect("layer ls --json is a list")
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .filter(|id| id.starts_with("ctrd-"))
        .collect()
}

/// Active thin devices (of any pool): what must not leak.
pub fn thin_devices() -> Vec<String> {
    dm_devices()
        .into_iter()
        .filter(|n| n.contains("-thin-"))
        .collect()
}
