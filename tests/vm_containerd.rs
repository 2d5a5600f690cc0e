//! `thinlayer serve containerd` against a real containerd (Debian's 1.6),
//! ctr and runc in the guest: import an image into thinlayer snapshots,
//! run a container on one, see its snapshot in the pool and gone after,
//! and stop and restart both servers without leaking a dm device.
//!
//! The guest needs containerd's programs: boot it with
//! `THINLAYER_VM_EXTRAS=containerd tools/vm/run ...`. Fixtures come from
//! `tests/fixtures/make-images target/fixtures/images` (tools/test runs it).

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::{containerd::*, *};

/// The demo image: a busybox root filesystem in 3 layers (docker save).
fn demo_archive() -> PathBuf {
    let d = std::env::var_os("THINLAYER_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/images"),
        PathBuf::from,
    );
    let f = d.join("demo-docker.tar");
    assert!(
        f.exists(),
        "fixture {} missing: run `tests/fixtures/make-images {}` first (tools/test does)",
        f.display(),
        d.display()
    );
    f
}

/// A background server, killed on drop if still running.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(name: &'static str, cmd: &mut Command, log: PathBuf) -> Daemon {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name,
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Fails with the daemon's log if it has exited.
    fn assert_running(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("{} exited ({st}):\n{}", self.name, self.log());
        }
    }

    /// Sends `sig` and waits for the exit; returns the status.
    fn stop(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, sig);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not stop on {sig}:\n{}", self.name, self.log());
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- {} log ---\n{}", self.name, self.log());
            }
        }
    }
}

/// containerd, its config and its client for one test.
struct Containerd {
    base: PathBuf,
    address: PathBuf,
    config: PathBuf,
}

impl Containerd {
    fn new(base: &Path, snapshotter_socket: &Path) -> Containerd {
        let base = base.join("containerd");
        fs::create_dir_all(&base).unwrap();
        let address = base.join("containerd.sock");
        let config = base.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0s"

[proxy_plugins.thinlayer]
  type = "snapshot"
  address = "{snap}"
"#,
                root = base.join("root").display(),
                state = base.join("state").display(),
                address = address.display(),
                snap = snapshotter_socket.display(),
            ),
        )
        .unwrap();
        Containerd {
            base,
            address,
            config,
        }
    }

    fn start(&self) -> Daemon {
        let t = Instant::now();
        let mut d = Daemon::start(
            "containerd",
            Command::new(program("containerd"))
                .arg("--config")
                .arg(&self.config),
            self.base.join("containerd.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            d.assert_running();
            if self.try_ctr(&["version"], 10).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd not ready:\n{}",
                d.log()
            );
            sleep(Duration::from_millis(100));
        }
        eprintln!("containerd ready in {:.1} s", t.elapsed().as_secs_f64());
        d
    }

    fn try_ctr(&self, args: &[&str], secs: u64) -> Output {
        run_timeout(
            Command::new(program("ctr"))
                .arg("--address")
                .arg(&self.address)
                .args(args),
            secs,
        )
    }

    /// Runs ctr, asserting success; returns stdout.
    /// `ctr containers create` of `image` as `name` on thinlayer.
    fn create(&self, image: &str, name: &str) {
        self.ctr(&[
            "containers",
            "create",
            "--snapshotter",
            "thinlayer",
            image,
            name,
        ]);
    }

    fn ctr(&self, args: &[&str]) -> String {
        let t = Instant::now();
        let out = self.try_ctr(args, 300);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "ctr {:?}: {:.1} s",
            args.first().unwrap(),
            t.elapsed().as_secs_f64()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `ctr snapshots ls` on thinlayer: (key, parent, kind) rows.
    fn snapshots(&self) -> Vec<(String, String, String)> {
        self.ctr(&["snapshots", "--snapshotter", "thinlayer", "ls"])
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f[..] {
                    [k, kind] => (k.to_owned(), String::new(), kind.to_owned()),
                    [k, p, kind] => (k.to_owned(), p.to_owned(), kind.to_owned()),
                    _ => panic!("unexpected `ctr snapshots ls` line: {l}"),
                }
            })
            .collect()
    }
}

