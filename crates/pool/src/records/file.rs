//! State records on disk: small JSON documents behind a one-line header that
//! carries the format version, the record kind, the body's length and its
//! CRC32, so a torn, truncated or hand-edited record is caught on load.
//!
//! ```text
//! thinlayer-record 1 layer len=123 crc32=89abcdef
//! { ...json body... }
//! ```
//!
//! Writes are atomic: temp file -> fsync -> rename -> fsync the directory. A
//! crash leaves either the old record or the new one, plus at worst a stale
//! `*.tmp` that [`sweep_temp`] removes. Removing a record that is already
//! gone succeeds, so undo and recovery steps can be replayed.
//!
//! Modes: everything under a root is root's alone. Directories are made
//! [`DIR_MODE`] (0700) and files [`FILE_MODE`] (0600), set explicitly,
//! never left to the process umask (a library user may not set one).
//! [`secure_root`] refuses a root another user owns and tightens one an
//! older version left world-readable.

use std::{
    fs::{self, DirBuilder, File, OpenOptions, Permissions},
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, IoContext, Result};

/// The record format this build writes and the newest it reads.
pub const FORMAT: u32 = 1;

const MAGIC: &str = "thinlayer-record";
const TEMP_SUFFIX: &str = ".tmp";

/// The mode of every directory thinlayer makes under a root.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file thinlayer makes under a root.
pub const FILE_MODE: u32 = 0o600;

/// Serialises `value` as a record of `kind` at `path`, atomically and durably.
///
/// # Errors
/// I/O errors, with the path.
pub fn write<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<()> {
    write_as(path, kind, value, true)
}

/// As [`write`], atomically but not durably (no fsync): for a record of
/// what only lasts until the host stops (mounts and who holds them), which
/// a host crash makes void anyway. A process crash still finds it whole;
/// after a host crash it may be torn or old, and its reader must then take
/// it as empty when nothing it describes is left (see
/// [`read_volatile`]).
///
/// # Errors
/// I/O errors, with the path.
pub fn write_volatile<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<()> {
    write_as(path, kind, value, false)
}

/// Loads a record [`write_volatile`] wrote: a missing one, or a damaged
/// one when `nothing_left` (what it describes is gone, as after a host
/// crash), is the default.
///
/// # Errors
/// As [`read`], for a damaged record while something it describes is
/// still there.
pub fn read_volatile<T: DeserializeOwned + Default>(
    path: &Path,
    kind: &str,
    nothing_left: bool,
) -> Result<T> {
    match read(path, kind) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(T::default())
        }
        Err(Error::Record { reason, .. }) if nothing_left => {
            tracing::info!(path = %path.display(), %reason, "a damaged record of mounts none of which is left: starting empty");
            Ok(T::default())
        }
        other => other,
    }
}

fn write_as<T: Serialize>(path: &Path, kind: &str, value: &T, durable: bool) -> Result<()> {
    let tmp = write_temp(path, kind, value, durable)?;
    fs::rename(&tmp, path).ctx(|| format!("rename {} into place", tmp.display()))?;
    if durable { sync_dir(path) } else { Ok(()) }
}

/// As [`write`], and with a second name, `link`, for the same record
/// (a hard link, made before the record takes its place, in the same
/// directory, so that the one fsync of the directory makes both names
/// durable, and the link first: a journalling filesystem commits the two
/// in that order). `path` is new; an old file at `link` is replaced. On
/// an error neither name is left.
///
/// # Errors
/// I/O errors, with the path.
pub fn write_linked<T: Serialize>(path: &Path, kind: &str, value: &T, link: &Path) -> Result<()> {
    debug_assert_eq!(path.parent(), link.parent(), "one directory, one fsync");
    let tmp = write_temp(path, kind, value, true)?;
    let placed = remove(link)
        .and_then(|()| fs::hard_link(&tmp, link).ctx(|| format!("link {}", link.display())))
        .and_then(|()| {
            crate::fault::point("layer_take.after_link");
            fs::rename(&tmp, path).ctx(|| format!("rename {} into place", tmp.display()))
        })
        .and_then(|()| sync_dir(path));
    if let Err(e) = placed {
        for name in [&tmp, path, link] {
            let _ = fs::remove_file(name);
        }
        return Err(e);
    }
    Ok(())
}

