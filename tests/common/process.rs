//! `projector` as a child process: a folder for a test's logs, the command with the test's
//! database and broker, a running process killed on drop (its log's tail printed when the test
//! panics), and the external tools the tests run.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::tansu::{executable_on_path, free_port, log_tail};
use super::wait::wait_for;

/// A folder for one test's logs, deleted at the end unless `PROJECTOR_TEST_KEEP_LOGS` is set.
pub struct LogDir {
    pub path: PathBuf,
    _deleted_on_drop: Option<tempfile::TempDir>,
}

impl LogDir {
    pub fn new(label: &str) -> LogDir {
        let dir =
            tempfile::Builder::new().prefix(&format!("projector-{label}-")).tempdir().expect("temporary directory");
        if std::env::var_os("PROJECTOR_TEST_KEEP_LOGS").is_some() {
            let path = dir.keep();
            eprintln!("logs kept in {}", path.display());
            return LogDir { path, _deleted_on_drop: None };
        }
        LogDir { path: dir.path().to_path_buf(), _deleted_on_drop: Some(dir) }
    }
}

/// `projector run` against `database_url` and `bootstrap`, consumer groups `<group_prefix>.<projection>`,
/// the example projections, `/metrics` on a free port, `RUST_LOG=info`, stdout and stderr appended to `log`, working in `log`'s
/// folder (so no stray `projector.toml` is read). Inherited `PROJECTOR_*` variables are removed.
pub fn projector_command(database_url: &str, bootstrap: &str, group_prefix: &str, log: &Path) -> Command {
    projector_subcommand(&["run"], database_url, bootstrap, group_prefix, log)
}

/// [`projector_command`] for any subcommand and its arguments (`["rebuild", "ledger", "--shadow"]`).
pub fn projector_subcommand(
    arguments: &[&str],
    database_url: &str,
    bootstrap: &str,
    group_prefix: &str,
    log: &Path,
) -> Command {
    let log_file = OpenOptions::new().create(true).append(true).open(log).expect("opening the projector log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
    command.args(arguments);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PROJECTOR_") {
            command.env_remove(name);
        }
    }
    command
        .env("DATABASE_URL", database_url)
        .env("PROJECTOR_KAFKA__BOOTSTRAP_SERVERS", bootstrap)
        .env("PROJECTOR_KAFKA__GROUP_PREFIX", group_prefix)
        .env("PROJECTOR_PROJECTIONS_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/projections"))
        .env("PROJECTOR_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "info")
        .current_dir(log.parent().expect("log file in a folder"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file);
    command
}

/// A running `projector` process, SIGKILLed on drop if still running.
pub struct Projector {
    child: std::sync::Mutex<Child>,
    pub log: PathBuf,
    /// The line written to `log` before this run's output.
    marker: String,
}

impl Projector {
    /// Spawns `command` (see [`projector_command`]), first writing a marker line to `log`.
    pub fn spawn(mut command: Command, log: &Path, label: &str) -> Projector {
        let marker = format!("===== test: starting projector ({label}) =====");
        if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(file, "{marker}");
        }
        let child = command.spawn().expect("starting the projector binary");
        Projector { child: std::sync::Mutex::new(child), log: log.to_path_buf(), marker }
    }

    /// Waits (up to `timeout`) until this run has started its projections, as its log says after
    /// its marker line. Its SIGTERM and SIGINT handlers are installed by then: before, a signal
    /// ends the process as the default action does.
    pub async fn wait_started(&self, timeout: Duration) {
        wait_for("the projector to start its projections", timeout, || async {
            self.assert_running();
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            match log.rsplit_once(&self.marker) {
                Some((_, output)) if output.contains("projection starting") => Ok(()),
                _ => Err("no `projection starting` in its log yet".to_string()),
            }
        })
        .await;
    }

    pub fn id(&self) -> u32 {
        self.child.lock().expect("child lock").id()
    }

    fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().expect("child lock").try_wait().expect("polling the projector")
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_running(&self) -> Result<(), String> {
        match self.try_wait() {
            None => Ok(()),
            Some(status) => Err(format!("the projector exited ({status}); its log:\n{}", log_tail(&self.log, 60))),
        }
    }

    /// Panics with the log's tail if the process has exited (for use inside [`wait_for`] checks,
    /// so that a crashed projector fails the test at once instead of at the timeout).
    pub fn assert_running(&self) {
        if let Err(exited) = self.check_running() {
            panic!("{exited}");
        }
    }

    /// SIGKILL: a crash, no shutdown protocol.
    pub fn kill(&self) {
        let mut child = self.child.lock().expect("child lock");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, …) without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.id() as i32), signal).expect("signalling the projector");
    }

    /// Sends `signal` and waits up to `timeout` for the process to exit.
    pub async fn signal_and_wait(&self, signal: nix::sys::signal::Signal, timeout: Duration) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.id() as i32), signal).expect("signalling the projector");
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if started.elapsed() > timeout {
                panic!(
                    "the projector did not exit within {timeout:?} of {signal}; its log:\n{}",
                    log_tail(&self.log, 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- projector log ({}), last lines:\n{}", self.log.display(), log_tail(&self.log, 80));
        }
    }
}

/// Waits (up to 60 s) until `query`, whose columns are all text, returns `expected`, row by
/// row, with `projector` running all along.
pub async fn wait_for_rows(client: &Client, projector: &Projector, query: &str, expected: &[&[&str]]) {
    wait_for(query, Duration::from_secs(60), || async {
        projector.assert_running();
        let rows = client.query(query, &[]).await.map_err(|error| error.to_string())?;
        let rows: Vec<Vec<String>> =
            rows.iter().map(|row| (0..row.len()).map(|i| row.get::<_, String>(i)).collect()).collect();
        if rows
            .iter()
            .map(|row| row.iter().map(String::as_str).collect::<Vec<_>>())
            .eq(expected.iter().map(|row| row.to_vec()))
        {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
}

/// The path of an external tool, or a failure that says how to install it (never a silent skip).
pub fn require_tool(name: &str) -> PathBuf {
    executable_on_path(name).unwrap_or_else(|| {
        panic!("`{name}` is not on PATH: install it with `bash scripts/install-prometheus.sh` (Debian's prometheus package ships prometheus and promtool)")
    })
}

/// A path in the repository (`deploy/…`, `projections/…`).
pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}
