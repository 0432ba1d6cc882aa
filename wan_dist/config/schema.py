"""Run configuration: the schema Hydra fills, and the presets registered as its `model=` and `parallel=`
groups (from the one table in config/presets.py). Nothing else: the checks against a folder and the world are in
plan/checks.py, Hydra's error translation beside the entry point.

The dataclasses are registered in Hydra's ConfigStore, so unknown keys and wrong types are refused by
Hydra itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .errors import ConfigError  # noqa: F401  (re-exported: the error every check raises)
from .presets import EXPERTS, LAYOUTS, MODEL_PRESETS, PARALLEL_PRESETS, Sampling

DTYPES = ("auto", "bf16", "fp16", "fp32")
# How the DiT's weights are stored between uses: `auto` in the compute dtype, or fp8 cast per layer.
STORAGE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
OFFLOADS = ("none", "block")
DEVICES = ("cpu", "gpu")
# `euler_distill` / `lcm_distill`: on the timesteps the 4-step distilled LoRAs were trained on, Euler steps or
# a clean-latent prediction noised afresh to the next step (wan/schedulers.py).
SCHEDULERS = ("unipc", "euler", "euler_distill", "lcm_distill")
SWITCHES = ("auto", "true", "false")
VAE_SPLITS = ("rank0", "patch")
TASKS = ("t2v", "i2v", "flf2v")
# Which expert of a two-expert model a LoRA goes into (diffusers: `load_into_transformer_2`).
BOTH_EXPERTS = "both"
LORA_EXPERTS = (*(expert.noise for expert in EXPERTS), BOTH_EXPERTS)


# The Hydra config folder of launch/generate.py, serve.py and plan.py.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def is_guided(guidance_scale: float) -> bool:
    """Whether the unconditional branch runs at all (diffusers' do_classifier_free_guidance)."""
    return guidance_scale > 1.0


def lora_experts(expert: str | None) -> tuple[int, ...]:
    """The experts (0: high noise, the only one of a one-expert model; 1: low noise) a LoRA goes into."""
    if expert == BOTH_EXPERTS:
        return tuple(range(len(EXPERTS)))
    return (LORA_EXPERTS.index(expert or EXPERTS[0].noise),)
ATTENTION_KERNELS = ("auto", "fa3", "fa2", "cudnn", "sdpa")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    path: str | None = None
    # Derived, not chosen (the plan reads it from model.path's model_index.json, or from the preset); a value
    # given here must agree with it.
    task: str | None = None
    dit_dtype: str = "auto"
    # DiT weights stored in fp8 and cast per layer to dit_dtype for compute (diffusers' layerwise casting,
    # the model's own skip patterns): lossy, half a bf16 replica's bytes.
    dit_storage_dtype: str = "auto"
    # `block`: the DiT's blocks kept in pinned CPU memory and streamed to the GPU one block ahead of use
    # (diffusers' group offloading); for a card smaller than the DiT.
    dit_offload: str = "none"
    vae_dtype: str = "fp32"
    # Tiled VAE decode (and I2V encode), diffusers' enable_tiling: bounded memory at 720p and above.
    vae_tiling: bool = False
    text_encoder_dtype: str = "auto"
    text_encoder_device: str = "cpu"
    # Pickle checkpoints (.bin/.pt) can run code when read; only safetensors are read unless this is set,
    # and even then through torch.load(weights_only=True).
    allow_pickle: bool = False
    # A real preset's official architecture with random weights, built locally: benchmarks without a download.
    random_weights: bool = False


@dataclass
class ParallelConfig:
    preset: str = "auto"
    cfg_degree: int | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    stage_split: bool | None = None
    timeout_s: float = 1800.0
    # The DiT's weights sharded over all DiT ranks with FSDP2: auto (when a replica does not fit the
    # device; never on CPU), true or false.
    fsdp: str = "auto"
    # The VAE decode (and the I2V condition encode) on rank 0, or split into exact bands over all ranks.
    vae_decode: str = "rank0"
    vae_encode: str = "rank0"
    # Wan2.2 two-expert models: the DiT ranks split into a high-noise and a low-noise group, each holding
    # only its expert and running only its steps; over a prompt queue, video i+1's high-noise steps run
    # beside video i's low-noise ones.
    expert_split: bool = False
    # [high, low] ranks per group (unset: in proportion to the steps each expert runs).
    expert_ranks: list[int] | None = None
    # CPU runs under torchrun: each rank on an equal share of the node's cores when ranks x threads fit.
    pin_cpus: bool = True

    @property
    def fsdp_setting(self) -> str:
        """`fsdp` spelt as one of SWITCHES (YAML's true arrives as a bool)."""
        return str(self.fsdp).lower()


@dataclass
class OutputConfig:
    dir: str | None = None
    save_frames: bool = False
    overwrite: bool = False


@dataclass
class LoraConfig:
    path: str = MISSING
    scale: float = 1.0
    # Two-expert models only: high, low or both (unset: high, as diffusers' load_lora_weights).
    expert: str | None = None


@dataclass
class RunConfig(Sampling):
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    prompt: str = "A red panda rides a bicycle through a sunlit bamboo forest."
    image: str | None = None
    # FLF2V: the video's last frame (`image` is its first).
    last_image: str | None = None
    prompts_file: str | None = None
    scheduler: str = "unipc"
    seed: int = 0
    lora: list[LoraConfig] = field(default_factory=list)
    # Optional text-embedding cache folder; empty disables it.
    embedding_cache: str | None = None
    # Attention kernel: auto (the fastest available: fa3, fa2, cudnn, sdpa) or one of them by name.
    attention: str = "auto"
    # torch.compile each DiT block (the first steps are slower while it compiles); with fp8 storage and
    # FSDP too, not with model.dit_offload=block.
    compile: bool = False
    # Each block's cross-attention keys and values computed once per prompt, not once per step (exact;
    # wan_dist/parallel/context_cache.py). Not with compile=true, whose blocks are traced without the cache.
    context_cache: bool = True
    # Print the plan (per rank: role, components, weight bytes), write plan.json into output.dir, read no
    # weights and exit.
    dry_run: bool = False


def register_configs() -> None:
    """The schema, and one `model/<name>`, `parallel/<name>` and `layout/<name>` option per entry of
    config/presets.py's tables."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for preset in MODEL_PRESETS.values():
        store.store(group="model", name=preset.name, node=preset.hydra_node(), package="_global_")
    for name in PARALLEL_PRESETS:
        store.store(group="parallel", name=name, node=ParallelConfig(preset=name))
    for layout in LAYOUTS.values():
        store.store(group="layout", name=layout.name, node=layout.hydra_node(), package="_global_")


def compose_run(overrides: list[str] = ()) -> RunConfig:
    """The run config `launch/generate.py` composes from these overrides, outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose("generate", overrides=list(overrides)))
