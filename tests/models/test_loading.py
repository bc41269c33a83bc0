"""load_model for every source, save_model, fingerprint, and each bad input's message."""

import argparse
import copy
import json

import pytest
import torch

from ditcache.models import loading
from ditcache.models.diffusers_format import dit_to_diffusers
from ditcache.models.dit import DiT, build_dit
from ditcache.models.loading import (
    OFFICIAL_URL,
    LoadedModel,
    fingerprint,
    infer_dit_config,
    load_model,
    load_vae,
    save_model,
)

# Neither is an official DiT size, so loading them as official-format checkpoints needs num_heads.
LATENT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2, num_classes=10)
PIXEL = dict(input_size=28, patch_size=4, in_channels=1, hidden_size=64, depth=1, num_heads=1, num_classes=10,
             learn_sigma=False)


def tiny(seed: int = 0, **kwargs) -> DiT:
    """A tiny DiT with every trainable weight random."""
    torch.manual_seed(seed)
    model = DiT(**{**LATENT, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return model


def inputs(model: DiT):
    torch.manual_seed(1)
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    return x, torch.tensor([10, 900]), torch.tensor([3, model.num_classes])


@torch.no_grad()
def same_output(a, b, atol=0.0) -> bool:
    x, t, y = inputs(a if isinstance(a, DiT) else b)
    return torch.allclose(a(x, t, y), b(x, t, y), atol=atol, rtol=0)


def test_official_pt_round_trip(tmp_path):
    model = tiny()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, vae=None, num_heads=2)
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.module, DiT)
    assert same_output(model, loaded)
    assert (loaded.family, loaded.name, loaded.latent_size, loaded.image_size) == ("dit", "DiT-tiny", 8, 64)
    assert (loaded.in_channels, loaded.num_classes, loaded.null_class, loaded.learn_sigma) == (4, 10, 10, True)
    assert loaded.guided_channels == 3 and loaded.vae is None and loaded.is_latent and loaded.out_channels == 8
    assert loaded.fingerprint == fingerprint(model)


def test_training_checkpoint_prefers_ema(tmp_path):
    ema, raw = tiny(seed=0), tiny(seed=1)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"lr": torch.tensor(1e-4)},
                "args": argparse.Namespace(model="DiT-XL/2")}, path)
    loaded = load_model(path, vae=None, num_heads=2)
    assert same_output(ema, loaded) and not same_output(raw, loaded)
    torch.save({"model": raw.state_dict()}, path)
    assert same_output(raw, load_model(path, vae=None, num_heads=2))


def test_ddp_prefix_is_stripped(tmp_path):
    model = tiny()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert same_output(model, load_model(tmp_path / "ddp.pt", vae=None, num_heads=2))


def test_an_unofficial_size_needs_the_head_count_and_never_guesses(tmp_path):
    """A 4-head model of width 64 used to load as 64 // 64 = 1 head and give wrong outputs."""
    model = tiny(hidden_size=64, num_heads=4)
    torch.save(model.state_dict(), tmp_path / "h4.pt")
    with pytest.raises(ValueError, match=r"2 blocks x hidden 64 is not an official DiT size .*--num-heads N"):
        load_model(tmp_path / "h4.pt", vae=None)
    assert same_output(model, load_model(tmp_path / "h4.pt", vae=None, num_heads=4))
    with pytest.raises(ValueError, match="does not divide"):
        load_model(tmp_path / "h4.pt", vae=None, num_heads=3)
    from safetensors.torch import save_file  # a plain safetensors state dict is read the same way

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "h4.safetensors"))
    with pytest.raises(ValueError, match="--num-heads"):
        load_model(tmp_path / "h4.safetensors", vae=None)


@pytest.mark.parametrize("name, heads", [("DiT-XL/2", 16), ("DiT-L/4", 16), ("DiT-B/8", 12), ("DiT-S/2", 6)])
def test_official_sizes_infer_their_heads(name, heads):
    with torch.device("meta"):
        sd = build_dit(name).state_dict()
    cfg = infer_dit_config(sd)
    assert (cfg["num_heads"], cfg["input_size"], cfg["num_classes"], cfg["learn_sigma"]) == (heads, 32, 1000, True)
    assert loading._preset_name(cfg) == name
    assert infer_dit_config(sd, num_heads=8)["num_heads"] == 8  # an explicit count overrides


