//! The reports of `pool check`, `pool recover` and `pool repair`, and the
//! parsers of what the tools and the kernel say about a pool: `thin_dump`
//! output and a thin-pool's table. The verbs themselves live with the
//! pool's state (`pool/check.rs`, `pool/recover.rs`, `pool/repair.rs`).
//!
//! What must never happen: a parser that guesses: output it does not
//! understand is an error naming it.

use std::{collections::BTreeSet, path::PathBuf};

use serde::Serialize;

use crate::{
    action::Action,
    error::{Error, Result},
};

/// One problem `pool check` found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// What kind of problem, as a stable short code (`unknown_thin_id`).
    pub kind: FindingKind,
    /// What is wrong, with the names and ids involved.
    pub detail: String,
    /// What to do about it.
    pub fix: String,
}

/// The kinds of problem `pool check` finds; each renders (and
/// serializes) as a stable snake_case code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A crash interrupted `pool create`: the record is only its intent.
    InterruptedCreate,
    /// A layer record cannot be read.
    DamagedRecord,
    /// A layer names a parent that has no record.
    MissingParent,
    /// An interrupted operation is recorded, not yet settled.
    PendingOperation,
    /// The kernel's (or the metadata's) transaction id is not the records'.
    TransactionMismatch,
    /// The kernel flagged the metadata as needing a check.
    NeedsCheck,
    /// The pool is not in read-write mode.
    PoolMode,
    /// A thin device of the pool that no layer owns is mounted.
    ForeignMount,
    /// The base device is active outside a `pool create`.
    BaseDeviceActive,
    /// A device of the pool that no record knows is active.
    UnknownDevice,
    /// The pool is inactive but some of its devices remain.
    LeftoverDevices,
    /// An adopted pool is not active, so its metadata cannot be read.
    PoolInactive,
    /// `thin_check` refuses the pool metadata.
    MetadataDamaged,
    /// A recorded thin id is missing from the pool metadata.
    MissingThinId,
    /// The pool metadata holds a thin id no record knows.
    UnknownThinId,
}

impl FindingKind {
    /// The stable code (`unknown_thin_id`).
    pub fn code(self) -> &'static str {
        match self {
            FindingKind::InterruptedCreate => "interrupted_create",
            FindingKind::DamagedRecord => "damaged_record",
            FindingKind::MissingParent => "missing_parent",
            FindingKind::PendingOperation => "pending_operation",
            FindingKind::TransactionMismatch => "transaction_mismatch",
            FindingKind::NeedsCheck => "needs_check",
            FindingKind::PoolMode => "pool_mode",
            FindingKind::ForeignMount => "foreign_mount",
            FindingKind::BaseDeviceActive => "base_device_active",
            FindingKind::UnknownDevice => "unknown_device",
            FindingKind::LeftoverDevices => "leftover_devices",
            FindingKind::PoolInactive => "pool_inactive",
            FindingKind::MetadataDamaged => "metadata_damaged",
            FindingKind::MissingThinId => "missing_thin_id",
            FindingKind::UnknownThinId => "unknown_thin_id",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
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

pub(crate) fn tool_words(e: Error) -> String {
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
