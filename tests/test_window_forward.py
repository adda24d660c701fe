"""The window forward pass (recomputing only the feature-map patches a changed window reaches)
against the model's own forward pass, which models it takes, and its use in the Square attack."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import advtrain.attacks.window_forward as window_forward
from advtrain.attacks.square import Square
from advtrain.attacks.window_forward import PathChooser, WindowForward
from advtrain.evaluation import predict
from advtrain.models import build_model

torch.set_num_threads(1)


def _odd_model() -> nn.Sequential:
    """Rectangular kernels and strides, dilation, eval-mode BatchNorm, padded max pooling, a
    nested Sequential and a stride larger than the kernel on the last stage."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
        nn.BatchNorm2d(5), nn.LeakyReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Sequential(nn.Conv2d(5, 4, 2, stride=3), nn.Tanh()),
        nn.Flatten(), nn.Linear(4 * 3 * 2, 7),
    )
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _models() -> dict[str, tuple[nn.Module, tuple[int, int, int]]]:
    torch.manual_seed(0)
    return {
        "mnist-small": (build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10).eval(),
                        (1, 28, 28)),
        "digits-cnn": (build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10).eval(),
                       (1, 8, 8)),
        "odd": (_odd_model(), (3, 17, 23)),
    }


@pytest.mark.parametrize("name", ["mnist-small", "digits-cnn", "odd"])
def test_matches_the_full_forward_pass_over_a_search(name):
    model, shape = _models()[name]
    local = WindowForward.build(model, shape)
    assert local is not None
    g = torch.Generator().manual_seed(1)
    n = 6
    current = torch.rand((n, *shape), generator=g)
    with torch.no_grad():
        logits, maps = local.start(current)
        assert torch.equal(logits, model(current))
        for _ in range(25):
            window = tuple(int(torch.randint(1, min(shape[1:]) + 1, (), generator=g))
                           for _ in range(2))
            top = torch.randint(0, shape[1] - window[0] + 1, (n,), generator=g)
            left = torch.randint(0, shape[2] - window[1] + 1, (n,), generator=g)
            candidate = current.clone()
            for i in range(n):
                candidate[i, :, top[i]:top[i] + window[0], left[i]:left[i] + window[1]] = \
                    torch.rand(shape[0], *window, generator=g)
            logits, patches = local(candidate, maps, top, left, window)
            torch.testing.assert_close(logits, model(candidate), rtol=1e-5, atol=1e-5)
            taken = torch.randperm(n, generator=g)[: n // 2]
            local.commit(maps, patches, taken, taken)
            current[taken] = candidate[taken]
        # the kept maps are those of the current points
        for kept, fresh in zip(maps, local.start(current)[1]):
            torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-5)


@st.composite
def _stacks(draw):
    """A random stack of convolutions and max poolings (any kernel, stride, padding, dilation),
    an input plane it fits, and a window with one corner per sample."""
    channels = draw(st.integers(1, 3))
    height, width = draw(st.integers(4, 11)), draw(st.integers(4, 11))
    layers: list[nn.Module] = []
    h, w, c = height, width, channels
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
            d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
            s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
            out = draw(st.integers(1, 4))
            layer = nn.Conv2d(c, out, k, stride=s, padding=p, dilation=d)
        else:
            k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
            d, out = (1, 1), c
            layer = nn.MaxPool2d(k, stride=s, padding=p)
        extent = [(k[i] - 1) * d[i] + 1 for i in range(2)]
        h2, w2 = ((n + 2 * p[i] - extent[i]) // s[i] + 1 for i, n in enumerate((h, w)))
        if h2 < 1 or w2 < 1:
            break
        layers += [layer, nn.Tanh()]
        h, w, c = h2, w2, out
    if not layers:
        layers = [nn.Conv2d(c, 2, 1)]
        c = 2
    torch.manual_seed(draw(st.integers(0, 100)))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, 3)).eval()
    window = (draw(st.integers(1, height)), draw(st.integers(1, width)))
    n = 4
    top = torch.tensor([draw(st.integers(0, height - window[0])) for _ in range(n)])
    left = torch.tensor([draw(st.integers(0, width - window[1])) for _ in range(n)])
    return model, (channels, height, width), window, top, left


@settings(max_examples=60, deadline=None)
@given(_stacks())
def test_any_stack_and_window_gives_the_full_forward_pass(case):
    model, shape, window, top, left = case
    local = WindowForward.build(model, shape)
    assert local is not None
    g = torch.Generator().manual_seed(0)
    current = torch.rand((len(top), *shape), generator=g)
    candidate = current.clone()
    for i in range(len(top)):
        candidate[i, :, top[i]:top[i] + window[0], left[i]:left[i] + window[1]] = \
            torch.rand(shape[0], *window, generator=g)
    with torch.no_grad():
        _, maps = local.start(current)
        logits, patches = local(candidate, maps, top, left, window)
        torch.testing.assert_close(logits, model(candidate), rtol=1e-5, atol=1e-5)
        rows = torch.arange(len(top))
        local.commit(maps, patches, rows, rows)
        for kept, fresh in zip(maps, local.start(candidate)[1]):
            torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-5)


