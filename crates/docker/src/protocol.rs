//! Docker's legacy (v1) plugin protocol on the wire: one request struct
//! and one answer struct per endpoint, named and shaped as moby v20.10
//! sends and reads them (`pkg/plugins` for `Plugin.Activate`,
//! `daemon/graphdriver/proxy.go` for `GraphDriver.*`,
//! `volume/drivers/proxy.go` for `VolumeDriver.*`), not as the published
//! pages say.
//!
//! - Requests ignore fields they do not know and take a missing field (Go
//!   leaves out empty ones: `omitempty`) as empty; a body that is empty or
//!   `null` is the empty request ([`parse`]).
//! - Every error is `{"Err": "..."}` ([`ErrAnswer`]); a GraphDriver
//!   answer without a value is `{}` ([`Done`]); VolumeDriver answers carry
//!   `"Err": ""` as moby's own drivers send them.
//!
//! What must never happen: a field renamed or retyped here without moby
//! sending or reading it so (Docker ignores a field it does not know, so a
//! misspelt answer is silently lost).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::http::Reply;

/// A request body as `T`: empty or `null` is `T::default()`.
///
/// # Errors
/// The 400 answer for a body that is not JSON of `T`'s shape.
pub fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    match serde_json::from_slice::<Option<T>>(body) {
        Ok(r) => Ok(r.unwrap_or_default()),
        Err(e) => Err(Reply::err(
            400,
            format!("bad request body: {e}; send a JSON object"),
        )),
    }
}

/// An answer as the JSON body of a 200 [`Reply`].
pub fn ok<T: Serialize>(answer: &T) -> Reply {
    Reply::ok(to_json(answer))
}

/// An answer as JSON.
pub fn to_json<T: Serialize>(answer: &T) -> Value {
    serde_json::to_value(answer).expect("answers are plain structs of strings, numbers and maps")
}

/// A request without arguments (Go sends `null` or nothing).
#[derive(Deserialize, Default, Debug)]
pub struct NoArgs {}

/// Every endpoint's error answer (`{"Err": "..."}`).
#[derive(Serialize, Debug)]
pub struct ErrAnswer {
    /// A sentence saying what went wrong and what to do.
    #[serde(rename = "Err")]
    pub err: String,
}

/// `Plugin.Activate`'s answer (`plugins.Manifest`).
#[derive(Serialize, Debug)]
#[serde(rename_all = "PascalCase")]
pub struct ActivateAnswer {
    /// The subsystems served: `GraphDriver`, `VolumeDriver`.
    pub implements: Vec<&'static str>,
}

/// The `GraphDriver.*` endpoints (`graphDriverRequest`,
/// `graphDriverInitRequest`, `graphDriverResponse`: moby sends one request
/// struct for every call that names a layer and reads one response struct
/// of which each call fills one field; here each answer is its own type).
///
/// | endpoint | request | answer |
/// |---|---|---|
/// | `Init` | [`InitRequest`] | [`Done`] |
/// | `Capabilities`, `Status`, `Cleanup` | [`NoArgs`] | [`CapabilitiesAnswer`], [`StatusAnswer`], [`Done`] |
/// | `Create`, `CreateReadWrite`, `Remove`, `Put` | [`LayerRequest`] | [`Done`] |
/// | `Get` | [`LayerRequest`] | [`DirAnswer`] |
/// | `Exists` | [`LayerRequest`] | [`ExistsAnswer`] |
/// | `GetMetadata` | [`LayerRequest`] | [`MetadataAnswer`] |
/// | `Changes` | [`LayerRequest`] | [`ChangesAnswer`] |
/// | `DiffSize` | [`LayerRequest`] | [`SizeAnswer`] |
/// | `Diff` | [`LayerRequest`] | the tar stream |
/// | `ApplyDiff` | [`ApplyDiffQuery`] + the tar stream | [`SizeAnswer`] |
pub mod graph {
    use super::{BTreeMap, Deserialize, Serialize};

