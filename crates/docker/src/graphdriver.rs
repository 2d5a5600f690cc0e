//! A layer store shaped like Docker's graphdriver interface (Create,
//! Remove, Get, Put, Exists, Status, Cleanup, Diff, Changes, ApplyDiff,
//! DiffSize), and its implementation over a thinlayer pool: every layer a
//! thin snapshot of its parent. It is the engine behind `thinlayer serve
//! docker` ([`crate::plugin`]), and usable as a library.
//!
//! Layout, decided once:
//!
//! - Docker's layer `ID` is pool layer `docker-ID`, recorded as
//!   [`Owner::Graphdriver`]'s: the driver removes, mounts and diffs only
//!   its own layers, and no other front end touches them.
//! - Each layer's filesystem holds the layer's tree under [`TREE`]
//!   (`rootfs/`): `get` returns that directory, so neither a container nor
//!   Docker sees the filesystem's `lost+found` (Docker's devicemapper
//!   returns `rootfs/` for the same reason). A layer without a parent makes
//!   the directory (0755) in its fresh snapshot of the base; a child
//!   inherits it. Diff, Changes and ApplyDiff work on that directory.
//! - `get` mounts a layer at `ROOT/graphdriver/mnt/ID` (0700 directories
//!   under the pool root's 0700) as a container's root is mounted (`nodev`,
//!   setuid kept: Docker runs containers from it), and returns
//!   `ROOT/graphdriver/mnt/ID/rootfs`, the same path every time.
//! - `get` and `put` nest: references are counted per layer, the first
//!   `get` mounts, the last `put` lets the mount go. The counts are a
//!   record (`ROOT/graphdriver/mounts.rec`, written atomically but not
//!   durably: a host crash takes the mounts with it), so a restarted
//!   plugin carries on where it stopped; `cleanup` (Docker's shutdown)
//!   unmounts everything and forgets them.
//! - A container's layer is mounted again soon after its last `put`: a
//!   `docker create` puts it, the `docker start` gets it again, and its
//!   exit puts it before the `docker rm`. So that `put` keeps the mount
//!   ("parked"), and a `get` within [`PARK_IDLE`] takes it back with one
//!   `statx`; the settler unmounts what stays parked longer (at most
//!   [`PARK_MAX`] are kept). A `remove` takes its layer's filesystem out
//!   of the mount tree at once ([`Trim::Discard`]) and the settler's next
//!   step finishes the unmount with the filesystem shut down first:
//!   nothing the removal deletes is written back (its dirty data, journal
//!   and superblock would each copy a pool block shared with the image),
//!   and the shutdown's own forced journal write is off the request path.
//!   That step comes before any reclaim: the device is open until then. A
//!   process still working in it is found before anything is detached,
//!   and the remove refused with nothing changed. Before it lets go of a
//!   container's layer, that step notes what of its files is in the page
//!   cache, and the image's next spares are read through that ([`warm`]).
//!   The mount a container's layer needs first is made before Docker asks:
//!   right after the create of a layer on its container's init layer
//!   (`ID` on `ID-init`), as urgent work the server runs at once, so it
//!   overlaps dockerd's own work before its `get`. An init layer's `put`
//!   still unmounts: Docker never mounts it again, and its child is a
//!   snapshot of it taken next (one made from a template is an overlay,
//!   below).
//! - The driver's unmounts skip the filesystem trim the CLI's unmount does
//!   ([`Trim::Skip`]): Docker removes container layers rather than keeping
//!   them, and a removal gives every block back; the trim would walk all
//!   of a layer's free space on each `put` (most of a `docker create`'s
//!   storage cost). Docker's own devicemapper driver does not trim either.
//!
//! - Kernel work no answer needs waits until requests pause (the
//!   server's settler calls [`ThinDriver::settle_step`]): a `put` unmounts
//!   and leaves the device up; a `remove` checks, takes the filesystem out
//!   of the tree and answers, and the layer's records leave the pool
//!   (its thin id in the pool's trash, see the pool's `set_teardown_later`)
//!   at the settler's first step, or first thing in the next call other
//!   than a `remove` or `put`, whichever comes first: so no call ever
//!   sees a removed layer, and a `docker rm` waits for none of the
//!   durable record writes (three fsyncs per layer). The list of removals
//!   not finished is a record too (`ROOT/graphdriver/removing.rec`,
//!   atomic, not durable): a restarted plugin finishes them; a host crash
//!   in the moment between may leave a removed layer whole in the pool,
//!   where `thinlayer layer rm` removes it. Each step then finishes one
//!   removal, tears one idle device down or
//!   reclaims one trashed thin id (discard, device, thin id), so a request
//!   arriving meanwhile waits one step at most; `cleanup` (Docker's
//!   shutdown) and the next start finish whatever is left. A device a
//!   `put` left up also makes the next `get` of that layer cheaper, and a
//!   snapshot of it suspends it for the moment of the `create_snap`.
//!
//! - An image layer containers are created on keeps one mounted spare
//!   (the engine's `provision_mounted`) until it has an init template,
//!   made by the settler after the first `docker create` on it and
//!   dropped after [`SPARE_IDLE`] without one: the next container's init
//!   layer takes it, and its `get` moves a mount instead of activating a
//!   device and mounting a filesystem.
//!
//! - An image layer containers are created on gets an **init template**,
//!   pool layer `docker-ID-init-template` (never a Docker id): what
//!   Docker's init code wrote into the first container's init layer
//!   (`/.dockerenv`, `/etc/hosts`, `/dev/console`, `/dev/pts`, `/proc`,
//!   ...; the same for every container of one image under one daemon: the
//!   files are empty, their content is bind-mounted at start). The settler
//!   makes it, a thin snapshot of that init layer, once a container's
//!   layer has been made on it (so Docker finished it; a failed init code
//!   puts the layer too). Every later init layer on the image is a
//!   snapshot of the template, recorded as the image's child as before,
//!   and its first `get` is an overlay on the template (mounted read-only
//!   and kept), with the upper directory on a private tmpfs ([`initlayer`]).
//!   Docker's init code unlinks its files and makes them again there; the
//!   `put` compares what it left with the template and, the same, writes
//!   nothing: no pool block, no journal, no flush (3 pool blocks for the
//!   first init layer, 0 for the next in `tests/vm_graphdriver.rs`).
//!   Anything else is written into a device of the layer's own, as Docker
//!   would have. Until then such an init layer **shares its template**: it
//!   has no device and no pool layer, only a record of the driver's
//!   (`ROOT/graphdriver/inits/ID`, one durable write: no intent, no spare
//!   taken, no kernel work), and the container's layer made on it next is
//!   a snapshot of the template, recorded as the template's child (a
//!   `Changes` against the init layer is one against the template). The
//!   template (mounted read-only: nothing writes it) keeps one spare
//!   mounted, which the settler makes again while requests pause (on a
//!   machine other processes keep busy, once it is quieter, or after
//!   [`QUIET_WAIT`]; see [`ThinDriver::settle_step_when`]): the
//!   container's layer takes it (no kernel snapshot in its create, and
//!   its `get` moves a mount).
//!   The template is removed with its image layer, just before it.
//!   Docker's `Init` (each dockerd start) removes the templates no init
//!   layer shares and no container's layer stands on: the next dockerd,
//!   perhaps another version with other init files, teaches them again
//!   (a kept one is compared with at each `put` all the same).
//!
//! - `diff` and `apply_diff` stream with no lock held ([`stream`]): each
//!   takes what its stream needs under the locks, streams, and settles
//!   under the locks again, so Docker can stream one layer's Diff straight
//!   into another's ApplyDiff.
//!
//! What must never happen: a `remove` of a layer with children, of a layer
//! some process still works in or a stream uses, or of another owner's
//! layer; an `apply_diff` that fails half way and leaves a half-applied
//! layer (it is made empty again).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use thinlayer_pool::{Bytes, LockMode, MountUse, Owner, Record, Trim, record};
use thinlayer_store::Store;

