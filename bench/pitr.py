#!/usr/bin/env python3
"""Point-in-time recovery benchmark: pgbench scale 50 in a PostgreSQL 15 cluster started here with
WAL archiving for both tools (pgBackRest's archive_command, our agent's pg_receivewal stream).
Base backups: `aitbc-backup-agent base-backup` into a fresh repository beside `pgbackrest backup
--type=full` (compress-type=zst, process-max=2, local repository), in turn. Restores: our
`pitr-restore --latest` (unpack, WAL, recovery, clean shutdown) beside `pgbackrest restore` plus
the same recovery (server started until it accepts connections, then stopped). Prints one JSON
line per measurement and a summary (targets: ours at least as fast, both ways)."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import du, emit, free_port, run_interleaved  # noqa: E402
from postgres import AS_POSTGRES, PG_BIN, psql, wait_ready  # noqa: E402

DATA_VERSION = "pitr-data.v1"


def sh_as_postgres(command):
    """A shell command line run as the PostgreSQL OS user."""
    if not AS_POSTGRES:
        return command
    return " ".join(AS_POSTGRES) + " sh -c " + json.dumps(command)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=2, help="runs per compared case (the median counts)")
    args = ap.parse_args()
    work = args.work
    os.makedirs(work, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", work], check=True)
    pgdata = os.path.join(work, "pgdata")
    fresh = not os.path.exists(os.path.join(work, DATA_VERSION))
    if fresh:
        shutil.rmtree(pgdata, ignore_errors=True)
        subprocess.run(AS_POSTGRES + [f"{PG_BIN}/initdb", "-D", pgdata, "--auth=trust", "--username=postgres",
                                      "--encoding=UTF8", "--locale=C", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL)
    run = os.path.join(work, "run")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", run], check=True)
    port = free_port()
    conf = os.path.join(run, "pgbackrest.conf")
    with open(conf, "w") as f:
        f.write(f"""[global]
repo1-path={run}/pgbackrest-repo
compress-type=zst
process-max=2
start-fast=y
log-level-console=warn
log-level-file=off
lock-path={run}/pgbackrest-lock
spool-path={run}/pgbackrest-spool

