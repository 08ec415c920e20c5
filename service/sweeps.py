"""Sweeps with a verdict: does LDReg help on this data, and at which α? The pure core.

A sweep is one base pretrain spec, a grid of overrides over any of its fields (by dotted
path), and a list of seeds. Every arm of the grid, plus a ``baseline`` arm (LDReg off)
and a ``control`` arm (the LDReg code path with a negligible α), runs once per seed as an
ordinary pretrain job. The report pairs each arm with the baseline seed by seed and says,
per metric, whether the arm improves it, hurts it, or has no effect that this many seeds
can detect, against the noise floor the control measures. docs/sweeps.md is the user's
account; this module is what the service calls (no database, no torch).

* ``SweepSpec`` validates a sweep: unknown grid paths, child specs that a grid value
  makes invalid, duplicate seeds and a sweep over the size cap are refused with the
  field at fault (``grid.ldreg.alpah``, ``grid.ldreg.k.1``, ``seeds.2``).
* ``arms`` and ``expand`` list the arms and the children (arm × seed), each child's spec
  validated by ``PretrainSpec`` and normalised.
* ``report`` turns the children's states and final metrics into the verdicts.

The statistics, and why (docs/sweeps.md, "How the report is computed"):

* **Paired by seed.** Every arm of one seed shares the data split, the initial weights,
  the batch order and the augmentations, so arm − baseline on the same seed cancels what
  the seed alone decides. Only seeds where both children succeeded (and reported the
  metric) are paired.
* **The interval** of a mean over seeds is the union of two 95 % intervals: the
  percentile bootstrap of the per-seed differences (``scipy.stats.bootstrap``, seeded,
  so deterministic) and Student's t interval. Alone, the percentile bootstrap is too
  narrow at the seed counts sweeps use: its resamples only reuse the n observed
  differences, and it reads the spread with the plug-in SD and normal quantiles. On pure
  Gaussian noise it excluded 0 in 47 % of trials at n = 2, 24 % at n = 3, 16 % at n = 5
  and 10 % at n = 10 (2 000 simulated trials each), against 5-6 % for the t interval;
  at n ≤ 3 it is simply [min, max] of the differences, since a resample of all-lowest
  values has probability ≥ 1/27 > 2.5 %. The t interval fixes the coverage for
  roughly normal noise; the bootstrap widens the union on the long side when the
  differences are skewed. Percentile rather than BCa: BCa's acceleration is a jackknife
  estimate that is unstable (or undefined) with a handful of seeds.
* **Constant differences** (every paired seed moved by exactly d) leave nothing to
  resample; the interval is reported as [d, d] with a note, and no t or bootstrap
  interval. One paired seed gives an effect but no interval.
* **Verdict:** "improves" / "hurts" when the interval excludes 0 (in the metric's
  direction: higher is better unless ``directions`` says otherwise), else "no effect
  detectable at N seeds". ``beyond_noise_floor`` says whether the effect is also larger
  than anything the control's interval reaches.
* **Seeds needed** to resolve an effect of the observed size with 80 % power: the
  standard paired-sample size formula n = ((z_{1-a/2} + z_{power}) · sd / |effect|)²
  (normal approximation, e.g. Chow, Shao & Wang, *Sample Size Calculations in Clinical
  Research*, one-sample/paired means), sd the SD of the paired differences; at least 2.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ldreg.spec import MAX_SEED, PretrainSpec

# Largest sweep: arms × seeds children, each an ordinary pretrain job.
MAX_CHILDREN = 200
MAX_GRID_FIELDS = 16
# α of the control arm: the LDReg code path runs (the term is computed, its gradient
# flows), but at a strength no metric can feel: 1/500 of the smallest official α
# (MAE's 5e-6), 1/1 000 000 of SimCLR's. Whatever the control differs from the
# baseline by is the noise of training itself.
CONTROL_ALPHA = 1e-8
POWER = 0.8
BOOTSTRAP_SEED = 0
DEFAULT_METRICS = ("linear_probe_acc", "knn_acc", "lid_gmean_k32", "effective_rank")
STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
UNSUCCESSFUL = frozenset({"failed", "cancelled"})
BASELINE = "baseline"
CONTROL = "control"
# The arm of an empty grid: the base spec itself.
BASE_ARM = "base"
INTERVAL_METHOD = "union of the percentile bootstrap and Student's t interval"

Direction = Literal["higher", "lower"]
if TYPE_CHECKING:  # numpy is imported where a report is computed, not by the API's import
    import numpy as np
    import numpy.typing as npt

    Values = Sequence[float] | npt.NDArray[np.float64]
MetricName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
GridPath = Annotated[str, Field(min_length=1, max_length=200)]


# ------------------------------------------------------------------------ the spec


def _error(loc: tuple[str | int, ...], message: str, value: Any, code: str) -> InitErrorDetails:
    # The message rides in the context: a template of its own would take any "{" in an
    # arm's name (a dict value) for a placeholder.
    return InitErrorDetails(
        type=PydanticCustomError(code, "{message}", {"message": message}), loc=loc, input=value
    )


def _raise(errors: list[InitErrorDetails]) -> None:
    if errors:
        # Raised from a validator, a ValidationError keeps its line errors and their
        # locations (under the field being validated): one 422 detail per problem.
        raise ValidationError.from_exception_data("SweepSpec", errors)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``LDRegSpec | None`` → ``LDRegSpec``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, UnionType, Annotated):
        for arg in get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a field of a pretrain spec a sweep may vary; None if it is."""
    if path == "seed":
        return "the seed is set per child from 'seeds': list the seeds there, not in the grid"
    model: type[BaseModel] | None = PretrainSpec
    walked: list[str] = []
    for part in path.split("."):
        if model is None:
            return f"unknown spec field {path!r}: {'.'.join(walked)!r} is a value, not a section"
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked) or "a pretrain spec"
            prefix = ".".join(walked) + "." if walked else ""
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            return f"unknown spec field {path!r}{hint} ({where} has: {', '.join(fields)})"
        walked.append(part)
        model = _nested_model(fields[part].annotation)
    return None


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a raw spec dict, creating sections that are absent or null
    (``ldreg.alpha`` over ``ldreg: null`` turns LDReg on with that α)."""
    *sections, leaf = path.split(".")
    node = spec
    for part in sections:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _apply(base: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    spec = copy.deepcopy(dict(base))
    for path, value in overrides:
        _set_path(spec, path, copy.deepcopy(value))
    return spec


def format_value(value: Any) -> str:
    """A grid value as an arm's name shows it: text bare, everything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return repr(value)


