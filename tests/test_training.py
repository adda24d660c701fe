"""Training: methods as batch losses, the trainer (best-epoch keeping, determinism), the config."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advtrain.checkpoint import load_checkpoint
from advtrain.data import load_dataset
from advtrain.errors import AdvtrainError, UnknownNameError
from advtrain.models import build_model
from advtrain.training import METHODS, Method, TrainConfig, Trainer, load_config, make_method
from advtrain.training.observers import EpochObserver


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train far faster on one thread, and do not collapse when other processes
    share the two cores (OpenMP's barriers spin); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", seed=0)


def fresh_model(data, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-cnn", in_shape=data.info.shape, n_classes=data.info.n_classes)


# Small settings for the comparison runs: each takes a few seconds on one CPU core.
COMPARE = dict(epochs=8, attack_steps=5, eval_steps=5, seed=0, device="cpu")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The same digits-cnn (same seed, same epochs) trained with ``standard`` and with ``pgd``,
    each with its run directory; {method: (trainer, result, run_dir)}."""
    runs = {}
    for name in ("standard", "pgd"):
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        config = TrainConfig(method=name, **COMPARE)
        trainer = Trainer(fresh_model(data), data, config, run_dir)
        runs[name] = (trainer, trainer.fit(), run_dir)
    return runs


# ---------------------------------------------------------------------- methods


@pytest.fixture
def batch(data):
    return data.test.x[:64], data.test.y[:64]


def test_methods_registry_names():
    assert {"standard", "pgd"} <= set(METHODS)


def test_standard_method_is_clean_cross_entropy(data, digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model)
    loss_fn = make_method("standard", data.info.threat_model())
    loss, logits = loss_fn(model, x, y)
    with torch.no_grad():
        expected_logits = model(x)
    assert logits.shape == (len(x), 10)
    assert loss.dim() == 0
    torch.testing.assert_close(logits.detach(), expected_logits)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(expected_logits, y))


def test_pgd_method_trains_on_adversarial_points(data, digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model)
    threat = data.info.threat_model()  # linf eps 0.2, the dataset's default
    clean_loss, clean_logits = make_method("standard", threat)(model, x, y)
    adv_loss, adv_logits = make_method("pgd", threat, steps=5)(model, x, y)
    assert adv_logits.shape == (len(x), 10)
    assert adv_loss.dim() == 0
    torch.testing.assert_close(adv_loss.detach(), F.cross_entropy(adv_logits.detach(), y))
    # the undefended model is about 95% accurate on clean inputs and broken on the PGD points
    clean_acc = (clean_logits.argmax(1) == y).float().mean().item()
    adv_acc = (adv_logits.argmax(1) == y).float().mean().item()
    assert clean_acc > 0.85
    assert adv_acc < clean_acc - 0.4
    assert adv_loss.item() > clean_loss.item() + 1.0


def test_pgd_method_with_zero_eps_is_standard_training(data, digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model)
    threat = data.info.threat_model(eps=0.0)
    clean_loss, clean_logits = make_method("standard", threat)(model, x, y)
    adv_loss, adv_logits = make_method("pgd", threat, steps=3)(model, x, y)
    torch.testing.assert_close(adv_logits, clean_logits)
    torch.testing.assert_close(adv_loss, clean_loss)


def test_unknown_method_lists_known_names(data):
    with pytest.raises(UnknownNameError) as info:
        make_method("madeup", data.info.threat_model())
    message = str(info.value)
    assert "madeup" in message
    assert "pgd" in message and "standard" in message
    assert isinstance(info.value, AdvtrainError)


@pytest.mark.parametrize("name", ["pgd", "standard"])
def test_method_rejects_misspelled_option(data, name):
    with pytest.raises(AdvtrainError) as info:
        make_method(name, data.info.threat_model(), stpes=3)
    assert "stpes" in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name", ["pgd", "standard"])
def test_method_takes_the_trainer_options(data, name):
    loss_fn = make_method(name, data.info.threat_model(), steps=2, step_size=None)
    assert isinstance(loss_fn, Method) and callable(loss_fn)


def test_attack_inside_the_loss_restores_mode_and_grad_flags(data, digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model).train()
    frozen_param = model[0].bias  # a parameter the user froze stays frozen
    frozen_param.requires_grad_(False)
    loss_fn = make_method("pgd", data.info.threat_model(), steps=3)
    loss, _ = loss_fn(model, x, y)
    assert model.training
    assert all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert p.requires_grad == (p is not frozen_param), name
        assert p.grad is None, f"{name} has a gradient before backward"
    assert loss.requires_grad
    loss.backward()
    for name, p in model.named_parameters():
        if p is frozen_param:
            assert p.grad is None
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_attack_inside_the_loss_keeps_eval_mode(data, digits_model, batch):
    x, y = batch
    model = copy.deepcopy(digits_model).eval()
    make_method("pgd", data.info.threat_model(), steps=2)(model, x, y)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------- trainer


