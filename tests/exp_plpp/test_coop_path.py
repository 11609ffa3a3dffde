"""The paper path: real CLIP weights (here a tiny random CLIP saved to disk, loaded by path like a hub
checkpoint) on the CoOp benchmark layout (a fake split_zhou_*.json tree): every stage runs and logs rows;
the image transform equals transformers' CLIPImageProcessor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.results import read_run, run_dirs
from exp_plpp.clip_hf import tiny_clip
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "exp_plpp" / "run.py"
PETS = ["abyssinian", "pug", "beagle", "sphynx"]
CALTECH = ["airplane", "camera", "chair"]


def _fake_split(root: Path, folder: str, image_dir: str, split_file: str, classes: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        colour = rng.integers(0, 255, 3)
        for i in range(8):
            rel = f"{name}_{i}.png"
            img = np.clip(colour + rng.normal(0, 20, (20 + i, 24, 3)), 0, 255).astype(np.uint8)
            (root / folder / image_dir).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / folder / image_dir / rel)
            part = "train" if i < 4 else "val" if i < 5 else "test"
            split[part].append([rel, label, name])
    (root / folder / split_file).write_text(json.dumps(split))


def _fake_rendition(root: Path, wnids: dict[str, str], seed: int) -> None:
    """ImageNet-R's layout: wnid folders of a class subset, README.txt beside them, classnames.txt copied in."""
    rng = np.random.default_rng(seed)
    image_dir = root / "imagenet-rendition" / "imagenet-r"
    for wnid in wnids:
        (image_dir / wnid).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 255, (22, 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(image_dir / wnid / f"art_{i}.jpg")
    (image_dir / "README.txt").write_text("ImageNet-R")
    (root / "imagenet-rendition" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))


@pytest.fixture(scope="module")
def coop(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coop")
    _fake_split(root / "data", "oxford_pets", "images", "split_zhou_OxfordPets.json", PETS, 0)
    _fake_split(root / "data", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", CALTECH, 1)
    _fake_rendition(root / "data", {"n02085620": "chihuahua", "n02123045": "tabby"}, 2)
    clip = tiny_clip(["a", "photo", "of", "type", "pet", *PETS, *CALTECH, "chihuahua", "tabby"], seed=0)
    clip.save_pretrained(root / "clip")
    return root / "data", root / "clip"


def test_clip_preprocess_equals_clip_image_processor():
    from transformers import CLIPImageProcessor

    from exp_plpp.run import clip_preprocess

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 30), (17, 33)]]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=mean,
                              image_std=std)
    want = proc(images=ims, return_tensors="pt")["pixel_values"]
    got = clip_preprocess(ims, 16, mean, std)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_real_clip_on_the_coop_layout_runs_every_stage(coop, tmp_path):
    data, clip = coop
    argv = [f"clip={clip}", f"coop_root={data}", "threads=1", "testbed.test_per_class=0",
            "protocol.datasets=[oxford_pets]", "protocol.transfer_source=oxford_pets",
            "protocol.xd_targets=[caltech101]", "protocol.dg_targets=[imagenet_r]", "protocol.shots=[1,2]",
            "protocol.b2n_shots=2", "protocol.seeds=[1]", "protocol.methods=[zeroshot,coop,coop_plpp]",
            "learn.epochs=2", "learn.lr=0.01"]
    env = subprocess_env(LLM4ALL_RESULTS=str(tmp_path / "results"), LLM4ALL_OUTPUTS=str(tmp_path / "outputs"))
    proc = subprocess.run([sys.executable, str(RUN), *argv], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for d in run_dirs(tmp_path / "results") for r in read_run(d)[1]]
    tables = {r["table"] for r in rows}
    assert {"plpp_testbed", "plpp_zeroshot", "plpp_b2n", "plpp_fewshot", "plpp_xd", "plpp_dg", "plpp_summary"} <= tables
    n = {r["params"]["dataset"]: r["value"] for r in rows if r["table"] == "plpp_testbed" and r["metric"] == "n_images"}
    assert n == {"oxford_pets": 32, "caltech101": 24, "imagenet_r": 6}
    dg = [r for r in rows if r["table"] == "plpp_dg"]
    assert dg and {r["params"]["target"] for r in dg} == {"imagenet_r"} and all(0 <= r["value"] <= 1 for r in dg)
    zs = {r["params"]["classes"]: r for r in rows if r["table"] == "plpp_zeroshot"
          and r["params"]["dataset"] == "oxford_pets"}
    assert zs["all"]["params"]["n_test"] == 12 and zs["base"]["params"]["chance"] == 0.5
    # no machine path in the records
    for d in run_dirs(tmp_path / "results"):
        assert str(tmp_path) not in (d / "rows.jsonl").read_text()


def test_coop_root_without_clip_is_a_config_error(tmp_path):
    env = subprocess_env(LLM4ALL_RESULTS=str(tmp_path / "r"), LLM4ALL_OUTPUTS=str(tmp_path / "o"))
    proc = subprocess.run([sys.executable, str(RUN), f"coop_root={tmp_path}"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "coop_root needs clip" in proc.stderr
