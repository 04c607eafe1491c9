"""Figures and the one-file HTML report, drawn from result tables only (no compute here,
but for one tiny run with a hostile seller)."""

import functools
import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pages import browser, check_report, decode_png, screenshot
from shrink import SHRINK
from welfare import RIVAL_SMALL

from paramarket_jax import scenario as sc
from paramarket_jax.cli.main import main
from paramarket_jax.results import plots, report
from paramarket_jax.results.folders import write_run
from paramarket_jax.results.tables import (
    ROUND_COLUMNS,
    TRADE_COLUMNS,
    WELFARE_COLUMNS,
    summarize,
)
from paramarket_jax.runs import RunResult, run_scenario
from paramarket_jax.sweep import cell_name, sweep_table

RUN_FIGURES = {
    "welfare.png",
    "accuracy.png",
    "utility_gain.png",
    "prices_volume.png",
    "trade_matrix.png",
    "value_scatter.png",
    "who_gained.png",
}


def fake_tables(seed=0, n=3, rounds=6, seeds=(0, 1), trade_rate=0.5):
    """Rounds and trades tables shaped like a run's (random numbers, consistent columns)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        cash = np.zeros(n)
        silo = np.zeros(n)
        for r in range(rounds):
            cash += rng.uniform(0, 1, n)
            silo += rng.uniform(0, 0.8, n)
            for a in range(n):
                row = dict.fromkeys(ROUND_COLUMNS, 0.0)
                row.update(
                    seed=s,
                    round=r,
                    agent=a,
                    accuracy=rng.uniform(0.5, 1),
                    siloed_accuracy=rng.uniform(0.3, 0.8),
                    utility=cash[a],
                    siloed_utility=silo[a],
                    cash=cash[a],
                    siloed_cash=silo[a],
                    payment=rng.uniform(0, 0.1),
                    receipt=rng.uniform(0, 0.1),
                    fedavg_accuracy=np.nan,
                    central_accuracy=0.9,
                    alive=True,
                    siloed_alive=True,
                    trades=r,
                )
                rows.append(row)
    rounds_df = pd.DataFrame(rows)[["seed", "round", "agent", *ROUND_COLUMNS]]
    trades = []
    for s in seeds:
        for r in range(1, rounds):
            for b in range(n):
                if rng.uniform() < trade_rate:
                    value = rng.uniform(0, 1)
                    row = dict.fromkeys(TRADE_COLUMNS, 0.0)
                    row.update(
                        seed=s,
                        round=r,
                        buyer=b,
                        seller=(b + 1) % n,
                        value=value,
                        realized_value=value + rng.normal(0, 0.1),
                        price=rng.uniform(0, value),
                    )
                    trades.append(row)
    trades_df = pd.DataFrame(trades, columns=TRADE_COLUMNS)
    trades_df["estimation_error"] = trades_df["value"] - trades_df["realized_value"]
    return rounds_df, trades_df


def fake_result(**kw) -> RunResult:
    rounds, trades = fake_tables(**kw)
    return RunResult(sc.load("paper_two_agent"), rounds, trades, summarize(rounds, trades))


def test_a_run_folder_holds_every_figure_and_a_self_contained_report(tmp_path):
    out = write_run(tmp_path / "run", fake_result().files())
    names = {p.name for p in out.iterdir()}
    assert RUN_FIGURES | {"accuracy_per_agent.png", "report.html"} <= names
    for name in names - {"report.html"}:
        if name.endswith(".png"):
            decode_png((out / name).read_bytes())
    text = check_report(out / "report.html", min_images=len(RUN_FIGURES))
    assert "paper_two_agent" in text and "siloed" in text and "Per seed" in text
    assert "[broker]" in text  # the scenario is on the page
    assert oct((out / "report.html").stat().st_mode & 0o777) != oct(0o600)


def test_tables_only_without_the_report(tmp_path):
    out = write_run(tmp_path / "run", fake_result().files(report=False))
    assert {p.name for p in out.iterdir()} == {
        "scenario.toml",
        "rounds.parquet",
        "trades.parquet",
        "summary.json",
    }
    # drawn later from the tables alone, by the commands
    assert main(["report", str(out)]) == 0
    assert main(["plot", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert RUN_FIGURES | {"report.html"} <= names and not any(n.startswith(".") for n in names)
    check_report(out / "report.html", min_images=len(RUN_FIGURES))


def test_the_report_is_the_same_from_memory_and_from_the_folder(tmp_path):
    result = fake_result()
    out = write_run(tmp_path / "run", result.files(report=False))
    from_folder = report.folder_outputs(out)
    from_memory = report.run_outputs(
        (out / "scenario.toml").read_text(),
        result.rounds,
        result.trades,
        result.summary,
        result.scenario.name,
    )
    assert from_folder.keys() == from_memory.keys()
    for name in from_folder.keys() - {"report.html"}:
        assert np.array_equal(decode_png(from_folder[name]), decode_png(from_memory[name])), name


def test_welfare_per_round_ends_at_the_summary_welfare():
    result = fake_result()
    w = plots.welfare_by_round(result.rounds)
    last = w.xs(result.rounds["round"].max(), level="round")
    assert np.isclose(last["market"].mean(), result.summary["welfare"])
    assert np.isclose(last["siloed"].mean(), result.summary["siloed_welfare"])


def test_figures_cope_with_no_trades_one_seed_and_many_agents():
    few = fake_tables(trade_rate=0.0, seeds=(3,))
    figures = plots.run_figures(*few)
    assert figures.keys() >= RUN_FIGURES
    many = fake_tables(n=40, rounds=3)
    figures = plots.run_figures(*many)
    assert "accuracy_per_agent.png" not in figures  # 40 agents: no per-agent lines
    for png, caption in figures.values():
        decode_png(png)
        assert caption


# imports the results floor under another backend and draws a figure; prints what else got
# loaded (pyplot, JAX, any paramarket_jax module outside results/) and the backend
DRAW_UNDER_SVG = """
import sys
import matplotlib
import pandas as pd
from paramarket_jax.results import plots, report
from paramarket_jax.results.tables import TRADE_COLUMNS
png = plots.trade_matrix(pd.DataFrame(columns=TRADE_COLUMNS), 2)
assert png[1:4] == b"PNG" and report.RUN_FILES
floor = ("paramarket_jax", "paramarket_jax.errors", "paramarket_jax.results")
others = [m for m in sys.modules if m.split(".")[0] == "paramarket_jax" and not m.startswith(floor)]
print(others, "matplotlib.pyplot" in sys.modules, "jax" in sys.modules, matplotlib.get_backend())
"""


def test_the_results_floor_leaves_the_backend_alone_and_imports_no_engine():
    """Importing plots and report and drawing selects no backend for the process (no
    ``matplotlib.use``, no pyplot), and loads neither JAX nor a floor above results."""
    done = subprocess.run(
        [sys.executable, "-c", DRAW_UNDER_SVG],
        env={**os.environ, "MPLBACKEND": "svg"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False", "False", "svg"]


def make_sweep(root, grid, seeds=(0, 1), hostile=False):
    """A sweep folder of fake cells, as `paramarket sweep` lays it out (``hostile``: agent
    1's sales are marked as a hostile seller's)."""
    base = sc.load("duopoly_bargaining")
    planned = []
    for i, values in enumerate(
        np.array(np.meshgrid(*[v for _, v in grid])).T.reshape(-1, len(grid))
    ):
        assignment = {
            k: (v.item() if hasattr(v, "item") else v)
            for (k, _), v in zip(grid, values, strict=True)
        }
        rounds, trades = fake_tables(seed=i, n=2, seeds=seeds)
        trades["hostile"] = hostile & (trades["seller"] == 1)
        result = RunResult(base, rounds, trades, summarize(rounds, trades))
        write_run(root / cell_name(assignment), result.files(report=False))
        planned.append((assignment, base))
    sweep_table(root, planned).to_parquet(root / "sweep.parquet", index=False)
    meta = dict(
        scenario="duopoly_bargaining",
        grid=[[k, v] for k, v in grid],
        overrides=["train.rounds=6"],
        command="paramarket sweep duopoly_bargaining ...",
    )
    (root / "sweep.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "grid",
    [
        [("mechanism.beta", [0.0, 0.5, 1.0])],
        [("economics.gamma", [0.5, 2.0]), ("mechanism.name", ["take_it", "posted_price"])],
        [
            ("economics.gamma", [1.0, 2.0]),
            ("broker.align", ["reference", "none"]),
            ("mechanism.beta", [0.0, 1.0]),
        ],
    ],
    ids=["one-knob", "numeric-x-named", "three-knobs"],
)
def test_a_sweep_report_has_a_panel_per_knob_and_reads_offline(tmp_path, grid):
    make_sweep(tmp_path, grid)
    assert main(["report", str(tmp_path)]) == 0
    text = check_report(tmp_path / "report.html", min_images=3)
    for key, values in grid:
        assert key in text and all(str(v) in text for v in values)
    assert "paramarket sweep duopoly_bargaining" in text and "train.rounds=6" in text
    assert report.HOSTILE_HEADING not in text  # no hostile agent in any cell
    assert main(["plot", str(tmp_path)]) == 0
    for name in ("sweep_gains.png", "sweep_welfare.png", "value_scatter.png"):
        decode_png((tmp_path / name).read_bytes())


def test_a_report_mid_sweep_shows_the_finished_cells(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": [["mechanism.beta", [0, 1]]]}))
    assert main(["report", str(tmp_path)]) == 2  # started, nothing finished yet
    assert "no finished cell yet" in capsys.readouterr().err
    make_sweep(tmp_path, [("mechanism.beta", [0.0, 0.5, 1.0])])
    table = pd.read_parquet(tmp_path / "sweep.parquet")
    table[table["mechanism.beta"] < 1].to_parquet(tmp_path / "sweep.parquet")  # one to go
    assert main(["report", str(tmp_path)]) == 0
    assert "2 of 3 cells complete" in check_report(tmp_path / "report.html", min_images=3)


def test_sweep_panels_are_wider_with_more_knobs():
    one, two = (
        [("mechanism.beta", [0.0, 1.0])],
        [("mechanism.beta", [0.0, 1.0]), ("economics.gamma", [1.0, 2.0])],
    )
    widths = []
    for grid in (one, two):
        rows = [
            {
                "cell": "c",
                **{k: v[s % 2] for k, v in grid},
                "seed": s,
                "welfare": s,
                "siloed_welfare": 0.0,
                "market_accuracy": 0.5,
                "siloed_accuracy": 0.4,
                "mutual_gain": bool(s % 2),
                "trades": 1,
            }
            for s in range(4)
        ]
        widths.append(
            decode_png(plots.sweep_panels(pd.DataFrame(rows), [k for k, _ in grid])).shape[1]
        )
    assert widths[1] > widths[0]


# a tiny market in which agent 2 offers poisoned weights and prices are not 0 (Nash
# bargaining): it sells in both seeds, so does an honest seller
HOSTILE_RUN = [
    *SHRINK,
    "agents.n=3",
    "train.rounds=3",
    "trading.start=1",
    "seeds=[0, 1]",
    "baselines.centralized=false",
    "mechanism.name=nash_bargaining",
    "agents.hostile=[2]",
    "agents.hostile_kind=poisoned",
]


def table_after(page: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``<h2>heading...`` on a report page, by row."""
    start = page.index(f"<h2>{heading}")
    table = page[start : page.index("</table>", start)]
    return [
        [html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", table)
    ]


def test_a_run_with_a_hostile_seller_reports_what_buyers_paid_it_and_got(tmp_path):
    result = run_scenario(sc.load("paper_two_agent", HOSTILE_RUN))
    out = write_run(tmp_path / "run", result.files())
    trades = pd.read_parquet(out / "trades.parquet")
    hostile = trades["hostile"].to_numpy()
    np.testing.assert_array_equal(hostile, trades["seller"] == 2)
    assert hostile.any() and not hostile.all() and (trades["price"] > 0).all()
    text = check_report(out / "report.html", min_images=len(RUN_FIGURES) + 2)
    decode_png((out / "hostile.png").read_bytes())
    # every number of the section is what trades.parquet says, over both seeds and per seed
    fmt = lambda v: format(float(v), report.HOSTILE_FMT)  # noqa: E731
    rows = table_after((out / "report.html").read_text(), report.HOSTILE_HEADING)
    assert rows[0] == ["sellers", "over", "purchases", "paid", "realised value",
                       "realised - paid", "made buyer worse on test"]  # fmt: skip
    expected = []
    for over, seeds in (("all 2 seeds", 1), ("mean per seed", 2)):
        for sellers, t in (("hostile", trades[hostile]), ("honest", trades[~hostile])):
            paid, value = t["price"].sum(), t["realized_value"].sum()
            worse = (t["realized_gain"] < 0).sum()
            numbers = (len(t), paid, value, value - paid, worse)
            expected.append([sellers, over, *(fmt(v / seeds) for v in numbers)])
    assert rows[1:] == expected
    bought = trades[hostile]
    assert (
        f"bought from hostile sellers {len(bought)} (paid {fmt(bought['price'].sum())}, "
        f"realised {format(bought['realized_value'].sum(), '+' + report.HOSTILE_FMT)})"
    ) in " ".join(text.split())


def test_a_run_without_hostile_agents_has_no_hostile_section(tmp_path):
    result = fake_result()  # paper_two_agent: agents.hostile = [], and no trade marked
    assert not result.trades["hostile"].astype(bool).any()
    out = write_run(tmp_path / "run", result.files())
    page = (out / "report.html").read_text()
    assert report.HOSTILE_HEADING not in page and "hostile sellers" not in page
    assert not (out / "hostile.png").exists()
    assert "hostile.png" not in plots.run_figures(result.rounds, result.trades)


def test_hostile_sellers_are_found_by_the_column_or_by_the_scenario():
    """A trade's ``hostile`` column marks it; a table without that column (written before
    it existed) falls back on the scenario's hostile agents."""
    _, trades = fake_tables()
    assert report.hostile_table(trades, 2) is None
    by_column = report.hostile_table(trades.assign(hostile=trades["seller"] == 1), 2)
    by_scenario = report.hostile_table(trades.drop(columns="hostile"), 2, hostile=(1,))
    pd.testing.assert_frame_equal(by_column, by_scenario)
    assert by_column.loc[0, "purchases"] == (trades["seller"] == 1).sum()
    # hostile agents that sold nothing: the section is there, with no purchase
    none_sold = report.hostile_table(trades, 2, hostile=(7,))
    assert none_sold.loc[0, "purchases"] == 0 and none_sold.loc[1, "purchases"] == len(trades)
    assert report.hostile_agents("[agents]\nhostile = [2, 0]\n") == (0, 2)
    assert report.hostile_agents("not toml [") == ()


def test_a_sweep_report_counts_purchases_from_hostile_sellers_per_cell(tmp_path):
    make_sweep(tmp_path, [("mechanism.beta", [0.0, 1.0])], hostile=True)
    assert main(["report", str(tmp_path)]) == 0
    rows = table_after((tmp_path / "report.html").read_text(), report.HOSTILE_HEADING)
    header, body = rows[0], rows[1:]
    cells = list(dict.fromkeys(pd.read_parquet(tmp_path / "sweep.parquet")["cell"]))
    assert len(body) == len(cells) == 2
    fmt = lambda v: format(float(v), report.HOSTILE_FMT)  # noqa: E731
    for row, cell in zip(body, cells, strict=True):
        trades = pd.read_parquet(tmp_path / cell / "trades.parquet")
        for sellers, t in (
            ("hostile", trades[trades["hostile"]]),
            ("honest", trades[~trades["hostile"]]),
        ):
            assert row[header.index(f"{sellers}: purchases")] == fmt(len(t) / 2)
            assert row[header.index(f"{sellers}: paid")] == fmt(t["price"].sum() / 2)
            value = t["realized_value"].sum() / 2
            assert row[header.index(f"{sellers}: realised value")] == fmt(value)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: p, "neither a run folder"),
        (lambda p: (p / "rounds.parquet").write_text("not parquet") and p, "cannot be read"),
    ],
    ids=["missing", "a-file", "empty", "corrupt-table"],
)
@pytest.mark.parametrize("command", ["report", "plot"])
def test_bad_folders_exit_2_in_one_line_and_write_nothing(tmp_path, capsys, make, needle, command):
    folder = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([command, str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(browser() is None, reason="no Chromium on this machine (apt install chromium)")
def test_the_report_renders_in_a_headless_browser(tmp_path):
    out = write_run(tmp_path / "run", fake_result().files())
    pixels = screenshot(out / "report.html", tmp_path / "shot.png")
    rgb = (pixels[..., :3] * 255).round().astype(int)
    market_blue = np.all(np.abs(rgb - [0x1F, 0x6F, 0xB4]) <= 6, axis=-1)
    assert market_blue.sum() > 500, "the embedded figures did not render"


# ---- where the welfare came from --------------------------------------------------------------

# a tiny market of four rivals for one market of customers: its tables have the welfare
# decomposition, its trades their social value
RIVAL_RUN = RIVAL_SMALL
# what a summary written before the decomposition lacks
NEW_SUMMARY_KEYS = ("better_off_fraction", "decomposition")
NEW_SEED_KEYS = ("better_off", "decomposition")
NEW_AGENT_KEYS = ("better_off", "paid", "received", *WELFARE_COLUMNS)


@functools.cache
def rival_result() -> RunResult:
    return run_scenario(sc.load("rival_market", RIVAL_RUN))


def old_result(result: RunResult) -> RunResult:
    """``result`` as a run folder written before the welfare decomposition holds it: no
    decomposition columns, no social value of trades, none of the summary's new keys."""
    rounds = result.rounds.drop(columns=WELFARE_COLUMNS + ["compensation", "siloed_cost"])
    trades = result.trades.drop(columns=["compensation", "social_value", "external_value"])
    summary = json.loads(json.dumps(result.summary))
    for key in NEW_SUMMARY_KEYS:
        summary.pop(key)
    for values in summary["per_seed"].values():
        for key in NEW_SEED_KEYS:
            values.pop(key)
    for agent in summary["agents"]:
        for key in NEW_AGENT_KEYS:
            agent.pop(key)
    return RunResult(result.scenario, rounds, trades, summary)


def money(v) -> str:
    """A sum of money as the welfare section shows it (float32 rounding as 0)."""
    return format(0.0 if abs(v) < 1e-6 else float(v), ".4g")


def test_the_report_says_where_the_welfare_came_from(tmp_path):
    result = rival_result()
    summary = result.summary
    assert "decomposition" in summary and set(WELFARE_COLUMNS) <= set(result.rounds)
    out = write_run(tmp_path / "run", result.files())
    page = (out / "report.html").read_text()
    text = " ".join(check_report(out / "report.html", min_images=len(RUN_FIGURES)).split())
    assert report.WELFARE_HEADING in text
    for words in ("Market expansion", "Business stealing", "Transfers", "Cost saving"):
        assert words in text
    assert 'alt="who_gained.png"' in page and "agent-seeds above their twins" in text
    decode_png((out / "who_gained.png").read_bytes())
    # the kpi: agent-seeds above their twins, of all
    total = len(summary["agents"]) * len(summary["seeds"])
    above = round(summary["better_off_fraction"] * total)
    assert f"agents above their twin {above}/{total}" in text
    # every number of the per-seed table is the summary's
    rows = table_after(page, report.WELFARE_HEADING)
    assert rows[0] == ["seed", "welfare gain", "market expansion", "business stealing moved",
                       "cost saving", "broker take", "agents above twin"]  # fmt: skip
    n = len(summary["agents"])
    expected = []
    for seed in summary["seeds"]:
        v = summary["per_seed"][seed]
        d = v["decomposition"]
        parts = (d["welfare_gain"], d["market_expansion"], d["stolen"], d["cost_saving"])
        expected.append(
            [str(seed), *map(money, (*parts, v["broker_take"])), f"{v['better_off']}/{n}"]
        )
    d = summary["decomposition"]
    parts = (d["welfare_gain"], d["market_expansion"], d["stolen"], d["cost_saving"])
    mean_above = f"{summary['better_off_fraction'] * n:.3g}/{n}"
    expected.append(["mean", *map(money, (*parts, summary["broker_take"])), mean_above])
    assert rows[1:] == expected
    # the welfare gain of each seed is the summary's welfare against the siloed one
    for seed, row in zip(summary["seeds"], rows[1:], strict=False):
        v = summary["per_seed"][seed]
        assert np.isclose(float(row[1]), v["welfare"] - v["siloed_welfare"], rtol=1e-3, atol=1e-6)


# the agents table's money columns -> the summary's keys
AGENT_MONEY = {
    "paid": "paid",
    "received": "received",
    "expansion": "market_expansion",
    "stealing": "business_stealing",
    "transfers": "transfers",
}


def test_the_agents_table_has_each_agents_gain_and_its_parts(tmp_path):
    result = rival_result()
    out = write_run(tmp_path / "run", result.files())
    rows = table_after((out / "report.html").read_text(), "Agents")
    header, body = rows[0], rows[1:]
    assert {"utility gain", *AGENT_MONEY} <= set(header)
    for row, agent in zip(body, result.summary["agents"], strict=True):
        cell = lambda c: float(row[header.index(c)])  # noqa: E731,B023
        assert np.isclose(cell("utility gain"), agent["utility"] - agent["siloed_utility"],
                          atol=1e-3)  # fmt: skip
        for column, key in AGENT_MONEY.items():
            assert np.isclose(cell(column), agent[key], atol=1e-3), column


def test_an_old_run_folder_renders_without_the_welfare_section(tmp_path):
    old = old_result(rival_result())
    out = write_run(tmp_path / "run", old.files(report=False))
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    text = " ".join(check_report(out / "report.html", min_images=len(RUN_FIGURES)).split())
    assert report.WELFARE_HEADING not in text and "agents above their twin" not in text
    assert 'alt="who_gained.png"' in page  # drawn, without the parts
    header = table_after(page, "Agents")[0]
    assert "utility gain" in header
    assert not set(AGENT_MONEY) & set(header)
    assert "social (all agents" not in text
    # tables without the columns, summarized now: no decomposition, the kpi is there
    fresh = summarize(old.rounds, old.trades)
    assert "decomposition" not in fresh
    html_page = report.run_outputs(
        (out / "scenario.toml").read_text(), old.rounds, old.trades, fresh, "old"
    )["report.html"]
    assert report.WELFARE_HEADING not in html_page and "agents above their twin" in html_page


def test_who_gained_sorts_the_agents_and_counts_those_above_their_twins():
    result = rival_result()
    with_parts = decode_png(plots.who_gained(result.rounds))
    without = decode_png(plots.who_gained(result.rounds.drop(columns=WELFARE_COLUMNS)))
    assert with_parts.shape[1] >= without.shape[1]  # the parts' legend
    assert plots.gain_parts(result.rounds.drop(columns=WELFARE_COLUMNS)) is None
    parts = plots.gain_parts(result.rounds)
    for agent in result.summary["agents"]:
        for col in ("market_expansion", "business_stealing", "transfers"):
            assert np.isclose(parts.loc[agent["agent"], col], agent[col])
    figures = plots.run_figures(result.rounds, result.trades)
    assert "business stealing" in figures["who_gained.png"][1]
    assert "social value" in figures["value_scatter.png"][1]
    old = old_result(result)
    figures = plots.run_figures(old.rounds, old.trades)
    assert "business stealing" not in figures["who_gained.png"][1]
    assert "social value" not in figures["value_scatter.png"][1]


def test_the_value_scatter_shows_social_value_beside_private_value():
    _, trades = fake_tables()
    plain = trades.drop(columns=["social_value", "external_value"])
    social = trades.assign(social_value=trades["realized_value"] - 0.3)
    a, b = decode_png(plots.value_scatter(plain)), decode_png(plots.value_scatter(social))
    assert a.shape != b.shape or not np.array_equal(a, b)
    # unknown social values (NaN) are as no column
    unknown = trades.assign(social_value=np.nan)
    assert np.array_equal(decode_png(plots.value_scatter(unknown)), a)
    decode_png(plots.value_scatter(social.iloc[:0]))  # no trades
