#!/usr/bin/env python3
"""Snapshot-set benchmark, release builds, everything on loopback: PostgreSQL 15 (pgbench scale 50
in `bench`, the simulator's mirror in `aitbc`), Redis 7, a ~1 GiB node data directory written to
by aitbc-node-sim at 50 blocks/s (mirroring every block into PostgreSQL and Redis), a coordinator
and one agent per component.

1. cut skew over N coordinated sets (PostgreSQL agent on `aitbc` only, Redis nearly empty);
2. ~1 GB put into Redis, then M fenced sets: the writers' pause;
3. a fresh repository: the wall time of one full set (all three components, ~1 GB each, from
   nothing) and of its ordered restore into a fresh PostgreSQL, a fresh Redis and a fresh
   directory (the RTO), beside the old scripts (`pg_dump -Fc | gzip`, `redis-cli --rdb | gzip`,
   `tar czf`, one after another; restore: `gunzip | pg_restore`, Redis restarted on the
   dump.rdb, `tar xzf`), in the same run.
Prints one JSON line per measurement and a summary with the issue's targets."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import du, emit, free_port, measure  # noqa: E402
from ledger import sim  # noqa: E402
from postgres import AS_POSTGRES, PG_BIN, as_postgres, psql, wait_ready  # noqa: E402
from redis import cli as redis_cli, populate, start_redis, wait_loaded  # noqa: E402

DATA_VERSION = "sets-data.v1"


def start_postgres(work, name, log_dir):
    pgdata = os.path.join(work, name)
    os.makedirs(pgdata, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", pgdata], check=True)
    if not os.path.exists(os.path.join(pgdata, "PG_VERSION")):
        as_postgres([f"{PG_BIN}/initdb", "-D", pgdata, "--auth=trust", "--username=postgres",
                     "--encoding=UTF8", "--locale=C", "--no-sync"], stdout=subprocess.DEVNULL)
    port = free_port()
    log = open(os.path.join(log_dir, f"{name}.log"), "w")
    proc = subprocess.Popen(AS_POSTGRES + [f"{PG_BIN}/postgres", "-D", pgdata, "-p", str(port), "-k", "/tmp",
                                      "-c", "listen_addresses=127.0.0.1", "-c", "max_wal_size=4GB"],
                            stdout=log, stderr=log)
    # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
    proc.stop_signal = signal.SIGINT
    wait_ready(port)
    return proc, f"postgres://postgres@127.0.0.1:{port}"


class Fleet:
    """A dev PKI, the coordinator and the three agents (restartable with other settings)."""

    def __init__(self, bin_dir, run, node, pg_url, redis_port):
        self.bin, self.run, self.node, self.pg_url, self.redis_port = bin_dir, run, node, pg_url, redis_port
        self.cli_bin = os.path.join(bin_dir, "aitbc-backup")
        subprocess.run([self.cli_bin, "certs", "init", "--dir", f"{run}/certs"], check=True,
                       stdout=subprocess.DEVNULL)
        self.port = free_port()
        self.procs = {}
        self.env = dict(os.environ, AITBC_CLI_COORDINATOR=f"https://127.0.0.1:{self.port}",
                        AITBC_CLI_CERT=f"{run}/certs/operator.pem", AITBC_CLI_KEY=f"{run}/certs/operator.key",
                        AITBC_CLI_CA=f"{run}/certs/ca.pem")

    def tls(self, stem):
        c = f"{self.run}/certs"
        return dict(AITBC_BACKUP_TLS__CERT=f"{c}/{stem}.pem", AITBC_BACKUP_TLS__KEY=f"{c}/{stem}.key",
                    AITBC_BACKUP_TLS__CA=f"{c}/ca.pem", AITBC_BACKUP_LOG__LEVEL="warn")

    def start(self, repo, pg_databases):
        self.stop()
        subprocess.run([self.cli_bin, "repo", "--repository", f"file://{repo}", "init"], check=True,
                       stdout=subprocess.DEVNULL)
        env = dict(os.environ, **self.tls("coordinator"),
                   AITBC_BACKUP_SERVER__GRPC_LISTEN=f"127.0.0.1:{self.port}",
                   AITBC_BACKUP_SERVER__HTTP_LISTEN=f"127.0.0.1:{free_port()}",
                   AITBC_BACKUP_SCHEDULE__ENABLED="false",
                   AITBC_BACKUP_REPOSITORY__URL=f"file://{repo}")
        self.procs["coordinator"] = subprocess.Popen([os.path.join(self.bin, "aitbc-backup-coordinator")], env=env,
                                                     stderr=open(f"{self.run}/coordinator.log", "a"))
        for component in ("postgres", "redis", "ledger"):
            env = dict(os.environ, **self.tls(f"agent-{component}"), AITBC_BACKUP_COMPONENT=component,
                       AITBC_BACKUP_COORDINATOR__URL=f"https://127.0.0.1:{self.port}",
                       AITBC_BACKUP_HTTP__LISTEN=f"127.0.0.1:{free_port()}",
                       AITBC_BACKUP_REPOSITORY__URL=f"file://{repo}",
                       AITBC_BACKUP_POSTGRES__URL=f"{self.pg_url}/postgres",
                       AITBC_BACKUP_POSTGRES__DATABASES=json.dumps(pg_databases),
                       AITBC_BACKUP_POSTGRES__FENCE_TABLES='["aitbc.public.chain_blocks"]',
                       AITBC_BACKUP_POSTGRES__SCRATCH_DIR=f"{self.run}/scratch-pg",
                       AITBC_BACKUP_REDIS__ADDRESS=f"127.0.0.1:{self.redis_port}",
                       AITBC_BACKUP_LEDGER__DATA_DIR=self.node,
                       AITBC_BACKUP_LEDGER__SCRATCH_DIR=f"{self.run}/scratch-ledger")
            if component == "redis":
                env["COMPRESSION_LEVEL"] = "1"  # RDB values are LZF-compressed already (docs/redis.md, "Compression")
            self.procs[component] = subprocess.Popen([os.path.join(self.bin, "aitbc-backup-agent")], env=env,
                                                     stderr=open(f"{self.run}/agent-{component}.log", "a"))
        while True:
            out = subprocess.run([self.cli_bin, "agents", "list", "--json"], env=self.env,
                                 capture_output=True, text=True)
            if out.returncode == 0 and sum(a["state"] == "online" for a in json.loads(out.stdout)) == 3:
                return
            time.sleep(0.1)

    def cli(self, *args):
        out = subprocess.run([self.cli_bin, *args], env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"aitbc-backup {args} failed: {out.stderr}{out.stdout}")
        return out.stdout

    def snapshot(self, mode):
        events = self.cli("snapshot", "create", "--wait", "--json", "--mode", mode)
        return [json.loads(line) for line in events.splitlines()][-1]["snapshot"]

    def stop(self):
        for proc in self.procs.values():
            proc.terminate()
            proc.wait()
        self.procs = {}


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--sets", type=int, default=100, help="coordinated sets for the skew")
    ap.add_argument("--fenced", type=int, default=20, help="fenced sets with ~1 GB in Redis")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--phases", default="skew,pause,full",
                    help="which measurements: skew, pause (needs ~1 GB put into Redis), full")
    args = ap.parse_args()
    work = args.work
    os.makedirs(work, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", work], check=True)
    run = os.path.join(work, "run")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    os.chmod(run, 0o755)
    procs = []
    try:
        pg, pg_url = start_postgres(work, "pgdata", run)
        procs.append(pg)
        pristine = os.path.join(work, "node-pristine")
        if not os.path.exists(os.path.join(work, DATA_VERSION)):
            psql(f"{pg_url}/postgres", "DROP DATABASE IF EXISTS bench")
            psql(f"{pg_url}/postgres", "CREATE DATABASE bench")
            subprocess.run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(args.scale), "-d", f"{pg_url}/bench"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(pristine, ignore_errors=True)
            sim(args.bin, pristine, 10000, 24, 88000)
            open(os.path.join(work, DATA_VERSION), "w").close()
        psql(f"{pg_url}/postgres", "DROP DATABASE IF EXISTS aitbc WITH (FORCE)")
        psql(f"{pg_url}/postgres", "CREATE DATABASE aitbc")
        node = os.path.join(run, "node")
        subprocess.run(["cp", "-a", pristine, node], check=True)
        redis_port = free_port()
        procs.append(start_redis(f"{run}/redis", redis_port))
        procs.append(subprocess.Popen(
            # Small live blocks, so the directory stays about 1 GiB through the run.
            [os.path.join(args.bin, "aitbc-node-sim"), "--data-dir", node, "--rate", "50",
             "--txs-per-block", "4", "--receipt-log-bytes", "2000", "--http", "127.0.0.1:0",
             "--mirror-postgres", f"{pg_url}/aitbc", "--mirror-redis", f"127.0.0.1:{redis_port}"],
            stdout=subprocess.DEVNULL, stderr=open(f"{run}/node.log", "w")))
        fleet = Fleet(args.bin, run, node, pg_url, redis_port)
        try:
            bench_sets(args, fleet, run, pg_url, redis_port, node, procs)
        finally:
            fleet.stop()
    finally:
        # Newest first (the simulator before the servers it writes to).
        for proc in reversed(procs):
            proc.send_signal(getattr(proc, "stop_signal", signal.SIGTERM))
            proc.wait()


def bench_sets(args, fleet, run, pg_url, redis_port, node, procs):
    phases = args.phases.split(",")
    # 1. Skew of coordinated sets (the first one stores the ledger; later ones reuse its chunks).
    fleet.start(f"{run}/repo-skew", ["aitbc"])
    skews = []
    for _ in range(args.sets if "skew" in phases else 0):
        s = fleet.snapshot("coordinated")
        assert s["state"] == "committed", s
        skews.append(s["cut_skew_ms"])
    if skews:
        emit(bench="sets", case="cut_skew_coordinated", sets=len(skews), p50_ms=round(percentile(skews, 50), 2),
             p99_ms=round(percentile(skews, 99), 2), max_ms=round(max(skews), 2))

    # 2. Fenced sets with ~1 GB in Redis.
    populate(redis_port, args.keys)
    used_mb = int(dict(line.split(":", 1) for line in redis_cli(redis_port, "INFO", "memory").splitlines()
                       if ":" in line)["used_memory"]) / 1e6
    pauses, fenced_skews = [], []
    for _ in range(args.fenced if "pause" in phases else 0):
        s = fleet.snapshot("fenced")
        assert s["state"] == "committed", s
        pauses.append(s["write_pause_ms"])
        fenced_skews.append(s["cut_skew_ms"])
    if pauses:
        emit(bench="sets", case="write_pause_fenced", sets=len(pauses), redis_used_memory_mb=round(used_mb, 1),
             p50_ms=round(percentile(pauses, 50), 2), p99_ms=round(percentile(pauses, 99), 2),
             max_ms=round(max(pauses), 2), skew_p99_ms=round(percentile(fenced_skews, 99), 2))
    if "full" not in phases:
        return

    # 3. One full set from nothing and its ordered restore, beside the old scripts.
    fleet.start(f"{run}/repo-full", ["bench", "aitbc"])
    bench_mb = int(psql(f"{pg_url}/bench", "SELECT pg_database_size('bench')")) / 1e6
    node_mb = du(node) / 1e6
    total_mb = bench_mb + used_mb + node_mb
    started = time.monotonic()
    full = fleet.snapshot("coordinated")
    backup_s = time.monotonic() - started
    assert full["state"] == "committed", full
    emit(bench="sets", case="aitbc_full_set_backup", wall_s=round(backup_s, 2), data_mb=round(total_mb, 1),
         postgres_mb=round(bench_mb, 1), redis_mb=round(used_mb, 1), ledger_mb=round(node_mb, 1),
         cut_skew_ms=full["cut_skew_ms"])
    old = f"{run}/old"
    os.makedirs(old)
    old_backup = measure(
        f"{PG_BIN}/pg_dump -Fc -d {pg_url}/bench | gzip > {old}/bench.dump.gz && "
        f"redis-cli -p {redis_port} --rdb - 2>/dev/null | gzip > {old}/dump.rdb.gz && "
        # tar exits 1 when a file changed as it read it (a live node): the old way's torn copy.
        f"{{ tar czf {old}/node.tar.gz -C {node} . 2>/dev/null; [ $? -le 1 ]; }}")
    emit(bench="sets", case="old_scripts_backup", **old_backup)

    # Fresh targets: a second PostgreSQL cluster, an empty Redis, a new directory.
    pg2, pg2_url = start_postgres(run, "pgdata-fresh", run)
    procs.append(pg2)
    redis2_port = free_port()
    procs.append(start_redis(f"{run}/redis-fresh", redis2_port))
    started = time.monotonic()
    fleet.cli("restore", full["id"], "--target", f"postgres={pg2_url}/postgres",
              "--target", f"redis=127.0.0.1:{redis2_port}", "--target", f"ledger={run}/restored-node")
    restore_s = time.monotonic() - started
    emit(bench="sets", case="aitbc_ordered_restore", wall_s=round(restore_s, 2), data_mb=round(total_mb, 1))

    restart_dir = f"{run}/old-redis"
    os.makedirs(restart_dir)
    restart_port = free_port()
    old_restore = measure(
        f"{PG_BIN}/psql -X -q -d {pg2_url}/postgres -c 'CREATE DATABASE old_bench' && "
        f"gunzip -c {old}/bench.dump.gz | {PG_BIN}/pg_restore -d {pg2_url}/old_bench && "
        f"gunzip -c {old}/dump.rdb.gz > {restart_dir}/dump.rdb && "
        f"redis-server --port {restart_port} --bind 127.0.0.1 --dir {restart_dir} --save '' --appendonly no "
        f"--daemonize yes --pidfile {restart_dir}/pid >/dev/null && "
        f"until [ \"$(redis-cli -p {restart_port} PING 2>/dev/null)\" = PONG ] && "
        f"redis-cli -p {restart_port} INFO persistence | grep -q loading:0; do sleep 0.02; done && "
        f"redis-cli -p {restart_port} SHUTDOWN NOSAVE >/dev/null 2>&1; "
        f"mkdir -p {run}/old-node && tar xzf {old}/node.tar.gz -C {run}/old-node")
    emit(bench="sets", case="old_scripts_restore", **old_restore)
    wait_loaded(redis2_port)
    p99 = lambda values: round(percentile(values, 99), 2) if values else None  # noqa: E731
    emit(bench="sets", case="summary",
         skew_p99_ms=p99(skews), skew_target="<= 20", skew_met=bool(skews) and p99(skews) <= 20,
         pause_p99_ms=p99(pauses), pause_target="<= 50", pause_met=bool(pauses) and p99(pauses) <= 50,
         full_set_backup_s=round(backup_s, 2), old_scripts_backup_s=old_backup["wall_s"],
         ordered_restore_s=round(restore_s, 2), old_scripts_restore_s=old_restore["wall_s"],
         restore_target="<= 60 s", restore_met=restore_s <= 60, data_mb=round(total_mb, 1))


if __name__ == "__main__":
    main()
