"""NudeNet's YOLOv8n detector (``320n.onnx``) on photo composites; fidelity = box agreement.

The model comes out of the ``nudenet`` wheel; nudenet itself (and OpenCV) is
never installed. Licence: the wheel's metadata says MIT, but its LICENSE file
is AGPL-3.0 and the model's own metadata says "Ultralytics, AGPL-3.0": it is
downloaded on the user's machine and never redistributed here.

Preprocessing and decoding follow nudenet 3.4.2's ``nudenet/nudenet.py``
(``_read_image``, ``_postprocess``): pad the image at the bottom/right to a
square, resize to 320×320, RGB in [0, 1]; the output ``[N, 22, 2100]`` holds a
box (cx, cy, w, h) and 18 class scores per anchor; keep anchors whose best
score is ≥ 0.25 and suppress overlaps (IoU > 0.45, class-agnostic, as
``cv2.dnn.NMSBoxes``). Resizing uses Pillow's bilinear filter rather than
OpenCV's, so scores differ slightly from nudenet's; both models here see the
same inputs. Boxes stay in the 320×320 frame (IoU is unchanged by the scale).

Photos with people are scarce offline: the inputs are seeded composites of the
photos that ship with scikit-image (astronaut, camera, and others as
backgrounds) and matplotlib (grace_hopper): crops, flips and brightness
changes, pasted at random sizes onto other photos. The detector has no labels
here: the metric is box F1 against the original model's detections (same class,
IoU ≥ 0.5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from bench.real.base import Task, extract, fetch_wheel, sha256

NAME = "nudenet"
VERSION = "3.4.2"
SKIMAGE = "0.26.0"   # the scikit-image wheel the photos come from
SIZE = 320
SEED = 0
SCORE, NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5
PEOPLE = ["astronaut.png", "camera.png"]
BACKGROUNDS = ["coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
               "brick.png", "grass.png", "gravel.png"]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a [n, 4]`` and ``b [m, 4]`` given as (x1, y1, x2, y2)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        order = order[1:][iou(boxes[i:i + 1], boxes[order[1:]])[0] <= threshold]
    return np.asarray(keep, dtype=np.int64)


def decode(output: np.ndarray, score: float = SCORE, nms_iou: float = NMS_IOU) -> dict:
    """One image's ``[4 + classes, anchors]`` output → boxes (x1, y1, x2, y2), scores, classes."""
    rows = np.asarray(output, np.float32).T
    cls_scores = rows[:, 4:]
    best = cls_scores.max(1)
    sel = best >= score
    cx, cy, w, h = rows[sel, :4].T
    boxes = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0, SIZE)
    keep = nms(boxes, best[sel], nms_iou)
    return {"boxes": boxes[keep], "scores": best[sel][keep],
            "classes": cls_scores[sel].argmax(1)[keep]}


def match(ref: dict, cand: dict, threshold: float = MATCH_IOU) -> int:
    """Reference detections (best score first) matched one-to-one by a candidate detection of
    the same class with IoU ≥ ``threshold``; returns the number matched."""
    if not len(ref["boxes"]) or not len(cand["boxes"]):
        return 0
    overlap = iou(ref["boxes"], cand["boxes"])
    overlap[ref["classes"][:, None] != cand["classes"][None, :]] = 0.0
    used = np.zeros(len(cand["boxes"]), bool)
    matched = 0
    for i in np.argsort(-ref["scores"], kind="stable"):
        row = np.where(used, -1.0, overlap[i])
        j = int(row.argmax())
        if row[j] >= threshold:
            used[j] = True
            matched += 1
    return matched


def box_f1(refs: list[dict], cands: list[dict], threshold: float = MATCH_IOU) -> float:
    """F1 of candidate detections against reference detections over all images (1.0 when
    neither model detects anything)."""
    tp = sum(match(r, c, threshold) for r, c in zip(refs, cands))
    total = sum(len(r["boxes"]) for r in refs) + sum(len(c["boxes"]) for c in cands)
    return 1.0 if total == 0 else 2.0 * tp / total


