"""Flow-matching samplers of Wan2.1 / Wan2.2 and LightX2V's step-distilled models (pure math, no model code).

Reference: docs/sampling.md (its sections cited as §n below). Convention (§1): ``x_σ = (1 − σ)·x0 + σ·ε``; the DiT
predicts the velocity ``v ≈ ε − x0``, so the data prediction is ``x0 = x − σ·v``; ``α = 1 − σ``,
``λ = log α − log σ``.

Use one scheduler per generation (or ``reset()`` it): ``timesteps[i]`` is what the DiT receives at step ``i``,
``sigmas`` holds one more value (the final 0), and ``step(velocity, i, sample)`` must be called for ``i = 0, 1, …``
in order because the multistep solvers keep a history. A Wan2.2 MoE pipeline keeps the same scheduler across the
expert switch (§6).

All arithmetic is float32, including the scalar coefficients (0-dim float32 tensors kept on the CPU), with the
operations in the official order, because the official samplers compute exactly that way (§1) and we aim to agree
with them bit for bit. Inputs are upcast to float32 and the result is float32.

There is no ``add_noise``: no supported pipeline noises a clean latent (I2V conditions through ``y``, §5; TI2V-5B
replaces latent frame 0 after each step, §7).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000  # every Wan model (§1)

# The official UniPC grid starts at its training grid's first sigma, 1 − 1/1000 stored as float32 and read back as a
# Python float (§2.1); with shift 1 this changes some truncated timesteps.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))  # 0.9990000128746033
DPM_SIGMA_MAX = 1.0  # the dpm++ grid starts at exactly 1 (§2.3)


def _check_shift(shift: float) -> float:
    if not shift > 0:
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    return float(shift)


def _check_num_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return int(num_steps)


def _official_grid(sigma_max: float, num_steps: int, shift: float) -> tuple[Tensor, Tensor]:
    """Timesteps (int64) and sigmas (float32, with a trailing 0) as the official ``set_timesteps`` builds them:
    float64 numpy, shift, truncation toward zero (§2.1, §2.3)."""
    sigmas = np.linspace(sigma_max, 0.0, num_steps + 1)[:num_steps]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return timesteps, torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def _log_snr(sigma: Tensor) -> Tensor:
    """λ(σ) = log(1 − σ) − log(σ); +∞ at σ = 0 and −∞ at σ = 1, which the update formulas absorb (§2.2 step 7)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowScheduler(ABC):
    """A fixed grid of ``num_steps`` steps and the update ``step(velocity, step_index, sample) -> next sample``.

    ``timesteps``: ``[num_steps]``, the value passed to the DiT at each step. ``sigmas``: ``[num_steps + 1]`` float32,
    the noise level of the sample entering each step, then 0.
    """

    timesteps: Tensor
    sigmas: Tensor

    def __init__(self, timesteps: Tensor, sigmas: Tensor) -> None:
        self.timesteps = timesteps
        self.sigmas = sigmas
        self.reset()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def step_index(self) -> int:
        """The index the next ``step`` call must pass."""
        return self._step_index

    def reset(self) -> None:
        """Forget the history so the same grid can run another generation."""
        self._step_index = 0

    def step(self, velocity: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """Advance ``sample`` (at ``sigmas[step_index]``) to ``sigmas[step_index + 1]`` given the DiT's velocity
        (after classifier-free guidance). Returns a new float32 tensor; the inputs are not modified, but the history
        may keep a reference to ``sample``, so do not write into it in place afterwards."""
        if self._step_index >= self.num_steps:
            raise ValueError(f"all {self.num_steps} steps are done; call reset() to sample again")
        if step_index != self._step_index:
            raise ValueError(
                f"step_index {step_index} is out of order: this scheduler expects step {self._step_index} next "
                "(its multistep history depends on the order); call reset() to start over"
            )
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} differs from sample shape {tuple(sample.shape)}")
        next_sample = self._step(velocity.float(), sample.float(), step_index)
        self._step_index += 1
        return next_sample

    @abstractmethod
    def _step(self, velocity: Tensor, sample: Tensor, i: int) -> Tensor: ...