def test_pgd_training_is_clearly_more_robust_than_standard(trained):
    _, standard, _ = trained["standard"]
    _, pgd, _ = trained["pgd"]
    # Measured (torch 2.13 CPU): standard clean 0.956 / robust 0.028,
    # pgd clean 0.958 / robust 0.539.
    assert standard.test_clean_accuracy > 0.9
    assert pgd.test_clean_accuracy > 0.85
    assert pgd.test_robust_accuracy > standard.test_robust_accuracy + 0.3
    assert standard.test_robust_accuracy < 0.2
    for result in (standard, pgd):
        assert result.extra["eps"] == pytest.approx(0.2)
        assert result.extra["norm"] == "linf"
        assert "steps=40" in result.extra["test_attack"]
        assert 0 <= result.test_robust_accuracy <= result.test_clean_accuracy <= 1
        assert result.seconds < 60


def _history_argmax(history, key) -> int:
    """The 1-based epoch with the largest ``key(record)``, the earliest among ties."""
    best = max(range(len(history)), key=lambda i: (key(history[i]), -i))
    return history[best].epoch


@pytest.mark.parametrize(
    "name, key",
    [
        ("pgd", lambda r: (r.val_robust_accuracy, r.val_clean_accuracy)),
        ("standard", lambda r: (r.val_clean_accuracy, r.val_robust_accuracy)),
    ],
)
def test_kept_checkpoint_is_the_best_epoch(trained, name, key):
    trainer, result, run_dir = trained[name]
    history = result.history
    assert [r.epoch for r in history] == list(range(1, COMPARE["epochs"] + 1))
    assert result.best_epoch == _history_argmax(history, key)

    best_state, best_meta = load_checkpoint(run_dir / "model.safetensors")
    last_state, last_meta = load_checkpoint(run_dir / "last.safetensors")
    assert best_meta["epoch"] == result.best_epoch
    assert best_meta["method"] == name and best_meta["model"] == "digits-cnn"
    assert last_meta["epoch"] == COMPARE["epochs"]
    # the trainer reloads the kept state: the model ends as the best epoch's weights
    final = trainer.model.state_dict()
    assert set(best_state) == set(final)
    for k, v in final.items():
        assert torch.equal(best_state[k], v.cpu()), k
    if result.best_epoch != COMPARE["epochs"]:
        assert any(not torch.equal(last_state[k], best_state[k]) for k in best_state)


SCRIPTED = [  # (val clean, val robust) per epoch, imposed on real epochs
    (0.90, 0.30),
    (0.80, 0.50),
    (0.90, 0.50),  # pgd keeps this one: ties on robust broken by clean
    (0.95, 0.40),  # standard keeps this one: best clean
    (0.95, 0.10),  # a tie on clean with a worse robust accuracy: not kept
    (0.90, 0.50),  # a full tie with epoch 3: the earlier one stays
]


@pytest.mark.parametrize("name, expected", [("pgd", 3), ("standard", 4)])
def test_selection_with_scripted_validation_figures(data, tmp_path, monkeypatch, name, expected):
    config = TrainConfig(
        method=name,
        epochs=len(SCRIPTED),
        attack_steps=1,
        eval_steps=1,
        batch_size=256,
        device="cpu",
    )
    trainer = Trainer(fresh_model(data), data, config, tmp_path)
    real_epoch = trainer._epoch
    states = []

    def scripted_epoch(epoch, generator):
        record = real_epoch(epoch, generator)
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        clean, robust = SCRIPTED[epoch - 1]
        return dataclasses.replace(record, val_clean_accuracy=clean, val_robust_accuracy=robust)

    monkeypatch.setattr(trainer, "_epoch", scripted_epoch)
    result = trainer.fit()
    assert result.best_epoch == expected
    kept, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["epoch"] == expected
    assert (meta["val_clean_accuracy"], meta["val_robust_accuracy"]) == SCRIPTED[expected - 1]
    final = trainer.model.state_dict()
    for k, v in states[expected - 1].items():
        assert torch.equal(kept[k], v), k
        assert torch.equal(final[k], v), k
    last, _ = load_checkpoint(tmp_path / "last.safetensors")
    assert all(torch.equal(last[k], v) for k, v in states[-1].items())
    assert any(not torch.equal(last[k], kept[k]) for k in kept)


