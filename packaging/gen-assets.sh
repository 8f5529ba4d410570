#!/usr/bin/env bash
# Generates the files the .deb ships but git does not hold, by running the
# built binary: the man page cobbyd(1) (gzipped, as Debian wants) and the bash,
# zsh and fish completions. They land in target/assets/ (relative to the repo
# root, whatever CARGO_TARGET_DIR is), where [package.metadata.deb] looks.
#
# Usage: packaging/gen-assets.sh [PATH-TO-BUILT-cobbyd]
#        (default: <cargo target dir>/release/cobbyd)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bin=${1:-}
if [[ -z $bin ]]; then
    target_dir=$(cargo metadata --no-deps --format-version 1 |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    bin=${target_dir:-$root/target}/release/cobbyd
fi
if [[ ! -x $bin ]]; then
    echo "gen-assets: no built binary at $bin (run cargo build --release first)" >&2
    exit 1
fi

out=$root/target/assets
rm -rf "$out"
mkdir -p "$out"

# Each generator must succeed and print something: an empty man page or
# completion would otherwise ship silently.
gen() {
    local dest=$1
    shift
    "$bin" "$@" >"$dest.tmp"
    if [[ ! -s $dest.tmp ]]; then
        echo "gen-assets: '$bin $*' printed nothing" >&2
        exit 1
    fi
    mv "$dest.tmp" "$dest"
}

gen "$out/cobbyd.1" manpage
# -n: no name or timestamp in the header, so the .gz is reproducible.
gzip -9 -n -c "$out/cobbyd.1" >"$out/cobbyd.1.gz"
gen "$out/cobbyd.bash" completions bash
gen "$out/_cobbyd" completions zsh
gen "$out/cobbyd.fish" completions fish

ls -l "$out"
