"""Credentials: one rule for what counts as one, in URLs and in storage options, and one way to mask it.

A URL carries a credential when it has user information (`user:password@`, `:token@` or `token@`: any of
them can be a secret, so all are) or a query parameter that signs or authorises the request (`X-Amz-Signature`,
`X-Amz-Credential`, `X-Amz-Security-Token`, `X-Goog-Signature`, Azure's `sig`, `token`, `access_token`,
`api_key`, ...). Jobs refuse such URLs as inputs, labels, templates, weights or output, and mask them in
manifest rows, before anything is written or logged. A storage option is secret by its name (`is_secret_option`):
its value is masked wherever options are shown, kept a string when parsed, and never allowed in a job spec.
Pure text: no I/O.
"""

from __future__ import annotations

import re

MASK = "***"
REFUSED = (
    "the URL carries credentials (user information, a token or a signature), which are never stored or used; give "
    "credentials through --storage-options-file or LGCA_STORAGE_OPTIONS instead"
)
# user information: what stands between `scheme://` and the first `@` of the authority
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")
# a query parameter whose name says it signs or authorises: name=value up to the next & # or space
_QUERY = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#\s]+)=(?P<value>[^&#\s]*)")
_SECRET_PARAMETER_WORDS = ("signature", "credential", "token", "secret", "password", "passwd", "apikey", "api_key", "access_key")
_SECRET_PARAMETERS = {"sig", "key", "code", "auth", "authorization", "x-amz-security-token", "googleaccessid"}
_SECRET_OPTION_WORDS = ("secret", "token", "key", "password", "credential")
_PUBLIC_OPTION_WORDS = ("endpoint", "url", "region")  # `endpoint_url`, `region_name`: never secret, always shown


def is_secret_option(name: str) -> bool:
    """Whether a storage option of this name holds a secret (key, secret, token, session_token, aws_*, ...)."""
    lowered = name.lower()
    if any(word in lowered for word in _PUBLIC_OPTION_WORDS):
        return False
    return lowered.startswith("aws_") or any(word in lowered for word in _SECRET_OPTION_WORDS)


def is_secret_parameter(name: str) -> bool:
    """Whether a URL query parameter of this name carries a credential."""
    lowered = name.lower()
    return lowered in _SECRET_PARAMETERS or any(word in lowered for word in _SECRET_PARAMETER_WORDS)


def has_credentials(text: str) -> bool:
    """Whether any URL in `text` carries user information or a credential query parameter (a local path, without
    `scheme://`, has neither: its `?` and `@` are part of a file name)."""
    if "://" not in text:
        return False
    if _USERINFO.search(text):
        return True
    return any(is_secret_parameter(match.group("name")) and match.group("value") for match in _QUERY.finditer(_query_part(text)))


def mask_credentials(text: str) -> str:
    """`text` with the credentials of every URL in it masked: `http://user:pw@h/x?sig=abc&v=1` ->
    `http://***@h/x?sig=***&v=1`. Text without a URL is returned unchanged."""
    if "://" not in text:
        return text
    masked = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    if "?" not in masked:
        return masked
    head, _, query = masked.partition("?")
    return head + "?" + _QUERY.sub(_mask_parameter, "?" + query)[1:]


def _mask_parameter(match: re.Match[str]) -> str:
    if not is_secret_parameter(match.group("name")) or not match.group("value"):
        return match.group(0)
    return f"{match.group('lead')}{match.group('name')}={MASK}"


def _query_part(text: str) -> str:
    return "?" + text.partition("?")[2] if "?" in text else ""


__all__ = ["MASK", "REFUSED", "has_credentials", "is_secret_option", "is_secret_parameter", "mask_credentials"]
