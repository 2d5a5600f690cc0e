//! Both servers (`serve docker-volume`, `serve containerd`) against local
//! users and hostile clients, in the VM:
//!
//! - the socket is 0600 in a 0700 directory: uid 65534 cannot connect
//!   (EACCES); with `--socket-group` a member can and others cannot; even
//!   with the modes opened by hand, the server closes a connection whose
//!   peer (SO_PEERCRED) is neither root nor in the group;
//! - a regular file or a symlink at the socket path is never deleted, and
//!   the server refuses to start with exit 4, as it does on a live server;
//! - a slow client, a 100 MiB body, invalid JSON, garbage, 1,000 idle
//!   connections and running out of descriptors (EMFILE) never stop another
//!   request from being answered, and the server stays up;
//! - containerd's reads (Stat, List, Usage, Mounts) are answered while a
//!   write waits for the pool's exclusive lock.
//!
//! Other users are played by a copy of this test binary run as uid 65534
//! (`peer_probe`, selected by `TL_PROBE`).

mod common;

use common::{NOBODY, Pool, Scratch, Served, http_post, mode, vm_test};

use std::{
    collections::HashMap,
    fs,
    io::{Read, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    thread::sleep,
    time::{Duration, Instant},
};

use containerd_snapshots::api::snapshots::v1::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, UsageRequest, snapshots_client::SnapshotsClient,
};
use containerd_snapshots::tonic::{
    self,
    transport::{Channel, Endpoint, Uri},
};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use serde_json::Value;

/// A gid no account has: granted with `--socket-group 4242`.
const GROUP: u32 = 4242;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Server {
    Docker,
    Containerd,
}

impl Server {
    fn args(self) -> [&'static str; 2] {
        match self {
            Server::Docker => ["serve", "docker-volume"],
            Server::Containerd => ["serve", "containerd"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Server::Docker => "docker",
            Server::Containerd => "containerd",
        }
    }

    fn start(self, s: &Scratch, socket: &Path, extra: &[&str]) -> Served {
        let mut args = self.args().to_vec();
        args.extend_from_slice(extra);
        Served::start(s, &args, socket)
    }

    /// A request every server must still answer: Plugin.Activate, or a
    /// gRPC List.
    fn assert_answers(self, socket: &Path) {
        let t = Instant::now();
        match self {
            Server::Docker => {
                let (status, body) = http_post(socket, "/Plugin.Activate", b"null");
                assert_eq!(status, 200, "{body}");
                assert!(body.contains("VolumeDriver"), "{body}");
            }
            Server::Containerd => {
                runtime().block_on(async {
                    let mut c = client(socket).await.expect("connect to serve containerd");
                    tokio::time::timeout(Duration::from_secs(20), c.list(list_req()))
                        .await
                        .expect("List answered within 20 s")
                        .expect("List succeeds");
                });
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} answered only after {:?}",
            self.name(),
            t.elapsed()
        );
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A gRPC client of containerd's snapshots service on `socket`.
async fn client(socket: &Path) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("a static URI")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await?;
    Ok(SnapshotsClient::new(channel))
}

const SNAPSHOTTER: &str = "thinlayer";

fn list_req() -> ListSnapshotsRequest {
    ListSnapshotsRequest {
        snapshotter: SNAPSHOTTER.into(),
        filters: vec![],
    }
}

/// A socket in a fresh directory of the scratch base.
fn socket_path(s: &Scratch, server: Server) -> PathBuf {
    s.root
        .parent()
        .unwrap()
        .join("run")
        .join(format!("{}.sock", server.name()))
}

/// Raises this process's open-files limit so it can hold `n` connections.
fn allow_open_files(n: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n.max(soft), n.max(hard)).unwrap();
    }
}

// --- other users: this binary, copied where uid 65534 can run it --------

/// This test binary, copied to a 0755 directory on the guest's tmpfs.
fn probe_binary() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tl-probe-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("probe");
        fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
}

