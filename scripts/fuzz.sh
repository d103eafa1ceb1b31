#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/): `definition` (the definition loader on any text) and
# `decode` (a whole record, key, value or tombstone, and headers with names as bytes, through
# everything it meets before SQL: decoding by the example projections, parking keys and messages
# as stored, the Kafka key's text, header look-up, the parked view, value binding; each with its
# invariants checked), each for SECONDS (default 30), and fails on any crash or broken invariant.
# CI runs it briefly; by hand, run it longer:
#
#   scripts/fuzz.sh 600                       # ten minutes per target
#   scripts/fuzz.sh 60 decode                 # one target
#
# Needs cargo-fuzz (installed here when missing) and a nightly toolchain for libFuzzer's
# sanitizer flags; without one, the targets run on stable with RUSTC_BOOTSTRAP=1 and no sanitizer.
# Crashes are written to fuzz/artifacts/<target>/; the corpus grows in $FUZZ_CORPUS_DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${1:-30}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(definition decode)

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
    sanitizer=address
else
    echo "fuzz: no nightly toolchain; running on stable with RUSTC_BOOTSTRAP=1 and no sanitizer"
    toolchain=()
    sanitizer=none
    export RUSTC_BOOTSTRAP=1
fi
# Build outputs and the growing corpus live beside the build's target folder: outside the clone
# when that is (CI's cache), else in `target/fuzz`. Absolute, as the targets run from fuzz/.
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    fuzz_target="$FUZZ_TARGET_DIR"
elif [ -n "${CARGO_TARGET_DIR:-}" ]; then
    fuzz_target="$CARGO_TARGET_DIR/../fuzz-target"
else
    fuzz_target=target/fuzz
fi
export CARGO_TARGET_DIR
CARGO_TARGET_DIR="$(realpath -m "$fuzz_target")"
corpus_root="$(realpath -m "${FUZZ_CORPUS_DIR:-$CARGO_TARGET_DIR/corpus}")"

# Seeds: every definition in the repository, good and bad.
seeds="$corpus_root/seeds-definition"
mkdir -p "$seeds"
cp projections/*.toml tests/fixtures/definitions/*/*.toml "$seeds/" 2>/dev/null || true

cd fuzz
for target in "${targets[@]}"; do
    corpus="$corpus_root/$target"
    mkdir -p "$corpus"
    extra=()
    [ "$target" = definition ] && extra+=("$seeds")
    dict=()
    [ -f "$target.dict" ] && dict+=("-dict=$target.dict")
    echo "fuzz: $target for ${seconds}s (corpus $corpus)"
    log="$corpus_root/$target.log"
    status=0
    cargo "${toolchain[@]}" fuzz run --sanitizer "$sanitizer" -O "$target" "$corpus" "${extra[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 "${dict[@]}" \
        >"$log" 2>&1 || status=$?
    grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked|ERROR" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz: $target FAILED (exit $status); crashing inputs in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz: no crash"
