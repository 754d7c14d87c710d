"""Inference: safe image loading, FER2013-style crops, detectors, Recognizer, `ferkit predict` / `ferkit demo`.

The shipped default weights may not exist yet, so every test that classifies uses a freshly initialised
ferkit_vgg_s saved to a temp file: its probabilities are meaningless but their schema is not.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ferkit.cli import app
from ferkit.data.labels import FER2013_NAMES
from ferkit.inference import ImageError, Recognizer, crop_face, get_detector, load_image
from ferkit.inference.faces import FER2013_TEMPLATE, similarity_transform
from ferkit.inference.image_io import sample_image_path
from ferkit.models.weights import default_weights_path

SAMPLE = sample_image_path()
CLASSES = list(FER2013_NAMES)
runner = CliRunner()


@pytest.fixture(scope="module")
def sample_bgr() -> np.ndarray:
    return cv2.imread(str(SAMPLE))


def _png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG whose header declares width x height, with a tiny (invalid) data stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def _assert_result_schema(faces: list[dict], classes: list[str] = CLASSES) -> None:
    for face in faces:
        assert set(face) == {"box", "emotions", "dominant", "face_score"}
        assert len(face["box"]) == 4 and all(isinstance(v, int) for v in face["box"])
        assert list(face["emotions"]) == classes
        assert sum(face["emotions"].values()) == pytest.approx(1.0, abs=1e-4)
        assert face["dominant"] == max(face["emotions"], key=face["emotions"].get)
        assert 0.0 <= face["face_score"] <= 1.0


def _iou(a: list[int], b: list[int]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0, min(ax2, bx2) - max(a[0], b[0])), max(0, min(ay2, by2) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


# -- image loading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", b"", "empty file"),
    ("noise.jpg", bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)), "not an image"),
    ("notes.png", b"these are my notes, not a picture\n", "not an image"),
])
def test_load_image_rejects_non_images(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as err:
        load_image(path)
    assert str(path) in str(err.value) and err.value.source == str(path)


def test_load_image_rejects_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_load_image_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bomb_guard_refuses_huge_headers(tmp_path: Path, side: int) -> None:
    # 10k x 10k is over ferkit's 50 MP limit; 100k x 100k is over Pillow's own hard limit too.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(side, side))
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(path)


def test_max_pixels_applies_to_arrays_and_pil_images() -> None:
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(np.zeros((100, 100, 3), np.uint8), max_pixels=5_000)
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=5_000)


def test_16bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    gray16 = np.array([[0, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (4, 3, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255]
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 2] = 65535  # red in OpenCV's BGR order
    rgb16[..., 1] = 257 * 100
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), rgb16)
    out = load_image(path)
    assert out[0, 0].tolist() == [255, 100, 0]


def test_rgba_palette_gray_and_bilevel_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]

    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png")
    out = load_image(tmp_path / "pal.png")
    assert out[1, 1].tolist() == [10, 20, 30] and out[0, 0].tolist() == [0, 0, 0]
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal_t.png", transparency=0)
    assert load_image(tmp_path / "pal_t.png")[0, 0].tolist() == [255, 255, 255]

    Image.fromarray(np.full((3, 5), 77, np.uint8), "L").save(tmp_path / "gray.jpg")
    out = load_image(tmp_path / "gray.jpg")
    assert out.shape == (3, 5, 3) and abs(int(out[1, 2, 0]) - 77) <= 2 and (out[..., 0] == out[..., 2]).all()

    Image.new("1", (6, 2), 1).save(tmp_path / "bw.png")
    assert (load_image(tmp_path / "bw.png") == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").shape == (30, 10, 3)


def test_arrays_in_every_color_order_and_dtype() -> None:
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 255  # blue in BGR
    assert load_image(bgr)[0, 0].tolist() == [0, 0, 255]
    assert load_image(bgr, color="rgb")[0, 0].tolist() == [255, 0, 0]
    assert load_image(np.full((2, 2), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]
    assert load_image(np.full((2, 2, 1), 65535, np.uint16))[0, 0].tolist() == [255, 255, 255]
    bgra = np.zeros((2, 2, 4), np.uint8)
    assert load_image(bgra)[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert load_image(Image.new("LA", (2, 2), (10, 255)))[0, 0].tolist() == [10, 10, 10]
    for bad in (np.zeros((2, 2, 2), np.uint8), np.zeros((0, 0), np.uint8), np.zeros((2, 2, 2, 2), np.uint8)):
        with pytest.raises(ImageError):
            load_image(bad)
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((2, 2), np.nan))
    with pytest.raises(ImageError, match="unsupported input type"):
        load_image(42)


# -- face crops --------------------------------------------------------------------------------------------

def test_similarity_transform_recovers_a_known_transform() -> None:
    angle, scale, shift = np.deg2rad(20), 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = FER2013_TEMPLATE * 100
    m = similarity_transform(src, src @ rot.T + shift)
    assert np.allclose(m[:, :2], rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_crop_face_box_and_landmark_framing() -> None:
    img = np.zeros((400, 400), np.uint8)
    img[100:300, 150:250] = 255  # a 100 x 200 "face"
    crop = crop_face(img, (150, 100, 100, 200), framing=(1.0, 0.0))
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    # square of side 200 around the box: the middle is inside, the left/right quarters outside
    assert crop[24, 24] > 200 and crop[24, 2] < 50 and crop[24, 45] < 50
    # landmarks exactly on the template (scaled x4, moved) give the same crop as the template frame
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    big = cv2.resize(face, (192, 192), interpolation=cv2.INTER_NEAREST)
    canvas = np.zeros((300, 300, 3), np.uint8)
    canvas[50:242, 60:252] = big[..., None]
    aligned = crop_face(canvas, (0, 0, 1, 1), FER2013_TEMPLATE * 192 + [60, 50])
    assert np.abs(aligned.astype(int) - face.astype(int)).mean() < 20


# -- detectors and Recognizer ------------------------------------------------------------------------------

def test_sample_photo_is_bundled_and_small() -> None:
    assert SAMPLE.is_file() and SAMPLE.stat().st_size < 200_000
    assert (SAMPLE.parent / "README.md").read_text().lower().count("public domain") >= 1
    with Image.open(SAMPLE) as im:
        assert im.format == "JPEG" and im.size == (512, 512)


def test_astronaut_has_exactly_one_face_with_a_plausible_box(rec: Recognizer, sample_bgr: np.ndarray) -> None:
    faces = rec.detect_emotions(SAMPLE)
    assert len(faces) == 1
    _assert_result_schema(faces)
    x, y, w, h = faces[0]["box"]
    # Eileen Collins' face: about x 178-273, y 57-177 in the 512 x 512 photo
    assert 150 <= x <= 200 and 35 <= y <= 80 and 75 <= w <= 125 and 95 <= h <= 150
    assert faces[0]["face_score"] > 0.9
    # the same photo as a BGR array, an RGB array and a PIL image gives the same answer
    for image, color in ((sample_bgr, "bgr"), (sample_bgr[..., ::-1], "rgb"), (Image.open(SAMPLE), "bgr")):
        again = rec.detect_emotions(image, color=color)
        assert again[0]["box"] == faces[0]["box"]
        assert again[0]["emotions"]["happy"] == pytest.approx(faces[0]["emotions"]["happy"], abs=1e-5)


def test_detectors_agree_and_none_uses_the_whole_image(weights: Path, sample_bgr: np.ndarray) -> None:
    rgb = sample_bgr[..., ::-1]
    cnn = get_detector("retinaface").detect(rgb)
    haar = get_detector("haar").detect(rgb)
    assert len(cnn) == 1 and len(haar) == 1
    assert cnn[0].landmarks is not None and cnn[0].landmarks.shape == (5, 2)
    assert _iou(list(cnn[0].box), list(haar[0].box)) > 0.5
    whole = Recognizer(model=str(weights), detector="none", device="cpu").detect_emotions(np.zeros((30, 40), np.uint8))
    assert [f["box"] for f in whole] == [[0, 0, 40, 30]]
    with pytest.raises(ValueError, match="unknown detector"):
        Recognizer(model=str(weights), detector="yolo", device="cpu")


def test_synthetic_scene_boxes_map_back_through_downscaling(rec: Recognizer, sample_bgr: np.ndarray) -> None:
    """A big noisy canvas (downscaled for detection) with the face pasted twice: boxes land where it was put."""
    face = cv2.resize(sample_bgr[20:240, 120:330], None, fx=2.0, fy=2.0)  # 420 x 440 region, face inside
    canvas = np.random.default_rng(0).integers(90, 110, (1500, 2400, 3), dtype=np.uint8)
    canvas[900:1340, 1800:2220] = face
    canvas[100:540, 200:620] = face[:, ::-1]
    faces = rec.detect_emotions(canvas)
    _assert_result_schema(faces)
    assert len(faces) == 2
    left, right = faces  # left to right
    # in the original photo the face is at ~ (178, 57, 95, 120): here x2 and shifted
    assert _iou(right["box"], [1800 + (178 - 120) * 2, 900 + (57 - 20) * 2, 190, 240]) > 0.6
    assert left["box"][0] < 700 and left["box"][1] < 500
    assert rec.detect_emotions(np.full((200, 300, 3), 128, np.uint8)) == []


def test_classify_faces_one_and_a_batch_of_any_size(rec: Recognizer, sample_bgr: np.ndarray) -> None:
    one = rec.classify_faces(sample_bgr[57:177, 178:273])
    assert set(one) == {"emotions", "dominant"} and sum(one["emotions"].values()) == pytest.approx(1, abs=1e-4)
    batch = [np.zeros((30, 40), np.uint8), sample_bgr[50:200, 150:300], Image.open(SAMPLE).crop((178, 57, 273, 177)),
             SAMPLE, np.full((48, 48, 4), 200, np.uint8)]
    out = rec.classify_faces(batch)
    assert isinstance(out, list) and len(out) == 5
    for r in out:
        assert list(r["emotions"]) == CLASSES and sum(r["emotions"].values()) == pytest.approx(1, abs=1e-4)
    stack = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    assert len(rec.classify_faces(stack)) == 3
    # classify_faces on the Recognizer's own crop reproduces detect_emotions' probabilities
    _, _, crops = rec.detect_faces(SAMPLE)
    direct = rec.classify_faces(crops[0], color="gray")["emotions"]
    assert direct == pytest.approx(rec.detect_emotions(SAMPLE)[0]["emotions"], abs=1e-5)
    assert rec.classify_faces([]) == []


@pytest.mark.parametrize("tta, mode", [(False, "none"), (True, "flip"), ("flip", "flip"), ("tencrop", "tencrop"),
                                       ("center", "center")])
def test_tta_modes(weights: Path, tta: bool | str, mode: str) -> None:
    r = Recognizer(model=weights, device="cpu", tta=tta)
    assert r.tta == mode
    _assert_result_schema(r.detect_emotions(SAMPLE))


def test_model_argument_forms(weights: Path) -> None:
    by_name = Recognizer(model="ferkit_vgg_s", weights=weights, device="cpu")
    assert by_name.classes == CLASSES and by_name.meta["model"] == "ferkit_vgg_s"
    with pytest.raises(ValueError, match="weights="):
        Recognizer(model="ferkit_vgg_s", device="cpu")
    with pytest.raises(ValueError, match="not 'frivas_cnn3'"):
        Recognizer(model="frivas_cnn3", weights=weights, device="cpu")
    with pytest.raises(ValueError, match="neither"):
        Recognizer(model="no_such_model", device="cpu")
    with pytest.raises(ValueError, match="tta"):
        Recognizer(model=weights, device="cpu", tta="rotate")
    if not default_weights_path().is_file():
        with pytest.raises(FileNotFoundError, match="default weights"):
            Recognizer(device="cpu")


def test_import_ferkit_stays_light() -> None:
    code = "import sys, ferkit; print('torch' in sys.modules, 'cv2' in sys.modules, ferkit.Recognizer.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "Recognizer"]


# -- CLI ---------------------------------------------------------------------------------------------------

def test_predict_folder_with_a_bad_file(weights: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    (photos / "a_astronaut.jpg").write_bytes(SAMPLE.read_bytes())
    (photos / "nested" / "c_astronaut.png").write_bytes(b"")  # empty file
    (photos / "b_broken.jpg").write_bytes(SAMPLE.read_bytes()[:3000])  # truncated JPEG
    Image.new("RGB", (64, 64), (120, 120, 120)).save(photos / "nested" / "d_blank.png")  # no face
    (photos / "notes.txt").write_text("not scanned")
    (photos / "e_clip.mp4").write_bytes(b"not really a video" * 10)
    out_json, out_csv, annotated = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "ann"
    result = runner.invoke(app, ["predict", str(photos), "--weights", str(weights), "--json", str(out_json),
                                 "--csv", str(out_csv), "--annotate", str(annotated), "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    doc = json.loads(out_json.read_text())
    assert doc["classes"] == CLASSES and doc["model"] == "ferkit_vgg_s" and doc["detector"] == "retinaface"
    by_name = {Path(r["file"]).name: r for r in doc["results"]}
    assert sorted(by_name) == ["a_astronaut.jpg", "b_broken.jpg", "c_astronaut.png", "d_blank.png", "e_clip.mp4"]
    good = by_name["a_astronaut.jpg"]
    assert good["error"] is None and len(good["faces"]) == 1
    _assert_result_schema(good["faces"])
    assert "truncated" in by_name["b_broken.jpg"]["error"]
    assert "empty file" in by_name["c_astronaut.png"]["error"]
    assert by_name["d_blank.png"]["error"] is None and by_name["d_blank.png"]["faces"] == []  # a result
    assert by_name["e_clip.mp4"]["error"] and "frame" not in by_name["e_clip.mp4"]
    assert doc["summary"] == {"entries": 5, "faces": 1, "without_face": 1, "errors": 3, "files": 5,
                              "failed_files": 3}
    assert "3 of 5 file(s) could not be read" in result.output
    assert "b_broken.jpg" in result.stdout and "error:" in result.stdout and "1 non-image file" in result.stdout
    rows = out_csv.read_text().splitlines()
    assert rows[0].split(",") == ["file", "frame", "time", "face", "x", "y", "w", "h", "face_score", "dominant",
                                  *CLASSES, "error"]
    assert len(rows) == 6
    assert (annotated / "a_astronaut.jpg").is_file() and (annotated / "nested" / "d_blank.jpg").is_file()


def test_predict_json_to_stdout_and_exit_0(weights: Path) -> None:
    result = runner.invoke(app, ["predict", str(SAMPLE), "--weights", str(weights), "--json", "-",
                                 "--no-progress", "--device", "cpu", "--detector", "haar", "--tta", "flip"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tta"] == "flip" and doc["detector"] == "haar" and len(doc["results"][0]["faces"]) == 1


def test_predict_onnx_backend_agrees_with_torch(weights: Path, cache_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    docs = {}
    for backend in ("torch", "onnx"):
        result = runner.invoke(app, ["predict", str(SAMPLE), "--weights", str(weights), "--json", "-",
                                     "--no-progress", "--device", "cpu", "--backend", backend])
        assert result.exit_code == 0, result.output
        docs[backend] = json.loads(result.stdout)["results"][0]["faces"]
    assert len(docs["torch"]) == len(docs["onnx"]) == 1
    torch_scores, onnx_scores = docs["torch"][0]["emotions"], docs["onnx"][0]["emotions"]
    assert max(abs(torch_scores[c] - onnx_scores[c]) for c in CLASSES) < 1e-4


def test_predict_video_every_n_frames(weights: Path, tmp_path: Path, sample_bgr: np.ndarray) -> None:
    video = tmp_path / "clip.avi"
    frame = cv2.resize(sample_bgr, (256, 256))
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (256, 256))
    assert writer.isOpened()
    for i in range(10):
        writer.write(np.roll(frame, i * 2, axis=1))
    writer.release()
    out_json = tmp_path / "v.json"
    result = runner.invoke(app, ["predict", str(video), "--every", "4", "--weights", str(weights), "--json",
                                 str(out_json), "--annotate", str(tmp_path / "frames"), "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out_json.read_text())
    assert [(r["frame"], r["time"]) for r in doc["results"]] == [(0, 0.0), (4, 0.4), (8, 0.8)]
    assert all(len(r["faces"]) == 1 and r["error"] is None for r in doc["results"])
    assert "0.40s" in result.stdout
    assert sorted(p.name for p in (tmp_path / "frames" / "clip").iterdir()) == [
        "frame_000000.jpg", "frame_000004.jpg", "frame_000008.jpg"]


def test_predict_without_paths_and_demo_write_the_annotated_sample(weights: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", "--weights", str(weights), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "astronaut.jpg (bundled sample)" in result.stdout
    assert Image.open(tmp_path / "ferkit-demo.jpg").size == (512, 512)
    result = runner.invoke(app, ["demo", "--weights", str(weights), "--out", str(tmp_path / "d" / "x.jpg"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "d" / "x.jpg").format == "JPEG"
    result = runner.invoke(app, ["demo", "--weights", str(weights), "--device", "cpu"])
    assert f"wrote annotated image: {tmp_path / 'ferkit-demo.jpg'}" in result.stdout  # where, in full


def test_predict_on_a_folder_without_images_is_an_error(weights: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    result = runner.invoke(app, ["predict", str(tmp_path / "empty"), str(tmp_path / "notes"), "--weights",
                                 str(weights), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "folder has no images or videos (0 other file(s))" in result.stdout
    assert "folder has no images or videos (1 other file(s))" in result.stdout
    assert "2 of 2 file(s) could not be read" in result.output


@pytest.mark.parametrize("args, message", [
    (["--weights", "missing.safetensors"], "not found"),
    (["--detector", "yolo"], "unknown detector"),
    (["--tta", "rotate"], "--tta"),
    (["--every", "0"], "--every"),
    (["--backend", "tflite"], "unknown backend"),
])
def test_predict_user_errors_exit_2_without_traceback(weights: Path, args: list[str], message: str) -> None:
    base = ["predict", str(SAMPLE), "--no-progress", "--device", "cpu"]
    if "--weights" not in args:
        base += ["--weights", str(weights)]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_predict_picture_without_a_face_is_a_result_not_an_error(weights: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (120, 120, 120)).save(blank)
    out_json = tmp_path / "r.json"
    result = runner.invoke(app, ["predict", str(blank), "--weights", str(weights), "--json", str(out_json),
                                 "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(no face)" in result.stdout and "1 picture(s) or frame(s) without a face, 0 error(s)" in result.stdout
    entry = json.loads(out_json.read_text())["results"][0]
    assert entry["faces"] == [] and entry["error"] is None


def test_predict_missing_file_is_an_error_entry(weights: Path) -> None:
    result = runner.invoke(app, ["predict", str(SAMPLE), "nowhere.jpg", "--weights", str(weights), "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 1
    assert "nowhere.jpg" in result.stdout and "not found" in result.stdout and "1 face(s)" in result.stdout


# -- video outputs -----------------------------------------------------------------------------------------

def _write_clip(path: Path, sample_bgr: np.ndarray, frames: int = 9, blank: tuple[int, ...] = (),
                fps: float = 10.0) -> Path:
    frame = cv2.resize(sample_bgr, (256, 256))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (256, 256))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full_like(frame, 120) if i in blank else np.roll(frame, i, axis=1))
    writer.release()
    return path


def test_predict_video_writes_annotated_video_and_emotion_plot(weights: Path, tmp_path: Path,
                                                               sample_bgr: np.ndarray) -> None:
    clip = _write_clip(tmp_path / "talk.avi", sample_bgr, frames=9, blank=(3, 4, 5))
    out = tmp_path / "ann"
    result = runner.invoke(app, ["predict", str(clip), "--every", "3", "--weights", str(weights), "--annotate",
                                 str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    video = next(out.glob("talk.annotated.*"))
    assert video.suffix in (".mp4", ".avi") and f"annotated video: {video}" in result.stdout
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 9 and frames[0].shape == (256, 256, 3)  # every frame, not only the sampled ones
    # frames 1-2 carry frame 0's box (drawn); the blank frames 3-5 have no face, so nothing is drawn there
    assert frames[4].std() < 5 and abs(float(frames[4].mean()) - 120) < 10  # still uniform grey (lossy codec)
    plain = np.roll(cv2.resize(sample_bgr, (256, 256)), 1, axis=1).astype(int)
    assert (np.abs(frames[1].astype(int) - plain).max(-1) > 100).mean() > 0.01
    plot = out / "talk.emotions.png"
    assert plot.is_file() and f"emotion-over-time plot: {plot}" in result.stdout
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert sorted(p.name for p in (out / "talk").iterdir()) == [
        "frame_000000.jpg", "frame_000003.jpg", "frame_000006.jpg"]


def test_video_writer_falls_back_to_mjpg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit.inference import video

    monkeypatch.setattr(video, "CODECS", (("ZZZZ", ".mp4"), ("MJPG", ".avi")))
    writer, path = video.open_writer(tmp_path / "x.annotated", 12.0, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 50 * i, np.uint8))
    writer.release()
    assert path.name == "x.annotated.avi" and not (tmp_path / "x.annotated.mp4").exists()
    cap = cv2.VideoCapture(str(path))
    assert cap.read()[0]
    cap.release()
    monkeypatch.setattr(video, "CODECS", (("ZZZZ", ".mp4"),))
    with pytest.raises(OSError, match="video writer"):
        video.open_writer(tmp_path / "y", 12.0, (64, 48))


def test_emotion_timeline_uses_the_largest_face(tmp_path: Path) -> None:
    from ferkit.inference.video import largest_face, plot_emotion_timeline

    def face(box: list[int], dominant: str) -> dict:
        emotions = {c: (0.9 if c == dominant else 0.1 / 6) for c in CLASSES}
        return {"box": box, "emotions": emotions, "dominant": dominant, "face_score": 1.0}

    small, big = face([0, 0, 10, 10], "sad"), face([50, 50, 40, 40], "happy")
    assert largest_face([small, big]) is big and largest_face([]) is None
    path = plot_emotion_timeline([0.0, 0.5, 1.0], [[small, big], [], [small]], CLASSES, tmp_path / "t.png")
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_annotator_names_keep_every_dot_and_stay_unique(tmp_path: Path) -> None:
    from ferkit.inference.batch import Annotator

    annotator = Annotator(tmp_path)
    # Date-stamped names: only the extension is replaced, so two photos of one day stay apart.
    assert annotator.target(Path("party.2024.01.05.jpg")) == tmp_path / "party.2024.01.05.jpg"
    assert annotator.target(Path("party.2024.01.06.jpg")) == tmp_path / "party.2024.01.06.jpg"
    # The same stem twice (a .png beside a .jpg) gets a numbered second name, and a third.
    assert annotator.target(Path("party.2024.01.06.png")) == tmp_path / "party.2024.01.06-2.jpg"
    assert annotator.target(Path("party.2024.01.06.webp")) == tmp_path / "party.2024.01.06-3.jpg"
    assert annotator.target(Path("sub/x.y.png")) == tmp_path / "sub" / "x.y.jpg"
