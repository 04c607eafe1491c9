"""One self-contained HTML page per run or sweep folder, and its figures as PNG files.

Reads only what a run wrote (``scenario.toml``, ``rounds.parquet``, ``trades.parquet``,
``summary.json``; a sweep's ``sweep.parquet``, ``sweep.json`` and its cells). The page
embeds every figure as a base64 PNG and uses no script, stylesheet or link outside itself,
so it reads offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import pathlib
import re
import tempfile
import tomllib

import numpy as np
import pandas as pd

from paramarket_jax.errors import ParamarketError
from paramarket_jax.results import plots
from paramarket_jax.results.folders import write_into
from paramarket_jax.results.tables import WELFARE_COLUMNS, knob_text

RUN_FILES = ("scenario.toml", "rounds.parquet", "trades.parquet", "summary.json")

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; max-width: 800px; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
.kpi { display: inline-block; margin: 0 1.5em 0.5em 0; } .kpi b { font-size: 1.3em; }
"""


def _read(path: pathlib.Path, kind: str):
    """A file of a run or sweep folder; a one-line error naming it if it is missing or
    cannot be read (not Parquet, truncated, not UTF-8, not JSON, a folder)."""
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "json":
            return json.loads(path.read_text())
        return path.read_text()
    except FileNotFoundError:
        raise ParamarketError(f"{path} is missing") from None
    except UnicodeDecodeError as err:
        raise ParamarketError(f"{path} cannot be read: not UTF-8 text ({err.reason} at "
                              f"byte {err.start})") from None  # fmt: skip
    except IsADirectoryError:
        raise ParamarketError(f"{path} cannot be read: it is a folder, not a file") from None
    except json.JSONDecodeError as err:
        raise ParamarketError(
            f"{path} cannot be read: not JSON ({err.msg}, line {err.lineno})"
        ) from None
    except OSError as err:
        raise ParamarketError(f"{path} cannot be read ({err.strerror or err})") from None
    except Exception as err:  # pyarrow's errors for a file that is not (all) Parquet
        if kind != "parquet":
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = re.sub(r"^Could not open Parquet input source '.*?': ", "", reason)
        reason = reason.split(". ")[0].rstrip(".")  # its first sentence
        raise ParamarketError(
            f"{path} cannot be read: not a Parquet file, or a truncated or damaged one "
            f"({reason[:200]})"
        ) from None


def folder_kind(folder: str | os.PathLike) -> str:
    """``run`` or ``sweep``; anything else is a one-line error naming what is missing."""
    path = pathlib.Path(folder)
    if not path.exists():
        raise ParamarketError(f"{path} does not exist; give a run or sweep folder")
    if not path.is_dir():
        raise ParamarketError(f"{path} is a file; give a run or sweep folder")
    if (path / "sweep.parquet").is_file() or (path / "sweep.json").is_file():
        return "sweep"
    if (path / "rounds.parquet").is_file():
        return "run"
    raise ParamarketError(
        f"{path} is neither a run folder (no rounds.parquet) nor a sweep folder (no sweep.parquet)"
    )


# What the figures and pages read, column -> kind: "index" (whole numbers >= 0), "number",
# "flag" (true/false) or "name" (a cell's folder name). A table without one of them, or
# with other values in it, is a one-line error naming the file and the column.
ROUNDS_READ = dict.fromkeys(("seed", "round", "agent"), "index") | dict.fromkeys(
    ("accuracy", "siloed_accuracy", "utility", "siloed_utility", "payment", "receipt", "fees"),
    "number",
)
ROUNDS_OPTIONAL = dict.fromkeys(
    ("fedavg_accuracy", "central_accuracy", "compensation", *WELFARE_COLUMNS), "number"
)
TRADES_READ = dict.fromkeys(("seed", "round", "buyer", "seller"), "index") | dict.fromkeys(
    ("price", "value", "realized_value", "realized_gain"), "number"
)
TRADES_OPTIONAL = {"hostile": "flag"} | dict.fromkeys(
    ("compensation", "social_value", "external_value"), "number"
)
SWEEP_READ = {"cell": "name", "seed": "index", "mutual_gain": "flag"} | dict.fromkeys(
    ("market_accuracy", "siloed_accuracy", "welfare", "siloed_welfare", "trades"), "number"
)
_KINDS = {
    "index": "whole numbers >= 0",
    "number": "numbers",
    "flag": "true or false",
    "name": "cell folder names (no /, not . or ..)",
}


