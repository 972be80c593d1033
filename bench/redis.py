#!/usr/bin/env python3
"""Redis benchmark: about 1 GB of session-like values (1,000,000 keys of ~1 KB, half random hex,
half repetitive JSON) in a Redis 7 started here, backed up by the agent's redis component beside
`redis-cli --rdb` (repl-diskless-sync-delay 0) and `redis-cli --rdb | gzip` (the old way), then
restored by the agent into a running, empty server (flushed before each run) beside a restart of a server with the
dump.rdb in its directory, in one run. Prints one JSON line per measurement and a summary with
the issue's targets."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import du, emit, free_port, fresh_backup_command, last_repo, run_case, run_interleaved  # noqa: E402


def start_redis(directory, port, extra=()):
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
         "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_loaded(port)
    return proc


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout.strip()


def wait_loaded(port):
    while True:
        if cli(port, "PING") == "PONG" and "loading:0" in cli(port, "INFO", "persistence"):
            return
        time.sleep(0.02)


def populate(port, keys):
    feed = subprocess.Popen(["redis-cli", "-p", str(port), "--pipe"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    batch = []
    for i in range(keys):
        value = os.urandom(256).hex() + ('{"user":%d,"roles":["reader","writer"],"theme":"dark",' % i) * 6
        key = f"session:{i}"
        batch.append(f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n${len(value)}\r\n{value}\r\n")
        if len(batch) == 10000:
            feed.stdin.write("".join(batch).encode())
            batch = []
    feed.stdin.write("".join(batch).encode())
    feed.stdin.close()
    feed.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per compared case (the median counts)")
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    port = free_port()
    source = start_redis(f"{work}/source", port)
    servers = [source]
    try:
        populate(port, args.keys)
        used = int(dict(line.split(":", 1) for line in cli(port, "INFO", "memory").splitlines()
                        if ":" in line)["used_memory"])
        mb = used / 1e6
        results = {}

        def run(name, command, env=None, repeat=1):
            return run_case(results, "redis", name, command, mb, env, repeat, used_memory_mb=round(mb, 1))

        agent = os.path.join(args.bin, "aitbc-backup-agent")
        env = dict(os.environ, AITBC_BACKUP_COMPONENT="redis", AITBC_BACKUP_REDIS__ADDRESS=f"127.0.0.1:{port}",
                   AITBC_BACKUP_LOG__LEVEL="warn")

        cli_bin = os.path.join(args.bin, "aitbc-backup")
        labels = dict(used_memory_mb=round(mb, 1))
        # The agent as shipped (RDB streams at zstd level 1, redis.compression_level: the values
        # are mostly LZF-compressed already), and at the repository's default level 3.
        level3_env = dict(env, AITBC_BACKUP_REDIS__COMPRESSION_LEVEL="3")
        run_interleaved(results, "redis", [
            ("redis_cli_rdb", f"redis-cli -p {port} --rdb {work}/dump.rdb > /dev/null", None),
            ("aitbc_level3", fresh_backup_command(cli_bin, agent, work, f"{work}/level3.json"), level3_env),
            ("aitbc", fresh_backup_command(cli_bin, agent, work, f"{work}/full.json"), env),
        ], mb, args.repeat, **labels)
        rdb_size = os.path.getsize(f"{work}/dump.rdb")
        results["redis_cli_rdb"]["stored_bytes"] = rdb_size
        run("redis_cli_rdb_gzip", f"redis-cli -p {port} --rdb - 2>/dev/null | gzip > {work}/dump.rdb.gz")
        results["redis_cli_rdb_gzip"]["stored_bytes"] = os.path.getsize(f"{work}/dump.rdb.gz")
        full = json.load(open(f"{work}/full.json"))
        results["aitbc"]["stored_bytes"] = du(last_repo(work))
        results["aitbc_level3"]["stored_bytes"] = json.load(open(f"{work}/level3.json"))["new_stored_bytes"]
        env["AITBC_BACKUP_REPOSITORY__URL"] = f"file://{last_repo(work)}"

        # Restart with dump.rdb: a server starting on the file until it has loaded it.
        restart_dir = f"{work}/restart"
        os.makedirs(restart_dir)
        shutil.copy(f"{work}/dump.rdb", f"{restart_dir}/dump.rdb")
        restart_port = free_port()
        target_port = free_port()
        servers.append(start_redis(f"{work}/target", target_port))
        target_env = dict(env, AITBC_BACKUP_REDIS__ADDRESS=f"127.0.0.1:{target_port}")

        def empty_target():
            # Each restore goes into an empty running server, as the restart starts from none.
            cli(target_port, "FLUSHALL", "SYNC")

        run_interleaved(results, "redis", [
            ("restart_with_dump_rdb",
             f"redis-server --port {restart_port} --bind 127.0.0.1 --dir {restart_dir} --save '' "
             f"--appendonly no --daemonize yes --pidfile {restart_dir}/pid >/dev/null && "
             f"until [ \"$(redis-cli -p {restart_port} PING 2>/dev/null)\" = PONG ] && "
             f"redis-cli -p {restart_port} INFO persistence | grep -q loading:0; do sleep 0.02; done; "
             f"redis-cli -p {restart_port} SHUTDOWN NOSAVE >/dev/null 2>&1 || true", None),
            ("aitbc_restore_live", f"{agent} restore {full['manifest']} > {work}/restore.json", target_env),
        ], mb, args.repeat, before=empty_target, **labels)
        keys = cli(target_port, "DBSIZE")
        # Into a server holding data (here the last restore's): it loads the sync from disk,
        # keeping its data until the whole RDB has arrived. Shown, not a target.
        run("aitbc_restore_live_replacing", f"{agent} restore {full['manifest']} > {work}/restore.json",
            target_env)

        backup_vs_rdb = results["redis_cli_rdb"]["wall_s"] / results["aitbc"]["wall_s"]
        backup_vs_old = results["redis_cli_rdb_gzip"]["wall_s"] / results["aitbc"]["wall_s"]
        level3_vs_rdb = results["redis_cli_rdb"]["wall_s"] / results["aitbc_level3"]["wall_s"]
        level3_vs_old = results["redis_cli_rdb_gzip"]["wall_s"] / results["aitbc_level3"]["wall_s"]
        restore_vs_restart = results["restart_with_dump_rdb"]["wall_s"] / results["aitbc_restore_live"]["wall_s"]
        emit(bench="redis", case="summary", used_memory_mb=round(mb, 1), rdb_mb=round(rdb_size / 1e6, 1),
             restored_keys=int(keys),
             backup_speed_vs_redis_cli_rdb=round(backup_vs_rdb, 3), backup_target=">= 1.0",
             backup_met=backup_vs_rdb >= 1.0,
             backup_speed_vs_old_way=round(backup_vs_old, 3), old_way_target=">= 3.0",
             level3_speed_vs_redis_cli_rdb=round(level3_vs_rdb, 3),
             level3_speed_vs_old_way=round(level3_vs_old, 3),
             old_way_met=backup_vs_old >= 3.0,
             restore_speed_vs_restart=round(restore_vs_restart, 3), restore_target=">= 0.8",
             restore_met=restore_vs_restart >= 0.8,
             stored_mb={k: round(v["stored_bytes"] / 1e6, 1) for k, v in results.items() if "stored_bytes" in v})
    finally:
        for server in servers:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
