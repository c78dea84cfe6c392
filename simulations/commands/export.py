"""``fedshift export``: a registry model (optionally with local weights) → edge.onnx."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Export a model to the ONNX file an edge runs: normalization tensors keep stable names so "
                     "the cloud's updates can be applied live; preprocessing, class names and a parameter "
                     "version travel in the file's metadata.")
    p.add_argument("--model", required=True, help="registry name (e.g. edge_cnn) or timm:<name>")
    p.add_argument("--weights", type=Path, help="local state dict (.pt/.pth) or .safetensors file")
    p.add_argument("--out", type=Path, required=True, help="output .onnx file")
    p.add_argument("--num-classes", type=int, default=10, help="classes the model predicts (default: 10)")
    p.add_argument("--image-size", type=int, default=32, help="input height = width in pixels (default: 32)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels (default: 3)")
    p.add_argument("--class-names", nargs="+", help="default: 0 .. num_classes-1")
    p.add_argument("--version", type=int, default=0, help="parameter version written to the metadata")
    p.add_argument("--norm-as-inputs", action="store_true",
                   help="keep normalization tensors as graph inputs (0 ms updates, slower inference)")


def run(args: argparse.Namespace) -> int:
    from core.export import export_onnx
    from core.models import create_model

    model = create_model(args.model, args.num_classes, in_chans=args.in_chans,
                         image_size=args.image_size, weights=args.weights).eval()
    info = export_onnx(model, args.out, (args.in_chans, args.image_size, args.image_size),
                       class_names=args.class_names, model_name=args.model, version=args.version,
                       norm_as_inputs=args.norm_as_inputs)
    log.info("wrote %s: %d normalization tensors (%s mode)", info.path, len(info.norm_names),
             "inputs" if info.norm_as_inputs else "initializers")
    return 0
