//! A model test: seeded random sequences of operations against the real
//! pool (create, write, delete a file, remove, deactivate/activate, mounted
//! spares provisioned, taken and dropped, and aborts at random fault points
//! followed by recovery), checked after every step against a model of what
//! must exist: records == kernel == model, file contents as the model says
//! (a mounted spare's too), `pool check` clean.
//!
//! `THINLAYER_MODEL_SEED` replays a run (the seed is printed at the start
//! and in every failure); `THINLAYER_MODEL_STEPS` sets its length (200).
//!
//! Ordinary steps call the engine in-process (a process per call costs most
//! of a step under software emulation); an abort step runs the real binary,
//! which dies at its fault point, and recovery then runs in-process.

mod common;

use common::{Scratch, vm_test};

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use thinlayer_pool::{LockMode, Pool};

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below n")
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
}

#[derive(Clone, Debug, Default)]
struct LayerModel {
    parent: Option<String>,
    files: BTreeMap<String, Vec<u8>>,
}

/// The mounted spares of one parent, as the model expects them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SparesModel {
    /// How many are listed.
    count: usize,
    /// Whether they are up (device active, mounted at ROOT/spares/ID):
    /// a pool deactivate takes them down, the next provision brings them
    /// back.
    up: bool,
}

struct Run<'a> {
    s: &'a Scratch,
    rng: Rng,
    seed: u64,
    step: usize,
    model: BTreeMap<String, LayerModel>,
    spares: BTreeMap<String, SparesModel>,
    next_id: usize,
    aborts: usize,
}

const CREATE_POINTS: [&str; 3] = [
    "layer_create.after_intent",
    "layer_create.after_snapshot",
    "layer_create.after_record",
];
/// A create that takes a listed spare has no intent: its own points.
const TAKE_POINTS: [&str; 2] = ["layer_take.after_link", "layer_take.after_record"];
const REMOVE_POINTS: [&str; 4] = [
    "layer_rm.after_device_removal",
    "layer_rm.after_intent",
    "layer_rm.after_delete",
    "layer_rm.after_record_removal",
];

