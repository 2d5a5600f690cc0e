//! The one place thinlayer runs other programs: filesystem makers and the
//! thin-provisioning tools. The kernel itself is never driven through a
//! program (no dmsetup): see [`crate::kernel`].
//!
//! Each tool is looked up on PATH and in the sbin directories before it is
//! needed, so a missing tool fails before anything is changed, with the
//! Debian package that has it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use crate::error::{Error, Result};

/// A program thinlayer may run, with the Debian package that provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `mkfs.ext4`.
    MkfsExt4,
    /// `mkfs.xfs`.
    MkfsXfs,
    /// `thin_check`.
    ThinCheck,
    /// `thin_dump`: the thin ids and transaction id in pool metadata.
    ThinDump,
    /// `thin_repair`: rebuilds damaged pool metadata into a fresh device.
    ThinRepair,
}

impl Tool {
    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            Tool::MkfsExt4 => "mkfs.ext4",
            Tool::MkfsXfs => "mkfs.xfs",
            Tool::ThinCheck => "thin_check",
            Tool::ThinDump => "thin_dump",
            Tool::ThinRepair => "thin_repair",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Tool::MkfsExt4 => "e2fsprogs",
            Tool::MkfsXfs => "xfsprogs",
            Tool::ThinCheck | Tool::ThinDump | Tool::ThinRepair => "thin-provisioning-tools",
        }
    }

    /// The program's full path.
    ///
    /// # Errors
    /// [`Error::ToolMissing`] naming the package to install.
    pub fn find(self) -> Result<PathBuf> {
        let name = self.program();
        let path = env::var_os("PATH").unwrap_or_default();
        env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
            .ok_or_else(|| Error::ToolMissing {
                tool: name.to_owned(),
                package: self.package().to_owned(),
            })
    }

    /// Runs the tool with `args`; its output is returned on success.
    ///
    /// # Errors
    /// [`Error::ToolMissing`], or [`Error::Tool`] with the tail of stderr.
    pub fn run<S: AsRef<std::ffi::OsStr>>(self, args: &[S]) -> Result<String> {
        let program = self.find()?;
        let mut command = Command::new(&program);
        command.args(args);
        tracing::debug!(?command, "running");
        let out = command.output().map_err(|e| Error::Tool {
            command: describe(&program, args),
            status: "could not start".into(),
            stderr: e.to_string(),
        })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        Err(Error::Tool {
            command: describe(&program, args),
            status: out.status.to_string(),
            stderr: tail(&text, 800),
        })
    }
}

fn describe<S: AsRef<std::ffi::OsStr>>(program: &Path, args: &[S]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

fn tail(text: &str, max: usize) -> String {
    let t = text.trim();
    if t.len() <= max {
        return t.to_owned();
    }
    let mut start = t.len() - max;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &t[start..])
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("  short  ", 10), "short");
        let long = format!("{}é{}", "a".repeat(20), "end");
        let t = tail(&long, 5);
        assert!(t.ends_with("end") && t.starts_with("..."), "{t}");
    }

    #[test]
    fn missing_tool_names_its_package() {
        // The check is only meaningful where the tool is absent.
        if Tool::ThinCheck.find().is_err() {
            let e = Tool::ThinCheck.run(&["-V"]).unwrap_err();
            assert!(e.to_string().contains("thin-provisioning-tools"), "{e}");
        }
        assert_eq!(Tool::MkfsXfs.package(), "xfsprogs");
    }
}