/// Writes `value` as a record of `kind` to `path`'s temp file (fsynced
/// when `durable`), and returns the temp file's path.
fn write_temp<T: Serialize>(path: &Path, kind: &str, value: &T, durable: bool) -> Result<PathBuf> {
    let body = serde_json::to_vec_pretty(value).expect("records are plain data: serialisable");
    let header = format!(
        "{MAGIC} {FORMAT} {kind} len={} crc32={:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    );
    let tmp = temp_path(path);
    let mut f = open_private(&tmp, false)?;
    let written = f
        .write_all(header.as_bytes())
        .and_then(|()| f.write_all(&body))
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| if durable { f.sync_all() } else { Ok(()) });
    drop(f);
    if let Err(e) = written {
        // A full host filesystem: leave no half-written temp behind.
        let _ = fs::remove_file(&tmp);
        return Err(e).ctx(|| format!("write {}", tmp.display()));
    }
    Ok(tmp)
}

/// Loads a record of `kind` from `path`, checking magic, version, kind,
/// length and checksum.
///
/// # Errors
/// [`Error::Record`] when damaged or from a newer thinlayer; I/O errors
/// (including `NotFound`) as [`Error::Io`].
pub fn read<T: DeserializeOwned>(path: &Path, kind: &str) -> Result<T> {
    let bytes = fs::read(path).ctx(|| format!("read {}", path.display()))?;
    let damaged = |reason: String| Error::Record {
        path: path.to_owned(),
        reason,
    };
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| damaged("no header line (empty or truncated)".into()))?;
    let header =
        std::str::from_utf8(&bytes[..nl]).map_err(|_| damaged("header is not text".into()))?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, got_kind, len, crc] = fields[..] else {
        return Err(damaged(format!("malformed header `{header}`")));
    };
    if magic != MAGIC {
        return Err(damaged("not a thinlayer record".into()));
    }
    let version: u32 = version
        .parse()
        .map_err(|_| damaged(format!("bad version `{version}`")))?;
    if version > FORMAT {
        return Err(damaged(format!(
            "written by a newer thinlayer (record format {version}, this build reads up to {FORMAT}); upgrade thinlayer"
        )));
    }
    if got_kind != kind {
        return Err(damaged(format!(
            "is a `{got_kind}` record, expected `{kind}`"
        )));
    }
    let len: usize = len
        .strip_prefix("len=")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| damaged(format!("bad length field `{len}`")))?;
    let crc = crc
        .strip_prefix("crc32=")
        .and_then(|v| u32::from_str_radix(v, 16).ok())
        .ok_or_else(|| damaged(format!("bad checksum field `{crc}`")))?;
    let body = bytes
        .get(nl + 1..nl + 1 + len)
        .ok_or_else(|| damaged(format!("truncated: body shorter than {len} bytes")))?;
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(damaged(format!(
            "checksum mismatch (header {crc:08x}, body {actual:08x}): torn write or edited by hand"
        )));
    }
    serde_json::from_slice(body).map_err(|e| damaged(format!("unreadable body: {e}")))
}

/// Removes the record at `path`; a record already gone is not an error.
///
/// # Errors
/// Other I/O errors.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx(|| format!("remove {}", path.display())),
    }
}

/// Removes temp files a crash left in `dir`; returns how many.
///
/// # Errors
/// I/O errors other than a missing directory.
pub fn sweep_temp(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).ctx(|| format!("list {}", dir.display())),
    };
    let mut swept = 0;
    for entry in entries {
        let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
        if path.to_string_lossy().ends_with(TEMP_SUFFIX) {
            fs::remove_file(&path).ctx(|| format!("remove stale {}", path.display()))?;
            swept += 1;
        }
    }
    Ok(swept)
}

/// Creates `dir` (and parents) [`DIR_MODE`] and fsyncs its parent, so the
/// new directory itself survives a crash. An existing directory keeps its
/// mode ([`secure_root`] tightens a root's).
///
/// # Errors
/// I/O errors.
pub fn create_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .ctx(|| format!("create directory {}", dir.display()))?;
    sync_dir(dir)
}

