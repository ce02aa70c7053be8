"""structcov.torch: the nn.Module adapter (runs in the torch session)."""

from __future__ import annotations

import copy
import os
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
_selected = os.environ.get("STRUCTCOV_BACKEND")
if _selected and "torch" not in _selected.split(","):
    pytest.skip("torch adapter tests run in the torch session", allow_module_level=True)

import structcov as sc  # noqa: E402
import structcov.functional as F  # noqa: E402
import structcov.torch as st  # noqa: E402

STRUCTURES = {
    "diagonal": sc.DiagonalCovariance,
    "lowrank+diag": lambda: sc.LowRankPlusDiagonalCovariance(2),
    "factorized": sc.FactorizedCovariance,
    "kronecker": sc.KroneckerCovariance,
}


def make(structure: str, seed: int = 0, dtype=torch.float64, bias_first: bool = False):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=generator, dtype=dtype)
    bias = torch.randn(3, generator=generator, dtype=dtype)
    mean = {"bias": bias, "weight": weight} if bias_first else {"weight": weight, "bias": bias}
    q = st.GaussianParameter(mean, STRUCTURES[structure]())
    q.cov.reset_parameters(0.5, generator=generator)
    return q


def test_parameter_names_are_stable_and_keep_insertion_order():
    q = make("kronecker", bias_first=True)
    names = list(q.state_dict())
    assert names[:2] == ["mean.bias", "mean.weight"]
    assert set(names[2:]) == {
        "cov.output_factor",
        "cov.input_factor.bias",
        "cov.input_factor.weight",
    }
    assert list(q.cov.input_factor) == ["bias", "weight"]
    assert q.names == ("bias", "weight")
    assert all(isinstance(p, torch.nn.Parameter) for p in q.parameters())
    # Every storage path of the core is a parameter path under `cov.`.
    assert {f"cov.{path}" for path in q.cov.lr_scaling} == set(names[2:])


def test_none_entry_is_registered_as_none_and_absent_from_samples():
    q = st.GaussianParameter(
        {"weight": torch.zeros(2, 3), "bias": None}, sc.LowRankPlusDiagonalCovariance(1)
    )
    assert q["bias"] is None
    assert "mean.bias" not in q.state_dict()
    assert set(q.sample((2,), generator=torch.Generator().manual_seed(0))) == {"weight"}


def test_dotted_names_are_rejected():
    with pytest.raises(ValueError, match=re.escape("contain no '.'")):
        st.GaussianParameter({"layer.weight": torch.zeros(2)}, sc.DiagonalCovariance())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip_gives_identical_samples(structure):
    q = make(structure, seed=0)
    other = make(structure, seed=1)
    other.load_state_dict(q.state_dict())
    a = q.sample((4,), generator=torch.Generator().manual_seed(7))
    b = other.sample((4,), generator=torch.Generator().manual_seed(7))
    for name in q.names:
        assert torch.equal(a[name], b[name])
    assert torch.equal(q.cov.to_dense(), other.cov.to_dense())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_to_dtype_moves_everything(structure):
    q = make(structure, dtype=torch.float32).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in q.parameters())
    assert q.cov.logdet().dtype == torch.float64
    assert q.sample((2,), generator=torch.Generator().manual_seed(0))["weight"].dtype == (
        torch.float64
    )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_reparametrised_gradient_of_a_sample(structure):
    q = make(structure)
    z_generator = torch.Generator().manual_seed(3)
    samples = q.sample((5,), generator=z_generator)
    (samples["weight"].sum() + samples["bias"].sum()).backward()
    # d/d mean of sum over 5 samples of (mean + S z) is 5 for every entry.
    assert torch.allclose(q.mean["weight"].grad, torch.full_like(q.mean["weight"], 5.0))
    for path in q.cov.lr_scaling:
        assert q.cov._parameter(path).grad is not None


@pytest.mark.parametrize("structure", STRUCTURES)
def test_kl_and_log_prob_gradients_match_finite_differences(structure):
    q = make(structure)
    prior = st.normal_prior(q, 1.5)
    draw = make(structure, seed=5).sample((2,), generator=torch.Generator().manual_seed(6))
    value = {k: v.detach() for k, v in draw.items()}
    paths = list(q.cov.lr_scaling)
    leaves = [q.cov._parameter(path).detach().clone().requires_grad_(True) for path in paths]

    def with_storage(*arrays):
        # The pure functions take the storage as an argument: (structure, storage, mean).
        return q.cov.structure, dict(zip(paths, arrays, strict=True)), dict(q.mean.items())

    assert torch.autograd.gradcheck(
        lambda *a: F.kl_divergence(with_storage(*a), prior._parts()), leaves, atol=1e-6, rtol=1e-5
    )
    assert torch.autograd.gradcheck(
        lambda *a: F.log_prob(*with_storage(*a), value), leaves, atol=1e-6, rtol=1e-5
    )


def test_param_groups_apply_lr_scaling():
    q = make("lowrank+diag")
    groups = st.param_groups(q, lr=0.1)
    by_parameter = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(by_parameter) == len(list(q.parameters()))
    assert by_parameter[id(q.mean["weight"])] == pytest.approx(0.1)
    assert by_parameter[id(q.cov.factor["weight"])] == pytest.approx(0.1 / 2)
    assert by_parameter[id(q.cov.scale["bias"])] == pytest.approx(0.1)
    torch.optim.Adam(groups).step()  # the groups are valid optimizer input