fn serve(s: &Scratch, socket: &Path) -> Daemon {
    serve_with(s, socket, &[])
}

/// `thinlayer serve containerd` with `extra` flags.
fn serve_with(s: &Scratch, socket: &Path, extra: &[&str]) -> Daemon {
    let t = Instant::now();
    let log = s.root.parent().unwrap().join("serve.log");
    let mut d = Daemon::start(
        "thinlayer serve",
        Command::new(bin())
            .env("RUST_LOG", "info,thinlayer_snapshotter=debug")
            .arg("--root")
            .arg(&s.root)
            .args(["serve", "containerd", "--socket"])
            .arg(socket)
            .args(extra),
        log,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        d.assert_running();
        assert!(Instant::now() < deadline, "serve not up:\n{}", d.log());
        sleep(Duration::from_millis(20));
    }
    eprintln!("thinlayer serve up in {:.2} s", t.elapsed().as_secs_f64());
    d
}

/// Imports the demo image into thinlayer snapshots; returns its name.
fn import_demo(c: &Containerd) -> String {
    c.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "thinlayer",
        demo_archive().to_str().unwrap(),
    ]);
    let images = c.ctr(&["images", "ls", "-q"]);
    images
        .lines()
        .find(|l| l.contains("demo"))
        .unwrap_or_else(|| panic!("no demo image in {images}"))
        .to_owned()
}

/// The image's top snapshot: the committed one no other has as parent.
fn top_snapshot(c: &Containerd) -> String {
    let snaps = c.snapshots();
    snaps
        .iter()
        .find(|(k, _, kind)| kind == "Committed" && !snaps.iter().any(|(_, p, _)| p == k))
        .unwrap_or_else(|| panic!("no top snapshot in {snaps:?}"))
        .0
        .clone()
}

/// `ctr snapshots ARGS` on thinlayer.
fn snap(c: &Containerd, args: &[&str]) -> String {
    let mut all = vec!["snapshots", "--snapshotter", "thinlayer"];
    all.extend_from_slice(args);
    c.ctr(&all)
}

/// Snapshot `key`'s mount as `ctr snapshots mounts` prints it:
/// (type, source, options).
fn mount_of(c: &Containerd, key: &str) -> (String, String, String) {
    let line = snap(c, &["mounts", "/mnt", key]);
    let w: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        let at = w
            .iter()
            .position(|x| *x == flag)
            .unwrap_or_else(|| panic!("{flag} in {line}"));
        w[at + 1].to_owned()
    };
    let ty = after("-t");
    let source = w[w.iter().position(|x| *x == "-t").unwrap() + 2].to_owned();
    (ty, source, after("-o"))
}

/// The layer (`layer ls --json` entry) whose id ends with `suffix`.
fn layer_ending(s: &Scratch, suffix: &str) -> serde_json::Value {
    let ls = s.json(&["--wait", "layer", "ls"]);
    ls.as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no layer ending {suffix} in {ls}"))
        .clone()
}

