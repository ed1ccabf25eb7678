"""Semantic segmentation transfer: mIoU against a hand-computed confusion matrix, the VOC
loader's bad-input messages, the dilated stage against torchvision's, and learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_helpers import write_voc

from mocolab.data import DatasetError
from mocolab.evaluate.segment import (
    IGNORE,
    Segmenter,
    confusion_matrix,
    evaluate_segmenter,
    load_segmentation,
    segmentation_scores,
    train_segmenter,
)


def test_miou_and_pixel_accuracy_against_a_hand_computed_confusion_matrix():
    # 3 classes; class 2 never occurs (neither truth nor prediction): it has no IoU.
    # One pixel is 255 (ignored) whatever is predicted there.
    target = torch.tensor([[0, 0, 0, 1],
                           [0, 1, 1, 1],
                           [IGNORE, 1, 0, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 0, 1],
                         [1, 1, 0, 1]], dtype=torch.uint8)
    cm = confusion_matrix(target, pred, 3)
    # truth 0 (6 pixels): predicted 0 at (0,0) (0,1) (1,0) (2,2) → 4, predicted 1 at (0,2) (2,3) → 2
    # truth 1 (5 pixels): predicted 1 at (0,3) (1,1) (1,3) (2,1) → 4, predicted 0 at (1,2) → 1
    assert cm.tolist() == [[4, 2, 0], [1, 4, 0], [0, 0, 0]]
    s = segmentation_scores(cm)
    iou0 = 4 / (4 + 2 + 1)  # TP / (TP + FN + FP)
    iou1 = 4 / (4 + 1 + 2)
    assert s["iou"][0] == pytest.approx(100 * iou0)
    assert s["iou"][1] == pytest.approx(100 * iou1)
    assert s["iou"][2] is None
    assert s["miou"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert s["pixel_acc"] == pytest.approx(100 * 8 / 11)
    assert s["mean_acc"] == pytest.approx(100 * (4 / 6 + 4 / 5) / 2)
    # a class predicted but absent from the truth counts, with IoU 0
    s2 = segmentation_scores(confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 2]), 3))
    assert s2["iou"] == [50.0, None, 0.0] and s2["miou"] == pytest.approx(25.0)


def test_voc_loader_reads_label_maps_and_names_bad_files(tmp_path):
    root = write_voc(tmp_path / "voc", {"train": 3, "val": 2})
    data = load_segmentation(root, "train")
    assert len(data) == 3 and data.images[0].shape == (1, 32, 32) and data.max_label() == 2
    palette = Image.fromarray(np.full((32, 32), 2, np.uint8)).convert("P")  # a VOC palette PNG
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette.save(root / "SegmentationClass" / "train_000.png")
    assert int(load_segmentation(root, "train").masks[0].max()) == 2  # indices, not colours
    with pytest.raises(DatasetError, match=r"test\.txt does not exist.*lists found"):
        load_segmentation(root, "test")
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(root / "SegmentationClass/val_001.png")
    with pytest.raises(DatasetError, match=r"val_001\.png is 32×30 but its image val_001\.png is "
                                           r"32×32"):
        load_segmentation(root, "val")
    (root / "SegmentationClass/val_001.png").unlink()
    with pytest.raises(DatasetError, match=r"val_001\.png \(the label map .* does not exist"):
        load_segmentation(root, "val")
    (root / "JPEGImages/val_000.png").unlink()
    with pytest.raises(DatasetError, match=r"val_000\.jpg \(listed in .*val\.txt\) does not exist"):
        load_segmentation(root, "val")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(DatasetError, match="lists no images"):
        load_segmentation(root, "val")
    with pytest.raises(DatasetError, match="does not exist; pass a folder"):
        load_segmentation(tmp_path / "nowhere", "train")


def test_dilated_last_stage_equals_torchvision_replace_stride_with_dilation():
    import torchvision

    from mocolab.backbones import resnet
    from mocolab.evaluate.stages import dilate_last_stage, stage_maps

    torch.manual_seed(0)
    ours = resnet("resnet50", in_channels=3, stem="imagenet").eval()
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    ref.load_state_dict(ours.state_dict(), strict=False)  # all but the classifier
    dilate_last_stage(ours)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        h = stage_maps(ours, x)["layer4"]
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
    assert h.shape == (1, 2048, 3, 3)  # output stride 16, not 32
    torch.testing.assert_close(h, r)


def test_segmenter_learns_squares(tmp_path):
    from mocolab.backbones import resnet

    root = write_voc(tmp_path / "voc", {"train": 48, "val": 16})
    train, val = load_segmentation(root, "train"), load_segmentation(root, "val")
    torch.manual_seed(0)
    kw = {"mean": (0.3,), "std": (0.3,), "channels": 1}
    model = Segmenter(resnet("resnet18", 1, "compact", width=8), 3, channels=16)
    before = evaluate_segmenter(model, val, 3, **kw)
    train_segmenter(model, train, iters=40, batch_size=8, lr=0.05, crop=32, scale=(0.75, 1.25),
                    **kw)
    after = evaluate_segmenter(model, val, 3, **kw)
    # chance (every pixel background) gives mIoU ≈ 100·0.75/3 = 25; 40 steps reach ~45-50
    assert after["miou"] > 38 and after["miou"] > before["miou"] + 20, (before["miou"], after)
    assert sum(map(sum, after["confusion"])) == 16 * 32 * 32


def test_scenes_layout_pairs_images_and_label_maps_by_name(tmp_path):
    # the layout of `mocolab data scenes`: SPLIT/images/NAME.png + SPLIT/masks/NAME.png
    root = tmp_path / "scenes"
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for name in ("000000", "000001"):
            Image.fromarray(np.full((20, 20), 90, np.uint8)).save(root / split / "images" /
                                                                 f"{name}.png")
            Image.fromarray(np.full((20, 20), 3, np.uint8)).save(root / split / "masks" /
                                                                f"{name}.png")
    (root / "scenes.json").write_text('{"classes": ["T-shirt", "Trouser", "Pullover"]}')
    val = load_segmentation(root, "val")  # no val split: the test split
    assert val.name.endswith("test") and val.ids == ["000000", "000001"] and val.max_label() == 3
    assert val.class_names == ["background", "T-shirt", "Trouser", "Pullover"]
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "test/masks/000002.png")
    with pytest.raises(DatasetError, match=r"000002\.png \(and 0 more\) has no image"):
        load_segmentation(root, "test")
    (root / "test/masks/000002.png").unlink()
    (root / "test/masks/000001.png").unlink()
    with pytest.raises(DatasetError, match=r"000001\.png \(the label map of .*\) does not exist"):
        load_segmentation(root, "test")


def test_frozen_norm_keeps_the_backbone_bn_and_trains_the_rest(tmp_path):
    from mocolab.backbones import resnet

    root = write_voc(tmp_path / "voc", {"train": 4, "val": 1}, size=16)
    torch.manual_seed(0)
    model = Segmenter(resnet("resnet18", 1, "compact", width=4), 3, channels=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_segmenter(model, load_segmentation(root, "train"), mean=(0.3,), std=(0.3,),
                    channels=1, iters=2, batch_size=2, lr=0.1, norm="frozen")
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("backbone.") and (".bn" in k or "downsample.1" in k or k.startswith(
                "backbone.bn1")):
            assert torch.equal(after[k], v), k  # statistics, affine weights, counters
        elif k.endswith(("conv1.weight", "conv2.weight")):
            assert not torch.equal(after[k], v), k