def letterbox(image) -> np.ndarray:
    """A PIL image → ``[3, 320, 320]`` float32: padded bottom/right to a square, resized."""
    from PIL import Image
    image = image.convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(image, (0, 0))
    arr = np.asarray(canvas.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _photos(cache: Path) -> tuple[list, list]:
    from PIL import Image
    wheel = fetch_wheel("scikit-image", SKIMAGE, cache, platform="manylinux_2_28_x86_64",
                        python="3.11")  # only its photos are used: any interpreter gets this one
    folder = cache / NAME / "photos"

    def load(name: str):
        return Image.open(extract(wheel, f"skimage/data/{name}", folder / name)).convert("RGB")
    people = [load(n) for n in PEOPLE]
    try:
        import matplotlib
        people.append(Image.open(Path(matplotlib.get_data_path()) / "sample_data" /
                                 "grace_hopper.jpg").convert("RGB"))
    except (ImportError, OSError):
        pass
    return people, [load(n) for n in BACKGROUNDS]


def scene(rng: np.random.Generator, people: list, backgrounds: list):
    """One seeded composite: a background photo (or plain colour) with 0-3 people pasted in,
    or a crop of a people photo on its own."""
    from PIL import Image, ImageEnhance, ImageOps
    w, h = (int(v) for v in rng.integers(280, 640, 2))
    if rng.random() < 0.3:
        src = people[rng.integers(len(people))]
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(src.width * s), int(src.height * s)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x, y, x + cw, y + ch))
        img = ImageOps.mirror(img) if rng.random() < 0.5 else img
    else:
        if rng.random() < 0.8:
            img = backgrounds[rng.integers(len(backgrounds))].resize((w, h), Image.BILINEAR)
        else:
            img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        for _ in range(int(rng.integers(0, 4))):
            src = people[rng.integers(len(people))]
            side = int(min(w, h) * rng.uniform(0.3, 0.8))
            patch = src.resize((side, int(side * src.height / src.width)), Image.BILINEAR)
            patch = ImageOps.mirror(patch) if rng.random() < 0.5 else patch
            img.paste(patch, (int(rng.integers(0, max(1, w - side))),
                              int(rng.integers(0, max(1, h - patch.height)))))
    return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))


def pin_input(src: Path, dest: Path) -> Path:
    """Copy of the model with input ``[batch, 3, 320, 320]`` (the size nudenet feeds it), so that
    shapes and MACs are known; the symbolic output shape is cleared and re-inferred."""
    if dest.exists():
        return dest
    model = onnx.load(str(src))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d in dims[2:]:
        d.Clear()
        d.dim_value = SIZE
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    onnx.save(model, str(dest))
    return dest


#: Calibration scenes drawn before the test scenes (the rest are drawn after them).
FIRST_CALIB = 8


def prepare(cache: Path, quick: bool = False) -> Task:
    wheel = fetch_wheel("nudenet", VERSION, cache)
    shipped = extract(wheel, "nudenet/320n.onnx", cache / NAME / "320n.onnx")
    model = pin_input(shipped, cache / NAME / "320n_fixed320.onnx")
    people, backgrounds = _photos(cache)
    n_eval, n_calib = (16, 8) if quick else (96, 160)
    rng = np.random.default_rng(SEED)
    # the first 8 scenes calibrate and the next n_eval are the test set, as in the earlier
    # runs (so every row is measured on the same images); more calibration scenes follow
    x = np.stack([letterbox(scene(rng, people, backgrounds)) for _ in range(n_eval + FIRST_CALIB)])
    extra = [letterbox(scene(rng, people, backgrounds)) for _ in range(n_calib - FIRST_CALIB)]
    calib = np.concatenate([x[:FIRST_CALIB], np.stack(extra)]) if extra else x[:FIRST_CALIB]
    test_x = x[FIRST_CALIB:]
    batches = [{"images": test_x[i:i + 16]} for i in range(0, len(test_x), 16)]

    def detections(outputs: list[dict]) -> list[dict]:
        return [decode(o) for out in outputs for o in out["output0"]]

    return Task(
        name=NAME, title=f"NudeNet {VERSION} detector (YOLOv8n, 320n.onnx)",
        source=f"nudenet=={VERSION} wheel, nudenet/320n.onnx; wheel metadata MIT, LICENSE file "
               "and model metadata AGPL-3.0 (Ultralytics): downloaded, never redistributed",
        model_path=model, calib={"images": calib}, evaluate=batches,
        timing={"images": test_x[:1]}, metric="box F1 vs original", score=None,
        agree=lambda r, c: box_f1(detections(r), detections(c)),
        agreement=f"box F1 against the original's detections (same class, IoU ≥ {MATCH_IOU})",
        notes=[f"{n_eval} seeded composites of scikit-image {SKIMAGE} and matplotlib sample photos "
               f"(people pasted onto other photos, crops, flips, brightness); {n_calib} other "
               "composites for calibration; timed at batch 1",
               "no labels: the task metric is agreement with the original model's boxes"],
        info={"model_sha256": sha256(shipped), "evaluate": n_eval, "calib": n_calib})
