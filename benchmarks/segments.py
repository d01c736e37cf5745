"""Long videos in segments at full size: decode + encode time against the number of segments,
and a follow-up about another range with and without the segment cache.

``hilight-2b`` with random weights built in bf16 (the figures do not depend on the weights), on
the 60 s 1080p clip of ``benchmarks/decode.py`` (made once, cached). For 1, 4 and 16 segments
(12, 48, 192 frames) a fresh engine plans, decodes (seeking) and runs the towers and TokenMining;
decode is timed on its own as well, encode is the rest. The follow-up: a conversation asks about
0:00-0:30 at 0.8 fps (3 segments, the third cut short by the range), then about 0:00-1:00 at
the same rate (4 segments, the first two the same frames as before); timed once in that conversation (segments and KV cache kept)
and once as a fresh engine would answer the same two-turn conversation (everything encoded and
prefilled again).

    .venv/bin/python benchmarks/segments.py [--preset hilight-2b] [--out benchmarks/results/segments.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from decode import FPS, make_clip
from e2e import peak_rss_gb, random_model

from hilight.config import preset
from hilight.errors import ConversationError
from hilight.inference.engine import Clip, Conversation, Engine, GenerationSettings, stream_reply
from hilight.sampling import Sampling
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer
from hilight.video import decode_frames


def encode_time(model, tokenizer, clip: Path, segments: int) -> dict:
    engine = Engine(model, tokenizer)
    cfg = model.config.video
    sampling = Sampling() if segments == 1 else Sampling(num_frames=segments * cfg.num_frames)
    start = time.perf_counter()
    planned = engine.plan(Clip(clip, sampling))
    plan_s = time.perf_counter() - start
    embeds = engine.segment_embeddings([planned])
    total_s = time.perf_counter() - start
    assert embeds.shape[0] == segments == len(planned.segments)
    start = time.perf_counter()
    decode_frames(clip, planned.index, [i for s in planned.segments for i in s.indices], cfg)
    decode_s = time.perf_counter() - start
    return {"segments": segments, "frames": segments * cfg.num_frames, "demux_pass_s": plan_s, "decode_s": decode_s,
            "encode_s": total_s - plan_s - decode_s, "total_s": total_s,
            "tokens": segments * engine.chat.tokens_per_video}


def follow_up(model, tokenizer, clip: Path, new_tokens: int) -> dict:
    settings = GenerationSettings(new_tokens)
    turns = [("What happens in the first half?", Clip(clip, Sampling(fps=0.8, end=30))),
             ("And over the whole minute?", Clip(clip, Sampling(fps=0.8, end=60)))]
    towers = []
    hook = model.video_tower.register_forward_hook(lambda m, args, out: towers.append(args[0].shape[0]))
    engine = Engine(model, tokenizer)
    conversation = Conversation()
    list(stream_reply(engine, conversation, turns[0][0], [turns[0][1]], settings))
    first_encoded = sum(towers)
    start, usage = time.perf_counter(), {}
    cached_answer = "".join(stream_reply(engine, conversation, turns[1][0], [turns[1][1]], settings, usage=usage))
    cached_s = time.perf_counter() - start
    cached_encoded = sum(towers) - first_encoded
    history = Conversation(conversation.messages[:2], [turns[0][1]])
    fresh = Engine(model, tokenizer)
    towers.clear()
    start = time.perf_counter()
    fresh_answer = "".join(stream_reply(fresh, history, turns[1][0], [turns[1][1]], settings))
    fresh_s = time.perf_counter() - start
    hook.remove()
    return {"segments_turn_1": 3, "segments_turn_2": len(usage["videos"][1]["segments"]),
            "encoded_with_cache": cached_encoded, "encoded_without": sum(towers),
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["cached_tokens"],
            "with_cache_s": cached_s, "without_cache_s": fresh_s, "speedup": fresh_s / cached_s,
            "same_answer": cached_answer == fresh_answer, "new_tokens": new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="hilight-2b")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/segments.json"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    clip = make_clip(args.cache / "1080p-60s-gop_1s.mp4", FPS)
    config = preset(args.preset)
    tokenizer = train_tokenizer(DEMO_CORPUS * 20, vocab_size=400)
    model = random_model(config, torch.bfloat16)
    rows = []
    for segments in (1, 4, 16):
        row = encode_time(model, tokenizer, clip, segments)
        rows.append(row)
        print(f"{segments:2d} segment(s), {row['frames']} frames: demux {row['demux_pass_s']:.2f} s, decode "
              f"{row['decode_s']:.2f} s, encode {row['encode_s']:.2f} s -> {row['total_s']:.2f} s "
              f"({row['total_s'] / segments:.2f} s per segment)", flush=True)
    engine = Engine(model, tokenizer)
    try:  # how many segments the context holds, as the refusal says (no decoding happens)
        list(stream_reply(engine, Conversation(), "What happens?", [Clip(clip, Sampling(num_frames=1024))]))
        refusal = None
    except ConversationError as exc:
        refusal = str(exc)
    print(f"1024 frames: {refusal}", flush=True)
    again = follow_up(model, tokenizer, clip, args.new_tokens)
    print(f"follow-up (3 -> {again['segments_turn_2']} segments, {again['prompt_tokens']} prompt tokens): with the "
          f"segment and KV caches {again['with_cache_s']:.1f} s ({again['encoded_with_cache']} segments encoded, "
          f"{again['cached_tokens']} prompt tokens reused); a fresh engine {again['without_cache_s']:.1f} s "
          f"({again['encoded_without']} encoded) -> {again['speedup']:.1f}x; same answer: {again['same_answer']}")
    result = {"preset": args.preset, "dtype": "bf16", "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "clip": "60 s 1080p H.264, 30 fps, 1 s GOP",
              "encode": rows, "follow_up": again, "context_refusal": refusal, "peak_rss_gb": peak_rss_gb()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
