//! `thinlayer bench --docker`: a real dockerd with each of Docker's own
//! storage drivers (`overlay2`, `vfs`, `devicemapper` in loop-lvm mode)
//! and thinlayer's plugin (`thinlayer serve docker` on a fresh pool,
//! `dockerd --experimental -s thinlayer`), all four up at once in one run,
//! on the same image and the same operations. The timed operations
//! interleave: sample `i` of an operation runs once per driver, in an
//! order that changes with `i` (a balanced Latin square), each on a quiet
//! machine, so that a slow spell of the machine (a TCG guest has many)
//! falls on every driver alike. Run one driver after another, the last
//! one ran a quarter of an hour after the first, and the first driver's
//! figures moved by up to 0.4x between two runs.
//!
//! Protocol, per driver: a fresh ext4 (a sparse file on the work
//! directory's tmpfs behind a loop device, mounted without `discard`)
//! holds dockerd's data root and, for thinlayer, the pool's root, as
//! `/var/lib/docker` and `/var/lib/thinlayer` on a host's root filesystem
//! would; dockerd runs with the flags of a guest without networking
//! (`--bridge=none --iptables=false --ip-forward=false --ip-masq=false
//! --userland-proxy=false`), its own exec root, API socket and containerd
//! namespaces. Then, with the fixture `other-docker.tar` (2 layers,
//! busybox; `demo-docker.tar` cannot be loaded by overlay2: its top layer
//! hard-links a file of the layer below, which no tar of Docker's own
//! holds and overlay2's ApplyDiff, applying into the layer's directory
//! alone, refuses):
//!
//! - `docker load` of it, `docker rmi` between samples (every layer new);
//! - one untimed `docker run --rm` (dockerd starts its shims), then
//!   `docker run --rm IMAGE true`;
//! - `docker create` (of `sh -c 'echo x > /tl-bench'`), `docker start`,
//!   `docker wait` (untimed), `docker commit`, `docker rm`; then the same
//!   create and rm of one more container (never started) as single
//!   requests of Docker's API to dockerd's socket, with no CLI process:
//!   the daemon's and the driver's part of them, without the CLI's own
//!   start (in the TCG guest most of a short command, and its most
//!   variable part);
//!
//! (those three interleaved across the drivers), then one driver after
//! another, with the others idle:
//!
//! - space per trivial container: containers that ran `true` and were
//!   left, the driver's own accounting and the host filesystem's;
//! - an image with a 256 MiB file (`docker load` of the fixture's layers
//!   and one holding the file, made once for all drivers), then per sample
//!   a container of it running `sleep`: caches dropped, the first 4 KiB
//!   write into that file through `/proc/PID/root` (open + write + fsync,
//!   timed) and the bytes the driver allocated for it;
//! - last, `docker commit` of a container into which a new 256 MiB file
//!   was copied (`docker cp`): the driver's Diff streamed into its
//!   ApplyDiff. A failure there is a note, not the end of the driver's run.
//!
//! The driver's own accounting: thinlayer's pool blocks (`thinlayer pool
//! status`), devicemapper's pool blocks (its pool, named by `docker info`,
//! read from the kernel: `docker info` rounds to 4 digits), `du -x` of the
//! driver's directory for overlay2 (its upper directories) and vfs. Host
//! bytes are the ext4's (`statvfs` after `syncfs`).
//!
//! Every other figure is a CLI call timed from spawn to exit, as a user
//! sees it; none is asserted. A driver that fails is reported (a note with the
//! error and dockerd's log) and the others still run.
//!
//! What must never happen: a dockerd, plugin, mount, dm device or loop
//! device of the run left behind (teardown runs on error too).

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    os::unix::{
        fs::{FileExt, MetadataExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use devicemapper::{DM, DevId, DmFlags, DmName, DmOptions, ThinPoolStatus};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde_json::Value;

use crate::{
    Options, Params,
    error::{DmContext, Error, IoContext, Result},
    report::{Report, Sample},
    sys::{self, ms_since},
};

/// The workload name of every docker sample (its backend is the driver).
pub(crate) const WORKLOAD: &str = "docker";

/// The drivers, in the order they run and are shown.
pub(crate) const DRIVERS: [&str; 4] = ["overlay2", "vfs", "devicemapper", "thinlayer"];

/// The image every operation uses (`tests/fixtures/make-images`).
const FIXTURE: &str = "other-docker.tar";
const IMAGE: &str = "other:1";
/// What the timed create's container runs (it never starts for the API's).
const CMD: [&str; 3] = ["sh", "-c", "echo x > /tl-bench"];
const LAYERS: usize = 2;
/// The image with the large file, and that file's size.
const BIG_IMAGE: &str = "tl-bench:big";
const BIG: u64 = 256 << 20;
const KIB4: u64 = 4096;

/// Before each driver's sample of an interleaved operation: at most 15 %
/// of the CPUs busy over 400 ms (idle dockerds and containerds take a
/// few), waited for 5 s at most. The window is longer than the pause
/// thinlayer's plugin waits for before its deferred work (250 ms), so a
/// quiet window is one that work has already started in, or finished.
const QUIET_WINDOW: Duration = Duration::from_millis(400);
const QUIET_BUSY: f64 = 0.15;
const QUIET_LIMIT: Duration = Duration::from_secs(5);

/// Where dockerd finds the plugin named `thinlayer`.
const PLUGIN_SOCKET: &str = "/run/docker/plugins/thinlayer.sock";

/// The sparse ext4 each driver's data lives on.
const DISK: u64 = 24 << 30;

/// A docker CLI call, dockerd's start, a plugin's start or stop: killed
/// (and the run's driver failed) past this.
const LIMIT: Duration = Duration::from_secs(600);

/// The programs the workload runs.
struct Tools {
    dockerd: PathBuf,
    docker: PathBuf,
    /// This thinlayer binary, for the plugin and its pool.
    exe: PathBuf,
    /// The image archive.
    fixture: PathBuf,
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Checks, before anything runs, that dockerd, the docker CLI and the
/// fixture are there.
///
/// # Errors
/// [`Error::Tool`] saying what to install or build.
pub(crate) fn preflight(opts: &Options) -> Result<()> {
    tools(opts).map(|_| ())
}

fn tools(opts: &Options) -> Result<Tools> {
    let missing = |what: &str, detail: &str| Error::Tool {
        command: format!("thinlayer bench --docker: {what}"),
        detail: detail.to_owned(),
    };
    let dockerd = which("dockerd").ok_or_else(|| {
        missing(
            "dockerd",
            "not found in PATH: install docker.io (tools/setup does), or run in the VM \
             with THINLAYER_VM_EXTRAS=docker tools/vm/run",
        )
    })?;
    let docker = which("docker").ok_or_else(|| {
        missing(
            "docker",
            "the docker CLI is not in PATH: install docker.io (tools/setup does)",
        )
    })?;
    let fixture = fixture(opts, FIXTURE, "--docker")?;
    // The plugin is `thinlayer serve docker`.
    let exe = thinlayer_exe("--docker")?;
    Ok(Tools {
        dockerd,
        docker,
        exe,
        fixture,
    })
}

/// The fixture `name` of `--fixtures`, or an error (for workload `flag`)
/// saying how to build it.
///
/// # Errors
/// [`Error::Tool`].
pub(crate) fn fixture(opts: &Options, name: &str, flag: &str) -> Result<PathBuf> {
    let path = opts.fixtures.join(name);
    if path.is_file() {
        return Ok(path);
    }
    Err(Error::Tool {
        command: format!("thinlayer bench {flag}: {name}"),
        detail: format!(
            "{} missing: run tests/fixtures/make-images {} (or pass --fixtures DIR)",
            path.display(),
            opts.fixtures.display()
        ),
    })
}

/// The `thinlayer` next to this program (as `thinlayer bench` found this
/// one), else the one on PATH: the plugins' server and their pools' CLI.
///
/// # Errors
/// [`Error::Tool`] (for workload `flag`) when there is none.
pub(crate) fn thinlayer_exe(flag: &str) -> Result<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("thinlayer")))
        .filter(|p| p.is_file())
        .or_else(|| which("thinlayer"))
        .ok_or_else(|| Error::Tool {
            command: format!("thinlayer bench {flag}: thinlayer"),
            detail: "not next to thinlayer-bench nor in PATH: build it (cargo build) or install it"
                .into(),
        })
}

