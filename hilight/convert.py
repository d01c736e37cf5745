"""Import the original HiLight checkpoint formats into a HiLight model.

Each source format has a declarative key map: an ordered list of rules, each a regular
expression over the source name and either a target template or :data:`DROP` (a name we
discard *on purpose*, e.g. CLIP text weights). A name that no rule matches raises, and so does
any model tensor that no source provides. The format is always an explicit argument.

Formats:

- ``clipvip``: ``pretrain_clipvip_base_16.pt`` (``clipmodel.*``, maybe ``module.``-prefixed)
- ``longclip``: ``longclip-B.pt``, a full OpenAI-CLIP state dict; ``visual.*`` is kept
- ``token-mining``: TokenMining ``.pt`` (bare keys) or ``.bin`` (``model.token_mining.*``)
- ``hilight-merged``: a released ``HiLight-2B-LoRA-Merge-*`` directory (Gemma + TokenMining)
- ``gemma``: a transformers Gemma directory
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hilight.checkpoint import TIED_KEY, build_empty, load_state_strict, tie_llm_embeddings, tied_keys
from hilight.config import SOURCE_FORMATS, HiLightConfig, llm_config_from_hf
from hilight.errors import ConversionError
from hilight.model import HiLight
from hilight.model.clip_vip import CLIPViPVideoTower
from hilight.model.long_clip import LongCLIPImageTower
from hilight.model.token_mining import TokenMining

log = logging.getLogger(__name__)

DROP = None
FORMATS = SOURCE_FORMATS  # every one has a key map below

_TM = r"(?:query_projector|key_projector|val_projector|LongCLIP_projector|CLIP_VIP_projector|tokenizer_projector)"

KEY_MAPS: dict[str, list[tuple[str, str | None]]] = {
    "clipvip": [
        (r"(?:module\.)?clipmodel\.text_model\..*", DROP),  # text tower: not part of the VLM
        (r"(?:module\.)?clipmodel\.(?:text_projection\.weight|logit_scale)", DROP),  # contrastive head
        (r"(?:module\.)?clipmodel\.vision_model\.embeddings\.position_ids", DROP),  # arange buffer
        (r"(?:module\.)?clipmodel\.vision_model\.pre_layrnorm\.(weight|bias)", r"video_tower.pre_layernorm.\1"),
        (r"(?:module\.)?clipmodel\.vision_model\.(.+)", r"video_tower.\1"),
        (r"(?:module\.)?clipmodel\.visual_projection\.weight", r"video_tower.visual_projection.weight"),
    ],
    "longclip": [
        (r"visual\.(.+)", r"image_tower.\1"),
        # the text side of Long-CLIP (248-position tables included) is never used by HiLight
        (r"(?:token_embedding\.weight|positional_embedding|positional_embedding_res|text_projection|logit_scale)", DROP),
        (r"(?:transformer|ln_final)\..+", DROP),
        (r"(?:input_resolution|context_length|vocab_size)", DROP),  # scalar metadata entries
    ],
    "token-mining": [
        (rf"(?:model\.token_mining\.)?({_TM}\.\d+\.(?:weight|bias))", r"token_mining.\1"),
    ],
    "hilight-merged": [
        (r"model\.token_mining\.(.+)", r"token_mining.\1"),
        # The original never loads tower weights from this directory (it reloads the .pt files),
        # so neither do we: the towers come from the clipvip / longclip files.
        (r"model\.vision_tower(?:_aux)?\..+", DROP),
        (r"lm_head\.weight", r"llm.lm_head.weight"),
        (r"model\.(.+)", r"llm.model.\1"),
    ],
    "gemma": [
        (r"lm_head\.weight", r"llm.lm_head.weight"),
        (r"model\.(.+)", r"llm.model.\1"),
    ],
}


# ``pretrain_clipvip_base_16.pt`` as the state of an aligner (hilight.training.align): the text
# tower and temperature start from it too
KEY_MAPS["clipvip-aligner"] = [
    (r"(?:module\.)?clipmodel\.text_model\.embeddings\.position_ids", DROP),  # arange buffer
    # transformers 5 names the CLIP text transformer's children directly (no text_model level)
    (r"(?:module\.)?clipmodel\.text_model\.(.+)", r"text.encoder.\1"),
    (r"(?:module\.)?clipmodel\.text_projection\.weight", r"text.text_projection.weight"),
    (r"(?:module\.)?clipmodel\.logit_scale", r"logit_scale"),
    *KEY_MAPS["clipvip"][2:],
]


def clipvip_aligner_state(path: Path) -> dict[str, torch.Tensor]:
    """``pretrain_clipvip_base_16.pt`` renamed for an aligner: ``text.*``, ``logit_scale``,
    ``video_tower.*``."""
    return map_keys(torch_state_file(path), "clipvip-aligner", str(path))


def map_keys(state: dict[str, torch.Tensor], fmt: str, source: str) -> dict[str, torch.Tensor]:
    """Rename ``state`` with the key map of ``fmt``; unknown names and collisions raise."""
    rules = [(re.compile(p), t) for p, t in KEY_MAPS[fmt]]
    out: dict[str, torch.Tensor] = {}
    unknown, dropped = [], 0
    for name, tensor in state.items():
        hit = next(((m, t) for p, t in rules if (m := p.fullmatch(name))), None)
        if hit is None:
            unknown.append(name)
            continue
        match, target = hit
        if target is DROP:
            dropped += 1
            continue
        new = match.expand(target)
        if new in out:
            raise ConversionError(f"{source}: two source tensors map to {new}")
        out[new] = tensor
    if unknown:
        raise ConversionError(
            f"{source}: {len(unknown)} name(s) unknown to the {fmt} format: {', '.join(sorted(unknown)[:20])}"
        )
    log.info("%s: %d tensors kept, %d dropped by name", source, len(out), dropped)
    return out


def torch_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a ``torch.save`` file, loaded with ``weights_only``."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles; report one line
        raise ConversionError(f"{path}: cannot be read as a weights-only torch file ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if _keep_entry(path, k, v)}


def _keep_entry(path: Path, name: str, value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if name in ("input_resolution", "context_length", "vocab_size") and isinstance(value, int):
        return False  # scalar metadata that some CLIP exports carry beside the weights
    raise ConversionError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")


def hf_directory(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json, tensors)`` of a transformers model directory (safetensors or .bin,
    single file or sharded with an index)."""
    from safetensors.torch import load_file

    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: no config.json")
    config = json.loads(cfg_file.read_text())
    for index_name, single, loader in (
        ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(f)),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", torch_state_file),
    ):
        if (path / index_name).is_file():
            files = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
        elif (path / single).is_file():
            files = [single]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for name in files:
            if not (path / name).is_file():
                raise ConversionError(f"{path / name}: shard listed in the index is missing")
            state.update(loader(path / name))
        return config, state
    raise ConversionError(f"{path}: no model.safetensors or pytorch_model.bin (sharded or not)")


