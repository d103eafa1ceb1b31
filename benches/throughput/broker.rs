//! The brokers: librdkafka's mock cluster (in this process) or a Tansu broker (a process of its
//! own, launched here: `Tansu`, `free_port`, self-contained).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// librdkafka's mock cluster, and the engine, in this process.
    Mock,
    /// A Tansu broker, and `projector run`, each in a process of its own.
    Tansu,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Mock => "mock",
            Kind::Tansu => "tansu",
        }
    }
}

pub enum Broker {
    Mock(projector::kafka::mock::MockKafka),
    Tansu(Tansu),
}

impl Broker {
    /// A broker of `kind` with `topic` created, `partitions` partitions.
    pub fn start(kind: Kind, topic: &str, partitions: i32) -> anyhow::Result<Broker> {
        Ok(match kind {
            Kind::Mock => {
                let cluster = projector::kafka::mock::MockKafka::start(1)?;
                cluster.create_topic(topic, partitions, 1)?;
                Broker::Mock(cluster)
            }
            Kind::Tansu => {
                let tansu = tokio::task::block_in_place(Tansu::start)?;
                tokio::task::block_in_place(|| tansu.create_topic(topic, partitions))?;
                Broker::Tansu(tansu)
            }
        })
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(cluster) => cluster.bootstrap_servers(),
            Broker::Tansu(tansu) => tansu.bootstrap.clone(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Mock(_) => None,
            Broker::Tansu(tansu) => Some(tansu.child.id()),
        }
    }
}

/// The number of partitions of `topic` (of every topic when `None`) the broker answers with, or
/// `None` when it does not answer.
fn kafka_metadata_ok(bootstrap: &str, topic: Option<&str>) -> Option<usize> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("log_level", "3").create().ok()?;
    let metadata = consumer.fetch_metadata(topic, Duration::from_secs(3)).ok()?;
    Some(metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| t.partitions().len()).sum())
}

/// Checks `ready` every 200 ms until it holds; fails with `late` after `timeout`, or as `ready` fails.
fn wait_until(
    timeout: Duration,
    late: impl FnOnce() -> String,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !ready()? {
        if started.elapsed() > timeout {
            bail!(late());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// A Tansu broker (in-memory storage) in a process of its own, killed on drop.
pub struct Tansu {
    pub bootstrap: String,
    binary: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Tansu {
    pub fn start() -> anyhow::Result<Tansu> {
        let binary = std::env::var_os("TANSU_BIN").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let cargo = home.join(".cargo/bin/tansu");
            if cargo.is_file() {
                cargo
            } else {
                PathBuf::from("tansu")
            }
        });
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let listener = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log"))?;
        let child = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &listener, "--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (install it with scripts/install-tansu.sh)", binary.display()))?;
        let mut tansu = Tansu { bootstrap: format!("127.0.0.1:{port}"), binary, child, _dir: dir };
        wait_until(
            Duration::from_secs(30),
            || "tansu did not answer within 30 s".into(),
            || {
                if kafka_metadata_ok(&tansu.bootstrap, None).is_some() {
                    return Ok(true);
                }
                if let Some(status) = tansu.child.try_wait()? {
                    bail!("tansu exited at start: {status}");
                }
                Ok(false)
            },
        )?;
        Ok(tansu)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let output = Command::new(&self.binary)
            .args(["topic", "create", name, "--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://{}", self.bootstrap)])
            .output()?;
        if !output.status.success() {
            bail!("tansu topic create: {}", String::from_utf8_lossy(&output.stderr));
        }
        wait_until(
            Duration::from_secs(20),
            || format!("topic {name} did not show {partitions} partitions"),
            || Ok(kafka_metadata_ok(&self.bootstrap, Some(name)) == Some(partitions as usize)),
        )
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}
