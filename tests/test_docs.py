"""The README and docs/ stay true: every shell and Python block in them runs here (or in the
test the page names) at small settings, or says why not; the Python API example keeps its
claims; every scenario key is documented; the README's links lead to files."""

import importlib.util
import pathlib
import re
import shlex
import tomllib
from typing import NamedTuple

import jax
import numpy as np
import pytest
from shrink import SMALL

from paramarket_jax import scenario as sc
from paramarket_jax.cli.main import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = ("bash", "sh")
KNOWN = {"", *SHELL, "python", "toml"}  # output samples and diagrams: a plain fence
NOT_RUN = re.compile(r"<!-- not run: (.*) -->")
# pages whose Python blocks a test runs as written, in one namespace, in page order
PYTHON_RUN_BY = {
    "docs/python-api.md": "tests/test_docs.py",
    "docs/mesa_behaviour.md": "tests/engines/test_behaviour.py",
}
FENCE = re.compile(r"\s*```(\S*)\s*")


class Block(NamedTuple):
    page: str  # relative to the checkout
    line: int  # of the opening fence, from 1
    lang: str
    code: str
    reason: str | None  # what the `<!-- not run: ... -->` before it says; None: no marker


def blocks(path: pathlib.Path) -> list[Block]:
    """The fenced blocks of a Markdown page, each with the marker on the line before it."""
    lines, found, i = path.read_text(encoding="utf-8").splitlines(), [], 0
    while i < len(lines):
        opening = FENCE.fullmatch(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        marker = NOT_RUN.fullmatch(before)
        code = "\n".join(x[len(lines[i]) - len(lines[i].lstrip()) :] for x in lines[i + 1 : end])
        page = path.relative_to(ROOT).as_posix()
        found.append(Block(page, i + 1, opening[1], code, marker[1] if marker else None))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments and blank lines out."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = (line.split(" #", 1)[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def runnable(block: Block) -> bool:
    """A shell block that is only ``paramarket`` commands: this file runs it."""
    cmds = commands(block.code)
    return block.lang in SHELL and bool(cmds) and all(c.startswith("paramarket ") for c in cmds)


RUNNABLE = [b for b in ALL if b.reason is None and runnable(b)]


def test_every_block_runs_or_says_why_not():
    assert ALL and RUNNABLE
    for b in ALL:
        where = f"{b.page}:{b.line}"
        assert b.lang in KNOWN, f"{where}: a ```{b.lang} block (plain ``` for output samples)"
        if b.reason is not None:
            assert len(b.reason.split()) >= 3, f"{where}: 'not run' needs a reason: {b.reason!r}"
        elif b.lang in SHELL:
            assert runnable(b), (
                f"{where}: a shell block this test cannot run: only `paramarket` commands run "
                "here; mark it <!-- not run: REASON -->"
            )
        elif b.lang == "python":
            runner = PYTHON_RUN_BY.get(b.page)
            assert runner, f"{where}: no test runs this Python block; mark it not run, or run it"
            assert pathlib.Path(b.page).name in (ROOT / runner).read_text(), runner


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.page}:{b.line}" for b in RUNNABLE])
def test_shell_block_runs(block, tmp_path, monkeypatch, capsys):
    """Each command as typed, in a fresh folder; runs and sweeps shrunk to two rounds of a
    small model (the shapes tests/cli/test_cli.py compiles, so the cache has them)."""
    monkeypatch.chdir(tmp_path)
    for command in commands(block.code):
        argv = shlex.split(command)[1:]
        if argv[0] in ("run", "sweep"):
            argv += SMALL
        assert main(argv) == 0, f"{command}: {capsys.readouterr().err}"


def python_of(page: str) -> str:
    return "\n".join(b.code for b in ALL if b.page == page and b.lang == "python")


def test_python_api_example_runs_and_its_claims_hold():
    env: dict = {}
    exec(compile(python_of("docs/python-api.md"), "docs/python-api.md", "exec"), env)  # noqa: S102
    a, merged = env["a"], env["merged"]
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(merged), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert env["val"].gain.shape == (8 * 7,)
    assert float(env["acc"].mean()) > 0.5  # 100 steps of Adam learn the digits


def test_toml_blocks_are_valid_scenarios():
    tomls = [b for b in ALL if b.lang == "toml"]
    assert tomls
    for b in tomls:
        scenario = sc.from_dict(tomllib.loads(b.code))
        assert scenario.name != "custom", f"{b.page}:{b.line}"


def test_quickstart_is_exactly_two_commands():
    quick = README.read_text().split("## Quickstart", 1)[1].split("```bash", 1)[1]
    lines = [line for line in quick.split("```", 1)[0].strip().splitlines() if line.strip()]
    assert lines == ['python3 -m pip install . && paramarket run',
                     'python3 -m pip install ".[test]" && python3 -m pytest']  # fmt: skip


@pytest.fixture(scope="module")
def scenario_keys():
    """docs/hooks/scenario_keys.py, the mkdocs hook that writes the scenario-key tables."""
    path = ROOT / "docs" / "hooks" / "scenario_keys.py"
    spec = importlib.util.spec_from_file_location("scenario_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_scenario_key_is_documented(scenario_keys):
    """The page the site builds has a row for every key of RULES with its default, allowed
    values and a meaning; the page keeps the marker the tables go to."""
    text = scenario_keys.markdown()
    for key in sc.RULES:
        row = re.search(rf"^\| `{re.escape(key)}` \|(.*)\|(.*)\|(.*)\|$", text, re.M)
        assert row, f"no row for scenario key {key!r}"
        assert row[2].strip() and row[3].strip(), f"{key!r}: no allowed values or meaning"
    for name in sc.OPEN_TABLES["model"][1]():
        assert f'`name = "{name}"`' in text  # every registered model's options
    page = (ROOT / "docs" / scenario_keys.PAGE).read_text()
    assert page.count(scenario_keys.MARKER) == 1


def test_a_key_without_a_meaning_fails_the_build(scenario_keys, monkeypatch):
    known = scenario_keys.meanings()
    monkeypatch.setitem(sc.RULES, "broker.new_knob", sc.BOOL)
    with pytest.raises(ValueError, match="without a meaning: \\['broker.new_knob'\\]"):
        scenario_keys.check_meanings(known)
    monkeypatch.delitem(sc.RULES, "broker.new_knob")
    del known["broker.fit_lr"]
    with pytest.raises(ValueError, match="broker.fit_lr"):
        scenario_keys.check_meanings(known)


def test_readme_is_short_and_its_links_lead_to_files():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#", 1)[0] for t in targets if "://" not in t]
    assert any(t.startswith("docs/") for t in local)
    for target in local:
        assert (ROOT / target).exists(), f"README links to {target}, which is not there"