@dataclass
class Sources:
    """Paths of the original checkpoints to assemble one HiLight from."""

    clipvip: Path | None = None
    longclip: Path | None = None
    token_mining: Path | None = None
    hilight_merged: Path | None = None
    gemma: Path | None = None
    tokenizer: Path | None = None


def read_source(fmt: str, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Mapped tensors of one source (and its HF config.json for LLM directories)."""
    if fmt in ("hilight-merged", "gemma"):
        hf_config, state = hf_directory(path)
        model_type = hf_config.get("model_type")
        wanted = "hilight_gemma" if fmt == "hilight-merged" else "gemma"
        if model_type != wanted:
            raise ConversionError(f"{path}: config.json has model_type {model_type!r}, the {fmt} format needs {wanted!r}")
        return map_keys(state, fmt, str(path)), hf_config
    return map_keys(torch_state_file(path), fmt, str(path)), None


def assemble(
    sources: Sources, base: HiLightConfig, init: frozenset[str] = frozenset(), dtype: torch.dtype = torch.float32
) -> HiLight:
    """Build a complete HiLight from original checkpoints.

    ``base`` supplies tower and TokenMining sizes; the LLM's sizes come from the Gemma /
    merged directory's ``config.json``. Components named in ``init`` (``token_mining``) are
    freshly initialised instead of loaded, for starting stage-1 training.
    """
    state: dict[str, torch.Tensor] = {}
    llm_dir = sources.hilight_merged or sources.gemma
    if sources.hilight_merged and sources.gemma:
        raise ConversionError("give either a hilight-merged or a gemma directory, not both")
    if llm_dir is None:
        raise ConversionError("the LLM is missing: give a hilight-merged or a gemma directory")
    fmt = "hilight-merged" if sources.hilight_merged else "gemma"
    llm_state, hf_config = read_source(fmt, llm_dir)
    config = replace(base, llm=llm_config_from_hf(hf_config))  # __post_init__ re-checks the dims
    has_tm = any(k.startswith("token_mining.") for k in llm_state)
    if has_tm and (sources.token_mining or "token_mining" in init):
        raise ConversionError(f"{llm_dir} already holds TokenMining; do not give it again")
    state.update(llm_state)

    fresh = {
        "video_tower": lambda: CLIPViPVideoTower(config.video_tower),
        "image_tower": lambda: LongCLIPImageTower(config.image_tower),
        "token_mining": lambda: TokenMining(config.token_mining),
    }
    given = {"video_tower": sources.clipvip, "image_tower": sources.longclip, "token_mining": sources.token_mining}
    formats = {"video_tower": "clipvip", "image_tower": "longclip", "token_mining": "token-mining"}
    for component, path in given.items():
        if component == "token_mining" and has_tm:
            continue
        if component in init:
            if path is not None:
                raise ConversionError(f"{component} is both given ({path}) and asked to be initialised")
            log.info("%s: freshly initialised", component)
            state.update({f"{component}.{k}": v for k, v in fresh[component]().state_dict().items()})
        elif path is None:
            raise ConversionError(f"{component} is missing: give --from {formats[component]} PATH"
                                  + (" or --init token_mining" if component == "token_mining" else ""))
        else:
            state.update(read_source(formats[component], path)[0])

    if config.llm.tie_word_embeddings and TIED_KEY in state:
        head = state.pop(TIED_KEY)
        if not torch.equal(head, state["llm.model.embed_tokens.weight"]):
            raise ConversionError(f"{llm_dir}: lm_head.weight differs from the tied embedding table")
    model = build_empty(config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(model, state, tied=tied_keys(config), where="assembled checkpoint")
    tie_llm_embeddings(model)
    return model.eval()
