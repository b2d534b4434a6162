"""The pure parts of bench/real/debian_bert.py: dpkg parsing, the split, the tokenizer.

No training here (that is tools/train_debian_bert.py, run by the suite on first use).
"""
from __future__ import annotations

import numpy as np
import pytest

from bench.real import MODELS
from bench.real import debian_bert as db

STATUS = """\
Package: libfoo1
Status: install ok installed
Section: libs
Source: foo (1.2-3)
Description: Foo library - shared library
 The foo library does foo.
 .
 It is small.

Package: libfoo-dev
Status: install ok installed
Section: libdevel
Source: foo
Description: Foo library - development files
 Headers.

Package: gone
Status: deinstall ok config-files
Section: utils
Description: removed package

Package: nosection
Status: install ok installed
Description: no section field

Package: barutil
Status: install ok installed
Section: contrib/utils
Description: Bar tool
"""


def test_parse_status_keeps_installed_packages_with_a_section():
    pkgs = db.parse_status(STATUS)
    assert [p.name for p in pkgs] == ["barutil", "libfoo-dev", "libfoo1"]
    foo = pkgs[2]
    assert (foo.source, foo.section, foo.synopsis) == ("foo", "libs", "Foo library - shared library")
    assert foo.long == "The foo library does foo.  It is small."  # " ." is an empty line
    assert pkgs[0].section == "utils" and pkgs[0].source == "barutil" and pkgs[0].long == ""


def test_keep_top_sections_by_count_then_name():
    pkgs = [db.Package(f"p{i}", f"p{i}", s, "x", "") for i, s in enumerate("aabbbcd")]
    kept, sections = db.keep_top(pkgs, top=3)
    assert sections == ["b", "a", "c"]  # c and d tie at one: by name
    assert {p.section for p in kept} == {"a", "b", "c"} and len(kept) == 6


def test_split_is_by_source_and_independent_of_the_other_packages():
    pkgs = [db.Package(f"lib{s}{k}", f"src{s}", "libs", "x", "") for s in range(200) for k in "ab"]
    train, test = db.split(pkgs)
    assert {p.source for p in train}.isdisjoint({p.source for p in test})
    assert 0.15 < len(test) / len(pkgs) < 0.35  # one source in four, about
    fewer = pkgs[::3]  # another machine with other packages: a source keeps its side
    _, test_fewer = db.split(fewer)
    assert {p.name for p in test_fewer} == {p.name for p in test} & {p.name for p in fewer}


def test_vocab_is_deterministic_and_counts_words():
    texts = ["Shared library, shared files", "shared LIBRARY 2", "once"]
    vocab = db.build_vocab(texts)
    assert list(vocab) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "shared", "library"]
    assert db.words("Python3-foo: 2.0!") == ["python", "3", "-", "foo", ":", "2", ".", "0", "!"]
    assert db.build_vocab(list(reversed(texts))) == vocab


def test_encode_pairs_segments_and_truncates():
    vocab = db.build_vocab(["a b c d e f g h"] * 2)
    ids, types = db.encode(vocab, "a b", "c zz")
    assert ids == [db.CLS, vocab["a"], vocab["b"], db.SEP, vocab["c"], db.UNK, db.SEP]
    assert types == [0, 0, 0, 0, 1, 1, 1]
    ids, types = db.encode(vocab, "a b c d e f g h", "a b c d e f g h", max_len=11)
    assert len(ids) == len(types) == 11 and types.count(0) == 4 + 2  # half of 8 for segment A
    ids, types = db.encode(vocab, "a b c d e f g h", "", max_len=6)
    assert ids == [db.CLS, *(vocab[w] for w in "abcd"), db.SEP] and set(types) == {0}


def test_batch_pads_with_mask_zero():
    vocab = db.build_vocab(["a b c"] * 2)
    pkgs = [db.Package("x", "x", "libs", "a b c", "a"), db.Package("y", "y", "libs", "b", "")]
    feeds = db.batch(vocab, pkgs, pad_to=8)
    assert {k: (v.dtype, v.shape) for k, v in feeds.items()} == {
        k: (np.dtype(np.int64), (2, 8)) for k in ("input_ids", "attention_mask", "token_type_ids")}
    np.testing.assert_array_equal(feeds["attention_mask"],
                                  [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(feeds["token_type_ids"][0], [0, 0, 0, 0, 0, 1, 1, 0])
    assert feeds["input_ids"][1, 3:].sum() == 0  # padding is [PAD] = 0
    with pytest.raises(ValueError):  # longer than the pad length: numpy refuses, no silent cut
        db.batch(vocab, pkgs, pad_to=4)


def test_registered():
    assert "debian_bert" in MODELS
