"""The rewritten model, ``LBIModule`` (``rewritten.py``), and the parts it is made of."""

from lbi_fx.module.chain import _Call, _leaf
from lbi_fx.module.rewritten import BACKWARD_MODES, LBIModule, adopt_state

__all__ = ["BACKWARD_MODES", "LBIModule", "_Call", "_leaf", "adopt_state"]
