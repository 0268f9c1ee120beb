"""Redaction of secrets in what hf_mfac writes down: the ``recipe`` and ``extra_metadata`` of the sparsity record,
and the command line, recipe and hyperparameters of a model card.

Secrets are found by rule, not by a list of flags: a name is secret when it contains token, secret, key, pass, auth
or credential (:func:`secret_name`); :func:`redact_text` hides URL userinfo, Hugging Face tokens and the values of
secret ``NAME=VALUE`` / ``"NAME": VALUE`` pairs inside a string; :func:`redact` applies both to JSON-like values
(mappings, lists, strings, and strings holding JSON). What is hidden becomes :data:`REDACTED` (``***``).
"""
from __future__ import annotations

import json
import re
from typing import Mapping

__all__ = ["REDACTED", "secret_name", "redact_text", "redact"]


REDACTED = "***"
# A name is secret when it contains one of these words, in any case, ignoring "-" and "_".
_SECRET_WORDS = re.compile(r"token|secret|key|pass|auth|credential", re.I)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
_KV = re.compile(r"(?P<k>[A-Za-z_][\w.-]*)(?P<sep>\s*=\s*)(?P<v>[^\s,;&]*)")
_QUOTED_KV = re.compile(  # "name": "value" / 'name': value, as in JSON or a Python dict literal
    r"""(?P<q>["'])(?P<k>[^"'\n]*)(?P=q)(?P<sep>\s*:\s*)"""
    r"""(?:(?P<vq>["'])(?P<v>(?:\\.|(?!(?P=vq)).)*)(?P=vq)|(?P<bare>[^\s,}\]]+))""")


def secret_name(name: str) -> bool:
    """True when ``name`` (a flag, a key, an environment variable) says it holds a secret: it contains token,
    secret, key, pass, auth or credential, in any case, once ``-`` and ``_`` are removed."""
    return bool(_SECRET_WORDS.search(re.sub(r"[-_]", "", str(name))))


def redact_text(text: str) -> str:
    """``text`` with secrets replaced by ``***``: the userinfo of every URL (``https://user:pass@host`` ->
    ``https://***@host``), every Hugging Face token (``hf_`` and 30 or more letters and digits) wherever it
    stands, and the value of every ``NAME=VALUE`` pair and quoted ``"NAME": VALUE`` pair whose ``NAME`` is
    secret (:func:`secret_name`), e.g. inside ``k=v,k=v`` lists, query strings and JSON."""
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _HF_TOKEN.sub(REDACTED, text)
    text = _KV.sub(lambda m: m.group("k") + m.group("sep") + REDACTED if secret_name(m.group("k")) and m.group("v")
                   else m.group(0), text)

    def quoted(m):
        if not secret_name(m.group("k")):
            return m.group(0)
        value = f"{m.group('vq')}{REDACTED}{m.group('vq')}" if m.group("vq") else f'"{REDACTED}"'
        return f"{m.group('q')}{m.group('k')}{m.group('q')}{m.group('sep')}{value}"

    return _QUOTED_KV.sub(quoted, text)


def redact(value):
    """A copy of ``value`` (JSON-like: mappings, lists, strings, numbers) with secrets replaced by ``***``: the
    value of every key that :func:`secret_name` flags (unless None or a bool), and inside every string what
    :func:`redact_text` hides. A string that parses as a JSON object or list is redacted as such."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if secret_name(k) and value[k] is not None and not isinstance(value[k], bool)
                    else redact(value[k])) for k in value}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "["):
            try:
                parsed = json.loads(stripped)
            except ValueError:
                pass
            else:
                cleaned = redact(parsed)
                return value if cleaned == parsed else json.dumps(cleaned)
        return redact_text(value)
    return value
