#!/usr/bin/env bash
# Fuzz smoke for CI: installs cargo-fuzz when missing, builds every target,
# runs each for FUZZ_SECS seconds (default 20) from the committed seeds, and
# fails on the first crash, hang (-timeout) or leak of memory (-rss_limit_mb).
# Works on stable Rust: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags.
# A crash leaves its input in fuzz/artifacts/TARGET/; reproduce with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")"
secs="${FUZZ_SECS:-20}"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz build
for target in $(cargo fuzz list); do
    corpus="$(mktemp -d)"
    log="$(mktemp)"
    echo "fuzz: $target for ${secs}s"
    status=0
    cargo fuzz run "$target" "$corpus" "seeds/$target" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    grep -E 'DONE|stat::number_of_executed_units|stat::peak_rss_mb' "$log" || true
    rm -rf "$corpus"
    if [ "$status" != 0 ]; then
        tail -n 60 "$log" >&2
        rm -f "$log"
        echo "fuzz: $target FAILED (exit $status); the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    rm -f "$log"
done
echo "fuzz: all targets ran ${secs}s without a finding"
