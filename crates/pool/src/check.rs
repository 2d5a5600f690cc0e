//! `pool check`, `pool recover` and `pool repair`: the records held up
//! against the kernel and the pool metadata, crash leftovers settled, and
//! damaged metadata rebuilt.
//!
//! The kernel's own list of thin ids comes from the pool metadata through
//! `thin_dump --skip-mappings`: while the pool is live, on a metadata
//! snapshot (`reserve_metadata_snap`, dump and `thin_check` with
//! `--metadata-snap` on the metadata device, `release_metadata_snap`);
//! while it is inactive, on the metadata file through a read-only loop
//! device (the tools open with `O_DIRECT`).
//!
//! What must never happen: `pool check` changing anything but the
//! metadata snapshot it takes and releases; `pool recover` removing a
//! device or thin id the records do not know without `--force`; `pool
//! repair` overwriting the damaged metadata (it is kept beside the new).

use std::{collections::BTreeSet, fs, path::PathBuf};

use serde::Serialize;

use crate::{
    cmd::Tool,
    error::{Error, IoContext, Result},
    kernel, loopback, mounts,
    names::{self, Role},
    pool::{self, Action, Pending, Pool, check_metadata, now_unix},
};

/// One problem `pool check` found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// A stable short code, e.g. `unknown_thin_id`.
    pub kind: &'static str,
    /// What is wrong, with the names and ids involved.
    pub detail: String,
    /// What to do about it.
    pub fix: String,
}

/// What `pool check` found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The root directory.
    pub root: PathBuf,
    /// The pool id in the dm names.
    pub pool_id: String,
    /// Whether the pool's devices are up.
    pub active: bool,
    /// Layers in the records.
    pub layers: usize,
    /// The thin ids the records hold (base device and layers).
    pub recorded_thin_ids: Vec<u32>,
    /// The thin ids the pool metadata holds, when it could be read.
    pub metadata_thin_ids: Option<Vec<u32>>,
    /// The records' transaction id.
    pub transaction_id: u64,
    /// The kernel's (live) or the metadata's (inactive) transaction id.
    pub kernel_transaction_id: Option<u64>,
    /// Every problem found; empty when the pool is clean.
    pub findings: Vec<Finding>,
    /// The host filesystem under the root against what the pool may still
    /// write there.
    pub host: Option<crate::space::HostSpace>,
    /// What is not damage but needs attention (host space), each with what
    /// to do; never changes the exit code.
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// What `pool recover` did and what is left.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverReport {
    /// What it did, one sentence each; empty when there was nothing to do.
    pub actions: Vec<String>,
    /// What `pool check` still finds afterwards.
    pub findings: Vec<Finding>,
}

/// What `pool repair` did.
#[derive(Clone, Debug, Serialize)]
pub struct RepairReport {
    /// Whether it changed anything.
    pub action: Action,
    /// Where the damaged metadata was kept.
    pub damaged_copy: Option<PathBuf>,
    /// What was done, in words.
    pub message: String,
}

/// The part of pool metadata `pool check` compares with the records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataView {
    /// The metadata's transaction id.
    pub transaction_id: u64,
    /// Every thin id in the metadata.
    pub thin_ids: BTreeSet<u32>,
}

