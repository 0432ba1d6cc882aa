"""The World: every process group a run uses, built once from the plan's layout, each with the collective
timeout `parallel.timeout_s`.

It owns the DiT group's mesh (cfg x ring x ulysses), the FSDP shard mesh (that mesh flattened: all DiT
ranks on one axis), one point-to-point group per handoff hop, and the VAE bands' group. Group creation is
collective, so every rank builds the whole World, also the groups it is not part of, in the same order;
then each group's members run one collective on it, so that nccl creates each communicator here, while
every member is known to be arriving, and not lazily inside the first forward, outside every timeout.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .dims import MESH_AXES, DitGroup, Hop, ParallelDims
from .session import new_group_with_timeout

SHARD_AXIS = "shard"


def group_options(timeout_s: float) -> "torch._C._distributed_c10d.Backend.Options":
    """Backend options of the default group's backend with this collective timeout (what DeviceMesh's
    `backend_override` takes); nccl needs its own options class, gloo takes the generic one."""
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = dist.get_backend()
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False  # what new_group gives an nccl group without options
        options._timeout = timeout
        return options
    return dist.ProcessGroupGloo.Options(backend, timeout)


def group_mesh(group: DitGroup, device_type: str, timeout_s: float | None = None) -> DeviceMesh:
    """`group`'s cfg x ring x ulysses mesh. Every rank must call this (group creation is collective); a
    rank outside the group gets a mesh it is not part of and must not use. With `timeout_s`, every axis
    group has that collective timeout; without, the backend's default (gloo 30 min, nccl 10 min)."""
    ranks = torch.tensor(group.ranks).view(group.cfg, group.ring, group.ulysses)
    override = None
    if timeout_s is not None:
        # DeviceMesh passes an axis' backend options' timeout to the group it creates (new_group or
        # split_group): (backend, options) per axis, the backend the default group's; one options object
        # per axis, since group creation writes into it.
        override = tuple((None, group_options(timeout_s)) for _ in MESH_AXES)
    return DeviceMesh(device_type, ranks, mesh_dim_names=MESH_AXES, backend_override=override)


@dataclass
class World:
    """This rank's view of every group of the run (`build_world` makes it)."""

    rank: int
    dims: ParallelDims
    mesh: DeviceMesh  # this rank's DiT group's; a rank outside every group holds the first group's
    shard_mesh: DeviceMesh | None = None  # FSDP2's: the DiT ranks flattened onto one axis
    hops: dict[str, tuple[Hop, dist.ProcessGroup | None]] = field(default_factory=dict)  # None: a local hop
    vae_group: dist.ProcessGroup | None = None

    def axis_group(self, axis: str) -> dist.ProcessGroup:
        return self.mesh.get_group(axis)

    def own_groups(self) -> Iterator[tuple[str, dist.ProcessGroup]]:
        """The groups this rank is a member of, by name, in the order every member warms them."""
        if self.dims.is_dit_rank(self.rank):
            for axis in MESH_AXES:
                yield axis, self.mesh.get_group(axis)
            if self.shard_mesh is not None:
                yield SHARD_AXIS, self.shard_mesh.get_group(SHARD_AXIS)
        for name, (hop, group) in self.hops.items():
            if group is not None and self.rank in hop.ranks:
                yield f"hop {name}", group
        if self.vae_group is not None:
            yield "vae", self.vae_group


def build_world(dims: ParallelDims, hops: tuple[Hop, ...], *, rank: int, device: torch.device,
                timeout_s: float | None, fsdp: bool, vae_ranks: tuple[int, ...]) -> World:
    """Every group of a run with `dims`' layout, its handoff `hops`, the FSDP shard mesh when `fsdp`, and a
    VAE group over `vae_ranks` when the VAE runs in bands. Collective: every rank calls it with the same
    arguments but its own `rank`."""
    # Every group's mesh is built (collective); the rank keeps its own group's.
    meshes = [group_mesh(group, device.type, timeout_s) for group in dims.groups]
    mesh = meshes[dims.groups.index(dims.group_of(rank))]
    shard_mesh = None
    if fsdp:
        # FSDP2 shards over every DiT rank, whatever the layout: the cfg and sequence ranks run the same
        # blocks in the same order, so their all-gathers match. (FSDP is refused under an expert split,
        # so the DiT ranks are one group, and their mesh flattened is all of them in rank order.)
        override = None if timeout_s is None else (None, group_options(timeout_s))
        shard_mesh = meshes[0]._flatten(SHARD_AXIS, backend_override=override)
    # One group per hop that crosses ranks: on nccl, sends and receives between two ranks on one
    # communicator complete in issue order, so rank 0 handing over video i+1 while the DiT leader hands
    # back video i would deadlock on one group.
    hop_groups = {hop.name: (hop, new_group_with_timeout(list(hop.ranks), timeout_s) if hop.remote_dsts else None)
                  for hop in hops}
    vae_group = new_group_with_timeout(list(vae_ranks), timeout_s) if len(vae_ranks) > 1 else None
    world = World(rank=rank, dims=dims, mesh=mesh, shard_mesh=shard_mesh, hops=hop_groups, vae_group=vae_group)
    for _, group in world.own_groups():
        dist.all_reduce(torch.zeros(1, device=device), group=group)
    return world
