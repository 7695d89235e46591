"""OmniVMedForConditionalGeneration: vision tower -> connector -> causal LM.

Visual inputs travel packed. For a batch holding I visual items (images, videos,
volumes), in the order their placeholders appear in the prompts:

- `pixel_values` `[L, P]`: the kept patches of every item the vision tower sees,
  concatenated; `visual_positions` `[L, 3]` their (t, h, w);
- `visual_cu_seqlens` int32 `[I+1]`: where each item's patches start in `pixel_values`
  (an item encoded by the 3D encoder has none);
- `visual_kinds` `[I]` (`VisualKind`) and `visual_grids` `[I, 3]` (frames, grid_h, grid_w
  before pruning);
- `volumes` `[V, C, D, H, W]`: the volumes of a strategy that takes whole volumes
  (`VolumeInput.VOLUME_3D`), in item order.

Each item becomes `visual_token_count(...)` LLM tokens, which replace as many
`config.image_token` placeholders, in order. The parts (vision encoder, volume strategy,
connector) are looked up by the config's names and asked what to do; see `parts.py`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import frame_cu_seqlens
from .configuration import OmniVMedConfig
from .kinds import VisualKind
from .llm_attention import default_llm_attention
from .loss import fused_cross_entropy_applies, fused_linear_cross_entropy
from .parts import ModelParts, VisionEncoder, VolumeInput, VolumeItem, VolumeStrategy


class OmniVMedPreTrainedModel(PreTrainedModel):
    config_class = OmniVMedConfig
    base_model_prefix = "omnivmed"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["VisionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class OmniVMedForConditionalGeneration(OmniVMedPreTrainedModel, GenerationMixin):
    def __init__(self, config: OmniVMedConfig) -> None:
        super().__init__(config)
        parts = ModelParts.of(config)  # checked when the config was built
        self.vision_tower: VisionEncoder = parts.encoder(config.vision_config)
        self.connector = parts.connector(config)
        # The strategy lives under the name it declares (its state-dict prefix, and the
        # name stage configs train it by).
        self._volume_module = parts.volume.module_name
        self.add_module(self._volume_module, parts.volume(config))
        self.language_model = AutoModelForCausalLM.from_config(
            config.text_config, attn_implementation=default_llm_attention()
        )
        self.post_init()

    # ---- embeddings: the LLM's ---------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def volume_strategy(self) -> VolumeStrategy:
        return self._modules[self._volume_module]

    # ---- visual encoding ---------------------------------------------------------------
    def encode_visual(
        self,
        pixel_values: torch.Tensor | None,
        visual_positions: torch.Tensor | None,
        visual_cu_seqlens: torch.Tensor,
        visual_kinds: torch.Tensor,
        visual_grids: torch.Tensor,
        volumes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM-space tokens `[T, text_hidden]` of every visual item, in item order."""
        kinds = [VisualKind(int(k)) for k in visual_kinds.tolist()]
        grids = visual_grids.tolist()
        bounds = visual_cu_seqlens.tolist()
        if len(bounds) != len(kinds) + 1 or len(grids) != len(kinds):
            raise ValueError(
                f"visual inputs disagree: {len(kinds)} kinds, {len(grids)} grids, "
                f"{len(bounds) - 1} items in visual_cu_seqlens"
            )
        strategy = self.volume_strategy
        takes_volumes = strategy.input == VolumeInput.VOLUME_3D

        tower_out = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            cu = visual_cu_seqlens.to(pixel_values.device)
            if strategy.encodes_slices_separately and VisualKind.VOLUME in kinds:
                cu = _split_volume_items_into_slices(visual_positions, cu, kinds)
            tower_out = self.vision_tower(pixel_values, visual_positions, cu)

        features, positions = [], []
        volume_index = 0
        for i, kind in enumerate(kinds):
            a, b = bounds[i], bounds[i + 1]
            frames, grid_h, grid_w = grids[i]
            if kind == VisualKind.VOLUME and takes_volumes:
                if volumes is None or volume_index >= volumes.shape[0]:
                    raise ValueError(
                        f"volume_strategy {self.config.volume_strategy!r} needs one `volumes` "
                        f"entry per volume item; volume item {volume_index} has none"
                    )
                item = VolumeItem(frames, grid_h, grid_w, volume=volumes[volume_index])
                volume_index += 1
                feats, pos = strategy.encode(item)
            elif tower_out is None or b <= a:
                raise ValueError(
                    f"visual item {i} ({kind.name.lower()}) has no patches in pixel_values"
                )
            elif kind == VisualKind.VOLUME:
                item = VolumeItem(frames, grid_h, grid_w, tower_out[a:b], visual_positions[a:b])
                feats, pos = strategy.encode(item)
            else:
                feats, pos = tower_out[a:b], visual_positions[a:b]
            features.append(feats)
            positions.append(pos.to(feats.device))
        lengths = torch.tensor([f.shape[0] for f in features], device=features[0].device)
        cu = torch.zeros(len(features) + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        tokens, _ = self.connector(torch.cat(features), torch.cat(positions), cu)
        return tokens

    # ---- forward -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_positions: torch.Tensor | None = None,
        visual_cu_seqlens: torch.Tensor | None = None,
        visual_kinds: torch.Tensor | None = None,
        visual_grids: torch.Tensor | None = None,
        volumes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        # Newer transformers hand the KV cache over as `cache` (`past_key_values` is its
        # older name): it is passed on under the name it came with, and only when given, so
        # the LLM never sees both.
        kv_cache = kwargs.get("cache", past_key_values)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_visual(
                input_ids, pixel_values, visual_positions, visual_cu_seqlens, visual_kinds,
                visual_grids, volumes, prefill=_is_prefill(kv_cache),
            )  # fmt: skip
        if (
            labels is not None
            and kv_cache is None
            and fused_cross_entropy_applies(inputs_embeds.device)
        ):
            return self._forward_fused_loss(
                inputs_embeds, attention_mask, position_ids, labels, **kwargs
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _forward_fused_loss(
        self, inputs_embeds, attention_mask, position_ids, labels, **kwargs
    ) -> CausalLMOutputWithPast:
        """The LLM's body, then the loss straight from its last hidden states and the
        output embedding (see `loss.py`): no logits are returned."""
        body = self.language_model.get_decoder()
        out = body(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False, **kwargs)  # fmt: skip
        weight = self.language_model.get_output_embeddings().weight
        loss = fused_linear_cross_entropy(out.last_hidden_state, weight, labels)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def embed_with_visual(
        self, input_ids, pixel_values, visual_positions, visual_cu_seqlens, visual_kinds,
        visual_grids, volumes=None, prefill: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """Token embeddings of `input_ids` with every placeholder replaced, in order, by
        the visual tokens. Decode steps (no placeholders, a filled cache) skip the vision
        side."""
        embeds = self.get_input_embeddings()(input_ids)
        has_visual = pixel_values is not None or volumes is not None
        placeholder = input_ids == self.config.image_token_id
        count = int(placeholder.sum())
        if not prefill and count == 0:
            return embeds
        if not has_visual:
            if count and prefill:
                raise ValueError(
                    f"the prompt has {count} image placeholder tokens but no visual inputs were given"
                )
            return embeds
        if visual_cu_seqlens is None or visual_kinds is None or visual_grids is None:
            raise ValueError("visual inputs need visual_cu_seqlens, visual_kinds and visual_grids")
        visual = self.encode_visual(
            pixel_values, visual_positions, visual_cu_seqlens, visual_kinds, visual_grids, volumes
        )
        if visual.shape[0] != count:
            raise ValueError(
                f"the prompt has {count} image placeholder tokens but the visual inputs give "
                f"{visual.shape[0]} visual tokens"
            )
        return embeds.masked_scatter(placeholder.unsqueeze(-1), visual.to(embeds.dtype))


def _is_prefill(past_key_values) -> bool:
    if past_key_values is None:
        return True
    get_length = getattr(past_key_values, "get_seq_length", None)
    return get_length is None or get_length() == 0


def _split_volume_items_into_slices(positions, cu_seqlens, kinds) -> torch.Tensor:
    """Item boundaries where every volume item is cut at its slice boundaries (a
    strategy that encodes slices separately: each slice attends only within itself)."""
    per_frame = frame_cu_seqlens(positions, cu_seqlens).tolist()
    bounds = cu_seqlens.tolist()
    out = [0]
    for i, kind in enumerate(kinds):
        a, b = bounds[i], bounds[i + 1]
        if kind == VisualKind.VOLUME:
            out += [x for x in per_frame if a < x <= b]
        elif b > a:
            out.append(b)
    return torch.tensor(out, dtype=torch.int32, device=cu_seqlens.device)
