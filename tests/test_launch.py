"""The server and the web UI, launched as a user launches them: nothing connects anywhere but
this machine, and a stop (SIGTERM) leaves none of their temporary files behind."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port

# run as the command, with every socket connection to another machine refused and written down
GUARDED = """
import os, socket, sys
log = os.environ["HILIGHT_OUTBOUND_LOG"]
local = ("127.0.0.1", "::1", "localhost", "0.0.0.0")
def guard(real):
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in local:
            with open(log, "a") as f:
                f.write(f"{host}:{address[1]}\\n")
            raise OSError("outbound connection refused by the test")
        return real(self, address)
    return connect
socket.socket.connect = guard(socket.socket.connect)
socket.socket.connect_ex = guard(socket.socket.connect_ex)
from hilight.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("command, probe", [(["serve"], "/health"), (["webui"], "/")])
def test_a_launch_connects_nowhere_and_a_stop_leaves_no_temp_files(tmp_path, command, probe):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_ANALYTICS_ENABLED",)}
    env.update(HILIGHT_OUTBOUND_LOG=str(tmp_path / "outbound.log"), TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", GUARDED, *command, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        time.sleep(3)  # what a launch sends, it sends in its first seconds (Gradio's analytics did)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert not (tmp_path / "outbound.log").exists(), (tmp_path / "outbound.log").read_text()
    assert "Traceback" not in stderr, stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("hilight-")]
