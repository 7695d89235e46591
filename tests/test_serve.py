"""omnivmed-serve with the `openai` client as the real client, against a server on
127.0.0.1 started by the test (tiny model): non-streaming and streaming answers, usage
with visual tokens, concurrent clients batched together, and every bad request a 4xx
while the server keeps serving."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from media_bytes import data_url, png_bytes  # noqa: E402
from tiny_models import answering_tiny_model  # noqa: E402

from omnivmed.processing.processor import OmniVMedProcessor, ProcessorOptions  # noqa: E402
from omnivmed.serving.app import ServeSettings, create_app  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "scan.png").write_bytes(png_bytes(1))
    volume = (
        np.repeat(np.random.default_rng(0).random((32, 32, 4)).astype(np.float32), 2, axis=2) * 1000
    )
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "mri.nii.gz")
    (root.parent / "secret.png").write_bytes(png_bytes(2))
    model, tokenizer = answering_tiny_model()
    options = ProcessorOptions(max_pixels=48 * 48, min_pixels=32 * 32, max_slices=8)
    settings = ServeSettings(media_root=root, api_key=KEY, max_request_bytes=2 * 2**20,
                             max_media_bytes=2**20, max_tokens=64, max_concurrent=16,
                             max_batch_size=4, max_wait_ms=50)  # fmt: skip
    app = create_app(model, OmniVMedProcessor(model.config, tokenizer, options), settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app, root
    srv.should_exit = True
    thread.join(timeout=10)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def image_message(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def test_models_and_health(server):
    base, _, _ = server
    assert [m.id for m in client(base).models.list().data] == ["omnivmed"]
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_chat_with_an_image_a_volume_and_a_stream(server):
    base, _, _ = server
    c = client(base)
    r = c.chat.completions.create(model="omnivmed", max_tokens=6, temperature=0,
                                  messages=image_message("What is shown?", data_url("image/png", png_bytes())))  # fmt: skip
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    extra = r.usage.model_extra
    assert extra["visual_tokens"] > 0 and extra["visual_tokens_unpruned"] >= extra["visual_tokens"]
    vol = c.chat.completions.create(model="omnivmed", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "volume_url", "volume_url": {"url": "mri.nii.gz"}},
                                     {"type": "text", "text": "Any lesion?"}]}])  # fmt: skip
    v = vol.usage.model_extra
    assert v["visual_tokens"] < v["visual_tokens_unpruned"]  # repeated slices were pruned
    # streaming gives the same text as the non-streamed greedy answer
    pieces = []
    for chunk in c.chat.completions.create(model="omnivmed", max_tokens=6, temperature=0, stream=True,
                                           messages=image_message("What is shown?", data_url("image/png", png_bytes()))):  # fmt: skip
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == r.choices[0].message.content


def test_stop_strings_and_seeded_sampling(server):
    base, _, _ = server
    c = client(base)
    msgs = image_message("Describe it.", "scan.png")
    full = c.chat.completions.create(model="omnivmed", max_tokens=12, temperature=0, messages=msgs)
    text = full.choices[0].message.content
    if len(text) > 3:
        stop = text[2:4]
        cut = c.chat.completions.create(
            model="omnivmed", max_tokens=12, temperature=0, messages=msgs, stop=[stop]
        )
        assert cut.choices[0].message.content == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    a, b = (c.chat.completions.create(model="omnivmed", max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                                      messages=msgs).choices[0].message.content for _ in range(2))  # fmt: skip
    assert a == b


def test_concurrent_clients_are_batched_and_answered_alone_alike(server):
    base, app, _ = server
    c = client(base)
    prompts = [
        image_message(f"Question {i}?", data_url("image/png", png_bytes(i, 32 + 8 * i)))
        for i in range(4)
    ]
    alone = [c.chat.completions.create(model="omnivmed", max_tokens=5, temperature=0, messages=m)
             .choices[0].message.content for m in prompts]  # fmt: skip
    before = app.state.engine.batches
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda m: client(base).chat.completions.create(
            model="omnivmed", max_tokens=5, temperature=0, messages=m).choices[0].message.content, prompts))  # fmt: skip
    assert together == alone
    assert app.state.engine.batches - before < 4  # some requests shared a generate call


def post(base, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{base}/v1/chat/completions", headers=headers,
                      content=raw if raw is not None else json.dumps(body), timeout=60)  # fmt: skip


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    base, _, root = server
    ok_msgs = image_message("Q?", "scan.png")
    cases = [
        (401, dict(body={"messages": ok_msgs}, key="wrong"), "API key"),
        (400, dict(body=None, raw=b"{not json"), "not valid JSON"),
        (400, dict(body=[1, 2]), "JSON object"),
        (400, dict(body={"messages": []}), "non-empty list"),
        (400, dict(body={"messages": [{"role": "robot", "content": "x"}]}), "role"),
        (400, dict(body={"messages": ok_msgs, "max_tokens": 0}), "max_tokens"),
        (400, dict(body={"messages": ok_msgs, "max_tokens": 10**6}), "at most 64"),
        (400, dict(body={"messages": ok_msgs, "temperature": float("nan")}), "temperature"),
        (400, dict(body={"messages": ok_msgs, "top_p": 2}), "top_p"),
        (400, dict(body={"messages": image_message("Q", "http://example.com/x.png")}), "remote URLs"),
        (403, dict(body={"messages": image_message("Q", "../secret.png")}), "outside the media root"),
        (404, dict(body={"messages": image_message("Q", "nothere.png")}), "does not exist"),
        (415, dict(body={"messages": image_message("Q", data_url("text/html", b"<b>"))}), "unsupported media type"),
        (400, dict(body={"messages": image_message("Q", "data:image/png;base64,@@@")}), "data URL"),
        (400, dict(body={"messages": image_message("Q", data_url("image/png", b"not a png"))}), "image"),
        (413, dict(body={"messages": image_message("Q", data_url("image/png", b"x" * (2**20 + 10)))}), "limit"),
        (400, dict(body={"messages": [{"role": "user", "content": [{"type": "audio", "audio": {}}]}]}), "unknown content part"),
        (400, dict(body={"messages": [{"role": "user", "content": "<image> hi"}]}), "reserved"),
        (400, dict(body={"messages": [{"role": "user", "content": [{"type": "volume_url", "volume_url": {"url": data_url("application/zip", b"PK-broken")}}]}]}), "zip"),
        (400, dict(body={"messages": [{"role": "user", "content": [{"type": "volume_url", "volume_url": {"url": data_url("application/zip", zip_bytes({"../../evil.dcm": b"junk"}))}}]}]}), ""),
    ]  # fmt: skip
    for status, kwargs, words in cases:
        r = post(base, kwargs.pop("body"), **kwargs)
        assert r.status_code == status, (status, words, r.text)
        assert words in r.json()["error"]["message"], (words, r.text)
    assert not (root.parent / "evil.dcm").exists()
    big = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     content=b"x" * (2 * 2**20 + 1), timeout=60)  # fmt: skip
    assert big.status_code == 413
    r = post(base, {"messages": ok_msgs, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_preview_shows_what_pruning_keeps(server):
    base, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{base}/v1/omnivmed/preview", headers=headers,
                   json={"type": "volume_url", "url": "mri.nii.gz"}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["kind"] == "volume" and len(p["frames"]) == 8
    assert p["kept"] < p["total"] and p["kept_patches"] < p["total_patches"]
    assert sum(f["kept"] for f in p["frames"]) == p["kept_patches"]
    assert p["frames"][0]["png"].startswith("data:image/png;base64,")
    # Repeated slices: the second of each pair keeps (almost) nothing.
    assert p["frames"][1]["kept"] < p["frames"][0]["kept"]
    bad = httpx.post(f"{base}/v1/omnivmed/preview", headers=headers, json={"type": "x"}, timeout=60)
    assert bad.status_code == 400
    outside = httpx.post(f"{base}/v1/omnivmed/preview", headers=headers,
                         json={"type": "image_url", "url": "../secret.png"}, timeout=60)  # fmt: skip
    assert outside.status_code == 403
    page = httpx.get(f"{base}/", timeout=60)
    assert page.status_code == 200 and "/v1/omnivmed/preview" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN


def _chromium() -> str | None:
    import os
    import shutil

    path = os.environ.get("OMNIVMED_CHROMIUM") or shutil.which("chromium-headless-shell")
    local = Path(__file__).resolve().parent.parent / ".cache" / "chromium" / "chromium"
    return path or (str(local) if local.is_file() else None)


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket), as a user's
    browser: it loads the page, runs its JavaScript, fetches and streams for real."""

    def __init__(self, chromium: str, width: int = 900, height: int = 1100):
        import subprocess
        import urllib.request

        from websockets.sync.client import connect

        self.proc = subprocess.Popen([chromium, "--remote-debugging-port=0", f"--window-size={width},{height}",
                                      "--hide-scrollbars", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        port = None
        for line in self.proc.stderr:
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://127.0.0.1:")[1].split("/")[0])
                break
        assert port, "Chromium did not open its DevTools port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        )
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def eval(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.stack.close()
        self.proc.kill()
        self.proc.wait(timeout=30)


def test_viewer_in_a_real_headless_browser(server):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no headless Chromium (bash scripts/fetch_chromium.sh provides one)")
    pytest.importorskip("websockets")
    base, _, _ = server
    browser = Browser(chromium)
    try:
        # A volume opens at its middle slice.
        browser.call("Page.navigate", url=f"{base}/?media=mri.nii.gz&type=volume_url&key={KEY}")
        browser.wait_for("document.body.dataset.state === 'loaded'")
        info = browser.eval("document.getElementById('frameinfo').textContent")
        assert info.startswith("frame 5 of 8"), info
        assert browser.eval("document.getElementById('slider').value") == "4"
        # Open a volume from the media root, scroll to its fourth slice (a repeat of the third,
        # so pruning removed most of it), ask a question.
        url = f"{base}/?media=mri.nii.gz&type=volume_url&key={KEY}&frame=3&ask=Is%20there%20a%20lesion%3F"
        browser.call("Page.navigate", url=url)
        state = browser.wait_for(
            "['answered', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
        )
        assert state == "answered", browser.eval("document.getElementById('error').textContent")
        kept = int(browser.eval("document.getElementById('counts').dataset.kept"))
        total = int(browser.eval("document.getElementById('counts').dataset.total"))
        assert 0 < kept < total  # the overlay's counts: pruning removed the repeated slices
        info = browser.eval("document.getElementById('frameinfo').textContent")
        assert info.startswith("frame 4 of 8") and not info.endswith("16 of 16 patches kept"), info
        assert browser.eval("document.getElementById('frame').naturalWidth") > 0  # the slice drew
        assert (
            int(browser.eval("document.getElementById('answer').dataset.chunks")) >= 1
        )  # streamed
        assert browser.eval("document.getElementById('answer').textContent").strip()
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        artifacts = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "viewer.png").write_bytes(shot)
        assert Image.open(io.BytesIO(shot)).size[0] > 0
    finally:
        browser.close()


def test_uploaded_dicom_zip_and_video(server, tmp_path):
    import av

    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    base, _, _ = server
    rng = np.random.default_rng(3)
    files = {}
    for i in range(4):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        pixels = rng.integers(0, 1000, ds.pixel_array.shape, dtype=np.int16)
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        files[f"series/slice{i}.dcm"] = buf.getvalue()
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for _ in range(12):
            frame = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    c = client(base)
    for part in (
        {
            "type": "volume_url",
            "volume_url": {"url": data_url("application/zip", zip_bytes(files))},
        },
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", video.read_bytes())}},
    ):
        r = c.chat.completions.create(model="omnivmed", max_tokens=3, temperature=0,
                                      messages=[{"role": "user", "content": [part, {"type": "text", "text": "Q?"}]}])  # fmt: skip
        assert r.usage.model_extra["visual_tokens"] > 0, part["type"]


def test_zip_bombs_links_out_of_the_root_and_clients_that_leave(server, tmp_path):
    base, _, root = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2) as z:
        z.writestr("a.dcm", b"\0" * 10_000_000)  # compresses to a few bytes
    part = {
        "type": "volume_url",
        "volume_url": {"url": data_url("application/zip", buf.getvalue())},
    }
    r = post(base, {"messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 415 and "stored or deflated" in r.json()["error"]["message"]
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", b"\0" * (2**20 + 1))  # unpacks past the 1 MiB media limit
    part = {
        "type": "volume_url",
        "volume_url": {"url": data_url("application/zip", deflated.getvalue())},
    }
    r = post(base, {"messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 413 and "unpacks to over" in r.json()["error"]["message"]
    # A folder under the media root holding a link to a file outside it.
    folder = root / "linked"
    folder.mkdir(exist_ok=True)
    link = folder / "0.dcm"
    if not link.exists():
        link.symlink_to(root.parent / "secret.png")
    part = {"type": "volume_url", "volume_url": {"url": "linked"}}
    r = post(base, {"messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 403 and "points outside the media root" in r.json()["error"]["message"]
    # A streaming client that leaves at once: its slot comes back and the server serves on.
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": image_message("Q?", "scan.png"), "stream": True, "max_tokens": 64},
                      timeout=60) as s:  # fmt: skip
        next(s.iter_lines())
    deadline = time.time() + 60
    while time.time() < deadline and httpx.get(f"{base}/health").json()["in_flight"] != 0:
        time.sleep(0.1)
    assert httpx.get(f"{base}/health").json()["in_flight"] == 0
    r = post(base, {"messages": image_message("Q?", "scan.png"), "max_tokens": 2})
    assert r.status_code == 200