def _bad_values(column: pd.Series, kind: str) -> pd.Series:
    """The values of ``column`` that are not of ``kind`` (all of them, for a column of the
    wrong type)."""
    if kind == "name":
        ok = column.map(
            lambda v: type(v) is str and v not in ("", ".", "..") and "/" not in v and "\0" not in v
        )
        return column[~ok.astype(bool)]
    if kind == "flag":
        if pd.api.types.is_bool_dtype(column):
            return column[column.isna()]
        if pd.api.types.is_numeric_dtype(column):
            return column[~column.isin([0, 1])]
        return column
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        return column
    if kind == "number":
        return column.iloc[:0]
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.floor(values))
    return column[bad]


def check_table(table: pd.DataFrame, path, what: str, read: dict, optional=None) -> None:
    """ParamarketError naming ``path`` and the column unless ``table`` has every column of
    ``read`` (and of ``optional``, where present) holding values of its kind."""
    optional = optional or {}
    missing = [c for c in read if c not in table.columns]
    if missing:
        raise ParamarketError(
            f"{path} is not a {what} of paramarket: it has no column {missing[0]!r} (edited "
            f"or damaged?)"
        )
    for column, kind in {**read, **{c: k for c, k in optional.items() if c in table}}.items():
        bad = _bad_values(table[column], kind)
        if len(bad):
            raise ParamarketError(
                f"{path}: column {column!r} must hold {_KINDS[kind]}, got "
                f"{_shown(bad.iloc[0])} (edited or damaged?)"
            )


def _shown(value, most: int = 60) -> str:
    text = repr(value.item() if hasattr(value, "item") else value)
    return text if len(text) <= most else text[:most] + "..."


