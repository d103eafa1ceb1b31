#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian's `prometheus` package ships both), used by the
# observability tests: `promtool check metrics|rules` and a real Prometheus server that scrapes an
# engine. Does nothing when both are already on PATH.
#
#   scripts/install-prometheus.sh     # install if missing, print both binaries' paths
set -euo pipefail

have_both() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if ! have_both; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-prometheus: prometheus/promtool missing and no apt-get: install Prometheus (with promtool) by hand" >&2
        exit 1
    fi
    echo "install-prometheus: installing Debian's prometheus package (prometheus and promtool)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: no node exporter or web assets, only the two binaries' package.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a system-wide service where an init system runs: the tests start their own.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl stop prometheus || true
    fi
fi

have_both || { echo "install-prometheus: prometheus or promtool still missing after install" >&2; exit 1; }
echo "install-prometheus: found $(command -v prometheus) and $(command -v promtool)"
promtool --version 2>&1 | head -n 1
