"""BitFit: train only (a subset of) the backbone's bias terms.

Source: Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", arXiv:2106.10199, section 2: of ``h = W x + b`` only ``b`` is trained; the
paper's reduced variant trains the query bias and the FFN-intermediate bias (``b_q``, ``b_m2``).

Bias groups (``biases``):

* ``all`` (default, the paper's full BitFit and peft's ``bias="all"``): every bias of the backbone
  except the task head's - the encoder layers' (below) plus the model-level ones: the embedding
  LayerNorm's, the pooler's (BERT), ELECTRA's embedding projection, ... BERT-base:
  ``L (4 d + d_ff + d + 2 d) + d + d`` = 101,376 + 1,536 = 102,912.
* ``encoder``: the biases of the encoder layers only: per layer query, key, value,
  attention_output, ffn_in, ffn_out and the two LayerNorms (BERT-base: ``L (7 d + d_ff)`` = 101,376).
* a list of group names: any of those eight per-layer names, plus ``embeddings`` (the
  embedding-side biases) and ``pooler`` (the pooler's); e.g. the paper's reduced ``[query, ffn_in]``.

``layers`` selects the encoder layers of the per-layer groups; the model-level biases belong to no
layer and are trained whenever ``all`` (or their name) is chosen. Trainable parameters: the sum of
the chosen bias sizes.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from autopeft.backbones.arch import ALL_TARGETS, canonical_target
from autopeft.methods.base import MethodConfig, PeftMapping, PeftTarget, register
from autopeft.errors import CompositionError

#: Bias groups beyond the Linear targets: the LayerNorm biases of each layer (the family table's
#: ``attention`` / ``ffn`` sublayer norms).
_LAYERNORM_BIASES = {"attention_layernorm": "attention", "ffn_layernorm": "ffn"}
#: Per-layer bias groups (the ``encoder`` subset); a family uses those it has.
LAYER_BIASES = tuple(ALL_TARGETS) + tuple(_LAYERNORM_BIASES)
#: Model-level bias groups (outside the encoder layers, head excluded).
MODEL_BIASES = ("embeddings", "pooler")
#: Named subsets for ``biases``.
BIAS_SUBSETS = ("all", "encoder")


class BitFitConfig(MethodConfig):
    """Which biases to train: ``all`` (every bias of the backbone but the head's), ``encoder`` (every
    bias in the encoder layers), or a list of names from query, key, value, attention_output, ffn_in,
    ffn_out, attention_layernorm, ffn_layernorm, embeddings, pooler (see the module docstring)."""

    method: str = "bitfit"
    biases: list[str] | str = Field("all")

    @field_validator("biases")
    @classmethod
    def _names(cls, v):
        if isinstance(v, str):
            if v not in BIAS_SUBSETS:
                raise ValueError(f"biases must be one of {', '.join(BIAS_SUBSETS)} or a non-empty list of "
                                 f"{', '.join(LAYER_BIASES + MODEL_BIASES)}; got {v!r}")
            return v
        if not v:
            raise ValueError("biases must be 'all', 'encoder' or a non-empty list")
        out = []
        for name in v:
            out.append(name if name in _LAYERNORM_BIASES or name in MODEL_BIASES else canonical_target(name))
        return out


def model_level_biases(model) -> dict[str, list[tuple[str, object]]]:
    """The backbone's biases outside the encoder layers and the head, by group, as ``(name, param)``.

    Group: ``embeddings`` for names starting with ``embeddings`` below the base model (the embedding
    LayerNorm, ELECTRA's ``embeddings_project``), ``pooler`` for the pooler, else the first name part.
    """
    backbone = model.backbone
    in_layers = {id(p) for p in model.encoder.layers.parameters()}
    prefix = getattr(backbone, "base_model_prefix", "") + "."
    out: dict[str, list[tuple[str, object]]] = {}
    for name, p in backbone.named_parameters():
        if not name.endswith("bias") or model.is_head_parameter(f"backbone.{name}") or id(p) in in_layers:
            continue
        rel = name[len(prefix):] if name.startswith(prefix) else name
        group = "pooler" if rel.startswith("pooler") else "embeddings" if rel.startswith("embeddings") else rel.split(".")[0]
        out.setdefault(group, []).append((name, p))
    return out


def bitfit_peft(cfg: BitFitConfig, target: PeftTarget) -> tuple:
    """BitFit alone: ``bias="all"`` riding on a rank-1 peft LoRA of one matrix whose ``B`` is zero (no
    update). Beside LoRA / AdaLoRA it rides on their config instead (``PeftMapping.bias_only``)."""
    import peft
    import torch
    from torch import nn

    model = target.model
    first = next(n for n, m in model.backbone.named_modules()
                 if isinstance(m, nn.Linear) and not model.is_head_parameter(f"backbone.{n}.weight"))
    pc = peft.LoraConfig(task_type="SEQ_CLS", r=1, lora_alpha=1, target_modules=[target.path_of(
        model.backbone.get_submodule(first))], bias=target.bias)

    def fill(pm) -> None:
        from peft.tuners.lora import LoraLayer

        for _, layer in pm.named_modules():
            if isinstance(layer, LoraLayer):
                torch.nn.init.zeros_(layer.lora_B["default"].weight)
    return pc, fill, []


@register("bitfit", BitFitConfig, paper="arXiv:2106.10199", merges=True, needs=("bias",),
          peft=PeftMapping(bitfit_peft, bias_only=True, label="BitFit"))
def apply_bitfit(model, cfg: BitFitConfig) -> None:
    """Unfreeze the chosen bias vectors: per-layer groups in the selected layers, model-level ones once.

    Raises:
        CompositionError: another component claims one of the biases, or a listed model-level group
            (``embeddings``, ``pooler``) does not exist in this backbone (e.g. RoBERTa has no pooler).
    """
    fam = model.family
    if cfg.biases in BIAS_SUBSETS:
        names = [n for n in LAYER_BIASES if n in fam.linear or n in _LAYERNORM_BIASES]
    else:
        names = [n for n in cfg.biases if n in LAYER_BIASES]
    groups = model_level_biases(model)
    if cfg.biases == "all":
        chosen = [bias for group in groups.values() for bias in group]
    else:
        wanted = [] if cfg.biases == "encoder" else [n for n in cfg.biases if n in MODEL_BIASES]
        missing = [g for g in wanted if g not in groups]
        if missing:
            raise CompositionError(f"bitfit: this backbone has no {missing[0]} biases; "
                                   f"its model-level groups: {', '.join(groups) or 'none'}")
        chosen = [bias for g in wanted for bias in groups[g]]
    unfrozen = 0
    for name, p in chosen:
        model.claim(("bias", name))
        p.requires_grad_(True)
        unfrozen += 1
    for layer in model.layers_of(cfg):
        for name in names:
            if name in _LAYERNORM_BIASES:
                module = model.sublayer_norm(layer, _LAYERNORM_BIASES[name])
                slot = name
            else:
                try:
                    slot = fam.target(name)
                except ValueError as exc:
                    raise CompositionError(f"bitfit: {exc}") from None
                module = model.encoder.get(layer, fam.linear[slot])
            module = getattr(module, "base_layer", module)  # a LoRA wrapper keeps the Linear inside
            if getattr(module, "bias", None) is None:
                if cfg.biases in BIAS_SUBSETS:
                    continue  # this family has no such bias (Llama's RMSNorm, bias-free projections)
                raise CompositionError(f"bitfit: the {name} of this {fam.name} backbone has no bias")
            model.claim(("bias", layer, slot))
            module.bias.requires_grad_(True)
            unfrozen += 1
    if not unfrozen:
        raise CompositionError(f"bitfit: this {fam.name} backbone has no bias terms to train")
