"""Builds the demo dataset from files inside installed packages (no download):

- the MNI152 T1 brain MRI template (nilearn), as a volume and as 2D slices;
- a CT slice (pydicom's CT_small.dcm), as a short DICOM series and as a 2D image;
- a fundus photograph (scikit-image's retina) and a pathology slide (its
  immunohistochemistry image);
- endoscopy-style videos generated here (a pink mucosa with a moving dark polyp).

Questions and answers are templated per modality. Three files are written, one per
training stage: stage1.json (2D captions), stage2.json (2D instructions) and
stage3.json (images, volumes and videos).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

from ..models.kinds import VisualKind
from ..processing.options import ProcessorOptions

# Small frames and few slices, so the demo trains in a minute or two on a CPU; stage 3
# prunes, as in the paper. The final questions read the exported model's copy of these.
_DEMO_MEDIA = dict(max_pixels=112 * 112, min_pixels=32 * 32, max_slices=16, video_fps=4.0)
DEMO_MEDIA_SETTINGS = {
    1: ProcessorOptions(**_DEMO_MEDIA, prune=False),
    2: ProcessorOptions(**_DEMO_MEDIA, prune=False),
    3: ProcessorOptions(**_DEMO_MEDIA, prune=True, prune_threshold=0.1),
}

FACTS = {
    "fundus": ("a color fundus photograph of the retina", "the retina and optic disc"),
    "pathology": (
        "a histopathology slide with immunohistochemical staining",
        "tissue with brown-stained cells",
    ),
    "ct": ("a computed tomography (CT) image", "a cross-section of the body"),
    "mri": ("a T1-weighted brain MRI", "the brain"),
    "mri_volume": ("a T1-weighted brain MRI volume", "the brain"),
    "ct_volume": ("a CT volume", "a stack of axial slices of the body"),
    "endoscopy": ("an endoscopy video", "a polyp on the mucosa"),
}
CAPTION_QUESTIONS = ["Describe the image briefly.", "What does this image show?"]
MODALITY_QUESTIONS = ["What is the imaging modality?", "Which kind of scan is this?"]
ORGAN_QUESTIONS = ["What is shown?", "Which structure is visible?"]


def _source_files():
    import nilearn.datasets
    from pydicom.data import get_testdata_file

    mni = (
        Path(nilearn.datasets.__file__).parent
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    return mni, Path(get_testdata_file("CT_small.dcm"))


def _write_images(media: Path, mni: Path, ct: Path) -> dict[str, list[str]]:
    import nibabel as nib
    import pydicom
    from PIL import Image
    from skimage import data as skdata

    from ..processing.intensity import normalize_percentile, window_ct

    out: dict[str, list[str]] = {"fundus": [], "pathology": [], "ct": [], "mri": []}
    Image.fromarray(skdata.retina()).resize((224, 224)).save(media / "fundus.png")
    out["fundus"].append("fundus.png")
    Image.fromarray(skdata.immunohistochemistry()).resize((224, 224)).save(media / "pathology.jpg")
    out["pathology"].append("pathology.jpg")
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for name, window in (("ct_soft.png", "mediastinum"), ("ct_lung.png", "lung")):
        Image.fromarray((window_ct(hu, window) * 255).astype(np.uint8)).save(media / name)
        out["ct"].append(name)
    volume = np.asarray(nib.as_closest_canonical(nib.load(str(mni))).get_fdata(dtype=np.float32))
    for z in (70, 90, 110):
        sl = normalize_percentile(volume[:, :, z].T[::-1])
        Image.fromarray((sl * 255).astype(np.uint8)).save(media / f"mri_{z}.png")
        out["mri"].append(f"mri_{z}.png")
    return out


def _write_ct_series(folder: Path, ct: Path, slices: int = 6) -> None:
    import pydicom

    folder.mkdir(exist_ok=True)
    for i in range(slices):
        ds = pydicom.dcmread(ct)
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.InstanceNumber = i + 1
        arr = np.roll(ds.pixel_array, i * 2, axis=0)  # neighbouring slices differ a little
        ds.PixelData = arr.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice{i:02d}.dcm")


def _write_video(path: Path, seed: int, frames: int = 24, size: int = 112) -> None:
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = np.stack(
        [np.full((size, size), 200), np.full((size, size), 110), np.full((size, size), 120)], -1
    )
    base = (base + rng.normal(0, 6, base.shape)).clip(0, 255)
    cx, cy, r = rng.uniform(30, 80), rng.uniform(30, 80), rng.uniform(8, 14)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            frame = base.copy()
            mask = (xx - cx - 0.6 * k) ** 2 + (yy - cy) ** 2 < r**2
            frame[mask] = (90, 40, 50)
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24"))
            )
        container.mux(stream.encode())


def _conv(marker: str, question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"{marker}\n{question}"}, {"from": "gpt", "value": answer}]


def build_demo_dataset(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write media and stage1/2/3 JSON files under `root`; returns the JSON paths and the
    media used for the final questions."""
    root = Path(root)
    media = root / "media"
    if media.exists():
        shutil.rmtree(media)
    media.mkdir(parents=True)
    rng = random.Random(seed)
    mni, ct = _source_files()
    images = _write_images(media, mni, ct)
    shutil.copy(mni, media / "mni_t1.nii.gz")
    _write_ct_series(media / "ct_series", ct)
    videos = []
    for i in range(3):
        _write_video(media / f"endoscopy_{i}.mp4", seed + i)
        videos.append(f"endoscopy_{i}.mp4")

    stage1, stage2, stage3 = [], [], []
    for kind, files in images.items():
        what, organ = FACTS[kind]
        for f in files:
            for q in CAPTION_QUESTIONS:
                stage1.append({"id": f"s1-{f}-{len(stage1)}", "image": f"media/{f}",
                               "conversations": _conv(VisualKind.IMAGE.marker, q, f"This is {what} showing {organ}.")})  # fmt: skip
            for q in MODALITY_QUESTIONS:
                stage2.append({"id": f"s2-{f}-{len(stage2)}", "image": f"media/{f}",
                               "conversations": _conv(VisualKind.IMAGE.marker, q, f"It is {what}.")})  # fmt: skip
            q = rng.choice(ORGAN_QUESTIONS)
            stage2.append({"id": f"s2-{f}-{len(stage2)}", "image": f"media/{f}",
                           "conversations": _conv(VisualKind.IMAGE.marker, q, f"It shows {organ}.")})  # fmt: skip
    for q in MODALITY_QUESTIONS + ORGAN_QUESTIONS:
        what, organ = FACTS["mri_volume"]
        stage3.append({"id": f"s3-mri-{len(stage3)}", "volumes": ["media/mni_t1.nii.gz"],
                       "conversations": _conv(VisualKind.VOLUME.marker, q, f"This is {what}; it shows {organ}.")})  # fmt: skip
        what, organ = FACTS["ct_volume"]
        stage3.append({"id": f"s3-ct-{len(stage3)}", "volumes": [{"path": "media/ct_series", "ct_window": "mediastinum"}],
                       "conversations": _conv(VisualKind.VOLUME.marker, q, f"This is {what}; it shows {organ}.")})  # fmt: skip
        for v in videos:
            what, organ = FACTS["endoscopy"]
            stage3.append({"id": f"s3-{v}-{len(stage3)}", "videos": [f"media/{v}"],
                           "conversations": _conv(VisualKind.VIDEO.marker, q, f"This is {what}; it shows {organ}.")})  # fmt: skip
    stage3 += rng.sample(stage2, k=min(len(stage2), len(stage3) // 2))  # keep 2D skills
    paths = {}
    for name, records in (("stage1", stage1), ("stage2", stage2), ("stage3", stage3)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(records, indent=1))
    paths["image"] = media / "fundus.png"
    paths["volume"] = media / "mni_t1.nii.gz"
    paths["video"] = media / "endoscopy_0.mp4"
    return paths
