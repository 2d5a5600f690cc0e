//! Shared harness of the CLI tests: a scratch root per test, the built
//! binary, and helpers to run it and read its JSON.
//!
//! `vm_` tests need a kernel with dm-thin and run in the VM harness
//! (`tools/vm/run`, which `tools/test` drives); the host run skips them by
//! name. They never skip themselves: without dm-thin they fail, saying why.
//! Every scratch pool is destroyed on drop unless `NO_TEST_CLEAN_UP=1`;
//! `vm_` tests run in the harness of [`vm`], which sweeps thinlayer's
//! kernel objects before and after each test without the CLI.

#![allow(dead_code)]

pub mod containerd;
#[macro_use]
pub mod contract;
pub mod docker;
pub mod vm;

#[allow(unused_imports)] // not every test binary uses each of them
pub use vm::{Pool, swept, vm_test};

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

/// The built `thinlayer`. In the VM (`THINLAYER_IN_VM=1`), a copy on the
/// guest's tmpfs: executing the debug binary from the 9p share costs
/// seconds per run under TCG, the copy a tenth of that.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let built = env!("CARGO_BIN_EXE_thinlayer");
        if std::env::var_os("THINLAYER_IN_VM").is_none() {
            return built.to_owned();
        }
        let copy = std::env::temp_dir().join(format!("thinlayer-bin-{}", std::process::id()));
        let tmp = copy.with_extension("tmp");
        let bytes = fs::read(built).expect("read the built thinlayer");
        fs::write(&tmp, bytes).expect("copy thinlayer to tmpfs");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&tmp, &copy).unwrap();
        copy.to_string_lossy().into_owned()
    })
}

/// One mebibyte, for sizes of test data.
pub const MIB: usize = 1 << 20;

/// The uid and gid of `nobody`: the other user of the permission tests.
pub const NOBODY: u32 = 65534;

/// Writes `data` to a new file at `path` and syncs it to its device.
pub fn write_file(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// The OCI digest of `bytes`: `sha256:` and its hex sha256.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The permission bits of `p` (not following a symlink).
pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Fails the test (rather than skipping it) where dm-thin is missing.
pub fn require_dm_thin() {
    assert!(
        Path::new("/dev/mapper/control").exists(),
        "vm_ tests need a kernel with dm-thin: run them with `tools/vm/run` (tools/test does)"
    );
}

/// A scratch root for one test, destroyed (with its pool) on drop.
pub struct Scratch {
    /// The pool root.
    pub root: PathBuf,
    /// A directory for mount points.
    pub mnt: PathBuf,
}

impl Scratch {
    /// A fresh scratch directory named for the test.
    pub fn new(name: &str) -> Scratch {
        let base = std::env::temp_dir().join(format!("tl-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("mnt")).unwrap();
        Scratch {
            root: base.join("root"),
            mnt: base.join("mnt"),
        }
    }

    /// Runs `thinlayer --root ROOT ARGS...`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .output()
            .expect("run thinlayer")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "thinlayer {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts exit code `code` and that stderr contains `needle`.
    pub fn fails(&self, args: &[&str], code: i32, needle: &str) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "thinlayer {args:?}: want exit {code}, got {}: {stderr}",
            out.status
        );
        assert!(
            stderr.contains(needle),
            "thinlayer {args:?}: stderr lacks `{needle}`: {stderr}"
        );
        stderr
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    /// A mount point under the scratch directory.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Creates a small pool with `extra` flags.
    pub fn create_pool(&self, extra: &[&str]) {
        let mut a = vec!["pool", "create", "--data-size", "2G", "--base-size", "512M"];
        a.extend_from_slice(extra);
        self.ok(&a);
    }

    /// The ids of the pool's layers (`layer ls`), collected as the caller wants.
    pub fn layer_ids<C: FromIterator<String>>(&self) -> C {
        self.json(&["layer", "ls"])
            .as_array()
            .expect("layer ls is an array")
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The mounts under `ROOT/spares` (real paths), from mountinfo; none
    /// when the root is gone.
    pub fn spare_mounts(&self) -> Vec<std::path::PathBuf> {
        let Ok(root) = std::fs::canonicalize(&self.root) else {
            return Vec::new();
        };
        let dir = root.join("spares");
        thinlayer_pool::mounts::all()
            .unwrap()
            .into_iter()
            .filter(|m| m.mountpoint.parent() == Some(dir.as_path()))
            .map(|m| m.mountpoint)
            .collect()
    }

    /// Pool data blocks in use, from the kernel.
    pub fn used_data_blocks(&self) -> u64 {
        self.json(&["pool", "status"])["kernel"]["data_used_blocks"]
            .as_u64()
            .expect("an active pool reports data_used_blocks")
    }

    /// Mounts `layer` at the scratch mount point of the same name.
    pub fn mount(&self, layer: &str) -> PathBuf {
        let d = self.dir(layer);
        self.ok(&["mount", layer, d.to_str().unwrap()]);
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("NO_TEST_CLEAN_UP").is_some() {
            eprintln!("NO_TEST_CLEAN_UP: keeping {}", self.root.display());
            return;
        }
        if self.root.join("pool.rec").exists() {
            let _ = self.run(&["pool", "activate"]);
            let out = self.run(&["pool", "destroy", "--force"]);
            if !out.status.success() && !std::thread::panicking() {
                panic!("cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        if let Some(base) = self.root.parent() {
            let _ = fs::remove_dir_all(base);
        }
    }
}

/// Names of every dm device in the kernel (from sysfs).
pub fn dm_devices() -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        if let Ok(name) = fs::read_to_string(e.path().join("dm/name")) {
            out.push(name.trim().to_owned());
        }
    }
    out.sort();
    out
}

/// Backing files of every loop device (from sysfs).
pub fn loop_backing_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        if let Ok(f) = fs::read_to_string(e.path().join("loop/backing_file")) {
            out.push(PathBuf::from(f.trim()));
        }
    }
    out
}

/// Runs a program, asserting success; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so contents are checkable:
/// the bench's generator (`thinlayer_bench::sys::pattern`), restated here
/// because the `thinlayer` package does not depend on the bench.
#[allow(dead_code)] // not every test binary writes patterns
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.to_le_bytes()
    };
    std::iter::repeat_with(next).flatten().take(len).collect()
}

