"""`omnivmed-import medm-vl`: the tiny MedM-VL releases in tests/fixtures/medm_vl import, and
the imported models answer as MedM-VL's own code did (goldens.json: prompt ids, pixels,
encoder and connector features, prefill logits, greedy ids and text), through
`omnivmed.inference` and through `omnivmed-infer`; broken releases are refused with one
line and leave no output folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnivmed.cli.eval import main as eval_main
from omnivmed.cli.importer import main as import_main
from omnivmed.cli.infer import main as infer_main
from omnivmed.importers import IMPORTERS
from omnivmed.inference import Sampling, build_prompt, generate, load_for_inference
from omnivmed.models.kinds import VisualKind
from omnivmed.processing.processor import Media

# The goldens and the generator of the release folders they were made from (the folders
# themselves are written per test run, not kept in the repository).
SOURCE = Path(__file__).parent / "fixtures" / "medm_vl"
GOLDENS = json.loads((SOURCE / "goldens.json").read_text())
CASES = GOLDENS["cases"]
KINDS = {"2d": VisualKind.IMAGE, "ct": VisualKind.VOLUME}
MAX_NEW = GOLDENS["made_with"]["max_new_tokens"]


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    """The tiny release folders, their component folders and inputs, as make_release.py
    writes them: byte for byte the weights the goldens were made with (checked)."""
    spec = importlib.util.spec_from_file_location("make_release", SOURCE / "make_release.py")
    make_release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_release)
    root = tmp_path_factory.mktemp("medm_vl")
    make_release.main(root)
    for name, digest in GOLDENS["weights_sha256"].items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory, releases) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for case, golden in CASES.items():
        out[case] = root / case
        assert (
            import_main(["medm-vl", str(releases / golden["release"]), "--out", str(out[case])])
            == 0
        )
    return out


@pytest.fixture(scope="module")
def loaded(imported):
    return {case: load_for_inference(folder, "cpu", "float32") for case, folder in imported.items()}


def _question(case: str) -> str:
    marker, question = CASES[case]["question"].split("\n", 1)
    assert marker == KINDS[case].marker
    return question


def _prompt(case, model, processor, releases: Path):
    kind = KINDS[case]
    visual = processor.encode_media([Media(kind, releases / CASES[case]["input_file"])])
    messages = [{"role": "user", "content": f"{kind.marker}\n{_question(case)}"}]
    return build_prompt(processor, messages, visual), visual


def _visual_tokens(case: str) -> int:
    """How many visual tokens MedM-VL gave the case's medium (its embeddings' length less
    the prompt's text tokens)."""
    golden = CASES[case]
    return golden["inputs_embeds_len"] - sum(1 for i in golden["input_ids"] if i >= 0)


