"""User-facing errors: bad input that the CLI reports in one line with exit code 2."""


class ParamarketError(ValueError):
    """Bad user input (unknown name, out-of-range value, missing or corrupt file)."""


def unknown(kind: str, name: str, allowed) -> ParamarketError:
    """Error for a name that is not in a registry, listing the allowed names."""
    return ParamarketError(f"unknown {kind} {name!r}; allowed: {', '.join(sorted(allowed))}")
