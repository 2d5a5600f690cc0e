//! One module per verb group, and [`run`], the one dispatch over the
//! parsed command line. Every verb returns its own crate's error, carried
//! up unchanged in an `anyhow::Error` (never converted into another
//! crate's type), so `crate::exit` finds its class.

mod bench;
mod container;
mod image;
mod layer;
mod pool;
mod serve;
mod volume;

pub(crate) use bench::BenchMissing;

use crate::{
    cli::{Cli, Command, LayerCommand, LayerTarCommand, PoolCommand},
    render::Output,
};

/// Runs the verb `cli` names and returns what it prints.
///
/// # Errors
/// The verb's error, as its crate's type.
pub(crate) fn run(cli: Cli) -> anyhow::Result<Output> {
    let root = cli.root.as_path();
    let (json, wait) = (cli.json, cli.wait);
    Ok(match cli.command {
        Command::Pool(c) => match c {
            PoolCommand::Create(a) => pool::create(root, &a, wait)?,
            PoolCommand::Adopt(a) => pool::adopt(root, &a, wait)?,
            PoolCommand::Status => pool::status(root, wait)?,
            PoolCommand::Activate => pool::activate(root, wait)?,
            PoolCommand::Deactivate => pool::deactivate(root, wait)?,
            PoolCommand::Extend(a) => pool::extend(root, &a, wait)?,
            PoolCommand::Watch(a) => pool::watch(root, &a, json)?,
            PoolCommand::Destroy { force, wipe } => pool::destroy(root, force, wipe, wait)?,
            PoolCommand::Check => pool::check(root, json, wait)?,
            PoolCommand::Recover { force } => pool::recover(root, force, json, wait)?,
            PoolCommand::Repair => pool::repair(root, wait)?,
            PoolCommand::Reclaim => pool::reclaim(root, wait)?,
        },
        Command::Layer(c) => match c {
            LayerCommand::Create {
                id,
                parent,
                from_tar: Some(tar),
            }
            | LayerCommand::Tar(LayerTarCommand::Apply { id, tar, parent }) => {
                layer::apply(root, &id, &tar, parent.as_deref(), wait)?
            }
            LayerCommand::Create {
                id,
                parent,
                from_tar: None,
            } => layer::create(root, &id, parent.as_deref(), wait)?,
            LayerCommand::Tar(LayerTarCommand::Export { id, output }) => {
                layer::export(root, &id, &output, wait)?
            }
            LayerCommand::Rm {
                id,
                deferred,
                later,
            } => layer::rm(root, &id, deferred, later, wait)?,
            LayerCommand::Ls => layer::ls(root, wait)?,
            LayerCommand::Provision {
                id,
                spares,
                mounted,
                ..
            } => layer::provision(root, id.as_deref(), spares, mounted, wait)?,
        },
        Command::Mount { id, dir, readonly } => layer::mount(root, &id, &dir, readonly, wait)?,
        Command::Umount { target } => layer::umount(root, &target, wait)?,
        Command::Image(c) => image::run(root, c, json, wait)?,
        Command::Container(c) => container::run(root, c, wait)?,
        Command::Volume(c) => volume::run(root, c, wait)?,
        Command::Serve(a) => serve::run(root, a)?,
        Command::Bench(a) => match bench::run(a.args, json, cli.verbose)? {},
    })
}
