"""Redaction of secrets in what hf_mfac writes down: the ``recipe`` and ``extra_metadata`` of the
sparsity record, and the command line, recipe and hyperparameters of a model card.

Secrets are found by rule, not by a list of flags: a name is secret when it contains token, secret,
key, pass, auth or credential (:func:`secret_name`); :func:`redact_credentials` hides URL userinfo
(percent-encoded too) and Hugging Face tokens by their shape; :func:`redact_text` hides those and
the values of secret ``NAME=VALUE`` / ``"NAME": VALUE`` pairs inside a string; :func:`redact`
applies both to JSON-like values (mappings, lists, strings, and strings holding JSON);
:func:`redact_argv` applies them to a command line, word by word, and hides the value that follows a
secret flag. What is hidden becomes :data:`REDACTED` (``***``)."""
from __future__ import annotations

import contextlib
import json
import re
import shlex
from typing import Iterable, Mapping

__all__ = ["REDACTED", "secret_name", "redact_credentials", "redact_text", "redact", "redact_argv",
           "without_secrets", "pickled_without_secrets"]


REDACTED = "***"
# A name is secret when it contains one of these words, in any case, ignoring "-" and "_".
_SECRET_WORDS = re.compile(r"token|secret|key|pass|auth|credential", re.I)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")
# user[:password]@ after a scheme, plain or percent-encoded (https://u:p@h, https%3A//u%3Ap%40h,
# https%3A%2F%2F...); the userinfo runs to the last @ / %40 before the path, so an @ inside a
# password hides with it
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*(?::|%3[Aa])(?://|%2[Ff]%2[Ff])"
_URL_USERINFO = re.compile(rf"({_SCHEME})[^/\s?#]*(@|%40)")
# name:password@ without a scheme (alice:pw@host, alice%3Apw%40host): a colon, then an @, one word
_USERINFO = re.compile(r"(?<![\w.%+~-])[\w.+~-]+(?::|%3[Aa])[^\s/?#]*(@|%40)")
_KV = re.compile(r"(?P<k>[A-Za-z_][\w.-]*)(?P<sep>\s*=\s*)(?P<v>[^\s,;&]*)")
_QUOTED_KV = re.compile(  # "name": "value" / 'name': value, as in JSON or a Python dict literal
    r"""(?P<q>["'])(?P<k>[^"'\n]*)(?P=q)(?P<sep>\s*:\s*)"""
    r"""(?:(?P<vq>["'])(?P<v>(?:\\.|(?!(?P=vq)).)*)(?P=vq)|(?P<bare>[^\s,}\]]+))""")


def secret_name(name: str) -> bool:
    """True when ``name`` (a flag, a key, an environment variable) says it holds a secret: it
    contains token, secret, key, pass, auth or credential, in any case, once ``-`` and ``_`` are
    removed."""
    return bool(_SECRET_WORDS.search(re.sub(r"[-_]", "", str(name))))


def redact_credentials(text: str) -> str:
    """``text`` with credentials replaced by ``***``, by shape alone (rules that leave ordinary text
    alone): the userinfo of every URL, plain or percent-encoded (``https://user:pass@host`` ->
    ``https://***@host``, ``https%3A//user%3Apass%40host`` -> ``https%3A//***%40host``), every
    ``name:password@`` without a scheme (``alice%3AS3cr3t%40host`` -> ``***%40host``), and every
    Hugging Face token (``hf_`` and 30 or more letters and digits) wherever it stands."""
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + m.group(2), text)
    text = _USERINFO.sub(lambda m: m.group(0) if m.group(0)[:-len(m.group(1))].endswith(REDACTED)
                         else REDACTED + m.group(1), text)
    return _HF_TOKEN.sub(REDACTED, text)


def redact_text(text: str) -> str:
    """``text`` with secrets replaced by ``***``: the credentials :func:`redact_credentials` finds
    (URL userinfo, plain or percent-encoded, and Hugging Face tokens) and the value of every
    ``NAME=VALUE`` pair and quoted ``"NAME": VALUE`` pair whose ``NAME`` is secret
    (:func:`secret_name`), e.g. inside ``k=v,k=v`` lists, query strings and JSON."""
    text = redact_credentials(text)
    text = _KV.sub(
        lambda m: (
            m.group("k") + m.group("sep") + REDACTED
            if secret_name(m.group("k")) and m.group("v")
            else m.group(0)
        ),
        text,
    )

    def quoted(m):
        if not secret_name(m.group("k")):
            return m.group(0)
        value = f"{m.group('vq')}{REDACTED}{m.group('vq')}" if m.group("vq") else f'"{REDACTED}"'
        return f"{m.group('q')}{m.group('k')}{m.group('q')}{m.group('sep')}{value}"

    return _QUOTED_KV.sub(quoted, text)


