"""parallelize_dit's handle gives the model back bit for bit (2 gloo ranks), and the declarative split plan is
read by generic hooks (a per-token timestep is one more row)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist_utils import run_on_ranks
from wan_dist.wan.loading import load_transformer
from wan_dist.parallel.model_hooks import ModelHooks
from wan_dist.parallel.sequence import Gather, Split, _apply_plan, _ShardLayout


def _inputs(config: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, config["in_channels"], 3, 6, 10, generator=g),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 512, config["text_dim"], generator=g), return_dict=False)


def _state(model: torch.nn.Module) -> tuple:
    """What `remove()` must restore: weights, hooks and the attention processors with their backends."""
    hooks = [(name, len(m._forward_hooks), len(m._forward_pre_hooks), getattr(m, "_compiled_call_impl", None))
             for name, m in model.named_modules()]
    processors = [(name, m.processor, getattr(m.processor, "_attention_backend", None))
                  for name, m in model.named_modules() if hasattr(m, "processor")]
    return hooks, processors, {k: v.clone() for k, v in model.state_dict().items()}


def _roundtrip(rank: int, world_size: int, folder: str) -> dict:
    from wan_dist.parallel.parallelize import parallelize_dit

    model = load_transformer(folder, torch.float32, torch.device("cpu"))
    inputs = _inputs(model.config)
    with torch.no_grad():
        before = model(**inputs)[0]
    state = _state(model)
    group = dist.new_group(list(range(world_size)))
    single = dist.new_group([rank])
    handle = parallelize_dit(model, kernels={"self_attention": "sdpa", "cross_attention": "sdpa",
                                             "sequence_parallel": "sdpa"},
                             device=torch.device("cpu"), ulysses_group=group, ring_group=single,
                             context_cache=True, compile_blocks=True)
    installed = _state(model)[:2] != state[:2]
    handle.remove()
    after_state = _state(model)
    with torch.no_grad():
        after = model(**inputs)[0]
    hooks, processors, weights = after_state
    return {"installed": installed, "same_hooks": hooks == state[0], "same_processors": processors == state[1],
            "same_weights": all(torch.equal(weights[k], state[2][k]) for k in weights),
            "same_output": torch.equal(before, after)}


def test_remove_restores_the_model_bit_for_bit(t2v_folder):
    """Backend, context cache, the sequence split over 2 ranks and compiled blocks all installed, then
    removed: hooks, processors, weights and the forward's output are as before."""
    for result in run_on_ranks(2, _roundtrip, str(t2v_folder), timeout=300):
        assert result == {"installed": True, "same_hooks": True, "same_processors": True, "same_weights": True,
                          "same_output": True}


class _Toy(torch.nn.Module):
    """A model whose forward takes a timestep beside the tokens, as Wan's does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Identity()
        self.seen: dict = {}

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.seen = {"hidden_states": hidden_states.shape, "timestep": timestep.shape}
        return self.proj(hidden_states)


def test_split_plan_rows_are_read_by_generic_hooks():
    """A 2-D (per-token) timestep is split with the tokens, a 1-D one passes whole; the output gathered
    back is cut to the real token count. Rank 1 of 2, 5 tokens: shards of 3, the last one padded."""
    layout = _ShardLayout(ulysses_group=None, ring_group=None, sp_rank=1, sp_size=2)
    toy, handle = _Toy(), ModelHooks()
    _apply_plan(toy, {"": {"timestep": Split(dim=1, ndim=2), "hidden_states": Split(dim=1)},
                      "proj": Gather(dim=1)}, layout, handle)
    layout.gather = lambda tensor, dim: tensor.narrow(dim, 0, 1)  # no peers here: stand in for the gather
    toy(torch.randn(1, 5, 4), timestep=torch.arange(5.0).view(1, 5))
    assert toy.seen == {"hidden_states": (1, 3, 4), "timestep": (1, 3)}
    assert layout.num_tokens == 5 and layout.num_valid == 2
    toy(torch.randn(1, 5, 4), torch.tensor([3.0]))
    assert toy.seen["timestep"] == (1,)
    handle.remove()
    toy(torch.randn(1, 5, 4), torch.arange(5.0).view(1, 5))
    assert toy.seen == {"hidden_states": (1, 5, 4), "timestep": (1, 5)}
