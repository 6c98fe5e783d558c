"""The digests a checkpoint manifest records (elastic_det.storage.hashing), computed while writing and again on
load, on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import os
import random
import zlib

import pytest
import torch

from elastic_det.storage import WorkDir
from elastic_det.storage.hashing import CRC_CHUNK, ChunkedCrc32, RegionCrc32, new_digest, parse_region_digest


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "work")
    return request.getfixturevalue("s3_bucket") + "/run"


def _feed(digest, data: bytes, seed: int) -> str:
    """Feed ``data`` in pieces of random sizes (1 byte to 3 MiB), as a writer or a reader would."""
    rng = random.Random(seed)
    view, pos = memoryview(data), 0
    while pos < len(data):
        step = rng.choice([1, 7, 4096, 2**20 - 3, 3 * 2**20])
        digest.update(view[pos:pos + step])
        pos += step
    return digest.hexdigest()


def test_chunked_crc32_is_one_crc_per_64_mib_whatever_the_pieces():
    data = os.urandom(CRC_CHUNK + 1000)
    expected = f"{zlib.crc32(data[:CRC_CHUNK]):08x}{zlib.crc32(data[CRC_CHUNK:]):08x}"
    assert _feed(ChunkedCrc32(), data, 1) == _feed(ChunkedCrc32(), data, 2) == expected
    assert ChunkedCrc32().hexdigest() == "00000000"  # empty data: one (empty) chunk


def test_region_crc32_covers_each_region_and_the_rest_whatever_the_pieces():
    data = os.urandom(9 * 2**20)
    regions = [(100, 2**20), (2**20 + 100, 3 * 2**20 + 5), (8 * 2**20, 2**20)]  # adjacent, and one at the end
    rest = data[:100] + data[4 * 2**20 + 105:8 * 2**20]
    expected = f"{zlib.crc32(rest):08x}" + "".join(f" {o}+{n}:{zlib.crc32(data[o:o + n]):08x}" for o, n in regions)
    assert _feed(RegionCrc32(regions), data, 3) == _feed(RegionCrc32(regions), data, 4) == expected
    assert parse_region_digest(expected, len(data)) == [(o, n, zlib.crc32(data[o:o + n])) for o, n in regions]
    assert _feed(new_digest("crc32/zip", expected, len(data)), data, 5) == expected


def test_torch_save_through_the_writer_gets_the_zip_digest(url):
    wd = WorkDir(url)
    state = {"a": torch.randn(2**19), "b": torch.randn(5), "c": torch.randn(2**18 + 1)}
    size, hash_alg, digest = wd.write_atomic_digest("x/state.pt", lambda f: torch.save(state, f), "crc32/zip")
    data = wd.read_bytes("x/state.pt")
    assert (size, hash_alg) == (len(data), "crc32/zip")
    regions = parse_region_digest(digest, size)
    assert [n for _, n, _ in regions] == [2**21, 2**20 + 4]  # the tensors of 1 MiB or more
    assert _feed(new_digest(hash_alg, digest, size), data, 6) == digest
    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["c"], state["c"])


@pytest.mark.parametrize("pieces", [[100], [3 * 2**20, 10, 2**20]], ids=["small", "large-writes"])
def test_bytes_that_are_no_zip_are_read_back_and_digested_by_chunks(url, pieces):
    """crc32/zip needs the zip's own CRCs; without them the written bytes are read back once (crc32/64MiB)."""
    wd = WorkDir(url)
    data = os.urandom(sum(pieces))

    def write(f):
        pos = 0
        for n in pieces:
            f.write(data[pos:pos + n])
            pos += n

    size, hash_alg, digest = wd.write_atomic_digest("x/blob.bin", write, "crc32/zip")
    assert (size, hash_alg, digest) == (len(data), "crc32/64MiB", f"{zlib.crc32(data):08x}")
    assert wd.read_bytes("x/blob.bin") == data
