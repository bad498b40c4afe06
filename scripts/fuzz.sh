#!/usr/bin/env bash
# Runs every fuzz target (tests/fuzz_core.rs, halo-train/tests/fuzz_train.rs; harness in
# tests/fuzz_support) and prints their counts as one table, with a total row, followed by every
# failure line (seed and what went wrong). Exits non-zero when a target failed (a panic, an abort,
# a non-finite output or a wrong answer; known bugs too under HALO_FUZZ_STRICT=1).
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default: HALO_FUZZ_SECONDS, else 4)
#   HALO_FUZZ_SEED=<n>    another stream of inputs (default 0)
#   HALO_FUZZ_STRICT=1    known bugs owned elsewhere fail too
# A failure is reproduced with the seed it prints:
#   HALO_FUZZ_REPRO=<seed> cargo test --release --test fuzz_core <target> -- --exact --nocapture
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HALO_FUZZ_SECONDS="${1:-${HALO_FUZZ_SECONDS:-4}}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release -p halo-kernels --test fuzz_core -- --nocapture >>"$log" 2>&1 || status=1
cargo test --release -p halo-train --test fuzz_train -- --nocapture >>"$log" 2>&1 || status=1

# Rows: `fuzz-count NAME tried=.. accepted=.. errors=.. panics=.. aborts=.. non_finite=.. wrong=.. known=.. seconds=..`
grep '^fuzz-count ' "$log" | sort -k2 | awk '
    BEGIN {
        split("tried accepted errors panics aborts non_finite wrong known", keys, " ")
        printf "| %-28s | %9s | %9s | %9s | %6s | %6s | %10s | %5s | %5s |\n", "target", "inputs", "accepted", "errors", "panics", "aborts", "non-finite", "wrong", "known"
        printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "------------------------------", "-----------", "-----------", "-----------", "--------", "--------", "------------", "-------", "-------"
    }
    {
        for (i = 3; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "| %-28s | %9d | %9d | %9d | %6d | %6d | %10d | %5d | %5d |\n", $2, v["tried"], v["accepted"], v["errors"], v["panics"], v["aborts"], v["non_finite"], v["wrong"], v["known"]
        for (k in keys) total[keys[k]] += v[keys[k]]
        n++
    }
    END {
        printf "| %-28s | %9d | %9d | %9d | %6d | %6d | %10d | %5d | %5d |\n", "total (" n " targets)", total["tried"], total["accepted"], total["errors"], total["panics"], total["aborts"], total["non_finite"], total["wrong"], total["known"]
    }'
echo
grep '^fuzz-failure ' "$log" | cut -c1-400
expected=18
rows="$(grep -c '^fuzz-count ' "$log")"
if [ "$rows" -ne "$expected" ]; then
    echo "fuzz.sh: $rows of $expected targets reported (a build or harness failure?):" >&2
    grep -E '^error|panicked' "$log" | head -20 >&2
    status=1
fi
exit "$status"
