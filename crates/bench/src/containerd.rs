//! `thinlayer bench --containerd`: one containerd with its built-in
//! `overlayfs`, `native` and `devmapper` snapshotters and thinlayer as a
//! proxy plugin (`thinlayer serve containerd` on a fresh pool), all four
//! driven by one client through containerd's own Snapshots service, the
//! snapshotter picked by each request's `snapshotter` field.
//!
//! Setup: a fresh ext4 (sparse file, loop; `docker::Ext4`) holds
//! containerd's root and state, thinlayer's pool root and the devmapper
//! snapshotter's files. The devmapper pool is made as containerd's
//! devmapper docs describe, through the `devicemapper` and `loopdev-3`
//! crates (no dmsetup command line of ours): sparse data and metadata
//! files on loop devices, a `thin-pool` target over them, its node made
//! in `/dev/mapper` (no udev in the guest; containerd's devmapper names
//! the pool by that path in its thin tables). containerd runs with a
//! config the bench writes (its own root, state and socket, the CRI plugin
//! off) and garbage collection held back (a tiny `pause_threshold`, no
//! deletion or mutation threshold) so that it runs only when asked.
//!
//! The cycle, per container, each step timed: `Prepare` on a committed
//! parent (made once per snapshotter: Prepare, mount, a small tree of
//! files, umount, Commit), `Mounts`, mount(2) of what it returned,
//! umount(2), `Commit` of that stopped active snapshot (as containerd
//! commits), `Remove` of the committed one. The start path is Prepare +
//! Mounts + mount(2). Through containerd, `Remove` only deletes
//! containerd's record: the snapshotter's own Remove and Cleanup run in
//! containerd's garbage collection, which the bench runs synchronously
//! once after each population (a lease deleted with `sync`) and times on
//! its own, reported per container. Populations: that many prepared
//! (unmounted) snapshots of the parent exist while the cycles run.
//!
//! Then `ctr run --rm --snapshotter S IMAGE ID true` end to end (the
//! image `ctr images import`ed per snapshotter first, one untimed run).
//!
//! What must never happen: a containerd, plugin, mount, dm device or loop
//! device of the run left behind (teardown runs on error too).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use containerd_snapshots::{
    api::{
        snapshots::v1::{
            CleanupRequest, CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest,
            RemoveSnapshotRequest, snapshots_client::SnapshotsClient,
        },
        types::Mount,
    },
    tonic::{
        self, Request,
        codec::ProstCodec,
        codegen::http::uri::PathAndQuery,
        metadata::MetadataValue,
        transport::{Channel, Endpoint, Uri},
    },
};
use devicemapper::{DmName, DmUuid, Sectors};
use nix::mount::MsFlags;
use plotters::prelude::*;
use thinlayer_pool::kernel::{Kernel, PoolSpec, devnode};

use crate::{
    Options, Params,
    docker::{
        self, Daemon, Ext4, Plugin, cli, ratio, show_ratio, sweep_dm_prefix, sweep_loops,
        sweep_mounts, tail, which,
    },
    error::{Error, IoContext, Result},
    plot,
    report::{Report, Sample},
    sys::{self, ms_since},
};

/// The workload name of every containerd sample (its backend is the
/// snapshotter).
pub(crate) const WORKLOAD: &str = "containerd";

/// The snapshotters, in the order they run and are shown.
pub(crate) const SNAPSHOTTERS: [&str; 4] = ["overlayfs", "native", "devmapper", "thinlayer"];

/// The image of `ctr run` (`tests/fixtures/make-images`; busybox, 2 layers).
const FIXTURE: &str = "other-docker.tar";

/// containerd's namespace for everything the bench makes.
const NAMESPACE: &str = "tl-bench";

/// The devmapper snapshotter's pool, and the prefix of its thin devices.
const DM_POOL: &str = "tlbench-ctrd-pool";
const DM_DATA: u64 = 16 << 30;
const DM_META: u64 = 1 << 30;
/// 64 KiB blocks, as thinlayer's pools.
const DM_BLOCK_SECTORS: u64 = 128;

/// A containerd start, an RPC, a ctr call: failed past this.
const LIMIT: Duration = Duration::from_secs(600);

/// The programs the workload runs.
struct Tools {
    containerd: PathBuf,
    ctr: PathBuf,
    /// This thinlayer binary, for the proxy plugin and its pool.
    exe: PathBuf,
    fixture: PathBuf,
}

/// Checks, before anything runs, that containerd, ctr, runc, dmsetup, the
/// dm thin-pool target and the fixture are there.
///
/// # Errors
/// [`Error::Tool`] saying what to install or build; the engine's error
/// for a kernel without dm-thin.
pub(crate) fn preflight(opts: &Options) -> Result<()> {
    tools(opts).map(|_| ())
}

