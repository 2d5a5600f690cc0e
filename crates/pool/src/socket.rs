//! The Unix sockets the servers (`serve containerd`, `serve docker-volume`)
//! listen on, bound so that no other local user can reach the pool through
//! them.
//!
//! - The socket's directory is root's, 0700 (0750 and group GROUP with
//!   `--socket-group GROUP`); a looser one is tightened, one another user
//!   owns or every user may write (`/tmp`) is refused.
//! - The socket is bound under umask 077 at a temporary name beside its
//!   path, set 0600 (0660, group GROUP), then renamed onto its path (never
//!   over anything there): it is never wider than that, not even for an
//!   instant, and a client that waits for the path finds it as it stays.
//! - What is at the socket path is removed only when it is a socket and no
//!   server answers on it (connect fails with `ECONNREFUSED`). A regular
//!   file, a directory or a symlink there is never deleted: the bind fails
//!   with [`Error::Busy`] (exit code 4), as it does when a live server
//!   answers.
//! - Each accepted connection's peer (`SO_PEERCRED`) is checked by
//!   [`Access::admit`]: root, or a member of GROUP (its gid, or a
//!   supplementary group from `/proc/PID/status`); anyone else is closed at
//!   once, logged with uid and pid.
//! - Both servers stop the same way on SIGTERM and SIGINT
//!   ([`stop_signals`]), installed before the socket is bound, so from the
//!   moment the socket exists a signal is a graceful stop (the socket file
//!   removed), never the default instant death.

use std::{
    fs, io,
    os::{
        fd::AsFd,
        unix::{
            fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{AT_FDCWD, RenameFlags, renameat2},
    sys::{
        resource::{Resource, getrlimit, setrlimit},
        socket::{getsockopt, sockopt::PeerCredentials},
        stat::{Mode, umask},
    },
    unistd::{Gid, Group, Uid, chown},
};

use crate::error::{Error, IoContext, Result};

/// Who may connect to a server's socket: root, and the members of `group`
/// when one is configured (`--socket-group`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// The group granted access, if any.
    pub group: Option<Gid>,
}

/// The credentials the kernel recorded for a connection's peer when it
/// connected (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its process id (0 when it is in a pid namespace we cannot see).
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

impl Access {
    /// Root only, or root and `group` (a group name, or a numeric gid).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a name this host has no group of.
    pub fn new(group: Option<&str>) -> Result<Access> {
        Ok(Access {
            group: group.map(parse_group).transpose()?,
        })
    }

    /// The socket's mode: 0600, or 0660 with a group.
    pub fn socket_mode(&self) -> u32 {
        if self.group.is_some() { 0o660 } else { 0o600 }
    }

    /// The socket directory's mode: 0700, or 0750 with a group.
    pub fn dir_mode(&self) -> u32 {
        if self.group.is_some() { 0o750 } else { 0o700 }
    }

    /// Whether `peer` may use the server: root, or a member of the group
    /// (`groups` gives the peer's supplementary groups; asked only when
    /// needed).
    pub fn allows_with(&self, peer: &Peer, groups: impl FnOnce() -> Vec<u32>) -> bool {
        if peer.uid == 0 {
            return true;
        }
        match self.group {
            None => false,
            Some(g) => peer.gid == g.as_raw() || groups().contains(&g.as_raw()),
        }
    }

    /// Checks an accepted connection's peer; `Err` says who was refused
    /// and why, for the log (the caller closes the connection).
    ///
    /// # Errors
    /// The peer is neither root nor in the group, or its credentials
    /// cannot be read.
    pub fn admit(&self, conn: &impl AsFd) -> std::result::Result<Peer, String> {
        let p = peer(conn).map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        if self.allows_with(&p, || supplementary_groups(p.pid)) {
            Ok(p)
        } else {
            Err(match self.group {
                None => format!(
                    "uid {} (pid {}) is not root; only root may use this socket",
                    p.uid, p.pid
                ),
                Some(g) => format!(
                    "uid {} (pid {}) is neither root nor in group {g}",
                    p.uid, p.pid
                ),
            })
        }
    }
}

/// A group name or a numeric gid.
///
/// # Errors
/// [`Error::InvalidArgument`] when the name is unknown to this host.
pub fn parse_group(s: &str) -> Result<Gid> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(Error::InvalidArgument(format!(
            "--socket-group {s}: no such group on this host; create it (`groupadd {s}`) or pass a numeric gid"
        ))),
        Err(e) => Err(Error::InvalidArgument(format!(
            "--socket-group {s}: cannot look the group up ({e}); pass a numeric gid"
        ))),
    }
}

