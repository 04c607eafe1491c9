"""Broker kernels: planted-permutation recovery, merge identities, valuation against a loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paramarket_jax.broker import align as align_mod  # align: a test parameter's name too
from paramarket_jax.broker.align import (
    BACKENDS,
    SOLVERS,
    align_pairs,
    align_to,
    align_to_reference,
    compose,
    hungarian,
    take,
)
from paramarket_jax.broker.merge import merge, merge_alphas, merge_many, select_layers
from paramarket_jax.broker.value import (
    all_candidates,
    all_pairs,
    loss_and_accuracy,
    merge_trades,
    sample_candidates,
    value_candidates,
    value_pairs,
    value_with_perms,
)
from paramarket_jax.errors import ParamarketError
from paramarket_jax.models import (
    apply_permutation,
    flatten,
    make_model,
    random_perms,
    unflatten,
)

IMAGE = (8, 8, 1)
SMALL = {
    "mlp": {"widths": (16, 12)},
    "cnn": {"channels": (6, 8)},
    "wrn": {"depth": 10, "base": 4},
}


def leaves_equal(a, b) -> bool:
    """Exact equality of two pytrees, compared on the host (no per-shape XLA compiles)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def random_params(model, key, n=None):
    """Random parameters of ``model`` (``n`` of them stacked), without compiling Flax's init.

    Every leaf (biases and norm scales too) is random, so no two units tie. One normal draw
    split into leaves: a draw per leaf would compile one threefry per leaf (seconds on CPU).
    """
    leaves, tree = jax.tree.flatten(jax.eval_shape(model.init, jax.random.key(0)))
    lead = () if n is None else (n,)
    sizes = [int(np.prod(x.shape)) for x in leaves]

    @jax.jit
    def draw(key):
        flat = jax.random.normal(key, (*lead, sum(sizes)))
        parts = jnp.split(flat, np.cumsum(sizes)[:-1], axis=-1)
        return tree.unflatten(
            [
                p.reshape(*lead, *x.shape) / np.sqrt(max(np.prod(x.shape[:-1]), 1))
                for p, x in zip(parts, leaves, strict=True)
            ]
        )

    return draw(key)


@pytest.fixture(scope="module")
def mlp():
    return make_model("mlp", IMAGE, 10, **SMALL["mlp"])


@pytest.fixture(scope="module")
def population(mlp):
    """Three random small MLPs and per-agent validation rows of a shared random set."""
    n, n_val, m = 3, 48, 16
    pop = random_params(mlp, jax.random.key(0), n)
    x_val = jax.random.normal(jax.random.key(1), (n_val, *IMAGE))
    y_val = jax.random.randint(jax.random.key(2), (n_val,), 0, 10)
    val_idx = jax.random.randint(jax.random.key(3), (n, m), 0, n_val)
    return pop, x_val, y_val, val_idx


@pytest.mark.parametrize("name", sorted(SMALL))
def test_alignment_recovers_planted_permutation(name):
    model = make_model(name, IMAGE, 10, **SMALL[name])
    spec = model.spec

    buyer = random_params(model, jax.random.key(0))

    @jax.jit
    def plant(key, buyer):
        planted = random_perms(key, spec)
        return planted, apply_permutation(spec, planted, buyer)

    planted, seller = plant(jax.random.key(1), buyer)
    # The default (the platform's solver) everywhere; both forced solvers and the host loop
    # on the MLP (on unrelated models too: test_weight_matching_same_on_every_backend).
    backends = BACKENDS if name == "mlp" else ("auto",)
    for backend in backends:
        perms = align_mod.align(spec, buyer, seller, jax.random.key(2), backend=backend)
        for g, p in planted.items():
            np.testing.assert_array_equal(perms[g], np.argsort(p), err_msg=f"{backend} {g}")
    # The aligned seller is the buyer, and so is their merge at every alpha, on all layers
    # or on a subset.
    first = sorted(flatten(buyer))[0].rsplit("/", 1)[0]

    @jax.jit
    def merges(perms, buyer, seller):
        back = align_mod.aligned(spec, perms, seller)
        every = merge_alphas(buyer, back, jnp.array([0.05, 0.5, 0.95]))
        return back, every, merge(buyer, back, 0.5, layers=[first])

    back, every, part = merges(perms, buyer, seller)
    assert leaves_equal(back, buyer)
    assert leaves_equal(every, jax.tree.map(lambda x: np.stack([x] * 3), buyer))
    assert leaves_equal(part, buyer)


