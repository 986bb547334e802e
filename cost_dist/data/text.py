"""Item text: a template over the item's text fields, HTML entities unescaped, whitespace normalised.

The embedding stage embeds the `text` column of items.parquet; this module makes that column.
"""

from __future__ import annotations

import functools
import html
import re
import string
from typing import Any, Iterable, Mapping

import pyarrow as pa

from cost_dist.errors import DataError

# Default templates per dataset (the papers' style: "Field: value." joined by spaces).
DEFAULT_TEMPLATES: dict[str, str] = {
    "synthetic": "Title: {title}. Category: {category}. Description: {description}.",
    "ml-100k": "Title: {title}. Year: {release_year}. Genres: {genres}.",
    "ml-latest-small": "Title: {title}. Genres: {genres}.",
    "amazon-2014": "Title: {title}. Brand: {brand}. Categories: {categories}. Description: {description}.",
    "amazon-lcrec": "Title: {title}. Brand: {brand}. Categories: {categories}. Description: {description}.",
    "mind": "Category: {category}, {subcategory}. Title: {title}. Abstract: {abstract}.",
}

_WHITESPACE = re.compile(r"\s+")


def default_template(fields: Iterable[str]) -> str:
    """"Title: {title}. Genre: {genre}." for the given fields, in order."""
    parts = [f"{f.replace('_', ' ').capitalize()}: {{{f}}}." for f in fields]
    return " ".join(parts)


def template_fields(template: str) -> list[str]:
    """The field names a template uses; a malformed template is a DataError naming it."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise DataError(f"text template {template!r} is malformed: {exc}") from None
    for name in names:
        if name == "" or not name.isidentifier():
            raise DataError(f"text template {template!r}: placeholders must be field names like {{title}}, got {{{name}}}")
    return names


def clean_value(value: Any, unescape_html: bool = True) -> str:
    """One field value as text: None -> "", HTML entities unescaped, runs of whitespace collapsed."""
    if value is None:
        return ""
    text = str(value)
    if unescape_html and "&" in text:
        text = html.unescape(text)
    return _WHITESPACE.sub(" ", text).strip()


_FORMATTER = string.Formatter()
_END_PUNCT = (".", "!", "?")


@functools.lru_cache(maxsize=64)
def _segments(template: str) -> tuple:
    try:
        return tuple(_FORMATTER.parse(template))
    except ValueError as exc:
        raise DataError(f"text template {template!r} is malformed: {exc}") from None


def render_text(fields: Mapping[str, Any], template: str, unescape_html: bool = True) -> str:
    """Fill `template` from `fields`; missing or null fields render empty, HTML entities are unescaped.

    A value that already ends a sentence ("... Torque.") swallows the template's own period after it,
    so the text never reads "Torque.." .
    """
    segments = _segments(template)
    out: list[str] = []
    skip_period = False
    for literal, name, spec, conversion in segments:
        if skip_period and literal.startswith("."):
            literal = literal[1:]
        skip_period = False
        out.append(literal)
        if name is None:
            continue
        value = clean_value(fields.get(name), unescape_html)
        if conversion or spec:
            try:
                if conversion:
                    value = _FORMATTER.convert_field(value, conversion)
                value = _FORMATTER.format_field(value, spec or "")
            except (ValueError, TypeError) as exc:
                raise DataError(f"text template {template!r}: field {name!r} cannot be formatted: {exc}") from None
        out.append(value)
        skip_period = value.endswith(_END_PUNCT)
    return _WHITESPACE.sub(" ", "".join(out)).strip()


def render_column(items: pa.Table, template: str, unescape_html: bool = True) -> pa.Array:
    """The `text` column for an items table: render_text over every row (fields taken from its columns)."""
    names = template_fields(template)
    missing = [n for n in names if n not in items.column_names]
    if missing:
        raise DataError(
            f"text template {template!r} uses field(s) {', '.join(missing)} that the items do not have "
            f"(available: {', '.join(c for c in items.column_names if c != 'item_id')})"
        )
    columns = {n: items.column(n).to_pylist() for n in dict.fromkeys(names)}
    out = []
    for i in range(items.num_rows):
        out.append(render_text({n: col[i] for n, col in columns.items()}, template, unescape_html))
    return pa.array(out, type=pa.string())
