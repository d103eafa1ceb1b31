//! The brokers: librdkafka's mock cluster (in this process) or a Tansu broker (a process of its
//! own, launched by the tests' own launcher, `tests/common/tansu.rs`).

use crate::tansu::Tansu;

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
    pub async fn start(kind: Kind, topic: &str, partitions: i32) -> anyhow::Result<Broker> {
        Ok(match kind {
            Kind::Mock => {
                let cluster = projector::kafka::mock::MockKafka::start(1)?;
                cluster.create_topic(topic, partitions, 1)?;
                Broker::Mock(cluster)
            }
            Kind::Tansu => {
                let tansu = Tansu::start().await?;
                tansu.create_topic(topic, partitions).await?;
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
            Broker::Tansu(tansu) => Some(tansu.id()),
        }
    }
}
