"""Typed configuration for every HiLight component, plus the named presets.

Each component gets its own small dataclass; :class:`HiLightConfig` nests them and
cross-checks the dimensions that must agree. YAML files and ``config.json`` in a
checkpoint are serialized instances (see :func:`to_dict` / :func:`from_dict`), and
command lines override single fields with dotted ``key=value`` pairs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hilight.errors import ConfigError

# the original formats ``hilight convert`` reads (their key maps are in hilight.convert)
SOURCE_FORMATS = ("clipvip", "longclip", "token-mining", "hilight-merged", "gemma")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VideoTowerConfig:
    """CLIP-ViP vision transformer (the video tower)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    temporal_size: int = 12  # frames the learned temporal embedding was trained for
    add_cls_num: int = 3  # extra proxy tokens beside the CLS token
    projection_dim: int = 512  # pooled video embedding (used by encoder alignment)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_vit(self.hidden_size, self.num_heads, self.image_size, self.patch_size, "video_tower")

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_proxy_tokens(self) -> int:
        return 1 + self.add_cls_num

    def num_tokens(self, num_frames: int) -> int:
        """Length of the tower's output sequence for a clip of ``num_frames`` frames."""
        return self.num_proxy_tokens + num_frames * self.patches_per_frame


@dataclass
class ImageTowerConfig:
    """Long-CLIP visual transformer (OpenAI CLIP layout), one projected CLS per frame."""

    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    output_dim: int = 512
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_vit(self.width, self.num_heads, self.image_size, self.patch_size, "image_tower")


@dataclass
class TokenMiningConfig:
    """Cross-attention fusion: Long-CLIP queries over CLIP-ViP tokens, projected to the LLM."""

    video_dim: int = 768
    image_dim: int = 512
    llm_dim: int = 2048
    queries_per_frame: int = 32
    # Both off in the original (and for its released weights). frame_local: each frame's queries
    # read only that frame's patch tokens, not all T*L tokens of the clip; slot_queries: a learned
    # vector per query slot is added to the queries, so the slots of a frame can look for
    # different things even when the frame embeddings differ little.
    frame_local: bool = False
    slot_queries: bool = False


@dataclass
class LLMConfig:
    """The Gemma decoder. ``hidden_act`` is kept verbatim (see :meth:`to_gemma`)."""

    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True

    def to_gemma(self):
        """Build the transformers config.

        transformers 5.x rewrites ``hidden_act="gelu"`` to the tanh approximation while
        constructing the config; the released HiLight weights were trained under 4.38 with
        the exact GELU, so the value recorded here is set back after construction.
        """
        from transformers import GemmaConfig

        cfg = GemmaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            hidden_act="gelu_pytorch_tanh",
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        cfg.hidden_act = self.hidden_act
        return cfg


@dataclass
class VideoInputConfig:
    """How a video file becomes the towers' input tensor.

    ``sampling``: ``uniform`` is the original's ``linspace(0, n - 1, T)``; ``midpoint`` takes
    the middle frame of T equal segments; ``fps`` takes T frames ``1 / sample_fps`` seconds
    apart around the middle of the clip. ``resize``: ``squash`` (the original) resizes straight
    to S x S; ``center_crop`` keeps the aspect ratio (short side to S, then a centre crop).
    """

    num_frames: int = 12
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    sampling: Literal["uniform", "midpoint", "fps"] = "uniform"
    sample_fps: float = 2.0
    resize: Literal["squash", "center_crop"] = "squash"
    max_decode_seconds: float = 60.0  # a file that takes longer is refused, never a hang


@dataclass
class TextConfig:
    """Prompt length policy. ``truncation="right"`` cuts the end of training samples
    (never inside a video's block); ``"error"`` refuses over-long samples."""

    max_length: int = 2048
    truncation: Literal["error", "right"] = "error"


@dataclass
class TrainableConfig:
    """Which components receive gradients. A training stage is just a value of this."""

    video_tower: bool = False
    image_tower: bool = False
    token_mining: bool = False
    llm: bool = False


