"""The second set of real models for scripts/fetch_models.py: kinds the first four do not cover.

    face_det    MediaPipe face detection (short range) .tflite, from the ``mediapipe==0.10.14`` wheel: an
                SSD-style detector (896 anchors: box regressors + scores), fp16 weights; 128x128 inputs in [-1, 1]
    face_mesh   MediaPipe face landmark .tflite (468 3-D points + face score), same wheel; 192x192 in [0, 1]
    vad         Silero VAD ``silero_vad.onnx`` from the ``silero-vad==6.2.3`` wheel: stateful (``state``
                [2, batch, 128] is not batch-first), a scalar int64 ``sr`` input, control flow (If);
                one 16 kHz chunk (512 samples + 64 of context) per call
    ppocr_rec   PP-OCRv4 text recognition (CTC) from ``rapidocr-onnxruntime==1.4.4``: output (batch, time,
                classes), gated per time step on the predicted character (``top1``)

It also makes the data of the first set's ``selfie`` (MediaPipe selfie segmentation; the model comes from the
same mediapipe wheel): real people, because on drawn head-and-shoulder shapes the model found no person in 13
of 24 images, and an IoU over empty masks scores a single stray pixel as 0.

Data, honestly made:

* faces: real photographs bundled in the ``scikit-image==0.26.0`` wheel (``astronaut.png``, the LFW subset
  ``lfw_subset.npy`` of 100 real faces and 100 non-faces, other scenes as backgrounds), cropped,
  scaled, rotated and re-lit; nothing is downloaded but the wheel.
* people (selfie): the two photographs of people in that wheel (``astronaut.png``, ``camera.png``), framed
  as a selfie or video call would frame them (head and shoulders to half the body), mirrored, rotated and
  re-lit. Two people only: the variety is in framing and light, not in who is in the picture.
* vad: audio-like 16 kHz signals made here: voiced speech-like syllables (glottal pulses with a pitch
  contour shaped by formant envelopes), fricative noise bursts, pauses, background noise at several
  SNRs, mains hum and music-like tones; each clip is streamed through the fp32 model chunk by chunk so
  that every sample carries the state the model really has at that point in the stream.
* ppocr_rec: text lines rendered with the machine's fonts (as PaddleOCR feeds its recognizer: height
  48, aspect kept, right-padded to 320, (x - 0.5) / 0.5).

Data layout: ``face_*`` and ``ppocr_rec`` are batch-first (sample i is ``arr[i:i+1]``). ``vad`` uses the
per-sample layout (sample i is ``arr[i]``, whose shape is the model's input shape: ``input`` (1, 576),
``state`` (2, 1, 128), ``sr`` () ), because its inputs are not batch-first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SKIMAGE = ("scikit-image", "0.26.0")
SILERO = ("silero-vad", "6.2.3")
MEDIAPIPE = ("mediapipe", "0.10.14")
RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
#: What the light tool environment installs (image decoding and text rendering only; seconds, no torch).
LIGHT_PACKAGES = ("pillow==13.0.0", "numpy==2.4.6")

VERSIONS = {"face_det": 1, "face_mesh": 1, "vad": 1, "ppocr_rec": 1, "selfie": 2}
MODEL_FILES = {"face_det": "model.tflite", "face_mesh": "model.tflite", "vad": "model.onnx", "ppocr_rec": "model.onnx",
               "selfie": "model.tflite"}
#: Built with the light tool environment (pillow), never the torch one.
NEEDS_LIGHT = {"face_det", "face_mesh", "ppocr_rec", "selfie"}

#: Where the face is in skimage's astronaut.png (x0, y0, x1, y1), hair to chin.
ASTRONAUT_FACE = (160, 30, 290, 190)
#: skimage's photographs of people and where each person's upper body is centred (x, y; 512x512 images).
PEOPLE = (("astronaut.png", (200, 270)), ("camera.png", (170, 260)))
BACKGROUNDS = ("coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg", "grass.png",
               "brick.png", "gravel.png", "hubble_deep_field.jpg", "color.png", "camera.png", "page.png")


# -- workers (run inside the light tool environment: numpy + pillow) ---------------------------------------


def _faces(src: Path) -> tuple[Any, list[Any], list[Any]]:
    """astronaut (RGB array), the 100 LFW faces (RGB arrays, 25x25 upscaled later), the backgrounds."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    astronaut = np.asarray(Image.open(src / "astronaut.png").convert("RGB"))
    lfw = np.load(src / "lfw_subset.npy", allow_pickle=False)[:100]  # the first 100 are faces
    faces = [np.repeat((f * 255).astype(np.uint8)[..., None], 3, axis=2) for f in lfw]
    backgrounds = [np.asarray(Image.open(src / name).convert("RGB")) for name in BACKGROUNDS]
    return astronaut, faces, backgrounds


