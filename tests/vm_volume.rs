//! Thin volumes and Docker's volume plugin protocol against the real
//! kernel: a volume shared by containers outlives them and a pool
//! deactivate/activate; a `--from` clone is instant, independent, and
//! shares its source's blocks; the plugin's create/mount/clone/unmount/
//! remove cycle over its socket, with mount reference counting by ID.

mod common;

use common::{Pool, Scratch, vm_test};

use std::{
    fs,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The entry of `container inspect`'s `Mounts` at `destination`.
fn mount_at(inspect: &Value, destination: &str) -> Value {
    inspect["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["Destination"] == destination)
        .unwrap_or_else(|| panic!("no mount at {destination}: {inspect}"))
        .clone()
}
#[test]
fn vm_a_volume_outlives_its_containers_and_clones_are_independent() {
    vm_test("volumes", Pool::Small, |s| {
        s.ok(&[
            "image",
            "import",
            common::fixtures().join("demo-docker.tar").to_str().unwrap(),
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
        // ... refused at create (the image's /usr/bin/run is a symlink);
        // open_mount_dir refuses one a container plants later at mount time.
        s.fails(
            &[
                "container",
                "create",
                "sneaky",
                "--image",
                "demo:docker",
                "--volume",
                "x:/usr/bin/run/deeper",
            ],
            2,
            "/usr/bin/run is a symlink in the image",
        );
        let x = s.dir("x");
        s.ok(&["volume", "mount", "x", x.to_str().unwrap()]);
        assert!(
            fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .contains(&format!("{} xfs", x.display()))
        );
        s.ok(&["volume", "umount", "x"]);
    });
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
    vm_test("plugin", Pool::Small, |s| {
        let socket = s.mnt.join("plugin.sock");
        let server = start(s, &socket);
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
        // Empty to Docker (no lost+found), so it copies the image's content in.
        let entries: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            entries.is_empty(),
            "a new volume shows {entries:?} to Docker"
        );
        assert!(
            dir.parent().unwrap().join("lost+found").exists(),
            "lost+found stays at the filesystem's root, beside data/"
        );
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
        let got = post(&socket, "/VolumeDriver.Get", &json!({"Name": "db"}));
        let status = &got["Volume"]["Status"];
        assert_eq!(status["size"], "300M", "{got}");
        assert_eq!(status["fs"], "ext4", "{got}");
        assert!(
            status["usage_bytes"].as_u64().unwrap() >= 16 << 20,
            "usage counts the 16 MiB written: {got}"
        );
        assert_eq!(got["Volume"]["Mountpoint"], m1["Mountpoint"], "{got}");
        let copy_status = &list["Volumes"][1]["Status"];
        assert_eq!(copy_status["from"], "db", "{list}");
        assert!(
            !post(&socket, "/VolumeDriver.Get", &json!({"Name": "nope"}))["Err"]
                .as_str()
                .unwrap()
                .is_empty()
        );

        // A restart keeps the reference counts.
        stop(server);
        assert!(!socket.exists(), "socket removed on SIGTERM");
        let server = start(s, &socket);
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
    });
}

/// A copy of the OCI layout `src` at `dst` named `name` whose config lists
/// `volumes` (Docker's `VOLUME`): config, manifest and index rewritten with
/// their digests recomputed.
fn image_with_volumes(src: &Path, dst: &Path, volumes: &[&str], name: &str) {
    let _ = fs::remove_dir_all(dst);
    common::sh("cp", &["-a", src.to_str().unwrap(), dst.to_str().unwrap()]);
    let blob = |d: &str| {
        dst.join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let read = |p: &Path| -> Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
    let put = |v: &Value| -> (String, usize) {
        let bytes = serde_json::to_vec(v).unwrap();
        let d = common::sha256_digest(&bytes);
        fs::write(blob(&d), &bytes).unwrap();
        (d, bytes.len())
    };
    let mut index = read(&dst.join("index.json"));
    let mut manifest = read(&blob(index["manifests"][0]["digest"].as_str().unwrap()));
    let mut config = read(&blob(manifest["config"]["digest"].as_str().unwrap()));
    let set: serde_json::Map<String, Value> = volumes
        .iter()
        .map(|v| ((*v).to_owned(), json!({})))
        .collect();
    config["config"]["Volumes"] = Value::Object(set);
    let (d, n) = put(&config);
    manifest["config"]["digest"] = d.into();
    manifest["config"]["size"] = n.into();
    let (d, n) = put(&manifest);
    index["manifests"][0]["digest"] = d.into();
    index["manifests"][0]["size"] = n.into();
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = name.into();
    fs::write(dst.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Layers, volumes and containers as listed: what a refused create must
/// leave as it was.
fn made(s: &Scratch) -> (Value, Value, Value) {
    let ids = |v: Value, key: &str| -> Value {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x[key].clone())
            .collect()
    };
    (
        ids(s.json(&["layer", "ls"]), "id"),
        ids(s.json(&["volume", "ls"]), "name"),
        ids(s.json(&["container", "ls"]), "name"),
    )
}

/// Asserts `thinlayer ARGS` fails with `needle` on stderr and makes nothing.
fn refused(s: &Scratch, args: &[&str], needle: &str) {
    let before = made(s);
    let out = s.run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(needle),
        "{args:?}: want a refusal saying `{needle}`, got {}: {err}",
        out.status
    );
    assert_eq!(made(s), before, "{args:?} made something");
    println!("refused {args:?}: {}", err.trim());
}

/// The error of writing `path`: the write must fail with EROFS.
fn assert_erofs(path: &Path) {
    let e = fs::write(path, "x").expect_err(&format!("{} is writable", path.display()));
    assert_eq!(
        e.raw_os_error(),
        Some(nix::errno::Errno::EROFS as i32),
        "{}: {e}",
        path.display()
    );
}

/// The options of the mount at `at` (the last mountinfo line for it).
fn mount_options(at: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(at.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not a mount point", at.display()))
        .split(' ')
        .nth(5)
        .unwrap()
        .to_owned()
}

#[test]
fn vm_container_volumes_named_anonymous_bind_ro_volumes_from_and_refusals() {
    vm_test("vol-forms", Pool::Small, |s| {
        s.ok(&[
            "image",
            "import",
            common::fixtures().join("demo-docker.tar").to_str().unwrap(),
        ]);
        let vols_image = s.dir("vols-oci");
        image_with_volumes(
            &common::fixtures().join("demo-oci"),
            &vols_image,
            &["/usr/share", "/var/spool"],
            "vols:1",
        );
        s.ok(&["image", "import", vols_image.to_str().unwrap()]);
        s.ok(&["volume", "create", "data", "--size", "128M"]);

        // Named, shared, and read-only in a second container.
        s.ok(&[
            "container",
            "create",
            "a",
            "--image",
            "demo:docker",
            "--volume",
            "data:/var/data",
        ]);
        s.ok(&[
            "container",
            "create",
            "b",
            "--image",
            "demo:docker",
            "--volume",
            "data:/mnt/data:ro",
        ]);
        let a = PathBuf::from(s.ok(&["container", "mount", "a"]).trim());
        assert!(
            fs::read_dir(a.join("var/data")).unwrap().next().is_none(),
            "a new volume is empty: no lost+found"
        );
        fs::write(a.join("var/data/hello"), "from a\n").unwrap();
        let b = PathBuf::from(s.ok(&["container", "mount", "b"]).trim());
        assert_eq!(
            fs::read_to_string(b.join("mnt/data/hello")).unwrap(),
            "from a\n"
        );
        assert_erofs(&b.join("mnt/data/hello"));
        assert!(
            mount_options(&b.join("mnt/data"))
                .split(',')
                .any(|o| o == "ro")
        );

        // Anonymous: made for the container, filled from the image (the
        // image's /usr/share keep.txt), or empty where the image has nothing.
        s.ok(&[
            "container",
            "create",
            "anon",
            "--image",
            "demo:docker",
            "--volume",
            "/usr/share",
            "--volume",
            "/opt/empty",
        ]);
        let inspect = s.json(&["container", "inspect", "anon"]);
        let mounts = inspect["Mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 2, "{inspect}");
        let share = mounts
            .iter()
            .find(|m| m["Destination"] == "/usr/share")
            .unwrap_or_else(|| panic!("{inspect}"));
        assert_eq!(share["Type"], "volume");
        assert_eq!(share["Driver"], "thinlayer");
        assert_eq!(share["RW"], true);
        assert_eq!(share["Anonymous"], true);
        let anon_vol = share["Name"].as_str().unwrap().to_owned();
        assert!(anon_vol.starts_with("anon-anon-"), "{anon_vol}");
        assert!(s.ok(&["volume", "ls"]).contains(&anon_vol));
        let c = PathBuf::from(s.ok(&["container", "mount", "anon"]).trim());
        assert_eq!(
            fs::read_to_string(c.join("usr/share/keep.txt")).unwrap(),
            "kept\n"
        );
        assert!(
            !c.join("usr/share/lost+found").exists(),
            "no lost+found in the volume"
        );
        assert!(fs::read_dir(c.join("opt/empty")).unwrap().next().is_none());
        let inspect = s.json(&["container", "inspect", "anon"]);
        let source = inspect["Mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["Destination"] == "/usr/share")
            .unwrap()["Source"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            Path::new(&source).join("keep.txt").exists(),
            "inspect's Source is the volume's content on the host: {source}"
        );
        // Its blocks go back to the pool with `rm --volumes`.
        fs::write(c.join("usr/share/big"), common::pattern(3, 24 << 20)).unwrap();
        common::sh("sync", &[]);
        let full = s.used_data_blocks();
        s.ok(&["container", "umount", "anon"]);
        let out = s.ok(&["container", "rm", "anon", "--volumes"]);
        assert!(out.contains(&anon_vol), "{out}");
        assert!(
            !s.ok(&["volume", "ls"]).contains("anon-anon-"),
            "anonymous volumes removed"
        );
        let ids = s.ok(&["layer", "ls"]);
        assert!(!ids.contains(&format!("vol-{anon_vol}")), "{ids}");
        let after = s.used_data_blocks();
        println!("rm --volumes freed {} blocks", full - after);
        assert!(full - after >= 24 * 16, "24 MiB freed: {full} -> {after}");

        // Bind mounts: a directory (writable, nosuid,nodev) and a file (ro).
        let host_dir = s.dir("host-dir");
        fs::create_dir_all(&host_dir).unwrap();
        fs::write(host_dir.join("from-host"), "host data\n").unwrap();
        let host_file = s.dir("host-file");
        fs::write(&host_file, "a host file\n").unwrap();
        let dir_spec = format!("{}:/srv/host", host_dir.display());
        let file_spec = format!("{}:/etc/motd:ro", host_file.display());
        s.ok(&[
            "container",
            "create",
            "binds",
            "--image",
            "demo:docker",
            "--volume",
            &dir_spec,
            "--volume",
            &file_spec,
        ]);
        let m = PathBuf::from(s.ok(&["container", "mount", "binds"]).trim());
        assert_eq!(
            fs::read_to_string(m.join("srv/host/from-host")).unwrap(),
            "host data\n"
        );
        fs::write(m.join("srv/host/from-container"), "hi\n").unwrap();
        assert_eq!(
            fs::read_to_string(host_dir.join("from-container")).unwrap(),
            "hi\n"
        );
        assert_eq!(
            fs::read_to_string(m.join("etc/motd")).unwrap(),
            "a host file\n"
        );
        assert_erofs(&m.join("etc/motd"));
        let opts = mount_options(&m.join("srv/host"));
        assert!(
            opts.contains("nosuid")
                && opts.contains("nodev")
                && !opts.split(',').any(|o| o == "ro"),
            "{opts}"
        );
        let inspect = s.json(&["container", "inspect", "binds"]);
        let motd = mount_at(&inspect, "/etc/motd");
        assert_eq!(motd["Type"], "bind", "{inspect}");
        assert_eq!(motd["Source"], host_file.to_str().unwrap());
        assert_eq!(motd["RW"], false);

        // --volumes-from: a's named volume and binds' binds at their paths,
        // all read-only with :ro.
        s.ok(&[
            "container",
            "create",
            "reader",
            "--image",
            "demo:docker",
            "--volumes-from",
            "a:ro",
            "--volumes-from",
            "binds",
        ]);
        let r = PathBuf::from(s.ok(&["container", "mount", "reader"]).trim());
        assert_eq!(
            fs::read_to_string(r.join("var/data/hello")).unwrap(),
            "from a\n"
        );
        assert_erofs(&r.join("var/data/new"));
        assert_eq!(
            fs::read_to_string(r.join("srv/host/from-host")).unwrap(),
            "host data\n"
        );
        let inspect = s.json(&["container", "inspect", "reader"]);
        assert_eq!(inspect["Mounts"].as_array().unwrap().len(), 3, "{inspect}");

        // The image's config Volumes become anonymous volumes filled from it;
        // a --volume at one of their paths replaces it.
        s.ok(&["container", "create", "img", "--image", "vols:1"]);
        let inspect = s.json(&["container", "inspect", "img"]);
        let dests: Vec<&str> = inspect["Mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests.len(), 2, "{inspect}");
        assert!(
            dests.contains(&"/usr/share") && dests.contains(&"/var/spool"),
            "{inspect}"
        );
        let i = PathBuf::from(s.ok(&["container", "mount", "img"]).trim());
        assert_eq!(
            fs::read_to_string(i.join("usr/share/keep.txt")).unwrap(),
            "kept\n"
        );
        s.ok(&["container", "umount", "img"]);
        s.ok(&[
            "container",
            "create",
            "img2",
            "--image",
            "vols:1",
            "--volume",
            "data:/usr/share",
        ]);
        let inspect = s.json(&["container", "inspect", "img2"]);
        let share = mount_at(&inspect, "/usr/share");
        assert_eq!(share["Name"], "data", "{inspect}");
        // Without --volumes the anonymous volumes outlive the container.
        s.ok(&["container", "rm", "img"]);
        let left: Vec<String> = s
            .json(&["volume", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .filter(|n| n.starts_with("anon-img-"))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        for v in &left {
            s.ok(&["volume", "rm", v]);
        }

        // rm --volumes keeps an anonymous volume something else still uses
        // (here a clone of it), saying why, and removes the container.
        s.ok(&[
            "container",
            "create",
            "k",
            "--image",
            "demo:docker",
            "--volume",
            "/opt/k",
        ]);
        s.ok(&["volume", "create", "kc", "--from", "anon-k-0"]);
        let out = s.ok(&["container", "rm", "k", "--volumes"]);
        assert!(
            out.contains("kept its anonymous volume anon-k-0: it has clone(s) vol-kc"),
            "{out}"
        );
        assert!(!s.ok(&["container", "ls"]).contains("\nk "));
        s.ok(&["volume", "rm", "kc"]);
        s.ok(&["volume", "rm", "anon-k-0"]);

        // A volume an older thinlayer made (no data/ directory: its record
        // has no layout) is still mounted at its filesystem's root.
        s.ok(&["volume", "create", "old", "--size", "64M"]);
        let rec = s.root.join("store/volumes/old.rec");
        let mut v: Value = thinlayer_pool::record::read(&rec, "volume").unwrap();
        v.as_object_mut()
            .unwrap()
            .remove("layout")
            .expect("a layout field");
        thinlayer_pool::record::write(&rec, "volume", &v).unwrap();
        s.ok(&[
            "container",
            "create",
            "oldc",
            "--image",
            "demo:docker",
            "--volume",
            "old:/old",
        ]);
        let o = PathBuf::from(s.ok(&["container", "mount", "oldc"]).trim());
        assert!(o.join("old/lost+found").is_dir() && o.join("old/data").is_dir());
        s.ok(&["container", "umount", "oldc"]);
        s.ok(&["container", "rm", "oldc"]);
        s.ok(&["volume", "rm", "old"]);

        // Bad input: a clear error, nothing made.
        let demo = ["container", "create", "bad", "--image", "demo:docker"];
        let with = |extra: &[&str]| -> Vec<String> {
            demo.iter().chain(extra).map(|s| (*s).to_owned()).collect()
        };
        let cases: Vec<(Vec<String>, &str)> = vec![
            (with(&["--volume", "nope:/x"]), "no volume `nope`"),
            (with(&["--volume", "data:rel/path"]), "absolute path"),
            (with(&["--volume", "/srv/../etc"]), "without `..`"),
            (
                with(&["--volume", "/nonexistent/dir:/x"]),
                "bind source /nonexistent/dir",
            ),
            (with(&["--volumes-from", "nope"]), "--volumes-from nope"),
            (
                with(&["--volume", "/usr/bin/run"]),
                "/usr/bin/run is a symlink in the image",
            ),
            (
                with(&["--volume", "data:/usr/bin/run/deeper"]),
                "is a symlink in the image",
            ),
            (
                with(&["--volume", "data:/x", "--volume", "/x"]),
                "two mounts at /x",
            ),
            (
                with(&["--volume", "data:/etc/motd"]),
                "is a file in the image",
            ),
            (with(&["--volume", "data:/x:rx"]), "unknown mode"),
        ];
        for (args, needle) in &cases {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            refused(s, &a, needle);
        }

        for c in ["a", "b", "binds", "reader"] {
            s.ok(&["container", "umount", c]);
        }
        for c in ["a", "b", "binds", "reader", "img2"] {
            s.ok(&["container", "rm", c, "--volumes"]);
        }
        assert!(
            s.ok(&["volume", "ls"]).contains("data"),
            "a named volume stays"
        );
        s.ok(&["volume", "rm", "data"]);
        assert_eq!(
            s.json(&["layer", "ls"]).as_array().unwrap().len(),
            3,
            "the image's layers only"
        );
        let check = s.run(&["pool", "check"]);
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    });
}
