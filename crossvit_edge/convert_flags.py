"""Which ``convert`` flags apply to which target and precision: one table, read by the CLI (a flag
given where it does not apply is refused in one line, before any work), by ``BuildSpec.to_dict``
(the manifest's ``build`` settings hold only what was applied) and by docs/usage.md (its flag
table is ``markdown_table()``, checked by tests/test_convert_flags.py).

Torch-free and import-light: the CLI consults it before any heavy import.

Adding a target is one entry in ``TARGET_PRECISIONS``; adding a flag is one ``Flag`` row; a value
of a flag that applies more narrowly than the flag itself is one ``FlagValue`` row.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import UserError, brief

# target -> the precisions its converter builds (the converters' ``precisions`` are these)
TARGET_PRECISIONS: Dict[str, Tuple[str, ...]] = {
    "onnx": ("fp32", "fp16", "int8"),
    "tensorrt": ("fp32", "fp16", "int8"),
    "coreml": ("fp32", "fp16", "int8-weights", "int8"),
    "executorch": ("fp32", "fp16", "int8"),
    "coreai": ("fp16", "int8", "int8-weights"),
}
TARGETS = tuple(TARGET_PRECISIONS)
PRECISIONS = ("fp32", "fp16", "int8", "int8-weights")

INT8 = ("int8",)
# the targets whose int8 activation ranges are the project's own calibration (the plan's scales,
# chosen by --calib-method; Core AI's W8A8 is the plan's Q/DQ in Core AI's ops; ExecuTorch's the
# plan's ranges as fixed parameters of each int8 layer's input); Core ML's W8A8 takes them from
# coremltools' LinearQuantizer (min_max observers), fed the same images
PLAN_SCALE_TARGETS = ("onnx", "tensorrt", "executorch", "coreai")


@dataclass(frozen=True)
class Flag:
    """One ``convert`` flag. ``field``: where a ``BuildSpec`` holds it (``options.<key>`` for a
    target option; None: the CLI's alone). ``targets`` / ``precisions``: where it applies (None:
    everywhere). ``needs``: another flag it acts through, ``(flag, values)``: that flag's value must
    be one of ``values`` (None: given at all). ``what``: what it acts on, said in a refusal."""

    name: str
    field: Optional[str]
    targets: Optional[Tuple[str, ...]] = None
    precisions: Optional[Tuple[str, ...]] = None
    needs: Optional[Tuple[str, Optional[Tuple[Any, ...]]]] = None
    what: str = ""


@dataclass(frozen=True)
class FlagValue:
    """One value of a flag that applies more narrowly than the flag itself."""

    name: str
    value: Any
    targets: Optional[Tuple[str, ...]] = None
    precisions: Optional[Tuple[str, ...]] = None
    what: str = ""


FLAGS: Tuple[Flag, ...] = (
    Flag("--target", "target", what="the target"),
    Flag("--model", "model", what="the variant"),
    Flag("--checkpoint", "checkpoint", what="the weights"),
    Flag("--precision", "precision", what="the precision"),
    Flag("--profile", "profile", what="the device profile"),
    Flag("--output", "output", what="the bundle folder"),
    Flag("--overwrite", "overwrite", what="replacing an existing bundle"),
    Flag("--batch-size", "batch_size", what="the static batch size"),
    Flag("--calib-data", "calibration.data", precisions=INT8, what="the int8 calibration images"),
    Flag("--calib-samples", "calibration.samples", precisions=INT8, needs=("--calib-data", None), what="how many calibration images"),
    Flag("--calib-method", "calibration.method", targets=PLAN_SCALE_TARGETS, precisions=INT8,
         what="the activation range estimator of the plan's scales"),
    Flag("--calib-percentile", "calibration.percentile", targets=PLAN_SCALE_TARGETS, precisions=INT8,
         needs=("--calib-method", ("percentile",)), what="the percentile estimator"),
    Flag("--calib-batch-size", "calibration.batch_size", precisions=INT8, needs=("--calib-data", None),
         what="the calibration batch size"),
    Flag("--calib-seed", "calibration.seed", precisions=INT8, needs=("--calib-data", None), what="which calibration images are sampled"),
    Flag("--calib-stats", "calibration.stats", targets=PLAN_SCALE_TARGETS, precisions=INT8,
         what="saved calibration statistics for the plan's scales"),
    Flag("--smooth-alpha", "smoothing_alpha", precisions=INT8, needs=("--calib-data", None), what="LayerNorm outlier folding before int8"),
    Flag("--float-layers", "float_layers", precisions=INT8, what="which plan layers stay float"),
    Flag("--max-drop", "max_drop", precisions=INT8, needs=("--eval-data", None), what="returning int8 layers to float"),
    Flag("--eval-data", "eval_data", what="the post-conversion check's images"),
    Flag("--eval-samples", "eval_samples", needs=("--eval-data", None), what="how many --eval-data images"),
    Flag("--ignore-class-names", "ignore_class_names", needs=("--eval-data", None), what="how --eval-data is labelled"),
    Flag("--fail-on-check", None, what="the exit status after the check"),
    Flag("--opset", "options.opset", targets=("onnx", "tensorrt"), what="the ONNX graph"),
    Flag("--require-engine", "options.require_engine", targets=("tensorrt",), what="the TensorRT engine build"),
    Flag("--fp16-baseline", "options.fp16_baseline", targets=("tensorrt",), precisions=INT8,
         what="the FP16 form the device times beside the INT8 engine"),
    Flag("--image-input", "options.image_input", targets=("coreml",), what="the Core ML input type"),
    Flag("--bundled-inputs", "options.bundled_inputs", targets=("executorch",), what="the ExecuTorch BundledProgram"),
    Flag("--etdump", "options.etdump", targets=("executorch",), what="the ExecuTorch profile"),
    Flag("--verbose", None, what="logging"),
)
FLAG_VALUES: Tuple[FlagValue, ...] = ()
FLAGS_BY_NAME: Dict[str, Flag] = {f.name: f for f in FLAGS}
FLAGS_BY_FIELD: Dict[str, Flag] = {f.field: f for f in FLAGS if f.field}


def _in(value: str, allowed: Optional[Tuple[str, ...]]) -> bool:
    return allowed is None or value in allowed


def _where(targets: Optional[Tuple[str, ...]], precisions: Optional[Tuple[str, ...]]) -> str:
    parts = []
    if targets is not None:
        parts.append("--target " + "/".join(targets))
    if precisions is not None:
        parts.append("--precision " + "/".join(precisions))
    return " ".join(parts) or "every target and precision"


def spec_value(spec, field: str) -> Any:
    """The value a BuildSpec holds for ``field`` (``options.<key>``: None when the option is unset)."""
    head, _, key = field.partition(".")
    if head == "options":
        return (spec.options or {}).get(key)
    value = getattr(spec, head)
    return getattr(value, key) if key else value


def _is_set(value: Any) -> bool:
    return value is not None and value is not False


def why_not(flag: Flag, target: str, precision: str, value_of) -> Optional[str]:
    """None when ``flag`` applies to (target, precision) given the other flags' values
    (``value_of(flag name)``); else the reason, one line."""
    combination = f"--target {target} --precision {precision}"
    if not (_in(target, flag.targets) and _in(precision, flag.precisions)):
        return f"{flag.name} does not apply to {combination} (only to {_where(flag.targets, flag.precisions)}: it sets {flag.what})"
    if flag.needs is not None:
        other, values = flag.needs
        current = value_of(other)
        if values is None and not _is_set(current):
            return f"{flag.name} does not apply to {combination} without {other} (it sets {flag.what}, which only {other} uses)"
        if values is not None and current not in values:
            return (f"{flag.name} does not apply to {combination} with {other} {brief(current)} "
                    f"(it sets {flag.what}, used only with {other} {'/'.join(map(str, values))})")
    value = value_of(flag.name)
    for rule in FLAG_VALUES:
        if rule.name == flag.name and rule.value == value and not (_in(target, rule.targets) and _in(precision, rule.precisions)):
            return (f"{flag.name} {brief(value)} does not apply to {combination} (only to "
                    f"{_where(rule.targets, rule.precisions)}: {rule.what})")
    return None


def _value_of(spec):
    return lambda name: spec_value(spec, FLAGS_BY_NAME[name].field) if FLAGS_BY_NAME[name].field else None


def check_given(spec, given: Iterable[str]) -> None:
    """Refuse the first flag of ``given`` (names as on the command line) that does not apply to
    the spec's target and precision: UserError, one line naming the combination."""
    value_of = _value_of(spec)
    for name in given:
        reason = why_not(FLAGS_BY_NAME[name], spec.target, spec.precision, value_of)
        if reason:
            raise UserError(reason)


