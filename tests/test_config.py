"""Every config key either does what its name says or is refused with one line naming it and the fix;
checkpoints' configs go through the same validated path as yaml files."""
import glob
import os
import re

import pytest
import torch
import yaml

from conftest import DIGITS_CFG, ROOT, TINY
from DEQ import config as config_module
from DEQ.checkpoint import LoadedModel, file_sha256, load_model, save_checkpoint
from DEQ.config import config_from_text, get_default_config, load_config
from DEQ.errors import UserError
from DEQ.models import MODELS, build_model, register_model
from DEQ.training import Trainer

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "experiments", "*", "*.yaml")))


def _leaf_keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _one_line_error(fn, *needles):
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


@pytest.fixture
def backend_flags():
    """Restore torch's global backend flags after a test that lets a Trainer set them."""
    saved = (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:3]
    torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


def _trainer(tmp_path, opts=(), noise=0.25, name="run"):
    cfg = load_config(DIGITS_CFG, TINY + list(opts), noise=noise)
    return Trainer(cfg, torch.device("cpu"), str(tmp_path / name), show_progress=False)


# ----------------------------------------------------------------- the audit itself
def test_every_default_key_is_in_the_audit_table():
    """The key table of docs/config.md names every key of the defaults (so a new key gets a decision)."""
    with open(os.path.join(ROOT, "docs", "config.md")) as fh:
        doc = fh.read()
    table = "\n".join(line for line in doc.splitlines() if line.startswith("| "))
    missing = [k for k in _leaf_keys(get_default_config()) if not re.search(rf"\b{k.split('.')[-1]}\b", table)]
    assert missing == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.MODEL.NAME in MODELS


def test_config_validation_reads_the_model_registry(monkeypatch):
    """A name registered with register_model is a valid MODEL.NAME (and builds); an unknown one is refused
    with one line listing every registered name, the new one included."""
    import DEQ.models.registry as registry
    monkeypatch.setattr(registry, "MODELS", dict(MODELS))  # the registration ends with the test

    @register_model("tiny_test_deq", deq=True)
    def build_tiny(cfg):
        return torch.nn.Linear(2, cfg.MODEL.NUM_CLASSES)
    assert registry.MODELS["tiny_test_deq"].builder is build_tiny
    cfg = load_config(None, ["MODEL.NAME", "tiny_test_deq"])
    assert isinstance(build_model(cfg), torch.nn.Linear)
    msg = _one_line_error(lambda: load_config(None, ["MODEL.NAME", "no_such_model"]), "'no_such_model'")
    assert msg.endswith("choose one of mdeq, resnet_cifar, resnet110, resnet50, tiny_test_deq"), msg
    with pytest.raises(ValueError):  # a name is registered once
        register_model("mdeq", build_tiny)


def test_the_certified_model_is_mdeq_30a_except_on_imagenet():
    """CERTIFY: the paper's certified models, MDEQ-30A (tol 0) for CIFAR-10 and digits, MDEQ-14B for ImageNet;
    a stored config without the section gets the defaults, and a training resume may change it."""
    for path in SHIPPED:
        cfg = load_config(path)
        want = ("broyden", 14) if os.path.basename(path) == "cls_mdeq_SMALL.yaml" and "imagenet" in path else \
            ("anderson", 30)
        assert (cfg.CERTIFY.SOLVER, cfg.CERTIFY.THRES, cfg.CERTIFY.TOL) == (*want, 0.0), path
    old = yaml.safe_load(get_default_config().dump())
    old.pop("CERTIFY")
    assert config_from_text(yaml.safe_dump(old), "an older checkpoint's config").CERTIFY == get_default_config().CERTIFY
    assert {"CERTIFY.SOLVER", "CERTIFY.THRES", "CERTIFY.TOL"} <= set(config_module.RESUME_CHANGEABLE)



