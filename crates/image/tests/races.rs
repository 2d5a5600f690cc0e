//! A process racing on the tree: a directory swapped for a symlink to an
//! outside directory (`renameat2(RENAME_EXCHANGE)`, as a container process
//! can) while a layer is applied, diffed or exported. Nothing outside the
//! root may be written or read; each run succeeds or fails cleanly.

mod common;

use std::{
    fs,
    os::fd::AsFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use nix::fcntl::{RenameFlags, renameat2};
use thinlayer_image::{ApplyOptions, Error, Manifest, apply_layer, changes, manifest, write_layer};

/// Swaps `a` and `b` (names in `dir`) until `stop`, counting the swaps.
/// With `pause`, each swap is undone at once and the next pair waits
/// `pause`: the tree is mostly as it should be and changes for an instant,
/// which is when a check-then-use walker is caught out (a constantly
/// flipping tree mostly makes the first check fail).
fn swapper(
    dir: &Path,
    a: &'static str,
    b: &'static str,
    pause: Option<Duration>,
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    let dir = fs::File::open(dir).unwrap();
    // Whether it swapped: a name the walk is replacing (an apply removes
    // the symlink it finds where its directory goes, then makes the
    // directory) is briefly missing; that swap is skipped.
    let exchange =
        move || match renameat2(dir.as_fd(), a, dir.as_fd(), b, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => true,
            Err(nix::errno::Errno::ENOENT) => false,
            Err(e) => panic!("swap {a} and {b}: {e}"),
        };
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if exchange() {
                swaps.fetch_add(1, Ordering::Relaxed);
                if let Some(pause) = pause {
                    // Undone at once; if the name went meanwhile, the next
                    // swap finds the tree as it is.
                    exchange();
                    thread::sleep(pause);
                    continue;
                }
            }
            thread::yield_now();
        }
    })
}

/// An outside directory with canary files, and its manifest.
fn canary(t: &TempDir) -> (std::path::PathBuf, Manifest) {
    let outside = t.sub("outside");
    write(&outside, "canary", b"CANARY-7f3e9a host secret\n", 0o600);
    mkdir(&outside, "sub", 0o755);
    write(&outside, "sub/shadow", b"CANARY-7f3e9a root:$6$\n", 0o600);
    let m = manifest(&outside).unwrap();
    (outside, m)
}

fn assert_unchanged(outside: &Path, before: &Manifest) {
    let after = manifest(outside).unwrap();
    let diffs = thinlayer_image::differences(before, &after, 20);
    assert!(
        diffs.is_empty(),
        "the outside directory changed:\n{}",
        diffs.join("\n")
    );
}

fn is_clean(err: &Error) -> bool {
    matches!(
        err,
        Error::Hostile { .. } | Error::Io { .. } | Error::Changed { .. }
    )
}