/// The kernel's record of who is at the other end of `conn`.
///
/// # Errors
/// `getsockopt(SO_PEERCRED)`'s.
pub fn peer(conn: &impl AsFd) -> io::Result<Peer> {
    let c = getsockopt(conn, PeerCredentials)?;
    Ok(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// The supplementary groups of process `pid` (its `Groups:` line in
/// `/proc/PID/status`); empty when it cannot be read (the process is gone
/// or invisible: then only its gid counts).
pub fn supplementary_groups(pid: i32) -> Vec<u32> {
    if pid <= 0 {
        return Vec::new();
    }
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| groups_of_status(&s))
        .unwrap_or_default()
}

/// The gids of the `Groups:` line of a `/proc/PID/status` text.
pub fn groups_of_status(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The socket file a server bound; removed on drop if it is still the one
/// bound (never a file someone put there since).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "could not remove the socket");
                }
            }
            _ => {}
        }
    }
}

/// Binds `path` for a server with `access` (see the module's rules):
/// prepares its directory, replaces a stale socket, refuses anything else
/// there, and returns the listener with the guard that removes the socket
/// file when the server stops.
///
/// # Errors
/// [`Error::Busy`] (exit 4) when a live server answers on `path`, when
/// something other than a socket is there, or when the directory is not
/// root's to keep private; I/O errors.
pub fn bind(path: &Path, access: &Access) -> Result<(UnixListener, SocketFile)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    prepare_dir(dir, access)?;
    clear_stale(path)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.binding", std::process::id()));
    clear_stale(&tmp)?;
    // 0777 & !077: the socket is born 0700 (root only), then set to its mode.
    let old = umask(Mode::from_bits_truncate(0o077));
    let bound = UnixListener::bind(&tmp);
    umask(old);
    let listener = bound.ctx(|| format!("bind {}", tmp.display()))?;
    let meta = fs::symlink_metadata(&tmp).ctx(|| format!("stat {}", tmp.display()))?;
    // Removes the temporary name if what follows fails.
    let mut file = SocketFile {
        path: tmp.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(g) = access.group {
        chown(&tmp, None, Some(g)).map_err(|e| Error::Io {
            context: format!("give {} to group {g}", tmp.display()),
            source: e.into(),
        })?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(access.socket_mode()))
        .ctx(|| format!("chmod {}", tmp.display()))?;
    match renameat2(
        AT_FDCWD,
        &tmp,
        AT_FDCWD,
        path,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => file.path = path.to_owned(),
        Err(Errno::EEXIST) => {
            return Err(Error::Busy {
                what: format!("socket {}", path.display()),
                detail: "something was made there while the server started; move it away or \
                         pass another --socket PATH"
                    .into(),
            });
        }
        Err(e) => {
            return Err(Error::Io {
                context: format!("rename {} to {}", tmp.display(), path.display()),
                source: e.into(),
            });
        }
    }
    Ok((listener, file))
}

