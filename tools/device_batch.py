"""Run several ferkit jobs side by side on a borrowed GPU machine, under a deadline, and pack what they wrote.

Made for the `device` tool of this project's workplace (see docs/results.md, "Training on a borrowed GPU"):
the machine gets a copy of the working tree without ../shared and without .git, one command may run for at
most 10 minutes, and at most 8 files of 16 MiB come back from $OUT. So this script

1. rebuilds the data file from parts carried in earlier calls (`--data-parts`; FER2013's 94 MB .gz is larger
   than one call may carry) and checks its sha256, so the run manifests record the canonical file;
2. runs each JOB (a shell command line; `ferkit` in it is this tree's CLI, `{data}` the data file) in its own
   process group, all at once, with FERKIT_GIT_COMMIT set so the manifests name the commit the tree came from;
3. at the deadline stops the jobs still running (SIGTERM, then SIGKILL): a trainer loses at most the epoch in
   flight, and a `time_limit=MINUTES` override lets it end on its own and record its row first;
4. packs the files the jobs created or changed under results/, docs/ and runs/ (without resume checkpoints and
   last-epoch weights unless --keep-checkpoints; run files smallest first while they fit in what may come
   back, the rest listed as left out), their logs and summary.json (as runs/device/batch-*/) into
   $OUT/batch.tar.gz.NN chunks, and writes summary.json beside them.

Back here: `cat FILES_AT/batch.tar.gz.* | tar -xz` in the repository root puts everything in place.

    python3 tools/device_batch.py --data-parts '.gpudata/fer2013.csv.gz.part*' --data .gpudata/fer2013.csv.gz \\
        --sha256 aee2206a1e4bdc0155d31e955aa5d747083ca7e0e89d2ba9a64ef431b3f9144a --deadline 500 --out "$OUT" \\
        'ferkit reproduce frivas_cnn3 --data {data} --no-progress threads=2' \\
        'ferkit reproduce khaireddin_vgg --data {data} --no-progress threads=2 time_limit=7'
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CHUNK_BYTES = 15 * 2**20  # under the 16 MiB a file coming back may have
MAX_CHUNKS = 7  # 8 files may come back: the chunks and summary.json
PACK_BUDGET_BYTES = 6 * CHUNK_BYTES  # uncompressed; weights barely compress, so leave a chunk of headroom
PACKED_ROOTS = ("results", "docs", "runs")
CHECKPOINT_NAMES = ("checkpoint.pt", "last.safetensors")
# Never packed: distill_view=cached's views (1 GB and more) are rebuilt by a resume and never fit what comes back.
UNPACKED_NAMES = ("teacher_views.pt",)
LOG_ROOT = "runs/device"  # in the pack: the jobs' logs land in runs/device/batch-*/ (ignored by git) back here


def assemble_data(parts_glob: str, data: Path, sha256: str | None) -> str:
    """Concatenate the parts (in name order) into `data` unless it exists; return its sha256, checked if given."""
    if not data.is_file():
        parts = sorted(glob.glob(parts_glob))
        if not parts:
            raise SystemExit(f"no data parts match {parts_glob!r}: carry them in earlier calls (docs/results.md)")
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(data, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(2**24):
                        out.write(chunk)
    digest = hashlib.sha256()
    with open(data, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    found = digest.hexdigest()
    if sha256 and found != sha256:
        data.unlink()  # a wrong file must not be trained on by a rerun either
        raise SystemExit(f"{data}: sha256 {found} is not the expected {sha256} (a part missing or from another "
                         "file?); removed it")
    return found


def ferkit_shim(directory: Path) -> Path:
    """A `ferkit` executable that runs this tree's CLI with this interpreter (no pip install needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "ferkit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ferkit "$@"\n')
    shim.chmod(0o755)
    return directory


def run_jobs(jobs: list[str], deadline_s: float, log_dir: Path, env: dict[str, str],
             grace_s: float = 20.0) -> list[dict]:
    """Start every job at once; stop those still running at the deadline. One summary dict per job."""
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    procs = []
    for i, job in enumerate(jobs):
        log = open(log_dir / f"job{i:02d}.log", "w")  # noqa: SIM115 (closed below, after the job ends)
        log.write(f"$ {job}\n")
        log.flush()
        procs.append((job, log, subprocess.Popen(["bash", "-c", job], stdout=log, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True)))
    while any(p.poll() is None for _, _, p in procs) and time.monotonic() - start < deadline_s:
        time.sleep(1.0)
    stopped = [p for _, _, p in procs if p.poll() is None]
    for p in stopped:
        os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while any(p.poll() is None for p in stopped) and time.monotonic() < end:
        time.sleep(0.5)
    for p in stopped:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    summary = []
    for job, log, p in procs:
        log.close()
        summary.append({"job": job, "returncode": p.returncode, "stopped_at_deadline": p in stopped,
                        "log": f"{LOG_ROOT}/{log_dir.name}/{Path(log.name).name}"})
    return summary


