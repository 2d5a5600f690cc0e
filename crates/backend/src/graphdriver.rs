//! A layer store shaped like Docker's graphdriver interface (Create,
//! Remove, Get, Put, Exists, Status, Cleanup, Diff, Changes, ApplyDiff,
//! DiffSize), which is what a library user of a layer store expects, and
//! its implementation over a thinlayer pool: every layer a thin snapshot of
//! its parent.
//!
//! `get` mounts a layer and counts references; `put` drops one and
//! unmounts at zero, so nested users of one layer share a mount. `cleanup`
//! unmounts everything this driver mounted. What must never happen: a
//! `remove` of a layer that is still referenced, or of one with children.

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use thinlayer_pool::LockMode;
use thinlayer_store::Store;

use crate::error::{Error, Result};

/// One changed path, as `Changes` reports it.
pub use thinlayer_image::Change;

/// Docker's graphdriver interface, in Rust.
pub trait GraphDriver {
    /// The driver's name.
    fn name(&self) -> &'static str;
    /// Creates read-only layer `id` on `parent` (or empty).
    fn create(&mut self, id: &str, parent: Option<&str>) -> Result<()>;
    /// Creates read-write layer `id` on `parent` (a container's layer).
    fn create_read_write(&mut self, id: &str, parent: Option<&str>) -> Result<()>;
    /// Removes layer `id`; refused while referenced or with children.
    fn remove(&mut self, id: &str) -> Result<()>;
    /// Mounts layer `id` (counting references) and returns its directory.
    fn get(&mut self, id: &str) -> Result<PathBuf>;
    /// Drops one reference to layer `id`; unmounts it at zero.
    fn put(&mut self, id: &str) -> Result<()>;
    /// Whether layer `id` exists.
    fn exists(&mut self, id: &str) -> Result<bool>;
    /// Key/value facts about the driver, as `docker info` shows them.
    fn status(&mut self) -> Result<Vec<(String, String)>>;
    /// Unmounts everything this driver mounted.
    fn cleanup(&mut self) -> Result<()>;
    /// Writes layer `id`'s changes against `parent` as a layer tar; returns
    /// its diff_id.
    fn diff(&mut self, id: &str, parent: Option<&str>, out: &mut dyn Write) -> Result<String>;
    /// Lists layer `id`'s changes against `parent`.
    fn changes(&mut self, id: &str, parent: Option<&str>) -> Result<Vec<Change>>;
    /// Applies a layer tar into the (empty) layer `id`; returns the tar's size.
    fn apply_diff(&mut self, id: &str, parent: Option<&str>, diff: &mut dyn Read) -> Result<u64>;
    /// The bytes of content layer `id` changed against `parent`.
    fn diff_size(&mut self, id: &str, parent: Option<&str>) -> Result<u64>;
}

/// The graphdriver over a thinlayer pool.
pub struct ThinDriver {
    root: PathBuf,
    mounts: HashMap<String, (PathBuf, usize)>,
}

impl ThinDriver {
    /// A driver over the pool under `root` (created with `pool create`).
    ///
    /// # Errors
    /// The pool's open errors.
    pub fn new(root: &Path) -> Result<ThinDriver> {
        // Opening once checks the pool is there and readable.
        drop(Store::open(root, LockMode::Shared, true)?);
        Ok(ThinDriver {
            root: root.to_owned(),
            mounts: HashMap::new(),
        })
    }

    /// Each call takes the root's lock for its own duration, so other
    /// thinlayer processes interleave with a long-lived driver.
    fn store(&self) -> Result<Store> {
        Ok(Store::open(&self.root, LockMode::Exclusive, true)?)
    }

    fn mountpoint(&self, id: &str) -> PathBuf {
        self.root.join("graph").join(id)
    }

    fn check_parent(&self, store: &mut Store, id: &str, parent: Option<&str>) -> Result<()> {
        let actual = store.pool().layer(id)?.parent;
        if actual.as_deref() != parent {
            return Err(Error::Invalid(format!(
                "layer `{id}` has parent {actual:?}, not {parent:?}"
            )));
        }
        Ok(())
    }
}

