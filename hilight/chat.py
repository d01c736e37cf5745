"""``hilight chat``: multi-turn chat about videos in the terminal, with streaming."""

from __future__ import annotations

import json
from pathlib import Path

from hilight.errors import HiLightError, NoVideoError
from hilight.inference.engine import Conversation, Engine, GenerationSettings, stream_reply
from hilight.video import decode_video

HELP = "commands: /video PATH (add a video to your next message), /reset, /history, /save FILE, /quit"


def run_chat(engine: Engine, videos: list[str], settings: GenerationSettings, name: str, note: str | None = None,
             allow_no_video: bool = False) -> int:
    """Read messages from stdin until /quit or end of input; a failed turn keeps the history.
    A question while no video is in the chat is refused unless ``allow_no_video``."""
    conversation, pending = Conversation(), list(videos)
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
            print(f"(videos: {', '.join(str(v) for v in conversation.videos) or 'none'}; pending: "
                  f"{', '.join(pending) or 'none'})")
        elif command == "/save":
            Path(rest or "chat.json").write_text(json.dumps(conversation.to_json(), indent=1) + "\n")
            print(f"(saved to {rest or 'chat.json'})")
        elif command == "/video":
            try:
                decode_video(rest, engine.model.config.video)
                pending.append(rest)
                print(f"(video {rest} will go with your next message)")
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