def test_run_directory_records_every_epoch(trained):
    for name, (_, result, run_dir) in trained.items():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == COMPARE["epochs"]
        records = [json.loads(line) for line in lines]
        for record, epoch in zip(records, result.history):
            assert record == pytest.approx(epoch.to_dict())
        config = json.loads((run_dir / "config.json").read_text())
        assert config["method"] == name and config["epochs"] == COMPARE["epochs"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["best_epoch"] == result.best_epoch
        assert summary["test_robust_accuracy"] == pytest.approx(result.test_robust_accuracy)
        assert summary["test_clean_accuracy"] == pytest.approx(result.test_clean_accuracy)


def _small_run(model, data, run_dir):
    config = TrainConfig(
        method="pgd", epochs=2, attack_steps=2, eval_steps=2, seed=5, batch_size=128, device="cpu"
    )
    trainer = Trainer(model, data, config, run_dir)
    return trainer, trainer.fit()


def test_same_seed_gives_identical_weights_and_metrics(data, tmp_path):
    model = fresh_model(data, seed=5)
    twin = copy.deepcopy(model)
    # the second run starts with the global RNG wherever the first left it: fit() seeds itself
    first, result1 = _small_run(model, data, tmp_path / "a")
    torch.rand(17)
    second, result2 = _small_run(twin, data, tmp_path / "b")
    state1, state2 = first.model.state_dict(), second.model.state_dict()
    for k in state1:
        assert torch.equal(state1[k], state2[k]), k

    def without_times(d):
        return {k: v for k, v in d.items() if k != "seconds"}

    assert [without_times(e.to_dict()) for e in result1.history] == [
        without_times(e.to_dict()) for e in result2.history
    ]
    summary1, summary2 = without_times(result1.to_dict()), without_times(result2.to_dict())
    for summary in (summary1, summary2):
        summary.pop("history")
    assert summary1 == summary2  # best epoch, test clean and robust accuracy, attack, eps
    # the saved files hold the same tensors too
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_trainer_without_run_dir_writes_nothing(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(method="standard", epochs=1, eval_steps=1, device="cpu")
    result = Trainer(fresh_model(data), data, config).fit()
    assert result.best_epoch == 1 and len(result.history) == 1
    assert list(tmp_path.iterdir()) == []


def test_trainer_log_gets_one_line_per_epoch(data):
    lines: list[str] = []
    config = TrainConfig(method="standard", epochs=2, eval_steps=1, device="cpu")
    Trainer(fresh_model(data), data, config, log=lines.append).fit()
    assert len(lines) == 2
    assert lines[0].lstrip().startswith("epoch") and "1/2" in lines[0] and "val robust" in lines[0]


# ---------------------------------------------------------------------- config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config_defaults():
    assert load_config() == TrainConfig()
    config = TrainConfig()
    assert (config.dataset, config.model, config.method, config.norm) == (
        "digits",
        "digits-cnn",
        "pgd",
        "linf",
    )
    assert config.eps is None and config.epochs == 30


def test_load_config_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path / "run.toml", '[train]\nepochs = 3\nmethod = "standard"\nlr = 0.01\n')
    config = load_config(path, epochs=5, lr=None, seed=None, batch_size=32)
    assert config.epochs == 5  # override beats the file
    assert config.lr == 0.01  # None does not override the file
    assert config.method == "standard"  # file beats the default
    assert config.seed == 0  # default, neither file nor override
    assert config.batch_size == 32


def test_load_config_reads_top_level_keys_and_dashes(tmp_path):
    path = write(tmp_path / "run.toml", 'attack-steps = 4\neval-steps = 2\ndata-dir = "d"\n')
    config = load_config(str(path))
    assert (config.attack_steps, config.eval_steps, config.data_dir) == (4, 2, "d")


def test_load_config_reads_dashes_in_the_train_table(tmp_path):
    path = write(tmp_path / "run.toml", "[train]\nbatch-size = 16\nweight-decay = 0.001\n")
    config = load_config(path)
    assert config.batch_size == 16 and config.weight_decay == 0.001


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("epochs = 0\n", {}, "epochs"),
        ("", {"epochs": 0}, "epochs"),
        ("epochs = true\n", {}, "epochs"),
        ("epochs = 1.5\n", {}, "epochs"),
        ("lr = -0.1\n", {}, "lr"),
        ("", {"lr": -1.0}, "lr"),
        ("", {"lr": 0.0}, "lr"),
        ("eps = nan\n", {}, "eps"),
        ("", {"eps": float("nan")}, "eps"),
        ("", {"eps": -0.1}, "eps"),
        ("", {"eps": math.inf}, "eps"),
        ('optimizer = "rmsprop"\n', {}, "rmsprop"),
        ("", {"optimizer": "lbfgs"}, "lbfgs"),
        ("", {"attack_steps": 0}, "attack_steps"),
        ("epochz = 3\n", {}, "epochz"),
        ("", {"bogus": 1}, "bogus"),
        ("[train]\nepochs = \n", {}, "TOML"),
        ("train = 5\n", {}, "table"),
    ],
)
def test_load_config_rejects_bad_values(tmp_path, text, overrides, needle):
    path = write(tmp_path / "run.toml", text)
    with pytest.raises(AdvtrainError) as info:
        load_config(path, **overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_load_config_missing_file(tmp_path):
    with pytest.raises(AdvtrainError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_train_config_replace_validates():
    config = TrainConfig().replace(epochs=2)
    assert config.epochs == 2
    with pytest.raises(AdvtrainError):
        config.replace(eval_steps=-1)
    assert json.loads(json.dumps(config.to_dict()))["epochs"] == 2


# ------------------------------------------------------------------ config: the trainer's options


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"adv_ratio": 1.5}, "adv_ratio"),
        ({"adv_ratio": -0.1}, "adv_ratio"),
        ({"adv_ratio": float("nan")}, "adv_ratio"),
        ({"schedule": "linear"}, "linear"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_epochs": 40}, "warmup_epochs"),
        ({"augment": "crop,rotate"}, "rotate"),
        ({"augment": ["crop", "crop"]}, "twice"),
        ({"augment": 5}, "augment"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"early_stop": 0}, "early_stop"),
        ({"early_stop": 1.5}, "early_stop"),
        ({"catastrophic": "maybe"}, "catastrophic"),
        ({"co_threshold": 0.0}, "co_threshold"),
        ({"co_threshold": 1.5}, "co_threshold"),
        ({"checkpoint_every": -2}, "checkpoint_every"),
        ({"tensorboard": "yes"}, "tensorboard"),
        ({"amp": "fp8"}, "fp8"),
        ({"channels_last": "sometimes"}, "channels_last"),
        ({"method_options": "beta=6"}, "method_options"),
        ({"method_options": {"steps": 3}}, "attack_steps"),
        ({"method_options": {"beta": [1, 2]}}, "beta"),
        ({"method_options": {"beta": float("inf")}}, "beta"),
    ],
)
def test_trainer_options_reject_bad_values_in_one_line(overrides, needle):
    with pytest.raises(AdvtrainError) as info:
        load_config(**overrides)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_trainer_options_defaults_keep_the_default_job():
    config = TrainConfig()
    assert (config.schedule, config.eps_warmup_epochs, config.augment, config.adv_ratio) == (
        "constant",
        0,
        (),
        1.0,
    )
    assert (config.early_stop, config.checkpoint_every, config.tensorboard) == (None, 0, False)
    assert config.method_options == {} and config.amp == "auto" and config.channels_last == "auto"


