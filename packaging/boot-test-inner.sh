#!/bin/bash
# Runs inside the container booted by packaging/boot-test.sh, as a oneshot
# unit, with systemd as PID 1. Drives cobbyd.service through systemctl and
# writes PASS/FAIL lines to /root/boot-test.log and "ok" or "N failed" to
# /root/boot-test.result.
set -uo pipefail
exec > >(tee /root/boot-test.log) 2>&1

fails=0
pass() { echo "PASS: $*"; }
fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}
check() {
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}
section() { printf '\n--- %s\n' "$*"; }
prop() { systemctl show -P "$1" cobbyd.service; }
mode_is() { [[ $(stat -c '%a %U %G' "$1" 2>/dev/null) == "$2" ]]; }
journal() { journalctl -u cobbyd.service --no-pager -o short-monotonic -n 40 | sed 's/^/    | /'; }

CONF=/etc/cobbyd/cobbyd.toml

section "dpkg -i with systemd running"
check "dpkg -i succeeds" dpkg -i /root/cobbyd.deb
check "the unit is enabled" test "$(systemctl is-enabled cobbyd.service)" = enabled
check "installation did not start the unit" test "$(systemctl is-active cobbyd.service)" = inactive
check "systemd knows the unit file (daemon-reload ran)" test "$(prop LoadState)" = loaded

section "systemctl start"
check "systemctl start cobbyd succeeds (READY=1 within the start timeout)" \
    timeout 120 systemctl start cobbyd.service
check "the unit is active (running)" test "$(prop SubState)" = running
pid=$(prop MainPID)
echo "    MainPID=$pid StatusText=$(prop StatusText)"
check "the daemon runs as user cobbyd" test "$(stat -c %U "/proc/$pid")" = cobbyd
check "/run/cobbyd/cobbyd.sock is 660 cobbyd cobbyd" mode_is /run/cobbyd/cobbyd.sock "660 cobbyd cobbyd"
check "/run/cobbyd is 750 cobbyd cobbyd" mode_is /run/cobbyd "750 cobbyd cobbyd"
check "/var/lib/cobbyd is 700 cobbyd cobbyd" mode_is /var/lib/cobbyd "700 cobbyd cobbyd"
echo "    files the daemon made in its state directory (UMask=0077: none group/other-accessible):"
find /var/lib/cobbyd -printf '    %m %u:%g %p\n'
check "nothing in /var/lib/cobbyd is group/other-accessible" \
    test -z "$(find /var/lib/cobbyd -perm /077 ! -path /var/lib/cobbyd)"
rc=0
cobbyd status || rc=$?
check "cobbyd status answers (exit $rc is 0 or 1)" test "$rc" = 0 -o "$rc" = 1
journal

section "a shop, a sync, and the journal's structured fields"
# The built-in simulator plays the shop on loopback; the daemon (sandboxed
# by the unit) probes and syncs it; the journal must carry SHOP=/RUN= fields
# and none of the credentials.
mkdir -p /root/sim
cobbyd simulate --products 300 --port 18080 --control-port 18081 --credentials-dir /root/sim >/root/sim/log 2>&1 &
sim_pid=$!
for _ in $(seq 1 50); do [[ -s /root/sim/m2-oauth.toml ]] && break; sleep 0.2; done
check "cobbyd shop add (through the unit's socket) succeeds" \
    cobbyd shop add acme --platform magento2 --url http://127.0.0.1:18080 --allow-insecure-http --credentials-file /root/sim/m2-oauth.toml
check "cobbyd sync acme --wait succeeds" timeout 120 cobbyd sync acme --wait
check "cobbyd status exits 0 with a healthy, synced shop" cobbyd status
check "journalctl SHOP=acme finds the shop's lines" \
    bash -c "journalctl -u cobbyd.service --no-pager SHOP=acme | grep -q 'shop added'"
check "journalctl SHOP=acme finds the sync's end line" \
    bash -c "journalctl -u cobbyd.service --no-pager SHOP=acme | grep -q 'sync ok'"
check "the sync's end line carries RUN= and OUTCOME= fields" \
    bash -c "journalctl -u cobbyd.service --no-pager -o json SHOP=acme | grep '\"OUTCOME\":\"ok\"' | grep -q '\"RUN\":'"
