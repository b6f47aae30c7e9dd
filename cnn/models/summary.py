"""Per-layer summary of a model: output shape and parameter count of every module.

    python -m cnn.models.summary resnet50
    python -m cnn.models.summary vgg16 --depth 2
    python -m cnn.models.summary googlenet --input-shape 96,96,3 --num-classes 10 --option aux_logits=True

The model is only traced (`jax.eval_shape` of `init`), so nothing is compiled or computed and
even VGG-19 or ResNet-152 summarize in about a second. Each module's `__call__` is intercepted
(`nn.intercept_methods`) to record its output shape in call order; parameter counts come from the
`params` subtree under the module's path (BatchNorm statistics are reported separately).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.models.registry import available, count_params, create


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One module of the summary: its path, class, output shape(s) and parameters (with children)."""

    path: tuple[str, ...]
    module_type: str
    output_shape: str
    params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """All rows in call order plus totals."""

    name: str
    input_shape: tuple[int, ...]
    rows: list[LayerRow]
    total_params: int
    batch_stats: int
    param_bytes: int

    def table(self, depth: int | None = None) -> str:
        """The summary as a fixed-width text table, modules nested deeper than `depth` hidden."""
        rows = [r for r in self.rows if depth is None or len(r.path) <= depth]
        names = [("  " * len(r.path)) + (r.path[-1] if r.path else self.name) for r in rows]
        width_name = max([len("Layer")] + [len(n) for n in names]) + 2
        width_type = max([len("Type")] + [len(r.module_type) for r in rows]) + 2
        width_shape = max([len("Output shape")] + [len(r.output_shape) for r in rows]) + 2
        lines = [
            f"{'Layer':<{width_name}}{'Type':<{width_type}}{'Output shape':<{width_shape}}{'Params':>14}",
            "-" * (width_name + width_type + width_shape + 14),
        ]
        for name, row in zip(names, rows):
            lines.append(f"{name:<{width_name}}{row.module_type:<{width_type}}{row.output_shape:<{width_shape}}"
                         f"{row.params:>14,}")
        lines += [
            "-" * (width_name + width_type + width_shape + 14),
            f"Input shape: {self.input_shape}",
            f"Total params: {self.total_params:,} ({self.param_bytes / 2**20:.1f} MiB)",
            f"BatchNorm statistics (not trainable): {self.batch_stats:,}",
        ]
        return "\n".join(lines)


def _shape_text(tree: Any) -> str:
    shapes = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "shape")]
    if len(shapes) == 1:
        return str(shapes[0])
    return ", ".join(str(s) for s in shapes) if shapes else "-"


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return {}
        tree = tree[key]
    return tree


def summarize(model: nn.Module, input_shape: Sequence[int], *, name: str | None = None) -> Summary:
    """Traces `model.init` on zeros of `input_shape` ([batch, height, width, channels]) and lists its modules.

    Args:
      model: any Flax module with `__call__(x, *, train)`.
      input_shape: full input shape including the batch dimension.
      name: label of the top row (default: the class name).
    """
    records: dict[tuple[str, ...], list] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        first = path not in records
        if first:
            records[path] = [type(context.module).__name__, "-"]  # reserve call-order position
        out = next_fun(*args, **kwargs)
        if first:
            records[path][1] = _shape_text(out)
        return out

    def init() -> Any:
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.key(0), jnp.zeros(tuple(input_shape), jnp.float32), train=False)

    variables = jax.eval_shape(init)
    params = variables.get("params", {})
    rows = [
        LayerRow(path, module_type, shape, count_params(_subtree(params, path)))
        for path, (module_type, shape) in records.items()
    ]
    param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    return Summary(
        name=name or type(model).__name__,
        input_shape=tuple(input_shape),
        rows=rows,
        total_params=count_params(params),
        batch_stats=count_params(variables.get("batch_stats", {})),
        param_bytes=int(param_bytes),
    )


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r} must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: Sequence[str] | None = None) -> str:
    """CLI entry point; prints and returns the table."""
    parser = argparse.ArgumentParser(prog="python -m cnn.models.summary", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registered model name, e.g. resnet50; one of: " + ", ".join(available()))
    parser.add_argument("--input-shape", help="height,width,channels (default: the model's canonical input)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="hide modules nested deeper than this")
    parser.add_argument("--option", type=_parse_option, action="append", default=[], help="model option key=value")
    args = parser.parse_args(argv)

    options = dict(args.option)
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    model = create(args.model, **options)
    if args.input_shape:
        try:
            spatial = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            spatial = ()
        if len(spatial) != 3:
            raise ValueError(f"--input-shape={args.input_shape!r} must be height,width,channels, e.g. 224,224,3")
    else:
        spatial = getattr(model, "canonical_input_shape", None)
        if spatial is None:
            raise ValueError(f"model {args.model!r} has no canonical input shape; pass --input-shape height,width,channels")
    table = summarize(model, (args.batch_size, *spatial), name=args.model).table(args.depth)
    print(table)
    return table


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
