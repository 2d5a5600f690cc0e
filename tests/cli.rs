//! CLI contracts that hold on any host, with or without dm-thin: bad input
//! is refused before anything is created, with the documented exit codes.
//! (The `vm_` contracts that need the kernel are in `vm_pool.rs`.)

mod common;

use common::Scratch;
use std::path::Path;

#[test]
fn bad_sizes_and_block_sizes_are_usage_errors_and_create_nothing() {
    let s = Scratch::new("cli-sizes");
    let cases: &[(&[&str], &str)] = &[
        (&["--data-size", "12X"], "unknown unit"),
        (&["--data-size", "abc"], "does not start with a number"),
        (&["--block-size", "96K"], "multiple of 64K"),
        (&["--block-size", "32K"], "between 64K and 1G"),
        (&["--block-size", "2G"], "between 64K and 1G"),
        (&["--fs", "btrfs"], "use ext4 or xfs"),
        (&["--base-size=-1G"], "does not start with a number"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["pool", "create"];
        args.extend_from_slice(flags);
        s.fails(&args, 2, needle);
        assert!(!s.root.exists(), "{flags:?} created {}", s.root.display());
    }
}

#[test]
fn sizes_the_kernel_would_refuse_fail_before_touching_anything() {
    let s = Scratch::new("cli-ranges");
    let cases: &[(&[&str], &str)] = &[
        (&["--data-size", "512K"], "at least 16 pool blocks"),
        (&["--base-size", "1M"], "base device of at least"),
        (
            &["--fs", "xfs", "--base-size", "100M"],
            "base device of at least",
        ),
        (&["--metadata-size", "1M"], "metadata size must be"),
        (&["--low-water", "100"], "out of range"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["pool", "create"];
        args.extend_from_slice(flags);
        s.fails(&args, 2, needle);
        assert!(!s.root.exists());
    }
}

#[test]
fn commands_on_a_missing_pool_say_how_to_create_one() {
    let s = Scratch::new("cli-nopool");
    for args in [
        &["pool", "status"][..],
        &["pool", "activate"],
        &["layer", "ls"],
        &["layer", "create", "a"],
        &["mount", "a", "/tmp/x"],
    ] {
        s.fails(args, 3, "pool create");
    }
    let out = s.run(&["--json", "pool", "status"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["exit_code"], 3);
}

#[test]
fn unknown_flags_and_verbs_are_usage_errors() {
    let s = Scratch::new("cli-usage");
    s.fails(&["pool", "frobnicate"], 2, "unrecognized subcommand");
    s.fails(&["layer", "create"], 2, "required");
    let out = s.run(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Exit codes:") && help.contains("5  the host cannot"),
        "{help}"
    );
}

/// On a host whose kernel has no device-mapper (these development and CI
/// machines), `pool create` fails fast with the sentence that says how to
/// run it in the VM, exit code 5, and creates nothing. Where the kernel has
/// device-mapper, root runs the same command in a private mount namespace
/// whose `/dev/mapper` is an empty tmpfs, so the contract is checked on
/// every host.
#[test]
fn host_without_device_mapper_fails_fast_and_creates_nothing() {
    let s = Scratch::new("cli-nodm");
    let root = nix::unistd::geteuid().is_root();
    let out = if root && Path::new("/dev/mapper/control").exists() {
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs none /dev/mapper && exec "$0" "$@""#)
            .arg(common::bin())
            .arg("--root")
            .arg(&s.root)
            .args(["pool", "create"])
            .output()
            .expect("run unshare")
    } else {
        s.run(&["pool", "create"])
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    let why = if root { "tools/vm/run" } else { "root" };
    assert!(stderr.contains(why), "stderr lacks `{why}`: {stderr}");
    assert!(!s.root.exists());
}
