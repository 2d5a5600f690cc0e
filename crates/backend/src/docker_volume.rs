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
                // The filesystem root at the plugin's own place; Docker
                // gets its content directory (an empty `data/` in a new
                // volume, no `lost+found`), so it copies the image's
                // content in as it does into its own volumes.
                let content = store.mount_volume_root(&req.name, &dir)?;
                self.refs
                    .entry(req.name.clone())
                    .or_default()
                    .insert(req.id.clone());
                self.save_refs()?;
                Ok(json!({"Mountpoint": content, "Err": ""}))
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
                // The content directory, as Mount answered.
                let dir = self.mounted_at(&mut self.store()?, &req.name)?;
                Ok(json!({"Mountpoint": dir, "Err": ""}))
            }
            "/VolumeDriver.Get" => {
                let mut store = self.store()?;
                let v = store.volume(&req.name)?;
                let dir = self.mounted_at(&mut store, &req.name)?;
                let status = status(&mut store, &v)?;
                Ok(json!({"Volume": {
                    "Name": v.name, "Mountpoint": dir, "Status": status
                }, "Err": ""}))
            }
            "/VolumeDriver.List" => {
                let mut store = self.store()?;
                let vols = store.volumes()?;
                let mut list = Vec::new();
                for v in vols {
                    let dir = self.mounted_at(&mut store, &v.name)?;
                    let status = status(&mut store, &v)?;
                    list.push(json!({"Name": v.name, "Mountpoint": dir, "Status": status}));
                }
                Ok(json!({"Volumes": list, "Err": ""}))
            }
            other => Err(Error::Invalid(format!("unknown endpoint {other}"))),
        }
    }

    /// Where the plugin shows `name`'s content if mounted (its mount
    /// point's `data/`, or the mount point itself for a volume made before
    /// `data/` was), else "". `store`: the request's (one open at a time:
    /// each holds the root's lock).
    fn mounted_at(&self, store: &mut Store, name: &str) -> Result<String> {
        let dir = self.mountpoint(name);
        let mounted = store.volume_mountpoints(name)?.contains(&dir);
        Ok(if mounted {
            let layout = store.volume(name)?.layout;
            layout.content(&dir).to_string_lossy().into_owned()
        } else {
            String::new()
        })
    }
}

/// `docker volume inspect`'s `Status` of volume `v`: size, filesystem,
/// clone source, pool bytes its device maps (while active), and, for an
/// anonymous volume of thinlayer's own containers, its container.
fn status(store: &mut Store, v: &thinlayer_store::volumes::VolumeRecord) -> Result<Value> {
    let usage = store.volume_usage(&v.name)?;
    Ok(json!({
        "size": v.size.to_string(),
        "fs": v.fs.name(),
        "from": v.from,
        "usage": match usage {
            Some(b) => Bytes(b).to_string(),
            None => "unknown while unmounted".to_owned(),
        },
        "usage_bytes": usage,
        "layout": match v.layout {
            thinlayer_store::volumes::Layout::DataDir => "data/ (empty until written)",
            thinlayer_store::volumes::Layout::Root => "filesystem root (made before data/)",
        },
    }))
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
    http::serve_until_signal(
        socket,
        access,
        Limits::default(),
        "Docker's volume plugin protocol",
        || Plugin::new(root),
    )
}
