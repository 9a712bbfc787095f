"""``marginops.insightface``: the import path of :mod:`marginops.compat.insightface`; this module is that one."""

import sys

from .compat import insightface as _impl

sys.modules[__name__] = _impl
