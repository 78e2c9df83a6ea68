"""Public path of :mod:`lbi_fx.distributed.pipelining` (kept for users' imports): this name
is that very module object, so what is set on one (a monkeypatch) is seen through both."""

import sys

from lbi_fx.distributed import pipelining as _impl

sys.modules[__name__] = _impl