[bench]
pg1-path={pgdata}
pg1-port={port}
pg1-socket-path={run}
""")
    pgbackrest = f"pgbackrest --config={conf} --stanza=bench"
    log = open(os.path.join(run, "postgres.log"), "w")
    server = subprocess.Popen(
        AS_POSTGRES + [f"{PG_BIN}/postgres", "-D", pgdata, "-p", str(port), "-k", run,
                       "-c", "listen_addresses=127.0.0.1", "-c", "max_wal_size=4GB",
                       "-c", "maintenance_work_mem=256MB", "-c", "archive_mode=on",
                       "-c", f"archive_command={pgbackrest} archive-push %p"],
        stdout=log, stderr=log)
    archiver = None
    try:
        wait_ready(port)
        url = f"postgres://postgres@127.0.0.1:{port}"
        if fresh:
            psql(f"{url}/postgres", "CREATE DATABASE bench")
            subprocess.run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(args.scale), "-d", f"{url}/bench"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            psql(f"{url}/bench", "VACUUM ANALYZE")
            open(os.path.join(work, DATA_VERSION), "w").close()
        subprocess.run(sh_as_postgres(f"{pgbackrest} stanza-create"), shell=True, check=True)
        size = int(psql(f"{url}/bench", "SELECT pg_database_size('bench')"))
        cluster_mb = du(pgdata) / 1e6

        cli = os.path.join(args.bin, "aitbc-backup")
        agent = os.path.join(args.bin, "aitbc-backup-agent")
        repo = os.path.join(run, "aitbc-repo")
        subprocess.run([cli, "repo", "--repository", f"file://{repo}", "init"], check=True,
                       stdout=subprocess.DEVNULL)
        env = dict(os.environ, AITBC_BACKUP_COMPONENT="postgres",
                   AITBC_BACKUP_POSTGRES__URL=f"{url}/postgres",
                   AITBC_BACKUP_POSTGRES__SCRATCH_DIR=f"{run}/agent-scratch",
                   AITBC_BACKUP_POSTGRES__WAL__BASE_BACKUP_EVERY="0s",
                   AITBC_BACKUP_REPOSITORY__URL=f"file://{repo}",
                   AITBC_BACKUP_LOG__LEVEL="warn")
        archiver = subprocess.Popen([agent, "wal-archive"], env=env, stdout=subprocess.DEVNULL,
                                    stderr=open(os.path.join(run, "archiver.log"), "w"))
        time.sleep(2)
        results = {}
        labels = dict(database_mb=round(size / 1e6, 1), cluster_mb=round(cluster_mb, 1))
        # Each of our runs goes to a fresh repository (nothing to deduplicate against), like
        # each pgBackRest full; the archiver's repository keeps the last one for the restore.
        fresh_base = (f"R=$(mktemp -d -p {run} base-XXXXXX) && {cli} repo --repository file://$R init >/dev/null"
                      f" && AITBC_BACKUP_REPOSITORY__URL=file://$R {agent} base-backup > {run}/base.json")
        run_interleaved(results, "pitr", [
            ("pgbackrest_full", sh_as_postgres(f"{pgbackrest} backup --type=full"), None),
            ("aitbc_base_backup", fresh_base, env),
        ], cluster_mb, args.repeat, before=lambda: psql(f"{url}/postgres", "CHECKPOINT"), **labels)
        # The restore's base backup, in the archiver's repository; then a second one (dedup).
        first = json.loads(subprocess.run([agent, "base-backup"], env=env, check=True,
                                          capture_output=True, text=True).stdout)
        # Appended data (new rows in a new relation, as the platform's jobs and blocks grow)
        # leaves the existing files' chunks unchanged.
        psql(f"{url}/bench", "DROP TABLE IF EXISTS appended; CREATE TABLE appended AS "
             "SELECT i, md5(i::text) AS v FROM generate_series(1, 200000) i")
        second = json.loads(subprocess.run([agent, "base-backup"], env=env, check=True,
                                           capture_output=True, text=True).stdout)
        # Updates scattered over a big table touch nearly every 1 MiB chunk of it.
        subprocess.run([f"{PG_BIN}/pgbench", "-t", "2000", "-c", "2", "-d", f"{url}/bench"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        third = json.loads(subprocess.run([agent, "base-backup"], env=env, check=True,
                                          capture_output=True, text=True).stdout)
        psql(f"{url}/postgres", "SELECT pg_switch_wal()")
        time.sleep(3)

        target = os.path.join(run, "restored")
        restore_port = free_port()
        recover_pgbackrest = (
            f"rm -rf {target} && mkdir -m 700 {target} && {pgbackrest} restore --pg1-path={target} "
            f"&& {PG_BIN}/pg_ctl -D {target} -w -t 3600 -l {run}/restored.log "
            f"-o \"-p {restore_port} -k {run} -c listen_addresses= -c archive_mode=off\" start >/dev/null "
            f"&& until {PG_BIN}/psql -X -At -h {run} -p {restore_port} -d postgres "
            f"-c 'SELECT pg_is_in_recovery()' 2>/dev/null | grep -q f; do sleep 0.1; done "
            f"&& {PG_BIN}/pg_ctl -D {target} -m fast -w stop >/dev/null")
        ours = (f"rm -rf {target} && {agent} pitr-restore --latest --data-dir {target} "
                f"> {run}/pitr.json")
        run_interleaved(results, "pitr", [
            ("pgbackrest_restore_recover", sh_as_postgres(recover_pgbackrest), None),
            ("aitbc_pitr_restore", ours, env),
        ], cluster_mb, args.repeat, **labels)
        pitr = json.load(open(f"{run}/pitr.json"))
        pgbr_bytes = du(os.path.join(run, "pgbackrest-repo", "backup"))
        backup_ratio = results["pgbackrest_full"]["wall_s"] / results["aitbc_base_backup"]["wall_s"]
        restore_ratio = results["pgbackrest_restore_recover"]["wall_s"] / results["aitbc_pitr_restore"]["wall_s"]
        emit(bench="pitr", case="summary", **labels,
             base_backup_speedup_vs_pgbackrest=round(backup_ratio, 3), base_backup_target=">= 1.0",
             base_backup_met=backup_ratio >= 1.0,
             restore_speedup_vs_pgbackrest=round(restore_ratio, 3), restore_target=">= 1.0",
             restore_met=restore_ratio >= 1.0,
             first_base_stored_mb=round(first["new_stored_bytes"] / 1e6, 1),
             second_base_after_append_new_stored_mb=round(second["new_stored_bytes"] / 1e6, 1),
             third_base_after_4000_random_updates_new_stored_mb=round(third["new_stored_bytes"] / 1e6, 1),
             pgbackrest_repo_mb_all_fulls=round(pgbr_bytes / 1e6, 1),
             restored_wal_files=pitr["wal_files"], restored_timeline=pitr["timeline"])
    finally:
        if archiver:
            archiver.terminate()
            archiver.wait()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
