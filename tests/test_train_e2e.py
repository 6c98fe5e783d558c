"""End to end: the CLI trains in one process and under torchrun, and bad input fails clearly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    base_env,
    events,
    fast_overrides,
    read_jsonl,
    run_train,
    start,
    stop,
    torchrun_cmd,
)

TRAIN_KEYS = {"mode", "step", "epoch", "loss", "lr", "world_size"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


def test_single_process_run_logs_checkpoints_and_evaluates(tmp_path, cache):
    work = tmp_path / "work"
    args = ["--work-dir", str(work), "--cfg-options", *fast_overrides(cache, "train.max_steps=6",
            "checkpoint.interval=3", "train.validate=true", "log.interval=2")]
    done = run_train(args, base_env(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(work / "metrics.jsonl")
    train = [r for r in records if r.get("mode") == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all(TRAIN_KEYS <= set(r) and r["world_size"] == 1 for r in train)
    # the total is the sum of the loss terms, each averaged over the interval
    terms = {k: v for k, v in train[-1].items() if k.startswith("loss_")}
    assert len(terms) >= 2 and train[-1]["loss"] == pytest.approx(sum(terms.values()))
    val = [r for r in records if r.get("mode") == "val"]
    assert len(val) == 1 and val[0]["step"] == 6 and 0.0 <= val[0]["bbox_mAP"] <= 1.0
    assert {"bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"} <= set(val[0])
    names = [e["event"] for e in events(work)]
    assert names[0] == "start" and names[-1] == "done"
    assert [e["step"] for e in events(work, "checkpoint")] == [3, 6]
    assert (work / "config.yaml").read_text().count("max_steps: 6") == 1
    assert (work / "train.log").read_text().count("Environment") == 1
    assert "bbox_mAP" in done.stderr  # the metrics table


def test_checkpoint_carries_config_text_and_environment(tmp_path, cache):
    work = tmp_path / "work"
    done = run_train(["--work-dir", str(work), "--cfg-options", *fast_overrides(cache, "train.max_steps=2")],
                     base_env(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((work / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    state = torch.load(work / "checkpoints" / "step-00000002" / manifest["data"], weights_only=True)
    assert "max_steps: 2" in state["meta"]["config"]
    assert state["meta"]["env"]["torch"] == str(torch.__version__)
    assert state["progress"]["global_step"] == 2


def test_torchrun_two_processes(tmp_path, cache):
    work = tmp_path / "work"
    cmd = torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options",
                           *fast_overrides(cache, "train.max_steps=4", "train.validate=true")])
    proc = start(cmd, base_env(cache), tmp_path / "torchrun.log")
    try:
        assert proc.wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        stop(proc)
    train = [r for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 for r in train)
    assert any(r.get("mode") == "val" for r in read_jsonl(work / "metrics.jsonl"))


@pytest.mark.parametrize("case", ["missing_root", "bad_json", "bad_xml", "bad_image"])
def test_bad_input_fails_with_one_clear_message(tmp_path, cache, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "missing_root":
        opts, culprit = ["data.type=voc", f"data.root={tmp_path / 'nowhere'}"], "nowhere"
    elif case == "bad_json":
        (data / "ann.json").write_text("{not json")
        opts, culprit = ["data.type=coco", f"data.root={data}", f"data.train_ann={data / 'ann.json'}"], "ann.json"
    elif case == "bad_xml":
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (data / sub).mkdir(parents=True)
        (data / "ImageSets/Main/train.txt").write_text("img1\n")
        (data / "Annotations/img1.xml").write_text("<annotation><object>")
        opts, culprit = ["data.type=voc", f"data.root={data}"], "img1.xml"
    else:
        (data / "img.jpg").write_bytes(b"not an image at all")
        ann = {"images": [{"id": 1, "file_name": "img.jpg", "width": 64, "height": 64}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "area": 400,
                                "iscrowd": 0}],
               "categories": [{"id": 1, "name": "thing"}]}
        (data / "ann.json").write_text(json.dumps(ann))
        opts = ["data.type=coco", f"data.root={data}", f"data.train_ann={data / 'ann.json'}",
                "data.global_batch_size=1"]
        culprit = "img.jpg"
    work = tmp_path / "work"
    done = run_train(["--work-dir", str(work), "--cfg-options", *fast_overrides(cache, "train.max_steps=1", *opts)],
                     base_env(cache))
    assert done.returncode == 2, done.stderr[-3000:]
    assert culprit in done.stderr
    assert "Traceback" not in done.stderr
    assert not (work / "checkpoints").exists()


def test_config_typo_exits_2_with_suggestion(tmp_path, cache):
    done = run_train(["--work-dir", str(tmp_path), "--cfg-options", "optimizer.lrr=0.1"], base_env(cache))
    assert done.returncode == 2
    assert "optimizer.lrr" in done.stderr and "optimizer.lr" in done.stderr