leaked=0
while IFS= read -r line; do
    value=${line#*= \"}
    value=${value%\"}
    if journalctl -u cobbyd.service --no-pager -o json | grep -qF -- "$value"; then leaked=1; fi
done < <(grep -E '^(consumer_key|consumer_secret|access_token|access_token_secret) = ' /root/sim/m2-oauth.toml)
check "no credential value in the journal" test "$leaked" = 0
# Removed before its shop goes away, so no failing probe warns below.
check "cobbyd shop remove acme --purge succeeds" cobbyd shop remove acme --purge
kill "$sim_pid" 2>/dev/null
wait "$sim_pid" 2>/dev/null

section "systemctl reload (check-config, then SIGHUP)"
check "systemctl reload cobbyd succeeds" timeout 60 systemctl reload cobbyd.service
sleep 1
check "still running after reload" test "$(prop SubState)" = running
check "same main process after reload" test "$(prop MainPID)" = "$pid"

section "watchdog (WatchdogSec=30s): still the same process after 40 s"
sleep 40
check "still running, same process, never restarted" \
    test "$(prop SubState)/$(prop MainPID)/$(prop NRestarts)" = "running/$pid/0"

section "systemctl stop"
check "systemctl stop cobbyd succeeds" timeout 90 systemctl stop cobbyd.service
check "the daemon exited 0 (Result=success, status $(prop ExecMainStatus))" \
    test "$(prop Result)/$(prop ExecMainStatus)" = success/0
check "/run/cobbyd was removed by systemd" test ! -e /run/cobbyd
journal
# A sandbox that denies something the daemon needs shows up as a warning or
# an error (a denied system call fails with EPERM, see the unit).
# The one expected warning: the simulated shop speaks plain http (added with
# --allow-insecure-http), which the daemon flags as it should.
warnings=$(journalctl -u cobbyd.service --no-pager -q -p warning |
    grep -v 'plain http, credentials cross the network unencrypted' || true)
[[ -z $warnings ]] || printf '%s\n' "$warnings" | sed 's/^/    ! /'
check "no warning or error in the daemon's journal so far" test -z "$warnings"
check "the plain-http shop was flagged in the journal" \
    bash -c "journalctl -u cobbyd.service --no-pager -q -p warning | grep -q 'plain http'"


section "a broken config: start fails fast with file: key: problem, and is not retried forever"
cp "$CONF" /root/cobbyd.toml.good
printf '\n[no_such_section]\nno_such_key = 1\n' >>"$CONF"
check "systemctl start with a broken config fails" bash -c '! timeout 60 systemctl start cobbyd.service'
sleep 1
journal
check "the journal names the config file" bash -c "journalctl -u cobbyd.service --no-pager | grep -q '$CONF'"
echo "    ActiveState=$(prop ActiveState) SubState=$(prop SubState) Result=$(prop Result)"
# RestartPreventExitStatus=78 does not cover ExecStartPre=: it restarts every
# RestartSec=5s until StartLimitBurst=5 (in 120 s) stops it. Wait for that.
for _ in $(seq 1 40); do
    [[ $(prop ActiveState) == failed ]] && break
    sleep 1
done
check "after a few tries the unit gives up: failed ($(prop Result), $(prop NRestarts) restarts)" \
    test "$(prop ActiveState)" = failed
cp /root/cobbyd.toml.good "$CONF"
systemctl reset-failed cobbyd.service

section "dpkg -r stops a running daemon (prerm)"
check "systemctl start cobbyd succeeds again" timeout 120 systemctl start cobbyd.service
pid=$(prop MainPID)
check "dpkg -r succeeds" dpkg -r cobbyd
check "the daemon (pid $pid) is stopped" bash -c "! kill -0 $pid 2>/dev/null"
check "the unit is not active" test "$(systemctl is-active cobbyd.service)" != active
check "dpkg -P succeeds" dpkg -P cobbyd
check "/var/lib/cobbyd is gone" test ! -e /var/lib/cobbyd

echo
if ((fails)); then
    echo "$fails failed" >/root/boot-test.result
else
    echo ok >/root/boot-test.result
fi
echo "boot-test (inside): $(cat /root/boot-test.result)"
