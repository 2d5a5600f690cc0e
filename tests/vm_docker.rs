//! A real dockerd (Debian's 20.10, `THINLAYER_VM_EXTRAS=docker`) with
//! `thinlayer serve docker` as its storage driver (`--experimental -s
//! thinlayer`) and volume driver: images loaded with `docker load`,
//! containers run, diffed, committed, exported, saved and loaded into a
//! fresh pool, removed; dockerd and the plugin restarted; the scenario of
//! moby's `integration/plugin/graphdriver/external_test.go` with its call
//! counts; and bad input at the plugin's socket answered with `{"Err"}`
//! and no change.

mod common;

use common::{Pool, Scratch, Served, http_post, vm_test};

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    path::Path,
};

use common::docker::{
    Dockerd, docker_layers, docker_layers_settled, finish_clean, fixture, init_templates,
    init_templates_made, mounted_spares, mounted_spares_made, plugin, require_docker,
};
use serde_json::Value;

/// The tree `docker export` of a container from `image` holds, extracted
/// and described; the files Docker writes per container (their mtimes
/// differ) compared by content only.
fn exported_tree(d: &Dockerd, image: &str, dir: &Path) -> thinlayer_image::tree::Manifest {
    let name = format!("export-{}", dir.file_name().unwrap().to_string_lossy());
    d.ok(&["create", "--name", &name, image]);
    let tarball = dir.with_extension("tar");
    d.ok(&["export", "-o", tarball.to_str().unwrap(), &name]);
    d.ok(&["rm", &name]);
    fs::create_dir_all(dir).unwrap();
    common::sh(
        "tar",
        &[
            "-xpf",
            tarball.to_str().unwrap(),
            "-C",
            dir.to_str().unwrap(),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
        ],
    );
    let mut m = thinlayer_image::tree::manifest(dir).unwrap();
    for per_container in [
        ".dockerenv",
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
        "etc/mtab",
        "dev/console",
    ] {
        if let Some(e) = m.get_mut(Path::new(per_container)) {
            e.mtime = None;
        }
    }
    m
}

