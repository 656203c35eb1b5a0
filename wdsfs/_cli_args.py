"""Argument parsing for the ``wdsfs`` command (run by :mod:`wdsfs.cli`).

The parser, the help texts with their examples, the option types, and the storage-option flags:
``--storage-option KEY=VALUE`` (repeatable; VALUE is JSON when it parses, else a string; dotted
keys make nested dicts), ``--endpoint-url`` (``client_kwargs.endpoint_url`` for s3://,
``endpoint_url`` for gs://) and ``--profile`` (s3://). Bad arguments exit with status 2 and a
usage message, as argparse does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from wdsfs._fs import parse_size
from wdsfs.cache import DEFAULT_CACHE_LIMIT, default_cache_dir
from wdsfs.decode import DECODER_NAMES
from wdsfs.index import INDEX_NAME

__all__ = ["parse_args", "parse_storage_option", "storage_options_from"]

_S3 = ("s3", "s3a")
_GCS = ("gs", "gcs")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The options; ``handler`` names the command (``"ls"``, ``"cache-info"``...), and dataset
        commands have ``options``, the fsspec storage options built from the flags.

    Raises:
        SystemExit: ``--help``/``--version`` (0) or a usage error (2, message on stderr).
    """
    args = _parser().parse_args(argv)
    if hasattr(args, "url"):
        try:
            args.options = storage_options_from(
                args.url, args.storage_option, endpoint_url=args.endpoint_url, profile=args.profile
            )
        except ValueError as exc:
            args.subparser.error(str(exc))
    return args


def parse_storage_option(text: str) -> tuple[list[str], Any]:
    """Read one ``--storage-option``: ``KEY=VALUE``, VALUE as JSON when it parses, else a string.

    Args:
        text: ``anon=true``, ``client_kwargs={"region_name": "x"}``,
            ``client_kwargs.endpoint_url=http://...`` (dots make nested dicts).

    Returns:
        The key path (``["client_kwargs", "endpoint_url"]``) and the value.

    Raises:
        argparse.ArgumentTypeError: No ``=``, or an empty key or key part.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (anon=true, client_kwargs.region_name=us-east-1), got {text!r}"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return [part.strip() for part in parts], value


def storage_options_from(
    url: str,
    items: Sequence[tuple[list[str], Any]] | None,
    *,
    endpoint_url: str | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Build fsspec ``storage_options`` from parsed ``--storage-option``s and flags.

    Args:
        url: The dataset URL (its protocol decides where ``endpoint_url`` goes).
        items: Results of :func:`parse_storage_option`, in command-line order.
        endpoint_url: ``client_kwargs.endpoint_url`` for s3://, ``endpoint_url`` for gs://.
        profile: AWS profile, for s3:// only.

    Returns:
        The nested options dict.

    Raises:
        ValueError: A key set both as a value and as a dict, or a flag that does not apply
            to the URL's protocol.
    """
    options: dict[str, Any] = {}
    for path, value in items or ():
        _set_nested(options, path, value)
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    if endpoint_url is not None:
        if protocol in _S3:
            _set_nested(options, ["client_kwargs", "endpoint_url"], endpoint_url)
        elif protocol in _GCS:
            _set_nested(options, ["endpoint_url"], endpoint_url)
        else:
            raise ValueError(
                f"--endpoint-url applies to s3:// and gs:// URLs, not {protocol}:// "
                "(use --storage-option for other backends)"
            )
    if profile is not None:
        if protocol not in _S3:
            raise ValueError(f"--profile applies to s3:// URLs, not {protocol}://")
        options["profile"] = profile
    return options


