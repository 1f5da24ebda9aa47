"""Shared helpers for oracle tests: find our binaries, run them, compare tensors bit for bit."""
import os
import subprocess

import torch


def binary(name="LLAVA_BIN"):
    path = os.environ.get(name)
    if not path or not os.path.exists(path):
        raise RuntimeError(f"{name} is not set to an existing binary; run this test through ctest")
    return path


def run(args, check=True, timeout=600, **kw):
    """Runs a command, returns CompletedProcess; on unexpected failure raises with its output."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a, b = a.contiguous(), b.contiguous()
    return bytes(a.view(-1).view(torch.uint8).numpy()) == bytes(b.view(-1).view(torch.uint8).numpy())


def assert_clear_error(proc, *needles):
    """A bad input must end with exit status 1 (not a signal) and one line naming the fault."""
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr: {proc.stderr!r}"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
