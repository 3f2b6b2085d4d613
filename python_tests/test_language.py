"""Language models in the trainer (stn_ext.tuning.language, issue 23): BPTT windows of carried streams, the hidden
state carried and kept apart per use of a split, the LSTM's regularisers as hyperparameters (locked dropout,
embedding dropout, DropConnect, AR, TAR; per batch where they act on what the batch shares), clipping, the
language defaults, a resume bit for bit and runs through the CLI on a PTB-style folder and on Jane Austen."""
import json
import math
import os

import pytest
import torch

import installed

import stn_ext
from stn_ext.tuning import TrainConfig, Trainer, language, models
from stn_ext.tuning.augment import BatchRandom
from stn_ext.tuning.config import LANGUAGE_HYPERS, resolved
from stn_ext.tuning.core import Tuner
from stn_ext.tuning.space import HyperSpace

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 30


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g)


@pytest.fixture(scope="module")
def text():
    """A made-up corpus with some structure (a token tends to follow from the one before)."""
    g = torch.Generator().manual_seed(3)
    ids = [0]
    for _ in range(6000):
        ids.append((ids[-1] * 7 + 3) % VOCAB if torch.rand((), generator=g) < 0.7 else int(torch.randint(0, VOCAB, (), generator=g)))
    ids = torch.tensor(ids)
    return language.text_dataset(ids[:4000], ids[4000:5000], ids[5000:], VOCAB, batch_size=8, bptt=8)


def _cfg(**kw):
    base = dict(model="lstm", hidden=(12, 12), steps=24, batch_size=8, eval_every=12, quiet=True, plots=False,
                warmup_steps=4)
    return TrainConfig(**{**base, **kw})


def _space(n_layers=2, names=LANGUAGE_HYPERS):
    return HyperSpace.build(names, language.dropout_slots((8,) * n_layers), image_data=False)


# --- data --------------------------------------------------------------------------------------------

def test_rows_are_windows_that_continue_each_stream():
    split = language.stream_split(torch.arange(103), n_streams=3, bptt=4)
    # corpus.batchify: three streams of 34 tokens (0.., 34.., 68..); 33 // 4 = 8 whole windows each
    assert split.x.shape == (24, 4)
    for k in range(8):
        for b in range(3):
            start = b * 34 + k * 4
            assert split.x[k * 3 + b].tolist() == list(range(start, start + 4))
    assert torch.equal(split.y, split.x + 1)
    with pytest.raises(ValueError, match="cannot fill"):
        language.stream_split(torch.arange(20), n_streams=4, bptt=8)


def test_text_dataset_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside"):
        language.text_dataset(_ids(200, 0), _ids(100, 1), torch.tensor([VOCAB] * 100), VOCAB, 2, 5)


# --- the model and its state -------------------------------------------------------------------------

def test_carried_state_continues_one_long_sequence():
    torch.manual_seed(0)
    model = language.LanguageModel(VOCAB, 3, hidden=(10, 10)).eval()
    models.init_response(models.stn_layers(model))  # a response that lam moves
    x = _ids(2 * 12, 5).view(2, 12)
    lam = stn_ext.hyper_input(torch.tensor([0.3, -0.2, 0.5]))
    lam.__enter__()
    whole = model(x)
    stream = language.Stream()
    parts = []
    for w in (x[:, :5], x[:, 5:]):
        with language.carrying(stream):
            parts.append(model(w))
        stream.advance()
    torch.testing.assert_close(torch.cat(parts, 1), whole)
    fresh = model(x[:, 5:])  # without the carried state: another result
    lam.__exit__(None, None, None)
    assert not torch.allclose(fresh, whole[:, 5:], atol=1e-4)


def test_a_step_that_runs_the_model_twice_starts_both_from_the_batch_start():
    torch.manual_seed(0)
    model = language.LanguageModel(VOCAB, 3, hidden=(10,)).eval()
    stream = language.Stream()
    with language.carrying(stream), stn_ext.elementary():
        model(_ids(2 * 6, 1).view(2, 6))
    stream.advance()
    x = _ids(2 * 6, 2).view(2, 6)
    with language.carrying(stream), stn_ext.elementary():
        a = model(x)
        b = model(x)  # Delta-STN's response step, a roll-back: the same start, not the state after `a`
    torch.testing.assert_close(a, b)


