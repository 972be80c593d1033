#!/usr/bin/env python3
"""PostgreSQL benchmark: pgbench scale 50 (~750 MB) in a PostgreSQL 15 cluster started here, backed
up by the agent's postgres component beside `pg_dump -Fc -Z0 > file` (the bare dump), `pg_dump -Fc
> file` and `pg_dump -Fc | gzip` (the old way), then restored by the agent beside `pg_restore -j2`
from the local file, in one run. Prints one JSON line per measurement and a summary with the
issue's targets (backup and restore each at most 10 % slower than the bare tools)."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import du, emit, free_port, fresh_backup_command, last_repo, run_case, run_interleaved  # noqa: E402

PG_BIN = "/usr/lib/postgresql/15/bin"
DATA_VERSION = "postgres-data.v1"


# initdb and postgres refuse to run as root: as root they run as the postgres OS user.
AS_POSTGRES = ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"] \
    if os.geteuid() == 0 else []


def as_postgres(args, **kw):
    return subprocess.run(AS_POSTGRES + args, check=True, **kw)


def wait_ready(port, timeout=120):
    for _ in range(timeout * 10):
        if subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"PostgreSQL on port {port} did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2, help="pg_restore --jobs of the baseline")
    ap.add_argument("--repeat", type=int, default=3, help="runs per compared case (the median counts)")
    args = ap.parse_args()
    work = args.work
    pgdata = os.path.join(work, "pgdata")
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", work], check=True)
    if not os.path.exists(os.path.join(work, DATA_VERSION)):
        shutil.rmtree(pgdata, ignore_errors=True)
        as_postgres([f"{PG_BIN}/initdb", "-D", pgdata, "--auth=trust", "--username=postgres",
                     "--encoding=UTF8", "--locale=C", "--no-sync"], stdout=subprocess.DEVNULL)
    port = free_port()
    log = open(os.path.join(work, "postgres.log"), "w")
    server = subprocess.Popen(
        AS_POSTGRES + [f"{PG_BIN}/postgres", "-D", pgdata, "-p", str(port), "-k", "/tmp",
         "-c", "listen_addresses=127.0.0.1", "-c", "max_wal_size=4GB",
         "-c", "maintenance_work_mem=256MB"],
        stdout=log, stderr=log)
    try:
        url = f"postgres://postgres@127.0.0.1:{port}"
        wait_ready(port)
        run_bench(args, url, work)
    finally:
        server.terminate()
        server.wait()


def psql(url, sql):
    return subprocess.run([f"{PG_BIN}/psql", "-X", "-At", "-d", url, "-c", sql], check=True,
                          capture_output=True, text=True).stdout.strip()


def run_bench(args, url, work):
    if not os.path.exists(os.path.join(work, DATA_VERSION)):
        psql(f"{url}/postgres", "CREATE DATABASE bench")
        subprocess.run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(args.scale), "-d", f"{url}/bench"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        psql(f"{url}/bench", "VACUUM ANALYZE")
        open(os.path.join(work, DATA_VERSION), "w").close()
    for name in psql(f"{url}/postgres", "SELECT datname FROM pg_database WHERE datname LIKE 'r\\_%'").split():
        psql(f"{url}/postgres", f'DROP DATABASE "{name}" WITH (FORCE)')
    size = int(psql(f"{url}/bench", "SELECT pg_database_size('bench')"))
    mb = size / 1e6
    scratch = os.path.join(work, "run")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)

    results = {}

    def run(name, command, env=None, repeat=1):
        return run_case(results, "postgres", name, command, mb, env, repeat, database_mb=round(mb, 1))

    dump = f"{PG_BIN}/pg_dump"
    # Warm the page cache.
    subprocess.run(f"{dump} -Fc -Z0 -d {url}/bench > /dev/null", shell=True, check=True)

    cli = os.path.join(args.bin, "aitbc-backup")
    agent = os.path.join(args.bin, "aitbc-backup-agent")
    agent_env = dict(os.environ, AITBC_BACKUP_COMPONENT="postgres",
                     AITBC_BACKUP_POSTGRES__URL=f"{url}/postgres",
                     AITBC_BACKUP_POSTGRES__DATABASES='["bench"]',
                     AITBC_BACKUP_POSTGRES__SCRATCH_DIR=f"{scratch}/agent-scratch",
                     AITBC_BACKUP_LOG__LEVEL="warn")

    # Backups: the bare dump and ours in turn.
    labels = dict(database_mb=round(mb, 1))
    run_interleaved(results, "postgres", [
        ("pg_dump_Fc_Z0", f"{dump} -Fc -Z0 -d {url}/bench > {scratch}/z0.dump", None),
        ("aitbc", fresh_backup_command(cli, agent, scratch, f"{scratch}/full.json"), agent_env),
    ], mb, args.repeat, **labels)
    results["pg_dump_Fc_Z0"]["stored_bytes"] = os.path.getsize(f"{scratch}/z0.dump")
    run("pg_dump_Fc", f"{dump} -Fc -d {url}/bench > {scratch}/fc.dump")
    results["pg_dump_Fc"]["stored_bytes"] = os.path.getsize(f"{scratch}/fc.dump")
    run("pg_dump_Fc_gzip", f"{dump} -Fc -d {url}/bench | gzip > {scratch}/fc.dump.gz")
    results["pg_dump_Fc_gzip"]["stored_bytes"] = os.path.getsize(f"{scratch}/fc.dump.gz")
    full = json.load(open(f"{scratch}/full.json"))
    results["aitbc"]["stored_bytes"] = du(last_repo(scratch))
    agent_env["AITBC_BACKUP_REPOSITORY__URL"] = f"file://{last_repo(scratch)}"
    run("aitbc_again", f"{agent} backup > {scratch}/again.json", agent_env)
    again = json.load(open(f"{scratch}/again.json"))
    results["aitbc_again"]["new_stored_bytes"] = again["new_stored_bytes"]

    # Restores, in turn, each after a checkpoint (so neither inherits the other's dirty pages);
    # pg_restore into a fresh database each time, the agent replacing its target (as it would).
    restore_into = (f"{PG_BIN}/psql -X -q -d {url}/postgres -c 'DROP DATABASE IF EXISTS r_pg_restore' "
                    f"-c 'CREATE DATABASE r_pg_restore' && ")
    run_interleaved(results, "postgres", [
        ("pg_restore_j2", restore_into +
         f"{PG_BIN}/pg_restore -j {args.jobs} -d {url}/r_pg_restore {scratch}/z0.dump", None),
        ("aitbc_restore", f"{agent} restore {full['manifest']} --database bench --as r_aitbc "
         f"> {scratch}/restore.json", agent_env),
    ], mb, args.repeat, before=lambda: psql(f"{url}/postgres", "CHECKPOINT"), **labels)
    rows = psql(f"{url}/r_aitbc", "SELECT count(*) FROM pgbench_accounts")

    backup_ratio = results["aitbc"]["wall_s"] / results["pg_dump_Fc_Z0"]["wall_s"]
    restore_ratio = results["aitbc_restore"]["wall_s"] / results["pg_restore_j2"]["wall_s"]
    emit(bench="postgres", case="summary", database_mb=round(mb, 1), restored_accounts=int(rows),
         backup_vs_pg_dump_Z0=round(backup_ratio, 3), backup_target="<= 1.10",
         backup_met=backup_ratio <= 1.10,
         backup_vs_old_way=round(results["aitbc"]["wall_s"] / results["pg_dump_Fc_gzip"]["wall_s"], 3),
         restore_vs_pg_restore_j2=round(restore_ratio, 3), restore_target="<= 1.10",
         restore_met=restore_ratio <= 1.10,
         stored_mb={k: round(v.get("stored_bytes", 0) / 1e6, 1) for k, v in results.items()
                    if "stored_bytes" in v},
         second_backup_new_mb=round(again["new_stored_bytes"] / 1e6, 2))


if __name__ == "__main__":
    main()
