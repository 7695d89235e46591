"""Our commands leave out third-party start-up chatter (DeepSpeed's CPU-accelerator
warning and op-build line, torch's missing-CUDA-runtime warning, transformers' "Loading
weights" bar), message by message: other warnings of the same libraries still show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from omnivmed.cli.quiet import without_lines

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    import omnivmed.cli  # what every command imports first
    import deepspeed  # picks its accelerator: the CPU one here
    import torch.utils.cpp_extension  # looks for the CUDA runtime
    from transformers import AutoModel
    from omnivmed import build_preset

    deepspeed.utils.logger.warning("a DeepSpeed warning that still shows")
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = build_preset("tiny")
        model.save_pretrained(tmp)
        AutoModel.from_pretrained(tmp)
    print("finished")
    """
)

SILENCED = ("Setting accelerator to CPU", "No CUDA runtime is found", "Loading weights",
            "Writing model shards")  # fmt: skip


@pytest.mark.slow
def test_library_chatter_is_left_out():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, where DeepSpeed warns
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "finished" in proc.stdout
    assert "a DeepSpeed warning that still shows" in output
    for message in SILENCED:
        assert message not in output, message


def test_op_build_line_is_left_out_and_the_rest_printed(capsys):
    def build():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else")
        return 7

    assert without_lines(build, re.compile(r"DeepSpeed \S+ built successfully\s*$"))() == 7
    assert capsys.readouterr().out == "something else\n"
