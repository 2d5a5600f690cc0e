//! The Kubernetes node path: kubelet talks CRI to containerd, whose CRI
//! plugin takes every snapshot from thinlayer (`snapshotter = "thinlayer"`,
//! a proxy plugin on `thinlayer serve containerd`). A CRI client (the
//! `k8s-cri` crate's v1 clients, as kubelet's calls) runs a host-network pod
//! with a sandbox image imported locally (no registry, no CNI): its
//! container prints from its image, answers ExecSync from it, reports its
//! writable layer's usage from the snapshotter, and is stopped and removed.
//!
//! What must never happen: a pod's snapshot off thinlayer, a thin device
//! left active once the pod, its images, containerd and the server are
//! gone, or a pool whose records `pool check` refuses afterwards.
//!
//! The guest needs containerd's programs: boot it with
//! `THINLAYER_VM_EXTRAS=docker tools/vm/run ...`. Fixtures (the demo image
//! and the `pause` sandbox image) come from `tests/fixtures/make-images`.

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use common::{containerd::*, *};
use hyper_util_cri::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, *,
};
use tonic_cri::transport::{Channel, Endpoint, Uri};

/// The sandbox image's name in containerd (`pause-docker.tar`'s tag,
/// normalized as `ctr images import` and the CRI plugin both do).
const PAUSE: &str = "docker.io/library/pause:thinlayer";
/// The workload image (`demo-docker.tar`).
const DEMO: &str = "docker.io/library/demo:docker";
/// containerd's namespace for CRI.
const NS: &str = "k8s.io";

/// containerd with its CRI plugin on thinlayer, its config, state and
/// socket under the scratch directory; killed on drop (its log printed if
/// the test is failing).
struct Containerd {
    base: PathBuf,
    address: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Writes the config and starts containerd; returns once `ctr` answers.
    fn start(base: &Path, snapshotter_socket: &Path) -> Containerd {
        let base = base.join("containerd");
        fs::create_dir_all(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).unwrap();
        let address = base.join("containerd.sock");
        let config = base.join("config.toml");
        // The CRI plugin: every snapshot on thinlayer; the sandbox image a
        // local one (never pulled); CNI directories of its own, never used
        // by host-network pods; stats of snapshots collected every second
        // (ContainerStats answers from that cache); AppArmor off (the
        // guest has no apparmor_parser). The garbage collector runs after
        // every deletion, so removed images take their snapshots along.
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{address}"

[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0s"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  stats_collect_period = 1
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "thinlayer"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"

[proxy_plugins.thinlayer]
  type = "snapshot"
  address = "{snap}"
"#,
                root = base.join("root").display(),
                state = base.join("state").display(),
                address = address.display(),
                cni = base.join("cni").display(),
                snap = snapshotter_socket.display(),
            ),
        )
        .unwrap();
        let log = base.join("containerd.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(program("containerd"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            base,
            address,
            child: Some(child),
        };
        let t = Instant::now();
        loop {
            c.assert_running();
            if c.try_ctr(&["version"], 10).status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "containerd not ready:\n{}",
                c.log()
            );
            sleep(Duration::from_millis(100));
        }
        eprintln!("containerd ready in {:.1} s", t.elapsed().as_secs_f64());
        c
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.base.join("containerd.log")).unwrap_or_default())
            .into_owned()
    }

    fn assert_running(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("containerd exited ({st}):\n{}", self.log());
        }
    }

    fn try_ctr(&self, args: &[&str], secs: u64) -> Output {
        run_timeout(
            Command::new(program("ctr"))
                .arg("--address")
                .arg(&self.address)
                .args(["--namespace", NS])
                .args(args),
            secs,
        )
    }

    /// Runs `ctr -n k8s.io ARGS`, asserting success; returns stdout.
    fn ctr(&self, args: &[&str]) -> String {
        let out = self.try_ctr(args, 300);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}):\n{}{}\n--- containerd log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGTERM, then waits (at most 60 s) for the exit.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("containerd did not stop on SIGTERM:\n{}", self.log());
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- containerd log ---\n{}", self.log());
            }
        }
    }
}

