"""The handoff between rank 0 (encoders, VAE, outputs) and the DiT ranks, point to point.

Rank 0 hands each video's inputs (`DitInputs`) to every DiT rank; the DiT leader hands the final latents
back (`DitOutputs`). With an expert split, the high-noise group's leader hands each video's sampling state
(`pipeline.SamplerState`: the latents and the scheduler's history) to every rank of the low-noise group,
whose leader hands the final latents back. What travels is a typed dataclass: its wire format is derived from its fields (in
field order; a fixed-size int64 header gives a magic word, the format's version and, per field, whether it
is present, its dtype and shape), so
both sides agree by construction; no pickling, so it works alike on gloo and nccl. Where rank 0 is a DiT
rank itself (no stage split), the same calls pass the objects through a local queue.

The ordering rule lives here too: video i+1 is handed over before video i is decoded (and with a stage
split or an expert split, before video i's latents are awaited), so the DiT ranks never wait for rank 0's
decode, and the high-noise group can start video i+1 while the low-noise group finishes video i.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
import torch.distributed as dist

from .parallel_dims import ParallelDims
from .pipeline import SamplerState
from .session import Heartbeat, new_group_with_timeout

_HEADER_LEN = 64
_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]


@dataclass(frozen=True)
class DitInputs:
    """What the DiT ranks need for one video, as rank 0 encoded it."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None  # None without guidance
    image_embeds: torch.Tensor | None = None  # I2V: CLIP image hidden states
    condition: torch.Tensor | None = None  # I2V: mask channels + VAE-encoded first frame


@dataclass(frozen=True)
class DitOutputs:
    latents: torch.Tensor


Message = TypeVar("Message", DitInputs, DitOutputs, SamplerState)
_KINDS = (DitInputs, DitOutputs, SamplerState)
# The header starts with a magic word and the wire format's version, then the message's kind (so a
# receiver expecting another kind fails loudly). A transfer that nccl's watchdog aborts leaves the receive
# buffer as it was allocated, all zeros: without the magic word that would read as a valid DitInputs.
HEADER_MAGIC = int.from_bytes(b"wan_dist", "big") & (2**63 - 1)
HEADER_VERSION = 1


def _header(message: Message, device: torch.device) -> torch.Tensor:
    values = [HEADER_MAGIC, HEADER_VERSION, _KINDS.index(type(message))]
    for item in fields(message):
        tensor = getattr(message, item.name)
        values += [0] if tensor is None else [1, _DTYPE_CODES.index(tensor.dtype), tensor.ndim, *tensor.shape]
    if len(values) > _HEADER_LEN:
        raise ValueError(f"{type(message).__name__} has too many or too high-dimensional tensors for one header")
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header.to(device)


def parse_header(values: list[int], kind: type[Message], src: int) -> dict[str, tuple[torch.dtype, list[int]] | None]:
    """Per field of `kind`, the dtype and shape of its tensor (None where absent), from a received header."""
    if values[0] != HEADER_MAGIC:
        raise RuntimeError(f"transfer from rank {src} aborted: its header holds no wan_dist message "
                           f"(the link failed or the transfer was cut short)")
    if values[1] != HEADER_VERSION:
        raise RuntimeError(f"rank {src} sent handoff format version {values[1]}, this rank reads version "
                           f"{HEADER_VERSION}: run the same wan_dist on every rank")
    if not 0 <= values[2] < len(_KINDS) or _KINDS[values[2]] is not kind:
        sent = _KINDS[values[2]].__name__ if 0 <= values[2] < len(_KINDS) else f"message of kind {values[2]}"
        raise RuntimeError(f"rank {src} sent a {sent}, expected a {kind.__name__}")
    pos, specs = 3, {}
    for item in fields(kind):
        if not values[pos]:
            specs[item.name], pos = None, pos + 1
            continue
        dtype, ndim = _DTYPE_CODES[values[pos + 1]], values[pos + 2]
        specs[item.name] = (dtype, values[pos + 3 : pos + 3 + ndim])
        pos += 3 + ndim
    return specs


class PendingSend:
    """Keeps the buffers of a non-blocking send alive until it completes."""

    def __init__(self, works: list, buffers: list[torch.Tensor]) -> None:
        self._works = works
        self._buffers = buffers

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._buffers = [], []

    def done(self) -> bool:
        return all(work.is_completed() for work in self._works)


def _transfer(op, tensors: list[torch.Tensor], peers: list[int], group: dist.ProcessGroup | None) -> list:
    """Each tensor to (or from) each of `peers`, batched: on nccl a batch runs on the group's own
    communicator (new_group_with_timeout creates it), where a lone send/recv would create one for the pair."""
    ops = [dist.P2POp(op, tensor, peer, group=group) for peer in peers for tensor in tensors]
    return dist.batch_isend_irecv(ops) if ops else []


def send_message(message: Message, dst_ranks: list[int], device: torch.device,
                 group: dist.ProcessGroup | None = None) -> PendingSend:
    """Send `message` to each (global) rank of `dst_ranks` over `group`, which must span them and this
    rank; returns without waiting."""
    tensors = [t.detach().to(device).contiguous() for t in (getattr(message, f.name) for f in fields(message))
               if t is not None]
    header = _header(message, device)
    # The header goes in a batch of its own, as the receiver takes it before it knows the rest's shapes.
    works = _transfer(dist.isend, [header], dst_ranks, group) + _transfer(dist.isend, tensors, dst_ranks, group)
    return PendingSend(works, [header, *tensors])


