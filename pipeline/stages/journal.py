"""Inputs that kill their worker: a node-local journal of what each decode batch was doing when its process died.

Ray re-runs a read-and-decode task whose worker dies (an out-of-memory kill, a crash inside a decoder), and
would re-run it forever if one input kills every attempt. Each attempt appends what it is about to do to a
small file named after its batch: "parallel" before the parallel reads, "r<i>" before reading input i alone,
"d<i>" before decoding input i. A finished batch deletes its file, so a file found at the start of an attempt
means every earlier attempt died, each at its last line. An input named by the last line of
KILLS_BEFORE_FAILING attempts becomes a failed row; after a death during the parallel reads, the next attempt
reads one input at a time, so the culprit is named.

The file lives on the node's disk: no store request is added per batch. A retry scheduled on another node
starts a count of its own there, so an input fails after at most KILLS_BEFORE_FAILING deaths per node.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

KILLS_BEFORE_FAILING = 2
JOURNAL_DIR_ENV = "LGCA_DECODE_JOURNAL_DIR"  # default: <temp dir>/lgca-decode-journal
_PARALLEL_READS = "parallel"


class DecodeJournal:
    """One batch's journal; `with DecodeJournal.open(run_id, keys) as journal:` around reading and decoding it."""

    def __init__(self, path: Path, previous: Sequence[str]) -> None:
        self._path = path
        attempts = _split_attempts(previous)
        culprits = Counter(attempt[-1] for attempt in attempts if attempt)
        self.deaths = len(attempts)
        self._kills = {int(event[1:]): count for event, count in culprits.items() if event[:1] in ("r", "d")}
        # The last death came during the parallel reads: read one at a time now, to find the input.
        self.read_one_at_a_time = bool(attempts) and attempts[-1][-1:] == [_PARALLEL_READS]
        self._file = path.open("a", encoding="ascii")
        self._write("start")

    @classmethod
    def open(cls, run_id: str, keys: Sequence[str]) -> DecodeJournal:
        """The journal of the batch holding `keys`, in run `run_id` (a retried task gets the same batch)."""
        digest = hashlib.blake2b(run_id.encode(), digest_size=16)
        for key in keys:
            digest.update(key.encode("utf-8", "surrogatepass") + b"\0")
        directory = Path(os.environ.get(JOURNAL_DIR_ENV) or Path(tempfile.gettempdir(), "lgca-decode-journal"))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{digest.hexdigest()}.log"
        previous = path.read_text(encoding="ascii").split() if path.exists() else []
        return cls(path, previous)

    def kills(self, index: int) -> int:
        """How many earlier attempts died while reading or decoding input `index` of the batch."""
        return self._kills.get(index, 0)

    def poisoned(self, index: int) -> bool:
        return self.kills(index) >= KILLS_BEFORE_FAILING

    def reading_all(self) -> None:
        self._write(_PARALLEL_READS)

    def reading(self, index: int) -> None:
        self._write(f"r{index}")

    def decoding(self, index: int) -> None:
        self._write(f"d{index}")

    def decoded_all(self) -> None:
        self._write("decoded")  # a death after this (building the batch) blames no input

    def __enter__(self) -> DecodeJournal:
        return self

    def __exit__(self, error_type: object, *rest: object) -> None:
        self._file.close()
        if error_type is None:
            self._path.unlink(missing_ok=True)

    def _write(self, event: str) -> None:
        # Unbuffered to the kernel: a SIGKILLed process leaves what it wrote (no fsync: a node crash loses the
        # journal, and the retry runs on another node anyway).
        self._file.write(event + "\n")
        self._file.flush()


def _split_attempts(events: Sequence[str]) -> list[list[str]]:
    attempts: list[list[str]] = []
    for event in events:
        if event == "start":
            attempts.append([])
        elif attempts:
            attempts[-1].append(event)
    return attempts
