"""Welfare-maximising assignment with VCG (Clarke pivot) transfers (Nisan et al., AGT ch. 9)."""

import jax.numpy as jnp

from paramarket_jax.errors import ParamarketError
from paramarket_jax.mechanisms.assignment import leave_one_out
from paramarket_jax.mechanisms.base import Knobs, Market, Mechanism, Outcome, candidates


def vcg_outcome(market: Market, capacity: int, optima=leave_one_out) -> Outcome:
    """:func:`vcg_assignment`'s outcome; ``optima(profit, capacity)`` gives the assignment
    and the leave-one-out optima (:func:`~paramarket_jax.mechanisms.assignment.leave_one_out`,
    or ``reference_leave_one_out``, the 2N + 1 full solves, for the benchmark's baseline)."""
    n = market.bids.shape[-1]
    surplus = market.bids - market.asks
    tradable = candidates(market) & (surplus > 0)
    profit = jnp.where(tradable, surplus, 0.0).astype(jnp.float32)

    slots, welfare, without_agent, without_buying = optima(
        jnp.repeat(profit, capacity, axis=1), capacity
    )
    alloc = slots.reshape(n, n, capacity).any(-1) & tradable

    value = jnp.where(alloc, market.bids, 0.0).sum(1)  # v_k, (N,)
    cost = jnp.where(alloc, market.asks, 0.0).sum(0)  # C_k, (N,)
    bought = alloc.any(1)
    sold = alloc.any(0)
    # Clips below only remove rounding: 0 <= R_b <= R, and R <= v for a pure buyer.
    rebate = jnp.maximum(welfare - without_agent, 0.0)
    rebate = jnp.where(sold, rebate, jnp.minimum(rebate, value))
    rebate = jnp.where(bought | sold, rebate, 0.0)
    buyer_rebate = jnp.clip(welfare - without_buying, 0.0, rebate)
    payment = jnp.where(bought, value - jnp.where(sold, buyer_rebate, rebate), 0.0)
    receipt = jnp.where(sold, cost + rebate - jnp.where(bought, buyer_rebate, 0.0), 0.0)
    price = jnp.where(alloc, payment[:, None], 0.0)
    return Outcome(alloc=alloc, price=price, payment=payment, receipt=receipt)


def vcg_assignment(capacity: int = 1) -> Mechanism:
    """Efficient assignment of buyers to sellers with agent-level VCG transfers.

    Allocation: each buyer buys from at most one seller, each seller sells at most
    ``capacity`` copies; the assignment maximises reported welfare
    ``W = sum over trades of (bids[i, j] - asks[i, j])`` over candidate pairs with positive
    surplus. It is solved exactly by the Hungarian algorithm on an (N, N * capacity) profit
    matrix (each seller expanded into ``capacity`` slots), the same algorithm and tie-breaks
    as ``optax.assignment.hungarian_algorithm``, with its dual potentials kept.

    Transfers: an agent reports a bid row and an ask column (it may buy and sell in the same
    round), so VCG treats the agent as one player. With ``W_{-k}`` the optimum without agent k
    (its row and column removed), ``R_k = W - W_{-k} >= 0`` is its marginal contribution and
    its net transfer is ``payment[k] - receipt[k] = v_k - C_k - R_k`` (``v_k``: bid of its
    purchase; ``C_k``: its asks over the copies it sells), so its utility is exactly ``R_k``
    and truthful reporting is dominant. Removing the agent, not its buying and selling roles
    one at a time, is what keeps agents that are on both sides truthful. The net transfer is
    split into a buyer's payment and a seller's receipt as follows:

    - a pure buyer pays ``v_k - R_k`` (the Clarke price) and receives nothing;
    - a pure seller receives ``C_k + R_k`` and pays nothing;
    - an agent that buys and sells pays the Clarke price of its buying role alone,
      ``v_k - (W - W_{-row k})`` with ``W_{-row k}`` the optimum without k's bids, and
      receives the rest, ``C_k + R_k - (W - W_{-row k}) >= C_k``.

    So a buyer pays at most its bid and at least the ask of the seller it buys from, a
    seller receives at least its asks, and ``price`` is each buyer's payment on its trade.

    Budget: not balanced. Each seller is paid its marginal contribution, so the broker runs
    a deficit whenever sellers are pivotal, even with zero asks (Myerson-Satterthwaite: no
    efficient, truthful, individually rational two-sided mechanism balances its budget).
    ``payment.sum() - receipt.sum()`` (usually negative) is the broker's subsidy.

    Cost: one Hungarian solve, then every ``W_{-k}`` and ``W_{-row k}`` from its optimum and
    potentials (:func:`paramarket_jax.mechanisms.assignment.leave_one_out`): removing an
    agent frees at most ``1 + capacity`` matches, each put back by one shortest augmenting
    path on the reduced costs, vmapped over the 2N problems; O(N^3) per round for capacity
    1 (the 2N + 1 full solves it replaces were O(N^4)).

    Args:
      capacity: copies each seller may sell per round, static, >= 1.

    Returns:
      Mechanism claiming feasible, individually rational, truthful and efficient on every
      market (buyers and sellers alike).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ParamarketError(
            f"vcg_assignment option capacity must be an integer >= 1, got {capacity!r}"
        )

    def run(market: Market, knobs: Knobs) -> Outcome:
        del knobs
        return vcg_outcome(market, capacity)

    return Mechanism(
        name="vcg_assignment",
        run=run,
        claims=frozenset({"feasible", "individually_rational", "truthful", "efficient"}),
        exclusive=True,
        capacity=capacity,
        domain="any",
    )