def test_eps_warmup_defaults_to_a_tenth_of_the_run_for_fgsm_type_methods_only():
    assert TrainConfig(method="fgsm-rs", epochs=10).eps_warmup_epochs == 1
    assert TrainConfig(method="fgsm-rs", epochs=25).eps_warmup_epochs == 2
    assert TrainConfig(method="fgsm-rs", epochs=9).eps_warmup_epochs == 0
    assert TrainConfig(method="pgd", epochs=10).eps_warmup_epochs == 0
    assert TrainConfig(method="trades", epochs=30).eps_warmup_epochs == 0
    # an explicit value, 0 included, is kept
    assert TrainConfig(method="fgsm-rs", epochs=10, warmup_epochs=0).eps_warmup_epochs == 0
    assert TrainConfig(method="pgd", epochs=10, warmup_epochs=3).eps_warmup_epochs == 3


def test_trainer_options_from_toml_and_overrides(tmp_path):
    path = write(
        tmp_path / "run.toml",
        '[train]\naugment = ["crop", "noise"]\nwarmup-epochs = 2\n'
        'schedule = "onecycle"\nearly-stop = 3\nchannels-last = false\n'
        "[train.method_options]\nbeta = 6.0\ntemperature = 20\n",
    )
    config = load_config(path, method_options={"beta": 1.0}, adv_ratio=0.5)
    assert config.augment == ("crop", "noise")
    assert (config.warmup_epochs, config.schedule, config.early_stop) == (2, "onecycle", 3)
    assert config.channels_last == "off"  # TOML booleans are read as on/off
    assert config.method_options == {"beta": 1.0, "temperature": 20}  # merged, the flag wins
    assert config.adv_ratio == 0.5
    # config.json round trip
    assert TrainConfig(**json.loads(json.dumps(config.to_dict()))) == config
    assert load_config(augment=" crop , flip ").augment == ("crop", "flip")
    assert load_config(augment="none").augment == ()


def test_parse_method_options():
    from advtrain.training.config import parse_method_options

    parsed = parse_method_options(
        ["beta=6", "temperature=2.5", "flag=true", "name=x", "step-x=1e-3"]
    )
    assert parsed == {"beta": 6, "temperature": 2.5, "flag": True, "name": "x", "step_x": 0.001}
    assert isinstance(parsed["beta"], int) and isinstance(parsed["flag"], bool)
    for bad, needle in (
        (["beta"], "key=value"),
        (["beta=1", "beta=2"], "twice"),
        (["=3"], "key=value"),
    ):
        with pytest.raises(AdvtrainError, match=needle):
            parse_method_options(bad)


# ---------------------------------------------------------------------- schedules


def test_schedules_shapes():
    from advtrain.training.schedules import SCHEDULES, lr_multiplier

    total = 1000
    assert set(SCHEDULES) == {"constant", "piecewise", "cosine", "onecycle"}
    one = [lr_multiplier("onecycle", s, total) for s in range(total + 1)]
    assert one[0] == 0 and one[-1] == 0 and one[400] == pytest.approx(1.0)
    assert max(range(total + 1), key=one.__getitem__) == 400  # the peak at 2/5
    assert all(a < b for a, b in zip(one[:400], one[1:401]))  # rises linearly ...
    assert all(a > b for a, b in zip(one[400:], one[401:]))  # ... and falls to 0
    assert one[200] == pytest.approx(0.5) and one[700] == pytest.approx(0.5)

    piece = [lr_multiplier("piecewise", s, total) for s in range(total)]
    assert piece[:500] == [1.0] * 500
    assert piece[500:750] == pytest.approx([0.1] * 250)
    assert piece[750:] == pytest.approx([0.01] * 250)

    cos = [lr_multiplier("cosine", s, total) for s in range(total + 1)]
    assert cos[0] == 1 and cos[500] == pytest.approx(0.5) and cos[-1] == pytest.approx(0, abs=1e-12)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    assert {lr_multiplier("constant", s, total) for s in range(0, total + 1, 50)} == {1.0}


