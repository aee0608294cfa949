"""The `fire-repair` command, for your own model: `fit` (the recommended recipe: profile, choice,
evidence) and `export` (an AOTInductor package of the repaired model).

A model is an importable factory, `package.module:function` (called with no arguments, it
returns the `nn.Module`), and a safetensors file of its weights. Both commands put an identity
named `input` in front of it (`fr.with_input_layer`), so that its pixels are a candidate layer;
`--no-input-layer` leaves the model as it is (give the same choice to `fit` and `export`). Images are folders of image
files (PNG, JPEG, ...), all of one size, read as float tensors in [0, 1], (N, C, H, W): the
model is expected to take them as they are (put any normalisation inside the model).
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


class CliError(Exception):
    """One line for the user: what was wrong."""


def load_model(spec: str, weights: str, input_layer: bool = True):
    """The model of `spec` ("module:factory") with the weights of a safetensors file, in eval mode,
    behind `fr.with_input_layer` unless `input_layer` is False."""
    import torch
    from safetensors.torch import load_file

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--model must be 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CliError(f"--model {spec!r}: cannot import it ({err})") from err
    try:
        model = factory()
    except Exception as err:
        raise CliError(f"--model {spec!r}: the factory failed ({type(err).__name__}: {err})") from err
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    path = Path(weights)
    if not path.is_file():
        raise CliError(f"--weights {weights!r}: no such file")
    try:
        state = load_file(str(path))
    except Exception as err:
        raise CliError(f"--weights {weights!r}: not a safetensors file ({err})") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CliError(f"--weights {weights!r} do not fit the model: {' '.join(first[:2])}") from err
    if input_layer:
        from fire_repair import with_input_layer

        model = with_input_layer(model)
    return model.eval()


def load_images(folder: str, what: str, size=None):
    """(images (N, C, H, W) float in [0, 1], file names) of every image file in `folder`, sorted by name."""
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError as err:
        raise CliError("reading images needs Pillow: pip install pillow") from err
    root = Path(folder)
    if not root.is_dir():
        raise CliError(f"{what} {folder!r}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"{what} {folder!r}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays, mode = [], None
    for path in files:
        try:
            with Image.open(path) as im:
                mode = mode or ("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
                a = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except OSError as err:
            raise CliError(f"{what}: {path} is not a readable image ({err})") from err
        shape = a.shape[:2]
        if size is None:
            size = shape
        if shape != tuple(size):
            raise CliError(f"{what}: {path.name} is {shape[1]}x{shape[0]}, the other images {size[1]}x{size[0]}; "
                           "all images must have one size")
        arrays.append(a if a.ndim == 3 else a[:, :, None])
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, [p.name for p in files]


def _check_input(model, x, what):
    import torch

    try:
        with torch.no_grad():
            model(x[:1])
    except Exception as err:
        raise CliError(f"the model does not take the images of {what} (shape {tuple(x.shape[1:])}): "
                       f"{type(err).__name__}: {err}") from err


def cmd_fit(args) -> int:
    import fire_repair as fr

    model = load_model(args.model, args.weights, args.input_layer)
    clean, _ = load_images(args.clean, "--clean")
    size = tuple(clean.shape[2:])
    _check_input(model, clean, "--clean")
    data = {}
    if args.pairs:
        x, names = load_images(args.pairs[0], "--pairs (clean)", size)
        xt, names_t = load_images(args.pairs[1], "--pairs (triggered)", size)
        if names != names_t:
            missing = sorted(set(names) ^ set(names_t))[:3]
            raise CliError(f"--pairs: the two folders must hold the same file names (e.g. {missing} is in one only)")
        data["pairs"] = (x, xt)
    else:
        data["flagged"], _ = load_images(args.flagged, "--flagged", size)
    overrides = {"k": args.k, "seed": args.seed}
    if args.layers:
        overrides["layers"] = args.layers
    try:
        result = fr.fit(model, clean, **data, **overrides)
    except ValueError as err:
        raise CliError(f"fit: {err}") from err
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.profile.save(out / "profile.fire.safetensors")
    (out / "choice.json").write_text(json.dumps({**result.choice, "coverage": result.coverage,
                                                 "layers_offered": result.layers}, indent=2) + "\n")
    (out / "evidence.md").write_text(result.table() + "\n")
    print(result.table())
    print(f"\nchose {result.choice}; wrote {out / 'profile.fire.safetensors'}, {out / 'choice.json'}, "
          f"{out / 'evidence.md'}")
    return 0


def cmd_export(args) -> int:
    import fire_repair as fr

    model = load_model(args.model, args.weights, args.input_layer)
    example, _ = load_images(args.example, "--example")
    _check_input(model, example, "--example")
    path = Path(args.profile)
    if not path.is_file():
        raise CliError(f"--profile {args.profile!r}: no such file")
    try:
        profile = fr.Profile.load(path, model)
    except (fr.ProfileError, ValueError) as err:
        mismatch = "different model" in str(err) or "has no layer" in str(err)
        hint = " (was `fit` run with the same --no-input-layer choice?)" if mismatch else ""
        raise CliError(f"--profile {args.profile!r}: {err}{hint}") from err
    fr.attach(model, profile)
    try:
        written = fr.export(model, example, args.out, max_batch=args.max_batch)
    except (ValueError, RuntimeError) as err:
        raise CliError(f"export: {err}") from err
    print(f"wrote {written} (load it with torch._inductor.aoti_load_package; fire_repair is not needed there)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fire-repair", description="FIRE: inference-time repair of a backdoored "
                                     "model (the evaluation suite is `fire-eval`)")
    sub = parser.add_subparsers(dest="command", required=True)
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                            help="an importable function that returns the model, e.g. mypkg.nets:resnet")
    model_args.add_argument("--weights", required=True, help="the model's weights (safetensors)")
    model_args.add_argument("--no-input-layer", dest="input_layer", action="store_false",
                            help="do not offer the model's input (its pixels) as a layer")
    fit = sub.add_parser("fit", parents=[model_args], help="estimate and choose the repair (the recommended recipe)")
    fit.add_argument("--clean", required=True, help="folder of clean images")
    group = fit.add_mutually_exclusive_group(required=True)
    group.add_argument("--pairs", nargs=2, metavar=("CLEAN_DIR", "TRIGGERED_DIR"),
                       help="the same images (same file names) without and with the trigger")
    group.add_argument("--flagged", metavar="DIR", help="triggered images with no twins (unpaired)")
    fit.add_argument("--layers", nargs="+", default=None, help="candidate layers (default: found in the model)")
    fit.add_argument("--k", type=int, default=1, help="directions per layer")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, help="folder for profile.fire.safetensors, choice.json, evidence.md")
    exp = sub.add_parser("export", parents=[model_args], help="write an AOTInductor package of the repaired model")
    exp.add_argument("--profile", required=True, help="the profile written by `fit`")
    exp.add_argument("--example", required=True, help="folder of example images (their size is the package's)")
    exp.add_argument("--max-batch", type=int, default=4096)
    exp.add_argument("--out", required=True, help="the package to write (.pt2)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path.cwd()))  # a factory in the current folder imports as it would in Python
    try:
        return cmd_fit(args) if args.command == "fit" else cmd_export(args)
    except CliError as err:
        print(f"fire-repair {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
