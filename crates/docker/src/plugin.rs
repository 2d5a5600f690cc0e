//! `thinlayer serve docker`: one legacy (v1) Docker plugin on one Unix
//! socket implementing both `GraphDriver` (images and containers on thin
//! snapshots: `dockerd --experimental -s thinlayer`) and `VolumeDriver`
//! (thin volumes: `docker run -v NAME:/path` with `-d thinlayer`).
//!
//! The protocol is the one moby v20.10 speaks (`daemon/graphdriver/proxy.go`,
//! `pkg/plugins/client.go`), not the published page:
//!
//! - `Plugin.Activate` answers `{"Implements": ["GraphDriver",
//!   "VolumeDriver"]}`.
//! - Every `GraphDriver.*` call but two POSTs a JSON body: `{"ID",
//!   "Parent", "MountLabel", "StorageOpt"}`, each left out when empty (an
//!   absent `Parent` is a base layer); `Init` sends `{"Home", "Opts",
//!   "UIDMaps", "GIDMaps"}` with lowercase `container_id`/`host_id`/`size`
//!   map keys. Answers carry `Err` (a sentence saying what to do), `Dir`,
//!   `Exists`, `Status` (pairs), `Changes` (`{"Path": "/x", "Kind": 0|1|2}`
//!   for modified, added, deleted), `Size`, `Metadata` or `Capabilities`
//!   (wrapped: `{"Capabilities": {"ReproducesExactDiffs": false}}`). The
//!   request and answer types are [`crate::protocol::graph`]'s.
//! - `GraphDriver.ApplyDiff?id=ID&parent=PARENT` has the raw uncompressed
//!   layer tar as its body (Go sends it chunked), streamed into the layer
//!   while it arrives; it answers `{"Size": N}`, the bytes of file content.
//! - `GraphDriver.Diff` answers with the raw tar stream itself, written
//!   while the layer is read; an error before it starts is a 500 with
//!   `{"Err"}` (Docker's client reports the `Err`), an error after it
//!   breaks the stream off.
//! - Neither stream holds the plugin's lock, nor the pool root's: dockerd
//!   commits a container by streaming its layer's Diff straight into the
//!   new layer's ApplyDiff ([`crate::graphdriver::stream`]).
//!
//! `VolumeDriver.*` calls go to [`crate::volume`] unchanged.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    time::Instant,
};

use serde_json::Value;
use thinlayer_image::ChangeKind;
use thinlayer_pool::{Bytes, socket::Access};

use crate::{
    error::{Error, Result},
    graphdriver::{GraphDriver, ThinDriver},
    http::{self, Download, Handler, Left, Limits, Reply, Route, Upload},
    ms_since,
    protocol::{
        self, ActivateAnswer, ErrAnswer, NoArgs,
        graph::{
            ApplyDiffQuery, Capabilities, CapabilitiesAnswer, Change, ChangesAnswer, DirAnswer,
            Done, ExistsAnswer, InitRequest, LayerRequest, MetadataAnswer, SizeAnswer,
            StatusAnswer,
        },
        parse, to_json,
    },
    volume,
};

/// Where Docker looks for plugin sockets: the driver's name is the socket's.
pub const DEFAULT_SOCKET: &str = volume::DEFAULT_SOCKET;

/// The GraphDriver endpoints this plugin serves.
const GRAPH_ENDPOINTS: &[&str] = &[
    "/GraphDriver.Init",
    "/GraphDriver.Capabilities",
    "/GraphDriver.Create",
    "/GraphDriver.CreateReadWrite",
    "/GraphDriver.Remove",
    "/GraphDriver.Get",
    "/GraphDriver.Put",
    "/GraphDriver.Exists",
    "/GraphDriver.Status",
    "/GraphDriver.GetMetadata",
    "/GraphDriver.Cleanup",
    "/GraphDriver.Diff",
    "/GraphDriver.Changes",
    "/GraphDriver.ApplyDiff",
    "/GraphDriver.DiffSize",
];

