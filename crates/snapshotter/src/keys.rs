//! The snapshotter's own metadata: containerd's snapshot keys mapped to
//! thinlayer layers.
//!
//! ```text
//! ROOT/snapshotter/lock               flock: one server per pool
//! ROOT/snapshotter/snapshots/ID.rec   one record per snapshot, named by its layer id
//! ```
//!
//! containerd keys are arbitrary strings (`default/3/sha256:...`,
//! `default/5/extract-1234 sha256:...`), layer ids are not: each snapshot
//! gets a generated layer id, `ctrd-N[-HINT]`, where N comes from a counter
//! that only grows while the server runs (resumed from the highest N in the
//! records and the pool at start) and HINT is the key's last `/` component
//! made into a valid id, so `thinlayer layer ls` shows which snapshot is
//! which. A record is named by its layer id, so a commit (key -> name) is one
//! atomic record rewrite. Records use the engine's crash-safe format.
//!
//! Readers ([`Snapshots`]) see the index as of the last durable write,
//! without waiting for a write in progress: each change is written to its
//! record first, then published (copy-on-write) to the readers.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use thinlayer_pool::{Record, record};

use crate::error::{Error, Result};

/// Prefix of every layer id the snapshotter makes.
pub const LAYER_PREFIX: &str = "ctrd-";
const HINT_MAX: usize = 48;

/// A snapshot's kind, as containerd knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Writable, not yet committed.
    Active,
    /// Read-only view of a parent.
    View,
    /// Immutable; can be a parent.
    Committed,
}

impl Kind {
    /// containerd's name for it (as used in filters).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// containerd's key (active, view) or name (committed).
    pub key: String,
    /// The thinlayer layer holding its blocks.
    pub layer: String,
    /// Its kind.
    pub kind: Kind,
    /// The parent's key; `None` for a snapshot of the empty base.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// When it was made.
    pub created: SystemTime,
    /// When it last changed (commit, label update).
    pub updated: SystemTime,
    /// Bytes its thin device mapped when it was made (its parent's blocks).
    #[serde(default)]
    pub mapped_at_create: Option<u64>,
    /// Its own bytes, measured at commit (committed snapshots are immutable).
    #[serde(default)]
    pub own_bytes: Option<u64>,
    /// The snapshotter mounts it itself at its holder directory and
    /// Mounts hands out a bind mount of that; without, the thin device
    /// (records from before bind mounts have none).
    #[serde(default)]
    pub bind: bool,
}

impl Record for Snapshot {
    const KIND: &'static str = "snapshot";
}

/// The records, loaded, with an index by key.
#[derive(Debug)]
pub struct KeyStore {
    dir: PathBuf,
    by_key: Arc<HashMap<String, Snapshot>>,
    next: u64,
    published: Snapshots,
}

/// The snapshots as last written, for readers that must not wait for a
/// write in progress (Stat, List while a Prepare runs). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Snapshots(Arc<RwLock<Arc<HashMap<String, Snapshot>>>>);

