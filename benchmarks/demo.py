"""The wdsfs demo: stream a synthetic image dataset from a real S3 server on loopback.

Run it with ``python -m pip install "tox>=4.20" && python -m tox -e demo`` (or, in an environment
with ``pip install -e .[test,torch]``, ``python -m benchmarks.demo``). It

1. starts a moto S3 server on 127.0.0.1 (its own process, stopped at the end),
2. writes a small WebDataset of JPEG images and labels into a bucket,
3. streams two epochs through ``StreamingDataLoader`` with DataLoader workers, showing a tqdm
   bar with samples/s and MB/s, and counts the bytes the S3 server sent (through a counting
   proxy): epoch 2 comes from the local cache, so the server sends nothing.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tests.proxy import FaultProxy
from tests.servers import MotoS3Server
from wdsfs import StreamingDataLoader, StreamingWebDataset

MB = 1e6


def make_shard(shard: int, samples: int, size: int) -> bytes:
    """A tar shard of JPEG images (``jpg``) with their class (``cls``)."""
    import tarfile

    rng = np.random.default_rng(shard)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(samples):
            key = f"{shard:05d}-{index:05d}"
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            jpg = io.BytesIO()
            Image.fromarray(pixels).save(jpg, format="JPEG", quality=90)
            for ext, data in (("jpg", jpg.getvalue()), ("cls", str(index % 10).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def to_tensors(sample: dict) -> tuple[torch.Tensor, int]:
    image = torch.from_numpy(np.array(sample["jpg"])).permute(2, 0, 1)
    return image, sample["cls"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with MotoS3Server() as s3, tempfile.TemporaryDirectory() as cache_dir:
        print(f"S3 server (moto) on {s3.endpoint_url}, pid {s3.pid}", flush=True)
        s3.make_bucket("demo")
        fs = s3.filesystem()
        total_bytes = 0
        for shard in tqdm(range(args.shards), desc="writing dataset", unit="shard"):
            data = make_shard(shard, args.samples_per_shard, args.image_size)
            fs.pipe(f"demo/images/train/shard-{shard:06d}.tar", data)
            total_bytes += len(data)
        print(
            f"dataset: {args.shards} shards, {args.shards * args.samples_per_shard} samples, "
            f"{total_bytes / MB:.1f} MB at s3://demo/images/train",
            flush=True,  # in order with the bars (stderr) when both go to one file
        )
        with FaultProxy(s3.endpoint_url) as proxy:  # counts the bytes the server sends
            dataset = StreamingWebDataset(
                "s3://demo/images",
                split="train",
                storage_options=s3.options_for(proxy.endpoint_url),
                decode={"jpg": "pil_rgb", "cls": "int"},
                transform=to_tensors,
                shuffle=True,
                seed=42,
                cache_dir=cache_dir,
                cache_limit="2GB",
            )
            loader = StreamingDataLoader(
                dataset, batch_size=args.batch_size, num_workers=args.num_workers
            )
            for epoch in range(args.epochs):
                dataset.set_epoch(epoch)
                proxy.reset_counters()
                samples, started = 0, time.perf_counter()
                total = args.shards * args.samples_per_shard
                with tqdm(desc=f"epoch {epoch + 1}", unit="sample", total=total) as bar:
                    for _images, labels in loader:
                        samples += len(labels)
                        bar.update(len(labels))
                        megabytes = samples / total * total_bytes / MB
                        rate = megabytes / (time.perf_counter() - started)
                        bar.set_postfix({"MB/s": f"{rate:.1f}"})
                elapsed = time.perf_counter() - started
                from_s3 = proxy.bytes_to_client
                source = (
                    "the local cache (0 bytes from S3)"
                    if from_s3 == 0
                    else f"S3 ({from_s3 / MB:.1f} MB)"
                )
                print(
                    f"epoch {epoch + 1}: {samples} samples in {elapsed:.2f}s = "
                    f"{samples / elapsed:.0f} samples/s, {total_bytes / MB / elapsed:.1f} MB/s, "
                    f"read from {source}",
                    flush=True,
                )
    print("S3 server stopped; cache removed.", flush=True)


if __name__ == "__main__":
    main()
