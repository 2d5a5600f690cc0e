//! CLI contracts every verb keeps, as macros applied verb by verb
//! (`tests/cli.rs`): `--help` answers and exits 0, an unknown option is a
//! usage error (exit 2), and a verb that manages devices refuses a caller
//! who is not root (exit 5) before it touches anything.
//!
//! They hold on any host, with or without device-mapper, and never pass
//! vacuously: run as root, the not-root contract runs the verb as `nobody`;
//! run as another user, as that user.

#![allow(unused_macros)] // each test binary applies the contracts it needs

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::{Command, Output},
};

use super::{NOBODY, Scratch};

/// `thinlayer --help`-style contract: `thinlayer VERB... --help` exits 0
/// with the verb's usage on stdout and creates nothing.
macro_rules! test_accepts_help {
    ($($verb:literal),+) => {
        #[test]
        fn accepts_help() {
            $crate::common::contract::accepts_help(&[$($verb),+]);
        }
    };
}

/// `thinlayer VERB... --no-such-option` is a usage error (exit 2) naming
/// the option, and creates nothing.
macro_rules! test_rejects_bad_option {
    ($($verb:literal),+) => {
        #[test]
        fn rejects_bad_option() {
            $crate::common::contract::rejects_bad_option(&[$($verb),+]);
        }
    };
}

/// `thinlayer VERB... ARGS...` (well-formed) run by a user who is not root
/// fails with exit 5 and says it must run as root, in text and in `--json`.
macro_rules! test_requires_root {
    ($($arg:literal),+ $(,)?) => {
        #[test]
        fn requires_root() {
            $crate::common::contract::requires_root(&[$($arg),+]);
        }
    };
}

/// The three contracts for each verb, one module a verb:
/// `name: [VERB...] [ARGS...];` (ARGS: what makes the call well-formed).
/// `name: [VERB...] user;` leaves out the root contract (a verb that does
/// not manage devices itself).
macro_rules! verb_contracts {
    ($($name:ident: [$($verb:literal),+] [$($arg:literal),*];)+) => {
        $(
            mod $name {
                test_accepts_help!($($verb),+);
                test_rejects_bad_option!($($verb),+);
                test_requires_root!($($verb,)+ $($arg),*);
            }
        )+
    };
    ($($name:ident: [$($verb:literal),+] user;)+) => {
        $(
            mod $name {
                test_accepts_help!($($verb),+);
                test_rejects_bad_option!($($verb),+);
            }
        )+
    };
}

/// A scratch root named for the contract and the verb.
fn scratch(contract: &str, verb: &[&str]) -> Scratch {
    Scratch::new(&format!("cli-{contract}-{}", verb.join("-")))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// See [`test_accepts_help!`].
pub fn accepts_help(verb: &[&str]) {
    let s = scratch("help", verb);
    let mut args = verb.to_vec();
    args.push("--help");
    let out = s.run(&args);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        text(&out.stderr)
    );
    let usage = format!("Usage: thinlayer {}", verb.join(" "));
    assert!(
        stdout.contains(&usage),
        "{args:?} lacks `{usage}`: {stdout}"
    );
    assert!(!s.root.exists(), "{args:?} created {}", s.root.display());
}

/// See [`test_rejects_bad_option!`].
pub fn rejects_bad_option(verb: &[&str]) {
    let s = scratch("badopt", verb);
    let mut args = verb.to_vec();
    args.push("--no-such-option");
    s.fails(&args, 2, "unexpected argument '--no-such-option'");
    assert!(!s.root.exists(), "{args:?} created {}", s.root.display());
}

/// See [`test_requires_root!`].
pub fn requires_root(args: &[&str]) {
    let s = scratch("root", args);
    let run = |json: bool| -> Output {
        let mut c = Command::new(unprivileged_bin());
        if json {
            c.arg("--json");
        }
        c.arg("--root").arg(&s.root).args(args);
        if nix::unistd::geteuid().is_root() {
            c.uid(NOBODY).gid(NOBODY);
        }
        c.output().expect("run thinlayer")
    };
    let out = run(false);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
    assert!(stderr.contains("must run as root"), "{args:?}: {stderr}");
    let out = run(true);
    let err: serde_json::Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|e| panic!("{args:?} --json: {e}: {}", text(&out.stderr)));
    assert_eq!(err["exit_code"], 5, "{args:?}: {err}");
    assert!(!s.root.exists(), "{args:?} created {}", s.root.display());
}

/// The built binary where any user can run it: a 0755 copy in the temp
/// directory when the tests run as root (the build tree may be private).
fn unprivileged_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return super::bin().to_owned();
        }
        let dir = std::env::temp_dir();
        // One copy, replaced whole by each run, so runs leave no trail.
        let copy = dir.join("thinlayer-nobody");
        let tmp = dir.join(format!("thinlayer-nobody.{}", std::process::id()));
        std::fs::copy(super::bin(), &tmp).expect("copy thinlayer");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &copy).unwrap();
        copy.to_string_lossy().into_owned()
    })
}
