"""One-shot pruning and sparsity sweeps: the public entry points.

``prune_oneshot`` reaches the target in ``recompute`` steps that each prune the same fraction of the
remaining weights ([M-FAC, App. D.4.2]), collecting fresh gradients before each step; the work is
done by :func:`~hf_mfac.pruning.driver.run_oneshot`, or, inside an initialised process group of
several ranks, by :func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed`, so the ranks never
diverge. The settings are a :class:`~hf_mfac.pruning.PruningConfig` value; the keywords of
``prune_oneshot`` named after its fields override them
(:func:`~hf_mfac.pruning.config.oneshot_config`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..comm import Comm
from .config import FROM_CONFIG, SETTINGS, PruningConfig, oneshot_config
from .distributed import prune_oneshot_distributed
from .driver import FisherCache, PruneReport, PruneResult, restore_on_error, run_oneshot
from .pruners import Pruner
from .targets import DEFAULT_TYPES

__all__ = ["prune_oneshot", "prune_sweep"]

def _several_ranks(method) -> bool:
    """True inside an initialised process group of more than one rank, unless ``method`` is already
    distributed (a :class:`~hf_mfac.pruning.distributed.DistributedPruner`, which brings its own
    group)."""
    return not getattr(method, "runs_over_ranks", False) and Comm().distributed


def prune_oneshot(model: nn.Module, dataloader=None, config: PruningConfig | None = None, *,
                  method: str | Pruner = FROM_CONFIG, sparsity: float | None = FROM_CONFIG,
                  num_grads: int | None = FROM_CONFIG, block_size: int | None = FROM_CONFIG,
                  damp: float | None = FROM_CONFIG, rel_damp: float | None = FROM_CONFIG,
                  recompute: int = FROM_CONFIG, scope: str = FROM_CONFIG,
                  pattern: str | None = FROM_CONFIG, woodtaylor: bool = FROM_CONFIG,
                  include=FROM_CONFIG, exclude=FROM_CONFIG,
                  fisher_batch_size: int | None = FROM_CONFIG, per_sample: bool = FROM_CONFIG,
                  types: Sequence[type] = DEFAULT_TYPES,
                  targets: Mapping[str, torch.Tensor] | None = None,
                  masks: Mapping[str, torch.Tensor] | None = None, loss_fn: Callable | None = None,
                  device=None, page_bytes: int | None = None, chunk_size: int | None = None,
                  fisher_cache: FisherCache | None = None, progress: bool = True) -> PruneResult:
    """Prune ``model`` in place to ``config.sparsity`` with ``config.method``; return
    ``(masks, report)``.

    ``prune_oneshot(model, dataloader, config)`` with a :class:`~hf_mfac.pruning.PruningConfig`;
    each setting keyword (``method`` to ``per_sample``) given overrides its field
    (``prune_oneshot(model, dl, config, sparsity=0.9)``); left out, it is the config's
    (``PruningConfig()``'s defaults without a config: ``method="obert"``, ``recompute=1``,
    ``scope="global"``, the method's ``num_grads``/``block_size``/``rel_damp``).

    Args:
        model: any ``nn.Module``; the dataloader's batches must give ``model(**batch).loss`` (or
            pass ``loss_fn(model, batch) -> loss``).
        dataloader: batches for the gradients (Fisher methods); each batch (or each
            ``fisher_batch_size`` slice of it, ``per_sample=True`` for single samples) gives one
            gradient. Re-iterated for each recomputation.
        config: the settings (method, sparsity, num_grads, ...). Settings that do not apply to the
            method (``block_size``/``damp``/``num_grads`` for magnitude) are ignored with a note on
            logger "hf_mfac", so one config can serve a comparison of methods.
        method: "magnitude", "obert" (WoodFisher/oBERT), "mfac" (static M-FAC) or "cap", or a
            :class:`~hf_mfac.pruning.Pruner`; ``block_size``/``rel_damp``/``num_grads`` default to
            the method's.
        rel_damp, damp: the Fisher's damping, by default ``rel_damp`` (λ a fraction of the mean
            Fisher diagonal over all target weights, one λ for every block: the masks do not
            depend on the scale of the loss);
            ``damp`` is an absolute λ instead (the papers' setting, ``F = damp*I + G^T G / m``).
            Give at most one.
        sparsity: fraction of the target weights to prune, exactly (rounded to whole units); implied
            by N:M.
        recompute: number of steps, each on fresh gradients, pruning the same fraction of what
            remains.
        scope: "global" (one threshold) or "layer" (uniform per target).
        pattern: None/"unstructured", "N:M" (e.g. "2:4"), or "G-block" (e.g. "4-block").
        woodtaylor: add the first-order term ([WoodFisher, §6.2]) for "obert"/"mfac".
        include, exclude, types: target selection (:func:`find_prunable`; ``exclude=None`` keeps no
            module out), or ``targets={name: param}``.
        masks: existing masks ``{name: bool}`` (True = kept); those weights stay pruned.
        device: where the Fisher and the solves live (every device named must exist, else
            ``ValueError`` before any work). None (default): the targets' device, or, for a model
            whose targets lie on several devices (dispatched by accelerate with a
            ``device_map``), each target's Fisher blocks on its own weight's device. One device
            (``"cuda:1"``): the whole Fisher there. Several (``["cuda:0", "cuda:1", "cpu"]``, or
            with capacities in bytes ``{"cuda:0": 30 * 2**30, "cpu": 60 * 2**30}``) or
            ``"auto"`` (the visible GPUs, then the CPU): the block Fisher of "obert"/"cap" in
            contiguous ranges of blocks, the accelerators sharing them in proportion to their
            free memory (or the capacity given), the CPU taking only what they cannot hold
            (:mod:`hf_mfac.pruning.placement`; a plan that cannot fit is a ``MemoryError``
            before any work). The plan is logged and recorded in ``report.placement``; the
            selection and the update run on the first accelerator used (else the CPU) and are
            written back in place into each weight on its device. ``page_bytes`` pages the
            static M-FAC gradients through its one device. Targets offloaded by accelerate (on
            the meta device) are refused before any work.
        chunk_size: gradients handed to the Fisher at a time (default: up to 32 within 256 MiB of
            fp32 gradients). Each chunk costs one pass over the block-Fisher accumulator, so a
            larger chunk makes the build faster for ``chunk_size * D * 4`` bytes on ``device``.
        fisher_cache: a :class:`FisherCache` shared by several runs from the same model state (a
            comparison of methods and sparsities): the first step reuses its Fisher inverse instead
            of recollecting the gradients when nothing it depends on changed
            (``report.fisher_reused``).

    Everything is validated (every setting on its own, then pattern vs shapes, block size vs
    pattern, data size, frozen targets, memory) before any work. A ``block_size`` larger than every
    target is lowered to the largest target's size (rounded up to the pattern's unit; logged on
    logger "hf_mfac"): each target is padded to whole blocks, so the larger block would give the
    same inverse at many times the memory and time. The Fisher methods need autograd: a call inside
    ``torch.inference_mode()`` is refused (``torch.no_grad()`` is fine: the gradients are taken
    under ``torch.enable_grad()``).

    All or nothing: if anything raises, KeyboardInterrupt included (a failed or interrupted
    recomputation step, a non-finite result), the target weights are copied back exactly and the
    exception propagates. This costs one host (CPU) copy of the target weights, taken just before
    the first weight is written (after the first step's gradients, inversion and selection, which
    do not change the model) and held to the end of the call. Every module's train/eval mode is as
    it was on entry, whatever happens.

    Inside an initialised ``torch.distributed`` process group of more than one rank this is
    :func:`~hf_mfac.pruning.distributed.prune_oneshot_distributed` (call it on every rank;
    ``num_grads`` counts the gradients of all ranks, each rank takes its shard of the dataloader),
    so that every rank ends with the same model. To prune each rank's model on its own, give a group
    of one rank: ``prune_oneshot_distributed(..., group=new_subgroups(group_size=1)[0])`` (from
    ``torch.distributed``).
    """
    given = dict(method=method, sparsity=sparsity, num_grads=num_grads, block_size=block_size,
                 damp=damp, rel_damp=rel_damp, recompute=recompute, scope=scope, pattern=pattern,
                 woodtaylor=woodtaylor, include=include, exclude=exclude,
                 fisher_batch_size=fisher_batch_size, per_sample=per_sample)
    config = oneshot_config(config, **{k: v for k, v in given.items() if v is not FROM_CONFIG})
    runtime = dict(types=types, targets=targets, masks=masks, loss_fn=loss_fn, device=device,
                   page_bytes=page_bytes, chunk_size=chunk_size, fisher_cache=fisher_cache,
                   progress=progress)
    if _several_ranks(config.method):  # every rank must end with the same model: prune over all
        if isinstance(device, (list, tuple, Mapping)) or (
                isinstance(device, str) and device.strip().lower() == "auto"):
            raise ValueError(
                f"device={device!r}: under several processes the Fisher is sharded over the "
                "ranks; give each rank one device (e.g. device=f'cuda:{local_rank}')"
            )
        return prune_oneshot_distributed(model, dataloader, config, **runtime)
    return run_oneshot(model, dataloader, config, **runtime)


def prune_sweep(model: nn.Module, dataloader=None, sparsities: Sequence[float] = (),
                config: PruningConfig | None = None, *,
                save_fn: Callable[[float, nn.Module, dict, PruneReport], None] | None = None,
                **kwargs) -> list[PruneResult]:
    """Several targets in one run ([CAP, §3.2]): prune to each sparsity in increasing order,
    starting from the previous masks, and call ``save_fn(sparsity, model, masks, report)`` after
    each (e.g. to write a checkpoint per target). ``sparsities``: the targets (default:
    ``config.sparsities``); ``config`` and ``kwargs`` as in :func:`prune_oneshot` (``recompute``
    applies per target): ``prune_sweep(model, dataloader, config=PruningConfig(sparsities=[0.5,
    0.7], num_grads=256))``.

    All or nothing, as :func:`prune_oneshot`: if a target fails (or the run is interrupted), the
    target weights are copied back to what they were before the call, unless ``save_fn`` already
    returned for some targets: then to what they were when the last ``save_fn`` returned, so the
    model agrees with the last checkpoint written (the exception carries a note naming the targets
    that were saved). Memory: one host copy of the target weights, from the first weight update
    to the end of the sweep."""
    config = _sweep_config(config, sparsities, {k: kwargs.pop(k) for k in SETTINGS if k in kwargs})
    types = kwargs.pop("types", DEFAULT_TYPES)
    if kwargs.get("targets") is None:  # resolved once, for the guard and every target
        kwargs["targets"] = config.find_targets(model, types)
    masks = kwargs.pop("masks", None)
    one = config.replace(sparsities=None)
    results, saved = [], []
    try:
        # the copy is taken when the first run first writes the weights
        with restore_on_error(kwargs["targets"], lazy=True) as commit:
            for s in config.sparsities:
                res = prune_oneshot(model, dataloader, one.replace(sparsity=s), masks=masks,
                                    **kwargs)
                masks = res.masks
                results.append(res)
                if save_fn is not None:
                    save_fn(s, model, res.masks, res.report)
                    commit()
                    saved.append(s)
    except BaseException as e:
        if saved:
            e.add_note(f"prune_sweep: sparsities {saved} were saved by save_fn; the model is left "
                       f"as at the last ({saved[-1]})")
        raise
    return results


def _sweep_config(config: PruningConfig | None, sparsities, settings: dict) -> PruningConfig:
    """The settings of a sweep: ``config`` with ``settings`` and the ``sparsities`` (when given)
    applied."""
    if config is not None and not isinstance(config, PruningConfig):
        raise TypeError(f"config must be a hf_mfac.pruning.PruningConfig; got "
                        f"{type(config).__name__}")
    config = config or PruningConfig()
    if sparsities is not None and len(sparsities):
        settings["sparsities"] = list(sparsities)
    if not settings.get("sparsities", config.sparsities):
        raise ValueError("give at least one target sparsity")
    if "exclude" in settings and settings["exclude"] is None:
        settings["exclude"] = []  # as in prune_oneshot: nothing excluded
    return config.replace(sparsity=None, **settings)
