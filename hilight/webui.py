"""The Gradio web UI: several videos per conversation, streaming answers, a model picker.

Each browser tab has its own session: videos and conversation. Videos are uploaded once (a file
uploaded again is not copied twice), checked (size, duration, decodability) and listed in a
gallery; a message takes the videos ticked in "videos for this message" (placed where its
``<video>`` markers are, or before the text). A new upload is ticked for the next message, and
the ticks are cleared once a message is answered. A question with no video in the conversation
is refused. The "frames" controls choose how the ticked videos are read (a time range, a frame
count or a rate; long videos become several segments), and the times of the frames every answer
was based on are shown beside the frames sheet. Still images are read as one-frame clips.
Errors are shown in the page and never drop the conversation or the other videos.
The session copies of uploads are removed when the tab's session ends and when the server stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

# a local tool sends nothing anywhere unless asked: Gradio's usage analytics off (before import)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from hilight.checkpoint import read_card
from hilight.errors import ConfigError, HiLightError, NoVideoError
from hilight.files import file_digest
from hilight.inference.engine import Clip, Conversation, Engine, GenerationSettings, stream_reply
from hilight.sampling import Sampling, format_time
from hilight.text import VIDEO_TOKEN
from hilight.video import VideoError, contact_sheet, decode_video

log = logging.getLogger(__name__)


class Models:
    """Checkpoints found in a directory (and/or one given path), loaded on first use."""

    def __init__(self, default: Path | None, models_dir: Path | None, dtype=None, quantize: str = "auto"):
        self.dtype = dtype
        self.quantize = quantize
        self.paths: dict[str, Path] = {}
        if models_dir is not None:
            for config in sorted(models_dir.glob("*/config.json")):
                self.paths[config.parent.name] = config.parent
        if default is not None:
            self.paths.setdefault(default.name, default)
        if not self.paths:
            raise ConfigError("no model: give --model or a --models-dir with checkpoints")
        self.loaded: dict[str, Engine] = {}
        self.lock = threading.Lock()

    def get(self, name: str) -> Engine:
        with self.lock:
            if name not in self.loaded:
                self.loaded[name] = Engine.from_checkpoint(self.paths[name], dtype=self.dtype, quantize=self.quantize)
            return self.loaded[name]


class Sessions:
    """Every browser tab's session (its conversation and its copies of the uploads) lives in a
    folder under one root of the server's; a session's folder goes when the tab's session ends,
    and the root when the server stops."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="hilight-ui-"))
        atexit.register(self.close)

    def new(self) -> dict:
        return {"conversation": Conversation(), "videos": {}, "digests": {},
                "dir": tempfile.mkdtemp(prefix="session-", dir=self.root)}

    @staticmethod
    def end(session: dict | None) -> None:
        if session:
            shutil.rmtree(session["dir"], ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _sampling(num_frames, fps, max_frames, start, end) -> Sampling:
    """The frames controls (0 or empty: not asked)."""
    return Sampling.from_options({"num_frames": int(num_frames) if num_frames else None, "fps": fps or None,
                                  "max_frames": int(max_frames) if max_frames else None,
                                  "start": (start or "").strip() or None, "end": (end or "").strip() or None},
                                 where="frames")


def times_text(names: list[str], infos: list[dict]) -> str:
    """Markdown: the time of every frame an answer was based on, per video and segment."""
    lines = []
    for name, info in zip(names, infos, strict=True):
        several = len(info["segments"]) > 1
        for k, segment in enumerate(info["segments"]):
            span = (f" segment {k + 1} [{format_time(segment['start'], True)}-{format_time(segment['end'], True)}]"
                    if several else "")
            times = ", ".join(f"{t:.2f}" for t in segment["timestamps"])
            lines.append(f"- **{name}**{span}: {times} s")
    return "\n".join(lines)


def build_app(models: Models, max_upload_mb: int = 200, max_duration_s: float = 7200.0,
              sessions: Sessions | None = None) -> gr.Blocks:
    names = list(models.paths)
    sessions = sessions or Sessions()

    def add_videos(files, session):
        session = session or sessions.new()
        problems, added = [], []
        for f in files or []:
            path = Path(f if isinstance(f, str) else f.name)
            if not path.is_file():
                continue
            digest = file_digest(path)
            if digest in session["digests"]:  # the upload box hands every file again: keep one copy
                continue
            size = path.stat().st_size
            if size > max_upload_mb << 20:
                problems.append(f"{path.name}: {size >> 20} MB is over the {max_upload_mb} MB limit")
                continue
            engine = models.get(names[0])
            try:
                decoded = decode_video(path, engine.model.config.video)
            except VideoError as exc:
                problems.append(str(exc).replace(str(path), path.name))
                continue
            if decoded.duration > max_duration_s:
                problems.append(f"{path.name}: {decoded.duration:.0f} s is over the {max_duration_s:.0f} s limit")
                continue
            name = _unique(path.name, session["videos"])
            kept = Path(session["dir"]) / name
            shutil.copy(path, kept)
            session["videos"][name] = kept
            session["digests"][digest] = name
            added.append(name)
        for p in problems:
            gr.Warning(p)
        status = "; ".join(problems) if problems else f"{len(session['videos'])} video(s) in this session"
        if added:
            status += f"; {', '.join(added)} selected for your next message"
        choices = list(session["videos"])
        gallery = [(str(p), n) for n, p in session["videos"].items()]
        # a new upload goes with the next message
        selected = gr.update(choices=choices, value=added) if added else gr.update(choices=choices)
        return session, selected, gr.update(choices=choices), gallery, status

    def send(message, chosen, history, session, model_name, max_new, temperature, top_p, top_k, beams,
             num_frames=0, fps=0, max_frames=0, start="", end=""):
        session = session or sessions.new()
        history = list(history or [])
        if not message.strip() and not chosen:
            yield history, message, session, "type a message", gr.update(), gr.update()
            return
        unknown = [n for n in chosen or [] if n not in session["videos"]]
        if unknown:  # e.g. sent while the upload is still being checked
            gr.Warning(f"{', '.join(unknown)} is not in this session yet; wait for the upload to finish")
            yield history, message, session, f"error: {', '.join(unknown)} is not uploaded yet", gr.update(), gr.update()
            return
        shown = message + (f"\n\n[videos: {', '.join(chosen)}]" if chosen else "")
        history += [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
        try:
            sampling = _sampling(num_frames, fps, max_frames, start, end)
            videos = [Clip(session["videos"][n], sampling) for n in chosen or []]
            settings = GenerationSettings.from_request(max_new, temperature, top_p, top_k, beams)
            engine = models.get(model_name)
            usage: dict = {}
            stream = stream_reply(engine, session["conversation"], message, videos, settings, usage=usage)
            for chunk in stream:
                history[-1]["content"] += chunk
                yield history, "", session, "answering...", gr.update(), gr.update()
            names = [clip.path.name for clip in session["conversation"].videos]
            # the selection was for this message: the next one starts with none
            yield (history, "", session, f"{len(session['conversation'].messages) // 2} turn(s)", gr.update(value=[]),
                   "frames the answer was based on:\n\n" + times_text(names, usage["videos"]))
        except NoVideoError:
            text = "no video in this conversation: upload one and tick it for your message"
            gr.Warning(text)
            yield history[:-2], message, session, f"error: {text}", gr.update(), gr.update()
        except HiLightError as exc:
            text = _for_user(exc, session)
            gr.Warning(text)
            yield history[:-2], message, session, f"error: {text}", gr.update(), gr.update()

    def frames(name, session, num_frames=0, fps=0, max_frames=0, start="", end=""):
        if not session or name not in session["videos"]:
            gr.Warning("pick a video first")
            return None, ""
        engine = models.get(names[0])
        try:
            sampling = _sampling(num_frames, fps, max_frames, start, end)
            planned = engine.plan(Clip(session["videos"][name], sampling))
            sheet = contact_sheet(session["videos"][name], engine.model.config.video, sampling)
        except HiLightError as exc:
            gr.Warning(_for_user(exc, session))
            return None, f"error: {_for_user(exc, session)}"
        return sheet, "sampled frames:\n\n" + times_text([name], [planned.info()])

    def reset_chat(session):
        session = session or sessions.new()
        session["conversation"] = Conversation()
        return [], session, "conversation cleared (videos kept)"

    def reset_all(session):
        sessions.end(session)
        return [], sessions.new(), gr.update(choices=[], value=[]), gr.update(choices=[], value=None), [], "cleared"

    def switch_model(name, session):
        models.get(name)
        session = session or sessions.new()
        session["conversation"] = Conversation()  # a different model starts a new chat
        loaded = ", ".join(models.loaded)
        return [], session, f"model {name} ready (loaded: {loaded}); conversation cleared"

    with gr.Blocks(title="HiLight") as app:
        # one session per browser tab, made when the page loads (not by whichever of upload and
        # send runs first); its folder is removed when the tab's session ends
        session = gr.State(None, delete_callback=Sessions.end)
        gr.Markdown("## HiLight: talk with your videos")
        card = gr.Markdown(_card_text(models, names[0]))
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(names, value=names[0], label="model")
                uploads = gr.File(file_count="multiple", label=f"upload videos or images (≤ {max_upload_mb} MB each)")
                gallery = gr.Gallery(label="videos in this session", columns=3, height=200)
                with gr.Row():
                    pick = gr.Dropdown([], label="show sampled frames of", scale=3)
                    show = gr.Button("frames", scale=1)
                sheet = gr.Image(label="what the model sees", type="pil")
                times = gr.Markdown("")
                with gr.Accordion("frames for the ticked videos (default: the model's own)", open=False):
                    with gr.Row():
                        num_frames = gr.Number(0, precision=0, minimum=0, label="frames (0: the model's)")
                        fps = gr.Number(0, minimum=0, label="or fps (0: off)")
                        max_frames = gr.Number(0, precision=0, minimum=0, label="max frames with fps (0: none)")
                    with gr.Row():
                        start = gr.Textbox("", label="from (M:SS)", placeholder="0:00")
                        end = gr.Textbox("", label="to (M:SS)", placeholder="the end")
                with gr.Accordion("sampling", open=False):
                    max_new = gr.Slider(8, 512, value=128, step=8, label="max new tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
                    top_k = gr.Slider(0, 100, value=0, step=1, label="top-k (0 = off)")
                    beams = gr.Slider(1, 4, value=1, step=1, label="beams")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="conversation", height=460)
                chosen = gr.CheckboxGroup([], label=f"videos for this message (placed at {VIDEO_TOKEN} markers, "
                                                    "or before the text)")
                with gr.Row():
                    message = gr.Textbox(placeholder="Ask about the videos...", show_label=False, scale=5)
                    insert = gr.Button(f"insert {VIDEO_TOKEN}", scale=1)
                    send_button = gr.Button("send", variant="primary", scale=1)
                with gr.Row():
                    clear = gr.Button("reset chat")
                    clear_all = gr.Button("reset all")
                status = gr.Markdown("")

        app.load(sessions.new, None, session)
        uploads.upload(add_videos, [uploads, session], [session, chosen, pick, gallery, status], api_name="upload")
        reading = [num_frames, fps, max_frames, start, end]
        inputs = [message, chosen, chat, session, model, max_new, temperature, top_p, top_k, beams, *reading]
        send_button.click(send, inputs, [chat, message, session, status, chosen, times], api_name="send")
        message.submit(send, inputs, [chat, message, session, status, chosen, times])
        insert.click(lambda text: f"{text}{VIDEO_TOKEN}", message, message)
        show.click(frames, [pick, session, *reading], [sheet, times], api_name="frames")
        clear.click(reset_chat, session, [chat, session, status])
        clear_all.click(reset_all, session, [chat, session, chosen, pick, gallery, status])
        model.change(switch_model, [model, session], [chat, session, status])
        model.change(lambda name: _card_text(models, name), model, card)
    return app


def _card_text(models: Models, name: str) -> str:
    """What the selected model knows, from its card."""
    card = read_card(models.paths[name])
    if not card.get("domain"):
        return f"*{name}*: no model card (what it knows is not stated)"
    return f"*{card.get('name', name)}* knows **{card['domain']}**."


def _for_user(exc: Exception, session: dict) -> str:
    """An error as the user should read it: uploads by their names, never the session's copies."""
    return str(exc).replace(str(session["dir"]) + "/", "")


def _unique(name: str, taken: dict) -> str:
    stem, suffix, n = Path(name).stem, Path(name).suffix, 2
    candidate = name
    while candidate in taken:
        candidate, n = f"{stem}-{n}{suffix}", n + 1
    return candidate


def launch(models: Models, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           max_upload_mb: int = 200, max_duration_s: float = 7200.0, block: bool = True):
    """Serve the UI (never through a public share link)."""
    sessions = Sessions()
    app = build_app(models, max_upload_mb, max_duration_s, sessions)
    app.queue(default_concurrency_limit=1, max_size=32)
    app.hilight_sessions = sessions  # the running server's session folders (removed by close())
    try:
        app.launch(server_name=host, server_port=port, auth=auth, share=False, max_file_size=f"{max_upload_mb}mb",
                   prevent_thread_lock=not block, quiet=True, show_error=True)
    finally:
        if block:  # the server has stopped
            sessions.close()
    return app
