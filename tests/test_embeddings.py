"""`--embeddings`: each ok row keeps the normalised global-view embedding its labels came from, in float16, with no
extra encoder pass; faiss and DuckDB find planted near-duplicates in an output as docs/CURATION.md shows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main as cli
from pipeline.config import DecodeConfig, ModelConfig, ScoringConfig, VocabularyConfig
from pipeline.models.spec import resolve_model
from pipeline.schema import DECODE_ERROR, OK, READ_ERROR
from pipeline.stages.decode import decode_for_views
from pipeline.stages.read_decode import ReadDecodeStage
from pipeline.stages.score_rows import ScoreStage
from pipeline.vocab import load_vocabulary

from .support import TINY_MODEL, labels_file, photo
from .test_consumers import CURATION, doc_block, run_doc_commands, run_doc_python

ROOT = Path(__file__).resolve().parents[1]


class _CountingEncoder:
    def __init__(self, encode) -> None:
        self.encode, self.views = encode, 0

    def __call__(self, views):
        self.views += int(views.shape[0])
        return self.encode(views)


def _stage(tmp_path: Path, method: str, embeddings: bool) -> ScoreStage:
    vocabulary = load_vocabulary(VocabularyConfig(labels=str(labels_file(tmp_path, ["coffee", "rocket", "cat"]))), {})
    model = resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random", device="cpu", cache_dir=str(tmp_path / "cache")))
    scoring = ScoringConfig(method=method, crops=4, regions=1, steps=1)
    stage = ScoreStage(model, scoring, vocabulary, decode_for_views(model.image_size, [scoring]), {}, cpu_threads=1, embeddings=embeddings)
    stage.scorer.encode_image = _CountingEncoder(stage.scorer.encode_image)
    return stage


def _decoded(tmp_path: Path) -> pa.Table:
    Image.fromarray(photo("coffee")).resize((160, 120)).save(tmp_path / "coffee.jpg", quality=90)
    Image.fromarray(photo("rocket")).resize((90, 140)).save(tmp_path / "rocket.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    names = ["broken.jpg", "coffee.jpg", "missing.jpg", "rocket.png"]
    listing = pa.table({"key": names, "path": [str(tmp_path / name) for name in names]})
    return ReadDecodeStage(DecodeConfig(min_short_side=64), {})(listing)


@pytest.mark.parametrize("method", ["clip", "lgca"])
def test_the_embedding_column_costs_no_encoder_pass_and_is_the_global_view(tmp_path, method):
    decoded = _decoded(tmp_path)
    plain, with_embeddings = _stage(tmp_path, method, False), _stage(tmp_path, method, True)
    rows, embedded = plain(decoded), with_embeddings(decoded)
    assert with_embeddings.scorer.encode_image.views == plain.scorer.encode_image.views  # not one view more
    assert "embedding" not in rows.column_names
    assert embedded.drop_columns(["embedding"]).equals(rows)  # the labels are the same rows
    dim = resolve_model(ModelConfig(name=TINY_MODEL, pretrained="random")).embed_dim
    assert embedded.schema.field("embedding").type == pa.list_(pa.float16(), dim)
    assert embedded.column_names.index("embedding") == embedded.column_names.index("pretrained") + 1
    statuses = embedded.column("status").to_pylist()
    assert statuses == [DECODE_ERROR, OK, READ_ERROR, OK]
    vectors = embedded.column("embedding").to_pylist()
    assert [v is None for v in vectors] == [s != OK for s in statuses]
    images = [decoded_index for decoded_index, status in enumerate(statuses) if status == OK]
    global_emb = with_embeddings.scorer.embed(
        [with_embeddings._pixels(decoded, images)[0][i] for i in images],
        [decoded.column("key")[i].as_py() for i in images],
        [(decoded.column("width")[i].as_py(), decoded.column("height")[i].as_py()) for i in images],
    ).global_emb.numpy()
    kept = np.array([vectors[i] for i in images], dtype=np.float32)
    assert np.allclose(np.linalg.norm(kept, axis=1), 1.0, atol=2e-3)
    assert np.allclose(kept, global_emb, atol=2e-3)  # float16 rounding of f(x), nothing else


@pytest.fixture
def near_duplicates(tmp_path, monkeypatch) -> Path:
    """The workspace docs/CURATION.md's embeddings example assumes: photos/ with two re-saved copies, examples/."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((ROOT / "examples" / "images").glob("*.jpg")):
        (photos / image.name).write_bytes(image.read_bytes())
    cat = Image.open(photos / "cat.jpg")
    cat.resize((int(cat.width * 0.8), int(cat.height * 0.8))).save(photos / "cat-resaved.jpg", quality=70)
    Image.open(photos / "rocket.jpg").save(photos / "rocket-resaved.jpg", quality=60)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.integration
def test_faiss_and_duckdb_find_the_planted_near_duplicates_as_the_docs_say(near_duplicates, ray_local):
    run_doc_commands(doc_block(CURATION, "embeddings-run"))
    output = near_duplicates / "emb"
    manifest = json.loads((output / "_manifest.json").read_text())
    record = manifest["embeddings"]
    assert (record["column"], record["dim"], record["dtype"], record["normalised"]) == ("embedding", 64, "float16", True)
    assert record["model"]["name"] == "fashion-clip" and record["model"]["weights_sha256"] == manifest["model"]["weights_sha256"]
    planted = [("cat-resaved.jpg", "cat.jpg"), ("rocket-resaved.jpg", "rocket.jpg")]

    found = run_doc_python(doc_block(CURATION, "faiss-neighbours"))
    assert found["duplicates"] == planted
    pairs = run_doc_python(doc_block(CURATION, "duckdb-near-duplicates"))["pairs"]
    assert sorted((first, second) for first, second, _ in pairs) == planted

    frame = pd.read_parquet(output)
    assert len(frame) == 7 and frame["embedding"].map(len).eq(64).all()
    polars = pl.read_parquet(output / "*.parquet")
    assert polars.schema["embedding"] == pl.Array(pl.Float16, 64) or polars.schema["embedding"].size == 64
    assert pq.read_schema(next(output.glob("part-*.parquet"))).field("embedding").type == pa.list_(pa.float16(), 64)


@pytest.mark.integration
def test_a_resume_cannot_change_whether_rows_hold_embeddings(near_duplicates, ray_local):
    run_doc_commands(doc_block(CURATION, "embeddings-run"))
    line = doc_block(CURATION, "embeddings-run").replace("\\\n", " ").strip()
    resumed = [arg for arg in line.split()[1:] if arg != "--embeddings"] + ["--resume"]
    assert cli.main(resumed) == 2
    assert os.path.exists("emb/_SUCCESS")  # refused before anything was touched
