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

from .dims import INPUTS, LATENTS, STATE
from ..wan.pipeline import SamplerState
from .session import Heartbeat
from .world import World

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


# What each hop carries.
HOP_MESSAGES: dict[str, type] = {INPUTS: DitInputs, STATE: SamplerState, LATENTS: DitOutputs}


class Handoff:
    """Each video's messages along the plan's hops (dims.Hop), each hop on a group of its own
    (world.World). A rank sends on the hops it is the source of and receives on those it is a destination
    of; a hop from a rank to itself passes through a local queue."""

    def __init__(self, world: World, device: torch.device, peers: Heartbeat | None = None) -> None:
        """`peers`: where given, a receiver first waits for the sender's post that its message is on the
        way, for as long as the sender is alive (the work before a hand-over, a whole denoise, can take
        longer than the collective timeout), and only then receives, within the timeout."""
        self.rank, self.device, self._peers = world.rank, device, peers
        self._hops = world.hops
        self._local: dict[str, deque] = {name: deque() for name in self._hops}
        self._pending: deque[PendingSend] = deque()
        self.handed_over = 0  # rank 0: the videos whose inputs are on their way

    @property
    def ahead(self) -> int:
        """How many videos rank 0 hands over before it awaits the first latents: where the latents come
        from another rank (a stage split, an expert split), that rank starts on video i+1 while rank 0
        decodes video i."""
        return 1 if self._hops[LATENTS][0].src == 0 else 2

    def ready(self, name: str) -> bool:
        """Whether receive(name) would return without this rank's other stage running first: a message
        this rank sends itself must have been sent; a remote one is just waited for."""
        hop, _ = self._hops[name]
        return hop.src != self.rank or bool(self._local[name])

    def send(self, name: str, message: Message) -> None:
        """On the hop's source: `message` to each destination, without waiting (a later send may pass
        it). Elsewhere: nothing."""
        hop, group = self._hops[name]
        if hop.src != self.rank:
            return
        if self.rank in hop.dsts:
            self._local[name].append(message)
        if hop.remote_dsts:
            self._pending = deque(p for p in self._pending if not p.done())
            self._pending.append(send_message(message, hop.remote_dsts, self.device, group))
            if self._peers is not None:
                for dst in hop.remote_dsts:
                    self._peers.post(f"handoff/{name}/{dst}")
        if name == INPUTS:
            self.handed_over += 1

    def receive(self, name: str) -> Message:
        """On a destination of the hop: its next message."""
        hop, group = self._hops[name]
        if hop.src == self.rank:
            return self._local[name].popleft()
        if self._peers is not None:
            self._peers.await_post(f"handoff/{name}/{self.rank}", hop.src)
        return recv_message(HOP_MESSAGES[name], hop.src, self.device, group)

    def finish(self) -> None:
        """Wait for the sends still in flight (their buffers must outlive them)."""
        while self._pending:
            self._pending.popleft().wait()
