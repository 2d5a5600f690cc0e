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
//!
//! The socket is root's only (0600 in a 0700 directory), or a group's with
//! `--socket-group` (`thinlayer_pool::socket`); the HTTP server ([`http`])
//! bounds what a client may send and how slowly, so no client stops
//! another from being answered.
//!
//! [`http`]: crate::http

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{Value, json};
use thinlayer_pool::{Bytes, FsType, LockMode, record, socket::Access};
use thinlayer_store::Store;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    error::{Error, Result},
    http::{self, Handler, Limits, Reply},
};

/// Where Docker looks for plugin sockets.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/thinlayer.sock";

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
    /// `body` its JSON (empty or `null` for none). Errors of the request
    /// become `{"Err": "..."}` with status 200, as Docker expects; a body
    /// that is not JSON is a 400, an unknown endpoint a 404.
    pub fn handle(&mut self, path: &str, body: &[u8]) -> Reply {
        let req: Request = if body.iter().all(u8::is_ascii_whitespace) {
            Request::default()
        } else {
            match serde_json::from_slice::<Option<Request>>(body) {
                Ok(r) => r.unwrap_or_default(),
                Err(e) => {
                    return Reply::err(400, format!("bad request body: {e}; send a JSON object"));
                }
            }
        };
        if !ENDPOINTS.contains(&path) {
            return Reply::err(
                404,
                format!(
                    "unknown endpoint {path}; this plugin serves {}",
                    ENDPOINTS.join(", ")
                ),
            );
        }
        match self.dispatch(path, &req) {
            Ok(v) => Reply::ok(v),
            Err(e) => {
                tracing::warn!(%path, name = %req.name, error = %e, "request failed");
                Reply::ok(json!({"Err": e.to_string()}))
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

/// The endpoints of Docker's volume plugin protocol this plugin serves.
const ENDPOINTS: &[&str] = &[
    "/Plugin.Activate",
    "/VolumeDriver.Capabilities",
    "/VolumeDriver.Create",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount",
    "/VolumeDriver.Path",
    "/VolumeDriver.Get",
    "/VolumeDriver.List",
];

fn refs_path(root: &Path) -> PathBuf {
    root.join("store").join("plugin-mounts.rec")
}

impl Handler for Plugin {
    fn handle(&mut self, path: &str, body: &[u8]) -> Reply {
        Plugin::handle(self, path, body)
    }
}

/// Serves the plugin on `socket` until SIGTERM or SIGINT, to root and the
/// members of `access`'s group. A socket file left by a dead server is
/// replaced; one a live server answers on is not, nor is anything that is
/// not a socket.
///
/// # Errors
/// The socket is taken or cannot be bound (exit 4 for the conflicts); the
/// pool's open errors.
pub fn serve(root: &Path, socket: &Path, access: &Access) -> Result<()> {
    thinlayer_pool::socket::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("start the async runtime: {e}")))?;
    rt.block_on(async {
        // Signals first: a SIGTERM from the moment the socket exists is a
        // graceful stop.
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::Invalid(format!("install a signal handler: {e}")))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::Invalid(format!("install a signal handler: {e}")))?;
        let (listener, file) = thinlayer_pool::socket::bind(socket, access)?;
        let plugin = Plugin::new(root)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Invalid(format!("listen on {}: {e}", socket.display())))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| Error::Invalid(format!("listen on {}: {e}", socket.display())))?;
        tracing::info!(socket = %socket.display(), "serving Docker's volume plugin protocol");
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
        };
        http::serve(listener, *access, Limits::default(), plugin, shutdown).await;
        // No new client finds the socket while a request in flight ends.
        drop(file);
        Ok::<(), Error>(())
    })?;
    // Dropping the runtime waits for a request still on its thread.
    drop(rt);
    tracing::info!("volume plugin stopped");
    Ok(())
}
