"""The ``excise`` command line.

Each subcommand parses its arguments, calls the libraries and prints what it did. Bad
input (:class:`~excise.errors.BadInputError`), and a disk or folder that refuses a write
(no permission, read-only, full), print one line and exit with code 2 (what was being
written is removed); any other exception is a bug and exits with code 1 with its
traceback. Heavy imports
(torch, transformers) happen inside the commands, so ``excise --version`` and reusing a
built world take well under a second.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from excise import __version__

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
# the user's paths or disk, not a bug: no permission, read-only, full, over quota or size limit
STORAGE_ERRORS = frozenset(
    (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
)
LIBRARY_LOGGERS = ("excise", "attribution", "unlearn", "analysis")
FORGET_GUARD = 288  # guard-set size of excise forget (benchmarks/results/stranger_guard288.md)
GUARD_CHOICES = ("random", "influence")  # random first: influence did not beat it
TRUTH_QUESTIONS = ("original", "paraphrased")  # analysis.truth.QUESTIONS, default first
GUARD_HOW = {"random": "drawn at random", "influence": "predicted to be damaged most"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _configure_logging(quiet=args.quiet)
    from attribution.errors import InputError  # imports torch: not before --version
    from excise.distributed import joined, runs_on_this_rank

    speaks = True  # under torchrun only rank 0 prints (excise.distributed)
    try:
        with joined(args.command, getattr(args, "device", None)) as speaks:
            if not runs_on_this_rank(args.command):
                return EXIT_OK  # rank 0 runs this command alone
            args.quiet = args.quiet or not speaks
            return args.handler(args)
    except InputError as err:  # every layer's user-input errors
        if speaks:
            print(f"excise {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # the user's disk or permissions refusing a write: one line
        message = storage_error(err)
        if message is None:
            raise
        if speaks:
            print(f"excise {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"excise {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (excise ledger list | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERNAL


def storage_error(err: BaseException) -> str | None:
    """One line for an error of the user's disk or permissions (see ``STORAGE_ERRORS``),
    raised as an ``OSError`` or by a writer that reports ``(os error N)`` (safetensors);
    None for anything else.

    >>> storage_error(OSError(errno.ENOSPC, "No space left on device", "/out/model"))
    '/out/model: No space left on device'
    >>> storage_error(RuntimeError("I/O error: File too large (os error 27)"))
    'cannot write the output: File too large'
    >>> storage_error(ValueError("something else")) is None
    True
    """
    if isinstance(err, OSError):
        if err.errno not in STORAGE_ERRORS:
            return None
        return f"{err.filename}: {err.strerror}" if err.filename else str(err.strerror)
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None or int(found.group(1)) not in STORAGE_ERRORS:
        return None
    return f"cannot write the output: {os.strerror(int(found.group(1)))}"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the named command's options are built in full.

    The unlearning and attribution options come from the libraries' dataclasses (which
    import torch), so ``excise --version`` and ``excise world`` skip building them.
    """

    def full(command: str) -> bool:
        return argv is None or command in argv

    parser = _Parser(
        prog="excise",
        description="Attribute, scope, forget, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"excise {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    common.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    world = commands.add_parser(
        "world", parents=[common], help="build the embedded default world (data + tiny models)"
    )
    world.add_argument(
        "--size",
        choices=("tiny", "default", "large"),
        default="default",
        help="tiny: for tests, seconds; default: for the demo, a few minutes; large: a model "
        "of GPT-2 small's shape, for a GPU",
    )
    world.add_argument(
        "--device", default="cpu", help="where the models are trained: cpu, cuda, cuda:1 ..."
    )
    world.add_argument("--out", help="folder to build into (default: the cache, $EXCISE_HOME)")
    world.set_defaults(handler=_run_world)

    attr = commands.add_parser(
        "attribute",
        parents=[common],
        help="factors + influence scores + top-k proponents/opponents per query",
    )
    if full("attribute"):
        _add_attribute_arguments(attr)
    attr.set_defaults(handler=_run_attribute)

    unl = commands.add_parser(
        "unlearn",
        parents=[common],
        help="scope selection + unlearning; writes a new model folder + manifest",
    )
    if full("unlearn"):
        _add_unlearn_arguments(unl)
    unl.set_defaults(handler=_run_unlearn)

    aud = commands.add_parser(
        "audit",
        parents=[common],
        help="compare a model before/after: forget efficacy, utility, shift, MIA, robustness",
    )
    _add_audit_arguments(aud)
    aud.set_defaults(handler=_run_audit)

    _add_ledger_parser(commands, common)

    idx = commands.add_parser(
        "index",
        parents=[common],
        help="a compressed gradient index of a training set, for fast repeated queries",
    )
    if full("index"):
        _add_index_arguments(idx)
    idx.set_defaults(handler=_run_index)

    fgt = commands.add_parser(
        "forget",
        parents=[common],
        help="the main job, end to end: attribute -> scope -> unlearn -> audit -> ledger",
    )
    if full("forget"):
        _add_forget_arguments(fgt)
    fgt.set_defaults(handler=_run_forget)
    return parser


def _run_world(args: argparse.Namespace) -> int:
    from excise.world import PRESETS, build_world

    settings = PRESETS[args.size](seed=args.seed)

    def note(message: str) -> None:
        if not args.quiet:
            print(f"excise world: {message}", file=sys.stderr)

    device = args.device
    if device != "cpu":  # checked (imports torch: reusing a built world stays instant)
        from excise.models import choose_device

        device = str(choose_device(device))
    folder, built = build_world(
        settings, out=args.out, progress=False if args.quiet else None, note=note, device=device
    )
    if not args.quiet:
        verb = "built" if built else "reused"
        print(f"excise world: {verb} the {args.size} world", file=sys.stderr)
    print(folder)
    return EXIT_OK


def _add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM folder")
    parser.add_argument("--train", required=True, help="training examples (JSONL/CSV/Parquet/...)")
    parser.add_argument("--query", required=True, help="query examples whose behaviour to explain")
    parser.add_argument("--out", required=True, help="output folder (created; reused on rerun)")
    from excise.commands.attribute import add_curvature_options

    add_curvature_options(parser)
    parser.add_argument(
        "--modules",
        nargs="+",
        help="module names, or one regex (default: every Linear/Conv1D in the blocks, and the "
        "output head when it has at most 8192 outputs)",
    )
    parser.add_argument("--factors", help="reuse factors fitted before (a factors folder)")
    parser.add_argument(
        "--partitions",
        type=int,
        help="save factors and scores in N parts of the training set as each is finished, so "
        "that a killed run resumes from them (default: one part per 1024 examples)",
    )
    parser.add_argument(
        "--index",
        metavar="DIR",
        help="score with a gradient index built by excise index for this model and --train "
        "(one matrix product instead of a pass over the training data)",
    )
    parser.add_argument(
        "--ensemble",
        nargs="+",
        metavar="MODEL",
        help="more models of the same architecture (other seeds or checkpoints): top-k from the "
        "mean of every model's scores (OUT/scores/ensemble.safetensors); each costs a factor "
        "fit and a scoring pass",
    )
    parser.add_argument("--per-token", action="store_true", help="also save per-token scores")
    parser.add_argument("--per-module", action="store_true", help="also save per-module scores")
    parser.add_argument(
        "--self",
        dest="self_influence",
        action="store_true",
        help="also save self-influence of the training set",
    )
    parser.add_argument("--top-k", type=int, help="proponents and opponents per query (default 5)")
    parser.add_argument("--query-rank", type=int, help="rank-r approximation of query gradients")
    parser.add_argument(
        "--cg-iterations",
        type=int,
        default=0,
        help="solve each query's (G + λI) x = ∇ℓ(q) with the exact curvature of the training "
        "set by conjugate gradient, preconditioned by the factors (EK-FAC: EK-FAC-preconditioned "
        "CG; identity: plain CG) and started from their solution; one training pass per "
        "iteration (default 0: the factors' solution)",
    )
    parser.add_argument(
        "--cg-curvature",
        choices=("fisher", "hessian"),
        default="fisher",
        help="the exact matrix --cg-iterations solves with: fisher (the factors' own) or "
        "hessian (of the mean training loss; may be indefinite: few iterations) "
        "(default: fisher)",
    )
    parser.add_argument(
        "--choose-damping",
        action="store_true",
        help="choose λ on data among multiples of each module's mean eigenvalue: the one whose "
        "scores best predict the queries' loss change when the model is fine-tuned on random "
        "halves of the training set (no retraining; costs perturbations × steps optimizer "
        "steps; written to OUT/damping.json)",
    )
    from excise.commands.attribute import add_search_options

    add_search_options(parser)
    _add_pass_options(parser)


def _add_pass_options(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --max-length and --device of the commands that pass over data."""
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per pass (default 16)"
    )
    parser.add_argument("--max-length", type=int, help="truncate sequences to this many tokens")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ..."
    )


def _run_attribute(args: argparse.Namespace) -> int:
    from excise.commands import attribute

    result = attribute.run(args)
    if not args.quiet:
        print(
            f"excise attribute: {result['queries']} queries x {result['train']} training "
            "examples; strongest proponent of each query:",
            file=sys.stderr,
        )
        for row in result["rows"][:10]:
            best = row["proponents"][0]
            print(f"  {row['query_id']}: {best['id']} ({best['score']:.4g})", file=sys.stderr)
        if result.get("damping_choice"):
            print(f"  damping search: {result['damping_choice']}", file=sys.stderr)
    print(result["out"])
    return EXIT_OK


def _add_index_arguments(parser: argparse.ArgumentParser) -> None:
    from excise.commands.attribute import add_curvature_options
    from excise.commands.index import add_index_options

    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM folder")
    parser.add_argument("--train", required=True, help="training examples (JSONL/CSV/Parquet/...)")
    parser.add_argument(
        "--out", required=True, help="output folder (created; a rerun resumes the build)"
    )
    parser.add_argument("--factors", help="reuse factors fitted before (a factors folder)")
    add_index_options(parser)
    add_curvature_options(parser)
    parser.add_argument(
        "--modules",
        nargs="+",
        help="module names, or one regex (default: as excise attribute's)",
    )
    _add_pass_options(parser)


def _run_index(args: argparse.Namespace) -> int:
    from excise.commands import index

    result = index.run(args)
    if not args.quiet:
        print(
            f"excise index: {result['examples']} examples, {result['modules']} modules, "
            f"{result['floats']} stored floats per example, {result['seconds']:.1f} s",
            file=sys.stderr,
        )
    print(result["out"])
    return EXIT_OK


def _add_unlearn_arguments(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """The unlearning options, from the libraries' argument dataclasses (``data``: also
    --model/--forget/--retain/--out); the method's defaults from :mod:`excise.recipes`."""
    from excise.commands.unlearn import add_edit_options

    if data:
        parser.add_argument("--model", required=True, help="local Hugging Face causal-LM folder")
        parser.add_argument("--forget", required=True, help="the examples to forget")
        parser.add_argument("--retain", required=True, help="examples whose knowledge to keep")
        parser.add_argument(
            "--holdout",
            help="records about entities the model never saw: distill's stranger names "
            "and the calibrated stop's target",
        )
        parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--factors", help="reuse EK-FAC factors fitted for this model")
    parser.add_argument(
        "--reference", help="a model retrained without the forget set: stop at its forget loss"
    )
    add_edit_options(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _run_unlearn(args: argparse.Namespace) -> int:
    from excise.commands import unlearn
    from excise.errors import WARNING

    def note(message: str) -> None:
        if not args.quiet or message.startswith(WARNING):  # warnings show even when quiet
            print(f"excise unlearn: {message}", file=sys.stderr)

    manifest = unlearn.run(args, note)
    if not args.quiet:
        result, scope, proof = manifest["result"], manifest["scope"], manifest["proof"]
        start, end = result["history"][0], result["history"][-1]
        print(
            f"excise unlearn: {manifest['method']} in the {scope['method']} scope, "
            f"{scope['edited']:,} of {scope['total']:,} parameters ({scope['fraction']:.2%}); "
            f"{result['steps_run']} steps, stopped by {result['stopped']}",
            file=sys.stderr,
        )
        print(
            f"  forget loss {start['forget_loss']:.3f} -> {end['forget_loss']:.3f}, "
            f"retain loss {start['retain_loss']:.3f} -> {end['retain_loss']:.3f} (nats/token); "
            f"{proof['out_of_scope_identical']}/{proof['out_of_scope_tensors']} out-of-scope "
            "tensors bit-identical",
            file=sys.stderr,
        )
    print(manifest["out"])
    return EXIT_OK


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The models, the split files, --out and the audit's options."""
    parser.add_argument("--before", required=True, help="the model before unlearning")
    parser.add_argument("--after", required=True, help="the model after unlearning")
    parser.add_argument(
        "--reference", help="a model retrained without the forget set (forget quality, privleak)"
    )
    parser.add_argument("--forget", required=True, help="the examples that were forgotten")
    parser.add_argument("--retain", required=True, help="examples whose knowledge to keep")
    parser.add_argument("--neighbor", help="out of scope but close to the forget set")
    parser.add_argument(
        "--real-authors",
        dest="real_authors",
        help="real people's facts (TOFU's real authors: with --retain and --world, model "
        "utility is TOFU's 9 components)",
    )
    parser.add_argument("--world", help="general knowledge (model utility)")
    parser.add_argument("--holdout", help="never trained on (membership inference)")
    parser.add_argument(
        "--out", required=True, help="output folder (created; an earlier audit is replaced)"
    )
    _add_relearn_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="sequences per pass (default 32)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _add_relearn_arguments(parser: argparse.ArgumentParser) -> None:
    """The audit's options shared with excise forget: the relearning probe's
    (analysis.relearning's STEPS and LEARNING_RATE) and the truth ratio's question."""
    parser.add_argument(
        "--truth-question",
        choices=TRUTH_QUESTIONS,
        default=TRUTH_QUESTIONS[0],
        help="the question the truth ratio scores its answers after: original (TOFU's, even "
        "when a reworded question exists) or paraphrased (the record's paraphrased_prompt) "
        "(default: original)",
    )
    parser.add_argument(
        "--relearn-steps",
        type=int,
        default=10,
        help="fine-tuning steps of the relearning probe; 0 skips it (default 10)",
    )
    parser.add_argument(
        "--relearn-lr", type=float, default=1e-3, help="its learning rate (default 1e-3)"
    )


def _run_audit(args: argparse.Namespace) -> int:
    from analysis.report import headline_rows
    from excise.commands import audit

    result = audit.run(args)
    if not args.quiet:
        print(f"excise audit: {result['paths'].html}", file=sys.stderr)
        for measure, value, _ in headline_rows(result["report"]):
            print(f"  {measure}: {value}", file=sys.stderr)
    print(result["out"])
    return EXIT_OK


def _add_ledger_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``excise ledger list | show ID | verify [RUN_DIR...] | record RUN_DIR``, each with
    --ledger PATH."""
    ledger = commands.add_parser(
        "ledger", help="the deletion requests processed so far and their evidence"
    )
    actions = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    where = _Parser(add_help=False)
    where.add_argument("--ledger", help="the ledger file (default: $EXCISE_HOME/ledger.sqlite)")
    listing = actions.add_parser(
        "list", parents=[common, where], help="one line per request, oldest first"
    )
    listing.add_argument("--json", action="store_true", help="JSON lines, every field")
    show = actions.add_parser("show", parents=[common, where], help="every field of one request")
    show.add_argument("id", help="the request id (see excise ledger list)")
    show.add_argument("--json", action="store_true", help="as JSON")
    verify = actions.add_parser(
        "verify",
        parents=[common, where],
        help="check the hash chain, the head file, and excise forget run folders' rows",
    )
    verify.add_argument(
        "runs", nargs="*", metavar="RUN_DIR", help="excise forget output folders to check"
    )
    record = actions.add_parser(
        "record",
        parents=[common, where],
        help="add the row of a finished excise forget run that has none (a run stopped "
        "before recording); a recorded run is not added twice",
    )
    record.add_argument("run_dir", metavar="RUN_DIR", help="the excise forget output folder")
    ledger.set_defaults(handler=_run_ledger)


def _run_ledger(args: argparse.Namespace) -> int:
    from excise.commands import ledger

    return ledger.run(args)


def _add_forget_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the data come from (nothing: the embedded world), then the unlearning options."""
    parser.add_argument("--model", help="local Hugging Face causal-LM folder (default: the world)")
    parser.add_argument("--forget", help="the examples to forget")
    parser.add_argument("--retain", help="examples whose knowledge to keep")
    parser.add_argument(
        "--train", help="the training set to attribute over (default: forget + retain)"
    )
    parser.add_argument("--neighbor", help="out of scope but close to the forget set (audit)")
    parser.add_argument(
        "--real-authors",
        dest="real_authors",
        help="real people's facts (audit: with --retain and --world, TOFU's model utility)",
    )
    parser.add_argument("--world", help="general knowledge (audit: model utility)")
    parser.add_argument("--holdout", help="never trained on (audit: membership inference)")
    parser.add_argument(
        "--size",
        choices=("tiny", "default", "large"),
        default="default",
        help="the embedded world used when no data are named (default: default; large: "
        "build it first with excise world --size large --device cuda)",
    )
    parser.add_argument(
        "--out", help="output folder, must not exist (default: $EXCISE_HOME/runs/forget-TIME)"
    )
    parser.add_argument("--ledger", help="the ledger file (default: $EXCISE_HOME/ledger.sqlite)")
    parser.add_argument(
        "--guard",
        type=int,
        default=FORGET_GUARD,
        help="add N training examples outside the forget set to the retain set, chosen by "
        f"--guard-by (default: {FORGET_GUARD}; 0: none)",
    )
    parser.add_argument(
        "--guard-by",
        choices=GUARD_CHOICES,
        default=GUARD_CHOICES[0],
        help="random: drawn at random (seeded); influence: those the edit is predicted to "
        "damage most. Measured: either cuts neighbour damage; influence did not beat random "
        "(benchmarks/results/stranger.md, stranger_guard288.md) (default: random)",
    )
    parser.add_argument(
        "--expand",
        action="store_true",
        help="also forget the closure: training examples that support a forget record's "
        "answer as strongly as the record itself (near-duplicates, paraphrases)",
    )
    _add_unlearn_arguments(parser, data=False)
    _add_relearn_arguments(parser)


def _run_forget(args: argparse.Namespace) -> int:
    from analysis.report import headline_rows
    from excise.commands import forget
    from excise.errors import WARNING

    def note(message: str) -> None:
        if not args.quiet or message.startswith(WARNING):  # warnings show even when quiet
            print(f"excise forget: {message}", file=sys.stderr)

    summary = forget.run(args, note)
    if summary is None:  # under torchrun: a rank other than 0, its share done
        return EXIT_OK
    attribution, unlearning = summary["attribution"], summary["unlearning"]
    scope = unlearning["scope"]
    print(
        f"attribution: {attribution['precision']:.0%} of the top-{attribution['top_k']} "
        f"proponents of the forget records are forget records (chance "
        f"{attribution['chance']:.0%})"
    )
    print(
        f"unlearning: {unlearning['method']} in the {scope['method']} scope, "
        f"{scope['edited']:,} of {scope['total']:,} parameters; {unlearning['steps_run']} "
        f"steps ({unlearning['stopped']}); {unlearning['out_of_scope_identical']}/"
        f"{unlearning['out_of_scope_tensors']} out-of-scope tensors bit-identical"
    )
    guard = attribution["guard"]
    if guard["n"]:
        splits = ", ".join(f"{n} {name}" for name, n in sorted(guard["by_split"].items()))
        how = GUARD_HOW[guard.get("by", "influence")]
        print(f"guard: {guard['n']} training examples {how} added to the retain set ({splits})")
    closure = attribution["closure"]
    if closure.get("n"):
        verb = "added to the forget set" if summary["expanded"] else "reported (--expand adds them)"
        print(f"closure: {closure['n']} training examples carry the forget set's facts; {verb}")
    seen = {s: f["spearman"] for s, f in summary["report"]["foresight"].items() if f["spearman"]}
    if seen:
        rho = ", ".join(f"{split} {value:.2f}" for split, value in seen.items())
        print(f"influence foresight (Spearman ρ, predicted damage vs observed loss rise): {rho}")
    rows = [(m, v) for m, v, _ in headline_rows(summary["report"])]
    width = max(len(m) for m, _ in rows)
    for measure, value in rows:
        print(f"  {measure:<{width}}  {value}")
    seconds = sum(summary["timings"].values())
    print(f"ledger: request {summary['ledger_id']} in {summary['ledger']} ({seconds:.0f} s)")
    print(f"report: {Path(summary['out']) / 'report.html'}")
    return EXIT_OK


def _configure_logging(quiet: bool) -> None:
    """Send the libraries' log records to stderr (never touches the root logger)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