def test_hungarian_solvers_agree():
    """scipy through the callback == optax's Hungarian, alone, batched and vmapped in jit."""
    from scipy.optimize import linear_sum_assignment

    sims = jax.random.normal(jax.random.key(0), (2, 3, 12, 12))  # continuous: no ties
    single = {s: jax.jit(lambda m, s=s: hungarian(m, s)) for s in SOLVERS}
    nested = {s: jax.jit(jax.vmap(jax.vmap(single[s]))) for s in SOLVERS}
    leading = {s: jax.jit(lambda m, s=s: hungarian(m, s)) for s in SOLVERS}
    want = np.array([[linear_sum_assignment(m, maximize=True)[1] for m in r] for r in sims])
    for s in SOLVERS:
        got = [nested[s](sims), leading[s](sims), single[s](sims[1, 2])]
        assert all(g.dtype == jnp.int32 for g in got), s
        for g, w in zip(got, (want, want, want[1, 2]), strict=True):
            np.testing.assert_array_equal(g, w, err_msg=s)

    # ``where``: the callback skips the other matrices (identity), also when only ``where``
    # is batched; optax solves every one.
    live = jnp.array([True, False, True])
    skip = jax.jit(jax.vmap(lambda m, w: hungarian(m, "callback", w), (None, 0)))
    got = np.asarray(skip(sims[0, 0], live))
    np.testing.assert_array_equal(got[[0, 2]], want[0, [0, 0]])
    np.testing.assert_array_equal(got[1], np.arange(12))
    optax_where = hungarian(sims[0], "optax", live)
    np.testing.assert_array_equal(optax_where, want[0])

    # a non-finite similarity (a diverged model) gives a permutation, not a host error
    bad = sims[0, 0].at[3].set(jnp.nan).at[5, 5].set(jnp.inf)
    assert sorted(np.asarray(single["callback"](bad)).tolist()) == list(range(12))

    # ``auto`` keeps only the platform's branch when lowered: the callback for CPU, optax's
    # while loop for an accelerator (lowered here for CUDA too, whatever this machine is: a
    # callback could only be lowered for this machine's own platform).
    cpu = jax.default_backend() == "cpu"
    text = single["auto"].lower(sims[0, 0]).as_text()
    assert ("callback" in text) == cpu and ("while" in text) != cpu, text
    text = single["auto"].trace(sims[0, 0]).lower(lowering_platforms=("cuda",)).as_text()
    assert "callback" not in text and "while" in text
    with pytest.raises(ParamarketError, match="solver"):
        hungarian(sims[0, 0], "scipy")


def test_weight_matching_same_on_every_backend(mlp):
    """Unrelated models, same key and so the same group orders: every backend (solver in the
    jitted descent, or scipy's host loop) reaches the same local optimum, per pair."""
    spec = mlp.spec
    pop = random_params(mlp, jax.random.key(3), 3)
    buyers, sellers = all_pairs(3)
    key = jax.random.key(4)
    found = {b: align_pairs(spec, pop, buyers, sellers, key, backend=b) for b in BACKENDS}
    for b in BACKENDS:
        assert leaves_equal(found[b], found["scipy"]), b
    moved = [not np.array_equal(p, np.arange(p.shape[-1])) for p in jax.tree.leaves(found["auto"])]
    assert any(moved)
    # one pair through align: the same perms as its row of align_pairs
    one = align_mod.align(spec, take(pop, 1), take(pop, 0), key, backend="callback")
    assert leaves_equal(one, {g: p[2] for g, p in found["optax"].items()})
    with pytest.raises(ParamarketError, match="backend"):
        align_pairs(spec, pop, buyers, sellers, key, backend="jax")


