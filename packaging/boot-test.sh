#!/usr/bin/env bash
# Boots a minimal Debian 12 under systemd-nspawn (systemd as PID 1, private
# network: only loopback), installs the cobbyd .deb in it and drives the unit
# through systemctl: the only check of the sandbox with the real daemon
# (system call filter, ProtectSystem=, ...), Type=notify (READY=1), the
# watchdog, reload, stop, and the maintainer scripts with systemd running.
#
# Usage (as root): packaging/boot-test.sh path/to/cobbyd_*.deb
#
# Needs debootstrap and systemd-nspawn (packages debootstrap,
# systemd-container) and Debian's package mirror (the apt sources' one). The
# base system is built once (about 40 s) and cached in $COBBYD_BOOT_CACHE
# (default /var/tmp/cobbyd-boot); each run boots a fresh copy of it.
#
# Exit status: 0 all checks passed; 1 a check failed; 2 the container could
# not be booted here at all (environment, not cobbyd: the caller decides).
set -euo pipefail

deb=$(readlink -f "${1:?usage: $0 path/to/cobbyd.deb}")
here=$(cd "$(dirname "$0")" && pwd)
cache=${COBBYD_BOOT_CACHE:-/var/tmp/cobbyd-boot}
base=$cache/base
run=$cache/run
machine=cobbyd-boot-test

mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}

# The base system's packages; the cache is rebuilt when this list changes.
# procps: a dependency of cobbyd (the unit's /bin/kill), missing from minbase.
include=systemd,systemd-sysv,dbus,adduser,init-system-helpers,procps
if [[ $(cat "$base/.cobbyd-boot-include" 2>/dev/null) != "$include" ]]; then
    echo "boot-test: building the base system in $base from $mirror"
    rm -rf "$base.tmp"
    mkdir -p "$cache"
    if ! debootstrap --variant=minbase --include="$include" bookworm "$base.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1; then
        tail -n 20 "$cache/debootstrap.log"
        echo "boot-test: debootstrap failed" >&2
        exit 2
    fi
    # No getty on the console: nothing waits for a login there.
    rm -f "$base.tmp"/etc/systemd/system/getty.target.wants/*
    echo "$include" >"$base.tmp/.cobbyd-boot-include"
    rm -rf "$base"
    mv "$base.tmp" "$base"
fi

rm -rf "$run"
cp -a "$base" "$run"
cp "$deb" "$run/root/cobbyd.deb"
install -m 755 "$here/boot-test-inner.sh" "$run/root/boot-test-inner.sh"
cat >"$run/etc/systemd/system/cobbyd-boot-test.service" <<'EOF'
[Unit]
Description=cobbyd boot test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/root/boot-test-inner.sh
StandardOutput=journal+console
StandardError=journal+console
ExecStopPost=/bin/systemctl --no-block poweroff
TimeoutStartSec=600
[Install]
WantedBy=multi-user.target
EOF
ln -s /etc/systemd/system/cobbyd-boot-test.service \
    "$run/etc/systemd/system/multi-user.target.wants/cobbyd-boot-test.service"

echo "boot-test: booting $run"
log=$cache/console.log
# nspawn needs a terminal to show the console: script(1) gives it one.
# --register=no --keep-unit: no machined/systemd on the host side needed.
timeout 900 script -qec "systemd-nspawn --quiet --boot --directory='$run' \
    --machine=$machine --private-network --register=no --keep-unit" /dev/null \
    </dev/null >"$log" 2>&1 || true
# The console without colours and carriage returns.
sed -e 's/\x1b\[[0-9;]*[a-zA-Z]//g' -e 's/\r$//' "$log" >"$log.txt"

result=$run/root/boot-test.result
if [[ ! -f $result ]]; then
    tail -n 40 "$log.txt"
    echo "boot-test: the test never ran in the container (no $result)" >&2
    exit 2
fi
cat "$run/root/boot-test.log"
if [[ $(cat "$result") != ok ]]; then
    echo "boot-test: FAILED ($(cat "$result"))"
    exit 1
fi
echo "boot-test: all checks passed"
rm -rf "$run"
