import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from hilight.demo import moving_balls_clip
from hilight.inference.engine import Conversation, Engine, GenerationSettings, stream_reply
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
    yield {"client": client, "url": server.url, "clips": clips, "engine": engine, "root": root}
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


def test_full_queue_answers_503(tokenizer, tmp_path):
    import asyncio

    from hilight.server import APIError, Gate

    async def scenario():
        gate = Gate(concurrent=1, queue=1)
        async with gate:
            waiting = asyncio.ensure_future(gate.__aenter__())
            await asyncio.sleep(0)
            with pytest.raises(APIError) as err:
                await gate.__aenter__()
            assert err.value.status == 503
        await waiting
        await gate.__aexit__()

    asyncio.run(scenario())


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