def test_align_pairs_skips_converged_pairs(mlp, monkeypatch):
    """30 pairs: once at most 8 are live, sweeps run on those 8 (gathered, then scattered
    back); the perms are the host loop's, pair by pair."""
    import sys

    module = sys.modules["paramarket_jax.broker.align"]
    assert module._buckets(30) == [30, 8]
    batches = []
    host = module._lsa_host

    def counted(sim, where):
        batches.append((sim.shape[0], int(np.sum(where))))
        return host(sim, where)

    monkeypatch.setattr(module, "_lsa_host", counted)
    spec = mlp.spec
    pop = random_params(mlp, jax.random.key(11), 6)
    buyers, sellers = all_pairs(6)
    key = jax.random.key(12)
    got = align_pairs(spec, pop, buyers, sellers, key, backend="callback")
    want = align_pairs(spec, pop, buyers, sellers, key, backend="scipy")
    assert leaves_equal(got, want)
    assert batches[0] == (30, 30) and (8, batches[-1][1]) in batches, batches
    assert all(live <= size for size, live in batches)


def test_align_pairs_is_one_jitted_call(mlp):
    spec = mlp.spec
    traces = []

    @jax.jit
    def run(pop, buyers, sellers, key):
        traces.append(1)
        perms = align_pairs(spec, pop, buyers, sellers, key, max_sweeps=50, batch_size=2)
        b, s = (jax.tree.map(lambda x, i=i: x[i], pop) for i in (buyers, sellers))
        # align itself is vmappable too (a while_loop with fixed shapes)
        vmapped = jax.vmap(lambda b, s: align_mod.align(spec, b, s, key, max_sweeps=50))(b, s)
        return jax.vmap(lambda p, s: align_mod.aligned(spec, p, s))(perms, s), perms, vmapped

    @jax.jit
    def planted_population(key, base):
        keys = jax.random.split(key, 2)
        copies = [apply_permutation(spec, random_perms(k, spec), base) for k in keys]
        return jax.tree.map(lambda *xs: jnp.stack(xs), base, *copies)

    pairs = [(0, 1), (0, 2), (1, 2)]
    buyers, sellers = (jnp.array(col) for col in zip(*pairs, strict=True))
    for seed in (0, 1):
        pop = planted_population(jax.random.key(seed), random_params(mlp, jax.random.key(9)))
        aligned, perms, vmapped = run(pop, buyers, sellers, jax.random.key(5))
        assert leaves_equal(perms, vmapped)
        assert leaves_equal(aligned, jax.tree.map(lambda x: np.asarray(x)[np.asarray(buyers)], pop))
    assert len(traces) == 1  # the second population reuses the compiled call


