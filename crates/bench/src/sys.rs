//! Small system helpers the benchmark reads its figures with: mounts,
//! loop devices, `/proc/diskstats`, `/proc/meminfo`, `statvfs`, syncs and
//! cache drops, and tools run as processes (mkfs, modprobe).

use std::{
    fs,
    io::Write,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nix::mount::{MntFlags, MsFlags};
use thinlayer_pool::load::CpuTicks;

use crate::error::{Error, IoContext, Result};

pub use thinlayer_pool::timing::ms_since;

/// Mounts `source` (of `fstype`) at `dir` with `data` options.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn mount(source: &Path, dir: &Path, fstype: &str, data: &str) -> Result<()> {
    let data = (!data.is_empty()).then_some(data);
    nix::mount::mount(Some(source), dir, Some(fstype), MsFlags::empty(), data)
        .map_err(std::io::Error::from)
        .ctx(|| format!("mount {} ({fstype}) at {}", source.display(), dir.display()))
}

/// Unmounts `dir`.
///
/// # Errors
/// [`Error::Io`] with the errno.
pub fn umount(dir: &Path) -> Result<()> {
    nix::mount::umount2(dir, MntFlags::empty())
        .map_err(std::io::Error::from)
        .ctx(|| format!("unmount {}", dir.display()))
}

/// Flushes the filesystem holding `path` (syncfs).
///
/// # Errors
/// [`Error::Io`].
pub fn syncfs(path: &Path) -> Result<()> {
    let f = fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    nix::unistd::syncfs(&f)
        .map_err(std::io::Error::from)
        .ctx(|| format!("syncfs {}", path.display()))
}

/// The machine's CPU time so far.
fn ticks() -> Result<CpuTicks> {
    CpuTicks::now().ok_or_else(|| Error::Parse("/proc/stat is unreadable".into()))
}

/// Writes dirty pages everywhere and drops the page cache, dentries and
/// inodes, for cold figures.
///
/// # Errors
/// [`Error::Io`].
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").ctx(|| "drop caches".into())
}

/// Waits until the machine is quiet: over a window of `window`, at most
/// `busy` (0 to 1) of all CPUs' time spent on anything (I/O waits count,
/// as work in flight), or until `limit` has passed. What a daemon left to
/// do in the background after it answered then falls on no later timed
/// call, its own or another's. Returns how long it waited.
///
/// # Errors
/// `/proc/stat` unreadable.
pub fn quiet(window: Duration, busy: f64, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let t0 = ticks()?;
        std::thread::sleep(window);
        if t0.busy_until(&ticks()?) <= busy || start.elapsed() >= limit {
            return Ok(start.elapsed());
        }
    }
}

/// `Cached:` of `/proc/meminfo`, in bytes.
///
/// # Errors
/// [`Error::Io`], [`Error::Parse`].
pub fn meminfo_cached() -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").ctx(|| "read /proc/meminfo".into())?;
    text.lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| Error::Parse("no Cached: line in /proc/meminfo".into()))
}

/// Sectors written to block device `name` (e.g. `loop3`), from
/// `/proc/diskstats` (the tenth field).
///
/// # Errors
/// [`Error::Io`], [`Error::Parse`] when the device is not listed.
pub fn sectors_written(name: &str) -> Result<u64> {
    let text = fs::read_to_string("/proc/diskstats").ctx(|| "read /proc/diskstats".into())?;
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[2] == name)
        .and_then(|f| f[9].parse().ok())
        .ok_or_else(|| Error::Parse(format!("{name} is not in /proc/diskstats")))
}

/// Sectors discarded on block device `name`, from `/proc/diskstats` (the
/// seventeenth field; 0 on a kernel older than 4.18, which lacks it).
///
/// # Errors
/// [`Error::Io`], [`Error::Parse`] when the device is not listed.
pub fn sectors_discarded(name: &str) -> Result<u64> {
    let text = fs::read_to_string("/proc/diskstats").ctx(|| "read /proc/diskstats".into())?;
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[2] == name)
        .map(|f| f.get(16).and_then(|v| v.parse().ok()).unwrap_or(0))
        .ok_or_else(|| Error::Parse(format!("{name} is not in /proc/diskstats")))
}

