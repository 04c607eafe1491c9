"""Welfare-maximising assignment with VCG (Clarke pivot) transfers (Nisan et al., AGT ch. 9)."""

import jax
import jax.numpy as jnp
import optax

from paramarket_jax.errors import ParamarketError
from paramarket_jax.mechanisms.base import Knobs, Market, Mechanism, Outcome, candidates


def _max_welfare_slots(profit: jax.Array) -> jax.Array:
    """Exact maximum-weight assignment of buyers to seller slots.

    Args:
      profit: (N, M) float32 >= 0 with M >= N, surplus of buyer i in slot m.

    Returns:
      (N, M) bool, each row with exactly one slot (zero-profit slots mean "no trade").
    """
    rows, cols = optax.assignment.hungarian_algorithm(-profit)
    return jnp.zeros(profit.shape, bool).at[rows, cols].set(True)


def vcg_assignment(capacity: int = 1) -> Mechanism:
    """Efficient assignment of buyers to sellers with agent-level VCG transfers.

    Allocation: each buyer buys from at most one seller, each seller sells at most
    ``capacity`` copies; the assignment maximises reported welfare
    ``W = sum over trades of (bids[i, j] - asks[i, j])`` over candidate pairs with positive
    surplus. It is solved exactly with ``optax.assignment.hungarian_algorithm`` on an
    (N, N * capacity) profit matrix (each seller expanded into ``capacity`` slots).

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

    Cost: 2N + 1 Hungarian solves of size (N, N * capacity), vmapped; O(N^4) per round.

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
        n = market.bids.shape[-1]
        surplus = market.bids - market.asks
        tradable = candidates(market) & (surplus > 0)
        profit = jnp.where(tradable, surplus, 0.0).astype(jnp.float32)

        def welfare_without(drop_rows, drop_cols):  # (N,) bool each: agents' roles removed
            keep = ~drop_rows[:, None] & ~drop_cols[None, :]
            p = jnp.repeat(jnp.where(keep, profit, 0.0), capacity, axis=1)
            slots = _max_welfare_slots(p)
            return (slots * p).sum(), slots

        none = jnp.zeros((n,), bool)
        welfare, slots = welfare_without(none, none)
        alloc = slots.reshape(n, n, capacity).any(-1) & tradable
        # W_{-k} (agent k removed) and W_{-row k} (only k's buying removed): 2N more solves.
        eye = jnp.eye(n, dtype=bool)
        drop_rows = jnp.concatenate([eye, eye])
        drop_cols = jnp.concatenate([eye, jnp.zeros_like(eye)])
        without, _ = jax.vmap(welfare_without)(drop_rows, drop_cols)
        without_agent, without_buying = without[:n], without[n:]

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

    return Mechanism(
        name="vcg_assignment",
        run=run,
        claims=frozenset({"feasible", "individually_rational", "truthful", "efficient"}),
        exclusive=True,
        capacity=capacity,
        domain="any",
    )
