//! `pool repair`: damaged metadata rebuilt with `thin_repair` into a fresh
//! file, checked, and swapped in; the damaged copy kept beside it.
//!
//! What must never happen: the damaged metadata overwritten or removed;
//! a repaired file swapped in that `thin_check` refuses; a repair while
//! the pool is active.

use std::fs;

use super::{Action, Pool, lifecycle::check_metadata, now_unix};
use crate::{
    check::{RepairReport, tool_words},
    cmd::Tool,
    error::{Error, IoContext, Result},
    loopback,
    names::{self, Role},
    records::{Backing, file},
};

impl Pool {
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
            Backing::Files => {}
            Backing::Devices { .. } => {
                return Err(Error::InvalidArgument(
                    "`pool repair` rebuilds a metadata file; this pool's metadata is a device: \
                     run `thin_repair` by hand into a spare device of the same size (see `thinlayer pool check`)"
                        .into(),
                ));
            }
            Backing::Adopted { pool_name, .. } => {
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
        let f = file::open_private(&fresh, true)?;
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
