//! Helpers shared by the integration tests: a database per test, a Tansu broker per test,
//! producing records one per batch, running the `projector` binary as a child process, polling.
//!
//! Every test owns what it starts: its database (`projector_test_<hex>`, dropped at the end, or
//! best-effort when the test panics), its broker process and its projector processes (killed on
//! drop). When a test panics, the drops print the tail of each process's log.

#![allow(dead_code)]

pub mod records;
pub mod scrape;
pub mod shop;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use projector::demo::ShopEvent;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;
use tokio_postgres::{Client, NoTls};

/// The server the test databases are created on, unless `PROJECTOR_TEST_DATABASE_URL` says otherwise.
pub const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `PROJECTOR_TEST_DATABASE_URL`, or [`DEFAULT_SERVER_URL`].
pub fn server_url() -> String {
    std::env::var("PROJECTOR_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER_URL.to_string())
}

/// Connects to `url`, driving the connection on the current runtime.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("connecting to `{url}`: {error} (is PostgreSQL running? see .ci/run)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

// ---------------------------------------------------------------------------------------------
// Databases

/// A database of its own for one test, on the server of [`server_url`].
pub struct TestDb {
    pub url: String,
    pub name: String,
    server_url: String,
    dropped: bool,
}

impl TestDb {
    /// Creates `projector_test_<random hex>`.
    pub async fn create() -> TestDb {
        let server_url = server_url();
        let name = format!("projector_test_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let admin = connect(&server_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|error| panic!("creating database `{name}`: {error}"));
        let mut url = url::Url::parse(&server_url).expect("PROJECTOR_TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        TestDb { url: url.to_string(), name, server_url, dropped: false }
    }

    /// A new connection to this database.
    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops the database, disconnecting whoever is still connected.
    pub async fn drop(mut self) {
        drop_database(&self.server_url, &self.name).await;
        self.dropped = true;
    }
}

async fn drop_database(server_url: &str, name: &str) {
    let admin = connect(server_url).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap_or_else(|error| panic!("dropping database `{name}`: {error}"));
}

impl Drop for TestDb {
    /// Best effort, when the test did not drop the database itself (it panicked): a thread with a
    /// runtime of its own, since this may run inside (or outside) the test's runtime.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(async {
                let Ok((client, connection)) = tokio_postgres::connect(&server_url, NoTls).await else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                if let Err(error) =
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
                {
                    eprintln!("could not drop test database `{name}`: {error}");
                }
            });
        });
        let _ = dropping.join();
    }
}

// ---------------------------------------------------------------------------------------------
// Queries

/// The single `bigint` (or `int`, cast it) that `sql` returns.
pub async fn query_i64(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|error| panic!("`{sql}`: {error}")).get::<_, i64>(0)
}

/// `projection`'s checkpoints: partition -> next offset, for `topic`.
pub async fn checkpoints(
    client: &Client,
    projection: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT partition, next_offset FROM projector.checkpoints WHERE projection = $1 AND topic = $2",
            &[&projection, &topic],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get::<_, i32>(0), row.get::<_, i64>(1))).collect())
}

// ---------------------------------------------------------------------------------------------
// Polling

/// Polls `check` every 200 ms until it returns `Ok`; panics naming `what` and the last reason
/// `check` gave after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        let why_not = match check().await {
            Ok(()) => return,
            Err(why_not) => why_not,
        };
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}: {why_not}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

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

/// A free loopback TCP port (free when this returns; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binding a loopback port").local_addr().expect("local address").port()
}

/// The last `lines` lines of the file at `path`, for failure reports.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|error| format!("<cannot read {}: {error}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn executable_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// The `tansu` binary: `$TANSU_BIN`, on `PATH`, or in `~/.cargo/bin`.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(path);
    }
    if let Some(path) = executable_on_path("tansu") {
        return path;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let in_cargo = home.join(".cargo/bin/tansu");
    if in_cargo.is_file() {
        return in_cargo;
    }
    panic!("the `tansu` broker is not installed (not on PATH nor in ~/.cargo/bin): run scripts/install-tansu.sh");
}

/// A Tansu broker (Kafka-compatible) in a process of its own, killed on drop.
pub struct Tansu {
    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub bootstrap: String,
    pub log: PathBuf,
    binary: PathBuf,
    child: Child,
    storage: String,
    _dir: tempfile::TempDir,
}

fn spawn_tansu(binary: &Path, bootstrap: &str, storage: &str, folder: &Path, log: &Path) -> Child {
    let listener = format!("tcp://{bootstrap}");
    let log_file = OpenOptions::new().create(true).append(true).open(log).expect("opening the tansu log");
    Command::new(binary)
        .arg("broker")
        .args(["--listener-url", &listener])
        .args(["--advertised-listener-url", &listener])
        .args(["--storage-engine", storage])
        .current_dir(folder)
        .env("RUST_LOG", std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|error| panic!("starting `{}`: {error}", binary.display()))
}

