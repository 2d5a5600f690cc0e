//! Named crash points for testing crash consistency.
//!
//! Every mutating command calls [`point`] between its kernel steps and its
//! record steps. When the environment variable `THINLAYER_FAULT` names that
//! point, the process prints the name to stderr and aborts at once
//! (`std::process::abort`: no destructors, no cleanup, as a `kill -9` or a
//! power cut would leave it; the kernel keeps whatever it was told). Tests
//! walk [`ALL`] to prove that every such interruption is recovered.
//!
//! Otherwise a point costs one comparison: the variable is read once.
//!
//! The points exist only in test builds: the cargo feature
//! `fault-injection` (`--features thinlayer/fault-injection`, which
//! `tools/test` passes) compiles them in. Without it [`point`] is an empty
//! inline function, [`ALL`] is empty, and a set `THINLAYER_FAULT` is
//! refused at start-up ([`list_requested`]) so that a shipped binary never
//! aborts on purpose and never seems to.
//!
//! What must never happen: a point name missing from [`ALL`] (a host test
//! checks the sources against it), or a point inside a step that the kernel
//! performs atomically anyway (it would test nothing).

#[cfg(feature = "fault-injection")]
use std::sync::OnceLock;

/// The environment variable that arms a point.
pub const ENV: &str = "THINLAYER_FAULT";

/// Every fault point, in the order the commands reach them (empty in a
/// build without the `fault-injection` feature).
#[cfg(not(feature = "fault-injection"))]
pub const ALL: &[&str] = &[];

/// Every fault point, in the order the commands reach them (empty in a
/// build without the `fault-injection` feature).
#[cfg(feature = "fault-injection")]
pub const ALL: &[&str] = &[
    // pool create
    "pool_create.after_intent",
    "pool_create.after_files",
    "pool_create.after_loops",
    "pool_create.after_meta_linear",
    "pool_create.after_data_linear",
    "pool_create.after_pool",
    "pool_create.after_base_thin",
    "pool_create.after_base_activation",
    "pool_create.after_mkfs",
    "pool_create.after_base_teardown",
    "pool_create.after_set_transaction_id",
    "pool_create.after_record",
    // pool activate
    "pool_activate.after_leftovers",
    "pool_activate.after_loops",
    "pool_activate.after_meta_linear",
    "pool_activate.after_data_linear",
    "pool_activate.after_pool",
    // pool deactivate
    "pool_deactivate.after_thin_removal",
    "pool_deactivate.after_pool_removal",
    "pool_deactivate.after_data_removal",
    "pool_deactivate.after_meta_removal",
    // layer create
    "layer_create.after_intent",
    "layer_create.after_snapshot",
    "layer_create.after_record",
    // layer create that takes a spare
    "layer_take.after_link",
    "layer_take.after_record",
    // layer rm
    "layer_rm.after_device_removal",
    "layer_rm.after_intent",
    "layer_rm.after_delete",
    "layer_rm.after_record_removal",
    // layer rm --later, pool reclaim
    "layer_trash.after_intent",
    "layer_trash.after_record_removal",
    "reclaim.after_intent",
    "reclaim.after_delete",
    // layer provision (spares), and their drop
    "spare_provision.after_intent",
    "spare_provision.after_snapshot",
    "spare_provision.after_activation",
    "spare_provision.after_mount",
    "spare_mount.after_record",
    "spare_mount.after_mount",
    "spare_drop.after_intent",
    "spare_drop.after_umount",
    "spare_drop.after_delete",
    // mount, umount (and a mounted spare's mount moved to the target)
    "mount.after_activation",
    "mount.after_mount",
    "spare_take.after_move",
    "umount.after_umount",
    // layer apply and container commit (the store's ApplyLayer intent);
    // the inner points are reached by every layer applied from a tar
    "layer_apply.after_intent",
    "layer_apply.after_meta",
    "layer_apply.after_snapshot",
    "layer_apply.after_apply",
    "layer_apply.after_record",
    // container create
    "container_create.after_intent",
    "container_create.after_init_layer",
    "container_create.after_rw_layer",
    "container_create.after_volumes",
    "container_create.after_record",
    // container rm
    "container_rm.after_intent",
    "container_rm.after_rw_layer",
    "container_rm.after_layers",
    "container_rm.after_record",
    "container_rm.after_volume",
    // image rm
    "image_rm.after_intent",
    "image_rm.after_record",
    "image_rm.after_layer",
    // the containerd snapshotter's Prepare (`serve containerd`)
    "snapshotter_prepare.after_layer",
    // its Remove: the record gone, the layer's removal still queued
    "snapshotter_remove.after_record",
];

#[cfg(feature = "fault-injection")]
fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// Aborts the process here when `THINLAYER_FAULT` is `name`.
///
/// `name` must be one of [`ALL`] (checked in debug builds).
#[cfg(feature = "fault-injection")]
pub fn point(name: &'static str) {
    debug_assert!(
        ALL.contains(&name),
        "fault point {name} is missing from fault::ALL"
    );
    if armed() == Some(name) {
        eprintln!("thinlayer: fault point {name} reached: aborting");
        std::process::abort();
    }
}

/// A fault point: nothing in a build without the `fault-injection` feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &'static str) {}

/// Whether `THINLAYER_FAULT=list` asks for the list of points (the CLI
/// prints [`ALL`] and exits).
#[cfg(feature = "fault-injection")]
pub fn list_requested() -> bool {
    armed() == Some("list")
}

/// In a build without the `fault-injection` feature, a set
/// `THINLAYER_FAULT` (`list` included) is refused here, at start-up: the
/// process says so and exits 2 (usage). Returns `false` otherwise.
#[cfg(not(feature = "fault-injection"))]
pub fn list_requested() -> bool {
    if std::env::var_os(ENV).is_some_and(|v| !v.is_empty()) {
        eprintln!(
            "thinlayer: error: {ENV} is set, but this build has no fault points \
             (it was built without the `fault-injection` feature); unset {ENV}, \
             or use a test build (`cargo build --features thinlayer/fault-injection`)"
        );
        // 2: bad usage (the binary's exit-code table).
        std::process::exit(2);
    }
    false
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    /// Every entry of [`ALL`] is named exactly once in the other sources
    /// (the pool's, and the store's and the snapshotter's above it) and every
    /// `fault::point("...")` there is in [`ALL`], so a walk over [`ALL`]
    /// covers every point.
    #[test]
    fn all_matches_the_sources() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        fn read_all(dir: &std::path::Path, text: &mut String) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    read_all(&p, text);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("fault.rs") {
                    *text += &std::fs::read_to_string(&p).unwrap();
                }
            }
        }
        let mut text = String::new();
        for dir in [
            here.join("src"),
            here.join("../store/src"),
            here.join("../snapshotter/src"),
        ] {
            read_all(&dir, &mut text);
        }
        for name in ALL {
            let n = text.matches(&format!("\"{name}\"")).count();
            assert_eq!(n, 1, "fault point {name} is named {n} times in the sources");
        }
        for part in text.split("fault::point(\"").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(
                ALL.contains(&name),
                "fault point {name} is missing from fault::ALL"
            );
        }
    }

    #[test]
    fn unarmed_points_do_nothing() {
        // The test runner does not set THINLAYER_FAULT to a point name.
        if armed().is_none() {
            for p in ALL {
                point(p);
            }
        }
    }
}
