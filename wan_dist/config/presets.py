"""The presets, stated once: every model preset (its task, its diffusers repository or the architecture
built locally, its sampling defaults, its benchmark size) and every parallel preset (which degrees it
fixes). Hydra's `model=` and `parallel=` groups, the config checks, the builders, the layout resolution
and the bench all read these tables; nothing else lists a preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Wan2.1's own negative prompt for its 14B and 1.3B models (the official generate.py's default).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


# The model families, told apart by a folder's model_index.json (checks.read_folder_facts): Wan2.1 (one
# DiT; T2V, I2V and FLF2V), Wan2.2's two-expert models (A14B: a high-noise and a low-noise DiT switched at
# a boundary timestep) and Wan2.2's TI2V (one DiT over the 48-channel VAE, one timestep per token).
WAN21 = "wan2.1"
WAN22_EXPERTS = "wan2.2_moe"
WAN22_TI2V = "wan2.2_ti2v"


@dataclass(frozen=True)
class Expert:
    """A model's DiT, or one of a two-expert model's, in the order the steps use them: the noise it
    denoises (its name in `lora[].expert`, in messages and in the expert groups), its component name (the
    plan, run.json) and the folder it is kept in."""

    noise: str
    component: str
    subfolder: str


# The one DiT is the first; a two-expert model's high-noise expert, then its low-noise one.
EXPERTS = (Expert("high", "dit", "transformer"), Expert("low", "dit_2", "transformer_2"))
DIT_SUBFOLDERS = tuple(expert.subfolder for expert in EXPERTS)
# The tasks that take `image=` (and FLF2V also `last_image=`).
IMAGE_TASKS = ("i2v", "flf2v")
# Wan's text context: every prompt is padded or cut to 512 UMT5 tokens, and the I2V cross-attention relies
# on exactly 512 text tokens before the image's.
TEXT_MAX_TOKENS = 512
# The I2V image context: CLIP ViT-H/14's 257 tokens at 224 px (16 x 16 patches and the class token).
IMAGE_TOKENS = 257


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a random-weight Wan model built locally. The defaults are the tiny model: small enough that
    a CPU run takes seconds, with a head count (3) that divides by no parallel degree but 3, so uneven heads
    are the normal case."""

    # t2v, i2v or flf2v (an i2v DiT that embeds two images); a TI2V model does both t2v and i2v.
    task: str = "t2v"
    family: str = WAN21
    # Two-expert models: the low-noise expert's depth (it may differ from `layers`, the high-noise one's)
    # and where the experts switch, as a share of the training timesteps.
    expert_layers: int | None = None
    boundary_ratio: float | None = None
    heads: int = 3
    head_dim: int = 12
    layers: int = 2
    ffn_dim: int = 48
    freq_dim: int = 32
    rope_max_seq_len: int = 32
    text_dim: int = 32
    text_layers: int = 2
    clip_dim: int = 32
    clip_image_size: int = 32
    clip_patch_size: int = 8
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_res_blocks: int = 1
    # Scale of the attention outputs at init (see building.build_tiny_model); 1 keeps diffusers' own init.
    attn_out_gain: tuple[float, float] = (4.0, 8.0)
    # dtype the weights are stored in: the real sizes are written in bf16 to halve the disk they take.
    save_dtype: str = "fp32"
    # The flow shift the folder's scheduler config states (what diffusers' pipeline samples the folder with).
    flow_shift: float = 3.0
    seed: int = 0

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks a folder of this architecture runs: a TI2V model both, by whether an image is given."""
        return ("t2v", "i2v") if self.family == WAN22_TI2V else (self.task,)

    @property
    def has_image_encoder(self) -> bool:
        """Only Wan2.1's image DiTs take CLIP image embeddings; Wan2.2 conditions on the VAE latent alone."""
        return self.family == WAN21 and self.task in IMAGE_TASKS