def test_lists_its_families(capsys):
    assert "medm-vl" in IMPORTERS.names()
    with pytest.raises(SystemExit) as exit_info:
        import_main(["--help"])
    assert exit_info.value.code == 0
    assert "medm-vl" in capsys.readouterr().out
    assert import_main([]) == 2
    assert "medm-vl" in capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_tensor_accounted_for(imported, case, releases):
    summary = json.loads((imported[case] / "import.json").read_text())
    unused = set(summary["unused"])
    assert unused and all(".post_layernorm." in n or ".head." in n for n in unused), (
        "only SigLIP's final LayerNorm and pooling head are unused"
    )
    index = json.loads(
        (releases / CASES[case]["release"] / "model.safetensors.index.json").read_text()
    )
    assert summary["weights"] + len(unused) == len(index["weight_map"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_prompt_pixels_features_and_logits(loaded, case, releases):
    golden = CASES[case]
    model, processor = loaded[case]
    prompt, visual = _prompt(case, model, processor, releases)
    ids = prompt.input_ids.tolist()
    assert len(ids) == golden["inputs_embeds_len"]
    collapsed = []
    for i in ids:  # the placeholders stand where MedM-VL's single marker id stood
        if i == model.config.image_token_id:
            if collapsed and collapsed[-1] == golden["image_token_id"]:
                continue
            i = golden["image_token_id"]
        collapsed.append(i)
    assert collapsed == golden["input_ids"]
    shown = processor.tokenizer.decode([i for i in ids if i != model.config.image_token_id])
    assert shown == golden["prompt"].replace(KINDS[case].marker, "")

    pixels = visual.pixel_values
    assert pixels.sum().item() == pytest.approx(golden["pixel_values"]["sum"], abs=1e-3)
    assert pixels.abs().sum().item() == pytest.approx(golden["pixel_values"]["abs_sum"], abs=1e-3)

    seen = {}

    def keep(name, pick):
        def hook(module, args, output) -> None:  # returns None: the output stays as it is
            seen[name] = pick(output)

        return hook

    hooks = [model.vision_tower.register_forward_hook(keep("enc", lambda o: o)),
             model.connector.register_forward_hook(keep("img", lambda o: o[0]))]  # fmt: skip
    try:
        with torch.no_grad():
            logits = model(input_ids=prompt.input_ids[None], **visual.model_inputs()).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    encoder, features = seen["enc"], seen["img"]
    assert list(encoder.shape) == golden["encoder_features"]["shape"][1:]
    assert encoder.sum().item() == pytest.approx(golden["encoder_features"]["sum"], abs=1e-3)
    first = torch.tensor(golden["encoder_features"]["first_values"])
    torch.testing.assert_close(encoder.flatten()[: first.numel()], first, atol=1e-5, rtol=1e-5)
    image = golden["image_features"]
    assert list(features.shape) == image["shape"][1:]
    assert features.sum().item() == pytest.approx(image["sum"], abs=1e-2)
    assert features.abs().sum().item() == pytest.approx(image["abs_sum"], abs=1e-2)
    for row, name in ((0, "first_token"), (-1, "last_token")):
        torch.testing.assert_close(features[row], torch.tensor(image[name]), atol=1e-5, rtol=1e-5)
    expected = torch.tensor(golden["prefill_last_logits"])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_greedy_answer(loaded, case, releases):
    golden = CASES[case]
    model, processor = loaded[case]
    prompt, _ = _prompt(case, model, processor, releases)
    (row,) = generate(model, processor.tokenizer, [prompt], Sampling(MAX_NEW))
    eos = GOLDENS["special_token_ids"]["eos"]
    ends_on_eos = golden["generated_ids"][-1] == eos
    assert row.tokens == [t for t in golden["generated_ids"] if t != eos]
    assert row.finish_reason == ("stop" if ends_on_eos else "length")
    assert row.text == golden["generated_text"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_penalty_counts_answer_tokens_only(loaded, case, releases):
    """Without the LLM folder's repetition penalty the answer is MedM-VL's answer without
    it: the penalty (1.05) is what makes the goldens, and it never sees the prompt."""
    model, processor = loaded[case]
    prompt, _ = _prompt(case, model, processor, releases)
    saved = model.generation_config.repetition_penalty
    assert saved == CASES[case]["llm_generation_config"]["repetition_penalty"]
    model.generation_config.repetition_penalty = 1.0
    try:
        (row,) = generate(model, processor.tokenizer, [prompt], Sampling(MAX_NEW))
    finally:
        model.generation_config.repetition_penalty = saved
    eos = GOLDENS["special_token_ids"]["eos"]
    expected = CASES[case]["generated_ids_without_repetition_penalty"]
    assert row.tokens == [t for t in expected if t != eos][:MAX_NEW]


@pytest.mark.parametrize("case", sorted(CASES))
def test_infer_cli_answers_as_medm_vl(imported, case, capsys, releases):
    flag = "--image" if KINDS[case] == VisualKind.IMAGE else "--volume"
    rc = infer_main([str(imported[case]), flag, str(releases / CASES[case]["input_file"]),
                     "-q", _question(case), "--max-new-tokens", str(MAX_NEW), "--device", "cpu",
                     "--dtype", "float32", "--json"])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answers"][0]["text"] == CASES[case]["generated_text"].strip()


def test_eval_run_answers_as_medm_vl(imported, tmp_path, releases):
    records = []
    for case, golden in CASES.items():
        field = "images" if KINDS[case] == VisualKind.IMAGE else "volumes"
        records.append({"id": case, "conversations": [
            {"from": "human", "value": golden["question"]}, {"from": "gpt", "value": "-"}],
            field: [Path(golden["input_file"]).name], "answer": "-"})  # fmt: skip
    for case in CASES:
        bench = tmp_path / f"{case}.jsonl"
        bench.write_text(json.dumps(next(r for r in records if r["id"] == case)) + "\n")
        out = tmp_path / f"eval-{case}"
        rc = eval_main(["run", str(imported[case]), "--benchmark", str(bench), "--data-root",
                        str(releases / "inputs"), "--out", str(out), "--device", "cpu",
                        "--max-new-tokens", str(MAX_NEW)])  # fmt: skip
        assert rc == 0
        (prediction,) = [
            json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()
        ]
        assert prediction["prediction"] == CASES[case]["generated_text"].strip()


def test_serve_answers_as_medm_vl(loaded, releases):
    """omnivmed-serve over an imported folder: a greedy request's text is MedM-VL's."""
    from fastapi.testclient import TestClient

    from omnivmed.serving.app import ServeSettings, create_app

    for case, golden in CASES.items():
        model, processor = loaded[case]
        part = "image_url" if KINDS[case] == VisualKind.IMAGE else "volume_url"
        settings = ServeSettings(media_root=releases / "inputs", max_tokens=MAX_NEW)
        with TestClient(create_app(model, processor, settings)) as client:
            content = [{"type": part, part: {"url": Path(golden["input_file"]).name}},
                       {"type": "text", "text": _question(case)}]  # fmt: skip
            reply = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": MAX_NEW})  # fmt: skip
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["message"]["content"]
        assert text == golden["generated_text"], case


def test_viewer_shows_every_patch(loaded, releases):
    """The server's preview of a medium for an imported model: every frame or slice at the
    encoder's size, nothing pruned (MedM-VL's models see every patch)."""
    from fastapi.testclient import TestClient

    from omnivmed.serving.app import ServeSettings, create_app

    for case, golden in CASES.items():
        model, processor = loaded[case]
        part = "image_url" if KINDS[case] == VisualKind.IMAGE else "volume_url"
        app = create_app(model, processor, ServeSettings(media_root=releases / "inputs"))
        with TestClient(app) as client:
            reply = client.post("/v1/omnivmed/preview",
                                json={"type": part, "url": Path(golden["input_file"]).name})  # fmt: skip
        assert reply.status_code == 200, reply.text
        shown = reply.json()
        slices = 1 if case == "2d" else int(golden["pixel_values"]["shape"][1])  # [1, D, C, H, W]
        assert len(shown["frames"]) == slices
        assert shown["kept_patches"] == shown["total_patches"]
        assert shown["kept"] == shown["total"] == _visual_tokens(case)


def test_infer_reads_the_demo_scans(imported, tmp_path, capsys):
    """The demo's fundus photograph through the 2D model, its MNI T1 volume (NIfTI, not
    MedM-VL's .npy grey levels) through the CT model with percentile scaling."""
    from omnivmed.demo.dataset import build_demo_dataset

    paths = build_demo_dataset(tmp_path / "demo")
    runs = (("2d", "--image", paths["image"], []),
            ("ct", "--volume", paths["volume"], ["--intensity", "percentile"]))  # fmt: skip
    for case, flag, path, extra in runs:
        rc = infer_main([str(imported[case]), flag, str(path), "-q", "What is shown?",
                         "--max-new-tokens", "4", "--device", "cpu", "--json", *extra])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        report = json.loads(capsys.readouterr().out)
        assert report["answers"][0]["visual_tokens"] == _visual_tokens(case)
    # A CT in Hounsfield units is not the 0..255 grey levels the CT model reads: refused,
    # naming the setting to use, never scaled by a guess.
    import nibabel as nib
    import numpy as np

    hu = np.linspace(-1000, 1000, 24 * 20 * 4, dtype=np.float32).reshape(24, 20, 4)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "hu.nii.gz")
    rc = infer_main([str(imported["ct"]), "--volume", str(tmp_path / "hu.nii.gz"), "-q", "What?",
                     "--device", "cpu"])  # fmt: skip
    assert rc != 0 and "intensity 'uint8'" in capsys.readouterr().err


@pytest.mark.parametrize("case,lora", [("2d", False), ("ct", True)])
def test_fine_tunes_from_an_imported_folder(imported, tmp_path, capsys, case, lora, releases):
    """An imported folder is a stage's `init` through the packaged fine-tuning configs
    (full for 2D, LoRA for CT): it trains and exports a folder with the same processor
    and decoding; a stage that would feed the encoder otherwise is refused, naming it."""
    pytest.importorskip("peft")
    from omnivmed.cli.train import main as train_main
    from omnivmed.processing.options import ProcessorOptions

    folder, golden = imported[case], CASES[case]
    medium = Path(golden["input_file"]).name
    shutil.copy(releases / golden["input_file"], tmp_path / medium)
    field = "images" if KINDS[case] == VisualKind.IMAGE else "volumes"
    record = {"id": "a", field: [medium], "conversations": [
        {"from": "human", "value": golden["question"]}, {"from": "gpt", "value": " A scan."}]}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps([record, {**record, "id": "b"}]))
    args = ["--config", f"medmvl_finetune_{case}", "--data", str(tmp_path / "train.json"),
            "--output-dir", str(tmp_path / "runs"), "--set", f"init={folder}",
            "--set", "max_steps=1", "--set", "zero_stage=0", "--set", "micro_batch_size=2"]  # fmt: skip
    if lora:
        args += ["--set", "lora={r: 4, alpha: 8}"]
    assert train_main([*args, "--set", "media.resize=bilinear"]) == 2
    assert "resize: 'pil_bicubic' there, 'bilinear' here" in capsys.readouterr().err
    assert train_main(args) == 0
    final = tmp_path / "runs" / f"medmvl_finetune_{case}" / "final"
    model, processor = load_for_inference(final, "cpu", "float32")
    assert processor.options == ProcessorOptions.from_dir(folder)
    assert (
        processor.tokenizer.chat_template
        == load_for_inference(folder, "cpu")[1].tokenizer.chat_template
    )
    penalty = golden["llm_generation_config"]["repetition_penalty"]
    assert model.generation_config.repetition_penalty == penalty  # still MedM-VL's decoding
    prompt, _ = _prompt(case, model, processor, releases)
    (row,) = generate(model, processor.tokenizer, [prompt], Sampling(4))
    assert row.tokens  # the fine-tuned folder answers


# ---- refusals ---------------------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, releases) -> Path:
    """A copy of the fixtures (release folders beside their component folders)."""
    for name in (CASES["2d"]["release"], CASES["ct"]["release"], "Qwen", "google"):
        shutil.copytree(releases / name, tmp_path / name)
    return tmp_path


def _refused(capsys, tmp_path: Path, release: Path, *extra: str) -> str:
    out = tmp_path / "out"
    assert import_main(["medm-vl", str(release), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnivmed-import: error: ") and "\n" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "no partial folder left"
    return err


def test_refuses_another_family(capsys, workspace):
    err = _refused(capsys, workspace, workspace / "Qwen" / "Qwen2.5-3B-Instruct")
    assert "not a MedM-VL release" in err and "Qwen2ForCausalLM" in err


def test_refuses_the_later_config_format(capsys, workspace):
    release = workspace / CASES["2d"]["release"]
    config = json.loads((release / "config.json").read_text())
    config = {("lvlm_" + k if k.startswith("llm") else k): v for k, v in config.items()}
    (release / "config.json").write_text(json.dumps(config))
    assert "lvlm_" in _refused(capsys, workspace, release)


def test_refuses_a_truncated_shard(capsys, workspace):
    release = workspace / CASES["2d"]["release"]
    shard = release / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert shard.name in _refused(capsys, workspace, release)


def test_refuses_a_missing_shard(capsys, workspace):
    release = workspace / CASES["ct"]["release"]
    (release / "model-00001-of-00002.safetensors").unlink()
    err = _refused(capsys, workspace, release)
    assert "model-00001-of-00002.safetensors" in err and "missing" in err


def test_refuses_a_missing_component(capsys, workspace, tmp_path_factory):
    alone = tmp_path_factory.mktemp("alone")
    release = alone / CASES["2d"]["release"]
    shutil.copytree(workspace / CASES["2d"]["release"], release)
    err = _refused(capsys, alone, release)
    assert "Qwen/Qwen2.5-3B-Instruct" in err and "--llm" in err
    # ... and found again when pointed at.
    out = alone / "given"
    args = ["--llm", str(workspace / "Qwen" / "Qwen2.5-3B-Instruct"),
            "--encoder", str(workspace / "google" / "siglip-base-patch16-256-multilingual")]  # fmt: skip
    assert import_main(["medm-vl", str(release), "--out", str(out), *args]) == 0
    assert (out / "config.json").is_file()


def _edit_shard(release: Path, edit) -> None:
    shard = release / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = release / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))


def test_refuses_an_unknown_tensor(capsys, workspace):
    release = workspace / CASES["2d"]["release"]
    _edit_shard(release, lambda t: t.update({"connector_image.extra.weight": torch.zeros(2)}))
    assert "unknown tensor connector_image.extra.weight" in _refused(capsys, workspace, release)


def test_refuses_nan_and_wrong_shapes(capsys, workspace):
    release = workspace / CASES["2d"]["release"]
    name = "connector_image.connector.0.bias"

    def poison(t):
        t[name] = t[name].clone()
        t[name][0] = float("nan")

    _edit_shard(release, poison)
    assert name in _refused(capsys, workspace, release)
    _edit_shard(release, lambda t: t.update({name: torch.zeros(5, dtype=torch.bfloat16)}))
    err = _refused(capsys, workspace, release)
    assert name in err and "shape" in err


def test_refuses_an_unknown_encoder(capsys, workspace):
    release = workspace / CASES["ct"]["release"]
    config = json.loads((release / "config.json").read_text())
    config["encoder_image_type"] = "clip"
    (release / "config.json").write_text(json.dumps(config))
    err = _refused(capsys, workspace, release)
    assert "encoder_image_type = 'clip'" in err


def test_refuses_a_link_out_of_the_release(capsys, workspace, tmp_path_factory):
    release = workspace / CASES["2d"]["release"]
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "shard.safetensors"
    shard = release / "model-00001-of-00002.safetensors"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    assert "outside the release folder" in _refused(capsys, workspace, release)


def test_refuses_an_existing_output(capsys, workspace):
    out = workspace / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = import_main(["medm-vl", str(workspace / CASES["2d"]["release"]), "--out", str(out)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
