"""``python -m lbi_fx`` is the ``lbi-fx`` command."""

import sys

from lbi_fx.cli import main

sys.exit(main())
