"""Photos/s of `Recognizer.detect_emotions` by thread setting, with the CPU idle and with other work beside it.

Run:  python benchmarks/busy_threads.py [--seconds 4] [--rounds 2] [--busy 0 1] [--threads 1 2]
          [--weights default] [--backend torch] [--detector retinaface] [--json out.json]

Each setting runs in a fresh interpreter (thread pools and OpenMP's settings are fixed per process): "default" is
`Recognizer()` with no `threads` (ferkit's choice, `ferkit.device.default_threads`), "N" is
`Recognizer(threads=N)`; "env:VAR=V,..." runs the default with environment variables set before torch loads (to
compare e.g. OMP_WAIT_POLICY=PASSIVE). A child classifies the bundled astronaut photo (640x480, one face; as
benchmarks/inference_speed.py) for about --seconds and reports the best of three timing rounds.

"Busy cores" are processes this script starts: a bounded pure-Python spinning loop each (it exits by itself after
--busy-limit seconds and is killed at the end in any case), pinned to the last CPUs of this process's affinity
mask. Settings run interleaved, --rounds times, in the same busy state, and each keeps its best round (other load
on a shared machine only slows a round down). The table prints photos/s side by side and the ratio of the default
to the best setting in each state; the target (issue #26) is default >= 90 % of the best with one busy core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def start_busy(n: int, limit: float) -> list[subprocess.Popen]:
    """`n` spinning processes, each pinned to one of the last `n` CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    procs = []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-c", SPIN.format(limit=limit)])
        if hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(p.pid, {cpus[-1 - i % len(cpus)]})
            except OSError:
                pass
        procs.append(p)
    time.sleep(0.3)  # let them start spinning
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def child(args: argparse.Namespace) -> None:
    """One setting in this interpreter: print {"photos_per_s", "threads", "faces", "backend"} as JSON."""
    sys.path.insert(0, str(HERE))
    from inference_speed import benchmark_photo, rate

    from ferkit.inference import Recognizer

    kw: dict[str, Any] = {}
    if args.child.isdigit():
        kw["threads"] = int(args.child)
    if args.backend:
        kw["backend"] = args.backend
    rec = Recognizer(model=args.weights, detector=args.detector, device="cpu", **kw)
    photo = benchmark_photo()
    faces = len(rec.detect_emotions(photo))
    r = rate(lambda: rec.detect_emotions(photo), 1, args.seconds)
    print(json.dumps({"photos_per_s": r, "threads": rec.threads, "faces": faces, "backend": rec.backend}))


def run_setting(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    name = "default"
    if setting.startswith("env:"):
        for pair in setting[4:].split(","):
            k, _, v = pair.partition("=")
            env[k] = v
    elif setting != "default":
        name = setting
    cmd = [sys.executable, __file__, "--child", name, "--seconds", str(args.seconds), "--weights", args.weights,
           "--detector", args.detector] + (["--backend", args.backend] if args.backend else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"setting {setting!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="Timing length per setting and round.")
    p.add_argument("--rounds", type=int, default=2, help="Interleaved rounds per busy state; best round kept.")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="Busy-core counts to measure under.")
    p.add_argument("--threads", nargs="+", default=None,
                   help="Explicit thread counts to compare with the default (default: 1 .. available CPUs).")
    p.add_argument("--extra", nargs="*", default=[],
                   help="More settings, e.g. env:OMP_WAIT_POLICY=PASSIVE (the default with that environment).")
    p.add_argument("--weights", default="default", help="Shipped model name or weights file.")
    p.add_argument("--backend", default=None, help="Recognizer backend (default: Recognizer's default).")
    p.add_argument("--detector", default="retinaface")
    p.add_argument("--busy-limit", type=float, default=900.0, help="Seconds after which a busy loop stops itself.")
    p.add_argument("--json", help="Also write the results to this JSON file.")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from ferkit.device import available_cpus, cgroup_cpu_limit

    cpus = available_cpus()
    threads = args.threads or [str(n) for n in range(1, cpus + 1)]
    settings = ["default", *threads, *args.extra]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"{cpus} CPU(s) available (affinity {len(os.sched_getaffinity(0))}, cgroup quota {cgroup_cpu_limit()}); "
          f"load average before: {load}; weights {args.weights}, detector {args.detector}, backend "
          f"{args.backend or 'default'}; ~{args.seconds:g} s per setting, best of {args.rounds} rounds", flush=True)
    results: dict[str, Any] = {"cpus": cpus, "load_before": load, "weights": args.weights, "detector": args.detector,
                               "backend": args.backend, "seconds": args.seconds, "rounds": args.rounds, "states": {}}
    for busy in args.busy:
        procs = start_busy(busy, args.busy_limit)
        try:
            best: dict[str, dict[str, Any]] = {}
            for _ in range(args.rounds):
                for s in settings:
                    row = run_setting(s, args)
                    if s not in best or row["photos_per_s"] > best[s]["photos_per_s"]:
                        best[s] = row
                    print(f"  busy {busy}: {s:<28} {row['photos_per_s']:7.2f} photos/s (threads {row['threads']})",
                          flush=True)
        finally:
            stop_busy(procs)
        results["states"][str(busy)] = best

    width = max(len(s) for s in settings) + 2
    print(f"\nphotos/s, best of {args.rounds} rounds (threads used in brackets)")
    print(f"{'setting':<{width}}" + "".join(f"{f'{b} busy core(s)':>22}" for b in args.busy))
    for s in settings:
        rows = [results["states"][str(b)][s] for b in args.busy]
        cells = "".join(f"{r['photos_per_s']:.2f} ({r['threads']})".rjust(22) for r in rows)
        print(f"{s:<{width}}{cells}")
    line = f"{'default / best':<{width}}"
    for b in args.busy:
        state = results["states"][str(b)]
        top = max(state.values(), key=lambda r: r["photos_per_s"])
        ratio = state["default"]["photos_per_s"] / top["photos_per_s"]
        state["default_over_best"] = ratio
        line += f"{ratio:>21.0%} "
    print(line)
    if "1" in results["states"]:
        ok = results["states"]["1"]["default_over_best"] >= 0.9
        print(f"target (one busy core, default >= 90 % of the best setting): {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