# ----------------------------------------------------------------- wired keys
def test_cudnn_keys_set_the_backend_flags(tmp_path, backend_flags):
    _trainer(tmp_path, ["CUDNN.ENABLED", "False", "CUDNN.BENCHMARK", "True", "CUDNN.DETERMINISTIC", "False"], name="a")
    assert torch.backends.cudnn.enabled is False and torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.deterministic is False and not torch.are_deterministic_algorithms_enabled()
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    _trainer(tmp_path, ["CUDNN.ENABLED", "True", "CUDNN.BENCHMARK", "True", "CUDNN.DETERMINISTIC", "True"], name="b")
    assert torch.backends.cudnn.enabled is True
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False  # forced off
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    _trainer(tmp_path, ["CUDNN.DETERMINISTIC", "False"], name="c")  # and back: the flags follow each run's config
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True


def test_percent_is_the_fraction_of_training_batches_per_epoch(tmp_path):
    seen = {}
    for percent in ("1.0", "0.25"):
        trainer = _trainer(tmp_path, ["PERCENT", percent], name=f"p{percent}")
        trainer.train_epoch()
        seen[percent] = (trainer.steps_per_epoch, trainer.train_step)
    assert seen["1.0"] == (22, 22)  # 1347 digits training images in batches of 64
    assert seen["0.25"] == (6, 6)  # ceil(1347 * 0.25 / 64): a quarter of the batches


def test_print_freq_writes_step_lines_to_the_log(tmp_path):
    from DEQ.tools import cls_train  # noqa: F401  (importable as a module: the CLI is a thin wrapper)
    from DEQ.tools.cls_train import main

    def steps_logged(freq, name):
        out = tmp_path / name
        main(["--cfg", DIGITS_CFG, "--noise", "0.25", "--out", str(out), "--quiet", "--threads", "1", *TINY,
              "TRAIN.END_EPOCH", "1", "PERCENT", "0.3", "PRINT_FREQ", str(freq)])
        log = (out / "train.log").read_text()
        return [int(m) for m in re.findall(r" step (\d+) \(", log)]
    assert steps_logged(2, "f2") == [2, 4, 6]  # ceil(1347 * 0.3 / 64) = 7 steps
    assert steps_logged(0, "f0") == []


def test_workers_and_pin_memory_reach_the_data_loaders(tmp_path, monkeypatch):
    import DEQ.training.trainer as training  # where the Trainer looks its loader factory up
    from DEQ.data import make_loader
    calls = []

    def recording(*args, **kwargs):
        calls.append((args[3], kwargs["pin_memory"]))
        return make_loader(*args, **kwargs)
    monkeypatch.setattr(training, "make_loader", recording)
    _trainer(tmp_path, ["WORKERS", "2", "PIN_MEMORY", "False"])
    assert calls == [(2, False), (2, False)]
    # the loader itself: workers for data read from files (digits is in memory: 0); pinning on CUDA only
    files = torch.utils.data.Subset(torch.utils.data.TensorDataset(torch.zeros(4, 1)), [0, 1, 2, 3])
    assert make_loader(files, 2, False, 2).num_workers == 2
    assert make_loader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), 2, False, 3).num_workers == 0
    assert make_loader(files, 2, False, 0, torch.device("cuda"), pin_memory=True).pin_memory is True
    assert make_loader(files, 2, False, 0, torch.device("cuda"), pin_memory=False).pin_memory is False
    assert make_loader(files, 2, False, 0, torch.device("cpu"), pin_memory=True).pin_memory is False


def test_data_dir_is_the_default_data_root(tmp_path, monkeypatch):
    import DEQ.training.trainer as training  # where the Trainer looks its data sets up
    roots = []
    fake = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))

    def recording(name, split, data_dir=None, **kwargs):
        roots.append(data_dir)
        return fake
    monkeypatch.setattr(training, "get_dataset", recording)
    small = os.path.join(ROOT, "experiments", "cifar", "cls_mdeq_SMALL.yaml")
    cfg = load_config(small, ["DATA_DIR", str(tmp_path)])
    Trainer(cfg, torch.device("cpu"), str(tmp_path / "run"), show_progress=False)
    assert roots == [str(tmp_path), str(tmp_path)]
    Trainer(cfg, torch.device("cpu"), str(tmp_path / "run"), data_dir="/given/by/flag", show_progress=False)
    assert roots[-2:] == ["/given/by/flag"] * 2  # --data-dir wins
    cfg = load_config(small, ["DATA_DIR", str(tmp_path / "absent")])
    _one_line_error(lambda: Trainer(cfg, torch.device("cpu"), str(tmp_path / "run"), show_progress=False),
                    "DATA_DIR", "--data-dir")


