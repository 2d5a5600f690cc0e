//! The store's transactions above the pool, and who may touch which layer.
//!
//! `container create` (with its anonymous volumes), `container rm` (with
//! `--volumes` theirs), `image rm`, `layer apply` and
//! `container commit` each take several pool steps (a layer made or
//! removed is itself a small pool transaction) and write store records in
//! between. Each records its [`Intent`] at `ROOT/store/intent.rec` before
//! its first change and removes it after its last, with fault points
//! between the steps. The next exclusive [`Store::open`] settles an intent
//! a crash left: a create whose commit point was reached (the container
//! record, a complete layer meta) is kept, any other rolled back; a
//! removal is finished. Every step tolerates a layer or record already
//! gone, so settling can itself be interrupted and run again. Layers are
//! only removed through the pool, which deletes a thin id in the kernel
//! before it forgets it; the store never drops a pool record itself.
//!
//! Ownership: every layer the store makes records its owner (image layers
//! [`Owner::Image`], init and read-write layers [`Owner::Container`],
//! volumes [`Owner::Volume`], `layer apply` and commits [`Owner::User`]). An
//! import reuses or removes only image layers; `image rm` and `container
//! rm` remove only their owner's; user verbs refuse ids another owner
//! reserves ([`names::reserved_by`]) or holds.
//!
//! What must never happen: a layer of one owner removed or adopted by
//! another's verb; an intent left that no open can settle without saying
//! what to do.

use std::{fs, path::Path};

use thinlayer_pool::{Owner, Record, fault, names, record};

use crate::{
    Error, Result, Store,
    records::{Intent, LayerKind, LayerMeta},
};

/// The owner recorded for a layer of `kind`.
pub(crate) fn owner_of(kind: LayerKind) -> Owner {
    match kind {
        LayerKind::Image => Owner::Image,
        LayerKind::Init | LayerKind::Container => Owner::Container,
        LayerKind::Made => Owner::User,
    }
}

impl Store {
    fn intent_path(&self) -> std::path::PathBuf {
        self.dir.join("intent.rec")
    }

    /// The interrupted operation, if any.
    ///
    /// # Errors
    /// A damaged intent record.
    pub fn pending_intent(&self) -> Result<Option<Intent>> {
        Self::read_opt(&self.intent_path())
    }

    /// Records `intent` before the first change of its operation.
    pub(crate) fn begin_intent(&mut self, intent: &Intent) -> Result<()> {
        if let Some(old) = self.pending_intent()? {
            // Only possible when the open could not settle it (an inactive
            // pool); the pool refuses the new operation anyway.
            return Err(thinlayer_pool::Error::InvalidArgument(format!(
                "an interrupted {} is not settled yet; activate the pool (`thinlayer pool activate`) \
                 and run the command again",
                old.describe()
            ))
            .into());
        }
        intent.save(&self.intent_path())?;
        Ok(())
    }

    /// Clears the intent after the last change of its operation.
    pub(crate) fn finish_intent(&mut self) -> Result<()> {
        record::remove(&self.intent_path())?;
        Ok(())
    }

    /// Settles an operation a crash interrupted (see the module notes);
    /// run by every exclusive [`Store::open`]. With the pool inactive the
    /// intent waits for the next open. Returns what it did, in a sentence.
    ///
    /// # Errors
    /// [`Error::Unsettled`] wrapping what stopped it (the intent stays, so
    /// the next open tries again).
    pub fn settle_intent(&mut self) -> Result<Option<String>> {
        let Some(intent) = self.pending_intent()? else {
            return Ok(None);
        };
        if self.pool.pool_device()?.is_none() {
            tracing::warn!(
                "an interrupted {} waits for the pool to be active",
                intent.describe()
            );
            return Ok(None);
        }
        let unsettled = |e: Error| Error::Unsettled {
            what: intent.describe(),
            error: Box::new(e),
        };
        // The pool's own interrupted step first: it may be one of ours.
        self.pool.recover().map_err(|e| unsettled(e.into()))?;
        let outcome = self.settle(&intent).map_err(unsettled)?;
        self.finish_intent()?;
        let said = format!("settled an interrupted {}: {outcome}", intent.describe());
        tracing::info!("{said}");
        Ok(Some(said))
    }