def test_the_decoder_is_tied_to_the_embedding_table():
    model = language.LanguageModel(VOCAB, 3, hidden=(8, 10))
    assert model.decoder.weight is model.embedding.weight_elem and model.embedding.embedding_dim == 10
    assert [m.slot for m in model.modules() if isinstance(m, models.HyperDropout)] == ["in", "h1", "out"]
    assert models.stn_layers(model)[0] is model.embedding  # the table responds to the hyperparameters too


def _train_forward(model, x, values, rates=None, seed=0):
    model.train()
    rnd = BatchRandom(torch.Generator().manual_seed(seed), x.shape[0])
    vals = {k: torch.tensor(v) for k, v in values.items()}
    with models.regularisers(rates or {}, rnd, vals), stn_ext.elementary():
        out = model(x)
        return out, models.take_penalties()


def test_ar_and_tar_are_the_papers_loss_terms():
    torch.manual_seed(0)
    model = language.LanguageModel(VOCAB, 3, hidden=(10, 10))
    x = _ids(3 * 7, 4).view(3, 7)
    _, (ar, tar) = _train_forward(model, x, {"ar": 2.0, "tar": 0.5})
    with torch.no_grad(), stn_ext.elementary():  # no dropout rates given: the last LSTM's output, undropped
        h = model.embedding(x)
        for lstm in model.lstms:
            h, _ = lstm(h)
    torch.testing.assert_close(ar, 2.0 * h.pow(2).mean((1, 2)))
    torch.testing.assert_close(tar, 0.5 * (h[:, 1:] - h[:, :-1]).pow(2).mean((1, 2)))
    assert ar.shape == (3,)  # per example: the tuner averages them over the batch as the weight decay's
    model.eval()
    with models.regularisers({}, None, {"ar": torch.tensor(2.0)}), stn_ext.elementary():
        model(x)
        assert models.take_penalties() == []  # evaluation and hyper steps: no training-loss terms


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    model = language.LanguageModel(VOCAB, 3, hidden=(10,))
    seen = {}
    model.drop_in.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    x = torch.tensor([[1, 2, 1, 3, 2, 1], [3, 3, 1, 2, 4, 4]])
    _train_forward(model, x, {"embed_dropout": 0.5})
    with stn_ext.elementary():
        table = model.embedding(x).detach()
    scale = seen["x"] / table  # 0 (dropped) or 1 / (1 - p) = 2, the same for every use of a word
    for word in (1, 2, 3, 4):
        s = scale[x == word]
        assert torch.allclose(s, s[0, 0].expand_as(s)) and float(s[0, 0]) in (0.0, 2.0)


def test_dropconnect_masks_the_hidden_to_hidden_weights(monkeypatch):
    torch.manual_seed(0)
    model = language.LanguageModel(VOCAB, 3, hidden=(16, 16))
    masks = []
    for lstm in model.lstms:
        forward = lstm.forward
        monkeypatch.setattr(lstm, "forward", lambda *a, _f=forward, **kw: masks.append(kw["weight_hh_mask"]) or _f(*a, **kw))
    _train_forward(model, _ids(2 * 5, 6).view(2, 5), {"dropconnect": 0.3})
    assert len(masks) == 2
    for m in masks:
        assert m.shape == (64, 16)
        kept = m != 0
        assert torch.allclose(m[kept], torch.full_like(m[kept], 1 / 0.7))
        assert abs(1 - kept.float().mean().item() - 0.3) < 0.06
    masks.clear()
    model.eval()
    with stn_ext.elementary():
        model(_ids(2 * 5, 6).view(2, 5))
    assert masks == [None, None]


def test_locked_dropout_keeps_one_mask_per_sequence():
    drop = language.LockedDropout("in").train()
    rnd = BatchRandom(torch.Generator().manual_seed(0), 3)
    with models.regularisers({"in": torch.tensor([0.0, 0.5, 0.9])}, rnd):
        y = drop(torch.ones(3, 7, 50))
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same units dropped at every time step
    assert torch.equal(y[0], torch.ones(7, 50))   # rate 0: nothing dropped
    for row, scale in ((1, 2.0), (2, 10.0)):
        kept = y[row][y[row] != 0]
        assert 0 < kept.numel() < y[row].numel() and torch.allclose(kept, torch.full_like(kept, scale))


# --- the tuner ---------------------------------------------------------------------------------------

