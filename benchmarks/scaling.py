"""How ``excise attribute`` scales with the training set: wall time and peak memory.

``excise attribute`` (EK-FAC factors, then pairwise scores of a handful of queries) runs as
a user runs it, ``python -m excise attribute`` (or, with ``--nproc`` above 1,
``torchrun --standalone --nproc_per_node N -m excise attribute``), in a child process per
training-set size. Its wall time and peak resident memory (``ru_maxrss`` of that child,
from ``os.wait4``: the largest single process of its tree) are recorded.

The model is a randomly initialised tiny Llama (2 layers, width 64, the embedded world's
shape; attribution cost does not depend on the weights) saved as a Hugging Face folder with
a word-level tokenizer; the records are templated question/answer pairs of random words
(seed 0), written as JSON Lines, so the training set is read lazily (:mod:`excise.streaming`;
``--modes list`` forces the in-memory list instead, for comparison).

```
python -m benchmarks.scaling                            # N = 1k, 10k; 1 process (~5 min)
python -m benchmarks.scaling --sizes 1000,10000,100000  # 100k: slow on 2 cores
python -m benchmarks.scaling --nproc 1,2 --threads 2     # 1 process × 2 threads, 2 × 1
python -m benchmarks.scaling --modes stream,list        # also the in-memory list
```

Writes ``results/scaling.json``, ``scaling.md`` and ``scaling.png`` (``--results DIR``
elsewhere); scratch files go to ``cache/scaling/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE, RESULTS, cpu_snapshot, cpu_use, machine_info, write_report

SCRATCH = CACHE / "scaling"
N_QUERIES = 4
BATCH_SIZE = 32
WORDS = 400  # vocabulary of the templated records
TEMPLATES = (
    ("Where was {a} {b} born?", " {a} {b} was born in {c}."),
    ("What does {a} {b} do?", " {a} {b} works as a {c} in {d}."),
    ("Who wrote the {c} of {d}?", " The {c} of {d} was written by {a} {b}."),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="training-set sizes, comma-separated")
    parser.add_argument(
        "--nproc", default="1", help="processes, comma-separated (torchrun when above 1)"
    )
    parser.add_argument("--modes", default="stream", help="stream and/or list, comma-separated")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in all, shared among the processes (at least 1 each)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    process_counts = [int(p) for p in args.nproc.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"stream", "list"}:
        parser.error(f"--modes {args.modes}: use stream and/or list")
    machine = machine_info(threads=args.threads, peers=())  # its load average: at the start
    model = build_model(SCRATCH / "model")
    queries = write_records(SCRATCH / "queries.jsonl", N_QUERIES, seed=1)
    runs = []
    for n in sizes:
        train = write_records(SCRATCH / f"train-{n}.jsonl", n, seed=0)
        for mode in modes:
            for nproc in process_counts:
                threads = max(1, args.threads // nproc)
                run = attribute_run(model, train, queries, n, nproc, mode, threads)
                runs.append(run)
                print(json.dumps(run), file=sys.stderr)
    report = {
        "description": "excise attribute (EK-FAC factors + pairwise scores of "
        f"{N_QUERIES} queries), tiny Llama, batch size {BATCH_SIZE}",
        "machine": machine,
        "runs": runs,
    }
    write_report(
        "scaling", "excise attribute: time and memory against N", report, table(runs), args.results
    )
    plot(runs, args.results / "scaling.png")
    print(table(runs))


def build_model(folder: Path) -> Path:
    """The tiny Llama and its word-level tokenizer, saved once as a Hugging Face folder."""
    if (folder / "config.json").exists():
        return folder
    import torch

    from excise.world.settings import tiny
    from excise.world.tokenizer import train_word_tokenizer
    from excise.world.train import tiny_llama

    words = _vocabulary()
    texts = [" ".join(words), *(q + a for q, a in TEMPLATES)]
    tokenizer = train_word_tokenizer(" ".join(texts).split())
    torch.manual_seed(0)
    model = tiny_llama(tiny(), tokenizer, max_positions=64)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _vocabulary() -> list[str]:
    rng = random.Random(1234)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < WORDS:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 8))).capitalize())
    return sorted(words)


def write_records(path: Path, n: int, seed: int) -> Path:
    """``n`` templated question/answer records of random words, as JSON Lines (kept)."""
    if path.exists():
        return path
    rng = random.Random(seed)
    words = _vocabulary()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for i in range(n):
            prompt, completion = rng.choice(TEMPLATES)
            fill = {k: rng.choice(words) for k in "abcd"}
            record = {"id": f"{path.stem}-{i}", "prompt": prompt.format(**fill)}
            record["completion"] = completion.format(**fill)
            handle.write(json.dumps(record) + "\n")
    return path


def attribute_run(
    model: Path, train: Path, queries: Path, n: int, nproc: int, mode: str, threads: int
) -> dict[str, Any]:
    """One ``excise attribute`` in a child process: seconds, peak MB, or why it did not run."""
    out = SCRATCH / f"out-{n}-{nproc}-{mode}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    arguments = [
        *("attribute", "--model", str(model), "--train", str(train), "--query", str(queries)),
        *("--out", str(out), "--quiet", "--batch-size", str(BATCH_SIZE), "--seed", "0"),
    ]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        command = [sys.executable, *launcher, "-m", "excise"]
    else:
        command = [sys.executable, "-m", "excise"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EXCISE_HOME": str(SCRATCH / "home"),
        "EXCISE_IN_MEMORY_BYTES": "0" if mode == "stream" else str(1 << 50),
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",  # busy-waiting threads starve on a shared machine
    }
    before = cpu_snapshot()
    child = subprocess.Popen(
        command + arguments, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = cpu_use(before, cpu_snapshot())
    run: dict[str, Any] = {
        "n": n,
        "processes": nproc,
        "threads_per_process": threads,
        "mode": mode,
        "ok": child.returncode == 0,
    }
    if child.returncode != 0:
        run["not_run"] = stderr.strip().splitlines()[-1:] or [f"exit {child.returncode}"]
        return run
    run.update(
        seconds=round(seconds["wall_seconds"], 2),
        peak_mb=round(usage.ru_maxrss / 1024, 1),
        seconds_per_1k=round(1000 * seconds["wall_seconds"] / n, 3),
        other_cores=None if seconds["other_cores"] is None else round(seconds["other_cores"], 2),
        train_file_mb=round(train.stat().st_size / 2**20, 2),
    )
    return run


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| N | processes | training set | seconds | peak MB | seconds per 1k examples |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in runs:
        if not r["ok"]:
            lines.append(
                f"| {r['n']} | {r['processes']} | {r['mode']} | not run: {r['not_run'][0]} | | |"
            )
            continue
        lines.append(
            f"| {r['n']} | {r['processes']} | {r['mode']} | {r['seconds']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['seconds_per_1k']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r["ok"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in sorted({(r["processes"], r["mode"]) for r in done}):
        rows = sorted((r for r in done if (r["processes"], r["mode"]) == key), key=lambda r: r["n"])
        label = f"{key[0]} process{'es' if key[0] > 1 else ''}, {key[1]}"
        left.plot([r["n"] for r in rows], [r["seconds"] for r in rows], "o-", label=label)
        right.plot([r["n"] for r in rows], [r["peak_mb"] for r in rows], "o-", label=label)
    left.set_yscale("log")  # linear time: a slope of one on both log axes
    for axis, title in ((left, "wall time (s)"), (right, "peak resident memory (MB)")):
        axis.set_xscale("log")
        axis.set_xlabel("training sequences N")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_ylim(bottom=0)
    left.legend()
    figure.suptitle("excise attribute: EK-FAC factors + pairwise scores, tiny Llama")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