impl Run<'_> {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "model test seed {} step {}: {what}\n(replay: THINLAYER_MODEL_SEED={})",
            self.seed, self.step, self.seed
        )
    }

    /// Runs `f` on the pool, opened under its lock for just this call.
    fn engine<T>(&self, what: &str, f: impl FnOnce(&mut Pool) -> thinlayer_pool::Result<T>) -> T {
        let mut pool = Pool::open(&self.s.root, LockMode::Exclusive, false)
            .unwrap_or_else(|e| self.fail(&format!("open the pool: {e}")));
        f(&mut pool).unwrap_or_else(|e| self.fail(&format!("{what}: {e}")))
    }

    fn leaves(&self) -> Vec<String> {
        self.model
            .keys()
            .filter(|id| {
                !self
                    .model
                    .values()
                    .any(|l| l.parent.as_deref() == Some(id.as_str()))
            })
            .cloned()
            .collect()
    }

    fn with_mount<T>(&self, id: &str, readonly: bool, f: impl FnOnce(&Path) -> T) -> T {
        let d = self.s.dir(&format!("m-{id}"));
        let how = if readonly {
            thinlayer_pool::MountUse::ReadOnly
        } else {
            thinlayer_pool::MountUse::Container
        };
        self.engine("mount", |p| p.mount_layer(id, &d, how));
        let r = f(&d);
        self.engine("umount", |p| p.umount(id));
        r
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("m{}", self.next_id - 1)
    }

    fn create(&mut self) {
        let id = self.new_id();
        let ids: Vec<String> = self.model.keys().cloned().collect();
        let parent = if self.rng.below(4) == 0 {
            None
        } else {
            self.rng.pick(&ids).cloned()
        };
        self.engine("layer create", |p| p.create_layer(&id, parent.as_deref()));
        self.took_spare(parent.as_deref());
        let files = parent
            .as_ref()
            .map(|p| self.model[p].files.clone())
            .unwrap_or_default();
        self.model.insert(id, LayerModel { parent, files });
    }

    /// A create of a child of `parent` took one of its spares, if any.
    fn took_spare(&mut self, parent: Option<&str>) {
        if let Some(sp) = parent.and_then(|p| self.spares.get_mut(p)) {
            sp.count = sp.count.saturating_sub(1);
        }
    }

    /// Its spares are dropped: `id` is written or removed.
    fn spares_dropped(&mut self, id: &str) {
        self.spares.remove(id);
    }

    /// `provision --mounted` of a random layer, 1 to 3 spares.
    fn provision(&mut self) {
        let ids: Vec<String> = self.model.keys().cloned().collect();
        let Some(id) = self.rng.pick(&ids).cloned() else {
            return self.create();
        };
        let n = 1 + self.rng.below(3);
        self.engine("provision --mounted", |p| p.provision_mounted(Some(&id), n));
        self.spares.insert(id, SparesModel { count: n, up: true });
    }

    /// Takes a mounted spare: a child of a parent that has one, mounted
    /// for a container (the move), written, unmounted.
    fn take(&mut self) {
        let with: Vec<String> = self
            .spares
            .iter()
            .filter(|(_, sp)| sp.count > 0)
            .map(|(p, _)| p.clone())
            .collect();
        let Some(parent) = self.rng.pick(&with).cloned() else {
            return self.provision();
        };
        let id = self.new_id();
        self.engine("layer create", |p| p.create_layer(&id, Some(&parent)));
        self.took_spare(Some(&parent));
        let mut files = self.model[&parent].files.clone();
        let name = format!("f{}", self.rng.below(6));
        let data = common::pattern(self.rng.next(), 1 + self.rng.below(32 << 10));
        self.with_mount(&id, false, |d| fs::write(d.join(&name), &data).unwrap());
        files.insert(name, data);
        self.model.insert(
            id,
            LayerModel {
                parent: Some(parent),
                files,
            },
        );
    }

    /// Drops a parent's spares: `provision --mounted` of none.
    fn drop_spares(&mut self) {
        let with: Vec<String> = self.spares.keys().cloned().collect();
        let Some(parent) = self.rng.pick(&with).cloned() else {
            return self.provision();
        };
        self.engine("provision 0", |p| p.provision_mounted(Some(&parent), 0));
        self.spares_dropped(&parent);
    }

    fn write(&mut self) {
        let ids: Vec<String> = self.model.keys().cloned().collect();
        let Some(id) = self.rng.pick(&ids).cloned() else {
            return self.create();
        };
        let name = format!("f{}", self.rng.below(6));
        let len = 1 + self.rng.below(96 << 10);
        let data = common::pattern(self.rng.next(), len);
        self.with_mount(&id, false, |d| fs::write(d.join(&name), &data).unwrap());
        self.spares_dropped(&id);
        self.model.get_mut(&id).unwrap().files.insert(name, data);
    }

    fn delete_file(&mut self) {
        let with_files: Vec<String> = self
            .model
            .iter()
            .filter(|(_, l)| !l.files.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        let Some(id) = self.rng.pick(&with_files).cloned() else {
            return self.write();
        };
        let names: Vec<String> = self.model[&id].files.keys().cloned().collect();
        let name = self.rng.pick(&names).cloned().unwrap();
        self.with_mount(&id, false, |d| fs::remove_file(d.join(&name)).unwrap());
        self.spares_dropped(&id);
        self.model.get_mut(&id).unwrap().files.remove(&name);
    }

    fn remove(&mut self) {
        let leaves = self.leaves();
        let Some(id) = self.rng.pick(&leaves).cloned() else {
            return self.create();
        };
        self.engine("layer rm", |p| p.remove_layer(&id));
        self.spares_dropped(&id);
        self.model.remove(&id);
    }

    fn cycle(&mut self) {
        self.engine("deactivate", Pool::deactivate);
        self.engine("activate", Pool::activate);
        for sp in self.spares.values_mut() {
            sp.up = false;
        }
    }

    /// Runs a create or a remove that aborts at a random one of its fault
    /// points, recovers, and settles the model by what the engine kept: the
    /// layer must be wholly there (with the right content) or wholly gone.
    fn abort(&mut self) {
        let leaves = self.leaves();
        let remove = self.rng.below(2) == 0 && !leaves.is_empty();
        let (args, id, point, parent) = if remove {
            let id = self.rng.pick(&leaves).cloned().unwrap();
            let point = *self.rng.pick(&REMOVE_POINTS).unwrap();
            (
                vec!["layer".to_owned(), "rm".into(), id.clone()],
                id,
                point,
                None,
            )
        } else {
            let id = self.new_id();
            let ids: Vec<String> = self.model.keys().cloned().collect();
            let parent = self.rng.pick(&ids).cloned();
            let mut a = vec!["layer".to_owned(), "create".into(), id.clone()];
            if let Some(p) = &parent {
                a.extend(["--parent".into(), p.clone()]);
            }
            let takes = parent
                .as_ref()
                .and_then(|p| self.spares.get(p))
                .is_some_and(|sp| sp.count > 0);
            let points: &[&str] = if takes { &TAKE_POINTS } else { &CREATE_POINTS };
            (a, id, *self.rng.pick(points).unwrap(), parent)
        };
        let out = Command::new(common::bin())
            .arg("--root")
            .arg(&self.s.root)
            .args(&args)
            .env("THINLAYER_FAULT", point)
            .output()
            .unwrap();
        if out.status.success() {
            self.fail(&format!("{args:?} did not abort at {point}"));
        }
        self.aborts += 1;
        self.engine("recover", |p| p.recover_all(false));
        // A create took a spare whether it was kept or not; a removal may
        // or may not have dropped its spares: the records say.
        let listed = self.engine("spares", |p| Ok(p.record().spares.clone()));
        for (parent, sp) in self.spares.iter_mut() {
            sp.count = listed
                .iter()
                .filter(|l| l.parent.as_deref() == Some(parent.as_str()))
                .count();
        }
        self.spares.retain(|_, sp| sp.count > 0);
        let exists = self
            .s
            .root
            .join("layers")
            .join(format!("{id}.rec"))
            .exists();
        match (remove, exists) {
            (true, true) | (false, false) => {}
            (true, false) => {
                self.model.remove(&id);
            }
            (false, true) => {
                let files = parent
                    .as_ref()
                    .map(|p| self.model[p].files.clone())
                    .unwrap_or_default();
                self.model.insert(id, LayerModel { parent, files });
            }
        }
        println!(
            "  step {}: abort at {point}: layer {} afterwards",
            self.step,
            if exists { "present" } else { "absent" }
        );
    }

    fn check_records(&self) {
        let (ls, st) = self.engine("layer ls and status", |p| Ok((p.layers()?, p.status()?)));
        let got: BTreeMap<String, Option<String>> = ls
            .iter()
            .map(|l| (l.id.clone(), l.parent.clone()))
            .collect();
        let want: BTreeMap<String, Option<String>> = self
            .model
            .iter()
            .map(|(k, v)| (k.clone(), v.parent.clone()))
            .collect();
        if got != want {
            self.fail(&format!("records {got:?} != model {want:?}"));
        }
        if st.kernel.as_ref().map(|k| k.transaction_id) != Some(st.transaction_id)
            || st.pending.is_some()
        {
            self.fail(&format!("kernel and records disagree: {st:?}"));
        }
        let spares_dir = fs::canonicalize(&self.s.root).unwrap().join("spares");
        // Active only while mounted from the spare it took.
        let premount = |l: &thinlayer_pool::LayerInfo| {
            l.mountpoints == [spares_dir.join(l.thin_id.to_string())]
        };
        if let Some(l) = ls.iter().find(|l| l.devnode.is_some() && !premount(l)) {
            self.fail(&format!("layer {} was left active: {l:?}", l.id));
        }
        self.check_spares(&spares_dir);
    }

    /// The listed spares are the model's: as many per parent, each with
    /// its device and its mount at ROOT/spares/ID while up (none while
    /// down), and a mounted one holds its parent's files.
    fn check_spares(&self, spares_dir: &Path) {
        let infos = self.engine("spare infos", Pool::spare_infos);
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for i in &infos {
            let Some(parent) = &i.parent else {
                self.fail(&format!("a spare of the base device: {i:?}"));
            };
            *got.entry(parent.clone()).or_default() += 1;
            let Some(sp) = self.spares.get(parent) else {
                self.fail(&format!("spare {i:?} of a parent the model has none of"));
            };
            let at = spares_dir.join(i.thin_id.to_string());
            let want_at = sp.up.then_some(&at);
            if !i.mounted || i.devnode.is_some() != sp.up || i.mountpoint.as_ref() != want_at {
                self.fail(&format!("spare {i:?}: the model says {sp:?}"));
            }
            if sp.up {
                let files = read_tree(&at);
                if files != self.model[parent].files {
                    self.fail(&format!(
                        "spare {} is not its parent {parent} as it is",
                        i.thin_id
                    ));
                }
            }
        }
        let want: BTreeMap<String, usize> = self
            .spares
            .iter()
            .filter(|(_, sp)| sp.count > 0)
            .map(|(p, sp)| (p.clone(), sp.count))
            .collect();
        if got != want {
            self.fail(&format!("spares listed {got:?} != model {want:?}"));
        }
    }

    fn check_contents(&self, id: &str) {
        let want = &self.model[id].files;
        let got = self.with_mount(id, true, read_tree);
        if &got != want {
            let names = |m: &BTreeMap<String, Vec<u8>>| {
                m.iter()
                    .map(|(k, v)| format!("{k}:{}", v.len()))
                    .collect::<Vec<_>>()
            };
            self.fail(&format!(
                "layer {id} holds {:?}, model says {:?}",
                names(&got),
                names(want)
            ));
        }
    }

    fn check_pool(&self) {
        let report = self.engine("pool check", Pool::check);
        if !report.is_clean() {
            self.fail(&format!("pool check: {report:?}"));
        }
    }
}

