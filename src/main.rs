//! `thinlayer`: the command line over the engine in `crates/pool` and the
//! store in `crates/store`.
//!
//! `main` parses the flags (`cli`), sets up logging, runs the one verb
//! (`commands::run`, one module per verb group), prints its result (text,
//! or JSON with `--json`: `render`) and exits with the code `exit` computes
//! from the error, the README's table. Broken pipes exit 0. What must
//! never happen: an exit code decided anywhere but `exit::code`.

mod cli;
mod commands;
mod exit;
mod render;

use std::{
    io::{self, Write},
    process::ExitCode,
};

use clap::Parser;
use serde_json::json;

fn main() -> ExitCode {
    // First: nothing this process makes is readable by other users, even
    // where a path forgets its explicit mode.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if thinlayer_pool::fault::list_requested() {
        for p in thinlayer_pool::fault::ALL {
            println!("{p}");
        }
        return ExitCode::SUCCESS;
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::code(&e.into()));
        }
    };
    init_logging(cli.verbose, matches!(cli.command, cli::Command::Serve(_)));
    let json = cli.json;
    let code = match commands::run(cli) {
        Ok(out) => {
            let printed = if json {
                writeln!(io::stdout(), "{:#}", out.json)
            } else if out.text.is_empty() {
                Ok(())
            } else {
                write!(io::stdout(), "{}", out.text)
            };
            match printed {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => exit::FAILED,
                _ => exit::OK,
            }
        }
        Err(e) => {
            let code = exit::code(&e);
            let message = exit::message(&e);
            if json {
                let _ = writeln!(
                    io::stderr(),
                    "{}",
                    json!({"error": message, "exit_code": code})
                );
            } else {
                let _ = writeln!(io::stderr(), "thinlayer: error: {message}");
            }
            code
        }
    };
    ExitCode::from(code)
}

/// Logs to stderr at the level `verbose` (or `RUST_LOG`) asks for. A
/// command's lines carry no time; a server's (`serving`) carry the seconds
/// since it started, so that its steps can be placed against its clients'
/// calls (the journal adds the wall clock).
fn init_logging(verbose: u8, serving: bool) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    if serving {
        log.with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else {
        log.without_time().init();
    }
}