#[test]
fn vm_docker_runs_on_thin_snapshots() {
    vm_test("docker", Pool::Small, |s| {
        require_docker();
        let devices_before = common::dm_devices();
        let base = s.root.parent().unwrap().to_path_buf();
        let mut p = plugin(s);
        let mut d = Dockerd::start(&base.join("data"), "a", "thinlayer", &[]);

        // docker info shows the driver and the pool.
        let info = d.ok(&["info", "--format", "{{.Driver}} {{json .DriverStatus}}"]);
        assert!(info.starts_with("thinlayer "), "{info}");
        assert!(
            info.contains("Pool Root") && info.contains("Data Space Used"),
            "{info}"
        );

        // A 3-layer image, loaded: three layers of the pool, the driver's own.
        let loaded = d.ok(&["load", "-i", fixture("demo-docker.tar").to_str().unwrap()]);
        assert!(loaded.contains("Loaded image: demo:docker"), "{loaded}");
        let layers = d.ok(&[
            "image",
            "inspect",
            "-f",
            "{{len .RootFS.Layers}} {{.GraphDriver.Name}}",
            "demo:docker",
        ]);
        assert_eq!(layers, "3 thinlayer");
        assert_eq!(docker_layers(s).len(), 3, "{:?}", docker_layers(s));

        // A container prints from the image (the top layer's file, the mid
        // layer's edit, the base's deletion undone by nothing).
        assert_eq!(
            d.ok(&[
                "run",
                "--rm",
                "demo:docker",
                "cat",
                "/etc/motd",
                "/etc/os-release"
            ]),
            "welcome to the top layer\nNAME=\"thinlayer-fixture\"\nVERSION_ID=2"
        );
        assert_eq!(
            d.ok(&[
                "run",
                "--rm",
                "demo:docker",
                "sh",
                "-c",
                "ls /opt; test ! -e /usr/share/data.bin && echo gone"
            ]),
            "gone",
            "whiteouts of the upper layers hold in the container"
        );
        // What Get returns hides the filesystem's lost+found.
        assert_eq!(
            d.ok(&["run", "--rm", "demo:docker", "ls", "-a", "/"])
                .lines()
                .filter(|l| *l == "lost+found")
                .count(),
            0
        );
        // Measured as the plugin leaves the image between containers: its
        // template keeps a mounted spare, whose filesystem wrote its
        // superblock when mounted (a block of its own).
        let spares_image = mounted_spares_made(s);
        assert!(
            !spares_image.is_empty(),
            "no mounted spare kept for the next container"
        );
        let used_image = s.used_data_blocks();
        // A container size below the base device's is refused, saying so.
        let e = d.fails(
            &[
                "run",
                "--rm",
                "--storage-opt",
                "size=1M",
                "demo:docker",
                "true",
            ],
            "size",
        );
        println!("size=1M: {e}");

        // A container writes; docker diff shows exactly that change.
        d.ok(&[
            "run",
            "--name",
            "writer",
            "demo:docker",
            "sh",
            "-c",
            "echo written > /hello.txt",
        ]);
        assert_eq!(d.ok(&["diff", "writer"]), "A /hello.txt");
        assert_eq!(
            d.ok(&[
                "inspect",
                "-f",
                "{{.GraphDriver.Name}} {{index .GraphDriver.Data \"Parent\"}}",
                "writer"
            ])
            .split(' ')
            .next(),
            Some("thinlayer")
        );

        // commit: an image that runs and sees the change.
        d.ok(&["commit", "writer", "demo:committed"]);
        assert_eq!(
            d.ok(&["run", "--rm", "demo:committed", "cat", "/hello.txt"]),
            "written"
        );
        // The image had its init template before `writer` (the runs above
        // taught it): writer's init layer shares it, no pool layer.
        let layers = docker_layers_settled(s, 5);
        assert_eq!(
            layers.len(),
            5,
            "3 image layers, the commit's, the container's: {layers:?}"
        );
        assert!(
            layers.iter().any(|l| l["parent"]
                .as_str()
                .is_some_and(|p| p.ends_with("-init-template"))),
            "writer's layer is a snapshot of the template: {layers:?}"
        );
        // The containers on the image taught the plugin its init layer.
        assert!(
            !init_templates_made(s).is_empty(),
            "{:?}",
            s.json(&["layer", "ls"])
        );

        // export holds it.
        let export = base.join("w-export.tar");
        d.ok(&["export", "-o", export.to_str().unwrap(), "writer"]);
        assert_eq!(
            common::sh("tar", &["-xOf", export.to_str().unwrap(), "hello.txt"]),
            "written\n"
        );

        // The volume half on the same socket.
        d.ok(&["volume", "create", "-d", "thinlayer", "vol1"]);
        d.ok(&[
            "run",
            "--rm",
            "-v",
            "vol1:/data",
            "demo:docker",
            "sh",
            "-c",
            "echo kept > /data/f",
        ]);
        assert_eq!(
            d.ok(&[
                "run",
                "--rm",
                "-v",
                "vol1:/data",
                "demo:docker",
                "cat",
                "/data/f"
            ]),
            "kept"
        );
        d.ok(&["volume", "rm", "vol1"]);

        // save, for a fresh pool and dockerd below; the tree as this one has it.
        let saved = base.join("committed.tar");
        d.ok(&["save", "-o", saved.to_str().unwrap(), "demo:committed"]);
        let here = exported_tree(&d, "demo:committed", &base.join("tree-a"));

        // A running container across a restart of the plugin alone: its
        // mount's references are kept, so the stop's Put finds them.
        d.ok(&["run", "-d", "--name", "long", "demo:docker", "sleep", "600"]);
        p.stop();
        let mut p = plugin(s);
        d.ok(&["stop", "-t", "1", "long"]);
        d.ok(&["rm", "long"]);

        // dockerd and the plugin both restart: everything is still there.
        d.stop();
        p.stop();
        let mut p = plugin(s);
        let mut d = Dockerd::start(&base.join("data"), "b", "thinlayer", &[]);
        let images = d.ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
        assert!(
            images.contains("demo:docker") && images.contains("demo:committed"),
            "{images}"
        );
        // A new dockerd (perhaps another version) teaches the templates
        // again, but for the one the stopped container `writer` stands on
        // (its layer is a snapshot of it, its init layer shares it).
        let kept = init_templates(s);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(d.ok(&["diff", "writer"]), "A /hello.txt");
        assert_eq!(
            d.ok(&["run", "--rm", "demo:committed", "cat", "/hello.txt"]),
            "written"
        );

        // rm and rmi give the pool's blocks back.
        d.ok(&["rm", "writer"]);
        d.ok(&["rmi", "demo:committed"]);
        let layers = docker_layers_settled(s, 3);
        assert_eq!(layers.len(), 3, "{layers:?}");
        // The kernel work of a removal runs once requests pause: the
        // blocks come back then, with no request asking for them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let trash = || {
            s.json(&["pool", "status"])["trash"]
                .as_array()
                .map_or(0, Vec::len)
        };
        while trash() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert_eq!(
            trash(),
            0,
            "removed layers still in the trash 60 s after rm/rmi"
        );
        let used_after = s.used_data_blocks();
        let spares_after = mounted_spares(s);
        println!(
            "data blocks: {used_image} with the image ({} mounted spares), {used_after} after rm \
             and rmi ({})",
            spares_image.len(),
            spares_after.len()
        );
        assert!(
            spares_after.len() <= spares_image.len(),
            "more mounted spares after rm/rmi than before: {spares_after:?}, {spares_image:?}"
        );
        assert!(
            used_after <= used_image,
            "{used_after} blocks used after rm/rmi, {used_image} before"
        );

        // Everything removed: no layer, no thin device left; the pool checks clean.
        finish_clean(s, &mut d, &mut p, &devices_before);

        // save + load into a fresh pool and dockerd: the identical tree.
        let s2 = Scratch::new("docker-fresh");
        s2.create_pool(&[]);
        let mut p2 = plugin(&s2);
        let base2 = s2.root.parent().unwrap().to_path_buf();
        let mut d2 = Dockerd::start(&base2.join("data"), "c", "thinlayer", &[]);
        d2.ok(&["load", "-i", saved.to_str().unwrap()]);
        let there = exported_tree(&d2, "demo:committed", &base2.join("tree-b"));
        let diffs = thinlayer_image::tree::differences(&here, &there, 20);
        assert!(diffs.is_empty(), "the loaded image differs: {diffs:#?}");
        assert!(
            here.contains_key(Path::new("hello.txt"))
                && here.contains_key(Path::new("bin/busybox"))
        );
        d2.ok(&["rmi", "demo:committed"]);
        d2.stop();
        p2.stop();
        s2.ok(&["pool", "check"]);
    });
}

