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
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hilight.checkpoint import TIED_KEY, build_empty, load_state_strict, tie_llm_embeddings, tied_keys
from hilight.config import SOURCE_FORMATS, HiLightConfig, from_dict, llm_config_from_hf, to_dict
from hilight.errors import ConfigError, ConversionError
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


def _count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def recorded_sizes(component: str, state: dict[str, torch.Tensor], clipvip_config: dict | None = None
                   ) -> dict[str, int | bool]:
    """The config values (dotted names) that one component's mapped tensors record, so that
    nothing about its sizes is guessed. Attention heads are not in any tensor: CLIP-ViP's come
    from its vision config JSON when given; Long-CLIP's are ``width // 64``, as the original's
    ``build_model`` derives them (toy widths under 64 keep the preset's)."""
    if component == "video_tower":
        v = "video_tower."
        patch = state[v + "embeddings.patch_embedding.weight"]  # [D, 3, P, P]
        positions = state[v + "embeddings.position_embedding.weight"].shape[0] - 1
        sizes = {"hidden_size": patch.shape[0], "patch_size": patch.shape[-1],
                 "image_size": math.isqrt(positions) * patch.shape[-1],
                 "num_layers": _count_layers(state, v + "encoder.layers."),
                 "intermediate_size": state[v + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                 "projection_dim": state[v + "visual_projection.weight"].shape[0],
                 "temporal_size": state[v + "embeddings.temporal_embedding"].shape[1],
                 "add_cls_num": state[v + "embeddings.added_cls"].shape[0]}
        vision = (clipvip_config or {}).get("vision_config", clipvip_config or {})
        if "num_attention_heads" in vision:
            sizes["num_heads"] = int(vision["num_attention_heads"])
        return {f"video_tower.{k}": val for k, val in sizes.items()}
    if component == "image_tower":
        i = "image_tower."
        conv = state[i + "conv1.weight"]  # [W, 3, P, P]
        positions = state[i + "positional_embedding"].shape[0] - 1
        width = conv.shape[0]
        sizes = {"width": width, "patch_size": conv.shape[-1], "image_size": math.isqrt(positions) * conv.shape[-1],
                 "num_layers": _count_layers(state, i + "transformer.resblocks."),
                 "intermediate_size": state[i + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                 "output_dim": state[i + "proj"].shape[1]}
        if width >= 64:
            sizes["num_heads"] = width // 64
        return {f"image_tower.{k}": val for k, val in sizes.items()}
    if component == "token_mining":
        t = "token_mining."
        return {"token_mining.video_dim": state[t + "CLIP_VIP_projector.0.weight"].shape[1],
                "token_mining.image_dim": state[t + "query_projector.1.weight"].shape[0],
                "token_mining.llm_dim": state[t + "tokenizer_projector.1.weight"].shape[0],
                "token_mining.queries_per_frame": state[t + "LongCLIP_projector.0.weight"].shape[0],
                "token_mining.slot_queries": t + "slot_queries" in state}
    raise ValueError(f"no recorded sizes for {component}")


def _with(config: HiLightConfig, values: dict, where: str) -> HiLightConfig:
    """``config`` with dotted ``values`` set (the dimension cross-checks run again)."""
    data = to_dict(config)
    for key, value in values.items():
        section, name = key.split(".")
        data[section][name] = value
    try:
        return from_dict(HiLightConfig, data)
    except ConfigError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def assemble(
    sources: Sources, base: HiLightConfig, init: frozenset[str] = frozenset(), dtype: torch.dtype = torch.float32,
    explicit: dict | None = None, clipvip_config: Path | None = None,
) -> HiLight:
    """Build a complete HiLight from original checkpoints.

    Every size the files record is read from them (:func:`recorded_sizes`; the LLM's from the
    Gemma / merged directory's ``config.json``); ``base`` supplies only what no file records
    (frame count, epsilons, CLIP-ViP heads without ``clipvip_config``). ``explicit`` (the user's
    ``--set`` values) may not contradict a file. Components named in ``init``
    (``token_mining``) are freshly initialised instead of loaded, for starting stage-1 training.
    """
    explicit = explicit or {}
    vision_json = None
    if clipvip_config is not None:
        try:
            vision_json = json.loads(Path(clipvip_config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{clipvip_config}: cannot read the CLIP-ViP config JSON ({exc})") from None
    state: dict[str, torch.Tensor] = {}
    llm_dir = sources.hilight_merged or sources.gemma
    if sources.hilight_merged and sources.gemma:
        raise ConversionError("give either a hilight-merged or a gemma directory, not both")
    if llm_dir is None:
        raise ConversionError("the LLM is missing: give a hilight-merged or a gemma directory")
    fmt = "hilight-merged" if sources.hilight_merged else "gemma"
    llm_state, hf_config = read_source(fmt, llm_dir)
    llm = llm_config_from_hf(hf_config)
    has_tm = any(k.startswith("token_mining.") for k in llm_state)
    if has_tm and (sources.token_mining or "token_mining" in init):
        raise ConversionError(f"{llm_dir} already holds TokenMining; do not give it again")
    state.update(llm_state)

    given = {"video_tower": sources.clipvip, "image_tower": sources.longclip, "token_mining": sources.token_mining}
    formats = {"video_tower": "clipvip", "image_tower": "longclip", "token_mining": "token-mining"}
    loaded: dict[str, tuple[dict[str, torch.Tensor], Path]] = {}
    for component, path in given.items():
        if path is not None and component not in init:
            loaded[component] = (read_source(formats[component], path)[0], path)
    if has_tm:
        loaded["token_mining"] = ({k: v for k, v in llm_state.items() if k.startswith("token_mining.")}, llm_dir)
    recorded: dict[str, tuple[int | bool, Path]] = {f"llm.{k}": (v, llm_dir) for k, v in vars(llm).items()}
    for component, (component_state, path) in loaded.items():
        try:
            found = recorded_sizes(component, component_state, vision_json if component == "video_tower" else None)
        except KeyError as exc:
            raise ConversionError(f"{path}: lacks {exc.args[0]}, which its sizes are read from") from None
        recorded.update({k: (v, path) for k, v in found.items()})
    for key, value in explicit.items():
        if key in recorded and recorded[key][0] != value:
            raise ConversionError(f"--set {key}={value} contradicts {recorded[key][1]}, which records {recorded[key][0]}")
    values = {k: v for k, (v, _) in recorded.items()}
    # what TokenMining and the frames must agree with, when no file of theirs says
    tower_sizes = {"token_mining.video_dim": values.get("video_tower.hidden_size"),
                   "token_mining.image_dim": values.get("image_tower.output_dim"),
                   "token_mining.llm_dim": llm.hidden_size, "video.image_size": values.get("video_tower.image_size")}
    values.update({k: v for k, v in tower_sizes.items() if v is not None and k not in values})
    config = _with(replace(base, llm=llm), {k: v for k, v in values.items() if not k.startswith("llm.")},
                   "the source files' sizes")

    fresh = {
        "video_tower": lambda: CLIPViPVideoTower(config.video_tower),
        "image_tower": lambda: LongCLIPImageTower(config.image_tower),
        "token_mining": lambda: TokenMining(config.token_mining),
    }
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
            state.update(loaded[component][0])

    if config.llm.tie_word_embeddings and TIED_KEY in state:
        head = state.pop(TIED_KEY)
        if not torch.equal(head, state["llm.model.embed_tokens.weight"]):
            raise ConversionError(f"{llm_dir}: lm_head.weight differs from the tied embedding table")
    model = build_empty(config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(model, state, tied=tied_keys(config), where="assembled checkpoint")
    tie_llm_embeddings(model)
    return model.eval()


def replace_components(model: HiLight, sources: Sources) -> HiLight:
    """``model`` (a HiLight checkpoint, e.g. one assembled before) with the components that
    ``sources`` give replaced, e.g. a stage-1 ``tokenmining.bin`` to continue training from.
    Each given file's recorded sizes must be the model's."""
    given = {"video_tower": (sources.clipvip, "clipvip"), "image_tower": (sources.longclip, "longclip"),
             "token_mining": (sources.token_mining, "token-mining")}
    if sources.gemma or sources.hilight_merged:
        raise ConversionError("with a base checkpoint, give only clipvip, longclip or token-mining files")
    state = model.state_dict()
    dtype = next(model.parameters()).dtype  # the replaced weights take the base's dtype
    replaced = 0
    for component, (path, fmt) in given.items():
        if path is None:
            continue
        new = read_source(fmt, path)[0]
        for key, value in recorded_sizes(component, new).items():
            section, name = key.split(".")
            have = getattr(getattr(model.config, section), name)
            if have != value:
                raise ConversionError(f"{path}: records {key}={value}, the base checkpoint has {have}")
        new = {k: v.to(dtype) if v.is_floating_point() else v for k, v in new.items()}
        state = {k: v for k, v in state.items() if not k.startswith(f"{component}.")} | new
        replaced += 1
    if not replaced:
        raise ConversionError("with a base checkpoint, give at least one --from clipvip / longclip / token-mining")
    state.pop(TIED_KEY, None)
    load_state_strict(model, state, tied=tied_keys(model.config), where="base checkpoint with replaced components")
    tie_llm_embeddings(model)
    return model


# where the original repository keeps each file (its README and scripts, CWD-relative)
ORIGINAL_LAYOUT = {"clipvip": "model_zoo/CLIP-ViP/pretrain_clipvip_base_16.pt",
                   "clipvip_config": "model_zoo/CLIP-ViP/clipvip-vision_config.json",
                   "longclip": "model_zoo/Long-CLIP/longclip-B.pt", "tokenizer": "model_zoo/LLM/gemma/tokenizer"}
RUN_FOLDERS = ("work_dirs", "work_dir")  # the README says one, the scripts the other


def original_layout(root: Path, run: str | None) -> tuple[Sources, Path | None]:
    """The sources of an original checkout's ``model_zoo/`` + ``work_dirs/`` layout: the towers
    and tokenizer at their fixed places, the released merged directory ``run`` (a path, or a
    name under ``work_dirs/``; without one, the only ``*Merge*`` directory there). Returns the
    sources and the CLIP-ViP vision config (None where the checkout has none)."""
    root = Path(root)
    paths = {k: root / v for k, v in ORIGINAL_LAYOUT.items()}
    for key in ("clipvip", "longclip", "tokenizer"):
        if not paths[key].exists():
            raise ConversionError(f"{root}: no {ORIGINAL_LAYOUT[key]} (the original layout)")
    if run is not None:
        candidates = [Path(run), *(root / folder / run for folder in RUN_FOLDERS)]
        merged = next((p for p in candidates if (p / "config.json").is_file()), None)
        if merged is None:
            raise ConversionError(f"{run}: no such merged directory (looked in {', '.join(RUN_FOLDERS)} too)")
    else:
        found = sorted(p.parent for folder in RUN_FOLDERS for p in (root / folder).glob("*Merge*/config.json"))
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) or "none"
            raise ConversionError(f"{root}: {len(found)} merged directories under {' or '.join(RUN_FOLDERS)} "
                                  f"({listed}); name one with --run")
        merged = found[0]
    sources = Sources(clipvip=paths["clipvip"], longclip=paths["longclip"], hilight_merged=merged,
                      tokenizer=paths["tokenizer"])
    return sources, paths["clipvip_config"] if paths["clipvip_config"].is_file() else None

