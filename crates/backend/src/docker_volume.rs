//! Docker's volume plugin protocol over a Unix socket, serving thin volumes:
//! each volume a thin device with its own filesystem, and `from=VOLUME`
//! an instant snapshot clone (which no volume driver of the anchors has).
//!
//! Protocol: HTTP POST with JSON bodies (`Plugin.Activate`,
//! `VolumeDriver.Create/Remove/Mount/Unmount/Path/Get/List/Capabilities`),
//! errors in the `Err` field. Mounts are reference-counted by the request's
//! `ID`: the first mount of a volume mounts it, the last unmount unmounts
//! it. The counts are kept in a crash-safe record, so a restarted plugin
//! carries on where it stopped.
//!
//! Each request takes the pool root's lock for its own duration, so the
//! CLI and other servers interleave with the plugin.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};
use thinlayer_pool::{Bytes, FsType, LockMode, record};
use thinlayer_store::Store;

use crate::error::{Error, Result};

/// Where Docker looks for plugin sockets.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/thinlayer.sock";

const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
const RECORD_REFS: &str = "plugin-mounts";

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Request {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "ID")]
    id: String,
    #[serde(default)]
    opts: Option<BTreeMap<String, String>>,
}

/// The plugin: the pool root and the mount references.
pub struct Plugin {
    root: PathBuf,
    refs: BTreeMap<String, BTreeSet<String>>,
}

impl Plugin {
    /// A plugin over the pool under `root`, with the references a previous
    /// run left.
    ///
    /// # Errors
    /// The pool's open errors; a damaged references record.
    pub fn new(root: &Path) -> Result<Plugin> {
        drop(Store::open(root, LockMode::Exclusive, true)?);
        let refs = match record::read(&refs_path(root), RECORD_REFS) {
            Ok(r) => r,
            Err(thinlayer_pool::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                BTreeMap::new()
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Plugin {
            root: root.to_owned(),
            refs,
        })
    }

    fn store(&self) -> Result<Store> {
        Ok(Store::open(&self.root, LockMode::Exclusive, true)?)
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.root.join("plugin-volumes").join(name)
    }

    fn save_refs(&self) -> Result<()> {
        Ok(record::write(
            &refs_path(&self.root),
            RECORD_REFS,
            &self.refs,
        )?)
    }

    /// Answers one request: `path` is the endpoint (`/VolumeDriver.Mount`),
    /// `body` its JSON. Errors become `{"Err": "..."}`.
    pub fn handle(&mut self, path: &str, body: &[u8]) -> Value {
        let req: Request = if body.iter().all(u8::is_ascii_whitespace) {
            Request::default()
        } else {
            match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => return json!({"Err": format!("bad request body: {e}")}),
            }
        };
        match self.dispatch(path, &req) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(%path, name = %req.name, error = %e, "request failed");
                json!({"Err": e.to_string()})
            }
        }
    }

    fn dispatch(&mut self, path: &str, req: &Request) -> Result<Value> {
        tracing::info!(%path, name = %req.name, id = %req.id, "request");
        match path {
            "/Plugin.Activate" => Ok(json!({"Implements": ["VolumeDriver"]})),
            "/VolumeDriver.Capabilities" => Ok(json!({"Capabilities": {"Scope": "local"}})),
            "/VolumeDriver.Create" => {
                let opts = req.opts.clone().unwrap_or_default();
                let mut size = None;
                let mut fs = None;
                let mut from = None;
                for (k, v) in &opts {
                    match k.as_str() {
                        "size" => size = Some(v.parse::<Bytes>()?),
                        "fs" => fs = Some(v.parse::<FsType>()?),
                        "from" => from = Some(v.as_str()),
                        other => {
                            return Err(Error::Invalid(format!(
                                "unknown option `{other}`; thinlayer volumes take size, fs and from"
                            )));
                        }
                    }
                }
                self.store()?.create_volume(&req.name, size, fs, from)?;
                Ok(json!({"Err": ""}))
            }
            "/VolumeDriver.Remove" => {
                if self.refs.get(&req.name).is_some_and(|r| !r.is_empty()) {
                    return Err(Error::Invalid(format!(
                        "volume `{}` is mounted by {} container(s)",
                        req.name,
                        self.refs[&req.name].len()
                    )));
                }
                self.store()?.remove_volume(&req.name)?;
                Ok(json!({"Err": ""}))
            }
            "/VolumeDriver.Mount" => {
                let dir = self.mountpoint(&req.name);
                let mut store = self.store()?;
                store.volume(&req.name)?;
                if !store.volume_mountpoints(&req.name)?.contains(&dir) {
                    store.mount_volume(&req.name, &dir)?;
                }
                self.refs
                    .entry(req.name.clone())
                    .or_default()
                    .insert(req.id.clone());
                self.save_refs()?;
                Ok(json!({"Mountpoint": dir, "Err": ""}))
            }
            "/VolumeDriver.Unmount" => {
                let last = match self.refs.get_mut(&req.name) {
                    Some(ids) => {
                        ids.remove(&req.id);
                        ids.is_empty()
                    }
                    None => true,
                };
                if last {
                    self.refs.remove(&req.name);
                    let dir = self.mountpoint(&req.name);
                    let mut store = self.store()?;
                    if store.volume_mountpoints(&req.name)?.contains(&dir) {
                        store.pool().umount(&dir.to_string_lossy())?;
                    }
                }
                self.save_refs()?;
                Ok(json!({"Err": ""}))
            }
            "/VolumeDriver.Path" => {
                let dir = self.mounted_at(&req.name)?;
                Ok(json!({"Mountpoint": dir, "Err": ""}))
            }
            "/VolumeDriver.Get" => {
                let v = self.store()?.volume(&req.name)?;
                let dir = self.mounted_at(&req.name)?;
                Ok(json!({"Volume": {
                    "Name": v.name, "Mountpoint": dir,
                    "Status": {"size": v.size.to_string(), "fs": v.fs.name(), "from": v.from}
                }, "Err": ""}))
            }
            "/VolumeDriver.List" => {
                let vols = self.store()?.volumes()?;
                let mut list = Vec::new();
                for v in vols {
                    let dir = self.mounted_at(&v.name)?;
                    list.push(json!({"Name": v.name, "Mountpoint": dir}));
                }
                Ok(json!({"Volumes": list, "Err": ""}))
            }
            other => Err(Error::Invalid(format!("unknown endpoint {other}"))),
        }
    }

    /// The plugin's mount point of `name` if mounted, else "".
    fn mounted_at(&self, name: &str) -> Result<String> {
        let dir = self.mountpoint(name);
        let mounted = self.store()?.volume_mountpoints(name)?.contains(&dir);
        Ok(if mounted {
            dir.to_string_lossy().into_owned()
        } else {
            String::new()
        })
    }
}