/// Runs the docker workload for every driver, adds its samples, phases
/// and notes to `report` and recomputes the stats.
///
/// Every driver's dockerd is up for the whole run, so that the timed
/// operations interleave: sample `i` of an operation runs it once per
/// driver, in an order that changes with `i` (see [`sample_order`]). A slow
/// spell of the machine then falls on every driver alike, not on the one
/// that ran in it.
///
/// # Errors
/// Missing tools or fixture; every driver failing (one failing is a note).
pub(crate) fn run(report: &mut Report, opts: &Options, p: &Params) -> Result<()> {
    let tools = tools(opts)?;
    let started = Instant::now();
    let base = opts.work.join("docker");
    let _ = fs::remove_dir_all(&base);
    sys::mkdir(&base)?;
    let big = match Big::new(&base, &tools.fixture) {
        Ok(b) => b,
        Err(e) => {
            let _ = fs::remove_dir_all(&base);
            return Err(e);
        }
    };
    let version = Command::new(&tools.dockerd)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let at = || started.elapsed().as_secs_f64();
    let mut phases = Vec::new();

    let t = Instant::now();
    let mut rigs: Vec<Rig> = Vec::new();
    for driver in DRIVERS {
        eprintln!("bench: docker, starting driver {driver} (at {:.0} s)", at());
        let mut rig = Rig::new(driver, &base);
        if let Err(e) = rig.up(&tools) {
            rig.fail(e);
        }
        rigs.push(rig);
    }
    phases.push(("docker: every dockerd started".to_owned(), t));

    let t = Instant::now();
    eprintln!(
        "bench: docker, timed operations interleaved (at {:.0} s)",
        at()
    );
    interleaved(&mut rigs, &tools, p);
    phases.push(("docker: interleaved operations".to_owned(), t));

    for rig in &mut rigs {
        let t = Instant::now();
        if rig.failed.is_none() {
            eprintln!(
                "bench: docker, driver {} alone (at {:.0} s)",
                rig.m.driver,
                at()
            );
            if let Err(e) = alone(rig, p, &big) {
                rig.fail(e);
            }
        }
        if let Err(e) = rig.down() {
            rig.fail(e);
        }
        phases.push((format!("docker: {} alone, and down", rig.m.driver), t));
    }
    report.phases.extend(
        phases
            .into_iter()
            .map(|(what, t)| (what, t.elapsed().as_secs_f64())),
    );

    sys::keep_logs(&base, &opts.out.join("logs/docker"));
    let _ = fs::remove_dir_all(&base);
    let failed: Vec<String> = rigs.iter().filter_map(|r| r.failed.clone()).collect();
    for rig in rigs {
        report.samples.extend(rig.m.samples);
        report.notes.extend(rig.m.notes);
    }
    report.notes.push(format!(
        "docker: {version}, one dockerd per driver, all up at once (--experimental --bridge=none \
         --iptables=false --ip-forward=false --ip-masq=false --userland-proxy=false, a containerd \
         namespace each), each on a fresh ext4 (sparse file, loop) holding its data root (and \
         thinlayer's pool root); image {IMAGE} ({FIXTURE}, {LAYERS} layers); medians of {n}; every \
         time is a docker CLI call from spawn to exit. Load, run --rm, create, start, commit and rm \
         are interleaved: sample i of each runs once per driver, in row i of a balanced Latin \
         square (each driver in each place, and after each other driver, once per {k} samples), \
         each once the machine is quiet (at most {busy} % of CPU time busy over {window} ms, \
         {limit} s at most), so that the work a driver's daemons do after answering falls on no other \
         driver's calls. \
         Space, the first write and the 256 MiB commit run one driver after another. Allocated: \
         thinlayer and devicemapper pool blocks (64 KiB each), overlay2 and vfs bytes under the \
         driver's directory (du -x: overlay2's upper dirs); host bytes: the ext4's use; returned \
         on rm: once the use stops falling (3 s unchanged, 60 s at most), so space given back \
         after the answer counts. The first write goes through /proc/PID/root of a running \
         container, caches dropped first. Create and rm again as API requests alone (no \
         docker CLI; a container never started), after the same quiet gate: the daemon's and \
         the driver's part of them",
        n = p.docker_samples,
        k = DRIVERS.len(),
        busy = QUIET_BUSY * 100.0,
        window = QUIET_WINDOW.as_millis(),
        limit = QUIET_LIMIT.as_secs()
    ));
    report.compute_stats();
    report.wall_seconds += started.elapsed().as_secs_f64();
    if failed.len() == DRIVERS.len() {
        return Err(Error::Tool {
            command: "thinlayer bench --docker".into(),
            detail: format!("no driver could be measured:\n{}", failed.join("\n")),
        });
    }
    Ok(())
}

/// The image with the large file, made once for every driver: the
/// fixture's layers and one more holding `/big`, as a `docker save`
/// archive (loading it applies that layer alone, as a pull would; a
/// `docker commit` of a container holding the file is measured apart).
struct Big {
    /// The 256 MiB file.
    file: PathBuf,
    /// The archive, tagged [`BIG_IMAGE`].
    archive: PathBuf,
}

impl Big {
    fn new(base: &Path, fixture: &Path) -> Result<Big> {
        let tree = sys::mkdir(&base.join("big-tree"))?;
        let file = tree.join("big");
        let f = fs::File::create(&file).ctx(|| format!("create {}", file.display()))?;
        let chunk = sys::pattern(BIG, 1 << 20);
        let mut off = 0;
        while off < BIG {
            f.write_all_at(&chunk, off)
                .ctx(|| format!("write {}", file.display()))?;
            off += chunk.len() as u64;
        }
        drop(f);
        let dir = sys::mkdir(&base.join("big-image"))?;
        let dir_s = dir.to_string_lossy().into_owned();
        sys::tool("tar", &["-xf", &fixture.to_string_lossy(), "-C", &dir_s])?;
        let read_json = |name: &str| -> Result<Value> {
            let p = dir.join(name);
            let text = fs::read(&p).ctx(|| format!("read {}", p.display()))?;
            serde_json::from_slice(&text)
                .map_err(|e| Error::Parse(format!("{} in {}: {e}", name, fixture.display())))
        };
        let manifest = read_json("manifest.json")?;
        let entry = &manifest[0];
        let (Some(config_name), Some(layers)) =
            (entry["Config"].as_str(), entry["Layers"].as_array())
        else {
            return Err(Error::Parse(format!(
                "{}: manifest.json names no Config and Layers",
                fixture.display()
            )));
        };
        let mut config = read_json(config_name)?;
        let empty = sys::mkdir(&base.join("big-empty"))?;
        let layer = sys::mkdir(&dir.join("big"))?.join("layer.tar");
        let out = fs::File::create(&layer).ctx(|| format!("create {}", layer.display()))?;
        let made = thinlayer_image::write_layer(&empty, &tree, std::io::BufWriter::new(out))?;
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .ok_or_else(|| Error::Parse(format!("{config_name}: no rootfs.diff_ids")))?
            .push(made.diff_id.into());
        let mut layers = layers.clone();
        layers.push("big/layer.tar".into());
        let manifest = serde_json::json!([{
            "Config": "big.json",
            "RepoTags": [BIG_IMAGE],
            "Layers": layers,
        }]);
        for (name, v) in [("big.json", &config), ("manifest.json", &manifest)] {
            let p = dir.join(name);
            fs::write(&p, v.to_string()).ctx(|| format!("write {}", p.display()))?;
        }
        for old in [config_name, "repositories"] {
            let _ = fs::remove_file(dir.join(old));
        }
        let archive = base.join("big-image.tar");
        sys::tool(
            "tar",
            &["-cf", &archive.to_string_lossy(), "-C", &dir_s, "."],
        )?;
        fs::remove_dir_all(&dir).ctx(|| format!("remove {}", dir.display()))?;
        Ok(Big { file, archive })
    }
}

/// One driver's figures as they come.
struct Meas {
    driver: &'static str,
    samples: Vec<Sample>,
    notes: Vec<String>,
}

impl Meas {
    fn add(&mut self, metric: &str, value: f64) {
        self.samples.push(Sample {
            backend: self.driver.to_owned(),
            workload: WORKLOAD.to_owned(),
            param: 0,
            metric: metric.to_owned(),
            value,
        });
    }
}

/// What Docker's devicemapper driver runs besides dockerd: util-linux's
/// `blkid -s UUID -o value` on its base device (busybox's takes no
/// options), and a mkfs.
fn devicemapper_needs() -> Result<()> {
    let blkid = which("blkid").and_then(|p| fs::canonicalize(p).ok());
    if blkid.is_none_or(|p| p.file_name().is_some_and(|n| n == "busybox")) {
        return Err(Error::Tool {
            command: "dockerd -s devicemapper".into(),
            detail: "needs util-linux's blkid in PATH (it reads its base device's UUID with \
                     `blkid -s UUID -o value`); none here, or only busybox's: install util-linux \
                     (in the VM: add blkid to the docker extras of tools/vm/build-initramfs)"
                .into(),
        });
    }
    if which("mkfs.xfs").is_none() && which("mkfs.ext4").is_none() {
        return Err(Error::Tool {
            command: "dockerd -s devicemapper".into(),
            detail: "needs mkfs.xfs or mkfs.ext4 in PATH for its base device".into(),
        });
    }
    Ok(())
}

/// Where a driver's space is read.
enum Meter {
    /// `du -x` of a directory.
    Du(PathBuf),
    /// A thin pool's used data blocks, by dm name.
    Pool(String),
    /// thinlayer's pool, by `thinlayer pool status`.
    Thinlayer(PathBuf, PathBuf),
}

