//! Docker's volume forms under a real dockerd (Debian's 20.10,
//! `THINLAYER_VM_EXTRAS=docker`) with `thinlayer serve docker` as its
//! storage and volume driver: each gives the result Docker documents. A
//! named volume outlives its containers; a data container and
//! `--volumes-from` share it; `:ro` refuses writes with EROFS; a new
//! volume mounted over image content (`/etc`) is first filled with it (the
//! plugin shows Docker an empty `data/`, no `lost+found`); an anonymous
//! volume gets the image's content and `docker rm -v` removes it, its thin
//! device and blocks too; a clone (`-o from=`) holds its source's data and
//! diverges; everything holds across restarts of the plugin and dockerd,
//! mount IDs included; `pool check` is clean at the end.

mod common;

use common::{Pool, vm_test};

use common::docker::{Dockerd, fixture, plugin, require_docker};

/// `docker run --rm IMAGE-less ARGS`: demo:docker with `args` before it
/// and `cmd` after.
fn run(d: &Dockerd, opts: &[&str], cmd: &str) -> String {
    let mut a = vec!["run", "--rm"];
    a.extend_from_slice(opts);
    a.extend(["demo:docker", "sh", "-c", cmd]);
    d.ok(&a)
}

#[test]
fn vm_docker_volumes_behave_as_docker_documents() {
    vm_test("docker-volumes", Pool::Small, |s| {
        require_docker();
        let base = s.root.parent().unwrap().to_path_buf();
        let mut p = plugin(s);
        let mut d = Dockerd::start(&base.join("data"), "a", "thinlayer", &[]);
        let loaded = d.ok(&["load", "-i", fixture("demo-docker.tar").to_str().unwrap()]);
        assert!(loaded.contains("demo:docker"), "{loaded}");

        // A named volume with options; Status shows them.
        d.ok(&[
            "volume",
            "create",
            "-d",
            "thinlayer",
            "-o",
            "size=128M",
            "-o",
            "fs=ext4",
            "named",
        ]);
        let v = d.volume("named");
        assert_eq!(v["Driver"], "thinlayer", "{v}");
        assert_eq!(v["Status"]["size"], "128M", "{v}");
        assert_eq!(v["Status"]["fs"], "ext4", "{v}");
        assert!(v["Status"]["usage"].is_string(), "{v}");
        assert!(s.layer_ids::<Vec<_>>().contains(&"vol-named".to_owned()));

        // Written by one container, read by the next; empty to the first.
        assert_eq!(
            run(
                &d,
                &["-v", "named:/data"],
                "ls -A /data; echo one > /data/f"
            ),
            "",
            "a new volume is empty: no lost+found"
        );
        assert_eq!(run(&d, &["-v", "named:/data"], "cat /data/f"), "one");

        // A data container and --volumes-from.
        d.ok(&[
            "create",
            "--name",
            "datac",
            "-v",
            "named:/data",
            "demo:docker",
            "true",
        ]);
        assert_eq!(run(&d, &["--volumes-from", "datac"], "cat /data/f"), "one");
        run(&d, &["--volumes-from", "datac"], "echo shared >> /data/f");
        assert_eq!(
            run(&d, &["-v", "named:/data"], "cat /data/f"),
            "one\nshared"
        );

        // :ro refuses writes with EROFS (also through --volumes-from ...:ro).
        d.fails(
            &[
                "run",
                "--rm",
                "-v",
                "named:/data:ro",
                "demo:docker",
                "sh",
                "-c",
                "echo x > /data/g",
            ],
            "Read-only file system",
        );
        d.fails(
            &[
                "run",
                "--rm",
                "--volumes-from",
                "datac:ro",
                "demo:docker",
                "sh",
                "-c",
                "echo x > /data/g",
            ],
            "Read-only file system",
        );

        // A new volume over image content is first filled with it.
        d.ok(&["volume", "create", "-d", "thinlayer", "etcvol"]);
        let passwd = run(&d, &["-v", "etcvol:/etc"], "cat /etc/passwd; ls -a /etc");
        assert!(passwd.contains("root:x:0:0:root"), "{passwd}");
        assert!(passwd.contains("os-release"), "{passwd}");
        assert!(!passwd.contains("lost+found"), "{passwd}");

        // An anonymous volume: the image's content, removed by rm -v with its
        // thin device and blocks.
        let before_anon = s.used_data_blocks();
        d.ok(&[
            "run", "--name", "anon", "--volume-driver", "thinlayer", "-v", "/usr/share",
            "demo:docker", "sh", "-c",
            "cat /usr/share/keep.txt; dd if=/dev/urandom of=/usr/share/big bs=1M count=16 2>/dev/null; sync",
        ]);
        let anon = d.ok(&[
            "inspect",
            "-f",
            "{{range .Mounts}}{{.Name}} {{.Driver}}{{end}}",
            "anon",
        ]);
        let (anon_name, driver) = anon.split_once(' ').unwrap();
        assert_eq!(driver, "thinlayer", "{anon}");
        assert_eq!(d.ok(&["logs", "anon"]), "kept");
        let anon_layer = format!("vol-{anon_name}");
        assert!(
            s.layer_ids::<Vec<_>>().contains(&anon_layer),
            "{:?}",
            s.layer_ids::<Vec<_>>()
        );
        let with_anon = s.used_data_blocks();
        d.ok(&["rm", "-v", "anon"]);
        assert!(!d.ok(&["volume", "ls", "-q"]).contains(anon_name));
        assert!(
            !s.layer_ids::<Vec<_>>().contains(&anon_layer),
            "its thin device is gone"
        );
        let after_anon = s.used_data_blocks();
        println!("anonymous volume: {before_anon} -> {with_anon} -> {after_anon} blocks");
        assert!(
            with_anon - after_anon >= 16 * 16,
            "its 16 MiB back in the pool: {with_anon} -> {after_anon}"
        );

        // A clone holds its source's data, then diverges.
        d.ok(&[
            "volume",
            "create",
            "-d",
            "thinlayer",
            "-o",
            "from=named",
            "clonev",
        ]);
        assert_eq!(d.volume("clonev")["Status"]["from"], "named");
        assert_eq!(
            run(&d, &["-v", "clonev:/data"], "cat /data/f"),
            "one\nshared"
        );
        run(&d, &["-v", "clonev:/data"], "echo two > /data/f");
        assert_eq!(run(&d, &["-v", "clonev:/data"], "cat /data/f"), "two");
        assert_eq!(
            run(&d, &["-v", "named:/data"], "cat /data/f"),
            "one\nshared"
        );

        // A running container across a restart of the plugin alone: its mount
        // is counted by Docker's mount ID, kept in the plugin's record.
        d.ok(&[
            "run",
            "-d",
            "--name",
            "long",
            "-v",
            "named:/data",
            "demo:docker",
            "sleep",
            "600",
        ]);
        p.stop();
        let mut p = plugin(s);
        d.ok(&["rm", "-f", "long"]);
        // Then dockerd and the plugin both restart: everything is there.
        d.stop();
        p.stop();
        let mut p = plugin(s);
        let mut d = Dockerd::start(&base.join("data"), "b", "thinlayer", &[]);
        let names = d.ok(&["volume", "ls", "-q"]);
        for v in ["named", "etcvol", "clonev"] {
            assert!(
                names.lines().any(|l| l == v),
                "{v} after the restarts: {names}"
            );
        }
        assert_eq!(
            run(&d, &["--volumes-from", "datac"], "cat /data/f"),
            "one\nshared"
        );
        assert_eq!(run(&d, &["-v", "clonev:/data"], "cat /data/f"), "two");
        assert!(
            run(&d, &["-v", "etcvol:/etc"], "cat /etc/passwd").contains("root:x:0:0"),
            "the filled volume kept its content"
        );
        // Nothing holds them any more: they go.
        d.ok(&["rm", "datac"]);
        d.ok(&["volume", "rm", "clonev"]);
        d.ok(&["volume", "rm", "named", "etcvol"]);
        assert!(
            !s.layer_ids::<Vec<_>>()
                .iter()
                .any(|l| l.starts_with("vol-")),
            "{:?}",
            s.layer_ids::<Vec<_>>()
        );
        d.stop();
        p.stop();
        let check = s.run(&["pool", "check"]);
        assert!(
            check.status.success(),
            "pool check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    });
}
