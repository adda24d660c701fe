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
from advtrain.attacks.square_forward import FullQueries, QueryForward, WindowQueries
from advtrain.attacks.window_forward import WindowForward
from advtrain.evaluation import predict
from advtrain.models import build_model

torch.set_num_threads(1)


def _odd_model() -> nn.Sequential:
    """Rectangular kernels and strides, dilation, eval-mode BatchNorm, padded max pooling, a
    nested Sequential and a stride larger than the kernel on the last stage."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
        nn.BatchNorm2d(5),
        nn.LeakyReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Sequential(nn.Conv2d(5, 4, 2, stride=3), nn.Tanh()),
        nn.Flatten(),
        nn.Linear(4 * 3 * 2, 7),
    )
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _models() -> dict[str, tuple[nn.Module, tuple[int, int, int]]]:
    torch.manual_seed(0)
    return {
        "mnist-small": (
            build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10).eval(),
            (1, 28, 28),
        ),
        "digits-cnn": (
            build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10).eval(),
            (1, 8, 8),
        ),
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
            window = tuple(
                int(torch.randint(1, min(shape[1:]) + 1, (), generator=g)) for _ in range(2)
            )
            top = int(torch.randint(0, shape[1] - window[0] + 1, (), generator=g))
            left = int(torch.randint(0, shape[2] - window[1] + 1, (), generator=g))
            candidate = current.clone()
            candidate[:, :, top : top + window[0], left : left + window[1]] = torch.rand(
                n, shape[0], *window, generator=g
            )
            logits, change = local(candidate, maps, top, left, window)
            torch.testing.assert_close(logits, model(candidate), rtol=1e-5, atol=1e-5)
            taken = torch.randperm(n, generator=g)[: n // 2]
            local.commit(maps, change, taken, taken)
            current[taken] = candidate[taken]
        # the kept maps are those of the current points
        for kept, fresh in zip(maps, local.start(current)[1]):
            torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-5)


@st.composite
def _stacks(draw):
    """A random stack of convolutions and max poolings (any kernel, stride, padding, dilation),
    a head, an input plane it fits, and a window."""
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
    # a head that starts with a linear layer (kept and moved by differences) or does not
    head = (
        [nn.Flatten(), nn.Linear(c * h * w, 3)]
        if draw(st.booleans())
        else [nn.Flatten(), nn.Tanh(), nn.Linear(c * h * w, 3)]
    )
    model = nn.Sequential(*layers, *head).eval()
    window = (draw(st.integers(1, height)), draw(st.integers(1, width)))
    top, left = draw(st.integers(0, height - window[0])), draw(st.integers(0, width - window[1]))
    return model, (channels, height, width), window, top, left


@settings(max_examples=60, deadline=None)
@given(_stacks())
def test_any_stack_and_window_gives_the_full_forward_pass(case):
    model, shape, window, top, left = case
    local = WindowForward.build(model, shape)
    assert local is not None
    g = torch.Generator().manual_seed(0)
    n = 4
    current = torch.rand((n, *shape), generator=g)
    candidate = current.clone()
    candidate[:, :, top : top + window[0], left : left + window[1]] = torch.rand(
        n, shape[0], *window, generator=g
    )
    with torch.no_grad():
        _, maps = local.start(current)
        logits, change = local(candidate, maps, top, left, window)
        torch.testing.assert_close(logits, model(candidate), rtol=1e-5, atol=1e-5)
        for kept, fresh in zip(maps, local.start(current)[1]):  # left as they were
            assert torch.equal(kept, fresh)
        rows = torch.arange(n)
        local.commit(maps, change, rows, rows)
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
    batch_stats = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2, track_running_stats=False),
        nn.Conv2d(2, 2, 3),
        nn.Flatten(),
    ).eval()
    built = WindowForward.build(batch_stats, shape)
    assert len(built.stages) == 1 and len(built.head) == 3


def test_the_window_pass_is_taken_where_it_saves_a_third_of_the_multiply_adds():
    model, shape = _models()["mnist-small"]
    local = WindowForward.build(model, shape)
    # 9x9: 6x6 of conv1's 14x14 outputs, 5x5 of conv2's and of the head's 7x7 inputs
    assert local.pays((1, 1)) and local.pays((9, 9))
    assert not local.pays((12, 12)) and not local.pays((20, 20))


def test_the_linear_head_is_moved_by_differences_and_recomputed_every_reanchor():
    model, shape = _models()["mnist-small"]
    local = WindowForward.build(model, shape)
    assert local.linear is model[5] and local.n_maps == 3
    g = torch.Generator().manual_seed(2)
    current = torch.rand((5, *shape), generator=g)
    rows = torch.arange(5)
    with torch.no_grad():
        _, maps = local.start(current)
        for step in range(window_forward.REANCHOR):
            candidate = current.clone()
            top, left = (int(v) for v in torch.randint(0, 26, (2,), generator=g))
            candidate[:, :, top : top + 3, left : left + 3] = torch.rand(5, 1, 3, 3, generator=g)
            logits, change = local(candidate, maps, top, left, (3, 3))
            torch.testing.assert_close(logits, model(candidate), rtol=1e-5, atol=1e-5)
            local.commit(maps, change, rows, rows)
            current = candidate
            exact = torch.equal(maps[-1], model[5](model[4](maps[1])))
            assert exact == (step == window_forward.REANCHOR - 1)  # only once re-anchored
        torch.testing.assert_close(maps[-1], local.start(current)[1][-1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- in the Square attack
@pytest.fixture()
def forced(monkeypatch):
    """Force whether the window pass is taken: ``forced(True)``."""

    def force(taken: bool) -> None:
        monkeypatch.setattr(WindowForward, "pays", lambda self, window: taken)

    return force


def test_square_takes_the_window_pass_and_its_logits_are_the_models(
    digits_model, digits, forced, monkeypatch
):
    """Over a whole search (commits, points leaving, re-anchoring), every logit the window pass
    gives is the model's, and Square breaks as many points as with the full pass."""
    x, y = digits.test.x[:40], digits.test.y[:40]
    monkeypatch.setattr(window_forward, "REANCHOR", 7)

    def broken(forward: QueryForward) -> int:
        x_adv = Square(eps=0.1, n_queries=150, seed=0, forward=forward)(digits_model, x, y)
        return int((predict(digits_model, x_adv) != y).sum())

    plain = broken(FullQueries())
    calls = []
    original = WindowForward.__call__

    def checked(self, candidate, *args):
        logits, change = original(self, candidate, *args)
        torch.testing.assert_close(logits, digits_model(candidate), rtol=1e-5, atol=1e-5)
        calls.append(1)
        return logits, change

    monkeypatch.setattr(WindowForward, "__call__", checked)
    forced(True)
    ours = broken(WindowQueries())
    assert len(calls) > 100, "the window pass was not taken"
    assert abs(ours - plain) <= 2 and plain > 5