use crate::{
    error::{Error, Result},
    http::Left,
};

mod initlayer;
pub mod stream;
mod warm;

pub use stream::{ApplyStream, DiffStream};

/// One changed path, as `Changes` reports it.
pub use thinlayer_image::Change;

/// The directory of each layer's filesystem that holds the layer's tree.
pub const TREE: &str = "rootfs";

/// Pool layer ids of the driver's layers: this prefix, then Docker's id.
pub const ID_PREFIX: &str = "docker-";

/// Get/Put references per layer, kept across plugin restarts
/// (`ROOT/graphdriver/mounts.rec`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct MountRefs(BTreeMap<String, u64>);

impl Record for MountRefs {
    const KIND: &'static str = "graphdriver-mounts";
}

/// Docker layers removed but not yet taken out of the pool, oldest first
/// (`ROOT/graphdriver/removing.rec`): a restarted plugin finishes them.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct Removing(Vec<String>);

impl Record for Removing {
    const KIND: &'static str = "graphdriver-removing";
}
const ASKER: &str = "Docker graphdriver";

/// Docker's graphdriver interface, in Rust.
pub trait GraphDriver {
    /// The driver's name.
    fn name(&self) -> &'static str;
    /// Creates read-only layer `id` on `parent` (or empty).
    fn create(&mut self, id: &str, parent: Option<&str>) -> Result<()>;
    /// Creates read-write layer `id` on `parent` (a container's layer).
    fn create_read_write(&mut self, id: &str, parent: Option<&str>) -> Result<()>;
    /// Removes layer `id`; refused with children or while a process works
    /// in it.
    fn remove(&mut self, id: &str) -> Result<()>;
    /// Mounts layer `id` (counting references) and returns its tree.
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
    /// Applies a layer tar into the (empty) layer `id`; returns the bytes of
    /// file content it holds (Docker's size of the layer).
    fn apply_diff(&mut self, id: &str, parent: Option<&str>, diff: &mut dyn Read) -> Result<u64>;
    /// The bytes of file content layer `id` changed against `parent`.
    fn diff_size(&mut self, id: &str, parent: Option<&str>) -> Result<u64>;
}

/// The graphdriver over a thinlayer pool.
pub struct ThinDriver {
    root: PathBuf,
    /// References per Docker layer id (only mounted layers appear).
    refs: BTreeMap<String, u64>,
    /// The layers Diffs and ApplyDiffs in flight use.
    streams: stream::Streams,
    /// The last number given to a stream's directory.
    stream_seq: u64,
    /// Docker layers whose device a `put` left up, for the settler.
    idle: std::collections::BTreeSet<String>,
    /// Removed layers' filesystems, out of the mount tree, whose unmounts
    /// the settler finishes (before it reclaims their thin ids).
    /// Each with the image whose hot set it teaches before it goes
    /// (see [`warm`]).
    dead: Vec<(thinlayer_pool::mounts::Detached, Option<warm::Teacher>)>,
    /// Init layers whose overlay their last `put` left mounted (it held
    /// what the template holds), for the settler to unmount (see
    /// [`initlayer`]).
    spent: std::collections::BTreeSet<String>,
    /// Layers `remove` answered for whose records the settler (or the
    /// next other call) takes out of the pool, oldest first.
    removing: Vec<String>,
    /// Image layers containers were lately created on, and when: the
    /// settler keeps one mounted spare of each (see [`SPARE_IDLE`]).
    demand: BTreeMap<String, std::time::Instant>,
    /// Layers still mounted after their last `put`, and since when (see
    /// [`PARK_IDLE`]).
    parked: BTreeMap<String, std::time::Instant>,
    /// A container layer to mount at once, before its `get` comes.
    premount: Option<String>,
    /// Image layers with no init template yet, each with the init layer
    /// of a container made on it, for the settler to make one from.
    learn: BTreeMap<String, String>,
    /// How long a parked mount is kept ([`PARK_IDLE`] unless set).
    park_idle: std::time::Duration,
    /// Init layers that share their image's template, each with its
    /// image (see [`initlayer`]).
    shared_inits: BTreeMap<String, String>,
    /// Since when the work that can wait has waited for a quieter
    /// machine (see [`ThinDriver::settle_step_when`]).
    waited_since: Option<std::time::Instant>,
    /// What containers of each image read at start (see [`warm`]).
    hot: warm::HotSets,
}

/// How long a layer's mount is kept after its last `put`.
pub const PARK_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The most mounts kept after their last `put`: beyond, the settler
/// unmounts the oldest.
pub const PARK_MAX: usize = 64;

/// How long an image layer no container was created on keeps its spare.
pub const SPARE_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// How long the settler's work that can wait (idle devices, spares,
/// parked mounts) waits for a quieter machine at most, before
/// each step: on a host that is always busy it trickles, one step every
/// this long. Longer than a container's start in the TCG guest: from its
/// layer's `get` to its `put`, a `docker run --rm IMAGE true` took
/// 2.4-4.8 s there, so 3 s let a spare be made and read ahead in the
/// middle of one (165-335 ms of kernel and read work while runc started
/// the container).
pub const QUIET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Docker's suffix of a container's init layer, made on the image's top
/// layer by every `docker create`.
const INIT_SUFFIX: &str = "-init";

/// The suffix of an image layer's init template (see the module's notes):
/// never a Docker id, which is hex, or hex and [`INIT_SUFFIX`].
const TEMPLATE_SUFFIX: &str = "-init-template";