def test_per_batch_hyperparameters_share_their_perturbation_across_the_batch():
    space = _space()
    model = language.LanguageModel(VOCAB, len(space), hidden=(8, 8))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), language.token_losses, "stn",
                  perturb="example")
    eps = tuner._eps(BatchRandom(tuner.gen, 6))
    for i, h in enumerate(space.hypers):
        column = eps[:, i]
        assert h.per_batch == (h.kind in ("embed_dropout", "dropconnect", "ar", "tar"))
        assert torch.all(column == column[0]) == h.per_batch, h.name


@pytest.mark.parametrize("rows", [1.0, 0.5])
def test_the_response_step_carries_on_the_general_runs_state(rows):
    """Delta-STN's response step (the whole batch, or its first half of the streams from their rows of the carried
    state) leaves the state the next batch starts from as the general step's run left it."""
    torch.manual_seed(0)
    space = _space(2, ("dropout",))
    model = language.LanguageModel(VOCAB, len(space), hidden=(8, 8))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), language.token_losses, "delta-stn",
                  total_steps=10, warmup_steps=0, response_every=1, response_rows=rows)
    seen, forward = [], model.forward

    def recording(x):
        out = forward(x)
        seen.append((x.shape[0], language._STREAM.get().end))
        return out

    model.forward = recording
    stream = language.Stream()
    for k in range(3):
        with language.carrying(stream):
            tuner.weight_step(_ids(4 * 6, 2 * k).view(4, 6), _ids(4 * 6, 2 * k + 1).view(4, 6))
        general, response = seen[-2:]
        assert general[0] == 4 and response[0] == (4 if rows == 1.0 else 2)
        assert stream.end is general[1] and all(h.shape[1] == 4 for h, _ in stream.end)
        stream.advance()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_language_regularisers_are_refused_on_a_model_that_ignores_them():
    space = HyperSpace.build(("dropout", "ar"), ["in", "h1", "h2"])
    model = models.mlp(8, 3, len(space), (6, 6))
    with pytest.raises(ValueError, match="ignore"):
        Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), lambda o, y: o.sum(), "stn")


def test_clip_bounds_each_step_of_plain_sgd():
    space = _space(1, ("dropout",))
    model = language.LanguageModel(VOCAB, len(space), hidden=(8,))
    before = [p.detach().clone() for p in model.parameters()]
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=1.0), language.token_losses, "fixed",
                  clip=1e-3)
    tuner.weight_step(_ids(2 * 6, 0).view(2, 6), _ids(2 * 6, 1).view(2, 6))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0 < moved.norm() <= 1e-3 * (1 + 1e-5)


# --- the trainer ---------------------------------------------------------------------------------------

def test_language_data_sets_its_own_defaults():
    s = resolved(TrainConfig(), language=True)
    assert (s["lr"], s["momentum"], s["clip"], s["bptt"], s["hypers"]) == (20.0, 0.0, 0.25, 35, LANGUAGE_HYPERS)
    mine = resolved(TrainConfig(lr=5.0, momentum=0.5, clip=0.0, bptt=70, hypers=("dropout",)), language=True)
    assert (mine["lr"], mine["momentum"], mine["clip"], mine["bptt"], mine["hypers"]) == (5.0, 0.5, 0.0, 70, ("dropout",))
    plain = resolved(TrainConfig(), language=False)
    assert (plain["lr"], plain["momentum"], plain["clip"]) == (0.01, 0.9, 0.0)


def test_lstm_is_for_text_and_text_for_lstm(text):
    from stn_ext.data import digits

    with pytest.raises(ValueError, match="lstm"):
        Trainer(_cfg(model="lstm"), data=digits(train_size=100))
    with pytest.raises(ValueError, match="lstm"):
        Trainer(_cfg(model="mlp"), data=text)


@pytest.mark.parametrize("method", ["fixed", "stn", "delta-stn"])
def test_lm_run_logs_perplexity_and_tunes_the_seven(text, method):
    tr = Trainer(_cfg(method=method), data=text)
    assert tr.space.names == ["dropout.in", "dropout.h1", "dropout.out", "embed_dropout", "dropconnect", "ar", "tar"]
    s = tr.fit()
    assert s["complete"] and math.isfinite(s["val_loss"])
    assert s["val_ppl"] == pytest.approx(math.exp(s["val_loss"])) and s["test_ppl"] == pytest.approx(math.exp(s["test_loss"]))
    if method != "fixed":
        assert s["hyper_steps"] > 0 and any(abs(v - 0.05) > 1e-4 for v in s["hypers"].values())


