//! CLI contracts that hold on any host, with or without dm-thin: bad input
//! is refused before anything is created, with the documented exit codes.
//! (The `vm_` contracts that need the kernel are in `vm_pool.rs`.)

#[macro_use]
mod common;

use common::Scratch;
use std::path::Path;

// Every verb: `--help` answers, an unknown option is a usage error, and
// one that manages devices refuses a caller who is not root (exit 5).
verb_contracts! {
    pool_create: ["pool", "create"] [];
    pool_adopt: ["pool", "adopt"] ["--pool-device", "/dev/null"];
    pool_status: ["pool", "status"] [];
    pool_activate: ["pool", "activate"] [];
    pool_deactivate: ["pool", "deactivate"] [];
    pool_extend: ["pool", "extend"] [];
    pool_watch: ["pool", "watch"] [];
    pool_destroy: ["pool", "destroy"] [];
    pool_check: ["pool", "check"] [];
    pool_recover: ["pool", "recover"] [];
    pool_repair: ["pool", "repair"] [];
    pool_reclaim: ["pool", "reclaim"] [];
    layer_create: ["layer", "create"] ["a"];
    layer_apply: ["layer", "apply"] ["a", "-"];
    layer_export: ["layer", "export"] ["a", "--output", "/dev/null"];
    layer_rm: ["layer", "rm"] ["a"];
    layer_ls: ["layer", "ls"] [];
    layer_provision: ["layer", "provision"] ["a"];
    mount: ["mount"] ["a", "/tmp/tl-cli-never"];
    umount: ["umount"] ["a"];
    image_import: ["image", "import"] ["/dev/null"];
    image_ls: ["image", "ls"] [];
    image_rm: ["image", "rm"] ["a:1"];
    container_create: ["container", "create"] ["c", "--image", "a:1"];
    container_inspect: ["container", "inspect"] ["c"];
    container_mount: ["container", "mount"] ["c"];
    container_umount: ["container", "umount"] ["c"];
    container_ls: ["container", "ls"] [];
    container_rm: ["container", "rm"] ["c"];
    container_diff: ["container", "diff"] ["c"];
    container_commit: ["container", "commit"] ["c", "--as", "l"];
    volume_create: ["volume", "create"] ["v"];
    volume_ls: ["volume", "ls"] [];
    volume_rm: ["volume", "rm"] ["v"];
    volume_mount: ["volume", "mount"] ["v", "/tmp/tl-cli-never"];
    volume_umount: ["volume", "umount"] ["v"];
}

// The servers check their socket's directory before the pool: only the
// usage contracts apply to them.
verb_contracts! {
    serve_containerd: ["serve", "containerd"] user;
    serve_docker: ["serve", "docker"] user;
    serve_docker_volume: ["serve", "docker-volume"] user;
}

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
/// every host. A caller who is not root is refused before the kernel is
/// looked at: there the test asserts that refusal (the `requires_root`
/// contracts above check it as `nobody` on every host).
#[test]
fn host_without_device_mapper_fails_fast_and_creates_nothing() {
    let s = Scratch::new("cli-nodm");
    let root = nix::unistd::geteuid().is_root();
    let has_dm = Path::new("/dev/mapper/control").exists();
    let out = if root && has_dm {
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
    let why: &[&str] = if root {
        &["has no device-mapper", "tools/vm/run thinlayer"]
    } else {
        &["must run as root"]
    };
    for w in why {
        assert!(
            stderr.contains(w),
            "root {root}, /dev/mapper/control {has_dm}: stderr lacks `{w}`: {stderr}"
        );
    }
    assert!(!s.root.exists());
}
