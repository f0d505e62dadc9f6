"""A sentiment adapter on new data: trained on SST-2, evaluated on other movie reviews, then trained further on a few
of them with --init-adapter.

1. LoRA r=8 on query,value (+ head) of the embedded MiniLM, trained on the first --train SST-2 sentences (as
   bench/sst2.py), evaluated on SST-2 dev.
2. The same adapter on Rotten Tomatoes snippets (../shared/data/rt_polarity), written as another dataset would: a
   CSV with ``text,label`` and ``neg``/``pos`` labels, mapped onto the adapter's classes 0/1 with --label-map;
   evaluated at 256 tokens on --held-out reviews.
3. Training continued from that adapter on --in-domain other reviews (not in the held-out set), evaluated again.

    python bench/new_data.py [--train 20000] [--in-domain 100] [--held-out 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from lorakit import TrainConfig, train
from lorakit.workflows.inference import evaluate_adapter

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABEL_MAP = ["neg=0", "pos=1"]


def write_reviews(path: Path, reviews: list[tuple[str, str]]) -> None:
    lines = ["text,label"] + ['"' + text.replace('"', '""') + f'",{label}' for text, label in reviews]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20000, help="SST-2 training sentences (from the top)")
    parser.add_argument("--in-domain", type=int, default=100, help="other reviews to continue training on")
    parser.add_argument("--held-out", type=int, default=2000, help="other reviews to evaluate on")
    parser.add_argument("--more-epochs", type=float, default=3.0, help="passes over the in-domain reviews")
    parser.add_argument("--more-lr", type=float, default=5e-4, help="learning rate when training further")
    parser.add_argument("--output-dir", default="runs/bench-new-data", help="where adapters and files go")
    parser.add_argument("--reuse", action="store_true", help="reuse the SST-2 adapter of an earlier run in "
                                                             "--output-dir (same --train) instead of training it")
    args = parser.parse_args()
    for needed in (DATA / "sst2" / "train.tsv", DATA / "rt_polarity" / "rt-polarity.pos"):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing; this benchmark reads ../shared/data")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # The other reviews: shuffled once (seed 0), the in-domain ones apart from the held-out ones
    reviews = [(line.strip(), label) for label in ("neg", "pos")
               for line in (DATA / "rt_polarity" / f"rt-polarity.{label}").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    random.Random(0).shuffle(reviews)
    write_reviews(out / "reviews_train.csv", reviews[:args.in_domain])
    write_reviews(out / "reviews_eval.csv", reviews[args.in_domain:args.in_domain + args.held_out])

    lines = (DATA / "sst2" / "train.tsv").read_text().splitlines()
    (out / "sst2_train.tsv").write_text("\n".join(lines[:1 + args.train]) + "\n")
    if args.reuse and (out / "sst2" / "summary.json").is_file():
        first = json.loads((out / "sst2" / "summary.json").read_text())
    else:
        first = train(TrainConfig(model="minilm", task="seq_cls", data=str(out / "sst2_train.tsv"),
                                  eval_data=str(DATA / "sst2" / "dev.tsv"), max_eval=0, r=8, lora_alpha=16,
                                  target_modules="query,value", lr=2e-3, epochs=1.0, batch_size=32, max_length=64,
                                  warmup_steps=30, output_dir=str(out / "sst2")))
    new = {"eval_data": str(out / "reviews_eval.csv"), "text_field": "text", "label_map": LABEL_MAP,
           "max_length": 256}
    t0 = time.perf_counter()
    transfer = evaluate_adapter(out / "sst2", **new)
    eval_s = time.perf_counter() - t0
    more = train(TrainConfig(task="seq_cls", data=str(out / "reviews_train.csv"), init_adapter=str(out / "sst2"),
                             epochs=args.more_epochs, batch_size=16, lr=args.more_lr, warmup_steps=2, max_eval=0,
                             output_dir=str(out / "more"), **new))

    rows = [("SST-2 dev (872)", first["after"]),
            (f"other reviews, held out ({args.held_out})", transfer),
            (f"… after {more['steps']} more steps on {args.in_domain} other reviews", more["after"])]
    print(f"\nSST-2 adapter: {first['steps']} steps in {first['train_seconds']:.0f} s; other reviews evaluated in "
          f"{eval_s:.0f} s; {more['steps']} more steps in {more['train_seconds']:.0f} s")
    print("| data | accuracy | macro-F1 | confusion (rows: neg/0, pos/1) |\n|---|---|---|---|")
    for name, metrics in rows:
        print(f"| {name} | {100 * metrics['accuracy']:.1f}% | {metrics['f1']:.3f} | {metrics['confusion']} |")
    print(json.dumps({name: {"accuracy": m["accuracy"], "f1": m["f1"]} for name, m in rows}))


if __name__ == "__main__":
    main()
