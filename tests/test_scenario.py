"""Scenario files: validation names the bad key and the allowed values; overrides; round trip."""

import ast
import subprocess
import sys
import tomllib

import pytest

from paramarket_jax import ParamarketError
from paramarket_jax import scenario as sc

BUNDLED = [
    "duopoly_bargaining",
    "foundation_market",
    "license_auction",
    "many_agents_assignment",
    "open_market",
    "paper_mnist1d",
    "paper_no_alignment",
    "paper_two_agent",
    "rival_market",
    "transformer_arithmetic",
    "vit_digits",
]


def test_bundled_scenarios_load_and_round_trip():
    assert sorted(sc.bundled()) == BUNDLED
    for name in BUNDLED:
        s = sc.load(name)
        assert s.name == name and s.description
        again = sc.from_dict(tomllib.loads(sc.dumps(s)))
        assert again == s


def test_paper_two_agent_is_the_paper_setup():
    s = sc.load("paper_two_agent")
    assert s.agents.n == 2 and s.data.dataset == "digits"
    assert s.data.split.name == "class_split" and s.data.split.options == {"d": 0.1}
    assert s.train.optimizer == "sgd" and s.train.learning_rate == 0.01
    assert s.broker.align and s.mechanism.name == "take_it"
    assert s.broker.alphas == pytest.approx([0.05 + 0.1 * i for i in range(10)])
    assert not sc.load("paper_no_alignment").broker.align
    assert sc.load("paper_mnist1d").data.dataset == "mnist1d"


def test_overrides_mirror_toml_tables():
    s = sc.load(
        "paper_two_agent",
        [
            "data.dataset=mnist1d",
            "data.split.d=0.2",
            "agents.n=3",
            "broker.align=false",
            "seeds=[1, 2]",
            "model.widths=[8, 8]",
        ],
    )
    assert s.data.dataset == "mnist1d" and s.data.split.options["d"] == 0.2
    assert s.agents.n == 3 and not s.broker.align and s.seeds == (1, 2)
    assert s.model.options["widths"] == [8, 8]


def test_changing_the_partitioner_drops_the_default_options():
    s = sc.load("paper_two_agent", ["data.split.name=dirichlet", "data.split.alpha=0.3"])
    assert s.data.split.options == {"alpha": 0.3}


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "agents.count=3",
            "unknown scenario key 'agents.count'; allowed in [agents]: entry, entry_max",
        ),
        ("agents.n=1", "'agents.n' must be an integer >= 2, got 1"),
        ("agents.n=2.5", "'agents.n' must be an integer >= 2"),
        ("agents.n=true", "'agents.n' must be an integer >= 2"),
        ("train.learning_rate=-1", "'train.learning_rate' must be a number > 0"),
        ("train.learning_rate=nan", "'train.learning_rate' must be a number > 0"),
        ("train.optimizer=lbfgs", "one of adam, adamw, momentum, rmsprop, sgd"),
        ("data.dataset=imagenet", "'data.dataset' must be one of arithmetic, cifar10, digits"),
        ("data.split.name=random", "one of class_split, dirichlet, groups, iid, shards"),
        ("data.split.alpha=0.5", "unknown scenario key 'data.split.alpha' for name 'class_split'"),
        ("data.split.eval_mix=uniform", "one of shard, global"),
        ("model.name=resnet", "one of cnn, gpt, mlp, vit, wrn"),
        ("model.depth=3", "unknown scenario key 'model.depth' for name 'mlp'"),
        ("broker.alphas=[0.5, 1.5]", "numbers in [0, 1]"),
        ("broker.alphas=[]", "non-empty list"),
        (
            "broker.align=yes",
            "'broker.align' must be true, false, or one of none, pairwise, reference",
        ),
        ("broker.restarts=0", "'broker.restarts' must be an integer >= 1"),
        ("seeds=[0, 0]", "'seeds' must be a non-empty list of distinct integers >= 0"),
        ("seeds=[-1]", "'seeds' must be a non-empty list of distinct integers >= 0"),
        ("broker.choose=best", "'broker.choose' must be one of objective, validation"),
        ("broker.pick=closest", "'broker.pick' must be one of random, top"),
        ("agents.initial=5", "'agents.initial' must be in [0, agents.n = 2]"),
        ("agents.entry=1", "'agents.entry' must be true or false"),
        ("broker.candidates=-1", "integer >= 0"),
        ("trading.every=0", "'trading.every' must be an integer >= 1"),
        ("mechanism.name=dutch", "one of "),
        ("baselines.oracle=true", "unknown scenario key 'baselines.oracle'"),
        ("seeds=[]", "non-empty list of distinct integers"),
        ("colour=red", "unknown scenario key 'colour'"),
        ("agents=3", "'agents' must be a table"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, needle):
    with pytest.raises(ParamarketError) as err:
        sc.load("paper_two_agent", [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ParamarketError, match="bundled scenarios are duopoly_bargaining"):
        sc.load("no_such_scenario")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agents\nn = 2")
    with pytest.raises(ParamarketError, match="invalid TOML"):
        sc.load(str(bad))
    with pytest.raises(ParamarketError, match="key=value"):
        sc.load("paper_two_agent", ["agents.n"])
    with pytest.raises(ParamarketError, match="is not a table"):
        sc.load("paper_two_agent", ["name.x=1"])


def test_a_minimal_file_gets_the_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[agents]\nn = 4\n')
    s = sc.load(str(path))
    assert s.name == "mine" and s.agents.n == 4 and s.train == sc.TrainConfig()


HEAVY = ("flax", "jax", "matplotlib", "optax", "orbax", "pandas", "scipy")


def heavy_modules(code: str) -> list[str]:
    """The heavy packages (of :data:`HEAVY`) that a fresh interpreter running ``code`` has
    imported, counted in ``sys.modules`` at its end."""
    count = "import sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & set(%r)))"
    probe = code + "\n" + count % (HEAVY,)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_the_scenario_layer_imports_no_jax():
    """Reading, checking and overriding a scenario, and a bad key's error, import no kernel:
    the registries and JAX come in only when a valid scenario's registered names are
    checked."""
    code = """
from paramarket_jax import ParamarketError
from paramarket_jax import scenario as sc
assert sc.read_table("paper_two_agent")["name"] == "paper_two_agent"
sc.check("paper_two_agent", ["agents.n=3"], swept=["mechanism.beta"])
for bad in ("no.such=1", "agents.nn=1", "agents.n=0"):
    try:
        sc.load("paper_two_agent", [bad])
    except ParamarketError as err:
        assert "scenario key" in str(err), err
    else:
        raise AssertionError(bad)
"""
    assert heavy_modules(code) == []
    assert heavy_modules("from paramarket_jax import scenario as sc\nsc.load('paper_two_agent')")


@pytest.mark.parametrize(
    "overrides, swept, needle",
    [
        (["no.such=1"], [], "unknown scenario key 'no'"),
        (["agents.n=0"], [], "'agents.n' must be an integer >= 2"),
        ([], ["agents.nn"], "unknown scenario key 'agents.nn'"),
    ],
)
def test_check_is_the_light_part_of_load(overrides, swept, needle):
    """``check`` says what ``load`` says first; a swept key is checked by name only (its
    values are the grid's), and a registry name is left to ``load``."""
    with pytest.raises(ParamarketError, match=needle):
        sc.check("paper_two_agent", overrides, swept)
    sc.check("paper_two_agent", ["agents.n=0"], swept=["agents.n"])
    sc.check("paper_two_agent", ["data.dataset=imagenet", "data.no_such_option=1"])
