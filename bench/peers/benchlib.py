"""What every peer benchmark shares: the statistics and the JSON-lines records of `shardline bench`.

Mirrors crates/shardline/src/bench/record.rs (median, nearest-rank p99, keys `bench`, `median_us`,
`p99_us`, `iters` first, values rounded to 3 decimals) so that peers' lines compare with Shardline's.
"""

import json
import math
import time


def stats(samples_us):
    """Median and nearest-rank 99th percentile of `samples_us`, as record keys."""
    if not samples_us:
        raise ValueError("no samples")
    s = sorted(samples_us)
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    p99 = s[min(max(math.ceil(n * 0.99), 1), n) - 1]
    return {"median_us": round(median, 3), "p99_us": round(p99, 3), "iters": n}


def measure(step, warmup=3, min_iters=100, min_time_s=0.5, max_time_s=3.0, floor_iters=10, self_timed=False):
    """Times `step(i)` on the host clock and returns its stats.

    At least `min_iters` iterations and `min_time_s` seconds, unless the iterations are slow: after
    `max_time_s` it stops once it has `floor_iters` (a 100 ms case need not run 100 times).
    With `self_timed`, `step` returns its own duration in microseconds (e.g. from CUDA events).
    """
    for i in range(warmup):
        step(i)
    samples = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter_ns()
        own = step(len(samples) + warmup)
        t1 = time.perf_counter_ns()
        samples.append(float(own) if self_timed else (t1 - t0) / 1e3)
        elapsed = time.perf_counter() - start
        if len(samples) >= min_iters and elapsed >= min_time_s:
            break
        if len(samples) >= floor_iters and elapsed >= max_time_s:
            break
    return stats(samples)


class Sink:
    """Prints each record as one JSON line and, with a path, writes it to that file too.

    A context manager: `with Sink(path) as sink: ...` closes the file.
    """

    def __init__(self, path=None):
        # Held open across records, closed by __exit__.
        self.file = open(path, "w") if path else None  # noqa: SIM115

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def write(self, bench, st, **fields):
        rec = {"bench": bench, **st, **fields}
        line = json.dumps(rec)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        return rec

    def close(self):
        if self.file:
            self.file.close()


def gbps(nbytes, us):
    return round(nbytes / (us * 1e3), 6) if us > 0 else 0.0
