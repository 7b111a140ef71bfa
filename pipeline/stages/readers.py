"""Readers: how the samples a shard lists become bytes. One small interface, so an input format is one class.

A reader takes the listing rows of one batch and returns, per row, the sample's bytes or the error that kept
them from being read. Reads are bounded in size (`--max-bytes`) and time (`--read-timeout`), and each reader
tells the batch's journal what it is doing, so an input that kills its worker is named and skipped next time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pipeline.config import DecodeConfig
from pipeline.stages.journal import DecodeJournal
from pipeline.stages.storage import check_scheme, read_all, read_bytes, read_options

READ_THREADS = 8  # concurrent reads per batch: object-store latency, not CPU, bounds reading


class SampleReader(Protocol):
    def read(self, paths: Sequence[str], journal: DecodeJournal) -> list[bytes | Exception]:
        """The bytes of each sample, or the error that kept it from being read; poisoned samples keep b""."""
        ...


class FileReader:
    """One image per file or object (folders, globs, files, manifests' path columns), read in parallel."""

    def __init__(self, decode: DecodeConfig, storage_options: Mapping[str, Any]) -> None:
        self.decode = decode
        self.storage_options = dict(storage_options)

    def _read_one(self, path: str) -> bytes:
        check_scheme(path, self.decode.allowed_schemes)  # before any request: a manifest must not choose what workers fetch
        return read_bytes(path, read_options(path, self.storage_options), max_bytes=self.decode.max_bytes)

    def read(self, paths: Sequence[str], journal: DecodeJournal) -> list[bytes | Exception]:
        readable = [i for i in range(len(paths)) if not journal.poisoned(i)]
        timeout = self.decode.read_timeout_s
        if not journal.read_one_at_a_time:
            journal.reading_all()
            found = read_all([paths[i] for i in readable], self._read_one, READ_THREADS, timeout)
        else:  # the last attempt died during parallel reads: one at a time, so the journal names the culprit
            found = []
            for i in readable:
                journal.reading(i)
                found.extend(read_all([paths[i]], self._read_one, 1, timeout))
        contents: list[bytes | Exception] = [b""] * len(paths)  # poisoned inputs keep b"": their rows never read it
        for i, content in zip(readable, found):
            contents[i] = content
        return contents