@dataclass
class HiLightConfig:
    video_tower: VideoTowerConfig = field(default_factory=VideoTowerConfig)
    image_tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    token_mining: TokenMiningConfig = field(default_factory=TokenMiningConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    video: VideoInputConfig = field(default_factory=VideoInputConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        tm = self.token_mining
        checks = [
            (tm.video_dim, self.video_tower.hidden_size, "token_mining.video_dim", "video_tower.hidden_size"),
            (tm.image_dim, self.image_tower.output_dim, "token_mining.image_dim", "image_tower.output_dim"),
            (tm.llm_dim, self.llm.hidden_size, "token_mining.llm_dim", "llm.hidden_size"),
            (self.video.image_size, self.video_tower.image_size, "video.image_size", "video_tower.image_size"),
            (self.video.image_size, self.image_tower.image_size, "video.image_size", "image_tower.image_size"),
        ]
        for a, b, name_a, name_b in checks:
            if a != b:
                raise ConfigError(f"{name_a}={a} must equal {name_b}={b}")
        if self.video.num_frames < 1:
            raise ConfigError(f"video.num_frames must be >= 1, got {self.video.num_frames}")

    @property
    def tokens_per_video(self) -> int:
        """LLM positions each ``<video>`` placeholder expands to (T x queries per frame)."""
        return self.video.num_frames * self.token_mining.queries_per_frame


def _check_vit(width: int, heads: int, image_size: int, patch_size: int, name: str) -> None:
    if width % heads:
        raise ConfigError(f"{name}: width {width} is not divisible by {heads} heads")
    if image_size % patch_size:
        raise ConfigError(f"{name}: image_size {image_size} is not a multiple of patch_size {patch_size}")


def tiny_config(vocab_size: int = 512) -> HiLightConfig:
    """Toy sizes that exercise exactly the same code as the real model, for tests and demos."""
    return HiLightConfig(
        video_tower=VideoTowerConfig(
            hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, temporal_size=4, add_cls_num=3, projection_dim=16,
        ),
        image_tower=ImageTowerConfig(
            width=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=32, patch_size=8,
            output_dim=24,
        ),
        token_mining=TokenMiningConfig(video_dim=32, image_dim=24, llm_dim=64, queries_per_frame=4),
        llm=LLMConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=1, head_dim=16, max_position_embeddings=1024, hidden_act="gelu_pytorch_tanh",
        ),
        video=VideoInputConfig(num_frames=4, image_size=32),
        text=TextConfig(max_length=512),
    )


@dataclass
class LoraConfig:
    """LoRA on the LLM's linear layers (towers, TokenMining and lm_head are never targeted)."""

    enabled: bool = False
    r: int = 64
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class DataConfig:
    train: str = ""  # LLaVA-style JSON
    videos: str = ""  # directory the records' video names are under
    val: str = ""  # optional validation JSON (same video directory)
    cache: str = ""  # feature cache from `hilight extract-features`; empty: run the towers every step


@dataclass
class AuxiliaryConfig:
    """An optional extra loss beside a stage's own, for data that carries more than text (e.g.
    where every object is in every frame). ``objective`` names its class as ``module:Class``
    (see :mod:`hilight.training.objectives`); ``data`` lists the files it reads its targets from
    (alignment reads them from the caption records themselves)."""

    objective: str = ""  # empty: none
    weight: float = 1.0
    data: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"auxiliary.weight must be >= 0, got {self.weight}")


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping shared by every training recipe (VLM stages, alignment)."""

    output_dir: str = "runs/train"
    max_steps: int = 100  # optimizer steps
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    deepspeed: str = ""  # a DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); empty: plain DDP
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    group_by_length: bool = False  # batches of samples of about one length (less padding)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig(LoopConfig):
    """One VLM training stage. A stage is a value of ``trainable`` (+ ``lora``)."""

    model: str = ""  # starting checkpoint (HiLight format)
    data: DataConfig = field(default_factory=DataConfig)
    trainable: TrainableConfig = field(default_factory=lambda: TrainableConfig(token_mining=True))
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = 2048
    truncation: Literal["error", "right"] = "right"
    # an extra loss on the videos' TokenMining outputs (e.g. the billiards recipe's frame facts)
    auxiliary: AuxiliaryConfig = field(default_factory=AuxiliaryConfig)
    # 0: the LLM never runs and the auxiliary objective is the whole loss (TokenMining trained
    # on it alone, e.g. while the LLM is still random)
    lm_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora.enabled and self.trainable.llm:
            raise ConfigError("trainable.llm (full fine-tune) and lora.enabled exclude each other")
        if self.lm_weight < 0:
            raise ConfigError(f"lm_weight must be >= 0, got {self.lm_weight}")
        if self.lm_weight == 0 and (not self.auxiliary.objective or self.trainable.llm or self.lora.enabled):
            raise ConfigError("lm_weight 0 trains TokenMining on the auxiliary objective alone: it needs "
                              "auxiliary.objective and no LLM training")


STOP_WORDS = ("a", "an", "the", "and", "of", "with", "to", "into", "on", "in", "at", "by", "is", "are", "it", "its",
              "then", "first", "view", "top-down", "table", "ball", "balls", "cloth", "moves", "goes", "hits",
              "touches", "towards", "without", "another")


@dataclass
class TextTowerConfig:
    """CLIP text transformer. ``max_positions`` is 77 for CLIP, 248 for Long-CLIP-style captions."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_positions: int = 77
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5


