"""Registry of price-setting mechanisms by name (Nisan et al., AGT ch. 9; Krishna; McAfee 1992)."""

import inspect
from collections.abc import Callable

from paramarket_jax.errors import ParamarketError, unknown
from paramarket_jax.mechanisms.auctions import first_price, k_vickrey, second_price
from paramarket_jax.mechanisms.bargaining import nash_bargaining
from paramarket_jax.mechanisms.base import Mechanism
from paramarket_jax.mechanisms.double import mcafee_double
from paramarket_jax.mechanisms.posted import posted_price, take_it
from paramarket_jax.mechanisms.vcg import vcg_assignment

MECHANISMS: dict[str, Callable[..., Mechanism]] = {
    "take_it": take_it,
    "posted_price": posted_price,
    "nash_bargaining": nash_bargaining,
    "first_price": first_price,
    "second_price": second_price,
    "k_vickrey": k_vickrey,
    "vcg_assignment": vcg_assignment,
    "mcafee_double": mcafee_double,
}
"""Mechanism factories by name; keyword arguments are static options (shapes, counts)."""

MAX_COUNT = 1 << 16
"""Largest integer static option (a count such as ``k`` or ``capacity``): counts shape the
compiled program, so absurd ones would exhaust memory instead of failing clearly."""


def options(name: str) -> dict[str, object]:
    """Static options of mechanism ``name`` with their defaults."""
    if name not in MECHANISMS:
        raise unknown("mechanism", name, MECHANISMS)
    params = inspect.signature(MECHANISMS[name]).parameters.values()
    return {p.name: p.default for p in params}


def make_mechanism(name: str, **static_options) -> Mechanism:
    """Build the mechanism registered as ``name`` with its static options.

    Args:
      name: a key of ``MECHANISMS``.
      **static_options: options of that factory, e.g. ``k`` for ``k_vickrey`` or
        ``capacity`` for ``vcg_assignment``.

    Returns:
      The Mechanism.

    Raises:
      ParamarketError: for an unknown name, an unknown option or a bad option value.
    """
    allowed = options(name)
    for key, value in static_options.items():
        if key not in allowed:
            if not allowed:
                raise ParamarketError(f"mechanism {name!r} takes no options, got {key!r}")
            raise unknown(f"option of mechanism {name!r}", key, allowed)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if type(allowed[key]) is int and not (is_int and value <= MAX_COUNT):
            raise ParamarketError(  # the factory checks the lower bound of a valid integer
                f"mechanism {name!r}: option {key} must be an integer >= 1 and at most "
                f"{MAX_COUNT} (scenario key 'mechanism.{key}'), got {value!r}"
            )
    return MECHANISMS[name](**static_options)