def _official(task: str, heads: int, layers: int, ffn_dim: int, **changes) -> ModelSpec:
    """The published DiT and VAE dimensions; the text and image encoders are one-layer stand-ins of the
    official widths (UMT5-XXL's 4096, CLIP ViT-H's 1280 at 224 px), which benchmarks keep on CPU."""
    return ModelSpec(**{
        **dict(task=task, heads=heads, head_dim=128, layers=layers, ffn_dim=ffn_dim, freq_dim=256,
               rope_max_seq_len=1024, text_dim=4096, text_layers=1, clip_dim=1280, clip_image_size=224,
               clip_patch_size=14, vae_base_dim=96, vae_dim_mult=(1, 2, 4, 4), vae_res_blocks=2,
               attn_out_gain=(1.0, 1.0), save_dtype="bf16"),
        **changes,
    })


@dataclass
class Sampling:
    """The sampling settings a model preset chooses; the run config's own top-level keys (schema.RunConfig
    extends this), so their defaults are the tiny model's."""

    height: int = 64
    width: int = 64
    num_frames: int = 9
    frame_rate: int = 16
    steps: int = 4
    guidance_scale: float = 5.0
    # Two-expert models: the low-noise expert's guidance (unset: guidance_scale).
    guidance_scale_2: float | None = None
    flow_shift: float = 3.0
    negative_prompt: str = ""


@dataclass(frozen=True)
class ModelPreset:
    """One `model=<name>` choice: where its weights come from and the sampling it is run with."""

    name: str
    description: str
    spec: ModelSpec  # its architecture: built with random weights for built presets and random_weights=true
    repo: str | None = None  # the diffusers-format repository of a real preset (None: built locally)
    sampling: Sampling = field(default_factory=Sampling)
    # Sizes `launch/bench.py` runs it at (None: not a bench model).
    bench_overrides: tuple[str, ...] | None = None

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def built(self) -> bool:
        """Built locally with random weights on first use, never downloaded."""
        return self.repo is None

    def hydra_node(self) -> dict:
        """What `model=<name>` sets, at the top level of the run config."""
        return {"model": {"preset": self.name, "path": None, "text_encoder_device": "cpu"}, **asdict(self.sampling)}


def _real(name: str, repo: str, spec: ModelSpec, bench_overrides: tuple[str, ...] | None = None,
          **sampling) -> ModelPreset:
    sampling = {"num_frames": 81, "negative_prompt": WAN_NEGATIVE_PROMPT, **sampling}
    return ModelPreset(name=name, description=f"{repo.split('/')[1].removesuffix('-Diffusers')}: pass the local "
                       f"diffusers-format folder of {repo} as model.path", spec=spec, repo=repo,
                       bench_overrides=bench_overrides, sampling=Sampling(**sampling))


# The 14B DiT of Wan2.1 and of each Wan2.2 A14B expert.
_14B = dict(heads=40, layers=40, ffn_dim=13824)


