#!/usr/bin/env python3
"""Repository benchmark: 1 GiB of ledger-like files (10,000 x ~100 KB) backed up and restored by
aitbc-backup (local directory and s3s-fs) beside tar czf, tar + zstd -3 -T2 and restic, in one
run. Prints one JSON line per measurement, with ratios against the baselines."""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import du, emit, free_port, measure, run_interleaved, settle  # noqa: E402


def cpu_seconds(pid):
    """User plus system CPU time a running process has used."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def encryption(cli, data, scratch, mb, size, results, run, env):
    """The encrypted path alone: the sealed scheme (X25519 sealed boxes, keyed chunker) against
    version 1 (one master key, XChaCha20-Poly1305), backup and stream restore, in one run."""
    ids = {}
    schemes = [("sealed", "--encrypt"), ("v1", "--encrypt --version1")]
    # Full backups into a fresh repository, three rounds alternating the schemes (medians):
    # a single run on this shared machine varies up to 2x.
    walls = {scheme: [] for scheme, _ in schemes}
    for _ in range(3):
        for scheme, flags in schemes:
            shutil.rmtree(f"{scratch}/repo-{scheme}", ignore_errors=True)
            repo = f"{cli} repo --repository file://{scratch}/repo-{scheme}"
            subprocess.run(f"{repo} init {flags}", shell=True, check=True, env=env,
                           stdout=subprocess.DEVNULL)
            m = run(f"backup_encrypted_{scheme}",
                    f"tar cf - -C {data} . | {repo} put ledger --stream tar > {scratch}/id-{scheme}",
                    f"{scratch}/repo-{scheme}", env)
            walls[scheme].append(m)
            ids[scheme] = (repo, open(f"{scratch}/id-{scheme}").read().strip())
    for scheme, runs in walls.items():
        median = sorted(runs, key=lambda m: m["wall_s"])[1]
        median["runs_wall_s"] = [m["wall_s"] for m in runs]
        results[f"backup_encrypted_{scheme}"] = median
    for scheme, (repo, _) in ids.items():
        run(f"backup_encrypted_{scheme}_unchanged",
            f"tar cf - -C {data} . | {repo} put ledger --stream tar > /dev/null", None, env)

    def before():
        settle(f"{scratch}/repo-sealed", f"{scratch}/repo-v1")
        if os.path.exists(f"{scratch}/out.tar"):
            os.remove(f"{scratch}/out.tar")

    run_interleaved(results, "repository", [
        (f"restore_stream_encrypted_{scheme}", f"{repo} cat {id_} > {scratch}/out.tar", env)
        for scheme, (repo, id_) in ids.items()
    ], mb, repeat=3, before=before, quiet=True)

    def ratio(a, b):
        return round(results[a]["mb_s"] / results[b]["mb_s"], 2)

    for name, m in results.items():
        emit(scenario="repository", measure=name, data_bytes=size, **m)
    emit(scenario="repository", measure="encryption_summary",
         backup_sealed_vs_v1=ratio("backup_encrypted_sealed", "backup_encrypted_v1"),
         restore_sealed_vs_v1=ratio("restore_stream_encrypted_sealed", "restore_stream_encrypted_v1"),
         peak_rss_backup_sealed_mib=results["backup_encrypted_sealed"]["max_rss_mib"],
         peak_rss_backup_v1_mib=results["backup_encrypted_v1"]["max_rss_mib"],
         peak_rss_restore_sealed_mib=results["restore_stream_encrypted_sealed"]["max_rss_mib"],
         peak_rss_restore_v1_mib=results["restore_stream_encrypted_v1"]["max_rss_mib"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--file-size", type=int, default=107374)
    ap.add_argument("--s3s-fs", required=True)
    ap.add_argument("--big-stream-gib", type=int, default=10)
    ap.add_argument("--encryption-only", action="store_true",
                    help="only the encrypted path: sealed against version 1, backup and restore")
    args = ap.parse_args()

    cli = os.path.join(args.bin, "aitbc-backup")
    work = args.work
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(work, "data.v2")):
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run([os.path.join(args.bin, "aitbc-backup-bench-data"), "ledger", data,
                        str(args.files), str(args.file_size)], check=True)
        open(os.path.join(work, "data.v2"), "w").close()
    size = du(data)
    mb = size / 1e6
    subprocess.run(f"tar cf - -C {data} . > /dev/null", shell=True, check=True)  # warm the page cache

    scratch = os.path.join(work, "run")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    results = {}

    def run(name, command, stored_path=None, env=None, restore=False):
        m = measure(command, env)
        m["mb_s"] = round(mb / m["wall_s"], 1)
        if stored_path:
            m["stored_bytes"] = du(stored_path) if os.path.isdir(stored_path) else os.path.getsize(stored_path)
        results[name] = m
        return m

    env = dict(os.environ)
    env["RESTIC_PASSWORD"] = "bench"
    env["AITBC_CLI_PASSPHRASE"] = "bench"

    if args.encryption_only:
        encryption(cli, data, scratch, mb, size, results, run, env)
        shutil.rmtree(scratch, ignore_errors=True)
        return

    # Baselines.
    run("tar_czf", f"tar czf {scratch}/out.tar.gz -C {data} .", f"{scratch}/out.tar.gz")
    run("tar_zstd", f"tar -I 'zstd -3 -T2' -cf {scratch}/out.tar.zst -C {data} .", f"{scratch}/out.tar.zst")
    subprocess.run(f"restic -q -r {scratch}/restic init", shell=True, check=True, env=env,
                   stdout=subprocess.DEVNULL)
    run("restic", f"cd {work} && restic -q -r {scratch}/restic backup data", f"{scratch}/restic", env)

    # aitbc-backup, local directory: plain, unchanged again, encrypted.
    local = f"{cli} repo --repository file://{scratch}/repo"
    subprocess.run(f"{local} init", shell=True, check=True, stdout=subprocess.DEVNULL)
    put = f"tar cf - -C {data} . | {local} put ledger --stream tar > {scratch}/id"
    run("aitbc_local", put, f"{scratch}/repo")
    local_id = open(f"{scratch}/id").read().strip()
    run("aitbc_local_unchanged", f"tar cf - -C {data} . | {local} put ledger --stream tar > /dev/null")
    # The same stream from a file: the repository's own speed, without tar's (tar cf - alone
    # is measured too, as the ceiling of every piped run above).
    subprocess.run(f"tar cf {scratch}/data.tar -C {data} .", shell=True, check=True)
    run("tar_cf_only", f"tar cf - -C {data} . | cat > /dev/null")
    fresh = f"{cli} repo --repository file://{scratch}/repo-file"
    subprocess.run(f"{fresh} init", shell=True, check=True, stdout=subprocess.DEVNULL)
    run("aitbc_local_from_file", f"{fresh} put ledger --stream tar < {scratch}/data.tar > /dev/null")
    run("aitbc_local_unchanged_from_file", f"{fresh} put ledger --stream tar < {scratch}/data.tar > /dev/null")
    os.remove(f"{scratch}/data.tar")
    enc = f"{cli} repo --repository file://{scratch}/repo-enc"
    subprocess.run(f"{enc} init --encrypt", shell=True, check=True, env=env, stdout=subprocess.DEVNULL)
    run("aitbc_local_encrypted", f"tar cf - -C {data} . | {enc} put ledger --stream tar > /dev/null",
        f"{scratch}/repo-enc", env)
    v1 = f"{cli} repo --repository file://{scratch}/repo-enc-v1"
    subprocess.run(f"{v1} init --encrypt --version1", shell=True, check=True, env=env,
                   stdout=subprocess.DEVNULL)
    run("aitbc_local_encrypted_v1", f"tar cf - -C {data} . | {v1} put ledger --stream tar > /dev/null",
        f"{scratch}/repo-enc-v1", env)

    # aitbc-backup to s3s-fs on loopback.
    port = free_port()
    s3root = f"{scratch}/s3root"
    os.makedirs(f"{s3root}/bench")
    s3 = subprocess.Popen([args.s3s_fs, "--host", "127.0.0.1", "--port", str(port), "--access-key",
                           "benchaccesskey", "--secret-key", "benchsecretkey", s3root],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        s3env = dict(os.environ, AWS_ACCESS_KEY_ID="benchaccesskey", AWS_SECRET_ACCESS_KEY="benchsecretkey",
                     AWS_REGION="us-east-1")
        remote = f"{cli} repo --repository s3://bench/repo --endpoint http://127.0.0.1:{port} --path-style"
        subprocess.run(f"{remote} init", shell=True, check=True, env=s3env, stdout=subprocess.DEVNULL)
        # The server shares the two cores: its CPU time is recorded beside each S3 backup's.
        def with_server_cpu(name, *run_args, **run_kwargs):
            before = cpu_seconds(s3.pid)
            run(name, *run_args, **run_kwargs)
            results[name]["server_cpu_s"] = round(cpu_seconds(s3.pid) - before, 3)

        with_server_cpu("aitbc_s3", f"tar cf - -C {data} . | {remote} put ledger --stream tar > {scratch}/id-s3",
                        f"{s3root}/bench", s3env)
        s3_id = open(f"{scratch}/id-s3").read().strip()
        run("aitbc_s3_unchanged", f"tar cf - -C {data} . | {remote} put ledger --stream tar > /dev/null",
            env=s3env)
        # restic to the same server: the like-for-like baseline for the S3 numbers.
        restic_s3 = f"restic -q -r s3:http://127.0.0.1:{port}/bench/restic"
        restic_s3env = dict(s3env, RESTIC_PASSWORD="bench")
        subprocess.run(f"{restic_s3} init", shell=True, check=True, env=restic_s3env,
                       stdout=subprocess.DEVNULL)
        with_server_cpu("restic_s3", f"cd {work} && {restic_s3} backup data", f"{s3root}/bench/restic",
                        restic_s3env)

        # Restores, interleaved over three rounds (medians count: single runs here vary up to
        # 2x with the page cache and writeback), each into an empty target after a sync.
        targets = ["tar_czf", "restic", "restic_s3", "aitbc_local", "aitbc_s3"]
        streams = ["restic.tar", "aitbc.tar", "aitbc-s3.tar", "aitbc-synced.tar"]

        def remove_streams():
            for name in streams:
                if os.path.exists(f"{scratch}/{name}"):
                    os.remove(f"{scratch}/{name}")

        def before_run():
            remove_streams()
            settle(f"{scratch}/out.tar.gz", f"{scratch}/restic", f"{scratch}/repo", f"{s3root}/bench")

        def empty_targets():
            for name in targets:
                shutil.rmtree(f"{scratch}/r-{name}", ignore_errors=True)
                os.makedirs(f"{scratch}/r-{name}")
            remove_streams()
            subprocess.run(["sync"], check=True)
            # On a filesystem without a journal (this machine's), ext4 does not reuse an inode
            # for 60 s after its deletion once written back (ialloc.c, recently_deleted), and
            # looking past 10,000s of them made file creation up to 2x slower in the round
            # after a deletion: wait that out so every round creates files alike. Once a round:
            # within it each directory restore has a target of its own and only the few stream
            # files are deleted between runs.
            time.sleep(61)

        run_interleaved(results, "repository", [
            # To a directory, as an operator would.
            ("restore_tar_czf", f"tar xzf {scratch}/out.tar.gz -C {scratch}/r-tar_czf", None),
            ("restore_restic", f"restic -q -r {scratch}/restic restore latest --target {scratch}/r-restic", env),
            ("restore_aitbc_local", f"{local} cat {local_id} | tar xf - -C {scratch}/r-aitbc_local", None),
            ("restore_aitbc_s3", f"{remote} cat {s3_id} | tar xf - -C {scratch}/r-aitbc_s3", s3env),
            # (restic's dump from S3 reads blob by blob: 3.5 MB/s here, too slow to repeat.)
            ("restore_restic_s3", f"{restic_s3} restore latest --target {scratch}/r-restic_s3", restic_s3env),
            # The stream alone (a tar file), without tar's file writing: the repository's own
            # speed. Ours redirected like restic's dump; `cat -o FILE` adds an fsync and a rename.
            ("restore_stream_restic", f"restic -q -r {scratch}/restic dump latest /data > {scratch}/restic.tar", env),
            ("restore_stream_aitbc_local", f"{local} cat {local_id} > {scratch}/aitbc.tar", None),
            ("restore_stream_aitbc_s3", f"{remote} cat {s3_id} > {scratch}/aitbc-s3.tar", s3env),

            ("restore_stream_aitbc_local_fsync", f"{local} cat {local_id} -o {scratch}/aitbc-synced.tar", None),
        ], mb, repeat=3, before=before_run, before_round=empty_targets, quiet=True)
    finally:
        s3.terminate()
        s3.wait()
    empty_targets()
    subprocess.run(f"{local} cat {local_id} | tar xf - -C {scratch}/r-aitbc_local", shell=True, check=True)
    same = subprocess.run(["diff", "-rq", data, f"{scratch}/r-aitbc_local"], capture_output=True).returncode == 0

    # Peak RSS on a stream ten times larger: bounded, not proportional.
    big = args.big_stream_gib << 30
    gen = os.path.join(args.bin, "aitbc-backup-bench-data")
    run("aitbc_local_big_stream", f"{gen} stream {big} | {local} put big > /dev/null")
    results["aitbc_local_big_stream"]["mb_s"] = round(big / 1e6 / results["aitbc_local_big_stream"]["wall_s"], 1)

    def ratio(a, b):
        return round(results[a]["mb_s"] / results[b]["mb_s"], 2)

    for name, m in results.items():
        emit(scenario="repository", measure=name, data_bytes=size, **m)
    emit(scenario="repository", measure="summary", restored_identical=same,
         backup_local_vs_tar_czf=ratio("aitbc_local", "tar_czf"),
         backup_local_vs_tar_zstd=ratio("aitbc_local", "tar_zstd"),
         backup_local_vs_restic=ratio("aitbc_local", "restic"),
         backup_encrypted_vs_restic=ratio("aitbc_local_encrypted", "restic"),
         backup_encrypted_sealed_vs_v1=ratio("aitbc_local_encrypted", "aitbc_local_encrypted_v1"),
         backup_s3_vs_restic=ratio("aitbc_s3", "restic"),
         backup_s3_vs_restic_s3=ratio("aitbc_s3", "restic_s3"),
         backup_s3_vs_tar_czf=ratio("aitbc_s3", "tar_czf"),
         # Both cores busy all the time with the CPU the S3 backup took (client and server):
         # the most any run on this machine could reach.
         backup_s3_two_core_ceiling_mb_s=round(
             mb / ((results["aitbc_s3"]["cpu_s"] + results["aitbc_s3"]["server_cpu_s"]) / 2), 1),
         restore_local_vs_restic=ratio("restore_aitbc_local", "restore_restic"),
         restore_s3_vs_restic=ratio("restore_aitbc_s3", "restore_restic"),
         restore_local_vs_tar_czf=ratio("restore_aitbc_local", "restore_tar_czf"),
         restore_stream_local_vs_restic=ratio("restore_stream_aitbc_local", "restore_stream_restic"),
         restore_stream_s3_vs_restic=ratio("restore_stream_aitbc_s3", "restore_stream_restic"),
         restore_s3_vs_restic_s3=ratio("restore_aitbc_s3", "restore_restic_s3"),
         unchanged_local_mb_s=results["aitbc_local_unchanged"]["mb_s"],
         unchanged_local_from_file_mb_s=results["aitbc_local_unchanged_from_file"]["mb_s"],
         backup_local_from_file_mb_s=results["aitbc_local_from_file"]["mb_s"],
         peak_rss_1gib_mib=results["aitbc_local"]["max_rss_mib"],
         peak_rss_big_stream_mib=results["aitbc_local_big_stream"]["max_rss_mib"])
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
