//! A dockerd for the docker tests (`vm_docker`, `vm_docker_volumes`):
//! Debian's 20.10 in the guest (`THINLAYER_VM_EXTRAS=docker`) with its own
//! data root, exec root and API socket, and thinlayer's plugin on the
//! socket where dockerd finds it.

#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{Scratch, Served};

pub const DOCKER: &str = "/usr/bin/docker";
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// Where dockerd finds the plugin named `thinlayer`.
pub const PLUGIN_SOCKET: &str = "/run/docker/plugins/thinlayer.sock";

pub fn fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/fixtures/images")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run tests/fixtures/make-images target/fixtures/images",
        p.display()
    );
    p
}

pub fn require_docker() {
    super::require_dm_thin();
    assert!(
        Path::new(DOCKERD).exists() && Path::new(DOCKER).exists(),
        "the docker tests need dockerd and the docker CLI in the guest: run them with \
         THINLAYER_VM_EXTRAS=docker tools/vm/run (tools/test does; tools/setup installs docker.io)"
    );
}

/// A dockerd of a test: its own data root, exec root and API socket;
/// stopped (SIGTERM) explicitly or killed on drop.
pub struct Dockerd {
    child: Option<Child>,
    host: String,
    log: PathBuf,
}

impl Dockerd {
    /// Starts dockerd with the storage driver `driver` and the issue's
    /// flags for a guest without networking; waits until it answers.
    pub fn start(data_root: &Path, tag: &str, driver: &str, extra: &[&str]) -> Dockerd {
        let exec_root = PathBuf::from(format!("/run/tl-dk-{}-{tag}", std::process::id()));
        fs::create_dir_all(data_root).unwrap();
        let host = format!("unix://{}/docker.sock", exec_root.display());
        let log = data_root.with_extension(format!("{tag}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(DOCKERD)
            .args(["--experimental", "-s", driver])
            .args(["--bridge=none", "--iptables=false", "--ip-forward=false"])
            .args(["--ip-masq=false", "--userland-proxy=false"])
            .arg("--data-root")
            .arg(data_root)
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(exec_root.with_extension("pid"))
            .args(["-H", &host])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start dockerd");
        let mut d = Dockerd {
            child: Some(child),
            host,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if d.run(&["version"]).status.success() {
                break;
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited ({st}):\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd not up after 120 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// `docker ARGS`, killed after 300 s (a hung call fails the test
    /// instead of the whole VM run).
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("timeout")
            .args(["300", DOCKER, "-H", &self.host])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    /// `docker ARGS`, asserted to succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let t = Instant::now();
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\n{}{}\n--- dockerd log (tail) ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 30)
        );
        println!("docker {} ({} ms)", args.join(" "), t.elapsed().as_millis());
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker ARGS`, asserted to fail with `needle` in its output
    /// (stdout and stderr); that output.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let out = self.run(args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "docker {args:?} succeeded: {all}");
        assert!(
            all.contains(needle),
            "docker {args:?}: `{needle}` not in: {all}"
        );
        all
    }

    /// `docker volume inspect NAME`'s JSON.
    pub fn volume(&self, name: &str) -> Value {
        let text = self.ok(&["volume", "inspect", name]);
        serde_json::from_str::<Value>(&text).unwrap()[0].clone()
    }

    /// SIGTERM (dockerd stops its containers and calls the driver's
    /// Cleanup), then waits for it to exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dockerd did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if std::thread::panicking() {
                eprintln!("--- dockerd log (tail) ---\n{}", tail(&self.log_text(), 60));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn plugin(s: &Scratch) -> Served {
    let _ = fs::remove_file(PLUGIN_SOCKET);
    Served::start(s, &["serve", "docker"], Path::new(PLUGIN_SOCKET))
}

/// The pool's layers owned by the Docker graphdriver, its init templates
/// (which Docker never sees) included.
fn graphdriver_layers(s: &Scratch) -> Vec<Value> {
    let v = s.json(&["layer", "ls"]);
    v.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["owner"] == "graphdriver")
        .cloned()
        .collect()
}

/// Whether pool layer `l` (from `layer ls`) is an init template.
fn is_template(l: &Value) -> bool {
    l["id"].as_str().unwrap().ends_with("-init-template")
}

/// Docker's layers in the pool.
pub fn docker_layers(s: &Scratch) -> Vec<Value> {
    let mut all = graphdriver_layers(s);
    all.retain(|l| !is_template(l));
    all
}

/// The graphdriver's init templates in the pool.
pub fn init_templates(s: &Scratch) -> Vec<Value> {
    let mut all = graphdriver_layers(s);
    all.retain(is_template);
    all
}

/// [`docker_layers`] once the plugin has taken the layers Docker removed
/// out of the pool (it answers a Remove first and does that as soon as
/// requests pause): polled for up to 10 s until there are `want`.
pub fn docker_layers_settled(s: &Scratch, want: usize) -> Vec<Value> {
    settled(|| docker_layers(s), |got| got.len() == want, 10)
}

/// [`init_templates`] once there is one: the plugin makes a template as
/// soon as requests pause, so polled for up to 10 s.
pub fn init_templates_made(s: &Scratch) -> Vec<Value> {
    settled(|| init_templates(s), |got| !got.is_empty(), 10)
}

/// The pool's spares whose filesystem is mounted now.
pub fn mounted_spares(s: &Scratch) -> Vec<Value> {
    let status = s.json(&["pool", "status"]);
    let mut spares = status["spares"].as_array().cloned().unwrap_or_default();
    spares.retain(|sp| sp["mounted"] == true);
    let mounts = status["spare_cost"]["mounts"].as_u64().unwrap();
    if mounts == spares.len() as u64 {
        spares
    } else {
        // Asked for, not made yet.
        Vec::new()
    }
}

/// [`mounted_spares`] once there is one: the plugin keeps a mounted spare
/// for the next container on an image it ran, made as soon as requests
/// pause on a quiet machine, or [`thinlayer_docker::graphdriver::QUIET_WAIT`] after on
/// a busy one (and the other waiting steps may go first), so polled for
/// up to 60 s.
pub fn mounted_spares_made(s: &Scratch) -> Vec<Value> {
    settled(|| mounted_spares(s), |got| !got.is_empty(), 60)
}

/// `list()` once `done` says so of it, polled for up to `secs` (the last
/// listing if it never does).
fn settled(
    list: impl Fn() -> Vec<Value>,
    done: impl Fn(&[Value]) -> bool,
    secs: u64,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = list();
        if done(&got) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end of a Docker test: the image removed, no graphdriver layer left,
/// dockerd and the plugin stopped, no thin device beyond `devices_before`,
/// and `pool check` clean.
pub fn finish_clean(s: &Scratch, d: &mut Dockerd, p: &mut Served, devices_before: &[String]) {
    d.ok(&["rmi", "demo:docker"]);
    let left = settled(|| graphdriver_layers(s), <[Value]>::is_empty, 10);
    assert!(
        left.is_empty(),
        "init templates go with their images: {left:?}"
    );
    d.stop();
    p.stop();
    assert_eq!(super::dm_devices(), devices_before, "a thin device is left");
    s.ok(&["pool", "check"]);
}
