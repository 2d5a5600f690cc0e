//! The workloads, run over every backend with the backends interleaved
//! sample by sample.

use std::{
    fs,
    io::{IsTerminal, Read},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::Instant,
};

use devicemapper::{DevId, DmFlags, DmOptions};
use indicatif::{ProgressBar, ProgressStyle};
use thinlayer_pool::FsType;

use crate::{
    Options, Params,
    backend::{Backend, Btrfs, Floor, FullCopy, Overlay, Sizes, ThinLayer},
    disk::Slices,
    error::{DmContext, Error, IoContext, Result},
    report::{Report, Sample},
    sys::{self, ms_since},
};

const KIB4: usize = 4096;

/// Collects samples and drives the progress bar.
struct Run {
    samples: Vec<Sample>,
    notes: Vec<String>,
    bar: ProgressBar,
    current: Option<(String, Instant)>,
    phases: Vec<(String, f64)>,
    started: Instant,
}

impl Run {
    /// A run started at `started`, showing its phases on `bar`.
    fn new(bar: ProgressBar, started: Instant) -> Run {
        Run {
            samples: Vec::new(),
            notes: Vec::new(),
            bar,
            current: None,
            phases: Vec::new(),
            started,
        }
    }

    /// The report of a finished run over `backends` (`disk`: the
    /// `--disk` it ran on), its statistics computed.
    fn report(
        self,
        opts: &Options,
        p: &Params,
        backends: Vec<String>,
        disk: Option<String>,
    ) -> Report {
        let mut report = Report {
            quick: opts.quick,
            params: p.clone(),
            backends,
            disk,
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            samples: self.samples,
            stats: Vec::new(),
            notes: self.notes,
            phases: self.phases,
            wall_seconds: self.started.elapsed().as_secs_f64(),
        };
        report.compute_stats();
        report
    }

    fn add(&mut self, backend: &str, workload: &str, param: u64, metric: &str, value: f64) {
        self.samples.push(Sample {
            backend: backend.to_owned(),
            workload: workload.to_owned(),
            param,
            metric: metric.to_owned(),
            value,
        });
    }

    fn phase(&mut self, what: &str) {
        let now = Instant::now();
        if let Some((name, t)) = self.current.take() {
            self.phases.push((name, (now - t).as_secs_f64()));
        }
        self.current = Some((what.to_owned(), now));
        self.bar.set_message(what.to_owned());
        self.bar.inc(1);
        if self.bar.is_hidden() {
            // With the start time, so that a run that fails still shows
            // what each phase took.
            let at = (now - self.started).as_secs_f64();
            eprintln!("bench: {what} (at {at:.0} s)");
        }
    }
}

struct Backends {
    thin: ThinLayer,
    warm: ThinLayer,
    floor: Floor,
    ovl_ext4: Overlay,
    ovl_xfs: Overlay,
    btrfs: Btrfs,
    copy: FullCopy,
}

impl Backends {
    fn all(&mut self) -> [&mut dyn Backend; 7] {
        [
            &mut self.thin,
            &mut self.warm,
            &mut self.floor,
            &mut self.ovl_ext4,
            &mut self.ovl_xfs,
            &mut self.btrfs,
            &mut self.copy,
        ]
    }
}

const PHASES: u64 = 13;

/// Builds the backends, runs every workload, tears the backends down
/// (also on error) and returns the report with its stats.
pub(crate) fn run_all(opts: &Options, p: &Params) -> Result<Report> {
    let started = Instant::now();
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(PHASES + u64::from(opts.disk.is_some()))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .expect("a valid template"),
    );
    let mut run = Run::new(bar, started);
    let work = &opts.work;
    fresh_dir(work)?;
    let sizes = Sizes {
        device: p.device_size,
        thin: p.thin_size,
    };
    run.phase("creating the backends");
    let mut made: Vec<Box<dyn Backend>> = Vec::new();
    let backends = (|| -> Result<Backends> {
        let thin = ThinLayer::new(
            "thinlayer",
            &sys::mkdir(&work.join("thinlayer"))?,
            &sizes,
            64 << 10,
        )?;
        let warm = ThinLayer::warm(
            "thinlayer-warm",
            &sys::mkdir(&work.join("thinlayer-warm"))?,
            &sizes,
            64 << 10,
        );
        let warm = match warm {
            Ok(w) => w,
            Err(e) => {
                made.push(Box::new(thin));
                return Err(e);
            }
        };
        let floor = Floor::new(&sys::mkdir(&work.join("floor"))?, &sizes, 64 << 10);
        let floor = match floor {
            Ok(f) => f,
            Err(e) => {
                made.push(Box::new(thin));
                made.push(Box::new(warm));
                return Err(e);
            }
        };
        let rest = (|| {
            Ok((
                Overlay::new(&sys::mkdir(&work.join(LOOP_FS[0]))?, &sizes, false)?,
                Overlay::new(&sys::mkdir(&work.join(LOOP_FS[1]))?, &sizes, true)?,
                Btrfs::new(&sys::mkdir(&work.join(LOOP_FS[2]))?, &sizes)?,
                FullCopy::new(&sys::mkdir(&work.join(LOOP_FS[3]))?, &sizes)?,
            ))
        })();
        match rest {
            Ok((ovl_ext4, ovl_xfs, btrfs, copy)) => Ok(Backends {
                thin,
                warm,
                floor,
                ovl_ext4,
                ovl_xfs,
                btrfs,
                copy,
            }),
            Err(e) => {
                made.push(Box::new(thin));
                made.push(Box::new(warm));
                made.push(Box::new(floor));
                Err(e)
            }
        }
    })();
    let mut b = match backends {
        Ok(b) => b,
        Err(e) => {
            for mut m in made {
                let _ = m.teardown();
            }
            let _ = sys_cleanup(work);
            return Err(e);
        }
    };
    let n = b.all().len() as u64;
    let result = room(work, p, n)
        .and_then(|()| workloads(&mut run, &mut b, opts, p))
        .and_then(|()| match &opts.disk {
            Some(disk) => loop_vs_disk(&mut run, opts, p, disk),
            None => Ok(()),
        });
    let mut teardown = Ok(());
    for be in b.all() {
        if let Err(e) = be.teardown() {
            teardown = teardown.and(Err(e));
        }
    }
    let _ = sys_cleanup(work);
    result?;
    teardown?;
    run.phase("done");
    run.bar.finish_and_clear();
    let backends = b.all().iter().map(|x| x.name().to_owned()).collect();
    let disk = opts.disk.as_ref().map(|d| d.display().to_string());
    Ok(run.report(opts, p, backends, disk))
}

