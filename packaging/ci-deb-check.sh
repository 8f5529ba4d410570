#!/usr/bin/env bash
# Installs the cobbyd .deb on this machine, checks what it installed, runs the
# installed daemon briefly the way the unit would, then removes and purges the
# package, checking each stage. Every check prints PASS or FAIL; any FAIL makes
# the script exit 1 (after the package has been purged again).
#
# Usage (as root): packaging/ci-deb-check.sh path/to/cobbyd_*.deb
#
# It installs and purges the package `cobbyd` for real: on a machine where
# cobbyd is already installed it refuses to run, unless CI=true (a leftover of
# an earlier CI run, which it purges first).
#
# Works without systemd as PID 1 (containers, CI): the unit is checked with
# `systemd-analyze verify` on the installed file (so ExecStart= binaries and
# the man page in Documentation= are the real installed ones), enablement by
# the wants symlink, and the daemon is started by hand as the unit would start
# it (user cobbyd, umask 077, /run/cobbyd and /var/lib/cobbyd as systemd
# creates them).
set -euo pipefail

deb=${1:?usage: $0 path/to/cobbyd.deb}
deb=$(readlink -f "$deb")

UNIT_FILE=/lib/systemd/system/cobbyd.service
WANTS_LINK=/etc/systemd/system/multi-user.target.wants/cobbyd.service
CONF=/etc/cobbyd/cobbyd.toml
STATE=/var/lib/cobbyd
RUNDIR=/run/cobbyd
SOCK=$RUNDIR/cobbyd.sock
# Exposure score of `systemd-analyze security`, times 10: fail above 2.0
# (the unit scores 1.4 "OK" with systemd 252; see packaging/README.md).
SECURITY_THRESHOLD=20

fails=0
pass() { echo "PASS: $*"; }
fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}
# check DESCRIPTION COMMAND...: PASS if the command succeeds.
check() {
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}
section() { printf '\n--- %s\n' "$*"; }

# mode_is PATH MODE OWNER GROUP
mode_is() {
    local got
    got=$(stat -c '%a %U %G' "$1" 2>/dev/null) || {
        echo "    $1: missing"
        return 1
    }
    [[ $got == "$2 $3 $4" ]] || {
        echo "    $1: $got, want $2 $3 $4"
        return 1
    }
}
pkg_state() { dpkg-query -W -f '${db:Status-Abbrev}' cobbyd 2>/dev/null | tr -d ' ' || true; }

daemon_pid=
cleanup() {
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -KILL "$daemon_pid" 2>/dev/null || true
    fi
    if [[ -n $(pkg_state) ]]; then
        echo "ci-deb-check: purging cobbyd after an early exit"
        dpkg -P cobbyd >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

if [[ $(id -u) != 0 ]]; then
    echo "ci-deb-check: must run as root (it installs the package)" >&2
    exit 2
fi
if [[ -n $(pkg_state) ]]; then
    if [[ ${CI:-} == true ]]; then
        echo "ci-deb-check: cobbyd is installed ($(pkg_state)): leftover, purging it first"
        dpkg -P cobbyd
    else
        echo "ci-deb-check: cobbyd is already installed here; this script installs and" >&2
        echo "purges it (with its state). Run 'dpkg -P cobbyd' first, or set CI=true." >&2
        exit 2
    fi
fi

section "package: $deb"
dpkg-deb -I "$deb"
dpkg-deb -c "$deb"
deb_version=$(dpkg-deb -f "$deb" Version)
check "package name is cobbyd" test "$(dpkg-deb -f "$deb" Package)" = cobbyd
check "package has maintainer scripts postinst prerm postrm" \
    bash -c "dpkg-deb --ctrl-tarfile '$deb' | tar -t | grep -qx './postinst' &&
             dpkg-deb --ctrl-tarfile '$deb' | tar -t | grep -qx './prerm' &&
             dpkg-deb --ctrl-tarfile '$deb' | tar -t | grep -qx './postrm'"

section "dpkg -i"
check "dpkg -i succeeds" dpkg -i "$deb"
check "dpkg says installed (ii)" test "$(pkg_state)" = ii
check "installed version is $deb_version" \
    test "$(dpkg-query -W -f '${Version}' cobbyd)" = "$deb_version"

section "system account"
check "group cobbyd exists" getent group cobbyd
check "user cobbyd exists" getent passwd cobbyd
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd cobbyd || echo "::::::")
check "user cobbyd is a system account (uid $uid < 1000)" test "${uid:-1000}" -lt 1000
check "user cobbyd's primary group is cobbyd" \
    test "$gid" = "$(getent group cobbyd | cut -d: -f3)"
