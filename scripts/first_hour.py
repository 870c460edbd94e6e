"""A newcomer's first hour: run the README top to bottom and report every step.

Each line of the README's ```bash blocks and each ```python block is one step, run in README
order from the root of a fresh clone of this repository (``git clone`` of HEAD, with
``../shared`` linked beside it as in the README's paths), under ``bash -e`` with the clone's
``.venv/bin`` first on PATH and its ``src`` on PYTHONPATH. Prints one line per step (exit
status, seconds) and writes JSON:

    python scripts/first_hour.py                                  # everything (an hour+)
    python scripts/first_hour.py --venv .venv --skip 'make |pip |venv|train'   # reuse a venv
    python scripts/first_hour.py --only 'spatial-info|--help'     # the fast command lines

Exit status 0 only when every step that ran passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_steps(readme: Path) -> list[dict]:
    """Steps in README order: one per bash line (comments cut), one per python block."""
    steps = []
    for lang, body in re.findall(r"```(bash|python)\n(.*?)```", readme.read_text(), flags=re.S):
        if lang == "python":
            steps.append({"kind": "python", "code": body})
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                steps.append({"kind": "bash", "code": line})
    return steps


def fresh_clone(dest: Path, venv: Path | None) -> Path:
    clone = dest / REPO.name
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shared = REPO.parent / "shared"
    if shared.is_dir() and not (dest / "shared").exists():
        (dest / "shared").symlink_to(shared)
    if venv is not None:
        (clone / ".venv").symlink_to(venv.resolve())
    return clone


def run_step(step: dict, clone: Path, timeout: float) -> dict:
    # the clone's own code, also when --venv links an environment installed elsewhere
    env = {**os.environ, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(clone / "src")}
    if step["kind"] == "python":
        cmd = [str(clone / ".venv" / "bin" / "python"), "-c", step["code"]]
    else:
        cmd = ["bash", "-e", "-c", step["code"]]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, tail = done.returncode, (done.stderr or done.stdout)[-800:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout:.0f} s"
    return {**step, "rc": rc, "seconds": round(time.perf_counter() - start, 2),
            "tail": tail if rc else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None,
                        help="link this virtual environment into the clone instead of "
                             "letting the README's install steps build one")
    parser.add_argument("--only", default=None, help="run only steps matching this regex")
    parser.add_argument("--skip", default=None, help="skip steps matching this regex")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds per step (default 3600)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="clone into this (new) folder and keep it, with its venv, for "
                             "reruns with --venv DIR/<repo>/.venv (default: a temporary folder)")
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier report: the steps this run skips keep their result "
                             "from it (each step records the commit it ran on)")
    parser.add_argument("--json", type=Path, default=Path("first_hour.json"),
                        help="where to write the report (default first_hour.json)")
    args = parser.parse_args(argv)

    steps = readme_steps(REPO / "README.md")
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="first_hour_")))
        else:
            args.keep.mkdir(parents=True)
            tmp = args.keep
        clone = fresh_clone(tmp, args.venv)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone,
                                capture_output=True, text=True).stdout.strip()
        results = []
        for step in steps:
            code = step["code"]
            if (args.only and not re.search(args.only, code)) or (
                    args.skip and re.search(args.skip, code)):
                results.append({**step, "rc": None, "seconds": 0.0, "tail": "skipped"})
                continue
            load = os.getloadavg()[0]
            result = {**run_step(step, clone, args.timeout), "commit": commit,
                      "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1),
                      "ran_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            results.append(result)
            status = "ok " if result["rc"] == 0 else f"rc={result['rc']}"
            first = code.strip().splitlines()[0][:90]
            print(f"{status:6s} {result['seconds']:8.1f} s  {step['kind']:6s} {first}",
                  flush=True)
            if result["rc"]:
                print("       " + result["tail"].strip().replace("\n", "\n       "))
    if args.merge is not None:
        earlier = {(r["kind"], r["code"]): r for r in json.loads(args.merge.read_text())["steps"]}
        results = [earlier.get((r["kind"], r["code"]), r) if r["rc"] is None else r
                   for r in results]
    ran = [r for r in results if r["rc"] is not None]
    failed = [r for r in ran if r["rc"] != 0]
    args.json.write_text(json.dumps({"steps": results, "ran": len(ran), "failed": len(failed),
                                     "skipped": len(results) - len(ran)}, indent=2))
    print(f"{len(ran) - len(failed)}/{len(ran)} steps passed ({len(results) - len(ran)} "
          f"skipped); report in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