def arm_name(values: Mapping[str, Any]) -> str:
    """``ldreg.alpha=0.1, ldreg.k=32`` in the grid's order; ``base`` for an empty grid."""
    if not values:
        return BASE_ARM
    return ", ".join(f"{path}={format_value(value)}" for path, value in values.items())


@dataclass(frozen=True)
class Arm:
    """One setting of the sweep. ``spec`` is its normalised pretrain spec, with the base's
    seed; each child sets its own."""

    name: str
    role: Literal["baseline", "control", "grid"]
    values: dict[str, Any]
    spec: dict[str, Any]
    # Each grid value's position in its list (for errors located on it).
    indices: dict[str, int] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Child:
    """One pretrain job of a sweep: an arm at a seed, with its validated, normalised spec."""

    arm: str
    arm_values: dict[str, Any]
    seed: int
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.arm} seed={self.seed}"


def _dotted(loc: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in loc)


def _message(error: Mapping[str, Any]) -> str:
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


class SweepSpec(BaseModel):
    """A sweep: ``base`` varied over ``grid``, each arm run once per seed, plus the
    ``baseline`` (``ldreg: null``) and ``control`` (α = 1e-8) arms."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: dict[str, Any] = Field(
        description="a pretrain spec (docs/api.md); its 'seed' is replaced by each child's"
    )
    grid: dict[GridPath, Annotated[list[Any], Field(min_length=1, max_length=MAX_CHILDREN)]] = (
        Field(
            default_factory=dict,
            max_length=MAX_GRID_FIELDS,
            description="dotted spec field → values; the arms are their cartesian product",
        )
    )
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        min_length=2, max_length=MAX_CHILDREN, description="every arm runs once per seed"
    )
    metrics: list[MetricName] = Field(
        default_factory=lambda: list(DEFAULT_METRICS), min_length=1, max_length=32
    )
    directions: dict[MetricName, Direction] = Field(
        default_factory=dict,
        description="'higher' or 'lower' is better, per metric; default higher, and lower"
        " for a metric named *loss",
    )
    baseline: bool = Field(default=True, description="add the arm with ldreg: null")
    control: bool = Field(
        default=True,
        description=f"add the arm with ldreg.alpha = {CONTROL_ALPHA}: the LDReg code path"
        " with no real effect, whose interval against the baseline is the noise floor",
    )
    confidence: Annotated[float, Field(ge=0.5, le=0.999)] = 0.95
    resamples: Annotated[int, Field(ge=1000, le=100_000)] = 10_000

    @field_validator("base")
    @classmethod
    def _base_is_a_pretrain_spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Kept as written (not normalised): an omitted ldreg.k or warm-up is refitted to
        # each child's batch size and epochs, as PretrainSpec does for a single job.
        PretrainSpec.model_validate(v)  # a ValidationError here is located under base.*
        return v

    @field_validator("grid")
    @classmethod
    def _known_paths(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        errors = []
        for path in v:
            problem = path_problem(path)
            if problem is not None:
                errors.append(_error((path,), problem, path, "unknown_field"))
                continue
            for other in v:
                if other != path and path.startswith(other + "."):
                    errors.append(
                        _error(
                            (path,),
                            f"{path!r} lies inside {other!r}, which the grid also varies:"
                            " vary one or the other",
                            path,
                            "overlapping_fields",
                        )
                    )
        _raise(errors)
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        seen: set[int] = set()
        errors = []
        for i, seed in enumerate(v):
            if seed in seen:
                errors.append(
                    _error(
                        (i,),
                        f"seed {seed} is listed twice; seeds must be distinct",
                        seed,
                        "duplicate_seed",
                    )
                )
            seen.add(seed)
        _raise(errors)
        return v

    @field_validator("metrics")
    @classmethod
    def _distinct_metrics(cls, v: list[str]) -> list[str]:
        errors = [
            _error((i,), f"metric {m!r} is listed twice", m, "duplicate_metric")
            for i, m in enumerate(v)
            if m in v[:i]
        ]
        _raise(errors)
        return v

    @model_validator(mode="after")
    def _children_are_valid(self) -> SweepSpec:
        errors = [
            _error(
                ("directions", name),
                f"{name!r} is not one of the sweep's metrics",
                name,
                "unknown_metric",
            )
            for name in self.directions
            if name not in self.metrics
        ]
        _raise(errors)
        n_arms = math.prod(len(v) for v in self.grid.values()) + self.baseline + self.control
        n_children = n_arms * len(self.seeds)
        if n_children > MAX_CHILDREN:
            _raise(
                [
                    _error(
                        ("grid",),
                        f"the sweep would run {n_children} children ({n_arms} arms ×"
                        f" {len(self.seeds)} seeds), over the limit of {MAX_CHILDREN}:"
                        " list fewer grid values or fewer seeds",
                        n_children,
                        "too_many_children",
                    )
                ]
            )
        _build_arms(self)  # every arm's spec valid, no two alike
        return self

    def direction(self, metric: str) -> Direction:
        if metric in self.directions:
            return self.directions[metric]
        return "lower" if metric.endswith("loss") else "higher"


def _blame(
    base: Mapping[str, Any],
    values: dict[str, Any],
    indices: dict[str, int],
    exc: ValidationError,
    arm: str,
) -> list[InitErrorDetails]:
    """Locate a grid arm's invalid child spec on the grid entry that made it so:
    ``grid.<path>.<index of the value>``, plus the field inside a section's value."""
    keys = list(values)
    out = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        field_ = _dotted(loc)
        message = _message(error)
        culprit: str | None = None
        rest: tuple[str | int, ...] = ()
        for key in keys:  # the error is in the value the grid set
            if field_ == key or field_.startswith(key + "."):
                culprit, rest = key, loc[len(key.split(".")) :]
                break
        if culprit is None:  # a section's own check, on the section holding the value
            culprit = next((k for k in keys if field_ and k.startswith(field_ + ".")), None)
        if culprit is None:  # a check across fields: the first value that fails alone
            for key in keys:
                try:
                    PretrainSpec.model_validate(_apply(base, [(key, values[key])]))
                except ValidationError:
                    culprit = key
                    break
        combination = culprit is None
        if culprit is None:  # only the combination fails: its first value, and the arm
            culprit = keys[0]
        text = message
        if field_ != culprit and not rest:
            text = f"{field_}: {message}" if field_ else message
        if combination and len(keys) > 1:
            text += f" (in arm {arm!r})"
        loc_out: tuple[str | int, ...] = ("grid", culprit, indices[culprit], *rest)
        out.append(_error(loc_out, text, values[culprit], "invalid_child_spec"))
    return out


