"""Rejection-sampled captions against a real HTTP server on 127.0.0.1 (an OpenAI-style
chat endpoint the test runs: slow, failing and malformed replies included) and a tiny
local model; resume after an interrupted run."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnivmed.cli.data import main
from omnivmed.prep.captions.backends import InvalidJudgementError, parse_judgement
from omnivmed.prep.captions.http import HttpBackend
from omnivmed.prep.captions.pipeline import CaptionSettings, run_captions


class Fake:
    """What the server answers: generator captions by clip, judge scores by caption."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def count(self, key: str) -> int:
        with self.lock:
            self.calls[key] = self.calls.get(key, 0) + 1
            return self.calls[key]

    def reply(self, body: dict) -> tuple[int, str | None, float]:
        """(status, content, delay) for one request."""
        text = body["messages"][0]["content"][-1]["text"]
        if body["model"] == "generator":
            n_images = len(body["messages"][0]["content"]) - 1
            clip = f"clip{n_images}"  # clips differ by frame count
            k = self.count(f"gen-{clip}")
            if clip == "clip3" and k == 1:
                return 200, None, 1.5  # slower than the client's timeout: retried
            if clip == "clip4" and k == 1:
                return 500, None, 0.0  # a server error: retried
            good = {"clip2": k == 2, "clip3": True, "clip4": True, "clip5": False}.get(clip, k == 2)
            return 200, f"{'good' if good else 'bad'} caption {k} of {clip}", 0.0
        caption = text.split("Caption: ", 1)[1]
        self.count(f"judge-{body['model']}")
        if "clip5" in caption and body["model"] == "judge-b":
            return 200, "Score: 5/5, great caption", 0.0  # not JSON: retried, then a failure
        score = 5 if caption.startswith("good") else 2
        return (
            200,
            "```json\n"
            + json.dumps({"relevance": score, "fluency": score, "accuracy": score})
            + "\n```",
            0.0,
        )


@pytest.fixture
def endpoint():
    fake = Fake()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, content, delay = fake.reply(body)
            time.sleep(delay)
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                 if content is not None else {"error": "boom"}).encode()  # fmt: skip
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", fake
    server.shutdown()


def clips(root: Path, frame_counts) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for n in frame_counts:
        folder = root / f"clip{n}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(
                folder / f"{i:03d}.png"
            )
        lines.append(json.dumps({"id": f"c{n}", "video": f"clip{n}"}))
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return root / "clips.jsonl"


def backends(url, timeout=0.5):
    gen = HttpBackend(url, "generator", timeout=timeout, retries=2, backoff=0.05)
    judges = [
        HttpBackend(url, m, timeout=timeout, retries=2, backoff=0.05)
        for m in ("judge-a", "judge-b")
    ]
    return gen, judges


def test_judge_replies_are_read_strictly():
    assert parse_judgement('{"relevance": 4, "fluency": 5, "accuracy": 3}') == {
        "relevance": 4,
        "fluency": 5,
        "accuracy": 3,
    }
    assert (
        parse_judgement('```json\n{"relevance": 1, "fluency": 1, "accuracy": 1}\n```')["accuracy"]
        == 1
    )
    for bad in ("Score: 5", '{"relevance": 6, "fluency": 5, "accuracy": 3}', '{"relevance": 4.5, "fluency": 5, "accuracy": 3}',
                '{"relevance": 4, "fluency": 5}', '{"relevance": 4, "fluency": 5, "accuracy": 3, "x": 1}',
                'Sure! {"relevance": 4, "fluency": 5, "accuracy": 3}', '{"relevance": true, "fluency": 5, "accuracy": 3}'):  # fmt: skip
        with pytest.raises(InvalidJudgementError):
            parse_judgement(bad)


def test_rejection_sampling_over_http(tmp_path, endpoint):
    url, fake = endpoint
    clip_file = clips(tmp_path, [2, 3, 4, 5])
    gen, judges = backends(url)
    summary = run_captions(clip_file, tmp_path, gen, judges, tmp_path / "out",
                           CaptionSettings(candidates=3, threshold=4.0, judge_retries=1, concurrency=4))  # fmt: skip
    audit = {
        r["id"]: r for r in map(json.loads, (tmp_path / "out/audit.jsonl").read_text().splitlines())
    }
    assert audit["c2"]["kept"] and audit["c2"]["caption"] == "good caption 2 of clip2"
    assert audit["c3"]["kept"]  # the slow first reply timed out and was retried
    assert audit["c4"]["kept"]  # the 500 was retried
    assert not audit["c5"]["kept"]  # judge-b never gives a valid score: nothing is scored
    assert all(
        "failed" in j
        for c in audit["c5"]["candidates"]
        for j in c["judgements"]
        if j["judge"].endswith("judge-b")
    )
    assert summary["judge_failures"] == 3 and summary["kept"] == 3
    assert fake.calls["judge-judge-b"] >= 3 * 2 + 3 * 3  # clip5's invalid replies were re-asked
    records = [json.loads(x) for x in (tmp_path / "out/captions.jsonl").read_text().splitlines()]
    assert {r["id"] for r in records} == {"caption-c2", "caption-c3", "caption-c4"}
    assert records[0]["conversations"][0]["value"].startswith("<video>\n")
    from omnivmed.data.records import load_records

    assert len(load_records(tmp_path / "out/captions.jsonl", tmp_path)) == 3  # usable for training


def test_resume_skips_finished_clips(tmp_path, endpoint):
    url, fake = endpoint
    clip_file = clips(tmp_path, [2, 6])
    gen, judges = backends(url)
    settings = CaptionSettings(candidates=2, concurrency=2)
    run_captions(clip_file, tmp_path, gen, judges, tmp_path / "out", settings, progress=False)
    calls = dict(fake.calls)
    audit = tmp_path / "out/audit.jsonl"
    lines = audit.read_text().splitlines()
    # A crash while writing the second clip's line: it is cut short.
    audit.write_text(lines[0] + "\n" + lines[1][:40])
    run_captions(clip_file, tmp_path, gen, judges, tmp_path / "out", settings, progress=False)
    redone = {k: fake.calls[k] - calls.get(k, 0) for k in fake.calls}
    first_id = json.loads(lines[0])["id"]
    other = "clip6" if first_id == "c2" else "clip2"
    assert (
        redone.get(f"gen-{'clip2' if first_id == 'c2' else 'clip6'}", 0) == 0
    )  # finished: not redone
    assert redone[f"gen-{other}"] == 2
    assert len(audit.read_text().splitlines()) == 2


def test_cli_with_a_tiny_local_generator(tmp_path, endpoint):
    import torch

    from omnivmed.models import build_preset
    from omnivmed.processing.processor import ProcessorOptions

    url, fake = endpoint
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny")
    with torch.no_grad():  # large random LLM weights, so the tiny model writes some text
        for p in model.language_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    ProcessorOptions(max_pixels=32 * 32, min_pixels=32 * 32).save(tmp_path / "model")
    clip_file = clips(tmp_path, [2])
    rc = main(["captions", str(clip_file), "--generator", str(tmp_path / "model"), "--judge", url,
               "--judge-model", "judge-a", "--candidates", "2", "--out", str(tmp_path / "out"), "--timeout", "5"])  # fmt: skip
    assert rc == 0
    audit = [json.loads(x) for x in (tmp_path / "out/audit.jsonl").read_text().splitlines()]
    assert len(audit[0]["candidates"]) == 2 and fake.calls.get("judge-judge-a", 0) >= 1
    assert (
        main(
            [
                "captions",
                str(clip_file),
                "--generator",
                "nowhere",
                "--judge",
                url,
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
