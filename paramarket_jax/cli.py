"""The ``paramarket`` command."""

from __future__ import annotations

import argparse
import sys

from paramarket_jax.errors import ParamarketError


def parse_options(pairs: list[str], what: str) -> dict:
    """``["alpha=0.5", "widths=32,16"]`` -> ``{"alpha": 0.5, "widths": [32, 16]}``."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ParamarketError(f"{what} option {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = parse_value(raw.strip())
    return out


def parse_value(raw: str):
    """A command-line value: int, float, bool, comma list of those, or a string."""
    if "," in raw:
        return [parse_value(v) for v in raw.split(",") if v]
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramarket", description="Simulate parameter markets of Flax models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a population of agents siloed and report accuracy")
    run.add_argument("--agents", type=int, default=8, help="number of agents (default 8)")
    run.add_argument("--dataset", default="digits", help="dataset name (default digits)")
    run.add_argument("--data-dir", default=None, help="directory of mnist/cifar10 files")
    run.add_argument("--split", default="dirichlet", help="partitioner (default dirichlet)")
    run.add_argument(
        "--split-opt",
        action="append",
        default=[],
        metavar="K=V",
        help="partitioner option, e.g. alpha=0.5 or d=0.1 (repeatable)",
    )
    run.add_argument("--model", default="mlp", help="model name (default mlp)")
    run.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="K=V",
        help="model option, e.g. widths=64,64 (repeatable)",
    )
    run.add_argument("--optimizer", default="adam", help="optimizer name (default adam)")
    run.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--rounds", type=int, default=10)
    run.add_argument("--local-steps", type=int, default=50)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def cmd_run(args) -> int:
    from tqdm import tqdm

    from paramarket_jax.siloed import SiloedConfig, prepare_siloed, run_siloed

    split_options = parse_options(args.split_opt, "split")
    if args.split == "dirichlet":
        split_options.setdefault("alpha", 0.5)
    data_options = {"path": args.data_dir} if args.data_dir else {}
    cfg = SiloedConfig(
        agents=args.agents,
        dataset=args.dataset,
        data_options=data_options,
        split=args.split,
        split_options=split_options,
        model=args.model,
        model_options=parse_options(args.model_opt, "model"),
        optimizer=args.optimizer,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        rounds=args.rounds,
        local_steps=args.local_steps,
        seed=args.seed,
    )
    setup = prepare_siloed(cfg)
    with tqdm(total=cfg.rounds, desc="rounds", disable=args.quiet, file=sys.stderr) as bar:
        res = run_siloed(setup, progress=lambda r: bar.update(1))
    print(
        f"siloed training: {cfg.agents} agents, {cfg.dataset}/{cfg.split}, {cfg.model}, "
        f"{cfg.rounds} rounds x {cfg.local_steps} steps, seed {cfg.seed}"
    )
    print(f"{'agent':>5} {'shard':>6} {'val_acc':>8} {'test_acc':>9}")
    for i in range(cfg.agents):
        print(
            f"{i:>5} {res.shard_size[i]:>6} {res.val_accuracy[i]:>8.3f} "
            f"{res.test_accuracy[i]:>9.3f}"
        )
    print(f"{'mean':>5} {'':>6} {res.val_accuracy.mean():>8.3f} {res.test_accuracy.mean():>9.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"run": cmd_run}[args.command](args)
    except ParamarketError as err:
        print(f"paramarket: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"paramarket: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