def load_tables(folder: pathlib.Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """A run folder's (or sweep cell's) rounds and trades tables and scenario text, checked
    for what the figures read: agents numbered 0 to N-1, trades between them."""
    rounds_path, trades_path = folder / "rounds.parquet", folder / "trades.parquet"
    rounds = _read(rounds_path, "parquet")
    missing = {"seed", "round", "agent", "utility", "siloed_utility"} - set(rounds.columns)
    if missing or not len(rounds):
        raise ParamarketError(
            f"{rounds_path} is not a rounds table of paramarket "
            + (f"(no column {sorted(missing)[0]!r})" if missing else "(no rows)")
        )
    check_table(rounds, rounds_path, "rounds table", ROUNDS_READ, ROUNDS_OPTIONAL)
    agents = np.unique(rounds["agent"].to_numpy(np.int64))
    n = len(agents)
    if agents[-1] != n - 1:
        raise ParamarketError(
            f"{rounds_path}: column 'agent' must number the agents 0 to N-1, got "
            f"{', '.join(map(str, agents[:4]))}{', ...' if n > 4 else ''} (edited or damaged?)"
        )
    trades = _read(trades_path, "parquet")
    check_table(trades, trades_path, "trades table", TRADES_READ, TRADES_OPTIONAL)
    for side in ("buyer", "seller"):
        outside = trades.loc[trades[side] >= n, side]
        if len(outside):
            raise ParamarketError(
                f"{trades_path}: column {side!r} names agent {int(outside.iloc[0])}, but "
                f"{rounds_path} has agents 0 to {n - 1} (edited or damaged?)"
            )
    return rounds, trades, _read(folder / "scenario.toml", "text")


def _is_number(v) -> bool:
    return type(v) in (int, float)  # NaN and inf read back as floats: shown as "–"


def _is_int(v) -> bool:
    return type(v) is int


SUMMARY_NUMBERS = ("market_accuracy", "siloed_accuracy", "welfare", "siloed_welfare",
                   "broker_take", "mutual_gain_fraction", "accuracy_gain_all_fraction")  # fmt: skip
PER_SEED_READ = ("welfare", "siloed_welfare", "broker_take", "trades", "mutual_gain",
                 "accuracy_gain_all")  # fmt: skip


def summary_problem(summary) -> str | None:
    """What in a run's ``summary.json`` (as JSON reads it) the report cannot show; None
    when it is a summary of paramarket."""
    if not isinstance(summary, dict):
        return f"it holds a JSON {type(summary).__name__}, not an object"
    for key in SUMMARY_NUMBERS:
        if not _is_number(summary.get(key)):
            return f"{key!r} must be a number, got {_shown(summary.get(key))}"
    for key in ("rounds", "trade_count"):
        if not _is_int(summary.get(key)):
            return f"{key!r} must be an integer, got {_shown(summary.get(key))}"
    seeds = summary.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(_is_int(x) for x in seeds):
        return f"'seeds' must be a non-empty list of integers, got {_shown(seeds)}"
    agents = summary.get("agents")
    if not isinstance(agents, list) or not all(
        isinstance(a, dict) and _is_int(a.get("agent")) for a in agents
    ):
        return f"'agents' must be a list of objects with an 'agent' number, got {_shown(agents)}"
    if "better_off_fraction" in summary and not _is_number(summary["better_off_fraction"]):
        return (
            f"'better_off_fraction' must be a number, got {_shown(summary['better_off_fraction'])}"
        )
    problem = _parts_problem(summary.get("decomposition"), "'decomposition'")
    if problem:
        return problem
    per_seed = summary.get("per_seed")
    if not isinstance(per_seed, dict) or not per_seed:
        return f"'per_seed' must be an object of seeds, got {_shown(per_seed)}"
    for seed, values in per_seed.items():
        if not seed.isdigit() or not isinstance(values, dict):
            return f"'per_seed' must map seeds to objects, got {_shown(seed)}: {_shown(values)}"
        for key in PER_SEED_READ:
            if not _is_number(values.get(key)) and type(values.get(key)) is not bool:
                return f"'per_seed' seed {seed}: {key!r} must be a number, got " + _shown(
                    values.get(key)
                )
        if "better_off" in values and not _is_int(values["better_off"]):
            return f"'per_seed' seed {seed}: 'better_off' must be an integer, got " + _shown(
                values["better_off"]
            )
        problem = _parts_problem(values.get("decomposition"), f"'per_seed' seed {seed}: "
                                 "'decomposition'")  # fmt: skip
        if problem:
            return problem
    return None


# the welfare decomposition of a summary (``tables.welfare_parts``; summaries written
# before it have none): what the report shows of it
DECOMPOSITION_READ = ("welfare_gain", "market_expansion", "stolen", "cost_saving")


def _parts_problem(parts, what: str) -> str | None:
    """What in a summary's ``decomposition`` (None: absent) the report cannot show."""
    if parts is None:
        return None
    if not isinstance(parts, dict):
        return f"{what} must be an object, got {_shown(parts)}"
    for key in DECOMPOSITION_READ:
        if not _is_number(parts.get(key)):
            return f"{what}: {key!r} must be a number, got {_shown(parts.get(key))}"
    return None


def load_run(folder: str | os.PathLike) -> dict:
    """A run folder's tables, summary and scenario text, checked for what the report reads
    (a one-line error naming the file and the problem)."""
    path = pathlib.Path(folder)
    rounds, trades, scenario = load_tables(path)
    summary = _read(path / "summary.json", "json")
    problem = summary_problem(summary)
    if problem is not None:
        raise ParamarketError(
            f"{path / 'summary.json'} is not a run summary of paramarket: {problem} (edited "
            "or damaged?)"
        )
    return {"rounds": rounds, "trades": trades, "summary": summary, "scenario": scenario}


def meta_problem(meta) -> str | None:
    """What in a ``sweep.json`` (as JSON reads it) the report cannot use; None if nothing."""
    if not isinstance(meta, dict):
        return f"it holds a JSON {type(meta).__name__}, not an object"
    grid = meta.get("grid", [])
    if not isinstance(grid, list) or not all(
        isinstance(g, list) and len(g) == 2 and type(g[0]) is str and isinstance(g[1], list)
        for g in grid
    ):
        return f"'grid' must be a list of [key, [values]] pairs, got {_shown(grid)}"
    overrides = meta.get("overrides", [])
    if not isinstance(overrides, list) or not all(type(o) is str for o in overrides):
        return f"'overrides' must be a list of strings, got {_shown(overrides)}"
    for key in ("command", "scenario"):
        if meta.get(key) is not None and type(meta[key]) is not str:
            return f"{key!r} must be a string, got {_shown(meta[key])}"
    return None


def load_sweep(folder: str | os.PathLike) -> dict:
    """A sweep folder's table, its swept knobs, and every complete cell's tables, checked
    for what the report reads (a one-line error naming the file and the problem)."""
    path = pathlib.Path(folder)
    table_path, meta_path = path / "sweep.parquet", path / "sweep.json"
    if not table_path.is_file():
        if table_path.exists():
            raise ParamarketError(f"{table_path} is a folder, not a file")
        raise ParamarketError(f"{path}: the sweep has no finished cell yet")
    table = _read(table_path, "parquet")
    meta = _read(meta_path, "json") if os.path.lexists(meta_path) else {}
    problem = meta_problem(meta)
    if problem is not None:
        raise ParamarketError(
            f"{meta_path} is not a sweep description of paramarket: {problem} (edited or damaged?)"
        )
    columns = list(table.columns)
    if "cell" not in columns or "seed" not in columns:
        raise ParamarketError(f"{table_path} is not a sweep table of paramarket")
    if not len(table):
        raise ParamarketError(f"{path}: the sweep has no finished cell yet")
    check_table(table, table_path, "sweep table", SWEEP_READ)
    knobs = [k for k, _ in meta.get("grid", [])] or columns[
        columns.index("cell") + 1 : columns.index("seed")
    ]
    if not knobs:
        raise ParamarketError(
            f"{table_path} names no swept knob (no columns between 'cell' and 'seed', and "
            f"no grid in {meta_path.name}): not a sweep table of paramarket"
        )
    lost = [k for k in knobs if k not in columns]
    if lost:
        raise ParamarketError(
            f"{meta_path} sweeps {lost[0]!r}, but {table_path} has no column for it (edited "
            "or damaged?)"
        )
    for knob in knobs:
        table[knob] = table[knob].map(knob_text)
    cell_rounds, cell_trades, cell_scenarios = {}, {}, {}
    for cell in dict.fromkeys(table["cell"]):
        if (path / cell / "rounds.parquet").is_file():
            rounds, trades, scenario = load_tables(path / cell)
            cell_rounds[cell], cell_trades[cell], cell_scenarios[cell] = rounds, trades, scenario
    scenario = next(iter(cell_scenarios.values()), "")
    return dict(
        table=table,
        knobs=knobs,
        meta=meta,
        cell_rounds=cell_rounds,
        cell_trades=cell_trades,
        cell_scenarios=cell_scenarios,
        scenario=scenario,
    )


# ---- HTML -----------------------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, fmt=".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return f"{v:{fmt}}"
    return _e(v)


def _table(df: pd.DataFrame, left: int = 1, fmt: str = ".3f") -> str:
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{_e(c)}</th>' for i, c in enumerate(df.columns)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"l" if i < left else ""}">{_num(v, fmt)}</td>' for i, v in enumerate(row)
        )
        + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figures(figures: dict) -> str:
    parts = []
    for name, (png, caption) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _page(title: str, body: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{_e(title)}</h1>\n{body}\n"
        f'<p style="color:#888;font-size:0.8em">paramarket report, written {stamp}.</p>'
        "\n</body></html>\n"
    )


