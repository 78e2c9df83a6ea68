"""Separator reports: what ``verify`` returns, prints, serialises and draws."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


def _one_or_list(values: Sequence[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "[" + ", ".join(map(str, values)) + "]"


def describe_width(rank: int | Sequence[int], segments: int = 1) -> str:
    """An interface width said one way everywhere: 'rank 8 x 4 segments = 32 scalars'.

    ``rank`` is per row (one int, or one per boundary), ``segments`` the rows each m_k
    carries (causal segments; 1 for the one-row pools), the product the scalars per sample
    that cross the boundary (the side of J_k)."""
    ranks = [rank] if isinstance(rank, int) else list(rank)
    seg = f"{segments} segment" + ("" if segments == 1 else "s")
    return (f"rank {_one_or_list(ranks)} x {seg} = "
            f"{_one_or_list([r * segments for r in ranks])} scalars")


@dataclass(frozen=True)
class NodeRef:
    """One FX node as the report shows it."""

    node: str
    module: str
    place: str
    shape: tuple[int, ...] | None
    scalars: int

    def label(self) -> str:
        shape = "x".join(map(str, self.shape)) if self.shape else "-"
        return f"{self.node} [{self.module or '<top level>'}] ({shape})"


@dataclass
class BoundaryReport:
    """Boundary ``index`` sits between region ``index-1`` and region ``index``."""

    index: int
    crossing: list[NodeRef]
    min_cut_scalars: int
    separator: list[NodeRef]
    ok: bool
    limit: int | None = None
    interface: list[str] | None = None
    witness: list[NodeRef] | None = None

    @property
    def crossing_scalars(self) -> int:
        return sum(c.scalars for c in self.crossing)


@dataclass
class SeparatorReport:
    regions: list[list[str]]
    batch_size: int
    boundaries: list[BoundaryReport]
    rank: list[int] | None = None
    interfaces: list[list[str]] | None = None
    capture: str = ""
    notes: list[str] = field(default_factory=list)
    graph: dict | None = field(default=None, repr=False)
    causality: object | None = None  # lbi_fx.causality.Causality, filled by verify
    segments: int | None = None  # rows per interface of a rewritten model (rank = S x r)

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.boundaries)

    @property
    def num_regions(self) -> int:
        return len(self.regions)

    def failing(self) -> list[BoundaryReport]:
        return [b for b in self.boundaries if not b.ok]

    def to_dict(self) -> dict:
        causality = self.causality
        self.causality = None
        try:
            d = asdict(self)
        finally:
            self.causality = causality
        d.pop("graph")
        d["causality"] = causality.to_dict() if causality is not None else None
        d["ok"] = self.ok
        d["num_regions"] = self.num_regions
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def budget_text(self) -> str:
        """What each boundary was held to, in the words :func:`describe_width` uses."""
        if self.rank is None:
            return ("interfaces " + "; ".join(",".join(i) for i in self.interfaces)
                    if self.interfaces is not None else "no budget (min cuts only)")
        if self.segments:  # a rewritten model: its interfaces, S rows of r
            return describe_width([w // self.segments for w in self.rank], self.segments)
        return f"a budget of {_one_or_list(self.rank)} scalars"

    def __str__(self) -> str:
        mode = self.budget_text()
        budgetless = self.rank is None and self.interfaces is None
        head = (
            f"lbi-fx separator report: {self.num_regions} regions, batch {self.batch_size}, "
            f"{mode}, captured by {self.capture or '?'}"
        )
        rows = [("k", "crossing tensors", "crossing scalars", "min cut", "limit", "status")]
        for b in self.boundaries:
            crossing = ", ".join(c.node for c in b.crossing[:3])
            if len(b.crossing) > 3:
                crossing += f", +{len(b.crossing) - 3}"
            rows.append((
                str(b.index), crossing or "-", str(b.crossing_scalars), str(b.min_cut_scalars),
                "-" if b.limit is None else str(b.limit),
                "-" if budgetless else "ok" if b.ok else "FAIL",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, ""]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        for b in self.boundaries:
            sep = ", ".join(f"{s.node} ({s.scalars})" for s in b.separator)
            lines.append(f"boundary {b.index} separator: {sep or '-'}")
            if b.witness:
                lines.append(f"boundary {b.index} witness path (bypasses the interface):")
                lines.extend(f"    {w.place:>10}  {w.label()}" for w in b.witness)
        lines.extend(f"note: {n}" for n in self.notes)
        if self.causality is not None and str(self.causality):  # "": no sequence axis
            lines.append(str(self.causality))
        if budgetless:
            lines.append("no budget given (rank= or interfaces=): min cuts only, no boundary "
                         "checked")
        else:
            lines.append("OK: every boundary holds" if self.ok else
                         f"FAIL: boundaries {', '.join(str(b.index) for b in self.failing())} "
                         "do not hold")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz: regions as coloured clusters, separators bold, a witness path in red."""
        if not self.graph:
            return "digraph lbi {}\n"
        palette = ["#dbeafe", "#dcfce7", "#fef9c3", "#fce7f3", "#ede9fe", "#ffedd5", "#e0f2fe"]
        sep = {s.node for b in self.boundaries for s in b.separator}
        wit_edges = set()
        for b in self.boundaries:
            w = [x.node for x in (b.witness or [])]
            wit_edges.update(zip(w, w[1:]))
        wit_nodes = {n for e in wit_edges for n in e}
        lines = ["digraph lbi {", "  rankdir=TB; node [shape=box, fontsize=10, style=filled];"]
        by_place: dict[str, list[dict]] = {}
        for n in self.graph["nodes"]:
            by_place.setdefault(n["place"], []).append(n)
        for i, (place, nodes) in enumerate(by_place.items()):
            colour = palette[i % len(palette)]
            lines.append(f'  subgraph "cluster_{place}" {{ label="{place}"; style=filled; '
                         f'color="{colour}";')
            for n in nodes:
                attrs = [f'label="{n["name"]}\\n{n["module"]}"']
                fill = "white" if n["dynamic"] else "#f3f4f6"
                if n["name"] in sep:
                    attrs.append("penwidth=3")
                    fill = "#fde68a"
                if n["name"] in wit_nodes:
                    attrs.append('color="red"')
                attrs.append(f'fillcolor="{fill}"')
                lines.append(f'    "{n["name"]}" [{", ".join(attrs)}];')
            lines.append("  }")
        for u, v in self.graph["edges"]:
            style = ' [color="red", penwidth=2]' if (u, v) in wit_edges else ""
            lines.append(f'  "{u}" -> "{v}"{style};')
        lines.append("}")
        return "\n".join(lines) + "\n"
