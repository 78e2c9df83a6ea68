"""Generate the backward program: Algorithm 1 as a printable ``fx.GraphModule``.

The graph's nodes are the three phases, named for them:

* ``phase1_jacobian_k``  J_k = dm_{k+1}/dm_k, one node per region k < K-1 (independent);
* ``phase2_seed``        one VJP through the last region with the epilogue's gradient;
  ``phase2_suffix_scan`` the suffix products P_k (one kernel node); ``phase2_adjoints``
  mbar_k = P_k mbar_{K-1};
* ``phase3_local_k``     one VJP per region seeded with mbar_{k+1} (independent);
* ``grad_*``             shared inputs (tied weights, the canvas) sum their regions' shares.

No node runs reverse mode through more than one region.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch.fx as fx

from lbi_fx import runtime as ops


def build_backward_graph(
    num_regions: int,
    n_grad_outs: int,
    region_static: list[list[int]],
    region_params: list[list[int]],
    n_static: int,
    n_params: int,
    scan: Callable,
    scan_backend: str = "auto",
) -> fx.Graph:
    """``region_static[k]`` / ``region_params[k]``: chain-input slots region k reads, in the
    order its local VJP returns them."""
    K = num_regions
    g = fx.Graph()
    state = g.placeholder("state")
    grad_outs = [g.placeholder(f"grad_out_{i}") for i in range(n_grad_outs)]

    def call(fn, args, name):
        return g.create_node("call_function", fn, tuple(args), {}, name=name)

    def item(node, i, name):
        return g.create_node("call_function", operator.getitem, (node, i), {}, name=name)

    jac = [call(ops.region_jacobian, (state, k), f"phase1_jacobian_{k}") for k in range(K - 1)]
    seed = call(ops.last_region_vjp, (state, *grad_outs), "phase2_seed")
    mbar_last = item(seed, 0, f"mbar_{K - 1}")
    stacked = call(ops.stack_jacobians, (jac,), "phase2_stack")
    suffix = call(scan, (stacked, scan_backend), "phase2_suffix_scan")
    adjoints = call(ops.interface_adjoints, (state, suffix, mbar_last), "phase2_adjoints")
    mbar = [item(adjoints, k, f"mbar_{k}") for k in range(K - 1)] + [mbar_last]
    shares_static: list[list[fx.Node]] = [[] for _ in range(n_static)]
    shares_param: list[list[fx.Node]] = [[] for _ in range(n_params)]
    for k in range(K):
        if k < K - 1:
            local, offset = call(ops.region_local_vjp, (state, k, mbar[k + 1]), f"phase3_local_{k}"), 0
        else:
            local, offset = seed, 1
        for j, slot in enumerate(region_static[k]):
            shares_static[slot].append(item(local, offset + j, f"r{k}_static_{slot}"))
        base = offset + len(region_static[k])
        for j, slot in enumerate(region_params[k]):
            shares_param[slot].append(item(local, base + j, f"r{k}_param_{slot}"))
    def total(shares, name):
        if not shares:
            return None
        return shares[0] if len(shares) == 1 else call(ops.accumulate, shares, name)

    grads = [mbar[0]]
    grads += [total(s, f"grad_static_{i}") for i, s in enumerate(shares_static)]
    grads += [total(s, f"grad_param_{i}") for i, s in enumerate(shares_param)]
    g.output(tuple(grads))
    g.lint()
    return g