def _augment(img: Any, rng: Any, size: int, *, angle: float) -> Any:
    """A square crop resized to ``size``, rotated by up to ``angle`` degrees, re-lit and slightly noisy (uint8)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageEnhance  # noqa: PLC0415

    pil = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
    if angle:
        pil = pil.rotate(float(rng.uniform(-angle, angle)), resample=Image.Resampling.BILINEAR)
    pil = ImageEnhance.Brightness(pil).enhance(float(rng.uniform(0.7, 1.3)))
    pil = ImageEnhance.Contrast(pil).enhance(float(rng.uniform(0.7, 1.3)))
    arr = np.asarray(pil, dtype=np.float32) + rng.normal(0, 3.0, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _crop(img: Any, cx: float, cy: float, side: float) -> Any:
    """A square crop around (cx, cy), clamped to the image."""
    h, w = img.shape[:2]
    side = int(min(side, h, w))
    x0 = int(min(max(cx - side / 2, 0), w - side))
    y0 = int(min(max(cy - side / 2, 0), h - side))
    return img[y0 : y0 + side, x0 : x0 + side]


def worker_face_images(src: Path, out: Path, kind: str, calib: int, evaluation: int) -> None:
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    astronaut, faces, backgrounds = _faces(src)
    rng = np.random.default_rng(11 if kind == "face_det" else 13)
    fx0, fy0, fx1, fy1 = ASTRONAUT_FACE
    fcx, fcy, fside = (fx0 + fx1) / 2, (fy0 + fy1) / 2, max(fx1 - fx0, fy1 - fy0)
    total = calib + evaluation
    images = []
    for n in range(total):
        if kind == "face_mesh":  # a face crop, roughly centred as the face detector hands it over
            if n % 2 == 0:
                crop = _crop(astronaut, fcx + rng.uniform(-12, 12), fcy + rng.uniform(-12, 12),
                             fside * rng.uniform(1.2, 1.6))
            else:
                crop = faces[int(rng.integers(len(faces)))]
            images.append(_augment(crop, rng, 192, angle=15.0).astype(np.float32) / 255.0)
            continue
        # face_det: a background scene with a real face pasted in (or none, one sample in four)
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        side = int(rng.integers(96, min(bg.shape[:2]) + 1))
        scene = _augment(_crop(bg, rng.uniform(0, bg.shape[1]), rng.uniform(0, bg.shape[0]), side), rng, 128,
                         angle=0.0)
        choice = n % 4
        if choice == 0:
            scene = _augment(_crop(astronaut, fcx + rng.uniform(-60, 60), fcy + rng.uniform(-20, 80),
                                   fside * rng.uniform(1.5, 3.5)), rng, 128, angle=10.0)
        elif choice in (1, 2):
            src_face = faces[int(rng.integers(len(faces)))] if choice == 1 else _crop(astronaut, fcx, fcy, fside)
            fsize = int(rng.integers(28, 80))
            face = _augment(np.ascontiguousarray(src_face), rng, fsize, angle=10.0)
            x, y = int(rng.integers(0, 128 - fsize)), int(rng.integers(0, 128 - fsize))
            scene = scene.copy()
            scene[y : y + fsize, x : x + fsize] = face
        images.append(scene.astype(np.float32) / 127.5 - 1.0)
    arr = np.stack(images).astype(np.float32)
    name = "input" if kind == "face_det" else "input_1"
    np.savez_compressed(out / "calibration.npz", **{name: arr[:calib]})
    np.savez_compressed(out / "evaluation.npz", **{name: arr[calib:]})
    preview = ((arr[calib] + (1.0 if kind == "face_det" else 0.0)) * (127.5 if kind == "face_det" else 255.0))
    Image.fromarray(np.clip(preview, 0, 255).astype(np.uint8)).save(out / "preview.png")


def worker_people_images(src: Path, out: Path, calib: int, evaluation: int) -> None:
    """Selfie-style frames of real people (``PEOPLE``), 256x256 RGB in [0, 1] as MediaPipe feeds the model:
    a square crop of 300-512 pixels around the person (head and shoulders to half the body), mirrored half
    the time, rotated by up to 10 degrees and re-lit; the two people alternate."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    people = [(np.asarray(Image.open(src / name).convert("RGB")), centre) for name, centre in PEOPLE]
    rng = np.random.default_rng(19)
    frames = []
    for n in range(calib + evaluation):
        img, (cx, cy) = people[n % len(people)]
        crop = _crop(img, cx + rng.uniform(-60, 60), cy + rng.uniform(-40, 60), rng.uniform(300, 512))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        frames.append(_augment(np.ascontiguousarray(crop), rng, 256, angle=10.0).astype(np.float32) / 255.0)
    arr = np.stack(frames)
    np.savez_compressed(out / "calibration.npz", input_1=arr[:calib])
    np.savez_compressed(out / "evaluation.npz", input_1=arr[calib:])
    Image.fromarray((arr[calib] * 255).astype(np.uint8)).save(out / "preview.png")