fn tools(opts: &Options) -> Result<Tools> {
    let missing = |what: &str, detail: &str| Error::Tool {
        command: format!("thinlayer bench --containerd: {what}"),
        detail: detail.to_owned(),
    };
    let need = |name: &str| {
        which(name).ok_or_else(|| {
            missing(
                name,
                "not found in PATH: install containerd and runc (tools/setup does), or run in \
                 the VM with THINLAYER_VM_EXTRAS=docker tools/vm/run",
            )
        })
    };
    let containerd = need("containerd")?;
    let ctr = need("ctr")?;
    need("runc")?;
    need("containerd-shim-runc-v2")?;
    // containerd's devmapper snapshotter runs dmsetup and mkfs.ext4.
    if which("dmsetup").is_none() || which("mkfs.ext4").is_none() {
        return Err(missing(
            "dmsetup, mkfs.ext4",
            "containerd's devmapper snapshotter runs both: install dmsetup and e2fsprogs",
        ));
    }
    // The devmapper snapshotter and thinlayer need the kernel's thin-pool.
    Kernel::open().map_err(|e| {
        missing(
            "the device-mapper thin-pool target",
            &format!("{e} (the containerd workload runs in the VM: tools/vm/run)"),
        )
    })?;
    let fixture = docker::fixture(opts, FIXTURE, "--containerd")?;
    let exe = docker::thinlayer_exe("--containerd")?;
    Ok(Tools {
        containerd,
        ctr,
        exe,
        fixture,
    })
}

/// Runs the containerd workload, adds its samples, phases and notes to
/// `report` and recomputes the stats.
///
/// # Errors
/// Missing tools or fixture; the setup failing; every snapshotter
/// failing (one failing is a note).
pub(crate) fn run(report: &mut Report, opts: &Options, p: &Params) -> Result<()> {
    let tools = tools(opts)?;
    let started = Instant::now();
    let base = opts.work.join("containerd");
    let _ = fs::remove_dir_all(&base);
    sys::mkdir(&base)?;
    let disk = Ext4::new(&base)?;
    let mut m = Meas::default();
    let result = (|| {
        let pool = DmPool::new(&sys::mkdir(&disk.fs.join("devmapper"))?);
        let r = pool.as_ref().map_err(clone_err).and_then(|pool| {
            let mut plugin = Plugin::start(
                &tools.exe,
                &disk.fs.join("thinlayer"),
                &base,
                "containerd",
                &base.join("thinlayer.sock"),
            )?;
            let r = (|| {
                let mut c = Containerd::start(&tools, &disk.fs, &base, pool)?;
                let r = measure_all(&mut m, &c, &tools, p);
                let r = r.map_err(|e| c.daemon.with_log(e, Some(&plugin)));
                r.and(c.daemon.stop())
            })();
            r.and(plugin.stop_and_destroy())
        });
        let r = r.and(sweep_mounts(&disk.fs));
        let r = r.and(sweep_dm_prefix(
            &format!("{DM_POOL}-snap-"),
            "containerd's devmapper",
        ));
        match pool {
            Ok(pool) => r.and(pool.teardown()),
            Err(_) => r,
        }
    })();
    let result = result.and(sweep_loops(&disk.fs)).and(disk.teardown());
    sys::keep_logs(&base, &opts.out.join("logs/containerd"));
    let _ = fs::remove_dir_all(&base);
    report.samples.extend(m.samples);
    report.notes.extend(m.notes);
    if !m.no_cleanup.is_empty() {
        report.notes.push(format!(
            "containerd: the Snapshots service's Cleanup failed ({}); containerd 1.6 wraps \
             every snapshotter in its metadata store, which has no Cleanup: the deferred work \
             is timed as a synchronous garbage collection instead",
            m.no_cleanup.join("; ")
        ));
    }
    report.phases.extend(m.phases);
    report.notes.push(format!(
        "containerd: {version}, one containerd, its overlayfs, native and devmapper \
         snapshotters (devmapper: a thin-pool of 64 KiB blocks on loop files, made by the \
         bench) and thinlayer as a proxy plugin, each driven through containerd's Snapshots \
         service by one client; root and pools on a fresh ext4 (sparse file, loop). Cycle per \
         container: Prepare on a committed parent, Mounts, mount(2), umount(2), Commit, Remove; \
         start path = Prepare + Mounts + mount(2); medians of {n} per population (that many \
         prepared snapshots of the parent live). Remove through containerd deletes its record \
         only: the snapshotter's Remove and Cleanup run in containerd's garbage collection, \
         run synchronously once per population (a lease deleted with sync) and reported per \
         container as `gc`. ctr run --rm: medians of {k}, spawn to exit",
        version = m.version,
        n = p.containerd_samples,
        k = p.ctr_run_samples,
    ));
    report.compute_stats();
    report.wall_seconds += started.elapsed().as_secs_f64();
    result?;
    if m.failed == SNAPSHOTTERS.len() {
        return Err(Error::Tool {
            command: "thinlayer bench --containerd".into(),
            detail: "no snapshotter could be measured (see the notes)".into(),
        });
    }
    Ok(())
}

/// The error of a failed setup step, kept for the report and returned.
fn clone_err(e: &Error) -> Error {
    Error::Tool {
        command: "thinlayer bench --containerd: setup".into(),
        detail: e.to_string(),
    }
}

/// The figures as they come.
#[derive(Default)]
struct Meas {
    samples: Vec<Sample>,
    notes: Vec<String>,
    phases: Vec<(String, f64)>,
    version: String,
    failed: usize,
    /// The snapshotters whose `Cleanup` call failed, and how.
    no_cleanup: Vec<String>,
}

impl Meas {
    fn add(&mut self, snapshotter: &str, param: u64, metric: &str, value: f64) {
        self.samples.push(Sample {
            backend: snapshotter.to_owned(),
            workload: WORKLOAD.to_owned(),
            param,
            metric: metric.to_owned(),
            value,
        });
    }
}

