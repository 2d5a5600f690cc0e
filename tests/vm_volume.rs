//! Thin volumes and Docker's volume plugin protocol against the real
//! kernel: a volume shared by containers outlives them and a pool
//! deactivate/activate; a `--from` clone is instant, independent, and
//! shares its source's blocks; the plugin's create/mount/clone/unmount/
//! remove cycle over its socket, with mount reference counting by ID.

mod common;

use std::{
    fs,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::Scratch;
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/images");
    assert!(
        d.join(".stamp").exists(),
        "run tests/fixtures/make-images {} first (tools/test does)",
        d.display()
    );
    d
}

#[test]
fn vm_a_volume_outlives_its_containers_and_clones_are_independent() {
    common::require_dm_thin();
    let s = Scratch::new("volumes");
    s.create_pool(&[]);
    s.ok(&[
        "image",
        "import",
        fixtures().join("demo-docker.tar").to_str().unwrap(),
    ]);
    s.ok(&["volume", "create", "data", "--size", "256M"]);
    s.ok(&[
        "container",
        "create",
        "writer",
        "--image",
        "demo:docker",
        "--volume",
        "data:/var/data",
    ]);
    s.ok(&[
        "container",
        "create",
        "reader",
        "--image",
        "demo:docker",
        "--volume",
        "data:/mnt/shared",
    ]);
    let w = PathBuf::from(s.ok(&["container", "mount", "writer"]).trim());
    fs::write(w.join("var/data/hello"), "from writer\n").unwrap();
    common::sh("sync", &[]);
    let r = PathBuf::from(s.ok(&["container", "mount", "reader"]).trim());
    assert_eq!(
        fs::read_to_string(r.join("mnt/shared/hello")).unwrap(),
        "from writer\n",
        "shared volume"
    );
    // The volume is not part of the container's own layer.
    s.ok(&["container", "umount", "writer"]);
    assert_eq!(
        fs::read_to_string(r.join("mnt/shared/hello")).unwrap(),
        "from writer\n",
        "still mounted for the reader"
    );
    s.fails(&["volume", "rm", "data"], 4, "used by container(s)");
    s.ok(&["container", "rm", "writer"]);
    s.ok(&["container", "rm", "reader"]);

    // Survives both containers and a deactivate/activate.
    s.ok(&["pool", "deactivate"]);
    s.ok(&["pool", "activate"]);
    let d = s.dir("data");
    s.ok(&["volume", "mount", "data", d.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(d.join("hello")).unwrap(),
        "from writer\n"
    );
    fs::write(d.join("big"), common::pattern(5, 32 << 20)).unwrap();
    s.ok(&["volume", "umount", "data"]);

    // A clone: instant, sharing blocks, then independent.
    let before = s.used_data_blocks();
    let t = Instant::now();
    s.ok(&["volume", "create", "copy", "--from", "data"]);
    println!("clone of a 32 MiB volume took {:?}", t.elapsed());
    let after = s.used_data_blocks();
    assert!(
        after - before < 32,
        "clone added {} blocks for 32 MiB of source",
        after - before
    );
    let c = s.dir("copy");
    s.ok(&["volume", "mount", "copy", c.to_str().unwrap()]);
    assert_eq!(
        fs::read(c.join("big")).unwrap(),
        common::pattern(5, 32 << 20)
    );
    fs::write(c.join("hello"), "changed in the clone\n").unwrap();
    s.ok(&["volume", "umount", "copy"]);
    s.ok(&["volume", "mount", "data", d.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(d.join("hello")).unwrap(),
        "from writer\n",
        "source unchanged by the clone"
    );
    s.ok(&["volume", "umount", "data"]);
    s.fails(&["volume", "rm", "data"], 4, "children");
    s.ok(&["volume", "rm", "copy"]);
    s.ok(&["volume", "rm", "data"]);

    // An xfs volume of its own size, and a symlink in the image is never followed.
    s.ok(&["volume", "create", "x", "--size", "320M", "--fs", "xfs"]);
    s.ok(&[
        "container",
        "create",
        "sneaky",
        "--image",
        "demo:docker",
        "--volume",
        "x:/usr/bin/run/deeper",
    ]);
    let out = s.run(&["container", "mount", "sneaky"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("symlink"), "{err}");
    s.ok(&["container", "rm", "sneaky"]);
    let x = s.dir("x");
    s.ok(&["volume", "mount", "x", x.to_str().unwrap()]);
    assert!(
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(&format!("{} xfs", x.display()))
    );
    s.ok(&["volume", "umount", "x"]);
}

/// One HTTP/1.1 POST over the plugin's socket; returns the JSON answer.
fn post(socket: &Path, endpoint: &str, body: &Value) -> Value {
    let mut c = UnixStream::connect(socket).unwrap();
    let body = body.to_string();
    write!(
        c,
        "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let (head, json_body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("application/vnd.docker.plugins.v1+json"),
        "{head}"
    );
    serde_json::from_str(json_body).unwrap_or_else(|e| panic!("{e}: {json_body}"))
}

fn start(s: &Scratch, socket: &Path) -> Child {
    let child = Command::new(common::bin())
        .arg("--root")
        .arg(&s.root)
        .args([
            "serve",
            "docker-volume",
            "--socket",
            socket.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if UnixStream::connect(socket).is_ok() {
            return child;
        }
        sleep(Duration::from_millis(50));
    }
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();
    panic!("the plugin did not start listening on {}", socket.display());
}

fn stop(mut child: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "plugin exit {status}");
}

#[test]
fn vm_docker_volume_plugin_create_mount_clone_unmount_remove() {
    common::require_dm_thin();
    let s = Scratch::new("plugin");
    s.create_pool(&[]);
    let socket = s.mnt.join("plugin.sock");
    let server = start(&s, &socket);
    assert_eq!(
        post(&socket, "/Plugin.Activate", &json!({})),
        json!({"Implements": ["VolumeDriver"]})
    );
    assert_eq!(
        post(&socket, "/VolumeDriver.Capabilities", &json!({}))["Capabilities"]["Scope"],
        "local"
    );
    assert_eq!(
        post(
            &socket,
            "/VolumeDriver.Create",
            &json!({"Name": "db", "Opts": {"size": "300M"}})
        )["Err"],
        ""
    );
    let bad = post(
        &socket,
        "/VolumeDriver.Create",
        &json!({"Name": "x", "Opts": {"colour": "blue"}}),
    );
    assert!(
        bad["Err"].as_str().unwrap().contains("unknown option"),
        "{bad}"
    );

    // Two containers mount it: one mount, counted by ID.
    let m1 = post(
        &socket,
        "/VolumeDriver.Mount",
        &json!({"Name": "db", "ID": "c1"}),
    );
    let m2 = post(
        &socket,
        "/VolumeDriver.Mount",
        &json!({"Name": "db", "ID": "c2"}),
    );
    assert_eq!(m1["Mountpoint"], m2["Mountpoint"]);
    let dir = PathBuf::from(m1["Mountpoint"].as_str().unwrap());
    fs::write(dir.join("table"), common::pattern(11, 16 << 20)).unwrap();
    common::sh("sync", &[]);
    assert_eq!(
        post(
            &socket,
            "/VolumeDriver.Unmount",
            &json!({"Name": "db", "ID": "c1"})
        )["Err"],
        ""
    );
    assert!(dir.join("table").exists(), "still mounted for c2");
    assert_eq!(
        post(&socket, "/VolumeDriver.Path", &json!({"Name": "db"}))["Mountpoint"],
        m1["Mountpoint"]
    );
    assert!(
        post(&socket, "/VolumeDriver.Remove", &json!({"Name": "db"}))["Err"]
            .as_str()
            .unwrap()
            .contains("mounted")
    );

    // A clone while the source is mounted: shares its blocks.
    let before = s.used_data_blocks();
    assert_eq!(
        post(
            &socket,
            "/VolumeDriver.Create",
            &json!({"Name": "db-copy", "Opts": {"from": "db"}})
        )["Err"],
        ""
    );
    let grown = s.used_data_blocks() - before;
    println!("clone of 16 MiB through the plugin: {grown} new pool block(s)");
    assert!(
        grown < 16,
        "clone grew the pool by {grown} blocks for 16 MiB"
    );
    let mc = post(
        &socket,
        "/VolumeDriver.Mount",
        &json!({"Name": "db-copy", "ID": "c3"}),
    );
    let copy = PathBuf::from(mc["Mountpoint"].as_str().unwrap());
    assert_eq!(
        fs::read(copy.join("table")).unwrap(),
        common::pattern(11, 16 << 20),
        "the clone holds the source's data"
    );

    let list = post(&socket, "/VolumeDriver.List", &json!({}));
    let names: Vec<&str> = list["Volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "db-copy"]);
    assert_eq!(
        post(&socket, "/VolumeDriver.Get", &json!({"Name": "db"}))["Volume"]["Status"]["size"],
        "300M"
    );
    assert!(
        !post(&socket, "/VolumeDriver.Get", &json!({"Name": "nope"}))["Err"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    // A restart keeps the reference counts.
    stop(server);
    assert!(!socket.exists(), "socket removed on SIGTERM");
    let server = start(&s, &socket);
    assert_eq!(
        post(
            &socket,
            "/VolumeDriver.Unmount",
            &json!({"Name": "db", "ID": "c2"})
        )["Err"],
        ""
    );
    assert!(!dir.join("table").exists(), "unmounted after its last user");
    assert_eq!(
        post(
            &socket,
            "/VolumeDriver.Unmount",
            &json!({"Name": "db-copy", "ID": "c3"})
        )["Err"],
        ""
    );
    // A second server on the same socket is refused.
    let out = s.run(&[
        "serve",
        "docker-volume",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("taken by a running server"));
    assert_eq!(
        post(&socket, "/VolumeDriver.Remove", &json!({"Name": "db-copy"}))["Err"],
        ""
    );
    assert_eq!(
        post(&socket, "/VolumeDriver.Remove", &json!({"Name": "db"}))["Err"],
        ""
    );
    stop(server);
    // Nothing left active: no layer device, no volume.
    let ls = s.json(&["layer", "ls"]);
    assert_eq!(ls, json!([]), "{ls}");
}
