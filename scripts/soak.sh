#!/usr/bin/env bash
# Soaks the "every record accounted for" property (tests/faults/bytes.rs: any bytes as keys,
# values and headers mixed into valid histories with duplicates and restarts) for CASES cases
# (default 10000), in release mode, against the local PostgreSQL and librdkafka's mock cluster.
# Prints progress every 100 cases, then the cases run and the time taken. Fails on any failing
# case: proptest shrinks it, prints it, and saves its seed in
# tests/faults/bytes.proptest-regressions (printed here), which every later run replays first.
#
#   scripts/soak.sh              # 10,000 cases
#   scripts/soak.sh 50000        # more
#
# The test's whole output is kept in $SOAK_LOG (default: a temporary file, named at the end).
set -euo pipefail

cd "$(dirname "$0")/.."
cases="${1:-10000}"
case "$cases" in
    '' | *[!0-9]*) echo "usage: scripts/soak.sh [CASES]" >&2; exit 2 ;;
esac
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$HOME/.cargo/bin:$PATH"
regressions=tests/faults/bytes.proptest-regressions
log="${SOAK_LOG:-$(mktemp -t soak.XXXXXX.log)}"

bash scripts/start-postgres.sh
echo "==> building the faults tests (release)"
cargo test --release --test faults --no-run
echo "==> $cases cases of bytes::every_record_of_any_bytes_is_counted_once_and_the_valid_ones_fold"
started=$(date +%s)
set +e
PROPTEST_CASES="$cases" cargo test --release --test faults -- bytes --nocapture --test-threads 1 2>&1 \
    | tee "$log" | grep --line-buffered -oE 'bytes: [0-9a].*'
status=${PIPESTATUS[0]}
set -e
elapsed=$(($(date +%s) - started))

if [ "$status" -ne 0 ]; then
    grep -E -A60 '^Test failed|panicked at' "$log" | head -120 >&2 || true
    echo "soak: FAILED after ${elapsed}s (whole output in $log)" >&2
    if [ -f "$regressions" ]; then
        echo "soak: the failing seed is saved in $regressions, replayed first by every later run:" >&2
        grep -E '^cc ' "$regressions" | tail -1 >&2
    fi
    exit 1
fi
echo "soak: $cases cases passed in ${elapsed}s (whole output in $log)"
