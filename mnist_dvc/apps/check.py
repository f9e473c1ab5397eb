"""check: did `dvc repro` rebuild exactly the committed results? Stage by stage, and why not.

    python -m mnist_dvc.apps.check [--rev HEAD] [--strict]
    make check

Compares the workspace's dvc.lock, as `dvc repro` left it, with the one
committed at ``--rev``: for each stage, whether its outputs have the same
hashes. Where they differ, it says by how much (each model's test accuracy
against the committed one, and how many test predictions differ) and the
likely cause it can see: the stage's params or code changed since the commit,
another copy of the dataset, or numerics that are not portable (params.yaml
``numerics.cpu: native``, or a CPU outside x86-64, such as arm64).

Exit status 1 where outputs differ that the portable numerics should have
kept equal (same inputs, portable numerics, an x86-64 CPU), or, with
``--strict`` (CI), where any output differs; 0 otherwise. The last line
is a row for docs/reproducibility.md's table of CPUs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from ruamel.yaml import YAML

from mnist_dvc import numerics

LOCK = "dvc.lock"
MODELS = ("manual", "skorch")  # metrics/evaluate.json's keys (mnist_dvc.model.TRAINED_BY, without importing torch)


def read_at(path: str, rev: str | None) -> str:
    """The text of ``path`` at git revision ``rev`` (DVC's API), or in the workspace (None)."""
    if rev is None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    import dvc.api

    return dvc.api.read(path, repo=".", rev=rev)


def entries(stage: dict, kind: str) -> dict[str, str]:
    """``{path: hash}`` of a lock entry's ``deps`` or ``outs``."""
    return {item["path"]: item.get("md5") for item in stage.get(kind, [])}


def changed_inputs(old: dict, new: dict) -> list[str]:
    """The deps and params of one stage whose recorded values differ between two lock entries."""
    deps_old, deps_new = entries(old, "deps"), entries(new, "deps")
    changed = sorted(path for path in deps_old.keys() | deps_new.keys() if deps_old.get(path) != deps_new.get(path))
    params_old = {k: v for values in old.get("params", {}).values() for k, v in values.items()}
    params_new = {k: v for values in new.get("params", {}).values() for k, v in values.items()}
    changed += sorted(f"params {key}" for key in params_old.keys() | params_new.keys()
                      if params_old.get(key) != params_new.get(key))
    return changed


def model_differences(rev: str) -> list[str]:
    """Each model's test accuracy against the committed one, and how many test predictions differ."""
    lines = []
    try:
        old, new = (json.loads(read_at("metrics/evaluate.json", r)) for r in (rev, None))
    except (OSError, ValueError) as exc:
        return [f"  (metrics/evaluate.json cannot be compared: {exc})"]
    for name in MODELS:
        path = f"metrics/predictions/{name}.csv"
        try:
            before, after = (list(csv.reader(io.StringIO(read_at(path, r))))[1:] for r in (rev, None))
            moved = f"{sum(a != b for a, b in zip(before, after)):,} of {len(after):,} test predictions differ"
        except (OSError, ValueError) as exc:
            moved = f"predictions not compared ({exc})"
        accuracy, committed = new[name]["accuracy"], old[name]["accuracy"]
        lines.append(f"  {name}: test accuracy {accuracy:.4f}, committed {committed:.4f} "
                     f"({accuracy - committed:+.4f}); {moved}")
    return lines


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
    committed, rebuilt = (yaml.load(read_at(LOCK, rev))["stages"] for rev in (args.rev, None))
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
        paths = sorted(path for path in outs_old.keys() | outs_new.keys() if outs_old.get(path) != outs_new.get(path))
        inputs = changed_inputs(old, new)
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
        print(f"{name}: DIFFERENT {', '.join(paths)}; likely cause: {cause}")
    if {"train", "fit", "evaluate"} & set(differing):
        print("\n".join(model_differences(args.rev)))
    cpu = numerics.describe_cpu()
    match = "match" if not differing else f"differs ({', '.join(sorted(differing))})"
    print(f"| {cpu.get('vendor', '?')} | {cpu.get('model', '?')} | {cpu.get('isa', cpu['machine'])} | "
          f"{numerics.mode_in()} | {match} |")
    return 1 if unexplained or (args.strict and differing) else 0


if __name__ == "__main__":
    sys.exit(main())
