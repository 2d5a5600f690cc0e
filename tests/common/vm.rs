//! The `vm_` test harness: a test's body is written once and run between
//! two sweeps of thinlayer's kernel objects, so that one test's leak (a
//! destroy bug, a failed assertion half-way through) never reaches the next
//! test of the serial VM run.
//!
//! The sweep goes through the kernel, never through the `thinlayer` CLI
//! under test: dm devices are listed and removed with dm ioctls (the
//! `devicemapper` crate), mounts are read from `/proc/self/mountinfo`, loop
//! devices from sysfs and detached with `LOOP_CLR_FD` (`loopdev-3`). It
//! touches only thinlayer's devices (dm names `tl<FORMAT>-<pool>-<role>`,
//! see `crates/pool/src/names.rs`) and loop devices backed by files under a
//! test scratch directory (`$TMPDIR/tl-*`); nothing else on the host.
//!
//! What the sweep after a test has to remove is a leak, and a leak fails
//! that test (unless it failed already). `NO_TEST_CLEAN_UP=1` keeps the
//! stack of a test for debugging: no destroy, no sweep after (the next
//! test's sweep before still starts it from a clean kernel).

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    path::{Path, PathBuf},
    time::Duration,
};

use devicemapper::{DM, DevId, DmNameBuf, DmOptions};

use super::Scratch;

/// The pool a [`vm_test`] creates before its body runs.
#[derive(Clone, Copy, Debug)]
pub enum Pool<'a> {
    /// No pool: the body creates its own (or none).
    None,
    /// `pool create` with [`Scratch::create_pool`]'s small sizes.
    Small,
    /// As `Small`, with these flags added.
    With(&'a [&'a str]),
    /// `pool create` with exactly these flags (sizes of its own).
    Create(&'a [&'a str]),
}

/// Runs one `vm_` test: sweeps, makes the scratch root `name` (and the pool
/// `pool`), runs `body`, destroys the pool through the CLI (a step of the
/// test: destroy must succeed) and sweeps again; fails the test with what
/// the last sweep had to remove.
pub fn vm_test(name: &str, pool: Pool<'_>, body: impl FnOnce(&Scratch)) {
    swept(|| {
        let s = Scratch::new(name);
        match pool {
            Pool::None => {}
            Pool::Small => s.create_pool(&[]),
            Pool::With(extra) => s.create_pool(extra),
            Pool::Create(flags) => {
                s.ok(&[&["pool", "create"], flags].concat());
            }
        }
        body(&s);
        // Scratch's drop destroys the pool (`pool destroy --force`) and
        // fails the test if that fails.
    });
}

/// Runs `body` between two sweeps, for tests whose set-up does not fit
/// [`vm_test`] (their own scratch, servers, disks): the same guarantee.
/// What `body` returns is dropped before the second sweep.
pub fn swept<T>(body: impl FnOnce() -> T) {
    super::require_dm_thin();
    let before = sweep();
    if !before.is_empty() {
        eprintln!("vm harness: removed leftovers of an earlier test: {before:#?}");
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| drop(body())));
    if keep() {
        eprintln!("NO_TEST_CLEAN_UP: the test's devices and mounts are kept");
        if let Err(p) = outcome {
            resume_unwind(p);
        }
        return;
    }
    let after = catch_unwind(sweep);
    match (outcome, after) {
        (Err(failed), after) => {
            match after {
                Ok(left) if !left.is_empty() => {
                    eprintln!("vm harness: the failed test left (now removed): {left:#?}");
                }
                Ok(_) => {}
                Err(_) => eprintln!("vm harness: the sweep after the failed test failed too"),
            }
            resume_unwind(failed);
        }
        (Ok(()), Err(sweep_failed)) => resume_unwind(sweep_failed),
        (Ok(()), Ok(left)) => assert!(
            left.is_empty(),
            "the test leaked kernel objects (removed by the harness): {left:#?}"
        ),
    }
}

fn keep() -> bool {
    std::env::var_os("NO_TEST_CLEAN_UP").is_some()
}

