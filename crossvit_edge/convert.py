"""``python -m crossvit_edge.convert``: build a deployable bundle for one target.

A thin layer over ``crossvit_edge.pipeline.convert``: it parses flags into a ``BuildSpec``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .cli_common import quiet_libraries, require_convert_extra, run_cli, setup_logging
from .convert_flags import FLAGS, PRECISIONS, TARGETS, check_given
from .device_profiles import list_profiles, load_profile
from .spec import CALIBRATION_METHODS, DEMO_CHECKPOINT, BuildSpec, CalibrationSettings

PROG = "crossvit_edge.convert"
CHECK_FAILED_EXIT = 3  # --fail-on-check and the check failed (2 is bad input)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--model", help="variant (timm or IBM name); read from the checkpoint when omitted")
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="file (.safetensors/.pth) or hf-hub:timm/<name>.in1k (default: the demo model)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the profile's, else fp32")
    p.add_argument("--profile", help=f"device profile name or YAML path ({', '.join(list_profiles())})")
    p.add_argument("--output", required=True, help="bundle folder to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--batch-size", type=int, help="static batch size (default: the profile's, else 1)")
    g = p.add_argument_group("calibration (int8)")
    g.add_argument("--calib-data", type=Path, help="folder of calibration images (ImageFolder or plain)")
    # no argparse defaults where the table (convert_flags) decides whether a flag applies: "given"
    # must mean given; the defaults are CalibrationSettings' and BuildSpec's
    calib = CalibrationSettings()
    g.add_argument("--calib-samples", type=int, help=f"default {calib.samples}")
    g.add_argument("--calib-method", help=f"one of {', '.join(CALIBRATION_METHODS)} (default {calib.method})")
    g.add_argument("--calib-percentile", type=float, help=f"with --calib-method percentile (default {calib.percentile})")
    g.add_argument("--calib-batch-size", type=int, help=f"default {calib.batch_size}")
    g.add_argument("--calib-seed", type=int, help=f"default {calib.seed}")
    g.add_argument("--calib-stats", type=Path, help="reuse a calibration_stats.npz instead of running images")
    g.add_argument("--smooth-alpha", type=float, help="fold LayerNorm outliers into the next Linear (alpha in [0,1])")
    g.add_argument("--float-layers", type=Path, help="file of plan layer names to keep float, one per line "
                   "(python -m crossvit_edge.debug writes float_layers.txt)")
    g.add_argument("--max-drop", type=float, help="return the most sensitive layers to float until top-1 drops at most this many points")
    p.add_argument("--eval-data", type=Path, help="held-out images for the accuracy check and --max-drop")
    p.add_argument("--eval-samples", type=int, help="default 200")
    p.add_argument("--ignore-class-names", action="store_true",
                   help="score --eval-data by sorted folder order even where the folder names are not the checkpoint's labels")
    p.add_argument("--fail-on-check", action="store_true",
                   help=f"exit {CHECK_FAILED_EXIT} when the post-conversion check against fp32 falls below its thresholds "
                        "(the bundle is kept, marked failed in its manifest, for inspection)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the profile's, else 17)")
    p.add_argument("--require-engine", action="store_true", help="tensorrt: fail unless the engine could be built here")
    p.add_argument("--fp16-baseline", choices=("on", "off"),
                   help="tensorrt int8: also carry the FP16 form of the model, so the device runner times an FP16 engine beside "
                        "the INT8 one and the report says whether INT8 pays (default on; off saves its build time and bytes)")
    p.add_argument("--image-input", action="store_true", help="coreml: take an image input with normalisation folded in")
    p.add_argument("--bundled-inputs", type=int, help="executorch: also write a BundledProgram with N test inputs")
    p.add_argument("--etdump", action="store_true", help="executorch: profile one run with ETDump and save it in the bundle")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


# CalibrationSettings field -> argparse dest, for the flags without an argparse default
CALIBRATION_FLAGS = {"samples": "calib_samples", "method": "calib_method", "percentile": "calib_percentile",
                     "batch_size": "calib_batch_size", "seed": "calib_seed"}


def given_values(args: argparse.Namespace, names: dict) -> dict:
    """field -> value for the flags of ``names`` (field -> dest) given on the command line."""
    return {field: getattr(args, dest) for field, dest in names.items() if getattr(args, dest) is not None}


def given_flags(args: argparse.Namespace) -> List[str]:
    """The table's flags given on the command line (argparse leaves an absent one None or False)."""
    return [f.name for f in FLAGS if getattr(args, f.name.lstrip("-").replace("-", "_"), None) not in (None, False)]


