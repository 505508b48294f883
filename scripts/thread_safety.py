#!/usr/bin/env python3
"""Clang's thread-safety analysis over the sources that declare locks.

Runs `clang++ -fsyntax-only -Wthread-safety -Werror` on every translation unit of the given
build's compile_commands.json that lives under one of the checked folders, with the build's own
include paths and definitions. GCC ignores the ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED
annotations; this makes them checked. Exit status: 0 when every file is clean, 1 otherwise.

  scripts/thread_safety.py BUILD_DIR [--jobs N]
"""
import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys

CHECKED = ("cachesvc/", "offload/", "policies/", "clients/cpp/")
# GCC-only flags clang does not take.
DROP = {"-fopenmp"}


def clang_command(entry, clang, root):
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    out = [clang, "-fsyntax-only", "-Wthread-safety", "-Wthread-safety-beta", "-Werror=thread-safety"]
    skip = False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a == "-o":
            skip = True
            continue
        if a in DROP or a == "-c":
            continue
        out.append(a)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("build_dir")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ns = parser.parse_args()
    clang = shutil.which("clang++")
    if clang is None:
        print("thread_safety: clang++ not found (scripts/setup.sh installs clang)", file=sys.stderr)
        return 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(ns.build_dir, "compile_commands.json")) as f:
        entries = json.load(f)
    todo = []
    for e in entries:
        rel = os.path.relpath(e["file"], root)
        if rel.startswith(CHECKED) and rel.endswith(".cc"):
            todo.append((rel, clang_command(e, clang, root), e["directory"]))
    todo.sort()

    def run(item):
        rel, cmd, cwd = item
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        return rel, p.returncode, p.stderr

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=ns.jobs) as pool:
        for rel, rc, err in pool.map(run, todo):
            if rc != 0:
                failed += 1
                print(f"FAIL {rel}\n{err}")
    print(f"thread_safety: {len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
