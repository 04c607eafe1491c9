"""Checkpoints inside a run (``paramarket run --checkpoint-every K``, ``--resume DIR``).

A checkpointed run keeps its ``--out`` folder while it is incomplete::

    OUT/run.json                 what to resume: the resolved scenario, engine, K, options
    OUT/.checkpoints/<r>/        orbax checkpoints after r rounds (the newest two)

Every K rounds (and after the last) the batch path's carry is saved with orbax-checkpoint
(a ``CheckpointManager``: each step is written to a temporary folder and renamed when
complete, so a step folder is whole or absent): the ``MarketState`` of every run (leading
run axis), the records of the rounds so far, the run keys and the round reached.
``paramarket run --resume OUT`` reloads the scenario from ``run.json`` and goes on from
the newest step that restores and fits the run (older ones next, else round 0); rounds
are chunked exactly as :func:`paramarket_jax.market.round.simulate` would run them, so the
tables are the same, bit for bit, as a run never interrupted.

At the end the run's files are renamed into OUT (``summary.json`` last: a folder holding
``summary.json`` is complete), then ``.checkpoints`` and ``run.json`` are removed. Only
the batch engine checkpoints; the Mesa engine refuses ``--checkpoint-every``.

A sweep (``paramarket sweep --checkpoint-every K``) keeps the steps of each batch of cells
in ``DIR/.checkpoints/<group>/`` (see :func:`paramarket_jax.sweep.group_id`); the same
command goes on from them, and a group's folder is removed once its cells are written.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tomllib
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from paramarket_jax import scenario as sc
from paramarket_jax.engines.batch import Batch, Carry, init_runs, simulate_runs_chunk_jit
from paramarket_jax.errors import ParamarketError
from paramarket_jax.results.folders import write_into

RUN_FILE = "run.json"
FOLDER = ".checkpoints"
FORMAT = 1
KEEP = 2  # checkpoints kept: if the newest does not restore, the one before it does


def _options(resume: bool):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManagerOptions(
        max_to_keep=KEEP, create=True, cleanup_tmp_directories=resume
    )


def is_complete(out: pathlib.Path) -> bool:
    """A run folder is complete once it holds ``summary.json`` (renamed in last)."""
    return (out / "summary.json").is_file()


def _flat(tree, skip_axes: int) -> tuple[dict, dict]:
    """Leaves as a dict ``{"00000": array}`` (orbax refuses empty arrays: those go in the
    manifest only) and the manifest: the structure, every leaf's shape past ``skip_axes``
    leading axes and dtype."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays, shapes = {}, []
    for i, leaf in enumerate(leaves):
        leaf = np.asarray(leaf)
        shapes.append([list(leaf.shape), leaf.dtype.str])
        if leaf.size:
            arrays[f"{i:05d}"] = leaf
    return arrays, {"tree": str(treedef), "leaves": shapes, "skip": skip_axes}


def _unflat(arrays: dict, manifest: dict, template) -> object:
    """The tree saved by :func:`_flat`, checked against ``template`` (ShapeDtypeStructs
    of the current code): the same structure, trailing shapes and dtypes, else ValueError."""
    leaves_t, treedef = jax.tree.flatten(template)
    if manifest["tree"] != str(treedef) or len(manifest["leaves"]) != len(leaves_t):
        raise ValueError("its structure differs from this version's")
    skip, out = manifest["skip"], []
    for i, ((shape, dtype), t) in enumerate(zip(manifest["leaves"], leaves_t, strict=True)):
        if tuple(shape[skip:]) != tuple(t.shape[skip:]) or np.dtype(dtype) != t.dtype:
            raise ValueError(f"leaf {i} is {shape} {dtype}, expected {t.shape} {t.dtype}")
        leaf = arrays.get(f"{i:05d}")
        if leaf is None:
            leaf = np.zeros(shape, dtype)
        leaf = np.asarray(leaf)
        if list(leaf.shape) != shape or leaf.dtype != np.dtype(dtype):
            raise ValueError(f"leaf {i} was saved as {shape} {dtype}, read as {leaf.shape}")
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _templates(b: Batch, every: int):
    """ShapeDtypeStructs of the batch's states and of a chunk's records (no compilation)."""
    params, data, keys = b.call(0)
    states = jax.eval_shape(init_runs, b.spec, b.param_axes, params, keys)
    length = min(every, b.rounds)
    _, records = jax.eval_shape(
        simulate_runs_chunk_jit, b.spec, length, b.param_axes, params, data, states, keys,
        np.int32(0),
    )  # fmt: skip
    return states, records