/// Reads the transaction id and thin ids out of `thin_dump` XML (parsed
/// with `roxmltree`: a truncated or garbled dump is an error, never a
/// partial view).
///
/// # Errors
/// [`Error::Inconsistent`] when the text is not a thin_dump of a pool: not
/// well-formed XML, no `<superblock>` root, or a `transaction`/`dev_id`
/// missing or not a number.
pub fn parse_thin_dump(xml: &str) -> Result<MetadataView> {
    let bad = |why: &str| {
        Error::Inconsistent(format!(
            "unexpected thin_dump output ({why}): {:.200}",
            xml.trim()
        ))
    };
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(&e.to_string()))?;
    let sb = doc.root_element();
    if !sb.has_tag_name("superblock") {
        return Err(bad("the root element is not <superblock>"));
    }
    let number = |node: roxmltree::Node<'_, '_>, name: &str| {
        node.attribute(name)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                bad(&format!(
                    "<{}> has no numeric {name}",
                    node.tag_name().name()
                ))
            })
    };
    let transaction_id = number(sb, "transaction")?;
    let thin_ids = sb
        .children()
        .filter(|n| n.has_tag_name("device"))
        .map(|d| {
            let id = number(d, "dev_id")?;
            u32::try_from(id).map_err(|_| bad(&format!("dev_id {id} is out of range")))
        })
        .collect::<Result<BTreeSet<u32>>>()?;
    Ok(MetadataView {
        transaction_id,
        thin_ids,
    })
}

/// The metadata as the tools see it, and thin_check's complaint if any.
struct Metadata {
    view: Option<MetadataView>,
    damaged: Option<String>,
}

fn tool_words(e: Error) -> String {
    match e {
        Error::Tool { stderr, status, .. } if stderr.is_empty() => status,
        Error::Tool { stderr, .. } => stderr,
        e => e.to_string(),
    }
}

/// The metadata device of a live thin-pool from its table line
/// (`thin-pool <meta> <data> <block> <low water> ...`), as `major:minor`.
///
/// # Errors
/// [`Error::Inconsistent`] when the table is not one thin-pool line.
pub fn pool_table_devices(
    name: &str,
    table: &[(u64, u64, String, String)],
) -> Result<(devicemapper::Device, devicemapper::Device, u64, u64)> {
    let bad = |why: &str| Error::InvalidArgument(format!("{name} is not a thin-pool: {why}"));
    let [(_, len, target, params)] = table else {
        return Err(bad(&format!("its table has {} lines", table.len())));
    };
    if target != "thin-pool" {
        return Err(bad(&format!(
            "its target is `{target}`; for an LVM pool give the `-tpool` device (`dmsetup ls --target thin-pool` lists them)"
        )));
    }
    let mut f = params.split_whitespace();
    let dev = |s: Option<&str>| -> Result<devicemapper::Device> {
        let s = s.ok_or_else(|| bad("short table"))?;
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| bad("a device is not major:minor"))?;
        Ok(devicemapper::Device {
            major: a.parse().map_err(|_| bad("bad major"))?,
            minor: b.parse().map_err(|_| bad("bad minor"))?,
        })
    };
    let meta = dev(f.next())?;
    let data = dev(f.next())?;
    let block: u64 = f
        .next()
        .and_then(|b| b.parse().ok())
        .ok_or_else(|| bad("no block size"))?;
    Ok((meta, data, block, *len))
}

impl Pool {
    /// The node of the live pool's metadata device: thinlayer's linear
    /// device, or for an adopted pool the one its table names.
    fn live_metadata_node(&mut self) -> Result<PathBuf> {
        if let pool::Backing::Adopted { pool_name, .. } = &self.record().backing {
            let pool_name = pool_name.clone();
            let name = self.name(Role::Pool);
            let table = self.kernel()?.table(&name)?;
            let (meta, ..) = pool_table_devices(&pool_name, &table)?;
            return crate::blockdev::node_of(meta);
        }
        let meta = self.name(Role::Meta);
        let kernel = self.kernel()?;
        let meta_dev = kernel.device(&meta)?.ok_or_else(|| {
            Error::Inconsistent(format!("the pool is live but {} is gone", &*meta))
        })?;
        Ok(kernel::devnode(meta_dev))
    }

    /// Every thin id in the live pool's metadata (on a metadata snapshot).
    ///
    /// # Errors
    /// [`Error::Inconsistent`] when thin_dump cannot read it; kernel errors.
    pub(crate) fn metadata_thin_ids(&mut self) -> Result<BTreeSet<u32>> {
        self.read_metadata(true)?
            .view
            .map(|v| v.thin_ids)
            .ok_or_else(|| {
                Error::Inconsistent(
                    "thin_dump could not read the pool's metadata snapshot; run `thinlayer pool check`".into(),
                )
            })
    }

