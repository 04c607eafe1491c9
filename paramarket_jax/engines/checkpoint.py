"""Checkpoints inside a run (``paramarket run --checkpoint-every K``, ``--resume DIR``).

A checkpointed run keeps its ``--out`` folder while it is incomplete::

    OUT/run.json                 what to resume: the resolved scenario, engine, K, options
    OUT/.checkpoints/<r>/        orbax checkpoints after r rounds (the newest two)

Every K rounds (and after the last) the batch path's carry is saved with orbax-checkpoint
(a ``CheckpointManager``: each step is written to a temporary folder and renamed when
complete, so a step folder is whole or absent): the ``MarketState`` of every run (leading
run axis), the records of the rounds so far, the run keys and the round reached, and what
the step is a checkpoint of: the resolved scenario and the engine options of ``run.json``
(:func:`run_identity`, and its hash).

``paramarket run --resume OUT`` checks ``run.json`` as strictly as a scenario file, then,
before any compute, that nothing in OUT is in the way that this tool did not write, that
OUT can be written, and that ``run.json`` still describes the run its checkpoints are of
(an edited ``run.json`` that no checkpoint step matches is refused: nothing is changed).
It goes on from the newest step of this run that restores and fits (a damaged step, or
one of another run, is skipped for an older one, else round 0; the skipped steps newer
than the one it goes on from are removed, since orbax would not save over them); rounds
are chunked exactly as :func:`paramarket_jax.market.round.simulate` would run them, so the
tables are the same, bit for bit, as a run never interrupted, with any ``K`` or no
checkpoints (a plain run is one chunk of all its rounds; at the same XLA flags).

At the end the run's files are renamed into OUT (``summary.json`` last: a folder holding
``summary.json`` is complete), then ``.checkpoints`` and ``run.json`` are removed. Only
what this tool wrote is ever removed or replaced: ``run.json`` carrying its ``about``
marker, orbax step folders (and their temporaries) in ``.checkpoints``, and the run's
own files (the leftovers of a killed finish, recognised by their ``scenario.toml``);
anything else in their way stops ``--resume`` in one line before any compute. Only the
batch engine checkpoints; the Mesa engine refuses ``--checkpoint-every``.

A sweep (``paramarket sweep --checkpoint-every K``) keeps the steps of each batch of cells
in ``DIR/.checkpoints/<group>/`` (see :func:`paramarket_jax.sweep.group_id`); the same
command goes on from them, and a group's folder is removed once its cells are written.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import tomllib
import warnings
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
FORMAT = 2  # 2: run.json holds devices and shard; a step holds what run it is of
KEEP = 2  # checkpoints kept: if the newest does not restore, the one before it does
# the marker of a run.json this tool wrote (the same text in every format)
ABOUT = (
    "an incomplete paramarket run with checkpoints; go on with: "
    "paramarket run --resume <this folder>"
)
RUN_KEYS = ("format", "about", "command", "engine", "checkpoint_every", "batch", "devices",
            "shard", "report", "scenario")  # fmt: skip
OPTIONS = ("engine", "checkpoint_every", "batch", "devices", "shard")  # in a step's identity
SHARDS = ("auto", "agents", "runs")
# what orbax writes in .checkpoints: step folders <r> holding these, and temporaries
STEP = re.compile(r"\d+")
STEP_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", "arrays", "meta"})
STEP_TMP = re.compile(r"\d+\.orbax-checkpoint-tmp.*")
PROBE = ".paramarket-probe-"  # a writability probe (removed at once)
MAX_RUN_FILE = 64 << 20  # bytes: a run.json is its scenario's text and a few options
# the files a run writes into its folder (report.html and *.png with its report)
OUTPUTS = ("scenario.toml", "rounds.parquet", "trades.parquet", "summary.json", "report.html")
# loggers silenced while steps are read (asyncio: the futures a failed restore leaves)
QUIET = ("absl", "orbax", "asyncio")
ONE_DEVICE = (
    "--checkpoint-every runs on one device (the chunked rounds cannot place the states "
    "of several devices yet); drop --devices, or drop --checkpoint-every"
)


def _options(resume: bool):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManagerOptions(
        max_to_keep=KEEP, create=True, cleanup_tmp_directories=resume
    )


@contextlib.contextmanager
def quiet_orbax():
    """Inside the block orbax's own log lines (``ERROR:absl:...`` about a damaged step) and
    warnings are dropped: a step that does not restore is reported in one note instead.
    The loggers' levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in QUIET]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), quiet_closed_loop():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _closed_loop(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