def test_takes_only_models_it_can_follow():
    model, shape = _models()["mnist-small"]
    assert len(WindowForward.build(model, shape).stages) == 2
    assert WindowForward.build(model, (784,)) is None  # not an image
    assert WindowForward.build(model.train(), shape) is None
    model.eval()

    class Custom(nn.Sequential):  # a subclass may change forward()
        pass

    assert WindowForward.build(Custom(*model), shape) is None
    assert WindowForward.build(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), shape) is None
    assert WindowForward.build(nn.Sequential(nn.ReLU(), *model), shape) is None
    replaced = build_model("mnist-small", in_shape=shape, n_classes=10).eval()
    replaced[0].forward = lambda x: torch.zeros(len(x), 16, 14, 14)
    assert WindowForward.build(replaced, shape) is None  # the first layer's forward replaced
    handle = model[1].register_forward_hook(lambda *args: None)
    assert WindowForward.build(model, shape) is None
    handle.remove()
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten())
    assert WindowForward.build(reflect.eval(), shape) is None
    # batch statistics are not local: the stages end there, the rest runs whole
    batch_stats = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False),
                                nn.Conv2d(2, 2, 3), nn.Flatten()).eval()
    built = WindowForward.build(batch_stats, shape)
    assert len(built.stages) == 1 and len(built.head) == 3


def test_windows_reaching_the_whole_last_map_are_left_to_the_full_pass():
    model, shape = _models()["mnist-small"]
    local = WindowForward.build(model, shape)
    assert not local.reaches_all((6, 6))
    assert local.reaches_all((20, 20))


# ---------------------------------------------------------------------- in the Square attack
@pytest.fixture()
def forced(monkeypatch):
    """Force the chooser's answer: ``forced("local")`` after the call."""
    def force(mode: str) -> None:
        monkeypatch.setattr(PathChooser, "mode", lambda self, window: mode)
    return force


@pytest.mark.parametrize("mode", ["local", "both"])
def test_square_gives_the_same_points_whichever_pass_it_takes(digits_model, digits, forced,
                                                              monkeypatch, mode):
    x, y = digits.test.x[:40], digits.test.y[:40]

    def attack() -> tuple[torch.Tensor, torch.Tensor]:
        square = Square(eps=0.1, n_queries=150, seed=0)
        return square(digits_model, x, y), square.queries_used

    monkeypatch.setattr(Square, "_window_forward", False)
    plain, plain_queries = attack()
    monkeypatch.setattr(Square, "_window_forward", True)
    calls = []
    original = WindowForward.__call__
    monkeypatch.setattr(WindowForward, "__call__",
                        lambda self, *a: calls.append(1) or original(self, *a))
    forced(mode)
    ours, queries = attack()
    assert calls, "the window pass was never taken"
    assert torch.equal(ours, plain) and torch.equal(queries, plain_queries)


def test_square_confirms_what_the_window_pass_calls_adversarial(digits_model, digits, forced,
                                                                monkeypatch):
    """A window pass that wrongly says every candidate is adversarial breaks nothing: the model
    itself is asked, and the points it still classifies right keep their whole budget."""
    x, y = digits.test.x[:30], digits.test.y[:30]
    original = WindowForward.__call__

    def lying(self, *args):
        logits, patches = original(self, *args)
        return logits + 100.0 * torch.nn.functional.one_hot(logits.argmin(1), 10), patches

    monkeypatch.setattr(WindowForward, "__call__", lying)
    forced("local")
    square = Square(eps=0.02, n_queries=60, seed=0)
    x_adv = square(digits_model, x, y)
    standing = (predict(digits_model, x_adv) == y) & (predict(digits_model, x) == y)
    assert bool(standing.any())
    assert bool((square.queries_used[standing] == 60).all())


def test_chooser_times_both_then_keeps_the_faster_and_gives_up_on_any_difference(monkeypatch):
    chooser = PathChooser()
    for _ in range(window_forward.TRIALS):
        assert chooser.mode((3, 3)) == "both"
        chooser.timings.setdefault((3, 3), []).append((1.0, 2.0))
        chooser.timings.setdefault((5, 5), []).append((2.0, 1.0))
    assert chooser.mode((3, 3)) == "local" and chooser.mode((5, 5)) == "full"
    model, shape = _models()["mnist-small"]
    local = WindowForward.build(model, shape)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        _, maps = local.start(x)
        top = left = torch.zeros(4, dtype=torch.int64)
        logits, _ = chooser.trial(local, x, maps, top, left, (2, 2))
        assert torch.equal(logits, model(x)) and chooser.exact
        original = WindowForward.__call__
        monkeypatch.setattr(WindowForward, "__call__",
                            lambda self, *a: (original(self, *a)[0] + 1e-6, None))
        chooser.trial(local, x, maps, top, left, (2, 2))
    assert not chooser.exact and chooser.mode((3, 3)) == "full"


def test_feature_maps_are_counted_and_capped_in_square(digits_model, digits, monkeypatch):
    model, shape = _models()["mnist-small"]
    local = WindowForward.build(model, shape)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        maps = local.start(x)[1]
    assert local.map_bytes(x) == sum(m.numel() * m.element_size() for m in maps)
    built = []
    original = WindowForward.build.__func__
    monkeypatch.setattr(WindowForward, "build",
                        classmethod(lambda cls, *a: built.append(1) or original(cls, *a)))
    monkeypatch.setattr("advtrain.attacks.square.MAX_MAP_BYTES", 0)
    monkeypatch.setattr(WindowForward, "__call__", lambda *a: pytest.fail("window pass taken"))
    monkeypatch.setattr(PathChooser, "mode", lambda self, window: "local")
    Square(eps=0.1, n_queries=30, seed=0)(digits_model, digits.test.x[:10], digits.test.y[:10])
    assert built