def test_model_pretrained_loads_the_initial_weights(tmp_path, tiny_checkpoint):
    start = _trainer(tmp_path, ["MODEL.PRETRAINED", tiny_checkpoint], name="ft")
    reference = load_model(tiny_checkpoint).model.state_dict()
    own = start.model.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in reference)
    assert start.pretrained_sha256 == file_sha256(tiny_checkpoint)
    fresh = _trainer(tmp_path, name="fresh").model.state_dict()
    assert not all(torch.equal(fresh[k], reference[k]) for k in reference)
    _one_line_error(lambda: _trainer(tmp_path, ["MODEL.PRETRAINED", str(tmp_path / "nope.pth")], name="x"),
                    "MODEL.PRETRAINED checkpoint not found", "nope.pth")
    wrong = ["MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "48"]  # another architecture
    _one_line_error(lambda: _trainer(tmp_path, ["MODEL.PRETRAINED", tiny_checkpoint] + wrong, name="y"),
                    "MODEL.PRETRAINED checkpoint", "other shapes")


@pytest.mark.parametrize("name", ["mdeq", "resnet_cifar"])
def test_init_weights_picks_the_architecture_init_or_pytorch_defaults(name):
    opts = TINY + (["MODEL.NAME", name, "MODEL.DEPTH", "20", "MODEL.DROPOUT", "0.0", "LOSS.JAC_LOSS_FREQ", "0.0"]
                   if name != "mdeq" else [])

    def stem_std(init):
        torch.manual_seed(0)
        model = build_model(load_config(DIGITS_CFG, opts + ["MODEL.INIT_WEIGHTS", init]))
        conv = model.downsample[0] if name == "mdeq" else model[1].conv1
        return conv.weight.std().item(), conv.weight[0].numel()
    own, fan_in = stem_std("True")
    default, _ = stem_std("False")
    assert default == pytest.approx((3.0 * fan_in) ** -0.5, rel=0.25)  # PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    expected = 0.01 if name == "mdeq" else (2.0 / (9 * 16)) ** 0.5  # MDEQ N(0, 0.01); Cohen: N(0, sqrt(2/(k*k*out)))
    assert own == pytest.approx(expected, rel=0.25) and abs(own - default) > 0.25 * default


def test_model_depth_sets_the_cifar_resnet_depth():
    cfg = load_config(os.path.join(ROOT, "experiments", "digits", "resnet_digits.yaml"), ["MODEL.DEPTH", "32"])
    net = build_model(cfg)[1]
    assert [len(net.layer1), len(net.layer2), len(net.layer3)] == [5, 5, 5]


def test_a_whole_number_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = load_config(DIGITS_CFG, ["PERCENT", "1", "TRAIN.LR", "1"])
    assert cfg.PERCENT == 1.0 and isinstance(cfg.PERCENT, float) and cfg.TRAIN.LR == 1.0
    path = tmp_path / "ints.yaml"
    path.write_text(open(DIGITS_CFG).read() + "PERCENT: 1\n")
    assert isinstance(load_config(str(path)).PERCENT, float)
    with pytest.raises(UserError, match="PERCENT must be a finite number > 0"):  # the range check, not a type error
        load_config(DIGITS_CFG, ["PERCENT", "0"])
    with pytest.raises(UserError, match=r"TRAIN.END_EPOCH takes an int value \(e.g. 40\), got 2.5 \(float\); give an int"):
        load_config(DIGITS_CFG, ["TRAIN.END_EPOCH", "2.5"])


# ----------------------------------------------------------------- refused keys
@pytest.mark.parametrize("key,value,fix", [
    ("GPUS", "(0, 1)", "--device cuda:N"),
    ("GPUS", "(1,)", "--device cuda:N"),
    ("LOG_DIR", "/somewhere/logs", "--out"),
    ("MODEL.EXTRA.FULL_STAGE.NUM_MODULES", "2", "one MDEQ module"),
    ("MODEL.EXTRA.FULL_STAGE.BLOCK", "BOTTLENECK", "BASIC"),
    ("MODEL.EXTRA.FULL_STAGE.FUSE_METHOD", "CAT", "SUM"),
    ("DEQ.SPECTRAL_RADIUS_MODE", "True", "not implemented"),
    ("DATASET.TRAIN_SET", "train_small", "splits are fixed"),
    ("DATASET.TEST_SET", "test", "splits are fixed"),
    ("DATASET.DATA_FORMAT", "zip", "ImageFolder"),
    ("TRAIN.RESUME", "True", "--resume"),
    ("TEST.MODEL_FILE", "model.pth", "SRS/code/certify.py"),
    ("DEBUG.DEBUG", "True", "nothing reads it"),
])
def test_unused_keys_refuse_a_value_that_would_be_ignored(key, value, fix):
    msg = _one_line_error(lambda: load_config(DIGITS_CFG, [key, value]), key, fix, f"remove {key} from the yaml")
    assert msg.startswith(f"{key} ")
    # the values the reference yamls write stay accepted
    load_config(DIGITS_CFG, ["GPUS", "(0,)", "LOG_DIR", "log/", "DATASET.TRAIN_SET", "train"])


@pytest.mark.parametrize("opts,needles", [
    (["MODEL.DEPTH", "20"], ["MODEL.DEPTH 20 does not apply", "mdeq"]),
    (["MODEL.NAME", "resnet_cifar", "MODEL.DROPOUT", "0.0", "LOSS.JAC_LOSS_FREQ", "0.0"], ["MODEL.DEPTH = 6n+2", "got 0"]),
    (["MODEL.NAME", "resnet_cifar", "MODEL.DEPTH", "21", "MODEL.DROPOUT", "0.0", "LOSS.JAC_LOSS_FREQ", "0.0"], ["6n+2"]),
    (["MODEL.NAME", "resnet110", "MODEL.DEPTH", "56", "MODEL.DROPOUT", "0.0", "LOSS.JAC_LOSS_FREQ", "0.0"], ["depth 110"]),
    (["MODEL.NAME", "resnet110", "LOSS.JAC_LOSS_FREQ", "0.0"], ["MODEL.DROPOUT", "set MODEL.DROPOUT 0.0"]),
    (["MODEL.NAME", "resnet110", "MODEL.DROPOUT", "0.0"], ["LOSS.JAC_LOSS_FREQ", "Jacobian", "set LOSS.JAC_LOSS_FREQ 0.0"]),
    (["MODEL.NAME", "resnet50", "MODEL.DROPOUT", "0.0", "LOSS.JAC_LOSS_FREQ", "0.0"], ["resnet50 is the ImageNet"]),
    (["MODEL.NAME", "vgg16"], ["MODEL.NAME='vgg16' is not a model", "resnet110"]),
    (["DATASET.DATASET", "cifar10"], ["MODEL.IMAGE_SIZE [8, 8] does not apply to cifar10", "[32, 32]"]),
    (["MODEL.IMAGE_SIZE", "[8, 6]"], ["square"]),
    (["DATASET.DATASET", "mnist"], ["DATASET.DATASET='mnist' is not a data set"]),
    (["PRINT_FREQ", "-1"], ["PRINT_FREQ must be an integer >= 0"]),
    (["CERTIFY.SOLVER", "newton"], ["CERTIFY.SOLVER='newton' is not a solver", "anderson"]),
    (["CERTIFY.THRES", "0"], ["CERTIFY.THRES must be an integer >= 1, got 0"]),
    (["CERTIFY.TOL", "-0.1"], ["CERTIFY.TOL must be a finite number >= 0"]),
])
def test_model_and_data_keys_that_do_not_fit_are_refused(opts, needles):
    _one_line_error(lambda: load_config(DIGITS_CFG, opts), *needles)


def test_keys_under_model_extra_are_checked(tmp_path):
    bad = tmp_path / "extra.yaml"
    bad.write_text("MODEL:\n  EXTRA:\n    STAGE1:\n      NUM_BLOCKS: [1]\n")
    _one_line_error(lambda: load_config(str(bad)), "unknown config key MODEL.EXTRA.STAGE1")


def test_cli_prints_a_refused_key_as_one_line(tmp_path, capsys):
    from DEQ.tools.cls_train import main
    with pytest.raises(SystemExit) as info:
        main(["--cfg", DIGITS_CFG, "--noise", "0.25", "--out", str(tmp_path / "run"), "GPUS", "(0, 1)"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GPUS (0, 1) is not used") and "--device" in lines[0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- checkpoints' configs
def _resave_with_config(src, dst, edit):
    ckpt = torch.load(src, weights_only=True)
    data = yaml.safe_load(ckpt["config"])
    edit(data)
    ckpt["config"] = yaml.safe_dump(data)
    save_checkpoint(ckpt, str(dst))
    return str(dst)


def test_load_model_validates_the_stored_config_like_a_yaml(tiny_checkpoint, tmp_path):
    loaded = load_model(tiny_checkpoint)
    assert isinstance(loaded, LoadedModel) and loaded.cfg.is_frozen()
    reference = load_config(DIGITS_CFG, TINY + ["TRAIN.END_EPOCH", "1", "PERCENT", "1.0"], noise=0.25)
    assert loaded.cfg.dump() == reference.dump()
    assert config_from_text(loaded.checkpoint["config"], "x").dump() == reference.dump()

    def unknown(d):
        d["DEQ"]["F_THRESH"] = 3
    path = _resave_with_config(tiny_checkpoint, tmp_path / "unknown.pth", unknown)
    _one_line_error(lambda: load_model(path), "the config stored in checkpoint", "unknown config key DEQ.F_THRESH",
                    "pass its yaml with --cfg")

    def bad_value(d):
        d["DEQ"]["F_SOLVER"] = "newton"
    path = _resave_with_config(tiny_checkpoint, tmp_path / "bad.pth", bad_value)
    _one_line_error(lambda: load_model(path), "DEQ.F_SOLVER='newton' is not a solver")

    def refused(d):
        d["GPUS"] = [0, 1]
    path = _resave_with_config(tiny_checkpoint, tmp_path / "gpus.pth", refused)
    _one_line_error(lambda: load_model(path), "GPUS", "is not used")

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["config"] = "MODEL: [unclosed\n"
    save_checkpoint(ckpt, str(tmp_path / "yaml.pth"))
    _one_line_error(lambda: load_model(str(tmp_path / "yaml.pth")), "the config stored in checkpoint", "not valid yaml")


def test_load_model_reads_the_file_once_and_returns_its_sha256(tiny_checkpoint, monkeypatch):
    import builtins
    real_open, opened = builtins.open, []

    def counting_open(file, *args, **kwargs):
        if os.path.abspath(str(file)) == os.path.abspath(tiny_checkpoint):
            opened.append(args[0] if args else kwargs.get("mode", "r"))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", counting_open)
    loaded = load_model(tiny_checkpoint)
    monkeypatch.undo()
    assert opened == ["rb"]
    assert loaded.sha256 == file_sha256(tiny_checkpoint) and re.fullmatch(r"[0-9a-f]{64}", loaded.sha256)
    model, cfg, ckpt = loaded  # the earlier tuple API still unpacks
    assert model is loaded.model and cfg is loaded.cfg and ckpt is loaded.checkpoint
    assert not model.training