@contextlib.contextmanager
def quiet_closed_loop():
    """Inside the block, drop the tracebacks ``RuntimeError: Event loop is closed`` that
    the reads of a step orbax failed to restore print as they finish, after orbax has
    closed their event loop (through ``sys.unraisablehook``; every other unraisable
    exception goes on to the hook before)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _closed_loop(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def is_complete(out: pathlib.Path) -> bool:
    """A run folder is complete once it holds ``summary.json`` (renamed in last)."""
    return (out / "summary.json").is_file()


def run_identity(scenario: sc.Scenario, info: dict) -> dict:
    """What a run's checkpoints are checkpoints of: its resolved scenario (as
    :func:`paramarket_jax.scenario.dumps` writes it, so a comment or spacing edited in
    ``run.json`` is no other run) and the engine options of its ``run.json`` that decide
    its numbers or its arrays' shapes (``shard`` only on several devices). The run keys
    follow from the scenario's seeds; a step holds them too, checked on restore."""
    devices = info["devices"]
    ident = {"scenario": sc.dumps(scenario)}
    ident.update({key: info[key] for key in OPTIONS})
    ident["shard"] = info["shard"] if devices > 1 else None
    return ident


def digest(ident: dict | None) -> str | None:
    """The hash of a :func:`run_identity` (None for none: a sweep's group folder is named
    by the hash of its cells' scenarios already)."""
    if ident is None:
        return None
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def differences(saved, mine: dict) -> list[str]:
    """The keys (engine options, dotted scenario keys) in which a step's identity
    ``saved`` differs from ``mine``."""
    if not isinstance(saved, dict):
        return ["everything (it records no run)"]
    keys = [key for key in OPTIONS if saved.get(key) != mine.get(key)]
    if saved.get("scenario") != mine["scenario"]:
        try:
            a = sc.dotted(tomllib.loads(saved.get("scenario")))
            b = sc.dotted(tomllib.loads(mine["scenario"]))
            keys += sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)) or ["scenario"]
        except (TypeError, AttributeError, tomllib.TOMLDecodeError):
            keys.append("scenario")
    return keys or ["its hash"]


