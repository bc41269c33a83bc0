"""Load a DiT from any supported source into one uniform ``LoadedModel``.

Sources (``load_model(spec)``):

- an official facebookresearch/DiT ``.pt`` checkpoint (a state_dict, or a training checkpoint whose
  "ema" / "model" entry is one); the architecture is read off the tensor shapes;
- a ``.safetensors`` file written by ``save_model`` (the DiT kwargs live in its metadata; a plain
  safetensors state_dict without them is read like an official checkpoint);
- a diffusers directory or hub id (``DiTPipeline`` layout with ``transformer/``, or a bare
  ``DiTTransformer2DModel``);
- the name of a model embedded in the package (``EMBEDDED``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..atomic import write_atomic
from .dit import DIT_CONFIGS, DiT

# The official DiT sizes by (depth, hidden size) -> (name, heads). Heads are not in the weights; these are
# the only checkpoints whose head count is known, so any other shape needs num_heads (--num-heads).
OFFICIAL_SIZES = {(c["depth"], c["hidden_size"]): (name.split("/")[0], c["num_heads"]) for name, c in DIT_CONFIGS.items()}

EMBEDDED = {"mnist": "ditcache/assets/mnist_dit.safetensors"}  # name -> path under the package's parent
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
VAE_FACTOR = 8  # the SD VAE maps 8x8 pixels to one latent position
LATENT_CHANNELS = 4  # the SD VAE's latent channels: a 4-channel official DiT is a latent model
FORMAT = "ditcache-dit"

Spec = Union[str, os.PathLike]


@dataclass
class LoadedModel:
    """A denoiser ready to sample with, whatever it was loaded from.

    ``guided_channels``: how many leading eps channels classifier-free guidance mixes. The official
    DiT code guides only the first 3 of its 4 latent eps channels ("for exact reproducibility"), and
    the published FIDs depend on that quirk (methods.md §1.1), so official checkpoints get 3. None
    means guide all eps channels (our own models; diffusers' DiTPipeline also guides all).
    ``vae`` is the diffusers AutoencoderKL that decodes latents, None for pixel models or when
    loading was skipped with ``vae=None``.
    """

    module: nn.Module
    family: str  # "dit" (ours) or "diffusers-dit" (DiTTransformer2DModel)
    name: str
    image_size: int  # pixel size of the images the user gets
    latent_size: int  # spatial size the transformer sees
    in_channels: int
    num_classes: int
    null_class: int
    learn_sigma: bool
    guided_channels: Optional[int]
    vae: Optional[object]
    fingerprint: str

    @property
    def out_channels(self) -> int:
        """Channels of the model output: eps, plus as many variance channels with learn_sigma."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def is_latent(self) -> bool:
        """True when the transformer works on VAE latents rather than pixels."""
        return self.image_size != self.latent_size

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Call the module with x (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W)."""
        if self.family == "dit":
            return self.module(x, t, y)
        return self.module(x, timestep=t, class_labels=y).sample

    __call__ = forward


def fingerprint(module: nn.Module) -> str:
    """Short stable hex digest (sha256, 16 hex) of the sorted state_dict names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def infer_dit_config(sd: dict[str, torch.Tensor], num_heads: Optional[int] = None) -> dict:
    """DiT constructor kwargs read off an official-layout state dict's tensor shapes.

    Heads cannot be seen in the weights. An official size (``OFFICIAL_SIZES``: DiT-S/B/L/XL by depth
    and hidden size) takes its published head count; any other shape needs ``num_heads``, which also
    overrides. I never guess: a wrong head count loads without complaint and gives wrong outputs. The
    label table has ``num_classes + 1`` rows (the official models train with label dropout, so the
    last is null).
    """
    needed = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
              "final_layer.linear.weight", "blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not a DiT state dict: missing {missing}; found e.g. {sorted(sd)[:5]}")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape  # (D, C, p, p)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.") and k.endswith("attn.qkv.weight")})
    grid = round(sd["pos_embed"].shape[1] ** 0.5)
    if grid * grid != sd["pos_embed"].shape[1]:
        raise ValueError(f"pos_embed has {sd['pos_embed'].shape[1]} tokens, not a square grid")
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final layer gives {out_ch} channels for {in_ch} input channels")
    if num_heads is None:
        if (depth, hidden) not in OFFICIAL_SIZES:
            known = ", ".join(f"{n} ({d} blocks x {h})" for (d, h), (n, _) in sorted(OFFICIAL_SIZES.items(),
                                                                                     key=lambda kv: kv[0][1]))
            raise ValueError(f"{depth} blocks x hidden {hidden} is not an official DiT size ({known}), and the head "
                             "count is not stored in the weights; pass it with --num-heads N (num_heads=N in Python)")
        num_heads = OFFICIAL_SIZES[(depth, hidden)][1]
    elif num_heads < 1 or hidden % num_heads:
        raise ValueError(f"--num-heads {num_heads} does not divide the hidden size {hidden}")
    return dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                class_dropout_prob=0.1, num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
                learn_sigma=out_ch == 2 * in_ch)