    /// Reads the pool metadata with thin_dump and thin_check: on a metadata
    /// snapshot while the pool is live, else on the file.
    fn read_metadata(&mut self, live: bool) -> Result<Metadata> {
        if !live {
            let (lp, _) = self.metadata_loop()?;
            let dump = Tool::ThinDump.run(&["--skip-mappings".as_ref(), lp.path.as_os_str()]);
            let checked = Tool::ThinCheck.run(&["-q".as_ref(), lp.path.as_os_str()]);
            drop(lp);
            return Ok(Metadata {
                view: dump.ok().map(|x| parse_thin_dump(&x)).transpose()?,
                damaged: checked.err().map(tool_words),
            });
        }
        let pool = self.name(Role::Pool);
        let node = self.live_metadata_node()?;
        let kernel = self.kernel()?;
        // A check that died half-way leaves its snapshot held.
        if kernel.pool_status(&pool)?.held_metadata_root.is_some() {
            kernel.pool_message(&pool, "release_metadata_snap")?;
        }
        kernel.pool_message(&pool, "reserve_metadata_snap")?;
        let dump = Tool::ThinDump.run(&[
            "--metadata-snap".as_ref(),
            "--skip-mappings".as_ref(),
            node.as_os_str(),
        ]);
        let checked =
            Tool::ThinCheck.run(&["-q".as_ref(), "--metadata-snap".as_ref(), node.as_os_str()]);
        kernel.pool_message(&pool, "release_metadata_snap")?;
        let view = match dump {
            Ok(x) => Some(parse_thin_dump(&x)?),
            Err(e) => {
                tracing::warn!(error = %e, "thin_dump of the metadata snapshot failed");
                None
            }
        };
        Ok(Metadata {
            view,
            damaged: checked.err().map(tool_words),
        })
    }

