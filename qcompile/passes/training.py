"""What the training passes (``finetune``, ``distill``) share: a teacher and a progress callback given
at construction, and JSON-safe numbers for their stats."""

from __future__ import annotations

import math
from typing import Any, Callable

from qcompile.passes.base import Pass


def finite(v: float) -> float | None:
    """``v`` rounded to 6 decimals, or None when it is NaN or infinite (stats must stay valid JSON)."""
    return None if math.isnan(v) or math.isinf(v) else round(float(v), 6)


class TrainingPass(Pass):
    """A pass that trains the graph against a teacher.

    ``teacher``: a graph (or, for ``distill``, a callable ``feed -> outputs``) to match; None uses
    ``ctx.original``, the graph the pipeline started from.  ``progress``: True shows a transient
    per-epoch line on a terminal, False nothing, a callable receives each epoch's numbers."""

    def __init__(self, options: Any = None, *, teacher: Any = None,
                 progress: bool | Callable[[dict[str, float]], Any] = True, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.teacher, self.progress = teacher, progress
