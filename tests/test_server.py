import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from hilight.demo import moving_balls_clip
from hilight.inference.engine import Clip, Conversation, Engine, GenerationSettings, stream_reply
from hilight.sampling import Sampling
from hilight.server import create_app
from hilight.video import write_video
from tests.conftest import LocalServer, talkative_checkpoint


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("serve")
    talkative_checkpoint(root / "model", tokenizer, seed=0)
    clips = [write_video(root / f"clip{i}.mp4", moving_balls_clip(16, 64, seed=i)) for i in range(3)]
    engine = Engine.from_checkpoint(root / "model")
    app = create_app(engine, "tiny-test", allowed_dir=root, max_video_bytes=1 << 20, max_request_bytes=4 << 20,
                     queue_limit=24)
    server = LocalServer(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield {"client": client, "url": server.url, "clips": clips, "engine": engine, "root": root, "app": app}
    server.stop()


def _data_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _expected(engine, question, clips, max_new_tokens=12):
    return "".join(stream_reply(engine, Conversation(), question, clips, GenerationSettings(max_new_tokens))).strip()


def _ask(client, question, clips, **kw):
    parts = [{"type": "video_url", "video_url": {"url": _data_url(c)}} for c in clips]
    parts.append({"type": "text", "text": question})
    return client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": parts}],
                                          max_tokens=12, **kw)


def test_health_and_models(served):
    assert httpx.get(served["url"] + "/health").json()["status"] == "ok"
    assert [m.id for m in served["client"].models.list().data] == ["tiny-test"]


def test_answer_matches_the_engine(served):
    reply = _ask(served["client"], "What happens?", served["clips"][:1])
    answer = reply.choices[0].message.content
    assert answer == _expected(served["engine"], "What happens?", served["clips"][:1])
    assert answer  # the sharpened model says something


def test_streaming_gives_the_same_answer(served):
    stream = _ask(served["client"], "What happens?", served["clips"][:1], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text.strip() == _expected(served["engine"], "What happens?", served["clips"][:1])


def test_two_videos_and_file_urls(served):
    root = served["root"]
    parts = [{"type": "text", "text": "Compare "}, {"type": "video_url", "video_url": {"url": f"file://{root}/clip1.mp4"}},
             {"type": "text", "text": " with "}, {"type": "video_url", "video_url": {"url": _data_url(served["clips"][2])}}]
    reply = served["client"].chat.completions.create(model="tiny-test", max_tokens=12,
                                                     messages=[{"role": "user", "content": parts}])
    expected = _expected(served["engine"], "Compare <video>\n with <video>", served["clips"][1:])
    assert reply.choices[0].message.content == expected


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "end with a user message"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,bm9wZQ=="}}]}]},
     400, "not a readable media file"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}]}]},
     400, "outside the allowed directory"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}]}]},
     400, "data: URL"),
])
def test_bad_requests_get_openai_style_errors(served, body, status, fragment):
    r = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert "hilight-req-" not in r.json()["error"]["message"]  # never the server's temp copy


def test_a_conversation_without_a_video_is_refused_unless_asked_for(served):
    url = served["url"] + "/v1/chat/completions"
    body = {"model": "tiny-test", "messages": [{"role": "user", "content": "What happens?"}], "max_tokens": 4}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "no video in this conversation" in r.json()["error"]["message"]
    r = httpx.post(url, json={**body, "allow_no_video": True}, timeout=60)
    assert r.status_code == 200, r.text
    expected = "".join(stream_reply(served["engine"], Conversation(), "What happens?", [], GenerationSettings(4),
                                    allow_no_video=True)).strip()
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_an_unknown_model_is_404(served):
    r = httpx.post(served["url"] + "/v1/chat/completions", timeout=60,
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "`gpt-4o` does not exist" in r.json()["error"]["message"]


def test_too_large_is_413(served):
    big = "data:video/mp4;base64," + "A" * (2 << 20)
    r = httpx.post(served["url"] + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": big}}]}]})
    assert r.status_code == 413
    with pytest.raises(openai.APIStatusError) as err:
        _ask(served["client"], "x", served["clips"][:1], temperature=3.0)
    assert err.value.status_code == 400


def test_twenty_concurrent_requests_all_complete_correctly(served):
    questions = [(f"Question {i}: what happens?", served["clips"][i % 3:i % 3 + 1]) for i in range(20)]
    expected = [_expected(served["engine"], q, c) for q, c in questions]
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda qc: _ask(served["client"], *qc).choices[0].message.content, questions))
    assert replies == expected


