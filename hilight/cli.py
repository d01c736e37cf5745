"""The ``hilight`` command. Each subcommand parses its arguments and calls one library function.

Building the parser imports nothing heavy (no torch, no transformers): ``--help`` and
``--version`` answer at once, and each command imports what it needs when it runs. User errors
(:class:`hilight.errors.HiLightError`: bad files, settings, checkpoints) print one line and
exit with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hilight.config import PRESETS, SOURCE_FORMATS
from hilight.errors import ConfigError, ConversationError, DataError, HiLightError, NoVideoError
from hilight.files import DTYPE_NAMES

USER_ERROR = 2
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _model_path(arg: str | None) -> Path:
    from hilight.checkpoint import resolve_model

    return resolve_model(arg)


def _note_domain(path: Path) -> None:
    """Say once, on stderr, when the model only knows one kind of video."""
    from hilight.checkpoint import domain_note

    note = domain_note(path)
    if note:
        print(note, file=sys.stderr)


def _engine(args: argparse.Namespace):
    from hilight.inference.engine import Engine, resolve_dtype

    return Engine.from_checkpoint(_model_path(args.model), dtype=resolve_dtype(args.dtype), quantize=args.quantize)


def _settings(args: argparse.Namespace):
    from hilight.inference.engine import GenerationSettings

    return GenerationSettings.from_request(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.beams)


def _sampling(args: argparse.Namespace):
    from hilight.sampling import Sampling

    return Sampling.from_options({"num_frames": args.num_frames, "fps": args.fps, "max_frames": args.max_frames,
                                  "start": args.start, "end": args.end}, where="frames")


def _warn_if_exposed(host: str) -> None:
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}, reachable from other machines", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# commands


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a preset (built on the meta device) or what a checkpoint holds."""
    if (args.preset is None) == (args.path is None):
        raise ConfigError("give either a checkpoint PATH or --preset NAME")
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

        info = describe(_model_path(args.path))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    card = info.get("card") or {}
    print(f"{card.get('name') or info.get('preset') or info['path']}" + (f" ({info['path']})" if card else ""))
    if card:
        print(f"  {card.get('summary', '')}")
        print(f"  knows: {card.get('domain', 'not stated')}")
        if card.get("accuracy"):
            scores = ", ".join(f"{k} {v:.1%}" for k, v in card["accuracy"].items())
            print(f"  accuracy: {scores} ({card.get('measured_on', 'where: not stated')})")
        if (card.get("recipe_seconds") or {}).get("total"):
            print(f"  trained in {card['recipe_seconds']['total'] / 60:.0f} min by its recipe (each step's time: card.json)")
        if card.get("license"):
            print(f"  license: {card['license']}; source: {card.get('source', 'not stated')}")
    if "video" in info:
        v = info["video"]
        print(f"  sees {v['num_frames']} frames per video at {v['image_size']} px ({v['sampling']} sampling, {v['resize']})")
    for name, n in info["parameters"].items():
        print(f"  {name:<14}{n:>16,}")
    if "dtype" in info:
        print(f"  dtype {info['dtype']}, {info['tensors']} tensors, tokenizer: {'yes' if info['tokenizer'] else 'no'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The models this installation knows by name, and the checkpoints under a folder."""
    from hilight.checkpoint import CONFIG_FILE, MODEL_NAMES, read_card

    rows = [(name, path) for name, path in sorted(MODEL_NAMES.items()) if (path / CONFIG_FILE).is_file()]
    if args.models_dir:
        if not args.models_dir.is_dir():
            raise ConfigError(f"{args.models_dir}: not a directory")
        rows += [(p.name, p) for p in sorted(args.models_dir.iterdir()) if (p / CONFIG_FILE).is_file()]
    for name, path in rows:
        card = read_card(path)
        print(f"{name:<24}{path}")
        if card.get("domain"):
            print(f"{'':<24}knows: {card['domain']}")
    if not rows:
        print("no models found")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Assemble a HiLight checkpoint from original-format files."""
    from hilight.checkpoint import save_checkpoint
    from hilight.config import apply_overrides, preset
    from hilight.convert import ConversionError, Sources, assemble
    from hilight.files import torch_dtype
    from hilight.tokenizer import load_tokenizer

    paths: dict[str, Path] = {}
    for fmt, path in args.sources or []:
        if fmt not in SOURCE_FORMATS:
            raise ConversionError(f"--from {fmt}: unknown format; choose from {', '.join(SOURCE_FORMATS)}")
        key = fmt.replace("-", "_")
        if key in paths:
            raise ConversionError(f"--from {fmt} given twice")
        paths[key] = Path(path)
    sources = Sources(**paths)
    clipvip_config = args.clipvip_config
    if args.original:
        from dataclasses import replace

        from hilight.convert import original_layout

        layout, layout_config = original_layout(args.original, args.run)
        # a --from given as well takes the place of the layout's file
        sources = replace(layout, **{k: v for k, v in paths.items() if v is not None})
        clipvip_config = clipvip_config or layout_config
    elif args.run:
        raise ConversionError("--run names a merged directory of --original ROOT")
    if args.base:  # only the given components change; the rest is the base checkpoint's
        from hilight.checkpoint import load_checkpoint
        from hilight.convert import replace_components

        model, tokenizer = load_checkpoint(_model_path(str(args.base)), dtype=torch_dtype(args.dtype))
        save_checkpoint(replace_components(model, sources), args.out, tokenizer)
        print(f"wrote {args.out}: {args.base} with {', '.join(fmt for fmt, _ in args.sources)} replaced")
        return 0
    tokenizer_dir = args.tokenizer or sources.tokenizer or sources.gemma or sources.hilight_merged
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise ConversionError(f"{tokenizer_dir or 'no directory'}: no tokenizer files; give --tokenizer DIR")
    import yaml

    base = apply_overrides(preset(args.preset), args.set or [])
    explicit = {k.strip(): yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set or [])}
    model = assemble(sources, base, frozenset(args.init or ()), torch_dtype(args.dtype), explicit=explicit,
                     clipvip_config=clipvip_config)
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
    same = report.answer == report.reloaded_answer
    print("HiLight end-to-end demo -- tiny preset, UNTRAINED random weights (the answer is noise)")
    print(f"  clip            {report.clip}")
    print(f"  frames tensor   {list(report.pixel_shape)}  (videos, frames, channels, height, width)")
    print(f"  visual tokens   {report.tokens_per_video} per video; prompt {report.prompt_tokens} positions")
    print(f"  training loss   {report.loss:.3f}  (about ln(vocab) for random weights)")
    print(f"  greedy answer   {report.answer!r}")
    print(f"  after save/load {report.reloaded_answer!r}  ({'identical' if same else 'DIFFERENT'})")
    print(f"  took {report.seconds:.1f} s")
    return 0 if same else 1


def cmd_frames(args: argparse.Namespace) -> int:
    """Contact sheet of the frames the model would see."""
    from hilight.checkpoint import read_config
    from hilight.video import contact_sheet

    cfg = read_config(_model_path(args.model)).video  # the model's own frame size and count
    out = args.out or Path(f"{Path(args.video).stem}-frames.png")
    contact_sheet(args.video, cfg, _sampling(args)).save(out)
    print(out)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic billiards video-QA dataset."""
    import time

    from hilight.synth.billiards import TableConfig
    from hilight.synth.dataset import generate_split, split_sizes

    sizes = split_sizes(args.clips) if args.split == "all" else {args.split: args.clips}
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
    import torch

    from hilight.checkpoint import save_checkpoint
    from hilight.config import apply_overrides, preset
    from hilight.data import read_records
    from hilight.model import HiLight
    from hilight.text import from_llava
    from hilight.tokenizer import DEMO_CORPUS, load_tokenizer, train_tokenizer

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = list(DEMO_CORPUS)
        for path in args.train_tokenizer or []:
            for record in read_records(path):
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
    from hilight.data import read_records
    from hilight.evaluation.choice import choice_markdown, evaluate_choice, is_choice_data
    from hilight.evaluation.qa import evaluate, markdown
    from hilight.inference.engine import GenerationSettings

    choice = is_choice_data(read_records(args.data))
    engine = _engine(args)
    name = Path(args.model).name if args.model else "bundled model"
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    if choice:  # multiple-choice items: letter matching and option log-likelihood
        result = evaluate_choice(engine, args.data, args.videos, args.out, settings, mode=args.choice_mode,
                                 batch_size=args.batch_size, blind=not args.no_blind, limit=args.limit,
                                 title=f"{name} on {args.data.name}")
        print(choice_markdown(result, f"{name} on {args.data}"))
        if args.out:
            print(f"report: {args.out / 'report.md'}, {args.out / 'report.json'}")
        return 0
    result = evaluate(engine, args.data, args.videos, args.out, settings, batch_size=args.batch_size,
                      blind=not args.no_blind, limit=args.limit, title=f"{name} on {args.data.name}")
    print(markdown(result, f"{name} on {args.data}"))
    if args.out:
        print(f"report: {args.out / 'report.md'}, {args.out / 'report.json'}")
    return 0


def cmd_export_lmms(args: argparse.Namespace) -> int:
    """Write an lmms-eval task folder asking what `hilight eval` asks, with the same scoring."""
    from hilight.data import read_records
    from hilight.evaluation.choice import is_choice_data
    from hilight.evaluation.lmms_tasks import export_lmms_task

    records = read_records(args.data)
    if not is_choice_data(records):
        from hilight.recipes.billiards_small.choice import choice_records

        records = choice_records(records, args.seed)
        if not records:
            raise DataError(f"{args.data}: neither multiple-choice items nor billiards records with 'meta'")
    records = records[:args.limit] if args.limit else records
    out = export_lmms_task(records, args.videos, args.out, args.name, where=str(args.data))
    print(f"{len(records)} items -> {out}: lmms-eval --model hilight --tasks {args.name},{args.name}_ll "
          f"--include_path {out}; the same items for hilight eval: {out / (args.name + '.json')}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Validate a training JSON and its videos up front; every bad record goes to a report."""
    from hilight.checkpoint import read_config
    from hilight.data import check_dataset, read_records
    from hilight.text import ChatTokenizer
    from hilight.tokenizer import load_tokenizer

    model = _model_path(args.model)
    config = read_config(model)
    chat = ChatTokenizer(load_tokenizer(model), config.tokens_per_video)
    max_length = args.max_length or config.text.max_length
    result = check_dataset(read_records(args.data), args.videos, chat, max_length, config.video)
    counts = [_count(group, n) for group, n in sorted(result["groups"].items(), key=lambda kv: -kv[1])]
    print(f"{args.data}: {result['records']} records: {result['usable']} usable" + "".join(f"; {c}" for c in counts))
    print(f"  videos: {result['videos']} referenced, {result['unreadable']} unusable; checked against {model.name} "
          f"({config.video.num_frames} frames at {config.video.image_size} px, at most {max_length} tokens)")
    if result["lengths"]:
        lengths = result["lengths"]
        print(f"  length of the usable samples: max {max(lengths)}, mean {sum(lengths) / len(lengths):.0f} tokens")
    for group in sorted(result["groups"], key=lambda g: -result["groups"][g]):
        members = [b for b in result["bad"] if b["group"] == group]
        shown = ", ".join(f"{b['file']} (record {b['id']})" if "file" in b else f"record {b['id']} ({b['reason']})"
                          for b in members[:10])
        more = f", and {len(members) - 10} more" if len(members) > 10 else ""
        print(f"  {_count(group, len(members))}: {shown}{more}")
    if any(b.get("file", "").endswith(".pkl") for b in result["bad"]):
        print("  note: records that name .pkl files are read as the video with the same name stem; pickled frames "
              "are never unpickled, so point --videos at the folder of the raw videos")
    out = args.out or Path.cwd() / f"{Path(args.data).stem}.bad.json"
    out.write_text(json.dumps(result["bad"], indent=1) + "\n")
    print(f"  every bad record is listed in {out}")
    return 1 if result["bad"] and args.strict else 0


def _count(group: str, n: int) -> str:
    """``7 missing files`` for the named groups, ``2 x <reason>`` for any other reason."""
    from hilight.data import GROUP_PLURALS

    if group not in GROUP_PLURALS:
        return f"{n} x {group}"
    return f"{n} {group if n == 1 else GROUP_PLURALS[group]}"


def cmd_extract(args: argparse.Namespace) -> int:
    """Cache both towers' outputs once per unique video (shardable across processes)."""
    from hilight.checkpoint import load_checkpoint
    from hilight.data import FeatureCache, extract_features, read_records, record_blocks, tower_identity
    from hilight.files import torch_dtype

    model, _ = load_checkpoint(args.model, with_tokenizer=False)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    videos = []
    for data in args.data:
        for record in read_records(data):
            try:
                videos += record_blocks(record, args.videos, model.config.video)
            except HiLightError as exc:
                print(f"skipping record {record.get('id')}: {exc}", file=sys.stderr)
    cache = FeatureCache(args.out, tower_identity(model))
    result = extract_features(model, videos, cache, torch_dtype(args.dtype), rank, world)
    print(f"rank {rank}/{world}: {len(result['assigned'])} videos assigned, {len(result['extracted'])} extracted, "
          f"{len(result['cached'])} already cached, {len(result['bad'])} unreadable -> {args.out}")
    for _video, reason in result["bad"]:
        print(f"  unreadable: {reason}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run a VLM training stage from a YAML config."""
    from hilight.config import TrainConfig, load_yaml
    from hilight.training.vlm import train

    cfg = load_yaml(TrainConfig, args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {summary['steps']} steps on {summary['samples']} samples "
              f"({summary['excluded']} excluded), final loss {summary['final_loss']:.4f}, "
              f"{summary['world_size']} process(es) -> {summary['final']}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """A base checkpoint plus a LoRA adapter, merged into a plain checkpoint."""
    from hilight.training.vlm import merge_lora

    print(f"wrote {merge_lora(args.base, args.adapter, args.out)}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    """Video-text alignment (CLIP-ViP+) from a YAML config."""
    from hilight.config import AlignConfig, load_yaml
    from hilight.training.align import align

    cfg = load_yaml(AlignConfig, args.config, args.overrides)
    summary = align(cfg, resume=args.resume)
    print(f"aligned for {summary['steps']} steps on {summary['pairs']} caption pairs ({summary['excluded']} "
          f"excluded), final loss {summary['final_loss']:.4f} -> {summary['final']}")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    """Text <-> video retrieval recall of an aligned tower."""
    from hilight.evaluation.retrieval import eval_retrieval, retrieval_markdown

    result = eval_retrieval(args.model, args.data, args.videos)
    text = retrieval_markdown(result, f"Retrieval: {args.model} on {args.data}")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retrieval.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "retrieval.md").write_text(text)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """One question about one or more videos."""
    from hilight.inference.engine import Clip, Conversation, stream_reply

    *videos, question = args.inputs
    if _looks_like_video(question):
        raise ConversationError(f"{question}: a video file, and no question after it; "
                                'usage: hilight ask VIDEO... "QUESTION"')
    if not videos and not args.no_video:
        raise NoVideoError('no video given: hilight ask VIDEO... "QUESTION" (or --no-video to ask without one)')
    sampling = _sampling(args)
    engine = _engine(args)
    _note_domain(_model_path(args.model))
    conversation, usage = Conversation(), {}
    answer = "".join(stream_reply(engine, conversation, question, [Clip(Path(v), sampling) for v in videos],
                                  _settings(args), usage=usage, allow_no_video=args.no_video)).strip()
    if args.json:
        shown = [{"path": v, **info} for v, info in zip(videos, usage.get("videos", []), strict=True)]
        print(json.dumps({"question": conversation.messages[0].content, "videos": shown, "answer": answer}))
    else:
        print(answer)
    return 0


def _looks_like_video(text: str) -> bool:
    """A lone argument that names a video file, not a question."""
    from hilight.video import VIDEO_SUFFIXES

    return " " not in text.strip() and (Path(text).suffix.lower() in VIDEO_SUFFIXES or Path(text).is_file())


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat about videos in the terminal, with streaming."""
    from hilight.chat import run_chat
    from hilight.checkpoint import domain_note, read_card

    path = _model_path(args.model)
    name = read_card(path).get("name") or path.name
    sampling = _sampling(args)
    return run_chat(_engine(args), list(args.videos), _settings(args), name, note=domain_note(path),
                    allow_no_video=args.no_video, sampling=sampling)


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP API."""
    import uvicorn

    from hilight.checkpoint import read_card
    from hilight.server import create_app

    path = _model_path(args.model)
    card = read_card(path)
    name = card.get("name") or path.name
    engine = _engine(args)
    if args.compile:
        print("compiling the video encoder (torch.compile, once per start)...", flush=True)
        print(f"compiled in {engine.compile():.1f} s", flush=True)
    api_key = args.api_key or os.environ.get("HILIGHT_API_KEY") or None
    app = create_app(engine, name, allowed_dir=args.allow_dir, max_video_bytes=args.max_video_mb << 20,
                     max_concurrent=args.max_concurrent, queue_limit=args.queue, card=card, max_batch=args.max_batch,
                     api_key=api_key)
    if not api_key:
        _warn_if_exposed(args.host)
    print(f"HiLight API on http://{args.host}:{args.port}/v1 serving {name} ({path}); videos up to "
          f"{args.max_video_mb} MB, up to {args.max_batch} requests generated together, {args.queue} waiting; "
          f"file:// videos {'under ' + str(args.allow_dir) if args.allow_dir else 'off'}", flush=True)
    _note_domain(path)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Answers for every item of a manifest, on Ray Data; a rerun continues where one stopped."""
    from hilight.checkpoint import read_card
    from hilight.integrations.batch import BatchOptions, read_manifest, run_batch

    items = read_manifest(args.manifest, args.question, args.video_root)
    path = _model_path(args.model)
    options = BatchOptions(
        model=path, model_name=read_card(path).get("name") or path.name, dtype=args.dtype, quantize=args.quantize,
        encode_actors=args.encode_actors, generate_actors=args.generate_actors, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, ray_address=args.ray_address, num_cpus=args.num_cpus,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor, retry_errors=args.retry_errors,
        verbose=args.verbose)

    def bar(total: int):
        from tqdm import tqdm

        return tqdm(total=total, unit="item", desc="batch", dynamic_ncols=True)

    summary = run_batch(items, args.out, options, progress=bar)
    for row in summary.failures[:10]:
        print(f"  failed: {row['id']}: {row['error']}", file=sys.stderr)
    if len(summary.failures) > 10:
        print(f"  and {len(summary.failures) - 10} more failed (their rows in {args.out} say why)", file=sys.stderr)
    if summary.changed:
        print(f"note: {len(summary.changed)} item(s) skipped as done have another video or question in {args.out} "
              f"than in the manifest now (e.g. id {summary.changed[0]!r}); they were kept as they are",
              file=sys.stderr)
    print(summary.line(args.out))
    if summary.interrupted:
        print(f"interrupted: the rows above are in {args.out}; the same command continues", file=sys.stderr)
        return 130
    # every item of this run failed (a wrong --video-root, say): status 1, so scripts notice
    return 1 if summary.failed and not summary.answered else 0


def cmd_webui(args: argparse.Namespace) -> int:
    """The Gradio web UI."""
    from hilight.inference.engine import resolve_dtype
    from hilight.webui import Models, launch

    default = _model_path(args.model) if args.model or not args.models_dir else None
    models = Models(default, args.models_dir, resolve_dtype(args.dtype), args.quantize)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep:
            raise ConfigError("--auth must be user:password")
        auth = (user, password)
    _warn_if_exposed(args.host)
    print(f"HiLight web UI on http://{args.host}:{args.port} with {', '.join(models.paths)}; uploads up to "
          f"{args.max_upload_mb} MB and {args.max_duration:.0f} s", flush=True)
    if default is not None:
        _note_domain(default)
    _stop_on_sigterm()
    launch(models, args.host, args.port, auth, args.max_upload_mb, args.max_duration)
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager's stop, ``kill``) ends the process as Ctrl-C does, through
    every ``finally`` and exit handler, so nothing it owns stays on disk."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def cmd_recipe(args: argparse.Namespace) -> int:
    """Train the bundled model from scratch, reproducibly."""
    from hilight.recipes.billiards_small.recipe import billiards_small, bundle, load_recipe

    cfg = load_recipe(args.config, args.overrides)
    summary = billiards_small(args.out, cfg, workers=args.workers)
    print(json.dumps(summary, indent=1))
    if args.bundle:
        from hilight.checkpoint import BUNDLED_MODEL

        bundle(args.out, BUNDLED_MODEL, Path("examples"))
        print(f"bundled into {BUNDLED_MODEL} with example clips in examples/")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    """Ask the model the example questions about the bundled clips; show the true answers."""
    from hilight.evaluation.qa import load_items, run
    from hilight.evaluation.scoring import extract
    from hilight.inference.engine import GenerationSettings

    folder = args.examples
    if not (folder / "questions.json").is_file():
        raise DataError(f"{folder}: no questions.json (the bundled examples)")
    items, problems = load_items(folder / "questions.json", folder)
    if problems:
        raise DataError(f"{folder / 'questions.json'}: {problems[0]}")
    run(_engine(args), items, GenerationSettings(48), batch_size=1, blind=False)
    right = 0
    for it in items:
        ok = extract(it.kind, it.answer) == it.truth
        right += ok
        question = " ".join(it.messages[-1].content.replace("<video>", " ").split())  # one line, without markers
        shown = [Path(str(v)).name + (f" ({', '.join(f'{k}={x}' for k, x in v.sampling.to_json().items())})"
                                      if hasattr(v, "sampling") and not v.sampling.is_default else "")
                 for v in it.videos]
        print(f"{', '.join(shown)}: {question}")
        print(f"  model: {it.answer}")
        print(f"  truth: {it.reference}   [{'right' if ok else 'wrong'}]")
    print(f"{right} of {len(items)} right")
    return 0


# ---------------------------------------------------------------------------------------------
# the parser


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help line ends with its default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_dtype(p: argparse.ArgumentParser, quantize: bool = True) -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="weights and compute; auto: bf16 where the hardware has it, else fp32")
    if quantize:
        p.add_argument("--quantize", choices=["auto", "none", "int8", "int4", "packed", "q4_k_m", "q8_0"], default="auto",
                       help="int8 / int4: weight-only int8 / 4-bit LLM linear layers; packed: bf16 LLM weights "
                            "prepacked for oneDNN; q4_k_m / q8_0: the LLM in llama.cpp at that GGUF format (pip install "
                            "'hilight[llamacpp]'; the fastest decoding on CPU). All CPU, see docs/performance.md; auto: "
                            "packed for a full-width bf16 model on a CPU with native bf16, else none")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or model name (default: the bundled billiards-small)")
    _add_dtype(p)


def _add_generation(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this share of probability")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--beams", type=int, default=1, help="beam search width (1: none)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frames read from each video (default: the model's own, over the whole video)")
    g.add_argument("--num-frames", type=int, metavar="N",
                   help="frames to read; more than the model's count become several segments, each marked with "
                        "its time span")
    g.add_argument("--fps", type=float, help="frames per second to read (at most --max-frames)")
    g.add_argument("--max-frames", type=int, metavar="N", help="with --fps: read at most this many frames")
    g.add_argument("--start", metavar="TIME", help="read from this time on (seconds, M:SS or H:MM:SS)")
    g.add_argument("--end", metavar="TIME", help="read up to this time")


def _add_server(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (another than 127.0.0.1 exposes it)")
    p.add_argument("--port", type=int, default=port, help="port to listen on")


def build_parser() -> argparse.ArgumentParser:
    from hilight import __version__

    # -v is accepted before and after the subcommand: the subcommand's copy leaves it unset
    # (SUPPRESS) unless given there, so it never overrides the top-level one
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress to stderr; show tracebacks")
    parser = argparse.ArgumentParser(prog="hilight", description="HiLight video-language assistant",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"hilight {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, parents=[verbose], formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("ask", cmd_ask, "answer one question about one or more videos")
    p.add_argument("inputs", nargs="+", metavar="VIDEO... QUESTION",
                   help="video files, then the question (<video> markers in it place the videos)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--no-video", action="store_true", help="ask the model without any video (text only)")
    _add_generation(p)
    _add_sampling(p)

    p = command("chat", cmd_chat, "interactive chat about videos in the terminal")
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="videos that go with your first message")
    p.add_argument("--no-video", action="store_true", help="allow questions while no video is in the chat")
    _add_generation(p)
    _add_sampling(p)

    p = command("webui", cmd_webui, "Gradio web UI: several videos per conversation, streaming")
    _add_model(p)
    p.add_argument("--models-dir", type=Path, help="offer every checkpoint in this directory")
    _add_server(p, 7860)
    p.add_argument("--auth", help="require this user:password login")
    p.add_argument("--max-upload-mb", type=int, default=200, help="largest accepted upload, MB")
    p.add_argument("--max-duration", type=float, default=7200.0, help="longest accepted video, seconds")

    p = command("serve", cmd_serve, "OpenAI-compatible HTTP API (/v1/chat/completions)")
    _add_model(p)
    _add_server(p, 8000)
    p.add_argument("--allow-dir", type=Path, help="allow file:// video URLs inside this directory")
    p.add_argument("--max-video-mb", type=int, default=64, help="largest accepted video, MB")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests that wait together are generated together, up to this many (1: one at a time)")
    p.add_argument("--max-concurrent", type=int, default=1, help="beam-search generations at once (never batched)")
    p.add_argument("--queue", type=int, default=32, help="requests allowed to wait; more get 503")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                                     "HILIGHT_API_KEY variable; none: open to whoever reaches the port)")
    p.add_argument("--compile", action="store_true",
                   help="compile the video encoder with torch.compile at start (tens of seconds once, each video's "
                        "encode then faster; needs a C++ compiler; see docs/performance.md)")

    p = command("batch", cmd_batch, "answer a manifest of (video, question) items on Ray Data, resumably")
    p.add_argument("manifest", type=Path,
                   help="a .jsonl or .csv of video, question (and optionally id), a LLaVA-style .json, or a folder "
                        "of videos with --question")
    p.add_argument("--out", type=Path, required=True,
                   help="answers, one row per item: .jsonl or .parquet; a rerun with the same file skips what it holds")
    p.add_argument("--question", help="with a folder: the question asked about every video in it")
    p.add_argument("--video-root", type=Path, help="folder relative video names are under (default: the manifest's)")
    p.add_argument("--retry-errors", action="store_true", help="answer again the items whose row is an error")
    p.add_argument("--encode-actors", type=int, default=1, help="actors decoding videos and running the towers")
    p.add_argument("--generate-actors", type=int, default=1, help="actors generating the answers")
    p.add_argument("--batch-size", type=int, default=8, help="videos encoded, and prompts generated, together")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens (greedy)")
    p.add_argument("--ray-address", help="a Ray cluster (ray://HOST:10001 or HOST:6379; default: a local Ray "
                                         "instance for this run, on 127.0.0.1)")
    p.add_argument("--num-cpus", type=int, help="local Ray: CPUs it may use (default: all of this machine's)")
    p.add_argument("--cpus-per-actor", type=float,
                   help="CPUs each actor reserves (default: local, the CPUs shared among all actors; a cluster, 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs each actor reserves; above 0 the model runs on CUDA")
    _add_model(p)

    p = command("frames", cmd_frames, "contact sheet (PNG) of the frames sampled from a video")
    p.add_argument("video", help="a video or image file")
    p.add_argument("--out", type=Path, help="output PNG (default: VIDEO-frames.png here)")
    p.add_argument("--model", help="the checkpoint or model name whose sampling is shown (default: the bundled "
                                   "billiards-small); the options below change it")
    _add_sampling(p)

    p = command("info", cmd_info, "parameter counts of a preset, or what a checkpoint holds")
    p.add_argument("path", nargs="?", help="a checkpoint directory or a model name (billiards-small)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a preset")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("models", cmd_models, "the models known by name, and the checkpoints in a folder")
    p.add_argument("--models-dir", type=Path, help="also list every checkpoint in this directory")

    p = command("examples", cmd_examples, "ask the bundled model about the example clips, with the true answers")
    _add_model(p)
    p.add_argument("--examples", type=Path, default=Path(__file__).resolve().parents[1] / "examples",
                   help="folder with questions.json and its clips")

    p = command("convert", cmd_convert, "assemble a HiLight checkpoint from original-format weights")
    p.add_argument("--from", dest="sources", nargs=2, action="append", metavar=("FORMAT", "PATH"),
                   help=f"a source and its format, repeatable; FORMAT is one of {', '.join(SOURCE_FORMATS)}")
    p.add_argument("--original", type=Path, metavar="ROOT",
                   help="an original checkout's model_zoo/ + work_dirs/ layout: every file from its place")
    p.add_argument("--run", help="with --original: the merged directory (a path or a name under work_dirs/; "
                                 "default: the only *Merge* one)")
    p.add_argument("--base", type=Path,
                   help="a HiLight checkpoint whose other components are kept: convert one component alone, e.g. "
                        "--from token-mining tokenmining.bin --base CONVERTED")
    p.add_argument("--clipvip-config", type=Path,
                   help="the CLIP-ViP vision config JSON (clipvip-vision_config.json): its attention heads")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the Gemma / merged directory)")
    p.add_argument("--preset", default="hilight-2b", choices=sorted(PRESETS),
                   help="what no file records (frames per video, epsilons); every size a file records is read "
                        "from it")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides; one that contradicts a file is an error")
    p.add_argument("--init", nargs="*", choices=["token_mining"], help="initialise these parts fresh")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES, help="dtype of the written weights")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")

    p = command("init", cmd_init, "a randomly initialised checkpoint from a preset (a training starting point)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model sizes")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", type=Path, help="an existing tokenizer directory (e.g. Gemma's)")
    group.add_argument("--train-tokenizer", type=Path, nargs="*", metavar="DATA.json",
                       help="train a byte-level BPE on the text of these LLaVA-style / caption JSON files")
    p.add_argument("--vocab-size", type=int, default=2000, help="vocabulary of a trained tokenizer")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")

    p = command("synth", cmd_synth, "generate a synthetic video-QA dataset")
    p.add_argument("kind", choices=["billiards"], help="what to generate")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--clips", type=int, default=1000, help="number of clips (split 80/10/10 unless --split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole dataset")
    p.add_argument("--split", choices=["all", "train", "val", "test"], default="all", help="which split(s)")
    p.add_argument("--image-size", type=int, default=224, help="side of the rendered frames, pixels")
    p.add_argument("--stripes", action="store_true", help="make about half the object balls striped")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")

    p = command("data", None, "dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("check", help="validate records, videos and lengths; list bad samples",
                            parents=[verbose], formatter_class=_HelpFormatter)
    q.set_defaults(func=cmd_data_check)
    q.add_argument("data", type=Path, help="LLaVA-style JSON")
    q.add_argument("--videos", type=Path, required=True, help="folder the records' video names are under")
    q.add_argument("--model", help="checkpoint or model name whose tokenizer and sizes apply "
                                   "(default: the bundled billiards-small)")
    q.add_argument("--max-length", type=int, help="longest sample in tokens (default: the model's)")
    q.add_argument("--out", type=Path, help="the report of every bad record (default: ./DATA.bad.json)")
    q.add_argument("--strict", action="store_true", help="exit 1 when any sample is bad")

    p = command("extract-features", cmd_extract, "cache the frozen towers' outputs per video")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="LLaVA-style JSON files")
    p.add_argument("--videos", type=Path, required=True, help="folder the records' video names are under")
    p.add_argument("--model", required=True, help="checkpoint whose towers run")
    p.add_argument("--out", type=Path, required=True, help="cache directory")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16", help="dtype the features are stored in")

    for name, func, text, kind in (
            ("align", cmd_align, "video-text alignment of a tower (CLIP-ViP+: global + SPARC local loss)",
             "AlignConfig"),
            ("train", cmd_train, "a VLM training stage (stage 1, LoRA stage 2, full fine-tune)", "TrainConfig")):
        p = command(name, func, text)
        p.add_argument("--config", type=Path, required=True, help=f"YAML: a serialized {kind}")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. lr=1e-4")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")

    p = command("eval", cmd_eval, "judge-free evaluation on a video-QA JSON")
    _add_model(p)
    p.add_argument("--data", type=Path, required=True, help="LLaVA-style JSON (billiards records carry 'meta')")
    p.add_argument("--videos", type=Path, required=True, help="folder the records' video names are under")
    p.add_argument("--out", type=Path, help="write report.json, report.md and accuracy.png here")
    p.add_argument("--batch-size", type=int, default=8, help="questions answered together")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens")
    p.add_argument("--no-blind", action="store_true", help="skip the video-removed baseline")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--choice-mode", choices=["generate", "loglikelihood", "both"], default="both",
                   help="multiple-choice data (records with 'options'): score the greedy answer's letter, the "
                        "likeliest letter, or both")

    p = command("export-lmms", cmd_export_lmms, "a multiple-choice JSON (or billiards records) as an lmms-eval task")
    p.add_argument("--data", type=Path, required=True,
                   help="multiple-choice items (question, options, answer), or the billiards generator's records "
                        "(turned into multiple choice)")
    p.add_argument("--videos", type=Path, required=True, help="folder the items' video names are under")
    p.add_argument("--out", type=Path, required=True, help="the task folder, for lmms-eval --include_path")
    p.add_argument("--name", default="hilight_mc", help="task name (also NAME_ll: the log-likelihood variant)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--seed", type=int, default=0, help="billiards records: the seed of the options' order")

    p = command("eval-retrieval", cmd_eval_retrieval, "text<->video retrieval recall of an aligned model")
    p.add_argument("--model", type=Path, required=True, help="the final/ directory of `hilight align`")
    p.add_argument("--data", type=Path, required=True, help="JSON list of {video, caption}")
    p.add_argument("--videos", type=Path, required=True, help="folder the records' video names are under")
    p.add_argument("--out", type=Path, help="write retrieval.json and retrieval.md here")

    p = command("merge-lora", cmd_merge_lora, "base checkpoint + LoRA adapter -> plain checkpoint")
    p.add_argument("--base", type=Path, required=True, help="the checkpoint the adapter was trained on")
    p.add_argument("--adapter", type=Path, required=True, help="the final/ directory of a LoRA stage")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")

    p = command("recipe", cmd_recipe, "train the bundled model end to end (synthetic billiards)")
    p.add_argument("name", choices=["billiards-small"], help="the recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the recipe config, e.g. stage2_steps=6000 model.llm.num_layers=6")
    p.add_argument("--config", type=Path, help="recipe config (default: configs/recipes/billiards-small.yaml)")
    p.add_argument("--out", type=Path, default=Path("runs/recipe"),
                   help="run directory; a run started again with the same --out continues where it stopped")
    p.add_argument("--workers", type=int, default=2, help="parallel processes for the data")
    p.add_argument("--bundle", action="store_true", help="copy the result into the package and examples/")

    p = command("demo", cmd_demo, "end-to-end pipeline run on the tiny preset (untrained weights)")
    p.add_argument("--out", type=Path, help="working directory (default: a new temporary directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip and the weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except HiLightError as exc:
        if args.verbose:
            raise
        print(f"hilight {args.command}: {exc}", file=sys.stderr)
        return USER_ERROR
