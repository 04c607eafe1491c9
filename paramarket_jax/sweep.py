"""Sweeps: a grid of scenario overrides x seeds into one folder of runs plus one table.

Each cell is an ordinary run folder (written atomically, so a cell is either complete or
absent); an interrupted sweep resumes by skipping complete cells. Cells that share a
``MarketSpec``, a dataset, rounds and seeds (they differ only in numeric knobs) run
together through the batch path: every seed of every such cell in one compiled call.

With ``checkpoint_every`` (``paramarket sweep --checkpoint-every K``) each such group saves
its carry every K rounds into ``DIR/.checkpoints/<group id>/`` (orbax steps, as
:mod:`paramarket_jax.engines.checkpoint` writes a run's), so a group killed in the middle goes on
from its newest usable checkpoint when the same command runs again: the same tables, bit
for bit. A group's checkpoints are removed once its cells are written, and the whole
``.checkpoints`` folder once every cell is complete (anything else in it stays).

A sweep replaces or removes only what this tool wrote: the folder must be missing, empty
or a sweep folder of its own (its ``sweep.json``), and anything in the way that it did not
write (a cell's place, the table, the report, its figures) stops the sweep in one line
before any compute, untouched. Grid values are checked up front too: each key once, each
value once (after the scenario reads them: ``0`` and ``0.0`` are one value), cell folder
names bounded, and values of mixed kinds written to the table as JSON text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import tomllib
from collections.abc import Callable

import jax
import numpy as np
import pandas as pd
import tomli_w
from jax.experimental import multihost_utils

from paramarket_jax import scenario as sc
from paramarket_jax.engines import batch, checkpoint
from paramarket_jax.errors import ParamarketError
from paramarket_jax.experiment import Experiment, build, dataset_key, load_shared_dataset
from paramarket_jax.results.folders import check_writable, write_into, write_run
from paramarket_jax.results.report import RUN_FILES, sweep_outputs, write_files
from paramarket_jax.runs import (
    CHECKPOINT_ENGINE,
    MESA_DEVICES,
    RunResult,
    resolve_engine,
    result_of,
    run_cells,
    run_mesa,
)

SEED_FIELDS = (
    "mutual_gain",
    "accuracy_gain_all",
    "welfare",
    "siloed_welfare",
    "broker_take",
    "trades",
    "revenue_of_sellers",
    "mean_abs_estimation_error",
    "diverged",
    "better_off",
)


# ---- grids: parsed, checked and named before anything runs or is written ----

FORMAT = "paramarket-sweep"  # sweep.json's "format": the file is this tool's
_LEGACY_META = {"scenario", "grid", "overrides", "command"}  # sweep.json before "format"
MAX_CELL_NAME = 200  # bytes; a longer cell name is cut and ends in a hash of the whole
SWEEP_FIGURES = ("sweep_gains.png", "sweep_welfare.png", "value_scatter.png")
# what ``paramarket plot`` draws in a run folder (results.plots.run_figures): a cell rerun
# with --force replaces these, and refuses any other file
RUN_FIGURES = ("welfare.png", "accuracy.png", "utility_gain.png", "prices_volume.png",
               "trade_matrix.png", "value_scatter.png", "accuracy_per_agent.png",
               "hostile.png")  # fmt: skip
_OPEN = {"]": "[", "}": "{"}


def _split_values(key: str, raw: str) -> list[str]:
    """``raw`` cut at its top-level commas (outside brackets, braces and quotes); an
    unbalanced bracket or an unclosed quote is a one-line error naming the value."""
    pieces, start, stack, quote, i = [], 0, [], None, 0
    where = lambda: f"--grid {key}=...: value {len(pieces) + 1} {raw[start:].strip()!r}"  # noqa: E731
    while i < len(raw):
        c = raw[i]
        if quote is not None:
            if quote == '"' and c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "[{":
            stack.append(c)
        elif c in "]}":
            if not stack or stack[-1] != _OPEN[c]:
                raise ParamarketError(f"{where()} has a {c!r} that closes nothing")
            stack.pop()
        elif c == "," and not stack:
            pieces.append(raw[start:i])
            start = i + 1
        i += 1
    if quote is not None:
        raise ParamarketError(f"{where()} has an unclosed {quote} quote")
    if stack:
        closer = {v: k for k, v in _OPEN.items()}[stack[-1]]
        raise ParamarketError(f"{where()} has an unclosed {stack[-1]!r} (no {closer!r})")
    pieces.append(raw[start:])
    return pieces


def _plain(text: str) -> bool:
    """Whether TOML reads ``v = text`` as one value and nothing else: no comment sign or
    control character outside quotes (``1 # x`` or a line break would hide the rest)."""
    quote = None
    for i, c in enumerate(text):
        if quote is not None:
            if c == quote and not (quote == '"' and text[i - 1] == "\\"):
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#" or not c.isprintable():
            return False
    return True


def _has_time(value) -> bool:
    if isinstance(value, datetime.date | datetime.time):
        return True
    if isinstance(value, list):
        return any(_has_time(v) for v in value)
    return isinstance(value, dict) and any(_has_time(v) for v in value.values())


def _parse_value(key: str, number: int, piece: str):
    """One grid value: TOML, or a bare word (a string)."""
    text = piece.strip()
    if not text:
        raise ParamarketError(
            f"--grid {key}=...: value {number} is empty (a comma at the start or end, or two "
            f"in a row); give the values as {key}=v1,v2,..."
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"] if _plain(text) else None
    except tomllib.TOMLDecodeError:
        value = None
    except RecursionError:
        raise ParamarketError(f"--grid {key}=...: values nested too deeply") from None
    if isinstance(value, datetime.date | datetime.time):
        value = None  # a bare word that happens to look like a TOML date: the text
    if value is None:
        if any(c in text for c in "[]{}\"'"):
            raise ParamarketError(
                f"--grid {key}=...: value {number} {text!r} is not a valid value (a list, "
                f'table or quoted string is written in TOML, e.g. [1, 2], {{a = 1}}, "a b")'
            )
        return text
    if _has_time(value):
        raise ParamarketError(
            f"--grid {key}=...: value {number} {text!r} holds a TOML date or time, which no "
            f"scenario key takes; quote it to give a string"
        )
    return value


def same_value(a, b) -> bool:
    """Equal and of the same type all the way down (``1e-3`` and ``0.001`` are; ``0`` and
    ``0.0``, or ``1`` and ``true``, are not: whether those are one setting is for the
    scenario's own normalisation to say, see :func:`plan`)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def parse_grid(text: str) -> tuple[str, list]:
    """``"mechanism.beta=0,0.5,1"`` -> ("mechanism.beta", [0, 0.5, 1]); values are TOML
    (bare words become strings, so ``mechanism.name=first_price,second_price`` works).

    Every problem is one line naming the value at fault: no key, a malformed key, no
    values, an empty value (``=,1``, ``=1,``, ``=1,,2``), an unbalanced bracket or quote,
    and a value given twice (``0.001,1e-3``, ``true,true``, ``[8],[8]``)."""
    if "=" not in text:
        raise ParamarketError(f"--grid {text!r} must look like key=v1,v2,...")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamarketError(f"--grid {text!r} is not valid UTF-8 text") from None
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ParamarketError(f"--grid {text!r} names no key; it must look like key=v1,v2,...")
    if any(not part.strip() for part in key.split(".")):
        raise ParamarketError(f"--grid {text!r}: bad key {key!r} (an empty part between dots)")
    if not raw:
        raise ParamarketError(f"--grid {text!r} names no values; it must look like {key}=v1,v2,...")
    pieces = _split_values(key, raw)
    values = [_parse_value(key, i, p) for i, p in enumerate(pieces, 1)]
    for j, b in enumerate(values):
        for i, a in enumerate(values[:j]):
            if same_value(a, b):
                raise ParamarketError(
                    f"--grid {key}: {pieces[i].strip()!r} and {pieces[j].strip()!r} (values "
                    f"{i + 1} and {j + 1}) are the same value; give each value once"
                )
    return key, values


def check_grid(grid, overrides=()) -> None:
    """Each swept key once, with at least one value; no swept key inside another
    (``data.split`` and ``data.split.name``), nor set by an override too (the grid would
    override it in every cell); overrides that are UTF-8 text (a cell's scenario.toml
    could not hold anything else)."""
    keys = [key for key, _ in grid]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ParamarketError(
                f"--grid {key} is given twice; give each key once, with all its values "
                f"({key}=v1,v2,...)"
            )
        if not list(grid[i][1]):
            raise ParamarketError(f"--grid {key} has no values; give {key}=v1,v2,...")
        for other in keys[:i]:
            if key.startswith(other + ".") or other.startswith(key + "."):
                raise ParamarketError(
                    f"--grid {other} and --grid {key} overlap (one is part of the other); "
                    f"sweep one of them"
                )
    for text in overrides:
        try:
            str(text).encode("utf-8")
        except UnicodeEncodeError:
            raise ParamarketError(f"--set {text!r} is not valid UTF-8 text") from None
        name = str(text).split("=", 1)[0].strip()
        for key in keys:
            if name == key or name.startswith(key + "."):
                raise ParamarketError(
                    f"--set {name} is swept by --grid {key} too, which overrides it in every "
                    f"cell; drop one of them"
                )


def _typed(value: str) -> bool:
    """Whether a string value reads, written bare, as another value (``"1"`` as 1)."""
    try:
        read = tomllib.loads(f"v = {value}")["v"] if _plain(value) else value
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        return False
    return read != value and not isinstance(read, datetime.date | datetime.time)


def cell_name(assignment: dict) -> str:
    """A folder name for one grid cell, e.g. ``mechanism.beta=0.5__economics.gamma=2``.

    Characters a folder name should not hold are dropped; when that changes the name, or
    a string value would read as another value (the string ``"1"``, not the number), a
    short hash of the whole assignment is appended, so two values never share a folder.
    A name longer than ``MAX_CELL_NAME`` bytes is cut to fit, keeping that hash: the same
    assignment always gets the same name.
    """
    parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in assignment.items()]
    raw = "__".join(parts)
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "", raw)
    typed = any(isinstance(v, str) and _typed(v) for v in assignment.values())
    whole = "typed:" + json.dumps(list(assignment.items())) if typed else raw
    tag = "~" + hashlib.sha1(whole.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if name != raw or typed:
        name += tag
    if len(name) > MAX_CELL_NAME:
        name = name[: MAX_CELL_NAME - len(tag)] + tag
    return name or "base"


def _toml(value) -> str:
    """A value as inline TOML text (what ``--set`` reads back to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return tomli_w.dumps({"v": value})[len("v = ") : -1]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ParamarketError(f"a grid value must be TOML, got {value!r}")


def _freeze(value):
    """A hashable form in which numbers compare by value (0 == 0.0) but not with booleans."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, list | tuple):
        return ("list", tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("table", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    return (type(value).__name__, value)


def _setting(scenario: sc.Scenario):
    """What a cell computes with, as a hashable: its resolved scenario, numbers by value and
    per-agent keys as one value per agent (``0.1`` and ``[0.1, 0.1]`` alike)."""
    table = sc.to_dict(scenario)
    for key in sc.PER_AGENT:
        section, field = key.split(".")
        table[section][field] = sc.per_agent(table[section][field], scenario.agents.n)
    return _freeze(table)


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_distinct(planned) -> None:
    """No two cells of the grid compute the same thing or share a folder name."""
    seen: dict = {}
    names: dict[str, dict] = {}
    for assignment, scenario in planned:
        setting = _setting(scenario)
        if setting in seen:
            other = seen[setting]
            differ = [k for k in assignment if not same_value(other[k], assignment[k])]
            said = "; ".join(
                f"--grid {k}: {_shown(other[k])} and {_shown(assignment[k])}" for k in differ
            )
            raise ParamarketError(
                f"{said} give the same cell (the scenario reads them as one setting); give "
                f"each value once"
            )
        seen[setting] = assignment
        name = cell_name(assignment)
        if name in names:
            raise ParamarketError(
                f"two cells of the grid would share the folder {name}; give other values"
            )
        names[name] = assignment


def _text_knobs(planned) -> set[str]:
    """Swept keys whose values do not make one Parquet column (lists mixed with numbers,
    strings with numbers): those the table holds as JSON text."""
    keys = list(planned[0][0]) if planned else []
    text = set()
    for key in keys:
        try:
            pd.DataFrame({key: [a[key] for a, _ in planned]}).to_parquet(io.BytesIO())
        except Exception:  # pyarrow's conversion errors (ArrowInvalid, OverflowError, ...)
            text.add(key)
    return text


def _knobs(assignment: dict, text: set[str]) -> dict:
    return {k: json.dumps(v) if k in text else v for k, v in assignment.items()}


def _check_table(planned) -> None:
    """The sweep's table can hold every cell's swept values (checked before compute)."""
    text = _text_knobs(planned)
    rows = [{"cell": cell_name(a), **_knobs(a, text), "seed": 0} for a, _ in planned]
    try:
        pd.DataFrame(rows).to_parquet(io.BytesIO(), index=False)
    except Exception as err:  # pyarrow's conversion errors
        raise ParamarketError(
            f"sweep.parquet cannot hold the grid's values ({str(err).splitlines()[0]}); give "
            f"values of one kind per key"
        ) from None


def stale_keys(folder: pathlib.Path, scenario: sc.Scenario) -> list[str]:
    """Dotted keys whose value in the cell's ``scenario.toml`` differs from ``scenario``."""
    try:
        done = sc.to_dict(sc.from_dict(tomllib.loads((folder / "scenario.toml").read_text())))
    except (OSError, tomllib.TOMLDecodeError, ParamarketError):
        return ["scenario.toml (missing or unreadable)"]
    want = sc.to_dict(scenario)
    a, b = sc.dotted(done), sc.dotted(want)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def cells(grid: list[tuple[str, list]]):
    """Every assignment of the grid (cartesian product, first key slowest)."""
    keys = [k for k, _ in grid]
    for combo in itertools.product(*(v for _, v in grid)):
        yield dict(zip(keys, combo, strict=True))


def _override(key: str, value) -> str:
    return f"{key}={_toml(value)}"


def plan(base: str, grid: list[tuple[str, list]], overrides: list[str]):
    """Validate every cell up front (bad input fails before anything runs or is written):
    the grid's keys (:func:`check_grid`), each cell's scenario, that no two cells compute
    the same thing (``0`` and ``0.0`` for a number key, ``0.1`` and ``[0.1]`` for a
    per-agent one: one-line error, each value is to be given once), and that the sweep's
    table can hold the swept values."""
    check_grid(grid, overrides)
    out = []
    for assignment in cells(grid):
        extra = [_override(k, v) for k, v in assignment.items()]
        out.append((assignment, sc.load(base, [*overrides, *extra])))
    _check_distinct(out)
    _check_table(out)
    return out


def sweep_table(out: pathlib.Path, planned) -> pd.DataFrame:
    """One row per cell x seed, from the cells' summary.json files. A swept key whose
    values are of mixed kinds (a list and a number) is a column of their JSON text."""
    rows = []
    text = _text_knobs(planned)
    for assignment, _ in planned:
        path = out / cell_name(assignment) / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        for seed, s in summary["per_seed"].items():
            row = {"cell": cell_name(assignment), **_knobs(assignment, text), "seed": int(seed)}
            row.update({f: s.get(f) for f in SEED_FIELDS})
            row.update(s.get("decomposition", {}))  # the welfare decomposition's parts
            row["market_accuracy"] = sum(s["market_accuracy"]) / len(s["market_accuracy"])
            row["siloed_accuracy"] = sum(s["siloed_accuracy"]) / len(s["siloed_accuracy"])
            for i, (u, v) in enumerate(zip(s["utility"], s["siloed_utility"], strict=True)):
                row[f"utility_{i}"], row[f"siloed_utility_{i}"] = u, v
            rows.append(row)
    return pd.DataFrame(rows)


# ---- the sweep folder: only what this tool wrote is ever replaced or removed ----

_GROUP = re.compile(r"[0-9a-f]{16}")  # a group's checkpoint folder (group_id)


def _head_tail(path: pathlib.Path, size: int = 4096) -> tuple[bytes, bytes]:
    with open(path, "rb") as fh:
        head = fh.read(size)
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - size))
        return head, fh.read(size)


def _written_here(path: pathlib.Path) -> bool:
    """Whether ``path`` is a regular file (not a link) that this tool writes, told by its
    content: a report page of paramarket, a PNG drawn by matplotlib, a Parquet file."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        head, tail = _head_tail(path)
    except OSError:
        return False
    if path.name == "report.html":
        return head.startswith(b"<!DOCTYPE html>") and (
            b"<title>paramarket" in head or b"paramarket report" in tail
        )
    if path.suffix == ".png":
        return (
            path.name in (*RUN_FIGURES, *SWEEP_FIGURES)
            and head.startswith(b"\x89PNG\r\n\x1a\n")
            and b"Matplotlib" in head
        )
    if path.suffix == ".parquet":
        return path.name in (*RUN_FILES, "sweep.parquet") and head.startswith(b"PAR1")
    return path.name in ("scenario.toml", "summary.json")


def _summary_problem(path: pathlib.Path) -> str | None:
    """What makes ``path`` not a summary.json this tool wrote (None: it is one)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable: {str(err).splitlines()[0]}"
    per_seed = summary.get("per_seed") if isinstance(summary, dict) else None
    if not isinstance(per_seed, dict) or not per_seed:
        return "no per_seed table"
    for seed, s in per_seed.items():
        lists = [s.get(k) if isinstance(s, dict) else None for k in
                 ("market_accuracy", "siloed_accuracy", "utility", "siloed_utility")]  # fmt: skip
        numbers = all(
            isinstance(v, list) and v and all(type(x) in (int, float) for x in v) for v in lists
        )
        if not seed.isdigit() or not numbers or len(lists[2]) != len(lists[3]):
            return f"seed {seed!r} is not a seed's summary"
    return None


def _not_ours(path: pathlib.Path, what: str) -> ParamarketError:
    return ParamarketError(
        f"{path} {what}; paramarket did not write it and leaves it as it is: move it away or "
        f"choose another --out"
    )


def cell_state(folder: pathlib.Path) -> str:
    """``missing`` (nothing there, or an empty folder: the cell is to run) or ``complete``
    (a run folder this tool wrote: its four tables, a summary.json of its own format).
    Anything else in the cell's place is a one-line error: it is never replaced or
    removed. A complete cell may hold files of the user's too: a kept cell is never
    touched, and one to run again (``--force``) is refused then (:func:`check_replaceable`).
    """
    if not os.path.lexists(folder):
        return "missing"
    if folder.is_symlink():
        raise _not_ours(folder, "is a symbolic link where a cell of this sweep goes")
    if not folder.is_dir():
        raise _not_ours(folder, "is a file where a cell of this sweep goes")
    try:
        empty = not any(folder.iterdir())
    except OSError as err:
        raise ParamarketError(f"{folder}: cannot read the cell folder ({err.strerror})") from None
    if empty:
        return "missing"
    missing = [n for n in RUN_FILES if not (folder / n).is_file()]
    if missing:
        raise ParamarketError(
            f"{folder} is where a cell of this sweep goes, but not a complete run folder of "
            f"paramarket (no {missing[0]}); move it away or choose another --out"
        )
    summary = folder / "summary.json"
    problem = _summary_problem(summary)
    if problem is not None:
        raise _not_ours(summary, f"is not a run summary of paramarket ({problem})")
    for name in RUN_FILES:
        if not _written_here(folder / name):
            raise _not_ours(folder / name, "is not a table of paramarket")
    return "complete"


def check_replaceable(folder: pathlib.Path) -> None:
    """A complete cell to run again holds only what this tool writes there (its tables,
    and the report and figures ``paramarket report``/``plot`` draw): else one line."""
    foreign = [e for e in sorted(folder.iterdir()) if not _written_here(e)]
    if foreign:
        raise _not_ours(foreign[0], "is in a cell folder that --force would replace")


def read_meta(root: pathlib.Path) -> dict | None:
    """The folder's ``sweep.json`` (None without one); one that this tool did not write
    (no ``format`` of its own, nor the shape of an older sweep.json) is a one-line error."""
    path = root / "sweep.json"
    if not os.path.lexists(path):
        return None
    meta = None
    if not path.is_symlink() and path.is_file():
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            meta = None
    ours = isinstance(meta, dict) and (meta.get("format") == FORMAT or set(meta) == _LEGACY_META)
    if not ours:
        raise _not_ours(path, f'is not a sweep description of paramarket (no "format": "{FORMAT}")')
    return meta


def check_root(root: pathlib.Path, report: bool) -> None:
    """The sweep folder is missing, empty, or a sweep folder of this tool (its sweep.json),
    and whatever the sweep would replace there (its table, report, figures, checkpoint
    folder) is this tool's own: else one line, before any compute, nothing touched."""
    if not root.is_dir():
        return
    check_writable(root)  # sweep.json and the table go in through a sibling
    try:
        empty = not any(root.iterdir())
    except OSError as err:
        raise ParamarketError(f"--out {root}: cannot read the folder ({err.strerror})") from None
    if empty:
        return
    if read_meta(root) is None:
        raise ParamarketError(
            f"--out {root} already exists, is not empty and is not a sweep folder of "
            f"paramarket (no sweep.json); choose a new or empty folder"
        )
    outputs = ["sweep.parquet", *(("report.html", *SWEEP_FIGURES) if report else ())]
    for name in outputs:
        if os.path.lexists(root / name) and not _written_here(root / name):
            raise _not_ours(root / name, f"would be replaced by the sweep's own {name}")
    saved = root / checkpoint.FOLDER
    if os.path.lexists(saved) and (saved.is_symlink() or not saved.is_dir()):
        raise _not_ours(saved, "is not a folder, where the sweep keeps its checkpoints")


def check_names(root: pathlib.Path, planned) -> None:
    """Every cell's folder name, and its temporary sibling's, fits this file system."""
    where = next((p for p in [root, *root.resolve().parents] if p.is_dir()), root)
    try:
        limit = os.pathconf(where, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    spare = len(f"..{os.getpid()}.") + 8  # write_run's ".<name>.<pid>.XXXXXXXX"
    for assignment, _ in planned:
        name = cell_name(assignment)
        if len(name.encode()) + spare > limit:
            raise ParamarketError(
                f"the cell folder name {name[:40]!r}... is longer than this file system "
                f"allows ({limit} bytes); sweep shorter values"
            )


def _replace_run(folder: pathlib.Path, files: dict) -> None:
    """Write a cell's run folder; an older run there (``--force``) is swapped out only once
    the new one is complete, and comes back if writing fails."""
    if not folder.exists():
        write_run(folder, files)
        return
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    try:
        write_run(folder, files)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_table(root: pathlib.Path, planned) -> tuple[pd.DataFrame, bool]:
    """(Re)write ``sweep.parquet`` from the finished cells' summaries, atomically, unless
    it already holds exactly that table: the table, and whether it was written."""
    table = sweep_table(root, planned)
    data = table.to_parquet(index=False)
    path = root / "sweep.parquet"
    try:
        same = path.is_file() and path.read_bytes() == data
    except OSError:
        same = False
    if not same:
        write_into(root, {"sweep.parquet": data}, last="sweep.parquet")
    return table, not same


def _drop_checkpoints(root: pathlib.Path) -> None:
    """Every cell is complete: the groups' checkpoint folders go (anything else in
    ``.checkpoints`` stays, and so does the folder then)."""
    saved = root / checkpoint.FOLDER
    if saved.is_symlink() or not saved.is_dir():
        return
    for entry in saved.iterdir():
        if _GROUP.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: not only ours
        saved.rmdir()


def groups(scenarios: list[sc.Scenario]):
    """Indices of scenarios that can share one batch call, with their experiments.

    Yields lists of (index, Experiment): one dataset is loaded per distinct data setting,
    and cells are grouped by spec, rounds and seeds.
    """
    datasets: dict[tuple, object] = {}
    grouped: dict[tuple, list] = {}
    for i, scenario in enumerate(scenarios):
        dkey = dataset_key(scenario)
        if dkey not in datasets:
            datasets[dkey] = load_shared_dataset(scenario)
        exp = build(scenario, datasets[dkey])
        key = (dkey, exp.spec, exp.noise, scenario.train.rounds, tuple(scenario.seeds))
        grouped.setdefault(key, []).append((i, exp))
    yield from grouped.values()


def group_id(cells: list[tuple[str, sc.Scenario]]) -> str:
    """The checkpoint folder name of a group of cells: a hash of their names and resolved
    scenarios (seeds, rounds and every knob), in order. The same command gives the same
    group the same id; a cell whose scenario changed (``--set``, ``--force``) gets a new
    one, so it never goes on from another scenario's checkpoint."""
    text = json.dumps([[name, sc.dumps(scenario)] for name, scenario in cells])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs its cells: :func:`run_sweep`'s keyword options.

    Attributes:
        engine: ``batch`` (cells differing only in numeric knobs share one compiled call),
            ``mesa`` (each cell's seeds stepped through the Mesa model) or ``auto``
            (``batch``).
        max_batch: most runs per compiled call of the batch path.
        force: rerun complete cells whose scenario differs from the requested one (else
            such a cell stops the sweep, naming the differing keys, before any compute).
        report: write the sweep's figures and ``report.html`` at the end (cells get tables
            only; ``paramarket report`` on a cell folder draws one).
        checkpoint_every: save each group of cells every K rounds under
            ``out/.checkpoints`` and go on from there (batch engine only; see the module).
        devices, shard: run on this many devices, splitting runs or agents over them
            (:func:`paramarket_jax.engines.batch.prepare`).
    """

    engine: str = "auto"
    max_batch: int | None = None
    force: bool = False
    report: bool = True
    checkpoint_every: int | None = None
    devices: int = 1
    shard: str = "auto"

    def __post_init__(self):
        every = self.checkpoint_every
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ParamarketError(f"--checkpoint-every must be a positive integer, got {every!r}")


def check_engine(options: SweepOptions) -> None:
    """The engine suits the options (the Mesa engine has no checkpoints and one device):
    a bad combination fails before any compute."""
    if resolve_engine(options.engine) == "mesa":
        if options.checkpoint_every is not None:
            raise ParamarketError(CHECKPOINT_ENGINE)
        if options.devices != 1:
            raise ParamarketError(MESA_DEVICES)
    if jax.process_count() > 1 and options.checkpoint_every is not None:
        raise ParamarketError(
            "--checkpoint-every works in one process only; run the processes without it"
        )


def pending(root: pathlib.Path, planned, force: bool, check: bool = True):
    """The cells to run, [(folder, scenario)], and the names of the complete cells kept.

    With ``check`` a complete cell (:func:`cell_state`) is kept if it ran the requested
    scenario; one that ran another is run again with ``force``, and stops the sweep without
    it; anything in a cell's place that this tool did not write stops the sweep, force or
    not, and so does a file of the user's in a cell that ``force`` would run again.
    Without ``check`` (a process other than 0, which learns from process 0) every cell is
    to run.
    """
    todo, kept = [], []
    # anything in a cell's place that is not this tool's is refused first, force or not
    states = [cell_state(root / cell_name(a)) if check else "missing" for a, _ in planned]
    for (assignment, scenario), state in zip(planned, states, strict=True):
        folder = root / cell_name(assignment)
        if state == "complete":
            stale = stale_keys(folder, scenario)
            if not stale:
                kept.append(folder.name)
                continue
            if not force:
                raise ParamarketError(
                    f"{folder} holds a run of another scenario (differs in "
                    f"{', '.join(stale[:5])}); use a new --out, or --force to rerun it"
                )
            check_replaceable(folder)
        todo.append((folder, scenario))
    return todo, kept


def _shared_todo(root: pathlib.Path, planned, todo):
    """In a multi-process run every process runs the cells process 0 found missing."""
    folders = {folder for folder, _ in todo}
    missing = np.array([(root / cell_name(a)) in folders for a, _ in planned])
    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [(root / cell_name(a), s) for (a, s), m in zip(planned, missing, strict=True) if m]


def _run_checkpointed(
    root: pathlib.Path, names: list[str], cells: list[Experiment], options: SweepOptions, tick, note
) -> tuple[list, pathlib.Path]:
    """A group's cells through the batch path in chunks of ``checkpoint_every`` rounds,
    saving after each into ``root/.checkpoints/<group id>`` and going on from the newest
    usable step there: their RunResults and that folder. A group that fails for good (every
    agent diverged) drops its checkpoints."""
    every = options.checkpoint_every
    gid = group_id([(name, c.scenario) for name, c in zip(names, cells, strict=True)])
    folder = root / checkpoint.FOLDER / gid
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    name = f"the group of cell(s) {shown}"
    saves = checkpoint.Checkpoints(
        root, every, resume=folder.exists(), note=note, folder=folder, name=name
    )
    try:
        with saves:
            out = batch.run_cells_chunked(
                cells,
                every,
                max_batch=options.max_batch,
                progress=tick,
                start=saves.starter(tick),
                save=saves.save,
                note=note,
                devices=options.devices,
                shard=options.shard,
            )
        return [result_of(c, r) for c, r in zip(cells, out.records, strict=True)], folder
    except ParamarketError:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def run_group(
    root: pathlib.Path,
    names: list[str],
    cells: list[Experiment],
    options: SweepOptions,
    tick,
    note=None,
) -> tuple[list[RunResult], pathlib.Path | None]:
    """One group of built cells (from :func:`groups`): checkpointed, through the batch path
    (one compiled call) or each through the Mesa view. Their RunResults, and the group's
    checkpoint folder (None without checkpoints); ``tick(k)`` after k rounds x seeds."""
    if options.checkpoint_every is not None:
        quiet = note or (lambda text: None)
        return _run_checkpointed(root, names, cells, options, tick, quiet)
    if resolve_engine(options.engine) == "mesa":
        return [run_mesa(exp, tick) for exp in cells], None
    rounds = cells[0].scenario.train.rounds
    results = run_cells(
        cells,
        max_batch=options.max_batch,
        progress=lambda runs: tick(runs * rounds),
        devices=options.devices,
        shard=options.shard,
        note=note,
    )
    return results, None


def write_group(
    root: pathlib.Path,
    planned,
    folders: list[pathlib.Path],
    results,
    progress=None,
    saved: pathlib.Path | None = None,
) -> None:
    """A group's cells into their folders (``progress(name, False)`` after each), its
    checkpoints (``saved``) removed, and ``sweep.parquet`` rewritten: the finished cells so
    far, so a report works mid-sweep."""
    for folder, result in zip(folders, results, strict=True):
        _replace_run(folder, result.files(report=False))
        if progress is not None:
            progress(folder.name, False)
    if saved is not None:
        shutil.rmtree(saved, ignore_errors=True)
    _write_table(root, planned)


def _report_missing(root: pathlib.Path) -> bool:
    return not all((root / n).is_file() for n in ("report.html", *SWEEP_FIGURES[:2]))


def _finish(root: pathlib.Path, planned, report: bool, ran: bool = True) -> pd.DataFrame:
    """Every cell is complete: the final table (rewritten only if it changed); checkpoints
    left by groups of other settings are of no use; with ``report``, the sweep's figures
    and page, drawn again only if something was written (``ran``: a cell or sweep.json),
    the table changed or the page is missing. The table's ``attrs["unchanged"]`` says
    whether nothing at all was written."""
    table, changed = _write_table(root, planned)
    _drop_checkpoints(root)
    drawn = report and (ran or changed or _report_missing(root))
    if drawn:
        files = sweep_outputs(root)
        for name in files:  # a figure of a name not checked up front (check_root)
            if os.path.lexists(root / name) and not _written_here(root / name):
                raise _not_ours(root / name, f"would be replaced by the sweep's own {name}")
        write_files(root, files)
    table.attrs["unchanged"] = not (ran or changed or drawn)  # nothing was written
    return table


def _described(meta: dict) -> dict:
    """What a sweep.json says is swept (its command line aside), as JSON reads it back."""
    return json.loads(json.dumps({k: meta.get(k) for k in ("format", *sorted(_LEGACY_META))
                                  if k != "command"}))  # fmt: skip


def _undo_fresh(root: pathlib.Path, made: list[pathlib.Path]) -> None:
    """A sweep folder this call created (``made``: it and the parents it made, deepest
    first), failing before any cell was written: its sweep.json and those folders go
    again, each only if nothing else is in it."""
    try:
        if {p.name for p in root.iterdir()} <= {"sweep.json", checkpoint.FOLDER}:
            (root / "sweep.json").unlink(missing_ok=True)
            if (root / checkpoint.FOLDER).is_dir():
                (root / checkpoint.FOLDER).rmdir()
            for folder in made:
                folder.rmdir()
    except OSError:
        pass  # something else is there now: leave it


def run_sweep(
    base: str,
    grid,
    overrides,
    out: str | os.PathLike,
    progress: Callable[[str, bool], None] | None = None,
    *,
    bar=None,
    command: str | None = None,
    note: Callable[[str], None] | None = None,
    **options,
) -> pd.DataFrame:
    """Run every missing cell of the grid into ``out``: ``sweep.json`` (what is swept) first,
    ``sweep.parquet`` (one row per finished cell x seed) after every group of cells, and at
    the end, with ``report``, ``report.html`` and the sweep's figures.

    Every cell is checked and built (datasets loaded once each, models and mechanisms
    checked) before any cell runs, and so is the folder: it must be missing, empty, or a
    sweep folder of this tool, and nothing in it that this tool did not write is ever
    replaced or removed (:func:`check_root`, :func:`cell_state`). A sweep with nothing to
    run writes nothing that would not change (``sweep.json`` only if what it sweeps
    changed, the table only if its rows did, the report only if either did or it is
    missing). In a multi-process run (``jax.distributed``) process 0 decides which cells
    to run and tells the others, and only process 0 writes; the others return an empty
    table.

    Args:
        base: bundled scenario name or TOML path.
        grid: [(dotted key, values)], e.g. from :func:`parse_grid`.
        overrides: ``key=value`` overrides applied to every cell.
        out: the sweep folder (created if missing; complete cells are kept).
        progress: optional callable(cell name, done) after each cell.
        bar: optional callable(total) -> progress bar (tqdm-like ``update(k)``) over the
            rounds x seeds of the cells to run, made once every cell is checked and built.
        command: the command line, recorded in ``sweep.json`` and the report.
        note: optional callable(text) for checkpoint messages (which step a group goes
            on from) and, when a group's runs take several compiled calls, how they are
            split (:meth:`~paramarket_jax.engines.batch.Batch.plan`).
        **options: the fields of :class:`SweepOptions` (``engine``, ``max_batch``,
            ``force``, ``report``, ``checkpoint_every``, ``devices``, ``shard``).
    """
    options = SweepOptions(**options)
    planned = plan(base, grid, overrides)
    check_engine(options)
    root = pathlib.Path(out)
    writer = jax.process_index() == 0
    if writer:
        check_root(root, options.report)
        check_names(root, planned)
    todo, kept = pending(root, planned, options.force, check=writer)
    if jax.process_count() > 1:
        todo = _shared_todo(root, planned, todo)
    if not writer:
        progress = bar = None
    for name in kept:
        if progress is not None:
            progress(name, True)
    built = list(groups([scenario for _, scenario in todo]))
    made, described = [], False
    if writer:
        made = [p for p in [root, *root.parents] if not os.path.lexists(p)]
        root.mkdir(parents=True, exist_ok=True)
        meta = dict(
            format=FORMAT,
            scenario=base,
            grid=[[k, list(v)] for k, v in grid],
            overrides=list(overrides),
            command=command,
        )
        old = read_meta(root)
        described = old is None or _described(old) != _described(meta)
        if described:
            write_into(root, {"sweep.json": meta}, last="sweep.json")
    if bar is not None:
        bar = bar(sum(s.train.rounds * len(s.seeds) for _, s in todo))
    tick = (lambda k: None) if bar is None else bar.update
    written = False
    try:
        for group in built:
            folders = [todo[i][0] for i, _ in group]
            cells = [exp for _, exp in group]
            results, saved = run_group(root, [f.name for f in folders], cells, options, tick, note)
            if writer:
                write_group(root, planned, folders, results, progress, saved)
                written = True
    except ParamarketError:
        if made and not written:
            _undo_fresh(root, made)
        raise
    if not writer:
        return pd.DataFrame()
    return _finish(root, planned, options.report, ran=bool(todo) or described)
