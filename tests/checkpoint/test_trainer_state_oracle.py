"""Our trainer_state.json is one transformers' TrainerState reads (and writes the same way)."""
import dataclasses
import json
import os

from transformers import TrainerState

from llava_oracle import run


def test_trainer_state_loads_in_transformers(tmp_path):
    path = tmp_path / "trainer_state.json"
    run([os.environ["LLAVA_CHECKPOINT_TOOL"], "trainer-state", path, 3, 10])
    state = TrainerState.load_from_json(str(path))
    assert state.global_step == 3 and state.max_steps == 10 and state.save_steps == 2
    assert state.train_batch_size == 4 and abs(state.epoch - 0.3) < 1e-12
    assert [e["step"] for e in state.log_history] == [1, 2, 3]
    assert state.log_history[2]["loss"] == 2.2
    # Every key we write is a TrainerState field (older transformers reject unknown keys).
    fields = {f.name for f in dataclasses.fields(TrainerState)}
    ours = json.loads(path.read_text())
    assert set(ours) <= fields, set(ours) - fields
    # Written like save_to_json: sorted keys, indent 2, trailing newline.
    assert path.read_text() == json.dumps(ours, indent=2, sort_keys=True) + "\n"