def other_run(meta, ident: dict | None) -> str | None:
    """Why a step's ``meta`` is of another run than ``ident`` (None: of this one);
    ValueError if it is no step of this format."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a checkpoint of this version's format ({FORMAT})")
    if meta.get("digest") == digest(ident):
        return None
    keys = differences(meta.get("run"), ident) if ident is not None else ["its run"]
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"another run's checkpoint, differing from {RUN_FILE} in {shown}"


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
    states = jax.eval_shape(init_runs, b.spec, b.param_axes, params, data, keys)
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
    ``name`` (default OUT). Each step records ``identity`` (:func:`run_identity`; None in
    a sweep's group folder) and a step recording another is never restored.
    """

    def __init__(self, out: pathlib.Path, every: int, *, resume: bool = False,
                 note: Callable[[str], None] | None = None, folder: pathlib.Path | None = None,
                 name: str | None = None, identity: dict | None = None):  # fmt: skip
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.out = out
        self.name = str(out) if name is None else name
        self.every = every
        self.note = note or (lambda text: None)
        self.identity, self.digest = identity, digest(identity)
        folder = out / FOLDER if folder is None else folder
        # the reads of a step that fails to restore may finish while the run goes on
        self._quiet = contextlib.ExitStack()
        if resume:
            self._quiet.enter_context(quiet_closed_loop())
        with quiet_orbax() if resume else contextlib.nullcontext():
            self.manager = ocp.CheckpointManager(folder.resolve(), options=_options(resume))
        self.resume = resume

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        finally:
            self._quiet.close()

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
            "digest": self.digest,
            "run": self.identity,
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

    def other_run(self, meta) -> str | None:
        """Why a step's ``meta`` is another run's (None: it is this run's); ValueError if
        it is no step of this format."""
        return other_run(meta, self.identity)

    def restore(self, b: Batch) -> Carry | None:
        """The newest checkpoint of this run that restores and fits this batch (same
        rounds, seeds and run keys, same state and record structure), or None (start from
        round 0); a new run (not ``resume``) starts from round 0. Steps skipped on the way
        (damaged, or another run's) are removed: orbax saves no step at or below its
        newest one. With no step of this run and one of another, ParamarketError (as
        :func:`check_resume` says before any compute)."""
        if not self.resume:
            return None
        ocp = self.ocp
        with quiet_orbax():
            steps = sorted(self.manager.all_steps(), reverse=True)
        templates = _templates(b, self.every) if steps else None
        problems, skipped, others, mine = [], [], [], False
        for step in steps:
            try:
                with quiet_orbax():
                    meta = self.manager.restore(
                        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                    )["meta"]
                other = self.other_run(meta)
                if other is not None:
                    problems.append(f"step {step}: {other}")
                    skipped.append(step)
                    others.append((step, other))
                    continue
                mine = True
                with quiet_orbax():
                    got = self.manager.restore(
                        step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore())
                    )
                carry = self._check(b, step, got["arrays"], meta, templates)
            except Exception as err:  # unreadable or not this run's: try the one before
                problems.append(f"step {step}: {' '.join(str(err).split())[:200]}")
                skipped.append(step)
                with quiet_orbax():  # the futures of its failed reads, never retrieved
                    gc.collect()
                continue
            self._drop(skipped)
            removed = f" (skipped and removed {'; '.join(problems)})" if problems else ""
            self.note(
                f"resuming {self.name} from its checkpoint after round {step} of {b.rounds}"
                + removed
            )
            return carry
        # no step of this run, one of another: run.json was edited (check_resume says so
        # before any compute; a sweep's group folders are named by their cells' hash)
        if others and not mine and self.identity is not None:
            raise ParamarketError(_edited(self.name, *others[0]))
        self._drop(skipped)
        why = f" ({'; '.join(problems)}; removed)" if problems else ""
        self.note(f"no usable checkpoint in {self.name}{why}: starting from round 0")
        return None

    def _drop(self, steps: list[int]) -> None:
        """Remove unusable steps (orbax step folders)."""
        for step in steps:
            try:
                with quiet_orbax():
                    self.manager.delete(step)
            except Exception:  # a step orbax cannot read even to delete: its folder
                shutil.rmtree(self.manager.directory / str(step), ignore_errors=True)
                with quiet_orbax(), contextlib.suppress(Exception):
                    self.manager.reload()

    @staticmethod
    def _check(b: Batch, step: int, arrays, meta, templates) -> Carry:
        if meta.get("round") != step:
            raise ValueError(f"it says it is of round {meta.get('round')!r}")
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


def _edited(name: str, step: int, why: str) -> str:
    return (
        f"{name}: its checkpoints are of another run than its {RUN_FILE} describes (step "
        f"{step} is {why}): {RUN_FILE} was edited, or the steps are another run's; undo "
        "that, or start a new run with --out (nothing was changed)"
    )


# ---------------------------------------------------------------------------------------
# the run folder


