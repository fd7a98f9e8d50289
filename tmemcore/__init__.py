"""tmemcore: a Python host for Xen transcendent memory (tmem), ABI v1 with v0 support.

``Tmem`` is the host (``do_tmem_op`` takes raw ``struct tmem_op`` records; ``client(cid)``
gives the Pythonic API: ``Client.new_pool`` -> ``Pool`` with put/get/flush). A test
asserts ``__all__`` is exactly what is public.
"""

from .abi import PAGE_SIZE, SPEC_V0, SPEC_V1, TmemOp
from .client import Client
from .errors import TmemError
from .oid import INVALID_OID, Oid
from .pool import Pool
from .tmem import Tmem

__all__ = sorted(
    ["INVALID_OID", "Client", "Oid", "PAGE_SIZE", "Pool", "SPEC_V0", "SPEC_V1", "Tmem", "TmemError", "TmemOp"]
)