/// Creates `dir` with the access's mode, or checks and tightens it.
fn prepare_dir(dir: &Path, access: &Access) -> Result<()> {
    let want = access.dir_mode();
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(want)
                .create(dir)
                .ctx(|| format!("create the socket directory {}", dir.display()))?;
            fs::metadata(dir).ctx(|| format!("stat {}", dir.display()))?
        }
        Err(e) => return Err(e).ctx(|| format!("stat {}", dir.display())),
    };
    let busy = |detail: String| Error::Busy {
        what: format!("the socket directory {}", dir.display()),
        detail,
    };
    if !meta.is_dir() {
        return Err(busy(
            "it is not a directory; pass a --socket PATH in a directory".into(),
        ));
    }
    let me = Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(busy(format!(
            "it belongs to uid {}, who could replace the socket; put the socket in a directory \
             of uid {me}'s own (e.g. --socket /run/thinlayer/NAME.sock)",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o1000 != 0 || mode & 0o002 != 0 {
        return Err(busy(format!(
            "it is writable by every user (mode {mode:04o}, like /tmp); give the socket a directory \
             of its own (e.g. --socket /run/thinlayer/NAME.sock)"
        )));
    }
    if let Some(g) = access.group.filter(|g| meta.gid() != g.as_raw()) {
        chown(dir, None, Some(g)).map_err(|e| Error::Io {
            context: format!("give {} to group {g}", dir.display()),
            source: e.into(),
        })?;
    }
    if mode != want {
        if mode & !want != 0 {
            tracing::warn!(dir = %dir.display(), from = format!("{mode:04o}"), to = format!("{want:04o}"),
                "tightening the socket directory: other users could reach the socket");
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(want))
            .ctx(|| format!("chmod {}", dir.display()))?;
    }
    Ok(())
}

/// Makes `path` free for a bind: nothing there, or a stale socket (no
/// server answers) removed. Anything else is left alone and refused.
fn clear_stale(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("stat {}", path.display())),
    };
    let busy = |detail: String| Error::Busy {
        what: format!("socket {}", path.display()),
        detail,
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_symlink() {
            "a symlink"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_file() {
            "a regular file"
        } else {
            "not a socket"
        };
        return Err(busy(format!(
            "{} is {kind}, not a socket, and thinlayer never deletes it; move it away or pass another --socket PATH",
            path.display()
        )));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(busy(format!(
            "it is taken by a running server: a live server answers on {}; stop that server first, or pass another --socket PATH",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing a stale socket (no server answers on it)");
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).ctx(|| format!("remove the stale socket {}", path.display()))
                }
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(busy(format!(
            "cannot tell whether a server answers on it ({e}); if none does, remove it by hand"
        ))),
    }
}

/// [`bind`], then the listener handed to tokio (within its runtime): what
/// both servers listen on.
///
/// # Errors
/// [`bind`]'s; the listener cannot be registered with the runtime.
pub fn listen(path: &Path, access: &Access) -> Result<(tokio::net::UnixListener, SocketFile)> {
    let (listener, file) = bind(path, access)?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
        .ctx(|| format!("listen on {}", path.display()))?;
    Ok((listener, file))
}

/// Installs the servers' SIGTERM and SIGINT handlers (within a tokio
/// runtime) and returns the future that completes at the first of them,
/// logging which: a server's shutdown signal.
///
/// # Errors
/// A handler cannot be installed.
pub fn stop_signals() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let install = |kind: SignalKind, name: &str| {
        signal(kind).ctx(|| format!("install a {name} handler for the server"))
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

/// Raises this process's soft limit on open files to its hard limit, so a
/// server holds as many connections as the host allows; returns the limit.
pub fn raise_nofile_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::debug!(error = %e, "could not raise the open-files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// Whether an `accept` error is the process or the host running out of
/// file descriptors (or memory): transient, so the server backs off and
/// keeps accepting.
pub fn accept_error_is_transient(e: &io::Error) -> bool {
    use nix::errno::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw);
    matches!(
        errno,
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("thinlayer-socket-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_stale_replaced_live_and_other_files_refused() {
        let base = scratch("bind");
        let dir = base.join("run");
        let sock = dir.join("s.sock");
        let access = Access::default();
        // Created 0700, the socket 0600.
        let (live, file) = bind(&sock, &access).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&sock), 0o600);
        // Bound at a temporary name, renamed onto the path: nothing else
        // is left, and the listener answers at the path.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"]);
        assert!(UnixStream::connect(&sock).is_ok());
        // A live server answers: refused, exit 4, nothing removed.
        let e = bind(&sock, &access).unwrap_err();
        assert!(matches!(e, Error::Busy { .. }), "{e}");
        assert!(e.to_string().contains("live server"), "{e}");
        assert!(sock.exists());
        // Dead (the listener closed, the file stays): stale, replaced.
        drop(live);
        std::mem::forget(file);
        assert!(UnixStream::connect(&sock).is_err());
        let (again, file) = bind(&sock, &access).unwrap();
        assert!(UnixStream::connect(&sock).is_ok());
        drop(again);
        drop(file);
        assert!(!sock.exists(), "the guard removes its own socket");

        // A regular file, a directory, a symlink: never deleted, exit 4.
        fs::write(&sock, b"precious").unwrap();
        let e = bind(&sock, &access).unwrap_err();
        assert!(matches!(e, Error::Busy { .. }), "{e}");
        assert!(e.to_string().contains("regular file"), "{e}");
        assert_eq!(fs::read(&sock).unwrap(), b"precious");
        fs::remove_file(&sock).unwrap();
        fs::create_dir(&sock).unwrap();
        assert!(
            bind(&sock, &access)
                .unwrap_err()
                .to_string()
                .contains("a directory")
        );
        assert!(sock.is_dir());
        fs::remove_dir(&sock).unwrap();
        let target = base.join("target");
        fs::write(&target, b"t").unwrap();
        std::os::unix::fs::symlink(&target, &sock).unwrap();
        assert!(
            bind(&sock, &access)
                .unwrap_err()
                .to_string()
                .contains("symlink")
        );
        assert!(
            fs::symlink_metadata(&sock)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&target).unwrap(), b"t");
        fs::remove_file(&sock).unwrap();

        // A loose directory is tightened; a world-writable one refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let (l, f) = bind(&sock, &access).unwrap();
        assert_eq!(mode(&dir), 0o700);
        drop((l, f));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = bind(&sock, &access).unwrap_err();
        assert!(e.to_string().contains("writable by every user"), "{e}");
        assert_eq!(mode(&dir), 0o1777, "a shared directory is not changed");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_group_gets_0660_and_0750() {
        let base = scratch("group");
        let sock = base.join("run").join("g.sock");
        // Our own gid: a group an unprivileged owner may chown to.
        let gid = Gid::effective();
        let access = Access::new(Some(&gid.as_raw().to_string())).unwrap();
        let (_l, _f) = bind(&sock, &access).unwrap();
        assert_eq!(mode(&sock), 0o660);
        assert_eq!(mode(sock.parent().unwrap()), 0o750);
        assert_eq!(fs::metadata(&sock).unwrap().gid(), gid.as_raw());
        drop((_l, _f));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn peer_credentials_and_policy() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = peer(&a).unwrap();
        assert_eq!(p.uid, Uid::effective().as_raw());
        assert_eq!(p.gid, Gid::effective().as_raw());
        assert_eq!(p.pid, i32::try_from(std::process::id()).unwrap());

        let no_groups = Vec::new;
        let user = Peer {
            pid: 1,
            uid: 1000,
            gid: 1000,
        };
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let root_only = Access::default();
        let group = Access {
            group: Some(Gid::from_raw(4242)),
        };
        assert!(root_only.allows_with(&root, no_groups));
        assert!(!root_only.allows_with(&user, || vec![4242]));
        assert!(!group.allows_with(&user, no_groups));
        assert!(group.allows_with(&user, || vec![27, 4242]));
        assert!(group.allows_with(&Peer { gid: 4242, ..user }, no_groups));
        // The live check on a socketpair: our own credentials.
        let me_root = Uid::effective().is_root();
        assert_eq!(root_only.admit(&a).is_ok(), me_root);
        let mine = Access {
            group: Some(Gid::effective()),
        };
        assert!(mine.admit(&a).is_ok());
        let other = Access {
            group: Some(Gid::from_raw(Gid::effective().as_raw().wrapping_add(7777))),
        };
        if !me_root {
            let why = other.admit(&a).unwrap_err();
            assert!(why.contains(&format!("uid {}", p.uid)), "{why}");
        }
        assert_eq!(
            groups_of_status("Name:\tx\nGroups:\t4 24 27 \nNSpid:\t1\n"),
            vec![4, 24, 27]
        );
        assert_eq!(groups_of_status("Groups:\n"), Vec::<u32>::new());
        assert!(Access::new(Some("no-such-group-thinlayer")).is_err());
        assert_eq!(
            Access::new(Some("4242")).unwrap().group,
            Some(Gid::from_raw(4242))
        );
    }
}