fn refs_path(root: &Path) -> PathBuf {
    root.join("store").join("plugin-mounts.rec")
}

/// Serves the plugin on `socket` until SIGTERM or SIGINT. A socket file
/// left by a dead server is replaced; one a live server answers on is not.
///
/// # Errors
/// The socket is taken, cannot be bound; the pool's open errors.
pub fn serve(root: &Path, socket: &Path) -> Result<()> {
    let mut plugin = Plugin::new(root)?;
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(Error::Invalid(format!(
                "{} is taken by a running server; stop it or pass another --socket",
                socket.display()
            )));
        }
        std::fs::remove_file(socket).map_err(|e| {
            Error::Invalid(format!("remove stale socket {}: {e}", socket.display()))
        })?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Invalid(format!("create {}: {e}", dir.display())))?;
    }
    let server = tiny_http::Server::http_unix(socket)
        .map_err(|e| Error::Invalid(format!("listen on {}: {e}", socket.display())))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| Error::Invalid(format!("install a signal handler: {e}")))?;
    }
    tracing::info!(socket = %socket.display(), "serving Docker's volume plugin protocol");
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let mut body = Vec::new();
        let answer = match request.as_reader().read_to_end(&mut body) {
            Ok(_) => plugin.handle(request.url(), &body),
            Err(e) => json!({"Err": format!("reading the request: {e}")}),
        };
        let header = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE)
            .expect("a valid static header");
        let response = tiny_http::Response::from_string(answer.to_string()).with_header(header);
        if let Err(e) = request.respond(response) {
            tracing::warn!(error = %e, "could not answer a request");
        }
    }
    drop(server);
    let _ = std::fs::remove_file(socket);
    tracing::info!("volume plugin stopped");
    Ok(())
}