/// The plugin: the graphdriver and the volume driver over one pool.
pub struct DockerPlugin {
    graph: ThinDriver,
    volumes: volume::Plugin,
    /// The driver home Docker gave at `Init` (shown by `docker info`).
    home: Option<PathBuf>,
}

impl DockerPlugin {
    /// The plugin over the pool under `root`, with the mount references a
    /// previous run left.
    ///
    /// # Errors
    /// The pool's open errors; damaged reference records.
    pub fn new(root: &Path) -> Result<DockerPlugin> {
        Ok(DockerPlugin {
            graph: ThinDriver::new(root)?,
            volumes: volume::Plugin::new(root)?,
            home: None,
        })
    }

    /// Answers a request whose body was read whole (every endpoint but
    /// `GraphDriver.ApplyDiff` and `GraphDriver.Diff`).
    pub fn handle(&mut self, path: &str, body: &[u8]) -> Reply {
        let endpoint = endpoint_of(path);
        if endpoint == "/Plugin.Activate" {
            tracing::info!(endpoint, "request");
            return protocol::ok(&ActivateAnswer {
                implements: vec!["GraphDriver", "VolumeDriver"],
            });
        }
        if endpoint.starts_with("/VolumeDriver.") {
            return self.volumes.handle(path, body);
        }
        if !GRAPH_ENDPOINTS.contains(&endpoint) {
            return unknown(endpoint);
        }
        if endpoint == "/GraphDriver.Init" {
            tracing::info!(endpoint, "request");
            return match parse::<InitRequest>(body) {
                Ok(req) => answer(endpoint, "", self.init(req).map(|()| to_json(&Done {}))),
                Err(reply) => reply,
            };
        }
        if matches!(
            endpoint,
            "/GraphDriver.Capabilities" | "/GraphDriver.Status" | "/GraphDriver.Cleanup"
        ) {
            if let Err(reply) = parse::<NoArgs>(body) {
                return reply;
            }
            tracing::info!(endpoint, id = %"", parent = %"", "request");
            return answer(endpoint, "", self.driver_call(endpoint));
        }
        let req = match parse::<LayerRequest>(body) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        tracing::info!(endpoint, id = %req.id, parent = %req.parent, "request");
        let result = self.layer_call(endpoint, &req);
        answer(endpoint, &req.id, result)
    }

