//! A container layer's page cache, filled ahead of the container.
//!
//! A container layer is a filesystem of its own on its own thin device,
//! so the image's files its container reads at start (the program, its
//! libraries, `/etc/passwd` for dockerd) come cold through dm-thin and the
//! pool's loop device in every container, where overlay2's containers
//! share one page cache. In the TCG guest a busybox `true` took 77-195 ms
//! to start from a fresh layer and 26-49 ms warm (`cat` of the binary
//! first: 42-56 ms).
//!
//! So the driver learns, per image, what its containers read: when a
//! container's layer is removed, before its detached filesystem is let go
//! (the settler's first step), what of its files is still in the page
//! cache ([`thinlayer_image::HotSet::learn`], `mincore`, reading nothing)
//! joins the image's hot set, from the first [`TEACHERS`] containers
//! removed. Each mounted spare the image's template keeps (the next
//! container's layer) is then read through that set once, a step of the
//! work that waits for a quiet machine. Nothing is written: the reads
//! leave access times alone (`O_NOATIME`). The sets live in the plugin's
//! memory; a restarted plugin learns them again.

use std::collections::{BTreeMap, BTreeSet};

use thinlayer_image::{HotSet, Limits};
use thinlayer_pool::{LayerRecord, mounts::Detached};
use thinlayer_store::Store;

use super::{INIT_SUFFIX, TEMPLATE_SUFFIX, ThinDriver, docker_id, pool_id, template_of};

/// How many removed container layers of an image teach its hot set.
pub const TEACHERS: u32 = 3;

/// What the driver knows of one image's hot files.
#[derive(Default)]
pub(super) struct Hot {
    set: HotSet,
    /// Container layers learned from.
    taught: u32,
    /// The mounted spares read through the set since it last grew.
    warmed: BTreeSet<u32>,
}

/// Per image (Docker's id of its top layer).
pub(super) type HotSets = BTreeMap<String, Hot>;

/// A removed container layer's filesystem teaches `image` (see
/// [`ThinDriver::teaches`]).
#[derive(Debug)]
pub(super) struct Teacher {
    image: String,
    /// When the layer was made (Unix seconds): what changed later is the
    /// container's own.
    created: i64,
}

impl ThinDriver {
    /// The image whose hot set container layer `layer`, about to be
    /// removed, should teach: its init layer's parent, while fewer than
    /// [`TEACHERS`] did.
    pub(super) fn teaches(&self, store: &mut Store, layer: &LayerRecord) -> Option<Teacher> {
        let parent = docker_id(layer.parent.as_deref()?);
        let image = if let Some(image) = parent.strip_suffix(TEMPLATE_SUFFIX) {
            // Made on an init layer that shared the template.
            image.to_owned()
        } else if parent.ends_with(INIT_SUFFIX) {
            self.docker_parent(store, parent).ok()??
        } else {
            return None;
        };
        (self.hot.get(&image).map_or(0, |h| h.taught) < TEACHERS).then(|| Teacher {
            image,
            created: i64::try_from(layer.created_unix).unwrap_or(i64::MAX),
        })
    }

    /// Adds what of removed container layer `fs` is in the page cache,
    /// and unchanged since the layer was made, to its image's hot set;
    /// the image's spares are read through it again.
    pub(super) fn learn_hot(&mut self, Teacher { image, created }: &Teacher, fs: &Detached) {
        let t = std::time::Instant::now();
        let hot = self.hot.entry(image.clone()).or_default();
        let limits = Limits {
            changed_after: Some(*created),
            ..Limits::default()
        };
        match hot.set.learn(fs.root(), limits) {
            Ok(learned) => {
                hot.taught += 1;
                hot.warmed.clear();
                tracing::debug!(
                    %image,
                    files = learned.files,
                    bytes = learned.bytes,
                    cut = learned.cut,
                    set_bytes = hot.set.bytes(),
                    ms = crate::ms_since(t),
                    "learned what a container read"
                );
            }
            Err(e) => tracing::debug!(%image, error = %e, "nothing learned from a removed layer"),
        }
    }

    /// A mounted spare of an image's template not yet read through the
    /// image's hot set: the image and the spare's thin id.
    pub(super) fn cold_spare(&self, store: &mut Store) -> Option<(String, u32)> {
        self.hot.iter().find_map(|(image, h)| {
            if h.set.is_empty() {
                return None;
            }
            let tpid = pool_id(&template_of(image));
            store
                .pool()
                .spares_kept(Some(&tpid), true)
                .into_iter()
                .find(|t| !h.warmed.contains(t))
                .map(|t| (image.clone(), t))
        })
    }

    /// Reads mounted spare `thin_id` of `image`'s template through the
    /// image's hot set.
    pub(super) fn warm_spare(&mut self, store: &mut Store, image: &str, thin_id: u32) {
        let t = std::time::Instant::now();
        let tpid = pool_id(&template_of(image));
        let kept = store.pool().spares_kept(Some(&tpid), true);
        let dir = store.pool().layout().spares_dir().join(thin_id.to_string());
        let Some(hot) = self.hot.get_mut(image) else {
            return;
        };
        hot.warmed.retain(|t| kept.contains(t));
        hot.warmed.insert(thin_id);
        match hot.set.warm(&dir) {
            Ok(w) => tracing::debug!(
                %image,
                thin_id,
                files = w.files,
                bytes = w.bytes,
                ms = crate::ms_since(t),
                "read a spare's hot files ahead"
            ),
            Err(e) => tracing::debug!(%image, thin_id, error = %e, "spare not read ahead"),
        }
    }
}
