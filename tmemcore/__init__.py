"""tmemcore: a Python host for Xen transcendent memory (tmem), ABI v1 with v0 support.

Public API (grows as modules land; a test asserts ``__all__`` is what is public).
"""

from .abi import PAGE_SIZE, SPEC_V0, SPEC_V1, TmemOp
from .errors import TmemError
from .oid import INVALID_OID, Oid

__all__ = sorted(["INVALID_OID", "Oid", "PAGE_SIZE", "SPEC_V0", "SPEC_V1", "TmemError", "TmemOp"])
