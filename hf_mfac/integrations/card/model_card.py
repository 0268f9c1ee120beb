"""Model cards for sparse and M-FAC-trained models, and publishing them to the Hub.

* :func:`create_sparse_model_card` — ``README.md`` from the templates in ``model_cards/`` (installed
  as ``hf_mfac._model_cards``; read from the checkout's ``model_cards/`` when not installed): YAML
  front matter built with ``huggingface_hub.ModelCardData`` (library, tags, base model, datasets,
  metrics, ``model-index`` from ``EvalResult``), then hf_mfac's marked section: sparsity summary,
  per-layer table and plot, recipe and command, M-FAC hyperparameters, evaluation. An existing card
  is updated: its metadata is merged and only the text between the ``<!-- hf_mfac:start ... -->`` /
  ``<!-- hf_mfac:end -->`` markers is replaced (appended when absent). *
  :func:`write_trainer_model_card` — the same from a ``Trainer`` (what
  ``MFACTrainer.create_model_card`` calls), so ``trainer.push_to_hub()`` uploads this card and the
  sparse checkpoint. * :func:`push_sparse_to_hub` — save
  (:func:`~hf_mfac.integrations.save_sparse_pretrained`), write the card, and upload with
  ``huggingface_hub.HfApi`` (``create_repo`` + ``upload_folder``).

Nothing secret reaches a card: every string that goes into it (each metadata field, the description,
metric names, ``EvalResult`` fields, the command line, the recipe and the hyperparameters) is
redacted by rule (:func:`~hf_mfac.integrations.checkpoint.redaction.redact`,
:func:`~hf_mfac.integrations.checkpoint.redaction.redact_argv`), not by a list of flags, and the
finished card, an updated card's own text included, is passed through
:func:`~hf_mfac.integrations.checkpoint.redaction.redact_credentials` (URL userinfo, plain or
percent-encoded, and ``hf_`` tokens) in the YAML and the text alike. User strings cannot break the
card: metadata fields with a line break or control character are refused (``ValueError``) and the
rest is quoted by the YAML writer; text in the section is escaped for where it stands (table cell,
code span, code block), so it cannot close a cell or a block or forge hf_mfac's markers. The
finished card is parsed back before it is written. ``README.md`` and the plot are written through a
staging folder (:func:`~hf_mfac.integrations.checkpoint.staging.staged_save`): a failure leaves them
as they were. The section's rendering and escaping live in :mod:`.section`, what is read from a
``Trainer`` in :mod:`.trainer_info`, the redaction rules in :mod:`..checkpoint.redaction`."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .section import (
    check_line,
    format_value,
    one_line,
    format_percent,
    plot_sparsity,
    render_section,
    read_template,
    card_text,
    unmark,
    update_card,
    verify_card,
)
from ..checkpoint.files import is_checkpoint_file
from ..checkpoint.redaction import redact, redact_credentials
from ..checkpoint.sparse import log_saved, save_sparse_pretrained
from ..checkpoint.record import read_sparsity_metadata, resolve_masks, sparsity_metadata
from ..checkpoint.staging import staged_save
from .trainer_info import trainer_card_kwargs, trainer_sparsity

logger = logging.getLogger("hf_mfac")

__all__ = ["CardFields", "create_sparse_model_card", "write_trainer_model_card",
           "push_sparse_to_hub", "PLOT_NAME"]

PLOT_NAME = "sparsity_per_layer.png"
# architecture suffix -> (Auto class, pipeline tag)
_HEADS = {
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering"),
    "ForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
    "ForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "ForImageClassification": ("AutoModelForImageClassification", "image-classification"),
    "ForMultipleChoice": ("AutoModelForMultipleChoice", "multiple-choice"),
}


def _head(architectures) -> tuple[str, str | None]:
    for arch in architectures or []:
        for suffix, head in _HEADS.items():
            if arch.endswith(suffix):
                return head
    return "AutoModel", None


def _architectures(model, save_directory) -> list[str]:
    if model is not None:
        return list(getattr(model.config, "architectures", None) or [type(model).__name__])
    path = os.path.join(save_directory or "", "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("architectures") or []
    return []


def _sparsity_from(sparsity, model, masks, save_directory) -> tuple[dict | None, bool]:
    """(sparsity record, whether it is the one saved with the checkpoint): given > in
    save_directory/config.json > model.config > derived from the model's masks or zeros (not
    saved)."""
    if sparsity is not None:
        return dict(sparsity), True
    found = read_sparsity_metadata(save_directory) if save_directory else None
    if found is None and model is not None:
        found = read_sparsity_metadata(model)
        if found is None:
            m = resolve_masks(model, masks)
            if any(not bool(k.all()) for k in m.values()):
                return sparsity_metadata(model, m), False
    return found, found is not None


def _finite(value) -> bool:
    """False for a NaN or infinite number (YAML would carry ``.nan``, which no reader compares
    equal)."""
    return not isinstance(value, (int, float)) or isinstance(value, bool) or math.isfinite(value)


def _eval_results(eval_results, task, dataset_name, dataset_type, dataset_config, dataset_split):
    """(EvalResults for model-index or None, table rows, the rows left out of model-index because
    their value is NaN or infinite). A metrics mapping needs a dataset and a task to enter
    model-index; without them its rows go to the card's text only."""
    if not eval_results:
        return None, [], []
    if isinstance(eval_results, Mapping):
        named = dataset_name or dataset_type
        rows = [dict(task=task or "", dataset=named or "(not named)", split=dataset_split or "",
                     metric=k,
                     value=format_value(v)) for k, v in eval_results.items()]
        left_out = [r for r, v in zip(rows, eval_results.values()) if not _finite(v)]
        if not (named and task):
            return None, rows, left_out
        eval_results = [EvalResult(task_type=task, dataset_type=dataset_type or named,
                                   dataset_name=named,
                                   dataset_config=dataset_config, dataset_split=dataset_split,
                                   metric_type=k, metric_value=v) for k, v in eval_results.items()]
    rows = [
        dict(
            task=r.task_type,
            dataset=r.dataset_name + (f" ({r.dataset_config})" if r.dataset_config else ""),
            split=r.dataset_split or "",
            metric=r.metric_type,
            value=format_value(r.metric_value),
        )
        for r in eval_results
    ]
    left_out = [row for row, r in zip(rows, eval_results) if not _finite(r.metric_value)]
    results = [r for r in eval_results if _finite(r.metric_value)]
    return results or None, rows, left_out


