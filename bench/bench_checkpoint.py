"""Checkpoint save and load of the bench model's full fine-tune (model.safetensors + optimizer.pt with AdamW's
exp_avg/exp_avg_sq + scheduler/trainer state), against the disk's sequential bandwidth measured with dd in
the same run and against the oracle doing the same with save_pretrained + torch.save. Not a test.

- disk: dd of 1 GiB with oflag=direct conv=fdatasync (write) and iflag=direct (read).
- ours, save: `llava train` (max_steps 1) saves at the end, after the step's log line; the time from that
  line to the process's exit, less the same for a run that does not save (teardown).
- ours, load: `resume_from_checkpoint`: the time between the `training:` line and `resuming from` (weights
  + optimizer.pt restored), the checkpoint's pages evicted first (POSIX_FADV_DONTNEED; drop_caches needs
  privileges this machine does not give).
- oracle: save_pretrained + torch.save(optimizer.state_dict()) + fsync of every file (ours fsyncs each file
  too); load = safetensors load + load_state_dict + torch.load + optimizer.load_state_dict, also evicted.

    .venv/bin/python bench/bench_checkpoint.py BUILD_DIR [--repeats 3] [--json OUT]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import common


def dd_bandwidth(root, mib=1024):
    """(write, read) bytes/s of one sequential pass that bypasses the page cache."""
    path = os.path.join(root, "dd.bin")
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={mib // 16}", "oflag=direct",
                    "conv=fdatasync"], check=True, capture_output=True)
    write = mib * 2**20 / (time.perf_counter() - t)
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], check=True, capture_output=True)
    read = mib * 2**20 / (time.perf_counter() - t)
    os.remove(path)
    return write, read


def ours_save_and_load(llava, root, base, env):
    out = os.path.join(root, "ours_out")
    shutil.rmtree(out, ignore_errors=True)
    cfg = {**base, "max_steps": 1, "output_dir": out}
    lines, _, wall, _ = common.run_timed([llava, "train", common.write_config(os.path.join(root, "nosave.yaml"),
                                                                             {**cfg, "save_strategy": "no"})], env=env)
    teardown = wall - next(t for t, l in lines if l.startswith("{'loss'"))
    lines, _, wall, _ = common.run_timed([llava, "train", common.write_config(os.path.join(root, "save.yaml"),
                                                                             {**cfg, "save_strategy": "steps"})], env=env)
    save = wall - next(t for t, l in lines if l.startswith("{'loss'")) - teardown
    ckpt = os.path.join(out, "checkpoint-1")
    size = common.dir_bytes(ckpt)
    common.evict_from_page_cache(common.files_under(ckpt))
    lines, _, _, _ = common.run_timed([llava, "train", common.write_config(os.path.join(root, "resume.yaml"),
                                       {**cfg, "save_strategy": "no", "resume_from_checkpoint": ckpt})], env=env)
    load = next(t for t, l in lines if l.startswith("resuming from")) - next(t for t, l in lines if l.startswith("training:"))
    shutil.rmtree(out)
    return save, load, size


def oracle_save_and_load(args):
    """Run as its own process: one full fine-tune step (so AdamW has its state), then the timed save + load."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    for n, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for p in model.parameters():  # a step's worth of state without running the model
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad()
    times = []
    for _ in range(args.repeats):
        out = os.path.join(args.out, "ckpt")
        os.makedirs(out)
        t = time.perf_counter()
        model.save_pretrained(out)
        torch.save(opt.state_dict(), os.path.join(out, "optimizer.pt"))
        for f in common.files_under(out):
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        save = time.perf_counter() - t
        size = common.dir_bytes(out)
        common.evict_from_page_cache(common.files_under(out))
        t = time.perf_counter()
        model.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=False)
        opt.load_state_dict(torch.load(os.path.join(out, "optimizer.pt"), weights_only=True))
        load = time.perf_counter() - t
        shutil.rmtree(out)
        times.append({"save_s": save, "load_s": load, "bytes": size})
    print(json.dumps(times), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    args = ap.parse_args()
    llava = os.path.join(args.build_dir, "src", "cli", "llava")
    env = common.thread_env(args.threads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        base, counts = common.make_world(root, samples=4, batch=2)
        base["learning_rate"] = 1e-5
        runs = []
        for _ in range(args.repeats):
            write_bw, read_bw = dd_bandwidth(root)
            save, load, size = ours_save_and_load(llava, root, base, env)
            runs.append({"dd_write_Bps": write_bw, "dd_read_Bps": read_bw, "ours_save_s": save, "ours_load_s": load,
                         "ours_bytes": size})
            print(f"disk write {write_bw / 2**20:.0f} MiB/s read {read_bw / 2**20:.0f} MiB/s; ours: {size / 2**20:.0f} MiB"
                  f" saved in {save:.2f} s, loaded in {load:.2f} s", flush=True)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "oracle", "--model", base["model_name_or_path"],
                            "--out", root, "--repeats", str(args.repeats), "--threads", str(args.threads)],
                           capture_output=True, text=True, env=env, check=True)
        hf = json.loads(r.stdout.strip().splitlines()[-1])
        for run, h in zip(runs, hf):
            run.update({"hf_save_s": h["save_s"], "hf_load_s": h["load_s"], "hf_bytes": h["bytes"]})
    result = {
        "runs": runs,
        "checkpoint_bytes": runs[0]["ours_bytes"],
        "save_fraction_of_dd_write": common.summary([x["ours_bytes"] / x["ours_save_s"] / x["dd_write_Bps"] for x in runs]),
        "load_fraction_of_dd_read": common.summary([x["ours_bytes"] / x["ours_load_s"] / x["dd_read_Bps"] for x in runs]),
        "hf_save_fraction_of_dd_write": common.summary([x["hf_bytes"] / x["hf_save_s"] / x["dd_write_Bps"] for x in runs]),
        "hf_load_fraction_of_dd_read": common.summary([x["hf_bytes"] / x["hf_load_s"] / x["dd_read_Bps"] for x in runs]),
        "save_speed_ratio": common.summary([x["hf_save_s"] / x["ours_save_s"] for x in runs]),
        "load_speed_ratio": common.summary([x["hf_load_s"] / x["ours_load_s"] for x in runs]),
    }
    print(f"checkpoint {result['checkpoint_bytes'] / 2**20:.0f} MiB: save at {common.fmt_range(result['save_fraction_of_dd_write'])}"
          f" of dd write (HF {common.fmt_range(result['hf_save_fraction_of_dd_write'])}), load at "
          f"{common.fmt_range(result['load_fraction_of_dd_read'])} of dd read (HF {common.fmt_range(result['hf_load_fraction_of_dd_read'])});"
          f" speed ours/HF save {common.fmt_range(result['save_speed_ratio'])}, load {common.fmt_range(result['load_speed_ratio'])}")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "oracle":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("--model")
        ap.add_argument("--out")
        ap.add_argument("--repeats", type=int)
        ap.add_argument("--threads", type=int)
        oracle_save_and_load(ap.parse_args())
    else:
        main()
