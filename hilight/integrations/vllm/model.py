"""HiLight inside vLLM: HiLight's own towers and TokenMining produce each video's tokens, vLLM's
Gemma (paged KV cache, continuous batching, tensor parallelism) runs the language model.

The arithmetic is HiLight's: frames come from HiLight's decoder (:class:`HiLightVideoLoader`)
and preprocessing, the visual tokens are scaled by sqrt(hidden_size) as
:meth:`hilight.model.HiLight.embed` does, the prompt is tokenized by
:class:`hilight.text.ChatTokenizer`, and vLLM's Gemma runs the checkpoint's activation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from hilight.config import HiLightConfig
from hilight.integrations.vllm.config import HiLightVllmConfig
from hilight.integrations.vllm.prompt import prompt_ids
from hilight.model.clip_vip import CLIPViPVideoTower
from hilight.model.hilight import COMPONENTS, TowerOutputs, mine_tokens, scale_visual
from hilight.model.long_clip import LongCLIPImageTower
from hilight.model.token_mining import TokenMining
from hilight.sampling import ALIASES, FIELDS
from hilight.text import VIDEO_PLACEHOLDER_ID, VIDEO_TOKEN, ChatTokenizer
from hilight.video import preprocess, sample_indices

log = logging.getLogger(__name__)

PIXELS = "pixel_values_videos"


class HiLightProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> HiLightVllmConfig:
        return self.ctx.get_hf_config(HiLightVllmConfig)

    def hilight(self) -> HiLightConfig:
        return self.get_hf_config().hilight()

    def get_default_tok_params(self):
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)  # the template has <bos>

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"video": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"video": self.hilight().tokens_per_video}


class HiLightDummyInputs(BaseDummyInputsBuilder[HiLightProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return VIDEO_TOKEN * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        video = self.info.hilight().video
        options = (mm_options or {}).get("video")
        return {"video": self._get_dummy_videos(width=video.image_size, height=video.image_size,
                                                num_frames=video.num_frames, num_videos=mm_counts.get("video", 0),
                                                overrides=options)}


SAMPLING_KEYS = set(FIELDS) | set(ALIASES)


class HiLightMultiModalProcessor(BaseMultiModalProcessor[HiLightProcessingInfo]):
    """Frames to pixel values (HiLight's preprocessing); the prompt re-tokenized by HiLight's
    ChatTokenizer, with each ``<video>`` as ``tokens_per_video`` positions for its tokens."""

    def _chat(self) -> ChatTokenizer:
        return ChatTokenizer(self.info.get_tokenizer(), self.info.hilight().tokens_per_video)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        cfg = self.info.hilight().video
        asked = sorted(set(hf_kwargs) & SAMPLING_KEYS)
        if asked:  # refused, never ignored: vLLM gives each video one segment of the model's frames
            raise ValueError(f"mm_processor_kwargs.{asked[0]}: HiLight on vLLM reads each video as the model's "
                             f"{cfg.num_frames} frames; time ranges, frame counts and segments are served by "
                             "`hilight serve`")
        clips = []
        for frames in hf_data.get("videos", []):
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"video: expected frames [T, H, W, 3], got shape {list(frames.shape)}")
            if len(frames) != cfg.num_frames:  # another loader's frame count: HiLight's uniform choice of them
                log.warning("video: %d frames given, HiLight reads %d; taking %d of them uniformly",
                            len(frames), cfg.num_frames, cfg.num_frames)
                frames = frames[sample_indices(len(frames), cfg.num_frames)]
            clips.append(preprocess(np.ascontiguousarray(frames, dtype=np.uint8), cfg))
        return BatchFeature({PIXELS: torch.stack(clips)} if clips else {})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {PIXELS: MultiModalFieldConfig.batched("video")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        # _postprocess_prompt has already laid out every video's positions; this marks them
        slots = [self._chat().pad_id] * self.info.hilight().tokens_per_video
        return [PromptReplacement(modality="video", target=slots,
                                  replacement=PromptUpdateDetails.select_token_id(slots, self._chat().pad_id))]

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """The renderer's ids re-tokenized as HiLight tokenizes the same text (see
        :mod:`hilight.integrations.vllm.prompt`), each video's positions holding the pad id."""
        chat = self._chat()
        ids = prompt_ids(chat, chat.tok.decode(prompt, skip_special_tokens=False))
        return [chat.pad_id if t == VIDEO_PLACEHOLDER_ID else t for t in ids]


@MULTIMODAL_REGISTRY.register_processor(HiLightMultiModalProcessor, info=HiLightProcessingInfo,
                                        dummy_inputs=HiLightDummyInputs)
class HiLightForConditionalGeneration(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("video"):
            return VIDEO_TOKEN
        raise ValueError("HiLight reads videos (a still image is a one-frame video: send it as a video)")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config: HiLightVllmConfig = vllm_config.model_config.hf_config
        self.hilight = hf_config.hilight()
        with self._mark_tower_model(vllm_config, "video"):
            self.video_tower = CLIPViPVideoTower(self.hilight.video_tower)
            self.image_tower = LongCLIPImageTower(self.hilight.image_tower)
            self.token_mining = TokenMining(self.hilight.token_mining)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=hf_config.text_config,
                prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixels = kwargs.get(PIXELS)
        if pixels is None:
            return []
        if not isinstance(pixels, torch.Tensor):
            pixels = torch.stack(list(pixels))
        pixels = pixels.float()  # as HiLight's engine feeds them: fp32 pixels, towers in the model dtype
        towers = TowerOutputs(video=self.video_tower(pixels), image=self.image_tower(pixels))
        tokens = mine_tokens(self.token_mining, towers, self.hilight.video_tower.num_proxy_tokens)  # [V, T*Q, D]
        dtype = self.language_model.model.embed_tokens.weight.dtype
        return list(scale_visual(tokens, dtype))

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HiLight's tensor names: ``llm.*`` go to vLLM's Gemma (which fuses q/k/v and gate/up),
        the towers' and TokenMining's load strictly into HiLight's own modules."""
        own = {name: {} for name in COMPONENTS if name != "llm"}
        text = []
        for name, tensor in weights:
            component, _, rest = name.partition(".")
            if component == "llm":
                text.append((rest, tensor))
            elif component in own:
                own[component][rest] = tensor
            else:
                raise ValueError(f"unexpected tensor {name!r} in a HiLight checkpoint")
        loaded = {f"language_model.{n}" for n in self.language_model.load_weights(text)}
        for component, state in own.items():
            getattr(self, component).load_state_dict(state, strict=True)
            loaded |= {f"{component}.{n}" for n in state}
        return loaded
