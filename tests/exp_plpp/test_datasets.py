"""exp_plpp.datasets (offline compositional testbed, CoOp split protocol) and exp_plpp.coop_layout (CoOp readers)."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import sys
from collections import Counter

import numpy as np
import pytest

from common.data import DatasetNotAvailableError, DataValidationError
from exp_plpp import coop_layout as L
from exp_plpp import datasets as D

# ---------------------------------------------------------------------------------------------- CoOp protocol


def test_few_shot_indices_follows_dassl_rule():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 5)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    for seed in range(5):
        idx = D.few_shot_indices(labels, 5, seed)
        assert len(idx) == 15
        per_class = [idx[labels[idx] == c] for c in range(3)]
        # classes in label order, each class's picks sorted
        assert np.array_equal(np.concatenate(per_class), idx)
        assert all(np.array_equal(np.sort(p), p) for p in per_class)
        assert all(len(p) == 5 for p in per_class)
        assert len(set(per_class[0])) == 5 and len(set(per_class[2])) == 5  # enough items: no replacement
        assert set(per_class[1]) <= set(np.flatnonzero(labels == 1))  # too few: with replacement, repeats forced
    assert np.array_equal(D.few_shot_indices(labels, 5, 1), D.few_shot_indices(labels, 5, 1))
    assert any(not np.array_equal(D.few_shot_indices(labels, 5, 1), D.few_shot_indices(labels, 5, s))
               for s in range(2, 6))
    assert np.array_equal(D.few_shot_indices(labels, 0, 0), np.arange(len(labels)))  # Dassl: k < 1 = everything


def test_few_shot_indices_is_uniform_without_replacement():
    # each of n items is picked with probability k / n (the law of sampling k of n without replacement)
    labels = np.zeros(10, dtype=np.int64)
    counts = np.zeros(10)
    for seed in range(2000):
        counts[D.few_shot_indices(labels, 4, seed)] += 1
    assert np.allclose(counts / 2000, 0.4, atol=0.05)


def test_base_novel():
    assert D.base_novel(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert D.base_novel(7) == ([0, 1, 2, 3], [4, 5, 6])
    assert D.base_novel(1) == ([0], [])


def test_fixed_split_disjoint_covering_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 7, 33])
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    split = D.fixed_split(labels, 0.2, 0.3, seed=0)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(labels) and set.union(*parts) == set(range(len(labels)))
    for c, n in enumerate([10, 20, 7, 33]):
        assert (labels[split["val"]] == c).sum() == round(n * 0.2)
        assert (labels[split["test"]] == c).sum() == round(n * 0.3)
    assert all(np.array_equal(split[k], D.fixed_split(labels, 0.2, 0.3, seed=0)[k]) for k in split)
    assert not np.array_equal(split["val"], D.fixed_split(labels, 0.2, 0.3, seed=1)["val"])
    with pytest.raises(ValueError):
        D.fixed_split(labels, 0.6, 0.4, seed=0)


# ---------------------------------------------------------------------------------------------- pixels


def test_colourise_exact_against_float_oracle():
    grey = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(len(D.COLOURS), axis=0)
    idx = np.arange(len(D.COLOURS))
    out = D.colourise(grey, idx)
    palette = np.array(list(D.COLOURS.values()), dtype=np.float64)
    expect = np.rint(grey[..., None] / 255.0 * palette[:, None, None, :])
    assert out.dtype == np.uint8 and np.array_equal(out, expect)
    tiny = D.colourise(np.array([[[0, 128, 255]]], np.uint8), np.array([6]))  # gray = (128, 128, 128)
    assert tiny[0, 0].tolist() == [[0, 0, 0], [64, 64, 64], [128, 128, 128]]  # 128 * 128 / 255 = 64.25


def test_to_size_pad_pool_nearest_exact():
    rng = np.random.default_rng(0)
    g28 = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = D.to_size(g28)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[:, 2:30, 2:30, c], g28) for c in range(3))
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (out[:, border] == 0).all()
    rgb64 = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    mean = rgb64.reshape(2, 32, 2, 32, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert np.array_equal(D.to_size(rgb64), np.floor(mean + 0.5))
    g8 = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    assert np.array_equal(D.to_size(g8, method="nearest")[..., 0], np.stack([np.kron(x, np.ones((4, 4))) for x in g8]))


def _bilinear_2x_oracle(x: np.ndarray) -> np.ndarray:
    # align_corners=False: output j samples input at (j + 0.5) / 2 - 0.5, clamped to the border
    n = x.shape[-1]
    src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    y = x[..., i0] * (1 - w) + x[..., i1] * w  # along width
    y = y[..., i0, :] * (1 - w)[:, None] + y[..., i1, :] * w[:, None]  # along height
    return np.rint(y)


def test_to_size_bilinear_matches_oracle():
    g16 = np.random.default_rng(2).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    out = D.to_size(g16)  # auto: bilinear for an integer upsampling factor
    assert np.array_equal(out[..., 0], _bilinear_2x_oracle(g16.astype(np.float64)))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_corrupt():
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = D.corrupt(imgs, "noise", 0.1, seed=3), D.corrupt(imgs, "noise", 0.1, seed=3)
    assert a.dtype == np.uint8 and a.shape == imgs.shape and np.array_equal(a, b)
    assert not np.array_equal(a, D.corrupt(imgs, "noise", 0.1, seed=4))
    assert np.array_equal(D.corrupt(imgs, "contrast", 0.0, 0), imgs)
    flat = np.full((1, 32, 32, 3), 100, np.uint8)
    assert np.array_equal(D.corrupt(flat, "blur", 1.5, 0), flat)  # blur keeps a constant image
    assert D.corrupt(imgs, "blur", 1.0, 0).astype(float).std() < imgs.astype(float).std()
    with pytest.raises(ValueError):
        D.corrupt(imgs, "fog", 1.0, 0)


# ---------------------------------------------------------------------------------------------- compositional sets


@pytest.mark.parametrize("n_attr,n_obj", [(2, 2), (2, 3), (3, 3), (4, 10), (8, 3), (5, 7)])
def test_checkerboard_every_word_seen_and_held_out(n_attr, n_obj):
    seen = D.checkerboard(n_attr, n_obj).reshape(n_attr, n_obj)
    assert seen.any(axis=1).all() and (~seen).any(axis=1).all()  # every attribute both ways
    assert seen.any(axis=0).all() and (~seen).any(axis=0).all()  # every object both ways
    assert seen.sum() == math.ceil(n_attr * n_obj / 2)  # = CoOp's base count


def test_checkerboard_literal():
    assert D.checkerboard(2, 3).tolist() == [True, False, True, False, True, False]


def _tiny_grey(n=300, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # no zero pixels: the colour shows everywhere
    return images, rng.integers(0, 3, n)


def test_compositional_set_class_order_and_labels():
    images, obj = _tiny_grey()
    s = D.compositional_set("toy", images, obj, ["a", "b", "c"], ["red", "green"], rng_seed=0)
    # grid (0,0) (0,2) (1,1) are seen: they come first, then the held-out ones
    assert s.classnames == ["red a", "red c", "green b", "red b", "green a", "green c"]
    assert s.seen.tolist() == [True, True, True, False, False, False]
    base, novel = D.base_novel(len(s.classnames))
    assert s.seen[base].all() and not s.seen[novel].any()
    assert s.images.shape == (300, 32, 32, 3) and s.labels.dtype == np.int64
    # independent check of each label: the colour read off the pixels, the object from the raw label
    colour = np.where(s.images[:, 16, 16, 0] > 0, "red", "green")
    assert ((s.images[:, 16, 16, 0] > 0) != (s.images[:, 16, 16, 1] > 0)).all()
    assert [s.classnames[y] for y in s.labels] == [f"{c} {'abc'[o]}" for c, o in zip(colour, obj)]
    assert set(s.labels) == set(range(6))  # uniform colours: every combination occurs
    again = D.compositional_set("toy", images, obj, ["a", "b", "c"], ["red", "green"], rng_seed=0)
    assert np.array_equal(again.images, s.images)
    other = D.compositional_set("toy", images, obj, ["a", "b", "c"], ["red", "green"], rng_seed=1)
    assert not np.array_equal(other.labels, s.labels)


def test_compositional_set_only_seen():
    images, obj = _tiny_grey()
    s = D.compositional_set("toy", images, obj, ["a", "b", "c"], ["red", "green"], rng_seed=0, only_seen=True)
    assert len(s) == 300 and s.classnames == ["red a", "red c", "green b"] and s.seen.all()
    assert [s.classnames[y].split()[1] for y in s.labels] == ["abc"[o] for o in obj]


def test_imageset_relabel_and_subset():
    images, obj = _tiny_grey(60)
    s = D.compositional_set("toy", images, obj, ["a", "b", "c"], ["red", "green"], rng_seed=0)
    r = s.relabel([4, 0])
    assert r.classnames == ["green a", "red a"] and r.seen.tolist() == [False, True]
    assert len(r) == int(((s.labels == 4) | (s.labels == 0)).sum())
    assert np.array_equal(r.labels, np.where(s.labels[r.source_idx] == 4, 0, 1))
    assert np.array_equal(r.images, s.images[r.source_idx])
    sub = s.subset(np.arange(5))
    assert len(sub) == 5 and sub.classnames == s.classnames
    with pytest.raises(ValueError):
        s.relabel([0, 0])


def test_pretrain_pairs():
    images, obj = _tiny_grey(30)
    s1 = D.compositional_set("x", images, obj, ["a", "b", "c"], ["red", "green"], 0, only_seen=True)
    s2 = D.compositional_set("y", images, obj, ["d", "e", "f"], ["red", "green"], 0, only_seen=True)
    p = D.pretrain_pairs({"x": s1, "y": s2}, ["a photo of a {}.", "{}"])
    assert len(p.images) == 60 and len(p.classnames) == 6 and p.set_names == ["x", "y"]
    assert p.captions[p.labels[0]] == [f"a photo of a {s1.classnames[s1.labels[0]]}.", s1.classnames[s1.labels[0]]]
    assert [p.classnames[y] for y in p.labels[30:]] == [s2.classnames[y] for y in s2.labels]


# ---------------------------------------------------------------------------------------------- raw readers


def test_missing_files_raise_dataset_not_available(tmp_path, monkeypatch):
    (tmp_path / "images" / "mnist").mkdir(parents=True)
    with pytest.raises(DatasetNotAvailableError, match="t10k-images-idx3-ubyte.gz"):
        D.load_raw("mnist", tmp_path)
    with pytest.raises(DatasetNotAvailableError, match="zip.test.gz"):
        D.load_raw("usps", tmp_path)
    monkeypatch.setattr(D, "DEBIAN_FASHION", tmp_path / "nowhere")
    with pytest.raises(DatasetNotAvailableError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_raw("fashion", tmp_path, part="train")
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes `import easy_vqa` fail
    with pytest.raises(DatasetNotAvailableError, match="pip install easy-vqa"):
        D.load_raw("shapes", tmp_path)
    with pytest.raises(DatasetNotAvailableError, match="only the test images"):
        D.load_raw("mnist", tmp_path, part="train")


def test_truncated_idx_is_a_validation_error(tmp_path):
    folder = tmp_path / "images" / "mnist"
    folder.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(100)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(10)))
    with pytest.raises(DataValidationError, match="truncated"):
        D.load_raw("mnist", tmp_path)


def test_build_testbed_skips_missing_sources(tmp_path):
    tb = D.build_testbed(tmp_path, seed=0, pretrain=("digits",), downstream=("digits", "sklearn_digits"),
                         skip_missing=True)
    assert tb["pretrain"] == {} and list(tb["downstream"]) == ["sklearn_digits"]
    assert len(tb["downstream"]["sklearn_digits"].classnames) == 40
    with pytest.raises(DatasetNotAvailableError):
        D.build_testbed(tmp_path, pretrain=("digits",), downstream=())


def test_raw_digit_readers(data_root):
    x, y, names = D.load_raw("mnist", data_root)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64 and names == D.DIGIT_NAMES
    x, y, _ = D.load_raw("usps", data_root)
    assert x.shape == (2007, 16, 16) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]  # usps/SOURCE.md
    assert x.mean() < 128  # background (-1) maps to black, ink to bright
    x, y, _ = D.load_raw("sklearn_digits", None)
    assert x.shape == (1797, 8, 8) and x.max() == 255 and len(np.unique(y)) == 10


def test_fashion_reader(data_root):
    try:
        x, y, names = D.load_raw("fashion", data_root, part="test")
    except DatasetNotAvailableError:
        pytest.skip("Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10 and names[-1] == "ankle boot"


def test_shapes_reader_labels_match_pixels():
    try:
        x, y, names = D.load_raw("shapes", None, part="test")
    except DatasetNotAvailableError:
        pytest.skip("easy-VQA not installed (pip install easy-vqa)")
    assert x.shape[1:] == (64, 64, 3) and x.dtype == np.uint8 and len(names) == 24 and len(x) > 800
    # independent check of the question-derived colour: its exact RGB is drawn in the image
    for img, label in zip(x[:100], y[:100]):
        rgb = D.COLOURS[names[label].split()[0]]
        assert (img.reshape(-1, 3) == rgb).all(axis=1).any()


# ---------------------------------------------------------------------------------------------- the testbed


@pytest.fixture(scope="module")
def testbed():
    try:
        from common.config import default_data_dir

        return D.build_testbed(default_data_dir(), D.DEFAULT_COLOURS, seed=0)
    except DatasetNotAvailableError as exc:
        pytest.skip(f"testbed source missing ({exc}); needs ../shared/data, dataset-fashion-mnist (apt) and "
                    "easy-vqa (pip)")


def _mask_hashes(images: np.ndarray) -> set[str]:
    # ink mask = grey > 0 whatever the colour (each default colour has a 255 channel), so it hashes the source digit
    return {hashlib.sha1(m.tobytes()).hexdigest() for m in images.any(axis=-1)}


def test_testbed_pretrain_downstream_disjoint(testbed):
    pre, down = testbed["pretrain"], testbed["downstream"]
    # digits: both from the MNIST test file, rows [0, 5000) vs [5000, 10000); fashion and shapes: train vs test part
    assert pre["digits"].source_idx.max() < 5000 <= down["digits"].source_idx.min()
    for name in ("digits", "fashion", "shapes"):
        assert pre[name].meta["source"] == down[name].meta["source"]
    assert [pre[n].meta["part"] for n in ("fashion", "shapes")] == ["train", "train"]
    assert [down[n].meta["part"] for n in ("fashion", "shapes")] == ["test", "test"]
    pre_h, down_h = _mask_hashes(pre["digits"].images), _mask_hashes(down["digits"].images)
    assert not pre_h & down_h
    # and straight from the raw file, independent of source_idx: the ink masks are those of rows [0, 5000) / the rest
    raw, _, _ = D.load_raw("mnist", None)
    raw_masks = np.pad(raw > 0, ((0, 0), (2, 2), (2, 2)))[..., None]
    assert pre_h == _mask_hashes(raw_masks[:5000]) and down_h == _mask_hashes(raw_masks[5000:])


def test_testbed_classes(testbed):
    pre, down = testbed["pretrain"], testbed["downstream"]
    assert {k: len(v.classnames) for k, v in down.items()} == {
        "digits": 40, "fashion": 40, "shapes": 24, "usps": 40, "sklearn_digits": 40, "digits_noise": 40,
        "digits_blur": 40}
    assert all(s.seen.all() for s in pre.values())
    for name in ("digits", "fashion", "shapes"):
        base, novel = D.base_novel(len(down[name].classnames))
        assert down[name].classnames[:len(base)] == pre[name].classnames  # base = the pretraining classes
        assert set(down[name].labels) == set(range(len(down[name].classnames)))
    for dg in ("usps", "sklearn_digits", "digits_noise", "digits_blur"):
        assert down[dg].classnames == down["digits"].classnames
    assert np.array_equal(down["digits_noise"].labels, down["digits"].labels)
    assert not np.array_equal(down["digits_noise"].images, down["digits"].images)
    assert len(pre["digits"]) == 5000 and len(pre["fashion"]) == 60000 and len(down["fashion"]) == 10000
    assert all(s.images.shape[1:] == (32, 32, 3) for g in testbed.values() for s in g.values())
    # colours of every object in pretraining: exactly its seen colours
    words = Counter(c.split()[0] for c in pre["digits"].classnames)
    assert words == {"red": 5, "green": 5, "blue": 5, "yellow": 5}


# ---------------------------------------------------------------------------------------------- CoOp layout


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


def test_coop_registry():
    assert len(L.COOP_DATASETS) == 11
    assert L.COOP_DATASETS["eurosat"].template == "a centered satellite photo of {}."
    assert L.COOP_DATASETS["dtd"].split_file == "split_zhou_DescribableTextures.json"
    assert all("{}" in i.template for i in L.COOP_DATASETS.values())
    assert sum(i.split_file is not None for i in L.COOP_DATASETS.values()) == 9
    # the DG protocol's test-only targets: CoOp's folder names (DATASETS.md), ImageNet's hand prompt
    assert {k: i.dataset_dir for k, i in L.COOP_DG_DATASETS.items()} == {
        "imagenetv2": "imagenetv2", "imagenet_sketch": "imagenet-sketch", "imagenet_a": "imagenet-adversarial",
        "imagenet_r": "imagenet-rendition"}
    assert {i.template for i in L.COOP_DG_DATASETS.values()} == {L.COOP_DATASETS["imagenet"].template}


def test_coop_read_split_json(tmp_path):
    folder = tmp_path / "oxford_pets"
    split = {"train": [["abyssinian_1.jpg", 0, "abyssinian"], ["pug_1.jpg", 1, "pug"]],
             "val": [["pug_2.jpg", 1, "pug"]], "test": [["abyssinian_2.jpg", 0, "abyssinian"]]}
    for part in split.values():
        for rel, _, _ in part:
            _png(folder / "images" / rel)
    with pytest.raises(DatasetNotAvailableError, match="split_zhou_OxfordPets.json"):
        L.read_split("oxford_pets", tmp_path)
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    out = L.read_split("oxford_pets", tmp_path, check_images=True)
    assert out["train"][1] == (folder / "images" / "pug_1.jpg", 1, "pug")
    assert [len(out[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    assert L.classnames(out["train"]) == ["abyssinian", "pug"]
    (folder / "images" / "pug_2.jpg").unlink()
    with pytest.raises(DatasetNotAvailableError, match="pug_2.jpg"):
        L.read_split("oxford_pets", tmp_path, check_images=True)
    split["val"] = [["pug_2.jpg", "one", "pug"]]
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    with pytest.raises(DataValidationError, match=r"val\[0\]"):
        L.read_split("oxford_pets", tmp_path)
    (folder / "split_zhou_OxfordPets.json").write_text("{not json")
    with pytest.raises(DataValidationError, match="split_zhou_OxfordPets.json"):
        L.read_split("oxford_pets", tmp_path)


def test_coop_stanford_cars_paths_relative_to_dataset_dir(tmp_path):
    folder = tmp_path / "stanford_cars"
    _png(folder / "cars_train" / "00001.jpg")
    split = {"train": [["cars_train/00001.jpg", 0, "2012 Tesla Model S"]], "val": [], "test": []}
    (folder / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    assert L.read_split("stanford_cars", tmp_path, check_images=True)["train"][0][0] == folder / "cars_train/00001.jpg"


def test_coop_aircraft_and_imagenet(tmp_path):
    air = tmp_path / "fgvc_aircraft"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\nBoeing 717\n")
    (air / "images_variant_train.txt").write_text("1025794 707-320\n0001 Boeing 717\n")
    (air / "images_variant_val.txt").write_text("0002 A300B4\n")
    with pytest.raises(DatasetNotAvailableError, match="images_variant_test.txt"):
        L.read_split("fgvc_aircraft", tmp_path)
    (air / "images_variant_test.txt").write_text("0003 A300B4\n")
    out = L.read_split("fgvc_aircraft", tmp_path)
    assert out["train"] == [(air / "images" / "1025794.jpg", 0, "707-320"), (air / "images" / "0001.jpg", 2,
                                                                              "Boeing 717")]
    (air / "images_variant_test.txt").write_text("0003 A380\n")
    with pytest.raises(DataValidationError, match="A380"):
        L.read_split("fgvc_aircraft", tmp_path)

    inet = tmp_path / "imagenet"
    for part in ("train", "val"):
        for wnid in ("n02", "n01"):
            _png(inet / "images" / part / wnid / f"{part}_{wnid}.JPEG")
    (inet / "classnames.txt").write_text("n01 tench\nn02 goldfish fish\n")
    out = L.read_split("imagenet", tmp_path)
    assert [(lab, name) for _, lab, name in out["train"]] == [(0, "tench"), (1, "goldfish fish")]
    assert out["test"] == out["val"]
    with pytest.raises(DatasetNotAvailableError, match="caltech-101"):
        L.read_split("caltech101", tmp_path)


IMAGENET_NAMES = "n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n"


def test_coop_dg_imagenetv2_labels_are_folder_numbers(tmp_path):
    v2 = tmp_path / "imagenetv2"
    img = v2 / "imagenetv2-matched-frequency-format-val"
    for label in (0, 1, 2):
        for i in range(2):
            _png(img / str(label) / f"{i}_{label}.jpeg")
    _png(img / "1" / ".hidden.jpeg")
    with pytest.raises(DatasetNotAvailableError, match="classnames.txt"):
        L.read_split("imagenetv2", tmp_path)
    (v2 / "classnames.txt").write_text(IMAGENET_NAMES)
    out = L.read_split("imagenetv2", tmp_path, check_images=True)
    assert out["train"] == [] and out["val"] == []
    assert [(p.parent.name, lab, name) for p, lab, name in out["test"]] == [
        ("0", 0, "tench"), ("0", 0, "tench"), ("1", 1, "goldfish"), ("1", 1, "goldfish"),
        ("2", 2, "great white shark"), ("2", 2, "great white shark")]
    assert L.classnames(out["test"]) == ["tench", "goldfish", "great white shark"]
    (v2 / "classnames.txt").write_text(IMAGENET_NAMES + "n01491361 tiger shark\n")   # a 4th class, no folder "3"
    with pytest.raises(DatasetNotAvailableError, match="format-val/3"):
        L.read_split("imagenetv2", tmp_path)


@pytest.mark.parametrize("dataset, folder, image_dir", [("imagenet_sketch", "imagenet-sketch", "images"),
                                                        ("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                                                        ("imagenet_r", "imagenet-rendition", "imagenet-r")])
def test_coop_dg_wnid_folders_of_a_class_subset(tmp_path, dataset, folder, image_dir):
    root = tmp_path / folder
    for wnid in ("n01484850", "n01440764"):           # -A / -R: a subset of ImageNet's classes, labels 0..n-1
        _png(root / image_dir / wnid / f"{wnid}_0.jpg")
    (root / image_dir / "README.txt").write_text("not a class")
    (root / image_dir / ".DS_Store").mkdir()
    (root / "classnames.txt").write_text(IMAGENET_NAMES)
    out = L.read_split(dataset, tmp_path, check_images=True)
    assert out["train"] == [] and out["val"] == []
    assert [(lab, name) for _, lab, name in out["test"]] == [(0, "tench"), (1, "great white shark")]
    _png(root / image_dir / "n09999999" / "x.jpg")
    with pytest.raises(DataValidationError, match="n09999999"):
        L.read_split(dataset, tmp_path)
    (root / "classnames.txt").write_text("n01440764\n")
    with pytest.raises(DataValidationError, match="classnames.txt:1"):
        L.read_split(dataset, tmp_path)
