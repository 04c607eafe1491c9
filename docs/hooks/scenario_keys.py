"""mkdocs hook: the scenario-key tables of docs/scenarios.md, generated from the schema.

Every key of :data:`paramarket_jax.scenario.RULES` gets a row: its allowed values (the
rule's own description, the one its error messages print), its default (the scenario
dataclass field) and its meaning (``scenario_keys.toml`` beside this file, the one
hand-written column). The registered datasets, partitioners, models and mechanisms get a
table of their keyword options, read from their factories' signatures. So the page
cannot drift from the code: a key without a meaning, or a meaning without a key, fails the
build (and ``tests/test_docs.py``, which calls :func:`markdown` without mkdocs).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import tomllib

from paramarket_jax import scenario as sc

PAGE = "scenarios.md"  # the page that holds the marker
MARKER = "<!-- scenario keys: generated -->"
MEANINGS_FILE = pathlib.Path(__file__).with_name("scenario_keys.toml")


def meanings() -> dict[str, str]:
    """Dotted key -> its meaning, from ``scenario_keys.toml``."""
    return sc.dotted(tomllib.loads(MEANINGS_FILE.read_text(encoding="utf-8")))


def check_meanings(known: dict[str, str]) -> None:
    """ValueError naming the keys of RULES without a meaning, or meanings of no key."""
    missing = sorted(set(sc.RULES) - set(known))
    stale = sorted(set(known) - set(sc.RULES))
    if missing or stale:
        raise ValueError(
            f"{MEANINGS_FILE.name}: scenario keys without a meaning: {missing}; "
            f"meanings of keys that RULES does not have: {stale}"
        )


def toml(value) -> str:
    """A value as TOML writes it inline (lists on one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def shown(value) -> str:
    """A default as it is written after ``--set`` (bare words are strings), in backticks;
    an empty string is shown as nothing."""
    if value == "":
        return ""
    return f"`{value}`" if isinstance(value, str) else f"`{toml(value)}`"


def allowed(key: str) -> str:
    """The rule's description of what ``key`` takes (a registry's names, for the keys that
    name a registered item)."""
    desc = sc.RULES[key][0]
    return desc() if callable(desc) else desc


def keys_by_section() -> dict[str, list[tuple[str, object]]]:
    """Section prefix -> [(dotted key, default)], in the dataclasses' field order."""
    out: dict[str, list[tuple[str, object]]] = {}
    for prefix, cls in sc.SECTIONS.items():
        rows = []
        for field in dataclasses.fields(cls):
            key = f"{prefix}.{field.name}" if prefix else field.name
            if field.name == "options" or key in sc.SECTIONS:
                continue
            missing = field.default is dataclasses.MISSING
            rows.append((key, field.default_factory() if missing else field.default))
        out[prefix] = rows
    return out


def _cell(text: str, plain: bool = False) -> str:
    """Text for a table cell; ``plain`` (no Markdown in it): backslashes kept as typed."""
    if plain:
        text = text.replace("\\", "\\\\")
    return text.replace("|", "\\|").replace("\n", " ")


def key_tables(known: dict[str, str]) -> list[str]:
    lines = []
    for prefix, rows in keys_by_section().items():
        lines += ["", f"### `[{prefix}]`" if prefix else "### Top level", ""]
        lines += ["| key | default | allowed values | meaning |", "|---|---|---|---|"]
        for key, default in rows:
            cells = [f"`{key}`", shown(default), _cell(allowed(key), plain=True), _cell(known[key])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def option_default(factory, option: str) -> str:
    """`` (default)`` of a factory's keyword option (nothing for a registered table of
    names, which has no signature)."""
    if not callable(factory):
        return ""
    default = inspect.signature(factory).parameters[option].default
    return " (none)" if default is None else f" ({shown(default)})"


def option_tables() -> list[str]:
    """One row per registered item of the tables that take its keyword options."""
    lines = [
        "",
        "### Options of the registered items",
        "",
        "The options of the chosen dataset, partitioner, model and mechanism go in the same "
        "table as its name (`data.modulus`, `data.split.d`, `model.widths`, `mechanism.k`), "
        "read from the signature of the function the name is registered to:",
        "",
        "| table | name | options (default) |",
        "|---|---|---|",
    ]
    for prefix, (name_key, registry) in sc.OPEN_TABLES.items():
        for name, factory in sorted(registry().items()):
            options = [
                o for o in sc.keyword_options(factory) if o not in sc.NOT_OPTIONS.get(prefix, ())
            ]
            listed = ", ".join(f"`{o}`{option_default(factory, o)}" for o in options)
            lines.append(f'| `[{prefix}]` | `{name_key} = "{name}"` | {listed or "none"} |')
    return lines


def markdown() -> str:
    """The generated part of the scenarios page: a table per section, every key of RULES
    in one row, then the registered items' options."""
    known = meanings()
    check_meanings(known)
    covered = {key for rows in keys_by_section().values() for key, _ in rows}
    if covered != set(sc.RULES):
        raise ValueError(f"RULES and the scenario dataclasses differ: {covered ^ set(sc.RULES)}")
    return "\n".join([*key_tables(known), *option_tables(), ""])


def on_page_markdown(markdown_text: str, *, page, config, files) -> str:
    """mkdocs event: put the generated tables where the scenarios page has its marker."""
    if page.file.src_uri != PAGE:
        return markdown_text
    if MARKER not in markdown_text:
        raise ValueError(f"docs/{PAGE} lost its marker {MARKER!r}")
    return markdown_text.replace(MARKER, markdown())