impl GraphDriver for ThinDriver {
    fn name(&self) -> &'static str {
        "thinlayer"
    }

    fn create(&mut self, id: &str, parent: Option<&str>) -> Result<()> {
        self.store()?.pool().create_layer(id, parent)?;
        Ok(())
    }

    fn create_read_write(&mut self, id: &str, parent: Option<&str>) -> Result<()> {
        // Block-level snapshots are writable either way; the distinction is
        // the caller's (Docker commits read-write layers into read-only ones).
        self.create(id, parent)
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        if let Some((_, refs)) = self.mounts.get(id) {
            return Err(Error::Invalid(format!(
                "layer `{id}` is still in use ({refs} reference(s)); put it first"
            )));
        }
        self.store()?.pool().remove_layer(id)?;
        Ok(())
    }

    fn get(&mut self, id: &str) -> Result<PathBuf> {
        if let Some((dir, refs)) = self.mounts.get_mut(id) {
            *refs += 1;
            return Ok(dir.clone());
        }
        let dir = self.mountpoint(id);
        self.store()?
            .pool()
            .mount_layer(id, &dir, thinlayer_pool::MountUse::Container)?;
        self.mounts.insert(id.to_owned(), (dir.clone(), 1));
        Ok(dir)
    }

    fn put(&mut self, id: &str) -> Result<()> {
        let Some((_, refs)) = self.mounts.get_mut(id) else {
            return Err(Error::Invalid(format!(
                "layer `{id}` is not mounted by this driver"
            )));
        };
        *refs -= 1;
        if *refs == 0 {
            self.store()?.pool().umount(id)?;
            self.mounts.remove(id);
        }
        Ok(())
    }

    fn exists(&mut self, id: &str) -> Result<bool> {
        Ok(self.store()?.pool().layout().layer_record(id).exists())
    }

    fn status(&mut self) -> Result<Vec<(String, String)>> {
        let mut store = self.store()?;
        let st = store.pool().status()?;
        let mut out = vec![
            ("Pool".into(), st.pool_id.clone()),
            ("Backing Filesystem".into(), st.fs.name().into()),
            (
                "Pool Blocksize".into(),
                thinlayer_pool::Bytes(st.block_size_bytes).to_string(),
            ),
            (
                "Base Device Size".into(),
                thinlayer_pool::Bytes(st.base_size_bytes).to_string(),
            ),
            ("Layers".into(), st.layers.to_string()),
        ];
        if let Some(k) = &st.kernel {
            out.push((
                "Data Space Used".into(),
                thinlayer_pool::Bytes(k.data_used_blocks * st.block_size_bytes).to_string(),
            ));
            out.push((
                "Data Space Total".into(),
                thinlayer_pool::Bytes(k.data_total_blocks * st.block_size_bytes).to_string(),
            ));
            out.push((
                "Metadata Blocks Used".into(),
                k.metadata_used_blocks.to_string(),
            ));
            out.push((
                "Metadata Blocks Total".into(),
                k.metadata_total_blocks.to_string(),
            ));
        }
        Ok(out)
    }

    fn cleanup(&mut self) -> Result<()> {
        let ids: Vec<String> = self.mounts.keys().cloned().collect();
        let mut store = self.store()?;
        for id in ids {
            store.pool().umount(&id)?;
            self.mounts.remove(&id);
        }
        Ok(())
    }

    fn diff(&mut self, id: &str, parent: Option<&str>, out: &mut dyn Write) -> Result<String> {
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        Ok(store.export_layer(id, out)?.diff_id)
    }

    fn changes(&mut self, id: &str, parent: Option<&str>) -> Result<Vec<Change>> {
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        Ok(store.layer_changes(id)?)
    }

    fn apply_diff(&mut self, id: &str, parent: Option<&str>, diff: &mut dyn Read) -> Result<u64> {
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        Ok(store.apply_to_layer(id, diff)?.1)
    }

    fn diff_size(&mut self, id: &str, parent: Option<&str>) -> Result<u64> {
        let mut sink = CountingSink(0);
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        let report = store.export_layer(id, &mut sink)?;
        Ok(report.bytes)
    }
}

/// A writer that only counts.
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
