"""Predict polyp masks and MC-Dropout uncertainty with trained models.

Command line::

    python -m polydice.predict --model M --images DIR --out OUT [--mc-samples T] [--threshold 0.5|auto]

``M`` is a ``model.pt``, a run folder holding one, or a study's results folder: then the models of
one method, one per cross-validation fold, are ensembled as nnU-Net does, by averaging their
probabilities. ``DIR`` is a plain folder of images or a dataset folder in the layouts training
reads (Kvasir-SEG ``images/``, CVC-ClinicDB ``Original/``, ``PNG/Original/``, ``TIF/Original/``),
with the same readers (TIFF, PNG, JPEG) and the same resizing to the models' training size.

For every image, at the image's own size (probabilities are resized back before thresholding):

- ``OUT/masks/<name>.png``: the mask, 0/255, ``probability > threshold``;
- ``OUT/uncertainty/<name>.png``: the mutual information (thesis Eq. 8) in OpenCV's ``magma``
  colour map on the fixed scale [0, ln 2] nats (ln 2 is the largest MI a binary prediction can
  have): black is 0, light yellow is ln 2 ≈ 0.693;
- ``OUT/overlay/<name>.png``: the image, the mutual information blended in (more opaque where
  higher; the same colour map on [0, ln 2 / 4], saturating, so that a trained model's usual values
  show) and the mask's contour in green;
- with ``--save-arrays``: ``OUT/arrays/<name>_{probability,mutual_information,entropy,variance}.npy``
  (float16);
- a row of ``OUT/predictions.csv``:
  ``image,height,width,area,mean_probability,mean_mi,difficulty,threshold``.

The probability is the deterministic prediction (full eval mode, as the training code's
validation and test), averaged over the ensemble's models. Mutual information, predictive entropy
and variance come from T MC-Dropout samples per model (batch-norm frozen, only dropout on), pooled
over the models: MI is the entropy of the pooled mean minus the mean entropy of all samples.
``difficulty`` is the thesis's difficulty (Eq. 10–11, the mean MI over the lesion after removing
pixels beyond 2σ) taken over the **predicted** mask, since there is no ground truth at prediction
time; 0 when nothing is predicted.

Exit status: 0; 1 when some files were skipped (each named on its own line: unreadable, or not an
image); 2 with one ``error:`` line for a missing or empty image folder or a model that cannot be
used (missing, corrupt, another format or architecture, an ambiguous results folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .checkpoint import MODEL_FILE
from .config import run_label
from .data import CVC_LAYOUTS, IMAGE_SUFFIXES, DataError, as_rgb8, decode_image, resize_square
from .losses import foreground_probs
from .device import Hardware, resolve_device
from .model import ModelFileError, UNet, load_model_file
from .uncertainty import binary_entropy, difficulty_scores, estimate_uncertainty

MI_MAX = math.log(2.0)  # the largest mutual information of a binary prediction, in nats
OVERLAY_MI_MAX = MI_MAX / 4  # where the overlay's colours saturate
# Image folders of the training layouts (Kvasir-SEG, then CVC-ClinicDB's), tried in this order
# when DIR itself holds no image.
IMAGE_FOLDERS = tuple(dict.fromkeys(["images", *(image for image, _ in CVC_LAYOUTS)]))
CSV_COLUMNS = ("image", "height", "width", "area", "mean_probability", "mean_mi", "difficulty", "threshold")
ARRAYS = ("probability", "mutual_information", "entropy", "variance")
CONTOUR_RGB = (0, 255, 0)


class PredictError(ValueError):
    """Input that prediction cannot start from: no images, or no usable model."""


# ----------------------------------------------------------------------------- models


def find_model_files(path: str | Path) -> list[Path]:
    """The ``model.pt`` files that ``path`` names: the file, a run folder's, or one per trial.

    A Ray Tune trial keeps copies in its ``checkpoint_*/`` folders: per trial folder its own
    ``model.pt`` is taken, else the one of its last checkpoint.

    Raises:
        PredictError: nothing at ``path``, or no ``model.pt`` below it.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"{path}: no such model file or folder")
    if (path / MODEL_FILE).is_file():
        return [path / MODEL_FILE]
    by_trial: dict[Path, list[Path]] = {}
    for file in sorted(path.rglob(MODEL_FILE)):
        trial = file.parent.parent if file.parent.name.startswith("checkpoint_") else file.parent
        by_trial.setdefault(trial, []).append(file)
    if not by_trial:
        raise PredictError(f"no {MODEL_FILE} in {path} or its subfolders")
    # Sorted paths put <trial>/checkpoint_*/model.pt before <trial>/model.pt, and checkpoints in order.
    return [files[-1] for files in by_trial.values()]


