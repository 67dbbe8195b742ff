"""P-Tuning v2: deep prompts - trainable key/value prefixes in every layer, without reparametrisation.

Source: Liu et al., "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally
Across Scales and Tasks", arXiv:2110.07602, section 3.2 ("Deep Prompt Tuning"): continuous prompts
are added as prefix tokens in every layer, not only at the input, which gives more tunable
parameters and a more direct effect on the prediction. Section 3.3 ("Optimization and
Implementation"): the reparametrisation encoder of prefix tuning / P-Tuning is dropped (its use
is task- and dataset-dependent), and a randomly initialised classification head on ``[CLS]``
replaces the verbaliser - which is what autopeft's sequence-classification head is.

In each selected layer ``l`` the self-attention reads (He et al., arXiv:2110.04366, eq. 5)::

    head = Attn(x W_q, [P_k^l ; x W_k], [P_v^l ; x W_v])

with ``P_k^l, P_v^l`` (P, d) taken straight from a trained table (P, L * 2 * d): the building block
is :func:`autopeft.methods.prefix_tuning.attach_prefixes` with ``projection=False``, in the layout
of peft's ``PrefixEncoder`` with ``prefix_projection=False``. Shapes: each layer receives
``(B, heads, P, d / heads)`` keys and values; the attention mask is extended so every query sees
every prefix slot.

Prompt length (paper, section 3.3, "Prompt Length"; per-task values in its appendix): the best
length differs per task - simple classification tasks prefer short prompts (less than 20 tokens),
hard sequence-labelling tasks long ones (around 100). The default of 16 follows that guidance for
GLUE-style classification (SST-2, MRPC, RTE, ...); use about 100 for extraction / sequence-labelling
style tasks, and treat it as a hyperparameter to search.

``prefix_dropout`` (default 0.1) is dropout on the prefix table at every training step, as in the
authors' code (they apply the backbone's ``hidden_dropout_prob`` to ``past_key_values``).

Trainable parameters: ``P * L_sel * 2 * d`` for ``L_sel`` selected layers (+ ``L_sel (d + 1)`` gated).
"""

from __future__ import annotations

from pydantic import Field

from autopeft.methods.base import MethodConfig, register
from autopeft.methods.prefix_tuning import PREFIX_PEFT, WHY_PREFIX_NOT_MERGED, attach_prefixes


class PTuningV2Config(MethodConfig):
    """``num_virtual_tokens`` is the per-layer prompt length P; ``layers`` selects the layers (default all)."""

    method: str = "p_tuning_v2"
    num_virtual_tokens: int = Field(
        16, ge=1, description="prompt length per layer (paper: <20 for classification, ~100 for labelling)")
    prefix_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the prompt table during training")


@register("p_tuning_v2", PTuningV2Config, paper="arXiv:2110.07602", peft=PREFIX_PEFT, needs=("prefix",),
          why_not_merge=WHY_PREFIX_NOT_MERGED)
def apply_p_tuning_v2(model, cfg: PTuningV2Config) -> None:
    """Prepend a trained (P, d) key and value prompt in every selected layer's self-attention.

    Raises:
        CompositionError: a selected layer already has a prefix (prefix_tuning, mam, unipelt), or
            ``layers`` names a layer the backbone lacks.
    """
    attach_prefixes(model, cfg, projection=False, name=f"p_tuning_v2_{len(model.components)}")
