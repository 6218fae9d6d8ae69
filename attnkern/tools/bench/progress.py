"""A progress bar on stderr: tqdm if installed, else rich, else (and when stderr is not a terminal) a
plain line every 5% of the steps."""
from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """`advance(what)` after each step of `total`; `close()` at the end."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO = None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self._bar = self._rich = None
        if not enabled:
            self.kind = "off"
            return
        if not getattr(self.stream, "isatty", lambda: False)():
            self.kind = "plain"  # a log file: a line now and then, no carriage returns
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True, leave=True)
            self.kind = "tqdm"
            return
        except ImportError:
            pass
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(console=Console(file=self.stream), transient=False)
            self._task = self._rich.add_task("bench", total=total)
            self._rich.start()
            self.kind = "rich"
            return
        except ImportError:
            pass
        self.kind = "plain"

    def advance(self, what: str) -> None:
        self.done += 1
        if self.kind == "tqdm":
            self._bar.set_description_str(what[:60], refresh=False)
            self._bar.update(1)
        elif self.kind == "rich":
            self._rich.update(self._task, advance=1, description=what[:60])
        elif self.kind == "plain":
            every = max(1, self.total // 20)
            if self.done % every == 0 or self.done == self.total:
                print(f"[{self.done}/{self.total}] {what}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.kind == "tqdm":
            self._bar.close()
        elif self.kind == "rich":
            self._rich.stop()
