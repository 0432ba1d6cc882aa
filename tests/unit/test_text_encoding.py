"""TextEncoder against diffusers' WanPipeline.encode_prompt; the embedding cache; BackgroundEncoder."""

from __future__ import annotations

import threading

import pytest
import torch

from wan_dist.wan.loading import load_text_encoder, load_tokenizer
from wan_dist.config.presets import TEXT_MAX_TOKENS
from wan_dist.run.text_encoding import BackgroundEncoder, PromptJob, TextEncoder

PROMPTS = [
    "A red panda rides a bicycle through a sunlit bamboo forest.",
    "  Fish &amp; chips   on a   plate, &lt;b&gt;bold&lt;/b&gt;  \n  ",
    "x",
]


@pytest.fixture(scope="module")
def components(t2v_folder):
    return load_tokenizer(t2v_folder), load_text_encoder(t2v_folder, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference_pipe(t2v_folder):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(t2v_folder, dtype=torch.float32)


def reference(pipe, prompt: str) -> torch.Tensor:
    # Under no_grad, as WanPipeline.__call__ runs it (with grad enabled, CPU SDPA takes another kernel and
    # the last bits differ).
    with torch.no_grad():
        return pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512,
                                  device="cpu")[0]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["plain", "html-spaces", "one-char"])
def test_matches_diffusers_exactly(components, reference_pipe, prompt):
    encoder = TextEncoder(*components)
    ours = encoder.encode(prompt)
    ref = reference(reference_pipe, prompt)
    assert ours.shape == ref.shape == (1, TEXT_MAX_TOKENS, 32)
    assert ours.dtype == ref.dtype == torch.float32
    assert ours.device.type == "cpu"
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_prompts_differ(components):
    encoder = TextEncoder(*components)
    a, b = encoder.encode(PROMPTS[0]), encoder.encode(PROMPTS[2])
    assert not torch.equal(a, b)


def test_html_and_spaces_are_cleaned(components):
    encoder = TextEncoder(*components)
    messy = encoder.encode("  a   &amp;  b ")
    clean = encoder.encode("a & b")
    torch.testing.assert_close(messy, clean, rtol=0, atol=0)


