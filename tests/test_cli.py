"""The `paramarket` command: the main job runs, bad input exits 2 with one clear line."""

import pytest

from paramarket_jax.cli import main, parse_value


def test_run_prints_per_agent_test_accuracy(capsys):
    code = main(["run", "--agents", "3", "--rounds", "2", "--local-steps", "5", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert len(rows) == 3
    for row in rows:
        assert 0.0 <= float(row[-1]) <= 1.0  # test accuracy
        assert int(row[1]) >= 1  # shard size


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; allowed:"),
        (["--split", "random"], "allowed: class_split, dirichlet, iid, shards"),
        (["--split-opt", "alpha=0"], "'alpha'"),
        (["--split", "class_split", "--split-opt", "d=2"], "'d'"),
        (["--model", "transformer"], "allowed: cnn, mlp, wrn"),
        (["--optimizer", "lion2"], "allowed: adam"),
        (["--agents", "0"], "agents must be >= 1"),
        (["--dataset", "mnist", "--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["--dataset", "cifar10"], "'path'"),
        (["--model-opt", "widths"], "key=value"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    code = main(["run", "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("32,16") == [32, 16] and parse_value("adam") == "adam"
