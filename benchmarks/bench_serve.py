"""omnivmed-serve under load: N concurrent clients on loopback for a bounded time, each
sending a chat request with an image and streaming the answer; requests per second and
p50/p99 time to first token and to last token, with batching on (max batch 8) and off
(max batch 1), measured in the same run. The tiny preset on the CPU (default), or
--preset omnivmed-1.5b-shape on a GPU.

    python benchmarks/bench_serve.py [--clients 8 --seconds 20 --max-tokens 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import threading
import time

import numpy as np
import torch
from _timing import print_table, write_results
from PIL import Image


def _png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _serve(model, processor, batch: int):
    import uvicorn

    from omnivmed.serving.app import ServeSettings, create_app

    settings = ServeSettings(
        max_batch_size=batch, max_wait_ms=10 if batch > 1 else 0, max_concurrent=1024
    )
    server = uvicorn.Server(uvicorn.Config(create_app(model, processor, settings),
                                           host="127.0.0.1", port=0, log_level="error"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def _load(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    import openai

    stop_at = time.perf_counter() + seconds
    ttft, total, lock = [], [], threading.Lock()

    def client(k: int) -> None:
        c = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600
        )
        i = 0
        while time.perf_counter() < stop_at:
            start, first = time.perf_counter(), None
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(k * 1000 + i)}},
                                                 {"type": "text", "text": "What is shown?"}]}]  # fmt: skip
            for chunk in c.chat.completions.create(model="omnivmed", messages=msgs, max_tokens=max_tokens,
                                                   temperature=0, stream=True):  # fmt: skip
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
            end = time.perf_counter() - start
            with lock:
                ttft.append(first if first is not None else end)
                total.append(end)
            i += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began

    def pct(values, q):
        return (
            statistics.quantiles(values, n=100)[q - 1] * 1e3 if len(values) > 1 else values[0] * 1e3
        )

    return {"requests": len(total), "seconds": wall, "requests_per_s": len(total) / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "latency_p50_ms": pct(total, 50), "latency_p99_ms": pct(total, 99)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.seconds <= 600:
        raise SystemExit("--clients must be 1..256 and --seconds 1..600")
    from omnivmed.models import build_preset
    from omnivmed.processing.processor import OmniVMedProcessor, ProcessorOptions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build_preset(args.preset)
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    options = ProcessorOptions(max_pixels=448 * 448 if args.preset != "tiny" else 64 * 64)
    processor = OmniVMedProcessor(model.config, tokenizer, options)
    rows = []
    for batch in (1, 8):
        server, thread, port = _serve(model, processor, batch)
        row = {"preset": args.preset, "clients": args.clients, "max_batch_size": batch,
               **_load(port, args.clients, args.seconds, args.max_tokens)}  # fmt: skip
        row["generate_calls"] = server.config.app.state.engine.batches
        server.should_exit = True
        thread.join(timeout=30)
        rows.append(row)
    print_table(rows, [("max_batch_size", "batch", "d"), ("requests", "requests", "d"),
                       ("requests_per_s", "req/s", ".2f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                       ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("latency_p50_ms", "last p50 ms", ".0f"),
                       ("latency_p99_ms", "last p99 ms", ".0f"), ("generate_calls", "generate calls", "d")])  # fmt: skip
    print(
        f"batching on / off, requests per second: {rows[1]['requests_per_s'] / rows[0]['requests_per_s']:.2f}x"
    )
    if not args.no_save:
        print("wrote", write_results("serve", device, rows))


if __name__ == "__main__":
    main()