    /// A call that names a layer (`graphDriverRequest`); each field is
    /// left out when empty (an absent `Parent` is a base layer).
    #[derive(Deserialize, Default, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct LayerRequest {
        /// The layer.
        #[serde(default, rename = "ID")]
        pub id: String,
        /// Its parent.
        #[serde(default)]
        pub parent: String,
        /// The SELinux mount label (not applied).
        #[serde(default)]
        pub mount_label: String,
        /// `--storage-opt` pairs of a Create (`size`).
        #[serde(default)]
        pub storage_opt: Option<BTreeMap<String, String>>,
    }

    /// One user-namespace id map (`idtools.IDMap`: lowercase keys).
    #[derive(Deserialize, Debug)]
    pub struct IdMap {
        /// First id inside.
        pub container_id: i64,
        /// First id on the host.
        pub host_id: i64,
        /// How many.
        pub size: i64,
    }

    /// `GraphDriver.Init`'s body (`graphDriverInitRequest`).
    #[derive(Deserialize, Default, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct InitRequest {
        /// The driver's home under Docker's data root.
        #[serde(default)]
        pub home: String,
        /// The daemon's `--storage-opt`s.
        #[serde(default)]
        pub opts: Option<Vec<String>>,
        /// `--userns-remap`'s uid maps.
        #[serde(default, rename = "UIDMaps")]
        pub uid_maps: Option<Vec<IdMap>>,
        /// `--userns-remap`'s gid maps.
        #[serde(default, rename = "GIDMaps")]
        pub gid_maps: Option<Vec<IdMap>>,
    }

    /// `GraphDriver.ApplyDiff?id=ID&parent=PARENT`: the query (the body is
    /// the layer tar).
    #[derive(Deserialize, Default, Debug)]
    pub struct ApplyDiffQuery {
        /// The layer to apply into.
        #[serde(default)]
        pub id: String,
        /// Its parent.
        #[serde(default)]
        pub parent: String,
    }

    /// An answer without a value: `{}`.
    #[derive(Serialize, Default, Debug)]
    pub struct Done {}

    /// `Get`'s answer: the layer's tree, mounted.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct DirAnswer {
        /// An absolute, writable directory; the same every time.
        pub dir: String,
    }

    /// `Exists`' answer.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct ExistsAnswer {
        /// Whether the driver holds the layer.
        pub exists: bool,
    }

    /// `Status`' answer: pairs `docker info` shows.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct StatusAnswer {
        /// Name, value.
        pub status: Vec<[String; 2]>,
    }

    /// `GetMetadata`'s answer (`docker inspect`'s `GraphDriver.Data`).
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct MetadataAnswer {
        /// Name to value.
        pub metadata: BTreeMap<String, String>,
    }

    /// `Capabilities`' answer, wrapped as moby reads it.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct CapabilitiesAnswer {
        /// The capabilities.
        pub capabilities: Capabilities,
    }

    /// `graphdriver.Capabilities`.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct Capabilities {
        /// Whether two Diffs of one layer give the same bytes.
        pub reproduces_exact_diffs: bool,
    }

    /// `Changes`' answer.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct ChangesAnswer {
        /// The changed paths.
        pub changes: Vec<Change>,
    }

    /// One changed path (`archive.Change`).
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct Change {
        /// Absolute in the layer (`/etc/motd`).
        pub path: String,
        /// 0 modified, 1 added, 2 deleted (`archive.ChangeType`).
        pub kind: u8,
    }

    /// `DiffSize`'s and `ApplyDiff`'s answer.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct SizeAnswer {
        /// Bytes of file content.
        pub size: u64,
    }
}

/// The `VolumeDriver.*` endpoints (`volumeDriverProxy*Request` and
/// `*Response`), each answer with `"Err": ""` but `Capabilities`'.
pub mod volume {
    use super::{BTreeMap, Deserialize, Serialize};