#[test]
fn concurrent_renamer_during_a_10000_entry_apply_writes_nothing_outside() {
    let t = TempDir::new("apply-race");
    let (outside, before) = canary(&t);
    let mut tar = Tar::new().dir("d/", 0o755).dir("d/sub/", 0o755);
    for i in 0..5000 {
        tar = tar.file(&format!("d/f{i:05}"), b"layer", 0o644);
        tar = tar.file(&format!("d/sub/g{i:05}"), b"layer", 0o644);
    }
    let tar = tar.finish();

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let (mut ok, mut failed, mut entries_before_failure) = (0, 0, 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut round = 0;
    while round < 24 && Instant::now() < deadline {
        round += 1;
        let root = t.sub(&format!("root{round}"));
        mkdir(&root, "d", 0o755);
        mkdir(&root, "d/sub", 0o755);
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        stop.store(false, Ordering::Relaxed);
        // Odd rounds flip constantly, even rounds flip for an instant.
        let pause = (round % 2 == 0).then(|| Duration::from_micros(50));
        let h = swapper(&root, "d", "evil", pause, stop.clone(), swaps.clone());
        // The apply starts once the renamer has flipped, so every round
        // races it (an apply the first flip stops fails in microseconds:
        // a count of flips over all rounds could stay low on a busy host).
        let flipped = swaps.load(Ordering::Relaxed);
        let waited = Instant::now();
        while swaps.load(Ordering::Relaxed) == flipped {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the renamer never ran"
            );
            std::thread::yield_now();
        }
        let progress = std::cell::Cell::new(0u64);
        let seen = |p: u64| progress.set(p);
        let opts = ApplyOptions {
            progress: Some(&seen),
            ..Default::default()
        };
        let result = apply_layer(&root, &tar[..], &opts);
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        match result {
            Ok(report) => {
                assert_eq!(report.entries, 10002);
                ok += 1;
            }
            Err(e) => {
                assert!(is_clean(&e), "not a clean failure: {e}");
                entries_before_failure += progress.get();
                failed += 1;
            }
        }
        assert_unchanged(&outside, &before);
        fs::remove_dir_all(&root).unwrap();
    }
    eprintln!(
        "{round} rounds: {ok} applied, {failed} failed cleanly ({entries_before_failure} bytes \
         applied before the failures), {} swaps",
        swaps.load(Ordering::Relaxed)
    );

    // Without the renamer the same layer applies whole.
    let root = t.sub("calm");
    let report = apply_layer(&root, &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(report.entries, 10002);
}

/// Lower: `data/` with two files. Upper: the same, plus one changed file,
/// plus `link -> outside` (a symlink a container could make).
fn walker_trees(t: &TempDir, outside: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let lower = t.sub("lower");
    let upper = t.sub("upper");
    for root in [&lower, &upper] {
        mkdir(root, "data", 0o755);
        write(root, "data/shadow", b"inside-a\n", 0o644);
        write(root, "data/passwd", b"inside-b\n", 0o644);
        set_mtime(&root.join("data"), T0, 0);
    }
    write(&upper, "data/passwd", b"inside-B\n", 0o644);
    std::os::unix::fs::symlink(outside, upper.join("link")).unwrap();
    (lower, upper)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_directory_swapped_for_a_symlink_is_exported_as_the_symlink() {
    let t = TempDir::new("walk-swapped");
    let (outside, _) = canary(&t);
    let (lower, upper) = walker_trees(&t, &outside);
    // Swapped before the walk: upper's `data` is now the symlink to outside.
    renameat2(
        fs::File::open(&upper).unwrap().as_fd(),
        "data",
        fs::File::open(&upper).unwrap().as_fd(),
        "link",
        RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    let mut out = Vec::new();
    write_layer(&lower, &upper, &mut out).unwrap();
    assert!(!contains(&out, b"CANARY-7f3e9a"), "host bytes in the layer");
    let mut archive = tar::Archive::new(&out[..]);
    let mut data = None;
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        assert!(
            !(path.starts_with("data") && path != Path::new("data")),
            "an entry under the symlink was exported: {}",
            path.display()
        );
        if path == Path::new("data") {
            data = Some((
                entry.header().entry_type(),
                entry.link_name().unwrap().map(|l| l.into_owned()),
            ));
        }
    }
    assert_eq!(
        data,
        Some((tar::EntryType::Symlink, Some(outside.clone()))),
        "`data` is exported as the symlink it now is"
    );
    let c = changes(&lower, &upper).unwrap();
    assert!(
        c.iter()
            .all(|c| !(c.path.starts_with("data") && c.path != Path::new("data"))),
        "{c:?}"
    );
}

#[test]
fn concurrent_swaps_never_put_an_outside_byte_in_an_export() {
    let t = TempDir::new("walk-race");
    let (outside, _) = canary(&t);
    // The outside dir has the same names as `data`, with canary content.
    write(&outside, "shadow", b"CANARY-7f3e9a shadow\n", 0o644);
    write(&outside, "passwd", b"CANARY-7f3e9a passwd\n", 0o644);
    let before_names = manifest(&outside).unwrap();
    let (lower, upper) = walker_trees(&t, &outside);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let h = swapper(&upper, "data", "link", None, stop.clone(), swaps.clone());
    let (mut ok, mut changed, mut runs) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while runs < 300 || (swaps.load(Ordering::Relaxed) < 300 && Instant::now() < deadline) {
        runs += 1;
        let mut out = Vec::new();
        match write_layer(&lower, &upper, &mut out) {
            Ok(_) => {
                assert!(!contains(&out, b"CANARY-7f3e9a"), "host bytes in the layer");
                ok += 1;
            }
            Err(e) => {
                assert!(is_clean(&e), "not a clean failure: {e}");
                changed += 1;
            }
        }
        match manifest(&upper) {
            Ok(m) => {
                for d in m.values() {
                    let outside_hash = before_names.values().filter_map(|o| o.sha256.as_ref());
                    for h in outside_hash {
                        assert_ne!(d.sha256.as_ref(), Some(h), "an outside file was hashed");
                    }
                }
            }
            Err(e) => assert!(is_clean(&e), "not a clean failure: {e}"),
        }
        if let Err(e) = changes(&lower, &upper) {
            assert!(is_clean(&e), "not a clean failure: {e}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    assert!(swaps.load(Ordering::Relaxed) > 50, "the swapper barely ran");
    eprintln!(
        "{runs} exports: {ok} complete, {changed} refused as changed, {} swaps",
        swaps.load(Ordering::Relaxed)
    );
    assert_unchanged(&outside, &before_names);
}