/// The files at the top of a mounted layer, but `lost+found`.
fn read_tree(d: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "lost+found")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The model's pool: room for its 200 steps.
const MODEL_POOL: common::Pool = common::Pool::Create(&["--data-size=1G", "--base-size=256M"]);

#[test]
fn vm_model_random_operations_keep_records_kernel_and_model_equal() {
    vm_test("model", MODEL_POOL, |s| {
        let seed = std::env::var("THINLAYER_MODEL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap();
                t.as_secs() ^ u64::from(t.subsec_nanos()) << 20 | 1
            });
        let steps: usize = std::env::var("THINLAYER_MODEL_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        println!(
            "model test: seed {seed}, {steps} steps (replay with THINLAYER_MODEL_SEED={seed})"
        );
        let mut run = Run {
            s,
            rng: Rng(seed),
            seed,
            step: 0,
            model: BTreeMap::new(),
            spares: BTreeMap::new(),
            next_id: 0,
            aborts: 0,
        };
        let mut counts = BTreeMap::new();
        let mut spent: BTreeMap<&str, std::time::Duration> = BTreeMap::new();
        for step in 0..steps {
            run.step = step;
            let op = match run.rng.below(26) {
                0..=5 => "create",
                6..=10 => "write",
                11..=12 => "delete_file",
                13..=15 => "remove",
                16 => "cycle",
                17..=19 => "abort",
                20..=21 => "provision",
                22..=24 => "take",
                _ => "drop_spares",
            };
            *counts.entry(op).or_insert(0) += 1;
            let t = std::time::Instant::now();
            match op {
                "create" => run.create(),
                "write" => run.write(),
                "delete_file" => run.delete_file(),
                "remove" => run.remove(),
                "cycle" => run.cycle(),
                "provision" => run.provision(),
                "take" => run.take(),
                "drop_spares" => run.drop_spares(),
                _ => run.abort(),
            }
            *spent.entry(op).or_default() += t.elapsed();
            let t = std::time::Instant::now();
            run.check_records();
            *spent.entry("check records").or_default() += t.elapsed();
            let t = std::time::Instant::now();
            let ids: Vec<String> = run.model.keys().cloned().collect();
            if let Some(id) = run.rng.pick(&ids).cloned() {
                run.check_contents(&id);
            }
            *spent.entry("check contents").or_default() += t.elapsed();
            let t = std::time::Instant::now();
            if op == "abort" || op == "cycle" || step % 25 == 24 {
                run.check_pool();
            }
            *spent.entry("pool check").or_default() += t.elapsed();
        }
        println!("model test: time by part: {spent:?}");
        for id in run.model.keys().cloned().collect::<Vec<_>>() {
            run.check_contents(&id);
        }
        run.check_pool();
        println!(
            "model test: {steps} steps passed (seed {seed}): {counts:?}, {} aborts recovered, {} layers at the end",
            run.aborts,
            run.model.len()
        );
    });
}
