"""One HF Trainer + PEFT + DeepSpeed (ZeRO 1/2, CPU, Gloo) LLaVA LoRA run, started by
`torchrun --nproc_per_node W deepspeed_run.py SPEC.json` (env DS_ACCELERATOR=cpu) from
test_deepspeed_interop.py.

SPEC: model_dir, rows (a torch.save list of rows: our global batches in order, already padded), output_dir,
batch (per device), max_steps, save_steps, zero_stage, bf16, lora {r, alpha, dropout} (null: stage 1, the
projector alone), full (true, without lora: everything but the vision tower trains), recipe (lr, schedule,
warmup, weight decay, max_grad_norm, seed), resume (a checkpoint dir or null), no_save (true: save nothing), log (where rank 0 writes the
log history as JSON). The projector trains beside the adapters, as in LLaVA's stage 2."""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

from train_fixtures import LLM_LINEARS, collate


def main(spec_path):
    spec = json.loads(open(spec_path).read())
    recipe, lora = spec["recipe"], spec["lora"]
    torch.manual_seed(recipe["seed"])  # PEFT draws lora_A from the global generator, as HF's set_seed
    model = LlavaForConditionalGeneration.from_pretrained(spec["model_dir"], torch_dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=LLM_LINEARS, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # without lora: stage 1 (the projector alone) or a full fine-tune
        if spec.get("full"):
            p.requires_grad_("vision_tower" not in name)
        else:
            p.requires_grad_(("multi_modal_projector" in name) or (lora is not None and p.requires_grad))
    ds = {"zero_optimization": {"stage": spec["zero_stage"]}, "train_micro_batch_size_per_gpu": "auto",
          "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    if spec["bf16"]:
        ds["bf16"] = {"enabled": True}
    args = TrainingArguments(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=recipe["learning_rate"], lr_scheduler_type=recipe["lr_scheduler_type"],
        warmup_steps=recipe["warmup_steps"], weight_decay=recipe["weight_decay"], max_grad_norm=recipe["max_grad_norm"],
        logging_steps=1, save_steps=spec["save_steps"], save_strategy="no" if spec.get("no_save") else "steps", optim="adamw_torch",
        train_sampling_strategy="sequential", remove_unused_columns=False, seed=recipe["seed"], report_to=[],
        disable_tqdm=True, use_cpu=True, ddp_backend="gloo", deepspeed=ds, bf16=spec["bf16"])
    rows = torch.load(spec["rows"], weights_only=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    if trainer.is_world_process_zero():
        steps = [{"step": e["step"], "loss": e["loss"], "grad_norm": e.get("grad_norm"),
                  "learning_rate": e["learning_rate"]} for e in trainer.state.log_history if "loss" in e]
        with open(spec["log"], "w") as f:
            json.dump({"steps": steps, "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written. DeepSpeed's CPU communication can abort in the interpreter's teardown after that
    # ("terminate called without an active exception": 1 run in 4 here), failing a run that did its work:
    # every rank waits for the others, then leaves without the teardown.
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
