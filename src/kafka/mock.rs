//! librdkafka's in-process mock cluster, for `projector demo` and the tests: a real Kafka-protocol
//! broker (consumer groups, offsets, fault injection) inside this process.
//!
//! rdkafka's own `MockCluster` keeps the mock's default 3 s initial rebalance delay for new
//! consumer groups; every engine start would wait for it. This wrapper sets it to zero, which
//! needs the raw librdkafka handle.

use std::ffi::{CStr, CString};

use rdkafka::bindings as rdsys;
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::types::RDKafkaType;
use rdkafka::ClientConfig;

/// A running mock cluster; destroyed on drop.
pub struct MockKafka {
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    // Owns the handle the cluster lives in: dropped after the cluster (see Drop).
    _client: Client<DefaultClientContext>,
}

// SAFETY: librdkafka's mock cluster API is thread-safe: every call posts an operation to the
// cluster's own thread and waits for it.
unsafe impl Send for MockKafka {}
unsafe impl Sync for MockKafka {}

fn check(code: rdsys::rd_kafka_resp_err_t) -> KafkaResult<()> {
    if code == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(KafkaError::MockCluster(RDKafkaErrorCode::from(code)))
    }
}

impl MockKafka {
    /// Starts a cluster of `brokers` brokers on loopback ports chosen by the system.
    pub fn start(brokers: i32) -> KafkaResult<MockKafka> {
        let config = ClientConfig::new();
        let client =
            Client::new(&config, config.create_native_config()?, RDKafkaType::RD_KAFKA_PRODUCER, DefaultClientContext)?;
        // SAFETY: the handle is valid for the client's lifetime, which outlives the cluster.
        let cluster = unsafe { rdsys::rd_kafka_mock_cluster_new(client.native_ptr(), brokers) };
        if cluster.is_null() {
            return Err(KafkaError::MockCluster(RDKafkaErrorCode::Fail));
        }
        // SAFETY: `cluster` is a live mock cluster.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0) };
        Ok(MockKafka { cluster, _client: client })
    }

    pub fn bootstrap_servers(&self) -> String {
        // SAFETY: the cluster owns the returned string for its lifetime; we copy it at once.
        unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(self.cluster)) }.to_string_lossy().into_owned()
    }

    pub fn create_topic(&self, name: &str, partitions: i32, replication: i32) -> KafkaResult<()> {
        let name = CString::new(name).map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::InvalidTopic))?;
        // SAFETY: valid cluster and NUL-terminated name.
        check(unsafe { rdsys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, replication) })
    }

    /// Takes broker `id` (1-based) down: connections to it fail until [`MockKafka::broker_up`].
    pub fn broker_down(&self, id: i32) -> KafkaResult<()> {
        // SAFETY: valid cluster.
        check(unsafe { rdsys::rd_kafka_mock_broker_set_down(self.cluster, id) })
    }

    pub fn broker_up(&self, id: i32) -> KafkaResult<()> {
        // SAFETY: valid cluster.
        check(unsafe { rdsys::rd_kafka_mock_broker_set_up(self.cluster, id) })
    }

    /// Makes broker `id` name `host:port` as its address in metadata, for clients to reach it
    /// through whatever listens there (a proxy of the tests'). It still listens where it did.
    pub fn advertise(&self, id: i32, host: &str, port: u16) -> KafkaResult<()> {
        let host = CString::new(host).map_err(|_| KafkaError::MockCluster(RDKafkaErrorCode::InvalidArgument))?;
        // SAFETY: valid cluster and NUL-terminated host, copied by the call.
        unsafe { rdsys::rd_kafka_mock_broker_set_host_port(self.cluster, id, host.as_ptr(), i32::from(port)) };
        Ok(())
    }

    /// Limits the versions of requests of `api_key` that the brokers offer to `min..=max`.
    pub fn api_versions(&self, api_key: i16, min: i16, max: i16) -> KafkaResult<()> {
        // SAFETY: valid cluster.
        check(unsafe { rdsys::rd_kafka_mock_set_apiversion(self.cluster, api_key, min, max) })
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new and destroyed once, before its client.
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}
