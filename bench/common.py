"""Helpers shared by the benchmark scripts."""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(command, env=None):
    """Runs a shell command under measure.py: wall and CPU seconds, peak RSS."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), command],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"benchmark command failed: {command}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def du(path):
    """Bytes of all files under path."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def settle(*cached):
    """Before a restore run: everything written back, and (as root) the page cache dropped and
    the `cached` files and directories (the backups the runs read) read back into it. Each run
    then starts from the same memory: its input cached, plenty of free memory that has been
    touched before. Otherwise a run that had to reclaim the page cache earlier runs filled, or
    to take fresh memory from this VM's host, took up to twice as long, whichever tool it was."""
    subprocess.run(["sync"], check=True)
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as drop:
            drop.write("1\n")
        subprocess.run(["find", *cached, "-type", "f", "-exec", "cat", "{}", "+"], check=True,
                       stdout=subprocess.DEVNULL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(**fields):
    print(json.dumps(fields), flush=True)


def run_interleaved(results, bench, cases, data_mb, repeat=1, before=None, quiet=False,
                    before_round=None, **labels):
    """Runs the compared cases [(name, command, env)] in turn, `repeat` rounds (so a slow spell
    of this noisy machine hits every case alike), calling `before_round()` ahead of each round and
    `before()` ahead of each run; keeps each case's median run with MB/s over data_mb; records
    them in results and prints them (unless quiet: the caller prints)."""
    runs = {name: [] for name, _, _ in cases}
    for _ in range(repeat):
        if before_round:
            before_round()
        for name, command, env in cases:
            if before:
                before()
            runs[name].append(measure(command, env))
    for name, _, _ in cases:
        ordered = sorted(runs[name], key=lambda m: m["wall_s"])
        m = dict(ordered[len(ordered) // 2])
        m["mb_s"] = round(data_mb / m["wall_s"], 1)
        m["runs_wall_s"] = [r["wall_s"] for r in runs[name]]
        results[name] = m
        if not quiet:
            emit(bench=bench, case=name, **labels, **m)


def run_case(results, bench, name, command, data_mb, env=None, repeat=1, **labels):
    """One case alone (see run_interleaved)."""
    run_interleaved(results, bench, [(name, command, env)], data_mb, repeat, **labels)
    return results[name]


def fresh_backup_command(cli, agent, scratch, report):
    """A shell command running one first backup into a new, empty repository under scratch (so
    repeated runs each compress and store everything, none deduplicates against the last); the
    repository's path is left in scratch/last-repo."""
    return (f"R=$(mktemp -d -p {scratch} repo-XXXXXX) && {cli} repo --repository file://$R init >/dev/null"
            f" && AITBC_BACKUP_REPOSITORY__URL=file://$R {agent} backup > {report}"
            f" && echo $R > {scratch}/last-repo")


def last_repo(scratch):
    return open(os.path.join(scratch, "last-repo")).read().strip()