    fn init(&mut self, req: InitRequest) -> Result<()> {
        for (what, maps) in [("uid", &req.uid_maps), ("gid", &req.gid_maps)] {
            for m in maps.iter().flatten() {
                if m.container_id != m.host_id {
                    return Err(Error::Invalid(format!(
                        "{what} map {}:{}:{} remaps ids (dockerd --userns-remap): thinlayer's \
                         graphdriver stores files with the image's own ids; run dockerd without \
                         --userns-remap",
                        m.container_id, m.host_id, m.size
                    )));
                }
            }
        }
        if let Some(opt) = req.opts.iter().flatten().next() {
            return Err(Error::Invalid(format!(
                "unknown storage option `{opt}`: thinlayer takes no daemon --storage-opt (the \
                 pool's sizes are `thinlayer pool create`'s; a container's size is `docker run \
                 --storage-opt size=`); remove it"
            )));
        }
        // Init layers learnt from another dockerd (perhaps another version)
        // are learnt again.
        let templates = self.graph.forget_templates().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "init templates kept (the next dockerd start tries again, and `docker rmi` of an image removes its template)");
            0
        });
        tracing::info!(home = %req.home, root = %self.graph.root().display(), templates, "graphdriver initialised");
        self.home = (!req.home.is_empty()).then(|| PathBuf::from(req.home));
        Ok(())
    }

    /// The calls about the driver as a whole: no arguments.
    fn driver_call(&mut self, endpoint: &str) -> Result<Value> {
        let g = &mut self.graph;
        Ok(match endpoint {
            "/GraphDriver.Capabilities" => to_json(&CapabilitiesAnswer {
                capabilities: Capabilities {
                    reproduces_exact_diffs: false,
                },
            }),
            "/GraphDriver.Status" => {
                let mut pairs = g.status()?;
                if let Some(home) = &self.home {
                    pairs.push(("Docker Home".into(), home.to_string_lossy().into_owned()));
                }
                to_json(&StatusAnswer {
                    status: pairs.into_iter().map(|(k, v)| [k, v]).collect(),
                })
            }
            "/GraphDriver.Cleanup" => {
                g.cleanup()?;
                to_json(&Done {})
            }
            other => return Err(Error::Invalid(format!("{other} is not a driver call"))),
        })
    }

    /// The JSON calls that name a layer.
    fn layer_call(&mut self, endpoint: &str, req: &LayerRequest) -> Result<Value> {
        let parent = (!req.parent.is_empty()).then_some(req.parent.as_str());
        if !req.mount_label.is_empty() {
            tracing::debug!(label = %req.mount_label, "mount labels (SELinux) are not applied");
        }
        let g = &mut self.graph;
        Ok(match endpoint {
            "/GraphDriver.Create" | "/GraphDriver.CreateReadWrite" => {
                let id = required_id(req)?;
                let size = size_opt(req.storage_opt.as_ref())?;
                g.create_layer(id, parent, size)?;
                to_json(&Done {})
            }
            "/GraphDriver.Remove" => {
                g.remove(required_id(req)?)?;
                to_json(&Done {})
            }
            "/GraphDriver.Get" => to_json(&DirAnswer {
                dir: g.get(required_id(req)?)?.to_string_lossy().into_owned(),
            }),
            "/GraphDriver.Put" => {
                g.put(required_id(req)?)?;
                to_json(&Done {})
            }
            "/GraphDriver.Exists" => to_json(&ExistsAnswer {
                exists: g.exists(required_id(req)?)?,
            }),
            "/GraphDriver.GetMetadata" => to_json(&MetadataAnswer {
                metadata: g.metadata(required_id(req)?)?.into_iter().collect(),
            }),
            "/GraphDriver.Changes" => {
                let changes = g
                    .changes(required_id(req)?, parent)?
                    .into_iter()
                    .filter(|c| c.path != Path::new(".") && c.path != Path::new(""))
                    .map(|c| Change {
                        path: format!("/{}", c.path.display()),
                        kind: match c.kind {
                            ChangeKind::Modified => 0,
                            ChangeKind::Added => 1,
                            ChangeKind::Deleted => 2,
                        },
                    })
                    .collect();
                to_json(&ChangesAnswer { changes })
            }
            "/GraphDriver.DiffSize" => to_json(&SizeAnswer {
                size: g.diff_size(required_id(req)?, parent)?,
            }),
            other => return Err(Error::Invalid(format!("{other} is not a JSON call"))),
        })
    }

    /// `GraphDriver.ApplyDiff?id=ID&parent=PARENT`: checks the request and
    /// mounts the layer; the job applies the tar streamed in from the body
    /// without the plugin's lock ([`crate::graphdriver::stream`]).
    ///
    /// # Errors
    /// The answer to send at once (an unknown endpoint, a refused layer).
    pub fn upload(&mut self, path: &str) -> Result<Upload<DockerPlugin>, Reply> {
        let endpoint = endpoint_of(path);
        if endpoint != "/GraphDriver.ApplyDiff" {
            return Err(unknown(endpoint));
        }
        let ApplyDiffQuery { id, parent } = query_of(path);
        tracing::info!(endpoint, %id, %parent, "request");
        if id.is_empty() {
            return Err(answer(
                endpoint,
                &id,
                Err(Error::Invalid(
                    "ApplyDiff without ?id=: name the layer to apply into".into(),
                )),
            ));
        }
        let parent = (!parent.is_empty()).then_some(parent.as_str());
        let begun = Instant::now();
        let apply = match self.graph.begin_apply(&id, parent) {
            Ok(a) => a,
            Err(e) => return Err(answer(endpoint, &id, Err(e))),
        };
        let begin_ms = ms_since(begun);
        Ok(Box::new(move |body: &mut dyn Read| {
            let ran = Instant::now();
            let applied = apply.run(body);
            let run_ms = ms_since(ran);
            Box::new(move |p: &mut DockerPlugin| {
                let ended = Instant::now();
                let result = p
                    .graph
                    .end_apply(apply, applied)
                    .map(|size| to_json(&SizeAnswer { size }));
                tracing::debug!(%id, begin_ms, run_ms, end_ms = ms_since(ended), "apply timings");
                answer("/GraphDriver.ApplyDiff", &id, result)
            })
        }))
    }

    /// `GraphDriver.Diff`: checks the request and takes private snapshots
    /// of the layer and its parent; the job writes the layer's changes as
    /// a tar stream without the plugin's lock.
    ///
    /// # Errors
    /// The `{"Err"}` answer (status 500, which Docker's client reports)
    /// when the diff cannot start.
    pub fn download(&mut self, path: &str, body: &[u8]) -> Result<Download<DockerPlugin>, Reply> {
        let endpoint = endpoint_of(path);
        if endpoint != "/GraphDriver.Diff" {
            return Err(unknown(endpoint));
        }
        let req = parse::<LayerRequest>(body)?;
        tracing::info!(endpoint, id = %req.id, parent = %req.parent, "request");
        let parent = (!req.parent.is_empty()).then_some(req.parent.as_str());
        let failed = |e: Error| {
            tracing::warn!(endpoint, id = %req.id, error = %e, "request failed");
            Reply::err(500, e.to_string())
        };
        let begun = Instant::now();
        let diff = required_id(&req)
            .and_then(|id| self.graph.begin_diff(id, parent))
            .map_err(failed)?;
        let begin_ms = ms_since(begun);
        let id = req.id.clone();
        Ok(Box::new(move |out: &mut dyn Write| {
            let ran = Instant::now();
            let sent = diff.run(out, thinlayer_image::Hashing::Skip);
            let run_ms = ms_since(ran);
            Box::new(move |p: &mut DockerPlugin| {
                let ended = Instant::now();
                p.graph.end_diff(diff);
                let end_ms = ms_since(ended);
                match sent {
                    Ok(report) => {
                        tracing::info!(%id, entries = report.entries, bytes = report.bytes, "diff sent");
                        tracing::debug!(%id, begin_ms, run_ms, end_ms, "diff timings");
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = "/GraphDriver.Diff", %id, error = %e, "request failed");
                        Err(Reply::err(500, e.to_string()))
                    }
                }
            })
        }))
    }
}

