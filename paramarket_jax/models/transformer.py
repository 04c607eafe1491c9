"""Small pre-LayerNorm transformers: a decoder-only GPT and a vision transformer (ViT).

The attention keeps its head axis explicit, as Flax's ``MultiHeadDotProductAttention``
does: the query, key and value kernels are (d_model, heads, d_head), the output kernel
(heads, d_head, d_model). A head permutation is then an axis permutation, and the
permutation spec (:func:`transformer_axes`) can permute whole heads, then units inside
each head: query and key share one inner permutation per head, value and output another
(both blocked groups of one head set, :class:`~paramarket_jax.models.spec.PermutationSpec`),
the MLP's hidden units per block, and the residual stream either not at all
(``residual="identity"``; Verma and Elbayad, "Merging Text Transformer Models from
Different Initializations", found it best) or by one shared permutation through the
embeddings, every LayerNorm, every block's input and output projections and the
unembedding (``residual="shared"``, as mergekit's ``mergekit-align-model`` does).
Permuting the residual stream commutes with LayerNorm: its mean and variance are taken
over all features, and its scale and bias are permuted with them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

from paramarket_jax.errors import ParamarketError
from paramarket_jax.models.base import Model, build, int_option, option_error

RESIDUALS = ("identity", "shared")
POOLS = ("cls", "mean")
READOUTS = ("last", "all")
MAX_BLOCKS = 64
INIT = nn.initializers.normal(0.02)


# The market vmaps a model over up to five axes (runs, buyers, candidates, merge weights,
# restarts). Each vmap adds one axis to every operand of every matrix product inside, and
# XLA's CPU backend aborts the process on a matrix product whose operand reaches rank 8
# (jaxlib 0.10: "ynn_emitter.cc: Check failed: b_rank < YNN_MAX_TENSOR_RANK"). Every
# product of the transformers therefore goes through :func:`bmm`, a batched matrix product
# whose batching rule folds each vmapped axis into its one batch axis: rank 3 under any
# number of vmaps, gradients included.


@custom_vmap
def _bmm(x, y):
    return jnp.matmul(x, y)


@_bmm.def_vmap
def _bmm_folded(axis_size, in_batched, x, y):
    x, y = (
        v if batched else jnp.broadcast_to(v, (axis_size, *v.shape))
        for v, batched in zip((x, y), in_batched, strict=True)
    )
    out = _bmm(x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:]))
    return out.reshape(axis_size, -1, *out.shape[1:]), True


@jax.custom_vjp
def bmm(x: jax.Array, y: jax.Array) -> jax.Array:
    """(N, M, K) @ (N, K, P) -> (N, M, P), whose operands stay rank 3 under vmap (the
    vmapped axes are folded into N) and under differentiation."""
    return _bmm(x, y)


def _bmm_fwd(x, y):
    return _bmm(x, y), (x, y)


def _bmm_bwd(saved, g):
    x, y = saved
    return _bmm(g, jnp.swapaxes(y, -1, -2)), _bmm(jnp.swapaxes(x, -1, -2), g)


bmm.defvjp(_bmm_fwd, _bmm_bwd)


def _on_tokens(fn, x):
    """``fn`` on the rows of ``x`` (..., d) flattened to (rows, d), the leading axes restored."""
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], *y.shape[1:])


def _linear(rows, kernel, bias):
    """(R, d) @ (d, f) + (f,) through :func:`bmm`."""
    return bmm(rows[None], kernel[None])[0] + bias


class Linear(nn.Module):
    """``nn.Dense`` (same parameters and initialisation) on the flattened rows of a
    (..., d) input, its product through :func:`bmm`."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", INIT, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return _on_tokens(lambda rows: _linear(rows, kernel, bias), x)


class HeadProjection(nn.Module):
    """(B, T, d_model) -> (B, T, heads, d_head); kernel (d_model, heads, d_head), bias
    (heads, d_head): the parameters of Flax's ``DenseGeneral((heads, d_head))``."""

    heads: int
    d_head: int

    @nn.compact
    def __call__(self, x):
        d_model = x.shape[-1]
        kernel = self.param("kernel", INIT, (d_model, self.heads, self.d_head))
        bias = self.param("bias", nn.initializers.zeros, (self.heads, self.d_head))
        width = self.heads * self.d_head

        def project(rows):
            return _linear(rows, kernel.reshape(d_model, width), bias.reshape(width))

        y = _on_tokens(project, x)
        return y.reshape(*x.shape[:-1], self.heads, self.d_head)


