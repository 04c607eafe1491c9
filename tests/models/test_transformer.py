"""Transformers: head-aware permutation specs keep the function; mixing heads does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paramarket_jax import ParamarketError
from paramarket_jax.broker.align import compose
from paramarket_jax.models import (
    apply_permutation,
    flatten,
    invert,
    make_model,
    random_perms,
)
from paramarket_jax.models.base import example_losses
from paramarket_jax.models.spec import blocked, check_spec, is_blocked

TINY = {"layers": 2, "heads": 3, "d_model": 12, "d_head": 4, "d_mlp": 10}
VOCAB, CONTEXT = 11, 6
# (name, input shape, extra options): a GPT reading out the last position and every
# position, a ViT on 8x8 images with a class token and on 1-D signals with mean pooling
CASES = [
    ("gpt", (CONTEXT,), {"vocab": VOCAB}),
    ("gpt", (CONTEXT,), {"vocab": VOCAB, "targets": "all"}),
    ("vit", (8, 8, 1), {"patch": 2}),
    ("vit", (20,), {"patch": 4, "pool": "mean"}),
]
IDS = ["gpt-last", "gpt-all", "vit-image", "vit-signal"]


def inputs(name, shape, key):
    if name == "gpt":
        return jax.random.randint(key, (5, *shape), 0, VOCAB).astype(jnp.float32)
    return jax.random.normal(key, (5, *shape))


def noisy(params, key, scale=0.4):
    """Parameters far from the 0.02-scale initialisation, so logits differ visibly."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


@pytest.fixture(scope="module", params=[(c, r) for c in range(4) for r in ("identity", "shared")])
def built(request):
    case, residual = request.param
    name, shape, extra = CASES[case]
    model = make_model(name, shape, 7, residual=residual, **TINY, **extra)
    params = noisy(model.init(jax.random.key(0)), jax.random.key(1))
    x = inputs(name, shape, jax.random.key(2))
    return model, params, x, jax.jit(model.apply)


def test_spec_covers_parameters_and_names_heads(built):
    model, params, _, _ = built
    check_spec(model.spec, params)
    spec = model.spec
    assert set(spec.head_sets) == {"H_0", "H_1"}
    assert spec.head_sets["H_0"] == ("QK_0", "VO_0")
    assert spec.heads("QK_1") == (3, 4) and spec.sizes["VO_0"] == 12
    assert ("R" in spec.sizes) == (spec.axes["params/trunk/ln_f/scale"] == ("R",))
    kernel = flatten(params)["params/trunk/block_0/attn/query/kernel"]
    assert kernel.shape == (12, 3, 4)  # (d_model, heads, d_head): the head axis explicit
    assert flatten(params)["params/trunk/block_0/attn/out/kernel"].shape == (3, 4, 12)


def test_every_permutation_the_spec_allows_keeps_logits(built):
    model, params, x, apply = built
    out = apply(params, x)
    for seed in range(3):
        perms = random_perms(jax.random.key(10 + seed), model.spec)
        for g in model.spec.blocks:
            assert bool(is_blocked(perms[g], model.spec.heads(g)[0]))
        moved = apply_permutation(model.spec, perms, params)
        assert not np.allclose(
            flatten(moved)["params/trunk/block_0/attn/query/kernel"],
            flatten(params)["params/trunk/block_0/attn/query/kernel"],
        )
        np.testing.assert_allclose(apply(moved, x), out, rtol=1e-4, atol=1e-5)
        back = apply_permutation(model.spec, {g: invert(p) for g, p in perms.items()}, moved)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(a, b)


def test_mixing_units_across_heads_changes_logits(built):
    """A permutation of a head set's flattened units that is not blocked breaks the
    function, so the invariance test above can fail."""
    model, params, x, apply = built
    perms = random_perms(jax.random.key(3), model.spec)
    mixed = dict(perms)
    mixed["QK_0"] = jax.random.permutation(jax.random.key(4), 12).astype(jnp.int32)
    assert not bool(is_blocked(mixed["QK_0"], 3))
    out, bad = apply(params, x), apply(apply_permutation(model.spec, mixed, params), x)
    assert np.abs(np.asarray(out) - np.asarray(bad)).max() > 1e-3
    # so does moving the query/key heads without the value/output heads
    split = dict(perms)
    split["QK_0"] = blocked(jnp.array([1, 2, 0]), jnp.tile(jnp.arange(4), (3, 1)))
    split["VO_0"] = blocked(jnp.arange(3), jnp.tile(jnp.arange(4), (3, 1)))
    bad = apply(apply_permutation(model.spec, split, params), x)
    assert np.abs(np.asarray(out) - np.asarray(bad)).max() > 1e-3