@dataclass
class AlignLossConfig:
    """Global video-text InfoNCE plus the SPARC fine-grained patch-token loss."""

    global_weight: float = 1.0
    local_weight: float = 1.0  # 0 disables the local loss
    threshold: float = 0.0  # sparsity threshold on min-max normalised similarities; 0: 1 / number of patches
    local_temperature: float = 0.07
    language_mask: bool = True  # local loss only on content tokens (no padding, special tokens, stop words)
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))


@dataclass
class AlignDataConfig:
    train: str = ""  # JSON list of {"video", "caption"}
    val: str = ""
    videos: str = ""
    frames_cache: str = ""  # decoded, preprocessed frames are kept here (safetensors); empty: decode each time


@dataclass
class AlignConfig(LoopConfig):
    """Video-text alignment (CLIP-ViP+) of a checkpoint's video tower."""

    model: str = ""  # HiLight checkpoint: its tower is aligned, its tokenizer reads the captions
    tower: Literal["video", "image"] = "video"  # image: the Long-CLIP-role tower, frame by frame
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    text_init: str = ""  # optional pretrain_clipvip_base_16.pt: its clipmodel.text_model.* start the text tower
    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    loss: AlignLossConfig = field(default_factory=AlignLossConfig)
    # an extra loss on the tower's outputs, its targets read from the caption records
    auxiliary: AuxiliaryConfig = field(default_factory=AuxiliaryConfig)


def billiards_small_config(vocab_size: int = 1000) -> HiLightConfig:
    """The bundled model's sizes: 8 frames at 112 px with 8-px patches, so a ball covers a few
    patches (small objects under 16-px patches learn slowly), and a 4-layer 256-wide Gemma.
    TokenMining reads frame by frame with 8 learned query slots per frame: with the original's
    one softmax over the whole clip, a frame's few ball patches were averaged away (presence of
    each ball per frame 64 % from its outputs, vs 94 % frame-local with slots, on run 3's towers)."""
    return HiLightConfig(
        video_tower=VideoTowerConfig(hidden_size=96, num_layers=4, num_heads=4, intermediate_size=384, image_size=112,
                                     patch_size=8, temporal_size=8, add_cls_num=3, projection_dim=64),
        image_tower=ImageTowerConfig(width=96, num_layers=4, num_heads=4, intermediate_size=384, image_size=112,
                                     patch_size=8, output_dim=64),
        token_mining=TokenMiningConfig(video_dim=96, image_dim=64, llm_dim=256, queries_per_frame=8, frame_local=True,
                                       slot_queries=True),
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                      num_kv_heads=1, head_dim=64, max_position_embeddings=1024, hidden_act="gelu_pytorch_tanh"),
        video=VideoInputConfig(num_frames=8, image_size=112),
        text=TextConfig(max_length=512),
    )


PRESETS = {
    "hilight-2b": HiLightConfig,
    "billiards-small": billiards_small_config,
    "tiny": tiny_config,
}


def preset(name: str) -> HiLightConfig:
    """Return a fresh config for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# (De)serialization: plain dicts <-> nested dataclasses, with type checks and dotted overrides.


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown field(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, where) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads "1e-4" (no dot) as a string; accept any float literal
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy of ``config`` with dotted ``key=value`` overrides applied.

    Values are parsed as YAML scalars (``lr=1e-4``, ``trainable.llm=true``), then type-checked.
    """
    import yaml

    data = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown field {parts[-1]!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(type(config), data)


def load_yaml(cls: type, path: str | Path, overrides: list[str] = ()) -> Any:
    """A config dataclass from a YAML file, then dotted ``key=value`` overrides."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from None
    config = from_dict(cls, data)
    return apply_overrides(config, list(overrides)) if overrides else config


def llm_config_from_hf(hf: dict[str, Any]) -> LLMConfig:
    """Read the Gemma fields of a transformers ``config.json`` (Gemma or HiLight-Gemma)."""
    try:
        rope = hf.get("rope_parameters") or {}
        return LLMConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_key_value_heads"],
            head_dim=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            hidden_act=hf.get("hidden_act") or hf.get("hidden_activation") or "gelu",
            pad_token_id=hf.get("pad_token_id", 0),
            eos_token_id=_first(hf.get("eos_token_id", 1)),
            bos_token_id=hf.get("bos_token_id", 2),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )
    except KeyError as exc:
        raise ConfigError(f"Gemma config.json lacks field {exc.args[0]!r}") from None


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value