def test_unknown_schedule_lists_known_ones():
    from advtrain.training.schedules import get_schedule

    with pytest.raises(UnknownNameError, match="onecycle"):
        get_schedule("linear")


def test_trainer_sets_the_learning_rate_per_batch(data):
    from advtrain.training.schedules import onecycle

    config = TrainConfig(
        method="standard",
        epochs=2,
        batch_size=256,
        eval_steps=1,
        lr=0.01,
        schedule="onecycle",
        device="cpu",
    )
    trainer = Trainer(fresh_model(data), data, config)
    seen: list[float] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    result = trainer.fit()
    total = trainer.total_steps
    assert total == 2 * math.ceil(len(data.train) / 256) == len(seen)
    assert seen == pytest.approx([0.01 * onecycle(i + 0.5, total) for i in range(total)])
    assert min(seen) > 0 and max(seen) <= 0.01
    assert result.history[-1].lr == pytest.approx(seen[-1])
    assert seen.index(max(seen)) == int(0.4 * total)


# ---------------------------------------------------------------------- eps warm-up


def test_eps_warmup_ramps_per_batch_and_is_recorded(data, tmp_path):
    config = TrainConfig(
        method="pgd",
        epochs=3,
        warmup_epochs=2,
        batch_size=256,
        attack_steps=1,
        eval_steps=1,
        device="cpu",
    )
    trainer = Trainer(fresh_model(data), data, config, tmp_path)
    built: list[float] = []
    set_eps = trainer.method.set_eps

    def recording_set_eps(eps):
        built.append(eps)
        set_eps(eps)

    trainer.method.set_eps = recording_set_eps
    result = trainer.fit()
    batches = trainer.batches_per_epoch
    # one new loss per batch of the two warm-up epochs, eps rising linearly to 0.2
    assert built == pytest.approx([0.2 * k / (2 * batches) for k in range(1, 2 * batches + 1)])
    assert [r.eps for r in result.history] == pytest.approx([0.1, 0.2, 0.2])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["eps"] for line in lines] == pytest.approx([0.1, 0.2, 0.2])
    assert all(line["lr"] == pytest.approx(3e-3) for line in lines)
    # validation and test always attack at the full radius
    assert trainer.validation_attack().threat.eps == pytest.approx(0.2)
    assert result.extra["eps"] == pytest.approx(0.2)


def test_fgsm_rs_ramps_eps_over_the_first_tenth_of_the_run_by_default(data):
    config = TrainConfig(method="fgsm-rs", epochs=10, batch_size=256, eval_steps=1, device="cpu")
    trainer = Trainer(fresh_model(data), data, config)
    built: list[float] = []
    set_eps = trainer.method.set_eps

    def recording_set_eps(eps):
        built.append(eps)
        set_eps(eps)

    class StopAfterTheFirstEpoch(EpochObserver):
        def epoch_end(self, end):
            end.run.stop_reason = "enough: the ramp is the first epoch"

    trainer.method.set_eps = recording_set_eps
    trainer.observers.append(StopAfterTheFirstEpoch())
    result = trainer.fit()
    batches = trainer.batches_per_epoch
    assert len(result.history) == 1
    assert built == pytest.approx([0.2 * k / batches for k in range(1, batches + 1)])


def test_weight_average_defaults_to_0995_for_fgsm_type_methods_only():
    assert TrainConfig(method="fgsm-rs").weight_averaging_decay == 0.995
    assert TrainConfig(method="pgd").weight_averaging_decay == 0
    assert TrainConfig(method="trades").weight_averaging_decay == 0
    # an explicit value, 0 included, is kept
    assert TrainConfig(method="fgsm-rs", ema_decay=0).weight_averaging_decay == 0
    assert TrainConfig(method="pgd", ema_decay=0.99).weight_averaging_decay == 0.99


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), True, "0.9"])
def test_ema_decay_outside_zero_to_one_is_refused(bad):
    with pytest.raises(AdvtrainError, match="ema_decay must be a number in \\[0, 1\\)"):
        TrainConfig(ema_decay=bad)


def test_the_run_validates_and_saves_the_average_of_its_weights(data, tmp_path):
    config = TrainConfig(
        method="pgd",
        ema_decay=0.3,
        epochs=1,
        batch_size=256,
        attack_steps=2,
        eval_steps=1,
        device="cpu",
    )
    trainer = Trainer(fresh_model(data), data, config, tmp_path)
    live: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        live.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return out

    trainer.optimizer.step = recording_step
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    # the formula of advtrain.training.averaging, written out
    expected = start
    for t, weights in enumerate(live, start=1):
        decay = min(0.3, (1 + t) / (10 + t))  # the cap from step 3 on
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
    saved, _ = load_checkpoint(tmp_path / "model.safetensors")
    assert len(live) == trainer.batches_per_epoch > 3
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(saved[key], live[-1][key])  # not the live weights
    # validation measured the average: its clean accuracy is the saved weights'
    model = fresh_model(data)
    model.load_state_dict(saved)
    with torch.no_grad():
        clean = (model.eval()(data.val.x).argmax(1) == data.val.y).float().mean().item()
    assert result.history[0].val_clean_accuracy == pytest.approx(clean)


