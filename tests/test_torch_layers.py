"""structcov.torch layers: Linear, Sequential, model-level KL and predictive (torch session)."""

from __future__ import annotations

import math
import os
import re

import pytest

torch = pytest.importorskip("torch")
_selected = os.environ.get("STRUCTCOV_BACKEND")
if _selected and "torch" not in _selected.split(","):
    pytest.skip("torch layer tests run in the torch session", allow_module_level=True)

import structcov as sc  # noqa: E402
import structcov.parametrizations as sp  # noqa: E402
import structcov.torch as st  # noqa: E402

STRUCTURES = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank2": lambda: sc.LowRankCovariance(2),
    "lowrank2+diag": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "factorized": sc.FactorizedCovariance,
    "kronecker": sc.KroneckerCovariance,
    "kronecker2x2": lambda: sc.KroneckerCovariance(2, 2),
}
#: Structures whose covariance is singular for these layers (rank < P): their KL to a
#: full-rank prior is +inf (DESIGN §3), so they train on the likelihood alone.
SINGULAR = {"lowrank2", "kronecker2x2"}


@pytest.fixture(autouse=True)
def _restore_global_rng():
    """Layers initialise from torch's global RNG (as nn.Linear): leave it as found."""
    with torch.random.fork_rng(devices=[]):
        yield


def layer(structure: str | None, in_features=4, out_features=3, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    cov = None if structure is None else STRUCTURES[structure]
    return st.Linear(in_features, out_features, bias, cov=cov, dtype=torch.float64, **kwargs)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------- shapes
@pytest.mark.parametrize("structure", [*STRUCTURES, None])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3), None, 5])
def test_forward_shapes(structure, bias, sample_shape):
    lin = layer(structure, bias=bias)
    x = torch.randn(7, 2, 4, dtype=torch.float64, generator=gen(1))
    out = lin(x, sample_shape, gen(2))
    if sample_shape is None:
        leading = ()
    elif isinstance(sample_shape, int):
        leading = (sample_shape,)
    else:
        leading = sample_shape
    assert out.shape == (*leading, 7, 2, 3)
    assert out.dtype == torch.float64
    assert (lin.params["bias"] is None) == (not bias)
    assert lin.params.names == (("weight", "bias") if bias else ("weight",))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_structcov_linear_on_params(structure, bias):
    lin = layer(structure, bias=bias)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    for shape in [(), (4,), (2, 3), None]:
        got = lin(x, shape, gen(3))
        expected = sc.linear(x, lin.params, shape, gen(3))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # ... and equals the weights drawn by params.sample with the same generator state.
    draw = lin.params.sample((4,), gen(3))
    manual = x @ draw["weight"].transpose(-1, -2)
    if bias:
        manual = manual + draw["bias"][:, None, :]
    torch.testing.assert_close(lin(x, (4,), gen(3)), manual)


@pytest.mark.parametrize("structure", ["kronecker", "lowrank2+diag"])
def test_input_contains_samples_and_parameter_samples(structure):
    lin = layer(structure)
    xs = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=gen(1))
    out = lin(xs, (2, 3), gen(4), input_contains_samples=True)
    assert out.shape == (2, 3, 5, 3)
    torch.testing.assert_close(
        out, sc.linear(xs, lin.params, (2, 3), gen(4), input_contains_samples=True)
    )
    draw = lin.params.sample((2,), gen(5))
    x = xs[0, 0]
    got = lin(x, (2,), parameter_samples=draw)
    torch.testing.assert_close(got, x @ draw["weight"].transpose(-1, -2) + draw["bias"][:, None])