impl Handler for DockerPlugin {
    fn route(path: &str) -> Route {
        match endpoint_of(path) {
            "/GraphDriver.ApplyDiff" => Route::Upload,
            "/GraphDriver.Diff" => Route::Download,
            _ => Route::Json,
        }
    }

    fn handle(&mut self, path: &str, body: &[u8]) -> Reply {
        DockerPlugin::handle(self, path, body)
    }

    fn upload(&mut self, path: &str) -> Result<Upload<DockerPlugin>, Reply> {
        DockerPlugin::upload(self, path)
    }

    fn download(&mut self, path: &str, body: &[u8]) -> Result<Download<DockerPlugin>, Reply> {
        DockerPlugin::download(self, path, body)
    }

    fn idle(&mut self, busy: bool) -> Left {
        self.graph.settle_step_when(busy)
    }

    fn has_urgent(&self) -> bool {
        self.graph.has_urgent()
    }

    fn urgent(&mut self) -> bool {
        self.graph.urgent_step()
    }
}

/// The endpoint of a request target: the path without its query.
fn endpoint_of(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// The query of a request target, percent-decoded, as `ApplyDiff`'s
/// (other parameters are ignored, the last of a repeated one wins).
fn query_of(path: &str) -> ApplyDiffQuery {
    let mut q = ApplyDiffQuery::default();
    let Some((_, query)) = path.split_once('?') else {
        return q;
    };
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match percent_decode(k).as_str() {
            "id" => q.id = percent_decode(v),
            "parent" => q.parent = percent_decode(v),
            _ => {}
        }
    }
    q
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).expect("two hex digits are a byte"));
                i += 3;
            }
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn required_id(req: &LayerRequest) -> Result<&str> {
    if req.id.is_empty() {
        return Err(Error::Invalid(
            "no ID in the request: name the layer".into(),
        ));
    }
    Ok(&req.id)
}