check "user cobbyd's home is $STATE" test "$home" = "$STATE"
check "user cobbyd cannot log in (shell $shell)" test "$shell" = /usr/sbin/nologin

section "installed files"
check "/usr/bin/cobbyd --version works" /usr/bin/cobbyd --version
check "--version names the package version ${deb_version%-*}" \
    bash -c "/usr/bin/cobbyd --version | grep -qF -- '${deb_version%-*}'"
check "$CONF is a conffile" grep -qx "$CONF" /var/lib/dpkg/info/cobbyd.conffiles
check "/usr/bin/cobbyd is 755 root:root" mode_is /usr/bin/cobbyd 755 root root
check "$UNIT_FILE is 644 root:root" mode_is "$UNIT_FILE" 644 root root
check "$CONF is 640 root:cobbyd" mode_is "$CONF" 640 root cobbyd
check "$CONF mode is a dpkg-statoverride" dpkg-statoverride --list "$CONF"
for f in /usr/share/man/man1/cobbyd.1.gz \
    /usr/share/bash-completion/completions/cobbyd \
    /usr/share/zsh/vendor-completions/_cobbyd \
    /usr/share/fish/vendor_completions.d/cobbyd.fish \
    /usr/share/doc/cobbyd/README.md \
    /usr/share/doc/cobbyd/copyright; do
    check "$f is 644 root:root" mode_is "$f" 644 root root
done
check "man finds cobbyd(1)" man -w cobbyd
check "the installed man page is valid gzip" gzip -t /usr/share/man/man1/cobbyd.1.gz

section "systemd unit"
check "enable symlink $WANTS_LINK -> $UNIT_FILE" \
    test "$(readlink "$WANTS_LINK")" = "$UNIT_FILE"
if is_enabled=$(systemctl is-enabled cobbyd.service 2>&1); then
    check "systemctl is-enabled cobbyd: $is_enabled" test "$is_enabled" = enabled
else
    echo "    (systemctl is-enabled cannot tell here: $is_enabled; the symlink check stands)"
fi
if [[ -d /run/systemd/system ]]; then
    check "installation did not start the unit" bash -c '! systemctl --quiet is-active cobbyd.service'
else
    echo "    (systemd is not PID 1 here: nothing can have started the unit)"
fi
if verify_out=$(systemd-analyze verify "$UNIT_FILE" 2>&1); then
    verify_rc=0
else
    verify_rc=$?
fi
[[ -z $verify_out ]] || printf '%s\n' "$verify_out" | sed 's/^/    /'
check "systemd-analyze verify $UNIT_FILE exits 0" test "$verify_rc" = 0
check "systemd-analyze verify says nothing about cobbyd" \
    bash -c "! grep -qi cobbyd <<<\"\$1\"" _ "$verify_out"
security_out=$(systemd-analyze security --offline=yes --threshold=$SECURITY_THRESHOLD "$UNIT_FILE" 2>&1) &&
    security_rc=0 || security_rc=$?
printf '%s\n' "$security_out" | grep -E '✗|Overall exposure' | sed 's/^/    /'
check "systemd-analyze security: exposure at most $((SECURITY_THRESHOLD / 10)).$((SECURITY_THRESHOLD % 10))" \
    test "$security_rc" = 0

section "config check, as root and as the daemon's user (like ExecStartPre=)"
check "cobbyd check-config --config $CONF exits 0 (root)" \
    /usr/bin/cobbyd check-config --config "$CONF"
check "cobbyd check-config --config $CONF exits 0 (user cobbyd)" \
    runuser -u cobbyd -- /usr/bin/cobbyd check-config --config "$CONF"

section "the installed daemon, started as the unit starts it"
# What systemd does for StateDirectory=/RuntimeDirectory=/User=/UMask=.
install -d -m 0700 -o cobbyd -g cobbyd "$STATE"
install -d -m 0750 -o cobbyd -g cobbyd "$RUNDIR"
log=$(mktemp)
# setpriv execs the daemon itself (runuser would stay in between as the
# parent and eat the signals); a clean environment, as systemd gives.
(
    umask 0077
    cd /
    exec env -i HOME="$STATE" USER=cobbyd LOGNAME=cobbyd SHELL=/usr/sbin/nologin \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        setpriv --reuid=cobbyd --regid=cobbyd --init-groups --inh-caps=-all \
        /usr/bin/cobbyd run --config "$CONF"
) >"$log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 100); do
    [[ -S $SOCK ]] && break
    kill -0 "$daemon_pid" 2>/dev/null || break
    sleep 0.1