class FlowUniPCScheduler(FlowScheduler):
    """The official default sampler (``--sample_solver unipc``, ``FlowUniPCMultistepScheduler``, §2): UniPC with
    data prediction, ``bh2``, order 2 with a one-step warm-up and first order on the last step, the corrector on every
    step after the first. Integer timesteps on the official grid (not diffusers' grid, docs/pitfalls.md E02)."""

    solver_order = 2

    def __init__(self, num_steps: int, shift: float) -> None:
        super().__init__(*_official_grid(UNIPC_SIGMA_MAX, _check_num_steps(num_steps), _check_shift(shift)))

    def reset(self) -> None:
        super().reset()
        self._data_predictions: list[Tensor] = []  # m_k of the last `solver_order` steps, newest last
        self._predictor_start: Tensor | None = None  # the (corrected) sample the last predictor started from
        self._predictor_order = 0

    def _step(self, velocity: Tensor, sample: Tensor, i: int) -> Tensor:
        data_prediction = sample - self.sigmas[i] * velocity
        if i > 0:
            # The corrector rebuilds the current sample from the previous one; the passed sample enters only through
            # the data prediction, exactly as in the official code (relevant when a pipeline edits the latent).
            sample = self._correct(data_prediction, i)
        self._data_predictions = (self._data_predictions + [data_prediction])[-self.solver_order :]
        # lower_order_final (min with steps left) and warm-up (order ≤ steps taken + 1), §2.2 step 4.
        order = min(self.solver_order, self.num_steps - i, i + 1)
        self._predictor_start, self._predictor_order = sample, order
        return self._predict(sample, i, order)

    def _predict(self, x: Tensor, i: int, order: int) -> Tensor:
        """UniP from σ_i to σ_{i+1} (§2.2 step 6)."""
        sigma_s, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        lambda_s = _log_snr(sigma_s)
        h = _log_snr(sigma_t) - lambda_s
        phi1 = torch.expm1(-h)  # also B(h) for bh2
        m0 = self._data_predictions[-1]
        x_next = sigma_t / sigma_s * x - (1 - sigma_t) * phi1 * m0
        if order == 2:
            r = (_log_snr(self.sigmas[i - 1]) - lambda_s) / h
            d1 = (self._data_predictions[-2] - m0) / r
            x_next = x_next - (1 - sigma_t) * phi1 * (0.5 * d1)  # ρ is fixed to 0.5 for order 2
        return x_next

    def _correct(self, m_i: Tensor, i: int) -> Tensor:
        """UniC at σ_i using the previous step's sample and predictor order (§2.2 step 2)."""
        sigma_s, sigma_t = self.sigmas[i - 1], self.sigmas[i]
        lambda_s = _log_snr(sigma_s)
        h = _log_snr(sigma_t) - lambda_s
        hh = -h
        phi1 = torch.expm1(hh)  # also B(h) for bh2
        m_prev = self._data_predictions[-1]
        x_hat = sigma_t / sigma_s * self._predictor_start - (1 - sigma_t) * phi1 * m_prev
        d_t = m_i - m_prev
        if self._predictor_order == 1:
            return x_hat - (1 - sigma_t) * phi1 * (0.5 * d_t)
        r = (_log_snr(self.sigmas[i - 2]) - lambda_s) / h
        d1 = (self._data_predictions[-2] - m_prev) / r
        g1 = phi1 / hh - 1
        g2 = g1 / hh - 0.5
        system = torch.stack([torch.ones(2), torch.stack([r, torch.ones(())])])  # R = [[1, 1], [r, 1]]
        rhs = torch.stack([g1 * 1 / phi1, g2 * 2 / phi1])  # b_k = g_k·k!/B(h)
        rho = torch.linalg.solve(system, rhs)
        return x_hat - (1 - sigma_t) * phi1 * (rho[0] * d1 + rho[1] * d_t)


class FlowDPMSolverScheduler(FlowScheduler):
    """The official ``--sample_solver dpm++`` (``FlowDPMSolverMultistepScheduler``, §2.3): DPM-Solver++ 2M with the
    midpoint rule, first order on the first and last steps; its grid starts at σ = 1 (first timestep 1000)."""

    def __init__(self, num_steps: int, shift: float) -> None:
        super().__init__(*_official_grid(DPM_SIGMA_MAX, _check_num_steps(num_steps), _check_shift(shift)))

    def reset(self) -> None:
        super().reset()
        self._previous_data_prediction: Tensor | None = None

    def _step(self, velocity: Tensor, sample: Tensor, i: int) -> Tensor:
        sigma_s, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        m0 = sample - sigma_s * velocity
        m1, self._previous_data_prediction = self._previous_data_prediction, m0
        lambda_s = _log_snr(sigma_s)
        h = _log_snr(sigma_t) - lambda_s
        coefficient = (1 - sigma_t) * (torch.exp(-h) - 1.0)  # = −α_t·(1 − e^{−h})
        if i == 0 or i == self.num_steps - 1:  # no history yet / σ_n = 0
            return (sigma_t / sigma_s) * sample - coefficient * m0
        r0 = (lambda_s - _log_snr(self.sigmas[i - 1])) / h
        d1 = (1.0 / r0) * (m0 - m1)
        return (sigma_t / sigma_s) * sample - coefficient * m0 - 0.5 * coefficient * d1


