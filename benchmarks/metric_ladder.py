"""The image metrics on a ladder of degradations of real scenes: FD, precision, recall (in the FD
classifier's features) and the share of well-formed objects, for real scenes against real ones, then
blurred, noisy, blocky (code-like), with objects removed, and blank.

    python benchmarks/metric_ladder.py [--images 120] [--out metric-ladder]

Trains the FD classifier as an evaluation does (about a minute on 2 cores), prints a markdown table
and writes metric_ladder.json. ``tests/test_evaluation.py`` checks the directions on the same ladder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transfusion.evaluation.shapes import ladder_scores, train_scene_classifier


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=120, help="images per rung (default 120)")
    p.add_argument("--out", type=Path, default=Path("metric-ladder"), help="directory for metric_ladder.json")
    args = p.parse_args()
    clf, acc = train_scene_classifier(32)
    scores = ladder_scores(clf, args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metric_ladder.json").write_text(
        json.dumps({"classifier_accuracy": acc, "rungs": scores}, indent=2)
    )
    print("| rung | FD | precision | recall | well-formed |\n| --- | --- | --- | --- | --- |")
    for rung, s in sorted(scores.items(), key=lambda kv: kv[1]["fd"]):
        print(
            f"| {rung} | {s['fd']:,.0f} | {s['precision']:.2f} | {s['recall']:.2f} | {s['well_formed']:.2f} |"
        )


if __name__ == "__main__":
    main()