def test_merge_identities(mlp):
    a = random_params(mlp, jax.random.key(0))
    b = random_params(mlp, jax.random.key(1))

    @jax.jit  # one compilation for all the merges below
    def merges(a, b):
        two = jax.tree.map(lambda x, y: jnp.stack([x, y]), b, a)
        return {
            "self": merge(a, a, 0.37),
            "zero": merge(a, b, 0.0),
            "half": merge(a, b, 0.5),
            "half_ref": jax.tree.map(lambda x, y: 0.5 * x + 0.5 * y, a, b),
            "many_1": merge_many(a, jax.tree.map(lambda x: x[:1], two), jnp.array([7, 3.0])),
            "merge_3": merge(a, b, 0.3),
            "many_2": merge_many(a, two, jnp.array([2.0, 1.0, 1.0])),  # normalised
            "merge_25": merge(a, b, 0.25),
            "many_buyer": merge_many(a, two, jnp.array([1.0, 0.0, 0.0])),
            "layers": [
                merge(a, b, 0.5, layers=layers)
                for layers in (["params/Dense_1"], ["Dense_1"], ["*Dense_1/*"])
            ],
        }

    out = merges(a, b)
    assert leaves_equal(out["self"], a)
    assert leaves_equal(out["zero"], a)
    assert leaves_equal(out["many_buyer"], a)
    for got, want in (("half", "half_ref"), ("many_1", "merge_3"), ("many_2", "merge_25")):
        jax.tree.map(
            lambda x, y, got=got: np.testing.assert_allclose(
                x, y, rtol=1e-6, atol=1e-7, err_msg=got
            ),
            out[got],
            out[want],
        )
    # trading a set of layers: the named ones mix, the rest stay the buyer's
    own = flatten(a)
    for part in out["layers"]:
        for path, x in flatten(part).items():
            unchanged = np.array_equal(np.asarray(x), np.asarray(own[path]))
            assert unchanged == ("Dense_1" not in path), path
    assert select_layers(a, ["*/kernel"]) == {f"params/Dense_{i}/kernel" for i in range(3)}
    with pytest.raises(ParamarketError, match="Dense_9"):
        merge(a, b, 0.5, layers=["Dense_9"])


def test_candidates():
    b, s = all_pairs(4)
    assert b.shape == s.shape == (12,) and not bool((b == s).any())
    assert len(set(zip(b.tolist(), s.tolist(), strict=True))) == 12
    assert all_candidates(4).shape == (4, 3)
    cands = np.asarray(sample_candidates(jax.random.key(0), 9, 4))
    assert cands.shape == (9, 4) and cands.dtype == np.int32
    for i, row in enumerate(cands):
        assert len(set(row)) == 4 and i not in row and row.min() >= 0 and row.max() < 9
    np.testing.assert_array_equal(cands, sample_candidates(jax.random.key(0), 9, 4))
    assert not np.array_equal(cands, sample_candidates(jax.random.key(1), 9, 4))
    # every agent gets drawn as a seller somewhere (600 draws over 200 agents)
    many = np.asarray(sample_candidates(jax.random.key(2), 200, 3))
    assert len(set(many.ravel())) > 190
    with pytest.raises(ParamarketError):
        sample_candidates(jax.random.key(0), 3, 3)


def reference_valuation(model, pop, x_val, y_val, val_idx, buyers, sellers, key, alphas, align):
    """Plain Python loop over pairs with the unbatched functions."""
    rows = []
    for b, s in zip(buyers.tolist(), sellers.tolist(), strict=True):
        pb, ps = (jax.tree.map(lambda v, i=i: v[i], pop) for i in (b, s))
        if align:
            ps = align_mod.aligned(model.spec, align_mod.align(model.spec, pb, ps, key), ps)
        x, y = x_val[val_idx[b]], y_val[val_idx[b]]
        before, _ = loss_and_accuracy(model, pb, x, y)
        scores = [loss_and_accuracy(model, merge(pb, ps, a), x, y) for a in alphas]
        k = int(np.argmin([float(loss) for loss, _ in scores]))
        if alphas[k] == 0.0:  # alpha = 0 is the buyer itself
            assert float(scores[k][0]) == pytest.approx(float(before), rel=1e-6)
        after, acc = scores[k]
        rows.append((alphas[k], before, after, (before - after) / before, acc))
    return [np.array([r[i] for r in rows], np.float32) for i in range(5)]


