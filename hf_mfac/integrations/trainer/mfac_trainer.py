"""Building ``hf_mfac.MFAC`` inside ``transformers.Trainer``.

Two ways, for the two kinds of users:

* :class:`MFACTrainer` — a ``Trainer`` that understands ``args.optim == "mfac"``
  (:class:`~hf_mfac.integrations.MFACTrainingArguments`), so ``--optim mfac`` on the command line is
  enough.
* :func:`mfac_optimizer_cls_and_kwargs` — for any ``Trainer`` (subclass), e.g. a question-answering
  trainer: ``QuestionAnsweringTrainer(...,
  optimizer_cls_and_kwargs=mfac_optimizer_cls_and_kwargs(args))``.

Either way the Trainer builds its usual parameter groups (weight decay on weights, none on biases
and LayerNorm), wraps the optimizer for accelerate (gradient accumulation, DDP, bf16, fp16 with its
gradient scaler), schedules the learning rate through ``param_group["lr"]``, and saves/restores
``optimizer.state_dict()`` — the whole gradient window — with each checkpoint, so
``resume_from_checkpoint`` continues exactly. What M-FAC sees each optimizer step is the gradient
the Trainer would hand to AdamW: accumulated over micro-batches, all-reduced over DDP ranks,
unscaled and clipped to ``max_grad_norm`` (see :class:`~hf_mfac.integrations.MFACTrainingArguments`
for why clipping is kept). A step that the fp16 gradient scaler skips for overflow never calls
``optimizer.step()``, so the overflowed gradient never enters the window.

``MFACTrainer.push_to_hub`` (and the repository creation of ``push_to_hub=True``) turn "the Hub
cannot be reached" (no network, ``HF_HUB_OFFLINE=1``) into :class:`HubUnreachableError`, which says
so, names ``HF_HUB_OFFLINE`` and where the files were saved locally.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from transformers import Trainer, TrainingArguments

from ...optim import MFAC, selects_mfac
from ..checkpoint.redaction import pickled_without_secrets
from .arguments import check_supported_setup, parse_optim_args

__all__ = ["MFACTrainer", "mfac_optimizer_cls_and_kwargs", "check_supported_setup",
           "HubUnreachableError"]


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub could not be reached (no network, or offline mode); the message says
    what was saved locally and where."""


def _unreachable_types() -> tuple:
    """Exception types that mean "the Hub cannot be reached" (of the HTTP libraries that are
    loaded)."""
    # huggingface_hub's OfflineModeIsEnabled is a ConnectionError
    types = [ConnectionError, TimeoutError]
    requests = sys.modules.get("requests")
    if requests is not None:
        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            types.append(module.TransportError)
    return tuple(types)


