"""AdaLoRA (arXiv:2303.10512): forward and rank allocation against Hugging Face peft, the cubic
budget schedule (eq. 12), the orthogonality penalty (eq. 4) and closed-form parameter counts."""

import math
from fractions import Fraction

import pytest
import torch

from conftest import TINY_BERT, tiny_inputs, tiny_recipe

from autopeft.methods.adalora import SVDLinear, adalora_modules, adalora_rank, rank_pattern
from autopeft.composition.recipe import RecipeError, build_model, count_recipe, recipe_from_dict


def _peft_twin(model, **adalora_kw):
    """A peft AdaLoRA model on the same tiny BERT with every tensor copied from ``model``."""
    peft = pytest.importorskip("peft")
    from autopeft.backbones import load_model

    hf = load_model(TINY_BERT, 2, seed=123)  # other seed: equality below comes from the copy
    cfg = peft.AdaLoraConfig(task_type="SEQ_CLS", **adalora_kw)
    twin = peft.get_peft_model(hf, cfg)
    ours = model.backbone.state_dict()
    copy, copied = {}, set()
    for name in twin.state_dict():
        if ".ranknum." in name:
            continue
        key = (name.removeprefix("base_model.model.").replace(".default", "")
               .replace("modules_to_save.", "").replace("original_module.", ""))
        copy[name] = ours[key]
        copied.add(key)
    result = twin.load_state_dict(copy, strict=False)
    assert all(".ranknum." in k for k in result.missing_keys) and not result.unexpected_keys
    ours_weights = {k for k in ours if not k.endswith(".rank_mask")}  # peft keeps no rank mask buffer
    assert copied == ours_weights, ours_weights - copied  # every tensor of ours has a counterpart
    return twin


def _randomise(model, std=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)


def test_forward_matches_peft_adalora():
    kw = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value", "ffn_out"], total_step=10)
    model = build_model(tiny_recipe([{"method": "adalora", **kw}]))
    _randomise(model)  # E starts at zero: random E, P, Q make the update matter
    twin = _peft_twin(model, **{**kw, "target_modules": r".*\.(query|value)|.*\.\d+\.output\.dense"})  # ffn_out only
    model.eval()
    twin.eval()
    ids, mask = tiny_inputs()
    ours = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    theirs = twin(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1], atol=1e-5, rtol=0)
    # the adapters change the function: the comparison above is not base-vs-base
    with torch.no_grad():
        for m in adalora_modules(model).values():
            m.lora_E.zero_()
    base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert (base.hidden_states[-1] - ours.hidden_states[-1]).abs().max() > 1e-2


