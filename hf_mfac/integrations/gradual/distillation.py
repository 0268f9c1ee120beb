"""Knowledge distillation from a frozen dense teacher, as in oBERT's gradual-pruning recipe: a
Trainer mixin (:class:`DistillationMixin`), the ready ``Trainer`` (:class:`DistillationTrainer`) and
the loss."""
from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

__all__ = ["distillation_loss", "DistillationMixin", "DistillationTrainer"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 2.0) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` averaged over all rows (the last dimension is the
    class axis)."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float() / temperature
    return nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean",
                                log_target=True) \
        * temperature**2


_LOGIT_KEYS = ("logits", "start_logits", "end_logits")


class DistillationMixin:
    """Trainer mixin: ``loss = (1 - hardness) * task_loss + hardness * KD`` from a frozen dense
    ``teacher_model``, KD averaged over the logits the outputs share (``logits``;
    ``start_logits``/``end_logits`` for QA), as in the oBERT recipe (distillation from the dense
    model during gradual pruning). ``hardness=0`` or no teacher: the plain Trainer loss."""

    def __init__(self, *args, teacher_model: nn.Module | None = None, distill_hardness: float = 1.0,
                 distill_temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= distill_hardness <= 1.0:
            raise ValueError(f"distill_hardness must lie in [0, 1]; got {distill_hardness}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0; got {distill_temperature}")
        self.teacher_model = teacher_model
        self.distill_hardness = float(distill_hardness)
        self.distill_temperature = float(distill_temperature)
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            teacher_model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if self.teacher_model is not None and self.distill_hardness > 0 and model.training:
            with torch.no_grad():
                teacher_out = self.teacher_model(**inputs)
            keys = [
                k
                for k in _LOGIT_KEYS
                if _get(outputs, k) is not None and _get(teacher_out, k) is not None
            ]
            if not keys:
                raise ValueError(
                    "distillation needs `logits` (or `start_logits`/`end_logits`) in both outputs"
                )
            kd = sum(
                distillation_loss(_get(outputs, k), _get(teacher_out, k), self.distill_temperature)
                for k in keys
            ) / len(keys)
            loss = (1.0 - self.distill_hardness) * loss + self.distill_hardness * kd
        return (loss, outputs) if return_outputs else loss


def _get(out, key):
    return out.get(key) if isinstance(out, dict) else getattr(out, key, None)


class DistillationTrainer(DistillationMixin, Trainer):
    """``Trainer`` with :class:`DistillationMixin` (``teacher_model=``, ``distill_hardness=``,
    ``distill_temperature=``).
    For M-FAC: ``class T(DistillationMixin, MFACTrainer): pass``."""
