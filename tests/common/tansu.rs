//! A Tansu broker (Kafka-compatible) in a process of its own, and the process helpers it needs:
//! a free loopback port, finding an executable, a log's last lines.
//!
//! Self-contained (std, tokio, anyhow, rdkafka, tempfile: nothing of the rest of `tests/common`),
//! so that the throughput benchmark can include this very file:
//!
//! ```ignore
//! #[path = "../../tests/common/tansu.rs"]
//! #[allow(dead_code)]
//! mod tansu;
//! use tansu::{free_port, Tansu};
//!
//! let tansu = Tansu::start().await?;
//! tansu.create_topic(&topic, partitions).await?;
//! ```

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

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

/// The file `name` in one of the folders of `PATH`, if any.
pub fn executable_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

/// The `tansu` binary: `$TANSU_BIN`, on `PATH`, or in `~/.cargo/bin`.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = executable_on_path("tansu") {
        return Ok(path);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let in_cargo = home.join(".cargo/bin/tansu");
    if in_cargo.is_file() {
        return Ok(in_cargo);
    }
    bail!("the `tansu` broker is not installed (not on PATH nor in ~/.cargo/bin): run scripts/install-tansu.sh")
}

/// A Tansu broker in a process of its own, killed on drop (its log's tail printed when a test
/// panics).
pub struct Tansu {
    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub bootstrap: String,
    /// Its stdout and stderr (`RUST_LOG` from `$TANSU_LOG`, `warn` by default).
    pub log: PathBuf,
    binary: PathBuf,
    child: Child,
    storage: String,
    dir: tempfile::TempDir,
}

fn spawn_tansu(binary: &Path, bootstrap: &str, storage: &str, folder: &Path, log: &Path) -> anyhow::Result<Child> {
    let listener = format!("tcp://{bootstrap}");
    let log_file = OpenOptions::new().create(true).append(true).open(log).context("opening the tansu log")?;
    Command::new(binary)
        .arg("broker")
        .args(["--listener-url", &listener])
        .args(["--advertised-listener-url", &listener])
        .args(["--storage-engine", storage])
        .current_dir(folder)
        .env("RUST_LOG", std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting `{}` (install it with scripts/install-tansu.sh)", binary.display()))
}

impl Tansu {
    /// Starts a broker on a free loopback port, storing in memory, and waits (up to 30 s) until
    /// it answers metadata requests.
    pub async fn start() -> anyhow::Result<Tansu> {
        Tansu::start_with("memory://tansu/").await
    }

    /// [`Tansu::start`], storing in SQLite (`tansu.db` in its folder): topics, records and group
    /// offsets survive [`Tansu::kill`] and [`Tansu::restart`].
    pub async fn start_persistent() -> anyhow::Result<Tansu> {
        Tansu::start_with("sqlite://tansu.db").await
    }

    async fn start_with(storage: &str) -> anyhow::Result<Tansu> {
        let binary = tansu_binary()?;
        let dir = tempfile::tempdir().context("temporary directory")?;
        let log = dir.path().join("tansu.log");
        let bootstrap = format!("127.0.0.1:{}", free_port());
        let child = spawn_tansu(&binary, &bootstrap, storage, dir.path(), &log)?;
        let mut tansu = Tansu { bootstrap, log, binary, child, storage: storage.to_string(), dir };
        tansu.wait_ready(Duration::from_secs(30)).await?;
        Ok(tansu)
    }

    /// The broker's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the broker vanishes mid-stream.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again on the same port and storage, and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn_tansu(&self.binary, &self.bootstrap, &self.storage, self.dir.path(), &self.log)?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("polling tansu")? {
                bail!("tansu exited at start ({status}); its log:\n{}", log_tail(&self.log, 40));
            }
            if TcpStream::connect(&self.bootstrap).is_ok() && self.metadata(None).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
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

    /// Creates `name` with `partitions` partitions (Tansu does not create topics on first use),
    /// through the admin API or else `tansu topic create`, and waits (up to 20 s) until the
    /// broker's metadata shows them.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().context("an admin client")?;
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
                .context("running `tansu topic create`")?;
            if !output.status.success() {
                bail!(
                    "creating topic `{name}` failed: admin client: {admin_error}; tansu topic create: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        let started = Instant::now();
        loop {
            let shown = match self.metadata(Some(name)).await {
                Ok(topics) => match topics.get(name) {
                    Some(&count) if count == partitions as usize => return Ok(()),
                    other => format!("metadata shows {other:?} partitions"),
                },
                Err(error) => error,
            };
            if started.elapsed() > Duration::from_secs(20) {
                bail!("topic `{name}` with {partitions} partitions: not within 20 s ({shown})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
