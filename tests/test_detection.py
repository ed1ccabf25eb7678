"""Transfer to detection: COCO AP against a hand computation, the detector built over mocolab
ResNets, COCO / VOC inputs and their bad-input messages, and `mocolab eval detect` end to end."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from mocolab.backbones import resnet, vit_backbone
from mocolab.cli import main
from mocolab.config import ConfigError
from mocolab.data import DatasetError
from mocolab.data.detection import (
    DetectionDataset,
    DetectionDataWarning,
    check_coco,
    detection_splits,
    read_voc,
)
from mocolab.evaluate.detection import (
    build_detector,
    check_fpn_backbone,
    coco_ap,
    lr_factor,
)

# --- COCO AP by pycocotools against a hand computation ---------------------------------------


def _rle(box: list[int], size: int = 100) -> dict:
    x, y, w, h = box
    m = np.zeros((size, size), np.uint8)
    m[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [size, size], "counts": rle["counts"].decode("ascii")}


def _two_images():
    """Image 1: ground truth A (detected exactly, score .9) and B (missed). Image 2: ground
    truth C, a false positive (score .8) and a detection of C with IoU 247/400 = 0.6175
    (score .7): a true positive at IoU thresholds .50, .55, .60, a false one from .65 on."""
    a, b, c = [30, 30, 20, 20], [60, 60, 20, 20], [0, 0, 20, 20]
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
                     {"id": 2, "width": 100, "height": 100, "file_name": "2.png"}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": i + 1, "image_id": im, "category_id": 1, "bbox": box,
                           "area": 400, "iscrowd": 0, "segmentation": _rle(box)}
                          for i, (im, box) in enumerate([(1, a), (1, b), (2, c)])]}
    dets = [(1, a, 0.9), (2, [60, 0, 20, 20], 0.8), (2, [0, 0, 19, 13], 0.7)]
    results = [{"image_id": im, "category_id": 1, "bbox": box, "score": s,
                "segmentation": _rle(box)} for im, box, s in dets]
    return gt, results


def _ap101(precisions_at_recall: list[tuple[float, float]]) -> float:
    """COCO's 101-point interpolated AP: the mean over r = 0, 0.01, …, 1 of the largest
    precision reached at a recall ≥ r (0 when that recall is never reached)."""
    points = [i / 100 for i in range(101)]
    return sum(max([p for rec, p in precisions_at_recall if rec >= r - 1e-12], default=0.0)
               for r in points) / 101


def test_coco_ap_equals_the_101_point_ap_computed_by_hand():
    # ranked detections: .9 TP, .8 FP, .7 TP (IoU ≤ .60) or FP (IoU ≥ .65); 3 ground truths
    low = _ap101([(1 / 3, 1.0), (1 / 3, 1 / 2), (2 / 3, 2 / 3)])  # IoU thresholds .50–.60
    high = _ap101([(1 / 3, 1.0), (1 / 3, 1 / 2), (1 / 3, 1 / 3)])  # .65–.95
    # by hand: recall points 0..0.33 (34 of them) reach precision 1, 0.34..0.66 (33) reach 2/3
    assert low == pytest.approx((34 * 1 + 33 * 2 / 3) / 101)
    assert high == pytest.approx(34 / 101)
    expected = {"AP": 100 * (3 * low + 7 * high) / 10, "AP50": 100 * low, "AP75": 100 * high}
    gt, results = _two_images()
    for iou_type in ("bbox", "segm"):  # rectangles: mask IoU = box IoU
        ap = coco_ap(gt, results, iou_type)
        for k, v in expected.items():
            assert ap[k] == pytest.approx(v, abs=1e-9), (iou_type, k)
        assert ap["APs"] == pytest.approx(expected["AP"])  # every object is small (< 32²)
        assert ap["APl"] == -100.0  # COCOeval's "no ground truth of this size"
    assert coco_ap(gt, [], "bbox")["AP"] == 0.0


# --- the detector ----------------------------------------------------------------------------


def test_detector_over_a_compact_resnet_anchors_and_norms():
    net = resnet("resnet18", in_channels=1, stem="compact", width=8)
    model = build_detector(net, num_classes=3, in_channels=1, mean=[0.5], std=[0.25],
                           norm="syncbn", min_size=64, max_size=64, rois_per_image=32,
                           proposals=100)
    # strides 2, 4, 8, 16 and the pooled 32 of the compact stem: anchors 8 × stride
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.backbone.out_channels == 32  # 4 × width
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.fpn.modules())
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # + background
    frozen = build_detector(resnet("resnet18", in_channels=1, stem="compact", width=8),
                            num_classes=3, in_channels=1, mean=[0.5], std=[0.25], norm="frozen")
    kinds = {type(m).__name__ for m in frozen.backbone.modules()}
    assert "FrozenBatchNorm2d" in kinds and "BatchNorm2d" not in kinds
    # bottleneck stages (4 × width × 2^i channels) and torchvision's stem: its own anchors
    big = build_detector(resnet("resnet50", in_channels=3, stem="imagenet", width=8),
                         num_classes=2, in_channels=3, mean=[0.5] * 3, std=[0.2] * 3)
    assert [b[0].in_channels for b in big.backbone.fpn.inner_blocks] == [32, 64, 128, 256]
    assert big.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    # a training step on an image with and one without objects (no error from torchvision)
    model.train()
    images = [torch.rand(1, 64, 64), torch.rand(1, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_vitdet_simple_pyramid_over_a_vit(one_thread):
    vit = vit_backbone("vit_tiny", in_channels=1, image_size=32, patch_size=8, depth=2)
    model = build_detector(vit, num_classes=2, in_channels=1, mean=[0.5], std=[0.25],
                           min_size=48, max_size=48, rois_per_image=16, proposals=50)
    # strides p/4, p/2, p, 2p and the pooled 4p; D / 3 channels (64 for ViT-Ti's 192)
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    feats = model.backbone(torch.zeros(1, 1, 64, 96))  # another grid than pretraining's 4×4
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(32, 48), (16, 24), (8, 12),
                                                             (4, 6), (2, 3)]
    assert all(f.shape[1] == 64 for f in feats.values())
    model.train()
    losses = model([torch.rand(1, 48, 48)], [{"boxes": torch.tensor([[4.0, 5.0, 30.0, 40.0]]),
                                              "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None  # the ViT is fine-tuned too


def test_a_backbone_without_a_pyramid_is_refused():
    odd = vit_backbone("vit_tiny", in_channels=3, image_size=28, patch_size=7, depth=1)
    with pytest.raises(ConfigError, match="patch size 7: use a ViT with patch 4, 8, 16 or 32"):
        check_fpn_backbone(odd, "vit_tiny")
    from mocolab.methods.cmc import lab_split_backbone

    cmc = lab_split_backbone("resnet18", "compact", 8, 1)
    with pytest.raises(ConfigError, match=r"ResNet backbone.*or a ViT.*CMC's two-stream"):
        build_detector(cmc, num_classes=2, in_channels=3, mean=[0.5] * 3, std=[0.2] * 3)


def test_lr_schedule_is_detectron2s_warmup_multistep():
    total, warmup = 90, 10
    assert lr_factor(0, total, warmup) == pytest.approx(0.001)
    assert lr_factor(5, total, warmup) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, total, warmup) == 1.0
    assert lr_factor(59, total, warmup) == 1.0
    assert lr_factor(60, total, warmup) == pytest.approx(0.1)  # 2/3 of 90
    assert lr_factor(80, total, warmup) == pytest.approx(0.01)  # 8/9 of 90


# --- inputs and their bad-input messages -------------------------------------------------------


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in (1, 2):
        Image.fromarray(np.full((20, 30), 50 * i, np.uint8)).save(d / f"{i}.png")
    return d


def _coco(**changes) -> dict:
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20}
                       for i in (1, 2)],
            "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5]},
                            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [5, 5, 8, 8]}]}
    coco.update(changes)
    return coco


def _ann(**kw) -> dict:
    return {"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], **kw}


def _check(coco, images, masks=False):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = check_coco(coco, "ann.json", images, masks=masks)
    messages = [str(w.message) for w in caught if w.category is DetectionDataWarning]
    return split, messages


@pytest.mark.parametrize("extra, expected", [
    (_ann(category_id=99), (r"ann.json: 1 of 3 annotations have a category id missing from "
                            r"'categories' \(e.g. 99\).*add the category")),
    (_ann(bbox=[3, 3, 0, 4]), r"1 of 3 boxes have zero or negative width.*fix their bbox"),
    (_ann(image_id=42), r"1 of 3 annotations belong to no listed image \(e.g. image_id 42\)"),
    (_ann(bbox=[40, 1, 4, 4]), r"1 of 3 boxes reach outside.*\(1 wholly outside were left out\)"),
    (_ann(bbox="x"), r"no bbox of 4 finite numbers"),
])
def test_bad_annotations_are_left_out_with_one_warning(images, extra, expected):
    coco = _coco()
    coco["annotations"].append(extra)
    split, messages = _check(coco, images)
    assert len(messages) == 1 and re.search(expected, messages[0]), messages
    assert len(split.coco["annotations"]) == 2  # the two good ones


def test_boxes_reaching_outside_are_clipped(images):
    coco = _coco()
    coco["annotations"].append(_ann(bbox=[25, -2, 10, 6]))
    split, messages = _check(coco, images)
    assert "clipped" in messages[0]
    assert split.coco["annotations"][-1]["bbox"] == [25.0, 0.0, 5.0, 4.0]


def test_missing_and_resized_images(images):
    coco = _coco()
    coco["images"].append({"id": 3, "file_name": "3.png", "width": 30, "height": 20})
    coco["annotations"].append(_ann(image_id=3))
    split, messages = _check(coco, images)
    assert len(messages) == 1 and "1 of 3 images listed are missing from" in messages[0]
    assert [im["id"] for im in split.coco["images"]] == [1, 2]
    assert len(split.coco["annotations"]) == 2  # the missing image's annotation went with it
    coco = _coco()
    coco["images"][1]["width"] = 31
    split, messages = _check(coco, images)
    assert "another size than the width/height" in messages[0]
    with pytest.raises(DatasetError, match="none of the 2 images it lists is in"):
        check_coco(_coco(), "ann.json", images / "elsewhere")


def test_an_undecodable_image_is_a_one_line_error(images):
    split = check_coco(_coco(), "ann.json", images)
    data = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(data[:len(data) // 2])  # the header still reads
    with pytest.raises(DatasetError, match=r"2.png cannot be decoded .*remove it from ann.json"):
        DetectionDataset(split, 1)[1]


def test_masks_of_another_size(images):
    coco = _coco()
    coco["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": "0"}
    coco["annotations"][1]["segmentation"] = [[5, 5, 12, 5, 12, 12]]
    split, messages = _check(coco, images, masks=True)
    assert "1 of 2 masks have another size than their image (e.g. [10, 10] for a 30×20" in \
        messages[0]
    assert "re-encode the masks" in messages[0]
    assert [a["id"] for a in split.coco["annotations"]] == [2]


@pytest.mark.parametrize("coco, expected", [
    (_coco(images=[]), "lists no images: the dataset is empty"),
    (_coco(annotations=[]), "no usable annotation left"),
    (_coco(categories=[]), "lists no categories"),
    ({"images": []}, "is not a COCO instances file"),
    (_coco(images=[{"id": 1}]), "lacks a field"),
])
def test_unusable_files_are_one_line_errors(images, coco, expected):
    with pytest.raises(DatasetError, match=expected) as e:
        check_coco(coco, "ann.json", images)
    assert "\n" not in str(e.value)


def test_coco_2017_layout(tmp_path, images):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(images)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(_coco()))
    train, test = detection_splits(root)
    assert train.image_dir == root / "train2017" and test.image_dir == root / "val2017"
    assert train.category_ids == [3, 7] and len(test) == 2
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"cannot read .*instances_val2017.json as JSON"):
        detection_splits(root)


def test_pascal_voc_layout(tmp_path):
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    objects = {"a": [("dog", 1, 1, 10, 20, 0), ("cat", 5, 5, 40, 30, 1)],
               "b": [("person", 11, 2, 50, 30, 0)]}
    for stem, objs in objects.items():
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}"
                      f"</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
                      f"</object>" for n, x0, y0, x1, y1, d in objs)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><size><width>64</width><height>32</height></size>{xml}</annotation>")
    (root / "ImageSets/Main/trainval.txt").write_text("a\nb\nmissing\n")
    (root / "ImageSets/Main/test.txt").write_text("b\n")
    with pytest.warns(DetectionDataWarning, match="1 of 3 images have a missing or unreadable"):
        train, test = detection_splits(root)
    assert [c["name"] for c in train.coco["categories"]][:3] == ["aeroplane", "bicycle", "bird"]
    dog, cat, person = train.coco["annotations"]
    assert dog["category_id"] == 12 and dog["bbox"] == [0.0, 0.0, 10.0, 20.0]  # xmin − 1 …
    assert cat["iscrowd"] == 1 and person["bbox"] == [10.0, 1.0, 40.0, 29.0]
    ds = DetectionDataset(train, channels=3)
    image, target = ds[0]
    assert image.shape == (3, 32, 64)
    assert target["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0]]  # the difficult cat is not trained
    assert len(test) == 1
    with pytest.raises(DatasetError, match="no instance masks"):
        detection_splits(root, masks=True)
    with pytest.raises(DatasetError, match="not a detection dataset"):
        detection_splits(tmp_path)
    assert read_voc(root, "test").coco["categories"] == train.coco["categories"]


def test_flip_moves_boxes_and_masks(images):
    coco = _coco()
    coco["annotations"][0]["segmentation"] = {"size": [20, 30], "counts": mask_utils.encode(
        np.asfortranarray(np.pad(np.ones((5, 10), np.uint8), ((3, 12), (2, 18)))))[
        "counts"].decode()}
    coco["annotations"][1]["segmentation"] = [[5, 5, 13, 5, 13, 13, 5, 13]]
    split = check_coco(coco, "ann.json", images, masks=True)
    plain = DetectionDataset(split, 1, masks=True)
    image, target = plain[0]
    assert target["masks"].shape == (1, 20, 30) and target["masks"].sum() == 50
    g = torch.Generator().manual_seed(0)
    flipped = DetectionDataset(split, 1, masks=True, flip=True, generator=g)
    for _ in range(20):  # p = 1/2 each time
        fimage, ftarget = flipped[0]
        if not torch.equal(fimage, image):
            break
    assert torch.equal(fimage, image.flip(-1))
    assert ftarget["boxes"].tolist() == [[30 - 12.0, 3.0, 30 - 2.0, 8.0]]
    assert torch.equal(ftarget["masks"], target["masks"].flip(-1))


# --- the command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny grayscale run and tiny scenes (fake garments: no download needed)."""
    from test_scenes import _fake_split  # tests/ is on the path (pytest's prepend mode)

    from mocolab.config import build_config
    from mocolab.data import scenes as fm  # load_fashion_mnist as scenes.py sees it
    from mocolab.data.scenes import SceneOptions, make_scenes
    from mocolab.train import pretrain

    out = tmp_path_factory.mktemp("det")
    cfg = build_config(data="synthetic", width=8, stem="compact", batch_size=32, bn_splits=4,
                       queue_size=96, epochs=1, max_steps=2, log_every=1, knn_k=20,
                       progress=False, threads=1, out_dir=str(out), run_name="r")
    run = Path(pretrain(cfg, final_eval=False)["run_dir"])
    real = fm.load_fashion_mnist
    fm.load_fashion_mnist = _fake_split
    try:
        make_scenes(out / "scenes", train=4, test=2, seed=0, opts=SceneOptions(size=64))
    finally:
        fm.load_fashion_mnist = real
    return run, out / "scenes"