def test_a_fixed_lm_learns_the_made_up_grammar(text):
    tr = Trainer(_cfg(method="fixed", hidden=(16,), steps=120, eval_every=40), data=text)
    tr.fit()
    ppl = [e["val_ppl"] for e in tr.log.epochs]
    assert ppl[0] > 0.9 * VOCAB and ppl[-1] < 10  # untrained: about uniform; after 120 steps: the grammar (6.7)


def test_evaluation_leaves_the_carried_states_alone(text):
    tr = Trainer(_cfg(method="stn", steps=12, warmup_steps=0, train_per_cycle=1), data=text)
    tr.fit()
    before = {k: s.start for k, s in tr.streams.items()}
    assert all(v is not None for v in before.values())
    tr.evaluate(tr.data.val)
    assert all(tr.streams[k].start is before[k] for k in before)
    assert tr.streams["train"].start[0][0].shape == (1, 8, 12)


def test_hypergradient_reads_the_streams_in_order_a_chunk_at_a_time(text):
    tr = Trainer(_cfg(method="stn", steps=8), data=text)
    tr.fit()
    g = tr.hypergradient()
    # the same through one chunk of all windows of one stream after another, by hand
    u = tr.u.detach().clone().requires_grad_(True)
    tr.model.eval()
    total = 0
    stream = language.Stream()
    for i in range(0, len(tr.data.val), 8):
        with stn_ext.hyper_input(tr.tuner.z(u, centred=False)), language.carrying(stream):
            out = tr.model(tr.data.val.x[i:i + 8])
        total = total + language.token_losses(out, tr.data.val.y[i:i + 8]).sum()
        stream.advance()
    (want,) = torch.autograd.grad(total / len(tr.data.val), u)
    torch.testing.assert_close(g, want)
    assert float(g.abs().sum()) > 0


def test_an_interrupted_lm_run_resumes_bit_for_bit(text, tmp_path):
    full = Trainer(_cfg(method="stn", out=str(tmp_path / "full")), data=text)
    full.fit()
    part = Trainer(_cfg(method="stn", out=str(tmp_path / "part"), stop_after=17), data=text)
    assert not part.fit()["complete"]
    resumed = Trainer(_cfg(method="stn", out=str(tmp_path / "part"), resume=True), data=text)
    assert resumed.fit()["complete"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert torch.equal(full.u, resumed.u)
    for k in ("train", "val"):
        for a, b in zip(full.streams[k].start, resumed.streams[k].start):
            assert all(torch.equal(s, t) for s, t in zip(a, b))
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "time")}  # noqa: E731
                       for line in open(p)]
    assert strip(tmp_path / "full" / "epochs.jsonl") == strip(tmp_path / "part" / "epochs.jsonl")


def _ptb_folder(path):
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)]
    for name, lines in (("ptb.train.txt", 300), ("ptb.valid.txt", 60), ("ptb.test.txt", 60)):
        with open(path / name, "w") as f:
            for _ in range(lines):
                n = int(torch.randint(3, 12, (), generator=g))
                f.write(" " + " ".join(words[int(i)] for i in torch.randint(0, 40, (n,), generator=g)) + " \n")
    return path


def test_cli_trains_an_lstm_on_a_ptb_folder(tmp_path, capsys):
    from stn_ext.__main__ import main

    folder = _ptb_folder(tmp_path)
    out = tmp_path / "run"
    main(["train", "--data", "ptb", "--data-path", str(folder), "--model", "lstm", "--hidden", "8,8", "--steps", "8",
          "--batch-size", "4", "--bptt", "6", "--eval-every", "4", "--quiet", "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["steps"] == 8 and math.isfinite(s["val_ppl"]) and len(s["hypers"]) == 7
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "lstm" and cfg["data"] == "ptb"


def test_cli_refuses_lstm_on_images(capsys):
    from stn_ext.__main__ import main

    assert main(["train", "--model", "lstm", "--steps", "2", "--quiet"]) == 2
    assert "'lstm' is for text" in capsys.readouterr().err



@pytest.mark.skipif(not installed.austen(), reason="Jane Austen's novels are not installed (scripts/setup_env.sh)")
def test_cli_trains_an_lstm_on_austen(tmp_path):
    from stn_ext.__main__ import main

    out = tmp_path / "austen"
    main(["train", "--data", "austen", "--model", "lstm", "--method", "stn", "--hidden", "8", "--steps", "4",
          "--batch-size", "20", "--eval-every", "4", "--quiet", "--out", str(out)])
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["val_ppl"] < 10000  # below the uniform guess over the 10k vocabulary
    assert os.path.exists(out / "checkpoint.pt")
