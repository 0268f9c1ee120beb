"""Worker of tests/test_distributed.py: ShardedMFAC inside transformers.Trainer under DDP, with
checkpoints.

Run on every rank (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT). Trains a
tiny BERT for 4 steps saving at step 2, resumes a second run from checkpoint-2 and writes
``<out>/rank<R>.json`` with: whether the resumed run ends bit-identical to the uninterrupted one,
the shard files and optimizer.pt keys of the checkpoint, the error every rank gets when the shards
are missing, and that with ``strict=False`` (empty window) the run ends elsewhere (so the shards are
what makes the resume exact).
"""
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

from hf_mfac.integrations import MFACTrainer, MFACTrainingArguments, mfac_optimizer_cls_and_kwargs
from hf_mfac.integrations.trainer import MFACShardCheckpointCallback
from hf_mfac.optim.distributed import ShardedMFAC


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=32, seed=1):
        self.ids = torch.randint(5, 32, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": int(self.ids[i, 0] % 2)}


def run(out, resume=None, strict=True):
    args = MFACTrainingArguments(
        output_dir=out, optim="mfac", mfac_num_grads=3, mfac_damp=1e-3, mfac_momentum=0.5,
        learning_rate=1e-2,
        weight_decay=0.01, max_steps=4, per_device_train_batch_size=4, use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=60, report_to="none", save_strategy="steps", save_steps=2,
        logging_strategy="no",
        disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        resume_from_checkpoint=resume)
    _, kwargs = mfac_optimizer_cls_and_kwargs(args)
    trainer = MFACTrainer(model=tiny_bert(), args=args, train_dataset=ToyData(),
                          optimizer_cls_and_kwargs=(ShardedMFAC, kwargs),
                          callbacks=[MFACShardCheckpointCallback(strict=strict)])
    trainer.train(resume_from_checkpoint=resume)
    assert isinstance(trainer.optimizer.optimizer, ShardedMFAC)
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def main(out):
    torch.set_num_threads(1)
    full = run(os.path.join(out, "full"))
    rank = dist.get_rank()
    ckpt = os.path.join(out, "full", "checkpoint-2")
    res = {"files": sorted(os.listdir(ckpt)),
           "optimizer_keys": sorted(torch.load(os.path.join(ckpt, "optimizer.pt"),
                                               weights_only=True)["mfac"])}
    resumed = run(os.path.join(out, "resumed"), resume=ckpt)
    res["resume_exact"] = torch.equal(resumed, full)
    lost = os.path.join(out, "lost")
    if rank == 0:
        shutil.copytree(ckpt, lost)
        for f in os.listdir(lost):
            if f.startswith("mfac_shard_"):
                os.remove(os.path.join(lost, f))
    dist.barrier()
    try:
        run(os.path.join(out, "lost-run"), resume=lost)
        res["lost_error"] = None
    except Exception as e:  # noqa: BLE001
        res["lost_error"] = f"{type(e).__name__}: {e}"
    res["lost_lenient_differs"] = not torch.equal(run(os.path.join(out, "lost-run2"), resume=lost,
                                                      strict=False), full)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
