"""Writes the diffusers oracle fixture of `idiff import` under tests/fixtures/diffusers_tiny/.

Run once, in a throwaway environment with torch and diffusers (not a dependency of idiff):

    python -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.14.1 diffusers==0.42.1 safetensors==0.8.0 numpy==2.4.6
    /tmp/torchenv/bin/python tools/make_diffusers_fixture.py [NAME ...]

It writes, from fixed seeds, the files NAMEd (default: all of them). The network's and the schedulers'
float outputs depend on the CPU kernels torch picks (AVX2 or AVX-512: up to 1e-6 apart), so a file
written once stays as it is: name only the files to add or change.

* `model/`: a tiny random `UNet2DModel` (16×16 RGB, block_out_channels (16, 32), one layer per block,
  8 norm groups, an AttnDownBlock2D/AttnUpBlock2D pair with 4 heads of 8 channels, the
  `google/ddpm-cifar10-32` time embedding and downsample padding) in the diffusers format
  (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json). Its GroupNorm scales
  and biases are randomised too, so that a mapping that swaps them cannot pass.
* `unet_oracle.npz`: x [2, 3, 16, 16] (NCHW), integer timesteps t [2] and diffusers' output ε [2, 3, 16, 16].
* `scheduler_oracle.json`: per scheduler configuration, the respaced timesteps of `set_timesteps(n)` and
  `DDPMScheduler.step` (and, for `leading` spacing, `DDIMScheduler.step` with η = 0) on fixed
  (sample, model output, noise) at a few indices, the noise made explicit.
* `scheduler_tables.npz`: per configuration of the oracle (`c0` … `c3`, its config as JSON in
  `cK/config`): diffusers' `betas` and `alphas_cumprod` [N]; the whole N-step chain (trailing spacing,
  every training timestep) with, at each step, a random sample and model output [N, 2, 2], the mean of
  `DDPMScheduler.step` (its noise set to zero) and `_get_variance`; and per respacing (each spacing at
  T = 16 and a few other T) the timesteps, a sample and model output per step, the DDPM step's mean and
  `DDIMScheduler.step`'s prev_sample (η = 0).
* `ddpm_cifar10_32.json`: the config.json and scheduler_config.json fields of `google/ddpm-cifar10-32`
  (written out here: the files cannot be downloaded on the machines that run the tests) and the
  parameter count of `UNet2DModel(**config)` as diffusers counts it.
"""

from __future__ import annotations

import json
import pathlib
import sys
from unittest import mock

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.schedulers import scheduling_ddpm

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusers_tiny"

TINY = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, flip_sin_to_cos=False,
            freq_shift=1, downsample_padding=0, norm_eps=1e-6)
TINY_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=True, variance_type="fixed_large")

# google/ddpm-cifar10-32: config.json and scheduler_config.json (Ho et al. 2020's CIFAR-10 model, 35.7 M
# parameters: unconditional, linear betas, fixed_large variance).
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
               time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
               block_out_channels=[128, 256, 256, 256], layers_per_block=2, mid_block_scale_factor=1,
               downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6)
CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, variance_type="fixed_large", trained_betas=None)

# Scheduler configurations of the oracle: each schedule, both variances, both prediction types, clipping
# on and off, the three timestep spacings and a steps_offset.
SCHEDULERS = [
    (dict(TINY_SCHEDULER), 10),
    (dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012,
          clip_sample=False, variance_type="fixed_small", prediction_type="v_prediction",
          timestep_spacing="leading", steps_offset=1), 20),
    (dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5,
          variance_type="fixed_small", timestep_spacing="trailing"), 7),
    (dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type="fixed_large",
          timestep_spacing="linspace"), 16),
]


