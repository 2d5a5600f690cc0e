//! Rendering: the text and JSON a verb prints. Commands build an
//! [`Output`]; `main` prints one of its two forms. Nothing here runs a
//! verb or changes state, and the wording is a contract (the host tests
//! and the VM suites parse it).

use serde_json::json;
use thinlayer_pool::{
    Action, Backing, Bytes, PoolStatus,
    space::{self, ExtendReport},
};

/// What a verb prints: text for people, a JSON value for programs.
pub(crate) struct Output {
    /// Printed as is (ends in a newline, or is empty).
    pub(crate) text: String,
    /// Printed pretty with `--json`.
    pub(crate) json: serde_json::Value,
}

/// The output of an idempotent verb: `done` if it changed something,
/// `already` ("...; no action taken") if not; JSON `changed` says which.
pub(crate) fn said(action: Action, done: String, already: String) -> Output {
    let (text, did) = match action {
        Action::Done => (done, true),
        Action::AlreadyDone => (already, false),
    };
    Output {
        json: json!({"changed": did, "message": text}),
        text: format!("{text}\n"),
    }
}

/// ` on DATA and META` for a pool on devices, ` in POOL` for an adopted one.
pub(crate) fn backing_text(b: &Backing) -> String {
    match b {
        Backing::Files => String::new(),
        Backing::Devices { data, metadata } => format!(
            "; data on {}, metadata on {}",
            data.describe(),
            metadata.describe()
        ),
        Backing::Adopted {
            pool_name,
            foreign_thin_ids,
            first_thin_id,
            ..
        } => format!(
            "; adopted pool {pool_name}: {} foreign thin id(s) {:?} left alone, thinlayer's ids from {first_thin_id}",
            foreign_thin_ids.len(),
            foreign_thin_ids
        ),
    }
}

pub(crate) fn percent(used: u64, total: u64) -> String {
    if total == 0 {
        return "-".into();
    }
    format!("{}.{}%", used * 100 / total, (used * 1000 / total) % 10)
}

pub(crate) fn status_text(st: &PoolStatus) -> String {
    let what = match st.backing {
        Backing::Files => "file",
        Backing::Devices { .. } => "device",
        Backing::Adopted { .. } => "(adopted pool's)",
    };
    let mut s = format!(
        "pool {} under {}: {}\n  filesystem {}, block size {}, base size {}\n  data {what} {}, metadata {what} {}\n  layers {}, records at transaction {}\n",
        st.pool_id,
        st.root.display(),
        if st.active { "active" } else { "inactive" },
        st.fs.name(),
        Bytes(st.block_size_bytes),
        Bytes(st.base_size_bytes),
        Bytes(st.data_size_bytes),
        Bytes(st.metadata_size_bytes),
        st.layers,
        st.transaction_id,
    );
    let on = backing_text(&st.backing);
    if let Some(on) = on.strip_prefix("; ") {
        s += &format!("  {on}\n");
    }
    if let Some(k) = &st.kernel {
        s += &format!(
            "  data used     {} of {} blocks ({})\n  metadata used {} of {} blocks ({})\n  kernel transaction {}, mode {}, thin devices active {}\n  discard passdown {}, full pool {}, low-water mark {}%\n",
            k.data_used_blocks,
            k.data_total_blocks,
            percent(k.data_used_blocks, k.data_total_blocks),
            k.metadata_used_blocks,
            k.metadata_total_blocks,
            percent(k.metadata_used_blocks, k.metadata_total_blocks),
            k.transaction_id,
            k.mode,
            k.active_thin_devices,
            if k.discard_passdown { "on" } else { "off" },
            if k.error_if_no_space {
                "fails writes"
            } else {
                "queues writes"
            },
            st.low_water_percent,
        );
    } else {
        s += "  (activate the pool to see usage: thinlayer pool activate)\n";
    }
    if st.backing.is_files() {
        s += &host_text(&st.host);
    }
    if !st.spares.is_empty() {
        let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
        for sp in &st.spares {
            *by.entry(sp.parent.as_deref().unwrap_or("(base)"))
                .or_default() += 1;
        }
        let list: Vec<String> = by.iter().map(|(p, n)| format!("{p} x{n}")).collect();
        s += &format!("  spares (provisioned snapshots): {}\n", list.join(", "));
        let c = &st.spare_cost;
        s += &format!(
            "  spares cost: {} device(s) active, {} mounted, {} mapped\n",
            c.devices,
            c.mounts,
            Bytes(c.mapped_bytes)
        );
    }
    if !st.trash.is_empty() {
        s += &format!(
            "  trash: {} removed layer(s) whose space `thinlayer pool reclaim` gives back\n",
            st.trash.len()
        );
    }
    if let Some(p) = &st.pending {
        s += &format!("  interrupted operation: {p:?}\n");
    }
    for w in &st.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}

pub(crate) fn host_text(h: &space::HostSpace) -> String {
    format!(
        "  host filesystem: {} free of {}; the data file holds {} of it and can still grow by {}{}\n",
        Bytes(h.filesystem_free_bytes),
        Bytes(h.filesystem_size_bytes),
        Bytes(h.data_allocated_bytes),
        Bytes(h.data_growth_bytes),
        if h.holds_growth {
            ""
        } else {
            " (more than is free)"
        }
    )
}

pub(crate) fn extend_text(r: &ExtendReport) -> String {
    format!(
        "data {} -> {}, metadata {} -> {}",
        r.old_data_size, r.new_data_size, r.old_metadata_size, r.new_metadata_size
    )
}

pub(crate) fn findings_text(findings: &[thinlayer_pool::check::Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        s += &format!("problem [{}]: {}\n  fix: {}\n", f.kind, f.detail, f.fix);
    }
    s
}