/// What uid 65534 with gid `gid` (and no other group) gets from `server`
/// on `socket`: "answered", "closed ..." or "refused: ERRNO".
fn probe_as(gid: u32, server: Server, socket: &Path) -> String {
    let out = Command::new(probe_binary())
        .uid(NOBODY)
        .gid(gid)
        .current_dir("/")
        .env(
            "TL_PROBE",
            format!("{}:{}", server.name(), socket.display()),
        )
        .args(["--exact", "peer_probe", "--nocapture", "--test-threads=1"])
        .output()
        .expect("run the probe as uid 65534");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("PROBE: ").map(|(_, got)| got))
        .unwrap_or_else(|| panic!("no PROBE line in:\n{stdout}"))
        .to_owned()
}

/// What connecting to `socket` and asking `server` one question gets.
fn probe(server: Server, socket: &Path) -> String {
    match UnixStream::connect(socket) {
        Err(e) => {
            let errno = e
                .raw_os_error()
                .map(nix::errno::Errno::from_raw)
                .map_or_else(|| e.to_string(), |n| format!("{n:?}"));
            format!("refused: {errno}")
        }
        Ok(c) if server == Server::Docker => {
            let mut c = c;
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let sent = c.write_all(
                b"POST /Plugin.Activate HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnull",
            );
            let mut answer = String::new();
            let read = c.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                "answered".into()
            } else {
                format!("closed (write {sent:?}, read {read:?}, {answer:?})")
            }
        }
        Ok(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let listed = async {
                    let mut c = client(socket).await.map_err(|e| e.to_string())?;
                    c.list(list_req()).await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(Duration::from_secs(20), listed).await {
                    Ok(Ok(_)) => "answered".into(),
                    Ok(Err(e)) => format!("closed ({e})"),
                    Err(_) => "closed (no answer in 20 s)".into(),
                }
            })
        }
    }
}

/// Run as another user by `probe_as` (with `TL_PROBE=SERVER:SOCKET`): prints
/// what it got. Run plainly, it checks itself against a socket of its own.
#[test]
fn peer_probe() {
    if let Some(spec) = std::env::var_os("TL_PROBE") {
        let spec = spec.to_string_lossy().into_owned();
        let (server, socket) = spec.split_once(':').expect("TL_PROBE=SERVER:SOCKET");
        let server = match server {
            "docker" => Server::Docker,
            "containerd" => Server::Containerd,
            other => panic!("unknown server {other}"),
        };
        println!("PROBE: {}", probe(server, Path::new(socket)));
        return;
    }
    let dir = std::env::temp_dir().join(format!("tl-probe-self-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let sock = dir.join("p.sock");
    let (l, file) =
        thinlayer_pool::socket::bind(&sock, &thinlayer_pool::socket::Access::default()).unwrap();
    let answering = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 256];
        let _ = c.read(&mut b).unwrap();
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
    });
    assert_eq!(probe(Server::Docker, &sock), "answered");
    answering.join().unwrap();
    drop(file);
    assert_eq!(probe(Server::Docker, &sock), "refused: ENOENT");
    fs::remove_dir_all(&dir).unwrap();
}

// --- sockets ----------------------------------------------------------------

/// Runs `body` for `server` in the vm_ harness, on a small pool named
/// `TAG-SERVER`.
fn for_server(tag: &str, server: Server, body: fn(&Scratch, Server)) {
    vm_test(&format!("{tag}-{}", server.name()), Pool::Small, |s| {
        body(s, server);
    });
}

