"""Worker of tests/test_distributed.py: PruningCallback inside transformers.Trainer under DDP.

Run on every rank (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT). Two
trainings of a tiny BERT for 4 steps with gradual pruning (AdamW, then ShardedMFAC with the window
split over the ranks); writes ``<out>/rank<R>.json`` with, per case:

* ``oneshot_masks_equal``: the masks of the pruning step at step 0 (before any training, so every
  rank and the single-process reference hold the same model) equal ``prune_oneshot`` in this one
  process on all calibration batches (the case with an explicit ``dataloader``, float64 Fisher);
* ``num_grads``: the total number of gradients the report counts (over all ranks);
* ``masks`` / ``params``: checksums the test compares between ranks (every rank must end identical);
* ``zeros_held``: the pruned weights are still exactly zero after the training steps;
* ``sparsity``: the final sparsity of the targets;
* ``forwards``: forward passes on this rank (training steps plus this rank's share of the
  gradients).

A third case prunes one-shot before training the way the example scripts do
(``PruningArguments.setup``).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from hf_mfac.integrations import MFACTrainingArguments, PruningArguments, PruningCallback
from hf_mfac.integrations.trainer import MFACTrainer, mfac_optimizer_cls_and_kwargs
from hf_mfac.optim import MFAC
from hf_mfac.optim.distributed import ShardedMFAC
from hf_mfac.pruning import make_pruner, prune_oneshot

from dist_trainer import ToyData, tiny_bert  # noqa: I001 - the same tiny BERT and data (this folder is on sys.path)

NUM_GRADS = 8


def counted_bert():
    """tiny_bert() counting its forward passes in ``model.forwards``."""
    model = tiny_bert()
    model.forwards = 0

    def count(module, inputs):
        module.forwards += 1

    model.register_forward_pre_hook(count)
    return model


def pruner():
    return make_pruner("obert", block_size=16, fisher_dtype=torch.float64)


def make_args(out, optim):
    return MFACTrainingArguments(
        output_dir=out,
        optim=optim,
        mfac_num_grads=3,
        mfac_damp=1e-3,
        learning_rate=1e-2,
        max_steps=4,
        per_device_train_batch_size=2,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=60,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )


def train(out, optim, dataloader, schedule, sharded=False):
    args = make_args(out, optim)
    cb = PruningCallback(pruner(), num_grads=NUM_GRADS, dataloader=dataloader, **schedule)
    extra = {}
    if sharded:  # the window split over the ranks; the masks go to its (sharded) layout
        extra["optimizer_cls_and_kwargs"] = (ShardedMFAC, mfac_optimizer_cls_and_kwargs(args)[1])
    trainer = MFACTrainer(
        model=counted_bert(), args=args, train_dataset=ToyData(), callbacks=[cb], **extra
    )
    cb.attach(trainer)
    trainer.train()
    opt = (
        trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer
    )
    assert not sharded or isinstance(opt, ShardedMFAC)
    # the optimizer holds the callback's masks and its window only the kept weights
    if isinstance(opt, MFAC):
        assert len(opt.masks) == len(cb.masks)
        pruned = sum(int((~m).sum()) for m in cb.masks.values())
        assert opt.window.dim == sum(p.numel() for p in trainer.model.parameters()) - pruned
    return trainer, cb


def summary(trainer, cb) -> dict:
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    masks = torch.cat([m.reshape(-1) for _, m in sorted(cb.masks.items())])
    return {
        "masks": masks.to(torch.float64)
        .mul(torch.arange(1, masks.numel() + 1, dtype=torch.float64))
        .sum()
        .item(),
        "params": params.double().square().sum().item(),
        "zeros_held": all(
            bool((cb.targets[n].detach()[~m] == 0).all()) for n, m in cb.masks.items()
        ),
        "sparsity": cb.current_sparsity(),
        "num_grads": [h["num_grads"] for h in cb.history],
        "forwards": trainer.model.forwards,
    }


def main(out):
    torch.set_num_threads(1)
    res = {}
    # 1. explicit calibration batches (each rank takes batches r, r + N, ...), one pruning step at
    # step 0
    calib = torch.utils.data.DataLoader(ToyData(n=2 * NUM_GRADS, seed=2), batch_size=2)
    # the reference in this one process, before the Trainer's arguments start the process group
    # (inside it prune_oneshot would run over both ranks)
    assert not dist.is_initialized()
    ref_masks, _ = prune_oneshot(
        tiny_bert(), calib, method=pruner(), sparsity=0.5, num_grads=NUM_GRADS, progress=False
    )
    trainer, cb = train(
        os.path.join(out, "explicit"),
        "adamw_torch",
        calib,
        dict(final_sparsity=0.5, start=0, end=0),
    )
    rank = dist.get_rank()
    # masks never change after the only pruning step
    first = {n: m.clone() for n, m in cb.masks.items()}
    res["explicit"] = {
        **summary(trainer, cb),
        "oneshot_masks_equal": set(first) == set(ref_masks)
        and all(torch.equal(first[n], ref_masks[n]) for n in first),
    }
    # 2. the Trainer's own (accelerate-sharded) train batches, cubic schedule over 3 steps, M-FAC
    # optimizer with its window sharded over the ranks
    trainer, cb = train(
        os.path.join(out, "trainer"),
        "mfac",
        None,
        dict(final_sparsity=0.6, start=0, end=2, frequency=1),
        sharded=True,
    )
    res["trainer"] = summary(trainer, cb)
    # 3. the example scripts' one-shot mode (PruningArguments.setup): pruned before training on the
    # Trainer's sharded batches, then sparse fine-tuning with the masks held
    flags = PruningArguments(
        prune_method="obert",
        prune_mode="oneshot",
        prune_sparsity=0.5,
        prune_num_grads=8,
        prune_block_size=16,
    )
    trainer = MFACTrainer(
        model=counted_bert(),
        args=make_args(os.path.join(out, "oneshot"), "mfac"),
        train_dataset=ToyData(),
    )
    cb, _ = flags.setup(trainer, has_train_data=True)
    trainer.train()
    res["oneshot"] = {k: v for k, v in summary(trainer, cb).items() if k != "num_grads"}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