_MODEL_PRESETS = (
    ModelPreset("tiny", "tiny random-weight T2V model, built locally on first use: seconds on a CPU",
                ModelSpec(task="t2v"), bench_overrides=("height=128", "width=224", "num_frames=17", "steps=4")),
    ModelPreset("tiny_i2v", "tiny random-weight I2V model (needs image=), built locally on first use",
                ModelSpec(task="i2v")),
    # Compute-bound on one CPU core (a 512-wide DiT, about 90% of a step in its matmuls and attention at
    # 192x320x17), yet built in seconds: what `make bench` measures parallel speed-ups on.
    ModelPreset("bench", "a 512-wide random-weight DiT built locally: compute-bound on one CPU core",
                ModelSpec(task="t2v", heads=8, head_dim=64, layers=4, ffn_dim=2048, freq_dim=256, text_dim=256,
                          text_layers=1),
                sampling=Sampling(height=192, width=320, num_frames=17), bench_overrides=("steps=4",)),
    # The bench DiT as Wan2.2's two experts (T2V-A14B's boundary): the expert pipeline measured on a CPU.
    ModelPreset("bench_moe", "the bench DiT as two experts (Wan2.2 two-expert layout), built locally",
                ModelSpec(task="t2v", family=WAN22_EXPERTS, expert_layers=4, boundary_ratio=0.875, heads=8,
                          head_dim=64, layers=4, ffn_dim=2048, freq_dim=256, text_dim=256, text_layers=1),
                sampling=Sampling(height=192, width=320, num_frames=17), bench_overrides=("steps=4",)),
    _real("t2v_1_3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", _official("t2v", heads=12, layers=30, ffn_dim=8960),
          height=480, width=832, steps=50, bench_overrides=("height=480", "width=832", "num_frames=81", "steps=10")),
    _real("t2v_14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", _official("t2v", heads=40, layers=40, ffn_dim=13824),
          height=720, width=1280, steps=50, flow_shift=5.0,
          bench_overrides=("height=720", "width=1280", "num_frames=81", "steps=5")),
    _real("i2v_14b_480p", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
          _official("i2v", heads=40, layers=40, ffn_dim=13824), height=480, width=832, steps=40),
    _real("i2v_14b_720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
          _official("i2v", heads=40, layers=40, ffn_dim=13824), height=720, width=1280, steps=40, flow_shift=5.0),
    # Wan2.1's generate.py: FLF2V samples 50 steps at shift 16.
    _real("flf2v_14b_720p", "Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers", _official("flf2v", **_14B),
          height=720, width=1280, steps=50, flow_shift=16.0),
    # Wan2.2's configs (wan/configs/wan_t2v_A14B.py, wan_i2v_A14B.py, wan_ti2v_5B.py): steps, shift, the
    # switch boundary and the (high, low) guidance.
    _real("t2v_a14b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
          _official("t2v", family=WAN22_EXPERTS, expert_layers=40, boundary_ratio=0.875, **_14B),
          height=720, width=1280, steps=40, flow_shift=12.0, guidance_scale=4.0, guidance_scale_2=3.0,
          bench_overrides=("height=720", "width=1280", "num_frames=81", "steps=5")),
    _real("i2v_a14b", "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
          _official("i2v", family=WAN22_EXPERTS, expert_layers=40, boundary_ratio=0.9, **_14B),
          height=720, width=1280, steps=40, flow_shift=5.0, guidance_scale=3.5, guidance_scale_2=3.5),
    _real("ti2v_5b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
          _official("t2v", family=WAN22_TI2V, heads=24, layers=30, ffn_dim=14336, vae_base_dim=160),
          height=704, width=1280, num_frames=121, frame_rate=24, steps=50, guidance_scale=5.0, flow_shift=5.0,
          bench_overrides=("height=704", "width=1280", "num_frames=121", "steps=5")),
)
MODEL_PRESETS: dict[str, ModelPreset] = {preset.name: preset for preset in _MODEL_PRESETS}


@dataclass(frozen=True)
class ParallelPreset:
    """What one `parallel=<name>` fixes; degrees left None are filled from the world size."""

    name: str
    cfg: int | None = None
    ulysses: int | None = None
    ring: int | None = None
    stage_split: bool | None = None
    # usp and cfg_usp keep a ring axis beside Ulysses when the world allows two axes.
    both_sequence_axes: bool = False
    # Only these presets add a cfg axis on their own when guidance is on and the ranks divide.
    picks_cfg: bool = False
    doc: str = field(default="", compare=False)