class Checkpoints:
    """The orbax checkpoints of one run folder: ``save`` after each chunk of rounds,
    ``restore`` the newest usable one. Use as a context manager (waits for pending saves).

    The steps go in ``folder`` (default ``OUT/.checkpoints``); the notes call the run
    ``name`` (default OUT).
    """

    def __init__(self, out: pathlib.Path, every: int, *, resume: bool = False,
                 note: Callable[[str], None] | None = None, folder: pathlib.Path | None = None,
                 name: str | None = None):  # fmt: skip
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.out = out
        self.name = str(out) if name is None else name
        self.every = every
        self.note = note or (lambda text: None)
        folder = out / FOLDER if folder is None else folder
        self.manager = ocp.CheckpointManager(folder.resolve(), options=_options(resume))
        self.resume = resume

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def save(self, b: Batch, carry: Carry) -> None:
        """Checkpoint ``carry`` (after ``carry.done`` rounds) as step ``carry.done``."""
        ocp = self.ocp
        states, states_meta = _flat(carry.states, 1)
        records, records_meta = _flat(carry.records, 2)
        meta = {
            "format": FORMAT,
            "round": carry.done,
            "rounds": b.rounds,
            "seeds": [int(s) for s in b.seeds],
            "runs": b.total,
            "states": states_meta,
            "records": records_meta,
        }
        arrays = {"keys": np.asarray(b.keys[: b.total]), "states": states, "records": records}
        self.manager.save(
            carry.done,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )

    def starter(self, progress: Callable[[int], None] | None):
        """``run_cells_chunked``'s ``start``: :meth:`restore`, and report the runs x rounds
        a restored carry has done to ``progress``."""

        def start(b: Batch) -> Carry | None:
            carry = self.restore(b)
            if carry is not None and progress is not None:
                progress(carry.done * b.total)
            return carry

        return start

    def restore(self, b: Batch) -> Carry | None:
        """The newest checkpoint that restores and fits this batch (same rounds, seeds and
        run keys, same state and record structure), or None (start from round 0); a new
        run (not ``resume``) starts from round 0."""
        if not self.resume:
            return None
        ocp = self.ocp
        steps = sorted(self.manager.all_steps(), reverse=True)
        templates = _templates(b, self.every) if steps else None
        problems = []
        for step in steps:
            try:
                got = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                    ),
                )
                carry = self._check(b, step, got["arrays"], got["meta"], templates)
            except Exception as err:  # unreadable or not this run's: try the one before
                problems.append(f"step {step}: {' '.join(str(err).split())[:200]}")
                continue
            skipped = f" (skipped {'; '.join(problems)})" if problems else ""
            self.note(
                f"resuming {self.name} from its checkpoint after round {step} of {b.rounds}"
                + skipped
            )
            return carry
        why = f" ({'; '.join(problems)})" if problems else ""
        self.note(f"no usable checkpoint in {self.name}{why}: starting from round 0")
        return None

    @staticmethod
    def _check(b: Batch, step: int, arrays, meta, templates) -> Carry:
        if meta.get("format") != FORMAT or meta.get("round") != step:
            raise ValueError("not a checkpoint of this format")
        if meta["rounds"] != b.rounds or meta["seeds"] != [int(s) for s in b.seeds]:
            raise ValueError("its rounds or seeds differ from run.json's")
        if not 0 < step <= b.rounds or meta["runs"] != b.total:
            raise ValueError(f"round {step} or {meta['runs']} runs do not fit this run")
        if not np.array_equal(np.asarray(arrays["keys"]), b.keys[: b.total]):
            raise ValueError("its run keys differ from this run's")
        states_t, records_t = templates
        states = _unflat(arrays.get("states", {}), meta["states"], states_t)
        records = _unflat(arrays.get("records", {}), meta["records"], records_t)
        lead = {x.shape[:1] for x in jax.tree.leaves(states)}
        lead |= {x.shape[:2] for x in jax.tree.leaves(records)}
        if lead != {(b.total,), (b.total, step)}:
            raise ValueError("its arrays do not have one entry per run and round")
        return Carry(step, states, records)