@pytest.mark.parametrize("align", [True, False])
def test_valuation_matches_reference_loop(mlp, population, compiles, align):
    pop, x_val, y_val, val_idx = population
    key = jax.random.key(7)
    alphas = (0.0, 0.3, 0.7)
    buyers, sellers = all_pairs(3)
    options = dict(alphas=alphas, align=align, batch_size=2)  # 2 does not divide 3 or 6

    def value(pop):
        if align:  # buyer-chunked candidates, all of them: the order of all_pairs
            cands = all_candidates(3)
            return value_candidates(mlp, pop, x_val, y_val, val_idx, cands, key, **options)
        return value_pairs(mlp, pop, x_val, y_val, val_idx, buyers, sellers, key, **options)

    got = value(pop)
    np.testing.assert_array_equal(got.buyer, buyers)
    np.testing.assert_array_equal(got.seller, sellers)
    want = reference_valuation(mlp, pop, x_val, y_val, val_idx, buyers, sellers, key, alphas, align)
    for name, w in zip(
        ("best_alpha", "loss_before", "loss_after", "gain", "acc_after"), want, strict=True
    ):
        np.testing.assert_allclose(getattr(got, name), w, rtol=2e-5, atol=1e-6, err_msg=name)
    assert bool((got.gain >= 0).all())  # alpha = 0 is on the grid
    # a new population of the same shapes compiles nothing
    pop2 = jax.tree.map(lambda x: x * 1.01, pop)
    with compiles() as events:
        again = jax.block_until_ready(value(pop2))
    assert events == []
    assert not np.allclose(again.loss_before, got.loss_before)


def test_jit_equals_no_jit(mlp, population):
    # Settlement without alignment, chunked with padding (3 buyers, chunks of 2). Under
    # disable_jit optax's Hungarian would run op by op in Python (minutes): the jitted
    # alignment is checked against scipy's host loop, the jitted valuation against an
    # eager per-pair loop.
    pop, *_ = population
    sellers, alphas, mask = jnp.array([1, 2, 0]), jnp.array([0.3, 0.6, 0.9]), jnp.array([1, 0, 1])

    def run():
        return merge_trades(
            mlp.spec,
            pop,
            sellers,
            alphas,
            mask.astype(bool),
            jax.random.key(0),
            align=False,
            batch_size=2,
        )

    jitted = run()
    with jax.disable_jit():
        eager = run()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jitted, eager)
    assert not leaves_equal(jitted, pop)


def test_merge_trades(mlp, population):
    pop, *_ = population
    key = jax.random.key(7)
    sellers, alphas = jnp.array([2, 0, 0]), jnp.array([0.5, 0.3, 0.9])
    mask = jnp.array([True, False, True])
    new = merge_trades(mlp.spec, pop, sellers, alphas, mask, key, layers=["Dense_1"])
    for i in range(3):
        mine = jax.tree.map(lambda x, i=i: x[i], pop)
        got = jax.tree.map(lambda x, i=i: x[i], new)
        if not mask[i]:
            assert leaves_equal(got, mine)
            continue
        seller = jax.tree.map(lambda x, i=i: x[sellers[i]], pop)
        want = merge(mine, align_to(mlp.spec, mine, seller, key), alphas[i], layers=["Dense_1"])
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got, want)
        flat, own = flatten(got), flatten(mine)
        for path in flat:
            assert bool((flat[path] == own[path]).all()) == ("Dense_1" not in path), path


def test_alignment_helps_merging_trained_digits_models():
    from paramarket_jax.data import load_dataset

    data = load_dataset("digits", jax.random.key(0))
    model = make_model("mlp", data.x_train.shape[1:], data.num_classes, widths=(64, 64))
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    tx = optax.adam(3e-3)

    def train(key):
        params = model.init(key)

        def step(carry, k):
            p, o = carry
            idx = jax.random.randint(k, (64,), 0, x.shape[0])
            g = jax.grad(lambda p: loss_and_accuracy(model, p, x[idx], y[idx])[0])(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        keys = jax.random.split(jax.random.fold_in(key, 1), 300)
        return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

    pop = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(1), 2))
    x_val, y_val = jnp.asarray(data.x_val), jnp.asarray(data.y_val)

    @jax.jit
    def half_merge_losses(pop, key):
        """Loss on the buyer's validation split of the 0.5 merge, with and without alignment."""
        out = []
        for b, s in ((0, 1), (1, 0)):
            buyer, seller = (jax.tree.map(lambda v, i=i: v[i], pop) for i in (b, s))
            before = loss_and_accuracy(model, buyer, x_val, y_val)[0]
            matched = align_to(model.spec, buyer, seller, key)
            out.append(
                [before]
                + [
                    loss_and_accuracy(model, merge(buyer, other, 0.5), x_val, y_val)[0]
                    for other in (matched, seller)
                ]
            )
        return jnp.array(out)

    losses = np.asarray(half_merge_losses(pop, jax.random.key(2)))
    before, aligned, raw = losses.T
    assert (before < 0.5).all(), losses  # both models learned
    assert (aligned < raw).all(), losses