    /// Holds the records up against the kernel and the pool metadata:
    /// every recorded thin id is in the metadata and vice versa, parents
    /// exist, nothing is pending, the transaction ids agree, every active
    /// device and every mount of the pool is a layer's, and `thin_check`
    /// passes. Changes nothing but a metadata snapshot it releases.
    ///
    /// # Errors
    /// Environment, kernel and tool-start errors (findings are not errors).
    pub fn check(&mut self) -> Result<CheckReport> {
        let rec = self.record().clone();
        let foreign = |t: &u32| rec.backing.is_foreign(*t);
        let adopted = matches!(rec.backing, pool::Backing::Adopted { .. });
        let root = self.layout().root.clone();
        let mut findings = Vec::new();
        let mut find = |kind, detail: String, fix: &str| {
            findings.push(Finding {
                kind,
                detail,
                fix: fix.to_owned(),
            })
        };
        let mut report = CheckReport {
            root: root.clone(),
            pool_id: rec.pool_id.to_string(),
            active: false,
            layers: 0,
            recorded_thin_ids: Vec::new(),
            metadata_thin_ids: None,
            transaction_id: rec.transaction_id,
            kernel_transaction_id: None,
            findings: Vec::new(),
            host: None,
            warnings: Vec::new(),
        };
        match self.host_space() {
            // Nothing of a device or adopted pool's lives on the host.
            Ok(_) if !rec.backing.is_files() => {}
            Ok(h) => {
                report.warnings = h.warnings(&root);
                report.host = Some(h);
            }
            Err(e) => report
                .warnings
                .push(format!("could not measure the host filesystem: {e}")),
        }
        if rec.pending == Some(Pending::CreatePool) {
            find(
                "interrupted_create",
                "a crash interrupted `pool create`: the record is only its intent".into(),
                "run `thinlayer pool create` again (it clears the leftovers) or `thinlayer pool recover`",
            );
            report.findings = findings;
            return Ok(report);
        }
        let layers = match self.layer_records() {
            Ok(l) => l,
            Err(e) => {
                find(
                    "damaged_record",
                    e.to_string(),
                    "restore the record from a backup, or remove it and run `thinlayer pool recover --force` to drop its thin id",
                );
                Vec::new()
            }
        };
        report.layers = layers.len();
        let layer_ids: BTreeSet<u32> = layers.iter().map(|l| l.thin_id).collect();
        // Spares and trashed ids are the pool's too, and may be active.
        let spare_ids: BTreeSet<u32> = rec
            .spares
            .iter()
            .map(|s| s.thin_id)
            .chain(rec.trash.iter().map(|t| t.thin_id))
            .collect();
        let mut recorded: BTreeSet<u32> = layer_ids.union(&spare_ids).copied().collect();
        recorded.insert(rec.base_thin_id);
        report.recorded_thin_ids = recorded.iter().copied().collect();
        for l in &layers {
            if let Some(p) = &l.parent {
                if !layers.iter().any(|o| &o.id == p) {
                    find(
                        "missing_parent",
                        format!("layer `{}` names parent `{p}`, which has no record", l.id),
                        "the data is intact (a snapshot does not need its origin); remove the layer with `thinlayer layer rm` if it is unwanted",
                    );
                }
            }
        }
        // Thin ids an interrupted operation may or may not have reached.
        let in_flight = match &rec.pending {
            Some(p) => {
                find(
                    "pending_operation",
                    format!("an interrupted {} is recorded", p.describe()),
                    "run `thinlayer pool recover` (or any change command) to settle it",
                );
                p.thin_ids()
            }
            None => Vec::new(),
        };
        let pool_name = self.name(Role::Pool);
        let prefix = names::name_prefix(&rec.pool_id);
        let kernel = self.kernel()?;
        let live = kernel.device(&pool_name)?.is_some();
        report.active = live;
        let present = kernel.names_with_prefix(&prefix)?;
        let mut present: Vec<String> = present.into_iter().collect();
        present.sort();
        if live {
            let w = kernel.pool_status(&pool_name)?;
            report.kernel_transaction_id = Some(w.transaction_id);
            if w.transaction_id != rec.transaction_id && rec.pending.is_none() && !adopted {
                find(
                    "transaction_mismatch",
                    format!(
                        "the kernel's transaction id is {} but the records are at {} with nothing pending",
                        w.transaction_id, rec.transaction_id
                    ),
                    "the metadata or the records were replaced by older copies; restore the matching pair",
                );
            }
            if w.needs_check {
                find(
                    "needs_check",
                    "the kernel flagged the metadata as needing a check".into(),
                    "unmount the layers, `thinlayer pool deactivate`, then `thinlayer pool repair`",
                );
            }
            if w.summary != devicemapper::ThinPoolStatusSummary::Good {
                find(
                    "pool_mode",
                    format!("the pool is in {:?} mode", w.summary),
                    "free or add space (`thinlayer pool extend`), or deactivate and repair",
                );
            }
            for name in &present {
                let n = devicemapper::DmNameBuf::new(name.clone())
                    .expect("valid: listed by the kernel");
                match names::parse_role(&rec.pool_id, name) {
                    Some(Role::Thin(t)) => {
                        let dev = kernel.device(&n)?;
                        let mounted = match dev {
                            Some(d) => mounts::mountpoints_of(d)?,
                            None => Vec::new(),
                        };
                        if layer_ids.contains(&t) || spare_ids.contains(&t) {
                            continue;
                        }
                        if !mounted.is_empty() {
                            find(
                                "foreign_mount",
                                format!(
                                    "{name} (thin id {t}, no layer) is mounted at {}",
                                    mounted
                                        .iter()
                                        .map(|p| p.display().to_string())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                                "unmount it with umount(8), then run `thinlayer pool recover --force`",
                            );
                        } else if t == rec.base_thin_id {
                            find(
                                "base_device_active",
                                format!("the base device {name} is active outside a pool create"),
                                "run `thinlayer pool recover`",
                            );
                        } else if !in_flight.contains(&t) {
                            find(
                                "unknown_device",
                                format!("{name} is active but thin id {t} belongs to no layer"),
                                "run `thinlayer pool recover --force` to remove it",
                            );
                        }
                    }
                    Some(_) => {}
                    None => find(
                        "unknown_device",
                        format!("{name} carries the pool's prefix but no role thinlayer makes"),
                        "run `thinlayer pool recover --force` to remove it",
                    ),
                }
            }
        } else if !present.is_empty() {
            find(
                "leftover_devices",
                format!(
                    "the pool is inactive but these devices remain: {}",
                    present.join(", ")
                ),
                "an activation or deactivation was interrupted; run `thinlayer pool activate` or `thinlayer pool deactivate` to finish either",
            );
        }
        if adopted && !live {
            find(
                "pool_inactive",
                "the adopted pool is not active: its metadata cannot be read".into(),
                "bring it up the way its owner does (`lvchange -ay VG/POOL`), then run `thinlayer pool check`",
            );
            report.findings = findings;
            return Ok(report);
        }
        let md = self.read_metadata(live)?;
        if let Some(words) = md.damaged {
            find(
                "metadata_damaged",
                format!("thin_check: {words}"),
                if live {
                    "unmount the layers, `thinlayer pool deactivate`, then `thinlayer pool repair`"
                } else {
                    "run `thinlayer pool repair`"
                },
            );
        }
        if let Some(view) = &md.view {
            if !live {
                report.kernel_transaction_id = Some(view.transaction_id);
                if view.transaction_id != rec.transaction_id && rec.pending.is_none() {
                    find(
                        "transaction_mismatch",
                        format!(
                            "the metadata's transaction id is {} but the records are at {} with nothing pending",
                            view.transaction_id, rec.transaction_id
                        ),
                        "the metadata or the records were replaced by older copies; restore the matching pair",
                    );
                }
            }
            for t in recorded.difference(&view.thin_ids) {
                if in_flight.contains(t) {
                    continue;
                }
                let whose = layers
                    .iter()
                    .find(|l| l.thin_id == *t)
                    .map(|l| format!("layer `{}`", l.id))
                    .or_else(|| {
                        spare_ids
                            .contains(t)
                            .then(|| "a spare or trashed id".to_owned())
                    })
                    .unwrap_or_else(|| "the base device".to_owned());
                find(
                    "missing_thin_id",
                    format!("{whose} has thin id {t}, which the pool metadata lacks"),
                    "its data is gone; remove the layer with `thinlayer layer rm`, or restore the metadata from a backup",
                );
            }
            if let pool::Backing::Adopted {
                foreign_thin_ids, ..
            } = &rec.backing
            {
                let new: Vec<String> = view
                    .thin_ids
                    .iter()
                    .filter(|t| foreign(t) && !foreign_thin_ids.contains(t))
                    .map(u32::to_string)
                    .collect();
                if !new.is_empty() {
                    report.warnings.push(format!(
                        "the pool's owner made thin id(s) {} since the adoption: foreign, never touched",
                        new.join(", ")
                    ));
                }
            }
            for t in view.thin_ids.difference(&recorded) {
                if in_flight.contains(t) || foreign(t) {
                    continue;
                }
                find(
                    "unknown_thin_id",
                    format!("the pool metadata holds thin id {t}, which no record knows"),
                    "run `thinlayer pool recover --force` to delete it (its blocks go free)",
                );
            }
            report.metadata_thin_ids = Some(view.thin_ids.iter().copied().collect());
        }
        report.findings = findings;
        Ok(report)
    }

    /// Settles whatever a crash left: clears an interrupted `pool create`;
    /// on a live pool, settles a pending layer operation and tears down
    /// idle devices (a layer's device active but not mounted, the base
    /// device); on an inactive pool, finishes an interrupted deactivation.
    /// With `force`, also removes thin devices and thin ids no record
    /// knows. Ends with a `pool check`; its findings are returned.
    ///
    /// # Errors
    /// Environment and kernel errors.
    pub fn recover_all(&mut self, force: bool) -> Result<RecoverReport> {
        self.forget_pool_device();
        let mut actions = Vec::new();
        let rec = self.record().clone();
        if rec.pending == Some(Pending::CreatePool) {
            let layout = self.layout().clone();
            let kernel = self.kernel()?;
            for what in pool::clear_interrupted_create(kernel, &layout, &rec)? {
                actions.push(format!(
                    "removed {what}, left by an interrupted pool create"
                ));
            }
            actions.push("create the pool again with `thinlayer pool create`".into());
            return Ok(RecoverReport {
                actions,
                findings: Vec::new(),
            });
        }
        let prefix = names::name_prefix(&rec.pool_id);
        if self.pool_device()?.is_some() {
            actions.extend(self.recover()?);
            // Trashed ids' devices are torn down like idle layer devices.
            let layer_ids: BTreeSet<u32> = self
                .layer_records()?
                .iter()
                .map(|l| l.thin_id)
                .chain(self.record().trash.iter().map(|t| t.thin_id))
                .collect();
            let spare_ids: BTreeSet<u32> = self.record().spares.iter().map(|s| s.thin_id).collect();
            let kernel = self.kernel()?;
            let mut present: Vec<String> = kernel.names_with_prefix(&prefix)?.into_iter().collect();
            present.sort();
            for name in present {
                let n = devicemapper::DmNameBuf::new(name.clone())
                    .expect("valid: listed by the kernel");
                let role = names::parse_role(&rec.pool_id, &name);
                let known = match role {
                    // Spares are active and unmounted by design: kept.
                    Some(Role::Thin(t)) if spare_ids.contains(&t) => continue,
                    Some(Role::Thin(t)) => layer_ids.contains(&t) || t == rec.base_thin_id,
                    Some(_) => continue,
                    None => false,
                };
                if !known && !force {
                    continue;
                }
                let Some(dev) = kernel.device(&n)? else {
                    continue;
                };
                if !mounts::mountpoints_of(dev)?.is_empty() {
                    continue;
                }
                match kernel.remove_if_present(&n) {
                    Ok(true) if known => {
                        actions.push(format!("tore down {name}: active but not mounted"));
                    }
                    Ok(true) => actions.push(format!("removed {name}, which no record knows")),
                    Ok(false) => {}
                    Err(Error::Busy { .. }) => {
                        actions.push(format!("left {name}: it is open (busy)"));
                    }
                    Err(e) => return Err(e),
                }
            }
            actions.extend(self.finish_deferred_removals()?);
            if force {
                let md = self.read_metadata(true)?;
                let mut recorded: BTreeSet<u32> = layer_ids.union(&spare_ids).copied().collect();
                recorded.insert(rec.base_thin_id);
                if let Some(view) = md.view {
                    let pool_name = self.name(Role::Pool);
                    let kernel = self.kernel()?;
                    for t in view.thin_ids.difference(&recorded) {
                        if rec.backing.is_foreign(*t) {
                            // Never: another owner's thin id, even with --force.
                            continue;
                        }
                        let dev = names::dm_name(&rec.pool_id, Role::Thin(*t));
                        if kernel.device(&dev)?.is_some() {
                            continue;
                        }
                        kernel.pool_message(&pool_name, &format!("delete {t}"))?;
                        actions.push(format!("deleted thin id {t}, which no record knows"));
                    }
                }
            }
        } else {
            let kernel = self.kernel()?;
            let mut present: Vec<String> = kernel.names_with_prefix(&prefix)?.into_iter().collect();
            present.sort_by_key(|n| match names::parse_role(&rec.pool_id, n) {
                Some(Role::Thin(_)) | None => 0,
                Some(Role::Pool) => 1,
                Some(Role::Data) | Some(Role::Meta) => 2,
            });
            for name in present {
                let n = devicemapper::DmNameBuf::new(name.clone())
                    .expect("valid: listed by the kernel");
                if kernel.remove_if_present(&n)? {
                    actions.push(format!(
                        "removed {name}, left by an interrupted activation or deactivation"
                    ));
                }
            }
            if let Some(p) = &rec.pending {
                actions.push(format!(
                    "an interrupted {} waits for the pool: `thinlayer pool activate` settles it",
                    p.describe()
                ));
            }
        }
        let findings = self.check()?.findings;
        Ok(RecoverReport { actions, findings })
    }

    /// Rebuilds damaged pool metadata with `thin_repair` into a fresh file,
    /// keeps the damaged one as `metadata.img.damaged-<unix time>` and
    /// swaps the repaired one in. The pool must be inactive. A no-op when
    /// `thin_check` finds the metadata clean.
    ///
    /// # Errors
    /// [`Error::Busy`] while the pool is active; [`Error::Tool`] when
    /// thin_repair cannot rebuild it (nothing is changed then).
    pub fn repair(&mut self) -> Result<RepairReport> {
        match &self.record().backing {
            pool::Backing::Files => {}
            pool::Backing::Devices { .. } => {
                return Err(Error::InvalidArgument(
                    "`pool repair` rebuilds a metadata file; this pool's metadata is a device: \
                     run `thin_repair` by hand into a spare device of the same size (see `thinlayer pool check`)"
                        .into(),
                ));
            }
            pool::Backing::Adopted { pool_name, .. } => {
                return Err(Error::Foreign {
                    what: "pool repair".into(),
                    pool: pool_name.clone(),
                    hint: "repair it with its owner (`lvconvert --repair VG/POOL`)".into(),
                });
            }
        }
        self.forget_pool_device();
        if self.pool_device()?.is_some() {
            return Err(Error::Busy {
                what: "the pool".into(),
                detail: "it is active; unmount its layers, run `thinlayer pool deactivate`, then `thinlayer pool repair`".into(),
            });
        }
        let rec = self.record().clone();
        let kernel = self.kernel()?;
        // Leftovers of a half-done (de)activation hold the metadata's loop.
        for role in [Role::Data, Role::Meta] {
            kernel.remove_if_present(&names::dm_name(&rec.pool_id, role))?;
        }
        let meta = self.layout().metadata_file();
        match check_metadata(&meta) {
            Ok(()) => {
                return Ok(RepairReport {
                    action: Action::AlreadyDone,
                    damaged_copy: None,
                    message: format!("thin_check finds {} clean; no action taken", meta.display()),
                });
            }
            Err(Error::MetadataDamaged { .. }) => {}
            Err(e) => return Err(e),
        }
        let root = self.layout().root.clone();
        let fresh = root.join("metadata.img.repairing");
        let _ = fs::remove_file(&fresh);
        let f = crate::record::open_private(&fresh, true)?;
        // Allocated like the pool's own (see `space`): the repaired
        // metadata never meets a full host.
        crate::space::allocate_file(&f, &fresh, rec.metadata_size)?;
        let repaired = (|| {
            let src = loopback::attach_readonly(&meta)?;
            let dst = loopback::attach(&fresh)?;
            let plain = Tool::ThinRepair.run(&[
                "-i".as_ref(),
                src.path.as_os_str(),
                "-o".as_ref(),
                dst.path.as_os_str(),
            ]);
            let out = match plain {
                Ok(o) => Ok(o),
                Err(first) => {
                    // A lost superblock: rebuild it from what the records know.
                    tracing::info!(error = %first, "thin_repair failed; retrying with the pool's geometry");
                    let t = rec.transaction_id.to_string();
                    let bs = rec.block_size.sectors().to_string();
                    let nr = rec.data_size.blocks_of(rec.block_size).to_string();
                    Tool::ThinRepair
                        .run(&[
                            "-i".as_ref(),
                            src.path.as_os_str(),
                            "-o".as_ref(),
                            dst.path.as_os_str(),
                            "--transaction-id".as_ref(),
                            t.as_ref(),
                            "--data-block-size".as_ref(),
                            bs.as_ref(),
                            "--nr-data-blocks".as_ref(),
                            nr.as_ref(),
                        ])
                        .map_err(|second| Error::RepairFailed {
                            path: meta.clone(),
                            detail: format!(
                                "{}; with the pool's geometry from the records: {}",
                                tool_words(first),
                                tool_words(second)
                            ),
                        })
                }
            };
            drop((src, dst));
            out?;
            f.sync_all().ctx(|| format!("sync {}", fresh.display()))?;
            check_metadata(&fresh)
        })();
        if let Err(e) = repaired {
            let _ = fs::remove_file(&fresh);
            return Err(e);
        }
        let kept = root.join(format!("metadata.img.damaged-{}", now_unix()));
        fs::rename(&meta, &kept)
            .ctx(|| format!("rename {} to {}", meta.display(), kept.display()))?;
        fs::rename(&fresh, &meta)
            .ctx(|| format!("rename {} to {}", fresh.display(), meta.display()))?;
        fs::File::open(&root)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("sync {}", root.display()))?;
        Ok(RepairReport {
            action: Action::Done,
            damaged_copy: Some(kept.clone()),
            message: format!(
                "rebuilt the pool metadata with thin_repair and swapped it in; the damaged copy is kept at {}; \
                 bring the pool up with `thinlayer pool activate`, then run `thinlayer pool check`",
                kept.display()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_dump_xml_gives_ids_and_transaction() {
        let xml = r#"<superblock uuid="" time="2" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="16384">
  <device dev_id="0" mapped_blocks="12" transaction="0" creation_time="0" snap_time="1">
  </device>
  <device dev_id="3" mapped_blocks="0" transaction="5" creation_time="2" snap_time="2"/>
</superblock>
"#;
        let v = parse_thin_dump(xml).unwrap();
        assert_eq!(v.transaction_id, 7);
        assert_eq!(v.thin_ids.into_iter().collect::<Vec<_>>(), vec![0, 3]);
        let empty =
            parse_thin_dump(r#"<superblock uuid="" transaction="1"></superblock>"#).unwrap();
        assert!(empty.thin_ids.is_empty());
        assert!(parse_thin_dump("garbage").is_err());
    }

    #[test]
    fn thin_dump_xml_that_is_not_a_whole_dump_is_an_error() {
        let whole =
            r#"<superblock uuid="" transaction="7"><device dev_id="4"></device></superblock>"#;
        assert!(parse_thin_dump(whole).is_ok());
        for bad in [
            // Truncated: the dump died half-way.
            &whole[..whole.len() - 10],
            r#"<superblock uuid="" transaction="7"><device dev_id="4">"#,
            // Attributes missing or not numbers.
            r#"<superblock uuid=""></superblock>"#,
            r#"<superblock transaction="x"></superblock>"#,
            r#"<superblock transaction="1"><device mapped_blocks="1"/></superblock>"#,
            r#"<superblock transaction="1"><device dev_id="-1"/></superblock>"#,
            r#"<superblock transaction="1"><device dev_id="99999999999"/></superblock>"#,
            // Not a thin_dump at all.
            r#"<metadata transaction="1"/>"#,
            "",
            "<<<>>>",
        ] {
            let e = parse_thin_dump(bad).expect_err(bad);
            assert!(
                matches!(e, Error::Inconsistent(ref m) if m.contains("unexpected thin_dump output")),
                "{bad}: {e}"
            );
        }
    }
}