/// The backends' loop-backed filesystems (`DIR/fs` under their work
/// directories), mounted without `discard`.
const LOOP_FS: [&str; 4] = ["ovl-ext4", "ovl-xfs", "btrfs", "copy"];

/// Returns the free space of the loop-backed filesystems to the tmpfs
/// under them (untimed, between samples). Without it a deleted file's
/// blocks stay in guest memory and, as a new file rarely reuses them,
/// full mode's GiB copies and thousand snapshots fill the guest. The
/// thin pools need none: thinlayer discards what it removes, and a pool
/// (the floor's) reuses its freed blocks.
fn trim(work: &Path) -> Result<()> {
    for d in LOOP_FS {
        let fs = work.join(d).join("fs");
        // A journal commit first: FITRIM skips blocks freed since the last.
        sys::syncfs(&fs)?;
        sys::tool("fstrim", &[&fs.to_string_lossy()])?;
    }
    Ok(())
}

/// Fails at once, rather than with an I/O error midway, when `work` (the
/// guest's tmpfs) cannot hold the largest first-write round: that file on
/// each of the `backends`, a copy-up (overlay-ext4) and a copy (vfs-copy),
/// and the rest (measured: 10.7 GiB for 7 backends and 1 GiB).
fn room(work: &Path, p: &Params, backends: u64) -> Result<()> {
    let need = (backends + 4) * p.file_sizes.iter().max().copied().unwrap_or(0);
    let st = nix::sys::statvfs::statvfs(work)
        .map_err(std::io::Error::from)
        .ctx(|| format!("statvfs {}", work.display()))?;
    let free = st.blocks_available() * st.fragment_size();
    if free >= need {
        return Ok(());
    }
    Err(Error::Io {
        context: format!(
            "{}: {} MiB free, this mode needs about {} MiB there (in the VM /tmp \
             is 90% of THINLAYER_VM_MEM)",
            work.display(),
            free >> 20,
            need >> 20
        ),
        source: std::io::ErrorKind::StorageFull.into(),
    })
}

fn sys_cleanup(work: &Path) -> Result<()> {
    fs::remove_dir_all(work).ctx(|| format!("remove {}", work.display()))
}

/// The base image: small files in a few directories and a 1 MiB "binary".
fn fill_base(dir: &Path) -> Result<()> {
    for d in 0..4 {
        let sub = sys::mkdir(&dir.join(format!("usr{d}")))?;
        for f in 0..16usize {
            let n = (d * 16 + f) as u64;
            fs::write(
                sub.join(format!("f{f}")),
                sys::pattern(n, 4096 * (1 + f % 4)),
            )
            .ctx(|| format!("write into {}", sub.display()))?;
        }
    }
    sys::write_synced(&dir.join("app"), &sys::pattern(99, 1 << 20))
}

fn big_file(size: u64) -> impl FnMut(&Path) -> Result<()> {
    move |dir: &Path| {
        let path = dir.join("big");
        let f = fs::File::create(&path).ctx(|| format!("create {}", path.display()))?;
        let chunk = sys::pattern(size, 1 << 20);
        let mut off = 0;
        while off < size {
            let n = chunk
                .len()
                .min(usize::try_from(size - off).unwrap_or(usize::MAX));
            f.write_all_at(&chunk[..n], off)
                .ctx(|| format!("write {}", path.display()))?;
            off += n as u64;
        }
        f.sync_all().ctx(|| format!("fsync {}", path.display()))
    }
}

fn workloads(run: &mut Run, b: &mut Backends, opts: &Options, p: &Params) -> Result<()> {
    run.phase("base image layer");
    for be in b.all() {
        be.make_layer("base", None, &mut fill_base)?;
    }
    start_path(run, b, p)?;
    populations(run, b, p)?;
    trim(&opts.work)?;
    first_write(run, b, p, &opts.work)?;
    metadata(run, b, p)?;
    import(run, b, opts, p)?;
    page_cache(run, b, p)?;
    trivial(run, b, p)?;
    steps(run, b, p)?;
    block_sizes(run, opts, p)?;
    Ok(())
}

/// Snapshot + activate + mount, a 4 KiB write, commit, umount + remove.
fn start_path(run: &mut Run, b: &mut Backends, p: &Params) -> Result<()> {
    run.phase("start path: create, mount, commit, remove");
    for i in 0..p.samples {
        for be in b.all() {
            let c = format!("s{i}");
            let k = format!("k{i}");
            be.take_steps();
            let t = Instant::now();
            be.create(&c, "base")?;
            let create = ms_since(t);
            let t = Instant::now();
            let dir = be.mount(&c)?;
            let mount = ms_since(t);
            sys::write_synced(&dir.join("new.txt"), &sys::pattern(7, KIB4))?;
            let t = Instant::now();
            be.commit(&c, &k)?;
            let commit = ms_since(t);
            be.remove_layer(&k)?;
            let t = Instant::now();
            be.umount(&c)?;
            let umount = ms_since(t);
            let t = Instant::now();
            be.remove(&c)?;
            let remove = ms_since(t);
            let name = be.name().to_owned();
            for (m, v) in [
                ("create-ms", create),
                ("mount-ms", mount),
                ("start-ms", create + mount),
                ("commit-ms", commit),
                ("umount-ms", umount),
                ("rm-ms", remove),
                ("remove-ms", umount + remove),
            ] {
                run.add(&name, "start", 0, m, v);
            }
            for (step, v) in be.take_steps() {
                run.add(&name, "step", 0, step, v);
            }
            idle(run, be, "start", 0)?;
        }
    }
    Ok(())
}