def _kpis(items) -> str:
    return (
        "<p>"
        + "".join(f'<span class="kpi">{_e(k)}<br><b>{v}</b></span>' for k, v in items)
        + "</p>"
    )


# ---- hostile sellers -------------------------------------------------------------------------

# what buyers bought from hostile sellers and from honest ones (:func:`hostile_table`)
HOSTILE_HEADING = "Purchases from hostile sellers"
# money columns of that table: four significant digits (prices are often below 0.001)
HOSTILE_FMT = ".4g"


def hostile_agents(scenario_text: str) -> tuple[int, ...]:
    """The agents a run's scenario marks hostile (``agents.hostile``); () when none (or
    when the text is not a scenario)."""
    try:
        agents = tomllib.loads(scenario_text).get("agents", {})
        return tuple(sorted(int(a) for a in agents.get("hostile", ())))
    except (tomllib.TOMLDecodeError, AttributeError, TypeError, ValueError):
        return ()


def _bought(trades: pd.DataFrame) -> dict:
    """What buyers bought in ``trades``: purchases, money paid, realised value (the sum of
    ``realized_value``: negative is lost), and purchases that raised the buyer's test loss."""
    paid, value = float(trades["price"].sum()), float(trades["realized_value"].sum())
    return {
        "purchases": len(trades),
        "paid": paid,
        "realised value": value,
        "realised - paid": value - paid,
        "made buyer worse on test": int((trades["realized_gain"] < 0).sum()),
    }


def hostile_table(trades: pd.DataFrame, seeds: int, hostile=()) -> pd.DataFrame | None:
    """Purchases from hostile sellers against honest ones: over all ``seeds`` and, with
    more than one, the mean per seed. None when the run has no hostile agent (its scenario
    lists none, ``hostile``, and no trade's seller was hostile)."""
    if not plots.has_hostile(trades, hostile):
        return None
    mark = plots.seller_is_hostile(trades, hostile)
    rows = []
    over = [(f"all {seeds} seeds" if seeds > 1 else "the run", 1)]
    over += [("mean per seed", seeds)] * (seeds > 1)
    for label, scale in over:
        for sellers, t in (("hostile", trades[mark]), ("honest", trades[~mark])):
            bought = {k: v / scale if scale > 1 else v for k, v in _bought(t).items()}
            rows.append({"sellers": sellers, "over": label, **bought})
    return pd.DataFrame(rows)


def _hostile_kpi(table: pd.DataFrame) -> tuple[str, str]:
    row = table.iloc[0]  # hostile sellers, over all seeds
    return (
        "bought from hostile sellers",
        f"{int(row['purchases'])} (paid {row['paid']:{HOSTILE_FMT}}, "
        f"realised {row['realised value']:+{HOSTILE_FMT}})",
    )


