"""Shared benchmark plumbing: device name, timing, peak memory, JSON lines, probe import."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import resource
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR_DIR = REPO.parent / "shared" / "bench"
# the bundled transformer scenarios' (transformer_arithmetic, vit_digits) model shape, their
# arithmetic data and optimizer
TRANSFORMER_SHAPE = dict(layers=2, heads=4, d_model=32, d_head=8, d_mlp=64)
ARITHMETIC = dict(modulus=23, operations=("+", "-", "*", "/"), fraction=0.9)
TRANSFORMER_LR = 0.003


def device_name() -> str:
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else dev.device_kind


def peak_mem_mb() -> float:
    """Peak device memory on an accelerator, else this process's peak resident memory."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timeit(fn, *args, reps: int = 3) -> float:
    """Median wall time of ``fn(*args)`` after one warm-up call (which compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def scaled_data(n: int, rows_per_agent: int = 20) -> list[str]:
    """Overrides giving N agents enough training rows at any N (the bundled mnist1d has about
    3,400, too few past N = 1,700): a gaussian mixture of mnist1d's shape (40 features, 10
    classes) with ``rows_per_agent`` training rows per agent (at least the 4,000 default
    pool), split iid (the label-skewed dirichlet split cannot redraw to every agent holding
    2 rows at tens of thousands of agents)."""
    pool = max(4000, -(-rows_per_agent * n * 100 // 85))  # 15% of the pool is validation
    return [
        "data.dataset='gaussian'",
        "data.dim=40",
        f"data.n_train={pool}",
        "data.split.name='iid'",
    ]


def transformer_shape(text: str = "") -> dict[str, int]:
    """:data:`TRANSFORMER_SHAPE` with ``key=value`` overrides, e.g. ``"d_model=128,d_head=32"``."""
    shape = dict(TRANSFORMER_SHAPE)
    for item in (t for t in text.split(",") if t):
        name, _, value = item.partition("=")
        if name.strip() not in shape:
            raise SystemExit(f"unknown transformer shape key {name!r}; known: {', '.join(shape)}")
        shape[name.strip()] = int(value)
    return shape


def emit(
    bench: str,
    case: str,
    n: int,
    metric: str,
    value: float,
    baseline: str,
    baseline_value: float | None,
    **extra,
) -> dict:
    """Print one JSON line in the benchmark schema of DESIGN.md section 8."""
    row = dict(
        bench=bench,
        case=case,
        n=n,
        device=device_name(),
        metric=metric,
        value=value,
        baseline=baseline,
        baseline_value=baseline_value,
        ratio=(value / baseline_value) if baseline_value else None,
        **extra,
    )
    print(json.dumps(row), flush=True)
    return row


def load_anchor(anchor_dir: str | pathlib.Path, name: str):
    """Import a reference probe (``population_anchor``, ``align_anchor``) by file path."""
    path = pathlib.Path(anchor_dir) / f"{name}.py"
    if not path.exists():
        print(
            json.dumps(dict(bench="anchor", case=name, error=f"probe not found: {path}")),
            file=sys.stdout,
            flush=True,
        )
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