/// Lets a backend do its between-requests work, timed on its own (only
/// thinlayer-warm has any: reclaim removed layers, provision spares).
fn idle(run: &mut Run, be: &mut dyn Backend, workload: &str, param: u64) -> Result<()> {
    let t = Instant::now();
    be.idle()?;
    if be.name() == "thinlayer-warm" {
        let name = be.name().to_owned();
        run.add(&name, workload, param, "idle-ms", ms_since(t));
    }
    Ok(())
}

/// The start path and removal at growing populations of snapshots.
fn populations(run: &mut Run, b: &mut Backends, p: &Params) -> Result<()> {
    let mut have = 0;
    for &pop in &p.populations {
        run.phase(&format!("start path at {pop} snapshots"));
        for be in b.all() {
            for j in have..pop {
                be.create(&format!("p{j}"), "base")?;
            }
            be.idle()?;
        }
        have = pop;
        for i in 0..p.samples {
            for be in b.all() {
                let c = format!("q{i}");
                let t = Instant::now();
                be.create(&c, "base")?;
                let create = ms_since(t);
                let t = Instant::now();
                be.mount(&c)?;
                let mount = ms_since(t);
                let t = Instant::now();
                be.umount(&c)?;
                be.remove(&c)?;
                let remove = ms_since(t);
                let name = be.name().to_owned();
                let pp = pop as u64;
                run.add(&name, "population", pp, "create-ms", create);
                run.add(&name, "population", pp, "mount-ms", mount);
                run.add(&name, "population", pp, "start-ms", create + mount);
                run.add(&name, "population", pp, "remove-ms", remove);
                be.take_steps();
                idle(run, be, "population", pp)?;
            }
        }
    }
    for be in b.all() {
        for j in 0..have {
            be.remove(&format!("p{j}"))?;
        }
        // thinlayer-warm reclaims the removed snapshots here, not in the
        // next phase's first `used_bytes` (85 s for 1,000 under TCG).
        be.idle()?;
    }
    Ok(())
}

/// First 4 KiB write into a large lower-layer file: latency, bytes newly
/// allocated, bytes sent to the device. In the largest file also a cold
/// sequential read and random 4 KiB overwrites. Each round creates one
/// container per backend, then drops the caches once for all of them.
fn first_write(run: &mut Run, b: &mut Backends, p: &Params, work: &Path) -> Result<()> {
    let largest = p.file_sizes.iter().copied().max().unwrap_or(0);
    for &size in &p.file_sizes {
        run.phase(&format!("first write into a {} MiB file", size >> 20));
        let layer = format!("big{}", size >> 20);
        for be in b.all() {
            be.make_layer(&layer, Some("base"), &mut big_file(size))?;
        }
        for k in 0..p.write_samples {
            let c = format!("w{}-{k}", size >> 20);
            let mut dirs = Vec::new();
            for be in b.all() {
                let used0 = be.used_bytes()?;
                be.create(&c, &layer)?;
                dirs.push(be.mount(&c)?.join("big"));
                let used1 = be.used_bytes()?;
                let name = be.name().to_owned();
                run.add(
                    &name,
                    "first-write",
                    size,
                    "create-bytes",
                    used1 as f64 - used0 as f64,
                );
            }
            let deep = size == largest && k == 0;
            if deep {
                sys::drop_caches()?;
                for (be, file) in b.all().into_iter().zip(&dirs) {
                    let (n, secs) = read_through(file)?;
                    let name = be.name().to_owned();
                    run.add(&name, "seq-read", size, "MB/s", n as f64 / 1e6 / secs);
                    run.add(&name, "seq-read", size, "ms", secs * 1e3);
                }
            }
            sys::drop_caches()?;
            for (be, file) in b.all().into_iter().zip(&dirs) {
                let name = be.name().to_owned();
                let used1 = be.used_bytes()?;
                let dev1 = be.device_bytes_written()?;
                let t = Instant::now();
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(file)
                    .ctx(|| format!("open {}", file.display()))?;
                f.write_all_at(&sys::pattern(3, KIB4), (size / 2) & !(KIB4 as u64 - 1))
                    .ctx(|| format!("write {}", file.display()))?;
                f.sync_all().ctx(|| format!("fsync {}", file.display()))?;
                let ms = ms_since(t);
                let used2 = be.used_bytes()?;
                let dev2 = be.device_bytes_written()?;
                run.add(&name, "first-write", size, "ms", ms);
                run.add(
                    &name,
                    "first-write",
                    size,
                    "alloc-bytes",
                    used2 as f64 - used1 as f64,
                );
                run.add(
                    &name,
                    "first-write",
                    size,
                    "device-bytes",
                    dev2 as f64 - dev1 as f64,
                );
                if let Some(upper) = be.upper_dir(&c) {
                    run.add(
                        &name,
                        "first-write",
                        size,
                        "upper-bytes",
                        sys::du(&upper)? as f64,
                    );
                }
                if deep {
                    let t = Instant::now();
                    random_writes(&f, file, size / KIB4 as u64, p.random_writes, 0)?;
                    let ms = ms_since(t);
                    let used3 = be.used_bytes()?;
                    run.add(&name, "random-write", size, "ms", ms);
                    run.add(
                        &name,
                        "random-write",
                        size,
                        "alloc-bytes",
                        used3 as f64 - used2 as f64,
                    );
                }
            }
            for be in b.all() {
                be.umount(&c)?;
                be.remove(&c)?;
            }
            trim(work)?;
        }
        for be in b.all() {
            be.remove_layer(&layer)?;
        }
    }
    trim(work)
}