def test_pixel_checkpoint_needs_no_vae(tmp_path):
    model = tiny(**PIXEL)
    torch.save(model.state_dict(), tmp_path / "px.pt")
    loaded = load_model(tmp_path / "px.pt", vae="/no/such/vae", num_heads=1)  # never touched for a pixel model
    assert (loaded.image_size, loaded.latent_size, loaded.guided_channels, loaded.vae) == (28, 28, None, None)
    assert same_output(model, loaded)


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open

    model = tiny(freq_shift=1.0, mlp_ratio=2.0)
    path = save_model(model, tmp_path / "sub" / "ours.safetensors", name="tiny-latent", image_size=64,
                      guided_channels=3, steps=7)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ours.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == model.config and json.loads(meta["steps"]) == 7
    loaded = load_model(path, vae=None)
    assert loaded.module.config == model.config and same_output(model, loaded)
    assert (loaded.name, loaded.image_size, loaded.guided_channels, loaded.null_class) == ("tiny-latent", 64, 3, 10)
    save_model(tiny(seed=5), path)  # overwrite in place
    plain = load_model(path, vae=None)
    assert (plain.name, plain.image_size, plain.guided_channels, plain.is_latent) == ("ours", 8, None, False)
    assert plain.fingerprint != loaded.fingerprint


def test_plain_safetensors_state_dict_reads_like_official(tmp_path):
    from safetensors.torch import save_file

    model = tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    loaded = load_model(tmp_path / "plain.safetensors", vae=None, num_heads=2)
    assert loaded.guided_channels == 3 and same_output(model, loaded)


@pytest.mark.parametrize("layout", ["bare", "pipeline"])
def test_diffusers_directory_round_trip(tmp_path, layout):
    model = tiny(freq_shift=1.0)  # diffusers' own timestep frequencies survive save_pretrained
    target = tmp_path / "pipe" / "transformer" if layout == "pipeline" else tmp_path / "bare"
    dit_to_diffusers(model).save_pretrained(str(target))
    spec = tmp_path / "pipe" if layout == "pipeline" else target
    loaded = load_model(str(spec), vae=None)
    assert loaded.family == "diffusers-dit" and loaded.module.__class__.__name__ == "DiTTransformer2DModel"
    assert (loaded.latent_size, loaded.image_size, loaded.num_classes, loaded.null_class) == (8, 64, 10, 10)
    assert loaded.learn_sigma and loaded.guided_channels is None
    # same float32 maths up to the fused-vs-split qkv matmul rounding (see test_diffusers_format)
    assert same_output(model, loaded, atol=1e-5)


def test_embedded_registry(tmp_path, monkeypatch):
    monkeypatch.setitem(loading.EMBEDDED, "toy", str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"default model 'toy' is not built.*ditcache train"):
        load_model("toy")
    model = tiny(**PIXEL)
    save_model(model, tmp_path / "toy.safetensors")
    monkeypatch.setitem(loading.EMBEDDED, "toy", str(tmp_path / "toy.safetensors"))  # absolute paths work too
    assert same_output(model, load_model("toy"))
    assert loading._embedded_path("mnist").parts[-3:] == ("ditcache", "assets", "mnist_dit.safetensors")


def test_fingerprint_tracks_weights_only():
    model = tiny()
    fp = fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(copy.deepcopy(model)) == fp
    assert fingerprint(tiny()) == fp  # same seed, same weights
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[3] += 1e-6
    assert fingerprint(model) != fp
    assert fingerprint(tiny().to(torch.float64)) != fp


def test_missing_path_says_what_to_download():
    with pytest.raises(FileNotFoundError) as err:
        load_model("pretrained_models/DiT-XL-2-256x256.pt")
    assert OFFICIAL_URL in str(err.value) and "pretrained_models/" in str(err.value)


@pytest.mark.parametrize("payload, match", [
    ([1, 2, 3], "not a DiT state dict"),
    ({"weight": "text"}, "not a DiT state dict"),
    ({"fc.weight": torch.zeros(2, 2)}, r"not a DiT state dict: missing \['x_embedder.proj.weight'"),
])
def test_not_a_dit_state_dict(tmp_path, payload, match):
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path / "bad.pt", vae=None)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['blocks.1.mlp.fc2.bias'\]\), 1 unexpected"):
        load_model(tmp_path / "odd.pt", vae=None, num_heads=2)


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="could not be read as a PyTorch checkpoint"):
        load_model(tmp_path / "junk.pt", vae=None)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        load_model(tmp_path / "junk.safetensors", vae=None)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not a diffusers DiT directory"):
        load_model(tmp_path / "empty_dir", vae=None)


def test_offline_hub_id_says_how_to_download():
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download nobody/no-such-dit"):
        load_model("nobody/no-such-dit", vae=None, local_files_only=True)


def test_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither one of"):
        load_vae(str(tmp_path / "nope"))
    with pytest.raises(OSError, match=r"stabilityai/sd-vae-ft-ema.*vae='DIR'"):
        load_vae("ema", local_files_only=True)
    torch.save(tiny().state_dict(), tmp_path / "latent.pt")
    with pytest.raises(FileNotFoundError, match="neither one of"):
        load_model(tmp_path / "latent.pt", vae=str(tmp_path / "nope"), num_heads=2)


def test_save_model_refuses_other_modules(tmp_path):
    with pytest.raises(TypeError, match="our DiT"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
