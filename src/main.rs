//! The `projector` command: parse arguments, set up logging, run a subcommand ([`cli`]) on a
//! tokio runtime, print the error chain and exit non-zero on failure.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use projector::settings::{redact_text, LogFormat, Settings};

use crate::cli::{Cli, Command};

/// jemalloc, not the system's allocator: glibc's malloc and free ran about a quarter of the
/// engine's instructions; jemalloc cut its CPU per event by 8% (one projection) to 20% (16)
/// (BENCHMARKS.md, "The allocator: jemalloc").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's own settings, read at its first allocation: freed pages go back to the system
/// after a second (its default is ten), which keeps the peak RSS of a long backlog down.
/// `_RJEM_MALLOC_CONF` in the environment overrides them.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 = &b"dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `projector test` reports what it finds itself: the engine's own log (events held, applied
    // later, …) only says why when asked (RUST_LOG).
    let quiet = matches!(cli.command, Command::Test { .. });
    let default_filter = if quiet { "error" } else { "info,rdkafka=warn" };
    let log = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr);
    // `log.format` (README, Logs): settings that do not load are reported once the log is up.
    let format = Settings::log_format(cli.config.as_deref());
    match format {
        LogFormat::Text => log.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => log.json().flatten_event(true).init(),
    }
    let _ = cli::LOG_FORMAT.set(format);
    // Fail points from `FAILPOINTS` (tests only: compiled in with the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    let _fail_points = fail::FailScenario::setup();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(cli::run(cli));
    // Blocking work still running (a lag sample waiting on a broker that is gone) must not hold
    // the exit: `run` has already committed or rolled back everything, within its deadline.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(error) => {
            let mut message = format!("error: {error}");
            for cause in error.chain().skip(1) {
                message.push_str(&format!("\n  caused by: {cause}"));
            }
            cli::report(&redact_text(&message));
            ExitCode::FAILURE
        }
    }
}