def test_reference_alignment_composes_planted_permutations(mlp):
    """B and C are A with planted perms. Aligned once each to the reference A, the composed
    perms of C into B's basis are exactly the planted answer, and C becomes B exactly."""
    spec = mlp.spec

    @jax.jit
    def plant(key, a):
        pb, pc = (random_perms(k, spec) for k in jax.random.split(key))
        copies = [apply_permutation(spec, p, a) for p in (pb, pc)]
        return jax.tree.map(lambda *x: jnp.stack(x), a, *copies), pb, pc

    pop, pb, pc = plant(jax.random.key(21), random_params(mlp, jax.random.key(20)))
    key = jax.random.key(22)
    to_ref = align_to_reference(spec, pop, 0, key)
    # C's unit Q[m] is B's unit m: Q = inverse(pc)[pb]
    want = {g: np.argsort(pc[g])[np.asarray(pb[g])].astype(np.int32) for g in spec.sizes}
    for g, p in to_ref.items():
        assert p.shape == (3, spec.sizes[g]) and p.dtype == jnp.int32
        np.testing.assert_array_equal(p[0], np.arange(spec.sizes[g]))  # the reference itself
        np.testing.assert_array_equal(p[1], np.argsort(pb[g]))
    q = compose(take(to_ref, 1), take(to_ref, 2))
    assert leaves_equal(q, want)
    assert leaves_equal(align_mod.aligned(spec, q, take(pop, 2)), take(pop, 1))
    # batched leading axes: every (buyer, seller) pair at once, the identity on the diagonal
    every = compose(
        *(jax.tree.map(lambda p, s=s: p[s], to_ref) for s in (np.s_[:, None], np.s_[None]))
    )
    assert leaves_equal(jax.tree.map(lambda p: p[1, 2], every), want)
    for g, p in every.items():
        assert p.shape == (3, 3, spec.sizes[g])
        np.testing.assert_array_equal(
            p[np.arange(3), np.arange(3)], np.tile(np.arange(p.shape[-1]), (3, 1))
        )
    # any reference (here B, traced) gives the same pairs; align_pairs composes the same way
    pairs = align_pairs(spec, pop, jnp.array([1, 2]), jnp.array([2, 1]), key, reference=1)
    assert leaves_equal(take(pairs, 0), want)
    assert leaves_equal(take(pairs, 1), {g: np.argsort(w) for g, w in want.items()})