/// Counts of the plugin's requests, from its log.
fn calls(log: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        if let Some(i) = line.find("endpoint=\"/") {
            let rest = &line[i + 11..];
            let name = rest.split('"').next().unwrap_or_default().to_owned();
            if line.contains(": request endpoint=") {
                *out.entry(name).or_insert(0) += 1;
            }
        }
    }
    out
}

/// moby's `TestExternalGraphDriver` (v20.10), against the real plugin:
/// a daemon with the image, a container writing /hello, a daemon restart,
/// inspect, diff (which must hold `A /hello`), rm -f, info, stop; then the
/// call counts it checks.
#[test]
fn vm_docker_moby_external_graphdriver_scenario() {
    vm_test("docker-moby", Pool::Small, |s| {
        require_docker();
        let base = s.root.parent().unwrap().to_path_buf();
        let mut p = plugin(s);
        let mut d = Dockerd::start(&base.join("data"), "a", "thinlayer", &[]);
        d.ok(&["load", "-i", fixture("demo-docker.tar").to_str().unwrap()]);
        let id = d.ok(&[
            "run",
            "-d",
            "demo:docker",
            "sh",
            "-c",
            "echo hello > /hello",
        ]);
        d.ok(&["wait", &id]);
        d.stop();
        let mut d = Dockerd::start(&base.join("data"), "b", "thinlayer", &[]);
        assert_eq!(
            d.ok(&["inspect", "-f", "{{.GraphDriver.Name}}", &id]),
            "thinlayer"
        );
        let diff = d.ok(&["diff", &id]);
        assert!(diff.lines().any(|l| l == "A /hello"), "diffs: {diff}");
        d.ok(&["rm", "-f", &id]);
        d.ok(&["info"]);
        d.stop();
        let log = p.log();
        p.stop();
        let n = calls(&log);
        println!("plugin calls: {n:?}");
        let get = |k: &str| n.get(k).copied().unwrap_or(0);
        assert_eq!(get("Plugin.Activate"), 2, "{n:?}");
        assert_eq!(get("GraphDriver.Init"), 2, "{n:?}");
        assert_eq!(get("GraphDriver.Cleanup"), 2, "{n:?}");
        assert_eq!(get("GraphDriver.Changes"), 1, "{n:?}");
        assert_eq!(get("GraphDriver.DiffSize"), 0, "{n:?}");
        assert_eq!(get("GraphDriver.Diff"), 0, "{n:?}");
        assert_eq!(get("GraphDriver.GetMetadata"), 1, "{n:?}");
        for at_least_one in [
            "GraphDriver.Create",
            "GraphDriver.CreateReadWrite",
            "GraphDriver.Remove",
            "GraphDriver.Get",
            "GraphDriver.Put",
            "GraphDriver.ApplyDiff",
            "GraphDriver.Status",
        ] {
            assert!(get(at_least_one) >= 1, "{at_least_one}: {n:?}");
        }
        assert_eq!(
            get("GraphDriver.Get"),
            get("GraphDriver.Put"),
            "every Get put back: {n:?}"
        );
        s.ok(&["pool", "check"]);
    });
}

