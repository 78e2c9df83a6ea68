"""``python -m lbi_fx.plan``: the standalone ``lbi-fx plan``."""

from lbi_fx.plan import main

if __name__ == "__main__":
    raise SystemExit(main())
