"""The text side: each class's sentences and its class vector T_c, encoded in fp32 (docs/METHOD.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

TextEncoder = Callable[[Sequence[str]], torch.Tensor]  # n strings -> (n, D)

TEXT_CHUNK = 256  # sentences per text-encoder call
GROUP_SENTENCES = 8192  # sentences whose embeddings are held at once while computing class vectors


def encode_texts(encode_text: TextEncoder, texts: Sequence[str]) -> torch.Tensor:
    """Embed sentences in chunks of TEXT_CHUNK.

    Args:
        encode_text: maps n strings to (n, D) embeddings.
        texts: the sentences.

    Returns:
        (len(texts), D) float32 embeddings, L2-normalised.
    """
    chunks = [encode_text(list(texts[i : i + TEXT_CHUNK])).float() for i in range(0, len(texts), TEXT_CHUNK)]
    return F.normalize(torch.cat(chunks), dim=-1)


def class_sentences(
    classes: Sequence[str],
    descriptions: Mapping[str, Sequence[str]],
    templates: Sequence[str],
    prompt: str,
) -> list[list[str]]:
    """The sentences d_c1..d_cM of each class: its descriptions, else its templates, else its prompt.

    Args:
        classes: class names.
        descriptions: class name to its descriptions; a class may be missing or have none.
        templates: prompt templates with one `{}` for the class name.
        prompt: the label prompt p_c, with one `{}`.

    Returns:
        One list of sentences per class, in the order of `classes`.
    """
    sentences = []
    for name in classes:
        if descriptions.get(name):
            sentences.append(list(descriptions[name]))
        elif templates:
            sentences.append([template.format(name) for template in templates])
        else:
            sentences.append([prompt.format(name)])
    return sentences


def class_vectors(
    method: str,
    classes: Sequence[str],
    encode_text: TextEncoder,
    descriptions: Mapping[str, Sequence[str]],
    templates: Sequence[str],
    prompt: str,
    text_scale: float,
    descriptor_weights: str = "softmax",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class vectors T_c for one method.

    clip: g(p_c). ensemble: mean of template embeddings (CLIP's ensemble). descriptors, wca, lgca: the
    description embeddings weighted by softmax_j(exp(text_scale) * <t_cj, g(p_c)>); with
    `descriptor_weights="mean"` the descriptors method averages them instead (CuPL's plain mean, the
    descriptor baseline of WCA's code). Classes are embedded a group at a time (GROUP_SENTENCES), so memory
    holds one group's sentence embeddings, not the whole vocabulary's (10^5 classes x 80 templates would be
    16 GB at D=512).

    Args:
        method: one of clip, ensemble, descriptors, wca, lgca.
        classes: class names.
        encode_text: maps n strings to (n, D) embeddings.
        descriptions, templates, prompt: as in `class_sentences`.
        text_scale: the description-weight temperature.
        descriptor_weights: softmax or mean, for the descriptors method.
        progress: called with the number of sentences embedded since the last call (see `sentence_count`).

    Returns:
        (C, D) float32 class vectors, L2-normalised, in the order of `classes`.
    """
    report = progress or (lambda done: None)
    prompts = [prompt.format(name) for name in classes]
    if method == "clip":
        vectors = []
        for start in range(0, len(prompts), GROUP_SENTENCES):
            vectors.append(encode_texts(encode_text, prompts[start : start + GROUP_SENTENCES]))
            report(len(vectors[-1]))
        return torch.cat(vectors)
    sentences = class_sentences(classes, {} if method == "ensemble" else descriptions, templates, prompt)
    averaged = method == "ensemble" or (method == "descriptors" and descriptor_weights == "mean")
    vectors = []
    for group in _groups([len(s) for s in sentences]):
        embedded = encode_texts(encode_text, [s for i in group for s in sentences[i]])
        per_class = torch.split(embedded, [len(sentences[i]) for i in group])
        if averaged:
            vectors.extend(embedding.mean(dim=0) for embedding in per_class)
            report(len(embedded))
            continue
        anchors = encode_texts(encode_text, [prompts[i] for i in group])
        for embedding, anchor in zip(per_class, anchors):
            weights = torch.softmax(math.exp(text_scale) * (embedding @ anchor), dim=0)  # (M,)
            vectors.append((weights[:, None] * embedding).sum(dim=0))
        report(len(embedded) + len(anchors))
    return F.normalize(torch.stack(vectors), dim=-1)


def sentence_count(
    method: str, classes: Sequence[str], descriptions: Mapping[str, Sequence[str]], templates: Sequence[str], descriptor_weights: str
) -> int:
    """How many sentences `class_vectors` embeds: the sum its `progress` calls reach."""
    if method == "clip":
        return len(classes)
    sentences = sum(len(s) for s in class_sentences(classes, {} if method == "ensemble" else descriptions, templates, "{}"))
    averaged = method == "ensemble" or (method == "descriptors" and descriptor_weights == "mean")
    return sentences if averaged else sentences + len(classes)


def _groups(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive class indices, cut where a group's sentences reach GROUP_SENTENCES (a class is never split)."""
    groups: list[list[int]] = [[]]
    total = 0
    for index, size in enumerate(sizes):
        if groups[-1] and total + size > GROUP_SENTENCES:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += size
    return [group for group in groups if group]