def test_full_queue_answers_503_and_every_place_is_given_back_once(tmp_path):
    from hilight.server import APIError, Gate

    gate = Gate(concurrent=1, queue=1)
    first, second = gate.admit(tmp_path / "a"), gate.admit(tmp_path / "b")
    with pytest.raises(APIError) as err:
        gate.admit(tmp_path / "c")
    assert err.value.status == 503
    first.close()
    first.close()  # given back once only
    third = gate.admit(tmp_path / "c")
    second.abandon()  # never started: given back
    third.started = True
    third.abandon()  # started: its own end gives it back, not this
    assert gate.inside == 1


def test_a_busy_server_answers_503_before_a_stream_starts(tokenizer, tmp_path, monkeypatch):
    """With one place taken by a stream still answering, the next streaming request gets an
    HTTP 503 (with Retry-After), not a 200 whose stream then says busy."""
    import threading

    import hilight.server as server_module

    release = threading.Event()

    def held(*args, **kwargs):
        yield "first"
        release.wait(30)
        yield " words"

    monkeypatch.setattr(server_module, "stream_reply", held)
    talkative_checkpoint(tmp_path / "model", tokenizer, seed=0)
    clip = write_video(tmp_path / "clip.mp4", moving_balls_clip(8, 64, seed=0))
    app = create_app(Engine.from_checkpoint(tmp_path / "model"), "tiny-test", queue_limit=0, max_batch=1)
    server = LocalServer(app)
    body = {"stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": [_video_part(clip)]}]}
    try:
        with httpx.Client(timeout=30) as client, client.stream("POST", server.url + "/v1/chat/completions",
                                                               json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(lines)  # the stream has begun
            busy = client.post(server.url + "/v1/chat/completions", json=body)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "server_busy"
            release.set()
            assert "words" in "".join(lines)
        _wait_for(lambda: app.state.gate.inside == 0)
    finally:
        release.set()
        server.stop()


def _wait_for(condition, seconds: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_usage_counts_generated_tokens(served):
    reply = _ask(served["client"], "What happens?", served["clips"][:1])
    assert 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 16
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # each request is a fresh conversation


def test_an_image_url_part_is_a_one_frame_clip(served, tmp_path):
    from PIL import Image

    image = tmp_path / "table.png"
    Image.new("RGB", (64, 48), (20, 120, 40)).save(image)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    reply = served["client"].chat.completions.create(model="tiny-test", max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}])
    assert reply.choices[0].message.content == _expected(served["engine"], "What is this?", [image], 6)


def test_finish_reason_says_when_max_tokens_cut_the_answer():
    """The bundled model ends its answers itself ("stop"); cut by max_tokens, "length", on the
    batched path and on the engine's own."""
    from hilight.checkpoint import BUNDLED_MODEL

    clip = BUNDLED_MODEL.parents[2] / "examples" / "test-00001.mp4"
    engine = Engine.from_checkpoint(BUNDLED_MODEL)
    server = LocalServer(create_app(engine, "billiards-small"))
    try:
        for max_tokens, reason in ((64, "stop"), (3, "length")):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
                    _video_part(clip), {"type": "text", "text": "Was the cue ball pocketed?"}]}]}).json()
            assert r["choices"][0]["finish_reason"] == reason, r
            assert (r["usage"]["completion_tokens"] == 3) == (reason == "length")
            usage: dict = {}
            list(stream_reply(engine, Conversation(), "Was the cue ball pocketed?", [clip],
                              GenerationSettings(max_tokens), usage=usage))
            assert usage["finish_reason"] == reason
    finally:
        server.stop()


def test_markers_cannot_be_smuggled_into_text_parts(served):
    """``<vid<video>eo>`` in a text part does not become a video marker once the inner one goes."""
    from hilight.server import strip_markers

    assert strip_markers("a <vid<video>eo> b <<video>video>") == "a  b "
    r = _post(served, [{"type": "text", "text": "<vid<video>eo> What happens?"}])
    assert r.status_code == 400 and "no video in this conversation" in r.json()["error"]["message"]
    r = _post(served, [_video_part(served["clips"][0]), {"type": "text", "text": "And <vid<video>eo>?"}])
    assert r.status_code == 200, r.text


