"""Market, knob, outcome and mechanism types shared by every mechanism (Nisan et al., AGT ch. 9)."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

CLAIMS = frozenset(
    {
        "feasible",
        "individually_rational",
        "weakly_budget_balanced",
        "strongly_budget_balanced",
        "truthful",
        "truthful_buyers",
        "efficient",
    }
)
"""Properties a mechanism may claim; ``tests/test_mechanisms.py`` checks each one it claims.

- ``feasible``: trades only on candidate pairs, never ``i == j``, each buyer buys from at most
  one seller, an exclusive seller sells at most ``capacity`` licences.
- ``individually_rational``: under truthful reports no buyer pays more than its bid for what
  it gets and no seller receives less than its asks for what it sells.
- ``weakly_budget_balanced``: ``payment.sum() >= receipt.sum()`` (the broker never pays in).
- ``strongly_budget_balanced``: ``payment.sum() == receipt.sum()``.
- ``truthful``: reporting true values (an agent's bid row and ask column) is a dominant
  strategy on the mechanism's ``domain``.
- ``truthful_buyers``: the same, for buyers' bids only (sellers' asks are reserve prices that
  a seller may gain by raising).
- ``efficient``: the allocation maximises reported surplus ``sum(bids - asks)`` over feasible
  allocations on the mechanism's ``domain``.
"""

DOMAINS = ("any", "single_seller", "homogeneous")
"""Market classes on which ``truthful`` / ``truthful_buyers`` / ``efficient`` claims hold.

- ``any``: every market.
- ``single_seller``: the mask has candidates in one seller column only.
- ``homogeneous``: each buyer bids the same for every seller (``bids[i, j] = v_i``) and each
  seller asks the same of every buyer (``asks[i, j] = c_j``).

Other claims (feasible, individually rational, budget balance) hold on every market.
"""


class Market(NamedTuple):
    """Reported values of one round; fixed shapes, "no candidate" is a mask.

    Attributes:
      bids: (N, N) float32, ``bids[i, j]`` is buyer i's bid for seller j's weights.
      asks: (N, N) float32 >= 0, ``asks[i, j]`` is seller j's ask (reservation price) for
        selling to buyer i.
      mask: (N, N) bool, the pair (buyer i, seller j) is a candidate; the diagonal is ignored.
    """

    bids: jax.Array
    asks: jax.Array
    mask: jax.Array


class Knobs(NamedTuple):
    """Numeric knobs and per-round inputs that are not reports; a sweep is a ``vmap``.

    Attributes:
      reserve: () float32, reserve price of the auctions.
      beta: () float32 in [0, 1], buyer bargaining power of ``nash_bargaining`` (clipped).
      posted: (N,) float32, price posted by each seller for ``posted_price``.
      roles: (N,) bool, True where the agent trades as a buyer in mechanisms that put each
        agent on one side only (``mcafee_double``); False puts it on the selling side.
    """

    reserve: jax.Array
    beta: jax.Array
    posted: jax.Array
    roles: jax.Array


class Outcome(NamedTuple):
    """What a mechanism decides; ``payment.sum() - receipt.sum()`` is the broker's surplus.

    Attributes:
      alloc: (N, N) bool, buyer i buys from seller j.
      price: (N, N) float32, what buyer i pays for the pair (i, j); 0 where not allocated.
      payment: (N,) float32, what each agent pays as a buyer, always ``price.sum(1)``.
      receipt: (N,) float32, what each agent receives as a seller; ``price.sum(0)`` for
        strongly budget-balanced mechanisms, otherwise set by the mechanism.
    """

    alloc: jax.Array
    price: jax.Array
    payment: jax.Array
    receipt: jax.Array


class Mechanism(NamedTuple):
    """A price-setting mechanism: a pure, jittable ``run`` plus the properties it claims.

    Attributes:
      name: registry name.
      run: ``run(market, knobs) -> Outcome``, pure, jittable and vmappable over both.
      claims: subset of ``CLAIMS`` that the tests check on random markets.
      exclusive: True if each seller sells at most ``capacity`` licences per round; False
        if copies are non-rival and a seller may sell to any number of buyers.
      capacity: licences per seller when ``exclusive``, else None.
      domain: one of ``DOMAINS``, the markets on which truthfulness / efficiency are claimed.
    """

    name: str
    run: Callable[[Market, Knobs], Outcome]
    claims: frozenset[str]
    exclusive: bool
    capacity: int | None
    domain: str


def default_knobs(n: int) -> Knobs:
    """Default knobs for N agents: no reserve, even bargaining power, zero posted prices.

    The default roles put agents ``0 .. ceil(N/2) - 1`` on the buying side and the rest on
    the selling side; set ``roles`` per round (for example at random, with a key) to vary it.

    Args:
      n: number of agents N.

    Returns:
      Knobs with ``reserve`` (), ``beta`` (), ``posted`` (N,) and ``roles`` (N,).
    """
    return Knobs(
        reserve=jnp.zeros((), jnp.float32),
        beta=jnp.full((), 0.5, jnp.float32),
        posted=jnp.zeros((n,), jnp.float32),
        roles=jnp.arange(n) < (n + 1) // 2,
    )


def candidates(market: Market) -> jax.Array:
    """Candidate pairs with the diagonal removed: (N, N) bool."""
    n = market.mask.shape[-1]
    return market.mask.astype(bool) & ~jnp.eye(n, dtype=bool)


def best_per_row(score: jax.Array, ok: jax.Array) -> jax.Array:
    """One-hot of the highest ``score`` among ``ok`` entries of each row.

    Args:
      score: (N, N) float, what a buyer maximises over sellers.
      ok: (N, N) bool, allowed entries; a row without any gets an all-False row. A
        non-finite score is never allowed (NaN would otherwise win the argmax).

    Returns:
      (N, N) bool with at most one True per row.
    """
    ok = ok & jnp.isfinite(score)
    masked = jnp.where(ok, score, -jnp.inf)
    best = jnp.argmax(masked, axis=1)
    onehot = jax.nn.one_hot(best, score.shape[1], dtype=bool)
    return onehot & ok


def outcome_from_prices(alloc: jax.Array, price: jax.Array) -> Outcome:
    """Outcome in which every trade's price goes from buyer to seller (strong budget balance).

    Args:
      alloc: (N, N) bool allocation.
      price: (N, N) float, price of each pair (ignored where not allocated).

    Returns:
      Outcome with ``payment = price.sum(1)`` and ``receipt = price.sum(0)``.
    """
    price = jnp.where(alloc, price, 0.0).astype(jnp.float32)
    return Outcome(alloc=alloc, price=price, payment=price.sum(1), receipt=price.sum(0))