def test_deterministic_layer_is_an_ordinary_linear_layer():
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 3, dtype=torch.float64)
    lin = layer(None)
    assert not lin.stochastic and lin.params.cov is None
    lin.load_state_dict(reference.state_dict())
    assert lin.weight is lin.params["weight"] and lin.bias is lin.params["bias"]
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    expected = reference(x)
    torch.testing.assert_close(lin(x, None), expected)
    replicated = lin(x, (2, 3))
    assert replicated.shape == (2, 3, 5, 3)
    torch.testing.assert_close(replicated, expected.expand(2, 3, 5, 3))
    xs = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen(2))
    torch.testing.assert_close(lin(xs, (2,), input_contains_samples=True), reference(xs))
    with pytest.raises(ValueError, match="no `parameter_samples`"):
        lin(x, (2,), parameter_samples={"weight": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match=re.escape("must start with the sample_shape (3,)")):
        lin(xs, (3,), input_contains_samples=True)
    assert st.kl_divergence(st.Sequential(lin, layer("diagonal", 3, 2)), 1.0).isfinite()


# ----------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "parametrization", [sp.Standard(), sp.NeuralTangent(), sp.MaximalUpdate()], ids=repr
)
@pytest.mark.parametrize("layer_type", ["input", "hidden", "output"])
def test_initialised_at_the_parametrization_scales_and_cov_non_zero(parametrization, layer_type):
    fan_in, fan_out = 400, 300
    lin = st.Linear(
        fan_in,
        fan_out,
        layer_type=layer_type,
        cov=sc.DiagonalCovariance,
        parametrization=parametrization,
        dtype=torch.float64,
    )
    scales = lin.init_scales()
    assert scales == parametrization.init_scales(fan_in, fan_out, layer_type)
    # 120000 draws: the empirical std is within 1.5% of the parametrization's
    assert lin.weight.std().item() == pytest.approx(scales["weight"], rel=0.015)
    assert lin.bias.std().item() == pytest.approx(scales["bias"], rel=0.25)
    # the diagonal covariance's stds are the same per-name scales (through softplus)
    std = torch.nn.functional.softplus(lin.params.cov.scale["weight"])
    torch.testing.assert_close(std, torch.full_like(std, scales["weight"]))
    std = torch.nn.functional.softplus(lin.params.cov.scale["bias"])
    torch.testing.assert_close(std, torch.full_like(std, scales["bias"]))
    torch.manual_seed(0)
    kron = st.Linear(6, 5, cov=sc.KroneckerCovariance(), parametrization=parametrization)
    for name, value in kron.params.cov.named_parameters():
        assert value.abs().min() > 0, name
    assert kron.weight.dtype == torch.float32


def test_parametrization_scales_follow_the_papers():
    # Tensor Programs V, Table 3 (muP, standard form) and NTP rewritten on W = w / sqrt(n).
    mup, ntp, std = sp.MaximalUpdate(), sp.NeuralTangent(), sp.Standard()
    assert mup.init_scales(256, 64, "output") == {"weight": 1 / 256, "bias": 1.0}
    assert mup.init_scales(256, 64, "hidden") == {"weight": 1 / 16, "bias": 1.0}
    assert mup.lr_scales(256, 64, "adam", "hidden") == {"weight": 1 / 256, "bias": 1.0}
    assert mup.lr_scales(256, 64, "Adam", "input") == {"weight": 1.0, "bias": 1.0}
    assert mup.lr_scales(256, 64, "SGD", "input") == {"weight": 64.0, "bias": 64.0}
    assert mup.lr_scales(256, 64, "sgd", "output") == {"weight": 1 / 256, "bias": 64.0}
    assert ntp.lr_scales(256, 64, "sgd") == {"weight": 1 / 256, "bias": 1.0}
    assert ntp.lr_scales(256, 64, "adamw") == {"weight": 1 / 16, "bias": 1.0}
    assert std.lr_scales(256, 64, "sgd", "output") == {"weight": 1.0, "bias": 1.0}
    assert sp.fans((8, 3, 5, 5)) == (75, 200)
    with pytest.raises(ValueError, match="`optimizer` must be 'sgd' or 'adam'"):
        mup.lr_scales(4, 4, "lbfgs")
    with pytest.raises(ValueError, match="`layer_type` must be one of"):
        st.Linear(4, 3, layer_type="middle")
    with pytest.raises(TypeError, match="`parametrization` must be a structcov"):
        st.Linear(4, 3, parametrization="muP")
    assert sp.MaximalUpdate() == sp.MaximalUpdate() != sp.Standard()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_param_groups_combine_the_parametrization_with_lr_scaling(optimizer):
    model = st.Sequential(
        st.Linear(
            8,
            16,
            layer_type="input",
            cov=sc.KroneckerCovariance,
            parametrization=sp.MaximalUpdate(),
        ),
        torch.nn.ReLU(),
        st.Linear(
            16,
            4,
            layer_type="output",
            cov=lambda: sc.LowRankPlusDiagonalCovariance(2),
            parametrization=sp.MaximalUpdate(),
        ),
    )
    groups = st.param_groups(model, 0.1, optimizer)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(rate) == len(list(model.parameters()))
    for lin in (model[0], model[2]):
        factors = sp.MaximalUpdate().lr_scales(
            lin.in_features, lin.out_features, optimizer, lin.layer_type
        )
        assert rate[id(lin.weight)] == pytest.approx(0.1 * factors["weight"])
        assert rate[id(lin.bias)] == pytest.approx(0.1 * factors["bias"])
        for path, factor in lin.params.cov.lr_scaling.items():
            expected = 0.1 * factors["weight"] * factor
            assert rate[id(lin.params.cov._parameter(path))] == pytest.approx(expected), path
    torch.optim.SGD(groups).step()