def _video_part(path, **options) -> dict:
    return {"type": "video_url", "video_url": {"url": _data_url(path), **options}}


def _post(served, content, **body):
    return httpx.post(served["url"] + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny-test", "max_tokens": 6, "messages": [{"role": "user", "content": content}],
                            **body})


@pytest.mark.parametrize("body, part, asked", [
    ({"mm_processor_kwargs": {"num_frames": 8}}, {}, Sampling(num_frames=8)),
    ({"media_io_kwargs": {"video": {"num_frames": 8}}}, {}, Sampling(num_frames=8)),
    ({}, {"num_frames": 8}, Sampling(num_frames=8)),
    ({"mm_processor_kwargs": {"num_frames": 8, "start": 0}}, {"end": "0:01.5"}, Sampling(num_frames=8, start=0, end=1.5)),
])
def test_sampling_asked_in_vllms_shapes_or_per_part(served, body, part, asked):
    """Every way of asking for 8 frames gives the same answer as the engine reading the video so,
    and the response says what each video was read as: segments and frame times."""
    clip = served["clips"][0]
    r = _post(served, [_video_part(clip, **part), {"type": "text", "text": "What happens?"}], **body)
    assert r.status_code == 200, r.text
    expected = "".join(stream_reply(served["engine"], Conversation(), "What happens?",
                                    [Clip(clip, asked)], GenerationSettings(6)))
    assert r.json()["choices"][0]["message"]["content"] == expected.strip()
    (video,) = r.json()["hilight"]["videos"]
    assert video["source"] == "messages[0].content[0].video_url (data: URL)" and video["frames"] == 8
    assert video["sampling"] == asked.to_json()
    assert len(video["segments"]) == 2 and video["segments"][0]["start"] == 0.0 and video["segments"][1]["end"] == 1.5
    times = [t for s in video["segments"] for t in s["timestamps"]]
    assert times == sorted(times) and len(times) == 8


def test_streaming_ends_with_what_each_video_was_read_as(served):
    root = served["root"]
    stream = served["client"].chat.completions.create(
        model="tiny-test", max_tokens=6, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{root}/clip1.mp4", "start": 0.5}},
            {"type": "text", "text": "What happens?"}]}])
    chunks = list(stream)
    (video,) = chunks[-1].model_dump()["hilight"]["videos"]
    assert video["source"] == f"file://{root}/clip1.mp4" and video["sampling"] == {"start": 0.5}
    assert video["segments"][0]["timestamps"][0] == 0.5


@pytest.mark.parametrize("body, part, param, fragment", [
    ({"mm_processor_kwargs": {"fps": 0}}, {}, "mm_processor_kwargs", "fps must be a number > 0"),
    ({"mm_processor_kwargs": {"do_sample_frames": True}}, {}, "mm_processor_kwargs", "unknown option 'do_sample_frames'"),
    ({"media_io_kwargs": {"audio": {}}}, {}, "media_io_kwargs", "unknown modality 'audio'"),
    ({"mm_processor_kwargs": {"num_frames": 8}, "media_io_kwargs": {"video": {"num_frames": 4}}}, {},
     "mm_processor_kwargs", "contradicts"),
    ({}, {"num_frames": 0}, "messages[0].content[0].video_url", "num_frames must be between 1 and"),
    ({}, {"start": 3, "end": 2}, "messages[0].content[0].video_url", "before it starts"),
    ({}, {"start": "9:00"}, None, "messages[0].content[0].video_url (data: URL): the range starts at 9:00.0"),
    ({}, {"num_frames": 1024}, None, "exceed the model's context"),
])
def test_bad_sampling_is_a_400_naming_the_parameter(served, body, part, param, fragment):
    r = _post(served, [_video_part(served["clips"][0], **part), {"type": "text", "text": "What happens?"}], **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param
    assert "hilight-req-" not in error["message"] and "/tmp" not in error["message"]


def test_images_and_videos_mix_in_one_request(served, tmp_path):
    from PIL import Image

    image = tmp_path / "table.png"
    Image.new("RGB", (64, 48), (20, 120, 40)).save(image)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    r = _post(served, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Is it in "},
                       _video_part(served["clips"][1]), {"type": "text", "text": "?"}])
    assert r.status_code == 200, r.text
    expected = _expected(served["engine"], "<video>\nIs it in <video>\n?", [image, served["clips"][1]], 6)
    assert r.json()["choices"][0]["message"]["content"] == expected
    picture, video = r.json()["hilight"]["videos"]
    assert picture["total_frames"] == 1 and set(picture["segments"][0]["timestamps"]) == {0.0}
    assert video["total_frames"] == 16