/// `StorageOpt`'s `size`, the one option a layer takes.
fn size_opt(opts: Option<&BTreeMap<String, String>>) -> Result<Option<Bytes>> {
    let mut size = None;
    for (k, v) in opts.into_iter().flatten() {
        if k.eq_ignore_ascii_case("size") {
            size = Some(v.parse::<Bytes>()?);
        } else {
            return Err(Error::Invalid(format!(
                "unknown storage option `{k}`: thinlayer layers take only size (e.g. --storage-opt size=10G)"
            )));
        }
    }
    Ok(size)
}

/// A result as Docker expects it: the value, or `{"Err": ...}` with 200.
fn answer(endpoint: &str, id: &str, result: Result<Value>) -> Reply {
    match result {
        Ok(v) => Reply::ok(v),
        Err(e) => {
            tracing::warn!(endpoint, %id, error = %e, "request failed");
            protocol::ok(&ErrAnswer { err: e.to_string() })
        }
    }
}

fn unknown(endpoint: &str) -> Reply {
    Reply::err(
        404,
        format!(
            "unknown endpoint {endpoint}; this plugin serves Plugin.Activate, the GraphDriver \
             calls ({}) and the VolumeDriver calls",
            GRAPH_ENDPOINTS
                .iter()
                .map(|e| e.trim_start_matches("/GraphDriver."))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// Serves the plugin on `socket` until SIGTERM or SIGINT, to root and the
/// members of `access`'s group (`thinlayer serve docker`).
///
/// # Errors
/// The socket is taken or cannot be bound (exit 4 for the conflicts); the
/// pool's open errors.
pub fn serve(root: &Path, socket: &Path, access: &Access) -> Result<()> {
    http::serve_until_signal(
        socket,
        access,
        Limits::default(),
        "Docker's graphdriver and volume plugin protocols",
        || DockerPlugin::new(root),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_moby_sends_them() {
        let r: LayerRequest =
            parse(br#"{"ID":"abc","Parent":"def","MountLabel":"","StorageOpt":{"size":"1G"}}"#)
                .unwrap();
        assert_eq!((r.id.as_str(), r.parent.as_str()), ("abc", "def"));
        assert_eq!(
            size_opt(r.storage_opt.as_ref()).unwrap(),
            Some("1G".parse().unwrap())
        );
        // omitempty: a base layer has no Parent key at all.
        let r: LayerRequest = parse(br#"{"ID":"abc"}"#).unwrap();
        assert!(r.parent.is_empty() && r.storage_opt.is_none());
        let r: InitRequest = parse(
            br#"{"Home":"/var/lib/docker/thinlayer","Opts":null,"UIDMaps":[{"container_id":0,"host_id":100000,"size":65536}],"GIDMaps":null}"#,
        )
        .unwrap();
        assert_eq!(r.uid_maps.as_ref().unwrap()[0].host_id, 100_000);
        assert!(parse::<LayerRequest>(b"not json").is_err());
        assert!(size_opt(Some(&BTreeMap::from([("dm.basesize".into(), "1G".into())]))).is_err());
    }

    #[test]
    fn routes_and_queries() {
        assert_eq!(
            DockerPlugin::route("/GraphDriver.ApplyDiff?id=a&parent=b"),
            Route::Upload
        );
        assert_eq!(DockerPlugin::route("/GraphDriver.Diff"), Route::Download);
        assert_eq!(DockerPlugin::route("/GraphDriver.DiffSize"), Route::Json);
        assert_eq!(DockerPlugin::route("/VolumeDriver.Mount"), Route::Json);
        let q = query_of("/GraphDriver.ApplyDiff?id=a%2Db-init&parent=");
        assert_eq!(q.id, "a-b-init");
        assert_eq!(q.parent, "");
        assert_eq!(
            endpoint_of("/GraphDriver.ApplyDiff?id=x"),
            "/GraphDriver.ApplyDiff"
        );
    }
}