fn sockets_are_root_only_and_a_group_is_granted(s: &Scratch, server: Server) {
    let socket = socket_path(s, server);
    let dir = socket.parent().unwrap().to_owned();
    // A directory an older setup left open is tightened.
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();

    let mut srv = server.start(s, &socket, &[]);
    assert_eq!(mode(&socket), 0o600, "socket mode");
    assert_eq!(mode(&dir), 0o700, "socket directory mode");
    assert_eq!(fs::metadata(&socket).unwrap().uid(), 0);
    assert_eq!(probe_as(NOBODY, server, &socket), "refused: EACCES");
    server.assert_answers(&socket);

    // Opened wide by hand: the peer check still turns uid 65534 away.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let got = probe_as(NOBODY, server, &socket);
    assert!(got.starts_with("closed"), "uid 65534 got: {got}");
    assert!(
        srv.log().contains(&format!("uid {NOBODY}")),
        "the refusal is logged with the uid:\n{}",
        srv.log()
    );
    server.assert_answers(&socket);
    srv.assert_running();
    assert!(srv.stop().success(), "{}", srv.log());
    assert!(!socket.exists(), "the socket is removed at stop");

    // A group: its members in, others still out.
    let mut srv = server.start(s, &socket, &["--socket-group", &GROUP.to_string()]);
    assert_eq!(mode(&socket), 0o660, "{}", srv.log());
    assert_eq!(mode(&dir), 0o750, "{}", srv.log());
    assert_eq!(fs::metadata(&socket).unwrap().gid(), GROUP);
    assert_eq!(fs::metadata(&dir).unwrap().gid(), GROUP);
    assert_eq!(probe_as(GROUP, server, &socket), "answered");
    assert_eq!(probe_as(NOBODY, server, &socket), "refused: EACCES");
    // Opened wide: a non-member is still turned away by its credentials.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let got = probe_as(NOBODY, server, &socket);
    assert!(got.starts_with("closed"), "a non-member got: {got}");
    assert_eq!(probe_as(GROUP, server, &socket), "answered");
    srv.assert_running();
    assert!(srv.stop().success(), "{}", srv.log());
}

#[test]
fn vm_servers_docker_socket_is_root_only_and_a_group_is_granted() {
    for_server(
        "sock",
        Server::Docker,
        sockets_are_root_only_and_a_group_is_granted,
    );
}

#[test]
fn vm_servers_containerd_socket_is_root_only_and_a_group_is_granted() {
    for_server(
        "sock",
        Server::Containerd,
        sockets_are_root_only_and_a_group_is_granted,
    );
}

