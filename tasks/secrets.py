"""Keep credentials out of everything we print or write: one helper, ``redact(text)``.

Credentials reach us only through the environment (the config refuses them, tasks/config.py); what
can still carry one into an error line, a log or a record is text made by someone else: a URI from
MLFLOW_TRACKING_URI or HF_ENDPOINT, a client library's exception message, a download URL with a
SAS signature. ``redact`` removes from any text:

- the user-info part of a URI (``https://user:pass@host`` -> ``https://***@host``);
- the value of every ``name=value`` pair whose name says credential (``access_token=``, ``token=``,
  ``sig=`` of an Azure SAS, ``api_key=``, ``X-Amz-Signature=``, ``AccountKey=``...);
- ``Bearer``/``Basic`` authorization values and well-known token shapes (``hf_...``, ``ghp_...``,
  ``dapi...``, JSON web tokens);
- the values of this process's credential environment variables (HF_TOKEN, MLFLOW_TRACKING_TOKEN,
  AZURE_CLIENT_SECRET...), wherever they appear.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import parse_qsl, urlsplit

MASK = "***"

# Query or connection-string parameter names that hold a credential: whole names, or parts of a
# name split at '_', '-', '.' (access_token, X-Amz-Signature), or words inside a longer name.
_SECRET_PARTS = {"token", "secret", "password", "passwd", "pwd", "pass", "key", "apikey", "sig", "signature",
                 "credential", "credentials", "sas", "accesskey", "accountkey", "sharedaccesskey"}
_SECRET_NAMES = _SECRET_PARTS | {"code", "auth"}  # only as the whole name (Azure Functions' ?code=)
_SECRET_WORDS = re.compile(r"token(?!iz|s)|secret|passw(?:or)?d|signature|credential|apikey|accountkey|accesskey")
# Environment variables whose values are credentials: a part of the name (split at '_') says so.
_ENV_SECRET_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS", "SAS",
                     "SIGNATURE"}
_ENV_MIN_LENGTH = 8  # shorter values ("1", "true") are settings, and masking them would garble text

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_VALUE = r"([^\s&;,'\"<>()\[\]{}?#]*[^\s&;,'\"<>()\[\]{}?#:.])"  # a sentence's ':' or '.' is not the value's
# name=value (a query, a connection string, name='value'; not code's "name = value") and "name": "value"
_PAIR = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*)(=['\"]?)" + _VALUE)
_QUOTED_PAIR = re.compile(r"(['\"])([A-Za-z][\w.-]*)\1(\s*:\s*['\"]?)" + _VALUE)
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{6,}")
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{16,}"                      # Hugging Face
    r"|gh[pousr]_[A-Za-z0-9]{20,}"                   # GitHub
    r"|dapi[0-9a-f]{32}(?:-\d+)?"                    # Databricks personal access token
    r"|eyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]*)")          # JSON web token (Azure AD access tokens)


def is_secret_name(name: str) -> bool:
    """A query, form or connection-string parameter name that holds a credential."""
    lowered = name.lower()
    parts = re.split(r"[_.\-]", lowered)
    # A short word alone counts as written in a URI (lower case): "KEY=VALUE" is a placeholder, "key=..." is not.
    if name in _SECRET_NAMES or (len(parts) > 1 and any(part in _SECRET_PARTS for part in parts)):
        return True
    return bool(_SECRET_WORDS.search(re.sub(r"[_.\-]", "", lowered)))  # not "tokenizer", "max_new_tokens"


def _env_secrets() -> list[str]:
    found = []
    for name, value in os.environ.items():
        if len(value) >= _ENV_MIN_LENGTH and (set(name.upper().split("_")) & _ENV_SECRET_PARTS
                                             or name.upper().endswith("CONNECTION_STRING")):
            found.append(value)
    return sorted(found, key=len, reverse=True)  # a value inside a longer one goes after it


def redact(text: str) -> str:
    """``text`` with every credential it holds replaced by ``***`` (see the module doc)."""
    if not text:
        return text
    for value in _env_secrets():
        text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}" if is_secret_name(m.group(1)) else m.group(0), text)
    text = _QUOTED_PAIR.sub(lambda m: (f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{MASK}"
                                       if is_secret_name(m.group(2)) else m.group(0)), text)
    text = _AUTH_HEADER.sub(rf"\1\2{MASK}", text)
    return _TOKEN_SHAPES.sub(MASK, text)


def uri_credentials(uri: str) -> list[str]:
    """What in ``uri`` is a credential, named without its value: "user:password@", "query parameter 'sig'"."""
    parts = urlsplit(uri)
    found = ["user-info (user:password@)"] if parts.username or parts.password else []
    for where in (parts.query, parts.fragment):
        found += [f"parameter {name!r}" for name, _ in parse_qsl(where, keep_blank_values=True) if is_secret_name(name)]
    return found


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line (tracebacks included) goes through ``redact``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