def test_restarts_recover_planted_narrow_layers():
    """A 3-wide layer between 16-wide ones, freshly initialised (kernels with variance
    1 / fan-in, zero biases, like Flax's default init): plain weight matching (restart 0)
    stalls on some planted permutations; the restart with the best objective recovers
    every one (random starts: see _align_restarts for the measured rates)."""
    from paramarket_jax.broker.align import _align_restarts, freeze

    model = make_model("mlp", IMAGE, 10, widths=(16, 3, 16))
    spec, trials, restarts = model.spec, 3, 8  # 24 descents: one bucket, one compile

    @jax.jit
    def run(pop, key):
        fresh = {p: jnp.zeros_like(v) if p.endswith("bias") else v for p, v in flatten(pop).items()}
        planted = jax.vmap(random_perms, (0, None))(jax.random.split(key, trials), spec)
        permute = jax.vmap(lambda p, a: flatten(apply_permutation(spec, p, unflatten(a))))
        perms, objective = _align_restarts(
            freeze(spec), fresh, permute(planted, fresh), jax.random.key(7), 20,
            restarts=restarts, keep_all=True,
        )  # fmt: skip
        return planted, perms, objective

    planted, perms, objective = run(
        random_params(model, jax.random.key(30), trials), jax.random.key(31)
    )
    hit = np.ones((trials, restarts), bool)
    for g, p in perms.items():
        hit &= (np.asarray(p) == np.argsort(planted[g], axis=-1)[:, None]).all(-1)
    assert hit[np.arange(trials), np.argmax(objective, axis=1)].all(), hit
    assert not hit[:, 0].all()  # restart 0, plain weight matching, misses some


RESTART_ALPHAS = jnp.array([0.0, 0.3, 0.7])


@functools.partial(jax.jit, static_argnames=("model", "align", "choose"))
def restart_valuation(model, pop, x_val, y_val, val_idx, key, reference, *, align, choose):
    """value_with_perms, 2 restarts, on all candidates of a 3-agent population, in a jit."""
    return value_with_perms(
        model, pop, x_val, y_val, val_idx, all_candidates(3), key, RESTART_ALPHAS,
        align=align, layers=None, max_sweeps=20, batch_size=None, restarts=2,
        choose=choose, reference=reference,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)
def rescored(model, pop, x_val, y_val, val_idx, buyers, sellers, alphas, perms):
    """Validation loss of each pair's merge, rebuilt from its perms (N, K, ...) and alpha."""

    def one(b, s, alpha, p):
        seller = align_mod.aligned(model.spec, p, take(pop, s))
        merged = merge(take(pop, b), seller, alpha)
        rows = val_idx[b]
        return loss_and_accuracy(model, merged, x_val[rows], y_val[rows])[0]

    flat = jax.tree.map(lambda p: p.reshape(-1, *p.shape[2:]), perms)
    return jax.vmap(one)(buyers, sellers, alphas, flat)


def test_reference_valuation_under_a_seed_vmap(mlp, population):
    """Reference alignment, restarts chosen on validation: value_with_perms vmapped over keys
    (and reference agents) equals one call per seed, and each pair's perms (the restart
    kept) rebuild the merge whose loss was reported. Bad options fail by name."""
    pop, x_val, y_val, val_idx = population
    keys, refs = jax.random.split(jax.random.key(7), 2), jnp.array([0, 2], jnp.int32)

    def value(key, reference):
        return restart_valuation(
            mlp, pop, x_val, y_val, val_idx, key, reference, align="reference", choose="validation"
        )

    batched = jax.jit(jax.vmap(value))(keys, refs)
    for i in range(2):
        val, perms = value(keys[i], refs[i])
        assert all(p.shape[:2] == (3, 2) and p.dtype == jnp.int32 for p in perms.values())
        assert leaves_equal(perms, jax.tree.map(lambda p, i=i: p[i], batched[1]))
        for name, got in val._asdict().items():
            if got is None:  # a linear merge keeps no second knob and fits no weights
                assert batched[0]._asdict()[name] is None
                continue
            np.testing.assert_allclose(
                batched[0]._asdict()[name][i], got, rtol=1e-5, atol=1e-6, err_msg=name
            )
        again = rescored(mlp, pop, x_val, y_val, val_idx, *val[:3], perms)
        np.testing.assert_allclose(again, val.loss_after, rtol=1e-5)
    cands = all_candidates(3)
    for bad, match in (
        (dict(align="exact"), "alignment mode"),
        (dict(restarts=0), "restarts"),
        (dict(choose="best"), "restart choice"),
    ):
        with pytest.raises(ParamarketError, match=match):
            value_candidates(mlp, pop, x_val, y_val, val_idx, cands, keys[0], **bad)