    /// `Create`'s body.
    #[derive(Deserialize, Default, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct CreateRequest {
        /// The volume.
        #[serde(default)]
        pub name: String,
        /// `-o` options: `size`, `fs`, `from`.
        #[serde(default)]
        pub opts: Option<BTreeMap<String, String>>,
    }

    /// The body of `Remove`, `Path` and `Get`.
    #[derive(Deserialize, Default, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct NameRequest {
        /// The volume.
        #[serde(default)]
        pub name: String,
    }

    /// The body of `Mount` and `Unmount`.
    #[derive(Deserialize, Default, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct MountRequest {
        /// The volume.
        #[serde(default)]
        pub name: String,
        /// Who mounts it (a container), counted per volume.
        #[serde(default, rename = "ID")]
        pub id: String,
    }

    /// The answer of `Create`, `Remove` and `Unmount`.
    #[derive(Serialize, Default, Debug)]
    pub struct Done {
        /// Empty.
        #[serde(rename = "Err")]
        pub err: String,
    }

    /// The answer of `Mount` and `Path`.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct MountpointAnswer {
        /// Where the volume's content is ("" when not mounted).
        pub mountpoint: String,
        /// Empty.
        pub err: String,
    }

    /// `Get`'s answer.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct GetAnswer {
        /// The volume.
        pub volume: Volume,
        /// Empty.
        pub err: String,
    }

    /// `List`'s answer.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct ListAnswer {
        /// Every volume.
        pub volumes: Vec<Volume>,
        /// Empty.
        pub err: String,
    }

    /// One volume (`proxyVolume`).
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct Volume {
        /// Its name.
        pub name: String,
        /// Where its content is ("" when not mounted).
        pub mountpoint: String,
        /// `docker volume inspect`'s `Status`.
        pub status: Status,
    }

    /// A volume's `Status` (lowercase keys, as `docker volume inspect`
    /// shows them).
    #[derive(Serialize, Debug)]
    pub struct Status {
        /// Its size.
        pub size: String,
        /// Its filesystem.
        pub fs: &'static str,
        /// The volume it was cloned from.
        pub from: Option<String>,
        /// Pool space its device maps, in words.
        pub usage: String,
        /// The same in bytes, when known (while mounted).
        pub usage_bytes: Option<u64>,
        /// Where its content lives in its filesystem.
        pub layout: &'static str,
    }

    /// `Capabilities`' answer.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct CapabilitiesAnswer {
        /// The capabilities.
        pub capabilities: Capabilities,
    }

    /// `volume.Capability`.
    #[derive(Serialize, Debug)]
    #[serde(rename_all = "PascalCase")]
    pub struct Capabilities {
        /// `local`: the volumes are this host's.
        pub scope: &'static str,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_shaped_as_moby_reads_them() {
        use serde_json::json;
        let j = |v: Value| v;
        assert_eq!(
            j(to_json(&graph::CapabilitiesAnswer {
                capabilities: graph::Capabilities {
                    reproduces_exact_diffs: false
                }
            })),
            json!({"Capabilities": {"ReproducesExactDiffs": false}})
        );
        assert_eq!(j(to_json(&graph::Done {})), json!({}));
        assert_eq!(
            j(to_json(&graph::ChangesAnswer {
                changes: vec![graph::Change {
                    path: "/a".into(),
                    kind: 1
                }]
            })),
            json!({"Changes": [{"Path": "/a", "Kind": 1}]})
        );
        assert_eq!(
            j(to_json(&graph::StatusAnswer {
                status: vec![["a".into(), "b".into()]]
            })),
            json!({"Status": [["a", "b"]]})
        );
        assert_eq!(
            j(to_json(&volume::MountpointAnswer {
                mountpoint: "/m".into(),
                err: String::new()
            })),
            json!({"Mountpoint": "/m", "Err": ""})
        );
        assert_eq!(
            j(to_json(&ErrAnswer { err: "no".into() })),
            json!({"Err": "no"})
        );
        assert_eq!(
            j(to_json(&ActivateAnswer {
                implements: vec!["VolumeDriver"]
            })),
            json!({"Implements": ["VolumeDriver"]})
        );
    }

    #[test]
    fn requests_parse_as_moby_sends_them() {
        let r: volume::MountRequest = parse(br#"{"Name":"v","ID":"c1"}"#).unwrap();
        assert_eq!((r.name.as_str(), r.id.as_str()), ("v", "c1"));
        let r: volume::CreateRequest = parse(br#"{"Name":"v","Opts":null}"#).unwrap();
        assert!(r.opts.is_none());
        let _: NoArgs = parse(b"null").unwrap();
        let _: NoArgs = parse(b"").unwrap();
        assert_eq!(parse::<NoArgs>(b"[1]").unwrap_err().status, 400);
    }
}