/// Every snapshotter in turn; one failing is a note.
fn measure_all(m: &mut Meas, c: &Containerd, tools: &Tools, p: &Params) -> Result<()> {
    m.version = c
        .ctr(&["version"])
        .ok()
        .and_then(|v| {
            v.lines()
                .filter(|l| l.trim_start().starts_with("Version:"))
                .nth(1)
                .map(|l| {
                    format!(
                        "containerd {}",
                        l.trim().trim_start_matches("Version:").trim()
                    )
                })
        })
        .unwrap_or_else(|| "containerd".into());
    let mut client = Client::connect(&c.address, c.dir.join("mnt"))?;
    for sn in SNAPSHOTTERS {
        let t = Instant::now();
        eprintln!("bench: containerd, snapshotter {sn}");
        let r = one_snapshotter(m, &mut client, c, tools, sn, p);
        m.phases
            .push((format!("containerd: {sn}"), t.elapsed().as_secs_f64()));
        if let Err(e) = r {
            let msg = format!(
                "containerd {sn}: not measured past this error: {e}\n--- containerd log (tail) ---\n{}",
                tail(&c.daemon.log, 15)
            );
            eprintln!("bench: {msg}");
            m.notes.push(msg);
            m.failed += 1;
        }
    }
    Ok(())
}

/// The parent every container of a snapshotter is prepared on.
const PARENT: &str = "tl-parent";

