"""The SPL report as plain dataclasses: the edges each boundary cuts, the losses every
parameter reaches, and any locality violation. Kept apart from the check that fills it
(``locality``) so it prints (``str``) and serialises (``to_json``) with no networkx.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class CutEdge:
    """One data edge into stage ``stage`` (k >= 1), relayed with gradient factor ``lam``."""

    stage: int
    source: str
    source_module: str
    source_place: str          # "prologue" or "stage j"
    readers: list[str]         # the nodes of stage ``stage`` that read it
    scalars: int               # per sample
    lam: float
    bypass: bool               # skips at least one stage (an x0 bus, a long skip)
    into_head: bool            # read by the stage's head


@dataclass
class ParamReach:
    name: str
    numel: int
    owners: list[str]          # "stage k" / "head k": where the parameter first meets data
    reaches: list[int]         # losses it gets gradient from, in the graph after the cut
    expected: list[int]        # losses the relay allows


@dataclass
class Violation:
    param: str
    owners: list[str]
    loss: int
    path: list[str]            # a gradient path, parameter -> loss, node by node


@dataclass
class SPLReport:
    """What ``spl.report()`` and ``lbi-fx verify --spl`` show."""

    regions: list[list[str]]
    heads: str
    relay: list[float]
    alpha: float
    edges: list[CutEdge]
    head_inputs: list[dict[str, str]]   # per stage: last stage's tensor -> stage's tensor
    params: list[ParamReach]
    violations: list[Violation] = field(default_factory=list)
    capture: str = ""

    @property
    def ok(self) -> bool:
        """Every parameter reaches only the losses its relays allow (Prop. 4.7 at 0)."""
        return not self.violations

    @property
    def num_stages(self) -> int:
        return len(self.regions)

    def cut(self, stage: int) -> list[CutEdge]:
        return [e for e in self.edges if e.stage == stage]

    def bypass(self) -> list[CutEdge]:
        return [e for e in self.edges if e.bypass]

    def shared(self) -> list[ParamReach]:
        """Parameters trained by more than one loss (heads, tied weights, shared modules)."""
        return [p for p in self.params if len(p.reaches) > 1]

    def stage_numel(self) -> list[int]:
        """Parameters owned by each stage alone (its layers, and the prologue for stage 0)."""
        out = [0] * self.num_stages
        for p in self.params:
            if len(p.owners) == 1 and p.owners[0].startswith("stage "):
                out[int(p.owners[0].split()[1])] += p.numel
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d["ok"] = self.ok
        return json.dumps(d, indent=2)

    def __str__(self) -> str:
        K = self.num_stages
        sizes = tuple(len(r) for r in self.regions)
        lam = ("0 (detach)" if all(v == 0 for v in self.relay) else
               ", ".join(f"{v:g}" for v in self.relay)) if self.relay else "-"
        lines = [f"stage-partitioned learning: {K} stage(s) {sizes}, heads {self.heads}, "
                 f"relay lambda {lam}, alpha {self.alpha:g}" +
                 (f" ({self.capture})" if self.capture else "")]
        numel = self.stage_numel()
        for k, region in enumerate(self.regions):
            extra = " + prologue" if k == 0 else ""
            lines.append(f"  stage {k}: {', '.join(region)}{extra}  ({numel[k]:,} own parameters)")
        for k in range(1, K):
            cut = self.cut(k)
            lines.append(f"  boundary {k} (into stage {k}): {len(cut)} edge(s) cut")
            for e in cut:
                tag = " [bypass]" if e.bypass else ""
                tag += " [head]" if e.into_head else ""
                lines.append(f"    {e.source} [{e.source_module or '<top level>'}, {e.source_place}]"
                             f" -> {', '.join(e.readers[:3])}{' ...' if len(e.readers) > 3 else ''}"
                             f"  {e.scalars} scalars/sample, lambda {e.lam:g}{tag}")
        nb = len(self.bypass())
        lines.append(f"  bypass edges cut: {nb}")
        for k, m in enumerate(self.head_inputs[:-1]):
            if m:
                lines.append(f"  head {k} reads " + ", ".join(f"{v} for {s}" for s, v in m.items()))
        shared = self.shared()
        lines.append(f"  parameters trained by several losses: {len(shared)}")
        for p in shared:
            lines.append(f"    {p.name} ({p.numel:,}; {', '.join(p.owners)}): losses "
                         f"{','.join(map(str, p.reaches))}")
        if self.ok:
            lines.append("  locality (networkx, graph after the cut): OK - every stage's "
                         "parameters reach only the losses the relay allows")
        else:
            lines.append(f"  locality: {len(self.violations)} VIOLATION(S)")
            for v in self.violations[:10]:
                lines.append(f"    {v.param} ({', '.join(v.owners)}) reaches loss {v.loss}: "
                             + " -> ".join(v.path))
        return "\n".join(lines)
