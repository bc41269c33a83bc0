"""Calibration artifacts: the output of a calibration (EOC prior, GOC statistics, L2C router).

An artifact is a folder with ``tensors.safetensors`` and ``manifest.json``. The manifest is keyed by
what the tensors are only valid for: the model's fingerprint, the sampler, the step count, the CFG
scale and the resolution. Loading checks that key against the run that wants to use it, so a prior
made for another model or sampler setting is refused with the exact mismatch, never silently used.
Writes go to a temporary folder that is renamed into place, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArtifactKey:
    """The settings an artifact is valid for."""

    model_fingerprint: str
    sampler: str
    steps: int
    cfg_scale: float
    resolution: int  # pixel size of the generated images

    @staticmethod
    def for_run(loaded, sampler: str, steps: int, cfg_scale: float) -> "ArtifactKey":
        return ArtifactKey(loaded.fingerprint, sampler, int(steps), float(cfg_scale), int(loaded.image_size))

    @staticmethod
    def from_run(run) -> "ArtifactKey":
        """The key of a sampling run (a RunInfo the engine filled in)."""
        if not run.fingerprint:
            raise ValueError("the engine does not know which model it is on; call engine.describe_model() "
                             "(generate() does) before using a calibration artifact")
        return ArtifactKey(run.fingerprint, run.sampler, int(run.num_steps), float(run.cfg_scale), int(run.resolution))

    def mismatches(self, other: "ArtifactKey") -> dict:
        """{field: (artifact's value, run's value)} for every field that differs."""
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@dataclass
class Artifact:
    kind: str  # "eoc-prior", "l2c-router", ...
    key: ArtifactKey
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # anything else worth recording (K, seed, cost, ...)

    def check(self, kind: str, key: Optional[ArtifactKey]) -> None:
        """Raise ValueError unless this artifact is of ``kind`` and made for ``key``."""
        if self.kind != kind:
            raise ValueError(f"artifact is a {self.kind!r}, not a {kind!r}")
        if key is not None:
            diff = self.key.mismatches(key)
            if diff:
                detail = ", ".join(f"{k}: artifact {a!r} vs run {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"this {self.kind} artifact was made for other settings ({detail}); "
                                 "calibrate again for this model and sampler setting")


def save_artifact(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write ``path/tensors.safetensors`` and ``path/manifest.json`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.tensors.items()}
        save_file(tensors, str(tmp / "tensors.safetensors"))
        manifest = {"format": "ditcache-artifact", "version": FORMAT_VERSION, "kind": artifact.kind,
                    "key": dataclasses.asdict(artifact.key), "meta": artifact.meta}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_artifact(path: str | os.PathLike, kind: Optional[str] = None, key: Optional[ArtifactKey] = None) -> Artifact:
    """Read an artifact; with ``kind`` / ``key`` it must match them (ValueError otherwise)."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a calibration artifact (no manifest.json); "
                                "make one with `ditcache calibrate`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}); make the artifact again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "ditcache-artifact":
        raise ValueError(f"{manifest_path} is not a ditcache artifact manifest")
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
    except Exception as err:  # safetensors raises its own error type for a truncated file
        raise ValueError(f"{path / 'tensors.safetensors'} is missing or damaged ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:120]}); make the artifact again") from None
    artifact = Artifact(manifest["kind"], ArtifactKey(**manifest["key"]), tensors, manifest.get("meta", {}))
    if kind is not None:
        artifact.check(kind, key)
    return artifact


def artifact_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an artifact folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
