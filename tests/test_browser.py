"""The live page in headless Chromium under load: its figures render and move as requests finish.
`make test-browser` installs Debian's Chromium and runs this (`pytest -m browser`); `make test` skips it.
With CELLSERVE_SCREENSHOT=path it also saves a screenshot there (the README's)."""

import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from cellserve.server.app import create_app
from cellserve.server.background import BackgroundServer
from cellserve.server.repository import Repository
from cellserve.tasks.speller import encode_number

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as root, on a closed network: no sandbox, no background connections
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path, *args) -> str:
    if CHROMIUM is None:
        pytest.fail("no Chromium: `make test-browser` installs Debian's chromium package")
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)
    return done.stdout


def figures(dom: str, model: str) -> dict[str, str]:
    card = re.search(rf'<section id="[^"]*" data-model="{model}">(.*?)</section>', dom, re.S)
    assert card, f"no card for {model} in the page"
    return dict(re.findall(r'<b class="v-([a-z0-9]+)">([^<]*)</b>', card[1]))


def test_the_live_page_shows_the_batcher_moving_under_load(tmp_path):
    stop = threading.Event()
    with BackgroundServer(create_app(Repository.defaults())) as server:
        def load():
            with httpx.Client(base_url=server.url, timeout=30) as client:
                n = 0
                while not stop.is_set():
                    text = str(n * 7919 % 1_000_000)
                    client.post("/v2/models/speller/infer", json={"inputs": [
                        {"name": "tokens", "shape": [1, len(text)], "datatype": "INT64", "data": encode_number(text)}]})
                    n += 1

        clients = [threading.Thread(target=load) for _ in range(4)]
        [c.start() for c in clients]
        try:
            time.sleep(2.5)
            page = f"{server.url}/"
            first = figures(chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", page), "speller")
            time.sleep(2.5)
            second = figures(chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", page), "speller")
            if os.environ.get("CELLSERVE_SCREENSHOT"):
                chromium(tmp_path, "--virtual-time-budget=3000", "--window-size=1400,760", "--hide-scrollbars",
                         f"--screenshot={os.environ['CELLSERVE_SCREENSHOT']}", page)
        finally:
            stop.set()
            [c.join() for c in clients]
    assert int(second["completed"]) > int(first["completed"]) > 0
    for shown in (first, second):
        assert float(shown["throughput"]) > 0 and float(shown["p50"]) > 0 and float(shown["p99"]) >= float(shown["p50"])
        assert shown["occupancy"].endswith("%") and shown["queue"].isdigit() and shown["sessions"] == "0"


def _evaluate(debug_port: int, expression: str, deadline: float):
    """The value of a JavaScript expression in the browser's page, over the DevTools protocol."""
    import json

    from websockets.sync.client import connect

    while True:
        try:
            pages = [t for t in httpx.get(f"http://127.0.0.1:{debug_port}/json", timeout=5).json() if t["type"] == "page"]
            if pages:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("Chromium's DevTools never listed the page")
        time.sleep(0.2)
    with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
        ws.send(json.dumps({"id": 1, "method": "Runtime.evaluate",
                            "params": {"expression": expression, "returnByValue": True}}))
        while True:
            answer = json.loads(ws.recv(timeout=30))
            if answer.get("id") == 1:
                return answer["result"]["result"].get("value")


def test_the_page_listens_through_the_microphone_and_shows_silero_vads_segments(tmp_path, monkeypatch):
    """Chromium's fake microphone plays tests/data/speech_16k.wav into the live page's panel for the
    silero-vad preset. The audio the server hears is the file (Chromium resamples it through its 48 kHz
    device, and starts it a few ms late: within one chunk); the speech segments the page shows equal
    silero-vad's own get_speech_timestamps on that audio, within one chunk (512 samples)."""
    import json
    import pathlib
    import wave

    import numpy as np
    import torch

    silero_vad = pytest.importorskip("silero_vad")
    from cellserve.bench.common import free_port
    from cellserve.server import websocket
    from cellserve.server.native import grpc_front
    from cellserve.server.main import repository_for

    heard = []  # what the server heard: through the native lane's steps, or the Python front end's messages
    submit, step = websocket._Stream.submit_binary, grpc_front._LaneStep.__call__

    def recorded(self, data):
        heard.append(np.frombuffer(data, np.float32).copy())
        return submit(self, data)

    def stepped(self, x, counts, state, queued, n, most, row, *rest):
        chunks = np.frombuffer(x, np.float32).reshape(n, most, row)
        for i, count in enumerate(np.frombuffer(counts, np.int32)):  # (each chunk after its context)
            heard.append(chunks[i, :count, row - 512:].reshape(-1).copy())
        return step(self, x, counts, state, queued, n, most, row, *rest)

    monkeypatch.setattr(websocket._Stream, "submit_binary", recorded)
    monkeypatch.setattr(grpc_front._LaneStep, "__call__", stepped)
    wav = pathlib.Path(__file__).parent / "data" / "speech_16k.wav"
    with wave.open(str(wav)) as f:
        file_samples = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768.0
    chunks = len(file_samples) // 512
    if CHROMIUM is None:
        pytest.fail("no Chromium: `make test-browser` installs Debian's chromium package")
    with BackgroundServer(create_app(repository_for("silero-vad"))) as server:
        debug = free_port()
        browser = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={debug}",
             "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
             f"{server.url}/?listen=silero-vad"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            read = ("JSON.stringify({chunks: +(document.querySelector('.listen') || {dataset: {}}).dataset.chunks || 0, "
                    "segments: [...document.querySelectorAll('.segments li')].map(li => [+li.dataset.start, "
                    "+li.dataset.end])})")
            while True:
                shown = json.loads(_evaluate(debug, read, deadline))
                if shown["chunks"] >= chunks + 16 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            browser.terminate()
            browser.wait(10)
    audio = np.concatenate(heard)[: shown["chunks"] * 512]
    assert shown["chunks"] >= chunks + 16, shown
    # the file, as Chromium delivered it: the best lag within one chunk, nearly the same waveform
    window = file_samples[: 4 * 16000]
    lags = range(0, 512)
    lag = max(lags, key=lambda d: float(np.dot(audio[d:d + len(window)], window)))
    match = np.corrcoef(audio[lag:lag + len(window)], window)[0, 1]
    assert lag < 512 and match > 0.97, (lag, match)
    want = [(s["start"], s["end"]) for s in silero_vad.get_speech_timestamps(
        torch.from_numpy(audio), silero_vad.load_silero_vad(onnx=True))]
    got = [tuple(s) for s in shown["segments"]]
    assert len(want) >= 2 and len(got) == len(want), (got, want)
    for (start, end), (s, e) in zip(got, want):
        assert abs(start - s) <= 512 and abs(end - e) <= 512, (got, want)
