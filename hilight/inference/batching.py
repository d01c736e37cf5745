"""Requests that wait together are generated together.

A :class:`Batcher` owns one worker thread. Requests submitted while it is busy queue up; each
time it is free it takes every waiting request (up to ``max_batch``) that shares the first
one's sampling settings and generates them as one left-padded batch, with their new videos
encoded as one batch too. Every request still streams its own text and can be cancelled on
its own (its row stops; the others go on). Greedy answers are those of one-at-a-time
generation (the engine's left-padded batches match single prompts).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hilight.errors import HiLightError
from hilight.inference.engine import Clip, Engine, GenerationSettings, generate
from hilight.text import Message, collate

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request: the whole conversation (ending in the new user turn, its videos placed) and
    every video in it (paths or :class:`~hilight.inference.engine.Clip`), in order.
    ``emit(kind, value)`` receives ``("text", chunk)`` as the answer grows, then ``("done",
    usage)`` (token counts and what each video was read as) or ``("error", exception)``."""

    messages: Sequence[Message]
    videos: Sequence[str | Path | Clip]
    settings: GenerationSettings
    emit: Callable[[str, object], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.batches: list[int] = []  # the size of every batch run (for tests and benchmarks)
        self._worker = threading.Thread(target=self._loop, name="hilight-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; its results come through ``job.emit``."""
        if job.settings.num_beams != 1:
            raise ValueError("beam search is not batched: generate it on its own")
        self.waiting.put(job)

    def _loop(self) -> None:
        while True:
            first = self.waiting.get()
            batch, held = [first], []
            while len(batch) < self.max_batch:
                try:
                    job = self.waiting.get_nowait()
                except queue.Empty:
                    break
                (batch if job.settings == first.settings else held).append(job)
            for job in held:  # other settings: the next batch
                self.waiting.put(job)
            try:
                self._run(batch)
            except Exception as exc:  # a bug: every request of the batch hears of it
                log.exception("batched generation failed")
                for job in batch:
                    job.emit("error", exc)

    def _run(self, jobs: list[Job]) -> None:
        engine = self.engine
        ready, encoded, planned = [], [], []
        for job in jobs:  # one request's bad video or conversation fails that request only
            if job.cancel.is_set():
                job.emit("done", {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "videos": []})
                continue
            try:
                plans = [engine.plan(v) for v in job.videos]
                encoded.append(engine.encode_prompt(list(job.messages), plans, job.settings))
                planned.append(plans)
                ready.append(job)
            except HiLightError as exc:
                job.emit("error", exc)
        try:
            embeds = engine.segment_embeddings([p for plans in planned for p in plans])
        except HiLightError:  # find whose video it is, and go on without that request
            kept = []
            for job, enc, plans in zip(ready, encoded, planned, strict=True):
                try:
                    engine.segment_embeddings(plans)
                    kept.append((job, enc, plans))
                except HiLightError as exc:
                    job.emit("error", exc)
            ready, encoded, planned = (list(x) for x in zip(*kept, strict=True)) if kept else ([], [], [])
            embeds = engine.segment_embeddings([p for plans in planned for p in plans])
        if not ready:
            return
        self.batches.append(len(ready))
        rows = _Rows(engine, ready)
        batch = collate(encoded, engine.chat.pad_id, padding_side="left")
        generate(engine.model, batch, engine.stop_ids, ready[0].settings, video_embeds=embeds, streamer=rows,
                 stopping=StoppingCriteriaList([rows]))
        width = batch.input_ids.shape[1]
        limit = min(ready[0].settings.max_new_tokens, engine.context - width)
        for job, enc, n, plans, stopped in zip(ready, encoded, rows.generated, planned, rows.stopped, strict=True):
            rows.flush(job)
            job.emit("done", {"prompt_tokens": len(enc), "cached_tokens": 0, "completion_tokens": n,
                              "videos": [p.info() for p in plans],
                              "finish_reason": "length" if not stopped and n >= limit else "stop"})


class _Rows(BaseStreamer, StoppingCriteria):
    """Streams each row's text to its request and stops the rows whose request was cancelled."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.finished = [False] * len(jobs)
        self.generated = [0] * len(jobs)
        self.stopped = [False] * len(jobs)  # ended by a stop token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt first
            self.prompt_seen = True
            return
        for i, token in enumerate(value.view(-1).tolist()):
            if self.finished[i]:
                continue
            self.generated[i] += 1
            if token in self.engine.stop_ids:
                self.finished[i] = self.stopped[i] = True
                continue
            self.tokens[i].append(token)
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(self.sent[i]):  # whole characters only
                self.jobs[i].emit("text", text[len(self.sent[i]):])
                self.sent[i] = text

    def flush(self, job: Job) -> None:
        i = self.jobs.index(job)
        text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        if len(text) > len(self.sent[i]):
            job.emit("text", text[len(self.sent[i]):])
            self.sent[i] = text

    def end(self) -> None:
        pass

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        stop = [job.cancel.is_set() for job in self.jobs]
        for i, s in enumerate(stop):
            self.finished[i] = self.finished[i] or s
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)