def test_rank_allocation_matches_peft():
    """Same weights, same gradients: our step hook and peft's update_and_allocate keep the same triplets."""
    kw = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value"], total_step=6,
              tinit=1, tfinal=1, orth_reg_weight=0.0)
    model = build_model(tiny_recipe([{"method": "adalora", **kw}]))
    _randomise(model)
    twin = _peft_twin(model, **kw)
    model.train()
    twin.train()
    names = list(adalora_modules(model))
    module_names = {id(m): n for n, m in adalora_modules(model).items()}
    allocator = model._step_hooks[0].__self__  # the component's RankAllocator (its bound step hook)
    ranks = []
    for step in range(1, 8):
        ids, mask = tiny_inputs(batch=4, seed=step)
        labels = torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)  # same dropout masks in both models
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.manual_seed(step)
        twin(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)  # as in run_trial: gradients are gone before the step hook
        model.after_step(step)
        twin.base_model.update_and_allocate(step)
        twin.zero_grad(set_to_none=True)
        if step < kw["total_step"] - kw["tfinal"]:  # importance EMAs (eq. 8-9) and triplet scores (eq. 11)
            theirs = twin.base_model.rankallocator
            for i, m in enumerate(allocator.modules):
                prefix = module_names[id(m)].removeprefix("backbone.")
                for part in ("lora_A", "lora_E", "lora_B"):
                    key = f"{prefix}.{part}.default"
                    torch.testing.assert_close(allocator.ipt[(i, part)], theirs.exp_avg_ipt[key], rtol=1e-4, atol=1e-12)
                    torch.testing.assert_close(allocator.unc[(i, part)], theirs.exp_avg_unc[key], rtol=1e-4, atol=1e-12)
                peft_score = theirs._combine_ipt(
                    theirs._element_score(f"{prefix}.lora_E.default"),
                    torch.cat([theirs._element_score(f"{prefix}.lora_A.default").mean(dim=1, keepdim=True),
                               theirs._element_score(f"{prefix}.lora_B.default").mean(dim=0).view(-1, 1)], dim=1))
                torch.testing.assert_close(allocator.triplet_scores()[i], peft_score, rtol=1e-4, atol=1e-12)
        pattern = twin.peft_config["default"].rank_pattern
        ours = {n: m.rank_mask.tolist() for n, m in adalora_modules(model).items()}
        if step <= kw["tinit"]:
            assert pattern is None and all(all(v) for v in ours.values())
        else:
            theirs = {n: pattern[f"{n.removeprefix('backbone.')}.lora_E.default"] for n in names}
            assert ours == theirs, step
        for n, m in adalora_modules(model).items():
            peft_e = twin.get_parameter(f"base_model.model.{n.removeprefix('backbone.')}.lora_E.default")
            torch.testing.assert_close(m.lora_E, peft_e, atol=0, rtol=0)
        ranks.append(adalora_rank(model))
    # b0 = 16, bT = 8, T = 6, tinit = tfinal = 1: 16, floor(8 + 8 * 0.75^3) = 11, 9, floor(8.125) = 8, 8, 8, 8
    assert ranks == [16, 11, 9, 8, 8, 8, 8]


def _expected_budget(t, b0, bT, ti, tf, T):
    if t <= ti:
        return b0
    if t >= T - tf:
        return bT
    return math.floor(bT + (b0 - bT) * Fraction(T - tf - t, T - ti - tf) ** 3)  # exact arithmetic


@pytest.mark.parametrize("delta_t", [1, 3])
def test_total_rank_follows_cubic_schedule(delta_t):
    T, ti, tf = 14, 2, 3
    model = build_model(tiny_recipe([{"method": "adalora", "r": 6, "target_r": 2, "total_step": T, "tinit": ti,
                                      "tfinal": tf, "deltaT": delta_t, "target_modules": ["query", "value"]}]))
    n = 2 * 2  # 2 layers x (query, value)
    b0, bT = 6 * n, 2 * n
    assert adalora_rank(model) == b0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    expected_rank = b0
    history = []
    for t in range(1, T + 3):  # two steps past T: the final allocation stays
        ids, mask = tiny_inputs(batch=4, seed=t)  # fresh "fake" gradients every step
        labels = torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(100 + t))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss + model.regularization()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(t)
        if t <= ti or t == T - tf or (t < T - tf and t % delta_t == 0):
            expected_rank = _expected_budget(t, b0, bT, ti, tf, T)
        history.append(adalora_rank(model))
        assert history[-1] == expected_rank, (t, history)
        for m in adalora_modules(model).values():  # pruned singular values are exactly zero
            assert torch.all(m.lora_E[~m.rank_mask] == 0)
            assert torch.any(m.lora_E[m.rank_mask] != 0) or m.rank == 0
    assert history[-1] == bT == 8
    assert history[ti] < b0 or delta_t > 1  # the budget starts shrinking right after tinit
    assert sorted(history, reverse=True) == history  # non-increasing
    assert sum(rank_pattern(model).values()) == bT


