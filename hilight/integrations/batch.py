"""``hilight batch``: answers for many (video, question) items on Ray Data, resumably.

::

    manifest ──read──▶ items ──minus what OUT holds──▶ one row per video (its questions with it)
        ──map_batches(EncodeActor, actor pool)──▶ decode + towers + TokenMining  [V, T*Q, D]
        ──map_batches(GenerateActor, actor pool)──▶ left-padded greedy batches ──▶ rows
        ──driver──▶ OUT (JSONL appended and flushed row by row; Parquet via a journal)

The dataset holds one row per distinct video file, so a video asked several questions is
decoded and encoded once, whatever the batch boundaries. A bad video (missing, empty,
unreadable) fails only its own rows: decoding is per video, and an encoding batch that raises
is run again one video at a time. The answers are those of ``hilight ask`` (greedy, the same
prompt; the engine's left-padded batches match single prompts).

The manifest and output functions here need neither Ray nor torch; the actors import the
engine when they start, and :func:`run_batch` imports Ray.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hilight.errors import ConfigError, DataError, HiLightError

log = logging.getLogger(__name__)

VIDEO_TOKEN = "<video>"  # hilight.text.VIDEO_TOKEN (that module imports torch)
# the columns of every output row, in order
COLUMNS = ("id", "video", "question", "answer", "error", "decode_s", "encode_s", "generate_s", "model")
MANIFEST_KINDS = ".jsonl (video, question, id), .csv (the same columns), .json (LLaVA-style records) or a folder"
RAY_MISSING = "Ray Data is not installed: pip install 'hilight[ray]'"


# ---------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class Item:
    """One question about one video. ``video`` is written as the manifest names it; ``path`` is
    the file (relative names resolved against the manifest's folder or ``--video-root``)."""

    id: str
    video: str
    path: str
    question: str


def read_manifest(source: str | Path, question: str | None = None, video_root: str | Path | None = None) -> list[Item]:
    """The items of a manifest: a ``.jsonl`` of ``{"video", "question", "id"?}`` objects (or
    LLaVA-style records), a ``.csv`` with those columns, a ``.json`` list of LLaVA-style records
    (the first human turn is the question), or a folder of videos with one ``question`` for all.

    Missing ids are the item's line number (JSONL, CSV), position (JSON, from 0) or path in the
    folder. Every problem is a :class:`DataError` naming the file and the line or record.
    """
    source = Path(source)
    if source.is_dir():
        if question is None:
            raise ConfigError(f"{source}: a folder of videos needs --question")
        if video_root is not None:
            raise ConfigError("--video-root goes with a manifest; a folder's videos are in the folder")
        items = _folder_items(source, question)
    elif not source.is_file():
        raise DataError(f"{source}: no such manifest file or folder")
    else:
        if question is not None:
            raise ConfigError(f"{source}: --question goes with a folder of videos; a manifest has its own questions")
        readers = {".jsonl": _jsonl_items, ".csv": _csv_items, ".json": _llava_items}
        reader = readers.get(source.suffix.lower())
        if reader is None:
            raise DataError(f"{source}: unknown manifest type {source.suffix!r}; use {MANIFEST_KINDS}")
        root = Path(video_root) if video_root else source.parent
        items = list(_unique(source, reader(source, root)))
    if not items:
        raise DataError(f"{source}: no items")
    return items


def _item(where: str, raw_id, default_id: str, video, question, root: Path) -> Item:
    if not isinstance(video, str) or not video.strip():
        raise DataError(f"{where}: no 'video' (a file name)")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: no 'question'")
    if question.count(VIDEO_TOKEN) > 1:
        raise DataError(f"{where}: the question has {question.count(VIDEO_TOKEN)} {VIDEO_TOKEN} markers; "
                        "an item is one question about one video")
    if raw_id is None or raw_id == "":
        raw_id = default_id
    elif not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise DataError(f"{where}: 'id' must be a string or an integer, not {raw_id!r}")
    path = Path(video).expanduser()
    return Item(str(raw_id), video, os.path.normpath(path if path.is_absolute() else root.absolute() / path), question)


def _unique(source: Path, located: Iterable[tuple[str, Item]]) -> Iterable[Item]:
    seen: dict[str, str] = {}
    for where, item in located:
        if item.id in seen:
            raise DataError(f"{where}: id {item.id!r} again (first at {seen[item.id].removeprefix(f'{source} ')}); "
                            "ids must be unique")
        seen[item.id] = where
        yield item


def _jsonl_items(path: Path, root: Path) -> Iterable[tuple[str, Item]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object with 'video' and 'question'")
            question = row.get("question")
            if question is None and "conversations" in row:
                question = _first_human_turn(where, row["conversations"])
            yield where, _item(where, row.get("id"), str(n), _one_video(where, row.get("video")), question, root)


def _csv_items(path: Path, root: Path) -> Iterable[tuple[str, Item]]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a byte-order mark
        reader = csv.DictReader(f)
        missing = [c for c in ("video", "question") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} line 1: the header needs columns video, question (and optionally id); "
                            f"it has {', '.join(reader.fieldnames or []) or 'nothing'}")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row:
                raise DataError(f"{where}: more fields than the header has columns (quote fields with commas)")
            yield where, _item(where, row.get("id"), str(reader.line_num), row["video"], row["question"], root)


def _llava_items(path: Path, root: Path) -> Iterable[tuple[str, Item]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (id, video, conversations)")
    for i, record in enumerate(records):
        where = f"{path} record {i}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: not an object with id, video and conversations")
        if "id" in record:
            where += f" (id {record['id']!r})"
        question = record.get("question")
        if question is None:
            question = _first_human_turn(where, record.get("conversations"))
        yield where, _item(where, record.get("id"), str(i), _one_video(where, record.get("video")), question, root)


def _one_video(where: str, video):
    if isinstance(video, list):
        if len(video) != 1:
            raise DataError(f"{where}: {len(video)} videos; hilight batch answers one video per item")
        return video[0]
    return video


def _first_human_turn(where: str, turns) -> str:
    if not isinstance(turns, list):
        raise DataError(f"{where}: no 'question' nor 'conversations'")
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            if not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: the first human turn has no string 'value'")
            return turn["value"]
    raise DataError(f"{where}: no human turn in 'conversations'")


def _folder_items(folder: Path, question: str) -> list[Item]:
    from hilight.video import VIDEO_SUFFIXES

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.is_dir())
    if not files:
        raise DataError(f"{folder}: no video files in this folder")
    items = []
    for p in files:
        name = p.relative_to(folder).as_posix()
        items.append(_item(f"{folder}/{name}", None, name, name, question, folder))
    return items


