"""The text side: each class's sentences and its class vector T_c, encoded in fp32 (docs/METHOD.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

TextEncoder = Callable[[Sequence[str]], torch.Tensor]  # n strings -> (n, D)

TEXT_CHUNK = 256  # sentences per text-encoder call


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
) -> torch.Tensor:
    """Class vectors T_c for one method.

    clip: g(p_c). ensemble: mean of template embeddings (CLIP's ensemble). descriptors, wca, lgca: the
    description embeddings weighted by softmax_j(exp(text_scale) * <t_cj, g(p_c)>); with
    `descriptor_weights="mean"` the descriptors method averages them instead (CuPL's plain mean, the
    descriptor baseline of WCA's code).

    Args:
        method: one of clip, ensemble, descriptors, wca, lgca.
        classes: class names.
        encode_text: maps n strings to (n, D) embeddings.
        descriptions, templates, prompt: as in `class_sentences`.
        text_scale: the description-weight temperature.
        descriptor_weights: softmax or mean, for the descriptors method.

    Returns:
        (C, D) float32 class vectors, L2-normalised, in the order of `classes`.
    """
    prompts = [prompt.format(name) for name in classes]
    if method == "clip":
        return encode_texts(encode_text, prompts)
    if method == "ensemble":
        sentences = class_sentences(classes, {}, templates, prompt)
    else:
        sentences = class_sentences(classes, descriptions, templates, prompt)
    flat = [s for group in sentences for s in group]
    embedded = encode_texts(encode_text, flat)
    groups = torch.split(embedded, [len(group) for group in sentences])
    if method == "ensemble" or (method == "descriptors" and descriptor_weights == "mean"):
        return F.normalize(torch.stack([group.mean(dim=0) for group in groups]), dim=-1)
    prompt_vecs = encode_texts(encode_text, prompts)
    vectors = []
    for group, anchor in zip(groups, prompt_vecs):
        weights = torch.softmax(math.exp(text_scale) * (group @ anchor), dim=0)  # (M,)
        vectors.append((weights[:, None] * group).sum(dim=0))
    return F.normalize(torch.stack(vectors), dim=-1)
