//! An overlayfs upper directory written as an OCI layer tar: the changes a
//! process made through an overlay mount, in the form [`crate::apply_layer`]
//! replays onto a copy of the overlay's lower tree.
//!
//! overlayfs keeps in its upper directory exactly what changed: new and
//! copied-up entries as themselves, a deleted lower entry as a whiteout (a
//! character device 0:0), a directory that replaced a lower one as a
//! directory with `trusted.overlay.opaque=y`. Those become `.wh.NAME` and
//! `DIR/.wh..wh..opq` entries; everything else is written with its mode,
//! owner, mtime (with nanoseconds, as PAX `mtime`), size, symlink target or device number. The
//! upper's own root is not written (it stands for the lower's root), nor are
//! extended attributes (overlayfs keeps its bookkeeping there).
//!
//! Only the upper is read, so the cost follows what changed, not the size
//! of the lower tree ([`crate::write_layer`] walks both trees).
//!
//! The order is sorted by name, a directory before its children, so one
//! upper always gives the same bytes. Preconditions: nothing writes in the
//! upper while it is read (the overlay is unmounted). Symlinks are never
//! followed: entries are read with `lstat` and written as what they are.

use std::{
    fs,
    io::Write,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use tar::{Builder, EntryType, Header, HeaderMode};

use crate::error::{IoContext, Result};

/// The xattr overlayfs sets on a directory that hides the lower one.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What [`write_upper`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpperReport {
    /// Entries written, whiteouts and opaque markers included.
    pub entries: u64,
    /// Whiteouts and opaque markers among them.
    pub whiteouts: u64,
}

/// Writes the overlayfs upper directory `upper` to `out` as an
/// uncompressed layer tar (see the module notes).
///
/// Errors: an entry that cannot be listed, stat'ed or read; a write to `out`
/// that fails.
pub fn write_upper(upper: &Path, out: impl Write) -> Result<UpperReport> {
    let mut b = Builder::new(out);
    b.mode(HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut report = UpperReport::default();
    walk(&mut b, upper, Path::new(""), &mut report)?;
    b.into_inner()
        .and_then(|mut w| w.flush())
        .ctx("cannot finish the tar of", upper)?;
    Ok(report)
}

fn walk<W: Write>(
    b: &mut Builder<W>,
    dir: &Path,
    rel: &Path,
    report: &mut UpperReport,
) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .ctx("cannot list", dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .ctx("cannot list", dir)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let meta = fs::symlink_metadata(&path).ctx("cannot stat", &path)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            let mut wh = name.clone();
            wh.clear();
            wh.push(".wh.");
            wh.push(&name);
            empty_entry(b, &rel.with_file_name(wh), &path)?;
            report.whiteouts += 1;
        } else {
            if meta.mtime_nsec() != 0 {
                // The header holds whole seconds; the rest as PAX `mtime`.
                let t = crate::export::format_pax_time(meta.mtime(), meta.mtime_nsec());
                b.append_pax_extensions([("mtime", t.as_bytes())])
                    .ctx("cannot write to the tar", &path)?;
            }
            b.append_path_with_name(&path, &rel)
                .ctx("cannot write to the tar", &path)?;
            if ft.is_dir() {
                if opaque(&path)? {
                    empty_entry(b, &rel.join(".wh..wh..opq"), &path)?;
                    report.whiteouts += 1;
                    report.entries += 1;
                }
                walk(b, &path, &rel, report)?;
            }
        }
        report.entries += 1;
    }
    Ok(())
}

/// Whether directory `path` hides its lower counterpart.
fn opaque(path: &Path) -> Result<bool> {
    match xattr::get(path, OPAQUE_XATTR) {
        Ok(v) => Ok(v.as_deref() == Some(b"y".as_slice())),
        // No user xattrs on this filesystem: nothing is opaque.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTSUP) => Ok(false),
        Err(e) => Err(e).ctx("cannot read the xattrs of", path),
    }
}

/// An empty regular file entry at `rel` (a whiteout or opaque marker) for
/// upper entry `path`.
fn empty_entry<W: Write>(b: &mut Builder<W>, rel: &PathBuf, path: &Path) -> Result<()> {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o600);
    h.set_mtime(0);
    b.append_data(&mut h, rel, std::io::empty())
        .ctx("cannot write to the tar", path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApplyOptions, apply_layer, manifest, tree::tests::Scratch};

    #[test]
    fn an_upper_replayed_onto_its_lower_gives_the_merged_tree() {
        let t = Scratch::new("upper-replay");
        let (lower, upper, merged) = (t.0.join("l"), t.0.join("u"), t.0.join("m"));
        for d in [&lower, &upper, &merged] {
            fs::create_dir(d).unwrap();
        }
        // Both trees' copies of an entry get the same mtime.
        let pin = |path: &Path| {
            let t = nix::sys::time::TimeSpec::new(1_000_000_000, 5);
            let nofollow = nix::sys::stat::UtimensatFlags::NoFollowSymlink;
            nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, nofollow).unwrap();
        };
        // The lower tree, and the same tree as the merged view will be.
        for root in [&lower, &merged] {
            fs::create_dir_all(root.join("etc")).unwrap();
            fs::write(root.join("etc/hosts"), "old").unwrap();
            fs::write(root.join("keep"), "kept").unwrap();
            pin(&root.join("keep"));
        }
        // What a process did through the overlay, in upper and merged.
        for root in [&upper, &merged] {
            fs::create_dir_all(root.join("etc")).unwrap();
            fs::write(root.join("etc/hosts"), "").unwrap();
            fs::create_dir_all(root.join("dev/pts")).unwrap();
            std::os::unix::fs::symlink("/proc/mounts", root.join("etc/mtab")).unwrap();
            fs::write(root.join(".dockerenv"), "").unwrap();
            for p in ["etc/hosts", "etc/mtab", ".dockerenv"] {
                pin(&root.join(p));
            }
        }
        let mut tar = Vec::new();
        let r = write_upper(&upper, &mut tar).unwrap();
        assert_eq!(
            r.entries, 6,
            "etc, etc/hosts, etc/mtab, dev, dev/pts, .dockerenv"
        );
        assert_eq!(r.whiteouts, 0);
        // The same upper gives the same bytes.
        let mut again = Vec::new();
        write_upper(&upper, &mut again).unwrap();
        assert_eq!(tar, again);
        apply_layer(&lower, tar.as_slice(), &ApplyOptions::default()).unwrap();
        let diff = crate::differences(&manifest(&merged).unwrap(), &manifest(&lower).unwrap(), 10);
        assert!(diff.is_empty(), "{diff:?}");
    }

    #[test]
    fn a_whiteout_in_upper_deletes_the_lower_entry() {
        if !nix::unistd::geteuid().is_root() {
            // mknod of a whiteout needs CAP_MKNOD; the VM tests cover the
            // overlay's own whiteouts.
            eprintln!("skipped: needs root");
            return;
        }
        let t = Scratch::new("upper-whiteout");
        let (lower, upper) = (t.0.join("l"), t.0.join("u"));
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::write(lower.join("etc/gone"), "x").unwrap();
        fs::write(lower.join("etc/stays"), "y").unwrap();
        fs::create_dir_all(upper.join("etc")).unwrap();
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .unwrap();
        let mut tar = Vec::new();
        let r = write_upper(&upper, &mut tar).unwrap();
        assert_eq!((r.entries, r.whiteouts), (2, 1));
        apply_layer(&lower, tar.as_slice(), &ApplyOptions::default()).unwrap();
        assert!(!lower.join("etc/gone").exists());
        assert!(lower.join("etc/stays").exists());
    }
}
