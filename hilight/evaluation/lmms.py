"""HiLight as an lmms-eval model: ``lmms-eval --model hilight --model_args pretrained=CHECKPOINT``.

Installed with ``pip install 'hilight[eval]'`` and found through lmms-eval's entry-point group
``lmms_eval.models`` (no fork of lmms-eval). Everything goes through HiLight's engine: its
segment cache, dtype policy (``dtype=auto``), quantization, batched generation, and its
per-request sampling (``num_frames``, ``fps``, ``max_frames`` in ``--model_args``; default: the
model's own frames). Several processes (``accelerate launch --num_processes N -m lmms_eval``)
each load the model on their own device and answer their share, as lmms-eval shards.

``--model_args``: ``pretrained`` (a checkpoint or a known name; default the bundled model),
``dtype`` (auto, fp32, bf16, fp16), ``quantize`` (auto, none, int8, int4, packed, q4_k_m, q8_0; CPU), ``num_frames``,
``fps``, ``max_frames``, ``max_new_tokens`` (when a task gives none; default 128).

Visuals: paths of video or image files (what lmms-eval's video tasks give), or PIL images
(image tasks; written to a temporary PNG the model owns and removes).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from tqdm import tqdm

from hilight.errors import ConfigError
from hilight.sampling import Clip, Sampling
from hilight.text import Message

GENERATION_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "until", "do_sample"}


class HiLightLMMS(lmms):
    def __init__(self, pretrained: str = "billiards-small", dtype: str = "auto", quantize: str = "auto",
                 num_frames: int | None = None, fps: float | None = None, max_frames: int | None = None,
                 max_new_tokens: int = 128, batch_size: int | str = 1, device: str | None = None,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"--model_args: unknown argument {sorted(unknown)[0]!r} for hilight (pretrained, dtype, "
                              "quantize, num_frames, fps, max_frames, max_new_tokens)")
        import torch
        from accelerate import Accelerator

        from hilight.checkpoint import resolve_model
        from hilight.inference.engine import Engine, resolve_dtype

        accelerator = Accelerator()
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if device in (None, "", "cuda") or accelerator.num_processes > 1:
            device = str(accelerator.device)
        on_cpu = not str(device).startswith("cuda") or not torch.cuda.is_available()
        self.engine = Engine.from_checkpoint(resolve_model(str(pretrained)), dtype=resolve_dtype(dtype),
                                             device="cpu" if on_cpu else str(device),
                                             quantize=quantize if on_cpu else "none")
        self.sampling = Sampling.from_options({"num_frames": num_frames, "fps": fps, "max_frames": max_frames},
                                              where="--model_args")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._images = Path(tempfile.mkdtemp(prefix="hilight-lmms-"))

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_images", ""), ignore_errors=True)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _clips(self, visuals) -> list[Clip]:
        """A request's visuals as clips: file paths, or PIL images written once as PNG files."""
        clips = []
        for visual in visuals or []:
            if isinstance(visual, str | Path):
                clips.append(Clip(Path(visual), self.sampling))
            elif hasattr(visual, "save"):  # a PIL image
                path = self._images / f"image-{id(visual)}-{len(list(self._images.iterdir()))}.png"
                visual.convert("RGB").save(path)
                clips.append(Clip(path))
            else:
                raise ConfigError(f"hilight reads video and image files or PIL images, not {type(visual).__name__}")
        return clips

    def _prompt(self, context: str, clips: list[Clip]) -> list[Message]:
        from hilight.inference.engine import place_videos

        return [Message("user", place_videos(context, len(clips)))]

    def _visuals(self, doc_to_visual, doc_id, task, split):
        return doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []

    def generate_until(self, requests) -> list[str]:
        from hilight.inference.engine import GenerationSettings

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same settings go together
        for i, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(i)
        bar = tqdm(total=len(requests), desc="hilight", disable=self.rank != 0)
        for indices in groups.values():
            gen = dict(requests[indices[0]].args[1])
            extra = sorted(set(gen) - GENERATION_KEYS)
            if extra:
                raise ConfigError(f"generation_kwargs: {extra[0]!r} is not supported by hilight")
            temperature = float(gen.get("temperature") or 0) if gen.get("do_sample", True) else 0.0
            settings = GenerationSettings.from_request(int(gen.get("max_new_tokens") or self.max_new_tokens),
                                                       temperature, float(gen.get("top_p") or 1.0),
                                                       int(gen.get("top_k") or 0), int(gen.get("num_beams") or 1))
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    clips = self._clips(self._visuals(doc_to_visual, doc_id, task, split))
                    prompts.append((self._prompt(context, clips), clips))
                for i, text in zip(chunk, self.engine.answer_batch(prompts, settings), strict=True):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """For each (context, continuation): its negative log-likelihood (lmms-eval picks the
        lowest) and whether greedy decoding gives it; a question's options run as one batch."""
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            context, _, _, doc_id, task, split = request.args
            groups[(context, doc_id, task, split)].append(i)
        for (context, doc_id, task, split), indices in tqdm(groups.items(), desc="hilight", disable=self.rank != 0):
            clips = self._clips(self._visuals(requests[indices[0]].args[2], doc_id, task, split))
            scored = self.engine.loglikelihood(self._prompt(context, clips), clips,
                                               [requests[i].args[1] for i in indices])
            for i, (logprob, greedy) in zip(indices, scored, strict=True):
                results[i] = GenerationResult(text=(-logprob, greedy))  # .text passes through unchanged
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("hilight answers one round per request (generate_until)")
