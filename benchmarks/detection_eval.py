"""Face-detection recall, false positives and speed of ferkit's detectors on freely licensed real photos.

Run:  python benchmarks/detection_eval.py [--detectors retinaface haar] [--repeats 3] [--json out.json]

Two sets, both from `benchmarks/photos/` (licences and ground truth in SOURCES.md and faces.json):

(a) The real photos as they are: faces found / faces there, and false detections on the photos with no
    human face (a cat, a macaque, people seen from behind, landscapes, objects).
(b) Composites built from those photos, because no freely licensed group photo could be found on the
    package registries this machine reaches: each face photo is scaled so its face is 20-160 px tall,
    optionally mirrored and rotated (0-45 degrees), and pasted several times onto a no-face background photo
    (640x480 and 1280x960). Ground-truth boxes follow the same transform. This measures small faces,
    several faces per image, tilted heads and image sizes; it does not replace a real crowd photo.

A detection matches a ground-truth face when their IoU is at least --iou (default 0.3: the hand-drawn boxes
and the detectors' boxes frame faces differently); each face matches at most one detection. Timings are the
best of --repeats runs per image (this 2-core machine is shared with other jobs).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

PHOTOS = Path(__file__).resolve().parent / "photos"
FACE_HEIGHTS = (20, 28, 40, 64, 100, 160)  # pixels, ground-truth box height in the composite
ANGLES = (0, 15, 30, 45)


def load_truth() -> dict[str, dict[str, Any]]:
    return json.loads((PHOTOS / "faces.json").read_text())


@functools.cache
def read_rgb(name: str) -> np.ndarray:
    """A photo of the set as uint8 RGB (ferkit's own loader); each file is read once. Callers must not
    modify the array in place."""
    from ferkit.inference.image_io import load_image

    return load_image(PHOTOS / name, color="rgb")


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(truth: list[list[float]], found: list[tuple[int, int, int, int]], threshold: float) -> tuple[int, int]:
    """(true positives, false positives): greedy one-to-one matching by IoU."""
    pairs = sorted(((iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)), reverse=True)
    used_t: set[int] = set()
    used_f: set[int] = set()
    for score, i, j in pairs:
        if score < threshold:
            break
        if i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
    return len(used_t), len(found) - len(used_f)


def paste(canvas: np.ndarray, tile: np.ndarray, x: int, y: int) -> None:
    h, w = tile.shape[:2]
    canvas[y:y + h, x:x + w] = tile


def transformed_tile(photo: np.ndarray, box: list[float], face_h: int, angle: float, mirror: bool
                     ) -> tuple[np.ndarray, list[float]]:
    """The photo scaled so the face box is `face_h` tall, mirrored, rotated about its centre (canvas grown to
    fit); returns (tile, face box in the tile's pixels: the face's own size, upright, centred where the
    rotation moved the face's centre, which is how a detector frames a tilted face)."""
    s = face_h / box[3]
    img = cv2.resize(photo, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    x, y, w, h = (v * s for v in box)
    if mirror:
        img = img[:, ::-1].copy()
        x = img.shape[1] - x - w
    H, W = img.shape[:2]
    rot = cv2.getRotationMatrix2D((W / 2, H / 2), angle, 1.0)
    cos, sin = abs(rot[0, 0]), abs(rot[0, 1])
    nw, nh = int(H * sin + W * cos) + 1, int(H * cos + W * sin) + 1
    rot[0, 2] += nw / 2 - W / 2
    rot[1, 2] += nh / 2 - H / 2
    img = cv2.warpAffine(img, rot, (nw, nh), borderMode=cv2.BORDER_REPLICATE)
    cx, cy = rot @ np.array([x + w / 2, y + h / 2, 1.0])
    return img, [float(cx - w / 2), float(cy - h / 2), float(w), float(h)]


def composites(truth: dict[str, dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic composite scenes: for each (canvas size, face height, angle), a grid of face tiles cut
    from the face photos (cycled, every other one mirrored) on a no-face background."""
    rng = np.random.default_rng(seed)
    face_photos = [(name, t["boxes"][0]) for name, t in truth.items() if t["faces"] == 1 and t["hard_faces"] == 0]
    backgrounds = [name for name, t in truth.items() if t["faces"] == 0]
    scenes = []
    for canvas_w, canvas_h in ((640, 480), (1280, 960)):
        for face_h in FACE_HEIGHTS:
            for angle in ANGLES:
                bg = read_rgb(backgrounds[len(scenes) % len(backgrounds)])
                canvas = cv2.resize(bg, (canvas_w, canvas_h), interpolation=cv2.INTER_AREA)
                boxes, k, x, y, row_h = [], 0, 8, 8, 0
                while True:
                    name, box = face_photos[k % len(face_photos)]
                    sign = 1 if k % 2 == 0 else -1
                    tile, fbox = transformed_tile(read_rgb(name), box, face_h, sign * angle, mirror=k % 2 == 1)
                    # keep only a margin of 1.5 face boxes around the face, so several fit on the canvas
                    mx, my = int(fbox[2] * 0.75), int(fbox[3] * 0.75)
                    x0, y0 = max(0, int(fbox[0]) - mx), max(0, int(fbox[1]) - my)
                    x1 = min(tile.shape[1], int(fbox[0] + fbox[2]) + mx)
                    y1 = min(tile.shape[0], int(fbox[1] + fbox[3]) + my)
                    tile, fbox = tile[y0:y1, x0:x1], [fbox[0] - x0, fbox[1] - y0, fbox[2], fbox[3]]
                    th, tw = tile.shape[:2]
                    if x + tw + 4 > canvas_w:  # 4: room for the jitter
                        x, y, row_h = 8, y + row_h + 8, 0
                    if y + th > canvas_h or tw + 12 > canvas_w:
                        break
                    jitter = int(rng.integers(0, 4))
                    paste(canvas, tile, x + jitter, y)
                    boxes.append([fbox[0] + x + jitter, fbox[1] + y, fbox[2], fbox[3]])
                    x, row_h, k = x + tw + 8, max(row_h, th), k + 1
                    if k >= 24:
                        break
                if boxes:
                    scenes.append({"name": f"composite {canvas_w}x{canvas_h} face {face_h}px rot {angle}",
                                   "image": canvas, "boxes": boxes, "face_h": face_h, "angle": angle,
                                   "size": f"{canvas_w}x{canvas_h}"})
    return scenes


def run_detector(detector: Any, image: np.ndarray, repeats: int) -> tuple[list[tuple[int, int, int, int]], float]:
    best = float("inf")
    found: list = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = [d.box for d in detector.detect(image)]
        best = min(best, time.perf_counter() - start)
    return found, best * 1000


def evaluate(name: str, args: argparse.Namespace, truth: dict[str, dict[str, Any]],
             scenes: list[dict[str, Any]]) -> dict[str, Any]:
    from ferkit.inference.detect import get_detector

    detector = get_detector(name, device="cpu")
    detector.detect(read_rgb(next(iter(truth))))  # warm-up
    out: dict[str, Any] = {"real": [], "composite": []}
    print(f"\n== {name}")
    print(f"{'real photo':<34} {'size':>9} {'faces':>5} {'found':>5} {'false':>5} {'ms':>7}")
    for file, t in truth.items():
        image = read_rgb(file)
        found, ms = run_detector(detector, image, args.repeats)
        tp, fp = match(t["boxes"], found, args.iou)
        size = f"{image.shape[1]}x{image.shape[0]}"
        out["real"].append({"file": file, "size": size, "faces": t["faces"], "found": tp, "false": fp, "ms": ms})
        print(f"{file:<34} {size:>9} {t['faces']:>5} {tp:>5} {fp:>5} {ms:>7.1f}")
    for scene in scenes:
        found, ms = run_detector(detector, scene["image"], args.repeats)
        tp, fp = match(scene["boxes"], found, args.iou)
        out["composite"].append({k: scene[k] for k in ("name", "face_h", "angle", "size")}
                                | {"faces": len(scene["boxes"]), "found": tp, "false": fp, "ms": ms})
    real_faces = sum(r["faces"] for r in out["real"])
    out["summary"] = {
        "real_recall": sum(r["found"] for r in out["real"]) / max(1, real_faces), "real_faces": real_faces,
        "real_false_positives": sum(r["false"] for r in out["real"]),
        "real_no_face_images_with_false_detections": sum(1 for r in out["real"] if r["faces"] == 0 and r["false"]),
        "composite_false_positives": sum(r["false"] for r in out["composite"]),
    }
    print("composites: recall by face height (rows) and rotation (columns); faces per cell in brackets")
    print(f"{'face px':>8} " + " ".join(f"{f'{a} deg':>12}" for a in ANGLES) + f" {'all':>12}")
    table: dict[str, Any] = {}
    for face_h in FACE_HEIGHTS:
        cells = []
        for angle in (*ANGLES, None):
            rows = [r for r in out["composite"] if r["face_h"] == face_h and (angle is None or r["angle"] == angle)]
            n, k = sum(r["faces"] for r in rows), sum(r["found"] for r in rows)
            cells.append(f"{k / n:.2f} ({n:>3})" if n else "-")
            table[f"{face_h}px/{'all' if angle is None else angle}"] = k / n if n else None
        print(f"{face_h:>8} " + " ".join(f"{c:>12}" for c in cells))
    out["summary"]["composite_recall"] = table
    for size in ("640x480", "1280x960"):
        ms = [r["ms"] for r in out["composite"] if r["size"] == size]
        out["summary"][f"ms_{size}"] = float(np.median(ms))
    s = out["summary"]
    print(f"real photos: recall {s['real_recall']:.2f} of {real_faces} faces; {s['real_false_positives']} false "
          f"detections; composites: {s['composite_false_positives']} false detections; median ms per image "
          f"640x480 {s['ms_640x480']:.0f}, 1280x960 {s['ms_1280x960']:.0f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detectors", nargs="+", default=["retinaface", "haar"])
    p.add_argument("--repeats", type=int, default=3, help="Timing runs per image; the fastest is reported.")
    p.add_argument("--iou", type=float, default=0.3, help="IoU needed for a detection to match a face.")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and OpenCV.")
    p.add_argument("--save-composites", help="Write the composite images (with truth boxes) to this folder.")
    p.add_argument("--json", help="Also write the results to this JSON file.")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cv2.setNumThreads(torch.get_num_threads())
    truth = load_truth()
    scenes = composites(truth)
    print(f"{len(truth)} real photos ({sum(t['faces'] for t in truth.values())} faces), {len(scenes)} composites "
          f"({sum(len(s['boxes']) for s in scenes)} faces); IoU >= {args.iou}; torch {torch.get_num_threads()} "
          "thread(s)")
    if args.save_composites:
        folder = Path(args.save_composites)
        folder.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(scenes):
            img = cv2.cvtColor(s["image"], cv2.COLOR_RGB2BGR)
            for x, y, w, h in s["boxes"]:
                cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), (0, 255, 0), 1)
            cv2.imwrite(str(folder / f"{i:02d}.jpg"), img)
    results = {name: evaluate(name, args, truth, scenes) for name in args.detectors}
    if args.json:
        for r in results.values():  # keep the file small: per-image rows of the real set and the summary
            r.pop("composite")
        from ferkit.training.report import git_commit

        Path(args.json).write_text(json.dumps({"git_commit": git_commit(), **results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
