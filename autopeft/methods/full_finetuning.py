"""Full fine-tuning: every backbone parameter trains. The baseline the PEFT methods are measured against.

Not a PEFT method (Devlin et al., BERT, arXiv:1810.04805, section 4 fine-tunes all parameters); it
is here so a recipe, a search or a benchmark can put the baseline side by side with the methods.
It claims every slot, so it combines with nothing else. Trainable parameters: all of the backbone.
"""

from __future__ import annotations

from autopeft.methods.base import MethodConfig, register


class FullFineTuningConfig(MethodConfig):
    """No hyperparameters: every parameter of the backbone trains."""

    method: str = "full_finetuning"


@register("full_finetuning", FullFineTuningConfig, paper="arXiv:1810.04805", merges=True, is_peft=False,
          why_not_peft="full fine-tuning changes the backbone's weights, not an adapter")
def apply_full_finetuning(model, cfg: FullFineTuningConfig) -> None:
    """Unfreeze the whole backbone."""
    for layer in range(model.encoder.num_layers):
        for target in model.family.linear:
            model.claim(("linear", layer, target))
        model.claim(("prefix", layer))
    for p in model.backbone.parameters():
        p.requires_grad_(True)