def test_warmup_eps_counts_replays_as_epochs():
    from advtrain.training.schedules import warmup_eps

    assert warmup_eps(0.3, 1, 9, 10, 0) == 0.3
    assert warmup_eps(0.3, 1, 0, 10, 3) == pytest.approx(0.01)
    assert warmup_eps(0.3, 3, 9, 10, 3) == 0.3
    assert warmup_eps(0.3, 1, 9, 10, 4, replays=2) == pytest.approx(0.15)  # 1 pass = 2 epochs


# ---------------------------------------------------------------------- stopping rules


def _scripted_validation(trainer, figures):
    """Make ``trainer._validate`` return ``figures[epoch - 1]`` (clean and robust accuracy);
    returns the weights seen at each validation, by epoch."""
    from advtrain.training.validation import EpochFigures

    states: list[dict[str, torch.Tensor]] = []

    def scripted():
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return EpochFigures(*figures[len(states) - 1])

    trainer._validate = scripted
    return states


def _same_weights(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_early_stop_keeps_the_best_epoch_and_stops_after_patience(data, tmp_path):
    figures = [(0.9, 0.30), (0.9, 0.50), (0.9, 0.45), (0.9, 0.40), (0.9, 0.60), (0.9, 0.7)]
    config = TrainConfig(
        method="pgd",
        epochs=len(figures),
        early_stop=2,
        attack_steps=1,
        eval_steps=1,
        batch_size=256,
        device="cpu",
    )
    lines: list[str] = []
    trainer = Trainer(fresh_model(data), data, config, tmp_path, log=lines.append)
    states = _scripted_validation(trainer, figures)
    result = trainer.fit()
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]  # epochs 3 and 4 did not improve
    assert result.best_epoch == 2
    assert "early stop" in result.extra["stop_reason"] and "epoch 2" in result.extra["stop_reason"]
    assert any("early stop" in line for line in lines)
    kept, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["epoch"] == 2 and meta["val_robust_accuracy"] == 0.5
    assert _same_weights(kept, states[1])
    assert _same_weights(trainer.model.state_dict(), states[1])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_epoch"] == 2 and summary["epochs_run"] == 4


def test_catastrophic_overfitting_detection_on_synthetic_histories():
    from advtrain.training.observers import catastrophic_overfitting
    from advtrain.training.records import EpochRecord

    def history(*pairs):
        return [
            EpochRecord(
                epoch=i + 1,
                train_loss=1.0,
                train_accuracy=0.5,
                val_clean_accuracy=c,
                val_robust_accuracy=r,
                lr=0.1,
                seconds=1.0,
                eps=0.3,
            )
            for i, (c, r) in enumerate(pairs)
        ]

    message = catastrophic_overfitting(history((0.80, 0.40), (0.85, 0.45), (0.92, 0.02)))
    assert message is not None
    assert "catastrophic overfitting" in message and "Wong" in message
    assert "epoch 3" in message and "epoch 2" in message and "\n" not in message
    assert catastrophic_overfitting(history((0.80, 0.40))) is None  # nothing to compare with
    assert catastrophic_overfitting(history((0.8, 0.40), (0.8, 0.25))) is None  # not below half
    assert catastrophic_overfitting(history((0.8, 0.40), (0.5, 0.10))) is None  # clean fell too
    assert catastrophic_overfitting(history((0.8, 0.0), (0.9, 0.0))) is None
    # early epochs near zero wobble (8% -> 4%): nothing had been gained, nothing collapsed
    assert catastrophic_overfitting(history((0.91, 0.08), (0.92, 0.04))) is None
    assert catastrophic_overfitting(history((0.8, 0.40), (0.8, 0.25)), threshold=0.7) is not None


def test_catastrophic_overfitting_stops_at_the_best_checkpoint(data, tmp_path):
    figures = [(0.80, 0.40), (0.85, 0.45), (0.92, 0.03), (0.95, 0.0), (0.95, 0.0)]
    config = TrainConfig(
        method="pgd",
        epochs=len(figures),
        catastrophic="stop",
        attack_steps=1,
        eval_steps=1,
        batch_size=256,
        device="cpu",
    )
    lines: list[str] = []
    trainer = Trainer(fresh_model(data), data, config, tmp_path, log=lines.append)
    states = _scripted_validation(trainer, figures)
    result = trainer.fit()
    assert len(result.history) == 3 and result.best_epoch == 2
    assert "catastrophic overfitting" in result.extra["stop_reason"]
    assert "keeping epoch 2" in result.extra["stop_reason"]
    assert any("catastrophic overfitting" in line for line in lines)
    assert _same_weights(trainer.model.state_dict(), states[1])
    kept, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["epoch"] == 2 and _same_weights(kept, states[1])


