"""The demo's model, trained once per test session and shared by the tests that judge what it generates."""

import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """`latte demo`'s data and training run, for a fixed 3,000 steps instead of its time budget (about five
    minutes on two cores; the demo itself trains for 8 minutes, some 5,000 steps)."""
    from encode import encode
    from latte_cli.demo import DATA, recipe
    from latte_cli.video import synth
    from train import train

    root = tmp_path_factory.mktemp("demo")
    synth(root / "videos", videos=256, seed=0, **DATA)
    encode(root / "videos", root / "latents", size=DATA["size"], labels="folders", flip=True)
    return train(recipe(root / "latents", root / "run", steps=3000, ckpt_every=3000, log_every=1000,
                        progress=False, device="cpu"))
