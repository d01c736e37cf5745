"""HiLight as a vLLM model (``pip install 'hilight[vllm]'``).

vLLM loads this plugin through the ``vllm.general_plugins`` entry point in every one of its
processes. It registers, for checkpoints whose ``config.json`` says ``"model_type": "hilight"``
(every checkpoint HiLight writes):

- the config class, so ``vllm serve CHECKPOINT`` reads HiLight's own ``config.json``;
- the model (:mod:`hilight.integrations.vllm.model`): HiLight's towers and TokenMining feeding
  vLLM's Gemma, so continuous batching, the paged KV cache and tensor parallelism apply;
- a video loader (``video_backend="hilight"``) that samples frames exactly as HiLight does, and
  the model's defaults for it (frame count, size), so answers match HiLight's own engine;
- HiLight's chat template, for the OpenAI-compatible server.

Nothing here runs for other models: every registration is keyed by HiLight's model type or
architecture.
"""

from __future__ import annotations

from pathlib import Path

MODEL_TYPE = "hilight"
ARCHITECTURE = "HiLightForConditionalGeneration"
VIDEO_BACKEND = "hilight"
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; called once per vLLM process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY
    from vllm.transformers_utils.chat_templates.registry import _MODEL_TYPE_TO_CHAT_TEMPLATE_FALLBACK

    from hilight.integrations.vllm.config import HiLightVideoLoader, HiLightVllmConfig, ModelDefaults

    if ARCHITECTURE in ModelRegistry.get_supported_archs():
        return
    AutoConfig.register(MODEL_TYPE, HiLightVllmConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, "hilight.integrations.vllm.model:HiLightForConditionalGeneration")
    VIDEO_LOADER_REGISTRY.register(VIDEO_BACKEND)(HiLightVideoLoader)
    # the hook vLLM's own video models use to default their loader (see MODELS_CONFIG_MAP)
    MODELS_CONFIG_MAP[ARCHITECTURE] = ModelDefaults
    # vLLM's public register_chat_template_fallback_path warns on every call (once per process)
    _MODEL_TYPE_TO_CHAT_TEMPLATE_FALLBACK.setdefault(MODEL_TYPE, CHAT_TEMPLATE)
