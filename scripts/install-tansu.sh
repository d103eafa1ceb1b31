#!/usr/bin/env bash
# Installs the Tansu broker (a Kafka-compatible broker) used by the end-to-end tests, unless a
# `tansu` binary is already on PATH or in ~/.cargo/bin. The tests start their own brokers.
#
#   scripts/install-tansu.sh          # install if missing, print the binary's path
#   TANSU_VERSION=0.6.0 scripts/install-tansu.sh
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

find_tansu() {
    if command -v tansu >/dev/null 2>&1; then
        command -v tansu
    elif [ -x "$CARGO_BIN/tansu" ]; then
        echo "$CARGO_BIN/tansu"
    elif [ -x "$HOME/.cargo/bin/tansu" ]; then
        echo "$HOME/.cargo/bin/tansu"
    else
        return 1
    fi
}

if existing="$(find_tansu)"; then
    echo "install-tansu: found $existing ($("$existing" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

echo "install-tansu: tansu not found; installing tansu $TANSU_VERSION with cargo (this takes several minutes)"
# Building tansu needs a C toolchain.
missing=()
for tool in cc make pkg-config; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "install-tansu: installing build tools for: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq build-essential pkg-config >/dev/null
fi

cargo install tansu --version "$TANSU_VERSION" --features dynostore,libsql,postgres --locked

installed="$(find_tansu)" || { echo "install-tansu: cargo install finished but no tansu binary was found" >&2; exit 1; }
echo "install-tansu: installed $installed"
