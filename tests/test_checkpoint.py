"""Checkpoint loading: formats, containers, key maps, and one-line errors for bad files."""
from __future__ import annotations

import pickle

import pytest
import torch

from crossvit_edge.checkpoint import load_checkpoint, save_checkpoint
from crossvit_edge.crossvit import create_model
from crossvit_edge.errors import UserError

from .conftest import run_cli


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return create_model("crossvit_tiny_240", num_classes=5)


def _same(a, b):
    x = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item() == 0.0


def test_safetensors_round_trip_infers_variant_and_classes(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model.state_dict(), path)  # no metadata: variant from the shapes
    loaded = load_checkpoint(path)
    assert loaded.name == "crossvit_tiny_240" and loaded.num_classes == 5
    assert _same(loaded.model, model)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "state_dict_ema", "ddp", "ibm"])
def test_pth_containers_and_key_maps(model, tmp_path, wrap):
    sd = model.state_dict()
    if wrap == "ddp":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "ibm":
        obj = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v for k, v in sd.items()}
    elif wrap == "plain":
        obj = sd
    else:
        obj = {wrap: sd, "epoch": 3}
    path = tmp_path / "m.pth"
    torch.save(obj, path)
    loaded = load_checkpoint(path, model_name="crossvit_tiny_224")  # IBM name accepted
    assert _same(loaded.model, model)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/crossvit_edge_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(UserError, match="refusing to load .*pickled code"):
        load_checkpoint(path)


def test_truncated_and_missing_files(model, tmp_path):
    good = tmp_path / "m.safetensors"
    save_checkpoint(model.state_dict(), good)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_checkpoint(bad)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "m.pth").read_bytes()[:5000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(cut)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_class_count_mismatch_and_missing_keys(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model.state_dict(), path)
    with pytest.raises(UserError, match="checkpoint head has 5 classes, but 1000 were asked for"):
        load_checkpoint(path, num_classes=1000)
    sd = dict(model.state_dict())
    del sd["blocks.0.fusion.0.attn.wk.weight"]
    sd["extra.weight"] = torch.zeros(1)
    save_checkpoint(sd, tmp_path / "broken.safetensors")
    with pytest.raises(UserError, match=r"missing keys: blocks.0.fusion.0.attn.wk.weight; unexpected keys: extra.weight"):
        load_checkpoint(tmp_path / "broken.safetensors", model_name="crossvit_tiny_240")
    with pytest.raises(UserError, match="does not fit crossvit_9_240"):
        load_checkpoint(path, model_name="crossvit_9_240")


def test_hub_name_offline_is_one_line_error(tmp_path, monkeypatch):
    """A hub that does not answer (a closed local port here, whatever this machine's network) and an
    empty cache: one line, quickly, rather than huggingface_hub's five retries with back-off."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(UserError) as e:
        load_checkpoint("hf-hub:timm/crossvit_9_240.in1k")
    message = str(e.value)
    assert "hf-hub:timm/crossvit_9_240.in1k" in message and "127.0.0.1 does not answer" in message, message
    assert "not in the local Hugging Face cache" in message and "\n" not in message


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("missing", "checkpoint not found"),
        ("truncated", "not a valid safetensors file"),
        ("evil", "refusing to load"),
        ("classes", "does not fit crossvit_9_240"),
    ],
)
def test_cli_bad_checkpoints_give_one_line(tmp_path, model, setup, expected):
    path = tmp_path / "c.safetensors"
    if setup == "truncated":
        save_checkpoint(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:1000])
    elif setup == "evil":
        path = tmp_path / "c.pth"
        with open(path, "wb") as f:
            pickle.dump(_Evil(), f)
    elif setup == "classes":
        save_checkpoint(model.state_dict(), path)
    args = ["--target", "onnx", "--checkpoint", path, "--output", tmp_path / "out"]
    if setup == "classes":
        args += ["--model", "crossvit_9_240"]
    r = run_cli("crossvit_edge.convert", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossvit_edge.convert: error:") and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content", [
    ("text.pth", b"a"),                      # a text file: the unpickler's APPEND on an empty stack (IndexError)
    ("short.pth", b"\x80"),                 # a PROTO opcode without its byte (IndexError)
    ("words.pth", b"hello world\nthis is text\n"),
])
def test_non_checkpoint_files_are_one_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match="corrupt or truncated|refusing to load") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("head", [torch.tensor(1.0), torch.zeros(0, 4), torch.zeros(5)])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_head_that_is_not_a_matrix_is_one_line(model, tmp_path, head, suffix):
    """A 0-d, 1-d or empty ``head.0.weight``: the class count cannot be read from it."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["head.0.weight"] = head
    path = tmp_path / f"c{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_checkpoint(sd, path)
    with pytest.raises(UserError, match="'head.0.weight' has shape"):
        load_checkpoint(path)