done
check "the daemon creates its socket $SOCK" test -S "$SOCK"
check "the socket is 660 cobbyd:cobbyd" mode_is "$SOCK" 660 cobbyd cobbyd
check "$STATE stays 700 cobbyd:cobbyd" mode_is "$STATE" 700 cobbyd cobbyd
cobbyd_gid=$(getent group cobbyd | cut -d: -f3)
status_rc=0
setpriv --reuid=65534 --regid=65534 --groups="$cobbyd_gid" --inh-caps=-all \
    /usr/bin/cobbyd status --config "$CONF" || status_rc=$?
check "a member of group cobbyd gets an answer from cobbyd status (exit $status_rc is 0 or 1)" \
    test "$status_rc" = 0 -o "$status_rc" = 1
status_rc=0
setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all \
    /usr/bin/cobbyd status --socket "$SOCK" >/dev/null 2>&1 || status_rc=$?
check "a non-member is refused by cobbyd status (exit $status_rc is neither 0 nor 1)" \
    test "$status_rc" != 0 -a "$status_rc" != 1
if kill -0 "$daemon_pid" 2>/dev/null; then
    kill -HUP "$daemon_pid"
    sleep 1
    check "the daemon survives SIGHUP (reload)" kill -0 "$daemon_pid"
    kill -TERM "$daemon_pid"
fi
daemon_rc=0
# 45 s: TimeoutStopSec= of the unit.
timeout 45 tail --pid="$daemon_pid" -f /dev/null || true
wait "$daemon_pid" || daemon_rc=$?
daemon_pid=
check "the daemon exits 0 on SIGTERM" test "$daemon_rc" = 0
echo "    daemon output:"
sed 's/^/    | /' "$log"
rm -f "$log"
rm -rf "$RUNDIR" # as systemd does when the unit stops

section "reinstall (the upgrade path of postinst)"
check "dpkg -i again succeeds" dpkg -i "$deb"
check "still one statoverride, 640 root:cobbyd" mode_is "$CONF" 640 root cobbyd
check "the unit is still enabled" test "$(readlink "$WANTS_LINK")" = "$UNIT_FILE"
check "an admin's systemctl disable works" systemctl disable cobbyd.service
check "dpkg -i again succeeds" dpkg -i "$deb"
check "an upgrade keeps the unit disabled" test ! -e "$WANTS_LINK"
check "systemctl enable works again" systemctl enable cobbyd.service

section "dpkg -r (remove: configuration and state are kept)"
check "dpkg -r cobbyd succeeds" dpkg -r cobbyd
check "dpkg says removed, config files kept (rc)" test "$(pkg_state)" = rc
check "/usr/bin/cobbyd is gone" test ! -e /usr/bin/cobbyd
check "$UNIT_FILE is gone" test ! -e "$UNIT_FILE"
check "$CONF is kept" test -f "$CONF"
check "$STATE is kept" test -d "$STATE"
check "user cobbyd is kept" getent passwd cobbyd
check "the unit is masked while removed (as debhelper does)" \
    test "$(readlink /etc/systemd/system/cobbyd.service)" = /dev/null

section "dpkg -i after remove, then remove again"
check "dpkg -i succeeds" dpkg -i "$deb"
check "the mask is gone" test ! -e /etc/systemd/system/cobbyd.service
check "the unit is enabled again" test "$(readlink "$WANTS_LINK")" = "$UNIT_FILE"
check "the kept config is still 640 root:cobbyd" mode_is "$CONF" 640 root cobbyd
check "dpkg -r cobbyd succeeds" dpkg -r cobbyd

section "dpkg -P (purge: configuration and state are gone)"
check "dpkg -P cobbyd succeeds" dpkg -P cobbyd
check "dpkg no longer knows cobbyd" test -z "$(pkg_state)"
check "$CONF is gone" test ! -e "$CONF"
check "/etc/cobbyd is gone" test ! -e /etc/cobbyd
check "$STATE is gone" test ! -e "$STATE"
check "the enable symlink is gone" test ! -L "$WANTS_LINK"
check "no mask left behind" test ! -L /etc/systemd/system/cobbyd.service
check "the statoverride is gone" bash -c "! dpkg-statoverride --list '$CONF'"
check "user cobbyd is kept on purge (by design: packaging/README.md)" getent passwd cobbyd

echo
if ((fails > 0)); then
    echo "ci-deb-check: $fails check(s) FAILED"
    exit 1
fi
echo "ci-deb-check: all checks passed"