def tiny_model() -> UNet2DModel:
    torch.manual_seed(0)
    model = UNet2DModel(**TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def unet_oracle(model: UNet2DModel) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        eps = model(x, t).sample
    return {"x": x.numpy(), "t": t.numpy(), "eps": eps.numpy()}


def scheduler_cases() -> list[dict]:
    cases = []
    g = torch.Generator().manual_seed(2)
    for fields, n in SCHEDULERS:
        ddpm = DDPMScheduler(**fields)
        ddpm.set_timesteps(n)
        timesteps = ddpm.timesteps.tolist()
        steps = []
        for index in (0, n // 2, n - 1):
            t = timesteps[index]
            sample = torch.randn(2, 3, 4, 4, generator=g)
            output = torch.randn(2, 3, 4, 4, generator=g)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            prev = ddpm.step(output, t, sample, generator=torch.Generator().manual_seed(seed)).prev_sample
            noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
            step = {"index": index, "t": t, "sample": sample.tolist(), "model_output": output.tolist(),
                    "noise": noise.tolist(), "ddpm": prev.tolist()}
            if fields.get("timestep_spacing", "leading") == "leading":
                ddim = DDIMScheduler.from_config(ddpm.config)
                ddim.set_timesteps(n)
                assert ddim.timesteps.tolist() == timesteps
                step["ddim"] = ddim.step(output, t, sample, eta=0.0).prev_sample.tolist()
            steps.append(step)
        config = {k: v for k, v in ddpm.config.items() if not k.startswith("_")}
        cases.append({"config": config, "n": n, "timesteps": timesteps, "steps": steps})
    return cases


# Respacings of the tables: every spacing at T = 16 (where DDIMScheduler.step's t − N // T and the next
# grid element differ for linspace and trailing), and T = 7 and 50 with leading spacing.
RESPACINGS = [("leading", 16), ("linspace", 16), ("trailing", 16), ("leading", 7), ("leading", 50)]


def step_mean(scheduler: DDPMScheduler, output, t, sample) -> torch.Tensor:
    """DDPMScheduler.step's prev_sample with its variance noise set to zero: the step's mean."""
    zero = lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype") or torch.float32)  # noqa: E731
    with mock.patch.object(scheduling_ddpm, "randn_tensor", zero):
        return scheduler.step(output, t, sample).prev_sample


def scheduler_tables() -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for i, (fields, _) in enumerate(SCHEDULERS):
        ddpm = DDPMScheduler(**fields)
        key = f"c{i}"
        config = {k: v for k, v in ddpm.config.items() if not k.startswith("_")}
        out[f"{key}/config"] = np.array(json.dumps(config))
        out[f"{key}/betas"] = ddpm.betas.numpy()
        out[f"{key}/alphas_cumprod"] = ddpm.alphas_cumprod.numpy()
        n = ddpm.config.num_train_timesteps
        chain = DDPMScheduler.from_config(ddpm.config, timestep_spacing="trailing")
        chain.set_timesteps(n)
        assert chain.timesteps.tolist() == list(range(n - 1, -1, -1))
        sample, output = torch.randn(n, 1, 1, 2, 2, generator=g), torch.randn(n, 1, 1, 2, 2, generator=g)
        out[f"{key}/chain/sample"], out[f"{key}/chain/output"] = sample.numpy(), output.numpy()
        out[f"{key}/chain/mean"] = np.stack([step_mean(chain, output[j], t, sample[j]).numpy()
                                             for j, t in enumerate(chain.timesteps.tolist())])
        out[f"{key}/chain/variance"] = np.array([float(chain._get_variance(t)) for t in chain.timesteps.tolist()],
                                                np.float32)
        for spacing, steps in RESPACINGS:
            respaced = DDPMScheduler.from_config(ddpm.config, timestep_spacing=spacing)
            respaced.set_timesteps(steps)
            ddim = DDIMScheduler.from_config(respaced.config)
            ddim.set_timesteps(steps)
            timesteps = respaced.timesteps.tolist()
            assert ddim.timesteps.tolist() == timesteps
            sample = torch.randn(steps, 1, 1, 2, 2, generator=g)
            output = torch.randn(steps, 1, 1, 2, 2, generator=g)
            name = f"{key}/{spacing}{steps}"
            out[f"{name}/timesteps"] = np.array(timesteps)
            out[f"{name}/sample"], out[f"{name}/output"] = sample.numpy(), output.numpy()
            out[f"{name}/mean"] = np.stack([step_mean(respaced, output[j], t, sample[j]).numpy()
                                            for j, t in enumerate(timesteps)])
            out[f"{name}/ddim"] = np.stack([ddim.step(output[j], t, sample[j], eta=0.0).prev_sample.numpy()
                                            for j, t in enumerate(timesteps)])
    return out


def write_model() -> None:
    model = tiny_model()
    model.save_pretrained(OUT / "model", safe_serialization=True)
    DDPMScheduler(**TINY_SCHEDULER).save_pretrained(OUT / "model")
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters")


def write_cifar10() -> None:
    count = sum(p.numel() for p in UNet2DModel(**CIFAR10).parameters())
    (OUT / "ddpm_cifar10_32.json").write_text(json.dumps(
        {"config": {"_class_name": "UNet2DModel", **CIFAR10},
         "scheduler": {"_class_name": "DDPMScheduler", **CIFAR10_SCHEDULER},
         "parameters": count}, indent=1) + "\n")
    print(f"ddpm-cifar10-32: {count} parameters")


WRITERS = {
    "model": write_model,
    "unet_oracle.npz": lambda: np.savez(OUT / "unet_oracle.npz", **unet_oracle(tiny_model())),
    "scheduler_oracle.json": lambda: (OUT / "scheduler_oracle.json").write_text(json.dumps(scheduler_cases()) + "\n"),
    "scheduler_tables.npz": lambda: np.savez_compressed(OUT / "scheduler_tables.npz", **scheduler_tables()),
    "ddpm_cifar10_32.json": write_cifar10,
}


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(WRITERS))
    if unknown:
        sys.exit(f"unknown fixture file(s) {', '.join(unknown)}; choose among {', '.join(WRITERS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or WRITERS:
        WRITERS[name]()
        print(f"wrote {OUT / name} (torch {torch.__version__}, python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(sys.argv[1:])
