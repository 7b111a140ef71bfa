"""Vocabularies: label and descriptor formats, templates, errors naming the entry, digests, remote files."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, VocabularyConfig
from pipeline.scoring.text import class_sentences
from pipeline.vocab import Vocabulary, VocabularyError, load_vocabulary, parse_labels, parse_templates


def _load(tmp_path, name: str, content: str | bytes, **config) -> Vocabulary:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return load_vocabulary(VocabularyConfig(labels=str(path), **config))


def _error(tmp_path, name: str, content: str | bytes) -> str:
    with pytest.raises(VocabularyError) as error:
        _load(tmp_path, name, content)
    return str(error.value)


# ---------------------------------------------------------------- formats


def test_txt_skips_comments_and_blanks_and_strips(tmp_path):
    vocab = _load(tmp_path, "labels.txt", "# my classes\n\ncat\n  dog  \n\t# indented comment\ncoffee cup\n\n")
    assert vocab.classes == ("cat", "dog", "coffee cup")
    assert vocab.descriptions == {}
    assert vocab.templates is None
    assert vocab.prompt == "a photo of a {}."


def test_txt_with_crlf_and_no_final_newline(tmp_path):
    assert _load(tmp_path, "labels.txt", "cat\r\ndog").classes == ("cat", "dog")


def test_unknown_extension_is_read_as_text(tmp_path):
    """Only .json/.yaml/.yml are structured; a `.labels` file is one class per line, brackets and all."""
    assert _load(tmp_path, "my.labels", '["cat"]\ndog\n').classes == ('["cat"]', "dog")


@pytest.mark.parametrize(
    "name, content",
    [
        ("labels.json", '["cat", " dog ", "coffee cup"]'),
        ("labels.JSON", '["cat", "dog", "coffee cup"]'),
        ("labels.yaml", "- cat\n- dog\n- coffee cup\n"),
        ("labels.yml", "# classes\n- cat\n- dog\n- coffee cup\n"),
    ],
)
def test_structured_lists(tmp_path, name, content):
    vocab = _load(tmp_path, name, content)
    assert vocab.classes == ("cat", "dog", "coffee cup")
    assert vocab.descriptions == {}


CUPL = {
    "cat": ["A cat is a small furry animal.", " A photo of a cat, which has whiskers. "],
    "dog": ["A dog is a loyal pet."],
    "coffee cup": ["A cup holding hot coffee."],
}


def test_descriptors_json_dict(tmp_path):
    """The CuPL / DCLIP format: {class: [sentences]}; order of keys is the class order, sentences stripped."""
    vocab = _load(tmp_path, "cupl.json", json.dumps(CUPL))
    assert vocab.classes == ("cat", "dog", "coffee cup")
    assert vocab.descriptions["cat"] == ("A cat is a small furry animal.", "A photo of a cat, which has whiskers.")
    assert vocab.descriptions["coffee cup"] == ("A cup holding hot coffee.",)


def test_descriptors_yaml_dict(tmp_path):
    vocab = _load(tmp_path, "d.yaml", "cat:\n  - furry\n  - whiskers\ndog: []\nbird:\n")
    assert vocab.classes == ("cat", "dog", "bird")
    assert vocab.descriptions == {"cat": ("furry", "whiskers"), "dog": (), "bird": ()}


def test_class_without_descriptions_falls_back_to_templates(tmp_path):
    """An empty list (or null) means "no descriptions": the scorer then embeds the prompt templates for it."""
    vocab = _load(tmp_path, "d.json", json.dumps({"cat": ["a furry pet"], "dog": [], "bird": None}))
    sentences = class_sentences(vocab.classes, vocab.descriptions, ("a photo of a {}.", "art of a {}."), vocab.prompt)
    assert sentences == [["a furry pet"], ["a photo of a dog.", "art of a dog."], ["a photo of a bird.", "art of a bird."]]


def test_descriptor_keys_are_stripped(tmp_path):
    vocab = _load(tmp_path, "d.json", json.dumps({" cat ": ["furry"]}))
    assert vocab.classes == ("cat",)
    assert vocab.descriptions == {"cat": ("furry",)}


# ---------------------------------------------------------------- errors naming the entry


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("labels.txt", "", "labels.txt has no classes; list at least one class name"),
        ("labels.txt", "# only a comment\n\n", "labels.txt has no classes"),
        ("labels.json", "[]", "labels.json has no classes"),
        ("labels.json", "{}", "labels.json has no classes"),
        ("labels.json", "", "labels.json is not valid JSON"),
        ("labels.yaml", "", "labels.yaml: expected a list of class names or a mapping {class: [descriptions]}, got NoneType"),
        ("labels.json", '"cat"', "expected a list of class names or a mapping {class: [descriptions]}, got str"),
        ("labels.json", "3", "got int"),
    ],
)
def test_empty_or_shapeless_files(tmp_path, name, content, message):
    assert message in _error(tmp_path, name, content)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("labels.txt", "cat\ndog\n\ncat\n", "labels.txt line 4: duplicate class 'cat' (first at line 1)"),
        ("labels.txt", "cat\n cat\n", "line 2: duplicate class 'cat' (first at line 1)"),  # equal once stripped
        ("labels.json", '["a", "b", "a"]', "labels.json entry 2: duplicate class 'a' (first at entry 0)"),
        ("labels.yaml", "- a\n- b\n- b\n", "labels.yaml entry 2: duplicate class 'b' (first at entry 1)"),
        ("labels.json", '{"cat": [], " cat": []}', "key ' cat': duplicate class 'cat' (first at key 'cat')"),
    ],
)
def test_duplicate_class_names_both_positions(tmp_path, name, content, message):
    assert message in _error(tmp_path, name, content)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("labels.json", '["cat", 3]', "labels.json entry 1: class names must be strings, got int 3"),
        ("labels.json", '["cat", null]', "entry 1: class names must be strings, got NoneType None"),
        ("labels.json", '["cat", ["dog"]]', "entry 1: class names must be strings, got list ['dog']"),
        ("labels.yaml", "- cat\n- 42\n", "labels.yaml entry 1: class names must be strings, got int 42"),
        ("labels.yaml", "1: [one]\n", "labels.yaml key 1: class names must be strings, got int 1"),
        ("labels.json", '["cat", "  "]', "labels.json entry 1: empty class name"),
        ("labels.json", '{"": ["x"]}', "labels.json key '': empty class name"),
    ],
)
def test_bad_class_entries(tmp_path, name, content, message):
    assert message in _error(tmp_path, name, content)


@pytest.mark.parametrize(
    "descriptions, message",
    [
        ('"a furry pet"', "class 'cat': descriptions must be a list of strings, got str"),
        ('{"a": 1}', "class 'cat': descriptions must be a list of strings, got dict"),
        ('["ok", 3]', "class 'cat' description 1: expected a non-empty string, got 3"),
        ('["ok", "  "]', "class 'cat' description 1: expected a non-empty string, got '  '"),
        ("[null]", "class 'cat' description 0: expected a non-empty string, got None"),
    ],
)
def test_bad_descriptions(tmp_path, descriptions, message):
    text = '{"dog": ["barks"], "cat": %s}' % descriptions
    assert message in _error(tmp_path, "d.json", text)


def test_bad_yaml_is_named(tmp_path):
    message = _error(tmp_path, "labels.yaml", "- cat\n- [dog\n")
    assert "labels.yaml is not valid YAML" in message


def test_bad_json_is_named_with_position(tmp_path):
    message = _error(tmp_path, "labels.json", '["cat", "dog",]')
    assert "labels.json is not valid JSON" in message
    assert "line 1" in message


def test_missing_file(tmp_path):
    with pytest.raises(VocabularyError, match=r"labels file .*nope\.txt does not exist; check the path"):
        load_vocabulary(VocabularyConfig(labels=str(tmp_path / "nope.txt")))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(VocabularyError, match="cannot read labels file"):
        load_vocabulary(VocabularyConfig(labels=str(tmp_path)))


def test_non_utf8_file(tmp_path):
    message = _error(tmp_path, "labels.txt", "café\n".encode("latin-1"))
    assert "labels file" in message and "is not UTF-8 text" in message
    assert "at byte 3" in message  # where the bad byte is, to find it in an editor


def test_vocabulary_error_is_a_config_error():
    """The CLI maps ConfigError to exit status 2; vocabulary problems must be caught by the same handler."""
    assert issubclass(VocabularyError, ConfigError)


# ---------------------------------------------------------------- templates


def test_templates_file(tmp_path):
    (tmp_path / "t.txt").write_text("# templates\n\na photo of a {}.\n  a {c} in the wild.  \nart of the {}\n", encoding="utf-8")
    vocab = _load(tmp_path, "labels.txt", "cat\n", templates=str(tmp_path / "t.txt"))
    assert vocab.templates == ("a photo of a {}.", "a {} in the wild.", "art of the {}")
    assert [t.format("cat") for t in vocab.templates] == ["a photo of a cat.", "a cat in the wild.", "art of the cat"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a photo of a {}.\na photo\n", "t.txt line 2: template 'a photo' needs exactly one {} for the class"),
        ("{} and {}\n", "t.txt line 1: template '{} and {}' needs exactly one {}"),
        ("a {c} and a {}\n", "line 1: template 'a {} and a {}' needs exactly one {}"),
        ("a {} in {style}\n", "t.txt line 1: template 'a {} in {style}' has braces other than the one {}"),
        ("a {} with a brace {\n", "line 1: template 'a {} with a brace {' has braces other than the one {}"),
        ("", "t.txt: no templates found; write one per line, e.g. 'a photo of a {}.'"),
        ("# nothing\n\n", "t.txt: no templates found"),
    ],
)
def test_template_errors(text, message):
    """A template the scorer could not `.format(name)` is refused here, with its line, not later as a KeyError."""
    with pytest.raises(VocabularyError) as error:
        parse_templates(text, "t.txt")
    assert message in str(error.value)


def test_literal_braces_in_a_template_are_allowed():
    (template,) = parse_templates("a {} from {{brand}}\n", "t.txt")
    assert template.format("cup") == "a cup from {brand}"


def test_missing_templates_file(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n")
    with pytest.raises(VocabularyError, match="templates file .*missing.txt does not exist"):
        load_vocabulary(VocabularyConfig(labels=str(tmp_path / "labels.txt"), templates=str(tmp_path / "missing.txt")))


# ---------------------------------------------------------------- digest


def test_digest_equal_across_formats(tmp_path):
    """The text-embedding cache key: the same content from txt, JSON, YAML or a dict of empty lists hashes equal."""
    digests = {
        _load(tmp_path, "a.txt", "cat\ndog\n").digest(),
        _load(tmp_path, "a.json", '["cat", "dog"]').digest(),
        _load(tmp_path, "a.yaml", "- cat\n- dog\n").digest(),
        _load(tmp_path, "b.json", '{"cat": [], "dog": null}').digest(),
        Vocabulary(classes=("cat", "dog")).digest(),
    }
    assert len(digests) == 1
    assert len(digests.pop()) == 64


def test_digest_equal_for_descriptors_from_json_and_yaml(tmp_path):
    from_json = _load(tmp_path, "d.json", json.dumps({"cat": ["furry"], "dog": ["barks", "wags"]}))
    from_yaml = _load(tmp_path, "d.yaml", "cat: [furry]\ndog:\n  - barks\n  -   wags\n")
    assert from_json.digest() == from_yaml.digest()


@pytest.mark.parametrize(
    "other",
    [
        Vocabulary(classes=("dog", "cat")),  # order is output order
        Vocabulary(classes=("cat", "dog", "bird")),
        Vocabulary(classes=("cat", "dog"), descriptions={"cat": ("furry",)}),
        Vocabulary(classes=("cat", "dog"), templates=("a photo of a {}.",)),
        Vocabulary(classes=("cat", "dog"), templates=()),
        Vocabulary(classes=("cat", "dog"), prompt="an image of a {}."),
    ],
)
def test_digest_differs_when_content_differs(other):
    assert other.digest() != Vocabulary(classes=("cat", "dog")).digest()


def test_parse_labels_directly():
    assert parse_labels("a\nb\n", "x.txt") == (("a", "b"), {})
    assert parse_labels('{"a": ["s"]}', "x.json") == (("a",), {"a": ("s",)})


# ---------------------------------------------------------------- remote files


def test_labels_and_templates_from_s3(s3_server, s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="vocab/labels.json", Body=json.dumps(CUPL).encode())
    client.put_object(Bucket=bucket, Key="vocab/templates.txt", Body=b"a photo of a {}.\nart of a {c}.\n")
    config = VocabularyConfig(labels=f"{s3_bucket}/vocab/labels.json", templates=f"{s3_bucket}/vocab/templates.txt")
    vocab = load_vocabulary(config, s3_server.storage_options)
    assert vocab.classes == ("cat", "dog", "coffee cup")
    assert vocab.descriptions["dog"] == ("A dog is a loyal pet.",)
    assert vocab.templates == ("a photo of a {}.", "art of a {}.")


def test_missing_s3_labels(s3_server, s3_bucket):
    with pytest.raises(VocabularyError, match=r"labels file s3://.*/none\.txt does not exist"):
        load_vocabulary(VocabularyConfig(labels=f"{s3_bucket}/none.txt"), s3_server.storage_options)