/// Opens `path` for writing as a [`FILE_MODE`] file: created if missing
/// (`create_new`: only a new one), truncated otherwise, never through a
/// symlink; an existing file's mode is set to [`FILE_MODE`] too.
///
/// # Errors
/// I/O errors; `AlreadyExists` with `create_new`.
pub fn open_private(path: &Path, create_new: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.write(true)
        .mode(FILE_MODE)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits());
    if create_new {
        o.create_new(true);
    } else {
        o.create(true).truncate(true);
    }
    let f = o.open(path).ctx(|| format!("create {}", path.display()))?;
    if !create_new {
        // A file left by an older version (or another umask) keeps its
        // mode on open: set ours.
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .ctx(|| format!("chmod {}", path.display()))?;
    }
    Ok(f)
}

/// What [`secure_root`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tightened {
    /// The root's mode before, when it was looser than [`DIR_MODE`].
    pub root_was: Option<u32>,
    /// Entries under the root whose group/other bits were removed.
    pub entries: usize,
}

/// Checks a root before anything in it is opened: it must belong to this
/// process's user (root), else [`Error::RootOwner`] with the `chown` that
/// fixes it. A root readable or searchable by others (an older version
/// made it 0755) is, with `tighten`, made [`DIR_MODE`] after everything
/// under it lost its group and other bits (files [`FILE_MODE`],
/// directories [`DIR_MODE`]); mounts under it are not entered, symlinks
/// are not followed. Says so once, as a warning; without `tighten` it
/// only warns. A missing root is not an error (nothing to protect yet).
///
/// # Errors
/// [`Error::RootOwner`]; I/O errors.
pub fn secure_root(root: &Path, tighten: bool) -> Result<Tightened> {
    let Some(meta) = check_owner(root)? else {
        return Ok(Tightened::default());
    };
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(Tightened::default());
    }
    if !tighten {
        tracing::warn!(
            "{} is mode {mode:04o}: other users can read the pool; the next thinlayer command that changes something makes it {DIR_MODE:04o}",
            root.display()
        );
        return Ok(Tightened::default());
    }
    let skip: Vec<PathBuf> = crate::mounts::all()
        .map(|m| m.into_iter().map(|e| e.mountpoint).collect())
        .unwrap_or_default();
    let entries = tighten_below(root, meta.dev(), &skip)?;
    fs::set_permissions(root, Permissions::from_mode(DIR_MODE))
        .ctx(|| format!("chmod {}", root.display()))?;
    let under = if entries == 0 {
        String::new()
    } else {
        format!(" and {entries} file(s) and directories under it to owner-only")
    };
    tracing::warn!(
        "tightened {} from {mode:04o} to {DIR_MODE:04o}{under}: other users could read it",
        root.display()
    );
    Ok(Tightened {
        root_was: Some(mode),
        entries,
    })
}

/// Refuses a root that another user than this process's owns (they
/// could swap the pool's files under a root-run thinlayer), with the
/// `chown` that fixes it. Returns the root's metadata; `None` when it does
/// not exist yet.
///
/// # Errors
/// [`Error::RootOwner`]; I/O errors.
pub fn check_owner(root: &Path) -> Result<Option<fs::Metadata>> {
    let meta = match fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("stat {}", root.display())),
    };
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::RootOwner {
            root: root.to_owned(),
            uid: meta.uid(),
            fix: if me == 0 {
                format!("chown -R root: {}", root.display())
            } else {
                format!("chown -R {me} {}", root.display())
            },
        });
    }
    Ok(Some(meta))
}

/// Removes group and other bits from everything under `dir` on device
/// `dev`, skipping symlinks, other filesystems and the mount points in
/// `skip`; returns how many entries changed.
fn tighten_below(dir: &Path, dev: u64, skip: &[PathBuf]) -> Result<usize> {
    let mut changed = 0;
    let entries = fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))?;
    for entry in entries {
        let path = entry.ctx(|| format!("list {}", dir.display()))?.path();
        let Ok(m) = fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = m.file_type();
        let is_dir = ft.is_dir();
        if !(is_dir || ft.is_file()) || m.dev() != dev || skip.contains(&path) {
            continue;
        }
        if is_dir {
            changed += tighten_below(&path, dev, skip)?;
        }
        let mode = m.mode() & 0o7777;
        if mode & 0o077 != 0 {
            let want = if is_dir { DIR_MODE } else { mode & 0o700 };
            fs::set_permissions(&path, Permissions::from_mode(want))
                .ctx(|| format!("chmod {}", path.display()))?;
            changed += 1;
        }
    }
    Ok(changed)
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_SUFFIX);
    PathBuf::from(name)
}

