"""The ``hilight`` command. Each subcommand parses its arguments and calls one library function.

User errors (bad files, bad configs, bad checkpoints) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from hilight.checkpoint import CheckpointError
    from hilight.config import ConfigError
    from hilight.convert import ConversionError
    from hilight.text import ConversationError
    from hilight.video import VideoError

    return (CheckpointError, ConfigError, ConversionError, ConversationError, VideoError, FileNotFoundError,
            ValueError)


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a preset (built on the meta device) or what a checkpoint holds."""
    if (args.preset is None) == (args.path is None):
        raise SystemExit("hilight info: give either a checkpoint PATH or --preset NAME")
    if args.preset:
        import torch

        from hilight.config import preset, to_dict
        from hilight.model import HiLight

        config = preset(args.preset)
        with torch.device("meta"):
            counts = HiLight(config).parameter_counts()
        info = {"preset": args.preset, "parameters": counts, "tokens_per_video": config.tokens_per_video,
                "config": to_dict(config)}
    else:
        from hilight.checkpoint import describe

        info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info.get('preset') or info['path']}")
    for name, n in info["parameters"].items():
        print(f"  {name:<14}{n:>16,}")
    if "dtype" in info:
        print(f"  dtype {info['dtype']}, {info['tensors']} tensors, tokenizer: {'yes' if info['tokenizer'] else 'no'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Assemble a HiLight checkpoint from original-format files."""
    import torch

    from hilight.checkpoint import save_checkpoint
    from hilight.config import apply_overrides, preset
    from hilight.convert import ConversionError, Sources, assemble
    from hilight.tokenizer import load_tokenizer

    paths: dict[str, Path] = {}
    for fmt, path in args.sources or []:
        key = fmt.replace("-", "_")
        if key in paths:
            raise ConversionError(f"--from {fmt} given twice")
        paths[key] = Path(path)
    sources = Sources(**paths)
    tokenizer_dir = args.tokenizer or sources.gemma or sources.hilight_merged
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise ConversionError(f"{tokenizer_dir or 'no directory'}: no tokenizer files; give --tokenizer DIR")
    base = apply_overrides(preset(args.preset), args.set or [])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = assemble(sources, base, frozenset(args.init or ()), dtype)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > model.config.llm.vocab_size:
        raise ConversionError(f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens, the LLM only "
                              f"{model.config.llm.vocab_size}")
    save_checkpoint(model, args.out, tokenizer)
    print(f"wrote {args.out} ({model.parameter_counts()['total']:,} parameters, {args.dtype})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """End-to-end run of the tiny preset with UNTRAINED weights on a generated clip."""
    import tempfile

    from hilight.demo import run_demo

    workdir = args.out or tempfile.mkdtemp(prefix="hilight-demo-")
    report = run_demo(workdir, seed=args.seed)
    print("HiLight end-to-end demo -- tiny preset, UNTRAINED random weights (the answer is noise)")
    print(f"  clip            {report.clip}")
    print(f"  frames tensor   {list(report.pixel_shape)}  (videos, frames, channels, height, width)")
    print(f"  visual tokens   {report.tokens_per_video} per video; prompt {report.prompt_tokens} positions")
    print(f"  training loss   {report.loss:.3f}  (about ln(vocab) for random weights)")
    print(f"  greedy answer   {report.answer!r}")
    print(f"  after save/load {report.reloaded_answer!r}  ({'identical' if report.answer == report.reloaded_answer else 'DIFFERENT'})")
    print(f"  took {report.seconds:.1f} s")
    return 0 if report.answer == report.reloaded_answer else 1


def cmd_frames(args: argparse.Namespace) -> int:
    """Contact sheet of the frames the model would see."""
    from hilight.config import VideoInputConfig
    from hilight.video import contact_sheet

    cfg = VideoInputConfig(num_frames=args.num_frames, image_size=args.image_size, sampling=args.sampling,
                           sample_fps=args.fps, resize=args.resize)
    out = args.out or Path(f"{Path(args.video).stem}-frames.png")
    contact_sheet(args.video, cfg).save(out)
    print(out)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic billiards video-QA dataset."""
    import time

    from hilight.synth.billiards import TableConfig
    from hilight.synth.dataset import generate_split, split_sizes

    sizes = split_sizes(args.videos) if args.split == "all" else {args.split: args.videos}
    cfg = TableConfig(image_size=args.image_size, stripes=args.stripes)
    for split, n in sizes.items():
        start = time.perf_counter()
        files = generate_split(args.out, split, n, args.seed, cfg, workers=args.workers)
        took = time.perf_counter() - start
        print(f"{split}: {files.clips} clips, {files.records} records -> {files.conversations} "
              f"({took:.1f} s, {took / max(1, n):.2f} s per clip)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """A randomly initialised model from a preset, with a tokenizer, as a checkpoint."""
    import json

    import torch

    from hilight.checkpoint import save_checkpoint
    from hilight.config import apply_overrides, preset
    from hilight.model import HiLight
    from hilight.text import from_llava
    from hilight.tokenizer import DEMO_CORPUS, load_tokenizer, train_tokenizer

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = list(DEMO_CORPUS)
        for path in args.train_tokenizer or []:
            for record in json.loads(Path(path).read_text()):
                if "conversations" in record:
                    texts += [m.content.replace("<video>", " ") for m in from_llava(record["conversations"])]
                if "caption" in record:
                    texts.append(record["caption"])
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
    config = apply_overrides(preset(args.preset), [f"llm.vocab_size={len(tokenizer)}", *(args.set or [])])
    torch.manual_seed(args.seed)
    model = HiLight(config)
    save_checkpoint(model, args.out, tokenizer)
    print(f"wrote {args.out}: preset {args.preset}, {model.parameter_counts()['total']:,} parameters, "
          f"vocabulary {len(tokenizer)} (random weights)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Judge-free evaluation with per-type accuracy and baselines."""
    from hilight.engine import GenerationSettings
    from hilight.eval import evaluate, markdown

    engine = _engine(args)
    name = Path(args.model).name if args.model else "bundled model"
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    result = evaluate(engine, args.data, args.videos, args.out, settings, batch_size=args.batch_size,
                      blind=not args.no_blind, limit=args.limit, title=f"{name} on {args.data.name}")
    print(markdown(result, f"{name} on {args.data}"))
    if args.out:
        print(f"report: {args.out / 'report.md'}, {args.out / 'report.json'}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Validate a training JSON and its videos up front."""
    import json
    from collections import Counter

    from hilight.checkpoint import read_config
    from hilight.data import encode_records, read_records
    from hilight.text import ChatTokenizer
    from hilight.tokenizer import load_tokenizer
    from hilight.video import VideoError, decode_video

    config = read_config(args.model)
    chat = ChatTokenizer(load_tokenizer(args.model), config.tokens_per_video)
    records = read_records(args.data)
    max_length = args.max_length or config.text.max_length
    samples, bad = encode_records(records, args.videos, chat, max_length, "error")
    bad = [{"id": b.id, "reason": b.reason} for b in bad]
    videos = sorted({v for s in samples for v in s.videos})
    broken: dict = {}
    for video in videos:
        try:
            decode_video(video, config.video)
        except VideoError as exc:
            broken[video] = exc.reason
    for s in samples:
        reasons = [f"{v.name}: {broken[v]}" for v in s.videos if v in broken]
        if reasons:
            bad.append({"id": s.id, "reason": reasons[0]})
    lengths = [len(s.encoded) for s in samples]
    print(f"{args.data}: {len(records)} records, {len(records) - len(bad)} usable, {len(bad)} bad")
    print(f"  videos: {len(videos)} referenced, {len(broken)} unreadable")
    if lengths:
        print(f"  length: max {max(lengths)}, mean {sum(lengths) / len(lengths):.0f} (limit {max_length})")
    for reason, n in Counter(b["reason"].split(":")[0] for b in bad).most_common(8):
        print(f"  {n:6d} x {reason}")
    out = args.out or Path(args.data).with_suffix(".bad.json")
    out.write_text(json.dumps(bad, indent=1) + "\n")
    print(f"  bad samples listed in {out}")
    return 1 if bad and args.strict else 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Cache both towers' outputs once per unique video (shardable across processes)."""
    import torch

    from hilight.checkpoint import load_checkpoint
    from hilight.data import FeatureCache, extract_features, read_records, record_videos, tower_identity

    model, _ = load_checkpoint(args.model, with_tokenizer=False)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    videos = []
    for data in args.data:
        for record in read_records(data):
            try:
                videos += record_videos(record, args.videos)
            except ValueError as exc:
                print(f"skipping record {record.get('id')}: {exc}", file=sys.stderr)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cache = FeatureCache(args.out, tower_identity(model))
    result = extract_features(model, videos, cache, dtype, rank, world)
    print(f"rank {rank}/{world}: {len(result['assigned'])} videos assigned, {len(result['extracted'])} extracted, "
          f"{len(result['cached'])} already cached, {len(result['bad'])} unreadable -> {args.out}")
    for _video, reason in result["bad"]:
        print(f"  unreadable: {reason}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run a VLM training stage from a YAML config."""
    from hilight.config import TrainConfig, load_yaml
    from hilight.train import train

    cfg = load_yaml(TrainConfig, args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {summary['steps']} steps on {summary['samples']} samples "
              f"({summary['excluded']} excluded), final loss {summary['final_loss']:.4f}, "
              f"{summary['world_size']} process(es) -> {summary['final']}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from hilight.train import merge_lora

    out = merge_lora(args.base, args.adapter, args.out)
    print(f"wrote {out}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    """Video-text alignment (CLIP-ViP+) from a YAML config."""
    from hilight.align import align
    from hilight.config import AlignConfig, load_yaml

    cfg = load_yaml(AlignConfig, args.config, args.overrides)
    summary = align(cfg, resume=args.resume)
    print(f"aligned for {summary['steps']} steps on {summary['pairs']} caption pairs ({summary['excluded']} "
          f"excluded), final loss {summary['final_loss']:.4f} -> {summary['final']}")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    import json

    from hilight.align import eval_retrieval, retrieval_markdown

    result = eval_retrieval(args.model, args.data, args.videos)
    text = retrieval_markdown(result, f"Retrieval: {args.model} on {args.data}")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retrieval.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "retrieval.md").write_text(text)
    return 0


def cmd_align_ablation(args: argparse.Namespace) -> int:
    from hilight.align import ablation, ablation_markdown
    from hilight.config import AlignConfig, load_yaml

    cfg = load_yaml(AlignConfig, args.config, args.overrides)
    table = ablation(cfg, args.seeds, args.out)
    print(ablation_markdown(table, args.seeds, cfg.max_steps))
    return 0


def _model_path(arg: str | None) -> Path:
    from hilight.engine import default_model

    return Path(arg) if arg else default_model()


def _settings(args: argparse.Namespace):
    from hilight.engine import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                              temperature=args.temperature or 1.0, top_p=args.top_p, top_k=args.top_k,
                              num_beams=args.beams)


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights and compute (auto: bf16 where the hardware has it, else fp32)")
    p.add_argument("--quantize", choices=["auto", "none", "int8", "packed"], default="auto",
                   help="int8: weight-only int8 LLM linear layers; packed: bf16 LLM weights prepacked for oneDNN "
                        "(both CPU; faster decoding, see README Performance); auto: packed for bf16 on a CPU "
                        "with native bf16, else none")


def _engine(args: argparse.Namespace):
    from hilight.engine import Engine, resolve_dtype

    return Engine.from_checkpoint(_model_path(args.model), dtype=resolve_dtype(args.dtype),
                                  quantize=getattr(args, "quantize", "auto"))


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_dtype_arg(p)
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--beams", type=int, default=1)


def cmd_ask(args: argparse.Namespace) -> int:
    """One question about one or more videos."""
    import json

    from hilight.engine import Conversation, stream_reply

    *videos, question = args.inputs
    engine = _engine(args)
    conversation = Conversation()
    answer = "".join(stream_reply(engine, conversation, question, videos, _settings(args))).strip()
    if args.json:
        print(json.dumps({"question": conversation.messages[0].content, "videos": videos, "answer": answer}))
    else:
        print(answer)
    return 0


CHAT_HELP = "commands: /video PATH (add a video to your next message), /reset, /history, /save FILE, /quit"


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat about videos in the terminal, with streaming."""
    import json

    from hilight.engine import Conversation, stream_reply
    from hilight.video import VideoError, decode_video

    engine = _engine(args)
    settings = _settings(args)
    conversation, pending = Conversation(), list(args.videos)
    print(f"HiLight chat ({_model_path(args.model).name}). {CHAT_HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return 0
        if command == "/reset":
            conversation, pending = Conversation(), []
            print("(conversation cleared)")
            continue
        if command == "/history":
            for m in conversation.messages:
                print(f"{m.role}> {m.content}")
            print(f"(videos: {', '.join(str(v) for v in conversation.videos) or 'none'}; pending: "
                  f"{', '.join(pending) or 'none'})")
            continue
        if command == "/save":
            Path(rest or "chat.json").write_text(json.dumps(conversation.to_json(), indent=1) + "\n")
            print(f"(saved to {rest or 'chat.json'})")
            continue
        if command == "/video":
            try:
                decode_video(rest, engine.model.config.video)
                pending.append(rest)
                print(f"(video {rest} will go with your next message)")
            except VideoError as exc:
                print(f"error: {exc}")
            continue
        if command.startswith("/"):
            print(CHAT_HELP)
            continue
        try:
            print("hilight> ", end="", flush=True)
            for chunk in stream_reply(engine, conversation, line, pending, settings):
                print(chunk, end="", flush=True)
            print()
            pending = []
        except KeyboardInterrupt:
            print("\n(stopped)")
            pending = []
        except _user_errors() as exc:
            print(f"\nerror: {exc}")


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP API."""
    import uvicorn

    from hilight.server import create_app

    path = _model_path(args.model)
    engine = _engine(args)
    app = create_app(engine, path.name, allowed_dir=args.allow_dir, max_video_bytes=args.max_video_mb << 20,
                     max_concurrent=args.max_concurrent, queue_limit=args.queue)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable from other machines", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_webui(args: argparse.Namespace) -> int:
    """The Gradio web UI."""
    from hilight.webui import Models, launch

    default = Path(args.model) if args.model else (None if args.models_dir else _model_path(None))
    from hilight.engine import resolve_dtype

    models = Models(default, args.models_dir, resolve_dtype(args.dtype), args.quantize)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep:
            raise ValueError("--auth must be user:password")
        auth = (user, password)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable from other machines", file=sys.stderr)
    print(f"HiLight web UI on http://{args.host}:{args.port}")
    launch(models, args.host, args.port, auth, args.max_upload_mb, args.max_duration)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """Train the bundled model from scratch, reproducibly."""
    import json

    from hilight.recipe import RecipeBudget, billiards_small, bundle

    given = {name: getattr(args, name) for name in ("clips", "train_clips", "align_steps", "image_align_steps",
                                                    "stage1_steps", "stage2_steps", "position_questions",
                                                    "motion_question", "cue_path_question", "facts_attention")
             if getattr(args, name) is not None}
    budget = RecipeBudget(**given, pack_questions=args.pack_questions, facts_per_slot=args.facts_per_slot,
                          vlm_precision=args.vlm_precision)
    summary = billiards_small(args.out, seed=args.seed, budget=budget, workers=args.workers, towers=args.towers,
                              source=args.source, overrides=args.set)
    print(json.dumps(summary, indent=1))
    if args.bundle:
        from hilight.engine import BUNDLED_MODEL

        bundle(args.out, BUNDLED_MODEL, Path("examples"))
        print(f"bundled into {BUNDLED_MODEL} with example clips in examples/")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    """Ask the model the example questions about the bundled clips; show the true answers."""
    import json

    from hilight.engine import Conversation, GenerationSettings, stream_reply
    from hilight.scoring import extract
    from hilight.synth.qa import KINDS
    from hilight.text import from_llava

    folder = args.examples
    if not (folder / "questions.json").is_file():
        raise FileNotFoundError(f"{folder}: no questions.json (the bundled examples)")
    engine = _engine(args)
    right = 0
    records = json.loads((folder / "questions.json").read_text())
    for record in records:
        question, truth = (m.content for m in from_llava(record["conversations"]))
        videos = [folder / v for v in ([record["video"]] if isinstance(record["video"], str) else record["video"])]
        answer = "".join(stream_reply(engine, Conversation(), question, videos, GenerationSettings(48))).strip()
        qtype, value = record["meta"]["types"][0], record["meta"]["truth"][0]
        ok = extract(KINDS[qtype], answer) == value
        right += ok
        print(f"{', '.join(v.name for v in videos)}: {question.replace('<video>', '').strip()}")
        print(f"  model: {answer}")
        print(f"  truth: {truth}   [{'right' if ok else 'wrong'}]")
    print(f"{right} of {len(records)} right")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hilight import __version__
    from hilight.convert import FORMATS

    parser = argparse.ArgumentParser(prog="hilight", description="HiLight video-language assistant")
    parser.add_argument("--version", action="version", version=f"hilight {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter counts of a preset, or what a checkpoint holds")
    p.add_argument("path", nargs="?", help="a HiLight checkpoint directory")
    p.add_argument("--preset", help="a preset name (hilight-2b, tiny)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="assemble a HiLight checkpoint from original-format weights")
    p.add_argument("--from", dest="sources", nargs=2, action="append", metavar=("FORMAT", "PATH"),
                   help=f"a source and its format, repeatable; FORMAT is one of {', '.join(FORMATS)}")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the Gemma / merged directory)")
    p.add_argument("--preset", default="hilight-2b", help="tower and TokenMining sizes (default hilight-2b)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--init", nargs="*", choices=["token_mining"], help="initialise these parts fresh")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("frames", help="contact sheet (PNG) of the frames sampled from a video")
    p.add_argument("video", help="a video or image file")
    p.add_argument("--out", type=Path, help="output PNG (default: VIDEO-frames.png here)")
    p.add_argument("--num-frames", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sampling", choices=["uniform", "midpoint", "fps"], default="uniform")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second for --sampling fps")
    p.add_argument("--resize", choices=["squash", "center_crop"], default="squash")
    p.set_defaults(func=cmd_frames)

    p = sub.add_parser("synth", help="generate a synthetic video-QA dataset")
    p.add_argument("kind", choices=["billiards"])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--videos", type=int, default=1000, help="number of clips (split 80/10/10 unless --split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=["all", "train", "val", "test"], default="all")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--stripes", action="store_true", help="make about half the object balls striped")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("init", help="a randomly initialised checkpoint from a preset (training starting point)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", type=Path, help="an existing tokenizer directory (e.g. Gemma's)")
    group.add_argument("--train-tokenizer", type=Path, nargs="*", metavar="DATA.json",
                       help="train a byte-level BPE on the text of these LLaVA-style / caption JSON files")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("eval", help="judge-free evaluation on a video-QA JSON")
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--data", type=Path, required=True, help="LLaVA-style JSON (billiards records carry 'meta')")
    p.add_argument("--videos", type=Path, required=True, help="directory the records' video names are under")
    p.add_argument("--out", type=Path, help="write report.json, report.md and accuracy.png here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-blind", action="store_true", help="skip the video-removed baseline")
    p.add_argument("--limit", type=int, help="only the first N items")
    _add_dtype_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("check", help="validate records, videos and lengths; list bad samples")
    q.add_argument("data", type=Path, help="LLaVA-style JSON")
    q.add_argument("--videos", type=Path, required=True)
    q.add_argument("--model", required=True, help="checkpoint whose tokenizer and sizes apply")
    q.add_argument("--max-length", type=int)
    q.add_argument("--out", type=Path, help="bad-sample list (default DATA.bad.json)")
    q.add_argument("--strict", action="store_true", help="exit 1 when any sample is bad")
    q.set_defaults(func=cmd_data_check)

    p = sub.add_parser("extract-features", help="cache the frozen towers' outputs per video")
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--videos", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="VLM training stage (stage 1, LoRA stage 2, full fine-tune)")
    p.add_argument("--config", type=Path, required=True, help="YAML: a serialized TrainConfig")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("align", help="video-text alignment of the video tower (global + SPARC local loss)")
    p.add_argument("--config", type=Path, required=True, help="YAML: a serialized AlignConfig")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("eval-retrieval", help="text<->video retrieval recall of an aligned model")
    p.add_argument("--model", type=Path, required=True, help="the final/ directory of `hilight align`")
    p.add_argument("--data", type=Path, required=True, help="JSON list of {video, caption}")
    p.add_argument("--videos", type=Path, required=True)
    p.add_argument("--out", type=Path, help="write retrieval.json and retrieval.md here")
    p.set_defaults(func=cmd_eval_retrieval)

    p = sub.add_parser("align-ablation", help="retrieval for global / +local / +language mask over seeds")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_align_ablation)

    p = sub.add_parser("merge-lora", help="base checkpoint + LoRA adapter -> plain checkpoint")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("ask", help="answer one question about one or more videos")
    p.add_argument("inputs", nargs="+", metavar="VIDEO... QUESTION",
                   help="video files, then the question (<video> markers in it place the videos)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_generation_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="interactive chat about videos in the terminal")
    p.add_argument("videos", nargs="*", help="videos that go with your first message")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/chat/completions)")
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    _add_dtype_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-dir", type=Path, help="allow file:// video URLs inside this directory")
    p.add_argument("--max-video-mb", type=int, default=64)
    p.add_argument("--max-concurrent", type=int, default=1, help="generations at once")
    p.add_argument("--queue", type=int, default=32, help="requests allowed to wait; more get 503")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("webui", help="Gradio web UI: several videos per conversation, streaming")
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--models-dir", type=Path, help="offer every checkpoint in this directory")
    _add_dtype_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", help="user:password login")
    p.add_argument("--max-upload-mb", type=int, default=200)
    p.add_argument("--max-duration", type=float, default=600.0, help="longest accepted video, seconds")
    p.set_defaults(func=cmd_webui)

    p = sub.add_parser("recipe", help="train the bundled model end to end (synthetic billiards)")
    p.add_argument("name", choices=["billiards-small"])
    p.add_argument("--out", type=Path, default=Path("runs/recipe"))
    p.add_argument("--seed", type=int, default=0)
    for name in ("clips", "train-clips", "align-steps", "image-align-steps", "stage1-steps", "stage2-steps"):
        p.add_argument(f"--{name}", type=int, help="budget (default: hilight/recipe.py RecipeBudget)")
    p.add_argument("--pack-questions", action="store_true",
                   help="stage 2 reads each clip's questions as one multi-turn conversation "
                        "(measured worse at the same token budget; see README)")
    p.add_argument("--facts-per-slot", action="store_true",
                   help="TokenMining slot q of every frame is trained to stand for ball q "
                        "(with --set token_mining.queries_per_frame=<number of balls>)")
    p.add_argument("--vlm-precision", choices=["fp32", "bf16"], default="bf16", help="VLM stages' autocast")
    p.add_argument("--position-questions", action=argparse.BooleanOptionalAction,
                   help="stage 2 also trains on where each ball is at the start and was last seen "
                        "(default: hilight/recipe.py RecipeBudget)")
    p.add_argument("--motion-question", action=argparse.BooleanOptionalAction,
                   help="stage 2 also trains on which coloured balls moved (default: hilight/recipe.py RecipeBudget)")
    p.add_argument("--cue-path-question", action=argparse.BooleanOptionalAction,
                   help="stage 2 also trains on the cue ball's step between each two frames "
                        "(default: hilight/recipe.py RecipeBudget)")
    p.add_argument("--facts-attention", action=argparse.BooleanOptionalAction,
                   help="the VLM stages' frame-facts head reads each ball by attention over a frame's tokens, "
                        "as the LLM can, instead of all tokens side by side (default: hilight/recipe.py RecipeBudget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change the billiards-small model preset (repeatable)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--towers", choices=["both", "video", "image"], default="both",
                   help="ablation: keep only the video tower or only the image tower (needs --source)")
    p.add_argument("--source", type=Path, help="the full run whose data and aligned towers an ablation reuses")
    p.add_argument("--bundle", action="store_true", help="copy the result into the package and examples/")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("examples", help="ask the bundled model about the example clips")
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--examples", type=Path, default=Path(__file__).resolve().parents[1] / "examples")
    _add_dtype_arg(p)
    p.set_defaults(func=cmd_examples)

    p = sub.add_parser("demo", help="end-to-end pipeline run on the tiny preset (untrained weights)")
    p.add_argument("--out", type=Path, help="working directory (default: a new temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if args.verbose:
            raise
        print(f"hilight {args.command}: {exc}", file=sys.stderr)
        return USER_ERROR
