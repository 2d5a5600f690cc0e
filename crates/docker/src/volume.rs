//! Docker's volume plugin protocol over a Unix socket, serving thin volumes:
//! each volume a thin device with its own filesystem, and `from=VOLUME`
//! an instant snapshot clone (which no volume driver of the anchors has).
//!
//! Protocol: HTTP POST with JSON bodies (`Plugin.Activate`,
//! `VolumeDriver.Create/Remove/Mount/Unmount/Path/Get/List/Capabilities`),
//! errors in the `Err` field; the request and answer types are
//! [`crate::protocol::volume`]'s. Mounts are reference-counted by the request's
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

use serde_json::Value;
use thinlayer_pool::{Bytes, FsType, LockMode, Record, record, socket::Access};
use thinlayer_store::Store;

use crate::{
    error::{Error, Result},
    http::{self, Handler, Limits, Reply},
    protocol::{
        self, ActivateAnswer, ErrAnswer, NoArgs, parse, to_json,
        volume::{
            Capabilities, CapabilitiesAnswer, CreateRequest, Done, GetAnswer, ListAnswer,
            MountRequest, MountpointAnswer, NameRequest, Status, Volume,
        },
    },
};

/// Where Docker looks for plugin sockets.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/thinlayer.sock";

/// The mount ids holding each volume, kept across plugin restarts
/// (`ROOT/store/plugin-mounts.rec`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct VolumeRefs(BTreeMap<String, BTreeSet<String>>);

