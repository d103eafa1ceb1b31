#!/usr/bin/env bash
# Checks the shape of src/ (CI runs it through scripts/test.sh; rerun it any time):
#  1. the pure modules (src/projection/, src/checkpoint.rs, src/outcome.rs) import no I/O crate:
#     no tokio, rdkafka, tokio_postgres, deadpool_postgres, postgres_protocol, hyper or reqwest,
#     and none of the modules that do I/O (store, kafka, worker, app, http, lag, rebuild, …);
#     that rule keeps them testable without a broker or a database;
#  2. every file in src/ has a `//!` line saying what it holds;
#  3. no file in src/ is over 500 lines unless a line of its opening `//!` block starts with
#     `//! Kept whole:` and gives the reason.
# Prints each violation with its file; exits 1 if there is any.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_LINES=500
IO_CRATES='tokio|rdkafka|tokio_postgres|deadpool_postgres|postgres_protocol|hyper|reqwest'
IO_MODULES='store|kafka|worker|app|http|lag|rebuild|metrics|status|parked|demo|testing|settings'
status=0
fail() { echo "shape: $*"; status=1; }

pure=(src/checkpoint.rs src/outcome.rs)
while IFS= read -r file; do pure+=("$file"); done < <(find src/projection -name '*.rs' | sort)
for file in "${pure[@]}"; do
    [ -f "$file" ] || { fail "$file: missing (a pure module the check expects)"; continue; }
    # `use tokio…`, `tokio::…` paths and `extern crate tokio` alike.
    if hits=$(grep -nE "(^|[^[:alnum:]_])(${IO_CRATES})::|^\s*(pub )?use (${IO_CRATES})\b|extern crate (${IO_CRATES})\b" "$file"); then
        while IFS= read -r hit; do fail "$file:${hit%%:*}: a pure module uses an I/O crate: ${hit#*:}"; done <<< "$hits"
    fi
    if hits=$(grep -nE "crate::(${IO_MODULES})\b" "$file"); then
        while IFS= read -r hit; do fail "$file:${hit%%:*}: a pure module uses a module that does I/O: ${hit#*:}"; done <<< "$hits"
    fi
done

rooms=0
while IFS= read -r file; do
    rooms=$((rooms + 1))
    lines=$(wc -l < "$file")
    opening=$(awk '/^\/\/!/ { print; next } { exit }' "$file")
    [ -n "$opening" ] || fail "$file: no opening \`//!\` line saying what it holds"
    if [ "$lines" -gt "$MAX_LINES" ] && ! grep -q '^//! Kept whole:' <<< "$opening"; then
        fail "$file: $lines lines (over $MAX_LINES) with no \`//! Kept whole: <reason>\` line at its top"
    fi
done < <(find src -name '*.rs' | sort)

if [ "$status" -eq 0 ]; then
    echo "shape: ok (${#pure[@]} pure modules import no I/O crate or module; $rooms files in src/, each with its //! line, none over $MAX_LINES lines without its reason)"
fi
exit "$status"
