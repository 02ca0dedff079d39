"""The transformer language-model pair: the causal transformer, the text datamodule's split and
errors, the model's loss at initialisation, and training, testing and sampling through the real
`lightning` command on the offline English text."""

from __future__ import annotations

import collections
import gzip
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_qlab.data import DataMismatchError, DataNotFoundError, TextDataModule
from lightning_qlab.data.text import read_text_bytes
from lightning_qlab.models import CausalTransformer, LanguageModel

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the transformer
def test_transformer_parameter_count_and_weight_tying():
    net = CausalTransformer(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=32)
    d = 32
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = 256 * d + 64 * d + 2 * block + 2 * d  # embeddings, blocks, final norm; the head is tied
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net.head.weight is net.token_embedding.weight
    untied = CausalTransformer(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=32, tie_weights=False)
    assert sum(p.numel() for p in untied.parameters()) == expected + 256 * d


def test_transformer_is_causal():
    torch.manual_seed(0)
    net = CausalTransformer(block_size=16, n_layer=2, n_head=2, d_model=16, dropout=0.0).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        before, after = net(tokens), net(changed)
    assert torch.equal(before[:, :10], after[:, :10])  # positions before 10 never see 10 onwards
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(d_model=30, n_head=4), "must divide d_model"), (dict(dropout=1.0), "dropout"), (dict(n_layer=0), "n_layer")],
)
def test_transformer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalTransformer(**kwargs)


def test_transformer_refuses_sequences_longer_than_its_block():
    with pytest.raises(ValueError, match="longer than block_size=8"):
        CausalTransformer(block_size=8, n_layer=1, n_head=1, d_model=8)(torch.zeros(1, 9, dtype=torch.long))


def test_loss_at_initialisation_is_about_log_vocabulary(fortunes_text):
    # GPT-2's small initialisation makes every byte about equally likely: the loss starts at
    # ln(256) = 5.545 nats, whatever the text.
    torch.manual_seed(0)
    model = LanguageModel(CausalTransformer(block_size=64, n_layer=2, n_head=2, d_model=32))
    dm = TextDataModule(fortunes_text, block_size=64)
    dm.setup("fit")
    x, y = zip(*(dm.train_set[i] for i in range(32)))
    loss = model.qlab_loss((torch.stack(x), torch.stack(y))).item()
    assert abs(loss - math.log(256)) < 0.05


def test_language_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size to 256"):
        LanguageModel(CausalTransformer(vocab_size=100, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(TypeError, match="backbone must be a torch.nn.Module"):
        LanguageModel("gpt")
    with pytest.raises(ValueError, match="temperature"):
        LanguageModel(CausalTransformer(n_layer=1, n_head=1, d_model=8), temperature=0.0)


def test_generate_continues_the_prompt_within_the_block():
    torch.manual_seed(0)
    model = LanguageModel(CausalTransformer(block_size=8, n_layer=1, n_head=1, d_model=8), top_k=1)
    text = model.generate("héllo wörld, longer than eight bytes", max_new_tokens=12)
    assert text.startswith("héllo wörld, longer than eight bytes")
    assert model.training  # generation switches to eval mode and back


# ------------------------------------------------------------------ the text datamodule
def windows(dataset) -> list[tuple[int, int]]:
    span = dataset.block_size + 1
    return [(int(s), int(s) + span) for s in dataset.starts]


def test_split_is_deterministic_disjoint_and_complete(fortunes_text):
    first = TextDataModule(fortunes_text, block_size=64, val_fraction=0.05, test_fraction=0.1, split_seed=3)
    second = TextDataModule(fortunes_text, block_size=64, val_fraction=0.05, test_fraction=0.1, split_seed=3)
    other_seed = TextDataModule(fortunes_text, block_size=64, val_fraction=0.05, test_fraction=0.1, split_seed=4)
    for dm in (first, second, other_seed):
        dm.setup("fit")
    sets = [first.train_set, first.val_set, first.test_set]
    assert all(torch.equal(a.starts, b.starts) for a, b in zip(sets, [second.train_set, second.val_set, second.test_set]))
    assert not torch.equal(first.val_set.starts, other_seed.val_set.starts)
    covered = sorted(w for s in sets for w in windows(s))
    assert all(end <= start for (_, end), (start, _) in zip(covered, covered[1:]))  # no byte in two windows
    total = len(read_text_bytes(fortunes_text)) // 65
    assert len(covered) == total
    assert (len(first.val_set), len(first.test_set)) == (round(0.05 * total), round(0.1 * total))
    x, y = first.train_set[0]
    assert x.shape == y.shape == (64,) and torch.equal(x[1:], y[:-1])  # targets are the next bytes


def test_folder_of_files_and_gzip(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first file " * 20)
    (tmp_path / "b" / "c.txt.gz").write_bytes(gzip.compress(("second file " * 20).encode()))
    assert read_text_bytes(tmp_path) == ("first file " * 20).encode() + b"\n" + ("second file " * 20).encode()
    dm = TextDataModule(tmp_path, block_size=8, val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == len(read_text_bytes(tmp_path)) // 9


def test_bad_text_gets_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"some text")[:12])
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "nothing").mkdir()
    cases = [
        (tmp_path / "missing.txt", DataNotFoundError, "does not exist"),
        (tmp_path / "nothing", DataNotFoundError, "holds no files"),
        (tmp_path / "empty.txt", DataMismatchError, "holds no text"),
        (tmp_path / "image.png", DataMismatchError, "not a text file"),
        (tmp_path / "latin1.txt", DataMismatchError, "not UTF-8 text .byte 0xe9 at offset 3"),
        (tmp_path / "broken.gz", DataMismatchError, "damaged gzip"),
        (tmp_path / "short.txt", DataMismatchError, "too few for 3 non-empty split"),
    ]
    for path, error, match in cases:
        dm = TextDataModule(path, block_size=8)
        with pytest.raises(error, match=match):
            dm.prepare_data()
            dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(block_size=0), "block_size"), (dict(val_fraction=0.6, test_fraction=0.5), "leaves no windows"),
     (dict(val_fraction=-0.1), "val_fraction"), (dict(prompts="The "), "list of strings")],
)
def test_text_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule("corpus.txt", **kwargs)


