//! Every exit code of the README's table, produced by a real `thinlayer`
//! command on a host without device-mapper, run as root or not.
//!
//! How each is reached without dm-thin:
//! - 0: `--version`, `--help`, and `bench` running a stand-in
//!   `thinlayer-bench` next to a linked copy of the binary;
//! - 1: `bench` whose `thinlayer-bench` cannot be executed (an I/O error);
//! - 2: bad sizes, names, flags and groups, refused before anything runs;
//! - 3: no pool under `--root` (`pool status`, and through both servers:
//!   the containerd snapshotter and the Docker plugin);
//! - 4: a taken socket (a regular file, or a live server) for every
//!   `serve` verb, and a root another command holds locked;
//! - 5: not root (run as uid 65534), and a missing `thinlayer-bench`;
//! - 6: a socket directory on a filesystem with no room (a tmpfs in a
//!   private mount namespace with no inode left);
//! - 7: a damaged pool record.
//!
//! Cases that need root (3, 4 locked, 6, 7) run as root, or, for a user,
//! as root of a user namespace (`unshare --user --map-root-user`). On a
//! host that allows neither they are skipped with a note, and the mapping
//! unit tests in `src/exit.rs` pin the same classes. An unknown snapshot
//! (3) is reachable only through containerd's gRPC API, not through any
//! command line, so `src/exit.rs` pins it with a unit test too.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixListener},
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BIN: &str = env!("CARGO_BIN_EXE_thinlayer");

/// A scratch directory under the target dir (same filesystem as the
/// binary, so it can be hard-linked), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("exit-codes-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // uid 65534 runs commands in some cases: it must reach the files.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(dir)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// A pool root (0700) whose pool record holds `record`.
    fn pool_root(&self, record: &[u8]) -> PathBuf {
        let root = self.path("root");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(root.join("pool.rec"), record).unwrap();
        root
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// How to run a command as root here, if at all: directly, or as root of
/// a new user namespace.
fn root_prefix() -> Option<Vec<&'static str>> {
    if is_root() {
        return Some(vec![]);
    }
    let userns = ["unshare", "--user", "--map-root-user"];
    let ok = Command::new(userns[0])
        .args(&userns[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| userns.to_vec())
}

fn skip(case: &str) {
    eprintln!(
        "SKIPPED {case}: neither root nor an unprivileged user namespace here; \
         the mapping unit tests in src/exit.rs pin this class"
    );
}

fn output(mut cmd: Command) -> Output {
    cmd.env_remove("THINLAYER_ROOT")
        .env_remove("THINLAYER_FAULT")
        .env("RUST_LOG", "error");
    cmd.output().expect("run thinlayer")
}

/// Runs `prefix... thinlayer args...`.
fn run_with(prefix: &[&str], bin: &Path, args: &[&str]) -> Output {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args);
    output(cmd)
}

/// Asserts `out` exited with `code` and its stderr holds `needle`.
fn expect(out: &Output, code: i32, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{what}: stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "{what}: stderr lacks `{needle}`: {stderr}"
    );
}

fn run(args: &[&str]) -> Output {
    run_with(&[], Path::new(BIN), args)
}

/// A hard link (or copy) of `thinlayer` alone in `dir`, so `bench` looks
/// for `thinlayer-bench` next to it in `dir` and nowhere we do not control.
fn lone_thinlayer(dir: &Path) -> PathBuf {
    let bin = dir.join("thinlayer");
    if fs::hard_link(BIN, &bin).is_err() {
        fs::copy(BIN, &bin).unwrap();
    }
    bin
}

/// `thinlayer bench ARGS` with PATH holding no `thinlayer-bench`.
fn bench(bin: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).env("PATH", "/nonexistent");
    output(cmd)
}

