"""Where each region runs: the placement of the K regions on the ranks of a group, the
``("dp", "region")`` device mesh, and the check that only m_k crosses ranks.

Kept apart because every consumer needs it without the rest: the pipeline baseline splits
at the same rank boundaries, ``lbi-fx plan`` and the benches model the same placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from lbi_fx.errors import InputError

MESH_DIMS = ("dp", "region")


def placement(K: int, world: int) -> list[list[int]]:
    """Contiguous region groups, one per rank; the first ``K % world`` ranks get one more
    (the last rank also runs the epilogue, so it gets the lighter share)."""
    if K < 1 or world < 1:
        raise InputError(f"placement needs K >= 1 and world >= 1, got K={K}, world={world}")
    if K < world:
        raise InputError(f"{K} regions cannot fill {world} ranks: use world size <= K")
    base, extra = divmod(K, world)
    out, k = [], 0
    for j in range(world):
        n = base + (1 if j < extra else 0)
        out.append(list(range(k, k + n)))
        k += n
    return out


@dataclass(frozen=True)
class Placement:
    """:func:`placement` as one rank of the region group sees it: ``place[j]`` are rank
    j's regions, ``owner[k]`` the rank of region k, ``slot[k]`` its index among its rank's
    regions, ``mine`` this rank's regions; ``last`` runs the epilogue."""

    K: int
    world: int
    rank: int
    place: list[list[int]]
    owner: dict[int, int]
    slot: dict[int, int]
    mine: list[int]
    last: int

    @classmethod
    def of(cls, K: int, world: int, rank: int) -> Placement:
        place = placement(K, world)
        return cls(K=K, world=world, rank=rank, place=place,
                   owner={k: j for j, ks in enumerate(place) for k in ks},
                   slot={k: i for ks in place for i, k in enumerate(ks)},
                   mine=place[rank], last=world - 1)


def check_crossings(spec, owner: dict[int, int], last: int) -> None:
    """Only m_k may cross between ranks; anything else a region (or the epilogue) reads
    from another rank's region would need a hidden-size transfer. ``spec``: the
    ``LBIModule``'s ``program_spec``."""
    made = {n: k for k, p in enumerate(spec.regions) for n in p.outputs}
    readers = [(k, p, owner[k]) for k, p in enumerate(spec.regions)]
    readers.append(("epilogue", spec.epilogue, last))
    for who, prog, rank in readers:
        for n in prog.inputs:
            src = made.get(n)
            if src is None or owner[src] == rank:
                continue
            if who != "epilogue" and n == spec.m_nodes[who]:
                continue
            raise InputError(
                f"region {who} reads {n!r} from region {src} on another rank; only the "
                "interface m_k may cross ranks")


def mesh_groups(mesh, group, K: int) -> tuple:
    """(dp group, region group) for ``RegionParallel``; refuses a bad mesh before any
    collective. Without a mesh: (None, ``group``)."""
    if mesh is None:
        return None, group
    if group is not None:
        raise InputError("RegionParallel got both group= and mesh=: pass the mesh alone (its "
                         "'region' dim is the group the regions are placed over)")
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise InputError(f"mesh= must be a torch.distributed.device_mesh.DeviceMesh, got "
                         f"{type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if names != MESH_DIMS:
        raise InputError(
            f"mesh dims are named {names or 'nothing'}; RegionParallel needs {MESH_DIMS}: "
            "init_device_mesh(device, (dp, region_ranks), mesh_dim_names=('dp', 'region'))")
    n_region = mesh.mesh.shape[1]
    if n_region > K:
        raise InputError(f"mesh dim 'region' has {n_region} ranks but the model has {K} regions: "
                         f"every region rank needs a region, so use at most {K}")
    if mesh.mesh.numel() != dist.get_world_size():
        raise InputError(f"the mesh holds {mesh.mesh.numel()} ranks, the default process group "
                         f"{dist.get_world_size()}: the mesh must span every rank")
    return mesh.get_group("dp"), mesh.get_group("region")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for spawning loopback process groups)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
