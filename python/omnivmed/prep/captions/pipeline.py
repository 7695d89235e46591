"""The caption pipeline: for each clip, K candidates from the generator, every candidate
scored by every judge, the best kept when its mean score reaches the threshold.

Resumable: a clip is finished when its audit line (every candidate, every judge's scores
or failure, the decision) is written; a rerun skips finished clips, so a crash loses no
finished clip and repeats none. A judge reply that is not a valid score is retried, then
counted as that judge's failure on that candidate, never guessed. Kept captions become
instruction records (the clip's frames as a video) in `captions.jsonl`.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ...data.files import UnsafePathError, output_folder, regular_file
from ...models.kinds import VisualKind
from .backends import (
    CRITERIA,
    GENERATE_PROMPT,
    JUDGE_PROMPT,
    Backend,
    BackendError,
    Clip,
    InvalidJudgementError,
    parse_judgement,
)  # fmt: skip


@dataclass
class CaptionSettings:
    candidates: int = 4
    threshold: float = 4.0  # mean of every judge's three scores, 1-5
    temperature: float = 0.8
    judge_retries: int = 2  # re-asks after an invalid judge reply
    concurrency: int = 8

    def check(self) -> None:
        if self.candidates < 1 or self.concurrency < 1 or self.judge_retries < 0:
            raise ValueError("candidates and concurrency must be >= 1, judge_retries >= 0")
        if not 1.0 <= self.threshold <= 5.0:
            raise ValueError(f"threshold must be in [1, 5], got {self.threshold}")


def load_clips(path: Path, root: Path) -> list[Clip]:
    """JSONL lines {"id": ..., "video": a video file or a folder of frames, relative to root}."""
    clips, ids = [], set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            cid, video = str(row["id"]), (root / row["video"]).resolve()
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected {{'id': ..., 'video': ...}}") from None
        if cid in ids:
            raise ValueError(f"{path}:{number}: duplicate clip id {cid!r}")
        if not video.is_relative_to(root.resolve()) or not video.exists():
            raise ValueError(
                f"{path}:{number}: clip {cid!r}: {row['video']!r} is missing or outside {root}"
            )
        if video.is_dir() and not Clip(cid, video).frames():
            raise ValueError(
                f"{path}:{number}: clip {cid!r}: {row['video']!r} holds no frame images"
            )
        _check_clip_files(Clip(cid, video), root, f"{path}:{number}")
        ids.add(cid)
        clips.append(Clip(cid, video))
    return clips


def _check_clip_files(clip: Clip, root: Path, where: str) -> None:
    """Every file a backend will read and send (the video, or each frame of a folder): a
    regular file, and no link leading outside the root."""
    for file in clip.frames() if clip.path.is_dir() else [clip.path]:
        try:
            regular_file(root, file)
        except UnsafePathError as exc:
            raise ValueError(f"{where}: clip {clip.id!r}: {exc}") from None


def _judge(judge: Backend, clip: Clip, caption: str, retries: int) -> dict[str, Any]:
    replies = []
    for _ in range(retries + 1):
        try:
            reply = judge.complete(clip, JUDGE_PROMPT + caption, 0.0)
        except BackendError as exc:
            return {"judge": judge.name, "failed": str(exc), "replies": replies}
        replies.append(reply)
        try:
            return {"judge": judge.name, "scores": parse_judgement(reply), "replies": replies}
        except InvalidJudgementError as exc:
            last = str(exc)
    return {
        "judge": judge.name,
        "failed": f"invalid reply after {retries + 1} tries: {last}",
        "replies": replies,
    }


def caption_clip(
    clip: Clip, generator: Backend, judges: list[Backend], s: CaptionSettings
) -> dict[str, Any]:
    candidates = []
    for _ in range(s.candidates):
        try:
            text = generator.complete(clip, GENERATE_PROMPT, s.temperature).strip()
        except BackendError as exc:
            candidates.append({"caption": None, "failed": str(exc)})
            continue
        judgements = [_judge(j, clip, text, s.judge_retries) for j in judges] if text else []
        scores = [v for jd in judgements if "scores" in jd for v in jd["scores"].values()]
        # A candidate is scored only when every judge gave a valid score.
        complete = bool(text) and all("scores" in jd for jd in judgements)
        mean = sum(scores) / len(scores) if complete and scores else None
        candidates.append({"caption": text, "judgements": judgements, "mean": mean})
    scored = [c for c in candidates if c.get("mean") is not None]
    best = max(scored, key=lambda c: c["mean"], default=None)
    kept = best is not None and best["mean"] >= s.threshold
    return {"id": clip.id, "candidates": candidates, "kept": kept,
            "caption": best["caption"] if kept else None, "score": best["mean"] if best else None}  # fmt: skip


def run_captions(clips_file: str | Path, root: str | Path, generator: Backend, judges: list[Backend],
                 out_dir: str | Path, settings: CaptionSettings | None = None, progress: bool = True) -> dict:  # fmt: skip
    s = settings or CaptionSettings()
    s.check()
    if not judges:
        raise ValueError("at least one judge is needed")
    root, out_dir = Path(root), output_folder(out_dir)
    clips = load_clips(Path(clips_file), root)
    out_dir.mkdir(parents=True, exist_ok=True)
    audit_path, out_path = out_dir / "audit.jsonl", out_dir / "captions.jsonl"
    finished = set()
    if audit_path.is_file():
        data = audit_path.read_text(encoding="utf-8")
        complete = data[: data.rfind("\n") + 1]
        if len(complete) != len(data):
            audit_path.write_text(complete, encoding="utf-8")  # a line cut short by a crash
        finished = {json.loads(x)["id"] for x in complete.splitlines() if x.strip()}
        # captions.jsonl is rebuilt from the audit, so the two always agree
    todo = [c for c in clips if c.id not in finished]
    lock = threading.Lock()
    with audit_path.open("a", encoding="utf-8") as audit, ThreadPoolExecutor(s.concurrency) as pool:
        futures = [pool.submit(caption_clip, c, generator, judges, s) for c in todo]
        for f in tqdm(
            as_completed(futures), total=len(futures), desc="captions", disable=not progress
        ):
            row = f.result()
            with lock:
                audit.write(json.dumps(row, ensure_ascii=False) + "\n")
                audit.flush()
    rows = [json.loads(x) for x in audit_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    by_id = {c.id: c for c in clips}
    with (out_dir / "captions.jsonl.tmp").open("w", encoding="utf-8") as f:
        for row in rows:
            if row["kept"] and row["id"] in by_id:
                video = str(by_id[row["id"]].path.relative_to(root.resolve()))
                f.write(json.dumps({
                    "id": f"caption-{row['id']}", "videos": [video],
                    "conversations": [{"from": "human", "value": f"{VisualKind.VIDEO.marker}\n{GENERATE_PROMPT}"},
                                      {"from": "gpt", "value": row["caption"]}],
                    "caption_score": row["score"]}, ensure_ascii=False) + "\n")  # fmt: skip
    (out_dir / "captions.jsonl.tmp").replace(out_path)
    failures = sum(
        1 for r in rows for c in r["candidates"] for j in c.get("judgements", []) if "failed" in j
    )
    summary = {"clips": len(clips), "finished": len(rows), "kept": sum(r["kept"] for r in rows),
               "generator_failures": sum(1 for r in rows for c in r["candidates"] if "failed" in c),
               "judge_failures": failures, "threshold": s.threshold, "candidates": s.candidates,
               "criteria": list(CRITERIA), "output": str(out_path), "audit": str(audit_path)}  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