def _hostile_section(table: pd.DataFrame | None, agents=()) -> str:
    if table is None:
        return ""
    who = f"agent {_e(', '.join(map(str, agents)))}" if agents else "some sellers"
    return (
        f"<h2>{HOSTILE_HEADING}</h2><p>Hostile: {who} (a hostile seller offers the broker "
        "something other than its model). Per seller kind: purchases, what buyers paid, "
        "the realised value of what they bought (on each buyer's test rows; negative is "
        "lost), that value less the price, and the purchases that raised the buyer's test "
        f"loss.</p>{_table(table, 2, HOSTILE_FMT)}"
    )


def shipping_table(trades: pd.DataFrame) -> pd.DataFrame | None:
    """What the trades shipped, by the merge's second knob (TIES' density, DARE's drop rate;
    0: none): trades, parameters shipped per trade, shipping paid, realised value, and
    realised value per million parameters shipped; None without trades or a shipped column
    (tables written before goods were priced)."""
    if not {"shipped", "second", "transfer"} <= set(trades) or not len(trades):
        return None
    rows = []
    for second, g in trades.groupby("second"):
        shipped, value = float(g["shipped"].sum()), float(g["realized_value"].sum())
        rows.append(
            {
                "density / drop": float(second),
                "trades": len(g),
                "parameters / trade": shipped / len(g),
                "shipping paid": float(g["transfer"].sum()),
                "realised value": value,
                "value / 1M parameters": 1e6 * value / shipped if shipped else 0.0,
            }
        )
    return pd.DataFrame(rows)


AGENT_COLUMNS = {  # summary key -> the agents table's heading
    "agent": "agent",
    "market_accuracy": "market_accuracy",
    "siloed_accuracy": "siloed_accuracy",
    "gain": "accuracy gain",
    "gain_std": "sd over seeds",
    "utility": "utility",
    "siloed_utility": "siloed_utility",
    "utility_gain_final": "utility gain",
    "trades": "bought/run",
    "sales": "sold/run",
    "paid": "paid",
    "received": "received",
    "market_expansion": "expansion",
    "business_stealing": "stealing",
    "transfers": "transfers",
    "cost_saving": "cost saving",
    "market_loss": "market test loss",
    "siloed_loss": "siloed test loss",
    "loss_floor": "loss floor (entropy rate)",
}


def agents_table(summary: dict) -> pd.DataFrame:
    """The agents table of a run's page: per agent, its final accuracy and utility against
    its siloed twin's (``utility gain``: utility - siloed utility), its purchases and sales
    and what it paid and received for them (per run, mean over seeds), and, in summaries
    that have them, the parts of its utility gain (summed over rounds: market expansion,
    business stealing, transfers; cost saving where any agent saved or spent compute).
    Columns a summary lacks (one written before they existed) are left out."""
    agents = pd.DataFrame(summary["agents"])
    if {"utility", "siloed_utility"} <= set(agents):
        gain = pd.to_numeric(agents["utility"], errors="coerce") - pd.to_numeric(
            agents["siloed_utility"], errors="coerce"
        )
        agents["utility_gain_final"] = gain
    if (
        "cost_saving" in agents
        and not (
            pd.to_numeric(agents["cost_saving"], errors="coerce").fillna(0.0).abs() > 1e-12
        ).any()
    ):
        agents = agents.drop(columns="cost_saving")  # no compute saved or spent
    return agents[[c for c in AGENT_COLUMNS if c in agents]].rename(columns=AGENT_COLUMNS)


def _better_off_kpi(summary: dict) -> list[tuple[str, str]]:
    """``agents above their twin``: agent-seeds whose final utility beats their siloed
    twin's, of all; none for a summary written before it counted them."""
    fraction = summary.get("better_off_fraction")
    if not _is_number(fraction) or not np.isfinite(fraction):
        return []
    total = len(summary["agents"]) * len(summary["seeds"])
    return [("agents above their twin", f"{round(fraction * total)}/{total}")]


WELFARE_HEADING = "Where the welfare came from"


def decomposition_table(summary: dict) -> pd.DataFrame | None:
    """Per seed (and, with more than one, their mean): the welfare gain over the siloed
    world and where it came from (market expansion, cost saving), the revenue business
    stealing moved between agents, the broker's take and the agents above their twins
    (of the run's agents). None for a summary without the decomposition."""
    mean = summary.get("decomposition")
    if not isinstance(mean, dict):
        return None
    n = len(summary["agents"])
    rows = []
    for seed, v in sorted(summary["per_seed"].items(), key=lambda kv: int(kv[0])):
        parts = v.get("decomposition") or {}
        better = v.get("better_off")
        rows.append(
            {
                "seed": int(seed),
                **_decomposition_row(parts, v.get("broker_take")),
                "agents above twin": f"{better}/{n}" if _is_int(better) else "–",
            }
        )
    if len(rows) > 1:
        fraction = summary.get("better_off_fraction")
        rows.append(
            {
                "seed": "mean",
                **_decomposition_row(mean, summary.get("broker_take")),
                "agents above twin": f"{fraction * n:.3g}/{n}" if _is_number(fraction) else "–",
            }
        )
    return pd.DataFrame(rows)


