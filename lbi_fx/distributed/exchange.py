"""The backward's exchanges: how each rank gets mbar at its regions' boundaries without
any rank sending an activation gradient of the hidden size.

``"allgather"`` (the paper's): Exchange 1 is ONE all-gather of every rank's J_k,
zero-padded to a common (B, slots, r, r) - the scan payload; Exchange 2 a broadcast of
mbar_{K-1} (B x r) from the last rank. Each rank then runs ``suffix_scan`` over J_{k0} ..
J_{K-2} (k0 = its first region) and takes mbar_{k+1} = P_{k+1} mbar_{K-1}: no rank waits
for another beyond one collective.

``"relay"`` keeps the J_k on their rank and passes mbar back rank to rank instead: rank j
receives mbar at its right boundary (B x r), turns it into mbar at each of its boundaries
with its own suffix scan, and sends mbar at its left boundary on. The relay is sequential
over ranks, but a hop costs a few r x r products, and its bytes are B x r per boundary,
independent of K.

With micro-batches either exchange carries every micro-batch of the step at once (one
all-gather or one relay message).
"""

from __future__ import annotations

import torch

from lbi_fx.distributed.comm import Comm
from lbi_fx.distributed.mesh import Placement
from lbi_fx.distributed.traffic import _Timer
from lbi_fx.distributed.watch import Watch
from lbi_fx.kernels import suffix_scan
from lbi_fx.runtime import interface_adjoints

LBI_BACKWARD_PHASES = ("scan_allgather", "mbar_broadcast", "mbar_relay")
# how the backward's r-sized exchange runs (RegionParallel(exchange=...))
EXCHANGES = ("allgather", "relay")


def row_slices(fs: list[dict]) -> list[slice]:
    """Each micro-batch's rows in the step's concatenated batch."""
    out, at = [], 0
    for f in fs:
        n = f["m0"].shape[0]
        out.append(slice(at, at + n))
        at += n
    return out


def adjoints_allgather(comm: Comm, W: Watch, seat: Placement, fs: list[dict],
                       T: _Timer) -> dict[int, torch.Tensor | None]:
    """The paper's exchange: every rank's J_k (all micro-batches in one payload) to
    every rank, mbar_{K-1} broadcast; each rank scans from its first region on."""
    K = seat.K
    state, widths = fs[0]["state"], fs[0]["widths"]
    r, k0 = state.r_max, seat.mine[0]
    payload = torch.cat([f["m0"].new_zeros(f["m0"].shape[0], max(map(len, seat.place)), r, r)
                         for f in fs])
    mbar_last = torch.cat([f["m0"].new_zeros(f["m0"].shape[0], widths[K - 1]) for f in fs])
    rows = row_slices(fs)
    for f, sl in zip(fs, rows):
        for k, J in f["jac"].items():
            payload[sl, seat.slot[k]] = J
        if f["mbar_last"] is not None:
            mbar_last[sl] = f["mbar_last"]
            # region K-1 has no J: its slot carries "mbar_{K-1} exists" at no extra bytes
            payload[sl, seat.slot[K - 1], 0, 0] = 1
    W.enter("scan-exchange")
    with T("allgather"):
        gathered = comm.all_gather(payload, "scan_allgather")
    with T("broadcast"):
        comm.broadcast(mbar_last, seat.last, "mbar_broadcast")
    has_mbar = bool(gathered[seat.last, 0, seat.slot[K - 1], 0, 0] == 1)
    mbar = {K - 1: mbar_last if has_mbar else None}
    if k0 < K - 1:
        W.enter("scan")
        with T("scan"):
            J = torch.stack([gathered[seat.owner[k], :, seat.slot[k]]
                             for k in range(k0, K - 1)], 1)
            P = suffix_scan(J, state.scan_backend)           # P_k = J_k^T ... J_{K-2}^T
            adj = interface_adjoints(state, P, mbar[K - 1], start=k0)
            mbar.update({k0 + i: a for i, a in enumerate(adj)})
    return mbar


def adjoints_relay(comm: Comm, W: Watch, seat: Placement, fs: list[dict],
                   T: _Timer) -> dict[int, torch.Tensor | None]:
    """Bytes at a minimum: the J_k stay on their rank. mbar at this rank's right
    boundary comes from the next rank (B x r, one message for all micro-batches), the
    rank's own suffix scan turns it into mbar for each of its boundaries, and mbar at
    its left boundary goes to the previous rank. The relay is sequential over ranks,
    but each hop is a few r x r products, not a VJP."""
    K = seat.K
    state, widths = fs[0]["state"], fs[0]["widths"]
    k0, k1 = seat.mine[0], seat.mine[-1] + 1
    B = sum(f["m0"].shape[0] for f in fs)
    W.enter("scan-exchange")
    if seat.rank == seat.last:
        have = [f["mbar_last"] is not None for f in fs]
        nxt = torch.cat([f["mbar_last"] for f in fs]) if all(have) else None
        at = K - 1
    else:
        with T("relay"):
            buf = comm.recv(fs[0]["m0"].new_empty(B, widths[k1] + 1), seat.rank + 1,
                            "mbar_relay")
        nxt = buf[:, :-1] if bool(buf[0, -1] == 1) else None
        at = k1
    mbar = {at: nxt}
    ks = [k for k in seat.mine if k < K - 1]
    if ks:
        W.enter("scan")
        with T("scan"):
            J = torch.stack([torch.cat([f["jac"][k] for f in fs]) for k in ks], 1)
            P = suffix_scan(J, state.scan_backend)  # P_k = J_k^T ... J_{at-1}^T
            adj = interface_adjoints(state, P, nxt, start=k0)
            mbar.update({k0 + i: a for i, a in enumerate(adj)})
    if seat.rank > 0:
        out = fs[0]["m0"].new_zeros(B, widths[k0] + 1)
        if mbar[k0] is not None:
            out[:, :-1] = mbar[k0]
            out[:, -1] = 1
        with T("relay"):
            comm.wait_send(comm.isend(out, seat.rank - 1, "mbar_relay"), seat.rank - 1,
                           "mbar_relay")
    return mbar



# exchange= -> the function that runs it
ADJOINTS = {"allgather": adjoints_allgather, "relay": adjoints_relay}
