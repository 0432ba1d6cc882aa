"""wan_dist: model-parallel Wan2.1 video generation on torch.distributed."""

__version__ = "0.1.0"
