#!/usr/bin/env python3
"""Mount -> first stat: milliseconds from starting a foreground mount to the first successful
stat of an entry below it, for granary builds and squashfuse_ll, alternating in one sitting.

The probe is os.stat every 0.5 ms from this process: no fork per probe (compare.sh's
`stat` + `sleep 0.005` quantises to ≈ 7 ms) and no busy loop taking a core from the mount
(the machine has two). Run as root (FUSE); the store's and image's files should be warm.

Usage:
  benches/first_stat.py --first PATH [--runs N] [--rounds R]
                        [--granary BIN=STORE_DIR ...] [--squashfs IMAGE]
PATH is the entry to stat, relative to the mount of a granary store (its root's name first,
e.g. pystore/<hash>-python-3.13.0); for squashfuse_ll the first component is dropped.
Prints each system's per-round median and the median of the rounds.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def once(cmd, mnt, probe, deadline_s=30.0):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                os.stat(probe)
                return (time.monotonic() - t0) * 1000
            except OSError:
                if p.poll() is not None:
                    sys.exit(f"{cmd[0]} exited ({p.returncode}) before {probe} answered")
                if time.monotonic() - t0 > deadline_s:
                    sys.exit(f"{probe} did not answer within {deadline_s} s")
                time.sleep(0.0005)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            subprocess.run(["umount", "-l", mnt], check=False)
        while mounted(mnt):
            time.sleep(0.01)
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--first", required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--granary", action="append", default=[], metavar="BIN=STORE_DIR")
    ap.add_argument("--squashfs")
    a = ap.parse_args()
    mnt = tempfile.mkdtemp(prefix="first-stat-")
    systems = []
    for g in a.granary:
        binary, store = g.split("=", 1)
        cmd = [binary, "--store", f"file://{store}", "mount", mnt]
        systems.append((f"granary {binary}", cmd, os.path.join(mnt, a.first)))
    if a.squashfs:
        inner = a.first.split("/", 1)[1] if "/" in a.first else a.first
        cmd = ["squashfuse_ll", "-f", a.squashfs, mnt]
        systems.append(("squashfuse_ll", cmd, os.path.join(mnt, inner)))
    medians = {name: [] for name, _, _ in systems}
    try:
        for r in range(a.rounds):
            for name, cmd, probe in systems:
                ms = [once(cmd, mnt, probe) for _ in range(a.runs)]
                medians[name].append(statistics.median(ms))
                print(f"round {r + 1} {name}: median {medians[name][-1]:.1f} ms "
                      f"(min {min(ms):.1f}, max {max(ms):.1f})", flush=True)
    finally:
        if mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)
    for name, m in medians.items():
        print(f"{name}: {statistics.median(m):.1f} ms (rounds: "
              f"{', '.join(f'{x:.1f}' for x in m)})")


if __name__ == "__main__":
    main()