def test_setting_cov_to_none_makes_a_layer_deterministic():
    lin = layer("lowrank2+diag")
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    expected = torch.nn.functional.linear(x, lin.weight, lin.bias)
    model = st.Sequential(lin, torch.nn.ReLU(), layer("diagonal", 3, 2))
    lin.params.cov = None
    assert not lin.stochastic and "cov=None" in repr(lin)
    torch.testing.assert_close(lin(x, (2,), gen(0)), expected.expand(2, 5, 3))
    torch.testing.assert_close(lin(x, None), expected)
    # the model's KL and parameter groups now skip it
    only = st.kl_divergence(model[2].params, 1.0)
    torch.testing.assert_close(st.kl_divergence(model, 1.0), only)
    assert len(st.param_groups(model, 0.1)) >= 1


def test_cov_object_belongs_to_one_layer_and_callables_build_one_each():
    cov = sc.DiagonalCovariance()
    st.Linear(4, 3, cov=cov)
    with pytest.raises(ValueError, match="belongs to one parameter"):
        st.Linear(4, 3, cov=cov)
    a, b = st.Linear(4, 3, cov=sc.DiagonalCovariance), st.Linear(4, 3, cov=sc.DiagonalCovariance)
    assert a.params.cov.scale["weight"] is not b.params.cov.scale["weight"]
    with pytest.raises(TypeError, match="`cov` must be None, a structcov covariance"):
        st.Linear(4, 3, cov=lambda: "diagonal")
    with pytest.raises(ValueError, match="`in_features` must be an int >= 1"):
        st.Linear(0, 3)


def test_dtype_repr_and_reset():
    lin = st.Linear(4, 3, bias=False, cov=sc.DiagonalCovariance, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in lin.parameters())
    assert "in_features=4, out_features=3, bias=False" in repr(lin)
    assert "cov=None" in repr(st.Linear(4, 3))
    with torch.no_grad():
        lin.params.cov.scale["weight"].fill_(3.0)
    lin.reset_parameters()  # the stds back to 1 / sqrt(in_features) (Standard), through softplus
    std = torch.nn.functional.softplus(lin.params.cov.scale["weight"])
    torch.testing.assert_close(std, torch.full((3, 4), 0.5, dtype=torch.float64))


# ----------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("structure", [*STRUCTURES, None])
@pytest.mark.parametrize("bias", [True, False])
def test_nn_linear_state_dict_loads_into_the_means(structure, bias):
    reference = torch.nn.Linear(4, 3, bias=bias, dtype=torch.float64)
    lin = layer(structure, bias=bias, seed=1)
    cov_before = {k: v.clone() for k, v in lin.state_dict().items() if ".cov." in k}
    lin.load_state_dict(reference.state_dict())  # strict
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    torch.testing.assert_close(lin(x, None), reference(x))
    for key, value in cov_before.items():
        assert torch.equal(lin.state_dict()[key], value), key