def test_catastrophic_overfitting_warn_mode_goes_on(data):
    figures = [(0.80, 0.40), (0.85, 0.45), (0.92, 0.03)]
    config = TrainConfig(
        method="pgd",
        epochs=3,
        catastrophic="warn",
        attack_steps=1,
        eval_steps=1,
        batch_size=256,
        device="cpu",
    )
    trainer = Trainer(fresh_model(data), data, config)
    _scripted_validation(trainer, figures)
    result = trainer.fit()
    assert len(result.history) == 3 and result.extra["stop_reason"] is None
    assert len(result.extra["warnings"]) == 1 and "catastrophic" in result.extra["warnings"][0]


def test_catastrophic_auto_watches_fgsm_type_methods_only(data):
    pgd = Trainer(fresh_model(data), data, TrainConfig(method="pgd", device="cpu"))
    assert pgd.catastrophic == "off"
    if "fgsm-rs" in METHODS:
        fast = Trainer(fresh_model(data), data, TrainConfig(method="fgsm-rs", device="cpu"))
        assert fast.catastrophic == "stop"


# ---------------------------------------------------------------------- the method contract


def test_replays_and_epoch_hook_are_honoured(data, monkeypatch):
    calls = {"loss": 0, "hook": []}

    class Replayed(Method):
        replays = 3

        def loss(self, model, x, y):
            calls["loss"] += 1
            logits = model(x)
            return F.cross_entropy(logits, y), logits

        def on_epoch_start(self, model, epoch, epochs):
            calls["hook"].append((epoch, epochs))

    def factory(threat, *, steps=10, step_size=None):
        return Replayed(threat)

    monkeypatch.setitem(METHODS, "test-replays", factory)
    config = TrainConfig(
        method="test-replays", epochs=5, batch_size=256, eval_steps=1, device="cpu"
    )
    trainer = Trainer(fresh_model(data), data, config)
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    result = trainer.fit()
    batches = trainer.batches_per_epoch
    assert trainer.run_epochs == 2 and len(result.history) == 2  # ceil(5 / 3)
    assert calls["hook"] == [(1, 2), (2, 2)]
    assert calls["loss"] == len(steps) == 2 * batches * 3 == trainer.total_steps


def test_method_options_reach_the_method(data, monkeypatch):
    got = {}

    def factory(threat, *, steps=10, step_size=None, beta=1.0, flag=False):
        got.update(beta=beta, flag=flag, steps=steps)
        return METHODS["standard"](threat)

    monkeypatch.setitem(METHODS, "test-options", factory)
    config = TrainConfig(
        method="test-options",
        attack_steps=4,
        method_options={"beta": 6.0, "flag": True},
        device="cpu",
    )
    Trainer(fresh_model(data), data, config)
    assert got == {"beta": 6.0, "flag": True, "steps": 4}
    bad = TrainConfig(method="pgd", method_options={"bogus": 1}, device="cpu")
    with pytest.raises(AdvtrainError, match="bogus"):
        Trainer(fresh_model(data), data, bad)


def test_adv_ratio_blends_the_method_with_clean_loss(data, digits_model, batch):
    from advtrain.training.method import Mixed

    x, y = batch
    model = copy.deepcopy(digits_model)
    config = TrainConfig(method="pgd", attack_steps=3, adv_ratio=0.25, device="cpu")
    trainer = Trainer(model, data, config)
    adversarial = make_method("pgd", trainer.threat, steps=3)
    assert isinstance(trainer.method, Mixed) and trainer.method.adv_ratio == 0.25
    torch.manual_seed(1)
    mixed, logits = trainer.method(model, x, y)
    torch.manual_seed(1)
    adv_loss, adv_logits = adversarial(model, x, y)
    clean = F.cross_entropy(model(x), y)
    torch.testing.assert_close(mixed, 0.25 * adv_loss + 0.75 * clean)
    torch.testing.assert_close(logits, adv_logits)
    unmixed = Trainer(model, data, config.replace(adv_ratio=1.0)).method
    assert isinstance(unmixed, Method) and not isinstance(unmixed, Mixed)


# ---------------------------------------------------------------------- augmentation


def test_crop_is_a_random_shift_inside_the_bounds(data):
    from advtrain.training.augment import crop_padding, random_crop

    x = data.train.x[:32]
    assert crop_padding(data.info) == 2
    mnist_like = dataclasses.replace(data.info, shape=(1, 28, 28))
    assert crop_padding(mnist_like) == 4
    out = random_crop(x, torch.Generator().manual_seed(0), data.info)
    again = random_crop(x, torch.Generator().manual_seed(0), data.info)
    assert torch.equal(out, again)  # the generator decides everything
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    padded = F.pad(x, (2, 2, 2, 2))
    shifted = 0
    for i in range(len(x)):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])
        ]
        assert windows, f"sample {i} is not a window of the padded image"
        shifted += (2, 2) not in windows
    assert shifted > 16  # most samples moved


