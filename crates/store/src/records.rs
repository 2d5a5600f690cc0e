//! The store's records, beside the pool's under `ROOT/store/`: what the
//! pool does not know about its layers (their diff_id, whether their
//! content is complete), images and containers.
//!
//! A layer applied from a tar is recorded `complete: false` *before* its
//! snapshot is made and marked complete after the tar is in: a crash in
//! between leaves a layer the next import removes and applies again, never
//! one that looks whole and is not.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thinlayer_pool::Record;

/// What a layer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// A layer of an imported image (its id is the OCI ChainID).
    Image,
    /// A container's init layer (hostname, hosts, resolv.conf).
    Init,
    /// A container's read-write layer.
    Container,
    /// A layer made from a tar or a commit by hand.
    Made,
}

/// The store's facts about one pool layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The pool layer id.
    pub id: String,
    /// What it is for.
    pub kind: LayerKind,
    /// `sha256:` of the uncompressed tar it was made from.
    #[serde(default)]
    pub diff_id: Option<String>,
    /// Whether its content is all there.
    pub complete: bool,
}

/// An imported image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Its name.
    pub name: String,
    /// Digest of its config.
    pub config_digest: String,
    /// Its layers bottom to top: pool layer ids (ChainIDs).
    pub layers: Vec<String>,
    /// Their diff_ids.
    pub diff_ids: Vec<String>,
    /// Its config's `Volumes`: each becomes an anonymous volume of a
    /// container made from it (empty for images imported before they were
    /// recorded: import them again under a new name to have them).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Import time, seconds since the epoch.
    pub created_unix: u64,
}

/// A container: an init layer and a read-write layer over an image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Its name.
    pub name: String,
    /// The image it was made from.
    pub image: String,
    /// The image's top layer (the init layer's parent).
    pub image_top: String,
    /// Its init layer.
    pub init_layer: String,
    /// Its read-write layer.
    pub layer: String,
    /// The hostname written into the init layer.
    pub hostname: String,
    /// Default mount point.
    pub mountpoint: PathBuf,
    /// Volumes mounted inside it (named, anonymous, from another container).
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Host paths bind-mounted inside it.
    #[serde(default)]
    pub binds: Vec<BindMount>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

/// A store operation begun and not yet finished: written to
/// `ROOT/store/intent.rec` before its first change and removed after its
/// last, so that a crash in between is settled at the next exclusive open
/// (`Store::open`): a create whose commit point was reached is kept,
/// any other rolled back; a removal is always finished. Layers are only
/// ever removed through the pool (which deletes their thin ids in the
/// kernel before it forgets them), never by dropping records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Intent {
    /// `layer apply` or `container commit` making layer `id` from a tar.
    /// Commit point: its [`LayerMeta`] marked complete.
    ApplyLayer {
        /// The new layer.
        id: String,
    },
    /// `container create`. Commit point: the container record.
    CreateContainer {
        /// The container.
        name: String,
        /// Its init layer.
        init_layer: String,
        /// Its read-write layer.
        layer: String,
        /// The anonymous volumes it makes (names free when it began).
        #[serde(default)]
        volumes: Vec<String>,
    },
    /// `container rm`: always finished.
    RemoveContainer {
        /// The container.
        name: String,
        /// Its init layer.
        init_layer: String,
        /// Its read-write layer.
        layer: String,
        /// Its default mount point (a directory to remove).
        mountpoint: PathBuf,
        /// Its anonymous volumes to remove with it (`--volumes`).
        #[serde(default)]
        volumes: Vec<String>,
    },
    /// `image rm`: always finished.
    RemoveImage {
        /// The image.
        name: String,
        /// Its layers that nothing else used when it began, top first.
        layers: Vec<String>,
    },
}

impl Intent {
    /// A few words for messages.
    pub fn describe(&self) -> String {
        match self {
            Intent::ApplyLayer { id } => format!("layer apply of `{id}`"),
            Intent::CreateContainer { name, .. } => format!("container create of `{name}`"),
            Intent::RemoveContainer { name, .. } => format!("container rm of `{name}`"),
            Intent::RemoveImage { name, .. } => format!("image rm of `{name}`"),
        }
    }
}

impl Record for LayerMeta {
    const KIND: &'static str = "layer-meta";
}

impl Record for ImageRecord {
    const KIND: &'static str = "image";
}

impl Record for ContainerRecord {
    const KIND: &'static str = "container";
}

impl Record for Intent {
    const KIND: &'static str = "store-intent";
}

/// A volume mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume.
    pub volume: String,
    /// Absolute path inside the container.
    pub path: PathBuf,
    /// Mounted read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Made for this container (its own anonymous volume, which `container
    /// rm --volumes` removes); false for a named one and for one shared
    /// from another container.
    #[serde(default)]
    pub anonymous: bool,
}

/// A host path bind-mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// The host path (a directory or a file).
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub path: PathBuf,
    /// Mounted read-only.
    #[serde(default)]
    pub readonly: bool,
}
