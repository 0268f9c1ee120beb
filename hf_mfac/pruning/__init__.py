"""Second-order pruning: magnitude, WoodFisher/oBERT, static M-FAC and CAP over ``torch.nn`` models.

```python
from hf_mfac.pruning import PruningConfig, prune_oneshot
config = PruningConfig(method="obert", sparsity=0.8, num_grads=256, recompute=4)
masks, report = prune_oneshot(model, dataloader, config)  # or prune_oneshot(model, dataloader,
print(report.to_markdown())                               #      method="obert", sparsity=0.8, ...)
```

Layout: :mod:`.config` (the settings as values), :mod:`.targets` (which weights; flat padded view),
:mod:`.grads` (gradients streamed from a dataloader), :mod:`.pruners` (selection + update per
method), :mod:`.oneshot` (the entry points, ``prune_oneshot`` and ``prune_sweep``), :mod:`.driver`
(the one-shot driver: recomputations, restore on error, the report), :mod:`.memory` (the estimate
before the work), :mod:`.placement` (the Fisher on one device, several, or the weights' own),
:mod:`.distributed` (the same over the ranks of a process group: ``prune_oneshot_distributed``,
which ``prune_oneshot`` calls there).
Imports torch, :mod:`hf_mfac.core` and :mod:`hf_mfac.comm` only; the Trainer glue is in
:mod:`hf_mfac.integrations.gradual`.
"""
from .config import GradualPruningConfig, PruningConfig
from .distributed import DistributedPruner, prune_oneshot_distributed
from .grads import GradStats, collect_grads, default_loss, iter_grads
from .memory import MemoryEstimate, estimate_memory
from .driver import FisherCache, PruneReport, PruneResult, apply_masks, masks_from_zeros
from .oneshot import prune_oneshot, prune_sweep
from .placement import FisherPart, plan_fisher_placement, plan_placement
from .pruners import (PRUNERS, CAPPruner, MagnitudePruner, MFACPruner, OBSPruner, Pattern, Pruner,
                      StepResult,
                      make_pruner)
from .targets import DEFAULT_EXCLUDE, DEFAULT_TYPES, Layout, find_prunable

__all__ = [
    "prune_oneshot", "prune_sweep", "PRUNERS", "make_pruner", "Pruner", "MagnitudePruner",
    "OBSPruner",
    "MFACPruner", "CAPPruner", "Pattern", "StepResult", "PruneReport", "PruneResult",
    "find_prunable", "Layout",
    "DEFAULT_EXCLUDE", "DEFAULT_TYPES", "collect_grads", "iter_grads", "GradStats", "default_loss",
    "apply_masks",
    "masks_from_zeros", "FisherCache", "PruningConfig", "GradualPruningConfig",
    "prune_oneshot_distributed",
    "DistributedPruner", "estimate_memory", "MemoryEstimate", "plan_placement",
    "plan_fisher_placement", "FisherPart",
]
