"""The feedback loop, end to end: collect corrections over HTTP, `dvc add`, `dvc repro`, compare.

In a scratch clone of this repository (its .venv linked, the MNIST mirror and
md5 from the options), for each ``--seeds`` value of ``train.seed``:

1. ``dvc repro evaluate`` without feedback: both models' error rate on
   ``held-out`` pictures, and their MNIST test accuracy (metrics/evaluate.json);
2. once: the real server, ``python -m mnist_dvc.apps.serve --collect
   data/feedback/pictures``, receives ``--corrections`` pictures with their right digit
   (``POST /api/feedback?label=N``) from ``--clients`` concurrent clients;
   then ``dvc add data/feedback/pictures`` and a commit, as the README says;
3. ``dvc repro evaluate`` with the corrections: the same figures again.

The pictures are benchmarks/own_digits.py's styles MNIST lacks (typeset
fonts, canvas strokes, photos of paper, ruled paper): the corrections are
drawn with one random seed, the held-out pictures with another, so no
held-out picture was ever sent.

    .venv/bin/python benchmarks/feedback_loop.py \\
        --mirror file:///work/shared/datasets/mnist/

About 2 minutes to draw the pictures, then ~1.5 minutes per seed and pass on 2 busy cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from own_digits import canvas, photo, typeset  # noqa: E402  (the styles MNIST lacks)

from mnist_dvc.apps.images import ImageError, to_mnist  # noqa: E402
from mnist_dvc.apps.inference import MODELS, Predictor  # noqa: E402

TIMEOUT = 1800  # s, one command


def pictures(seed: int) -> list[tuple[str, int, bytes]]:
    """own_digits' four styles, drawn with ``seed``: (category, digit, encoded picture)."""
    rng = np.random.default_rng(seed)
    drawn = {"typeset": typeset(rng), "canvas": canvas(rng), "photo": photo(rng, count=60),
             "lined": photo(rng, count=30, ruled=True)}
    return [(category, digit, data) for category, items in drawn.items() for _, digit, data in items]


