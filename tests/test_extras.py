"""Only `omnivmed-train` needs the `train` extra (DeepSpeed, TensorBoard, matplotlib): every
other command runs without it, and training without it stops with one line that names the
extra to install. One subprocess in which those modules are not installed, as Python sees
it, runs them all."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys, tempfile
    from pathlib import Path

    # None in sys.modules is Python's "not installed": `import` raises
    # ModuleNotFoundError and importlib.util.find_spec answers None.
    for name in ("deepspeed", "tensorboard", "matplotlib"):
        sys.modules[name] = None

    def run(module, argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = __import__(module, fromlist=["main"]).main(argv)
            except SystemExit as exc:
                code = exc.code
        return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

    results = {}
    for cli in ("infer", "eval", "serve", "info", "data"):
        results[cli] = run(f"omnivmed.cli.{cli}", ["--help"])
    results["info run"] = run("omnivmed.cli.info", [])
    results["eval profiles"] = run("omnivmed.cli.eval", ["profiles"])
    with tempfile.TemporaryDirectory() as tmp:
        results["train"] = run("omnivmed.cli.train", ["--output-dir", tmp + "/demo"])
        results["train wrote"] = sorted(p.name for p in Path(tmp).iterdir())
        from omnivmed.prep.token_stats import ModalityTokens, write_report

        rows = [ModalityTokens("CT", items=1, pruned=3, unpruned=4)]
        json_path, png_path = write_report(rows, Path(tmp) / "stats", "t")
        results["chart"] = [json_path.is_file(), png_path]
    results["imported"] = sorted(
        m for m in ("deepspeed", "tensorboard", "matplotlib") if sys.modules.get(m) is not None
    )
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.slow
def test_commands_other_than_train_run_without_the_train_extra():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    for cli in ("infer", "eval", "serve", "info", "data"):
        assert results[cli]["code"] == 0, (cli, results[cli]["err"][-2000:])
        assert f"usage: omnivmed-{cli}" in results[cli]["out"]
    assert results["info run"]["code"] in (0, 1), results["info run"]["err"][-2000:]  # 1: no _C
    assert "vision_encoders" in results["info run"]["out"]
    assert "strict" in results["eval profiles"]["out"]
    train = results["train"]
    assert train["code"] == 2
    assert train["err"].strip().splitlines() == [
        "omnivmed-train needs deepspeed and matplotlib, which are not installed: "
        "pip install 'omnivmed[train]'"
    ]
    assert results["train wrote"] == []  # refused before anything was made
    assert results["chart"] == [True, None]  # the JSON without the chart
    assert results["imported"] == []