def start(out: pathlib.Path, scenario: sc.Scenario, *, engine: str, every: int,
          max_batch: int | None, report: bool, command: str, devices: int = 1,
          shard: str = "auto") -> Saved:  # fmt: skip
    """Create the run folder (it must not exist or be empty: checked by the caller) with
    ``run.json``, before any compute; what :func:`load` would read back from it."""
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "about": ABOUT,
        "command": command,
        "engine": engine,
        "checkpoint_every": every,
        "batch": max_batch,
        "devices": devices,
        "shard": shard,
        "report": report,
        "scenario": sc.dumps(scenario),
    }
    write_into(out, {RUN_FILE: info}, last=RUN_FILE)  # atomic: whole or absent
    return Saved(info, scenario)


class Saved(NamedTuple):
    """An incomplete run's ``run.json`` (``info``) and its scenario, parsed."""

    info: dict
    scenario: sc.Scenario

    def identity(self) -> dict:
        """What this run's checkpoints must be checkpoints of (:func:`run_identity` of
        the scenario as ``run.json`` holds it, parsed again: a new run and its resume
        agree even were a scenario's text not to read back to the same text)."""
        return run_identity(sc.from_dict(tomllib.loads(self.info["scenario"])), self.info)


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_info(info) -> None:
    """ValueError naming the key and what it allows (its text follows ``run.json``) unless
    ``info`` is a ``run.json`` this version wrote: an object with exactly
    :data:`RUN_KEYS`, its ``about`` marker, this :data:`FORMAT`, and values of their kinds
    (the scenario is checked by :func:`load`)."""
    if not isinstance(info, dict):
        raise ValueError(f"is unreadable (not a JSON object but {type(info).__name__})")
    if info.get("about") != ABOUT:
        raise ValueError("is unreadable (not written by paramarket: no paramarket 'about' line)")
    if info.get("format") != FORMAT:
        raise ValueError(
            f"is unreadable (format {_shown(info.get('format'))}; this version of paramarket "
            f"reads format {FORMAT}: resume it with the version that started it)"
        )
    allowed = ", ".join(RUN_KEYS)
    for key in info:
        if key not in RUN_KEYS:
            raise ValueError(f"has an unknown key {key!r}; allowed: {allowed}")
    for key in RUN_KEYS:
        if key not in info:
            raise ValueError(f"has no {key!r} (it needs {allowed})")
    checks = {
        "command": (lambda v: isinstance(v, str), "a string"),
        "engine": (lambda v: v == "batch", "'batch' (the only engine with checkpoints)"),
        "checkpoint_every": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "batch": (lambda v: v is None or _is_int(v, 1), "null or an integer >= 1"),
        "devices": (lambda v: _is_int(v, 1), "an integer >= 1"),
        "shard": (lambda v: v in SHARDS, "one of " + ", ".join(map(repr, SHARDS))),
        "report": (lambda v: isinstance(v, bool), "true or false"),
        "scenario": (lambda v: isinstance(v, str), "a string (the scenario's TOML)"),
    }
    for key, (ok, allows) in checks.items():
        if not ok(info[key]):
            raise ValueError(f"{key!r} must be {allows}, got {_shown(info[key])}")


def load(out: pathlib.Path) -> Saved:
    """What ``--resume OUT`` needs, or ParamarketError in one line: OUT is missing, is a
    complete run (leftovers of its clean-up are removed: only what this tool wrote), or
    holds no checkpointed run, or its ``run.json`` is not one this version wrote, with
    every key of its kind (:func:`check_info`) and a valid scenario."""
    if not out.is_dir():
        raise ParamarketError(f"--resume {out}: no such folder")
    if is_complete(out):
        left = remove(out)  # a run killed while removing its checkpoints
        kept = f"; {', '.join(left)} left as they are (not written by paramarket)" if left else ""
        raise ParamarketError(f"--resume {out}: the run is already complete (summary.json){kept}")
    path = out / RUN_FILE
    if not path.is_file():
        raise ParamarketError(
            f"--resume {out}: no {RUN_FILE}, so not a run started with --checkpoint-every"
        )
    try:
        if path.stat().st_size > MAX_RUN_FILE:
            raise ValueError(f"over {MAX_RUN_FILE >> 20} MiB: not one paramarket wrote")
        info = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as err:
        why = " ".join(str(err).split())[:200]
        raise ParamarketError(f"--resume {out}: {RUN_FILE} is unreadable ({why})") from None
    try:
        check_info(info)
    except ValueError as err:
        raise ParamarketError(f"--resume {out}: {RUN_FILE} {err}") from None
    try:
        scenario = sc.from_dict(tomllib.loads(info["scenario"]))
    except ParamarketError as err:
        raise ParamarketError(f"--resume {out}: its {RUN_FILE} scenario: {err}") from None
    except tomllib.TOMLDecodeError as err:
        why = " ".join(str(err).split())[:200]
        raise ParamarketError(
            f"--resume {out}: {RUN_FILE} is unreadable ('scenario' is not TOML: {why})"
        ) from None
    return Saved(info, scenario)


