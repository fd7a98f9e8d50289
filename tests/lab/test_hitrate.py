"""Experiments: tmem sweeps (exclusive vs shared), several weighted clients, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guestfs.lab.cli import main
from guestfs.lab.hitrate import multi_client, replay_shared, split_by_key, tmem_sweep
from guestfs.lab.simulate import replay_model
from guestfs.lab.traces import synthetic_zipf


def test_sweep_rows_hold_the_victim_identity() -> None:
    trace = synthetic_zipf(20_000, 3000, 0.9, seed=2)
    rows = tmem_sweep(trace, 100, [0, 100, 400, 1600], quiet=True)
    assert [r["tmem_pages"] for r in rows] == [0, 100, 400, 1600]
    for row in rows:
        assert row["victim_identity_holds"], row
        assert row["wrong_bytes"] == 0
        assert row["baseline_hit_ratio"] <= row["exclusive_hit_ratio"] <= row["belady_hit_ratio"]
        assert row["shared_hit_ratio"] <= row["exclusive_hit_ratio"] + 1e-12
    assert rows[-1]["exclusive_hit_ratio"] > rows[0]["exclusive_hit_ratio"]


def test_shared_pool_through_the_real_host_keeps_copies() -> None:
    trace = synthetic_zipf(20_000, 3000, 0.9, seed=6)
    shared = replay_shared(trace.keys, 100, 400)
    model = replay_model(trace.keys, 100, 400, exclusive=False)
    assert shared.wrong_bytes == 0
    assert shared.page_cache_hits == model.page_cache_hits
    assert 0 < shared.tmem_hits
    # duplicates waste the shared pool: fewer second-chance hits than the exclusive pool
    assert shared.tmem_hits < replay_model(trace.keys, 100, 400, exclusive=True).tmem_hits


def test_weighted_clients_share_one_host() -> None:
    trace = synthetic_zipf(30_000, 6000, 0.8, seed=8)
    streams = split_by_key(trace, 2)
    assert sum(s.size for s in streams) == trace.requests
    rows = multi_client(streams, 50, 1000, [1, 3])
    assert [r["weight"] for r in rows] == [1, 3]
    assert all(r["wrong_bytes"] == 0 for r in rows)
    assert sum(r["requests"] for r in rows) == trace.requests
    assert all(r["tmem_hits"] > 0 for r in rows)
    held = [r["tmem_pages_held"] for r in rows]
    assert min(held) > 0 and sum(held) <= 1000


def test_hitrate_command_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.trace"
    trace.write_text("\n".join(str(k) for k in synthetic_zipf(5000, 800, 0.9, seed=1).keys.tolist()))
    out = tmp_path / "out"
    code = main(["--quiet", "hitrate", "--trace", str(trace), "--page-cache", "50", "--tmem-sizes", "0,50,200",
                 "--clients", "2", "--weights", "1,2", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "hitrate.json").read_text())
    assert [r["tmem_pages"] for r in data["rows"]] == [0, 50, 200]
    assert len(data["clients"]) == 2
    assert (out / "hitrate.csv").is_file() and (out / "clients.csv").is_file()
    assert "victim_identity_holds" in (out / "summary.md").read_text()