def _decomposition_row(parts: dict, broker_take) -> dict:
    return {
        "welfare gain": _money(parts.get("welfare_gain")),
        "market expansion": _money(parts.get("market_expansion")),
        "business stealing moved": _money(parts.get("stolen")),
        "cost saving": _money(parts.get("cost_saving")),
        "broker take": _money(broker_take),
    }


def _money(v):
    """A sum of money as the welfare section shows it: float32 rounding (below 1e-6, a
    zero take summed over float32 cash) as 0; anything but a number as None ("–")."""
    if not _is_number(v):
        return None
    return 0.0 if abs(v) < 1e-6 else float(v)


def _welfare_section(summary: dict) -> str:
    """``Where the welfare came from``: the parts in plain words, the run's mean, and
    :func:`decomposition_table`; empty for a summary without the decomposition."""
    table = decomposition_table(summary)
    if table is None:
        return ""
    d = summary["decomposition"]
    money = lambda v, fmt="+.4g": _num(_money(v), fmt)  # noqa: E731
    mean = (
        f"Here, on average over the seeds, welfare changed by {money(d['welfare_gain'])} "
        f"against the siloed world: market expansion {money(d['market_expansion'])}, cost "
        f"saving {money(d['cost_saving'])}; business stealing moved "
        f"{money(d['stolen'], '.4g')} of revenue from some agents to others; the agents "
        f"together gained {money(d.get('agents_gain'))} and the broker kept "
        f"{money(summary['broker_take'], '.4g')}."
        if "agents_gain" in d
        else ""
    )
    return (
        f"<h2>{WELFARE_HEADING}</h2><p>Each agent's utility gain over its siloed twin has "
        "four parts. <b>Market expansion</b>: the total revenue the agents gained against "
        "the siloed world, customers won from the outside option, or revenue that grows "
        "with quality. <b>Business stealing</b>: revenue moved between the agents, one's "
        "gain another's loss; over the agents it sums to zero. <b>Transfers</b>: the "
        "prices, fees and compensation the agents paid one another and the broker; net of "
        "them the broker keeps its take. <b>Cost saving</b>: the compute their twins paid "
        "for and they did not. Welfare (the agents' utilities plus the broker's take) gains "
        "only by expansion and cost saving; stealing and transfers move money between the "
        f"agents, so welfare can rise while most agents end below their twins. {mean}</p>"
        + _table(table, fmt=".4g")
    )


def run_html(
    scenario_text: str,
    summary: dict,
    figures: dict,
    name: str,
    hostile: pd.DataFrame | None = None,
    shipping: pd.DataFrame | None = None,
) -> str:
    """The report page of one run (``hostile``: its :func:`hostile_table`, or None;
    ``shipping``: its :func:`shipping_table`, or None)."""
    k = len(summary["seeds"])
    acc_gain = summary["market_accuracy"] - summary["siloed_accuracy"]
    kpis = _kpis(
        [
            ("mean test accuracy, market", f"{summary['market_accuracy']:.3f}"),
            ("siloed", f"{summary['siloed_accuracy']:.3f} ({acc_gain:+.3f})"),
            ("welfare, market", f"{summary['welfare']:.3f}"),
            ("siloed", f"{summary['siloed_welfare']:.3f}"),
            ("broker take", f"{summary['broker_take']:.3f}"),
            ("trades (all seeds)", str(summary["trade_count"])),
            ("mutual gain", f"{summary['mutual_gain_fraction'] * k:.0f}/{k} seeds"),
            (
                "every agent more accurate",
                f"{summary['accuracy_gain_all_fraction'] * k:.0f}/{k} seeds",
            ),
            *_better_off_kpi(summary),
            *([_hostile_kpi(hostile)] if hostile is not None else []),
        ]
    )
    agents = agents_table(summary)
    per_seed = pd.DataFrame(
        [
            {
                "seed": int(s),
                **{
                    f: v[f]
                    for f in (
                        "welfare",
                        "siloed_welfare",
                        "broker_take",
                        "trades",
                        "mutual_gain",
                        "accuracy_gain_all",
                    )
                },
            }
            for s, v in summary["per_seed"].items()
        ]
    )
    body = (
        f"<p>Seeds {_e(summary['seeds'])}, {summary['rounds']} rounds. Welfare is the sum of "
        "the agents' utilities (cash gained) plus the broker's take; every agent is measured "
        "against its siloed twin, the same agent trained alone.</p>"
        f"{kpis}{_welfare_section(summary)}<h2>Figures</h2>{_figures(figures)}"
        f"<h2>Agents (final round, mean over seeds)</h2>{_table(agents)}"
        f"<h2>Per seed</h2>{_table(per_seed)}"
        f"{_hostile_section(hostile, hostile_agents(scenario_text))}"
        + (
            ""
            if shipping is None
            else "<h2>What the goods shipped</h2><p>Parameters shipped to buyers (a model's "
            "traded parameters, a task vector's kept entries, an adapter's), the shipping "
            "they paid and the realised value of the purchases per million parameters.</p>"
            + _table(shipping)
        )
        + f"<h2>Scenario</h2><pre>{_e(scenario_text)}</pre>"
    )
    return _page(f"paramarket run: {name}", body)


