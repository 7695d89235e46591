"""omnivmed-serve as a separate process (the console command on a loopback port, a tiny
saved model) under clients that misbehave: connections that never finish a request,
requests asking for unbounded work, values out of range, probes for server paths; and
seeded sampling that gives the same text alone, repeated and batched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from media_bytes import data_url, png_bytes
from tiny_models import answering_tiny_model

from omnivmed.cli.serve import API_KEY_ENV, main, resolve_api_key
from omnivmed.processing.processor import ProcessorOptions

KEY = "key-from-the-environment"
MAX_CONCURRENT = 4
READ_TIMEOUT = 3
# The test volume decodes to 8 slices of 32 x 32 = 8192 pixels: two fit, three do not.
MAX_REQUEST_PIXELS = 20_000


def save_model(folder: Path) -> None:
    model, tokenizer = answering_tiny_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ProcessorOptions(max_pixels=48 * 48, min_pixels=32 * 32, max_slices=8).save(folder)


def make_media(root: Path) -> None:
    (root / "scan.png").write_bytes(png_bytes(1))
    (root / "broken.png").write_bytes(b"this is not a png")
    volume = np.random.default_rng(0).random((32, 32, 8)).astype(np.float32) * 1000
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "mri.nii.gz")


class ServerProcess:
    """`omnivmed-serve` started as a command; its log is drained so it never blocks."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "omnivmed.cli.serve", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)  # fmt: skip
        self.log: list[str] = []
        started = threading.Event()
        self.port = None

        def drain() -> None:
            for line in self.proc.stderr:
                self.log.append(line)
                if "Uvicorn running on http://" in line:
                    self.port = int(line.split("http://127.0.0.1:")[1].split()[0])
                    started.set()
            started.set()

        threading.Thread(target=drain, daemon=True).start()
        started.wait(timeout=300)
        assert self.port, "the server did not start:\n" + "".join(self.log[-20:])
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    save_model(model_dir)
    root = tmp_path_factory.mktemp("media")
    make_media(root)
    # The key comes from the environment, so it is not on the command line.
    env = {**os.environ, API_KEY_ENV: KEY}
    args = [str(model_dir), "--port", "0", "--device", "cpu", "--media-root", str(root),
            "--max-concurrent", str(MAX_CONCURRENT), "--read-timeout", str(READ_TIMEOUT),
            "--max-batch-size", "4", "--max-wait-ms", "1000", "--max-tokens", "32",
            "--max-media-parts", "4", "--max-media-per-message", "3",
            "--max-request-pixels", str(MAX_REQUEST_PIXELS)]  # fmt: skip
    srv = ServerProcess(args, env)
    yield srv, root
    srv.stop()


def post(base: str, body, key: str | None = KEY, path: str = "/v1/chat/completions"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}{path}", headers=headers, json=body, timeout=120)


def ask(text: str, parts: list[dict] | None = None) -> list[dict]:
    return [{"role": "user", "content": [*(parts or []), {"type": "text", "text": text}]}]


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def volume(url: str) -> dict:
    return {"type": "volume_url", "volume_url": {"url": url}}


