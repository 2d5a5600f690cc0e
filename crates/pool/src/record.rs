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

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, IoContext, Result};

/// The record format this build writes and the newest it reads.
pub const FORMAT: u32 = 1;

const MAGIC: &str = "thinlayer-record";
const TEMP_SUFFIX: &str = ".tmp";

/// Serialises `value` as a record of `kind` at `path`, atomically and durably.
///
/// # Errors
/// I/O errors, with the path.
pub fn write<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<()> {
    let body = serde_json::to_vec_pretty(value).expect("records are plain data: serialisable");
    let header = format!(
        "{MAGIC} {FORMAT} {kind} len={} crc32={:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    );
    let tmp = temp_path(path);
    let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
    f.write_all(header.as_bytes())
        .and_then(|()| f.write_all(&body))
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .ctx(|| format!("write {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).ctx(|| format!("rename {} into place", tmp.display()))?;
    sync_dir(path)
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

/// Creates `dir` (and parents) and fsyncs its parent, so the new directory
/// itself survives a crash.
///
/// # Errors
/// I/O errors.
pub fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).ctx(|| format!("create directory {}", dir.display()))?;
    sync_dir(dir)
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
    fn round_trip_and_no_temp_left() {
        let d = tempdir("rt");
        let p = d.join("x.rec");
        write(&p, "sample", &sample()).unwrap();
        assert_eq!(read::<Sample>(&p, "sample").unwrap(), sample());
        assert_eq!(sweep_temp(&d).unwrap(), 0);
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
