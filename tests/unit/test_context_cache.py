"""Cross-attention keys and values reused across steps: bit-identical outputs, hits and misses by the
identity and version of the context tensors, the bound on kept contexts, and removal."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from wan_dist.parallel.context_cache import ContextCache, cache_context_kv
from wan_dist.wan.loading import load_transformer, read_component_config


def _model_and_inputs(folder, task: str):
    config = read_component_config(folder, "transformer")
    model = load_transformer(folder, torch.float32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config["in_channels"], 3, 6, 10, generator=generator)
    texts = [torch.randn(1, 512, config["text_dim"], generator=generator) for _ in range(2)]
    image = torch.randn(1, 257, config["image_dim"], generator=generator) if task == "i2v" else None
    return model, latents, texts, image


def _forward(model, latents, text, image, t: float = 500.0) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text,
                     encoder_hidden_states_image=image, return_dict=False)[0]


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_steps_with_the_cache_equal_diffusers_bit_for_bit(task, t2v_folder, i2v_folder):
    model, latents, texts, image = _model_and_inputs(t2v_folder if task == "t2v" else i2v_folder, task)
    # Two branches alternating over three steps, as a CFG loop in one process runs them.
    calls = [(text, t) for t in (900.0, 500.0, 100.0) for text in texts]
    expected = [_forward(model, latents, text, image, t) for text, t in calls]
    handle = cache_context_kv(model)
    got = [_forward(model, latents, text, image, t) for text, t in calls]
    assert len(handle.cache) == 2
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    handle.remove()
    assert len(handle.cache) == 0
    assert torch.equal(_forward(model, latents, texts[0], image, 100.0), expected[-2])
    assert all(type(block.attn2.processor).__name__ != "CachedContextAttnProcessor" for block in model.blocks)


def test_a_hit_skips_the_context_projections(t2v_folder):
    model, latents, texts, _ = _model_and_inputs(t2v_folder, "t2v")
    cache_context_kv(model)

    def flops(text) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _forward(model, latents, text, None)
        return counter.get_total_flops()

    first, second = flops(texts[0]), flops(texts[0])
    config = read_component_config(t2v_folder, "transformer")
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    # Per block: keys and values of 512 text tokens, dim x dim each.
    assert first - second == config["num_layers"] * 2 * (2 * 512 * dim * dim)


def test_new_tensors_and_in_place_changes_miss(t2v_folder):
    model, latents, texts, _ = _model_and_inputs(t2v_folder, "t2v")
    handle = cache_context_kv(model, capacity=2)
    text = texts[0].clone()
    first = _forward(model, latents, text, None)
    text.mul_(2.0)  # same object, new content: the version moved on
    changed = _forward(model, latents, text, None)
    other = texts[1].clone()
    _forward(model, latents, other, None)
    other = texts[0].clone()  # a new object with the first content, maybe at a freed object's address
    again = _forward(model, latents, other, None)
    handle.remove()
    assert torch.equal(changed, _forward(model, latents, text, None))
    assert not torch.equal(first, changed)
    assert torch.equal(again, first)


def test_inference_mode_bypasses_the_cache(t2v_folder):
    model, latents, texts, _ = _model_and_inputs(t2v_folder, "t2v")
    expected = _forward(model, latents, texts[0], None)
    handle = cache_context_kv(model)
    with torch.inference_mode():
        text = texts[0].clone()
        out = model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                    return_dict=False)[0]
    assert len(handle.cache) == 0 and torch.equal(out, expected)
    # An inference tensor used later under no_grad has no version counter either.
    assert torch.equal(_forward(model, latents, text, None), expected) and len(handle.cache) == 0


def test_capacity_bounds_the_kept_contexts():
    cache = ContextCache(capacity=2)
    tensors = [torch.zeros(1, 4, 3) for _ in range(3)]
    with torch.no_grad():
        for tensor in tensors:
            cache.select(tensor, None)
        assert len(cache) == 2
        cache.select(tensors[0], None)  # evicted: a new entry, which evicts the oldest again
    assert len(cache) == 2 and cache.current.layers == {}
    with pytest.raises(ValueError, match="capacity"):
        ContextCache(capacity=0)


def test_calls_with_gradients_bypass_the_cache():
    cache = ContextCache()
    text = torch.zeros(1, 4, 3)
    with torch.enable_grad():
        cache.select(text, None)
    assert cache.current is None and len(cache) == 0
    with torch.no_grad():
        cache.select(text, None)
    assert cache.current is not None and len(cache) == 1
