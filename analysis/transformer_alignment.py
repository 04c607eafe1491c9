"""Does alignment matter for transformers? The loss along the interpolation path between
independently trained small GPTs (modular arithmetic) and ViTs (digits).

python analysis/transformer_alignment.py --out runs/transformer_alignment \
    --figure docs/figures/transformer_alignment.png

For each model kind and seed two models are trained from different initialisations and
batch orders on the same rows (one jitted, vmapped trainer for every model of a kind).
The second is then brought into the first's basis by each arm:

  ``none``: as trained; ``flat/identity`` and ``flat/shared``: weight matching with every
  head set's units as one ordinary group (``broker.heads = "flat"``, mixing heads: not
  function-preserving), residual stream left alone or permuted; ``grouped/identity`` and
  ``grouped/shared``: head-aware weight matching (``broker.heads = "grouped"``).

and the merge ``(1 - alpha) * first + alpha * second`` is scored on the test split for
alpha in 0, 0.1, ..., 1. The barrier is ``loss(0.5) - (loss(0) + loss(1)) / 2``; the
weight distance ``||first - moved second|| / ||first||`` is what weight matching shrinks. Writes
``path.parquet`` (one row per kind, seed, arm, alpha) and ``barrier.csv`` into ``--out``,
prints a markdown table, and draws the figure.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from paramarket_jax.broker.align import align
from paramarket_jax.broker.merge import merge
from paramarket_jax.data import load_dataset
from paramarket_jax.models import apply_permutation, make_model

ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 2)
ARMS = ("none", "flat/identity", "flat/shared", "grouped/identity", "grouped/shared")
SHAPE = {"layers": 2, "heads": 4, "d_model": 32, "d_head": 8, "d_mlp": 64}
KINDS = {
    # the bundled scenarios' model shapes and data
    "gpt": ("arithmetic", {"modulus": 23, "operations": ["+", "-"], "fraction": 0.9}, {}),
    "vit": ("digits", {}, {"patch": 2, "pool": "cls"}),
}


def trained_pairs(kind: str, seeds: int, steps: int, lr: float, batch: int):
    """The dataset, the model and (seeds, 2) trained parameter pytrees of one kind."""
    name, data_options, model_options = KINDS[kind]
    data = load_dataset(name, jax.random.key(0), **data_options)
    model = make_model(
        kind, data.input_shape, data.num_classes, vocab=data.vocab, **SHAPE, **model_options
    )
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    tx = optax.adam(lr)

    def train(key):
        k_init, k_batches = jax.random.split(key)
        params = model.init(k_init)

        def step(carry, k):
            p, o = carry
            rows = jax.random.randint(k, (batch,), 0, x.shape[0])
            grads = jax.grad(lambda q: model.losses(q, x[rows], y[rows])[0].mean())(p)
            updates, o = tx.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), None

        keys = jax.random.split(k_batches, steps)
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    keys = jax.random.split(jax.random.key(1), 2 * seeds)
    params = jax.jit(jax.vmap(train))(keys)
    return data, model, jax.tree.map(lambda v: v.reshape(seeds, 2, *v.shape[1:]), params)


def spec_of(kind: str, data, residual: str, heads: str, model_options):
    model = make_model(
        kind, data.input_shape, data.num_classes, vocab=data.vocab,
        **{**SHAPE, "residual": residual}, **model_options,
    )  # fmt: skip
    return model.spec if heads == "grouped" else model.spec.unblocked()


def path_losses(model, first, second, x, y):
    """(alphas,) test loss and accuracy of the merges along the path."""

    def at(alpha):
        loss, correct = model.losses(merge(first, second, alpha), x, y)
        return loss.mean(), correct.mean()

    return jax.jit(jax.vmap(at))(jnp.asarray(ALPHAS, jnp.float32))


def relative_distance(first, second) -> float:
    """``||first - second|| / ||first||`` over every parameter: what weight matching
    shrinks (it maximises the inner product of the two models' weights)."""
    pairs = zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in pairs)
    norm = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(first))
    return float(np.sqrt(diff / norm))


