"""HiLight's own checkpoint format: one directory holding

- ``config.json``: ``{"format": "hilight", "format_version": 1, "dtype": ..., "config": {...}}``
- ``model.safetensors`` or, when large, ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json``
- the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...)

Writes are atomic (a temporary directory renamed into place) and loads are strict: any
missing or unexpected tensor name raises, except the tied ``lm_head.weight``, which is
never stored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from hilight.config import HiLightConfig, from_dict, to_dict
from hilight.errors import CheckpointError
from hilight.files import atomic_dir, dtype_name
from hilight.model import HiLight

log = logging.getLogger(__name__)

FORMAT = "hilight"
FORMAT_VERSION = 2
# Version 1 also stored the training stage's trainable flags (training state, not the model's)
# and three options of experiments since removed; a version-1 checkpoint loads if those hold
# the only value the model code still implements.
RETIRED_V1 = {("trainable",): None, ("towers",): "both", ("token_mining", "token_positions"): 0,
              ("token_mining", "patch_positions"): False}
CONFIG_FILE = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
LLM_LAYERS = "llm.model.layers."  # the decoder layers' names in a checkpoint
TIED_KEY = "llm.lm_head.weight"
BUNDLED_MODEL = Path(__file__).parent / "assets" / "billiards-small"
MODEL_NAMES = {"billiards-small": BUNDLED_MODEL}  # models known by name (``--model billiards-small``)
CARD_FILE = "card.json"
# what vLLM reads to pick its model class (hilight[vllm] registers both names)
SERVING_KEYS = {"model_type": "hilight", "architectures": ["HiLightForConditionalGeneration"]}


def model_state_dict(model: HiLight) -> dict[str, torch.Tensor]:
    """The tensors we store: every parameter and persistent buffer, minus the tied head."""
    state = model.state_dict()
    if model.config.llm.tie_word_embeddings:
        state.pop(TIED_KEY, None)
    return {k: _own_storage(v) for k, v in state.items()}


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses views into a larger buffer (DeepSpeed flattens parameters): copy those."""
    t = t.detach().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_checkpoint(
    model: HiLight, path: str | Path, tokenizer=None, max_shard_size: str | int = "4GB"
) -> Path:
    """Write ``model`` (and ``tokenizer``) to directory ``path``, replacing it atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        state = model_state_dict(model)
        dtype = next(iter(state.values())).dtype
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype_name(dtype),
                "config": to_dict(model.config), **SERVING_KEYS}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a HiLight checkpoint directory."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a HiLight checkpoint (format={meta.get('format')!r}); "
            "original checkpoints are imported with `hilight convert`"
        )
    if meta.get("format_version") == 1:
        meta = _from_v1(meta, path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def _from_v1(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    config = json.loads(json.dumps(meta.get("config", {})))  # a deep copy
    for keys, only in RETIRED_V1.items():
        *sections, name = keys
        node = config
        for section in sections:
            node = node.get(section, {})
        if name in node:
            value = node.pop(name)
            if only is not None and value != only:
                raise CheckpointError(f"{path}: made with {'.'.join(keys)}={value!r}, an option this version of "
                                      "HiLight no longer has")
    return {**meta, "format_version": FORMAT_VERSION, "config": config}


def read_config(path: str | Path) -> HiLightConfig:
    return from_dict(HiLightConfig, read_meta(path)["config"])


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}")


def load_weights(path: str | Path, dtype: torch.dtype | None = None, mapped: bool = True,
                 skip: str | None = None) -> dict[str, torch.Tensor]:
    """Every stored tensor (but those whose names start with ``skip``, never read), floating-point
    ones converted to ``dtype`` if given. ``mapped``: the
    tensors are views of the files' memory maps (nothing copied; once read, the pages count
    towards the process's resident memory until the last view is gone). ``mapped=False``: each
    tensor is copied into the process's own memory as it is read and its map released at once,
    for callers that replace the weights anyway (packed or int8 layers): full hilight-2b in bf16
    then peaks at 5.4 GiB resident while loading, instead of 7.8 GiB (one map per file: its
    pages add up until the file is closed) or 11.4 GiB (mapped, then packed)."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise CheckpointError(f"{file}: shard listed in the index is missing")
        if mapped and dtype is None and skip is None:
            state.update(load_file(file))
            continue
        with safe_open(file, framework="pt") as f:
            names = [name for name in f.keys() if skip is None or not name.startswith(skip)]
            if mapped:
                state.update((name, _converted(f.get_tensor(name), dtype, copy=False)) for name in names)
                continue
        for name in names:  # the file opened anew per tensor: its map lasts while one tensor is read
            with safe_open(file, framework="pt") as f:
                state[name] = _converted(f.get_tensor(name), dtype, copy=True)
    return state