def test_compose_and_invert_keep_perms_blocked():
    model = make_model("gpt", (CONTEXT,), 7, vocab=VOCAB, **TINY)
    p, q = (random_perms(jax.random.key(k), model.spec) for k in (0, 1))
    through = compose(p, q)  # q's units into p's basis through a shared reference
    for g in model.spec.blocks:
        assert bool(is_blocked(p[g][q[g]], 3)) and bool(is_blocked(invert(p[g]), 3))
        assert bool(is_blocked(through[g], 3))
        np.testing.assert_array_equal(through[g], q[g][invert(p[g])])


def test_readout_shapes_and_one_loss_for_both_target_kinds():
    last = make_model("gpt", (CONTEXT,), 7, vocab=VOCAB, **TINY)
    every = make_model("gpt", (CONTEXT,), 7, vocab=VOCAB, targets="all", **TINY)
    x = inputs("gpt", (CONTEXT,), jax.random.key(0))
    assert last.apply(last.init(jax.random.key(0)), x).shape == (5, 7)
    assert every.apply(every.init(jax.random.key(0)), x).shape == (5, CONTEXT, 7)
    logits = jax.random.normal(jax.random.key(1), (5, CONTEXT, 7))
    y = jax.random.randint(jax.random.key(2), (5, CONTEXT), 0, 7)
    y = y.at[0, 3:].set(-1)  # padded positions count in neither loss nor accuracy
    loss, correct = example_losses(logits, y)
    logp = jax.nn.log_softmax(logits)
    for i in range(5):
        keep = np.asarray(y[i]) >= 0
        ce = -np.asarray(logp[i])[keep, np.asarray(y[i])[keep]].mean()
        hit = (np.asarray(logits[i]).argmax(-1) == np.asarray(y[i]))[keep].mean()
        np.testing.assert_allclose(loss[i], ce, rtol=1e-5)
        np.testing.assert_allclose(correct[i], hit, rtol=1e-6)
    # one target per example: the classification loss as before
    flat_loss, flat_correct = example_losses(logits[:, 0], y[:, 1])
    ce = -np.asarray(logp[:, 0])[np.arange(5), np.asarray(y[:, 1])]
    np.testing.assert_allclose(flat_loss, ce, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "shape", "options", "message"),
    [
        ("gpt", (8, 8, 1), {}, "needs token sequences"),
        ("vit", (8, 8, 1), {"patch": 3}, "model.patch"),
        ("vit", (8, 8, 1), {"pool": "max"}, "model.pool"),
        ("vit", (8, 8, 1), {"residual": "all"}, "model.residual"),
        ("gpt", (6,), {"vocab": 5, "heads": 0}, "model.heads"),
        ("gpt", (6,), {"vocab": 5, "layers": 65}, "model.layers"),
    ],
)
def test_bad_transformer_options_are_one_line_errors(name, shape, options, message):
    with pytest.raises(ParamarketError, match=message) as info:
        make_model(name, shape, 7, **options)
    assert "\n" not in str(info.value)


def test_layer_patterns_name_blocks_attention_and_mlps():
    from paramarket_jax.broker.merge import select_layers

    model = make_model("gpt", (CONTEXT,), 7, vocab=VOCAB, **TINY)
    params = model.init(jax.random.key(0))
    block_1 = select_layers(params, ["block_1/*"])
    assert block_1 == select_layers(params, ["block_1"]) and len(block_1) == 16
    assert all("/block_1/" in p for p in block_1)
    attention = select_layers(params, ["*attn*"])
    assert len(attention) == 2 * 8 and all("/attn/" in p for p in attention)
    mlps = select_layers(params, ["*fc_*"])
    assert len(mlps) == 2 * 4 and not mlps & attention
    with pytest.raises(ParamarketError, match="names no parameter"):
        select_layers(params, ["block_7/*"])


@pytest.mark.parametrize("case", range(4), ids=IDS)
def test_products_stay_below_rank_8_under_five_vmaps(case):
    """XLA's CPU backend aborts the process on a matrix product with an operand of rank 8
    (jaxlib 0.10); the market vmaps models over up to five axes (runs, buyers, candidates,
    merge weights, restarts). In the program lowered for CPU, training included, no matrix
    product has an operand of rank 8."""
    import re

    name, shape, extra = CASES[case]
    model = make_model(name, shape, 7, **TINY, **extra)
    params = model.init(jax.random.key(0))
    x = inputs(name, shape, jax.random.key(1))
    y = jnp.zeros((5, *((CONTEXT,) if extra.get("targets") == "all" else ())), jnp.int32)

    def loss(p, x, y):
        return model.losses(p, x, y)[0].mean()

    fn = jax.grad(loss)
    for _ in range(5):
        fn = jax.vmap(fn)

    def grow(v):
        return jnp.broadcast_to(v, (1,) * 5 + v.shape)

    text = jax.jit(fn).lower(jax.tree.map(grow, params), grow(x), grow(y)).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    ranks = [
        len(t.split("x")) - 1
        for line in dots
        for t in re.findall(r"tensor<([0-9x]+)f32>", line.split(":")[-1])
    ]
    assert dots and max(ranks) <= 7, max(ranks)
