"""Merge methods: each against a NumPy reference, their identities, jit / vmap, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paramarket_jax.broker.merge import merge
from paramarket_jax.broker.methods import (
    METHODS,
    diagonal_fisher,
    get_method,
    layer_names,
    merge_with,
    trim,
)
from paramarket_jax.errors import ParamarketError
from paramarket_jax.models import flatten, unflatten

SHAPES = {
    "params/Dense_0/kernel": (5, 4),
    "params/Dense_0/bias": (4,),
    "params/Dense_1/kernel": (4, 3),
}
LAYERS = ("params/Dense_0", "params/Dense_1")
VECTOR = np.array([0.3, 0.8], np.float32)  # one weight per entry of LAYERS
KEY = jax.random.key(7)


def tree(flat):
    return unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def np_flat(params):
    return {p: np.asarray(v) for p, v in flatten(params).items()}


def random_flat(rng, scale=1.0):
    return {p: (scale * rng.standard_normal(s)).astype(np.float32) for p, s in SHAPES.items()}


@pytest.fixture(scope="module")
def trees():
    """(buyer, seller, base, fb, fs) as pytrees; task vectors of scale 0.1 around the base."""
    rng = np.random.default_rng(0)
    z = random_flat(rng)
    b = {p: z[p] + 0.1 * rng.standard_normal(z[p].shape).astype(np.float32) for p in z}
    s = {p: z[p] + 0.1 * rng.standard_normal(z[p].shape).astype(np.float32) for p in z}
    fb = {p: rng.exponential(1.0, z[p].shape).astype(np.float32) for p in z}
    fs = {p: rng.exponential(1.0, z[p].shape).astype(np.float32) for p in z}
    return tree(b), tree(s), tree(z), tree(fb), tree(fs)


# --- NumPy references (one leaf; float32 inputs, w a float) ----------------------------------


def ref_trim(t, density):
    """Keep the k largest magnitudes (argsort: no ties among random floats)."""
    n = t.size
    k = int(np.clip(np.ceil(np.float32(density) * np.float32(n)), 1, n))
    flat = t.ravel()
    keep = np.zeros(n, bool)
    keep[np.argsort(-np.abs(flat))[:k]] = True
    return np.where(keep, flat, 0).reshape(t.shape).astype(t.dtype)


def ref_disjoint_mean(ta, tb):
    """Entry by entry: the mean of the nonzero values that carry the sign of the sum."""
    out = np.zeros(ta.size, np.float32)
    for j, (u, v) in enumerate(zip(ta.ravel(), tb.ravel(), strict=True)):
        sign = np.sign(u + v)
        agree = [x for x in (u, v) if x != 0 and np.sign(x) == sign]
        out[j] = np.mean(agree) if agree else 0.0
    return out.reshape(ta.shape)


def ref_leaf(name, b, s, z, w, second, masks, fb, fs):
    """masks: the bernoulli keep masks that jax draws for this leaf, (buyer's, seller's)."""
    if name == "linear":
        return b + w * (s - b)
    if name == "task_arithmetic":
        return b + w * (s - z)
    if name == "ties":
        return z + w * ref_disjoint_mean(ref_trim(b - z, second), ref_trim(s - z, second))
    q = 1 - second
    if name == "dare":
        return b + w * np.where(masks[1], (s - z) / q, 0)
    if name == "dare_ties":
        tb = np.where(masks[0], (b - z) / q, 0)
        ts = np.where(masks[1], (s - z) / q, 0)
        return z + w * ref_disjoint_mean(tb, ts)
    assert name == "fisher"
    f_b, f_s = fb + 1e-8, fs + 1e-8
    return ((1 - w) * f_b * b + w * f_s * s) / ((1 - w) * f_b + w * f_s)


def jax_masks(name, i, shape, p):
    """The masks the documented key derivation gives leaf i: fold_in(KEY, i) for dare's
    seller, its fold_in by 0 and 1 for dare_ties's buyer and seller."""
    leaf_key = jax.random.fold_in(KEY, i)
    q = jnp.float32(1) - jnp.float32(p)
    if name == "dare":
        return None, np.asarray(jax.random.bernoulli(leaf_key, q, shape))
    return tuple(
        np.asarray(jax.random.bernoulli(jax.random.fold_in(leaf_key, j), q, shape)) for j in (0, 1)
    )


def ref_merge(name, trees, weight, second, layers=None):
    b, s, z, fb, fs = (np_flat(t) for t in trees)
    names = sorted({p.rpartition("/")[0] for p in b if layers is None or layers in p})
    out = {}
    for i, path in enumerate(sorted(b)):
        layer = path.rpartition("/")[0]
        if layer not in names:
            out[path] = b[path]
            continue
        w = float(weight) if np.ndim(weight) == 0 else float(weight[names.index(layer)])
        masks = jax_masks(name, i, b[path].shape, second) if "dare" in name else None
        out[path] = ref_leaf(name, b[path], s[path], z[path], w, second, masks, fb[path], fs[path])
    return out


