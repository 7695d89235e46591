"""Loading a SigLIP checkpoint directory into a `SiglipTower`."""

from __future__ import annotations

import logging
from pathlib import Path

from ..weights import read_state_dict
from .siglip_tower import SiglipTower

logger = logging.getLogger(__name__)

_VISION_ROOTS = ("embeddings", "encoder", "post_layernorm", "head")


def load_siglip_weights(tower: SiglipTower, checkpoint_dir: str | Path) -> dict[str, list[str]]:
    """Load a SigLIP checkpoint directory (a `SiglipVisionModel` or a full `SiglipModel`
    saved with transformers) into the tower.

    Every vision weight loads; the learned position embedding only into a tower that has
    one (a rotary tower reports it as skipped). The attention-pooling head and the text
    tower are reported as skipped. Returns {"loaded", "skipped", "missing"} key lists and
    logs them; a shape that differs from the tower's is an error naming both.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"SigLIP checkpoint directory {path} does not exist")
    state = read_state_dict(path)
    has_text_tower = any(k.startswith("text_model.") or ".text_model." in k for k in state)
    ours = tower.state_dict()
    loaded, skipped, new_state = [], [], {}
    for key, value in state.items():
        if "vision_model." in key:  # a full SiglipModel, or a checkpoint saved with a prefix
            name = key.split("vision_model.", 1)[1]
        elif key.split(".", 1)[0] in _VISION_ROOTS and not has_text_tower:  # a SiglipVisionModel
            name = key
        else:
            skipped.append(key)
            continue
        if name.startswith("embeddings.patch_embedding."):
            target = name.replace("embeddings.patch_embedding.", "patch_embedding.")
            if target.endswith("weight") and value.dim() == 4:
                value = value.reshape(value.shape[0], -1)  # conv [out, C, ps, ps] -> linear
        elif name.startswith("embeddings.position_embedding."):
            target = name.replace("embeddings.", "")
        elif name.startswith("encoder.layers."):
            target = name.replace("encoder.layers.", "layers.")
        elif name.startswith("post_layernorm."):
            target = name
        else:  # pooling head
            skipped.append(key)
            continue
        if target not in ours:
            skipped.append(key)
            continue
        if ours[target].shape != value.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but the tower's {target} is "
                f"{tuple(ours[target].shape)}; is the vision config the checkpoint's?"
            )
        new_state[target] = value
        loaded.append(target)
    missing = sorted(set(ours) - set(new_state))
    if missing:
        raise ValueError(
            f"{path}: the checkpoint lacks vision weights {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    tower.load_state_dict(new_state)
    logger.info(
        "loaded %d SigLIP weights from %s; skipped %d: %s", len(loaded), path, len(skipped), skipped
    )
    return {"loaded": loaded, "skipped": skipped, "missing": missing}