def test_flip_mirrors_about_half_of_the_images(data):
    from advtrain.training.augment import random_flip

    x = data.train.x[:64]
    out = random_flip(x, torch.Generator().manual_seed(0), data.info)
    flipped = [
        bool(torch.equal(out[i], x[i].flip(-1))) and not torch.equal(x[i], x[i].flip(-1))
        for i in range(len(x))
    ]
    assert all(
        torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))
    )
    assert 16 < sum(flipped) < 48


def test_noise_respects_bounds_and_immutable_features():
    from advtrain.data import load_dataset
    from advtrain.training.augment import gaussian_noise

    fraud = load_dataset("fraud", seed=0)
    info = fraud.info
    x = fraud.train.x[:256]
    out = gaussian_noise(x, torch.Generator().manual_seed(0), info, std=0.5)
    assert info.mutable is not None and not bool(info.mutable.all())
    frozen = ~info.mutable
    assert torch.equal(out[:, frozen], x[:, frozen])
    assert bool((out >= info.lower).all()) and bool((out <= info.upper).all())
    changed = (out[:, info.mutable] != x[:, info.mutable]).float().mean()
    assert changed > 0.5


@pytest.mark.parametrize(
    "dataset, augment, needles",
    [
        ("digits", "flip", ["flip", "digits", "mirror"]),
        ("fraud", "crop", ["crop", "images", "fraud"]),
        ("fraud", "flip", ["flip", "images"]),
    ],
)
def test_augmentation_refused_where_it_does_not_fit(dataset, augment, needles):
    from advtrain.data import load_dataset
    from advtrain.training.augment import make_augment

    info = load_dataset(dataset, seed=0).info
    with pytest.raises(AdvtrainError) as error:
        make_augment([augment], info)
    for needle in needles:
        assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_trainer_refuses_flip_for_digits_before_training(data, tmp_path):
    config = TrainConfig(augment="crop,flip", device="cpu")
    with pytest.raises(AdvtrainError, match="mirror-symmetric"):
        Trainer(fresh_model(data), data, config, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- devices, monitoring


def test_amp_and_channels_last_on_the_cpu(data, monkeypatch):
    trainer = Trainer(fresh_model(data), data, TrainConfig(device="cpu"))
    assert trainer.amp_dtype is None and trainer.channels_last is False and trainer.scaler is None
    with pytest.raises(AdvtrainError, match="CUDA"):
        Trainer(fresh_model(data), data, TrainConfig(device="cpu", amp="bf16"))
    on = Trainer(fresh_model(data), data, TrainConfig(device="cpu", channels_last="on"))
    assert on.channels_last
    weight = on.model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_tensorboard_without_the_package_is_a_one_line_error(data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(AdvtrainError) as info:
        Trainer(fresh_model(data), data, TrainConfig(device="cpu", tensorboard=True))
    assert "tensorboard" in str(info.value) and "\n" not in str(info.value)


def test_curves_png_is_written(trained):
    for _, _, run_dir in trained.values():
        data = (run_dir / "curves.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert not list(run_dir.glob(".curves.png.*"))  # no temporary file left behind


def test_every_epoch_leaves_a_checkpoint_to_resume_from(trained):
    _, result, run_dir = trained["pgd"]
    metas = [
        load_checkpoint(run_dir / name)[1]
        for name in ("resume-0.safetensors", "resume-1.safetensors")
    ]
    newest = max(metas, key=lambda m: m["serial"])
    assert newest["kind"] == "advtrain-resume" and newest["serial"] == COMPARE["epochs"]
    assert newest["next_epoch"] == COMPARE["epochs"] + 1 and newest["next_batch"] == 0
    assert [r["epoch"] for r in newest["history"]] == list(range(1, COMPARE["epochs"] + 1))
    assert newest["best_epoch"] == result.best_epoch
    tensors, _ = load_checkpoint(run_dir / f"resume-{newest['serial'] % 2}.safetensors")
    assert tensors["rng.torch"].dtype == torch.uint8 and tensors["rng.batches"].dtype == torch.uint8
    assert any(k.startswith("optim.") for k in tensors)
    assert any(k.startswith("best.") for k in tensors)


def test_compiled_training_model_trains_alike_and_saves_plain_weights(data, tmp_path):
    """``compile="eager"``: TorchDynamo traces the model in the training loss (no C compiler
    needed); the weights match the uncompiled run and the checkpoint keeps the plain names."""
    runs = {}
    for mode in ("off", "eager"):
        config = TrainConfig(
            method="pgd",
            epochs=1,
            attack_steps=2,
            eval_steps=2,
            seed=5,
            batch_size=128,
            device="cpu",
            compile=mode,
        )
        trainer = Trainer(fresh_model(data, seed=5), data, config, tmp_path / mode)
        trainer.fit()
        runs[mode] = trainer
    assert runs["eager"].train_model is not runs["eager"].model
    plain, compiled = (
        load_checkpoint(tmp_path / m / "model.safetensors")[0] for m in ("off", "eager")
    )
    assert set(compiled) == set(plain)  # no "_orig_mod." prefix
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(AdvtrainError, match="unknown compile 'fast'"):
        TrainConfig(compile="fast")
