//! A model test: seeded random sequences of operations against the real
//! pool (create, write, delete a file, remove, deactivate/activate, and
//! aborts at random fault points followed by recovery), checked after every
//! step against a model of what must exist: records == kernel == model,
//! file contents as the model says, `pool check` clean.
//!
//! `THINLAYER_MODEL_SEED` replays a run (the seed is printed at the start
//! and in every failure); `THINLAYER_MODEL_STEPS` sets its length (200).

mod common;

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use common::Scratch;

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

struct Run {
    s: Scratch,
    rng: Rng,
    seed: u64,
    step: usize,
    model: BTreeMap<String, LayerModel>,
    next_id: usize,
    aborts: usize,
}

impl Run {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "model test seed {} step {}: {what}\n(replay: THINLAYER_MODEL_SEED={})",
            self.seed, self.step, self.seed
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.s.run(args);
        if !out.status.success() {
            self.fail(&format!(
                "thinlayer {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
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
        let mut args = vec!["mount", id, d.to_str().unwrap()];
        if readonly {
            args.push("--readonly");
        }
        self.ok(&args);
        let r = f(&d);
        self.ok(&["umount", id]);
        r
    }

    fn create(&mut self) {
        let id = format!("m{}", self.next_id);
        self.next_id += 1;
        let ids: Vec<String> = self.model.keys().cloned().collect();
        let parent = if self.rng.below(4) == 0 {
            None
        } else {
            self.rng.pick(&ids).cloned()
        };
        let mut args = vec!["layer", "create", id.as_str()];
        if let Some(p) = &parent {
            args.extend(["--parent", p.as_str()]);
        }
        self.ok(&args);
        let files = parent
            .as_ref()
            .map(|p| self.model[p].files.clone())
            .unwrap_or_default();
        self.model.insert(id, LayerModel { parent, files });
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
        self.model.get_mut(&id).unwrap().files.remove(&name);
    }

    fn remove(&mut self) {
        let leaves = self.leaves();
        let Some(id) = self.rng.pick(&leaves).cloned() else {
            return self.create();
        };
        self.ok(&["layer", "rm", &id]);
        self.model.remove(&id);
    }

    fn cycle(&mut self) {
        self.ok(&["pool", "deactivate"]);
        self.ok(&["pool", "activate"]);
    }

    /// Runs a create or a remove that aborts at a random one of its fault
    /// points, recovers, and settles the model by what the engine kept: the
    /// layer must be wholly there (with the right content) or wholly gone.
    fn abort(&mut self) {
        const CREATE: [&str; 4] = [
            "layer_create.after_intent",
            "layer_create.after_snapshot",
            "layer_create.after_set_transaction_id",
            "layer_create.after_record",
        ];
        const REMOVE: [&str; 5] = [
            "layer_rm.after_device_removal",
            "layer_rm.after_intent",
            "layer_rm.after_delete",
            "layer_rm.after_set_transaction_id",
            "layer_rm.after_record_removal",
        ];
        let leaves = self.leaves();
        let remove = self.rng.below(2) == 0 && !leaves.is_empty();
        let (args, id, point, parent): (Vec<String>, String, &str, Option<String>) = if remove {
            let id = self.rng.pick(&leaves).cloned().unwrap();
            let point = *self.rng.pick(&REMOVE).unwrap();
            (
                vec!["layer".into(), "rm".into(), id.clone()],
                id,
                point,
                None,
            )
        } else {
            let id = format!("m{}", self.next_id);
            self.next_id += 1;
            let ids: Vec<String> = self.model.keys().cloned().collect();
            let parent = self.rng.pick(&ids).cloned();
            let mut a = vec!["layer".into(), "create".into(), id.clone()];
            if let Some(p) = &parent {
                a.extend(["--parent".into(), p.clone()]);
            }
            (a, id, *self.rng.pick(&CREATE).unwrap(), parent)
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
        self.ok(&["pool", "recover"]);
        let exists = self
            .s
            .root
            .join("layers")
            .join(format!("{id}.rec"))
            .exists();
        match (remove, exists) {
            (true, true) => {} // rolled back: still there, checked below
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
            (false, false) => {}
        }
        println!(
            "  abort at {point}: layer {} afterwards",
            if exists { "present" } else { "absent" }
        );
    }

    fn check_records(&self) {
        let ls = self.s.json(&["layer", "ls"]);
        let got: BTreeMap<String, Option<String>> = ls
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["id"].as_str().unwrap().to_owned(),
                    l["parent"].as_str().map(str::to_owned),
                )
            })
            .collect();
        let want: BTreeMap<String, Option<String>> = self
            .model
            .iter()
            .map(|(k, v)| (k.clone(), v.parent.clone()))
            .collect();
        if got != want {
            self.fail(&format!("records {got:?} != model {want:?}"));
        }
        let st = self.s.json(&["pool", "status"]);
        if st["kernel"]["transaction_id"] != st["transaction_id"] || !st["pending"].is_null() {
            self.fail(&format!("kernel and records disagree: {st}"));
        }
        if ls
            .as_array()
            .unwrap()
            .iter()
            .any(|l| !l["devnode"].is_null())
        {
            self.fail(&format!("a layer device was left active: {ls}"));
        }
    }

    fn check_contents(&self, id: &str) {
        let want = &self.model[id].files;
        let got: BTreeMap<String, Vec<u8>> = self.with_mount(id, true, |d| {
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
        });
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
        let out = self.s.run(&["pool", "check"]);
        if !out.status.success() {
            self.fail(&format!(
                "pool check: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
}

#[test]
fn vm_model_random_operations_keep_records_kernel_and_model_equal() {
    common::require_dm_thin();
    let seed = std::env::var("THINLAYER_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let steps: usize = std::env::var("THINLAYER_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!("model test: seed {seed}, {steps} steps (replay with THINLAYER_MODEL_SEED={seed})");
    let s = Scratch::new("model");
    s.ok(&["pool", "create", "--data-size", "1G", "--base-size", "256M"]);
    let mut run = Run {
        s,
        rng: Rng(seed),
        seed,
        step: 0,
        model: BTreeMap::new(),
        next_id: 0,
        aborts: 0,
    };
    let mut counts = BTreeMap::new();
    for step in 0..steps {
        run.step = step;
        let op = match run.rng.below(20) {
            0..=5 => "create",
            6..=10 => "write",
            11..=12 => "delete_file",
            13..=15 => "remove",
            16 => "cycle",
            _ => "abort",
        };
        *counts.entry(op).or_insert(0) += 1;
        match op {
            "create" => run.create(),
            "write" => run.write(),
            "delete_file" => run.delete_file(),
            "remove" => run.remove(),
            "cycle" => run.cycle(),
            _ => run.abort(),
        }
        run.check_records();
        let ids: Vec<String> = run.model.keys().cloned().collect();
        if let Some(id) = run.rng.pick(&ids).cloned() {
            run.check_contents(&id);
        }
        if op == "abort" || op == "cycle" || step % 25 == 24 {
            run.check_pool();
        }
    }
    for id in run.model.keys().cloned().collect::<Vec<_>>() {
        run.check_contents(&id);
    }
    run.check_pool();
    println!(
        "model test: {steps} steps passed (seed {seed}): {counts:?}, {} aborts recovered, {} layers at the end",
        run.aborts,
        run.model.len()
    );
}
