//! Mounting thin devices, and finding where a device is mounted, by system
//! calls (no mount(8) processes). Mount state is never recorded: the
//! kernel's `/proc/self/mountinfo` is the truth, read when needed.

use std::{
    fs,
    path::{Path, PathBuf},
};

use devicemapper::Device;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, IoContext, Result};

/// One line of `/proc/self/mountinfo`, the fields thinlayer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mounted device's number.
    pub device: Device,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The filesystem type.
    pub fstype: String,
}

/// Parses mountinfo text. Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let devno = fields.nth(2)?;
            let mountpoint = fields.nth(1)?;
            let (_, after) = line.split_once(" - ")?;
            let fstype = after.split(' ').next()?;
            let (major, minor) = devno.split_once(':')?;
            Some(MountEntry {
                device: Device {
                    major: major.parse().ok()?,
                    minor: minor.parse().ok()?,
                },
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount in this mount namespace.
///
/// # Errors
/// I/O errors reading `/proc/self/mountinfo`.
pub fn all() -> Result<Vec<MountEntry>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo".into())?;
    Ok(parse_mountinfo(&text))
}

/// Where `device` is mounted, innermost last.
///
/// # Errors
/// I/O errors reading mountinfo.
pub fn mountpoints_of(device: Device) -> Result<Vec<PathBuf>> {
    Ok(all()?
        .into_iter()
        .filter(|m| m.device == device)
        .map(|m| m.mountpoint)
        .collect())
}

/// Mounts `devnode` (a filesystem of `fstype`) at `dir` with `options`.
///
/// # Errors
/// [`Error::Io`] with the errno (`EBUSY`, `EINVAL` for a bad filesystem...).
pub fn mount(
    devnode: &Path,
    dir: &Path,
    fstype: &str,
    readonly: bool,
    options: &str,
) -> Result<()> {
    // nodev: device nodes in an image do not open on the host (runtimes
    // mount their own /dev). Not nosuid: a container's setuid programs
    // (su, ping, sudo) must keep working, as on any root filesystem.
    let mut flags = MsFlags::MS_NODEV;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = (!options.is_empty()).then_some(options);
    nix::mount::mount(Some(devnode), dir, Some(fstype), flags, data)
        .map_err(std::io::Error::from)
        .ctx(|| {
            format!(
                "mount {} ({fstype}, {}) at {}",
                devnode.display(),
                if options.is_empty() {
                    "defaults"
                } else {
                    options
                },
                dir.display()
            )
        })
}

/// Unmounts `dir`.
///
/// # Errors
/// [`Error::Busy`] when a process works inside it; other errors as I/O.
pub fn umount(dir: &Path) -> Result<()> {
    match nix::mount::umount2(dir, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => Err(Error::Busy {
            what: dir.display().to_string(),
            detail: crate::holders::describe(
                &crate::holders::under_mount(dir),
                "a process has a file or its working directory under it; \
                 `fuser -vm DIR` names it; stop it and retry",
            ),
        }),
        Err(e) => Err(std::io::Error::from(e)).ctx(|| format!("unmount {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
36 35 253:4 / /mnt/with\\040space rw,noatime shared:1 - ext4 /dev/dm-4 rw
37 35 253:5 / /mnt/x rw - xfs /dev/dm-5 rw,nouuid
garbage line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1].device,
            Device {
                major: 253,
                minor: 4
            }
        );
        assert_eq!(m[1].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[2].fstype, "xfs");
    }

    #[test]
    fn reads_this_hosts_mounts() {
        let all = all().unwrap();
        assert!(all.iter().any(|m| m.mountpoint == Path::new("/")));
    }
}
