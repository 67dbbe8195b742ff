"""Memory stays flat over trials in one process (issue 9, deliverable 3).

The leak that ``benchmarks/memory_flat.py`` found: the trainer's saved-tensor meter handed autograd
back the very tensor it was given, so an op saving its own output (the pooler's tanh) held a cycle
output -> grad_fn -> saved output through C++. Under mean pooling the pooler's output is never
back-propagated, so that graph, and every trainable parameter it saved, outlived the trial.
"""

import gc
import weakref
from pathlib import Path

import torch

from conftest import TINY_BERT


def _data(root: Path) -> Path:
    glue = root / "glue" / "sst2"
    glue.mkdir(parents=True)
    for split, n in (("train", 32), ("validation", 16)):
        rows = ["sentence\tlabel"] + [f"the film is {'good' if i % 2 else 'bad'} {i}\t{i % 2}" for i in range(n)]
        (glue / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root / "glue"


def test_no_parameter_of_a_finished_trial_survives_it(tmp_path, monkeypatch):
    from autopeft.composition.recipe import recipe_from_dict
    from autopeft.training.trainer import run_trial

    monkeypatch.setenv("AUTOPEFT_CACHE_DIR", str(tmp_path / "tokens"))
    recipe = recipe_from_dict({"backbone": {**TINY_BERT, "vocab_size": 30522}, "task": "sst2", "pooling": "mean",
                               "components": [{"method": "lora", "r": 2, "target_modules": ["query", "value"]}],
                               "training": {"max_train_examples": 32, "batch_size": 16, "max_seq_length": 16}})
    result, model = run_trial(recipe, _data(tmp_path), device="cpu")
    refs = [weakref.ref(p) for p in model.parameters()]
    lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    del model, result
    gc.collect()
    assert lora == 8  # 2 layers x (query, value) x (A, B): the parameters the leak kept
    assert sum(r() is not None for r in refs) == 0


def test_meter_gives_the_same_gradients_as_no_meter():
    from autopeft.training.trainer import _SavedTensorMeter

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    grads = []
    for metered in (False, True):
        lin.zero_grad()
        meter = _SavedTensorMeter()
        if metered:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                loss = torch.tanh(lin(x)).pow(2).sum()
        else:
            loss = torch.tanh(lin(x)).pow(2).sum()
        loss.backward()
        grads.append((lin.weight.grad.clone(), lin.bias.grad.clone()))
        if metered:
            assert meter.bytes > 0  # it did count the saved tensors
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_release_memory_collects_cycles_trims_the_heap_and_reports_glibcs_answer(monkeypatch):
    import gc
    import weakref

    import autopeft.backbones.memory as memory

    class Node:
        pass

    calls = []
    for answer, expected in ((1, True), (0, False)):
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle: only the garbage collector frees it
        dead = weakref.ref(a)
        del a, b
        gc.disable()  # no automatic collection between here and release_memory
        try:
            monkeypatch.setattr(memory, "_libc_malloc_trim", lambda answer=answer: lambda pad: calls.append(pad) or answer)
            assert memory.release_memory() is expected
        finally:
            gc.enable()
        assert dead() is None  # collected by release_memory
    assert calls == [0, 0]  # malloc_trim(0): release all free heap pages
    monkeypatch.setattr(memory, "_libc_malloc_trim", lambda: None)  # no glibc (macOS, musl)
    assert memory.release_memory() is False
