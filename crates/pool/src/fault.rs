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
//! What must never happen: a point name missing from [`ALL`] (a host test
//! checks the sources against it), or a point inside a step that the kernel
//! performs atomically anyway (it would test nothing).

use std::sync::OnceLock;

/// The environment variable that arms a point.
pub const ENV: &str = "THINLAYER_FAULT";

/// Every fault point, in the order the commands reach them.
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
    "spare_drop.after_intent",
    "spare_drop.after_delete",
    // mount, umount
    "mount.after_activation",
    "mount.after_mount",
    "umount.after_umount",
];

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// Aborts the process here when `THINLAYER_FAULT` is `name`.
///
/// `name` must be one of [`ALL`] (checked in debug builds).
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

/// Whether `THINLAYER_FAULT=list` asks for the list of points (the CLI
/// prints [`ALL`] and exits).
pub fn list_requested() -> bool {
    armed() == Some("list")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of [`ALL`] is named exactly once in the other sources
    /// and every `fault::point("...")` there is in [`ALL`], so a walk over
    /// [`ALL`] covers every point.
    #[test]
    fn all_matches_the_sources() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut text = String::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("fault.rs") {
                text += &std::fs::read_to_string(&p).unwrap();
            }
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
