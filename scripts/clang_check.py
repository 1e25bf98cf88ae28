#!/usr/bin/env python3
"""Compiles every C++ source of a build with clang++ -fsyntax-only, with the build's own flags.

The project builds with g++; clang rejects some code that g++ accepts (in C++17, a lambda, such as the one
inside doctest's INFO and CAPTURE, may not name a structured binding: 22 such errors had crept into the tests
before this check). So CI runs this after the build: every translation unit of build/compile_commands.json
(the CUDA backend's .cpp files included when the build has CUDA; .cu files are nvcc's and skipped), on all
cores, with -Wall -Wextra (CMakeLists.txt gives every C++ target these through add_compile_options; they
are added here as well so that a build configured without them is checked the same way). Errors and
warnings both fail the check: the tree had one warning when this began to count them (2026-11-30), and it
was a real one (an aggregate initialised without its last fields).

    scripts/clang_check.py [BUILD_DIR]

BUILD_DIR defaults to the repository's build/ folder (found from this script's place, so the check runs
from any folder); a BUILD_DIR given is taken relative to the current folder.
"""
import concurrent.futures
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# g++ options clang does not take or that do not matter for a syntax check.
DROPPED = ("-fno-math-errno",)


def clang_command(entry):
    """The entry's compile command for clang++ -fsyntax-only: its compiler, -c and -o FILE removed."""
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    kept, skip_next = [], False
    for arg in args[1:]:
        if skip_next:
            skip_next = False
        elif arg == "-o":
            skip_next = True
        elif arg != "-c" and arg not in DROPPED:
            kept.append(arg)
    return ["clang++", "-fsyntax-only", "-Wall", "-Wextra"] + kept


def check(entry):
    result = subprocess.run(clang_command(entry), cwd=entry["directory"], capture_output=True, text=True)
    return entry["file"], result.returncode, result.stderr


def usage_error(message):
    usage = __doc__[__doc__.index("    scripts/clang_check.py"):].rstrip()  # the docstring's last part
    print(f"clang_check: {message}\nusage:\n{usage}", file=sys.stderr)
    return 2


def main():
    args = sys.argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.rstrip())
        return 0
    if args[:1] == ["--"]:  # a BUILD_DIR starting with '-' goes after '--'
        args = args[1:]
    elif args and args[0].startswith("-"):
        return usage_error(f"unknown option {args[0]}")
    if len(args) > 1:
        return usage_error(f"one BUILD_DIR at most, got {len(args)}: {' '.join(args)}")
    if args and not args[0]:
        return usage_error("BUILD_DIR is empty")
    # The default is found from the script's place: taken from the current folder, it sent anyone running the
    # check from elsewhere to "build first" although the build was there.
    build = args[0] if args else str(ROOT / "build")
    database = os.path.join(build, "compile_commands.json")
    if not os.path.isfile(database):
        sys.exit(f"clang_check: no {database}: build first (scripts/build.sh)")
    if shutil.which("clang++") is None:
        sys.exit("clang_check: clang++ not found; run scripts/setup.sh --test")
    entries = [e for e in json.load(open(database)) if e["file"].endswith(".cpp")]
    failed, warned = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for path, returncode, stderr in pool.map(check, entries):
            if returncode != 0:
                failed.append(path)
            elif stderr.strip():
                warned.append(path)
            if stderr.strip():
                print(stderr.rstrip())
    print(f"clang_check: {len(entries)} files, {len(failed)} with errors, {len(warned)} with warnings only")
    for path in failed:
        print(f"  error: {os.path.relpath(path)}")
    for path in warned:
        print(f"  warning: {os.path.relpath(path)}")
    return 1 if failed or warned else 0


if __name__ == "__main__":
    sys.exit(main())