/// Removes every mount of a thinlayer device or under a test scratch
/// directory, every thinlayer dm device, and every loop device backed by a
/// file under a test scratch directory; what it removed, one line each.
/// Fails if something cannot be removed.
pub fn sweep() -> Vec<String> {
    let dm = DM::new().expect("open /dev/mapper/control");
    let mut removed = Vec::new();
    let devices = thinlayer_devices(&dm);
    let devnos: Vec<String> = devices.iter().map(|(_, d)| d.clone()).collect();
    for m in mounts().into_iter().rev() {
        if devnos.contains(&m.devno) || in_scratch(&m.point) {
            umount(&m.point);
            removed.push(format!("mount {} ({})", m.point.display(), m.devno));
        }
    }
    // Thin devices before the pool, the pool before its linear devices; a
    // device still busy is retried after the others are gone.
    let mut left: Vec<String> = devices.into_iter().map(|(n, _)| n).collect();
    left.sort_by_key(|n| (!n.contains("-thin-"), !n.ends_with("-pool"), n.clone()));
    for attempt in 0..10 {
        let mut busy = Vec::new();
        for name in left {
            let id = DmNameBuf::new(name.clone()).expect("a listed name is valid");
            match dm.device_remove(&DevId::Name(&id), DmOptions::default()) {
                Ok(_) => removed.push(format!("dm {name}")),
                Err(e) => busy.push((name, e)),
            }
        }
        if busy.is_empty() {
            break;
        }
        assert!(attempt < 9, "vm harness: cannot remove {busy:?}");
        left = busy.into_iter().map(|(n, _)| n).collect();
        std::thread::sleep(Duration::from_millis(200));
    }
    for (dev, file) in scratch_loops() {
        loopdev::LoopDevice::open(&dev)
            .and_then(|l| l.detach())
            .unwrap_or_else(|e| panic!("vm harness: detach {}: {e}", dev.display()));
        removed.push(format!("loop {} ({})", dev.display(), file.display()));
    }
    removed
}

/// Whether `name` is a thinlayer dm name: `tl<digits>-<8 hex>-<role>`.
pub fn is_thinlayer_dm_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("tl") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let Some(rest) = rest[digits..].strip_prefix('-') else {
        return false;
    };
    digits > 0
        && rest.len() > 9
        && rest.as_bytes()[8] == b'-'
        && rest.as_bytes()[..8].iter().all(u8::is_ascii_hexdigit)
}

/// thinlayer's dm devices: name and `major:minor`.
fn thinlayer_devices(dm: &DM) -> Vec<(String, String)> {
    dm.list_devices()
        .expect("list dm devices")
        .into_iter()
        .map(|(name, dev, _)| (name.to_string(), format!("{}:{}", dev.major, dev.minor)))
        .filter(|(name, _)| is_thinlayer_dm_name(name))
        .collect()
}

/// Whether `p` lies under a test scratch directory (`$TMPDIR/tl-*`).
fn in_scratch(p: &Path) -> bool {
    p.strip_prefix(std::env::temp_dir())
        .ok()
        .and_then(|rest| rest.components().next())
        .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with("tl-"))
}

/// One mount: the device (`major:minor`) and the mount point.
struct Mount {
    devno: String,
    point: PathBuf,
}

/// The mounts of this namespace, in mount order (the engine's mountinfo
/// reader: the sweep avoids the CLI under test, not the parser).
fn mounts() -> Vec<Mount> {
    thinlayer_pool::mounts::all()
        .expect("read mountinfo")
        .into_iter()
        .map(|m| Mount {
            devno: format!("{}:{}", m.device.major, m.device.minor),
            point: m.mountpoint,
        })
        .collect()
}

/// Unmounts `p`; lazily if it is busy.
fn umount(p: &Path) {
    use nix::mount::{MntFlags, umount2};
    if umount2(p, MntFlags::empty()).is_err() {
        umount2(p, MntFlags::MNT_DETACH)
            .unwrap_or_else(|e| panic!("vm harness: umount {}: {e}", p.display()));
    }
}

/// Loop devices (node, backing file) whose file lies under a test scratch
/// directory, from sysfs.
fn scratch_loops() -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let Ok(f) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let f = f.trim_end();
        let file = PathBuf::from(f.strip_suffix(" (deleted)").unwrap_or(f));
        if in_scratch(&file) {
            out.push((Path::new("/dev").join(e.file_name()), file));
        }
    }
    out
}
