//! Who holds a device or a mount: the answer none of the anchors gives
//! when a removal fails with "device or resource busy".
//!
//! Scans `/proc` through the `procfs` crate: every process whose open
//! files include the device node, whose working directory, root or open
//! files lie under a mount point, and every mount namespace (other than
//! ours) that mounts the device. A process that vanishes during the scan
//! (any of its reads fails) is skipped.

use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use devicemapper::Device;
use procfs::process::{FDTarget, Process};

use crate::mountinfo;

/// One holder of a device or mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub command: String,
    /// How it holds the thing.
    pub how: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}) {}", self.pid, self.command, self.how)
    }
}

/// Every process but this one, by pid; one that vanished is left out.
fn processes() -> Vec<(u32, Process)> {
    let me = std::process::id();
    let mut out: Vec<(u32, Process)> = procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| Some((u32::try_from(p.pid()).ok()?, p)))
        .filter(|(pid, _)| *pid != me)
        .collect();
    out.sort_unstable_by_key(|(pid, _)| *pid);
    out
}

fn comm(p: &Process) -> String {
    p.stat().map_or_else(|_| "?".into(), |s| s.comm)
}

/// The paths `p` has open, with their fd numbers (sockets, pipes and the
/// like left out).
fn open_paths(p: &Process) -> Vec<(i32, PathBuf)> {
    p.fd()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| match fd.target {
            FDTarget::Path(path) => Some((fd.fd, path)),
            _ => None,
        })
        .collect()
}

fn rdev_of(path: &Path) -> Option<Device> {
    let m = fs::metadata(path).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let rdev = m.rdev();
    Some(Device {
        major: nix::sys::stat::major(rdev).try_into().ok()?,
        minor: nix::sys::stat::minor(rdev).try_into().ok()?,
    })
}

/// Processes with `device` open, and other mount namespaces mounting it.
pub fn of_device(device: Device) -> Vec<Holder> {
    let own_ns = fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen_ns = Vec::new();
    let mut out = Vec::new();
    for (pid, p) in processes() {
        if let Some((fd, _)) = open_paths(&p)
            .into_iter()
            .find(|(_, t)| rdev_of(t) == Some(device))
        {
            out.push(Holder {
                pid,
                command: comm(&p),
                how: format!("has the device open (fd {fd})"),
            });
        }
        // The namespace's link only (`procfs`'s `namespaces()` stats every
        // namespace of the process).
        let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if Some(&ns) == own_ns.as_ref() || seen_ns.contains(&ns) {
            continue;
        }
        seen_ns.push(ns.clone());
        let Ok(mounts) = p.mountinfo() else {
            continue;
        };
        for m in mounts.iter().filter_map(mountinfo::from_procfs) {
            if m.device == device {
                out.push(Holder {
                    pid,
                    command: comm(&p),
                    how: format!(
                        "is in mount namespace {} which mounts it at {}",
                        ns.display(),
                        m.mountpoint.display()
                    ),
                });
            }
        }
    }
    out
}

/// Processes whose working directory, root or open files lie under `dir`.
pub fn under_mount(dir: &Path) -> Vec<Holder> {
    let inside = |p: &PathBuf| p.starts_with(dir);
    let mut out = Vec::new();
    for (pid, p) in processes() {
        let how = if p.cwd().is_ok_and(|c| inside(&c)) {
            Some("has its working directory there".to_owned())
        } else if p.root().is_ok_and(|r| r != Path::new("/") && inside(&r)) {
            Some("has its root there".to_owned())
        } else {
            open_paths(&p)
                .into_iter()
                .find_map(|(_, t)| inside(&t).then(|| format!("has {} open", t.display())))
        };
        if let Some(how) = how {
            out.push(Holder {
                pid,
                command: comm(&p),
                how,
            });
        }
    }
    out
}

/// A sentence listing `holders`, or the generic advice when none is found.
pub fn describe(holders: &[Holder], fallback: &str) -> String {
    if holders.is_empty() {
        return fallback.to_owned();
    }
    let list: Vec<String> = holders.iter().map(ToString::to_string).collect();
    format!(
        "held by {}; stop those processes and retry",
        list.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_child_working_in_a_directory() {
        let dir = std::env::temp_dir().join(format!("thinlayer-holders-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&dir)
            .spawn()
            .unwrap();
        // The child's cwd is set before exec; give /proc a moment.
        let mut found = Vec::new();
        for _ in 0..50 {
            found = under_mount(&dir);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            found
                .iter()
                .any(|h| h.pid == child.id() && h.how.contains("working directory")),
            "{found:?}"
        );
        assert!(describe(&found, "x").contains(&format!("pid {}", child.id())));
        assert_eq!(describe(&[], "nobody"), "nobody");
    }
}
