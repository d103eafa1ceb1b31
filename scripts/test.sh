#!/usr/bin/env bash
# The whole test suite: starts the local PostgreSQL when it is down, installs what the tests need
# (a C toolchain for librdkafka, the Tansu broker, Prometheus and promtool) when missing, checks the
# shape of src/ (scripts/shape.sh), then runs `cargo test --release`, the benchmark harness on a
# tiny workload and the fuzz targets for 30 s each. Extra arguments go to cargo test (and skip the
# rest), e.g. `scripts/test.sh --test e2e -- tansu::`.
# CI runs this script through `.ci/run`. Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
step() { echo "==> $*"; }

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$HOME/.cargo/bin:$PATH"

# PostgreSQL: the tests create and drop a database each on this server.
bash scripts/start-postgres.sh

# librdkafka (rdkafka-sys) is built from source: it needs a C toolchain.
for tool in cc make; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        step "installing build tools (missing $tool)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq build-essential pkg-config >/dev/null
        break
    fi
done

# OpenSSL's headers, for Postgres TLS (native-tls).
if ! pkg-config --exists openssl 2>/dev/null; then
    step "installing OpenSSL's headers (libssl-dev) and pkg-config"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq libssl-dev pkg-config >/dev/null
fi

# Tansu, the Kafka-compatible broker of the end-to-end tests (each test starts its own broker).
step "tansu"
bash scripts/install-tansu.sh

# Prometheus and promtool, for the observability tests.
if [ -f scripts/install-prometheus.sh ]; then
    step "prometheus"
    bash scripts/install-prometheus.sh
fi

if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    mkdir -p "$CARGO_TARGET_DIR"
    step "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
fi

# The house's shape (scripts/shape.sh): pure modules import no I/O, no room grows past 500 lines
# without its reason. Quick, and before the long build.
if [ $# -eq 0 ]; then
    step "the shape of src/"
    bash scripts/shape.sh
fi

step "cargo test --release $*"
cargo test --release "$@"

# The example projections' fixtures (README: Testing a projection), through the binary.
if [ $# -eq 0 ]; then
    step "projector test: the example projections' fixtures"
    cargo run --release --quiet -- test
fi

# The benchmark harness on a tiny workload, to keep it working (its numbers mean nothing here); it
# fails when a read model it built is wrong. Skipped when arguments select particular tests.
if [ $# -eq 0 ]; then
    step "benchmark harness, tiny workload"
    cargo bench --bench throughput -- --events 2000 --latency-secs 2 --latency-rates 100,1000,half --naive-events 200 --naive-secs 5
    # Several projections on one topic, and an event-id projection whose ids are pruned.
    cargo bench --bench throughput -- --modes mock --events 2000 --projections 3 --dedupe version --latency-secs 0
    cargo bench --bench throughput -- --modes mock --events 2000 --dedupe event-id --keep-event-ids 1s --latency-secs 0
    # Avro and Protobuf values (Confluent-framed, the schema from a directory), decoded alone too.
    cargo bench --bench throughput -- --modes decode,mock --events 2000 --format avro --latency-secs 0
    cargo bench --bench throughput -- --modes decode,mock --events 2000 --format protobuf --latency-secs 0

    # The fuzz targets (fuzz/), briefly: 30 s each; `scripts/fuzz.sh 600` runs them longer.
    step "fuzzing the definition loader and the event decoder, 30 s each"
    bash scripts/fuzz.sh 30
fi
step "all tests passed"