impl Meter {
    /// Bytes in use now.
    fn used(&self) -> Result<u64> {
        match self {
            Meter::Du(d) => du_x(d),
            Meter::Pool(name) => pool_used(name).map(|(blocks, bs)| blocks * bs),
            Meter::Thinlayer(exe, root) => thinlayer_status(exe, root).map(|(n, bs)| n * bs),
        }
    }

    /// Bytes in use once they stop falling: a driver that gives space back
    /// after it answers (thinlayer's settler, devicemapper's deferred
    /// deletion) is measured when done. The machine quiet first (the
    /// settler's steps before its reclaims, such as removals finished and
    /// devices torn down, change no count), then unchanged for 3 s; 60 s
    /// at most each.
    fn used_when_settled(&self) -> Result<u64> {
        sys::quiet(QUIET_WINDOW, QUIET_BUSY, Duration::from_secs(60))?;
        let start = Instant::now();
        let mut last = self.used()?;
        let mut unchanged = 0;
        while unchanged < 3 && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.used()?;
            if now == last {
                unchanged += 1;
            } else {
                (last, unchanged) = (now, 0);
            }
        }
        Ok(last)
    }
}

/// The pool block size of the driver's accounting, if it counts blocks.
fn block_of(meter: &Meter) -> Result<Option<u64>> {
    match meter {
        Meter::Du(_) => Ok(None),
        Meter::Pool(name) => pool_used(name).map(|(_, bs)| Some(bs)),
        Meter::Thinlayer(exe, root) => thinlayer_status(exe, root).map(|(_, bs)| Some(bs)),
    }
}

/// thinlayer's pool: used data blocks and block size in bytes, from
/// `thinlayer pool status`.
fn thinlayer_status(exe: &Path, root: &Path) -> Result<(u64, u64)> {
    let out = cli(Command::new(exe)
        .arg("--root")
        .arg(root)
        .args(["--json", "--wait", "pool", "status"]))?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Parse(format!("thinlayer pool status --json: {e}")))?;
    let blocks = v["kernel"]["data_used_blocks"].as_u64();
    let bs = v["block_size_bytes"].as_u64();
    blocks.zip(bs).ok_or_else(|| {
        Error::Parse(format!(
            "thinlayer pool status: no kernel.data_used_blocks or block_size_bytes: {v}"
        ))
    })
}

/// A dm thin pool's used data blocks and block size in bytes.
fn pool_used(name: &str) -> Result<(u64, u64)> {
    let dm = DM::new().dm(|| "open /dev/mapper/control".into())?;
    let dmname = DmName::new(name).dm(|| format!("the dm name {name}"))?;
    let id = DevId::Name(dmname);
    let (_, status) = dm
        .table_status(&id, DmOptions::default())
        .dm(|| format!("status of {name}"))?;
    let (_, table) = dm
        .table_status(
            &id,
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )
        .dm(|| format!("table of {name}"))?;
    let line = status
        .into_iter()
        .next()
        .ok_or_else(|| Error::Parse(format!("{name} has no table")))?
        .3;
    let used = match line
        .parse::<ThinPoolStatus>()
        .dm(|| format!("parse the status of {name}"))?
    {
        ThinPoolStatus::Working(w) => w.usage.used_data.0,
        _ => return Err(Error::Parse(format!("{name} has failed"))),
    };
    // thin-pool table: METADATA DATA BLOCK_SECTORS LOW_WATER ...
    let sectors = table
        .first()
        .and_then(|l| l.3.split_whitespace().nth(2))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| Error::Parse(format!("{name}: no block size in its table")))?;
    Ok((used, sectors * 512))
}

/// Bytes allocated under `dir` on its own filesystem (`du -x`): mounts
/// below it (a running container's root) are not entered, and a file of
/// several names (busybox's hard links) is counted once.
fn du_x(dir: &Path) -> Result<u64> {
    fn walk(dir: &Path, dev: u64, seen: &mut HashSet<u64>) -> Result<u64> {
        let mut total = 0;
        for e in fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
            let p = e.ctx(|| format!("list {}", dir.display()))?.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                // Gone since the listing (dockerd tidying up): nothing to count.
                continue;
            };
            if m.dev() != dev || (m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino())) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                total += walk(&p, dev, seen)?;
            }
        }
        Ok(total)
    }
    let top = fs::symlink_metadata(dir).ctx(|| format!("stat {}", dir.display()))?;
    Ok(walk(dir, top.dev(), &mut HashSet::new())? + top.blocks() * 512)
}

/// The host filesystem's bytes in use, flushed first.
fn host_used(fs: &Path) -> Result<u64> {
    sys::syncfs(fs)?;
    sys::fs_used(fs)
}

/// One driver of the run, up from the first operation to its last: its
/// disk, its plugin (thinlayer's), its dockerd and where its space is read.
/// A driver that fails stops there, with its error as a note; the others go
/// on.
struct Rig {
    m: Meas,
    dir: PathBuf,
    disk: Option<Ext4>,
    plugin: Option<Plugin>,
    d: Option<Dockerd>,
    meter: Option<Meter>,
    /// The pool block size of its accounting, if it counts blocks.
    block: Option<u64>,
    /// Why it stopped being measured.
    failed: Option<String>,
}

impl Rig {
    fn new(driver: &'static str, base: &Path) -> Rig {
        Rig {
            m: Meas {
                driver,
                samples: Vec::new(),
                notes: Vec::new(),
            },
            dir: base.join(driver),
            disk: None,
            plugin: None,
            d: None,
            meter: None,
            block: None,
            failed: None,
        }
    }

    /// Builds its ext4 (and pool), starts its plugin and dockerd, checks
    /// the driver dockerd runs and notes its status.
    fn up(&mut self, tools: &Tools) -> Result<()> {
        let driver = self.m.driver;
        sys::mkdir(&self.dir)?;
        let disk = self.disk.insert(Ext4::new(&self.dir)?);
        let data_root = disk.fs.join("docker");
        let pool_root = disk.fs.join("thinlayer");
        if driver == "thinlayer" {
            self.plugin = Some(Plugin::start(
                &tools.exe,
                &pool_root,
                &self.dir,
                "docker",
                Path::new(PLUGIN_SOCKET),
            )?);
        }
        // Its own containerd namespaces: with a containerd of the host
        // running, every dockerd would share it.
        let namespace = format!("--containerd-namespace=tl-bench-{driver}");
        let plugins = format!("--containerd-plugins-namespace=tl-bench-{driver}-plugins");
        let mut extra = vec![namespace.as_str(), plugins.as_str()];
        if driver == "devicemapper" {
            devicemapper_needs()?;
            if !Path::new("/run/udev/control").exists() {
                // No udevd: libdevmapper makes the nodes itself.
                extra.push("--storage-opt=dm.override_udev_sync_check=true");
            }
        }
        let d = self.d.insert(Dockerd::start(
            tools, driver, &data_root, &self.dir, &extra,
        )?);
        let meter = (|| {
            let running = d.ok(&["info", "--format", "{{.Driver}}"])?;
            if running != driver {
                return Err(Error::Parse(format!(
                    "dockerd -s {driver} runs driver {running}"
                )));
            }
            let status = d.ok(&["info", "--format", "{{json .DriverStatus}}"])?;
            // null for a driver without any (vfs).
            let pairs: Vec<Vec<String>> = serde_json::from_str::<Option<_>>(&status)
                .map_err(|e| Error::Parse(format!("docker info DriverStatus: {e}: {status}")))?
                .unwrap_or_default();
            let shown: Vec<String> = pairs.iter().map(|kv| kv.join(": ")).collect();
            self.m.notes.push(format!(
                "docker {driver}: docker info: {}",
                if shown.is_empty() {
                    "(no driver status)".into()
                } else {
                    shown.join("; ")
                }
            ));
            Ok(match driver {
                "thinlayer" => Meter::Thinlayer(tools.exe.clone(), pool_root.clone()),
                "devicemapper" => Meter::Pool(
                    pairs
                        .iter()
                        .find(|kv| kv.first().is_some_and(|k| k == "Pool Name"))
                        .and_then(|kv| kv.get(1).cloned())
                        .ok_or_else(|| {
                            Error::Parse(format!("docker info names no pool: {status}"))
                        })?,
                ),
                other => Meter::Du(d.data_root.join(other)),
            })
        })()?;
        self.block = block_of(&meter)?;
        self.meter = Some(meter);
        Ok(())
    }

    /// Stops measuring it: `e` (with its daemon's log) becomes a note.
    fn fail(&mut self, e: Error) {
        let e = match &self.d {
            Some(d) => d.daemon.with_log(e, self.plugin.as_ref()),
            None => e,
        };
        let msg = format!(
            "docker {}: not measured past this error: {e}",
            self.m.driver
        );
        eprintln!("bench: {msg}");
        self.m.notes.push(msg.clone());
        if self.failed.is_none() {
            self.failed = Some(msg);
        }
    }