def test_eval_detect_cli_masks(tiny, tmp_path, capsys, one_thread):
    run, scenes = tiny
    assert main(["eval", "detect", str(run), "--data", str(scenes), "--masks", "--epochs", "1",
                 "--batch-size", "2", "--examples", "2", "--rois-per-image", "32",
                 "--proposals", "100",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "box AP" in out and "mask AP" in out
    res = json.loads((run / "eval_detect.json").read_text())
    assert res["iterations"] == 2 and res["test_images"] == 2 and res["norm"] == "syncbn"
    for kind in ("bbox", "segm"):
        assert 0 <= res[kind]["AP"] <= 100 and set(res[kind]) >= {"AP", "AP50", "AP75"}
    assert (run / "detect_examples.png").stat().st_size > 1000
    # the report shows the picture, with the scores in its caption
    from mocolab.visualize.report import detection_figures

    (figure,) = detection_figures(run, tmp_path)
    assert figure[1] == tmp_path / "detect_examples.png" and figure[1].exists()
    assert f"box AP {res['bbox']['AP']:.1f}, mask AP" in figure[2] and "from this run" in figure[2]


def test_eval_detect_cli_bad_input(tiny, tmp_path, capsys):
    run, scenes = tiny
    bad = tmp_path / "bad"
    for split in ("train", "test"):
        (bad / split).mkdir(parents=True)
        (bad / split / "images").symlink_to(scenes / split / "images")
        coco = json.loads((scenes / split / "annotations.json").read_text())
        coco["annotations"][0]["category_id"] = 99
        (bad / split / "annotations.json").write_text(json.dumps(coco))
    assert main(["eval", "detect", str(run), "--data", str(bad), "--epochs", "1",
                 "--batch-size", "4", "--examples", "0", "--init", "random",
                 "--rois-per-image", "32", "--proposals", "100",
                 "--norm", "frozen", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "mocolab: warning: " in err and "category id missing from 'categories' (e.g. 99)" in err
    assert "Traceback" not in err
    coco["annotations"] = []
    (bad / "test" / "annotations.json").write_text(json.dumps(coco))
    assert main(["eval", "detect", str(run), "--data", str(bad), "--epochs", "1"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the train split's warning
    assert last.startswith("mocolab: error: ") and "test/annotations.json: no usable annotation" \
        " left" in last


def test_the_parsers_agree_with_the_modules_and_stay_light():
    """transfer_cli copies the choices (to keep torch out of `mocolab --help`): same values."""
    import subprocess
    import sys

    from mocolab import transfer_cli
    from mocolab.evaluate import detection

    assert transfer_cli.NORMS == detection.NORMS
    assert tuple(detection.SCHEDULES) == transfer_cli.SCHEDULES
    code = "import sys, mocolab.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_pycocotools_a_one_line_error(tiny, monkeypatch, capsys):
    import sys

    run, scenes = tiny
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # import fails
    assert main(["eval", "detect", str(run), "--data", str(scenes)]) == 2
    err = capsys.readouterr().err
    assert err == ("mocolab: error: mocolab eval detect (COCO AP) needs the optional package "
                   "pycocotools: pip install pycocotools\n")