def message(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


# ---- connections that never finish a request ------------------------------------------


def open_and_hold(port: int, payload: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(payload)
    return s


def answer_of(s: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


def test_held_connections_take_no_slot_and_are_closed(server):
    srv, _ = server
    headers = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()  # fmt: skip
    # More clients than slots: headers and one byte of the body, then nothing.
    body_held = [open_and_hold(srv.port, headers + b"{") for _ in range(MAX_CONCURRENT + 2)]
    header_held = [open_and_hold(srv.port, b"POST /v1/chat/comp") for _ in range(2)]
    time.sleep(0.5)  # let the server see them all before the real request
    r = post(
        srv.base, {"messages": ask("Q?", [image("scan.png")]), "max_tokens": 2, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.base}/health").json()["in_flight"] == 0
    for s in body_held:  # refused once the body is overdue, and the connection closed
        answer = answer_of(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within" in answer
    for s in header_held:  # closed without an answer once the headers are overdue
        assert answer_of(s) == b""
    assert post(srv.base, {"messages": ask("Q?"), "max_tokens": 2}).status_code == 200


# ---- work one request may ask for -----------------------------------------------------


def test_media_part_limits_are_checked_before_anything_is_read(server):
    srv, _ = server
    # Five unreadable images: refused for their number, before any is decoded.
    r = post(srv.base, {"messages": ask("Q?", [image("broken.png")] * 5)})
    assert r.status_code == 413 and "5 media parts" in message(r), r.text
    split = [*ask("a", [image("broken.png")] * 2), {"role": "assistant", "content": "ok"},
             *ask("b", [image("broken.png")] * 3)]  # fmt: skip
    r = post(srv.base, {"messages": split})
    assert r.status_code == 413 and "5 media parts" in message(r), r.text
    r = post(srv.base, {"messages": ask("Q?", [image("broken.png")] * 4)})
    assert r.status_code == 413 and "messages[0] has 4 media parts" in message(r), r.text
    # Within the limits the same parts are read, and the unreadable one named.
    r = post(srv.base, {"messages": ask("Q?", [image("broken.png")])})
    assert r.status_code == 400 and "broken.png" in message(r), r.text


def test_a_thousand_parts_get_one_short_line(server):
    srv, _ = server
    r = post(srv.base, {"messages": ask("Q?", [image("scan.png")] * 1000)})
    assert r.status_code == 413, r.text
    text = message(r)
    assert "1000 media parts" in text and "\n" not in text and len(text) <= 300, text
    long_type = {"type": "x" * 5000}
    r = post(srv.base, {"messages": [{"role": "user", "content": [long_type]}]})
    assert r.status_code == 400 and len(message(r)) <= 300, r.text


def test_decoded_pixels_per_request_are_bounded(server):
    srv, _ = server
    two = post(srv.base, {"messages": ask("Q?", [volume("mri.nii.gz")] * 2), "max_tokens": 2})
    assert two.status_code == 200, two.text
    three = post(srv.base, {"messages": ask("Q?", [volume("mri.nii.gz")] * 3), "max_tokens": 2})
    assert three.status_code == 413, three.text
    assert f"over {MAX_REQUEST_PIXELS} pixels" in message(three)
    assert post(srv.base, {"messages": ask("Q?"), "max_tokens": 2}).status_code == 200


# ---- values out of range --------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**70, -(2**70), 2**63, "7", 1.5])
def test_a_seed_out_of_range_is_a_400(server, seed):
    srv, _ = server
    r = post(srv.base, {"messages": ask("Q?"), "seed": seed, "max_tokens": 2})
    assert r.status_code == 400 and "'seed' must be an integer in" in message(r), r.text


def test_huge_numbers_anywhere_are_400s(server):
    srv, _ = server
    for body in ({"temperature": 10**400}, {"max_tokens": 10**300}, {"top_p": -(10**400)}):
        r = post(srv.base, {"messages": ask("Q?"), **body})
        assert r.status_code == 400 and len(message(r)) <= 300, (body, r.text)
    raw = b'{"messages": [], "seed": 1' + b"0" * 5000 + b"}"
    r = httpx.post(f"{srv.base}/v1/chat/completions", content=raw, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 400 and "not valid JSON" in message(r), r.text


# ---- the API key and what errors show ----------------------------------------------------


def test_the_key_from_the_environment_guards_every_api_route(server):
    srv, _ = server
    cmdline = Path(f"/proc/{srv.proc.pid}/cmdline")
    if cmdline.exists():
        assert KEY.encode() not in cmdline.read_bytes()
    assert post(srv.base, {"messages": ask("Q?")}, key=None).status_code == 401
    assert post(srv.base, {"messages": ask("Q?")}, key="wrong").status_code == 401
    assert httpx.get(f"{srv.base}/v1/models").status_code == 401
    models = httpx.get(f"{srv.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert models.status_code == 200
    assert models.json()["data"][0]["defaults"]["temperature"] == 1.0
    r = post(srv.base, {"type": "image_url", "url": "scan.png"}, key=None,
             path="/v1/omnivmed/preview")  # fmt: skip
    assert r.status_code == 401
    assert httpx.get(f"{srv.base}/").status_code == 200  # the page holds no data
    assert httpx.get(f"{srv.base}/health").status_code == 200


def test_errors_name_media_as_the_client_sent_them(server):
    srv, root = server
    cases = [
        (ask("Q?", [image(data_url("image/png", b"not a png"))]), "uploaded image 1"),
        (ask("Q?", [image("broken.png")]), "broken.png"),
        (ask("Q?", [volume(data_url("application/gzip", b"not gzip"))]), "uploaded volume 1"),
    ]
    for messages, name in cases:
        r = post(srv.base, {"messages": messages})
        assert r.status_code == 400 and name in message(r), r.text
        for secret in (str(root), "omnivmed-serve-", "/tmp/"):
            assert secret not in message(r), r.text
    r = post(srv.base, {"type": "image_url", "url": "broken.png"}, path="/v1/omnivmed/preview")
    assert r.status_code == 400 and "broken.png" in message(r), r.text
    assert str(root) not in message(r)


def test_api_key_sources(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None, None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None, None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, str(key_file)) == "from-file"  # the file wins
    assert resolve_api_key("from-flag", None) == "from-flag"
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key("from-flag", str(key_file))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key(None, str(tmp_path / "empty"))
    assert main([str(tmp_path), "--api-key-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: cannot be read" in err


# ---- reproducible sampling ------------------------------------------------------------


def sampled(base: str, text: str, seed: int | None, temperature: float = 1.0) -> str:
    body = {"messages": ask(text, [image("scan.png")]), "max_tokens": 8,
            "temperature": temperature, "top_p": 0.9}  # fmt: skip
    if seed is not None:
        body["seed"] = seed
    r = post(base, body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_a_seed_reproduces_a_sampled_answer_alone_repeated_and_batched(server):
    srv, _ = server
    requests = [("Describe it.", 7, 1.0), ("What is shown?", 7, 1.0),
                ("Any finding?", 11, 0.7), ("Is it normal?", None, 0.0)]  # fmt: skip
    alone = [sampled(srv.base, *r) for r in requests]
    assert sampled(srv.base, *requests[0]) == alone[0]  # repeated
    before = httpx.get(f"{srv.base}/health").json()["batches"]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: sampled(srv.base, *r), requests))
    batches = httpx.get(f"{srv.base}/health").json()["batches"] - before
    assert batches < len(requests)  # some of them shared a generate call
    assert together == alone
    # Different seeds do sample differently.
    assert len({sampled(srv.base, "Describe it.", seed) for seed in range(4)}) > 1


def test_a_release_asked_for_during_another_runs_once_more(monkeypatch):
    from omnivmed.serving import resources

    started, go, passes = threading.Event(), threading.Event(), []

    def one_pass() -> None:
        passes.append(1)
        if len(passes) == 1:
            started.set()
            go.wait(30)

    monkeypatch.setattr(resources, "_release_once", one_pass)
    release = resources._Releaser()
    first = threading.Thread(target=release)
    first.start()
    assert started.wait(30)
    release()  # asked twice meanwhile: one more pass covers both
    release()
    go.set()
    first.join(30)
    assert len(passes) == 2


def test_a_draw_follows_temperature_and_top_p():
    from omnivmed.inference.generate import draw

    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    g = torch.Generator().manual_seed(0)
    assert {int(draw(logits, 1.0, 0.5, g)) for _ in range(200)} == {0}  # 0.6 reaches 0.5
    assert {int(draw(logits, 1.0, 0.8, g)) for _ in range(200)} == {0, 1}
    counts = np.bincount([int(draw(logits, 1.0, 1.0, g)) for _ in range(4000)], minlength=3)
    assert np.allclose(counts / 4000, [0.6, 0.3, 0.1], atol=0.03)
    sharp = np.bincount([int(draw(logits, 0.25, 1.0, g)) for _ in range(4000)], minlength=3)
    expected = np.array([0.6, 0.3, 0.1]) ** 4  # temperature 1/4: probabilities to the 4th
    assert np.allclose(sharp / 4000, expected / expected.sum(), atol=0.03)
    again = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [int(draw(logits, 1.0, 1.0, again[0])) for _ in range(50)] == [
        int(draw(logits, 1.0, 1.0, again[1])) for _ in range(50)
    ]
