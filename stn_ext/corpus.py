"""Word-level text corpora for language models, offline: Jane Austen's six novels (Debian's
``r-cran-janeaustenr``, R lazy-load data read with PyPI's ``rdata``; R itself is not needed) or a Penn
Treebank folder (``ptb.train.txt / ptb.valid.txt / ptb.test.txt``).

    corpus = load_corpus("austen")                 # or load_corpus("ptb", path="data/penn")
    train = batchify(corpus.train, 40)             # (T, B) columns, as PyTorch's word_language_model
    for x, y in bptt_batches(train, 70): ...       # x, y: (<=70, B), y is x shifted by one token

Austen: lower-cased word and punctuation tokens (see ``tokenize``), ``<eos>`` after each paragraph, split by
novel (``AUSTEN_SPLIT``). PTB: its own tokens, ``<eos>`` after each line, as the AWD-LSTM / STN code reads it.
Both: the vocabulary is built on the training split alone; other words become ``<unk>``. docs/corpus.md has
the measured token counts and coverage."""
import bz2
import gzip
import lzma
import os
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch

UNK, EOS = "<unk>", "<eos>"
SPECIALS = (UNK, EOS)  # ids 0 and 1 in every vocabulary

AUSTEN_ENV = "STN_EXT_AUSTEN"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_R_DATA = os.path.join("usr", "lib", "R", "site-library", "janeaustenr", "data")  # inside the .deb
# The six data sets, in publication order (as R's austen_books() stacks them).
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
# By novel, so no paragraph of a held-out book is seen in training: the four long novels train (77% of the
# tokens), the two short ones validate and test (11% each, about PTB's proportions).
AUSTEN_SPLIT = {"train": AUSTEN_NOVELS[:4], "val": ("northangerabbey",), "test": ("persuasion",)}

PTB_FILES = {"train": "ptb.train.txt", "val": "ptb.valid.txt", "test": "ptb.test.txt"}

# A word: letters/digits with internal apostrophes (don't, emma's); hyphens split compounds (a hyphen is
# a token), which keeps a 10k vocabulary's coverage near 99.5%. A run of dashes ("--", the printed em
# dash) is one token, any other punctuation mark one token each.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|-{2,}|[^\w\s]")


@dataclass
class Corpus:
    """A tokenised corpus: ``vocab[i]`` is token i (``<unk>`` = 0, ``<eos>`` = 1, then by training frequency);
    ``train / val / test`` are 1-D int64 tensors of token ids; ``stoi`` maps a token to its id."""

    name: str
    vocab: list
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    stoi: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.stoi = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, tokens):
        """Token ids of ``tokens`` (a list of strings), unknown ones as ``<unk>``."""
        return encode(tokens, self.stoi)

    def decode(self, ids):
        return [self.vocab[int(i)] for i in ids]

    def coverage(self, split="val", count_eos=False):
        """Fraction of a split's tokens that are in the vocabulary (not ``<unk>``); ``<eos>`` markers are left
        out of the count unless ``count_eos``."""
        ids = getattr(self, split)
        if not count_eos:
            ids = ids[ids != SPECIALS.index(EOS)]
        return float((ids != SPECIALS.index(UNK)).float().mean()) if ids.numel() else 1.0


# --- tokens and vocabulary -------------------------------------------------------------------------------

def tokenize(text):
    """Lower-cased word and punctuation tokens of ``text``; underscores (the etext's _italics_ marks) dropped."""
    return _TOKEN.findall(text.lower().replace("_", ""))


def paragraphs(lines):
    """Paragraphs of printed lines: runs of non-blank lines, joined by spaces (line breaks are only layout)."""
    block = []
    for line in list(lines) + [""]:
        if line.strip():
            block.append(line)
        elif block:
            yield " ".join(block)
            block = []


def tokenize_lines(lines):
    """Tokens of a novel's printed lines, ``<eos>`` after each paragraph."""
    return [tok for par in paragraphs(lines) for tok in tokenize(par) + [EOS]]


def _check_vocab_size(vocab_size):
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < len(SPECIALS) + 1):
        raise ValueError(f"stn_ext: vocab_size must be an int >= {len(SPECIALS) + 1} (it counts <unk> and "
                         f"<eos>) or None for every training token, got {vocab_size!r}")


