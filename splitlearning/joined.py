"""`split-join`: the uncut model from the trained parts of a split one, when the parties agree to hand them over.

    split-join client.keras server.keras --output joined.keras                 # standard cut
    split-join client.keras middle.keras head.keras --output joined.keras      # U-shaped cut
    split-join client.keras server.keras --output joined.keras --saved-model serving/1   # and for TF Serving

The parts are `.keras` files as `split-client --save-model` and `split-server --save-model` write them (any Keras
models whose shapes chain will do). The joined model feeds each part's output to the next part, unchanged, so its
outputs are the split pipeline's (`SplitClient.predict`) to float round-off. It is written uncompiled: a
`.keras` file that `keras.models.load_model` reads, and with `--saved-model` also a TensorFlow SavedModel
(`model.export`), the format TF Serving serves. docs/security.md says what handing a part over reveals.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitlearning import tensorflow_setup

USAGE = "%(prog)s FIRST.keras SECOND.keras [HEAD.keras] --output JOINED.keras [--saved-model DIR]"


def join(parts: Sequence[Any], name: str = "joined") -> Any:
    """One Keras model that runs `parts` in order (the first part, the server's part, and a U-shape's head).

    ValueError, naming both shapes, where a part does not take what the one before it gives, or where two parts
    share a name (a model's layers must be named apart)."""
    import keras

    if not 2 <= len(parts) <= 3:
        raise ValueError(f"expected 2 parts (first, second) or 3 (first, middle, head), got {len(parts)}")
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"the parts' names must differ to join them, got {names}")
    for index in range(1, len(parts)):
        given, taken = _shape(parts[index - 1].output_shape), _shape(parts[index].input_shape)
        if len(given) != len(taken) or any(t is not None and g != t for g, t in zip(given, taken, strict=True)):
            raise ValueError(
                f"part {index + 1} ({names[index]}) takes {_show(taken)}, but part {index} ({names[index - 1]}) "
                f"gives {_show(given)}: these parts were not cut from one model"
            )
    inputs = keras.Input(_shape(parts[0].input_shape)[1:], dtype=parts[0].inputs[0].dtype, name="input")
    outputs = inputs
    for part in parts:
        outputs = part(outputs)
    return keras.Model(inputs, outputs, name=name)


def _shape(shape: Any) -> tuple[int | None, ...]:
    if isinstance(shape, list) or (isinstance(shape, tuple) and shape and isinstance(shape[0], (tuple, list))):
        raise ValueError(f"a part of one input and one output can be joined, got shapes {shape}")
    return tuple(shape)


def _show(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("batch" if i == 0 else "any" if d is None else str(d) for i, d in enumerate(shape)) + "]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="split-join", usage=USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", type=Path, help="the parts' .keras files, first to last")
    parser.add_argument("--output", type=Path, required=True, help="write the joined model here (.keras)")
    parser.add_argument("--saved-model", type=Path, default=None, help="also export a SavedModel here (TF Serving)")
    args = parser.parse_args(argv)
    if not 2 <= len(args.parts) <= 3:
        parser.error(f"expected 2 parts (first, second) or 3 (first, middle, head), got {len(args.parts)}")
    for path in [*args.parts, args.output]:
        if path.suffix != ".keras":
            parser.error(f"{path}: expected a .keras file")
    missing = [str(path) for path in args.parts if not path.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Join the parts and write the model; exit 0, or 2 with one line for a mistake."""
    args = parse_args(argv)
    absent = tensorflow_setup.missing("split-join")
    if absent:
        print(absent, file=sys.stderr)
        return 2
    tensorflow_setup.load(verbose=False)
    import keras

    from splitlearning import top_k_layer  # noqa: F401 (registers TopK: a first part saved after top-k holds one)

    try:
        parts = [keras.saving.load_model(path, compile=False) for path in args.parts]
        model = join(parts)
    except ValueError as error:
        print(f"split-join: {error}", file=sys.stderr)
        return 2
    model.save(args.output)
    print(f"joined {' -> '.join(part.name for part in parts)} into {args.output} ({model.count_params():,} parameters)")
    if args.saved_model is not None:
        model.export(str(args.saved_model), verbose=False)
        print(f"exported a SavedModel for TF Serving to {args.saved_model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
