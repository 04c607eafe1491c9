"""Maximum-weight assignment with its dual potentials, and every leave-one-out optimum from it.

The Hungarian algorithm here is the shortest-augmenting-path (Jonker-Volgenant / e-maxx)
form that ``optax.assignment.hungarian_algorithm`` vectorises, with the same float
operations in the same order, so it finds the same assignment; unlike optax's it returns
the dual potentials. From one optimal assignment and its potentials, removing a row (an
agent's bids) or a row and a set of columns (the agent and its seller slots) raises some
costs to the "no trade" cost 0 and frees at most ``1 + capacity`` matches; the potentials
stay feasible, so re-inserting the freed rows takes one shortest augmenting path each, on
the reduced costs (O(M^2) each). All 2N leave-one-out optima of VCG then cost O(N^3) for
capacity 1 instead of 2N more full solves (O(N^4)).

Conventions (those of the e-maxx form): rows and columns are 1-based inside the state,
index 0 of ``v`` / ``parent`` is the virtual start column, ``parent[j]`` is the row of
column ``j`` (0: free), ``u`` has one spare entry at the end that absorbs masked updates.
The leave-one-out problems are made square (M x M) with dummy rows of cost 0 that hold the
columns no real row takes, so the potentials need no sign condition.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Solution(NamedTuple):
    """An optimal assignment of the rows of an (R, M) cost matrix, R <= M, with potentials.

    Attributes:
      parent: (M + 1,) int, the 1-based row of each 1-based column (0: free), index 0 the
        virtual column.
      u: (R + 2,) row potentials (index r for 1-based row r, the last entry a dump).
      v: (M + 1,) column potentials; ``cost[r-1, j-1] - u[r] - v[j] >= 0``, equal on the
        assigned pairs.
    """

    parent: jax.Array
    u: jax.Array
    v: jax.Array


def _insert(costs_of, sol: Solution, row, blocked=None) -> Solution:
    """Insert 1-based ``row`` (unassigned, potentials feasible, assigned pairs tight) by one
    shortest augmenting path; ``costs_of(r)`` gives row r's costs (M,). ``row = 0`` is a
    no-op (the path search and the walk back stop at once). ``blocked`` ((M,) bool, or
    None): columns removed from the problem, never entered."""
    u, v, parent = sol.u, sol.v, sol.parent
    cols = v.shape[0] - 1
    parent = parent.at[0].set(row)
    used = jnp.zeros(cols + 1, bool)
    if blocked is not None:
        used = used.at[1:].set(blocked)

    def search(state):
        u, v, used, tree, minv, path, col = state
        used = used | (jnp.arange(used.shape[0]) == col)  # dense: no scatter in the loop
        unused = ~used[1:]
        r = parent[col]
        tree = tree | (jnp.arange(tree.shape[0]) == r)  # the rows of the used columns
        cur = costs_of(r) - u[r] - v[1:]
        cur = jnp.where(unused, cur, jnp.inf)
        path = jnp.where(cur < minv, col, path)
        minv = jnp.where(cur < minv, cur, minv)
        masked = jnp.where(unused, minv, jnp.inf)
        delta = masked.min()
        # argmin's first minimum, by two plain min-reductions (XLA's CPU argmin is slow)
        col = jnp.min(jnp.where(masked == delta, jnp.arange(cols), cols)) + 1
        u = jnp.where(tree, u + delta, u)  # optax's scatter-add, without the scatter
        v = jnp.where(used, v - delta, v)
        minv = jnp.where(unused, minv - delta, minv)
        return u, v, used, tree, minv, path, col

    state = (u, v, used, jnp.zeros(u.shape[0], bool))
    state = (*state, jnp.full(cols, jnp.inf, u.dtype), jnp.zeros(cols, jnp.int32), jnp.int32(0))
    u, v, _, _, _, path, col = lax.while_loop(lambda s: parent[s[-1]] != 0, search, state)

    def back(state):
        parent, col = state
        prev = path[col - 1]
        return parent.at[col].set(parent[prev]), prev

    parent, _ = lax.while_loop(lambda s: s[1] != 0, back, (parent, col))
    return Solution(parent=parent.at[0].set(0), u=u, v=v)


def solve(cost: jax.Array) -> Solution:
    """Minimum-cost assignment of every row of ``cost`` ((R, M), R <= M) to its own column.

    The same algorithm and float operations as ``optax.assignment.hungarian_algorithm``
    (so the same assignment under ties), returning the potentials too.
    """
    rows, cols = cost.shape
    sol = Solution(
        parent=jnp.zeros(cols + 1, jnp.int32),
        u=jnp.zeros(rows + 2, cost.dtype),
        v=jnp.zeros(cols + 1, cost.dtype),
    )

    def body(sol, r):
        return _insert(lambda i: cost[i - 1, :], sol, r + 1), None

    sol, _ = lax.scan(body, sol, jnp.arange(rows, dtype=jnp.int32))
    return sol


def squared(sol: Solution, rows: int) -> Solution:
    """The same optimum as a square problem: dummy rows ``rows + 1 .. M`` (cost 0 to every
    column, potential 0) take the free columns in order. Feasible because every column
    potential of :func:`solve` is <= 0 and a free column's is 0."""
    cols = sol.v.shape[0] - 1
    free = sol.parent[1:] == 0
    dummy = rows + jnp.cumsum(free).astype(jnp.int32)
    parent = sol.parent.at[1:].set(jnp.where(free, dummy, sol.parent[1:]))
    u = jnp.zeros(cols + 2, sol.u.dtype).at[: rows + 1].set(sol.u[: rows + 1])
    return Solution(parent=parent, u=u, v=sol.v)