# ---------------------------------------------------------------------------------------------
# the output: what is done, and rows as they come


def plan(items: Sequence[Item], done: dict[str, dict], retry_errors: bool = False
         ) -> tuple[list[Item], list[Item], list[str]]:
    """``(todo, skipped, changed)``: the items still to answer; those the output holds already
    (answered, or failed on a bad video unless ``retry_errors``); and the ids of skipped items
    whose output row has another video or question than the manifest now (kept as they are)."""
    todo, skipped, changed = [], [], []
    for item in items:
        row = done.get(item.id)
        if row is None or (retry_errors and row.get("error") is not None):
            todo.append(item)
            continue
        skipped.append(item)
        if row.get("video") != item.video or row.get("question") != item.question:
            changed.append(item.id)
    return todo, skipped, changed


def error_row(item: Item, error: str) -> dict:
    """An output row for an item that failed before reaching the model."""
    return {"id": item.id, "video": item.video, "question": item.question, "answer": None, "error": error,
            "decode_s": 0.0, "encode_s": 0.0, "generate_s": 0.0}


def _last_wins(rows: Iterable[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        out.pop(row["id"], None)  # keep the order in which rows were last written
        out[row["id"]] = row
    return out


def read_jsonl_rows(path: Path, repair: bool = False) -> list[dict]:
    """The rows of an output JSONL. An incomplete last line (a run killed while writing it) is
    dropped, and with ``repair`` cut from the file; any other bad line is a :class:`DataError`."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_row(path, n, line))
    if tail.strip():
        try:
            rows.append(_row(path, len(lines) + 1, tail))
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
        except DataError:
            log.warning("%s: dropped an incomplete last line (a run stopped while writing it)", path)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
    return rows


def _row(path: Path, n: int, line: bytes) -> dict:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} line {n}: not JSON; is this a hilight batch output?") from None
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise DataError(f"{path} line {n}: not a hilight batch row (an object with a string 'id')")
    return row


class Output:
    """The output file of a run: what it holds already, and rows appended as they complete.

    ``.jsonl``: each row is appended and flushed when it arrives, so a killed run loses only
    the rows in flight. ``.parquet``: Parquet cannot be appended to, so rows go to a JSONL
    journal in ``OUT.parts/`` the same way, and :meth:`close` writes the Parquet file (the old
    rows and the journal; written aside, then renamed over it) and removes the journal. A run
    killed before that leaves the journal, which the next run reads and folds in.
    """

    def __init__(self, path: str | Path, model: str):
        self.path = Path(path)
        self.model = model
        self.kind = self.path.suffix.lower()
        if self.kind not in (".jsonl", ".parquet"):
            raise ConfigError(f"{self.path}: the output must end in .jsonl or .parquet")
        if self.kind == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ConfigError(f"{self.path}: writing Parquet needs pyarrow: pip install 'hilight[ray]'") from None
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = _last_wins(self._read(repair=True))
        others = sorted({r.get("model") for r in self.done.values()} - {None, model})
        if others:
            raise ConfigError(f"{self.path}: holds answers of model {others[0]!r}, this run uses {model!r}; "
                              f"give another output file, or --model {others[0]}")
        self._file = None

    def _read(self, repair: bool = False) -> list[dict]:
        if self.kind == ".jsonl":
            return read_jsonl_rows(self.path, repair)
        rows = []
        if self.path.is_file():
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(self.path).to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{self.path}: not a readable Parquet file ({exc})") from None
        for journal in sorted(self.parts.glob("rows-*.jsonl")) if self.parts.is_dir() else []:
            rows += read_jsonl_rows(journal, repair)
        return rows

    def forget(self, ids: Iterable[str]) -> None:
        """Drop these ids' rows before they are answered again (``--retry-errors``)."""
        ids = set(ids) & set(self.done)
        if not ids:
            return
        for i in ids:
            del self.done[i]
        if self.kind == ".jsonl":  # rewritten aside, then renamed over: never half-written
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.done.values()))
            os.replace(tmp, self.path)
        # a Parquet output keeps them until close(): the journal's newer rows replace them

    def write(self, row: dict) -> None:
        row = {**{c: row.get(c) for c in COLUMNS}, "model": self.model}
        if self._file is None:
            if self.kind == ".jsonl":
                target = self.path
            else:
                self.parts.mkdir(exist_ok=True)
                target = self.parts / f"rows-{time.time_ns():020d}-{os.getpid()}.jsonl"
            self._file = open(target, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.done[row["id"]] = row

    def close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self.kind == ".parquet" and self.parts.is_dir():
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = list(_last_wins(self._read()).values())
            table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=output_schema())
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, self.path)
            shutil.rmtree(self.parts)