def _build_arms(sweep: SweepSpec) -> list[Arm]:
    base = sweep.base
    built: list[Arm] = []
    errors: list[InitErrorDetails] = []

    def normalised(raw: dict[str, Any]) -> dict[str, Any]:
        return PretrainSpec.model_validate(raw).model_dump(mode="json")

    if sweep.baseline:
        built.append(
            Arm(BASELINE, "baseline", {"ldreg": None}, normalised({**base, "ldreg": None}))
        )
    if sweep.control:
        # The base's LDReg section (its k, estimator, target, warm-up), at α = 1e-8.
        raw = _apply(base, [])
        section = raw.get("ldreg")
        raw["ldreg"] = {**(section if isinstance(section, dict) else {}), "alpha": CONTROL_ALPHA}
        try:
            built.append(Arm(CONTROL, "control", {"ldreg.alpha": CONTROL_ALPHA}, normalised(raw)))
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                errors.append(
                    _error(
                        ("control",),
                        f"the control arm (base with ldreg.alpha = {CONTROL_ALPHA}) is"
                        f" invalid: {_dotted(error['loc']) or 'spec'}: {_message(error)}",
                        True,
                        "invalid_child_spec",
                    )
                )
    paths = list(sweep.grid)
    for combo in itertools.product(*(range(len(sweep.grid[p])) for p in paths)):
        indices = dict(zip(paths, combo, strict=True))
        values = {p: sweep.grid[p][i] for p, i in indices.items()}
        name = arm_name(values)
        try:
            spec = normalised(_apply(base, values.items()))
        except ValidationError as exc:
            errors.extend(_blame(base, values, indices, exc, name))
            continue
        built.append(Arm(name, "grid", values, spec, indices))
    if not errors:
        errors.extend(_duplicate_arms(built))
    # The same problem once, however many arms share the bad value; at most 20 listed.
    unique: dict[tuple[Any, ...], InitErrorDetails] = {}
    for e in errors:
        kind = e["type"]
        text = kind.message() if isinstance(kind, PydanticCustomError) else str(kind)
        unique.setdefault((*e["loc"], text), e)
    _raise(list(unique.values())[:20])
    return built