    fn settle(&mut self, intent: &Intent) -> Result<&'static str> {
        match intent {
            Intent::ApplyLayer { id } => {
                let complete = self.layer_meta(id)?.is_some_and(|m| m.complete);
                if complete && self.pool.layout().layer_record(id).exists() {
                    return Ok("kept (its content was complete)");
                }
                // Made here only if the store's meta for it exists: never a
                // layer of that name made since by another verb.
                if self.layer_meta(id)?.is_some() {
                    self.remove_owned_layer(id, Owner::User)?;
                }
                Ok("rolled back")
            }
            Intent::CreateContainer {
                name,
                init_layer,
                layer,
                volumes,
            } => {
                if self.container_path(name).exists() {
                    return Ok("kept (its record was written)");
                }
                self.remove_owned_layer(layer, Owner::Container)?;
                self.remove_owned_layer(init_layer, Owner::Container)?;
                // Their names were free when it began: made by it.
                for v in volumes {
                    self.remove_volume_parts(v)?;
                }
                Ok("rolled back")
            }
            Intent::RemoveContainer {
                name,
                init_layer,
                layer,
                mountpoint,
                volumes,
            } => {
                if self.pool.layout().layer_record(layer).exists() {
                    self.umount_container(name)?;
                }
                self.remove_container_parts(name, init_layer, layer, mountpoint, volumes)?;
                Ok("finished")
            }
            Intent::RemoveImage { name, layers } => {
                record::remove(&self.image_path(name))?;
                self.remove_image_layers(layers)?;
                Ok("finished")
            }
        }
    }

    /// Whether pool layer `l` is an image layer: recorded so, or (records
    /// written before owners were) a layer whose store meta says so.
    pub(crate) fn is_image_layer(&self, l: &thinlayer_pool::LayerRecord) -> Result<bool> {
        Ok(match l.owner {
            Owner::Image => true,
            Owner::User => self
                .layer_meta(&l.id)?
                .is_some_and(|m| m.kind == LayerKind::Image),
            _ => false,
        })
    }

    /// Whether pool layer `l` belongs to `owner`, by its record or (records
    /// written before owners were) by the store's meta of it.
    fn owns(&self, l: &thinlayer_pool::LayerRecord, owner: Owner) -> Result<bool> {
        if l.owner == owner {
            return Ok(true);
        }
        if l.owner != Owner::User {
            return Ok(false);
        }
        let kind = self.layer_meta(&l.id)?.map(|m| m.kind);
        Ok(match owner {
            Owner::Image => kind == Some(LayerKind::Image),
            Owner::Container => matches!(kind, Some(LayerKind::Init | LayerKind::Container)),
            _ => false,
        })
    }

    /// Refuses to make layer `id` for `owner` when a layer of that id
    /// exists: [`thinlayer_pool::Error::NotOwner`] naming its owner when it
    /// is another's, [`thinlayer_pool::Error::LayerExists`] otherwise.
    pub(crate) fn check_new_layer(
        &self,
        id: &str,
        owner: Owner,
        asker: &'static str,
    ) -> Result<()> {
        match self.pool.layer(id) {
            Err(thinlayer_pool::Error::UnknownLayer(_)) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(l) if l.owner == owner => {
                Err(thinlayer_pool::Error::LayerExists(id.to_owned()).into())
            }
            Ok(_) => {
                self.pool.owned_layer(id, owner, asker, "take")?;
                Err(thinlayer_pool::Error::LayerExists(id.to_owned()).into())
            }
        }
    }

    /// The checks of a user verb (`layer apply`, `container commit --as`)
    /// about to make layer `id`: a valid id of no form another owner
    /// reserves, and no layer of that id.
    pub(crate) fn check_user_layer(&self, id: &str, asker: &'static str) -> Result<()> {
        names::check_user_id("layer", id, Owner::User)?;
        self.check_new_layer(id, Owner::User, asker)
    }

    /// Removes layer `id` of `owner` and its meta; a layer already gone is
    /// not an error (returns `false`).
    ///
    /// # Errors
    /// [`thinlayer_pool::Error::NotOwner`] when another owner holds it;
    /// the pool's removal errors.
    pub(crate) fn remove_owned_layer(&mut self, id: &str, owner: Owner) -> Result<bool> {
        let layer = match self.pool.layer(id) {
            Err(thinlayer_pool::Error::UnknownLayer(_)) => None,
            r => Some(r?),
        };
        if let Some(l) = &layer {
            if !self.owns(l, owner)? {
                self.pool.owned_layer(id, owner, "the store", "remove")?;
            }
            self.pool.remove_layer(id)?;
        }
        record::remove(&self.meta_path(id))?;
        Ok(layer.is_some())
    }

    /// Makes layer `id` (a user layer) from the layer tar `input` on
    /// `parent`, as one transaction: `layer apply` and `container commit`.
    ///
    /// # Errors
    /// Reserved or taken id ([`Store::check_user_layer`]), and as
    /// [`Store::apply_new_layer`] (rolled back).
    pub fn apply_layer(
        &mut self,
        id: &str,
        parent: Option<&str>,
        input: impl std::io::Read,
        expected_diff_id: Option<&str>,
        size_hint: u64,
    ) -> Result<LayerMeta> {
        self.check_user_layer(id, "`thinlayer layer apply`")?;
        self.begin_intent(&Intent::ApplyLayer { id: id.to_owned() })?;
        fault::point("layer_apply.after_intent");
        match self.apply_new_layer(
            id,
            parent,
            input,
            expected_diff_id,
            LayerKind::Made,
            size_hint,
        ) {
            Ok(meta) => {
                fault::point("layer_apply.after_record");
                self.finish_intent()?;
                Ok(meta)
            }
            // The undo failed: the next open tries again.
            Err(e @ Error::Rollback { .. }) => Err(e),
            Err(e) => {
                self.finish_intent()?;
                Err(e)
            }
        }
    }

    /// Removes container `name`'s layers (read-write, then init), metas,
    /// record and mount point directory, then the anonymous `volumes`
    /// removed with it; each step tolerates what an interrupted removal
    /// already did.
    pub(crate) fn remove_container_parts(
        &mut self,
        name: &str,
        init_layer: &str,
        layer: &str,
        mountpoint: &Path,
        volumes: &[String],
    ) -> Result<()> {
        self.remove_owned_layer(layer, Owner::Container)?;
        fault::point("container_rm.after_rw_layer");
        self.remove_owned_layer(init_layer, Owner::Container)?;
        fault::point("container_rm.after_layers");
        record::remove(&self.container_path(name))?;
        fault::point("container_rm.after_record");
        let _ = fs::remove_dir(mountpoint);
        for v in volumes {
            match self.remove_volume_parts(v) {
                Ok(_) => {}
                // Checked unused before the removal began; one used since
                // (only by hand, between a crash and this settling) is
                // kept rather than blocking every later command.
                Err(Error::Pool(
                    e @ (thinlayer_pool::Error::Busy { .. }
                    | thinlayer_pool::Error::Mounted { .. }
                    | thinlayer_pool::Error::HasChildren { .. }),
                )) => {
                    tracing::warn!(volume = %v, error = %e, "container rm keeps an anonymous volume in use");
                }
                Err(e) => return Err(e),
            }
            fault::point("container_rm.after_volume");
        }
        Ok(())
    }

    /// Undoes a container create: its layers and metas and its anonymous
    /// `volumes`, whichever exist.
    pub(crate) fn undo_container(
        &mut self,
        init_layer: &str,
        layer: &str,
        volumes: &[String],
        error: Error,
    ) -> Error {
        let undo = self
            .remove_owned_layer(layer, Owner::Container)
            .and_then(|_| self.remove_owned_layer(init_layer, Owner::Container))
            .and_then(|_| {
                volumes
                    .iter()
                    .try_for_each(|v| self.remove_volume_parts(v).map(|_| ()))
            });
        match undo.and_then(|_| self.finish_intent()) {
            Ok(()) => error,
            // The intent stays: the next open tries again.
            Err(u) => Error::Rollback {
                error: Box::new(error),
                undo: Box::new(u),
            },
        }
    }

    /// Image `img`'s layers that `image rm` would remove, top first: up to
    /// the first one another image lists, another layer is made from, or
    /// another owner holds.
    pub(crate) fn unused_image_layers(
        &mut self,
        name: &str,
        layers: &[String],
    ) -> Result<Vec<String>> {
        let others: Vec<_> = self
            .images()?
            .into_iter()
            .filter(|o| o.name != name)
            .collect();
        let records = self.pool.layer_records()?;
        let mut doomed: Vec<String> = Vec::new();
        for id in layers.iter().rev() {
            let Some(l) = records.iter().find(|l| &l.id == id) else {
                // Already gone (an earlier removal): nothing above it is
                // made from it either.
                continue;
            };
            let shared = others.iter().any(|o| o.layers.contains(id));
            let children = records
                .iter()
                .any(|c| c.parent.as_deref() == Some(id.as_str()) && !doomed.contains(&c.id));
            if shared || children || !self.is_image_layer(l)? {
                break;
            }
            doomed.push(id.clone());
        }
        Ok(doomed)
    }

    /// Refuses (before any change) when one of `layers` is mounted.
    pub(crate) fn refuse_mounted(&mut self, layers: &[String]) -> Result<()> {
        for l in self.pool.layers()? {
            if layers.contains(&l.id) && !l.mountpoints.is_empty() {
                return Err(thinlayer_pool::Error::Mounted {
                    what: format!("layer `{}` of the image", l.id),
                    mountpoints: l.mountpoints,
                    hint: l.id.clone(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Removes `layers` (top first) as `image rm` does, checking each again
    /// (another image, a child, another owner stops it there) and
    /// tolerating layers already gone. Returns those removed now.
    pub(crate) fn remove_image_layers(&mut self, layers: &[String]) -> Result<Vec<String>> {
        let others = self.images()?;
        let mut removed = Vec::new();
        for id in layers {
            let l = match self.pool.layer(id) {
                Err(thinlayer_pool::Error::UnknownLayer(_)) => {
                    record::remove(&self.meta_path(id))?;
                    continue;
                }
                r => r?,
            };
            let shared = others.iter().any(|o| o.layers.contains(id));
            let children = self.pool.children_of(id)?;
            if shared || !children.is_empty() || !self.is_image_layer(&l)? {
                tracing::info!(layer = %id, "image rm keeps a layer something else uses");
                break;
            }
            match self.pool.remove_layer(id) {
                Ok(()) => {}
                // Refused before any change (a device held open): kept,
                // complete, for a later import to reuse.
                Err(
                    e @ (thinlayer_pool::Error::Busy { .. }
                    | thinlayer_pool::Error::Mounted { .. }
                    | thinlayer_pool::Error::HasChildren { .. }),
                ) => {
                    tracing::warn!(layer = %id, error = %e, "image rm keeps a layer it could not remove");
                    break;
                }
                Err(e) => return Err(e.into()),
            }
            record::remove(&self.meta_path(id))?;
            removed.push(id.clone());
            fault::point("image_rm.after_layer");
        }
        Ok(removed)
    }
}
