"""Siloed training: every agent trains alone on its own shard (the market's counterfactual)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from paramarket_jax.data import load_dataset, partition
from paramarket_jax.errors import ParamarketError
from paramarket_jax.models import make_model
from paramarket_jax.population import AgentData, Trainer, agent_data, check_finite, make_trainer


@dataclasses.dataclass(frozen=True)
class SiloedConfig:
    """What a siloed population run needs; every random choice flows from ``seed``."""

    agents: int = 8
    dataset: str = "digits"
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: str = "dirichlet"
    split_options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"alpha": 0.5})
    model: str = "mlp"
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    batch_size: int = 32
    rounds: int = 10
    local_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("agents", "batch_size", "rounds", "local_steps"):
            if getattr(self, name) < 1:
                raise ParamarketError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ParamarketError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class SiloedResult:
    """Per-agent outcomes; arrays have a leading axis N (agents), curves (rounds, N)."""

    shard_size: np.ndarray
    val_accuracy: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    test_accuracy_curve: np.ndarray


class SiloedSetup(NamedTuple):
    """Everything a siloed run builds before training (all bad input fails here)."""

    cfg: SiloedConfig
    trainer: Trainer
    data: AgentData
    shard_size: np.ndarray
    k_init: jax.Array
    k_train: jax.Array


def prepare_siloed(cfg: SiloedConfig) -> SiloedSetup:
    """Load data, partition it and build the model; raises ParamarketError on bad input."""
    k_data, k_split, k_init, k_train = jax.random.split(jax.random.key(cfg.seed), 4)
    dataset = load_dataset(cfg.dataset, k_data, **cfg.data_options)
    part = partition(cfg.split, k_split, dataset, cfg.agents, **cfg.split_options)
    model = make_model(
        cfg.model, dataset.x_train.shape[1:], dataset.num_classes, **cfg.model_options
    )
    trainer = make_trainer(model, cfg.optimizer, cfg.batch_size)
    data = agent_data(dataset, part)
    return SiloedSetup(cfg, trainer, data, np.asarray(part.train_size), k_init, k_train)


def run_siloed(setup: SiloedSetup, progress=None) -> SiloedResult:
    """Train the agents siloed for ``cfg.rounds`` rounds, evaluating on test each round.

    Args:
        setup: from :func:`prepare_siloed`.
        progress: optional callable taking the round index after each round.
    """
    cfg, trainer, data = setup.cfg, setup.trainer, setup.data
    pop = trainer.init(setup.k_init, cfg.agents, cfg.learning_rate)
    curve = []
    for r in range(cfg.rounds):
        pop, _ = trainer.train(pop, jax.random.fold_in(setup.k_train, r), data, cfg.local_steps)
        _, acc = trainer.evaluate(pop.params, data.x_test, data.y_test, data.test_idx)
        curve.append(np.asarray(acc))
        if progress is not None:
            progress(r)
    check_finite(pop.params)
    _, val_acc = trainer.evaluate(pop.params, data.x_val, data.y_val, data.val_idx)
    test_loss, test_acc = trainer.evaluate(pop.params, data.x_test, data.y_test, data.test_idx)
    return SiloedResult(
        shard_size=setup.shard_size,
        val_accuracy=np.asarray(val_acc),
        test_loss=np.asarray(test_loss),
        test_accuracy=np.asarray(test_acc),
        test_accuracy_curve=np.stack(curve),
    )
