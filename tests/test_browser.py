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