def build_vocab(tokens, vocab_size=10000):
    """``<unk>``, ``<eos>``, then the ``vocab_size - 2`` most frequent other tokens (ties: first seen first);
    ``vocab_size=None`` keeps them all."""
    _check_vocab_size(vocab_size)
    counts = Counter(t for t in tokens if t not in SPECIALS)
    keep = None if vocab_size is None else vocab_size - len(SPECIALS)
    return list(SPECIALS) + [w for w, _ in counts.most_common(keep)]


def encode(tokens, stoi):
    unk = stoi[UNK]
    return torch.tensor([stoi.get(t, unk) for t in tokens], dtype=torch.int64)


# --- Jane Austen (R lazy-load data) ---------------------------------------------------------------------

def austen_cache_dir():
    """Where scripts/setup_env.sh unpacks the .deb: $STN_EXT_AUSTEN, else ~/.cache/stn_ext/janeaustenr."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(AUSTEN_ENV) or os.path.join(cache, "stn_ext", "janeaustenr")


def _has_lazyload(folder):
    return all(os.path.isfile(os.path.join(folder, "Rdata." + ext)) for ext in ("rdx", "rdb"))


def austen_folder(path=None):
    """The folder holding ``Rdata.rdx`` / ``Rdata.rdb``. ``path`` (else the cache folder, else the installed R
    package) may be that folder, the R package's folder or the root the .deb was unpacked into."""
    roots = [path] if path else [austen_cache_dir(), "/"]
    for root in roots:
        for folder in (root, os.path.join(root, "data"), os.path.join(root, AUSTEN_R_DATA)):
            if _has_lazyload(folder):
                return folder
    where = path if path else f"{roots[0]} (${AUSTEN_ENV} or ~/.cache/stn_ext/janeaustenr) or /{AUSTEN_R_DATA}"
    raise FileNotFoundError(
        f"stn_ext: Jane Austen's novels (Rdata.rdx and Rdata.rdb of Debian's {AUSTEN_PACKAGE}) not found in "
        f"{where}. Fetch them with `bash scripts/setup_env.sh`, or by hand (R is not needed): "
        f"`apt-get download {AUSTEN_PACKAGE} && dpkg-deb -x {AUSTEN_PACKAGE}_*.deb {austen_cache_dir()}`.")


def _rdata():
    try:
        import rdata
    except ImportError as e:
        raise ImportError("stn_ext: the Austen corpus is stored as R data; reading it needs the rdata package: "
                          "pip install rdata (or pip install -e '.[text]')") from e
    return rdata


def _parse_r(raw):
    """An R serialisation (the bytes of an .rds without its compression) as Python objects."""
    rdata = _rdata()
    return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))


def _inflate(chunk, where):
    """One lazy-load record: a 4-byte big-endian length, then the data, compressed as R's
    lazyLoadDBfetch tells by its 5th byte ('Z' xz, '2' bzip2, '0' stored, otherwise zlib from the 5th)."""
    size, tag = int.from_bytes(chunk[:4], "big"), chunk[4:5]
    try:
        if tag == b"Z":
            raw = lzma.decompress(chunk[5:])
        elif tag == b"2":
            raw = bz2.decompress(chunk[5:])
        elif tag == b"0":
            raw = chunk[5:]
        else:
            raw = zlib.decompress(chunk[4:])
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
        raise ValueError(f"stn_ext: {where} is corrupt ({e})") from e
    if len(raw) != size:
        raise ValueError(f"stn_ext: {where} is truncated: {len(raw)} bytes, its header says {size}")
    return raw


def read_lazyload(folder, names=None):
    """The objects of an R lazy-load database (``Rdata.rdx`` index, ``Rdata.rdb`` records), by name."""
    with open(os.path.join(folder, "Rdata.rdx"), "rb") as f:
        index = f.read()
    if index[:2] == b"\x1f\x8b":  # saveRDS's gzip
        index = gzip.decompress(index)
    offsets = _parse_r(index)["variables"]
    with open(os.path.join(folder, "Rdata.rdb"), "rb") as f:
        db = f.read()
    out = {}
    for name in names or offsets:
        if name not in offsets:
            raise ValueError(f"stn_ext: {folder}/Rdata.rdx holds no data set '{name}' (it holds "
                             f"{', '.join(map(str, offsets))})")
        start, length = (int(v) for v in offsets[name])
        out[str(name)] = _parse_r(_inflate(db[start:start + length], f"{folder}/Rdata.rdb ({name})"))
    return out