/// The pool's spares: (parent layer, thin id).
fn spares(s: &Scratch) -> Vec<(String, u64)> {
    s.json(&["--wait", "pool", "status"])["spares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sp| {
            (
                sp["parent"].as_str().unwrap_or_default().to_owned(),
                sp["thin_id"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Active thin devices that are not spares (spares are meant to be up).
fn devices_but_spares(s: &Scratch) -> Vec<String> {
    let spares: Vec<String> = spares(s)
        .into_iter()
        .map(|(_, t)| format!("-thin-{t}"))
        .collect();
    thin_devices()
        .into_iter()
        .filter(|d| !spares.iter().any(|sp| d.ends_with(sp.as_str())))
        .collect()
}

/// The snapshotter's holder directory and what is mounted under it.
fn holder_mounts(s: &Scratch) -> (PathBuf, Vec<PathBuf>) {
    let holders = fs::canonicalize(s.root.join("snapshotter/mnt")).unwrap();
    let under = thinlayer_pool::mounts::all()
        .unwrap()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(&holders))
        .collect();
    (holders, under)
}

const SCRIPT: &str = "echo hello > /tmp/f; cat /tmp/f; cat /etc/os-release";

/// The end of a test: containerd and the server stopped (the server
/// cleanly), no thin device beyond `before`, `pool check` clean.
fn finish(s: &Scratch, ctrd: &mut Daemon, srv: &mut Daemon, before: &[String]) {
    ctrd.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(srv.stop(nix::sys::signal::Signal::SIGTERM).success());
    assert_eq!(thin_devices(), before, "no thin device left");
    s.ok(&["pool", "check"]);
}

fn run_container(c: &Containerd, image: &str, id: &str) {
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "thinlayer",
        image,
        id,
        "/bin/sh",
        "-c",
        SCRIPT,
    ]);
    eprintln!("ctr run output:\n{out}");
    assert_eq!(
        out.replace('\r', ""),
        "hello\nNAME=\"thinlayer-fixture\"\nVERSION_ID=2\n",
        "the container's output"
    );
}

#[test]
fn vm_containerd_import_run_restart() {
    vm_test("ctrd", Pool::Small, |s| {
        let (containerd_bin, _, _) = (program("containerd"), program("ctr"), program("runc"));
        let _ = containerd_bin;
        let base = s.root.parent().unwrap().to_owned();
        let socket = base.join("thinlayer.sock");
        let c = Containerd::new(&base, &socket);
        let before = thin_devices();

        let mut srv = serve(s, &socket);
        let mut ctrd = c.start();

        // Import: containerd unpacks the 3 layers into thinlayer snapshots.
        let image = import_demo(&c);
        let snaps = c.snapshots();
        eprintln!("snapshots after import: {snaps:?}");
        assert_eq!(
            snaps.iter().filter(|(_, _, k)| k == "Committed").count(),
            3,
            "3 committed layers: {snaps:?}"
        );
        assert_eq!(snaps.len(), 3, "nothing but the layers: {snaps:?}");
        assert_eq!(ctrd_layers(s).len(), 3, "one thinlayer layer per snapshot");
        // A chain: one without a parent, each other's parent among them.
        assert_eq!(snaps.iter().filter(|(_, p, _)| p.is_empty()).count(), 1);
        let usage = c.ctr(&["snapshots", "--snapshotter", "thinlayer", "usage"]);
        eprintln!("usage:\n{usage}");
        // Committed layers are immutable and not in use: the worker tears
        // their devices down after the answers (spares are meant to be up).
        wait_until("no thin device left active by the import", 60, || {
            devices_but_spares(s) == before
        });

        // A container's snapshot is visible through thinlayer while it exists.
        c.create(&image, "probe");
        let layers = ctrd_layers(s);
        assert!(
            layers.iter().any(|l| l.ends_with("-probe")),
            "the container's layer in `thinlayer layer ls`: {layers:?}"
        );
        let snaps = c.snapshots();
        assert!(
            snaps
                .iter()
                .any(|(k, _, kind)| k == "probe" && kind == "Active"),
            "{snaps:?}"
        );
        let mounts = c.ctr(&[
            "snapshots",
            "--snapshotter",
            "thinlayer",
            "mounts",
            "/mnt",
            "probe",
        ]);
        eprintln!("mounts: {mounts}");
        assert!(
            mounts.contains("-t bind") && mounts.contains("rbind,rw"),
            "a bind of the server's holder mount: {mounts}"
        );
        c.ctr(&["containers", "rm", "probe"]);
        wait_until("the container's layer to go", 60, || {
            !ctrd_layers(s).iter().any(|l| l.ends_with("-probe"))
        });

        // A parent with a recent Prepare keeps a spare and one of headroom
        // (mounted spares mount outside the lock); the next container takes
        // one (its layer has that spare's thin id); with two children live
        // at once, the worker keeps three.
        c.create(&image, "w1");
        let top = layer_ending(s, "-w1")["parent"]
            .as_str()
            .unwrap()
            .to_owned();
        let spares_of_top = || -> Vec<u64> {
            spares(s)
                .into_iter()
                .filter(|(p, _)| *p == top)
                .map(|(_, t)| t)
                .collect()
        };
        wait_until("two spares of the image's top layer", 60, || {
            spares_of_top().len() == 2
        });
        let ready = spares_of_top();
        c.create(&image, "w2");
        let took = layer_ending(s, "-w2")["thin_id"].as_u64().unwrap();
        assert!(
            ready.contains(&took),
            "w2 took a spare: {took} of {ready:?}"
        );
        wait_until("three spares for two live children", 60, || {
            spares_of_top().len() == 3
        });
        // One at a time: containerd's collector may fold a removal made
        // while it runs into that run and not look again.
        for name in ["w1", "w2"] {
            c.ctr(&["containers", "rm", name]);
            wait_until(&format!("{name}'s layer to go"), 60, || {
                !ctrd_layers(s)
                    .iter()
                    .any(|l| l.ends_with(&format!("-{name}")))
            });
        }
        assert_eq!(ctrd_layers(s).len(), 3, "the image's layers are left");

        // Run a container on a thinlayer snapshot.
        run_container(&c, &image, "run1");
        wait_until("run1's layer to go", 60, || ctrd_layers(s).len() == 3);

        // Stop both: no thin device left behind.
        ctrd.stop(nix::sys::signal::Signal::SIGTERM);
        let st = srv.stop(nix::sys::signal::Signal::SIGTERM);
        assert!(st.success(), "serve exit {st}:\n{}", srv.log());
        assert!(!socket.exists(), "the socket is removed on shutdown");
        assert_eq!(
            thin_devices(),
            before,
            "no leaked thin device after stopping"
        );

        // Restart both: the snapshots are all there and a container runs.
        let mut srv = serve(s, &socket);
        let mut ctrd = c.start();
        let snaps = c.snapshots();
        assert_eq!(snaps.len(), 3, "after restart: {snaps:?}");
        run_container(&c, &image, "run2");
        wait_until("run2's layer to go", 60, || ctrd_layers(s).len() == 3);
        ctrd.stop(nix::sys::signal::Signal::SIGTERM);
        assert!(srv.stop(nix::sys::signal::Signal::SIGTERM).success());
        assert_eq!(
            thin_devices(),
            before,
            "no leaked thin device after restart"
        );

        // The pool agrees with its records.
        s.ok(&["pool", "check"]);
        eprintln!("serve log:\n{}", srv.log());
    });
}

#[test]
fn vm_serve_socket_in_use_stale_and_one_server_per_pool() {
    vm_test("ctrd-sock", Pool::Small, |s| {
        let base = s.root.parent().unwrap().to_owned();
        let socket = base.join("a.sock");
        // Other owners' layers stay (the snapshotter's own orphans are
        // removed at start: vm_servers_containerd_start_removes_only_its_own_orphans).
        s.ok(&["layer", "create", "mine"]);
        let mut first = serve(s, &socket);
        assert_eq!(ctrd_layers(s), Vec::<String>::new());
        assert!(s.ok(&["--wait", "layer", "ls"]).contains("mine"));

        // The same socket, a live server: refused, exit 4, says why.
        let out = s.fails(
            &["serve", "containerd", "--socket", socket.to_str().unwrap()],
            4,
            "live server",
        );
        eprintln!("{out}");
        // Another socket, the same pool: refused.
        let other = base.join("b.sock");
        s.fails(
            &["serve", "containerd", "--socket", other.to_str().unwrap()],
            4,
            "serves the pool",
        );
        assert!(!other.exists());
        first.assert_running();

        // Killed hard: the socket file stays; the next start replaces it.
        first.stop(nix::sys::signal::Signal::SIGKILL);
        assert!(socket.exists(), "a killed server leaves its socket file");
        let mut again = serve(s, &socket);
        assert!(
            again.stop(nix::sys::signal::Signal::SIGTERM).success(),
            "{}",
            again.log()
        );
        assert!(!socket.exists());

        // No pool: a clear error, exit 3.
        let none = Scratch::new("ctrd-nopool");
        fs::create_dir_all(&none.root).unwrap();
        none.fails(
            &[
                "serve",
                "containerd",
                "--socket",
                base.join("c.sock").to_str().unwrap(),
            ],
            3,
            "no pool",
        );
    });
}

/// Prepare hands out a bind of the server's own mount, which shows the
/// parent's files and takes writes; after Commit the worker unmounts it
/// and tears the device down, and a child of the commit sees the write.
#[test]
fn vm_containerd_bind_mounts_settle_after_commit() {
    vm_test("ctrd-bind", Pool::Small, |s| {
        let base = s.root.parent().unwrap().to_owned();
        let socket = base.join("thinlayer.sock");
        let c = Containerd::new(&base, &socket);
        let before = thin_devices();
        let mut srv = serve(s, &socket);
        let mut ctrd = c.start();
        import_demo(&c);
        let top = top_snapshot(&c);

        snap(&c, &["prepare", "a1", &top]);
        let (ty, source, options) = mount_of(&c, "a1");
        assert_eq!((ty.as_str(), options.as_str()), ("bind", "rbind,rw"));
        let (holders, _) = holder_mounts(s);
        let source = PathBuf::from(source);
        assert!(source.starts_with(&holders), "{source:?} under {holders:?}");
        assert!(
            fs::read_to_string(source.join("etc/os-release"))
                .unwrap()
                .contains("thinlayer-fixture"),
            "the bind shows the parent's files"
        );
        // As containerd does: a bind of it, a write through that.
        let target = base.join("a1-rootfs");
        fs::create_dir_all(&target).unwrap();
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        fs::write(target.join("written-by-a1"), "a1").unwrap();
        nix::mount::umount(&target).unwrap();

        snap(&c, &["commit", "c1", "a1"]);
        wait_until("c1's device down and no holder mounted", 60, || {
            layer_ending(s, "-a1")["devnode"].is_null() && holder_mounts(s).1.is_empty()
        });
        let usage = snap(&c, &["usage", "c1"]);
        eprintln!("usage of c1: {usage}");

        // A child of the commit, and a view of it.
        snap(&c, &["prepare", "a2", "c1"]);
        let (_, a2, _) = mount_of(&c, "a2");
        assert_eq!(
            fs::read_to_string(Path::new(&a2).join("written-by-a1")).unwrap(),
            "a1",
            "the child sees what was written through the parent's bind"
        );
        snap(&c, &["view", "v1", "c1"]);
        let (ty, _, options) = mount_of(&c, "v1");
        assert_eq!((ty.as_str(), options.as_str()), ("bind", "rbind,ro"));
        assert_eq!(holder_mounts(s).1.len(), 2, "a2's and v1's holders");

        // containerd's garbage collector takes snapshots nothing references
        // (ctr's own are not leased) when a removal runs it, and may leave
        // c1 counted as a parent: gone already, or kept for a child
        // containerd still lists, is fine for c1.
        for key in ["v1", "a2", "c1"] {
            let out = c.try_ctr(&["snapshots", "--snapshotter", "thinlayer", "rm", key], 60);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success()
                    || err.contains("not found")
                    || (key == "c1" && err.contains("with child")),
                "rm {key}: {err}"
            );
        }
        wait_until("a2's and v1's layers and holders to go", 60, || {
            let layers = ctrd_layers(s);
            !layers
                .iter()
                .any(|l| l.ends_with("-a2") || l.ends_with("-v1"))
                && holder_mounts(s).1.is_empty()
        });
        finish(s, &mut ctrd, &mut srv, &before);
    });
}