#[test]
fn vm_servers_never_delete_what_is_not_a_socket() {
    vm_test("sock-files", Pool::Small, |s| {
        for server in [Server::Docker, Server::Containerd] {
            let socket = socket_path(s, server);
            fs::create_dir_all(socket.parent().unwrap()).unwrap();
            let sock = socket.to_str().unwrap();
            let [serve, what] = server.args();

            // A regular file: kept, exit 4, says so.
            fs::write(&socket, b"precious").unwrap();
            s.fails(&[serve, what, "--socket", sock], 4, "regular file");
            assert_eq!(fs::read(&socket).unwrap(), b"precious", "{server:?}");
            fs::remove_file(&socket).unwrap();

            // A symlink to a file elsewhere: neither it nor its target touched.
            let target = s.root.parent().unwrap().join("target");
            fs::write(&target, b"elsewhere").unwrap();
            std::os::unix::fs::symlink(&target, &socket).unwrap();
            s.fails(&[serve, what, "--socket", sock], 4, "symlink");
            assert!(
                fs::symlink_metadata(&socket)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
            assert_eq!(fs::read(&target).unwrap(), b"elsewhere");
            fs::remove_file(&socket).unwrap();

            // A live server: refused, exit 4; a dead one's socket: replaced.
            let mut live = server.start(s, &socket, &[]);
            s.fails(&[serve, what, "--socket", sock], 4, "live server");
            live.assert_running();
            server.assert_answers(&socket);
            assert!(live.stop().success(), "{}", live.log());
        }
        // A socket left by a killed server is stale: the next start takes it.
        let socket = socket_path(s, Server::Docker);
        let mut first = Server::Docker.start(s, &socket, &[]);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(first.pid()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = first.stop();
        assert!(socket.exists(), "a killed server leaves its socket");
        let mut again = Server::Docker.start(s, &socket, &[]);
        Server::Docker.assert_answers(&socket);
        assert!(again.stop().success());
    });
}

// --- hostile clients ------------------------------------------------------------

/// Opens `n` connections to `socket` and holds them; they close on drop.
fn idle_connections(socket: &Path, n: usize) -> Vec<UnixStream> {
    allow_open_files(u64::try_from(n).unwrap() + 256);
    (0..n)
        .map(|i| UnixStream::connect(socket).unwrap_or_else(|e| panic!("idle connection {i}: {e}")))
        .collect()
}

#[test]
fn vm_servers_docker_plugin_stays_up_under_hostile_clients() {
    vm_test("docker-hostile", Pool::Small, |s| {
        let socket = socket_path(s, Server::Docker);
        let mut srv = Server::Docker.start(s, &socket, &[]);

        // A slow client sends half a request and waits.
        let mut slow = UnixStream::connect(&socket).unwrap();
        slow.write_all(b"POST /VolumeDriver.Create HTTP/1.1\r\nContent-Len")
            .unwrap();
        let slow_since = Instant::now();

        // 1,000 idle connections, held.
        let idle = idle_connections(&socket, 1000);
        let t = Instant::now();
        let (status, body) = http_post(
            &socket,
            "/VolumeDriver.Create",
            br#"{"Name": "v1", "Opts": {"size": "64M"}}"#,
        );
        assert_eq!((status, body.as_str()), (200, r#"{"Err":""}"#));
        println!(
            "a create with 1,000 idle connections and a slow one open: {:?}",
            t.elapsed()
        );

        // A 100 MiB body: refused (413) before it is read, with Docker's `Err`.
        let mut big = UnixStream::connect(&socket).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut writer = big.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let head = format!(
                "POST /VolumeDriver.Create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                100 << 20
            );
            let _ = writer.write_all(head.as_bytes());
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            for _ in 0..100 {
                match writer.write_all(&chunk) {
                    Ok(()) => sent += chunk.len(),
                    Err(_) => break,
                }
            }
            sent
        });
        let mut answer = String::new();
        let _ = big.read_to_string(&mut answer);
        let sent = sender.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let err: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert!(
            err["Err"].as_str().unwrap().contains("larger than"),
            "{err}"
        );
        println!("the 100 MiB client got its 413 after sending {sent} bytes");
        assert!(sent < 100 << 20, "the server read the whole 100 MiB body");

        // Invalid JSON: 400 with `Err`; Docker's `null` body is fine.
        let (status, body) = http_post(&socket, "/VolumeDriver.Create", b"{\"Name\": ");
        assert_eq!(status, 400, "{body}");
        let err: Value = serde_json::from_str(&body).unwrap();
        assert!(
            err["Err"].as_str().unwrap().contains("bad request body"),
            "{err}"
        );
        let (status, body) = http_post(&socket, "/VolumeDriver.List", b"null");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"v1\""), "{body}");
        let (status, _) = http_post(&socket, "/Nope", b"{}");
        assert_eq!(status, 404);

        // A head too large, and garbage: refused, nothing else.
        let mut huge = UnixStream::connect(&socket).unwrap();
        let _ = huge.write_all(
            format!(
                "POST /x HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100 << 10)
            )
            .as_bytes(),
        );
        let mut answer = String::new();
        let _ = huge.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let mut garbage = UnixStream::connect(&socket).unwrap();
        let _ = garbage.write_all(&common::pattern(3, 4096));
        let mut answer = String::new();
        let _ = garbage.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

        // The slow client is dropped after 10 s without progress (408).
        slow.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut answer = String::new();
        let _ = slow.read_to_string(&mut answer);
        let held = slow_since.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            held < Duration::from_secs(40),
            "a slow client held its connection for {held:?}"
        );
        drop(idle);

        let (status, body) = http_post(&socket, "/VolumeDriver.Remove", br#"{"Name": "v1"}"#);
        assert_eq!((status, body.as_str()), (200, r#"{"Err":""}"#));
        srv.assert_running();
        assert!(srv.stop().success(), "{}", srv.log());
    });
}

/// With its open-files limit at 64, a server runs out of descriptors
/// (accept: EMFILE) under 150 connections; once they close it serves again.
fn keeps_accepting_after_emfile(s: &Scratch, server: Server) {
    let socket = socket_path(s, server);
    // The child inherits the limit (soft and hard, so it cannot raise it).
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 64, 64).unwrap();
    let started = std::panic::catch_unwind(|| server.start(s, &socket, &[]));
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let mut srv = started.unwrap_or_else(|p| std::panic::resume_unwind(p));
    let flood = idle_connections(&socket, 150);
    sleep(Duration::from_secs(1));
    srv.assert_running();
    drop(flood);
    server.assert_answers(&socket);
    let log = srv.log();
    assert!(
        log.contains("accept failed"),
        "the server never ran out of descriptors:\n{log}"
    );
    server.assert_answers(&socket);
    assert!(srv.stop().success(), "{}", srv.log());
}

#[test]
fn vm_servers_docker_keeps_accepting_after_emfile() {
    for_server("emfile", Server::Docker, keeps_accepting_after_emfile);
}

#[test]
fn vm_servers_containerd_keeps_accepting_after_emfile() {
    for_server("emfile", Server::Containerd, keeps_accepting_after_emfile);
}

fn prepare(key: &str, parent: &str) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    }
}

