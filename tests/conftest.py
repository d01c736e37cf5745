import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hilight.config import tiny_config  # noqa: E402
from hilight.model import HiLight  # noqa: E402
from hilight.text import ChatTokenizer  # noqa: E402
from hilight.tokenizer import DEMO_CORPUS, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(DEMO_CORPUS * 20, vocab_size=400)


@pytest.fixture
def config(tokenizer):
    return tiny_config(vocab_size=len(tokenizer))


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return HiLight(config).eval()


@pytest.fixture
def chat(tokenizer, config):
    return ChatTokenizer(tokenizer, config.tokens_per_video)


def clips(config, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random normalised clips [n, T, 3, S, S]."""
    g = torch.Generator().manual_seed(seed)
    v = config.video
    return torch.randn(n, v.num_frames, 3, v.image_size, v.image_size, generator=g)


class LocalServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a thread, until ``stop()``."""

    def __init__(self, app):
        import threading
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def talkative_checkpoint(path, tokenizer, seed: int = 0):
    """A tiny checkpoint whose random LLM weights are wide enough to emit real tokens
    (default init mostly emits padding), so answers can be compared."""
    from hilight.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = HiLight(tiny_config(len(tokenizer)))
    with torch.no_grad():
        for p in model.llm.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(0, 0.1)
    return save_checkpoint(model, path, tokenizer)
