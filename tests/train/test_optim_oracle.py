"""Schedules against transformers' get_scheduler, AdamW + clipping against torch.optim.AdamW."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from llava_oracle import run

TOOL = os.environ.get("LLAVA_TRAIN_TOOL", "")


def hf_lrs(name, base_lr, warmup, total, **kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=base_lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name,warmup_steps,warmup_ratio,total,extra", [
    ("linear", 0, 0.0, 20, {}),
    ("linear", 3, 0.0, 20, {}),
    ("cosine", 0, 0.03, 100, {}),   # LLaVA's recipe: warmup_ratio 0.03 -> ceil(3.0) = 3 steps
    ("cosine", 0, 0.1, 37, {}),
    ("constant", 0, 0.0, 10, {}),
    ("constant_with_warmup", 4, 0.0, 15, {}),
    ("cosine_with_min_lr", 2, 0.0, 25, {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", 0, 0.25, 30, {"min_lr": 2e-5}),
])
def test_schedule_equals_get_scheduler(name, warmup_steps, warmup_ratio, total, extra):
    base_lr = 2e-4
    warmup = warmup_steps if warmup_steps >= 1 else __import__("math").ceil(total * warmup_ratio)
    want = hf_lrs(name, base_lr, warmup, total, **extra)
    rate = extra.get("min_lr_rate", extra.get("min_lr", 0.0) / base_lr)
    out = run([TOOL, "schedule", name, base_lr, warmup_steps, warmup_ratio, total, rate]).stdout.split()
    got = [float(x) for x in out]
    assert len(got) == len(want)
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, want))
    print(f"{name}: {len(got)} lrs, max relative difference {worst:.3g}")
    assert worst <= 1e-12


def test_adamw_and_clipping_match_torch(tmp_path):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g), torch.randn(4, 4, generator=g)]
    steps, lr, wd, max_norm = 6, 1e-2, 0.1, 0.5
    grads = [[torch.randn(p.shape, generator=g) * (k + 1) for p in params] for k in range(steps)]
    tensors = {f"p{i}": p for i, p in enumerate(params)}
    tensors.update({f"g{k}.{i}": gr for k in range(steps) for i, gr in enumerate(grads[k])})
    save_file(tensors, str(tmp_path / "in.safetensors"))
    run([TOOL, "adamw", tmp_path / "in.safetensors", tmp_path / "out.safetensors", lr, wd, steps, max_norm])
    ours = load_file(str(tmp_path / "out.safetensors"))

    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW([{"params": ref[0::2], "weight_decay": wd}, {"params": ref[1::2], "weight_decay": 0.0}], lr=lr)
    for k in range(steps):
        for p, gr in zip(ref, grads[k]):
            p.grad = gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        assert abs(ours[f"norm{k}"].item() - norm.item()) <= 1e-6 * norm.item()
        opt.step()
        opt.zero_grad()
    worst = 0.0
    for i, p in enumerate(ref):
        st = opt.state[p]
        for name, want in [("p", p.detach()), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"])]:
            diff = (ours[f"{name}{i}"] - want).abs().max().item()
            worst = max(worst, diff)
            assert torch.allclose(ours[f"{name}{i}"], want, rtol=1e-6, atol=1e-7), (name, i, diff)
    print(f"AdamW {steps} steps with clipping: max abs difference {worst:.3g}")


def make_problem(tmp_path, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g), torch.randn(4, 4, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) * (k + 1) for p in params] for k in range(steps)]
    tensors = {f"p{i}": p for i, p in enumerate(params)}
    tensors.update({f"g{k}.{i}": gr for k in range(steps) for i, gr in enumerate(grads[k])})
    save_file(tensors, str(tmp_path / "in.safetensors"))
    return params, grads


def torch_run(params, grads, lr, wd, max_norm, first=0, last=None, state=None):
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW([{"params": ref[0::2], "weight_decay": wd}, {"params": ref[1::2], "weight_decay": 0.0}], lr=lr)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=0, num_training_steps=100)
    if state is not None:
        opt.load_state_dict(state)
    for k in range(first, len(grads) if last is None else last):
        for p, gr in zip(ref, grads[k]):
            p.grad = gr.clone()
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
    return ref, opt, sched


def test_optimizer_pt_and_scheduler_pt_are_what_torch_writes_and_resume_both_ways(tmp_path):
    steps, lr, wd, max_norm = 4, 1e-2, 0.1, 0.5
    params, grads = make_problem(tmp_path, steps)
    (tmp_path / "ckpt").mkdir()
    run([TOOL, "adamw", tmp_path / "in.safetensors", tmp_path / "out.safetensors", lr, wd, steps, max_norm,
         "--save", tmp_path / "ckpt"])
    ours = torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True)
    _, opt, sched = torch_run(params, grads, lr, wd, max_norm)
    want = opt.state_dict()
    assert ours["param_groups"] == want["param_groups"]  # every key, value and type, the ids included
    assert sorted(ours["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        assert ours["state"][i]["step"].dim() == 0 and ours["state"][i]["step"].dtype == torch.float32
        assert ours["state"][i]["step"].item() == st["step"].item()
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(ours["state"][i][k], st[k], rtol=1e-6, atol=1e-8), (i, k)
    ours_sched = torch.load(tmp_path / "ckpt" / "scheduler.pt", weights_only=True)
    assert ours_sched == sched.state_dict()

    # torch resumes from our optimizer.pt (as HF Trainer would) and continues exactly like its own run.
    extra = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(9 + k)) for p in params] for k in range(2)]
    ours_after = load_file(str(tmp_path / "out.safetensors"))
    from_ours, _, _ = torch_run([ours_after[f"p{i}"] for i in range(3)], extra, lr, wd, max_norm, state=ours)
    from_torch, _, _ = torch_run(params, grads + extra, lr, wd, max_norm)
    for a, b in zip(from_ours, from_torch):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

    # ... and we resume from torch's optimizer.pt.
    torch.save(want, tmp_path / "torch_optimizer.pt")
    mid = {f"p{i}": p.detach() for i, p in enumerate(torch_run(params, grads, lr, wd, max_norm)[0])}
    mid.update({f"g{k}.{i}": gr for k, step_grads in enumerate(extra) for i, gr in enumerate(step_grads)})
    save_file(mid, str(tmp_path / "mid.safetensors"))
    run([TOOL, "adamw", tmp_path / "mid.safetensors", tmp_path / "resumed.safetensors", lr, wd, 2, max_norm,
         "--load", tmp_path / "torch_optimizer.pt"])
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    worst = max((resumed[f"p{i}"] - from_torch[i].detach()).abs().max().item() for i in range(3))
    print(f"\noptimizer.pt/scheduler.pt equal torch's; resume both ways: max abs diff {worst:.3g}")
    assert worst <= 1e-6