def spec_from_args(args: argparse.Namespace) -> BuildSpec:
    profile = load_profile(args.profile) if args.profile else None
    options = {}
    precision = args.precision or (profile.precision if profile and profile.precision else "fp32")
    if args.fp16_baseline is not None:  # where it applies: convert_flags (checked before this)
        options["fp16_baseline"] = args.fp16_baseline == "on"
    if args.opset is not None:
        options["opset"] = args.opset
    if args.require_engine:
        options["require_engine"] = True
    if args.image_input:
        options["image_input"] = True
    if args.bundled_inputs is not None:  # a negative count is refused by BuildSpec.validate
        options["bundled_inputs"] = args.bundled_inputs
    if args.etdump:
        options["etdump"] = True
    return BuildSpec(
        target=args.target,
        output=Path(args.output),
        precision=precision,
        checkpoint=args.checkpoint,
        model=args.model,
        # "is not None": --batch-size 0 must be refused, not replaced by the default
        batch_size=args.batch_size if args.batch_size is not None else (profile.batch_size if profile else 1),
        profile=profile,
        calibration=CalibrationSettings(data=args.calib_data, stats=args.calib_stats, **given_values(args, CALIBRATION_FLAGS)),
        smoothing_alpha=args.smooth_alpha,
        max_drop=args.max_drop,
        float_layers=args.float_layers,
        eval_data=args.eval_data,
        **given_values(args, {"eval_samples": "eval_samples"}),
        ignore_class_names=args.ignore_class_names,
        options=options,
        overwrite=args.overwrite,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        require_convert_extra()
        spec = spec_from_args(args)
        spec.validate()  # every flag and profile value, and the output, before torch is imported
        check_given(spec, given_flags(args))  # a flag that does not apply to this target and precision

        from .pipeline import convert

        quiet_libraries(args.verbose)
        manifest = convert(spec)
        check = manifest.get("accuracy_check", {})
        summary = {
            "bundle": str(Path(args.output)),
            "artifact": manifest["artifact"]["file"],
            "bytes": manifest["artifact"]["bytes"],
            "precision": manifest["precision"],
        }
        for key in ("top1", "reference_top1", "top1_agreement", "cosine", "snr_db", "kl", "max_abs_diff", "images", "images_source"):
            if key in check:
                summary[key] = check[key]
        summary["check"] = "skipped" if "skipped" in check else ("passed" if check.get("passed") else "FAILED")
        for note in manifest.get("notes", []):
            print(note)
        plan = manifest.get("quantization_plan") or {}
        mixed = plan.get("mixed_precision")
        if mixed:
            print(
                f"mixed precision ({mixed['metric']} on {mixed['images']} images): fp32 {100 * mixed['fp32_score']:.2f}%, "
                f"all-int8 {100 * mixed['all_int8_score']:.2f}%, final {100 * mixed['final_score']:.2f}% "
                f"(drop {mixed['final_drop_points']:.2f} points, budget {mixed['max_drop_points']})"
            )
            for r in mixed["returned_to_float"]:
                what = f"{r['layer']} (its q k^T and probs v)" if r.get("kind") == "attention" else r["layer"]
                print(f"  kept float: {what} (sensitivity KL {r['sensitivity_kl']:.2e}, +{r['gain_points']:.2f} points)")
        print(json.dumps(summary))
        for warning in check.get("warnings", []):  # again after the summary, where a CI log ends
            print(f"{PROG}: WARNING: {warning}", file=sys.stderr)
        if args.fail_on_check and check.get("passed") is False:
            print(f"{PROG}: error: the post-conversion check failed (--fail-on-check); the bundle is kept at "
                  f"{args.output} for inspection, marked \"passed\": false in its manifest", file=sys.stderr)
            return CHECK_FAILED_EXIT
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
