"""``marginops.pml``: the import path of :mod:`marginops.compat.pml`; this module is that one."""

import sys

from .compat import pml as _impl

sys.modules[__name__] = _impl
