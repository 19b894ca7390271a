"""A realistic synthetic ``excise-audit/1`` report, for the report and ledger tests.

The numbers are drawn from a seeded generator but keep the relations a real audit has:
the base model is confident on the forget set, the unlearned model is much less so and
close to the reference, forget quality is a real two-sample KS p-value on the truth ratios,
AUCs are computed from the attack scores with their ROC curves, model utility is the
harmonic mean of its components, relearning's recovered fraction follows from its
probabilities, and the headline repeats the sections. Flags remove what an audit run
without a reference model, a holdout split, the optional splits or relearning would lack.
``nasty`` is written into ids, prompts, completions, a model path, a module name and a
reason, to test escaping.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

ROLES = ("before", "after", "reference")
XSS = '<script>window.__x=1</script><img src=x onerror="window.__x=2">'


def sample_report(
    *,
    seed: int = 0,
    reference: bool = True,
    holdout: bool = True,
    optional_splits: bool = True,
    relearning: bool = True,
    nasty: str | None = None,
) -> dict:
    """A report dict that follows the schema exactly (see the module docstring)."""
    rng = np.random.default_rng(seed)
    roles = ROLES if reference else ROLES[:2]
    sizes = {"forget": 40, "retain": 80}
    if optional_splits:
        sizes |= {"neighbor": 30, "world": 30}
    if holdout:
        sizes["holdout"] = 40
    metrics = {s: {r: _split_metrics(rng, s, r, n) for r in roles} for s, n in sizes.items()}
    metrics.pop("holdout", None)
    if optional_splits:  # world facts without perturbed answers: the truth ratio is missing
        for role in roles:
            metrics["world"][role]["truth_ratio"] = {
                "value": None,
                "per_example": [],
                "reason": f"no perturbed_completions in the world split{nasty or ''}",
            }
    shift = {
        s: _shift(rng, s, sizes[s], nasty)
        for s in ("forget", "retain", "neighbor", "world")
        if s in sizes
    }
    parameters = _parameters(rng, nasty)
    utility = {r: _utility(metrics, r) for r in roles}
    report = {
        "schema": "excise-audit/1",
        "excise_version": "0.1.0",
        "created_utc": "2026-11-26T19:30:00Z",
        "models": {
            "before": {"path": "/data/models/base", "fingerprint": _hex(rng)},
            "after": {"path": f"/runs/unlearned{nasty or ''}/model", "fingerprint": _hex(rng)},
            "reference": {"path": "/data/models/reference", "fingerprint": _hex(rng)}
            if reference
            else None,
        },
        "splits": {s: {"n": n, "sha256": _hex(rng)} for s, n in sizes.items()},
        "warnings": [
            f"2 of the 40 forget records are also in the retain split (e.g. {nasty or 'f1'!r}): "
            "they are asked to be forgotten and kept at once"
        ],
        "metrics": metrics,
        "forget_quality": {r: _forget_quality(metrics, r, reference) for r in ("before", "after")},
        "model_utility": utility,
        "membership": _membership(rng, roles, holdout),
        "shift": shift,
        "parameters": parameters,
        "relearning": _relearning() if relearning else _no_relearning(nasty),
        "forget_quality_null": _null(rng, reference, holdout),
    }
    report["headline"] = _headline(report)
    return report


# --- metrics


_PROBABILITY = {  # mean answer probability per (split kind, role)
    ("forget", "before"): 0.9,
    ("forget", "after"): 0.15,
    ("forget", "reference"): 0.1,
}


def _split_metrics(rng: np.random.Generator, split: str, role: str, n: int) -> dict:
    kind = "forget" if split == "forget" else "other"
    centre = _PROBABILITY.get((kind, role), 0.05 if split == "holdout" else 0.8)
    if split != "forget" and role == "after":
        centre -= 0.03
    probability = np.clip(rng.normal(centre, 0.08, n), 1e-4, 1)
    rouge = np.clip(probability + rng.normal(0, 0.05, n), 0, 1)
    memorization = np.clip(probability + rng.normal(0.02, 0.04, n), 0, 1)
    extraction = np.clip(probability - rng.normal(0.05, 0.04, n), 0, 1)
    # R = P(perturbed) / P(paraphrased): small when the model knows the answer.
    log_r = rng.normal(math.log(0.15) if centre > 0.5 else math.log(0.9), 0.6, n)
    ratio = np.exp(log_r)
    truth = np.minimum(ratio, 1 / ratio) if split == "forget" else np.maximum(0.0, 1 - ratio)
    return {
        "probability": _metric(probability),
        "rouge_l_recall": _metric(rouge),
        "truth_ratio": {"value": float(truth.mean()), "per_example": ratio.tolist()},
        "exact_memorization": _metric(memorization),
        "extraction_strength": _metric(extraction),
    }


def _metric(values: np.ndarray) -> dict:
    return {"value": float(values.mean()), "per_example": values.tolist()}


def _forget_quality(metrics: dict, role: str, reference: bool) -> dict:
    forget = metrics["forget"]
    n = len(forget[role]["truth_ratio"]["per_example"])
    if not reference:
        return {
            "available": False,
            "p_value": None,
            "ks_statistic": None,
            "n": n,
            "n_reference": 0,
            "reason": "no reference model",
        }
    mine, theirs = forget[role]["truth_ratio"]["per_example"], forget["reference"]["truth_ratio"]
    test = stats.ks_2samp(mine, theirs["per_example"])
    return {
        "available": True,
        "p_value": float(test.pvalue),
        "ks_statistic": float(test.statistic),
        "n": n,
        "n_reference": len(theirs["per_example"]),
        "reason": None,
    }


def _utility(metrics: dict, role: str) -> dict:
    components = {
        f"{split}/{name}": per_role[role][name]["value"]
        for split, per_role in metrics.items()
        if split != "forget"
        for name in ("probability", "rouge_l_recall", "truth_ratio")
        if per_role[role][name]["value"] is not None
    }
    value = len(components) / sum(1 / v for v in components.values())
    return {"value": value, "components": components}


# --- membership inference


def _membership(rng: np.random.Generator, roles: tuple[str, ...], holdout: bool) -> dict:
    if not holdout:
        return {"available": False, "reason": "no holdout split", "privleak": None}
    separation = {"before": 1.6, "after": 0.3, "reference": 0.05}
    section: dict = {"available": True, "reason": None}
    for role in roles:
        attacks = {}
        for i, name in enumerate(("loss", "zlib", "min_k", "min_k_plus_plus")):
            members = rng.normal(separation[role] * (1 - 0.1 * i), 1.0, 40)
            non_members = rng.normal(0.0, 1.0, 40)
            attacks[name] = _roc(members, non_members)
        section[role] = {"attacks": attacks}
    if "reference" in roles:
        section["privleak"] = {
            role: {a: _privleak(section, role, a) for a in section[role]["attacks"]}
            for role in ("before", "after")
        }
    else:
        section["privleak"] = None
    return section


def _roc(members: np.ndarray, non_members: np.ndarray) -> dict:
    """ROC (members positive, higher score = member) and its AUC by the trapezoid rule."""
    scores = np.concatenate([members, non_members])
    labels = np.concatenate([np.ones_like(members), np.zeros_like(non_members)])
    order = np.argsort(-scores, kind="stable")
    tpr = np.concatenate([[0.0], np.cumsum(labels[order]) / labels.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(1 - labels[order]) / (1 - labels).sum()])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return {"auc": auc, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def _privleak(section: dict, role: str, attack: str) -> float:
    auc, ref = (
        section[role]["attacks"][attack]["auc"],
        section["reference"]["attacks"][attack]["auc"],
    )
    return ((1 - auc) - (1 - ref)) / (1 - ref) * 100  # MUSE's


# --- knowledge shift


def _shift(rng: np.random.Generator, split: str, n: int, nasty: str | None) -> dict:
    scale = {"forget": 3.0, "neighbor": 0.5, "retain": 0.2, "world": 0.1}[split]
    centre = -4.0 if split == "forget" else -0.1 * scale
    change = rng.normal(centre, scale, n)
    kl = np.abs(rng.normal(0, 0.05 * scale, n)) + 1e-4
    top = np.argsort(-np.abs(change), kind="stable")[:10]
    examples = []
    for rank, i in enumerate(top):
        extra = nasty if nasty is not None and rank == 0 else ""
        examples.append(
            {
                "id": f"{split}-{i:04d}{extra}",
                "prompt": f"Where was person {i} of the {split} split born?{extra}",
                "completion": f"Person {i} was born in Town {i % 7}.{extra}",
                "log_prob_change": float(change[i]),
                "kl": float(kl[i]),
            }
        )
    return {
        "n": n,
        "log_prob_change": {**_summary(rng, change), "median": float(np.median(change))},
        "kl": _summary(rng, kl),
        "most_shifted": examples,
    }


def _summary(rng: np.random.Generator, values: np.ndarray) -> dict:
    means = [rng.choice(values, values.size).mean() for _ in range(200)]  # bootstrap
    return {
        "mean": float(values.mean()),
        "ci_low": float(np.quantile(means, 0.025)),
        "ci_high": float(np.quantile(means, 0.975)),
        "per_example": values.tolist(),
    }


# --- parameters, relearning, headline


def _parameters(rng: np.random.Generator, nasty: str | None) -> dict:
    hidden, inner, vocab, layers = 64, 172, 500, 4
    shapes = {"model.embed_tokens.weight": (None, vocab * hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = (layer, hidden * hidden)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            shapes[f"{prefix}.mlp.{proj}.weight"] = (layer, hidden * inner)
        shapes[f"{prefix}.input_layernorm.weight"] = (layer, hidden)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (layer, hidden)
    shapes[f"model.norm.weight{nasty or ''}"] = (None, hidden)
    shapes["lm_head.weight"] = (None, vocab * hidden)
    modules = []
    for name, (layer, numel) in shapes.items():
        edited = layer in (1, 2) and ".mlp." in name
        changed = int(numel * rng.uniform(0.02, 0.1)) if edited else 0
        modules.append(
            {
                "name": name,
                "layer": layer,
                "numel": numel,
                "changed": changed,
                "fraction_changed": changed / numel,
                "l2": float(rng.uniform(0.01, 0.2)) if changed else 0.0,
                "identical": changed == 0,
            }
        )
    return {
        "total_tensors": len(modules),
        "identical_tensors": sum(m["identical"] for m in modules),
        "total_parameters": sum(m["numel"] for m in modules),
        "changed_parameters": sum(m["changed"] for m in modules),
        "modules": modules,
    }


def _relearning() -> dict:
    before, after, relearned = 0.9, 0.15, 0.45
    return {
        "available": True,
        "reason": None,
        "steps": 10,
        "n_relearn": 10,
        "n_eval": 30,
        "probability": {"before": before, "after": after, "relearned": relearned},
        "recovered_fraction": (relearned - after) / (before - after),
    }


def _no_relearning(nasty: str | None) -> dict:
    reason = f"relearning was not requested (--relearn-steps 0){nasty or ''}"
    return {
        "available": False,
        "reason": reason,
        "steps": 0,
        "n_relearn": 0,
        "n_eval": 0,
        "probability": None,
        "recovered_fraction": None,
    }


def _null(rng: np.random.Generator, reference: bool, holdout: bool) -> dict:
    """The perfect-stranger null of D (analysis.calibration.stranger_null's schema)."""
    if not holdout:
        return {"available": False, "reason": "no holdout split (the strangers' names)"}
    d = sorted(float(x) for x in rng.uniform(0.1, 0.35, 20))
    return {
        "available": True,
        "draws": 20,
        "d": d,
        "median": float(np.median(d)),
        "p90": float(np.quantile(d, 0.9)),
        "after_d": 0.3,
        "after_percentile": float(np.mean(np.asarray(d) <= 0.3)),
        "within_p90": float(np.quantile(d, 0.9)) >= 0.3,
        "target": "reference" if reference else "holdout",
    }


def _headline(report: dict) -> dict:
    forget, params = report["metrics"]["forget"], report["parameters"]
    reference = forget.get("reference")
    shift = report["shift"]
    return {
        "forget_quality": report["forget_quality"]["after"]["p_value"],
        "forget_probability_before": forget["before"]["probability"]["value"],
        "forget_probability_after": forget["after"]["probability"]["value"],
        "forget_probability_reference": reference["probability"]["value"] if reference else None,
        "model_utility_before": report["model_utility"]["before"]["value"],
        "model_utility_after": report["model_utility"]["after"]["value"],
        "neighbor_log_prob_change": shift["neighbor"]["log_prob_change"]["mean"]
        if "neighbor" in shift
        else None,
        "retain_log_prob_change": shift["retain"]["log_prob_change"]["mean"],
        "changed_parameters_fraction": params["changed_parameters"] / params["total_parameters"],
        "identical_tensors": params["identical_tensors"],
        "total_tensors": params["total_tensors"],
        "forget_quality_d": report["forget_quality_null"].get("after_d"),
        "forget_quality_null_p90": report["forget_quality_null"].get("p90"),
        "privleak": ((report["membership"].get("privleak") or {}).get("after") or {}).get("min_k"),
    }


def _hex(rng: np.random.Generator) -> str:
    return bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex()