def _duplicate_arms(built: list[Arm]) -> list[InitErrorDetails]:
    """Two arms with the same normalised spec would spend the seeds twice on one setting
    (``ldreg: [null]`` is the baseline again; 0.1 and 0.10 are one value)."""
    seen: dict[str, Arm] = {}
    errors = []
    for arm in built:
        first = seen.setdefault(json.dumps(arm.spec, sort_keys=True), arm)
        if first is arm:
            continue
        # On the grid value that makes this arm a repeat: the first that differs from the
        # earlier arm's (an arm of the sweep's own has no grid values to compare).
        path = next((p for p in arm.values if first.values.get(p, arm) != arm.values[p]), None)
        path = path if path is not None else next(iter(arm.indices), None)
        loc: tuple[str | int, ...] = (
            ("grid",) if path is None else ("grid", path, arm.indices[path])
        )
        if first.role == "grid":
            reason = (
                f"arm {arm.name!r} runs the same spec as arm {first.name!r}: list each value once"
            )
        else:
            reason = (
                f"arm {arm.name!r} runs the same spec as the {first.name} arm, which the sweep"
                " adds itself: leave this value out"
            )
        errors.append(_error(loc, reason, arm.name, "duplicate_arm"))
    return errors


def arms(sweep: SweepSpec) -> list[Arm]:
    """The sweep's arms: ``baseline``, ``control`` (each when on), then the grid's
    cartesian product in the grid's order (the last field varying fastest)."""
    return _build_arms(sweep)


def expand(sweep: SweepSpec) -> list[Child]:
    """Every child of the sweep, arm by arm, seed by seed in the order of ``seeds``; each
    spec is the arm's with ``seed`` set, validated by ``PretrainSpec`` and normalised."""
    out = []
    for arm in arms(sweep):
        for seed in sweep.seeds:
            spec = PretrainSpec.model_validate({**arm.spec, "seed": seed}).model_dump(mode="json")
            out.append(Child(arm.name, dict(arm.values), seed, spec))
    return out


# ------------------------------------------------------------------------ statistics


def _scipy_stats() -> Any:
    # Imported on first use: the API imports service/, and scipy.stats takes a while.
    import scipy.stats  # type: ignore[import-untyped]

    return scipy.stats