# ------------------------------------------------------------------ through the real command
def unigram_entropy(path: Path) -> float:
    """Nats per byte of the best model that ignores context: the entropy of byte frequencies."""
    data = read_text_bytes(path)
    counts = collections.Counter(data)
    return -sum(c / len(data) * math.log(c / len(data)) for c in counts.values())


def lightning(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lightning_qlab.cli", *args], capture_output=True, text=True,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_config_learns_the_text_through_the_cli_then_tests_and_samples(fortunes_text, tmp_path):
    """300 QLAB steps of a smaller model on the text: the test loss ends clearly below the
    unigram entropy (what any model that ignores context can reach); predict writes samples."""
    common = ["--config", str(REPO / "configs" / "text_transformer.yaml"),
              "--data.init_args.path", str(fortunes_text), "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.backbone.init_args.d_model", "64",
              "--model.init_args.backbone.init_args.n_layer", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    lightning("fit", *common, "--trainer.max_steps", "300", "--trainer.limit_val_batches", "5",
              "--trainer.val_check_interval", "150", cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = next((run / "checkpoints").glob("*.ckpt"))
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["class_path"].endswith("LanguageModel")

    tested = lightning("test", *common, "--ckpt_path", str(checkpoint), cwd=tmp_path)
    metrics = {}
    for line in tested.stdout.splitlines():
        parts = line.replace("│", " ").split()
        if len(parts) == 2 and parts[0].startswith("test_"):
            metrics[parts[0]] = float(parts[1])
    entropy = unigram_entropy(fortunes_text)  # 3.32 nats per byte for this text
    assert metrics["test_loss"] < entropy - 0.3, (metrics, entropy)
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / math.log(2), rel=1e-4)
    assert metrics["test_ppl"] == pytest.approx(math.exp(metrics["test_loss"]), rel=1e-4)

    lightning("predict", *common, "--ckpt_path", str(checkpoint), "--data.init_args.prompts",
              '["Once upon a time", "Q:"]', "--model.init_args.max_new_tokens", "40", cwd=tmp_path)
    written = (tmp_path / "lightning_logs" / "version_2" / "predictions.txt").read_text()
    bodies = [sample.split("\n", 1)[1] for sample in written.split("=== sample ")[1:]]
    assert len(bodies) == 2
    for body, prompt in zip(bodies, ["Once upon a time", "Q:"]):
        # 40 sampled bytes after the prompt (a byte that is no valid UTF-8 shows as U+FFFD, 3 bytes)
        assert body.startswith(prompt) and len(body.encode()) >= len(prompt) + 40