def recv_message(kind: type[Message], src: int, device: torch.device,
                 group: dist.ProcessGroup | None = None) -> Message:
    """Receive what `send_message` sent as a `kind`."""
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
    for work in _transfer(dist.irecv, [header], [src], group):
        work.wait()
    specs = parse_header(header.tolist(), kind, src)
    out = {name: None if spec is None else torch.empty(spec[1], dtype=spec[0], device=device)
           for name, spec in specs.items()}
    for work in _transfer(dist.irecv, [t for t in out.values() if t is not None], [src], group):
        work.wait()
    return kind(**out)


class Handoff:
    """Inputs out of rank 0, latents back to it. Every rank builds it (group creation is collective).

    Point-to-point traffic runs on groups of its own, one per direction (and one for the expert groups'
    handover): on nccl, sends and receives between two ranks on one communicator complete in issue order,
    so rank 0 handing over video i+1 while the DiT leader hands back video i would deadlock on one group.
    """

    def __init__(self, *, rank: int, world_size: int, dims: ParallelDims, device: torch.device,
                 timeout_s: float | None = None, peers: Heartbeat | None = None) -> None:
        """`peers`: where given, a receiver first waits for the sender's post that its message is on the
        way, for as long as the sender is alive (the work before a hand-over, a whole denoise, can take
        longer than the collective timeout), and only then receives, within the timeout."""
        self.rank, self.dims, self.device, self._peers = rank, dims, device, peers
        ranks = list(range(world_size))
        self._inputs_group = new_group_with_timeout(ranks, timeout_s, device)
        self._latents_group = new_group_with_timeout(ranks, timeout_s, device)
        self._experts_group = new_group_with_timeout(ranks, timeout_s, device) if dims.expert_split else None
        self._remote_dit_ranks = [r for r in dims.dit_ranks if r != 0]
        self._local_inputs: deque[DitInputs] = deque()
        self._local_outputs: deque[DitOutputs] = deque()
        self._pending: deque[PendingSend] = deque()
        self.handed_over = 0

    @property
    def ahead(self) -> int:
        """How many videos rank 0 hands over before it awaits the first latents: with a stage split the
        DiT ranks start on video i+1 while rank 0 decodes video i."""
        return 2 if self.dims.stage_split or self.dims.expert_split else 1

    def inputs_ready(self) -> bool:
        """Whether take_inputs would return without this rank's other stage running first: rank 0's own
        DiT stage waits for its encoder stage's hand-over; a receiving rank just waits for the message."""
        return self.rank != 0 or bool(self._local_inputs)

    def _send(self, message: Message, dst_ranks: list[int], group: dist.ProcessGroup, channel: str) -> PendingSend:
        pending = send_message(message, dst_ranks, self.device, group)
        if self._peers is not None:
            for dst in dst_ranks:
                self._peers.post(f"handoff/{channel}/{dst}")
        return pending

    def _recv(self, kind: type[Message], src: int, group: dist.ProcessGroup, channel: str) -> Message:
        if self._peers is not None:
            self._peers.await_post(f"handoff/{channel}/{self.rank}", src)
        return recv_message(kind, src, self.device, group)

    # rank 0
    def hand_over(self, inputs: DitInputs) -> None:
        if self.dims.is_dit_rank(self.rank):
            self._local_inputs.append(inputs)
        if self._remote_dit_ranks:
            self._pending.append(self._send(inputs, self._remote_dit_ranks, self._inputs_group, "inputs"))
        self.handed_over += 1

    def take_latents(self) -> torch.Tensor:
        if self.rank == self.dims.dit_leader:
            return self._local_outputs.popleft().latents
        return self._recv(DitOutputs, self.dims.dit_leader, self._latents_group, "latents").latents

    # DiT ranks
    def take_inputs(self) -> DitInputs:
        if self.rank == 0:
            return self._local_inputs.popleft()
        return self._recv(DitInputs, 0, self._inputs_group, "inputs")

    def hand_back(self, latents: torch.Tensor) -> None:
        """On the DiT leader: the latents of the video just denoised, to rank 0."""
        if self.rank != self.dims.dit_leader:
            return
        if self.rank == 0:
            self._local_outputs.append(DitOutputs(latents))
        else:
            self._send(DitOutputs(latents), [0], self._latents_group, "latents").wait()

    # expert split
    def hand_to_low(self, state: SamplerState) -> None:
        """On the high-noise group's leader: where video's sampling stands after its high-noise steps, to
        every rank of the low-noise group; returns without waiting, so the next video can start."""
        if self.rank != self.dims.groups[0].leader:
            return
        self._pending = deque(p for p in self._pending if not p.done())
        self._pending.append(self._send(state, self.dims.groups[1].ranks, self._experts_group, "experts"))

    def take_from_high(self) -> SamplerState:
        """On a low-noise rank: the next video's sampling state."""
        return self._recv(SamplerState, self.dims.groups[0].leader, self._experts_group, "experts")

    def finish(self) -> None:
        """Wait for the sends still in flight (their buffers must outlive them)."""
        while self._pending:
            self._pending.popleft().wait()

