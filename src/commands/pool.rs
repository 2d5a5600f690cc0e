//! `thinlayer pool ...`: one short function per verb over
//! `thinlayer_pool::Pool`. Each returns the engine's own error, never a
//! rewording of it (its exit code comes from it in `crate::exit`).

use std::{
    io::{self, Write},
    path::Path,
};

use serde_json::json;
use thinlayer_pool::{
    Action, Bytes, CreateOptions, DevicePair, Error, LockMode, Pool, PoolRecord, WatchOptions,
    space::ExtendRequest,
};

use crate::{
    cli::{AdoptArgs, CreateArgs, ExtendArgs, WatchArgs},
    render::{Output, backing_text, extend_text, findings_text, host_text, said, status_text},
};

pub(crate) fn create(root: &Path, a: &CreateArgs, wait: bool) -> thinlayer_pool::Result<Output> {
    let opts = CreateOptions {
        data_size: a.data_size.unwrap_or(Bytes(20 << 30)),
        metadata_size: a.metadata_size,
        block_size: a.block_size,
        fs: a.base.fs,
        base_size: a.base.base_size,
        low_water_percent: a.base.low_water,
    };
    let pool = match (&a.data_device, &a.metadata_device) {
        (Some(data), Some(metadata)) => {
            let devices = DevicePair {
                data: data.clone(),
                metadata: metadata.clone(),
                data_size: a.data_size,
                force: a.force,
            };
            Pool::create_on_devices(root, &opts, &devices, wait)?
        }
        _ => Pool::create(root, &opts, wait)?,
    };
    let r = pool.record();
    let head = format!(
        "created pool {} under {}: data {}, metadata {}",
        r.pool_id,
        root.display(),
        r.data_size,
        r.metadata_size
    );
    Ok(made(head, r))
}

pub(crate) fn adopt(root: &Path, a: &AdoptArgs, wait: bool) -> thinlayer_pool::Result<Output> {
    let opts = CreateOptions {
        fs: a.base.fs,
        base_size: a.base.base_size,
        low_water_percent: a.base.low_water,
        ..CreateOptions::default()
    };
    let pool = Pool::adopt(root, &a.pool_device, &opts, wait)?;
    let r = pool.record();
    let head = format!(
        "adopted {} under {} as pool {}: data {}",
        a.pool_device,
        root.display(),
        r.pool_id,
        r.data_size
    );
    Ok(made(head, r))
}

/// What `create` and `adopt` print: `head` (which pool, where, its sizes),
/// then the block size and base filesystem both share; the JSON is the record.
fn made(head: String, r: &PoolRecord) -> Output {
    Output {
        text: format!(
            "{head}, block size {}, base {} {}{}\n",
            r.block_size,
            r.fs.name(),
            r.base_size,
            backing_text(&r.backing)
        ),
        json: serde_json::to_value(r).expect("plain data"),
    }
}

pub(crate) fn status(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let st = Pool::open(root, LockMode::Shared, wait)?.status()?;
    Ok(Output {
        text: status_text(&st),
        json: serde_json::to_value(&st).expect("plain data"),
    })
}

pub(crate) fn activate(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let action = Pool::open(root, LockMode::Exclusive, wait)?.activate()?;
    Ok(said(
        action,
        format!("activated the pool under {}", root.display()),
        format!(
            "the pool under {} is already active; no action taken",
            root.display()
        ),
    ))
}

pub(crate) fn deactivate(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let action = Pool::open(root, LockMode::Exclusive, wait)?.deactivate()?;
    Ok(said(
        action,
        format!("deactivated the pool under {} (data kept)", root.display()),
        format!(
            "the pool under {} is not active; no action taken",
            root.display()
        ),
    ))
}

pub(crate) fn extend(root: &Path, a: &ExtendArgs, wait: bool) -> thinlayer_pool::Result<Output> {
    let req = ExtendRequest {
        data: a.data_size,
        metadata: a.metadata_size,
    };
    let r = Pool::open(root, LockMode::Exclusive, wait)?.extend(&req)?;
    let mut out = said(
        if r.changed() {
            Action::Done
        } else {
            Action::AlreadyDone
        },
        format!(
            "extended the pool under {}: {}",
            root.display(),
            extend_text(&r)
        ),
        format!(
            "the pool is already that size ({}); no action taken",
            extend_text(&r)
        ),
    );
    out.json["extend"] = serde_json::to_value(r).expect("plain data");
    Ok(out)
}

