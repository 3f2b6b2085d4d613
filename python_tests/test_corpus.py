"""stn_ext.corpus: the word-level loader on a tiny PTB-style folder, the tokeniser, and the real Austen corpus
where it is installed (scripts/setup_env.sh fetches it)."""
import pytest
import torch

from stn_ext import corpus as C

PTB = {"ptb.train.txt": " the cat sat on the mat \n the dog sat \n a cat ran \n",
       "ptb.valid.txt": " the bird sat \n",
       "ptb.test.txt": " a dog <unk> on the mat \n"}


@pytest.fixture
def ptb_dir(tmp_path):
    for name, text in PTB.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_ptb_vocab_eos_and_unk(ptb_dir):
    c = C.load_corpus("ptb", path=str(ptb_dir))
    # specials, then by training frequency, ties (cat, sat: 2 each) in order of first appearance
    assert c.vocab[:5] == ["<unk>", "<eos>", "the", "cat", "sat"]
    assert set(c.vocab) == {"<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "dog", "a", "ran"}
    assert c.train.dtype == torch.int64 and c.train.numel() == 12 + 3  # tokens plus one <eos> a line
    assert c.decode(c.val) == ["the", "<unk>", "sat", "<eos>"]  # 'bird' is not a training word
    assert c.decode(c.test) == ["a", "dog", "<unk>", "on", "the", "mat", "<eos>"]
    assert c.decode(c.train[:7]) == "the cat sat on the mat <eos>".split()
    assert torch.equal(c.encode(c.decode(c.train)), c.train)  # ids round-trip
    assert c.coverage("val") == pytest.approx(2 / 3)


def test_ptb_vocab_size_caps_rare_words(ptb_dir):
    c = C.load_corpus("ptb", path=str(ptb_dir), vocab_size=4)
    assert c.vocab == ["<unk>", "<eos>", "the", "cat"]
    assert c.decode(c.train[:7]) == "the cat <unk> <unk> the <unk> <eos>".split()


@pytest.mark.parametrize("bad", [0, 2, 10.0, True, "10k"])
def test_bad_vocab_size(ptb_dir, bad):
    with pytest.raises(ValueError, match="vocab_size"):
        C.load_corpus("ptb", path=str(ptb_dir), vocab_size=bad)


def test_ptb_missing_file_and_folder(ptb_dir):
    (ptb_dir / "ptb.valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks ptb.valid.txt"):
        C.load_corpus("ptb", path=str(ptb_dir))
    with pytest.raises(FileNotFoundError, match="ptb.train.txt"):
        C.load_corpus("ptb")
    with pytest.raises(ValueError, match="unknown corpus"):
        C.load_corpus("wikitext")


def test_austen_missing_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
        C.load_corpus("austen", path=str(tmp_path))


def test_batchify_and_bptt():
    ids = torch.arange(23)
    src = C.batchify(ids, 4)
    assert src.shape == (5, 4) and src.is_contiguous()
    assert src[:, 1].tolist() == [5, 6, 7, 8, 9]  # each column a contiguous stream; the tail 20..22 dropped
    x, y = C.get_batch(src, 0, 3)
    assert x.shape == y.shape == (3, 4) and torch.equal(y, src[1:4])
    windows = list(C.bptt_batches(src, 3))
    assert [w[0].shape[0] for w in windows] == [3, 1]  # 4 targets after the first row, the last window short
    assert torch.equal(torch.cat([w[1] for w in windows]), src[1:])
    for bad in (0, 24, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            C.batchify(ids, bad)
    with pytest.raises(ValueError, match="bptt"):
        C.get_batch(src, 4, 3)


def test_tokenize():
    assert C.tokenize("\"My dearest papa! You do not think I could mean _you_, or suppose Mr.") == [
        '"', "my", "dearest", "papa", "!", "you", "do", "not", "think", "i", "could", "mean", "you", ",", "or",
        "suppose", "mr", "."]
    assert C.tokenize("Sorrow came--a well-bred sorrow; Miss Taylor's, 'twas 1814.") == [
        "sorrow", "came", "--", "a", "well", "-", "bred", "sorrow", ";", "miss", "taylor's", ",", "'", "twas",
        "1814", "."]


def test_paragraph_eos():
    lines = ["CHAPTER I", "", "", "Emma Woodhouse, handsome,", "clever.", "", "It was so."]
    assert C.tokenize_lines(lines) == ["chapter", "i", "<eos>", "emma", "woodhouse", ",", "handsome", ",",
                                       "clever", ".", "<eos>", "it", "was", "so", ".", "<eos>"]


# --- the real corpus, where installed -------------------------------------------------------------------

def _austen_or_skip():
    try:
        C.austen_folder()
        import rdata  # noqa: F401
    except FileNotFoundError:
        pytest.skip("Austen corpus not fetched (bash scripts/setup_env.sh, or apt-get download "
                    "r-cran-janeaustenr and dpkg-deb -x into ~/.cache/stn_ext/janeaustenr)")
    except ImportError:
        pytest.skip("rdata not installed (pip install rdata)")


@pytest.fixture(scope="module")
def austen():
    _austen_or_skip()
    books = C.austen_books()
    return books, C.load_corpus("austen")


def test_austen_novels_and_counts(austen):
    books, c = austen
    assert list(books) == list(C.AUSTEN_NOVELS)
    assert books["emma"][0] == "EMMA" and books["prideprejudice"][0] == "PRIDE AND PREJUDICE"
    words = lambda ids: int((ids != 1).sum())  # noqa: E731  (tokens other than <eos>)
    total = sum(words(getattr(c, s)) for s in ("train", "val", "test"))
    assert 850_000 < total < 880_000  # 859,096 measured
    assert 660_000 < c.train.numel() < 700_000 and 90_000 < c.val.numel() < 96_000
    assert 96_000 < c.test.numel() < 102_000
    assert len(c.vocab) == 10_000 and c.vocab[:2] == ["<unk>", "<eos>"]


def test_austen_coverage(austen):
    _, c = austen
    assert c.coverage("train") >= 0.99  # 0.9964 measured
    # held-out novels bring their own characters and places (Tilney, Wentworth, ...): 0.971 / 0.968 measured
    assert c.coverage("val") >= 0.96 and c.coverage("test") >= 0.96