def output_schema():
    """The Arrow schema of output rows (Parquet files and the generation actors' batches)."""
    import pyarrow as pa

    text = ("id", "video", "question", "answer", "error", "model")
    return pa.schema([(c, pa.string() if c in text else pa.float64()) for c in COLUMNS])


# ---------------------------------------------------------------------------------------------
# the work on each row, without Ray (the actors below wrap these)


def group_by_video(items: Sequence[Item]) -> list[dict]:
    """One dataset row per distinct video file: its path and its items (as JSON text, one
    Arrow string column whatever the number of questions)."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.path, []).append(item)
    return [{"path": path, "items": json.dumps([[i.id, i.video, i.question] for i in group])}
            for path, group in groups.items()]


@dataclass
class Encoded:
    """A video's TokenMining output [T*Q, D] (None if it failed: ``error`` says why) and the
    seconds spent decoding it and (its share of its batch) encoding it."""

    embeds: object | None
    error: str | None
    decode_s: float
    encode_s: float


def encode_videos(engine, paths: Sequence[str]) -> list[Encoded]:
    """Decode each video, then run the decodable ones through the towers and TokenMining as one
    batch. A video that cannot be decoded fails alone; if the batch raises, each video is run
    again on its own so that only the one at fault fails."""
    import torch

    from hilight.video import load_video

    results, pixels = [], []
    for path in paths:
        start = time.perf_counter()
        try:
            pixels.append(load_video(path, engine.model.config.video))  # [T, 3, S, S]
            results.append(Encoded(None, None, time.perf_counter() - start, 0.0))
        except HiLightError as exc:  # VideoError: "PATH: reason"
            results.append(Encoded(None, str(exc), time.perf_counter() - start, 0.0))
        except Exception as exc:  # a decoder failure HiLight does not know: reported on the row, logged in full
            log.exception("decoding %s", path)
            results.append(Encoded(None, f"{path}: cannot be decoded ({type(exc).__name__}: {exc})",
                                   time.perf_counter() - start, 0.0))
    good = [r for r in results if r.error is None]
    if not good:
        return results

    def run(batch: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            stacked = torch.stack(batch).to(engine.device)  # [V, T, 3, S, S], as the engine does
            return engine.model.video_embeddings(engine.model.encode_videos(stacked))  # [V, T*Q, D]

    start = time.perf_counter()
    try:
        embeds = run(pixels)
        share = (time.perf_counter() - start) / len(good)
        for r, e in zip(good, embeds, strict=True):
            r.embeds, r.encode_s = e, share
    except Exception:  # one video's frames broke the batch: find which, the others go on
        log.exception("encoding a batch of %d videos; running them one at a time", len(good))
        good_paths = [p for p, r in zip(paths, results, strict=True) if r.error is None]
        for r, p, px in zip(good, good_paths, pixels, strict=True):
            start = time.perf_counter()
            try:
                r.embeds = run([px])[0]
            except Exception as exc:
                log.exception("encoding %s", p)
                r.error = f"{p}: cannot be encoded ({type(exc).__name__}: {exc})"
            r.encode_s = time.perf_counter() - start
    return results


@dataclass
class Answer:
    text: str | None
    error: str | None
    generate_s: float


def answer_prompts(engine, prompts: Sequence[tuple[str, object]], max_new_tokens: int, batch_size: int
                   ) -> list[Answer]:
    """Greedy answers for (question, video embeddings [T*Q, D]) prompts, ``batch_size`` at a
    time in left-padded batches: the same prompt and tokens as ``hilight ask`` gives for that
    video and question. A prompt that cannot be encoded (too long) fails alone."""
    import torch

    from hilight.inference.engine import GenerationSettings, generate, place_videos
    from hilight.text import Message, collate

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    answers: list[Answer | None] = [None] * len(prompts)
    ready = []  # (index, encoded prompt, embeddings)
    for i, (question, embeds) in enumerate(prompts):
        try:
            messages = [Message("user", place_videos(question, 1))]
            ready.append((i, engine.chat.encode(messages, generation=True,
                                                max_length=engine.model.config.text.max_length), embeds))
        except HiLightError as exc:
            answers[i] = Answer(None, str(exc), 0.0)

    def run(chunk) -> list[str]:
        batch = collate([enc for _, enc, _ in chunk], engine.chat.pad_id, padding_side="left")
        embeds = torch.stack([torch.as_tensor(e) for _, _, e in chunk]).to(engine.device, engine.model.llm.dtype)
        out = generate(engine.model, batch, engine.stop_ids, settings, video_embeds=embeds)  # [B, new]
        return [engine.chat.decode(row.tolist()).strip() for row in out]

    for start_at in range(0, len(ready), batch_size):
        chunk = ready[start_at:start_at + batch_size]
        start = time.perf_counter()
        try:
            texts = run(chunk)
            share = (time.perf_counter() - start) / len(chunk)
            for (i, _, _), text in zip(chunk, texts, strict=True):
                answers[i] = Answer(text, None, share)
        except Exception:
            log.exception("generating a batch of %d prompts; running them one at a time", len(chunk))
            for one in chunk:
                start = time.perf_counter()
                try:
                    answers[one[0]] = Answer(run([one])[0], None, time.perf_counter() - start)
                except Exception as exc:
                    log.exception("generating item %d", one[0])
                    answers[one[0]] = Answer(None, f"generation failed ({type(exc).__name__}: {exc})",
                                             time.perf_counter() - start)
    return answers  # type: ignore[return-value]


def answer_rows(engine, groups: Sequence[dict], encoded: Sequence[Encoded], max_new_tokens: int,
                batch_size: int) -> list[dict]:
    """Output rows for the items of ``groups`` (rows of :func:`group_by_video`) given their
    videos' encodings. A video's decode and encode seconds are shared among its questions, so
    a column's sum is the time the actors spent."""
    rows, prompts, waiting = [], [], []
    for group, enc in zip(groups, encoded, strict=True):
        members = json.loads(group["items"])
        for item_id, video, question in members:
            row = {"id": item_id, "video": video, "question": question, "answer": None, "error": enc.error,
                   "decode_s": enc.decode_s / len(members), "encode_s": enc.encode_s / len(members),
                   "generate_s": 0.0}
            rows.append(row)
            if enc.error is None:
                prompts.append((question, enc.embeds))
                waiting.append(row)
    for row, answer in zip(waiting, answer_prompts(engine, prompts, max_new_tokens, batch_size), strict=True):
        row.update(answer=answer.text, error=answer.error, generate_s=answer.generate_s)
    return rows