pub(crate) fn watch(root: &Path, a: &WatchArgs, json: bool) -> thinlayer_pool::Result<Output> {
    let opts = WatchOptions {
        threshold_percent: a.threshold,
        extend_percent: a.extend_percent,
        max_data_size: a.max_data_size,
        once: a.once,
        timeout: a.timeout.map(std::time::Duration::from_secs),
        ..WatchOptions::default()
    };
    let mut n = 0u32;
    let end = thinlayer_pool::watch(root, &opts, |r| {
        n += 1;
        // Each extension is printed as it happens, not at exit.
        let line = if json {
            json!({"extended": r}).to_string()
        } else {
            format!("autoextended: {}", extend_text(r))
        };
        let _ = writeln!(io::stdout(), "{line}");
        let _ = io::stdout().flush();
    })?;
    Ok(Output {
        text: format!("watch ended ({end:?}) after {n} extension(s)\n"),
        json: json!({"ended": end, "extensions": n}),
    })
}

pub(crate) fn destroy(
    root: &Path,
    force: bool,
    wipe: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let done = Pool::open(root, LockMode::Exclusive, wait)?.destroy_with(force, wipe)?;
    let mut text = format!("destroyed the pool under {}", root.display());
    for d in &done {
        text += &format!("; {d}");
    }
    let mut out = said(Action::Done, text, String::new());
    out.json["devices"] = json!(done);
    Ok(out)
}

/// Prints a report that has findings (stdout), then fails with exit 7.
fn with_findings(out: Output, count: usize, json: bool) -> thinlayer_pool::Result<Output> {
    if count == 0 {
        return Ok(out);
    }
    if json {
        let _ = writeln!(io::stdout(), "{:#}", out.json);
    } else {
        let _ = write!(io::stdout(), "{}", out.text);
    }
    Err(Error::CheckFailed { count })
}

pub(crate) fn check(root: &Path, json: bool, wait: bool) -> thinlayer_pool::Result<Output> {
    // Exclusive: the check takes a metadata snapshot, and no change may
    // run between its reads of records, kernel and metadata.
    let r = Pool::open(root, LockMode::Exclusive, wait)?.check()?;
    let mut text = format!(
        "pool {} under {}: {}, {} layer(s), records at transaction {}, kernel at {}\n",
        r.pool_id,
        root.display(),
        if r.active { "active" } else { "inactive" },
        r.layers,
        r.transaction_id,
        r.kernel_transaction_id
            .map_or("-".into(), |t| t.to_string()),
    );
    if r.is_clean() {
        text += "clean: records, kernel devices and pool metadata agree; thin_check passes\n";
    }
    text += &findings_text(&r.findings);
    if let Some(h) = &r.host {
        text += &host_text(h);
    }
    for w in &r.warnings {
        text += &format!("warning: {w}\n");
    }
    let count = r.findings.len();
    let out = Output {
        text,
        json: serde_json::to_value(&r).expect("plain data"),
    };
    with_findings(out, count, json)
}

pub(crate) fn recover(
    root: &Path,
    force: bool,
    json: bool,
    wait: bool,
) -> thinlayer_pool::Result<Output> {
    let r = Pool::open(root, LockMode::Exclusive, wait)?.recover_all(force)?;
    let mut text = String::new();
    if r.actions.is_empty() {
        text += "nothing to recover; no action taken\n";
    }
    for a in &r.actions {
        text += &format!("{a}\n");
    }
    if r.findings.is_empty() {
        text += "pool check: clean\n";
    }
    text += &findings_text(&r.findings);
    let count = r.findings.len();
    let out = Output {
        text,
        json: serde_json::to_value(&r).expect("plain data"),
    };
    with_findings(out, count, json)
}

pub(crate) fn repair(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let r = Pool::open(root, LockMode::Exclusive, wait)?.repair()?;
    Ok(Output {
        text: format!("{}\n", r.message),
        json: serde_json::to_value(&r).expect("plain data"),
    })
}

pub(crate) fn reclaim(root: &Path, wait: bool) -> thinlayer_pool::Result<Output> {
    let r = Pool::open(root, LockMode::Exclusive, wait)?.reclaim()?;
    Ok(Output {
        text: format!(
            "reclaimed {} trashed thin id(s); {} idle device(s) torn down\n",
            r.thin_ids, r.devices
        ),
        json: serde_json::to_value(&r).expect("plain data"),
    })
}
