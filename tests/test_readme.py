"""The README stays true: its Python example runs and every scenario key is documented."""

import pathlib
import re

import jax
import numpy as np

from paramarket_jax import scenario as sc

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quickstart_is_exactly_two_commands():
    quick = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in quick.strip().splitlines() if line.strip()]
    assert lines == ['python3 -m pip install . && paramarket run',
                     'python3 -m pip install ".[test]" && python3 -m pytest']  # fmt: skip


def test_python_example_runs_and_its_claims_hold():
    code = README.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102
    a, merged = env["a"], env["merged"]
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(merged), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert env["val"].gain.shape == (8 * 7,)
    assert float(env["acc"].mean()) > 0.5  # 100 steps of Adam learn the digits


def test_every_scenario_key_is_documented():
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)`", README))
    for key in sc.RULES:
        assert key in documented, f"README does not document scenario key {key!r}"