    /// Takes everything it started down, also what it left: dockerd,
    /// mounts, the plugin and its pool, dm and loop devices, the ext4.
    fn down(&mut self) -> Result<()> {
        let mut r = match self.d.take() {
            Some(mut d) => d.daemon.stop(),
            None => Ok(()),
        };
        let Some(disk) = self.disk.take() else {
            return r;
        };
        r = r.and(sweep_mounts(&disk.fs));
        if let Some(mut pl) = self.plugin.take() {
            r = r.and(pl.stop_and_destroy());
        }
        r = r.and(sweep_dm(&disk.fs.join("docker").join("devicemapper")));
        r = r.and(sweep_loops(&disk.fs));
        r.and(disk.teardown())
    }
}

/// Waits until the machine is quiet (see [`sys::quiet`]) before a timed
/// call: what the last call left running, of this driver or another,
/// falls on no timed one. The wait is sample `quiet-wait-ms`.
fn quiet(m: &mut Meas) -> Result<()> {
    let waited = sys::quiet(QUIET_WINDOW, QUIET_BUSY, QUIET_LIMIT)?;
    m.add("quiet-wait-ms", waited.as_secs_f64() * 1e3);
    Ok(())
}

/// Runs `op` for each of `n` samples once per driver still measured, in
/// the order [`sample_order`] gives for the sample's index, each started
/// on a quiet machine ([`quiet`]).
fn rounds(
    rigs: &mut [Rig],
    n: usize,
    mut op: impl FnMut(&mut Meas, &Dockerd, &Meter, usize) -> Result<()>,
) {
    for i in 0..n {
        for r in sample_order(rigs.len(), i) {
            let rig = &mut rigs[r];
            if rig.failed.is_some() {
                continue;
            }
            let (d, meter) = match (&rig.d, &rig.meter) {
                (Some(d), Some(m)) => (d, m),
                _ => continue,
            };
            if let Err(e) = quiet(&mut rig.m).and_then(|()| op(&mut rig.m, d, meter, i)) {
                rig.fail(e);
            }
        }
    }
}

/// The order of `k` drivers in sample `i`: row `i % k` of a balanced
/// Latin square (Williams'), so that over `k` samples each driver runs
/// once in each place and, for an even `k`, right after each other driver
/// once. Turning one order alone would put each driver after the same one
/// every time, and what that one leaves running would fall on it alone.
fn sample_order(k: usize, i: usize) -> impl Iterator<Item = usize> {
    // First row 0, 1, k-1, 2, k-2, ...; row i adds i to each.
    (0..k).map(move |j| {
        let first = match j {
            0 => 0,
            j if j % 2 == 1 => j.div_ceil(2),
            j => k - j / 2,
        };
        (first + i) % k
    })
}

/// The timed operations, interleaved across the drivers (see [`run`]).
fn interleaved(rigs: &mut [Rig], tools: &Tools, p: &Params) {
    let n = p.docker_samples;
    let fixture = tools.fixture.to_string_lossy().into_owned();

    // docker load: every layer new each time.
    rounds(rigs, n, |m, d, meter, i| {
        let used0 = meter.used()?;
        let ms = d.timed(&["load", "-i", &fixture])?;
        m.add("load-ms", ms);
        m.add("load-alloc-bytes", meter.used()? as f64 - used0 as f64);
        if i + 1 < n {
            d.ok(&["rmi", IMAGE])?;
        }
        Ok(())
    });

    // run --rm, after one that starts what dockerd starts lazily.
    rounds(rigs, 1, |_, d, _, _| {
        d.ok(&["run", "--rm", IMAGE, "true"]).map(|_| ())
    });
    rounds(rigs, n, |m, d, _, _| {
        let ms = d.timed(&["run", "--rm", IMAGE, "true"])?;
        m.add("run-rm-ms", ms);
        Ok(())
    });

    // create, start, commit, rm.
    rounds(rigs, n, |m, d, _, i| {
        let name = format!("tl-c{i}");
        let mut args = vec!["create", "--name", &name, IMAGE];
        args.extend(CMD);
        let create = d.timed(&args)?;
        quiet(m)?;
        let start = d.timed(&["start", &name])?;
        d.ok(&["wait", &name])?;
        quiet(m)?;
        let commit = d.timed(&["commit", &name, &format!("tl-bench:c{i}")])?;
        quiet(m)?;
        let rm = d.timed(&["rm", &name])?;
        d.ok(&["rmi", &format!("tl-bench:c{i}")])?;
        // The same create and rm (of a container never started) as API
        // requests alone: the daemon's and the driver's part.
        let api = format!("tl-a{i}");
        let config = serde_json::json!({"Image": IMAGE, "Cmd": CMD});
        quiet(m)?;
        let create_api = d.api_timed(
            "POST",
            &format!("/containers/create?name={api}"),
            Some(&config),
        )?;
        quiet(m)?;
        let rm_api = d.api_timed("DELETE", &format!("/containers/{api}"), None)?;
        m.add("create-api-ms", create_api);
        m.add("rm-api-ms", rm_api);
        m.add("create-ms", create);
        m.add("start-ms", start);
        m.add("create-start-ms", create + start);
        m.add("commit-ms", commit);
        m.add("rm-ms", rm);
        Ok(())
    });
}

/// What one driver runs with the others idle: space per trivial
/// container, the first write into a large file, and the commit of one.
fn alone(rig: &mut Rig, p: &Params, big: &Big) -> Result<()> {
    let Rig {
        m,
        d: Some(d),
        meter: Some(meter),
        disk: Some(disk),
        plugin,
        block,
        ..
    } = rig
    else {
        unreachable!("a driver is measured only once up");
    };
    let (d, meter, disk, block) = (&*d, &*meter, &*disk, *block);
    let n = p.docker_samples;
    // Space per trivial container.
    let k = p.trivial_containers;
    let (used0, host0) = (meter.used()?, host_used(&disk.fs)?);
    let names: Vec<String> = (0..k).map(|i| format!("tl-t{i}")).collect();
    for name in &names {
        d.ok(&["run", "--name", name, IMAGE, "true"])?;
    }
    let (used1, host1) = (meter.used()?, host_used(&disk.fs)?);
    let mut rm = vec!["rm"];
    rm.extend(names.iter().map(String::as_str));
    d.ok(&rm)?;
    let used2 = meter.used_when_settled()?;
    let per = |a: u64, z: u64| (z as f64 - a as f64) / k as f64;
    m.add("trivial-alloc-bytes", per(used0, used1));
    m.add("trivial-host-bytes", per(host0, host1));
    m.add("trivial-returned-bytes", used1 as f64 - used2 as f64);
    sys::syncfs(&disk.fs)?;
    sys::tool("fstrim", &[&disk.fs.to_string_lossy()])?;

    // The image with the large file, then the first write into it.
    let used0 = meter.used()?;
    let ms = d.timed(&["load", "-i", &big.archive.to_string_lossy()])?;
    m.add("load-256M-ms", ms);
    m.add("load-256M-alloc-bytes", meter.used()? as f64 - used0 as f64);
    for i in 0..n {
        let name = format!("tl-w{i}");
        d.ok(&["run", "-d", "--name", &name, BIG_IMAGE, "sleep", "3600"])?;
        let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &name])?;
        let file = PathBuf::from(format!("/proc/{pid}/root/big"));
        let size = fs::metadata(&file)
            .ctx(|| format!("stat {} (container {name})", file.display()))?
            .len();
        if size != BIG {
            return Err(Error::Parse(format!(
                "{name}: /big has {size} bytes, not {BIG}"
            )));
        }
        // Caches dropped (and everything synced: the atime updates of the
        // container's start committed) before the first reading.
        sys::drop_caches()?;
        let (used1, host1) = (meter.used()?, host_used(&disk.fs)?);
        let t = Instant::now();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .ctx(|| format!("open {}", file.display()))?;
        f.write_all_at(&sys::pattern(3, 4096), (BIG / 2) & !(KIB4 - 1))
            .and_then(|()| f.sync_all())
            .ctx(|| format!("write into {}", file.display()))?;
        let ms = ms_since(t);
        drop(f);
        let used2 = meter.used()?;
        let host2 = host_used(&disk.fs)?;
        let alloc = used2 as f64 - used1 as f64;
        m.add("first-write-ms", ms);
        m.add("first-write-alloc-bytes", alloc);
        m.add("first-write-host-bytes", host2 as f64 - host1 as f64);
        if let Some(bs) = block {
            m.add("first-write-alloc-blocks", alloc / bs as f64);
        }
        d.ok(&["rm", "-f", &name])?;
        sys::syncfs(&disk.fs)?;
        sys::tool("fstrim", &[&disk.fs.to_string_lossy()])?;
    }
    d.ok(&["rmi", BIG_IMAGE])?;

    // A commit of a container holding a new 256 MiB file: the driver's
    // Diff read whole into its ApplyDiff. Its failure is a figure too (a
    // note), not the end of this driver's run.
    let commit = (|| {
        d.ok(&["create", "--name", "tl-big", IMAGE, "true"])?;
        d.ok(&["cp", &big.file.to_string_lossy(), "tl-big:/big"])?;
        let ms = d.timed(&["commit", "tl-big", "tl-bench:c256"])?;
        d.ok(&["rm", "tl-big"])?;
        d.ok(&["rmi", "tl-bench:c256"])?;
        Ok(ms)
    })();
    match commit {
        Ok(ms) => m.add("commit-256M-ms", ms),
        Err(e) => m.notes.push(format!(
            "docker {}: docker commit of a container holding a new 256 MiB file failed: {}",
            m.driver,
            d.daemon.with_log(e, plugin.as_ref())
        )),
    }
    Ok(())
}

