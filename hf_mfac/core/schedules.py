"""Sparsity and learning-rate schedules for pruning."""
from __future__ import annotations

import bisect
import warnings
from typing import Callable, Sequence

import torch

from ._checks import check_positive_int, check_sparsity

__all__ = ["cubic_sparsity", "equal_fraction_schedule", "cyclic_linear_lr", "cyclic_linear_lambda",
           "cyclic_linear_scheduler"]


def cubic_sparsity(step: int, *, start_step: int, end_step: int, initial_sparsity: float,
                   final_sparsity: float) -> float:
    """Cubic gradual schedule (Zhu & Gupta 2017, used by oBERT and WoodFisher): ``s_t = s_f + (s_i -
    s_f) * (1 - (t - t_0) / (t_1 - t_0))^3`` for ``t`` in [t_0, t_1], constant outside."""
    check_sparsity(initial_sparsity, "initial_sparsity")
    check_sparsity(final_sparsity, "final_sparsity")
    if end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be greater than start_step ({start_step})")
    if step < start_step:
        return 0.0
    frac = min(1.0, (step - start_step) / (end_step - start_step))
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


def equal_fraction_schedule(target: float, steps: int, initial: float = 0.0) -> list[float]:
    """Sparsities after each of ``steps`` recomputations that prune the same fraction of the
    remaining weights each time [M-FAC, App. D.4.2]: density_i = (1-s_0) * ((1-s)/(1-s_0))^(i/k).
    The last is ``target``."""
    check_sparsity(target, "target")
    check_sparsity(initial, "initial")
    steps = check_positive_int("steps", steps)
    if target < initial:
        raise ValueError(f"target sparsity {target} is below the current sparsity {initial}; masks "
                         "never regrow")
    ratio = (1.0 - target) / (1.0 - initial)
    out = [1.0 - (1.0 - initial) * ratio ** (i / steps) for i in range(1, steps + 1)]
    out[-1] = target
    return out


def cyclic_linear_lr(step: int, *, lr_max: float, lr_min: float, period: int) -> float:
    """CAP's cyclic linear schedule [CAP, eq. 8]: ``lr_max - (lr_max - lr_min) * (t % T) / T``."""
    period = check_positive_int("period", period)
    return lr_max - (lr_max - lr_min) * (step % period) / period


def cyclic_linear_lambda(prune_steps: Sequence[int], max_steps: int,
                         lr_min_ratio: float = 0.02) -> Callable[[int], float]:
    """LR factor for ``LambdaLR``: CAP's cyclic linear schedule [CAP, eq. 8] restarted at every
    pruning step: from 1 right after a pruning step down to ``lr_min_ratio`` just before the next
    one (after the last, down to ``lr_min_ratio`` at ``max_steps``); 1 before the first."""
    steps = sorted(set(int(s) for s in prune_steps))
    ends = steps[1:] + [max(int(max_steps), (steps[-1] + 1) if steps else 1)]

    def factor(t: int) -> float:
        i = bisect.bisect_right(steps, t) - 1
        if i < 0:
            return 1.0
        period = max(1, ends[i] - steps[i])
        if t - steps[i] >= period:
            return lr_min_ratio
        return cyclic_linear_lr(t - steps[i], lr_max=1.0, lr_min=lr_min_ratio, period=period)
    return factor


def cyclic_linear_scheduler(optimizer, prune_steps: Sequence[int], max_steps: int,
                            lr_min_ratio: float = 0.02,
                            last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`cyclic_linear_lambda`, positioned at ``last_step`` (for resumed
    runs)."""
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cyclic_linear_lambda(prune_steps, max_steps, lr_min_ratio)
    )
    if last_step:
        with warnings.catch_warnings():
            # stepping a scheduler before the optimizer: intended here
            warnings.simplefilter("ignore")
            sched.last_epoch = last_step - 1
            sched.step()
    return sched