impl Snapshots {
    /// The index as of the last durable write.
    pub fn current(&self) -> Arc<HashMap<String, Snapshot>> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The snapshot under `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn get(&self, key: &str) -> Result<Snapshot> {
        self.current()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(key.to_owned()))
    }

    fn publish(&self, index: &Arc<HashMap<String, Snapshot>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(index);
    }
}

impl KeyStore {
    /// `ROOT/snapshotter`.
    pub fn base_dir(root: &Path) -> PathBuf {
        root.join("snapshotter")
    }

    /// Loads every record under `ROOT/snapshotter/snapshots` (created if
    /// missing), sweeping temp files a crash left.
    ///
    /// # Errors
    /// I/O and damaged-record errors.
    pub fn load(root: &Path) -> Result<KeyStore> {
        let dir = KeyStore::base_dir(root).join("snapshots");
        record::create_dir(&dir)?;
        record::sweep_temp(&dir)?;
        let mut by_key = HashMap::new();
        let mut next = 1;
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
                .path();
            if path.extension().is_none_or(|e| e != "rec") {
                continue;
            }
            let s = Snapshot::load(&path)?;
            next = next.max(layer_number(&s.layer).map_or(0, |n| n + 1));
            by_key.insert(s.key.clone(), s);
        }
        let by_key = Arc::new(by_key);
        let published = Snapshots::default();
        published.publish(&by_key);
        Ok(KeyStore {
            dir,
            by_key,
            next,
            published,
        })
    }

    /// The readers' view, kept current by every [`KeyStore::put`] and
    /// [`KeyStore::remove`].
    pub fn snapshots(&self) -> Snapshots {
        self.published.clone()
    }

    /// Makes sure the next generated id is above `layer`'s number (for
    /// layers of ours the pool holds without a record).
    pub fn saw_layer(&mut self, layer: &str) {
        if let Some(n) = layer_number(layer) {
            self.next = self.next.max(n + 1);
        }
    }

    /// A fresh layer id for `key`.
    pub fn new_layer_id(&mut self, key: &str) -> String {
        let n = self.next;
        self.next += 1;
        layer_id_for(n, key)
    }

    /// The snapshot under `key`.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn get(&self, key: &str) -> Result<&Snapshot> {
        self.by_key
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_owned()))
    }

    /// Whether a snapshot exists under `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    /// Every snapshot, in no particular order.
    pub fn all(&self) -> impl Iterator<Item = &Snapshot> {
        self.by_key.values()
    }

    /// Keys of the snapshots whose parent is `key`.
    pub fn children(&self, key: &str) -> Vec<String> {
        let mut c: Vec<String> = self
            .by_key
            .values()
            .filter(|s| s.parent.as_deref() == Some(key))
            .map(|s| s.key.clone())
            .collect();
        c.sort();
        c
    }

    /// Writes `s` durably (replacing the record of its layer, so a key
    /// renamed by a commit replaces `old_key` atomically) and indexes it.
    ///
    /// # Errors
    /// I/O errors.
    pub fn put(&mut self, s: Snapshot, old_key: Option<&str>) -> Result<()> {
        s.save(&self.record_path(&s.layer))?;
        let index = Arc::make_mut(&mut self.by_key);
        if let Some(old) = old_key {
            index.remove(old);
        }
        index.insert(s.key.clone(), s);
        self.published.publish(&self.by_key);
        Ok(())
    }

    /// Removes the record of `key`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove(&mut self, key: &str) -> Result<()> {
        if let Some(s) = self.by_key.get(key) {
            record::remove(&self.record_path(&s.layer))?;
            Arc::make_mut(&mut self.by_key).remove(key);
            self.published.publish(&self.by_key);
        }
        Ok(())
    }

    fn record_path(&self, layer: &str) -> PathBuf {
        self.dir.join(format!("{layer}.rec"))
    }
}

/// The layer id for snapshot number `n` of `key`: `ctrd-N` and, when the
/// key's last `/` component has anything usable, `-HINT` (letters, digits,
/// `_.:-`, others turned into `-`, at most 48 characters, keeping the end,
/// where digests and container ids differ).
pub fn layer_id_for(n: u64, key: &str) -> String {
    let last = key.rsplit('/').next().unwrap_or_default();
    let mut hint: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if hint.len() > HINT_MAX {
        hint = hint[hint.len() - HINT_MAX..].to_owned();
    }
    let hint = hint.trim_matches('-');
    if hint.is_empty() {
        format!("{LAYER_PREFIX}{n}")
    } else {
        format!("{LAYER_PREFIX}{n}-{hint}")
    }
}