# ---------------------------------------------------------------------------------------
# the run folder


def start(out: pathlib.Path, scenario: sc.Scenario, *, engine: str, every: int,
          max_batch: int | None, report: bool, command: str) -> None:  # fmt: skip
    """Create the run folder (it must not exist or be empty: checked by the caller) with
    ``run.json``, before any compute."""
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "about": "an incomplete paramarket run with checkpoints; go on with: "
        "paramarket run --resume <this folder>",
        "command": command,
        "engine": engine,
        "checkpoint_every": every,
        "batch": max_batch,
        "report": report,
        "scenario": sc.dumps(scenario),
    }
    write_into(out, {RUN_FILE: info}, last=RUN_FILE)  # atomic: whole or absent


class Saved(NamedTuple):
    """An incomplete run's ``run.json`` (``info``) and its scenario, parsed."""

    info: dict
    scenario: sc.Scenario


def load(out: pathlib.Path) -> Saved:
    """What ``--resume OUT`` needs, or ParamarketError in one line: OUT is missing, is a
    complete run (leftovers of its clean-up are removed), or holds no checkpointed run."""
    if not out.is_dir():
        raise ParamarketError(f"--resume {out}: no such folder")
    if is_complete(out):
        remove(out)  # a run killed while removing its checkpoints
        raise ParamarketError(f"--resume {out}: the run is already complete (summary.json)")
    path = out / RUN_FILE
    if not path.is_file():
        raise ParamarketError(
            f"--resume {out}: no {RUN_FILE}, so not a run started with --checkpoint-every"
        )
    try:
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {FORMAT}")
        scenario = sc.from_dict(tomllib.loads(info["scenario"]))
        every, batch = info["checkpoint_every"], info["batch"]
        if not (isinstance(every, int) and every >= 1) or not (batch is None or batch >= 1):
            raise ValueError("bad checkpoint_every or batch")
        if info["engine"] != "batch" or not isinstance(info["report"], bool):
            raise ValueError("bad engine or report")
    except ParamarketError as err:
        raise ParamarketError(f"--resume {out}: its {RUN_FILE} scenario: {err}") from None
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as err:
        why = " ".join(str(err).split())[:200]
        raise ParamarketError(f"--resume {out}: {RUN_FILE} is unreadable ({why})") from None
    return Saved(info, scenario)


@contextlib.contextmanager
def lock(out: pathlib.Path):
    """Hold an exclusive lock on ``OUT/run.json`` while the run goes on, so two processes
    never write one folder (the lock goes with the process, even on ``kill -9``)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        yield
        return
    fd = os.open(out / RUN_FILE, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ParamarketError(f"{out} is in use by another paramarket run") from None
        yield
    finally:
        os.close(fd)


def finish(out: pathlib.Path, files: dict[str, object]) -> None:
    """Write the complete run into OUT (``summary.json`` last), then drop the checkpoints."""
    write_into(out, files, last="summary.json")
    remove(out)


def remove(out: pathlib.Path) -> None:
    """Remove ``run.json`` and ``.checkpoints`` from OUT (checkpoints first, so a folder
    with ``run.json`` and no summary always has what its resume needs)."""
    shutil.rmtree(out / FOLDER, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / RUN_FILE)


def discard(out: pathlib.Path, *, keep_folder: bool) -> None:
    """Remove a new checkpointed run that failed for good (bad input found late, every
    agent diverged): its checkpoints and ``run.json``, and OUT itself unless it existed
    before (empty) or something else is in it."""
    remove(out)
    if not keep_folder:
        with contextlib.suppress(OSError):
            out.rmdir()