def _hub_unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) says the Hub could not be reached."""
    types, seen = _unreachable_types(), set()
    while error is not None and id(error) not in seen:
        if isinstance(error, types):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _hub_message(what: str, error: BaseException, saved_in: str | None) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local = (
        f"The model files are saved locally in {saved_in!r}; upload them once the Hub is "
        "reachable "
        f"(trainer.push_to_hub() again, or `hf upload <repo_id> {saved_in}`)."
        if saved_in is not None
        else "Nothing was uploaded or saved yet."
    )
    mode = (
        "HF_HUB_OFFLINE=1 is set, so the Hub is not contacted: unset it to push, or train with "
        "push_to_hub=False."
        if offline
        else "To work without the Hub, set HF_HUB_OFFLINE=1 and train with push_to_hub=False."
    )
    why = f"{type(error).__name__}: {error}"
    return f"could not reach the Hugging Face Hub to {what} ({why}). {local} {mode}"


def mfac_optimizer_cls_and_kwargs(
    args_or_kwargs: TrainingArguments | dict | None = None, **overrides
):
    """Return ``(hf_mfac.MFAC, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``args_or_kwargs`` is either training arguments — :class:`MFACTrainingArguments` (its
    ``learning_rate``, ``weight_decay``, ``mfac_*`` fields and ``optim_args``) or a stock
    ``TrainingArguments`` (its ``learning_rate`` and ``weight_decay`` only; give the M-FAC settings
    as ``overrides``) — or a dict of ``MFAC`` keyword arguments in any spelling
    :func:`parse_optim_args` reads (``ngrads``, ...). ``overrides`` (same spellings) win over both.
    The Trainer passes these kwargs to ``MFAC`` as they are and does not add the learning rate, so a
    dict must contain ``lr``; with training arguments the lr is theirs, and the Trainer's lr
    scheduler then drives ``param_group["lr"]`` as usual. The Trainer's decay/no-decay parameter
    groups set ``weight_decay`` per group. Refuses FSDP/DeepSpeed (:func:`check_supported_setup`).

    Example::

        mfac = mfac_optimizer_cls_and_kwargs(args, ngrads=512)
        trainer = QuestionAnsweringTrainer(model=model, args=args, ...,
                                           optimizer_cls_and_kwargs=mfac)
    """
    if isinstance(args_or_kwargs, TrainingArguments):
        check_supported_setup(args_or_kwargs)
        if hasattr(args_or_kwargs, "mfac_kwargs"):
            kwargs = args_or_kwargs.mfac_kwargs()
        else:
            kwargs = {
                "lr": args_or_kwargs.learning_rate,
                "weight_decay": args_or_kwargs.weight_decay,
            }
    else:
        kwargs = parse_optim_args(
            dict(args_or_kwargs or {}), source="mfac_optimizer_cls_and_kwargs"
        )
    kwargs.update(parse_optim_args(overrides, source="mfac_optimizer_cls_and_kwargs"))
    if "lr" not in kwargs:
        raise ValueError(
            "mfac_optimizer_cls_and_kwargs: give `lr` (Trainer passes these kwargs as "
            "they are and "
            "does not add the learning rate), or pass the TrainingArguments"
        )
    return MFAC, kwargs


class MFACTrainer(Trainer):
    """``transformers.Trainer`` that builds ``hf_mfac.MFAC`` when ``args.optim == "mfac"``.

    Use with :class:`~hf_mfac.integrations.MFACTrainingArguments`; any other ``optim`` behaves
    exactly as in ``Trainer``. The optimizer gets the Trainer's parameter groups
    (``args.weight_decay`` on weights, 0 on biases and LayerNorm) and its learning-rate schedule;
    its state, the gradient window included, is saved with every checkpoint and restored by
    ``train(resume_from_checkpoint=...)``. FSDP and DeepSpeed are refused
    (:func:`check_supported_setup`). ``create_model_card`` writes hf_mfac's card when
    ``hf_mfac.integrations.card.model_card`` is available, the stock card otherwise. ``push_to_hub``
    without a reachable Hub (no network, ``HF_HUB_OFFLINE=1``) saves the model locally and raises
    :class:`HubUnreachableError` saying so.

    Gradient scale: transformers 5.x assumes a model whose ``forward`` takes ``**kwargs`` normalises
    its loss by ``num_items_in_batch``, and then neither divides by the accumulation steps nor
    undoes the multiplication by the number of processes. Most models (BERT/ViT classification among
    them) ignore ``num_items_in_batch``, so their gradient comes out (accumulation steps x
    processes) too large. AdamW does not care; M-FAC's step ``F^{-1} g`` does. With
    ``optim="mfac"``, unless a ``compute_loss_func`` is given or the model declares
    ``accepts_loss_kwargs``, this trainer therefore sets ``model_accepts_loss_kwargs = False``:
    every micro-batch loss is a mean and is divided by the accumulation steps, so M-FAC sees the
    mean gradient of the optimizer step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from ..log_level import follow_log_level

        follow_log_level(self.args)  # hf_mfac's loggers follow --log_level as transformers' do
        if selects_mfac(self.args):
            check_supported_setup(self.args, self)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.compute_loss_func is None and not hasattr(unwrapped, "accepts_loss_kwargs"):
                self.model_accepts_loss_kwargs = False

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None):
        if selects_mfac(args):
            return mfac_optimizer_cls_and_kwargs(args)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """As ``Trainer._save``; ``training_args.bin`` (uploaded by ``push_to_hub``) is written
        without ``hub_token`` (:func:`~hf_mfac.integrations.checkpoint.pickled_without_secrets`)."""
        with pickled_without_secrets(self.args):
            super()._save(output_dir, state_dict=state_dict)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """As ``Trainer._push_from_checkpoint``; ``training_args.bin`` without ``hub_token``."""
        with pickled_without_secrets(self.args):
            super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(self, **info) -> None:
        """Write ``README.md`` in ``args.output_dir``: hf_mfac's card (M-FAC/sparsity metadata) if
        available."""
        try:
            from ..card.model_card import write_trainer_model_card
        except ImportError:
            return super().create_model_card(**info)
        if self.is_world_process_zero():
            write_trainer_model_card(self, self.args.output_dir, **info)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """As ``Trainer.init_hf_repo``; an unreachable Hub raises :class:`HubUnreachableError`."""
        try:
            return super().init_hf_repo(token=token, private=private)
        except Exception as e:
            if isinstance(e, HubUnreachableError) or not _hub_unreachable(e):
                raise
            raise HubUnreachableError(_hub_message("create the repository", e, None)) from e

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """As ``Trainer.push_to_hub``. When the Hub cannot be reached (no network,
        ``HF_HUB_OFFLINE=1``) the model, its card and the training arguments are still saved in
        ``args.output_dir`` and :class:`HubUnreachableError` says so (instead of a bare connection
        error)."""
        if self.hub_model_id is None:
            try:
                self.init_hf_repo(
                    token=token if token is not None else self.args.hub_token, private=private
                )
            except HubUnreachableError as e:
                cause = e.__cause__ or e
                self.save_model(_internal_call=True)
                if self.is_world_process_zero():
                    name = kwargs.pop("model_name", None) or Path(self.args.output_dir).name
                    self.create_model_card(model_name=name, **kwargs)
                raise HubUnreachableError(
                    _hub_message("create the repository", cause, self.args.output_dir)
                ) from cause
        try:
            return super().push_to_hub(
                commit_message=commit_message,
                blocking=blocking,
                token=token,
                revision=revision,
                private=private,
                **kwargs,
            )
        except Exception as e:
            if isinstance(e, HubUnreachableError) or not _hub_unreachable(e):
                raise
            raise HubUnreachableError(
                _hub_message("upload the model", e, self.args.output_dir)
            ) from e
