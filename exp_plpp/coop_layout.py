"""Readers for the CoOp benchmark layout (the 11 datasets of CoOp's DATASETS.md) under a user-given data root.

Not needed offline: the real images are not available here. The layout follows KaiyangZhou/CoOp ``datasets/*.py``:
nine datasets ship a fixed split ``<root>/<dataset_dir>/split_zhou_<Name>.json`` holding
``{"train": [[path, label, classname], ...], "val": [...], "test": [...]}`` with paths relative to the image
folder; FGVC-Aircraft reads ``variants.txt`` + ``images_variant_{train,val,test}.txt`` (label = line number in
variants.txt); ImageNet reads ``classnames.txt`` ("<wnid> <name>") and the folders ``images/train``,
``images/val`` (label = rank of the folder name, val doubling as the test set as in CoOp). The four test-only
targets of CoOp's domain-generalisation protocol (ImageNet -> ImageNet-V2 / -Sketch / -A / -R, ``COOP_DG_DATASETS``)
read ``classnames.txt`` copied into their own folder (DATASETS.md) and give only a test split: ImageNet-V2's
folders are the label numbers 0..999 (name = that line of classnames.txt); Sketch / -A / -R's are wnids, label =
rank of the sorted folder name (-A and -R hold 200 of the 1000 classes, so their labels are 0..199; ``README.txt``
of -A / -R is not a class).

    split = read_split("oxford_pets", Path("~/data").expanduser())
    path, label, classname = split["train"][0]
    template = COOP_DATASETS["oxford_pets"].template          # "a photo of a {}, a type of pet."
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.data import DatasetNotAvailableError, DataValidationError

Item = tuple[Path, int, str]  # (image path, label, classname)
SPLITS = ("train", "val", "test")
HOW = "see CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp) for the download and the split_zhou_*.json files"


@dataclass(frozen=True)
class CoopDatasetInfo:
    name: str  # CoOp's class name
    dataset_dir: str  # folder under the data root
    image_dir: str  # folder under dataset_dir that split paths are relative to ("" = dataset_dir itself)
    split_file: str | None  # split_zhou_*.json, None for the two datasets with their own format
    template: str  # the hand prompt of CoOp's zero-shot CLIP / KgCoOp (CUSTOM_TEMPLATES)
    layout: str = "split_json"  # "split_json" | "aircraft" | "imagenet" | "imagenetv2" | "imagenet_folders"


COOP_DATASETS: dict[str, CoopDatasetInfo] = {
    "imagenet": CoopDatasetInfo("ImageNet", "imagenet", "images", None, "a photo of a {}.", "imagenet"),
    "caltech101": CoopDatasetInfo("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                                  "a photo of a {}."),
    "oxford_pets": CoopDatasetInfo("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                                   "a photo of a {}, a type of pet."),
    # Stanford Cars' split paths ("cars_train/00001.jpg") are relative to the dataset folder itself
    "stanford_cars": CoopDatasetInfo("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json",
                                     "a photo of a {}."),
    "oxford_flowers": CoopDatasetInfo("OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                                      "a photo of a {}, a type of flower."),
    "food101": CoopDatasetInfo("Food101", "food-101", "images", "split_zhou_Food101.json",
                               "a photo of {}, a type of food."),
    "fgvc_aircraft": CoopDatasetInfo("FGVCAircraft", "fgvc_aircraft", "images", None,
                                     "a photo of a {}, a type of aircraft.", "aircraft"),
    "sun397": CoopDatasetInfo("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "dtd": CoopDatasetInfo("DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
                           "{} texture."),
    "eurosat": CoopDatasetInfo("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json",
                               "a centered satellite photo of {}."),
    "ucf101": CoopDatasetInfo("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                              "a photo of a person doing {}."),
}


# test-only targets of the domain-generalisation protocol (CoOp datasets/imagenet{v2,_sketch,_a,_r}.py); CoOp's
# CUSTOM_TEMPLATES give them ImageNet's hand prompt
COOP_DG_DATASETS: dict[str, CoopDatasetInfo] = {
    "imagenetv2": CoopDatasetInfo("ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", None,
                                  "a photo of a {}.", "imagenetv2"),
    "imagenet_sketch": CoopDatasetInfo("ImageNetSketch", "imagenet-sketch", "images", None, "a photo of a {}.",
                                       "imagenet_folders"),
    "imagenet_a": CoopDatasetInfo("ImageNetA", "imagenet-adversarial", "imagenet-a", None, "a photo of a {}.",
                                  "imagenet_folders"),
    "imagenet_r": CoopDatasetInfo("ImageNetR", "imagenet-rendition", "imagenet-r", None, "a photo of a {}.",
                                  "imagenet_folders"),
}
ALL_DATASETS: dict[str, CoopDatasetInfo] = {**COOP_DATASETS, **COOP_DG_DATASETS}
NOT_A_CLASS = ("README.txt",)  # shipped inside ImageNet-A / -R's image folders


def _info(dataset: str) -> CoopDatasetInfo:
    if dataset not in ALL_DATASETS:
        raise ValueError(f"unknown CoOp dataset '{dataset}'; known: {', '.join(ALL_DATASETS)}")
    return ALL_DATASETS[dataset]


def _need_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DatasetNotAvailableError(f"{dataset}: missing file {path}; {HOW}")
    return path


def _need_dir(path: Path, dataset: str) -> Path:
    if not path.is_dir():
        raise DatasetNotAvailableError(f"{dataset}: missing image folder {path}; {HOW}")
    return path


def _read_split_json(path: Path, image_dir: Path) -> dict[str, list[Item]]:
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{path}: not a JSON split file ({exc})") from None
    if not isinstance(split, dict) or any(k not in split or not isinstance(split[k], list) for k in SPLITS):
        raise DataValidationError(f"{path}: expected an object with lists 'train', 'val' and 'test'")
    out: dict[str, list[Item]] = {}
    for part in SPLITS:
        items = []
        for n, entry in enumerate(split[part]):
            ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[2], str)
            try:
                label = int(entry[1]) if ok else -1
            except (TypeError, ValueError):
                label = -1
            if not ok or label < 0:
                raise DataValidationError(f"{path}: {part}[{n}] = {entry!r} is not [relative_path, label, classname]")
            items.append((image_dir / entry[0], label, entry[2]))
        out[part] = items
    return out


def _read_aircraft(folder: Path, image_dir: Path, dataset: str) -> dict[str, list[Item]]:
    variants = [line.strip() for line in _need_file(folder / "variants.txt", dataset).read_text().splitlines()]
    variants = [v for v in variants if v]
    label_of = {v: i for i, v in enumerate(variants)}
    out: dict[str, list[Item]] = {}
    for part in SPLITS:
        path = _need_file(folder / f"images_variant_{part}.txt", dataset)
        items = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")  # "<image id> <variant name with spaces>"
            if variant not in label_of:
                raise DataValidationError(f"{path}:{lineno}: variant '{variant}' is not in variants.txt")
            items.append((image_dir / f"{image_id}.jpg", label_of[variant], variant))
        out[part] = items
    return out


def _read_classnames(folder: Path, dataset: str) -> tuple[Path, dict[str, str]]:
    """``classnames.txt``: "<wnid> <class name with spaces>" per line, in ImageNet's label order."""
    names_file = _need_file(folder / "classnames.txt", dataset)
    names: dict[str, str] = {}
    for lineno, line in enumerate(names_file.read_text().splitlines(), 1):
        wnid, _, name = line.strip().partition(" ")
        if wnid and not name.strip():
            raise DataValidationError(f"{names_file}:{lineno}: '{line.strip()}' has no class name after the wnid")
        if wnid:
            names[wnid] = name.strip()
    return names_file, names