/// The id of image layer `image`'s init template.
fn template_of(image: &str) -> String {
    format!("{image}{TEMPLATE_SUFFIX}")
}

/// Whether `id` is an init template, which Docker never sees.
fn is_template(id: &str) -> bool {
    id.ends_with(TEMPLATE_SUFFIX)
}

/// Whether image layer `image` has an init template.
fn has_template(store: &mut Store, image: &str) -> bool {
    store
        .pool()
        .layout()
        .layer_record(&pool_id(&template_of(image)))
        .exists()
}

/// A provision the settler makes: `count` spares of `id` kept, every one
/// mounted if `mounted` (else those made now are not).
struct Wanted {
    id: String,
    count: usize,
    mounted: bool,
}

/// Docker's id of the driver's pool layer `pid`.
fn docker_id(pid: &str) -> &str {
    pid.strip_prefix(ID_PREFIX).unwrap_or(pid)
}

/// The pool layer id of Docker layer `id`.
pub fn pool_id(id: &str) -> String {
    format!("{ID_PREFIX}{id}")
}

fn refs_path(root: &Path) -> PathBuf {
    root.join("graphdriver").join("mounts.rec")
}

fn removing_path(root: &Path) -> PathBuf {
    root.join("graphdriver").join("removing.rec")
}

impl ThinDriver {
    /// A driver over the pool under `root` (created with `pool create`),
    /// with the references a previous run left (those whose mount is gone
    /// are dropped).
    ///
    /// # Errors
    /// The pool's open errors; a damaged references record.
    pub fn new(root: &Path) -> Result<ThinDriver> {
        // Opening once checks the pool is there and settles what a crash
        // left.
        let mut store = Store::open(root, LockMode::Exclusive, true)?;
        record::create_dir(&root.join("graphdriver").join("mnt"))?;
        let mut driver = ThinDriver {
            root: root.to_owned(),
            refs: BTreeMap::new(),
            streams: stream::Streams::default(),
            stream_seq: 0,
            idle: std::collections::BTreeSet::new(),
            demand: BTreeMap::new(),
            dead: Vec::new(),
            spent: std::collections::BTreeSet::new(),
            removing: Vec::new(),
            parked: BTreeMap::new(),
            premount: None,
            learn: BTreeMap::new(),
            park_idle: PARK_IDLE,
            shared_inits: BTreeMap::new(),
            waited_since: None,
            hot: warm::HotSets::new(),
        };
        driver.sweep_streams(&mut store)?;
        driver.load_shared_inits(&mut store)?;
        drop(store);
        let mounted = driver.mounted_dirs()?;
        let MountRefs(refs) =
            record::read_volatile(&refs_path(root), MountRefs::KIND, mounted.is_empty())?;
        for (id, n) in refs {
            if mounted.contains(&driver.mountpoint(&id)) {
                driver.refs.insert(id, n);
            } else {
                tracing::info!(%id, "forgetting the references of a layer no longer mounted");
            }
        }
        driver.save_refs()?;
        driver.sweep_overlays(&mounted)?;
        let mut store = driver.store()?;
        // Mounts a previous run kept after their last `put` (or made before
        // a `get` that never came); the templates' read-only mounts stay
        // (overlays a reference holds may be on them).
        for dir in mounted {
            let id = dir.file_name().unwrap_or_default().to_string_lossy();
            if !driver.refs.contains_key(id.as_ref())
                && !is_template(&id)
                && thinlayer_pool::mounts::is_mountpoint(&dir)?
            {
                store
                    .pool()
                    .umount_with(&dir.to_string_lossy(), Trim::Skip)?;
            }
        }
        // Removals a previous run answered and did not finish (a damaged
        // record, after a host crash, leaves those layers: `thinlayer layer
        // ls` shows them, `thinlayer layer rm` removes them).
        let Removing(left) = record::read_volatile(&removing_path(root), Removing::KIND, true)?;
        driver.removing = left;
        driver.finish_removals_in(&mut store, usize::MAX);
        let layers = store.pool().layer_records()?;
        driver.restore_shared_inits(&layers)?;
        // What a previous run left for its settler: every unmounted
        // layer's device, then the trash.
        for l in layers {
            if l.owner == Owner::Graphdriver {
                store.pool().deactivate_layer(&l.id)?;
            }
        }
        store.pool().reclaim()?;
        Ok(driver)
    }

    /// One step of the work answers left for later, as if the machine
    /// were quiet (see [`ThinDriver::settle_step_when`]); returns whether
    /// more is left.
    pub fn settle_step(&mut self) -> bool {
        self.settle_step_when(false) != Left::Nothing
    }