def _merge_data(existing: ModelCardData | None, ours: ModelCardData) -> ModelCardData:
    """Our fields win, tags and datasets are unioned, everything else of the existing card is
    kept."""
    if existing is None:
        return ours
    merged = existing.to_dict()
    for key, value in ours.to_dict().items():
        if key in ("tags", "datasets", "metrics"):
            old = merged.get(key) or []
            old = [old] if isinstance(old, str) else list(old)
            merged[key] = old + [
                v for v in ([value] if isinstance(value, str) else value) if v not in old
            ]
        else:
            merged[key] = value
    return ModelCardData(**merged)


@dataclass
class CardFields:
    """What a model card says beyond the checkpoint's own record; every field is optional.

    Metadata (YAML): ``model_name`` (default: the repository's or the folder's name), ``repo_id``
    (also used in the loading snippet), ``base_model``, ``datasets``, ``license``, ``language``,
    ``tags`` (added to ``hf_mfac`` + ``sparse``/``pruned``/the method when sparse + ``m-fac`` when
    M-FAC), ``pipeline_tag`` (default: from the architecture). Evaluation: ``eval_results``, a list
    of ``huggingface_hub.EvalResult`` or ``{metric: value}`` with ``task`` (default: the pipeline
    tag) and ``dataset_name`` / ``dataset_type`` (default: the first of ``datasets``),
    ``dataset_config``, ``dataset_split``. Text: ``method`` and ``recipe`` (default: the sparsity
    record's), the ``command`` line, ``mfac`` and ``training`` hyperparameters, a ``description``
    (default: one sentence on the sparsity, base model and M-FAC), and ``plot`` (draw the per-layer
    sparsity plot)."""

    model_name: str | None = None
    repo_id: str | None = None
    base_model: str | None = None
    datasets: str | list[str] | None = None
    license: str | None = None
    language: str | list[str] | None = None
    tags: Iterable[str] | None = None
    pipeline_tag: str | None = None
    eval_results: list[EvalResult] | Mapping[str, float] | None = None
    task: str | None = None
    dataset_name: str | None = None
    dataset_type: str | None = None
    dataset_config: str | None = None
    dataset_split: str | None = None
    method: str | None = None
    recipe: Any = None
    command: str | None = None
    mfac: Mapping[str, Any] | None = None
    training: Mapping[str, Any] | None = None
    description: str | None = None
    plot: bool = True

    def metadata(self) -> dict[str, Any]:
        """The fields that become YAML values or lists (checked for line breaks, redacted)."""
        return {k: getattr(self, k) for k in _METADATA}

    def with_overrides(self, **overrides) -> "CardFields":
        """A copy with ``overrides`` set; ``TypeError`` naming a keyword that is no field."""
        names = [f.name for f in dataclass_fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(
                f"create_sparse_model_card() got unexpected keyword arguments "
                f"{unknown}; the card's fields are {names}"
            )
        return replace(self, **overrides)

    def redacted(self) -> "CardFields":
        """A copy with every secret out of every string (:func:`redact`); the recipe, command and
        hyperparameters are redacted where they are rendered."""
        return replace(
            self,
            **{k: redact(v) for k, v in self.metadata().items()},
            eval_results=_redact_eval_results(self.eval_results),
            description=None if self.description is None else redact(str(self.description)),
        )


_METADATA = (
    "model_name",
    "repo_id",
    "base_model",
    "datasets",
    "task",
    "dataset_name",
    "dataset_type",
    "dataset_config",
    "dataset_split",
    "license",
    "language",
    "tags",
    "pipeline_tag",
    "method",
)


def _check_fields(card: CardFields) -> None:
    """Refuse a metadata field, a metric name or an ``EvalResult`` field holding a line break or
    control character (:func:`check_line`), before anything is read or written."""
    for field, value in card.metadata().items():
        check_line(
            field,
            list(value)
            if field == "tags" and value is not None and not isinstance(value, str)
            else value,
        )
    eval_results = card.eval_results
    if isinstance(eval_results, Mapping):
        check_line("eval_results (metric names)", [str(k) for k in eval_results])
    elif eval_results:
        for r in eval_results:
            for k, v in vars(r).items():
                check_line(f"EvalResult.{k}", v)


def _redact_eval_results(eval_results):
    """``eval_results`` with secrets out of every string: metric names, ``EvalResult`` fields."""
    if isinstance(eval_results, Mapping):
        return {redact(str(k)): v for k, v in eval_results.items()}
    if eval_results:
        return [
            replace(r, **{k: redact(v) for k, v in vars(r).items() if isinstance(v, str)})
            for r in eval_results
        ]
    return eval_results


def _clean(
    card: ModelCard, data: ModelCardData, section: str
) -> tuple[ModelCard, ModelCardData, str]:
    """The last net: credentials found by shape (:func:`redact_credentials`) anywhere in the
    finished card, an updated card's hand-written text and metadata included, are hidden too."""
    content = redact_credentials(card.content)
    if content == card.content:
        return card, data, section
    card = ModelCard(content)
    return card, card.data, redact_credentials(section)


@dataclass
class _Resolved:
    """What :func:`create_sparse_model_card` renders, its defaults filled in (see
    :func:`_resolve`)."""

    meta: dict | None  # the sparsity record, None for a dense model
    saved: bool  # whether ``meta`` is the record saved with the checkpoint
    method: str | None
    recipe: Any
    auto_class: str
    model_name: str
    results: list[EvalResult] | None  # for model-index; None when a dataset or the task is unknown
    eval_rows: list[dict]
    left_out: list[dict]  # rows whose value is NaN or infinite: in the text, not in model-index
    is_mfac: bool  # M-FAC hyperparameters given, or the method is "mfac"
    plot_file: str | None
    data: ModelCardData  # the YAML metadata (before merging with an existing card)


def _resolve(sparsity, model, masks, save_directory, f: CardFields) -> _Resolved:
    """The card's inputs with their defaults: the sparsity record (:func:`_sparsity_from`), the
    method and recipe from it, the pipeline tag from the architecture, the model name from the
    repository or the folder, the task and dataset of a metrics mapping from the pipeline tag and
    ``datasets``; and the YAML metadata built from them."""
    meta, saved = _sparsity_from(sparsity, model, masks, save_directory)
    method = f.method or (meta or {}).get("method")
    check_line("method", method)
    recipe = f.recipe if f.recipe is not None else (meta or {}).get("recipe")
    auto_class, inferred_tag = _head(_architectures(model, save_directory))
    pipeline_tag = f.pipeline_tag or inferred_tag
    datasets = f.datasets
    datasets = [datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None)
    model_name = (
        f.model_name
        or (f.repo_id or "").split("/")[-1]
        or (
            one_line(os.path.basename(os.path.normpath(save_directory)))
            if save_directory
            else "model"
        )
    )
    first_dataset = datasets[0] if datasets else None
    results, eval_rows, left_out = _eval_results(
        f.eval_results,
        f.task or pipeline_tag,
        f.dataset_name or first_dataset,
        f.dataset_type or first_dataset,
        f.dataset_config,
        f.dataset_split,
    )
    is_mfac = bool(f.mfac) or method == "mfac"
    all_tags = _card_tags(meta, method, is_mfac, f.tags)
    data = ModelCardData(
        library_name="transformers",
        tags=all_tags,
        base_model=f.base_model,
        datasets=datasets,
        license=f.license,
        language=f.language,
        pipeline_tag=pipeline_tag,
        eval_results=results,
        metrics=sorted({r.metric_type for r in results}) if results else None,
        model_name=model_name if results else None,
    )
    plot_file = PLOT_NAME if (f.plot and meta and save_directory) else None
    return _Resolved(
        meta,
        saved,
        method,
        recipe,
        auto_class,
        model_name,
        results,
        eval_rows,
        left_out,
        is_mfac,
        plot_file,
        data,
    )


def _card_tags(meta, method, is_mfac: bool, tags) -> list[str]:
    """``hf_mfac`` + ``sparse``, ``pruned`` and the method when sparse + ``m-fac`` + the user's
    ``tags``."""
    all_tags = ["hf_mfac"] + (["sparse", "pruned"] + ([method] if method else []) if meta else [])
    all_tags += ["m-fac"] if is_mfac else []
    all_tags += [
        t for t in ([tags] if isinstance(tags, str) else (tags or [])) if t not in all_tags
    ]
    return all_tags


def _new_or_updated_card(
    save_directory, r: _Resolved, section: str, *, base_model, description
) -> tuple[ModelCard, ModelCardData]:
    """(card, its metadata): the existing ``README.md`` of ``save_directory`` with its metadata
    merged and hf_mfac's section replaced, else a new card from the ``model_card.md`` template
    (``description`` defaulting to one sentence on the sparsity, the base model and M-FAC)."""
    readme = os.path.join(save_directory, "README.md") if save_directory else None
    if readme and os.path.isfile(readme):
        old = ModelCard.load(readme)  # a broken YAML header raises here
        data = _merge_data(old.data, r.data)
        return update_card(old, data, section), data
    if description is None:
        pct = format_percent(r.meta["sparsity"]) if r.meta else ""
        article = "An" if pct[:1] == "8" or pct[:3] in ("11.", "18.") else "A"  # "An 80.00%"
        what = f"{article} {pct} sparse" if r.meta else "A"
        base = (
            " version of "
            f"[{card_text(base_model)}](https://huggingface.co/{quote(base_model, safe='/')})"
            if isinstance(base_model, str)
            else " model"
        )
        how = " trained with the M-FAC optimizer" if r.is_mfac else ""
        description = f"{what}{base}{how}, produced with hf_mfac."
    card = ModelCard.from_template(
        r.data,
        template_str=read_template("model_card.md"),
        model_name=card_text(r.model_name),
        description=unmark(redact(str(description))),
        hf_mfac_section=section,
    )
    return card, r.data


def _write_card(save_directory, card: ModelCard, r: _Resolved) -> None:
    """``README.md`` and, when wanted, the per-layer plot, through one staged save (a failure
    changes nothing)."""
    with staged_save(save_directory) as stage:
        if r.plot_file:
            plot_sparsity(r.meta["per_layer"], os.path.join(stage, r.plot_file))
        card.save(os.path.join(stage, "README.md"))


def create_sparse_model_card(
    save_directory: str | os.PathLike | None = None,
    card: CardFields | None = None,
    *,
    model=None,
    sparsity: Mapping | None = None,
    masks: Mapping | None = None,
    **fields,
) -> ModelCard:
    """Build (and, with ``save_directory``, write) the model card of a sparse and/or M-FAC-trained
    model.

    What the card says is ``card`` (a :class:`CardFields`), with any of its fields given as keywords
    on top (``create_sparse_model_card(folder, base_model=..., eval_results=...)`` is the same as
    passing ``CardFields(base_model=..., eval_results=...)``); an unknown keyword raises
    ``TypeError``.

    Sparsity comes from ``sparsity`` (a ``hf_mfac_sparsity`` record), else
    ``save_directory/config.json`` (as written by
    :func:`~hf_mfac.integrations.save_sparse_pretrained`), else ``model.config``, else ``model``'s
    ``masks`` or exact zeros (:func:`~hf_mfac.integrations.checkpoint.record.resolve_masks`); a
    model with none gets a card saying it is dense. ``method`` and ``recipe`` default to the
    record's.

    Metadata: ``library_name: transformers``, the tags, and the fields of :class:`CardFields`;
    ``model-index`` from ``eval_results``. A metrics mapping without a dataset is shown in the text
    only, a NaN or infinite metric is named in the text and left out of ``model-index``, and a card
    without results says so in a marked paragraph; the YAML never carries a partial ``model-index``.

    Writing to ``save_directory``: ``README.md`` (an existing one is loaded with ``ModelCard.load``,
    its metadata merged — ours wins, tags/datasets/metrics unioned — and only hf_mfac's marked
    section replaced or appended) and, with ``plot``, ``sparsity_per_layer.png`` (matplotlib).
    Returns the ``ModelCard``."""
    f = (card or CardFields()).with_overrides(**fields)
    _check_fields(f)
    f = f.redacted()
    r = _resolve(sparsity, model, masks, save_directory, f)
    section = render_section(
        r.meta,
        saved=r.saved,
        method=r.method,
        auto_class=r.auto_class,
        repo_id=f.repo_id or r.model_name,
        plot_file=r.plot_file,
        recipe=r.recipe,
        command=f.command,
        mfac=f.mfac,
        training=f.training,
        eval_rows=r.eval_rows,
        in_model_index=r.results is not None,
        left_out=r.left_out,
    )
    readme, data = _new_or_updated_card(
        save_directory, r, section, base_model=f.base_model, description=f.description
    )
    readme, data, section = _clean(readme, data, section)
    verify_card(readme, data, section)
    if save_directory:
        _write_card(save_directory, readme, r)
    return readme


# -- Trainer
# ---------------------------------------------------------------------------------------------


def write_trainer_model_card(
    trainer, output_dir: str | os.PathLike | None = None, **info
) -> ModelCard:
    """Write hf_mfac's card (and, for a sparse model, its sparsity record) for ``trainer`` into
    ``output_dir``.

    For ``MFACTrainer.create_model_card``: ``Trainer.push_to_hub`` calls ``save_model`` and then
    ``create_model_card(**kwargs)`` before uploading ``output_dir``, so this card (not the generic
    one) is what reaches the Hub. ``info`` takes ``Trainer.create_model_card``'s arguments
    (``language``, ``license``, ``tags``, ``model_name``, ``finetuned_from`` -> base model,
    ``tasks`` -> task, ``dataset_tags`` -> datasets, ``dataset`` -> dataset name, ``dataset_args``
    -> dataset config) and any :func:`create_sparse_model_card` or
    :func:`~hf_mfac.integrations.save_sparse_pretrained` argument (``masks``, ``method``,
    ``targets``, ``pattern``, ``recipe``, ``command``...).

    Gathered from the trainer: masks (``info["masks"]``, else the first callback with a non-empty
    ``masks`` mapping — keyed by parameter name or by parameter — such as ``PruningCallback``, with
    its method, pattern and schedule as the recipe, else exact zeros in ``nn.Linear`` weights);
    M-FAC hyperparameters (``args.mfac_kwargs()`` when ``args.optim == "mfac"``, else the
    ``hf_mfac.MFAC`` optimizer's settings); training hyperparameters; the last ``eval_*`` metrics of
    ``state.log_history``; the base model from ``config._name_or_path`` when it is not a local
    folder; the command line, with secrets redacted
    (:func:`~hf_mfac.integrations.checkpoint.redaction.redact_argv`). When the model is sparse,
    ``output_dir`` is rewritten with :func:`~hf_mfac.integrations.save_sparse_pretrained` (same
    weights, plus the sparsity record in ``config.json`` and the masks file). The checkpoint and the
    card are written in one staged save: an exception leaves ``output_dir`` as it was.
    """
    output_dir = output_dir or trainer.args.output_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    masks, method, recipe, save_args = trainer_sparsity(trainer, model, info)
    resolved = resolve_masks(model, masks, save_args.get("targets"))
    sparse = any(not bool(k.all()) for k in resolved.values())
    kwargs = trainer_card_kwargs(trainer, model, output_dir, info, method=method, recipe=recipe)
    # One staged save for the checkpoint and the card: either both replace what output_dir held, or
    # neither.
    with staged_save(output_dir, stale=is_checkpoint_file if sparse else None) as stage:
        sparsity = None
        if sparse:
            sparsity = save_sparse_pretrained(
                model, stage, resolved, method=method, recipe=recipe, _log=False, **save_args
            )
        readme = os.path.join(output_dir, "README.md")
        if os.path.isfile(readme):
            shutil.copy2(readme, os.path.join(stage, "README.md"))
        card = create_sparse_model_card(stage, sparsity=sparsity, **kwargs)
    # the folder the files are in now, not the staging folder they were written to
    if sparsity is not None:
        log_saved(output_dir, sparsity)
    return card


# -- Hub
# -------------------------------------------------------------------------------------------------


def push_sparse_to_hub(
    model,
    repo_id: str,
    masks: Mapping | None = None,
    *,
    processing_class=None,
    private: bool | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload sparse model with hf_mfac",
    method: str | None = None,
    targets=None,
    pattern: str | None = None,
    recipe=None,
    save_masks: bool = True,
    **card_kwargs,
):
    """Save ``model`` sparse, write its card, and upload both to ``repo_id``; returns the
    ``CommitInfo``.

    In a temporary folder: :func:`~hf_mfac.integrations.save_sparse_pretrained` (same checks and
    errors, raised before contacting the Hub), ``processing_class.save_pretrained`` when given
    (tokenizer or image processor), and :func:`create_sparse_model_card` with ``card_kwargs`` —
    starting from the repository's current ``README.md`` when it has one, so a card written by hand
    is updated, not replaced. Then ``HfApi(endpoint, token).create_repo(repo_id, private=private,
    exist_ok=True)`` and ``upload_folder`` as one commit.
    """
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        meta = save_sparse_pretrained(
            model,
            tmp,
            masks,
            method=method,
            targets=targets,
            pattern=pattern,
            recipe=recipe,
            save_masks=save_masks,
            _log=False,
        )
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if api.file_exists(repo.repo_id, "README.md", revision=revision):
            with open(
                api.hf_hub_download(repo.repo_id, "README.md", revision=revision), encoding="utf-8"
            ) as f:
                existing = f.read()
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(existing)
        create_sparse_model_card(
            tmp, model=model, sparsity=meta, repo_id=repo.repo_id, **card_kwargs
        )
        return api.upload_folder(
            repo_id=repo.repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
        )