@pytest.mark.parametrize("prompt, length", [("abc", 4), ("x", 2), ("a b", 4)])
def test_zero_past_prompt_length(components, prompt, length):
    """Character tokenizer: one token a character plus </s>; everything after it is exactly zero."""
    embeds = TextEncoder(*components).encode(prompt)
    assert (embeds[0, :length].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(embeds[0, length:]) == 0


def test_long_prompt_is_truncated_to_512(components):
    embeds = TextEncoder(*components).encode("ab" * 400)
    assert embeds.shape[1] == TEXT_MAX_TOKENS
    assert (embeds[0].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------------ cache


def test_disk_cache(components, tmp_path):
    cache = tmp_path / "cache"
    encoder = TextEncoder(*components, cache_dir=str(cache), cache_key="tiny-t2v")
    first = encoder.encode(PROMPTS[0])
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    again = encoder.encode(PROMPTS[0])
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert sorted(cache.iterdir()) == files

    encoder.encode(PROMPTS[1])
    encoder.encode(PROMPTS[2])
    assert len(list(cache.iterdir())) == 3
    assert all(p.suffix == ".pt" for p in cache.iterdir())  # no temp files left


def test_disk_cache_is_read(components, tmp_path):
    """A second encoder with no tokenizer can only answer from the cache."""
    tokenizer, model = components
    TextEncoder(tokenizer, model, cache_dir=str(tmp_path), cache_key="k").encode(PROMPTS[0])
    cached = TextEncoder(None, model, cache_dir=str(tmp_path), cache_key="k").encode(PROMPTS[0])
    torch.testing.assert_close(cached, TextEncoder(tokenizer, model).encode(PROMPTS[0]), rtol=0, atol=0)
    with pytest.raises(TypeError):
        TextEncoder(None, model, cache_dir=str(tmp_path), cache_key="k").encode(PROMPTS[1])


def test_disk_cache_keyed_by_model(components, tmp_path):
    tokenizer, model = components
    TextEncoder(tokenizer, model, cache_dir=str(tmp_path), cache_key="model-a").encode("x")
    TextEncoder(tokenizer, model, cache_dir=str(tmp_path), cache_key="model-b").encode("x")
    assert len(list(tmp_path.iterdir())) == 2


def test_encode_job(components):
    encoder = TextEncoder(*components)
    guided = encoder.encode_job(PromptJob(index=0, prompt="a", negative_prompt="b"))
    assert set(guided) == {"prompt_embeds", "negative_prompt_embeds"}
    torch.testing.assert_close(guided["negative_prompt_embeds"], encoder.encode("b"), rtol=0, atol=0)
    unguided = encoder.encode_job(PromptJob(index=0, prompt="a", negative_prompt=None))
    assert set(unguided) == {"prompt_embeds"}


def test_empty_negative_prompt_matches_diffusers(components, reference_pipe):
    """Guidance with the default negative prompt "" encodes it like diffusers does."""
    ours = TextEncoder(*components).encode("")
    with torch.no_grad():
        ref = reference_pipe.encode_prompt("a", negative_prompt="", do_classifier_free_guidance=True,
                                           max_sequence_length=512, device="cpu")[1]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- BackgroundEncoder


class FakeEncoder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def encode_job(self, job: PromptJob) -> dict[str, torch.Tensor]:
        self.calls.append(job.index)
        self.threads.add(threading.current_thread().name)
        if job.index == self.fail_at:
            raise RuntimeError(f"encoder broke on job {job.index}")
        return {"prompt_embeds": torch.full((1, 3), float(job.index))}


def jobs(n: int) -> list[PromptJob]:
    return [PromptJob(index=i, prompt=f"prompt {i}", negative_prompt=None) for i in range(n)]


def test_background_encoder_yields_every_job_in_order():
    fake = FakeEncoder()
    queue = jobs(6)
    background = BackgroundEncoder(fake, queue, ahead=2)
    try:
        got = list(background)
    finally:
        background.close()
    assert [job for job, _, _ in got] == queue
    for job, tensors, seconds in got:
        assert set(tensors) == {"prompt_embeds"}
        assert torch.equal(tensors["prompt_embeds"], torch.full((1, 3), float(job.index)))
        assert isinstance(seconds, float) and seconds >= 0
    assert fake.calls == list(range(6))
    assert threading.current_thread().name not in fake.threads  # encoded in the background


def test_background_encoder_empty_queue():
    background = BackgroundEncoder(FakeEncoder(), [], ahead=2)
    try:
        assert list(background) == []
    finally:
        background.close()


def test_background_encoder_reraises_in_consumer():
    background = BackgroundEncoder(FakeEncoder(fail_at=2), jobs(5), ahead=2)
    seen = []
    try:
        with pytest.raises(RuntimeError, match="encoder broke on job 2"):
            for job, _, _ in background:
                seen.append(job.index)
    finally:
        background.close()
    assert seen == [0, 1]


def test_background_encoder_close_early_stops_the_thread():
    fake = FakeEncoder()
    background = BackgroundEncoder(fake, jobs(50), ahead=1)
    first = next(iter(background))
    background.close()
    assert first[0].index == 0
    assert not background._thread.is_alive()
    # bounded look-ahead: one taken, at most one waiting in the queue, at most one in hand
    assert len(fake.calls) <= 3


def test_background_encoder_with_real_encoder(components):
    encoder = TextEncoder(*components)
    queue = [PromptJob(index=i, prompt=p, negative_prompt="blurry") for i, p in enumerate(PROMPTS)]
    background = BackgroundEncoder(encoder, queue)
    try:
        got = list(background)
    finally:
        background.close()
    assert [job.index for job, _, _ in got] == [0, 1, 2]
    for job, tensors, _ in got:
        torch.testing.assert_close(tensors["prompt_embeds"], encoder.encode(job.prompt), rtol=0, atol=0)
        torch.testing.assert_close(tensors["negative_prompt_embeds"], encoder.encode("blurry"), rtol=0, atol=0)


def test_cpu_flags_and_the_encoder_dtype(tmp_path):
    from wan_dist.wan.loading import cpu_encoder_dtype, cpu_flags

    x86 = tmp_path / "cpuinfo"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert {"avx512f", "amx_bf16"} <= cpu_flags(str(x86))
    arm = tmp_path / "cpuinfo_arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "bf16" in cpu_flags(str(arm))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()

    fast, slow = frozenset({"amx_bf16"}), frozenset({"avx2"})
    assert cpu_encoder_dtype("auto", dit_on_gpu=True, flags=fast) is torch.bfloat16
    assert cpu_encoder_dtype("auto", dit_on_gpu=True, flags=slow) is None
    assert cpu_encoder_dtype("auto", dit_on_gpu=False, flags=fast) is None  # the fp32 reference run
    assert cpu_encoder_dtype("fp32", dit_on_gpu=True, flags=fast) is None


def test_encoder_thread_count():
    from wan_dist.run.text_encoding import encoder_thread_count

    assert encoder_thread_count(16, 1) == 15
    assert encoder_thread_count(64, 8) == 56
    assert encoder_thread_count(4, 8) == 1


class _ThreadProbe(torch.nn.Module):
    """A text encoder stand-in that records torch's thread count while it runs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim))
        self.seen: list[int] = []

    def forward(self, input_ids, mask):
        from types import SimpleNamespace

        self.seen.append(torch.get_num_threads())
        return SimpleNamespace(last_hidden_state=self.weight.expand(*input_ids.shape, -1).clone())


def test_encoding_runs_on_its_threads_and_gives_them_back(components):
    tokenizer, _ = components
    before = torch.get_num_threads()
    wanted = before + 2
    probe = _ThreadProbe(8)
    encoder = TextEncoder(tokenizer, probe, dtype=torch.float32, threads=wanted)
    in_thread = []

    def encode_in_a_thread():
        start = torch.get_num_threads()
        encoder.encode("a lighthouse")
        in_thread.append((start, torch.get_num_threads()))

    thread = threading.Thread(target=encode_in_a_thread)
    thread.start()
    thread.join()
    assert probe.seen == [wanted]
    assert in_thread[0][1] == in_thread[0][0] != wanted
    assert torch.get_num_threads() == before