def _set_nested(options: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = options
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ValueError(f"storage option {where} is set to {child!r} and used as a dict")
        node = child
    last = path[-1]
    if isinstance(node.get(last), dict) and isinstance(value, dict):
        for key, item in value.items():
            _set_nested(node[last], [key], item)
    elif isinstance(node.get(last), dict):
        where = ".".join(path)
        raise ValueError(f"storage option {where} is a dict and set to {value!r}")
    else:
        node[last] = value


_MAIN_EPILOG = """\
examples:
  wdsfs ls s3://bucket/dataset --split train
  wdsfs index s3://bucket/dataset --workers 16
  wdsfs prefetch gs://bucket/dataset --cache-limit 200GB
  wdsfs cache info
  wdsfs bench s3://bucket/dataset --epochs 2 --decode jpg=pil_rgb

storage options (every dataset command):
  --storage-option anon=true                      JSON values: true, 3, {"a": 1}
  --storage-option client_kwargs.region_name=eu-west-1   dotted keys nest
  --endpoint-url http://127.0.0.1:9000            S3-compatible or fake GCS servers
"""

_EPILOGS = {
    "ls": """\
examples:
  wdsfs ls s3://bucket/dataset --split train
  wdsfs ls ./data/dataset --json
  wdsfs ls 'https://host/ds/shard-{000000..000009}.tar'
""",
    "index": f"""\
Lists the shards (ignoring any {INDEX_NAME} already there), reads each one once and writes
{INDEX_NAME} beside them, so readers need no listing and know the sample counts.

examples:
  wdsfs index s3://bucket/dataset --workers 16
  wdsfs index gs://bucket/dataset --split train --dry-run
  wdsfs index https://host/dataset --output {INDEX_NAME}   # HTTP is read-only: upload it
""",
    "prefetch": """\
Downloads every shard into the shared cache (the one StreamingWebDataset uses), so training
starts warm. Ctrl-C cancels the transfers; nothing half-written stays in the cache.

examples:
  wdsfs prefetch s3://bucket/dataset --split train --cache-limit 500GB
  wdsfs prefetch s3://bucket/ds --endpoint-url http://127.0.0.1:9000 \\
      --storage-option key=KEY --storage-option secret=SECRET
""",
    "cache": """\
examples:
  wdsfs cache info --json
  wdsfs cache clear --cache-dir /scratch/wdsfs --yes
""",
    "bench": """\
Reads every sample (in this process, or through a torch DataLoader with --num-workers) and
reports samples/s, MB/s of sample bytes and the time to the first sample. Without --cache-dir
a fresh temporary cache is used, so with --epochs 2 the first epoch is cold, the second warm.

examples:
  wdsfs bench s3://bucket/dataset --epochs 2
  wdsfs bench s3://bucket/dataset --max-samples 10000 --decode jpg=pil_rgb --decode cls=int
  wdsfs bench s3://bucket/dataset --num-workers 8
""",
}


def _parser() -> argparse.ArgumentParser:
    from wdsfs import __version__

    parser = argparse.ArgumentParser(
        prog="wdsfs",
        description="Stream WebDataset shards from any fsspec storage: list, index, prefetch, "
        "cache, bench.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wdsfs {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, dataset, cache = _common_options(), _dataset_options(), _cache_options()
    _add_ls(commands, [common, dataset])
    _add_index(commands, [common, dataset])
    _add_prefetch(commands, [common, dataset, cache])
    _add_cache(commands, [common, cache], [common, _cache_options(with_limit=False)])
    bench_cache = _cache_options(default_dir="a fresh temporary directory, removed at the end")
    _add_bench(commands, [common, dataset, bench_cache])
    return parser


_VERBOSE_HELP = "log INFO (-vv: DEBUG) and show tracebacks of errors"


def _command(
    commands: Any, name: str, parents: list[argparse.ArgumentParser], help_text: str
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name,
        parents=parents,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=_EPILOGS.get(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(subparser=sub)
    return sub


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=_VERBOSE_HELP
    )
    return common


def _dataset_options() -> argparse.ArgumentParser:
    dataset = argparse.ArgumentParser(add_help=False)
    dataset.add_argument("url", help="dataset URL or path (s3://bucket/ds, ./data/ds)")
    dataset.add_argument("--split", help="sub-prefix of the dataset (train, val...)")
    group = dataset.add_argument_group("storage")
    group.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        type=parse_storage_option,
        action="append",
        default=[],
        help="fsspec storage option (repeatable); VALUE is JSON when it parses, else a string; "
        "dotted keys nest (client_kwargs.endpoint_url=...)",
    )
    group.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3 (client_kwargs.endpoint_url) or GCS (endpoint_url) server",
    )
    group.add_argument("--profile", help="AWS profile, for s3:// URLs")
    return dataset


def _cache_options(
    *, with_limit: bool = True, default_dir: str | None = None
) -> argparse.ArgumentParser:
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"shard cache directory (default {default_dir or default_cache_dir()})",
    )
    if with_limit:
        cache.add_argument(
            "--cache-limit",
            metavar="SIZE",
            type=_size,
            default=parse_size(DEFAULT_CACHE_LIMIT),
            help=f"cache size limit, e.g. 500MB, 10GB (default {DEFAULT_CACHE_LIMIT})",
        )
    return cache


