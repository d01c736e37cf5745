"""Timing, FLOP counting and the machine's matmul rate, shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def start_server(app) -> tuple[object, int]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (a free port) in a thread: (server, port)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port


def synchronize() -> None:
    """Wait for queued GPU work (a no-op without CUDA), so that a clock read after it is true."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall-clock seconds of ``fn`` over ``repeats`` runs (after one warm-up run); GPU
    work is waited for."""
    return statistics.median(run_times(fn, repeats, warmup))


def run_times(fn: Callable[[], object], repeats: int, warmup: bool = True) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` runs of ``fn`` (after one warm-up run)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def gflop(fn: Callable[[], object]) -> float:
    """GFLOP of running ``fn``, counted by torch (CPU attention included)."""
    # torch's counter knows the GPU attention kernels, not the CPU one: count it the same way
    # and torch's int8- and int4-weight products ([M, K] x [N, K]: the shapes arrive) are matmuls too
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
              lambda query, key, value, *_, out_shape=None, **__: sdpa_flop_count(query, key, value),
              torch.ops.aten._weight_int8pack_mm: lambda x, w, *_, out_shape=None, **__: 2 * x[0] * x[1] * w[0],
              torch.ops.aten._weight_int4pack_mm_for_cpu:  # int4 [N, K / 2]
              lambda x, w, *_, out_shape=None, **__: 2 * x[0] * x[1] * w[0]}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_gflops(dtype: torch.dtype, m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 10,
                  device: str = "cpu") -> float:
    """The GFLOP/s of one [m, k] x [k, n] matrix product in ``dtype`` on ``device``: its fastest
    of ``repeats`` runs, the rate the machine can reach (a bound; on a shared host the median
    drifts with the neighbours' load)."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    return 2 * m * k * n / min(run_times(lambda: a @ b, repeats)) / 1e9
