#!/usr/bin/env bash
# Builds the cobbyd .deb: release binary, generated assets (man page and
# completions), then cargo-deb. Prints the path of the .deb on the last line.
#
# Usage: packaging/build-deb.sh [--no-build]
#   --no-build  reuse the release binary already built (CI builds it once).
# Needs cargo-deb: cargo install cargo-deb --version 3.8.0 --locked
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [[ ${1:-} != --no-build ]]; then
    cargo build --release --locked
fi

target_dir=$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
target_dir=${target_dir:-$root/target}

packaging/gen-assets.sh "$target_dir/release/cobbyd" >&2
# cargo-deb prints the path of the .deb it wrote on stdout.
# zlib: Rust's backtraces read zlib-compressed debug sections (not zstd ones).
cargo deb --no-build --locked --compress-debug-symbols=zlib
