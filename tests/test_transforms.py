import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from elastic_det.config.schema import TransformConfig
from elastic_det.data import DetectionDataset, ImageRecord, TrainSamples, build_transforms, sample_seed


def rectangle_sample(box=(10, 20, 30, 40), size=(60, 100)):
    """A black image (h, w) = size with a white rectangle exactly at the XYXY ``box``."""
    h, w = size
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes([list(box)], format="XYXY", canvas_size=(h, w),
                                          dtype=torch.float32),
        "labels": torch.tensor([1]),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def white_extent(image):
    """XYXY extent of the pixels brighter than half, in the float image."""
    ys, xs = np.nonzero(image[0].numpy() > 0.5)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("min_size", [[], [120], [45]])
def test_box_follows_the_object_through_flip_and_resize(min_size):
    transforms = build_transforms(TransformConfig(min_size=min_size, max_size=1000, flip_prob=1.0), train=True)
    image, target = transforms(*rectangle_sample())
    assert image.dtype == torch.float32 and float(image.max()) <= 1.0
    expected_h = min_size[0] if min_size else 60
    assert image.shape[-2:] == (expected_h, round(100 * expected_h / 60))
    box = target["boxes"][0].tolist()
    assert np.allclose(box, white_extent(image), atol=1.0)
    assert box[0] > image.shape[-1] / 2  # flipped: the rectangle was on the left
    assert target["labels"].tolist() == [1] and target["image_id"] == 7


def test_multi_scale_draws_a_size_per_sample_and_eval_is_deterministic():
    cfg = TransformConfig(min_size=[40, 60, 80], max_size=1000, flip_prob=1.0, color_jitter=0.4)
    train = build_transforms(cfg, train=True)
    heights = set()
    for seed in range(20):
        torch.manual_seed(seed)
        heights.add(train(*rectangle_sample())[0].shape[-2])
    assert heights == {40, 60, 80}
    evaluate = build_transforms(cfg, train=False)
    image, target = evaluate(*rectangle_sample())
    assert image.shape[-2] == 80  # the largest scale, no flip, no jitter
    sx, sy = image.shape[-1] / 100, 80 / 60
    assert np.allclose(target["boxes"][0].tolist(), [10 * sx, 20 * sy, 30 * sx, 40 * sy])
    assert float(image.max()) == 1.0 and float(image.min()) == 0.0


def test_boxes_are_clamped_and_empty_ones_removed_with_their_labels():
    image, target = rectangle_sample()
    target["boxes"] = tv_tensors.BoundingBoxes([[90, 10, 130, 20], [120, 0, 140, 10], [5, 5, 15, 15]],
                                               format="XYXY", canvas_size=(60, 100))
    target["labels"] = torch.tensor([1, 2, 3])
    out_image, out = build_transforms(TransformConfig(), train=True)(image, target)
    assert out["boxes"].tolist() == [[90, 10, 100, 20], [5, 5, 15, 15]]
    assert out["labels"].tolist() == [1, 3]


def make_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(i + 1, str(path), 64, 48, boxes=np.array([[4, 4, 20, 30]], np.float32),
                                   labels=np.array([1], np.int64)))
    return DetectionDataset(records, ["thing"], [1])


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    cfg = TransformConfig(min_size=[32, 40, 48, 56], max_size=200, flip_prob=0.5, color_jitter=0.4)
    dataset = make_dataset(tmp_path)
    a = TrainSamples(dataset, build_transforms(cfg, train=True), seed=11)
    b = TrainSamples(dataset, build_transforms(cfg, train=True), seed=11)
    rng_before = torch.get_rng_state()
    image_a, target_a = a[(3, 1)]
    torch.manual_seed(1234)  # the global generator's state must not matter
    image_b, target_b = b[(3, 1)]
    assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    assert type(image_a) is torch.Tensor and type(target_a["boxes"]) is torch.Tensor
    assert target_a["image_id"] == 2 and target_a["labels"].tolist() == [1]
    torch.set_rng_state(rng_before)
    a[(0, 0)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling does not advance the global RNG
    others = [a[(epoch, 1)] for epoch in range(4, 8)]
    assert any(o[0].shape != image_a.shape or not torch.equal(o[0], image_a) for o in others)
    assert sample_seed(11, 3, 1) != sample_seed(11, 1, 3)