def austen_books(path=None):
    """The six novels as {data set name: list of printed lines}, in publication order (R's austen_books())."""
    folder = austen_folder(path)
    with warnings.catch_warnings():  # rdata's notes on file types do not apply to single records
        warnings.simplefilter("ignore", UserWarning)
        books = read_lazyload(folder, AUSTEN_NOVELS)
    return {name: ["" if line is None else str(line) for line in lines] for name, lines in books.items()}


def austen_tokens(path=None):
    """{split: tokens} of the Austen corpus, the novels of each split (``AUSTEN_SPLIT``) in order."""
    books = {name: tokenize_lines(lines) for name, lines in austen_books(path).items()}
    return {split: [t for name in names for t in books[name]] for split, names in AUSTEN_SPLIT.items()}


# --- Penn Treebank --------------------------------------------------------------------------------------

def ptb_tokens(path):
    """{split: tokens} of a PTB folder: each line's space-separated tokens, then ``<eos>``."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"stn_ext: the PTB corpus needs path= a folder holding "
                                f"{', '.join(PTB_FILES.values())} (e.g. simple-examples/data of Mikolov's "
                                f"archive, as AWD-LSTM's getdata.sh fetches it); got {path!r}")
    missing = [f for f in PTB_FILES.values() if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"stn_ext: the PTB folder {path} lacks {', '.join(missing)} (it needs "
                                f"{', '.join(PTB_FILES.values())})")
    out = {}
    for split, fname in PTB_FILES.items():
        with open(os.path.join(path, fname), encoding="utf-8") as f:
            out[split] = [tok for line in f for tok in line.split() + [EOS]]
    return out


# --- the corpus and its batches -------------------------------------------------------------------------

CORPORA = {"austen": austen_tokens, "ptb": ptb_tokens}


def load_corpus(name="austen", path=None, vocab_size=10000):
    """A ``Corpus`` of 'austen' (``path``: where the .deb was unpacked; default the cache folder) or 'ptb'
    (``path``: the folder of ptb.{train,valid,test}.txt), its vocabulary the ``vocab_size`` commonest training
    tokens including ``<unk>`` and ``<eos>`` (None: all of them; PTB's training set has exactly 10,000)."""
    if name not in CORPORA:
        raise ValueError(f"stn_ext: unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    _check_vocab_size(vocab_size)  # before the slow reading
    tokens = CORPORA[name](path)
    vocab = build_vocab(tokens["train"], vocab_size)
    stoi = {w: i for i, w in enumerate(vocab)}
    return Corpus(name, vocab, *(encode(tokens[s], stoi) for s in ("train", "val", "test")))


def batchify(ids, batch_size):
    """``ids`` (1-D) cut into ``batch_size`` contiguous streams, as columns: (T, B) with T = len // B; the
    tail that does not fill a row is dropped (PyTorch's word_language_model example)."""
    if ids.dim() != 1:
        raise ValueError(f"stn_ext: batchify needs a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 < batch_size <= ids.numel():
        raise ValueError(f"stn_ext: batch_size must be an int in [1, {ids.numel()}] (the tokens there are), "
                         f"got {batch_size!r}")
    steps = ids.numel() // batch_size
    return ids[:steps * batch_size].view(batch_size, steps).t().contiguous()


def get_batch(source, i, bptt):
    """Inputs ``source[i:i+n]`` and targets one token later, n = min(bptt, len - 1 - i): both (n, B)."""
    if bptt < 1 or not 0 <= i < source.shape[0] - 1:
        raise ValueError(f"stn_ext: need bptt >= 1 and 0 <= i < {source.shape[0] - 1}, got bptt={bptt}, i={i}")
    n = min(bptt, source.shape[0] - 1 - i)
    return source[i:i + n], source[i + 1:i + 1 + n]


def bptt_batches(source, bptt):
    """(inputs, targets) windows of ``bptt`` steps over a batchified (T, B) source, in order; the last may be
    shorter. Carry the hidden state from one window to the next (truncated BPTT)."""
    for i in range(0, source.shape[0] - 1, bptt):
        yield get_batch(source, i, bptt)