# ---------------------------------------------------------------------------------------------
# the Ray actors (each holds one engine; Ray makes one per pool slot)


def _load_engine(model: str, dtype: str, quantize: str, device: str, threads: int):
    import torch

    from hilight.inference.engine import Engine, resolve_dtype

    torch.set_num_threads(max(1, threads))
    return Engine.from_checkpoint(model, dtype=resolve_dtype(dtype), device=device, quantize=quantize)


class EncodeActor:
    """Decoding, towers and TokenMining for a batch of video rows. The checkpoint is mapped
    (``quantize="none"``), so the LLM weights this actor never uses are not read into memory."""

    def __init__(self, model: str, dtype: str, device: str, threads: int):
        self.engine = _load_engine(model, dtype, "none", device, threads)
        llm = self.engine.model.config.llm
        self.shape = (self.engine.model.config.tokens_per_video, llm.hidden_size)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = encode_videos(self.engine, [str(p) for p in batch["path"]])
        # float32 (numpy has no bf16; bf16 -> fp32 -> bf16 is exact); a failed video's rows
        # carry zeros, so the column keeps one tensor shape
        embeds = np.zeros((len(results), *self.shape), dtype=np.float32)  # [V, T*Q, D]
        for i, r in enumerate(results):
            if r.embeds is not None:
                embeds[i] = r.embeds.float().cpu().numpy()
        return {"path": batch["path"], "items": batch["items"], "embeds": embeds,
                "error": np.array([r.error or "" for r in results], dtype=object),
                "decode_s": np.array([r.decode_s for r in results]),
                "encode_s": np.array([r.encode_s for r in results])}


