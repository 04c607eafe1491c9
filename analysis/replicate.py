"""Replicate the paper's claims with several seeds and print the README's table.

  python analysis/replicate.py run [--out runs/replication] [--seeds 0-4]
  python analysis/replicate.py table [--out runs/replication]

`run` calls `paramarket run` once per (dataset, alignment, d) cell, each cell a run folder;
it skips cells already written, so an interrupted study resumes. `table` reads only the
run folders' summary.json files and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

SCENARIOS = {"digits": "paper_two_agent", "mnist1d": "paper_mnist1d"}
DS = (0.1, 0.2, 0.4, 0.8)


def cells():
    for dataset, scenario in SCENARIOS.items():
        for align in (True, False):
            for d in DS:
                name = f"{dataset}_{'align' if align else 'noalign'}_d{d}"
                yield name, scenario, [f"broker.align={str(align).lower()}", f"data.split.d={d}"]


def run(out: pathlib.Path, seeds: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, scenario, sets in cells():
        if (out / name / "summary.json").exists():
            continue
        cmd = [
            sys.executable,
            "-m",
            "paramarket_jax.cli",
            "run",
            scenario,
            "--out",
            str(out / name),
            "--seeds",
            seeds,
            "--quiet",
        ]
        for s in sets:
            cmd += ["--set", s]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)


def table(out: pathlib.Path) -> str:
    rows = [
        "| dataset | d | alignment | market acc | siloed acc | gain (market - siloed) "
        "| mutual gain | trades/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in cells():
        path = out / name / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        seeds = s["per_seed"].values()
        market = [np.mean(v["market_accuracy"]) for v in seeds]
        siloed = [np.mean(v["siloed_accuracy"]) for v in seeds]
        gain = np.subtract(market, siloed)
        trades = [v["trades"] for v in seeds]
        dataset, align, d = name.split("_")
        rows.append(
            f"| {dataset} | {d[1:]} | {'on' if align == 'align' else 'off'} "
            f"| {np.mean(market):.3f} ± {np.std(market):.3f} "
            f"| {np.mean(siloed):.3f} ± {np.std(siloed):.3f} "
            f"| {np.mean(gain):+.3f} ± {np.std(gain):.3f} "
            f"| {sum(v['mutual_gain'] for v in seeds)}/{len(market)} "
            f"| {np.mean(trades):.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["run", "table"])
    ap.add_argument("--out", default="runs/replication")
    ap.add_argument("--seeds", default="0-4")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if args.command == "run":
        run(out, args.seeds)
    print(table(out))


if __name__ == "__main__":
    main()