/// A `thinlayer ... serve ...` child of a test, its stderr kept in a log;
/// killed on drop (the log printed if the test is failing).
pub struct Served {
    child: Option<std::process::Child>,
    log: PathBuf,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl Served {
    /// Starts `thinlayer --root ROOT ARGS... --socket SOCKET` and waits
    /// until the socket answers (at most 60 s); fails with the log if the
    /// server exits first.
    pub fn start(s: &Scratch, args: &[&str], socket: &Path) -> Served {
        Served::start_with(s, args, socket, &[])
    }

    /// As [`Served::start`], with `env` added to the server's environment.
    pub fn start_with(s: &Scratch, args: &[&str], socket: &Path, env: &[(&str, &str)]) -> Served {
        let base = s.root.parent().expect("a scratch root has a parent");
        let n = fs::read_dir(base).map(|d| d.count()).unwrap_or(0);
        let log = base.join(format!("serve-{n}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .arg("--root")
            .arg(&s.root)
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start thinlayer serve");
        let mut served = Served {
            child: Some(child),
            log,
            socket: socket.to_owned(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            served.assert_running();
            assert!(
                std::time::Instant::now() < deadline,
                "{args:?} not listening after 60 s:\n{}",
                served.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        served
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Fails with the log if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.as_mut().expect("running").try_wait().unwrap() {
            panic!("the server exited ({st}):\n{}", self.log());
        }
    }

    /// Waits (at most 60 s) for it to exit by itself; its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the server did not exit:\n{}", self.log());
    }

    /// SIGTERM, then waits (at most 60 s) for it to exit; its status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- server log ---\n{}", self.log());
            }
        }
    }
}

/// One HTTP/1.1 POST of `body` to `endpoint` over the Unix socket, with
/// `Connection: close`; the status code and the body of the answer.
pub fn http_post(socket: &Path, endpoint: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut req = format!(
        "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    c.write_all(&req).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    (status, body.to_owned())
}

/// The node of the guest's virtio disk with serial `serial` (attached by
/// `tools/vm/run` from `THINLAYER_VM_DISKS`; the guest has no udev, so
/// no /dev/disk/by-id: found by its serial in sysfs).
pub fn virtio_disk(serial: &str) -> PathBuf {
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        if fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == serial) {
            return PathBuf::from("/dev").join(e.file_name());
        }
    }
    panic!(
        "no virtio disk with serial {serial}: attach it with THINLAYER_VM_DISKS={serial}:SIZE,... \
         (tools/test's list has it)"
    );
}

/// Zeros the first 2 MiB of disk `dev` (test set-up: what another test
/// or run left there is no signature to refuse).
pub fn zap_disk(dev: &Path) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all(&vec![0u8; 2 << 20]).unwrap();
    f.sync_all().unwrap();
}

/// The image fixtures (`tests/fixtures/make-images`; tools/test makes them),
/// or `THINLAYER_FIXTURES`.
pub fn fixtures() -> PathBuf {
    let d = std::env::var_os("THINLAYER_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/images"),
        PathBuf::from,
    );
    assert!(
        d.join(".stamp").exists(),
        "fixtures missing at {}: run `tests/fixtures/make-images {}` first (tools/test does)",
        d.display(),
        d.display()
    );
    d
}
