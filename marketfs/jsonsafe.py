"""JSON that PostgreSQL's ``json``/``jsonb`` accepts, whatever a validator or a delivery hands over.

Python's ``json`` writes NaN and infinities as the bare tokens ``NaN``/``Infinity``, which are not
JSON: PostgreSQL refuses them (``invalid input syntax for type json``), and a verdict about a bad
bar would be lost to the very value it is about. Non-finite numbers become the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (PostgreSQL's own spellings), everywhere in a structure.
"""

from __future__ import annotations

import json
import math
from typing import Any

NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def finite_safe(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by its string spelling.

    Numpy and pandas scalars become plain Python values first (``.item()``); other objects a JSON
    encoder cannot write become their ``str``.
    """
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):  # an array of several items: keep it whole, as a string
            return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else NON_FINITE[str(value)]
    if isinstance(value, dict):
        return {str(k): finite_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [finite_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def dumps(value: Any) -> str:
    """``value`` as strict JSON text (no NaN/Infinity tokens), ready for a ``jsonb`` parameter."""
    return json.dumps(finite_safe(value), allow_nan=False)