def test_step_hook_needs_total_steps_and_validates():
    model = build_model(tiny_recipe([{"method": "adalora", "r": 2, "target_r": 1, "target_modules": ["query"]}]))
    ids, mask = tiny_inputs()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0])).loss.backward()
    with pytest.raises(RuntimeError, match="total number of training steps"):
        model.after_step(1)
    model.total_steps = 3  # what run_trial sets
    model.after_step(1)
    model.after_step(3)
    assert adalora_rank(model) == 2
    with pytest.raises(RecipeError, match="tinit < total_step - tfinal"):
        tiny_recipe([{"method": "adalora", "total_step": 10, "tinit": 6, "tfinal": 4}])
    with pytest.raises(RecipeError, match="target_r"):
        tiny_recipe([{"method": "adalora", "init_r": 4, "target_r": 6}])
    # ``r`` is accepted for init_r and the recipe round-trips under the canonical name
    recipe = tiny_recipe([{"method": "adalora", "r": 5, "target_r": 3}])
    assert recipe.components[0].init_r == 5
    assert recipe_from_dict(recipe.model_dump(mode="json")).components[0].init_r == 5


def test_orthogonality_regularizer_is_eq4_normalised_as_the_authors_code():
    model = build_model(tiny_recipe([{"method": "adalora", "r": 3, "target_r": 2, "orth_reg_weight": 0.7,
                                      "target_modules": ["query", "ffn_in"]}]))
    _randomise(model, std=0.2)
    norms = []
    for m in adalora_modules(model).values():
        P, Q = m.lora_B.detach(), m.lora_A.detach()  # P (d_out, r), Q (r, d_in)
        eye = torch.eye(3)
        norms += [torch.linalg.matrix_norm(P.T @ P - eye), torch.linalg.matrix_norm(Q @ Q.T - eye)]
    reg = model.regularization()
    assert len(norms) == 2 * 2 * 2  # 2 layers x 2 targets, P and Q each
    torch.testing.assert_close(reg, 0.7 * torch.stack(norms).mean())
    reg.backward()
    some = next(iter(adalora_modules(model).values()))
    assert some.lora_A.grad.abs().sum() > 0 and some.lora_B.grad.abs().sum() > 0
    assert some.lora_E.grad is None  # eq. 4 does not involve the singular values
    no_reg = build_model(tiny_recipe([{"method": "adalora", "orth_reg_weight": 0.0}]))
    assert no_reg.regularization() is None


def test_trainable_count_matches_closed_form_on_bert_base():
    backbone = {"preset": "bert-base"}
    d, d_ff, L = 768, 3072, 12
    plain = count_recipe(recipe_from_dict({"backbone": backbone, "components": []}))
    # default: all six Linear slots, init_r = 12; each matrix has P (d_out, r), E (r, 1), Q (r, d_in)
    default = count_recipe(recipe_from_dict({"backbone": backbone, "components": [{"method": "adalora"}]}))
    per_layer = 4 * 12 * (d + d + 1) + 12 * (d + d_ff + 1) + 12 * (d_ff + d + 1)
    assert default.trainable_params == L * per_layer == 1_991_520
    qv = count_recipe(recipe_from_dict({"backbone": backbone, "components": [
        {"method": "adalora", "init_r": 8, "target_r": 4, "target_modules": ["query", "value"], "layers": "upper_half"}]}))
    assert qv.trainable_params == 6 * 2 * 8 * (d + d + 1) == 147_552
    gated = count_recipe(recipe_from_dict({"backbone": backbone, "components": [{"method": "adalora", "gated": True}]}))
    assert gated.trainable_params == default.trainable_params + L * (d + 1)  # one gate per layer, on the layer input
    assert default.backbone_params == qv.backbone_params == plain.backbone_params == 109_482_240
    assert default.head_params == plain.head_params == d * 2 + 2


def test_run_trial_allocates_without_user_calls(glue_dir):
    from autopeft.training.trainer import run_trial

    recipe = tiny_recipe([{"method": "adalora", "r": 4, "target_r": 2, "target_modules": ["query", "value"]}],
                         backbone={**TINY_BERT, "vocab_size": 30522},
                         training={"max_train_examples": 64, "batch_size": 16, "max_eval_examples": 32})
    result, model = run_trial(recipe, data_dir=glue_dir, device="cpu")
    assert result.steps == 4 and model.total_steps == 4
    assert adalora_rank(model) == 2 * 4  # target_r x matrices, reached at the last step
    assert all(isinstance(m, SVDLinear) for m in adalora_modules(model).values())