#[test]
fn exit_0_success() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("thinlayer "));
    let out = run(&["pool", "create", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--data-size"));

    // `bench` runs the thinlayer-bench next to it, with the arguments and
    // global flags passed on, and exits as it does.
    let s = Scratch::new("bench-ok");
    let bin = lone_thinlayer(&s.0);
    let stand_in = s.path("thinlayer-bench");
    fs::write(&stand_in, "#!/bin/sh\necho \"ran: $*\"\n").unwrap();
    fs::set_permissions(&stand_in, fs::Permissions::from_mode(0o755)).unwrap();
    let out = bench(&bin, &["--json", "bench", "--quick", "--out", "o"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ran: --json --quick --out o\n"
    );
}

#[test]
fn exit_1_failed() {
    // A thinlayer-bench that cannot be executed: an I/O error, not a
    // missing tool.
    let s = Scratch::new("bench-noexec");
    let bin = lone_thinlayer(&s.0);
    fs::write(s.path("thinlayer-bench"), "not a program").unwrap();
    fs::set_permissions(s.path("thinlayer-bench"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = bench(&bin, &["bench", "--quick"]);
    expect(&out, 1, "thinlayer-bench", "bench, not executable");
    // --json: the same code in the error object.
    let out = bench(&bin, &["--json", "bench"]);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["exit_code"], 1);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn exit_2_usage() {
    let s = Scratch::new("usage");
    let root = s.path("root");
    let root = root.to_str().unwrap();
    for (args, needle) in [
        (
            &["pool", "create", "--data-size", "12X"][..],
            "unknown unit",
        ),
        (
            &["pool", "create", "--block-size", "96K"],
            "multiple of 64K",
        ),
        (&["pool", "frobnicate"], "unrecognized subcommand"),
        (&["--bogus", "pool", "status"], "unexpected argument"),
        (&["layer", "create", "../x"], "bad name"),
        (
            &["serve", "docker", "--socket-group", "no-such-group-tl"],
            "no such group",
        ),
    ] {
        let mut a = vec!["--root", root];
        a.extend_from_slice(args);
        expect(&run(&a), 2, needle, &format!("{args:?}"));
        assert!(!Path::new(root).exists(), "{args:?} created the root");
    }
}

#[test]
fn exit_3_not_found() {
    let Some(prefix) = root_prefix() else {
        return skip("exit 3");
    };
    let s = Scratch::new("notfound");
    let root = s.path("no-pool");
    let root = root.to_str().unwrap();
    let bin = Path::new(BIN);
    let out = run_with(&prefix, bin, &["--root", root, "pool", "status"]);
    expect(&out, 3, "pool create", "pool status");
    // Through each server: its own error type carries the class up.
    for (verb, sock) in [
        ("containerd", "c.sock"),
        ("docker", "d.sock"),
        ("docker-volume", "v.sock"),
    ] {
        let sock = s.path(sock);
        let args = [
            "--root",
            root,
            "serve",
            verb,
            "--socket",
            sock.to_str().unwrap(),
        ];
        let out = run_with(&prefix, bin, &args);
        expect(&out, 3, "no pool under", verb);
        assert!(!sock.exists(), "{verb} left its socket");
    }
}

#[test]
fn exit_4_taken_socket() {
    let s = Scratch::new("taken");
    let file = s.path("file.sock");
    fs::write(&file, b"precious").unwrap();
    let live = s.path("live.sock");
    let _server = UnixListener::bind(&live).unwrap();
    let root = s.path("root");
    for verb in ["containerd", "docker", "docker-volume"] {
        for (sock, needle) in [(&file, "regular file"), (&live, "live server")] {
            let args = [
                "--root",
                root.to_str().unwrap(),
                "serve",
                verb,
                "--socket",
                sock.to_str().unwrap(),
            ];
            expect(&run(&args), 4, needle, verb);
        }
    }
    assert_eq!(fs::read(&file).unwrap(), b"precious");
}

#[test]
fn exit_4_locked_root() {
    let Some(prefix) = root_prefix() else {
        return skip("exit 4 (locked)");
    };
    let s = Scratch::new("locked");
    let root = s.pool_root(b"held by another command");
    let lock = fs::File::create(root.join("lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    let args = ["--root", root.to_str().unwrap(), "pool", "status"];
    let out = run_with(&prefix, Path::new(BIN), &args);
    expect(&out, 4, "--wait", "pool status on a locked root");
}

#[test]
fn exit_5_host_cannot() {
    // A missing thinlayer-bench: a tool the host lacks, with how to build it.
    let s = Scratch::new("bench-missing");
    let bin = lone_thinlayer(&s.0);
    let out = bench(&bin, &["bench", "--quick"]);
    expect(&out, 5, "cargo build -p thinlayer-bench", "bench, missing");

    // Not root: as uid 65534 when the test runs as root.
    let args = ["--root", "/nonexistent/tl", "pool", "status"];
    let out = if is_root() {
        let prefix = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        run_with(&prefix, Path::new(BIN), &args)
    } else {
        run(&args)
    };
    expect(&out, 5, "must run as root", "pool status as a user");
}

#[test]
fn exit_6_no_space() {
    let Some(mut prefix) = root_prefix() else {
        return skip("exit 6");
    };
    let s = Scratch::new("nospace");
    let full = s.path("full");
    fs::create_dir(&full).unwrap();
    // A tmpfs with no inode left, in a private mount namespace: creating
    // the socket's directory fails with ENOSPC.
    prefix.extend(["unshare", "--mount", "--propagation", "private", "sh", "-c"]);
    prefix.push(r#"mount -t tmpfs -o size=64k,nr_inodes=1 none "$1" && shift && exec "$@""#);
    prefix.push("sh");
    let full_arg = full.to_str().unwrap().to_owned();
    prefix.push(&full_arg);
    let sock = full.join("run/s.sock");
    let args = ["serve", "docker", "--socket", sock.to_str().unwrap()];
    let out = run_with(&prefix, Path::new(BIN), &args);
    expect(
        &out,
        6,
        "No space left on device",
        "serve on a full filesystem",
    );
}

#[test]
fn exit_7_damaged_record() {
    let Some(prefix) = root_prefix() else {
        return skip("exit 7");
    };
    let s = Scratch::new("damaged");
    let root = s.pool_root(b"garbage");
    let bin = Path::new(BIN);
    for args in [
        &["pool", "status"][..],
        &["layer", "ls"],
        &["pool", "check"],
    ] {
        let mut a = vec!["--root", root.to_str().unwrap()];
        a.extend_from_slice(args);
        let out = run_with(&prefix, bin, &a);
        expect(&out, 7, "is damaged", &format!("{args:?}"));
    }
    // --json: the code in the error object too.
    let a = ["--json", "--root", root.to_str().unwrap(), "pool", "status"];
    let out = run_with(&prefix, bin, &a);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["exit_code"], 7, "{err}");
}
