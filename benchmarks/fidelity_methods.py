"""The attribution methods compared by the fidelity benchmark, on identical models.

Every method takes a setting (``benchmarks.fidelity_settings``) and the models trained
on its full training set (``models[0]`` the one single-model methods use; ensembles use
them all) and returns scores [n_query, n_train] in excise's sign convention: positive
when training on z lowers the query's loss, score(q, z) ≈ ∇ℓ(q)ᵀ (G + λI)⁻¹ ∇ℓ(z).

- ``excise-<strategy>``: ``fit_factors`` + ``pairwise_scores`` with the empirical Fisher
  (the data's labels) and the default damping 0.1 × mean eigenvalue per module;
  ``excise-ekfac-true``: the same with the true Fisher (labels sampled from the model);
  ``excise-ekfac-ensemble``: the mean of ``excise-ekfac`` over every given model;
  ``excise-ekfac-lambda<p>`` / ``excise-ekfac-true-lambda<p>``: cheaper estimators, Λ
  fitted on a random p % of the training set (``lambda_fraction``; p = 10, 25, 50; seed 0)
  and ``…-lambda50-seed<k>`` on other random halves (k = 1, 2; with the true Fisher the
  seed also draws the sampled labels);
  ``excise-ekfac-bf16``: forward and backward passes under bfloat16 autocast;
  ``excise-ekfac-chosen``: EK-FAC at the damping chosen on data by
  ``attribution.damping_search`` (its defaults; ``excise attribute --choose-damping``).
- ``excise-ekfac-cg<k>``: EK-FAC scores refined by k iterations of EK-FAC-preconditioned
  conjugate gradient on the exact damped empirical Fisher (same damping);
  ``excise-cg20``: plain CG from zero on the same system, the control.
- ``kronfluence-ekfac``: kronfluence 1.0.1's EK-FAC, empirical Fisher, the same damping
  (``damping_factor=None``), float32, on a copy of the model.
- ``dattri-*``: dattri 0.3.0 with its defaults unless a default cannot run: TracIn on
  the final model (one checkpoint, weight 1, gradients randomly projected to 512
  dimensions as dattri does by default); DataInf (regularization 0.1, the value dattri
  falls back to for None; its default 0 divides by zero); TRAK with its default
  projection (512 dimensions) and regularization (0) on one model (``dattri-trak``) and
  on every given model (``dattri-trak-ensemble``); conjugate-gradient (``dattri-cg``) and
  Arnoldi (``dattri-arnoldi``) influence on the Hessian of the training loss, which
  dattri is given as one batch (its advice for accuracy), with the settings best in a
  sweep on digits (their docstrings), used on the world as well: dattri's defaults run
  badly or not at all (regularization 0, and the Hessian is indefinite; Arnoldi's
  ``proj_dim`` = ``max_iter`` = 100 keeps spurious and negative Ritz values and returns
  NaN). CG: 10 iterations, regularization 1e-2 (20 iterations do worse: the solve
  diverges on the indefinite system); Arnoldi: the top 400 eigenpairs of 800 iterations,
  regularization 1e-2. On the world, whose loss sums over tokens and examples (so the
  same regularization is relatively weaker), Arnoldi takes ~8 min and CG would take
  ~90 min (24 solves, ~220 s each; one holds 4 GB), past the method timeout. TRAK's
  model output is its own margin log p − log(1 − p) (p: the probability of the label,
  or of the whole completion), a decreasing function of the loss. dattri's attributors,
  CG and Arnoldi included (∇ℓ(z)ᵀ H⁻¹ ∇ℓ(q)), return [n_train, n_query] with positive =
  helpful (its LDS flips the ground truth, the loss, to match), so their scores are
  transposed, not negated; the report's correlation with excise's scores checks the
  sign. dattri's attributors run under ``torch.no_grad()`` (their ``torch.func``
  gradients are unaffected): without it their scores come back requiring grad, and
  DataInf's memory grows with the autograd graph it keeps (past 2.7 GB on the digits
  MLP, 16 GB on the tiny LM, before we stopped it).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 32
DATAINF_REGULARIZATION = 0.1  # dattri falls back to 0.1 for None; its default 0 divides by 0
CG_REGULARIZATION, CG_ITERATIONS = 1e-2, 10  # the best on digits (dattri_cg's docstring)
ARNOLDI_REGULARIZATION, ARNOLDI_PROJ_DIM, ARNOLDI_ITERATIONS = 1e-2, 400, 800  # likewise

Method = Callable[[Any, Sequence[nn.Module]], torch.Tensor]


# --- excise ----------------------------------------------------------------------------


def excise_scores(
    setting,
    model: nn.Module,
    strategy: str,
    fisher: str,
    cg: int = 0,
    preconditioned=True,
    **options: Any,
) -> torch.Tensor:
    """excise's pairwise scores [n_query, n_train] on one model (``cg`` iterations of
    conjugate gradient on the exact damped curvature; ``preconditioned`` by the factors;
    ``options``: other ``FactorArguments`` fields, ``autocast`` used for the scores too)."""
    from attribution import ScoreArguments

    factors = excise_factors(setting, model, strategy, fisher, **options)
    arguments = ScoreArguments(
        batch_size=BATCH_SIZE,
        cg_iterations=cg,
        cg_preconditioned=preconditioned,
        autocast=options.get("autocast", "none"),
    )
    return excise_pairwise(setting, model, factors, arguments)


def excise_factors(
    setting, model: nn.Module, strategy: str, fisher: str, modules=None, **options: Any
):
    """excise's factors of ``model`` on the setting's training set (``modules``: instead of
    the setting's; ``options``: other ``FactorArguments`` fields)."""
    from attribution import FactorArguments, fit_factors

    arguments = FactorArguments(
        strategy=strategy,
        fisher=fisher,
        modules=modules or setting.modules,
        batch_size=BATCH_SIZE,
        **options,
    )
    return fit_factors(model, setting.task, setting.train, arguments, progress=False)


def excise_pairwise(setting, model: nn.Module, factors, arguments) -> torch.Tensor:
    """Pairwise scores [n_query, n_train] of the setting's queries and training set."""
    from attribution import pairwise_scores

    scores = pairwise_scores(
        model, setting.task, setting.queries, setting.train, factors, arguments, progress=False
    )
    return scores.total.double()


def _excise(
    strategy: str, fisher: str = "empirical", cg: int = 0, preconditioned=True, **options: Any
) -> Method:
    return lambda setting, models: excise_scores(
        setting, models[0], strategy, fisher, cg, preconditioned, **options
    )


def excise_chosen_damping(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    """EK-FAC scores at the damping ``attribution.damping_search`` chooses on the training
    set and queries (its defaults; fine-tunes on random halves, no retraining)."""
    from attribution import ScoreArguments
    from attribution.damping_search import choose_damping

    model = models[0]
    factors = excise_factors(setting, model, "ekfac", "empirical")
    scoring = ScoreArguments(batch_size=BATCH_SIZE)
    choice = choose_damping(
        model, setting.task, setting.train, setting.queries, factors, scoring=scoring
    )
    arguments = ScoreArguments(batch_size=BATCH_SIZE, damping=choice.damping)
    return excise_pairwise(setting, model, factors, arguments)


def excise_ensemble(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    """The mean of EK-FAC scores over independently trained models."""
    return torch.stack([excise_scores(setting, m, "ekfac", "empirical") for m in models]).mean(0)


# --- kronfluence -----------------------------------------------------------------------


def kronfluence_ekfac(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    """kronfluence's EK-FAC scores [n_query, n_train] on a copy of ``models[0]``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    task = setting.kronfluence_task()
    model = prepare_model(deepcopy(models[0]).eval(), task)
    loader = DataLoaderKwargs(num_workers=0)
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float32,
        lambda_dtype=torch.float32,
    )
    score_args = ScoreArguments(
        damping_factor=None,  # 0.1 × mean(Λ) per module, as excise; its default is 1e-8
        per_sample_gradient_dtype=torch.float32,
        precondition_dtype=torch.float32,
        score_dtype=torch.float32,
    )
    train = setting.kronfluence_dataset("train")
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(
            "fidelity",
            model,
            task,
            cpu=True,
            output_dir=folder,
            disable_tqdm=True,
            log_level=logging.WARNING,
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=BATCH_SIZE,
            factor_args=factor_args,
            dataloader_kwargs=loader,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=setting.kronfluence_dataset("query"),
            train_dataset=train,
            per_device_query_batch_size=BATCH_SIZE,
            per_device_train_batch_size=BATCH_SIZE,
            score_args=score_args,
            dataloader_kwargs=loader,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("pairwise")["all_modules"].double()


# --- dattri ----------------------------------------------------------------------------


def _dattri_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode; a Hugging Face model with eager attention (``torch.func.vmap``
    has no batching rule for the CPU SDPA kernel and falls back to a slow loop)."""
    model = deepcopy(model).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model


def _dattri_task(setting, models: Sequence[nn.Module], loss: Callable | None = None):
    """dattri's task on a copy of ``models[0]``, with every model as a checkpoint;
    ``loss(params, example)`` (default: the setting's per-example loss) is also the target."""
    from dattri.task import AttributionTask

    model = _dattri_copy(models[0])
    checkpoints = [deepcopy(m.state_dict()) for m in models]
    loss = loss or setting.dattri_loss(model)
    return AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints), model


def _loaders(setting) -> tuple[DataLoader, DataLoader]:
    """Unshuffled loaders of the training and query tensors. (dattri's inner-product
    attributors give the loss each example with a leading dimension of 1, TRAK without:
    the settings' losses accept both.)"""
    train = DataLoader(TensorDataset(*setting.tensors("train")), batch_size=BATCH_SIZE)
    query = DataLoader(TensorDataset(*setting.tensors("query")), batch_size=BATCH_SIZE)
    return train, query


@torch.no_grad()  # dattri builds autograd graphs otherwise (see module docstring)
def dattri_tracin(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    from dattri.algorithm.tracin import TracInAttributor

    task, model = _dattri_task(setting, models[:1])
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.ones(1),
        normalized_grad=False,
        layer_name=setting.dattri_layers(model),
        device="cpu",
    )
    train, query = _loaders(setting)
    return attributor.attribute(train, query).T.double()


@torch.no_grad()  # dattri builds autograd graphs otherwise (see module docstring)
def dattri_datainf(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    from dattri.algorithm.influence_function import IFAttributorDataInf

    task, model = _dattri_task(setting, models[:1])
    attributor = IFAttributorDataInf(
        task=task,
        layer_name=setting.dattri_layers(model),
        device="cpu",
        regularization=DATAINF_REGULARIZATION,
    )
    train, query = _loaders(setting)
    attributor.cache(train)
    return attributor.attribute(train, query).T.double()


@torch.no_grad()  # dattri builds autograd graphs otherwise (see module docstring)
def _dattri_trak(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    from dattri.algorithm.trak import TRAKAttributor

    probe = _dattri_copy(models[0])
    per_example_loss = setting.dattri_loss(probe)

    def margin(params, data):  # TRAK's model output: log p − log(1 − p)
        log_p = -per_example_loss(params, data)
        return log_p - torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))

    def correct_probability(params, data):
        return torch.exp(-per_example_loss(params, data))

    task, model = _dattri_task(setting, models, loss=margin)
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=correct_probability,
        layer_name=setting.dattri_layers(model),
        device="cpu",
    )
    train, query = _loaders(setting)
    attributor.cache(train)
    return attributor.attribute(query).T.double()


def _full_batch(setting) -> DataLoader:
    """The training set as one batch: the loader CG and Arnoldi take their Hessian from
    (dattri's CG solves once per batch of it and sums the solutions)."""
    train = TensorDataset(*setting.tensors("train"))
    return DataLoader(train, batch_size=len(train))


@torch.no_grad()  # dattri builds autograd graphs otherwise (see module docstring)
def dattri_cg(
    setting,
    models: Sequence[nn.Module],
    regularization: float = CG_REGULARIZATION,
    max_iter: int = CG_ITERATIONS,
) -> torch.Tensor:
    """dattri's CG influence: ``max_iter`` iterations of conjugate gradient on
    (H + regularization·I) v = ∇ℓ(q) from v = ∇ℓ(q) (dattri's start), H the Hessian of the
    training loss on the whole training set as one batch (given batches, dattri solves
    once per batch and sums the solutions: "batched" below).

    LDS on digits (mean ± s.e. over 100 queries; seconds on one thread of a shared
    machine) as ``regularization:max_iter``: 0:10 (dattri's defaults) 0.319 ± 0.023, 76 s;
    1e-3:10 0.378 ± 0.022, 64 s; 1e-2:10 0.728 ± 0.010, 62 s; 1e-1:10 0.548 ± 0.017, 68 s;
    1e-3:20 0.542 ± 0.013, 123 s; 1e-2:20 0.475 ± 0.025, 118 s; 1e-1:20 0.548 ± 0.017,
    123 s; 3e-2:20 0.698 ± 0.012, 132 s; 1e-2:20 batched (32) 0.507 ± 0.024, 571 s.
    The Hessian is indefinite (a Ritz value −0.013 on digits), so at small regularization
    more iterations do worse: 10 stops early. dattri redoes each query batch's solve for
    every training batch (32 × 4 solves on digits; on the world 6 × 4 solves of ~220 s
    each, ~90 min, not run).
    """
    from dattri.algorithm.influence_function import IFAttributorCG

    task, model = _dattri_task(setting, models[:1])
    attributor = IFAttributorCG(
        task=task,
        layer_name=setting.dattri_layers(model),
        device="cpu",
        max_iter=max_iter,
        regularization=regularization,
    )
    train, query = _loaders(setting)
    attributor.cache(_full_batch(setting))
    return attributor.attribute(train, query).T.double()


@torch.no_grad()  # dattri builds autograd graphs otherwise (see module docstring)
def dattri_arnoldi(
    setting,
    models: Sequence[nn.Module],
    regularization: float = ARNOLDI_REGULARIZATION,
    proj_dim: int = ARNOLDI_PROJ_DIM,
    max_iter: int = ARNOLDI_ITERATIONS,
) -> torch.Tensor:
    """dattri's Arnoldi influence: the top ``proj_dim`` eigenpairs (by magnitude) of
    H + regularization·I from ``max_iter`` Arnoldi iterations (from a random start), H
    the Hessian of the training loss on the whole training set as one batch; scores
    ∇ℓ(z)ᵀ U Λ⁻¹ Uᵀ ∇ℓ(q).

    LDS on digits as ``regularization:proj_dim:max_iter`` (seconds as ``dattri_cg``):
    dattri's defaults 100:100 give NaN at 1e-3, 1e-2 and 1e-1; 1e-3:50:100 0.589 ± 0.017,
    4 s; 1e-2:50:100 0.581 ± 0.018, 1 s; 1e-1:50:100 0.471 ± 0.019, 1 s; 1e-3:100:200 and
    1e-3:200:400 NaN; 1e-2:100:200 0.659 ± 0.014, 2 s; 1e-1:100:200 0.504 ± 0.018, 2 s;
    1e-2:200:400 0.740 ± 0.010, 5 s; 1e-1:200:400 0.529 ± 0.017, 5 s; 3e-2:200:400
    0.661 ± 0.014, 4 s; 3e-3:200:400 NaN; 1e-2:400:800 0.775 ± 0.008, 15 s; 1e-2:800:1600
    0.783 ± 0.008, 46 s (+0.008 ± 0.001 paired, for 3× the time and twice the basis,
    max_iter × the parameters, in memory: the default stays 1e-2:400:800). The world at
    the default: 0.282 ± 0.019, 465 s, 2.5 GB. The NaN: dattri's float32 Krylov basis
    loses orthogonality (‖QQᵀ − I‖ 0.72 after 100 iterations on digits), so the smallest
    Ritz values are spurious, ±1e-8 even at regularization 0.1; when they, or the
    Hessian's negative eigenvalues left by a small regularization, are among the kept
    ones, dattri warns and lowers ``proj_dim`` but keeps them, and takes their inverse
    square roots.
    """
    from dattri.algorithm.influence_function import IFAttributorArnoldi

    task, model = _dattri_task(setting, models[:1])
    attributor = IFAttributorArnoldi(
        task=task,
        layer_name=setting.dattri_layers(model),
        device="cpu",
        proj_dim=proj_dim,
        max_iter=max_iter,
        regularization=regularization,
    )
    train, query = _loaders(setting)
    attributor.cache(_full_batch(setting))
    return attributor.attribute(train, query).T.double()


def dattri_trak(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    return _dattri_trak(setting, models[:1])


def dattri_trak_ensemble(setting, models: Sequence[nn.Module]) -> torch.Tensor:
    return _dattri_trak(setting, models)


# --- the registry ----------------------------------------------------------------------

METHODS: dict[str, Method] = {
    "excise-identity": _excise("identity"),
    "excise-diagonal": _excise("diagonal"),
    "excise-kfac": _excise("kfac"),
    "excise-ekfac": _excise("ekfac"),
    "excise-ekfac-true": _excise("ekfac", "true"),
    # cheaper estimators (issue 17): Λ on a random share (seed 0; the half also with
    # seeds 1 and 2, for the spread over shares); bfloat16 passes
    **{
        f"excise-ekfac{fisher}-lambda{percent}": _excise(
            "ekfac", fisher.lstrip("-") or "empirical", lambda_fraction=percent / 100
        )
        for fisher in ("", "-true")
        for percent in (10, 25, 50)
    },
    **{
        f"excise-ekfac{fisher}-lambda50-seed{seed}": _excise(
            "ekfac", fisher.lstrip("-") or "empirical", lambda_fraction=0.5, seed=seed
        )
        for fisher in ("", "-true")
        for seed in (1, 2)
    },
    "excise-ekfac-bf16": _excise("ekfac", autocast="bfloat16"),
    "excise-ekfac-chosen": excise_chosen_damping,
    "excise-ekfac-ensemble": excise_ensemble,
    "excise-ekfac-cg5": _excise("ekfac", cg=5),
    "excise-ekfac-cg20": _excise("ekfac", cg=20),
    "excise-cg20": _excise("ekfac", cg=20, preconditioned=False),  # plain CG, same system
    "kronfluence-ekfac": kronfluence_ekfac,
    "dattri-tracin": dattri_tracin,
    "dattri-datainf": dattri_datainf,
    "dattri-cg": dattri_cg,
    "dattri-arnoldi": dattri_arnoldi,
    "dattri-trak": dattri_trak,
    "dattri-trak-ensemble": dattri_trak_ensemble,
}
ENSEMBLES = {"excise-ekfac-ensemble", "dattri-trak-ensemble"}  # use every full-data model
PEERS = {name for name in METHODS if not name.startswith("excise")}
