"""Ephemeral page lists and the one eviction hook.

Every ephemeral page descriptor is on two FIFO lists, the global one and its owner
client's (Xen: ``global_ephemeral_page_list`` and ``client->ephemeral_page_list``); puts
append at the tail, eviction takes from the head. A shared-ephemeral get and a dedup
reprieve move a page to the tail of both lists.

The lists are ``deque``s of descriptors with *lazy deletion*: removing a page only marks
its descriptor dead (``node.clear()``: an empty list is false); dead entries are skipped when they reach the
head and squeezed out when they outnumber live ones. Moving a page to the tail means
killing its descriptor and appending a fresh one. This keeps a put at deque appends (no
hashing) and costs 8 bytes per page and list instead of OrderedDict entries.

The per-client lists matter only to the weight rule, so they are kept only while some
client has a non-zero weight (``by_client``): a client's list is exactly the global list
filtered by owner, so it is rebuilt from the global order when the first weight is set and
dropped when the last weight goes back to 0. With the default weights (all 0) a put thus
appends to one list, not two.

``choose_victim`` is the single place that decides what is evicted.

Victim rule (the DOCUMENTED Xen rule, X-DOC: "if a client with non-zero weight holds more
than its weight-proportional share of all ephemeral pages, its own pages are evicted
first" -- not the 4.0-4.12 code, whose inequality is inverted and which only ever looks at
the calling client): a client is over its share when
``client_eph * total_weight > global_eph * client_weight`` (weights non-zero). Evict the
oldest page of the calling client if it is over its share, else of the client furthest
over its share, else the oldest page overall. With all weights 0 (the default) this is a
plain global FIFO.
A deduplicated page (content shared by more than one descriptor) gets one reprieve: the
first time it is chosen it goes to the tail instead.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from .dedup import Pcd
from .page import DATA, POOL, REPRIEVED

if TYPE_CHECKING:
    from .client import Client

Node = list[Any]
SLACK = 256  # dead entries tolerated before a list is compacted, beyond one per two live pages


class EphemeralLists:
    """The global ephemeral FIFO plus the counters of evictions (Xen names)."""

    def __init__(self, clients: "dict[int, Client]") -> None:
        self.clients = clients  # the host's client table (for the share computation)
        self.global_list: deque[Node] = deque()
        self.global_eph_count = 0
        self.global_eph_count_max = 0
        self.weight_total = 0
        self.by_client = False  # per-client lists maintained (iff weight_total != 0)
        self.evicted_pgs = 0
        self.evict_attempts = 0
        self.relinq_pgs = 0
        self.relinq_attempts = 0
        self.max_evicts_per_relinq = 0
        self.compact_at = SLACK

    # --- list maintenance (the pool calls these on put / remove) ----------------------------

    def append(self, node: Node, owner: "Client") -> None:
        """Put a live ephemeral descriptor at the tail of the list(s)."""
        gl = self.global_list
        gl.append(node)
        self.global_eph_count += 1
        owner.eph_count += 1
        if owner.eph_count > owner.eph_count_max:
            owner.eph_count_max = owner.eph_count
        if self.global_eph_count > self.global_eph_count_max:
            self.global_eph_count_max = self.global_eph_count
        if self.by_client:
            owner.eph_pages.append(node)
            if len(owner.eph_pages) > owner.compact_at:
                self.compact(owner)
        if len(gl) > self.compact_at:
            self.compact(owner)

    def compact(self, owner: "Client") -> None:
        """Squeeze dead descriptors out of whichever of the global list and ``owner``'s list
        has grown past its limit (evictions pop dead entries only from the list they scan,
        so each list is watched on its own)."""
        if len(self.global_list) > self.compact_at:
            self.global_list = compact(self.global_list)
            self.compact_at = compact_limit(len(self.global_list))
        if len(owner.eph_pages) > owner.compact_at:
            owner.eph_pages = compact(owner.eph_pages)
            owner.compact_at = compact_limit(len(owner.eph_pages))

    def forget(self, owner: "Client") -> None:
        """One of ``owner``'s ephemeral descriptors died (the caller marked it)."""
        self.global_eph_count -= 1
        owner.eph_count -= 1

    def weights_changed(self) -> None:
        """Start or stop keeping per-client lists after ``weight_total`` changed."""
        wanted = self.weight_total != 0
        if wanted == self.by_client:
            return
        self.by_client = wanted
        if wanted:
            self.rebuild_client_lists(list(self.clients.values()))
        else:
            for client in self.clients.values():
                client.eph_pages = deque()
                client.compact_at = SLACK

    # --- the eviction hook ------------------------------------------------------------------

    def over_share(self, client: "Client") -> bool:
        """True when ``client`` holds more than its weight-proportional share of ephemeral pages."""
        total = self.weight_total
        if total == 0 or client.weight == 0 or client.eph_count == 0:
            return False
        return client.eph_count * total > self.global_eph_count * client.weight

    def over_share_client(self, caller: "Client | None") -> "Client | None":
        """The client whose pages go first: the caller if it is over its share, else the
        client furthest over its share (in pages), else None (evict the global oldest)."""
        if caller is not None and self.over_share(caller):
            return caller
        total = self.weight_total
        worst, worst_excess = None, 0
        for client in self.clients.values():
            if self.over_share(client):
                excess = client.eph_count * total - self.global_eph_count * client.weight
                if excess > worst_excess:
                    worst, worst_excess = client, excess
        return worst

    def choose_victim(self, caller: "Client | None") -> Node | None:
        """THE eviction decision: the live descriptor to evict, or None if there is none.

        The victim is taken off the list it was found on (the caller evicts it at once, which
        marks it dead for the other list)."""
        self.evict_attempts += 1
        if not self.global_eph_count:
            return None
        owner = self.over_share_client(caller) if self.weight_total else None
        own = owner is not None
        queue = owner.eph_pages if own else self.global_list  # type: ignore[union-attr]
        while queue:
            node = queue.popleft()
            if not node:  # dead descriptor
                continue
            stored = node[DATA]
            if type(stored) is Pcd and stored.refs > 1 and len(node) <= REPRIEVED:
                node[POOL].refresh(node, reprieve=True)
                # refresh appends, which may have compacted (replaced) the list
                queue = owner.eph_pages if own else self.global_list  # type: ignore[union-attr]
                continue
            return node
        return None

    def rebuild_client_lists(self, clients: "list[Client]") -> None:
        """Rebuild the given clients' lists from the global order (after a shared pool
        changed owner: its pages move to the new owner's list, in their global order)."""
        if not self.by_client:
            return
        for client in clients:
            client.eph_pages = deque(n for n in self.global_list if n and n[POOL].client is client)
            client.compact_at = compact_limit(len(client.eph_pages))

    def check(self, clients: "list[Client]", live_nodes: dict[int, Node]) -> None:
        """``live_nodes``: id -> descriptor of every ephemeral page held by a pool."""
        on_global = [n for n in self.global_list if n]
        assert len(on_global) == self.global_eph_count, "global ephemeral count != live pages on the global list"
        assert {id(n) for n in on_global} == set(live_nodes), "global list and stored ephemeral pages differ"
        assert len({id(n) for n in on_global}) == len(on_global), "a page is on the global list twice"
        assert sum(c.eph_count for c in clients) == self.global_eph_count, "sum of client counts != global count"
        assert self.by_client == (self.weight_total != 0), "per-client lists kept iff some weight is set"
        for client in clients:
            mine = [n for n in client.eph_pages if n]
            if not self.by_client:
                assert not client.eph_pages, f"client {client.cli_id}: a list kept while no weight is set"
                continue
            assert len(mine) == client.eph_count, f"client {client.cli_id}: eph_count != live pages on its list"
            assert len({id(n) for n in mine}) == len(mine), f"client {client.cli_id}: a page is on its list twice"
            for n in mine:
                assert n[POOL].client is client, f"client {client.cli_id}: holds a page of another owner"
                assert id(n) in live_nodes, f"client {client.cli_id}: lists a page no pool holds"
        assert self.weight_total == sum(c.weight for c in clients), "weight total drifted"


def compact(queue: deque[Node]) -> deque[Node]:
    """The live descriptors of a list, in order."""
    return deque(n for n in queue if n)


def compact_limit(live: int) -> int:
    """Length at which a list holding ``live`` descriptors is compacted again: at most about
    one dead entry per two live ones, so compaction is amortized O(1) per append and dead
    descriptors (56-byte empty lists) cost at most ~36 bytes per stored page."""
    return live * 3 // 2 + SLACK
