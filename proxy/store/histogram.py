"""Duration histograms of the rollup tables: 56 logarithmic buckets, and percentiles read from them.

Bucket 0 holds durations under FIRST_MS; bucket i (1..54) holds FIRST_MS * RATIO**(i-1) <= d <
FIRST_MS * RATIO**i; bucket 55 holds everything from FIRST_MS * RATIO**54 (about 2 hours) up. A
percentile read from the counts lies within one bucket of the true one: each bucket spans 30% of its
lower bound, so an interpolated value is off by at most about 15% of it. Pure code, no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

BUCKETS = 56
FIRST_MS = 5.0
RATIO = 1.3
RESOLUTION = f"±15% ({BUCKETS} log buckets, ratio {RATIO}, from {FIRST_MS:g} ms)"
BUCKET_COLUMNS: tuple[str, ...] = tuple(f"h{i:02d}" for i in range(BUCKETS))

# the lower bound of buckets 1..55, as doubles: the SQL that fills the tables compares with these very values
LOWER_BOUNDS: tuple[float, ...] = tuple(FIRST_MS * RATIO ** (i - 1) for i in range(1, BUCKETS))


def bucket_of(duration_ms: float) -> int:
    """The bucket a duration falls in (the writer calls this per row: one bisect over the bounds)."""
    return bisect_right(LOWER_BOUNDS, duration_ms)


def bounds(i: int) -> tuple[float, float | None]:
    """[lower, upper) of bucket i in milliseconds; the last bucket has no upper bound (None)."""
    if not 0 <= i < BUCKETS:
        raise IndexError(f"bucket {i} outside 0..{BUCKETS - 1}")
    lower = 0.0 if i == 0 else LOWER_BOUNDS[i - 1]
    return lower, (LOWER_BOUNDS[i] if i < BUCKETS - 1 else None)


def percentile(counts: Sequence[int], p: float) -> float | None:
    """The p-th quantile (0 <= p <= 1) of the durations counted in `counts` (one count per bucket).

    The rank is p * (n - 1), as percentile_cont ranks; the value is interpolated linearly between the
    bounds of the bucket holding that rank, each of its k values taken as the middle of its k-th share
    of the bucket. Bucket 0 starts at 0; the open last bucket gives its lower bound. None without counts.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"percentile {p} outside 0..1")
    total = sum(counts)
    if total <= 0:
        return None
    rank = p * (total - 1)
    before = 0
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        if rank < before + count or before + count >= total:
            lower, upper = bounds(i)
            if upper is None:
                return lower
            share = (rank - before + 0.5) / count
            return lower + (upper - lower) * min(max(share, 0.0), 1.0)
        before += count
    return None  # unreachable: the last non-empty bucket holds the highest rank
