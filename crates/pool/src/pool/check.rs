//! `pool check`: the records held up against the kernel and the pool
//! metadata; and reading that metadata with the tools (see
//! [`crate::check`] for the reports and the parsers).
//!
//! The kernel's own list of thin ids comes from the pool metadata through
//! `thin_dump --skip-mappings`: while the pool is live, on a metadata
//! snapshot (`reserve_metadata_snap`, dump and `thin_check` with
//! `--metadata-snap` on the metadata device, `release_metadata_snap`);
//! while it is inactive, on the metadata file through a read-only loop
//! device (the tools open with `O_DIRECT`).
//!
//! What must never happen: `pool check` changing anything but the
//! metadata snapshot it takes and releases.

use std::{collections::BTreeSet, path::PathBuf};

use super::Pool;
use crate::{
    check::{
        CheckReport, Finding, FindingKind, MetadataView, parse_thin_dump, pool_table_devices,
        tool_words,
    },
    cmd::Tool,
    error::{Error, Result},
    kernel, mounts,
    names::{self, Role},
    records::{Backing, Pending},
};

/// The metadata as the tools see it, and thin_check's complaint if any.
pub(super) struct Metadata {
    pub(super) view: Option<MetadataView>,
    pub(super) damaged: Option<String>,
}

impl Pool {
    /// The node of the live pool's metadata device: thinlayer's linear
    /// device, or for an adopted pool the one its table names.
    fn live_metadata_node(&mut self) -> Result<PathBuf> {
        if let Backing::Adopted { pool_name, .. } = &self.record().backing {
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
    pub(super) fn read_metadata(&mut self, live: bool) -> Result<Metadata> {
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
        let adopted = matches!(rec.backing, Backing::Adopted { .. });
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
                FindingKind::InterruptedCreate,
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
                    FindingKind::DamagedRecord,
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
                        FindingKind::MissingParent,
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
                    FindingKind::PendingOperation,
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
                    FindingKind::TransactionMismatch,
                    format!(
                        "the kernel's transaction id is {} but the records are at {} with nothing pending",
                        w.transaction_id, rec.transaction_id
                    ),
                    "the metadata or the records were replaced by older copies; restore the matching pair",
                );
            }
            if w.needs_check {
                find(
                    FindingKind::NeedsCheck,
                    "the kernel flagged the metadata as needing a check".into(),
                    "unmount the layers, `thinlayer pool deactivate`, then `thinlayer pool repair`",
                );
            }
            if w.summary != devicemapper::ThinPoolStatusSummary::Good {
                find(
                    FindingKind::PoolMode,
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
                                FindingKind::ForeignMount,
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
                                FindingKind::BaseDeviceActive,
                                format!("the base device {name} is active outside a pool create"),
                                "run `thinlayer pool recover`",
                            );
                        } else if !in_flight.contains(&t) {
                            find(
                                FindingKind::UnknownDevice,
                                format!("{name} is active but thin id {t} belongs to no layer"),
                                "run `thinlayer pool recover --force` to remove it",
                            );
                        }
                    }
                    Some(_) => {}
                    None => find(
                        FindingKind::UnknownDevice,
                        format!("{name} carries the pool's prefix but no role thinlayer makes"),
                        "run `thinlayer pool recover --force` to remove it",
                    ),
                }
            }
        } else if !present.is_empty() {
            find(
                FindingKind::LeftoverDevices,
                format!(
                    "the pool is inactive but these devices remain: {}",
                    present.join(", ")
                ),
                "an activation or deactivation was interrupted; run `thinlayer pool activate` or `thinlayer pool deactivate` to finish either",
            );
        }
        if adopted && !live {
            find(
                FindingKind::PoolInactive,
                "the adopted pool is not active: its metadata cannot be read".into(),
                "bring it up the way its owner does (`lvchange -ay VG/POOL`), then run `thinlayer pool check`",
            );
            report.findings = findings;
            return Ok(report);
        }
        let md = self.read_metadata(live)?;
        if let Some(words) = md.damaged {
            find(
                FindingKind::MetadataDamaged,
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
                        FindingKind::TransactionMismatch,
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
                    FindingKind::MissingThinId,
                    format!("{whose} has thin id {t}, which the pool metadata lacks"),
                    "its data is gone; remove the layer with `thinlayer layer rm`, or restore the metadata from a backup",
                );
            }
            if let Backing::Adopted {
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
                    FindingKind::UnknownThinId,
                    format!("the pool metadata holds thin id {t}, which no record knows"),
                    "run `thinlayer pool recover --force` to delete it (its blocks go free)",
                );
            }
            report.metadata_thin_ids = Some(view.thin_ids.iter().copied().collect());
        }
        report.findings = findings;
        Ok(report)
    }
}