_PARALLEL_PRESETS = (
    ParallelPreset("auto", picks_cfg=True, doc="cfg when guided and the ranks divide, then the sequence axes"),
    ParallelPreset("single", cfg=1, ulysses=1, ring=1, stage_split=False, doc="one rank holds everything"),
    ParallelPreset("stage_split", stage_split=True, picks_cfg=True,
                   doc="rank 0 holds the encoders and VAE, the other ranks the DiT"),
    ParallelPreset("cfg", cfg=2, ulysses=1, ring=1, doc="the two guidance branches on two ranks"),
    ParallelPreset("ulysses", cfg=1, ring=1, doc="Ulysses sequence parallelism over all DiT ranks"),
    ParallelPreset("ring", cfg=1, ulysses=1, doc="Ring attention over all DiT ranks"),
    ParallelPreset("usp", cfg=1, both_sequence_axes=True, doc="Ulysses x Ring"),
    ParallelPreset("cfg_usp", cfg=2, both_sequence_axes=True, doc="cfg x Ulysses x Ring"),
)
PARALLEL_PRESETS: dict[str, ParallelPreset] = {preset.name: preset for preset in _PARALLEL_PRESETS}


# The memory options a layout can add, each as the one override it stands for (`make bench` runs each
# beside the same layout without it).
MEMORY_OPTIONS = {"fsdp": "parallel.fsdp=true", "offload": "model.dit_offload=block",
                  "fp8": "model.dit_storage_dtype=fp8_e4m3"}
# Block offload streams the blocks from host memory to a CUDA device; elsewhere it is refused.
CUDA_ONLY_OPTIONS = frozenset({"offload"})


@dataclass(frozen=True)
class Layout:
    """A named layout with every degree pinned, so its world size is known before it starts: what
    `+layout=<name>` sets (a sweep over layouts: `-m +layout=single,cfg,ulysses3`; `make bench`)."""

    name: str
    parallel: str
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    stage_split: bool = False
    compile: bool = False
    memory: str | None = None  # a key of MEMORY_OPTIONS
    # Two-expert models: two groups of cfg x ulysses x ring ranks, one per expert.
    expert_split: bool = False

    @property
    def base(self) -> str | None:
        """The layout this one is without its memory option."""
        if self.memory is None:
            return None
        return next(other.name for other in _LAYOUTS
                    if other.memory is None and replace(other, name=self.name, memory=self.memory) == self)

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring * (2 if self.expert_split else 1) + int(self.stage_split)

    def hydra_node(self) -> dict:
        group = self.cfg * self.ulysses * self.ring
        node: dict = {"parallel": {"preset": self.parallel, "cfg_degree": self.cfg, "ulysses_degree": self.ulysses,
                                   "ring_degree": self.ring, "stage_split": self.stage_split,
                                   "expert_split": self.expert_split,
                                   "expert_ranks": [group, group] if self.expert_split else None},
                      "compile": self.compile}
        if self.memory is not None:
            key, value = MEMORY_OPTIONS[self.memory].split("=")
            section, name = key.split(".")
            node.setdefault(section, {})[name] = value
        return node


_LAYOUTS = (
    Layout("single", "single"),
    Layout("compiled", "single", compile=True),
    Layout("cfg", "cfg", cfg=2),
    Layout("ulysses", "ulysses", ulysses=2),
    Layout("ring", "ring", ring=2),
    Layout("stage_split", "stage_split", stage_split=True),
    Layout("ulysses3", "ulysses", ulysses=3),
    Layout("stage_split_cfg", "stage_split", cfg=2, stage_split=True),
    Layout("cfg_ulysses", "cfg_usp", cfg=2, ulysses=2),
    Layout("usp", "usp", ulysses=2, ring=2),
    Layout("ulysses4", "ulysses", ulysses=4),
    Layout("cfg_ulysses4", "cfg_usp", cfg=2, ulysses=4),
    Layout("ulysses8", "ulysses", ulysses=8),
    Layout("single_fp8", "single", memory="fp8"),
    Layout("single_offload", "single", memory="offload"),
    Layout("cfg_fsdp", "cfg", cfg=2, memory="fsdp"),
    Layout("expert_split", "auto", expert_split=True),
    Layout("expert_split_cfg", "auto", cfg=2, expert_split=True),
)
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in _LAYOUTS}