def _preset_name(cfg: dict) -> Optional[str]:
    for name, c in DIT_CONFIGS.items():
        if all(cfg[k] == v for k, v in c.items() if k not in ("input_size", "in_channels")):
            return name
    return None


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a short message naming missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} is not a DiT state dict of the inferred shape: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(shapes)} mis-shaped (e.g. {shapes[:2]})")
    module.load_state_dict(sd, strict=True)


def _read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a torch checkpoint, preferring "ema" over "model" in training checkpoints."""
    try:
        # DiT training checkpoints also pickle their argparse Namespace; allow just that class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as a PyTorch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a DiT state dict: expected a dict of tensors "
                         f"(or one under 'ema' / 'model'), got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def save_model(module: DiT, path: Spec, **meta) -> Path:
    """Write ``module`` as safetensors with JSON metadata (``config`` + ``meta``), atomically.

    Recognised ``meta``: ``name`` (default: the file stem), ``image_size`` (default: the model's
    input size, i.e. a pixel model; 8x that marks a latent model decoded by the VAE) and
    ``guided_channels`` (default None: guide all channels). Other keys are stored too, JSON-encoded.
    """
    from safetensors.torch import save_file

    if not isinstance(module, DiT):
        raise TypeError(f"save_model writes our DiT; got {type(module).__name__}")
    path = Path(path)
    meta = {"name": path.stem, "image_size": module.input_size, "guided_channels": None, **meta}
    metadata = {"format": FORMAT, "config": json.dumps(module.config)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_vae(kind_or_path: str, *, device="cpu", dtype=torch.float32, local_files_only: bool = False):
    """The diffusers AutoencoderKL: "ema" / "mse" (the Stability SD VAEs DiT uses) or a local directory."""
    from diffusers import AutoencoderKL

    kwargs = dict(torch_dtype=dtype, local_files_only=local_files_only)
    if kind_or_path in VAE_REPOS:
        source = VAE_REPOS[kind_or_path]
    else:
        p = Path(kind_or_path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"VAE {kind_or_path!r} is neither one of {sorted(VAE_REPOS)} "
                                    "nor an existing diffusers AutoencoderKL directory")
        source = str(p)
        if (p / "vae" / "config.json").is_file():  # a whole pipeline directory
            kwargs["subfolder"] = "vae"
    try:
        vae = AutoencoderKL.from_pretrained(source, **kwargs)
    except Exception as e:
        raise OSError(f"could not load the VAE {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                      f"Offline? On a connected machine run `huggingface-cli download {source} "
                      "--local-dir DIR`, copy DIR here and pass it as the VAE: `--vae DIR` (vae='DIR' in Python).") from e
    return vae.to(device).eval()


def _finish(module, *, family, name, latent_size, in_channels, num_classes, learn_sigma,
            guided_channels, image_size, vae, device, dtype) -> LoadedModel:
    """Move the module, load the VAE for latent models, fingerprint, and wrap."""
    module = module.to(device)
    if dtype != next(module.parameters()).dtype:
        module = module.to(dtype)
    module.eval()
    vae_model = None
    if image_size != latent_size and vae is not None:
        vae_model = load_vae(vae, device=device, dtype=dtype)
    return LoadedModel(module=module, family=family, name=name, image_size=image_size,
                       latent_size=latent_size, in_channels=in_channels, num_classes=num_classes,
                       null_class=num_classes, learn_sigma=learn_sigma, guided_channels=guided_channels,
                       vae=vae_model, fingerprint=fingerprint(module))


def _from_state_dict(sd: dict, source: Path, num_heads: Optional[int], **common) -> LoadedModel:
    """An official-layout state dict: architecture from shapes, official CFG and VAE conventions."""
    cfg = infer_dit_config(sd, num_heads)
    module = DiT(**cfg)
    _strict_load(module, sd, str(source))
    latent = cfg["in_channels"] == LATENT_CHANNELS
    return _finish(module, family="dit", name=_preset_name(cfg) or source.stem, latent_size=cfg["input_size"],
                   in_channels=cfg["in_channels"], num_classes=cfg["num_classes"], learn_sigma=cfg["learn_sigma"],
                   guided_channels=3 if latent else None,
                   image_size=cfg["input_size"] * (VAE_FACTOR if latent else 1), **common)


def _from_safetensors(path: Path, num_heads: Optional[int], **common) -> LoadedModel:
    """Our format (config in metadata); a plain safetensors state dict is read like an official one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} could not be read as safetensors ({type(e).__name__}: {e})") from e
    if "config" not in meta:
        return _from_state_dict(sd, path, num_heads, **common)
    cfg = json.loads(meta["config"])
    module = DiT(**cfg)
    _strict_load(module, sd, str(path))
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "config")}
    return _finish(module, family="dit", name=extra.get("name") or path.stem, latent_size=module.input_size,
                   in_channels=module.in_channels, num_classes=module.num_classes, learn_sigma=module.learn_sigma,
                   guided_channels=extra.get("guided_channels"),
                   image_size=extra.get("image_size") or module.input_size, **common)


