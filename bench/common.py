"""Shared by the benchmarks: running a command while timestamping its stdout lines and taking its peak RSS,
min/median/max summaries, evicting files from the page cache, and the small LLaVA they all train."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "oracle"))

# The bench model: CLIP-B-like tower cut to 4 layers at 224 px (256 image rows), a Llama with hidden 768 and
# 8 layers, and Llama's 32000-entry vocabulary (the tokenizer itself is a tiny one; extra rows are unused).
BENCH_MODEL = dict(vocab=32000, hidden=768, intermediate=2048, layers=8, heads=12,
                   vision_hidden=768, vision_intermediate=3072, vision_layers=4, vision_heads=12,
                   image_size=224, patch_size=14)


def summary(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


class GpuMemoryPeak:
    """Peak GPU memory in use (nvidia-smi, every 0.1 s) while a command runs, minus what was in use before:
    the same measure for our process and for Python's (CUDA context included in both)."""

    def __init__(self):
        import threading
        self.baseline = self.read()
        self.peak = self.baseline
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    @staticmethod
    def read():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])  # MiB, GPU 0

    def poll(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, self.read())

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak - self.baseline


class PeakRss:
    """The child's own peak RSS: VmHWM of /proc/PID/status, read every 20 ms while it runs (a high-water mark,
    so the last read is the peak up to 20 ms before exit). Not ru_maxrss: Linux carries the parent's peak over
    fork + exec into the child's ru_maxrss, so a child of a big Python process reported the parent's size."""

    def __init__(self, pid):
        import threading
        self.pid, self.peak_kib = pid, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def read(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass

    def poll(self):
        while not self.done.wait(0.02):
            self.read()

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.peak_kib / 1024


def run_timed(cmd, env=None, cwd=None, gpu=False):
    """Runs cmd; returns (lines [(seconds since start, text)], peak RSS in MiB, wall seconds, stderr).
    Lines are stamped as they arrive, so a program that flushes per step gives per-step wall times.
    With gpu=True the peak GPU memory (MiB) is in run_timed.last_gpu_mib afterwards."""
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile("w+")
    gpu_peak = GpuMemoryPeak() if gpu else None
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd)
    rss = PeakRss(p.pid)
    lines = []
    for raw in iter(p.stdout.readline, b""):
        lines.append((time.perf_counter() - t0, raw.decode(errors="replace").rstrip("\n")))
    rss.read()  # stdout closed: the process is exiting or gone; one more read while /proc may still hold it
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    peak_rss_mib = rss.stop()
    run_timed.last_gpu_mib = gpu_peak.stop() if gpu_peak else None
    p.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    stderr = err.read()
    err.close()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{stderr[-3000:]}\n"
                           f"{chr(10).join(l for _, l in lines[-20:])}")
    return lines, peak_rss_mib, wall, stderr


def thread_env(threads):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def evict_from_page_cache(paths):
    """Drops these files' clean pages (POSIX_FADV_DONTNEED after fsync): a cold read without root's
    drop_caches, which this machine does not allow."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(directory):
    return [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]


def dir_bytes(directory):
    return sum(os.path.getsize(p) for p in files_under(directory))


# A small one for the multi-rank ZeRO runs (4 ranks on 2 cores): the formulas only depend on Ψ.
# LLaVA-1.5-7B's layer widths (CLIP ViT-L/14 at 336 px, 24 layers; Llama 4096 wide, 32 heads, intermediate
# 11008, vocab 32000) with 2 decoder layers instead of 32: ~1B parameters, what one CPU step can take.
LLAVA7B_WIDTHS_MODEL = dict(vocab=32000, hidden=4096, intermediate=11008, layers=2, heads=32,
                            vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
                            image_size=336, patch_size=14)
# The GPU check's speed model (issue #17): the same widths with 8 decoder layers instead of 32 (~2.3B).
LLAVA7B_8_LAYERS_MODEL = dict(LLAVA7B_WIDTHS_MODEL, layers=8)
MODELS = {"bench": BENCH_MODEL, "llava7b-widths": LLAVA7B_WIDTHS_MODEL, "llava7b-8layers": LLAVA7B_8_LAYERS_MODEL}

SMALL_MODEL = dict(BENCH_MODEL, vocab=4096, hidden=256, intermediate=688, layers=4, heads=4, vision_hidden=128,
                   vision_intermediate=512, vision_layers=2, vision_heads=4, image_size=112)


def make_world(root, samples=16, batch=2, seed=0, model_spec=BENCH_MODEL):
    """Model dir (tokenizer + bench LLaVA + 224 px processor), 224 px JPEGs and a LLaVA-format data set under
    root. Returns the base training config (a dict) and the model's parameter counts."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    import data_fixtures as fx
    import tiny_llava

    model_dir = os.path.join(root, "model")
    tok = fx.make_hf_tokenizer_dir(model_dir, fx.train_spm(os.path.join(root, "spm")), legacy=True, llava_hf=True)
    config = tiny_llava.make_config(**model_spec)
    config.image_token_index = tok.convert_tokens_to_ids("<image>")
    config.text_config.max_position_embeddings = 4096
    model = tiny_llava.build(config, seed=seed)
    tiny_llava.save(model, model_dir)
    side = model_spec["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(model_dir)
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0, "lm_head": 0}
    for n, p in model.named_parameters():
        key = next((k for k in counts if k in n), "language_model")
        counts[key] += p.numel()
    counts["total"] = sum(counts.values())
    del model

    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(samples):
        img = (rng.random((side // 8, side // 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).resize((side, side), Image.BILINEAR).save(os.path.join(images, f"{i}.jpg"), quality=90)
        answer = " ".join(fx.CORPUS[i % len(fx.CORPUS):][:2])
        records.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": answer}]})
    data = os.path.join(root, "data.json")
    with open(data, "w") as f:
        json.dump(records, f)
    base = {"model_name_or_path": model_dir, "data_path": data, "image_folder": images, "version": "v1",
            "image_aspect_ratio": "pad", "model_max_length": 2048, "per_device_train_batch_size": batch,
            "output_dir": os.path.join(root, "out"), "seed": 7, "logging_steps": 1, "save_strategy": "no",
            "weight_decay": 0.0, "learning_rate": 1e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
            "max_grad_norm": 1.0, "lora_dropout": 0.0, "dataloader_num_workers": 0}
    return base, counts


def write_config(path, settings):
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return path


def print_table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*[str(x) for x in r]))


def fmt_range(s, digits=2):
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"
