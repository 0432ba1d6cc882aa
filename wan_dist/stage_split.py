"""Moving work between the encoder/VAE rank (rank 0) and the DiT ranks, point to point.

Rank 0 encodes prompts (and the I2V image) and sends the embeddings to every DiT rank; the DiT leader
sends the final latents back. Sends are non-blocking so that, with a stage split and a prompt queue,
rank 0 can hand over video i+1 and then decode video i while the DiT ranks denoise i+1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Tensors travel as a fixed-size int64 header (names are agreed by order, shapes and dtypes are sent)
# followed by the tensors themselves; no pickling, so it works alike on gloo and nccl.
_HEADER_LEN = 64
_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]


def _header(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    values = [len(tensors)]
    for tensor in tensors:
        values += [_DTYPE_CODES.index(tensor.dtype), tensor.ndim, *tensor.shape]
    if len(values) > _HEADER_LEN:
        raise ValueError("too many or too high-dimensional tensors for one transfer")
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values)
    return header.to(device)


class PendingSend:
    """Keeps the buffers of a non-blocking send alive until it completes."""

    def __init__(self, works: list, buffers: list[torch.Tensor]) -> None:
        self._works = works
        self._buffers = buffers

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._buffers = [], []


def send_tensors(
    tensors: dict[str, torch.Tensor], dst_ranks: list[int], device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> PendingSend:
    """Send `tensors` (in key order) to each (global) rank of `dst_ranks` over `group`, which must span
    all ranks; returns without waiting."""
    values = [tensors[name].detach().to(device).contiguous() for name in sorted(tensors)]
    header = _header(values, device)
    works = []
    for dst in dst_ranks:
        works.append(dist.isend(header, dst, group=group))
        works += [dist.isend(value, dst, group=group) for value in values]
    return PendingSend(works, [header, *values])


def recv_tensors(
    names: list[str], src: int, device: torch.device, group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Receive what `send_tensors` sent under `names` (sorted the same way on both sides)."""
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    values = header.tolist()
    count, pos = values[0], 1
    if count != len(names):
        raise RuntimeError(f"rank {src} sent {count} tensors, expected {len(names)} ({sorted(names)})")
    out = {}
    for name in sorted(names):
        dtype, ndim = _DTYPE_CODES[values[pos]], values[pos + 1]
        shape = values[pos + 2 : pos + 2 + ndim]
        pos += 2 + ndim
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buffer, src, group=group)
        out[name] = buffer
    return out