/// Containers started one after another on one image keep exactly two
/// spares ready (one to take, one of headroom that mounts meanwhile); a
/// parent idle for `--spare-idle` keeps none.
#[test]
fn vm_containerd_spares_follow_demand() {
    vm_test("ctrd-spares", Pool::Small, |s| {
        let base = s.root.parent().unwrap().to_owned();
        let socket = base.join("thinlayer.sock");
        let c = Containerd::new(&base, &socket);
        let before = thin_devices();
        let mut srv = serve(s, &socket);
        let mut ctrd = c.start();
        import_demo(&c);
        let top = top_snapshot(&c);

        let mut ready: Vec<u64> = Vec::new();
        for i in 0..4 {
            let key = format!("k{i}");
            snap(&c, &["prepare", &key, &top]);
            let layer = layer_ending(s, &format!("-{key}"));
            if !ready.is_empty() {
                let took = layer["thin_id"].as_u64().unwrap();
                assert!(
                    ready.contains(&took),
                    "{key} took a spare: {took} of {ready:?}"
                );
            }
            let parent = layer["parent"].as_str().unwrap().to_owned();
            wait_until("two spares of the image's top layer", 60, || {
                spares(s).len() == 2
            });
            let now = spares(s);
            assert!(
                now.iter().all(|(p, _)| *p == parent),
                "the spares are of {key}'s parent: {now:?}"
            );
            ready = now.into_iter().map(|(_, t)| t).collect();
            snap(&c, &["rm", &key]);
            // containerd's garbage collector removes it, then the worker its layer.
            wait_until("the snapshot's layer to go", 60, || {
                !ctrd_layers(s)
                    .iter()
                    .any(|l| l.ends_with(&format!("-{key}")))
            });
        }
        assert_eq!(spares(s).len(), 2, "sequential containers keep exactly two");

        // A server with a 2 s idle window drops it once the parent idles.
        assert!(srv.stop(nix::sys::signal::Signal::SIGTERM).success());
        assert_eq!(spares(s).len(), 2, "a stop keeps the spares listed");
        let mut srv = serve_with(s, &socket, &["--spare-idle", "2"]);
        wait_until("the idle parent's spares to be dropped", 60, || {
            spares(s).is_empty()
        });
        finish(s, &mut ctrd, &mut srv, &before);
    });
}

