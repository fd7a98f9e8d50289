"""Statistics: one dict (``Tmem.stats()``) and Xen's TMEMC_LIST text, built from the same
tables of (two-letter key, Xen counter name) so the two can never disagree.

Line formats (tmem-abi.md §4.1, X-C1 ``tmemc_list_*``): ``G=`` global, ``S=`` one per
global shared pool, ``C=`` per client followed by its ``P=`` lines. Short form ends a line
after the first group; long form appends the second group after a comma. U0/U1 are hex,
everything else decimal. Counters this host has no analog for are reported as 0 (radix
nodes Nc/Nm, cycles Tc, sub-page allocation failures Af, low-memory Lm); the ``T=``
cycle-counter line (perf builds only) is not produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .abi import CLI_ID_NULL, PAGE_SIZE

if TYPE_CHECKING:
    from .client import Client
    from .pool import TmemPool
    from .tmem import Tmem

GLOBAL_SHORT = (
    ("Tt", "total_tmem_ops"), ("Te", "errored_tmem_ops"), ("Cf", "failed_copies"),
    ("Af", "alloc_failed"), ("Pf", "alloc_page_failed"), ("Ta", "avail_pages"),
    ("Lm", "low_on_memory"), ("Et", "evicted_pgs"), ("Ea", "evict_attempts"),
    ("Rt", "relinq_pgs"), ("Ra", "relinq_attempts"), ("Rx", "max_evicts_per_relinq"),
    ("Fp", "total_flush_pool"),
)  # fmt: skip
GLOBAL_LONG = (
    ("Ec", "global_eph_count"), ("Em", "global_eph_count_max"), ("Oc", "global_obj_count"),
    ("Om", "global_obj_count_max"), ("Nc", "global_rtree_node_count"), ("Nm", "global_rtree_node_count_max"),
    ("Pc", "global_pgp_count"), ("Pm", "global_pgp_count_max"), ("Fc", "global_page_count"),
    ("Fm", "global_page_count_max"), ("Sc", "global_pcd_count"), ("Sm", "global_pcd_count_max"),
    ("Ep", "tot_good_eph_puts"), ("Gd", "deduped_puts"), ("Zt", "pcd_tot_tze_size"), ("Gz", "pcd_tot_csize"),
)  # fmt: skip
CLIENT_SHORT = (
    ("CI", "cli_id"), ("ww", "weight"), ("ca", "cap"), ("co", "compress"), ("fr", "frozen"),
    ("Tc", "total_cycles"), ("Ge", "succ_eph_gets"), ("Pp", "succ_pers_puts"), ("Gp", "succ_pers_gets"),
)  # fmt: skip
CLIENT_LONG = (
    ("Ec", "eph_count"), ("Em", "eph_count_max"), ("cp", "compressed_pages"),
    ("cb", "compressed_sum_size"), ("cn", "compress_poor"), ("cm", "compress_nomem"),
)  # fmt: skip
POOL_LONG = (
    ("Pc", "pgp_count"), ("Pm", "pgp_count_max"), ("Oc", "obj_count"), ("Om", "obj_count_max"),
    ("Nc", "objnode_count"), ("Nm", "objnode_count_max"), ("ps", "good_puts"), ("pt", "puts"),
    ("pd", "dup_puts_flushed"), ("pr", "dup_puts_replaced"), ("px", "no_mem_puts"), ("gs", "found_gets"),
    ("gt", "gets"), ("fs", "flushs_found"), ("ft", "flushs"), ("os", "flush_objs_found"), ("ot", "flush_objs"),
)  # fmt: skip


def global_stats(tmem: "Tmem") -> dict[str, int]:
    ev = tmem.eviction
    hc = tmem.hypercall
    dedup = tmem.codec.dedup
    pages_used = -(-tmem.used_bytes // PAGE_SIZE)
    return {
        "total_tmem_ops": hc.total_tmem_ops,
        "errored_tmem_ops": hc.errored_tmem_ops,
        "failed_copies": hc.failed_copies,
        "alloc_failed": 0,
        "alloc_page_failed": tmem.alloc_page_failed,
        "avail_pages": (tmem.budget_bytes - tmem.used_bytes) // PAGE_SIZE,
        "low_on_memory": 0,
        "evicted_pgs": ev.evicted_pgs,
        "evict_attempts": ev.evict_attempts,
        "relinq_pgs": ev.relinq_pgs,
        "relinq_attempts": ev.relinq_attempts,
        "max_evicts_per_relinq": ev.max_evicts_per_relinq,
        "total_flush_pool": tmem.total_flush_pool,
        "global_eph_count": ev.global_eph_count,
        "global_eph_count_max": ev.global_eph_count_max,
        "global_obj_count": tmem.obj_count,
        "global_obj_count_max": tmem.obj_count_max,
        "global_rtree_node_count": 0,
        "global_rtree_node_count_max": 0,
        "global_pgp_count": tmem.npages,
        "global_pgp_count_max": tmem.npages_max,
        "global_page_count": pages_used,
        "global_page_count_max": -(-tmem.used_bytes_max // PAGE_SIZE),
        "global_pcd_count": dedup.pcd_count if dedup else 0,
        "global_pcd_count_max": dedup.pcd_count_max if dedup else 0,
        "tot_good_eph_puts": tmem.tot_good_eph_puts,
        "deduped_puts": dedup.deduped_puts if dedup else 0,
        "pcd_tot_tze_size": dedup.pcd_tot_tze_size if dedup else 0,
        "pcd_tot_csize": dedup.pcd_tot_csize if dedup else 0,
        # not in LIST: the budget in this host's own terms
        "memory_pages": tmem.memory_pages,
        "budget_bytes": tmem.budget_bytes,
        "used_bytes": tmem.used_bytes,
    }


def pool_stats(pool: "TmemPool") -> dict[str, Any]:
    return {
        "pool_id": pool.pool_id,
        "type": pool.kind,
        "uuid": list(pool.uuid) if pool.shared else [0, 0],
        "pgp_count": pool.npages,
        "pgp_count_max": pool.npages_max,
        "obj_count": pool.obj_count,
        "obj_count_max": pool.obj_count_max,
        "objnode_count": 0,
        "objnode_count_max": 0,
        "good_puts": pool.good_puts,
        "puts": pool.puts,
        "dup_puts_flushed": pool.dup_puts_flushed,
        "dup_puts_replaced": pool.dup_puts_replaced,
        "no_mem_puts": pool.no_mem_puts,
        "found_gets": pool.found_gets,
        "gets": pool.gets,
        "flushs_found": pool.flushs_found,
        "flushs": pool.flushs,
        "flush_objs_found": pool.flush_objs_found,
        "flush_objs": pool.flush_objs,
    }


def client_stats(client: "Client") -> dict[str, Any]:
    cs = client.compress_stats
    return {
        "cli_id": client.cli_id,
        "weight": client.weight,
        "cap": client.cap,
        "compress": int(client.compress),
        "frozen": int(client.frozen),
        "total_cycles": client.total_cycles,
        "succ_eph_gets": client.succ_eph_gets,
        "succ_pers_puts": client.succ_pers_puts,
        "succ_pers_gets": client.succ_pers_gets,
        "eph_count": client.eph_count,
        "eph_count_max": client.eph_count_max,
        "compressed_pages": cs.compressed_pages,
        "compressed_sum_size": cs.compressed_sum_size,
        "compress_poor": cs.compress_poor,
        "compress_nomem": cs.compress_nomem,
        "version": client.version,
        "pers_count": client.pers_count,
        "max_pages": client.max_pages,
        "pools": [dict(pool_stats(p), pool_id=slot) for slot, p in enumerate(client.pools) if p is not None],
    }


def shared_stats(tmem: "Tmem") -> list[dict[str, Any]]:
    out = []
    for slot, pool in enumerate(tmem.shared_pools):
        if pool is not None:
            entry = pool_stats(pool)
            entry.update(slot=slot, owner=pool.client.cli_id, sharers=[c.cli_id for c in pool.sharers])
            out.append(entry)
    return out


def host_stats(tmem: "Tmem") -> dict[str, Any]:
    stats: dict[str, Any] = {
        "global": global_stats(tmem),
        "shared": shared_stats(tmem),
        "clients": [client_stats(c) for c in tmem.clients.values()],
        "config": {
            "spec_version": tmem.spec_version,
            "accepted_versions": sorted(tmem.accepted_versions),
            "dedup": tmem.dedup,
            "tze": tmem.tze,
            "compress": tmem.compress_default,
            "shared_auth": tmem.shared_auth,
            "store": "memory" if tmem.remote_pages is None else tmem.remote_pages.url,
        },
    }
    if tmem.remote_pages is not None:  # not in LIST: the memcached keeper's own outcome counters
        stats["store"] = tmem.remote_pages.stats()
    return stats


# --- LIST text -----------------------------------------------------------------------------------


def _items(table: tuple[tuple[str, str], ...], values: dict[str, Any]) -> str:
    return ",".join(f"{key}:{int(values[name])}" for key, name in table)


def _pool_line(prefix: str, values: dict[str, Any], long: bool) -> str:
    lo, hi = values["uuid"]
    line = f"{prefix},PT:{values['type']},U0:{lo:x},U1:{hi:x}"
    return line + ("," + _items(POOL_LONG, values) if long else "") + "\n"


def _client_lines(client: "Client", long: bool) -> list[str]:
    values = client_stats(client)
    line = "C=" + _items(CLIENT_SHORT, values)
    lines = [line + ("," + _items(CLIENT_LONG, values) if long else "") + "\n"]
    for pool in values["pools"]:
        lines.append(_pool_line(f"P=CI:{client.cli_id},PI:{pool['pool_id']}", pool, long))
    return lines


def list_text(tmem: "Tmem", cli_id: int = CLI_ID_NULL, long: bool = False) -> str:
    """TMEMC_LIST output: all clients (G=, S=, C=/P=) or one client (its C=/P= lines)."""
    if cli_id != CLI_ID_NULL:
        return "".join(_client_lines(tmem.existing_client(cli_id), long))
    values = global_stats(tmem)
    lines = ["G=" + _items(GLOBAL_SHORT, values) + ("," + _items(GLOBAL_LONG, values) if long else "") + "\n"]
    for shared in shared_stats(tmem):
        sharers = "".join(f",SC:{cid}" for cid in shared["sharers"])
        lo, hi = shared["uuid"]
        line = f"S=SI:{shared['slot']},PT:{shared['type']},U0:{lo:x},U1:{hi:x}{sharers}"
        lines.append(line + ("," + _items(POOL_LONG, shared) if long else "") + "\n")
    for client in tmem.clients.values():
        lines.extend(_client_lines(client, long))
    return "".join(lines)


# --- LIST text back to the stats() shape (tmemctl list --json over the wire) ---------------------

_NAMES = {
    "G": dict(GLOBAL_SHORT + GLOBAL_LONG),
    "S": dict(POOL_LONG, SI="slot", PT="type"),
    "C": dict(CLIENT_SHORT + CLIENT_LONG),
    "P": dict(POOL_LONG, CI="cli_id", PI="pool_id", PT="type"),
}
_TEXT_KEYS = frozenset({"PT"})  # every other value is an integer (U0/U1 hex, the rest decimal)


def parse_list_text(text: str) -> dict[str, Any]:
    """TMEMC_LIST text as ``{"global", "shared", "clients"}`` keyed by the names ``Tmem.stats()`` uses
    (the same key tables, so the two agree); a key this host does not know keeps its two letters.
    ValueError names the first line that is not LIST output."""
    result: dict[str, Any] = {"global": {}, "shared": [], "clients": []}
    clients: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        kind, values = _parse_list_line(number, line)
        if kind == "G":
            result["global"] = values
        elif kind == "S":
            result["shared"].append(values)
        elif kind == "C":
            values["pools"] = []
            clients[values["cli_id"]] = values
            result["clients"].append(values)
        elif values.get("cli_id") in clients:
            clients[values.pop("cli_id")]["pools"].append(values)
        else:
            raise ValueError(f"LIST line {number}: a pool of client {values.get('cli_id')}, listed before it")
    return result


def _parse_list_line(number: int, line: str) -> tuple[str, dict[str, Any]]:
    kind, eq, rest = line.partition("=")
    if not eq or kind not in _NAMES:
        raise ValueError(f"LIST line {number} is not G=/S=/C=/P= output: {line[:60]!r}")
    names = _NAMES[kind]
    values: dict[str, Any] = {}
    uuid = [0, 0]
    for item in rest.split(","):
        key, colon, value = item.partition(":")
        try:
            if not colon:
                raise ValueError
            if key in ("U0", "U1"):
                uuid[int(key[1])] = int(value, 16)
            elif key == "SC":  # one per sharer of a shared pool
                values.setdefault("sharers", []).append(int(value))
            else:
                values[names.get(key, key)] = value if key in _TEXT_KEYS else int(value)
        except ValueError:
            raise ValueError(f"LIST line {number}: bad item {item[:40]!r}") from None
    if kind in ("S", "P"):
        values["uuid"] = uuid
    if kind == "S":
        values.setdefault("sharers", [])
    return kind, values