@dataclass
class Ensemble:
    """The models of one method, one per fold (or a single model), used together.

    Attributes:
        models: U-Nets in eval mode, on one device.
        infos: each model file's ``config``, ``epoch``, ``val_dice``, ``threshold``.
        paths: the model files.
        label: the method's label (:func:`run_label`).
    """

    models: list[UNet]
    infos: list[dict]
    paths: list[Path]
    label: str

    @property
    def image_size(self) -> int:
        return int(self.infos[0]["config"]["image_size"])

    @property
    def threshold(self) -> float:
        """The mean of the members' validation-optimal thresholds (``--threshold auto``)."""
        return float(np.mean([info["threshold"] for info in self.infos]))

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    def describe(self) -> str:
        folds = ", ".join(str(info["config"].get("fold")) for info in self.infos)
        if len(self.models) == 1:
            return f"{self.label} (fold {folds}) from {self.paths[0]}"
        return f"ensemble of {len(self.models)} {self.label} models (folds {folds})"

    def to(self, device: torch.device | str) -> "Ensemble":
        hw = Hardware(device)
        for model in self.models:
            model.to(hw.device, memory_format=hw.memory_format)
        return self

    def probabilities(self, images: Tensor, amp: bool = True) -> Tensor:
        """Mean deterministic foreground probability of the members (full eval mode).

        Args:
            images: ``(B, S, S, 3)`` uint8 RGB at the training size.
            amp: bf16 (else fp16) autocast on CUDA, as training.

        Returns:
            ``(B, S, S)`` float32 on the CPU.
        """
        hw = Hardware(self.device, amp)
        x = hw.images(images.permute(0, 3, 1, 2))
        with torch.inference_mode(), hw.autocast():
            total = sum(foreground_probs(model(x)) for model in self.models)  # float32
        return (total / len(self.models)).cpu()

    def uncertainty(self, images: Tensor, mc_samples: int = 10, seed: int = 0, amp: bool = True) -> dict[str, Tensor]:
        """MC-Dropout maps from ``mc_samples`` samples of every member, pooled.

        Each member's mean probability p̄_m, predictive entropy H_m, mutual information I_m and
        variance V_m (:func:`~polydice.uncertainty.estimate_uncertainty`) combine exactly into the
        statistics of all M·T samples together: p̄ = mean p̄_m; the mean sample entropy is
        mean (H_m − I_m); I = H(p̄) − that; V = mean (V_m + p̄_m²) − p̄².

        Args:
            images: ``(B, S, S, 3)`` uint8 RGB.

        Returns:
            ``mutual_information``, ``entropy`` (predictive), ``variance``: ``(B, S, S)`` float32, CPU.
        """
        n = len(images)
        masks = torch.zeros(images.shape[:3], dtype=torch.uint8)  # difficulty is not needed here
        mean_p = sample_entropy = second_moment = 0.0
        for model in self.models:
            maps = estimate_uncertainty(
                model, images, masks, mc_samples=mc_samples, batch_size=n, seed=seed, amp=amp, keep_maps=n
            ).maps
            p = maps["mean_prob"].float()
            mean_p = mean_p + p
            sample_entropy = sample_entropy + (maps["predictive_entropy"] - maps["mutual_information"]).float()
            second_moment = second_moment + maps["variance"].float() + p * p
        m = len(self.models)
        mean_p, sample_entropy, second_moment = mean_p / m, sample_entropy / m, second_moment / m
        entropy = binary_entropy(mean_p)
        return {
            "mutual_information": (entropy - sample_entropy).clamp_min(0.0),
            "entropy": entropy,
            "variance": (second_moment - mean_p * mean_p).clamp_min(0.0),
        }


# Config fields in which seed replicates of one configuration may differ: the seed, and where and
# how it was trained.
REPLICATE_FIELDS = ("seed", "device", "amp", "channels_last", "compile", "num_workers", "mc_memory_gb",
                    "data_dir", "tensorboard", "log_maps", "log_every")


