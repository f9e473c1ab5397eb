"""check: did `dvc repro` rebuild exactly the committed results? Stage by stage, and why not.

    python -m mnist_dvc.apps.check [--rev HEAD] [--strict]
    make check

Compares the output hashes of the workspace's dvc.lock with those committed at ``--rev``; where they differ, says
by how much and the likely cause (docs/reproducibility.md). Exit 1 where outputs differ that the portable numerics
should have kept equal, or with ``--strict`` (CI) where any does; 2 without a dvc.lock. Last line: the CPU table row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dvc.api
from dvc.exceptions import DvcException
from ruamel.yaml import YAML

from mnist_dvc import numerics
from mnist_dvc.apps.registry import one_line

MODELS = ("manual", "skorch")  # metrics/evaluate.json's keys (mnist_dvc.model.TRAINED_BY, without importing torch)


def read_at(path: str, rev: str | None) -> str:
    """The text of ``path`` at git revision ``rev`` (DVC's API), or in the workspace (None)."""
    return Path(path).read_text(encoding="utf-8") if rev is None else dvc.api.read(path, repo=".", rev=rev)


def entries(stage: dict, kind: str) -> dict[str, object]:
    """``{path: md5}`` of a lock entry's ``deps`` or ``outs``; ``{"params key": value}`` of its ``params``."""
    if kind == "params":
        return {f"params {key}": value for values in stage.get(kind, {}).values() for key, value in values.items()}
    return {item["path"]: item.get("md5") for item in stage.get(kind, [])}


def changed(old: dict, new: dict, kind: str) -> list[str]:
    """The ``entries`` of ``kind`` whose recorded values differ between two lock entries of a stage, sorted."""
    before, after = entries(old, kind), entries(new, kind)
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def print_model_differences(rev: str) -> None:
    """Each model's test accuracy against the committed one, and how many test predictions differ."""
    try:
        old, new = (json.loads(read_at("metrics/evaluate.json", r)) for r in (rev, None))
    except (OSError, ValueError) as exc:
        print(f"  (metrics/evaluate.json cannot be compared: {exc})")
        return
    for name in MODELS:
        path = f"metrics/predictions/{name}.csv"
        try:
            before, after = (read_at(path, r).splitlines()[1:] for r in (rev, None))  # under the header
            moved = f"{sum(a != b for a, b in zip(before, after)):,} of {len(after):,} test predictions differ"
        except (OSError, ValueError) as exc:
            moved = f"predictions not compared ({exc})"
        accuracy, committed = new[name]["accuracy"], old[name]["accuracy"]
        print(f"  {name}: test accuracy {accuracy:.4f}, committed {committed:.4f} ({accuracy - committed:+.4f}); "
              f"{moved}")


def portable_here() -> tuple[bool, str]:
    """Whether this process should rebuild the committed bits, and if not, why."""
    mode, cpu = numerics.mode_in(), numerics.describe_cpu()
    if mode != "portable":
        return False, f"numerics.cpu is {mode!r}: this CPU's own kernels"
    if cpu["machine"] not in ("x86_64", "AMD64"):
        return False, f"a {cpu['machine']} CPU, outside the portable x86-64 family (docs/reproducibility.md)"
    if cpu.get("isa") == "below AVX2":
        return False, "a CPU without AVX2, below the portable kernels' level"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the commit whose dvc.lock to compare with (default: HEAD)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any difference (for CI)")
    args = parser.parse_args(argv)
    yaml = YAML(typ="safe", pure=True)
    try:
        committed, rebuilt = ((yaml.load(read_at("dvc.lock", rev)) or {}).get("stages", {}) for rev in (args.rev, None))
    except (DvcException, OSError) as exc:  # an unknown revision, or no dvc.lock there or in the workspace
        print(f"error: cannot compare dvc.lock at {args.rev} with the workspace's: {one_line(exc)}", file=sys.stderr)
        return 2
    portable, why_not = portable_here()
    unexplained, differing = [], []
    # Where each rebuilt output differs from the committed one: a stage that reads it differs because of it.
    made_by = {path: name for name, stage in rebuilt.items() if name in committed
               for path, md5 in entries(stage, "outs").items() if entries(committed[name], "outs").get(path) != md5}
    for name in sorted(rebuilt.keys() | committed.keys()):
        old, new = committed.get(name), rebuilt.get(name)
        if old is None or new is None:
            print(f"{name}: {'new since' if old is None else 'not rebuilt, in'} {args.rev}")
            differing.append(name)
            continue
        outs_old, outs_new = entries(old, "outs"), entries(new, "outs")
        if outs_old == outs_new:
            print(f"{name}: same ({len(outs_new)} output{'s' * (len(outs_new) != 1)})")
            continue
        differing.append(name)
        inputs = changed(old, new, "deps") + changed(old, new, "params")
        upstream = sorted({made_by[path] for path in inputs if path in made_by})
        if inputs and len(upstream) == len({made_by.get(path) for path in inputs}):
            cause = "its inputs differ, rebuilt by " + ", ".join(upstream)
        elif inputs:
            cause = "inputs changed since the commit: " + ", ".join(inputs)
            if any(key.startswith("params download.md5") or key == "data/raw" for key in inputs):
                cause += " (another copy of the dataset)"
        elif not portable:
            cause = why_not
        else:
            cause = "the same inputs and portable numerics: this should not differ (please report it)"
            unexplained.append(name)
        print(f"{name}: DIFFERENT {', '.join(changed(old, new, 'outs'))}; likely cause: {cause}")
    if {"train", "fit", "evaluate"} & set(differing):
        print_model_differences(args.rev)
    cpu = numerics.describe_cpu()
    match = "match" if not differing else f"differs ({', '.join(sorted(differing))})"
    print(f"| {cpu.get('vendor', '?')} | {cpu.get('model', '?')} | {cpu.get('isa', cpu['machine'])} | "
          f"{numerics.mode_in()} | {match} |")
    return 1 if unexplained or (args.strict and differing) else 0


if __name__ == "__main__":
    sys.exit(main())