class GenerateActor:
    """Greedy generation for a batch of encoded video rows: one output row per question."""

    def __init__(self, model: str, dtype: str, quantize: str, device: str, threads: int, max_new_tokens: int,
                 batch_size: int):
        self.engine = _load_engine(model, dtype, quantize, device, threads)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, batch: dict):
        import numpy as np
        import pyarrow as pa

        groups = [{"items": str(items)} for items in batch["items"]]
        # np.array: a writable copy (Ray's batches may be read-only views)
        encoded = [Encoded(np.array(embeds) if not error else None, str(error) or None, float(d), float(e))
                   for embeds, error, d, e in zip(batch["embeds"], batch["error"], batch["decode_s"],
                                                  batch["encode_s"], strict=True)]
        rows = answer_rows(self.engine, groups, encoded, self.max_new_tokens, self.batch_size)
        return pa.Table.from_pylist(rows, schema=output_schema().remove(len(COLUMNS) - 1))  # no "model" yet


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class BatchOptions:
    model: Path  # checkpoint directory
    model_name: str  # written on every row; a rerun must use the same model
    dtype: str = "auto"
    quantize: str = "auto"
    encode_actors: int = 1
    generate_actors: int = 1
    batch_size: int = 8
    max_new_tokens: int = 128
    ray_address: str | None = None  # None: a local Ray instance for this run
    num_cpus: int | None = None  # local Ray: CPUs it may use (default: all)
    cpus_per_actor: float | None = None  # default: local, the CPUs shared among the actors; a cluster, 1
    gpus_per_actor: float = 0.0  # above 0: the actors run the model on CUDA
    retry_errors: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        for name in ("encode_actors", "generate_actors", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"--num-cpus must be >= 1, got {self.num_cpus}")
        if self.num_cpus is not None and self.ray_address:
            raise ConfigError("--num-cpus sizes a local Ray instance; a cluster (--ray-address) has its own")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ConfigError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")


