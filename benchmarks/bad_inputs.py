"""Bad input: run the corpus of tests/bad_inputs.py and fuzz the text parsers; print a table
and write JSON.

    python benchmarks/bad_inputs.py                      # corpus + 10,000 mutations per parser
    python benchmarks/bad_inputs.py --mutations 500      # quicker
    python benchmarks/bad_inputs.py --src ../old/src     # the same run against another checkout

The corpus runs in a child process, one case after another, so a case that kills the process
(a segfault) is recorded as a crash and the run goes on with the next case. Outcomes per case:
clear error (the project's error naming the file), warning, ok, unclear error, silent wrong,
data loss, code ran, crash. Fuzzing applies 1-4 random mutations (tests/bad_inputs.mutate) to a
real file per run and counts the project's errors, warnings, accepted files and foreign
exceptions (anything else: the target is 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def _corpus():
    """tests/bad_inputs.py (this script has the same name, so load it by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nh_bad_inputs", TESTS / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nh_bad_inputs"] = module
    spec.loader.exec_module(module)
    return module


def _child(first: int, out: Path) -> None:
    """Run cases ``first..`` and append one JSON line per case to ``out``."""
    corpus = _corpus()
    cases, run_case = corpus.cases, corpus.run_case

    os.environ.setdefault("NAPARI_HINGE_CACHE", tempfile.mkdtemp(prefix="nh-cache-"))
    all_cases = cases()
    skip = [k for k in os.environ.get("NH_BAD_INPUT_SKIP", "").split("|") if k]
    for i in range(first, len(all_cases)):
        case = all_cases[i]
        if any(k in case.name for k in skip):
            continue
        with open(out, "a") as fh:  # before running: the parent knows which case died
            fh.write(json.dumps({"index": i, "started": case.name, "group": case.group}) + "\n")
        with tempfile.TemporaryDirectory(prefix="bad-input-") as tmp:
            result = run_case(case, Path(tmp) / "case")
        with open(out, "a") as fh:
            fh.write(json.dumps({"index": i, **result.__dict__, "expect": case.expect}) + "\n")


def run_corpus(env: dict) -> list[dict]:
    out = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    results: dict[int, dict] = {}
    first = 0
    while True:
        subprocess.run([sys.executable, __file__, "--child", str(first), str(out)], env=env,
                       check=False)
        lines = [json.loads(line) for line in out.read_text().splitlines() if line]
        for rec in lines:
            if "outcome" in rec:
                results[rec["index"]] = rec
        started = [rec for rec in lines if "started" in rec and rec["index"] not in results]
        if not started:
            break
        dead = started[-1]  # the child died inside this case
        results[dead["index"]] = {"index": dead["index"], "case": dead["started"],
                                  "group": dead["group"], "outcome": "crash",
                                  "detail": "the process was killed"}
        first = dead["index"] + 1
    out.unlink()
    return [results[i] for i in sorted(results)]


def fuzz(n: int, seed: int) -> dict[str, Counter]:
    import numpy as np

    corpus = _corpus()
    OPS, PARSERS, TOKENS = corpus.OPS, corpus.PARSERS, corpus.TOKENS
    mutate, own_errors, parse_mutated = corpus.mutate, corpus.own_errors, corpus.parse_mutated

    own = own_errors()
    rng = np.random.default_rng(seed)
    counts: dict[str, Counter] = {}
    examples: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        for name, (seed_bytes, _, _) in PARSERS.items():
            data = seed_bytes()
            c = Counter()
            for _ in range(n):
                ops = [(OPS[rng.integers(len(OPS))], float(rng.random()), float(rng.random()),
                        int(rng.integers(10 * len(TOKENS)))) for _ in range(rng.integers(1, 5))]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        parse_mutated(name, mutate(data, ops), Path(tmp))
                        c["warning" if caught else "accepted"] += 1
                    except own:
                        c["clear error"] += 1
                    except Exception as err:  # noqa: BLE001 - counting foreign exceptions
                        c["foreign exception"] += 1
                        examples.setdefault(name, []).append(
                            f"{type(err).__name__}: {str(err)[:120]} <- {ops}")
            counts[name] = c
    return counts, examples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mutations", type=int, default=10_000, help="fuzzing runs per parser")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--src", type=Path, default=None,
                    help="run against another checkout's src/ (e.g. the code before a fix)")
    ap.add_argument("--skip", action="append", default=[],
                    help="skip cases whose name contains this (e.g. slow ones on old code)")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "bad_inputs.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-fuzz", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(int(args.child[0]), Path(args.child[1]))
        return 0
    if args.child_fuzz:
        counts, examples = fuzz(int(args.child_fuzz[0]), int(args.child_fuzz[1]))
        Path(args.child_fuzz[2]).write_text(json.dumps(
            {"counts": {k: dict(v) for k, v in counts.items()}, "examples": examples}))
        return 0

    env = dict(os.environ, NH_BAD_INPUT_SKIP="|".join(args.skip))
    if args.src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src.resolve()), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    corpus = run_corpus(env)
    t_corpus = time.perf_counter() - t0

    # fuzz in a child too: the same interpreter setup (and --src) as the corpus
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    subprocess.run([sys.executable, __file__, "--child-fuzz", str(args.mutations),
                    str(args.seed), str(out)], env=env, check=True)
    raw = json.loads(out.read_text())
    out.unlink()
    fuzzed, examples = {k: Counter(v) for k, v in raw["counts"].items()}, raw["examples"]
    t_total = time.perf_counter() - t0

    groups = sorted({r["group"] for r in corpus})
    outcomes = ["clear error", "warning", "ok", "unclear error", "silent wrong", "data loss",
                "code ran", "crash"]
    print(f"\ncorpus: {len(corpus)} cases ({t_corpus:.0f} s)")
    print("| class | cases | " + " | ".join(outcomes) + " |")
    print("|---|---|" + "---|" * len(outcomes))
    for g in [*groups, "all"]:
        rows = [r for r in corpus if g in ("all", r["group"])]
        c = Counter(r["outcome"] for r in rows)
        label = f"**{g}**" if g == "all" else g
        print(f"| {label} | {len(rows)} | " + " | ".join(str(c[o]) for o in outcomes) + " |")
    bad = [r for r in corpus if r["outcome"] != r.get("expect", r["outcome"])]
    for r in bad:
        print(f"  - {r['case']}: {r['outcome']} ({r['detail'][:160]})")
    print(f"\nfuzzing: {args.mutations} mutations per parser (seed {args.seed})")
    kinds = ["clear error", "warning", "accepted", "foreign exception"]
    print("| parser | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, c in fuzzed.items():
        print(f"| {name} | " + " | ".join(f"{c[k]:,}" for k in kinds) + " |")
    for name, ex in examples.items():
        for line in ex[:3]:
            print(f"  - {name}: {line[:200]}")
    print(f"\n{t_total:.0f} s in all")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "src": str(args.src) if args.src else "this checkout", "seconds": round(t_total, 1),
        "corpus": corpus, "fuzz": {"mutations_per_parser": args.mutations, "seed": args.seed,
                                   "counts": {k: dict(v) for k, v in fuzzed.items()},
                                   "foreign_examples": {k: v[:20] for k, v in examples.items()}},
    }, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