def redact(value):
    """A copy of ``value`` (JSON-like: mappings, lists, strings, numbers) with secrets replaced by
    ``***``: the value of every key that :func:`secret_name` flags (unless None or a bool), and
    inside every string what :func:`redact_text` hides. A string that parses as a JSON object or
    list is redacted as such."""
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED
                if secret_name(k) and value[k] is not None and not isinstance(value[k], bool)
                else redact(value[k])
            )
            for k in value
        }
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


_OPTION = re.compile(r"^-{1,2}[A-Za-z]")
_FLAG = re.compile(r"^(-{1,2})([A-Za-z][\w.-]*)$")
_ASSIGN = re.compile(r"^(-{0,2})([A-Za-z_][\w.-]*)=(.*)$", re.S)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """``argv`` with every secret replaced by ``***``, by rule: the value of ``--NAME VALUE``,
    ``--NAME=VALUE`` and ``NAME=VALUE`` (e.g. ``HF_TOKEN=hf_...``) when ``NAME`` contains token,
    secret, key, pass, auth or credential (any case, ``-``/``_`` ignored: ``--hub-token``,
    ``--api_key``, ``--passwd``, ``--auth``, ``--credentials``); the userinfo of any URL; any
    ``hf_`` token wherever it stands; and, inside any other value (``k=v,k=v`` lists, JSON such as
    ``--optim_args '{"api_key": ...}'``), the values of secret keys. Names are matched by rule, so
    some harmless ones are hidden too (``--tokenizer_name``, ``--num_passes``). A secret flag
    followed by another option (``--use_auth_token --do_train``) hides nothing."""
    out, hide = [], False
    for word in map(str, argv):
        if hide and not _OPTION.match(word):
            out.append(REDACTED)
            hide = False
            continue
        hide = False
        flag, assign = _FLAG.match(word), _ASSIGN.match(word)
        if flag and secret_name(flag.group(2)):
            out.append(word)
            hide = True
        elif assign and secret_name(assign.group(2)):
            out.append(f"{assign.group(1)}{assign.group(2)}={REDACTED}")
        elif assign:
            out.append(f"{assign.group(1)}{assign.group(2)}={redact(assign.group(3))}")
        else:
            out.append(redact(word))
    return out


# an attribute that holds a secret: its name ends with one of the secret words (hub_token, api_key,
# db_password), unlike settings that only mention one (include_num_input_tokens_seen="all")
_SECRET_FIELD = re.compile(r"(token|secret|key|pass|passwd|password|auth|credentials?)$", re.I)


def without_secrets(obj):
    """A shallow copy of ``obj`` (an object with a ``__dict__``, e.g. ``TrainingArguments``) in
    which every string attribute whose name ends with token, secret, key, pass(wd/word), auth or
    credential(s) (``hub_token``) is None; settings that only mention such a word
    (``include_num_input_tokens_seen="all"``) keep their values. No ``__init__`` runs."""
    clean = object.__new__(type(obj))
    clean.__dict__.update({k: v for k, v in vars(obj).items() if k != "__reduce_ex__"})
    for k, v in vars(obj).items():
        if isinstance(v, str) and _SECRET_FIELD.search(k.replace("-", "_")):
            clean.__dict__[k] = None
    return clean


@contextlib.contextmanager
def pickled_without_secrets(obj):
    """While active, pickling ``obj`` (``torch.save(trainer.args, ".../training_args.bin")``) writes
    :func:`without_secrets` of it instead; ``obj`` itself keeps every value (the Hub upload that
    follows still reads its token). Works through the instance's ``__reduce_ex__``, which pickle
    looks up on the object."""

    def reduce_ex(protocol):
        return without_secrets(obj).__reduce_ex__(protocol)

    obj.__dict__["__reduce_ex__"] = reduce_ex
    try:
        yield obj
    finally:
        obj.__dict__.pop("__reduce_ex__", None)


def redacted_command(argv: list[str]) -> str:
    """``python argv...`` (shell-quoted) with secrets redacted (:func:`redact_argv`)."""
    return "python " + " ".join(shlex.quote(a) for a in redact_argv(argv))


def redact_command(command: str) -> str:
    """A command line given as one string, redacted like :func:`redact_argv` (kept verbatim when
    nothing is secret)."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: fall back to whitespace
        words = command.split()
    redacted = redact_argv(words)
    if redacted == words and redact(command) == command:
        return command
    return " ".join(shlex.quote(w) for w in redacted)
