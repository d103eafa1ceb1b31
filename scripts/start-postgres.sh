#!/usr/bin/env bash
# Starts the local PostgreSQL when nothing answers at 127.0.0.1:5432 (the tests create and drop a
# database each on that server), and waits up to 30 s for it. Does nothing when
# PROJECTOR_TEST_DATABASE_URL names another server. Used by scripts/test.sh and scripts/soak.sh.
set -euo pipefail

[ -z "${PROJECTOR_TEST_DATABASE_URL:-}" ] || exit 0
echo "==> checking PostgreSQL at 127.0.0.1:5432"
pg_isready -q -h 127.0.0.1 -p 5432 && exit 0
for version in $(ls /etc/postgresql 2>/dev/null); do
    echo "==> starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
done
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && exit 0
    sleep 1
done
pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not running at 127.0.0.1:5432" >&2; exit 1; }