// ---------------------------------------------------------------------------

/// Runs a command to its end, killed past [`LIMIT`].
fn output_within(cmd: &mut Command) -> std::io::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let (tx, rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(LIMIT) == Err(RecvTimeoutError::Timeout) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output();
    let _ = tx.send(());
    let _ = watchdog.join();
    out
}

pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd`, failing with its stderr.
pub(crate) fn cli(cmd: &mut Command) -> Result<Output> {
    let out = output_within(cmd).map_err(|e| Error::Tool {
        command: describe(cmd),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Tool {
            command: describe(cmd),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// SIGTERM, then waits up to [`LIMIT`]; SIGKILL and an error past it.
pub(crate) fn terminate(child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + LIMIT;
    loop {
        match child.try_wait().ctx(|| format!("wait for {what}"))? {
            Some(_) => return Ok(()),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Tool {
                    command: what.to_owned(),
                    detail: format!(
                        "did not stop on SIGTERM within {} s (killed); its log:\n{}",
                        LIMIT.as_secs(),
                        tail(log, 20)
                    ),
                });
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The API socket of a dockerd whose exec root is `exec_root`.
fn dockerd_socket(exec_root: &Path) -> PathBuf {
    exec_root.join("docker.sock")
}

/// The API socket address of a dockerd whose exec root is `exec_root`.
pub fn dockerd_host(exec_root: &Path) -> String {
    format!("unix://{}", dockerd_socket(exec_root).display())
}

/// The command line of a private dockerd: storage driver `driver`, its own
/// data root, exec root, pid file and socket ([`dockerd_host`]), and no
/// networking (no bridge, iptables, forwarding or proxy), then `extra`.
/// Standard input and output are left to the caller. It must never share a
/// data or exec root with the host's own dockerd.
pub fn dockerd_command(
    dockerd: &Path,
    driver: &str,
    data_root: &Path,
    exec_root: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(dockerd);
    cmd.args(["--experimental", "-s", driver])
        .args(["--bridge=none", "--iptables=false", "--ip-forward=false"])
        .args(["--ip-masq=false", "--userland-proxy=false"])
        .arg("--data-root")
        .arg(data_root)
        .arg("--exec-root")
        .arg(exec_root)
        .arg("--pidfile")
        .arg(exec_root.with_extension("pid"))
        .args(["-H", &dockerd_host(exec_root)])
        .args(extra);
    cmd
}

/// A daemon the bench started (dockerd, containerd): its process, its log
/// and its run directory (swept of mounts and removed when it stops).
pub(crate) struct Daemon {
    /// The program's name, for messages.
    name: &'static str,
    /// The workload it serves (`docker`, `containerd`): names the
    /// `thinlayer serve` verb beside it in messages.
    workload: &'static str,
    child: Option<Child>,
    /// Its stdout and stderr.
    pub(crate) log: PathBuf,
    run_dir: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` with its output to `log`, then waits until `ready`
    /// says it answers; fails with the log's tail if it exits first or
    /// does not answer within [`LIMIT`].
    pub(crate) fn start(
        name: &'static str,
        workload: &'static str,
        mut cmd: Command,
        log: PathBuf,
        run_dir: PathBuf,
        ready: impl Fn() -> bool,
    ) -> Result<Daemon> {
        let out = fs::File::create(&log).ctx(|| format!("create {}", log.display()))?;
        let err = out.try_clone().ctx(|| format!("open {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().map_err(|e| Error::Tool {
            command: describe(&cmd),
            detail: e.to_string(),
        })?;
        let mut d = Daemon {
            name,
            workload,
            child: Some(child),
            log,
            run_dir,
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            if ready() {
                return Ok(d);
            }
            let child = d.child.as_mut().expect("just started");
            if let Some(st) = child.try_wait().ctx(|| format!("wait for {name}"))? {
                d.child = None;
                return Err(Error::Tool {
                    command: describe(&cmd),
                    detail: format!("{name} exited ({st}); its log:\n{}", tail(&d.log, 25)),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Tool {
                    command: describe(&cmd),
                    detail: format!(
                        "{name} not answering after {} s; its log:\n{}",
                        LIMIT.as_secs(),
                        tail(&d.log, 25)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `e` with the tail of the daemon's log (and the plugin's).
    pub(crate) fn with_log(&self, e: Error, plugin: Option<&Plugin>) -> Error {
        let mut detail = format!(
            "{e}\n--- {} log (tail) ---\n{}",
            self.name,
            tail(&self.log, 15)
        );
        if let Some(pl) = plugin {
            let _ = write!(
                detail,
                "\n--- thinlayer serve {} log (tail) ---\n{}",
                self.workload,
                tail(&pl.log, 15)
            );
        }
        Error::Tool {
            command: format!("{} workload", self.workload),
            detail,
        }
    }

    /// SIGTERM (dockerd then stops its containers and calls the driver's
    /// Cleanup), then what its shims left mounted under its run directory.
    pub(crate) fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let r = terminate(&mut child, self.name, &self.log);
        let r = r.and(sweep_mounts(&self.run_dir));
        let _ = fs::remove_dir_all(&self.run_dir);
        r
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, self.name, &self.log);
        }
    }
}

/// A dockerd of the run: its own data root, exec root and API socket.
struct Dockerd {
    daemon: Daemon,
    docker: PathBuf,
    host: String,
    /// Its API socket (what `host` names).
    socket: PathBuf,
    data_root: PathBuf,
}

impl Dockerd {
    /// Starts dockerd with storage driver `driver`, waits until it answers.
    fn start(
        tools: &Tools,
        driver: &str,
        data_root: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Dockerd> {
        let exec_root = PathBuf::from(format!("/run/tl-bench-{}-{driver}", std::process::id()));
        let _ = fs::remove_dir_all(&exec_root);
        sys::mkdir(data_root)?;
        let host = dockerd_host(&exec_root);
        let socket = dockerd_socket(&exec_root);
        let cmd = dockerd_command(&tools.dockerd, driver, data_root, &exec_root, extra);
        let version = || cli(Command::new(&tools.docker).args(["-H", &host, "version"])).is_ok();
        let daemon = Daemon::start(
            "dockerd",
            "docker",
            cmd,
            dir.join("dockerd.log"),
            exec_root,
            version,
        )?;
        Ok(Dockerd {
            socket,
            daemon,
            docker: tools.docker.clone(),
            host,
            data_root: data_root.to_owned(),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.docker);
        c.args(["-H", &self.host]).args(args);
        c
    }

    /// `docker ARGS`; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = cli(&mut self.cmd(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `docker ARGS`, timed from spawn to exit: milliseconds.
    fn timed(&self, args: &[&str]) -> Result<f64> {
        let mut c = self.cmd(args);
        let t = Instant::now();
        cli(&mut c)?;
        Ok(ms_since(t))
    }

    /// Times one request of Docker's API (`method`, `path` under the API
    /// version, a JSON `body`) sent to dockerd's socket with no CLI: what
    /// dockerd and its storage driver take, without the docker CLI's own
    /// start, which is most of a short command's time and in the guest its
    /// most variable part.
    fn api_timed(&self, method: &str, path: &str, body: Option<&Value>) -> Result<f64> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} /v1.41{path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let what = || format!("{method} {path} on {}", self.socket.display());
        let t = Instant::now();
        let mut stream = UnixStream::connect(&self.socket).ctx(what)?;
        stream.set_read_timeout(Some(LIMIT)).ctx(what)?;
        stream.write_all(request.as_bytes()).ctx(what)?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).ctx(what)?;
        let ms = ms_since(t);
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split_whitespace().nth(1).unwrap_or("none");
        if !status.starts_with('2') {
            return Err(Error::Tool {
                command: what(),
                detail: format!(
                    "dockerd answered {status}: {}",
                    answer.lines().last().unwrap_or("")
                ),
            });
        }
        Ok(ms)
    }
}

/// `thinlayer serve docker` (or `serve containerd`) on a fresh pool.
pub(crate) struct Plugin {
    child: Option<Child>,
    exe: PathBuf,
    root: PathBuf,
    /// Its stderr.
    pub(crate) log: PathBuf,
}

impl Plugin {
    /// Creates a pool at `root` and starts `thinlayer serve KIND` on it,
    /// listening on `socket`; its log goes to `dir`.
    pub(crate) fn start(
        exe: &Path,
        root: &Path,
        dir: &Path,
        kind: &str,
        socket: &Path,
    ) -> Result<Plugin> {
        cli(Command::new(exe)
            .arg("--root")
            .arg(root)
            .args(["pool", "create"]))?;
        let log = dir.join("plugin.log");
        let mut pl = Plugin {
            child: None,
            exe: exe.to_owned(),
            root: root.to_owned(),
            log,
        };
        let out = fs::File::create(&pl.log).ctx(|| format!("create {}", pl.log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("--root")
            .arg(root)
            .args(["serve", kind, "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out);
        match cmd.spawn() {
            Ok(c) => pl.child = Some(c),
            Err(e) => return Err(pl.failed(&cmd, e.to_string())),
        }
        let deadline = Instant::now() + LIMIT;
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            let exited = pl
                .child
                .as_mut()
                .expect("just started")
                .try_wait()
                .ctx(|| "wait for thinlayer serve docker".into())?;
            if exited.is_some() || Instant::now() > deadline {
                pl.child = pl.child.take().filter(|_| exited.is_none());
                let detail = format!(
                    "not listening on {} ({}); its log:\n{}",
                    socket.display(),
                    exited.map_or("still starting".into(), |s| s.to_string()),
                    tail(&pl.log, 20)
                );
                return Err(pl.failed(&cmd, detail));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pl)
    }

    /// Takes a plugin that did not start down: the error of `cmd`, and
    /// of the teardown if that failed too.
    fn failed(&mut self, cmd: &Command, detail: String) -> Error {
        let down = self.stop_and_destroy().err();
        Error::Tool {
            command: describe(cmd),
            detail: match down {
                Some(e) => format!("{detail}\nand taking its pool down failed: {e}"),
                None => detail,
            },
        }
    }

    /// Stops the plugin (after its daemon) and destroys its pool.
    pub(crate) fn stop_and_destroy(&mut self) -> Result<()> {
        let stopped = match self.child.take() {
            Some(mut c) => terminate(&mut c, "thinlayer serve docker", &self.log),
            None => Ok(()),
        };
        let destroy = || {
            cli(Command::new(&self.exe)
                .arg("--root")
                .arg(&self.root)
                .args(["--wait", "pool", "destroy", "--force"]))
        };
        let destroyed = destroy().or_else(|_| {
            let _ = cli(Command::new(&self.exe)
                .arg("--root")
                .arg(&self.root)
                .args(["--wait", "pool", "activate"]));
            destroy()
        });
        stopped.and(destroyed.map(|_| ()))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_and_destroy();
        }
    }
}

/// An ext4 on a loop device over a sparse file: a host's root filesystem.
pub(crate) struct Ext4 {
    img: PathBuf,
    /// Where it is mounted.
    pub(crate) fs: PathBuf,
}

impl Ext4 {
    /// Makes and mounts it under `dir`.
    pub(crate) fn new(dir: &Path) -> Result<Ext4> {
        let img = dir.join("disk.img");
        sys::sparse_file(&img, DISK)?;
        // Inode tables and journal left unzeroed (and not zeroed later:
        // noinit_itable), so that no background writes run under the figures.
        sys::tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-i",
                "65536",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                &img.to_string_lossy(),
            ],
        )?;
        let lp = thinlayer_pool::loopback::attach(&img)?;
        let fs = sys::mkdir(&dir.join("fs"))?;
        let mounted = sys::mount(&lp.path, &fs, "ext4", "noinit_itable");
        // The mount holds the loop device now; autoclear detaches it at umount.
        drop(lp);
        if let Err(e) = mounted {
            let _ = fs::remove_file(&img);
            return Err(e);
        }
        Ok(Ext4 { img, fs })
    }

    /// Unmounts it (the loop device detaches itself) and removes its file.
    pub(crate) fn teardown(&self) -> Result<()> {
        let r = sys::umount(&self.fs);
        let _ = fs::remove_file(&self.img);
        r
    }
}

/// Unmounts what is still mounted under `fs` (a driver's mounts its
/// daemon left), deepest first.
pub(crate) fn sweep_mounts(fs_dir: &Path) -> Result<()> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo".into())?;
    let mut under: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(fs_dir) && p != fs_dir)
        .collect();
    under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut r = Ok(());
    for p in under {
        let u = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
            .map_err(std::io::Error::from)
            .ctx(|| format!("unmount {} (left by the daemon)", p.display()));
        r = r.and(u);
    }
    r
}

/// Removes the dm devices dockerd's devicemapper driver left (named
/// `docker-MAJ:MIN-INO-*` for its home `home`), the pool last.
fn sweep_dm(home: &Path) -> Result<()> {
    let Ok(st) = fs::metadata(home) else {
        return Ok(());
    };
    let dev = st.dev();
    let prefix = format!(
        "docker-{}:{}-{}-",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        st.ino()
    );
    sweep_dm_prefix(&prefix, "dockerd's devicemapper")
}

/// Removes the dm devices whose names start with `prefix` (left by
/// `whose` driver), a pool (`-pool`) last.
pub(crate) fn sweep_dm_prefix(prefix: &str, whose: &str) -> Result<()> {
    let dm = DM::new().dm(|| "open /dev/mapper/control".into())?;
    let mut left: Vec<String> = dm
        .list_devices()
        .dm(|| "list dm devices".into())?
        .into_iter()
        .map(|(n, _, _)| n.to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    left.sort_by_key(|n| n.ends_with("-pool"));
    let mut r = Ok(());
    for name in left {
        let rm = DmName::new(&name)
            .and_then(|n| dm.device_remove(&DevId::Name(n), DmOptions::default()))
            .dm(|| format!("remove {name} (left by {whose})"));
        r = r.and(rm.map(|_| ()));
    }
    r
}

/// Detaches loop devices over files under `fs_dir` (devicemapper's
/// loop-lvm files, if dockerd left them attached).
pub(crate) fn sweep_loops(fs_dir: &Path) -> Result<()> {
    let mut r = Ok(());
    for e in fs::read_dir("/sys/block")
        .ctx(|| "list /sys/block".into())?
        .flatten()
    {
        let Ok(f) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(f.trim()).starts_with(fs_dir) {
            let node = Path::new("/dev").join(e.file_name());
            let d = loopdev::LoopDevice::open(&node)
                .and_then(|l| l.detach())
                .ctx(|| format!("detach {} (over {})", node.display(), f.trim()));
            r = r.and(d);
        }
    }
    r
}

// ---------------------------------------------------------------------------
// The table and the plots.

/// Rows of the table: label, metric, bytes (else ms).
const ROWS: [(&str, &str, bool); 20] = [
    ("docker run --rm IMG true ms", "run-rm-ms", false),
    ("docker create ms", "create-ms", false),
    ("docker start ms", "start-ms", false),
    ("create + start ms", "create-start-ms", false),
    ("docker commit ms", "commit-ms", false),
    ("docker rm ms", "rm-ms", false),
    ("create, API alone ms", "create-api-ms", false),
    ("rm, API alone ms", "rm-api-ms", false),
    ("docker load (2 layers) ms", "load-ms", false),
    ("docker load: allocated", "load-alloc-bytes", true),
    ("load of a 256M layer ms", "load-256M-ms", false),
    ("load of a 256M layer: alloc", "load-256M-alloc-bytes", true),
    ("commit of a 256M change ms", "commit-256M-ms", false),
    ("1st 4K write, 256M file ms", "first-write-ms", false),
    ("1st 4K write: allocated", "first-write-alloc-bytes", true),
    (
        "1st 4K write: pool blocks",
        "first-write-alloc-blocks",
        false,
    ),
    ("1st 4K write: host bytes", "first-write-host-bytes", true),
    ("space per trivial ctr", "trivial-alloc-bytes", true),
    ("host bytes per trivial ctr", "trivial-host-bytes", true),
    ("returned on rm (all)", "trivial-returned-bytes", true),
];

fn median(r: &Report, driver: &str, metric: &str) -> Option<f64> {
    r.stat(driver, WORKLOAD, 0, metric).map(|s| s.median)
}

fn bytes(v: f64) -> String {
    let a = v.abs();
    const K: f64 = 1024.0;
    if a >= K * K * K {
        format!("{:.2}G", v / (K * K * K))
    } else if a >= K * K {
        format!("{:.1}M", v / (K * K))
    } else if a >= K {
        format!("{:.0}K", v / K)
    } else {
        format!("{v:.0}")
    }
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn show_ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

/// The drivers with samples in `r`, in [`DRIVERS`] order.
fn measured(r: &Report) -> Vec<&'static str> {
    DRIVERS
        .into_iter()
        .filter(|d| {
            r.samples
                .iter()
                .any(|s| s.workload == WORKLOAD && s.backend == *d)
        })
        .collect()
}

/// The docker section of the terminal table (nothing without samples):
/// medians per driver, thinlayer against overlay2 and devicemapper (and
/// devicemapper against overlay2), then issue 13's targets, met or not.
pub(crate) fn table(r: &Report, t: &mut String) {
    let drivers = measured(r);
    if drivers.is_empty() {
        return;
    }
    let n = r.params.docker_samples;
    let _ = write!(
        t,
        "\ndocker, one dockerd per driver (median of {n}):\n  {:<28}",
        "figure"
    );
    for d in DRIVERS {
        let _ = write!(t, "{d:>13}");
    }
    let _ = writeln!(t, "{:>9}{:>9}{:>9}", "tl/ovl2", "tl/dm", "dm/ovl2");
    for (label, metric, is_bytes) in ROWS {
        let _ = write!(t, "  {label:<28}");
        for d in DRIVERS {
            let v = median(r, d, metric);
            let s = match v {
                None => "-".into(),
                Some(v) if is_bytes => bytes(v),
                Some(v) if metric.ends_with("blocks") => format!("{v:.1}"),
                Some(v) => format!("{v:.0}"),
            };
            let _ = write!(t, "{s:>13}");
        }
        let (tl, ovl, dm) = (
            median(r, "thinlayer", metric),
            median(r, "overlay2", metric),
            median(r, "devicemapper", metric),
        );
        let _ = writeln!(
            t,
            "{:>9}{:>9}{:>9}",
            show_ratio(ratio(tl, ovl)),
            show_ratio(ratio(tl, dm)),
            show_ratio(ratio(dm, ovl))
        );
    }
    let _ = writeln!(
        t,
        "  targets (issue 13; ratios of this run, never asserted):"
    );
    for (what, x, limit, unit) in targets(r) {
        let (got, verdict) = match x {
            Some(x) if x <= limit => (format!("{x:.2}{unit}"), "met"),
            Some(x) => (format!("{x:.2}{unit}"), "NOT met"),
            None => ("-".into(), "not measured"),
        };
        let _ = writeln!(t, "    {what:<44} {got:>8}  {verdict}");
    }
    let _ = writeln!(
        t,
        "  without the CLI's start (API requests alone, not the targets): create {}, rm {} of overlay2",
        show_ratio(tl_over(r, "overlay2", "create-api-ms")),
        show_ratio(tl_over(r, "overlay2", "rm-api-ms"))
    );
}

/// thinlayer's median of `metric` over driver `to`'s.
fn tl_over(r: &Report, to: &str, metric: &str) -> Option<f64> {
    ratio(median(r, "thinlayer", metric), median(r, to, metric))
}

/// Issue 13's targets: what, the figure, its limit, its unit.
fn targets(r: &Report) -> Vec<(&'static str, Option<f64>, f64, &'static str)> {
    let tl_over = |to: &str, metric: &str| tl_over(r, to, metric);
    vec![
        (
            "docker create <= 1.1x overlay2",
            tl_over("overlay2", "create-ms"),
            1.1,
            "x",
        ),
        (
            "docker rm <= 1.1x overlay2",
            tl_over("overlay2", "rm-ms"),
            1.1,
            "x",
        ),
        (
            "docker run --rm <= 1.05x overlay2",
            tl_over("overlay2", "run-rm-ms"),
            1.05,
            "x",
        ),
        (
            "docker commit <= 0.5x devicemapper",
            tl_over("devicemapper", "commit-ms"),
            0.5,
            "x",
        ),
        (
            "first 4 KiB write <= 3 pool blocks",
            median(r, "thinlayer", "first-write-alloc-blocks"),
            3.0,
            " blk",
        ),
    ]
}

/// Each driver's colour: thinlayer's as in the other plots.
fn colour(d: &str) -> RGBColor {
    match d {
        "thinlayer" => RGBColor(0xd6, 0x27, 0x28),
        "overlay2" => RGBColor(0x1f, 0x77, 0xb4),
        "vfs" => RGBColor(0x94, 0x67, 0xbd),
        "devicemapper" => RGBColor(0x55, 0x55, 0x55),
        _ => RGBColor(0xff, 0x7f, 0x0e),
    }
}

/// `c` mixed half with white: a driver's second figure.
fn pale(c: RGBColor) -> RGBColor {
    let m = |v: u8| v / 2 + 128;
    RGBColor(m(c.0), m(c.1), m(c.2))
}

pub(crate) type Draw = std::result::Result<(), String>;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Draws the docker plots into `out` (none without docker samples). The
/// font is registered by the caller (`plot::all`).
///
/// # Errors
/// [`Error::Plot`].
pub(crate) fn plots(r: &Report, out: &Path) -> Result<()> {
    let drivers = measured(r);
    if drivers.is_empty() {
        return Ok(());
    }
    let err = |f: &Path| {
        let file = f.display().to_string();
        move |detail| Error::Plot { file, detail }
    };
    let f = out.join("docker-ops-ms.png");
    ops_ms(r, &drivers, &f).map_err(err(&f))?;
    let f = out.join("docker-ops-vs-overlay2.png");
    ops_ratio(r, &drivers, &f).map_err(err(&f))?;
    let f = out.join("docker-first-write-bytes.png");
    per_driver(
        r,
        &drivers,
        &f,
        "first 4 KiB write into a 256 MiB image file: bytes the driver allocated",
        &[("allocated by the driver", "first-write-alloc-bytes")],
        Some((192.0 * 1024.0, "target: 3 pool blocks")),
    )
    .map_err(err(&f))?;
    let f = out.join("docker-space-per-container.png");
    per_driver(
        r,
        &drivers,
        &f,
        "space per trivial container (ran `true`, not removed)",
        &[
            ("driver's accounting", "trivial-alloc-bytes"),
            ("host filesystem", "trivial-host-bytes"),
        ],
        None,
    )
    .map_err(err(&f))?;
    Ok(())
}

/// The operations of the latency plots: label and metric.
const OPS: [(&str, &str); 6] = [
    ("run --rm", "run-rm-ms"),
    ("create", "create-ms"),
    ("start", "start-ms"),
    ("commit", "commit-ms"),
    ("rm", "rm-ms"),
    ("load", "load-ms"),
];

const W: u32 = 900;
const H: u32 = 500;
/// Width of the legend panel right of the chart.
const LEGEND: u32 = 190;

/// The legend, in its own panel (never over the data): a swatch and a
/// name per entry.
fn legend_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, RGBColor)],
) -> Draw {
    let font = ("sans-serif", 15).into_font();
    for (i, (name, c)) in entries.iter().enumerate() {
        let y = 60 + 26 * i32::try_from(i).expect("a few entries");
        area.draw(&Rectangle::new([(10, y), (26, y + 14)], c.filled()))
            .map_err(s)?;
        area.draw(&Text::new(name.clone(), (34, y), font.clone()))
            .map_err(s)?;
    }
    Ok(())
}