fn one_snapshotter(
    m: &mut Meas,
    cl: &mut Client,
    c: &Containerd,
    tools: &Tools,
    sn: &str,
    p: &Params,
) -> Result<()> {
    // The committed parent: a small tree of files.
    let mounts = cl.prepare(sn, "tl-parent-active", "")?;
    cl.mount(&mounts)?;
    let tree = (|| {
        for d in 0..4 {
            let dir = sys::mkdir(&cl.target.join(format!("d{d}")))?;
            for f in 0..8 {
                fs::write(dir.join(format!("f{f}")), sys::pattern(d * 8 + f, 4096))
                    .ctx(|| format!("write into {}", dir.display()))?;
            }
        }
        sys::syncfs(&cl.target)
    })();
    let umounted = sys::umount(&cl.target);
    tree.and(umounted)?;
    cl.commit(sn, PARENT, "tl-parent-active")?;
    match cl.cleanup(sn) {
        Ok(ms) => m.add(sn, 0, "cleanup-call-ms", ms),
        Err(e) => m.no_cleanup.push(format!("{sn}: {e}")),
    }

    let mut background = 0;
    for (round, &pop) in p.containerd_populations.iter().enumerate() {
        while background < pop {
            cl.prepare(sn, &format!("tl-bg-{background}"), PARENT)?;
            background += 1;
        }
        let param = pop as u64;
        for i in 0..p.containerd_samples {
            let key = format!("tl-c{round}-{i}");
            let t = Instant::now();
            cl.prepare(sn, &key, PARENT)?;
            let prepare = ms_since(t);
            let t = Instant::now();
            let mounts = cl.mounts(sn, &key)?;
            let mounts_ms = ms_since(t);
            let t = Instant::now();
            cl.mount(&mounts)?;
            let mount = ms_since(t);
            let wrote = sys::write_synced(&cl.target.join("tl-bench"), b"x\n");
            let t = Instant::now();
            let umounted = sys::umount(&cl.target);
            let umount = ms_since(t);
            wrote.and(umounted)?;
            let name = format!("{key}-committed");
            let t = Instant::now();
            cl.commit(sn, &name, &key)?;
            let commit = ms_since(t);
            let t = Instant::now();
            cl.remove(sn, &name)?;
            let remove = ms_since(t);
            for (metric, v) in [
                ("prepare-ms", prepare),
                ("mounts-ms", mounts_ms),
                ("mount-ms", mount),
                ("umount-ms", umount),
                ("start-ms", prepare + mounts_ms + mount),
                ("commit-ms", commit),
                ("remove-ms", remove),
            ] {
                m.add(sn, param, metric, v);
            }
        }
        let gc = cl.collect_garbage(&format!("tl-gc-{sn}-{round}"))?;
        m.add(sn, param, "gc-total-ms", gc);
        m.add(sn, param, "gc-ms", gc / p.containerd_samples.max(1) as f64);
    }
    for i in 0..background {
        cl.remove(sn, &format!("tl-bg-{i}"))?;
    }
    cl.remove(sn, PARENT)?;
    cl.collect_garbage(&format!("tl-gc-{sn}-end"))?;

    // ctr run --rm, end to end.
    let fixture = tools.fixture.to_string_lossy().into_owned();
    c.ctr(&["images", "import", "--snapshotter", sn, &fixture])?;
    let images = c.ctr(&["images", "ls", "-q"])?;
    let image = images
        .lines()
        .find(|l| l.contains("other"))
        .ok_or_else(|| {
            Error::Parse(format!(
                "no image of {FIXTURE} in `ctr images ls`: {images}"
            ))
        })?
        .to_owned();
    let run = |id: &str| c.ctr(&["run", "--rm", "--snapshotter", sn, &image, id, "true"]);
    run("tl-warm")?;
    for i in 0..p.ctr_run_samples {
        let t = Instant::now();
        run(&format!("tl-run-{i}"))?;
        m.add(sn, 0, "run-rm-ms", ms_since(t));
    }
    let gc = cl.collect_garbage(&format!("tl-gc-{sn}-run"))?;
    m.add(sn, 0, "run-rm-gc-ms", gc / (p.ctr_run_samples + 1) as f64);
    // The image's snapshots go too: the next snapshotter starts clean.
    c.ctr(&["images", "rm", &image])?;
    cl.collect_garbage(&format!("tl-gc-{sn}-image"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The client.

/// One connection to containerd: its Snapshots service (the crate's
/// client) and its Leases service (two calls, by hand), in namespace
/// [`NAMESPACE`], on a runtime of its own; and the directory where it
/// mounts what `Mounts` returns.
struct Client {
    rt: tokio::runtime::Runtime,
    snapshots: SnapshotsClient<Channel>,
    grpc: tonic::client::Grpc<Channel>,
    target: PathBuf,
}

/// The lease every snapshot the bench makes is held by: containerd's
/// garbage collection removes unreferenced snapshots (the population, the
/// parent) otherwise. A removed snapshot leaves it.
const HOLD: &str = "tl-bench-hold";

/// `containerd.services.leases.v1.CreateRequest` (its id alone).
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseCreate {
    #[prost(string, tag = "1")]
    id: String,
}

/// `containerd.services.leases.v1.DeleteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseDelete {
    #[prost(string, tag = "1")]
    id: String,
    /// Delete and collect garbage before answering.
    #[prost(bool, tag = "2")]
    sync: bool,
}

/// An answer whose contents the bench does not read.
#[derive(Clone, PartialEq, prost::Message)]
struct Ignored {}

fn rpc_err(what: String) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Tool {
        command: what,
        detail: format!("{:?}: {}", s.code(), s.message()),
    }
}

impl Client {
    fn connect(socket: &Path, target: PathBuf) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "start the gRPC client's runtime".into())?;
        let socket = socket.to_owned();
        let channel = rt
            .block_on(
                Endpoint::try_from("http://[::]:50051")
                    .expect("a static URI")
                    .timeout(LIMIT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        tokio::net::UnixStream::connect(socket.clone())
                    })),
            )
            .map_err(|e| Error::Tool {
                command: "connect to containerd".into(),
                detail: e.to_string(),
            })?;
        sys::mkdir(&target)?;
        let mut c = Client {
            rt,
            snapshots: SnapshotsClient::new(channel.clone()),
            grpc: tonic::client::Grpc::new(channel),
            target,
        };
        c.lease_call(
            "/containerd.services.leases.v1.Leases/Create",
            LeaseCreate { id: HOLD.into() },
        )?;
        Ok(c)
    }

    /// `msg` with the namespace header containerd requires.
    fn ns<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            MetadataValue::from_static(NAMESPACE),
        );
        r
    }

    /// `msg` in the namespace, held by the lease [`HOLD`].
    fn req<T>(msg: T) -> Request<T> {
        let mut r = Self::ns(msg);
        r.metadata_mut()
            .insert("containerd-lease", MetadataValue::from_static(HOLD));
        r
    }

    fn prepare(&mut self, sn: &str, key: &str, parent: &str) -> Result<Vec<Mount>> {
        let r = Self::req(PrepareSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        });
        let answer = self.rt.block_on(self.snapshots.prepare(r));
        let a = answer.map_err(rpc_err(format!("{sn}: Prepare {key} on {parent:?}")))?;
        Ok(a.into_inner().mounts)
    }

    fn mounts(&mut self, sn: &str, key: &str) -> Result<Vec<Mount>> {
        let r = Self::req(MountsRequest {
            snapshotter: sn.into(),
            key: key.into(),
        });
        let answer = self.rt.block_on(self.snapshots.mounts(r));
        let a = answer.map_err(rpc_err(format!("{sn}: Mounts {key}")))?;
        Ok(a.into_inner().mounts)
    }

    fn commit(&mut self, sn: &str, name: &str, key: &str) -> Result<()> {
        let r = Self::req(CommitSnapshotRequest {
            snapshotter: sn.into(),
            name: name.into(),
            key: key.into(),
            labels: Default::default(),
        });
        let answer = self.rt.block_on(self.snapshots.commit(r));
        answer.map_err(rpc_err(format!("{sn}: Commit {key} as {name}")))?;
        Ok(())
    }

    fn remove(&mut self, sn: &str, key: &str) -> Result<()> {
        let r = Self::req(RemoveSnapshotRequest {
            snapshotter: sn.into(),
            key: key.into(),
        });
        let answer = self.rt.block_on(self.snapshots.remove(r));
        answer.map_err(rpc_err(format!("{sn}: Remove {key}")))?;
        Ok(())
    }

    /// The Snapshots service's `Cleanup`: milliseconds.
    fn cleanup(&mut self, sn: &str) -> Result<f64> {
        let r = Self::req(CleanupRequest {
            snapshotter: sn.into(),
        });
        let t = Instant::now();
        let answer = self.rt.block_on(self.snapshots.cleanup(r));
        answer.map_err(rpc_err(format!("{sn}: Cleanup")))?;
        Ok(ms_since(t))
    }

    /// One of the Leases service's calls.
    fn lease_call<M: prost::Message + Send + Sync + 'static>(
        &mut self,
        method: &'static str,
        msg: M,
    ) -> Result<()> {
        let grpc = &mut self.grpc;
        let answer: std::result::Result<tonic::Response<Ignored>, tonic::Status> =
            self.rt.block_on(async {
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                grpc.unary(
                    Self::ns(msg),
                    PathAndQuery::from_static(method),
                    ProstCodec::default(),
                )
                .await
            });
        answer.map_err(rpc_err(method.to_owned()))?;
        Ok(())
    }

    /// containerd's garbage collection, run now and waited for (a lease
    /// made and deleted with `sync`): the snapshotters' deferred Removes
    /// and their Cleanup. Milliseconds of the delete.
    fn collect_garbage(&mut self, lease: &str) -> Result<f64> {
        self.lease_call(
            "/containerd.services.leases.v1.Leases/Create",
            LeaseCreate { id: lease.into() },
        )?;
        let t = Instant::now();
        self.lease_call(
            "/containerd.services.leases.v1.Leases/Delete",
            LeaseDelete {
                id: lease.into(),
                sync: true,
            },
        )?;
        Ok(ms_since(t))
    }

    /// mount(2) of the one mount a snapshotter returned, at `target`.
    fn mount(&self, mounts: &[Mount]) -> Result<()> {
        let [m] = mounts else {
            return Err(Error::Parse(format!(
                "expected one mount, got {}: {mounts:?}",
                mounts.len()
            )));
        };
        let (flags, data) = mount_flags(&m.options);
        let fstype = (m.r#type != "bind").then_some(m.r#type.as_str());
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(Some(m.source.as_str()), &self.target, fstype, flags, data)
            .map_err(std::io::Error::from)
            .ctx(|| format!("mount {m:?} at {}", self.target.display()))
    }
}

