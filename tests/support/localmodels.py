"""A small real model built locally: an MLP trained on scikit-learn's digits, written as ONNX.

Used where a test needs a quick *trained* classifier with a labelled metric and no fetch (the shared
fetcher's models in ``tests/support/models.py`` are preferred where they exist). Training is a few
hundred milliseconds of numpy; the result is cached per seed in the given directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_data() -> DigitsData:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)  # pixel intensities 0..16, as the data set has them
    rng = np.random.default_rng(1234)
    order = rng.permutation(len(x))
    split = int(len(x) * 0.8)
    return DigitsData(x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]])


def _train_mlp(data: DigitsData, *, hidden: int, seed: int, epochs: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = data.x_train / 16.0
    y = np.eye(10, dtype=np.float32)[data.y_train]
    w1 = rng.normal(0, np.sqrt(2 / 64), (64, hidden)).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = rng.normal(0, np.sqrt(2 / hidden), (hidden, 10)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    lr = 0.1
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            xb, yb = x[start : start + 64], y[start : start + 64]
            h = np.maximum(xb @ w1 + b1, 0)
            logits = h @ w2 + b2
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - yb) / len(xb)
            gw2, gb2 = h.T @ g, g.sum(0)
            gh = (g @ w2.T) * (h > 0)
            gw1, gb1 = xb.T @ gh, gh.sum(0)
            w1 -= lr * gw1
            b1 -= lr * gb1
            w2 -= lr * gw2
            b2 -= lr * gb2
    # fold the /16 input scaling into the first layer so the model takes raw 0..16 pixels
    return [w1 / 16.0, b1, w2, b2]


def write_digits_onnx(path: Path, *, seed: int = 0, hidden: int = 32) -> Path:
    """Train (once per seed) and write ``input`` float32[N,64] (0..16) -> ``logits``, ``probabilities`` [N,10]."""
    if path.exists():
        return path
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = _train_mlp(digits_data(), hidden=hidden, seed=seed)
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in zip((w1, b1, w2, b2), ("w1", "b1", "w2", "b2"), strict=True)
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())