def test_waiting_requests_are_generated_together_with_the_same_answers(tokenizer, tmp_path):
    """Eight requests at once: they run in batches (not one by one), each streams its own
    answer, and every answer is the one-at-a-time greedy answer."""
    from concurrent.futures import ThreadPoolExecutor

    talkative_checkpoint(tmp_path / "model", tokenizer, seed=5)
    clips = [write_video(tmp_path / f"c{i}.mp4", moving_balls_clip(12, 64, seed=10 + i)) for i in range(4)]
    engine = Engine.from_checkpoint(tmp_path / "model")
    app = create_app(engine, "tiny-test", max_batch=8)
    server = LocalServer(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    questions = [(f"Question {i}: what happens?", [clips[i % 4]]) for i in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda q: _ask(client, q[0], q[1]).choices[0].message.content, questions))
        stream = client.chat.completions.create(model="tiny-test", max_tokens=12, stream=True, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": _data_url(clips[0])}},
                                         {"type": "text", "text": "Question 0: what happens?"}]}])
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices).strip()
    finally:
        server.stop()
    single = Engine.from_checkpoint(tmp_path / "model")  # a fresh engine: nothing cached from the batches
    expected = [_expected(single, q, c) for q, c in questions]
    assert replies == expected and streamed == expected[0]
    batches = app.state.batcher.batches
    assert sum(batches) == 9 and max(batches) > 1, batches  # the eight did not run one by one


