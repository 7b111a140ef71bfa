"""What one run did, as a record and as the line `lgca run` prints at the end."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.schema import OK


@dataclass(frozen=True)
class RunSummary:
    """What one run did."""

    output: str
    inputs: int  # images in the plan
    already_done: int  # images in shards a previous attempt committed
    rows_written: int  # rows committed by this run
    counts: dict[str, int]  # rows per status over the whole output
    seconds: float  # wall time of the whole run
    label_seconds: float  # time from the first labelling work to the last commit
    first_rows_seconds: float  # from the first labelling work to the first committed shard
    steady_images_per_second: float  # rows/s after the first committed shard
    skipped_files: int  # non-image files found while listing
    shards: int = 0  # shards in the plan
    shards_written: int = 0  # shards committed by this run
    plan_seconds: float = 0.0  # listing and planning; 0 when the plan was reused

    @property
    def images_per_second(self) -> float:
        return self.rows_written / self.label_seconds if self.label_seconds > 0 else 0.0

    def _pace(self) -> str:
        then = f", then {_rate(self.steady_images_per_second)} images/s" if self.steady_images_per_second else ""
        return f"first rows after {self.first_rows_seconds:.1f} s{then}"

    def line(self) -> str:
        errors = sum(v for k, v in self.counts.items() if k != OK)
        detail = ", ".join(f"{k} {v}" for k, v in self.counts.items() if k != OK and v)
        return (
            f"lgca: {self.inputs} images ({self.already_done} already done), {self.rows_written} rows written: "
            f"{self.counts.get(OK, 0)} ok, {errors} errors{f' ({detail})' if detail else ''}; "
            f"{_rate(self.images_per_second)} images/s ({self._pace()}); "
            f"{self.skipped_files} non-image files skipped; {self.shards_written}/{self.shards} shards this run; output {self.output}"
        )


def _rate(per_second: float) -> str:
    """Three significant digits (0.213, 21.3), whole numbers from 1000 on: slow LGCA rates must not round to 0.2."""
    return f"{per_second:.0f}" if per_second >= 1000 else f"{per_second:.3g}"