@dataclass
class Summary:
    items: int
    answered: int = 0
    failed: int = 0
    skipped: int = 0
    changed: list[str] = field(default_factory=list)
    videos: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[dict] = field(default_factory=list)  # the failed rows of this run

    @property
    def clips_per_s(self) -> float:
        return self.videos / self.seconds if self.seconds else 0.0

    def line(self, out: Path) -> str:
        return (f"{self.items} items: {self.answered} answered, {self.failed} failed, {self.skipped} skipped "
                f"(already in {out}); {self.videos} videos in {self.seconds:.1f} s ({self.clips_per_s:.2f} clips/s)")


def run_batch(items: Sequence[Item], out: str | Path, options: BatchOptions,
              progress: Callable[[int], object] | None = None) -> Summary:
    """Answer ``items`` into ``out`` on Ray Data, skipping what ``out`` holds already.
    ``progress(total)`` makes the progress bar (a tqdm-like object with ``update``/``close``)."""
    output = Output(out, options.model_name)
    todo, skipped, changed = plan(items, output.done, options.retry_errors)
    summary = Summary(len(items), skipped=len(skipped), changed=changed)
    if not todo:
        output.close()
        return summary
    if options.retry_errors:
        output.forget(i.id for i in todo)
    start = time.perf_counter()
    ray = _start_ray(options)
    log.info("Ray started in %.1f s: %s", time.perf_counter() - start, ray.cluster_resources())
    bar = progress(len(todo)) if progress else None
    try:
        groups = group_by_video(todo)
        summary.videos = len(groups)
        for row in _pipeline(ray, groups, options):
            output.write(row)
            if row["error"] is None:
                summary.answered += 1
            else:
                summary.failed += 1
                summary.failures.append(row)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        output.close()
        stop = time.perf_counter()
        ray.shutdown()
        log.info("Ray shut down in %.1f s", time.perf_counter() - stop)
    return summary


def _start_ray(options: BatchOptions):
    local = options.ray_address is None
    if local:
        # must be set before Ray is imported: its node address is then 127.0.0.1, and every
        # server of the local instance binds 127.0.0.1 instead of all interfaces
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    level = logging.INFO if options.verbose else logging.WARNING
    if not options.verbose:  # Ray's notices about its own defaults, which hilight sets on purpose
        for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if local:
        ray.init(address="local", num_cpus=options.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=options.verbose, logging_level=level)
    else:
        try:
            ray.init(address=options.ray_address, log_to_driver=options.verbose, logging_level=level)
        except (ConnectionError, ValueError) as exc:
            raise ConfigError(f"--ray-address {options.ray_address}: cannot connect ({exc})") from None
    logging.getLogger("ray.data").setLevel(level)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # hilight's own bar counts items
    context.print_on_execution_start = options.verbose
    return ray


def _pipeline(ray, groups: list[dict], options: BatchOptions) -> Iterable[dict]:
    """Rows as the generation actors finish them (in no particular order)."""
    actors = options.encode_actors + options.generate_actors
    if options.cpus_per_actor is not None:
        cpus = options.cpus_per_actor
    elif options.ray_address is None:  # this machine's CPUs, shared among the actors
        cpus = int(ray.cluster_resources().get("CPU", 1)) / actors
    else:
        cpus = 1.0
    device = "cuda" if options.gpus_per_actor > 0 else "cpu"
    threads = max(1, int(cpus))
    model = str(Path(options.model).absolute())  # the workers' working directory is not ours
    resources = {"num_cpus": cpus, "num_gpus": options.gpus_per_actor or None}
    ds = ray.data.from_items(groups, override_num_blocks=max(1, len(groups) // options.batch_size))
    ds = ds.map_batches(EncodeActor, batch_size=options.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model": model, "dtype": options.dtype, "device": device,
                                               "threads": threads},
                        compute=ray.data.ActorPoolStrategy(size=options.encode_actors), **resources)
    ds = ds.map_batches(GenerateActor, batch_size=options.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model": model, "dtype": options.dtype, "quantize": options.quantize,
                                               "device": device, "threads": threads,
                                               "max_new_tokens": options.max_new_tokens,
                                               "batch_size": options.batch_size},
                        compute=ray.data.ActorPoolStrategy(size=options.generate_actors), **resources)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield from table.to_pylist()