class HeadOutput(nn.Module):
    """(B, T, heads, d_head) -> (B, T, d_model); kernel (heads, d_head, d_model), bias
    (d_model,): the parameters of ``DenseGeneral(d_model, axis=(-2, -1))``."""

    d_model: int

    @nn.compact
    def __call__(self, x):
        heads, d_head = x.shape[-2:]
        kernel = self.param("kernel", INIT, (heads, d_head, self.d_model))
        bias = self.param("bias", nn.initializers.zeros, (self.d_model,))
        flat = x.reshape(*x.shape[:-2], heads * d_head)
        return _on_tokens(lambda rows: _linear(rows, kernel.reshape(-1, self.d_model), bias), flat)


class Attention(nn.Module):
    """Multi-head dot-product attention with an explicit head axis in every kernel."""

    heads: int
    d_head: int
    causal: bool

    @nn.compact
    def __call__(self, x):
        b, t, d_model = x.shape

        def project(name):
            # (B, T, heads, d_head) -> (B * heads, T, d_head)
            y = HeadProjection(self.heads, self.d_head, name=name)(x)
            return y.transpose(0, 2, 1, 3).reshape(b * self.heads, t, self.d_head)

        q, k, v = project("query"), project("key"), project("value")
        logits = bmm(q, jnp.swapaxes(k, 1, 2)) / np.sqrt(self.d_head).astype(np.float32)
        if self.causal:
            mask = jnp.tril(jnp.ones((t, t), bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = bmm(weights, v)
        out = out.reshape(b, self.heads, t, self.d_head).transpose(0, 2, 1, 3)
        return HeadOutput(d_model, name="out")(out)


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + fc_out(gelu(fc_in(ln_2(x))))``."""

    heads: int
    d_head: int
    d_mlp: int
    causal: bool

    @nn.compact
    def __call__(self, x):
        d_model = x.shape[-1]
        x = x + Attention(self.heads, self.d_head, self.causal, name="attn")(
            nn.LayerNorm(name="ln_1")(x)
        )
        h = nn.LayerNorm(name="ln_2")(x)
        h = Linear(self.d_mlp, name="fc_in")(h)
        return x + Linear(d_model, name="fc_out")(nn.gelu(h))


class Trunk(nn.Module):
    """The blocks ``block_0..block_{L-1}`` and the final LayerNorm ``ln_f``."""

    layers: int
    heads: int
    d_head: int
    d_mlp: int
    causal: bool

    @nn.compact
    def __call__(self, x):
        for b in range(self.layers):
            x = Block(self.heads, self.d_head, self.d_mlp, self.causal, name=f"block_{b}")(x)
        return nn.LayerNorm(name="ln_f")(x)


class GPT(nn.Module):
    """Decoder-only transformer on token ids (B, T) (stored as float32, exact integers).

    ``readout="last"``: logits (B, num_classes) at the last position (one target per
    sequence, e.g. the answer of ``a op b =``); ``"all"``: (B, T, num_classes), next-token
    logits at every position.
    """

    vocab: int
    context: int
    num_classes: int
    d_model: int
    trunk: Trunk
    readout: str

    @nn.compact
    def __call__(self, x):
        tokens = x.astype(jnp.int32)
        h = nn.Embed(self.vocab, self.d_model, embedding_init=INIT, name="tok_embed")(tokens)
        pos = self.param("pos_embed", INIT, (self.context, self.d_model))
        h = self.trunk(h + pos[: tokens.shape[1]])
        if self.readout == "last":
            h = h[:, -1]
        return Linear(self.num_classes, name="unembed")(h)


class ViT(nn.Module):
    """Vision transformer: non-overlapping patches (square on images, segments of 1-D
    signals), a linear patch embedding, a class token or mean pooling, the blocks, a
    linear classifier ``unembed``."""

    input_shape: tuple[int, ...]
    patch: int
    num_classes: int
    d_model: int
    trunk: Trunk
    pool: str

    @nn.compact
    def __call__(self, x):
        h = Linear(self.d_model, name="patch_embed")(patches(x, self.input_shape, self.patch))
        if self.pool == "cls":
            cls = self.param("cls", INIT, (self.d_model,))
            h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, self.d_model)), h], 1)
        pos = self.param("pos_embed", INIT, (h.shape[1], self.d_model))
        h = self.trunk(h + pos)
        h = h[:, 0] if self.pool == "cls" else h.mean(axis=1)
        return Linear(self.num_classes, name="unembed")(h)


def patches(x: jax.Array, input_shape: tuple[int, ...], patch: int) -> jax.Array:
    """(B, *input_shape) -> (B, tokens, patch values): p x p patches of (H, W, C) images in
    row-major order, or segments of p values of (D,) signals."""
    b = x.shape[0]
    if len(input_shape) == 1:
        return x.reshape(b, input_shape[0] // patch, patch)
    h, w, c = input_shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def transformer_axes(
    layers: int, residual: str, embed: dict[str, tuple], head: str = "params/unembed"
) -> tuple[dict[str, tuple], dict[str, tuple[str, int]]]:
    """Permutation spec of the blocks, ``ln_f`` and the classifier, plus ``embed`` (the
    model's embedding parameters: path -> axes with ``"R"`` where the residual stream is).

    Groups: ``QK_b`` and ``VO_b`` blocked in head set ``H_b`` (heads, then units inside each
    head), ``M_b`` the MLP's hidden units of block b, and ``R`` the residual stream when
    ``residual == "shared"`` (absent, axes None, for ``"identity"``).

    Returns:
        (axes, blocks) for :func:`~paramarket_jax.models.base.build` (blocks: group ->
        (head set, d_head) with the d_head filled in by the caller).
    """
    r = "R" if residual == "shared" else None
    axes = {path: tuple(r if a == "R" else a for a in names) for path, names in embed.items()}

    def norm(prefix):
        axes[f"{prefix}/scale"] = (r,)
        axes[f"{prefix}/bias"] = (r,)

    blocks = {}
    for b in range(layers):
        p = f"params/trunk/block_{b}"
        qk, vo, m = f"QK_{b}", f"VO_{b}", f"M_{b}"
        blocks[qk] = blocks[vo] = f"H_{b}"
        norm(f"{p}/ln_1")
        norm(f"{p}/ln_2")
        for name, group in (("query", qk), ("key", qk), ("value", vo)):
            axes[f"{p}/attn/{name}/kernel"] = (r, group, group)
            axes[f"{p}/attn/{name}/bias"] = (group, group)
        axes[f"{p}/attn/out/kernel"] = (vo, vo, r)
        axes[f"{p}/attn/out/bias"] = (r,)
        axes[f"{p}/fc_in/kernel"] = (r, m)
        axes[f"{p}/fc_in/bias"] = (m,)
        axes[f"{p}/fc_out/kernel"] = (m, r)
        axes[f"{p}/fc_out/bias"] = (r,)
    norm("params/trunk/ln_f")
    axes[f"{head}/kernel"] = (r, None)
    axes[f"{head}/bias"] = (None,)
    return axes, blocks


def head_fan_in(layers: int) -> dict[str, int]:
    """:attr:`~paramarket_jax.models.base.Model.fan_in` of the blocks: the query, key and
    value kernels (d_model, heads, d_head) have one input axis (the other kernels, the
    output's (heads, d_head, d_model) included, have the default ``ndim - 1``)."""
    return {
        f"params/trunk/block_{b}/attn/{name}/kernel": 1
        for b in range(layers)
        for name in ("query", "key", "value")
    }


def _trunk_and_spec(*, layers, heads, d_model, d_head, d_mlp, residual, causal, embed):
    del d_model  # the embeddings set it
    trunk = Trunk(layers, heads, d_head, d_mlp, causal, name="trunk")
    axes, sets = transformer_axes(layers, residual, embed)
    return trunk, axes, {g: (s, d_head) for g, s in sets.items()}


def make_gpt(
    input_shape,
    num_classes: int,
    *,
    vocab: int = 0,
    targets: str = "last",
    layers: int = 2,
    heads: int = 4,
    d_model: int = 32,
    d_head: int = 8,
    d_mlp: int = 64,
    residual: str = "identity",
) -> Model:
    """A small decoder-only GPT; the vocabulary and context length come from the dataset.

    Args:
        input_shape: (T,) token ids per example (the context length).
        num_classes: output vocabulary (answers, or next tokens).
        vocab: input token ids (set from the dataset, not a scenario option).
        targets: ``last`` (one target per sequence) or ``all`` (one per position; set from
            the dataset).
        layers, heads, d_model, d_head, d_mlp: blocks, heads per block, residual width,
            width of each head, MLP hidden width.
        residual: ``identity`` (the residual stream is never permuted) or ``shared`` (one
            permutation through every residual axis).
    """
    options = transformer_options(
        "gpt", layers=layers, heads=heads, d_model=d_model, d_head=d_head, d_mlp=d_mlp,
        residual=residual,
    )  # fmt: skip
    input_shape = tuple(int(d) for d in input_shape)
    if vocab < 1 or len(input_shape) != 1:
        raise ParamarketError(
            f"model 'gpt' needs token sequences (a dataset such as arithmetic, markov or "
            f"pydoc_text), got inputs of shape {input_shape} with no token vocabulary"
        )
    embed = {"params/tok_embed/embedding": (None, "R"), "params/pos_embed": (None, "R")}
    trunk, axes, blocks = _trunk_and_spec(causal=True, embed=embed, **options)
    readout = "last" if targets == "last" else "all"
    module = GPT(vocab, input_shape[0], num_classes, options["d_model"], trunk, readout)
    return build(
        "gpt", module, input_shape, num_classes, axes, blocks, head_fan_in(options["layers"])
    )


def make_vit(
    input_shape,
    num_classes: int,
    *,
    patch: int = 2,
    pool: str = "cls",
    layers: int = 2,
    heads: int = 4,
    d_model: int = 32,
    d_head: int = 8,
    d_mlp: int = 64,
    residual: str = "identity",
) -> Model:
    """A small vision transformer on (H, W, C) images (p x p patches) or (D,) signals
    (segments of p values).

    Args:
        input_shape: (H, W, C) or (D,); the patch size must divide H and W (or D).
        num_classes: output classes.
        patch: patch side (images) or length (signals).
        pool: ``cls`` (a learned class token) or ``mean`` (mean over the patch tokens).
        layers, heads, d_model, d_head, d_mlp, residual: as for :func:`make_gpt`.
    """
    options = transformer_options(
        "vit", layers=layers, heads=heads, d_model=d_model, d_head=d_head, d_mlp=d_mlp,
        residual=residual,
    )  # fmt: skip
    patch, pool = vit_extra(patch=patch, pool=pool)
    input_shape = tuple(int(d) for d in input_shape)
    spatial = input_shape[:1] if len(input_shape) == 1 else input_shape[:2]
    if len(input_shape) not in (1, 3) or any(d % patch for d in spatial):
        raise ParamarketError(
            f"scenario key 'model.patch' must divide the input's sides for model 'vit', got "
            f"{patch} for inputs {input_shape} ((D,) signals or (H, W, C) images)"
        )
    embed = {
        "params/patch_embed/kernel": (None, "R"),
        "params/patch_embed/bias": ("R",),
        "params/pos_embed": (None, "R"),
    }
    if pool == "cls":
        embed["params/cls"] = ("R",)
    trunk, axes, blocks = _trunk_and_spec(causal=False, embed=embed, **options)
    module = ViT(input_shape, patch, num_classes, options["d_model"], trunk, pool)
    return build(
        "vit", module, input_shape, num_classes, axes, blocks, head_fan_in(options["layers"])
    )


def transformer_options(
    model: str,
    *,
    layers: int = 2,
    heads: int = 4,
    d_model: int = 32,
    d_head: int = 8,
    d_mlp: int = 64,
    residual: str = "identity",
) -> dict:
    """The blocks' options of transformer ``model`` (``gpt`` or ``vit``), checked
    (``vocab`` and ``targets`` come from the dataset, not from scenario options).

    Raises:
        ParamarketError: naming the scenario key (``model.layers``, ``model.residual``...).
    """
    if not (isinstance(residual, str) and residual in RESIDUALS):
        raise option_error(model, "residual", "one of " + ", ".join(RESIDUALS), residual)
    return {
        "layers": int_option(model, "layers", layers, 1, MAX_BLOCKS),
        "heads": int_option(model, "heads", heads),
        "d_model": int_option(model, "d_model", d_model),
        "d_head": int_option(model, "d_head", d_head),
        "d_mlp": int_option(model, "d_mlp", d_mlp),
        "residual": residual,
    }


def vit_extra(*, patch: int = 2, pool: str = "cls") -> tuple[int, str]:
    """The ViT's own options, checked: (patch, pool)."""
    if not (isinstance(pool, str) and pool in POOLS):
        raise option_error("vit", "pool", "one of " + ", ".join(POOLS), pool)
    return int_option("vit", "patch", patch), pool


def vit_options(*, patch: int = 2, pool: str = "cls", **options) -> None:
    """:func:`make_vit`'s options, checked."""
    vit_extra(patch=patch, pool=pool)
    transformer_options("vit", **options)


def gpt_options(**options) -> None:
    """:func:`make_gpt`'s options, checked."""
    transformer_options("gpt", **options)