fn stat(key: &str) -> StatSnapshotRequest {
    StatSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.into(),
    }
}

#[test]
fn vm_servers_containerd_reads_while_a_write_waits_and_hostile_clients() {
    vm_test("ctrd-hostile", Pool::Small, |s| {
        let socket = socket_path(s, Server::Containerd);
        let mut srv = Server::Containerd.start(s, &socket, &[]);
        let rt = runtime();
        let mut c = rt.block_on(client(&socket)).unwrap();
        let within = |secs: u64| Duration::from_secs(secs);

        // A committed snapshot and an active child of it, its device up.
        rt.block_on(async {
            c.prepare(prepare("k1", "")).await.unwrap();
            c.commit(CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: "c1".into(),
                key: "k1".into(),
                labels: HashMap::new(),
            })
            .await
            .unwrap();
            c.prepare(prepare("k2", "c1")).await.unwrap();
        });

        // A long write: the pool's exclusive lock is held (as an `image
        // import` would); a Prepare queues behind it. (The server's worker
        // may hold it for a moment after the Prepare: waited for.)
        let lock = thinlayer_pool::lock::lock(&s.root, thinlayer_pool::LockMode::Exclusive, true)
            .expect("take the pool's lock");
        let mut writer = c.clone();
        let waiting = rt.spawn(async move { writer.prepare(prepare("k3", "c1")).await });
        sleep(Duration::from_millis(500));
        assert!(
            !waiting.is_finished(),
            "the Prepare did not wait for the lock"
        );
        rt.block_on(async {
            let t = Instant::now();
            let info = tokio::time::timeout(within(10), c.stat(stat("k2")))
                .await
                .expect("Stat answered while a write waits")
                .unwrap()
                .into_inner()
                .info
                .unwrap();
            assert_eq!(info.parent, "c1");
            let listed = tokio::time::timeout(within(10), c.list(list_req()))
                .await
                .expect("List answered while a write waits")
                .unwrap();
            let mut stream = listed.into_inner();
            let mut names = Vec::new();
            while let Some(m) = stream.message().await.unwrap() {
                names.extend(m.info.into_iter().map(|i| i.name));
            }
            names.sort();
            assert_eq!(names, ["c1", "k2"]);
            for key in ["c1", "k2"] {
                let usage = c.usage(UsageRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.into(),
                });
                let answered = tokio::time::timeout(within(10), usage).await;
                assert!(
                    answered.is_ok(),
                    "Usage of {key} not answered while a write waits"
                );
                let size = answered.unwrap().unwrap().into_inner().size;
                println!("usage of {key}: {size} bytes");
            }
            let mounts = tokio::time::timeout(
                within(10),
                c.mounts(MountsRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: "k2".into(),
                }),
            )
            .await
            .expect("Mounts answered while a write waits")
            .unwrap()
            .into_inner()
            .mounts;
            // A bind of the holder the server mounted (read without the lock).
            assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
            assert!(mounts[0].source.contains("/snapshotter/mnt/"), "{mounts:?}");
            println!("four reads while a write waited: {:?}", t.elapsed());
        });
        assert!(!waiting.is_finished(), "the Prepare ran under a held lock");
        drop(lock);
        rt.block_on(async { tokio::time::timeout(within(60), waiting).await })
            .expect("the Prepare finishes once the lock is free")
            .unwrap()
            .unwrap();

        // Hostile clients: 1,000 idle connections, a slow one (half of the
        // HTTP/2 preface), garbage, and a 100 MiB request.
        let idle = idle_connections(&socket, 1000);
        let mut slow = UnixStream::connect(&socket).unwrap();
        slow.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
        let mut garbage = UnixStream::connect(&socket).unwrap();
        let _ = garbage.write_all(&common::pattern(9, 64 << 10));
        let _ = garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        rt.block_on(async {
            let t = Instant::now();
            tokio::time::timeout(within(20), c.stat(stat("k3")))
                .await
                .expect("Stat answered with 1,000 idle connections open")
                .unwrap();
            println!("a Stat with 1,000 idle connections open: {:?}", t.elapsed());
            let huge = tokio::time::timeout(within(60), c.stat(stat(&"k".repeat(100 << 20))))
                .await
                .expect("a 100 MiB request is answered");
            let status = huge.expect_err("a 100 MiB request is refused");
            println!("the 100 MiB request: {status}");
        });
        // Fresh clients still get answers; the server is up.
        Server::Containerd.assert_answers(&socket);
        drop((idle, slow, garbage));
        Server::Containerd.assert_answers(&socket);
        rt.block_on(async {
            for key in ["k3", "k2", "c1"] {
                c.remove(RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.into(),
                })
                .await
                .unwrap();
            }
        });
        srv.assert_running();
        assert!(srv.stop().success(), "{}", srv.log());
    });
}

