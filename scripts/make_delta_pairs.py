#!/usr/bin/env python3
"""Make real model version pairs for the delta benchmark from the cached digits model (torch, its own data).

    scripts/make_delta_pairs.py            # writes ~/.cache/edgefleet/delta_pairs/*.onnx (float32)

From ``models/digits/model.onnx`` (version N, trained by scripts/fetch_models.py) it trains, on the same
scikit-learn digits training split:
    head.onnx      a new classification head (last Linear re-initialised and retrained, backbone frozen)
    finetune.onnx  a full fine-tune of every weight (3 epochs, lower learning rate, augmented inputs)
    control.onnx   an unrelated model (an MLP, different graph and weights) as the control
The re-calibration pair needs no training (same weights, other calibration data): the benchmark makes it.
torch runs in fetch_models' throwaway tool environment (never the project's .venv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT_NAME = "delta_pairs"
FILES = ("head.onnx", "finetune.onnx", "control.onnx")


def worker(models: Path, out: Path) -> None:  # runs inside the tool environment
    import fetch_models  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    x, y, order = fetch_models.digits_data(1)
    train, evaluation = order[:1097], order[1297:]
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])

    def cnn() -> torch.nn.Sequential:
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )  # fmt: skip

    def load_base() -> torch.nn.Sequential:
        net = cnn()
        base = onnx.load(str(models / "digits" / "model.onnx"))
        state = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in base.graph.initializer}
        net.load_state_dict(state)
        return net

    def train_net(net: torch.nn.Module, params: list[torch.nn.Parameter], epochs: int, lr: float, noise: float) -> None:
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            perm = torch.randperm(len(yt), generator=gen)
            for start in range(0, len(yt), 64):
                b = perm[start : start + 64]
                xb = xt[b] + noise * torch.randn(xt[b].shape, generator=gen)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xb), yt[b]).backward()
                opt.step()

    def export(net: torch.nn.Module, name: str) -> None:
        net.eval()
        with torch.no_grad():
            acc = float((net(torch.from_numpy(x[evaluation])).argmax(1).numpy() == y[evaluation]).mean())
            torch.onnx.export(
                net, (torch.from_numpy(x[:2]),), str(out / name),
                input_names=["pixels"], output_names=["logits"],
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=13, dynamo=False,
            )  # fmt: skip
        print(f"{name}: evaluation accuracy {acc:.3f}")

    head = load_base()
    for p in head.parameters():
        p.requires_grad_(False)
    head[8] = torch.nn.Linear(64, 10)
    train_net(head, list(head[8].parameters()), 30, 2e-3, 0.0)
    export(head, "head.onnx")

    fine = load_base()
    train_net(fine, list(fine.parameters()), 3, 3e-4, 0.05)
    export(fine, "finetune.onnx")

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    train_net(mlp, list(mlp.parameters()), 40, 2e-3, 0.0)
    export(mlp, "control.onnx")


def pairs_dir() -> Path:
    import fetch_models  # noqa: PLC0415

    return fetch_models.cache_root() / OUT_NAME


def ensure_pairs() -> Path:
    """The pairs directory, training the pairs first if any file is missing."""
    import fetch_models  # noqa: PLC0415

    root = fetch_models.cache_root()
    out = pairs_dir()
    if all((out / f).is_file() for f in FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    env = fetch_models.ToolEnv(root / "toolenv-delta")
    try:
        import os  # noqa: PLC0415
        import subprocess  # noqa: PLC0415

        clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        clean.update(OMP_NUM_THREADS="2", PYTHONHASHSEED="0")
        command = [str(env.python()), str(Path(__file__).resolve()), "--worker", str(root / "models"), str(out)]
        subprocess.run(command, check=True, env=clean)
    finally:
        env.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("MODELS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return 0
    print(ensure_pairs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
