"""The device-side record of what each simulated speaker did, one JSON document per line.

Tests read it to learn which devices actually played what, without trusting the controller's view.
Every line goes out in a single `write` on an `O_APPEND` descriptor, which Linux appends atomically,
so several fleet processes can share one file without interleaving lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Self


class PlayLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, entry: dict[str, object]) -> None:
        if self._fd is not None:
            os.write(self._fd, (json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_play_log(path: Path) -> list[dict[str, object]]:
    """Every entry of a play log, in the order the lines were written."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