    /// One step of the work answers left for later: one removed layer's
    /// unmount finished (what its container read learned first, see
    /// [`warm`]), else one init layer's overlay its last `put` left
    /// mounted unmounted, else one removal's records taken out of the pool, else
    /// one trashed thin id reclaimed, else one image layer's init
    /// template made; else one idle device torn down, else one mounted
    /// spare read through its image's hot set, else one image layer's
    /// spares made (or, idle past [`SPARE_IDLE`], dropped), else one
    /// parked mount unmounted. A failure is logged and the work dropped
    /// from this run's list (the next start or `thinlayer pool reclaim`
    /// finishes it).
    ///
    /// The work after the template neither answers a request nor gives
    /// space back, so while other processes keep the machine `busy` (a
    /// container starting: it would take CPU time from them) it waits,
    /// [`QUIET_WAIT`] at most before each step: [`Left::WhenQuiet`]. A
    /// template never waits: it is made from a container's init layer,
    /// which a `docker run --rm` removes as soon as the container exits.
    pub fn settle_step_when(&mut self, busy: bool) -> Left {
        let t = std::time::Instant::now();
        if let Some((fs, teaches)) = self.dead.pop() {
            // First, and with no store opened (it needs no record or
            // lock): its device is reclaimed only once this is done, and
            // its thin id is still in the trash. What its container read
            // is learned before it goes.
            if let Some(teacher) = teaches {
                self.learn_hot(&teacher, &fs);
            }
            drop(fs);
            tracing::debug!(ms = crate::ms_since(t), "settled a step");
            return Left::More;
        }
        if let Some(id) = self.spent.pop_first() {
            // Nor does this: an unmount, off the `put` that answered.
            if let Err(e) = self.drop_overlay(&id) {
                tracing::warn!(%id, error = %e, "an init layer's overlay is not unmounted; the next start unmounts it");
            }
            tracing::debug!(ms = crate::ms_since(t), "settled a step");
            return Left::More;
        }
        let step = self.store().and_then(|mut store| {
            if !self.removing.is_empty() {
                self.finish_removals_in(&mut store, 1);
            } else if !store.pool().record().trash.is_empty() {
                store.pool().reclaim_some(1)?;
            } else if let Some((image, init)) = self.learn.pop_first() {
                self.make_template(&mut store, &image, &init);
            } else if busy && self.can_wait(&mut store) && self.still_waits() {
                return Ok(Left::WhenQuiet);
            } else {
                self.waited_since = None;
                self.tidy_step(&mut store)?;
            }
            let more = !self.removing.is_empty()
                || !store.pool().record().trash.is_empty()
                || !self.learn.is_empty()
                || self.can_wait(&mut store);
            Ok(if more { Left::More } else { Left::Nothing })
        });
        if !matches!(step, Ok(Left::WhenQuiet)) {
            tracing::debug!(ms = crate::ms_since(t), "settled a step");
        }
        step.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "deferred kernel work failed; the next start or `thinlayer pool reclaim` finishes it");
            Left::Nothing
        })
    }

    /// Whether there is work that can wait for a quieter machine (see
    /// [`ThinDriver::settle_step_when`]).
    fn can_wait(&self, store: &mut Store) -> bool {
        !self.idle.is_empty()
            || self.cold_spare(store).is_some()
            || self.spare_wanted(store).is_some()
            || self.parked_due().is_some()
    }

    /// One step of the work that can wait, if there is any.
    ///
    /// # Errors
    /// Pool errors.
    fn tidy_step(&mut self, store: &mut Store) -> Result<()> {
        if let Some(id) = self.idle.pop_first() {
            if !self.refs.contains_key(&id) && !self.parked.contains_key(&id) {
                match store.pool().deactivate_layer(&pool_id(&id)) {
                    Ok(_) | Err(thinlayer_pool::Error::UnknownLayer(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        } else if let Some((image, thin_id)) = self.cold_spare(store) {
            self.warm_spare(store, &image, thin_id);
        } else if let Some(wanted) = self.spare_wanted(store) {
            self.keep_spares(store, wanted);
        } else if let Some(id) = self.parked_due() {
            self.parked.remove(&id);
            self.unmount(store, &id, Trim::Skip)?;
        }
        Ok(())
    }

    /// Whether the work that can wait may wait for a quieter machine
    /// still: less than [`QUIET_WAIT`] since it first did (counted from
    /// now on the first ask).
    fn still_waits(&mut self) -> bool {
        let since = *self
            .waited_since
            .get_or_insert_with(std::time::Instant::now);
        since.elapsed() < QUIET_WAIT
    }

    /// Keeps image layer or template `id`'s spares as `wanted` says.
    fn keep_spares(&mut self, store: &mut Store, Wanted { id, count, mounted }: Wanted) {
        tracing::debug!(%id, count, mounted, "keeping a layer's spares");
        let pid = pool_id(&id);
        if count == 0 {
            self.demand.remove(&id);
        }
        let kept = if mounted {
            store
                .pool()
                .provision_mounted(Some(&pid), count)
                .map(|_| ())
        } else {
            store.pool().provision(Some(&pid), count).map(|_| ())
        };
        if let Err(e) = kept {
            // Gone, or in use (a spare must stay what its parent
            // is): no spare for it until a container asks again.
            tracing::debug!(%id, error = %e, "no spare kept");
            self.demand.remove(&id);
        }
    }

    /// Makes image layer `image`'s init template from `init`, the init
    /// layer of a container created on it (so Docker finished writing it),
    /// unless there is one; the image's spares move to it. A failure
    /// (the init layer removed meanwhile) is logged: the next container
    /// created on the image tries again.
    fn make_template(&mut self, store: &mut Store, image: &str, init: &str) {
        if has_template(store, image) {
            return;
        }
        let tid = template_of(image);
        let made = store.pool().create_layer_derived(
            Owner::Graphdriver,
            &pool_id(&tid),
            &pool_id(image),
            &pool_id(init),
        );
        match made {
            Ok(_) => {
                tracing::debug!(%image, %init, "made an image layer's init template");
                // Mounted now, for the next init layer's overlay.
                if let Err(e) = self.mount_template(store, &tid) {
                    tracing::debug!(%image, error = %e, "its template is mounted at the next get");
                }
                // The image's own spares would only be taken by an init
                // layer made before the template: none is now. The
                // template keeps two, for the next container's init layer
                // and its layer (see `spare_wanted`).
                self.demand.insert(tid, std::time::Instant::now());
                if self.demand.remove(image).is_some() {
                    if let Err(e) = store.pool().provision(Some(&pool_id(image)), 0) {
                        tracing::debug!(%image, error = %e, "its spares are left to the next start");
                    }
                }
            }
            Err(e) => tracing::debug!(%image, %init, error = %e, "no init template made"),
        }
    }

    /// Removes every init template (with its spares): a new dockerd,
    /// perhaps another version whose init code writes other files, teaches
    /// them again with its first container on each image. Returns how
    /// many went.
    ///
    /// # Errors
    /// Pool errors (the templates not yet removed stay, and are used).
    pub fn forget_templates(&mut self) -> Result<usize> {
        self.finish_removals()?;
        let mut store = self.store()?;
        let mut gone = 0;
        for l in store.pool().layer_records()? {
            if l.owner == Owner::Graphdriver && is_template(&l.id) {
                let tid = l.id.strip_prefix(ID_PREFIX).unwrap_or(&l.id);
                if self.streams.reads(tid) {
                    tracing::warn!(template = %tid, "an init template a Diff reads is kept");
                    continue;
                }
                // Init layers share it, or containers' layers are its
                // snapshots: their trees are its tree.
                let image = tid.strip_suffix(TEMPLATE_SUFFIX).unwrap_or(tid);
                if self.shared_inits.values().any(|i| i == image)
                    || !store.pool().children_of(&l.id)?.is_empty()
                {
                    tracing::debug!(template = %tid, "an init template in use is kept");
                    continue;
                }
                // An overlay a crashed dockerd left on it keeps it (and it
                // stays in use) until that init layer is put or removed.
                if let Err(e) = self.unmount(&mut store, tid, Trim::Skip) {
                    tracing::warn!(template = %tid, error = %e, "an init template still in use is kept");
                    continue;
                }
                store.pool().remove_layer(&l.id)?;
                self.demand.remove(tid);
                gone += 1;
            }
        }
        self.learn.clear();
        Ok(gone)
    }

    /// The parked mount the settler should unmount now: the oldest, if
    /// idle past [`PARK_IDLE`] (or what [`ThinDriver::keep_parked_for`]
    /// set) or beyond [`PARK_MAX`].
    /// A mount a Diff reads is never due.
    fn parked_due(&self) -> Option<String> {
        let (id, at) = self
            .parked
            .iter()
            .filter(|(id, _)| !self.streams.reads(id))
            .min_by_key(|(_, at)| **at)?;
        (at.elapsed() >= self.park_idle || self.parked.len() > PARK_MAX).then(|| id.clone())
    }

    /// Keeps parked mounts for `idle` instead of [`PARK_IDLE`].
    pub fn keep_parked_for(&mut self, idle: std::time::Duration) {
        self.park_idle = idle;
    }

    /// The urgent work [`ThinDriver::has_urgent`] announced: the mount of
    /// the container layer just created, parked for its `get`. A failure
    /// is logged; the `get` mounts then, and reports it.
    pub fn urgent_step(&mut self) -> bool {
        let Some(id) = self.premount.take() else {
            return false;
        };
        if self.refs.contains_key(&id) || self.parked.contains_key(&id) {
            return false;
        }
        let t = std::time::Instant::now();
        match self.mount_tree(&id) {
            Ok(_) => {
                self.parked.insert(id, std::time::Instant::now());
                tracing::debug!(ms = crate::ms_since(t), "mounted a layer ahead");
            }
            Err(e) => tracing::debug!(%id, error = %e, "no mount made ahead of its get"),
        }
        false
    }

    /// Whether [`ThinDriver::urgent_step`] has work.
    pub fn has_urgent(&self) -> bool {
        self.premount.is_some()
    }

    /// Each call takes the root's lock for its own duration, so other
    /// thinlayer processes interleave with a long-lived driver.
    fn store(&self) -> Result<Store> {
        let t = std::time::Instant::now();
        let store = Store::open_again(&self.root)?;
        tracing::debug!(ms = crate::ms_since(t), "pool root opened");
        Ok(store)
    }

    /// The provision an image layer or template lately asked for needs
    /// next, if its spares are not what it wants: an image layer one
    /// mounted spare (for the init layer of a container made before its
    /// template); a template one mounted (for a container's layer: an init
    /// layer shares the template); none past [`SPARE_IDLE`].
    fn spare_wanted(&self, store: &mut Store) -> Option<Wanted> {
        self.demand.iter().find_map(|(id, at)| {
            let pid = pool_id(id);
            let pool = store.pool();
            let mounted = pool.spares_kept(Some(&pid), true).len();
            let all = pool.spares_of(Some(&pid)).len();
            let want = |count, mounted| {
                Some(Wanted {
                    id: id.clone(),
                    count,
                    mounted,
                })
            };
            if at.elapsed() >= SPARE_IDLE {
                return if all > 0 { want(0, false) } else { None };
            }
            match (is_template(id), mounted, all) {
                // Kept ones are mounted too: the one there becomes it.
                (true, 0, _) => want(all.max(1), true),
                (false, 1, 1) | (true, _, _) => None,
                (false, _, _) => want(1, true),
            }
        })
    }

    /// Where layer `id` is mounted.
    pub fn mountpoint(&self, id: &str) -> PathBuf {
        self.root.join("graphdriver").join("mnt").join(id)
    }

    /// The directories mounted under the driver's `mnt`.
    fn mounted_dirs(&self) -> Result<Vec<PathBuf>> {
        let mnt = self.root.join("graphdriver").join("mnt");
        let mnt = std::fs::canonicalize(&mnt).unwrap_or(mnt);
        let all = thinlayer_pool::mounts::all()?;
        Ok(all
            .into_iter()
            .map(|m| m.mountpoint)
            .filter(|p| p.parent() == Some(mnt.as_path()))
            .map(|p| {
                self.root
                    .join("graphdriver")
                    .join("mnt")
                    .join(p.file_name().unwrap_or_default())
            })
            .collect())
    }

    /// Saves the references, not durably: they count mounts, which a host
    /// crash takes away with them (and a start forgets the references of
    /// a layer not mounted), so each Get and Put saves two fsyncs.
    fn save_refs(&self) -> Result<()> {
        Ok(record::write_volatile(
            &refs_path(&self.root),
            MountRefs::KIND,
            &self.refs,
        )?)
    }

    /// Saves the removals not finished, not durably (see
    /// [`ThinDriver::finish_removals`]); a failure is logged: the settler
    /// finishes them all the same unless the plugin stops first.
    fn save_removing(&self) {
        if let Err(e) =
            record::write_volatile(&removing_path(&self.root), Removing::KIND, &self.removing)
        {
            tracing::warn!(error = %e, "the list of removals not finished is not saved");
        }
    }

    /// Whether layer `id` (a Docker id, or a pool id) was removed and is
    /// not yet out of the pool.
    fn is_removing(&self, id: &str) -> bool {
        let id = id.strip_prefix(ID_PREFIX).unwrap_or(id);
        self.removing.iter().any(|r| r == id)
    }

    /// Takes every layer `remove` answered for out of the pool now, so the
    /// call that comes next sees the pool as Docker does. Every call but
    /// `remove` and `put` does this first; the settler does it as soon as
    /// requests pause, so it is seldom left to one.
    ///
    /// # Errors
    /// The pool's open errors (the removals stay listed).
    pub fn finish_removals(&mut self) -> Result<()> {
        if self.removing.is_empty() {
            return Ok(());
        }
        let mut store = self.store()?;
        self.finish_removals_in(&mut store, usize::MAX);
        Ok(())
    }

    /// Finishes the `max` oldest removals not finished (if any), and saves
    /// the list.
    fn finish_removals_in(&mut self, store: &mut Store, max: usize) {
        if self.removing.is_empty() {
            return;
        }
        let n = max.min(self.removing.len());
        for id in self.removing.drain(..n).collect::<Vec<_>>() {
            self.finish_removal_logged(store, &id);
        }
        self.save_removing();
    }

    /// Takes removed layer `id` (and its image's init template) out of the
    /// pool: records now, kernel work in the trash. A failure is logged
    /// with what to do: Docker was answered already.
    fn finish_removal_logged(&mut self, store: &mut Store, id: &str) {
        let t = std::time::Instant::now();
        if self.shared_inits.contains_key(id) {
            self.unshare_logged(id);
            return;
        }
        store.pool().set_teardown_later(true);
        let done = (|| -> Result<()> {
            let template = template_of(id);
            if has_template(store, id) {
                self.unmount(store, &template, Trim::Skip)?;
                store.pool().remove_layer(&pool_id(&template))?;
            }
            match store.pool().remove_layer(&pool_id(id)) {
                Ok(()) | Err(thinlayer_pool::Error::UnknownLayer(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })();
        match done {
            Ok(()) => tracing::debug!(
                %id,
                ms = crate::ms_since(t),
                "removal finished"
            ),
            Err(e) => tracing::warn!(
                %id,
                error = %e,
                "a removed layer is still in the pool; `thinlayer layer rm {ID_PREFIX}{id}` removes it"
            ),
        }
    }

    /// Layer `id`'s parent as Docker made it: a shared init layer's image,
    /// else its record's parent (`None` for a base layer).
    fn docker_parent(&self, store: &mut Store, id: &str) -> Result<Option<String>> {
        Ok(match self.shared_inits.get(id) {
            Some(image) => Some(image.clone()),
            None => Self::own(store, id, "read")?
                .parent
                .map(|p| docker_id(&p).to_owned()),
        })
    }

    /// Layer `id`'s pool record, checked to be the driver's.
    fn own(
        store: &mut Store,
        id: &str,
        action: &'static str,
    ) -> Result<thinlayer_pool::LayerRecord> {
        match store
            .pool()
            .owned_layer(&pool_id(id), Owner::Graphdriver, ASKER, action)
        {
            Err(thinlayer_pool::Error::UnknownLayer(_)) => Err(Error::Invalid(format!(
                "no layer `{id}` in this driver; Docker asked for a layer it never created here \
                 (a data root used with another storage driver or pool?)"
            ))),
            r => Ok(r?),
        }
    }

    /// Checks Docker's idea of `id`'s parent against the record. A
    /// container's layer made on its init layer while that shared its
    /// template is the template's child.
    fn check_parent(&self, store: &mut Store, id: &str, parent: Option<&str>) -> Result<()> {
        let actual = self.docker_parent(store, id)?;
        let actual = actual.as_deref();
        let mut on_its_init = || -> Result<bool> {
            let Some(init) = parent.filter(|p| p.strip_suffix(INIT_SUFFIX) == Some(id)) else {
                return Ok(false);
            };
            Ok(self
                .docker_parent(store, init)?
                .is_some_and(|image| actual == Some(template_of(&image).as_str())))
        };
        if actual != parent && !on_its_init()? {
            return Err(Error::Invalid(format!(
                "layer `{id}` has parent {}, not {}: its changes are only known against its own parent",
                actual.map_or("none".to_owned(), |p| format!("`{p}`")),
                parent.map_or("none".to_owned(), |p| format!("`{p}`")),
            )));
        }
        Ok(())
    }

    /// Creates layer `id` on `parent`, optionally checking a requested
    /// size (`StorageOpt` `size`): it may not be below the layer's (the
    /// base device's) size, nor beyond the pool's data size. A layer holds
    /// its parent's size; growing one is not offered, so a larger size is
    /// refused with what to do instead.
    ///
    /// # Errors
    /// Bad sizes, an unknown or foreign parent, an existing id, pool
    /// errors (a failed step leaves nothing behind).
    pub fn create_layer(
        &mut self,
        id: &str,
        parent: Option<&str>,
        size: Option<Bytes>,
    ) -> Result<()> {
        self.finish_removals()?;
        if let Some(p) = parent {
            self.streams.not_applying(p, "build on")?;
            // A shared init layer's only child without a device of the
            // parent's own is its container's layer.
            if p.strip_suffix(INIT_SUFFIX) != Some(id) {
                self.own_device(p)?;
            }
        }
        let mut store = self.store()?;
        let pid = pool_id(id);
        // A container's layer on its init layer that shares the template:
        // a snapshot of the template, the same tree.
        let on_shared = parent.and_then(|p| self.shared_inits.get(p)).cloned();
        let (parent_size, grandparent) = match parent {
            Some(p) => {
                let p = on_shared.as_ref().map_or(p.to_owned(), |i| template_of(i));
                let pr = Self::own(&mut store, &p, "build on")?;
                (pr.size_in(store.pool().record()), pr.parent)
            }
            None => (store.pool().record().base_size, None),
        };
        if let Some(size) = size {
            let data = store.pool().record().data_size;
            if size < parent_size {
                return Err(Error::Invalid(format!(
                    "storage-opt size={size} is below the layer's size ({parent_size}, the pool's base \
                     device size): ask for at least {parent_size}, or leave size out"
                )));
            }
            if size > data {
                return Err(Error::Invalid(format!(
                    "storage-opt size={size} is beyond the pool's data size ({data}): ask for at most \
                     {parent_size} here, or grow the pool with `thinlayer pool extend`"
                )));
            }
            if size > parent_size {
                return Err(Error::Invalid(format!(
                    "storage-opt size={size} is larger than the layer's size ({parent_size}): thinlayer \
                     layers keep their parent's size; make the pool with a larger --base-size, or \
                     leave size out"
                )));
            }
        }
        if store.pool().layout().layer_record(&pid).exists() || self.shared_inits.contains_key(id) {
            return Err(thinlayer_pool::Error::LayerExists(pid).into());
        }
        let init_on = parent.filter(|_| id.ends_with(INIT_SUFFIX));
        // A container's init layer on an image that has an init template:
        // it shares the template, which its first `get` overlays (Docker's
        // init code then writes nothing to it).
        if let Some(image) = init_on.filter(|p| has_template(&mut store, p)) {
            self.share_template(id, image)?;
            self.demand
                .insert(template_of(image), std::time::Instant::now());
            return Ok(());
        }
        match &on_shared {
            // It takes the spare the template keeps mounted (its `get` is
            // then a move of that mount), or else any.
            Some(image) => {
                let t = template_of(image);
                let tpid = pool_id(&t);
                let pool = store.pool();
                if !pool.spares_kept(Some(&tpid), true).is_empty() {
                    let unmounted = pool.spares_kept(Some(&tpid), false);
                    pool.hold_spares(unmounted);
                }
                store
                    .pool()
                    .create_layer_for(Owner::Graphdriver, &pid, Some(&tpid))?;
                self.demand.insert(t, std::time::Instant::now());
            }
            None => {
                store.pool().create_layer_for(
                    Owner::Graphdriver,
                    &pid,
                    parent.map(pool_id).as_deref(),
                )?;
            }
        }
        // A container's init layer on an image without a template yet:
        // the next one takes a mounted spare of the image, so its `get`
        // is one move of a mount.
        if let Some(p) = init_on {
            self.demand.insert(p.to_owned(), std::time::Instant::now());
        }
        // A container's layer on its init layer: mounted at once, for the
        // `get` that follows. Docker has finished the init layer: it makes
        // the image's template if there is none yet.
        if parent.and_then(|p| p.strip_suffix(INIT_SUFFIX)) == Some(id) {
            self.premount = Some(id.to_owned());
            if let (Some(init), Some(image), None) = (parent, grandparent.as_deref(), &on_shared) {
                let image = image.strip_prefix(ID_PREFIX).unwrap_or(image);
                if !has_template(&mut store, image) {
                    self.learn.insert(image.to_owned(), init.to_owned());
                }
            }
        }
        if parent.is_none() {
            if let Err(e) = store.make_subtree(&pid, TREE) {
                return Err(match store.pool().remove_layer(&pid) {
                    Ok(()) => e.into(),
                    Err(undo) => thinlayer_store::Error::Rollback {
                        error: Box::new(e),
                        undo: Box::new(undo.into()),
                    }
                    .into(),
                });
            }
        }
        Ok(())
    }

    /// Facts about layer `id` for `docker inspect` (`GraphDriver.Data`).
    ///
    /// # Errors
    /// An unknown or foreign layer.
    pub fn metadata(&mut self, id: &str) -> Result<Vec<(String, String)>> {
        self.finish_removals()?;
        let mut store = self.store()?;
        // A shared init layer is described by its template (its parent is
        // the image, as Docker made it).
        let shared = self.shared_inits.get(id).cloned();
        let described = shared.as_ref().map_or(id.to_owned(), |i| template_of(i));
        let mut layer = Self::own(&mut store, &described, "describe")?;
        let size = layer.size_in(store.pool().record());
        if let Some(image) = &shared {
            layer.parent = Some(pool_id(image));
        }
        let mut out = vec![
            ("PoolLayer".to_owned(), layer.id.clone()),
            ("ThinId".to_owned(), layer.thin_id.to_string()),
            ("DeviceSize".to_owned(), size.0.to_string()),
            (
                "Parent".to_owned(),
                layer
                    .parent
                    .as_deref()
                    .map(|p| p.strip_prefix(ID_PREFIX).unwrap_or(p).to_owned())
                    .unwrap_or_default(),
            ),
        ];
        if shared.is_some() {
            out.push(("SharesTemplate".to_owned(), "true".to_owned()));
        }
        if self.refs.contains_key(id) {
            out.push((
                "MergedDir".to_owned(),
                self.mountpoint(id)
                    .join(TREE)
                    .to_string_lossy()
                    .into_owned(),
            ));
        }
        Ok(out)
    }

    /// Unmounts layer `id`'s mount of this driver, if mounted (one
    /// `statx`: mountinfo grows with every container).
    fn unmount(&mut self, store: &mut Store, id: &str, trim: Trim) -> Result<()> {
        if self.drop_overlay(id)? {
            return Ok(());
        }
        let dir = self.mountpoint(id);
        if thinlayer_pool::mounts::is_mountpoint(&dir)? {
            store.pool().umount_with(&dir.to_string_lossy(), trim)?;
            // A removal's filesystem is out of the tree; the settler
            // finishes its unmount.
            self.dead
                .extend(store.pool().take_detached().into_iter().map(|d| (d, None)));
        }
        Ok(())
    }

    /// Mounts layer `id` at its mount point (not counted yet); returns its
    /// tree.
    fn mount_tree(&mut self, id: &str) -> Result<PathBuf> {
        let dir = self.mountpoint(id);
        let tree = dir.join(TREE);
        self.streams.not_applying(id, "mount")?;
        let mut store = self.store()?;
        Self::own(&mut store, id, "mount")?;
        store
            .pool()
            .mount_layer(&pool_id(id), &dir, MountUse::Container)?;
        match std::fs::symlink_metadata(&tree) {
            Ok(m) if m.file_type().is_dir() => Ok(tree),
            _ => {
                let _ = store.pool().umount_with(&dir.to_string_lossy(), Trim::Skip);
                Err(Error::Invalid(format!(
                    "layer `{id}` has no `{TREE}` directory: its filesystem was changed outside the \
                     driver; remove it (docker rmi / docker rm) and pull or create it again"
                )))
            }
        }
    }

    /// Unmounts layer `id` if its mount is parked (before work that needs
    /// it unmounted).
    fn unpark(&mut self, store: &mut Store, id: &str) -> Result<()> {
        if self.parked.remove(id).is_some() {
            self.let_go(store, id)?;
        }
        Ok(())
    }

    /// Unmounts layer `id` and leaves its device for the settler.
    fn let_go(&mut self, store: &mut Store, id: &str) -> Result<()> {
        store.pool().set_teardown_later(true);
        self.unmount(store, id, Trim::Skip)?;
        self.idle.insert(id.to_owned());
        Ok(())
    }

    /// Remakes layer `id` empty on `parent` after a failed apply.
    fn remake_empty(&self, store: &mut Store, id: &str, parent: Option<&str>) -> Result<()> {
        let pid = pool_id(id);
        store.pool().remove_layer(&pid)?;
        let parent_pid = parent.map(pool_id);
        store
            .pool()
            .create_layer_for(Owner::Graphdriver, &pid, parent_pid.as_deref())?;
        if parent.is_none() {
            store.make_subtree(&pid, TREE)?;
        }
        Ok(())
    }

    /// The pool root this driver serves.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl GraphDriver for ThinDriver {
    fn name(&self) -> &'static str {
        "thinlayer"
    }

    fn create(&mut self, id: &str, parent: Option<&str>) -> Result<()> {
        self.create_layer(id, parent, None)
    }

    fn create_read_write(&mut self, id: &str, parent: Option<&str>) -> Result<()> {
        // Block-level snapshots are writable either way; the distinction is
        // the caller's (Docker commits read-write layers into read-only ones).
        self.create_layer(id, parent, None)
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        let t = std::time::Instant::now();
        self.streams.unused(id, "remove")?;
        // Its init template goes with it: not while a Diff reads that.
        self.streams.unused(&template_of(id), "remove")?;
        if self.is_removing(id) {
            return Err(Error::Invalid(format!(
                "layer `{id}` was removed already; Docker asked twice"
            )));
        }
        let mut store = self.store()?;
        let open_at = crate::ms_since(t);
        let children = self.docker_children(&mut store, id)?;
        if !children.is_empty() {
            return Err(Error::Invalid(format!(
                "layer `{id}` has children ({}); remove them first",
                children.join(", ")
            )));
        }
        if self.shared_inits.contains_key(id) {
            return self.remove_shared(id);
        }
        let layer = Self::own(&mut store, id, "remove")?;
        let read_at = crate::ms_since(t);
        // Docker removes what it no longer uses; a mount it forgot to put
        // (or one parked) goes with it, unless a process still works in it
        // (then Busy), and without writing back what is deleted next.
        store.pool().set_teardown_later(true);
        let before = self.dead.len();
        self.unmount(&mut store, id, Trim::Discard)?;
        let detached_at = crate::ms_since(t);
        // Only a filesystem detached here can teach (the image is found
        // from the init layer's record: no read for a layer not mounted).
        if self.dead.len() > before {
            self.dead[before].1 = self.teaches(&mut store, &layer);
        }
        self.parked.remove(id);
        if self.refs.remove(id).is_some() {
            self.save_refs()?;
        }
        // A mount elsewhere (a bind of it) keeps the layer: refused now,
        // while Docker can still be told.
        store.pool().ensure_unmounted(&layer)?;
        let checked_at = crate::ms_since(t);
        self.idle.remove(id);
        self.demand.remove(id);
        self.demand.remove(&template_of(id));
        self.learn.remove(id);
        self.hot.remove(id);
        // Nothing uses it now: its records (and its image's init template,
        // with the template's spares) leave the pool when requests pause,
        // or before the next call, whichever comes first; the answer does
        // not wait for their durable writes.
        self.removing.push(id.to_owned());
        self.save_removing();
        tracing::debug!(%id, open_at, read_at, detached_at, checked_at, ms = crate::ms_since(t), "layer removed");
        Ok(())
    }

    fn get(&mut self, id: &str) -> Result<PathBuf> {
        self.finish_removals()?;
        if let Some(refs) = self.refs.get_mut(id) {
            *refs += 1;
            self.save_refs()?;
            return Ok(self.mountpoint(id).join(TREE));
        }
        // An init layer that shares its image's template: an overlay on
        // it (else a device of its own, mounted).
        if self.shared_inits.contains_key(id) {
            if let Some(tree) = self.get_overlay(id) {
                self.refs.insert(id.to_owned(), 1);
                self.save_refs()?;
                return Ok(tree);
            }
            self.own_device(id)?;
        }
        // A parked mount someone unmounted behind the driver's back is
        // made again.
        let tree = match self.parked.remove(id) {
            Some(_) if thinlayer_pool::mounts::is_mountpoint(&self.mountpoint(id))? => {
                self.mountpoint(id).join(TREE)
            }
            _ => self.mount_tree(id)?,
        };
        self.refs.insert(id.to_owned(), 1);
        self.save_refs()?;
        Ok(tree)
    }

    fn put(&mut self, id: &str) -> Result<()> {
        let Some(refs) = self.refs.get_mut(id) else {
            return Err(Error::Invalid(format!(
                "layer `{id}` is not mounted by this driver: Put without a Get"
            )));
        };
        if *refs > 1 {
            *refs -= 1;
            return self.save_refs();
        }
        self.refs.remove(id);
        if self.put_overlay(id)? {
            // Compared with its template, and written only if it differs.
        } else if id.ends_with(INIT_SUFFIX) && !self.streams.reads(id) {
            self.let_go(&mut self.store()?, id)?;
        } else {
            self.parked.insert(id.to_owned(), std::time::Instant::now());
        }
        self.save_refs()
    }

    fn exists(&mut self, id: &str) -> Result<bool> {
        self.finish_removals()?;
        if self.shared_inits.contains_key(id) {
            return Ok(true);
        }
        let mut store = self.store()?;
        Ok(match store.pool().layer(&pool_id(id)) {
            Ok(l) => l.owner == Owner::Graphdriver,
            Err(
                thinlayer_pool::Error::UnknownLayer(_) | thinlayer_pool::Error::InvalidName { .. },
            ) => false,
            Err(e) => return Err(e.into()),
        })
    }

    fn status(&mut self) -> Result<Vec<(String, String)>> {
        self.finish_removals()?;
        let mut store = self.store()?;
        let ours = store
            .pool()
            .layer_records()?
            .iter()
            .filter(|l| {
                l.owner == Owner::Graphdriver
                    && !stream::is_stream_snapshot(&l.id)
                    && !is_template(&l.id)
            })
            .count()
            + self.shared_inits.len();
        let st = store.pool().status()?;
        let mut out = vec![
            ("Pool Root".into(), self.root.to_string_lossy().into_owned()),
            ("Pool Id".into(), st.pool_id.to_string()),
            ("Backing Filesystem".into(), st.fs.name().into()),
            (
                "Pool Blocksize".into(),
                Bytes(st.block_size_bytes).to_string(),
            ),
            (
                "Base Device Size".into(),
                Bytes(st.base_size_bytes).to_string(),
            ),
            ("Docker Layers".into(), ours.to_string()),
            ("Pool Layers".into(), st.layers.to_string()),
            ("Mounted Layers".into(), self.refs.len().to_string()),
        ];
        if let Some(k) = &st.kernel {
            out.push((
                "Data Space Used".into(),
                Bytes(k.data_used_blocks * st.block_size_bytes).to_string(),
            ));
            out.push((
                "Data Space Total".into(),
                Bytes(k.data_total_blocks * st.block_size_bytes).to_string(),
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
        self.finish_removals()?;
        // Removed layers' filesystems finish their unmounts first: their
        // devices go in the reclaim below.
        self.dead.clear();
        let mut store = self.store()?;
        let mut first_error = None;
        // Overlays first: the templates' mounts under them are then free.
        let overlays = self.refs.keys().chain(&self.spent).cloned();
        for id in overlays.collect::<Vec<_>>() {
            if let Err(e) = self.drop_overlay(&id) {
                tracing::warn!(%id, error = %e, "cleanup: cannot unmount an overlay");
            }
        }
        if let Err(e) = self.drop_overlay_root() {
            first_error.get_or_insert(e);
        }
        for dir in self.mounted_dirs()? {
            if let Err(e) = store.pool().umount_with(&dir.to_string_lossy(), Trim::Skip) {
                tracing::warn!(dir = %dir.display(), error = %e, "cleanup: cannot unmount");
                first_error.get_or_insert(e);
            }
        }
        self.refs.clear();
        self.parked.clear();
        self.premount = None;
        self.learn.clear();
        self.save_refs()?;
        // Docker stops: nothing stays up for a settler that is going away.
        for id in std::mem::take(&mut self.idle) {
            match store.pool().deactivate_layer(&pool_id(&id)) {
                Ok(_) | Err(thinlayer_pool::Error::UnknownLayer(_)) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = store.pool().reclaim() {
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn diff(&mut self, id: &str, parent: Option<&str>, out: &mut dyn Write) -> Result<String> {
        let s = self.begin_diff(id, parent)?;
        let sent = s.run(out, thinlayer_image::Hashing::Sha256);
        self.end_diff(s);
        Ok(sent?.diff_id)
    }

    fn changes(&mut self, id: &str, parent: Option<&str>) -> Result<Vec<Change>> {
        self.finish_removals()?;
        self.streams.not_applying(id, "list the changes of")?;
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        Ok(store.subtree_changes(&self.pool_view(id), TREE)?)
    }

    fn apply_diff(&mut self, id: &str, parent: Option<&str>, diff: &mut dyn Read) -> Result<u64> {
        let a = self.begin_apply(id, parent)?;
        let applied = a.run(diff);
        self.end_apply(a, applied)
    }

    fn diff_size(&mut self, id: &str, parent: Option<&str>) -> Result<u64> {
        self.finish_removals()?;
        self.streams.not_applying(id, "size")?;
        let mut store = self.store()?;
        self.check_parent(&mut store, id, parent)?;
        Ok(store
            .export_subtree(&self.pool_view(id), TREE, &mut std::io::sink())?
            .bytes)
    }
}
