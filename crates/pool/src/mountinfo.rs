//! What is mounted where: `/proc/self/mountinfo`, read through `procfs`'s
//! line parser. The kernel's table is the only truth about mounts; nothing
//! here records or caches it. Mounting and unmounting are in
//! [`crate::mounts`], which (like [`crate::holders`]) reads this.

use std::{fs, path::PathBuf};

use devicemapper::Device;

use crate::error::{IoContext, Result};

/// One line of `/proc/self/mountinfo`, the fields thinlayer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mounted device's number.
    pub device: Device,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The filesystem type.
    pub fstype: String,
    /// Whether the filesystem itself (its superblock, so every mount of
    /// it) is read-only, not just this mount.
    pub read_only: bool,
}

/// Parses mountinfo text, line by line with `procfs`'s parser (its
/// whole-file reader gives up on the first odd line; here lines that do
/// not parse are skipped).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| from_procfs(&procfs::process::MountInfo::from_line(line).ok()?))
        .collect()
}

/// Our entry from `procfs`'s: the device number parsed and the mount point
/// unescaped (procfs keeps mountinfo's `\ooo` escapes).
pub(crate) fn from_procfs(m: &procfs::process::MountInfo) -> Option<MountEntry> {
    let (major, minor) = m.majmin.split_once(':')?;
    Some(MountEntry {
        device: Device {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        },
        mountpoint: PathBuf::from(unescape(m.mount_point.to_str()?)),
        fstype: m.fs_type.clone(),
        read_only: m.super_options.contains_key("ro"),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
36 35 253:4 / /mnt/with\\040space rw,noatime shared:1 - ext4 /dev/dm-4 rw
37 35 253:5 / /mnt/x rw - xfs /dev/dm-5 rw,nouuid
38 35 253:6 / /mnt/t ro,nodev - ext4 /dev/dm-6 ro
39 35 253:6 / /mnt/b rw - ext4 /dev/dm-6 ro
garbage line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 5);
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
        // The superblock's options decide, not the mount's.
        let ro: Vec<bool> = m.iter().map(|e| e.read_only).collect();
        assert_eq!(ro, [false, false, false, true, true]);
    }
}
