"""When splitting a batch at an exit pays: the profitability check of the runner's device path.

After exit l, the samples still undecided can be copied into a smaller batch (a *split*: a gather
of their hidden state) for the later segments, or the batch can go on together, the samples that
could have left riding along (their answers are kept: the logits of the exit the policy chose). On a
CPU a segment's time grows with its rows, and a split nearly always pays. On a GPU a segment's time
can be nearly flat in the rows up to a size where the device fills, and then splitting 256 rows
into 200 saves nothing and costs the gather. The latency profile measured on the serving device
(:class:`pcee.latency.LatencyProfile`, ``pcee profile``) says what each exit costs at several batch
sizes; the check reads the time of the later segments at ``n`` rows off it (piecewise linear in the
rows between the profiled sizes, flat below the smallest, per-sample constant above the largest) and
splits when the smaller batch saves at least ``min_gain`` of that time. A batch that nobody needs any
more (every sample decided) always stops. Without a profile every split is made (the CPU's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # read by attribute only: pcee.latency imports the device path
    from pcee.latency import LatencyProfile

#: a split must save this share of the later segments' time: it pays a gather of the survivors' state
#: and the profile's own noise
MIN_GAIN = 0.05


@dataclass(frozen=True)
class SplitCheck:
    """Whether going on with ``n_go`` rows instead of ``n_run`` after exit ``level`` pays (see the module docstring)."""

    profile: LatencyProfile | None = None
    min_gain: float = MIN_GAIN

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.min_gain) < 1.0:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")

    def pays(self, level: int, n_run: int, n_go: int) -> bool:
        """True: compact the ``n_go`` rows that go on (padding included) out of the ``n_run`` that ran."""
        if n_go <= 0 or self.profile is None:
            return True  # nobody goes on (the batch stops), or no profile: every split is made
        if n_go >= n_run:
            return False
        return self.rest_s(level, n_go) <= (1.0 - self.min_gain) * self.rest_s(level, n_run)

    def rest_s(self, level: int, rows: int) -> float:
        """Seconds the segments after exit ``level`` take on a batch of ``rows`` rows, by the profile."""
        assert self.profile is not None
        return self._batch_s(rows, self.profile.num_exits - 1) - self._batch_s(rows, level)

    def _batch_s(self, rows: int, level: int) -> float:
        assert self.profile is not None
        sizes = np.asarray(self.profile.batch_sizes, dtype=np.float64)
        order = np.argsort(sizes)
        sizes = sizes[order]
        totals = sizes * self.profile.per_sample_s[order, level]  # a whole batch's time at each profiled size
        if rows > sizes[-1]:
            return float(rows * self.profile.per_sample_s[order[-1], level])
        return float(np.interp(rows, sizes, totals))  # flat below the smallest size