def test_square_confirms_what_the_window_pass_calls_adversarial(
    digits_model, digits, forced, monkeypatch
):
    """A window pass that wrongly says every candidate is adversarial breaks nothing: the model
    itself is asked, and the points it still classifies right keep their whole budget."""
    x, y = digits.test.x[:30], digits.test.y[:30]
    original = WindowForward.__call__

    def lying(self, *args):
        logits, change = original(self, *args)
        return logits + 100.0 * torch.nn.functional.one_hot(logits.argmin(1), 10), change

    monkeypatch.setattr(WindowForward, "__call__", lying)
    forced(True)
    square = Square(eps=0.02, n_queries=60, seed=0)
    result = square.outcome(digits_model, x, y)
    standing = (predict(digits_model, result.x_adv) == y) & (predict(digits_model, x) == y)
    assert bool(standing.any())
    assert bool((result.queries[standing] == 60).all())


def test_feature_maps_are_counted_and_capped_in_square(digits_model, digits, forced, monkeypatch):
    model, shape = _models()["mnist-small"]
    local = WindowForward.build(model, shape)
    x = torch.rand(3, *shape)
    with torch.no_grad():
        maps = local.start(x)[1]
    assert local.map_bytes(x) == sum(m.numel() * m.element_size() for m in maps)
    built = []
    original = WindowForward.build.__func__
    monkeypatch.setattr(
        WindowForward, "build", classmethod(lambda cls, *a: built.append(1) or original(cls, *a))
    )
    monkeypatch.setattr(WindowForward, "__call__", lambda *a: pytest.fail("window pass taken"))
    forced(True)
    capped = Square(eps=0.1, n_queries=30, seed=0, forward=WindowQueries(max_map_bytes=0))
    capped(digits_model, digits.test.x[:10], digits.test.y[:10])
    assert built
