"""The head input a backbone class lacks (``pooling: mean``, or ``cls`` under a bare Linear head),
shipped as code beside a merged export so transformers runs autopeft's head with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn


#: The file in which a merged export ships a head input its backbone's class lacks (``pooling: mean``,
#: or ``cls`` under a bare Linear head); transformers runs it with ``trust_remote_code=True``.
POOLING_CODE_FILE = "modeling_autopeft.py"
#: ``model_type`` prefix of such a folder: transformers knows no such type, so loading it without
#: ``trust_remote_code=True`` is an error, never the backbone's own head giving other logits.
POOLED_MODEL_TYPE_PREFIX = "autopeft_pooled_"

_POOLING_CODE = '''"""{model_class}: transformers' {base_class} whose task head reads {what}
(autopeft's ``pooling: {pooling}``). Written by ``autopeft export --merge``.

The weights are those of a plain {base_class} (same names, same shapes); only the head's input
differs, so this file and ``trust_remote_code=True`` are needed to get autopeft's logits:

    AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base_class}, {config_base}
from transformers.modeling_outputs import SequenceClassifierOutput


class {config_class}({config_base}):
    model_type = "{model_type}"

    def __init__(self, autopeft_pooling="{pooling}", **kwargs):
        super().__init__(**kwargs)
        self.autopeft_pooling = autopeft_pooling


class {model_class}({base_class}):
    config_class = {config_class}

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        """input_ids, attention_mask, token_type_ids: (B, T); labels: (B,). Returns logits (B, num_labels)."""
        kwargs.pop("return_dict", None)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        hidden = out.last_hidden_state  # (B, T, d)
        if self.config.autopeft_pooling == "cls":
            pooled = hidden[:, 0]  # (B, d)
        else:  # mean over the real tokens
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
        dropout = getattr(self, "dropout", None)
        head = getattr(self, "classifier", None) or getattr(self, "score")
        if getattr(self, "pre_classifier", None) is not None:  # DistilBERT
            pooled = F.relu(self.pre_classifier(pooled))
        elif self.config.model_type.endswith("deberta-v2") and getattr(self, "pooler", None) is not None:
            pooled = self.pooler(pooled[:, None, :])
        if isinstance(head, nn.Linear):  # BERT-style: dropout + Linear on the pooled vector
            logits = head(dropout(pooled) if isinstance(dropout, nn.Module) else pooled)
        else:  # RoBERTa/ELECTRA-style heads read features[:, 0, :]
            logits = head(pooled[:, None, :])
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)
'''


def write_pooling_code(backbone: nn.Module, pooling: str, out: Path) -> str:
    """Make the merged folder ``out`` run autopeft's head input ``pooling`` (``mean`` or ``cls``).

    Writes :data:`POOLING_CODE_FILE` (a subclass of the backbone's ``*ForSequenceClassification`` and of
    its config class whose forward pools as :meth:`autopeft.composition.model.ComposedModel.forward` does, the head
    modules run in the same order as :meth:`autopeft.composition.model.ComposedModel._head`) and points ``config.json``
    at it: ``model_type`` becomes ``autopeft_pooled_<type>`` (unknown to transformers, so loading without
    ``trust_remote_code=True`` fails instead of silently running the backbone's own head), ``auto_map``
    names the two classes, ``autopeft_pooling`` the pooling. The weights are unchanged.

    Returns:
        A note for the model card.
    """
    base_class, config_base = type(backbone).__name__, type(backbone.config).__name__
    model_type = POOLED_MODEL_TYPE_PREFIX + str(backbone.config.model_type)
    stem = "AutopeftPooled"
    names = {"base_class": base_class, "config_base": config_base, "pooling": pooling, "model_type": model_type,
             "model_class": stem + base_class, "config_class": stem + config_base,
             "what": "the masked mean of the last hidden states" if pooling == "mean"
             else "the first token's last hidden state"}
    (out / POOLING_CODE_FILE).write_text(_POOLING_CODE.format(**names))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    module = POOLING_CODE_FILE.removesuffix(".py")
    cfg.update(model_type=model_type, autopeft_pooling=pooling, architectures=[names["model_class"]],
               auto_map={"AutoConfig": f"{module}.{names['config_class']}",
                         "AutoModelForSequenceClassification": f"{module}.{names['model_class']}"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return (f"The head reads {names['what']} (pooling: {pooling}), which {base_class} lacks: it is shipped as code "
            f"in {POOLING_CODE_FILE}; load with trust_remote_code=True.")