impl Tansu {
    /// Starts a broker on a free loopback port, storing in memory, and waits until it answers
    /// metadata requests.
    pub async fn start() -> Tansu {
        Tansu::start_with("memory://tansu/").await
    }

    /// [`Tansu::start`], storing in SQLite (`tansu.db` in its folder): topics, records and group
    /// offsets survive [`Tansu::kill`] and [`Tansu::restart`].
    pub async fn start_persistent() -> Tansu {
        Tansu::start_with("sqlite://tansu.db").await
    }

    async fn start_with(storage: &str) -> Tansu {
        let binary = tansu_binary();
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = dir.path().join("tansu.log");
        let port = free_port();
        let bootstrap = format!("127.0.0.1:{port}");
        let child = spawn_tansu(&binary, &bootstrap, storage, dir.path(), &log);
        let mut tansu = Tansu { bootstrap, log, binary, child, storage: storage.to_string(), _dir: dir };
        tansu.wait_ready(Duration::from_secs(30)).await;
        tansu
    }

    /// SIGKILL: the broker vanishes mid-stream.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same port and storage, and waits until it answers.
    pub async fn restart(&mut self) {
        let folder = self._dir.path().to_path_buf();
        self.child = spawn_tansu(&self.binary, &self.bootstrap, &self.storage, &folder, &self.log);
        self.wait_ready(Duration::from_secs(30)).await;
    }

    async fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("polling tansu") {
                panic!("tansu exited at start ({status}); its log:\n{}", log_tail(&self.log, 40));
            }
            if TcpStream::connect(&self.bootstrap).is_ok() && self.metadata(None).await.is_ok() {
                return;
            }
            if started.elapsed() > timeout {
                panic!(
                    "tansu did not answer on {} within {timeout:?}; its log:\n{}",
                    self.bootstrap,
                    log_tail(&self.log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Partition count of each topic in the broker's metadata (all topics, or just `topic`).
    pub async fn metadata(&self, topic: Option<&str>) -> Result<BTreeMap<String, usize>, String> {
        let bootstrap = self.bootstrap.clone();
        let topic = topic.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("log_level", "3")
                .create()
                .map_err(|error| error.to_string())?;
            let metadata =
                consumer.fetch_metadata(topic.as_deref(), Duration::from_secs(3)).map_err(|error| error.to_string())?;
            Ok(metadata
                .topics()
                .iter()
                .filter(|topic| topic.error().is_none())
                .map(|topic| (topic.name().to_string(), topic.partitions().len()))
                .collect())
        })
        .await
        .expect("metadata task")
    }

    /// Creates `name` with `partitions` partitions (Tansu does not create topics on first use)
    /// and waits until the broker's metadata shows them.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().expect("creating an admin client");
        let created = admin
            .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
            .await;
        let admin_error = match created {
            Ok(results) => results.into_iter().find_map(Result::err).map(|(topic, code)| format!("`{topic}`: {code}")),
            Err(error) => Some(error.to_string()),
        };
        if let Some(admin_error) = admin_error {
            // Fall back to Tansu's own command.
            let output = Command::new(&self.binary)
                .args(["topic", "create", name, "--partitions", &partitions.to_string()])
                .args(["--broker", &format!("tcp://{}", self.bootstrap)])
                .output()
                .expect("running `tansu topic create`");
            assert!(
                output.status.success(),
                "creating topic `{name}` failed: admin client: {admin_error}; tansu topic create: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        wait_for(&format!("topic `{name}` with {partitions} partitions"), Duration::from_secs(20), || async {
            match self.metadata(Some(name)).await?.get(name) {
                Some(&count) if count == partitions as usize => Ok(()),
                other => Err(format!("metadata shows {other:?} partitions")),
            }
        })
        .await;
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tansu log ({}), last lines:\n{}", self.log.display(), log_tail(&self.log, 30));
        }
    }
}

/// Publishes `events` in order, one record per produce batch (Tansu's high watermark is the last
/// batch's base offset + 1, so exact offsets need single-record batches), each awaited before the
/// next. Returns each record's `(partition, offset)`.
pub async fn produce_one_per_batch(bootstrap: &str, topic: &str, events: &[ShopEvent]) -> Vec<(i32, i64)> {
    let producer = records::one_per_batch_producer(bootstrap);
    let mut positions = Vec::with_capacity(events.len());
    for event in events {
        let payload = serde_json::to_vec(&event.value).expect("event as JSON");
        let delivered = producer
            .send(FutureRecord::to(topic).key(&event.key).payload(&payload), Duration::from_secs(30))
            .await
            .unwrap_or_else(|(error, _)| panic!("producing to `{topic}`: {error}"));
        positions.push((delivered.partition, delivered.offset));
    }
    positions
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