def without(cost: jax.Array, square: Solution, row, agent, slots: jax.Array):
    """The optimum without agent ``row``'s bids (``agent`` False) or without the agent, its
    bids and its seller slots (``agent`` True), from the square optimum and its potentials.

    Removing rows and columns keeps the potentials feasible and the remaining pairs tight.
    Without its bids, ``row`` becomes a dummy (cost 0 everywhere, its potential still
    feasible) and is put back by one augmenting path. Without the agent, its row and slots
    go with the dummies on them; the real rows on its slots (at most ``capacity``) are put
    back one path each, into its old column and, where they are more, into the columns of
    as many dummies taken out; where none is displaced and its column is freed, it stays as
    a dummy to fill it.

    Args:
      cost: (R, M) float costs <= 0 (minus the profits), the matrix ``square`` solved.
      square: :func:`squared` of :func:`solve` ``(cost)``.
      row: () int, the agent (0-based row).
      agent: () bool, remove the agent's slots too.
      slots: (C,) int, the agent's 0-based columns (its seller slots).

    Returns:
      ``(parent, blocked)``: (M + 1,) the new 1-based row of each 1-based column (rows > R
      are dummies) and (M,) bool the removed columns.
    """
    rows, cols = cost.shape
    held = square.parent[1:]
    mine = held == row + 1  # the agent's column
    blocked = agent & (jnp.arange(cols) // slots.shape[0] == row)
    displaced = blocked & (held >= 1) & (held <= rows) & ~mine
    lost = (blocked & mine).any()  # it held one of its own slots: no column is freed
    need = displaced.sum() - jnp.where(lost, 0, 1)  # rows to place less free columns
    dummies = ~blocked & (held > rows)
    taken = dummies & (jnp.cumsum(dummies) <= need)  # dummies out, their columns freed
    stays = ~agent | (need < 0)  # the agent stays as a dummy and is put back
    todo = jnp.where(displaced[slots], held[slots], 0)
    todo = todo.at[0].set(jnp.where(stays, row + 1, todo[0])).astype(jnp.int32)
    free = mine | taken | blocked
    sol = square._replace(parent=square.parent.at[1:].set(jnp.where(free, 0, held)))

    def costs_of(r):  # 1-based; dummies (r > R) and the agent without its bids cost 0
        base = cost[jnp.clip(r - 1, 0, rows - 1), :]
        return jnp.where((r > rows) | (r - 1 == row), 0.0, base).astype(cost.dtype)

    def body(sol, r):
        return _insert(costs_of, sol, r, blocked), None

    sol, _ = lax.scan(body, sol, todo)
    return sol.parent, blocked


def _value(profit: jax.Array, parent: jax.Array, row, drop_cols: jax.Array) -> jax.Array:
    """Total profit of the real rows' columns in ``parent``, less ``row``'s and the dropped
    columns' (their profits are 0 in that problem)."""
    rows = profit.shape[0]
    r = parent[1:]
    real = (r >= 1) & (r <= rows) & (r != row + 1) & ~drop_cols
    gained = jnp.take_along_axis(profit, jnp.clip(r - 1, 0, rows - 1)[None, :], axis=0)[0]
    return jnp.where(real, gained, 0.0).sum()


def leave_one_out(profit: jax.Array, capacity: int):
    """The maximum-profit assignment and every agent's leave-one-out optima, from one solve.

    Args:
      profit: (N, N * capacity) float32 >= 0, agent i's profit in slot m (seller ``m //
        capacity``); zero-profit slots mean "no trade".
      capacity: slots per seller.

    Returns:
      ``(slots, welfare, without_agent, without_buying)``: (N, M) bool, the optimal
      assignment (each row one slot); () its profit; (N,) the optimum without agent k (its
      row and its slots), and (N,) without k's row only.
    """
    n, cols = profit.shape
    cost = -profit
    sol = solve(cost)
    none = jnp.zeros(cols, bool)
    slots = sol.parent[1:][None, :] == jnp.arange(1, n + 1, dtype=jnp.int32)[:, None]
    welfare = _value(profit, sol.parent, -1, none)
    square = squared(sol, n)
    agents = jnp.arange(n, dtype=jnp.int32)
    own = agents[:, None] * capacity + jnp.arange(capacity, dtype=jnp.int32)[None, :]
    row = jnp.concatenate([agents, agents])
    agent = jnp.arange(2 * n) < n
    own = jnp.concatenate([own, own])
    parents, blocked = jax.vmap(lambda r, a, s: without(cost, square, r, a, s))(row, agent, own)
    values = jax.vmap(lambda p, r, d: _value(profit, p, r, d))(parents, row, blocked)
    return slots, welfare, values[:n], values[n:]


def reference_leave_one_out(profit: jax.Array, capacity: int):
    """:func:`leave_one_out` by 2N + 1 full solves (``optax.assignment.hungarian_algorithm``
    on the zeroed profits, vmapped), O(N^4): the tests' oracle and the benchmark's
    baseline."""
    import optax

    n, cols = profit.shape
    agents = jnp.arange(n)

    def optimum(drop_row, drop_cols):  # (N,) and (M,) bool
        p = jnp.where(drop_row[:, None] | drop_cols[None, :], 0.0, profit)
        rows, col = optax.assignment.hungarian_algorithm(-p)
        slots = jnp.zeros(p.shape, bool).at[rows, col].set(True)
        return (slots * p).sum(), slots

    welfare, slots = optimum(jnp.zeros(n, bool), jnp.zeros(cols, bool))
    eye = agents[:, None] == agents[None, :]
    drop = jnp.arange(cols)[None, :] // capacity == agents[:, None]
    without_agent, _ = jax.vmap(optimum)(eye, drop)
    without_buying, _ = jax.vmap(optimum)(eye, jnp.zeros_like(drop))
    return slots, welfare, without_agent, without_buying