def load_ensemble(path: str | Path, method: str | None = None) -> Ensemble:
    """The models that ``path`` names (see :func:`find_model_files`), on the CPU.

    With models of several methods under ``path`` (a baseline grid), ``method`` picks one by its
    label (the run's ``tag``) or its method name. Several models of one fold are ensembled when
    they are seed replicates, configurations equal but for the seed (a study's ``--seeds``):
    every fold's replicates are then members, as the folds are.

    Raises:
        PredictError: no model file; several methods and no (or no matching) ``method``; two
            models of the same fold that are not seed replicates (a search's trials, or two copies
            of one run); members trained at different image sizes.
        ModelFileError: a model file that is corrupt, of another format or architecture.
    """
    loaded = []
    for file in find_model_files(path):
        model, info = load_model_file(file)
        loaded.append((model, info, file))
    labels = sorted({run_label(info["config"]) for _, info, _ in loaded})
    if method is not None:
        chosen = [m for m in loaded if run_label(m[1]["config"]) == method]
        chosen = chosen or [m for m in loaded if m[1]["config"].get("method") == method]
        if not chosen:
            raise PredictError(f"no models of method {method!r} in {path}; choices: {', '.join(labels)}")
        loaded = chosen
        labels = sorted({run_label(info["config"]) for _, info, _ in loaded})
    if len(labels) > 1:
        hint = "pass --method with one of" if method is None else f"--method {method!r} matches several:"
        raise PredictError(f"{path} holds models of several methods; {hint} {', '.join(labels)}")
    by_fold: dict = {}
    for _, info, file in loaded:
        by_fold.setdefault(info["config"].get("fold"), []).append((info, file))
    for fold, members in by_fold.items():
        seeds = [info["config"].get("seed") for info, _ in members]
        others = {json.dumps({k: v for k, v in info["config"].items() if k not in REPLICATE_FIELDS}, sort_keys=True)
                  for info, _ in members}
        if len(members) > 1 and (len(others) > 1 or len(set(seeds)) < len(seeds)):
            files = [file for _, file in members]
            raise PredictError(
                f"{path} holds {len(files)} {labels[0]} models of fold {fold} ({files[0]}, {files[1]}, ...) that are "
                "not seed replicates of one configuration; an ensemble takes one configuration per fold: pass a "
                "single run folder or the final runs' folder"
            )
    sizes = sorted({int(info["config"]["image_size"]) for _, info, _ in loaded})
    if len(sizes) > 1:
        raise PredictError(f"the models in {path} were trained at different image sizes {sizes}; ensemble them separately")
    order = sorted(loaded, key=lambda m: (str(m[1]["config"].get("fold")), str(m[2])))
    return Ensemble([m[0] for m in order], [m[1] for m in order], [m[2] for m in order], labels[0])


# ----------------------------------------------------------------------------- images


def find_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to predict in ``folder`` (or its ``images/``, ``Original/``, ... subfolder).

    Hidden files and subfolders are ignored. Files without an image suffix, and a second file with
    the stem of an earlier one (``a.jpg``, ``a.png``: both would write ``masks/a.png``), are
    returned as skipped with the reason.

    Returns:
        ``(images, skipped)``: image paths sorted by name, and ``(path, reason)`` pairs.

    Raises:
        PredictError: the folder is missing or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictError(f"image folder not found: {folder}")

    def files(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))

    def has_images(d: Path) -> bool:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in files(d))

    if not has_images(folder):
        folder = next((folder / sub for sub in IMAGE_FOLDERS if (folder / sub).is_dir() and has_images(folder / sub)), folder)
    images, skipped, stems = [], [], {}
    for path in files(folder):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((path, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})"))
        elif path.stem in stems:
            skipped.append((path, f"same name as {stems[path.stem].name}, whose outputs it would overwrite"))
        else:
            stems[path.stem] = path
            images.append(path)
    if not images:
        raise PredictError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}, also in "
                           f"{', '.join(sub + '/' for sub in IMAGE_FOLDERS)})")
    return images, skipped