def test_own_state_dict_strict_round_trip_and_errors():
    lin, other = layer("kronecker", seed=0), layer("kronecker", seed=1)
    other.load_state_dict(lin.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    assert torch.equal(lin(x, (3,), gen(2)), other(x, (3,), gen(2)))
    model = st.Sequential(layer("diagonal"), torch.nn.ReLU(), layer("diagonal", 3, 2))
    plain = torch.nn.Sequential(
        torch.nn.Linear(4, 3, dtype=torch.float64),
        torch.nn.ReLU(),
        torch.nn.Linear(3, 2, dtype=torch.float64),
    )
    model.load_state_dict(plain.state_dict())  # nested prefixes map too
    torch.testing.assert_close(model(x, None), plain(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer("diagonal", bias=False).load_state_dict(torch.nn.Linear(4, 3).state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        lin.load_state_dict({"params.mean.weight": torch.zeros(3, 4)})


# ----------------------------------------------------------------------- gradients
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("local", [False, True])
def test_sampled_loss_gives_every_parameter_a_gradient(structure, local):
    if local and structure != "diagonal":
        pytest.skip("local reparameterization is for the diagonal covariance")
    lin = layer(structure, local_reparameterization=local)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    (lin(x, (4,), gen(2)) ** 2).sum().backward()
    for name, parameter in lin.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------- Sequential
def test_sequential_passes_samples_through_in_order():
    first, second = layer("kronecker", 4, 6), layer("lowrank2+diag", 6, 3, seed=1)
    model = st.Sequential(first, torch.nn.ReLU(), second)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    got = model(x, (2, 3), gen(7))
    assert got.shape == (2, 3, 5, 3)
    g = gen(7)
    hidden = torch.relu(sc.linear(x, first.params, (2, 3), g))
    expected = sc.linear(hidden, second.params, (2, 3), g, input_contains_samples=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x, None), second(torch.relu(first(x, None)), None))
    assert model(x, (), gen(0)).shape == (5, 3)
    xs = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen(2))
    assert model(xs, (2,), gen(0), input_contains_samples=True).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="needs a `sample_shape`"):
        model(xs, None, input_contains_samples=True)


def test_sequential_with_deterministic_layers_and_nesting():
    det, sto = layer(None, 4, 6), layer("diagonal", 6, 3)
    model = st.Sequential(det, torch.nn.Tanh(), st.Sequential(sto, torch.nn.ReLU()))
    assert model.stochastic and not st.Sequential(det).stochastic
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    expected = torch.relu(sto(torch.tanh(det(x, None)), (4,), gen(3)))
    torch.testing.assert_close(model(x, (4,), gen(3)), expected)
    only = st.Sequential(det, torch.nn.ReLU())
    assert only(x, (2,)).shape == (2, 5, 6)


# ----------------------------------------------------------------------- model-level inference
def test_kl_divergence_over_a_model():
    layers = [layer("kronecker", 4, 6), layer("lowrank2+diag", 6, 3, seed=1)]
    model = st.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    expected = sum(st.kl_divergence(m.params, st.normal_prior(m.params, 0.5)) for m in layers)
    torch.testing.assert_close(st.kl_divergence(model, 0.5), expected)
    # float prior for one parameter; the old pairwise call unchanged.
    torch.testing.assert_close(
        st.kl_divergence(layers[0].params, 0.5),
        sc.kl_divergence(layers[0].params, sc.normal_prior(layers[0].params, 0.5)),
    )
    # A model of the same layout as the prior: pairs by path.
    prior = st.Sequential(
        layer("kronecker", 4, 6, seed=5), torch.nn.ReLU(), layer("lowrank2+diag", 6, 3, seed=6)
    )
    pairs = [(layers[0].params, prior[0].params), (layers[1].params, prior[2].params)]
    torch.testing.assert_close(
        st.kl_divergence(model, prior), sum(st.kl_divergence(q, p) for q, p in pairs)
    )
    # Gradients reach the model's parameters.
    st.kl_divergence(model, 1.0).backward()
    assert layers[1].params.cov.factor["weight"].grad is not None
    with pytest.raises(ValueError, match="same module paths"):
        st.kl_divergence(model, st.Sequential(layer("kronecker", 4, 6)))
    with pytest.raises(ValueError, match=r"holds no structcov\.torch\.GaussianParameter"):
        st.kl_divergence(torch.nn.Linear(2, 2), 1.0)
    with pytest.raises(TypeError, match="`p` must be a float prior scale"):
        st.kl_divergence(model, "wide")


def test_predictive():
    model = st.Sequential(layer("diagonal", 4, 6), torch.nn.ReLU(), layer("diagonal", 6, 3))
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen(1))
    stacked = st.predictive(model, x, (8,), gen(2))
    torch.testing.assert_close(stacked, model(x, (8,), gen(2)))
    probs = st.predictive(model, x, (2, 4), gen(2), probabilities=True)
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64))
    expected = torch.softmax(model(x, (2, 4), gen(2)), -1).mean(dim=(0, 1))
    torch.testing.assert_close(probs, expected)
    mean = st.predictive(model, x, None, probabilities=True)
    torch.testing.assert_close(mean, torch.softmax(model(x, None), -1))