def test_functional_call_and_vmap_over_stacked_states():
    from torch.func import functional_call, stack_module_state, vmap

    class KL(torch.nn.Module):
        def __init__(self, q):
            super().__init__()
            self.q = q

        def forward(self):
            return st.kl_divergence(self.q, st.normal_prior(self.q, 1.0))

    models = [KL(make("lowrank+diag", seed=s)) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    batched = vmap(lambda p, b: functional_call(base, (p, b), ()))(params, buffers)
    looped = torch.stack([m() for m in models])
    assert torch.allclose(batched, looped)

    q = make("kronecker")
    state = {k: 2 * v for k, v in q.state_dict().items()}
    swapped = functional_call(q, state, ((3,),), {"generator": torch.Generator().manual_seed(1)})
    doubled = make("kronecker")
    doubled.load_state_dict(state)
    direct = doubled.sample((3,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(swapped["weight"], direct["weight"])


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("batched", ["means", "noise", "both"])
def test_vmap_of_factor_matmul_matches_a_loop(structure, batched):
    # factor_matmul adds the mean into its new blocks in place; under vmap a batched
    # mean cannot be added into an unbatched block in place, so this must fall back.
    from torch.func import vmap

    q = make(structure)
    generator = torch.Generator().manual_seed(3)
    k, p = q.cov.num_factor_columns, q.num_params
    zs = torch.randn(4, 2, k, generator=generator, dtype=torch.float64)
    means = torch.randn(4, p, generator=generator, dtype=torch.float64)
    z_dim = None if batched == "means" else 0
    m_dim = None if batched == "noise" else 0
    z_in = zs[0] if z_dim is None else zs
    m_in = means[0] if m_dim is None else means

    def product(z, m):
        return q.cov.flatten(q.cov.factor_matmul(z, m))

    got = vmap(product, in_dims=(z_dim, m_dim))(z_in, m_in)
    expected = torch.stack(
        [product(zs[0 if z_dim is None else i], means[0 if m_dim is None else i]) for i in range(4)]
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("what", ["sample", "kl"])
def test_torch_compile_fullgraph(what):
    q = make("lowrank+diag", dtype=torch.float32)
    prior = st.normal_prior(q, 1.0)
    z = torch.randn(4, q.cov.num_factor_columns, generator=torch.Generator().manual_seed(0))

    def eager():
        if what == "sample":
            return q.cov.factor_matmul(z, additive_constant=dict(q.mean.items()))["weight"]
        return st.kl_divergence(q, prior)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes about lru_cache and deprecations
        compiled = torch.compile(eager, fullgraph=True)()
        if what == "sample":
            # The module's own sample with torch's global RNG also compiles without a graph
            # break; inductor draws from its own RNG stream, so only shapes are compared.
            drawn = torch.compile(lambda: q.sample((4,)), fullgraph=True)()
            assert drawn["weight"].shape == (4, 3, 4) and drawn["bias"].shape == (4, 3)
    np.testing.assert_allclose(
        compiled.detach().numpy(), eager().detach().numpy(), rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------- the module owns its arrays
def test_the_module_reads_its_parameters_directly():
    """No shared core object: a change of a parameter is seen by the next call."""
    q = make("lowrank+diag")
    before = q.cov.logdet()
    with torch.no_grad():
        q.cov.scale["weight"].mul_(2.0)
    assert not torch.isclose(q.cov.logdet(), before)
    assert q.cov.storage()["scale.weight"] is q.cov.scale["weight"]


def test_sample_scale_on_a_kronecker_module_changes_the_covariance():
    q = make("kronecker")
    base = q.cov.to_dense().detach()
    q.cov.sample_scale = 0.5
    assert q.cov.structure.sample_scale == 0.5
    torch.testing.assert_close(q.cov.to_dense().detach(), 0.25 * base)
    with pytest.raises(ValueError, match="`sample_scale` must be a finite float >= 0"):
        q.cov.sample_scale = float("nan")
    other = make("lowrank+diag")
    with pytest.raises(AttributeError, match="sample_scale"):
        other.cov.sample_scale = 0.1
    with pytest.raises(AttributeError):
        _ = other.cov.input_rank


def test_load_storage_copies_into_the_parameters_after_validation():
    q = make("kronecker")
    parameter = q.cov.output_factor
    with pytest.raises(ValueError, match=r"must have shape \(3, 3\)"):
        q.cov.load_storage({**q.cov.storage(), "output_factor": torch.zeros(2, 2)})
    new = {path: torch.ones_like(value) for path, value in q.cov.storage().items()}
    q.cov.load_storage(new)
    assert q.cov.output_factor is parameter  # the same nn.Parameter, new values
    torch.testing.assert_close(parameter.detach(), torch.ones(3, 3, dtype=torch.float64))


def test_a_core_covariance_given_to_a_module_belongs_to_it():
    cov = sc.DiagonalCovariance()
    st.GaussianParameter({"w": torch.zeros(3)}, cov)
    with pytest.raises(ValueError, match="already belongs to a GaussianParameter"):
        st.GaussianParameter({"w": torch.zeros(3)}, cov)


def test_core_functions_accept_modules():
    q = make("diagonal")
    prior = sc.normal_prior(q, 2.0)
    assert isinstance(prior, sc.GaussianParameter)
    torch.testing.assert_close(sc.kl_divergence(q, prior), st.kl_divergence(q, prior))
    with pytest.raises(TypeError, match="must be a structcov GaussianParameter"):
        sc.kl_divergence(q.mean["weight"], prior)
