"""hf_mfac's marked section of a model card, and the text rules that keep user strings from breaking
a card.

Owns the templates (``model_cards/``, installed as ``hf_mfac._model_cards``: :func:`read_template`),
the escaping of user strings for where they stand (table cell, code span, code block:
:func:`card_text`, :func:`_code`, :func:`_fenced`; metadata lines: :func:`check_line`) so that none
can close a cell or a block or forge the ``<!-- hf_mfac:start ... -->`` / ``<!-- hf_mfac:end -->``
markers, the rendering of the section (:func:`render_section`: sparsity summary, per-layer table,
recipe and command, hyperparameters, evaluation, all redacted), the per-layer plot
(:func:`plot_sparsity`), replacing the section in an existing card (:func:`update_card`), and the
check that a finished card parses back (:func:`verify_card`).
"""
from __future__ import annotations

import html
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Mapping

import torch
from huggingface_hub import ModelCard, ModelCardData

from ..checkpoint.files import hf_mfac_version
from ..checkpoint.redaction import redact_command, redact

START, END = "<!-- hf_mfac:start", "<!-- hf_mfac:end -->"
_SECTION = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)


def read_template(name: str) -> str:
    """A template from the installed ``hf_mfac._model_cards``, else from the repository's
    ``model_cards/`` next to ``hf_mfac/`` (a source checkout on ``sys.path`` without installing), as
    the CUDA sources are found."""
    try:
        return files("hf_mfac._model_cards").joinpath(name).read_text(encoding="utf-8")
    except (ImportError, TypeError, OSError):
        return (Path(__file__).resolve().parents[3] / "model_cards" / name).read_text(
            encoding="utf-8"
        )


# -- escaping: user strings must not break the YAML header, the markdown or hf_mfac's markers
# --------------

# line breaks (YAML's too) and other controls
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_MARKER = re.compile(r"<!--(?=\s*hf_mfac)", re.I)


def unmark(s: str) -> str:
    """``s`` without anything that reads as one of hf_mfac's markers (a zero-width space splits the
    ``<!--``)."""
    return _MARKER.sub("<!-\u200b-", s)


def one_line(s) -> str:
    return _CONTROL.sub(" ", str(s))


def card_text(v) -> str:
    """Inline markdown text or a table cell: one line, HTML-escaped (no tags, comments or markers),
    ``|`` escaped."""
    return html.escape(one_line(v), quote=False).replace("|", "\\|")


def _code(v, table: bool = True) -> str:
    """An inline code span holding ``v`` literally (one line; its backticks cannot close it)."""
    s = unmark(one_line(v))
    if table:
        s = s.replace("|", "\\|")
    run = max((len(m) for m in re.findall(r"`+", s)), default=0)
    return f"`{s}`" if not run else f"{'`' * (run + 1)} {s} {'`' * (run + 1)}"


def _fenced(content: str, lang: str) -> str:
    """A fenced code block holding ``content`` literally: the fence is longer than any backtick run
    in it."""
    content = unmark(str(content))
    run = max((len(m) for m in re.findall(r"`{3,}", content)), default=2)
    fence = "`" * (run + 1)
    return f"{fence}{lang}\n{content}\n{fence}"


def check_line(field: str, value) -> None:
    """Refuse a metadata value with a line break or control character (it would break the YAML
    header)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, str) and _CONTROL.search(v):
            raise ValueError(
                f"{field}={v!r} contains a line break or control character, which "
                "would break the "
                "model card's YAML metadata"
            )


def format_percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def _natural(name: str):
    """Sort key putting ``layer.2`` before ``layer.10`` (config.json stores the record with sorted
    keys)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def format_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_sparsity(per_layer: Mapping[str, Mapping], path: str) -> None:
    """Horizontal bar chart of per-layer sparsity, drawn with matplotlib's object API (no pyplot, no
    global backend change)."""
    from matplotlib.figure import Figure

    names = sorted(per_layer, key=_natural)
    values = [100 * per_layer[n]["sparsity"] for n in names]
    fig = Figure(figsize=(8, 1.2 + 0.22 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.set_title("Per-layer sparsity")
    fig.savefig(path, dpi=100)


def render_section(
    meta, *, recipe, mfac, training, method, repo_id, command, eval_rows, left_out=(), **kwargs
) -> str:
    """hf_mfac's marked section, from ``hf_mfac_section.md.jinja``; every user string escaped for
    where it stands and every secret redacted."""
    import jinja2

    rows = [
        dict(
            name=_code(n),
            shape="×".join(map(str, r["shape"])),
            sparsity=r["sparsity"],
            num_pruned=r["num_pruned"],
            numel=int(torch.Size(r["shape"]).numel()),
        )
        for n, r in sorted(
            (meta or {}).get("per_layer", {}).items(), key=lambda kv: _natural(kv[0])
        )
    ]
    recipe = redact(recipe)
    if isinstance(recipe, (dict, list)):
        import yaml

        recipe = _fenced(yaml.safe_dump(recipe, sort_keys=False).rstrip(), "yaml")
    else:
        recipe = _fenced(str(recipe), "text") if recipe else None
    command = _fenced(redact_command(str(command)), "bash") if command else None
    table = lambda d: {_code(k): card_text(v) for k, v in redact(dict(d or {})).items()}  # noqa: E731
    repo_literal = unmark(json.dumps(str(repo_id))).replace("`", "\\u0060")
    masks_file = (meta or {}).get("masks_file")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return (
        env.from_string(read_template("hf_mfac_section.md.jinja"))
        .render(
            version=hf_mfac_version(),
            sparsity=meta,
            rows=rows,
            pct=format_percent,
            recipe=recipe,
            command=command,
            mfac=table(mfac),
            training=table(training),
            method=card_text(method) if method else None,
            pattern=card_text((meta or {}).get("pattern")),
            masks_file=_code(masks_file, table=False) if masks_file else None,
            repo_literal=repo_literal,
            eval_rows=[{k: card_text(v) for k, v in r.items()} for r in eval_rows],
            left_out=[{k: card_text(v) for k, v in r.items()} for r in left_out],
            **kwargs,
        )
        .strip()
    )


def update_card(old: ModelCard, data: ModelCardData, section: str) -> ModelCard:
    """``old`` with metadata ``data`` (already merged) and hf_mfac's section replaced (or appended);
    the rest of its text kept."""
    body = old.text
    body = (
        _SECTION.sub(lambda _: section, body, count=1)
        if _SECTION.search(body)
        else (body.rstrip() + "\n\n" + section)
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body.rstrip()}\n")


def verify_card(card: ModelCard, data: ModelCardData, section: str) -> None:
    """Refuse a card whose metadata does not parse back to ``data`` or whose text does not hold
    hf_mfac's section exactly once, between exactly one pair of markers (what a later update relies
    on)."""
    parsed = ModelCard(card.content)
    if parsed.data.to_dict() != data.to_dict():
        raise ValueError(
            "the model card's YAML metadata does not parse back to what was written; "
            "a field holds "
            f"text the YAML header cannot carry: {data.to_dict()!r}"
        )
    text = parsed.text
    if text.count(START) != 1 or text.count(END) != 1 or section not in text:
        raise ValueError(
            "the model card's text holds hf_mfac's section markers more than once (in "
            "text outside "
            "the section?); refusing to write a card that the next update would "
            "clobber"
        )
