"""Public path of :mod:`lbi_fx.distributed.checkpoint` (kept for users' imports): this name
is that very module object, so what is set on one (a monkeypatch) is seen through both."""

import sys

from lbi_fx.distributed import checkpoint as _impl

sys.modules[__name__] = _impl
