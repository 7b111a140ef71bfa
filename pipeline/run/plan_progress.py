"""Progress of a run over its plan: images and shards done, ok and failed, rate and ETA; a bar on a terminal."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

from pipeline.progress import duration
from pipeline.schema import OK

INTERVAL_S = 30.0  # one line per interval in a log; a terminal gets a live bar instead

log = logging.getLogger(__name__)


class Progress:
    """Counts what this run committed against what the plan holds, and reports it."""

    def __init__(
        self,
        images: int | None,
        shards: int | None,
        done_images: int,
        done_shards: int,
        stream: IO[str] | None = None,
        interval_s: float = INTERVAL_S,
        uncounted: int = 0,
        estimate: int = 0,
    ) -> None:
        """`images` and `shards` are the plan's; None while it is still being listed (`planned` sets them).
        `uncounted`: shards whose images are counted only as they are read (WebDataset tars)."""
        self.images = images
        self.shards = shards
        self.uncounted = uncounted
        self.estimate = estimate  # images the uncounted shards likely hold (img2dataset's statistics), 0: unknown
        self.done_images = done_images
        self.done_shards = done_shards
        self._first_shards = done_shards  # shards done before this run
        self.counts: dict[str, int] = {}
        self.started = time.time()
        self._stream = stream or sys.stderr
        self._interval_s = interval_s
        self._last = self.started  # the first line after one interval, once a rate means something
        self._rows = 0  # committed by this run
        self._bar: Any = None
        if getattr(self._stream, "isatty", lambda: False)():
            from tqdm import tqdm

            total = None if uncounted and not estimate else images + estimate if images is not None else None  # tars: counted as read
            self._bar = tqdm(total=total, initial=done_images, unit="img", file=self._stream, dynamic_ncols=True, desc="lgca")

    def planned(self, images: int, shards: int, uncounted: int = 0, estimate: int = 0) -> None:
        """The plan's totals, once its listing has ended."""
        self.images, self.shards, self.uncounted, self.estimate = images, shards, uncounted, estimate
        if self._bar is not None:
            self._bar.total = None if uncounted and not estimate else images + estimate
            self._bar.refresh()

    def committed(self, counts: dict[str, int]) -> None:
        """One shard committed by this run, with its rows per status."""
        rows = sum(counts.values())
        self._rows += rows
        self.done_images += rows
        self.done_shards += 1
        for status, count in counts.items():
            self.counts[status] = self.counts.get(status, 0) + count
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif time.time() - self._last >= self._interval_s:
            self._last = time.time()
            print(self.line(), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def rate(self) -> float:
        seconds = time.time() - self.started
        return self._rows / seconds if seconds > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        if self.images is None:
            return (
                f"lgca: {self.done_images:,} images, {self.done_shards} shards labelled while the listing goes on; "
                f"{self._postfix()}; {rate:.3g} images/s"
            )
        if self.uncounted and self.estimate:  # tars are counted as they are read: img2dataset's statistics estimate them
            total = self.images + self.estimate
            left = max(0, total - self.done_images)
            eta = duration(left / rate) if rate > 0 else "unknown"
            return (
                f"lgca: {self.done_images:,}/~{total:,} images (estimated from img2dataset's statistics), "
                f"{self.done_shards}/{self.shards} shards; {self._postfix()}; {rate:.3g} images/s; ETA {eta}"
            )
        if self.uncounted and self.shards:  # tars are counted as they are read: the ETA goes by shards
            left_shards = self.shards - self.done_shards
            per_shard = (time.time() - self.started) / max(1, self.done_shards - self._first_shards)
            eta = duration(left_shards * per_shard) if self.done_shards > self._first_shards else "unknown"
            return (
                f"lgca: {self.done_images:,} images so far (tars are counted as they are read), {self.done_shards}/{self.shards} "
                f"shards; {self._postfix()}; {rate:.3g} images/s; ETA {eta} (by shards)"
            )
        left = self.images - self.done_images
        eta = duration(left / rate) if rate > 0 else "unknown"
        percent = 100.0 * self.done_images / self.images if self.images else 100.0
        return (
            f"lgca: {self.done_images:,}/{self.images:,} images ({percent:.1f}%), {self.done_shards}/{self.shards} shards; "
            f"{self._postfix()}; {rate:.3g} images/s; ETA {eta}"
        )

    def _postfix(self) -> str:
        failed = sum(count for status, count in self.counts.items() if status != OK)
        return f"ok {self.counts.get(OK, 0):,}, failed {failed:,} this run"
