"""Decoder: named decoders, callables, matching rules, errors, pickling, lazy imports."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import subprocess
import sys
from typing import Any

import pytest

from wdsfs.decode import DECODER_NAMES, Decoder
from wdsfs.errors import CorruptShardError

URL = "s3://bucket/ds/shard-000003.tar"


def sample(**fields: object) -> dict[str, object]:
    return {"__key__": "k/0001", "__url__": URL, **fields}


def png(mode: str = "RGB", size: tuple[int, int] = (4, 3)) -> bytes:
    from PIL import Image as image_module

    buf = io.BytesIO()
    image_module.new(mode, size, color=200 if mode == "L" else (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def reverse(data: bytes) -> bytes:
    """A top-level (picklable) field decoder."""
    return data[::-1]


def test_names() -> None:
    assert set(DECODER_NAMES) == {
        "bytes",
        "text",
        "json",
        "int",
        "pil",
        "pil_rgb",
        "pil_l",
        "numpy",
        "npz",
        "torch",
    }


def test_basic_decoders() -> None:
    decoder = Decoder({"raw": "bytes", "txt": "text", "json": "json", "cls": "int"})
    out = decoder(sample(raw=b"\x00\x01", txt="héllo".encode(), json=b'{"a": [1, 2]}', cls=b" 7\n"))
    assert out == sample(raw=b"\x00\x01", txt="héllo", json={"a": [1, 2]}, cls=7)


def test_fields_not_in_spec_stay_bytes_and_input_is_not_mutated() -> None:
    original = sample(txt=b"a", other=b"b")
    out = Decoder({"txt": "text"})(original)
    assert out == sample(txt="a", other=b"b")
    assert original == sample(txt=b"a", other=b"b")
    assert Decoder()(original) == original
    assert Decoder(None)(original) is not original


def test_metadata_and_non_bytes_values_are_never_decoded() -> None:
    decoder = Decoder({"__url__": "json", "__local_path__": "json", "cls": "int"})
    out = decoder({**sample(cls=3), "__local_path__": "/tmp/x"})
    assert out["__url__"] == URL and out["__local_path__"] == "/tmp/x" and out["cls"] == 3


def test_leading_dots_and_case() -> None:
    decoder = Decoder({".JSON": "json", ".cls": "int"})
    assert decoder.spec == {"json": "json", "cls": "int"}
    assert decoder(sample(json=b"1", cls=b"2")) == sample(json=1, cls=2)
    with pytest.raises(ValueError, match="twice"):
        Decoder({"json": "json", ".json": "text"})
    with pytest.raises(ValueError, match="empty field"):
        Decoder({".": "text"})


def test_multi_extension_fields_match_whole_name_first() -> None:
    decoder = Decoder({"seg.txt": reverse, "txt": "text"})
    out = decoder(sample(**{"seg.txt": b"abc", "txt": b"abc", "x.y.txt": b"xyz"}))
    assert out == sample(**{"seg.txt": b"cba", "txt": "abc", "x.y.txt": "xyz"})
    only_last = Decoder({"txt": "text"})(sample(**{"seg.txt": b"abc"}))
    assert only_last["seg.txt"] == "abc"


def test_callables() -> None:
    decoder = Decoder({"bin": reverse, "n": lambda data: len(data)})
    assert decoder(sample(bin=b"abc", n=b"1234")) == sample(bin=b"cba", n=4)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown decoder 'jpeg'.*bytes, int, json, npz"):
        Decoder({"jpg": "jpeg"})
    with pytest.raises(TypeError, match="decoder name or a callable"):
        Decoder({"jpg": 3})  # type: ignore[dict-item]


@pytest.mark.parametrize("spec", ["pil", ["jpg"], 3])
def test_a_spec_that_is_not_a_mapping_is_a_type_error(spec: object) -> None:
    with pytest.raises(TypeError, match="decode must map fields to decoders"):
        Decoder(spec)  # type: ignore[arg-type]


def test_decoder_errors_name_url_key_and_field() -> None:
    decoder = Decoder({"json": "json", "cls": "int", "txt": "text"})
    cases = {
        "json": (b"{not json", "JSONDecodeError"),
        "cls": (b"seven", "ValueError"),
        "txt": (b"\xff\xfe", "UnicodeDecodeError"),
    }
    for field, (value, kind) in cases.items():
        with pytest.raises(CorruptShardError) as info:
            decoder(sample(**{field: value}))
        message = str(info.value)
        assert URL in message and "'k/0001'" in message and f"'{field}'" in message
        assert kind in message
        assert info.value.url == URL
        assert type(info.value.__cause__).__name__ == kind

    def broken(data: bytes) -> object:
        raise RuntimeError("boom")

    with pytest.raises(CorruptShardError, match="field 'x'.*broken.*boom") as info:
        Decoder({"x": broken})(sample(x=b"1"))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_pickle_round_trip() -> None:
    decoder = Decoder({"jpg": "pil", ".json": "json", "bin": reverse})
    again = pickle.loads(pickle.dumps(decoder))
    assert again == decoder
    assert again.spec == decoder.spec
    assert again(sample(json=b"[1]", bin=b"ab")) == sample(json=[1], bin=b"ba")
    assert "Decoder(" in repr(again)


def test_pil_decoders() -> None:
    from PIL import Image as image_module

    decoder = Decoder({"png": "pil", "rgb.png": "pil_rgb", "l.png": "pil_l"})
    out = decoder(sample(png=png("L"), **{"rgb.png": png("L"), "l.png": png("RGB")}))
    for field, mode in (("png", "L"), ("rgb.png", "RGB"), ("l.png", "L")):
        image = out[field]
        assert isinstance(image, image_module.Image)
        assert image.mode == mode and image.size == (4, 3)
    assert out["rgb.png"].getpixel((0, 0)) == (200, 200, 200)  # type: ignore[attr-defined]
    with pytest.raises(CorruptShardError, match="field 'png'.*'pil'"):
        decoder(sample(png=b"not an image"))


def test_numpy_decoders() -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.int16).reshape(2, 3))
    npz = io.BytesIO()
    np.savez(npz, a=np.ones(3), b=np.zeros((2, 2)))
    decoder = Decoder({"npy": "numpy", "npz": "npz"})
    out = decoder(sample(npy=buf.getvalue(), npz=npz.getvalue()))
    array: Any = out["npy"]
    arrays: Any = out["npz"]
    assert array.dtype == np.int16 and array.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sorted(arrays) == ["a", "b"] and arrays["a"].tolist() == [1, 1, 1]
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptShardError, match="field 'npy'") as info:
        decoder(sample(npy=pickled.getvalue()))
    assert "pickle" in str(info.value.__cause__).lower()


class NotATensor:
    """Something torch.load(weights_only=True) must refuse."""


@pytest.mark.torch
def test_torch_decoder() -> None:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(4)}, buf)
    decoder = Decoder({"pth": "torch"})
    out = decoder(sample(pth=buf.getvalue()))
    assert out["pth"]["w"].tolist() == [0, 1, 2, 3]  # type: ignore[index]
    unsafe = io.BytesIO()
    torch.save(NotATensor(), unsafe)
    with pytest.raises(CorruptShardError, match="field 'pth'"):
        decoder(sample(pth=unsafe.getvalue()))


def test_missing_extra_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name in {"PIL", "numpy", "torch"} else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for name, extra in (("pil", "image"), ("numpy", "numpy"), ("torch", "torch")):
        with pytest.raises(ImportError, match=rf"pip install wdsfs\[{extra}\]"):
            Decoder({"x": name})
    assert Decoder({"x": "json"})(sample(x=b"1")) == sample(x=1)


def test_core_modules_import_without_optional_packages() -> None:
    code = (
        "import sys\n"
        "import wdsfs.decode, wdsfs.tar, wdsfs.index\n"
        "print(sorted({'PIL', 'numpy', 'torch'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []
