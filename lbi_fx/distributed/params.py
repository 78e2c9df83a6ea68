"""Which rank uses which trainable parameter, and so which reduction its gradient takes.

A parameter only one region rank uses needs no region-group traffic (at most a dp
average); one several ranks use (the prologue, an embedding, a tied head) is summed over
the mesh. The lists are read afresh from the ``LBIModule`` at every step: freezing,
unfreezing or replacing a parameter (``load_state_dict(assign=True)``) rebuilds its
programs, and lists kept from an earlier step would reduce stale or frozen tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lbi_fx.distributed.mesh import Placement


def _trainable(gm: nn.Module) -> list[nn.Parameter]:
    return [p for p in dict.fromkeys(gm.parameters()) if p.requires_grad]


@dataclass
class ParamLayout:
    """``users``: parameter name -> region ranks that use it; ``used``: the names this
    rank uses; ``shared``: reduced after the prologue's backward, summed over the whole
    mesh; ``own``: averaged over dp alone, launched before the prologue's backward;
    ``own_late``: averaged over dp after it; ``row_sparse``: ids of the parameters whose
    gradient may be row-sparse; ``n_params``: the regions' trainable parameters."""

    users: dict[str, list[int]]
    used: list[str]
    shared: list[nn.Parameter]
    own: list[nn.Parameter]
    own_late: list[nn.Parameter]
    row_sparse: set[int]
    n_params: int


def param_layout(progs: dict, named: dict[str, nn.Parameter], reach: dict, seat: Placement,
                 dp: bool) -> ParamLayout:
    """The layout of ``lbi.programs`` (``progs``) with parameters ``named`` (by
    ``named_parameters``) and prologue reach ``reach`` (``lbi.prologue_param_users()``),
    for the rank ``seat`` describes; ``dp``: whether a dp group averages. Every rank must hold
    the same trainable set (the flat buffers are laid out from it)."""
    names = {id(p): n for n, p in named.items()}
    # insertion order (each program's parameters) lays out the flat buffers: the same
    # on every rank, so never iterate a set of ids here
    users: dict[int, set[int]] = {}
    # a prologue parameter is used by the ranks whose regions (or epilogue) its outputs
    # reach: with canvas_weights="per_region" region k's copy by k's rank alone
    for p in _trainable(progs["prologue"]):
        who = reach.get(names.get(id(p)))
        ranks = (set(range(seat.world)) if who is None else
                 {seat.last if k == "epilogue" else seat.owner[k] for k in who})
        users.setdefault(id(p), set()).update(ranks)
    # an embedding's gradient is zero outside the batch's tokens, unless the epilogue
    # reads it too (a tied head: dense)
    row_sparse = {id(p) for p in _trainable(progs["prologue"])
                  if "epilogue" not in (reach.get(names.get(id(p))) or {"epilogue"})}
    for p in _trainable(progs["epilogue"]):
        users.setdefault(id(p), set()).add(seat.last)
    for k, rgm in enumerate(progs["regions"]):
        for p in _trainable(rgm):
            users.setdefault(id(p), set()).add(seat.owner[k])
    n_params = len({id(p) for rgm in progs["regions"] for p in _trainable(rgm)})
    # (at construction lbi's programs may predate a replaced parameter: the next
    # step's prologue rebuilds them and this runs again)
    by_name = {names[i]: sorted(u) for i, u in users.items() if i in names}
    # reduced after the prologue's backward, summed over the whole mesh: parameters
    # several region ranks use; with one region rank (dp x 1) all of them in one
    # bucket, as the dp bucket started before that backward would miss the prologue's
    late = set(by_name) if dp and seat.world == 1 else set()
    shared = [named[n] for n, u in by_name.items() if len(u) > 1 or n in late]
    used = sorted(n for n, u in by_name.items() if seat.rank in u)
    # averaged over dp alone: the same list on every rank of this rank's dp group
    own = [n for n in used if len(by_name[n]) == 1 and n not in late]
    pro = {id(p) for p in _trainable(progs["prologue"])}
    # final only after the prologue's backward: averaged over dp then, not before
    return ParamLayout(users=by_name, used=used, shared=shared,
                       own=[named[n] for n in own if id(named[n]) not in pro],
                       own_late=[named[n] for n in own if id(named[n]) in pro],
                       row_sparse=row_sparse, n_params=n_params)
