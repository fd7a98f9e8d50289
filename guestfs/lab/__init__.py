"""guestfs.lab: trace-driven hit-rate experiments for the guest cache stack.

Modules (one concept each):

- ``traces``   load block traces (LIRS, ARC .lis, oracleGeneral, CloudPhysics CSV, MSR CSV; gz/xz/zst)
               into numpy int64 key arrays; a seeded synthetic Zipf generator.
- ``mrc``      exact one-pass LRU stack distances and miss-ratio curves (vectorised wavelet counting).
- ``opt``      Belady/MIN hit counts (numpy next-use + heap).
- ``simulate`` replay a trace through the REAL page cache -> cleancache -> transport -> tmemcore
               host, with page contents stamped by key and checked on every hit.
- ``hitrate``  tmem-size sweeps, exclusive vs shared second chance, several weighted clients.
- ``keying``   v0-vs-v1 file keying study on real trees (collisions, inode reuse).
- ``live``     workloads through a real FUSE mount.
- ``plots`` / ``report``  PNG plots (matplotlib optional), CSV/JSON/Markdown output.
- ``cli``      ``guestfs lab ...`` subcommands.

numpy is imported by the modules that need it (the ``lab`` extra), not here, so ``import guestfs.lab``
stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
