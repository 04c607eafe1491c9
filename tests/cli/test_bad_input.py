"""Bad input of every kind: one line ``paramarket: error: ...``, exit code 2, no traceback,
nothing written or left behind, and all of it before any training or compilation.

Every case calls the CLI in-process. A case that got past validation would start
computing: the ``no_compute`` fixture makes that fail at once instead of training.
"""

import gzip
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest
from oneline import call, check_one_line

INPUTS = "{in}"  # replaced by a folder of input files outside tmp_path
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_STEMS = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Bad input must fail before anything is compiled or run."""
    from paramarket_jax.engines import batch
    from paramarket_jax.engines import mesa as model

    def reached(*args, **kwargs):
        raise AssertionError("bad input reached the compute step")

    monkeypatch.setattr(batch, "simulate_runs", reached)
    monkeypatch.setattr(model.MarketModel, "run", reached)


def fill(argv, **where) -> list[str]:
    """argv with each ``{key}`` replaced by ``where[key]``."""
    out = []
    for arg in argv:
        for key, value in where.items():
            arg = arg.replace("{" + key + "}", str(value))
        out.append(arg)
    return out


# ---- scenario keys, registries and CLI syntax ----

SET_CASES = [
    # agents
    (["--set", "agents.n=3.5"], "'agents.n' must be an integer >= 2, got 3.5"),
    (["--set", "agents.n=99999999999999999999"], "at most 2147483647"),
    (["--set", "agents.initial=5"], "'agents.initial' must be in [0, agents.n = 2]"),
    (["--set", "agents.entry=yes"], "'agents.entry' must be true or false"),
    (["--set", "agents.n=11"], "'n_agents' (agents.n) must be in [1, 10]"),
    # data (dataset registry)
    (["--set", "data.seed=-1"], "'data.seed' must be an integer >= 0"),
    (["--set", "data.path=5"], "'data.path' must be a string"),
    (["--set", "data.path=/somewhere"], "dataset 'digits': unknown option 'path'"),
    (["--set", "data.val_fraction=abc"], "'val_fraction' must be a number in (0, 1)"),
    (["--set", "data.test_fraction=[0.2]"], "'test_fraction' must be a number in (0, 1)"),
    (["--set", "data.max_train=9223372036854775807"], "'data.max_train' must be an integer"),
    (
        ["--set", "data.dataset=gaussian", "--set", "data.dim=99999999999"],
        "x dim must be at most 268435456 values",
    ),
    (
        ["--set", "data.dataset=mnist1d", "--set", "data.num_samples=9223372036854775807"],
        "'num_samples' must be an integer in [10, 1000000]",
    ),
    (["--set", "data.dataset=mnist", "--set", "data.path=" + INPUTS + "/a_file"], "is a file"),
    (["--set", "data.dataset=mnist", "--set", "data.path=~no_such_user/x"], "cannot expand"),
    # data.split (partitioner registry)
    (["--set", "data.split.d=abc"], "'d' must be a number in (0, 1]"),
    (["--set", "data.split.eval_size=0"], "'data.split.eval_size' must be an integer >= 1"),
    (
        ["--set", "data.split.name=shards", "--set", "data.split.shards_per_agent=1.5"],
        "'shards_per_agent' must be an integer >= 1",
    ),
    (
        ["--set", "data.split.name=iid", "--set", "data.split.weights=[1]"],
        "'weights' must be a list of agents.n = 2 positive numbers",
    ),
    (["--set", "data.split.name=kmeans"], "one of class_split, dirichlet, groups, iid, shards"),
    # model (model registry): wrong types and shapes
    (["--set", "model.widths=32"], "'model.widths' must be a non-empty list of integers"),
    (["--set", "model.widths=abc"], "'model.widths' must be a non-empty list of integers"),
    (["--set", "model.widths=[true]"], "'model.widths' must be a non-empty list of integers"),
    (["--set", "model.widths=[1.5]"], "'model.widths' must be a non-empty list of integers"),
    (["--set", "model.preset=[1]"], "'model.preset' must be one of paper, paper_cifar"),
    (["--set", "model.name=wrn", "--set", 'model.depth="10"'], "'model.depth' must be"),
    (["--set", "model.name=wrn", "--set", "model.widen=0"], "'model.widen' must be an integer"),
    (["--set", "model.name=cnn", "--set", "model.channels=16"], "'model.channels' must be"),
    (["--set", "model.name=cnn", "--set", "model.kernel=abc"], "'model.kernel' must be"),
    (["--set", "model.widths=[65536, 65536, 65536]"], "parameters for inputs"),
    (["--set", "model.name=resnet"], "'model.name' must be one of cnn, gpt, mlp, vit, wrn"),
    # train (optimizer registry)
    (["--set", "train.optimizer=lbfgs"], "one of adam, adamw, momentum, rmsprop, sgd"),
    (["--set", "train.learning_rate=inf"], "'train.learning_rate' must be a number > 0"),
    (["--set", "train.batch_size=0"], "'train.batch_size' must be an integer >= 1"),
    (["--set", "train.rounds=9223372036854775807"], "at most 2147483647"),
    # trading
    (["--set", "trading.start=-1"], "'trading.start' must be an integer >= 0"),
    (["--set", "trading.every=9223372036854775807"], "at most 2147483647"),
    # broker
    (["--set", "broker.alphas=[nan]"], "'broker.alphas' must be a non-empty list of numbers"),
    (["--set", "broker.sellers=[5]"], "'broker.sellers' must list agents in [0, 1]"),
    (["--set", "broker.layers=3"], "'broker.layers' must be a list of strings"),
    (["--set", "broker.pick=best"], "'broker.pick' must be one of random, top"),
    # mechanism (mechanism registry)
    (
        ["--set", "mechanism.name=k_vickrey", "--set", "mechanism.k=abc"],
        "option k must be an integer >= 1 and at most 65536",
    ),
    (
        ["--set", "mechanism.name=vcg_assignment", "--set", "mechanism.capacity=[1]"],
        "option capacity must be an integer",
    ),
    (["--set", "mechanism.k=2"], "unknown scenario key 'mechanism.k' for name 'take_it'"),
    (["--set", "mechanism.reserve=1e300"], "float32"),
    (["--set", "mechanism.beta=nan"], "'mechanism.beta' must be a number in [0, 1]"),
    # economics
    (["--set", "economics.value_per_quality=[1, 2, 3]"], "must have 1 or agents.n = 2 entries"),
    (["--set", "economics.initial_cash=-1"], "'economics.initial_cash' must be a number >= 0"),
    (["--set", "economics.revenue=monopoly"], "one of competitive, independent"),
    # strategies
    (["--set", "strategies.kind=bluff"], "one of adaptive, markup, shade, truthful"),
    (["--set", "strategies.grid=[inf]"], "'strategies.grid' must be a non-empty list"),
    # baselines
    (["--set", "baselines.siloed=1"], "'baselines.siloed' must be true or false"),
    (["--set", "baselines.oracle=true"], "unknown scenario key 'baselines.oracle'"),
    # seeds
    (["--set", "seeds=[-1]"], "'seeds' must be a non-empty list of distinct integers >= 0"),
    (["--set", "seeds=[0.5]"], "'seeds' must be a non-empty list of distinct integers >= 0"),
    (["--set", "seeds=[99999999999999999999]"], "at most 9223372036854775807"),
    (["--seeds", "3-1"], "--seeds '3-1' names no seed"),
    # top level
    (["--set", 'name="../elsewhere"'], "'name' must be a string without /"),
    # override syntax
    (["--set", "=1"], "bad key"),
    (["--set", "agents.n.x=1"], "'n' is not a table"),
    (["--set", "model=1"], "'model' must be a table"),
    # CLI syntax
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--batch", "0"], "--batch: must be a positive integer"),
    (["paper_two_agent", "extra"], "unrecognized arguments: extra"),
]


@pytest.mark.parametrize("argv, needle", SET_CASES)
def test_bad_scenario_keys_and_cli(argv, needle, tmp_path, tmp_path_factory, capsys):
    inputs = tmp_path_factory.mktemp("inputs")
    (inputs / "a_file").write_text("not a folder")
    argv = fill(argv, **{"in": inputs})
    code = call(["run", "--out", str(tmp_path / "run"), "--quiet", *argv])
    check_one_line(code, capsys.readouterr(), needle, tmp_path)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["sweep", "paper_two_agent", "--grid", "mechanism.beta=0,1"], "required: --out"),
        (["scenarios", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_bad_commands(argv, needle, tmp_path, capsys):
    code = call(argv)
    check_one_line(code, capsys.readouterr(), needle, tmp_path)


@pytest.mark.parametrize(
    "name, n_agents, options, needle",
    [
        ("dirichlet", 2, {"min_size": 100}, "(min_size in [1, 10] for agents.n = 2), got 2 x 100"),
        ("dirichlet", 30, {}, "(agents.n in [1, 10] for min_size = 2), got 30 x 2"),
        ("shards", 3, {"shards_per_agent": 50}, "shards_per_agent in [1, 6] for agents.n = 3"),
        ("iid", 30, {}, "'n_agents' (agents.n) must be in [1, 20]"),
        ("class_split", 11, {}, "'n_agents' (agents.n) must be in [1, 10]"),
    ],
)
def test_too_many_agents_for_the_data_names_the_allowed_range(name, n_agents, options, needle):
    """Checked when splitting (it depends on the examples): the message gives the ranges that
    work, never an empty one such as "must be <= 0"."""
    from paramarket_jax.data import PARTITIONERS
    from paramarket_jax.errors import ParamarketError

    labels = np.arange(20) % 10
    with pytest.raises(ParamarketError) as err:
        PARTITIONERS[name](None, labels, n_agents, 10, **options)  # fails before any draw
    assert needle in str(err.value) and "<= 0" not in str(err.value), err.value


# ---- scenario files ----


def write_scenario(path, kind: str):
    if kind == "syntax":
        path.write_text("[agents\nn = 2\n")
    elif kind == "random_bytes":
        path.write_bytes(bytes(range(128, 256)) * 4)
    elif kind == "utf16":
        path.write_bytes('name = "x"\n'.encode("utf-16"))
    elif kind == "latin1":
        path.write_bytes('name = "café"\n'.encode("latin-1"))
    elif kind == "too_large":
        path.write_bytes(b"# padding\n" * (1 << 17))  # 1.25 MiB of comments
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "bad_value":
        path.write_text('name = "x"\n[agents]\nn = "two"\n')
    return path


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("syntax", "invalid TOML"),
        ("random_bytes", "invalid TOML: not UTF-8 text"),
        ("utf16", "it looks like UTF-16: save it as UTF-8"),
        ("latin1", "not UTF-8 text (byte 0xe9"),
        ("too_large", "more than a scenario's limit of 1048576"),
        ("folder", "a folder; expected a TOML file"),
        ("fifo", "not a regular file"),
        ("bad_value", "'agents.n' must be an integer >= 2, got 'two'"),
        ("missing", "no scenario"),
    ],
)
def test_bad_scenario_files(kind, needle, tmp_path, tmp_path_factory, capsys):
    path = write_scenario(tmp_path_factory.mktemp("inputs") / "mine.toml", kind)
    code = call(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    check_one_line(code, capsys.readouterr(), needle, tmp_path)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_device_files_are_refused_before_reading(device, tmp_path, capsys):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    code = call(["run", device, "--out", str(tmp_path / "run"), "--quiet"])
    check_one_line(code, capsys.readouterr(), "not a regular file", tmp_path)


# ---- dataset files: tiny IDX sets and CIFAR batches, corrupted ----


def idx(array: np.ndarray, code: int = 0x08) -> bytes:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_mnist(folder, corrupt: str):
    """A valid 40/20-image 8x8 MNIST-format set with one file corrupted as named."""
    rng = np.random.default_rng(0)
    arrays = {
        IDX_STEMS[0]: rng.integers(0, 256, (40, 8, 8)),
        IDX_STEMS[1]: np.arange(40) % 10,
        IDX_STEMS[2]: rng.integers(0, 256, (20, 8, 8)),
        IDX_STEMS[3]: np.arange(20) % 10,
    }
    files = {stem: idx(a) for stem, a in arrays.items()}
    images, labels = IDX_STEMS[0], IDX_STEMS[1]
    if corrupt == "magic":
        files[images] = b"\x01\x02" + files[images][2:]
    elif corrupt == "truncated":
        files[images] = files[images][:-30]
    elif corrupt == "truncated_gz":
        files[images + ".gz"] = gzip.compress(files.pop(images))[:-30]
    elif corrupt == "huge_header":
        files[images] = bytes([0, 0, 8, 3]) + struct.pack(">3I", 1 << 30, 1 << 30, 1 << 30)
    elif corrupt == "huge_gz":  # a small gzip whose header claims 4 GB of values
        head = bytes([0, 0, 8, 3]) + struct.pack(">3I", 1000, 1000, 4000)
        files[images + ".gz"] = gzip.compress(head + bytes(100))
        del files[images]
    elif corrupt == "dtype_code":
        files[images] = files[images][:2] + b"\x07" + files[images][3:]
    elif corrupt == "count_mismatch":
        files[labels] = idx(np.arange(39) % 10)
    elif corrupt == "image_size":
        files[IDX_STEMS[2]] = idx(rng.integers(0, 256, (20, 7, 7)))
    elif corrupt == "label_range":
        files[labels] = idx(np.arange(40) % 12)
    elif corrupt == "float_labels":
        files[labels] = idx((np.arange(40) % 10) + 0.5, code=0x0D)
    elif corrupt == "folder_file":
        files.pop(labels)
        (folder / labels).mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        ("magic", "bad magic number"),
        ("truncated", "2546 bytes, expected 2576 for shape (40, 8, 8)"),
        ("truncated_gz", "corrupt IDX file"),
        ("huge_header", "more than 4294967296"),
        ("huge_gz", "116 bytes, expected 4000000016 for shape (1000, 1000, 4000)"),
        ("dtype_code", "unknown IDX dtype code 0x07"),
        ("count_mismatch", "do not match labels of shape (39,)"),
        ("image_size", "differ in size"),
        ("label_range", "expected 0..9"),
        ("float_labels", "expected integers"),
        ("folder_file", "missing"),
    ],
)
def test_bad_idx_files(corrupt, needle, tmp_path, tmp_path_factory, capsys):
    folder = write_mnist(tmp_path_factory.mktemp("mnist"), corrupt)
    argv = ["run", "--out", str(tmp_path / "run"), "--quiet", "--set", "data.dataset=mnist",
            "--set", f"data.path={folder}"]  # fmt: skip
    code = call(argv)
    check_one_line(code, capsys.readouterr(), needle, tmp_path)


def write_cifar(folder, corrupt: str):
    """Six valid two-image CIFAR-10 batches, data_batch_2 corrupted as named."""
    for b, stem in enumerate(CIFAR_STEMS):
        data = ((np.arange(2 * 3072).reshape(2, 3072) + b) % 251).astype(np.uint8)
        batch = {b"batch_label": b"x", b"data": data, b"labels": [b, (b + 1) % 10]}
        blob = pickle.dumps(batch)
        if stem == "data_batch_2":
            if corrupt == "not_pickle":
                blob = b"not a pickle at all"
            elif corrupt == "truncated":
                blob = blob[: len(blob) // 2]
            elif corrupt == "wrong_width":
                blob = pickle.dumps({**batch, b"data": data[:, :100]})
            elif corrupt == "label_count":
                blob = pickle.dumps({**batch, b"labels": [1, 2, 3]})
            elif corrupt == "not_a_dict":
                blob = pickle.dumps([1, 2, 3])
            elif corrupt == "folder":
                (folder / stem).mkdir()
                continue
        (folder / stem).write_bytes(blob)
    return folder


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        ("not_pickle", "corrupt batch"),
        ("truncated", "corrupt batch"),
        ("wrong_width", "expected uint8 (n, 3072) data"),
        ("label_count", "labels int64 (3,)"),
        ("not_a_dict", "corrupt batch"),
        ("folder", "is a folder"),
    ],
)
def test_bad_cifar_batches(corrupt, needle, tmp_path, tmp_path_factory, capsys):
    folder = write_cifar(tmp_path_factory.mktemp("cifar"), corrupt)
    argv = ["run", "--out", str(tmp_path / "run"), "--quiet", "--set", "data.dataset=cifar10",
            "--set", f"data.path={folder}"]  # fmt: skip
    code = call(argv)
    err = capsys.readouterr()
    check_one_line(code, err, needle, tmp_path)
    assert "data_batch_2" in err.err


# ---- output locations ----


@pytest.mark.parametrize(
    "out, needle",
    [
        ("/proc/paramarket-test/run", "cannot create a folder in /proc"),
        ("{tmp}/a_file", "already exists and is not a folder"),
        ("{tmp}/a_file/deeper/run", "is a file, not a folder"),
        ("{tmp}/" + "x" * 300, "not a usable path"),
        ("{tmp}/" + "x" * 250, "longer than this file system allows"),  # its temporary is
    ],
)
def test_bad_output_locations(out, needle, tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep me")
    code = call(["run", "--out", out.replace("{tmp}", str(tmp_path)), "--quiet"])
    check_one_line(code, capsys.readouterr(), needle, tmp_path, keep=("a_file",))
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = call(["run", "--out", str(locked / "run"), "--quiet"])
        check_one_line(code, capsys.readouterr(), "cannot create a folder", locked)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "where, needle",
    [("file", "runs is a file, not a folder"), ("proc", "cannot create a folder in /proc")],
)
def test_default_runs_folder_must_be_writable(where, needle, tmp_path, monkeypatch, capsys):
    """Without --out a run goes to runs/<name>-<time> under the working folder."""
    if where == "file":
        (tmp_path / "runs").write_text("not a folder")
        monkeypatch.chdir(tmp_path)
    else:
        monkeypatch.chdir("/proc")
    code = call(["run", "--quiet"])
    check_one_line(code, capsys.readouterr(), needle, tmp_path, keep=("runs",))


# ---- sweep grids ----


@pytest.mark.parametrize(
    "grids, needle",
    [
        (["model.widths=32,64"], "'model.widths' must be a non-empty list of integers"),
        (["model.name=cnn", "model.kernel=3,abc"], "'model.kernel' must be an integer"),
        (["data.split.d=0.1,abc"], "'d' must be a number in (0, 1]"),
        (["seeds=[0],[-1]"], "'seeds' must be a non-empty list of distinct integers"),
        (["mechanism.name=k_vickrey", "mechanism.k=1,99999999"], "at most 65536"),
        (["train.optimizer=sgd,lbfgs"], "one of adam, adamw, momentum, rmsprop, sgd"),
        (["agents.nn=2,3"], "unknown scenario key 'agents.nn'"),
        (["mechanism.beta"], "must look like key=v1,v2"),
        (["seeds=" + "[" * 2000 + "0" + "]" * 2000], "values nested too deeply"),
    ],
)
def test_bad_sweep_grids(grids, needle, tmp_path, capsys):
    argv = ["sweep", "paper_two_agent", "--out", str(tmp_path / "sweep"), "--quiet"]
    for grid in grids:
        argv += ["--grid", grid]
    code = call(argv)
    check_one_line(code, capsys.readouterr(), needle, tmp_path)


@pytest.mark.parametrize("out", ["/proc/paramarket-test/sweep", "{tmp}/a_file/sweep"])
def test_bad_sweep_output_locations(out, tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep me")
    argv = ["sweep", "paper_two_agent", "--grid", "mechanism.beta=0,1", "--quiet", "--out",
            out.replace("{tmp}", str(tmp_path))]  # fmt: skip
    code = call(argv)
    check_one_line(code, capsys.readouterr(), "", tmp_path, keep=("a_file",))


# ---- run folders: permissions and stale temporaries ----


def test_run_folder_gets_the_usual_permissions(tmp_path):
    from paramarket_jax.results.folders import write_run

    out = write_run(tmp_path / "run", {"a.txt": "x"})
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~mask)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path):
    from paramarket_jax.results.folders import write_run

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".run.{dead.pid}.abcdefgh"
    stale.mkdir()
    (stale / "rounds.parquet").write_text("half written")
    keep = [
        tmp_path / f".run.{os.getppid()}.abcdefgh",  # a live process's: still writing
        tmp_path / f".run.5.{dead.pid}.abcdefgh",  # the run "run.5"'s, not ours
        tmp_path / ".run.old",  # a sweep's swapped-out cell
        tmp_path / f".other.{dead.pid}.abcdefgh",  # another run's
    ]
    for folder in keep:
        folder.mkdir()
    write_run(tmp_path / "run", {"a.txt": "x"})
    assert not stale.exists()
    assert all(folder.exists() for folder in keep)
    assert (tmp_path / "run" / "a.txt").read_text() == "x"
