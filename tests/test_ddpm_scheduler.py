"""The discrete DDPM chain (diffusion/ddpm.py) against diffusers' schedulers to the last bit: the fixture
tests/fixtures/diffusers_tiny/scheduler_tables.npz (tools/make_diffusers_fixture.py; diffusers 0.42.1,
torch 2.14.1) holds, for four DDPMScheduler configurations (each beta schedule, both variances, both
prediction types, clipping on and off, a steps_offset), diffusers' betas and ᾱ, the mean and variance
of DDPMScheduler.step at every timestep of the whole chain, and per respacing (every spacing at T = 16,
leading at T = 7 and 50) the DDPM step's mean and DDIMScheduler.step at every step, on random inputs.

Tolerances. β and ᾱ: equal bit for bit (the same float32 linspace, the same cumprod accumulated in
float64). Step means: 2e-6 absolute on values of O(1) (a dozen float32 operations on ᾱ in another
order; measured: means ≤ 4.8e-7, DDIM ≤ 9.5e-7); with ᾱ accumulated in float32 the means near t = 0 were
up to 2.9e-4 off. Variances: 1e-6 relative (three float32 operations; measured 1.2e-7)."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idiff_cli.diffusion import ddpm
from idiff_cli.errors import UserError

TABLES = np.load(pathlib.Path(__file__).parent / "fixtures" / "diffusers_tiny" / "scheduler_tables.npz")
CASES = sorted({key.split("/")[0] for key in TABLES.files})
RESPACINGS = sorted({key.split("/")[1] for key in TABLES.files if key.endswith("/timesteps")})
MEAN_ATOL = 2e-6


def process(case: str, **changes) -> ddpm.DiscreteDDPM:
    config = json.loads(str(TABLES[f"{case}/config"]))
    fields = {f.name for f in dataclasses.fields(ddpm.DiscreteDDPM)}
    config["trained_betas"] = tuple(config["trained_betas"] or ())
    return dataclasses.replace(ddpm.DiscreteDDPM(**{k: v for k, v in config.items() if k in fields}), **changes)


def epsilon(sde: ddpm.DiscreteDDPM, output, y, t):
    """ε of the model output: itself, or converted from v (as the imported network does)."""
    if sde.prediction_type == "epsilon":
        return output
    return sde.alpha(t) * output + sde.sigma(t) * y


def ancestral_means(sde, name: str, t, t_next):
    """The ancestral step's mean at each stored step [steps, ...] and its variance [steps]."""
    def one(y, output, t, t_next):
        mean, _ = ddpm.ddpm_mean_std(sde, epsilon(sde, output, y, t), y, t, t_next)
        return mean, ddpm.posterior_variance(sde, t, t_next)

    return jax.vmap(one)(jnp.asarray(TABLES[f"{name}/sample"]), jnp.asarray(TABLES[f"{name}/output"]), t, t_next)


@pytest.mark.parametrize("case", CASES)
def test_betas_and_alphas_cumprod_are_diffusers_bit_for_bit(case):
    sde = process(case)
    np.testing.assert_array_equal(sde.betas, TABLES[f"{case}/betas"])
    np.testing.assert_array_equal(sde.alphas_cumprod, TABLES[f"{case}/alphas_cumprod"])


@pytest.mark.parametrize("case", CASES)
def test_every_step_of_the_whole_chain_is_diffusers_step(case):
    """t -> t − 1 for every training timestep t (the N-step chain): DDPMScheduler.step's mean (its noise
    zero) and _get_variance (floored at 1e-20, as diffusers)."""
    sde = process(case, timestep_spacing="trailing")
    grid = sde.time_grid(sde.num_train_timesteps)
    mean, var = ancestral_means(sde, f"{case}/chain", grid[:-1], grid[1:])
    np.testing.assert_allclose(mean, TABLES[f"{case}/chain/mean"], rtol=0, atol=MEAN_ATOL)
    np.testing.assert_allclose(np.maximum(var, 1e-20), TABLES[f"{case}/chain/variance"], rtol=1e-6)


@pytest.mark.parametrize("respacing", RESPACINGS)
@pytest.mark.parametrize("case", CASES)
def test_respaced_ddpm_and_ddim_steps_are_diffusers(case, respacing):
    """The respaced timesteps of set_timesteps(T); at every step, DDPMScheduler.step's mean (to the next
    grid element) and DDIMScheduler.step's sample (to t − N // T, which for linspace and trailing
    spacing is not the next grid element: at T = 16 on 1,000 timesteps, on 15 and 8 of the 16 steps)
    from the sampler's own step function."""
    name = f"{case}/{respacing}"
    spacing, steps = respacing.rstrip("0123456789"), int(respacing.lstrip("abcdefghijklmnopqrstuvwxyz"))
    sde = process(case, timestep_spacing=spacing)
    grid = sde.time_grid(steps)
    np.testing.assert_array_equal(np.asarray(grid[:-1]).astype(int), TABLES[f"{name}/timesteps"])
    mean, _ = ancestral_means(sde, name, grid[:-1], grid[1:])
    np.testing.assert_allclose(mean, TABLES[f"{name}/mean"], rtol=0, atol=MEAN_ATOL)

    ddim = sde.sampler(steps, "ddim")

    def step(k, y, output):
        t = grid[k]
        eps = epsilon(sde, output, y, t)
        return ddim.step(lambda x, tt: -eps / sde.sigma(t), y, k, jax.random.key(0))

    got = jax.vmap(step)(jnp.arange(steps), jnp.asarray(TABLES[f"{name}/sample"]), jnp.asarray(TABLES[f"{name}/output"]))
    np.testing.assert_allclose(got, TABLES[f"{name}/ddim"], rtol=0, atol=MEAN_ATOL)


def test_steps_past_the_chain_are_one_line_errors():
    """leading spacing with steps_offset 1 and T = N = 1000 starts at timestep 1000 (diffusers indexes ᾱ
    past its end at the first step): refused, naming the largest T that fits."""
    with pytest.raises(UserError, match=r"^1000 sampling steps of leading spacing with steps_offset 1 start at "
                                        r"timestep 1000, past the model's last training timestep 999; use at most 999"):
        ddpm.DiscreteDDPM(steps_offset=1).sampler(1000, "ddpm")
    with pytest.raises(UserError, match=r"^1001 sampling steps exceed the model's 1000 training timesteps$"):
        ddpm.DiscreteDDPM().sampler(1001, "ddim")
    assert ddpm.DiscreteDDPM(steps_offset=1).sampler(999, "ddpm").n_steps == 999
