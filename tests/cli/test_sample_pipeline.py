"""`ditcache sample` on saved diffusers pipelines: prompts, --scheduler, the cache, outputs, resuming."""

import json

import numpy as np
import pytest
import torch

import ditcache
from ditcache.cli.main import main
from ditcache.images import save_npz
from ditcache.pipelines.sampling import load_pipeline
from ditcache.pipelines.toy import dit_pipeline, pixart_pipeline
from ditcache.sampling.generate import sample_seed


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    pixart_pipeline().save_pretrained(root / "pixart")
    dit_pipeline().save_pretrained(root / "dit")
    return root


PIXART_ARGS = ["--prompt", "a photo of a cat", "--prompt", "a red car", "--num-samples", "3", "--batch-size", "2",
               "--steps", "4", "--cfg-scale", "4.5", "--height", "16", "--width", "16", "--no-progress"]


def test_text_to_image_with_a_cache_keeps_each_prompt_with_its_image(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", "--model", str(folders / "pixart"), *PIXART_ARGS, "--policy", "fora:interval=2",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with np.load(out / "samples.npz") as data:
        images, prompts = data["arr_0"], list(data["prompts"])
    assert prompts == ["a photo of a cat", "a red car", "a photo of a cat"]
    assert [p["prompt"] for p in json.loads((out / "prompts.json").read_text())] == prompts
    assert report["compute_fraction"] == pytest.approx(0.75)  # FORA N=2 at 4 steps: step 2 of 0..3 reused
    assert report["scheduler"] == "DPMSolverMultistepScheduler"
    # the same images as the user's own call of the pipeline with the cache enabled and the same seeds
    pipe = load_pipeline(str(folders / "pixart"))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in (0, 1)]
    with ditcache.enable(pipe, "fora:interval=2"):
        direct = pipe(["a photo of a cat", "a red car"], num_inference_steps=4, guidance_scale=4.5, height=16,
                      width=16, generator=gens, output_type="np", use_resolution_binning=False).images
    assert np.array_equal(images[:2], np.clip(np.round(direct * 255), 0, 255).astype(np.uint8))


def test_a_finished_batch_on_disk_is_not_sampled_again(folders, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sample", "--model", str(folders / "pixart"), *PIXART_ARGS, "--out", str(out), "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    with np.load(out / "samples.npz") as data:
        images = data["arr_0"]
    # as if the run had been killed after its first batch
    (out / "samples.npz").unlink()
    save_npz(out / "shards" / "batch000000.npz", images[:2], np.arange(2))
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["batches_sampled"], second["batches_sampled"], second["batches_resumed"]) == (2, 1, 1)
    with np.load(out / "samples.npz") as data:
        assert np.array_equal(data["arr_0"], images)


def test_a_class_conditional_pipeline_on_another_scheduler(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", "--model", str(folders / "dit"), "--scheduler", "dpm++", "--labels", "3,5",
                 "--num-samples", "2", "--steps", "5", "--policy", "rule:preset=rm-50", "--corrector", "goc",
                 "--out", str(out), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheduler"] == "DPMSolverMultistepScheduler"
    assert report["compute_fraction"] == pytest.approx(3 / 5)
    with np.load(out / "samples.npz") as data:
        assert data["labels"].tolist() == [3, 5] and data["arr_0"].shape == (2, 16, 16, 3)


def test_pipeline_input_errors_are_one_line(folders, tmp_path, capsys):
    assert main(["sample", "--model", str(folders / "pixart"), "--num-samples", "1", "--out",
                 str(tmp_path / "a")]) == 2
    assert "give --prompt TEXT or --prompts FILE" in capsys.readouterr().err
    assert main(["sample", "--model", str(folders / "dit"), "--prompt", "a cat", "--out", str(tmp_path / "b")]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "c")]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert main(["sample", "--model", str(folders / "pixart"), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "prompts file" in capsys.readouterr().err


def test_eoc_prior_from_prompts_is_keyed_to_the_pipelines_run(folders, tmp_path, capsys):
    from ditcache.calibration.artifact import ArtifactKey
    from ditcache.calibration.prior import load_prior

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red car on the beach\n")
    prior = tmp_path / "prior"
    common = ["--model", str(folders / "pixart"), "--prompts", str(prompts), "--steps", "4", "--cfg-scale", "4.5",
              "--height", "16", "--width", "16", "--no-progress"]
    assert main(["calibrate", "eoc", *common, "--num-samples", "3", "--batch-size", "2", "--out", str(prior),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["K"] == 3 and report["steps"] == 4 and report["sampler"].startswith("DPMSolverMultistepScheduler")
    loaded = load_prior(prior)
    assert set(loaded.means) == {"attn", "mlp", "cross"}  # PixArt's cross-attention has a prior too
    assert loaded.shape[:4] == (4, 2, 2, 16)  # steps, blocks, guidance halves, tokens
    assert loaded.artifact.meta["prompts"] == ["a photo of a cat", "a red car on the beach", "a photo of a cat"]
    # the key is the one the pipeline's own run gets: the prior is accepted there ...
    pipe = load_pipeline(str(folders / "pixart"))
    pipe.set_progress_bar_config(disable=True)
    with ditcache.enable(pipe, "rule:preset=rm-50", [f"eoc:prior={prior}"]) as handle:
        pipe("a red car", num_inference_steps=4, guidance_scale=4.5, height=16, width=16,
             use_resolution_binning=False, output_type="latent")
    assert ArtifactKey.from_run(handle.engine.run) == loaded.key
    # ... and refused, by name, for another step count
    with ditcache.enable(pipe, "rule:preset=rm-50", [f"eoc:prior={prior}"]):
        with pytest.raises(ValueError, match="steps"):
            pipe("a red car", num_inference_steps=6, guidance_scale=4.5, height=16, width=16,
                 use_resolution_binning=False, output_type="latent")
    # sampling from the command line with it
    assert main(["sample", *common[:2], "--prompt", "a red car", *common[4:], "--num-samples", "1",
                 "--policy", "rule:preset=rm-50", "--corrector", f"eoc:prior={prior}", "--out",
                 str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compute_fraction"] == pytest.approx(0.5)


def test_compare_on_a_pipeline_from_identical_noise(folders, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(folders / "pixart"), "--prompt", "a photo of a cat", "--prompt",
                 "a red car", "--num-samples", "2", "--steps", "4", "--cfg-scale", "4.5", "--height", "16",
                 "--width", "16", "--cache", "fora:interval=2", "--cache", "toca", "--repeats", "1",
                 "--out", str(out), "--json"]) == 0
    rows = {r["spec"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["none"]["compute_fraction"] == 1.0 and rows["none"]["psnr_vs_uncached"] is None  # identical images
    assert rows["fora:interval=2"]["compute_fraction"] == pytest.approx(0.75)
    assert 0 < rows["toca"]["compute_fraction"] < 1 and rows["toca"]["psnr_vs_uncached"] > 0
    # the uncached row holds exactly what `ditcache sample` draws for the same job
    assert main(["sample", "--model", str(folders / "pixart"), "--prompt", "a photo of a cat", "--prompt", "a red car",
                 "--num-samples", "2", "--steps", "4", "--cfg-scale", "4.5", "--height", "16", "--width", "16",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    with np.load(out / "none" / "samples.npz") as a, np.load(tmp_path / "s" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
