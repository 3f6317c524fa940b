"""URIs a user gives (`run.storage`, tracking URIs): which storage schemes work, and credentials
kept out of everything grokstudy stores or prints. Standard library only."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")
"""What pyarrow.fs opens (and Ray Tune's storage_path takes), besides a plain path."""

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s:]*)(?::[^/@\s]*)?@")


def has_credentials(uri: str) -> bool:
    """Does `uri` carry a password (`scheme://user:password@host`)?"""
    try:
        return urlsplit(uri).password is not None
    except ValueError:
        return False


def redact(text: str) -> str:
    """`text` with the password of every URI in it replaced by `***` (user names are kept:
    they say which account, not how to use it)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if ":" in m[0][len(m['scheme']) :]
                         else m[0], text)  # fmt: skip
