"""Decoders by extension: sample fields from ``bytes`` to Python objects.

A :class:`Decoder` is built from a spec mapping a field (an extension, with or without its
leading dot, case-insensitive) to a decoder name or a callable taking ``bytes``::

    Decoder({"jpg": "pil_rgb", "json": "json", "cls": "int", "seg.png": "pil"})

A field is matched by its whole name first (``seg.png``), else by its last extension
(``png``). Fields not in the spec stay ``bytes``; metadata fields (``__key__``, ``__url__``,
any ``__*__``) and values that are not bytes are never decoded.

Decoder names:

===========  ===================================================  ==================
name         result                                               needs
===========  ===================================================  ==================
``bytes``    the bytes unchanged
``text``     ``str``, UTF-8
``json``     ``json.loads``
``int``      ``int`` of the ASCII text (webdataset's ``cls``)
``pil``      a loaded ``PIL.Image.Image``, mode as stored          ``wdsfs[image]``
``pil_rgb``  the image converted to ``RGB``                        ``wdsfs[image]``
``pil_l``    the image converted to ``L`` (grey)                   ``wdsfs[image]``
``numpy``    ``numpy.load`` of a ``.npy``, ``allow_pickle=False``  ``wdsfs[numpy]``
``npz``      a ``dict`` of the arrays of a ``.npz``                ``wdsfs[numpy]``
``torch``    ``torch.load(weights_only=True)``                     ``wdsfs[torch]``
===========  ===================================================  ==================

A decoder that raises is reported as :class:`~wdsfs.errors.CorruptShardError` naming the
shard URL, the sample key and the field, with the original exception as ``__cause__``.

A Decoder pickles as its spec (names and callables), so it travels to DataLoader workers;
callables in the spec must be picklable too (top-level functions, not lambdas, under
``spawn``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from wdsfs.errors import CorruptShardError

__all__ = ["DECODER_NAMES", "Decoder", "FieldDecoder"]

logger = logging.getLogger(__name__)


class FieldDecoder(Protocol):
    """A callable that turns the bytes of one field into an object."""

    def __call__(self, data: bytes, /) -> object: ...  # pragma: no cover


def _decode_bytes(data: bytes) -> object:
    return data


def _decode_text(data: bytes) -> object:
    return bytes(data).decode("utf-8")


def _decode_json(data: bytes) -> object:
    return json.loads(data)


def _decode_int(data: bytes) -> object:
    return int(data)


def _open_image(data: bytes) -> object:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _decode_pil(data: bytes) -> object:
    return _open_image(data)


def _decode_pil_rgb(data: bytes) -> object:
    from PIL import Image

    image = _open_image(data)
    assert isinstance(image, Image.Image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_pil_l(data: bytes) -> object:
    from PIL import Image

    image = _open_image(data)
    assert isinstance(image, Image.Image)
    return image if image.mode == "L" else image.convert("L")


def _decode_numpy(data: bytes) -> object:
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_npz(data: bytes) -> object:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _decode_torch(data: bytes) -> object:
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


_IMAGE = ("PIL", "pillow: pip install wdsfs[image]")
_NUMPY = ("numpy", "numpy: pip install wdsfs[numpy]")
_TORCH = ("torch", "torch: pip install wdsfs[torch]")

# name -> (top-level function, (module it imports, install hint) or None)
_DECODERS: dict[str, tuple[FieldDecoder, tuple[str, str] | None]] = {
    "bytes": (_decode_bytes, None),
    "text": (_decode_text, None),
    "json": (_decode_json, None),
    "int": (_decode_int, None),
    "pil": (_decode_pil, _IMAGE),
    "pil_rgb": (_decode_pil_rgb, _IMAGE),
    "pil_l": (_decode_pil_l, _IMAGE),
    "numpy": (_decode_numpy, _NUMPY),
    "npz": (_decode_npz, _NUMPY),
    "torch": (_decode_torch, _TORCH),
}
#: The decoder names a spec may use.
DECODER_NAMES: tuple[str, ...] = tuple(sorted(_DECODERS))


class Decoder:
    """Decode the fields of samples by extension.

    Args:
        spec: Field (``"jpg"``, ``".jpg"``, ``"seg.png"``) to a decoder name from
            :data:`DECODER_NAMES` or a callable taking the field's bytes. None decodes nothing.

    Raises:
        ValueError: An unknown decoder name (the message lists the known ones), an empty field
            name, or two spellings of one field.
        TypeError: A spec that is not a mapping, or a value that is neither a name nor a
            callable.
        ImportError: A named decoder needs a package that is not installed, with the
            ``pip install`` line that fixes it.
    """

    def __init__(self, spec: Mapping[str, str | Callable[[bytes], object]] | None = None) -> None:
        self._spec: dict[str, str | Callable[[bytes], object]] = {}
        self._fns: dict[str, Callable[[bytes], object]] = {}
        self._names: dict[str, str] = {}  # field -> decoder name, for messages
        if spec is not None and not isinstance(spec, Mapping):
            raise TypeError(
                f"decode must map fields to decoders, like {{'jpg': 'pil'}}, not {spec!r}"
            )
        for raw_field, value in (spec or {}).items():
            field = raw_field.lower().removeprefix(".")
            if not field:
                raise ValueError(f"empty field name in decoder spec: {raw_field!r}")
            if field in self._spec:
                raise ValueError(f"field {field!r} appears twice in the decoder spec")
            self._spec[field] = value
            self._fns[field], self._names[field] = _resolve(field, value)
        self._cache: dict[str, tuple[Callable[[bytes], object], str] | None] = {}

    @property
    def spec(self) -> dict[str, str | Callable[[bytes], object]]:
        """The normalised spec: field without leading dot, lower case -> name or callable."""
        return dict(self._spec)

    def __call__(self, sample: dict[str, object]) -> dict[str, object]:
        """Return a new sample with the fields in the spec decoded.

        Args:
            sample: A sample dict from :func:`wdsfs.tar.read_samples`.

        Returns:
            A new dict: the same keys, decoded values where the spec says so.

        Raises:
            CorruptShardError: A decoder raised; names the URL, the key and the field.
        """
        if not self._fns:
            return dict(sample)
        out: dict[str, object] = {}
        for field, value in sample.items():
            if isinstance(value, bytes | bytearray | memoryview) and not (
                field.startswith("__") and field.endswith("__")
            ):
                found = self._lookup(field)
                if found is not None:
                    fn, name = found
                    try:
                        value = fn(value)  # type: ignore[arg-type]
                    except Exception as exc:
                        url = sample.get("__url__")
                        raise CorruptShardError(
                            f"{url}: sample {sample.get('__key__')!r}: field {field!r}: "
                            f"decoder {name} failed: {type(exc).__name__}: {exc}",
                            url=url if isinstance(url, str) else None,
                        ) from exc
            out[field] = value
        return out

    def decodes(self, field: str) -> bool:
        """Whether the spec changes the bytes of ``field`` (``"bytes"`` leaves them)."""
        found = self._lookup(field)
        return found is not None and found[0] is not _decode_bytes

    def _lookup(self, field: str) -> tuple[Callable[[bytes], object], str] | None:
        try:
            return self._cache[field]
        except KeyError:
            pass
        key = field if field in self._fns else field.rsplit(".", 1)[-1]
        found = (self._fns[key], self._names[key]) if key in self._fns else None
        self._cache[field] = found
        return found

    def __getstate__(self) -> dict[str, object]:
        return {"spec": self._spec}

    def __setstate__(self, state: dict[str, object]) -> None:
        spec = state["spec"]
        assert isinstance(spec, dict)
        self.__init__(spec)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decoder) and self._spec == other._spec

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._spec.items())))

    def __repr__(self) -> str:
        return f"Decoder({self._spec!r})"


def _resolve(
    field: str, value: str | Callable[[bytes], object]
) -> tuple[Callable[[bytes], object], str]:
    """The function and its display name for one spec entry."""
    if isinstance(value, str):
        entry = _DECODERS.get(value, _DECODERS.get(value.lower()))  # streaming-wds wrote "PIL"
        if entry is None:
            raise ValueError(
                f"unknown decoder {value!r} for field {field!r}; "
                f"known decoders: {', '.join(DECODER_NAMES)} (or pass a callable)"
            )
        fn, needs = entry
        if needs is not None and importlib.util.find_spec(needs[0]) is None:
            raise ImportError(f"decoder {value!r} for field {field!r} needs {needs[1]}")
        return fn, repr(value)
    if callable(value):
        return value, getattr(value, "__qualname__", None) or repr(value)
    raise TypeError(
        f"decoder for field {field!r} must be a decoder name or a callable, got {value!r}"
    )