/// The flags and the data string of fstab-style mount options, as
/// containerd's `mount.Mount` reads them.
fn mount_flags(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

// ---------------------------------------------------------------------------
// The devmapper snapshotter's pool and containerd.

/// A thin-pool on two loop devices, as containerd's devmapper docs make
/// it (there with losetup and dmsetup; here with the crates).
struct DmPool {
    dir: PathBuf,
    node: PathBuf,
}

impl DmPool {
    fn new(dir: &Path) -> Result<DmPool> {
        let kernel = Kernel::open()?;
        let (data, meta) = (dir.join("data"), dir.join("metadata"));
        sys::sparse_file(&data, DM_DATA)?;
        sys::sparse_file(&meta, DM_META)?;
        let data_lp = thinlayer_pool::loopback::attach(&data)?;
        let meta_lp = thinlayer_pool::loopback::attach(&meta)?;
        let name = DmName::new(DM_POOL).expect("a valid dm name");
        let uuid = DmUuid::new("tlbench-ctrd-devmapper-pool").expect("a valid dm uuid");
        let spec = PoolSpec {
            meta: meta_lp.device,
            data: data_lp.device,
            data_sectors: Sectors(DM_DATA / 512),
            block_sectors: Sectors(DM_BLOCK_SECTORS),
            low_water_blocks: 32768,
            features: vec!["skip_block_zeroing".into()],
        };
        let dev = kernel.create_pool(name, uuid, &spec)?;
        // The pool holds both loop devices now; autoclear detaches them
        // when it goes.
        drop((data_lp, meta_lp));
        let pool = DmPool {
            dir: dir.to_owned(),
            node: PathBuf::from("/dev/mapper").join(DM_POOL),
        };
        // containerd's devmapper writes `/dev/mapper/POOL` into its thin
        // tables; without udev nobody else makes that node.
        let _ = fs::remove_file(&pool.node);
        let made = nix::sys::stat::mknod(
            &pool.node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(dev.major.into(), dev.minor.into()),
        )
        .map_err(std::io::Error::from)
        .ctx(|| format!("mknod {} ({})", pool.node.display(), devnode(dev).display()));
        if let Err(e) = made {
            let _ = pool.teardown();
            return Err(e);
        }
        Ok(pool)
    }

    /// Removes the pool (its thin devices first) and its files.
    fn teardown(&self) -> Result<()> {
        let r = sweep_dm_prefix(&format!("{DM_POOL}-snap-"), "containerd's devmapper");
        let removed = Kernel::open()
            .and_then(|k| k.remove_if_present(DmName::new(DM_POOL).expect("a valid dm name")));
        let _ = fs::remove_file(&self.node);
        let _ = fs::remove_file(self.dir.join("data"));
        let _ = fs::remove_file(self.dir.join("metadata"));
        r.and(removed.map(|_| ()).map_err(Error::from))
    }
}

/// The bench's containerd.
struct Containerd {
    /// The process; its run directory is containerd's state directory
    /// (shims' mounts live under it).
    daemon: Daemon,
    ctr: PathBuf,
    address: PathBuf,
    /// The bench's directory beside it (config, log, mount point).
    dir: PathBuf,
}

impl Containerd {
    /// Writes the config and starts containerd; returns once ctr answers.
    fn start(tools: &Tools, fs_dir: &Path, dir: &Path, pool: &DmPool) -> Result<Containerd> {
        let root = sys::mkdir(&fs_dir.join("containerd"))?;
        let state = PathBuf::from(format!("/run/tl-bench-containerd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&state);
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        let text = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

# Garbage collection only when the bench asks (a lease deleted with sync).
[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.00000001
  deletion_threshold = 0
  mutation_threshold = 0
  schedule_delay = "0s"

[plugins."io.containerd.snapshotter.v1.devmapper"]
  pool_name = "{pool}"
  root_path = "{dm_root}"
  base_image_size = "256MB"

[proxy_plugins.thinlayer]
  type = "snapshot"
  address = "{snap}"
"#,
            root = root.display(),
            state = state.display(),
            address = address.display(),
            pool = DM_POOL,
            dm_root = pool.dir.join("root").display(),
            snap = dir.join("thinlayer.sock").display(),
        );
        fs::write(&config, text).ctx(|| format!("write {}", config.display()))?;
        let mut cmd = Command::new(&tools.containerd);
        cmd.arg("--config").arg(&config).env("DM_DISABLE_UDEV", "1");
        let version = || ctr(&tools.ctr, &address, &["version"]).is_ok();
        let daemon = Daemon::start(
            "containerd",
            "containerd",
            cmd,
            dir.join("containerd.log"),
            state,
            version,
        )?;
        let c = Containerd {
            daemon,
            ctr: tools.ctr.clone(),
            address,
            dir: dir.to_owned(),
        };
        // Every snapshotter loaded, or a clear error now.
        let plugins = c.ctr(&["plugins", "ls"])?;
        for sn in SNAPSHOTTERS {
            let ok = plugins.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 4 && f[0] == "io.containerd.snapshotter.v1" && f[1] == sn && f[3] == "ok"
            });
            if !ok {
                return Err(Error::Tool {
                    command: "ctr plugins ls".into(),
                    detail: format!(
                        "containerd's snapshotter {sn} did not load:\n{plugins}\n--- containerd log (tail) ---\n{}",
                        tail(&c.daemon.log, 25)
                    ),
                });
            }
        }
        Ok(c)
    }

    /// `ctr -n NAMESPACE ARGS`; its stdout.
    fn ctr(&self, args: &[&str]) -> Result<String> {
        ctr(&self.ctr, &self.address, args)
    }
}

/// `ctr --address ADDRESS -n NAMESPACE ARGS`; its stdout.
fn ctr(ctr: &Path, address: &Path, args: &[&str]) -> Result<String> {
    let out = cli(Command::new(ctr)
        .arg("--address")
        .arg(address)
        .args(["--namespace", NAMESPACE])
        .args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// The table and the plots.

/// The cycle's steps: label and metric.
const STEPS: [(&str, &str); 8] = [
    ("Prepare ms", "prepare-ms"),
    ("Mounts ms", "mounts-ms"),
    ("mount(2) ms", "mount-ms"),
    ("umount(2) ms", "umount-ms"),
    ("start path ms", "start-ms"),
    ("Commit ms", "commit-ms"),
    ("Remove ms", "remove-ms"),
    ("gc per container ms", "gc-ms"),
];

fn median(r: &Report, sn: &str, param: u64, metric: &str) -> Option<f64> {
    r.median(sn, WORKLOAD, param, metric)
}

/// The snapshotters with samples in `r`, in [`SNAPSHOTTERS`] order.
fn measured(r: &Report) -> Vec<&'static str> {
    SNAPSHOTTERS
        .into_iter()
        .filter(|d| {
            r.samples
                .iter()
                .any(|s| s.workload == WORKLOAD && s.backend == *d)
        })
        .collect()
}

/// The populations measured, ascending.
fn populations(r: &Report) -> Vec<u64> {
    let mut v: Vec<u64> = r
        .samples
        .iter()
        .filter(|s| s.workload == WORKLOAD && s.metric == "start-ms")
        .map(|s| s.param)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The containerd section of the terminal table (nothing without
/// samples): medians per snapshotter at each population, thinlayer
/// against overlayfs and devmapper, `ctr run --rm`, flatness, and issue
/// 15's targets, met or not.
pub(crate) fn table(r: &Report, t: &mut String) {
    if measured(r).is_empty() {
        return;
    }
    let n = r.params.containerd_samples;
    let row = |t: &mut String, label: &str, param: u64, metric: &str| {
        let _ = write!(t, "  {label:<30}");
        for sn in SNAPSHOTTERS {
            let v = median(r, sn, param, metric);
            let _ = write!(t, "{:>11}", v.map_or("-".into(), |v| format!("{v:.1}")));
        }
        let (tl, ovl, dm) = (
            median(r, "thinlayer", param, metric),
            median(r, "overlayfs", param, metric),
            median(r, "devmapper", param, metric),
        );
        let _ = writeln!(
            t,
            "{:>9}{:>9}",
            show_ratio(ratio(tl, ovl)),
            show_ratio(ratio(tl, dm))
        );
    };
    let _ = write!(
        t,
        "\ncontainerd, one client through its Snapshots service (median of {n}):\n  {:<30}",
        "op (ms)"
    );
    for sn in SNAPSHOTTERS {
        let _ = write!(t, "{sn:>11}");
    }
    let _ = writeln!(t, "{:>9}{:>9}", "tl/ovl", "tl/dm");
    let pops = populations(r);
    for &pop in &pops {
        let _ = writeln!(t, "  at {} snapshots:", plot::thousands(pop));
        for (label, metric) in STEPS {
            row(t, label, pop, metric);
        }
    }
    row(t, "ctr run --rm IMG true ms", 0, "run-rm-ms");
    row(t, "  its gc per container ms", 0, "run-rm-gc-ms");
    if let (Some(&lo), Some(&hi)) = (pops.first(), pops.last()) {
        if hi > lo {
            let _ = writeln!(
                t,
                "  per-op cost @{} / @{} snapshots (start path; commit + remove + gc):",
                plot::thousands(hi),
                plot::thousands(lo)
            );
            for sn in measured(r) {
                let flat = |m: &str| show_ratio(ratio(median(r, sn, hi, m), median(r, sn, lo, m)));
                let _ = writeln!(
                    t,
                    "    {sn:<12} {:>8} {:>8}",
                    flat("start-ms"),
                    show_ratio(ratio(churn(r, sn, hi), churn(r, sn, lo)))
                );
            }
        }
    }
    let _ = writeln!(
        t,
        "  targets (issue 15; ratios of this run, never asserted):"
    );
    for (what, x, limit) in targets(r, &pops) {
        let (got, verdict) = match x {
            Some(x) if x <= limit => (format!("{x:.2}x"), "met"),
            Some(x) => (format!("{x:.2}x"), "NOT met"),
            None => ("-".into(), "not measured"),
        };
        let _ = writeln!(t, "    {what:<44} {got:>8}  {verdict}");
    }
}

/// Commit + Remove + gc per container at `pop`: a container's end.
fn churn(r: &Report, sn: &str, pop: u64) -> Option<f64> {
    let c = median(r, sn, pop, "commit-ms")?;
    let rm = median(r, sn, pop, "remove-ms")?;
    let gc = median(r, sn, pop, "gc-ms")?;
    Some(c + rm + gc)
}

/// Issue 15's targets at the smallest population: what, figure, limit.
fn targets(r: &Report, pops: &[u64]) -> Vec<(&'static str, Option<f64>, f64)> {
    let lo = pops.first().copied().unwrap_or(0);
    let hi = pops.last().copied().unwrap_or(0);
    let tl = |to: &str, param: u64, m: &str| {
        ratio(median(r, "thinlayer", param, m), median(r, to, param, m))
    };
    vec![
        (
            "start path <= 1.0x overlayfs",
            tl("overlayfs", lo, "start-ms"),
            1.0,
        ),
        (
            "start path <= 0.2x devmapper",
            tl("devmapper", lo, "start-ms"),
            0.2,
        ),
        (
            "Commit <= 1.0x overlayfs",
            tl("overlayfs", lo, "commit-ms"),
            1.0,
        ),
        (
            "Remove <= 1.0x overlayfs",
            tl("overlayfs", lo, "remove-ms"),
            1.0,
        ),
        (
            "ctr run --rm <= 1.1x overlayfs",
            tl("overlayfs", 0, "run-rm-ms"),
            1.1,
        ),
        (
            "start path flat: @largest / @smallest <= 1.2",
            (hi > lo)
                .then(|| {
                    ratio(
                        median(r, "thinlayer", hi, "start-ms"),
                        median(r, "thinlayer", lo, "start-ms"),
                    )
                })
                .flatten(),
            1.2,
        ),
    ]
}

/// Draws the containerd plots into `out` (none without samples). The font
/// is registered by the caller (`plot::all`).
///
/// # Errors
/// [`Error::Plot`].
pub(crate) fn plots(r: &Report, out: &Path) -> Result<()> {
    let sns = measured(r);
    if sns.is_empty() {
        return Ok(());
    }
    let err = |f: &Path| {
        let file = f.display().to_string();
        move |detail| Error::Plot { file, detail }
    };
    let pops = populations(r);
    let lo = pops.first().copied().unwrap_or(0);
    let f = out.join("containerd-start-path.png");
    bars(
        r,
        &sns,
        &f,
        &format!(
            "start path through containerd, by snapshotter ({} snapshots)",
            plot::thousands(lo)
        ),
        &[
            ("Prepare", "prepare-ms"),
            ("Mounts", "mounts-ms"),
            ("mount(2)", "mount-ms"),
            ("start path", "start-ms"),
        ],
        lo,
    )
    .map_err(err(&f))?;
    let f = out.join("containerd-commit-remove.png");
    bars(
        r,
        &sns,
        &f,
        &format!(
            "a container's end: Commit, Remove, deferred gc ({} snapshots)",
            plot::thousands(lo)
        ),
        &[
            ("Commit", "commit-ms"),
            ("Remove", "remove-ms"),
            ("gc per container", "gc-ms"),
            ("umount(2)", "umount-ms"),
        ],
        lo,
    )
    .map_err(err(&f))?;
    let f = out.join("containerd-ctr-run.png");
    bars(
        r,
        &sns,
        &f,
        "`ctr run --rm IMAGE true`, end to end",
        &[("ctr run --rm", "run-rm-ms"), ("its gc", "run-rm-gc-ms")],
        0,
    )
    .map_err(err(&f))?;
    let f = out.join("containerd-vs-population.png");
    vs_population(r, &sns, &pops, &f).map_err(err(&f))?;
    Ok(())
}

/// Grouped bars: per step, one bar per snapshotter (docker's drawing).
fn bars(
    r: &Report,
    sns: &[&str],
    file: &Path,
    caption: &str,
    ops: &[(&str, &str)],
    param: u64,
) -> docker::Draw {
    let series: Vec<(String, RGBColor)> = sns
        .iter()
        .enumerate()
        .map(|(i, sn)| ((*sn).to_owned(), plot::style(sn, i).0))
        .collect();
    let ymax = plot::max_or(
        1.0,
        ops.iter()
            .flat_map(|(_, m)| sns.iter().filter_map(move |sn| median(r, sn, param, m))),
    );
    docker::grouped(
        file,
        caption,
        "median ms",
        ops,
        &series,
        // A zero stays visible: a sliver above the axis.
        &|m, j| median(r, sns[j], param, m).map(|v| v.max(ymax / 300.0)),
        ymax * 1.1,
        None,
    )
}

/// The start path and a container's end (commit + remove + gc) against
/// the population, one line per snapshotter.
fn vs_population(r: &Report, sns: &[&str], pops: &[u64], file: &Path) -> docker::Draw {
    let names: Vec<String> = sns.iter().map(|s| (*s).to_owned()).collect();
    let ymax = plot::max_or(
        1.0,
        names.iter().flat_map(|sn| {
            pops.iter()
                .filter_map(move |&p| median(r, sn, p, "start-ms"))
        }),
    );
    let (chart_area, legend_area) = plot::areas(file)?;
    let mut chart = plot::category_chart(
        &chart_area,
        "start path through containerd vs population",
        0.3,
        plot::Axes {
            categories: plot::labels(pops, plot::thousands),
            y: 0f64..ymax * 1.1,
            y_ticks: 10,
            y_label: &|y| format!("{y:.0}"),
            x_desc: "snapshots in the snapshotter",
            y_desc: "median ms (Prepare + Mounts + mount(2))",
        },
    )?;
    plot::series(&mut chart, &names, |sn| {
        pops.iter()
            .enumerate()
            .filter_map(|(i, &p)| median(r, sn, p, "start-ms").map(|v| (i as f64, v)))
            .collect()
    })?;
    plot::legend_panel(&legend_area, &names)?;
    chart_area.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(samples: &[(&str, u64, &str, f64)]) -> Report {
        let mut r = Report {
            quick: true,
            params: Params::new(true),
            backends: Vec::new(),
            disk: None,
            kernel: String::new(),
            samples: samples
                .iter()
                .map(|(b, p, m, v)| Sample {
                    backend: (*b).into(),
                    workload: WORKLOAD.into(),
                    param: *p,
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

    fn sample() -> Report {
        let mut s = Vec::new();
        for (sn, start, commit) in [
            ("overlayfs", 13.0, 3.5),
            ("native", 40.0, 30.0),
            ("devmapper", 290.0, 408.0),
            ("thinlayer", 65.0, 45.0),
        ] {
            for (pop, k) in [(10u64, 1.0), (100, 1.1), (1000, 1.3)] {
                s.push((sn, pop, "prepare-ms", start * 0.6 * k));
                s.push((sn, pop, "mounts-ms", 0.0));
                s.push((sn, pop, "mount-ms", start * 0.4 * k));
                s.push((sn, pop, "umount-ms", 4.0));
                s.push((sn, pop, "start-ms", start * k));
                s.push((sn, pop, "commit-ms", commit));
                s.push((sn, pop, "remove-ms", 2.0));
                s.push((sn, pop, "gc-ms", 10.0));
            }
            s.push((sn, 0, "run-rm-ms", 2000.0 + start));
            s.push((sn, 0, "run-rm-gc-ms", 5.0));
        }
        report(&s)
    }

    #[test]
    fn table_has_every_snapshotter_population_and_ratio() {
        let r = sample();
        let mut t = String::new();
        table(&r, &mut t);
        for w in [
            "overlayfs",
            "native",
            "devmapper",
            "thinlayer",
            "tl/ovl",
            "tl/dm",
            "at 10 snapshots",
            "at 1,000 snapshots",
            "ctr run --rm",
        ] {
            assert!(t.contains(w), "no {w} in:\n{t}");
        }
        // At 10: thinlayer 65 against overlayfs 13 (5.00x) and devmapper 290.
        let start = t.lines().find(|l| l.contains("start path ms")).unwrap();
        assert!(start.ends_with("5.00x    0.22x"), "{start}");
        let line = |what: &str| t.lines().find(|l| l.contains(what)).unwrap().to_owned();
        assert!(line("start path <= 1.0x").ends_with("NOT met"), "{t}");
        assert!(line("start path flat").ends_with("NOT met"), "{t}");
    }

    #[test]
    fn no_containerd_samples_no_section() {
        let mut t = String::new();
        table(&report(&[]), &mut t);
        assert!(t.is_empty());
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let o = |v: &[&str]| mount_flags(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        let (f, d) = o(&["rbind", "ro"]);
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY);
        assert_eq!(d, "");
        let (f, d) = o(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l"]);
        assert_eq!(f, MsFlags::empty());
        assert_eq!(d, "index=off,workdir=/w,upperdir=/u,lowerdir=/l");
    }

    #[test]
    fn plots_are_drawn_for_containerd_samples() {
        let r = sample();
        let out = std::env::var_os("THINLAYER_PLOTS_TO").map_or_else(
            || std::env::temp_dir().join(format!("tl-ctrd-plots-{}", std::process::id())),
            PathBuf::from,
        );
        fs::create_dir_all(&out).unwrap();
        crate::plot::all(&r, &out).unwrap();
        for f in [
            "containerd-start-path.png",
            "containerd-commit-remove.png",
            "containerd-ctr-run.png",
            "containerd-vs-population.png",
        ] {
            let len = fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000, "{f}: {len} bytes");
        }
        if std::env::var_os("THINLAYER_PLOTS_TO").is_none() {
            fs::remove_dir_all(&out).unwrap();
        }
    }
}