def read_image(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An image as the models see it, and as it is stored.

    Returns:
        ``(input (S, S, 3), image (H, W, 3))`` uint8 RGB: the training code's decoding and resizing
        to ``size``, and the image at its own size for the overlay.

    Raises:
        DataError: the file cannot be decoded or is not 3-channel RGB.
    """
    array, (height, width) = decode_image(path, size)
    image = as_rgb8(array, path)
    model_input = resize_square(image, size)
    if image.shape[:2] != (height, width):  # a JPEG decoded reduced (draft mode): decode it whole
        image = as_rgb8(decode_image(path, max(height, width))[0], path)
    return model_input, image


def resize_map(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map ``(S, S)`` at ``(height, width)``: bilinear, area averaging when shrinking."""
    if array.shape == (height, width):
        return array
    shrink = height <= array.shape[0] and width <= array.shape[1]
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def uncertainty_colours(mi: np.ndarray) -> np.ndarray:
    """Mutual information ``(H, W)`` → ``(H, W, 3)`` uint8 RGB, ``magma`` over the fixed [0, ln 2]."""
    index = np.clip(np.rint(mi / MI_MAX * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(index, cv2.COLORMAP_MAGMA), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, mask: np.ndarray, mi: np.ndarray) -> np.ndarray:
    """The image, the mutual information blended in (more opaque where higher) and the mask's contour.

    The colours are the ``magma`` map on [0, ln 2 / 4], saturating above: a trained model's MI
    is mostly below a tenth of ln 2, which the fixed full scale of the uncertainty map shows
    nearly black.
    """
    level = np.clip(mi / OVERLAY_MI_MAX, 0.0, 1.0)
    colours = uncertainty_colours(level * MI_MAX).astype(np.float32)
    alpha = 0.85 * np.sqrt(level)[..., None]
    out = np.rint(image * (1.0 - alpha) + colours * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(mask.shape) / 200))
    cv2.drawContours(out, contours, -1, CONTOUR_RGB, thickness)
    return out


# ----------------------------------------------------------------------------- prediction


@dataclass
class PredictionReport:
    """What :func:`predict_folder` did: one CSV row per written image, and the skipped files."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def predict_folder(
    ensemble: Ensemble,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    mc_samples: int = 10,
    threshold: float | str = 0.5,
    save_arrays: bool = False,
    batch_size: int = 8,
    amp: bool = True,
    seed: int = 0,
    num_workers: int = 4,
    progress: bool = False,
) -> PredictionReport:
    """Predict every image in ``images_dir`` and write the outputs described in the module docstring.

    Args:
        ensemble: the models (:func:`load_ensemble`), on the device to run on.
        threshold: a probability in [0, 1] (mask = probability > threshold), or ``"auto"``: the
            ensemble's :attr:`~Ensemble.threshold`.
        mc_samples: T ≥ 2 MC-Dropout samples per model.
        batch_size: images per forward pass.
        num_workers: threads decoding the files of a batch.
        progress: show a progress bar.

    Returns:
        :class:`PredictionReport`; every skipped file has also been named on stderr.

    Raises:
        PredictError: no images, or a bad ``threshold``, ``mc_samples`` or ``batch_size``.
    """
    if threshold == "auto":
        threshold = ensemble.threshold
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise PredictError(f"threshold must be a probability in [0, 1] or 'auto', got {threshold!r}")
    if mc_samples < 2:
        raise PredictError(f"mc_samples must be >= 2 for a mutual information, got {mc_samples}")
    if batch_size < 1:
        raise PredictError(f"batch_size must be >= 1, got {batch_size}")
    paths, skipped = find_images(images_dir)
    report = PredictionReport(skipped=list(skipped))
    out = Path(out_dir)
    folders = ["masks", "uncertainty", "overlay"] + (["arrays"] if save_arrays else [])
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=not progress, file=sys.stderr)
    for path, reason in skipped:
        bar.write(f"skipped {path}: {reason}", file=sys.stderr)
    size = ensemble.image_size

    def read(path: Path):
        try:
            return read_image(path, size)
        except DataError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for start in range(0, len(paths), batch_size):
            batch, inputs, originals = [], [], []
            for path, result in zip(paths[start : start + batch_size], pool.map(read, paths[start : start + batch_size])):
                if isinstance(result, DataError):
                    report.skipped.append((path, str(result)))
                    bar.write(f"skipped {path}: {result}", file=sys.stderr)
                else:
                    batch.append(path)
                    inputs.append(result[0])
                    originals.append(result[1])
            if batch:
                x = torch.from_numpy(np.stack(inputs))  # B, S, S, 3
                probs = ensemble.probabilities(x, amp=amp)
                maps = ensemble.uncertainty(x, mc_samples=mc_samples, seed=seed, amp=amp)
                for i, (path, image) in enumerate(zip(batch, originals)):
                    per_image = {"probability": probs[i], **{k: v[i] for k, v in maps.items()}}
                    report.rows.append(_write_outputs(out, path, image, per_image, float(threshold), save_arrays))
            bar.update(len(paths[start : start + batch_size]))
    bar.close()

    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(report.rows)
    return report


def _write_outputs(out: Path, path: Path, image: np.ndarray, maps: dict[str, Tensor], threshold: float,
                   save_arrays: bool) -> dict:
    """Resize one image's maps to its own size, threshold, write its files; return its CSV row."""
    height, width = image.shape[:2]
    full = {key: resize_map(value.numpy().astype(np.float32), height, width) for key, value in maps.items()}
    mask = full["probability"] > threshold
    mi = full["mutual_information"]
    name = path.stem
    _write_png(out / "masks" / f"{name}.png", mask.astype(np.uint8) * np.uint8(255))
    _write_png(out / "uncertainty" / f"{name}.png", uncertainty_colours(mi))
    _write_png(out / "overlay" / f"{name}.png", overlay(image, mask, mi))
    if save_arrays:
        for key in ARRAYS:
            np.save(out / "arrays" / f"{name}_{key}.npy", full[key].astype(np.float16))
    difficulty = difficulty_scores(torch.from_numpy(mi)[None].double(), torch.from_numpy(mask.astype(np.uint8))[None])
    return {
        "image": path.name,
        "height": height,
        "width": width,
        "area": int(mask.sum()),
        "mean_probability": float(full["probability"].mean()),
        "mean_mi": float(mi.mean()),
        "difficulty": float(difficulty[0]),
        "threshold": threshold,
    }


# ----------------------------------------------------------------------------- command line


def _threshold(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability or 'auto', got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] or 'auto', got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m polydice.predict",
        description="Predict polyp masks and MC-Dropout uncertainty maps with trained polydice models.",
        epilog=(
            "Writes OUT/masks/<name>.png (0/255), OUT/uncertainty/<name>.png (mutual information in "
            "OpenCV's 'magma' colour map on the fixed scale 0 to ln 2 = 0.693 nats, the largest MI of a "
            "binary prediction: black = 0, light yellow = ln 2), OUT/overlay/<name>.png (image, "
            "mutual information in the same colours on 0 to ln 2 / 4, saturating, and the mask's contour in "
            "green), all at the image's own size, and OUT/predictions.csv "
            "(image,height,width,area,mean_probability,mean_mi,difficulty,threshold; difficulty is the "
            "thesis's trimmed mean MI taken over the predicted mask, as there is no ground truth). "
            "Exit status: 0; 1 if some files were skipped; 2 on an error."
        ),
    )
    p.add_argument("--model", required=True, metavar="M",
                   help="a model.pt, a run folder, or a study's results folder (its fold models are ensembled)")
    p.add_argument("--images", required=True, metavar="DIR",
                   help="a folder of images (TIFF, PNG, JPEG) or a Kvasir-SEG / CVC-ClinicDB dataset folder")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--method", metavar="TAG",
                   help="which method's models to use when the results folder holds several (tag or method name)")
    p.add_argument("--mc-samples", type=int, default=10, metavar="T", help="MC-Dropout samples per model (10)")
    p.add_argument("--threshold", type=_threshold, default=0.5,
                   help="probability threshold (0.5), or 'auto': the validation-optimal threshold stored in "
                        "model.pt (for an ensemble, the mean of its models' thresholds)")
    p.add_argument("--save-arrays", action="store_true",
                   help="also write OUT/arrays/<name>_{probability,mutual_information,entropy,variance}.npy (float16)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16/fp16 autocast on CUDA")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-Dropout masks (0)")
    p.add_argument("--num-workers", type=int, default=4, help="threads decoding images (4)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        ensemble = load_ensemble(args.model, args.method).to(device)
        report = predict_folder(
            ensemble, args.images, args.out, mc_samples=args.mc_samples, threshold=args.threshold,
            save_arrays=args.save_arrays, batch_size=args.batch_size, amp=args.amp, seed=args.seed,
            num_workers=args.num_workers, progress=args.progress,
        )
    except (PredictError, ModelFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threshold = ensemble.threshold if args.threshold == "auto" else args.threshold
    print(f"{ensemble.describe()}, threshold {threshold:.3g}: wrote {len(report.rows)} predictions to {args.out}")
    if report.skipped:
        print(f"{len(report.skipped)} of {len(report.rows) + len(report.skipped)} files skipped (named above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