/// The loop device (`loopN`) whose backing file is `file`.
///
/// # Errors
/// [`Error::Parse`] when no loop device backs onto it.
pub fn loop_of(file: &Path) -> Result<String> {
    let want = fs::canonicalize(file).ctx(|| format!("resolve {}", file.display()))?;
    for e in fs::read_dir("/sys/block").ctx(|| "list /sys/block".into())? {
        let e = e.ctx(|| "list /sys/block".into())?;
        if let Ok(f) = fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(f.trim()) == want {
                return Ok(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    Err(Error::Parse(format!(
        "no loop device backs {}",
        file.display()
    )))
}

/// Bytes `statvfs` says are in use on the filesystem holding `path`.
///
/// # Errors
/// [`Error::Io`].
pub fn fs_used(path: &Path) -> Result<u64> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(std::io::Error::from)
        .ctx(|| format!("statvfs {}", path.display()))?;
    Ok((s.blocks() - s.blocks_free()) * s.fragment_size())
}

/// Bytes allocated to a (sparse) file on the host: `st_blocks * 512`.
///
/// # Errors
/// [`Error::Io`].
pub fn allocated(file: &Path) -> Result<u64> {
    Ok(fs::metadata(file)
        .ctx(|| format!("stat {}", file.display()))?
        .blocks()
        * 512)
}

/// Bytes allocated under `dir`, recursively (`du`): what an overlay upper
/// directory holds.
///
/// # Errors
/// [`Error::Io`].
pub fn du(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))? {
        let p = e.ctx(|| format!("list {}", dir.display()))?.path();
        let m = fs::symlink_metadata(&p).ctx(|| format!("stat {}", p.display()))?;
        total += m.blocks() * 512;
        if m.is_dir() {
            total += du(&p)?;
        }
    }
    Ok(total)
}

/// Makes a sparse file of `size` bytes (replacing any old one).
///
/// # Errors
/// [`Error::Io`].
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let _ = fs::remove_file(path);
    let f = fs::File::create(path).ctx(|| format!("create {}", path.display()))?;
    f.set_len(size).ctx(|| format!("size {}", path.display()))
}

/// Runs `program args...`, failing with its stderr.
///
/// # Errors
/// [`Error::Tool`].
pub fn tool(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::Tool {
            command: format!("{program} {}", args.join(" ")),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Tool {
            command: format!("{program} {}", args.join(" ")),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Writes `data` to a new file at `path` and fsyncs it.
///
/// # Errors
/// [`Error::Io`].
pub fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).ctx(|| format!("create {}", path.display()))?;
    f.write_all(data)
        .ctx(|| format!("write {}", path.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", path.display()))
}

/// Deterministic, incompressible-looking bytes (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Copies the tree at `from` into `to` (created): directories, regular
/// files (`copy_file_range`, which XFS may turn into a clone), symlinks,
/// and device nodes (overlayfs whiteouts).
///
/// # Errors
/// [`Error::Io`].
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).ctx(|| format!("create {}", to.display()))?;
    for e in fs::read_dir(from).ctx(|| format!("list {}", from.display()))? {
        let e = e.ctx(|| format!("list {}", from.display()))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let m = fs::symlink_metadata(&src).ctx(|| format!("stat {}", src.display()))?;
        let t = m.file_type();
        if t.is_dir() {
            copy_tree(&src, &dst)?;
        } else if t.is_symlink() {
            let target = fs::read_link(&src).ctx(|| format!("read {}", src.display()))?;
            std::os::unix::fs::symlink(target, &dst)
                .ctx(|| format!("symlink {}", dst.display()))?;
        } else if t.is_char_device() || t.is_block_device() {
            let kind = if t.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else {
                nix::sys::stat::SFlag::S_IFBLK
            };
            nix::sys::stat::mknod(
                &dst,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(m.mode()),
                m.rdev(),
            )
            .map_err(std::io::Error::from)
            .ctx(|| format!("mknod {}", dst.display()))?;
        } else if t.is_file() {
            fs::copy(&src, &dst).ctx(|| format!("copy {}", src.display()))?;
        }
    }
    Ok(())
}

/// Creates `dir` and its parents.
///
/// # Errors
/// [`Error::Io`].
pub fn mkdir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Copies the daemons' logs (`*.log`) found in `from` and its
/// subdirectories, at most two levels down, into `to` (made), flattened
/// to `sub_dir_name.log`, so that a run's scratch can be removed and its
/// logs still read. Best effort: a log that cannot be copied is skipped.
pub fn keep_logs(from: &Path, to: &Path) {
    fn walk(dir: &Path, prefix: &str, depth: u8, to: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() && depth > 0 {
                walk(&e.path(), &format!("{prefix}{name}_"), depth - 1, to);
            } else if kind.is_file() && name.ends_with(".log") && fs::create_dir_all(to).is_ok() {
                let _ = fs::copy(e.path(), to.join(format!("{prefix}{name}")));
            }
        }
    }
    walk(from, "", 2, to);
}
