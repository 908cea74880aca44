"""Progress bars for long steps (calibration capture, tuning, search generations) that stay out of logs.

:func:`steps` shows a transient ``rich`` bar on stderr only when stderr is a terminal (or
``QCOMPILE_PROGRESS=1`` asks for it) and there is more than one step; otherwise it costs nothing and
prints nothing, so CI logs get no bar redraws.  Commands that report in plain lines (``search``,
``finetune``) keep those lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator


def enabled() -> bool:
    flag = os.environ.get("QCOMPILE_PROGRESS", "")
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


@contextlib.contextmanager
def steps(title: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(description=None)``: one step done (optionally renaming the bar)."""
    if total <= 1 or not enabled():
        yield lambda description=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(title, total=total)

        def advance(description: str | None = None) -> None:
            bar.update(task, advance=1, **({"description": description} if description else {}))

        yield advance