def study(kind: str, seeds: int, steps: int, lr: float, batch: int) -> pd.DataFrame:
    t0 = time.perf_counter()
    data, model, params = trained_pairs(kind, seeds, steps, lr, batch)
    print(f"{kind}: trained {2 * seeds} models in {time.perf_counter() - t0:.1f} s", flush=True)
    x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    model_options = KINDS[kind][2]
    rows = []
    for seed in range(seeds):
        first = jax.tree.map(lambda v, s=seed: v[s, 0], params)
        second = jax.tree.map(lambda v, s=seed: v[s, 1], params)
        for arm in ARMS:
            moved = second
            if arm != "none":
                heads, residual = arm.split("/")
                spec = spec_of(kind, data, residual, heads, model_options)
                perms = align(spec, first, second, jax.random.key(seed))
                moved = apply_permutation(spec, perms, second)
            loss, acc = path_losses(model, first, moved, x, y)
            distance = relative_distance(first, moved)
            for a, lo, ac in zip(ALPHAS, np.asarray(loss), np.asarray(acc), strict=True):
                rows.append(
                    {"kind": kind, "seed": seed, "arm": arm, "alpha": float(a),
                     "loss": float(lo), "accuracy": float(ac), "distance": distance}
                )  # fmt: skip
    print(f"{kind}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return pd.DataFrame(rows)


def barriers(path: pd.DataFrame) -> pd.DataFrame:
    """Per kind, arm and seed: loss and accuracy at the ends and at alpha 0.5, the barrier."""
    wide = path.pivot_table(
        index=["kind", "arm", "seed"], columns="alpha", values=["loss", "accuracy"]
    )
    out = pd.DataFrame(
        {
            "loss_end_first": wide[("loss", 0.0)],
            "loss_end_second": wide[("loss", 1.0)],
            "loss_mid": wide[("loss", 0.5)],
            "acc_mid": wide[("accuracy", 0.5)],
            "acc_ends": (wide[("accuracy", 0.0)] + wide[("accuracy", 1.0)]) / 2,
            "distance": path.groupby(["kind", "arm", "seed"])["distance"].first(),
        }
    )
    out["barrier"] = out["loss_mid"] - (out["loss_end_first"] + out["loss_end_second"]) / 2
    return out.reset_index()


def table(b: pd.DataFrame) -> str:
    lines = [
        "| model | arm | weight distance | loss at alpha = 1 (second model, moved) | "
        "barrier at 0.5 | accuracy at 0.5 | mean accuracy of the ends |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kind, arm), g in b.groupby(["kind", "arm"], sort=False):

        def ms(col, scale=1.0, g=g):
            v = g[col].to_numpy() * scale
            return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"

        lines.append(
            f"| {kind} | {arm} | {ms('distance')} | {ms('loss_end_second')} | {ms('barrier')} | "
            f"{ms('acc_mid')} | {ms('acc_ends')} |"
        )
    return "\n".join(lines)


def figure(path: pd.DataFrame, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(path["kind"]))
    fig = Figure(figsize=(5.2 * len(kinds), 3.8), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    colours = {"none": "0.55", "flat/identity": "#d95f02", "flat/shared": "#e7298a",
               "grouped/identity": "#1b9e77", "grouped/shared": "#7570b3"}  # fmt: skip
    for ax, kind in zip(axes, kinds, strict=True):
        sub = path[path["kind"] == kind]
        for arm in ARMS:
            g = sub[sub["arm"] == arm].groupby("alpha")["loss"]
            mean, std = g.mean(), g.std(ddof=1).fillna(0)
            style = "--" if arm.startswith("flat") else "-"
            ax.plot(mean.index, mean.values, style, color=colours[arm], label=arm)
            ax.fill_between(mean.index, mean - std, mean + std, color=colours[arm], alpha=0.15)
        name = KINDS[kind][0]
        ax.set_title(f"{kind} on {name}: {sub['seed'].nunique()} seeds")
        ax.set_xlabel("alpha (weight of the second model)")
        ax.set_ylabel("test loss of the merge")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="gpt,vit")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500, help="Adam steps per model")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="runs/transformer_alignment")
    ap.add_argument("--figure", default="docs/figures/transformer_alignment.png")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = pd.concat(
        [study(k, args.seeds, args.steps, args.lr, args.batch) for k in args.kinds.split(",")]
    )
    path.to_parquet(out / "path.parquet")
    b = barriers(path)
    b.to_csv(out / "barrier.csv", index=False)
    print(table(b))
    figure(path, pathlib.Path(args.figure))


if __name__ == "__main__":
    main()