/// fsyncs the directory holding `path`.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    OpenOptions::new()
        .read(true)
        .open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        n: u64,
        #[serde(default)]
        added_later: Option<u32>,
    }

    fn sample() -> Sample {
        Sample {
            name: "layer-1".into(),
            n: 42,
            added_later: None,
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("thinlayer-record-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        create_dir(&d).unwrap();
        d
    }

    #[test]
    fn a_linked_record_has_two_names_and_a_failed_one_leaves_neither() {
        let d = tempdir("linked");
        let (p, link) = (d.join("x.rec"), d.join("3.taken"));
        // A stale second name is replaced.
        fs::write(&link, b"stale").unwrap();
        write_linked(&p, "sample", &sample(), &link).unwrap();
        assert_eq!(read::<Sample>(&link, "sample").unwrap(), sample());
        assert_eq!(
            fs::metadata(&p).unwrap().ino(),
            fs::metadata(&link).unwrap().ino()
        );
        // A second name that cannot be made: no record, no temp left.
        let (q, dir) = (d.join("y.rec"), d.join("4.taken"));
        fs::create_dir(&dir).unwrap();
        assert!(write_linked(&q, "sample", &sample(), &dir).is_err());
        assert!(!q.exists() && dir.is_dir());
        assert_eq!(sweep_temp(&d).unwrap(), 0, "no temp left");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn round_trip_and_no_temp_left() {
        let d = tempdir("rt");
        let p = d.join("x.rec");
        write(&p, "sample", &sample()).unwrap();
        assert_eq!(read::<Sample>(&p, "sample").unwrap(), sample());
        assert_eq!(sweep_temp(&d).unwrap(), 0);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_volatile_record_reads_back_and_a_torn_one_counts_only_when_its_mounts_are_left() {
        let d = tempdir("vol");
        let p = d.join("m.rec");
        let none: std::collections::BTreeMap<String, u64> =
            read_volatile(&p, "mounts", false).unwrap();
        assert!(none.is_empty(), "missing: empty");
        let refs = std::collections::BTreeMap::from([("a".to_owned(), 2u64)]);
        write_volatile(&p, "mounts", &refs).unwrap();
        assert_eq!(
            read_volatile::<std::collections::BTreeMap<String, u64>>(&p, "mounts", false).unwrap(),
            refs
        );
        assert_eq!(sweep_temp(&d).unwrap(), 0);
        // Torn, as a host crash may leave it.
        let whole = fs::read(&p).unwrap();
        fs::write(&p, &whole[..whole.len() / 2]).unwrap();
        let after_crash: std::collections::BTreeMap<String, u64> =
            read_volatile(&p, "mounts", true).unwrap();
        assert!(after_crash.is_empty(), "nothing mounted: starts empty");
        assert!(
            matches!(
                read_volatile::<std::collections::BTreeMap<String, u64>>(&p, "mounts", false),
                Err(Error::Record { .. })
            ),
            "mounts still there: the damage is reported"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn damage_is_caught() {
        let d = tempdir("dmg");
        let p = d.join("x.rec");
        write(&p, "sample", &sample()).unwrap();
        let good = fs::read(&p).unwrap();

        // A flipped bit in the body.
        let mut flipped = good.clone();
        let i = flipped.iter().position(|&b| b == b'4').unwrap();
        flipped[i] = b'5';
        fs::write(&p, &flipped).unwrap();
        let e = read::<Sample>(&p, "sample").unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");

        // A torn (truncated) write.
        fs::write(&p, &good[..good.len() / 2]).unwrap();
        let e = read::<Sample>(&p, "sample").unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");

        // An empty file.
        fs::write(&p, b"").unwrap();
        assert!(matches!(
            read::<Sample>(&p, "sample"),
            Err(Error::Record { .. })
        ));

        // The wrong kind.
        fs::write(&p, &good).unwrap();
        let e = read::<Sample>(&p, "pool").unwrap_err();
        assert!(e.to_string().contains("expected `pool`"), "{e}");

        // From the future.
        let future = String::from_utf8(good)
            .unwrap()
            .replacen(" 1 sample", " 9 sample", 1);
        fs::write(&p, future).unwrap();
        let e = read::<Sample>(&p, "sample").unwrap_err();
        assert!(e.to_string().contains("upgrade thinlayer"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn old_records_without_new_fields_load() {
        #[derive(Serialize)]
        struct Old {
            name: String,
            n: u64,
        }
        let d = tempdir("old");
        let p = d.join("x.rec");
        write(
            &p,
            "sample",
            &Old {
                name: "layer-1".into(),
                n: 42,
            },
        )
        .unwrap();
        assert_eq!(read::<Sample>(&p, "sample").unwrap(), sample());
        fs::remove_dir_all(d).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn records_and_directories_are_owner_only_whatever_the_umask() {
        let d = tempdir("modes");
        // A loose umask, as a library user may have; restored after.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
        let sub = d.join("a/b");
        create_dir(&sub).unwrap();
        let p = sub.join("x.rec");
        write(&p, "sample", &sample()).unwrap();
        // A record an older version left 0644 is 0600 once rewritten.
        fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        write(&p, "sample", &sample()).unwrap();
        let f = d.join("data.img");
        drop(open_private(&f, true).unwrap());
        nix::sys::stat::umask(old);
        assert_eq!(mode(&d.join("a")), 0o700);
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&f), 0o600);
        assert!(
            open_private(&f, true).is_err(),
            "create_new never reuses a file"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_loose_root_is_tightened_once_with_everything_under_it() {
        let d = tempdir("tighten");
        let root = d.join("root");
        fs::create_dir_all(root.join("layers")).unwrap();
        fs::write(root.join("pool.rec"), b"x").unwrap();
        fs::write(root.join("layers/l.rec"), b"x").unwrap();
        let outside = d.join("outside");
        fs::write(&outside, b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        for (p, m) in [
            (root.clone(), 0o755),
            (root.join("layers"), 0o755),
            (root.join("pool.rec"), 0o644),
            (root.join("layers/l.rec"), 0o640),
            (outside.clone(), 0o644),
        ] {
            fs::set_permissions(&p, Permissions::from_mode(m)).unwrap();
        }
        // Without `tighten` (a shared open) nothing changes.
        assert_eq!(secure_root(&root, false).unwrap(), Tightened::default());
        assert_eq!(mode(&root), 0o755);
        let t = secure_root(&root, true).unwrap();
        assert_eq!(
            t,
            Tightened {
                root_was: Some(0o755),
                entries: 3
            }
        );
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("layers")), 0o700);
        assert_eq!(mode(&root.join("pool.rec")), 0o600);
        assert_eq!(mode(&root.join("layers/l.rec")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a symlink is never followed");
        // Once: the next open finds nothing to do.
        assert_eq!(secure_root(&root, true).unwrap(), Tightened::default());
        // A root that does not exist yet is nothing to protect.
        assert!(secure_root(&d.join("missing"), true).is_ok());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_root_another_user_owns_is_refused_with_the_chown_that_fixes_it() {
        // `/` is root's: refused unless these tests run as root.
        let me = nix::unistd::geteuid().as_raw();
        match check_owner(Path::new("/")) {
            Ok(_) => assert_eq!(me, 0),
            Err(e) => {
                assert_ne!(me, 0);
                assert!(matches!(e, Error::RootOwner { uid: 0, .. }), "{e}");
                assert!(e.to_string().contains(&format!("chown -R {me} /")), "{e}");
            }
        }
        let d = tempdir("owner");
        assert!(check_owner(&d).unwrap().is_some(), "our own directory");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn remove_is_idempotent_and_sweep_finds_temps() {
        let d = tempdir("rm");
        let p = d.join("x.rec");
        write(&p, "sample", &sample()).unwrap();
        remove(&p).unwrap();
        remove(&p).unwrap();
        fs::write(d.join("y.rec.tmp"), b"half").unwrap();
        assert_eq!(sweep_temp(&d).unwrap(), 1);
        assert_eq!(sweep_temp(&d.join("missing")).unwrap(), 0);
        fs::remove_dir_all(d).unwrap();
    }
}
