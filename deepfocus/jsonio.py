"""JSON that every reader accepts: non-finite floats (a median that does not exist) as null."""
from __future__ import annotations

import math
from typing import Any


def json_safe(v: Any) -> Any:
    """``v`` with NaN and infinities replaced by None, through dicts, lists and tuples; Python's ``json`` would write
    them as ``NaN``, which other JSON readers refuse."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v