def hostile_cells(data: dict) -> pd.DataFrame | None:
    """Per cell of a sweep (:func:`load_sweep`), purchases from hostile and from honest
    sellers per run (mean over the cell's seeds, as in :func:`hostile_table`); None when no
    cell has a hostile agent."""
    knobs = data["knobs"]
    first = data["table"].drop_duplicates("cell").set_index("cell")
    rows, any_hostile = [], False
    for cell, trades in data["cell_trades"].items():
        agents = hostile_agents(data["cell_scenarios"].get(cell, ""))
        any_hostile |= plots.has_hostile(trades, agents)
        mark = plots.seller_is_hostile(trades, agents)
        seeds = max(data["cell_rounds"][cell]["seed"].nunique(), 1)
        row = {k: first.loc[cell, k] for k in knobs}
        for sellers, t in (("hostile", trades[mark]), ("honest", trades[~mark])):
            bought = _bought(t)
            for col in ("purchases", "paid", "realised value", "made buyer worse on test"):
                row[f"{sellers}: {col}"] = bought[col] / seeds
        rows.append(row)
    return pd.DataFrame(rows) if any_hostile else None


def sweep_html(data: dict, figures: dict, name: str) -> str:
    """The report page of one sweep."""
    table, knobs, meta = data["table"], data["knobs"], data["meta"]
    t = plots.sweep_metrics(table)
    g = t.groupby(knobs, sort=False)
    cells = g[["accuracy_gain", "welfare_gain"]].agg(["mean", "std"])
    cells.columns = [f"{m} {s}" for m, s in cells.columns]
    cells["mutual-gain share"] = g["mutual_gain"].mean()
    cells["trades/run"] = g["trades"].mean()
    cells["seeds"] = g["seed"].count()
    cells = cells.reset_index()
    grid = meta.get("grid") or [[k, list(dict.fromkeys(table[k]))] for k in knobs]
    swept = "".join(
        f"<li><code>{_e(k)}</code> = {_e(', '.join(map(str, v)))}</li>" for k, v in grid
    )
    fixed = meta.get("overrides", [])
    command = meta.get("command")
    planned = int(np.prod([len(v) for _, v in grid])) if grid else len(cells)
    hostile = hostile_cells(data)
    hostile_part = (
        ""
        if hostile is None
        else f"<h2>{HOSTILE_HEADING} (per run, mean over seeds)</h2><p>Per cell: purchases "
        "from hostile and from honest sellers, what buyers paid, the realised value of what "
        "they bought (on each buyer's test rows; negative is lost) and the purchases that "
        f"raised the buyer's test loss.</p>{_table(hostile, len(knobs), HOSTILE_FMT)}"
    )
    body = (
        f"<p>Base scenario <code>{_e(meta.get('scenario', '?'))}</code>; "
        f"{len(cells)} of {planned} cells complete, seeds {_e(sorted(set(table['seed'])))}."
        "</p><h2>What was swept</h2><ul>"
        + swept
        + "</ul>"
        + (f"<p>Set in every cell: <code>{_e(' '.join(fixed))}</code></p>" if fixed else "")
        + (f"<pre>{_e(command)}</pre>" if command else "")
        + f"<h2>Figures</h2>{_figures(figures)}"
        f"<h2>Cells (mean and standard deviation over seeds)</h2>{_table(cells, len(knobs))}"
        f"{hostile_part}"
        f"<h2>Scenario of the first cell</h2><pre>{_e(data['scenario'])}</pre>"
    )
    return _page(f"paramarket sweep: {name}", body)


# ---- folders --------------------------------------------------------------------------------


