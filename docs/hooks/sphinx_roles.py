"""griffe extension: the code's Sphinx roles as links of the API reference.

The docstrings name other objects the Sphinx way (``:func:`align```, ``:class:`~paramarket_jax.
engines.mesa.MarketModel```), which Markdown would print as written. Once a package is
loaded, every role becomes an optional cross-reference (mkdocs-autorefs): a link where the
named object has a page here, its name in code type where it has none (a private helper, or
a module left out of the reference), never a warning. A name is looked up in the scope of
the docstring's object (its members, then its parents' and their imports), as Python reads
it; a ``~`` shows only the last component.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`(~?)([^`]+)`")


def target(obj: griffe.Object, name: str) -> str:
    """The full path ``name`` means in ``obj``'s docstring (itself where it is unknown)."""
    first, _, rest = name.partition(".")
    if first == obj.package.name:
        return name
    scope = obj if obj.is_class or obj.is_module else obj.parent
    try:
        path = scope.resolve(first)
    except (griffe.NameResolutionError, AttributeError):
        return name
    return f"{path}.{rest}" if rest else path


def link(obj: griffe.Object, match: re.Match) -> str:
    short, name = match[1] == "~", match[2].removesuffix("()")
    title = name.rsplit(".", 1)[-1] if short else name
    ident = html.escape(target(obj, name), quote=True)
    return f'<autoref identifier="{ident}" optional><code>{html.escape(title)}</code></autoref>'


def rewrite(obj: griffe.Object) -> None:
    """Rewrite the roles of ``obj``'s docstring and of its members' (not of aliases)."""
    if obj.docstring is not None:
        obj.docstring.value = ROLE.sub(lambda m: link(obj, m), obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            rewrite(member)


class SphinxRoles(griffe.Extension):
    """After a package is loaded (every name defined), rewrite its docstrings' roles."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        rewrite(pkg)