/// `--mounts device` hands out the thin device, as before bind mounts;
/// nothing is mounted under the holders.
#[test]
fn vm_containerd_device_mounts() {
    vm_test("ctrd-device", Pool::Small, |s| {
        let base = s.root.parent().unwrap().to_owned();
        let socket = base.join("thinlayer.sock");
        let c = Containerd::new(&base, &socket);
        let before = thin_devices();
        let mut srv = serve_with(s, &socket, &["--mounts", "device", "--max-spares", "0"]);
        let mut ctrd = c.start();
        import_demo(&c);
        let top = top_snapshot(&c);
        snap(&c, &["prepare", "d1", &top]);
        let (ty, source, options) = mount_of(&c, "d1");
        assert_eq!(ty, "ext4", "{source} {options}");
        assert!(source.starts_with("/dev/dm-"), "{source}");
        assert!(
            holder_mounts(s).1.is_empty(),
            "nothing mounted by the server"
        );
        snap(&c, &["commit", "dc", "d1"]);
        wait_until("dc's device down", 60, || {
            layer_ending(s, "-d1")["devnode"].is_null()
        });
        assert!(spares(s).is_empty(), "--max-spares 0 keeps none");
        snap(&c, &["rm", "dc"]);
        wait_until("dc's layer to go", 60, || ctrd_layers(s).len() == 3);
        finish(s, &mut ctrd, &mut srv, &before);
    });
}