def run(*cmd, cwd: Path) -> str:
    """Run a command in the scratch project with its venv first on PATH; its stdout, or exit with its output."""
    env = {**os.environ, "PATH": f"{cwd / '.venv/bin'}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode:
        sys.exit(f"error: {' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def scratch_project(folder: Path, mirror: str, md5: str | None) -> Path:
    """A clone of this repository's HEAD in ``folder`` with this .venv linked and the MNIST mirror set."""
    run("git", "clone", "-q", ROOT, folder, cwd=ROOT)
    (folder / ".venv").symlink_to(ROOT / ".venv")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["download"]["mirrors"] = [mirror]
    if md5:
        params["download"]["md5"]["train_images"] = md5
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-q", "-am",
        "mirror", cwd=folder)
    return folder


def set_seed(project: Path, seed: int) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["seed"] = seed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def measure(project: Path, inputs: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Each model's error rate on ``inputs`` and MNIST test accuracy, after ``dvc repro evaluate``."""
    run("dvc", "repro", "evaluate", cwd=project)
    predictor = Predictor(project)
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    return {name: {"errors": float((probs.argmax(1) != labels).mean()),
                   "mnist": evaluation[name]["accuracy"],
                   "feedback_accuracy": evaluation[name].get("feedback_accuracy")}
            for name, probs in predictor.probabilities(inputs).items()}


def send_corrections(project: Path, corrections, clients: int) -> list[int]:
    """Start the real server with --collect, send the corrections from ``clients`` threads; the statuses."""
    server = subprocess.Popen(
        [str(project / ".venv/bin/python"), "-m", "mnist_dvc.apps.serve", "--port", "0",
         "--collect", "data/feedback/pictures"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in server.stdout:
            if line.startswith("Serving on "):
                url = line.split()[2]
                break
        if url is None:
            sys.exit("error: the server did not start")

        def send(item) -> int:
            _, digit, data = item
            kind = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
            request = urllib.request.Request(f"{url}api/feedback?label={digit}", data=data, method="POST",
                                             headers={"Content-Type": kind})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            return list(pool.map(send, corrections))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default="file:///work/shared/datasets/mnist/",
                        help="download.mirrors for the scratch project (a folder with the four .gz files)")
    parser.add_argument("--train-images-md5", help="download.md5.train_images, for a trusted copy that differs")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="train.seed values, comma-separated")
    parser.add_argument("--corrections", type=int, default=300, help="pictures sent as corrections")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--keep", type=Path, help="build the scratch project here and keep it")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    start = time.perf_counter()
    drawn, held_out = pictures(1), pictures(2)
    pick = np.random.default_rng(0).choice(len(drawn), args.corrections, replace=False)
    corrections = [drawn[i] for i in sorted(pick)]
    kept = []
    for category, digit, data in held_out:
        try:
            kept.append((category, digit, to_mnist(data)))
        except ImageError:  # a picture to_mnist refuses is not one anybody could correct
            pass
    inputs = np.stack([image for _, _, image in kept])
    labels = np.array([digit for _, digit, _ in kept])
    print(f"{len(corrections)} corrections, {len(kept)} held-out pictures of the same styles "
          f"(drawn in {time.perf_counter() - start:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="h4-feedback-") as tmp:
        project = scratch_project(args.keep or Path(tmp) / "project", args.mirror, args.train_images_md5)
        before, after = {}, {}
        for seed in seeds:
            set_seed(project, seed)
            before[seed] = measure(project, inputs, labels)
            print(f"seed {seed} before: {json.dumps(before[seed])}", flush=True)

        t = time.perf_counter()
        statuses = send_corrections(project, corrections, args.clients)
        rows = (project / "data/feedback/pictures/labels.csv").read_text().splitlines()[1:]
        print(f"sent {len(statuses)} corrections from {args.clients} clients in {time.perf_counter() - t:.1f} s: "
              f"{statuses.count(201)} new (201), {statuses.count(200)} already had (200), "
              f"{len(statuses) - statuses.count(201) - statuses.count(200)} refused; labels.csv has {len(rows)} rows",
              flush=True)
        run("dvc", "add", "data/feedback/pictures", cwd=project)
        run("git", "add", "data/feedback/pictures.dvc", cwd=project)
        run("git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-q", "-m",
            "corrections", cwd=project)
        for seed in seeds:
            set_seed(project, seed)
            after[seed] = measure(project, inputs, labels)
            print(f"seed {seed} after: {json.dumps(after[seed])}", flush=True)
        data = json.loads((project / "metrics/data.json").read_text())
        print(f"feedback split: {data['feedback']['count']} held-out corrections; "
              f"{data['feedback_train']['count']} in training x {data['feedback_train']['repeat']}")

    print()
    print("| seed | model | errors on held-out, before | after | fewer errors | MNIST accuracy, before | after "
          "| change (points) | feedback_accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst_cut, worst_drop = 1.0, 0.0
    for seed in seeds:
        for name in MODELS:
            b, a = before[seed][name], after[seed][name]
            cut = 1 - a["errors"] / b["errors"] if b["errors"] else 0.0
            drop = (b["mnist"] - a["mnist"]) * 100
            worst_cut, worst_drop = min(worst_cut, cut), max(worst_drop, drop)
            print(f"| {seed} | {name} | {b['errors']:.2%} | {a['errors']:.2%} | {cut:.0%} | {b['mnist']:.4f} "
                  f"| {a['mnist']:.4f} | {-drop:+.2f} | {a['feedback_accuracy']:.3f} |")
    print(f"\nworst over seeds and models: {worst_cut:.0%} fewer errors (target >= 40%), "
          f"MNIST accuracy {worst_drop:.2f} points lower at most (target <= 0.3)")


if __name__ == "__main__":
    main()