def worker_rec_lines(out: Path, words: list[str], calib: int, evaluation: int) -> None:
    """Text lines as PaddleOCR feeds its recognizer: height 48, aspect kept, right-padded to 320."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: PLC0415

    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf"))
    rng = np.random.default_rng(17)
    lines, texts = [], []
    for _ in range(calib + evaluation):
        n_words = int(rng.integers(1, 5))
        text = " ".join(words[int(rng.integers(len(words)))] for _ in range(n_words))
        if rng.random() < 0.3:
            text += f" {int(rng.integers(0, 100000))}"
        size = int(rng.integers(22, 34))
        font = (ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size) if fonts
                else ImageFont.load_default(size=size))
        dark = rng.random() < 0.2
        bg = tuple(int(c) for c in (rng.integers(0, 70, 3) if dark else rng.integers(170, 256, 3)))
        ink = tuple(int(c) for c in (rng.integers(180, 256, 3) if dark else rng.integers(0, 90, 3)))
        _left, top, right, bottom = font.getbbox(text)
        img = Image.new("RGB", (right + 12, max(bottom, size) + 10), bg)
        ImageDraw.Draw(img).text((6, 5 - min(top, 0)), text, fill=ink, font=font)
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
        width = min(320, int(np.ceil(48 * img.width / img.height)))
        arr = np.asarray(img.resize((width, 48), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        chw = ((arr - 0.5) / 0.5).transpose(2, 0, 1)
        padded = np.zeros((3, 48, 320), np.float32)
        padded[:, :, :width] = chw
        lines.append(padded)
        texts.append(text)
    arr = np.stack(lines)
    np.savez_compressed(out / "calibration.npz", x=arr[:calib])
    np.savez_compressed(out / "evaluation.npz", x=arr[calib:])
    (out / "texts.json").write_text(json.dumps({"calibration": texts[:calib], "evaluation": texts[calib:]}))


# -- audio (project .venv: numpy + onnxruntime) ---------------------------------------------------------------

SR = 16000
CHUNK, CONTEXT = 512, 64


def _speech_like(rng: Any, seconds: float) -> Any:
    """Voiced syllables (pitch contour, formant envelope, syllabic rhythm), fricatives and pauses."""
    import numpy as np  # noqa: PLC0415

    n = int(seconds * SR)
    out = np.zeros(n)
    pos = int(rng.integers(0, SR // 4))
    while pos < n:
        dur = int(rng.uniform(0.12, 0.35) * SR)
        end = min(n, pos + dur)
        t = np.arange(end - pos) / SR
        f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        harmonics = sum(np.sin(k * phase) / k for k in range(1, 30) if k * f0.max() < SR / 2)
        spec = np.fft.rfft(harmonics)
        freqs = np.fft.rfftfreq(len(harmonics), 1 / SR)
        envelope = np.zeros_like(freqs)
        for centre, width in ((rng.uniform(300, 900), 90), (rng.uniform(900, 2300), 120),
                              (rng.uniform(2300, 3200), 160)):
            envelope += 1.0 / (1.0 + ((freqs - centre) / width) ** 2)
        voiced = np.fft.irfft(spec * envelope, len(harmonics))
        if rng.random() < 0.35:  # a fricative onset: high-passed noise
            noise = np.fft.rfft(rng.normal(0, 1, len(t)))
            fric = np.fft.irfft(noise * (freqs > 3000), len(t))
            cut = len(t) // 3
            voiced[:cut] = fric[:cut] * 0.3 * np.abs(voiced).max() / (np.abs(fric).max() + 1e-9)
        shape = np.sin(np.pi * np.arange(len(t)) / len(t)) ** 0.7
        out[pos:end] = voiced * shape / (np.abs(voiced).max() + 1e-9) * rng.uniform(0.2, 0.8)
        pos = end + int(rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.2, 0.7)]) * SR)
    return out


def _background(rng: Any, n: int) -> Any:
    import numpy as np  # noqa: PLC0415

    t = np.arange(n) / SR
    kind = int(rng.integers(4))
    if kind == 0:  # pink-ish noise
        spec = np.fft.rfft(rng.normal(0, 1, n))
        bg = np.fft.irfft(spec / np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / SR), 20)), n)
    elif kind == 1:  # mains hum with harmonics
        bg = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 6)) / k for k in range(1, 6))
    elif kind == 2:  # music-like: held tones that change every half second
        notes = 220 * 2 ** (rng.integers(0, 24, int(n / SR * 2) + 1) / 12)
        f = np.repeat(notes, SR // 2)[:n]
        bg = np.sin(2 * np.pi * np.cumsum(f) / SR) + 0.3 * np.sin(4 * np.pi * np.cumsum(f) / SR)
    else:  # white noise
        bg = rng.normal(0, 1, n)
    return bg / (np.abs(bg).max() + 1e-9)


def vad_clips(count: int, seed: int) -> list[Any]:
    """Audio-like clips in [-1, 1]: speech-like over background, background alone, or near-silence."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    clips = []
    for i in range(count):
        seconds = float(rng.uniform(1.5, 3.0))
        n = int(seconds * SR)
        level = rng.uniform(0.005, 0.2)
        if i % 4 == 3:  # no speech at all
            clip = _background(rng, n) * rng.uniform(0.05, 0.5)
        else:
            clip = _speech_like(rng, seconds) + _background(rng, n) * level
        clips.append(np.clip(clip, -1, 1).astype(np.float32))
    return clips