# ----------------------------------------------------------------------- training
def classification_problem():
    """4 classes from a random two-layer teacher on 12 features; 256 train, 512 test."""
    g = gen(123)
    x = torch.randn(768, 12, generator=g)
    w1, w2 = torch.randn(12, 16, generator=g), torch.randn(16, 4, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    return x[:256], y[:256], x[256:], y[256:]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_short_elbo_training_run_improves_test_nll(structure):
    x, y, x_test, y_test = classification_problem()
    torch.manual_seed(0)
    model = st.Sequential(
        st.Linear(12, 32, cov=STRUCTURES[structure]),
        torch.nn.ReLU(),
        st.Linear(32, 4, cov=STRUCTURES[structure]),
    )
    kl_weight = 0.0 if structure in SINGULAR else 1.0 / len(x)
    if structure in SINGULAR:
        assert st.kl_divergence(model, 1.0) == math.inf
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def test_nll() -> torch.Tensor:
        with torch.no_grad():
            probs = st.predictive(model, x_test, (16,), gen(99), probabilities=True)
            return -torch.log(probs[torch.arange(len(y_test)), y_test]).mean()

    before = test_nll()
    optimizer = torch.optim.Adam(st.param_groups(model, lr=0.02))
    noise = gen(1)
    for _ in range(30):
        optimizer.zero_grad()
        logits = model(x, (4,), noise)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), y.repeat(4))
        loss = nll + (kl_weight * st.kl_divergence(model, 1.0) if kl_weight else 0.0)
        assert torch.isfinite(loss), loss
        loss.backward()
        optimizer.step()
    after = test_nll()
    assert after < before, (before, after)
    for key, value in model.state_dict().items():
        assert not torch.equal(value, initial[key]), f"{key} did not move"


