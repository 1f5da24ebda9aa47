"""How long a checkpoint save holds the training step: `async_save: true` (the step waits while the state is
gathered and copied into host buffers kept from save to save; a background thread writes and commits) against
the synchronous save (the step waits for every file to be written and fsynced), on the same model, the same
run settings and disk. Not a test. Target (issue #17): async blocked time <= 10% of the synchronous save's.

A full fine-tune of the bench model (LLM + projector train: model.safetensors + optimizer.pt with AdamW's
state, the checkpoint's bulk) saves at steps 2, 4, ..., 10 (save_steps 2, so each background write has a step
to finish in; were it slower than a step, the next save would wait for it: `waited_seconds`, reported apart).
Figures come from `--metrics-out`'s "saves": per save, blocked_seconds (gathering + staging, or gathering +
writing), write_seconds (the background write, or the synchronous one) and update_waited_seconds (on the
CPU the write reads the parameters and moments in place, so the next optimizer update waits for it if the
forward and backward were shorter). The async step-blocked time is blocked + waited + update_waited. The first async save also
allocates its host buffers (device tensors); later ones reuse them: the first and the median of the others.

    .venv/bin/python bench/bench_async_save.py BUILD_DIR [--repeats 2] [--small] [--json OUT]
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile

import common


def run_saves(llava, root, base, env, async_save, tag):
    out = os.path.join(root, f"out_{tag}")
    shutil.rmtree(out, ignore_errors=True)
    metrics = os.path.join(root, f"metrics_{tag}.json")
    cfg = {**base, "output_dir": out, "max_steps": 10, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1,
           "async_save": async_save}
    common.run_timed([llava, "train", common.write_config(os.path.join(root, f"{tag}.yaml"), cfg), "--metrics-out",
                      metrics], env=env)
    saves = json.load(open(metrics))["saves"]
    size = common.dir_bytes(os.path.join(out, "checkpoint-10"))
    shutil.rmtree(out)
    return saves, size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--small", action="store_true", help="common.SMALL_MODEL instead of the bench model (a quick check)")
    ap.add_argument("--json")
    args = ap.parse_args()
    llava = os.path.join(args.build_dir, "src", "cli", "llava")
    env = common.thread_env(args.threads)
    runs = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root:
        base, counts = common.make_world(root, samples=4, batch=2,
                                         model_spec=common.SMALL_MODEL if args.small else common.BENCH_MODEL)
        for r in range(args.repeats):
            sync, size = run_saves(llava, root, base, env, False, f"sync{r}")
            asyn, _ = run_saves(llava, root, base, env, True, f"async{r}")
            sync_blocked = statistics.median(s["blocked_seconds"] for s in sync)
            held = [s["blocked_seconds"] + s["waited_seconds"] + s["update_waited_seconds"] for s in asyn]
            later = held[1:]
            run = {"checkpoint_bytes": size, "sync_blocked_s": [s["blocked_seconds"] for s in sync],
                   "async_blocked_s": [s["blocked_seconds"] for s in asyn],
                   "async_update_waited_s": [s["update_waited_seconds"] for s in asyn],
                   "async_held_s": held,
                   "async_waited_s": [s["waited_seconds"] for s in asyn],
                   "async_write_s": [s["write_seconds"] for s in asyn],
                   "ratio_first": held[0] / sync_blocked,
                   "ratio_reused": statistics.median(later) / sync_blocked}
            runs.append(run)
            print(f"checkpoint {size / 2**20:.0f} MiB: synchronous save blocks {sync_blocked:.3f} s; async blocks "
                  f"{held[0]:.3f} s (first), {statistics.median(later):.3f} s (median of the others; the next update "
                  f"waited {max(run['async_update_waited_s']):.3f} s at most), background write {statistics.median(run['async_write_s']):.3f} s, waited "
                  f"{max(run['async_waited_s']):.3f} s; ratio {run['ratio_first']:.3f} first, {run['ratio_reused']:.3f} reused",
                  flush=True)
    result = {"model_parameters": counts["total"], "runs": runs,
              "ratio_reused": common.summary([r["ratio_reused"] for r in runs]),
              "ratio_first": common.summary([r["ratio_first"] for r in runs])}
    print(f"async/sync step-blocked time: {common.fmt_range(result['ratio_reused'], 3)} (saves 2-5), "
          f"{common.fmt_range(result['ratio_first'], 3)} for the first save (target <= 0.10)")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
