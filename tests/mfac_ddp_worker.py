"""One rank of the 2-process DDP test in test_integration_optim.py (run with torchrun, gloo, CPU).

Trains a tiny random BERT with MFACTrainer for a few steps and saves this rank's flat parameters to
``<out>/rank<R>.pt``; the test then checks that both ranks end with identical parameters.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the test module's helpers
from test_integration_optim import ToyData, flat_params, tiny_bert  # noqa: E402

from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments  # noqa: E402


def main(out_dir: str) -> None:
    args = MFACTrainingArguments(
        output_dir=out_dir, optim="mfac", mfac_num_grads=4, mfac_damp=1e-3, learning_rate=1e-2,
        weight_decay=0.01,
        max_steps=3, per_device_train_batch_size=4, use_cpu=True, ddp_backend="gloo",
        report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    model = tiny_bert(seed=0)
    start = flat_params(model)
    trainer = MFACTrainer(model=model, args=args, train_dataset=ToyData(n=32, seed=1))
    trainer.train()
    end = flat_params(trainer.model)
    assert args.world_size == 2, args.world_size
    assert not torch.equal(start, end), "parameters did not move"
    torch.save(end, os.path.join(out_dir, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
