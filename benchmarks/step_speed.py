"""Training-step speed in fp32 and bf16, side by side in one run, each against its own limit.

MiniLM-L6 on real SST-2 batches of 32 grouped by length as the trainer groups them (``Batches`` +
``length_grouped_order``), one AdamW step each (forward, loss, backward, optimiser), for:

* autopeft's LoRA r=8 (alpha 16) on query/value, a parallel FFN adapter (Pfeiffer, rf 32), full
  fine-tuning, each through ``autopeft.training.setup.set_precision`` (the trainer's own precision path);
* peft's LoRA r=8 on query/value (``peft.get_peft_model``; bf16: base weights in bf16, adapters float32,
  autocast: peft's own recipe) as the reference implementation.

Steps are interleaved (one step of every configuration per round, the same batch) so that load on the
machine hits every configuration alike; each time is the median over rounds.

**The limit** of a step is the FLOPs its real (unpadded) tokens need at the measured matmul peak of its
dtype: per layer the Linear FLOPs ``2 n (4 d^2 + 2 d d_ff)`` for ``n`` real tokens, plus attention
``4 L^2 d`` per example of length ``L``; the forward pass, then activation gradients (the same again)
and, for full fine-tuning, weight gradients (the same again). The peak is a matmul at the step's
shapes ((tokens x d) @ (d x d_ff)) timed here in fp32 and in bf16 on this process's threads.

    python benchmarks/step_speed.py              # ~2 min on 2 cores
    python benchmarks/step_speed.py --rounds 3   # quicker, noisier
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "glue"
BATCH = 32
LORA = [{"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}]
ADAPTER = [{"method": "adapter", "variant": "pfeiffer", "placement": "parallel", "reduction_factor": 32,
            "sublayers": ["ffn"]}]
FULL = [{"method": "full_finetuning"}]
CONFIGS = {"autopeft LoRA r=8 q/v": LORA, "parallel FFN adapter rf 32": ADAPTER, "full fine-tuning": FULL}
PEFT_LORA = "peft LoRA r=8 q/v"


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul in ``dtype`` on this process's threads (best of repeats)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * m * k * n / best


def step_flops(lengths: np.ndarray, layers: int, d: int, d_ff: int, full: bool) -> float:
    """FLOPs of one training step on examples of real ``lengths``: forward + activation gradients
    (+ weight gradients with ``full``), Linear layers and attention, the head and embeddings aside."""
    n = float(lengths.sum())
    forward = layers * (2 * n * (4 * d * d + 2 * d * d_ff) + float((4 * lengths.astype(float) ** 2 * d).sum()))
    return forward * (3 if full else 2)


def batches(n_batches: int, seed: int = 0):
    from autopeft.backbones import MINILM, load_tokenizer
    from autopeft.data.tasks import get_task, load_split
    from autopeft.training.batches import Batches, length_grouped_order

    split = load_split(get_task("sst2"), "train", DATA)
    b = Batches(split, load_tokenizer(MINILM), 128, torch.device("cpu"))
    order = length_grouped_order(b.lengths, n_batches * BATCH, BATCH, seed)
    out = []
    for i in range(n_batches):
        idx = order[i * BATCH:(i + 1) * BATCH]
        out.append((b.batch(idx), b.lengths[idx]))
    return out


def ours(components, precision: str):
    from autopeft.composition.recipe import build_model, recipe_from_dict
    from autopeft.training.setup import set_precision

    r = recipe_from_dict({"backbone": "minilm-l6", "task": "sst2", "components": components, "pooling": "mean",
                          "training": {"precision": precision}})
    model = build_model(r).train()
    set_precision(model, r, "cpu")  # autocast inside the model's forward
    return adamw_step(model)


def adamw_step(model, autocast_dtype: torch.dtype | None = None):
    """``step(batch) -> loss``: one forward (under CPU autocast in ``autocast_dtype`` if given), backward
    and AdamW step over ``model``'s trainable parameters."""
    import contextlib

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def peft_lora(precision: str):
    import peft

    from autopeft.backbones import MINILM, load_model

    base = load_model(MINILM, 2, seed=0)
    if precision == "bf16":
        base = base.to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                      target_modules=["query", "value"])).train()
    return adamw_step(model, torch.bfloat16 if precision == "bf16" else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (each: every batch once per configuration)")
    ap.add_argument("--batches", type=int, default=6, help="distinct batches per round")
    ap.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                    help="time bf16 steps: auto = where this CPU has AMX-BF16/AVX512-BF16 (elsewhere a bf16 step "
                         "runs on slow emulated kernels: minutes per step)")
    a = ap.parse_args()
    torch.manual_seed(0)
    from autopeft.backbones import MINILM, load_config

    cfg = load_config(MINILM, 2)
    layers, d, d_ff = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    data = batches(a.batches)
    mean_tokens = statistics.mean(float(lens.sum()) for _, lens in data)
    m = int(round(mean_tokens / 16)) * 16 or 16
    from autopeft.backbones.precision import cpu_bf16_flags

    precisions = ["fp32"] + (["bf16"] if a.bf16 == "yes" or (a.bf16 == "auto" and cpu_bf16_flags()) else [])
    peaks = {p: matmul_peak(dt, m, d, d_ff, seconds=1.0 if p in precisions else 0.2)
             for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    steps = {}
    for p in precisions:
        for name, comps in CONFIGS.items():
            steps[(name, p)] = ours(comps, p)
        steps[(PEFT_LORA, p)] = peft_lora(p)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for k, fn in steps.items():  # warm-up
        fn(data[0][0])
    for _ in range(a.rounds):
        for batch, _ in data:
            for k, fn in steps.items():
                t = time.perf_counter()
                loss = fn(batch)
                times[k].append(time.perf_counter() - t)
                if not np.isfinite(loss):
                    raise SystemExit(f"{k}: loss {loss}")
    limit = {}
    for name in (*CONFIGS, PEFT_LORA):
        flops = statistics.mean(step_flops(lens, layers, d, d_ff, name == "full fine-tuning") for _, lens in data)
        for p in precisions:
            limit[(name, p)] = flops / peaks[p]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MiniLM-L6 ({layers} layers, d={d}, d_ff={d_ff}); SST-2 batches of {BATCH} grouped by length, "
          f"{mean_tokens:.0f} real tokens a batch on average; {torch.get_num_threads()} threads; "
          f"median of {a.rounds * len(data)} interleaved steps each")
    print(f"matmul peak at ({m}x{d})@({d}x{d_ff}): fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 "
          f"{peaks['bf16'] / 1e9:,.0f} GFLOP/s ({peaks['bf16'] / peaks['fp32']:.1f}x)")
    if "bf16" not in precisions:
        print(f"bf16 steps not run: this CPU reports none of AMX-BF16 / AVX512-BF16 "
              f"(/proc/cpuinfo), and its bf16 matmul runs at {peaks['bf16'] / 1e9:,.1f} GFLOP/s; "
              "`--precision auto` stays fp32 here (--bf16 yes times them anyway)")
    print()
    print(f"| {'configuration':28} | {'fp32 ms':>8} | {'bf16 ms':>8} | {'bf16 speed-up':>13} | {'fp32 / limit':>12} | "
          f"{'bf16 / limit':>12} | {'vs peft LoRA (same dtype)':>26} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 15}|{'-' * 14}|{'-' * 14}|{'-' * 28}|")
    def x(v: float | None) -> str:
        return "not run" if v is None else f"{v:.2f}x"

    for name in (*CONFIGS, PEFT_LORA):
        f, b = med[(name, "fp32")], med.get((name, "bf16"))
        pb = med.get((PEFT_LORA, "bf16"))
        vs = f"{x(med[(PEFT_LORA, 'fp32')] / f)} / {x(pb / b if b else None)}" if name != PEFT_LORA else "1.00x / 1.00x"
        print(f"| {name:28} | {f * 1e3:8.1f} | {'not run' if b is None else f'{b * 1e3:.1f}':>8} | "
              f"{x(f / b if b else None):>13} | {x(f / limit[(name, 'fp32')]):>12} | "
              f"{x(b / limit[(name, 'bf16')] if b else None):>12} | {vs:>26} |")
    print()
    print("limit: the step's real-token FLOPs (forward + activation gradients, + weight gradients for full "
          "fine-tuning) at the matmul peak of its dtype; 'vs peft LoRA': peft's step time / this one's "
          "(above 1: faster than peft), fp32 / bf16.")


if __name__ == "__main__":
    main()