def _is_ours(path: pathlib.Path) -> bool:
    """``path`` is a ``run.json`` this tool wrote (any format: its ``about`` marker)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        info = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(info, dict) and info.get("about") == ABOUT


def _sorted_out(folder: pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
    """The entries of a ``.checkpoints`` folder this tool wrote (orbax step folders,
    holding only orbax's files, their temporaries, writability probes) and the names of
    the rest."""
    ours, others = [], []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        temporary = STEP_TMP.fullmatch(name) or name.startswith(PROBE)
        if entry.is_symlink() or not entry.is_dir():
            others.append(name)
        elif temporary or (STEP.fullmatch(name) and _is_step(entry)):
            ours.append(entry)
        else:
            others.append(name)
    return ours, others


def _is_step(folder: pathlib.Path) -> bool:
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    return bool(names) and names <= STEP_FILES


def remove(out: pathlib.Path) -> list[str]:
    """Remove what this tool wrote for the checkpoints from OUT: the orbax step folders
    in ``.checkpoints`` (then the folder, if nothing else is in it) and ``run.json`` if
    it carries this tool's marker; steps first, so a folder with ``run.json`` and no
    summary always has what its resume needs. Returns the names of what was left
    (another's files, untouched)."""
    folder, left = out / FOLDER, []
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        left.append(FOLDER)
    elif folder.is_dir():
        try:
            ours, others = _sorted_out(folder)
        except OSError:  # unreadable: nothing in it is known to be ours
            ours, others = [], ["(unreadable)"]
        for entry in ours:
            shutil.rmtree(entry, ignore_errors=True)
        left += [f"{FOLDER}/{name}" for name in others]
        with contextlib.suppress(OSError):
            folder.rmdir()
    path = out / RUN_FILE
    if _is_ours(path):
        with contextlib.suppress(OSError):  # gone, or a read-only folder: it stays (ours)
            os.unlink(path)
    elif path.exists() or path.is_symlink():
        left.append(RUN_FILE)
    return left


def _outputs(out: pathlib.Path, names=None) -> list[str]:
    """The names in OUT a run's files would replace: ``names``, else any of
    :data:`OUTPUTS` and ``*.png``."""
    if names is not None:
        return [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    return sorted(p.name for p in out.iterdir() if p.name in OUTPUTS or p.suffix == ".png")


class Kept(ParamarketError):
    """Bad input found at the end of a run (a file of another in the way of its files):
    its checkpoints are kept, so ``--resume`` goes on once the input is fixed."""


def check_outputs(out: pathlib.Path, scenario_text: str, names=None) -> None:
    """ParamarketError unless every file in OUT that the run's files would replace is
    this run's own: the leftovers of a finish killed while renaming its files in, which
    renames ``scenario.toml`` (this run's scenario, as ``run.json`` holds it) first."""
    present = _outputs(out, names)
    if not present:
        return
    toml = out / "scenario.toml"
    try:
        leftover = not toml.is_symlink() and toml.is_file() and toml.read_text() == scenario_text
    except (OSError, UnicodeDecodeError):
        leftover = False
    for name in present:
        path = out / name
        if not leftover or path.is_symlink() or not path.is_file():
            raise Kept(
                f"{path} is in the way of the run's files and was not written by this run; "
                f"move it away, then go on with: paramarket run --resume {out} (nothing "
                "was changed)"
            )


def _probe(folder: pathlib.Path, out: pathlib.Path) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE, dir=folder))
    except OSError as err:
        why = getattr(err, "strerror", None) or str(err)
        raise ParamarketError(
            f"--resume {out}: cannot write in {folder} ({why}); make it writable, or copy "
            "the folder somewhere writable and resume the copy (nothing was changed)"
        ) from None


def check_resume(out: pathlib.Path, saved: Saved) -> None:
    """Before any compute, ParamarketError in one line, with nothing changed, unless
    ``--resume OUT`` can go on: ``.checkpoints`` holds only what this tool wrote, no
    file of another is in the way of the run's files, OUT (its ``.checkpoints`` and the
    folder beside it, for the temporary copy of the files) can be written, and
    ``run.json`` still describes the run its checkpoints are of: with checkpoint steps
    none of which is of this run and one of which is another run's (``run.json`` edited
    since), nothing is resumed or started over."""
    folder = out / FOLDER
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ParamarketError(
            f"--resume {out}: {folder} is not a folder of checkpoints paramarket wrote; "
            "move it away and resume again (nothing was changed)"
        )
    if folder.is_dir():
        try:
            _, others = _sorted_out(folder)
        except OSError as err:
            why = getattr(err, "strerror", None) or str(err)
            raise ParamarketError(f"--resume {out}: cannot read {folder} ({why})") from None
        if others:
            raise ParamarketError(
                f"--resume {out}: {folder / others[0]} is not a checkpoint paramarket "
                f"wrote (or holds files it did not write); move it out of {folder} and "
                "resume again (nothing was changed)"
            )
    check_outputs(out, saved.info["scenario"])
    _probe(out.resolve().parent, out)  # for the temporary sibling the files go to first
    _probe(out, out)
    if folder.is_dir():
        _probe(folder, out)
        _check_steps(out, folder, saved.identity())


def _check_steps(out: pathlib.Path, folder: pathlib.Path, ident: dict) -> None:
    """ParamarketError if no step in ``folder`` is of the run ``ident`` and one is
    another run's (read with a read-only orbax manager: nothing is changed)."""
    import orbax.checkpoint as ocp

    try:
        with quiet_orbax():
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
            manager = ocp.CheckpointManager(folder.resolve(), options=options)
    except Exception:  # nothing orbax can list: restore() says so, on from round 0
        return
    try:
        others = []
        with quiet_orbax():
            steps = sorted(manager.all_steps(), reverse=True)
        for step in steps:
            try:
                with quiet_orbax():
                    meta = manager.restore(
                        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                    )["meta"]
                other = other_run(meta, ident)
            except Exception:  # damaged: restore() skips it
                continue
            if other is None:
                return
            others.append((step, other))
        if others:
            raise ParamarketError(_edited(f"--resume {out}", *others[0]))
    finally:
        with quiet_orbax(), contextlib.suppress(Exception):
            manager.close()


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


def finish(out: pathlib.Path, files: dict[str, object], scenario_text: str | None = None) -> None:
    """Write the complete run into OUT (``summary.json`` last), then drop the checkpoints
    (what this tool wrote of them). A file of another in the way of ``files`` (put there
    while the run went on) stops it first, the checkpoints kept."""
    if scenario_text is not None:
        check_outputs(out, scenario_text, list(files))
    write_into(out, files, last="summary.json")
    remove(out)


def discard(out: pathlib.Path, *, keep_folder: bool) -> None:
    """Remove a new checkpointed run that failed for good (bad input found late, every
    agent diverged): its checkpoints and ``run.json`` (what this tool wrote), and OUT
    itself unless it existed before (empty) or something else is in it."""
    remove(out)
    if not keep_folder:
        with contextlib.suppress(OSError):
            out.rmdir()
