"""lorakit's own JSON/CSV/TSV readers against the `datasets` library's loader, on the same real files, and the
parquet/Arrow/save_to_disk readers on the same rows.

Files: SST-2's training split (../shared/data/sst2/train.tsv, 67,349 rows) and the 2,000 Alpaca records
(../shared/data/instruct/alpaca_small_2000.json). Each contender turns the file into Python records, which is what
training needs: lorakit's `read_table` / `read_records`; `datasets.load_dataset("csv" | "json", ...)` followed by
`to_list()`, cold (a new cache folder: the file is converted to Arrow first) and warm (the cache of an earlier
call reused); and lorakit's readers on the same rows saved as parquet, Arrow and a save_to_disk folder. Every
contender must give the same records as lorakit's text reader (checked). Times are medians of interleaved rounds
(seconds per read, one process); `import datasets` is timed once, after torch, as in a training run.

    python bench/data_readers.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: F401  (imported first, as in a training run: `import datasets` is timed without torch's cost)

from lorakit.training.data import read_records, read_table

sys.path.insert(0, os.path.dirname(__file__))
from _common import DATA, cpu_name  # noqa: E402

SST2 = DATA / "sst2" / "train.tsv"
ALPACA = DATA / "instruct" / "alpaca_small_2000.json"


def median_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin, the order reversed every other round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (median reported)")
    args = parser.parse_args()
    for path in (SST2, ALPACA):
        if not path.is_file():
            raise SystemExit(f"{path} is missing; this benchmark reads ../shared/data (see its SOURCES.md)")

    start = time.perf_counter()
    import datasets

    import_seconds = time.perf_counter() - start
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counter = iter(range(10**6))

        def hf_csv(cache: Path | None = None) -> list[tuple[str, str]]:
            ds = datasets.load_dataset("csv", data_files=str(SST2), delimiter="\t", quoting=3, keep_default_na=False,
                                       split="train", cache_dir=str(cache or tmp / f"cold{next(counter)}"))
            return [(r["sentence"], str(r["label"])) for r in ds.to_list()]

        def hf_json(cache: Path | None = None) -> list[dict]:
            ds = datasets.load_dataset("json", data_files=str(ALPACA), split="train",
                                       cache_dir=str(cache or tmp / f"cold{next(counter)}"))
            return ds.to_list()

        # the same rows in the Arrow-based formats, written once
        sst2 = datasets.Dataset.from_list([{"sentence": t, "label": int(y)} for _, t, y in read_table(SST2)])
        sst2.to_parquet(str(tmp / "sst2.parquet"))
        sst2.save_to_disk(str(tmp / "sst2-folder"))
        arrow_file = next((tmp / "sst2-folder").glob("*.arrow"))
        alpaca = datasets.Dataset.from_list([r for _, r in read_records(ALPACA)])
        alpaca.to_parquet(str(tmp / "alpaca.parquet"))
        alpaca.save_to_disk(str(tmp / "alpaca-folder"))

        table = {
            "SST-2 train.tsv": {
                "lorakit read_table (TSV)": lambda: [r[1:] for r in read_table(SST2)],
                "datasets load_dataset('csv'), cold": hf_csv,
                "datasets load_dataset('csv'), warm": lambda: hf_csv(tmp / "warm-csv"),
                "lorakit read_table (parquet)": lambda: [r[1:] for r in read_table(tmp / "sst2.parquet")],
                "lorakit read_table (.arrow)": lambda: [r[1:] for r in read_table(arrow_file)],
                "lorakit read_table (save_to_disk)": lambda: [r[1:] for r in read_table(tmp / "sst2-folder")],
            },
            "alpaca_small_2000.json": {
                "lorakit read_records (JSON)": lambda: [r for _, r in read_records(ALPACA)],
                "datasets load_dataset('json'), cold": hf_json,
                "datasets load_dataset('json'), warm": lambda: hf_json(tmp / "warm-json"),
                "lorakit read_records (parquet)": lambda: [r for _, r in read_records(tmp / "alpaca.parquet")],
                "lorakit read_records (save_to_disk)": lambda: [r for _, r in read_records(tmp / "alpaca-folder")],
            },
        }
        rows = []
        for file, fns in table.items():
            reference = next(iter(fns.values()))()
            for name, fn in fns.items():  # every contender reads the same records (and fills the warm caches)
                if fn() != reference:
                    raise SystemExit(f"{name} on {file} does not give the records lorakit's text reader gives")
            times = median_times(fns, args.rounds)
            base = next(iter(times.values()))
            rows += [(file, name, len(reference), seconds, seconds / base) for name, seconds in times.items()]

    print(f"CPU: {cpu_name()} ({torch.get_num_threads()} threads); Python {platform.python_version()}, "
          f"datasets {datasets.__version__}; median of {args.rounds} rounds\n")
    print("| file | reader | records | seconds | × lorakit's text reader |")
    print("|---|---|---:|---:|---:|")
    for file, name, n, seconds, ratio in rows:
        print(f"| {file} | {name} | {n:,} | {seconds:.3f} | {ratio:.2f} |")
    print(f"\n`import datasets` (once per process, after torch): {import_seconds:.2f} s")


if __name__ == "__main__":
    main()
