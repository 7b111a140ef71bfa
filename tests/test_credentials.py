"""One rule for credentials in URLs: what counts as one, and how it is masked."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, JobConfig, ModelConfig, VocabularyConfig
from pipeline.credentials import has_credentials, mask_credentials


@pytest.mark.parametrize(
    "url, masked",
    [
        ("http://bob:hunter2@host/x.jpg", "http://***@host/x.jpg"),
        ("http://:TOKEN@host/x.jpg", "http://***@host/x.jpg"),
        ("https://TOKEN@host/x.jpg", "https://***@host/x.jpg"),
        ("s3://key:secret@bucket/images/", "s3://***@bucket/images/"),
        (
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12",
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        ("https://a.blob.core.windows.net/c/x.png?sv=2022&sp=r&sig=abc%3D", "https://a.blob.core.windows.net/c/x.png?sv=2022&sp=r&sig=***"),
        ("https://storage.googleapis.com/b/x?X-Goog-Signature=ff&x=1", "https://storage.googleapis.com/b/x?X-Goog-Signature=***&x=1"),
        ("https://h/x.jpg?access_token=t&api_key=k&width=3", "https://h/x.jpg?access_token=***&api_key=***&width=3"),
    ],
)
def test_credentials_in_urls_are_found_and_masked(url, masked):
    assert has_credentials(url)
    assert mask_credentials(url) == masked
    assert has_credentials(masked)  # a masked URL is still refused when read: it cannot work


@pytest.mark.parametrize(
    "text",
    [
        "/data/me@2x.jpg",
        "/data/photo?sig=1.jpg",  # a local file name: no URL, no query
        "s3://bucket/a@b/c.jpg",
        "https://h/x.jpg?width=3&format=webp",
        "file:///data/x.jpg",
        "laion2b_s34b_b79k",
    ],
)
def test_plain_paths_and_harmless_queries_are_left_alone(text):
    assert not has_credentials(text)
    assert mask_credentials(text) == text


def test_every_url_a_job_records_is_checked_by_the_configuration():
    token = "https://t0ken@h.example/x"
    with pytest.raises(ConfigError, match=r"--pretrained https://\*\*\*@h.example/x"):
        ModelConfig(pretrained=token)
    with pytest.raises(ConfigError, match="--model"):
        ModelConfig(name=token)
    with pytest.raises(ConfigError, match="--labels"):
        VocabularyConfig(labels=token)
    with pytest.raises(ConfigError, match="--templates"):
        VocabularyConfig(labels="l.txt", templates="https://h/t.txt?token=abc")
    vocabulary = VocabularyConfig(labels="l.txt")
    with pytest.raises(ConfigError, match="--output"):
        JobConfig(inputs=("images/",), output="s3://k:s@b/out/", vocabulary=vocabulary)
    with pytest.raises(ConfigError, match="input"):
        JobConfig(inputs=("images/", "http://:tok@h/x/"), output="out/", vocabulary=vocabulary)