def _converted(tensor: torch.Tensor, dtype: torch.dtype | None, copy: bool) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)  # a copy
    return tensor.clone() if copy else tensor


def tensor_shapes(path: str | Path) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) of every stored tensor, read from headers only."""
    shapes = {}
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = (sl.get_shape(), sl.get_dtype())
    return shapes


def load_state_strict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str] | None = None, where: str = ""
) -> None:
    """``load_state_dict(strict=True, assign=True)`` that first lists every unexpected,
    missing or misshapen name in one error. ``tied`` maps names that are never stored (a tied
    ``lm_head``) to the stored tensor they share."""
    state = dict(state)
    for alias, source in (tied or {}).items():
        if alias not in state and source in state:
            state[alias] = state[source]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:20])}")
    if wrong:
        detail = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in wrong[:20]]
        problems.append(f"wrong shape {len(wrong)}: {', '.join(detail)}")
    if problems:
        raise CheckpointError(f"{where}: state dict does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)


def tied_keys(config: HiLightConfig) -> dict[str, str]:
    return {TIED_KEY: "llm.model.embed_tokens.weight"} if config.llm.tie_word_embeddings else {}


def build_empty(config: HiLightConfig) -> HiLight:
    """Build a model whose parameters are unallocated (meta); buffers stay real so Gemma's
    rotary tables are computed. Every parameter must then be assigned by a strict load."""
    with init_empty_weights(include_buffers=False):
        return HiLight(config)


def tie_llm_embeddings(model: HiLight) -> None:
    if model.config.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", with_tokenizer: bool = True,
    mapped: bool = True, llm_layers: bool = True,
):
    """Load ``(model, tokenizer)`` from a HiLight checkpoint directory (tokenizer is None when
    ``with_tokenizer`` is false). The model is in eval mode; which parameters train is the
    caller's choice (:meth:`HiLight.set_trainable`), never the checkpoint's.
    ``mapped``: as :func:`load_weights`. ``llm_layers=False``: the LLM's decoder layers are
    neither built nor read (for an LLM that runs elsewhere: hilight.inference.llamacpp)."""
    path = Path(path)
    meta = read_meta(path)
    config = from_dict(HiLightConfig, meta["config"])
    model = build_empty(config)
    if not llm_layers:
        model.llm.model.layers = torch.nn.ModuleList()
    state = load_weights(path, dtype, mapped, skip=None if llm_layers else LLM_LAYERS)
    load_state_strict(model, state, tied=tied_keys(config), where=str(path))
    tie_llm_embeddings(model)
    model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        from hilight.tokenizer import load_tokenizer

        if not (path / "tokenizer_config.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer files (tokenizer_config.json)")
        tokenizer = load_tokenizer(path)
    log.info("loaded %s (%s)", path, meta["dtype"])
    return model, tokenizer


def describe(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds, from its headers: config, dtype, parameters per component."""
    meta = read_meta(path)
    shapes = tensor_shapes(path)
    counts: dict[str, int] = {}
    dtypes: set[str] = set()
    for name, (shape, dt) in shapes.items():
        component = name.split(".", 1)[0]
        n = 1
        for s in shape:
            n *= s
        counts[component] = counts.get(component, 0) + n
        dtypes.add(dt)
    counts["total"] = sum(counts.values())
    return {
        "path": str(path),
        "dtype": meta["dtype"],
        "tensor_dtypes": sorted(dtypes),
        "tensors": len(shapes),
        "parameters": counts,
        "tokenizer": (Path(path) / "tokenizer_config.json").is_file(),
        "video": {k: meta["config"]["video"][k] for k in ("num_frames", "image_size", "sampling", "resize")},
        "card": read_card(path),
        "config": meta["config"],
    }


def default_model() -> Path:
    """The model shipped inside the package."""
    if not (BUNDLED_MODEL / CONFIG_FILE).is_file():
        raise CheckpointError(f"{BUNDLED_MODEL}: this build has no bundled model; pass --model DIR")
    return BUNDLED_MODEL


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A checkpoint directory from what a user typed: nothing (the bundled model), a model
    name (:data:`MODEL_NAMES`) or a directory."""
    if name_or_path is None or str(name_or_path) in MODEL_NAMES:
        return default_model()
    path = Path(name_or_path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory nor a model name "
                              f"({', '.join(sorted(MODEL_NAMES))})")
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint (``card.json``: what it knows, how well, where measured),
    or an empty dict if it has none."""
    card = Path(path) / CARD_FILE
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{card}: invalid JSON ({exc})") from None


def domain_note(path: str | Path) -> str | None:
    """One line to show before answers when the model only knows one kind of video."""
    card = read_card(path)
    if not card.get("domain"):
        return None
    return f"note: {card.get('name', Path(path).name)} knows {card['domain']}"