def stream_samples(model: Path, clips: list[Any]) -> dict[str, Any]:
    """Every chunk of every clip as one per-sample entry, with the state fp32 has when that chunk arrives."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    inputs, states = [], []
    for clip in clips:
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, CONTEXT), np.float32)
        for start in range(0, len(clip) - CHUNK + 1, CHUNK):
            x = np.concatenate([context, clip[None, start : start + CHUNK]], axis=1)
            inputs.append(x)
            states.append(state)
            _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(SR, np.int64)})
            context = x[:, -CONTEXT:]
    return {"input": np.stack(inputs).astype(np.float32), "state": np.stack(states).astype(np.float32),
            "sr": np.full(len(inputs), SR, np.int64)}


# -- builders (project .venv) -----------------------------------------------------------------------------------


def _skimage_data(fm: Any, models: Path, manifest: dict[str, Any], work: Path) -> Path:
    wheel = fm.download_wheel(models, manifest, *SKIMAGE)
    src = work / "skimage"
    fm.extract_prefix(wheel, "skimage/data/", src)
    return src


def build_face(kind: str, fm: Any, models: Path, manifest: dict[str, Any], tools: Any, work: Path) -> dict[str, Any]:
    import shutil  # noqa: PLC0415

    wheel = fm.download_wheel(models, manifest, *MEDIAPIPE)
    member = ("mediapipe/modules/face_detection/face_detection_short_range.tflite" if kind == "face_det"
              else "mediapipe/modules/face_landmark/face_landmark.tflite")
    out = work / "out"
    fm.extract_member(wheel, member, out / "model.tflite")
    src = _skimage_data(fm, models, manifest, work)
    calib, evaluation = (48, 96) if kind == "face_det" else (32, 64)
    tools.run("face-images", "--src", str(src), "--out", str(out), "--kind", kind, "--calib", str(calib),
              "--eval", str(evaluation))
    shutil.rmtree(src)
    provenance = {"package": "mediapipe==0.10.14", "member": member,
                  "images": "scikit-image==0.26.0 skimage/data (astronaut.png, lfw_subset.npy, scenes)"}
    if kind == "face_det":
        return {"task": "detection", "metric": "cosine", "source": provenance,
                "description": "MediaPipe face detection, short range (896 anchors: 16 box/keypoint regressors and "
                               "a score each; fp16 weights); real faces on real scenes, 128x128 in [-1, 1]"}
    return {"task": "landmarks", "metric": "cosine", "source": provenance,
            "description": "MediaPipe face landmarks (468 x 3 coordinates and a face score; fp16 weights); "
                           "real face crops, 192x192 in [0, 1]"}


def build_face_det(fm: Any, models: Path, manifest: dict[str, Any], tools: Any, work: Path) -> dict[str, Any]:
    return build_face("face_det", fm, models, manifest, tools, work)


def build_face_mesh(fm: Any, models: Path, manifest: dict[str, Any], tools: Any, work: Path) -> dict[str, Any]:
    return build_face("face_mesh", fm, models, manifest, tools, work)


def build_vad(fm: Any, models: Path, manifest: dict[str, Any], tools: Any, work: Path) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415

    del tools
    wheel = fm.download_wheel(models, manifest, *SILERO)
    out = work / "out"
    fm.extract_member(wheel, "silero_vad/data/silero_vad.onnx", out / "model.onnx")
    np.savez_compressed(out / "calibration.npz", **stream_samples(out / "model.onnx", vad_clips(4, seed=21)))
    np.savez_compressed(out / "evaluation.npz", **stream_samples(out / "model.onnx", vad_clips(8, seed=22)))
    return {"task": "voice-activity", "metric": "iou", "layout": "per-sample",
            "source": {"package": "silero-vad==6.2.3", "member": "silero_vad/data/silero_vad.onnx"},
            "description": "Silero VAD v6 (opset 16, If/LSTM; state [2, batch, 128], scalar int64 sr); audio-like "
                           "16 kHz clips streamed chunk by chunk; gate: speech decision (p > 0.5) agreement"}


def build_ppocr_rec(fm: Any, models: Path, manifest: dict[str, Any], tools: Any, work: Path) -> dict[str, Any]:
    wheel = fm.download_wheel(models, manifest, *RAPIDOCR)
    out = work / "out"
    fm.extract_member(wheel, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", out / "model.onnx")
    words = sorted({w for s in fm.load_sentences() for w in s.replace(".", "").replace(",", "").split()})
    (work / "words.json").write_text(json.dumps(words))
    tools.run("rec-lines", "--src", str(work / "words.json"), "--out", str(out), "--calib", "32", "--eval", "64")
    return {"task": "text-recognition", "metric": "top1",
            "source": {"package": "rapidocr-onnxruntime==1.4.4", "member": "ch_PP-OCRv4_rec_infer.onnx"},
            "description": "PP-OCRv4 text recognition (CTC, 6625 classes, 40 steps at width 320); rendered text "
                           "lines 48x320; gate: per-step top-1 agreement"}


def build_selfie(fm: Any, models: Path, manifest: dict[str, Any], tools: Any, work: Path) -> dict[str, Any]:
    import shutil  # noqa: PLC0415

    member = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
    out = work / "out"
    fm.extract_member(fm.download_wheel(models, manifest, *MEDIAPIPE), member, out / "model.tflite")
    src = _skimage_data(fm, models, manifest, work)
    tools.run("people-images", "--src", str(src), "--out", str(out), "--calib", "16", "--eval", "24")
    shutil.rmtree(src)
    return {"task": "segmentation", "metric": "iou",
            "source": {"package": "mediapipe==0.10.14", "member": member,
                       "images": "scikit-image==0.26.0 skimage/data (astronaut.png, camera.png)"},
            "description": "MediaPipe selfie segmentation (fp16 weights); real people (two photographs, framed "
                           "as a selfie would frame them), 256x256 in [0, 1]"}


BUILDERS = {"face_det": build_face_det, "face_mesh": build_face_mesh, "vad": build_vad, "ppocr_rec": build_ppocr_rec,
            "selfie": build_selfie}


def run_worker(task: str, args: Any) -> bool:
    """The ``--worker`` tasks of this module; False when ``task`` is not one of them."""
    if task == "face-images":
        worker_face_images(args.src, args.out, args.kind, args.calib, args.eval)
    elif task == "people-images":
        worker_people_images(args.src, args.out, args.calib, args.eval)
    elif task == "rec-lines":
        worker_rec_lines(args.out, json.loads(Path(args.src).read_text()), args.calib, args.eval)
    else:
        return False
    return True