/// Category names under the x axis, centred on `0, 1, ...`.
fn category_labels<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    chart: &ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    root: &DrawingArea<DB, plotters::coord::Shift>,
    names: &[&str],
    y: f64,
) -> Draw {
    let style =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, n) in names.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, y));
        root.draw(&Text::new((*n).to_owned(), (px, py + 6), style.clone()))
            .map_err(s)?;
    }
    Ok(())
}

/// Grouped bars: per operation, one bar per series (`vals(op, series)`).
#[allow(clippy::too_many_arguments)] // one drawing, its parts named
pub(crate) fn grouped(
    file: &Path,
    caption: &str,
    y_desc: &str,
    ops: &[(&str, &str)],
    series: &[(String, RGBColor)],
    vals: &dyn Fn(&str, usize) -> Option<f64>,
    ymax: f64,
    line: Option<(f64, &str)>,
) -> Draw {
    let root = BitMapBackend::new(file, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    let (left, right) = root.split_horizontally(W - LEGEND);
    let n = ops.len();
    let mut chart = ChartBuilder::on(&left)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..ymax)
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .y_label_formatter(&|v| {
            if ymax >= 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .draw()
        .map_err(s)?;
    let k = series.len().max(1) as f64;
    let width = 0.8 / k;
    for (i, (_, metric)) in ops.iter().enumerate() {
        for (j, (_, c)) in series.iter().enumerate() {
            if let Some(v) = vals(metric, j) {
                let x0 = i as f64 - 0.4 + j as f64 * width;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, 0.0), (x0 + width * 0.9, v.min(ymax))],
                        c.filled(),
                    )))
                    .map_err(s)?;
            }
        }
    }
    let mut entries = series.to_vec();
    if let Some((y, label)) = line {
        chart
            .draw_series(DashedLineSeries::new(
                [(-0.5, y), (n as f64 - 0.5, y)],
                6,
                4,
                BLACK.stroke_width(2),
            ))
            .map_err(s)?;
        entries.push((label.to_owned(), BLACK));
    }
    let names: Vec<&str> = ops.iter().map(|o| o.0).collect();
    category_labels(&chart, &left, &names, 0.0)?;
    legend_panel(&right, &entries)?;
    root.present().map_err(s)
}

