"""Fixtures of the command-line tests: tiny random-weight diffusers pipelines saved to folders."""

import pytest

from ditcache.pipelines.toy import dit_pipeline, pixart_pipeline


@pytest.fixture(scope="session")
def pipeline_folders(tmp_path_factory):
    """A folder holding ``pixart/`` (PixArtAlphaPipeline, DPM-Solver++) and ``dit/`` (DiTPipeline, DDIM)."""
    root = tmp_path_factory.mktemp("saved-pipelines")
    pixart_pipeline().save_pretrained(root / "pixart")
    dit_pipeline().save_pretrained(root / "dit")
    return root
