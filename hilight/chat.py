"""``hilight chat``: multi-turn chat about videos in the terminal, with streaming."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from hilight.errors import ConfigError, HiLightError, NoVideoError
from hilight.inference.engine import Clip, Conversation, Engine, GenerationSettings, stream_reply
from hilight.sampling import FIELDS, Sampling

HELP = ("commands: /video PATH [--start T] [--end T] [--num-frames N | --fps F [--max-frames N]] (add a video to "
        "your next message), /reset, /history, /save FILE, /quit")


def parse_video_command(rest: str) -> Clip:
    """``/video`` arguments: a path (quoted if it has spaces, unless it is a whole existing
    file name) and sampling options such as ``--start 2:00 --end 2:30``."""
    if Path(rest).is_file():
        return Clip(Path(rest))
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"/video {rest}: {exc}") from None
    if not words or words[0].startswith("--"):
        raise ConfigError("/video needs a path: /video PATH [--start T] [--end T] [--num-frames N] [--fps F]")
    path, options = Path(words[0]), {}
    flags = {f"--{name.replace('_', '-')}": name for name in FIELDS}
    items = iter(words[1:])
    for word in items:
        name = flags.get(word.split("=")[0])
        if name is None:
            raise ConfigError(f"/video: unknown option {word!r} (options: {', '.join(flags)})")
        value = word.partition("=")[2] if "=" in word else next(items, None)
        if value is None:
            raise ConfigError(f"/video: {word} needs a value")
        try:
            options[name] = value if name in ("start", "end") else (float(value) if name == "fps" else int(value))
        except ValueError:
            raise ConfigError(f"/video: {word} {value!r} is not a number") from None
    return Clip(path, Sampling.from_options(options, where="/video"))


def run_chat(engine: Engine, videos: list[str], settings: GenerationSettings, name: str, note: str | None = None,
             allow_no_video: bool = False, sampling: Sampling | None = None) -> int:
    """Read messages from stdin until /quit or end of input; a failed turn keeps the history.
    A question while no video is in the chat is refused unless ``allow_no_video``. ``sampling``
    applies to the ``videos`` given at the start; ``/video`` takes its own."""
    conversation, pending = Conversation(), [Clip(Path(v), sampling or Sampling()) for v in videos]
    print(f"HiLight chat ({name}). {HELP}")
    if note:
        print(f"({note})")
    if not pending and not allow_no_video:
        print("(add a video with /video PATH before your first question)")
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
        elif command == "/history":
            for m in conversation.messages:
                print(f"{m.role}> {m.content}")
            print(f"(videos: {', '.join(_shown(v) for v in conversation.videos) or 'none'}; pending: "
                  f"{', '.join(_shown(v) for v in pending) or 'none'})")
        elif command == "/save":
            Path(rest or "chat.json").write_text(json.dumps(conversation.to_json(), indent=1) + "\n")
            print(f"(saved to {rest or 'chat.json'})")
        elif command == "/video":
            try:
                clip = parse_video_command(rest)
                planned = engine.plan(clip)  # a bad file or range is refused now, not with the question
                pending.append(clip)
                spans = f" in {len(planned.segments)} segments {' '.join(planned.labels)}" if planned.labels else ""
                print(f"(video {_shown(clip)} will go with your next message: "
                      f"{sum(len(s.indices) for s in planned.segments)} frames{spans})")
            except HiLightError as exc:
                print(f"error: {exc}")
        elif command.startswith("/"):
            print(HELP)
        else:
            try:
                print("hilight> ", end="", flush=True)
                for chunk in stream_reply(engine, conversation, line, pending, settings,
                                          allow_no_video=allow_no_video):
                    print(chunk, end="", flush=True)
                print()
                pending = []
            except KeyboardInterrupt:
                print("\n(stopped)")
                pending = []
            except NoVideoError:
                print("\nerror: no video in this chat yet: add one with /video PATH (or start the chat with "
                      "--no-video to ask without one)")
            except HiLightError as exc:
                print(f"\nerror: {exc}")


def _shown(clip: Clip) -> str:
    options = clip.sampling.to_json()
    return str(clip.path) + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")