/// A gRPC channel to containerd's Unix socket (tonic needs a URI; the
/// connector ignores it).
async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .expect("a valid placeholder URI")
        .connect_with_connector(tower_cri::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to containerd's socket")
}

/// The container's script: print a file only its image's top layer holds,
/// write 8 MiB into its writable layer (more than the image's layers freed,
/// so new pool blocks are mapped), then stay up.
const SCRIPT: &str = "cat /etc/motd; dd if=/dev/zero of=/written bs=64k count=128 2>/dev/null; \
                      sync; echo written; exec sleep 3600";

#[test]
fn vm_cri_pod_runs_on_thinlayer() {
    vm_test("cri", Pool::Small, |s| {
        let fx = fixtures();
        let base = s.root.parent().unwrap().to_owned();
        // The server refuses a socket directory others can write (/tmp).
        let sockdir = base.join("sock");
        fs::create_dir_all(&sockdir).unwrap();
        fs::set_permissions(&sockdir, fs::Permissions::from_mode(0o700)).unwrap();
        let socket = sockdir.join("s.sock");
        let before = thin_devices();

        let mut srv = Served::start(s, &["serve", "containerd"], &socket);
        let mut ctrd = Containerd::start(&base, &socket);

        // Images, locally: the sandbox image and the workload, unpacked into
        // thinlayer snapshots in CRI's namespace (they share the base layer).
        for archive in ["pause-docker.tar", "demo-docker.tar"] {
            let t = Instant::now();
            ctrd.ctr(&[
                "images",
                "import",
                "--snapshotter",
                "thinlayer",
                fx.join(archive).to_str().unwrap(),
            ]);
            eprintln!("import {archive}: {:.1} s", t.elapsed().as_secs_f64());
        }
        let images = ctrd.ctr(&["images", "ls", "-q"]);
        for want in [PAUSE, DEMO] {
            assert!(images.lines().any(|l| l == want), "{want} in {images}");
        }
        let layers_of_images = ctrd_layers(s);
        assert_eq!(
            layers_of_images.len(),
            3,
            "base, mid and top: one thinlayer layer each: {layers_of_images:?}"
        );

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let address = ctrd.address.clone();
        let logs = base.join("pod-logs");
        fs::create_dir_all(&logs).unwrap();
        let (container_log, stats_bytes) = rt.block_on(async {
            let ch = channel(&address).await;
            let mut runtime = RuntimeServiceClient::new(ch.clone());
            let mut images = ImageServiceClient::new(ch);

            // The CRI plugin answers once it runs; it learns of the imported
            // images from containerd's events.
            let t = Instant::now();
            let version = loop {
                match runtime.version(VersionRequest::default()).await {
                    Ok(v) => break v.into_inner(),
                    Err(e) if t.elapsed() < Duration::from_secs(60) => {
                        eprintln!("CRI not ready yet: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => panic!("CRI Version: {e}"),
                }
            };
            eprintln!(
                "CRI: {} {} (API {})",
                version.runtime_name, version.runtime_version, version.runtime_api_version
            );
            for image in [PAUSE, DEMO] {
                let t = Instant::now();
                loop {
                    let st = images
                        .image_status(ImageStatusRequest {
                            image: Some(ImageSpec {
                                image: image.to_owned(),
                                ..Default::default()
                            }),
                            verbose: false,
                        })
                        .await
                        .expect("ImageStatus")
                        .into_inner();
                    if st.image.is_some() {
                        break;
                    }
                    assert!(
                        t.elapsed() < Duration::from_secs(60),
                        "CRI does not see {image}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }

            // The pod: host network (no CNI), its own pid namespace, logs
            // under the scratch directory, a resolv.conf of its own.
            let pod_config = PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "thinlayer-pod".to_owned(),
                    uid: "thinlayer-pod-uid".to_owned(),
                    namespace: "default".to_owned(),
                    attempt: 0,
                }),
                log_directory: logs.to_str().unwrap().to_owned(),
                dns_config: Some(DnsConfig {
                    servers: vec!["127.0.0.1".to_owned()],
                    ..Default::default()
                }),
                linux: Some(LinuxPodSandboxConfig {
                    security_context: Some(LinuxSandboxSecurityContext {
                        namespace_options: Some(NamespaceOption {
                            network: NamespaceMode::Node as i32,
                            pid: NamespaceMode::Container as i32,
                            ipc: NamespaceMode::Pod as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let t_pod = Instant::now();
            let pod = runtime
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(pod_config.clone()),
                    ..Default::default()
                })
                .await
                .expect("RunPodSandbox")
                .into_inner()
                .pod_sandbox_id;
            let run_sandbox = t_pod.elapsed();
            let t = Instant::now();
            let container = runtime
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: "app".to_owned(),
                            attempt: 0,
                        }),
                        image: Some(ImageSpec {
                            image: DEMO.to_owned(),
                            ..Default::default()
                        }),
                        command: vec!["/bin/sh".to_owned(), "-c".to_owned(), SCRIPT.to_owned()],
                        log_path: "app.log".to_owned(),
                        ..Default::default()
                    }),
                    sandbox_config: Some(pod_config),
                })
                .await
                .expect("CreateContainer")
                .into_inner()
                .container_id;
            let create = t.elapsed();
            let t = Instant::now();
            runtime
                .start_container(StartContainerRequest {
                    container_id: container.clone(),
                })
                .await
                .expect("StartContainer");
            let start = t.elapsed();
            eprintln!(
                "pod start: RunPodSandbox {:.0} ms, CreateContainer {:.0} ms, StartContainer {:.0} ms, \
                 {:.0} ms in all",
                run_sandbox.as_secs_f64() * 1e3,
                create.as_secs_f64() * 1e3,
                start.as_secs_f64() * 1e3,
                t_pod.elapsed().as_secs_f64() * 1e3
            );

            // The sandbox's and the container's snapshots are thinlayer layers.
            let layers = ctrd_layers(s);
            eprintln!("thinlayer layers while the pod runs: {layers:?}");
            assert_eq!(
                layers.len(),
                5,
                "the images' 3 layers plus the sandbox's and the container's: {layers:?}"
            );
            assert!(
                layers_of_images.iter().all(|l| layers.contains(l)),
                "{layers:?}"
            );

            // ExecSync answers from the image (the mid layer's os-release),
            // on a root filesystem that is a thin device.
            let exec = |cmd: &[&str]| {
                let mut runtime = runtime.clone();
                let req = ExecSyncRequest {
                    container_id: container.clone(),
                    cmd: cmd.iter().map(|c| (*c).to_owned()).collect(),
                    timeout: 60,
                };
                async move {
                    let r = runtime.exec_sync(req).await.expect("ExecSync").into_inner();
                    assert_eq!(
                        r.exit_code,
                        0,
                        "exec {:?}: {}",
                        r.stdout,
                        String::from_utf8_lossy(&r.stderr)
                    );
                    String::from_utf8(r.stdout).unwrap()
                }
            };
            let t = Instant::now();
            let out = exec(&["cat", "/etc/os-release"]).await;
            eprintln!("ExecSync: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(out, "NAME=\"thinlayer-fixture\"\nVERSION_ID=2\n");
            let mounts = exec(&["cat", "/proc/mounts"]).await;
            let root = mounts
                .lines()
                .find(|l| l.split(' ').nth(1) == Some("/"))
                .unwrap_or_else(|| panic!("no / in {mounts}"));
            assert!(
                root.starts_with("/dev/dm-") && root.contains(" ext4 "),
                "the container's root is a thin device: {root}"
            );
            wait_until_async("the script to write", || {
                let f = logs.join("app.log");
                async move { fs::read_to_string(f).is_ok_and(|l| l.contains("written")) }
            })
            .await;

            // Stats: the writable layer's usage, as the snapshotter's Usage
            // reports it (CRI collects it every stats_collect_period).
            let t = Instant::now();
            let used = loop {
                let st = runtime
                    .container_stats(ContainerStatsRequest {
                        container_id: container.clone(),
                    })
                    .await
                    .expect("ContainerStats")
                    .into_inner();
                let wl = st
                    .stats
                    .and_then(|s| s.writable_layer)
                    .expect("ContainerStats has a writable layer");
                let used = wl.used_bytes.map_or(0, |u| u.value);
                if used > 0 {
                    eprintln!(
                        "writable layer: {used} bytes, {} inodes, at {:?}",
                        wl.inodes_used.map_or(0, |u| u.value),
                        wl.fs_id.map(|f| f.mountpoint)
                    );
                    break used;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "the writable layer's usage stays 0: {wl:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            };

            // Down: container, then pod.
            let t = Instant::now();
            runtime
                .stop_container(StopContainerRequest {
                    container_id: container.clone(),
                    timeout: 0,
                })
                .await
                .expect("StopContainer");
            runtime
                .remove_container(RemoveContainerRequest {
                    container_id: container.clone(),
                })
                .await
                .expect("RemoveContainer");
            runtime
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await
                .expect("StopPodSandbox");
            runtime
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await
                .expect("RemovePodSandbox");
            eprintln!(
                "pod stop and remove: {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            let left = runtime
                .list_pod_sandbox(ListPodSandboxRequest::default())
                .await
                .expect("ListPodSandbox")
                .into_inner()
                .items;
            assert!(left.is_empty(), "pods left: {left:?}");
            // The sandbox's and the container's snapshots are gone, the
            // images' stay.
            wait_until("the pod's snapshots to go", 60, || {
                ctrd_layers(s) == layers_of_images
            });

            // The images go as kubelet removes them: RemoveImage drops every
            // reference the CRI plugin keeps (name and image id), so the
            // garbage collector takes their snapshots.
            for image in [PAUSE, DEMO] {
                images
                    .remove_image(RemoveImageRequest {
                        image: Some(ImageSpec {
                            image: image.to_owned(),
                            ..Default::default()
                        }),
                    })
                    .await
                    .expect("RemoveImage");
            }
            (
                fs::read_to_string(logs.join("app.log")).unwrap_or_default(),
                used,
            )
        });
        eprintln!("container log:\n{container_log}");
        assert!(
            container_log.contains("stdout F welcome to the top layer"),
            "the container printed from its image: {container_log}"
        );
        assert!(stats_bytes > 0, "the writable layer's usage: {stats_bytes}");

        // The images' snapshots go with them.
        let left = ctrd.ctr(&["images", "ls", "-q"]);
        assert_eq!(left, "", "no image left in containerd");
        let t = Instant::now();
        while !ctrd_layers(s).is_empty() {
            if t.elapsed() > Duration::from_secs(60) {
                for what in [
                    &["images", "ls"][..],
                    &["leases", "ls"],
                    &["content", "ls"],
                    &["containers", "ls"],
                    &["snapshots", "--snapshotter", "thinlayer", "ls"],
                ] {
                    eprintln!("ctr {what:?}:\n{}", ctrd.ctr(what));
                }
                panic!("the images' snapshots are left: {:?}", ctrd_layers(s));
            }
            sleep(Duration::from_millis(200));
        }

        // Stop containerd, then the server: no thin device left, the pool clean.
        ctrd.stop();
        let st = srv.stop();
        assert!(st.success(), "serve exit {st}:\n{}", srv.log());
        assert_eq!(thin_devices(), before, "no thin device left");
        assert_eq!(ctrd_layers(s), Vec::<String>::new());
        s.ok(&["pool", "check"]);
    });
}

async fn wait_until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let t = Instant::now();
    while !f().await {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
