"""Trade-reduction double auction (McAfee 1992, "A dominant strategy double auction", JET)."""

import jax.numpy as jnp

from paramarket_jax.mechanisms.base import Knobs, Market, Mechanism, Outcome, candidates


def mcafee_double() -> Mechanism:
    """Exclusive sales between buyers and sellers of homogeneous units, McAfee's rule.

    Sides: ``knobs.roles[k]`` puts agent k on the buying (True) or selling (False) side for
    the round; an agent on both sides could move the price it pays with its ask, so each
    agent takes one side. The roles are an input, never derived from reports.

    Units: the goods are treated as homogeneous, conservatively, so that any pairing is fair:

    - participating sellers: on the selling side with a candidate buyer on the buying side;
    - participating buyers: on the buying side and a candidate of *every* participating
      seller (so any pairing is a candidate pair); buyer i's value is its *lowest* bid over
      them, ``v_i = min_j bids[i, j]``, what any seller's unit is worth to it at least;
    - seller j's cost is its *highest* ask over participating buyers, ``c_j = max_i asks[i, j]``.

    Rule: sort buyers by ``v`` descending (``b_1 >= b_2 >= ...``) and sellers by ``c``
    ascending (``s_1 <= s_2 <= ...``); ``k`` is the number of pairs with ``b_l >= s_l``. If a
    (k+1)-th buyer and seller exist and ``p0 = (b_{k+1} + s_{k+1}) / 2`` lies in
    ``[s_k, b_k]``, the top k buyers and sellers all trade at ``p0``. Otherwise the top k - 1
    trade (trade reduction): buyers pay ``b_k``, sellers receive ``s_k``, and the broker keeps
    ``(k - 1) (b_k - s_k) >= 0``. The l-th buyer buys from the l-th seller.

    Claims: individually rational and weakly budget balanced on every market (because of the
    conservative values above); truthful on homogeneous markets (``bids[i, j] = v_i``,
    ``asks[i, j] = c_j``), for buyers and sellers, where the units really are alike. It
    gives up at most one efficient trade, so it does not claim efficiency.

    Returns:
      Mechanism claiming feasible, individually rational, weakly budget balanced and
      truthful on homogeneous markets.
    """

    def run(market: Market, knobs: Knobs) -> Outcome:
        n = market.bids.shape[-1]
        buyer = knobs.roles.astype(bool)
        pairs = candidates(market) & buyer[:, None] & ~buyer[None, :]
        sells = ~buyer & pairs.any(0)  # participating sellers, (N,)
        buys = buyer & sells.any() & (pairs | ~sells[None, :]).all(1)  # (N,)
        value = jnp.where(sells[None, :], market.bids, jnp.inf).min(1)
        cost = jnp.where(buys[:, None], market.asks, -jnp.inf).max(0)
        sells = sells & buys.any()
        value = jnp.where(buys, value, -jnp.inf)
        cost = jnp.where(sells, cost, jnp.inf)

        b_order = jnp.argsort(-value)  # buyers, best first
        s_order = jnp.argsort(cost)  # sellers, cheapest first
        b = value[b_order]
        s = cost[s_order]
        k = (b >= s).sum()  # efficient number of trades (a prefix, as b falls and s rises)
        b_k = b[jnp.maximum(k - 1, 0)]
        s_k = s[jnp.maximum(k - 1, 0)]
        nxt = jnp.minimum(k, n - 1)
        has_next = (k < buys.sum()) & (k < sells.sum())
        p0 = 0.5 * (jnp.where(has_next, b[nxt], 0.0) + jnp.where(has_next, s[nxt], 0.0))
        full = has_next & (k > 0) & (s_k <= p0) & (p0 <= b_k)
        trades = jnp.where(full, k, jnp.maximum(k - 1, 0))
        buy_price = jnp.where(full, p0, b_k)
        sell_price = jnp.where(full, p0, s_k)

        rank_trades = jnp.arange(n) < trades
        alloc = jnp.zeros((n, n), bool).at[b_order, s_order].set(rank_trades)
        price = jnp.where(alloc, buy_price, 0.0).astype(jnp.float32)
        receipt = jnp.where(alloc.any(0), sell_price, 0.0).astype(jnp.float32)
        return Outcome(alloc=alloc, price=price, payment=price.sum(1), receipt=receipt)

    return Mechanism(
        name="mcafee_double",
        run=run,
        claims=frozenset(
            {"feasible", "individually_rational", "weakly_budget_balanced", "truthful"}
        ),
        exclusive=True,
        capacity=1,
        domain="homogeneous",
    )
