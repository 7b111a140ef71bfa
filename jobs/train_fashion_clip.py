#!/usr/bin/env python3
"""Train the project's small image-text model on the Fashion-MNIST train split, contrastively, on the CPU.

The model is an open_clip custom architecture (examples/fashion/fashion-clip.json: a small ViT and a small
text transformer with open_clip's tokenizer). Each step renders training views with `pipeline.evaluation.scenes`
(objects from a third of the view to all of it, at random places, over clutter with fragments of other
objects; a share of views with no whole object, captioned as background) and pairs them with captions from
examples/fashion/templates.txt and the class descriptions of examples/fashion/descriptors.json. The test
split is never seen. Seeded and deterministic on one machine.

    .venv/bin/python jobs/train_fashion_clip.py            # about 23 minutes on 2 cores
    .venv/bin/lgca eval --data scenes/manifest.csv --labels examples/fashion/descriptors.json \
        --model examples/fashion/fashion-clip.json --pretrained examples/fashion/fashion-clip.safetensors

The weights are written as safetensors in float16 (half the size; the loader widens them to float32),
so that using them goes through the path users take: `--model CONFIG.json --pretrained FILE`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.evaluation.scenes import CLASSES, FASHION_MNIST_DIR, load_fashion_mnist, training_views  # noqa: E402
from pipeline.models.spec import architecture_name  # noqa: E402

FASHION = ROOT / "examples" / "fashion"
BACKGROUND = (  # captions of views with no whole object: the class the vocabulary never names
    "a cluttered background.",
    "random shapes and noise.",
    "pieces of things on a noisy background.",
    "colourful noise, stripes and rectangles.",
    "an empty background.",
)
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default (OpenAI) normalisation, as the pipeline applies it
STD = (0.26862954, 0.26130258, 0.27577711)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4500, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="views per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--empty", type=float, default=0.2, help="share of views with no whole object (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="fixes initialisation, views and captions (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--data", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument("--config", default=str(FASHION / "fashion-clip.json"), help="open_clip model config (default: %(default)s)")
    parser.add_argument("--descriptors", default=str(FASHION / "descriptors.json"), help="class descriptions (default: %(default)s)")
    parser.add_argument(
        "--templates", default=str(FASHION / "templates.txt"), help="caption templates, one per line (default: %(default)s)"
    )
    parser.add_argument("--output", default=str(FASHION / "fashion-clip.safetensors"), help="weights file to write (default: %(default)s)")
    args = parser.parse_args(argv)

    import open_clip
    import safetensors.torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = Path(args.config)
    architecture = architecture_name(str(config))  # registers it, keeping a preprocess_cfg if it has one
    model = open_clip.create_model(architecture)
    tokenizer = open_clip.get_tokenizer(architecture)
    train = load_fashion_mnist("train", args.data)
    descriptions = json.loads(Path(args.descriptors).read_text())
    templates = [line for line in Path(args.templates).read_text().splitlines() if line.strip()]
    captions = [[t.format(name) for t in templates] + list(descriptions[name]) for name in CLASSES]
    tokens = [tokenizer(group) for group in [*captions, list(BACKGROUND)]]  # per class, then background: (M_c, L)

    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    order = rng.permutation(len(train.labels))
    start, position = time.monotonic(), 0
    model.train()
    for step in range(args.steps):
        if position + args.batch_size > len(order):
            order, position = rng.permutation(len(train.labels)), 0
        indices = order[position : position + args.batch_size]
        position += args.batch_size
        present = rng.random(len(indices)) >= args.empty
        views = (training_views(train, indices, size, generator, present=present) - mean) / std
        labels = torch.from_numpy(np.where(present, train.labels[indices], len(CLASSES)))
        loss = _step_loss(model, views, labels, tokens, rng)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - start
            print(
                f"step {step + 1}/{args.steps} loss {loss.item():.3f} logit_scale {model.logit_scale.exp().item():.1f} {elapsed:.0f} s",
                flush=True,
            )

    model.eval()
    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        state,
        str(output),
        metadata={"architecture": config.name, "seed": str(args.seed), "steps": str(args.steps), "data": "fashion-mnist train"},
    )
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) after {time.monotonic() - start:.0f} s")
    return 0


def _step_loss(model, views: torch.Tensor, labels: torch.Tensor, tokens: list[torch.Tensor], rng) -> torch.Tensor:
    """Symmetric contrastive loss against random captions of each class, with every same-class view a positive.

    Fashion-MNIST has ten classes, so a batch holds many views of each: in-batch CLIP loss would push
    same-class pairs apart. Views without a whole object form an eleventh class, background, so that
    clutter learns to match no clothing caption. Image to text is a softmax over one caption per class; text to image a
    softmax over the batch whose target spreads evenly over the caption's class. A third term asks two
    captions of a class to be nearer each other than to other classes' captions: with only ten classes
    the text tower otherwise collapses to one embedding in the first steps, before images carry signal.
    """
    draws = [group[rng.choice(len(group), size=2, replace=False)] for group in tokens]
    first, second = torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])  # (11, L) each
    texts = F.normalize(model.encode_text(torch.cat([first, second])), dim=-1)
    text, other = texts[: len(tokens)], texts[len(tokens) :]
    image = F.normalize(model.encode_image(views), dim=-1)
    scale = model.logit_scale.exp()
    logits = scale * image @ text.T  # (B, 11)
    classes = torch.arange(len(tokens))
    text_to_text = F.cross_entropy(scale * text @ other.T, classes)
    to_text = F.cross_entropy(logits, labels)
    present = torch.unique(labels)
    targets = (labels[None, :] == present[:, None]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    to_image = -(targets * F.log_softmax(logits.T[present], dim=1)).sum(dim=1).mean()
    return (to_text + to_image) / 2 + text_to_text


if __name__ == "__main__":
    sys.exit(main())