/// One request with a body; the status and the parsed answer.
fn call(socket: &Path, endpoint: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http_post(socket, endpoint, body.to_string().as_bytes());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{endpoint}: {e}: {text}"));
    (status, v)
}

/// `{"Err"}` of an answer, asserted present and non-empty.
fn err_of(answer: &(u16, Value)) -> String {
    let e = answer.1["Err"].as_str().unwrap_or_default().to_owned();
    assert!(!e.is_empty(), "no Err in {answer:?}");
    e
}

#[test]
fn vm_docker_plugin_refuses_bad_input_and_changes_nothing() {
    vm_test("docker-bad", Pool::Small, |s| {
        let sock = s.root.parent().unwrap().join("p.sock");
        let _p = Served::start(s, &["serve", "docker"], &sock);
        let json = |v: &str| -> Value { serde_json::from_str(v).unwrap() };

        let (st, v) = call(&sock, "/Plugin.Activate", &json("{}"));
        assert_eq!(
            (st, v),
            (
                200,
                json(r#"{"Implements":["GraphDriver","VolumeDriver"]}"#)
            )
        );
        let (st, v) = call(&sock, "/GraphDriver.Capabilities", &json("{}"));
        assert_eq!(
            (st, v),
            (
                200,
                json(r#"{"Capabilities":{"ReproducesExactDiffs":false}}"#)
            )
        );
        // Init: remapped ids and daemon storage options are refused, saying why.
        let e = err_of(&call(
            &sock,
            "/GraphDriver.Init",
            &json(
                r#"{"Home":"/x","Opts":null,"UIDMaps":[{"container_id":0,"host_id":100000,"size":65536}],"GIDMaps":null}"#,
            ),
        ));
        assert!(e.contains("--userns-remap"), "{e}");
        let e = err_of(&call(
            &sock,
            "/GraphDriver.Init",
            &json(r#"{"Home":"/x","Opts":["dm.basesize=20G"]}"#),
        ));
        assert!(e.contains("dm.basesize"), "{e}");
        let (_, v) = call(
            &sock,
            "/GraphDriver.Init",
            &json(r#"{"Home":"/x","Opts":[],"UIDMaps":null,"GIDMaps":null}"#),
        );
        assert_eq!(v, json("{}"));

        // A base layer and a child.
        assert_eq!(
            call(&sock, "/GraphDriver.Create", &json(r#"{"ID":"b1"}"#)).1,
            json("{}")
        );
        assert_eq!(
            call(
                &sock,
                "/GraphDriver.CreateReadWrite",
                &json(r#"{"ID":"c1","Parent":"b1"}"#)
            )
            .1,
            json("{}")
        );
        let layers_before = s.json(&["layer", "ls"]);

        // Unknown ids.
        for ep in [
            "/GraphDriver.Get",
            "/GraphDriver.Remove",
            "/GraphDriver.GetMetadata",
            "/GraphDriver.Changes",
        ] {
            let e = err_of(&call(&sock, ep, &json(r#"{"ID":"nope"}"#)));
            assert!(e.contains("no layer `nope`"), "{ep}: {e}");
        }
        let e = err_of(&call(&sock, "/GraphDriver.Put", &json(r#"{"ID":"nope"}"#)));
        assert!(e.contains("Put without a Get"), "{e}");
        assert_eq!(
            call(&sock, "/GraphDriver.Exists", &json(r#"{"ID":"nope"}"#)).1,
            json(r#"{"Exists":false}"#)
        );
        assert_eq!(
            call(&sock, "/GraphDriver.Exists", &json(r#"{"ID":"b1"}"#)).1,
            json(r#"{"Exists":true}"#)
        );
        let (st, v) = call(&sock, "/GraphDriver.Diff", &json(r#"{"ID":"nope"}"#));
        assert_eq!(
            st, 500,
            "a Diff that cannot start is a 500 Docker reports: {v}"
        );
        assert!(err_of(&(st, v)).contains("nope"));
        let e = err_of(&call(
            &sock,
            "/GraphDriver.Create",
            &json(r#"{"ID":"x1","Parent":"nope"}"#),
        ));
        assert!(e.contains("no layer `nope`"), "{e}");

        // Remove of a layer with children.
        let e = err_of(&call(&sock, "/GraphDriver.Remove", &json(r#"{"ID":"b1"}"#)));
        assert!(e.contains("has children (c1)"), "{e}");

        // size storage-opt below the base, beyond the pool; then one that fits.
        let e = err_of(&call(
            &sock,
            "/GraphDriver.CreateReadWrite",
            &json(r#"{"ID":"s1","Parent":"b1","StorageOpt":{"size":"1M"}}"#),
        ));
        assert!(e.contains("below"), "{e}");
        let e = err_of(&call(
            &sock,
            "/GraphDriver.CreateReadWrite",
            &json(r#"{"ID":"s1","Parent":"b1","StorageOpt":{"size":"100G"}}"#),
        ));
        assert!(e.contains("beyond the pool"), "{e}");
        let e = err_of(&call(
            &sock,
            "/GraphDriver.CreateReadWrite",
            &json(r#"{"ID":"s1","Parent":"b1","StorageOpt":{"dm.basesize":"1G"}}"#),
        ));
        assert!(e.contains("unknown storage option"), "{e}");
        assert_eq!(
            s.json(&["layer", "ls"]),
            layers_before,
            "a refused call changed the pool"
        );

        // ApplyDiff of hostile and truncated tars: refused, the layer empty again.
        let hostile = fixture("hostile");
        assert_eq!(
            call(
                &sock,
                "/GraphDriver.Create",
                &json(r#"{"ID":"h1","Parent":"b1"}"#)
            )
            .1,
            json("{}")
        );
        for name in [
            "dotdot",
            "absolute",
            "symlink-escape",
            "symlink-parent-escape",
            "hardlink-escape",
            "whiteout-escape",
            "truncated",
        ] {
            let tar = fs::read(hostile.join(format!("{name}.tar"))).unwrap();
            let (st, text) = http_post(&sock, "/GraphDriver.ApplyDiff?id=h1&parent=b1", &tar);
            let v: Value = serde_json::from_str(&text).unwrap();
            let e = err_of(&(st, v));
            println!("ApplyDiff {name}: {e}");
            let changes = call(
                &sock,
                "/GraphDriver.Changes",
                &json(r#"{"ID":"h1","Parent":"b1"}"#),
            )
            .1;
            assert_eq!(
                changes,
                json(r#"{"Changes":[]}"#),
                "{name} left changes: {changes}"
            );
        }
        for escaped in ["/tmp/escaped-through-symlink", "/escaped-abs", "/escaped"] {
            assert!(!Path::new(escaped).exists(), "{escaped} was written");
        }
        // A chunked upload that breaks off half way (as Go sends a body).
        {
            let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            let good = fs::read(fixture("layers/base.tar")).unwrap();
            let half = &good[..good.len() / 2];
            let mut req = b"POST /GraphDriver.ApplyDiff?id=h1&parent=b1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            req.extend_from_slice(format!("{:x}\r\n", half.len()).as_bytes());
            req.extend_from_slice(half);
            c.write_all(&req).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            assert!(
                answer.contains("\"Err\"") && answer.contains("before the body ended"),
                "{answer}"
            );
            let changes = call(
                &sock,
                "/GraphDriver.Changes",
                &json(r#"{"ID":"h1","Parent":"b1"}"#),
            )
            .1;
            assert_eq!(
                changes,
                json(r#"{"Changes":[]}"#),
                "a broken-off apply left changes: {changes}"
            );
        }
        // A good one, streamed chunked, then Diff streams it back out.
        {
            let good = fs::read(fixture("layers/other.tar")).unwrap();
            let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            let mut req = b"POST /GraphDriver.ApplyDiff?id=h1&parent=b1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
            for piece in good.chunks(7000) {
                req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                req.extend_from_slice(piece);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n\r\n");
            c.write_all(&req).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            assert!(answer.contains("\"Size\":"), "{answer}");
            let changes = call(
                &sock,
                "/GraphDriver.Changes",
                &json(r#"{"ID":"h1","Parent":"b1"}"#),
            )
            .1;
            let paths: Vec<&str> = changes["Changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["Path"].as_str().unwrap())
                .collect();
            assert!(paths.contains(&"/etc/other"), "{changes}");
            let (st, raw) = http_post(&sock, "/GraphDriver.Diff", br#"{"ID":"h1","Parent":"b1"}"#);
            assert_eq!(st, 200);
            assert!(
                raw.contains("only in the other image"),
                "the diff stream holds the layer's file"
            );
        }
        // Get twice, the same path; the second Put parks the mount (the
        // Remove unmounts it); the tree has no lost+found.
        let dir = call(&sock, "/GraphDriver.Get", &json(r#"{"ID":"h1"}"#)).1["Dir"]
            .as_str()
            .unwrap()
            .to_owned();
        let again = call(&sock, "/GraphDriver.Get", &json(r#"{"ID":"h1"}"#)).1["Dir"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(dir, again);
        assert!(dir.ends_with("/h1/rootfs"), "{dir}");
        assert!(!Path::new(&dir).join("lost+found").exists());
        assert!(Path::new(&dir).join("etc/other").exists());
        let e = err_of(&call(
            &sock,
            "/GraphDriver.ApplyDiff?id=h1&parent=b1",
            &json("{}"),
        ));
        assert!(e.contains("mounted"), "{e}");
        call(&sock, "/GraphDriver.Put", &json(r#"{"ID":"h1"}"#));
        assert!(
            Path::new(&dir).join("etc/other").exists(),
            "one reference left"
        );
        call(&sock, "/GraphDriver.Put", &json(r#"{"ID":"h1"}"#));
        assert!(
            Path::new(&dir).join("etc/other").exists(),
            "parked at zero references"
        );
        assert!(
            err_of(&call(&sock, "/GraphDriver.Put", &json(r#"{"ID":"h1"}"#)))
                .contains("without a Get"),
            "a parked layer takes no Put"
        );

        for id in ["h1", "c1", "b1"] {
            assert_eq!(
                call(
                    &sock,
                    "/GraphDriver.Remove",
                    &json(&format!(r#"{{"ID":"{id}"}}"#))
                )
                .1,
                json("{}")
            );
        }
        assert!(!Path::new(&dir).exists(), "the Remove unmounted it");
        s.ok(&["pool", "check"]);
    });
}