def _files(class_dir: Path) -> list[Path]:
    return sorted(f for f in class_dir.iterdir() if not f.name.startswith("."))  # CoOp: listdir_nohidden


def _read_wnid_folders(split_dir: Path, names: dict[str, str], names_file: Path) -> list[Item]:
    folders = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_A_CLASS)
    items = []
    for label, wnid in enumerate(folders):  # CoOp: label = rank of the sorted folder name
        if wnid not in names:
            raise DataValidationError(f"{names_file}: no class name for folder '{wnid}' of {split_dir}")
        items += [(f, label, names[wnid]) for f in _files(split_dir / wnid)]
    return items


def _read_imagenet(folder: Path, image_dir: Path, dataset: str) -> dict[str, list[Item]]:
    names_file, names = _read_classnames(folder, dataset)
    out = {part: _read_wnid_folders(_need_dir(image_dir / part, dataset), names, names_file)
           for part in ("train", "val")}
    out["test"] = out["val"]  # CoOp evaluates ImageNet on its val set
    return out


def _read_imagenetv2(folder: Path, image_dir: Path, dataset: str) -> dict[str, list[Item]]:
    _, names = _read_classnames(folder, dataset)
    items = []
    for label, name in enumerate(names.values()):  # folder "<label>" holds the images of classnames.txt's line
        items += [(f, label, name) for f in _files(_need_dir(image_dir / str(label), dataset))]
    return {"train": [], "val": [], "test": items}


def _read_imagenet_folders(folder: Path, image_dir: Path, dataset: str) -> dict[str, list[Item]]:
    names_file, names = _read_classnames(folder, dataset)
    return {"train": [], "val": [], "test": _read_wnid_folders(image_dir, names, names_file)}


def read_split(dataset: str, root: Path, check_images: bool = False) -> dict[str, list[Item]]:
    """{"train", "val", "test"} -> [(image path, label, classname)] for one of ALL_DATASETS under ``root`` (the
    test-only DG targets have empty train and val lists).

    Missing files raise DatasetNotAvailableError naming the file; malformed entries DataValidationError naming the
    file and entry. ``check_images`` also checks that every image file exists (slow on the big sets).
    """
    info = _info(dataset)
    folder = Path(root).expanduser() / info.dataset_dir
    image_dir = _need_dir(folder / info.image_dir if info.image_dir else folder, dataset)
    if info.layout == "aircraft":
        split = _read_aircraft(folder, image_dir, dataset)
    elif info.layout == "imagenet":
        split = _read_imagenet(folder, image_dir, dataset)
    elif info.layout == "imagenetv2":
        split = _read_imagenetv2(folder, image_dir, dataset)
    elif info.layout == "imagenet_folders":
        split = _read_imagenet_folders(folder, image_dir, dataset)
    else:
        split = _read_split_json(_need_file(folder / info.split_file, dataset), image_dir)
    if check_images:
        for part, items in split.items():
            missing = [p for p, _, _ in items if not p.is_file()]
            if missing:
                raise DatasetNotAvailableError(f"{dataset} {part}: {len(missing)} image file(s) missing, e.g. "
                                               f"{missing[0]}; {HOW}")
    return split


def classnames(items: list[Item]) -> list[str]:
    """Class names indexed by label (labels must be 0..n-1, each with one name)."""
    by_label: dict[int, str] = {}
    for path, label, name in items:
        if by_label.setdefault(label, name) != name:
            raise DataValidationError(f"label {label} has two class names: '{by_label[label]}' and '{name}' ({path})")
    if sorted(by_label) != list(range(len(by_label))):
        raise DataValidationError(f"labels are not 0..{len(by_label) - 1}: {sorted(by_label)[:10]}...")
    return [by_label[i] for i in range(len(by_label))]