def test_streaming_clients_that_go_away_leave_no_temp_files_and_no_places(served, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the server's request folders go here
    body = {"stream": True, "max_tokens": 12, "messages": [{"role": "user", "content": [
        _video_part(served["clips"][0]), {"type": "text", "text": "What happens?"}]}]}
    for _ in range(5):
        with httpx.Client(timeout=60) as client, client.stream("POST", served["url"] + "/v1/chat/completions",
                                                               json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # then the client goes away
    _wait_for(lambda: not list(tmp_path.glob("hilight-req-*")))
    _wait_for(lambda: served["app"].state.gate.inside == 0)
    assert _post(served, [_video_part(served["clips"][0])]).status_code == 200  # and the server goes on


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"stop": ["."]}, "stop"),
    ({"seed": 3, "temperature": 0.7}, "seed"),
    ({"n": 2}, "n"),
    ({"best_of": 2}, "best_of"),
])
def test_parameters_hilight_does_not_implement_are_refused_by_name(served, extra, param):
    r = _post(served, [_video_part(served["clips"][0])], **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_parameters_asking_for_what_hilight_does_are_accepted(served):
    plain = _post(served, [_video_part(served["clips"][0])])
    same = _post(served, [_video_part(served["clips"][0])], seed=7, response_format={"type": "text"}, logprobs=False,
                 presence_penalty=0, frequency_penalty=0.0, user="u1", tool_choice="none", stop=None,
                 stream_options={"include_usage": True})
    assert same.status_code == 200, same.text
    assert same.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_a_long_text_is_refused_before_it_is_tokenized(served):
    import time

    start = time.perf_counter()
    r = _post(served, [_video_part(served["clips"][0]), {"type": "text", "text": "ball " * 600_000}])  # 3 MB
    assert r.status_code == 400 and "3,000,007 characters, more than 1,024 tokens" in r.json()["error"]["message"]
    assert time.perf_counter() - start < 30  # a bound against hangs, not a speed check


def test_a_body_over_the_cap_is_413_also_when_chunked(served):
    def chunks():  # no Content-Length: 5 MB in 64 KB chunks against a 4 MB cap
        for _ in range(80):
            yield b"x" * (64 << 10)

    r = httpx.post(served["url"] + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("name, fragment", [
    ("missing.mp4", "no such file"),
    ("folder.mp4", "not a regular file"),
    ("bad%00name.mp4", "NUL byte"),
])
def test_file_urls_that_are_not_videos_are_400s_naming_the_url(served, name, fragment):
    (served["root"] / "folder.mp4").mkdir(exist_ok=True)
    url = f"file://{served['root']}/{name}"
    r = _post(served, [{"type": "video_url", "video_url": {"url": url}}])
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert fragment in message and "Errno" not in message


def test_a_percent_encoded_file_url_is_the_file_it_names(served):
    import shutil

    shutil.copy(served["clips"][0], served["root"] / "a clip.mp4")
    r = _post(served, [{"type": "video_url", "video_url": {"url": f"file://{served['root']}/a%20clip.mp4"}}])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == _post(served, [_video_part(served["clips"][0])]).json()[
        "choices"][0]["message"]


def test_a_marker_typed_in_a_later_turn_is_text(served):
    messages = [{"role": "user", "content": [_video_part(served["clips"][0]), {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "Balls."},
                {"role": "user", "content": "And <video> now?"}]
    r = httpx.post(served["url"] + "/v1/chat/completions", timeout=60,
                   json={"max_tokens": 4, "messages": messages})
    assert r.status_code == 200, r.text


def test_an_api_key_guards_every_route_but_health(tokenizer, tmp_path):
    talkative_checkpoint(tmp_path / "model", tokenizer, seed=0)
    server = LocalServer(create_app(Engine.from_checkpoint(tmp_path / "model"), "tiny-test", api_key="s3cret"))
    try:
        assert httpx.get(server.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(server.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-test"]
    finally:
        server.stop()


def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_load_fifty_concurrent_requests_and_twenty_disconnects(served, tmp_path, monkeypatch):
    """50 requests at once (half streaming) with 20 clients leaving mid-stream: every answer
    that comes is the right one, every refusal is a 503 before any stream, and the server's temp
    folders and memory come back to where they were."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    clips, engine = served["clips"], served["engine"]
    questions = [(f"Load {i}: what happens?", clips[i % 3]) for i in range(50)]
    expected = {q: _expected(engine, q, [c]) for q, c in questions}
    baseline = _rss_mib()

    def body(q, clip, stream):
        return {"stream": stream, "max_tokens": 12, "messages": [{"role": "user", "content": [
            _video_part(clip), {"type": "text", "text": q}]}]}

    def one(i: int):
        q, clip = questions[i]
        url = served["url"] + "/v1/chat/completions"
        with httpx.Client(timeout=120) as client:
            if i % 2 == 0:
                r = client.post(url, json=body(q, clip, False))
                return ("busy", None) if r.status_code == 503 else (r.status_code, r.json()["choices"][0]["message"]["content"])
            with client.stream("POST", url, json=body(q, clip, True)) as r:
                if r.status_code != 200:
                    return ("busy", None) if r.status_code == 503 else (r.status_code, r.read())
                lines = r.iter_lines()
                if i % 5 != 0:  # 20 of the 25 streaming clients go away after the first chunk
                    next(lines)
                    return ("left", None)
                text = ""
                for line in lines:
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk  # no refusal inside a 200
                        text += chunk["choices"][0]["delta"].get("content") or ""
                return (200, text.strip())

    import json

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(one, range(50)))
    print({s: sum(o[0] == s for o in outcomes) for s in (200, "busy", "left")}, f"RSS {baseline:.0f} MiB ->",
          f"{_rss_mib():.0f} MiB")
    answered = [(questions[i][0], text) for i, (status, text) in enumerate(outcomes) if status == 200]
    assert all(status in (200, "busy", "left") for status, _ in outcomes), outcomes
    assert all(text == expected[q] for q, text in answered)
    assert len(answered) + sum(s == "busy" for s, _ in outcomes) + sum(s == "left" for s, _ in outcomes) == 50
    assert sum(s == "left" for s, _ in outcomes) + sum(s == "busy" and i % 2 == 1 and i % 5 != 0
                                                       for i, (s, _) in enumerate(outcomes)) == 20
    _wait_for(lambda: not list(tmp_path.glob("hilight-req-*")), 60)
    _wait_for(lambda: served["app"].state.gate.inside == 0, 60)
    assert _rss_mib() - baseline < 300, f"RSS {baseline:.0f} -> {_rss_mib():.0f} MiB"
