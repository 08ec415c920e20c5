"""service/sweeps.py: a sweep's validation, its expansion into children, and its report.

Pure and fast: no database, no torch. The report's numbers are checked against
constructed per-seed results whose answer is known, and against an independent
computation of the paired interval."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from ldreg.spec import PretrainSpec, field_errors
from service.sweeps import (
    CONTROL_ALPHA,
    MAX_CHILDREN,
    SweepSpec,
    arms,
    expand,
    mean_interval,
    report,
    seeds_needed,
)

BASE: dict[str, Any] = {
    "method": "simclr",
    "dataset": {"name": "digits", "image_size": 16},
    "epochs": 20,
    "batch_size": 128,
    "width": 8,
    "optimizer": {"name": "sgd", "lr": 0.3, "weight_decay": 1e-5},
}
SEEDS5 = [0, 1, 2, 3, 4]
T_975_4 = 2.7764451051977987  # Student's t quantile, 0.975 at 4 degrees of freedom


def sweep(**kw: Any) -> SweepSpec:
    return SweepSpec.model_validate({"base": BASE, "seeds": [0, 1, 2], **kw})


def errors_of(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate({"base": BASE, "seeds": [0, 1, 2], **raw})
    return field_errors(info.value, "spec")


# ------------------------------------------------------------------------ expansion


def test_expansion_is_grid_product_plus_baseline_and_control_times_seeds() -> None:
    s = sweep(grid={"ldreg.alpha": [0.01, 0.1], "ldreg.k": [8, 16, 32]})
    assert [a.name for a in arms(s)] == [
        "baseline",
        "control",
        "ldreg.alpha=0.01, ldreg.k=8",
        "ldreg.alpha=0.01, ldreg.k=16",
        "ldreg.alpha=0.01, ldreg.k=32",
        "ldreg.alpha=0.1, ldreg.k=8",
        "ldreg.alpha=0.1, ldreg.k=16",
        "ldreg.alpha=0.1, ldreg.k=32",
    ]
    children = expand(s)
    assert len(children) == (2 * 3 + 2) * 3
    assert [(c.arm, c.seed) for c in children[:4]] == [
        ("baseline", 0),
        ("baseline", 1),
        ("baseline", 2),
        ("control", 0),
    ]
    for child in children:
        assert child.spec["seed"] == child.seed
        # Stored normalised: validating it again changes nothing.
        assert PretrainSpec.model_validate(child.spec).model_dump(mode="json") == child.spec
    last = children[-1]
    assert last.arm_values == {"ldreg.alpha": 0.1, "ldreg.k": 32}
    assert (last.spec["ldreg"]["alpha"], last.spec["ldreg"]["k"]) == (0.1, 32)


def test_baseline_and_control_can_be_left_out_and_an_empty_grid_runs_the_base() -> None:
    s = sweep(grid={"ldreg.alpha": [0.01, 0.1]}, baseline=False, control=False)
    assert [a.name for a in arms(s)] == ["ldreg.alpha=0.01", "ldreg.alpha=0.1"]
    assert len(expand(s)) == 6
    assert [a.name for a in arms(sweep())] == ["baseline", "control", "base"]


def test_baseline_turns_ldreg_off_and_control_is_the_base_ldreg_at_negligible_alpha() -> None:
    base = {**BASE, "ldreg": {"k": 12, "estimator": "mle", "warmup_epochs": 3}}
    s = SweepSpec.model_validate({"base": base, "seeds": [5, 6], "grid": {"ldreg.alpha": [0.1]}})
    by_arm = {c.arm: c for c in expand(s) if c.seed == 5}
    assert by_arm["baseline"].spec["ldreg"] is None
    control = by_arm["control"].spec["ldreg"]
    assert control["alpha"] == CONTROL_ALPHA
    # Everything but α as in the LDReg arms: the same code path.
    arm = by_arm["ldreg.alpha=0.1"].spec["ldreg"]
    assert {**control, "alpha": None} == {**arm, "alpha": None}
    assert (control["k"], control["estimator"], control["warmup_epochs"]) == (12, "mle", 3)


def test_dotted_overrides_reach_nested_fields_and_keep_the_base_siblings() -> None:
    s = sweep(grid={"optimizer.lr": [0.05], "dataset.image_size": [8], "method": ["byol"]})
    (child,) = [c for c in expand(s) if c.arm not in ("baseline", "control") and c.seed == 0]
    assert child.arm == "optimizer.lr=0.05, dataset.image_size=8, method=byol"
    assert child.spec["optimizer"]["lr"] == 0.05
    assert child.spec["optimizer"]["name"] == "sgd"  # from the base
    assert child.spec["optimizer"]["weight_decay"] == 1e-5
    assert child.spec["dataset"] == {**child.spec["dataset"], "name": "digits", "image_size": 8}
    assert child.spec["method"] == "byol"


def test_an_alpha_over_a_null_ldreg_turns_it_on_and_omitted_fields_refit_per_child() -> None:
    base = {**BASE, "ldreg": None}
    s = SweepSpec.model_validate(
        {"base": base, "seeds": [0, 1], "grid": {"batch_size": [16, 256], "ldreg.alpha": [0.05]}}
    )
    specs = {c.arm: c.spec for c in expand(s) if c.seed == 0}
    assert specs["baseline"]["ldreg"] is None
    # k was never written: 64 capped at batch_size - 1, child by child.
    assert specs["batch_size=16, ldreg.alpha=0.05"]["ldreg"]["k"] == 15
    assert specs["batch_size=256, ldreg.alpha=0.05"]["ldreg"]["k"] == 64
    assert specs["batch_size=16, ldreg.alpha=0.05"]["ldreg"]["alpha"] == 0.05


def test_a_whole_section_can_be_a_grid_value_including_null() -> None:
    s = sweep(grid={"ldreg": [None, {"alpha": 0.05, "k": 8}]}, baseline=False)
    names = [a.name for a in arms(s)]
    assert names == ["control", "ldreg=null", 'ldreg={"alpha":0.05,"k":8}']
    specs = {c.arm: c.spec for c in expand(s) if c.seed == 1}
    assert specs["ldreg=null"]["ldreg"] is None
    assert specs['ldreg={"alpha":0.05,"k":8}']["ldreg"]["k"] == 8


# ------------------------------------------------------------------------ errors


def test_an_unknown_grid_path_is_refused_on_its_own_dotted_field_with_a_suggestion() -> None:
    [(where, why)] = errors_of({"grid": {"ldreg.alpah": [0.1]}})
    assert where == "spec.grid.ldreg.alpah"
    assert "did you mean 'ldreg.alpha'" in why
    [(where, _)] = errors_of({"grid": {"optimiser.lr": [0.1]}})
    assert where == "spec.grid.optimiser.lr"
    [(where, why)] = errors_of({"grid": {"seed": [1, 2]}})
    assert (where, "seeds" in why) == ("spec.grid.seed", True)
    [(where, _)] = errors_of({"grid": {"ldreg": [None], "ldreg.alpha": [0.1]}})
    assert where == "spec.grid.ldreg.alpha"


def test_a_value_that_makes_a_child_invalid_is_located_on_that_grid_value() -> None:
    [(where, why)] = errors_of({"grid": {"ldreg.alpha": [0.1, 20.0]}})
    assert where == "spec.grid.ldreg.alpha.1"
    assert "less than or equal to 10" in why
    # A check across fields: k against the base's batch size, on the k that breaks it,
    # once, although two arms share it.
    [(where, why)] = errors_of({"grid": {"ldreg.k": [16, 128], "optimizer.lr": [0.1, 0.2]}})
    assert where == "spec.grid.ldreg.k.1"
    assert "must be smaller than batch_size (128)" in why
    # Inside a section value: the field within it.
    [(where, _)] = errors_of({"grid": {"ldreg": [{"alpah": 1.0}]}})
    assert where == "spec.grid.ldreg.0.alpah"
    [(where, why)] = errors_of({"grid": {"dataset.name": ["cifar10"]}})
    assert (where, "needs a 'path'" in why) == ("spec.grid.dataset.name.0", True)
    # Only the combination fails: named with its arm.
    [(where, why)] = errors_of({"grid": {"ldreg.warmup_epochs": [2], "epochs": [1, 20]}})
    assert where.startswith("spec.grid.")
    assert "must be below epochs (1)" in why and "epochs=1" in why


def test_too_many_children_is_refused_with_the_count() -> None:
    grid = {"ldreg.alpha": [0.001 * i for i in range(1, 11)], "ldreg.k": [4, 8, 16, 32]}
    [(where, why)] = errors_of({"grid": grid, "seeds": [0, 1, 2, 3, 4]})
    assert where == "spec.grid"
    assert f"over the limit of {MAX_CHILDREN}" in why
    assert "210 children (42 arms × 5 seeds)" in why


def test_seeds_must_be_at_least_two_and_distinct() -> None:
    [(where, why)] = errors_of({"seeds": [3, 4, 3]})
    assert (where, why) == ("spec.seeds.2", "seed 3 is listed twice; seeds must be distinct")
    [(where, _)] = errors_of({"seeds": [3]})
    assert where == "spec.seeds"


def test_the_base_is_validated_as_a_pretrain_spec_and_the_sweep_refuses_extras() -> None:
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate({"base": {**BASE, "method": "simclrr"}, "seeds": [0, 1]})
    assert field_errors(info.value, "spec")[0][0] == "spec.base.method"
    assert errors_of({"alpha": 0.1})[0][0] == "spec.alpha"
    assert errors_of({"confidence": float("nan")})[0][0] == "spec.confidence"
    assert errors_of({"directions": {"loss": "lower"}})[0][0] == "spec.directions.loss"


def test_an_arm_that_repeats_another_or_the_baseline_is_refused() -> None:
    [(where, why)] = errors_of({"grid": {"ldreg": [None]}})
    assert where == "spec.grid.ldreg.0" and "baseline" in why
    [(where, why)] = errors_of({"grid": {"ldreg.alpha": [CONTROL_ALPHA]}})
    assert where == "spec.grid.ldreg.alpha.0" and "control" in why
    [(where, _)] = errors_of({"grid": {"ldreg.alpha": [0.1, 0.1]}})
    assert where == "spec.grid.ldreg.alpha.1"


# ------------------------------------------------------------------------ the report

BASELINE_VALUES = [80.0, 82.0, 79.0, 81.0, 83.0]
SMALL_NOISE = [0.1, -0.2, 0.15, -0.05, 0.0]


def results(
    s: SweepSpec, values: dict[str, list[float]], metric: str = "knn_acc", **states: Any
) -> list[dict[str, Any]]:
    """One result per child: ``values[arm][i]`` on seed i; ``states`` maps
    ``"arm/seed"`` to a state other than succeeded."""
    out = []
    for arm, per_seed in values.items():
        for seed, value in zip(s.seeds, per_seed, strict=True):
            state = states.get(f"{arm}/{seed}", "succeeded")
            metrics = {metric: value} if state == "succeeded" else None
            out.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "state": state,
                    "metrics": metrics,
                    "job_id": f"job-{arm}-{seed}",
                    "error": {"code": "worker_lost"} if state == "failed" else None,
                }
            )
    return out


def arm_of(rep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in rep["arms"] if a["name"] == name)


def five_seed_sweep(**kw: Any) -> SweepSpec:
    grid = {"ldreg.alpha": [0.01, 0.1, 1.0]}
    return SweepSpec.model_validate(
        {"base": BASE, "seeds": SEEDS5, "grid": grid, "metrics": ["knn_acc"], **kw}
    )


def constructed(s: SweepSpec) -> dict[str, list[float]]:
    b = BASELINE_VALUES
    return {
        "baseline": b,
        "control": [x + d for x, d in zip(b, [0.3, -0.3, 0.2, -0.1, -0.1], strict=True)],
        # A clear +5, pure noise, a clear −3.
        "ldreg.alpha=0.01": [x + 5 + e for x, e in zip(b, SMALL_NOISE, strict=True)],
        "ldreg.alpha=0.1": [x + d for x, d in zip(b, [0.5, -0.7, 0.3, -0.4, 0.2], strict=True)],
        "ldreg.alpha=1.0": [x - 3 + e for x, e in zip(b, SMALL_NOISE, strict=True)],
    }


def test_verdicts_on_a_clear_gain_pure_noise_and_a_clear_loss() -> None:
    s = five_seed_sweep()
    rep = report(s, results(s, constructed(s)))
    gain = arm_of(rep, "ldreg.alpha=0.01")["effects"]["knn_acc"]
    noise = arm_of(rep, "ldreg.alpha=0.1")["effects"]["knn_acc"]
    loss = arm_of(rep, "ldreg.alpha=1.0")["effects"]["knn_acc"]
    assert gain["effect"] == pytest.approx(5.0)
    assert (gain["outcome"], gain["verdict"]) == ("improves", "improves")
    assert gain["ci"][0] > 0
    assert gain["beyond_noise_floor"] is True
    assert noise["outcome"] == "no_effect_detectable"
    assert noise["verdict"] == "no effect detectable at 5 seeds"
    assert noise["ci"][0] < 0 < noise["ci"][1]
    assert loss["effect"] == pytest.approx(-3.0)
    assert (loss["verdict"], loss["ci"][1] < 0) == ("hurts", True)
    assert rep["complete"] is True
    assert rep["notes"] == []


def test_a_lower_is_better_metric_turns_a_rise_into_hurts() -> None:
    s = five_seed_sweep(directions={"knn_acc": "lower"})
    rep = report(s, results(s, constructed(s)))
    assert arm_of(rep, "ldreg.alpha=0.01")["effects"]["knn_acc"]["verdict"] == "hurts"
    assert arm_of(rep, "ldreg.alpha=1.0")["effects"]["knn_acc"]["verdict"] == "improves"
    assert rep["directions"] == {"knn_acc": "lower"}


def test_the_effect_and_its_interval_equal_an_independent_computation() -> None:
    s = five_seed_sweep()
    values = constructed(s)
    rep = report(s, results(s, values))
    got = arm_of(rep, "ldreg.alpha=0.1")["effects"]["knn_acc"]

    diffs = np.array(values["ldreg.alpha=0.1"]) - np.array(values["baseline"])
    # Percentile bootstrap of the mean difference, as scipy draws it: 10 000 resamples of
    # the 5 seeds with numpy's default_rng(0).
    idx = np.random.default_rng(0).integers(0, 5, (10_000, 5))
    boot = np.quantile(diffs[idx].mean(axis=1), [0.025, 0.975])
    half = T_975_4 * diffs.std(ddof=1) / math.sqrt(5)
    t = [diffs.mean() - half, diffs.mean() + half]

    assert got["effect"] == pytest.approx(diffs.mean())
    assert got["sd"] == pytest.approx(diffs.std(ddof=1))
    assert got["bootstrap_ci"] == pytest.approx(boot.tolist(), abs=1e-12)
    assert got["t_ci"] == pytest.approx(t)
    assert got["ci"] == pytest.approx([min(boot[0], t[0]), max(boot[1], t[1])])
    assert got["ci_method"] == "t+bootstrap"
    # At 5 seeds the t interval is the wider: the bootstrap alone would be too narrow.
    assert got["ci"] == pytest.approx(t)
    assert got["seeds"] == SEEDS5


def test_the_control_is_reported_as_the_noise_floor() -> None:
    s = five_seed_sweep()
    rep = report(s, results(s, constructed(s)))
    control = arm_of(rep, "control")["effects"]["knn_acc"]
    floor = rep["noise_floor"]["knn_acc"]
    assert floor == {"n": 5, "effect": control["effect"], "ci": control["ci"]}
    assert floor["ci"][0] < 0 < floor["ci"][1]
    assert control["beyond_noise_floor"] is None  # not judged against itself
    assert arm_of(rep, "ldreg.alpha=0.1")["effects"]["knn_acc"]["beyond_noise_floor"] is False


def test_a_control_whose_interval_excludes_zero_is_flagged_in_the_notes() -> None:
    s = five_seed_sweep()
    values = constructed(s)
    values["control"] = [x + 1 + e for x, e in zip(BASELINE_VALUES, SMALL_NOISE, strict=True)]
    rep = report(s, results(s, values))
    assert any("control's interval on knn_acc excludes 0" in n for n in rep["notes"])


def test_failed_children_are_listed_and_left_out_of_the_pairing() -> None:
    s = five_seed_sweep()
    rep = report(
        s,
        results(s, constructed(s), **{"ldreg.alpha=0.01/2": "failed", "baseline/4": "cancelled"}),
    )
    arm = arm_of(rep, "ldreg.alpha=0.01")
    assert arm["failed"] == [
        {
            "seed": 2,
            "state": "failed",
            "job_id": "job-ldreg.alpha=0.01-2",
            "error": {"code": "worker_lost"},
        }
    ]
    assert arm["children"]["by_state"] == {"succeeded": 4, "failed": 1}
    effect = arm["effects"]["knn_acc"]
    assert effect["seeds"] == [0, 1, 3]
    assert effect["excluded_seeds"] == [
        {"seed": 2, "reason": "arm: failed"},
        {"seed": 4, "reason": "baseline: cancelled"},
    ]
    assert effect["outcome"] == "improves"
    # Every other arm loses seed 4 too.
    assert arm_of(rep, "ldreg.alpha=1.0")["effects"]["knn_acc"]["seeds"] == [0, 1, 2, 3]
    assert arm_of(rep, "baseline")["failed"][0]["state"] == "cancelled"
    assert rep["children"]["by_state"] == {"succeeded": 23, "failed": 1, "cancelled": 1}
    assert any("2 children failed or were cancelled" in n for n in rep["notes"])


def test_a_running_sweep_reports_what_has_succeeded_and_says_it_is_incomplete() -> None:
    s = five_seed_sweep()
    values = constructed(s)
    items = results(s, values, **{"ldreg.alpha=0.01/0": "running"})
    items = [r for r in items if (r["arm"], r["seed"]) != ("ldreg.alpha=1.0", 4)]  # queued
    rep = report(s, items)
    assert rep["complete"] is False
    assert rep["children"]["expected"] == 25 and rep["children"]["reported"] == 24
    assert arm_of(rep, "ldreg.alpha=1.0")["effects"]["knn_acc"]["excluded_seeds"] == [
        {"seed": 4, "reason": "arm: no child reported"}
    ]
    assert any("2 of 25 children have not finished" in n for n in rep["notes"])


def test_two_seeds_give_a_t_interval_and_one_seed_gives_no_interval() -> None:
    s = SweepSpec.model_validate(
        {"base": BASE, "seeds": [0, 1], "metrics": ["knn_acc"], "control": False}
    )
    rep = report(s, results(s, {"baseline": [80.0, 82.0], "base": [85.0, 86.0]}))
    e = arm_of(rep, "base")["effects"]["knn_acc"]
    # Differences 5 and 4: the percentile bootstrap alone would be [4, 5] and call it a
    # gain; with 2 seeds the t interval is 4.5 ± 12.71 · 0.707 / √2.
    assert e["bootstrap_ci"] == pytest.approx([4.0, 5.0])
    assert e["ci"] == pytest.approx([4.5 - 12.706204736 * 0.5, 4.5 + 12.706204736 * 0.5])
    assert e["verdict"] == "no effect detectable at 2 seeds"
    assert any("control is off" in n for n in rep["notes"])
    assert rep["noise_floor"] is None

    rep = report(
        s, results(s, {"baseline": [80.0, 82.0], "base": [85.0, 86.0]}, **{"base/1": "failed"})
    )
    e = arm_of(rep, "base")["effects"]["knn_acc"]
    assert (e["n"], e["effect"], e["ci"], e["sd"]) == (1, 5.0, None, None)
    assert e["outcome"] == "insufficient_data"
    assert e["seeds_needed"] is None


def test_constant_differences_give_the_point_as_interval_with_a_note() -> None:
    s = five_seed_sweep(control=False)
    values = constructed(s)
    del values["control"]
    values["ldreg.alpha=0.01"] = [x + 2.0 for x in BASELINE_VALUES]
    rep = report(s, results(s, values))
    e = arm_of(rep, "ldreg.alpha=0.01")["effects"]["knn_acc"]
    assert e["ci"] == [2.0, 2.0]
    assert e["ci_method"] == "degenerate"
    assert e["bootstrap_ci"] is None and e["t_ci"] is None
    assert "all 5 values equal 2" in e["note"]
    assert e["sd"] == 0.0
    assert e["verdict"] == "improves"
    assert e["seeds_needed"] == 2


def test_seeds_needed_is_the_paired_sample_size_formula() -> None:
    # ((1.95996 + 0.84162) · 2 / 1)² = 31.4 → 32 seeds.
    assert seeds_needed(1.0, 2.0) == 32
    assert seeds_needed(-1.0, 2.0) == 32
    assert seeds_needed(0.0, 2.0) is None
    assert seeds_needed(1.0, None) is None
    assert seeds_needed(10.0, 0.1) == 2  # never below 2

    s = SweepSpec.model_validate(
        {"base": BASE, "seeds": [0, 1, 2], "metrics": ["knn_acc"], "control": False}
    )
    base = [80.0, 81.0, 82.0]
    rep = report(s, results(s, {"baseline": base, "base": [79.0, 82.0, 85.0]}))
    e = arm_of(rep, "base")["effects"]["knn_acc"]  # differences −1, 1, 3: mean 1, sd 2
    assert (e["effect"], e["sd"], e["seeds_needed"]) == (1.0, 2.0, 32)


def test_with_the_baseline_off_each_arm_has_its_mean_and_no_effects() -> None:
    s = five_seed_sweep(baseline=False)
    values = constructed(s)
    del values["baseline"]
    rep = report(s, results(s, values))
    assert rep["baseline"] is False and rep["noise_floor"] is None
    assert any("baseline is off" in n for n in rep["notes"])
    for arm in rep["arms"]:
        assert arm["effects"] is None
    m = arm_of(rep, "ldreg.alpha=0.01")["metrics"]["knn_acc"]
    expected = np.array(values["ldreg.alpha=0.01"])
    assert m["mean"] == pytest.approx(expected.mean())
    assert m["n"] == 5 and m["ci"][0] < m["mean"] < m["ci"][1]
    ci = mean_interval(expected, confidence=0.95, resamples=10_000)
    assert m["ci"] == [ci.low, ci.high]


def test_the_report_is_deterministic_and_json_without_nan() -> None:
    s = five_seed_sweep()
    items = results(s, constructed(s), **{"control/1": "failed"})
    items[0]["metrics"] = {"knn_acc": float("nan")}  # a non-finite metric counts as missing
    items[1]["metrics"] = {"knn_acc": True}  # not a number either
    first = report(s, items)
    assert first == report(s, items)
    text = json.dumps(first, allow_nan=False)  # raises on NaN or infinity
    assert json.loads(text) == first
    effect = arm_of(first, "ldreg.alpha=0.01")["effects"]["knn_acc"]
    assert effect["excluded_seeds"][:2] == [
        {"seed": 0, "reason": "baseline: knn_acc missing"},
        {"seed": 1, "reason": "baseline: knn_acc missing"},
    ]
    # A report with nothing reported yet is JSON too.
    json.dumps(report(s, []), allow_nan=False)


def test_results_for_an_unknown_arm_or_seed_or_twice_the_same_child_are_refused() -> None:
    s = five_seed_sweep()
    with pytest.raises(ValueError, match="unknown arm"):
        report(s, [{"arm": "nope", "seed": 0, "state": "queued"}])
    with pytest.raises(ValueError, match="seed 9"):
        report(s, [{"arm": "baseline", "seed": 9, "state": "queued"}])
    with pytest.raises(ValueError, match="two child results"):
        report(s, [{"arm": "baseline", "seed": 0, "state": "queued"}] * 2)


def test_on_pure_noise_the_interval_excludes_zero_about_five_percent_of_the_time() -> None:
    # Why the interval is the union with the t interval: at 3 seeds the percentile
    # bootstrap alone is [min, max] of the differences, which excludes 0 whenever all
    # three share a sign (a quarter of the time on pure noise).
    rng = np.random.default_rng(7)
    trials, union, boot_only = 400, 0, 0
    for _ in range(trials):
        ci = mean_interval(rng.standard_normal(3), confidence=0.95, resamples=2000)
        assert ci.low is not None and ci.high is not None and ci.bootstrap is not None
        union += not ci.low <= 0 <= ci.high
        boot_only += not ci.bootstrap[0] <= 0 <= ci.bootstrap[1]
    assert union / trials < 0.1
    assert boot_only / trials > 0.15
