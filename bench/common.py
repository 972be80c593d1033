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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(**fields):
    print(json.dumps(fields), flush=True)


def run_case(results, bench, name, command, data_mb, env=None, repeat=1, **labels):
    """Runs a case `repeat` times and keeps the median run (this machine's timings vary by tens of
    percent), with MB/s over data_mb; records it in results and prints it."""
    runs = sorted((measure(command, env) for _ in range(repeat)), key=lambda m: m["wall_s"])
    m = runs[len(runs) // 2]
    m["mb_s"] = round(data_mb / m["wall_s"], 1)
    m["runs_wall_s"] = [r["wall_s"] for r in runs]
    results[name] = m
    emit(bench=bench, case=name, **labels, **m)
    return m
