//! `thinlayer image ...`: import, list and remove images through
//! `thinlayer_store::Store`; the store's own error comes back unchanged.

use std::{
    io::{self, IsTerminal},
    path::Path,
};

use serde_json::json;
use thinlayer_pool::LockMode;
use thinlayer_store::{Progress, Store};

use crate::{cli::ImageCommand, render::Output};

/// `image ...`.
pub(crate) fn run(
    root: &Path,
    cmd: ImageCommand,
    json_out: bool,
    wait: bool,
) -> thinlayer_store::Result<Output> {
    match cmd {
        ImageCommand::Import { path, name } => {
            let mut s = Store::open(root, LockMode::Exclusive, wait)?;
            let bar = progress_bar(json_out);
            let report = s.import(&path, name.as_deref(), &|p| match (&bar, p) {
                (
                    Some(b),
                    Progress::Layer {
                        index,
                        count,
                        id,
                        bytes,
                        reused,
                    },
                ) => {
                    b.set_length(bytes);
                    b.set_position(0);
                    let short: String = id.chars().take(19).collect();
                    b.set_message(format!(
                        "layer {index}/{count} {short}{}",
                        if reused { " (already in the pool)" } else { "" }
                    ));
                }
                (Some(b), Progress::Bytes(n)) => b.set_position(n),
                (None, _) => {}
            })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let text = if report.already_present {
                format!(
                    "image {} is already imported; no action taken\n",
                    report.name
                )
            } else {
                format!(
                    "imported image {}: {} layer(s) applied, {} already in the pool\n",
                    report.name, report.applied, report.reused
                )
            };
            Ok(Output {
                text,
                json: serde_json::to_value(&report).expect("plain data"),
            })
        }
        ImageCommand::Ls => {
            let s = Store::open(root, LockMode::Shared, wait)?;
            let images = s.images()?;
            let mut text = format!("{:<32} {:>6}  {}\n", "NAME", "LAYERS", "TOP LAYER");
            for i in &images {
                text += &format!(
                    "{:<32} {:>6}  {}\n",
                    i.name,
                    i.layers.len(),
                    i.layers.last().map_or("-", String::as_str)
                );
            }
            Ok(Output {
                text,
                json: serde_json::to_value(&images).expect("plain data"),
            })
        }
        ImageCommand::Rm { name } => {
            let removed = Store::open(root, LockMode::Exclusive, wait)?.remove_image(&name)?;
            Ok(Output {
                text: format!(
                    "removed image {name} and {} layer(s) nothing else used\n",
                    removed.len()
                ),
                json: json!({"image": name, "removed_layers": removed}),
            })
        }
    }
}

/// A byte progress bar on a terminal; none with `--json` or without a TTY.
fn progress_bar(json_out: bool) -> Option<indicatif::ProgressBar> {
    if json_out || !io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Some(b)
}
