# Shared by demo.sh and bench.sh: a work directory and background processes that are always
# stopped and removed at exit.
#
# PIDS are stopped with SIGTERM. PG_PIDS are PostgreSQL postmasters (start them with
# start_pg_server): SIGINT, PostgreSQL's fast shutdown; SIGTERM is its smart shutdown, which
# waits for every client to leave, so a server with a client still connected lingered after
# the run, its data directory already deleted. Whatever has not exited after STOP_SECS gets
# SIGQUIT (PostgreSQL's immediate shutdown) and then SIGKILL, with its children. Anything
# still running after that is named on stderr and fails the run.
WORK="$(mktemp -d "/tmp/aitbc-${1:-run}-XXXXXX")"
PIDS=()
PG_PIDS=()
STOP_SECS=${STOP_SECS:-15}

alive() {  # PID: running and not a zombie
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

wait_gone() {  # SECONDS PID...: true when every PID has exited within SECONDS
  local deadline=$((SECONDS + $1)) pid; shift
  while :; do
    local left=0
    for pid in "$@"; do alive "$pid" && left=1; done
    [ "$left" = 0 ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.1
  done
}

children() {  # PID: its child processes
  local stat pid
  for stat in /proc/[0-9]*/stat; do
    pid=${stat#/proc/}; pid=${pid%/stat}
    stat=$(cat "$stat" 2>/dev/null) || continue
    stat=${stat##*) }; stat=${stat#* }
    [ "${stat%% *}" = "$1" ] && echo "$pid"
  done
}

cleanup() {
  local status=$? pid all=() kids=()
  for pid in "${PG_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  all=("${PG_PIDS[@]}" "${PIDS[@]}")
  if [ "${#all[@]}" -gt 0 ] && ! wait_gone "$STOP_SECS" "${all[@]}"; then
    for pid in "${PG_PIDS[@]}"; do
      if alive "$pid"; then echo "cleanup: PostgreSQL $pid did not stop; immediate shutdown" >&2; kill -QUIT "$pid" 2>/dev/null || true; fi
    done
    wait_gone 5 "${all[@]}" || true
    for pid in "${all[@]}"; do
      if alive "$pid"; then
        mapfile -t kids < <(children "$pid")
        echo "cleanup: $pid did not stop; SIGKILL" >&2
        kill -KILL "$pid" "${kids[@]}" 2>/dev/null || true
      fi
    done
  fi
  for pid in "${all[@]}"; do wait "$pid" 2>/dev/null || true; done
  local left=()
  for pid in "${all[@]}"; do alive "$pid" && left+=("$pid"); done
  rm -rf "$WORK"
  if [ "${#left[@]}" -gt 0 ]; then
    echo "cleanup: still running after exit: ${left[*]}" >&2
    [ "$status" = 0 ] && status=1
  fi
  exit "$status"
}
trap cleanup EXIT
# An interrupt ends the script at once (the cleanup above runs on exit), even when the command
# it interrupted handled SIGINT itself and exited normally (bash would carry on).
trap 'exit 130' INT

# start_pg_server DATA_DIR PORT SOCKET_DIR LOG [postgres options...]: a postmaster in the
# background (as the postgres user under root), its pid in PG_PIDS. No function or subshell
# in between, so the pid is the postmaster's own (setpriv execs it), the one to signal.
start_pg_server() {
  local data=$1 port=$2 socket=$3 log=$4; shift 4
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid postgres --regid postgres --init-groups -- \
      /usr/lib/postgresql/15/bin/postgres -D "$data" -p "$port" -k "$socket" "$@" >"$log" 2>&1 &
  else
    /usr/lib/postgresql/15/bin/postgres -D "$data" -p "$port" -k "$socket" "$@" >"$log" 2>&1 &
  fi
  PG_PIDS+=($!)
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
