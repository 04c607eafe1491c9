"""Traced programs kept beside the compilation cache, so a warm run does not trace again.

JAX's persistent cache (:mod:`paramarket_jax.engines.cache`) saves compiling, but every
process still traces and lowers the market's program before it can look the executable
up: about 4 s of a warm run on two CPU cores. :func:`call` saves the lowered program
itself with :mod:`jax.export` in ``<cache folder>/programs/``, keyed by the program's name,
its static arguments, the shapes and dtypes of its inputs, the JAX version and a hash of
this package's source (a changed line of code never runs a stale program), and the next
process deserialises it instead of tracing; its executable then comes from the
compilation cache. Results are the same, bit for bit (the exported module is the jitted
one).

Off (a plain call) when the cache is off, under ``jax.distributed`` or a sharded spec (the
exported program would need its shardings), with the host solver (``broker.solver =
"callback"``: a host callback cannot be exported), inside a trace, or without the
``flatbuffers`` package :mod:`jax.export` serialises with. An unreadable file is traced
again with the cache's one warning (:func:`paramarket_jax.engines.cache.one_warning`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pathlib
import warnings

import jax
import jaxlib

from paramarket_jax.engines import cache
from paramarket_jax.market import types
from paramarket_jax.results.folders import write_into

PACKAGE = pathlib.Path(__file__).resolve().parents[1]
FOLDER = "programs"
# the pytree types of the programs' outputs that need not appear in their inputs (a
# program's other NamedTuple types, optax's states among them, are read off its inputs)
SERIALIZED = (types.RoundRecord, types.Trades, types.Flows)


@functools.cache
def source_hash() -> str:
    """A hash of every Python file of this package (what a traced program depends on)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _exporter():
    """jax.export, or None without flatbuffers (jax.export's serialisation needs it)."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        return None
    from jax import export

    return export


# NamedTuple types registered with jax.export in this process (once each)
_REGISTERED: set = set()


def _register(export, args) -> None:
    """Register every NamedTuple type of ``args``' pytree (and :data:`SERIALIZED`) with
    jax.export under its import path, so exported programs (de)serialise them."""
    found = set(SERIALIZED)

    def walk(treedef):
        node = treedef.node_data()
        if node is not None and issubclass(node[0], tuple) and hasattr(node[0], "_fields"):
            found.add(node[0])
        for child in treedef.children():
            walk(child)

    walk(jax.tree.structure(args))
    for cls in found - _REGISTERED:
        name = f"{cls.__module__}.{cls.__qualname__}"
        export.register_namedtuple_serialization(cls, serialized_name=name)
        _REGISTERED.add(cls)


def _key(name: str, static: tuple, args: tuple) -> str:
    avals = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), args)
    text = repr((name, static, str(jax.tree.structure(args)), jax.tree.leaves(avals)))
    versions = (jax.__version__, jaxlib.__version__, jax.default_backend(), source_hash())
    return hashlib.sha256((text + repr(versions)).encode()).hexdigest()[:32]


def _usable(args: tuple) -> bool:
    if cache.folder() is None or jax.process_count() > 1:
        return False
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def call(name: str, fun, static: tuple, *args, exportable: bool = True):
    """``fun(*static, *args)`` (``fun`` jitted with ``static`` as its static arguments),
    through a saved exported program when one fits, else traced, exported and saved.

    ``exportable``: the caller's word that the program can be exported (False for one that
    holds a host callback or runs sharded over several devices): then a plain call."""
    export = _exporter()
    if not exportable or export is None or not _usable(args):
        return fun(*static, *args)
    _register(export, args)
    folder = cache.folder()
    key = _key(name, static, args)
    loaded = _LOADED.get((folder, key))
    if loaded is None:
        loaded = _LOADED[(folder, key)] = jax.jit(_program(export, folder, name, key, fun,
                                                           static, args).call)  # fmt: skip
    return loaded(*args)


# programs already deserialised or exported in this process, jitted (a second call with the
# same shapes compiles nothing, as a jitted function's second call does not)
_LOADED: dict = {}


def _program(export, folder: pathlib.Path, name: str, key: str, fun, static: tuple, args):
    """The saved program of ``key``, or ``fun`` traced and exported (and saved)."""
    path = folder / FOLDER / f"{name}-{key}.jaxexport"
    if path.is_file():
        try:
            return export.deserialize(bytearray(path.read_bytes()))
        except Exception as err:  # a corrupt or truncated file: trace it again
            warnings.warn(f"{cache.BAD_ENTRY} for {path.name!r}: {err}", stacklevel=3)
    program = export.export(jax.jit(lambda *a: fun(*static, *a)))(*args)
    try:  # a pytree type jax.export cannot serialise only means tracing again next time
        data = bytes(program.serialize())
    except (ValueError, TypeError):
        return program
    # atomic (whole or absent); a folder that cannot be written only means tracing again
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_into(path.parent, {path.name: data}, last=path.name)
    return program