fn ops_ms(r: &Report, drivers: &[&str], file: &Path) -> Draw {
    let series: Vec<(String, RGBColor)> = drivers
        .iter()
        .map(|d| ((*d).to_owned(), colour(d)))
        .collect();
    let mut ymax: f64 = 1.0;
    for (_, m) in OPS {
        for d in drivers {
            ymax = ymax.max(median(r, d, m).unwrap_or(0.0));
        }
    }
    grouped(
        file,
        "docker operations: median time per storage driver",
        "median ms (docker CLI call, spawn to exit)",
        &OPS,
        &series,
        &|m, j| median(r, drivers[j], m),
        ymax * 1.1,
        None,
    )
}

fn ops_ratio(r: &Report, drivers: &[&str], file: &Path) -> Draw {
    let others: Vec<&str> = drivers
        .iter()
        .copied()
        .filter(|d| *d != "overlay2")
        .collect();
    let series: Vec<(String, RGBColor)> = others
        .iter()
        .map(|d| ((*d).to_owned(), colour(d)))
        .collect();
    let val = |m: &str, j: usize| ratio(median(r, others[j], m), median(r, "overlay2", m));
    let mut ymax: f64 = 1.5;
    for (_, m) in OPS {
        for j in 0..others.len() {
            ymax = ymax.max(val(m, j).unwrap_or(0.0));
        }
    }
    grouped(
        file,
        "docker operations relative to overlay2 (median / overlay2's median)",
        "x overlay2",
        &OPS,
        &series,
        &val,
        ymax * 1.1,
        Some((1.0, "overlay2 = 1")),
    )
}