def _num(x: float | None) -> float | None:
    """A JSON-safe float: None for a missing or non-finite value."""
    if x is None:
        return None
    f = float(x)
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean over seeds. ``method``: ``"t+bootstrap"`` (the
    union of the two, both given), ``"degenerate"`` (constant values: [d, d]) or None (one
    value: no interval)."""

    low: float | None
    high: float | None
    method: str | None
    bootstrap: tuple[float, float] | None = None
    t: tuple[float, float] | None = None
    note: str | None = None


def percentile_bootstrap(
    values: Values, *, confidence: float, resamples: int, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean (``scipy.stats.bootstrap``,
    resampling the values with ``numpy.random.default_rng(seed)``)."""
    import numpy as np

    result = _scipy_stats().bootstrap(
        (np.asarray(values, dtype=float),),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


def t_interval(values: Values, *, confidence: float) -> tuple[float, float]:
    """Student's t interval of the mean: mean ± t_{(1+c)/2, n-1} · sd / √n."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    n = len(x)
    half = (
        float(_scipy_stats().t.ppf((1 + confidence) / 2, n - 1))
        * float(x.std(ddof=1))
        / math.sqrt(n)
    )
    mean = float(x.mean())
    return mean - half, mean + half


def mean_interval(
    values: Values, *, confidence: float, resamples: int, seed: int = BOOTSTRAP_SEED
) -> Interval:
    """The interval the report gives for a mean over seeds (module docstring: why)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return Interval(None, None, None, note="no values")
    if len(x) == 1:
        return Interval(None, None, None, note="one value: no interval")
    if np.all(x == x[0]):
        d = float(x[0])
        return Interval(
            d,
            d,
            "degenerate",
            note=f"all {len(x)} values equal {d:g}: nothing to resample, the interval is the"
            " point itself and says nothing about the noise",
        )
    boot = percentile_bootstrap(x, confidence=confidence, resamples=resamples, seed=seed)
    t = t_interval(x, confidence=confidence)
    return Interval(min(boot[0], t[0]), max(boot[1], t[1]), "t+bootstrap", boot, t)


def seeds_needed(
    effect: float | None, sd: float | None, *, confidence: float = 0.95, power: float = POWER
) -> int | None:
    """Seeds to resolve a paired effect of this size: the standard paired-sample size
    formula n = ((z_{1-a/2} + z_{power}) · sd / |effect|)², a = 1 - confidence, rounded
    up, at least 2. None when the effect is 0 or the SD is unknown."""
    if effect is None or sd is None or effect == 0 or not math.isfinite(sd):
        return None
    norm = _scipy_stats().norm
    z = float(norm.ppf(1 - (1 - confidence) / 2)) + float(norm.ppf(power))
    return max(2, math.ceil((z * sd / abs(effect)) ** 2))


# ------------------------------------------------------------------------ the report


@dataclass(frozen=True)
class ChildResult:
    """What the report needs of one child: its arm and seed, its state, its final
    metrics (the job's summary; None until it has one) and, for the listing of
    unsuccessful children, its job id and error."""

    arm: str
    seed: int
    state: str
    metrics: Mapping[str, Any] | None = None
    job_id: str | None = None
    error: Any = None


def _as_result(item: ChildResult | Mapping[str, Any]) -> ChildResult:
    if isinstance(item, ChildResult):
        return item
    return ChildResult(
        arm=str(item["arm"]),
        seed=int(item["seed"]),
        state=str(item["state"]),
        metrics=item.get("metrics"),
        job_id=item.get("job_id"),
        error=item.get("error"),
    )


def _metric(result: ChildResult, name: str) -> float | None:
    value = (result.metrics or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _pair(ci: Interval) -> list[float | None] | None:
    return None if ci.low is None else [_num(ci.low), _num(ci.high)]


def _summary(
    by_seed: Mapping[int, ChildResult], seeds: Sequence[int], metric: str, sweep: SweepSpec
) -> dict[str, Any]:
    """An arm's own mean over its succeeded seeds, with its interval."""
    import numpy as np

    used = [s for s in seeds if s in by_seed and by_seed[s].state == "succeeded"]
    used = [s for s in used if _metric(by_seed[s], metric) is not None]
    x = np.asarray([_metric(by_seed[s], metric) for s in used], dtype=np.float64)
    ci = mean_interval(x, confidence=sweep.confidence, resamples=sweep.resamples)
    return {
        "n": len(used),
        "seeds": used,
        "mean": _num(float(x.mean())) if len(x) else None,
        "sd": _num(float(x.std(ddof=1))) if len(x) > 1 else None,
        "ci": _pair(ci),
        "ci_method": ci.method,
        "note": ci.note if len(x) else None,
    }


def _unpaired_reason(arm: ChildResult | None, base: ChildResult | None, metric: str) -> str | None:
    for who, r in (("arm", arm), ("baseline", base)):
        if r is None:
            return f"{who}: no child reported"
        if r.state != "succeeded":
            return f"{who}: {r.state}"
        if _metric(r, metric) is None:
            return f"{who}: {metric} missing"
    return None


def _effect(
    arm: Mapping[int, ChildResult],
    base: Mapping[int, ChildResult],
    metric: str,
    sweep: SweepSpec,
    noise: dict[str, Any] | None,
) -> dict[str, Any]:
    """arm − baseline on each seed where both succeeded, with its interval and verdict."""
    import numpy as np

    paired, excluded = [], []
    for seed in sweep.seeds:
        reason = _unpaired_reason(arm.get(seed), base.get(seed), metric)
        if reason is None:
            paired.append(seed)
        else:
            excluded.append({"seed": seed, "reason": reason})
    diffs = np.zeros(len(paired))
    for i, s in enumerate(paired):
        a, b = _metric(arm[s], metric), _metric(base[s], metric)
        assert a is not None and b is not None  # paired: both reported it
        diffs[i] = a - b
    n = len(paired)
    effect = _num(float(diffs.mean())) if n else None
    sd = _num(float(diffs.std(ddof=1))) if n > 1 else None
    ci = mean_interval(diffs, confidence=sweep.confidence, resamples=sweep.resamples)
    direction = sweep.direction(metric)
    if ci.low is None or ci.high is None:
        outcome = "insufficient_data"
        verdict = f"not enough paired seeds ({n}; an interval needs 2)"
    elif ci.low <= 0 <= ci.high:
        outcome = "no_effect_detectable"
        verdict = f"no effect detectable at {n} seeds"
    else:
        up = ci.low > 0
        outcome = "improves" if up == (direction == "higher") else "hurts"
        verdict = outcome
    beyond = None
    if noise is not None and noise.get("ci") is not None and effect is not None:
        floor = max(abs(noise["ci"][0]), abs(noise["ci"][1]))
        beyond = abs(effect) > floor
    return {
        "n": n,
        "seeds": paired,
        "excluded_seeds": excluded,
        "effect": effect,
        "sd": sd,
        "ci": _pair(ci),
        "ci_method": ci.method,
        "bootstrap_ci": None if ci.bootstrap is None else [_num(v) for v in ci.bootstrap],
        "t_ci": None if ci.t is None else [_num(v) for v in ci.t],
        "direction": direction,
        "outcome": outcome,
        "verdict": verdict,
        "beyond_noise_floor": beyond,
        "seeds_needed": seeds_needed(effect, sd, confidence=sweep.confidence),
        "note": ci.note if n else None,
    }


def report(
    sweep: SweepSpec, children_results: Iterable[ChildResult | Mapping[str, Any]]
) -> dict[str, Any]:
    """The sweep's verdicts from its children's states and final metrics.

    ``children_results``: per child, ``arm``, ``seed``, ``state`` and ``metrics`` (its
    final summary), optionally ``job_id`` and ``error``; a child not listed yet counts as
    not reported. Works at any time: while children run, it covers the seeds that have
    succeeded so far (``complete`` is false). Deterministic; JSON-serialisable, with None
    for a number that does not exist (never NaN)."""
    arm_list = arms(sweep)
    names = {a.name for a in arm_list}
    seeds = set(sweep.seeds)
    results: dict[str, dict[int, ChildResult]] = {a.name: {} for a in arm_list}
    for item in children_results:
        r = _as_result(item)
        if r.arm not in names:
            raise ValueError(f"child result for unknown arm {r.arm!r}")
        if r.seed not in seeds:
            raise ValueError(f"child result for seed {r.seed}, not one of the sweep's seeds")
        if r.seed in results[r.arm]:
            raise ValueError(f"two child results for arm {r.arm!r} seed {r.seed}")
        results[r.arm][r.seed] = r

    has_baseline = any(a.role == "baseline" for a in arm_list)
    has_control = any(a.role == "control" for a in arm_list)
    noise_floor: dict[str, Any] | None = None
    if has_baseline and has_control:
        noise_floor = {}
        for metric in sweep.metrics:
            e = _effect(results[CONTROL], results[BASELINE], metric, sweep, None)
            noise_floor[metric] = {"n": e["n"], "effect": e["effect"], "ci": e["ci"]}

    out_arms = []
    total: Counter[str] = Counter()
    n_unsuccessful = 0
    for arm in arm_list:
        by_seed = results[arm.name]
        states = Counter(r.state for r in by_seed.values())
        total.update(states)
        failed = [
            {"seed": c.seed, "state": c.state, "job_id": c.job_id, "error": c.error}
            for s in sweep.seeds
            if (c := by_seed.get(s)) is not None and c.state in UNSUCCESSFUL
        ]
        n_unsuccessful += len(failed)
        entry: dict[str, Any] = {
            "name": arm.name,
            "role": arm.role,
            "values": arm.values,
            "children": {
                "expected": len(sweep.seeds),
                "reported": len(by_seed),
                "by_state": {s: states[s] for s in sorted(states, key=_state_order)},
            },
            "failed": failed,
            "metrics": {m: _summary(by_seed, sweep.seeds, m, sweep) for m in sweep.metrics},
            "effects": None,
        }
        if has_baseline and arm.role != "baseline":
            entry["effects"] = {
                m: _effect(
                    by_seed,
                    results[BASELINE],
                    m,
                    sweep,
                    None if arm.role == "control" or noise_floor is None else noise_floor[m],
                )
                for m in sweep.metrics
            }
        out_arms.append(entry)

    expected = len(arm_list) * len(sweep.seeds)
    finished = sum(total[s] for s in FINISHED)
    notes = _notes(sweep, out_arms, has_baseline, has_control, expected, finished, n_unsuccessful)
    return {
        "complete": finished == expected,
        "baseline": has_baseline,
        "control": has_control,
        "control_alpha": CONTROL_ALPHA if has_control else None,
        "seeds": list(sweep.seeds),
        "metrics": list(sweep.metrics),
        "directions": {m: sweep.direction(m) for m in sweep.metrics},
        "confidence": sweep.confidence,
        "power": POWER,
        "resamples": sweep.resamples,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "interval": INTERVAL_METHOD,
        "children": {
            "expected": expected,
            "reported": sum(total.values()),
            "by_state": {s: total[s] for s in sorted(total, key=_state_order)},
        },
        "noise_floor": noise_floor,
        "arms": out_arms,
        "notes": notes,
    }


def _state_order(state: str) -> tuple[int, str]:
    return (STATES.index(state) if state in STATES else len(STATES), state)


def _notes(
    sweep: SweepSpec,
    out_arms: list[dict[str, Any]],
    has_baseline: bool,
    has_control: bool,
    expected: int,
    finished: int,
    n_unsuccessful: int,
) -> list[str]:
    notes = []
    if not has_baseline:
        notes.append(
            "The baseline is off: no effects are computed. Each arm shows its own mean per"
            " metric with its interval over seeds. These intervals are not paired by seed,"
            " so they are wider than an effect's would be, and overlapping ones do not show"
            " that two arms are alike."
        )
    elif not has_control:
        notes.append(
            "The control is off: there is no noise floor; effects are judged by their"
            " intervals alone."
        )
    if finished < expected:
        left = expected - finished
        notes.append(
            f"{left} of {expected} children {'has' if left == 1 else 'have'} not finished;"
            " the report covers the seeds that have succeeded so far."
        )
    if n_unsuccessful:
        notes.append(
            f"{n_unsuccessful} {'child' if n_unsuccessful == 1 else 'children'} failed or"
            f" {'was' if n_unsuccessful == 1 else 'were'} cancelled: listed under the arm,"
            " their seeds left out of the pairing."
        )
    if has_baseline and has_control:
        control = next(a for a in out_arms if a["role"] == "control")
        for metric, e in control["effects"].items():
            if e["outcome"] in ("improves", "hurts"):
                notes.append(
                    f"The control's interval on {metric} excludes 0 ({e['effect']:+.4g},"
                    f" [{e['ci'][0]:.4g}, {e['ci'][1]:.4g}]) although its α changes"
                    " nothing: at this many seeds the noise is larger than the intervals"
                    " show. Read only effects beyond the noise floor, or add seeds."
                )
    return notes
