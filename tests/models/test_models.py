"""Models: every registered family honours its permutation spec."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paramarket_jax import ParamarketError
from paramarket_jax.models import (
    MODELS,
    apply_permutation,
    flatten,
    identity_perms,
    invert,
    make_model,
    random_perms,
)
from paramarket_jax.models.spec import check_spec

SMALL = {
    "mlp": {"widths": (12, 10, 8)},
    "cnn": {"channels": (6, 8)},
    "wrn": {"depth": 10, "widen": 1, "base": 4},
    "vit": {"layers": 1, "heads": 2, "d_model": 8, "d_head": 4, "d_mlp": 8},
    # token sequences only: tests/models/test_transformer.py
    "gpt": {"layers": 1, "heads": 2, "d_model": 8, "d_head": 4, "d_mlp": 8},
}
SHAPES = [(8, 8, 1), (20,)]
FEATURE_MODELS = sorted(set(MODELS) - {"gpt"})


def test_every_registered_model_has_small_options():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", FEATURE_MODELS)
@pytest.mark.parametrize("shape", SHAPES, ids=["image", "flat"])
def test_permuting_through_spec_keeps_outputs(name, shape):
    model = make_model(name, shape, 10, **SMALL[name])
    params = jax.jit(model.init)(jax.random.key(0))
    check_spec(model.spec, params)
    perms = random_perms(jax.random.key(1), model.spec)
    assert any(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    permuted = jax.jit(lambda pm, p: apply_permutation(model.spec, pm, p))(perms, params)
    x = jax.random.normal(jax.random.key(2), (7, *shape))
    apply = jax.jit(model.apply)
    out, out_perm = apply(params, x), apply(permuted, x)
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out, out_perm, rtol=1e-5, atol=1e-5)
    # the permutation really moved hidden units: some permuted leaf differs
    diffs = [
        not np.allclose(a, b)
        for a, b in zip(flatten(params).values(), flatten(permuted).values(), strict=True)
    ]
    assert any(diffs)


def test_wrong_permutation_breaks_outputs():
    """A permutation on only one side of a hidden layer changes the function."""
    model = make_model("mlp", (20,), 10, **SMALL["mlp"])
    params = model.init(jax.random.key(0))
    flat = flatten(params)
    flat["params/Dense_0/kernel"] = flat["params/Dense_0/kernel"][:, ::-1]
    from paramarket_jax.models import unflatten

    x = jax.random.normal(jax.random.key(2), (7, 20))
    assert not np.allclose(model.apply(params, x), model.apply(unflatten(flat), x), atol=1e-4)


def test_paper_mlp_preset_shape():
    model = make_model("mlp", (28, 28, 1), 10)
    shapes = [v.shape for k, v in flatten(model.init(jax.random.key(0))).items() if "kernel" in k]
    assert shapes == [(784, 32), (32, 32), (32, 32), (32, 16), (16, 10)]


def test_identity_and_invert():
    model = make_model("mlp", (20,), 10, **SMALL["mlp"])
    params = model.init(jax.random.key(0))
    same = apply_permutation(model.spec, identity_perms(model.spec), params)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, same, params))
    p = jax.random.permutation(jax.random.key(3), 17)
    np.testing.assert_array_equal(p[invert(p)], np.arange(17))


@pytest.mark.parametrize(
    "name, opts, needle",
    [
        ("resnet", {}, "allowed: cnn, gpt, mlp, vit, wrn"),
        ("mlp", {"depth": 3}, "'depth'"),
        ("mlp", {"widths": (0, 4)}, "widths"),
        ("mlp", {"preset": "huge"}, "paper"),
        ("wrn", {"depth": 12}, "6n+4"),
        ("cnn", {"channels": ()}, "channels"),
    ],
)
def test_bad_model_input_is_a_clear_error(name, opts, needle):
    with pytest.raises(ParamarketError, match=re.escape(needle)):
        make_model(name, (8, 8, 1), 10, **opts)
