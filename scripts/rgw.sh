#!/usr/bin/env bash
# A throw-away Ceph radosgw for the Object Lock tests: moto accepts a shortened COMPLIANCE lock,
# radosgw refuses it like AWS does. One monitor, one OSD on memstore (RAM, nothing on disk but
# logs), no manager, radosgw (beast) on 127.0.0.1:PORT, all under DIR. Debian bookworm packages
# (Ceph 16.2): ceph-mon ceph-osd radosgw ceph-common, installed by scripts/setup.sh.
#
#   scripts/rgw.sh DIR PORT
#
# Runs in the foreground: writes DIR/ready (ENDPOINT=...) once radosgw answers and an S3 user
# with RGW_ACCESS_KEY / RGW_SECRET_KEY exists; on SIGTERM or SIGINT stops the daemons and
# exits 0; exits 1 if a daemon dies. Each daemon also gets SIGTERM if this script dies
# (setpriv --pdeathsig), so nothing outlives it. Start-up takes 1-4 s. Logs in DIR/log.
#
# Known radosgw (16.2) behaviour: If-None-Match: * is not enforced on versioned buckets, and
# lock headers on CreateMultipartUpload are ignored (the object is stored unlocked).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 DIR PORT" >&2; exit 2; }
DIR=$(mkdir -p "$1" && cd "$1" && pwd)
PORT=$2
ACCESS_KEY=${RGW_ACCESS_KEY:-aitbc-rgw-access}
SECRET_KEY=${RGW_SECRET_KEY:-aitbc-rgw-secret}

log() { printf '[rgw %s] %s\n' "$(date +%T)" "$*" >&2; }
for tool in ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool; do
  command -v "$tool" >/dev/null || { log "$tool is missing: run scripts/setup.sh"; exit 1; }
done

# A port the kernel hands out for the monitor (bound and released).
MON_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
FSID=$(cat /proc/sys/kernel/random/uuid)
CONF=$DIR/ceph.conf
rm -rf "${DIR:?}"/{mon,osd,rgw,run,log,ready}
mkdir -p "$DIR"/{mon,osd/0,rgw,run,log}

# Single-node settings: one copy of everything, no authentication between daemons (the S3 user
# still signs its requests), small placement groups. `ms mon client mode = crc`: without it the
# clients try secure mode with a monitor that has no keys and hang. The short paxos intervals
# make pool and user creation take milliseconds, not seconds. `mon data avail crit = 0`: the
# monitor otherwise refuses to start on a disk less than 1 % free (its data here is a few MB).
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MON_PORT
mon initial members = a
public addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind msgr1 = false
ms mon client mode = crc
auth cluster required = none
auth service required = none
auth client required = none
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 0
mon data avail crit = 0
[mon]
mon data = $DIR/mon/\$id
paxos propose interval = 0.05
paxos min wait = 0.01
[osd]
osd data = $DIR/osd/\$id
osd objectstore = memstore
memstore device bytes = ${RGW_MEMSTORE_BYTES:-2147483648}
osd op num shards = 1
osd op num threads per shard = 2
osd max object name len = 460
osd max object namespace len = 64
[client]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $DIR/rgw
rgw dynamic resharding = false
rgw enable usage log = false
EOF
CEPH=(ceph -c "$CONF" --connect-timeout 3)

PIDS=()
declare -A NAME_OF
stop() {  # newest first: radosgw, OSD, monitor
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
fail() {  # the newest lines of every log go to stderr: DIR is usually gone when anyone looks
  log "$*"
  tail -n 5 "$DIR"/log/* >&2 || true
  stop
  exit 1
}
trap 'stop; log stopped; exit 0' TERM INT
run() {  # NAME CMD...: a daemon in the background, killed if this script dies
  setpriv --pdeathsig=TERM -- "$@" -f >"$DIR/log/$1.out" 2>&1 &
  PIDS+=($!)
  NAME_OF[$!]=$1
}
alive() {  # fails the run if a daemon has exited (an errno, e.g. 28 for a full disk)
  local pid status
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    status=0
    wait "$pid" || status=$?
    fail "${NAME_OF[$pid]} exited with status $status"
  done
}
until_true() {  # SECONDS CMD...: retries CMD every 0.2 s; gives up when a daemon dies
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    alive
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

started=$SECONDS
# mkfs wants a keyring even without authentication.
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DIR/run/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/run/monmap" >"$DIR/log/mkfs-mon.out" 2>&1 \
  || fail "monitor mkfs failed"
run ceph-mon -c "$CONF" -i a
until_true 30 "${CEPH[@]}" -s || fail "the monitor does not answer"

OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
"${CEPH[@]}" osd new "$OSD_UUID" >/dev/null || fail "osd new failed"
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/mkfs-osd.out" 2>&1 \
  || fail "OSD mkfs failed"
run ceph-osd -c "$CONF" -i 0
osd_up() { "${CEPH[@]}" osd dump | grep -q '^osd.0 up'; }
until_true 60 osd_up || fail "the OSD does not come up"

run radosgw -c "$CONF" -n client.rgw
rgw_up() { : 2>/dev/null </dev/tcp/127.0.0.1/"$PORT"; }
until_true 60 rgw_up || fail "radosgw does not answer on port $PORT"
radosgw-admin -c "$CONF" user create --uid=test --display-name=test \
  --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >"$DIR/log/user.json" 2>&1 \
  || fail "creating the S3 user failed"
echo "ENDPOINT=http://127.0.0.1:$PORT" >"$DIR/ready"
log "ready on 127.0.0.1:$PORT after $((SECONDS - started)) s"

# Supervise: a dead daemon ends the run (the test then fails on refused connections).
while :; do
  alive
  sleep 1 &
  wait $! || true
done
