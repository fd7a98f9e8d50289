"""Hit rates of a guest page cache with a tmem second chance, on the ARC paper's OLTP trace.

Shows the three lab engines agreeing: the exact LRU curve (fast path), the victim-cache identity
(page cache N + tmem M hits exactly like LRU(N+M)), the real guest stack replaying the trace
with every page's bytes checked, and the Belady bound.

    .venv/bin/python examples/hitrate_oltp.py            # uses ../shared/traces or $TMEM_TRACES
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guestfs.lab.mrc import LruCurve  # noqa: E402
from guestfs.lab.opt import belady_hits  # noqa: E402
from guestfs.lab.simulate import replay_stack  # noqa: E402
from guestfs.lab.traces import load_trace, shared_traces_dir, synthetic_zipf  # noqa: E402


def main() -> int:
    root = shared_traces_dir()
    if root is not None:
        trace = load_trace(root / "arc" / "OLTP.lis.zst")
    else:
        print("shared traces not found; using a synthetic Zipf trace instead")
        trace = synthetic_zipf(300_000, 60_000, 0.9, seed=1)
    curve = LruCurve.of(trace.keys)
    print(f"{trace.name}: {trace.requests:,} requests, {curve.unique:,} unique pages")
    print("LRU hit % at 1000/2000/5000/10000/15000 pages:",
          " / ".join(f"{100 * curve.hit_ratio(s):.2f}" for s in (1000, 2000, 5000, 10000, 15000)))

    page_cache = 1000
    head = trace.keys[:200_000]
    head_curve = LruCurve.of(head)
    print(f"\npage cache {page_cache} pages + tmem, real stack on the first {head.size:,} requests:")
    print(f"{'tmem':>6} {'pc hits':>8} {'tmem hits':>9} {'hit %':>7} {'LRU(N+M) %':>10} {'Belady %':>8} "
          f"{'wrong B':>7} {'req/s':>8}")
    for tmem in (0, 1000, 4000, 14000):
        result = replay_stack(head, page_cache, tmem, trace=trace.name)
        lru = head_curve.hit_ratio(page_cache + tmem)
        opt = belady_hits(head, page_cache + tmem) / head.size
        print(f"{tmem:>6} {result.page_cache_hits:>8,} {result.tmem_hits:>9,} {100 * result.hit_ratio:>7.2f} "
              f"{100 * lru:>10.2f} {100 * opt:>8.2f} {result.wrong_bytes:>7} {result.requests_per_second:>8,.0f}")
        assert result.hits == head_curve.hits(page_cache + tmem), "victim identity broken"
    return 0


if __name__ == "__main__":
    sys.exit(main())
