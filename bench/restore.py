"""Restore cost on one node: bytes read from the S3 endpoint and time per restart, at 1, 2 and 4 processes.

    python bench/restore.py                    # a 141 MB state (the embedded default's), 1/2/4 processes
    python bench/restore.py --size-mb 20 --repeats 1 --procs 1,2   # a quick run

Three ways to restore, each run as a real ``torchrun --standalone`` job (gloo) that calls the trainer's
``state.find_checkpoint`` (or, for ``broadcast``, a prototype of it), interleaved in one run:

* ``before``: every rank reads the checkpoint from the store (no node copies: ``data.cache.dir: ""``);
* ``broadcast``: rank 0 reads and verifies it, and broadcasts the bytes over the process group; each rank
  verifies the digest and loads them (a prototype, here only: measured, not chosen);
* ``node-copy``: what the trainer does: the node's first process reads it into the node-local cache dir,
  the others load that copy verified by its digest (elastic_det/checkpoint/node_copy.py);
* ``node-warm``: the same on a node whose copy is still there (torchrun restarted its workers in place, or
  the supervisor relaunched torchrun on the same host: the most frequent restart).

Bytes are counted at the endpoint: a counting proxy (tests/faulty_s3.py, no faults) in front of a moto
server; only the checkpoint data objects' GET bodies are counted. Every restart starts from an empty node
cache (a replaced node). Restore time: from a barrier before the restore to the last rank holding the
state (the max over ranks), median over ``--repeats``; each rank has listed the work dir before the
barrier, so the time is the data path only (the connection set-up is the same for all three).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

VARIANTS = ("before", "broadcast", "node-copy", "node-warm")
DATA_GET = r"/checkpoints/step-\d+/state-[0-9a-f]+\.pt"


def synthetic_state(size_mb: float) -> dict:
    """A training state of about ``size_mb``: ~160 tensors of mixed sizes (a detector's shape), plain data."""
    import torch

    g = torch.Generator().manual_seed(0)
    total = int(size_mb * 1e6 / 4 * 1000 / 1100)  # the weights below sum to 1.1 x total
    sizes = [max(1, total * w // 1000) for w in [2] * 100 + [8] * 50 + [50] * 10]
    model = {f"w{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
            "progress": {"epoch": 0, "step_in_epoch": 10, "global_step": 10, "seed": 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=141.0)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from faulty_s3 import FaultyS3
    from s3 import MotoServer, s3_env

    from elastic_det.checkpoint import CheckpointStore
    from elastic_det.storage import WorkDir

    procs = [int(p) for p in args.procs.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-restore-")
    server = MotoServer.start()
    proxy = FaultyS3(server.endpoint).start()
    try:
        url = f"s3://{server.create_bucket('restore')}/run"
        os.environ.update(s3_env(proxy.endpoint))  # the workers' environment; the save goes straight to moto
        store = CheckpointStore(WorkDir(url, {"endpoint_url": server.endpoint}))
        manifest = store.save(10, synthetic_state(args.size_mb), {"world_size": 1})
        size = manifest.size
        print(f"checkpoint: {size / 1e6:.1f} MB ({manifest.hash_alg}); torch {_torch_version()}; "
              f"{os.cpu_count()} CPUs", flush=True)
        path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        results: dict[tuple[str, int], list[tuple[float, int]]] = {}
        for _ in range(args.repeats):
            for n in procs:
                for variant in VARIANTS:
                    cache = os.path.join(tmp, "cache")
                    if variant != "node-warm":
                        shutil.rmtree(cache, ignore_errors=True)
                    with proxy._lock:
                        proxy.log.clear()
                    out = os.path.join(tmp, "result.json")
                    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc-per-node={n}", os.path.abspath(__file__), "--worker", variant,
                                    url, cache, out], env=env, check=True, stdout=subprocess.DEVNULL)
                    with open(out) as f:
                        seconds = json.load(f)["seconds"]
                    read = proxy.bytes_served(DATA_GET)
                    results.setdefault((variant, n), []).append((seconds, read))
                    print(f"  {variant:9s} {n} procs: {read / 1e6:7.1f} MB read, {seconds:.2f} s", flush=True)
        print(f"\n{'variant':10s} {'procs':>5s} {'MB read per restart':>20s} {'x checkpoint':>13s} "
              f"{'restore s (median)':>19s}")
        for n in procs:
            for variant in VARIANTS:
                runs = results[(variant, n)]
                read = statistics.median(r for _, r in runs)
                print(f"{variant:10s} {n:5d} {read / 1e6:20.1f} {read / size:13.2f} "
                      f"{statistics.median(s for s, _ in runs):19.2f}")
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def worker(variant: str, url: str, cache: str, out: str) -> None:
    """One rank of a restore: the variant's restore between two barriers; rank 0 writes the max time."""
    import torch
    import torch.distributed as dist

    from elastic_det.checkpoint import CheckpointStore
    from elastic_det.checkpoint.node_copy import NodeCopies
    from elastic_det.engine import state as training_state
    from elastic_det.storage import WorkDir

    dist.init_process_group("gloo")
    store = CheckpointStore(WorkDir(url), node_copies=NodeCopies(cache) if variant.startswith("node") else None)
    assert store.committed_steps() == [10]  # the connection and listing set up, out of the timed part
    dist.barrier()
    start = time.perf_counter()
    if variant == "broadcast":
        restored = broadcast_restore(store)
    else:
        restored = training_state.find_checkpoint(store, "auto").state
    assert restored["progress"]["global_step"] == 10
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"seconds": seconds.item()}, f)
    dist.destroy_process_group()


def broadcast_restore(store) -> dict:
    """Option B: rank 0 reads and verifies the newest checkpoint; its bytes are broadcast over the process
    group; every rank verifies the digest before it loads them."""
    import torch
    import torch.distributed as dist

    from elastic_det.checkpoint import Manifest, step_dir
    from elastic_det.checkpoint.verify import HEAD, check_digest, digest_bytes, load_weights_only

    header: list = [None]
    blob = b""
    if dist.get_rank() == 0:
        step = store.newest_committed_step()
        rel = step_dir(step)
        manifest = Manifest.from_json(store.work_dir.read_bytes(f"{rel}/manifest.json"))
        blob = store.work_dir.read_bytes(f"{rel}/{manifest.data}")
        check_digest(digest_bytes(blob, manifest), manifest)
        header = [manifest.to_json()]
    dist.broadcast_object_list(header)
    manifest = Manifest.from_json(header[0].encode() if isinstance(header[0], str) else header[0])
    buffer = (torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob
              else torch.empty(manifest.size, dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    if dist.get_rank() != 0:
        blob = buffer.numpy().tobytes()
        check_digest(digest_bytes(blob, manifest), manifest)
    return load_weights_only(io.BytesIO(blob), blob[:HEAD], "cpu")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