impl Record for VolumeRefs {
    const KIND: &'static str = "plugin-mounts";
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
        let VolumeRefs(refs) = VolumeRefs::load_or_default(&refs_path(root))?;
        Ok(Plugin {
            root: root.to_owned(),
            refs,
        })
    }

    fn store(&self) -> Result<Store> {
        Ok(Store::open_again(&self.root)?)
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        self.root.join("plugin-volumes").join(name)
    }

    fn save_refs(&self) -> Result<()> {
        Ok(record::write(
            &refs_path(&self.root),
            VolumeRefs::KIND,
            &self.refs,
        )?)
    }

    /// Answers one request: `path` is the endpoint (`/VolumeDriver.Mount`),
    /// `body` its JSON (empty or `null` for none). Errors of the request
    /// become `{"Err": "..."}` with status 200, as Docker expects; a body
    /// that is not JSON is a 400, an unknown endpoint a 404.
    pub fn handle(&mut self, path: &str, body: &[u8]) -> Reply {
        if !ENDPOINTS.contains(&path) {
            return Reply::err(
                404,
                format!(
                    "unknown endpoint {path}; this plugin serves {}",
                    ENDPOINTS.join(", ")
                ),
            );
        }
        let (name, result) = match self.dispatch(path, body) {
            Ok(done) => done,
            Err(reply) => return reply,
        };
        match result {
            Ok(v) => Reply::ok(v),
            Err(e) => {
                tracing::warn!(%path, %name, error = %e, "request failed");
                protocol::ok(&ErrAnswer { err: e.to_string() })
            }
        }
    }

    /// Parses `body` as `path`'s request and answers it: the volume named
    /// (for the log) and the answer.
    fn dispatch(&mut self, path: &str, body: &[u8]) -> Result<(String, Result<Value>), Reply> {
        Ok(match path {
            "/Plugin.Activate" | "/VolumeDriver.Capabilities" | "/VolumeDriver.List" => {
                parse::<NoArgs>(body)?;
                tracing::info!(%path, name = %"", id = %"", "request");
                (String::new(), self.driver_call(path))
            }
            "/VolumeDriver.Create" => {
                let req: CreateRequest = parse(body)?;
                tracing::info!(%path, name = %req.name, id = %"", "request");
                let r = self.create(&req);
                (req.name, r)
            }
            "/VolumeDriver.Mount" | "/VolumeDriver.Unmount" => {
                let req: MountRequest = parse(body)?;
                tracing::info!(%path, name = %req.name, id = %req.id, "request");
                let r = if path == "/VolumeDriver.Mount" {
                    self.mount(&req)
                } else {
                    self.unmount(&req)
                };
                (req.name, r)
            }
            _ => {
                let req: NameRequest = parse(body)?;
                tracing::info!(%path, name = %req.name, id = %"", "request");
                let r = self.name_call(path, &req.name);
                (req.name, r)
            }
        })
    }

    /// The calls without arguments.
    fn driver_call(&mut self, path: &str) -> Result<Value> {
        Ok(match path {
            "/Plugin.Activate" => to_json(&ActivateAnswer {
                implements: vec!["VolumeDriver"],
            }),
            "/VolumeDriver.Capabilities" => to_json(&CapabilitiesAnswer {
                capabilities: Capabilities { scope: "local" },
            }),
            _ => {
                let mut store = self.store()?;
                let mut volumes = Vec::new();
                for v in store.volumes()? {
                    volumes.push(self.volume(&mut store, &v)?);
                }
                to_json(&ListAnswer {
                    volumes,
                    err: String::new(),
                })
            }
        })
    }

    fn create(&mut self, req: &CreateRequest) -> Result<Value> {
        let mut size = None;
        let mut fs = None;
        let mut from = None;
        for (k, v) in req.opts.iter().flatten() {
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
        Ok(to_json(&Done::default()))
    }

    fn mount(&mut self, req: &MountRequest) -> Result<Value> {
        let dir = self.mountpoint(&req.name);
        let mut store = self.store()?;
        // The filesystem root at the plugin's own place; Docker gets its
        // content directory (an empty `data/` in a new volume, no
        // `lost+found`), so it copies the image's content in as it does
        // into its own volumes.
        let content = store.mount_volume_root(&req.name, &dir)?;
        self.refs
            .entry(req.name.clone())
            .or_default()
            .insert(req.id.clone());
        self.save_refs()?;
        Ok(to_json(&MountpointAnswer {
            mountpoint: content.to_string_lossy().into_owned(),
            err: String::new(),
        }))
    }

    fn unmount(&mut self, req: &MountRequest) -> Result<Value> {
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
        Ok(to_json(&Done::default()))
    }

    /// `Remove`, `Path` and `Get`: the calls that name a volume only.
    fn name_call(&mut self, path: &str, name: &str) -> Result<Value> {
        Ok(match path {
            "/VolumeDriver.Remove" => {
                if let Some(ids) = self.refs.get(name).filter(|r| !r.is_empty()) {
                    return Err(Error::Invalid(format!(
                        "volume `{name}` is mounted by {} container(s)",
                        ids.len()
                    )));
                }
                self.store()?.remove_volume(name)?;
                to_json(&Done::default())
            }
            "/VolumeDriver.Path" => {
                // The content directory, as Mount answered.
                let dir = self.mounted_at(&mut self.store()?, name)?;
                to_json(&MountpointAnswer {
                    mountpoint: dir,
                    err: String::new(),
                })
            }
            "/VolumeDriver.Get" => {
                let mut store = self.store()?;
                let v = store.volume(name)?;
                to_json(&GetAnswer {
                    volume: self.volume(&mut store, &v)?,
                    err: String::new(),
                })
            }
            other => return Err(Error::Invalid(format!("unknown endpoint {other}"))),
        })
    }

    /// Volume `v` as `Get` and `List` show it.
    fn volume(
        &self,
        store: &mut Store,
        v: &thinlayer_store::volumes::VolumeRecord,
    ) -> Result<Volume> {
        Ok(Volume {
            name: v.name.clone(),
            mountpoint: self.mounted_at(store, &v.name)?,
            status: status(store, v)?,
        })
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
fn status(store: &mut Store, v: &thinlayer_store::volumes::VolumeRecord) -> Result<Status> {
    let usage = store.volume_usage(&v.name)?;
    Ok(Status {
        size: v.size.to_string(),
        fs: v.fs.name(),
        from: v.from.clone(),
        usage: match usage {
            Some(b) => Bytes(b).to_string(),
            None => "unknown while unmounted".to_owned(),
        },
        usage_bytes: usage,
        layout: match v.layout {
            thinlayer_store::volumes::Layout::DataDir => "data/ (empty until written)",
            thinlayer_store::volumes::Layout::Root => "filesystem root (made before data/)",
        },
    })
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
