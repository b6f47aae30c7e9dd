"""Neural style transfer (Gatys et al. 2016): a photograph repainted in the style of another image.

    python -m experiments.style_transfer --workdir runs/style                       # random VGG-19
    python -m experiments.style_transfer --workdir runs/style --config.weights=vgg19.npz
    python -m experiments.style_transfer --config experiments/configs/style_transfer.py:tiny

The pixels are optimized with L-BFGS and with Adam (`config.optimizers`); for each the run
writes `stylized_<optimizer>.png` and `loss_<optimizer>.png`, plus `panel.png` (content, style,
results), `results.json` and `results.md`. Without ImageNet-pretrained VGG weights (none can be
downloaded here) the output says so: the losses still decrease, but the picture only looks like
the paper's with pretrained features. To use them, on a machine with torch:

    import numpy, torchvision
    sd = torchvision.models.vgg19(weights="IMAGENET1K_V1").state_dict()
    numpy.savez("vgg19.npz", **{k: v.numpy() for k, v in sd.items()})

Recorded run (`python -m experiments.style_transfer --workdir runs/style_transfer`, the default
config: chelsea in the style of hubble_deep_field, 192x289 pixels, random VGG-19 with average
pooling, content relu4_2, style relu1_1 ... relu5_1, alpha 0.5, init from the content image, 100
steps each; 2026-12-06, CPU, 2 cores shared with other jobs; experiments/results/style_transfer):

| optimizer | content loss (start -> end) | style loss (start -> end) | total (start -> end) | seconds |
|---|---|---|---|---|
| lbfgs | 0 -> 0.0003834 | 0.009133 -> 0.0008422 | 0.004567 -> 0.0008045 | 485.0 |
| adam | 0 -> 0.0009936 | 0.009133 -> 0.0008304 | 0.004567 -> 0.001409 | 81.2 |

The picture keeps the cat and takes on the random features' colour noise, not the galaxy image's
look: that needs pretrained weights. `--config.content_style_ratio=1e-3` uses the paper's
alpha/beta instead of `alpha`; `--config.rescale_weights=True` the paper's normalization of the
VGG weights.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cnn.tasks import style_transfer as st  # noqa: E402


def load_image(name_or_path: str, size: int) -> np.ndarray:
    """A bundled example image by name (`st.EXAMPLE_IMAGES`) or an RGB image file, resized."""
    if name_or_path in st.EXAMPLE_IMAGES:
        return st.example_image(name_or_path, size)
    path = pathlib.Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"image {name_or_path!r} is neither a bundled example ({', '.join(st.EXAMPLE_IMAGES)}) nor a file"
        )
    import skimage.io

    image = np.asarray(skimage.io.imread(path))
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3].astype(np.float32)
    if image.max() > 1.0:
        image /= 255.0
    return st.resize_image(image, size)


def main(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, command: str = "") -> dict[str, Any]:
    """Runs style transfer for every optimizer of `config`; returns the results (also written)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    extractor = st.vgg_extractor(
        None if config.weights == "random" else config.weights,
        depth=int(config.depth), batch_norm=bool(config.batch_norm), pooling=config.pooling, seed=int(config.seed),
    )
    if extractor.warning:
        print("\n" + "!" * 100 + "\n" + extractor.warning + "\n" + "!" * 100 + "\n", flush=True)
    content = load_image(config.content_image, int(config.image_size))
    style = load_image(config.style_image, int(config.image_size))
    if config.get("rescale_weights", False):
        size = min(content.shape[:2])
        image_set = np.stack([st.resize_image(st.example_image(name, size), (size, size)) for name in st.EXAMPLE_IMAGES])
        extractor = st.rescale_to_unit_mean_activation(extractor, image_set)
    ratio = config.get("content_style_ratio", None)
    objective = st.StyleObjective.create(
        extractor, content, style, content_layer=config.content_layer, style_layers=tuple(config.style_layers),
        alpha=None if ratio is not None else float(config.alpha),
        content_style_ratio=None if ratio is None else float(ratio), tv_weight=float(config.tv_weight),
    )
    alpha = float(objective.alpha)
    initial = st.initial_image(content, style, config.init, seed=int(config.seed))
    st.save_image(content, workdir / "content.png")
    st.save_image(style, workdir / "style.png")
    runs: dict[str, dict[str, Any]] = {}
    images = {}
    for optimizer in config.optimizers:
        started = time.perf_counter()
        result = st.stylize(
            objective, initial, optimizer=optimizer, steps=int(config.steps),
            learning_rate=float(config.learning_rate), progress=bool(config.progress),
        )
        seconds = time.perf_counter() - started
        images[optimizer] = result.image
        st.save_image(result.image, workdir / f"stylized_{optimizer}.png")
        st.plot_losses(
            result.history, workdir / f"loss_{optimizer}.png", alpha=alpha,
            title=f"{optimizer}, {extractor.source}" + ("" if extractor.pretrained else " (not pretrained)"),
        )
        runs[optimizer] = {
            "seconds": seconds,
            "initial": {k: float(v[0]) for k, v in result.history.items()},
            "final": {k: float(v[-1]) for k, v in result.history.items()},
            "history": {k: [float(x) for x in v] for k, v in result.history.items()},
        }
    plot_panel(content, style, images, workdir / "panel.png", note="" if extractor.pretrained else "random VGG weights")
    results = {
        "weights": extractor.source,
        "pretrained": extractor.pretrained,
        "warning": extractor.warning,
        "alpha": alpha,
        "content_layer": config.content_layer,
        "style_layers": list(config.style_layers),
        "config": config.to_dict(),
        "image_shape": list(content.shape),
        "runs": runs,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [
        f"Style transfer: content `{config.content_image}`, style `{config.style_image}`, "
        f"{content.shape[0]}x{content.shape[1]} pixels, VGG-{config.depth} ({config.pooling} pooling), "
        f"weights: {extractor.source}; content layer {config.content_layer}, style layers "
        f"{', '.join(config.style_layers)}; alpha {alpha:.4g}"
        + (f" (the paper's alpha/beta = {float(ratio):g})" if ratio is not None else "")
        + f", tv weight {config.tv_weight:g}, init {config.init}, {config.steps} steps.",
        "",
    ]
    if extractor.warning:
        lines += [f"**{extractor.warning}**", ""]
    lines += ["| optimizer | content loss (start -> end) | style loss (start -> end) | total (start -> end) | seconds |",
              "|---|---|---|---|---|"]
    for optimizer, run in runs.items():
        first, last = run["initial"], run["final"]
        lines.append(
            f"| {optimizer} | {first['content']:.4g} -> {last['content']:.4g} | {first['style']:.4g} -> {last['style']:.4g} "
            f"| {first['total']:.4g} -> {last['total']:.4g} | {run['seconds']:.1f} |"
        )
    if command:
        lines += ["", f"Command: `{command}`"]
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if extractor.warning:
        print("\n" + extractor.warning)
    print(f"wrote {workdir}/stylized_*.png, loss_*.png, panel.png, results.md")
    return results


def plot_panel(
    content: np.ndarray, style: np.ndarray, results: dict[str, np.ndarray], path: pathlib.Path, *, note: str = ""
) -> pathlib.Path:
    """Content, style and every result side by side."""
    suffix = f" ({note})" if note else ""
    panels = [("content", content), ("style", style)] + [(name + suffix, image) for name, image in results.items()]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for axis, (title, image) in zip(np.atleast_1d(axes), panels):
        axis.imshow(np.clip(image, 0, 1))
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    from experiments import grid

    grid.cli_main(sys.argv, "experiments/configs/style_transfer.py", main, "experiments.style_transfer",
                  compilation_cache=False, default_workdir="runs/style_transfer")