/// A Prepare that dies between its layer and its snapshot record leaves a
/// layer the next start removes, because the layer's record says the
/// snapshotter owns it; a user's layer, whatever its name, is never touched.
#[test]
fn vm_servers_containerd_start_removes_only_its_own_orphans() {
    vm_test("ctrd-orphan", Pool::Small, |s| {
        s.ok(&["layer", "create", "mine"]);
        let socket = socket_path(s, Server::Containerd);
        let fault = [("THINLAYER_FAULT", "snapshotter_prepare.after_layer")];
        let mut dying = Served::start_with(s, &Server::Containerd.args(), &socket, &fault);
        let rt = runtime();
        let answer = rt.block_on(async {
            client(&socket)
                .await
                .unwrap()
                .prepare(prepare("k1", ""))
                .await
        });
        assert!(answer.is_err(), "the Prepare was to die half-way");
        assert!(!dying.wait_exit().success(), "{}", dying.log());
        let owners = |s: &Scratch| -> Vec<(String, String)> {
            s.json(&["--wait", "layer", "ls"])
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["id"].as_str().unwrap().to_owned(),
                        l["owner"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let before = owners(s);
        assert!(
            before.iter().any(|(_, o)| o == "snapshotter"),
            "the interrupted Prepare left its layer: {before:?}"
        );

        let mut again = Server::Containerd.start(s, &socket, &[]);
        again.assert_running();
        assert_eq!(
            owners(s),
            vec![("mine".to_owned(), "user".to_owned())],
            "only the snapshotter's orphan is gone"
        );
        assert!(again.stop().success(), "{}", again.log());

        // A Remove that dies with its record gone and its layer's removal
        // queued: the layer stays, mounted at its holder; the next start
        // unmounts and removes it.
        let holders = fs::canonicalize(s.root.join("snapshotter/mnt")).unwrap();
        let held = || -> usize {
            thinlayer_pool::mounts::all()
                .unwrap()
                .iter()
                .filter(|m| m.mountpoint.starts_with(&holders))
                .count()
        };
        let mut srv = Server::Containerd.start(s, &socket, &[]);
        rt.block_on(async {
            let mut c = client(&socket).await.unwrap();
            c.prepare(prepare("k2", "")).await.unwrap();
        });
        assert!(srv.stop().success(), "{}", srv.log());
        assert_eq!(held(), 1, "an active snapshot's holder stays mounted");
        let fault = [("THINLAYER_FAULT", "snapshotter_remove.after_record")];
        let mut dying = Served::start_with(s, &Server::Containerd.args(), &socket, &fault);
        let answer = rt.block_on(async {
            client(&socket)
                .await
                .unwrap()
                .remove(RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: "k2".into(),
                })
                .await
        });
        assert!(answer.is_err(), "the Remove was to die half-way");
        assert!(!dying.wait_exit().success(), "{}", dying.log());
        assert_eq!(owners(s).len(), 2, "the removed snapshot's layer is left");
        let mut again = Server::Containerd.start(s, &socket, &[]);
        again.assert_running();
        assert_eq!(
            owners(s),
            vec![("mine".to_owned(), "user".to_owned())],
            "the interrupted Remove's layer is gone"
        );
        assert_eq!(held(), 0, "its holder is unmounted");
        assert!(again.stop().success(), "{}", again.log());
    });
}