def _workers_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument(
        "--workers", type=_positive_int, default=8, metavar="N", help=f"{what} (default 8)"
    )


def _add_ls(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    sub = _command(commands, "ls", parents, "list the shards with sizes (and sample counts)")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.set_defaults(handler="ls")


def _add_index(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    sub = _command(commands, "index", parents, f"build and write {INDEX_NAME}")
    _workers_option(sub, "shards read at once")
    sub.add_argument("--dry-run", action="store_true", help="build and summarise, write nothing")
    sub.add_argument(
        "--output", "-o", metavar="FILE", help="write the index to this local file instead"
    )
    sub.set_defaults(handler="index")


def _add_prefetch(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    sub = _command(commands, "prefetch", parents, "download every shard into the shard cache")
    _workers_option(sub, "concurrent connections")
    sub.set_defaults(handler="prefetch")


def _add_cache(
    commands: Any,
    info_parents: list[argparse.ArgumentParser],
    clear_parents: list[argparse.ArgumentParser],
) -> None:
    sub = _command(commands, "cache", [], "show or clear the shard cache")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = _command(actions, "info", info_parents, "show directory, limit, entries and bytes used")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler="cache-info")
    clear = _command(actions, "clear", clear_parents, "remove every cached shard")
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    clear.set_defaults(handler="cache-clear")


def _add_bench(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    sub = _command(commands, "bench", parents, "measure read speed: samples/s, MB/s, first sample")
    _workers_option(sub, "concurrent connections per reader")
    sub.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="torch DataLoader worker processes (needs torch; default 0: no torch, this process)",
    )
    sub.add_argument(
        "--max-samples", type=_positive_int, metavar="M", help="stop each epoch after M samples"
    )
    sub.add_argument("--epochs", type=_positive_int, default=1, metavar="E", help="passes (1)")
    sub.add_argument(
        "--direct-io",
        action="store_true",
        help="write and read downloads with O_DIRECT, bypassing the page cache (as "
        "StreamingWebDataset(direct_io=True)): compare with and without on your cache disk",
    )
    sub.add_argument(
        "--decode",
        type=_decoder_item,
        action="append",
        metavar="FIELD=NAME",
        help=f"decode a field (repeatable); NAME is one of {', '.join(DECODER_NAMES)}",
    )
    sub.set_defaults(handler="bench")


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _decoder_item(text: str) -> tuple[str, str]:
    field, sep, name = text.partition("=")
    name = name.strip().lower()  # decoder names are case-insensitive, as in Decoder
    if not sep or not field.strip() or name not in DECODER_NAMES:
        raise argparse.ArgumentTypeError(
            f"expected FIELD=NAME with NAME one of {', '.join(DECODER_NAMES)}, got {text!r}"
        )
    return field.strip(), name