# ----------------------------------------------------------------------- conversion
class _Net(torch.nn.Module):
    """A model with its own forward: converted layers draw once per call."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU())
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_bayesian_converts_a_deterministic_model_keeping_its_means():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3, bias=False)
    )
    model = st.bayesian(plain, sc.DiagonalCovariance, parametrization=sp.MaximalUpdate())
    assert isinstance(model, st.Sequential) and isinstance(plain, torch.nn.Sequential)
    assert type(plain[0]) is torch.nn.Linear  # the original is not changed
    assert [model[0].layer_type, model[2].layer_type] == ["input", "output"]
    assert model[2].bias is None and model[0].stochastic and model[2].stochastic
    x = torch.randn(5, 4, generator=gen(1))
    torch.testing.assert_close(model(x, None), plain(x))
    assert model(x, (3,), gen(2)).shape == (3, 5, 3)
    # the covariance is at the parametrization's scale, the means are the trained ones
    std = torch.nn.functional.softplus(model[2].params.cov.scale["weight"])
    torch.testing.assert_close(std, torch.full_like(std, 1 / 6))
    assert st.kl_divergence(model, 1.0).isfinite()


def test_bayesian_last_layer_only_and_custom_forward():
    torch.manual_seed(0)
    net = _Net()
    last = st.bayesian(net, sc.KroneckerCovariance(), only=["fc"])
    assert type(last.body[0]) is torch.nn.Linear and isinstance(last.body, st.Sequential)
    assert isinstance(last.fc, st.Linear) and last.fc.stochastic
    x = torch.randn(5, 4, generator=gen(1))
    torch.testing.assert_close(last.fc(last.body(x), None), net(x))
    assert last(x).shape == (5, 3)  # one draw per call
    picked = st.bayesian(net, sc.DiagonalCovariance, only=lambda path, m: m.out_features == 6)
    assert isinstance(picked.body[0], st.Linear) and type(picked.fc) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"`only` names no convertible layer .*\['body'\]"):
        st.bayesian(net, sc.DiagonalCovariance, only=["body"])
    with pytest.raises(ValueError, match="one covariance object belongs to one layer"):
        st.bayesian(net, sc.DiagonalCovariance())
    with pytest.raises(ValueError, match="has no layer to convert"):
        st.bayesian(torch.nn.ReLU(), sc.DiagonalCovariance)


# ----------------------------------------------------------------------- convolutions
CONVS = {
    1: (st.Conv1d, torch.nn.Conv1d),
    2: (st.Conv2d, torch.nn.Conv2d),
    3: (st.Conv3d, torch.nn.Conv3d),
}


def conv_layer(n, structure, seed=0, **kwargs):
    torch.manual_seed(seed)
    cov = None if structure is None else STRUCTURES[structure]
    options = {"stride": 1, "padding": 1, "groups": 1, "bias": True, **kwargs}
    return CONVS[n][0](4, 6, 3, cov=cov, dtype=torch.float64, **options)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("structure", ["diagonal", "kronecker", "lowrank2+diag", None])
def test_conv_layers_are_structcov_conv_on_params_and_load_nn_conv(n, structure):
    layer_ = conv_layer(n, structure, stride=2, groups=2)
    x = torch.randn(5, 4, *(7,) * n, dtype=torch.float64, generator=gen(1))
    reference = CONVS[n][1](4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
    layer_.load_state_dict(reference.state_dict())  # strict: the covariance is kept
    torch.testing.assert_close(layer_(x, None), reference(x))
    out = layer_(x, (3,), gen(2))
    assert out.shape == (3, *reference(x).shape)
    if structure is None:
        torch.testing.assert_close(out, reference(x).expand(3, *reference(x).shape))
        return
    options = {"stride": 2, "padding": 1, "groups": 2}
    torch.testing.assert_close(out, sc.conv(x, layer_.params, (3,), gen(2), **options))
    # a different draw per sample, and gradients reach every stored array
    assert not torch.allclose(out[0], out[1])
    (out**2).sum().backward()
    for name, parameter in layer_.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_conv_layer_init_errors_repr_and_sequential():
    layer_ = st.Conv2d(
        3,
        8,
        (3, 5),
        padding="same",
        cov=sc.KroneckerCovariance,
        layer_type="input",
        parametrization=sp.MaximalUpdate(),
    )
    assert layer_.init_scales() == sp.MaximalUpdate().init_scales(45, 120, "input")
    assert "kernel_size=(3, 5)" in repr(layer_) and "layer_type='input'" in repr(layer_)
    x = torch.randn(2, 3, 9, 9, generator=gen(1))
    assert layer_(x, (4,), gen(0)).shape == (4, 2, 8, 9, 9)
    model = st.Sequential(layer_, torch.nn.ReLU(), st.Conv2d(8, 2, 1, cov=sc.DiagonalCovariance))
    out = model(x, (4,), gen(0))
    assert out.shape == (4, 2, 2, 9, 9)
    assert st.kl_divergence(model, 1.0).isfinite()
    with pytest.raises(ValueError, match="`groups` \\(3\\) must divide"):
        st.Conv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="`padding_mode` must be 'zeros'"):
        st.Conv1d(4, 6, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="`kernel_size` must be an int or a tuple of 2 ints"):
        st.Conv2d(4, 6, (3, 3, 3))


def test_bayesian_converts_convolutions():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)
    )
    model = st.bayesian(plain, sc.KroneckerCovariance)
    assert isinstance(model[0], st.Conv2d) and isinstance(model[2], st.Conv2d)
    x = torch.randn(3, 1, 6, 6, generator=gen(1))
    torch.testing.assert_close(model(x, None), plain(x))
    assert model(x, (2,), gen(0)).shape == (2, 3, 2, 4, 4)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_covariance_is_invariant_in_the_data_nullspace_under_training(structure):
    """Inputs without their last two features: a likelihood-only run (Adam) moves no
    covariance entry that acts on those features (their gradient is exactly zero)."""
    lin = layer(structure, in_features=5, out_features=3)
    x = torch.randn(64, 5, dtype=torch.float64, generator=gen(1))
    x[:, 3:] = 0.0  # the data's span misses features 3 and 4
    y = x @ torch.randn(5, 3, dtype=torch.float64, generator=gen(2))
    acting = {  # storage path -> the index of the entries acting on features 3, 4
        "scale.weight": (slice(None), slice(3, None)),
        "factor.weight": (slice(None), slice(3, None)),
        "input_factor.weight": (slice(3, None),),
    }
    before = {path: t.detach().clone() for path, t in lin.params.cov.storage().items()}
    optimizer = torch.optim.Adam(lin.parameters(), lr=0.05)
    noise = gen(3)
    for _ in range(20):
        optimizer.zero_grad()
        loss = ((lin(x, (4,), noise) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
    after = lin.params.cov.storage()
    checked = [path for path in before if path in acting]
    assert checked, "no storage array acts on input features"
    for path in checked:
        index = acting[path]
        torch.testing.assert_close(after[path][index], before[path][index], rtol=0, atol=0)
        assert not torch.equal(after[path], before[path]), f"{path} did not train at all"