/// Reads `file` to its end in 1 MiB reads: the bytes read and the seconds it
/// took, for a sequential-read rate (the caller drops caches first).
fn read_through(file: &Path) -> Result<(u64, f64)> {
    let t = Instant::now();
    let mut f = fs::File::open(file).ctx(|| format!("open {}", file.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f
            .read(&mut buf)
            .ctx(|| format!("read {}", file.display()))?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    Ok((n, t.elapsed().as_secs_f64()))
}

/// Create, stat and unlink many small files in a container.
fn metadata(run: &mut Run, b: &mut Backends, p: &Params) -> Result<()> {
    run.phase("metadata: create, stat, unlink small files");
    for k in 0..p.write_samples {
        for be in b.all() {
            let c = format!("m{k}");
            be.create(&c, "base")?;
            let dir = be.mount(&c)?;
            let d = sys::mkdir(&dir.join("many"))?;
            let body = sys::pattern(1, 100);
            let t = Instant::now();
            for i in 0..p.meta_files {
                fs::write(d.join(format!("f{i}")), &body)
                    .ctx(|| format!("write into {}", d.display()))?;
            }
            sys::syncfs(&d)?;
            let create = ms_since(t);
            let t = Instant::now();
            for i in 0..p.meta_files {
                fs::symlink_metadata(d.join(format!("f{i}")))
                    .ctx(|| format!("stat in {}", d.display()))?;
            }
            let stat = ms_since(t);
            let t = Instant::now();
            for i in 0..p.meta_files {
                fs::remove_file(d.join(format!("f{i}")))
                    .ctx(|| format!("unlink in {}", d.display()))?;
            }
            sys::syncfs(&d)?;
            let unlink = ms_since(t);
            let name = be.name().to_owned();
            let n = p.meta_files as u64;
            run.add(&name, "metadata", n, "create-ms", create);
            run.add(&name, "metadata", n, "stat-ms", stat);
            run.add(&name, "metadata", n, "unlink-ms", unlink);
            be.umount(&c)?;
            be.remove(&c)?;
        }
    }
    Ok(())
}

/// The fixture image imported through the store (thin snapshots, one per
/// layer) against its layers extracted into overlay lower directories.
fn import(run: &mut Run, b: &mut Backends, opts: &Options, p: &Params) -> Result<()> {
    run.phase("image import");
    let image = opts.fixtures.join("demo-oci");
    if !image.join("index.json").exists() {
        run.notes.push(format!(
            "image import skipped: no fixture image at {} (build it with `tests/fixtures/make-images {}`)",
            image.display(),
            opts.fixtures.display()
        ));
        return Ok(());
    }
    let scratch = sys::mkdir(&opts.work.join("import-scratch"))?;
    let src = thinlayer_store::source::open(&image, &scratch)?;
    let blobs: Vec<PathBuf> = src.layers.iter().map(|l| l.path.clone()).collect();
    for k in 0..p.write_samples.min(2) {
        let used0 = b.thin.used_bytes()?;
        let t = Instant::now();
        let name = format!("img{k}");
        b.thin.store().import(&image, Some(&name), &|_| {})?;
        let ms = ms_since(t);
        let used1 = b.thin.used_bytes()?;
        run.add("thinlayer", "import", 0, "ms", ms);
        run.add(
            "thinlayer",
            "import",
            0,
            "alloc-bytes",
            used1 as f64 - used0 as f64,
        );
        b.thin.store().remove_image(&name)?;
        for ovl in [&mut b.ovl_ext4, &mut b.ovl_xfs] {
            let used0 = ovl.used_bytes()?;
            let t = Instant::now();
            let ids = ovl.import(&format!("img{k}-"), &blobs)?;
            let ms = ms_since(t);
            let used1 = ovl.used_bytes()?;
            let name = ovl.name().to_owned();
            run.add(&name, "import", 0, "ms", ms);
            run.add(
                &name,
                "import",
                0,
                "alloc-bytes",
                used1 as f64 - used0 as f64,
            );
            for id in ids.iter().rev() {
                ovl.remove_layer(id)?;
            }
        }
    }
    run.notes.push(
        "image import: thinlayer through thinlayer_store (a thin snapshot per layer, applied, \
         checked against its diff_id) vs overlayfs (each layer tar applied with the same code \
         into its own lower directory through an overlay mount of the layers below it)"
            .into(),
    );
    Ok(())
}

/// N containers of one image read the same files: page cache used.
fn page_cache(run: &mut Run, b: &mut Backends, p: &Params) -> Result<()> {
    run.phase("page cache: containers of one image reading the same files");
    let files = 16u64;
    let each = p.cache_bytes / files;
    for be in b.all() {
        be.make_layer("pc", Some("base"), &mut |dir: &Path| {
            for i in 0..files {
                sys::write_synced(
                    &dir.join(format!("lib{i}")),
                    &sys::pattern(i + 11, usize::try_from(each).expect("small")),
                )?;
            }
            Ok(())
        })?;
        let mut dirs = Vec::new();
        for i in 0..p.cache_containers {
            let c = format!("pc{i}");
            be.create(&c, "pc")?;
            dirs.push(be.mount(&c)?);
        }
        sys::drop_caches()?;
        let before = sys::meminfo_cached()?;
        let mut buf = Vec::new();
        for d in &dirs {
            for i in 0..files {
                buf.clear();
                let path = d.join(format!("lib{i}"));
                fs::File::open(&path)
                    .and_then(|mut f| f.read_to_end(&mut buf))
                    .ctx(|| format!("read {}", path.display()))?;
            }
        }
        let after = sys::meminfo_cached()?;
        let name = be.name().to_owned();
        let n = p.cache_containers as u64;
        run.add(
            &name,
            "page-cache",
            n,
            "cached-bytes",
            after as f64 - before as f64,
        );
        for i in 0..p.cache_containers {
            let c = format!("pc{i}");
            be.umount(&c)?;
            be.remove(&c)?;
        }
        be.remove_layer("pc")?;
    }
    run.notes.push(format!(
        "page cache: {} containers each read the same {} MiB of image files after a cache drop; \
         the figure is the growth of Cached in /proc/meminfo",
        p.cache_containers,
        p.cache_bytes >> 20
    ));
    Ok(())
}

/// Space per trivial container (one tiny file written), then removal:
/// latency and space returned, in the backend and on the host.
fn trivial(run: &mut Run, b: &mut Backends, p: &Params) -> Result<()> {
    run.phase("space per trivial container, removal and space returned");
    for be in b.all() {
        let name = be.name().to_owned();
        let n = p.trivial_containers;
        let used0 = be.used_bytes()?;
        let host0 = be.backing_bytes()?;
        for i in 0..n {
            let c = format!("t{i}");
            be.create(&c, "base")?;
            let dir = be.mount(&c)?;
            sys::write_synced(&dir.join("hostname"), b"x\n")?;
        }
        let used1 = be.used_bytes()?;
        let host1 = be.backing_bytes()?;
        for i in 0..n {
            let c = format!("t{i}");
            let t = Instant::now();
            be.umount(&c)?;
            be.remove(&c)?;
            run.add(&name, "trivial", 0, "remove-ms", ms_since(t));
        }
        let used2 = be.used_bytes()?;
        let host2 = be.backing_bytes()?;
        let per = |a: u64, z: u64| (z as f64 - a as f64) / n as f64;
        run.add(&name, "trivial", 0, "alloc-bytes", per(used0, used1));
        run.add(&name, "trivial", 0, "backing-bytes", per(host0, host1));
        run.add(
            &name,
            "trivial",
            0,
            "returned-bytes",
            used1 as f64 - used2 as f64,
        );
        run.add(
            &name,
            "trivial",
            0,
            "backing-returned-bytes",
            host1 as f64 - host2 as f64,
        );
    }
    Ok(())
}

/// What single kernel calls and engine steps cost, to explain the start
/// path: the ioctls the engine issues beyond the floor's, timed alone.
fn steps(run: &mut Run, b: &mut Backends, p: &Params) -> Result<()> {
    run.phase("per-step costs: ioctls and engine steps");
    let n = p.samples.max(10);
    let scratch = sys::mkdir(&run_dir(b))?;
    let base = b.floor.base_thin_id();
    let (dm, pool) = b.floor.dm();
    let id = DevId::Name(pool);
    let mut time = |label: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        for _ in 0..n {
            let t = Instant::now();
            f()?;
            run.add("floor", "step", 0, label, ms_since(t));
        }
        Ok(())
    };
    time("DM_DEV_STATUS (device_info)", &mut || {
        dm.device_info(&id).dm(|| "device_info".into()).map(|_| ())
    })?;
    time("DM_TABLE_STATUS (pool status)", &mut || {
        dm.table_status(&id, DmOptions::default())
            .dm(|| "table_status".into())
            .map(|_| ())
    })?;
    time("DM_TABLE_STATUS (pool status, DM_NOFLUSH)", &mut || {
        dm.table_status(&id, DmOptions::default().set_flags(DmFlags::DM_NOFLUSH))
            .dm(|| "table_status".into())
            .map(|_| ())
    })?;
    // dm-thin commits its metadata on a status read without DM_NOFLUSH:
    // time the read right after a change (create_snap), then the delete.
    let mut spare = 2_000_000u32;
    time("DM_TARGET_MSG create_snap + delete", &mut || {
        spare += 1;
        dm.target_msg(&id, None, &format!("create_snap {spare} {base}"))
            .dm(|| "create_snap".into())?;
        dm.target_msg(&id, None, &format!("delete {spare}"))
            .dm(|| "delete".into())
            .map(|_| ())
    })?;
    time("DM_LIST_VERSIONS (Kernel::open)", &mut || {
        dm.list_versions().dm(|| "list_versions".into()).map(|_| ())
    })?;
    time("DM_LIST_DEVICES", &mut || {
        dm.list_devices().dm(|| "list_devices".into()).map(|_| ())
    })?;
    // A transaction-id message moves the id and back: two metadata commits.
    let tid = |dm: &devicemapper::DM| -> Result<u64> {
        let (_, lines) = dm
            .table_status(&id, DmOptions::default())
            .dm(|| "table_status".into())?;
        Ok(lines
            .first()
            .and_then(|l| l.3.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    };
    let t0 = tid(dm)?;
    time("DM_TARGET_MSG set_transaction_id", &mut || {
        let (a, z) = (t0, t0 + 1);
        dm.target_msg(&id, None, &format!("set_transaction_id {a} {z}"))
            .dm(|| "set_transaction_id".into())?;
        dm.target_msg(&id, None, &format!("set_transaction_id {z} {a}"))
            .dm(|| "set_transaction_id back".into())
            .map(|_| ())
    })?;
    let rec = scratch.join("x.rec");
    time("record write (2 fsyncs + rename, tmpfs)", &mut || {
        thinlayer_pool::record::write(&rec, "bench", &serde_json::json!({"a": 1}))
            .map_err(Into::into)
    })?;
    // A status read right after a change pays for the metadata commit.
    for _ in 0..n {
        spare += 1;
        dm.target_msg(&id, None, &format!("create_snap {spare} {base}"))
            .dm(|| "create_snap".into())?;
        dm.target_msg(&id, None, &format!("delete {spare}"))
            .dm(|| "delete".into())?;
        for (label, flags) in [
            ("DM_TABLE_STATUS (pool) after a change", DmFlags::empty()),
            ("DM_TABLE_STATUS (pool) again", DmFlags::empty()),
        ] {
            let t = Instant::now();
            dm.table_status(&id, DmOptions::default().set_flags(flags))
                .dm(|| "table_status".into())?;
            run.add("floor", "step", 0, label, ms_since(t));
        }
    }
    // Engine steps, in-process, as create_layer and mount_layer call them.
    let pool = b.thin.store().pool();
    for _ in 0..n {
        let t = Instant::now();
        pool.recover()?;
        run.add(
            "thinlayer",
            "step",
            0,
            "Pool::recover (2 ioctls)",
            ms_since(t),
        );
        let t = Instant::now();
        pool.layer("base")?;
        run.add(
            "thinlayer",
            "step",
            0,
            "Pool::layer (record read)",
            ms_since(t),
        );
        let t = Instant::now();
        pool.layer_records()?;
        run.add(
            "thinlayer",
            "step",
            0,
            "Pool::layer_records (all records)",
            ms_since(t),
        );
    }
    // The note sums twice a set_transaction_id round trip into one message.
    run.notes.push(
        "set_transaction_id is timed as a round trip (two messages, two metadata commits)".into(),
    );
    Ok(())
}

fn run_dir(b: &mut Backends) -> PathBuf {
    b.thin.store().pool().layout().root.join("bench-scratch")
}

/// Pool block size: the first 4 KiB write and a trivial container's
/// space on pools of each block size.
fn block_sizes(run: &mut Run, opts: &Options, p: &Params) -> Result<()> {
    run.phase("pool block sizes");
    let sizes = Sizes {
        device: p.device_size,
        thin: p.thin_size,
    };
    for &bs in &p.block_sizes {
        let dir = sys::mkdir(&opts.work.join(format!("bs{}", bs >> 10)))?;
        let mut t = ThinLayer::new("thinlayer", &dir, &sizes, bs)?;
        let r = block_size_one(run, &mut t, p, bs);
        let down = t.teardown();
        r?;
        down?;
    }
    Ok(())
}

fn block_size_one(run: &mut Run, t: &mut ThinLayer, p: &Params, bs: u64) -> Result<()> {
    t.make_layer("base", None, &mut fill_base)?;
    t.make_layer("big", Some("base"), &mut big_file(p.block_file))?;
    for k in 0..p.write_samples.min(2) {
        let c = format!("b{k}");
        t.create(&c, "big")?;
        let dir = t.mount(&c)?;
        sys::drop_caches()?;
        let used1 = t.used_bytes()?;
        let file = dir.join("big");
        let start = Instant::now();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .ctx(|| format!("open {}", file.display()))?;
        f.write_all_at(
            &sys::pattern(3, KIB4),
            (p.block_file / 2) & !(KIB4 as u64 - 1),
        )
        .ctx(|| format!("write {}", file.display()))?;
        f.sync_all().ctx(|| format!("fsync {}", file.display()))?;
        let ms = ms_since(start);
        let used2 = t.used_bytes()?;
        run.add("thinlayer", "block-size", bs, "ms", ms);
        run.add(
            "thinlayer",
            "block-size",
            bs,
            "alloc-bytes",
            used2 as f64 - used1 as f64,
        );
        drop(f);
        t.umount(&c)?;
        t.remove(&c)?;
    }
    let used0 = t.used_bytes()?;
    let n = 5;
    for i in 0..n {
        let c = format!("bt{i}");
        t.create(&c, "base")?;
        let dir = t.mount(&c)?;
        sys::write_synced(&dir.join("hostname"), b"x\n")?;
    }
    let used1 = t.used_bytes()?;
    run.add(
        "thinlayer",
        "block-size",
        bs,
        "trivial-bytes",
        (used1 as f64 - used0 as f64) / f64::from(n),
    );
    for i in 0..n {
        let c = format!("bt{i}");
        t.umount(&c)?;
        t.remove(&c)?;
    }
    Ok(())
}

/// The pair of `--disk`: thinlayer on loop files in ext4 on the disk, and
/// thinlayer on the disk itself (see `src/disk.rs`).
pub(crate) const ON_FILES: &str = "thinlayer-loopfiles";
/// The pool on the disk's slices.
pub(crate) const ON_DISK: &str = "thinlayer-disk";
/// Their workload name in samples.
pub(crate) const PAIR: &str = "loop-vs-disk";

/// Loop files against a disk: the two pools made on `disk`, the pair's
/// workloads run, everything torn down (also on error).
fn loop_vs_disk(run: &mut Run, opts: &Options, p: &Params, disk: &Path) -> Result<()> {
    run.phase(&format!("loop files against the disk {}", disk.display()));
    let largest = p.file_sizes.iter().copied().max().unwrap_or(0);
    let block = 64 << 10;
    // The big layer, its copy-up and the sequential write, four times over.
    let need = 4 * largest + (512 << 20);
    let mut slices = Slices::new(disk, &opts.work.join("disk-fs"), need)?;
    let sizes = Sizes {
        device: slices.data_size(p.device_size, block),
        thin: p.thin_size,
    };
    let fs = slices.fs_dir().to_owned();
    let files = sys::mkdir(&fs.join("files"))
        .and_then(|d| ThinLayer::on_filesystem(ON_FILES, &d, &sizes, block, &slices.fs_name));
    let pair = files.and_then(|files| {
        let devices = thinlayer_pool::DevicePair {
            data: slices.data.clone(),
            metadata: slices.meta.clone(),
            data_size: Some(thinlayer_pool::Bytes(sizes.device)),
            force: true,
        };
        let names = [slices.pool_names[0].as_str(), slices.pool_names[1].as_str()];
        let on_disk = sys::mkdir(&fs.join("disk"))
            .and_then(|d| ThinLayer::on_devices(ON_DISK, &d, &sizes, block, &devices, &names));
        match on_disk {
            Ok(d) => Ok([files, d]),
            Err(e) => {
                let mut files = files;
                let _ = files.teardown();
                Err(e)
            }
        }
    });
    let result = match pair {
        Ok(mut pair) => {
            let r = pair_workloads(run, &mut pair, p, largest);
            let mut down = Ok(());
            for be in &mut pair {
                down = down.and(be.teardown());
            }
            r.and(down)
        }
        Err(e) => Err(e),
    };
    let down = slices.teardown();
    result?;
    down?;
    run.notes.push(format!(
        "loop files against a disk: thinlayer on sparse files in ext4 (default mount options) on a \
         slice of {} against thinlayer on two other slices of it (data and metadata devices); \
         both roots on that ext4; {} MiB file, {} random 4 KiB writes; disk bytes are what \
         reached the slice under the pool (/proc/diskstats). The loop pool's discards punch \
         holes in data.img (the space goes back to the filesystem) but reach the disk only \
         when that filesystem is trimmed (fstrim, or mounted -o discard)",
        disk.display(),
        largest >> 20,
        p.random_writes
    ));
    Ok(())
}

/// The pair's figures, the two pools interleaved sample by sample: start
/// path, first 4 KiB write into a large lower-layer file (and what reached
/// the disk), a cold sequential read of it, random 4 KiB overwrites, a
/// sequential write, and removing the container that holds it (time, and
/// bytes discarded on the disk).
fn pair_workloads(
    run: &mut Run,
    pair: &mut [ThinLayer; 2],
    p: &Params,
    largest: u64,
) -> Result<()> {
    for be in pair.iter_mut() {
        be.make_layer("base", None, &mut fill_base)?;
    }
    for i in 0..p.samples {
        for be in pair.iter_mut() {
            let c = format!("s{i}");
            let t = Instant::now();
            be.create(&c, "base")?;
            let dir = be.mount(&c)?;
            let start = ms_since(t);
            sys::write_synced(&dir.join("new.txt"), &sys::pattern(7, KIB4))?;
            let t = Instant::now();
            be.umount(&c)?;
            be.remove(&c)?;
            let remove = ms_since(t);
            let name = be.name().to_owned();
            run.add(&name, PAIR, 0, "start-ms", start);
            run.add(&name, PAIR, 0, "remove-ms", remove);
        }
    }
    for be in pair.iter_mut() {
        be.make_layer("big", Some("base"), &mut big_file(largest))?;
    }
    let fresh = largest.min(256 << 20);
    let blocks = largest / KIB4 as u64;
    for k in 0..p.write_samples {
        let c = format!("w{k}");
        let mut files = Vec::new();
        for be in pair.iter_mut() {
            be.create(&c, "big")?;
            files.push(be.mount(&c)?.join("big"));
        }
        sys::drop_caches()?;
        for (be, file) in pair.iter_mut().zip(&files) {
            let (n, secs) = read_through(file)?;
            run.add(be.name(), PAIR, 0, "seq-read-MB/s", n as f64 / 1e6 / secs);
        }
        sys::drop_caches()?;
        for (be, file) in pair.iter_mut().zip(&files) {
            let name = be.name().to_owned();
            let f = fs::OpenOptions::new()
                .write(true)
                .open(file)
                .ctx(|| format!("open {}", file.display()))?;
            let dev0 = be.device_bytes_written()?;
            let t = Instant::now();
            f.write_all_at(&sys::pattern(3, KIB4), (largest / 2) & !(KIB4 as u64 - 1))
                .and_then(|()| f.sync_all())
                .ctx(|| format!("write {}", file.display()))?;
            let ms = ms_since(t);
            let dev1 = be.device_bytes_written()?;
            run.add(&name, PAIR, 0, "first-write-ms", ms);
            run.add(
                &name,
                PAIR,
                0,
                "first-write-disk-bytes",
                dev1 as f64 - dev0 as f64,
            );
            let t = Instant::now();
            random_writes(&f, file, blocks, p.random_writes, k as u64)?;
            run.add(&name, PAIR, 0, "random-write-ms", ms_since(t));
        }
        for (be, file) in pair.iter_mut().zip(&files) {
            let name = be.name().to_owned();
            let dir = file.parent().expect("the container's root");
            let into = sys::mkdir(&dir.join("fresh"))?;
            let t = Instant::now();
            big_file(fresh)(&into)?;
            let secs = t.elapsed().as_secs_f64();
            run.add(&name, PAIR, 0, "seq-write-MB/s", fresh as f64 / 1e6 / secs);
            be.umount(&c)?;
            let d0 = be.disk_bytes_discarded()?;
            let t = Instant::now();
            be.remove(&c)?;
            run.add(&name, PAIR, 0, "rm-ms", ms_since(t));
            let d1 = be.disk_bytes_discarded()?;
            run.add(&name, PAIR, 0, "rm-discard-bytes", d1 as f64 - d0 as f64);
        }
    }
    for be in pair.iter_mut() {
        be.remove_layer("big")?;
        be.remove_layer("base")?;
    }
    Ok(())
}

/// `n` 4 KiB writes at xorshift-chosen blocks of the first `blocks` of `f`
/// (seeded by `seed`), then an fsync.
fn random_writes(
    f: &std::fs::File,
    file: &std::path::Path,
    blocks: u64,
    n: usize,
    seed: u64,
) -> Result<()> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    let data = sys::pattern(5, KIB4);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all_at(&data, (x % blocks) * KIB4 as u64)
            .ctx(|| format!("write {}", file.display()))?;
    }
    f.sync_all().ctx(|| format!("fsync {}", file.display()))
}

/// The ext4 layouts the layout workload compares: a label and the mkfs
/// options after `-q -F`. The first is the layout pools were made with
/// before `inline_data` and `-G 4`; the shipped one is
/// [`FsType::mkfs_layout`].
fn layout_candidates() -> Vec<(String, Vec<&'static str>)> {
    const BEFORE: [&str; 4] = [
        "-b",
        "4096",
        "-E",
        "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        BEFORE.iter().chain(extra).copied().collect()
    };
    vec![
        ("before: journal, flex_bg 16".into(), with(&[])),
        ("no journal".into(), with(&["-O", "^has_journal"])),
        ("flex_bg 4 (-G 4)".into(), with(&["-G", "4"])),
        ("no flex_bg".into(), with(&["-O", "^flex_bg"])),
        ("packed_meta_blocks".into(), {
            let mut v = with(&[]);
            v[3] = "nodiscard,lazy_itable_init=1,lazy_journal_init=1,packed_meta_blocks=1";
            v
        }),
        ("inline_data".into(), with(&["-O", "inline_data"])),
        (
            "shipped: inline_data, -G 4".into(),
            FsType::Ext4.mkfs_layout().to_vec(),
        ),
        (
            "inline_data, -G 2".into(),
            with(&["-O", "inline_data", "-G", "2"]),
        ),
        (
            "inline_data, -I 512".into(),
            with(&["-O", "inline_data", "-I", "512"]),
        ),
        (
            "inline_data, no journal".into(),
            with(&["-O", "inline_data,^has_journal"]),
        ),
    ]
}

/// Containers measured per layout candidate.
const LAYOUT_CONTAINERS: u32 = 3;

/// Space per trivial container for each ext4 layout candidate: a fresh
/// thin device formatted with the candidate's options, an image layer of
/// it ([`fill_base`]), then containers (snapshots of the image) that each
/// write three 100-byte files and make one directory in the image's
/// directories, and are trimmed and unmounted as the engine does. The
/// figure is the pool blocks the containers took, per container. Samples:
/// backend = the candidate, workload `layout`, param = its row.
fn layout(run: &mut Run, floor: &mut Floor) -> Result<()> {
    run.phase("ext4 layout: pool blocks per trivial container");
    let block = floor.block_bytes();
    for (row, (label, mkfs)) in layout_candidates().into_iter().enumerate() {
        let base = format!("lb{row}");
        let image = format!("li{row}");
        floor.format_fresh(&base, &mkfs)?;
        floor.make_layer(&image, Some(&base), &mut fill_base)?;
        let used0 = floor.used_bytes()?;
        for i in 0..LAYOUT_CONTAINERS {
            let c = format!("lc{row}-{i}");
            floor.create(&c, &image)?;
            let dir = floor.mount(&c)?;
            for f in ["hostname", "hosts", "resolv.conf"] {
                fs::write(dir.join("usr0").join(f), sys::pattern(7, 100))
                    .ctx(|| format!("write {f} into {}", dir.display()))?;
            }
            sys::mkdir(&dir.join("usr1").join("run"))?;
            thinlayer_pool::space::fitrim(&dir)?;
            floor.umount(&c)?;
        }
        let used1 = floor.used_bytes()?;
        let per = (used1 - used0) as f64 / f64::from(LAYOUT_CONTAINERS);
        run.add(
            &label,
            "layout",
            row as u64,
            "trivial-blocks",
            per / block as f64,
        );
        run.add(&label, "layout", row as u64, "trivial-bytes", per);
        run.notes.push(format!(
            "layout {row}: {label}: mkfs.ext4 {}",
            mkfs.join(" ")
        ));
        for i in 0..LAYOUT_CONTAINERS {
            floor.remove(&format!("lc{row}-{i}"))?;
        }
        floor.remove_layer(&image)?;
        floor.remove_layer(&base)?;
    }
    Ok(())
}

/// `--layout` alone: the layout workload on a floor pool of the engine's
/// default base size (the layout depends on the filesystem's size), torn
/// down also on error.
pub(crate) fn run_layout(opts: &Options, p: &Params) -> Result<Report> {
    let mut run = Run::new(ProgressBar::hidden(), Instant::now());
    let work = &opts.work;
    fresh_dir(work)?;
    let sizes = Sizes {
        device: p.device_size,
        thin: thinlayer_pool::CreateOptions::default().base_size.0,
    };
    let mut floor = Floor::new(&sys::mkdir(&work.join("floor"))?, &sizes, 64 << 10)?;
    let result = layout(&mut run, &mut floor);
    let down = floor.teardown();
    let _ = sys_cleanup(work);
    result?;
    down?;
    run.phase("done");
    Ok(run.report(opts, p, Vec::new(), None))
}

/// The report of a run without the engine workloads (`--skip-common`),
/// for the docker and containerd sections to fill.
pub(crate) fn empty_report(opts: &Options, p: &Params) -> Report {
    Run::new(ProgressBar::hidden(), Instant::now()).report(opts, p, Vec::new(), None)
}

/// `dir`, emptied of what an earlier run left.
fn fresh_dir(dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    sys::mkdir(dir).map(|_| ())
}
