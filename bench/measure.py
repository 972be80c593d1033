#!/usr/bin/env python3
"""Runs a shell command and prints one JSON line: wall seconds, CPU seconds and the peak RSS of
the largest process it started (ru_maxrss of the reaped children)."""
import json
import resource
import subprocess
import sys
import time

start = time.monotonic()
proc = subprocess.run(["bash", "-o", "pipefail", "-c", sys.argv[1]])
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "exit": proc.returncode,
    "wall_s": round(wall, 3),
    "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
    "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
}))
sys.exit(proc.returncode)