def applies(spec, field: str) -> bool:
    """Whether the setting ``field`` of the spec takes effect for its target and precision (a
    field with no flag, such as a profile-only option, always does)."""
    flag = FLAGS_BY_FIELD.get(field)
    return flag is None or why_not(flag, spec.target, spec.precision, _value_of(spec)) is None


def not_applied(spec) -> List[str]:
    """The settings of a BuildSpec built in Python that differ from their defaults but do not take
    effect for its target and precision, as one reason each."""
    from .spec import BuildSpec, CalibrationSettings

    defaults = {f"calibration.{f.name}": f.default for f in fields(CalibrationSettings)}
    defaults.update({f.name: f.default for f in fields(BuildSpec) if f.name not in ("calibration", "options")})
    value_of = _value_of(spec)
    out = []
    for flag in FLAGS:
        if flag.field is None:
            continue
        value = spec_value(spec, flag.field)
        given = value is not None if flag.field.startswith("options.") else flag.field in defaults and value != defaults[flag.field]
        reason = why_not(flag, spec.target, spec.precision, value_of) if given else None
        if reason:
            out.append(reason)
    return out


def markdown_table() -> str:
    """The flag table of docs/usage.md: one row per flag, one column per target; a cell lists the
    precisions the flag applies to there (with what it needs), "-" where it does not apply."""
    header = "| flag | " + " | ".join(f"`{t}`" for t in TARGETS) + " |"
    lines = [header, "|" + "---|" * (len(TARGETS) + 1)]
    for flag in FLAGS:
        cells = []
        for target in TARGETS:
            if not _in(target, flag.targets):
                cells.append("-")
                continue
            precs = [p for p in TARGET_PRECISIONS[target] if _in(p, flag.precisions)]
            cell = "all" if len(precs) == len(TARGET_PRECISIONS[target]) else ", ".join(precs)
            cells.append(cell if precs else "-")
        if flag.needs is not None:
            other, values = flag.needs
            name = f"`{flag.name}` (with `{other}`" + (f" {'/'.join(map(str, values))}" if values else "") + ")"
        else:
            name = f"`{flag.name}`"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for rule in FLAG_VALUES:
        cells = []
        for target in TARGETS:
            flag = FLAGS_BY_NAME[rule.name]  # a value applies only where its flag does
            precs = [p for p in TARGET_PRECISIONS[target]
                     if _in(target, rule.targets) and _in(p, rule.precisions) and _in(target, flag.targets) and _in(p, flag.precisions)]
            cells.append(", ".join(precs) if precs else "-")
        lines.append(f"| `{rule.name} {rule.value}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m crossvit_edge.convert_flags: print the table for docs/usage.md
    print(markdown_table(), end="")
