import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores: one intra-op thread per test process keeps timings stable and avoids oversubscription.
# OMP_NUM_THREADS is also the CLIs' default for --threads, so in-process and subprocess runs keep one too.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

DIGITS_CFG = os.path.join(ROOT, "experiments", "digits", "cls_mdeq_digits.yaml")
TINY = ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "2", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16]",
        "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8]", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1]",
        "MODEL.EXTRA.FULL_STAGE.BIG_KERNELS", "[0, 0]", "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "32",
        "MODEL.EXPANSION_FACTOR", "2", "TRAIN.BATCH_SIZE_PER_GPU", "64", "TRAIN.PRETRAIN_STEPS", "5",
        "TRAIN.END_EPOCH", "2", "PERCENT", "0.1", "TEST.BATCH_SIZE_PER_GPU", "450"]


@pytest.fixture
def tiny_opts():
    """Overrides that shrink the digits config to a model that trains in seconds."""
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A small digits checkpoint (one short epoch), shared by the CLI tests."""
    from DEQ.config import load_config
    from DEQ.training import Trainer
    out = str(tmp_path_factory.mktemp("tinyrun"))
    cfg = load_config(DIGITS_CFG, TINY + ["TRAIN.END_EPOCH", "1", "PERCENT", "1.0"], noise=0.25)
    trainer = Trainer(cfg, torch.device("cpu"), out, show_progress=False)
    trainer.fit()
    return trainer.last_path
