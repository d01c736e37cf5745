"""What vLLM needs before it builds the model: HiLight's config as a transformers config, the
video loader, and the loader defaults a HiLight checkpoint implies.

Imported by :func:`hilight.integrations.vllm.register` in every vLLM process, so it stays
light: no torch model code here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from transformers import GemmaConfig, PretrainedConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.multimodal.video import VideoLoader

from hilight.config import HiLightConfig, VideoInputConfig, from_dict, to_dict
from hilight.errors import HiLightError, VideoError
from hilight.video import decode_video


class HiLightVllmConfig(PretrainedConfig):
    """HiLight's ``config.json`` read by transformers' ``AutoConfig`` (for vLLM).

    The file holds ``{"format": "hilight", ..., "config": {...}}`` plus ``model_type`` and
    ``architectures``; ``text_config`` (vLLM's Gemma) is derived from ``config.llm`` with the
    exact activation HiLight uses (``hidden_activation``: vLLM's Gemma otherwise forces tanh).
    """

    model_type = "hilight"
    sub_configs = {"text_config": GemmaConfig}

    def __init__(self, config: dict[str, Any] | None = None, text_config: Any = None, **kwargs):
        self.config = config or {}
        self.format = kwargs.pop("format", "hilight")
        self.format_version = kwargs.pop("format_version", None)
        hilight = self.hilight()
        text = hilight.llm.to_gemma()
        text.hidden_activation = hilight.llm.hidden_act
        text.architectures = ["GemmaForCausalLM"]
        self.text_config = text
        kwargs.setdefault("tie_word_embeddings", hilight.llm.tie_word_embeddings)
        super().__init__(**kwargs)

    def hilight(self) -> HiLightConfig:
        return from_dict(HiLightConfig, self.config)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("text_config", None)  # derived from config.llm, never stored twice
        return out


class ModelDefaults(VerifyAndUpdateConfig):
    """A HiLight checkpoint decodes its videos with HiLight's loader at its own frame count and
    size, unless ``--media-io-kwargs`` says otherwise."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        mm_config = model_config.multimodal_config
        if mm_config is None:
            return
        video = model_config.hf_config.hilight().video
        kwargs = mm_config.media_io_kwargs.setdefault("video", {})
        kwargs.setdefault("video_backend", "hilight")
        if "fps" not in kwargs:
            kwargs.setdefault("num_frames", video.num_frames)
        kwargs.setdefault("hilight_video", to_dict(video))


class HiLightVideoLoader(VideoLoader):
    """Video bytes to the uint8 frames HiLight samples (PyAV, the frame chooser and decoder of
    :func:`hilight.video.decode_video`), so vLLM sees exactly the frames HiLight's engine would."""

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, **kwargs) -> tuple[np.ndarray, dict[str, Any]]:
        cfg = from_dict(VideoInputConfig, kwargs.get("hilight_video") or {})
        if num_frames > 0:
            cfg.num_frames = num_frames
        with tempfile.TemporaryDirectory(prefix="hilight-vllm-") as tmp:
            path = Path(tmp) / "video"
            path.write_bytes(data)
            try:
                decoded = decode_video(path, cfg)
            except VideoError as exc:  # the temporary path means nothing to the user
                raise ValueError(f"video: {exc.reason}") from None
            except HiLightError as exc:
                raise ValueError(f"video: {exc}") from None
        fps = (decoded.total_frames - 1) / decoded.duration if decoded.duration > 0 else 0.0
        return decoded.frames, {
            "total_num_frames": decoded.total_frames,
            "fps": fps,
            "duration": decoded.duration,
            "video_backend": "hilight",
            "frames_indices": decoded.indices,
            "timestamps": decoded.timestamps,
            "do_sample_frames": False,
        }