SECOND = {"ties": 0.4, "dare": 0.3, "dare_ties": 0.5}


def run(name, trees, weight, second=0.0, **kw):
    b, s, z, fb, fs = trees
    return merge_with(name, b, s, weight, base=z, second=second, key=KEY, fisher=(fb, fs), **kw)


def assert_close_flat(got, want, **tol):
    got = np_flat(got)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path, **tol)


@pytest.mark.parametrize("weight", [0.35, VECTOR], ids=["scalar", "per_layer"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_matches_reference(trees, name, weight):
    second = SECOND.get(name, 0.0)
    got = run(name, trees, weight, second)
    for path, leaf in flatten(got).items():
        ref = flatten(trees[0])[path]
        assert leaf.shape == ref.shape and leaf.dtype == ref.dtype
    assert_close_flat(got, ref_merge(name, trees, weight, second))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_layers_leave_the_rest_the_buyers(trees, name):
    second = SECOND.get(name, 0.0)
    got = flatten(run(name, trees, np.array([0.6], np.float32), second, layers="Dense_1"))
    buyer, seller = flatten(trees[0]), flatten(trees[1])
    for path in ("params/Dense_0/kernel", "params/Dense_0/bias"):
        np.testing.assert_array_equal(got[path], buyer[path])
    traded = got["params/Dense_1/kernel"]
    assert not np.array_equal(traded, buyer["params/Dense_1/kernel"])
    assert not np.array_equal(traded, seller["params/Dense_1/kernel"])
    want = ref_merge(name, trees, [0.6], second, layers="Dense_1")
    np.testing.assert_allclose(traded, want["params/Dense_1/kernel"], rtol=1e-5, atol=1e-6)


def test_layer_names(trees):
    assert layer_names(trees[0]) == LAYERS
    assert layer_names(trees[0], ["*Dense_1*"]) == ("params/Dense_1",)
    assert layer_names({"w": jnp.zeros(2), "m": {"k": jnp.zeros(1)}}) == ("", "m")


@pytest.mark.parametrize("layers", [None, ["Dense_0"]])
def test_linear_is_bit_identical_to_merge(trees, layers):
    b, s = trees[:2]
    got, want = merge_with("linear", b, s, 0.37, layers=layers), merge(b, s, 0.37, layers)
    for path, leaf in flatten(want).items():
        np.testing.assert_array_equal(flatten(got)[path], leaf)


def test_ties_full_density_agreeing_signs_is_the_mean():
    rng = np.random.default_rng(1)
    z = random_flat(rng)
    sign = {p: np.where(rng.random(v.shape) < 0.5, -1, 1).astype(np.float32) for p, v in z.items()}
    b = {p: z[p] + sign[p] * (0.1 + rng.random(v.shape, np.float32)) for p, v in z.items()}
    s = {p: z[p] + sign[p] * (0.1 + rng.random(v.shape, np.float32)) for p, v in z.items()}
    got = merge_with("ties", tree(b), tree(s), 1.0, base=tree(z), second=1.0)
    assert_close_flat(got, {p: (b[p] + s[p]) / 2 for p in b})


def test_ties_trim_keeps_at_least_one_and_ties_at_the_threshold():
    t = jnp.array([0.5, -3.0, 1.0, 2.0, -2.0, 0.1])
    np.testing.assert_array_equal(trim(t, 0.0), [0, -3.0, 0, 0, 0, 0])
    np.testing.assert_array_equal(trim(t, 0.6), [0, -3.0, 1.0, 2.0, -2.0, 0])  # k = 4
    np.testing.assert_array_equal(trim(t, 0.3), [0, -3.0, 0, 2.0, -2.0, 0])  # k = 2, a tie: 3
    np.testing.assert_array_equal(trim(t, 7.0), t)


@pytest.mark.parametrize("weight", [0.35, VECTOR], ids=["scalar", "per_layer"])
def test_dare_without_drop_is_task_arithmetic_exactly(trees, weight):
    got, want = run("dare", trees, weight, 0.0), run("task_arithmetic", trees, weight)
    for path, leaf in flatten(want).items():
        np.testing.assert_array_equal(flatten(got)[path], leaf)


def test_dare_drops_everything_at_p_one(trees):
    got = flatten(run("dare", trees, 0.8, 1.0))
    for path, leaf in flatten(trees[0]).items():
        np.testing.assert_array_equal(got[path], leaf)


def test_dare_is_unbiased_over_keys(trees):
    b, s, z = trees[:3]
    n, p = 2000, 0.5
    keys = jax.random.split(jax.random.key(3), n)
    outs = jax.vmap(lambda k: merge_with("dare", b, s, 1.0, base=z, second=p, key=k))(keys)
    for path, out in flatten(outs).items():
        tau = np.asarray(flatten(s)[path] - flatten(z)[path])
        dropped = np.asarray(out - flatten(b)[path])
        # each draw is tau / (1 - p) or 0: variance tau^2 p / (1 - p); 5 sigma of the mean
        sigma = np.abs(tau) * np.sqrt(p / (1 - p) / n)
        assert np.all(np.abs(dropped.mean(0) - tau) <= 5 * sigma + 1e-6), path
        kept = np.isclose(dropped, tau / (1 - p), rtol=1e-4)
        assert np.all(kept | (dropped == 0)), path
        assert abs(kept.mean() - (1 - p)) < 0.02, path


def test_fisher_limits(trees):
    b, s, z, fb, fs = trees
    assert_close_flat(merge_with("fisher", b, s, 0.0, fisher=(fb, fs)), np_flat(b))
    assert_close_flat(merge_with("fisher", b, s, 1.0, fisher=(fb, fs)), np_flat(s))
    big = jax.tree.map(lambda f: f + 1e6, fb)
    small = jax.tree.map(lambda f: f * 1e-3, fs)
    near = flatten(merge_with("fisher", b, s, 0.5, fisher=(big, small)))
    for path, leaf in flatten(b).items():
        gap = np.abs(np.asarray(flatten(s)[path] - leaf))
        assert np.all(np.abs(np.asarray(near[path] - leaf)) <= 1e-6 * gap + 1e-6), path


def test_kept():
    assert float(METHODS["ties"].kept(0.3)) == pytest.approx(0.3)
    assert float(METHODS["dare"].kept(0.3)) == pytest.approx(0.7)
    assert float(METHODS["dare_ties"].kept(1.5)) == 0.0
    assert float(METHODS["ties"].kept(1.5)) == 1.0
    for name in ("linear", "task_arithmetic", "fisher"):
        assert float(METHODS[name].kept(0.3)) == 1.0
    np.testing.assert_allclose(
        jax.jit(jax.vmap(METHODS["dare"].kept))(jnp.array([0.0, 0.25])), [1.0, 0.75]
    )


def test_jit_equals_eager(trees):
    b, s, z = trees[:3]

    def f(w, p, key):
        return merge_with("dare_ties", b, s, w, base=z, second=p, key=key)

    args = (jnp.asarray(VECTOR), 0.4, jax.random.key(11))
    got, want = jax.jit(f)(*args), f(*args)
    assert_close_flat(got, np_flat(want))


def test_vmap_over_weights_and_densities_equals_a_loop(trees):
    b, s, z = trees[:3]
    grid = jnp.array([0.0, 0.25, 0.5, 1.0])
    densities = jnp.array([0.1, 0.4, 0.7, 1.0])

    def f(w, d):
        return merge_with("ties", b, s, w, base=z, second=d)

    batched = flatten(jax.vmap(f)(grid, densities))
    for j in range(len(grid)):
        one = flatten(f(float(grid[j]), float(densities[j])))
        for path, leaf in one.items():
            np.testing.assert_allclose(batched[path][j], leaf, rtol=1e-6, atol=1e-7)
    assert not np.allclose(batched["params/Dense_0/kernel"][1], batched["params/Dense_0/kernel"][2])


def test_bad_input(trees):
    b, s, z, fb, fs = trees
    with pytest.raises(ParamarketError, match=r"unknown merge method 'slerp'.*allowed: dare"):
        get_method("slerp")
    with pytest.raises(ParamarketError, match="unknown merge method"):
        merge_with("slerp", b, s, 0.5)
    with pytest.raises(ParamarketError, match="'task_arithmetic' needs the shared base"):
        merge_with("task_arithmetic", b, s, 0.5)
    with pytest.raises(ParamarketError, match="'dare' needs a random key"):
        merge_with("dare", b, s, 0.5, base=z, second=0.2)
    with pytest.raises(ParamarketError, match="'fisher' needs the Fisher pair"):
        merge_with("fisher", b, s, 0.5)
    with pytest.raises(ParamarketError, match="weight vector has 3 entries but .* trades 2"):
        merge_with("linear", b, s, jnp.ones(3))
    with pytest.raises(ParamarketError, match="weight vector has 2 entries but .* trades 1"):
        merge_with("linear", b, s, VECTOR, layers="Dense_0")
    with pytest.raises(ParamarketError, match="scalar or a"):
        merge_with("linear", b, s, jnp.ones((2, 2)))


def test_diagonal_fisher_of_a_linear_model():
    """loss_i = (x_i . w + c - y_i)^2 / 2: gradient r_i x_i for w and r_i for c."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    y = rng.standard_normal(6).astype(np.float32)
    params = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32), "c": jnp.float32(0.3)}

    def losses(p, xb, yb):
        return 0.5 * (xb @ p["w"] + p["c"] - yb) ** 2

    got = diagonal_fisher(losses, params, jnp.asarray(x), jnp.asarray(y))
    r = x @ np.asarray(params["w"]) + 0.3 - y
    np.testing.assert_allclose(got["w"], np.mean((r[:, None] * x) ** 2, axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["c"], np.mean(r**2), rtol=1e-5)
    assert got["c"].shape == ()