def run_outputs(scenario_text: str, rounds, trades, summary: dict, name: str) -> dict:
    """Figures (name -> PNG bytes) and ``report.html`` for one run's tables."""
    hostile = hostile_agents(scenario_text)
    figures = plots.run_figures(rounds, trades, title=name, hostile=hostile)
    out = {k: png for k, (png, _) in figures.items()}
    table = hostile_table(trades, rounds["seed"].nunique(), hostile)
    out["report.html"] = run_html(
        scenario_text, summary, figures, name, table, shipping_table(trades)
    )
    return out


# what drawing a figure or page from checked tables may still raise on values nobody
# foresaw (an edited table): one line, naming the folder, instead of a traceback
_DRAWING_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError)


def _drawn(folder, draw, *args) -> dict:
    try:
        return draw(*args)
    except ParamarketError:
        raise
    except _DRAWING_ERRORS as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ParamarketError(
            f"{folder}: its tables do not fit together, so the figures cannot be drawn "
            f"({type(err).__name__}: {reason}); were they edited?"
        ) from None


def sweep_outputs(folder: str | os.PathLike) -> dict:
    """Figures (name -> PNG bytes) and ``report.html`` for a sweep folder."""
    data = load_sweep(folder)

    def draw():
        figures = plots.sweep_figures(
            data["table"], data["knobs"], data["cell_rounds"], data["cell_trades"]
        )
        out = {k: png for k, (png, _) in figures.items()}
        out["report.html"] = sweep_html(data, figures, pathlib.Path(folder).resolve().name)
        return out

    return _drawn(folder, draw)


def folder_outputs(folder: str | os.PathLike) -> dict:
    """Figures and report of a run or sweep folder, read from its tables only (checked:
    a one-line error names a damaged or edited file)."""
    if folder_kind(folder) == "sweep":
        return sweep_outputs(folder)
    run = load_run(folder)
    try:
        name = str(tomllib.loads(run["scenario"])["name"])
    except (tomllib.TOMLDecodeError, KeyError):
        name = pathlib.Path(folder).resolve().name
    return _drawn(folder, run_outputs, run["scenario"], run["rounds"], run["trades"],
                  run["summary"], name)  # fmt: skip


def check_can_write(folder: str | os.PathLike, names=()) -> None:
    """ParamarketError unless the report and figures can go into ``folder``: a file can be
    made in it and a temporary folder beside it (probed, and removed at once), and none of
    ``names`` there is a folder. Checked before drawing, so nothing is written."""
    path = pathlib.Path(folder).resolve()
    for name in names:
        if (path / name).is_dir() and not (path / name).is_symlink():
            raise ParamarketError(
                f"{path / name} is a folder where paramarket writes a file; nothing was "
                "written: move it away"
            )
    prefix = f".{path.name}.{os.getpid()}."  # as results.folders names its temporaries
    for where, probe in ((path, _probe_file), (path.parent, _probe_folder)):
        try:
            probe(prefix, where)
        except OSError as err:
            beside = "" if where == path else f" (its files are made beside it, in {where})"
            raise ParamarketError(
                f"cannot write into {path}{beside}: {err.strerror or err} (read-only?); "
                "nothing was written: make it writable, or copy the folder somewhere writable"
            ) from None


def _probe_file(prefix: str, where: pathlib.Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=prefix, dir=where)
    os.close(fd)
    os.unlink(probe)


def _probe_folder(prefix: str, where: pathlib.Path) -> None:
    os.rmdir(tempfile.mkdtemp(prefix=prefix, dir=where))


def write_files(folder: str | os.PathLike, files: dict) -> list[pathlib.Path]:
    """Write figures and pages beside the tables, each whole or absent
    (:func:`paramarket_jax.results.folders.write_into`); a one-line error when the folder
    takes no file."""
    check_can_write(folder, files)
    try:
        write_into(folder, files, last="report.html")
    except OSError as err:  # the disk full, say: each file there is the old one or the new
        raise ParamarketError(
            f"cannot write into {folder} ({err.strerror or err}); no file there is half written"
        ) from None
    return [pathlib.Path(folder) / name for name in files]


def write_report(folder: str | os.PathLike) -> pathlib.Path:
    """``paramarket report DIR``: write DIR/report.html."""
    folder_kind(folder)  # a run or sweep folder, else one line
    check_can_write(folder, ["report.html"])
    files = folder_outputs(folder)
    return write_files(folder, {"report.html": files["report.html"]})[0]


def write_plots(folder: str | os.PathLike) -> list[pathlib.Path]:
    """``paramarket plot DIR``: write every figure of DIR as a PNG file in DIR."""
    folder_kind(folder)  # a run or sweep folder, else one line
    check_can_write(folder)
    files = folder_outputs(folder)
    files.pop("report.html")
    return write_files(folder, files)
