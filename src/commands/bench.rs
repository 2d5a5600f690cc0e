//! `thinlayer bench ...`: runs the `thinlayer-bench` program (crates/bench)
//! with the same arguments, so this binary links no benchmark or plotting
//! code. It is looked for next to this executable first (where `cargo
//! build` puts both), then on PATH. What must never happen: a silent
//! fallback, or a missing program reported as a failed run.

use std::{
    convert::Infallible, ffi::OsString, fmt, os::unix::process::CommandExt, path::PathBuf,
    process::Command,
};

/// The benchmark program's name.
pub(crate) const PROGRAM: &str = "thinlayer-bench";

/// `thinlayer-bench` is neither next to `thinlayer` nor on PATH (exit 5:
/// the host lacks a tool).
#[derive(Debug)]
pub(crate) struct BenchMissing {
    /// Where it was looked for first.
    next_to: Option<PathBuf>,
}

impl fmt::Display for BenchMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{PROGRAM}` is not installed: ")?;
        if let Some(p) = &self.next_to {
            write!(f, "not at {} and ", p.display())?;
        }
        write!(
            f,
            "not on PATH; build it with `cargo build -p thinlayer-bench` \
             (`--release` next to a release thinlayer) or install it with \
             `cargo install --path crates/bench`"
        )
    }
}

impl std::error::Error for BenchMissing {}

#[cfg(test)]
impl BenchMissing {
    /// One, for the exit-code tests.
    pub(crate) fn for_test() -> BenchMissing {
        BenchMissing { next_to: None }
    }
}

/// Replaces this process with `thinlayer-bench ARGS...` (`--json` and
/// `-v` passed on from the global flags). Returns only on failure.
///
/// # Errors
/// [`BenchMissing`] when the program is not found; the I/O error of an
/// exec that failed otherwise.
pub(crate) fn run(args: Vec<OsString>, json: bool, verbose: u8) -> anyhow::Result<Infallible> {
    let next_to = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(PROGRAM)));
    let program = match &next_to {
        Some(p) if p.is_file() => p.clone().into_os_string(),
        _ => PROGRAM.into(),
    };
    let mut cmd = Command::new(&program);
    if json {
        cmd.arg("--json");
    }
    for _ in 0..verbose {
        cmd.arg("-v");
    }
    let e = cmd.args(args).exec();
    if e.kind() == std::io::ErrorKind::NotFound {
        return Err(BenchMissing { next_to }.into());
    }
    Err(anyhow::Error::new(e).context(format!("run {}", program.to_string_lossy())))
}
