"""Time to the first result: ``paramarket run`` cold, warm and with the cache off.

Every case is a fresh ``paramarket run`` process (a child of this one, so the whole
comparison is one process tree), timed from its start to its exit; the child counts its
XLA compilations and the seconds they took (``jax.monitoring``), and how many of them the
persistent compilation cache answered. For each scenario:

- ``no_cache``: ``--no-cache`` (the baseline: every process compiles everything);
- ``cold``: the cache on, in an empty folder (compiles and writes);
- ``warm``: the same command again (reads what ``cold`` wrote);
- ``warm_knobs``: other traced knobs (seeds, learning rate, price, ``d``): the same programs.

Figures are ratios against ``no_cache`` (``value`` = no-cache seconds / case seconds, so
higher is better), besides the absolute seconds of each case in ``seconds``.

    python -m benchmarks.bench_startup                       # both scenarios
    python -m benchmarks.bench_startup --scenarios paper_two_agent --rounds 2
    python -m benchmarks.bench_startup --scenarios transformer_arithmetic,vit_digits --rounds 4

The transformer scenarios (``transformer_arithmetic``: GPTs on modular arithmetic;
``vit_digits``: vision transformers on digits) take the same cases; their ``warm_knobs``
change the seed and the learning rate. Trading starts at round 3 in both, so keep
``--rounds`` at 4 or more to compile (and time) the broker's valuation too.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.common import emit

REPO = pathlib.Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys
from paramarket_jax.cli.main import main
from paramarket_jax.engines.cache import counted
with counted() as counts:
    rc = main(sys.argv[1:])
print("COUNTS " + json.dumps(counts), flush=True)
sys.exit(rc)
"""

# traced knobs a researcher changes between runs: none of them recompiles
KNOBS = {
    "paper_two_agent": ["--seeds", "1", "--set", "train.learning_rate=0.05",
                        "--set", "data.split.d=0.2"],
    "many_agents_assignment": ["--seeds", "1", "--set", "train.learning_rate=0.05",
                               "--set", "economics.step_cost=0.002"],
    "transformer_arithmetic": ["--seeds", "1", "--set", "train.learning_rate=0.005"],
    "vit_digits": ["--seeds", "1", "--set", "train.learning_rate=0.005"],
}  # fmt: skip


def run_once(scenario: str, out: pathlib.Path, extra: list[str], env: dict) -> dict:
    argv = ["run", scenario, "--no-report", "--quiet", "--out", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("COUNTS ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{scenario} {extra}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return dict(json.loads(line[7:]), seconds=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="paper_two_agent,many_agents_assignment")
    ap.add_argument("--rounds", type=int, default=None, help="override train.rounds")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PARAMARKET_CACHE_DIR", None)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        tmp = pathlib.Path(tmp)
        for scenario in args.scenarios.split(","):
            rounds = ["--set", f"train.rounds={args.rounds}"] if args.rounds else []
            cache = ["--cache-dir", str(tmp / f"cache-{scenario}")]
            cases = {
                "no_cache": ["--no-cache", *rounds],
                "cold": [*cache, *rounds],
                "warm": [*cache, *rounds],
                "warm_knobs": [*cache, *rounds, *KNOBS.get(scenario, ["--seeds", "1"])],
            }
            results = {
                case: run_once(scenario, tmp / f"{scenario}-{case}", extra, env)
                for case, extra in cases.items()
            }
            base = results["no_cache"]["seconds"]
            for case, r in results.items():
                emit(
                    "startup",
                    f"{scenario}/{case}",
                    1,
                    "speedup_vs_no_cache",
                    base / r["seconds"],
                    "no_cache",
                    1.0,
                    seconds=round(r["seconds"], 2),
                    compiles=r["compiles"],
                    cache_hits=r["hits"],
                    compiled=r["compiles"] - r["hits"],
                    compile_seconds=round(r["compile_s"], 2),
                )


if __name__ == "__main__":
    main()