def _from_diffusers(spec: str, local_files_only: bool, **common) -> LoadedModel:
    """A DiTTransformer2DModel from a pipeline/transformer directory or a hub id."""
    from diffusers import DiTTransformer2DModel

    p = Path(spec).expanduser()
    kwargs = dict(torch_dtype=common["dtype"], local_files_only=local_files_only)
    if p.is_dir():
        subfolders = ["transformer"] if (p / "transformer").is_dir() else [None]
    else:
        subfolders = ["transformer", None]
    errors = []
    for sub in subfolders:
        try:
            model = DiTTransformer2DModel.from_pretrained(str(p) if p.is_dir() else spec, subfolder=sub, **kwargs)
            break
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        if p.is_dir():
            raise ValueError(f"{spec} is not a diffusers DiT directory (a DiTPipeline with transformer/, or a "
                             f"DiTTransformer2DModel with config.json): {errors[-1]}")
        raise FileNotFoundError(f"{spec!r} is not a local path and could not be fetched from the Hugging Face hub "
                                f"({errors[-1]}). Offline? On a connected machine run `huggingface-cli download "
                                f"{spec} --local-dir DIR`, copy DIR here and pass its path.")
    cfg = model.config
    in_ch = cfg.in_channels
    return _finish(model, family="diffusers-dit", name=spec, latent_size=cfg.sample_size, in_channels=in_ch,
                   num_classes=cfg.num_embeds_ada_norm, learn_sigma=model.out_channels == 2 * in_ch,
                   guided_channels=None,
                   image_size=cfg.sample_size * (VAE_FACTOR if in_ch == LATENT_CHANNELS else 1), **common)


def _embedded_path(name: str) -> Path:
    import ditcache

    return Path(ditcache.__file__).resolve().parent.parent / EMBEDDED[name]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def load_model(spec: Spec, *, vae: Optional[str] = "ema", device="cpu", dtype=torch.float32,
               num_heads: Optional[int] = None, local_files_only: bool = False) -> LoadedModel:
    """Load a DiT from a checkpoint file, our safetensors, a diffusers directory/hub id, or a built-in name.

    ``vae``: "ema" (DiT's FID default), "mse", a local AutoencoderKL directory, or None to skip it;
    it is loaded only for latent models. ``num_heads``: the head count of an official-format checkpoint
    (.pt, or safetensors without our metadata); required unless its shape is an official DiT size,
    and it overrides the official count (see ``infer_dit_config``). ``local_files_only`` forbids hub
    downloads.
    """
    common = dict(vae=vae, device=device, dtype=dtype)
    s = os.fspath(spec)
    if s in EMBEDDED:
        path = _embedded_path(s)
        if not path.is_file():
            raise FileNotFoundError(f"the default model {s!r} is not built yet (expected {path}); build it "
                                    "with `ditcache train`, or pass a checkpoint path instead")
        return _from_safetensors(path, num_heads, **common)
    p = Path(s).expanduser()
    if p.is_dir():
        return _from_diffusers(s, local_files_only, **common)
    if p.is_file():
        if p.suffix == ".safetensors":
            return _from_safetensors(p, num_heads, **common)
        return _from_state_dict(_read_torch_checkpoint(p), p, num_heads, **common)
    if _HUB_ID.match(s) and not s.endswith(_FILE_SUFFIXES):
        return _from_diffusers(s, local_files_only, **common)
    raise FileNotFoundError(
        f"{s} does not exist. For the official DiT-XL/2 256x256 model download {OFFICIAL_URL} "
        f"(e.g. `wget {OFFICIAL_URL} -P pretrained_models/`) and pass "
        f"'pretrained_models/DiT-XL-2-256x256.pt'; built-in models: {sorted(EMBEDDED)}; "
        "diffusers directories and hub ids (facebook/DiT-XL-2-256) work too."
    )