def changed_files(roots: tuple[str, ...], since: float, keep_checkpoints: bool) -> list[Path]:
    """Files under `roots` modified since `since` (epoch seconds), checkpoints left out unless kept."""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if (not path.is_file() or path.stat().st_mtime < since or ".tmp" in path.name
                    or path.name in UNPACKED_NAMES):
                continue
            if not keep_checkpoints and (path.name in CHECKPOINT_NAMES or "snapshots" in path.parts):
                continue
            found.append(path)
    return found


def within_budget(files: list[Path], budget: int = PACK_BUDGET_BYTES) -> tuple[list[Path], list[Path]]:
    """(packed, left out): results/ and docs/ first, then run files smallest first while the sizes fit.

    The rows, predictions and run records are what a batch is for; a large model's weights (Khaireddin & Chen's
    VGG is 120 MB) cannot come back and are reproduced by their command instead.
    """
    first = [f for f in files if f.parts[0] != "runs"]
    rest = sorted((f for f in files if f.parts[0] == "runs"), key=lambda f: f.stat().st_size)
    packed, left_out, total = [], [], 0
    for f in first + rest:
        size = f.stat().st_size
        if total + size <= budget:
            packed.append(f)
            total += size
        else:
            left_out.append(f)
    return packed, left_out


def pack(files: list[Path], extra: dict[str, bytes], out: Path) -> list[Path]:
    """tar.gz of `files` (paths kept relative) and `extra` (name -> bytes), split into CHUNK_BYTES pieces."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
        for path in files:
            tar.add(path, arcname=str(path))
    blob = buf.getvalue()
    chunks = [blob[i:i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"the pack is {len(blob) / 2**20:.0f} MiB, more than {MAX_CHUNKS} chunks of "
                         f"{CHUNK_BYTES // 2**20} MiB can bring back")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, chunk in enumerate(chunks):
        path = out / f"batch.tar.gz.{i:02d}"
        path.write_bytes(chunk)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("jobs", nargs="+", metavar="JOB", help="shell command line; {data} is the data file")
    ap.add_argument("--data", type=Path, default=Path(".gpudata/fer2013.csv.gz"), help="the data file")
    ap.add_argument("--data-parts", help="glob of the parts to concatenate into --data when it is missing")
    ap.add_argument("--sha256", help="expected sha256 of the data file (stop if it differs)")
    ap.add_argument("--commit", default=os.environ.get("FERKIT_GIT_COMMIT", ""),
                    help="git commit the tree was copied from (recorded in run manifests)")
    ap.add_argument("--deadline", type=float, default=500.0, help="seconds before running jobs are stopped")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")),
                    help="where the chunks and summary.json go (default $OUT)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="also pack checkpoint.pt, last.safetensors and snapshots/ (to resume elsewhere)")
    args = ap.parse_args(argv)

    started = time.time()
    sha = assemble_data(args.data_parts, args.data, args.sha256) if args.data_parts else None
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONUNBUFFERED="1", FERKIT_GIT_COMMIT=args.commit,
                   PATH=f"{ferkit_shim(Path(tmp) / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(Path("src").resolve()),
                                                            os.environ.get("PYTHONPATH")])))
        jobs = [j.replace("{data}", str(args.data)) for j in args.jobs]
        log_dir = Path(tmp) / "logs" / time.strftime("batch-%Y%m%d-%H%M%S")
        summary = run_jobs(jobs, args.deadline, log_dir, env)
        logs = {f"{LOG_ROOT}/{log_dir.name}/{p.name}": p.read_bytes() for p in sorted(log_dir.glob("*.log"))}
    files, left_out = within_budget(changed_files(PACKED_ROOTS, started, args.keep_checkpoints))
    report = {"data": str(args.data), "data_sha256": sha, "commit": args.commit,
              "seconds": round(time.time() - started, 1), "jobs": summary, "files": [str(f) for f in files],
              "left_out": [f"{f} ({f.stat().st_size / 2**20:.1f} MiB)" for f in left_out]}
    body = (json.dumps(report, indent=2) + "\n").encode()
    try:
        chunks = pack(files, {**logs, f"{LOG_ROOT}/{log_dir.name}/summary.json": body}, args.out)
    except ValueError as e:
        report["pack_error"] = str(e)
        body = (json.dumps(report, indent=2) + "\n").encode()
        chunks = pack([], {**logs, f"{LOG_ROOT}/{log_dir.name}/summary.json": body}, args.out)
    (args.out / "summary.json").write_bytes(body)
    for job in summary:
        state = "stopped at the deadline" if job["stopped_at_deadline"] else f"exit {job['returncode']}"
        print(f"{state:>24}  {job['job']}")
    print(f"{len(files)} files packed into {len(chunks)} chunk(s) in {args.out}; {report['seconds']} s")
    for entry in report["left_out"]:
        print(f"left out (over the pack's size budget): {entry}")
    return 0 if all(j["returncode"] == 0 for j in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