/// Bars per driver (x), one per figure of `metrics`, log y in KiB, the
/// value written above each bar.
fn per_driver(
    r: &Report,
    drivers: &[&str],
    file: &Path,
    caption: &str,
    metrics: &[(&str, &str)],
    line: Option<(f64, &str)>,
) -> Draw {
    let kib = |v: f64| (v / 1024.0).max(1.0);
    let mut ymax: f64 = 16.0;
    for d in drivers {
        for (_, m) in metrics {
            ymax = ymax.max(kib(median(r, d, m).unwrap_or(0.0)));
        }
    }
    let root = BitMapBackend::new(file, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(s)?;
    let (left, right) = root.split_horizontally(W - LEGEND);
    let n = drivers.len();
    let mut chart = ChartBuilder::on(&left)
        .caption(caption, ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        // Room above the tallest bar for its label.
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (0.5f64..ymax * 8.0).log_scale())
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("KiB (median; log scale, floor 1 KiB)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(s)?;
    let k = metrics.len() as f64;
    let width = 0.7 / k;
    let label_style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, d) in drivers.iter().enumerate() {
        for (j, (_, m)) in metrics.iter().enumerate() {
            let Some(v) = median(r, d, m) else { continue };
            let c = if j == 0 { colour(d) } else { pale(colour(d)) };
            let x0 = i as f64 - 0.35 + j as f64 * width;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.5), (x0 + width * 0.9, kib(v))],
                    c.filled(),
                )))
                .map_err(s)?;
            let (px, py) = chart.backend_coord(&(x0 + width * 0.45, kib(v)));
            left.draw(&Text::new(bytes(v), (px, py - 3), label_style.clone()))
                .map_err(s)?;
        }
    }
    category_labels(&chart, &left, drivers, 0.5)?;
    let mut entries: Vec<(String, RGBColor)> = Vec::new();
    if metrics.len() > 1 {
        let grey = RGBColor(0x55, 0x55, 0x55);
        for (j, (label, _)) in metrics.iter().enumerate() {
            let c = if j == 0 { grey } else { pale(grey) };
            entries.push(((*label).to_owned(), c));
        }
    }
    if let Some((at, label)) = line {
        chart
            .draw_series(DashedLineSeries::new(
                [(-0.5, kib(at)), (n as f64 - 0.5, kib(at))],
                6,
                4,
                BLACK.stroke_width(2),
            ))
            .map_err(s)?;
        entries.push((label.to_owned(), BLACK));
    }
    legend_panel(&right, &entries)?;
    if metrics.len() > 1 {
        right
            .draw(&Text::new(
                "(bar colour: driver)",
                (10, 60 + 26 * i32::try_from(entries.len()).expect("a few")),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(s)?;
    }
    root.present().map_err(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(samples: &[(&str, &str, f64)]) -> Report {
        let mut r = Report {
            quick: true,
            params: Params::new(true),
            backends: Vec::new(),
            disk: None,
            kernel: String::new(),
            samples: samples
                .iter()
                .map(|(b, m, v)| Sample {
                    backend: (*b).into(),
                    workload: WORKLOAD.into(),
                    param: 0,
                    metric: (*m).into(),
                    value: *v,
                })
                .collect(),
            stats: Vec::new(),
            notes: Vec::new(),
            phases: Vec::new(),
            wall_seconds: 0.0,
        };
        r.compute_stats();
        r
    }

    /// One sample of every kind the table and the plots read, but a
    /// thinlayer commit (so that target is "not measured").
    fn sample() -> Report {
        report(&[
            ("overlay2", "create-ms", 100.0),
            ("overlay2", "create-ms", 300.0),
            ("thinlayer", "create-ms", 220.0),
            ("devicemapper", "create-ms", 400.0),
            ("overlay2", "rm-ms", 100.0),
            ("thinlayer", "rm-ms", 105.0),
            ("thinlayer", "first-write-alloc-blocks", 3.0),
            ("overlay2", "run-rm-ms", 5000.0),
            ("thinlayer", "run-rm-ms", 5200.0),
            ("devicemapper", "commit-ms", 900.0),
            ("thinlayer", "first-write-alloc-bytes", 196_608.0),
            ("overlay2", "first-write-alloc-bytes", 268_435_456.0),
            ("thinlayer", "trivial-alloc-bytes", 458_752.0),
            ("thinlayer", "trivial-host-bytes", 600_000.0),
        ])
    }

    #[test]
    fn table_shows_ratios_and_targets_met_or_not() {
        let r = sample();
        let mut t = String::new();
        table(&r, &mut t);
        let create = t.lines().find(|l| l.contains("docker create ms")).unwrap();
        // overlay2's median is 200: thinlayer 1.10x, thinlayer/dm 0.55x, dm 2.00x.
        assert!(create.ends_with("1.10x    0.55x    2.00x"), "{create}");
        let line = |what: &str| t.lines().find(|l| l.contains(what)).unwrap().to_owned();
        assert!(line("create <= 1.1x").ends_with("  met"), "{t}");
        assert!(line("rm <= 1.1x").ends_with("  met"), "{t}");
        assert!(line("commit <= 0.5x").ends_with("not measured"), "{t}");
        assert!(line("<= 3 pool blocks").ends_with("  met"), "{t}");
        assert!(line("run --rm <= 1.05x").ends_with("  met"), "{t}");
        let r = report(&[
            ("overlay2", "run-rm-ms", 100.0),
            ("thinlayer", "run-rm-ms", 106.0),
        ]);
        let mut t = String::new();
        table(&r, &mut t);
        assert!(
            t.lines()
                .find(|l| l.contains("run --rm <= 1.05x"))
                .unwrap()
                .ends_with("NOT met"),
            "{t}"
        );
    }

    #[test]
    fn no_docker_samples_no_section() {
        let mut t = String::new();
        table(&report(&[]), &mut t);
        assert!(t.is_empty());
    }

    #[test]
    fn each_driver_runs_once_per_sample_in_each_place_and_after_each_other() {
        let k = DRIVERS.len();
        let orders: Vec<Vec<usize>> = (0..k).map(|i| sample_order(k, i).collect()).collect();
        for order in &orders {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..k).collect::<Vec<_>>(), "{order:?}");
        }
        for place in 0..k {
            let mut at: Vec<usize> = orders.iter().map(|o| o[place]).collect();
            at.sort_unstable();
            assert_eq!(at, (0..k).collect::<Vec<_>>(), "place {place}: {orders:?}");
        }
        let mut follows = HashSet::new();
        for order in &orders {
            for w in order.windows(2) {
                assert!(follows.insert((w[0], w[1])), "{w:?} twice: {orders:?}");
            }
        }
        assert_eq!(
            follows.len(),
            k * (k - 1),
            "every driver after every other: {orders:?}"
        );
        assert_eq!(orders[0], [0, 1, 3, 2]);
    }

    #[test]
    fn du_x_counts_files_and_stays_on_its_filesystem() {
        let dir = std::env::temp_dir().join(format!("tl-du-x-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a/b")).unwrap();
        let empty = du_x(&dir).unwrap();
        fs::write(dir.join("a/b/f"), vec![1u8; 64 << 10]).unwrap();
        let f = fs::File::open(dir.join("a/b/f")).unwrap();
        f.sync_all().unwrap();
        let full = du_x(&dir).unwrap();
        fs::hard_link(dir.join("a/b/f"), dir.join("a/g")).unwrap();
        let linked = du_x(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(full >= empty + (64 << 10), "{empty} -> {full}");
        assert_eq!(linked, full, "a second name of a file is not counted twice");
        assert_eq!(du_x(Path::new("/proc/self/fdinfo")).unwrap(), 0);
    }

    #[test]
    fn plots_are_drawn_for_docker_samples() {
        let r = sample();
        let out = std::env::temp_dir().join(format!("tl-docker-plots-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        crate::plot::all(&r, &out).unwrap();
        for f in [
            "docker-ops-ms.png",
            "docker-ops-vs-overlay2.png",
            "docker-first-write-bytes.png",
            "docker-space-per-container.png",
        ] {
            let len = fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{f}: {len} bytes");
        }
        fs::remove_dir_all(&out).unwrap();
    }
}
