"""Time the VAE decode alone, on one rank against several (patch-parallel bands, wan_dist/parallel/vae_bands.py).

    python launch/vae_bench.py                                  # Wan2.1 VAE, 64x64 px, 5 frames, 1 and 2 ranks
    python launch/vae_bench.py --ranks 1 2 4 --height 96 --width 160 --num-frames 9 --json vae_bench.json
    python launch/vae_bench.py --config '{"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}'

The VAE is the real Wan2.1 architecture (base_dim 96, dim_mult 1,2,4,4, two residual blocks, z_dim 16)
with random weights, fp32 on CPU, one thread per rank, each rank its own process on gloo. Each world
decodes the same latents twice: first counting live tensor bytes (the per-rank peak; wan_dist/
parallel/live_memory.py), then timed between barriers (the gather to rank 0 included). Reported per world: the
seconds, the speed-up over the first world, each rank's peak and the largest difference from the first
world's video (the bands are exact, so it is at rounding level). On a shared or virtual machine the
speed-up also says how much of a second core there was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAN21_VAE: dict[str, Any] = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: dict, latent_shape: tuple, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np
    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKLWan

    from wan_dist.parallel.live_memory import LiveTensorBytes
    from wan_dist.parallel.vae_bands import decode_patch_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        # The same seed on every rank: every rank builds the same weights and latents, no broadcast needed.
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**config).eval()
        latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))
        with LiveTensorBytes() as live:
            decode_patch_parallel(latents, vae)
        dist.barrier()
        start = time.perf_counter()
        video = decode_patch_parallel(latents, vae)
        dist.barrier()
        seconds = time.perf_counter() - start
    finally:
        dist.destroy_process_group()
    result = {"rank": rank, "seconds": seconds, "peak_bytes": live.peak}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    if video is not None:
        np.save(Path(out_dir, "video.npy"), video.numpy())


def run_vae_bench(
    ranks: tuple[int, ...] = (1, 2),
    height: int = 64,
    width: int = 64,
    num_frames: int = 5,
    *,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode ``num_frames`` frames of ``height`` x ``width`` with the Wan2.1 VAE (or ``config``) on each
    world size in ``ranks``; returns ``{"size": ..., "results": [{"ranks", "seconds", "speedup",
    "peak_bytes": [per rank], "max_abs_diff"}, ...]}``, speed-up and difference against the first world."""
    import numpy as np
    import torch.multiprocessing as mp

    config = {**WAN21_VAE, **(config or {})}
    factor = 2 ** (len(config["dim_mult"]) - 1)
    if height % factor or width % factor or (num_frames - 1) % 4:
        raise ValueError(f"height and width must be multiples of {factor} and num_frames of the form 4k+1, "
                         f"got {height}x{width}x{num_frames}")
    latent_shape = (1, config["z_dim"], (num_frames - 1) // 4 + 1, height // factor, width // factor)
    results, first_video = [], None
    for world in ranks:
        with tempfile.TemporaryDirectory(prefix="vae_bench_") as out_dir:
            mp.spawn(_worker, args=(world, _free_port(), config, latent_shape, out_dir), nprocs=world)
            per_rank = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world)]
            video = np.load(Path(out_dir, "video.npy"))
        first_video = video if first_video is None else first_video
        seconds = max(r["seconds"] for r in per_rank)
        results.append({
            "ranks": world, "seconds": seconds, "speedup": results[0]["seconds"] / seconds if results else 1.0,
            "peak_bytes": [r["peak_bytes"] for r in per_rank],
            "max_abs_diff": float(np.abs(video - first_video).max()),
        })
    return {"size": {"height": height, "width": width, "num_frames": num_frames}, "config": config,
            "results": results}


def markdown(report: dict[str, Any]) -> str:
    size = report["size"]
    lines = [
        f"VAE decode, {size['height']}x{size['width']}, {size['num_frames']} frames (fp32, CPU, 1 thread per rank)",
        "",
        "| ranks | decode s | speed-up | peak per rank (MiB) | max abs diff vs first |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in r["peak_bytes"])
        lines.append(f"| {r['ranks']} | {r['seconds']:.2f} | {r['speedup']:.2f} | {peaks} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=5)
    parser.add_argument("--config", type=json.loads, help="AutoencoderKLWan keyword arguments as JSON "
                        "(default: the Wan2.1 VAE's)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run_vae_bench(tuple(args.ranks), args.height, args.width, args.num_frames, config=args.config)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