/// N of a layer id `ctrd-N[-HINT]`; `None` for layers not made here.
pub fn layer_number(layer: &str) -> Option<u64> {
    let rest = layer.strip_prefix(LAYER_PREFIX)?;
    let digits = rest.split('-').next()?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_are_valid_and_readable() {
        let cases = [
            (1, "default/3/sha256:0123abcd", "ctrd-1-sha256:0123abcd"),
            (
                7,
                "default/5/extract-123456789-Xa_b sha256:ffee",
                "ctrd-7-extract-123456789-Xa_b-sha256:ffee",
            ),
            (9, "default/12/web", "ctrd-9-web"),
            (10, "", "ctrd-10"),
            (11, "a/", "ctrd-11"),
            (12, "a/ /", "ctrd-12"),
            (13, "ns/ünïcode", "ctrd-13-n-code"),
        ];
        for (n, key, want) in cases {
            let id = layer_id_for(n, key);
            assert_eq!(id, want, "{key}");
            thinlayer_pool::names::check_id("layer", &id).unwrap();
            assert_eq!(layer_number(&id), Some(n));
        }
        let long = format!("default/1/sha256:{}", "ab".repeat(40));
        let id = layer_id_for(u64::MAX, &long);
        thinlayer_pool::names::check_id("layer", &id).unwrap();
        assert!(id.ends_with(&"ab".repeat(20)), "{id}");
        assert_eq!(layer_number(&id), Some(u64::MAX));
        assert_eq!(layer_number("base"), None);
        assert_eq!(layer_number("ctrd-x"), None);
    }

    fn snap(key: &str, layer: &str, parent: Option<&str>) -> Snapshot {
        Snapshot {
            key: key.into(),
            layer: layer.into(),
            kind: Kind::Active,
            parent: parent.map(Into::into),
            labels: BTreeMap::from([("a".into(), "b".into())]),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            mapped_at_create: Some(4096),
            own_bytes: None,
            bind: false,
        }
    }

    #[test]
    fn records_survive_reload_and_commit_renames_atomically() {
        let root = std::env::temp_dir().join(format!("thinlayer-snapstore-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let mut st = KeyStore::load(&root).unwrap();
        let view = st.snapshots();
        let l1 = st.new_layer_id("default/1/extract-1 sha256:aa");
        let before = view.current();
        st.put(snap("default/1/extract-1 sha256:aa", &l1, None), None)
            .unwrap();
        // Readers see each write once it is durable; an index a reader
        // holds is not changed under it.
        assert_eq!(view.get("default/1/extract-1 sha256:aa").unwrap().layer, l1);
        assert!(before.is_empty());
        // Commit: same layer, new key, one record.
        let mut c = st.get("default/1/extract-1 sha256:aa").unwrap().clone();
        c.key = "default/2/sha256:aa".into();
        c.kind = Kind::Committed;
        st.put(c, Some("default/1/extract-1 sha256:aa")).unwrap();
        let l2 = st.new_layer_id("default/3/ctr");
        st.put(
            snap("default/3/ctr", &l2, Some("default/2/sha256:aa")),
            None,
        )
        .unwrap();
        assert_eq!(st.children("default/2/sha256:aa"), vec!["default/3/ctr"]);

        let mut again = KeyStore::load(&root).unwrap();
        assert!(!again.contains("default/1/extract-1 sha256:aa"));
        assert_eq!(
            again.get("default/2/sha256:aa").unwrap().kind,
            Kind::Committed
        );
        assert_eq!(
            again.get("default/3/ctr").unwrap(),
            st.get("default/3/ctr").unwrap()
        );
        // The counter resumes above every recorded layer.
        assert_eq!(layer_number(&again.new_layer_id("x")), Some(3));
        again.saw_layer("ctrd-40-x");
        assert_eq!(layer_number(&again.new_layer_id("x")), Some(41));
        let view = again.snapshots();
        assert!(view.get("default/3/ctr").is_ok());
        again.remove("default/3/ctr").unwrap();
        assert!(matches!(view.get("default/3/ctr"), Err(Error::NotFound(_))));
        assert!(view.get("default/2/sha256:aa").is_ok());
        again.remove("default/3/ctr").unwrap();
        assert!(matches!(
            KeyStore::load(&root).unwrap().get("default/3/ctr"),
            Err(Error::NotFound(_))
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}
