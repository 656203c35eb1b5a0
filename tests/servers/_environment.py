"""The test account and the process environment it is used in (``isolate_environment``)."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TEST_KEY = "testing"
TEST_SECRET = "testing"
TEST_REGION = "us-east-1"

_CLOUD_ENV_PREFIXES = ("AWS_", "AZURE_STORAGE_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_")
_CLOUD_ENV_NAMES = ("STORAGE_EMULATOR_HOST", "BOTO_CONFIG")


def isolate_environment(environ: MutableMapping[str, str]) -> None:
    """Make ``environ`` safe for tests: nothing of the machine's cloud setup may leak in.

    Removes every ``AWS_*``, ``AZURE_STORAGE_*``, Google variable and ``STORAGE_EMULATOR_HOST``
    (gcsfs reads it at import time), then points botocore at empty config and credential files,
    disables the EC2 metadata lookup, and sets dummy keys and a region. A client that a test
    forgets to point at a local server then fails on an unknown host instead of reaching a real
    account. Loopback is added to ``NO_PROXY`` so a machine proxy never sees test traffic, and
    gcsfs's experimental bucket-type probe (a ~60 s gRPC timeout per bucket against
    fake-gcs-server) is switched off: it is read when gcsfs is imported, so this must run
    before anything imports gcsfs (conftest calls it at import time).
    """
    for name in list(environ):
        if name.startswith(_CLOUD_ENV_PREFIXES) or name in _CLOUD_ENV_NAMES:
            del environ[name]
    environ.update(
        {
            "AWS_ACCESS_KEY_ID": TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in environ.get(name, "").split(",") if h]
        environ[name] = ",".join(
            [*hosts, *(h for h in ("127.0.0.1", "localhost") if h not in hosts)]
        )