class StepDistillScheduler(FlowScheduler):
    """LightX2V's ``WanStepDistillScheduler`` for 4-step distilled weights or LoRAs (§9); run it without CFG.

    ``denoising_step_list`` (e.g. ``[1000, 750, 500, 250]``) picks points of a 1000-point shifted grid, so
    ``σ_i = shift(t_i/1000)``; the DiT gets the float ``σ_i·1000`` (not truncated). Each step is Euler on the flow ODE
    (``x0 = x − σ_i·v``, then ``x0 + σ_{i+1}·v``); the last returns ``x0``.
    """

    def __init__(self, denoising_step_list: Sequence[int], shift: float) -> None:
        steps = _check_denoising_step_list(denoising_step_list)
        shift = _check_shift(shift)
        # Built in float32 torch like LightX2V, so the σ and t values match it bit for bit.
        grid = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]  # grid[k] = 1 − k/1000
        grid = shift * grid / (1 + (shift - 1) * grid)
        sigmas = grid[[NUM_TRAIN_TIMESTEPS - t for t in steps]]
        super().__init__(sigmas * NUM_TRAIN_TIMESTEPS, torch.cat([sigmas, torch.zeros(1)]))
        self.denoising_step_list = steps

    def _step(self, velocity: Tensor, sample: Tensor, i: int) -> Tensor:
        data_prediction = sample - self.sigmas[i] * velocity
        if i == self.num_steps - 1:
            return data_prediction
        return data_prediction + self.sigmas[i + 1] * velocity


def _check_denoising_step_list(denoising_step_list: Sequence[int]) -> list[int]:
    steps = list(denoising_step_list)
    if not steps:
        raise ValueError("denoising_step_list is empty; a 4-step distilled model uses e.g. [1000, 750, 500, 250]")
    if any(isinstance(t, bool) or int(t) != t or not 1 <= t <= NUM_TRAIN_TIMESTEPS for t in steps):
        raise ValueError(f"denoising_step_list values must be integers in [1, {NUM_TRAIN_TIMESTEPS}], got {steps}")
    steps = [int(t) for t in steps]
    if any(a <= b for a, b in pairwise(steps)):
        raise ValueError(f"denoising_step_list must be strictly decreasing, got {steps}")
    return steps


# Official `--sample_solver` values, our short names, and LightX2V's scheduler class names (§2, §9).
_SCHEDULER_NAMES = {
    "unipc": "unipc",
    "wanscheduler": "unipc",
    "dpm++": "dpm++",
    "distill": "distill",
    "step_distill": "distill",
    "wanstepdistillscheduler": "distill",
}


def make_scheduler(
    name: str,
    num_steps: int | None,
    shift: float,
    *,
    denoising_step_list: Sequence[int] | None = None,
) -> FlowScheduler:
    """Build the scheduler ``name`` ("unipc", "dpm++" or "distill", case-insensitive, plus the aliases above).

    For "distill" the steps come from ``denoising_step_list``; ``num_steps`` may be ``None`` or must equal its length.
    """
    kind = _SCHEDULER_NAMES.get(name.strip().lower())
    if kind is None:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(_SCHEDULER_NAMES)}")
    if kind == "distill":
        if denoising_step_list is None:
            raise ValueError("the distill scheduler needs denoising_step_list, e.g. [1000, 750, 500, 250]")
        if num_steps is not None and num_steps != len(denoising_step_list):
            raise ValueError(
                f"num_steps {num_steps} does not match denoising_step_list {list(denoising_step_list)} "
                f"({len(denoising_step_list)} steps); the list fixes the step count"
            )
        return StepDistillScheduler(denoising_step_list, shift)
    if denoising_step_list is not None:
        raise ValueError(f"denoising_step_list only applies to the distill scheduler, not {name!r}")
    if num_steps is None:
        raise ValueError(f"the {name!r} scheduler needs num_steps")
    if kind == "unipc":
        return FlowUniPCScheduler(num_steps, shift)
    return FlowDPMSolverScheduler(num_steps, shift)
