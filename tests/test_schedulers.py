"""Flow-matching schedulers (x2v.pipelines.schedulers) against docs/sampling.md (its sections cited as §n).

Expected values are derived here, independently of the module: grids from the §2.1/§2.3/§9 formulas in float64
numpy and the reference's literal tables; trajectories from a plain float64 numpy transcription of the §2.2/§2.3/§9
update formulas and from toy problems whose exact answer is known. diffusers (whose UniPC / DPM-Solver++ the official
flow solvers were copied from, §2.4) is only an extra, bit-exact cross-check on the official grid.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from x2v.pipelines.schedulers import (
    FlowDPMSolverScheduler,
    FlowScheduler,
    FlowUniPCScheduler,
    StepDistillScheduler,
    make_scheduler,
)

if TYPE_CHECKING:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

SIGMA_MAX_FLOAT32 = float(np.float32(0.999))  # §2.1: the official σ_max, 0.9990000128746033

# ---------------------------------------------------------------------------------------------------------------
# Grids


def shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def expected_unipc_grid(n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    sigmas = shifted(np.linspace(SIGMA_MAX_FLOAT32, 0.0, n + 1)[:-1], shift)
    return np.trunc(sigmas * 1000).astype(np.int64), np.append(sigmas, 0.0).astype(np.float32)


def expected_dpm_grid(n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    sigmas = shifted(np.linspace(1.0, 0.0, n + 1)[:n], shift)
    return np.trunc(sigmas * 1000).astype(np.int64), np.append(sigmas, 0.0).astype(np.float32)


GRID_CASES = [(50, 5.0), (40, 5.0), (40, 3.0), (40, 12.0), (50, 16.0), (4, 5.0), (1, 5.0), (3, 1.0), (12, 1.0),
              (30, 8.0), (100, 2.0)]


@pytest.mark.parametrize("n, shift", GRID_CASES)
def test_unipc_grid_matches_formula(n: int, shift: float) -> None:
    scheduler = FlowUniPCScheduler(n, shift)
    timesteps, sigmas = expected_unipc_grid(n, shift)
    assert scheduler.timesteps.dtype == torch.int64 and scheduler.sigmas.dtype == torch.float32
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), timesteps)
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), sigmas)


@pytest.mark.parametrize("n, shift", GRID_CASES)
def test_dpm_grid_matches_formula(n: int, shift: float) -> None:
    scheduler = FlowDPMSolverScheduler(n, shift)
    timesteps, sigmas = expected_dpm_grid(n, shift)
    assert scheduler.timesteps[0] == 1000 and scheduler.sigmas[0] == 1.0
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), timesteps)
    np.testing.assert_array_equal(scheduler.sigmas.numpy(), sigmas)


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split()]


# §2.1 table: (n, shift) -> (timesteps, σ_0, σ_{n−1}).
UNIPC_TABLE = {
    (50, 5.0): (ints("999 995 991 987 982 978 973 968 963 957 952 946 940 934 927 920 913 906 898 890 882 873 863 854 "
                     "843 833 821 809 796 783 768 753 737 720 701 681 660 636 611 584 555 522 487 448 405 356 302 241 "
                     "172 92"), 0.99979985, 0.09250686),
    (40, 5.0): (ints("999 994 989 983 978 972 965 959 952 944 937 929 920 911 902 892 882 870 859 846 833 818 803 786 "
                     "768 749 728 706 681 654 624 591 555 514 468 416 356 288 208 113"), 0.99979985, 0.11353305),
    (40, 3.0): (ints("999 991 982 973 963 954 944 933 922 911 899 887 874 861 847 832 817 801 785 767 749 730 710 688 "
                     "666 642 617 590 562 531 499 465 428 388 345 299 249 195 136 71"), 0.99966645, 0.07136054),
    (40, 12.0): (ints("999 997 995 993 990 988 985 982 979 976 972 969 965 961 956 952 947 941 936 929 922 915 907 898 "
                      "888 877 865 852 837 819 799 776 749 717 678 631 571 492 386 235"), 0.9999166, 0.23510954),
    (50, 16.0): (ints("999 998 997 995 994 993 991 989 988 986 984 982 980 978 976 973 971 968 965 963 959 956 953 949 "
                      "945 941 936 931 926 920 914 907 899 891 882 872 861 848 834 818 799 778 752 722 685 639 581 504 "
                      "399 245"), 0.9999374, 0.24596445),
    (4, 5.0): ([999, 937, 833, 624], 0.99979985, 0.6246873),
}


@pytest.mark.parametrize("n, shift", UNIPC_TABLE)
def test_unipc_grid_matches_reference_table(n: int, shift: float) -> None:
    timesteps, first_sigma, last_sigma = UNIPC_TABLE[n, shift]
    scheduler = FlowUniPCScheduler(n, shift)
    assert scheduler.timesteps.tolist() == timesteps
    # The table prints float32 values to 7-8 digits (e.g. 0.6246873 for 0.62468737).
    assert scheduler.sigmas[0].item() == pytest.approx(first_sigma, abs=1e-7)
    assert scheduler.sigmas[n - 1].item() == pytest.approx(last_sigma, abs=1e-7)
    assert scheduler.sigmas[n].item() == 0.0


def test_dpm_grid_matches_reference_table() -> None:
    expected = ints("1000 995 991 987 982 978 973 968 963 957 952 946 940 934 927 921 913 906 898 890 882 873 864 854 "
                    "844 833 821 809 797 783 769 753 737 720 701 681 660 637 612 585 555 523 487 448 405 357 303 241 172 "
                    "92")
    assert FlowDPMSolverScheduler(50, 5.0).timesteps.tolist() == expected


def test_unipc_float32_sigma_max_matters_at_shift_1() -> None:
    # §2.1: with exactly 0.999 the truncated timesteps differ for n = 3, 6, 9, 12, …
    assert SIGMA_MAX_FLOAT32 == 0.9990000128746033
    assert FlowUniPCScheduler(3, 1.0).timesteps.tolist() == [999, 666, 333]
    for n in (3, 6, 9, 12):
        with_exact_0999 = np.trunc(np.linspace(0.999, 0.0, n + 1)[:-1] * 1000).astype(np.int64)
        assert FlowUniPCScheduler(n, 1.0).timesteps.tolist() != with_exact_0999.tolist()


@pytest.mark.parametrize("n, shift, boundary_t, high_steps", [(40, 12.0, 875, 26), (40, 5.0, 900, 15)])
def test_moe_expert_split(n: int, shift: float, boundary_t: int, high_steps: int) -> None:
    # §6: t ≥ boundary_t runs the high-noise expert (T2V-A14B 26/14, I2V-A14B 15/25).
    timesteps = FlowUniPCScheduler(n, shift).timesteps
    assert int((timesteps >= boundary_t).sum()) == high_steps


def test_distill_grid_matches_reference() -> None:
    scheduler = StepDistillScheduler([1000, 750, 500, 250], 5.0)
    assert scheduler.timesteps.dtype == torch.float32  # not truncated (§9)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), [1.0, 0.9375, 0.8333333, 0.625, 0.0], rtol=1e-6)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)


@pytest.mark.parametrize("steps, shift", [([1000, 750, 500, 250], 5.0), ([999, 937, 833, 624], 3.0),
                                          ([1000, 500], 1.0), ([600, 1], 8.0)])
def test_distill_grid_matches_formula(steps: list[int], shift: float) -> None:
    # σ_i = shift(t_i / 1000); the float32 grid LightX2V builds agrees to float32 rounding.
    expected = shifted(np.array(steps) / 1000.0, shift)
    scheduler = StepDistillScheduler(steps, shift)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected * 1000, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Trajectories

VelocityField = Callable[[np.ndarray, float], np.ndarray]


def log_snr(sigma: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.log(1.0 - sigma) - np.log(sigma))


def numpy_unipc(sigmas: np.ndarray, x: np.ndarray, field: VelocityField, corrector: bool = True) -> list[np.ndarray]:
    """§2.2 transcribed literally in float64 (bh2, solver order 2, warm-up, lower order on the last step)."""
    n = len(sigmas) - 1
    s = [float(v) for v in sigmas]
    m: list[np.ndarray] = []
    x_prev, order_prev, samples = None, 0, []
    for i in range(n):
        m_i = x - s[i] * field(x, s[i])
        if i > 0 and corrector:
            h = log_snr(s[i]) - log_snr(s[i - 1])
            hh = -h
            phi1 = np.expm1(hh)
            x_hat = (s[i] / s[i - 1]) * x_prev - (1 - s[i]) * phi1 * m[-1]
            d_t = m_i - m[-1]
            if order_prev == 1:
                x = x_hat - (1 - s[i]) * phi1 * (0.5 * d_t)
            else:
                r = (log_snr(s[i - 2]) - log_snr(s[i - 1])) / h
                d1 = (m[-2] - m[-1]) / r
                g1 = phi1 / hh - 1
                g2 = g1 / hh - 1 / 2
                rho = np.linalg.solve([[1.0, 1.0], [r, 1.0]], [g1 * 1 / phi1, g2 * 2 / phi1])
                x = x_hat - (1 - s[i]) * phi1 * (rho[0] * d1 + rho[1] * d_t)
        m.append(m_i)
        order = min(2, n - i, i + 1)
        x_prev, order_prev = x, order
        h = log_snr(s[i + 1]) - log_snr(s[i])
        phi1 = np.expm1(-h)
        x = (s[i + 1] / s[i]) * x - (1 - s[i + 1]) * phi1 * m_i
        if order == 2:
            r = (log_snr(s[i - 1]) - log_snr(s[i])) / h
            x = x - (1 - s[i + 1]) * phi1 * 0.5 * (m[-2] - m_i) / r
        samples.append(x)
    return samples


def numpy_dpm_2m(sigmas: np.ndarray, x: np.ndarray, field: VelocityField) -> list[np.ndarray]:
    """§2.3 transcribed literally in float64 (DPM-Solver++ 2M midpoint, first order on the first and last step)."""
    n = len(sigmas) - 1
    s = [float(v) for v in sigmas]
    m_prev, samples = None, []
    for i in range(n):
        m = x - s[i] * field(x, s[i])
        h = log_snr(s[i + 1]) - log_snr(s[i])
        first = s[i + 1] / s[i] * x + (1 - s[i + 1]) * (1 - np.exp(-h)) * m
        if i == 0 or i == n - 1:
            x = first
        else:
            r0 = (log_snr(s[i]) - log_snr(s[i - 1])) / h
            x = first + 0.5 * (1 - s[i + 1]) * (1 - np.exp(-h)) * (m - m_prev) / r0
        m_prev = m
        samples.append(x)
    return samples


def numpy_distill(sigmas: np.ndarray, x: np.ndarray, field: VelocityField) -> list[np.ndarray]:
    """§9: x0 = x − σ_i·v, then x0 + σ_{i+1}·v (σ_n = 0 makes the last step return x0)."""
    samples = []
    for i in range(len(sigmas) - 1):
        v = field(x, float(sigmas[i]))
        x = (x - float(sigmas[i]) * v) + float(sigmas[i + 1]) * v
        samples.append(x)
    return samples


def run(scheduler: FlowScheduler, x: np.ndarray, field: VelocityField) -> list[torch.Tensor]:
    """Drive the scheduler like a pipeline; the 'model' sees the float32 sample."""
    sample = torch.from_numpy(x).float()
    samples = []
    for i in range(scheduler.num_steps):
        sigma = scheduler.sigmas[i].item()
        velocity = torch.from_numpy(field(sample.double().numpy(), sigma)).float()
        sample = scheduler.step(velocity, i, sample)
        samples.append(sample)
    return samples


def gaussian_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, VelocityField]:
    """Data x0 ~ N(μ, s²) per element. Exact velocity E[ε − x0 | x_σ]; the ODE keeps x_σ = αμ + sqrt(α²s² + σ²)·z."""
    rng = np.random.default_rng(seed)
    mu, scale, z = rng.normal(size=(3, 2, 8, 8))
    scale = 0.3 + np.abs(scale)

    def field(x: np.ndarray, sigma: float) -> np.ndarray:
        alpha = 1 - sigma
        variance = alpha**2 * scale**2 + sigma**2
        return (sigma - alpha * scale**2) * (x - alpha * mu) / variance - mu

    return mu, scale, z, field


def on_ode(mu: np.ndarray, scale: np.ndarray, z: np.ndarray, sigma: float) -> np.ndarray:
    alpha = 1 - sigma
    return alpha * mu + np.sqrt(alpha**2 * scale**2 + sigma**2) * z


SOLVERS = {
    "unipc": (FlowUniPCScheduler, numpy_unipc),
    "dpm++": (FlowDPMSolverScheduler, numpy_dpm_2m),
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n, shift", [(1, 5.0), (2, 5.0), (3, 3.0), (6, 5.0), (10, 12.0), (8, 1.0)])
def test_multistep_matches_numpy_transcription(solver: str, n: int, shift: float) -> None:
    scheduler_class, reference = SOLVERS[solver]
    scheduler = scheduler_class(n, shift)
    mu, scale, z, field = gaussian_problem()
    x = on_ode(mu, scale, z, scheduler.sigmas[0].item())
    got = run(scheduler, x, field)
    expected = reference(scheduler.sigmas.double().numpy(), x, field)
    for step, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=2e-5, err_msg=f"step {step}")


def test_unipc_comparison_is_sensitive_to_the_corrector() -> None:
    # The tolerance above would miss nothing of consequence: dropping UniC moves the samples by far more.
    scheduler = FlowUniPCScheduler(6, 5.0)
    mu, scale, z, field = gaussian_problem()
    x = on_ode(mu, scale, z, scheduler.sigmas[0].item())
    got = run(scheduler, x, field)
    predictor_only = numpy_unipc(scheduler.sigmas.double().numpy(), x, field, corrector=False)
    assert np.abs(got[-2].numpy() - predictor_only[-2]).max() > 1e-3


def test_distill_matches_numpy_transcription() -> None:
    scheduler = StepDistillScheduler([1000, 750, 500, 250], 5.0)
    _, _, z, field = gaussian_problem()
    got = run(scheduler, z, field)
    expected = numpy_distill(scheduler.sigmas.double().numpy(), z, field)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=2e-5)


NEW_SCHEDULER = {
    "unipc": lambda: FlowUniPCScheduler(7, 5.0),
    "dpm++": lambda: FlowDPMSolverScheduler(7, 5.0),
    "distill": lambda: StepDistillScheduler([1000, 750, 500, 250], 5.0),
}


@pytest.mark.parametrize("name", NEW_SCHEDULER)
def test_single_data_point_is_followed_exactly(name: str) -> None:
    scheduler = NEW_SCHEDULER[name]()
    # v = ε − x0 of one data point: the data prediction is exact, so every solver stays on x_σ = (1 − σ)x0 + σε.
    rng = np.random.default_rng(1)
    x0, noise = rng.normal(size=(2, 3, 5, 5))
    sigma_0 = scheduler.sigmas[0].item()
    got = run(scheduler, (1 - sigma_0) * x0 + sigma_0 * noise, lambda x, sigma: (x - x0) / sigma)
    for i, sample in enumerate(got):
        sigma = scheduler.sigmas[i + 1].item()
        np.testing.assert_allclose(sample.numpy(), (1 - sigma) * x0 + sigma * noise, rtol=0, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_gaussian_endpoint_converges(solver: str) -> None:
    # Starting on the exact ODE path, the endpoint approaches μ + s·z as steps are added (shift 1: even steps).
    mu, scale, z, field = gaussian_problem()
    errors = []
    for n in (10, 20, 40, 80):
        scheduler = SOLVERS[solver][0](n, 1.0)
        final = run(scheduler, on_ode(mu, scale, z, scheduler.sigmas[0].item()), field)[-1]
        errors.append(np.abs(final.numpy() - (mu + scale * z)).max())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.05 * errors[0]


@pytest.mark.parametrize("name", NEW_SCHEDULER)
def test_last_step_returns_the_data_prediction(name: str) -> None:
    scheduler = NEW_SCHEDULER[name]()
    # §2.2 step 7 / §2.3 / §9: σ_n = 0, so the last step returns m_{n−1} = x − σ_{n−1}·v of the sample passed in.
    generator = torch.Generator().manual_seed(2)
    for i in range(scheduler.num_steps):
        sample, velocity = torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 6, generator=generator)
        result = scheduler.step(velocity, i, sample)
    assert torch.equal(result, sample - scheduler.sigmas[-2] * velocity)


def diffusers_unipc_on_official_grid(n: int, shift: float) -> UniPCMultistepScheduler:
    # flow_shift 1 leaves the given σ untouched; σ_0 < 1 − 1e-6, so diffusers does not nudge it (§2.4).
    diffusers = pytest.importorskip("diffusers")  # imported here: it takes seconds and only these tests need it
    reference = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    reference.set_timesteps(sigmas=shifted(np.linspace(SIGMA_MAX_FLOAT32, 0.0, n + 1)[:-1], shift))
    return reference


def diffusers_dpm_on_official_grid(n: int, shift: float) -> DPMSolverMultistepScheduler:
    # diffusers cannot take this grid (σ_0 = 1) through set_timesteps; substitute it afterwards.
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    with warnings.catch_warnings():  # numpy-2 deprecation inside diffusers' own default grid, replaced below
        warnings.simplefilter("ignore", DeprecationWarning)
        reference.set_timesteps(n)
    timesteps, sigmas = expected_dpm_grid(n, shift)
    reference.timesteps, reference.sigmas = torch.from_numpy(timesteps), torch.from_numpy(sigmas)
    return reference


@pytest.mark.parametrize("n, shift", [(1, 5.0), (2, 5.0), (5, 1.0), (12, 5.0), (40, 12.0)])
@pytest.mark.parametrize(
    "ours, theirs",
    [(FlowUniPCScheduler, diffusers_unipc_on_official_grid), (FlowDPMSolverScheduler, diffusers_dpm_on_official_grid)],
    ids=["unipc", "dpm++"],
)
def test_bit_exact_with_diffusers_on_official_grid(ours, theirs, n: int, shift: float) -> None:
    scheduler, reference = ours(n, shift), theirs(n, shift)
    reference.set_begin_index(0)
    assert torch.equal(reference.timesteps, scheduler.timesteps)
    generator = torch.Generator().manual_seed(3)
    sample, bias = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    for i in range(n):
        velocity = torch.sin(3 * sample) + bias
        expected = reference.step(velocity, reference.timesteps[i], sample).prev_sample
        sample = scheduler.step(velocity, i, sample)
        assert torch.equal(sample, expected), f"step {i}"


# ---------------------------------------------------------------------------------------------------------------
# State, determinism, factory and errors


@pytest.mark.parametrize("name", NEW_SCHEDULER)
def test_deterministic_and_reset(name: str) -> None:
    _, _, z, field = gaussian_problem()
    scheduler = NEW_SCHEDULER[name]()
    first = run(scheduler, z, field)[-1]
    scheduler.reset()
    again = run(scheduler, z, field)[-1]
    fresh = run(NEW_SCHEDULER[name](), z, field)[-1]
    assert torch.equal(first, again) and torch.equal(first, fresh)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_output_is_float32(dtype: torch.dtype) -> None:
    scheduler = FlowUniPCScheduler(3, 5.0)
    sample = torch.ones(2, 3, dtype=dtype)
    assert scheduler.step(sample, 0, sample).dtype == torch.float32


def test_factory_names_and_aliases() -> None:
    assert isinstance(make_scheduler("unipc", 50, 5.0), FlowUniPCScheduler)
    assert isinstance(make_scheduler("WanScheduler", 50, 5.0), FlowUniPCScheduler)
    assert isinstance(make_scheduler("DPM++", 50, 5.0), FlowDPMSolverScheduler)
    for name in ("distill", "step_distill", "WanStepDistillScheduler"):
        scheduler = make_scheduler(name, 4, 5.0, denoising_step_list=[1000, 750, 500, 250])
        assert isinstance(scheduler, StepDistillScheduler) and scheduler.num_steps == 4
    assert make_scheduler("distill", None, 5.0, denoising_step_list=[1000, 500]).num_steps == 2


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: FlowUniPCScheduler(0, 5.0), "num_steps"),
        (lambda: FlowDPMSolverScheduler(-3, 5.0), "num_steps"),
        (lambda: FlowUniPCScheduler(2.5, 5.0), "num_steps"),
        (lambda: FlowUniPCScheduler(10, 0.0), "shift"),
        (lambda: FlowDPMSolverScheduler(10, -1.0), "shift"),
        (lambda: StepDistillScheduler([], 5.0), "empty"),
        (lambda: StepDistillScheduler([1000, 750, 750], 5.0), "strictly decreasing"),
        (lambda: StepDistillScheduler([250, 500], 5.0), "strictly decreasing"),
        (lambda: StepDistillScheduler([1001, 500], 5.0), r"\[1, 1000\]"),
        (lambda: StepDistillScheduler([500, 0], 5.0), r"\[1, 1000\]"),
        (lambda: StepDistillScheduler([500.5], 5.0), "integers"),
        (lambda: StepDistillScheduler([1000, 500], 0), "shift"),
        (lambda: make_scheduler("euler", 10, 5.0), "unknown scheduler"),
        (lambda: make_scheduler("distill", 4, 5.0), "denoising_step_list"),
        (lambda: make_scheduler("distill", 8, 5.0, denoising_step_list=[1000, 750, 500, 250]), "does not match"),
        (lambda: make_scheduler("unipc", 4, 5.0, denoising_step_list=[1000, 750, 500, 250]), "only applies"),
        (lambda: make_scheduler("unipc", None, 5.0), "needs num_steps"),
    ],
)
def test_bad_settings_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_steps_must_come_in_order() -> None:
    scheduler = FlowUniPCScheduler(2, 5.0)
    sample = torch.zeros(3)
    with pytest.raises(ValueError, match="out of order"):
        scheduler.step(sample, 1, sample)
    scheduler.step(sample, 0, sample)
    with pytest.raises(ValueError, match="differs from sample shape"):
        scheduler.step(torch.zeros(4), 1, sample)
    scheduler.step(sample, 1, sample)
    with pytest.raises(ValueError, match="all 2 steps are done"):
        scheduler.step(sample, 2, sample)
    scheduler.reset()
    assert scheduler.step_index == 0
